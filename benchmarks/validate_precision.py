"""Rank agreement of PyTorch vs ONNX explanations at several precisions (docs/validate.md).

For SmolLM2-135M-Instruct and all-MiniLM-L6-v2 (the offline real models): the optimum export (fp32), its fp16
conversion (onnxruntime.transformers.float16, inputs/outputs kept fp32), 8- and 4-bit weights (onnxruntime's
MatMulNBitsQuantizer: block 32, symmetric, accuracy_level 0; every MatMul with a constant weight, lm_head
included), and, where onnx-lrp has the rules, onnxruntime's dynamic int8 quantisation (MatMulInteger). Each is
compared with the PyTorch original (LXT 2.1) on the eight default sentences with ``onnx_lrp.validate.compare``.

    PYTHONPATH=. .venv/bin/python benchmarks/validate_precision.py [--models smollm2,minilm] [--out DIR]

Prints one row per (model, variant): the worst input's token-relevance Spearman, Kendall, top-5 overlap, sign
agreement and rel_err, output agreement, the layer the divergence is located at, and the time of the comparison.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def _variants(src: Path, out: Path) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from onnx_lrp.ops import known_op_types

    paths = {"fp32": src}
    for name in ("fp16", "int8-weights", "int4-weights", "int8-dynamic"):
        path = out / name / "model.onnx"
        if name == "int8-dynamic" and "MatMulInteger" not in known_op_types():
            print(f"{name}: skipped (no MatMulInteger rule in this onnx-lrp)", file=sys.stderr)
            continue
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            if name == "int8-dynamic":
                quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8)
            else:
                model = onnx.load(str(src))
                if name == "fp16":
                    model = convert_float_to_float16(model, keep_io_types=True)
                else:
                    q = MatMulNBitsQuantizer(model, bits=int(name[3]), block_size=32, is_symmetric=True,
                                             accuracy_level=0)
                    q.process()
                    model = q.model.model
                onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 2**24)
            for f in src.parent.iterdir():
                if f.suffix in (".json", ".txt", ".jinja"):
                    shutil.copy2(f, path.parent / f.name)
        paths[name] = path
    return paths


def main() -> None:
    import logging

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "onnx-lrp" / "validate-precision"))
    args = ap.parse_args()
    from onnx_lrp.exporters import assets
    from onnx_lrp.validate import compare

    rows = []
    for model in args.models.split(","):
        src = assets.smollm2() if model == "smollm2" else assets.minilm()
        pt = src.parent.parent / "pt" if model == "smollm2" else assets.minilm_folder()
        for name, path in _variants(src, Path(args.out) / model).items():
            t0 = time.perf_counter()
            rep = compare(pt, path)
            dt = time.perf_counter() - t0
            r = rep.relevance["input_ids"]
            same = rep.output["same_prediction"]["mean"] if rep.settings["mode"] != "embedding" else None
            d = rep.divergence
            where = "-" if d is None else f"{d['kind']} {d['block']}{'' if d['sharp'] else ' (gradual)'}"
            rows.append((model, name, r["spearman"]["worst"], r["kendall"]["worst"], r["topk"]["worst"],
                         r["sign"]["worst"], r["rel_err"]["worst"], rep.output["max_rel"]["worst"],
                         "-" if same is None else f"{same:.2f}", where, "PASS" if rep.passed else "FAIL", dt))
    print("| model | B | Spearman | Kendall | top-5 | sign | rel_err | output max_rel | same prediction | "
          "divergence | default checks | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m, n, sp, kd, tk, sg, re, mr, same, where, ok, dt in rows:
        print(f"| {m} | {n} | {sp:.4f} | {kd:.4f} | {tk:.2f} | {sg:.2f} | {re:.2e} | {mr:.2e} | {same} | {where} | "
              f"{ok} | {dt:.0f} s |")


if __name__ == "__main__":
    main()

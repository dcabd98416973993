"""Prototype of the other route for the relevance pass: its rules written as ONNX nodes appended to the forward
graph, so that one onnxruntime session runs forward and backward (its kernels, its memory planner, no captured
outputs, no Python per step). Covers the ops of the common transformer graphs (Llama/SmolLM2 and BERT/MiniLM as
optimum exports them: MatMul with weights, attention blocks, residual and bias Add, scaling Mul/Div, SwiGLU product,
unary regions, written-out RMSNorm, LayerNormalization, RoPE's Slice/Neg/Concat, Reshape/Transpose/Expand/...)
under the default AttnLRP composite, and is checked against the numpy interpreter on the same inputs.

    python benchmarks/onnx_backward_prototype.py --models smollm2,minilm --seqs 32,128,512 --threads 1,2

prints, per point, max |prototype - interpreter| / max |interpreter| of the token relevance and the medians of
interleaved rounds: plain onnxruntime forward (a), ``Explainer.explain`` (b), the prototype session (p).
Limits: one explained position per batch element (row-compacted start), no eps, no leading target axis, the
probabilities of every layer stay alive until the backward reads them (no long inputs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_lrp import Explainer  # noqa: E402
from onnx_lrp._capture import default_session_options  # noqa: E402
from onnx_lrp._stream import copy_without_initializers  # noqa: E402
from onnx_lrp.ops.attention_blocks import find_blocks  # noqa: E402


class Emitter:
    """Appends backward nodes to a copy of the forward graph (weights are graph inputs, as in the capture)."""

    def __init__(self, ex: Explainer, feeds: dict, position: np.ndarray):
        self.ex, self.g = ex, ex.graph
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self.n = 0
        self.by_name = {n.name: n for n in self.g.nodes}
        self.plan = ex._plan(ex.default_output, ())
        self.blocks = find_blocks(self.g, ex.analysis.carrying, ex.analysis.region_of, ex.analysis.regions,
                                  set(self.g.output_names))
        small = [i for n in self.g.nodes if n.op_type == "Slice" for i in n.inputs[1:] if i]
        small += [i for n in self.g.nodes if n.op_type in ("Reshape", "Expand") for i in n.inputs[1:2]]
        small = [t for t in dict.fromkeys(small) if self.g.constant(t) is None]
        every = [o for n in self.g.nodes for o in n.outputs if o and o not in self.g.output_names and o not in small
                 and self.g.constant(o) is None]
        ex._capture.prepare(set(small) | set(self.g.output_names), set(every))
        self.values, shapes = ex._capture.run(feeds, list(self.g.output_names) + small, every)
        shapes.update((k, v.shape) for k, v in self.values.items())
        shapes.update((k, v.shape) for k, v in feeds.items())
        self.shape = lambda t: tuple(shapes[t]) if t in shapes else tuple(self.g.constant(t).shape)
        for t in small:
            self.values[t] = np.array(self.values[t])
        self.position = position

    def tmp(self) -> str:
        self.n += 1
        return f"bwd::{self.n}"

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.tmp()
        domain = attrs.pop("domain", None)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def const(self, value) -> str:
        name = self.tmp()
        self.consts.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, t: str) -> list[int]:
        c = self.g.constant(t)
        return [int(v) for v in np.asarray(c if c is not None else self.values[t]).reshape(-1)]

    def unbroadcast(self, g: str, out_shape: tuple, shape: tuple) -> str:
        extra = len(out_shape) - len(shape)
        axes = list(range(extra)) + [extra + j for j, d in enumerate(shape) if d == 1 and out_shape[extra + j] != 1]
        if not axes:
            return g
        r = self.op("ReduceSum", [g, self.const(np.array(axes, np.int64))], keepdims=1)
        return self.op("Reshape", [r, self.const(np.array(shape, np.int64))]) if extra else r

    # -------------------------------------------------------------------------------- rules, gradient form
    def step(self, step, gy: list[str | None]) -> list[str | None]:
        node, op = self.by_name[step.name], step.op_type
        g = gy[0]
        c = [i in self.ex.analysis.carrying for i in node.inputs]
        if op == "attention":
            return self.attention(self.blocks[step.name], g)
        if op == "region":
            x, y = step.inputs[0], step.outputs[0]
            ratio = self.op("Div", [y, self.op("Add", [x, self.const(np.float32(1e-10))])])
            return [self.unbroadcast(self.op("Mul", [g, ratio]), self.shape(y), self.shape(x))]
        if op == "MatMul":
            w = self.g.constant(node.inputs[1])
            assert w is not None and c[0] and not c[1], node.name
            name = node.inputs[1]
            if not self.g.is_initializer(name):  # an Identity/Transpose of a weight: the folded value
                name = self.const(w.astype(np.float32))
            return [self.op("FusedMatMul", [g, name], transB=1, domain="com.microsoft"), None]
        if op in ("Add", "Sub"):
            out = self.shape(node.outputs[0])
            res = []
            for k, i in enumerate(node.inputs):
                if not c[k]:
                    res.append(None)
                    continue
                gk = self.op("Neg", [g]) if (op == "Sub" and k == 1) else g
                res.append(self.unbroadcast(gk, out, self.shape(i)))
            return res
        if op in ("Mul", "Div"):
            out = self.shape(node.outputs[0])
            if op == "Mul" and all(c[:2]):  # uniform rule on a product of two carrying factors
                half = self.const(np.float32(0.5))
                a, b = node.inputs
                return [self.unbroadcast(self.op("Mul", [self.op("Mul", [g, b]), half]), out, self.shape(a)),
                        self.unbroadcast(self.op("Mul", [self.op("Mul", [g, a]), half]), out, self.shape(b))]
            k = 0 if c[0] else 1
            assert not c[1 - k] and (op == "Mul" or k == 0), node.name
            res = [None, None]
            res[k] = self.unbroadcast(self.op(op, [g, node.inputs[1 - k]]), out, self.shape(node.inputs[k]))
            return res
        if op in ("Reshape", "Unsqueeze", "Squeeze", "Flatten"):
            return [self.op("Reshape", [g, self.const(np.array(self.shape(node.inputs[0]), np.int64))])] + [
                None] * (len(node.inputs) - 1)
        if op == "Transpose":
            perm = list(node.attr("perm"))
            return [self.op("Transpose", [g], perm=[int(p) for p in np.argsort(perm)])]
        if op in ("Identity", "Cast", "Dropout"):
            return [g] + [None] * (len(node.inputs) - 1)
        if op == "Neg":
            return [self.op("Neg", [g])]
        if op == "Expand":
            return [self.unbroadcast(g, self.shape(node.outputs[0]), self.shape(node.inputs[0])), None]
        if op == "Concat":
            axis = int(node.attr("axis"))
            sizes = [self.shape(i)[axis] for i in node.inputs]
            outs = [self.tmp() for _ in sizes]
            self.nodes.append(helper.make_node("Split", [g, self.const(np.array(sizes, np.int64))], outs, axis=axis))
            return [o if ck else None for o, ck in zip(outs, c)]
        if op == "Slice":
            shape = self.shape(node.inputs[0])
            starts, ends = self.ints(node.inputs[1]), self.ints(node.inputs[2])
            axes = self.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else list(range(len(starts)))
            pads = [0] * (2 * len(shape))
            for s, e, a in zip(starts, ends, axes):
                a = a % len(shape)
                d = shape[a]
                s, e = min(max(s + d if s < 0 else s, 0), d), min(max(e + d if e < 0 else e, 0), d)
                pads[a], pads[len(shape) + a] = s, d - e
            return [self.op("Pad", [g, self.const(np.array(pads, np.int64))])] + [None] * (len(node.inputs) - 1)
        if op == "LayerNormalization":
            x, w = node.inputs[0], node.inputs[1]
            axes = self.const(np.array([-1], np.int64))
            xc = self.op("Sub", [x, self.op("ReduceMean", [x, axes], keepdims=1)])
            var = self.op("ReduceMean", [self.op("Mul", [xc, xc]), axes], keepdims=1)
            eps = self.const(np.float32(node.attr("epsilon", 1e-5)))
            inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [var, eps])])])
            gw = self.op("Mul", [g, w])
            return [self.op("Mul", [inv, self.op("Sub", [gw, self.op("ReduceMean", [gw, axes], keepdims=1)])]), None,
                    None]
        raise NotImplementedError(f"{op} ({step.name})")

    def attention(self, b, g: str) -> list[str | None]:
        """O = P V, P = softmax(A Bt + mask) (a chain of one mask Add): the uniform rule on both products."""
        assert [n.op_type for n in b.chain] in ([], ["Add"]), [n.op_type for n in b.chain]
        half = self.const(np.float32(0.5))
        p = b.pv.inputs[0]
        gv = self.op("Mul", [self.op("MatMul", [self.op("Transpose", [p], perm=[0, 1, 3, 2]), g]), half])
        gp = self.op("Mul", [self.op("MatMul", [g, self.op("Transpose", [b.v], perm=[0, 1, 3, 2])]), half])
        axes = self.const(np.array([-1], np.int64))
        gs = self.op("Mul", [p, self.op("Sub", [gp, self.op("ReduceSum", [self.op("Mul", [p, gp]), axes], keepdims=1)])])
        ga = self.op("Mul", [self.op("MatMul", [gs, self.op("Transpose", [b.bt], perm=[0, 1, 3, 2])]), half])
        gb = self.op("Mul", [self.op("MatMul", [self.op("Transpose", [b.a], perm=[0, 1, 3, 2]), gs]), half])
        return [ga, gb, self.unbroadcast(gv, self.shape(b.pv.outputs[0])[:-2] + self.shape(b.v)[-2:], self.shape(b.v))]

    # -------------------------------------------------------------------------------- the whole pass
    def build(self) -> onnx.ModelProto:
        out = self.plan.output
        shape = self.shape(out)
        grads: dict[str, str] = {}
        first = self.plan.steps[0]
        node = self.by_name[first.name]
        if first.op_type == "MatMul" and len(shape) == 3:  # one-hot rows: only those rows of G go through W^T
            start = self.tmp()
            rows = self.const(np.arange(shape[0]) * shape[1] + self.position)
            gx_rows = self.op("FusedMatMul", [start, node.inputs[1]], transB=1, domain="com.microsoft")
            k = self.shape(node.inputs[0])
            zeros = self.op("ConstantOfShape", [self.const(np.array([shape[0] * shape[1], k[-1]], np.int64))],
                            value=numpy_helper.from_array(np.zeros(1, np.float32)))
            flat = self.op("ScatterND", [zeros, self.op("Unsqueeze", [rows, self.const(np.array([1], np.int64))]),
                                         gx_rows])
            grads[node.inputs[0]] = self.op("Reshape", [flat, self.const(np.array(k, np.int64))])
            steps = self.plan.steps[1:]
            start_shape = [shape[0], shape[2]]
        else:
            start = self.tmp()
            grads[out] = start
            steps = self.plan.steps
            start_shape = list(shape)
        for st in steps:
            gy = [grads.pop(o, None) for o in st.outputs]
            if all(x is None for x in gy):
                continue
            for name, gx in zip(st.inputs, self.step(st, gy)):
                if name is None or gx is None:
                    continue
                grads[name] = self.op("Add", [grads[name], gx]) if name in grads else gx
        outputs = []
        for src, inp in self.ex.analysis.sources.items():
            rel = self.op("ReduceSum", [self.op("Mul", [src, grads[src]]), self.const(np.array([-1], np.int64))],
                          keepdims=0)
            outputs.append((inp, rel))
        model = copy_without_initializers(self.g.model)
        weights = set(self.ex._capture.weight_names)
        model.graph.initializer.extend(t for t in self.g.model.graph.initializer if t.name not in weights)
        model.graph.initializer.extend(self.consts)
        for t in self.g.model.graph.initializer:
            if t.name in weights:
                model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        model.graph.input.append(helper.make_tensor_value_info(start, TensorProto.FLOAT, start_shape))
        model.graph.node.extend(self.nodes)
        for inp, rel in outputs:
            model.graph.output.append(helper.make_tensor_value_info(rel, TensorProto.FLOAT, None))
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        self.start, self.outputs = start, outputs
        return model


def prototype(ex: Explainer, feeds: dict, threads: int):
    """(run, relevance_of): ``run()`` runs forward and backward in one session."""
    import onnxruntime as ort

    B, T = feeds["input_ids"].shape
    position = np.full(B, T - 1) if ex.graph.output_names[0] == "logits" else np.zeros(B, np.int64)
    em = Emitter(ex, feeds, position)
    model = em.build()
    opts = default_session_options()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    logits = em.values[ex.default_output]
    if em.start.startswith("bwd") and len(sess.get_inputs()[-1].shape) == 2 and ex.default_output == "logits":
        tgt = logits[np.arange(B), position].argmax(-1)
        start = np.zeros((B, logits.shape[-1]), np.float32)
        start[np.arange(B), tgt] = 1
        explain_kw = dict(target=tgt, position=position)
    else:  # MiniLM: hidden unit 0 of the first token
        start = np.zeros(logits.shape, np.float32)
        start[:, 0, 0] = 1
        explain_kw = dict(target=np.zeros(B, np.int64), position=0)
    names = [r for _, r in em.outputs]
    inputs = {i.name for i in sess.get_inputs()}
    fixed = {k: v for k, v in feeds.items() if k in inputs}
    fixed.update((k, v) for k, v in ex._capture.weights.items() if k in inputs)
    fixed[em.start] = start
    return (lambda: sess.run(names, fixed)), explain_kw


def main() -> None:
    from bench_speed import make_ids, model_spec, onnx_feeds
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--seqs", default="32,128,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    for threads in [int(t) for t in args.threads.split(",")]:
        for name in args.models.split(","):
            spec = model_spec(name)
            ex = Explainer(spec["onnx"], threads=threads)
            o = ort.SessionOptions()
            o.intra_op_num_threads = threads
            plain = ort.InferenceSession(str(spec["onnx"]), o, providers=["CPUExecutionProvider"])
            seqs = [int(s) for s in args.seqs.split(",")] if spec["causal"] else [128]
            for seq in seqs:
                ids = make_ids(spec, 1, seq)
                feeds = ex.prepare_inputs(onnx_feeds(ex.input_names, ids))
                run, kw = prototype(ex, feeds, threads)
                ours = run()[0]
                ref = ex.explain(feeds, **kw).relevance["input_ids"]
                err = float(np.abs(ours - ref).max() / np.abs(ref).max())
                pf = {k: v for k, v in feeds.items() if k in {i.name for i in plain.get_inputs()}}
                times = {"a": [], "b": [], "p": []}
                fns = {"a": lambda: plain.run(None, pf), "b": lambda: ex.explain(feeds, **kw), "p": run}
                for f in fns.values():
                    f()
                for _ in range(args.repeats):
                    for k, f in fns.items():
                        t = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t)
                m = {k: statistics.median(v) for k, v in times.items()}
                rb = statistics.median(b / a for a, b in zip(times["a"], times["b"]))
                rp = statistics.median(p / a for a, p in zip(times["a"], times["p"]))
                print(f"{name} T={seq} threads={threads}: rel err {err:.1e} | a {m['a']:.3f} s, b {m['b']:.3f} s "
                      f"({rb:.2f}x a), prototype {m['p']:.3f} s ({rp:.2f}x a)", flush=True)


if __name__ == "__main__":
    main()

"""The same weights exported by other frameworks and exporters explain like the optimum export (issue 11).

For tiny random-weight transformers (tests/_support.py), the PyTorch weights are exported again by
- TensorFlow + tf2onnx (transformers' TF class, in the TF venv: tests/frameworks/export_tf.py),
- JAX/Flax + jax2onnx (transformers' Flax class, in the JAX venv: tests/frameworks/export_jax.py), norms written
  out as JAX computes them (variance as ``E[x^2] - E[x]^2``),
- ``torch.onnx.export`` without optimum: TorchScript (with and without constant folding), dynamo, and each with
  every node name set to "" (graphs without names must work).
Measured against the optimum export of the same weights (which matches LXT, tests/test_parity_lxt.py): logits
(non-padding positions), Gradient x Input, AttnLRP and CP-LRP token relevance, max |R - R_optimum| <= 1e-3
max |R_optimum|. Batch 2, the second row padded (right for BERT, left for decoders).

The TF/JAX venvs are built once from requirements-tf.txt / requirements-jax.txt (tests/frameworks/venvs.py,
``make venvs``); a venv that cannot be built fails the test with pip's message. Exports are cached next to the
tiny model in the test cache. Numbers: docs/frameworks.md (``python tests/frameworks/table.py``).
"""
from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest

from onnx_lrp import Explainer

from _support import FAMILIES, rel_err, tiny_model
from _variants import torch_export, variant
from frameworks import venvs
from test_coverage import _feeds

TOL = 1e-3
LOGIT_TOL = 1e-4
GXI_TOL = 1e-5
HERE = Path(__file__).parent / "frameworks"

# tf2onnx cannot convert TF's exact GELU (Erfc): the TF BERT uses the tanh GELU ("gelu_new")
BERT_TANH = (("hidden_act", "gelu_new"),)

# case id -> (exporter, family, config items)
CASES: dict[str, tuple[str, str, tuple]] = {
    "tf2onnx-bert": ("tf2onnx", "bert", BERT_TANH),
    "tf2onnx-gpt2": ("tf2onnx", "gpt2", ()),
    "tf2onnx-mistral": ("tf2onnx", "mistral", ()),
    "jax2onnx-bert": ("jax2onnx", "bert", ()),
    "jax2onnx-gpt2": ("jax2onnx", "gpt2", ()),
    "jax2onnx-llama": ("jax2onnx", "llama", ()),
    **{f"{exp}-{fam}": (exp, fam, ()) for exp in ("torchscript", "torchscript-nofold", "torchscript-noname",
                                                 "dynamo", "dynamo-noname") for fam in ("bert", "gpt2", "llama")},
}


def exported(exporter: str, family: str, config: tuple = ()) -> Path:
    """The ONNX file ``exporter`` makes of ``tiny_model(family, config)``'s weights (cached)."""
    pt_dir, base = tiny_model(family, config=dict(config) or None)
    if exporter == "dynamo" and not config and family in ("gpt2", "llama"):
        return variant(family, "dynamo")  # the same export, already made for tests/test_coverage.py
    path = base.parent.parent / "frameworks" / (exporter + _script_version(exporter)) / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    names = Explainer(base).input_names
    if exporter.endswith("-noname"):
        import onnx

        model = onnx.load(str(exported(exporter[: -len("-noname")], family, config)))
        for node in model.graph.node:
            node.name = ""
        onnx.save(model, str(path))
    elif exporter.startswith(("torchscript", "dynamo")):
        torch_export(family, pt_dir, path, names, dynamo=exporter == "dynamo",
                     constant_folding=not exporter.endswith("-nofold"))
    elif exporter in ("tf2onnx", "jax2onnx"):
        stack = exporter[:-len("2onnx")]
        cls = ("TF" if stack == "tf" else "Flax") + FAMILIES[family][1]
        args = [str(HERE / f"export_{stack}.py"), str(pt_dir), cls, str(path)]
        args += ["force_decomposed"] if stack == "jax" else []
        done = subprocess.run([str(venvs.ensure(stack)), *args, *names], capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"{exporter} export of {family} failed:\n{done.stderr[-4000:]}")
    else:
        raise ValueError(f"unknown exporter {exporter!r}")
    return path


def _script_version(exporter: str) -> str:
    """A TF/JAX export is cached under a hash of its export script and pins (editing either exports again)."""
    if exporter not in ("tf2onnx", "jax2onnx"):
        return ""
    stack = exporter[: -len("2onnx")]
    blob = (HERE / f"export_{stack}.py").read_bytes() + venvs.requirements(stack).read_bytes()
    return "-" + hashlib.sha1(blob).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def optimum(family: str, config: tuple, composite: str):
    """(feeds, explanation) of the optimum export of the same weights."""
    _, path = tiny_model(family, config=dict(config) or None)
    ex = Explainer(path, composite=composite)
    feeds = _feeds(family, ex.input_names)
    return feeds, ex.explain(feeds)


def compare(case: str, composite: str) -> dict:
    """Explain the case's export like the optimum one; the measured differences."""
    exporter, family, config = CASES[case]
    feeds, ref = optimum(family, config, composite)
    ex = Explainer(exported(exporter, family, config), composite=composite)
    res = ex.explain({k: v for k, v in feeds.items() if k in ex.input_names}, target=ref.target,
                     position=ref.position)
    out, ref_out = res.outputs[ex.default_output], ref.outputs["logits"]
    keep = feeds["attention_mask"] == 1 if out.ndim == 3 else slice(None)
    return {"logits": float(np.abs(out[keep] - ref_out[keep]).max() / np.abs(ref_out[keep]).max()),
            "relevance": rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]),
            "nodes": len(ex.graph.nodes), "ops": sorted({n.op_type for n in ex.graph.nodes})}


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_and_gradient_x_input(case):
    got = compare(case, "gradient-x-input")
    assert got["logits"] <= LOGIT_TOL and got["relevance"] <= GXI_TOL, got


@pytest.mark.parametrize("case", list(CASES))
def test_attnlrp_matches_optimum_export(case):
    got = compare(case, "attnlrp")
    assert got["relevance"] <= TOL, got


@pytest.mark.parametrize("case", list(CASES))
def test_cp_lrp_matches_optimum_export(case):
    got = compare(case, "cp-lrp")
    assert got["relevance"] <= TOL, got


def test_names_are_stripped():
    """The -noname graphs really have no node names (else those cases would test nothing new)."""
    import onnx

    for fam in ("bert", "gpt2", "llama"):
        named = onnx.load(str(exported("torchscript", fam))).graph.node
        stripped = onnx.load(str(exported("torchscript-noname", fam))).graph.node
        assert any(n.name for n in named) and not any(n.name for n in stripped)


# ------------------------------------------------------------------------------------------------------------------
# The norm spellings seen in those exports, each alone on a hand-built graph (x -> norm -> MatMul W), against the
# hand-computed AttnLRP relevance (Prop. 3.4: the statistic 1/sigma is a constant; LayerNorm keeps its mean):
#   LayerNorm  R_x = x * (w*g - mean(w*g)) / sigma,   RMSNorm  R_x = x * w*g / rms,   g = W[:, t]
# so a failure names the spelling, not a whole model.
N_HID, EPS = 8, 1e-5


def _norm_bias() -> np.ndarray:
    return 0.1 * np.random.RandomState(2).randn(N_HID)


def _norm_graph(spelling: str):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(0)
    w, b, W = 1 + 0.3 * rng.randn(N_HID), _norm_bias(), rng.randn(N_HID, 3)
    consts = {"w": w, "b": b, "W": W, "eps": np.array(EPS), "n_inv": np.array(1 / N_HID), "zero": np.array(0.0),
              "axes": np.array([-1], np.int64)}
    N = helper.make_node
    mean = lambda i, o: (N("GlobalAveragePool", [i], [o]) if "gap" in spelling  # noqa: E731
                         else N("ReduceMean", [i, "axes"], [o]))
    if spelling == "fused-layernorm":
        nodes = [N("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=EPS)]
    elif spelling == "tf2onnx-gap-layernorm":  # tf2onnx's "batchnorm" form: y = x*s + (b - mean*s), s = w/sigma
        nodes = [mean("x", "m"), N("Sub", ["x", "m"], ["d"]), N("Mul", ["d", "d"], ["d2"]), mean("d2", "var"),
                 N("Add", ["var", "eps"], ["ve"]), N("Sqrt", ["ve"], ["sd"]), N("Reciprocal", ["sd"], ["inv"]),
                 N("Mul", ["inv", "w"], ["s"]), N("Mul", ["m", "s"], ["ms"]), N("Sub", ["b", "ms"], ["sh"]),
                 N("Mul", ["x", "s"], ["xs"]), N("Add", ["xs", "sh"], ["y"])]
    elif spelling in ("jax-layernorm", "jax-sum-layernorm"):  # var = max(E[x^2] - E[x]^2, 0), sums / N for magika
        if spelling == "jax-sum-layernorm":
            mean = lambda i, o: [N("ReduceSum", [i, "axes"], [o + "_s"]), N("Mul", [o + "_s", "n_inv"], [o])]  # noqa
        else:
            mean = (lambda f: lambda i, o: [f(i, o)])(mean)
        nodes = [*mean("x", "m"), N("Mul", ["x", "x"], ["x2"]), *mean("x2", "m2"), N("Mul", ["m", "m"], ["mm"]),
                 N("Sub", ["m2", "mm"], ["v0"]), N("Max", ["v0", "zero"], ["var"]), N("Add", ["var", "eps"], ["ve"]),
                 N("Sqrt", ["ve"], ["sd"]), N("Sub", ["x", "m"], ["d"]), N("Div", ["d", "sd"], ["n"]),
                 N("Mul", ["n", "w"], ["nw"]), N("Add", ["nw", "b"], ["y"])]
    elif spelling == "tf2onnx-gap-rmsnorm":
        nodes = [N("Mul", ["x", "x"], ["x2"]), mean("x2", "ms"), N("Add", ["ms", "eps"], ["me"]),
                 N("Sqrt", ["me"], ["rms"]), N("Div", ["x", "rms"], ["n"]), N("Mul", ["n", "w"], ["y"])]
    else:
        raise ValueError(spelling)
    nodes.append(N("MatMul", ["y", "W"], ["out"]))
    graph = helper.make_graph(
        nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, N_HID])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 3])],
        [numpy_helper.from_array(np.asarray(v, np.int64 if k == "axes" else np.float32), k)
         for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w, W


@pytest.mark.parametrize("spelling", ["fused-layernorm", "tf2onnx-gap-layernorm", "jax-layernorm",
                                      "jax-sum-layernorm", "tf2onnx-gap-rmsnorm"])
def test_norm_spelling_holds_the_statistic_constant(spelling):
    model, w, W = _norm_graph(spelling)
    x = np.random.RandomState(1).randn(1, 4, N_HID).astype(np.float32) * 2 + 0.5
    res = Explainer(model).explain({"x": x}, target=1, position=3)
    v, g = x[0, 3].astype(np.float64), W[:, 1] * w
    if spelling.endswith("rmsnorm"):
        y = v / np.sqrt((v ** 2).mean() + EPS) * w
        expect = v * g / np.sqrt((v ** 2).mean() + EPS)
    else:
        y = (v - v.mean()) / np.sqrt(v.var() + EPS) * w + _norm_bias()
        expect = v * (g - g.mean()) / np.sqrt(v.var() + EPS)
    np.testing.assert_allclose(res.outputs["out"][0, 3], y @ W, rtol=1e-4, atol=1e-5)  # the spelling is that norm
    got = res.relevance["x"]
    assert np.all(got[0, :3] == 0)
    np.testing.assert_allclose(got[0, 3], expect, rtol=1e-4, atol=1e-6 * np.abs(expect).max())


# ------------------------------------------------------------------------------------------------------------------
# A hand-written torch transformer (no transformers): nn.TransformerEncoderLayer, post-norm then pre-norm, exact
# GELU, key padding mask, masked mean pooling, a linear head; exported by torch.onnx.export (TorchScript / dynamo).
# Reference: the same maths written functionally in torch with the AttnLRP rules in gradient form
# (onnx_lrp/reference/torch.py helpers: norm statistic detached, identity rule on GELU, both attention products halved),
# checked to reproduce the module's own logits.
def _encoder():
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.tok, self.pos = torch.nn.Embedding(128, 32), torch.nn.Embedding(64, 32)
            self.layers = torch.nn.ModuleList(
                torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                                 norm_first=pre) for pre in (False, True))
            self.head = torch.nn.Linear(32, 3)
            with torch.no_grad():  # non-trivial norms and biases (the defaults hide mistakes)
                for name, p in self.named_parameters():
                    if "norm" in name:
                        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape))
                    elif name.endswith("bias"):
                        p.copy_(0.1 * torch.randn(p.shape))

        def forward(self, input_ids, attention_mask):
            return self.from_embeddings(self.tok(input_ids), attention_mask)

        def from_embeddings(self, h, attention_mask):
            """From token embeddings (the relevance source: positions are a constant table read by arange)."""
            h = h + self.pos(torch.arange(h.shape[1]))[None]
            for layer in self.layers:
                h = layer(h, src_key_padding_mask=attention_mask == 0)
            m = attention_mask[..., None].to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    return Encoder().eval()


def _encoder_lrp(model, emb, attention_mask):
    """AttnLRP in gradient form on ``model``'s weights, written out (no module forward is used)."""
    import torch
    import torch.nn.functional as F
    from onnx_lrp.reference.torch import _layer_norm_detached, half, identity_rule

    def attention(layer, x):
        a = layer.self_attn
        B, S, D = x.shape
        q, k, v = F.linear(x, a.in_proj_weight, a.in_proj_bias).split(D, -1)
        q, k, v = (t.reshape(B, S, a.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = half(q @ k.transpose(-1, -2)) / (D // a.num_heads) ** 0.5
        scores = scores.masked_fill((attention_mask == 0)[:, None, None, :], float("-inf"))
        out = half(scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D)
        return a.out_proj(out)

    def norm(n, x):
        return _layer_norm_detached(x, n.normalized_shape, n.weight, n.bias, n.eps)

    def mlp(layer, x):
        return layer.linear2(identity_rule(F.gelu, layer.linear1(x)))

    h = emb + model.pos(torch.arange(emb.shape[1]))[None]
    for layer in model.layers:
        if layer.norm_first:
            h = h + attention(layer, norm(layer.norm1, h))
            h = h + mlp(layer, norm(layer.norm2, h))
        else:
            h = norm(layer.norm1, h + attention(layer, h))
            h = norm(layer.norm2, h + mlp(layer, h))
    m = attention_mask[..., None].to(h.dtype)
    return model.head((h * m).sum(1) / m.sum(1))


def _encoder_export(exporter: str) -> Path:
    import onnx
    import torch

    from _support import CACHE

    path = CACHE / "torch-encoder-v2" / exporter / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if exporter.endswith("-noname"):
        proto = onnx.load(str(_encoder_export(exporter[: -len("-noname")])))
        for node in proto.graph.node:
            node.name = ""
        onnx.save(proto, str(path))
        return path
    model, names = _encoder(), ["input_ids", "attention_mask"]
    ids = torch.randint(3, 100, (2, 9))
    args = (ids, torch.ones_like(ids))
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)}
        torch.onnx.export(model, args, str(path), dynamo=True, input_names=names, output_names=["logits"],
                          dynamic_shapes=(dims, dims), external_data=False)
    else:
        torch.onnx.export(model, args, str(path), dynamo=False, input_names=names, output_names=["logits"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names}, opset_version=17)
    return path


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo", "dynamo-noname"])
def test_torch_encoder_layer_matches_torch_reference(exporter):
    import torch

    model = _encoder()
    feeds = _feeds("encoder", ["input_ids", "attention_mask"])  # batch 2, row 2 left-padded by 3
    ids, mask = (torch.as_tensor(feeds[k]) for k in ("input_ids", "attention_mask"))
    emb = model.tok(ids).detach().requires_grad_()
    for p in model.parameters():
        p.requires_grad_(False)
    logits = _encoder_lrp(model, emb, mask)
    with torch.no_grad():
        torch.testing.assert_close(logits, model.from_embeddings(emb, mask), rtol=1e-5, atol=1e-6)
    target = logits.argmax(-1)
    logits[torch.arange(2), target].sum().backward()
    ref = (emb * emb.grad).sum(-1).detach().double().numpy()

    path = _encoder_export(exporter)
    res = Explainer(path).explain(feeds, target=target.numpy())
    np.testing.assert_allclose(res.outputs["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert rel_err(res.relevance["input_ids"], ref) <= TOL
    assert np.all(res.relevance["input_ids"][feeds["attention_mask"] == 0] == 0)
    gxi = Explainer(path, composite="gradient-x-input").explain(feeds, target=target.numpy())
    assert rel_err(gxi.relevance["input_ids"], ref) > 30 * TOL  # the rules matter on this model


# ------------------------------------------------------------------------------------------------------------------
# Plain Keras layers (no transformers): Embedding, MultiHeadAttention, LayerNormalization, Dense with tanh GELU,
# masked mean, exported by tf2onnx (tests/frameworks/export_tf.py: keras_block). Reference: the block's maths in
# torch from the exported weights (OUT.npz) with the AttnLRP rules, checked to reproduce onnxruntime's logits.
def _keras_block() -> tuple[Path, dict]:
    from _support import CACHE

    path = CACHE / ("keras-block" + _script_version("tf2onnx")) / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        args = [str(HERE / "export_tf.py"), "-", "keras-block", str(path), "input_ids", "attention_mask"]
        done = subprocess.run([str(venvs.ensure("tf")), *args], capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"tf2onnx export of the Keras block failed:\n{done.stderr[-4000:]}")
    return path, dict(np.load(path.with_suffix(".npz")))


def _keras_block_lrp(w: dict, emb, mask, rules: bool = True):
    """The block in torch; ``rules=False``: the plain function (its gradient is Gradient x Input's)."""
    import torch
    import torch.nn.functional as F
    from onnx_lrp.reference.torch import _layer_norm_detached, half, identity_rule

    if not rules:
        half, identity_rule = (lambda z: z), (lambda fn, z: fn(z))  # noqa: E731
        _layer_norm_detached = lambda x, shape, g, b, eps: F.layer_norm(x, shape, g, b, eps)  # noqa: E731
    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in w.items()}
    h = emb

    def proj(x, k):
        return torch.einsum("bsd,dhk->bshk", x, t[f"mha.{k}"]) + t[f"mha.{k + 1}"]

    q, k, v = proj(h, 0) / 8 ** 0.5, proj(h, 2), proj(h, 4)
    scores = half(torch.einsum("bthk,bshk->bhts", q, k)).masked_fill((mask == 0)[:, None, None, :], float("-inf"))
    out = half(torch.einsum("bhts,bshk->bthk", scores.softmax(-1), v))
    h = h + torch.einsum("bthk,hkd->btd", out, t["mha.6"]) + t["mha.7"]
    h = _layer_norm_detached(h, (32,), t["ln1.0"], t["ln1.1"], 1e-5)
    gelu = lambda z: F.gelu(z, approximate="tanh")  # noqa: E731
    f = identity_rule(gelu, h @ t["ff1.0"] + t["ff1.1"]) @ t["ff2.0"] + t["ff2.1"]
    h = _layer_norm_detached(h + f, (32,), t["ln2.0"], t["ln2.1"], 1e-5)
    m = mask[..., None].to(h.dtype)
    return ((h * m).sum(1) / m.sum(1)) @ t["head.0"] + t["head.1"]


@pytest.mark.parametrize("composite", ["attnlrp", "gradient-x-input"])
def test_keras_block_matches_torch_reference(composite):
    import torch

    path, w = _keras_block()
    feeds = _feeds("encoder", ["input_ids", "attention_mask"])
    ids, mask = (torch.as_tensor(feeds[k]) for k in ("input_ids", "attention_mask"))
    emb = torch.as_tensor(w["tok.0"], dtype=torch.float64)[ids].requires_grad_()
    logits = _keras_block_lrp(w, emb, mask, rules=composite == "attnlrp")
    res = Explainer(path, composite=composite).explain(feeds)
    np.testing.assert_allclose(res.outputs["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    logits[torch.arange(2), torch.as_tensor(res.target)].sum().backward()
    ref = (emb * emb.grad).sum(-1).detach().numpy()
    assert rel_err(res.relevance["input_ids"], ref) <= (TOL if composite == "attnlrp" else GXI_TOL)


# ------------------------------------------------------------------------------------------------------------------
# Recurrent layers exported from torch (ONNX LSTM / GRU ops, both directions, left padding through sequence_lens
# is not used: full-length rows). Reference: the cell unrolled in torch with the rule of issue 11 (Arras et al. 2017,
# signal takes all): the sigmoid gates are constants, tanh gets the identity rule, the cell sums are plain sums.
def _recurrent(kind: str):
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.tok = torch.nn.Embedding(128, 16)
            self.rnn = getattr(torch.nn, kind)(16, 12, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(24, 3)

        def forward(self, input_ids):
            return self.from_embeddings(self.tok(input_ids))

        def from_embeddings(self, e):
            return self.head(self.rnn(e)[0][:, -1])

    return Tagger().eval()


def _recurrent_lrp(model, e):
    """The bidirectional layer unrolled: gates detached, identity rule on tanh (gradient form)."""
    import torch
    from onnx_lrp.reference.torch import identity_rule

    rnn, H = model.rnn, model.rnn.hidden_size

    def run(x, sfx):
        W, R = getattr(rnn, "weight_ih_l0" + sfx), getattr(rnn, "weight_hh_l0" + sfx)
        b, bh = getattr(rnn, "bias_ih_l0" + sfx), getattr(rnn, "bias_hh_l0" + sfx)
        h = c = torch.zeros(x.shape[0], H, dtype=x.dtype)
        out = []
        for t in range(x.shape[1]):
            zi, zh = x[:, t] @ W.T + b, h @ R.T + bh
            if isinstance(rnn, torch.nn.LSTM):
                i, f, g, o = (zi + zh).split(H, -1)
                i, f, o = (torch.sigmoid(v).detach() for v in (i, f, o))
                c = f * c + i * identity_rule(torch.tanh, g)
                h = o * identity_rule(torch.tanh, c)
            else:  # GRU: r, z gates; n = tanh(W_n x + b_n + r * (R_n h + b_hn)); h = (1 - z) n + z h
                (ri, zi_, ni), (rh, zh_, nh) = zi.split(H, -1), zh.split(H, -1)
                r, z = torch.sigmoid(ri + rh).detach(), torch.sigmoid(zi_ + zh_).detach()
                h = (1 - z) * identity_rule(torch.tanh, ni + r * nh) + z * h
            out.append(h)
        return torch.stack(out, 1)

    fwd = run(e, "")
    bwd = run(e.flip(1), "_reverse").flip(1)
    return model.head(torch.cat([fwd, bwd], -1)[:, -1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_matches_torch_reference(kind):
    import onnx
    import torch

    from _support import CACHE

    model = _recurrent(kind)
    path = CACHE / f"torch-{kind.lower()}-v1" / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = torch.randint(3, 100, (2, 7))
        torch.onnx.export(model, (ids,), str(path), dynamo=False, input_names=["input_ids"],
                          output_names=["logits"], dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
                          opset_version=17)
    assert kind in {n.op_type for n in onnx.load(str(path)).graph.node}
    ids = np.random.RandomState(1).randint(3, 120, size=(2, 7)).astype(np.int64)
    emb = model.tok(torch.as_tensor(ids)).detach().requires_grad_()
    for p in model.parameters():
        p.requires_grad_(False)
    logits = _recurrent_lrp(model, emb)
    with torch.no_grad():
        torch.testing.assert_close(logits, model.from_embeddings(emb), rtol=1e-5, atol=1e-6)
    target = logits.argmax(-1)
    logits[torch.arange(2), target].sum().backward()
    ref = (emb * emb.grad).sum(-1).detach().double().numpy()
    plain = emb.detach().requires_grad_()
    model.from_embeddings(plain)[torch.arange(2), target].sum().backward()
    assert rel_err((plain * plain.grad).sum(-1).detach().numpy(), ref) > 30 * TOL  # the rule matters here
    res = Explainer(path).explain({"input_ids": ids}, target=target.numpy())
    np.testing.assert_allclose(res.outputs["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert rel_err(res.relevance["input_ids"], ref) <= TOL

"""Fuzzing the inputs (hypothesis): shapes, dtypes and values of every model input, targets and positions, on tiny
models. Whatever comes in, ``explain`` either returns finite relevance (when the inputs are finite) or raises an
onnx-lrp error (:class:`~onnx_lrp.errors.OnnxLrpError`): never numpy's, onnxruntime's or Python's own exception.

Each example is a valid set of inputs (random batch, length, values, inputs left out to be filled in) with one
mutation per test (none, another dtype, values out of range, another shape, an empty axis, a ragged list, an
all-zero mask row, NaN/inf, an unknown name) applied to a random input; targets and positions are drawn too. A
bounded number of examples per model and mutation, no deadline (the first example builds the plan).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_lrp import Explainer, OnnxLrpError

from _support import tiny_model

EXAMPLES = 20
DTYPES = (np.int64, np.int32, np.uint8, np.float32, np.float64, np.bool_)
MUTATIONS = (None, "dtype", "range", "shape", "empty", "ragged", "unknown", "mask-row", "nan")
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
targets = st.sampled_from([None] * 4 + [0, 5, 127, 128, -1, 2.0, True, [1, 2], [], [[1, 2]], [[1], [2]]])
positions = st.sampled_from([None] * 4 + [0, -1, 4, 5, -6, [0], [[0, 1]], 1.5])
_EXPLAINERS: dict[str, Explainer] = {}


def _explainer(family: str) -> Explainer:
    if family not in _EXPLAINERS:
        _EXPLAINERS[family] = Explainer(tiny_model(family)[1])
    return _EXPLAINERS[family]


def _valid(name: str, b: int, s: int, rng: np.random.RandomState) -> np.ndarray:
    if "mask" in name:
        m = rng.randint(0, 2, (b, s))
        m[:, -1] = 1  # at least one token per row
        return m
    if "type" in name:
        return rng.randint(0, 2, (b, s))
    if name == "position_ids":
        return np.broadcast_to(np.arange(s), (b, s)).copy()
    return rng.randint(0, 128, (b, s))


def _mutate(feeds: dict, name: str, how: str | None, rng: np.random.RandomState):
    a = feeds[name]
    if how == "dtype":
        feeds[name] = a.astype(DTYPES[rng.randint(len(DTYPES))])
    elif how == "range":
        a = a.astype(np.float32) if a.dtype.kind == "f" else a.copy()
        a.flat[rng.randint(a.size)] = rng.choice([-1, 128, 140, 2**40]) if a.dtype.kind != "f" else 1e30
        feeds[name] = a
    elif how == "shape":
        feeds[name] = [a[..., :-1], a[None], a.reshape(-1), a[..., None], a.swapaxes(0, -1)][rng.randint(5)]
    elif how == "empty":
        feeds[name] = a[:, :0] if rng.randint(2) else a[:0]
    elif how == "ragged":
        rows = a.tolist()
        feeds[name] = [rows[0], rows[0][:-1]] if len(rows[0]) > 1 else rows
    elif how == "unknown":
        feeds["not_an_input"] = a
    elif how == "mask-row" and "attention_mask" in feeds:
        feeds["attention_mask"] = feeds["attention_mask"].copy()
        feeds["attention_mask"][0] = 0
    elif how == "nan" and a.dtype.kind == "f":
        a = a.copy()
        a.flat[rng.randint(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        feeds[name] = a


def _check(ex: Explainer, feeds: dict, **kw) -> bool:
    """Explain; only onnx-lrp errors may come out, and finite inputs give finite relevance. True if explained."""
    try:
        res = ex.explain(feeds, **kw)
    except OnnxLrpError:
        return False
    floats = [np.asarray(v, dtype=np.float64) for v in feeds.values() if np.asarray(v).dtype.kind == "f"]
    if all(np.isfinite(f).all() for f in floats):
        for name, r in res.relevance.items():
            assert np.isfinite(r).all(), f"NaN/inf relevance for {name} from finite inputs"
    return True


@pytest.mark.parametrize("how", MUTATIONS)
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_text_inputs_never_raise_foreign_errors(family, how):
    ex = _explainer(family)
    per_token = len(ex.graph.model.graph.output[0].type.tensor_type.shape.dim) == 3  # (batch, seq, vocab)
    explained = []

    @SETTINGS
    @given(b=st.integers(1, 3), s=st.sampled_from([5, 1, 2, 8, 63, 70]), seed=st.integers(0, 2**16),
           keep=st.lists(st.booleans(), min_size=4, max_size=4), target=targets, position=positions)
    def run(b, s, seed, keep, target, position):
        rng = np.random.RandomState(seed)
        names = [n for k, n in enumerate(ex.input_names) if n == "input_ids" or keep[k % 4]]
        feeds = {n: _valid(n, b, s, rng) for n in names}
        _mutate(feeds, names[rng.randint(len(names))], how, rng)
        explained.append(_check(ex, feeds, target=target, **({"position": position} if per_token else {})))

    run()
    if how is None:
        assert sum(explained) >= len(explained) // 4  # the fuzz reaches explanations, not only errors


@pytest.mark.parametrize("how", MUTATIONS)
def test_image_inputs_never_raise_foreign_errors(how):
    ex = _explainer("vit")
    explained = []

    @SETTINGS
    @given(shape=st.sampled_from([(1, 3, 16, 16)] * 3 + [(2, 3, 16, 16), (1, 3, 20, 20), (1, 1, 16, 16),
                                                         (1, 3, 8, 32)]),
           scale=st.sampled_from([1.0, 0.01, 100.0]), seed=st.integers(0, 2**16), target=targets)
    def run(shape, scale, seed, target):
        rng = np.random.RandomState(seed)
        feeds = {"pixel_values": (rng.randn(*shape) * scale).astype(np.float32)}
        _mutate(feeds, "pixel_values", how, rng)
        explained.append(_check(ex, feeds, target=target))

    run()
    if how is None:
        assert sum(explained) >= len(explained) // 4

"""Long inputs: memory linear in the tokens, the same relevance, and a clear error when memory is short.

- the forward in chunks of query rows (long inputs) returns the same outputs and relevance as in one piece;
- the lean plan (cheap values recomputed instead of captured) gives the same relevance;
- 2,048 tokens on a tiny model: the peak resident memory an explanation adds (measured in a subprocess) stays far
  below what the probabilities of every layer alone take, which the capturing path exceeds;
- a memory need above ``memory_budget`` (or what is available) raises ResourceError before anything runs, naming
  the length, the estimate and the limit; so does an onnxruntime allocation failure.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_lrp import Explainer, InputError, ResourceError
from onnx_lrp._inputs import ort_failure
from onnx_lrp.errors import OnnxLrpError

from _support import rel_err, tiny_model
from _variants import variant

HERE = Path(__file__).parent


def _feeds(ex: Explainer, seq: int, batch: int = 2) -> dict:
    ids = np.random.RandomState(seq).randint(3, 120, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, : seq // 3] = 0
    return ex.prepare_inputs({"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("family,shape", [("llama", None), ("gemma3", None), ("gemma2", "eager"), ("gpt2", None)])
def test_chunked_forward_equals_one_piece(family, shape):
    path = variant(family, shape) if shape else tiny_model(family)[1]
    ex = Explainer(path)
    feeds = _feeds(ex, 23)
    plan = ex._plan(ex.default_output, ())
    names = list(dict.fromkeys(ex.graph.output_names + ex._captured(plan, feeds)))
    cap = ex._capture_long
    assert cap.chunkable(), "no attention block can be chunked"
    whole, _ = cap.run(feeds, names, [])
    parts, _ = cap.run(feeds, names, [], chunks=4)  # 6, 6, 6, 5 rows
    assert cap.chunked_session(4) is not cap.session
    for n in names:
        np.testing.assert_allclose(parts[n], whole[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_lean_plan_equals_default_plan(monkeypatch):
    """Region outputs (``x sigmoid(x)``) and GQA head expansions recomputed: the same relevance, less captured."""
    path = tiny_model("llama")[1]
    ex = Explainer(path)
    feeds = _feeds(ex, 16)
    ref = ex.explain(feeds)
    default, lean = ex._plan(ex.default_output, ()), ex._plan(ex.default_output, (), "lean")
    assert len(lean.recompute) > len(default.recompute)
    run = ex._capture_long.run
    captured = {v: run(feeds, ex._captured(p, feeds), [])[0] for v, p in (("d", default), ("l", lean))}
    assert sum(a.nbytes for a in captured["l"].values()) < 0.8 * sum(a.nbytes for a in captured["d"].values())
    plan = ex._plan
    monkeypatch.setattr(ex, "_fitting_plan", lambda o, c, f: (plan(o, c, "lean"), ex._capture_long, 1))
    res = ex.explain(feeds)
    assert rel_err(res.relevance["input_ids"], ref.relevance["input_ids"]) <= 1e-6


_PEAK = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from _support import tiny_model
from onnx_lrp import Explainer, _memory, explainer
from onnx_lrp.ops import attention_blocks
_memory.CHUNK_BYTES = 8 << 20              # small chunks and blocks for a tiny model
attention_blocks.BLOCK_BYTES = 4 << 20
if {capturing}:  # the plan of short inputs, whatever the length
    explainer.SHORT_INPUT = 1 << 40
ex = Explainer(tiny_model("llama", config={config!r})[1], memory_budget="1TB")
ids = np.random.RandomState(0).randint(3, 120, size=(1, {T})).astype(np.int64)
ex.explain({{"input_ids": ids[:, :64]}})  # warm-up: sessions built
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * 4096
res = ex.explain({{"input_ids": ids}})
with open("/proc/self/status") as f:  # the peak of this process's memory (ru_maxrss would include the parent's)
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
print(json.dumps({{"added": peak - before, "finite": bool(np.isfinite(res.relevance["input_ids"]).all())}}))
"""


DEEP = dict(num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=128)


def _peak(T: int, capturing: bool) -> dict:
    code = _PEAK.format(tests=str(HERE), T=T, capturing=capturing, config=DEEP)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_long_input_memory_is_linear():
    """1,024 tokens, a small Llama (6 layers, 8 heads): the probabilities of all layers take 6 x 8 x 1024^2 x 4 B =
    201 MB. The explanation adds less than 60% of that (measured 91 MB: masks, blocks, linear tensors); the capturing
    path adds more than all of it (measured 405 MB)."""
    T = 1024
    quadratic = DEEP["num_hidden_layers"] * DEEP["num_attention_heads"] * T * T * 4
    ours = _peak(T, capturing=False)
    assert ours["finite"]
    assert ours["added"] < 0.6 * quadratic, ours
    assert _peak(T, capturing=True)["added"] > quadratic, "the reference does not hold the probabilities"


def test_both_capture_sessions_bind_the_same_weight_arrays():
    """The short-input and the long-input capture read one copy of the weights (on a GPU: one upload)."""
    ex = Explainer(tiny_model("llama")[1])
    assert ex._capture.weights and ex._capture_long.weights is ex._capture.weights


def test_memory_budget_too_small_raises_before_running(monkeypatch):
    ex = Explainer(tiny_model("llama")[1], memory_budget="2MB")
    ran = []
    monkeypatch.setattr(ex._capture, "run", lambda *a, **k: ran.append(1))
    with pytest.raises(ResourceError, match=r"explaining 1500 tokens \(batch 2\) needs about .* MB .*"
                                            r"2 MB is the memory_budget; explain fewer tokens or a smaller batch, "
                                            r"or raise memory_budget"):
        ex.explain(_feeds(ex, 1500))
    assert not ran
    assert issubclass(ResourceError, OnnxLrpError) and issubclass(ResourceError, MemoryError)


def test_memory_budget_is_parsed():
    assert Explainer(tiny_model("llama")[1], memory_budget="1.5 GiB").memory_budget == 3 << 29
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(ValueError, match="memory_budget"):
            Explainer(tiny_model("llama")[1], memory_budget=bad)


def test_onnxruntime_allocation_failure_is_a_resource_error(monkeypatch):
    ex = Explainer(tiny_model("llama")[1])
    ex.explain(_feeds(ex, 12))
    session = ex._capture.session

    class Failing:
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, binding, options=None):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested "
                               "buffer of size 2916000000")

    monkeypatch.setattr(ex._capture, "session", Failing())
    with pytest.raises(ResourceError, match=r"ran out of memory on inputs of shapes .*input_ids.*\(2, 12\)"):
        ex.explain(_feeds(ex, 12))


def test_run_failures_are_resource_errors_only_when_an_allocation_failed():
    """``ort_failure`` (every onnxruntime run failure goes through it): an allocation that failed -> ResourceError;
    anything else -> InputError naming the node."""
    ex = Explainer(tiny_model("llama")[1])
    feeds = {"input_ids": np.zeros((2, 12), np.int64)}
    alloc = ort_failure(ex.graph, feeds, RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to "
                                                      "allocate memory for requested buffer of size 2916000000"))
    assert isinstance(alloc, ResourceError) and "'input_ids' (2, 12)" in str(alloc)
    assert isinstance(ort_failure(ex.graph, feeds, MemoryError()), ResourceError)
    other = ort_failure(ex.graph, feeds, RuntimeError("Non-zero status code returned while running Gather node. "
                                                      "Name:'nowhere' Status Message: indices out of range"))
    assert isinstance(other, InputError) and not isinstance(other, ResourceError)
    assert "'nowhere' (Gather)" in str(other)


def test_memory_failure_in_the_relevance_pass_is_a_resource_error(monkeypatch):
    """numpy's MemoryError (or CuPy's OutOfMemoryError) inside a rule: a ResourceError naming the step."""
    ex = Explainer(tiny_model("llama")[1])
    feeds = _feeds(ex, 12)
    ex.explain(feeds)
    step = next(iter(ex._plans.values())).steps[-1]

    def failing(env, grads):
        raise MemoryError("Unable to allocate 9.00 GiB for an array")

    monkeypatch.setattr(step, "backward", failing)
    with pytest.raises(ResourceError, match=rf"relevance pass ran out of memory at node '{step.name}'"):
        ex.explain(feeds)


def test_memory_estimate_of_a_graph_without_attention():
    """No attention block, no attention term in the estimate (it counted 192 MB of attention blocks for any graph);
    a refusal of a model without token ids names its inputs' shapes."""
    from _graphs import f32, model, node

    m = model([node("Relu", ["x"], ["r"]), node("Mul", ["r", "r"], ["y"])], {"x": (1, 4000)}, {"y": (1, 4000)})
    x = {"x": f32(1, 4000)}
    res = Explainer(m, memory_budget="1MB").explain(x, output_relevance=np.ones((1, 4000), np.float32))
    assert res.relevance["x"].shape == (1, 4000)
    with pytest.raises(ResourceError, match=r"explaining inputs of shapes 'x' \(1, 4000\) needs about"):
        Explainer(m, memory_budget="1KB").explain(x, output_relevance=np.ones((1, 4000), np.float32))

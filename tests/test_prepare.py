"""exporters.prepare: written-out RMSNorm / LayerNorm / GELU fused, attention kept explicit; the prepared graph
gives the same logits (<= 1e-5) and the same relevance (<= 1e-4 relative) as the unprepared one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_lrp import Explainer
from onnx_lrp.exporters import prepare
from onnx_lrp.exporters.prepare import op_counts

from _support import rel_err, tiny_model

# family, export opset, optimizer model type, op types that must appear, op types that must disappear
CASES = [
    ("llama", None, "bert", {"SimplifiedLayerNormalization"}, {"Pow", "ReduceMean", "Sqrt"}),
    ("bert", 14, "bert", {"LayerNormalization", "Gelu"}, {"Erf", "ReduceMean", "Pow"}),
    ("gpt2", None, "gpt2", {"FastGelu"}, {"Tanh", "Pow"}),
]


@pytest.mark.parametrize("family,opset,model_type,fused,gone", CASES, ids=[c[0] for c in CASES])
def test_prepare_fuses_and_keeps_relevance(family, opset, model_type, fused, gone):
    _, path = tiny_model(family, opset=opset)
    original = onnx.load(path)
    before = op_counts(original)
    prepared = prepare(original, model_type=model_type)
    after = op_counts(prepared)
    assert op_counts(original) == before, "prepare changed the caller's ModelProto"
    assert fused <= set(after), after
    assert not (gone & set(after)), {k: after[k] for k in gone & set(after)}
    assert after["Softmax"] == before["Softmax"] > 0  # attention explicit: one Softmax per layer
    ids = np.random.RandomState(0).randint(3, 120, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref, new = Explainer(original), Explainer(prepared)
    r0, r1 = ref.explain(feeds), new.explain(feeds)
    out = ref.default_output
    np.testing.assert_allclose(r1.outputs[out], r0.outputs[out], atol=1e-5, rtol=0)
    assert np.array_equal(r0.target, r1.target)
    assert rel_err(r1.relevance["input_ids"], r0.relevance["input_ids"]) <= 1e-4
    # the fused ops really carry relevance through the rules of their kind
    kinds = {n.op_type: new.analysis.kinds.get(n.name) for n in new.graph.nodes if n.op_type in fused}
    assert set(kinds.values()) <= {"norm", "unary"} and None not in kinds.values(), kinds


def test_prepare_takes_a_path():
    _, path = tiny_model("llama")
    prepared = prepare(path)
    assert not {"Attention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} & set(op_counts(prepared))

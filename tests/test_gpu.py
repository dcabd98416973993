"""GPU backend: device selection and its errors (run everywhere), GPU == CPU relevance (only with a GPU).

The selection tests replace onnxruntime's provider list and CuPy with stand-ins to reach each failure the
checks must name; the parity tests need onnxruntime-gpu, CuPy and a CUDA device and are skipped otherwise.
"""
from __future__ import annotations

import logging
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

from onnx_lrp import Explainer
from onnx_lrp import _device
from onnx_lrp._device import DeviceError, check_session, cuda_problem, resolve_device

from _support import tiny_model

CUDA_PROBLEM = cuda_problem()
needs_gpu = pytest.mark.skipif(CUDA_PROBLEM is not None, reason=f"no usable GPU: {CUDA_PROBLEM}")


# ------------------------------------------------------------------ selection logic (any machine)
def _fake_cupy(count=1, runtime=13000, error=None):
    cupy = types.ModuleType("cupy")

    def get_count():
        if error:
            raise RuntimeError(error)
        return count

    cupy.__version__ = "14.2.0"
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count,
                                                                    runtimeGetVersion=lambda: runtime))
    return cupy


@pytest.fixture
def cuda_ort(monkeypatch):
    """onnxruntime claims a CUDA provider (as onnxruntime-gpu 1.32 would: CUDA 13)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(_device, "_ort_cuda_major", lambda: 13)


def test_cpu_device_is_numpy():
    d = resolve_device("cpu")
    assert d.name == "cpu" and d.xp is np and d.providers == ["CPUExecutionProvider"]


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")


@pytest.mark.skipif(CUDA_PROBLEM is None, reason="a GPU is usable here")
def test_cuda_without_gpu_names_what_is_missing():
    with pytest.raises(DeviceError, match="device='cuda' cannot be used: ") as err:
        Explainer(tiny_model("llama")[1], device="cuda")
    assert CUDA_PROBLEM in str(err.value)


@pytest.mark.skipif(CUDA_PROBLEM is None, reason="a GPU is usable here")
def test_auto_falls_back_to_cpu_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="onnx_lrp"):
        ex = Explainer(tiny_model("llama")[1], device="auto")
    assert ex.device == "cpu" and ex.device_reason == CUDA_PROBLEM
    assert any("runs on the CPU" in r.getMessage() for r in caplog.records)
    ids = np.random.RandomState(0).randint(3, 120, size=(1, 7))
    ref = Explainer(tiny_model("llama")[1]).explain({"input_ids": ids}).relevance["input_ids"]
    np.testing.assert_array_equal(ex.explain({"input_ids": ids}).relevance["input_ids"], ref)


def test_cpu_onnxruntime_is_named(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    msg = cuda_problem()
    assert "no CUDAExecutionProvider" in msg and "onnxruntime-gpu" in msg


def test_missing_cupy_is_named(cuda_ort, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails
    msg = cuda_problem()
    assert msg.startswith("CuPy is not installed") and "cupy-cuda13x" in msg
    with pytest.raises(DeviceError, match="CuPy is not installed"):
        resolve_device("cuda")


def test_missing_driver_is_named(cuda_ort, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(error="cudaErrorInsufficientDriver"))
    assert "no usable CUDA device" in cuda_problem() and "cudaErrorInsufficientDriver" in cuda_problem()
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(count=0))
    assert "no CUDA device found" in cuda_problem()


def test_mismatched_cuda_builds_are_named(cuda_ort, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(runtime=12080))
    msg = cuda_problem()
    assert "mismatched CUDA builds" in msg and "CUDA 13" in msg and "CUDA 12" in msg and "cupy-cuda13x" in msg
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(runtime=13000))
    assert cuda_problem() is None


def test_ort_cuda_version_from_package_version(monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.26.0")
    import onnxruntime.capi.build_and_package_info as info

    monkeypatch.delattr(info, "cuda_version", raising=False)
    assert _device._ort_cuda_major() == 12
    monkeypatch.setattr(ort, "__version__", "1.30.1")
    assert _device._ort_cuda_major() == 13


def test_silent_cpu_fallback_is_reported():
    session = types.SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="fell back to"):
        check_session(session, "cuda", "model.onnx")
    check_session(types.SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                  "cuda", "model.onnx")
    check_session(session, "cpu", "model.onnx")


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers() or CUDA_PROBLEM is None,
                    reason="needs onnxruntime-gpu on a machine where CUDA cannot run")
def test_real_onnxruntime_gpu_fallback_is_refused():
    """onnxruntime-gpu without a usable GPU/CUDA libraries: the session silently runs on the CPU; caught."""
    session = ort.InferenceSession(str(tiny_model("llama")[1]),
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="fell back to"):
        check_session(session, "cuda", "model.onnx")


# ------------------------------------------------------------------ outputs handed over through DLPack
class _Exported:
    """An OrtValue stand-in that exports ``arr`` through DLPack and reports the onnxruntime type ``ort_type``."""

    def __init__(self, arr, ort_type):
        self.arr, self.ort_type = arr, ort_type

    def __dlpack__(self, **kw):
        return self.arr.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()

    def data_type(self):
        return self.ort_type


def test_outputs_are_views_of_onnxruntime_memory():
    from onnx_lrp._capture import array_view, host_view

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ov = ort.OrtValue.ortvalue_from_numpy(x)
    for view in (array_view(ov, np), host_view(ov)):  # DLPack, and the path for onnxruntime < 1.26
        assert view.ctypes.data == ov.data_ptr() and np.array_equal(view, x)
    # onnxruntime <= 1.31 exports bool tensors as uint8: viewed as bool again, so ~mask stays logical
    mask = array_view(_Exported(np.array([1, 0, 1], np.uint8), "tensor(bool)"), np)
    assert mask.dtype == np.bool_ and (~mask).tolist() == [False, True, False]


def test_capture_returns_views_not_copies():
    ex = Explainer(tiny_model("llama")[1])
    ex._capture.prepare({"logits"}, set())
    values, _ = ex._capture.run({"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64),
                                 "position_ids": np.arange(3)[None]}, ["logits"], [])
    assert values["logits"].base is not None and not values["logits"].flags.owndata


# ------------------------------------------------------------------ GPU == CPU (GPU machines only)
def _feeds(family: str, ex: Explainer):
    rng = np.random.RandomState(1)
    ids = rng.randint(3, 120, size=(2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in ex.input_names:
        feeds["position_ids"] = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return feeds


def _rel(a, ref):
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


@needs_gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_gpu_relevance_equals_cpu(family):
    import cupy

    _, path = tiny_model(family)
    cpu, gpu = Explainer(path), Explainer(path, device="cuda")
    assert gpu.device == "cuda" and gpu.providers[0] == "CUDAExecutionProvider"
    feeds = _feeds(family, cpu)
    ref = cpu.explain(feeds)
    res = gpu.explain(feeds)
    assert isinstance(res.relevance["input_ids"], np.ndarray)
    assert np.array_equal(res.target, ref.target)
    assert _rel(res.relevance["input_ids"], ref.relevance["input_ids"]) <= 1e-4
    kept = gpu.explain(feeds, as_numpy=False)
    assert isinstance(kept.relevance["input_ids"], cupy.ndarray)
    assert _rel(cupy.asnumpy(kept.relevance["input_ids"]), ref.relevance["input_ids"]) <= 1e-4


@needs_gpu
def test_gpu_smollm2_equals_cpu():
    from onnx_lrp.exporters import assets

    path = assets.smollm2()  # converted once into ~/.cache/onnx-lrp/models (needs the export extra)
    ids = np.random.RandomState(0).randint(3, 1000, size=(1, 64)).astype(np.int64)
    ref = Explainer(path).explain({"input_ids": ids})
    res = Explainer(path, device="cuda").explain({"input_ids": ids})
    assert _rel(res.relevance["input_ids"], ref.relevance["input_ids"]) <= 1e-4

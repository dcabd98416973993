"""Where the forward pass and the relevance pass run: ``"cpu"`` (numpy) or ``"cuda"`` (onnxruntime-gpu + CuPy).

``resolve_device("auto")`` picks CUDA when onnxruntime has the CUDA execution provider, CuPy is importable, a
CUDA device answers and the CUDA major versions of onnxruntime-gpu and CuPy agree; otherwise the CPU, with
the reason. ``resolve_device("cuda")`` raises :class:`DeviceError` naming what is missing instead.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import OnnxLrpError

log = logging.getLogger("onnx_lrp")

GPU_INSTALL = "pip install 'onnx-lrp[gpu]' (onnxruntime-gpu with cupy-cuda13x; see docs/gpu.md)"


class DeviceError(OnnxLrpError, RuntimeError):
    """The requested device cannot be used (missing package, driver or device, mismatched CUDA builds)."""


@dataclass
class Device:
    """The resolved device: ``name`` ``"cpu"`` or ``"cuda"``, the array module, onnxruntime providers,
    ``reason``: why this device was chosen (for ``"auto"``), and the CUDA device ``index``."""

    name: str
    xp: Any
    providers: list
    reason: str = ""
    index: int = 0

    def to_device(self, a: Any) -> Any:
        return self.xp.asarray(a)

    def synchronize(self) -> None:
        """Wait for the work queued on this device (CuPy's stream) to finish; nothing to wait for on the CPU."""
        if self.name == "cuda":
            self.xp.cuda.get_current_stream().synchronize()


CPU = Device("cpu", np, ["CPUExecutionProvider"], "default")


def _ort_cuda_major() -> int | None:
    """CUDA major version onnxruntime-gpu was built for: from its build info, else from its version
    (>= 1.27: CUDA 13; 1.19-1.26: CUDA 12)."""
    import onnxruntime as ort

    try:
        from onnxruntime.capi import build_and_package_info as info

        cuda = getattr(info, "cuda_version", "")
        if cuda:
            return int(str(cuda).split(".")[0])
    except (ImportError, ValueError):
        pass
    major, minor = (int(p) for p in ort.__version__.split(".")[:2])
    if major == 1 and minor >= 27:
        return 13
    if major == 1 and minor >= 19:
        return 12
    return None


def cuda_problem() -> str | None:
    """None when the CUDA backend can run here, else a sentence naming what is missing."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: {available}): "
                f"the CPU build is installed; {GPU_INSTALL}")
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); {GPU_INSTALL}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, no device
        return f"no usable CUDA device: CuPy cannot query the driver ({type(exc).__name__}: {exc})"
    if n == 0:
        return "no CUDA device found (CuPy sees 0 devices)"
    cupy_major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    ort_major = _ort_cuda_major()
    if ort_major is not None and ort_major != cupy_major:
        return (f"mismatched CUDA builds: onnxruntime-gpu {ort.__version__} is built for CUDA {ort_major}, "
                f"CuPy {cupy.__version__} for CUDA {cupy_major}; install cupy-cuda{ort_major}x "
                f"(onnxruntime-gpu >= 1.27 pairs with cupy-cuda13x, <= 1.26 with cupy-cuda12x)")
    return None


def resolve_device(device: str, providers: list | None = None) -> Device:
    """``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"`` -> :class:`Device`."""
    name = str(device).lower()
    if name not in ("cpu", "cuda", "auto") and not name.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    providers = usable_providers(providers) if providers else None
    if name == "cpu":
        return Device("cpu", np, list(providers or ["CPUExecutionProvider"]), "requested")
    problem = cuda_problem()
    if problem is not None:
        if name == "auto":
            log.warning("onnx-lrp: device='auto' runs on the CPU: %s", problem)
            return Device("cpu", np, list(providers or ["CPUExecutionProvider"]), problem)
        raise DeviceError(f"device={device!r} cannot be used: {problem}")
    import cupy

    index = int(name.split(":")[1]) if ":" in name else 0
    cupy.cuda.Device(index).use()
    provs = list(providers or [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"])
    reason = "requested" if name != "auto" else "onnxruntime-gpu, CuPy and a CUDA device are present"
    if name == "auto":
        log.info("onnx-lrp: device='auto' runs on CUDA device %d", index)
    return Device("cuda", cupy, provs, reason, index)


def usable_providers(providers: list) -> list:
    """The requested onnxruntime execution providers (names or ``(name, options)``) that this onnxruntime build
    has. A name onnxruntime does not know raises :class:`DeviceError`; known ones missing from this build are
    dropped with a warning (onnxruntime would print its own notice and fall back silently), and
    :class:`DeviceError` is raised when none is left."""
    import onnxruntime as ort

    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    if not all(isinstance(n, str) for n in names):
        raise DeviceError(f"providers must be names or (name, options) pairs, got {providers!r}")
    unknown = [n for n in names if n not in ort.get_all_providers()]
    if unknown:
        raise DeviceError(f"unknown onnxruntime execution provider(s) {unknown}; onnxruntime's providers are "
                          f"{ort.get_all_providers()}")
    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    kept = [p for p, n in zip(providers, names) if n in available]
    if missing and not kept:
        raise DeviceError(f"none of the requested providers {names} is available in this onnxruntime "
                          f"{ort.__version__} build (available: {available})")
    if missing:
        warnings.warn(f"onnx-lrp: execution provider(s) {missing} are not available in this onnxruntime "
                      f"{ort.__version__} build (available: {available}); using {[n for n in names if n in available]}",
                      stacklevel=4)
    return kept


def check_session(session: Any, device: str, source: str) -> None:
    """Raise when onnxruntime silently put the session on the CPU although CUDA was asked for."""
    if device != "cuda":
        return
    active = session.get_providers()
    if not active or active[0] != "CUDAExecutionProvider":
        raise DeviceError(
            f"{source}: onnxruntime fell back to {active} although CUDAExecutionProvider was requested: "
            "the CUDA/cuDNN libraries onnxruntime-gpu needs were not found or do not match the driver "
            "(install onnxruntime-gpu[cuda,cudnn], check `nvidia-smi`); onnxruntime's log names the missing library"
        )


_KERNELS: dict[str, Any] = {}


def softmax_vjp(S: Any, g: Any, axes: tuple[int, ...]) -> Any:
    """CuPy: ``S * (g - sum(S * g, axes))`` with the dot product as one reduction kernel and the rest as one
    element-wise kernel (no temporaries of the attention matrix's size besides the result)."""
    import cupy

    if "dot" not in _KERNELS:
        _KERNELS["dot"] = cupy.ReductionKernel("T s, T g", "T y", "s * g", "a + b", "y = a", "0", "onnx_lrp_dot")
        _KERNELS["vjp"] = cupy.ElementwiseKernel("T s, T g, T t", "T out", "out = s * (g - t)", "onnx_lrp_svjp")
    t = _KERNELS["dot"](S, g, axis=axes, keepdims=True)
    return _KERNELS["vjp"](S, g, t)

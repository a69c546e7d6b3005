"""The triton backend: its limits and its table of op implementations (the kernel modules).

The kernels' mode, compiled or interpreted (TRITON_INTERPRET=1, on the CPU), is fixed when
they are defined (common.INTERPRETED): changing TRITON_INTERPRET later has no effect, and
this backend's reasons say so.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..base import Backend, major_minor, tf32_convolutions

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
FP32_GPU_FLAG = "FUSED_PREACT_TRITON_FP32"


def fp32_gpu_reason(conv_dtype: torch.dtype | None, device_type: str) -> str | None:
    """Exact float32 convolutions compiled for a GPU are declined: they did not match PyTorch
    there (README, backends), while float32 as tf32 (base.tf32_convolutions, PyTorch's default
    for convolutions), bf16, fp16 and the interpreter did."""
    if conv_dtype != torch.float32 or device_type != "cuda":
        return None
    if tf32_convolutions() or os.environ.get(FP32_GPU_FLAG) == "1":
        return None
    return ("exact float32 convolutions (tf32 off: torch.backends.cudnn.conv.fp32_precision='ieee', or "
            "torch.backends.cudnn.allow_tf32=False) on the GPU are declined: "
            "they failed verification on an H100 (wrong weight gradients at some layer shapes); allow tf32, "
            f"use autocast to bf16/fp16 or the reference backend, or set {FP32_GPU_FLAG}=1 to run them anyway")


# The oldest Triton whose interpreter ran the kernels (the CPU tests): those of 3.1 and 3.3
# failed on them (benchmarks/results/2026-12-07-cpu-old-torch-*).
OLDEST_INTERPRETER = (3, 6)


@functools.cache
def interpreter_reason() -> str | None:
    """Why this Triton's interpreter cannot run the kernels: one older than OLDEST_INTERPRETER,
    or, found once by running a loop with a runtime bound in it (every conv kernel has one),
    the interpreter of triton 3.6 and older with numpy >= 2.4 (upstream triton-lang/triton#9171)."""
    if major_minor(triton_version()) < OLDEST_INTERPRETER:
        return (f"the Triton interpreter of triton {triton_version()} cannot run the kernels (those of triton 3.1 "
                f"and 3.3 failed on them; {'.'.join(map(str, OLDEST_INTERPRETER))} and later ran them): "
                "install a newer triton")
    from .common import loop_bound_probe
    out = torch.zeros(1, dtype=torch.int32)
    try:
        loop_bound_probe[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps what failed in its own error type
        return (f"the Triton interpreter of triton {triton_version()} fails on the kernels' loops here "
                f"({type(e).__name__}: {e}; numpy >= 2.4 with triton <= 3.6, upstream triton-lang/triton#9171): "
                "install a newer triton or numpy<2.4")
    return None if out.item() == 3 else f"the Triton interpreter counted a 3-step loop as {out.item()}"


def triton_version() -> str:
    import triton
    return triton.__version__


class TritonBackend(Backend):
    name = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    env_flags = (FP32_GPU_FLAG,)

    def __init__(self, impls, interpreted: bool, import_error: str | None):
        super().__init__(impls)
        self.interpreted = interpreted
        self.import_error = import_error

    def bind(self, impl, args):
        from .replay import bind
        return bind(impl, args)

    def availability_reason(self):
        if not TRITON_INSTALLED:
            return "triton is not installed (pip install triton)"
        if self.import_error is not None:
            return f"its kernels failed to import: {self.import_error}"
        return None

    def device_reason(self, device):
        if device.type == "cuda":
            return "cuda tensors need TRITON_INTERPRET unset when triton is first used" if self.interpreted else None
        if device.type == "cpu":
            return interpreter_reason() if self.interpreted else (
                "cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter), set before triton is first used")
        return f"tensors on {device.type} are not supported"

    def not_supported_reasons(self, op, tensors, conv_dtype=None):
        tensors = [t for t in tensors if t is not None]
        reasons = super().not_supported_reasons(op, tensors, conv_dtype)
        if reasons or conv_dtype is None:
            return reasons
        if self.interpreted and torch.bfloat16 in {conv_dtype, *(t.dtype for t in tensors)}:
            # Upstream: the interpreter's bf16 tl.dot is wrong (errors ~1e10 seen here).
            return ["triton: bfloat16 convolutions are computed wrongly by the Triton interpreter (CPU); "
                    "use the reference backend (auto does)"]
        why = fp32_gpu_reason(conv_dtype, tensors[0].device.type if tensors else "cpu")
        return [f"triton: {why}"] if why else []


def _load() -> TritonBackend:
    """The backend with its table, or with the reason the kernels did not import (numpy)."""
    if not TRITON_INSTALLED:
        return TritonBackend({}, False, None)
    try:
        from .bn_backward import bn_backward_apply
        from .common import INTERPRETED
        from .conv_dgrad import bn_relu_conv_dgrad
        from .conv_fwd import bn_relu_conv
        from .conv_wgrad import bn_relu_conv_wgrad
        from .stats import batch_stats, bn_finalize
    except ImportError as e:
        hint = " (the Triton interpreter needs numpy: pip install numpy)" if "numpy" in str(e) else ""
        return TritonBackend({}, False, f"{type(e).__name__}: {e}{hint}")
    return TritonBackend({
        "bn_relu_conv": bn_relu_conv,
        "batch_stats": batch_stats,
        "bn_finalize": bn_finalize,
        "bn_relu_conv_dgrad": bn_relu_conv_dgrad,
        "bn_relu_conv_wgrad": bn_relu_conv_wgrad,
        "bn_backward_apply": bn_backward_apply,
    }, INTERPRETED, None)


BACKEND = _load()

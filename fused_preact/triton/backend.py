"""The triton backend: limits and op registrations for the Triton kernels.

triton.jit decides at decoration time whether a kernel runs compiled or in the
interpreter (TRITON_INTERPRET=1, on the CPU). So the mode is read once, when this
module is imported, and the kernels are imported with it: changing TRITON_INTERPRET
later has no effect, and this backend's reasons say so.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..dispatch import CONV_DTYPE_ARG, Backend, conv_tensor, register_backend

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Mode of the kernels, fixed when they are defined (see the module docstring).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


FP32_GPU_FLAG = "FUSED_PREACT_TRITON_FP32"


def interpreter_on() -> bool:
    """Whether the kernels run in the Triton interpreter (on the CPU)."""
    return INTERPRETED


def fp32_gpu_reason(op: str, conv_dtype: torch.dtype | None, device_type: str) -> str | None:
    """Exact float32 convolutions compiled for a GPU are declined until they match PyTorch
    there: on an H100 (triton 3.6, 2026-11-22) the exact float32 weight gradient of a 1x1
    stride-2 unit with its BN prologue came out wrong (relative error 0.2). float32 as tf32
    (torch.backends.cudnn.allow_tf32, PyTorch's default for convolutions) passed the same
    tests within tf32's rounding, as did every bf16/fp16 case and the interpreter (tests/test_gpu.py)."""
    if op not in CONV_DTYPE_ARG or conv_dtype != torch.float32 or device_type != "cuda":
        return None
    if torch.backends.cudnn.allow_tf32 or os.environ.get(FP32_GPU_FLAG) == "1":
        return None
    return ("exact float32 convolutions (torch.backends.cudnn.allow_tf32=False) on the GPU are declined: "
            "they failed verification on an H100 (wrong weight gradient of a 1x1 stride-2 unit); allow tf32, "
            f"use autocast to bf16/fp16 or the reference backend, or set {FP32_GPU_FLAG}=1 to run them anyway")


class TritonBackend(Backend):
    name = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    env_flags = (FP32_GPU_FLAG,)

    def availability_reason(self):
        if not TRITON_INSTALLED:
            return "triton is not installed (pip install triton)"
        if KERNELS_IMPORT_ERROR is not None:
            return f"its kernels failed to import: {KERNELS_IMPORT_ERROR}"
        return None

    def device_reason(self, device):
        if device.type == "cuda":
            return "cuda tensors need TRITON_INTERPRET unset when triton is first used" if INTERPRETED else None
        if device.type == "cpu":
            return None if INTERPRETED else (
                "cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter), set before triton is first used")
        return f"tensors on {device.type} are not supported"

    def not_supported_reasons(self, op, tensors):
        tensors = list(tensors)
        reasons = super().not_supported_reasons(op, tensors)
        conv = conv_tensor(op, tensors)
        if reasons or conv is None:
            return reasons
        if INTERPRETED and any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
            # Upstream: the interpreter's bf16 tl.dot is wrong (errors ~1e10 seen here).
            return ["triton: bfloat16 convolutions are computed wrongly by the Triton interpreter (CPU); "
                    "use the reference backend (auto does)"]
        why = fp32_gpu_reason(op, conv.dtype, conv.device.type)
        return [f"triton: {why}"] if why else []

    def stats_tiles(self, rows: int, channels: int) -> int:
        """At least 2 (the extra ones empty): with a symbolic batch (torch.compile dynamic
        shapes) a count that may be 1 makes every contiguity check guard on it, so each
        batch size that crosses it recompiles."""
        from .common import cdiv, rows_per_tile  # common imports this module
        return torch.sym_max(cdiv(rows, rows_per_tile(rows)), 2)


triton_backend = register_backend(TritonBackend())

KERNELS_IMPORT_ERROR: str | None = None  # why the kernel modules did not import (e.g. no numpy)
if TRITON_INSTALLED:
    try:
        # Each kernel module registers its ops on `triton_backend`.
        from . import bn_backward, conv_dgrad, conv_fwd, conv_wgrad, stats  # noqa: E402,F401
    except ImportError as e:
        KERNELS_IMPORT_ERROR = f"{type(e).__name__}: {e}" + (
            " (the Triton interpreter needs numpy: pip install numpy)" if INTERPRETED and "numpy" in str(e) else "")

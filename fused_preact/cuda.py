"""The cuda backend: the Python side of the hand-written kernels in csrc/ (fused_preact._C).

The kernels are torch-free; this side validates tensors, passes data pointers and the
CURRENT stream on every call (a cached stream breaks CUDA graphs). Until the kernels
land (issue 5) the backend declines every op with a reason.
"""
from __future__ import annotations

import torch

from .dispatch import Backend, register_backend


def load_extension():
    """(module, None) if fused_preact._C imports, else (None, why)."""
    try:
        from . import _C
    except ImportError as e:
        return None, f"fused_preact._C was not built ({e}); reinstall with nvcc on PATH"
    return _C, None


class CudaBackend(Backend):
    name = "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def availability_reason(self):
        ext, why = load_extension()
        if ext is None:
            return why
        if ext.device_count() == 0:
            return f"no CUDA device ({ext.device_error()})"
        return None

    def device_reason(self, device):
        if device.type != "cuda":
            return f"tensors on {device.type} are not supported (CUDA tensors only)"
        return None


register_backend(CudaBackend())

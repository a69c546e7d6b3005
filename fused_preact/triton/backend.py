"""The triton backend: limits and op registrations for the Triton kernels."""
from __future__ import annotations

import importlib.util
import os

import torch

from ..dispatch import Backend, register_backend


def interpreter_on() -> bool:
    """TRITON_INTERPRET=1 runs kernels on the CPU (how this backend is tested without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(Backend):
    name = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def availability_reason(self):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        return None

    def device_reason(self, device):
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if interpreter_on() else "cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
        return f"tensors on {device.type} are not supported"


triton_backend = register_backend(TritonBackend())

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
        if not self.impls:
            load_kernels()
        return None

    def stats_tiles(self, rows: int, channels: int) -> int:
        from .common import rows_per_tile
        return -(-rows // rows_per_tile(rows))

    def device_reason(self, device):
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if interpreter_on() else "cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
        return f"tensors on {device.type} are not supported"


triton_backend = register_backend(TritonBackend())


def load_kernels() -> None:
    """Import the kernel modules; each registers its ops on `triton_backend`."""
    from . import bn_backward, conv_dgrad, conv_fwd, conv_wgrad, stats  # noqa: F401

"""What every backend is and shares; imports nothing of fused_preact (a leaf).

A backend is a table of op implementations (op name -> function, written out in the
backend's module) plus the limits under which they are valid, answered as sentences by
`not_supported_reasons` ("triton: dtype torch.float64 not supported ...").
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch


class BackendNotSupported(RuntimeError):
    """No backend (or not the forced one) can run an op on the given inputs."""


class Backend:
    """Op implementations (`impls`: op name -> function) and the limits under which they run."""

    name: str = ""
    dtypes: tuple[torch.dtype, ...] = ()
    env_flags: tuple[str, ...] = ()  # environment variables the reasons read
    opt_in: tuple[str, str] | None = None  # (variable, value) that enables an opt-in backend

    def __init__(self, impls: dict[str, Callable]):
        self.impls = impls

    def bind(self, impl: Callable, args: dict) -> tuple[object, Callable]:
        """(impl(**args), a callable that does what impl does for the calls of a block's plan
        that replays this one: block_autograd). Here impl itself; a backend may return one
        that skips work whose outcome these arguments fix (the triton backend's replay.py),
        and which may take its arguments from the plan's list of values: then it has a
        method on_slots((name, index or None, constant) per argument) that returns one with
        a method run(values)."""
        return impl(**args), impl

    def availability_reason(self) -> str | None:
        """Why this backend cannot run at all here (not built, not installed), else None."""
        return None

    def device_reason(self, device: torch.device) -> str | None:
        """Why tensors on `device` are not accepted, else None."""
        return None

    def not_supported_reasons(self, op: str, tensors: Iterable[torch.Tensor | None],
                              conv_dtype: torch.dtype | None = None) -> list[str]:
        """Why this backend cannot run `op` on `tensors` (empty: it can). conv_dtype: the
        dtype the op's convolution computes in (None for ops without one)."""
        reasons: list[str] = []
        unavailable = self.availability_reason()
        if unavailable:
            return [f"{self.name}: {unavailable}"]
        if op not in self.impls:
            reasons.append(f"{self.name}: op '{op}' is not implemented")
        present = [t for t in tensors if t is not None]
        for device in sorted({t.device for t in present}, key=str):
            why = self.device_reason(device)
            if why:
                reasons.append(f"{self.name}: {why}")
        for dtype in sorted({t.dtype for t in present if t.is_floating_point()}, key=str):
            if dtype not in self.dtypes:
                supported = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                hint = "; float64 runs on backend='reference'" if dtype == torch.float64 else ""
                reasons.append(f"{self.name}: dtype {dtype} not supported (supported: {supported}){hint}")
        return reasons


# ------------------------------------------------------------------ host helpers, plain Python
# torch >= 2.9: the float32 precision per backend and op, behind torch.backends.*.fp32_precision.
_fp32_precision = getattr(torch._C, "_get_fp32_precision_getter", None)


def tf32_convolutions() -> bool:
    """Whether float32 convolutions may run as tf32, as PyTorch decides for nn.Conv2d on a GPU.

    From torch 2.9 that is torch.backends.cudnn.conv.fp32_precision ("tf32" or "ieee"), where
    "none" inherits torch.backends.cudnn.fp32_precision, then torch.backends.fp32_precision;
    the legacy torch.backends.cudnn.allow_tf32 sets it too. Reading allow_tf32 there raises
    once the settings disagree (after torch.backends.fp32_precision = "ieee", say), so it is
    read only where the per-op setting does not exist. (The private getter is the one the
    public properties forward to, at a tenth of their cost: this runs on every op call.)"""
    if _fp32_precision is None:
        return torch.backends.cudnn.allow_tf32
    for backend, op in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):
        precision = _fp32_precision(backend, op)
        if precision != "none":
            return precision == "tf32"
    return False


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as torch's "2.7.1+cu126" or triton's "3.6.0"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b (plain Python: triton.cdiv is a constexpr function, slow
    from host code)."""
    return -(-a // b)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format a weight gradient is written in: the parameter's (ops.weight_is_channels_last)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def conv_output_hw(in_hw: Sequence[int], kernel_hw: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int]) -> tuple[int, int]:
    """(P, Q) of a convolution, as nn.Conv2d computes it (dilation 1)."""
    return tuple((i + 2 * p - k) // s + 1 for i, k, s, p in zip(in_hw, kernel_hw, stride, padding))


def wgrad_splits(rows: int, output_tiles: int) -> int:
    """Splits of a weight gradient's pixel reduction: enough to give a GPU ~1000 programs,
    each over >= 1024 rows, at most 64 (the split-K partials are reduced in a fixed order)."""
    return max(1, min(max(1, 1024 // max(output_tiles, 1)), rows // 1024, 64))

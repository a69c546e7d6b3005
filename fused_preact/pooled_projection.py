"""timm's avg_down projection (the "d" / "t" resnetv2 models' DownsampleAvg at a stride):
a 2x2 average pool of stride 2, then a 1x1 conv, computed as the one conv it equals.

avg_pool2d(2, 2) then a 1x1 conv with weight W is the 2x2 stride-2 conv whose four taps are
each W / 4, wherever every pooling window is whole: always without ceil_mode, and at even
sizes with it. With ceil_mode at an odd size the last window averages fewer values, which no
zero-padded conv computes; the block then calls its submodules (TimmPreActBasic).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import functional as Fp


def downsample_reason(pool: nn.Module, conv: nn.Conv2d) -> Optional[str]:
    """Why a fused block cannot compute a DownsampleAvg's `pool` then `conv` (None where it can:
    an Identity pool, or an nn.AvgPool2d(2, 2) before a 1x1 conv of stride 1: a PooledConv)."""
    if isinstance(pool, nn.Identity):
        return None
    # Exactly nn.AvgPool2d: timm's AvgPool2dSame (a dilated stage's, stride 1) subclasses it and pads unevenly.
    if type(pool) is not nn.AvgPool2d or _pair(pool.kernel_size) != (2, 2) or _pair(pool.stride) != (2, 2) \
            or _pair(pool.padding) != (0, 0) or pool.divisor_override is not None:
        return (f"downsample pools with {pool!r}; a fused block computes an nn.AvgPool2d(2, 2) without padding or "
                f"divisor_override (timm's avg_down at stride 2)")
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or Fp.zero_padding(conv) != (0, 0):
        return (f"downsample pools before a conv of kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, "
                f"padding {conv.padding!r}; a fused block computes a pool then a 1x1 conv of stride 1 without padding")
    return None


def _pair(value) -> tuple:
    """nn.AvgPool2d keeps its sizes as given: an int, or a pair."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class PooledConv:
    """A DownsampleAvg's pool (an nn.AvgPool2d(2, 2)) and 1x1 conv as the conv the kernels
    compute, read like an nn.Conv2d: 2x2, stride 2, no padding, each tap W / 4. Its weight is
    derived from the 1x1 conv's on its first read (one per block forward, before the block's
    autograd node: nn.block_tensors), so autograd takes its gradient back to W."""

    kernel_size = (2, 2)
    stride = (2, 2)
    padding = (0, 0)

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.derived: Optional[Tensor] = None

    @property
    def weight(self) -> Tensor:
        # Not functools.cached_property: its lock (Python < 3.12) stops torch.compile's tracing.
        if self.derived is None:
            # Made [K, 2, 2, C] and viewed as [K, C, 2, 2]: input channels adjacent, as the kernels
            # read weights (a default-layout one they copy first, one more kernel per launch).
            taps = self.conv.weight.permute(0, 2, 3, 1).expand(-1, 2, 2, -1)
            self.derived = (taps * 0.25).permute(0, 3, 1, 2)  # a power of two: W / 4 exactly
        return self.derived


def pools_partial_windows(pool: nn.Module, x: Tensor) -> bool:
    """Whether `pool` (see downsample_reason) averages a partial window at x's size: with ceil_mode
    at an odd height or width."""
    return isinstance(pool, nn.AvgPool2d) and pool.ceil_mode and isinstance(x, Tensor) and x.dim() == 4 and \
        (x.shape[2] % 2 == 1 or x.shape[3] % 2 == 1)

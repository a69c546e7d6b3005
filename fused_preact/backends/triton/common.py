"""Pieces shared by the Triton kernels: the BN->ReLU prologue, tile statistics, configs.

Conventions: activations are addressed through (n, h, w, c) strides, so any layout works
and channels_last is the coalesced one; element offsets are int32 where every tensor of a
launch is small enough, else int64 (`needs_int64`: tensors may pass 2^31 elements);
arithmetic is float32 whatever the storage dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..base import cdiv, tf32_convolutions

# triton.jit decides at decoration time whether a kernel runs compiled or in the interpreter
# (TRITON_INTERPRET=1, on the CPU), so the mode is read once, with the kernels.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def loop_bound_probe(out_ptr, steps):
    """Counts `steps` iterations of a loop with a runtime bound (backend.interpreter_reason)."""
    count = 0
    for _ in range(0, steps):
        count += 1
    tl.store(out_ptr, count)


def interpreter_on() -> bool:
    """Whether the kernels run in the Triton interpreter (on the CPU)."""
    return INTERPRETED


def rows_per_tile(rows: int) -> int:
    """Rows (output pixels) per program: 128 where there are enough rows to fill the GPU."""
    return 64 if interpreter_on() or rows < 32768 else 128


def stats_tiles(rows: int) -> int:
    """Row tiles (programs along the rows), each writing one tile of partial statistics."""
    return cdiv(rows, rows_per_tile(rows))


def kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The conv weight with its input channels adjacent in memory (channel stride 1, what
    model.to(memory_format=torch.channels_last) gives), as the forward and dgrad kernels read
    it fast: their weight tiles then load as 16-byte vectors. PyTorch's default [K, C, R, S]
    layout puts R*S elements between channels (scattered 2-byte loads; on an H100 at the
    headline 3x3 conv our forward took 0.370 ms and dgrad 0.841 ms per call with it, against
    0.233 and 0.230 ms in channels_last blocks): that is copied first, one small kernel.
    A 1x1 weight has channel stride 1 in either layout."""
    return weight if weight.stride(1) == 1 else weight.contiguous(memory_format=torch.channels_last)


# Offsets into a tensor whose farthest element lies closer than this to its start are formed
# in int32: exact for every pixel a kernel loads, with room to spare for the out-of-range
# ones a conv's padding computes and masks. 64-bit offsets cost about 3 instructions per
# address instead of 1: at the headline, 88 of the forward's 776 main-loop instructions, 96 of
# dgrad's 390, 153 of wgrad's 712 (triton 3.6, sm_90: benchmarks/results/2026-11-25-cpu-sass-75ede46).
INT32_SPAN = 2 ** 30


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a launch reading or writing these tensors must form their offsets in int64
    (its INT64 constexpr)."""
    for t in tensors:
        if t.numel() <= INT32_SPAN and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            continue  # dense: its farthest element is numel - 1 away (the usual case, quick to tell)
        if sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size) >= INT32_SPAN:
            return True
    return False


@triton.jit
def pixel_coords(rows, area, width):
    """(image, row, column) of flat pixel indices rows = image * area + row * width + column
    (rows >= 0), as int32. Divided as unsigned integers: signed division's sign fix-ups cost
    the weight-gradient kernel, which divides in every main-loop iteration, 107 of its 559
    instructions there and 48 registers (triton 3.6, sm_90)."""
    flat = rows.to(tl.uint32)
    area = tl.cast(area, tl.uint32)
    width = tl.cast(width, tl.uint32)
    image = flat // area
    rest = flat - image * area
    row = rest // width
    return image.to(tl.int32), row.to(tl.int32), (rest - row * width).to(tl.int32)


@triton.jit
def within(v, n):
    """0 <= v < n for int32 v in one unsigned compare (a negative v wraps above any n): the
    conv kernels test each pixel of a tap this way, 8-24 instructions fewer per main-loop
    iteration (triton 3.6, sm_90)."""
    return v.to(tl.uint32) < tl.cast(n, tl.uint32)


@triton.jit
def as_offset(v, INT64: tl.constexpr):
    """An integer index tensor as a factor of element offsets: int64 where INT64, else as it
    is (int32)."""
    if INT64:
        v = v.to(tl.int64)
    return v


@triton.jit
def lanes_below(lanes, n, EVEN: tl.constexpr):
    """lanes < n for a tile's channel indices. EVEN (the launcher knows n is a multiple of the
    tile width): a constant true mask, which the compiler folds away with the selects and
    predicates it guarded. With a constant channel-block count beside it, main-loop
    instructions at the headline went 612 -> 550 (forward), 270 -> 195 (dgrad), 411 -> 396
    (wgrad), triton 3.6, sm_90 (results/2026-12-07-cpu-sass-cb6127b)."""
    if EVEN:
        ok = tl.full(lanes.shape, 1, tl.int1)
    else:
        ok = lanes < n
    return ok


# Host-side grid arithmetic in plain Python: triton.next_power_of_2 is a constexpr function
# in recent triton, whose calls from host code cost microseconds each.
def next_pow2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()


def pow2_block(n: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two tile width in [lo, hi] covering n if possible (tl.dot needs >= 16)."""
    return max(lo, min(hi, next_pow2(n)))


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype):
    """The Triton dtype a conv's tiles are cast to before tl.dot (a constexpr argument): the
    conv dtype, which under autocast differs from the float32 weight, input or gradient."""
    return TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 where torch allows it for convolutions (as nn.Conv2d), else exact."""
    if dtype == torch.float32 and tf32_convolutions() and not interpreter_on():
        return "tf32"
    return "ieee"


def nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Element strides of an NCHW-shaped tensor in (n, h, w, c) order."""
    sn, sc, sh, sw = t.stride()
    return sn, sh, sw, sc


@triton.jit
def relu(v):
    """max(v, 0) keeping NaN as F.relu does (tl.maximum returns 0 for a NaN)."""
    return tl.where(v <= 0.0, 0.0, v)


@triton.jit
def relu_passes(v):
    """Where ReLU's gradient passes: v > 0, and NaN (eager's threshold_backward tests v <= 0)."""
    return ~(v <= 0.0)


@triton.jit
def bn_relu_padded(a, mean, scale, beta, ok, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """relu(bn(a)) of a [pixels, channels] tile, 0 where `ok` is false (the conv's zero
    padding, applied after the activation: relu(bn(0)) is not 0). The select comes before
    the ReLU: after it, the compiler moves a select of 0 past the rounding to 16 bits and
    then selects each 16-bit half on its own (unpack, select, repack: 2.5 instructions per
    element where this is 1; 80 of the forward's 856 per main-loop iteration at the headline,
    triton 3.6, sm_90).

    For a dot in 16 bits or tf32, bn(a) is a * scale + (beta - mean * scale): one FMA per
    element where (a - mean) * scale + beta is two (64 of the forward's 676 main-loop
    instructions at the headline, triton 3.6, sm_90). Its error, about |mean * scale| * 2^-24
    from the folded shift, stays far below the rounding of the activation to the dot's input
    (2^-8 relative in bfloat16, 2^-11 in float16 and tf32) unless |mean| is thousands of times the
    standard deviation. An exact float32 dot keeps (a - mean) first, exact when |mean| >> std."""
    if DOT == tl.float32 and PRECISION == "ieee":
        v = (a - mean[None, :]) * scale[None, :] + beta[None, :]
    else:
        v = a * scale[None, :] + (beta - mean * scale)[None, :]
    return relu(tl.where(ok, v, 0.0))


@triton.jit
def inv_std(var, eps):
    """1 / sqrt(var + eps) in one approximate reciprocal square root (about 2 ulp: far below
    any storage rounding here) where 1.0 / tl.sqrt is two correctly rounded operations of
    several instructions each. A forward with more input channels than one block recomputes
    it per channel block in its main loop: 17 MUFU per iteration there (benchmarks.sass)."""
    return tl.math.rsqrt(var + eps)


@triton.jit
def bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, rc, cmask, eps,
                   HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """Per-channel (mean, scale, beta) so that bn(x) = (x - mean) * scale + beta; (x - mean)
    first keeps it exact when |mean| >> std."""
    mean = tl.load(mean_ptr + rc, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + rc, mask=cmask, other=1.0).to(tl.float32)
    scale = inv_std(var, eps)
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + rc, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.zeros_like(scale)
    if HAS_BETA:
        beta = tl.load(beta_ptr + rc, mask=cmask, other=0.0).to(tl.float32)
    return mean, scale, beta


@triton.jit
def write_tile_stats(part_ptr, tile, values, rowmask, rc, cmask, C):
    """Per-channel (count, mean, M2) of the valid rows of a [rows, channels] fp32 tile, into
    partials[tile, 0:3, rc]. Centred on the tile mean: no E[x^2] - E[x]^2 cancellation."""
    count = tl.sum(rowmask.to(tl.float32), axis=0)
    rows = rowmask[:, None]
    mean = tl.sum(tl.where(rows, values, 0.0), axis=0) / tl.maximum(count, 1.0)  # a tile past the rows: 0
    centred = tl.where(rows, values - mean[None, :], 0.0)
    m2 = tl.sum(centred * centred, axis=0)
    store_stats(part_ptr, tile, tl.zeros_like(mean) + count, mean, m2, rc, cmask, C)


@triton.jit
def store_stats(part_ptr, slot, count, mean, m2, rc, cmask, C):
    """(count, mean, M2) per channel rc into partials[slot, 0:3, rc]."""
    base = part_ptr + slot.to(tl.int64) * 3 * C + rc
    tl.store(base, count, mask=cmask)
    tl.store(base + C, mean, mask=cmask)
    tl.store(base + 2 * C, m2, mask=cmask)

"""Weight gradient with the activation recomputed: dW = wgrad(relu(bn(x)), dy).

GEMM per filter tap (r, s): [K out channels] x [C in channels], reduced over the N*P*Q
output pixels. The prologue rebuilds relu(bn(x)) from the saved pre-BN x (zero at
padding, after the activation), so no activation is stored. With stride 1 (and 16-bit
tiles) a program owns the 2 or 3 taps of a filter row and reduces over the input pixels
instead: each pixel's relu(bn(x)) is rebuilt once for the row, and the taps read dy at
shifted columns. The reduction is split over SPLIT programs so layers with few pixels per
channel still fill the GPU; the last of them to finish a weight tile sums the fp32
partials in split order and writes the gradient in its dtype (merge.py: deterministic, no
second launch, no atomics on floats).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..base import cdiv, weight_memory_format, wgrad_splits
from .common import (as_offset, bn_relu_padded, bn_scale_shift, dot_dtype, dot_precision, interpreter_on, lanes_below,
                     needs_int64, nhwc_strides, pixel_coords, pow2_block, within)
from .launch import autotune_warps
from .merge import block_counters, group_ticket, last_ticket, merge_buffers, merge_group, reset_ticket


@autotune_warps(key=["L", "K", "C", "R", "S", "SPLIT", "TAPS"])
@triton.jit
def bn_relu_conv_wgrad_kernel(
    dy_ptr, sdn, sdh, sdw, sdc,                # output gradient [N, P, Q, K] by strides
    x_ptr, sxn, sxh, sxw, sxc,                 # saved pre-BN input [N, H, W, C]
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
    part_ptr, counter_ptr,                     # fp32 [SPLIT + groups, R * S, K, C] (SPLIT > 1), tickets
    dw_ptr, swk, swc, swr, sws,                # the gradient [K, C, R, S] by strides (the parameter's layout)
    L, H, W, C, P, Q, K, rows_per_split,       # L: the pixels reduced over (output ones; input ones if TAPS > 1)
    stride_h, stride_w, pad_h, pad_w,
    R: tl.constexpr, S: tl.constexpr, SPLIT: tl.constexpr, G: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, INT64: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_C: tl.constexpr,  # K, C multiples of BM, BN: no channel masks
    TAPS: tl.constexpr,                        # filter taps per program: 1, or (stride 1) the S <= 3 of a row
):
    rk = tl.program_id(0) * BM + tl.arange(0, BM)
    rc = tl.program_id(1) * BN + tl.arange(0, BN)
    tap_groups = R * S if TAPS == 1 else R  # one tap per program, or a filter row's
    group = tl.program_id(2) % tap_groups
    split = tl.program_id(2) // tap_groups
    k_ok = lanes_below(rk, K, EVEN_K)
    c_ok = lanes_below(rc, C, EVEN_C)
    if HAS_PROLOGUE:
        mean, scale, beta = bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, rc, c_ok, eps,
                                           HAS_GAMMA, HAS_BETA)
    acc0 = tl.zeros((BM, BN), dtype=tl.float32)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)  # taps 1 and 2 of a row (TAPS > 1, > 2)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    l_start = split * rows_per_split
    for l0 in range(l_start, l_start + rows_per_split, BL):
        rl = l0 + tl.arange(0, BL)
        l_ok = (rl < L) & (rl < l_start + rows_per_split)
        if TAPS == 1:
            # Over the output pixels (n, p, q): the input pixel of tap (r, s), zero outside.
            n, p, q = pixel_coords(rl, P * Q, Q)
            h = p * stride_h - pad_h + group // S
            w = q * stride_w - pad_w + group % S
            pix_ok = l_ok & within(h, H) & within(w, W)
            dy_ok = l_ok
        else:
            # Stride 1, over the input pixels (n, h, w): their relu(bn(x)) is built once for
            # the taps (r, s) of the row, each reading dy at (h + pad_h - r, w + pad_w - s).
            n, h, w = pixel_coords(rl, H * W, W)
            p = h + pad_h - group
            q = w + pad_w
            pix_ok = l_ok
            dy_ok = l_ok & within(p, P)
        n = as_offset(n, INT64)
        ok = pix_ok[:, None] & c_ok[None, :]
        x_row = n * sxn + as_offset(h, INT64) * sxh + as_offset(w, INT64) * sxw
        a = tl.load(x_ptr + x_row[:, None] + rc[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        if HAS_PROLOGUE:
            a = bn_relu_padded(a, mean, scale, beta, ok, DOT, PRECISION)
        a = a.to(DOT)
        dy_col = n * sdn + as_offset(p, INT64) * sdh + as_offset(q, INT64) * sdw
        acc0 += tl.dot(dy_tile(dy_ptr, dy_col, dy_ok, q, 0, rk, k_ok, sdc, sdw, Q, TAPS > 1, DOT), a,
                       input_precision=PRECISION)
        if TAPS > 1:
            acc1 += tl.dot(dy_tile(dy_ptr, dy_col, dy_ok, q, 1, rk, k_ok, sdc, sdw, Q, True, DOT), a,
                           input_precision=PRECISION)
        if TAPS > 2:
            acc2 += tl.dot(dy_tile(dy_ptr, dy_col, dy_ok, q, 2, rk, k_ok, sdc, sdw, Q, True, DOT), a,
                           input_precision=PRECISION)
    first_tap = group if TAPS == 1 else group * S
    write_tap(acc0, first_tap, split, rk, rc, k_ok, c_ok, part_ptr, counter_ptr, dw_ptr, swk, swc, swr, sws,
              K, C, R, S, SPLIT, G, BM, BN)
    if TAPS > 1:
        write_tap(acc1, first_tap + 1, split, rk, rc, k_ok, c_ok, part_ptr, counter_ptr, dw_ptr, swk, swc, swr, sws,
                  K, C, R, S, SPLIT, G, BM, BN)
    if TAPS > 2:
        write_tap(acc2, first_tap + 2, split, rk, rc, k_ok, c_ok, part_ptr, counter_ptr, dw_ptr, swk, swc, swr, sws,
                  K, C, R, S, SPLIT, G, BM, BN)


@triton.jit
def dy_tile(dy_ptr, dy_col, dy_ok, q, s, rk, k_ok, sdc, sdw, Q, CHECK_Q: tl.constexpr, DOT: tl.constexpr):
    """The [rk, pixels] tile of dy at columns q - s (offsets dy_col at column q), zero where
    the column leaves the image (CHECK_Q) or dy_ok is false."""
    ok = dy_ok & within(q - s, Q) if CHECK_Q else dy_ok
    return tl.load(dy_ptr + (dy_col - s * sdw)[None, :] + (rk * sdc)[:, None], mask=k_ok[:, None] & ok[None, :],
                   other=0.0).to(DOT)  # dy: float32 behind a shortcut


@triton.jit
def write_tap(acc, tap, split, rk, rc, k_ok, c_ok, part_ptr, counter_ptr, dw_ptr, swk, swc, swr, sws, K, C,
              R: tl.constexpr, S: tl.constexpr, SPLIT: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr):
    """Filter tap `tap`'s tile of the gradient: written in its dtype (SPLIT 1), or stored as
    this split's partial and summed by the last split (sum_splits_if_last)."""
    out_ok = k_ok[:, None] & c_ok[None, :]
    if SPLIT == 1:
        dw_offs = rk.to(tl.int64)[:, None] * swk + rc[None, :] * swc + (tap // S) * swr + (tap % S) * sws
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=out_ok)
    else:
        weight_numel = K * C * R * S
        tl.store(part_ptr + split.to(tl.int64) * weight_numel + tap_tile_offsets(rk, rc, tap, K, C), acc, mask=out_ok)
        sum_splits_if_last(part_ptr, dw_ptr, swk, swc, swr, sws, counter_ptr, K, C, tap, split, R, S, SPLIT, G,
                           BM, BN)


@triton.jit
def sum_splits_if_last(part_ptr, dw_ptr, swk, swc, swr, sws, counter_ptr, K, C, tap, split, R: tl.constexpr,
                       S: tl.constexpr, SPLIT: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Called by each of the SPLIT programs of a weight tile after storing its partial
    ([SPLIT + groups, R * S, K, C]): the last of each group of G splits sums the group into
    partial SPLIT + group, the last of those sums the groups in order and writes the
    gradient tile (merge.py's two levels). Inlined: on sm_90 that kept the main loop's
    instructions (734 per iteration vs 761 not inlined, triton 3.6)."""
    groups = (SPLIT + G - 1) // G
    tile = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * R * S + tap
    counters = counter_ptr + tile * (groups + 1)
    completed, group, first, size = group_ticket(counters, split, SPLIT, G)
    if completed:
        rk = tl.program_id(0) * BM + tl.arange(0, BM)
        rc = tl.program_id(1) * BN + tl.arange(0, BN)
        out_ok = (rk < K)[:, None] & (rc < C)[None, :]
        offs = tap_tile_offsets(rk, rc, tap, K, C)
        weight_numel = K * C * R * S
        total = sum_splits(part_ptr + first.to(tl.int64) * weight_numel, offs, out_ok, size, weight_numel, BM, BN)
        tl.store(part_ptr + (SPLIT + group).to(tl.int64) * weight_numel + offs, total, mask=out_ok)
        reset_ticket(counters, group)
        if last_ticket(counters, groups, groups):
            groups_ptr = part_ptr + tl.full((), SPLIT, tl.int64) * weight_numel
            total = sum_splits(groups_ptr, offs, out_ok, groups, weight_numel, BM, BN)
            dw_offs = rk[:, None] * swk + rc[None, :] * swc + (tap // S) * swr + (tap % S) * sws
            tl.store(dw_ptr + dw_offs, total.to(dw_ptr.dtype.element_ty), mask=out_ok)
            reset_ticket(counters, groups)


@triton.jit
def tap_tile_offsets(rk, rc, tap, K, C):
    """Offsets of the [rk, rc] tile of filter tap `tap` in one weight-sized slot of the
    partials, laid out [R * S, K, C]: each tap's tile is contiguous along C, so programs store
    and read their partials in 16-byte vectors. (In the weight's own [K, C, R, S] order the
    elements of a tile lie R * S apart: a 4-byte access each, 32 per thread per pass, triton
    3.6, sm_90.) int32: within one weight (the launcher checks it has < 2^31 elements), so the
    64-bit addresses are formed per access, not held for the whole loop."""
    return (tap * K + rk[:, None]) * C + rc[None, :]


@triton.jit
def sum_splits(base_ptr, offs, out_ok, count, weight_numel, BM: tl.constexpr, BN: tl.constexpr):
    """The sum of `count` consecutive partial weight tiles from base_ptr, in split order."""
    total = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(count):
        total += tl.load(base_ptr + offs, mask=out_ok, other=0.0, cache_modifier=".cg")
        base_ptr += weight_numel
    return total


def split_count(rows: int, output_tiles: int) -> int:
    """The shared split-K rule; in the interpreter 2 where possible, so the tiny test shapes
    exercise the split path."""
    if interpreter_on():
        return 2 if rows >= 64 else 1
    return wgrad_splits(rows, output_tiles)


ROWS_PER_STEP = 64  # BL: pixels per step of the reduction


class WgradGrid(NamedTuple):
    """A weight-gradient launch's shape-derived values (see wgrad_grid)."""
    rows: int  # the pixels reduced over: output pixels, or input pixels where taps > 1
    taps: int  # filter taps per program (TAPS)
    tap_groups: int  # programs per (K, C) tile and split: R * S, or R where taps > 1
    bm: int
    bn: int
    split: int
    rows_per_split: int
    group: int  # splits per group of the two-level sum
    counter_count: int  # ticket counters of a launch with SPLIT > 1 (merge_buffers)
    partial_numel: int  # elements of its partial sums, [split + groups, R * S, K, C]


def taps_per_program(s: int, stride: tuple[int, int], narrow: bool) -> int:
    """Filter taps a program owns. Stride 1, 2 or 3 filter columns, 16-bit dy and x: the S taps
    of a filter row, each with its own accumulator; the program walks the input pixels and
    builds their relu(bn(x)) once for the row instead of once per tap (in the main loop 527
    instructions for 3 taps where one tap took 396, triton 3.6, sm_90, at the headline).
    Else one tap, over the output pixels: with a stride, an input pixel meets only some of
    the taps; with a float32 dy or x, the row's pipelined tiles need 112-192 KB of shared
    memory (sm_86 and sm_89 GPUs have 99 KB; 16-bit ones 96 KB)."""
    return s if stride == (1, 1) and 1 < s <= 3 and narrow else 1


@functools.lru_cache(maxsize=4096)
def wgrad_grid(n: int, k: int, c: int, h: int, w: int, p: int, q: int, r: int, s: int,
               stride: tuple[int, int], narrow: bool) -> WgradGrid:
    """Tiles and split-K of a weight-gradient launch (narrow: dy and x in 16 bits), computed
    once per layer shape."""
    taps = taps_per_program(s, stride, narrow)
    rows = n * h * w if taps > 1 else n * p * q
    tap_groups = r * s // taps
    bm, bn = pow2_block(k), pow2_block(c)
    weight_tiles = cdiv(k, bm) * cdiv(c, bn)
    split = split_count(rows, weight_tiles * r * s)  # as with one tap per program: the partials keep their size
    rows_per_split = cdiv(cdiv(rows, split), ROWS_PER_STEP) * ROWS_PER_STEP
    split = cdiv(rows, rows_per_split)
    group = merge_group(split, 1)
    return WgradGrid(rows, taps, tap_groups, bm, bn, split, rows_per_split, group,
                     weight_tiles * r * s * block_counters(split, group),  # per tap of each tile
                     (split + cdiv(split, group)) * k * c * r * s)


def bn_relu_conv_wgrad(dy, x, mean, var, bn_weight, bn_bias, weight_shape, stride, padding, eps, weight_dtype,
                       conv_dtype, weight_channels_last=False):
    n, c, h, w = x.shape
    k, _, r, s = weight_shape
    _, _, p, q = dy.shape
    grid = wgrad_grid(n, k, c, h, w, p, q, r, s, tuple(stride),
                      dy.element_size() == x.element_size() == 2)
    rows, taps, tap_groups, bm, bn, split, rows_per_split, group = grid[:8]
    dw = torch.empty((k, c, r, s), device=x.device, dtype=weight_dtype,
                     memory_format=weight_memory_format(weight_channels_last))
    if dw.numel() >= 2 ** 31:
        raise ValueError(f"fused_preact.triton: a weight of {dw.numel()} elements is too large (< 2^31)")
    has_prologue = mean is not None
    dummy = dw
    counters, part = (merge_buffers(x.device, grid.counter_count, grid.partial_numel, torch.float32)
                      if split > 1 else (dummy, dummy))
    bn_relu_conv_wgrad_kernel[(cdiv(k, bm), cdiv(c, bn), tap_groups * split)](
        dy, *nhwc_strides(dy), x, *nhwc_strides(x),
        mean if has_prologue else dummy, var if has_prologue else dummy,
        bn_weight if bn_weight is not None else dummy, bn_bias if bn_bias is not None else dummy, eps,
        part, counters,
        dw, *dw.stride(),
        rows, h, w, c, p, q, k, rows_per_split, stride[0], stride[1], padding[0], padding[1],
        R=r, S=s, SPLIT=split, G=group, HAS_PROLOGUE=has_prologue, HAS_GAMMA=has_prologue and bn_weight is not None,
        HAS_BETA=has_prologue and bn_bias is not None, INT64=needs_int64(dy, x), DOT=dot_dtype(conv_dtype),
        PRECISION=dot_precision(conv_dtype), BM=bm, BN=bn, BL=ROWS_PER_STEP, EVEN_K=k % bm == 0,
        EVEN_C=c % bn == 0, TAPS=taps,
    )
    return dw

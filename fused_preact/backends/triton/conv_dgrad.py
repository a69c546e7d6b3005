"""Backward through a unit's input: g = dgrad(dy, W) * [bn(x) > 0], and the BN sums.

Implicit GEMM over input pixels: rows = N*H*W input pixels, columns = C input channels,
reduction over the filter taps (r, s) and the K output channels. For stride > 1 the
input pixels are split into stride_h * stride_w phases (sub-pixel decomposition): in the
phase (h % stride_h, w % stride_w) only the taps r = (h + pad_h) mod stride_h (+ k*stride_h)
reach an output pixel, so no zero-inserted work is done. A phase with no tap (1x1
stride 2) still writes its zeros (or g_other). The epilogue adds g_other (another conv's
gradient of the same activation: a projection shortcut's), recomputes the ReLU mask from
the saved pre-BN x and writes per-tile sums of g and g * xhat; the last program of each channel
block adds the tiles up in a fixed order (merge.py: no second launch, no atomics on floats).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..base import cdiv
from .common import (as_offset, bn_scale_shift, dot_dtype, dot_precision, inv_std, kernel_weight, lanes_below,
                     needs_int64, nhwc_strides, pow2_block, relu_passes, rows_per_tile, within)
from .launch import autotune_warps, derived
from .merge import block_counters, merge_block, merge_buffers, merge_group, sum_if_last


@autotune_warps(key=["HP", "WP", "C", "K", "R", "S"])
@triton.jit
def bn_relu_conv_dgrad_kernel(
    dy_ptr, sdn, sdh, sdw, sdc,                # output gradient [N, P, Q, K] by strides
    w_ptr, swk, swc, swr, sws,                 # weight [K, C, R, S] by strides
    x_ptr, sxn, sxh, sxw, sxc,                 # saved pre-BN input [N, H, W, C]
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,
    g_ptr, sgn, sgh, sgw, sgc,                 # result [N, H, W, C] by strides
    o_ptr, son, soh, sow, soc,                 # g_other [N, H, W, C] by strides (HAS_OTHER)
    part_ptr, counter_ptr, G, sums_ptr,        # per-tile sums [tiles + groups, 2, C] fp32, tickets, tiles
                                               # per merge group, sums [2, C]
    N, H, W, C, P, Q, K, HP, WP, tiles_per_phase,
    R: tl.constexpr, S: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_OTHER: tl.constexpr,
    INT64: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_BLOCKS: tl.constexpr, BT: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_C: tl.constexpr,  # K, C multiples of BK, BN: no channel masks
):
    pid = tl.program_id(0)
    phase = pid // tiles_per_phase
    ph = phase // STRIDE_W
    pw = phase % STRIDE_W
    # Pixels of this phase: h = ph + STRIDE_H * i for i < ceil((H - ph) / STRIDE_H).
    hp = (H - ph + STRIDE_H - 1) // STRIDE_H
    wp = (W - pw + STRIDE_W - 1) // STRIDE_W
    rm = (pid % tiles_per_phase) * BM + tl.arange(0, BM)
    row_ok = rm < N * hp * wp
    # A phase is empty where H or W is smaller than the stride: no row is valid, and the
    # divisors below must not be 0.
    area = tl.maximum(hp * wp, 1)
    wp_div = tl.maximum(wp, 1)
    # Signed division, once per program: pixel_coords' unsigned one made ptxas lay the main
    # loop's tap arithmetic out 16 instructions longer (310 vs 294, triton 3.6, sm_90).
    n = as_offset(rm // area, INT64)
    h = ph + STRIDE_H * ((rm % area) // wp_div)
    w = pw + STRIDE_W * (rm % wp_div)
    rc = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = lanes_below(rc, C, EVEN_C)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # The taps of this phase: r = r0 + STRIDE_H * i, s = s0 + STRIDE_W * j. One flat loop
    # over (tap, K block), so the software pipeliner prefetches across all of them. K_BLOCKS
    # is a constant divisor, as the forward's C_BLOCKS, but the trip count stays a run-time
    # value beyond one block: as a constant, LLVM unrolled a 1x1 filter's loop whole (255
    # registers and 356-476 B of spills on sm_80, triton 3.6).
    r0 = (ph + PAD_H) % STRIDE_H
    s0 = (pw + PAD_W) % STRIDE_W
    taps_w = (S - s0 + STRIDE_W - 1) // STRIDE_W
    taps = ((R - r0 + STRIDE_H - 1) // STRIDE_H) * taps_w
    k_blocks = 1 if K_BLOCKS == 1 else tl.cdiv(K, BK)
    for t in range(0, taps * k_blocks):
        tap = t // K_BLOCKS
        # A filter dimension of size 1: the constant tap 0, as in the forward (the weight
        # tile's address provably aligned; a phase whose r0 or s0 is not 0 has no taps).
        r = r0 + STRIDE_H * (tap // taps_w) if R > 1 else 0
        s = s0 + STRIDE_W * (tap % taps_w) if S > 1 else 0
        rk = (t % K_BLOCKS) * BK + tl.arange(0, BK)
        p = (h + PAD_H - r) // STRIDE_H  # exact: h + PAD_H - r is a multiple of STRIDE_H
        q = (w + PAD_W - s) // STRIDE_W
        pix_ok = row_ok & within(p, P) & within(q, Q)  # a negative p: h + PAD_H - r < 0
        dy_row = n * sdn + as_offset(p, INT64) * sdh + as_offset(q, INT64) * sdw
        k_ok = lanes_below(rk, K, EVEN_K)
        a = tl.load(dy_ptr + dy_row[:, None] + rk[None, :] * sdc,
                    mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + rk[:, None] * swk + rc[None, :] * swc + r * swr + s * sws,
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        # In the conv dtype: under autocast the weight (and a shortcut's dy) are float32.
        acc += tl.dot(a.to(DOT), b.to(DOT), input_precision=PRECISION)

    ok = row_ok[:, None] & c_ok[None, :]
    g = acc
    if HAS_OTHER:
        o_row = n * son + as_offset(h, INT64) * soh + as_offset(w, INT64) * sow
        g += tl.load(o_ptr + o_row[:, None] + rc[None, :] * soc, mask=ok, other=0.0).to(tl.float32)
    if HAS_PROLOGUE:
        x_row = n * sxn + as_offset(h, INT64) * sxh + as_offset(w, INT64) * sxw
        x = tl.load(x_ptr + x_row[:, None] + rc[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        mean, scale, beta = bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, rc, c_ok, eps,
                                           HAS_GAMMA, HAS_BETA)
        xc = x - mean[None, :]
        g = tl.where(relu_passes(xc * scale[None, :] + beta[None, :]), g, 0.0)
    g = g.to(g_ptr.dtype.element_ty)
    g_row = n * sgn + as_offset(h, INT64) * sgh + as_offset(w, INT64) * sgw
    tl.store(g_ptr + g_row[:, None] + rc[None, :] * sgc, g, mask=ok)
    if HAS_PROLOGUE:
        # Sums of the stored g, so the BN backward pass subtracts exactly their mean.
        gs = tl.where(ok, g.to(tl.float32), 0.0)
        invstd = inv_std(tl.load(var_ptr + rc, mask=c_ok, other=1.0).to(tl.float32), eps)
        base = part_ptr + pid.to(tl.int64) * 2 * C + rc
        tl.store(base, tl.sum(gs, axis=0), mask=c_ok)
        tl.store(base + C, tl.sum(gs * xc * invstd[None, :], axis=0), mask=c_ok)
        sum_if_last(part_ptr, pid, tl.num_programs(0), C, counter_ptr, tl.program_id(1), G, sums_ptr, 2, BN, BT)


class DgradGrid(NamedTuple):
    """A data-gradient launch's shape-derived values (see dgrad_grid)."""
    hp: int  # the largest stride phase's rows and columns
    wp: int
    bm: int
    bn: int
    bk: int
    tiles_per_phase: int
    tiles: int
    blocks: int
    bt: int
    group: int  # tiles per group of the two-level merge of the BN sums
    counter_count: int  # ticket counters of a launch with a BN prologue (merge_buffers)
    partial_numel: int  # elements of its per-tile sums, [tiles + groups, 2, C]


@functools.lru_cache(maxsize=4096)
def dgrad_grid(n: int, c: int, h: int, w: int, k: int, stride_h: int, stride_w: int) -> DgradGrid:
    """Tiles and grid of a data-gradient launch, computed once per layer shape."""
    hp, wp = cdiv(h, stride_h), cdiv(w, stride_w)
    bm, bn = rows_per_tile(n * hp * wp), pow2_block(c, hi=128)
    tiles_per_phase = cdiv(n * hp * wp, bm)
    tiles = tiles_per_phase * stride_h * stride_w
    bt = merge_block(tiles, bn)
    group, blocks = merge_group(tiles, bt), cdiv(c, bn)
    return DgradGrid(hp, wp, bm, bn, pow2_block(k), tiles_per_phase, tiles, blocks, bt, group,
                     blocks * block_counters(tiles, group), (tiles + cdiv(tiles, group)) * 2 * c)


def bn_relu_conv_dgrad(dy, weight, x, mean, var, bn_weight, bn_bias, stride, padding, eps, conv_dtype, g_other=None):
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    _, _, p, q = dy.shape
    weight = derived(kernel_weight, weight)  # replays copy it again (replay.py)
    grid = dgrad_grid(n, c, h, w, k, *stride)
    hp, wp, bm, bn, bk, tiles_per_phase, tiles, blocks, bt, group = grid[:10]
    g = torch.empty_like(x, memory_format=torch.channels_last)
    has_prologue = mean is not None
    dummy = g
    counters, part = (merge_buffers(x.device, grid.counter_count, grid.partial_numel, torch.float32)
                      if has_prologue else (dummy, dummy))
    sums = torch.empty((2, c if has_prologue else 0), device=x.device, dtype=torch.float32)
    bn_relu_conv_dgrad_kernel[(tiles, blocks)](
        dy, *nhwc_strides(dy),
        weight, *weight.stride(),
        x, *nhwc_strides(x),
        mean if has_prologue else dummy, var if has_prologue else dummy,
        bn_weight if bn_weight is not None else dummy, bn_bias if bn_bias is not None else dummy, eps,
        g, *nhwc_strides(g),
        *((g_other, *nhwc_strides(g_other)) if g_other is not None else (dummy, 0, 0, 0, 0)),  # unread without
        part, counters, group,
        sums if has_prologue else dummy,
        n, h, w, c, p, q, k, hp, wp, tiles_per_phase,
        R=r, S=s, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        HAS_PROLOGUE=has_prologue, HAS_GAMMA=has_prologue and bn_weight is not None,
        HAS_BETA=has_prologue and bn_bias is not None, HAS_OTHER=g_other is not None,
        INT64=needs_int64(dy, x, g, *(() if g_other is None else (g_other,))), DOT=dot_dtype(conv_dtype),
        PRECISION=dot_precision(conv_dtype), BM=bm, BN=bn, BK=bk, K_BLOCKS=cdiv(k, bk), EVEN_K=k % bk == 0,
        EVEN_C=c % bn == 0, BT=bt,
    )
    return g, sums

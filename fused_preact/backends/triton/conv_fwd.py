"""Forward unit: y = conv(relu(bn(x)), W) [+ residual], partial statistics of y.

Implicit GEMM over output pixels: M = N*P*Q rows, N = K output channels, reduction over
R*S*C. The prologue normalises each loaded input tile with the BN scale/shift and
applies ReLU in registers; padding positions are zeroed AFTER the activation (the conv
pads the activation, and relu(shift) is not 0). The epilogue adds the residual, stores,
and writes per-tile (count, mean, M2) of the stored values for the next BatchNorm; the
last program of each channel block merges them into that BatchNorm's batch statistics and
updates its running statistics (merge.py): no finalize launch.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..base import cdiv, conv_output_hw, stats_dtype
from .common import (as_offset, bn_relu_padded, bn_scale_shift, dot_dtype, dot_precision, kernel_weight, lanes_below,
                     needs_int64, nhwc_strides, pixel_coords, pow2_block, rows_per_tile, stats_tiles, within,
                     write_tile_stats)
from .launch import autotune_warps, derived
from .merge import block_counters, merge_block, merge_group, merge_buffers, merge_if_last
from .stats import running_args


@autotune_warps(key=["M", "K", "C", "R", "S"], restore=("rmean_ptr", "rvar_ptr", "nbt_ptr"))
@triton.jit
def bn_relu_conv_fwd_kernel(
    x_ptr, sxn, sxh, sxw, sxc,                 # input [N, H, W, C] by strides
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,  # BN of the input (per channel C)
    w_ptr, swk, swc, swr, sws,                 # weight [K, C, R, S] by strides (small, L2-resident)
    y_ptr, syn, syh, syw, syc,                 # output [N, P, Q, K] by strides
    res_ptr, srn, srh, srw, src,               # residual, same shape as y
    part_ptr,                                  # partial statistics [tiles + groups, 3, K] fp32
    counter_ptr, G, ymean_ptr, yvar_ptr,       # merge tickets, tiles per merge group; batch statistics of y [K]
    M, H, W, C, P, Q, K,
    stride_h, stride_w, pad_h, pad_w,
    rmean_ptr, rvar_ptr, nbt_ptr, momentum,    # running statistics of the next BatchNorm
    R: tl.constexpr, S: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, WANT_STATS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, COUNT_BATCH: tl.constexpr, CUMULATIVE: tl.constexpr, INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, C_BLOCKS: tl.constexpr, BT: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_K: tl.constexpr,  # C, K multiples of BK, BN: no channel masks
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    row_ok = rm < M
    col_ok = lanes_below(rn, K, EVEN_K)
    n, p, q = pixel_coords(rm, P * Q, Q)
    n = as_offset(n, INT64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One flat loop over (tap, channel block): the software pipeliner prefetches the next
    # iteration's loads only across the iterations of a single innermost loop. C_BLOCKS is a
    # constant (one compile per channel-block count): with the count a run-time value, each
    # iteration divided by it and ptxas serialised the wgmma of forwards with more than one
    # channel block (advisory C7515, triton 3.6, sm_90).
    if HAS_PROLOGUE and C_BLOCKS == 1:
        # All input channels in one block: the BN scale/shift are the same for every tap, so
        # computed once here, not (with their 1/sqrt) in each iteration of the main loop.
        rc_all = tl.arange(0, BK)
        mean_all, scale_all, beta_all = bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, rc_all, rc_all < C,
                                                       eps, HAS_GAMMA, HAS_BETA)
    for t in range(0, R * S * C_BLOCKS):
        tap = t // C_BLOCKS
        # A filter dimension of size 1 has the one tap 0: as a constant, the weight tile's
        # address is provably 16-byte aligned whatever stride the dimension has (PyTorch's
        # default [K, C, 1, 1] layout gives r and s stride 1), so the tile loads as vectors.
        r = tap // S if R > 1 else 0
        s = tap % S if S > 1 else 0
        rc = (t % C_BLOCKS) * BK + tl.arange(0, BK)
        h = p * stride_h - pad_h + r
        w = q * stride_w - pad_w + s
        pix_ok = row_ok & within(h, H) & within(w, W)
        x_row = n * sxn + as_offset(h, INT64) * sxh + as_offset(w, INT64) * sxw
        c_ok = lanes_below(rc, C, EVEN_C)
        ok = pix_ok[:, None] & c_ok[None, :]
        a = tl.load(x_ptr + x_row[:, None] + rc[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        if HAS_PROLOGUE:
            if C_BLOCKS == 1:
                mean, scale, beta = mean_all, scale_all, beta_all
            else:
                mean, scale, beta = bn_scale_shift(mean_ptr, var_ptr, gamma_ptr, beta_ptr, rc, c_ok,
                                                   eps, HAS_GAMMA, HAS_BETA)
            a = bn_relu_padded(a, mean, scale, beta, ok, DOT, PRECISION)
        # The weight in the conv dtype: under autocast a float32 parameter, cast here.
        b = tl.load(w_ptr + rc[:, None] * swc + rn[None, :] * swk + r * swr + s * sws,
                    mask=c_ok[:, None] & col_ok[None, :], other=0.0).to(DOT)
        acc += tl.dot(a.to(DOT), b, input_precision=PRECISION)

    out_ok = row_ok[:, None] & col_ok[None, :]
    y_row = n * syn + as_offset(p, INT64) * syh + as_offset(q, INT64) * syw
    if HAS_RESIDUAL:
        # Added in float32 and rounded once to y's dtype (float32 for a float32 shortcut under
        # autocast). Eager rounds the conv output to the conv dtype first; rounding it here too
        # cost 812 B of spills (triton 3.6, sm_90) for no accuracy.
        r_row = n * srn + as_offset(p, INT64) * srh + as_offset(q, INT64) * srw
        acc += tl.load(res_ptr + r_row[:, None] + rn[None, :] * src, mask=out_ok, other=0.0).to(tl.float32)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_row[:, None] + rn[None, :] * syc, y, mask=out_ok)
    if WANT_STATS:
        # Statistics of the stored (rounded) values, as the next nn.BatchNorm2d would see them.
        write_tile_stats(part_ptr, pid_m, y.to(tl.float32), row_ok, rn, col_ok, K)
        merge_if_last(part_ptr, pid_m, tl.num_programs(0), K, counter_ptr, pid_n, tl.num_programs(1), G,
                      ymean_ptr, yvar_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum,
                      UPDATE_RUNNING, COUNT_BATCH, CUMULATIVE, BN, BT)


class ForwardGrid(NamedTuple):
    """A forward launch's shape-derived values (see forward_grid)."""
    p: int
    q: int
    m: int
    bm: int
    bn: int
    bk: int
    tiles: int
    blocks: int
    bt: int
    group: int  # tiles per group of the two-level statistics merge
    counter_count: int  # ticket counters of a launch with statistics (merge_buffers)
    partial_numel: int  # elements of its partial statistics, [tiles + groups, 3, K]
    y_strides: tuple[int, int, int, int]  # the output's, channels_last


@functools.lru_cache(maxsize=4096)
def forward_grid(n: int, c: int, h: int, w: int, k: int, r: int, s: int, stride_h: int, stride_w: int,
                 pad_h: int, pad_w: int) -> ForwardGrid:
    """Output size, tiles and grid of a forward launch: computed once per layer shape (a
    block's host time is a few microseconds per launch, and this was one of them)."""
    p, q = conv_output_hw((h, w), (r, s), (stride_h, stride_w), (pad_h, pad_w))
    m = n * p * q
    bn = pow2_block(k, hi=128)
    tiles = stats_tiles(m)
    bt = merge_block(tiles, bn)
    group, blocks = merge_group(tiles, bt), cdiv(k, bn)
    return ForwardGrid(p, q, m, rows_per_tile(m), bn, pow2_block(c), tiles, blocks, bt, group,
                       blocks * block_counters(tiles, group) + 1, (tiles + cdiv(tiles, group)) * 3 * k,
                       (p * q * k, 1, q * k, k))


def bn_relu_conv(x, mean, var, bn_weight, bn_bias, weight, residual, stride, padding, eps, want_stats,
                 running_mean, running_var, num_batches_tracked, momentum, conv_dtype):
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    weight = derived(kernel_weight, weight)  # replays copy it again (replay.py)
    grid = forward_grid(n, c, h, w, k, r, s, *stride, *padding)
    p, q, m, bm, bn, bk, tiles, blocks, bt, group = grid[:10]
    y_dtype = conv_dtype if residual is None else residual.dtype  # float32 for a float32 shortcut
    y = torch.empty_strided((n, k, p, q), grid.y_strides, device=x.device, dtype=y_dtype)
    dummy = y  # never read: the matching constexpr flag is off
    statistics_dtype = stats_dtype(y_dtype)
    counters, part = (merge_buffers(x.device, grid.counter_count, grid.partial_numel, statistics_dtype)
                      if want_stats else (dummy, dummy))
    y_mean = torch.empty(k if want_stats else 0, device=x.device, dtype=statistics_dtype)
    y_var = torch.empty_like(y_mean)
    has_prologue = mean is not None
    res = residual if residual is not None else dummy
    bn_relu_conv_fwd_kernel[(tiles, blocks)](
        x, *nhwc_strides(x),
        mean if has_prologue else dummy, var if has_prologue else dummy,
        bn_weight if bn_weight is not None else dummy, bn_bias if bn_bias is not None else dummy, eps,
        weight, *weight.stride(),
        y, *nhwc_strides(y),
        res, *nhwc_strides(res),
        part, counters, group,
        y_mean if want_stats else dummy, y_var if want_stats else dummy,
        m, h, w, c, p, q, k, stride[0], stride[1], padding[0], padding[1],
        **running_args(y_mean if want_stats else y, running_mean, running_var, num_batches_tracked, momentum),
        R=r, S=s, HAS_PROLOGUE=has_prologue, INT64=needs_int64(x, y, res),
        HAS_GAMMA=has_prologue and bn_weight is not None, HAS_BETA=has_prologue and bn_bias is not None,
        HAS_RESIDUAL=residual is not None, WANT_STATS=want_stats, DOT=dot_dtype(conv_dtype),
        PRECISION=dot_precision(conv_dtype),
        BM=bm, BN=bn, BK=bk, C_BLOCKS=cdiv(c, bk), EVEN_C=c % bk == 0, EVEN_K=k % bn == 0, BT=bt,
    )
    return y, y_mean, y_var

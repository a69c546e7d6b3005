"""BatchNorm statistics: a standalone pass over x, and the finalize of partials.

batch_stats: per-tile (count, mean, M2) of x over N*H*W rows (the first block of a network;
later blocks get theirs from the previous conv's epilogue).
bn_finalize: merge the tiles in a fixed order (deterministic, no atomics) with Chan's
formula, then update running_mean / running_var like nn.BatchNorm2d (unbiased variance,
momentum or 1 / num_batches_tracked), counting the batch in num_batches_tracked (no add_
kernel beside it). One program per block of channels (one in all for momentum=None): a tiny launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import cdiv, stats_dtype
from .common import next_pow2, nhwc_strides, rows_per_tile, stats_tiles, write_tile_stats


@triton.jit
def batch_stats_kernel(x_ptr, sxn, sxh, sxw, sxc, part_ptr, M, HW, W, C,
                       BM: tl.constexpr, BC: tl.constexpr):
    pid_m = tl.program_id(0)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok = rm < M
    c_ok = rc < C
    n = (rm // HW).to(tl.int64)
    h = ((rm % HW) // W).to(tl.int64)
    w = (rm % W).to(tl.int64)
    offs = (n * sxn + h * sxh + w * sxw)[:, None] + rc[None, :] * sxc
    x = tl.load(x_ptr + offs, mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    write_tile_stats(part_ptr, pid_m, x, row_ok, rc, c_ok, C)


@triton.jit
def bn_finalize_kernel(part_ptr, T, C, mean_ptr, var_ptr,
                       rmean_ptr, rvar_ptr, nbt_ptr, momentum,
                       UPDATE_RUNNING: tl.constexpr, COUNT_BATCH: tl.constexpr, CUMULATIVE: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr):
    rc = tl.program_id(0) * BC + tl.arange(0, BC)
    c_ok = rc < C
    total = tl.zeros((BC,), dtype=tl.float32)
    mean = tl.zeros((BC,), dtype=tl.float32)
    m2 = tl.zeros((BC,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        ok = (rt < T)[:, None] & c_ok[None, :]
        offs = rt.to(tl.int64)[:, None] * 3 * C + rc[None, :]
        cnt = tl.load(part_ptr + offs, mask=ok, other=0.0)
        mu = tl.load(part_ptr + offs + C, mask=ok, other=0.0)
        sq = tl.load(part_ptr + offs + 2 * C, mask=ok, other=0.0)
        # Merge a block of BT tiles at once, then fold it into the running totals (Chan).
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt * mu, axis=0) / tl.maximum(n_b, 1.0)
        dev = tl.where(ok, mu - mean_b[None, :], 0.0)
        m2_b = tl.sum(sq, axis=0) + tl.sum(cnt * dev * dev, axis=0)
        n_new = total + n_b
        delta = mean_b - mean
        mean += delta * n_b / tl.maximum(n_new, 1.0)
        m2 += m2_b + delta * delta * total * n_b / tl.maximum(n_new, 1.0)
        total = n_new
    tl.store(mean_ptr + rc, mean, mask=c_ok)
    tl.store(var_ptr + rc, m2 / tl.maximum(total, 1.0), mask=c_ok)
    if UPDATE_RUNNING:
        if COUNT_BATCH:
            batches = tl.load(nbt_ptr) + 1  # this batch counted, as nn.BatchNorm2d does first
        if CUMULATIVE:  # one program (see the launcher): no other reads the count it writes
            factor = 1.0 / batches.to(tl.float32)
        else:
            factor = momentum
        unbiased = m2 / tl.maximum(total - 1.0, 1.0)
        rmean = tl.load(rmean_ptr + rc, mask=c_ok).to(tl.float32)
        rvar = tl.load(rvar_ptr + rc, mask=c_ok).to(tl.float32)
        tl.store(rmean_ptr + rc, rmean + factor * (mean - rmean), mask=c_ok)
        tl.store(rvar_ptr + rc, rvar + factor * (unbiased - rvar), mask=c_ok)
        if COUNT_BATCH:
            if tl.program_id(0) == 0:
                tl.store(nbt_ptr, batches)


def batch_stats(x):
    n, c, h, w = x.shape
    m = n * h * w
    bm, bc = rows_per_tile(m), min(64, next_pow2(c))
    part = torch.empty((stats_tiles(m), 3, c), device=x.device, dtype=stats_dtype(x.dtype))
    batch_stats_kernel[(part.shape[0], cdiv(c, bc))](x, *nhwc_strides(x), part, m, h * w, w, c,
                                                           BM=bm, BC=bc)
    return part


def bn_finalize(partials, running_mean, running_var, num_batches_tracked, momentum):
    t, _, c = partials.shape
    mean = torch.empty(c, device=partials.device, dtype=partials.dtype)
    var = torch.empty_like(mean)
    update = running_mean is not None
    count_batch = update and num_batches_tracked is not None
    # momentum=None reads the batch count that program 0 writes: then one program does all channels.
    bc = next_pow2(c) if momentum is None else min(128, next_pow2(c))
    # Few programs (one per channel block) walk thousands of tiles: wide steps of 8192
    # values and 8 warps keep that walk short (32 tiles per step was slow: see
    # bn_finalize_kernel in benchmarks/results/2026-11-22-h100-f908c4d/profile.txt).
    bt = min(max(8192 // bc, 16), next_pow2(t))
    bn_finalize_kernel[(cdiv(c, bc),)](
        partials.contiguous(), t, c, mean, var,
        running_mean if update else mean, running_var if update else var,
        num_batches_tracked if count_batch else mean, 0.0 if momentum is None else momentum,
        UPDATE_RUNNING=update, COUNT_BATCH=count_batch, CUMULATIVE=momentum is None, BT=bt, BC=bc, num_warps=8,
    )
    return mean, var

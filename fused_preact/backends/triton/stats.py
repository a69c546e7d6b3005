"""BatchNorm statistics: a standalone pass over x, and the merge of gathered partials.

batch_stats: mean and biased variance per channel of x over N*H*W rows (the first block of
a network; later blocks get theirs from the previous conv's epilogue), and the running
statistics updated: per-tile (count, mean, M2) merged by the last program (merge.py), one
launch in all.
bn_finalize: the same merge of a [T, 3, C] tensor of partials made elsewhere (synchronised
BN's tiles from every rank). One program per block of channels (one in all for
momentum=None, where every channel reads the batch count it writes): a tiny launch.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..base import cdiv, stats_dtype
from .common import (as_offset, needs_int64, next_pow2, nhwc_strides, pixel_coords, rows_per_tile, stats_tiles,
                     write_tile_stats)
from .launch import launcher
from .merge import (block_counters, merge_block, merge_buffers, merge_group, merge_if_last, merge_tiles,
                    store_batch_stats)


@launcher()
@triton.jit
def batch_stats_kernel(x_ptr, sxn, sxh, sxw, sxc, part_ptr, M, HW, W, C,
                       counter_ptr, G, mean_ptr, var_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum,
                       UPDATE_RUNNING: tl.constexpr, COUNT_BATCH: tl.constexpr, CUMULATIVE: tl.constexpr,
                       INT64: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    pid_m = tl.program_id(0)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok = rm < M
    c_ok = rc < C
    n, h, w = pixel_coords(rm, HW, W)
    n, h, w = as_offset(n, INT64), as_offset(h, INT64), as_offset(w, INT64)
    offs = (n * sxn + h * sxh + w * sxw)[:, None] + rc[None, :] * sxc
    x = tl.load(x_ptr + offs, mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    write_tile_stats(part_ptr, pid_m, x, row_ok, rc, c_ok, C)
    merge_if_last(part_ptr, pid_m, tl.num_programs(0), C, counter_ptr, tl.program_id(1), tl.num_programs(1), G,
                  mean_ptr, var_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum,
                  UPDATE_RUNNING, COUNT_BATCH, CUMULATIVE, BC, BT)


# Few programs (one per channel block) walk the tiles: wide steps of 8192 values and 8
# warps keep that walk short.
@launcher(num_warps=8)
@triton.jit
def bn_finalize_kernel(part_ptr, T, C, mean_ptr, var_ptr,
                       rmean_ptr, rvar_ptr, nbt_ptr, momentum,
                       UPDATE_RUNNING: tl.constexpr, COUNT_BATCH: tl.constexpr, CUMULATIVE: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr):
    rc = tl.program_id(0) * BC + tl.arange(0, BC)
    c_ok = rc < C
    total, mean, m2 = merge_tiles(part_ptr, 0, T, C, rc, c_ok, BT)
    batches = 0
    if COUNT_BATCH:
        batches = tl.load(nbt_ptr) + 1  # this batch counted, as nn.BatchNorm2d does first
    store_batch_stats(total, mean, m2, rc, c_ok, mean_ptr, var_ptr, rmean_ptr, rvar_ptr, batches, momentum,
                      UPDATE_RUNNING, CUMULATIVE)
    if COUNT_BATCH:
        if tl.program_id(0) == 0:
            tl.store(nbt_ptr, batches)


def running_args(mean, running_mean, running_var, num_batches_tracked, momentum) -> dict:
    """Kernel arguments of a running-statistics update (placeholders where there is none)."""
    update = running_mean is not None
    count_batch = update and num_batches_tracked is not None
    return dict(rmean_ptr=running_mean if update else mean, rvar_ptr=running_var if update else mean,
                nbt_ptr=num_batches_tracked if count_batch else mean, momentum=0.0 if momentum is None else momentum,
                UPDATE_RUNNING=update, COUNT_BATCH=count_batch, CUMULATIVE=update and momentum is None)


class StatsGrid(NamedTuple):
    """A statistics pass's shape-derived values (see stats_grid)."""
    bm: int
    bc: int
    tiles: int
    blocks: int
    bt: int
    group: int  # tiles per group of the two-level merge
    counter_count: int  # ticket counters (merge_buffers)
    partial_numel: int  # elements of the partial statistics, [tiles + groups, 3, C]


@functools.lru_cache(maxsize=4096)
def stats_grid(m: int, c: int) -> StatsGrid:
    """Tiles and grid of a statistics pass over m rows of c channels, computed once per shape."""
    bc = min(64, next_pow2(c))
    tiles, blocks = stats_tiles(m), cdiv(c, bc)
    bt = merge_block(tiles, bc)
    group = merge_group(tiles, bt)
    return StatsGrid(rows_per_tile(m), bc, tiles, blocks, bt, group, blocks * block_counters(tiles, group) + 1,
                     (tiles + cdiv(tiles, group)) * 3 * c)


def batch_stats(x, running_mean, running_var, num_batches_tracked, momentum):
    n, c, h, w = x.shape
    m = n * h * w
    grid = stats_grid(m, c)
    counters, part = merge_buffers(x.device, grid.counter_count, grid.partial_numel, stats_dtype(x.dtype))
    mean = torch.empty(c, device=x.device, dtype=part.dtype)
    var = torch.empty_like(mean)
    batch_stats_kernel[(grid.tiles, grid.blocks)](
        x, *nhwc_strides(x), part, m, h * w, w, c, counters, grid.group, mean, var,
        **running_args(mean, running_mean, running_var, num_batches_tracked, momentum),
        INT64=needs_int64(x), BM=grid.bm, BC=grid.bc, BT=grid.bt)
    return mean, var


def bn_finalize(partials, running_mean, running_var, num_batches_tracked, momentum):
    t, _, c = partials.shape
    mean = torch.empty(c, device=partials.device, dtype=partials.dtype)
    var = torch.empty_like(mean)
    # momentum=None reads the batch count that program 0 writes: then one program does all channels.
    bc = next_pow2(c) if momentum is None else min(128, next_pow2(c))
    bt = min(max(8192 // bc, 16), next_pow2(t))  # wide steps (see the kernel's launch options)
    bn_finalize_kernel[(cdiv(c, bc),)](
        partials.contiguous(), t, c, mean, var,
        **running_args(mean, running_mean, running_var, num_batches_tracked, momentum),
        BT=bt, BC=bc,
    )
    return mean, var

"""Reductions finished inside the kernel that wrote their partials: the last program to
finish a block of the output reduces it, so no second launch (and no torch kernel) does.

Each program stores its partial result (a tile's (count, mean, M2) per channel, a tile's
BN-gradient sums, a split of a weight gradient), then takes a ticket from an int32 counter
of its output block (`last_ticket`: an atomic add with acquire/release ordering, after a
barrier so the whole program's stores come first). The program that draws the last ticket
sees every partial of its block. Two levels, so no single program walks all T partials
(one walking thousands of them in sequence was most of a kernel's time on an H100): the
partials form groups of G consecutive ones (`merge_group`, about sqrt(T)); the last
program of each group reduces its group in index order into one more partial after the T
(slot T + group), and the last of those programs reduces the group results in group order.
The order is the same whichever program finishes last, so results are bitwise equal run
after run (no float atomics). Each program that drew a last ticket puts its counter back to
0 for the next launch (no memset launch). A block's counters: one per group, then one for
the groups (`block_counters`).

Statistics (merge_if_last): the merge writes mean and biased variance and updates the
running statistics like nn.BatchNorm2d. Where the batch is counted (num_batches_tracked),
a second counter does the same across channel blocks: the last channel block to finish
writes the new count, after every block has read the old one (momentum=None averages with
1 / count).

The counters and the partials live in buffers kept per device and stream (`merge_buffers`):
kernels on one stream run one after another, so each launch finds the counters at zero and
writes every partial it reads (two streams must not share them; a CUDA graph keeps those of
the stream it was captured on, so two graphs captured on one stream must not be replayed at
the same time on two). Allocating the partials on every launch was most of the allocations
of a block's step, a host cost per launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from ..base import cdiv
from .common import interpreter_on, store_stats

# (device, stream handle, partials dtype) -> the kept (int32 ticket counters, zero between
# launches; partials) of the launches with partials of that dtype.
_kept: dict[tuple[torch.device, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
# Buffers outgrown by a larger launch, kept: a CUDA graph captured earlier still launches
# kernels on them, which must not count tickets or store partials in memory that was freed
# and given out again.
_outgrown: list[torch.Tensor] = []


def merge_buffers(device: torch.device, counters: int, partials: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(at least `counters` zeroed int32 ticket counters, room for `partials` elements of
    `dtype`) for a kernel launched now on `device`'s current stream. Each is allocated once
    and grows when a launch needs more, so the largest partials a stream's launches need stay
    allocated (24 MiB for an ImageNet ResNet-50 at batch 256, its 1x1 conv weight gradients at
    7x7); every kernel leaves the counters at zero."""
    # The stream Triton's launcher will launch on (torch's current one), found as it finds it:
    # torch.cuda.current_stream() would build a Stream object on every launch.
    key = (device, driver.active.get_current_stream(device.index) if device.type == "cuda" else 0, dtype)
    kept = _kept.get(key)
    if kept is None or kept[0].numel() < counters or kept[1].numel() < partials:
        had = (256, 256) if kept is None else (kept[0].numel(), kept[1].numel())
        _outgrown.extend(kept or ())
        kept = _kept[key] = (torch.zeros(max(counters, had[0]), dtype=torch.int32, device=device),
                             torch.empty(max(partials, had[1]), dtype=dtype, device=device))
    return kept


def zero_counters() -> None:
    """Put every kept ticket counter back to 0, after an interpreted launch that raised part
    way: the interpreter runs a launch's programs one after another in Python, and an
    exception in one (a warning made an error, Ctrl-C) leaves the tickets the programs before
    it drew, so later launches would find their counters above zero and merge early or never
    (seen: NaN in every later test of the process). On a GPU a launch that fails part way
    takes the CUDA context with it."""
    for counters, _ in _kept.values():
        counters.zero_()


def kept_for(tensor: torch.Tensor):
    """Where `tensor` is one of the kept buffers: (merge_buffers' arguments that return its
    pair again, for the stream current then: at least as many counters and partials as it
    has now; 0 for the counters, 1 for the partials); else None."""
    for (device, _stream, dtype), kept in list(_kept.items()):  # a copy: another thread may add a stream
        for index, buffer in enumerate(kept):
            if buffer is tensor:
                return (device, kept[0].numel(), kept[1].numel(), dtype), index
    return None


def merge_group(partials: int, step: int) -> int:
    """Partials per group of the two-level reduction: a multiple of `step` (the partials
    reduced per loop step) with group * group >= partials, so each level walks about
    sqrt(partials) of them. In the interpreter 1 or 2, so small test shapes take both
    levels, with a partial last group."""
    if interpreter_on():
        return 1 if partials <= 2 else 2
    group = step
    while group * group < partials:
        group *= 2
    return group


def block_counters(partials: int, group: int) -> int:
    """Ticket counters per output block: one per group, one for the groups."""
    return cdiv(partials, group) + 1


def merge_block(tiles: int, channels: int) -> int:
    """Tiles merged per step: about 2048 values at once (registers of a kernel that also
    does a conv), at least 2, no more than the tiles there are."""
    return max(2, min(1 << (tiles - 1).bit_length(), 2048 // channels))


@triton.jit
def last_ticket(counter_ptr, index, total):
    """True in the program that finishes last of the `total` programs sharing counter `index`."""
    tl.debug_barrier()  # every thread's partial stores, before the ticket publishes them
    done = tl.atomic_add(counter_ptr + index, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()  # ... and everything after it, after the ticket
    return done == total - 1


@triton.jit
def reset_ticket(counter_ptr, index):
    """Put counter `index` back to 0 (by the last program, which nobody else waits on)."""
    tl.atomic_xchg(counter_ptr + index, 0, sem="relaxed", scope="gpu")


@triton.jit
def group_ticket(counters_ptr, partial, T, G):
    """Level 1: (whether this program's partial completed its group, the group, its first
    partial, its size), for partial `partial` of T in groups of G."""
    group = partial // G
    first = group * G
    size = tl.minimum(G, T - first)
    return last_ticket(counters_ptr, group, size), group, first, size


@triton.jit
def merge_tiles(part_ptr, first, T, C, rc, c_ok, BT: tl.constexpr):
    """(count, mean, M2) per channel rc of partials first..first+T-1 of a [*, 3, C] tensor,
    merged in order (a block of BT tiles at a time, folded into the totals with Chan's
    formula)."""
    total = tl.zeros(rc.shape, dtype=tl.float32)
    mean = tl.zeros(rc.shape, dtype=tl.float32)
    m2 = tl.zeros(rc.shape, dtype=tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        ok = (rt < T)[:, None] & c_ok[None, :]
        offs = (first + rt).to(tl.int64)[:, None] * 3 * C + rc[None, :]
        # .cg: read from L2, where the other programs' stores are (not a stale L1 line).
        cnt = tl.load(part_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
        mu = tl.load(part_ptr + offs + C, mask=ok, other=0.0, cache_modifier=".cg")
        sq = tl.load(part_ptr + offs + 2 * C, mask=ok, other=0.0, cache_modifier=".cg")
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt * mu, axis=0) / tl.maximum(n_b, 1.0)
        dev = tl.where(ok, mu - mean_b[None, :], 0.0)
        m2_b = tl.sum(sq, axis=0) + tl.sum(cnt * dev * dev, axis=0)
        n_new = total + n_b
        delta = mean_b - mean
        mean += delta * n_b / tl.maximum(n_new, 1.0)
        m2 += m2_b + delta * delta * total * n_b / tl.maximum(n_new, 1.0)
        total = n_new
    return total, mean, m2


@triton.jit
def store_batch_stats(total, mean, m2, rc, c_ok, mean_ptr, var_ptr, rmean_ptr, rvar_ptr, batches, momentum,
                      UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr):
    """Write mean and biased var; update running stats as nn.BatchNorm2d (unbiased var;
    factor momentum, or 1 / batches for momentum=None)."""
    tl.store(mean_ptr + rc, mean, mask=c_ok)
    tl.store(var_ptr + rc, m2 / tl.maximum(total, 1.0), mask=c_ok)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / batches.to(tl.float32)
        else:
            factor = momentum
        unbiased = m2 / tl.maximum(total - 1.0, 1.0)
        rmean = tl.load(rmean_ptr + rc, mask=c_ok).to(tl.float32)
        rvar = tl.load(rvar_ptr + rc, mask=c_ok).to(tl.float32)
        # nn.BatchNorm2d's form (exact at factor 1: momentum=None's first batch)
        tl.store(rmean_ptr + rc, (1.0 - factor) * rmean + factor * mean, mask=c_ok)
        tl.store(rvar_ptr + rc, (1.0 - factor) * rvar + factor * unbiased, mask=c_ok)


@triton.jit(noinline=True)
def merge_if_last(part_ptr, tile, T, C, counter_ptr, block, blocks, G,
                  mean_ptr, var_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum,
                  UPDATE_RUNNING: tl.constexpr, COUNT_BATCH: tl.constexpr, CUMULATIVE: tl.constexpr,
                  BC: tl.constexpr, BT: tl.constexpr):
    """Called by every program after storing tile `tile` of channel block `block` (BC
    channels, `blocks` blocks, T tiles each, [T + groups, 3, C] partials): the last of its
    group merges the group, the last group merger the groups (see the module). Not inlined:
    its registers are not added to those of the conv main loop before it."""
    groups = (T + G - 1) // G
    counters = counter_ptr + block * (groups + 1)
    completed, group, first, size = group_ticket(counters, tile, T, G)
    if completed:
        rc = block * BC + tl.arange(0, BC)
        c_ok = rc < C
        total, mean, m2 = merge_tiles(part_ptr, first, size, C, rc, c_ok, BT)
        store_stats(part_ptr, T + group, total, mean, m2, rc, c_ok, C)
        reset_ticket(counters, group)
        if last_ticket(counters, groups, groups):
            total, mean, m2 = merge_tiles(part_ptr, T, groups, C, rc, c_ok, BT)
            batches = 0
            if COUNT_BATCH:
                batches = tl.load(nbt_ptr, cache_modifier=".cg") + 1  # counted first, as nn.BatchNorm2d
            store_batch_stats(total, mean, m2, rc, c_ok, mean_ptr, var_ptr, rmean_ptr, rvar_ptr, batches, momentum,
                              UPDATE_RUNNING, CUMULATIVE)
            reset_ticket(counters, groups)
            if COUNT_BATCH:
                batch_counter = blocks * (groups + 1)  # after every block's counters
                if last_ticket(counter_ptr, batch_counter, blocks):  # every block has read the old count
                    tl.store(nbt_ptr, batches)
                    reset_ticket(counter_ptr, batch_counter)


@triton.jit
def sum_tiles(part_ptr, first, T, row, C, rc, c_ok, ROWS: tl.constexpr, BT: tl.constexpr):
    """Sum over partials first..first+T-1 of row `row` of a [*, ROWS, C] tensor, in order
    (blocks of BT tiles, each summed in one fixed tree)."""
    total = tl.zeros(rc.shape, dtype=tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        offs = ((first + rt).to(tl.int64)[:, None] * ROWS + row) * C + rc[None, :]
        tile = tl.load(part_ptr + offs, mask=(rt < T)[:, None] & c_ok[None, :], other=0.0, cache_modifier=".cg")
        total += tl.sum(tile, axis=0)
    return total


@triton.jit(noinline=True)
def sum_if_last(part_ptr, tile, T, C, counter_ptr, block, G, out_ptr, ROWS: tl.constexpr, BC: tl.constexpr,
                BT: tl.constexpr):
    """Called by every program after storing its [ROWS, BC] slice of the [T + groups, ROWS, C]
    partials (tile `tile` of channel block `block`, T tiles each): the last of its group
    sums the group into partial T + group, the last of those writes out[ROWS, C], the sum of
    the groups in order."""
    groups = (T + G - 1) // G
    counters = counter_ptr + block * (groups + 1)
    completed, group, first, size = group_ticket(counters, tile, T, G)
    if completed:
        rc = block * BC + tl.arange(0, BC)
        c_ok = rc < C
        for row in tl.static_range(ROWS):
            total = sum_tiles(part_ptr, first, size, row, C, rc, c_ok, ROWS, BT)
            tl.store(part_ptr + ((T + group).to(tl.int64) * ROWS + row) * C + rc, total, mask=c_ok)
        reset_ticket(counters, group)
        if last_ticket(counters, groups, groups):
            for row in tl.static_range(ROWS):
                total = sum_tiles(part_ptr, T, groups, row, C, rc, c_ok, ROWS, BT)
                tl.store(out_ptr + row * C + rc, total, mask=c_ok)
            reset_ticket(counters, groups)

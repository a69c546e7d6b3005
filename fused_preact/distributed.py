"""Synchronized BatchNorm statistics across processes (like nn.SyncBatchNorm).

Forward: each rank merges its partial statistics to one (count, mean, M2) per channel;
one all_gather exchanges them and the usual finalize merges the world's tiles (ranks
may have different batch sizes). Backward: one all_reduce of (sum g, sum g * xhat,
count) per BatchNorm gives the global means the BN backward subtracts; the gradients of
the BN affine parameters stay local sums (DDP averages them, as with nn.SyncBatchNorm).

Before any of that, each synchronised block exchanges a few numbers per rank (channels,
dtype, images, training flag) in one small all_gather, in train and in eval mode: ranks
that disagree all raise the same clear error instead of aborting inside the collective or
waiting forever for a rank that will not join, and the total batch decides whether there
is more than one value per channel (N=1 per rank is fine with two ranks; an empty local
batch joins with count 0). Like nn.SyncBatchNorm, this reads the gathered numbers on the
host, except while a CUDA graph is being captured.

Ops cannot take a ProcessGroup argument, so groups are registered here and the ops
carry an integer handle (0: no synchronisation).
"""
from __future__ import annotations


import torch
import torch.distributed as dist

_groups: list = [None]  # handle -> process group (None: the default group)


def group_handle(process_group) -> int:
    """A stable integer handle for `process_group` (None: the default world group)."""
    for handle, group in enumerate(_groups[1:], start=1):
        if group is process_group:
            return handle
    _groups.append(process_group)
    return len(_groups) - 1


def process_group(handle: int):
    return _groups[handle]


def sync_active(process_group_obj) -> bool:
    """Synchronise only when a multi-process group is initialised (as nn.SyncBatchNorm)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group_obj) > 1


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def agree(handle: int, x: torch.Tensor, training: bool) -> int | None:
    """The images (N) over all ranks of the group, after checking that every rank runs this
    block with the same channels, dtype and mode; None while a CUDA graph is captured (no
    host read then, as nn.SyncBatchNorm)."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    group = process_group(handle)
    local = torch.tensor([x.shape[1], _DTYPE_CODES.get(x.dtype, -1), x.shape[0], int(training)],
                         dtype=torch.int64, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = [t.tolist() for t in gathered]
    if len({(c, d, mode) for c, d, _, mode in table}) > 1:
        names = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}
        ranks = "; ".join(f"rank {r}: {c} channels, {names.get(d, 'other dtype')}, {'train' if mode else 'eval'} mode"
                          for r, (c, d, _, mode) in enumerate(table))
        raise ValueError(f"fused_preact: synchronised BatchNorm needs every rank to run the same block with the "
                         f"same channels, dtype and train/eval mode; {ranks}")
    return sum(n for _, _, n, _ in table)


def gather_partials(local_mean: torch.Tensor, local_var: torch.Tensor, count: int, handle: int) -> torch.Tensor:
    """[world, 3, C] (count, mean, M2) tiles, one per rank, from this rank's merged statistics
    (an empty local batch sends count 0 and zeros, not the NaN mean of nothing)."""
    group = process_group(handle)
    if count == 0:
        local_mean, local_var = torch.zeros_like(local_mean), torch.zeros_like(local_var)
    local = torch.stack([torch.full_like(local_mean, float(count)), local_mean, local_var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return torch.stack(gathered)


def global_grad_means(sums: torch.Tensor, count: int, handle: int) -> torch.Tensor:
    """(mean g, mean g * xhat) over the whole synchronised batch: one all_reduce."""
    buffer = torch.cat([sums.flatten(), sums.new_full((1,), float(count))])
    dist.all_reduce(buffer, group=process_group(handle))
    return buffer[:-1].view_as(sums) / buffer[-1]

"""Synchronized BatchNorm statistics across processes (like nn.SyncBatchNorm).

Forward: each rank merges its partial statistics to one (count, mean, M2) per channel;
one all_gather exchanges them and the usual finalize merges the world's tiles (ranks
may have different batch sizes). Backward: one all_reduce of (sum g, sum g * xhat,
count) per BatchNorm gives the global means the BN backward subtracts; the gradients of
the BN affine parameters stay local sums (DDP averages them, as with nn.SyncBatchNorm).

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


def gather_partials(local_mean: torch.Tensor, local_var: torch.Tensor, count: int, handle: int) -> torch.Tensor:
    """[world, 3, C] (count, mean, M2) tiles, one per rank, from this rank's merged statistics."""
    group = process_group(handle)
    local = torch.stack([torch.full_like(local_mean, float(count)), local_mean, local_var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return torch.stack(gathered)


def global_grad_means(sums: torch.Tensor, count: int, handle: int) -> torch.Tensor:
    """(mean g, mean g * xhat) over the whole synchronised batch: one all_reduce."""
    buffer = torch.cat([sums.flatten(), sums.new_full((1,), float(count))])
    dist.all_reduce(buffer, group=process_group(handle))
    return buffer[:-1].view_as(sums) / buffer[-1]

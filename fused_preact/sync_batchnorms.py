"""The synchronised BatchNorms a fused block takes over, and the local BatchNorms they stand for.

DistributedDataParallel recipes swap a model's BatchNorms for synchronised ones:
nn.SyncBatchNorm.convert_sync_batchnorm makes an nn.SyncBatchNorm of each nn.BatchNorm2d, and
timm's convert_sync_batchnorm (its train.py --sync-bn) a SyncBatchNormAct of each of its
BatchNormAct2ds: an nn.SyncBatchNorm that then applies the drop and act modules it took over
from the BatchNormAct2d, as BatchNormAct2d does. A fused block whose BatchNorms were all swapped
computes what they compute with its own synchronisation (unfused.sync_batchnorms_swapped_in);
convert verifies a block on one rank, where each is the local BatchNorm it stands for (local).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class LocalBatchNormAct(nn.BatchNorm2d):
    """timm's SyncBatchNormAct on one rank: BatchNorm, then its drop and act modules."""

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def is_timm_sync_batchnorm_act(cls: type) -> bool:
    # By name: fused_preact does not import timm (timm.layers.norm_act.SyncBatchNormAct).
    return cls.__name__ == "SyncBatchNormAct" and issubclass(cls, nn.SyncBatchNorm)


def synchronises(sync_cls: type, local_cls: type) -> bool:
    """Whether a module of sync_cls computes, synchronised, what one of local_cls computed."""
    if sync_cls is nn.SyncBatchNorm:
        return local_cls is nn.BatchNorm2d
    # timm's BatchNormAct2d (by name), or convert's stand-in for a SyncBatchNormAct (local)
    return is_timm_sync_batchnorm_act(sync_cls) and (local_cls is LocalBatchNormAct or
                                                     local_cls.__name__ == "BatchNormAct2d")


def local(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """A synchronised BatchNorm as the local one it is on one rank, holding the same parameters,
    buffers and submodules (timm's drop and act); any other module as it is. Raises for
    another subclass of nn.SyncBatchNorm: what it computes besides is unknown here."""
    if not isinstance(module, nn.SyncBatchNorm):
        return module
    if type(module) is nn.SyncBatchNorm:
        cls = nn.BatchNorm2d
    elif is_timm_sync_batchnorm_act(type(module)) and {"act", "drop"} <= set(module._modules):
        cls = LocalBatchNormAct
    else:
        raise ValueError(f"has a {type(module).__name__}, a subclass of nn.SyncBatchNorm that a fused block does not "
                         f"take over (it takes nn.SyncBatchNorm and timm's SyncBatchNormAct); for synchronised "
                         f"statistics, fused: fp.convert(model, sync_bn=True) on the model without it")
    stand_in = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                   device="meta")
    stand_in._parameters.update(module._parameters)
    stand_in._buffers.update(module._buffers)
    stand_in._modules.update(module._modules)
    return stand_in.train(module.training)

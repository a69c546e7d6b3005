"""A structural replica of timm's resnetv2 pre-activation blocks (timm needs torchvision,
which has no CPU build here). Attribute names, BatchNormAct2d (BN -> drop -> act) and the
forward follow timm/models/resnetv2.py; tests against real timm run where it is installed.
"""
import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, act_layer=nn.ReLU):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        # timm copies nn.BatchNorm2d's bookkeeping: count the batch, cumulative average for momentum=None.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or self.running_mean is None, factor, self.eps)
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm.layers.SyncBatchNormAct: what timm's convert_sync_batchnorm puts where a
    BatchNormAct2d was (timm's train.py --sync-bn), SyncBatchNorm -> drop -> act."""

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def convert_sync_batchnorm(module):
    """timm.layers.convert_sync_batchnorm: each BatchNormAct2d becomes a SyncBatchNormAct
    holding its act and drop, each other BatchNorm an nn.SyncBatchNorm (same tensors)."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        cls = SyncBatchNormAct if isinstance(module, BatchNormAct2d) else nn.SyncBatchNorm
        converted = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if isinstance(module, BatchNormAct2d):
            converted.act, converted.drop = module.act, module.drop
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child))
    return converted


class DownsampleConv(nn.Module):
    def __init__(self, in_chs, out_chs, stride):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.conv(x))


class DownsampleAvg(nn.Module):
    """avg_down ("d" models): average pooling (none without a stride), then a 1x1 conv."""

    def __init__(self, in_chs, out_chs, stride):
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, stride=1, bias=False)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.conv(self.pool(x)))


class PreActBasic(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1, act_layer=nn.ReLU, drop_path=None, avg_down=False):
        super().__init__()
        projection = DownsampleAvg if avg_down else DownsampleConv
        self.downsample = projection(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None
        self.norm1 = BatchNormAct2d(in_chs, act_layer)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.norm2 = BatchNormAct2d(out_chs, act_layer)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.drop_path = drop_path or nn.Identity()

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv2(self.norm2(self.conv1(x_preact)))
        return self.drop_path(x) + shortcut


class PreActBottleneck(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1, avg_down=False, drop_path=None):
        super().__init__()
        mid = out_chs // 4
        self.downsample = (DownsampleAvg if avg_down else DownsampleConv)(in_chs, out_chs, stride)
        self.norm1 = BatchNormAct2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm2 = BatchNormAct2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.norm3 = BatchNormAct2d(mid)
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.drop_path = drop_path or nn.Identity()

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return self.drop_path(x) + shortcut


class DropPath(nn.Module):
    """Stochastic depth as timm.layers.DropPath computes it: in training each image's branch
    is kept with probability 1 - drop_prob and then scaled by 1 / (1 - drop_prob), else zeroed;
    the identity in eval. Keeps every mask it drew (masks) for tests, unless told not to. Unlike timm's, it draws
    in float32 whatever x's dtype, so a float64 copy of a model draws what its float32 copy
    draws from the same seed (on a GPU, bernoulli_ may draw differently per dtype)."""

    def __init__(self, drop_prob=0.5, keep_masks=True):
        super().__init__()
        self.drop_prob = drop_prob
        self.masks = [] if keep_masks else None  # (None: torch.compile traces it; tolist() it does not)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(keep)
        if self.masks is not None:
            self.masks.append(mask.flatten().tolist())
        return x * mask.div_(keep).to(x.dtype)

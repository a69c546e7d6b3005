"""Pre-activation ResNets built from the fused blocks.

preact_resnet18/34/50/101/152: kuangliu/pytorch-cifar layout and state_dict keys
(conv1 stem, layer1..4, linear; no final BN, 4x4 average pool: 32x32 inputs).
preact_resnet110/164/1001: He et al. 2016 CIFAR networks (3x3 stem to 16 channels,
three stages of widths 16/32/64, final BN-ReLU, global average pool, linear);
110 uses basic blocks, 164 and 1001 bottlenecks.

Every builder takes backend=, sync_bn= / process_group= (synchronised BatchNorm, like
nn.SyncBatchNorm), and device= / dtype= (where and in what parameters and buffers are made, as
for nn.Conv2d). Consecutive blocks hand their conv-epilogue statistics to the next block's bn1
(nn.run_sequence: across the stages too), so only the first block needs a standalone statistics
pass; a block or stage with hooks is called as a module, so its hooks run.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn

from .nn import FusedSequential, PreActBlock, PreActBottleneck, run_sequence


def _make_layer(block, in_planes: int, planes: int, n_blocks: int, stride: int, backend, options):
    """A stage of blocks; options: the blocks' sync_bn, process_group, device and dtype."""
    layers = []
    for s in [stride] + [1] * (n_blocks - 1):
        layers.append(block(in_planes, planes, s, backend=backend, **options))
        in_planes = planes * block.expansion
    return FusedSequential(*layers), in_planes


class PreActResNet(nn.Module):
    """kuangliu/pytorch-cifar PreActResNet, keys conv1, layer1..4, linear."""

    def __init__(self, block, num_blocks, num_classes: int = 10, backend: Optional[str] = None,
                 sync_bn: bool = False, process_group=None, *, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        options = dict(sync_bn=sync_bn, process_group=process_group, **factory)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False, **factory)
        in_planes = 64
        self.layer1, in_planes = _make_layer(block, in_planes, 64, num_blocks[0], 1, backend, options)
        self.layer2, in_planes = _make_layer(block, in_planes, 128, num_blocks[1], 2, backend, options)
        self.layer3, in_planes = _make_layer(block, in_planes, 256, num_blocks[2], 2, backend, options)
        self.layer4, in_planes = _make_layer(block, in_planes, 512, num_blocks[3], 2, backend, options)
        self.linear = nn.Linear(512 * block.expansion, num_classes, **factory)

    def forward(self, x):
        out = self.conv1(x)
        out = run_sequence([self.layer1, self.layer2, self.layer3, self.layer4], out)
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))


class PreActResNetCifar(nn.Module):
    """He et al. 2016 CIFAR pre-activation ResNet, keys conv1, layer1..3, bn, linear."""

    def __init__(self, block, n_per_stage: int, num_classes: int = 10, backend: Optional[str] = None,
                 sync_bn: bool = False, process_group=None, *, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        options = dict(sync_bn=sync_bn, process_group=process_group, **factory)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False, **factory)
        in_planes = 16
        self.layer1, in_planes = _make_layer(block, in_planes, 16, n_per_stage, 1, backend, options)
        self.layer2, in_planes = _make_layer(block, in_planes, 32, n_per_stage, 2, backend, options)
        self.layer3, in_planes = _make_layer(block, in_planes, 64, n_per_stage, 2, backend, options)
        self.bn = nn.BatchNorm2d(in_planes, **factory)
        self.linear = nn.Linear(in_planes, num_classes, **factory)

    def forward(self, x):
        out = self.conv1(x)
        out = run_sequence([self.layer1, self.layer2, self.layer3], out)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.flatten(1))


def preact_resnet18(num_classes=10, backend=None, sync_bn=False, process_group=None, *, device=None, dtype=None):
    return PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes, backend, sync_bn, process_group,
                        device=device, dtype=dtype)


def preact_resnet34(num_classes=10, backend=None, sync_bn=False, process_group=None, *, device=None, dtype=None):
    return PreActResNet(PreActBlock, [3, 4, 6, 3], num_classes, backend, sync_bn, process_group,
                        device=device, dtype=dtype)


def preact_resnet50(num_classes=10, backend=None, sync_bn=False, process_group=None, *, device=None, dtype=None):
    return PreActResNet(PreActBottleneck, [3, 4, 6, 3], num_classes, backend, sync_bn, process_group,
                        device=device, dtype=dtype)


def preact_resnet101(num_classes=10, backend=None, sync_bn=False, process_group=None, *, device=None, dtype=None):
    return PreActResNet(PreActBottleneck, [3, 4, 23, 3], num_classes, backend, sync_bn, process_group,
                        device=device, dtype=dtype)


def preact_resnet152(num_classes=10, backend=None, sync_bn=False, process_group=None, *, device=None, dtype=None):
    return PreActResNet(PreActBottleneck, [3, 8, 36, 3], num_classes, backend, sync_bn, process_group,
                        device=device, dtype=dtype)


def preact_resnet110(num_classes=10, backend=None, sync_bn=False, process_group=None, *, device=None, dtype=None):
    """Depth 6n + 2, n = 18 basic blocks per stage."""
    return PreActResNetCifar(PreActBlock, 18, num_classes, backend, sync_bn, process_group,
                             device=device, dtype=dtype)


def preact_resnet164(num_classes=10, backend=None, sync_bn=False, process_group=None, *, device=None, dtype=None):
    """Depth 9n + 2, n = 18 bottlenecks per stage."""
    return PreActResNetCifar(PreActBottleneck, 18, num_classes, backend, sync_bn, process_group,
                             device=device, dtype=dtype)


def preact_resnet1001(num_classes=10, backend=None, sync_bn=False, process_group=None, *, device=None, dtype=None):
    """Depth 9n + 2, n = 111 bottlenecks per stage."""
    return PreActResNetCifar(PreActBottleneck, 111, num_classes, backend, sync_bn, process_group,
                             device=device, dtype=dtype)

"""Eager pre-activation blocks as users have them: the oracles of the tests and the
baselines of the benchmarks, and the models `convert` is shown on in README.

kuangliu/pytorch-cifar PreActBlock / PreActBottleneck / PreActResNet (projection reads
relu(bn1(x))), the RobustBench / fast-adversarial variants (projection reads raw x), the
wide ResNet block of robustness code, the paper's CIFAR network, and blocks of the same
layout that compute something else (which `convert` must leave alone). randomize_bn gives
BatchNorms non-default statistics.
"""
import torch
import torch.nn.functional as F
from torch import nn


def randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics: defaults (weight 1, bias 0,
    mean 0, var 1) hide mistakes, e.g. a block that skips a BN looks equivalent."""
    g = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            with torch.no_grad():
                if bn.weight is not None:
                    bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    bn.bias.copy_(torch.randn(c, generator=g) * 0.5)
                if bn.running_mean is not None:
                    bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)


class PreActBlock(nn.Module):
    expansion = 1
    shortcut_reads_input = False  # kuangliu: the projection reads relu(bn1(x))

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x if self.shortcut_reads_input else out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    expansion = 4
    shortcut_reads_input = False

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x if self.shortcut_reads_input else out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class RawShortcutPreActBlock(PreActBlock):
    """RobustBench / fast-adversarial PreActBlock: the projection reads raw x."""

    shortcut_reads_input = True


class RawShortcutPreActBottleneck(PreActBottleneck):
    """The bottleneck with the projection on raw x (RobustBench-style)."""

    shortcut_reads_input = True


class DropoutPreActBlock(PreActBlock):
    """Same layout, different computation (dropout between the convs): must not be swapped."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__(in_planes, planes, stride)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.drop(self.conv1(out))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class NoBN2PreActBlock(PreActBlock):
    """Same layout but bn2 is skipped in forward: must be caught by the numerical probe."""

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.conv1(out)))
        return out + shortcut


class WideBasicBlock(nn.Module):
    """The wide ResNet block (Zagoruyko & Komodakis 2016) as robustness code writes it
    (RobustBench's and TRADES' wide_resnet.py BasicBlock): ReLU modules, a 1x1 convShortcut
    on relu(bn1(x)) where width or stride change (else None: the identity on raw x), called
    after the residual branch; dropout between the convs where drop_rate > 0."""

    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, kernel_size=1,
                                                                   stride=stride, padding=0, bias=False)

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return (x if self.equalInOut else self.convShortcut(activated)) + out


class PreActResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class PreActResNetCifar(nn.Module):
    """He et al. 2016 CIFAR network (keys of fused_preact.models.PreActResNetCifar)."""

    def __init__(self, block, n_per_stage, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (n_per_stage - 1):
                blocks.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.linear(out.flatten(1))

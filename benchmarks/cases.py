"""What the suite measures: block shapes and model steps.

Block cases are (name, block kind, in_planes, planes, stride, batch, H=W), names unique
(results are keyed by them). CIFAR shapes follow PreActResNet-18 / ResNet-164 stages;
ImageNet shapes the ResNet-50 stages; "tiny-overhead" measures the host time per block.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockCase:
    name: str
    kind: str  # "basic" | "bottleneck"
    in_planes: int
    planes: int
    stride: int
    batch: int
    hw: int

    def convs(self) -> list[tuple[int, int, int, int, int, int]]:
        """(C_in, C_out, kernel, stride, padding, H) of each conv of the block, projection
        included, each distinct conv once."""
        hw, s = self.hw, self.stride
        if self.kind == "basic":
            convs = [(self.in_planes, self.planes, 3, s, 1, hw), (self.planes, self.planes, 3, 1, 1, hw // s)]
        else:
            convs = [(self.in_planes, self.planes, 1, 1, 0, hw), (self.planes, self.planes, 3, s, 1, hw),
                     (self.planes, 4 * self.planes, 1, 1, 0, hw // s)]
        projection = self.projection()
        return list(dict.fromkeys(convs + ([projection] if projection else [])))

    def projection(self):
        """(C_in, C_out, kernel, stride, padding, H) of the projection shortcut (it reads
        relu(bn1(x)), as the first conv does), or None for an identity block."""
        out = self.planes if self.kind == "basic" else 4 * self.planes
        if self.stride == 1 and self.in_planes == out:
            return None
        return (self.in_planes, out, 1, self.stride, 0, self.hw)


GPU_BLOCKS = [
    # PreActResNet-18 on CIFAR (N=128 and 256): identity and projection blocks per stage.
    BlockCase("r18-s1-id", "basic", 64, 64, 1, 256, 32),
    BlockCase("r18-s1-id-n128", "basic", 64, 64, 1, 128, 32),
    BlockCase("r18-s2-proj", "basic", 64, 128, 2, 128, 32),
    BlockCase("r18-s2-id", "basic", 128, 128, 1, 128, 16),
    BlockCase("r18-s3-id", "basic", 256, 256, 1, 128, 8),
    # ResNet-164 on CIFAR (bottleneck, widths 16/32/64 x4).
    BlockCase("r164-s1-id", "bottleneck", 64, 16, 1, 128, 32),
    BlockCase("r164-s2-proj", "bottleneck", 64, 32, 2, 128, 32),
    BlockCase("r164-s3-id", "bottleneck", 256, 64, 1, 128, 8),
    # ImageNet ResNet-50 stages (N=64).
    BlockCase("in-r50-56", "bottleneck", 256, 64, 1, 64, 56),
    BlockCase("in-r50-28", "bottleneck", 512, 128, 1, 64, 28),
    BlockCase("in-r50-14", "bottleneck", 1024, 256, 1, 64, 14),
    BlockCase("in-r50-7", "bottleneck", 2048, 512, 1, 64, 7),
    BlockCase("in-r50-28-proj", "bottleneck", 256, 128, 2, 64, 56),
    # Host overhead: so little work that the time is launches, dispatch and Python.
    BlockCase("tiny-overhead", "basic", 16, 16, 1, 2, 8),
]

# Small enough for a 2-core CPU: the default when no GPU is present.
CPU_BLOCKS = [
    BlockCase("cpu-basic-id", "basic", 32, 32, 1, 16, 16),
    BlockCase("cpu-basic-proj", "basic", 32, 64, 2, 16, 16),
    BlockCase("cpu-bottleneck-id", "bottleneck", 64, 16, 1, 16, 16),
    BlockCase("tiny-overhead", "basic", 16, 16, 1, 2, 8),
]

# (model name, batch): one training step (forward + backward + SGD).
GPU_MODELS = [("preact_resnet18", 128), ("preact_resnet164", 128), ("preact_resnet1001", 64)]
CPU_MODELS = [("preact_resnet18", 8)]

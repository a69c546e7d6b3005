"""float32 gradients on a trained state: the fused blocks no further from float64 than
2x eager PyTorch's own float32 distance (plus a floor of 1e-5 relative L2).

A freshly initialised network hides error growth: after SGD steps the statistics drift
and a ReLU input can sit within float32 error of zero, where one flipped mask moves every
earlier gradient by ~1e-3: a forward twice as far from float64 as eager's flips twice as
often. Each network is trained for two steps in float64 (eager), then the
gradients of one batch at that state are compared: eager float64 (truth), eager float32,
and the converted network in float32 on each backend.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_preact as fp
from fused_preact.testing import (PreActBlock, PreActBottleneck, PreActResNet, RawShortcutPreActBlock,
                          RawShortcutPreActBottleneck)
from helpers import DEVICE

FLOOR = 1e-5
# A state on which the old reference backend (channels_last oneDNN convolutions on the CPU)
# flipped a mask where eager did not. Near a tie either float32 run's mask is a coin toss
# (seed 3 flips even now, as eager could), so the cause is pinned by the test after this one.
SEED = 2
BLOCKS = {("basic", "preact"): PreActBlock, ("basic", "input"): RawShortcutPreActBlock,
          ("bottleneck", "preact"): PreActBottleneck, ("bottleneck", "input"): RawShortcutPreActBottleneck}


class SmallNet(nn.Module):
    """Stem, an identity block, a strided projection block, an identity block, head."""

    def __init__(self, block, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        out = width * block.expansion
        self.layers = nn.Sequential(block(width, width, 1), block(out, 2 * width, 2),
                                    block(2 * width * block.expansion, 2 * width, 1))
        self.linear = nn.Linear(2 * width * block.expansion, 10)

    def forward(self, x):
        out = self.layers(self.conv1(x))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def network(block, width):
    """kuangliu's PreActResNet [1, 1, 1, 1] (width 64) or a smaller net of the same kind."""
    return PreActResNet(block, [1, 1, 1, 1]) if width == 64 else SmallNet(block, width)


def trained(block, width, hw, batch, seed=SEED):
    torch.manual_seed(seed)
    model = network(block, width).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        x = torch.randn(batch, 3, hw, hw, dtype=torch.float64)
        y = torch.randint(0, 10, (batch,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, torch.randn(batch, 3, hw, hw, dtype=torch.float64), torch.randint(0, 10, (batch,))


def gradients(model, x, y, dtype, device="cpu"):
    model = model.to(device=device, dtype=dtype)
    F.cross_entropy(model(x.to(device=device, dtype=dtype)), y.to(device)).backward()
    return {name: p.grad.double().cpu() for name, p in model.named_parameters()}


# (backend, width, H=W, batch): kuangliu's CIFAR network at N=4 (where a ReLU input within
# float32 error of zero was first seen: the oneDNN channels_last convolution doubled the
# forward error); the interpreter is slow, so triton runs a smaller net.
BACKENDS = [("reference", 64, 32, 4), pytest.param("triton", 4, 8, 4, marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend,width,hw,batch", BACKENDS)
@pytest.mark.parametrize("kind,source", list(BLOCKS))
def test_float32_gradients_on_trained_state_earned(kind, source, backend, width, hw, batch):
    model, x, y = trained(BLOCKS[kind, source], width, hw, batch)
    truth = gradients(copy.deepcopy(model), x, y, torch.float64)
    eager = gradients(copy.deepcopy(model), x, y, torch.float32)
    converted, report = fp.convert(copy.deepcopy(model), backend=backend, return_report=True)
    assert report.swapped and not report.left, report
    fused = gradients(converted, x, y, torch.float32, DEVICE if backend == "triton" else "cpu")

    def err(a, t):
        return ((a - t).norm() / t.norm().clamp_min(1e-30)).item()
    bad = {name: f"fused {err(fused[name], t):.1e} vs eager {err(eager[name], t):.1e}"
           for name, t in truth.items() if not err(fused[name], t) <= 2 * err(eager[name], t) + FLOOR}
    assert not bad, f"float32 gradients over 2x eager's error + {FLOOR:g}: {bad}"


@pytest.mark.parametrize("kernel,channels,hw", [(3, 64, 32), (3, 128, 16), (1, 256, 8)])
def test_reference_forward_conv_as_accurate_as_eager(kernel, channels, hw):
    """The reference unit's float32 convolution is no further from float64 than eager's
    NCHW nn.Conv2d (oneDNN's channels_last 3x3 convolution on the CPU was 2-2.6x further)."""
    torch.manual_seed(0)
    x = torch.randn(4, channels, hw, hw)
    w = torch.randn(channels, channels, kernel, kernel) / (channels * kernel * kernel) ** 0.5
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    args = (None, None, w, None, [1, 1], [kernel // 2] * 2, 1e-5, True, False, None, None, None, None, "reference")
    truth = fp.ops.bn_relu_conv(x.double(), mean.double(), var.double(), *[a.double() if isinstance(a, torch.Tensor) else a for a in args])[0]
    ours = fp.ops.bn_relu_conv(x, mean, var, *args)[0]
    activation = torch.relu((x - mean[None, :, None, None]) * torch.rsqrt(var + 1e-5)[None, :, None, None])
    eager = F.conv2d(activation, w, padding=kernel // 2)

    def err(a):
        return ((a.double() - truth).norm() / truth.norm()).item()
    assert err(ours) <= 1.2 * err(eager), f"reference {err(ours):.2e} vs eager {err(eager):.2e}"

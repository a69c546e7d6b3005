"""NaN and Inf propagate as in eager PyTorch (F.relu keeps NaN; its gradient passes at NaN),
on every backend, forward and backward: a NaN input never gives a NaN-free output."""
import pytest
import torch

import fused_preact as fp
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import PreActBottleneck as EagerBottleneck
from helpers import DEVICE, use_backend_or_skip


@pytest.mark.parametrize("backend", fp.dispatch.BACKEND_NAMES)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates_like_eager(backend, kind, bad, monkeypatch):
    eager_cls, ours_cls = (EagerBlock, fp.PreActBlock) if kind == "basic" else (EagerBottleneck, fp.PreActBottleneck)
    torch.manual_seed(0)
    channels = 4 * ours_cls.expansion  # identity shortcut
    eager = eager_cls(channels, 4, 1).eval()
    ours = ours_cls(channels, 4, 1, backend=backend).eval()
    ours.load_state_dict(eager.state_dict())
    x = torch.randn(2, channels, 6, 6)
    x[0, 1, 2, 3] = bad  # eval mode: the statistics stay finite, the value travels through relu
    use_backend_or_skip(backend, monkeypatch, x.to(DEVICE))
    device = DEVICE
    results = []
    for model in (eager.to(device), ours.to(device)):
        xi = x.clone().to(device).requires_grad_(True)
        out = model(xi)
        out.backward(torch.ones_like(out))
        results.append((out.detach().cpu(), xi.grad.cpu()))
    (ref_out, ref_dx), (out, dx) = results
    assert torch.isnan(ref_out).any() or torch.isinf(ref_out).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), "NaN positions of the output"
    assert torch.equal(torch.isinf(out), torch.isinf(ref_out)), "Inf positions of the output"
    assert torch.equal(torch.isnan(dx), torch.isnan(ref_dx)), "NaN positions of the input gradient"

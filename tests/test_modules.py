"""Fused modules vs the eager definitions: outputs, gradients, running stats, training steps."""

import copy

import pytest
import torch
from torch import nn

import fused_preact as fp
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import PreActBottleneck as EagerBottleneck
from fused_preact.testing import PreActResNet as EagerResNet
from fused_preact.testing import RawShortcutPreActBlock
from fused_preact.testing import randomize_bn
from helpers import assert_close, assert_within_eager_error, use_backend_or_skip

BLOCKS = {"basic": (fp.PreActBlock, EagerBlock), "bottleneck": (fp.PreActBottleneck, EagerBottleneck)}
# (in_planes, planes, stride): identity, channel projection, strided projection, odd sizes.
CONFIGS = [(8, 8, 1), (5, 8, 1), (8, 6, 2), (3, 5, 2)]


def make_pair(kind, in_planes, planes, stride, dtype, shortcut="preact"):
    ours_cls, eager_cls = BLOCKS[kind]
    if shortcut == "input":
        eager_cls = RawShortcutPreActBlock
    eager = eager_cls(in_planes, planes, stride).to(dtype)
    randomize_bn(eager)
    ours = ours_cls(in_planes, planes, stride, shortcut=shortcut).to(dtype)
    ours.load_state_dict(eager.state_dict())
    return ours, eager


def run_step(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    # A loss that weights outputs unevenly, so every gradient term matters.
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    loss.backward()
    return out, x.grad


def compare_models(ours, eager, dtype, what):
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
        assert_close(p.grad, q.grad, dtype, f"{what}: grad of {name}")
    for (name, b), (_, c) in zip(ours.named_buffers(), eager.named_buffers()):
        if b.is_floating_point():
            assert_close(b, c, dtype, f"{what}: buffer {name}")
        else:
            assert torch.equal(b, c), f"{what}: buffer {name}: {b} != {c}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("in_planes,planes,stride", CONFIGS)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_matches_eager(kind, in_planes, planes, stride, training, dtype):
    if kind == "bottleneck" and in_planes == planes * 4:
        pytest.skip("identity case covered by (8, 2, 1) below")
    ours, eager = make_pair(kind, in_planes, planes, stride, dtype)
    ours.train(training), eager.train(training)
    truth = copy.deepcopy(eager).double()
    x = torch.randn(3, in_planes, 7, 7, dtype=dtype) * 2 + 0.5
    out, dx = run_step(ours, x)
    ref, ref_dx = run_step(eager, x)
    if dtype == torch.float64:
        assert_close(out, ref, dtype, "output")
        assert_close(dx, ref_dx, dtype, "grad x")
        compare_models(ours, eager, dtype, kind)
        return
    # float32: against float64, within twice eager float32's own error.
    results = [("output", out, ref), ("grad x", dx, ref_dx)]
    truths = list(run_step(truth, x.double()))
    results += [(f"grad of {n}", p.grad, q.grad) for (n, p), (_, q) in zip(ours.named_parameters(),
                                                                             eager.named_parameters())]
    truths += [p.grad for p in truth.parameters()]
    results += [(f"buffer {n}", b, c) for (n, b), (_, c) in zip(ours.named_buffers(), eager.named_buffers())]
    truths += list(truth.buffers())
    for (what, got, eager_got), expected in zip(results, truths):
        if got.is_floating_point():
            assert_within_eager_error(got, eager_got, expected, f"{kind}: {what}")
        else:
            assert torch.equal(got, eager_got), f"{kind}: {what}"


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_bottleneck_identity_and_raw_shortcut(kind):
    dtype = torch.float64
    planes = 2
    in_planes = planes * BLOCKS[kind][0].expansion
    ours, eager = make_pair(kind, in_planes, planes, 1, dtype)  # identity shortcut
    x = torch.randn(2, in_planes, 6, 6, dtype=dtype)
    assert_close(run_step(ours, x)[1], run_step(eager, x)[1], dtype, "identity grad x")
    compare_models(ours, eager, dtype, "identity")


@pytest.mark.parametrize("request_", ["x only", "parameters only", "x without grad", "twice, graph retained"])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_identity_gradient_joined_in_the_first_unit(kind, request_):
    """The identity path's gradient reaches x through the first unit's backward (added in its
    dx kernel, not by autograd): right whichever gradients are asked for, and how often."""
    dtype = torch.float64
    planes = 3
    in_planes = planes * BLOCKS[kind][0].expansion
    ours, eager = make_pair(kind, in_planes, planes, 1, dtype)
    x = torch.randn(2, in_planes, 5, 5, dtype=dtype) * 2 + 0.5
    got, expected = [], []
    for model, grads in ((ours, got), (eager, expected)):
        xs = x.clone().requires_grad_(request_ != "x without grad")
        out = model(xs)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum()
        params = list(model.parameters())
        wanted = {"x only": [xs], "parameters only": params, "x without grad": params,
                  "twice, graph retained": [xs] + params}[request_]
        grads += torch.autograd.grad(loss, wanted, retain_graph=True)
        if request_ == "twice, graph retained":
            grads += torch.autograd.grad(loss * 2, wanted)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, dtype, f"gradient {i}")


@pytest.mark.parametrize("training", [True, False])
def test_raw_input_shortcut_matches_robustbench_block(training):
    dtype = torch.float64
    ours, eager = make_pair("basic", 4, 6, 2, dtype, shortcut="input")
    ours.train(training), eager.train(training)
    x = torch.randn(2, 4, 9, 9, dtype=dtype)
    out, dx = run_step(ours, x)
    ref, ref_dx = run_step(eager, x)
    assert_close(out, ref, dtype, "output")
    assert_close(dx, ref_dx, dtype, "grad x")
    compare_models(ours, eager, dtype, "raw shortcut")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_fused_unit_bn_options(momentum, affine, track):
    """FusedBNReLUConv2d == conv(relu(bn(x))) for every nn.BatchNorm2d option, over steps."""
    dtype = torch.float64
    ours = fp.FusedBNReLUConv2d(5, 7, 3, stride=2, momentum=momentum, affine=affine,
                                track_running_stats=track, dtype=dtype)
    bn = nn.BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    conv = nn.Conv2d(5, 7, 3, 2, 1, bias=False, dtype=dtype)
    bn.load_state_dict(ours.bn.state_dict())
    conv.load_state_dict(ours.conv.state_dict())
    eager = nn.Sequential(bn, nn.ReLU(), conv)
    for step in range(3):
        for m in (ours, eager):
            m.train(step < 2)  # two training steps, then eval
        x = torch.randn(2, 5, 7, 7, dtype=dtype) + step
        out, dx = run_step(ours, x)
        ref, ref_dx = run_step(eager, x)
        assert_close(out, ref, dtype, f"step {step} output")
        assert_close(dx, ref_dx, dtype, f"step {step} grad x")
        assert_close(ours.conv.weight.grad, conv.weight.grad, dtype, "grad conv")
        if track:
            assert_close(ours.bn.running_mean, bn.running_mean, dtype, "running_mean")
            assert_close(ours.bn.running_var, bn.running_var, dtype, "running_var")
            assert torch.equal(ours.bn.num_batches_tracked, bn.num_batches_tracked)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cumulative_running_statistics_take_the_first_batch_exactly(backend, monkeypatch):
    """momentum=None, first batch: nn.BatchNorm2d's running statistics become the batch's
    ((1 - 1) * old + 1 * new). Far from the old values, old + 1 * (new - old) is one rounding
    of the old value off (here 1e4's: 1e-3). Every update path: the first block's statistics
    pass, a conv epilogue's for the next unit, and the chain's hand-off to the next block."""
    use_backend_or_skip(backend, monkeypatch, torch.zeros(1, 4, 4, 4))
    torch.manual_seed(0)
    truth = nn.Sequential(EagerBlock(4, 4), EagerBlock(4, 4)).double()
    for bn in truth.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
            bn.running_mean.fill_(-1e4), bn.running_var.fill_(1e4)
    eager = copy.deepcopy(truth).float()
    ours = fp.convert(copy.deepcopy(truth).float(), backend=backend)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    for model in (truth, eager, ours):
        run_step(model, x.to(next(model.parameters()).dtype))
    for (name, expected), theirs, got in zip(truth.named_buffers(), eager.buffers(), ours.buffers()):
        if expected.is_floating_point():
            assert_within_eager_error(got, theirs, expected, name)
        else:
            assert torch.equal(got, theirs), name


def test_fused_unit_residual():
    dtype = torch.float64
    ours = fp.FusedBNReLUConv2d(4, 6, 1, dtype=dtype)
    x = torch.randn(2, 4, 5, 5, dtype=dtype)
    r = torch.randn(2, 6, 5, 5, dtype=dtype, requires_grad=True)
    out = ours(x, r)
    ref = ours.conv(torch.relu(nn.functional.batch_norm(
        x, None, None, ours.bn.weight, ours.bn.bias, True, 0.0, ours.bn.eps))) + r
    assert_close(out, ref, dtype, "with residual")
    out.sum().backward()
    assert_close(r.grad, torch.ones_like(r), dtype, "grad residual")


def test_sgd_steps_match_eager():
    """Five SGD steps of a 3-block network: parameters and running stats track eager."""
    dtype = torch.float64
    torch.manual_seed(0)
    eager = nn.Sequential(EagerBlock(3, 4, 1), EagerBlock(4, 4, 2), EagerBottleneck(4, 2, 1))
    ours = nn.Sequential(fp.PreActBlock(3, 4, 1), fp.PreActBlock(4, 4, 2), fp.PreActBottleneck(4, 2, 1))
    ours.to(dtype), eager.to(dtype)
    ours.load_state_dict(eager.state_dict())
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        x = torch.randn(4, 3, 8, 8, dtype=dtype)
        for model, opt in ((eager, opt_e), (ours, opt_o)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, p), (_, q) in zip(ours.state_dict().items(), eager.state_dict().items()):
        if p.is_floating_point():
            assert_close(p, q, dtype, f"after 5 steps: {name}")
        else:
            assert torch.equal(p, q), name


def test_preact_resnet18_matches_kuangliu():
    dtype = torch.float32
    torch.manual_seed(0)
    eager = EagerResNet(EagerBlock, [2, 2, 2, 2])
    randomize_bn(eager)
    ours = fp.models.preact_resnet18()
    assert list(ours.state_dict()) == list(eager.state_dict())
    ours.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out, dx = run_step(ours, x)
    ref, ref_dx = run_step(eager, x)
    assert_close(out, ref, dtype, "logits", atol=1e-4, rtol=1e-3)
    assert_close(dx, ref_dx, dtype, "grad x", atol=1e-4, rtol=1e-3)
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
        assert_close(p.grad, q.grad, dtype, name, atol=1e-3, rtol=1e-3)
    for (name, b), (_, c) in zip(ours.named_buffers(), eager.named_buffers()):
        if b.is_floating_point():
            assert_close(b, c, dtype, name)


def test_state_dict_round_trip():
    eager = EagerResNet(EagerBottleneck, [1, 1, 1, 1])
    randomize_bn(eager)
    ours = fp.models.PreActResNet(fp.PreActBottleneck, [1, 1, 1, 1])
    ours.load_state_dict(eager.state_dict(), strict=True)
    back = EagerResNet(EagerBottleneck, [1, 1, 1, 1])
    back.load_state_dict(ours.state_dict(), strict=True)
    for (k, a), (_, b) in zip(back.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), k


FACTORY_BUILDS = {"basic": lambda **factory: fp.PreActBlock(4, 6, 2, **factory),
                  "bottleneck": lambda **factory: fp.PreActBottleneck(8, 3, 2, **factory),
                  "preact_resnet18": lambda **factory: fp.models.preact_resnet18(**factory),
                  "preact_resnet164": lambda **factory: fp.models.preact_resnet164(**factory)}


@pytest.mark.parametrize("build", FACTORY_BUILDS)
def test_device_and_dtype_make_every_tensor_there(build):
    """device= / dtype= as nn.Conv2d and nn.BatchNorm2d take them: every parameter and
    floating buffer made on that device in that dtype (num_batches_tracked stays int64),
    the state_dict otherwise that of the default build."""
    default = FACTORY_BUILDS[build]().state_dict()
    made = FACTORY_BUILDS[build](device="meta", dtype=torch.float16).state_dict()
    assert [(k, v.shape) for k, v in made.items()] == [(k, v.shape) for k, v in default.items()]
    for key, tensor in made.items():
        expected = torch.int64 if key.endswith("num_batches_tracked") else torch.float16
        assert (tensor.device.type, tensor.dtype) == ("meta", expected), key


def test_a_block_made_in_float64_computes_as_eager():
    ours = fp.PreActBlock(4, 6, 2, backend="reference", dtype=torch.float64)
    eager = EagerBlock(4, 6, 2).double()
    randomize_bn(eager)
    ours.load_state_dict(eager.state_dict())
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    for got, expected in zip(run_step(ours, x), run_step(eager, x)):
        assert_close(got, expected, torch.float64, "block made in float64")
    compare_models(ours, eager, torch.float64, "block made in float64")


@pytest.mark.parametrize("name,params_m", [("preact_resnet164", 1.7), ("preact_resnet1001", 10.2)])
def test_paper_model_sizes(name, params_m):
    """Parameter counts of He et al. 2016, Table 2 (1.7M, 10.2M), within 2%: the paper
    rounds, and implementations differ in small details (10.33M here for 1001)."""
    model = getattr(fp.models, name)()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - params_m) / params_m < 0.02, params


def test_paper_cifar_net_matches_eager():
    """The paper's CIFAR layout (here n=2 bottlenecks per stage) against an eager twin."""
    from fused_preact.testing import PreActResNetCifar
    torch.manual_seed(0)
    eager = PreActResNetCifar(EagerBottleneck, 2)
    randomize_bn(eager)
    ours = fp.models.PreActResNetCifar(fp.PreActBottleneck, 2)
    assert list(ours.state_dict()) == list(eager.state_dict())
    ours.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 16, 16)
    out, dx = run_step(ours, x)
    ref, ref_dx = run_step(eager, x)
    assert_close(out, ref, torch.float32, "logits", atol=1e-4, rtol=1e-3)
    assert_close(dx, ref_dx, torch.float32, "grad x", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kind,in_planes,planes,stride", [("basic", 16, 16, 1), ("basic", 16, 32, 2),
                                                          ("bottleneck", 32, 8, 1)])
def test_saved_activations_at_most_55_percent_of_eager(kind, in_planes, planes, stride):
    """Autograd keeps x and t (pre-BN) only; eager keeps x, relu(bn1 x), t, relu(bn2 t)."""
    from benchmarks.run import saved_activation_bytes
    ours, eager = make_pair(kind, in_planes, planes, stride, torch.float32)
    x = torch.randn(4, in_planes, 16, 16, requires_grad=True)
    ratio = saved_activation_bytes(ours, x) / saved_activation_bytes(eager, x)
    assert ratio <= 0.55, ratio


@pytest.mark.parametrize("in_planes,planes,stride,hw", [(32, 64, 2, 16), (256, 256, 1, 8), (16, 16, 1, 8)])
def test_saved_activations_under_autocast_at_most_55_percent_of_eager(in_planes, planes, stride, hw):
    """Projection blocks too keep x and t only, also under autocast, where each conv saves a
    bf16 copy of its weight on both sides (parameter data, not activations)."""
    from benchmarks.run import saved_activation_bytes
    ours, eager = make_pair("basic", in_planes, planes, stride, torch.float32)
    x = torch.randn(16, in_planes, hw, hw).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ratio = saved_activation_bytes(ours, x.requires_grad_(True)) / saved_activation_bytes(eager, x)
    assert ratio <= 0.55, ratio


def test_output_is_channels_last_and_any_input_layout_works():
    ours, eager = make_pair("basic", 4, 4, 1, torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for layout in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        out = ours(layout)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close(out, eager(layout), torch.float64, "layout")

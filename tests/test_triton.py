"""The triton backend beyond the op-by-op conformance suite (tests/test_conformance.py):
statistics with large means and many tiles, determinism, edge shapes, and whole blocks and
networks against their eager twins (CPU: interpreter; GPU: compiled)."""
import copy

import pytest
import torch
from torch import nn

import fused_preact as fp
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import PreActBottleneck as EagerBottleneck
from fused_preact.testing import RawShortcutPreActBlock
from fused_preact import ops
from fused_preact.testing import randomize_bn
from helpers import DEVICE, assert_close


def unit_inputs(c, k, kernel, stride, pad, hw, n, dtype, mean_shift=1.0):
    x = (torch.randn(n, c, hw, hw) * 2 + mean_shift).to(dtype)
    if torch.rand(()) < 0.5:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(k, c, kernel, kernel) * (2.0 / (c * kernel * kernel)) ** 0.5).to(dtype)
    mean = x.float().mean((0, 2, 3))
    var = x.float().var((0, 2, 3), unbiased=False)
    gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
    p = (hw + 2 * pad - kernel) // stride + 1
    residual = torch.randn(n, k, p, p).to(dtype)
    return tuple(t.to(DEVICE) for t in (x, mean, var, gamma, beta, w, residual))


@pytest.mark.parametrize("channels", [24, 200])  # 200: more than one block of channels
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_stats_and_running_update_large_mean(momentum, channels, poisoned):
    """|mean| = 1e3 >> std = 1: statistics still match nn.BatchNorm2d, and the op counts the
    batch once (momentum=None reads that count: every channel gets the same factor)."""
    x = torch.randn(3, channels, 9, 9, device=DEVICE) + 1e3
    bn = nn.BatchNorm2d(channels, momentum=momentum).to(DEVICE)
    rm, rv, nbt = (t.to(DEVICE) for t in (torch.randn(channels), torch.rand(channels) + 0.5, torch.tensor(3)))
    bn.running_mean.copy_(rm), bn.running_var.copy_(rv), bn.num_batches_tracked.copy_(nbt)
    bn(x)  # eager: increments num_batches_tracked to 4, updates running stats
    with poisoned:
        mean, var = ops.batch_stats(x, rm, rv, nbt, momentum, "triton")
    assert nbt.item() == bn.num_batches_tracked.item() == 4  # the op counted the batch
    assert_counters_reset()
    assert_close(mean, x.mean((0, 2, 3)), torch.float32, "mean", atol=1e-4, rtol=1e-6)
    assert_close(var, x.var((0, 2, 3), unbiased=False), torch.float32, "var", atol=2e-3, rtol=2e-3)
    assert_close(rm, bn.running_mean, torch.float32, "running_mean", atol=1e-4, rtol=1e-6)
    assert_close(rv, bn.running_var, torch.float32, "running_var", atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("tiles,channels", [(300, 200), (1000, 24), (7, 3)])
def test_finalize_merges_many_tiles_and_channel_blocks(tiles, channels, poisoned):
    """Several steps over the tiles and several channel programs (real networks have
    thousands of tiles): the merge matches a float64 merge of the same partials."""
    counts = torch.randint(1, 129, (tiles, 1, channels)).float()
    means = torch.randn(tiles, 1, channels) * 3 + 5
    m2 = torch.rand(tiles, 1, channels) * counts
    partials = torch.cat([counts, means, m2], dim=1).to(DEVICE)
    with poisoned:
        mean, var = ops.bn_finalize(partials, None, None, None, 0.1, "triton")
    ref_mean, ref_var = ops.bn_finalize(partials.double(), None, None, None, 0.1, "reference")
    assert_close(mean, ref_mean, torch.float32, "mean", atol=1e-5, rtol=1e-5)
    assert_close(var, ref_var, torch.float32, "var", atol=1e-4, rtol=1e-4)


def assert_counters_reset():
    """Every merge ticket is back at zero after a launch (no memset launch before the next)."""
    from fused_preact.backends.triton.merge import _kept
    assert _kept and all(int(counters.abs().sum()) == 0 for counters, _ in _kept.values())


@pytest.mark.parametrize("channels", [24, 200])  # 200: two channel blocks of the conv
@pytest.mark.parametrize("momentum", [0.1, None])
def test_conv_epilogue_merges_statistics_and_updates_running(momentum, channels, poisoned):
    """The forward conv's last programs merge its 4 row tiles per channel block into the next
    BatchNorm's batch statistics and update its running statistics as nn.BatchNorm2d reading
    y does; the batch is counted once (momentum=None: every channel block reads the old
    count before the last one writes the new)."""
    x, mean, var, gamma, beta, w, res = unit_inputs(5, channels, 3, 1, 1, 9, 3, torch.float32)
    bn = nn.BatchNorm2d(channels, momentum=momentum).to(DEVICE)
    rm, rv, nbt = (t.to(DEVICE) for t in (torch.randn(channels), torch.rand(channels) + 0.5, torch.tensor(3)))
    bn.running_mean.copy_(rm), bn.running_var.copy_(rv), bn.num_batches_tracked.copy_(nbt)
    with poisoned:
        y, y_mean, y_var = ops.bn_relu_conv(x, mean, var, gamma, beta, w, res, [1, 1], [1, 1], 1e-5, True, True,
                                            rm, rv, nbt, momentum, "triton")
    bn(y)  # eager, on the same output
    assert_counters_reset()
    assert nbt.item() == bn.num_batches_tracked.item() == 4
    yd = y.double()
    assert_close(y_mean, yd.mean((0, 2, 3)), torch.float64, "mean", atol=1e-5, rtol=1e-5)
    assert_close(y_var, yd.var((0, 2, 3), unbiased=False), torch.float64, "var", atol=1e-5, rtol=1e-5)
    assert_close(rm, bn.running_mean, torch.float32, "running_mean", atol=1e-5, rtol=1e-5)
    assert_close(rv, bn.running_var, torch.float32, "running_var", atol=1e-5, rtol=1e-5)


class Interrupted(Exception):
    """Raised inside an interpreted launch by interrupt_next_launch."""


def interrupt_next_launch(monkeypatch, after_programs: int) -> None:
    """The next interpreted launch of more than `after_programs` programs raises Interrupted
    as it starts program number `after_programs` (the ones before it ran, drawing their
    tickets), as a warning made an error or Ctrl-C would; the launches after it run whole."""
    from triton.runtime import interpreter  # its grid loop calls these two: per launch, per program
    builder = interpreter.InterpreterBuilder
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx
    started = [0]  # programs of the current launch

    def set_grid_dim_and_count(self, nx, ny, nz):
        started[0] = 0
        set_grid_dim(self, nx, ny, nz)

    def set_grid_idx_or_raise(self, x, y, z):
        started[0] += 1
        if started[0] == after_programs + 1:
            monkeypatch.setattr(builder, "set_grid_dim", set_grid_dim)
            monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)
            raise Interrupted
        set_grid_idx(self, x, y, z)
    monkeypatch.setattr(builder, "set_grid_dim", set_grid_dim_and_count)
    monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx_or_raise)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter runs a launch's programs one after another")
def test_a_launch_that_raised_part_way_leaves_no_tickets_for_the_next(monkeypatch):
    """An interpreted launch that raised after some of its programs drew merge tickets (the
    interpreter of triton 3.6 with numpy 2.3 under warnings-as-errors did, in a test) puts the
    counters back: the launches after it merge their tiles whole (they found the tickets above
    zero and left NaN in every later test of the process)."""
    x, mean, var, gamma, beta, w, res = unit_inputs(5, 200, 3, 1, 1, 9, 3, torch.float32)
    conf = ([1, 1], [1, 1])
    interrupt_next_launch(monkeypatch, after_programs=3)  # 3 of its 8 programs (4 row tiles x 2 channel blocks)
    with pytest.raises(Exception) as raised:  # the interpreter may wrap it in an InterpreterError
        ops.bn_relu_conv(x, mean, var, gamma, beta, w, res, *conf, 1e-5, True, True, None, None, None, 0.1, "triton")
    assert "Interrupted" in repr(raised.value)
    assert_counters_reset()
    y, y_mean, y_var = ops.bn_relu_conv(x, mean, var, gamma, beta, w, res, *conf, 1e-5, True, True, None, None, None,
                                        0.1, "triton")
    yd = y.double()
    assert_close(y_mean, yd.mean((0, 2, 3)), torch.float64, "mean", atol=1e-5, rtol=1e-5)
    assert_close(y_var, yd.var((0, 2, 3), unbiased=False), torch.float64, "var", atol=1e-5, rtol=1e-5)


def test_backward_sums_and_split_weight_gradient_reduced_in_kernel(poisoned):
    """dgrad's BN sums over 3 row tiles x 2 channel blocks (200 channels) and wgrad's split
    partials over 4 weight tiles, each reduced by the last program of its block: equal to
    float64 sums, the tickets back at zero."""
    x, mean, var, gamma, beta, w, _ = unit_inputs(200, 72, 3, 1, 1, 8, 3, torch.float32)
    dy = torch.randn(3, 72, 8, 8, device=DEVICE)
    args = (mean, var, gamma, beta)
    with poisoned:
        g, sums = ops.bn_relu_conv_dgrad(dy, w, x, *args, [1, 1], [1, 1], 1e-5, "triton")
        dw = ops.bn_relu_conv_wgrad(dy, x, *args, list(w.shape), [1, 1], [1, 1], 1e-5, "triton")
    assert_counters_reset()
    double = [t.double() for t in (dy, w, x, *args)]
    ref_g, ref_sums = ops.bn_relu_conv_dgrad(*double[:3], *double[3:], [1, 1], [1, 1], 1e-5, "reference")
    ref_dw = ops.bn_relu_conv_wgrad(double[0], *double[2:], list(w.shape), [1, 1], [1, 1], 1e-5, "reference")
    assert_close(g, ref_g, torch.float32, "g", atol=1e-4, rtol=1e-4)
    assert_close(sums, ref_sums, torch.float32, "sums", atol=1e-3, rtol=1e-4)
    assert_close(dw, ref_dw, torch.float32, "dw", atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
@pytest.mark.parametrize("n", [1, 3])  # 35 input pixels: one split; 105: two (the interpreter's rule)
@pytest.mark.parametrize("filter_hw,padding,stride", [
    ((3, 3), (1, 1), (1, 1)), ((3, 3), (0, 0), (1, 1)), ((2, 2), (0, 0), (1, 1)), ((1, 3), (0, 1), (1, 1)),
    ((3, 2), (1, 0), (1, 1)), ((3, 3), (2, 2), (1, 1)), ((4, 4), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 2)),
])
def test_weight_gradient_of_any_filter_row(filter_hw, padding, stride, n, dtype, floor, poisoned):
    """16-bit dy and x, stride 1, 2 or 3 filter columns: a program owns a filter row's taps and
    walks the input pixels, each tap reading dy at its own shifted column (zero beyond the
    image: a padding wider than the filter needs makes dy larger than x). Otherwise (float32
    here, or another filter) one tap per program. Odd, non-square images and channel counts
    off the tiles; within 2x the reference backend's error in the same dtype plus a floor,
    against float64 (as test_prologue_with_large_mean_within_the_earned_tolerance)."""
    c, k, h, w = 20, 24, 5, 7
    x = (torch.randn(n, c, h, w, device=DEVICE) * 2 + 1).to(dtype)
    mean, var = x.float().mean((0, 2, 3)), x.float().var((0, 2, 3), unbiased=False)
    gamma, beta = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    p = (h + 2 * padding[0] - filter_hw[0]) // stride[0] + 1
    q = (w + 2 * padding[1] - filter_hw[1]) // stride[1] + 1
    dy = torch.randn(n, k, p, q, device=DEVICE).to(dtype)
    conf = ([k, c, *filter_hw], list(stride), list(padding), 1e-5)

    def run(backend, tensors):
        return ops.bn_relu_conv_wgrad(*tensors, *conf, backend, torch.float32, tensors[0].dtype)
    tensors = (dy, x, mean, var, gamma, beta)
    with poisoned:
        got = run("triton", tensors)
    if n > 1:
        assert_counters_reset()  # two splits: the tickets were used
    truth = run("reference", [t.double() for t in tensors])
    ours, theirs = (((t.double() - truth).norm() / truth.norm()).item() for t in (got, run("reference", tensors)))
    assert ours <= 2 * theirs + floor, f"relative L2 error {ours:.1e}, reference {theirs:.1e}"


def test_output_statistics_with_large_mean():
    """The epilogue's statistics of an output with mean 1e3 (a large residual)."""
    x, mean, var, gamma, beta, w, res = unit_inputs(5, 16, 3, 1, 1, 9, 3, torch.float32)
    res = res + 1e3
    y, got_mean, got_var = ops.bn_relu_conv(x, mean, var, gamma, beta, w, res, [1, 1], [1, 1], 1e-5, True, True,
                                            None, None, None, None, "triton")
    yd = y.double()
    assert_close(got_mean, yd.mean((0, 2, 3)), torch.float64, "mean", atol=1e-4, rtol=1e-6)
    assert_close(got_var, yd.var((0, 2, 3), unbiased=False), torch.float64, "var", atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_prologue_with_large_mean_within_the_earned_tolerance(dtype, floor):
    """|mean| = 1e3 >> std = 2 in the BN -> ReLU prologue of the forward and of the weight
    gradient. An exact float32 dot normalises (x - mean) first; a 16-bit one folds the mean
    into the shift (common.bn_relu_padded), whose error in float32 would be about 3e-5 here.
    Each output within 2x the reference backend's error in the same precision plus that
    precision's rounding (tests/test_conformance.py's tolerance), against float64."""
    x, mean, var, gamma, beta, w, _ = unit_inputs(24, 16, 3, 1, 1, 9, 3, dtype, mean_shift=1e3)
    dy = torch.randn(3, 16, 9, 9, device=DEVICE).to(dtype)

    def run(backend, tensors):
        x, mean, var, gamma, beta, w, dy = tensors
        y = ops.bn_relu_conv(x, mean, var, gamma, beta, w, None, [1, 1], [1, 1], 1e-5, True, False,
                             None, None, None, None, backend, conv_dtype=x.dtype)[0]
        dw = ops.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), [1, 1], [1, 1], 1e-5, backend,
                                    w.dtype, x.dtype)
        return {"y": y, "dw": dw}
    tensors = (x, mean, var, gamma, beta, w, dy)
    got, same_precision = run("triton", tensors), run("reference", tensors)
    truth = run("reference", [t.double() for t in tensors])
    for name, ref in truth.items():
        ours, theirs = (((t.double() - ref).norm() / ref.norm()).item() for t in (got[name], same_precision[name]))
        assert ours <= 2 * theirs + floor, f"{name}: relative L2 error {ours:.1e}, reference {theirs:.1e}"


def every_merge(x, mean, var, gamma, beta, w, residual, dy, x16, dy16, running):
    """Each op whose last programs merge partials, in two levels, with its counted state: the
    forward's statistics with the running ones (momentum=None: the batch counted across channel
    blocks), the statistics pass, dgrad's BN sums, the split weight gradient with one tap per
    program (float32) and with a filter row's taps (float16). `running`: the initial (mean,
    var, count) of the BatchNorms reading y and x, updated in copies."""
    y_running, x_running = ([t.clone() for t in state] for state in running)
    conf = ([1, 1], [1, 1], 1e-5)
    y, y_mean, y_var = ops.bn_relu_conv(x, mean, var, gamma, beta, w, residual, *conf, True, True, *y_running, None,
                                        "triton")
    x_mean, x_var = ops.batch_stats(x, *x_running, None, "triton")
    g, sums = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, "triton")
    dw = ops.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), *conf, "triton")
    dw16 = ops.bn_relu_conv_wgrad(dy16, x16, mean, var, gamma, beta, list(w.shape), *conf, "triton", torch.float32,
                                  torch.float16)
    return dict(y=y, y_mean=y_mean, y_var=y_var, x_mean=x_mean, x_var=x_var, g=g, sums=sums, dw=dw, dw16=dw16,
                **{f"y_running{i}": t for i, t in enumerate(y_running)},
                **{f"x_running{i}": t for i, t in enumerate(x_running)})


def test_results_bitwise_equal_whatever_order_the_programs_finish_in(program_order):
    """Deterministic merges: whichever program draws a block's last ticket reduces the partials
    in the same fixed order, so every result is bitwise equal run after run, here with the
    programs in id order, reversed and in two shuffled orders (on a GPU: four runs, in the
    order the GPU finishes them). 136 channels: two channel blocks (128 + 8); 192 pixels: 3 row
    tiles (the interpreter's groups of 2: a partial last group); two weight-gradient splits."""
    x, mean, var, gamma, beta, w, residual = unit_inputs(136, 136, 3, 1, 1, 8, 3, torch.float32)
    dy = torch.randn_like(residual)
    running = [(torch.randn(channels, device=DEVICE), torch.rand(channels, device=DEVICE) + 0.5,
                torch.tensor(3, device=DEVICE)) for channels in (w.shape[0], w.shape[1])]
    tensors = (x, mean, var, gamma, beta, w, residual, dy, x.half(), dy.half(), running)
    first = every_merge(*tensors)
    for order, seed in (("reversed", 0), ("shuffled", 0), ("shuffled", 1)):
        program_order(order, seed)
        again = every_merge(*tensors)
        different = [name for name, t in first.items() if not torch.equal(t, again[name])]
        assert not different, f"programs {order} (seed {seed}): {different} differ from the first run"


# ------------------------------------------------------------------ whole blocks on triton
def run_step(model, x):
    x = x.to(DEVICE).requires_grad_(True)
    out = model.to(DEVICE)(x)
    (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
    return out, x.grad


def assert_grads_and_buffers_match(ours, eager, grad_rtol):
    """Every parameter gradient (float32 sums in another order) and every buffer."""
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad {name}", atol=1e-4, rtol=grad_rtol)
    for (name, b), (_, e) in zip(ours.named_buffers(), eager.named_buffers()):
        assert_close(b.cpu().double(), e.cpu().double(), torch.float64, name, atol=1e-5, rtol=1e-5)


BLOCK_CASES = [
    (fp.PreActBlock, EagerBlock, 5, 5, 1, "preact"),        # identity shortcut
    (fp.PreActBlock, EagerBlock, 3, 5, 2, "preact"),        # strided projection
    (fp.PreActBlock, RawShortcutPreActBlock, 5, 8, 2, "input"),
    (fp.PreActBottleneck, EagerBottleneck, 5, 4, 2, "preact"),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("ours_cls,eager_cls,cin,planes,stride,source", BLOCK_CASES)
def test_block_training_step_matches_eager(ours_cls, eager_cls, cin, planes, stride, source, training):
    eager = eager_cls(cin, planes, stride)
    randomize_bn(eager)
    ours = ours_cls(cin, planes, stride, shortcut=source, backend="triton")
    ours.load_state_dict(eager.state_dict())
    ours.train(training), eager.train(training)
    x = torch.randn(2, cin, 7, 7) + 0.5
    out, dx = run_step(ours, x)
    ref, ref_dx = run_step(eager, x)
    assert_close(out, ref, torch.float32, "output", atol=1e-4, rtol=1e-4)
    assert_close(dx, ref_dx, torch.float32, "grad x", atol=1e-4, rtol=1e-3)
    assert_grads_and_buffers_match(ours, eager, grad_rtol=1e-3)


def test_frozen_parameters_get_no_gradient():
    eager = EagerBlock(4, 6, 2)
    randomize_bn(eager)
    ours = fp.PreActBlock(4, 6, 2, backend="triton")
    ours.load_state_dict(eager.state_dict())
    frozen = ["bn1.weight", "bn1.bias", "conv2.weight"]
    for model in (ours, eager):
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
    x = torch.randn(2, 4, 7, 7)
    out, dx = run_step(ours, x)
    ref, ref_dx = run_step(eager, x)
    assert_close(dx, ref_dx, torch.float32, "grad x", atol=1e-4, rtol=1e-3)
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
        if name in frozen:
            assert p.grad is None, name
        else:
            assert_close(p.grad, q.grad, torch.float32, name, atol=1e-4, rtol=1e-3)


def test_three_sgd_steps_of_two_block_network():
    torch.manual_seed(1)
    eager = nn.Sequential(EagerBlock(3, 5, 2), EagerBlock(5, 5, 1))
    ours = nn.Sequential(fp.PreActBlock(3, 5, 2, backend="triton"), fp.PreActBlock(5, 5, 1, backend="triton"))
    ours.load_state_dict(eager.state_dict())
    ours.to(DEVICE), eager.to(DEVICE)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, ours)]
    for _ in range(3):
        x = torch.randn(3, 3, 9, 9, device=DEVICE)
        for model, opt in zip((eager, ours), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(ours.state_dict().items(), eager.state_dict().items()):
        a, b = a.cpu(), b.cpu()
        assert_close(a.double(), b.double(), torch.float64, name, atol=1e-4, rtol=1e-3)


def test_chained_blocks_hand_statistics_forward():
    """Two blocks chained through run_chain (epilogue statistics) == two separate calls."""
    blocks = [fp.PreActBlock(5, 5, backend="triton"), fp.PreActBlock(5, 5, backend="triton")]
    eager = [copy.deepcopy(b).to(torch.float64) for b in blocks]
    for e in eager:
        e.backend = "reference"
    blocks = [b.to(DEVICE) for b in blocks]
    x = torch.randn(3, 5, 7, 7)
    out = fp.nn.run_chain(blocks, x.to(DEVICE)).cpu()
    ref = eager[1](eager[0](x.double()))
    assert_close(out.double(), ref, torch.float64, "chained output", atol=1e-4, rtol=1e-4)
    for b, e in zip(blocks, eager):
        assert_close(b.bn1.running_var.cpu().double(), e.bn1.running_var, torch.float64, "running var", atol=1e-5, rtol=1e-5)


def test_paper_cifar_net_training_step_on_triton():
    """A whole network on Triton (statistics handed conv epilogue -> next BN across stages)."""
    from fused_preact.testing import PreActResNetCifar
    torch.manual_seed(0)
    eager = PreActResNetCifar(EagerBottleneck, 1)
    randomize_bn(eager)
    ours = fp.models.PreActResNetCifar(fp.PreActBottleneck, 1, backend="triton")
    ours.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 8, 8)
    out, dx = run_step(ours, x)
    ref, ref_dx = run_step(eager, x)
    assert_close(out, ref, torch.float32, "logits", atol=1e-4, rtol=1e-3)
    assert_close(dx, ref_dx, torch.float32, "grad x", atol=1e-4, rtol=1e-3)
    assert_grads_and_buffers_match(ours, eager, grad_rtol=2e-3)


def test_host_grid_arithmetic_matches_math():
    """The plain-Python cdiv / next_pow2 used for grids and tile widths (triton's own are
    constexpr functions, slow from host code)."""
    import math
    fp.dispatch.get_backend("triton")  # the kernel modules load through their backend
    from fused_preact.backends.base import cdiv
    from fused_preact.backends.triton.common import next_pow2
    for n in range(1, 1100):
        assert next_pow2(n) == 2 ** math.ceil(math.log2(n)), n
        for d in (1, 3, 16, 64, 1000):
            assert cdiv(n, d) == math.ceil(n / d), (n, d)


def test_merge_groups_on_a_gpu_split_the_walk_evenly(monkeypatch):
    """The group size compiled kernels use (the interpreter uses 1 or 2): a multiple of the
    merge step, and no level walks more than about twice sqrt(partials) of them."""
    import math
    fp.dispatch.get_backend("triton")  # the kernel modules load through their backend
    from fused_preact.backends.triton import merge
    monkeypatch.setattr(merge, "interpreter_on", lambda: False)
    for partials in range(1, 5000, 7):
        for step in (1, 2, 16, 32):
            group = merge.merge_group(partials, step)
            groups = math.ceil(partials / group)
            assert group % step == 0 and group * group >= partials, (partials, step, group)
            assert group <= max(step, 2 * math.isqrt(partials) + 2), (partials, step, group)
            assert merge.block_counters(partials, group) == groups + 1
    assert merge.merge_group(2048, 32) == 64 and merge.merge_group(64, 1) == 8  # the headline's


@pytest.mark.parametrize("hw,kernel,pad", [((1, 3), 1, 0), ((3, 1), 3, 1), ((1, 1), 1, 0)])
def test_dgrad_when_the_image_is_smaller_than_the_stride(hw, kernel, pad):
    """H or W < stride leaves phases without pixels: no division by zero, same answer."""
    import warnings
    x, mean, var, gamma, beta, w, _ = unit_inputs(5, 6, kernel, 2, pad, 3, 2, torch.float32)
    x = x[:, :, :hw[0], :hw[1]].contiguous()
    p, q = ((hw[0] + 2 * pad - kernel) // 2 + 1, (hw[1] + 2 * pad - kernel) // 2 + 1)
    dy = torch.randn(2, 6, p, q, device=DEVICE)
    conf = ([2, 2], [pad, pad], 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the interpreter's integer division by zero warns
        g, sums = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, "triton")
    ref_g, ref_sums = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, "reference")
    assert_close(g, ref_g, torch.float32, "g", atol=1e-5, rtol=1e-4)
    assert_close(sums, ref_sums, torch.float32, "sums", atol=1e-5, rtol=1e-4)


def test_outgrown_merge_buffers_stay_allocated():
    """A CUDA graph captured before the kept counters and partials grew still launches
    kernels on the old ones: they must never be freed (and their memory given to another
    tensor)."""
    import gc
    import weakref

    from fused_preact.backends.triton.merge import merge_buffers
    device = torch.device(DEVICE)
    old = merge_buffers(device, 1, 1, torch.float32)
    outgrown = [weakref.ref(t) for t in old]
    grown = merge_buffers(device, old[0].numel() + 1, old[1].numel() + 1, torch.float32)
    assert all(new.numel() > before.numel() for new, before in zip(grown, old))
    assert all(kept is new for kept, new in zip(merge_buffers(device, 1, 1, torch.float32), grown))
    del old
    gc.collect()
    assert all(ref() is not None for ref in outgrown)


def test_a_failing_interpreter_is_a_reason_not_a_crash(monkeypatch):
    """Where the Triton interpreter cannot run a loop with a runtime bound (triton <= 3.6 with
    numpy >= 2.4), the backend declines CPU tensors naming what failed."""
    from fused_preact.backends.triton import backend, common

    class FailingLaunch:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch
    monkeypatch.setattr(common, "loop_bound_probe", FailingLaunch())
    backend.interpreter_reason.cache_clear()
    try:
        why = backend.interpreter_reason()
    finally:
        backend.interpreter_reason.cache_clear()
    assert "0-dimensional" in why and "triton-lang/triton#9171" in why


def test_an_interpreter_older_than_the_kernels_is_a_reason(monkeypatch):
    """The interpreters of triton 3.1 and 3.3 failed inside the kernels: declined by version."""
    from fused_preact.backends.triton import backend
    backend.interpreter_reason.cache_clear()
    monkeypatch.setattr(backend, "triton_version", lambda: "3.3.1")
    try:
        why = backend.interpreter_reason()
    finally:
        backend.interpreter_reason.cache_clear()
    assert why.startswith("the Triton interpreter of triton 3.3.1 cannot run the kernels") and "3.6 and later" in why


def test_kernel_weight_puts_input_channels_adjacent():
    """The conv kernels get a weight with channel stride 1: PyTorch's default 3x3 layout is
    copied (same values), a channels_last or 1x1 weight is passed as it is."""
    from fused_preact.backends.triton.common import kernel_weight
    w = torch.randn(8, 5, 3, 3)
    packed = kernel_weight(w)
    assert packed.stride(1) == 1 and torch.equal(packed, w) and packed.data_ptr() != w.data_ptr()
    w_cl = w.contiguous(memory_format=torch.channels_last)
    assert kernel_weight(w_cl) is w_cl
    w_1x1 = torch.randn(8, 5, 1, 1)
    assert kernel_weight(w_1x1) is w_1x1


def test_default_layout_weights_train_bitwise_like_channels_last_ones(monkeypatch):
    """A block whose conv weights keep PyTorch's default layout computes exactly what the same
    block converted to channels_last does, and its forward and dgrad kernels are handed
    weights with channel stride 1 (kernel_weight's copy)."""
    from fused_preact.backends.triton import conv_dgrad, conv_fwd
    weight_shapes = {(32, 16, 3, 3), (32, 32, 3, 3), (32, 16, 1, 1)}
    handed = []
    for kernel in (conv_fwd.bn_relu_conv_fwd_kernel, conv_dgrad.bn_relu_conv_dgrad_kernel):
        def spy(grid, args, kwargs, launch=kernel.launch):
            handed.extend(a.stride(1) for a in args if torch.is_tensor(a) and tuple(a.shape) in weight_shapes)
            return launch(grid, args, kwargs)
        monkeypatch.setattr(kernel, "launch", spy)
    torch.manual_seed(0)
    default = fp.PreActBlock(16, 32, 2, backend="triton").to(DEVICE)
    randomize_bn(default)
    converted = copy.deepcopy(default).to(memory_format=torch.channels_last)
    assert default.conv1.weight.stride(1) != 1 and converted.conv1.weight.stride(1) == 1
    x = torch.randn(2, 16, 9, 9, device=DEVICE).contiguous(memory_format=torch.channels_last)
    results = []
    for block in (default, converted):
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        out.square().sum().backward()
        results.append([out, xi.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert len(handed) == 2 * 2 * 3 and set(handed) == {1}  # 3 convs forward and dgrad, both blocks


def test_int64_offsets_where_a_tensor_spans_int32_span_elements():
    """needs_int64 measures the farthest element from a tensor's start (its sizes and strides,
    not its element count); a dimension of size 1 adds nothing whatever its stride. Meta
    tensors: nothing is allocated."""
    from fused_preact.backends.triton.common import INT32_SPAN, needs_int64

    def strided(size, stride):
        return torch.empty_strided(size, stride, device="meta")
    assert not needs_int64(torch.empty(2, 3, 4, 5))
    batch = torch.empty(2 ** 12 + 1, 2 ** 8, 32, 32, device="meta")  # 2^30 + 2^18 elements
    assert needs_int64(batch) and not needs_int64(batch[:-1])  # 2^30: the last at 2^30 - 1
    assert needs_int64(strided((2, 8, 4, 4), (INT32_SPAN, 1, 1, 1)))  # two images far apart
    assert not needs_int64(strided((1, 8, 4, 4), (4 * INT32_SPAN, 1, 32, 8)))  # one image
    assert not needs_int64(strided((0, 8, 4, 4), (INT32_SPAN, 1, 1, 1)))  # empty
    assert needs_int64(torch.empty(2, 3, 4, 5), strided((3, 2), (INT32_SPAN // 2, 1)))  # any of them

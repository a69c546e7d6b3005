"""One autograd node per block, and its plans (fused_preact.block_autograd).

The per-unit path (one registered op and autograd node per unit, what torch.compile and
dispatch modes see) is the reference here: a block through one node, recorded or
replayed, must give bitwise the same outputs, gradients and running statistics, since
it calls the same implementations in the same order, but for one thing: where a projection
reads relu(bn1(x)) as conv1 does, the node runs bn1's backward once on the sum of both
convs' gradients (the per-unit path runs it per conv, and autograd adds the two), so x's and
bn1's gradients are the same sums taken in another order. And a plan must never be replayed
where something it was recorded from has changed.
"""
import contextlib
import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_preact as fp
from fused_preact import block_autograd, ops
from fused_preact.testing import randomize_bn
from helpers import node_names, use_backend_or_skip

# (kind, in_planes, planes, stride, shortcut): identity, projections from relu(bn1(x)) and
# from x, a bottleneck with a strided projection; odd channel counts.
BLOCKS = [("basic", 5, 5, 1, "preact"), ("basic", 5, 7, 2, "preact"), ("basic", 6, 5, 1, "input"),
          ("bottleneck", 6, 3, 2, "preact")]


class PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing but makes the blocks take the per-unit path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def make_block(kind, in_planes, planes, stride, shortcut, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cls = fp.PreActBlock if kind == "basic" else fp.PreActBottleneck
    block = cls(in_planes, planes, stride, shortcut=shortcut).to(dtype)
    randomize_bn(block, seed)
    return block


def step(block, x, per_unit=False, x_needs_grad=True):
    """One training step: (output, x.grad, parameter grads, buffers), all copied (x.grad
    empty where x needs none, a parameter's NaN where it needs none)."""
    x = x.clone().requires_grad_(x_needs_grad)
    for p in block.parameters():
        p.grad = None
    if per_unit:
        with PassThrough():
            out = block(x)
    else:
        out = block(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = [torch.full((1,), float("nan")) if p.grad is None else p.grad.clone() for p in block.parameters()]
    x_grad = x.grad.clone() if x_needs_grad else torch.empty(0)
    return [out.detach().clone(), x_grad] + grads + [b.clone() for b in block.buffers()]


def assert_bitwise(ours, reference, what, rounding=None):
    """Each tensor of `ours` bitwise its counterpart; those at the positions in `rounding`
    ({position: relative L2 error allowed}) within that (sums taken in another order)."""
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference)):
        if rounding and i in rounding:
            assert a.dtype == b.dtype and relative_error(a, b) <= rounding[i], f"{what}: tensor {i} differs"
            continue
        same = a.dtype == b.dtype and (torch.equal(a, b) or bool(torch.isnan(a).all() and torch.isnan(b).all()))
        assert same, f"{what}: tensor {i} differs"


def relative_error(got, truth):
    return ((got.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-30)).item()


def joined_gradients(block):
    """{position in step's list: rounding allowed} of the gradients a block node joins in one
    BN backward and the per-unit path sums (x's and bn1's, where a projection reads
    relu(bn1(x))): a few units in the last place of the dtype (float32 2e-6, float64 1e-14)."""
    if block.projection() is None or block.shortcut_source != "preact":
        return {}
    names = [name for name, _ in block.named_parameters()]
    allowed = 2e-6 if block.conv1.weight.dtype == torch.float32 else 1e-14
    bn1 = block.unit_names[0][0]
    return {position: allowed for position in [1] + [2 + names.index(f"{bn1}.{n}") for n in ("weight", "bias")]}


def assert_as_per_unit(ours, per_unit, block, what):
    """A block node's step (`step`) against the per-unit path's: bitwise, but the gradients
    the node joins (joined_gradients) within rounding."""
    assert_bitwise(ours, per_unit, what, rounding=joined_gradients(block))


@pytest.fixture(autouse=True)
def no_plans():
    block_autograd.PLANS.programs.clear()
    yield
    block_autograd.PLANS.programs.clear()


def test_a_block_is_one_autograd_node():
    block = make_block("basic", 5, 7, 2, "preact")
    x = torch.randn(2, 5, 6, 6, requires_grad=True)
    out = block(x)
    assert type(out.grad_fn).__name__ == "BlockFunctionBackward"
    # Its inputs are x and the parameters themselves: no other node between them and it.
    leaves = {id(f.variable) for f, _ in out.grad_fn.next_functions if f is not None}
    assert leaves == {id(x)} | {id(p) for p in block.parameters()}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", BLOCKS, ids=lambda c: "-".join(map(str, c)))
def test_recorded_and_replayed_steps_equal_the_per_unit_path(config, dtype, backend, monkeypatch):
    x = torch.randn(3, config[1], 7, 7, dtype=dtype) * 2 + 0.5
    use_backend_or_skip(backend, monkeypatch, x, conv_dtype=dtype)
    ours, reference = make_block(*config, dtype=dtype), make_block(*config, dtype=dtype)
    with fp.use_backend(backend):
        for i in range(3):  # records, then replays (its running statistics change meanwhile)
            x = torch.randn_like(x) * 2 + 0.5
            assert_as_per_unit(step(ours, x), step(reference, x, per_unit=True), ours, f"step {i}")
    assert len(block_autograd.PLANS.programs) == 1


@pytest.mark.parametrize("config", [c for c in BLOCKS if c[2:] != (c[1], 1, "preact") and c[4] == "preact"],
                         ids=lambda c: "-".join(map(str, c)))
def test_a_projection_and_the_first_unit_share_one_bn_backward(config, monkeypatch):
    """Where the projection reads relu(bn1(x)), the block node runs bn1's backward once: the
    projection's dgrad leaves out the BN, and conv1's dgrad adds its result before the ReLU
    mask and the BN sums. x's and bn1's gradients come out as close to float64 as the
    per-unit path's (a BN backward per conv, summed by autograd): within 2x its error."""
    calls = Counter()
    impls = fp.dispatch.get_backend("reference").impls
    for op in ("bn_relu_conv_dgrad", "bn_backward_apply"):
        def counted(*args, op=op, impl=impls[op], **kwargs):
            calls[op, kwargs.get("mean", 0) is None, kwargs.get("g_other") is not None] += 1
            return impl(*args, **kwargs)
        monkeypatch.setitem(impls, op, counted)
    block = make_block(*config)
    per_unit, truth = copy.deepcopy(block), copy.deepcopy(block).double()
    joined = joined_gradients(block)
    units = 3 if config[0] == "basic" else 4  # convs, the projection's included
    for i in range(2):  # recorded, then replayed
        x = torch.randn(3, config[1], 7, 7) * 2 + 0.5
        calls.clear()
        ours = step(block, x)
        assert calls == {("bn_relu_conv_dgrad", True, False): 1, ("bn_relu_conv_dgrad", False, True): 1,
                         ("bn_relu_conv_dgrad", False, False): units - 2,
                         ("bn_backward_apply", False, False): units - 1}, calls
        theirs, exact = step(per_unit, x, per_unit=True), step(truth, x.double(), per_unit=True)
        for position in joined:
            ours_error, their_error = (relative_error(t[position], exact[position]) for t in (ours, theirs))
            assert ours_error <= 2 * their_error + 1e-7, (i, position, ours_error, their_error)


def test_a_replay_runs_no_glue(monkeypatch):
    """The second call replays: neither the unit checks nor the backend choice run."""
    block = make_block("basic", 5, 7, 2, "preact")
    x = torch.randn(2, 5, 6, 6)
    first = step(block, x)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the glue ran on a replay")
    monkeypatch.setattr(ops, "check_unit_args", must_not_run)
    monkeypatch.setattr(fp.dispatch, "select", must_not_run)
    block.load_state_dict(make_block("basic", 5, 7, 2, "preact").state_dict())  # the same start again
    assert_bitwise(step(block, x), first, "replay")


def test_blocks_sharing_a_plan_use_their_own_tensors():
    """Two blocks of one configuration share one plan; each replays on its own weights."""
    blocks = [make_block("basic", 5, 5, 1, "preact", seed=s) for s in (1, 2)]
    references = [copy.deepcopy(b) for b in blocks]
    x = torch.randn(2, 5, 6, 6)
    for _ in range(2):
        for block, reference in zip(blocks, references):
            assert_bitwise(step(block, x), step(reference, x, per_unit=True), "shared plan")
    assert len(block_autograd.PLANS.programs) == 1


@pytest.mark.parametrize("config", BLOCKS, ids=lambda c: "-".join(map(str, c)))
def test_a_replayed_backward_lets_go_of_each_gradient_after_its_last_reader(config, monkeypatch):
    """The replay of a recorded backward keeps its intermediate tensors (the dgrad outputs,
    the gradients passed from unit to unit) in a list of slots: after each call, none may be
    held there that no later call reads and that is not returned (the glue would have let
    it go by then: an activation-sized tensor per unit otherwise)."""
    block = make_block(*config)
    x = torch.randn(3, config[1], 7, 7)
    step(block, x)  # records the forward and the backward
    (program,) = block_autograd.PLANS.programs.values()
    (recorded,) = program.requests.values()
    returned = {recorded.x_grad, *recorded.param_grads} - {None}
    checked = []

    def checking_replay(calls, values):
        if calls is not recorded.calls:  # the forward's
            return real_replay(calls, values)
        inputs = len(values)
        for index, call in enumerate(calls):
            real_replay([call], values)
            read_later = {slot for later in calls[index + 1:] for _, slot, _ in later.args}
            held = {slot for slot in range(inputs, len(values)) if values[slot] is not None}
            assert held <= read_later | returned, (index, held - read_later - returned)
        checked.append(len(calls))
    real_replay = block_autograd.replay
    monkeypatch.setattr(block_autograd, "replay", checking_replay)
    reference = copy.deepcopy(block)
    assert_as_per_unit(step(block, x), step(reference, x, per_unit=True), block, "replayed")
    assert checked and checked[0] >= 2 * len(program.units)


def test_a_backward_whose_glue_makes_a_tensor_the_tape_does_not_see_is_never_replayed(monkeypatch):
    """A tensor made in the glue outside a recorded call has no slot: a replay would pass the
    first step's tensor again. Such a backward runs its glue (recording again) every time."""
    real = ops.unit_gradients

    def copying_dy(saved, conf, needs, dy, *args, **kwargs):
        return real(saved, conf, needs, dy * 1, *args, **kwargs)  # dy * 1: made outside any call
    monkeypatch.setattr(ops, "unit_gradients", copying_dy)
    block = make_block("basic", 5, 7, 2, "preact")
    reference = copy.deepcopy(block)
    for i in range(3):
        x = torch.randn(3, 5, 7, 7)
        assert_as_per_unit(step(block, x), step(reference, x, per_unit=True), block, f"step {i}")
    (program,) = block_autograd.PLANS.programs.values()
    assert not program.requests


@pytest.mark.parametrize("per_unit", [False, True], ids=["block", "per-unit"])
@pytest.mark.parametrize("config", [BLOCKS[1], BLOCKS[3]], ids=lambda c: "-".join(map(str, c)))
def test_a_backward_computes_only_the_gradients_asked_for(config, per_unit, monkeypatch):
    """torch.autograd.grad(loss, [x]) (an attack's input gradient) or backward(inputs=...):
    PyTorch's own ops compute only the gradients that run reaches, and so do the units, on
    the block node and the per-unit path: no weight gradient for an input gradient. What they
    compute is bitwise what a full backward gives, recorded and replayed."""
    calls = Counter()
    impls = fp.dispatch.get_backend("reference").impls
    for op in ("bn_relu_conv_wgrad", "bn_relu_conv_dgrad", "bn_backward_apply"):
        def counted(*args, op=op, impl=impls[op], **kwargs):
            calls[op] += 1
            return impl(*args, **kwargs)
        monkeypatch.setitem(impls, op, counted)
    block = make_block(*config)
    names = dict(block.named_parameters())
    convs = 3 if config[0] == "basic" else 4  # a projection each
    last_conv = "conv2.weight" if config[0] == "basic" else "conv3.weight"
    # (name, the gradients a backward asks for: x and parameters by name; None: .backward())
    requests = [("all", None), ("input", ["x"]), ("the last conv's weight", [last_conv]),
                ("input and a BN weight", ["x", "bn1.weight"])]
    for step_index in range(2):  # recorded, then replayed
        x = torch.randn(3, config[1], 7, 7).requires_grad_(True)
        results = {}
        for name, asked in requests:
            calls.clear()
            with PassThrough() if per_unit else contextlib.nullcontext():
                out = block(x)
            weights = torch.linspace(-1, 1, out.numel()).view_as(out)
            if asked is None:
                x.grad = None
                block.zero_grad(set_to_none=True)
                (out * weights).sum().backward()
                results[name] = {"x": x.grad, **{n: p.grad for n, p in names.items()}}
            else:
                tensors = [x if a == "x" else names[a] for a in asked]
                results[name] = dict(zip(asked, torch.autograd.grad((out * weights).sum(), tensors)))
            wgrads = calls["bn_relu_conv_wgrad"]
            assert wgrads == (convs if asked is None else asked.count(last_conv)), (name, calls)
            if asked == [last_conv]:  # its output's gradient is the block's: no dgrad, no BN backward
                assert calls["bn_relu_conv_dgrad"] == 0 and calls["bn_backward_apply"] == 0, calls
        for name, got in results.items():
            for tensor, grad in got.items():
                assert torch.equal(grad, results["all"][tensor]), (step_index, name, tensor)


def test_a_conv_two_units_share_gets_the_sum_of_their_gradients():
    """conv2 is conv1 (one Parameter read by both units): the block node's weight gradient
    is both units' summed, as the per-unit path and eager give, recorded and replayed."""
    block = make_block("basic", 5, 5, 1, "preact")
    block.conv2 = block.conv1
    reference = copy.deepcopy(block)
    eager = fp.testing.PreActBlock(5, 5, 1)
    eager.load_state_dict(block.state_dict())
    eager.conv2 = eager.conv1
    x = torch.randn(2, 5, 6, 6)
    for _ in range(2):  # recorded, then replayed
        ours = step(block, x)
        assert_bitwise(ours, step(reference, x, per_unit=True), "shared conv")
    x_eager = x.clone().requires_grad_(True)
    out = eager(x_eager)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    shared = [p for name, p in block.named_parameters() if name == "conv1.weight"]
    assert len(shared) == 1 and shared[0].grad is not None
    torch.testing.assert_close(shared[0].grad, eager.conv1.weight.grad, atol=1e-4, rtol=1e-4)


def _momentum(block, _x):
    block.bn1.momentum = 0.5


def _momentum_none(block, _x):
    block.bn2.momentum = None  # a cumulative average: reads num_batches_tracked


def _eval_bn2(block, _x):
    block.bn2.eval()  # bn2 normalises with its running statistics, block still training


def _eps(block, _x):
    block.bn1.eps = 1e-2


def _stride(block, _x):
    block.conv1.stride = (1, 1)  # the conv's stride, set by hand: so the shortcut's must be too
    block.shortcut[0].stride = (1, 1)


def _no_running_stats(block, _x):
    block.bn2.track_running_stats = False
    block.bn2.running_mean = block.bn2.running_var = block.bn2.num_batches_tracked = None


def _frozen_conv(block, _x):
    block.conv2.weight.requires_grad_(False)


def _double(block, _x):
    block.double()


CHANGES = [_momentum, _momentum_none, _eval_bn2, _eps, _stride, _no_running_stats, _frozen_conv, _double]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_a_plan_is_not_replayed_after_the_block_changed(change):
    """Record, change the block, step again: equal to a block changed before any plan."""
    block = make_block("basic", 5, 7, 2, "preact")
    reference = copy.deepcopy(block)
    x = torch.randn(3, 5, 7, 7)
    step(block, x)
    step(reference, x, per_unit=True)
    change(block, x), change(reference, x)
    x = x.to(block.conv1.weight.dtype)
    for i in range(2):
        result = step(block, x)
        expected = step(reference, x, per_unit=True)
        assert_as_per_unit(result, expected, block, f"step {i} after {change.__name__}")


def test_a_plan_is_not_replayed_for_another_input_shape_or_backend(monkeypatch):
    block = make_block("basic", 5, 7, 2, "preact")
    reference = copy.deepcopy(block)
    use_backend_or_skip("triton", monkeypatch, torch.empty(0))
    for backend, shape in [("reference", (3, 5, 7, 7)), ("reference", (2, 5, 9, 8)), ("triton", (2, 5, 9, 8)),
                           ("reference", (3, 5, 7, 7))]:
        x = torch.randn(shape)
        with fp.use_backend(backend):
            assert_as_per_unit(step(block, x), step(reference, x, per_unit=True), block, f"{backend} {shape}")
    assert len(block_autograd.PLANS.programs) == 3


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_a_chain_hands_statistics_forward_on_replay(memory_format, backend, monkeypatch):
    """Blocks in a converted nn.Sequential take their input statistics from the block before:
    the statistics (and the next BatchNorm's running update) are slots of the plans too. On
    the triton backend every call replays bound (replay.py), default-layout weights too."""
    use_backend_or_skip(backend, monkeypatch, torch.empty(0))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[make_block("basic", 6, 6, 1, "preact", seed=s) for s in range(3)])
    model = fp.convert(model).to(memory_format=memory_format)
    reference = copy.deepcopy(model)
    with fp.use_backend(backend):
        for _ in range(3):
            x = torch.randn(2, 6, 5, 5).contiguous(memory_format=memory_format)
            assert_bitwise(step(model, x), step(reference, x, per_unit=True), "chain")
    if backend == "triton":
        from fused_preact.backends.triton.replay import BoundCall
        calls = [call.impl for program in block_autograd.PLANS.programs.values() for call in program.calls]
        assert calls and all(isinstance(impl, BoundCall) for impl in calls)


# timm-layout blocks (kind, in_chs, out_chs, stride, what they have): stochastic depth (a
# DropPath, as drop_path_rate gives every block but a model's first) in an identity block, a
# strided projection and a strided bottleneck; a projection that average-pools first (timm's
# avg_down, a PooledConv), alone and with a DropPath. Odd channel counts.
TIMM_BLOCKS = [("basic", 5, 5, 1, "drop"), ("basic", 5, 7, 2, "drop"), ("bottleneck", 6, 12, 2, "drop"),
               ("basic", 5, 7, 2, "avg_down"), ("bottleneck", 6, 12, 2, "avg_down+drop")]


def make_timm_block(kind, in_chs, out_chs, stride, features, seed=0):
    """A fused timm-layout block, with a DropPath (timm_like's: it keeps the masks it drew)
    where `features` says "drop", and an avg_down projection where it says "avg_down"."""
    import timm_like
    torch.manual_seed(seed)
    cls = timm_like.PreActBasic if kind == "basic" else timm_like.PreActBottleneck
    block = cls(in_chs, out_chs, stride, drop_path=timm_like.DropPath() if "drop" in features else None,
                avg_down="avg_down" in features)
    randomize_bn(block, seed)
    fused, report = fp.convert(block, return_report=True)
    assert report.swapped and not report.left, report
    block_autograd.PLANS.programs.clear()  # (those of convert's probe, which ran float64 copies)
    return fused


def timm_input(config, batch=6):
    """An input of odd size, but even where the block pools (odd sizes run its submodules)."""
    size = (8, 6) if "avg_down" in config[4] else (7, 7)
    return torch.randn(batch, config[1], *size) * 2 + 0.5


def test_a_drop_path_block_is_one_node_then_its_drop_and_add():
    """The block node returns its residual branch and its shortcut (x itself here); the drop
    module's mul and the add follow it, and the add's gradient of the shortcut comes back
    to the node as its second output's."""
    block = make_timm_block("basic", 5, 5, 1, "drop")
    x = torch.randn(4, 5, 6, 6, requires_grad=True)
    names = node_names(block(x))
    assert names == {"AddBackward0": 1, "MulBackward0": 1, "BlockFunctionBackward": 1,
                     "AccumulateGrad": 1 + len(list(block.parameters()))}, names


def test_a_pooled_projection_block_is_one_node_after_its_derived_weight():
    """The PooledConv's weight W / 4 on four taps is derived before the block node (views
    and a mul), which takes it as an input: no node per unit."""
    block = make_timm_block("basic", 5, 7, 2, "avg_down")
    x = torch.randn(4, 5, 6, 6, requires_grad=True)
    names = node_names(block(x))
    assert names == {"BlockFunctionBackward": 1, "PermuteBackward0": 2, "ExpandBackward0": 1, "MulBackward0": 1,
                     "AccumulateGrad": 1 + len(list(block.parameters()))}, names


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("config", TIMM_BLOCKS, ids=lambda c: "-".join(map(str, c)))
def test_timm_blocks_recorded_and_replayed_equal_the_per_unit_path(config, backend, monkeypatch):
    """Three training steps, recorded then replayed, each from the same seed for both blocks
    (the same masks): as the per-unit path, bitwise but the joined gradients."""
    x = timm_input(config)
    use_backend_or_skip(backend, monkeypatch, x)
    ours, reference = make_timm_block(*config), make_timm_block(*config)
    with fp.use_backend(backend):
        for i in range(3):
            x = torch.randn_like(x) * 2 + 0.5
            torch.manual_seed(i)
            got = step(ours, x)
            torch.manual_seed(i)
            assert_as_per_unit(got, step(reference, x, per_unit=True), ours, f"step {i}")
    assert len(block_autograd.PLANS.programs) == 1
    if "drop" in config[4]:
        assert ours.drop_path.masks == reference.drop_path.masks
        assert {0.0, 1.0} <= {v for mask in ours.drop_path.masks for v in mask}, "no image both dropped and kept"


def test_blocks_with_and_without_a_drop_module_keep_their_own_plans():
    """timm's first block has no DropPath, the next ones of the same shape have one: a plan
    returns the branch and the shortcut apart or adds them, so each keeps its own."""
    blocks = [make_timm_block("basic", 5, 5, 1, features) for features in ("", "drop")]
    references = copy.deepcopy(blocks)
    for i in range(2):
        x = torch.randn(6, 5, 7, 7)
        for number, (block, reference) in enumerate(zip(blocks, references)):
            torch.manual_seed(i)
            got = step(block, x)
            torch.manual_seed(i)
            assert_as_per_unit(got, step(reference, x, per_unit=True), block, f"step {i}, block {number}")
    assert len(block_autograd.PLANS.programs) == 2


@pytest.mark.parametrize("x_needs_grad", [False, True])
@pytest.mark.parametrize("config", [TIMM_BLOCKS[i] for i in (0, 1, 3)], ids=lambda c: "-".join(map(str, c)))
def test_timm_blocks_compute_the_gradients_asked_for(config, x_needs_grad):
    """A model's first block sees an input that needs no gradient (the images): the
    shortcut's gradient (x's own, for the identity) is then asked for by nobody. A frozen
    conv too. As the per-unit path, twice (recorded, replayed)."""
    ours, reference = make_timm_block(*config), make_timm_block(*config)
    for block in (ours, reference):
        block.conv2.weight.requires_grad_(False)
    for i in range(2):
        x = timm_input(config)
        torch.manual_seed(i)
        got = step(ours, x, x_needs_grad=x_needs_grad)
        torch.manual_seed(i)
        assert_as_per_unit(got, step(reference, x, True, x_needs_grad), ours, f"step {i}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_timm_block_without_autograd_replays_its_plan(train):
    """Inference (torch.no_grad) of a pooled projection block with a DropPath: no node, the
    weight derived, the DropPath called in training (it draws) and passed over in eval (it
    returns its input there), as the per-unit path computes."""
    config = TIMM_BLOCKS[4]  # a pooled projection and a DropPath
    ours, reference = make_timm_block(*config), make_timm_block(*config)
    for i in range(2):
        x = timm_input(config)
        outputs = []
        for block, per_unit in ((ours.train(train), False), (reference.train(train), True)):
            torch.manual_seed(i)
            with torch.no_grad(), PassThrough() if per_unit else contextlib.nullcontext():
                outputs.append([block(x), *block.buffers()])
        assert_bitwise(*outputs, f"call {i}")
    assert len(block_autograd.PLANS.programs) == 1


def test_a_parametrized_weight_keeps_the_per_unit_path():
    """A parametrized conv weight is computed anew on every read (autograd must record that
    computation): such a block is not one node and records no plan, and trains like eager."""
    from torch.nn.utils.parametrizations import weight_norm

    from fused_preact.testing import PreActBlock as EagerBlock
    eager = EagerBlock(5, 7, 2).double()
    randomize_bn(eager)
    block = fp.PreActBlock(5, 7, 2).double()
    block.load_state_dict(eager.state_dict())
    weight_norm(block.conv1), weight_norm(eager.conv1)
    for _ in range(2):
        x = torch.randn(3, 5, 7, 7, dtype=torch.float64)
        ours, theirs = step(block, x), step(eager, x)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"tensor {i}")
    assert not block_autograd.PLANS.programs
    assert block.conv1.parametrizations.weight.original1.grad is not None


@pytest.mark.parametrize("mode", ["no_grad-eval", "no_grad-train", "frozen-train"])
def test_inference_replays_a_plan_without_a_node(mode, monkeypatch):
    """Where autograd records nothing (torch.no_grad, or nothing requires grad) the block
    records and replays its plan without an autograd node: the same outputs and running
    statistics as the per-unit path, and no glue on a replay."""
    import contextlib
    block = make_block("bottleneck", 6, 3, 2, "preact").train(mode.endswith("train"))
    if mode.startswith("frozen"):
        block.requires_grad_(False)
    reference = copy.deepcopy(block)
    inputs = [torch.randn(2, 6, 7, 7) for _ in range(3)]

    def forward(model, x, per_unit):
        with torch.no_grad() if mode.startswith("no_grad") else contextlib.nullcontext():
            with PassThrough() if per_unit else contextlib.nullcontext():
                out = model(x)
        assert out.grad_fn is None
        return [out] + [b.clone() for b in model.buffers()]
    expected = [forward(reference, x, True) for x in inputs]
    got = [forward(block, inputs[0], False)]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the glue ran on a replay")
    monkeypatch.setattr(ops, "check_unit_args", must_not_run)
    got += [forward(block, x, False) for x in inputs[1:]]
    for i, (ours, theirs) in enumerate(zip(got, expected)):
        assert_bitwise(ours, theirs, f"call {i}")


def test_random_changes_between_steps_never_replay_a_stale_plan():
    """Twenty steps, each after a random change of the block or its input (any of the single
    changes above, batch and image size, train / eval), against the per-unit path."""
    import random
    rng = random.Random(0)
    block = make_block("basic", 5, 7, 2, "preact")
    reference = copy.deepcopy(block)
    changes = [lambda b: setattr(b.bn1, "momentum", rng.choice([0.1, 0.5, None])),
               lambda b: b.bn2.train(not b.bn2.training),
               lambda b: setattr(b.bn1, "eps", rng.choice([1e-5, 1e-2])),
               lambda b: b.conv2.weight.requires_grad_(not b.conv2.weight.requires_grad),
               lambda b: b.train(not b.training)]
    shape = [3, 5, 7, 7]
    for i in range(20):
        change = rng.randrange(len(changes) + 1)
        if change == len(changes):
            shape = [rng.choice([2, 3]), 5, rng.choice([6, 7]), 7]
        else:
            state = rng.getstate()
            changes[change](block)
            rng.setstate(state)  # the same random choice for the reference
            changes[change](reference)
        x = torch.randn(shape)
        assert_as_per_unit(step(block, x), step(reference, x, per_unit=True), block, f"step {i}")


def aligned_or_not(t: torch.Tensor, aligned: bool) -> torch.Tensor:
    """t's values and strides at a 16-byte aligned address, or 4 bytes past one."""
    flat = torch.empty(t.untyped_storage().nbytes() // t.element_size() + 1, dtype=t.dtype)
    start = 0 if aligned else 1
    view = flat[start:start + t.numel()].as_strided(t.shape, t.stride())
    view.copy_(t)
    assert (view.data_ptr() % 16 == 0) == aligned
    return view


def test_bound_replays_see_the_layouts_they_were_bound_with(monkeypatch):
    """The triton backend replays a plan's calls without their wrappers (replay.py), the
    backward's from their first run on, with the launch arguments of the call it bound: the
    plan's keys must hold the layout (strides, 16-byte alignment) of every tensor a plan gets.
    Steps whose input is channels_last or not, aligned or not, whose incoming gradient is
    channels_last or not: bitwise the per-unit path (wrappers only), and every call bound,
    also with default-layout 3x3 weights (copied into the kernels' layout on every call)."""
    from fused_preact.backends.triton.replay import BoundCall
    use_backend_or_skip("triton", monkeypatch, torch.empty(0))
    cl, default = torch.channels_last, torch.contiguous_format
    for kind, in_planes, planes, weights in (("basic", 5, 5, cl), ("bottleneck", 6, 3, cl), ("basic", 5, 5, default)):
        block_autograd.PLANS.programs.clear()
        ours = make_block(kind, in_planes, planes, 1, "preact").to(memory_format=weights)
        reference = copy.deepcopy(ours)
        torch.manual_seed(1)
        for i, (x_layout, aligned, grad_layout) in enumerate([
                ("cl", True, "cl"), ("cl", True, "cl"), ("cl", False, "cl"), ("nchw", True, "nchw"),
                ("cl", True, "nchw"), ("cl", True, "cl")]):
            x = torch.randn(3, in_planes, 6, 5) * 2 + 0.5
            x = aligned_or_not(x.contiguous(memory_format=torch.channels_last if x_layout == "cl" else
                                            torch.contiguous_format), aligned)
            grad_format = torch.channels_last if grad_layout == "cl" else torch.contiguous_format
            results = []
            for model, per_unit in ((ours, False), (reference, True)):
                inputs = x.detach().clone().as_strided(x.shape, x.stride()) if aligned else x.detach()
                inputs.requires_grad_(True)
                with fp.use_backend("triton"), PassThrough() if per_unit else contextlib.nullcontext():
                    out = model(inputs)
                out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(i)).contiguous(
                    memory_format=grad_format))
                results.append([out.detach(), inputs.grad] + [p.grad.clone() for p in model.parameters()]
                               + [b.clone() for b in model.buffers()])
            assert_as_per_unit(results[0], results[1], ours, f"{kind} step {i}: x {x_layout}, aligned {aligned}, "
                                                             f"gradient {grad_layout}")
        programs = list(block_autograd.PLANS.programs.values())
        assert len(programs) == 3  # channels_last aligned and not, NCHW
        for program in programs:
            assert all(isinstance(call.impl, BoundCall) for call in program.calls)
        first = programs[0]  # channels_last, aligned: its backward ran for both gradient layouts
        assert len(first.requests) == 2
        shared_bn = kind == "bottleneck"  # the projection's BN backward runs in the first unit's
        for request, recorded in first.requests.items():
            # Each unit's three kernels bound, and the glue's steps: each BN's parameter
            # gradients, and the incoming gradient copied to channels_last where it is not.
            (_dtype, grad_shape, grad_strides, *_), _shortcut_grad = request[1]  # the block's output's, the shortcut's
            grad_cl = torch.empty_strided(grad_shape, grad_strides).is_contiguous(memory_format=torch.channels_last)
            bound = [call for call in recorded.calls if isinstance(call.impl, BoundCall)]
            glue = sorted(call.impl.__name__ for call in recorded.calls if not isinstance(call.impl, BoundCall))
            assert len(bound) == 3 * len(first.units) - shared_bn, request
            assert glue == sorted(["bn_param_grads"] * (len(first.units) - shared_bn)
                                  + ([] if grad_cl else ["channels_last"])), (request, glue)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_replayed_backward_sees_the_saved_tensors_as_a_hook_unpacks_them(backend, monkeypatch):
    """Saved-tensor hooks return the saved values, but laid out as they choose:
    save_on_cpu(pin_memory=True) an NCHW-contiguous copy of channels_last x and t, a hook of
    one's own a copy 4 bytes past an aligned address. A backward recorded on the forward's
    own tensors must not be replayed on those (the bound launches would read them with the
    forward's strides), nor one recorded under a hook on the plain tensors: steps alternating
    between them equal the per-unit path (wrappers only)."""
    use_backend_or_skip(backend, monkeypatch, torch.empty(0))

    def misaligned_copy(t):
        return aligned_or_not(t.contiguous(), aligned=False) if t.dim() == 4 else t
    hooks = {"none": contextlib.nullcontext,
             "save_on_cpu": lambda: torch.autograd.graph.save_on_cpu(pin_memory=True),
             "misaligned": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, misaligned_copy)}
    for config in (BLOCKS[0], BLOCKS[3]):
        block_autograd.PLANS.programs.clear()
        ours = make_block(*config).to(memory_format=torch.channels_last)
        reference = copy.deepcopy(ours)
        for i, hook in enumerate(["none", "save_on_cpu", "misaligned", "save_on_cpu", "none"]):
            x = (torch.randn(3, config[1], 7, 7) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
            with fp.use_backend(backend), hooks[hook]():
                result, expected = step(ours, x), step(reference, x, per_unit=True)
            assert_as_per_unit(result, expected, ours, f"{config} step {i}, saved tensors hook {hook}")
        (program,) = block_autograd.PLANS.programs.values()
        assert len(program.requests) == 3  # one recorded backward per layout of the saved tensors

"""A fused module calls its submodules, as eager PyTorch does, where its fused ops would not
compute what eager computes (fused_preact/unfused.py): while a submodule has hooks or global
module hooks exist, or a submodule was replaced by one that computes otherwise. A block or
stage with hooks of its own is called as a module inside a chain (fp.models,
FusedSequential); convert leaves a block whose ReLU module, which a fused block drops, has
hooks. Before, all of these were skipped without a word: a Grad-CAM hook on
model.layer4[-1] of fp.models never fired, a hook changing bn2's output did not change the
block's, and nn.SyncBatchNorm.convert_sync_batchnorm left the blocks' statistics local.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import fused_preact as fp
from fused_preact import block_autograd
import timm_like
from fused_preact.backends import reference
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import PreActBottleneck as EagerBottleneck
from fused_preact.testing import PreActResNet as EagerResNet
from fused_preact.testing import RawShortcutPreActBlock, WideBasicBlock, randomize_bn
from helpers import assert_close

F64 = torch.float64


class Unit(nn.Module):
    """The eager computation FusedBNReLUConv2d stands for."""

    def __init__(self, c, k, stride):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, k, 3, stride, 1, bias=False)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


def fused_copy(eager):
    if isinstance(eager, Unit):
        module = copy.deepcopy(eager)
        return fp.FusedBNReLUConv2d.from_modules(module.bn, module.conv, backend="reference")
    fused, report = fp.convert(nn.Sequential(copy.deepcopy(eager)), backend="reference", return_report=True)
    assert len(report.swapped) == 1, report
    return fused[0]


# Every layout a fused module replaces: (eager module, its input channels, stride).
LAYOUTS = {
    "basic-projection": lambda: EagerBlock(5, 8, 2),
    "basic-identity": lambda: EagerBlock(6, 6),
    "raw-shortcut": lambda: RawShortcutPreActBlock(4, 6, 2),
    "bottleneck": lambda: EagerBottleneck(8, 3, 2),
    "timm-basic": lambda: timm_like.PreActBasic(4, 6, 2),
    "timm-bottleneck": lambda: timm_like.PreActBottleneck(8, 12, 1),
    "unit": lambda: Unit(5, 7, 2),
    "wide-projection": lambda: WideBasicBlock(4, 6, 2),
    "wide-identity": lambda: WideBasicBlock(5, 5, 1),
}


def hook_everything(model, log, names):
    """On the submodules of these names: a pre-hook and a hook that log the call, with a copy
    of the output, and a full backward hook logging grad_output; the first BatchNorm's hook
    also changes its output (not by a positive factor alone: training-mode BN would undo it)."""
    handles = []
    first_bn = next(name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    for name, module in model.named_modules():
        if name not in names:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: log.append(("pre", name))))

        def after(m, args, out, name=name):
            log.append(("out", name, out.detach().clone()))
            return out * 1.5 - 0.25 if name == first_bn else None
        handles.append(module.register_forward_hook(after))
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_full_backward_hook(
                lambda m, gin, gout, name=name: log.append(("grad", name, gout[0].detach().clone()))))
    return handles


def train_step(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out, x.grad


def assert_logs_equal(ours, eager):
    assert [entry[:2] for entry in ours] == [entry[:2] for entry in eager]
    for mine, theirs in zip(ours, eager):
        if len(mine) == 3:
            assert_close(mine[2], theirs[2], F64, f"{mine[0]} of {mine[1]}")


def assert_states_equal(ours, eager):
    for (name, a), (_, b) in zip(ours.state_dict().items(), eager.state_dict().items()):
        assert_close(a.double(), b.double(), F64, name)
    for (name, a), (_, b) in zip(ours.named_parameters(), eager.named_parameters()):
        assert_close(a.grad, b.grad, F64, f"grad {name}")


def assert_steps_alike(ours, ours_step, eager, x):
    """ours_step: ours' train_step on x. Eager takes the same step; the outputs, input
    gradients, parameter gradients and buffers must agree."""
    out, dx = ours_step
    ref, ref_dx = train_step(eager, x)
    assert_close(out, ref, F64, "output")
    assert_close(dx, ref_dx, F64, "grad x")
    assert_states_equal(ours, eager)


def count_ops(monkeypatch, *ops) -> dict:
    """Calls of the reference backend's implementations of `ops` from now on, by op. No
    block plan of another test is seen meanwhile: a plan replays the implementation it
    recorded (block_autograd), which would count into that test's counter."""
    monkeypatch.setattr(block_autograd.PLANS, "programs", {})
    calls = dict.fromkeys(ops, 0)
    for op in ops:
        real = reference.BACKEND.impls[op]
        monkeypatch.setitem(reference.BACKEND.impls, op,
                            lambda op=op, real=real, **kw: calls.__setitem__(op, calls[op] + 1) or real(**kw))
    return calls


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hooks_on_submodules_run_as_in_eager(layout):
    torch.manual_seed(0)
    eager = LAYOUTS[layout]().double()
    randomize_bn(eager)
    ours = fused_copy(eager)
    channels = next(m for m in eager.modules() if isinstance(m, nn.BatchNorm2d)).num_features
    x = torch.randn(3, channels, 7, 7, dtype=F64)
    ours_log, eager_log = [], []
    names = {name for name, _ in ours.named_modules() if name}  # a fused block keeps no ReLU module
    handles = hook_everything(ours, ours_log, names) + hook_everything(eager, eager_log, names)
    with pytest.warns(UserWarning, match="runs unfused"):
        ours_step = train_step(ours, x)
    assert_steps_alike(ours, ours_step, eager, x)
    assert_logs_equal(ours_log, eager_log)

    for handle in handles:  # without hooks: fused again, and still what eager computes
        handle.remove()
    ours_log.clear()
    for model in (ours, eager):
        model.zero_grad()
    assert_steps_alike(ours, train_step(ours, x), eager, x)
    assert not ours_log


def test_a_chain_hands_no_statistics_to_a_block_whose_submodules_have_hooks(monkeypatch):
    """The fused ops run only in the blocks without hooked submodules (the reference
    backend's ops counted), and the block before a hooked one hands it no statistics: its
    BatchNorms compute their own, so running statistics and batch counts stay as in eager (a
    producer updating them as well would count each batch twice)."""
    torch.manual_seed(1)
    eager = nn.Sequential(EagerBlock(4, 6, 2), EagerBlock(6, 6), EagerBlock(6, 6)).double()
    randomize_bn(eager)
    ours = fp.convert(copy.deepcopy(eager), backend="reference")
    calls = count_ops(monkeypatch, "bn_relu_conv", "batch_stats")
    for model in (ours, eager):
        model[1].bn2.register_forward_hook(lambda mod, args, out: out + 0.5)
    for step in range(2):
        x = torch.randn(3, 4, 8, 8, dtype=F64)
        with pytest.warns(UserWarning, match="submodule 'bn2' has hooks"):
            out, dx = train_step(ours, x)
        # Fused: block 0's two units and projection, block 2's two units; each reads its input
        # for statistics (block 1 hands none on).
        assert calls == {"bn_relu_conv": 5, "batch_stats": 2}, f"step {step}"
        calls.update(bn_relu_conv=0, batch_stats=0)
        ref, ref_dx = train_step(eager, x)
        assert_close(out, ref, F64, f"output, step {step}")
        assert_close(dx, ref_dx, F64, f"grad x, step {step}")
    assert_states_equal(ours, eager)


def test_hooked_blocks_and_stages_of_fp_models_run_their_hooks():
    """Grad-CAM's use: a forward and a full backward hook on model.layer4[-1], and a hook on a
    whole stage. fp.models chain the blocks across stages (one statistics pass for all), but
    call a block or stage with hooks as a module."""
    torch.manual_seed(0)
    eager = EagerResNet(EagerBlock, [2, 2, 2, 2]).double()
    randomize_bn(eager)
    ours = fp.models.preact_resnet18(backend="reference").double()
    ours.load_state_dict(eager.state_dict())
    logs = {}
    for name, model in (("ours", ours), ("eager", eager)):
        log = logs[name] = []
        model.layer4[-1].register_forward_hook(lambda m, args, out, log=log: log.append(("act", out.detach().clone())))
        model.layer4[-1].register_full_backward_hook(
            lambda m, gin, gout, log=log: log.append(("grad", gout[0].detach().clone())))
        model.layer2.register_forward_pre_hook(lambda m, args, log=log: log.append(("stage", args[0].detach().clone())))
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    out, dx = train_step(ours, x)
    ref, ref_dx = train_step(eager, x)
    assert_close(out, ref, F64, "logits")
    assert_close(dx, ref_dx, F64, "grad x")
    assert [kind for kind, _ in logs["ours"]] == ["stage", "act", "grad"] == [kind for kind, _ in logs["eager"]]
    for (kind, mine), (_, theirs) in zip(logs["ours"], logs["eager"]):
        assert_close(mine, theirs, F64, kind)
    assert_states_equal(ours, eager)


def test_global_module_hooks_see_every_submodule_call():
    torch.manual_seed(0)
    eager = nn.Sequential(EagerBlock(4, 6, 2), EagerBottleneck(6, 2)).double()
    randomize_bn(eager)
    ours = fp.convert(copy.deepcopy(eager), backend="reference")
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    calls = []
    handle = torch_module.register_module_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    try:
        with pytest.warns(UserWarning, match="global module hooks are registered"):
            out = ours(x)
        ours_calls, calls[:] = calls[:], []
        ref = eager(x)
    finally:
        handle.remove()
    assert_close(out, ref, F64, "output")
    # convert made the nn.Sequential a FusedSequential; the blocks keep their class names
    assert [{"FusedSequential": "Sequential"}.get(name, name) for name in ours_calls] == calls


def test_spectral_norm_on_a_conv_of_a_block():
    """torch.nn.utils.spectral_norm recomputes the weight in a forward pre-hook: the fused
    block runs it, so training steps match eager (a stale weight would not)."""
    torch.manual_seed(0)
    eager = EagerBlock(4, 4).double()
    randomize_bn(eager)
    ours = fused_copy(eager)
    models = {"ours": ours, "eager": eager}
    for model in models.values():
        torch.manual_seed(1)  # its power iteration starts from a random vector
        nn.utils.spectral_norm(model.conv2)
    optims = {name: torch.optim.SGD(model.parameters(), lr=0.5) for name, model in models.items()}
    for step in range(3):
        x = torch.randn(2, 4, 6, 6, dtype=F64)
        results = {}
        for name, model in models.items():
            optims[name].zero_grad()
            results[name] = train_step(model, x)
            optims[name].step()
        assert_close(results["ours"][0], results["eager"][0], F64, f"output, step {step}")
    assert_states_equal(ours, eager)


def test_hooks_present_when_converting():
    """Hooks already on a block's submodules: the probe does not fire them, the report says
    the block runs unfused while they are there, and the converted model runs them."""
    fired = []
    model = nn.Sequential(EagerBlock(4, 4), EagerBlock(4, 4)).double()
    handle = model[0].conv2.register_forward_hook(lambda m, args, out: fired.append(1))
    converted, report = fp.convert(model, backend="reference", return_report=True)
    assert not fired, "the probe fired the user's hook"
    assert "runs unfused, through its submodules, while submodule 'conv2' has hooks" in report.swapped[0][1]
    assert "unfused" not in report.swapped[1][1]
    with pytest.warns(UserWarning, match="runs unfused"):
        converted(torch.randn(2, 4, 5, 5, dtype=F64))
    assert fired == [1]
    handle.remove()
    converted(torch.randn(2, 4, 5, 5, dtype=F64))
    assert fired == [1]


def test_a_synchronised_block_refuses_hooks_inside_before_any_state_changes(monkeypatch):
    block = fp.PreActBlock(4, 4, backend="reference", sync_bn=True).double()
    monkeypatch.setattr(block, "sync_handle", lambda: 1)  # as under an initialised process group
    block.conv1.register_forward_hook(lambda m, args, out: None)
    before = copy.deepcopy(block.state_dict())
    refusal = r"sync_bn=True cannot call its submodules \(submodule 'conv1' has hooks\)"
    with pytest.raises(ValueError, match=refusal):
        block(torch.randn(2, 4, 5, 5, dtype=F64))
    for name, value in block.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_flop_counter_counts_what_eager_counts():
    """FlopCounterMode tracks modules with global hooks: the blocks run their submodules, whose
    convolutions it knows (the fused ops have no FLOP formula: it counted 14 MFLOP of 3 GFLOP)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    eager = EagerResNet(EagerBlock, [1, 1, 1, 1])
    ours = fp.convert(copy.deepcopy(eager), backend="reference")
    x = torch.randn(2, 3, 32, 32)
    flops = []
    for model in (ours, eager):
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1]


class ReluModuleBlock(EagerBlock):
    """A kuangliu block whose ReLU is a module (convert takes it: a fused block drops it)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(self.relu(self.bn2(self.conv1(out)))) + shortcut


def test_convert_leaves_a_block_whose_dropped_module_has_hooks():
    model = nn.Sequential(ReluModuleBlock(4, 4), ReluModuleBlock(4, 4)).double()
    model[1].relu.register_forward_hook(lambda m, args, out: None)
    converted, report = fp.convert(model, backend="reference", return_report=True)
    assert [name for name, _ in report.swapped] == ["0"]
    assert report.left == [("1", "has submodules with hooks that a fused block does not keep: ['relu']")]
    assert type(converted[1]) is ReluModuleBlock


@pytest.mark.parametrize("stride", [1, 2])
def test_a_hook_keeping_a_batchnorm_output_sees_the_in_place_relu(stride):
    """A feature hook that keeps bn1's output without cloning it: in the wide ResNet block
    its in-place ReLU module then changes that tensor (and the projection reads it), so the
    unfused path must apply the ReLU in place too."""
    torch.manual_seed(0)
    eager = WideBasicBlock(5, 5 if stride == 1 else 6, stride).double()
    randomize_bn(eager)
    ours = fused_copy(eager)
    kept = {}
    for name, model in (("ours", ours), ("eager", eager)):
        model.bn1.register_forward_hook(lambda m, args, out, name=name: kept.__setitem__(name, out))
    x = torch.randn(3, 5, 7, 7, dtype=F64)
    with pytest.warns(UserWarning, match="submodule 'bn1' has hooks"):
        ours_step = train_step(ours, x)
    assert_steps_alike(ours, ours_step, eager, x)
    assert (kept["eager"] >= 0).all()
    assert_close(kept["ours"], kept["eager"], F64, "bn1's kept output")


def test_sync_batchnorms_swapped_in_are_taken_over(monkeypatch):
    """nn.SyncBatchNorm.convert_sync_batchnorm, the usual DistributedDataParallel recipe,
    swaps the BatchNorms inside fused blocks for SyncBatchNorms (before, the blocks ran those
    as local BatchNorms without a word). Where it swapped all of a block's, the block
    synchronises as sync_bn=True does, over their process group, and stays fused
    (tests/test_distributed.py trains with it); where only some, it calls its submodules."""
    torch.manual_seed(0)
    eager = nn.Sequential(EagerBlock(4, 6, 2), EagerBlock(6, 6)).double()
    randomize_bn(eager)
    plain = copy.deepcopy(eager)
    ours = fp.convert(copy.deepcopy(eager), backend="reference")
    ours, eager = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (ours, eager))
    assert type(ours[0].bn1) is nn.SyncBatchNorm and isinstance(ours[0], fp.PreActBlock)
    calls = count_ops(monkeypatch, "bn_relu_conv")
    x = torch.randn(3, 4, 8, 8, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours_step = train_step(ours, x)
    assert calls == {"bn_relu_conv": 5}  # fused: two units and the projection, two units
    assert all(block.sync_bn and block.process_group is None for block in ours)
    assert_steps_alike(ours, ours_step, eager, x)

    ours = fp.convert(plain, backend="reference")
    ours[1].bn2 = nn.SyncBatchNorm.convert_sync_batchnorm(ours[1].bn2)  # bn1 stays local
    calls.update(bn_relu_conv=0)
    with pytest.warns(UserWarning, match=r"submodule 'bn2' is now a SyncBatchNorm, not a BatchNorm2d \(a block "
                                         r"stays fused where all its BatchNorms are SyncBatchNorms"):
        ours(x)
    assert calls == {"bn_relu_conv": 3} and not ours[1].sync_bn


def test_timm_sync_batchnorm_acts_are_taken_over(monkeypatch):
    """timm's convert_sync_batchnorm (its train.py --sync-bn) puts SyncBatchNormAct, an
    nn.SyncBatchNorm that then applies the BatchNormAct2d's drop and act (registered anew, act
    first), where BatchNormAct2d was. Run after fp.convert or before it, the blocks take them
    over as they take nn.SyncBatchNorms (before: after fp.convert the blocks ran unfused, with a
    hint naming nn.SyncBatchNorm.convert_sync_batchnorm, which drops timm's activations; before
    it, convert left every block: "its computation differs"). One process here: the
    SyncBatchNormActs compute local statistics, and so do the blocks."""
    def model():
        torch.manual_seed(0)
        built = nn.Sequential(timm_like.PreActBasic(4, 6, 2), timm_like.PreActBottleneck(6, 6)).double()
        randomize_bn(built)
        return built
    after = timm_like.convert_sync_batchnorm(fp.convert(model(), backend="reference"))
    before, report = fp.convert(timm_like.convert_sync_batchnorm(model()), backend="reference", return_report=True)
    assert all("takes its SyncBatchNorms over" in what for _, what in report.swapped) and not report.left, report
    calls = count_ops(monkeypatch, "bn_relu_conv")
    x = torch.randn(3, 4, 8, 8, dtype=F64)
    for ours in (after, before):
        assert type(ours[0].norm1) is timm_like.SyncBatchNormAct
        calls.update(bn_relu_conv=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours_step = train_step(ours, x)
        assert calls == {"bn_relu_conv": 7}  # fused: two units and the projection, three units and the projection
        assert all(block.sync_bn and block.process_group is None for block in ours)
        assert_steps_alike(ours, ours_step, timm_like.convert_sync_batchnorm(model()), x)


def test_a_sync_batchnorm_subclass_of_unknown_computation_is_not_taken_over():
    """Another subclass of nn.SyncBatchNorm may compute more than it: after fp.convert the block
    calls its submodules, with a warning saying which it takes over; before it, convert leaves
    the block with that reason."""
    class ScaledSyncBatchNorm(nn.SyncBatchNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    def convert_sync(model):
        for block in model:
            for name in ("bn1", "bn2"):
                bn = getattr(block, name)
                synced = ScaledSyncBatchNorm(bn.num_features).double()
                synced.load_state_dict(bn.state_dict())
                setattr(block, name, synced)
        return model
    torch.manual_seed(0)
    eager = nn.Sequential(EagerBlock(4, 4)).double()
    randomize_bn(eager)
    ours = convert_sync(fp.convert(copy.deepcopy(eager), backend="reference"))
    x = torch.randn(3, 4, 8, 8, dtype=F64)
    with pytest.warns(UserWarning, match=r"'bn1' is now a ScaledSyncBatchNorm, not a BatchNorm2d \(a block takes over "
                                         r"nn.SyncBatchNorm and timm's SyncBatchNormAct only"):
        ours_step = train_step(ours, x)
    assert_steps_alike(ours, ours_step, convert_sync(eager), x)
    _, report = fp.convert(convert_sync(copy.deepcopy(eager)), backend="reference", return_report=True)
    assert not report.swapped, report
    assert "has a ScaledSyncBatchNorm, a subclass of nn.SyncBatchNorm" in report.left[0][1], report


def test_convert_takes_blocks_whose_batchnorms_are_sync_batchnorms(monkeypatch):
    """nn.SyncBatchNorm.convert_sync_batchnorm run before fp.convert (before, convert left
    every block: "bn1 must be nn.BatchNorm2d"). The blocks keep the user's SyncBatchNorms and
    take them over, as they do where the swap comes after (tests/test_distributed.py trains
    both orders); a block with only some of them swapped runs unfused."""
    torch.manual_seed(0)
    eager = nn.Sequential(EagerBlock(4, 6, 2), EagerBlock(6, 6), WideBasicBlock(6, 6, 1)).double()
    randomize_bn(eager)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(eager))
    sync_bns = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    ours, report = fp.convert(synced, backend="reference", return_report=True)
    assert [name for name, _ in report.swapped] == ["0", "1", "2"] and not report.left, report
    assert all("takes its SyncBatchNorms over" in what for _, what in report.swapped), report
    assert [m for m in ours.modules() if isinstance(m, nn.SyncBatchNorm)] == sync_bns
    assert all(block.sync_bn and block.process_group is None for block in ours)
    calls = count_ops(monkeypatch, "bn_relu_conv")
    x = torch.randn(3, 4, 8, 8, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours_step = train_step(ours, x)
    assert calls == {"bn_relu_conv": 7}  # fused: two units and the projection, then two units twice
    assert_steps_alike(ours, ours_step, eager, x)

    partly = copy.deepcopy(eager)
    partly[1].bn2 = nn.SyncBatchNorm.convert_sync_batchnorm(partly[1].bn2)
    ours, report = fp.convert(partly, backend="reference", return_report=True)
    assert "runs unfused" in dict(report.swapped)["1"] and not ours[1].sync_bn, report


def test_convert_refuses_a_process_group_other_than_the_sync_batchnorms_own():
    """A block takes its SyncBatchNorms over with their process group (what eager would
    synchronise over); convert(process_group=G) on SyncBatchNorms of another group would
    ignore G without a word, so it raises first, the model as it was. Their own group is fine."""
    group, other = object(), object()  # stand-ins: SyncBatchNorm keeps the object, nothing communicates here
    eager = nn.Sequential(EagerBlock(4, 6, 2), EagerBlock(6, 6))
    for given in (other, group):
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(eager), process_group=group)
        state = copy.deepcopy(synced.state_dict())
        if given is other:
            with pytest.raises(ValueError, match=r"process_group was given, but the SyncBatchNorm '0.bn1' "
                                                 r"synchronises over another group"):
                fp.convert(synced, sync_bn=True, process_group=given)
            assert [type(block) for block in synced] == [EagerBlock, EagerBlock]
            assert all(torch.equal(state[k], v) for k, v in synced.state_dict().items())
            continue
        ours = fp.convert(synced, sync_bn=True, process_group=given)
        assert all(isinstance(block, fp.PreActBlock) and block.sync_bn and block.process_group is group
                   for block in ours)


def test_a_conv_replaced_by_one_that_computes_otherwise_runs_as_eager(monkeypatch):
    """A conv swapped after the block was built (QAT's fake-quantised conv, a weight-standardised
    one): the block calls it. A parametrized weight (weight_norm) computes alike: fused."""
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    eager = EagerBlock(4, 4).double()
    randomize_bn(eager)
    ours = fused_copy(eager)
    calls = count_ops(monkeypatch, "bn_relu_conv")
    for model in (ours, eager):
        weight_norm(model.conv1)
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    out = ours(x)
    assert calls == {"bn_relu_conv": 2}
    assert_close(out, eager(x), F64, "weight_norm")
    for model in (ours, eager):
        standardized = StandardizedConv2d(4, 4, 3, padding=1, bias=False).double()
        standardized.load_state_dict(model.conv2.state_dict())
        model.conv2 = standardized
    calls.update(bn_relu_conv=0)
    with pytest.warns(UserWarning, match="submodule 'conv2' is now a StandardizedConv2d, not a Conv2d"):
        ours_step = train_step(ours, x)
    assert calls == {"bn_relu_conv": 0}
    assert_steps_alike(ours, ours_step, eager, x)


class StandardizedConv2d(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        return self._conv_forward(x, (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True),
                                  None)


def test_hooks_inside_under_torch_compile():
    """fullgraph=True compiles the unfused path (hooks included) as it does the fused one."""
    torch.manual_seed(0)
    eager = nn.Sequential(EagerBlock(4, 6, 2), EagerBlock(6, 6)).double()
    randomize_bn(eager)
    ours = fp.convert(copy.deepcopy(eager), backend="reference")
    for model in (ours, eager):
        model[1].conv1.register_forward_hook(lambda mod, args, out: out * 0.5 + 0.1)
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    torch._dynamo.reset()
    try:
        out = torch.compile(ours, backend="aot_eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert_close(out, eager(x), F64, "compiled output")

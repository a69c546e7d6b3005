"""convert(): swaps verified blocks, keeps parameters / keys / mode, reports what it left."""
import copy
import functools
import logging
import warnings

import pytest

import torch
import torch.nn.functional as F
from torch import nn

import fused_preact as fp
from fused_preact.testing import (DropoutPreActBlock, NoBN2PreActBlock, PreActBlock, PreActBottleneck,
                          PreActResNet, RawShortcutPreActBlock, WideBasicBlock)
from fused_preact.testing import randomize_bn
from helpers import (DEVICE, assert_close, assert_step_within_eager_error, assert_within_eager_error, node_names,
                     use_backend_or_skip)


def test_convert_kuangliu_resnet():
    torch.manual_seed(0)
    model = PreActResNet(PreActBottleneck, [1, 2, 1, 1]).double()
    randomize_bn(model)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = {id(p) for p in model.parameters()}
    model.eval()
    converted, report = fp.convert(model, return_report=True)
    assert len(report.swapped) == 5 and not report.left, report
    assert all(isinstance(b, fp.PreActBottleneck) for layer in (converted.layer1, converted.layer2) for b in layer)
    assert list(converted.state_dict()) == keys
    assert {id(p) for p in converted.parameters()} == params  # optimizers keep working
    assert not converted.training and not converted.layer2[1].training
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_close(converted(x), reference.eval()(x), torch.float64, "converted model")


def test_convert_detects_raw_input_shortcut():
    model = nn.Sequential(RawShortcutPreActBlock(4, 8, 2), PreActBlock(8, 8, 1), PreActBlock(8, 6, 1)).double()
    reference = copy.deepcopy(model)
    converted, report = fp.convert(model, return_report=True)
    assert [what for _, what in report.swapped] == [
        "PreActBlock(shortcut='input')", "PreActBlock(shortcut='preact')", "PreActBlock(shortcut='preact')"]
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    assert_close(converted(x), reference(x), torch.float64, "train-mode output")
    assert_close(converted[0].bn1.running_mean, reference[0].bn1.running_mean, torch.float64, "running stats")


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_convert_takes_same_and_valid_padding(backend, dtype):
    """Convs written with padding='same' (odd kernels, stride 1) or 'valid' pad what the
    integers 1 and 0 pad: swapped, and a training step (output, gradients, running
    statistics) matches eager's."""
    torch.manual_seed(0)
    model = nn.Sequential(PreActBlock(4, 8, 2), PreActBlock(8, 8, 1))
    model[0].shortcut[0] = nn.Conv2d(4, 8, 1, stride=2, padding="valid", bias=False)
    model[1].conv1 = nn.Conv2d(8, 8, 3, padding="same", bias=False)
    model[1].conv2 = nn.Conv2d(8, 8, (3, 1), padding="same", bias=False)
    randomize_bn(model)
    model = model.to(dtype)
    reference = copy.deepcopy(model)
    converted, report = fp.convert(model, backend=backend, return_report=True)
    assert len(report.swapped) == 2 and not report.left, report
    x = torch.randn(3, 4, 9, 9, dtype=dtype)
    weights = torch.randn(3, 8, 5, 5, dtype=dtype)
    steps = []
    for net in (converted, reference):
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        (out * weights).sum().backward()
        steps.append([out, xi.grad, *(p.grad for p in net.parameters()), *net.buffers()])
    for i, (got, want) in enumerate(zip(*steps)):
        assert_close(got, want, dtype, f"tensor {i} of the step")


def test_convert_leaves_blocks_that_compute_something_else(caplog):
    model = nn.Sequential(DropoutPreActBlock(4, 4), NoBN2PreActBlock(4, 4), PreActBlock(4, 4))
    with caplog.at_level(logging.WARNING, logger="fused_preact.convert"):
        converted, report = fp.convert(model, return_report=True)
    assert type(converted[0]) is DropoutPreActBlock and type(converted[1]) is NoBN2PreActBlock
    assert isinstance(converted[2], fp.PreActBlock)
    reasons = dict(report.left)
    assert "['drop']" in reasons["0"]
    assert "differs from every fused variant" in reasons["1"]
    assert "left 1 (NoBN2PreActBlock) untouched" in caplog.text
    assert "2 blocks swapped" not in str(report) and "1 blocks swapped, 2 left" in str(report)


class DeepMindBlock(nn.Module):
    """The attribute names of RobustBench's DMPreActResNet block (stride 1), which no layout of
    convert's has."""

    def __init__(self, planes):
        super().__init__()
        self.batchnorm_0, self.relu_0 = nn.BatchNorm2d(planes), nn.SiLU()
        self.conv_2d_1 = nn.Conv2d(planes, planes, 3, padding=0, bias=False)
        self.batchnorm_1, self.relu_1 = nn.BatchNorm2d(planes), nn.SiLU()
        self.conv_2d_2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv_2d_1(F.pad(self.relu_0(self.batchnorm_0(x)), (1, 1, 1, 1)))
        return x + self.conv_2d_2(self.relu_1(self.batchnorm_1(out)))


def test_convert_warns_where_it_finds_no_block(caplog):
    """A model with no layout convert knows runs eager: convert says so and names the layouts it
    swaps. A model whose blocks are fused already gets no warning."""
    model = nn.Sequential(DeepMindBlock(4), DeepMindBlock(4))
    keys = list(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="fused_preact.convert"):
        converted, report = fp.convert(model, return_report=True)
    assert not report.swapped and not report.left and list(converted.state_dict()) == keys
    assert all(type(block) is DeepMindBlock for block in converted)
    assert "found no pre-activation block in Sequential" in caplog.text
    assert "PreActBlock (bn1, conv1, bn2, conv2, [shortcut])" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fused_preact.convert"):
        fp.convert(converted)  # again: still nothing
        fp.convert(fp.models.preact_resnet18())
        fp.convert(nn.Sequential(fp.FusedBNReLUConv2d(4, 4, 3)))
    assert caplog.text.count("found no pre-activation block") == 1, caplog.text


def test_convert_keeps_device_dtype_and_backend():
    model = nn.Sequential(PreActBlock(3, 4, 2)).to(torch.bfloat16)
    converted = fp.convert(model, backend="reference")
    block = converted[0]
    assert isinstance(block, fp.PreActBlock) and block.backend == "reference"
    assert block.conv1.weight.dtype == torch.bfloat16


def test_convert_timm_resnetv2_layout():
    import timm_like
    model = nn.Sequential(timm_like.PreActBottleneck(8, 16, 2), timm_like.PreActBasic(16, 16),
                          timm_like.PreActBasic(16, 24, 2)).double()
    randomize_bn(model)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted, report = fp.convert(model, return_report=True)
    assert [what for _, what in report.swapped] == [
        "TimmPreActBottleneck(shortcut='preact')", "TimmPreActBasic(shortcut='preact')",
        "TimmPreActBasic(shortcut='preact')"]
    assert list(converted.state_dict()) == keys
    for training in (True, False):
        converted.train(training), reference.train(training)
        x = torch.randn(3, 8, 9, 9, dtype=torch.float64, requires_grad=True)
        out = converted(x)
        ref = reference(x)
        assert_close(out, ref, torch.float64, f"timm layout output (training={training})")
        gx, = torch.autograd.grad(out.square().sum(), x)
        ref_gx, = torch.autograd.grad(ref.square().sum(), x)
        assert_close(gx, ref_gx, torch.float64, "timm layout grad x")


def test_convert_timm_leaves_other_activations():
    import timm_like
    model = nn.Sequential(timm_like.PreActBasic(8, 8, act_layer=nn.SiLU))
    converted, report = fp.convert(model, return_report=True)
    assert not report.swapped
    assert "differs from every fused variant" in dict(report.left)["0"]  # SiLU, not ReLU


def train_step(model, x):
    """Output, input gradient, parameter gradients and buffers after one training step."""
    model.train()
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out, x.grad, *(p.grad for p in model.parameters()), *model.buffers()]


def eager_truth_fused(build, x, backend: str, monkeypatch):
    """What a float32 test against float64 compares: build()'s model on x's device (eager
    float32), its float64 copy (the truth) and its conversion to `backend`, every block
    swapped. Skips where the backend declines x."""
    use_backend_or_skip(backend, monkeypatch, x)
    eager = build().to(x.device)
    ours, report = fp.convert(copy.deepcopy(eager), backend=backend, return_report=True)
    assert not report.left and report.swapped, report
    return eager, copy.deepcopy(eager).double(), ours


def drop_path_model():
    """timm-layout blocks as drop_path_rate makes them: the first without stochastic depth
    (it hands its statistics to the next), then identity, projection and bottleneck blocks
    with it, then one without, which computes its own statistics after a dropped branch."""
    import timm_like
    torch.manual_seed(0)
    model = nn.Sequential(timm_like.PreActBasic(8, 8),
                          timm_like.PreActBasic(8, 8, drop_path=timm_like.DropPath()),
                          timm_like.PreActBasic(8, 12, 2, drop_path=timm_like.DropPath()),
                          timm_like.PreActBottleneck(12, 16, drop_path=timm_like.DropPath()),
                          timm_like.PreActBasic(16, 16))
    randomize_bn(model)
    return model


@pytest.mark.parametrize("backend", fp.dispatch.BACKEND_NAMES)
def test_drop_path_blocks_fused_draw_the_masks_eager_draws(backend, monkeypatch):
    """timm's drop_path_rate puts a DropPath in every block but the first: the fused block
    calls it on its residual branch where the eager block does, so with the same seed it
    draws the same per-image masks, and the shortcut joins after it. float32 against the
    float64 truth, within twice eager float32's error (plus the float32 floor)."""
    x = torch.randn(6, 8, 7, 7, device=DEVICE)
    eager, truth, ours = eager_truth_fused(drop_path_model, x, backend, monkeypatch)
    results = []
    for model, dtype in ((truth, torch.float64), (eager, torch.float32), (ours, torch.float32)):
        torch.manual_seed(1)
        results.append(train_step(model, x.to(dtype)))
        results.append(model.eval()(x.to(dtype)))
    truth_masks, eager_masks, our_masks = ([m.masks for m in model.modules() if hasattr(m, "masks")]
                                           for model in (truth, eager, ours))
    assert truth_masks == eager_masks == our_masks, "the three models drew different masks"
    assert {0.0, 1.0} <= {v for block in eager_masks for step in block for v in step}, "no image dropped and kept"
    assert_step_within_eager_error(eager, results[0], results[2], results[4], "train step")
    assert_within_eager_error(results[5], results[3], results[1], "eval output")


@pytest.mark.parametrize("backend", fp.dispatch.BACKEND_NAMES)
def test_a_drop_path_that_returns_its_input_is_not_called(backend, monkeypatch):
    """timm's DropPath returns its input in eval and at drop_prob 0: there the fused block
    computes as one without it (its last conv adds the shortcut, and a chain hands the
    statistics on across it) and does not call it. float32 against the float64 truth,
    within twice eager float32's error (plus the float32 floor)."""
    import timm_like
    x = torch.randn(6, 8, 7, 7, device=DEVICE)
    eager, truth, ours = eager_truth_fused(drop_path_model, x, backend, monkeypatch)
    for model in (eager, truth, ours):
        for module in model.modules():
            if isinstance(module, timm_like.DropPath):
                module.drop_prob = 0.0
                if model is ours:
                    module.forward = lambda _: pytest.fail("a fused block called a DropPath that passes through")
    implementations = fp.dispatch.get_backend(backend).impls
    passes = []
    monkeypatch.setitem(implementations, "batch_stats",
                        functools.partial(lambda real, **args: passes.append(1) or real(**args),
                                          implementations["batch_stats"]))
    monkeypatch.setattr(fp.block_autograd.PLANS, "programs", {})  # (a replay calls the implementation it kept)
    results = [train_step(model, x.to(dtype)) for model, dtype in
               ((truth, torch.float64), (eager, torch.float32), (ours, torch.float32))]
    assert_step_within_eager_error(eager, *results, "train step at drop_prob 0")
    assert len(passes) == 1, "the chain did not hand the statistics on across the DropPaths"
    for module in (*truth.modules(), *eager.modules(), *ours.modules()):
        if isinstance(module, timm_like.DropPath):
            module.drop_prob = 0.5  # drops in training, passes through in eval
    truth_out, eager_out, our_out = (model.eval()(x.to(dtype)) for model, dtype in
                                     ((truth, torch.float64), (eager, torch.float32), (ours, torch.float32)))
    assert_within_eager_error(our_out, eager_out, truth_out, "eval output")


def seeded_train_step(model, x):
    """train_step with the seed reset first: the models' DropPaths draw the same masks."""
    torch.manual_seed(1)
    return train_step(model, x)


def avg_down_model():
    """timm's "d" models (avg_down): a stage's first block has a DownsampleAvg, whose pool is
    an Identity without a stride and an nn.AvgPool2d(2, 2, ceil_mode=True) at stride 2 (the
    last one with stochastic depth, as drop_path_rate gives it)."""
    import timm_like
    torch.manual_seed(0)
    model = nn.Sequential(timm_like.PreActBottleneck(8, 16, 1, avg_down=True), timm_like.PreActBasic(16, 16),
                          timm_like.PreActBasic(16, 24, 2, avg_down=True),
                          timm_like.PreActBottleneck(24, 32, 2, avg_down=True, drop_path=timm_like.DropPath()))
    randomize_bn(model)
    return model


def test_convert_timm_avg_down_computes_the_pooled_projection_as_one_conv(monkeypatch):
    """At even sizes the fused block computes pool + 1x1 conv as one 2x2 stride-2 conv (no
    pool called); at an odd size ceil_mode's last window averages fewer values, so the block
    calls its submodules, with a warning. float64 training steps and eval against timm's."""
    model = avg_down_model().double()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted, report = fp.convert(model, return_report=True)
    assert [name for name, _ in report.swapped] == ["0", "1", "2", "3"] and not report.left, report
    assert list(converted.state_dict()) == keys
    for size in ((8, 8), (12, 16), (9, 9)):
        x = torch.randn(3, 8, *size, dtype=torch.float64)
        torch.manual_seed(1)
        expected = [*train_step(reference, x), reference.eval()(x)]
        with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if size != (9, 9):
                patch.setattr(nn.AvgPool2d, "forward", lambda *_: pytest.fail("the pool ran at an even size"))
            torch.manual_seed(1)
            got = [*train_step(converted, x), converted.eval()(x)]
        unfused = {str(w.message) for w in caught}
        if size == (9, 9):  # 9 x 9, then 5 x 5: both pooled blocks see an odd size
            assert len(unfused) == 2 and all("pools an input of odd size" in m for m in unfused), unfused
        else:
            assert not unfused, unfused
        for a, b in zip(got, expected, strict=True):
            assert_close(a, b, torch.float64, f"timm avg_down model at {size}")


class AvgPool2dSame(nn.AvgPool2d):
    """timm's: an nn.AvgPool2d that pads unevenly (a dilated stage's avg_down, stride 1)."""

    def forward(self, x):
        return super().forward(F.pad(x, [0, 1, 0, 1]))


@pytest.mark.parametrize("pool", [AvgPool2dSame(2, 1, ceil_mode=True, count_include_pad=False),
                                  nn.AvgPool2d(3, 2, padding=1), nn.AvgPool2d(2, 2, divisor_override=3),
                                  nn.MaxPool2d(2, 2)], ids=["AvgPool2dSame", "3x3", "divisor", "max"])
def test_convert_leaves_a_downsample_pool_no_conv_computes_and_says_so(pool):
    import timm_like
    block = timm_like.PreActBasic(8, 16, 2, avg_down=True)
    block.downsample.pool = pool
    _, report = fp.convert(nn.Sequential(block), return_report=True)
    assert not report.swapped and "downsample pools with" in dict(report.left)["0"], report


@pytest.mark.parametrize("backend", fp.dispatch.BACKEND_NAMES)
def test_avg_down_blocks_within_eagers_float32_error(backend, monkeypatch):
    """The pooled projection's 2x2 stride-2 conv (BN + ReLU prologue) on every backend:
    float32 against the float64 truth, within twice eager float32's error (plus the float32
    floor), at an even size (fused) and an odd one (the pooled blocks call their submodules)."""
    x = torch.randn(4, 8, 12, 16, device=DEVICE)
    eager, truth, ours = eager_truth_fused(avg_down_model, x, backend, monkeypatch)
    for x in (x, x[..., :11, :13]):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "fused_preact: .* pools an input of odd size")
            results = [seeded_train_step(model, x.to(dtype)) for model, dtype in
                       ((truth, torch.float64), (eager, torch.float32), (ours, torch.float32))]
        assert_step_within_eager_error(eager, *results, str(tuple(x.shape)))


def test_avg_down_model_compiles_with_fullgraph():
    """torch.compile traces the pooled projection's derived weight and the DropPath that
    follows the block's units (no graph break) and gives timm's training step from the same
    seed (aot_eager draws the masks eager draws); float64, reference backend."""
    import timm_like
    model = avg_down_model().double()
    model[3].drop_path = timm_like.DropPath(keep_masks=False)
    reference = copy.deepcopy(model)
    compiled = torch.compile(fp.convert(model, backend="reference"), fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 8, 12, 16, dtype=torch.float64)  # (seeded_train_step's seed drops the fifth image)
    for got, expected in zip(seeded_train_step(compiled, x), seeded_train_step(reference, x), strict=True):
        assert_close(got, expected, torch.float64, "compiled timm avg_down model")


def test_avg_down_blocks_keep_at_most_55_percent_of_eager_activations():
    """The pooled projection reads x, which the first unit keeps anyway; eager keeps the pool's output too."""
    from benchmarks.run import saved_activation_bytes
    eager = avg_down_model()
    ours = fp.convert(copy.deepcopy(eager), backend="reference")
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    ratio = saved_activation_bytes(ours, x) / saved_activation_bytes(eager, x)
    assert ratio <= 0.55, ratio


def test_drop_path_blocks_keep_at_most_55_percent_of_eager_activations():
    """The drop module multiplies the branch by a mask that needs no gradient: autograd
    keeps the mask (one value per image), not the branch."""
    from benchmarks.run import saved_activation_bytes
    eager = drop_path_model()
    ours = fp.convert(copy.deepcopy(eager), backend="reference")
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    ratio = saved_activation_bytes(ours, x) / saved_activation_bytes(eager, x)
    assert ratio <= 0.55, ratio


# timm's registered pre-activation ResNets: (name, create_model's options, blocks fused, blocks
# left). The "d" models' stride-2 projections pool first (avg_down: PooledConv), and their deep
# stem is no block; drop_path_rate gives every block but the first a DropPath (stochastic depth).
REAL_TIMM_MODELS = [("resnetv2_18", {}, 8, []), ("resnetv2_50", {}, 16, []),
                    ("resnetv2_50d", {}, 16, ["stem"]),
                    ("resnetv2_50", {"drop_path_rate": 0.2}, 16, []),
                    ("resnetv2_50d", {"drop_path_rate": 0.2}, 16, ["stem"]),
                    ("resnetv2_50d", {"drop_path_rate": 0.2, "grad_checkpointing": True}, 16, ["stem"])]


@pytest.mark.parametrize("name,options,fused,left", REAL_TIMM_MODELS,
                         ids=[name + "".join(f"-{k}" for k in options) for name, options, *_ in REAL_TIMM_MODELS])
def test_convert_real_timm_resnetv2_if_installed(name, options, fused, left):
    """What tests/timm_like.py stands in for where timm (which needs torchvision) is installed:
    its models as timm.create_model builds them, converted, against themselves in float64
    (BatchNorms randomised as after training): one training step's output, gradients and
    buffers, from the same seed (DropPath's masks). Each fused block is one autograd node.
    grad_checkpointing: timm's model.set_grad_checkpointing(True) on both (its stages then
    call their blocks through torch.utils.checkpoint, recomputing each in the backward)."""
    timm = pytest.importorskip("timm", reason="timm (which needs torchvision) is not installed")
    if name not in timm.list_models(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    options = dict(options)
    checkpointing = options.pop("grad_checkpointing", False)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **options).double()
    randomize_bn(model)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted, report = fp.convert(model, backend="reference", return_report=True)
    for checkpointed in (reference, converted):
        checkpointed.set_grad_checkpointing(checkpointing)
    assert len(report.swapped) == fused and [where for where, _ in report.left] == left, report
    assert list(converted.state_dict()) == keys
    # 64 x 64 images: the last stage's BatchNorms see 2 x 2 pixels per image. At 32 x 32 they see
    # one, two values per channel, and the two models' float64 results differed by 1e-8 relative.
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(1)
    expected_step = train_step(reference, x)
    torch.manual_seed(1)
    got_step = train_step(converted, x)
    for got, expected in zip(got_step, expected_step, strict=True):
        assert_close(got, expected, torch.float64, f"timm {name}")
    assert node_names(got_step[0])["BlockFunctionBackward"] == fused


def test_real_timm_sync_batchnorm_act_if_installed():
    """tests/test_unfused.py's SyncBatchNormAct test on timm's own classes and converter: the
    blocks take them over, before fp.convert and after it (one process: local statistics)."""
    timm = pytest.importorskip("timm", reason="timm (which needs torchvision) is not installed")
    from timm.layers import convert_sync_batchnorm
    base = timm.create_model("resnetv2_18").double()
    randomize_bn(base)
    before, report = fp.convert(convert_sync_batchnorm(copy.deepcopy(base)), backend="reference", return_report=True)
    assert len(report.swapped) == 8 and not report.left, report
    assert all("takes its SyncBatchNorms over" in what for _, what in report.swapped), report
    after = convert_sync_batchnorm(fp.convert(copy.deepcopy(base), backend="reference"))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # as test_convert_real_timm_resnetv2_if_installed
    expected = train_step(convert_sync_batchnorm(base), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ours in (before, after):
            for got, want in zip(train_step(ours, x), expected, strict=True):
                assert_close(got, want, torch.float64, "timm --sync-bn model")
            assert all(block.sync_bn for block in ours.modules() if isinstance(block, fp.nn.TimmPreActBasic))


class FunctionalDropoutBlock(PreActBlock):
    """Wide-ResNet style: F.dropout in forward, no dropout submodule (identity in eval)."""

    def forward(self, x):
        out = torch.nn.functional.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = torch.nn.functional.dropout(self.conv1(out), 0.3, training=self.training)
        out = self.conv2(torch.nn.functional.relu(self.bn2(out)))
        return out + shortcut


class CountingBatchBlock(PreActBlock):
    """Same outputs and gradients, but bn2 runs twice in training (running stats differ)."""

    def forward(self, x):
        if self.training:
            self.bn2(self.conv1(torch.nn.functional.relu(self.bn1(x))).detach())
        return super().forward(x)


def test_convert_leaves_blocks_that_differ_only_in_training():
    model = nn.Sequential(FunctionalDropoutBlock(4, 4), CountingBatchBlock(4, 4), PreActBlock(4, 4)).double()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    converted, report = fp.convert(model, return_report=True)
    assert torch.equal(torch.get_rng_state(), rng), "the probe moved the user's RNG"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the probe changed the model"
    assert type(converted[0]) is FunctionalDropoutBlock and type(converted[1]) is CountingBatchBlock
    assert isinstance(converted[2], fp.PreActBlock)
    assert {name for name, _ in report.left} == {"0", "1"}
    assert all("train mode" in why for _, why in report.left)


def test_convert_switches_already_fused_models_to_sync_bn():
    model = fp.models.preact_resnet18()
    converted, report = fp.convert(model, sync_bn=True, return_report=True)
    blocks = [b for b in converted.modules() if isinstance(b, fp.nn._PreActUnits)]
    assert blocks and all(b.sync_bn for b in blocks)
    assert sum("sync_bn on" in what for _, what in report.updated) == len(blocks)
    assert all(b.sync_bn for b in fp.models.preact_resnet18(sync_bn=True).modules()
               if isinstance(b, fp.nn._PreActUnits))


def test_convert_a_block_used_twice_and_its_hooks():
    shared = PreActBlock(4, 4).double()
    fired = []
    handle = shared.register_forward_hook(lambda m, i, o: fired.append(type(m).__name__))
    model = nn.Sequential(shared, PreActBlock(4, 4), shared).double()
    converted, report = fp.convert(model, return_report=True)
    assert not fired, "the probe fired the user's hook"
    assert converted[0] is converted[2] and isinstance(converted[0], fp.PreActBlock)
    assert [name for name, _ in report.swapped] == ["0", "1", "2"] and "hooks moved" in report.swapped[0][1]
    converted(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert fired == ["PreActBlock", "PreActBlock"]  # the fused block, at both places
    handle.remove()  # the user's handle still removes it
    converted(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert len(fired) == 2


def test_converted_sequential_hands_statistics_from_block_to_block(monkeypatch):
    """A user's nn.Sequential of blocks: after convert only the first block of each run of
    fused blocks reads its input for statistics; same numbers, same keys, hooks still fire."""
    from fused_preact.backends import reference
    torch.manual_seed(0)
    model = nn.Sequential(PreActBlock(4, 8, 2), PreActBlock(8, 8), PreActBlock(8, 8), nn.ReLU(),
                          PreActBlock(8, 8), PreActBlock(8, 8)).double()
    randomize_bn(model)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted, report = fp.convert(model, return_report=True)
    assert converted is model and type(converted) is fp.nn.FusedSequential and list(converted.state_dict()) == keys
    assert report.updated == [("", "nn.Sequential -> FusedSequential: consecutive fused blocks hand their "
                                   "statistics on")]
    assert str(report).splitlines()[0] == "fused_preact.convert: 5 blocks swapped, 0 left, 1 modules updated"
    calls = []
    real = reference.BACKEND.impls["batch_stats"]
    monkeypatch.setitem(reference.BACKEND.impls, "batch_stats", lambda **kw: calls.append(1) or real(**kw))
    # No plan recorded by an earlier test: its replay would call the implementation it kept.
    monkeypatch.setattr(fp.block_autograd.PLANS, "programs", {})
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    out = converted(x)
    assert len(calls) == 2  # the first block, and the first after the ReLU
    ref_x = x.detach().clone().requires_grad_(True)
    ref = eager(ref_x)
    assert_close(out, ref, torch.float64, "chained output")
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_close(x.grad, ref_x.grad, torch.float64, "chained grad x")
    for (name, a), (_, b) in zip(converted.state_dict().items(), eager.state_dict().items()):
        assert_close(a.double(), b.double(), torch.float64, name)
    fired = []
    converted[1].register_forward_hook(lambda m, i, o: fired.append(1))
    calls.clear()
    converted(x)
    # A hooked block is called as a module: it, and the block after it, read their inputs.
    assert fired == [1] and len(calls) == 4


def test_convert_wide_resnet_blocks():
    """The wide ResNet block of robustness code (WRN-28-10, WRN-34-10): identity and projection
    blocks swapped (its ReLU modules dropped), state_dict keys kept, the same numbers in
    training and eval; with dropout between the convs it is left."""
    torch.manual_seed(0)
    model = nn.Sequential(WideBasicBlock(4, 8, 1), WideBasicBlock(8, 8, 1), WideBasicBlock(8, 12, 2)).double()
    randomize_bn(model)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted, report = fp.convert(model, return_report=True)
    assert report.swapped == [(str(i), "WideResNetBasic(shortcut='preact')") for i in range(3)]
    assert list(converted.state_dict()) == keys
    for training in (True, False):
        converted.train(training), eager.train(training)
        x = torch.randn(3, 4, 9, 9, dtype=torch.float64, requires_grad=True)
        ref_x = x.detach().clone().requires_grad_(True)
        out, ref = converted(x), eager(ref_x)
        assert_close(out, ref, torch.float64, f"output (training={training})")
        out.square().sum().backward()
        ref.square().sum().backward()
        assert_close(x.grad, ref_x.grad, torch.float64, f"grad x (training={training})")
        for (name, a), (_, b) in zip(converted.named_parameters(), eager.named_parameters()):
            assert_close(a.grad, b.grad, torch.float64, f"grad {name} (training={training})")
        for (name, a), (_, b) in zip(converted.state_dict().items(), eager.state_dict().items()):
            assert_close(a.double(), b.double(), torch.float64, name)
    _, report = fp.convert(nn.Sequential(WideBasicBlock(8, 8, 1, drop_rate=0.3)), return_report=True)
    assert not report.swapped and "differs from every fused variant" in report.left[0][1]

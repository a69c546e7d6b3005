"""Bad input raises a clear error naming the argument, never a wrong answer."""
import pytest
import torch
from torch import nn

import fused_preact as fp
from fused_preact import ops
from fused_preact.backends.reference import partials_of


def test_groups_and_dilation_rejected():
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
    with pytest.raises(ValueError, match=r"conv.groups=2 is not supported \(groups=1 only\)"):
        fp.FusedBNReLUConv2d.from_modules(bn, conv)
    conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
    with pytest.raises(ValueError, match=r"conv.dilation=\(2, 2\) is not supported"):
        fp.FusedBNReLUConv2d.from_modules(bn, conv)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=True)
    with pytest.raises(ValueError, match="has a bias"):
        fp.FusedBNReLUConv2d.from_modules(bn, conv)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        fp.FusedBNReLUConv2d.from_modules(bn, conv)
    conv = nn.Conv2d(4, 4, (3, 2), padding="same", bias=False)  # pads one side of the width more
    with pytest.raises(ValueError, match=r"padding='same', padding_mode='zeros' with kernel \(3, 2\)"):
        fp.FusedBNReLUConv2d.from_modules(bn, conv)


class WeightStandardizedConv2d(nn.Conv2d):
    """A conv that computes something else than nn.Conv2d (timm's StdConv2d does this)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class SiLUBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        return nn.functional.silu(super().forward(x))


class RenamedConv2d(nn.Conv2d):
    """A subclass that computes what nn.Conv2d computes."""


def test_wrapped_modules_that_compute_something_else_rejected():
    """from_modules runs no numerical probe (convert does): a subclass with its own forward
    would be replaced by nn.Conv2d's / nn.BatchNorm2d's computation without a word."""
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, bias=False)
    with pytest.raises(TypeError, match="conv is a WeightStandardizedConv2d, whose forward is not Conv2d's"):
        fp.FusedBNReLUConv2d.from_modules(bn, WeightStandardizedConv2d(4, 4, 3, padding=1, bias=False))
    with pytest.raises(TypeError, match="bn is a SiLUBatchNorm2d, whose forward is not BatchNorm2d's"):
        fp.FusedBNReLUConv2d.from_modules(SiLUBatchNorm2d(4), conv)
    fp.FusedBNReLUConv2d.from_modules(bn, RenamedConv2d(4, 4, 3, padding=1, bias=False))


def test_one_value_per_channel_in_training():
    block = fp.PreActBlock(4, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        block(torch.randn(1, 4, 1, 1))
    block.eval()
    assert block(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


def test_dtype_mismatch_named():
    block = fp.PreActBlock(4, 4).double()
    with pytest.raises(TypeError, match="x is torch.float32 but the weights are torch.float64"):
        block(torch.randn(2, 4, 5, 5))


def test_integer_input_named():
    block = fp.FusedBNReLUConv2d(4, 4)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.bn_relu_conv(torch.ones(2, 4, 5, 5, dtype=torch.int32), None, None, None, None,
                         block.conv.weight, None, [1, 1], [1, 1], 1e-5, False, False, None, None, None, None,
                         "reference")


def test_device_mismatch_named():
    x = torch.randn(2, 4, 5, 5, device="meta")
    w = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="weight is on cpu but x is on meta"):
        ops.check_unit_args(x, None, None, None, None, w, None, [1, 1], [1, 1])
    w = torch.randn(4, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match="mean is on cpu but x is on meta"):
        ops.check_unit_args(x, torch.zeros(4), torch.ones(4), None, None, w, None, [1, 1], [1, 1])


def test_shape_errors_named():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="x must be a 4-D NCHW tensor"):
        ops.check_unit_args(torch.randn(3, 5, 5), None, None, None, None, w, None, [1, 1], [1, 1])
    with pytest.raises(ValueError, match="weight expects 3 input channels"):
        ops.check_unit_args(torch.randn(2, 5, 5, 5), None, None, None, None, w, None, [1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        ops.check_unit_args(torch.randn(2, 3, 5, 5), torch.zeros(4), torch.ones(4), None, None, w, None, [1, 1], [1, 1])
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.check_unit_args(torch.randn(2, 3, 5, 5), None, None, None, None, w, torch.randn(2, 4, 4, 4), [1, 1], [1, 1])
    with pytest.raises(ValueError, match="stride must be two ints >= 1"):
        ops.check_unit_args(torch.randn(2, 3, 5, 5), None, None, None, None, w, None, [0, 1], [1, 1])
    with pytest.raises(ValueError, match="too small for kernel"):
        ops.check_unit_args(torch.randn(2, 3, 1, 1), None, None, None, None, w, None, [1, 1], [0, 0])


def test_bad_shortcut_source():
    with pytest.raises(ValueError, match="shortcut must be one of"):
        fp.PreActBlock(4, 8, shortcut="raw")


def module_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


BAD_UNIT_CALLS = {
    "float64 x, float32 weights": lambda: (fp.FusedBNReLUConv2d(4, 4), (torch.randn(2, 4, 5, 5, dtype=torch.float64),)),
    "int64 x": lambda: (fp.FusedBNReLUConv2d(4, 4), (torch.ones(2, 4, 5, 5, dtype=torch.int64),)),
    "wrong residual shape": lambda: (fp.FusedBNReLUConv2d(4, 4), (torch.randn(2, 4, 5, 5), torch.randn(2, 4, 4, 4))),
    "kernel larger than input": lambda: (fp.FusedBNReLUConv2d(4, 4, 7, padding=0), (torch.randn(2, 4, 5, 5),)),
    "channel mismatch": lambda: (fp.FusedBNReLUConv2d(4, 4), (torch.randn(2, 1, 5, 5),)),
    "block channel mismatch": lambda: (fp.PreActBlock(4, 8, 2), (torch.randn(2, 3, 6, 6),)),
    "bottleneck too small": lambda: (fp.PreActBottleneck(4, 2, 2), (torch.randn(2, 4, 1, 0),)),
    "float32 x, half block": lambda: (fp.PreActBlock(4, 4).half(), (torch.randn(2, 4, 5, 5),)),
    # One value per channel in training: at bn2 (after the stride), at bn3, and at the next
    # block's bn1, whose statistics a chain's producer computes (its own BatchNorms in eval).
    "one value at bn2": lambda: (fp.PreActBlock(4, 6, 2), (torch.randn(1, 4, 2, 2),)),
    "one value at bn3": lambda: (fp.PreActBottleneck(4, 2, 2), (torch.randn(1, 4, 2, 2),)),
    "one value at the next block's bn1": lambda: (_chain_with_eval_first_block(), (torch.randn(1, 4, 1, 1),)),
}


def _chain_with_eval_first_block():
    chain = fp.nn.FusedSequential(fp.PreActBlock(4, 4), fp.PreActBlock(4, 4))
    chain[0].eval()
    return chain


@pytest.mark.parametrize("case", list(BAD_UNIT_CALLS))
def test_failed_call_leaves_the_module_as_it_was(case):
    module, args = BAD_UNIT_CALLS[case]()
    before = module_state(module)
    with pytest.raises((TypeError, ValueError), match="fused_preact: "):
        module(*args)
    after = module.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{case}: {key} changed"


def test_low_precision_block_rejects_float32_outside_autocast_like_eager():
    block = fp.PreActBlock(4, 4).to(torch.bfloat16)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(TypeError, match="x is torch.float32 but the weights are torch.bfloat16"):
        block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the mix is what autocast does
        assert block(x).shape == (2, 4, 5, 5)


def test_eps_must_be_positive_in_training_like_eager():
    block = fp.FusedBNReLUConv2d(4, 4, eps=0.0)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        block(torch.randn(2, 4, 5, 5))
    block.eval()  # eval mode normalises with the running statistics: eager accepts eps=0 there
    assert block(torch.randn(2, 4, 5, 5)).shape == (2, 4, 5, 5)


@pytest.mark.parametrize("make", [lambda: fp.PreActBlock(4, 8, 2), lambda: fp.PreActBottleneck(8, 2, 1),
                                  lambda: fp.FusedBNReLUConv2d(4, 6)])
def test_empty_batch_in_training_like_eager(make):
    """N=0: an empty output with gradients, no statistics change, each BN counts the batch."""
    module = make()
    x = torch.randn(0, module.units()[0][0].num_features if hasattr(module, "units") else 4, 6, 6,
                    requires_grad=True)
    before = module_state(module)
    out = module(x)
    out.sum().backward()
    assert out.shape[0] == 0 and x.grad.shape == x.shape
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == before[key].item() + 1, key
        else:
            assert torch.equal(value, before[key]), key


def test_bf16_declined_by_the_interpreted_triton_backend():
    """The Triton interpreter computes bf16 dots wrongly (upstream): declined with that reason,
    and auto goes to the reference backend."""
    from fused_preact import dispatch
    from fused_preact.backends.triton.common import INTERPRETED
    if not INTERPRETED:
        pytest.skip("compiled Triton (GPU): bf16 runs there")
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 3, 3, dtype=torch.bfloat16)
    reasons = dispatch.get_backend("triton").not_supported_reasons("bn_relu_conv", [x, w], w.dtype)
    assert reasons and "bfloat16" in reasons[0] and "interpreter" in reasons[0]
    assert dispatch.select("bn_relu_conv", [x, w], "auto", w.dtype).name == "reference"
    auto = fp.PreActBlock(4, 4, backend="auto")
    reference = fp.PreActBlock(4, 4, backend="reference")
    reference.load_state_dict(auto.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a user runs: no garbage (it was ~1e10 off)
        torch.testing.assert_close(auto(x), reference(x), atol=5e-2, rtol=5e-2)


def test_triton_import_error_is_reported_not_hidden():
    """Without numpy the interpreter cannot run: the reason says so (not 'op not implemented'),
    every time, and info shows it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['numpy'] = None\n"
            "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch, fused_preact as fp\n"
            "from fused_preact import dispatch, info\n"
            "for _ in range(2):\n"
            "    try:\n"
            "        dispatch.select('batch_stats', [torch.randn(2, 3, 4, 4)], 'triton')\n"
            "    except fp.BackendNotSupported as e:\n"
            "        print(e)\n"
            "info.main()\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "FUSED_PREACT_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("numpy") >= 3 and "not implemented" not in out.stdout, out.stdout


@pytest.mark.parametrize("keywords,message", [
    (dict(groups=4), r"conv.groups=4 is not supported \(groups=1 only\)"),
    (dict(dilation=2, padding=2), r"conv.dilation=\(2, 2\) is not supported"),
    (dict(bias=True), "has a bias"),
    (dict(padding_mode="reflect"), "padding_mode='reflect'"),
])
def test_fused_unit_takes_conv_keywords_and_rejects_unsupported_values(keywords, message):
    with pytest.raises(ValueError, match=message):
        fp.FusedBNReLUConv2d(4, 4, 3, **keywords)
    assert fp.FusedBNReLUConv2d(4, 4, 3, groups=1, dilation=1, bias=False, padding_mode="zeros").conv.groups == 1


def test_finalize_names_a_running_statistics_mismatch():
    partials = partials_of(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        ops.bn_finalize(partials, torch.zeros(4), torch.ones(4), None, 0.1, "reference")


def _strided(vector: torch.Tensor) -> torch.Tensor:
    """vector's values in a view with stride 2."""
    wide = torch.zeros(2 * vector.numel(), dtype=vector.dtype)
    wide[::2] = vector
    return wide[::2]


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("after_a_step", [False, True], ids=["first call", "after a step"])
def test_a_strided_batchnorm_vector_is_named_before_anything_changes(name, after_a_step):
    """The kernels read (and update) per-channel vectors contiguously: a strided view, say a
    parameter sliced out of a wider tensor, would be read wrongly. It raises, naming the
    tensor, before any running statistic changes; also where the block replays a plan
    recorded with a contiguous one (the plan's key has every tensor's strides)."""
    block = fp.PreActBlock(4, 4)
    x = torch.randn(2, 4, 5, 5)
    if after_a_step:
        block(x)
    old = getattr(block.bn2, name)
    strided = _strided(old.detach())
    setattr(block.bn2, name, nn.Parameter(strided) if isinstance(old, nn.Parameter) else strided)
    before = module_state(block)
    with pytest.raises(ValueError, match=f"BatchNorm reading the input of bn2 has {name} of shape \\(4,\\) "
                                         r"and strides \(2,\)"):
        block(x)
    for key, value in before.items():
        assert torch.equal(value, block.state_dict()[key]), f"{key} changed"


def test_the_unit_op_names_a_strided_vector():
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 3, 3)
    mean, var = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="bn_weight must be contiguous, got stride 2"):
        ops.bn_relu_conv(x, mean, var, _strided(torch.ones(4)), None, weight, None, [1, 1], [1, 1], 1e-5, False,
                         False, None, None, None, 0.1, "reference")


@pytest.mark.parametrize("name", ["g_other", "dx_other"])
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_the_backward_ops_name_a_gradient_that_does_not_match_x(name, bad):
    """dgrad's g_other and the BN backward's dx_other are added to x's gradient: x's shape and dtype."""
    x, weight, dy = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 3, 3), torch.randn(2, 4, 5, 5)
    mean, var = torch.zeros(4), torch.ones(4)
    other = torch.randn(2, 4, 5, 4) if bad == "shape" else torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"{name} must match x \(\(2, 4, 5, 5\), torch.float32, cpu\), got"):
        if name == "g_other":
            ops.bn_relu_conv_dgrad(dy, weight, x, mean, var, None, None, [1, 1], [1, 1], 1e-5, "reference",
                                   g_other=other)
        else:
            ops.bn_backward_apply(dy, x, mean, var, None, torch.zeros(2, 4), 50, 1e-5, True, other, "reference")

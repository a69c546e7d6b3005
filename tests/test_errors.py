"""Bad input raises a clear error naming the argument, never a wrong answer."""
import pytest
import torch
from torch import nn

import fused_preact as fp
from fused_preact import ops


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


def test_one_value_per_channel_in_training():
    block = fp.PreActBlock(4, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        block(torch.randn(1, 4, 1, 1))
    block.eval()
    assert block(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


def test_dtype_mismatch_named():
    block = fp.PreActBlock(4, 4).double()
    with pytest.raises(TypeError, match="weight dtype torch.float64 does not go with x dtype torch.float32"):
        block(torch.randn(2, 4, 5, 5))


def test_integer_input_named():
    block = fp.FusedBNReLUConv2d(4, 4)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.bn_relu_conv(torch.ones(2, 4, 5, 5, dtype=torch.int32), None, None, None, None,
                         block.conv.weight, None, [1, 1], [1, 1], 1e-5, False, False, "reference")


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

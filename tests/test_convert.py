"""convert(): swaps verified blocks, keeps parameters / keys / mode, reports what it left."""
import copy
import logging

import torch
from torch import nn

import fused_preact as fp
from eager_blocks import (DropoutPreActBlock, NoBN2PreActBlock, PreActBlock, PreActBottleneck,
                          PreActResNet, RawShortcutPreActBlock)
from helpers import assert_close, randomize_bn


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


def test_convert_keeps_device_dtype_and_backend():
    model = nn.Sequential(PreActBlock(3, 4, 2)).to(torch.bfloat16)
    converted = fp.convert(model, backend="reference")
    block = converted[0]
    assert isinstance(block, fp.PreActBlock) and block.backend == "reference"
    assert block.conv1.weight.dtype == torch.bfloat16

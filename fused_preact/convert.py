"""Swap the pre-activation blocks of an existing model for fused ones.

A candidate is a module with the attribute layout of kuangliu/pytorch-cifar's
PreActBlock (bn1, conv1, bn2, conv2 [, shortcut]) or PreActBottleneck (... bn3, conv3),
or of timm's resnetv2 PreActBasic / PreActBottleneck (norm1, conv1, ... [, downsample],
drop_path) with BatchNormAct2d norms.
Blocks of the same layout can compute different things: RobustBench / fast-adversarial
blocks feed the projection shortcut raw x instead of relu(bn1(x)), some add dropout or
squeeze-excitation. So every swap is verified numerically: the candidate and the fused
block are run on a random probe, in eval mode, in float64 on CPU copies whose BN
statistics and affine parameters are randomised (default statistics would make a block
that skips a BN look equivalent). A block that matches no variant is left untouched
and the report says why.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .dispatch import check_backend_name
from .testing import randomize_bn
from .nn import (SHORTCUT_SOURCES, PreActBlock, PreActBottleneck, TimmPreActBasic, TimmPreActBottleneck,
                 _PreActUnits, from_modules)

log = logging.getLogger("fused_preact.convert")

# Parameter-free modules a block may hold besides its units (used in its forward or not).
_HARMLESS = (nn.ReLU, nn.Identity)


@dataclass
class ConversionReport:
    swapped: list[tuple[str, str]] = field(default_factory=list)  # (module name, what it became)
    left: list[tuple[str, str]] = field(default_factory=list)     # (module name, why not)

    def __str__(self) -> str:
        lines = [f"fused_preact.convert: {len(self.swapped)} blocks swapped, {len(self.left)} left"]
        lines += [f"  swapped {name or '<root>'}: {what}" for name, what in self.swapped]
        lines += [f"  left    {name or '<root>'}: {why}" for name, why in self.left]
        return "\n".join(lines)


# (fused class, names of the submodules it takes over), most specific first.
_LAYOUTS = (
    (PreActBottleneck, ("bn1", "conv1", "bn2", "conv2", "bn3", "conv3"), ("shortcut",)),
    (PreActBlock, ("bn1", "conv1", "bn2", "conv2"), ("shortcut",)),
    (TimmPreActBottleneck, ("norm1", "conv1", "norm2", "conv2", "norm3", "conv3"), ("downsample", "drop_path")),
    (TimmPreActBasic, ("norm1", "conv1", "norm2", "conv2"), ("downsample", "drop_path")),
)


def _layout(module: nn.Module):
    """(fused class, unit names, optional names) for a pre-activation block layout, else None."""
    if isinstance(module, _PreActUnits):
        return None
    for block_cls, unit_names, optional in _LAYOUTS:
        if all(hasattr(module, a) for a in unit_names):
            return block_cls, unit_names, optional
    return None


def _candidate_modules(module: nn.Module, unit_names, optional) -> dict[str, nn.Module]:
    """The submodules a fused block takes over; raises ValueError on anything extra."""
    # In the module's own child order, so state_dict keys keep their order too.
    wanted = set(unit_names) | set(optional)
    taken = {name: child for name, child in module.named_children() if name in wanted}
    for name in optional:
        if name not in taken and hasattr(module, name):
            taken[name] = getattr(module, name)  # e.g. downsample = None
    extra = [name for name, child in module.named_children()
             if (name not in taken or (name == "drop_path" and not isinstance(child, nn.Identity)))
             and not isinstance(child, _HARMLESS)]
    if extra:
        raise ValueError(f"has submodules a fused block does not compute: {extra}")
    return taken


@torch.no_grad()
def _matching_shortcut_source(module: nn.Module, block_cls, unit_names, optional) -> Optional[str]:
    """The shortcut source under which the fused block computes what `module` computes."""
    probe_model = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
    randomize_bn(probe_model)
    generator = torch.Generator().manual_seed(0)
    in_channels = getattr(probe_model, unit_names[0]).num_features
    x = torch.randn(2, in_channels, 8, 8, generator=generator, dtype=torch.float64)
    expected = probe_model(x)
    for source in SHORTCUT_SOURCES:
        fused = from_modules(block_cls, _candidate_modules(probe_model, unit_names, optional),
                             shortcut=source, backend="reference").eval()
        if fused.projection() is None and source != SHORTCUT_SOURCES[0]:
            break  # identity shortcut: the source does not matter
        got = fused(x)
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-9, atol=1e-9):
            return source
    return None


def _try_swap(module: nn.Module, backend: Optional[str], sync_bn: bool, process_group):
    """(fused block, description) or (None, reason)."""
    block_cls, unit_names, optional = _layout(module)
    try:
        modules = _candidate_modules(module, unit_names, optional)
        fused = from_modules(block_cls, modules, shortcut="preact", backend=backend,  # validates layout
                             sync_bn=sync_bn, process_group=process_group)
        source = _matching_shortcut_source(module, block_cls, unit_names, optional)
    except (ValueError, TypeError, RuntimeError) as e:
        return None, str(e)
    if source is None:
        return None, "its output differs from every fused variant on a probe input"
    fused.shortcut_source = source
    fused.train(module.training)
    return fused, f"{block_cls.__name__}(shortcut={source!r})"


def convert(model: nn.Module, *, backend: Optional[str] = None, sync_bn: bool = False,
            process_group=None, return_report: bool = False):
    """Replace every recognised pre-activation block of `model` by a fused one, in place.

    Parameters and buffers are shared with the original submodules (state_dict keys,
    device, dtype, optimizer references and train/eval mode are unchanged). sync_bn:
    synchronise the blocks' BatchNorm statistics over `process_group` (default: world)
    like nn.SyncBatchNorm. Returns the model, or (model, ConversionReport) with
    return_report=True. Blocks that look like pre-activation blocks but do not compute
    what a fused block computes are left untouched and logged as warnings.
    """
    check_backend_name(backend)
    report = ConversionReport()

    def visit(name: str, module: nn.Module) -> nn.Module:
        if _layout(module) is not None:
            fused, what = _try_swap(module, backend, sync_bn, process_group)
            if fused is not None:
                report.swapped.append((name, what))
                return fused
            report.left.append((name, what))
            log.warning("fused_preact.convert: left %s (%s) untouched: %s", name or "<root>",
                        type(module).__name__, what)
        for child_name, child in list(module.named_children()):
            new = visit(f"{name}.{child_name}" if name else child_name, child)
            if new is not child:
                setattr(module, child_name, new)
        return module

    model = visit("", model)
    log.info("%s", report)
    return (model, report) if return_report else model

"""Swap the pre-activation blocks of an existing model for fused ones.

A candidate is a module with the attribute layout of kuangliu/pytorch-cifar's
PreActBlock (bn1, conv1, bn2, conv2 [, shortcut]) or PreActBottleneck (... bn3, conv3),
or of timm's resnetv2 PreActBasic / PreActBottleneck (norm1, conv1, ... [, downsample],
drop_path: an Identity, or stochastic depth, which the fused block calls) with BatchNormAct2d
norms.
Blocks of the same layout can compute different things: RobustBench / fast-adversarial
blocks feed the projection shortcut raw x instead of relu(bn1(x)), some add dropout or
squeeze-excitation, stochastic depth or noise that only acts in training. So every swap
is verified numerically on float64 CPU copies whose BN statistics and affine parameters
are randomised (default statistics would make a block that skips a BN look equivalent):
in eval mode the outputs, in train mode the outputs, the input and parameter gradients
and the running-statistics updates. The probe leaves the user's model, its hooks and the
RNG state untouched. A block that matches no variant is left untouched and the report
says why. A block used at several places is swapped once and the fused block put at each
place; the block's own hooks move to the fused block.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from . import sync_batchnorms
from .dispatch import check_backend_name
from .testing import randomize_bn
from .nn import (SHORTCUT_SOURCES, FusedBNReLUConv2d, FusedSequential, PreActBlock, PreActBottleneck,
                 TimmPreActBasic, TimmPreActBottleneck, WideResNetBasic, _PreActUnits, from_modules)
from .unfused import HOOK_DICTS, own_hooks, submodules

log = logging.getLogger("fused_preact.convert")

# Parameter-free modules a block may hold besides its units (used in its forward or not).
_HARMLESS = (nn.ReLU, nn.Identity)


@dataclass
class ConversionReport:
    swapped: list[tuple[str, str]] = field(default_factory=list)  # (module name, what it became)
    left: list[tuple[str, str]] = field(default_factory=list)     # (module name, why not)
    # (module name, what changed): fused blocks given convert's settings, nn.Sequentials that now chain them
    updated: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused_preact.convert: {len(self.swapped)} blocks swapped, {len(self.left)} left"
                 + (f", {len(self.updated)} modules updated" if self.updated else "")]
        lines += [f"  swapped {name or '<root>'}: {what}" for name, what in self.swapped]
        lines += [f"  left    {name or '<root>'}: {why}" for name, why in self.left]
        lines += [f"  updated {name or '<root>'}: {what}" for name, what in self.updated]
        return "\n".join(lines)


def _probe_copy(module: nn.Module) -> nn.Module:
    """A float64 CPU copy of `module` whose hooks are gone (the probe must not fire them) and
    whose SyncBatchNorms are the local BatchNorms they are on one rank (on CPU tensors in a
    process group they would raise)."""
    probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    for m in probe.modules():
        for name in HOOK_DICTS:
            getattr(m, name).clear()
        for name, child in m._modules.items():
            m._modules[name] = sync_batchnorms.local(child)
    return probe


def _move_hooks(source: nn.Module, target: nn.Module) -> bool:
    """Give `target` the hooks of `source` (the same dictionaries, so the user's handles still
    remove them); True if there were any."""
    moved = any(getattr(source, name) for name in HOOK_DICTS)
    for name in HOOK_DICTS:
        setattr(target, name, getattr(source, name))
    target._is_full_backward_hook = source._is_full_backward_hook
    return moved


# (fused class, names of the submodules it takes over, names it takes where present), most specific first.
_LAYOUTS = (
    (PreActBottleneck, ("bn1", "conv1", "bn2", "conv2", "bn3", "conv3"), ("shortcut",)),
    (WideResNetBasic, ("bn1", "conv1", "bn2", "conv2", "convShortcut"), ()),
    (PreActBlock, ("bn1", "conv1", "bn2", "conv2"), ("shortcut",)),
    (TimmPreActBottleneck, ("norm1", "conv1", "norm2", "conv2", "norm3", "conv3"), ("downsample", "drop_path")),
    (TimmPreActBasic, ("norm1", "conv1", "norm2", "conv2"), ("downsample", "drop_path")),
)


def _known_layouts() -> str:
    return "; ".join(f"{block_cls.__name__} ({', '.join(units + tuple(f'[{n}]' for n in optional))})"
                     for block_cls, units, optional in _LAYOUTS)


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
    left_out = [(name, child) for name, child in module.named_children() if name not in taken]
    extra = [name for name, child in left_out if not isinstance(child, _HARMLESS)]
    if extra:
        raise ValueError(f"has submodules a fused block does not compute: {extra}")
    hooked = [name for name, child in left_out if any(map(own_hooks, [child, *submodules(child)]))]
    if hooked:  # a ReLU module the fused block drops: nothing would call its hooks
        raise ValueError(f"has submodules with hooks that a fused block does not keep: {hooked}")
    return taken


def _train_step(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient, parameter gradients and buffers after one training forward."""
    model.train()
    x = x.clone().requires_grad_(True)
    out = model(x)
    if out.shape != weights.shape:
        return [out]
    (out * weights).sum().backward()
    return [out, x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()] \
        + list(model.buffers())


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and (torch.allclose(x, y, rtol=1e-9, atol=1e-9) if x.is_floating_point() else torch.equal(x, y))
        for x, y in zip(a, b))


def _matching_shortcut_source(module: nn.Module, block_cls, unit_names, optional) -> Optional[str]:
    """The shortcut source under which the fused block computes what `module` computes, in
    eval and in train mode (outputs, gradients, running statistics)."""
    probe_model = _probe_copy(module)
    randomize_bn(probe_model)
    generator = torch.Generator().manual_seed(0)
    in_channels = getattr(probe_model, unit_names[0]).num_features
    x = torch.randn(2, in_channels, 8, 8, generator=generator, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):  # dropout & co. draw from the user's generator
        with torch.no_grad():
            expected_eval = copy.deepcopy(probe_model).eval()(x)
        weights = torch.randn(expected_eval.shape, generator=generator, dtype=torch.float64)
        expected_train = _train_step(copy.deepcopy(probe_model), x, weights)
    for source in SHORTCUT_SOURCES:
        def fused_copy():
            copied = copy.deepcopy(probe_model)
            return from_modules(block_cls, _candidate_modules(copied, unit_names, optional),
                                shortcut=source, backend="reference")
        fused = fused_copy()
        if fused.projection() is None and source != SHORTCUT_SOURCES[0]:
            break  # identity shortcut: the source does not matter
        with torch.no_grad():
            got_eval = fused.eval()(x)
        if not _same([got_eval], [expected_eval]):
            continue
        if _same(_train_step(fused_copy(), x, weights), expected_train):
            return source
    return None


def _try_swap(module: nn.Module, backend: Optional[str], sync_bn: bool, process_group):
    """(fused block, description) or (None, reason)."""
    block_cls, unit_names, optional = _layout(module)
    try:
        modules = _candidate_modules(module, unit_names, optional)
        # Built on local BatchNorms where a convert_sync_batchnorm ran first (validates layout; sync_batchnorms.py)
        local_modules = {name: sync_batchnorms.local(m) for name, m in modules.items()}
        fused = from_modules(block_cls, local_modules, shortcut="preact", backend=backend, sync_bn=sync_bn,
                             process_group=process_group)
        source = _matching_shortcut_source(module, block_cls, unit_names, optional)
    except (ValueError, TypeError, RuntimeError) as e:
        return None, str(e)
    if source is None:
        return None, ("its computation differs from every fused variant on a probe input (outputs, "
                      "gradients or running statistics, in eval or train mode)")
    for name, sub in modules.items():  # the SyncBatchNorms back in: the block takes them over (unfused_reason)
        if isinstance(sub, nn.SyncBatchNorm):
            setattr(fused, name, sub)
    fused.shortcut_source = source
    fused.train(module.training)
    return fused, f"{block_cls.__name__}(shortcut={source!r})"


def _check_sync_batchnorm_groups(model: nn.Module, process_group) -> None:
    """A process_group given, the model's SyncBatchNorms must use that one: a block takes its
    SyncBatchNorms over with their group (as eager would synchronise), so another group given
    here would be ignored without a word."""
    if process_group is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.SyncBatchNorm) and module.process_group is not process_group:
            raise ValueError(f"fused_preact.convert: process_group was given, but the SyncBatchNorm {name!r} "
                             f"synchronises over another group ({module.process_group!r}); a block synchronises "
                             f"over its SyncBatchNorms' group: pass process_group=None, or the SyncBatchNorms' own")


def convert(model: nn.Module, *, backend: Optional[str] = None, sync_bn: bool = False,
            process_group=None, return_report: bool = False):
    """Replace every recognised pre-activation block of `model` by a fused one, in place.

    Parameters and buffers are shared with the original submodules (state_dict keys,
    device, dtype, optimizer references and train/eval mode are unchanged). sync_bn:
    synchronise the blocks' BatchNorm statistics over `process_group` (default: world)
    like nn.SyncBatchNorm; a block whose BatchNorms nn.SyncBatchNorm.convert_sync_batchnorm
    (or timm's) made SyncBatchNorms keeps them and synchronises over their process group
    (another process_group given here raises, before anything changes). Returns the
    model, or (model, ConversionReport) with return_report=True. Blocks that look like
    pre-activation blocks but do not compute what a fused block computes are left untouched
    and logged as warnings; so is a model in which convert finds no block at all.
    """
    check_backend_name(backend)
    _check_sync_batchnorm_groups(model, process_group)
    report = ConversionReport()
    done: dict[int, nn.Module] = {}  # id(original block) -> its fused block (a block used twice)
    fused_before = []  # the fused modules the model already held

    def visit(name: str, module: nn.Module) -> nn.Module:
        if id(module) in done:
            report.swapped.append((name, f"the same block as an earlier place: {type(done[id(module)]).__name__}"))
            return done[id(module)]
        if isinstance(module, (_PreActUnits, FusedBNReLUConv2d)):
            fused_before.append(name)
            changes = []
            if sync_bn and not module.sync_bn:
                module.set_sync_bn(True, process_group)
                changes.append("sync_bn on")
            if backend is not None and module.backend != backend:
                module.backend = backend
                changes.append(f"backend={backend!r}")
            if changes:
                report.updated.append((name, ", ".join(changes)))
            return module
        if _layout(module) is not None:
            fused, what = _try_swap(module, backend, sync_bn, process_group)
            if fused is not None:
                if _move_hooks(module, fused):
                    what += " (its hooks moved to it)"
                synchronised = fused.sync_bn
                reason = fused.unfused_reason()
                if fused.sync_bn and not synchronised:
                    what += " (takes its SyncBatchNorms over: synchronises over their process group)"
                if reason is not None:
                    what += f" (runs unfused, through its submodules, while {reason})"
                done[id(module)] = fused
                report.swapped.append((name, what))
                return fused
            report.left.append((name, what))
            log.warning("fused_preact.convert: left %s (%s) untouched: %s", name or "<root>",
                        type(module).__name__, what)
        # _modules, not named_children(): that one yields a block used at two places once.
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new = visit(f"{name}.{child_name}" if name else child_name, child)
            if new is not child:
                setattr(module, child_name, new)
        if type(module) is nn.Sequential and sum(isinstance(child, _PreActUnits) for child in module) >= 2:
            module.__class__ = FusedSequential  # the same object: keys, hooks and references stay
            report.updated.append((name, "nn.Sequential -> FusedSequential: consecutive fused blocks hand "
                                         "their statistics on"))
        return module

    model = visit("", model)
    log.info("%s", report)
    if not (report.swapped or report.left or fused_before):
        # A layout convert does not know (a post-activation ResNet, DeepMind's RobustBench blocks)
        # would otherwise run eager without a word.
        log.warning("fused_preact.convert: found no pre-activation block in %s, so nothing changed. It swaps "
                    "modules with the submodules of %s", type(model).__name__, _known_layouts())
    return (model, report) if return_report else model

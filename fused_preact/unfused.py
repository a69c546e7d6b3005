"""When a fused module must call its submodules instead of running its fused ops.

An eager block calls its submodules (bn1, conv1, ...) and a fused one does not: it reads
their parameters and computes what nn.BatchNorm2d, F.relu and nn.Conv2d compute. That is
the same only while calling them would run no hooks and each still computes what it
computed when the fused module was built or converted. Otherwise (unfused_reason) the
module calls them as the eager definition does, which is then what eager PyTorch computes:
a Grad-CAM hook on conv2, torch.nn.utils.prune's pre-hook, FlopCounterMode's global hooks,
conv1 replaced by a QAT conv, bn2 alone by an nn.SyncBatchNorm. (Where all of a block's
BatchNorms became SyncBatchNorms (or timm's SyncBatchNormActs: sync_batchnorms.py),
sync_batchnorms_swapped_in, the block takes them over:
nn._SyncBNOption.unfused_reason.) Nor do the fused ops differentiate the way a torch.func
transform (vmap, grad, jvp) or forward-mode AD asks: while one is active, the module calls
its submodules too, whose PyTorch ops those support.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.modules import module as torch_module

from .sync_batchnorms import synchronises

# The hook dictionaries of an nn.Module that act on its own forward / backward.
HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
              "_backward_hooks")


def own_hooks(module: nn.Module) -> bool:
    """Whether module has hooks of its own: the four dictionaries nn.Module.__call__ reads (the
    other HOOK_DICTS only mark hooks these hold)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def global_hooks() -> bool:
    """Whether hooks registered for every module (torch.nn.modules.module.register_module_*_hook) exist."""
    return bool(torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_backward_pre_hooks or torch_module._global_backward_hooks)


def calls_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks: its own, or global ones."""
    return own_hooks(module) or global_hooks()


def differentiation_transform() -> Optional[str]:
    """The torch.func transform or forward-mode AD level that is active, as a phrase, else
    None. The fused ops support neither: their autograd Functions are not written for
    torch.func, the forward unit updates running statistics in place (PyTorch's per-sample
    vmap fallback refuses that), and none has a forward derivative (a Triton kernel would
    drop a dual tensor's tangent without a word)."""
    if torch._C._are_functorch_transforms_active():
        return "a torch.func transform (vmap, grad, jvp, ...) is active"
    if forward_ad._current_level >= 0:  # inside forward_ad.dual_level(); PyTorch keeps no public flag
        return "forward-mode AD (torch.autograd.forward_ad.dual_level) is active"
    return None


def submodules(module: nn.Module) -> list[nn.Module]:
    """module's submodules depth first in registration order (module.modules() without module),
    without the `parametrizations` that torch.nn.utils.parametrize adds to a module: they
    compute a weight, and run when the fused ops read it as they do when the module runs."""
    found: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent._modules.items():
            if child is not None and name != "parametrizations":
                found.append(child)
                if child._modules:
                    visit(child)
    visit(module)
    return found


def built_classes(module: nn.Module) -> tuple[type, ...]:
    """The classes of module's submodules (submodules order), recorded when a fused module is
    built or converted: what unfused_reason compares with."""
    return tuple(type(sub) for sub in submodules(module))


def computes_alike(cls: type, built: type) -> bool:
    """Whether instances of cls compute what those of `built` did: the same forward (and
    nn.Conv2d's _conv_forward). A parametrized module's class differs but computes alike."""
    return all(getattr(cls, name, None) is getattr(built, name, None) for name in ("forward", "_conv_forward"))


def unfused_reason(module: nn.Module, built: tuple[type, ...]) -> Optional[str]:
    """Why the fused `module` (its submodules' classes recorded as `built`) must call its
    submodules, as a phrase ("submodule 'bn2' has hooks"), else None."""
    transform = differentiation_transform()
    if transform is not None:
        return transform
    if global_hooks():
        return "global module hooks are registered"
    if _unchanged_through(module, built, 0) == len(built):
        return None  # the usual case, in one pass: about 2 us for a projection block (CPU)
    differences = _differences(module, built)
    if differences is None:
        return "its submodules are not those it was built with"
    if not differences:
        return None  # only classes that compute alike differ (a parametrized weight's)
    sub, cls = differences[0]
    if own_hooks(sub):
        return f"submodule {_name(module, sub)!r} has hooks"
    hint = ""
    if synchronises(type(sub), cls):
        hint = (" (a block stays fused where all its BatchNorms are SyncBatchNorms of one process group, as "
                "nn.SyncBatchNorm.convert_sync_batchnorm(model), or timm's convert_sync_batchnorm for timm's "
                "blocks, makes them, or with fp.convert(model, sync_bn=True))")
    elif isinstance(sub, nn.SyncBatchNorm):
        hint = (" (a block takes over nn.SyncBatchNorm and timm's SyncBatchNormAct only; for synchronised "
                "statistics, fused: fp.convert(model, sync_bn=True), without converting the blocks' BatchNorms)")
    return f"submodule {_name(module, sub)!r} is now a {type(sub).__name__}, not a {cls.__name__}{hint}"


def sync_batchnorms_swapped_in(module: nn.Module, built: tuple[type, ...]) -> Optional[list[nn.SyncBatchNorm]]:
    """The synchronised BatchNorms that took the place of all of `module`'s BatchNorms (what
    nn.SyncBatchNorm.convert_sync_batchnorm or timm's convert_sync_batchnorm does; see
    sync_batchnorms.py), where that is all that changed (no hooks, nothing else replaced; a
    BatchNorm left local would change if synchronised too) and they share one process group;
    else None. A swapped BatchNorm's own submodules (timm's drop and act) may come in another
    order: timm's converter registers them anew."""
    found = submodules(module)
    if global_hooks() or len(found) != len(built) or any(map(own_hooks, found)):
        return None
    at = [i for i, (sub, cls) in enumerate(zip(found, built)) if synchronises(type(sub), cls)]
    if not at or len(at) != sum(issubclass(cls, nn.modules.batchnorm._BatchNorm) for cls in built):
        return None
    spans = {i: range(i + 1, i + 1 + len(submodules(found[i]))) for i in at}  # each one's own submodules
    theirs = {k for span in spans.values() for k in span}
    for i, (sub, cls) in enumerate(zip(found, built)):
        if i not in spans and i not in theirs and type(sub) is not cls and not computes_alike(type(sub), cls):
            return None
    if any(Counter(type(found[k]) for k in span) != Counter(built[k] for k in span) for span in spans.values()):
        return None
    swapped = [found[i] for i in at]
    if any(bn.process_group is not swapped[0].process_group for bn in swapped):
        return None
    return swapped


def _differences(module: nn.Module, built: tuple[type, ...]) -> Optional[list[tuple[nn.Module, type]]]:
    """(submodule, the class it was built with) of each of module's submodules that has hooks
    of its own or no longer computes alike, in submodules() order; None where module has
    other submodules than it was built with."""
    found = submodules(module)
    if len(found) != len(built):
        return None
    return [(sub, cls) for sub, cls in zip(found, built)
            if own_hooks(sub) or (type(sub) is not cls and not computes_alike(type(sub), cls))]


def _unchanged_through(parent: nn.Module, built: tuple[type, ...], index: int) -> int:
    """Walks parent's submodules as submodules() orders them, from position `index` of `built`:
    the position after them, or -1 at the first one with hooks of its own or a class other
    than built's."""
    for name, child in parent._modules.items():
        if child is None or name == "parametrizations":
            continue
        state = child.__dict__  # its hook dictionaries, without nn.Module's attribute lookup
        if (index >= len(built) or type(child) is not built[index] or state["_forward_pre_hooks"]
                or state["_forward_hooks"] or state["_backward_pre_hooks"] or state["_backward_hooks"]):
            return -1
        index += 1
        if state["_modules"]:
            index = _unchanged_through(child, built, index)
            if index < 0:
                return -1
    return index


def _name(module: nn.Module, sub: nn.Module) -> str:
    return next(name for name, found in module.named_modules() if found is sub)

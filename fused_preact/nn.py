"""Drop-in modules: FusedBNReLUConv2d, PreActBlock, PreActBottleneck.

Parameters and buffers live in ordinary nn.BatchNorm2d / nn.Conv2d submodules with the
names of kuangliu/pytorch-cifar (bn1, conv1, ..., shortcut), so state_dicts load both
ways and weight-init code that walks `model.modules()` keeps working. Forward runs the
fused ops instead of the submodules' own forward, except where that would not be what
eager PyTorch computes (unfused.py: hooks, a submodule replaced by another computation):
then a module calls its submodules as the eager definition does.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import block_autograd, dispatch, distributed
from . import functional as Fp
from .block_autograd import Tape
from .pooled_projection import PooledConv, downsample_reason, pools_partial_windows
from .unfused import built_classes, calls_hooks, sync_batchnorms_swapped_in, unfused_reason

SHORTCUT_SOURCES = ("preact", "input")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def module_attr(module: nn.Module, name: str):
    """module.<name>, faster for a parameter, buffer or submodule: nn.Module.__getattr__
    takes about a microsecond a lookup (a block's forward makes about twenty), and looks in
    the same three dicts after the ordinary attributes, which never share a name with them
    (a parametrized tensor is a property, in none of the dicts)."""
    for found in (module._parameters, module._buffers, module._modules):
        if name in found:
            return found[name]
    return getattr(module, name)


def as_fused_output(t: Tensor) -> Tensor:
    """t laid out as the fused ops write their outputs (channels_last), for a module's
    unfused path; as it is under a torch.func transform, whose vmap makes no channels_last
    copy (only the layout would differ)."""
    if torch._C._are_functorch_transforms_active():
        return t
    return t.contiguous(memory_format=torch.channels_last)


class BlockTensors(NamedTuple):
    """The module tensors a block's units read, as block_autograd takes them."""
    params: list[Tensor]  # per unit its BN's weight and bias and its conv's weight, then the projection's
    weights: list[Tensor]  # the conv weights (the units', then the projection's)
    buffers: list[Optional[Tensor]]  # running_mean, running_var, num_batches_tracked of every BatchNorm
    signed: list[Optional[Tensor]]  # all of them, in a fixed order (for the plan key)


def block_tensors(bns, convs, units: int) -> Optional[BlockTensors]:
    """The parameters and buffers of the units' BatchNorms and convs (bns: the units' and the
    consumer's, convs: the units' and the projection) as the modules hold them, or None where
    one is held by none of these: registered, or a tensor held as a plain attribute (an
    nn.DataParallel replica holds its parameters so, non-leaf copies made once per forward).
    A parametrized weight is a property that computes a new tensor on every read: autograd
    must see that computation, so the block keeps its per-unit path.
    A PooledConv's weight is derived from its 1x1 conv's once, on this read, with autograd
    recording: the block's units then read that tensor (its gradient flows back to W)."""
    def registered(module, names):
        if isinstance(module, PooledConv):
            return [module.weight]
        params, buffers = module._parameters, module._buffers
        return [params[n] if n in params else buffers[n] if n in buffers else plain_attribute(module, n)
                for n in names]
    weights = [w for conv in convs for w in registered(conv, ("weight",))]
    bn_tensors = [registered(bn, BN_TENSORS) for bn in bns]
    signed = [*weights, *(t for ts in bn_tensors for t in ts)]
    if any(t is MISSING for t in signed):
        return None
    params = [t for (gamma, beta, *_), weight in zip(bn_tensors[:units], weights) for t in (gamma, beta, weight)]
    params = [t for t in params + weights[units:] if t is not None]
    return BlockTensors(params, weights, [t for ts in bn_tensors for t in ts[2:]], signed)


MISSING = object()  # block_tensors: a name that names no tensor the module holds


def plain_attribute(module: nn.Module, name: str):
    """The tensor (or None) `module` holds as a plain attribute `name`, else MISSING."""
    held = module.__dict__.get(name, MISSING)
    return held if held is None or isinstance(held, Tensor) else MISSING


def passes_through(drop: nn.Module) -> bool:
    """Whether `drop` is timm's DropPath (matched by name: the package does not import timm)
    at a setting where it returns its input unchanged: in eval, or with drop_prob 0
    (timm.layers.drop.drop_path). convert verified the block with it in both modes."""
    return type(drop).__name__ == "DropPath" and hasattr(drop, "drop_prob") and \
        (not drop.training or drop.drop_prob == 0.0)


class _NotScriptable:
    """torch.jit.script calls __prepare_scriptable__ on every module of a model before it
    compiles any: a fused module, whose forward chooses and launches kernels in Python,
    says there what to use instead of failing inside TorchScript's compiler."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fused_preact: torch.jit.script cannot compile {type(self).__name__} (its forward chooses and "
            "launches fused kernels in Python); use torch.compile, torch.export or torch.jit.trace, which run "
            "it, or script the eager model before fp.convert")


class _SyncBNOption:
    """`sync_bn` / `process_group`: synchronise training statistics across ranks like
    nn.SyncBatchNorm (only while a multi-process group is initialised)."""

    def set_sync_bn(self, sync_bn: bool, process_group=None) -> None:
        self.sync_bn = bool(sync_bn)
        self.process_group = process_group

    def sync_handle(self) -> int:
        """The group handle where this module synchronises its statistics (an initialised
        multi-process group), else 0. No communication."""
        if not self.sync_bn:
            return 0
        handle = distributed.group_handle(self.process_group)
        return handle if distributed.sync_active(distributed.process_group(handle)) else 0

    def synchronise(self, x: Tensor) -> tuple[int, Optional[int]]:
        """(group handle, images over all ranks) where this module synchronises, after
        checking that the ranks agree; else (0, None)."""
        handle = self.sync_handle()
        return (handle, distributed.agree(handle, x, self.training)) if handle else (0, None)

    def unfused_reason(self) -> Optional[str]:
        """unfused.unfused_reason for this module (whose submodules' classes it recorded as
        submodule_classes). SyncBatchNorms swapped in for its BatchNorms (the usual DDP recipe,
        nn.SyncBatchNorm.convert_sync_batchnorm, or timm's) are no reason: the module takes them
        over, synchronising as sync_bn=True does over their process group, and stays fused."""
        reason = unfused_reason(self, self.submodule_classes)
        if reason is None:
            return None
        swapped = sync_batchnorms_swapped_in(self, self.submodule_classes)
        if swapped is None:
            return reason
        self.set_sync_bn(True, swapped[0].process_group)
        self.submodule_classes = built_classes(self)
        return None

    def check_unfused(self, reason: str, cause: str = "a fused module does not call its submodules",
                      remedy: str = "remove the hooks or the replacement") -> None:
        """Before this module calls its submodules (unfused.unfused_reason gave `reason`, or
        size_unfused_reason with its own cause and remedy): refused where it synchronises
        statistics (its BatchNorms are plain ones: called, they would not), else a warning
        that it runs unfused."""
        name = type(self).__name__
        if self.sync_handle():
            raise ValueError(f"fused_preact: {name} with sync_bn=True cannot call its submodules ({reason}): it "
                             f"synchronises its BatchNorms without calling them; {remedy}, or use sync_bn=False "
                             f"and nn.SyncBatchNorm")
        if not torch.compiler.is_compiling():  # a warning would end torch.compile's graph
            warnings.warn(f"fused_preact: {name} runs unfused, calling its submodules as eager PyTorch does, "
                          f"while {reason} ({cause})", stacklevel=2)


class FusedBNReLUConv2d(_NotScriptable, _SyncBNOption, nn.Module):
    """y = conv(relu(bn(x))) [+ residual] as one fused unit.

    Submodules `bn` (nn.BatchNorm2d) and `conv` (nn.Conv2d, bias=False, groups=1,
    dilation=1). forward(x, residual=None).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=None,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, backend: Optional[str] = None, sync_bn: bool = False,
                 process_group=None, device=None, dtype=None):
        """nn.Conv2d's arguments (padding None: kernel_size // 2) and nn.BatchNorm2d's; the
        values the kernels do not implement (groups, dilation, bias, padding_mode) raise."""
        super().__init__()
        if padding is None:
            padding = kernel_size // 2 if isinstance(kernel_size, int) else tuple(k // 2 for k in kernel_size)
        factory = dict(device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats, **factory)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              padding_mode, **factory)
        Fp.check_conv(self.conv, "conv")
        dispatch.check_backend_name(backend)
        self.backend = backend
        self.set_sync_bn(sync_bn, process_group)
        self.submodule_classes = built_classes(self)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d, *, backend: Optional[str] = None,
                     sync_bn: bool = False, process_group=None):
        """Wrap existing modules (shared, not copied: optimizers keep their parameters)."""
        Fp.check_bn(bn, "bn")
        Fp.check_conv(conv, "conv")
        Fp.check_computes_as(bn, nn.BatchNorm2d, "bn")
        Fp.check_computes_as(conv, nn.Conv2d, "conv")
        dispatch.check_backend_name(backend)
        unit = cls.__new__(cls)
        nn.Module.__init__(unit)
        unit.bn, unit.conv, unit.backend = bn, conv, backend
        unit.set_sync_bn(sync_bn, process_group)
        unit.submodule_classes = built_classes(unit)
        return unit

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        reason = self.unfused_reason()
        if reason is not None:
            self.check_unfused(reason)
            return self.submodule_forward(x, residual)
        out_shape = Fp.check_input(x, self.bn, self.conv, "x")
        Fp.check_residual(residual, out_shape, x.device)
        sync, images = self.synchronise(x)
        if x.shape[0] == 0 and not sync:  # what eager does: an empty output; nn.BatchNorm2d counts the batch
            return self.submodule_forward(x, residual)
        backend = self.backend or "auto"
        stats = Fp.bn_stats(self.bn, x, None, backend, sync, images)
        return Fp.unit(x, stats, self.bn, self.conv, residual, None, backend).output

    def submodule_forward(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """conv(relu(bn(x))) [+ residual] through the submodules, as eager PyTorch computes it."""
        y = self.conv(F.relu(self.bn(x)))
        return as_fused_output(y if residual is None else y + residual)


class _PreActUnits(_NotScriptable, _SyncBNOption, nn.Module):
    """Shared forward of pre-activation blocks: a chain of (bn, conv) units + shortcut.

    x_{l+1} = x_l + F(x_l); the projection shortcut (if any) reads relu(bn1(x))
    ("preact": kuangliu, timm, the paper) or raw x ("input": RobustBench, fast-adversarial).
    Subclasses name their units (`unit_names`) and their projection conv, so each keeps
    the state_dict keys of the definition it replaces.
    """

    unit_names: tuple[tuple[str, str], ...] = ()
    # Whether the eager definition calls its projection after the residual branch (else before conv1).
    shortcut_last = False

    def _setup(self, shortcut: str, backend: Optional[str], sync_bn: bool = False, process_group=None) -> None:
        self.set_sync_bn(sync_bn, process_group)
        if shortcut not in SHORTCUT_SOURCES:
            raise ValueError(f"fused_preact: shortcut must be one of {SHORTCUT_SOURCES}, got {shortcut!r}")
        dispatch.check_backend_name(backend)
        self.shortcut_source = shortcut
        self.backend = backend
        for bn_name, conv_name in self.unit_names:
            Fp.check_bn(getattr(self, bn_name), bn_name)
            Fp.check_conv(getattr(self, conv_name), conv_name)
        self._check_projection()
        self.submodule_classes = built_classes(self)  # what its submodules compute (convert verified it)

    def units(self) -> list[tuple[nn.BatchNorm2d, nn.Conv2d]]:
        return [(module_attr(self, b), module_attr(self, c)) for b, c in self.unit_names]

    def first_bn(self) -> nn.BatchNorm2d:
        return module_attr(self, self.unit_names[0][0])

    def projection(self) -> Optional[nn.Conv2d]:
        """The projection conv of the shortcut as the kernels compute it (an nn.Conv2d, or a
        pooled_projection.PooledConv), or None for the identity."""
        raise NotImplementedError

    def _check_projection(self) -> None:
        raise NotImplementedError

    def branch_drop(self) -> Optional[nn.Module]:
        """The module the eager block applies to its residual branch before the shortcut
        joins it (timm's `drop_path`: stochastic depth), or None where it has none, an
        Identity, or one that returns its input now (passes_through: then the last conv adds
        the shortcut). The fused block calls it too, so it draws the same masks."""
        module = self._modules.get("drop_path")
        return None if module is None or isinstance(module, nn.Identity) or passes_through(module) else module

    def size_unfused_reason(self, x: Tensor) -> Optional[tuple[str, str, str]]:
        """Why the fused units do not compute this block at x's size (its submodules then
        do), as check_unfused's (reason, cause, remedy), or None; see TimmPreActBasic. A block
        that may give one is never chained (fuses_every_size): handed statistics, its first
        BatchNorm would count the batch twice."""
        return None

    def fuses_every_size(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        reason = self.unfused_reason()
        size_reason = self.size_unfused_reason(x) if reason is None else None
        if reason is not None or size_reason is not None:
            self.check_unfused(*((reason,) if size_reason is None else size_reason))
            return self.submodule_forward(x)
        return self.forward_with_stats(x, None, None)[0]

    def forward_with_stats(self, x: Tensor, x_moments: Optional[tuple[Tensor, Tensor]],
                           consumer: Optional[Fp.Consumer]):
        """Forward that takes and gives batch statistics, so a chain of blocks needs no
        standalone statistics pass between blocks: x_moments are bn1's, from the conv that
        wrote x (see Fp.bn_stats); the last conv computes those of `consumer`, the next
        block's first BatchNorm (None: nobody reads them). For chainable blocks only: it
        calls no submodule but branch_drop(), so it runs none of their hooks."""
        units, projection = self.units(), self.projection()
        convs = [conv for _, conv in units] + ([projection] if projection is not None else [])
        bns = [bn for bn, _ in units] + ([consumer.bn] if consumer is not None else [])
        tensors = block_tensors(bns, convs, len(units))
        drop = self.branch_drop()
        taped = tensors is not None and isinstance(x, Tensor) and \
            block_autograd.applies(x, tensors.params, tensors.weights, Fp.compute_dtype(x, convs[0]))
        # A plan (block_autograd) skips the checks below: its key fixes their outcome. None
        # under sync_bn: its glue exchanges statistics between ranks, which a replay would skip.
        key = self.plan_key(x, x_moments, consumer, drop is not None, bns, convs, tensors.signed) \
            if taped and not self.sync_bn else None
        program = block_autograd.PLANS.get(key)
        if program is None:
            shapes = self.check_input(x, units, projection)
            sync, images = self.synchronise(x)
            if x.shape[0] == 0 and not sync:  # an empty local batch under sync BN still joins the exchanges
                return self.submodule_forward(x), None
            # Every BatchNorm whose statistics the block computes, before any is updated (a synchronised
            # consumer's statistics are merged, and checked over all ranks, by its own block).
            checked = [bn for bn, _ in units] + ([consumer.bn] if consumer is not None and not consumer.synced else [])
            for bn, shape in zip(checked, shapes):
                Fp.check_batch_values(bn, shape, images if sync and bn.training else None)
        else:
            sync, images = 0, None
        backend = self.backend or "auto"

        def forward_units(x: Tensor, tape: Optional[Tape]):
            return self.forward_units(x, x_moments, consumer, sync, images, backend, tape, projection, drop is not None)
        if taped:
            inputs = block_autograd.BlockInputs(x, x_moments, tensors.params, tensors.buffers)
            (h, shortcut), moments = block_autograd.run_block(forward_units, key, program, inputs)
        else:
            (h, shortcut), moments = forward_units(x, None)
        if drop is None:
            return h, moments
        # The drop module computes in PyTorch, after the block's autograd node (block_autograd)
        # or its units' nodes; the shortcut's gradient comes back to that node as an output's.
        return as_fused_output(drop(h) + shortcut), None

    def forward_units(self, x: Tensor, x_moments, consumer: Optional[Fp.Consumer], sync: int, images: Optional[int],
                      backend: str, tape: Optional[Tape], projection, shortcut_apart: bool):
        """forward_with_stats after its checks: the units one after another, each with its
        own autograd node, or recorded on the block's tape (block_autograd) if given;
        projection: self.projection() as the block's tensors were taken from it. Returns
        ((output, None), moments), or where shortcut_apart (the block drops its residual branch
        before the shortcut joins it: branch_drop) ((the residual branch, the shortcut), None)."""
        units = self.units()
        bn1 = units[0][0]
        stats = Fp.bn_stats(bn1, x, x_moments, backend, sync, images, tape)
        h, moments, shortcut = x, x_moments, None
        for i, (bn, conv) in enumerate(units):
            if i > 0:
                stats = Fp.bn_stats(bn, h, moments, backend, sync, images, tape)
            if i < len(units) - 1:
                residual, next_consumer = None, Fp.Consumer(units[i + 1][0], bool(sync))
            elif not shortcut_apart:  # the last conv adds the shortcut, and computes the consumer's statistics
                residual, next_consumer = shortcut, consumer
            else:  # the shortcut joins after the drop module; the next block computes its own statistics
                residual, next_consumer = None, None
            # The shortcut reads x as the first unit's autograd node returns it (under a tape,
            # x itself), so its gradient (the identity's, or the projection's dx) joins that
            # unit's dx kernel.
            h, moments, carried = Fp.unit(h, stats, bn, conv, residual, next_consumer, backend,
                                          carry_input=i == 0, tape=tape)
            if i == 0:
                shortcut = carried if projection is None else self.project(carried, projection, stats, backend, tape)
        if shortcut_apart:
            return (h, shortcut), None
        return (h, None), moments

    def plan_key(self, x: Tensor, x_moments, consumer: Optional[Fp.Consumer], shortcut_apart: bool, bns, convs,
                 tensors) -> tuple:
        """Everything the forward glue decides from, for block_autograd's plans: the block's
        structure (shortcut_apart: forward_units'), the settings of every BatchNorm (bns: the
        units' and the consumer's) and conv it reads, autocast, the backend asked for, and
        the layout of every tensor the plan gets: x's, the incoming statistics' (None: none
        come in) and their tensors' (dtype, shape, strides, device, 16-byte alignment: a
        bound replay launches with the layout it was bound with, replay.py)."""
        device_type = x.device.type
        layout = block_autograd.layout
        return (type(self), self.shortcut_source, shortcut_apart, layout(x),
                None if x_moments is None else tuple(map(layout, x_moments)), consumer is not None and consumer.synced,
                torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type),
                dispatch.selection_state(self.backend or "auto"),
                *((bn.num_features, bn.training, bn.eps, bn.momentum, bn.track_running_stats) for bn in bns),
                *((tuple(conv.stride), Fp.zero_padding(conv)) for conv in convs),
                *(None if t is None else layout(t) for t in tensors))

    def project(self, x: Tensor, projection, stats: Fp.BNStats, backend: str, tape: Optional[Tape]) -> Tensor:
        """The projection shortcut of x: projection(relu(bn1(x))) ("preact") or projection(x) ("input")."""
        if self.shortcut_source == "preact":
            return Fp.unit(x, stats, self.first_bn(), projection, None, None, backend, tape=tape).output
        return Fp.unit(x, None, None, projection, None, None, backend, tape=tape).output

    def consumer(self) -> Fp.Consumer:
        """This block's first BatchNorm as the consumer of the previous block's statistics."""
        return Fp.Consumer(self.first_bn(), bool(self.sync_handle()))

    def shortcut_module(self) -> Optional[nn.Module]:
        """The submodule the eager block calls for its projection shortcut (the container of
        projection()), or None for the identity."""
        raise NotImplementedError

    def pre_activation(self, bn: nn.Module, h: Tensor) -> Tensor:
        """relu(bn(h)) as the eager block computes it from its submodule bn."""
        return F.relu(bn(h))

    def submodule_forward(self, x: Tensor) -> Tensor:
        """What the eager block computes, calling its submodules in the order the eager
        definitions do (so their hooks run, and each nn.BatchNorm2d counts the batch): for a
        batch of zero images, and while unfused.unfused_reason gives one."""
        (bn1, conv1), *rest = self.units()
        a = self.pre_activation(bn1, x)

        def shortcut():
            module = self.shortcut_module()
            return x if module is None else module(a if self.shortcut_source == "preact" else x)
        early_shortcut = None if self.shortcut_last else shortcut()
        h = conv1(a)
        for bn, conv in rest:
            h = conv(self.pre_activation(bn, h))
        drop_path = self._modules.get("drop_path")  # timm's
        if drop_path is not None:
            h = drop_path(h)
        return as_fused_output(h + (shortcut() if self.shortcut_last else early_shortcut))

    def check_input(self, x, units, projection) -> list[tuple[int, ...]]:
        """Every unit's input shape, derived from x, before any statistic changes (units:
        self.units(), projection: self.projection()), then the block's output shape: returns them."""
        shapes = [tuple(x.shape)]
        shape = Fp.check_input(x, units[0][0], units[0][1], "x")
        for (bn, conv), (name, _) in zip(units[1:], self.unit_names[1:]):
            shapes.append(shape)
            shape = Fp.check_shape(shape, bn, conv, f"the input of {name}")
        shortcut = tuple(x.shape) if projection is None else Fp.check_shape(tuple(x.shape), None, projection, "x")
        if shortcut != shape:
            raise ValueError(f"fused_preact: the shortcut gives shape {shortcut} but the residual branch {shape}")
        return shapes + [shape]

    def extra_repr(self) -> str:
        return f"shortcut_source={self.shortcut_source!r}, backend={self.backend!r}, sync_bn={self.sync_bn}"


class _KuangliuUnits(_PreActUnits):
    """kuangliu/pytorch-cifar layout: bn1, conv1, ..., shortcut = Sequential(Conv2d) or absent."""

    def projection(self) -> Optional[nn.Conv2d]:
        shortcut = self._modules.get("shortcut")  # getattr would raise and catch for an identity block
        return shortcut[0] if isinstance(shortcut, nn.Sequential) and len(shortcut) > 0 else None

    def shortcut_module(self) -> Optional[nn.Module]:
        return None if self.projection() is None else self._modules["shortcut"]

    def _check_projection(self) -> None:
        shortcut = getattr(self, "shortcut", None)
        if shortcut is None or (isinstance(shortcut, nn.Sequential) and len(shortcut) == 0):
            return
        if not isinstance(shortcut, nn.Sequential) or len(shortcut) != 1:
            raise ValueError("fused_preact: shortcut must be nn.Sequential(nn.Conv2d(...)) (no BN)")
        Fp.check_conv(shortcut[0], "shortcut[0]")


def _projection(in_planes: int, out_planes: int, stride: int, factory: dict) -> Optional[nn.Sequential]:
    """kuangliu's shortcut where width or stride change (factory: nn.Conv2d's device and dtype)."""
    if stride != 1 or in_planes != out_planes:
        return nn.Sequential(nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False, **factory))
    return None


class PreActBlock(_KuangliuUnits):
    """Pre-activation basic block: bn1, conv1 (3x3, stride), bn2, conv2 (3x3) [+ shortcut].
    device / dtype: where and in what its parameters and buffers are made, as for nn.Conv2d."""

    expansion = 1
    unit_names = (("bn1", "conv1"), ("bn2", "conv2"))

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "preact",
                 backend: Optional[str] = None, sync_bn: bool = False, process_group=None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(in_planes, **factory)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False, **factory)
        self.bn2 = nn.BatchNorm2d(planes, **factory)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False, **factory)
        projection = _projection(in_planes, self.expansion * planes, stride, factory)
        if projection is not None:
            self.shortcut = projection
        self._setup(shortcut, backend, sync_bn, process_group)


class PreActBottleneck(_KuangliuUnits):
    """Pre-activation bottleneck: bn1, conv1 (1x1), bn2, conv2 (3x3, stride), bn3, conv3 (1x1, x4).
    device / dtype as for PreActBlock."""

    expansion = 4
    unit_names = (("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "conv3"))

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "preact",
                 backend: Optional[str] = None, sync_bn: bool = False, process_group=None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(in_planes, **factory)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False, **factory)
        self.bn2 = nn.BatchNorm2d(planes, **factory)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False, **factory)
        self.bn3 = nn.BatchNorm2d(planes, **factory)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False, **factory)
        projection = _projection(in_planes, self.expansion * planes, stride, factory)
        if projection is not None:
            self.shortcut = projection
        self._setup(shortcut, backend, sync_bn, process_group)


class WideResNetBasic(_PreActUnits):
    """Fused stand-in for the wide ResNet block as robustness code writes it (RobustBench's
    and TRADES' wide_resnet.py BasicBlock; testing.WideBasicBlock): bn1, conv1, bn2, conv2,
    and convShortcut, a 1x1 conv on relu(bn1(x)) where width or stride change, else None
    (the identity on raw x). Its ReLU modules hold nothing: a fused block drops them."""

    unit_names = (("bn1", "conv1"), ("bn2", "conv2"))
    shortcut_last = True

    def pre_activation(self, bn: nn.Module, h: Tensor) -> Tensor:
        # The eager block's ReLU modules work in place: a hook that kept bn's output sees them.
        return F.relu(bn(h), inplace=True)

    def projection(self) -> Optional[nn.Conv2d]:
        return self._modules.get("convShortcut")  # None: not registered (the eager block sets None)

    def shortcut_module(self) -> Optional[nn.Module]:
        return self.projection()

    def _check_projection(self) -> None:
        if self.projection() is not None:
            Fp.check_conv(self.projection(), "convShortcut")


def from_modules(block_cls, modules: dict[str, nn.Module], *, shortcut: str, backend: Optional[str],
                 sync_bn: bool = False, process_group=None):
    """A fused block around existing submodules (used by `convert`; parameters are shared)."""
    block = block_cls.__new__(block_cls)
    nn.Module.__init__(block)
    for name, module in modules.items():
        setattr(block, name, module)
    block._setup(shortcut, backend, sync_bn, process_group)
    return block


def run_chain(blocks, x: Tensor) -> Tensor:
    """Run consecutive chainable fused blocks, handing each conv epilogue's statistics to the next BN."""
    blocks = list(blocks)
    moments = None
    for i, block in enumerate(blocks):
        consumer = blocks[i + 1].consumer() if i + 1 < len(blocks) else None
        x, moments = block.forward_with_stats(x, moments, consumer)
    return x


def run_sequence(modules, x: Tensor) -> Tensor:
    """Call `modules` one after another, as nn.Sequential does, with each run of consecutive
    chainable blocks in one run_chain; an nn.Sequential among them that runs no hooks of its
    own is entered, so a chain goes on across it (one model stage into the next)."""
    chain: list[_PreActUnits] = []
    for module in _entered(modules):
        if chainable(module):
            chain.append(module)
            continue
        if chain:
            x, chain = run_chain(chain, x), []
        x = module(x)
    return run_chain(chain, x) if chain else x


def _entered(modules):
    """modules, with each plain nn.Sequential / FusedSequential that runs no hooks replaced by
    its own modules (calling it would call them in that order, nothing else)."""
    for module in modules:
        if type(module) in (nn.Sequential, FusedSequential) and not calls_hooks(module):
            yield from _entered(module)
        else:
            yield module


def chainable(module: nn.Module) -> bool:
    """A fused block that run_chain may call directly: calling it would run no hooks (a direct
    call does not), and it runs its fused ops (no unfused_reason, whatever the input size)."""
    return isinstance(module, _PreActUnits) and not calls_hooks(module) and module.unfused_reason() is None \
        and module.fuses_every_size()


class FusedSequential(nn.Sequential):
    """nn.Sequential (same children, same state_dict keys) that runs each run of consecutive
    fused blocks through run_chain (run_sequence), so only the first block of a run reads
    its input for statistics. `convert` turns a user's nn.Sequential of fused blocks into
    one; fp.models' stages are ones."""

    def forward(self, x):
        return run_sequence(self, x)


class TimmPreActBasic(_PreActUnits):
    """Fused stand-in for timm resnetv2.PreActBasic: norm1 (BatchNormAct2d), conv1, norm2,
    conv2, downsample (DownsampleConv: conv + Identity norm; or DownsampleAvg: pool, an
    Identity or an nn.AvgPool2d(2, 2), then conv + Identity norm) or None, drop_path (an
    Identity, or DropPath: stochastic depth, branch_drop)."""

    unit_names = (("norm1", "conv1"), ("norm2", "conv2"))

    def projection(self):
        """downsample's conv, or its pool and conv as one PooledConv (a new one per call, its
        weight derived on first read: a forward takes one, whose weight block_tensors reads)."""
        if self.downsample is None:
            return None
        pool = self.downsample_pool()
        return self.downsample.conv if pool is None else PooledConv(self.downsample.conv)

    def downsample_pool(self) -> Optional[nn.AvgPool2d]:
        pool = self.downsample._modules.get("pool") if self.downsample is not None else None
        return None if pool is None or isinstance(pool, nn.Identity) else pool

    def size_unfused_reason(self, x: Tensor) -> Optional[tuple[str, str, str]]:
        pool = self.downsample_pool()
        if pool is None or not pools_partial_windows(pool, x):
            return None
        return (f"its downsample pools an input of odd size {tuple(x.shape[2:])} with ceil_mode",
                "its last window averages fewer values, which the fused conv does not compute",
                "feed it inputs of even height and width")

    def fuses_every_size(self) -> bool:
        return self.downsample_pool() is None

    def shortcut_module(self) -> Optional[nn.Module]:
        return self.downsample

    def pre_activation(self, bn: nn.Module, h: Tensor) -> Tensor:
        return bn(h)  # BatchNormAct2d applies its activation (a ReLU: convert checked) itself

    def _check_projection(self) -> None:
        if self.downsample is None:
            return
        children = dict(self.downsample.named_children())
        # DownsampleAvg (timm's avg_down, the "d" models) pools before its conv: an Identity
        # without a stride (then it computes what DownsampleConv does), at stride 2 one conv
        # with it (PooledConv).
        pool = children.pop("pool", nn.Identity())
        if set(children) != {"conv", "norm"} or not isinstance(children["norm"], nn.Identity):
            raise ValueError(f"fused_preact: downsample must be a 1x1 conv with an Identity norm (timm "
                             f"DownsampleConv or DownsampleAvg; preact=True), got {type(self.downsample).__name__}")
        Fp.check_conv(self.downsample.conv, "downsample.conv")
        reason = downsample_reason(pool, self.downsample.conv)
        if reason is not None:
            raise ValueError(f"fused_preact: {reason}")


class TimmPreActBottleneck(TimmPreActBasic):
    """Fused stand-in for timm resnetv2.PreActBottleneck (norm3 / conv3 added)."""

    unit_names = (("norm1", "conv1"), ("norm2", "conv2"), ("norm3", "conv3"))

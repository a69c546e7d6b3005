"""Module glue (layer nn -> ops): nn.BatchNorm2d / nn.Conv2d submodules turned into op calls.

Layers, top down: nn.py (modules) -> functional.py (this: input checks, BN statistics and
running-stat updates, autocast dtypes) -> ops.py (the registered ops, via entry.py's eager
fast path) -> dispatch.py -> backends/.

Modules own parameters and buffers (so state_dicts match the eager definitions); these
functions turn them into op calls with the semantics of nn.BatchNorm2d + F.relu +
nn.Conv2d, in training and eval mode, under autocast too.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import distributed, ops
from .backends.base import conv_output_hw
from .block_autograd import Tape
from .unfused import computes_alike


class BNStats(NamedTuple):
    """The statistics a BN prologue normalises with."""
    mean: Tensor
    var: Tensor
    batch: bool  # True: batch statistics of the input (training-mode BN)
    sync_group: int = 0  # fused_preact.distributed handle when synchronised across ranks


def check_bn(bn: nn.Module, name: str) -> None:
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"fused_preact: {name} must be nn.BatchNorm2d, got {type(bn).__name__}")


def check_conv(conv: nn.Module, name: str) -> None:
    """Only what the kernels implement: groups=1, dilation=1, zero padding, no bias."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fused_preact: {name} must be nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"fused_preact: {name}.groups={conv.groups} is not supported (groups=1 only)")
    if tuple(conv.dilation) != (1, 1):
        raise ValueError(f"fused_preact: {name}.dilation={tuple(conv.dilation)} is not supported (dilation=1 only)")
    if conv.bias is not None:
        raise ValueError(f"fused_preact: {name} has a bias; only bias=False convolutions are supported")
    if conv.padding_mode != "zeros" or zero_padding(conv) is None:
        raise ValueError(
            f"fused_preact: {name} padding={conv.padding!r}, padding_mode={conv.padding_mode!r} with kernel "
            f"{tuple(conv.kernel_size)} is not supported (zero padding, the same on both sides: integers, "
            "'valid', or 'same' with odd kernel sizes)")


def zero_padding(conv: nn.Conv2d) -> Optional[tuple[int, int]]:
    """conv's zero padding per side as integers (height, width): 'valid' is 0, 'same' (which
    nn.Conv2d allows at stride 1 only; dilation is 1 here) is (k - 1) // 2. None where 'same'
    pads one side more than the other (an even kernel size), which the kernels do not do."""
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        if any(k % 2 == 0 for k in conv.kernel_size):
            return None
        return tuple((k - 1) // 2 for k in conv.kernel_size)
    return tuple(conv.padding)


def check_computes_as(module: nn.Module, base: type, name: str) -> None:
    """For a module wrapped without convert's numerical probe: refuses a subclass of `base`
    (nn.BatchNorm2d, nn.Conv2d) whose forward computes something else (a weight-standardised
    conv, a BatchNorm with an activation): a fused unit computes what `base` computes."""
    if not computes_alike(type(module), base):
        raise TypeError(
            f"fused_preact: {name} is a {type(module).__name__}, whose forward is not {base.__name__}'s; a fused "
            f"unit computes {base.__name__}'s (fp.convert verifies a whole block numerically and takes such a "
            f"module where it computes the same)")


def check_input(x, bn: Optional[nn.BatchNorm2d], conv: nn.Conv2d, what: str) -> tuple[int, ...]:
    """Validate the input tensor of a bn -> relu -> conv unit before anything runs or changes
    (running statistics included); returns the conv's output shape. `what` names the input
    in the message."""
    if not isinstance(x, Tensor):
        raise TypeError(f"fused_preact: {what} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"fused_preact: {what} must be floating point, got {x.dtype}")
    weight = conv.weight
    if x.device != weight.device:
        raise ValueError(f"fused_preact: {what} is on {x.device} but the weights are on {weight.device}")
    # Outside autocast the dtypes must agree, as eager nn.Conv2d / nn.BatchNorm2d require;
    # under autocast the conv runs in the autocast dtype whatever x is.
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"fused_preact: {what} is {x.dtype} but the weights are {weight.dtype} "
                        "(convert one of them, or run under torch.autocast)")
    return check_shape(tuple(x.shape), bn, conv, what)


def check_shape(shape: tuple[int, ...], bn: Optional[nn.BatchNorm2d], conv: nn.Conv2d, what: str) -> tuple[int, ...]:
    """The unit's output shape for an input of `shape`; raises naming `what` if it cannot run."""
    if len(shape) != 4:
        raise ValueError(f"fused_preact: {what} must be a 4-D NCHW tensor, got shape {shape}")
    if shape[1] != conv.in_channels or (bn is not None and shape[1] != bn.num_features):
        raise ValueError(f"fused_preact: {what} has {shape[1]} channels, the unit expects {conv.in_channels}")
    padding = zero_padding(conv)
    out_hw = conv_output_hw(shape[2:], conv.kernel_size, conv.stride, padding)
    if min(out_hw) < 1:
        raise ValueError(f"fused_preact: {what} of size {shape[2:]} is too small for kernel "
                         f"{tuple(conv.kernel_size)} with padding {padding}")
    if bn is not None and needs_batch_stats(bn) and not bn.eps > 0:
        raise ValueError(f"fused_preact: batch_norm eps must be positive during training, but got {bn.eps}")
    if bn is not None:
        check_bn_vectors(bn, what)
    return (shape[0], conv.out_channels, *out_hw)


def check_bn_vectors(bn: nn.BatchNorm2d, what: str) -> None:
    """The BatchNorm's per-channel tensors as the kernels read them: num_features values
    each, one after another (a strided view, say a parameter sliced out of another tensor
    with a step, is read wrongly, and running statistics written wrongly)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        v = getattr(bn, name)
        if v is not None and (tuple(v.shape) != (bn.num_features,) or (v.numel() > 1 and v.stride(0) != 1)):
            raise ValueError(
                f"fused_preact: the BatchNorm reading {what} has {name} of shape {tuple(v.shape)} "
                f"and strides {v.stride()}; the fused units read {bn.num_features} contiguous values "
                f"(pass {name} as a contiguous tensor, e.g. .contiguous())")


def check_residual(residual, shape: tuple[int, ...], device: torch.device) -> None:
    if residual is None:
        return
    if not isinstance(residual, Tensor) or tuple(residual.shape) != tuple(shape):
        got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
        raise ValueError(f"fused_preact: residual must have shape {tuple(shape)}, got {got}")
    if residual.device != device or not residual.is_floating_point():
        raise ValueError(f"fused_preact: residual must be a floating-point tensor on {device}, "
                         f"got {residual.dtype} on {residual.device}")


def needs_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """nn.BatchNorm2d normalises with batch statistics in training, or when it tracks none."""
    return bn.training or bn.running_mean is None


class Consumer(NamedTuple):
    """The BatchNorm that reads a unit's output, and whether its statistics are
    synchronised across ranks: the unit's conv epilogue computes that BatchNorm's batch
    statistics (and updates its running statistics where they are local)."""
    bn: nn.BatchNorm2d
    synced: bool


def running_update(bn: nn.BatchNorm2d, synced: bool) -> tuple:
    """(running_mean, running_var, num_batches_tracked, momentum) that the op computing bn's
    local batch statistics updates: bn's own in training, unless synchronised (then
    bn_finalize updates them from the statistics of all ranks); None where it updates none."""
    if bn.training and bn.track_running_stats and not synced:
        return bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum
    return None, None, None, bn.momentum


def check_batch_values(bn: nn.BatchNorm2d, shape: tuple[int, ...], images: Optional[int]) -> None:
    """Batch statistics need more than one value per channel, as nn.BatchNorm2d says, over all
    ranks where synchronised (images: their batch; None: local). shape: bn's input's."""
    if not needs_batch_stats(bn):
        return
    values = (shape[0] if images is None else images) * shape[2] * shape[3]
    if values <= 1:
        raise ValueError(f"fused_preact: expected more than 1 value per channel when training, got input size "
                         f"{shape}" + ("" if images is None else f" ({images} images over all ranks)"))


def bn_stats(bn: nn.BatchNorm2d, x: Tensor, moments: Optional[tuple[Tensor, Tensor]], backend: str,
             sync_group: int = 0, images: Optional[int] = None, tape: Optional[Tape] = None) -> BNStats:
    """Statistics for `bn` applied to x; in training also updates its running statistics.

    moments: the local (mean, biased var) of x already produced by the conv that wrote x,
    which updated bn's running statistics as running_update says, else None (then one
    standalone statistics pass reads x). sync_group: an active fused_preact.distributed
    handle to synchronise the statistics over (0: local); images: the batch over all its
    ranks (distributed.agree), None where unknown. tape: the block's block_autograd.Tape
    (nothing records autograd there, and the tape must see x itself, not a detached copy).
    """
    if not needs_batch_stats(bn):
        return BNStats(bn.running_mean, bn.running_var, False)
    sync_group = sync_group if bn.training else 0
    check_batch_values(bn, tuple(x.shape), images if sync_group else None)
    if moments is None:
        moments = ops.batch_stats(x if tape is not None else x.detach(), *running_update(bn, bool(sync_group)),
                                  backend)
    mean, var = moments  # no gradient: batch_stats has none, a unit's statistics outputs are non-differentiable
    if sync_group:
        partials = distributed.gather_partials(mean, var, x.numel() // x.shape[1], sync_group)
        # The merge of all ranks' statistics updates the running statistics (and counts the batch).
        mean, var = ops.bn_finalize(partials, *running_update(bn, False), backend)
    return BNStats(mean, var, True, sync_group)


def compute_dtype(x: Tensor, conv: nn.Conv2d) -> torch.dtype:
    """The conv dtype: the autocast dtype where autocast is on (as nn.Conv2d), else the
    weight's (a mismatch with x is then reported by the op, never cast silently)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return conv.weight.dtype


class UnitResult(NamedTuple):
    output: Tensor
    moments: Optional[tuple[Tensor, Tensor]]  # the consumer's local (mean, biased var), see unit
    carried: Optional[Tensor]  # the unit's input as its autograd node returns it (carry_input)


def unit(x: Tensor, stats: Optional[BNStats], bn: Optional[nn.BatchNorm2d], conv: nn.Conv2d,
         residual: Optional[Tensor], consumer: Optional[Consumer], backend: str,
         carry_input: bool = False, tape: Optional[Tape] = None) -> UnitResult:
    """conv(relu(bn(x))) [+ residual] with `stats` (None: plain conv of x, no BN, no ReLU).

    moments: where `consumer` needs batch statistics, their local (mean, biased var) for
    bn_stats (None when they could not be produced in the same pass). carry_input: also
    return x through the unit's autograd node, for x's other consumer (a block's identity
    path) to use instead of x, so that consumer's gradient is added to dx inside the unit's
    backward kernel (OpEntry.call_carrying_input); else carried is None. tape: the block's
    block_autograd.Tape, which records the unit instead of an autograd node of its own (x
    is then carried as it is: the tape joins the gradients).
    """
    dtype = compute_dtype(x, conv)
    if stats is None:
        # The kernels read a float32 x under autocast and cast its tiles (no cast kernel).
        x = x if x.dtype in (dtype, torch.float32) else x.to(dtype)
        mean, var, bn_weight, bn_bias, eps, batch, sync_group = None, None, None, None, 0.0, False, 0
    else:
        mean, var, batch, sync_group = stats
        bn_weight, bn_bias, eps = bn.weight, bn.bias, bn.eps
    # The epilogue adds a residual of the conv dtype, or a float32 one under autocast (the
    # identity stream: y is then float32, as eager's promotion); any other is added here.
    fused_residual = residual if residual is None or residual.dtype in ops.residual_dtypes(dtype) else None
    want = consumer is not None and needs_batch_stats(consumer.bn) and residual is fused_residual
    running = running_update(consumer.bn, consumer.synced) if want else (None, None, None, None)
    # Under autocast the float32 parameter itself: the kernels cast its tiles (and write its
    # gradient in float32), so no cast kernel runs beside them.
    weight = conv.weight if conv.weight.dtype in (dtype, torch.float32) else conv.weight.to(dtype)
    args = (x, mean, var, bn_weight, bn_bias, weight, fused_residual, list(conv.stride), list(zero_padding(conv)),
            float(eps), batch, want, *running, backend, sync_group, dtype)
    if tape is not None:
        (y, y_mean, y_var), carried = tape.run_unit(args), x if carry_input else None
    elif carry_input:
        y, y_mean, y_var, carried = ops.bn_relu_conv.call_carrying_input(*args)
    else:
        (y, y_mean, y_var), carried = ops.bn_relu_conv(*args), None
    if residual is not None and fused_residual is None:
        return UnitResult(y + residual, None, carried)
    return UnitResult(y, (y_mean, y_var) if want else None, carried)

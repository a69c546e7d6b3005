"""Registered ops (layer ops): every fused op declared once with torch.library.custom_op.

This is the only door from Python into kernels (entry.py: plain eager calls run the op's
body directly, everything that traces gets the registered op). Each op validates its arguments
(clear errors naming the argument), asks `dispatch.select` for a backend and calls that
backend's implementation. Fake implementations make the ops traceable by
torch.compile; `bn_relu_conv` carries the autograd formula of a whole
bn -> relu -> conv (+ residual) unit, saving only the pre-BN input x.

Ops (DESIGN.md section 1):
  bn_relu_conv        y = conv(relu(bn(x)), W) [+ residual], optionally the batch statistics
                      of y for the next BN (and its running statistics updated in place)
  batch_stats         batch statistics of x (first block of a network), running stats updated
  bn_finalize         merge partials -> (mean, biased var); update running stats in place
  bn_relu_conv_dgrad  g = dgrad(dy, W) * [bn(x) > 0], per-channel sums of g and g * xhat
                      [+ another conv's gradient of relu(bn(x)), before the mask: a projection's]
  bn_relu_conv_wgrad  dW = wgrad(relu(bn(x)), dy)
  bn_backward_apply   dx = scale * (g - sum(g) / n - xhat * sum(g * xhat) / n)   (training)
                      [+ x's gradient from its other consumer: a block's identity path]

Batch statistics are (mean, biased var) per channel, float32 (float64 for float64 inputs);
the ops that produce them take the consuming BatchNorm's running statistics (running_mean,
running_var, num_batches_tracked, momentum; None where it has none) and update them as
nn.BatchNorm2d does. Synchronised BatchNorm (fused_preact.distributed) produces local
statistics without a running update, exchanges them as [T, 3, C] partials (count, mean,
M2 per rank) for bn_finalize, and exchanges the gradient sums before bn_backward_apply.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import Tensor

from . import dispatch, distributed
from .backends.base import conv_output_hw, stats_dtype, weight_memory_format
from .entry import declare, registered_op_needed

LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- checks
def _check_like_x(name: str, t: Optional[Tensor], x: Tensor) -> None:
    """A gradient added to x's (None: none) must have x's shape, dtype and device."""
    if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device):
        raise ValueError(f"fused_preact: {name} must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"{tuple(t.shape)}, {t.dtype}, {t.device}")


def _check_nchw(name: str, t: Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"fused_preact: {name} must be a 4-D NCHW tensor, got shape {tuple(t.shape)}")


def _check_vector(name: str, v: Optional[Tensor], channels: int, device: torch.device) -> None:
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != channels:
        raise ValueError(f"fused_preact: {name} must have shape ({channels},), got {tuple(v.shape)}")
    if channels > 1 and v.stride(0) != 1:  # the kernels read (and update) the values one after another
        raise ValueError(f"fused_preact: {name} must be contiguous, got stride {v.stride(0)} (pass .contiguous())")
    if v.device != device:
        raise ValueError(f"fused_preact: {name} is on {v.device} but x is on {device}")
    if not v.is_floating_point():
        raise TypeError(f"fused_preact: {name} must be floating point, got {v.dtype}")


def _check_pair(name: str, value: Sequence[int], minimum: int) -> None:
    if len(value) != 2 or any(v < minimum for v in value):
        raise ValueError(f"fused_preact: {name} must be two ints >= {minimum}, got {list(value)}")


def residual_dtypes(conv_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The residual dtypes a unit adds in its epilogue: the conv's, and float32 under a
    low-precision conv (autocast's identity stream; y is then float32, as eager's promotion)."""
    return (conv_dtype, torch.float32) if conv_dtype in LOW_PRECISION else (conv_dtype,)


def check_unit_args(x, mean, var, bn_weight, bn_bias, weight, residual, stride, padding,
                    conv_dtype: Optional[torch.dtype] = None) -> None:
    """Validate a bn -> relu -> conv unit computing in conv_dtype (None: weight's dtype);
    raise naming the offending argument."""
    _check_nchw("x", x)
    _check_nchw("weight", weight)
    conv_dtype = conv_dtype or weight.dtype
    if not x.is_floating_point():
        raise TypeError(f"fused_preact: x must be float32, float16 or bfloat16, got {x.dtype}")
    # Under autocast x (BN reads it in full precision) and the weight (the float32 master
    # copy, cast tile by tile in the kernel) may stay float32 while the conv runs in a low
    # precision; otherwise their dtypes are the conv's.
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype != conv_dtype and not (t.dtype == torch.float32 and conv_dtype in LOW_PRECISION):
            raise TypeError(
                f"fused_preact: {name} dtype {t.dtype} does not go with conv_dtype {conv_dtype} "
                "(equal dtypes, or float32 with a float16/bfloat16 conv under autocast)")
    if weight.device != x.device:
        raise ValueError(f"fused_preact: weight is on {weight.device} but x is on {x.device}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"fused_preact: weight expects {weight.shape[1]} input channels (groups=1 only), "
            f"x has {x.shape[1]}")
    _check_pair("stride", stride, 1)
    _check_pair("padding", padding, 0)
    if (mean is None) != (var is None):
        raise ValueError("fused_preact: mean and var must be given together (or neither: no BN prologue)")
    for name, v in (("mean", mean), ("var", var), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _check_vector(name, v, x.shape[1], x.device)
    out_hw = conv_output_hw(x.shape[2:], weight.shape[2:], stride, padding)
    if min(out_hw) < 1:
        raise ValueError(
            f"fused_preact: input {tuple(x.shape[2:])} is too small for kernel "
            f"{tuple(weight.shape[2:])} with padding {list(padding)}")
    if residual is not None:
        expected = (x.shape[0], weight.shape[0], *out_hw)
        if tuple(residual.shape) != expected:
            raise ValueError(f"fused_preact: residual must have shape {expected}, got {tuple(residual.shape)}")
        if residual.device != x.device or residual.dtype not in residual_dtypes(conv_dtype):
            raise ValueError(
                f"fused_preact: residual must be {' or '.join(map(str, residual_dtypes(conv_dtype)))} on {x.device}, "
                f"got {residual.dtype} on {residual.device}")


def check_running(running_mean, running_var, num_batches_tracked, momentum, channels, device) -> None:
    """The running statistics an op updates (all None: none)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("fused_preact: running_mean and running_var must be given together")
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("fused_preact: momentum=None (cumulative average) needs num_batches_tracked")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, v, channels, device)


class OpCall(NamedTuple):
    """One op body's call of its backend implementation, as a Recorder sees it."""
    backend: str  # the name of the backend that ran it
    impl: Callable  # what replays the call: the implementation, or what the backend bound (Backend.bind)
    args: dict  # impl's arguments, by name
    outputs: tuple  # what it returned, as a tuple


class Recorder(Protocol):
    def add(self, call: OpCall) -> None: ...


_recorder = threading.local()


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Hand every op body's backend call in this thread to `recorder` (block_autograd's tape)."""
    previous = getattr(_recorder, "value", None)
    _recorder.value = recorder
    try:
        yield
    finally:
        _recorder.value = previous


def other_cuda_device(t: Tensor) -> Optional[torch.device]:
    """t's device where it is a CUDA device other than the current one, else None. Triton
    launches on the current device, where PyTorch's own ops follow their tensors (a model on
    cuda:1 with cuda:0 current, as in DDP scripts without torch.cuda.set_device): the ops make
    their tensors' device current first, as a CUDA extension's device guard does. (The
    backward runs in autograd's thread for the gradients' device, which is current there.)"""
    device = t.device
    return None if device.type != "cuda" or device.index == torch.cuda.current_device() else device


def _run(op: str, backend: str, computes_in: Optional[torch.dtype], **args):
    """Call `op` on the backend chosen for the tensors among `args` (computes_in: the dtype
    the op's convolution computes in, None for ops without one), passing `args` by name, on
    their device."""
    tensors = [a for a in args.values() if isinstance(a, Tensor)]
    device = other_cuda_device(tensors[0])
    if device is not None:
        with torch.cuda.device(device):
            return _run(op, backend, computes_in, **args)
    chosen = dispatch.select(op, tensors, backend, computes_in)
    if op == "bn_relu_conv":
        _unit_choice.value = (id(args["x"]), id(args["weight"]), chosen.name)
    impl = chosen.impls[op]
    recorder = getattr(_recorder, "value", None)
    if recorder is None:
        return impl(**args)
    outputs, replay = chosen.bind(impl, args)
    recorder.add(OpCall(chosen.name, replay, args, outputs if isinstance(outputs, tuple) else (outputs,)))
    return outputs


# The backend the last bn_relu_conv body ran on in this thread, by the ids of its x and
# weight: its setup_context (called right after the body) saves it for the backward
# without selecting again (two selections per unit were a tenth of a block's host time).
_unit_choice = threading.local()


def _empty_nchw_channels_last(like: Tensor, shape, dtype=None) -> Tensor:
    return like.new_empty(shape, dtype=dtype or like.dtype).contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- forward unit
RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@declare("bn_relu_conv", mutates_args=RUNNING)
def bn_relu_conv(
    x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], weight: Tensor, residual: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], eps: float, batch_stats: bool, want_stats: bool,
    running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
    momentum: Optional[float], backend: str, sync_group: int = 0, conv_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = conv(relu(bn(x)), weight) (+ residual) and, if want_stats, the batch mean and
    biased variance of y per channel (else two empty tensors), the running statistics given
    updated with them (the next BatchNorm's; see the module docstring).

    The conv computes in conv_dtype (None: weight's dtype): the activation relu(bn(x)) and
    the weight are cast to it in the kernel (under autocast the weight is the float32
    parameter itself: no cast launch, and its gradient comes back in float32). y has the
    conv dtype, or the residual's where that is float32 under autocast (the dtype of eager's
    `conv(...) + shortcut`; the sum is taken in float32 and rounded once).
    mean/var None: no BN prologue (a plain conv). batch_stats: mean/var are the batch
    statistics of x (training mode), so the backward differentiates through them;
    sync_group (a fused_preact.distributed handle, 0 for none): they are statistics over
    all ranks of that group, and so are the means the backward subtracts.
    """
    conv_dtype = conv_dtype or weight.dtype
    check_unit_args(x, mean, var, bn_weight, bn_bias, weight, residual, stride, padding, conv_dtype)
    if running_mean is not None and not want_stats:
        raise ValueError("fused_preact: running statistics are updated only with want_stats=True")
    check_running(running_mean, running_var, num_batches_tracked, momentum, weight.shape[0], x.device)
    return _run("bn_relu_conv", backend, conv_dtype, x=x, mean=mean, var=var, bn_weight=bn_weight,
                bn_bias=bn_bias, weight=weight, residual=residual, stride=list(stride), padding=list(padding),
                eps=eps, want_stats=want_stats, running_mean=running_mean, running_var=running_var,
                num_batches_tracked=num_batches_tracked, momentum=momentum, conv_dtype=conv_dtype)


@bn_relu_conv.op.register_fake
def _(x, mean, var, bn_weight, bn_bias, weight, residual, stride, padding, eps, batch_stats,
      want_stats, running_mean, running_var, num_batches_tracked, momentum, backend, sync_group=0, conv_dtype=None):
    conv_dtype = conv_dtype or weight.dtype
    check_unit_args(x, mean, var, bn_weight, bn_bias, weight, residual, stride, padding, conv_dtype)
    out_hw = conv_output_hw(x.shape[2:], weight.shape[2:], stride, padding)
    n, c_out = x.shape[0], weight.shape[0]
    y_dtype = conv_dtype if residual is None else residual.dtype
    y = _empty_nchw_channels_last(x, (n, c_out, *out_hw), dtype=y_dtype)
    channels = c_out if want_stats else 0
    stats = x.new_empty((channels,), dtype=stats_dtype(y_dtype))
    return y, stats, torch.empty_like(stats)


UNIT_ARGS = 19  # bn_relu_conv's arguments: its backward returns a gradient (or None) for each


class UnitConf(NamedTuple):
    """What a unit's backward needs besides its saved tensors (x, mean, var, bn_weight,
    bn_bias, weight)."""
    stride: list
    padding: list
    eps: float
    batch_stats: bool
    backend: str  # the backend that ran the forward (it runs the backward too)
    has_residual: bool
    sync_group: int
    conv_dtype: torch.dtype


def unit_saved(inputs) -> tuple:
    """The tensors a unit's backward reads, from bn_relu_conv's arguments: only the pre-BN
    input and per-channel vectors (relu(bn(x)) is recomputed in the backward)."""
    return inputs[:6]


def unit_conf(inputs, ran_on: str) -> UnitConf:
    """A unit's UnitConf, from bn_relu_conv's arguments and the backend that ran them (which
    runs the backward too, whatever use_backend() or FUSED_PREACT_BACKEND say then)."""
    (x, mean, var, bn_weight, bn_bias, weight, residual, stride, padding, eps, batch_stats,
     _want_stats, _running_mean, _running_var, _nbt, _momentum, backend, sync_group, conv_dtype) = inputs
    return UnitConf(list(stride), list(padding), eps, batch_stats, ran_on, residual is not None, sync_group,
                    conv_dtype or weight.dtype)


def _backend_that_ran(inputs) -> str:
    """The backend the unit body that just ran on `inputs` chose."""
    x, mean, var, bn_weight, bn_bias, weight, residual = inputs[:7]
    backend, conv_dtype = inputs[16], inputs[18]
    if torch.compiler.is_compiling():
        # Compiled: the ops of the backward graph select at run time, as the forward's did.
        return backend
    last = getattr(_unit_choice, "value", None)
    _unit_choice.value = None
    if last is not None and last[:2] == (id(x), id(weight)):
        return last[2]
    # The registered op ran (a dispatch mode, fake tensors): the same choice, made again.
    return dispatch.select("bn_relu_conv", [x, mean, var, bn_weight, bn_bias, weight, residual], backend,
                           conv_dtype or weight.dtype).name


def _unit_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*unit_saved(inputs))
    ctx.tensor_inputs = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]  # (gradients_used)
    ctx.conf = unit_conf(inputs, _backend_that_ran(inputs))
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the statistics outputs


def _unit_backward(ctx, dy, _dmean, _dvar, dx_other=None):
    """dx_other: the gradient of x from its other consumer (the identity path of a residual
    block), present where the forward carried x (OpEntry.call_carrying_input)."""
    if dy is None:  # the output got no gradient (grads are not materialised as zeros)
        return (dx_other if ctx.needs_input_grad[0] else None,) + (None,) * (UNIT_ARGS - 1)
    saved = ctx.saved_tensors
    registered = registered_op_needed((dy, dx_other, *saved))
    needs = gradients_used(ctx, ctx.tensor_inputs)
    dx, dgamma, dbeta, dweight, dresidual = unit_gradients(saved, ctx.conf, needs, dy, dx_other,
                                                           backward_ops(ctx.conf.backend, registered))
    return (dx, None, None, dgamma, dbeta, dweight, dresidual) + (None,) * (UNIT_ARGS - 7)


def gradients_used(ctx, tensor_inputs: Sequence[int]) -> tuple[bool, ...]:
    """ctx.needs_input_grad of a Function's backward narrowed to the inputs whose gradient
    this run of the engine uses (tensor_inputs: the positions of the inputs that were
    tensors, whose edges ctx.next_functions holds, in order). A Function's needs_input_grad
    says which inputs require grad (pytorch/pytorch#174017), where PyTorch's own ops skip the
    gradients a run does not reach (Node::task_should_compute_output): for
    torch.autograd.grad(loss, [x]), an attack's input gradient, they compute no weight
    gradient, and neither do we then. Traced (torch.compile), the compiler's graph decides."""
    if torch.compiler.is_compiling():
        return ctx.needs_input_grad
    used = list(ctx.needs_input_grad)
    for position, (node, _) in zip(tensor_inputs, ctx.next_functions):
        used[position] = used[position] and _engine_uses(node)
    return tuple(used)


def _engine_uses(node) -> bool:
    """Whether the running backward executes `node` (or, a leaf's, returns its gradient)."""
    try:
        return torch._C._will_engine_execute_node(node)  # what torch.autograd.graph.register_multi_grad_hook asks
    except RuntimeError:  # it answers nothing for a leaf whose gradient autograd.grad returns: used
        return True


def check_no_double_backward() -> None:
    if torch.is_grad_enabled():  # backward(create_graph=True): the kernels have no derivative
        raise RuntimeError("fused_preact: double backward (create_graph=True, e.g. a gradient penalty) is not "
                           "supported by the fused units; use the eager blocks for that part of the model")


def call_directly(fn: Callable, **args):
    """fn(**args): how unit_gradients calls each step where nothing records them."""
    return fn(**args)


def unit_gradients(saved: Sequence[Optional[Tensor]], conf: UnitConf, needs: Sequence[bool], dy: Tensor,
                   dx_other: Optional[Tensor], impls: tuple[Callable, Callable, Callable],
                   da_other: Optional[Tensor] = None, bn_elsewhere: bool = False,
                   call: Callable = call_directly) -> tuple:
    """(dx, dgamma, dbeta, dweight, dresidual) of one unit given its output's gradient dy;
    None for each that `needs` (bn_relu_conv's needs_input_grad) does not ask for. dx_other:
    x's gradient from its other consumers, added to dx inside bn_backward_apply (so nobody
    accumulates the two with a separate add). impls: the wgrad, dgrad and BN-backward to call
    by keyword (backward_ops). call(fn, **args): runs each step that makes a tensor, the
    impls' and the glue's (a block Program records them there: block_autograd).

    Where units read the same activation a = relu(bn(x)) (a projection shortcut reads the
    first unit's), one BN backward serves them all, since it is linear in a's gradient: the
    others run with bn_elsewhere (dx is then their conv's input gradient, a's, and dgamma and
    dbeta None), and the one that runs it gets the sum of theirs as da_other, which its dgrad
    kernel adds before the ReLU mask and the BN sums."""
    check_no_double_backward()
    x, mean, var, bn_weight, bn_bias, weight = saved
    stride, padding, eps, batch_stats, _backend, has_residual, sync_group, conv_dtype = conf  # impls: its ops
    dx = dgamma = dbeta = dweight = None
    if not dy.is_contiguous(memory_format=torch.channels_last):
        dy = call(channels_last, t=dy)  # float32 where y added a float32 shortcut
    wgrad, dgrad, apply_bn = impls
    if needs[5]:
        dweight = call(wgrad, dy=dy, x=x, mean=mean, var=var, bn_weight=bn_weight, bn_bias=bn_bias,
                       weight_shape=list(weight.shape), stride=stride, padding=padding, eps=eps,
                       weight_dtype=weight.dtype, conv_dtype=conv_dtype,
                       weight_channels_last=weight_is_channels_last(weight))
    if bn_elsewhere:  # from here on the conv alone: dx is its input gradient (dx_other is None)
        mean = var = bn_weight = bn_bias = None
    if needs[0] or needs[3] or needs[4]:
        g, sums = call(dgrad, dy=dy, weight=weight, x=x, mean=mean, var=var, bn_weight=bn_weight, bn_bias=bn_bias,
                       stride=stride, padding=padding, eps=eps, conv_dtype=conv_dtype, g_other=da_other)
        if mean is None:
            dx = g if dx_other is None else call(add, a=g, b=dx_other)
        else:
            if needs[0]:
                count = x.numel() // x.shape[1]
                grad_sums = sums
                if batch_stats and sync_group:  # the means over all ranks (dgamma, dbeta stay local sums)
                    grad_sums, count = distributed.global_grad_means(sums, count, sync_group), 1
                dx = call(apply_bn, g=g, x=x, mean=mean, var=var, bn_weight=bn_weight, grad_sums=grad_sums,
                          count=count, eps=eps, batch_stats=batch_stats, dx_other=dx_other)
            if needs[3] or needs[4]:
                dgamma, dbeta = call(bn_param_grads, sums=sums, gamma_dtype=bn_weight.dtype if needs[3] else None,
                                     beta_dtype=bn_bias.dtype if needs[4] else None)
    dresidual = dy if (has_residual and needs[6]) else None
    return dx, dgamma, dbeta, dweight, dresidual


# The glue steps of unit_gradients (and of a block's backward: block_autograd), by keyword.
def channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def add(a: Tensor, b: Tensor) -> Tensor:
    return a + b


def bn_param_grads(sums: Tensor, gamma_dtype: Optional[torch.dtype],
                   beta_dtype: Optional[torch.dtype]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(dgamma, dbeta) from dgrad's sums [2, C] = (sum g, sum g * xhat), each in its
    parameter's dtype (None: not asked for)."""
    sum_g, sum_g_xhat = sums.unbind()  # one call for both rows
    return (None if gamma_dtype is None else _cast(sum_g_xhat, gamma_dtype),
            None if beta_dtype is None else _cast(sum_g, beta_dtype))


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`: t itself where it has it already (what t.to(dtype) returns, without
    parsing t.to's overloaded arguments on every call)."""
    return t if t.dtype == dtype else t.to(dtype)


bn_relu_conv.register_autograd(_unit_backward, _unit_setup_context)


BACKWARD_OPS = ("bn_relu_conv_wgrad", "bn_relu_conv_dgrad", "bn_backward_apply")  # unit_gradients' ops


def backward_ops(backend: str, registered: bool) -> tuple[Callable, Callable, Callable]:
    """(wgrad, dgrad, BN-backward), called by keyword, as the unit's backward runs them on
    `backend` (the one that ran the forward): in plain eager mode its implementations
    directly, since the forward validated every argument and chose the backend (going
    through the op entry and selecting again for each of the three ops was a sixth of a
    block's host time); the registered ops wherever something traces or intercepts, or a
    tensor is a subclass (registered)."""
    if registered:
        return tuple(functools.partial(entry, backend=backend)
                     for entry in (bn_relu_conv_wgrad, bn_relu_conv_dgrad, bn_backward_apply))
    impls = dispatch.get_backend(backend).impls
    return tuple(impls[op] for op in BACKWARD_OPS)


# --------------------------------------------------------------------------- statistics
@declare("batch_stats", mutates_args=RUNNING)
def batch_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                backend: str) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance per channel of x; the running statistics given are
    updated with them as nn.BatchNorm2d does."""
    _check_nchw("x", x)
    check_running(running_mean, running_var, num_batches_tracked, momentum, x.shape[1], x.device)
    return _run("batch_stats", backend, None, x=x, running_mean=running_mean, running_var=running_var,
                num_batches_tracked=num_batches_tracked, momentum=momentum)


@batch_stats.op.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, backend):
    _check_nchw("x", x)
    mean = x.new_empty((x.shape[1],), dtype=stats_dtype(x.dtype))
    return mean, torch.empty_like(mean)


@declare("bn_finalize", mutates_args=RUNNING)
def bn_finalize(partials: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                backend: str) -> tuple[Tensor, Tensor]:
    """Merge partials into (mean, biased var); update running stats like nn.BatchNorm2d.

    With running statistics, counts the batch in num_batches_tracked (if given) first, as
    nn.BatchNorm2d does; momentum=None: cumulative average with factor 1 / that count.
    """
    if partials.dim() != 3 or partials.shape[1] != 3:
        raise ValueError(f"fused_preact: partials must be [T, 3, C], got {tuple(partials.shape)}")
    check_running(running_mean, running_var, num_batches_tracked, momentum, partials.shape[2], partials.device)
    return _run("bn_finalize", backend, None, partials=partials, running_mean=running_mean,
                running_var=running_var, num_batches_tracked=num_batches_tracked, momentum=momentum)


@bn_finalize.op.register_fake
def _(partials, running_mean, running_var, num_batches_tracked, momentum, backend):
    c = partials.shape[2]
    return partials.new_empty((c,)), partials.new_empty((c,))


# --------------------------------------------------------------------------- backward pieces
@declare("bn_relu_conv_dgrad")
def bn_relu_conv_dgrad(dy: Tensor, weight: Tensor, x: Tensor, mean: Optional[Tensor],
                       var: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       stride: Sequence[int], padding: Sequence[int], eps: float,
                       backend: str, conv_dtype: Optional[torch.dtype] = None,
                       g_other: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """g = (dgrad(dy, W) + g_other) * [bn(x) > 0] and sums [2, C] = (sum g, sum g * xhat).

    The conv computes in conv_dtype (None: dy's); under autocast a float32 weight or dy is
    cast tile by tile in the kernel. g_other (x's shape and dtype, or None): the gradient of
    the same activation relu(bn(x)) from another conv that reads it, added in float32.
    Without a BN prologue (mean None): g = dgrad(dy, W) + g_other, sums empty.
    """
    _check_like_x("g_other", g_other, x)
    conv_dtype = conv_dtype or dy.dtype
    return _run("bn_relu_conv_dgrad", backend, conv_dtype, dy=dy, weight=weight, x=x, mean=mean, var=var,
                bn_weight=bn_weight, bn_bias=bn_bias, stride=list(stride), padding=list(padding), eps=eps,
                conv_dtype=conv_dtype, g_other=g_other)


@bn_relu_conv_dgrad.op.register_fake
def _(dy, weight, x, mean, var, bn_weight, bn_bias, stride, padding, eps, backend, conv_dtype=None, g_other=None):
    channels = 0 if mean is None else x.shape[1]
    return (_empty_nchw_channels_last(x, x.shape),
            x.new_empty((2, channels), dtype=stats_dtype(x.dtype)))


def weight_is_channels_last(weight: Tensor) -> bool:
    """Whether a conv weight is laid out channels_last (and not also plainly contiguous, as a
    1x1 weight is): its gradient is then written so, or autograd copies it into that layout."""
    return not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


@declare("bn_relu_conv_wgrad")
def bn_relu_conv_wgrad(dy: Tensor, x: Tensor, mean: Optional[Tensor], var: Optional[Tensor],
                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                       eps: float, backend: str, weight_dtype: Optional[torch.dtype] = None,
                       conv_dtype: Optional[torch.dtype] = None, weight_channels_last: bool = False) -> Tensor:
    """dW = wgrad(relu(bn(x)), dy), the activation recomputed from x, computed in conv_dtype
    (None: dy's) and written in weight_dtype (the parameter's; None: dy's), contiguous or,
    with weight_channels_last, channels_last (the parameter's layout)."""
    conv_dtype = conv_dtype or dy.dtype
    return _run("bn_relu_conv_wgrad", backend, conv_dtype, dy=dy, x=x, mean=mean, var=var, bn_weight=bn_weight,
                bn_bias=bn_bias, weight_shape=list(weight_shape), stride=list(stride), padding=list(padding), eps=eps,
                weight_dtype=weight_dtype or dy.dtype, conv_dtype=conv_dtype,
                weight_channels_last=weight_channels_last)


@bn_relu_conv_wgrad.op.register_fake
def _(dy, x, mean, var, bn_weight, bn_bias, weight_shape, stride, padding, eps, backend, weight_dtype=None,
      conv_dtype=None, weight_channels_last=False):
    return x.new_empty(weight_shape, dtype=weight_dtype or dy.dtype).contiguous(
        memory_format=weight_memory_format(weight_channels_last))


@declare("bn_backward_apply")
def bn_backward_apply(g: Tensor, x: Tensor, mean: Tensor, var: Tensor, bn_weight: Optional[Tensor],
                      grad_sums: Tensor, count: int, eps: float, batch_stats: bool,
                      dx_other: Optional[Tensor], backend: str) -> Tensor:
    """dx of BatchNorm given g = dL/d bn(x): scale * (g - mean(g) - xhat * mean(g xhat)),
    plus dx_other (x's gradient from another consumer, x's shape and dtype) when given.

    grad_sums [2, C] = (sum g, sum g * xhat) over the `count` values per channel the
    statistics came from; the means are taken here (no division kernel beside it). Under
    synchronised BN the caller passes the means over all ranks and count 1. With
    batch_stats False (eval-mode statistics) the mean terms vanish: scale * g.
    """
    _check_like_x("dx_other", dx_other, x)
    return _run("bn_backward_apply", backend, None, g=g, x=x, mean=mean, var=var, bn_weight=bn_weight,
                grad_sums=grad_sums, count=count, eps=eps, batch_stats=batch_stats, dx_other=dx_other)


@bn_backward_apply.op.register_fake
def _(g, x, mean, var, bn_weight, grad_sums, count, eps, batch_stats, dx_other, backend):
    return _empty_nchw_channels_last(x, x.shape)

"""Op entry (the eager fast path into the registered ops): how Python calls an op, its body
directly in plain eager mode, the registered custom op wherever something traces or
intercepts the call.

Each op is declared once with torch.library.custom_op (schema, fake implementation),
which is what torch.compile, torch.export, opcheck and dispatch modes see; an op with an
autograd formula (the forward unit, which also updates running statistics in place, so
torch.library's functional-only register_autograd cannot take it) gets a
torch.autograd.Function around the op, which Dynamo traces. In plain eager mode the
custom-op machinery (argument normalisation, redispatch through the ADInplaceOrView key,
alias checks) costs more host time per call than the fused kernels take at small sizes,
and a block makes about ten calls per training step. So the entry point runs the same
body directly there.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .backends.base import major_minor

PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)


def dynamo_traces_the_ops(torch_version: str = torch.__version__) -> bool:
    """Whether torch.compile can trace the ops' autograd.Function: from torch 2.7. Dynamo of
    torch 2.5 and 2.6 traces a Function's backward in a strict mode that bans what ours reads
    (is_contiguous, strides), and failed on every fused block, fullgraph or not; there each op
    call is left to eager PyTorch (a graph break), so a compiled model still runs, its fused
    ops eagerly (benchmarks/results/2026-12-07-cpu-old-torch-*)."""
    return major_minor(torch_version) >= (2, 7)


def intercepted() -> bool:
    """True where a compiler or tracer is recording, or a dispatch mode (fake tensors,
    functionalization, FlopCounterMode...) or torch.func transform intercepts: those must
    see the registered op."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active())


def check_no_dual_tensor(name: str, args) -> None:
    """Raise, before the op runs, where an argument is a dual tensor of forward-mode AD: the
    ops have no forward derivative, and a Triton kernel would drop the tangent without a word.
    (The fused modules call their eager submodules while a dual level is active:
    unfused.differentiation_transform.)"""
    if forward_ad._current_level >= 0 and any(  # inside forward_ad.dual_level(); PyTorch keeps no public flag
            isinstance(a, Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise RuntimeError(f"fused_preact::{name} has no forward-mode derivative (an argument is a dual tensor "
                           f"of torch.autograd.forward_ad); the fused modules run their eager submodules while "
                           f"a dual level is active")


def declare(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], "OpEntry"]:
    """Decorator: declare the function as the op fused_preact::<name>; returns its entry."""
    return lambda body: OpEntry(name, body, mutates_args)


def registered_op_needed(args) -> bool:
    """Whether a call must go through the registered op: something intercepts, or a tensor
    is a subclass (which must see the op)."""
    return intercepted() or any(isinstance(a, Tensor) and type(a) not in PLAIN_TENSOR_TYPES for a in args)


class OpEntry:
    """The callable that ops.py exports for one op. `.op` is the registered custom op."""

    def __init__(self, name: str, body: Callable, mutates_args: Sequence[str] = ()):
        self.op = torch.library.custom_op(f"fused_preact::{name}", mutates_args=tuple(mutates_args))(body)
        self.body = body
        self.signature = inspect.signature(body)
        self.positional_count = len(self.signature.parameters)
        self.function: type[torch.autograd.Function] | None = None
        self.__doc__, self.__name__ = body.__doc__, name
        if not dynamo_traces_the_ops():
            self.leave_to_eager_under_compile()

    def leave_to_eager_under_compile(self) -> None:
        """torch.compile does not trace into this op's calls: each is a graph break, run eagerly."""
        self.call = torch.compiler.disable(self.call)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """The op's autograd formula, as a torch.autograd.Function around the op (its body
        in plain eager mode, the registered op wherever something traces): torch.library's
        own register_autograd takes functional ops only, and the forward unit updates the
        next BatchNorm's running statistics in place. `backward` gets one gradient per
        output, plus the carried input's when the call carried it (see call_carrying_input)."""
        # The closure holds the registered overload and the body, not this entry: Dynamo of
        # torch 2.7 and 2.8 cannot wrap an OpEntry, and broke the graph at every op there.
        op, body = getattr(torch.ops.fused_preact, self.__name__).default, self.body

        def forward(ctx, *args_and_flags):
            # ctx-first style: Function.apply binds the signature of a separate
            # setup_context on every call (inspect.signature), which costs more than the op.
            # The flags come last, so ctx.needs_input_grad[i] is the op's argument i.
            *args, registered, carry_input = args_and_flags
            output = op(*args) if registered else body(*args)
            setup_context(ctx, args, output)
            return output + (args[0],) if carry_input else output

        def backward_and_flags(ctx, *grads):
            return backward(ctx, *grads) + (None, None)
        self.function = type(f"{self.__name__}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward_and_flags)})

    def __call__(self, *args, **kwargs):
        return self.call(self.positional(args, kwargs), False)

    def call_carrying_input(self, *args, **kwargs):
        """The op's outputs plus its first input, returned by the op's autograd node: that
        input's other consumer (a residual block's identity path) takes it from here, so its
        gradient reaches this op's backward, which adds it to the input's own gradient inside
        a kernel instead of autograd accumulating the two with a separate add."""
        return self.call(self.positional(args, kwargs), True)

    def positional(self, args, kwargs) -> tuple:
        if kwargs or len(args) < self.positional_count:
            bound = self.signature.bind(*args, **kwargs)  # the Function takes positional arguments
            bound.apply_defaults()
            return bound.args
        return args

    def call(self, positional: tuple, carry_input: bool):
        check_no_dual_tensor(self.__name__, positional)
        # One pass (this runs about ten times per block and step): a tensor subclass must
        # see the registered op; otherwise note whether autograd has anything to record.
        requires_grad, plain = False, True
        for a in positional:
            if isinstance(a, Tensor):
                plain = plain and type(a) in PLAIN_TENSOR_TYPES
                requires_grad = requires_grad or a.requires_grad
        registered = intercepted() or not plain
        # torch.jit.trace records a custom Function as an opaque Python call, which
        # torch.jit.save cannot write, and its check re-traces under no_grad, where no Function
        # runs: so a trace records the registered op whatever the grad mode (no backward
        # through the traced graph: PyTorch then says the op has no autograd formula).
        if requires_grad and torch.is_grad_enabled() and self.function is not None and not torch.jit.is_tracing():
            return self.function.apply(*positional, registered, carry_input)
        # An op without a formula goes through the registered op, which raises PyTorch's
        # own "no autograd formula" error (double backward, say).
        if registered or requires_grad and torch.is_grad_enabled():
            output = self.op(*positional)
        else:
            output = self.body(*positional)
        return output + (positional[0],) if carry_input else output

"""How Python calls an op: its body directly in plain eager mode, the registered custom op
wherever something traces or intercepts the call.

Each op is declared once with torch.library.custom_op (schema, fake implementation,
autograd formula), which is what torch.compile, torch.export, opcheck and dispatch modes
see. In plain eager mode the custom-op machinery (argument normalisation, redispatch
through the autograd and ADInplaceOrView keys, alias checks) costs more host time per
call than the fused kernels take at small sizes, and a block makes about ten calls per
training step. So the entry point runs the same body directly there, and the same
autograd formula through an equivalent torch.autograd.Function.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)


def plain_eager(args: Sequence, kwargs: dict) -> bool:
    """True where the body may run directly: no compiler or tracer is recording, no
    dispatch mode (fake tensors, functionalization, FlopCounterMode...) or torch.func
    transform intercepts, and every tensor argument is a plain tensor (not a subclass
    that must see the op)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(type(a) in PLAIN_TENSOR_TYPES for a in (*args, *kwargs.values()) if isinstance(a, Tensor))


def declare(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], "OpEntry"]:
    """Decorator: declare the function as the op fused_preact::<name>; returns its entry."""
    return lambda body: OpEntry(name, body, mutates_args)


class OpEntry:
    """The callable that ops.py exports for one op. `.op` is the registered custom op."""

    def __init__(self, name: str, body: Callable, mutates_args: Sequence[str] = ()):
        self.op = torch.library.custom_op(f"fused_preact::{name}", mutates_args=tuple(mutates_args))(body)
        self.body = body
        self.signature = inspect.signature(body)
        self.positional_count = len(self.signature.parameters)
        self.function: type[torch.autograd.Function] | None = None
        self.__doc__, self.__name__ = body.__doc__, name

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """The op's autograd formula, for the registered op and for the direct path alike."""
        self.op.register_autograd(backward, setup_context=setup_context)
        body = self.body

        def forward(ctx, *args):
            # ctx-first style: Function.apply binds the signature of a separate
            # setup_context on every call (inspect.signature), which costs more than the op.
            output = body(*args)
            setup_context(ctx, args, output)
            return output
        self.function = type(f"{self.__name__}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args, **kwargs):
        if not plain_eager(args, kwargs):
            return self.op(*args, **kwargs)
        if kwargs or len(args) < self.positional_count:
            bound = self.signature.bind(*args, **kwargs)  # the Function takes positional arguments
            bound.apply_defaults()
            args = bound.args
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            # An op without a formula goes through the registered op, which raises
            # PyTorch's own "no autograd formula" error (double backward, say).
            return self.function.apply(*args) if self.function is not None else self.op(*args)
        return self.body(*args)

"""The ops' entry points: plain eager calls run the op bodies directly, anything that
intercepts or traces gets the registered custom ops, and both give the same numbers."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_preact as fp
from fused_preact import ops
from fused_preact.entry import OpEntry
from fused_preact import dispatch
from helpers import DEVICE, use_backend_or_skip

ENTRIES = [e for e in vars(ops).values() if isinstance(e, OpEntry)]


class Passthrough(TorchDispatchMode):
    """Sees every op and changes nothing: the calls must then go through the registered ops."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.name())
        return func(*args, **(kwargs or {}))


def training_step(block, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = block(x)
    out.backward(grad_out)
    return [out, x.grad] + [p.grad.clone() for p in block.parameters()] + [b.clone() for b in block.buffers()]


def test_every_op_has_an_entry():
    assert {e.__name__ for e in ENTRIES} == {"bn_relu_conv", "batch_stats", "bn_finalize", "bn_relu_conv_dgrad",
                                              "bn_relu_conv_wgrad", "bn_backward_apply"}


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_eager_path_skips_the_registered_ops_and_matches_them(kind, monkeypatch):
    cls = fp.PreActBlock if kind == "basic" else fp.PreActBottleneck
    make = lambda: cls(8, 4, stride=2, backend="reference").double()  # noqa: E731
    torch.manual_seed(1)
    direct_block = make()
    torch.manual_seed(1)
    traced_block = make()
    x = torch.randn(3, 8, 7, 7, dtype=torch.float64)
    grad_out = torch.randn_like(make()(x))

    with Passthrough() as mode:
        through_ops = training_step(traced_block, x, grad_out)
    # bn_finalize merges synchronised BN's statistics only (tests/test_distributed.py).
    assert {f"fused_preact::{e.__name__}" for e in ENTRIES if e.__name__ != "bn_finalize"} <= mode.seen

    def refuse(*args, **kwargs):
        raise AssertionError("plain eager mode went through a registered op")
    for entry in ENTRIES:
        monkeypatch.setattr(entry, "op", refuse)
    direct = training_step(direct_block, x, grad_out)
    assert len(direct) == len(through_ops)
    # The block's one node runs bn1's backward once for conv1 and the projection (which reads
    # relu(bn1(x))); the per-unit nodes run it twice and autograd adds: x's and bn1's
    # gradients are the same sums in another order, the rest bitwise.
    names = [name for name, _ in direct_block.named_parameters()]
    joined = {1, 2 + names.index("bn1.weight"), 2 + names.index("bn1.bias")}
    for i, (a, b) in enumerate(zip(direct, through_ops)):
        torch.testing.assert_close(a, b, rtol=1e-13 if i in joined else 0, atol=1e-15 if i in joined else 0)


def test_keyword_and_default_arguments_reach_the_body():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    positional = ops.bn_relu_conv(x, None, None, None, None, w, None, [1, 1], [1, 1], 0.0, False, False,
                                  None, None, None, None, "reference", 0)
    keywords = ops.bn_relu_conv(x, None, None, None, None, w, None, [1, 1], [1, 1], 0.0, False, False,
                                None, None, None, None, backend="reference")
    torch.testing.assert_close(positional[0], keywords[0], rtol=0, atol=0)


def test_double_backward_raises_at_the_first_backward():
    """create_graph=True says clearly that a second derivative is not supported, on both
    routes into the ops (never a silently wrong gradient penalty)."""
    block = fp.PreActBlock(4, 4, backend="reference")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with Passthrough(), pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    (grad_x,) = torch.autograd.grad(block(x).square().sum(), x)  # a first derivative still works
    assert grad_x.shape == x.shape


@pytest.mark.parametrize("backend", dispatch.BACKEND_NAMES)
def test_torch_func_transforms_get_the_registered_op(backend, monkeypatch):
    """Under vmap the op is batched by PyTorch (per-sample fallback), as a registered op is;
    a kernel handed the batched tensor itself would not know the batch dimension. An op that
    updates running statistics in place has no such fallback: PyTorch says so."""
    dy = torch.randn(3, 2, 6, 5, 5, device=DEVICE)
    x, w = torch.randn(2, 4, 5, 5, device=DEVICE), torch.randn(6, 4, 3, 3, device=DEVICE)
    use_backend_or_skip(backend, monkeypatch, x)

    def dgrad(d):
        return ops.bn_relu_conv_dgrad(d, w, x, None, None, None, None, [1, 1], [1, 1], 1e-5, backend)[0]
    torch.testing.assert_close(torch.func.vmap(dgrad)(dy), torch.stack([dgrad(d) for d in dy]))
    with pytest.raises(RuntimeError, match="Batching rule not implemented for fused_preact::batch_stats"):
        torch.func.vmap(lambda t: ops.batch_stats(t, None, None, None, None, backend))(dy)

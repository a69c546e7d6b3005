"""torch.library.opcheck of every op (schema, fake tensors, autograd registration, AOT)."""
import pytest
import torch

from fused_preact import ops
from fused_preact.backends.reference import partials_of


def unit_args(dtype=torch.float64, residual=True, prologue=True, requires_grad=True):
    x = torch.randn(2, 3, 5, 5, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(4, 3, 3, 3, dtype=dtype, requires_grad=requires_grad)
    mean, var = torch.randn(3, dtype=dtype), torch.rand(3, dtype=dtype) + 0.5
    gamma = torch.rand(3, dtype=dtype, requires_grad=requires_grad)
    beta = torch.randn(3, dtype=dtype, requires_grad=requires_grad)
    r = torch.randn(2, 4, 3, 3, dtype=dtype, requires_grad=requires_grad) if residual else None
    if not prologue:
        mean = var = gamma = beta = None
    running = (torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5, torch.tensor(3), 0.1)
    return (x, mean, var, gamma, beta, w, r, [2, 2], [1, 1], 1e-5, True, True, *running, "reference")


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("prologue", [True, False])
def test_opcheck_bn_relu_conv(residual, prologue):
    """The registered op (schema, fake, mutation of the running statistics). It has no
    autograd of its own (it mutates): its formula is the Function of entry.py, which the
    gradcheck tests below and the torch.compile tests run."""
    torch.library.opcheck(ops.bn_relu_conv.op, unit_args(residual=residual, prologue=prologue, requires_grad=False))


def test_opcheck_statistics_ops():
    x = torch.randn(2, 3, 5, 5)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(1)
    torch.library.opcheck(ops.batch_stats.op, (x, rm, rv, nbt, 0.1, "reference"))
    torch.library.opcheck(ops.batch_stats.op, (x, rm, rv, nbt, None, "reference"))
    torch.library.opcheck(ops.batch_stats.op, (x, None, None, None, None, "reference"))
    partials = torch.cat([partials_of(x), partials_of(x + 1)])  # two tiles
    torch.library.opcheck(ops.bn_finalize.op, (partials, rm, rv, nbt, 0.1, "reference"))
    torch.library.opcheck(ops.bn_finalize.op, (partials, rm, rv, nbt, None, "reference"))
    torch.library.opcheck(ops.bn_finalize.op, (partials, None, None, None, 0.1, "reference"))


def test_opcheck_backward_ops():
    x, mean, var, gamma, beta, w, _, stride, padding, eps, *_ = unit_args(requires_grad=False)
    dy = torch.randn(2, 4, 3, 3, dtype=x.dtype)
    torch.library.opcheck(ops.bn_relu_conv_dgrad.op, (dy, w, x, mean, var, gamma, beta, stride, padding, eps, "reference"))
    torch.library.opcheck(ops.bn_relu_conv_wgrad.op, (dy, x, mean, var, gamma, beta, list(w.shape), stride, padding, eps, "reference"))
    torch.library.opcheck(ops.bn_relu_conv_dgrad.op, (dy, w, x, mean, var, gamma, beta, stride, padding, eps,
                                                      "reference", x.dtype, torch.randn_like(x)))  # g_other
    g, sums = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, stride, padding, eps, "reference")
    torch.library.opcheck(ops.bn_backward_apply.op, (g, x, mean, var, gamma, sums, 50, eps, True, None, "reference"))


def test_gradcheck_unit_eval_statistics():
    """With fixed (eval) statistics, the unit's gradient is exactly differentiable: gradcheck."""
    x, mean, var, gamma, beta, w, r, stride, padding, eps, *_, backend = unit_args()

    def f(x, gamma, beta, w, r):
        return ops.bn_relu_conv(x, mean, var, gamma, beta, w, r, stride, padding, eps, False, False,
                                None, None, None, None, backend)[0]
    assert torch.autograd.gradcheck(f, (x, gamma, beta, w, r))


def test_gradcheck_unit_batch_statistics():
    """Training mode: mean/var are functions of x; the unit's backward includes their terms."""
    x, _, _, gamma, beta, w, r, stride, padding, eps, *_, backend = unit_args()

    def f(x, gamma, beta, w, r):
        mean, var = ops.batch_stats(x.detach(), None, None, None, None, backend)
        return ops.bn_relu_conv(x, mean, var, gamma, beta, w, r, stride, padding, eps, True, False,
                                None, None, None, None, backend)[0]
    assert torch.autograd.gradcheck(f, (x, gamma, beta, w, r))

"""Shared test helpers: comparison with a located report, tolerances per dtype, autograd graphs."""
from collections import Counter

import torch

# Where the Triton tests run: compiled on a GPU, else in the interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) of fused vs eager, per dtype. float64: both sides compute the same
# formulas in double, so only summation order differs. float32: conv + BN sums over
# a few hundred terms, ~1e-6 relative each. Low precision: one rounding of the
# activation and output to 8 (bf16) / 11 (fp16) mantissa bits, ~2 ulp.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (8e-2, 4e-2),
}


def assert_close(actual, expected, dtype=None, what="", atol=None, rtol=None):
    """allclose with a report of where and by how much it failed."""
    dtype = dtype or expected.dtype
    a_tol, r_tol = TOL[dtype]
    atol = a_tol if atol is None else atol
    rtol = r_tol if rtol is None else rtol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), f"{what}: NaN in result"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {bad.sum().item()}/{bad.numel()} elements off; max abs err {err.max().item():.3e}; "
            f"first at {idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g} (atol={atol}, rtol={rtol})")


def use_backend_or_skip(name: str, monkeypatch, *tensors, conv_dtype=torch.float32) -> None:
    """For tests run on every backend: enable an opt-in backend, and skip, with the backend's
    own reasons, where it declines these inputs (the cuda backend without a GPU, ...)."""
    import pytest

    from fused_preact import dispatch
    backend = dispatch.get_backend(name)
    if backend.opt_in:
        monkeypatch.setenv(*backend.opt_in)
    reasons = backend.not_supported_reasons("bn_relu_conv", tensors, conv_dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


# The relative L2 error float32 may always have against float64 (about ten ulp of a sum of
# a few hundred terms), whatever eager's own error on the same inputs happens to be.
FLOAT32_FLOOR = 1e-5


def assert_within_eager_error(actual, eager, truth, what="", factor=2.0, floor=FLOAT32_FLOOR):
    """The project's numerics rule: actual's relative L2 error against the float64 truth is at
    most `factor` x eager PyTorch's own error in the same dtype, plus `floor`. (Element-wise
    tolerances fail where a sum cancels: a gradient element near 0 made of large terms.)"""
    def error(t):
        return ((t.double() - truth).norm() / truth.norm().clamp_min(1e-12)).item()
    ours, theirs = error(actual), error(eager)
    assert ours <= factor * theirs + floor, f"{what}: relative L2 error {ours:.2e} > {factor:g} x eager's {theirs:.2e} + {floor:g}"


def assert_step_within_eager_error(model, truth, eager, ours, what=""):
    """Three models' training steps, each a list of the output, the input gradient, `model`'s
    parameter gradients and its buffers (in its order, which names them): ours within eager's
    error against the float64 truth (assert_within_eager_error), integer buffers
    (num_batches_tracked) equal to eager's."""
    names = ["output", "dx", *(f"{n}.grad" for n, _ in model.named_parameters()), *dict(model.named_buffers())]
    for name, true, ref, got in zip(names, truth, eager, ours, strict=True):
        if true.is_floating_point():
            assert_within_eager_error(got, ref, true, f"{what}: {name}")
        else:
            assert torch.equal(got, ref), f"{what}: {name}"


def node_names(output):
    """The class name of every node of output's autograd graph, counted."""
    names, todo, seen = Counter(), [output.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] += 1
        todo += [next_node for next_node, _ in node.next_functions]
    return names

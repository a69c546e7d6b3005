"""Shared test helpers: comparison with a located report, tolerances per dtype."""
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


def assert_earned(actual, lowp_reference, truth, dtype, what="", factor=2.0):
    """Earned tolerance for low precision: actual's max error against an fp64 `truth`
    is at most `factor` times the low-precision reference's own error plus one rounding
    of the result in `dtype`, as flash-attention's tests bound theirs."""
    a, r, t = actual.double(), lowp_reference.double(), truth.double()
    assert not torch.isnan(a).any(), f"{what}: NaN in result"
    err = (a - t).abs().max().item()
    one_rounding = torch.finfo(dtype).eps / 2 * max(t.abs().max().item(), 1.0)
    allowed = factor * (r - t).abs().max().item() + one_rounding
    assert err <= allowed, f"{what}: max error {err:.3e} vs fp64 exceeds {factor} x reference error ({allowed:.3e})"

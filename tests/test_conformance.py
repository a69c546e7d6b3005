"""Every op of every backend but the reference one, against float64 on fresh random inputs:
one suite, one tolerance table, known failures as data.

A case is (backend, precision, shape, unit variant); backends come from dispatch, so a new
backend is tested with no edit here. A case the backend declines for these very tensors
(its own not_supported_reasons: the cuda backend without a GPU, bf16 in the Triton
interpreter, ...) is skipped with that reason. Outputs are allocated poisoned (NaN-filled
torch.empty), so an element a kernel forgets to write fails. Shapes: odd sizes everywhere
(C=3, 5, 24; H=W=7..9; stride 2 with odd H), real layer shapes on GPUs.

Tolerance, earned: each output's relative L2 error against the float64 reference is at most
FACTOR x the reference backend's own error in the same precision, plus the precision's floor
(its rounding: one ulp of the storage format; tf32's for tf32, where cuDNN may choose exact
float32 kernels and have a much smaller error of its own).
"""
import zlib
from dataclasses import dataclass, replace

import pytest
import torch

from fused_preact import dispatch, ops
from fused_preact.backends import cuda
from helpers import DEVICE

FACTOR = 2.0
# precision -> (x dtype, weight dtype, conv dtype, tf32 allowed, floor of the relative L2 error)
PRECISIONS = {
    "fp32": (torch.float32, torch.float32, torch.float32, False, 1e-5),
    "tf32": (torch.float32, torch.float32, torch.float32, True, 3e-3),
    "fp16": (torch.float16, torch.float16, torch.float16, False, 1e-3),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, False, 8e-3),
    # autocast: BN reads fp32 x, the kernels cast the fp32 weight, dW comes back in fp32; the
    # residual (the identity stream) is fp32, so are y and dy
    "amp-fp16": (torch.float32, torch.float32, torch.float16, False, 1e-3),
    "amp-bf16": (torch.float32, torch.float32, torch.bfloat16, False, 8e-3),
}
# (C_in, C_out, kernel, stride, padding, H=W, batch)
ODD_SHAPES = [(5, 24, 3, 1, 1, 7, 3), (3, 5, 3, 2, 1, 9, 3), (24, 16, 1, 2, 0, 7, 3), (16, 8, 1, 1, 0, 9, 3),
              (5, 6, 3, 2, 1, 8, 2), (72, 8, 3, 1, 1, 5, 2),  # 72: more than one block of input channels
              (72, 80, 1, 2, 0, 5, 2)]  # a 1x1 with them and (dgrad) more than one block of output channels
# Real layer shapes: a 1024-channel 1x1 stride-2 shortcut, 3x3 stride 2 at 14x14, 3x3 at 56x56.
GPU_SHAPES = [(64, 64, 3, 1, 1, 32, 3), (128, 256, 1, 2, 0, 15, 3), (96, 72, 3, 2, 1, 17, 3),
              (1024, 1024, 1, 2, 0, 14, 64), (256, 256, 3, 2, 1, 14, 64), (64, 64, 3, 1, 1, 56, 64)]
SHAPES = ODD_SHAPES + (GPU_SHAPES if DEVICE == "cuda" else [])


RUNNING_Y = ("y_running_mean", "y_running_var", "y_batches")
RUNNING_X = ("x_running_mean", "x_running_var", "x_batches")


@dataclass(frozen=True)
class Case:
    backend: str
    precision: str
    shape: tuple
    prologue: bool  # a BN -> ReLU prologue (else a plain conv)
    residual: bool
    variant: str = ""  # another kernel of the backend, chosen by its environment variable (VARIANTS)


# Known failures on GPUs, as data: case -> what was measured. Marked xfail(strict).
# Triton's exact float32 weight gradient (declined on GPUs unless FUSED_PREACT_TRITON_FP32=1)
# failed on these cases in two H100 runs (triton 3.6, 2026-11-24), the same cases both times,
# while 1024x1024k1s2 passed; the same shapes with other data, run alone, were right and
# bitwise repeatable (benchmarks/results/2026-11-24-h100-391174d/wgrad_repeat.txt). Cause unknown.
KNOWN_GPU_FAILURES = {
    "triton-fp32-128x256k1s2p0-15px-n3-bn": "triton exact fp32 wgrad: relative error 0.16-0.26 (2026-11-22)",
    "triton-fp32-128x256k1s2p0-15px-n3-bn-res": "triton exact fp32 wgrad: relative error 0.16-0.26 (2026-11-22)",
    "triton-fp32-64x64k3s1p1-56px-n64-bn": "triton exact fp32 wgrad: relative error 0.49 (2026-11-24)",
}

CASES = [Case(backend, precision, shape, prologue, residual)
         for backend in dispatch.BACKEND_NAMES if backend != "reference"
         for precision in PRECISIONS for shape in SHAPES
         for prologue, residual in ((True, True), (True, False), (False, False))]


# The cuda backend's tensor-core conv kernels (csrc/*_sm80.cuh) run only with their flag
# until a GPU run has verified them: its cases again with the flag, x and dy channels_last
# (their layout).
VARIANTS = {"sm80": cuda.SM80_FLAG}
CASES += [replace(c, variant="sm80") for c in CASES if c.backend == "cuda" and c.precision in ("fp16", "bf16", "tf32")]


def case_id(case: Case) -> str:
    c, k, r, s, p, hw, n = case.shape
    return (f"{case.backend}{'-' + case.variant if case.variant else ''}-{case.precision}-"
            f"{c}x{k}k{r}s{s}p{p}-{hw}px-n{n}-{'bn' if case.prologue else 'plain'}{'-res' if case.residual else ''}")


def inputs(case: Case, x_dtype, w_dtype, conv_dtype):
    c, k, r, stride, pad, hw, n = case.shape
    y_dtype = torch.float32 if case.residual and w_dtype != conv_dtype else conv_dtype  # autocast: fp32 stream
    p = (hw + 2 * pad - r) // stride + 1
    x = (torch.randn(n, c, hw, hw) * 2 + 1).to(x_dtype)
    if torch.rand(()) < 0.5 or case.variant:
        x = x.contiguous(memory_format=torch.channels_last)
    t = dict(x=x, w=(torch.randn(k, c, r, r) * (2 / (c * r * r)) ** 0.5).to(w_dtype),
             residual=torch.randn(n, k, p, p).to(y_dtype) if case.residual else None,
             dy=torch.randn(n, k, p, p).to(y_dtype))
    if case.variant:  # the layout of the sm80 kernels' gathered operands (x forward, dy backward)
        t["dy"] = t["dy"].contiguous(memory_format=torch.channels_last)
    # Running statistics of the BatchNorms that read y and x (the ops update them in place).
    for prefix, channels in (("y", k), ("x", c)):
        t.update({f"{prefix}_running_mean": torch.randn(channels), f"{prefix}_running_var": torch.rand(channels) + 0.5,
                  f"{prefix}_batches": torch.tensor(3)})
    if case.prologue:
        t.update(mean=x.float().mean((0, 2, 3)), var=x.float().var((0, 2, 3), unbiased=False),
                 gamma=torch.rand(c) + 0.5, beta=torch.randn(c),
                 dx_other=torch.randn(n, c, hw, hw).to(x_dtype))  # x's gradient from a block's identity path
    else:
        t.update(mean=None, var=None, gamma=None, beta=None, dx_other=None)
    # Another conv's gradient of relu(bn(x)) (a projection shortcut's), joined in dgrad; NCHW
    # whatever x's layout.
    t["g_other"] = torch.randn(n, c, hw, hw).to(x_dtype)
    return {name: v if v is None else v.to(DEVICE) for name, v in t.items()}


def run_ops(case: Case, backend: str, t: dict, conv_dtype: torch.dtype) -> dict:
    """Every op of a unit on `backend`: forward with statistics, backward pieces, x's statistics."""
    _, _, _, stride, pad, _, _ = case.shape
    conf = ([stride] * 2, [pad] * 2, 1e-5)
    x, w, mean, var, gamma, beta, dy = (t[n] for n in ("x", "w", "mean", "var", "gamma", "beta", "dy"))
    y_running, x_running = ([t[name].clone() for name in names] for names in (RUNNING_Y, RUNNING_X))
    y, y_mean, y_var = ops.bn_relu_conv(x, mean, var, gamma, beta, w, t["residual"], *conf[:2], 1e-5, True, True,
                                        *y_running, 0.1, backend, conv_dtype=conv_dtype)
    x_stats = ops.batch_stats(x, *x_running, None, backend)  # momentum None: 1 / num_batches_tracked
    g, sums = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, backend, conv_dtype)
    g_joined, sums_joined = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, backend, conv_dtype,
                                                   g_other=t["g_other"])
    out = dict(y=y, stats=torch.stack([y_mean, y_var]), g=g, g_joined=g_joined,
               dw=ops.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), *conf, backend, w.dtype,
                                         conv_dtype),
               # written in a channels_last parameter's layout (autograd would copy it otherwise)
               dw_channels_last=ops.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), *conf, backend,
                                                       w.dtype, conv_dtype, weight_channels_last=True),
               x_stats=torch.stack(x_stats), y_running=torch.stack(y_running[:2]),
               x_running=torch.stack(x_running[:2]), batches=torch.stack([y_running[2], x_running[2]]).double())
    if case.prologue:
        count = x.numel() // x.shape[1]
        out.update(sums=sums, sums_joined=sums_joined,
                   dx=ops.bn_backward_apply(g, x, mean, var, gamma, sums, count, 1e-5, True, None, backend),
                   dx_eval=ops.bn_backward_apply(g, x, mean, var, gamma, sums, count, 1e-5, False, None, backend),
                   dx_joined=ops.bn_backward_apply(g, x, mean, var, gamma, sums, count, 1e-5, True, t["dx_other"],
                                                   backend))
    return out


def count_sm80_launches(monkeypatch) -> dict:
    """{name: launches so far} of the extension's sm80 kernels, counted from now on."""
    ext, _ = cuda.load_extension()
    launches = {}
    for name in ("conv_fwd_sm80", "conv_dgrad_sm80", "conv_wgrad_sm80"):
        launches[name] = 0

        def counted(*args, name=name, launch=getattr(ext, name)):
            launches[name] += 1
            return launch(*args)
        monkeypatch.setattr(ext, name, counted)
    return launches


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return ((got.double() - truth).norm() / truth.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ops_conform_to_float64(case, poisoned, request, monkeypatch):
    backend = dispatch.get_backend(case.backend)
    if backend.opt_in:
        monkeypatch.setenv(*backend.opt_in)
    x_dtype, w_dtype, conv_dtype, tf32, floor = PRECISIONS[case.precision]
    if tf32 and DEVICE != "cuda":
        pytest.skip("tf32 exists on GPUs only (on the CPU it is the fp32 case)")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    torch.manual_seed(zlib.crc32(case_id(case).encode()))  # stable across processes
    t = inputs(case, x_dtype, w_dtype, conv_dtype)
    tensors = [v for v in t.values() if v is not None]
    for op in ("bn_relu_conv", "bn_relu_conv_dgrad", "bn_relu_conv_wgrad"):
        reasons = backend.not_supported_reasons(op, tensors, conv_dtype)
        if reasons:
            pytest.skip("; ".join(reasons))
    if DEVICE == "cuda" and case_id(case) in KNOWN_GPU_FAILURES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_GPU_FAILURES[case_id(case)]))
    if case.variant:
        monkeypatch.setenv(VARIANTS[case.variant], "1")
        launches = count_sm80_launches(monkeypatch)
    with poisoned:
        got = run_ops(case, case.backend, t, conv_dtype)
    if case.variant:  # each ran wherever its layout needs are met (x's channels, dy's, both)
        vector = 16 // conv_dtype.itemsize  # channels per 16-byte vector
        c_fits, k_fits = case.shape[0] % vector == 0, case.shape[1] % vector == 0
        expected = {"conv_fwd_sm80": int(c_fits), "conv_dgrad_sm80": 2 * int(k_fits),
                    "conv_wgrad_sm80": 2 * int(c_fits and k_fits)}
        assert launches == expected, launches  # dgrad twice (g, g_joined), wgrad twice (dw, dw_channels_last)
    assert got["dw_channels_last"].is_contiguous(memory_format=torch.channels_last)
    same_precision = run_ops(case, "reference", t, conv_dtype)
    truth = run_ops(case, "reference", {n: v.double() if v is not None and v.is_floating_point() else v
                                        for n, v in t.items()}, torch.float64)
    errors = {name: (relative_error(got[name], ref), relative_error(same_precision[name], ref))
              for name, ref in truth.items()}
    bad = {name: f"{ours:.1e} vs reference {theirs:.1e}" for name, (ours, theirs) in errors.items()
           if not ours <= FACTOR * theirs + floor}
    assert not bad, f"relative L2 errors over {FACTOR:g} x the reference's + {floor:g}: {bad}"


@pytest.mark.parametrize("shape", [(5, 6, 3, 2, 1, 8, 2), (24, 16, 1, 2, 0, 7, 3)])
def test_triton_int64_offsets_compute_what_int32_ones_do(shape, monkeypatch):
    """The Triton kernels form element offsets in int32 where every tensor of a launch spans
    fewer than INT32_SPAN elements (every shape a test can afford), in int64 beyond. With the
    limit at one element every launch takes the int64 path: each op's output bitwise the same."""
    from fused_preact.backends.triton import bn_backward, common, conv_dgrad, conv_fwd, conv_wgrad, stats
    kernels = (conv_fwd.bn_relu_conv_fwd_kernel, conv_dgrad.bn_relu_conv_dgrad_kernel,
               conv_wgrad.bn_relu_conv_wgrad_kernel, stats.batch_stats_kernel, bn_backward.bn_backward_apply_kernel)
    int64_flags = []
    for kernel in kernels:
        def spy(grid, args, kwargs, launch=kernel.launch):
            int64_flags.append(kwargs["INT64"])
            return launch(grid, args, kwargs)
        monkeypatch.setattr(kernel, "launch", spy)
    case = Case("triton", "fp32", shape, prologue=True, residual=True)
    torch.manual_seed(zlib.crc32(case_id(case).encode()))
    t = inputs(case, torch.float32, torch.float32, torch.float32)
    int32 = run_ops(case, "triton", t, torch.float32)
    assert int64_flags and not any(int64_flags)
    int64_flags.clear()
    monkeypatch.setattr(common, "INT32_SPAN", 1)
    int64 = run_ops(case, "triton", t, torch.float32)
    assert len(int64_flags) >= len(kernels) and all(int64_flags)
    for name, value in int32.items():
        assert torch.equal(value, int64[name]), name

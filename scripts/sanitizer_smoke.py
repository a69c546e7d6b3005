"""A GPU backend's ops once on small odd shapes, for compute-sanitizer in scripts/gpu_all.sh
(memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory hazards), printing
each op's relative error against the reference backend.
  python scripts/sanitizer_smoke.py cuda|triton
- cuda: its kernels, and the three convs again on the sm_80 tensor-core kernels
  (FUSED_PREACT_CUDA_SM80) where they take the tensors; then its statistics merge over more
  tiles than its threads per channel take in one batch;
- triton: fp16, bf16, float32 as tf32 and exact float32 (declined on GPUs by default, run here
  with FUSED_PREACT_TRITON_FP32=1: its weight gradient failed on an H100 at some shapes, not
  the same ones from run to run, tests/test_conformance.py KNOWN_GPU_FAILURES; racecheck says
  whether the kernel Triton generates for it races in shared memory; 128x256k1s2 is one of
  them), and a shape whose merges take more than one group of tiles (the tickets' two levels:
  statistics over 64 row tiles, the weight gradient split 4 ways)."""
import os
import sys

os.environ["FUSED_PREACT_ENABLE_CUDA_BACKEND"] = "1"
os.environ["FUSED_PREACT_TRITON_FP32"] = "1"
os.environ.setdefault("FUSED_PREACT_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

from fused_preact import ops  # noqa: E402
from fused_preact.backends import cuda  # noqa: E402

ODD = [(5, 24, 3, 2, 1, 9, 2), (24, 70, 1, 1, 0, 7, 2), (16, 40, 3, 2, 1, 9, 2)]  # C, K, kernel, stride, pad, H=W, N
TRITON_MORE = [(128, 256, 1, 2, 0, 15, 3), (16, 16, 3, 1, 1, 32, 4)]
OUTPUTS = ("y", "y mean", "y var", "running mean", "running var", "g", "sums", "dw", "dx", "x mean", "x var")


def unit_inputs(dtype, c, k, kernel, stride, pad, hw, n):
    torch.manual_seed(0)
    x = (torch.randn(n, c, hw, hw, device="cuda") * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(k, c, kernel, kernel, device="cuda") * 0.2).to(dtype)
    p = (hw + 2 * pad - kernel) // stride + 1
    dy, residual = (torch.randn(n, k, p, p, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
                    for _ in range(2))
    return dict(x=x, w=w, dy=dy, residual=residual, mean=x.float().mean((0, 2, 3)),
                var=x.float().var((0, 2, 3), unbiased=False), gamma=torch.rand(c, device="cuda") + 0.5,
                beta=torch.randn(c, device="cuda"), stride=[stride] * 2, padding=[pad] * 2)


def run_unit(t, backend, convs_only=False):
    """A unit's ops on `backend`: the forward with statistics and running statistics, its
    backward, x's statistics; only the three convs where convs_only."""
    x, w, mean, var, gamma, beta, dy = (t[n] for n in ("x", "w", "mean", "var", "gamma", "beta", "dy"))
    conf = (t["stride"], t["padding"], 1e-5)
    running = [torch.zeros(w.shape[0], device="cuda"), torch.ones(w.shape[0], device="cuda"),
               torch.tensor(3, device="cuda")]
    y, y_mean, y_var = ops.bn_relu_conv(x, mean, var, gamma, beta, w, t["residual"], *conf[:2], 1e-5, True, True,
                                        *running, 0.1, backend)
    g, sums = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, backend)
    dw = ops.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), *conf, backend)
    if convs_only:
        return dict(zip(("y", "g", "dw"), (y, g, dw)))
    dx = ops.bn_backward_apply(g, x, mean, var, gamma, sums, x.numel() // x.shape[1], 1e-5, True, None, backend)
    x_mean, x_var = ops.batch_stats(x, None, None, None, 0.1, backend)
    return dict(zip(OUTPUTS, (y, y_mean, y_var, running[0], running[1], g, sums, dw, dx, x_mean, x_var)))


def report(name, dtype, shape, got, want):
    torch.cuda.synchronize()
    errors = {k: ((v.double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-12)).item()
              for k, v in got.items()}
    print(name, str(dtype).replace("torch.", ""), shape, "relative error:",
          ", ".join(f"{k} {e:.1e}" for k, e in errors.items()), flush=True)


def smoke_cuda():
    """fp16, bf16, float32 as tf32 (the backend has no exact float32)."""
    torch.backends.cudnn.allow_tf32 = True  # the cuda backend's float32 is tf32 only
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ODD:
            t = unit_inputs(dtype, *shape)
            want = run_unit(t, "reference")
            report("cuda", dtype, shape, run_unit(t, "cuda"), want)
            os.environ[cuda.SM80_FLAG] = "1"
            report("cuda-sm80", dtype, shape, run_unit(t, "cuda", convs_only=True), want)
            os.environ[cuda.SM80_FLAG] = "0"

    x = torch.randn(3, 40, 80, 80, device="cuda").contiguous(memory_format=torch.channels_last) * 2 + 5
    got, want = (dict(zip(("mean", "var"), ops.batch_stats(x, None, None, None, 0.1, backend)))
                 for backend in ("cuda", "reference"))
    report("cuda batch_stats over 300 tiles", torch.float32, tuple(x.shape), got, want)


def smoke_triton():
    """fp16, bf16, float32 as tf32, exact float32."""
    for dtype, tf32 in ((torch.float16, False), (torch.bfloat16, False), (torch.float32, True), (torch.float32, False)):
        torch.backends.cudnn.allow_tf32 = tf32
        for shape in ODD + TRITON_MORE:
            t = unit_inputs(dtype, *shape)
            report("triton" + ("-tf32" if tf32 else ""), dtype, shape, run_unit(t, "triton"), run_unit(t, "reference"))


{"cuda": smoke_cuda, "triton": smoke_triton}[sys.argv[1]]()

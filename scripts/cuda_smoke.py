"""Run every cuda-backend op once on small odd shapes (for compute-sanitizer memcheck /
racecheck in scripts/gpu_all.sh) and print each op's max error against the reference;
the three convs again on the sm_80 tensor-core kernels (FUSED_PREACT_CUDA_SM80) where
they take the tensors."""
import os

os.environ["FUSED_PREACT_ENABLE_CUDA_BACKEND"] = "1"

import torch  # noqa: E402

from fused_preact import ops  # noqa: E402
from fused_preact.backends import cuda  # noqa: E402

torch.backends.cudnn.allow_tf32 = True
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for c, k, kernel, stride, pad, hw in [(5, 24, 3, 2, 1, 9), (24, 70, 1, 1, 0, 7), (16, 40, 3, 2, 1, 9)]:
        x = torch.randn(2, c, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(k, c, kernel, kernel, device="cuda", dtype=dtype) * 0.2
        mean, var = x.float().mean((0, 2, 3)), x.float().var((0, 2, 3), unbiased=False)
        gamma, beta = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        p = (hw + 2 * pad - kernel) // stride + 1
        dy = torch.randn(2, k, p, p, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        residual = torch.randn(2, k, p, p, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        conf = ([stride] * 2, [pad] * 2, 1e-5)
        count = x.numel() // c
        results = {}
        for backend, sm80 in (("cuda", False), ("cuda", True), ("reference", False)):
            os.environ[cuda.SM80_FLAG] = "1" if sm80 else "0"
            y, y_mean, y_var = ops.bn_relu_conv(x, mean, var, gamma, beta, w, residual, *conf[:2], 1e-5, True, True,
                                                None, None, None, 0.1, backend)
            g, sums = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, backend)
            dw = ops.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), *conf, backend)
            if sm80:  # the other ops have one kernel each
                results["cuda-sm80"] = (y, y_mean, y_var, g, dw)
                continue
            dx = ops.bn_backward_apply(g, x, mean, var, gamma, sums, count, 1e-5, True, None, backend)
            x_mean, x_var = ops.batch_stats(x, None, None, None, 0.1, backend)
            results[backend] = (y, y_mean, y_var, g, dw, dx, x_mean, x_var)
        torch.cuda.synchronize()
        for name in ("cuda", "cuda-sm80"):
            errs = [f"{(a.float() - b.float()).abs().max().item():.1e}" for a, b in zip(results[name], results["reference"])]
            print(name, dtype, (c, k, kernel, stride), "max abs err y, y mean, y var, g, dw, dx, x mean, x var:", errs)

# The statistics merge with more tiles than its threads per channel take in one batch
# (bn_finalize_kernel: 32 groups x 4 tiles): 300 tiles of 64 rows, 40 channels (two blocks).
x = torch.randn(3, 40, 80, 80, device="cuda").contiguous(memory_format=torch.channels_last) * 2 + 5
got, want = (torch.stack(ops.batch_stats(x, None, None, None, 0.1, backend)) for backend in ("cuda", "reference"))
print("cuda batch_stats over 300 tiles: max abs err mean, var:", (got - want).abs().amax(dim=1).tolist())

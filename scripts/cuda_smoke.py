"""Run every cuda-backend op once on small odd shapes (for compute-sanitizer memcheck /
racecheck in scripts/gpu_all.sh) and print each op's max error against the reference."""
import os

os.environ["FUSED_PREACT_ENABLE_CUDA_BACKEND"] = "1"

import torch  # noqa: E402

from fused_preact import ops  # noqa: E402

torch.backends.cudnn.allow_tf32 = True
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for c, k, kernel, stride, pad, hw in [(5, 24, 3, 2, 1, 9), (24, 70, 1, 1, 0, 7)]:
        x = torch.randn(2, c, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(k, c, kernel, kernel, device="cuda", dtype=dtype) * 0.2
        mean, var = x.float().mean((0, 2, 3)), x.float().var((0, 2, 3), unbiased=False)
        gamma, beta = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        p = (hw + 2 * pad - kernel) // stride + 1
        dy = torch.randn(2, k, p, p, device="cuda", dtype=dtype)
        conf = ([stride] * 2, [pad] * 2, 1e-5)
        for backend in ("cuda", "reference"):
            y, part = ops.bn_relu_conv(x, mean, var, gamma, beta, w, None, *conf[:2], 1e-5, True, True, backend)
            m, v = ops.bn_finalize(part, None, None, None, 0.1, backend)
            g, sums = ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, backend)
            dw = ops.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), *conf, backend)
            dx = ops.bn_backward_apply(g, x, mean, var, gamma, sums / (x.numel() // c), 1e-5, True, backend)
            s = ops.batch_stats(x, backend)
            if backend == "cuda":
                got = (y, m, v, g, dw, dx)
        torch.cuda.synchronize()
        errs = [f"{(a.float() - b.float()).abs().max().item():.1e}" for a, b in zip(got, (y, m, v, g, dw, dx))]
        print(dtype, (c, k, kernel, stride), "max abs err y, mean, var, g, dw, dx:", errs)

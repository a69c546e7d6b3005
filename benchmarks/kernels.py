"""Each of our three convolution kernels against the vendor's plain convolution at the same
shapes, dtype and layout, in the same run:

    python -m benchmarks.kernels --out kernels_out      # GPU: fused-triton, fused-cuda vs cudnn

conv_fwd:   ours = BN+ReLU prologue, conv, statistics epilogue; cudnn = F.conv2d of the activation
conv_dgrad: ours = dgrad, ReLU-mask + BN-sums epilogue;          cudnn = convolution_backward, input gradient
conv_wgrad: ours = recomputed activation, split-K weight grad;   cudnn = convolution_backward, weight gradient

Every conv of each block case (its units and projection), rows in the benchmark's CSV schema
(results.csv: mode conv_fwd / conv_dgrad / conv_wgrad, provider fused-triton / cudnn, metric
time_ms, the conv in `note`) plus `ratio` rows (ours / cudnn). On a GPU with the extension
built, also the cuda backend's kernels (`fused-cuda`: WMMA) and its CuTe ones
(`fused-cuda-sm80`, csrc/*_sm80.cuh, for the layouts they take). On a CPU (--device cpu,
for checking the tool) the Triton interpreter runs against aten's CPU convolution, named `aten`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from . import cases as C
from .run import DTYPES, metadata, timer, write_results

DEFAULT_CASES = "r18-s1-id,in-r50-56,in-r50-28,in-r50-14"


def measure_conv(conv, batch, dtype, device, measure, weight_layout="channels_last") -> dict[tuple[str, str], float]:
    """{(mode, provider): ms} for one conv, its weight in `weight_layout` (channels_last, as in
    the block benchmarks, or PyTorch's default, which our triton ops copy to channels_last first).
    A 1x1 weight keeps its default strides (C, 1, 1, 1) under .contiguous(memory_format=...),
    where a model's .to(memory_format=...) gives (C, 1, C, C): the same elements, and the same
    compiled kernels since ef3602a (before it, a (C, 1, 1, 1) weight's tiles loaded element by element)."""
    from fused_preact.backends.triton import conv_dgrad, conv_fwd, conv_wgrad
    c_in, c_out, k, stride, pad, hw = conv
    cl = torch.channels_last
    x = torch.randn(batch, c_in, hw, hw, device=device).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(c_out, c_in, k, k, device=device) * (2 / (c_in * k * k)) ** 0.5).to(dtype).contiguous(
        memory_format=cl if weight_layout == "channels_last" else torch.contiguous_format)
    mean, var = x.float().mean((0, 2, 3)), x.float().var((0, 2, 3), unbiased=False)
    gamma, beta = torch.rand(c_in, device=device) + 0.5, torch.randn(c_in, device=device)
    act = torch.relu((x.float() - mean[:, None, None]) * torch.rsqrt(var + 1e-5)[:, None, None]
                     * gamma[:, None, None] + beta[:, None, None]).to(dtype).contiguous(memory_format=cl)
    strides, pads = [stride] * 2, [pad] * 2
    y = F.conv2d(act, w, None, strides, pads)
    dy = torch.randn_like(y).contiguous(memory_format=cl)
    # The next BatchNorm's running statistics, updated by the forward kernel as in training.
    running = (torch.zeros(y.shape[1], device=device), torch.ones(y.shape[1], device=device), None, 0.1)
    vendor = "cudnn" if device == "cuda" else "aten"

    def backward(mask):
        return torch.ops.aten.convolution_backward(dy, act, w, None, strides, pads, [1, 1], False, [0, 0], 1, mask)
    times = measure_cuda_backend(x, w, dy, mean, var, gamma, beta, strides, pads, running, measure) \
        if device == "cuda" else {}
    return times | {
        ("conv_fwd", "fused-triton"): measure(lambda: conv_fwd.bn_relu_conv(
            x, mean, var, gamma, beta, w, None, strides, pads, 1e-5, True, *running, w.dtype)),
        ("conv_fwd", vendor): measure(lambda: F.conv2d(act, w, None, strides, pads)),
        ("conv_dgrad", "fused-triton"): measure(lambda: conv_dgrad.bn_relu_conv_dgrad(
            dy, w, x, mean, var, gamma, beta, strides, pads, 1e-5, w.dtype)),
        ("conv_dgrad", vendor): measure(lambda: backward([True, False, False])),
        ("conv_wgrad", "fused-triton"): measure(lambda: conv_wgrad.bn_relu_conv_wgrad(
            dy, x, mean, var, gamma, beta, list(w.shape), strides, pads, 1e-5, w.dtype, w.dtype)),
        ("conv_wgrad", vendor): measure(lambda: backward([False, True, False])),
    }


def measure_cuda_backend(x, w, dy, mean, var, gamma, beta, strides, pads, running, measure) -> dict:
    """The cuda backend's three kernels, and its sm80 ones where they take the tensors ({}
    where the extension is not built or declines the device)."""
    from fused_preact.backends import cuda
    ext, _ = cuda.load_extension()
    if ext is None or ext.device_count() == 0 or cuda.BACKEND.device_reason(x.device):
        return {}
    conf = (strides, pads, 1e-5)

    def forward():
        return measure(lambda: cuda.bn_relu_conv(x, mean, var, gamma, beta, w, None, *conf, True, *running, w.dtype))

    def dgrad():
        return measure(lambda: cuda.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, w.dtype))

    def wgrad():
        return measure(lambda: cuda.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), *conf,
                                                       w.dtype, w.dtype))
    with mock.patch.dict(os.environ, {cuda.SM80_FLAG: "0"}):
        times = {("conv_fwd", "fused-cuda"): forward(), ("conv_dgrad", "fused-cuda"): dgrad(),
                 ("conv_wgrad", "fused-cuda"): wgrad()}
    with mock.patch.dict(os.environ, {cuda.SM80_FLAG: "1"}):
        x_ok, dy_ok = cuda.sm80_kernel_runs(w.dtype, (x,), w, dy), cuda.sm80_kernel_runs(w.dtype, (dy,), x, w)
        for mode, measured, runs in (("conv_fwd", forward, x_ok), ("conv_dgrad", dgrad, dy_ok),
                                     ("conv_wgrad", wgrad, x_ok and dy_ok)):
            if runs:
                times[(mode, "fused-cuda-sm80")] = measured()
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma list of block cases (benchmarks/cases.py)")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--weights", choices=["channels_last", "default"], default="channels_last",
                        help="conv weight layout, for every provider (the note column says which)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("benchmarks.kernels on a CPU needs TRITON_INTERPRET=1 (set before torch is imported)")
    every = {c.name: c for c in C.GPU_BLOCKS + C.CPU_BLOCKS}
    unknown = [n for n in args.cases.split(",") if n not in every]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(every)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measure = timer(args.device)
    rows = []
    for name in args.cases.split(","):
        case = every[name]
        for dtype_name in args.dtypes.split(","):
            for conv in case.convs():
                c_in, c_out, k, stride, pad, hw = conv
                note = f"{c_in}->{c_out} k{k} s{stride} {hw}x{hw} N={case.batch} {args.weights} weights"
                times = measure_conv(conv, case.batch, DTYPES[dtype_name], args.device, measure, args.weights)
                for (mode, provider), ms in times.items():
                    rows.append([name, provider, dtype_name, mode, "time_ms", float(ms), "ms", note])
                vendor = "cudnn" if args.device == "cuda" else "aten"
                for (mode, provider), ours in times.items():
                    if provider == vendor:
                        continue
                    theirs = times[(mode, vendor)]
                    rows.append([name, provider, dtype_name, mode, "ratio", ours / theirs, f"x {vendor}", note])
                    print(f"{name:10s} {dtype_name} {mode:10s} {provider:15s} {note:28s} ours {float(ours):.3f} ms, "
                          f"vendor {float(theirs):.3f} ms: {ours / theirs:.2f}x")
            write_results(out, rows, metadata(args.device))
    print(f"wrote {len(rows)} rows to {out / 'results.csv'}")


if __name__ == "__main__":
    main()

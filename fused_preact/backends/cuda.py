"""The cuda backend: the Python side of the hand-written kernels in csrc/ (fused_preact._C).

The kernels are torch-free: this side validates tensors, fills the params structs with
data pointers, sizes and element strides, and passes the CURRENT stream on every call
(a cached stream breaks CUDA graphs), under a device guard for the tensors' device.

The kernels are opt-in (FUSED_PREACT_ENABLE_CUDA_BACKEND=1) while they are slower than
the triton backend, because "auto" tries cuda first; README's backend table says what was
verified where. The tensor-core conv kernels (csrc/fprop_sm80.cuh, dgrad_sm80.cuh,
wgrad_sm80.cuh: CuTe, cp.async, ldmatrix, mma.sync; fp16, bf16, fp32 as tf32;
channels_last) run only with FUSED_PREACT_CUDA_SM80=1: verified on an H100 (conformance
against float64, compute-sanitizer), faster than the WMMA kernels that run otherwise, and
still several times cuDNN's time (README).
"""
from __future__ import annotations

import os

import torch

from .base import Backend, cdiv, conv_output_hw, tf32_convolutions, weight_memory_format, wgrad_splits

ENABLE_FLAG = "FUSED_PREACT_ENABLE_CUDA_BACKEND"
SM80_FLAG = "FUSED_PREACT_CUDA_SM80"
SM80_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float32 as tf32, as the WMMA kernels


def load_extension():
    """(module, None) if fused_preact._C imports, else (None, why)."""
    try:
        from .. import _C
    except ImportError as e:
        return None, f"fused_preact._C was not built ({e}); reinstall with nvcc on PATH"
    return _C, None


def tf32_reason(conv_dtype: torch.dtype | None) -> str | None:
    """float32 convolutions run on tf32 tensor cores here, as nn.Conv2d does by default;
    with tf32 off for convolutions (base.tf32_convolutions) they would not match it."""
    if conv_dtype != torch.float32:
        return None
    if tf32_convolutions():
        return None
    return ("float32 convolutions run as tf32: needs tf32 allowed for convolutions "
            "(torch.backends.cudnn.conv.fp32_precision='tf32', or torch.backends.cudnn.allow_tf32=True)")


class CudaBackend(Backend):
    name = "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    env_flags = (ENABLE_FLAG,)
    opt_in = (ENABLE_FLAG, "1")

    def availability_reason(self):
        ext, why = load_extension()
        if ext is None:
            return why
        if ext.device_count() == 0:
            return f"no GPU here (the CUDA runtime says: {ext.device_error()})"
        if os.environ.get(ENABLE_FLAG) != "1":
            return (f"opt-in: correct on an H100 but slower than the triton backend "
                    f"(set {ENABLE_FLAG}=1 to use it)")
        return None

    def device_reason(self, device):
        if device.type != "cuda":
            return f"tensors on {device.type} are not supported (CUDA tensors only)"
        ext, _ = load_extension()
        major, minor = torch.cuda.get_device_capability(device)
        built = [int(a) for a in ext.built_archs.split(";") if a]
        if not any(a // 10 == major and a % 10 <= minor for a in built):
            return (f"no kernel image for sm_{major}{minor} (built for {ext.built_archs}; "
                    "rebuild with FUSED_PREACT_CUDA_ARCHS)")
        return None

    def not_supported_reasons(self, op, tensors, conv_dtype=None):
        reasons = super().not_supported_reasons(op, tensors, conv_dtype)
        why = None if reasons else tf32_reason(conv_dtype)
        return reasons + ([f"cuda: {why}"] if why else [])


# --------------------------------------------------------------------------- marshalling
def require_cuda(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        raise ValueError(f"fused_preact.cuda: {name} must be a CUDA tensor, got {t.device}")
    return t


def act(ext, t: torch.Tensor):
    """An _C.Act describing NCHW-shaped `t` by pointer, sizes and element strides."""
    a = ext.Act()
    a.ptr = t.data_ptr()
    a.n, a.c, a.h, a.w = t.shape
    a.sn, a.sc, a.sh, a.sw = t.stride()
    return a


def dtype_code(ext, dtype: torch.dtype):
    codes = {torch.float32: ext.DType.f32, torch.float16: ext.DType.f16, torch.bfloat16: ext.DType.bf16}
    if dtype not in codes:
        raise TypeError(f"fused_preact.cuda: dtype {dtype} not supported (float32, float16, bfloat16)")
    return codes[dtype]


def fp32_vector(name: str, v: torch.Tensor | None, channels: int) -> torch.Tensor | None:
    """Per-channel vectors as contiguous float32 (kept alive by the caller until launch)."""
    if v is None:
        return None
    require_cuda(name, v)
    if v.shape != (channels,):
        raise ValueError(f"fused_preact.cuda: {name} must have shape ({channels},), got {tuple(v.shape)}")
    return v.detach().to(torch.float32).contiguous()


def bn_args(ext, mean, var, gamma, beta, eps, channels, keep: list):
    """_C.BnArgs for a BN prologue (all pointers 0 without one)."""
    args = ext.BnArgs()
    args.eps = float(eps)
    for field, name, v in (("mean", "mean", mean), ("var", "var", var), ("gamma", "bn_weight", gamma),
                           ("beta", "bn_bias", beta)):
        v = fp32_vector(name, v, channels)
        if v is not None:
            keep.append(v)
            setattr(args, field, v.data_ptr())
    return args


def stream_of(t: torch.Tensor) -> int:
    """The CURRENT stream of t's device, read on every call (never cached)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def conv_geometry(p, weight_shape, stride, padding):
    p.k, _, p.r, p.s = weight_shape
    p.stride_h, p.stride_w = stride
    p.pad_h, p.pad_w = padding


def sm80_kernel_runs(conv_dtype: torch.dtype, gathered: tuple[torch.Tensor, ...],
                     *tensors: torch.Tensor) -> bool:
    """Whether an op runs on its sm_80 tensor-core kernel (csrc/*_sm80.cuh): asked for
    (SM80_FLAG), every `gathered` tensor (what its main loop reads in 16-byte vectors of
    channels: x forward, dy for dgrad, both for wgrad) of the conv dtype with unit channel
    stride, its other strides and channels multiples of a vector (8 fp16 / bf16 elements,
    4 fp32 ones, which run as tf32), 16-byte aligned, an sm_80-or-newer device, and every
    tensor under 2^31 elements (32-bit offsets)."""
    if os.environ.get(SM80_FLAG) != "1" or conv_dtype not in SM80_DTYPES:
        return False
    vector = 16 // conv_dtype.itemsize

    def vectors_of_channels(t: torch.Tensor) -> bool:
        sn, sc, sh, sw = t.stride()
        return (t.dtype == conv_dtype and sc == 1 and all(v % vector == 0 for v in (t.shape[1], sn, sh, sw))
                and t.data_ptr() % 16 == 0)
    return (all(vectors_of_channels(t) for t in gathered)
            and torch.cuda.get_device_capability(gathered[0].device) >= (8, 0)
            and max(t.numel() for t in (*gathered, *tensors)) < 2**31)


def packed_weight(weight: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous tensor of `dtype` holding weight.permute(*dims), the layout a kernel
    reads. Always a copy: `.to(dtype, memory_format=...)` returns the permuted VIEW itself
    when the weight already has `dtype` (its strides then describe the old layout)."""
    view = weight.detach().permute(*dims)
    return torch.empty(view.shape, device=weight.device, dtype=dtype).copy_(view)


# --------------------------------------------------------------------------- ops
def bn_relu_conv(x, mean, var, bn_weight, bn_bias, weight, residual, stride, padding, eps, want_stats,
                 running_mean, running_var, num_batches_tracked, momentum, conv_dtype):
    ext, _ = load_extension()
    for name, t in (("x", x), ("weight", weight)):
        require_cuda(name, t)
    if residual is not None and residual.dtype != conv_dtype:
        # A float32 shortcut under autocast: these kernels add a residual of the conv dtype
        # only, so the sum and its statistics follow in torch here.
        y = bn_relu_conv(x, mean, var, bn_weight, bn_bias, weight, None, stride, padding, eps, False,
                         None, None, None, momentum, conv_dtype)[0]
        y = (y + residual).contiguous(memory_format=torch.channels_last)
        if not want_stats:
            return y, y.new_empty(0, dtype=torch.float32), y.new_empty(0, dtype=torch.float32)
        return y, *batch_stats(y, running_mean, running_var, num_batches_tracked, momentum)
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    out_h, out_w = conv_output_hw((h, w), (r, s), stride, padding)
    y = torch.empty((n, k, out_h, out_w), device=x.device, dtype=conv_dtype, memory_format=torch.channels_last)
    tiles = cdiv(n * out_h * out_w, ext.stats_rows)
    partials = torch.empty((tiles if want_stats else 0, 3, k), device=x.device, dtype=torch.float32)
    sm80 = sm80_kernel_runs(conv_dtype, (x,), weight, y)
    p = ext.ConvFwdParams()
    if sm80:  # [K, R, S, C]: the channels_last weight
        keep = [packed_weight(weight, (0, 2, 3, 1), conv_dtype)]
        p.w_krsc = keep[0].data_ptr()
    else:
        keep = [packed_weight(weight, (2, 3, 1, 0), conv_dtype)]  # [R, S, C, K]
        p.w_rsck = keep[0].data_ptr()
    p.x, p.y = act(ext, x), act(ext, y)
    if residual is not None:
        p.residual = act(ext, require_cuda("residual", residual))
    conv_geometry(p, weight.shape, stride, padding)
    p.bn = bn_args(ext, mean, var, bn_weight, bn_bias, eps, c, keep)
    if want_stats:
        p.partials = partials.data_ptr()
    with torch.cuda.device(x.device):
        if sm80:
            ext.conv_fwd_sm80(p, dtype_code(ext, conv_dtype), stream_of(x))
        else:
            ext.conv_fwd(p, dtype_code(ext, x.dtype), dtype_code(ext, conv_dtype), stream_of(x))
    if not want_stats:
        return y, partials.new_empty(0), partials.new_empty(0)
    # The merge is a second launch here (the Triton kernels merge in their last program).
    return y, *bn_finalize(partials, running_mean, running_var, num_batches_tracked, momentum)


def batch_stats(x, running_mean, running_var, num_batches_tracked, momentum):
    ext, _ = load_extension()
    require_cuda("x", x)
    n, c, h, w = x.shape
    partials = torch.empty((cdiv(n * h * w, ext.stats_rows), 3, c), device=x.device, dtype=torch.float32)
    p = ext.StatsParams()
    p.x, p.partials = act(ext, x), partials.data_ptr()
    with torch.cuda.device(x.device):
        ext.batch_stats(p, dtype_code(ext, x.dtype), stream_of(x))
    return bn_finalize(partials, running_mean, running_var, num_batches_tracked, momentum)


def bn_finalize(partials, running_mean, running_var, num_batches_tracked, momentum):
    ext, _ = load_extension()
    require_cuda("partials", partials)
    partials = partials.to(torch.float32).contiguous()
    tiles, _, c = partials.shape
    mean = torch.empty(c, device=partials.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    p = ext.FinalizeParams()
    p.partials, p.tiles, p.c, p.mean, p.var = partials.data_ptr(), tiles, c, mean.data_ptr(), var.data_ptr()
    if running_mean is not None:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if not (require_cuda(name, t).is_contiguous() and t.dtype == running_mean.dtype):
                raise ValueError(f"fused_preact.cuda: {name} must be contiguous, of running_mean's dtype")
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # the kernel reads the count with this batch in it
        p.running_mean, p.running_var = running_mean.data_ptr(), running_var.data_ptr()
        p.running_dtype = dtype_code(ext, running_mean.dtype)
        if momentum is None:
            nbt = require_cuda("num_batches_tracked", num_batches_tracked)
            if nbt.dtype != torch.int64:
                raise TypeError("fused_preact.cuda: num_batches_tracked must be int64")
            p.num_batches_tracked = nbt.data_ptr()
        p.momentum = -1.0 if momentum is None else float(momentum)
    with torch.cuda.device(partials.device):
        ext.bn_finalize(p, stream_of(partials))
    return mean, var


def bn_relu_conv_dgrad(dy, weight, x, mean, var, bn_weight, bn_bias, stride, padding, eps, conv_dtype, g_other=None):
    ext, _ = load_extension()
    for name, t in (("dy", dy), ("weight", weight), ("x", x), ("g_other", g_other)):
        if t is not None:
            require_cuda(name, t)
    dy = dy.to(conv_dtype)  # float32 behind a float32 shortcut under autocast
    n, c, h, w = x.shape
    g = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    has_bn = mean is not None
    tiles = ext.dgrad_tiles(n, h, w, stride[0], stride[1])
    sums = torch.empty((tiles if has_bn else 0, 2, c), device=x.device, dtype=torch.float32)
    sm80 = x.dtype == conv_dtype and sm80_kernel_runs(conv_dtype, (dy,), x, weight)
    p = ext.ConvDgradParams()
    if sm80:
        keep = [packed_weight(weight, (1, 2, 3, 0), conv_dtype)]
        p.w_crsk = keep[0].data_ptr()  # [C, R, S, K]
    else:
        keep = [packed_weight(weight, (2, 3, 0, 1), conv_dtype)]  # [R, S, K, C]
        p.w_rskc = keep[0].data_ptr()
    p.dy, p.x, p.g = act(ext, dy), act(ext, x), act(ext, g)
    if g_other is not None:
        p.g_other = act(ext, g_other)
    conv_geometry(p, weight.shape, stride, padding)
    p.bn = bn_args(ext, mean, var, bn_weight, bn_bias, eps, c, keep)
    if has_bn:
        p.sums = sums.data_ptr()
    with torch.cuda.device(x.device):
        if sm80:
            ext.conv_dgrad_sm80(p, dtype_code(ext, conv_dtype), stream_of(x))
        else:
            ext.conv_dgrad(p, dtype_code(ext, x.dtype), dtype_code(ext, dy.dtype), stream_of(x))
    # Tiles reduced in a fixed order (one torch reduction kernel, no atomics).
    return g, sums.sum(dim=0) if has_bn else sums.new_empty((2, 0))


def bn_relu_conv_wgrad(dy, x, mean, var, bn_weight, bn_bias, weight_shape, stride, padding, eps, weight_dtype,
                       conv_dtype, weight_channels_last=False):
    ext, _ = load_extension()
    for name, t in (("dy", dy), ("x", x)):
        require_cuda(name, t)
    dy = dy.to(conv_dtype)  # float32 behind a float32 shortcut under autocast
    n, c, _, _ = x.shape
    k, _, r, s = weight_shape
    rows = n * dy.shape[2] * dy.shape[3]
    tile = ext.stats_rows
    split = wgrad_splits(rows, cdiv(k, tile) * cdiv(c, tile) * r * s)
    rows_per_split = cdiv(rows, split)
    split = cdiv(rows, rows_per_split)
    partials = torch.empty((split, k, c, r, s), device=x.device, dtype=torch.float32)
    keep: list = []
    p = ext.ConvWgradParams()
    p.dy, p.x = act(ext, dy), act(ext, x)
    conv_geometry(p, weight_shape, stride, padding)
    p.bn = bn_args(ext, mean, var, bn_weight, bn_bias, eps, c, keep)
    p.partials, p.split, p.rows_per_split = partials.data_ptr(), split, rows_per_split
    with torch.cuda.device(x.device):
        if sm80_kernel_runs(conv_dtype, (dy, x)):
            ext.conv_wgrad_sm80(p, dtype_code(ext, conv_dtype), stream_of(x))
        else:
            ext.conv_wgrad(p, dtype_code(ext, x.dtype), dtype_code(ext, dy.dtype), stream_of(x))
    return partials.sum(dim=0).to(weight_dtype).contiguous(memory_format=weight_memory_format(weight_channels_last))


def bn_backward_apply(g, x, mean, var, bn_weight, grad_sums, count, eps, batch_stats, dx_other):
    ext, _ = load_extension()
    for name, t in (("g", g), ("x", x)):
        require_cuda(name, t)
    if g.dtype != x.dtype:
        raise TypeError(f"fused_preact.cuda: g dtype {g.dtype} must equal x dtype {x.dtype}")
    c = x.shape[1]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    keep = [fp32_vector("grad_sums", (grad_sums / count).flatten(), 2 * c)]  # the kernel reads means
    p = ext.BnBackwardParams()
    p.g, p.x, p.dx = act(ext, g), act(ext, x), act(ext, dx)
    if dx_other is not None:
        p.dx_other = act(ext, dx_other)
    p.bn = bn_args(ext, mean, var, bn_weight, None, eps, c, keep)
    p.grad_means, p.batch_stats = keep[0].data_ptr(), bool(batch_stats)
    with torch.cuda.device(x.device):
        ext.bn_backward_apply(p, dtype_code(ext, x.dtype), stream_of(x))
    return dx


BACKEND = CudaBackend({
    "bn_relu_conv": bn_relu_conv,
    "batch_stats": batch_stats,
    "bn_finalize": bn_finalize,
    "bn_relu_conv_dgrad": bn_relu_conv_dgrad,
    "bn_relu_conv_wgrad": bn_relu_conv_wgrad,
    "bn_backward_apply": bn_backward_apply,
})

"""BatchNorm backward apply: dx = scale * (g - mean(g) - xhat * mean(g * xhat)).

g is the gradient at the BN output (ReLU mask applied by the dgrad epilogue); the two
means come from the dgrad epilogue's sums (all-reduced first under synchronised BN).
Eval-mode statistics are constants: dx = scale * g. x's gradient from its other consumer
(a block's identity path), where given, is added before the store: no add kernel beside.
Element-wise over N*H*W rows x C channels, one [rows, channels] tile per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import cdiv
from .common import as_offset, inv_std, needs_int64, next_pow2, nhwc_strides, pixel_coords
from .launch import launcher


@launcher()
@triton.jit
def bn_backward_apply_kernel(
    g_ptr, sgn, sgh, sgw, sgc, x_ptr, sxn, sxh, sxw, sxc, dx_ptr, son, soh, sow, soc,
    other_ptr, san, sah, saw, sac, mean_ptr, var_ptr, gamma_ptr, grad_sums_ptr, inv_count, eps, M, HW, W, C,
    HAS_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr, HAS_OTHER: tl.constexpr, INT64: tl.constexpr, BM: tl.constexpr,
    BC: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    n, h, w = pixel_coords(rm, HW, W)
    n, h, w = as_offset(n, INT64), as_offset(h, INT64), as_offset(w, INT64)
    g = tl.load(g_ptr + (n * sgn + h * sgh + w * sgw)[:, None] + rc[None, :] * sgc, mask=ok, other=0.0).to(tl.float32)
    invstd = inv_std(tl.load(var_ptr + rc, mask=c_ok, other=1.0).to(tl.float32), eps)
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    if BATCH_STATS:
        x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + rc[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
        mean_g = tl.load(grad_sums_ptr + rc, mask=c_ok, other=0.0) * inv_count
        mean_gx = tl.load(grad_sums_ptr + C + rc, mask=c_ok, other=0.0) * inv_count
        xhat = (x - mean[None, :]) * invstd[None, :]
        g = g - mean_g[None, :] - xhat * mean_gx[None, :]
    dx = g * scale[None, :]
    if HAS_OTHER:
        dx += tl.load(other_ptr + (n * san + h * sah + w * saw)[:, None] + rc[None, :] * sac, mask=ok,
                      other=0.0).to(tl.float32)
    dx = dx.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + (n * son + h * soh + w * sow)[:, None] + rc[None, :] * soc, dx, mask=ok)


def bn_backward_apply(g, x, mean, var, bn_weight, grad_sums, count, eps, batch_stats, dx_other):
    n, c, h, w = x.shape
    m = n * h * w
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    bm, bc = 64, min(64, next_pow2(c))
    other = (dx_other, *nhwc_strides(dx_other)) if dx_other is not None else (dx, 0, 0, 0, 0)  # unread
    bn_backward_apply_kernel[(cdiv(m, bm), cdiv(c, bc))](
        g, *nhwc_strides(g), x, *nhwc_strides(x), dx, *nhwc_strides(dx), *other,
        mean, var, bn_weight if bn_weight is not None else var, grad_sums.contiguous(), 1.0 / count, eps, m, h * w, w, c,
        HAS_GAMMA=bn_weight is not None, BATCH_STATS=batch_stats, HAS_OTHER=dx_other is not None,
        INT64=needs_int64(g, x, dx, *(() if dx_other is None else (dx_other,))), BM=bm, BC=bc,
    )
    return dx

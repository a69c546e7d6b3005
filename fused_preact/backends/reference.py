"""The reference backend: every op in plain PyTorch, on any device.

It is the CPU backend, the oracle of the tests and a baseline of the benchmarks, so it
is written for clarity: BN statistics and the BN transform in float32 (float64 for
float64 inputs), activations cast back to the input dtype before the convolution, as
nn.BatchNorm2d + F.relu + nn.Conv2d do under mixed precision.

Partial statistics ("partials") are a [T, 3, C] tensor of per-tile (count, mean, M2),
the input of bn_finalize (synchronised BN's tiles, one per rank); this backend's own
statistics are one tile, merged at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, stats_dtype, weight_memory_format


def conv_layout(t: torch.Tensor) -> torch.memory_format:
    """NCHW on the CPU, where oneDNN's channels_last 3x3 float32 convolution is 2-2.6x
    further from float64 than the NCHW one eager models use (enough to flip a ReLU mask at
    a near-tie and move every earlier gradient by 1e-3); channels_last elsewhere."""
    return torch.contiguous_format if t.device.type == "cpu" else torch.channels_last


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def bn_scale(var, bn_weight, eps):
    """gamma / sqrt(var + eps), per channel."""
    invstd = torch.rsqrt(var + eps)
    return invstd if bn_weight is None else invstd * bn_weight.to(invstd.dtype)


def bn_apply(x, mean, var, bn_weight, bn_bias, eps):
    """bn(x) in statistics precision; (x - mean) first keeps it exact for |mean| >> std."""
    y = (x.to(mean.dtype) - _channel(mean)) * _channel(bn_scale(var, bn_weight, eps))
    return y if bn_bias is None else y + _channel(bn_bias.to(y.dtype))


def activation(x, mean, var, bn_weight, bn_bias, eps, dtype):
    """relu(bn(x)) cast to the conv dtype, or x itself when the unit has no BN prologue."""
    if mean is None:
        return x.to(dtype)
    return F.relu(bn_apply(x, mean, var, bn_weight, bn_bias, eps)).to(dtype)


def partials_of(y: torch.Tensor) -> torch.Tensor:
    """One tile of (count, mean, M2) per channel of an NCHW tensor, in statistics precision."""
    ys = y.to(stats_dtype(y.dtype)).transpose(0, 1).reshape(y.shape[1], -1)
    mean = ys.mean(dim=1)
    m2 = ((ys - mean[:, None]) ** 2).sum(dim=1)
    count = torch.full_like(mean, ys.shape[1])
    return torch.stack([count, mean, m2]).unsqueeze(0)


def bn_relu_conv(x, mean, var, bn_weight, bn_bias, weight, residual, stride, padding, eps,
                 want_stats, running_mean, running_var, num_batches_tracked, momentum, conv_dtype):
    a = activation(x, mean, var, bn_weight, bn_bias, eps, conv_dtype)
    y = F.conv2d(a.contiguous(memory_format=conv_layout(a)), weight.to(conv_dtype), None, stride, padding)
    if residual is not None:
        y = y + residual
    y = y.contiguous(memory_format=torch.channels_last)
    if not want_stats:
        none = y.new_empty((0,), dtype=stats_dtype(y.dtype))
        return y, none, none.clone()
    return y, *bn_finalize(partials_of(y), running_mean, running_var, num_batches_tracked, momentum)


def batch_stats(x, running_mean, running_var, num_batches_tracked, momentum):
    return bn_finalize(partials_of(x), running_mean, running_var, num_batches_tracked, momentum)


def merge_partials(partials: torch.Tensor):
    """Chan's parallel merge of (count, mean, M2) tiles -> (count, mean, biased var)."""
    count, means, m2s = partials.unbind(dim=1)
    total = count.sum(dim=0)
    mean = (count * means).sum(dim=0) / total
    m2 = m2s.sum(dim=0) + (count * (means - mean) ** 2).sum(dim=0)
    return total, mean, m2 / total


def bn_finalize(partials, running_mean, running_var, num_batches_tracked, momentum):
    count, mean, var = merge_partials(partials)
    if running_mean is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # nn.BatchNorm2d counts the batch first
        # nn.BatchNorm2d: momentum=None means a cumulative average, 1 / num_batches_tracked.
        factor = (1.0 / num_batches_tracked.to(mean.dtype)) if momentum is None else momentum
        unbiased = var * count / (count - 1).clamp_min(1)
        # Eager's form, not old + factor * (new - old): at factor 1 (momentum=None's first batch)
        # it gives the batch's value exactly, not one rounding of the old value off.
        running_mean.copy_((1 - factor) * running_mean + factor * mean.to(running_mean.dtype))
        running_var.copy_((1 - factor) * running_var + factor * unbiased.to(running_var.dtype))
    return mean, var


def bn_relu_conv_dgrad(dy, weight, x, mean, var, bn_weight, bn_bias, stride, padding, eps, conv_dtype, g_other=None):
    da = torch.nn.grad.conv2d_input(x.shape, weight.to(conv_dtype), dy.to(conv_dtype), stride, padding)
    if g_other is not None:  # added in float32 (float64) before g is rounded to x's dtype, as in the kernels
        wide = torch.promote_types(da.dtype, torch.float32)
        da = da.to(wide) + g_other.to(wide)
    if mean is None:
        return da.to(x.dtype).contiguous(memory_format=torch.channels_last), da.new_empty((2, 0))
    # ReLU's gradient passes where bn(x) > 0 and at NaN, as eager's threshold_backward (v <= 0 -> 0).
    g = torch.where(bn_apply(x, mean, var, bn_weight, bn_bias, eps) <= 0, 0.0, da).to(x.dtype)
    # Sums of g as stored, so the BN backward subtracts exactly the mean of what it reads.
    gs = g.to(mean.dtype)
    xhat = (x.to(mean.dtype) - _channel(mean)) * _channel(torch.rsqrt(var + eps))
    sums = torch.stack([gs.sum(dim=(0, 2, 3)), (gs * xhat).sum(dim=(0, 2, 3))])
    return g.contiguous(memory_format=torch.channels_last), sums


def bn_relu_conv_wgrad(dy, x, mean, var, bn_weight, bn_bias, weight_shape, stride, padding, eps, weight_dtype,
                       conv_dtype, weight_channels_last=False):
    a = activation(x, mean, var, bn_weight, bn_bias, eps, conv_dtype)
    dw = torch.nn.grad.conv2d_weight(a, weight_shape, dy.to(conv_dtype), stride, padding)
    return dw.to(weight_dtype).contiguous(memory_format=weight_memory_format(weight_channels_last))


def bn_backward_apply(g, x, mean, var, bn_weight, grad_sums, count, eps, batch_stats, dx_other):
    scale = _channel(bn_scale(var, bn_weight, eps))
    gs = g.to(mean.dtype)
    if batch_stats:
        xhat = (x.to(mean.dtype) - _channel(mean)) * _channel(torch.rsqrt(var + eps))
        grad_means = grad_sums / count
        gs = gs - _channel(grad_means[0]) - xhat * _channel(grad_means[1])
    dx = scale * gs
    if dx_other is not None:  # added before rounding, as the fused kernels do
        dx = dx + dx_other.to(dx.dtype)
    return dx.to(x.dtype).contiguous(memory_format=torch.channels_last)


class ReferenceBackend(Backend):
    name = "reference"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


BACKEND = ReferenceBackend({
    "bn_relu_conv": bn_relu_conv,
    "batch_stats": batch_stats,
    "bn_finalize": bn_finalize,
    "bn_relu_conv_dgrad": bn_relu_conv_dgrad,
    "bn_relu_conv_wgrad": bn_relu_conv_wgrad,
    "bn_backward_apply": bn_backward_apply,
})

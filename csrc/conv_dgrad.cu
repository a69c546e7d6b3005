// Backward through a unit's input: g = (dgrad(dy, W) + g_other) * [bn(x) > 0] and per-tile BN sums.
// Implicit GEMM over the input pixels of one stride phase (h % stride_h, w % stride_w):
// only the taps r = (h + pad_h) mod stride_h (+ j * stride_h) reach an output pixel, so no
// zero-inserted work is done; a phase with no tap still writes its zeros. The epilogue
// recomputes the ReLU mask from the saved pre-BN x and writes, per tile, the sums of the
// stored g and of g * xhat (fixed order, no atomics).
#include "launch.h"
#include "tile_mma.cuh"

namespace fused_preact {
namespace {

template <typename TX, typename T>
__global__ void __launch_bounds__(kThreads) conv_dgrad_kernel(ConvDgradParams p, int64_t tiles_per_phase) {
  __shared__ __align__(32) T sA[kTile * kLdA];
  __shared__ __align__(32) T sB[kBK * kLdB];
  __shared__ __align__(32) float sC[kTile * kLdC];
  const int tid = threadIdx.x;
  const int64_t C = p.x.c, K = p.k, H = p.x.h, W = p.x.w, P = p.dy.h, Q = p.dy.w;
  const int64_t phase = blockIdx.x / tiles_per_phase;
  const int64_t ph = phase / p.stride_w, pw = phase % p.stride_w;
  const int64_t hp = ph < H ? (H - ph + p.stride_h - 1) / p.stride_h : 0;
  const int64_t wp = pw < W ? (W - pw + p.stride_w - 1) / p.stride_w : 0;
  const int64_t rows = p.x.n * hp * wp;
  const int64_t m0 = (blockIdx.x % tiles_per_phase) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const T* dy = static_cast<const T*>(p.dy.ptr);
  const T* w = static_cast<const T*>(p.w_rskc);
  TileMma<T, wmma::row_major> mma;

  const int64_t r0 = (ph + p.pad_h) % p.stride_h, s0 = (pw + p.pad_w) % p.stride_w;
  for (int64_t r = r0; r < p.r; r += p.stride_h) {
    for (int64_t s = s0; s < p.s; s += p.stride_w) {
      for (int64_t k0 = 0; k0 < K; k0 += kBK) {
        const int col = tid % kBK;
        const int64_t k = k0 + col;
        for (int row = tid / kBK; row < kTile; row += kThreads / kBK) {
          const int64_t m = m0 + row;
          float v = 0.f;
          if (m < rows && k < K) {
            const int64_t n = m / (hp * wp), h = ph + p.stride_h * ((m / wp) % hp), wi = pw + p.stride_w * (m % wp);
            const int64_t hh = h + p.pad_h - r, ww = wi + p.pad_w - s;  // multiples of the strides
            const int64_t op = hh / p.stride_h, oq = ww / p.stride_w;
            if (hh >= 0 && op < P && ww >= 0 && oq < Q) v = to_float(dy[offset(p.dy, n, k, op, oq)]);
          }
          sA[row * kLdA + col] = from_float<T>(v);
        }
        // B: kBK output channels x kTile input channels of the packed weight (C contiguous).
        stage_b_tile(sB, w + ((r * p.s + s) * K + k0) * C + n0, C, K - k0, C - n0);
        __syncthreads();
        mma.step(sA, sB);
        __syncthreads();
      }
    }
  }
  mma.store(sC);
  __syncthreads();

  const bool has_bn = p.bn.mean != nullptr;
  const TX* x = static_cast<const TX*>(p.x.ptr);
  TX* g = static_cast<TX*>(p.g.ptr);
  const TX* g_other = static_cast<const TX*>(p.g_other.ptr);
  for (int idx = tid; idx < kTile * kTile; idx += kThreads) {
    const int row = idx / kTile, col = idx % kTile;
    const int64_t m = m0 + row, c = n0 + col;
    if (m >= rows || c >= C) continue;
    const int64_t n = m / (hp * wp), h = ph + p.stride_h * ((m / wp) % hp), wi = pw + p.stride_w * (m % wp);
    float v = sC[row * kLdC + col];
    if (g_other) v += to_float(g_other[offset(p.g_other, n, c, h, wi)]);
    if (has_bn) {
      const ChannelBn b = channel_bn(p.bn, c);
      if ((to_float(x[offset(p.x, n, c, h, wi)]) - b.mean) * b.scale + b.beta <= 0.f) v = 0.f;
    }
    const TX stored = from_float<TX>(v);
    g[offset(p.g, n, c, h, wi)] = stored;
    sC[row * kLdC + col] = to_float(stored);  // sums of what the BN backward will read
  }
  __syncthreads();
  if (!has_bn || tid >= kTile) return;
  const int64_t c = n0 + tid;
  if (c >= C) return;
  const float mean = p.bn.mean[c], invstd = rsqrtf(p.bn.var[c] + p.bn.eps);
  float sum_g = 0.f, sum_gx = 0.f;
  for (int row = 0; row < kTile && m0 + row < rows; ++row) {
    const int64_t m = m0 + row;
    const int64_t n = m / (hp * wp), h = ph + p.stride_h * ((m / wp) % hp), wi = pw + p.stride_w * (m % wp);
    const float gv = sC[row * kLdC + tid];
    sum_g += gv;
    sum_gx += gv * (to_float(x[offset(p.x, n, c, h, wi)]) - mean) * invstd;
  }
  float* out = p.sums + int64_t(blockIdx.x) * 2 * C + c;
  out[0] = sum_g;
  out[C] = sum_gx;
}

template <typename TX, typename T> struct ConvDgrad {
  static void launch(dim3 grid, cudaStream_t stream, const ConvDgradParams& p) {
    const int64_t tiles_per_phase = grid.x / (p.stride_h * p.stride_w);
    conv_dgrad_kernel<TX, T><<<grid, kThreads, 0, stream>>>(p, tiles_per_phase);
  }
};

}  // namespace

int64_t dgrad_tiles(int64_t n, int64_t h, int64_t w, int stride_h, int stride_w) {
  return cdiv(n * cdiv(h, stride_h) * cdiv(w, stride_w), kTile) * stride_h * stride_w;
}

cudaError_t conv_dgrad(const ConvDgradParams& p, DType x_dtype, DType dtype, cudaStream_t stream) {
  dim3 grid(unsigned(dgrad_tiles(p.x.n, p.x.h, p.x.w, p.stride_h, p.stride_w)), unsigned(cdiv(p.x.c, kTile)));
  return launch_by_dtypes<ConvDgrad>(x_dtype, dtype, grid, stream, p);
}

}  // namespace fused_preact

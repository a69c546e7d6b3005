// Weight gradient with the activation recomputed: dW = wgrad(relu(bn(x)), dy).
// Per filter tap (r, s): [K out channels] x [C in channels], reduced over the N*P*Q output
// pixels, split over `split` blocks so layers with few pixels still fill the GPU. A is
// dy^T (staged [pixels][K], read column-major), B the activation rebuilt from the saved
// pre-BN x (zero at padding, after the activation). fp32 partials [split, K, C, R, S] are
// summed in a fixed order by the caller (deterministic, no atomics).
#include "launch.h"
#include "tile_mma.cuh"

namespace fused_preact {
namespace {

template <typename TX, typename T>
__global__ void __launch_bounds__(kThreads) conv_wgrad_kernel(ConvWgradParams p) {
  __shared__ __align__(32) T sA[kBK * kLdAT];
  __shared__ __align__(32) T sB[kBK * kLdB];
  __shared__ __align__(32) float sC[kTile * kLdC];
  __shared__ ChannelBn sBn[kTile];
  const int tid = threadIdx.x;
  const int64_t C = p.x.c, K = p.k, P = p.dy.h, Q = p.dy.w;
  const int64_t L = p.x.n * P * Q;
  const int64_t k0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  const int64_t tap = blockIdx.z % (p.r * p.s), split = blockIdx.z / (p.r * p.s);
  const int64_t r = tap / p.s, s = tap % p.s;
  const int64_t l_begin = split * p.rows_per_split;
  const int64_t l_end = l_begin + p.rows_per_split < L ? l_begin + p.rows_per_split : L;
  const bool has_bn = p.bn.mean != nullptr;
  if (has_bn && tid < kTile) sBn[tid] = c0 + tid < C ? channel_bn(p.bn, c0 + tid) : ChannelBn{0.f, 0.f, 0.f};
  const T* dy = static_cast<const T*>(p.dy.ptr);
  const TX* x = static_cast<const TX*>(p.x.ptr);
  TileMma<T, wmma::col_major> mma;

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kBK) {
    __syncthreads();  // sBn written / previous stage consumed
    for (int idx = tid; idx < kBK * kTile; idx += kThreads) {
      const int lrow = idx / kTile, col = idx % kTile;
      const int64_t l = l0 + lrow;
      float a = 0.f, b = 0.f;
      if (l < l_end) {
        const int64_t n = l / (P * Q), op = (l / Q) % P, oq = l % Q;
        if (k0 + col < K) a = to_float(dy[offset(p.dy, n, k0 + col, op, oq)]);
        const int64_t h = op * p.stride_h - p.pad_h + r, wi = oq * p.stride_w - p.pad_w + s;
        if (c0 + col < C && h >= 0 && h < p.x.h && wi >= 0 && wi < p.x.w) {
          b = to_float(x[offset(p.x, n, c0 + col, h, wi)]);
          if (has_bn) b = prologue(b, sBn[col], true);
        }
      }
      sA[lrow * kLdAT + col] = from_float<T>(a);
      sB[lrow * kLdB + col] = from_float<T>(b);
    }
    __syncthreads();
    mma.step(sA, sB);
  }
  mma.store(sC);
  __syncthreads();
  for (int idx = tid; idx < kTile * kTile; idx += kThreads) {
    const int row = idx / kTile, col = idx % kTile;
    const int64_t k = k0 + row, c = c0 + col;
    if (k < K && c < C) p.partials[((split * K + k) * C + c) * p.r * p.s + tap] = sC[row * kLdC + col];
  }
}

template <typename TX, typename T> struct ConvWgrad {
  static void launch(dim3 grid, cudaStream_t stream, const ConvWgradParams& p) {
    conv_wgrad_kernel<TX, T><<<grid, kThreads, 0, stream>>>(p);
  }
};

}  // namespace

cudaError_t conv_wgrad(const ConvWgradParams& p, DType x_dtype, DType dtype, cudaStream_t stream) {
  dim3 grid(unsigned(cdiv(p.k, kTile)), unsigned(cdiv(p.x.c, kTile)), unsigned(p.r * p.s * p.split));
  return launch_by_dtypes<ConvWgrad>(x_dtype, dtype, grid, stream, p);
}

}  // namespace fused_preact

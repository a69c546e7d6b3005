// Forward unit: y = conv(relu(bn(x)), W) [+ residual], per-tile statistics of y.
// Implicit GEMM: rows = N*P*Q output pixels (kTile = kStatsRows per block), columns = K
// output channels, reduction over (r, s, c). The prologue normalises each x element with
// its channel's BN constants and applies ReLU while staging the A tile in shared memory;
// padding positions stay 0 AFTER the activation. The epilogue adds the residual, stores
// y and writes (count, mean, M2) of the stored values for the next BatchNorm.
#include "launch.h"
#include "tile_mma.cuh"

namespace fused_preact {
namespace {

template <typename TX, typename T>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(ConvFwdParams p) {
  __shared__ __align__(32) T sA[kTile * kLdA];
  __shared__ __align__(32) T sB[kBK * kLdB];
  __shared__ __align__(32) float sC[kTile * kLdC];
  __shared__ ChannelBn sBn[kBK];
  const int tid = threadIdx.x;
  const int64_t C = p.x.c, K = p.k, P = p.y.h, Q = p.y.w;
  const int64_t M = p.x.n * P * Q;
  const int64_t m0 = int64_t(blockIdx.x) * kTile, n0 = int64_t(blockIdx.y) * kTile;
  const bool has_bn = p.bn.mean != nullptr;
  const TX* x = static_cast<const TX*>(p.x.ptr);
  const T* w = static_cast<const T*>(p.w_rsck);
  TileMma<T, wmma::row_major> mma;

  for (int64_t r = 0; r < p.r; ++r) {
    for (int64_t s = 0; s < p.s; ++s) {
      for (int64_t c0 = 0; c0 < C; c0 += kBK) {
        if (has_bn && tid < kBK) sBn[tid] = c0 + tid < C ? channel_bn(p.bn, c0 + tid) : ChannelBn{0.f, 0.f, 0.f};
        __syncthreads();
        // A: kTile rows x kBK channels; lanes walk channels (coalesced in channels_last).
        const int col = tid % kBK;
        const int64_t c = c0 + col;
        for (int row = tid / kBK; row < kTile; row += kThreads / kBK) {
          const int64_t m = m0 + row;
          float v = 0.f;
          if (m < M && c < C) {
            const int64_t n = m / (P * Q), op = (m / Q) % P, oq = m % Q;
            const int64_t h = op * p.stride_h - p.pad_h + r, wi = oq * p.stride_w - p.pad_w + s;
            if (h >= 0 && h < p.x.h && wi >= 0 && wi < p.x.w) {
              v = to_float(x[offset(p.x, n, c, h, wi)]);
              if (has_bn) v = prologue(v, sBn[col], true);
            }
          }
          sA[row * kLdA + col] = from_float<T>(v);
        }
        // B: kBK channels x kTile output channels of the packed weight (K contiguous).
        stage_b_tile(sB, w + ((r * p.s + s) * C + c0) * K + n0, K, C - c0, K - n0);
        __syncthreads();
        mma.step(sA, sB);
        __syncthreads();
      }
    }
  }
  mma.store(sC);
  __syncthreads();

  T* y = static_cast<T*>(p.y.ptr);
  const T* res = static_cast<const T*>(p.residual.ptr);
  for (int idx = tid; idx < kTile * kTile; idx += kThreads) {
    const int row = idx / kTile, col = idx % kTile;
    const int64_t m = m0 + row, k = n0 + col;
    if (m >= M || k >= K) continue;
    const int64_t n = m / (P * Q), op = (m / Q) % P, oq = m % Q;
    float v = sC[row * kLdC + col];
    if (res) v += to_float(res[offset(p.residual, n, k, op, oq)]);
    const T stored = from_float<T>(v);
    y[offset(p.y, n, k, op, oq)] = stored;
    sC[row * kLdC + col] = to_float(stored);  // statistics of what the next BN will read
  }
  __syncthreads();
  if (p.partials == nullptr || tid >= kTile) return;
  const int64_t k = n0 + tid;
  if (k >= K) return;
  const int rows = int(M - m0 < kTile ? M - m0 : kTile);
  float sum = 0.f;
  for (int row = 0; row < rows; ++row) sum += sC[row * kLdC + tid];
  const float mean = sum / rows;
  float m2 = 0.f;
  for (int row = 0; row < rows; ++row) {
    const float d = sC[row * kLdC + tid] - mean;
    m2 += d * d;
  }
  float* out = p.partials + int64_t(blockIdx.x) * 3 * K + k;
  out[0] = float(rows);
  out[K] = mean;
  out[2 * K] = m2;
}

template <typename TX, typename T> struct ConvFwd {
  static void launch(dim3 grid, cudaStream_t stream, const ConvFwdParams& p) {
    conv_fwd_kernel<TX, T><<<grid, kThreads, 0, stream>>>(p);
  }
};

}  // namespace

cudaError_t conv_fwd(const ConvFwdParams& p, DType x_dtype, DType dtype, cudaStream_t stream) {
  static_assert(kTile == kStatsRows, "one statistics tile per block row");
  const int64_t rows = p.x.n * p.y.h * p.y.w;
  dim3 grid(unsigned(cdiv(rows, kTile)), unsigned(cdiv(p.k, kTile)));
  return launch_by_dtypes<ConvFwd>(x_dtype, dtype, grid, stream, p);
}

}  // namespace fused_preact

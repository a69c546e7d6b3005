// Forward unit on sm_80 tensor cores: y = conv(relu(bn(x)), W) [+ residual] and per-tile
// (count, mean, M2) of y, on the CuTe implicit-GEMM core of sm80_gemm.cuh.
//
// GEMM rows are the N*P*Q output pixels, columns the K output channels, the reduction runs
// over (r, s, c) in k-tiles of BK channels of one filter tap. A gathers x per tap (zero-
// filled outside the image: padding), B reads the weight [K, R, S, C] (C contiguous). Each
// thread applies the BN prologue + ReLU to the A vectors it copied, in shared memory, once
// they have landed, so padding stays 0 AFTER the activation. The epilogue adds the
// residual, stores y, and writes the statistics of the stored (rounded) values per 64-row
// tile, as the next BatchNorm will read them.
//
// Needs: x with unit channel stride, every other stride and C multiples of a 16-byte
// vector (8 fp16 / bf16, 4 fp32 elements: channels_last), 16-byte aligned x and weight, fewer than 2^31 elements
// per tensor; the launcher answers cudaErrorNotSupported otherwise.
#pragma once
#include "launch.h"
#include "sm80_gemm.cuh"

namespace fused_preact {
namespace sm80 {

// Dynamic shared memory: the pipeline (reused by the epilogue), then the per-channel BN
// constants (mean, scale, beta) of all C input channels.
template <typename T> int smem_bytes(int64_t channels) {
  return PixelRows<T>::kPipeBytes + int(3 * sizeof(float) * channels);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fprop_kernel(ConvFwdParams p) {
  using Cfg = PixelRows<T>;
  extern __shared__ __align__(128) char smem[];
  const Operands<Cfg> ops(smem);
  float* bn_table = reinterpret_cast<float*>(smem + Cfg::kPipeBytes);  // [3][C]

  const int tid = threadIdx.x;
  const int C = int(p.x.c), K = int(p.k), H = int(p.x.h), W = int(p.x.w);
  const int P = int(p.y.h), Q = int(p.y.w), S = int(p.s);
  const int M = int(p.x.n) * P * Q;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const bool has_bn = p.bn.mean != nullptr;
  const T* x = static_cast<const T*>(p.x.ptr);
  const T* w = static_cast<const T*>(p.w_krsc);

  if (has_bn) {
    for (int c = tid; c < C; c += kThreads) {
      const ChannelBn b = channel_bn(p.bn, c);
      bn_table[c] = b.mean;
      bn_table[C + c] = b.scale;
      bn_table[2 * C + c] = b.beta;
    }
  }

  // This thread's copies: rows line_of(tid) + kLineStep i of A and B, the 16-byte vector
  // vector_of(tid) of each row's BK channels. Per A row: where its output pixel's receptive
  // field starts.
  const int vec = Cfg::vector_of(tid), row0 = Cfg::line_of(tid);
  int a_base[Cfg::kLinesA], a_h0[Cfg::kLinesA], a_w0[Cfg::kLinesA];
  CUTE_UNROLL
  for (int i = 0; i < Cfg::kLinesA; ++i) {
    const int m = m0 + row0 + Cfg::kLineStep * i;
    const int n = m / (P * Q), pq = m % (P * Q), op = pq / Q, oq = pq % Q;
    a_h0[i] = m < M ? op * p.stride_h - p.pad_h : -(1 << 20);  // rows past M: never in the image
    a_w0[i] = oq * p.stride_w - p.pad_w;
    a_base[i] = m < M ? n * int(p.x.sn) + a_h0[i] * int(p.x.sh) + a_w0[i] * int(p.x.sw) : 0;
  }
  const int c_tiles = (C + Cfg::BK - 1) / Cfg::BK;
  const int k_tiles = int(p.r) * S * c_tiles;

  auto tap_of = [&](int kt, int& r, int& s, int& c) {
    const int rs = kt / c_tiles;
    r = rs / S, s = rs % S, c = (kt % c_tiles) * Cfg::BK + vec * Cfg::kVec;
  };
  auto load_tile = [&](int kt, int stage) {
    int r, s, c;
    tap_of(kt, r, s, c);
    const bool c_ok = c < C;
    CUTE_UNROLL
    for (int i = 0; i < Cfg::kLinesA; ++i) {
      const int h = a_h0[i] + r, wi = a_w0[i] + s;
      const bool ok = c_ok && h >= 0 && h < H && wi >= 0 && wi < W;
      copy_vector(ok ? x + a_base[i] + r * int(p.x.sh) + s * int(p.x.sw) + c : x,
                  ops.a_vector(row0 + Cfg::kLineStep * i, vec, stage), ok);
    }
    load_weight_tile(ops, w, K, int(p.r) * S, C, n0, r * S + s, c, stage);
  };
  // relu(bn(.)) of the A vectors this thread copied into `stage`; the zero-filled ones
  // (padding, rows past M, channels past C) stay 0.
  auto activate_tile = [&](int kt, int stage) {
    int r, s, c;
    tap_of(kt, r, s, c);
    if (c >= C) return;
    float mean[Cfg::kVec], scale[Cfg::kVec], beta[Cfg::kVec];
    CUTE_UNROLL
    for (int j = 0; j < Cfg::kVec; ++j) {
      mean[j] = bn_table[c + j];
      scale[j] = bn_table[C + c + j];
      beta[j] = bn_table[2 * C + c + j];
    }
    CUTE_UNROLL
    for (int i = 0; i < Cfg::kLinesA; ++i) {
      const int h = a_h0[i] + r, wi = a_w0[i] + s;
      if (h < 0 || h >= H || wi < 0 || wi >= W) continue;
      T* v = ops.a_vector(row0 + Cfg::kLineStep * i, vec, stage);
      CUTE_UNROLL
      for (int j = 0; j < Cfg::kVec; ++j) {
        const float a = (float(v[j]) - mean[j]) * scale[j] + beta[j];
        v[j] = T(a <= 0.f ? 0.f : a);  // keeps NaN, as F.relu
      }
    }
  };

  auto acc = make_accumulators<Cfg>();
  __syncthreads();  // the BN table
  mainloop(ops, k_tiles, acc, load_tile, [&](int kt, int stage) {
    if (has_bn) activate_tile(kt, stage);
  });
  float* tile = accumulators_to_smem<Cfg>(smem, acc);

  T* y = static_cast<T*>(p.y.ptr);
  const T* res = static_cast<const T*>(p.residual.ptr);
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int row = idx / kBN, col = idx % kBN;
    const int m = m0 + row, k = n0 + col;
    if (m >= M || k >= K) continue;
    const int n = m / (P * Q), pq = m % (P * Q), op = pq / Q, oq = pq % Q;
    float v = tile[row * kLdC + col];
    if (res) v += float(res[offset(p.residual, n, k, op, oq)]);  // in fp32, rounded once
    const T stored = T(v);
    y[offset(p.y, n, k, op, oq)] = stored;
    tile[row * kLdC + col] = float(stored);
  }
  if (p.partials == nullptr) return;
  __syncthreads();
  // Thread t: statistics tile t / 64 of this CTA, column t % 64; two passes (M2 about the
  // tile's own mean: exact for |mean| >> std).
  const int half = tid / kBN, col = tid % kBN, k = n0 + col;
  const int first = m0 + half * kStatsRows;
  const int rows = min(kStatsRows, M - first);
  if (rows <= 0 || k >= K) return;
  const float* column = tile + half * kStatsRows * kLdC + col;
  float sum = 0.f;
  for (int row = 0; row < rows; ++row) sum += column[row * kLdC];
  const float mean = sum / rows;
  float m2 = 0.f;
  for (int row = 0; row < rows; ++row) {
    const float d = column[row * kLdC] - mean;
    m2 += d * d;
  }
  float* out = p.partials + int64_t(first / kStatsRows) * 3 * K + k;
  out[0] = float(rows);
  out[K] = mean;
  out[2 * K] = m2;
}

// Whether fprop_kernel<T> can run p (see the top of this file).
template <typename T> bool fprop_supported(const ConvFwdParams& p) {
  return gathers_vectors<T>(p.x) && aligned16(p.w_krsc) && fits_int32(p.k * p.r * p.s * p.x.c) &&
         fits_int32(p.y.n * p.y.c * p.y.h * p.y.w);
}

template <typename T> cudaError_t launch_fprop(const ConvFwdParams& p, cudaStream_t stream) {
  if (!fprop_supported<T>(p)) return cudaErrorNotSupported;
  const int bytes = smem_bytes<T>(p.x.c);
  cudaError_t err = cudaFuncSetAttribute(fprop_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  const int64_t rows = p.x.n * p.y.h * p.y.w;
  dim3 grid(unsigned((rows + kBM - 1) / kBM), unsigned((p.k + kBN - 1) / kBN));
  fprop_kernel<T><<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm80
}  // namespace fused_preact

// Weight gradient on sm_80 tensor cores with the activation recomputed:
// dW = wgrad(relu(bn(x)), dy), on the CuTe implicit-GEMM core of sm80_gemm.cuh.
//
// Per filter tap (r, s): GEMM rows are 64 output channels k, columns 64 input channels c,
// the reduction runs over the N*P*Q output pixels, split over `split` CTAs so layers with
// few pixels still fill the GPU. Both operands are gathered per pixel as 16-byte vectors of
// channels (dy's k, x's c at the tap's input pixel: zero outside the image), so they are
// MN-major: ldmatrix transposes 16-bit ones, fp32 ones are read element by element. Each thread rebuilds relu(bn(x)) on the x vectors
// it copied, in shared memory, once they have landed (padding stays 0 after the
// activation). fp32 partials [split, K, C, R, S] are summed in a fixed order by the caller
// (deterministic, no atomics), as conv_wgrad's are.
//
// Needs: dy and x with unit channel stride, their other strides and channels multiples of
// a 16-byte vector (8 fp16 / bf16, 4 fp32 elements), 16-byte aligned, of the conv dtype; fewer than 2^31 elements per tensor. The launcher
// answers cudaErrorNotSupported otherwise.
#pragma once
#include "sm80_gemm.cuh"

namespace fused_preact {
namespace sm80 {

template <typename T> using ChannelTile = Config<T, 64, false>;  // rows: output channels

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(ConvWgradParams p) {
  using Cfg = ChannelTile<T>;
  extern __shared__ __align__(128) char smem[];
  __shared__ float bn_table[3][kBN];  // mean, scale, beta of this CTA's input channels
  const Operands<Cfg> ops(smem);
  const int tid = threadIdx.x;
  const int C = int(p.x.c), K = int(p.k), H = int(p.x.h), W = int(p.x.w);
  const int P = int(p.dy.h), Q = int(p.dy.w), R = int(p.r), S = int(p.s);
  const int pixels = int(p.x.n) * P * Q;
  const int k0 = blockIdx.x * Cfg::BM, c0 = blockIdx.y * kBN;
  const int tap = blockIdx.z % (R * S), split = blockIdx.z / (R * S);
  const int r = tap / S, s = tap % S;
  const int begin = split * int(p.rows_per_split);
  const int end = min(pixels, begin + int(p.rows_per_split));
  const int k_tiles = end > begin ? (end - begin + Cfg::BK - 1) / Cfg::BK : 0;
  const bool has_bn = p.bn.mean != nullptr;
  const T* dy = static_cast<const T*>(p.dy.ptr);
  const T* x = static_cast<const T*>(p.x.ptr);

  if (has_bn && tid < kBN && c0 + tid < C) {
    const ChannelBn b = channel_bn(p.bn, c0 + tid);
    bn_table[0][tid] = b.mean;
    bn_table[1][tid] = b.scale;
    bn_table[2][tid] = b.beta;
  }
  __syncthreads();

  // This thread's copies: pixels line_of(tid) + kLineStep i of each k-tile, the 16-byte
  // vector vector_of(tid) of their 64 output channels (dy) and 64 input channels (x).
  const int vec = Cfg::vector_of(tid), line0 = Cfg::line_of(tid);
  const int k = k0 + vec * Cfg::kVec, c = c0 + vec * Cfg::kVec;
  // Where the x vector of pixel l sits for this tap (-1: outside the image or past the split).
  auto x_offset = [&](int l) {
    if (l >= end || c >= C) return -1;
    const int n = l / (P * Q), pq = l % (P * Q), op = pq / Q, oq = pq % Q;
    const int h = op * p.stride_h - p.pad_h + r, wi = oq * p.stride_w - p.pad_w + s;
    if (h < 0 || h >= H || wi < 0 || wi >= W) return -1;
    return n * int(p.x.sn) + h * int(p.x.sh) + wi * int(p.x.sw) + c;
  };
  auto load_tile = [&](int kt, int stage) {
    CUTE_UNROLL
    for (int i = 0; i < Cfg::kLinesA; ++i) {
      const int line = line0 + Cfg::kLineStep * i, l = begin + kt * Cfg::BK + line;
      const bool dy_ok = l < end && k < K;
      const int n = l / (P * Q), pq = l % (P * Q);
      copy_vector(dy_ok ? dy + n * int(p.dy.sn) + (pq / Q) * int(p.dy.sh) + (pq % Q) * int(p.dy.sw) + k : dy,
                  ops.a_vector(line, vec, stage), dy_ok);
      const int at = x_offset(l);
      copy_vector(at >= 0 ? x + at : x, ops.b_vector(line, vec, stage), at >= 0);
    }
  };
  float mean[Cfg::kVec], scale[Cfg::kVec], beta[Cfg::kVec];
  CUTE_UNROLL
  for (int j = 0; j < Cfg::kVec; ++j) {
    const bool ok = has_bn && c + j < C;
    mean[j] = ok ? bn_table[0][vec * Cfg::kVec + j] : 0.f;
    scale[j] = ok ? bn_table[1][vec * Cfg::kVec + j] : 0.f;
    beta[j] = ok ? bn_table[2][vec * Cfg::kVec + j] : 0.f;
  }
  // relu(bn(.)) of the x vectors this thread copied; the zero-filled ones stay 0.
  auto activate_tile = [&](int kt, int stage) {
    CUTE_UNROLL
    for (int i = 0; i < Cfg::kLinesB; ++i) {
      const int line = line0 + Cfg::kLineStep * i;
      if (x_offset(begin + kt * Cfg::BK + line) < 0) continue;
      T* v = ops.b_vector(line, vec, stage);
      CUTE_UNROLL
      for (int j = 0; j < Cfg::kVec; ++j) {
        const float a = (float(v[j]) - mean[j]) * scale[j] + beta[j];
        v[j] = T(a <= 0.f ? 0.f : a);  // keeps NaN, as F.relu
      }
    }
  };

  auto acc = make_accumulators<Cfg>();
  mainloop(ops, k_tiles, acc, load_tile, [&](int kt, int stage) {
    if (has_bn) activate_tile(kt, stage);
  });
  const float* tile = accumulators_to_smem<Cfg>(smem, acc);
  for (int idx = tid; idx < Cfg::BM * kBN; idx += kThreads) {
    const int row = idx / kBN, col = idx % kBN;
    const int kk = k0 + row, cc = c0 + col;
    if (kk < K && cc < C) p.partials[((int64_t(split) * K + kk) * C + cc) * R * S + tap] = tile[row * kLdC + col];
  }
}

// Whether wgrad_kernel<T> can run p (see the top of this file).
template <typename T> bool wgrad_supported(const ConvWgradParams& p) {
  return gathers_vectors<T>(p.dy) && gathers_vectors<T>(p.x) && fits_int32(p.x.n * p.dy.h * p.dy.w);
}

template <typename T> cudaError_t launch_wgrad(const ConvWgradParams& p, cudaStream_t stream) {
  if (!wgrad_supported<T>(p)) return cudaErrorNotSupported;
  const int bytes = ChannelTile<T>::kPipeBytes;
  cudaError_t err = cudaFuncSetAttribute(wgrad_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  dim3 grid(unsigned((p.k + ChannelTile<T>::BM - 1) / ChannelTile<T>::BM), unsigned((p.x.c + kBN - 1) / kBN),
            unsigned(p.r * p.s * p.split));
  wgrad_kernel<T><<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm80
}  // namespace fused_preact

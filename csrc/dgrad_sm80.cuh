// Backward through a unit's input on sm_80 tensor cores: g = (dgrad(dy, W) + g_other) *
// [bn(x) > 0] and per-tile sums of g and g * xhat, on the CuTe implicit-GEMM core of sm80_gemm.cuh.
//
// One stride phase (h % stride_h, w % stride_w) per group of CTAs: only the taps
// r = (h + pad_h) mod stride_h (+ j * stride_h) reach an output pixel, so no zero-inserted
// work is done. GEMM rows are the phase's N*hp*wp input pixels, columns the C input
// channels, the reduction runs over (tap, k) in k-tiles of BK output channels. A gathers
// dy (zero outside it), B reads the weight [C, R, S, K] (K contiguous). The epilogue
// recomputes the ReLU mask from the saved pre-BN x, stores g, and writes per 64-row tile
// the sums of the stored g and of g * xhat (fixed order, no atomics); the tiles are
// conv_dgrad's (dgrad_tiles: phase-major), and one without pixels writes zeros.
//
// Needs: dy with unit channel stride, its other strides and K multiples of a 16-byte
// vector (8 fp16 / bf16, 4 fp32 elements), 16-byte
// aligned; x (and g, g_other) of the conv dtype; the weight 16-byte aligned; fewer than 2^31
// elements per tensor. The launcher answers cudaErrorNotSupported otherwise.
#pragma once
#include "launch.h"
#include "sm80_gemm.cuh"

namespace fused_preact {
namespace sm80 {


template <typename T>
__global__ void __launch_bounds__(kThreads) dgrad_kernel(ConvDgradParams p, int tiles_per_phase) {
  using Cfg = PixelRows<T>;
  extern __shared__ __align__(128) char smem[];
  __shared__ float bn_table[4][kBN];  // mean, invstd, scale (invstd * gamma), beta of this CTA's channels
  const Operands<Cfg> ops(smem);
  const int tid = threadIdx.x;
  const int C = int(p.x.c), K = int(p.k), H = int(p.x.h), W = int(p.x.w);
  const int P = int(p.dy.h), Q = int(p.dy.w), R = int(p.r), S = int(p.s);
  const int sh = p.stride_h, sw = p.stride_w;
  const int ctas_per_phase = (tiles_per_phase + 1) / 2;
  const int phase = blockIdx.x / ctas_per_phase, cta = blockIdx.x % ctas_per_phase;
  const int ph = phase / sw, pw = phase % sw;
  const int hp = ph < H ? (H - ph + sh - 1) / sh : 0, wp = pw < W ? (W - pw + sw - 1) / sw : 0;
  const int rows = int(p.x.n) * hp * wp;
  const int m0 = cta * kBM, n0 = blockIdx.y * kBN;
  const bool has_bn = p.bn.mean != nullptr;
  const T* dy = static_cast<const T*>(p.dy.ptr);
  const T* w = static_cast<const T*>(p.w_crsk);
  const T* x = static_cast<const T*>(p.x.ptr);

  if (has_bn && tid < kBN && n0 + tid < C) {
    const ChannelBn b = channel_bn(p.bn, n0 + tid);
    bn_table[0][tid] = b.mean;
    bn_table[1][tid] = rsqrtf(p.bn.var[n0 + tid] + p.bn.eps);
    bn_table[2][tid] = b.scale;
    bn_table[3][tid] = b.beta;
  }

  // The input pixel (n, h, w) of GEMM row m of this phase.
  auto pixel = [&](int m, int& n, int& h, int& wi) {
    n = m / (hp * wp), h = ph + sh * ((m / wp) % hp), wi = pw + sw * (m % wp);
  };
  // This thread's copies: rows line_of(tid) + kLineStep i of A and B, the 16-byte vector
  // vector_of(tid) of each row's BK output channels. Per A row: its image's dy and (h + pad, w + pad).
  const int vec = Cfg::vector_of(tid), row0 = Cfg::line_of(tid);
  int a_base[Cfg::kLinesA], a_hp[Cfg::kLinesA], a_wp[Cfg::kLinesA];
  CUTE_UNROLL
  for (int i = 0; i < Cfg::kLinesA; ++i) {
    const int m = m0 + row0 + Cfg::kLineStep * i;
    int n = 0, h = 0, wi = 0;
    if (m < rows) pixel(m, n, h, wi);
    a_base[i] = n * int(p.dy.sn);
    a_hp[i] = m < rows ? h + p.pad_h : -(1 << 20);  // rows past the phase: never reach dy
    a_wp[i] = wi + p.pad_w;
  }
  const int r0 = (ph + p.pad_h) % sh, s0 = (pw + p.pad_w) % sw;
  const int taps_r = r0 < R ? (R - r0 + sh - 1) / sh : 0, taps_s = s0 < S ? (S - s0 + sw - 1) / sw : 0;
  const int k_chunks = (K + Cfg::BK - 1) / Cfg::BK;
  const int k_tiles = taps_r * taps_s * k_chunks;

  auto load_tile = [&](int kt, int stage) {
    const int tap = kt / k_chunks;
    const int r = r0 + sh * (tap / taps_s), s = s0 + sw * (tap % taps_s);
    const int k = (kt % k_chunks) * Cfg::BK + vec * Cfg::kVec;
    const bool k_ok = k < K;
    CUTE_UNROLL
    for (int i = 0; i < Cfg::kLinesA; ++i) {
      const int hh = a_hp[i] - r, ww = a_wp[i] - s;  // multiples of the strides in this phase
      const int op = hh / sh, oq = ww / sw;
      const bool ok = k_ok && hh >= 0 && op < P && ww >= 0 && oq < Q;
      copy_vector(ok ? dy + a_base[i] + op * int(p.dy.sh) + oq * int(p.dy.sw) + k : dy,
                  ops.a_vector(row0 + Cfg::kLineStep * i, vec, stage), ok);
    }
    load_weight_tile(ops, w, C, R * S, K, n0, r * S + s, k, stage);
  };

  auto acc = make_accumulators<Cfg>();
  mainloop(ops, k_tiles, acc, load_tile, [](int, int) {});
  float* tile = accumulators_to_smem<Cfg>(smem, acc);  // (its barrier also publishes bn_table)

  T* g = static_cast<T*>(p.g.ptr);
  const T* g_other = static_cast<const T*>(p.g_other.ptr);
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int row = idx / kBN, col = idx % kBN;
    const int m = m0 + row, c = n0 + col;
    if (m >= rows || c >= C) continue;
    int n, h, wi;
    pixel(m, n, h, wi);
    float v = tile[row * kLdC + col];
    if (g_other) v += float(g_other[offset(p.g_other, n, c, h, wi)]);
    if (has_bn && (float(x[offset(p.x, n, c, h, wi)]) - bn_table[0][col]) * bn_table[2][col] + bn_table[3][col] <= 0.f)
      v = 0.f;  // the ReLU was closed there
    const T stored = T(v);
    g[offset(p.g, n, c, h, wi)] = stored;
    tile[row * kLdC + col] = float(stored);  // sums of what the BN backward will read
  }
  if (!has_bn) return;
  __syncthreads();
  // Thread t: sum tile t / 64 of this CTA, channel t % 64.
  const int half = tid / kBN, col = tid % kBN, c = n0 + col;
  const int tile_in_phase = 2 * cta + half;
  if (tile_in_phase >= tiles_per_phase || c >= C) return;
  const int first = m0 + half * kStatsRows;
  const int count = max(0, min(kStatsRows, rows - first));
  float sum_g = 0.f, sum_gx = 0.f;
  for (int row = 0; row < count; ++row) {
    int n, h, wi;
    pixel(first + row, n, h, wi);
    const float gv = tile[(half * kStatsRows + row) * kLdC + col];
    sum_g += gv;
    sum_gx += gv * (float(x[offset(p.x, n, c, h, wi)]) - bn_table[0][col]) * bn_table[1][col];
  }
  float* out = p.sums + (int64_t(phase) * tiles_per_phase + tile_in_phase) * 2 * C + c;
  out[0] = sum_g;
  out[C] = sum_gx;
}

// Whether dgrad_kernel<T> can run p (see the top of this file).
template <typename T> bool dgrad_supported(const ConvDgradParams& p) {
  return gathers_vectors<T>(p.dy) && aligned16(p.w_crsk) && fits_int32(p.k * p.r * p.s * p.x.c) &&
         fits_int32(p.x.n * p.x.c * p.x.h * p.x.w) && fits_int32(p.x.n * p.x.sn) && fits_int32(p.g.n * p.g.sn) &&
         fits_int32(p.g_other.n * p.g_other.sn);
}

template <typename T> cudaError_t launch_dgrad(const ConvDgradParams& p, cudaStream_t stream) {
  if (!dgrad_supported<T>(p)) return cudaErrorNotSupported;
  const int bytes = PixelRows<T>::kPipeBytes;
  cudaError_t err = cudaFuncSetAttribute(dgrad_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  const int64_t phases = int64_t(p.stride_h) * p.stride_w;
  const int64_t tiles_per_phase = dgrad_tiles(p.x.n, p.x.h, p.x.w, p.stride_h, p.stride_w) / phases;
  dim3 grid(unsigned(phases * ((tiles_per_phase + 1) / 2)), unsigned((p.x.c + kBN - 1) / kBN));
  dgrad_kernel<T><<<grid, kThreads, bytes, stream>>>(p, int(tiles_per_phase));
  return cudaGetLastError();
}

}  // namespace sm80
}  // namespace fused_preact

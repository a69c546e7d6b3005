// Forward unit on sm_80 tensor cores, written with CuTe (CUTLASS 3.x):
// y = conv(relu(bn(x)), W) [+ residual] and per-tile (count, mean, M2) of y.
//
// Implicit GEMM: rows M = N*P*Q output pixels, columns the K output channels, reduction
// over (r, s, c) in k-tiles of kBK channels of one filter tap. A (x gathered per tap) and
// B (the weight [K, R, S, C], C contiguous) travel global -> shared by cp.async (16-byte
// vectors, zero-filled outside the image: padding) through a kStages-deep pipeline; each
// thread then applies the BN prologue + ReLU to the A vectors IT copied, in shared memory,
// once its copies have landed (its own cp.async.wait, no barrier needed for that), so
// padding stays 0 AFTER the activation; ldmatrix moves the tiles to registers for
// mma.sync m16n8k16 (fp32 accumulators). The epilogue adds the residual, stores y, and
// writes the statistics of the stored (rounded) values per 64-row tile, as the next
// BatchNorm will read them.
//
// Needs: x with unit channel stride and every other stride a multiple of 8 elements
// (channels_last), C % 8 == 0, 16-byte aligned x and weight, fewer than 2^31 elements
// per tensor; the launcher answers cudaErrorNotSupported otherwise.
#pragma once
#include <cute/tensor.hpp>

#include "common.cuh"
#include "launch.h"

namespace fused_preact {
namespace sm80 {

using namespace cute;

constexpr int kBM = 128;    // output pixels per CTA (two statistics tiles)
constexpr int kBN = 64;     // output channels per CTA
constexpr int kBK = 64;     // input channels per k-tile (one filter tap)
constexpr int kStages = 3;  // cp.async pipeline depth
constexpr int kThreads = 128;
constexpr int kVec = 8;     // elements per 16-byte cp.async vector
constexpr int kLdC = kBN + 4;  // fp32 epilogue tile row pitch (bank spread)
static_assert(kBM == 2 * kStatsRows, "the epilogue writes two statistics tiles per CTA");

// Rows of A and B each thread copies: threads laid out 16 rows x 8 vectors (k-major).
constexpr int kRowsA = kBM / 16;
constexpr int kRowsB = kBN / 16;

template <typename T> struct MmaAtom;
template <> struct MmaAtom<half_t> { using type = SM80_16x8x16_F32F16F16F32_TN; };
template <> struct MmaAtom<bfloat16_t> { using type = SM80_16x8x16_F32BF16BF16F32_TN; };

template <typename T> struct Config {
  // 128-byte rows (64 elements) swizzled for conflict-free ldmatrix and 16-byte stores.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{},
                                        Layout<Shape<_8, Shape<_8, _8>>, Stride<_8, Stride<_1, _64>>>{}));
  using SmemA = decltype(tile_to_shape(SmemAtom{}, make_shape(Int<kBM>{}, Int<kBK>{}, Int<kStages>{})));
  using SmemB = decltype(tile_to_shape(SmemAtom{}, make_shape(Int<kBN>{}, Int<kBK>{}, Int<kStages>{})));
  // 2 x 2 warps; the 32 x 32 x 16 permutation lets ldmatrix.x4 feed B too.
  using Mma = decltype(make_tiled_mma(typename MmaAtom<T>::type{}, Layout<Shape<_2, _2>>{}, Tile<_32, _32, _16>{}));
  using LoadS2R = Copy_Atom<SM75_U32x4_LDSM_N, T>;
  static constexpr int kPipeBytes = int(sizeof(T)) * (cosize_v<SmemA> + cosize_v<SmemB>);
  static constexpr int kEpilogueBytes = int(sizeof(float)) * kBM * kLdC;
  static_assert(kEpilogueBytes <= kPipeBytes, "the epilogue tile reuses the pipeline's shared memory");
};

// Dynamic shared memory: the pipeline (reused by the epilogue), then the per-channel BN
// constants (mean, scale, beta) of all C input channels.
template <typename T> int smem_bytes(int64_t channels) {
  return Config<T>::kPipeBytes + int(3 * sizeof(float) * channels);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fprop_kernel(ConvFwdParams p) {
  using Cfg = Config<T>;
  extern __shared__ __align__(128) char smem[];
  T* smem_a = reinterpret_cast<T*>(smem);
  T* smem_b = smem_a + cosize_v<typename Cfg::SmemA>;
  float* bn_table = reinterpret_cast<float*>(smem + Cfg::kPipeBytes);  // [3][C]
  Tensor sA = make_tensor(make_smem_ptr(smem_a), typename Cfg::SmemA{});  // (BM, BK, stages)
  Tensor sB = make_tensor(make_smem_ptr(smem_b), typename Cfg::SmemB{});  // (BN, BK, stages)

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

  // This thread's copies: rows tid / 8 + 16 i of A and B, the 16-byte vector tid % 8 of
  // each row's kBK channels. Per A row: where its output pixel's receptive field starts.
  const int vec = tid % 8, row0 = tid / 8;
  int a_base[kRowsA], a_h0[kRowsA], a_w0[kRowsA];
  CUTE_UNROLL
  for (int i = 0; i < kRowsA; ++i) {
    const int m = m0 + row0 + 16 * i;
    const int n = m / (P * Q), pq = m % (P * Q), op = pq / Q, oq = pq % Q;
    a_h0[i] = m < M ? op * p.stride_h - p.pad_h : -(1 << 20);  // rows past M: never in the image
    a_w0[i] = oq * p.stride_w - p.pad_w;
    a_base[i] = m < M ? n * int(p.x.sn) + a_h0[i] * int(p.x.sh) + a_w0[i] * int(p.x.sw) : 0;
  }
  const int c_tiles = (C + kBK - 1) / kBK;
  const int k_tiles = int(p.r) * S * c_tiles;
  const int ktaps = int(p.r) * S * C;  // weight row length

  auto tap_of = [&](int kt, int& r, int& s, int& c) {
    const int rs = kt / c_tiles;
    r = rs / S, s = rs % S, c = (kt % c_tiles) * kBK + vec * kVec;
  };
  auto load_tile = [&](int kt, int stage) {
    int r, s, c;
    tap_of(kt, r, s, c);
    const bool c_ok = c < C;
    CUTE_UNROLL
    for (int i = 0; i < kRowsA; ++i) {
      const int h = a_h0[i] + r, wi = a_w0[i] + s;
      const bool ok = c_ok && h >= 0 && h < H && wi >= 0 && wi < W;
      const T* src = ok ? x + a_base[i] + r * int(p.x.sh) + s * int(p.x.sw) + c : x;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
          *reinterpret_cast<uint128_t*>(&sA(row0 + 16 * i, vec * kVec, stage)), ok);
    }
    CUTE_UNROLL
    for (int i = 0; i < kRowsB; ++i) {
      const int k = n0 + row0 + 16 * i;
      const bool ok = c_ok && k < K;
      const T* src = ok ? w + int64_t(k) * ktaps + (r * S + s) * C + c : w;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
          *reinterpret_cast<uint128_t*>(&sB(row0 + 16 * i, vec * kVec, stage)), ok);
    }
  };
  // relu(bn(.)) of the A vectors this thread copied into `stage`; the zero-filled ones
  // (padding, rows past M, channels past C) stay 0.
  auto activate_tile = [&](int kt, int stage) {
    int r, s, c;
    tap_of(kt, r, s, c);
    if (c >= C) return;
    float mean[kVec], scale[kVec], beta[kVec];
    CUTE_UNROLL
    for (int j = 0; j < kVec; ++j)
      mean[j] = bn_table[c + j], scale[j] = bn_table[C + c + j], beta[j] = bn_table[2 * C + c + j];
    CUTE_UNROLL
    for (int i = 0; i < kRowsA; ++i) {
      const int h = a_h0[i] + r, wi = a_w0[i] + s;
      if (h < 0 || h >= H || wi < 0 || wi >= W) continue;
      T* v = &sA(row0 + 16 * i, vec * kVec, stage);
      CUTE_UNROLL
      for (int j = 0; j < kVec; ++j) {
        const float a = (float(v[j]) - mean[j]) * scale[j] + beta[j];
        v[j] = T(a <= 0.f ? 0.f : a);  // keeps NaN, as F.relu
      }
    }
  };

  typename Cfg::Mma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // (MMA, MMA_M, MMA_N) fp32
  clear(acc);
  Tensor rA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor rB = thr_mma.partition_fragment_B(sB(_, _, 0));
  auto s2r_a = make_tiled_copy_A(typename Cfg::LoadS2R{}, mma);
  auto s2r_b = make_tiled_copy_B(typename Cfg::LoadS2R{}, mma);
  auto thr_s2r_a = s2r_a.get_slice(tid);
  auto thr_s2r_b = s2r_b.get_slice(tid);
  Tensor sA_view = thr_s2r_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, stages)
  Tensor sB_view = thr_s2r_b.partition_S(sB);
  Tensor rA_view = thr_s2r_a.retile_D(rA);
  Tensor rB_view = thr_s2r_b.retile_D(rB);

  __syncthreads();  // the BN table
  CUTE_UNROLL
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < k_tiles) load_tile(stage, stage);
    cp_async_fence();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt % kStages;
    cp_async_wait<kStages - 2>();  // this thread's copies of tile kt have landed
    if (has_bn) activate_tile(kt, stage);
    __syncthreads();  // every thread's tile kt is in place; tile kt - 1's stage is free
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_tile(next, next % kStages);
    cp_async_fence();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(rA); ++kb) {
      copy(s2r_a, sA_view(_, _, kb, stage), rA_view(_, _, kb));
      copy(s2r_b, sB_view(_, _, kb, stage), rB_view(_, _, kb));
      gemm(mma, rA(_, _, kb), rB(_, _, kb), acc);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the epilogue tile

  float* tile = reinterpret_cast<float*>(smem);
  Tensor sC = make_tensor(make_smem_ptr(tile), make_layout(make_shape(Int<kBM>{}, Int<kBN>{}),
                                                           make_stride(Int<kLdC>{}, Int<1>{})));
  Tensor sC_view = thr_mma.partition_C(sC);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) sC_view(i) = acc(i);
  __syncthreads();

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
inline bool supported(const ConvFwdParams& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  const int64_t limit = int64_t(1) << 31;
  return p.x.sc == 1 && p.x.c % kVec == 0 && p.x.sw % kVec == 0 && p.x.sh % kVec == 0 && p.x.sn % kVec == 0 &&
         aligned(p.x.ptr) && p.w_krsc != nullptr && aligned(p.w_krsc) &&
         p.x.n * p.x.sn < limit && p.k * p.r * p.s * p.x.c < limit && p.y.n * p.y.c * p.y.h * p.y.w < limit;
}

template <typename T> cudaError_t launch_fprop(const ConvFwdParams& p, cudaStream_t stream) {
  if (!supported(p)) return cudaErrorNotSupported;
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

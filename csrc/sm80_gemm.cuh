// The implicit-GEMM core the sm_80 tensor-core kernels share (fprop_sm80.cuh,
// dgrad_sm80.cuh, wgrad_sm80.cuh), written with CuTe (CUTLASS 3.x): a BM x kBN fp32
// accumulator tile per CTA, over k-tiles of BK reduction elements whose A (BM) and B (kBN)
// operands the kernel gathers itself (its load_tile) as 16-byte vectors: along the
// reduction (K-major: fprop, dgrad) or along the rows (MN-major: wgrad, whose reduction
// runs over pixels while channels are contiguous). fp16 / bf16 run mma.sync m16n8k16;
// fp32 runs as tf32 (m16n8k8, operands rounded to nearest, as the WMMA kernels and
// nn.Conv2d with torch.backends.cudnn.allow_tf32 do).
//
// Pipeline: kStages shared-memory stages filled by cp.async (16-byte vectors, zero-filled
// where the kernel says the vector is outside its tensor). Each thread copies the vector
// Cfg::vector_of(tid) of the lines Cfg::line_of(tid) + Cfg::kLineStep * i (a line: a row of
// a K-major operand, a reduction column of an MN-major one); once its own copies of a tile
// have landed (cp.async.wait, which makes them visible to the copying thread) a kernel may
// transform them in place (its prepare_tile, e.g. the BN prologue), then a barrier
// publishes the tile and ldmatrix (transposing 16-bit MN-major operands; 32-bit ones are
// read element by element, which ldmatrix cannot transpose) feeds mma.sync from it. The
// epilogue gets the tile in shared memory.
#pragma once
#include <cute/tensor.hpp>

#include "common.cuh"
#include "launch.h"

namespace fused_preact {
namespace sm80 {

using namespace cute;

constexpr int kBN = 64;        // GEMM columns per CTA
constexpr int kStages = 3;     // cp.async pipeline depth
constexpr int kThreads = 128;  // 4 warps, 2 x 2 over the tile
constexpr int kLdC = kBN + 4;  // row pitch of the fp32 epilogue tile (spreads the banks)

// The tensor-core instruction for storage type T, the type it reads, and how an MN-major
// operand gets from shared memory to its registers.
template <typename T> struct MmaFor;
template <> struct MmaFor<half_t> {
  using Atom = SM80_16x8x16_F32F16F16F32_TN;
  using Operand = half_t;
  using MnMajorLoad = SM75_U16x8_LDSM_T;
};
template <> struct MmaFor<bfloat16_t> {
  using Atom = SM80_16x8x16_F32BF16BF16F32_TN;
  using Operand = bfloat16_t;
  using MnMajorLoad = SM75_U16x8_LDSM_T;
};
template <> struct MmaFor<float> {
  using Atom = SM80_16x8x8_F32TF32TF32F32_TN;
  using Operand = tfloat32_t;  // float bits, rounded in registers (round_to_tf32)
  using MnMajorLoad = UniversalCopy<tfloat32_t>;
};

// T: half_t / bfloat16_t / float; BM: GEMM rows per CTA; KMajor: operands contiguous
// along the reduction.
template <typename T_, int BM_, bool KMajor_> struct Config {
  using T = T_;
  using Operand = typename MmaFor<T>::Operand;
  static constexpr int BM = BM_;
  static constexpr bool KMajor = KMajor_;
  static_assert(KMajor || BM == kBN, "MN-major lines hold BM (A) or kBN (B) elements alike");
  static constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte cp.async vector
  static constexpr int BK = 8 * kVec;                // reduction elements per k-tile (128-byte K-major lines)
  // Threads copy lines of kLineElems elements, kVecsPerLine threads to a line.
  static constexpr int kLineElems = KMajor ? BK : BM;
  static constexpr int kVecsPerLine = kLineElems / kVec;
  static constexpr int kLineStep = kThreads / kVecsPerLine;  // lines per pass of all threads
  static constexpr int kLinesA = (KMajor ? BM : BK) / kLineStep;  // lines of A (of B) each thread copies
  static constexpr int kLinesB = (KMajor ? kBN : BK) / kLineStep;
  CUTE_HOST_DEVICE static int vector_of(int tid) { return tid % kVecsPerLine; }
  CUTE_HOST_DEVICE static int line_of(int tid) { return tid / kVecsPerLine; }
  // 128-byte atoms (8 vectors x 8 lines) swizzled for conflict-free ldmatrix and 16-byte stores.
  static constexpr int kVecBits = kVec == 8 ? 3 : 2;  // log2(kVec): the swizzle moves whole vectors
  using SmemAtom = std::conditional_t<
      KMajor,
      decltype(composition(Swizzle<3, kVecBits, 3>{},
                           Layout<Shape<_8, Shape<Int<kVec>, _8>>, Stride<Int<kVec>, Stride<_1, Int<8 * kVec>>>>{})),
      decltype(composition(Swizzle<3, kVecBits, 3>{}, Layout<Shape<Int<8 * kVec>, _8>, Stride<_1, Int<8 * kVec>>>{}))>;
  using SmemA = decltype(tile_to_shape(SmemAtom{}, make_shape(Int<BM>{}, Int<BK>{}, Int<kStages>{})));
  using SmemB = decltype(tile_to_shape(SmemAtom{}, make_shape(Int<kBN>{}, Int<BK>{}, Int<kStages>{})));
  // 2 x 2 warps; the 32 x 32 x (2 kVec) permutation lets ldmatrix.x4 feed B too.
  using Mma = decltype(make_tiled_mma(typename MmaFor<T>::Atom{}, Layout<Shape<_2, _2>>{},
                                      Tile<_32, _32, Int<2 * kVec>>{}));
  using LoadS2R =
      Copy_Atom<std::conditional_t<KMajor, SM75_U32x4_LDSM_N, typename MmaFor<T>::MnMajorLoad>, Operand>;
  static constexpr int kPipeBytes = int(sizeof(T)) * (cosize_v<SmemA> + cosize_v<SmemB>);
  static_assert(kLinesA * kLineStep == (KMajor ? BM : BK) && kLinesB * kLineStep == (KMajor ? kBN : BK),
                "the threads' copies cover the tiles");
  static_assert(int(sizeof(float)) * BM * kLdC <= kPipeBytes, "the epilogue tile reuses the pipeline's memory");
};

// fprop and dgrad: GEMM rows are pixels, 128 per CTA (two statistics tiles), K-major operands.
constexpr int kBM = 128;
static_assert(kBM == 2 * kStatsRows, "the pixel-row kernels write two statistics tiles per CTA");
template <typename T> using PixelRows = Config<T, kBM, true>;

// The pipeline's operand tiles in dynamic shared memory `smem`.
template <typename Cfg> struct Operands {
  using T = typename Cfg::T;
  T* a;
  T* b;
  CUTE_DEVICE explicit Operands(char* smem)
      : a(reinterpret_cast<T*>(smem)), b(reinterpret_cast<T*>(smem) + cosize_v<typename Cfg::SmemA>) {}
  // Where vector `vec` of line `line` of `stage` goes (kVec contiguous elements: the
  // swizzle moves 16-byte chunks only).
  CUTE_DEVICE T* a_vector(int line, int vec, int stage) const {
    return vector(make_tensor(make_smem_ptr(a), typename Cfg::SmemA{}), line, vec, stage);
  }
  CUTE_DEVICE T* b_vector(int line, int vec, int stage) const {
    return vector(make_tensor(make_smem_ptr(b), typename Cfg::SmemB{}), line, vec, stage);
  }

 private:
  template <typename Tile> CUTE_DEVICE static T* vector(Tile&& tile, int line, int vec, int stage) {
    return Cfg::KMajor ? &tile(line, vec * Cfg::kVec, stage) : &tile(vec * Cfg::kVec, line, stage);
  }
};

inline bool aligned16(const void* ptr) { return ptr != nullptr && reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }
inline bool fits_int32(int64_t elements) { return elements < (int64_t(1) << 31); }  // the kernels' offsets

// Whether a kernel can gather 16-byte vectors of channels (T elements) from activation a:
// unit channel stride, the other strides and the channels multiples of a vector, 16-byte
// aligned, and 32-bit offsets enough.
template <typename T> bool gathers_vectors(const Act& a) {
  constexpr int vec = 16 / int(sizeof(T));
  return a.sc == 1 && a.c % vec == 0 && a.sw % vec == 0 && a.sh % vec == 0 && a.sn % vec == 0 &&
         aligned16(a.ptr) && fits_int32(a.n * a.sn);
}

// cp.async of the 16-byte vector at src into dst, or 16 zero bytes where !ok (src unread).
template <typename T> CUTE_DEVICE void copy_vector(const T* src, T* dst, bool ok) {
  SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                   *reinterpret_cast<uint128_t*>(dst), ok);
}

// B from a packed weight [rows][R * S][depth] (depth contiguous): this thread's vectors of
// rows n0 + line + kLineStep i at filter tap `tap`, reduction elements from `first` (the
// thread's vector; zero past `depth` or `rows`). K-major configs only.
template <typename Cfg>
CUTE_DEVICE void load_weight_tile(const Operands<Cfg>& ops, const typename Cfg::T* w, int rows, int taps, int depth,
                                  int n0, int tap, int first, int stage) {
  static_assert(Cfg::KMajor, "weight rows are gathered along the reduction");
  const int vec = Cfg::vector_of(threadIdx.x), line0 = Cfg::line_of(threadIdx.x);
  const typename Cfg::T* at_tap = w + tap * depth + first;
  CUTE_UNROLL
  for (int i = 0; i < Cfg::kLinesB; ++i) {
    const int line = line0 + Cfg::kLineStep * i, row = n0 + line;
    const bool ok = first < depth && row < rows;
    copy_vector(ok ? at_tap + int64_t(row) * (taps * depth) : w, ops.b_vector(line, vec, stage), ok);
  }
}

// Round float bits loaded as tf32 to nearest (cvt.rna; NaN stays NaN): the tensor cores
// would otherwise drop the low 13 bits, a truncation biased towards zero.
template <typename Fragment> CUTE_DEVICE void round_to_tf32(Fragment&& fragment) {
  CUTE_UNROLL
  for (int i = 0; i < size(fragment); ++i) {
    uint32_t bits;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(__uint_as_float(fragment(i).raw())));
    fragment(i) = tfloat32_t::bitcast(bits);
  }
}

// acc (the CTA's BM x kBN tile, fp32) = sum over k_tiles of A * B^T. load_tile(kt, stage)
// issues this thread's cp.async copies of k-tile kt; prepare_tile(kt, stage) transforms
// them once landed. Returns with the pipeline drained and every thread past it.
template <typename Cfg, typename Acc, typename LoadTile, typename PrepareTile>
CUTE_DEVICE void mainloop(const Operands<Cfg>& ops, int k_tiles, Acc& acc, LoadTile load_tile, PrepareTile prepare_tile) {
  using Operand = typename Cfg::Operand;
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<Operand*>(ops.a)), typename Cfg::SmemA{});  // (BM, BK, stages)
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<Operand*>(ops.b)), typename Cfg::SmemB{});  // (BN, BK, stages)
  typename Cfg::Mma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor rA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor rB = thr_mma.partition_fragment_B(sB(_, _, 0));
  auto s2r_a = make_tiled_copy_A(typename Cfg::LoadS2R{}, mma);
  auto s2r_b = make_tiled_copy_B(typename Cfg::LoadS2R{}, mma);
  auto thr_s2r_a = s2r_a.get_slice(threadIdx.x);
  auto thr_s2r_b = s2r_b.get_slice(threadIdx.x);
  Tensor sA_view = thr_s2r_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, stages)
  Tensor sB_view = thr_s2r_b.partition_S(sB);
  Tensor rA_view = thr_s2r_a.retile_D(rA);
  Tensor rB_view = thr_s2r_b.retile_D(rB);
  CUTE_STATIC_ASSERT_V(size<2>(rA) == size<2>(rA_view) && size<2>(rB) == size<2>(rB_view));  // k-blocks
  CUTE_STATIC_ASSERT_V(size<1>(acc) == size<1>(rA) && size<2>(acc) == size<1>(rB));  // MMA_M, MMA_N

  clear(acc);
  CUTE_UNROLL
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < k_tiles) load_tile(stage, stage);
    cp_async_fence();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int stage = kt % kStages;
    cp_async_wait<kStages - 2>();  // this thread's copies of tile kt have landed
    prepare_tile(kt, stage);
    __syncthreads();  // every thread's tile kt is in place; tile kt - 1's stage is free
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_tile(next, next % kStages);
    cp_async_fence();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(rA); ++kb) {
      copy(s2r_a, sA_view(_, _, kb, stage), rA_view(_, _, kb));
      copy(s2r_b, sB_view(_, _, kb, stage), rB_view(_, _, kb));
      if constexpr (std::is_same_v<Operand, tfloat32_t>) {
        round_to_tf32(rA(_, _, kb));
        round_to_tf32(rB(_, _, kb));
      }
      gemm(mma, rA(_, _, kb), rB(_, _, kb), acc);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory may be reused
}

// The CTA's accumulator tile (from partition_fragment_C(Mma, (BM, kBN))).
template <typename Cfg> CUTE_DEVICE auto make_accumulators() {
  return partition_fragment_C(typename Cfg::Mma{}, Shape<Int<Cfg::BM>, Int<kBN>>{});
}

// The accumulators written to shared memory as a BM x kBN fp32 tile of row pitch kLdC
// (over the pipeline's memory, after mainloop), visible to every thread on return.
template <typename Cfg, typename Acc> CUTE_DEVICE float* accumulators_to_smem(char* smem, const Acc& acc) {
  float* tile = reinterpret_cast<float*>(smem);
  Tensor sC = make_tensor(make_smem_ptr(tile), make_layout(make_shape(Int<Cfg::BM>{}, Int<kBN>{}),
                                                           make_stride(Int<kLdC>{}, Int<1>{})));
  Tensor sC_view = typename Cfg::Mma{}.get_slice(threadIdx.x).partition_C(sC);
  CUTE_STATIC_ASSERT_V(shape(sC_view) == shape(acc));  // element i of both is the same (row, column)
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) sC_view(i) = acc(i);
  __syncthreads();
  return tile;
}

}  // namespace sm80
}  // namespace fused_preact

// A 64 x 64 fp32 tile C += A[64 x 32] * B[32 x 64] on tensor cores (WMMA, which lowers to
// mma.sync on sm_80 / sm_90), from shared memory, by 4 warps of 32 x 32 each.
// fp16 / bf16 operands use m16n16k16; fp32 operands run as tf32 (m16n16k8), like
// nn.Conv2d with torch.backends.cudnn.allow_tf32.
#pragma once
#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace fused_preact {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;            // rows and columns of the output tile
constexpr int kBK = 32;              // reduction depth per shared-memory stage
constexpr int kThreads = 128;        // 4 warps
constexpr int kLdA = kBK + 8;        // A row-major [kTile][kLdA] (padding against bank conflicts)
constexpr int kLdAT = kTile + 8;     // A column-major, stored [kBK][kLdAT]
constexpr int kLdB = kTile + 8;      // B row-major [kBK][kLdB]
constexpr int kLdC = kTile + 4;      // C row-major [kTile][kLdC], fp32

template <typename T> struct MmaShape {
  static constexpr int K = 16;
  using Op = T;  // fragment element type
  template <typename Frag> __device__ static void round(Frag&) {}
};
template <> struct MmaShape<float> {
  static constexpr int K = 8;
  using Op = wmma::precision::tf32;
  template <typename Frag> __device__ static void round(Frag& f) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
  }
};

// ALayout: wmma::row_major (A stored [kTile][kLdA]) or wmma::col_major (stored [kBK][kLdAT]).
template <typename T, typename ALayout>
struct TileMma {
  using Shape = MmaShape<T>;
  static constexpr bool kColMajorA = std::is_same<ALayout, wmma::col_major>::value;
  wmma::fragment<wmma::accumulator, 16, 16, Shape::K, float> acc[2][2];
  int wm, wn;  // this warp's 32 x 32 quadrant

  __device__ TileMma() : wm(threadIdx.x / 32 / 2), wn(threadIdx.x / 32 % 2) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  // acc += A * B over one kBK stage.
  __device__ void step(const T* sA, const T* sB) {
    for (int kk = 0; kk < kBK; kk += Shape::K) {
      wmma::fragment<wmma::matrix_a, 16, 16, Shape::K, typename Shape::Op, ALayout> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, Shape::K, typename Shape::Op, wmma::row_major> b[2];
      for (int i = 0; i < 2; ++i) {
        const int m = wm * 32 + i * 16;
        if (kColMajorA) wmma::load_matrix_sync(a[i], sA + kk * kLdAT + m, kLdAT);
        else wmma::load_matrix_sync(a[i], sA + m * kLdA + kk, kLdA);
        Shape::round(a[i]);
      }
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(b[j], sB + kk * kLdB + wn * 32 + j * 16, kLdB);
        Shape::round(b[j]);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ void store(float* sC) const {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(sC + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC,
                                wmma::mem_row_major);
  }
};

// Stage a kBK x kTile B tile from a row-major matrix: sB[i][j] = src[i * ld + j] for
// i < rows, j < cols (src already at the tile's corner), zero elsewhere.
template <typename T>
__device__ void stage_b_tile(T* sB, const T* src, int64_t ld, int64_t rows, int64_t cols) {
  for (int idx = threadIdx.x; idx < kBK * kTile; idx += kThreads) {
    const int i = idx / kTile, j = idx % kTile;
    sB[i * kLdB + j] = (i < rows && j < cols) ? src[i * ld + j] : from_float<T>(0.f);
  }
}

// Launch a kernel template for the (x dtype, conv dtype) pairs the ops allow: equal
// dtypes, or float32 x with a float16 / bfloat16 conv (autocast).
template <template <typename, typename> class Kernel, typename Params>
cudaError_t launch_by_dtypes(DType x_dtype, DType dtype, dim3 grid, cudaStream_t stream, const Params& p) {
  if (x_dtype == dtype) {
    switch (dtype) {
      case DType::f32: Kernel<float, float>::launch(grid, stream, p); break;
      case DType::f16: Kernel<__half, __half>::launch(grid, stream, p); break;
      case DType::bf16: Kernel<__nv_bfloat16, __nv_bfloat16>::launch(grid, stream, p); break;
    }
  } else if (x_dtype == DType::f32 && dtype == DType::f16) {
    Kernel<float, __half>::launch(grid, stream, p);
  } else if (x_dtype == DType::f32 && dtype == DType::bf16) {
    Kernel<float, __nv_bfloat16>::launch(grid, stream, p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fused_preact

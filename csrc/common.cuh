// Device helpers shared by the kernels: dtype conversion, BN prologue, activation indexing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "params.h"

namespace fused_preact {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element offset of (n, c, h, w) in an activation (64-bit: tensors may pass 2^31 elements).
__device__ __forceinline__ int64_t offset(const Act& a, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * a.sn + c * a.sc + h * a.sh + w * a.sw;
}

// Per-channel constants of the BN prologue: bn(x) = (x - mean) * scale + beta.
struct ChannelBn {
  float mean, scale, beta;
};

__device__ __forceinline__ ChannelBn channel_bn(const BnArgs& bn, int64_t c) {
  float invstd = rsqrtf(bn.var[c] + bn.eps);
  float gamma = bn.gamma ? bn.gamma[c] : 1.f;
  return {bn.mean[c], invstd * gamma, bn.beta ? bn.beta[c] : 0.f};
}

// relu(bn(v)), or v itself without a prologue; (v - mean) first: exact for |mean| >> std.
__device__ __forceinline__ float prologue(float v, const ChannelBn& b, bool has_bn) {
  if (!has_bn) return v;
  const float a = (v - b.mean) * b.scale + b.beta;
  return a <= 0.f ? 0.f : a;  // keeps NaN, as F.relu (fmaxf would drop it)
}

}  // namespace fused_preact

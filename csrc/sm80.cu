// conv_fwd_sm80 / conv_dgrad_sm80 / conv_wgrad_sm80: the dtype switches over the sm_80
// tensor-core kernels (*_sm80.cuh), instantiated per dtype in *_sm80_{f16,bf16,f32}.cu
// (float32 runs as tf32).
#include <cute/numeric/numeric_types.hpp>

#include "launch.h"

namespace fused_preact {
namespace sm80 {
template <typename T> cudaError_t launch_fprop(const ConvFwdParams& p, cudaStream_t stream);
template <typename T> cudaError_t launch_dgrad(const ConvDgradParams& p, cudaStream_t stream);
template <typename T> cudaError_t launch_wgrad(const ConvWgradParams& p, cudaStream_t stream);
extern template cudaError_t launch_fprop<cute::half_t>(const ConvFwdParams&, cudaStream_t);
extern template cudaError_t launch_fprop<cute::bfloat16_t>(const ConvFwdParams&, cudaStream_t);
extern template cudaError_t launch_fprop<float>(const ConvFwdParams&, cudaStream_t);
extern template cudaError_t launch_dgrad<cute::half_t>(const ConvDgradParams&, cudaStream_t);
extern template cudaError_t launch_dgrad<cute::bfloat16_t>(const ConvDgradParams&, cudaStream_t);
extern template cudaError_t launch_dgrad<float>(const ConvDgradParams&, cudaStream_t);
extern template cudaError_t launch_wgrad<cute::half_t>(const ConvWgradParams&, cudaStream_t);
extern template cudaError_t launch_wgrad<cute::bfloat16_t>(const ConvWgradParams&, cudaStream_t);
extern template cudaError_t launch_wgrad<float>(const ConvWgradParams&, cudaStream_t);
}  // namespace sm80

cudaError_t conv_fwd_sm80(const ConvFwdParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::f16: return sm80::launch_fprop<cute::half_t>(p, stream);
    case DType::bf16: return sm80::launch_fprop<cute::bfloat16_t>(p, stream);
    case DType::f32: return sm80::launch_fprop<float>(p, stream);
    default: return cudaErrorNotSupported;
  }
}

cudaError_t conv_dgrad_sm80(const ConvDgradParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::f16: return sm80::launch_dgrad<cute::half_t>(p, stream);
    case DType::bf16: return sm80::launch_dgrad<cute::bfloat16_t>(p, stream);
    case DType::f32: return sm80::launch_dgrad<float>(p, stream);
    default: return cudaErrorNotSupported;
  }
}

cudaError_t conv_wgrad_sm80(const ConvWgradParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::f16: return sm80::launch_wgrad<cute::half_t>(p, stream);
    case DType::bf16: return sm80::launch_wgrad<cute::bfloat16_t>(p, stream);
    case DType::f32: return sm80::launch_wgrad<float>(p, stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace fused_preact

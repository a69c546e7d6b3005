// conv_fwd_sm80: the dtype switch over fprop_sm80.cuh's instantiations (fprop_sm80_*.cu).
#include <cute/numeric/numeric_types.hpp>

#include "launch.h"

namespace fused_preact {
namespace sm80 {
template <typename T> cudaError_t launch_fprop(const ConvFwdParams& p, cudaStream_t stream);
extern template cudaError_t launch_fprop<cute::half_t>(const ConvFwdParams&, cudaStream_t);
extern template cudaError_t launch_fprop<cute::bfloat16_t>(const ConvFwdParams&, cudaStream_t);
}  // namespace sm80

cudaError_t conv_fwd_sm80(const ConvFwdParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::f16: return sm80::launch_fprop<cute::half_t>(p, stream);
    case DType::bf16: return sm80::launch_fprop<cute::bfloat16_t>(p, stream);
    default: return cudaErrorNotSupported;  // float32 (tf32): the WMMA kernel of conv_fwd.cu
  }
}

}  // namespace fused_preact

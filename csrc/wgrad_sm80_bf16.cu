// wgrad_sm80.cuh instantiated for bfloat16 (one file per kernel and dtype: the build compiles them in parallel).
#include "wgrad_sm80.cuh"

namespace fused_preact {
namespace sm80 {
template cudaError_t launch_wgrad<cute::bfloat16_t>(const ConvWgradParams&, cudaStream_t);
}  // namespace sm80
}  // namespace fused_preact

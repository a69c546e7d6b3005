// fprop_sm80.cuh instantiated for float32, run as tf32 (one file per kernel and dtype: the build compiles them in parallel).
#include "fprop_sm80.cuh"

namespace fused_preact {
namespace sm80 {
template cudaError_t launch_fprop<float>(const ConvFwdParams&, cudaStream_t);
}  // namespace sm80
}  // namespace fused_preact

#include "device_query.h"

#include <cuda_runtime.h>

namespace fused_preact {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return count;
}

std::string device_error() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  cudaGetLastError();
  if (err == cudaSuccess) return count > 0 ? "" : "no CUDA device";
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace fused_preact

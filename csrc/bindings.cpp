// pybind11 module fused_preact._C: thin bindings of the torch-free CUDA library.
#include <pybind11/pybind11.h>

#include "device_query.h"

#ifndef FUSED_PREACT_ARCHS
#define FUSED_PREACT_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_preact CUDA kernels (torch-free; pointers, sizes, strides, streams)";
  m.def("device_count", &fused_preact::device_count,
        "Number of visible CUDA devices (0 when there is no device or driver).");
  m.def("device_error", &fused_preact::device_error, "Why device_count() is 0, else ''.");
  m.def("runtime_version", &fused_preact::runtime_version, "CUDART_VERSION at build time.");
  m.attr("built_archs") = FUSED_PREACT_ARCHS;
}

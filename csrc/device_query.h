// Device queries of the CUDA runtime, torch-free. The runtime is linked statically, so
// the module imports on a machine without a driver and reports "no CUDA device" there.
#pragma once
#include <string>

namespace fused_preact {

// Number of visible CUDA devices; 0 (not an error) when there is no device or no driver.
int device_count();

// Why device_count() is 0 ("" when devices exist): the CUDA runtime's error text.
std::string device_error();

// CUDA runtime version this module was built with, e.g. 13000.
int runtime_version();

}  // namespace fused_preact

// pybind11 module fused_preact._C: thin bindings of the torch-free CUDA library.
// Pointers cross as integers (tensor.data_ptr()), streams as integers (cudaStream_t of
// the CURRENT torch stream, passed on every call); a failed launch raises RuntimeError
// naming the kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "device_query.h"
#include "launch.h"

#ifndef FUSED_PREACT_ARCHS
#define FUSED_PREACT_ARCHS ""
#endif

namespace py = pybind11;
using namespace fused_preact;

namespace {

void check(cudaError_t err, const char* kernel) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fused_preact._C: kernel '") + kernel + "' failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// A read/write property exposing a pointer field as an integer address.
template <typename Class, typename Ptr>
void pointer_field(py::class_<Class>& cls, const char* name, Ptr Class::*field) {
  cls.def_property(
      name, [field](const Class& c) { return reinterpret_cast<std::uintptr_t>(c.*field); },
      [field](Class& c, std::uintptr_t v) { c.*field = reinterpret_cast<Ptr>(v); });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_preact CUDA kernels (torch-free; pointers, sizes, strides, streams)";
  m.def("device_count", &device_count, "Number of visible CUDA devices (0 when there is no device or driver).");
  m.def("device_error", &device_error, "Why device_count() is 0, else ''.");
  m.def("runtime_version", &runtime_version, "CUDART_VERSION at build time.");
  m.attr("built_archs") = FUSED_PREACT_ARCHS;
  m.attr("stats_rows") = kStatsRows;
  m.def("dgrad_tiles", &dgrad_tiles, "Blocks of conv_dgrad (rows of its per-tile sums).");

  py::enum_<DType>(m, "DType").value("f32", DType::f32).value("f16", DType::f16).value("bf16", DType::bf16);

  py::class_<Act> act(m, "Act");
  act.def(py::init<>())
      .def_readwrite("n", &Act::n).def_readwrite("c", &Act::c).def_readwrite("h", &Act::h).def_readwrite("w", &Act::w)
      .def_readwrite("sn", &Act::sn).def_readwrite("sc", &Act::sc).def_readwrite("sh", &Act::sh).def_readwrite("sw", &Act::sw);
  pointer_field(act, "ptr", &Act::ptr);

  py::class_<BnArgs> bn(m, "BnArgs");
  bn.def(py::init<>()).def_readwrite("eps", &BnArgs::eps);
  pointer_field(bn, "mean", &BnArgs::mean);
  pointer_field(bn, "var", &BnArgs::var);
  pointer_field(bn, "gamma", &BnArgs::gamma);
  pointer_field(bn, "beta", &BnArgs::beta);

#define CONV_FIELDS(Cls)                                                                              \
  .def(py::init<>()).def_readwrite("k", &Cls::k).def_readwrite("r", &Cls::r).def_readwrite("s", &Cls::s) \
      .def_readwrite("stride_h", &Cls::stride_h).def_readwrite("stride_w", &Cls::stride_w)                \
      .def_readwrite("pad_h", &Cls::pad_h).def_readwrite("pad_w", &Cls::pad_w).def_readwrite("bn", &Cls::bn)

  py::class_<ConvFwdParams> fwd(m, "ConvFwdParams");
  fwd CONV_FIELDS(ConvFwdParams).def_readwrite("x", &ConvFwdParams::x).def_readwrite("y", &ConvFwdParams::y)
      .def_readwrite("residual", &ConvFwdParams::residual);
  pointer_field(fwd, "w_rsck", &ConvFwdParams::w_rsck);
  pointer_field(fwd, "w_krsc", &ConvFwdParams::w_krsc);
  pointer_field(fwd, "partials", &ConvFwdParams::partials);

  py::class_<ConvDgradParams> dgrad(m, "ConvDgradParams");
  dgrad CONV_FIELDS(ConvDgradParams).def_readwrite("dy", &ConvDgradParams::dy).def_readwrite("x", &ConvDgradParams::x)
      .def_readwrite("g", &ConvDgradParams::g).def_readwrite("g_other", &ConvDgradParams::g_other);
  pointer_field(dgrad, "w_rskc", &ConvDgradParams::w_rskc);
  pointer_field(dgrad, "w_crsk", &ConvDgradParams::w_crsk);
  pointer_field(dgrad, "sums", &ConvDgradParams::sums);

  py::class_<ConvWgradParams> wgrad(m, "ConvWgradParams");
  wgrad CONV_FIELDS(ConvWgradParams).def_readwrite("dy", &ConvWgradParams::dy).def_readwrite("x", &ConvWgradParams::x)
      .def_readwrite("split", &ConvWgradParams::split).def_readwrite("rows_per_split", &ConvWgradParams::rows_per_split);
  pointer_field(wgrad, "partials", &ConvWgradParams::partials);
#undef CONV_FIELDS

  py::class_<StatsParams> stats(m, "StatsParams");
  stats.def(py::init<>()).def_readwrite("x", &StatsParams::x);
  pointer_field(stats, "partials", &StatsParams::partials);

  py::class_<FinalizeParams> fin(m, "FinalizeParams");
  fin.def(py::init<>()).def_readwrite("tiles", &FinalizeParams::tiles).def_readwrite("c", &FinalizeParams::c)
      .def_readwrite("running_dtype", &FinalizeParams::running_dtype).def_readwrite("momentum", &FinalizeParams::momentum);
  pointer_field(fin, "partials", &FinalizeParams::partials);
  pointer_field(fin, "mean", &FinalizeParams::mean);
  pointer_field(fin, "var", &FinalizeParams::var);
  pointer_field(fin, "running_mean", &FinalizeParams::running_mean);
  pointer_field(fin, "running_var", &FinalizeParams::running_var);
  pointer_field(fin, "num_batches_tracked", &FinalizeParams::num_batches_tracked);

  py::class_<BnBackwardParams> bwd(m, "BnBackwardParams");
  bwd.def(py::init<>()).def_readwrite("g", &BnBackwardParams::g).def_readwrite("x", &BnBackwardParams::x)
      .def_readwrite("dx", &BnBackwardParams::dx).def_readwrite("dx_other", &BnBackwardParams::dx_other)
      .def_readwrite("bn", &BnBackwardParams::bn)
      .def_readwrite("batch_stats", &BnBackwardParams::batch_stats);
  pointer_field(bwd, "grad_means", &BnBackwardParams::grad_means);

  m.def("batch_stats", [](const StatsParams& p, DType dt, std::uintptr_t s) { check(batch_stats(p, dt, as_stream(s)), "batch_stats"); });
  m.def("bn_finalize", [](const FinalizeParams& p, std::uintptr_t s) { check(bn_finalize(p, as_stream(s)), "bn_finalize"); });
  m.def("bn_backward_apply", [](const BnBackwardParams& p, DType dt, std::uintptr_t s) {
    check(bn_backward_apply(p, dt, as_stream(s)), "bn_backward_apply");
  });
  m.def("conv_fwd", [](const ConvFwdParams& p, DType xdt, DType dt, std::uintptr_t s) {
    check(conv_fwd(p, xdt, dt, as_stream(s)), "conv_fwd");
  });
  m.def("conv_fwd_sm80", [](const ConvFwdParams& p, DType dt, std::uintptr_t s) {
    check(conv_fwd_sm80(p, dt, as_stream(s)), "conv_fwd_sm80");
  });
  m.def("conv_dgrad", [](const ConvDgradParams& p, DType xdt, DType dt, std::uintptr_t s) {
    check(conv_dgrad(p, xdt, dt, as_stream(s)), "conv_dgrad");
  });
  m.def("conv_dgrad_sm80", [](const ConvDgradParams& p, DType dt, std::uintptr_t s) {
    check(conv_dgrad_sm80(p, dt, as_stream(s)), "conv_dgrad_sm80");
  });
  m.def("conv_wgrad", [](const ConvWgradParams& p, DType xdt, DType dt, std::uintptr_t s) {
    check(conv_wgrad(p, xdt, dt, as_stream(s)), "conv_wgrad");
  });
  m.def("conv_wgrad_sm80", [](const ConvWgradParams& p, DType dt, std::uintptr_t s) {
    check(conv_wgrad_sm80(p, dt, as_stream(s)), "conv_wgrad_sm80");
  });
}

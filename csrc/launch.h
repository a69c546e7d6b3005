// Launchers of the fused_preact CUDA kernels: each takes its params struct, the dtypes of
// the tensors and a stream, and returns the launch's cudaError_t (never throws).
#pragma once
#include <cuda_runtime.h>

#include "params.h"

namespace fused_preact {

// Rows (output pixels) per statistics tile of every kernel here: fixed so the number of
// partial-statistics tiles is known before launch.
constexpr int kStatsRows = 64;

// Blocks (and so per-tile sums) of conv_dgrad: row tiles of every stride phase.
int64_t dgrad_tiles(int64_t n, int64_t h, int64_t w, int stride_h, int stride_w);

cudaError_t batch_stats(const StatsParams& p, DType dtype, cudaStream_t stream);
cudaError_t bn_finalize(const FinalizeParams& p, cudaStream_t stream);
cudaError_t bn_backward_apply(const BnBackwardParams& p, DType dtype, cudaStream_t stream);
// x_dtype: the unit input's dtype (float32 under autocast); dtype: the conv's (weight, dy, y).
cudaError_t conv_fwd(const ConvFwdParams& p, DType x_dtype, DType dtype, cudaStream_t stream);
// The same unit on sm_80-class tensor cores (fprop_sm80.cuh), fp16 / bf16, x of the conv
// dtype, weight in p.w_krsc; cudaErrorNotSupported where its layout needs are not met.
cudaError_t conv_fwd_sm80(const ConvFwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t conv_dgrad(const ConvDgradParams& p, DType x_dtype, DType dtype, cudaStream_t stream);
// The same on sm_80-class tensor cores (dgrad_sm80.cuh), fp16 / bf16, x of the conv dtype,
// weight in p.w_crsk; cudaErrorNotSupported where its layout needs are not met.
cudaError_t conv_dgrad_sm80(const ConvDgradParams& p, DType dtype, cudaStream_t stream);
cudaError_t conv_wgrad(const ConvWgradParams& p, DType x_dtype, DType dtype, cudaStream_t stream);
// The same on sm_80-class tensor cores (wgrad_sm80.cuh), fp16 / bf16, x and dy of the conv
// dtype; cudaErrorNotSupported where its layout needs are not met.
cudaError_t conv_wgrad_sm80(const ConvWgradParams& p, DType dtype, cudaStream_t stream);

}  // namespace fused_preact

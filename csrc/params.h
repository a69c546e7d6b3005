// Torch-free parameter structs of the fused_preact CUDA kernels: raw pointers, sizes and
// element strides. The Python side (fused_preact/cuda.py) validates tensors and fills them.
#pragma once
#include <cstdint>

namespace fused_preact {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// An NCHW-shaped activation addressed through element strides (any layout works;
// channels_last, i.e. sc == 1, is the coalesced one).
struct Act {
  void* ptr = nullptr;
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
};

// The BatchNorm in front of a conv: bn(x) = (x - mean) * rsqrt(var + eps) * gamma + beta.
// mean == nullptr: no BN and no ReLU (plain conv). gamma/beta may be null (affine=False).
struct BnArgs {
  const float* mean = nullptr;
  const float* var = nullptr;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  float eps = 0.f;
};

// y = conv(relu(bn(x)), w) [+ residual]; per-tile (count, mean, M2) of y when partials != null.
struct ConvFwdParams {
  Act x, y, residual;           // residual.ptr null: none
  const void* w_rsck = nullptr; // weight packed [R, S, C, K], K contiguous
  const void* w_krsc = nullptr; // weight [K, R, S, C], C contiguous (channels_last): the sm80 kernels
  int64_t k = 0, r = 0, s = 0;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  BnArgs bn;
  float* partials = nullptr;    // [tiles, 3, K] fp32
};

// g = (dgrad(dy, w) + g_other) * [bn(x) > 0] and per-tile sums of g and g * xhat (when
// bn.mean != null). g_other (x's dtype; ptr null: none): another conv's gradient of relu(bn(x)).
struct ConvDgradParams {
  Act dy, x, g, g_other;
  const void* w_rskc = nullptr; // weight packed [R, S, K, C], C contiguous
  const void* w_crsk = nullptr; // weight packed [C, R, S, K], K contiguous: the sm80 kernels
  int64_t k = 0, r = 0, s = 0;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  BnArgs bn;
  float* sums = nullptr;        // [tiles, 2, C] fp32
};

// dW partials [split, K, C, R, S] fp32 of wgrad(relu(bn(x)), dy), split over the pixels.
struct ConvWgradParams {
  Act dy, x;
  int64_t k = 0, r = 0, s = 0;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  BnArgs bn;
  float* partials = nullptr;
  int64_t split = 1, rows_per_split = 0;
};

// Per-tile (count, mean, M2) of x over N*H*W rows.
struct StatsParams {
  Act x;
  float* partials = nullptr;    // [tiles, 3, C]
};

// Merge [tiles, 3, C] partials in a fixed order; update running stats when given.
struct FinalizeParams {
  const float* partials = nullptr;
  int64_t tiles = 0, c = 0;
  float* mean = nullptr;
  float* var = nullptr;
  void* running_mean = nullptr;  // null: no update
  void* running_var = nullptr;
  DType running_dtype = DType::f32;
  const int64_t* num_batches_tracked = nullptr;  // momentum < 0: factor 1 / num_batches_tracked
  float momentum = 0.1f;
};

// dx = scale * (g - mean_g - xhat * mean_gx) (batch statistics) or scale * g.
struct BnBackwardParams {
  Act g, x, dx;
  Act dx_other;  // ptr == nullptr: none; else x's gradient from another consumer, added to dx
  BnArgs bn;
  const float* grad_means = nullptr;  // [2, C]
  bool batch_stats = true;
};

}  // namespace fused_preact

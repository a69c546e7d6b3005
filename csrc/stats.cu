// Memory-bound kernels: standalone statistics, finalize (+ running stats), BN backward apply.
//
// Thread block (32 channels) x (8 row groups): lanes walk consecutive channels, which are
// contiguous in channels_last memory (coalesced); each thread covers 8 of a tile's
// kStatsRows = 64 rows. Statistics are two-pass within the tile (mean, then M2 of the
// deviations): no E[x^2] - E[x]^2 cancellation. No atomics anywhere: deterministic.
#include "common.cuh"
#include "launch.h"

namespace fused_preact {
namespace {

constexpr int kLanes = 32;
constexpr int kGroups = 8;
constexpr int kRowsPerThread = kStatsRows / kGroups;

// Sum of v over the kGroups threads of this thread's column (threadIdx.x).
__device__ float column_sum(float v, float (*scratch)[kLanes + 1]) {
  scratch[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  float total = 0.f;
  for (int g = 0; g < kGroups; ++g) total += scratch[g][threadIdx.x];  // fixed order
  __syncthreads();
  return total;
}

__device__ __forceinline__ void row_to_nhw(const Act& a, int64_t row, int64_t& n, int64_t& h, int64_t& w) {
  n = row / (a.h * a.w);
  h = (row / a.w) % a.h;
  w = row % a.w;
}

template <typename T>
__global__ void batch_stats_kernel(StatsParams p) {
  __shared__ float scratch[kGroups][kLanes + 1];
  const int64_t rows = p.x.n * p.x.h * p.x.w;
  const int64_t tile = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kLanes + threadIdx.x;
  const bool c_ok = c < p.x.c;
  const T* x = static_cast<const T*>(p.x.ptr);
  float v[kRowsPerThread];
  bool ok[kRowsPerThread];
  float sum = 0.f;
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = tile * kStatsRows + threadIdx.y + kGroups * i;
    ok[i] = c_ok && row < rows;
    v[i] = 0.f;
    if (ok[i]) {
      int64_t n, h, w;
      row_to_nhw(p.x, row, n, h, w);
      v[i] = to_float(x[offset(p.x, n, c, h, w)]);
      sum += v[i];
    }
  }
  const int64_t left = rows - tile * kStatsRows;
  const float count = float(left < kStatsRows ? left : kStatsRows);
  const float mean = column_sum(sum, scratch) / count;
  float m2 = 0.f;
  for (int i = 0; i < kRowsPerThread; ++i)
    if (ok[i]) m2 += (v[i] - mean) * (v[i] - mean);
  m2 = column_sum(m2, scratch);
  if (threadIdx.y == 0 && c_ok) {
    float* out = p.partials + tile * 3 * p.x.c + c;
    out[0] = count;
    out[p.x.c] = mean;
    out[2 * p.x.c] = m2;
  }
}

template <typename R>
__device__ void update_running(R* running, int64_t c, float value, float factor) {
  const float old = to_float(running[c]);
  running[c] = from_float<R>((1.f - factor) * old + factor * value);  // nn.BatchNorm2d's form: exact at factor 1
}

// (count, mean, M2) of a set of values.
struct Moments {
  float count, mean, m2;
};

// Chan's merge of two sets' moments; an empty b changes nothing (nor do two empty sets).
// Without branches, so that a thread's loads of the next tiles need not wait for this merge.
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  const float count = a.count + b.count;
  const float b_share = count > 0.f ? b.count / count : 0.f;
  const float delta = b.mean - a.mean;
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

// Tiles merged side by side per channel: one thread per channel merging every tile in turn
// made a chain of dependent merges as long as the tile count, each waiting on its loads
// (4096 at the headline forward, 256 x 32 x 32 pixels: milliseconds per call). Each thread
// loads kMergeBatch tiles before merging them, so their loads are in flight together.
constexpr int kMergeGroups = 32;
constexpr int kMergeBatch = 4;

// Block: kLanes channels (coalesced: a tile's channels are contiguous) x kMergeGroups
// groups. Group g merges tiles g, g + kMergeGroups, ... in order, then the first group
// merges the groups in order: a fixed order for a given tile count, so the result is the
// same run after run.
__global__ void __launch_bounds__(kLanes * kMergeGroups) bn_finalize_kernel(FinalizeParams p) {
  __shared__ Moments group_moments[kMergeGroups][kLanes];
  const int64_t c = int64_t(blockIdx.x) * kLanes + threadIdx.x;
  const bool c_ok = c < p.c;
  Moments moments{0.f, 0.f, 0.f};
  for (int64_t first = threadIdx.y; c_ok && first < p.tiles; first += kMergeGroups * kMergeBatch) {
    Moments batch[kMergeBatch];
#pragma unroll
    for (int i = 0; i < kMergeBatch; ++i) {
      const int64_t t = first + int64_t(i) * kMergeGroups;
      const float* tile = p.partials + t * 3 * p.c + c;
      batch[i] = t < p.tiles ? Moments{tile[0], tile[p.c], tile[2 * p.c]} : Moments{0.f, 0.f, 0.f};
    }
#pragma unroll
    for (int i = 0; i < kMergeBatch; ++i) moments = merge(moments, batch[i]);
  }
  group_moments[threadIdx.y][threadIdx.x] = moments;
  __syncthreads();
  if (threadIdx.y != 0 || !c_ok) return;
  for (int g = 1; g < kMergeGroups; ++g) moments = merge(moments, group_moments[g][threadIdx.x]);
  const float total = moments.count, mean = moments.mean, m2 = moments.m2;
  p.mean[c] = mean;
  p.var[c] = m2 / fmaxf(total, 1.f);
  if (p.running_mean == nullptr) return;
  const float factor = p.momentum < 0.f ? 1.f / float(*p.num_batches_tracked) : p.momentum;
  const float unbiased = m2 / fmaxf(total - 1.f, 1.f);
  switch (p.running_dtype) {
    case DType::f32:
      update_running(static_cast<float*>(p.running_mean), c, mean, factor);
      update_running(static_cast<float*>(p.running_var), c, unbiased, factor);
      break;
    case DType::f16:
      update_running(static_cast<__half*>(p.running_mean), c, mean, factor);
      update_running(static_cast<__half*>(p.running_var), c, unbiased, factor);
      break;
    case DType::bf16:
      update_running(static_cast<__nv_bfloat16*>(p.running_mean), c, mean, factor);
      update_running(static_cast<__nv_bfloat16*>(p.running_var), c, unbiased, factor);
      break;
  }
}

template <typename T>
__global__ void bn_backward_apply_kernel(BnBackwardParams p) {
  const int64_t rows = p.x.n * p.x.h * p.x.w;
  const int64_t c = int64_t(blockIdx.y) * kLanes + threadIdx.x;
  if (c >= p.x.c) return;
  const float invstd = rsqrtf(p.bn.var[c] + p.bn.eps);
  const float scale = invstd * (p.bn.gamma ? p.bn.gamma[c] : 1.f);
  const float mean = p.bn.mean[c];
  const float mean_g = p.batch_stats ? p.grad_means[c] : 0.f;
  const float mean_gx = p.batch_stats ? p.grad_means[p.x.c + c] : 0.f;
  const T* g = static_cast<const T*>(p.g.ptr);
  const T* x = static_cast<const T*>(p.x.ptr);
  T* dx = static_cast<T*>(p.dx.ptr);
  const T* dx_other = static_cast<const T*>(p.dx_other.ptr);
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = int64_t(blockIdx.x) * kStatsRows + threadIdx.y + kGroups * i;
    if (row >= rows) break;
    int64_t n, h, w;
    row_to_nhw(p.x, row, n, h, w);
    float gv = to_float(g[offset(p.g, n, c, h, w)]);
    if (p.batch_stats) {
      const float xhat = (to_float(x[offset(p.x, n, c, h, w)]) - mean) * invstd;
      gv = gv - mean_g - xhat * mean_gx;
    }
    float dxv = gv * scale;
    if (dx_other) dxv += to_float(dx_other[offset(p.dx_other, n, c, h, w)]);
    dx[offset(p.dx, n, c, h, w)] = from_float<T>(dxv);
  }
}

template <template <typename> class Kernel, typename Params>
cudaError_t launch_by_dtype(DType dtype, dim3 grid, dim3 block, cudaStream_t stream, const Params& p) {
  switch (dtype) {
    case DType::f32: Kernel<float>::launch(grid, block, stream, p); break;
    case DType::f16: Kernel<__half>::launch(grid, block, stream, p); break;
    case DType::bf16: Kernel<__nv_bfloat16>::launch(grid, block, stream, p); break;
  }
  return cudaGetLastError();
}

template <typename T> struct BatchStats {
  static void launch(dim3 g, dim3 b, cudaStream_t s, const StatsParams& p) { batch_stats_kernel<T><<<g, b, 0, s>>>(p); }
};
template <typename T> struct BnBackwardApply {
  static void launch(dim3 g, dim3 b, cudaStream_t s, const BnBackwardParams& p) { bn_backward_apply_kernel<T><<<g, b, 0, s>>>(p); }
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

cudaError_t batch_stats(const StatsParams& p, DType dtype, cudaStream_t stream) {
  const int64_t rows = p.x.n * p.x.h * p.x.w;
  dim3 grid(unsigned(cdiv(rows, kStatsRows)), unsigned(cdiv(p.x.c, kLanes)));
  return launch_by_dtype<BatchStats>(dtype, grid, dim3(kLanes, kGroups), stream, p);
}

cudaError_t bn_finalize(const FinalizeParams& p, cudaStream_t stream) {
  bn_finalize_kernel<<<unsigned(cdiv(p.c, kLanes)), dim3(kLanes, kMergeGroups), 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t bn_backward_apply(const BnBackwardParams& p, DType dtype, cudaStream_t stream) {
  const int64_t rows = p.x.n * p.x.h * p.x.w;
  dim3 grid(unsigned(cdiv(rows, kStatsRows)), unsigned(cdiv(p.x.c, kLanes)));
  return launch_by_dtype<BnBackwardApply>(dtype, grid, dim3(kLanes, kGroups), stream, p);
}

}  // namespace fused_preact

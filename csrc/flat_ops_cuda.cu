// CUDA versions of the update rules' flat-buffer ops, launched exactly like the Triton kernels in
// gxpo_kernels/ops/flat_ops.py: one CUDA block per entry of the group's block map (block -> tensor
// index, start), int64 tables of parameter / gradient data pointers (a gradient pointer of 0 means
// g = 0), fp32 math, and one row of fp32 partial sums per block that the caller reduces in float64.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>

#include "extrapolation.h"

namespace {

constexpr int kThreads = 256;

struct BlockMap {
  const int64_t* numels;
  const int64_t* offsets;
  const int64_t* block_tensor;
  const int64_t* block_start;
  int64_t block;
};

struct Range {
  int64_t tensor, begin, end, offset;  // elements [begin, end) of tensor `tensor`, at `offset` in the flat buffers
};

__device__ Range block_range(const BlockMap& map) {
  const int64_t t = map.block_tensor[blockIdx.x];
  const int64_t begin = map.block_start[blockIdx.x];
  const int64_t end = min(begin + map.block, map.numels[t]);
  return {t, begin, end, map.offsets[t]};
}

template <typename T>
__device__ T* pointer_at(const int64_t* table, int64_t t) {
  return reinterpret_cast<T*>(table[t]);
}

// Reduces N per-thread values over the block (slot max_slot by max, the others by sum) and thread 0
// writes them to out[0..N).
template <int N>
__device__ void block_reduce(float (&vals)[N], float* out, int max_slot = -1) {
  __shared__ float smem[N][kThreads];
  for (int k = 0; k < N; ++k) smem[k][threadIdx.x] = vals[k];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int k = 0; k < N; ++k) {
        const float other = smem[k][threadIdx.x + stride];
        smem[k][threadIdx.x] = k == max_slot ? fmaxf(smem[k][threadIdx.x], other) : smem[k][threadIdx.x] + other;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int k = 0; k < N; ++k) out[k] = smem[k][0];
  }
}

template <typename T>
__global__ void snapshot_kernel(const int64_t* param_ptrs, const int64_t* grad_ptrs, BlockMap map, T* theta0, T* g0,
                                float* partial) {
  const Range r = block_range(map);
  const T* p = pointer_at<T>(param_ptrs, r.tensor);
  const T* g = pointer_at<T>(grad_ptrs, r.tensor);
  float vals[1] = {0.f};
  for (int64_t j = r.begin + threadIdx.x; j < r.end; j += kThreads) {
    theta0[r.offset + j] = p[j];
    const T gj = g ? g[j] : T(0.f);
    g0[r.offset + j] = gj;
    const float gf = static_cast<float>(gj);
    vals[0] += gf * gf;
  }
  block_reduce<1>(vals, partial + blockIdx.x);
}

template <typename T>
__global__ void restore_kernel(const int64_t* param_ptrs, BlockMap map, const T* theta0) {
  const Range r = block_range(map);
  T* p = pointer_at<T>(param_ptrs, r.tensor);
  for (int64_t j = r.begin + threadIdx.x; j < r.end; j += kThreads) p[j] = theta0[r.offset + j];
}

template <typename T>
__global__ void grad_dots_kernel(const int64_t* grad_ptrs, BlockMap map, const T* g0, float* partial, bool with_g0) {
  const Range r = block_range(map);
  const T* g = pointer_at<T>(grad_ptrs, r.tensor);
  float vals[2] = {0.f, 0.f};
  if (g) {
    for (int64_t j = r.begin + threadIdx.x; j < r.end; j += kThreads) {
      const float gf = static_cast<float>(g[j]);
      vals[0] += gf * gf;
      if (with_g0) vals[1] += static_cast<float>(g0[r.offset + j]) * gf;
    }
  }
  block_reduce<2>(vals, partial + 2 * blockIdx.x);
}

// Slots: EXTRAP_STATS in gxpo_kernels/extrapolation.py (kMaxStat reduced by max), via extrapolation.h.
template <typename T>
__global__ void extrapolate_kernel(const int64_t* param_ptrs, const int64_t* grad_ptrs, BlockMap map,
                                   const T* theta0, const T* g0, float* partial, float g1_scale, float alpha,
                                   float delta, float scale_hi, int K) {
  const Range range = block_range(map);
  T* p = pointer_at<T>(param_ptrs, range.tensor);
  const T* g = pointer_at<T>(grad_ptrs, range.tensor);
  float vals[kNumStats] = {};
  vals[kMaxStat] = 1.f;
  for (int64_t j = range.begin + threadIdx.x; j < range.end; j += kThreads) {
    const float a = static_cast<float>(g0[range.offset + j]);
    const float b = g ? static_cast<float>(g[j]) * g1_scale : 0.f;
    const float abs_a = fabsf(a);
    const bool active = abs_a > delta;
    float r = b / ((a >= 0.f ? 1.f : -1.f) * fmaxf(abs_a, delta));
    const bool clipped = active && (!isfinite(r) || r < float(kRMin) || r > float(kRMax));
    if (isnan(r)) r = 1.f;
    r = fminf(fmaxf(r, float(kRMin)), float(kRMax));
    if (!active) r = 1.f;
    float s_k = 1.f;
    for (int k = 1; k < K; ++k) s_k = s_k * r + 1.f;
    const float s_2 = 1.f + r;
    float scale = fabsf(s_2) > delta ? s_k / s_2 : 1.f;
    if (!isfinite(scale)) scale = 1.f;
    scale = fminf(fmaxf(scale, 1.f), scale_hi);
    if (!active) scale = 1.f;
    const float theta0_j = static_cast<float>(theta0[range.offset + j]);
    const float d = static_cast<float>(p[j]) - theta0_j;
    p[j] = static_cast<T>(theta0_j + alpha * scale * d);
    vals[0] += a * a;
    vals[1] += b * b;
    vals[2] += a * b;
    if (active) {
      vals[3] += 1.f;
      vals[4] += r;
      vals[5] += r * r;
      vals[7] += scale;
    }
    vals[6] += clipped ? 1.f : 0.f;
    vals[8] = fmaxf(vals[8], scale);
    vals[9] += d * d;
    vals[10] += scale * scale * d * d;
  }
  block_reduce<kNumStats>(vals, partial + kNumStats * blockIdx.x, kMaxStat);
}

BlockMap block_map(const at::Tensor& numels, const at::Tensor& offsets, const at::Tensor& block_tensor,
                   const at::Tensor& block_start, int64_t block) {
  for (const auto* t : {&numels, &offsets, &block_tensor, &block_start}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kLong && t->is_contiguous(), "block map tables must be "
                "contiguous int64 CUDA tensors");
  }
  return {numels.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), block_tensor.data_ptr<int64_t>(),
          block_start.data_ptr<int64_t>(), block};
}

void check_flat(const at::Tensor& flat) {
  TORCH_CHECK(flat.is_cuda() && flat.is_contiguous(), "flat buffer must be a contiguous CUDA tensor");
}

void check_launch(const at::Tensor& flat, const at::Tensor& partial, int64_t row, const at::Tensor& block_tensor) {
  check_flat(flat);
  TORCH_CHECK(partial.is_cuda() && partial.scalar_type() == at::kFloat && partial.is_contiguous() &&
                  partial.numel() == row * block_tensor.numel(), "partial must be float32 [num_blocks, ", row, "]");
}

// fp32 math: float32, bfloat16 and float16 buffers (float64 stays on the torch path).
#define DISPATCH_KERNEL_DTYPES(dtype, NAME, ...)                                                          \
  TORCH_CHECK((dtype) == at::kFloat || (dtype) == at::kBFloat16 || (dtype) == at::kHalf, NAME,            \
              ": float32, bfloat16 or float16 only");                                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, NAME, __VA_ARGS__)

}  // namespace

void snapshot_cuda(at::Tensor param_ptrs, at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets,
                   at::Tensor block_tensor, at::Tensor block_start, at::Tensor theta0, at::Tensor g0,
                   at::Tensor partial, int64_t block) {
  check_launch(theta0, partial, 1, block_tensor);
  const c10::cuda::CUDAGuard guard(theta0.device());
  const BlockMap map = block_map(numels, offsets, block_tensor, block_start, block);
  DISPATCH_KERNEL_DTYPES(theta0.scalar_type(), "snapshot_cuda", [&] {
    snapshot_kernel<scalar_t><<<block_tensor.numel(), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        param_ptrs.data_ptr<int64_t>(), grad_ptrs.data_ptr<int64_t>(), map, theta0.data_ptr<scalar_t>(),
        g0.data_ptr<scalar_t>(), partial.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_cuda(at::Tensor param_ptrs, at::Tensor numels, at::Tensor offsets, at::Tensor block_tensor,
                  at::Tensor block_start, at::Tensor theta0, int64_t block) {
  check_flat(theta0);
  const c10::cuda::CUDAGuard guard(theta0.device());
  const BlockMap map = block_map(numels, offsets, block_tensor, block_start, block);
  DISPATCH_KERNEL_DTYPES(theta0.scalar_type(), "restore_cuda", [&] {
    restore_kernel<scalar_t><<<block_tensor.numel(), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        param_ptrs.data_ptr<int64_t>(), map, theta0.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grad_dots_cuda(at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets, at::Tensor block_tensor,
                    at::Tensor block_start, at::Tensor g0, at::Tensor partial, bool with_g0, int64_t block) {
  check_launch(g0, partial, 2, block_tensor);
  const c10::cuda::CUDAGuard guard(g0.device());
  const BlockMap map = block_map(numels, offsets, block_tensor, block_start, block);
  DISPATCH_KERNEL_DTYPES(g0.scalar_type(), "grad_dots_cuda", [&] {
    grad_dots_kernel<scalar_t><<<block_tensor.numel(), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_ptrs.data_ptr<int64_t>(), map, g0.data_ptr<scalar_t>(), partial.data_ptr<float>(), with_g0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void extrapolate_cuda(at::Tensor param_ptrs, at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets,
                      at::Tensor block_tensor, at::Tensor block_start, at::Tensor theta0, at::Tensor g0,
                      at::Tensor partial, double g1_scale, double alpha, double delta, double scale_hi, int64_t K,
                      int64_t block) {
  check_launch(theta0, partial, kNumStats, block_tensor);
  TORCH_CHECK(K >= 2, "K must be >= 2");
  const c10::cuda::CUDAGuard guard(theta0.device());
  const BlockMap map = block_map(numels, offsets, block_tensor, block_start, block);
  DISPATCH_KERNEL_DTYPES(theta0.scalar_type(), "extrapolate_cuda", [&] {
    extrapolate_kernel<scalar_t><<<block_tensor.numel(), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        param_ptrs.data_ptr<int64_t>(), grad_ptrs.data_ptr<int64_t>(), map, theta0.data_ptr<scalar_t>(),
        g0.data_ptr<scalar_t>(), partial.data_ptr<float>(), float(g1_scale), float(alpha), float(delta),
        float(scale_hi), int(K));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

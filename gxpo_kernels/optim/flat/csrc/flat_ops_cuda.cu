// CUDA versions of the update rules' flat-buffer ops, launched exactly like the Triton kernels in
// gxpo_kernels/ops/flat_ops.py and gxpo_kernels/ops/flat_tiles.py: programs of 128 threads over the group's
// block map (block -> tensor index, start; full blocks first), the first cdiv(num_full, blocks_per_program)
// programs walking that many full blocks each with 16-byte accesses (when every tensor is 16-byte aligned),
// every later program one tail block with scalar accesses; int64 tables of parameter / gradient data
// pointers (a gradient pointer of 0 means g = 0); fp32 math with the statistics in registers, reduced once
// per program into one row of fp32 partial sums that the caller reduces in float64.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>

#include "extrapolation.h"

namespace {

constexpr int kThreads = 128;  // flat_tiles.ROWS x NUM_WARPS: one row of a tile per thread
constexpr int kMinPrograms = 8;  // resident per SM (extrapolate_kernel would take 65 registers unbounded)
constexpr int kWarps = kThreads / 32;
constexpr int kAccessBytes = 16;

template <typename T>
constexpr int kPack = kAccessBytes / sizeof(T);  // elements of one 128-bit access

struct FlatMap {
  const int64_t* numels;
  const int64_t* offsets;
  const int64_t* block_tensor;
  const int64_t* block_start;
  int64_t block, num_full, blocks_per_program;
  bool aligned;  // every tensor of the launch starts on a 16-byte boundary; otherwise each program checks its own
};

struct Span {
  int64_t first, end;  // blocks [first, end) of the map
  bool full;           // full blocks (no masks); else one tensor's tail block
};

// Whether the program's full blocks take 128-bit accesses: every tensor of the launch is aligned, or every
// tensor its blocks touch in each pointer table (a null pointer counts as aligned); one unaligned tensor so
// costs only the programs over its own blocks, as on Triton (flat_tiles.span_address_bits).
template <typename... Tables>
__device__ bool vectorized(const FlatMap& map, const Span& span, const Tables*... tables) {
  if (!span.full) return false;
  if (map.aligned) return true;
  int64_t bits = 0;
  for (int64_t blk = span.first; blk < span.end; ++blk) {
    const int64_t t = map.block_tensor[blk];
    ((bits |= tables[t]), ...);
  }
  return bits % kAccessBytes == 0;
}

__device__ Span program_span(const FlatMap& map) {
  const int64_t full_programs = (map.num_full + map.blocks_per_program - 1) / map.blocks_per_program;
  const int64_t pid = blockIdx.x;
  if (pid < full_programs) {
    const int64_t first = pid * map.blocks_per_program;
    return {first, min(first + map.blocks_per_program, map.num_full), true};
  }
  const int64_t blk = map.num_full + pid - full_programs;
  return {blk, blk + 1, false};
}

struct Range {
  int64_t tensor, begin, end, offset;  // elements [begin, end) of tensor `tensor`, at `offset` in the flat buffers
};

__device__ Range block_range(const FlatMap& map, int64_t blk) {
  const int64_t t = map.block_tensor[blk];
  const int64_t begin = map.block_start[blk];
  return {t, begin, min(begin + map.block, map.numels[t]), map.offsets[t]};
}

template <typename T>
__device__ T* pointer_at(const int64_t* table, int64_t t) {
  return reinterpret_cast<T*>(table[t]);
}

// P consecutive elements, moved as one access (128 bits when P = kPack<T>).
template <typename T, int P>
struct alignas(sizeof(T) * P) Pack {
  T v[P];
};

// The pointers come from int64 tables, so the compiler cannot see they are global: told here, it emits
// LDG / STG instead of generic LD / ST.
template <typename T, int P>
__device__ Pack<T, P> load(const T* ptr) {
  __builtin_assume(__isGlobal(ptr));
  return *reinterpret_cast<const Pack<T, P>*>(ptr);
}

template <typename T, int P>
__device__ void store(T* ptr, const Pack<T, P>& x) {
  __builtin_assume(__isGlobal(ptr));
  *reinterpret_cast<Pack<T, P>*>(ptr) = x;
}

template <typename T, int P>
__device__ Pack<T, P> zeros() {
  Pack<T, P> x;
  for (int e = 0; e < P; ++e) x.v[e] = T(0.f);
  return x;
}

// Calls body.run<P>(j) for this thread's elements j of [begin, end): packs of kPack<T> when vectorized (full
// blocks of aligned tensors; the block is a multiple of kPack<T>), else one by one.
template <typename T, typename Body>
__device__ void for_each(const Range& r, bool vectorized, Body& body) {
  if (vectorized) {
    constexpr int P = kPack<T>;
    for (int64_t j = r.begin + threadIdx.x * P; j < r.end; j += kThreads * P) body.template run<P>(j);
  } else {
    for (int64_t j = r.begin + threadIdx.x; j < r.end; j += kThreads) body.template run<1>(j);
  }
}

// Reduces N per-thread values over the program (slot max_slot by max, the others by sum) with warp shuffles
// and one barrier; out[0..N) gets them.
template <int N>
__device__ void program_reduce(float (&vals)[N], float* out, int max_slot = -1) {
  __shared__ float per_warp[N][kWarps];
  for (int k = 0; k < N; ++k) {
    for (int lanes = 16; lanes > 0; lanes /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, vals[k], lanes);
      vals[k] = k == max_slot ? fmaxf(vals[k], other) : vals[k] + other;
    }
  }
  if (threadIdx.x % 32 == 0) {
    for (int k = 0; k < N; ++k) per_warp[k][threadIdx.x / 32] = vals[k];
  }
  __syncthreads();
  if (threadIdx.x < N) {
    const int k = threadIdx.x;
    float acc = per_warp[k][0];
    for (int w = 1; w < kWarps; ++w) acc = k == max_slot ? fmaxf(acc, per_warp[k][w]) : acc + per_warp[k][w];
    out[k] = acc;
  }
}

template <typename T>
struct SnapshotBody {
  const T* p;
  const T* g;
  T* theta0;
  T* g0;
  float sum_sq = 0.f;
  template <int P>
  __device__ void run(int64_t j) {
    store<T, P>(theta0 + j, load<T, P>(p + j));
    const Pack<T, P> gj = g ? load<T, P>(g + j) : zeros<T, P>();
    store<T, P>(g0 + j, gj);
    for (int e = 0; e < P; ++e) sum_sq += static_cast<float>(gj.v[e]) * static_cast<float>(gj.v[e]);
  }
};

template <typename T>
__global__ void snapshot_kernel(const int64_t* param_ptrs, const int64_t* grad_ptrs, FlatMap map, T* theta0, T* g0,
                                float* partial) {
  const Span span = program_span(map);
  const bool vector = vectorized(map, span, param_ptrs, grad_ptrs);
  float vals[1] = {0.f};
  for (int64_t blk = span.first; blk < span.end; ++blk) {
    const Range r = block_range(map, blk);
    SnapshotBody<T> body{pointer_at<T>(param_ptrs, r.tensor), pointer_at<T>(grad_ptrs, r.tensor),
                         theta0 + r.offset, g0 + r.offset};
    for_each<T>(r, vector, body);
    vals[0] += body.sum_sq;
  }
  program_reduce<1>(vals, partial + blockIdx.x);
}

template <typename T>
struct RestoreBody {
  T* p;
  const T* theta0;
  template <int P>
  __device__ void run(int64_t j) {
    store<T, P>(p + j, load<T, P>(theta0 + j));
  }
};

template <typename T>
__global__ void restore_kernel(const int64_t* param_ptrs, FlatMap map, const T* theta0) {
  const Span span = program_span(map);
  const bool vector = vectorized(map, span, param_ptrs);
  for (int64_t blk = span.first; blk < span.end; ++blk) {
    const Range r = block_range(map, blk);
    RestoreBody<T> body{pointer_at<T>(param_ptrs, r.tensor), theta0 + r.offset};
    for_each<T>(r, vector, body);
  }
}

template <typename T>
struct GradDotsBody {
  const T* g;
  const T* g0;
  bool with_g0;
  float gg = 0.f, g0g = 0.f;
  template <int P>
  __device__ void run(int64_t j) {
    const Pack<T, P> gj = load<T, P>(g + j);
    const Pack<T, P> g0j = with_g0 ? load<T, P>(g0 + j) : zeros<T, P>();
    for (int e = 0; e < P; ++e) {
      const float gf = static_cast<float>(gj.v[e]);
      gg += gf * gf;
      g0g += static_cast<float>(g0j.v[e]) * gf;
    }
  }
};

template <typename T>
__global__ void grad_dots_kernel(const int64_t* grad_ptrs, FlatMap map, const T* g0, float* partial, bool with_g0) {
  const Span span = program_span(map);
  const bool vector = vectorized(map, span, grad_ptrs);
  float vals[2] = {0.f, 0.f};
  for (int64_t blk = span.first; blk < span.end; ++blk) {
    const Range r = block_range(map, blk);
    const T* g = pointer_at<T>(grad_ptrs, r.tensor);
    if (!g) continue;
    GradDotsBody<T> body{g, g0 + r.offset, with_g0};
    for_each<T>(r, vector, body);
    vals[0] += body.gg;
    vals[1] += body.g0g;
  }
  program_reduce<2>(vals, partial + 2 * blockIdx.x);
}

struct ExtrapolationArgs {
  float g1_scale, alpha, delta, scale_hi;
  int K;
};

// One coordinate of docs/algorithm.md step 3: the new parameter value, its EXTRAP_STATS (slots from
// extrapolation.h) added into vals.
__device__ float extrapolate_one(float g0, float g1, float theta0, float theta2, const ExtrapolationArgs& x,
                                 float (&vals)[kNumStats]) {
  const float abs_g0 = fabsf(g0);
  const bool active = abs_g0 > x.delta;
  float r = g1 / ((g0 >= 0.f ? 1.f : -1.f) * fmaxf(abs_g0, x.delta));
  const bool clipped = active && (!isfinite(r) || r < float(kRMin) || r > float(kRMax));
  if (isnan(r)) r = 1.f;
  r = fminf(fmaxf(r, float(kRMin)), float(kRMax));
  if (!active) r = 1.f;
  float s_k = 1.f;
  for (int k = 1; k < x.K; ++k) s_k = s_k * r + 1.f;
  const float s_2 = 1.f + r;
  float scale = fabsf(s_2) > x.delta ? s_k / s_2 : 1.f;
  if (!isfinite(scale)) scale = 1.f;
  scale = fminf(fmaxf(scale, 1.f), x.scale_hi);
  if (!active) scale = 1.f;
  const float d = theta2 - theta0;
  vals[0] += g0 * g0;
  vals[1] += g1 * g1;
  vals[2] += g0 * g1;
  if (active) {
    vals[3] += 1.f;
    vals[4] += r;
    vals[5] += r * r;
    vals[7] += scale;
  }
  vals[6] += clipped ? 1.f : 0.f;
  vals[kMaxStat] = fmaxf(vals[kMaxStat], scale);
  vals[9] += d * d;
  vals[10] += scale * scale * d * d;
  return theta0 + x.alpha * scale * d;
}

template <typename T>
struct ExtrapolateBody {
  T* p;
  const T* g;
  const T* theta0;
  const T* g0;
  const ExtrapolationArgs& x;
  float (&vals)[kNumStats];
  template <int P>
  __device__ void run(int64_t j) {
    Pack<T, P> theta = load<T, P>(p + j);
    const Pack<T, P> t0 = load<T, P>(theta0 + j);
    const Pack<T, P> a = load<T, P>(g0 + j);
    const Pack<T, P> b = g ? load<T, P>(g + j) : zeros<T, P>();
    for (int e = 0; e < P; ++e) {
      theta.v[e] = static_cast<T>(extrapolate_one(static_cast<float>(a.v[e]), static_cast<float>(b.v[e]) * x.g1_scale,
                                                  static_cast<float>(t0.v[e]), static_cast<float>(theta.v[e]), x,
                                                  vals));
    }
    store<T, P>(p + j, theta);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinPrograms)
    extrapolate_kernel(const int64_t* param_ptrs, const int64_t* grad_ptrs, FlatMap map, const T* theta0, const T* g0,
                       float* partial, ExtrapolationArgs x) {
  const Span span = program_span(map);
  const bool vector = vectorized(map, span, param_ptrs, grad_ptrs);
  float vals[kNumStats] = {};
  vals[kMaxStat] = 1.f;
  for (int64_t blk = span.first; blk < span.end; ++blk) {
    const Range r = block_range(map, blk);
    ExtrapolateBody<T> body{pointer_at<T>(param_ptrs, r.tensor), pointer_at<T>(grad_ptrs, r.tensor),
                            theta0 + r.offset, g0 + r.offset, x, vals};
    for_each<T>(r, vector, body);
  }
  program_reduce<kNumStats>(vals, partial + kNumStats * blockIdx.x, kMaxStat);
}

FlatMap flat_map(const at::Tensor& numels, const at::Tensor& offsets, const at::Tensor& block_tensor,
                 const at::Tensor& block_start, int64_t block, int64_t num_full, int64_t blocks_per_program,
                 bool aligned) {
  for (const auto* t : {&numels, &offsets, &block_tensor, &block_start}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kLong && t->is_contiguous(), "block map tables must be "
                "contiguous int64 CUDA tensors");
  }
  TORCH_CHECK(blocks_per_program >= 1 && 0 <= num_full && num_full <= block_tensor.numel(),
              "bad program layout: num_full ", num_full, " of ", block_tensor.numel(), " blocks, ",
              blocks_per_program, " blocks per program");
  return {numels.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), block_tensor.data_ptr<int64_t>(),
          block_start.data_ptr<int64_t>(), block, num_full, blocks_per_program, aligned};
}

// flat_tiles.num_programs: the full-block programs, then one per tail block.
int64_t num_programs(const FlatMap& map, int64_t num_blocks) {
  return (map.num_full + map.blocks_per_program - 1) / map.blocks_per_program + num_blocks - map.num_full;
}

template <typename T>
void check_block(const FlatMap& map) {
  TORCH_CHECK(map.block % kPack<T> == 0, "block ", map.block, " is not a multiple of ", kPack<T>, " elements");
}

void check_flat(const at::Tensor& flat) {
  TORCH_CHECK(flat.is_cuda() && flat.is_contiguous(), "flat buffer must be a contiguous CUDA tensor");
}

void check_partial(const at::Tensor& partial, int64_t row, int64_t programs) {
  TORCH_CHECK(partial.is_cuda() && partial.scalar_type() == at::kFloat && partial.is_contiguous() &&
                  partial.numel() == row * programs, "partial must be float32 [num_programs, ", row, "]");
}

// fp32 math: float32, bfloat16 and float16 buffers (float64 stays on the torch path).
#define DISPATCH_KERNEL_DTYPES(dtype, NAME, ...)                                                          \
  TORCH_CHECK((dtype) == at::kFloat || (dtype) == at::kBFloat16 || (dtype) == at::kHalf, NAME,            \
              ": float32, bfloat16 or float16 only");                                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, NAME, __VA_ARGS__)

}  // namespace

void snapshot_cuda(at::Tensor param_ptrs, at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets,
                   at::Tensor block_tensor, at::Tensor block_start, at::Tensor theta0, at::Tensor g0,
                   at::Tensor partial, int64_t block, int64_t num_full, int64_t blocks_per_program, bool aligned) {
  check_flat(theta0);
  const FlatMap map = flat_map(numels, offsets, block_tensor, block_start, block, num_full, blocks_per_program,
                               aligned);
  const int64_t programs = num_programs(map, block_tensor.numel());
  check_partial(partial, 1, programs);
  const c10::cuda::CUDAGuard guard(theta0.device());
  DISPATCH_KERNEL_DTYPES(theta0.scalar_type(), "snapshot_cuda", [&] {
    check_block<scalar_t>(map);
    snapshot_kernel<scalar_t><<<programs, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        param_ptrs.data_ptr<int64_t>(), grad_ptrs.data_ptr<int64_t>(), map, theta0.data_ptr<scalar_t>(),
        g0.data_ptr<scalar_t>(), partial.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_cuda(at::Tensor param_ptrs, at::Tensor numels, at::Tensor offsets, at::Tensor block_tensor,
                  at::Tensor block_start, at::Tensor theta0, int64_t block, int64_t num_full,
                  int64_t blocks_per_program, bool aligned) {
  check_flat(theta0);
  const FlatMap map = flat_map(numels, offsets, block_tensor, block_start, block, num_full, blocks_per_program,
                               aligned);
  const c10::cuda::CUDAGuard guard(theta0.device());
  DISPATCH_KERNEL_DTYPES(theta0.scalar_type(), "restore_cuda", [&] {
    check_block<scalar_t>(map);
    restore_kernel<scalar_t><<<num_programs(map, block_tensor.numel()), kThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(param_ptrs.data_ptr<int64_t>(), map,
                                                                    theta0.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grad_dots_cuda(at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets, at::Tensor block_tensor,
                    at::Tensor block_start, at::Tensor g0, at::Tensor partial, bool with_g0, int64_t block,
                    int64_t num_full, int64_t blocks_per_program, bool aligned) {
  check_flat(g0);
  const FlatMap map = flat_map(numels, offsets, block_tensor, block_start, block, num_full, blocks_per_program,
                               aligned);
  const int64_t programs = num_programs(map, block_tensor.numel());
  check_partial(partial, 2, programs);
  const c10::cuda::CUDAGuard guard(g0.device());
  DISPATCH_KERNEL_DTYPES(g0.scalar_type(), "grad_dots_cuda", [&] {
    check_block<scalar_t>(map);
    grad_dots_kernel<scalar_t><<<programs, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_ptrs.data_ptr<int64_t>(), map, g0.data_ptr<scalar_t>(), partial.data_ptr<float>(), with_g0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void extrapolate_cuda(at::Tensor param_ptrs, at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets,
                      at::Tensor block_tensor, at::Tensor block_start, at::Tensor theta0, at::Tensor g0,
                      at::Tensor partial, double g1_scale, double alpha, double delta, double scale_hi, int64_t K,
                      int64_t block, int64_t num_full, int64_t blocks_per_program, bool aligned) {
  check_flat(theta0);
  TORCH_CHECK(K >= 2, "K must be >= 2");
  const FlatMap map = flat_map(numels, offsets, block_tensor, block_start, block, num_full, blocks_per_program,
                               aligned);
  const int64_t programs = num_programs(map, block_tensor.numel());
  check_partial(partial, kNumStats, programs);
  const ExtrapolationArgs x{float(g1_scale), float(alpha), float(delta), float(scale_hi), int(K)};
  const c10::cuda::CUDAGuard guard(theta0.device());
  DISPATCH_KERNEL_DTYPES(theta0.scalar_type(), "extrapolate_cuda", [&] {
    check_block<scalar_t>(map);
    extrapolate_kernel<scalar_t><<<programs, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        param_ptrs.data_ptr<int64_t>(), grad_ptrs.data_ptr<int64_t>(), map, theta0.data_ptr<scalar_t>(),
        g0.data_ptr<scalar_t>(), partial.data_ptr<float>(), x);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

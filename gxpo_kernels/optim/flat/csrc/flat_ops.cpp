// CPU (OpenMP) versions of the update rules' flat-buffer ops: the same math as
// gxpo_kernels/ops/flat_ops.py (Triton) and gxpo_kernels/ops/flat_reference.py (torch).
// Parameters and gradients arrive as lists of contiguous tensors; theta0 / g0 are flat buffers and
// offsets[i] is tensor i's start in them. Reductions accumulate in double (the extrapolation's
// per chunk in the parameters' type first, as the Triton kernels do per block).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <optional>
#include <vector>

#include "extrapolation.h"

namespace {

using GradList = std::vector<std::optional<at::Tensor>>;

const void* grad_data(const GradList& grads, size_t i) {
  return grads[i].has_value() && grads[i]->defined() ? grads[i]->data_ptr() : nullptr;
}

void check_inputs(const std::vector<at::Tensor>& params, const GradList& grads, const at::Tensor& flat,
                  const std::vector<int64_t>& offsets) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == offsets.size(), "list lengths differ");
  TORCH_CHECK(flat.is_contiguous() && flat.device().is_cpu(), "flat buffer must be a contiguous CPU tensor");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_contiguous() && params[i].scalar_type() == flat.scalar_type(), "bad parameter ", i);
    TORCH_CHECK(offsets[i] + params[i].numel() <= flat.numel(), "offset out of range for tensor ", i);
    if (grad_data(grads, i)) {
      TORCH_CHECK(grads[i]->is_contiguous() && grads[i]->scalar_type() == flat.scalar_type() &&
                      grads[i]->numel() == params[i].numel(), "bad gradient ", i);
    }
  }
}

template <typename T>
double snapshot_impl(const std::vector<at::Tensor>& params, const GradList& grads, at::Tensor& theta0, at::Tensor& g0,
                     const std::vector<int64_t>& offsets) {
  T* theta0_ptr = theta0.data_ptr<T>();
  T* g0_ptr = g0.data_ptr<T>();
  double total = 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel(), off = offsets[i];
    std::memcpy(theta0_ptr + off, params[i].data_ptr<T>(), n * sizeof(T));
    const T* g = static_cast<const T*>(grad_data(grads, i));
    if (!g) {
      std::fill(g0_ptr + off, g0_ptr + off + n, T(0));
      continue;
    }
    double s = 0.0;
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      g0_ptr[off + j] = g[j];
      s += double(g[j]) * double(g[j]);
    }
    total += s;
  }
  return total;
}

template <typename T>
void restore_impl(std::vector<at::Tensor>& params, const at::Tensor& theta0, const std::vector<int64_t>& offsets) {
  const T* theta0_ptr = theta0.data_ptr<T>();
  for (size_t i = 0; i < params.size(); ++i) {
    std::memcpy(params[i].data_ptr<T>(), theta0_ptr + offsets[i], params[i].numel() * sizeof(T));
  }
}

template <typename T>
std::vector<double> grad_dots_impl(const GradList& grads, const at::Tensor& g0, const std::vector<int64_t>& offsets,
                                   bool with_g0) {
  const T* g0_ptr = g0.data_ptr<T>();
  double sq = 0.0, dot = 0.0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const T* g = static_cast<const T*>(grad_data(grads, i));
    if (!g) continue;
    const int64_t n = grads[i]->numel(), off = offsets[i];
    double s = 0.0, d = 0.0;
#pragma omp parallel for reduction(+ : s, d) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      s += double(g[j]) * double(g[j]);
      if (with_g0) d += double(g0_ptr[off + j]) * double(g[j]);
    }
    sq += s;
    dot += d;
  }
  return {sq, dot};
}

constexpr int64_t kChunk = 2048;  // elements per partial sum, accumulated in T (like a Triton block)

// S_K(r) = 1 + r + ... + r^(K-1) by Horner; K > 0 unrolls (compile-time), K = 0 reads k_runtime.
template <typename T, int K>
inline T geometric_sum(T r, int64_t k_runtime) {
  T s = T(1);
  if constexpr (K > 0) {
    for (int k = 1; k < K; ++k) s = s * r + T(1);
  } else {
    for (int64_t k = 1; k < k_runtime; ++k) s = s * r + T(1);
  }
  return s;
}

template <typename T>
struct ExtrapSums {  // the order of EXTRAP_STATS in extrapolation.py
  T g0_sq, g1_sq, g0_g1, n_active, r_sum, r_sq, n_clipped, scale_sum, scale_max, d_sq, scaled_d_sq;
};

// Elements [0, n) of one chunk: a branch-free loop (every value computed before it is selected,
// bitwise & and |) over restrict pointers and by-value scalars, so it vectorizes, with T sums.
template <typename T, int K, bool HAS_GRAD>
ExtrapSums<T> extrapolate_chunk(T* __restrict p, const T* __restrict g, const T* __restrict theta0,
                                const T* __restrict g0, int64_t n, int64_t k_runtime, T alpha, T delta, T g1_scale,
                                T scale_hi) {
  const T big = std::numeric_limits<T>::max();
  T g0_sq = 0, g1_sq = 0, g0_g1 = 0, n_active = 0, r_sum = 0, r_sq = 0, n_clipped = 0, scale_sum = 0, scale_max = 1,
    d_sq = 0, scaled_d_sq = 0;
#pragma omp simd reduction(+ : g0_sq, g1_sq, g0_g1, n_active, r_sum, r_sq, n_clipped, scale_sum, d_sq, scaled_d_sq) \
    reduction(max : scale_max)
  for (int64_t j = 0; j < n; ++j) {
    const T a = g0[j];
    const T b = HAS_GRAD ? g[j] * g1_scale : T(0);
    const T abs_a = std::abs(a);
    const bool active = abs_a > delta;
    const T r_raw = b / ((a >= 0 ? T(1) : T(-1)) * std::max(abs_a, delta));
    const bool clipped = active & (!(std::abs(r_raw) <= big) | (r_raw < T(kRMin)) | (r_raw > T(kRMax)));
    T r = r_raw != r_raw ? T(1) : r_raw;
    r = std::min(std::max(r, T(kRMin)), T(kRMax));
    r = active ? r : T(1);
    const T s_2 = T(1) + r;
    const T ratio = geometric_sum<T, K>(r, k_runtime) / s_2;
    T scale = std::abs(s_2) > delta ? ratio : T(1);
    scale = std::abs(scale) <= big ? scale : T(1);
    scale = std::min(std::max(scale, T(1)), scale_hi);
    scale = active ? scale : T(1);
    const T theta0_j = theta0[j];
    const T d = p[j] - theta0_j;
    p[j] = theta0_j + alpha * scale * d;
    g0_sq += a * a;
    g1_sq += b * b;
    g0_g1 += a * b;
    n_active += active ? T(1) : T(0);
    r_sum += active ? r : T(0);
    r_sq += active ? r * r : T(0);
    scale_sum += active ? scale : T(0);
    n_clipped += clipped ? T(1) : T(0);
    scale_max = std::max(scale_max, scale);
    d_sq += d * d;
    scaled_d_sq += scale * scale * d * d;
  }
  return {g0_sq, g1_sq, g0_g1, n_active, r_sum, r_sq, n_clipped, scale_sum, scale_max, d_sq, scaled_d_sq};
}

// One tensor: chunks in parallel, their T sums added to double totals.
template <typename T, int K, bool HAS_GRAD>
void extrapolate_tensor(T* p, const T* g, const T* theta0_ptr, const T* g0_ptr, int64_t n, int64_t k_runtime,
                        T alpha, T delta, T g1_scale, T scale_hi, double* out) {
  double g0_sq = 0, g1_sq = 0, g0_g1 = 0, n_active = 0, r_sum = 0, r_sq = 0, n_clipped = 0, scale_sum = 0,
         scale_max = 1, d_sq = 0, scaled_d_sq = 0;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) reduction(+ : g0_sq, g1_sq, g0_g1, n_active, r_sum, r_sq, n_clipped, \
                                                        scale_sum, d_sq, scaled_d_sq) reduction(max : scale_max)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t lo = c * kChunk;
    const ExtrapSums<T> part = extrapolate_chunk<T, K, HAS_GRAD>(
        p + lo, HAS_GRAD ? g + lo : nullptr, theta0_ptr + lo, g0_ptr + lo, std::min(kChunk, n - lo), k_runtime,
        alpha, delta, g1_scale, scale_hi);
    g0_sq += part.g0_sq;
    g1_sq += part.g1_sq;
    g0_g1 += part.g0_g1;
    n_active += part.n_active;
    r_sum += part.r_sum;
    r_sq += part.r_sq;
    n_clipped += part.n_clipped;
    scale_sum += part.scale_sum;
    scale_max = std::max(scale_max, double(part.scale_max));
    d_sq += part.d_sq;
    scaled_d_sq += part.scaled_d_sq;
  }
  const double row[kNumStats] = {g0_sq, g1_sq, g0_g1, n_active, r_sum, r_sq, n_clipped, scale_sum, scale_max, d_sq,
                                 scaled_d_sq};
  for (int k = 0; k < kNumStats; ++k) out[k] = k == kMaxStat ? std::max(out[k], row[k]) : out[k] + row[k];
}

template <typename T, int K>
void extrapolate_all(std::vector<at::Tensor>& params, const GradList& grads, const T* theta0_ptr, const T* g0_ptr,
                     const std::vector<int64_t>& offsets, int64_t k_runtime, T alpha, T delta, T g1_scale,
                     T scale_hi, double* out) {
  for (size_t i = 0; i < params.size(); ++i) {
    T* p = params[i].data_ptr<T>();
    const T* g = static_cast<const T*>(grad_data(grads, i));
    const int64_t n = params[i].numel(), off = offsets[i];
    if (g) {
      extrapolate_tensor<T, K, true>(p, g, theta0_ptr + off, g0_ptr + off, n, k_runtime, alpha, delta, g1_scale,
                                     scale_hi, out);
    } else {
      extrapolate_tensor<T, K, false>(p, nullptr, theta0_ptr + off, g0_ptr + off, n, k_runtime, alpha, delta,
                                      g1_scale, scale_hi, out);
    }
  }
}

template <typename T>
std::vector<double> extrapolate_impl(std::vector<at::Tensor>& params, const GradList& grads, const at::Tensor& theta0,
                                     const at::Tensor& g0, const std::vector<int64_t>& offsets, int64_t K,
                                     double g1_scale, double alpha, double delta, double scale_hi) {
  std::vector<double> out(kNumStats, 0.0);
  out[kMaxStat] = 1.0;
  const T* theta0_ptr = theta0.data_ptr<T>();
  const T* g0_ptr = g0.data_ptr<T>();
  const auto run = [&](auto k_const) {
    extrapolate_all<T, decltype(k_const)::value>(params, grads, theta0_ptr, g0_ptr, offsets, K, T(alpha), T(delta),
                                                 T(g1_scale), T(scale_hi), out.data());
  };
  switch (K) {  // the usual K unrolled; any other K (tests: 7) loops at run time
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 8: run(std::integral_constant<int, 8>{}); break;
    case 10: run(std::integral_constant<int, 10>{}); break;
    default: run(std::integral_constant<int, 0>{});
  }
  return out;
}

#define DISPATCH_FLOAT(dtype, NAME, ...)                                     \
  [&] {                                                                      \
    if ((dtype) == at::kFloat) { using scalar_t = float; return __VA_ARGS__(); }   \
    TORCH_CHECK((dtype) == at::kDouble, NAME ": float32 or float64 only");   \
    using scalar_t = double;                                                 \
    return __VA_ARGS__();                                                    \
  }()

double snapshot(std::vector<at::Tensor> params, GradList grads, at::Tensor theta0, at::Tensor g0,
                std::vector<int64_t> offsets) {
  check_inputs(params, grads, theta0, offsets);
  return DISPATCH_FLOAT(theta0.scalar_type(), "snapshot",
                        [&] { return snapshot_impl<scalar_t>(params, grads, theta0, g0, offsets); });
}

void restore(std::vector<at::Tensor> params, at::Tensor theta0, std::vector<int64_t> offsets) {
  check_inputs(params, GradList(params.size()), theta0, offsets);
  DISPATCH_FLOAT(theta0.scalar_type(), "restore", [&] { restore_impl<scalar_t>(params, theta0, offsets); });
}

std::vector<double> grad_dots(std::vector<at::Tensor> params, GradList grads, at::Tensor g0,
                              std::vector<int64_t> offsets, bool with_g0) {
  check_inputs(params, grads, g0, offsets);
  return DISPATCH_FLOAT(g0.scalar_type(), "grad_dots",
                        [&] { return grad_dots_impl<scalar_t>(grads, g0, offsets, with_g0); });
}

// The scalars in gxpo_kernels.extrapolation.kernel_scalars' order, as every backend takes them.
std::vector<double> extrapolate(std::vector<at::Tensor> params, GradList grads, at::Tensor theta0, at::Tensor g0,
                                std::vector<int64_t> offsets, int64_t K, double g1_scale, double alpha, double delta,
                                double scale_hi) {
  check_inputs(params, grads, theta0, offsets);
  return DISPATCH_FLOAT(theta0.scalar_type(), "extrapolate", [&] {
    return extrapolate_impl<scalar_t>(params, grads, theta0, g0, offsets, K, g1_scale, alpha, delta, scale_hi);
  });
}

}  // namespace

#ifdef WITH_CUDA
// csrc/flat_ops_cuda.cu: the Triton kernels' launch layout (block map, programs of blocks_per_program full
// blocks then one per tail block, pointer tables), one row of fp32 partials per program.
void snapshot_cuda(at::Tensor param_ptrs, at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets,
                   at::Tensor block_tensor, at::Tensor block_start, at::Tensor theta0, at::Tensor g0,
                   at::Tensor partial, int64_t block, int64_t num_full, int64_t blocks_per_program, bool aligned);
void restore_cuda(at::Tensor param_ptrs, at::Tensor numels, at::Tensor offsets, at::Tensor block_tensor,
                  at::Tensor block_start, at::Tensor theta0, int64_t block, int64_t num_full,
                  int64_t blocks_per_program, bool aligned);
void grad_dots_cuda(at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets, at::Tensor block_tensor,
                    at::Tensor block_start, at::Tensor g0, at::Tensor partial, bool with_g0, int64_t block,
                    int64_t num_full, int64_t blocks_per_program, bool aligned);
void extrapolate_cuda(at::Tensor param_ptrs, at::Tensor grad_ptrs, at::Tensor numels, at::Tensor offsets,
                      at::Tensor block_tensor, at::Tensor block_start, at::Tensor theta0, at::Tensor g0,
                      at::Tensor partial, double g1_scale, double alpha, double delta, double scale_hi, int64_t K,
                      int64_t block, int64_t num_full, int64_t blocks_per_program, bool aligned);
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("snapshot", &snapshot, "theta0 <- params, g0 <- grads; returns sum(g0^2)");
  m.def("restore", &restore, "params <- theta0");
  m.def("grad_dots", &grad_dots, "[sum(g^2), sum(g0 * g)]");
  m.def("extrapolate", &extrapolate, "GXPO extrapolation in place; returns the EXTRAP_STATS sums");
#ifdef WITH_CUDA
  m.def("snapshot_cuda", &snapshot_cuda, "snapshot over a block map; per-program sum(g0^2) into partial");
  m.def("restore_cuda", &restore_cuda, "params <- theta0 over a block map");
  m.def("grad_dots_cuda", &grad_dots_cuda, "per-program [sum(g^2), sum(g0 * g)] into partial");
  m.def("extrapolate_cuda", &extrapolate_cuda, "GXPO extrapolation in place; per-program EXTRAP_STATS into partial");
#endif
}

// Shared host-side helpers for the megallama._C ops: dtype dispatch, [rows, cols] views, CUDA launch glue.
//
// Only light torch headers are included (torch/library.h, ATen/core/Tensor.h), never torch/extension.h, so the
// CPU JIT build of all of csrc/ stays well under a minute on two cores.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>

#include "launchers.h"

#ifdef MEGALLAMA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace megallama {

// Accumulation type: fp32 for every storage type except fp64, which stays fp64 so that gradcheck is exact.
template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct Tag {
  using type = T;
};

// exp for fp32 in plain arithmetic, so that loops using it vectorise (std::exp does not without -ffast-math):
// Cephes' expf. Range reduction x = n ln2 + r (ln2 in two parts), a degree-7 polynomial for e^r (about 1 ulp), and
// 2^n written into the exponent bits; inputs clamped to [-87, 88] so the result stays a normal float.
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.f ? 0.5f : -0.5f));  // round half away (SSE2 truncation)
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_fast(double x) { return std::exp(x); }

// Calls f(Tag<T>{}) for a floating storage type: fp32, fp64, bf16, fp16.
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kBFloat16: return f(Tag<c10::BFloat16>{});
    case at::kHalf: return f(Tag<c10::Half>{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected float32, float64, bfloat16 or float16)");
  }
}

// A tensor seen as [rows, cols] with unit column stride and one row stride, copied only if its layout needs it.
struct Rows {
  at::Tensor t;  // the (possibly copied) tensor whose storage the pointer refers to
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
};

inline Rows as_rows(const at::Tensor& in) {
  TORCH_CHECK(in.dim() >= 1, "megallama: expected a tensor with at least one dimension");
  at::Tensor t = in;
  const int64_t n = t.dim(), cols = t.size(n - 1);
  if (cols > 1 && t.stride(n - 1) != 1) t = t.contiguous();
  // The leading dims must collapse into one row index: stride[i] == stride[i+1] * size[i+1] (size-1 dims are free).
  int64_t row_stride = cols, expect = -1;
  for (int64_t i = n - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (expect == -1) {
      row_stride = t.stride(i);
    } else if (t.stride(i) != expect) {
      t = t.contiguous();
      row_stride = cols;
      break;
    }
    expect = t.stride(i) * t.size(i);
  }
  if (row_stride < cols && t.numel() > cols) {  // overlapping rows (e.g. expanded): make them real
    t = t.contiguous();
    row_stride = cols;
  }
  return {t, cols == 0 ? 0 : t.numel() / cols, cols, row_stride};
}

inline cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::F32;
    case at::kBFloat16: return cuda::DType::BF16;
    case at::kHalf: return cuda::DType::F16;
    default: TORCH_CHECK(false, "megallama CUDA kernels support float32, bfloat16 and float16, got ", t);
  }
}

// The current stream of t's (CUDA) device as a cudaStream_t; never called in a CPU-only build.
inline void* current_stream(const at::Tensor& t) {
#ifdef MEGALLAMA_WITH_CUDA
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
#else
  TORCH_CHECK(false, "megallama._C was built without CUDA");
#endif
}

inline void check_cuda(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA kernel failed: ", cuda::error_string(err));
}

inline void check_cuda_built(const char* op) {
  TORCH_CHECK(cuda::built(), op, ": megallama._C was built without CUDA kernels");
}

// The CUDA branch of an op's glue: a CUDA build, like's device current, launch() (a launchers.h call) succeeded.
template <typename F>
void launch_cuda(const at::Tensor& like, const char* op, F&& launch) {
  check_cuda_built(op);
  c10::DeviceGuard guard(like.device());
  check_cuda(launch(), op);
}

}  // namespace megallama

// Registers a file's kernels for CPU and, in a CUDA build, for CUDA (each kernel dispatches on the device itself):
// register_fn(torch::Library& m) names the m.impl calls once.
#ifdef MEGALLAMA_WITH_CUDA
#define MEGALLAMA_IMPL_CPU_AND_CUDA(register_fn)            \
  TORCH_LIBRARY_IMPL(megallama, CPU, m) { register_fn(m); } \
  TORCH_LIBRARY_IMPL(megallama, CUDA, m) { register_fn(m); }
#else
#define MEGALLAMA_IMPL_CPU_AND_CUDA(register_fn) \
  TORCH_LIBRARY_IMPL(megallama, CPU, m) { register_fn(m); }
#endif

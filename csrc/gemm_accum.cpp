// out += a^T b for 16-bit a [N, M] and b [N, K] into an fp32 out [M, K], accumulated in fp32 by the GEMM itself:
// the weight-gradient GEMM of a chunked or micro-batched backward adding straight into an fp32 gradient
// (Megatron's gradient-accumulation fusion, wgrad_gemm_accum_fp32). Without it each call writes a 16-bit [M, K]
// product, rounds it, and an add reads it back with out: 12 bytes per element against 8, two kernels against one.
//
// CUDA: one cublasGemmEx with beta = 1 on torch's handle (its stream and workspace). ATen's own
// at::cuda::blas::gemm<BFloat16, float> is not exported by libtorch_cuda (torch 2.11: undefined symbol at load),
// so the build links cuBLAS itself, where the toolkit has it (MEGALLAMA_WITH_CUBLAS, set by
// megallama/ops/_extension.py's cublas_build_flags); ``gemm_accum_cuda_built()`` tells the Python front door,
// which otherwise takes its fallback.
// CPU: the same math on fp32 copies (what the reference does; the CPU has no 16-bit GEMM with an fp32 C).
#include "common.h"

#if defined(MEGALLAMA_WITH_CUDA) && defined(MEGALLAMA_WITH_CUBLAS)
#include <ATen/cuda/CUDAContextLight.h>  // torch's cuBLAS handle, set to the current stream and workspace
#include <cublas_v2.h>

#include <limits>
#define MEGALLAMA_GEMM_ACCUM_CUDA 1
#endif

namespace megallama {
namespace {

#ifdef MEGALLAMA_GEMM_ACCUM_CUDA
// a and b as ``as_rows`` views (unit column stride, one row stride): column-major cuBLAS operands whose leading
// dimension is that row stride.
void gemm_cuda(const at::Tensor& out, const Rows& a, const Rows& b, const char* op) {
  // Column-major view: out^T [K, M] += b^T [K, N] (b's rows as columns, ld = b's row stride) times a [N, M]
  // (a's rows as columns form a^T [M, N], ld = a's row stride; transposed).
  const int64_t n = a.rows, m = a.cols, k = b.cols;
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(n <= kMax && m <= kMax && k <= kMax && a.row_stride <= kMax && b.row_stride <= kMax, op,
              ": a dimension exceeds cuBLAS's 32-bit sizes");
  const cudaDataType_t ab = a.t.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const float one = 1.0f;
  const cublasStatus_t st = cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(k), static_cast<int>(m),
      static_cast<int>(n), &one, b.t.const_data_ptr(), ab, static_cast<int>(b.row_stride), a.t.const_data_ptr(), ab,
      static_cast<int>(a.row_stride), &one, out.data_ptr<float>(), CUDA_R_32F, static_cast<int>(k),
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP);
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, op, ": cublasGemmEx failed with status ", static_cast<int>(st));
}
#endif

void gemm_accum_fp32_(const at::Tensor& out, const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "megallama::gemm_accum_fp32_";
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && out.dim() == 2, op,
              ": expected a [N, M], b [N, K], out [M, K]; got ", a_in.sizes(), ", ", b_in.sizes(), ", ", out.sizes());
  TORCH_CHECK(a_in.size(0) == b_in.size(0) && out.size(0) == a_in.size(1) && out.size(1) == b_in.size(1), op,
              ": shapes do not match: a ", a_in.sizes(), ", b ", b_in.sizes(), ", out ", out.sizes());
  const auto t = a_in.scalar_type();
  TORCH_CHECK(t == b_in.scalar_type() && (t == at::kBFloat16 || t == at::kHalf || t == at::kFloat), op,
              ": a and b must share one of bfloat16, float16, float32; got ", t, " and ", b_in.scalar_type());
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), op, ": out must be a contiguous float32 tensor");
  TORCH_CHECK(a_in.device() == out.device() && b_in.device() == out.device(), op, ": a, b and out must share a device");
  if (out.numel() == 0 || a_in.size(0) == 0) return;
  if (!out.is_cuda()) {
    out.addmm_(a_in.t().to(at::kFloat), b_in.to(at::kFloat));
    return;
  }
#ifdef MEGALLAMA_GEMM_ACCUM_CUDA
  c10::DeviceGuard guard(out.device());
  if (t == at::kFloat) {
    out.addmm_(a_in.t(), b_in);
  } else {
    gemm_cuda(out, as_rows(a_in), as_rows(b_in), op);
  }
#else
  TORCH_CHECK(false, op, ": megallama._C was built without cuBLAS (see gemm_accum_cuda_built())");
#endif
}

bool gemm_accum_cuda_built() {
#ifdef MEGALLAMA_GEMM_ACCUM_CUDA
  return true;
#else
  return false;
#endif
}

void register_kernels(torch::Library& m) { m.impl("gemm_accum_fp32_", &gemm_accum_fp32_); }

}  // namespace
}  // namespace megallama

TORCH_LIBRARY_FRAGMENT(megallama, m) {
  // out (fp32 [M, K]) += a^T b for a [N, M], b [N, K] of one type, accumulated in fp32.
  m.def("gemm_accum_fp32_(Tensor(a!) out, Tensor a, Tensor b) -> ()");
  m.def("gemm_accum_cuda_built() -> bool", &megallama::gemm_accum_cuda_built);
}

MEGALLAMA_IMPL_CPU_AND_CUDA(megallama::register_kernels)

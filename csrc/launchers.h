// The CUDA side of megallama._C as plain C++ declarations: raw pointers, element strides and a cudaStream_t passed
// as void*. The .cu files that define them include no torch header, which keeps nvcc's build short; the torch glue
// (allocation, dtype checks, streams) lives in the .cpp files. Each launcher returns a cudaError_t as int (0 = ok).
#pragma once

#include <cstdint>

namespace megallama {
namespace cuda {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

bool built();  // true when the CUDA sources were compiled in (MEGALLAMA_WITH_CUDA)
const char* error_string(int err);

// RMSNorm. x is [rows, H] (row stride x_rs), w [H] of type wt (== xt, or F32); y is of type (xt == wt ? xt : F32).
int rms_norm_fwd(DType xt, DType wt, const void* x, int64_t x_rs, const void* w, void* y, float* rstd,
                 int64_t rows, int64_t H, float eps, void* stream);
// Number of per-block dweight partial rows the backward needs (the caller allocates [parts, H] fp32).
int64_t rms_norm_bwd_parts(DType xt, DType wt, int64_t rows, int64_t H);
// dy has y's type and row stride dy_rs; dx is contiguous [rows, H] of type xt; dw [H] of type wt.
int rms_norm_bwd(DType xt, DType wt, const void* dy, int64_t dy_rs, const void* x, int64_t x_rs, const void* w,
                 const float* rstd, void* dx, float* dw_part, int64_t parts, void* dw, int64_t rows, int64_t H,
                 void* stream);

// RoPE on up to two tensors viewed as [B, S, nh, D] (element strides for b, s, h; d contiguous), e.g. q and k of
// one layer in one launch; out may equal x (in place). nh = 0 leaves a view unused.
struct RopeView {
  const void* x;
  void* out;
  int64_t xb, xs, xh, ob, os, oh, nh;
};
// cos/sin are fp32 [*, S, D/2] with batch stride cb (0: shared) and seq stride cs. inverse: rotate by -angle.
int rope(DType t, const RopeView& a, const RopeView& b, const float* cos, const float* sin, int64_t cb, int64_t cs,
         int64_t B, int64_t S, int64_t D, bool inverse, void* stream);

// SwiGLU on [rows, cols] views (row strides in elements; columns contiguous).
int swiglu_fwd(DType t, const void* g, int64_t g_rs, const void* u, int64_t u_rs, void* y, int64_t y_rs,
               int64_t rows, int64_t cols, void* stream);
int swiglu_bwd(DType t, const void* dy, int64_t dy_rs, const void* g, int64_t g_rs, const void* u, int64_t u_rs,
               void* dg, int64_t dg_rs, void* du, int64_t du_rs, int64_t rows, int64_t cols, void* stream);

}  // namespace cuda
}  // namespace megallama

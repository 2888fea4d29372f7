// Op schemas of megallama._C (torch.ops.megallama.*) and the Python module entry point.
//
// The ops are plain dispatcher ops: CPU and CUDA kernels are registered next to each kernel, the fake (meta)
// kernels and autograd formulas in megallama/ops/_registry.py, so torch.compile traces through them without a
// graph break. Other csrc files may add ops with TORCH_LIBRARY_FRAGMENT(megallama, m).
#include <Python.h>

#include "common.h"

TORCH_LIBRARY(megallama, m) {
  m.def("cuda_built() -> bool", [] { return megallama::cuda::built(); });
  // RMSNorm: returns (y, rstd); rstd is the fp32 (fp64 for fp64 x) inverse rms per row, all the backward keeps.
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  // RoPE on x [b, s, h, d] (any strides with contiguous d); cos/sin [b or 1, s, d/2].
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, bool inverse) -> ()");
  // q and k of one layer (same b, s, d; any head counts) in one launch.
  m.def("rope_qk_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)");
  // SwiGLU: silu(gate) * up, from two tensors or from one packed [..., 2f] projection output.
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("swiglu_packed_fwd(Tensor gate_up) -> Tensor");
  m.def("swiglu_packed_bwd(Tensor dy, Tensor gate_up) -> Tensor");
}

#ifndef MEGALLAMA_WITH_CUDA
// CPU-only build: the CUDA dispatch keys get no kernels, so these are never reached; they only satisfy the linker.
namespace megallama {
namespace cuda {
bool built() { return false; }
const char* error_string(int) { return "megallama._C was built without CUDA"; }
int rms_norm_fwd(DType, DType, const void*, int64_t, const void*, void*, float*, int64_t, int64_t, float, void*) {
  return -1;
}
int64_t rms_norm_bwd_parts(DType, DType, int64_t, int64_t) { return 1; }
int rms_norm_bwd(DType, DType, const void*, int64_t, const void*, int64_t, const void*, const float*, void*, float*,
                 int64_t, void*, int64_t, int64_t, void*) {
  return -1;
}
int rope(DType, const RopeView&, const RopeView&, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
         int64_t, bool, void*) {
  return -1;
}
int swiglu_fwd(DType, const void*, int64_t, const void*, int64_t, void*, int64_t, int64_t, int64_t, void*) {
  return -1;
}
int swiglu_bwd(DType, const void*, int64_t, const void*, int64_t, const void*, int64_t, void*, int64_t, void*,
               int64_t, int64_t, int64_t, void*) {
  return -1;
}
}  // namespace cuda
}  // namespace megallama
#endif

// Importing megallama._C registers the ops above; the module itself holds nothing.
static struct PyModuleDef megallama_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&megallama_module); }

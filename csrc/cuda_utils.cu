// The CUDA build's answers to launchers.h's built() and error_string() (bindings.cpp has the CPU-only ones).
#include "cuda_common.cuh"

namespace megallama {
namespace cuda {

bool built() { return true; }

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace megallama

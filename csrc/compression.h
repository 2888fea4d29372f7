// Gradient-compression kernels (CUDA launchers): 1-bit sign packing with a per-chunk scale, top-k selection, both
// with error feedback, and their unpacking. Plain C++ declarations in the style of launchers.h (raw pointers, a
// cudaStream_t passed as void*, a cudaError_t returned as int) so the .cu file includes no torch header.
//
// Formats shared by the CPU and CUDA kernels (and the PyTorch references in megallama/ops/compression.py):
//  * 1-bit: element i of a chunk is bit (i % 8) (least significant first) of byte i / 8; 1 means +scale, 0 -scale;
//    chunks are chunk_size elements (a multiple of 8, so chunks start on a byte) with one fp32 scale each, the mean
//    |c| of the chunk (the scale that minimises ||c - scale * sign(c)||).
//  * top-k: the k largest |c|, ties to the lower index, as fp32 values and int32 indices in ascending index order.
// c = x + error is formed in fp32; the error buffer (fp32) keeps what was not sent: c - decompressed(c).
#pragma once

#include <cstdint>

#include "launchers.h"

namespace megallama {
namespace cuda {

// x: n elements of type xt; error: n fp32 (read, then overwritten with the new residual); packed: ceil(n/8) bytes;
// scales: ceil(n/chunk) fp32.
int onebit_pack(DType xt, const void* x, float* error, uint8_t* packed, float* scales, int64_t n, int64_t chunk,
                void* stream);
// out[i] = alpha * sum over rows r of (+-scale[r][i / chunk]); packed is [rows, ceil(n/8)], scales [rows, nchunks].
int onebit_unpack(const uint8_t* packed, const float* scales, float* out, int64_t rows, int64_t n, int64_t chunk,
                  float alpha, void* stream);

// Scratch bytes topk_pack needs for n elements (the caller allocates them on the device, 16-byte aligned).
int64_t topk_workspace_bytes(int64_t n);
// error += x; the k (1 <= k <= n < 2^31) largest |error| go to values/indices and become 0 in error.
int topk_pack(DType xt, const void* x, float* error, float* values, int32_t* indices, int64_t n, int64_t k,
              void* workspace, void* stream);
// out (n fp32, zeroed by the caller) = alpha * sum over rows of the scattered values; values/indices are [rows, k].
// mask: ceil(n / 32) words zeroed by the caller (unused when alpha == 1).
int topk_unpack(const float* values, const int32_t* indices, float* out, int64_t rows, int64_t k, int64_t n,
                float alpha, uint32_t* mask, void* stream);

}  // namespace cuda
}  // namespace megallama

// 1-bit compression CUDA kernels (formats and semantics in compression.h; CPU twins in compression.cpp).
//
// Pack: one block per chunk. Chunks of up to kThreads * 8 * kPackOctets elements (the default 2048 among them)
// keep each thread's octets of c = x + error in registers: one read of x and e, one write of e and the signs
// (12 bytes per fp32 element, the minimum). Larger chunks take two passes over the error buffer. Unpack: one thread
// per octet (one byte and one scale per row), rows summed in order, so the result is bit-identical to the CPU
// kernel and to the reference.
#include "compression.h"
#include "cuda_common.cuh"

namespace megallama {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPackOctets = 2;  // octets per thread held in registers by the one-pass 1-bit pack

// 8 consecutive elements from i (< hi): one 16-byte-or-wider access when the octet is whole and the base aligned.
template <typename T>
__device__ __forceinline__ void load_octet(const T* p, int64_t i, int64_t hi, bool vec, float (&v)[8]) {
  if (vec && i + 8 <= hi) {
    load<T, 8>(p + i, v);
  } else {
#pragma unroll
    for (int b = 0; b < 8; ++b) v[b] = i + b < hi ? to_f(p[i + b]) : 0.f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    onebit_pack_registers_kernel(const T* __restrict__ x, float* __restrict__ e, uint8_t* __restrict__ packed,
                                 float* __restrict__ scales, int64_t n, int64_t chunk, bool vec) {
  __shared__ float smem[33];
  const int64_t lo = int64_t(blockIdx.x) * chunk;
  const int64_t hi = lo + chunk < n ? lo + chunk : n;
  float c[kPackOctets][8];
  float s = 0.f;
#pragma unroll
  for (int o = 0; o < kPackOctets; ++o) {
    const int64_t i = lo + 8 * (int64_t(o) * kThreads + threadIdx.x);
    if (i < hi) {
      float xv[8];
      load_octet(x, i, hi, vec, xv);
      load_octet(static_cast<const float*>(e), i, hi, vec, c[o]);
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        c[o][b] += xv[b];
        s += i + b < hi ? fabsf(c[o][b]) : 0.f;
      }
    }
  }
  const float scale = block_sum(s, smem) / static_cast<float>(hi - lo);
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
#pragma unroll
  for (int o = 0; o < kPackOctets; ++o) {
    const int64_t i = lo + 8 * (int64_t(o) * kThreads + threadIdx.x);
    if (i < hi) {
      uint32_t byte = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const bool pos = c[o][b] >= 0.f;
        byte |= uint32_t(pos && i + b < hi) << b;  // bits past the end stay 0, as on the CPU
        c[o][b] -= pos ? scale : -scale;
      }
      packed[i / 8] = static_cast<uint8_t>(byte);
      if (vec && i + 8 <= hi) {
        store<float, 8>(e + i, c[o]);
      } else {
        for (int b = 0; b < 8 && i + b < hi; ++b) e[i + b] = c[o][b];
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    onebit_pack_kernel(const T* __restrict__ x, float* __restrict__ e, uint8_t* __restrict__ packed,
                       float* __restrict__ scales, int64_t n, int64_t chunk) {
  __shared__ float smem[33];
  const int64_t lo = int64_t(blockIdx.x) * chunk;
  const int64_t hi = lo + chunk < n ? lo + chunk : n;
  float s = 0.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const float c = to_f(x[i]) + e[i];
    e[i] = c;
    s += fabsf(c);
  }
  const float scale = block_sum(s, smem) / static_cast<float>(hi - lo);
  __syncthreads();  // every c of the chunk is in e before any thread packs
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
  for (int64_t j = lo / 8 + threadIdx.x; j < (hi + 7) / 8; j += kThreads) {
    uint32_t byte = 0;
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int64_t i = 8 * j + b;
      if (i < hi) {
        const float c = e[i];
        const bool pos = c >= 0.f;
        byte |= uint32_t(pos) << b;
        e[i] = c - (pos ? scale : -scale);
      }
    }
    packed[j] = static_cast<uint8_t>(byte);
  }
}

__global__ void onebit_unpack_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales,
                                     float* __restrict__ out, int64_t rows, int64_t n, int64_t chunk, float alpha,
                                     bool vec) {
  const int64_t nbytes = (n + 7) / 8, nchunks = (n + chunk - 1) / chunk;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < nbytes;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = 8 * j, c = i / chunk;  // chunk is a multiple of 8: the octet has one scale per row
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t r = 0; r < rows; ++r) {
      const float s = scales[r * nchunks + c];
      const uint32_t byte = packed[r * nbytes + j];
#pragma unroll
      for (int b = 0; b < 8; ++b) acc[b] += ((byte >> b) & 1u) ? s : -s;
    }
    if (alpha != 1.f) {
#pragma unroll
      for (int b = 0; b < 8; ++b) acc[b] *= alpha;
    }
    if (vec && i + 8 <= n) {
      store<float, 8>(out + i, acc);
    } else {
      for (int b = 0; b < 8 && i + b < n; ++b) out[i + b] = acc[b];
    }
  }
}

}  // namespace

int onebit_pack(DType xt, const void* x, float* error, uint8_t* packed, float* scales, int64_t n, int64_t chunk,
                void* stream) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nchunks > 2147483647LL) return static_cast<int>(cudaErrorInvalidConfiguration);
  const bool vec = aligned16(x) && aligned16(error);
  return dispatch(xt, [&](auto tag) {
    using T = decltype(tag);
    const auto s = static_cast<cudaStream_t>(stream);
    if (chunk <= int64_t(kThreads) * 8 * kPackOctets) {
      onebit_pack_registers_kernel<T><<<unsigned(nchunks), kThreads, 0, s>>>(
          static_cast<const T*>(x), error, packed, scales, n, chunk, vec);
    } else {
      onebit_pack_kernel<T><<<unsigned(nchunks), kThreads, 0, s>>>(static_cast<const T*>(x), error, packed, scales,
                                                                    n, chunk);
    }
    return last_error();
  });
}

int onebit_unpack(const uint8_t* packed, const float* scales, float* out, int64_t rows, int64_t n, int64_t chunk,
                  float alpha, void* stream) {
  onebit_unpack_kernel<<<grid_for((n + 7) / 8, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, scales, out, rows, n, chunk, alpha, aligned16(out));
  return last_error();
}

}  // namespace cuda
}  // namespace megallama

// SwiGLU CUDA kernels (see swiglu.cpp for the math).
//
// [rows, cols] operands with their own row strides (a packed [gate, up] tensor is two views of one buffer). When
// all rows are contiguous the launcher flattens to one row. Each thread handles ITEMS 16-byte packs per operand,
// all loaded before the first use; blockIdx.y walks rows so no thread ever divides by the row length.
#include "cuda_common.cuh"

namespace megallama {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> ld(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// Raw 16-bit packs stay packed in registers until used: half the registers of fp32 copies, more loads in flight.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_kernel(const T* __restrict__ g, int64_t g_rs, const T* __restrict__ u, int64_t u_rs,
                      T* __restrict__ y, int64_t y_rs, int64_t rows, int64_t nvec) {
  const int64_t base = int64_t(blockIdx.x) * kThreads * ITEMS + threadIdx.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    Pack<T, VEC> gp[ITEMS], up[ITEMS];
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t cv = base + it * kThreads;
      if (cv < nvec) {
        gp[it] = ld<T, VEC>(g + r * g_rs + cv * VEC);
        up[it] = ld<T, VEC>(u + r * u_rs + cv * VEC);
      }
    }
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t cv = base + it * kThreads;
      if (cv < nvec) {
        Pack<T, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float x = to_f(gp[it].v[k]);
          o.v[k] = from_f<T>(x * sigmoid(x) * to_f(up[it].v[k]));
        }
        *reinterpret_cast<Pack<T, VEC>*>(y + r * y_rs + cv * VEC) = o;
      }
    }
  }
}

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(const T* __restrict__ dy, int64_t dy_rs, const T* __restrict__ g, int64_t g_rs,
                      const T* __restrict__ u, int64_t u_rs, T* __restrict__ dg, int64_t dg_rs, T* __restrict__ du,
                      int64_t du_rs, int64_t rows, int64_t nvec) {
  const int64_t base = int64_t(blockIdx.x) * kThreads * ITEMS + threadIdx.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    Pack<T, VEC> dp[ITEMS], gp[ITEMS], up[ITEMS];
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t cv = base + it * kThreads;
      if (cv < nvec) {
        dp[it] = ld<T, VEC>(dy + r * dy_rs + cv * VEC);
        gp[it] = ld<T, VEC>(g + r * g_rs + cv * VEC);
        up[it] = ld<T, VEC>(u + r * u_rs + cv * VEC);
      }
    }
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t cv = base + it * kThreads;
      if (cv < nvec) {
        Pack<T, VEC> og, ou;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float x = to_f(gp[it].v[k]), d = to_f(dp[it].v[k]), s = sigmoid(x);
          ou.v[k] = from_f<T>(d * x * s);
          og.v[k] = from_f<T>(d * to_f(up[it].v[k]) * s * (1.f + x * (1.f - s)));
        }
        *reinterpret_cast<Pack<T, VEC>*>(dg + r * dg_rs + cv * VEC) = og;
        *reinterpret_cast<Pack<T, VEC>*>(du + r * du_rs + cv * VEC) = ou;
      }
    }
  }
}

// Flattened geometry of one launch: (rows, cols, strides) with one row when every operand is contiguous.
struct Geo {
  int64_t rows, cols;
  bool flat;
};

Geo geometry(int64_t rows, int64_t cols, std::initializer_list<int64_t> strides) {
  bool flat = true;
  for (int64_t s : strides) flat = flat && (s == cols || rows == 1);
  return flat ? Geo{1, rows * cols, true} : Geo{rows, cols, false};
}

bool vec_ok(int64_t cols, int vec, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs) {
  if (cols % vec) return false;
  for (int64_t s : strides)
    if (s % vec) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

dim3 grid_for(const Geo& geo, int64_t nvec, int items) {
  const int64_t per_block = int64_t(kThreads) * items;
  const int64_t gx = (nvec + per_block - 1) / per_block;
  const int64_t gy = geo.rows < 65535 ? geo.rows : 65535;
  return dim3(unsigned(gx), unsigned(gy));
}

}  // namespace

int swiglu_fwd(DType t, const void* g, int64_t g_rs, const void* u, int64_t u_rs, void* y, int64_t y_rs,
               int64_t rows, int64_t cols, void* stream) {
  constexpr int ITEMS = 4;
  const Geo geo = geometry(rows, cols, {g_rs, u_rs, y_rs});
  if (geo.flat) g_rs = u_rs = y_rs = 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool v = vec_ok(geo.cols, V, {g_rs, u_rs, y_rs}, {g, u, y});
    const int64_t nvec = v ? geo.cols / V : geo.cols;
    const auto k = v ? &swiglu_fwd_kernel<T, V, ITEMS> : &swiglu_fwd_kernel<T, 1, ITEMS>;
    k<<<grid_for(geo, nvec, ITEMS), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(g), g_rs, static_cast<const T*>(u), u_rs, static_cast<T*>(y), y_rs, geo.rows, nvec);
    return last_error();
  });
}

int swiglu_bwd(DType t, const void* dy, int64_t dy_rs, const void* g, int64_t g_rs, const void* u, int64_t u_rs,
               void* dg, int64_t dg_rs, void* du, int64_t du_rs, int64_t rows, int64_t cols, void* stream) {
  constexpr int ITEMS = 4;
  const Geo geo = geometry(rows, cols, {dy_rs, g_rs, u_rs, dg_rs, du_rs});
  if (geo.flat) dy_rs = g_rs = u_rs = dg_rs = du_rs = 0;
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool v = vec_ok(geo.cols, V, {dy_rs, g_rs, u_rs, dg_rs, du_rs}, {dy, g, u, dg, du});
    const int64_t nvec = v ? geo.cols / V : geo.cols;
    const auto k = v ? &swiglu_bwd_kernel<T, V, ITEMS> : &swiglu_bwd_kernel<T, 1, ITEMS>;
    k<<<grid_for(geo, nvec, ITEMS), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(dy), dy_rs, static_cast<const T*>(g), g_rs, static_cast<const T*>(u), u_rs,
        static_cast<T*>(dg), dg_rs, static_cast<T*>(du), du_rs, geo.rows, nvec);
    return last_error();
  });
}

}  // namespace cuda
}  // namespace megallama

// RMSNorm CUDA kernels (see rms_norm.cpp for the math and the dtype rules).
//
// A block owns one row at a time; thread t keeps columns {(i * blockDim + t) * VEC + k} in registers, loaded with
// 16-byte accesses, so x is read once. The backward is persistent (a grid sized to fill the GPU once): each thread
// accumulates dweight for its own columns in registers across the rows it visits and prefetches its next row while
// finishing the current one; one fp32 partial row per block is then summed by a second small kernel (no atomics).
#include <cstdlib>

#include "cuda_common.cuh"

namespace megallama {
namespace cuda {
namespace {

// Most threads per row for each VPT: also the kernel's __launch_bounds__, which caps its registers (64 at 1024,
// 128 at 512, 255 at 256); pick() never launches more. VPT = 16 is the big-row fallback and may spill.
constexpr int bounds(int vpt) { return vpt == 1 || vpt >= 16 ? 1024 : vpt == 2 ? 512 : 256; }

template <typename T, typename W, int VEC, int VPT>
__global__ void __launch_bounds__(bounds(VPT))
    rms_fwd_kernel(const T* __restrict__ x, int64_t x_rs, const W* __restrict__ w, W* __restrict__ y,
                   float* __restrict__ rstd, int64_t H, float eps) {
  __shared__ float smem[33];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_rs;
  Pack<T, VEC> xp[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
    if (c < H) {
      xp[i] = *reinterpret_cast<const Pack<T, VEC>*>(xr + c);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) xp[i].v[k] = from_f<T>(0.f);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float f = to_f(xp[i].v[k]);
      ss += f * f;
    }
  ss = block_sum(ss, smem);
  const float inv = rsqrtf(ss / float(H) + eps);
  if (threadIdx.x == 0) rstd[row] = inv;
  W* yr = y + row * H;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
    if (c < H) {
      const Pack<W, VEC> wp = *reinterpret_cast<const Pack<W, VEC>*>(w + c);
      Pack<W, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = from_f<W>(to_f(wp.v[k]) * to_f(from_f<T>(to_f(xp[i].v[k]) * inv)));
      *reinterpret_cast<Pack<W, VEC>*>(yr + c) = o;
    }
  }
}

template <typename T, typename W, int VEC, int VPT>
__global__ void __launch_bounds__(bounds(VPT))
    rms_bwd_kernel(const W* __restrict__ dy, int64_t dy_rs, const T* __restrict__ x, int64_t x_rs,
                   const W* __restrict__ w, const float* __restrict__ rstd, T* __restrict__ dx,
                   float* __restrict__ dw_part, int64_t rows, int64_t H) {
  __shared__ float smem[33];
  Pack<W, VEC> wp[VPT];
  Pack<T, VEC> xn[VPT];
  Pack<W, VEC> dn[VPT];
  float acc[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc[i][k] = 0.f;
      wp[i].v[k] = from_f<W>(0.f);
      xn[i].v[k] = from_f<T>(0.f);
      dn[i].v[k] = from_f<W>(0.f);
    }
    if (c < H) wp[i] = *reinterpret_cast<const Pack<W, VEC>*>(w + c);
  }
  // Columns past H stay zero in every pack, so they add nothing to the sums below.
  auto fetch = [&](int64_t r) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
      if (c < H) {
        xn[i] = *reinterpret_cast<const Pack<T, VEC>*>(x + r * x_rs + c);
        dn[i] = *reinterpret_cast<const Pack<W, VEC>*>(dy + r * dy_rs + c);
      }
    }
  };
  int64_t row = blockIdx.x;
  float rn = 0.f;
  if (row < rows) {
    fetch(row);
    rn = rstd[row];
  }
  while (row < rows) {
    Pack<T, VEC> xc[VPT];
    Pack<W, VEC> dc[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      xc[i] = xn[i];
      dc[i] = dn[i];
    }
    const float inv = rn;
    const int64_t next = row + gridDim.x;
    if (next < rows) {  // the next row's loads fly while this one is reduced and written
      fetch(next);
      rn = rstd[next];
    }
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += to_f(dc[i].v[k]) * to_f(wp[i].v[k]) * to_f(xc[i].v[k]);
    dot = block_sum(dot, smem);
    const float coef = inv * inv * dot / float(H);
    T* dxr = dx + row * H;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
      Pack<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xf = to_f(xc[i].v[k]), d = to_f(dc[i].v[k]);
        o.v[k] = from_f<T>(inv * (d * to_f(wp[i].v[k]) - xf * coef));
        acc[i][k] += d * to_f(from_f<T>(xf * inv));
      }
      if (c < H) *reinterpret_cast<Pack<T, VEC>*>(dxr + c) = o;
    }
    row = next;
  }
  float* pr = dw_part + int64_t(blockIdx.x) * H;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t c = (int64_t(i) * blockDim.x + threadIdx.x) * VEC;
    if (c < H) store<float, VEC>(pr + c, acc[i]);
  }
}

// dw[c] = sum over parts of dw_part[p][c]: 32 columns x 16 part-lanes per block, coalesced along columns.
template <typename W>
__global__ void __launch_bounds__(512)
    dw_reduce_kernel(const float* __restrict__ part, int64_t parts, int64_t H, W* __restrict__ dw) {
  __shared__ float s[16][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float a = 0.f;
  if (c < H) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < parts; p += 16) a += part[p * H + c];
  }
  s[threadIdx.y][threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.y == 0) {
#pragma unroll
    for (int j = 1; j < 16; ++j) a += s[j][threadIdx.x];
    if (c < H) dw[c] = from_f<W>(a);
  }
}

struct Cfg {
  int vec, vpt, threads;
};

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : dflt;
}

// Threads per row near `target` (a tuning knob, MEGALLAMA_RMS_*_THREADS), each holding VPT packs of VEC elements.
Cfg pick(int64_t H, int vec, int target) {
  auto up32 = [](int64_t n) { return int((n + 31) / 32 * 32); };
  if (vec == 1) return {1, 16, up32((H + 15) / 16)};
  const int64_t nvec = H / vec;
  for (int vpt : {1, 2, 4, 8}) {
    const int64_t threads = up32((nvec + vpt - 1) / vpt);
    if (threads <= target && threads <= bounds(vpt)) return {vec, vpt, int(threads)};
  }
  return {vec, 16, up32((nvec + 15) / 16)};
}

template <typename F>
int dispatch_xw(DType xt, DType wt, F&& f) {
  if (xt == wt) return dispatch(xt, [&](auto t) { return f(t, t); });
  if (wt == DType::F32 && xt == DType::BF16) return f(__nv_bfloat16{}, float{});
  if (wt == DType::F32 && xt == DType::F16) return f(__half{}, float{});
  return static_cast<int>(cudaErrorInvalidValue);
}

// The scalar path (VEC == 1) only needs the VPT = 16 instance; all instances of one (T, W) share a signature.
#define MEGALLAMA_VPT_CASES(KERNEL, ...)        \
  if constexpr (VEC == 1) {                     \
    return &KERNEL<__VA_ARGS__, 16>;            \
  } else {                                      \
    switch (vpt) {                              \
      case 1: return &KERNEL<__VA_ARGS__, 1>;   \
      case 2: return &KERNEL<__VA_ARGS__, 2>;   \
      case 4: return &KERNEL<__VA_ARGS__, 4>;   \
      case 8: return &KERNEL<__VA_ARGS__, 8>;   \
      default: return &KERNEL<__VA_ARGS__, 16>; \
    }                                           \
  }

template <typename T, typename W, int VEC>
auto fwd_kernel(int vpt) -> decltype(&rms_fwd_kernel<T, W, VEC, 16>) {
  MEGALLAMA_VPT_CASES(rms_fwd_kernel, T, W, VEC)
}

template <typename T, typename W, int VEC>
auto bwd_kernel(int vpt) -> decltype(&rms_bwd_kernel<T, W, VEC, 16>) {
  MEGALLAMA_VPT_CASES(rms_bwd_kernel, T, W, VEC)
}

template <typename T>
constexpr int kVec = 16 / sizeof(T);

bool fwd_vec_ok(const void* x, int64_t x_rs, const void* w, const void* y, int64_t H, int vec) {
  return H % vec == 0 && x_rs % vec == 0 && aligned16(x) && aligned16(w) && aligned16(y);
}

int64_t bwd_grid(const void* kernel, int threads, int64_t rows) {
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  const int64_t g = int64_t(sm_count()) * (per_sm > 0 ? per_sm : 1);
  return rows < g ? rows : g;
}

}  // namespace

int rms_norm_fwd(DType xt, DType wt, const void* x, int64_t x_rs, const void* w, void* y, float* rstd, int64_t rows,
                 int64_t H, float eps, void* stream) {
  const int target = env_int("MEGALLAMA_RMS_FWD_THREADS", 256);
  return dispatch_xw(xt, wt, [&](auto tx, auto tw) {
    using T = decltype(tx);
    using W = decltype(tw);
    const bool v = fwd_vec_ok(x, x_rs, w, y, H, kVec<T>);
    const Cfg cfg = pick(H, v ? kVec<T> : 1, target);
    if (cfg.threads > 1024) return static_cast<int>(cudaErrorInvalidValue);
    auto k = v ? fwd_kernel<T, W, kVec<T>>(cfg.vpt) : fwd_kernel<T, W, 1>(cfg.vpt);
    k<<<dim3(unsigned(rows)), cfg.threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), x_rs, static_cast<const W*>(w), static_cast<W*>(y), rstd, H, eps);
    return last_error();
  });
}

namespace {
// The backward's launch plan, shared by rms_norm_bwd_parts (the caller's allocation) and rms_norm_bwd.
template <typename T, typename W>
std::pair<decltype(&rms_bwd_kernel<T, W, 1, 16>), Cfg> bwd_plan(bool v, int64_t H) {
  const int target = env_int("MEGALLAMA_RMS_BWD_THREADS", 512);
  const Cfg cfg = pick(H, v ? kVec<T> : 1, target);
  return {v ? bwd_kernel<T, W, kVec<T>>(cfg.vpt) : bwd_kernel<T, W, 1>(cfg.vpt), cfg};
}
}  // namespace

// The vector path also needs 16-byte aligned pointers, which this query cannot see: it sizes for both plans.
int64_t rms_norm_bwd_parts(DType xt, DType wt, int64_t rows, int64_t H) {
  int64_t parts = 1;
  dispatch_xw(xt, wt, [&](auto tx, auto tw) {
    using T = decltype(tx);
    using W = decltype(tw);
    for (bool v : {true, false}) {
      if (v && H % kVec<T> != 0) continue;
      auto plan = bwd_plan<T, W>(v, H);
      const int64_t p = bwd_grid(reinterpret_cast<const void*>(plan.first), plan.second.threads, rows);
      parts = p > parts ? p : parts;
    }
    return 0;
  });
  return parts;
}

int rms_norm_bwd(DType xt, DType wt, const void* dy, int64_t dy_rs, const void* x, int64_t x_rs, const void* w,
                 const float* rstd, void* dx, float* dw_part, int64_t parts, void* dw, int64_t rows, int64_t H,
                 void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_xw(xt, wt, [&](auto tx, auto tw) {
    using T = decltype(tx);
    using W = decltype(tw);
    const int vec = kVec<T>;
    const bool v = fwd_vec_ok(x, x_rs, w, dx, H, vec) && dy_rs % vec == 0 && aligned16(dy);
    auto plan = bwd_plan<T, W>(v, H);
    if (plan.second.threads > 1024) return static_cast<int>(cudaErrorInvalidValue);
    int64_t grid = bwd_grid(reinterpret_cast<const void*>(plan.first), plan.second.threads, rows);
    grid = grid < parts ? grid : parts;
    plan.first<<<dim3(unsigned(grid)), plan.second.threads, 0, st>>>(
        static_cast<const W*>(dy), dy_rs, static_cast<const T*>(x), x_rs, static_cast<const W*>(w), rstd,
        static_cast<T*>(dx), dw_part, rows, H);
    int err = last_error();
    if (err) return err;
    dw_reduce_kernel<W><<<dim3(unsigned((H + 31) / 32)), dim3(32, 16), 0, st>>>(dw_part, grid, H,
                                                                                static_cast<W*>(dw));
    return last_error();
  });
}

}  // namespace cuda
}  // namespace megallama

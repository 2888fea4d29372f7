// RoPE CUDA kernel (see rope.cpp for the math and the layouts).
//
// One block per token (b, s): thread (j, h0) loads its VEC cos/sin values once and rotates pack j of heads
// h0, h0 + HPB, ... two heads per step so four 16-byte loads are in flight before the first use. The heads of a
// token may come from two tensors (q then k: one launch per layer). The same kernel serves forward (sign +1),
// backward (sign -1, the inverse rotation) and in place (out == x: each element is read, then written, by one
// thread).
#include "cuda_common.cuh"

namespace megallama {
namespace cuda {
namespace {

template <typename T, int VEC>
__device__ __forceinline__ void rotate(const T* __restrict__ xp, T* __restrict__ op, int D2, const float (&c)[VEC],
                                       const float (&s)[VEC]) {
  float a[VEC], b[VEC], o1[VEC], o2[VEC];
  load<T, VEC>(xp, a);
  load<T, VEC>(xp + D2, b);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    o1[k] = a[k] * c[k] - b[k] * s[k];
    o2[k] = b[k] * c[k] + a[k] * s[k];
  }
  store<T, VEC>(op, o1);
  store<T, VEC>(op + D2, o2);
}

// One token's heads: 0 .. nha-1 from view a, then nhb from view b (q then k), pointers selected per head.
template <typename T>
struct Views {
  const T* xa;
  T* oa;
  int64_t xah, oah;
  const T* xb;
  T* ob;
  int64_t xbh, obh;
  int nha;
  __device__ __forceinline__ const T* x(int h) const { return h < nha ? xa + h * xah : xb + (h - nha) * xbh; }
  __device__ __forceinline__ T* o(int h) const { return h < nha ? oa + h * oah : ob + (h - nha) * obh; }
};

// Blocks have at most 128 threads (NJ * HPB <= 128).
template <typename T, int VEC>
__global__ void __launch_bounds__(128)
    rope_kernel(RopeView a, RopeView b, const float* __restrict__ cos, const float* __restrict__ sin, int64_t cb,
                int64_t cs, int64_t S, int D2, int NJ, int HPB, float sign) {
  const int64_t tok = blockIdx.x;
  const int64_t bi = tok / S, s = tok - bi * S;
  const int j = threadIdx.x % NJ, h0 = threadIdx.x / NJ;
  if (h0 >= HPB) return;
  const int d = j * VEC;
  float c[VEC], sn[VEC];
  load<float, VEC>(cos + bi * cb + s * cs + d, c);
  load<float, VEC>(sin + bi * cb + s * cs + d, sn);
#pragma unroll
  for (int k = 0; k < VEC; ++k) sn[k] *= sign;
  const Views<T> v{static_cast<const T*>(a.x) + bi * a.xb + s * a.xs + d,
                   static_cast<T*>(a.out) + bi * a.ob + s * a.os + d,
                   a.xh,
                   a.oh,
                   static_cast<const T*>(b.x) + bi * b.xb + s * b.xs + d,
                   static_cast<T*>(b.out) + bi * b.ob + s * b.os + d,
                   b.xh,
                   b.oh,
                   int(a.nh)};
  const int NH = int(a.nh + b.nh);
  int h = h0;
  for (; h + HPB < NH; h += 2 * HPB) {
    // Both heads' loads are issued before either store (the pointers are __restrict__: x and out of one head may
    // alias only element-for-element, read before written by this thread).
    const T* __restrict__ x0 = v.x(h);
    const T* __restrict__ x1 = v.x(h + HPB);
    using P = Pack<T, VEC>;  // raw packs: half the registers of fp32 copies for 16-bit types
    const P a0 = *reinterpret_cast<const P*>(x0), b0 = *reinterpret_cast<const P*>(x0 + D2);
    const P a1 = *reinterpret_cast<const P*>(x1), b1 = *reinterpret_cast<const P*>(x1 + D2);
    P o0, o1, o2, o3;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float p = to_f(a0.v[k]), q = to_f(b0.v[k]), r = to_f(a1.v[k]), t = to_f(b1.v[k]);
      o0.v[k] = from_f<T>(p * c[k] - q * sn[k]);
      o1.v[k] = from_f<T>(q * c[k] + p * sn[k]);
      o2.v[k] = from_f<T>(r * c[k] - t * sn[k]);
      o3.v[k] = from_f<T>(t * c[k] + r * sn[k]);
    }
    T* __restrict__ y0 = v.o(h);
    T* __restrict__ y1 = v.o(h + HPB);
    *reinterpret_cast<P*>(y0) = o0;
    *reinterpret_cast<P*>(y0 + D2) = o1;
    *reinterpret_cast<P*>(y1) = o2;
    *reinterpret_cast<P*>(y1 + D2) = o3;
  }
  if (h < NH) rotate<T, VEC>(v.x(h), v.o(h), D2, c, sn);
}

bool mult(int64_t v, int n) { return v % n == 0; }

bool view_ok(const RopeView& r, int V) {
  return r.nh == 0 || (mult(r.xb, V) && mult(r.xs, V) && mult(r.xh, V) && mult(r.ob, V) && mult(r.os, V) &&
                       mult(r.oh, V) && aligned16(r.x) && aligned16(r.out));
}

}  // namespace

int rope(DType t, const RopeView& a, const RopeView& b_in, const float* cos, const float* sin, int64_t cb, int64_t cs,
         int64_t B, int64_t S, int64_t D, bool inverse, void* stream) {
  const int64_t D2 = D / 2, NH = a.nh + b_in.nh;
  if (D2 > 128 || D % 2 || NH <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const RopeView b = b_in.nh ? b_in : RopeView{a.x, a.out, 0, 0, 0, 0, 0, 0, 0};
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool v = mult(D2, V) && mult(cb, V) && mult(cs, V) && aligned16(cos) && aligned16(sin) &&
                   view_ok(a, V) && view_ok(b, V);
    const int NJ = int(v ? D2 / V : D2);
    const int HPB = int(std::max<int64_t>(1, std::min<int64_t>(NH, 128 / NJ)));
    const auto k = v ? &rope_kernel<T, V> : &rope_kernel<T, 1>;
    const float sign = inverse ? -1.f : 1.f;
    k<<<dim3(unsigned(B * S)), NJ * HPB, 0, static_cast<cudaStream_t>(stream)>>>(a, b, cos, sin, cb, cs, S, int(D2),
                                                                              NJ, HPB, sign);
    return last_error();
  });
}

}  // namespace cuda
}  // namespace megallama

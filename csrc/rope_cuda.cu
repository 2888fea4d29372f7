// RoPE CUDA kernel (see rope.cpp for the math and the layouts).
//
// One block per token (b, s): thread (j, h0) loads its VEC cos/sin values once and rotates pack j of heads
// h0, h0 + HPB, ... two heads per step so four 16-byte loads are in flight before the first use. The same kernel
// serves forward (sign +1), backward (sign -1, the inverse rotation) and the in-place variant (out == x: every
// element is read and written by one thread, read first).
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

template <typename T, int VEC>
__global__ void __launch_bounds__(256)
    rope_kernel(const T* __restrict__ x, int64_t xb, int64_t xs, int64_t xh, T* __restrict__ out, int64_t ob,
                int64_t os, int64_t oh, const float* __restrict__ cos, const float* __restrict__ sin, int64_t cb,
                int64_t cs, int64_t S, int NH, int D2, int NJ, int HPB, float sign) {
  const int64_t tok = blockIdx.x;
  const int64_t b = tok / S, s = tok - b * S;
  const int j = threadIdx.x % NJ, h0 = threadIdx.x / NJ;
  if (h0 >= HPB) return;
  const int d = j * VEC;
  float c[VEC], sn[VEC];
  load<float, VEC>(cos + b * cb + s * cs + d, c);
  load<float, VEC>(sin + b * cb + s * cs + d, sn);
#pragma unroll
  for (int k = 0; k < VEC; ++k) sn[k] *= sign;
  const T* xt = x + b * xb + s * xs + d;
  T* ot = out + b * ob + s * os + d;
  int h = h0;
  for (; h + HPB < NH; h += 2 * HPB) {
    // Both heads' loads are issued before either store (rotate is inlined and the pointers are __restrict__).
    float a0[VEC], b0[VEC], a1[VEC], b1[VEC];
    load<T, VEC>(xt + h * xh, a0);
    load<T, VEC>(xt + h * xh + D2, b0);
    load<T, VEC>(xt + (h + HPB) * xh, a1);
    load<T, VEC>(xt + (h + HPB) * xh + D2, b1);
    float o[4][VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      o[0][k] = a0[k] * c[k] - b0[k] * sn[k];
      o[1][k] = b0[k] * c[k] + a0[k] * sn[k];
      o[2][k] = a1[k] * c[k] - b1[k] * sn[k];
      o[3][k] = b1[k] * c[k] + a1[k] * sn[k];
    }
    store<T, VEC>(ot + h * oh, o[0]);
    store<T, VEC>(ot + h * oh + D2, o[1]);
    store<T, VEC>(ot + (h + HPB) * oh, o[2]);
    store<T, VEC>(ot + (h + HPB) * oh + D2, o[3]);
  }
  if (h < NH) rotate<T, VEC>(xt + h * xh, ot + h * oh, D2, c, sn);
}

bool mult(int64_t v, int n) { return v % n == 0; }

}  // namespace

int rope(DType t, const void* x, int64_t xb, int64_t xs, int64_t xh, void* out, int64_t ob, int64_t os, int64_t oh,
         const float* cos, const float* sin, int64_t cb, int64_t cs, int64_t B, int64_t S, int64_t NH, int64_t D,
         bool inverse, void* stream) {
  const int64_t D2 = D / 2;
  if (D2 > 128 || D % 2) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool v = mult(D2, V) && mult(xb, V) && mult(xs, V) && mult(xh, V) && mult(ob, V) && mult(os, V) &&
                   mult(oh, V) && mult(cb, V) && mult(cs, V) && aligned16(x) && aligned16(out) && aligned16(cos) &&
                   aligned16(sin);
    const int NJ = int(v ? D2 / V : D2);
    const int HPB = int(std::max<int64_t>(1, std::min<int64_t>(NH, 128 / NJ)));
    const auto k = v ? &rope_kernel<T, V> : &rope_kernel<T, 1>;
    const float sign = inverse ? -1.f : 1.f;
    k<<<dim3(unsigned(B * S)), NJ * HPB, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), xb, xs, xh, static_cast<T*>(out), ob, os, oh, cos, sin, cb, cs, S, int(NH),
        int(D2), NJ, HPB, sign);
    return last_error();
  });
}

}  // namespace cuda
}  // namespace megallama

// Rotary position embedding ("rotate_half" layout): the CPU kernel and the torch glue of both devices.
//
// out[..., :d/2] = x1 cos - x2 sin, out[..., d/2:] = x2 cos + x1 sin, computed in fp32 (fp64 for fp64 input) from
// fp32 cos/sin tables, so any frequency scheme (Llama 3.1 scaling included) is the caller's table. x is viewed as
// [b, s, h, d] with any strides and a contiguous d: the (b, h, s, d) layout is a transposed view of it, no copy.
// The backward is the inverse rotation (inverse=true negates sin).
#include <ATen/ops/empty_like.h>

#include "common.h"

namespace megallama {
namespace {

template <typename T>
void rope_cpu(const T* x, int64_t xb, int64_t xs, int64_t xh, T* out, int64_t ob, int64_t os, int64_t oh,
              const acc_type_t<T>* cos, const acc_type_t<T>* sin, int64_t cb, int64_t cs, int64_t B, int64_t S,
              int64_t NH, int64_t D, bool inverse) {
  using A = acc_type_t<T>;
  const int64_t D2 = D / 2;
  const A sign = inverse ? A(-1) : A(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(NH * D, 1));
  at::parallel_for(0, B * S, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / S, s = t % S;
      const A* cr = cos + b * cb + s * cs;
      const A* sr = sin + b * cb + s * cs;
      for (int64_t h = 0; h < NH; ++h) {
        const T* xp = x + b * xb + s * xs + h * xh;
        T* op = out + b * ob + s * os + h * oh;  // may equal xp (in place): each j reads before it writes
#pragma omp simd
        for (int64_t j = 0; j < D2; ++j) {
          const A x1 = static_cast<A>(xp[j]), x2 = static_cast<A>(xp[j + D2]);
          const A c = cr[j], sn = sign * sr[j];
          op[j] = static_cast<T>(x1 * c - x2 * sn);
          op[j + D2] = static_cast<T>(x2 * c + x1 * sn);
        }
      }
    }
  });
}

struct Tables {
  at::Tensor cos, sin;
  int64_t cb, cs;
};

Tables check_tables(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be [batch, seq, heads, head_dim], got ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, op, ": head_dim must be even, got ", D);
  TORCH_CHECK(cos.sizes() == sin.sizes(), op, ": cos ", cos.sizes(), " and sin ", sin.sizes(), " differ");
  TORCH_CHECK((cos.dim() == 2 || cos.dim() == 3) && cos.size(-1) == D / 2 && cos.size(-2) == S &&
                  (cos.dim() == 2 || cos.size(0) == 1 || cos.size(0) == B),
              op, ": cos/sin must be [seq, head_dim/2] or [batch, seq, head_dim/2], got ", cos.sizes(), " for x ",
              x.sizes());
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(cos.scalar_type() == want && sin.scalar_type() == want, op, ": cos/sin must be ", want);
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), op, ": cos/sin on another device than x");
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t cb = (cos.dim() == 3 && cos.size(0) == B && B > 1) ? S * (D / 2) : 0;
  return {c, s, cb, D / 2};
}

cuda::RopeView view(const at::Tensor& x, const at::Tensor& out) {
  return {x.data_ptr(), out.data_ptr(), x.stride(0), x.stride(1), x.stride(2),
          out.stride(0), out.stride(1), out.stride(2), x.size(2)};
}

// Rotates x into out, and x2 into out2 when given (one CUDA launch for both: q and k of a layer).
void run(const at::Tensor& x, const at::Tensor& out, const Tables& tb, bool inverse, const char* op,
         const at::Tensor* x2 = nullptr, const at::Tensor* out2 = nullptr) {
  const int64_t B = x.size(0), S = x.size(1), D = x.size(3);
  if (x.is_cuda()) {
    return launch_cuda(x, op, [&] {
      cuda::RopeView a = view(x, out), b = x2 ? view(*x2, *out2) : cuda::RopeView{};
      if (x.numel() == 0) a.nh = 0;
      if (x2 == nullptr || x2->numel() == 0) b.nh = 0;
      if (a.nh + b.nh == 0 || B * S == 0) return 0;  // nothing to rotate: no launch
      return cuda::rope(cuda_dtype(x.scalar_type()), a, b, tb.cos.data_ptr<float>(), tb.sin.data_ptr<float>(), tb.cb,
                        tb.cs, B, S, D, inverse, current_stream(x));
    });
  }
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_type_t<T>;
    for (int i = 0; i < (x2 ? 2 : 1); ++i) {
      const at::Tensor& xi = i ? *x2 : x;
      const at::Tensor& oi = i ? *out2 : out;
      if (xi.numel() == 0) continue;
      rope_cpu<T>(xi.data_ptr<T>(), xi.stride(0), xi.stride(1), xi.stride(2), oi.data_ptr<T>(), oi.stride(0),
                  oi.stride(1), oi.stride(2), tb.cos.data_ptr<A>(), tb.sin.data_ptr<A>(), tb.cb, tb.cs, B, S,
                  xi.size(2), D, inverse);
    }
  });
}

at::Tensor out_like(const at::Tensor& x) {
  at::Tensor out = at::empty_like(x);  // keeps x's layout when it is dense, e.g. a (b, h, s, d) transpose
  return out.stride(3) == 1 ? out : at::empty(x.sizes(), x.options());
}

at::Tensor rope_fwd(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const char* op = "megallama::rope_fwd";
  Tables tb = check_tables(x_in, cos, sin, op);
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  at::Tensor out = out_like(x);
  run(x, out, tb, inverse, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_qk_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                               const at::Tensor& sin, bool inverse) {
  const char* op = "megallama::rope_qk_fwd";
  Tables tb = check_tables(q_in, cos, sin, op);
  check_tables(k_in, cos, sin, op);
  TORCH_CHECK(q_in.size(0) == k_in.size(0) && q_in.size(1) == k_in.size(1) && q_in.size(3) == k_in.size(3) &&
                  q_in.scalar_type() == k_in.scalar_type(),
              op, ": q ", q_in.sizes(), " and k ", k_in.sizes(), " must share batch, seq, head_dim and dtype");
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  at::Tensor qo = out_like(q), ko = out_like(k);
  run(q, qo, tb, inverse, op, &k, &ko);
  return {qo, ko};
}

void rope_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const char* op = "megallama::rope_";
  Tables tb = check_tables(x, cos, sin, op);
  if (x.stride(3) == 1) return run(x, x, tb, inverse, op);
  at::Tensor tmp = x.contiguous();
  run(tmp, tmp, tb, inverse, op);
  const_cast<at::Tensor&>(x).copy_(tmp);
}

void register_kernels(torch::Library& m) {
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_", &rope_);
  m.impl("rope_qk_fwd", &rope_qk_fwd);
}

}  // namespace
}  // namespace megallama

MEGALLAMA_IMPL_CPU_AND_CUDA(megallama::register_kernels)

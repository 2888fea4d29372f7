// RMSNorm forward/backward: the CPU kernel and the torch glue of both devices.
//
// y = w * cast_T(x * rstd), rstd = 1/sqrt(mean(x^2) + eps), statistics in fp32 (fp64 for fp64 input), exactly the
// rounding of the PyTorch reference (HF Llama). The weight has x's dtype or is fp32; y has the weight's dtype (the
// reference's type promotion). The forward saves only rstd; the backward reduces dweight per thread then once.
#include <cmath>
#include <vector>

#include "common.h"

namespace megallama {
namespace {

template <typename T, typename W>
void fwd_cpu(const T* x, int64_t x_rs, const W* w, W* y, acc_type_t<T>* rstd, int64_t rows, int64_t H,
             double eps) {
  using A = acc_type_t<T>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(H);
    A* b = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_rs;
      A ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < H; ++c) {
        const A v = static_cast<A>(xr[c]);
        b[c] = v;
        ss += v * v;
      }
      const A inv = A(1) / std::sqrt(ss / A(H) + A(eps));
      rstd[r] = inv;
      W* yr = y + r * H;
#pragma omp simd
      for (int64_t c = 0; c < H; ++c) {
        yr[c] = static_cast<W>(static_cast<A>(w[c]) * static_cast<A>(static_cast<T>(b[c] * inv)));
      }
    }
  });
}

template <typename T, typename W>
void bwd_cpu(const W* dy, int64_t dy_rs, const T* x, int64_t x_rs, const W* w, const acc_type_t<T>* rstd, T* dx,
             W* dw, int64_t rows, int64_t H) {
  using A = acc_type_t<T>;
  // One dweight partial per thread chunk (no shared accumulator), summed in a second pass.
  const int64_t nchunk = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  std::vector<A> part(nchunk * H, A(0));
  at::parallel_for(0, nchunk, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      A* dwp = part.data() + ch * H;
      for (int64_t r = rows * ch / nchunk; r < rows * (ch + 1) / nchunk; ++r) {
        const T* xr = x + r * x_rs;
        const W* dyr = dy + r * dy_rs;
        T* dxr = dx + r * H;
        const A inv = rstd[r];
        A dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < H; ++c) {
          const A xv = static_cast<A>(xr[c]), d = static_cast<A>(dyr[c]);
          dot += d * static_cast<A>(w[c]) * xv;
          dwp[c] += d * static_cast<A>(static_cast<T>(xv * inv));
        }
        // dx = inv * (g - n * mean(g * n)) with g = dy * w, n = x * inv.
        const A coef = inv * inv * dot / A(H);
#pragma omp simd
        for (int64_t c = 0; c < H; ++c) {
          const A g = static_cast<A>(dyr[c]) * static_cast<A>(w[c]);
          dxr[c] = static_cast<T>(inv * (g - static_cast<A>(xr[c]) * coef));
        }
      }
    }
  });
  at::parallel_for(0, H, 2048, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A s = 0;
      for (int64_t ch = 0; ch < nchunk; ++ch) s += part[ch * H + c];
      dw[c] = static_cast<W>(s);
    }
  });
}

// Calls f(Tag<T>{}, Tag<W>{}) for the supported (x, weight) dtype pairs: equal, or (bf16|fp16, fp32).
template <typename F>
void dispatch_xw(const at::Tensor& x, const at::Tensor& w, const char* op, F&& f) {
  const auto wt = w.scalar_type();
  dispatch_float(x.scalar_type(), op, [&](auto tx) {
    using T = typename decltype(tx)::type;
    if (wt == x.scalar_type()) return f(tx, tx);
    if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
      if (wt == at::kFloat) return f(tx, Tag<float>{});
    }
    TORCH_CHECK(false, op, ": weight dtype ", wt, " must equal x's (", x.scalar_type(), ") or be float32");
  });
}

void check_args(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.dim() == 1 && x.dim() >= 1 && w.size(0) == x.size(-1), op, ": weight shape ", w.sizes(),
              " does not match the last dim of x ", x.sizes());
  TORCH_CHECK(w.device() == x.device(), op, ": x and weight are on different devices");
  const auto xt = x.scalar_type(), wt = w.scalar_type();
  TORCH_CHECK(wt == xt || (wt == at::kFloat && (xt == at::kBFloat16 || xt == at::kHalf)), op, ": weight dtype ", wt,
              " must equal x's (", xt, ") or be float32 for a 16-bit x");
}

at::ScalarType rstd_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> row_shape(const at::Tensor& x) { return {x.sizes().begin(), x.sizes().end() - 1}; }

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "megallama::rms_norm_fwd";
  check_args(x, weight, op);
  Rows xr = as_rows(x);
  at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(w.scalar_type()));
  at::Tensor rstd = at::empty(row_shape(x), x.options().dtype(rstd_dtype(x)));
  if (xr.rows == 0) return {y, rstd};
  if (x.is_cuda()) {
    launch_cuda(x, op, [&] {
      return cuda::rms_norm_fwd(cuda_dtype(x.scalar_type()), cuda_dtype(w.scalar_type()), xr.t.data_ptr(),
                                xr.row_stride, w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), xr.rows, xr.cols,
                                static_cast<float>(eps), current_stream(x));
    });
    return {y, rstd};
  }
  dispatch_xw(x, w, op, [&](auto tx, auto tw) {
    using T = typename decltype(tx)::type;
    using W = typename decltype(tw)::type;
    fwd_cpu<T, W>(xr.t.data_ptr<T>(), xr.row_stride, w.data_ptr<W>(), y.data_ptr<W>(),
                  rstd.data_ptr<acc_type_t<T>>(), xr.rows, xr.cols, eps);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd) {
  const char* op = "megallama::rms_norm_bwd";
  check_args(x, weight, op);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == weight.scalar_type(), op, ": dy ", dy.sizes(), " ",
              dy.scalar_type(), " must have x's shape and the weight's dtype");
  TORCH_CHECK(rstd.scalar_type() == rstd_dtype(x) && rstd.numel() * x.size(-1) == x.numel(), op, ": bad rstd");
  Rows xr = as_rows(x), dyr = as_rows(dy);
  at::Tensor w = weight.contiguous(), rs = rstd.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::empty(w.sizes(), w.options());
  if (xr.rows == 0) return {dx, dw.zero_()};
  if (x.is_cuda()) {
    launch_cuda(x, op, [&] {
      const auto xt = cuda_dtype(x.scalar_type()), wt = cuda_dtype(w.scalar_type());
      const int64_t parts = cuda::rms_norm_bwd_parts(xt, wt, xr.rows, xr.cols);
      at::Tensor part = at::empty({parts, xr.cols}, x.options().dtype(at::kFloat));
      return cuda::rms_norm_bwd(xt, wt, dyr.t.data_ptr(), dyr.row_stride, xr.t.data_ptr(), xr.row_stride,
                                w.data_ptr(), rs.data_ptr<float>(), dx.data_ptr(), part.data_ptr<float>(), parts,
                                dw.data_ptr(), xr.rows, xr.cols, current_stream(x));
    });
    return {dx, dw};
  }
  dispatch_xw(x, w, op, [&](auto tx, auto tw) {
    using T = typename decltype(tx)::type;
    using W = typename decltype(tw)::type;
    bwd_cpu<T, W>(dyr.t.data_ptr<W>(), dyr.row_stride, xr.t.data_ptr<T>(), xr.row_stride, w.data_ptr<W>(),
                  rs.data_ptr<acc_type_t<T>>(), dx.data_ptr<T>(), dw.data_ptr<W>(), xr.rows, xr.cols);
  });
  return {dx, dw};
}

void register_kernels(torch::Library& m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace
}  // namespace megallama

MEGALLAMA_IMPL_CPU_AND_CUDA(megallama::register_kernels)

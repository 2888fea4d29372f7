// SwiGLU y = silu(gate) * up: the CPU kernel and the torch glue of both devices.
//
// Inputs are two tensors or one packed [..., 2f] projection output (gate first), read in place through row
// strides. Math in fp32 (fp64 for fp64 input) with one rounding at the end; the backward recomputes silu from gate
// instead of saving it, and for the packed form writes both halves of one [..., 2f] gradient.
#include <cmath>

#include "common.h"

namespace megallama {
namespace {

constexpr int64_t kColBlock = 4096;

template <typename F>
void for_blocks(int64_t rows, int64_t cols, F&& f) {
  const int64_t nb = (cols + kColBlock - 1) / kColBlock;
  at::parallel_for(0, rows * nb, std::max<int64_t>(1, 32768 / kColBlock), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / nb, c0 = (t % nb) * kColBlock;
      f(r, c0, std::min(cols, c0 + kColBlock));
    }
  });
}

template <typename T>
void fwd_cpu(const T* g, int64_t g_rs, const T* u, int64_t u_rs, T* y, int64_t y_rs, int64_t rows, int64_t cols) {
  using A = acc_type_t<T>;
  for_blocks(rows, cols, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* gr = g + r * g_rs;
    const T* ur = u + r * u_rs;
    T* yr = y + r * y_rs;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      const A gv = static_cast<A>(gr[c]);
      yr[c] = static_cast<T>(gv / (A(1) + exp_fast(-gv)) * static_cast<A>(ur[c]));
    }
  });
}

template <typename T>
void bwd_cpu(const T* dy, int64_t dy_rs, const T* g, int64_t g_rs, const T* u, int64_t u_rs, T* dg, int64_t dg_rs,
             T* du, int64_t du_rs, int64_t rows, int64_t cols) {
  using A = acc_type_t<T>;
  for_blocks(rows, cols, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* dyr = dy + r * dy_rs;
    const T* gr = g + r * g_rs;
    const T* ur = u + r * u_rs;
    T* dgr = dg + r * dg_rs;
    T* dur = du + r * du_rs;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      const A gv = static_cast<A>(gr[c]), d = static_cast<A>(dyr[c]);
      const A sg = A(1) / (A(1) + exp_fast(-gv));
      dur[c] = static_cast<T>(d * gv * sg);
      dgr[c] = static_cast<T>(d * static_cast<A>(ur[c]) * sg * (A(1) + gv * (A(1) - sg)));
    }
  });
}

// Pointers and row strides of the three [rows, cols] operands of one call.
struct Operand {
  const at::Tensor* base;  // keeps the storage the pointer refers to alive
  int64_t offset;          // element offset of column 0 (f for the up half of a packed tensor)
  int64_t row_stride;
};

void run_fwd(const at::Tensor& like, const Operand& g, const Operand& u, const Operand& y, int64_t rows, int64_t cols,
             const char* op) {
  if (rows == 0 || cols == 0) return;
  if (like.is_cuda()) {
    check_cuda_built(op);
    c10::DeviceGuard guard(like.device());
    const auto dt = cuda_dtype(like.scalar_type());
    const int64_t es = like.element_size();
    auto p = [es](const Operand& o) { return static_cast<char*>(o.base->data_ptr()) + o.offset * es; };
    check_cuda(cuda::swiglu_fwd(dt, p(g), g.row_stride, p(u), u.row_stride, p(y), y.row_stride, rows, cols,
                                current_stream(like)),
               op);
    return;
  }
  dispatch_float(like.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = [](const Operand& o) { return o.base->data_ptr<T>() + o.offset; };
    fwd_cpu<T>(p(g), g.row_stride, p(u), u.row_stride, p(y), y.row_stride, rows, cols);
  });
}

void run_bwd(const at::Tensor& like, const Operand& dy, const Operand& g, const Operand& u, const Operand& dg,
             const Operand& du, int64_t rows, int64_t cols, const char* op) {
  if (rows == 0 || cols == 0) return;
  if (like.is_cuda()) {
    check_cuda_built(op);
    c10::DeviceGuard guard(like.device());
    const auto dt = cuda_dtype(like.scalar_type());
    const int64_t es = like.element_size();
    auto p = [es](const Operand& o) { return static_cast<char*>(o.base->data_ptr()) + o.offset * es; };
    check_cuda(cuda::swiglu_bwd(dt, p(dy), dy.row_stride, p(g), g.row_stride, p(u), u.row_stride, p(dg),
                                dg.row_stride, p(du), du.row_stride, rows, cols, current_stream(like)),
               op);
    return;
  }
  dispatch_float(like.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = [](const Operand& o) { return o.base->data_ptr<T>() + o.offset; };
    bwd_cpu<T>(p(dy), dy.row_stride, p(g), g.row_stride, p(u), u.row_stride, p(dg), dg.row_stride, p(du),
               du.row_stride, rows, cols);
  });
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.device() == b.device(), op, ": ",
              what, " must match in shape, dtype and device: ", a.sizes(), " ", a.scalar_type(), " vs ", b.sizes(),
              " ", b.scalar_type());
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "megallama::swiglu_fwd";
  check_same(gate, up, "gate and up", op);
  Rows g = as_rows(gate), u = as_rows(up);
  at::Tensor y = at::empty(gate.sizes(), gate.options());
  run_fwd(gate, {&g.t, 0, g.row_stride}, {&u.t, 0, u.row_stride}, {&y, 0, g.cols}, g.rows, g.cols, op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "megallama::swiglu_bwd";
  check_same(gate, up, "gate and up", op);
  check_same(dy, gate, "dy and gate", op);
  Rows d = as_rows(dy), g = as_rows(gate), u = as_rows(up);
  at::Tensor dg = at::empty(gate.sizes(), gate.options()), du = at::empty(gate.sizes(), gate.options());
  run_bwd(gate, {&d.t, 0, d.row_stride}, {&g.t, 0, g.row_stride}, {&u.t, 0, u.row_stride}, {&dg, 0, g.cols},
          {&du, 0, g.cols}, g.rows, g.cols, op);
  return {dg, du};
}

std::vector<int64_t> half_shape(const at::Tensor& gu, const char* op) {
  TORCH_CHECK(gu.dim() >= 1 && gu.size(-1) % 2 == 0, op, ": the packed [gate, up] last dim must be even, got ",
              gu.sizes());
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() /= 2;
  return shape;
}

at::Tensor swiglu_packed_fwd(const at::Tensor& gate_up) {
  const char* op = "megallama::swiglu_packed_fwd";
  auto shape = half_shape(gate_up, op);
  Rows gu = as_rows(gate_up);
  const int64_t f = gu.cols / 2;
  at::Tensor y = at::empty(shape, gate_up.options());
  run_fwd(gate_up, {&gu.t, 0, gu.row_stride}, {&gu.t, f, gu.row_stride}, {&y, 0, f}, gu.rows, f, op);
  return y;
}

at::Tensor swiglu_packed_bwd(const at::Tensor& dy, const at::Tensor& gate_up) {
  const char* op = "megallama::swiglu_packed_bwd";
  auto shape = half_shape(gate_up, op);
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(shape) && dy.scalar_type() == gate_up.scalar_type(), op, ": dy ",
              dy.sizes(), " does not match half of gate_up ", gate_up.sizes());
  Rows d = as_rows(dy), gu = as_rows(gate_up);
  const int64_t f = gu.cols / 2;
  at::Tensor dgu = at::empty(gate_up.sizes(), gate_up.options());
  run_bwd(gate_up, {&d.t, 0, d.row_stride}, {&gu.t, 0, gu.row_stride}, {&gu.t, f, gu.row_stride}, {&dgu, 0, 2 * f},
          {&dgu, f, 2 * f}, gu.rows, f, op);
  return dgu;
}

}  // namespace
}  // namespace megallama

TORCH_LIBRARY_IMPL(megallama, CPU, m) {
  m.impl("swiglu_fwd", &megallama::swiglu_fwd);
  m.impl("swiglu_bwd", &megallama::swiglu_bwd);
  m.impl("swiglu_packed_fwd", &megallama::swiglu_packed_fwd);
  m.impl("swiglu_packed_bwd", &megallama::swiglu_packed_bwd);
}

#ifdef MEGALLAMA_WITH_CUDA
TORCH_LIBRARY_IMPL(megallama, CUDA, m) {
  m.impl("swiglu_fwd", &megallama::swiglu_fwd);
  m.impl("swiglu_bwd", &megallama::swiglu_bwd);
  m.impl("swiglu_packed_fwd", &megallama::swiglu_packed_fwd);
  m.impl("swiglu_packed_bwd", &megallama::swiglu_packed_bwd);
}
#endif

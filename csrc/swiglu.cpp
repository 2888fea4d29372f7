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

// One [rows, cols] operand of a call: a tensor, the element offset of its column 0 and its row stride.
struct Operand {
  const at::Tensor* base;  // keeps the storage the pointer refers to alive
  int64_t offset;          // element offset of column 0 (f for the up half of a packed tensor)
  int64_t row_stride;

  template <typename T>
  T* ptr() const { return base->data_ptr<T>() + offset; }
  void* raw() const { return static_cast<char*>(base->data_ptr()) + offset * base->element_size(); }
};

void run_fwd(const at::Tensor& like, const Operand& g, const Operand& u, const Operand& y, int64_t rows, int64_t cols,
             const char* op) {
  if (rows == 0 || cols == 0) return;
  if (like.is_cuda()) {
    return launch_cuda(like, op, [&] {
      return cuda::swiglu_fwd(cuda_dtype(like.scalar_type()), g.raw(), g.row_stride, u.raw(), u.row_stride, y.raw(),
                              y.row_stride, rows, cols, current_stream(like));
    });
  }
  dispatch_float(like.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    fwd_cpu<T>(g.ptr<T>(), g.row_stride, u.ptr<T>(), u.row_stride, y.ptr<T>(), y.row_stride, rows, cols);
  });
}

void run_bwd(const at::Tensor& like, const Operand& dy, const Operand& g, const Operand& u, const Operand& dg,
             const Operand& du, int64_t rows, int64_t cols, const char* op) {
  if (rows == 0 || cols == 0) return;
  if (like.is_cuda()) {
    return launch_cuda(like, op, [&] {
      return cuda::swiglu_bwd(cuda_dtype(like.scalar_type()), dy.raw(), dy.row_stride, g.raw(), g.row_stride, u.raw(),
                              u.row_stride, dg.raw(), dg.row_stride, du.raw(), du.row_stride, rows, cols,
                              current_stream(like));
    });
  }
  dispatch_float(like.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bwd_cpu<T>(dy.ptr<T>(), dy.row_stride, g.ptr<T>(), g.row_stride, u.ptr<T>(), u.row_stride, dg.ptr<T>(),
               dg.row_stride, du.ptr<T>(), du.row_stride, rows, cols);
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

void register_kernels(torch::Library& m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_packed_fwd", &swiglu_packed_fwd);
  m.impl("swiglu_packed_bwd", &swiglu_packed_bwd);
}

}  // namespace
}  // namespace megallama

MEGALLAMA_IMPL_CPU_AND_CUDA(megallama::register_kernels)

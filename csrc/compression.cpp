// Gradient compression: the CPU kernels and the torch glue of both devices (formats in compression.h).
//
// Both compressors carry error feedback: the caller's fp32 error buffer is added to the input before compressing
// and keeps what the compressed message did not carry, so over many steps the sum of what was sent tracks the sum
// of the inputs (the residual stays bounded). Top-k uses a radix select on the bit patterns of |c| (4 passes of
// 8-bit histograms) rather than a sort: exact k, ties to the lower index, and the same answer on CPU and CUDA.
#include <ATen/ops/zeros.h>

#include <vector>

#include "common.h"
#include "compression.h"

namespace megallama {
namespace {

constexpr int64_t kBlocks = 64;  // fixed CPU partition for the top-k passes: results never depend on threads

inline uint32_t abs_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffu;  // |v| as bits: ordered like |v| for every non-NaN value (NaN above +inf)
}

template <typename T>
void onebit_pack_cpu(const T* x, float* e, uint8_t* packed, float* scales, int64_t n, int64_t chunk) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * chunk, hi = std::min(n, lo + chunk);
      double sum = 0.0;
      for (int64_t i = lo; i < hi; ++i) {
        const float v = static_cast<float>(x[i]) + e[i];
        e[i] = v;
        sum += std::fabs(v);
      }
      const float s = static_cast<float>(sum / static_cast<double>(hi - lo));
      scales[c] = s;
      for (int64_t j = lo / 8; j < (hi + 7) / 8; ++j) {
        uint32_t byte = 0;
        const int64_t end = std::min<int64_t>(8, hi - 8 * j);
        for (int64_t b = 0; b < end; ++b) {
          const float v = e[8 * j + b];
          const bool pos = v >= 0.f;
          byte |= uint32_t(pos) << b;
          e[8 * j + b] = v - (pos ? s : -s);
        }
        packed[j] = static_cast<uint8_t>(byte);
      }
    }
  });
}

void onebit_unpack_cpu(const uint8_t* packed, const float* scales, float* out, int64_t rows, int64_t n,
                       int64_t chunk, float alpha) {
  const int64_t nbytes = (n + 7) / 8, nchunks = (n + chunk - 1) / chunk;
  at::parallel_for(0, nbytes, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t c = (8 * j) / chunk, end = std::min<int64_t>(8, n - 8 * j);
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t byte = packed[r * nbytes + j];
        const float s = scales[r * nchunks + c];
        for (int b = 0; b < 8; ++b) acc[b] += ((byte >> b) & 1u) ? s : -s;
      }
      for (int64_t b = 0; b < end; ++b) out[8 * j + b] = alpha == 1.f ? acc[b] : acc[b] * alpha;
    }
  });
}

template <typename T>
void topk_pack_cpu(const T* x, float* e, float* values, int32_t* indices, int64_t n, int64_t k) {
  const int64_t nb = std::min<int64_t>(kBlocks, std::max<int64_t>(1, n / 4096));
  const int64_t per = (n + nb - 1) / nb;
  auto range = [&](int64_t b) { return std::make_pair(b * per, std::min(n, (b + 1) * per)); };
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [lo, hi] = range(b);
      for (int64_t i = lo; i < hi; ++i) e[i] = static_cast<float>(x[i]) + e[i];
    }
  });
  if (k == 0) return;
  // Radix select of the k-th largest key, most significant digit first.
  uint32_t prefix = 0, mask = 0;
  int64_t krem = k;
  std::vector<int64_t> hist(nb * 256);
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const auto [lo, hi] = range(b);
        int64_t* h = hist.data() + b * 256;
        for (int64_t i = lo; i < hi; ++i) {
          const uint32_t key = abs_key(e[i]);
          if ((key & mask) == prefix) ++h[(key >> shift) & 255u];
        }
      }
    });
    int64_t cum = 0;
    int d = 255;
    for (; d > 0; --d) {
      int64_t cnt = 0;
      for (int64_t b = 0; b < nb; ++b) cnt += hist[b * 256 + d];
      if (cum + cnt >= krem) break;
      cum += cnt;
    }
    prefix |= uint32_t(d) << shift;
    mask |= 255u << shift;
    krem -= cum;
  }
  const uint32_t thr = prefix;
  const int64_t need_eq = krem;  // keys equal to thr to take, lowest index first
  // Ordered compaction: per-block counts, a scan, then each block writes its selections in index order.
  std::vector<int64_t> gt(nb), eq(nb);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [lo, hi] = range(b);
      int64_t g = 0, q = 0;
      for (int64_t i = lo; i < hi; ++i) {
        const uint32_t key = abs_key(e[i]);
        g += key > thr;
        q += key == thr;
      }
      gt[b] = g;
      eq[b] = q;
    }
  });
  std::vector<int64_t> sel_before(nb), eq_before(nb);
  int64_t s = 0, q = 0;
  for (int64_t b = 0; b < nb; ++b) {
    sel_before[b] = s;
    eq_before[b] = q;
    s += gt[b] + std::min(eq[b], std::max<int64_t>(0, need_eq - q));
    q += eq[b];
  }
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [lo, hi] = range(b);
      int64_t pos = sel_before[b], eq_rank = eq_before[b];
      for (int64_t i = lo; i < hi; ++i) {
        const uint32_t key = abs_key(e[i]);
        const bool take = key > thr || (key == thr && eq_rank++ < need_eq);
        if (take) {
          values[pos] = e[i];
          indices[pos] = static_cast<int32_t>(i);
          e[i] = 0.f;
          ++pos;
        }
      }
    }
  });
}

void topk_unpack_cpu(const float* values, const int32_t* indices, float* out, int64_t rows, int64_t k, int64_t n,
                     float alpha) {
  for (int64_t r = 0; r < rows; ++r) {  // rows in order: the sum order of the reference (index_add_ per row)
    const float* v = values + r * k;
    const int32_t* idx = indices + r * k;
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK(idx[j] >= 0 && idx[j] < n, "megallama::topk_unpack: index ", idx[j], " outside [0, ", n, ")");
      out[idx[j]] += v[j];
    }
  }
  if (alpha != 1.f) {
    at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) out[i] *= alpha;
    });
  }
}

// ------------------------------------------------------------------------------------------------ torch glue
void check_error_buf(const at::Tensor& x, const at::Tensor& error, const char* op) {
  TORCH_CHECK(error.scalar_type() == at::kFloat && error.is_contiguous(), op,
              ": error must be a contiguous float32 tensor, got ", error.scalar_type());
  TORCH_CHECK(error.numel() == x.numel(), op, ": error has ", error.numel(), " elements, x ", x.numel());
  TORCH_CHECK(error.device() == x.device(), op, ": x and error are on different devices");
}

std::tuple<at::Tensor, at::Tensor> onebit_pack(const at::Tensor& x_in, const at::Tensor& error, int64_t chunk) {
  const char* op = "megallama::onebit_pack";
  check_error_buf(x_in, error, op);
  TORCH_CHECK(chunk > 0 && chunk % 8 == 0, op, ": chunk_size ", chunk, " must be a positive multiple of 8");
  const at::Tensor x = x_in.reshape({-1}).contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({(n + chunk - 1) / chunk}, x.options().dtype(at::kFloat));
  if (n == 0) return {packed, scales};
  if (x.is_cuda()) {
    launch_cuda(x, op, [&] {
      return cuda::onebit_pack(cuda_dtype(x.scalar_type()), x.data_ptr(), error.data_ptr<float>(),
                               packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), n, chunk, current_stream(x));
    });
    return {packed, scales};
  }
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    onebit_pack_cpu<T>(x.data_ptr<T>(), error.data_ptr<float>(), packed.data_ptr<uint8_t>(),
                       scales.data_ptr<float>(), n, chunk);
  });
  return {packed, scales};
}

at::Tensor onebit_unpack(const at::Tensor& packed_in, const at::Tensor& scales_in, int64_t n, int64_t chunk,
                         double alpha) {
  const char* op = "megallama::onebit_unpack";
  TORCH_CHECK(chunk > 0 && chunk % 8 == 0, op, ": chunk_size ", chunk, " must be a positive multiple of 8");
  TORCH_CHECK(n >= 0, op, ": numel ", n, " must be >= 0");
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && scales_in.scalar_type() == at::kFloat, op,
              ": expected uint8 packed bits and float32 scales, got ", packed_in.scalar_type(), " and ",
              scales_in.scalar_type());
  TORCH_CHECK(packed_in.device() == scales_in.device(), op, ": packed and scales are on different devices");
  const int64_t nbytes = (n + 7) / 8, nchunks = (n + chunk - 1) / chunk;
  const int64_t rows = packed_in.dim() == 2 ? packed_in.size(0) : 1;
  TORCH_CHECK(packed_in.dim() <= 2 && packed_in.numel() == rows * nbytes, op, ": packed ", packed_in.sizes(),
              " is not [rows, ", nbytes, "] for ", n, " elements");
  TORCH_CHECK(scales_in.numel() == rows * nchunks, op, ": scales ", scales_in.sizes(), " is not [", rows, ", ",
              nchunks, "] for ", n, " elements in chunks of ", chunk);
  const at::Tensor packed = packed_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor out = at::empty({n}, scales.options());
  if (n == 0) return out;
  if (packed.is_cuda()) {
    launch_cuda(packed, op, [&] {
      return cuda::onebit_unpack(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), out.data_ptr<float>(), rows, n,
                                 chunk, static_cast<float>(alpha), current_stream(packed));
    });
    return out;
  }
  onebit_unpack_cpu(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), out.data_ptr<float>(), rows, n, chunk,
                    static_cast<float>(alpha));
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_pack(const at::Tensor& x_in, const at::Tensor& error, int64_t k) {
  const char* op = "megallama::topk_pack";
  check_error_buf(x_in, error, op);
  const at::Tensor x = x_in.reshape({-1}).contiguous();
  const int64_t n = x.numel();
  TORCH_CHECK(k >= 0 && k <= n, op, ": k ", k, " must be in [0, ", n, "]");
  TORCH_CHECK(n < (int64_t(1) << 31), op, ": ", n, " elements do not fit int32 indices; compress smaller buckets");
  at::Tensor values = at::empty({k}, x.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({k}, x.options().dtype(at::kInt));
  if (n == 0) return {values, indices};
  if (x.is_cuda()) {
    launch_cuda(x, op, [&] {
      at::Tensor ws = at::empty({cuda::topk_workspace_bytes(n)}, x.options().dtype(at::kByte));
      return cuda::topk_pack(cuda_dtype(x.scalar_type()), x.data_ptr(), error.data_ptr<float>(),
                             values.data_ptr<float>(), indices.data_ptr<int32_t>(), n, k, ws.data_ptr(),
                             current_stream(x));
    });
    return {values, indices};
  }
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    topk_pack_cpu<T>(x.data_ptr<T>(), error.data_ptr<float>(), values.data_ptr<float>(),
                     indices.data_ptr<int32_t>(), n, k);
  });
  return {values, indices};
}

at::Tensor topk_unpack(const at::Tensor& values_in, const at::Tensor& indices_in, int64_t n, double alpha) {
  const char* op = "megallama::topk_unpack";
  TORCH_CHECK(values_in.scalar_type() == at::kFloat && indices_in.scalar_type() == at::kInt, op,
              ": expected float32 values and int32 indices, got ", values_in.scalar_type(), " and ",
              indices_in.scalar_type());
  TORCH_CHECK(values_in.sizes() == indices_in.sizes() && values_in.dim() >= 1 && values_in.dim() <= 2, op,
              ": values ", values_in.sizes(), " and indices ", indices_in.sizes(),
              " must be the same [k] or [rows, k]");
  TORCH_CHECK(values_in.device() == indices_in.device(), op, ": values and indices are on different devices");
  TORCH_CHECK(n >= 0 && n < (int64_t(1) << 31), op, ": numel ", n, " must be in [0, 2^31)");
  const at::Tensor values = values_in.contiguous(), indices = indices_in.contiguous();
  const int64_t rows = values.dim() == 2 ? values.size(0) : 1, k = values.size(-1);
  at::Tensor out = at::zeros({n}, values.options());
  if (n == 0 || rows * k == 0) return alpha == 1.0 ? out : out.mul_(alpha);
  if (values.is_cuda()) {
    const at::Tensor mask = at::zeros({alpha == 1.0 ? 0 : (n + 31) / 32}, values.options().dtype(at::kInt));
    launch_cuda(values, op, [&] {
      return cuda::topk_unpack(values.data_ptr<float>(), indices.data_ptr<int32_t>(), out.data_ptr<float>(), rows, k, n,
                               static_cast<float>(alpha), reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>()),
                               current_stream(values));
    });
    return out;
  }
  topk_unpack_cpu(values.data_ptr<float>(), indices.data_ptr<int32_t>(), out.data_ptr<float>(), rows, k, n,
                  static_cast<float>(alpha));
  return out;
}

void register_kernels(torch::Library& m) {
  m.impl("onebit_pack", &onebit_pack);
  m.impl("onebit_unpack", &onebit_unpack);
  m.impl("topk_pack", &topk_pack);
  m.impl("topk_unpack", &topk_unpack);
}

}  // namespace
}  // namespace megallama

TORCH_LIBRARY_FRAGMENT(megallama, m) {
  // 1-bit: (packed uint8 [ceil(n/8)], scales fp32 [ceil(n/chunk_size)]); error (fp32, x's numel) is updated.
  m.def("onebit_pack(Tensor x, Tensor(a!) error, int chunk_size) -> (Tensor, Tensor)");
  // alpha * the sum over rows of decompressed [rows, ...] messages (one row: the message itself), fp32 [numel].
  m.def("onebit_unpack(Tensor packed, Tensor scales, int numel, int chunk_size, float alpha) -> Tensor");
  // top-k: (values fp32 [k], indices int32 [k], ascending); error is updated.
  m.def("topk_pack(Tensor x, Tensor(a!) error, int k) -> (Tensor, Tensor)");
  m.def("topk_unpack(Tensor values, Tensor indices, int numel, float alpha) -> Tensor");
}

MEGALLAMA_IMPL_CPU_AND_CUDA(megallama::register_kernels)

#ifndef MEGALLAMA_WITH_CUDA
// CPU-only build: the CUDA dispatch key has no kernels, so these are never reached; they only satisfy the linker.
namespace megallama {
namespace cuda {
int onebit_pack(DType, const void*, float*, uint8_t*, float*, int64_t, int64_t, void*) { return -1; }
int onebit_unpack(const uint8_t*, const float*, float*, int64_t, int64_t, int64_t, float, void*) { return -1; }
int64_t topk_workspace_bytes(int64_t) { return 0; }
int topk_pack(DType, const void*, float*, float*, int32_t*, int64_t, int64_t, void*, void*) { return -1; }
int topk_unpack(const float*, const int32_t*, float*, int64_t, int64_t, int64_t, float, uint32_t*, void*) { return -1; }
}  // namespace cuda
}  // namespace megallama
#endif

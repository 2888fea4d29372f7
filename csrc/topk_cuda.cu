// Top-k compression CUDA kernels (formats and semantics in compression.h; CPU twins in compression.cpp).
//
// Pack: a radix select over the bit patterns of |c| (4 histogram passes of 8 bits, each followed by a one-thread
// kernel that picks the digit, so the host never synchronises), then an ordered compaction: per-tile counts, one
// block scanning the tiles, and a pass that writes each tile's selections in index order (ties to the lower
// index, exactly as on the CPU). Unpack: one scatter launch per row, in order, then the scale.
#include "compression.h"
#include "cuda_common.cuh"

namespace megallama {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 16;                      // top-k elements per thread in the compaction passes
constexpr int64_t kTile = int64_t(kThreads) * kItems;
constexpr int kScanThreads = 1024;

__device__ __forceinline__ uint32_t abs_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// ------------------------------------------------------------------------------------------------ top-k select
struct SelectState {
  uint32_t prefix;  // the digits of the threshold key chosen so far
  uint32_t mask;    // which bits of prefix are chosen
  int64_t krem;     // how many keys with this prefix are still to take
};

__global__ void topk_init(SelectState* st, uint32_t* hist, int64_t k) {
  st->prefix = 0;
  st->mask = 0;
  st->krem = k;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
}

// pass 0 also forms c = x + error in place; later passes count only keys matching the chosen prefix.
template <typename T, bool ADD>
__global__ void __launch_bounds__(kThreads)
    topk_hist_kernel(const T* __restrict__ x, float* __restrict__ e, int64_t n, const SelectState* __restrict__ st,
                     int shift, uint32_t* __restrict__ hist) {
  __shared__ uint32_t h[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) h[i] = 0;
  __syncthreads();
  const uint32_t prefix = st->prefix, mask = st->mask;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    float c;
    if (ADD) {
      c = to_f(x[i]) + e[i];
      e[i] = c;
    } else {
      c = e[i];
    }
    const uint32_t key = abs_key(c);
    if ((key & mask) == prefix) atomicAdd(&h[(key >> shift) & 255u], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += kThreads)
    if (h[i]) atomicAdd(&hist[i], h[i]);
}

// One thread: the digit at `shift` of the k-th largest key among those matching the prefix; clears the histogram.
__global__ void topk_choose(SelectState* st, uint32_t* hist, int shift) {
  if (threadIdx.x != 0) return;
  int64_t cum = 0;
  int d = 255;
  for (; d > 0; --d) {
    if (cum + int64_t(hist[d]) >= st->krem) break;
    cum += hist[d];
  }
  st->prefix |= uint32_t(d) << shift;
  st->mask |= 255u << shift;
  st->krem -= cum;
  for (int i = 0; i < 256; ++i) hist[i] = 0;
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, <= 1024); *total (shared) gets the block's sum.
// `smem` holds 32 entries; safe to call repeatedly.
__device__ __forceinline__ uint32_t block_excl_scan(uint32_t v, uint32_t* smem, uint32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  uint32_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) smem[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const uint32_t w = lane < nwarps ? smem[lane] : 0u;
    uint32_t wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t t = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += t;
    }
    __syncwarp();
    if (lane < nwarps) smem[lane] = wi - w;  // exclusive offset of each warp
    if (lane == 31) *total = wi;             // lanes past nwarps add 0: lane 31 holds the block total
  }
  __syncthreads();
  const uint32_t out = smem[warp] + incl - v;
  __syncthreads();  // smem and *total may be rewritten by the next call
  return out;
}

// One thread's kItems keys from base: how many are above the threshold key and how many equal it.
__device__ __forceinline__ void count_vs_threshold(const float* __restrict__ e, int64_t n, int64_t base, uint32_t thr,
                                                   uint32_t& gt, uint32_t& eq) {
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + it;
    if (i < n) {
      const uint32_t key = abs_key(e[i]);
      gt += key > thr;
      eq += key == thr;
    }
  }
}

// Per tile: how many keys are above the threshold and how many equal it.
__global__ void __launch_bounds__(kThreads)
    topk_count_kernel(const float* __restrict__ e, int64_t n, const SelectState* __restrict__ st,
                      uint32_t* __restrict__ counts) {
  __shared__ float smem[33];
  const uint32_t thr = st->prefix;
  const int64_t base = int64_t(blockIdx.x) * kTile + int64_t(threadIdx.x) * kItems;
  uint32_t gt = 0, eq = 0;
  count_vs_threshold(e, n, base, thr, gt, eq);
  // Counts stay below 2^24 per tile, so the float block sums are exact.
  const float g = block_sum(static_cast<float>(gt), smem);
  const float q = block_sum(static_cast<float>(eq), smem);
  if (threadIdx.x == 0) {
    counts[2 * blockIdx.x] = static_cast<uint32_t>(g);
    counts[2 * blockIdx.x + 1] = static_cast<uint32_t>(q);
  }
}

// One block: per tile, the number of selections before it and of threshold-equal keys before it.
__global__ void __launch_bounds__(kScanThreads)
    topk_scan_kernel(const uint32_t* __restrict__ counts, int64_t tiles, const SelectState* __restrict__ st,
                     uint32_t* __restrict__ offsets) {
  __shared__ uint32_t smem[32];
  __shared__ uint32_t tot;
  const int64_t need_eq = st->krem;
  uint32_t sel_carry = 0, eq_carry = 0;
  for (int64_t t0 = 0; t0 < tiles; t0 += kScanThreads) {
    const int64_t t = t0 + threadIdx.x;
    const uint32_t gt = t < tiles ? counts[2 * t] : 0u, eq = t < tiles ? counts[2 * t + 1] : 0u;
    const uint32_t eq_before = eq_carry + block_excl_scan(eq, smem, &tot);
    __syncthreads();
    const uint32_t eq_total = tot;
    int64_t room = need_eq - int64_t(eq_before);
    room = room < 0 ? 0 : room;
    const uint32_t sel = gt + static_cast<uint32_t>(room < int64_t(eq) ? room : int64_t(eq));
    const uint32_t sel_before = sel_carry + block_excl_scan(sel, smem, &tot);
    __syncthreads();
    if (t < tiles) {
      offsets[2 * t] = sel_before;
      offsets[2 * t + 1] = eq_before;
    }
    sel_carry += tot;
    eq_carry += eq_total;
    __syncthreads();
  }
}

// Each tile writes its selections in index order: thread offsets from block scans of per-thread counts.
__global__ void __launch_bounds__(kThreads)
    topk_write_kernel(float* __restrict__ e, int64_t n, const SelectState* __restrict__ st,
                      const uint32_t* __restrict__ offsets, float* __restrict__ values,
                      int32_t* __restrict__ indices) {
  __shared__ uint32_t smem[32];
  __shared__ uint32_t tot;
  const uint32_t thr = st->prefix;
  const int64_t need_eq = st->krem;
  const int64_t base = int64_t(blockIdx.x) * kTile + int64_t(threadIdx.x) * kItems;
  uint32_t gt = 0, eq = 0;
  count_vs_threshold(e, n, base, thr, gt, eq);
  int64_t eq_rank = int64_t(offsets[2 * blockIdx.x + 1]) + block_excl_scan(eq, smem, &tot);
  int64_t room = need_eq - eq_rank;
  room = room < 0 ? 0 : room;
  const uint32_t sel = gt + static_cast<uint32_t>(room < int64_t(eq) ? room : int64_t(eq));
  int64_t pos = int64_t(offsets[2 * blockIdx.x]) + block_excl_scan(sel, smem, &tot);
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + it;
    if (i >= n) break;
    const float c = e[i];
    const uint32_t key = abs_key(c);
    bool take = key > thr;
    if (key == thr) take = eq_rank++ < need_eq;
    if (take) {
      values[pos] = c;
      indices[pos] = static_cast<int32_t>(i);
      e[i] = 0.f;
      ++pos;
    }
  }
}

__global__ void topk_scatter_kernel(const float* __restrict__ values, const int32_t* __restrict__ indices,
                                    float* __restrict__ out, int64_t k) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x)
    atomicAdd(out + indices[j], values[j]);  // indices of one row are distinct: no two adds meet, order-free
}

// Scales each touched entry once: untouched ones are 0 either way, so the pass costs O(rows k), not O(n). The first
// thread to set an entry's bit in ``mask`` (zeroed) multiplies it, after all rows were added (stream order), as the
// reference does (sum, then scale): the same bits.
__global__ void scale_touched_kernel(const int32_t* __restrict__ indices, float* __restrict__ out,
                                     uint32_t* __restrict__ mask, int64_t total, float alpha) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += int64_t(gridDim.x) * blockDim.x) {
    const int32_t i = indices[j];
    const uint32_t bit = 1u << (i & 31);
    if (!(atomicOr(mask + (i >> 5), bit) & bit)) out[i] *= alpha;
  }
}

int64_t align16(int64_t b) { return (b + 15) / 16 * 16; }

}  // namespace

int64_t topk_workspace_bytes(int64_t n) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  return align16(sizeof(SelectState)) + align16(256 * 4) + 2 * align16(2 * tiles * 4);
}

int topk_pack(DType xt, const void* x, float* error, float* values, int32_t* indices, int64_t n, int64_t k,
              void* workspace, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t tiles = (n + kTile - 1) / kTile;
  char* w = static_cast<char*>(workspace);
  auto* st = reinterpret_cast<SelectState*>(w);
  w += align16(sizeof(SelectState));
  auto* hist = reinterpret_cast<uint32_t*>(w);
  w += align16(256 * 4);
  auto* counts = reinterpret_cast<uint32_t*>(w);
  w += align16(2 * tiles * 4);
  auto* offsets = reinterpret_cast<uint32_t*>(w);
  const unsigned grid = grid_for(n, kThreads);
  topk_init<<<1, 256, 0, s>>>(st, hist, k);
  int err = dispatch(xt, [&](auto tag) {
    using T = decltype(tag);
    topk_hist_kernel<T, true><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), error, n, st, 24, hist);
    return last_error();
  });
  if (err || k == 0) return err;
  topk_choose<<<1, 1, 0, s>>>(st, hist, 24);
  for (int shift = 16; shift >= 0; shift -= 8) {
    topk_hist_kernel<float, false><<<grid, kThreads, 0, s>>>(nullptr, error, n, st, shift, hist);
    topk_choose<<<1, 1, 0, s>>>(st, hist, shift);
  }
  topk_count_kernel<<<unsigned(tiles), kThreads, 0, s>>>(error, n, st, counts);
  topk_scan_kernel<<<1, kScanThreads, 0, s>>>(counts, tiles, st, offsets);
  topk_write_kernel<<<unsigned(tiles), kThreads, 0, s>>>(error, n, st, offsets, values, indices);
  return last_error();
}

int topk_unpack(const float* values, const int32_t* indices, float* out, int64_t rows, int64_t k, int64_t n,
                float alpha, uint32_t* mask, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  for (int64_t r = 0; r < rows; ++r) {  // one launch per row, in order: the reference's summation order
    topk_scatter_kernel<<<grid_for(k, kThreads), kThreads, 0, s>>>(values + r * k, indices + r * k, out, k);
  }
  if (alpha != 1.f)
    scale_touched_kernel<<<grid_for(rows * k, kThreads), kThreads, 0, s>>>(indices, out, mask, rows * k, alpha);
  return last_error();
}


}  // namespace cuda
}  // namespace megallama

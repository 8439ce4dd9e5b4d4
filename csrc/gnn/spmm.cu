// Warp-per-row CSR SpMM after GE-SpMM (Huang, Dai, Wang, Yang; "GE-SpMM:
// General-purpose Sparse Matrix-Matrix Multiplication on GPUs for Graph
// Neural Networks", SC'20).
//
// One warp owns one destination row i and one tile of features.  Lane l holds
// features f0 + l + 32 * t (t < kFeatPerLane), so every access to a row of x
// or out is a run of 32 consecutive elements: coalesced, with no atomics and
// no shared memory.  The row's edges are staged 32 at a time ("coalesced row
// caching" in the paper): lane l loads col[k0 + l] (and its weight), then the
// warp walks the 32 edges in order, broadcasting each with __shfl_sync.  That
// replaces 32 redundant per-lane loads of the same index with one coalesced
// load, and keeps the walk over k ascending, which is what max/min need for
// their first-edge tie rule.
//
// Feature tiles beyond the first go to blockIdx.y, so a graph with few rows
// and wide features still fills the GPU.  Both grid dimensions are walked
// with a stride, so no size overflows the grid limits.

#include <cstdint>

#include "gnn/spmm.cuh"

namespace frontiers_fast {
namespace gnn {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 256 threads: enough warps to hide load latency, small enough for tails
// 4 resident blocks (half the warp slots of an SM) caps the kernels at 64
// registers.  With no minimum, ptxas (CUDA 13) aims some variants at 32
// registers and spills; at 64 none spills on sm_80 or sm_90 (-Xptxas -v).
constexpr int kMinBlocksPerSm = 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

// Storage type -> accumulation type.  The half types accumulate in float so a
// row of thousands of edges does not lose its low-order sum bits.
template <typename scalar_t>
struct Acc;

template <>
struct Acc<float> {
  using type = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Acc<double> {
  using type = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Acc<__half> {
  using type = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Acc<__nv_bfloat16> {
  using type = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// setup.py builds with --use_fast_math, which would turn '/' into an
// approximate division; the mean is specified as an exact division by the
// degree, so ask for the correctly rounded one.
__device__ __forceinline__ float divide(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double divide(double a, double b) { return a / b; }

// kExtremum: max/min (else sum/mean).  Min runs as max of the negated
// messages (sign = -1): negation is exact and turns "strictly less" into
// "strictly greater", so one kernel keeps the first-edge rule for both.
// kPerHead: weight has Hw > 1 columns, so each lane's features may need
// different weights and the weight cannot be broadcast with the edge index;
// it is then read per feature (all lanes hit one row of weight, so the load
// is a broadcast from L1).  Both are template flags because they change the
// inner loop, which is where all the time goes.
template <typename scalar_t, bool kExtremum, bool kPerHead, int kFeatPerLane>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock, kMinBlocksPerSm)
    spmm_warp_kernel(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                     const scalar_t* __restrict__ weight, const int64_t* __restrict__ weight_index,
                     int64_t weight_heads, int64_t head_width,
                     const scalar_t* __restrict__ x, int64_t num_dst, int64_t F, bool mean,
                     typename Acc<scalar_t>::type sign, scalar_t* __restrict__ out,
                     int64_t* __restrict__ arg) {
  using A = Acc<scalar_t>;
  using acc_t = typename A::type;
  constexpr int64_t kTile = int64_t{kWarp} * kFeatPerLane;

  const int lane = static_cast<int>(threadIdx.x);
  const bool has_weight = weight != nullptr;
  const int64_t n_tiles = (F + kTile - 1) / kTile;

  // Every lane of a warp has the same row and tile, so the loops and the
  // __shfl_sync calls below are warp-uniform.
  for (int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.y; row < num_dst;
       row += int64_t{gridDim.x} * kRowsPerBlock) {
    const int64_t start = rowptr[row];
    const int64_t end = rowptr[row + 1];

    for (int64_t tile = blockIdx.y; tile < n_tiles; tile += gridDim.y) {
      const int64_t f0 = tile * kTile + lane;

      acc_t acc[kFeatPerLane];
      int64_t best[kFeatPerLane];  // CSR position of the current extremum, -1 before the first edge
      int64_t head[kFeatPerLane];
#pragma unroll
      for (int t = 0; t < kFeatPerLane; ++t) {
        acc[t] = acc_t(0);
        best[t] = -1;
        head[t] = kPerHead ? (f0 + t * kWarp) / head_width : 0;
      }

      for (int64_t k0 = start; k0 < end; k0 += kWarp) {
        const int64_t k_lane = k0 + lane;
        const bool live = k_lane < end;
        const int64_t src_lane = live ? col[k_lane] : 0;
        // The weight row of edge k: weight_index[k] (weights in the user's edge order), or k.
        const int64_t wrow_lane = (has_weight && live) ? (weight_index ? weight_index[k_lane] : k_lane) : 0;
        const acc_t w_lane = (!kPerHead && has_weight && live) ? A::load(weight[wrow_lane]) : acc_t(1);
        const int n = static_cast<int>(end - k0 < kWarp ? end - k0 : kWarp);

#pragma unroll 4
        for (int j = 0; j < n; ++j) {
          const int64_t src = __shfl_sync(kFullMask, src_lane, j);
          const acc_t w = kPerHead ? acc_t(1) : __shfl_sync(kFullMask, w_lane, j);
          const int64_t wrow = kPerHead ? __shfl_sync(kFullMask, wrow_lane, j) : 0;
          const int64_t k = k0 + j;
          const scalar_t* __restrict__ x_src = x + src * F;
#pragma unroll
          for (int t = 0; t < kFeatPerLane; ++t) {
            const int64_t f = f0 + t * kWarp;
            if (f < F) {
              acc_t m = A::load(x_src[f]);
              if (kPerHead) {
                m *= A::load(weight[wrow * weight_heads + head[t]]);
              } else if (has_weight) {
                m *= w;
              }
              if (kExtremum) {
                // The reference forms the message in the storage type before
                // comparing; rounding here makes ties (and so arg) agree for
                // the half types.  A no-op for float and double.
                m = sign * A::load(A::store(m));
                // A NaN message wins once and keeps its place (NaN propagates
                // as in torch.amax); among equal values the first edge wins.
                if (best[t] < 0 || m > acc[t] || (isnan(m) && !isnan(acc[t]))) {
                  acc[t] = m;
                  best[t] = k;
                }
              } else {
                acc[t] += m;
              }
            }
          }
        }
      }

      const int64_t degree = end - start;
#pragma unroll
      for (int t = 0; t < kFeatPerLane; ++t) {
        const int64_t f = f0 + t * kWarp;
        if (f < F) {
          acc_t v = acc[t];
          if (kExtremum) {
            v = best[t] < 0 ? acc_t(0) : sign * v;
            arg[row * F + f] = best[t];
          } else if (mean && degree > 0) {
            v = divide(v, static_cast<acc_t>(degree));
          }
          out[row * F + f] = A::store(v);
        }
      }
    }
  }
}

template <typename scalar_t, bool kExtremum, bool kPerHead>
cudaError_t launch(int feat_per_lane, dim3 grid, const int64_t* rowptr, const int64_t* col, const scalar_t* weight,
                   const int64_t* weight_index, int64_t weight_heads, int64_t head_width, const scalar_t* x, int64_t num_dst, int64_t F, bool mean,
                   typename Acc<scalar_t>::type sign, scalar_t* out, int64_t* arg, cudaStream_t stream) {
  const dim3 block(kWarp, kRowsPerBlock);
  switch (feat_per_lane) {
    case 1:
      spmm_warp_kernel<scalar_t, kExtremum, kPerHead, 1><<<grid, block, 0, stream>>>(
          rowptr, col, weight, weight_index, weight_heads, head_width, x, num_dst, F, mean, sign, out, arg);
      break;
    case 2:
      spmm_warp_kernel<scalar_t, kExtremum, kPerHead, 2><<<grid, block, 0, stream>>>(
          rowptr, col, weight, weight_index, weight_heads, head_width, x, num_dst, F, mean, sign, out, arg);
      break;
    default:
      spmm_warp_kernel<scalar_t, kExtremum, kPerHead, 4><<<grid, block, 0, stream>>>(
          rowptr, col, weight, weight_index, weight_heads, head_width, x, num_dst, F, mean, sign, out, arg);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

template <typename scalar_t>
cudaError_t spmm_csr_forward(const int64_t* rowptr, const int64_t* col, const scalar_t* weight,
                             const int64_t* weight_index, int64_t weight_heads, const scalar_t* x, int64_t num_dst,
                             int64_t F, Reduce reduce, scalar_t* out, int64_t* arg, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const bool extremum = reduce == Reduce::kMax || reduce == Reduce::kMin;
  if (reduce != Reduce::kSum && reduce != Reduce::kMean && !extremum) return cudaErrorInvalidValue;
  if (num_dst < 0 || F < 0) return cudaErrorInvalidValue;
  if (num_dst == 0 || F == 0) return cudaSuccess;
  // x, col and weight may be null for a graph without edges (empty tensors
  // need not own memory); they are never read then.
  if (rowptr == nullptr || out == nullptr || (extremum && arg == nullptr)) return cudaErrorInvalidValue;
  if (weight != nullptr && (weight_heads < 1 || F % weight_heads != 0)) return cudaErrorInvalidValue;

  const bool per_head = weight != nullptr && weight_heads > 1;
  const int64_t head_width = per_head ? F / weight_heads : F;
  // Narrow features would leave lanes idle with a wide tile; wide features
  // get 4 per lane so each staged edge feeds 4 independent loads per lane.
  const int feat_per_lane = F <= kWarp ? 1 : (F <= 2 * kWarp ? 2 : 4);
  const int64_t tile = int64_t{kWarp} * feat_per_lane;
  const int64_t blocks_x = (num_dst + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t blocks_y = (F + tile - 1) / tile;
  const dim3 grid(static_cast<unsigned>(blocks_x < kMaxGridX ? blocks_x : kMaxGridX),
                  static_cast<unsigned>(blocks_y < kMaxGridY ? blocks_y : kMaxGridY));
  const bool mean = reduce == Reduce::kMean;
  const acc_t sign = reduce == Reduce::kMin ? acc_t(-1) : acc_t(1);

  if (extremum) {
    return per_head ? launch<scalar_t, true, true>(feat_per_lane, grid, rowptr, col, weight, weight_index, weight_heads, head_width,
                                                   x, num_dst, F, mean, sign, out, arg, stream)
                    : launch<scalar_t, true, false>(feat_per_lane, grid, rowptr, col, weight, weight_index, weight_heads,
                                                    head_width, x, num_dst, F, mean, sign, out, arg, stream);
  }
  return per_head ? launch<scalar_t, false, true>(feat_per_lane, grid, rowptr, col, weight, weight_index, weight_heads, head_width,
                                                  x, num_dst, F, mean, sign, out, arg, stream)
                  : launch<scalar_t, false, false>(feat_per_lane, grid, rowptr, col, weight, weight_index, weight_heads, head_width,
                                                   x, num_dst, F, mean, sign, out, arg, stream);
}

template cudaError_t spmm_csr_forward<float>(const int64_t*, const int64_t*, const float*, const int64_t*, int64_t, const float*,
                                             int64_t, int64_t, Reduce, float*, int64_t*, cudaStream_t);
template cudaError_t spmm_csr_forward<double>(const int64_t*, const int64_t*, const double*, const int64_t*, int64_t, const double*,
                                              int64_t, int64_t, Reduce, double*, int64_t*, cudaStream_t);
template cudaError_t spmm_csr_forward<__half>(const int64_t*, const int64_t*, const __half*, const int64_t*, int64_t, const __half*,
                                              int64_t, int64_t, Reduce, __half*, int64_t*, cudaStream_t);
template cudaError_t spmm_csr_forward<__nv_bfloat16>(const int64_t*, const int64_t*, const __nv_bfloat16*, const int64_t*, int64_t,
                                                     const __nv_bfloat16*, int64_t, int64_t, Reduce,
                                                     __nv_bfloat16*, int64_t*, cudaStream_t);

}  // namespace gnn
}  // namespace frontiers_fast

// Tile rasterization of projected Gaussians, forward (Kerbl et al., "3D
// Gaussian Splatting for Real-Time Radiance Field Rendering", SIGGRAPH 2023,
// section 6; the blending rules are gsplat's, as raster_cpu.cpp has them).
//
// Per pixel (centre (x + 0.5, y + 0.5)), walking its tile's depth-sorted run:
//   sigma = c dy^2 / 2 + a dx^2 / 2 + b dx dy          (skipped if < 0)
//   alpha = min(0.99, o exp(-sigma))                     (skipped if < 1/255)
//   stop before the Gaussian that would bring T to 1e-4 or below
//   out += colour alpha T;  T *= 1 - alpha
// and render = out + T background, alpha = 1 - T.  The pixel also keeps its
// final T and the index into flatten_ids of the last Gaussian it blended
// (-1 if none): a back-to-front backward starts there.
//
// Layout.  One thread block per tile and one thread per pixel; a tile wider
// than 16 pixels is split into 16 x 16 sub-tiles, each its own block walking
// the whole run (the blocks stay at 256 threads).  The run is read in batches
// of one Gaussian per thread into shared memory (row, mean, half conic,
// opacity), then every thread blends the batch for its pixel.  A barrier that
// counts the finished threads (__syncthreads_count) opens every batch, so a
// block stops reading as soon as all its pixels have stopped.  Colours are
// read from global memory by row (the rows of a run are scattered; they stay
// in L1/L2 across the tile's pixels) into a register accumulator of a small
// channel capacity, or into the output itself for many channels.
//
// Rounding.  sigma, alpha and T are computed in the input's dtype with the
// reference's order of operations, and without contractions into FMAs (the
// _rn intrinsics), so that the skip and stop decisions fall where the
// reference's do; the colour sums use FMAs.
//
// The value checks (finite tables, opacities in [0, 1], ids and offsets in
// range) run in a separate grid-stride kernel that only ORs bits into the
// status word; the rasterizer itself never trusts the ids or offsets.

#include <cstdint>

#include "splat/raster.cuh"

namespace frontiers_fast {
namespace splat {
namespace {

constexpr int kMaxSide = 16;  // pixels per block side: 256 threads
constexpr int kMaxBlock = kMaxSide * kMaxSide;
constexpr int kCheckThreads = 256;
constexpr int64_t kMaxGrid = 2147483647;
constexpr int64_t kMaxCheckBlocks = 4096;

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.99;
// T (1 - alpha) <= 1e-4 (1 + 1e-9) stops: the slack puts the frequent tie of
// two opaque Gaussians clamped at 0.99 (T = 1e-4 exactly) on the side the
// reference takes (see raster_cpu.cpp).
constexpr double kTStop = 1e-4 * (1 + 1e-9);

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }

// NaN or inf, from the exponent bits (independent of fast-math flags).
__device__ __forceinline__ bool not_finite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}
__device__ __forceinline__ bool not_finite(double v) {
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(v));
  return (bits & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

// Every value check of the reference entry, as bits of the status word.  The
// tables are walked as one index space, segment by segment.
template <typename T>
__global__ void __launch_bounds__(kCheckThreads) raster_check_kernel(const RasterArgs<T> p) {
  const int64_t n_means = 2 * p.R, n_conics = 3 * p.R, n_colors = p.D * p.R, n_opac = p.R;
  const int64_t n_bg = p.backgrounds != nullptr ? p.C * p.D : 0;
  const int64_t n_off = p.C * p.tile_width * p.tile_height, n_ids = p.M;
  const int64_t total = n_means + n_conics + n_colors + n_opac + n_bg + n_off + n_ids;
  unsigned long long flags = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t j = i;
    if (j < n_means) {
      if (not_finite(p.means2d[j])) flags |= kRasterBadMeans;
      continue;
    }
    j -= n_means;
    if (j < n_conics) {
      if (not_finite(p.conics[j])) flags |= kRasterBadConics;
      continue;
    }
    j -= n_conics;
    if (j < n_colors) {
      if (not_finite(p.colors[j])) flags |= kRasterBadColors;
      continue;
    }
    j -= n_colors;
    if (j < n_opac) {
      const T o = p.opacities[j];
      if (not_finite(o)) flags |= kRasterBadOpacities;
      if (!(o >= T(0) && o <= T(1))) flags |= kRasterOpacityRange;
      continue;
    }
    j -= n_opac;
    if (j < n_bg) {
      if (not_finite(p.backgrounds[j])) flags |= kRasterBadBackgrounds;
      continue;
    }
    j -= n_bg;
    if (j < n_off) {
      const int64_t s = p.isect_offsets[j];
      if (s < 0 || s > p.M || (j > 0 && s < p.isect_offsets[j - 1])) flags |= kRasterOffsets;
      continue;
    }
    j -= n_off;
    const int64_t g = p.flatten_ids[j];
    if (g < 0 || g >= p.R) flags |= kRasterIdRange;
  }
  // Only bad data pays for an atomic; OR is order-free.
  if (flags != 0) atomicOr(p.status, flags);
}

// DC: the channel capacity of the register accumulator (1 to 4: exactly D;
// larger: any D <= DC), or 0 to accumulate in the output for any D.
template <typename T, int DC>
__global__ void __launch_bounds__(kMaxBlock) raster_fwd_kernel(const RasterArgs<T> p, int side, int64_t tasks) {
  __shared__ int32_t s_row[kMaxBlock];
  __shared__ T s_mx[kMaxBlock], s_my[kMaxBlock], s_ha[kMaxBlock], s_b[kMaxBlock], s_hc[kMaxBlock],
      s_o[kMaxBlock];

  constexpr bool kExact = DC >= 1 && DC <= 4;
  const int64_t D = kExact ? DC : p.D;
  const int P = side * side;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t ts = p.tile_size, W = p.width, H = p.height, M = p.M;
  const int64_t per_cam = p.tile_width * p.tile_height, n_tiles = p.C * per_cam;
  const int64_t sps = ts / side, subs = sps * sps;  // sub-tiles per side, per tile
  const T half = T(0.5), one = T(1), zero = T(0);
  const T alpha_min = static_cast<T>(kAlphaMin), alpha_max = static_cast<T>(kAlphaMax);
  const T t_stop = static_cast<T>(kTStop);

  // The grid may be capped below the number of sub-tiles; the loop is
  // block-uniform, so the barriers inside it are safe.
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t tile = task / subs, sub = task % subs;
    const int64_t cam = tile / per_cam, local = tile % per_cam;
    const int64_t x = (local % p.tile_width) * ts + (sub % sps) * side + tid % side;
    const int64_t y = (local / p.tile_width) * ts + (sub / sps) * side + tid / side;
    const bool inside = x < W && y < H;
    const int64_t pix = (cam * H + y) * W + x;
    // The tile's run, clamped so that no offsets can make a read leave flatten_ids.
    int64_t s = p.isect_offsets[tile];
    int64_t e = tile + 1 < n_tiles ? static_cast<int64_t>(p.isect_offsets[tile + 1]) : M;
    s = s < 0 ? 0 : (s > M ? M : s);
    e = e < s ? s : (e > M ? M : e);

    const T px = static_cast<T>(x) + half, py = static_cast<T>(y) + half;
    T t = one;
    int32_t last = -1;
    bool done = !inside;
    T acc[DC > 0 ? DC : 1];
#pragma unroll
    for (int d = 0; d < (DC > 0 ? DC : 1); ++d) acc[d] = zero;
    T* out = p.render_colors + pix * p.D;
    if (DC == 0 && inside) {
      for (int64_t d = 0; d < D; ++d) out[d] = zero;
    }

    for (int64_t b0 = s; b0 < e; b0 += P) {
      // A barrier for every batch: the previous batch's readers are done
      // with the shared arrays, and a block whose pixels have all stopped leaves.
      if (__syncthreads_count(done ? 1 : 0) == P) break;
      const int64_t k = b0 + tid;
      if (k < e) {
        const int64_t g = p.flatten_ids[k];
        if (g >= 0 && g < p.R) {
          s_row[tid] = static_cast<int32_t>(g);
          s_mx[tid] = p.means2d[2 * g];
          s_my[tid] = p.means2d[2 * g + 1];
          s_ha[tid] = mul_rn(half, p.conics[3 * g]);
          s_b[tid] = p.conics[3 * g + 1];
          s_hc[tid] = mul_rn(half, p.conics[3 * g + 2]);
          s_o[tid] = p.opacities[g];
        } else {  // a bad id (flagged by the check): a transparent Gaussian, never blended
          s_row[tid] = 0;
          s_mx[tid] = s_my[tid] = s_ha[tid] = s_b[tid] = s_hc[tid] = s_o[tid] = zero;
        }
      }
      __syncthreads();
      const int n = static_cast<int>(e - b0 < P ? e - b0 : P);
      for (int j = 0; j < n && !done; ++j) {
        const T dx = px - s_mx[j];
        const T dy = py - s_my[j];
        const T sx = mul_rn(mul_rn(s_ha[j], dx), dx);
        const T sy = mul_rn(mul_rn(s_hc[j], dy), dy);
        const T sigma = add_rn(add_rn(sy, sx), mul_rn(mul_rn(s_b[j], dy), dx));
        if (sigma < zero) continue;  // the conic is not positive definite here
        const T raw = mul_rn(s_o[j], exp_t(-sigma));
        const T alpha = raw < alpha_max ? raw : alpha_max;
        if (alpha < alpha_min) continue;
        const T t_next = mul_rn(t, one - alpha);
        if (t_next <= t_stop) {
          done = true;
          break;
        }
        const T w = mul_rn(alpha, t);
        const T* c = p.colors + static_cast<int64_t>(s_row[j]) * D;
        if constexpr (DC > 0) {
#pragma unroll
          for (int d = 0; d < DC; ++d) {
            if (kExact || d < D) acc[d] = fma(w, c[d], acc[d]);
          }
        } else {
          for (int64_t d = 0; d < D; ++d) out[d] = fma(w, c[d], out[d]);
        }
        t = t_next;
        last = static_cast<int32_t>(b0 + j);
      }
    }

    if (inside) {
      const T* bg = p.backgrounds != nullptr ? p.backgrounds + cam * D : nullptr;
      if constexpr (DC > 0) {
#pragma unroll
        for (int d = 0; d < DC; ++d) {
          if (kExact || d < D) out[d] = acc[d] + (bg != nullptr ? t * bg[d] : zero);
        }
      } else {
        if (bg != nullptr) {
          for (int64_t d = 0; d < D; ++d) out[d] = out[d] + t * bg[d];
        }
      }
      p.final_ts[pix] = t;
      p.render_alphas[pix] = one - t;
      p.last_ids[pix] = last;
    }
    // The next task's first batch barrier protects the shared arrays; a
    // task without a run reads none.
  }
}

template <typename T, int DC>
cudaError_t launch(const RasterArgs<T>& p, int side, int64_t tasks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tasks < kMaxGrid ? tasks : kMaxGrid));
  raster_fwd_kernel<T, DC><<<grid, dim3(side * side), 0, stream>>>(p, side, tasks);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t rasterize_to_pixels_forward(const RasterArgs<T>& p, cudaStream_t stream) {
  if (p.C < 0 || p.R < 0 || p.D < 0 || p.M < 0 || p.width < 1 || p.height < 1) return cudaErrorInvalidValue;
  if (p.tile_size < 1 || (p.tile_size & (p.tile_size - 1)) != 0) return cudaErrorInvalidValue;
  if (p.tile_width != (p.width + p.tile_size - 1) / p.tile_size ||
      p.tile_height != (p.height + p.tile_size - 1) / p.tile_size) {
    return cudaErrorInvalidValue;
  }
  if (p.status == nullptr) return cudaErrorInvalidValue;
  if (p.R > 0 && (p.means2d == nullptr || p.conics == nullptr || p.opacities == nullptr ||
                  (p.D > 0 && p.colors == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (p.M > 0 && p.flatten_ids == nullptr) return cudaErrorInvalidValue;
  const int64_t pixels = p.C * p.width * p.height;
  if (pixels > 0 && (p.isect_offsets == nullptr || p.render_alphas == nullptr || p.final_ts == nullptr ||
                     p.last_ids == nullptr || (p.D > 0 && p.render_colors == nullptr))) {
    return cudaErrorInvalidValue;
  }

  cudaError_t err = cudaMemsetAsync(p.status, 0, sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return err;
  const int64_t checked = p.R * (6 + p.D) + (p.backgrounds != nullptr ? p.C * p.D : 0) +
                          p.C * p.tile_width * p.tile_height + p.M;
  if (checked > 0) {
    int64_t blocks = (checked + kCheckThreads - 1) / kCheckThreads;
    blocks = blocks < kMaxCheckBlocks ? blocks : kMaxCheckBlocks;
    raster_check_kernel<T><<<static_cast<unsigned>(blocks), kCheckThreads, 0, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (pixels == 0) return cudaSuccess;

  const int side = static_cast<int>(p.tile_size < kMaxSide ? p.tile_size : kMaxSide);
  const int64_t sps = p.tile_size / side;
  const int64_t tasks = p.C * p.tile_width * p.tile_height * sps * sps;
  switch (p.D) {
    case 1: return launch<T, 1>(p, side, tasks, stream);
    case 2: return launch<T, 2>(p, side, tasks, stream);
    case 3: return launch<T, 3>(p, side, tasks, stream);
    case 4: return launch<T, 4>(p, side, tasks, stream);
    default:
      if (p.D <= 8) return launch<T, 8>(p, side, tasks, stream);
      if (p.D <= 16) return launch<T, 16>(p, side, tasks, stream);
      return launch<T, 0>(p, side, tasks, stream);
  }
}

template cudaError_t rasterize_to_pixels_forward<float>(const RasterArgs<float>&, cudaStream_t);
template cudaError_t rasterize_to_pixels_forward<double>(const RasterArgs<double>&, cudaStream_t);

}  // namespace splat
}  // namespace frontiers_fast

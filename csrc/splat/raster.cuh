// The tile rasterizer of the splatting family on the GPU: the CUDA kernel of
// frontiers_fast::rasterize_to_pixels's "cuda" backend (forward only; the
// backward op has no cuda backend).  Semantics and the float64 truth:
// frontiers_fast/reference/splat.py (rasterize_to_pixels); the CPU kernel
// with the same rules is csrc/splat/raster_cpu.cpp.
//
// This header is included by both nvcc (raster.cu) and the host compiler
// (raster_cuda.cpp), so it holds declarations only and no torch types: the
// launcher takes raw pointers and a stream and reports failure as
// cudaError_t.  It only enqueues work on `stream` (no host read, no
// synchronisation), so it can be captured in a CUDA graph.
//
// Data errors (non-finite inputs, opacities outside [0, 1], flatten_ids or
// isect_offsets out of range) are not returned: they are recorded on the
// device as bits of one status word that the caller may read after the
// launch (raster_cuda.cpp does, when the stream is not being captured).  The
// launcher initialises it.  Bad data never makes the kernel read or write
// out of bounds: a tile's run is clamped to [0, M] and an id outside the row
// table is blended as a transparent Gaussian.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace frontiers_fast {
namespace splat {

// Bits of the status word.
constexpr unsigned long long kRasterBadMeans = 1ull << 0;      // means2d not finite
constexpr unsigned long long kRasterBadConics = 1ull << 1;     // conics not finite
constexpr unsigned long long kRasterBadColors = 1ull << 2;     // colors not finite
constexpr unsigned long long kRasterBadOpacities = 1ull << 3;  // opacities not finite
constexpr unsigned long long kRasterBadBackgrounds = 1ull << 4;
constexpr unsigned long long kRasterOpacityRange = 1ull << 5;  // some opacity outside [0, 1]
constexpr unsigned long long kRasterIdRange = 1ull << 6;       // some flatten_id outside [0, R)
constexpr unsigned long long kRasterOffsets = 1ull << 7;       // offsets decreasing or outside [0, M]

// One forward.  The Gaussians are row tables of R rows (R = opacities.numel()):
// gsplat's dense [C, N, ...] layout (R = C N) and its packed [nnz, ...] one
// alike, as flatten_ids only index rows.
//
//   means2d     [R, 2]   scalar_t     conics [R, 3] (a, b, c: sigma = a dx^2 / 2 + b dx dy + c dy^2 / 2)
//   colors      [R, D]   scalar_t     opacities [R]
//   backgrounds [C, D]   scalar_t, or nullptr
//   isect_offsets [C, tile_height, tile_width] int32: tile t's run of
//               flatten_ids is [offsets[t], offsets[t + 1]) (M for the last)
//   flatten_ids [M] int32, row indices, depth-sorted within each run
//   render_colors [C, H, W, D], render_alphas [C, H, W, 1], final_ts [C, H, W],
//   last_ids    [C, H, W] int32: contiguous, every element written
//   status      one device word (see above)
//
// tile_size is a power of two; tile_width = ceil(W / tile_size), tile_height
// likewise.  scalar_t is float or double (everything is computed in it).
// Returns cudaErrorInvalidValue for inconsistent sizes (before launching
// anything), otherwise the launch status.
template <typename scalar_t>
struct RasterArgs {
  int64_t C = 0;  // images (cameras)
  int64_t R = 0;  // rows of the Gaussian tables
  int64_t D = 0;  // channels
  int64_t width = 0;
  int64_t height = 0;
  int64_t tile_size = 0;
  int64_t tile_width = 0;
  int64_t tile_height = 0;
  int64_t M = 0;  // intersections (flatten_ids.numel())
  const scalar_t* means2d = nullptr;
  const scalar_t* conics = nullptr;
  const scalar_t* colors = nullptr;
  const scalar_t* opacities = nullptr;
  const scalar_t* backgrounds = nullptr;
  const int32_t* isect_offsets = nullptr;
  const int32_t* flatten_ids = nullptr;
  scalar_t* render_colors = nullptr;
  scalar_t* render_alphas = nullptr;
  scalar_t* final_ts = nullptr;
  int32_t* last_ids = nullptr;
  unsigned long long* status = nullptr;
};

template <typename scalar_t>
cudaError_t rasterize_to_pixels_forward(const RasterArgs<scalar_t>& args, cudaStream_t stream);

extern template cudaError_t rasterize_to_pixels_forward<float>(const RasterArgs<float>&, cudaStream_t);
extern template cudaError_t rasterize_to_pixels_forward<double>(const RasterArgs<double>&, cudaStream_t);

}  // namespace splat
}  // namespace frontiers_fast

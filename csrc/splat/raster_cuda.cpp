// Torch binding of the tile rasterizer (raster.cu): the "cuda" backend of
// frontiers_fast::rasterize_to_pixels's forward (its backward op has no cuda
// backend), registered as frontiers_fast_native::rasterize_to_pixels under
// the CUDA dispatch key.  The schema is defined from Python
// (frontiers_fast/ops/splat.py), so the op and its fake exist even when this
// library is not built.  The argument checks are those of the CPU kernel
// (raster_cpu.cpp), except that the Gaussians are row tables: means2d
// [C, N, 2] or [R, 2] (gsplat's packed layout), and the other tables alike;
// C comes from isect_offsets.
//
// Value checks.  The router calls this binding directly, so the reference
// entry's checks (finite tables, opacities in [0, 1], flatten_ids and
// isect_offsets in range) are made here, with its ValueError messages, so
// that every backend (and a compiled graph) refuses the same data.  The
// launcher records them on the device in one status word, and one 8-byte
// read after the launch answers them all (one synchronisation per call).
// The read is made only when the stream is not being captured into a CUDA
// graph; a captured call runs unchecked, where bad data gives defined but
// meaningless pixels (never an out-of-bounds access).  Only when a check
// fails are the inputs reduced again, for the ranges the message quotes.
//
// setup.py compiles this file only for a CUDA build and then defines
// FRONTIERS_FAST_WITH_CUDA; the guard keeps any other compile of it harmless.
#ifdef FRONTIERS_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"
#include "splat/raster.cuh"

namespace frontiers_fast {
namespace splat {
namespace {

using at::Tensor;

constexpr const char* kOp = "rasterize_to_pixels (cuda)";

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), kOp, ": ", name, " is on ", t.device(), " but means2d is on ",
              ref.device());
}

void check_float(const Tensor& t, const char* name, const Tensor& means2d) {
  check_cuda(t, name, means2d);
  TORCH_CHECK(t.scalar_type() == means2d.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
              " but means2d has ", means2d.scalar_type());
}

// `lead` followed by `last`, for a shape message.
std::vector<int64_t> with_last(at::IntArrayRef lead, int64_t last) {
  std::vector<int64_t> s(lead.begin(), lead.end());
  s.push_back(last);
  return s;
}

bool capturing(cudaStream_t stream) {
  return c10::cuda::captureStatusMayInitCtx(stream) != c10::cuda::CaptureStatus::None;
}

// The inputs, contiguous; backgrounds undefined when absent.
struct Inputs {
  Tensor means2d, conics, colors, opacities, backgrounds, offsets, ids;
};

template <typename T>
cudaError_t launch(const Inputs& in, int64_t C, int64_t D, int64_t width, int64_t height, int64_t tile_size,
                   int64_t tw, int64_t th, Tensor& colors, Tensor& alphas, Tensor& final_ts, Tensor& last_ids,
                   Tensor& status, cudaStream_t stream) {
  RasterArgs<T> a;
  a.C = C;
  a.R = in.opacities.numel();
  a.D = D;
  a.width = width;
  a.height = height;
  a.tile_size = tile_size;
  a.tile_width = tw;
  a.tile_height = th;
  a.M = in.ids.numel();
  a.means2d = in.means2d.const_data_ptr<T>();
  a.conics = in.conics.const_data_ptr<T>();
  a.colors = in.colors.const_data_ptr<T>();
  a.opacities = in.opacities.const_data_ptr<T>();
  a.backgrounds = in.backgrounds.defined() ? in.backgrounds.const_data_ptr<T>() : nullptr;
  a.isect_offsets = in.offsets.const_data_ptr<int32_t>();
  a.flatten_ids = in.ids.const_data_ptr<int32_t>();
  a.render_colors = colors.mutable_data_ptr<T>();
  a.render_alphas = alphas.mutable_data_ptr<T>();
  a.final_ts = final_ts.mutable_data_ptr<T>();
  a.last_ids = last_ids.mutable_data_ptr<int32_t>();
  a.status = reinterpret_cast<unsigned long long*>(status.mutable_data_ptr<int64_t>());
  return rasterize_to_pixels_forward<T>(a, stream);
}

// The reference entry's messages (ops/splat.py, _check_blend_values), in its order.
void raise_bad_values(unsigned long long flags, const Inputs& in) {
  const std::pair<unsigned long long, const char*> finite[] = {{kRasterBadMeans, "means2d"},
                                                               {kRasterBadConics, "conics"},
                                                               {kRasterBadColors, "colors"},
                                                               {kRasterBadOpacities, "opacities"},
                                                               {kRasterBadBackgrounds, "backgrounds"}};
  for (const auto& [bit, name] : finite) {
    TORCH_CHECK_VALUE(!(flags & bit), name, " must be finite (it contains NaN or inf)");
  }
  if (flags & kRasterOpacityRange) {
    const auto mm = at::aminmax(in.opacities.to(at::kDouble));
    char buf[160];
    std::snprintf(buf, sizeof buf, "opacities must lie in [0, 1], got values in [%g, %g]",
                  std::get<0>(mm).item<double>(), std::get<1>(mm).item<double>());
    TORCH_CHECK_VALUE(false, buf);
  }
  const int64_t R = in.opacities.numel(), M = in.ids.numel();
  // Rows: C * N Gaussians, or nnz packed rows (1-D opacities).
  const bool packed = in.opacities.dim() == 1;
  const char* what = packed ? "nnz" : "C * N";
  const char* rows = packed ? "packed rows" : "Gaussians";
  if (flags & kRasterIdRange) {
    TORCH_CHECK_VALUE(R > 0, "flatten_ids must be empty when there are no Gaussians (", what, " = 0), got ", M,
                      " entries");
    const auto mm = at::aminmax(in.ids);
    TORCH_CHECK_VALUE(false, "flatten_ids must lie in [0, ", R - 1, "] (indices into the ", what, " = ", R, " ",
                      rows, "), got values in [", std::get<0>(mm).item<int64_t>(), ", ",
                      std::get<1>(mm).item<int64_t>(), "]");
  }
  TORCH_CHECK_VALUE(!(flags & kRasterOffsets),
                    "isect_offsets must be non-decreasing (flattened over [C, tile_height, tile_width]) and lie in "
                    "[0, M] = [0, ",
                    M, "] (M = flatten_ids.numel()), as isect_offset_encode returns them");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rasterize_to_pixels_cuda(
    const Tensor& means2d, const Tensor& conics, const Tensor& colors, const Tensor& opacities,
    const std::optional<Tensor>& backgrounds, int64_t width, int64_t height, int64_t tile_size,
    const Tensor& isect_offsets, const Tensor& flatten_ids, bool /*absgrad: the backward's*/) {
  TORCH_CHECK(means2d.defined() && means2d.is_cuda(), kOp, ": means2d must be a CUDA tensor, got one on ",
              means2d.defined() ? means2d.device() : at::Device(at::kCPU));
  const auto dtype = means2d.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, kOp, ": means2d must be float32 or float64, got ",
              dtype);
  TORCH_CHECK((means2d.dim() == 3 || means2d.dim() == 2) && means2d.size(-1) == 2, kOp,
              ": means2d must be [C, N, 2] or a packed [R, 2], got shape ", means2d.sizes());
  const at::IntArrayRef lead = means2d.sizes().slice(0, means2d.dim() - 1);  // [C, N] or [R]
  const char* layout = means2d.dim() == 3 ? "[C, N" : "[R";
  check_float(conics, "conics", means2d);
  check_float(colors, "colors", means2d);
  check_float(opacities, "opacities", means2d);
  TORCH_CHECK(conics.sizes() == at::IntArrayRef(with_last(lead, 3)), kOp, ": conics must be ", layout, ", 3] = ",
              at::IntArrayRef(with_last(lead, 3)), ", got shape ", conics.sizes());
  TORCH_CHECK(colors.dim() == means2d.dim() && colors.sizes().slice(0, lead.size()) == lead, kOp,
              ": colors must be ", layout, ", D] with ", layout, "] = ", lead, ", got shape ", colors.sizes());
  TORCH_CHECK(opacities.sizes() == lead, kOp, ": opacities must be ", layout, "] = ", lead, ", got shape ",
              opacities.sizes());
  const int64_t D = colors.size(-1);
  TORCH_CHECK(opacities.numel() <= INT32_MAX, kOp, ": at most 2^31 - 1 Gaussian rows (flatten_ids are int32), got ",
              opacities.numel());

  TORCH_CHECK_VALUE(width >= 1 && height >= 1, kOp, ": width and height must be >= 1, got ", width, " x ", height);
  TORCH_CHECK_VALUE(tile_size >= 1 && (tile_size & (tile_size - 1)) == 0, kOp,
                    ": tile_size must be a positive power of two, got ", tile_size);
  const int64_t tw = (width + tile_size - 1) / tile_size, th = (height + tile_size - 1) / tile_size;
  check_cuda(isect_offsets, "isect_offsets", means2d);
  TORCH_CHECK(isect_offsets.scalar_type() == at::kInt && isect_offsets.dim() == 3 &&
                  isect_offsets.size(1) == th && isect_offsets.size(2) == tw,
              kOp, ": isect_offsets must be int32 [C, tile_height, tile_width] = [C, ", th, ", ", tw, "], got ",
              isect_offsets.scalar_type(), " ", isect_offsets.sizes());
  const int64_t C = isect_offsets.size(0);
  check_cuda(flatten_ids, "flatten_ids", means2d);
  TORCH_CHECK(flatten_ids.scalar_type() == at::kInt && flatten_ids.dim() == 1, kOp,
              ": flatten_ids must be int32 [M], got ", flatten_ids.scalar_type(), " ", flatten_ids.sizes());

  // Before any .contiguous() below, which may copy.
  const c10::cuda::CUDAGuard guard(means2d.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(means2d.get_device()).stream();

  Inputs in;
  if (const Tensor* b = present(backgrounds)) {
    check_float(*b, "backgrounds", means2d);
    TORCH_CHECK(b->sizes() == at::IntArrayRef({C, D}), kOp, ": backgrounds must be [C, D] = [", C, ", ", D,
                "], got shape ", b->sizes());
    in.backgrounds = b->contiguous();
  }
  in.means2d = means2d.contiguous();
  in.conics = conics.contiguous();
  in.colors = colors.contiguous();
  in.opacities = opacities.contiguous();
  in.offsets = isect_offsets.contiguous();
  in.ids = flatten_ids.contiguous();

  const auto opts = means2d.options();
  Tensor out = new_output({C, height, width, D}, opts);
  Tensor alphas = new_output({C, height, width, 1}, opts);
  Tensor final_ts = new_output({C, height, width}, opts);
  Tensor last_ids = new_output({C, height, width}, opts.dtype(at::kInt));
  Tensor status = at::empty({1}, opts.dtype(at::kLong));

  const cudaError_t err =
      dtype == at::kFloat
          ? launch<float>(in, C, D, width, height, tile_size, tw, th, out, alphas, final_ts, last_ids, status, stream)
          : launch<double>(in, C, D, width, height, tile_size, tw, th, out, alphas, final_ts, last_ids, status,
                           stream);
  TORCH_CHECK(err == cudaSuccess, kOp, ": launching the CUDA kernels failed (", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err), ") for C = ", C, ", R = ", in.opacities.numel(), ", D = ", D, ", ", width,
              " x ", height, ", tile_size ", tile_size, ", M = ", in.ids.numel(), ", dtype ", dtype);

  if (!capturing(stream)) {
    const Tensor host = status.to(at::kCPU);  // waits for the kernels
    const auto flags = static_cast<unsigned long long>(host.const_data_ptr<int64_t>()[0]);
    if (flags != 0) raise_bad_values(flags, in);
  }
  return {out, alphas, final_ts, last_ids};
}

}  // namespace
}  // namespace splat
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CUDA, m) {
  m.impl("rasterize_to_pixels", &frontiers_fast::splat::rasterize_to_pixels_cuda);
}

#endif  // FRONTIERS_FAST_WITH_CUDA

// Torch binding of the MoE routing and permutation kernels (route.cu): the
// "cuda" backend of frontiers_fast::moe_route and frontiers_fast::moe_permute
// (forward only; their backward ops have no cuda backend), registered as
// frontiers_fast_native::moe_route / moe_permute under the CUDA dispatch key.
// The schemas are defined from Python (frontiers_fast/ops/moe.py), so the ops
// and their fakes exist even when this library is not built.  The argument
// checks and their messages are those of the CPU kernels (moe_cpu.cpp).
//
// Value checks.  The CPU kernels refuse bad data (NaN or +inf logits, a
// non-finite correction bias, rows with fewer than top_k selectable experts,
// ids out of range) with a ValueError, so that a compiled graph refuses it
// too.  Here the kernels record those conditions on the device, in a
// two-entry status buffer, instead of the binding scanning the inputs: one
// 16-byte read after the launch answers every check (one synchronisation per
// call, where separate reductions of the inputs would cost one each).  That
// read is made only when the current stream is not being captured into a
// CUDA graph, where a synchronisation is illegal; a captured call therefore
// runs unchecked, and bad input there gives defined but meaningless outputs
// (never an out-of-bounds access): NaN weights for an unrankable row, ids
// left out of the permutation.  Validate inputs before capturing them.
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
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "common/alloc.h"
#include "common/checks.h"
#include "moe/route.cuh"
#include "moe/route_args.h"

namespace frontiers_fast {
namespace moe {
namespace {

using at::Tensor;

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// A CUDA tensor of a storage dtype and `dim` dimensions (moe_cpu's data_arg).
void data_arg_cuda(const Tensor& t, const char* op, const char* name, int64_t dim) {
  check_cuda(t, op, name);
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", s);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// A 2-D int32/int64 index tensor on x's device, made contiguous (moe_cpu.h's index2d_arg).
Tensor index2d_arg_cuda(const Tensor& t, const Tensor& x, const char* op, const char* name, const char* x_name) {
  check_same_device(t, x, op, name, x_name);
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be [T, k], got shape ", t.sizes());
  return t.contiguous();
}

// Whether `stream` is being captured into a CUDA graph (or a capture on it
// was invalidated): no host read may be made then.
bool capturing(cudaStream_t stream) {
  return c10::cuda::captureStatusMayInitCtx(stream) != c10::cuda::CaptureStatus::None;
}

// The status buffer the kernels write; its entries are unsigned on the device.
unsigned long long* status_ptr(Tensor& status) {
  return reinterpret_cast<unsigned long long*>(status.mutable_data_ptr<int64_t>());
}

void check_launch(cudaError_t err, const char* op, const std::string& what) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): launching the CUDA kernels failed (", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err), ") for ", what);
}

// ---------------------------------------------------------------------------
// moe_route
// ---------------------------------------------------------------------------
template <typename cuda_t>
cudaError_t launch_route(const Tensor& logits, int64_t top_k, bool softmax, bool renormalize, const Tensor& bias,
                         int64_t n_group, int64_t topk_group, double scaling, Tensor& w, Tensor& ids,
                         Tensor& status, cudaStream_t stream) {
  using A = typename RouteAcc<cuda_t>::type;
  // c10::Half / __half and c10::BFloat16 / __nv_bfloat16 have the same bits.
  return moe_route_forward<cuda_t>(static_cast<const cuda_t*>(logits.const_data_ptr()), logits.stride(0),
                                   logits.size(0), logits.size(1), top_k, softmax, renormalize,
                                   bias.defined() ? static_cast<const A*>(bias.const_data_ptr()) : nullptr, n_group,
                                   topk_group, static_cast<A>(scaling), static_cast<A*>(w.mutable_data_ptr()),
                                   ids.mutable_data_ptr<int32_t>(), status_ptr(status), stream);
}

std::tuple<Tensor, Tensor> moe_route_cuda(const Tensor& logits_, int64_t top_k, std::string_view scoring,
                                          bool renormalize, const std::optional<Tensor>& correction_bias,
                                          std::optional<int64_t> n_group, std::optional<int64_t> topk_group,
                                          double scaling) {
  const char* op = "moe_route";
  data_arg_cuda(logits_, op, "logits", 2);
  const int64_t nt = logits_.size(0), E = logits_.size(1);
  const bool softmax = route_options(op, scoring, top_k, E, n_group, topk_group);
  const int64_t ng = n_group.value_or(0), tg = topk_group.value_or(0);
  TORCH_CHECK(E <= kRouteMaxExperts, op, " (cuda): logits has E=", E, " experts, but this kernel stages a row's ",
              "scores in shared memory and supports E <= ", kRouteMaxExperts, "; use the triton or reference backend");

  const c10::cuda::CUDAGuard guard(logits_.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits_.get_device()).stream();

  // Rows may be strided; the experts of a row must be adjacent.
  const Tensor logits = logits_.stride(1) == 1 || E == 1 ? logits_ : logits_.contiguous();
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor bias;
  if (const Tensor* b = present(correction_bias)) {
    check_same_device(*b, logits, op, "correction_bias", "logits");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == E, op, ": correction_bias must be [E]=[", E, "], got shape ",
                b->sizes());
    bias = b->to(acc).contiguous();
  }
  Tensor w = new_output({nt, top_k}, logits.options().dtype(acc));
  Tensor ids = new_output({nt, top_k}, logits.options().dtype(at::kInt));
  Tensor status = at::empty({2}, logits.options().dtype(at::kLong));

  cudaError_t err = cudaSuccess;
  switch (logits.scalar_type()) {
    case at::kFloat:
      err = launch_route<float>(logits, top_k, softmax, renormalize, bias, ng, tg, scaling, w, ids, status, stream);
      break;
    case at::kDouble:
      err = launch_route<double>(logits, top_k, softmax, renormalize, bias, ng, tg, scaling, w, ids, status, stream);
      break;
    case at::kHalf:
      err = launch_route<__half>(logits, top_k, softmax, renormalize, bias, ng, tg, scaling, w, ids, status, stream);
      break;
    default:  // at::kBFloat16, checked above
      err = launch_route<__nv_bfloat16>(logits, top_k, softmax, renormalize, bias, ng, tg, scaling, w, ids, status,
                                        stream);
      break;
  }
  check_launch(err, op,
               "T = " + std::to_string(nt) + ", E = " + std::to_string(E) + ", top_k = " + std::to_string(top_k));

  if (!capturing(stream)) {
    const Tensor host = status.to(at::kCPU);  // waits for the kernel
    const auto* s = reinterpret_cast<const unsigned long long*>(host.const_data_ptr<int64_t>());
    const unsigned long long flags = s[kRouteFlags], bad_row = s[kRouteBadRow];
    TORCH_CHECK_VALUE(!(flags & kRouteBadBias), "correction_bias must be finite (it contains NaN or inf)");
    TORCH_CHECK_VALUE(!(flags & kRouteBadLogit),
                      "logits must not contain NaN or +inf (-inf is allowed: it masks an expert)");
    TORCH_CHECK_VALUE(bad_row == ~0ull, "logits row ", bad_row, " has fewer than top_k=", top_k,
                      " selectable experts", n_group ? " in its topk_group kept groups" : "",
                      ": each row needs at least top_k finite (not -inf) logits");
  }
  return {w, ids};
}

// ---------------------------------------------------------------------------
// moe_permute
// ---------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> moe_permute_cuda(const Tensor& x_, const Tensor& ids_, int64_t num_experts) {
  const char* op = "moe_permute";
  data_arg_cuda(x_, op, "x", 2);
  const Tensor ids = index2d_arg_cuda(ids_, x_, op, "ids", "x");
  TORCH_CHECK(ids.size(0) == x_.size(0), op, ": ids has ", ids.size(0), " rows but x has ", x_.size(0), " tokens");
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK_VALUE(num_experts <= INT32_MAX, op, " (cuda): num_experts must be < 2^31, got ", num_experts);
  const int64_t nt = x_.size(0), H = x_.size(1), k = ids.size(1), E = num_experts;
  const int64_t R = nt * k;

  const c10::cuda::CUDAGuard guard(x_.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_.get_device()).stream();

  // Rows may be strided (a slice of a wider tensor is read in place); the
  // features of a row must be adjacent.
  const Tensor x = x_.stride(1) == 1 || H <= 1 ? x_ : x_.contiguous();
  const int64_t elem = static_cast<int64_t>(x.element_size());
  Tensor xp = new_output({R, H}, x.options());
  Tensor offsets = new_output({E + 1}, x.options().dtype(at::kLong));
  Tensor row_map = new_output({nt, k}, x.options().dtype(at::kLong));
  const size_t ws_bytes = moe_permute_workspace_bytes(R, E);
  TORCH_CHECK(ws_bytes <= static_cast<size_t>(INT64_MAX), op, " (cuda): the scratch for T*k = ", R, " pairs and ",
              E, " experts does not fit in memory");
  // The caching allocator's blocks are at least 512-byte aligned, as the launcher needs.
  Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  Tensor status = at::empty({2}, x.options().dtype(at::kLong));

  const bool i32 = ids.scalar_type() == at::kInt;
  const cudaError_t err = moe_permute_forward(
      x.const_data_ptr(), x.stride(0) * elem, H * elem, i32 ? ids.const_data_ptr<int32_t>() : nullptr,
      i32 ? nullptr : ids.const_data_ptr<int64_t>(), nt, k, E, xp.mutable_data_ptr(),
      offsets.mutable_data_ptr<int64_t>(), row_map.mutable_data_ptr<int64_t>(), workspace.mutable_data_ptr(),
      status_ptr(status), stream);
  check_launch(err, op,
               "T = " + std::to_string(nt) + ", k = " + std::to_string(k) + ", H = " + std::to_string(H) +
                   ", num_experts = " + std::to_string(E));

  if (R > 0 && !capturing(stream)) {
    const Tensor host = status.to(at::kCPU);  // waits for the kernels
    const auto* s = reinterpret_cast<const unsigned long long*>(host.const_data_ptr<int64_t>());
    const int64_t lo = permute_status_value(s[kPermuteMinId]), hi = permute_status_value(s[kPermuteMaxId]);
    TORCH_CHECK_VALUE(lo >= 0 && hi < E, "ids must lie in [0, ", E - 1, "] (there are ", E, " experts), got values in [",
                      lo, ", ", hi, "]");
  }
  return {xp, offsets, row_map};
}

}  // namespace
}  // namespace moe
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CUDA, m) {
  m.impl("moe_route", &frontiers_fast::moe::moe_route_cuda);
  m.impl("moe_permute", &frontiers_fast::moe::moe_permute_cuda);
}

#endif  // FRONTIERS_FAST_WITH_CUDA

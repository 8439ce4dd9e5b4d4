// Torch binding of the warp-per-row CUDA SpMM (spmm.cu): the "cuda" backend of
// frontiers_fast::spmm_fwd, registered as frontiers_fast_native::spmm_fwd under
// the CUDA dispatch key.  The schema is defined from Python
// (frontiers_fast/ops/gnn.py), so the op and its fake exist even when this
// library is not built.
//
// setup.py compiles this file only for a CUDA build and then defines
// FRONTIERS_FAST_WITH_CUDA; the guard keeps any other compile of it harmless.
#ifdef FRONTIERS_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/alloc.h"
#include "common/reduce.h"
#include "gnn/spmm.cuh"

namespace frontiers_fast {
namespace gnn {
namespace {

constexpr const char* kOp = "frontiers_fast::spmm_fwd (cuda): ";

void check_on(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), kOp, name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), kOp, name, " is on ", t.device(), " but x is on ", x.device());
}

void check_index(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_on(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kLong, kOp, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, kOp, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kOp, name, " must be contiguous");
}

template <typename cuda_t>
cudaError_t launch(const at::Tensor& rowptr, const at::Tensor& col, const std::optional<at::Tensor>& weight,
                   const int64_t* weight_index, const at::Tensor& x, Reduce reduce, at::Tensor& out, at::Tensor& arg,
                   cudaStream_t stream) {
  const auto* w = weight.has_value() ? static_cast<const cuda_t*>(weight->const_data_ptr()) : nullptr;
  const int64_t heads = weight.has_value() ? weight->size(1) : 1;
  return spmm_csr_forward<cuda_t>(rowptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), w, weight_index,
                                  heads, static_cast<const cuda_t*>(x.const_data_ptr()), out.size(0), out.size(1),
                                  reduce, static_cast<cuda_t*>(out.mutable_data_ptr()),
                                  is_extremum(reduce) ? arg.mutable_data_ptr<int64_t>() : nullptr, stream);
}

std::tuple<at::Tensor, at::Tensor> spmm_fwd_cuda(const at::Tensor& rowptr, const at::Tensor& col,
                                                 const std::optional<at::Tensor>& weight_,
                                                 const std::optional<at::Tensor>& weight_index,
                                                 const at::Tensor& x, int64_t reduce_code) {
  TORCH_CHECK(reduce_code >= 0 && reduce_code < kNumReduces, kOp, "reduce must be a code in [0, ", kNumReduces,
              ") (sum, mean, max, min), got ", reduce_code);
  const Reduce reduce = static_cast<Reduce>(reduce_code);
  const bool extremum = is_extremum(reduce);

  TORCH_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got one on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              "x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() == 2, kOp, "x must be 2-D [N_src, F], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), kOp, "x must be contiguous");
  check_index(rowptr, "rowptr", x);
  check_index(col, "col", x);
  TORCH_CHECK(rowptr.numel() >= 1, kOp, "rowptr must have N_dst + 1 >= 1 entries, got none");
  const int64_t num_dst = rowptr.numel() - 1;
  const int64_t F = x.size(1);
  std::optional<at::Tensor> weight;
  const int64_t* widx = nullptr;
  if (weight_.has_value() && weight_->defined()) {
    const at::Tensor& w = *weight_;
    check_on(w, "weight", x);
    TORCH_CHECK(w.scalar_type() == dtype, kOp, "weight has dtype ", w.scalar_type(), " but x has ", dtype,
                "; they must match");
    TORCH_CHECK(w.dim() == 2, kOp, "weight must be 2-D [E, Hw], got shape ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), kOp, "weight must be contiguous");
    TORCH_CHECK(w.size(0) == col.numel(), kOp, "weight has ", w.size(0), " rows but col has ", col.numel(),
                " edges");
    TORCH_CHECK(w.size(1) >= 1 && F % w.size(1) == 0, kOp, "weight has ", w.size(1),
                " heads, which must be at least 1 and divide F = ", F);
    weight = w;
    if (weight_index.has_value() && weight_index->defined()) {
      check_index(*weight_index, "weight_index", x);
      TORCH_CHECK(weight_index->numel() == col.numel(), kOp, "weight_index has ", weight_index->numel(),
                  " entries but col has ", col.numel(), " edges");
      widx = weight_index->const_data_ptr<int64_t>();
    }
  }
  // rowptr[N_dst] == E, 0 <= col < N_src and weight_index being a permutation
  // are not checked: that would read the tensors back to the host and
  // synchronize on every call.

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();

  at::Tensor out = new_output({num_dst, F}, x.options());
  at::Tensor arg = new_output(extremum ? at::IntArrayRef({num_dst, F}) : at::IntArrayRef({0}),
                              x.options().dtype(at::kLong));

  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kFloat:
      err = launch<float>(rowptr, col, weight, widx, x, reduce, out, arg, stream);
      break;
    case at::kDouble:
      err = launch<double>(rowptr, col, weight, widx, x, reduce, out, arg, stream);
      break;
    case at::kHalf:
      // c10::Half and __half are both one IEEE binary16 in 2 bytes.
      err = launch<__half>(rowptr, col, weight, widx, x, reduce, out, arg, stream);
      break;
    default:  // at::kBFloat16, checked above
      err = launch<__nv_bfloat16>(rowptr, col, weight, widx, x, reduce, out, arg, stream);
      break;
  }
  TORCH_CHECK(err == cudaSuccess, kOp, "launching the CUDA kernel failed (", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err), ") for N_dst = ", num_dst, ", F = ", F, ", E = ", col.numel(),
              ", dtype ", dtype);
  return {out, arg};
}

}  // namespace
}  // namespace gnn
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CUDA, m) { m.impl("spmm_fwd", &frontiers_fast::gnn::spmm_fwd_cuda); }

#endif  // FRONTIERS_FAST_WITH_CUDA

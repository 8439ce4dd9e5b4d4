// Torch binding of the warp-per-row CUDA SpMM (spmm.cu): registers
// frontiers_fast::spmm_fwd_warp under the CUDA dispatch key.  The schema is
// defined from Python (frontiers_fast/ops/gnn.py) so the op and its fake
// kernel exist even when this library is not built.
//
// setup.py compiles this file only for a CUDA build and then defines
// FRONTIERS_FAST_WITH_CUDA; the guard keeps any other compile of it harmless.
#ifdef FRONTIERS_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/poison.h"
#include "gnn/spmm.cuh"

namespace frontiers_fast {
namespace gnn {
namespace {

constexpr const char* kOp = "frontiers_fast::spmm_fwd_warp: ";

SpmmReduce parse_reduce(c10::string_view reduce) {
  if (reduce == "sum") return SpmmReduce::kSum;
  if (reduce == "mean") return SpmmReduce::kMean;
  if (reduce == "max") return SpmmReduce::kMax;
  if (reduce == "min") return SpmmReduce::kMin;
  TORCH_CHECK(false, kOp, "reduce must be one of 'sum', 'mean', 'max', 'min', got '", std::string(reduce), "'");
}

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
                   const at::Tensor& x, SpmmReduce reduce, at::Tensor& out, at::Tensor& arg, cudaStream_t stream) {
  const bool extremum = reduce == SpmmReduce::kMax || reduce == SpmmReduce::kMin;
  const auto* w = weight.has_value() ? static_cast<const cuda_t*>(weight->const_data_ptr()) : nullptr;
  const int64_t heads = weight.has_value() ? weight->size(1) : 1;
  return spmm_csr_forward<cuda_t>(rowptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), w, heads,
                                  static_cast<const cuda_t*>(x.const_data_ptr()), out.size(0), out.size(1), reduce,
                                  static_cast<cuda_t*>(out.mutable_data_ptr()),
                                  extremum ? arg.mutable_data_ptr<int64_t>() : nullptr, stream);
}

std::tuple<at::Tensor, at::Tensor> spmm_fwd_warp_cuda(const at::Tensor& rowptr, const at::Tensor& col,
                                                      const std::optional<at::Tensor>& weight, const at::Tensor& x,
                                                      c10::string_view reduce_name) {
  const SpmmReduce reduce = parse_reduce(reduce_name);
  const bool extremum = reduce == SpmmReduce::kMax || reduce == SpmmReduce::kMin;

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
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    check_on(w, "weight", x);
    TORCH_CHECK(w.scalar_type() == dtype, kOp, "weight has dtype ", w.scalar_type(), " but x has ", dtype,
                "; they must match");
    TORCH_CHECK(w.dim() == 2, kOp, "weight must be 2-D [E, Hw], got shape ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), kOp, "weight must be contiguous");
    TORCH_CHECK(w.size(0) == col.numel(), kOp, "weight has ", w.size(0), " rows but col has ", col.numel(),
                " edges");
    TORCH_CHECK(w.size(1) >= 1 && F % w.size(1) == 0, kOp, "weight has ", w.size(1),
                " heads, which must be at least 1 and divide F = ", F);
  }
  // rowptr[N_dst] == E and 0 <= col < N_src are not checked: that would read
  // the tensors back to the host and synchronize on every call.

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();

  at::Tensor out = new_output({num_dst, F}, x.options());
  const auto index_options = x.options().dtype(at::kLong);
  at::Tensor arg = extremum ? at::empty({num_dst, F}, index_options) : at::empty({0}, index_options);
  if (extremum && debug_poison()) {
    // -2 is neither a CSR position nor the empty-row -1, so an arg the
    // kernel leaves unwritten cannot pass for a real one.
    arg.fill_(-2);
  }

  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kFloat:
      err = launch<float>(rowptr, col, weight, x, reduce, out, arg, stream);
      break;
    case at::kDouble:
      err = launch<double>(rowptr, col, weight, x, reduce, out, arg, stream);
      break;
    case at::kHalf:
      // c10::Half and __half are both one IEEE binary16 in 2 bytes.
      err = launch<__half>(rowptr, col, weight, x, reduce, out, arg, stream);
      break;
    default:  // at::kBFloat16, checked above
      err = launch<__nv_bfloat16>(rowptr, col, weight, x, reduce, out, arg, stream);
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

TORCH_LIBRARY_IMPL(frontiers_fast, CUDA, m) { m.impl("spmm_fwd_warp", &frontiers_fast::gnn::spmm_fwd_warp_cuda); }

#endif  // FRONTIERS_FAST_WITH_CUDA

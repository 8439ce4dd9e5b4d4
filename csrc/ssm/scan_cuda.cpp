// Torch binding of the chunked block-scan selective scan (scan.cu): the "cuda"
// backend of frontiers_fast::selective_scan's forward, registered as
// frontiers_fast_native::selective_scan under the CUDA dispatch key.  The
// schema is defined from Python (frontiers_fast/ops/ssm.py), so the op and
// its fake exist even when this library is not built.
//
// setup.py compiles this file only for a CUDA build and then defines
// FRONTIERS_FAST_WITH_CUDA; the guard keeps any other compile of it harmless.
#ifdef FRONTIERS_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/alloc.h"
#include "common/checks.h"
#include "ssm/scan.cuh"

namespace frontiers_fast {
namespace ssm {
namespace {

constexpr const char* kOp = "frontiers_fast::selective_scan (cuda): ";


void check_on(const at::Tensor& t, const char* name, const at::Tensor& u) {
  TORCH_CHECK(t.is_cuda(), kOp, name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == u.device(), kOp, name, " is on ", t.device(), " but u is on ", u.device());
}

void check_dtype(const at::Tensor& t, const char* name, const at::Tensor& u, at::ScalarType dtype) {
  check_on(t, name, u);
  TORCH_CHECK(t.scalar_type() == dtype, kOp, name, " must be ", dtype, " for u of dtype ", u.scalar_type(), ", got ",
              t.scalar_type());
}

// A tensor in `dtype` of exactly `shape` (written as `layout` in the message).
void check_arg(const at::Tensor& t, const char* name, const at::Tensor& u, at::ScalarType dtype, at::IntArrayRef shape,
               const char* layout) {
  check_dtype(t, name, u, dtype);
  TORCH_CHECK(t.sizes() == shape, kOp, name, " must be ", layout, " = ", shape, ", got shape ", t.sizes());
}

// B or C, contiguous, with its layout told by its number of dimensions.
struct StateMatrix {
  at::Tensor t;
  int64_t groups = 0;  // 0: constant [dim, N]; G: [batch, G, N, L] (variable [batch, N, L] is G = 1)
};

StateMatrix state_matrix(const at::Tensor& M, const char* name, const at::Tensor& u, at::ScalarType acc, int64_t N) {
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  check_on(M, name, u);
  TORCH_CHECK(M.dim() >= 2 && M.dim() <= 4, kOp, name,
              " must be [dim, N], [batch, N, L] or [batch, G, N, L], got shape ", M.sizes());
  if (M.dim() == 2) {
    check_arg(M, name, u, acc, {dim, N}, "constant [dim, N]");
    return {M.contiguous(), 0};
  }
  if (M.dim() == 3) {
    check_arg(M, name, u, u.scalar_type(), {batch, N, L}, "variable [batch, N, L]");
    return {M.contiguous(), 1};
  }
  const int64_t G = M.size(1);
  TORCH_CHECK(G >= 1 && dim % G == 0, kOp, name, " has ", G,
              " groups, which must be at least 1 and divide dim = ", dim);
  check_arg(M, name, u, u.scalar_type(), {batch, G, N, L}, "grouped [batch, G, N, L]");
  return {M.contiguous(), G};
}

// The inputs, contiguous; an undefined tensor for an absent optional.
struct Inputs {
  at::Tensor u, delta, A, D, z, delta_bias, initial_state, cu_seqlens;
  StateMatrix B, C;
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

template <typename cuda_t>
cudaError_t launch(const Inputs& in, bool delta_softplus, at::Tensor& out, at::Tensor& last_state,
                   cudaStream_t stream) {
  using acc_t = typename ScanAcc<cuda_t>::type;
  SelectiveScanArgs<cuda_t> a;
  a.batch = in.u.size(0);
  a.dim = in.u.size(1);
  a.L = in.u.size(2);
  a.N = in.A.size(1);
  // c10::Half / __half and c10::BFloat16 / __nv_bfloat16 have the same bits.
  a.u = ptr_or_null<cuda_t>(in.u);
  a.delta = ptr_or_null<cuda_t>(in.delta);
  a.A = ptr_or_null<acc_t>(in.A);
  a.B_groups = in.B.groups;
  a.C_groups = in.C.groups;
  if (in.B.groups == 0) {
    a.B_const = ptr_or_null<acc_t>(in.B.t);
  } else {
    a.B_seq = ptr_or_null<cuda_t>(in.B.t);
  }
  if (in.C.groups == 0) {
    a.C_const = ptr_or_null<acc_t>(in.C.t);
  } else {
    a.C_seq = ptr_or_null<cuda_t>(in.C.t);
  }
  a.D = ptr_or_null<acc_t>(in.D);
  a.z = ptr_or_null<cuda_t>(in.z);
  a.delta_bias = ptr_or_null<acc_t>(in.delta_bias);
  a.delta_softplus = delta_softplus;
  a.initial_state = ptr_or_null<acc_t>(in.initial_state);
  if (in.cu_seqlens.defined()) {
    if (in.cu_seqlens.scalar_type() == at::kInt) {
      a.cu_seqlens32 = in.cu_seqlens.const_data_ptr<int32_t>();
    } else {
      a.cu_seqlens64 = in.cu_seqlens.const_data_ptr<int64_t>();
    }
    a.num_seqs = in.cu_seqlens.numel() - 1;
  }
  a.out = static_cast<cuda_t*>(out.mutable_data_ptr());
  a.last_state = static_cast<acc_t*>(last_state.mutable_data_ptr());
  return selective_scan_forward<cuda_t>(a, stream);
}

std::tuple<at::Tensor, at::Tensor> selective_scan_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D_, const std::optional<at::Tensor>& z_,
    const std::optional<at::Tensor>& delta_bias_, bool delta_softplus, const std::optional<at::Tensor>& initial_state_,
    const std::optional<at::Tensor>& cu_seqlens_) {
  TORCH_CHECK(u.is_cuda(), kOp, "u must be a CUDA tensor, got one on ", u.device());
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              "u must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(u.dim() == 3, kOp, "u must be [batch, dim, L], got shape ", u.sizes());
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);

  // Before any .contiguous() below, which may copy.
  const c10::cuda::CUDAGuard guard(u.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(u.get_device()).stream();

  Inputs in;
  check_arg(delta, "delta", u, dtype, u.sizes(), "[batch, dim, L]");
  check_dtype(A, "A", u, acc);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, kOp, "A must be [dim, N] with dim = ", dim, ", got shape ", A.sizes());
  const int64_t N = A.size(1);
  TORCH_CHECK(N <= kScanMaxStates, kOp, "A has N = ", N, " states, but this kernel keeps each state's carry in ",
              "shared memory and supports N <= ", kScanMaxStates, "; use the triton or reference backend");
  in.A = A.contiguous();
  in.B = state_matrix(B, "B", u, acc, N);
  in.C = state_matrix(C, "C", u, acc, N);
  if (const at::Tensor* D = present(D_)) {
    check_arg(*D, "D", u, acc, {dim}, "[dim]");
    in.D = D->contiguous();
  }
  if (const at::Tensor* z = present(z_)) {
    check_arg(*z, "z", u, dtype, u.sizes(), "[batch, dim, L]");
    in.z = z->contiguous();
  }
  if (const at::Tensor* bias = present(delta_bias_)) {
    check_arg(*bias, "delta_bias", u, acc, {dim}, "[dim]");
    in.delta_bias = bias->contiguous();
  }
  int64_t rows = batch;
  if (const at::Tensor* cu = present(cu_seqlens_)) {
    check_on(*cu, "cu_seqlens", u);
    TORCH_CHECK(cu->scalar_type() == at::kInt || cu->scalar_type() == at::kLong, kOp,
                "cu_seqlens must be int32 or int64, got ", cu->scalar_type());
    TORCH_CHECK(cu->dim() == 1 && cu->numel() >= 1, kOp, "cu_seqlens must be 1-D [num_sequences + 1], got shape ",
                cu->sizes());
    // The values are checked here, as on every backend, so that a compiled
    // graph refuses bad offsets too: a copy of S + 1 integers to the host,
    // one synchronisation per packed call, which bad offsets (an unwritten
    // output, or two blocks writing one step) would cost far more than.
    seqlens_arg(cu->to(at::kCPU, at::kLong), batch, L, "frontiers_fast_native::selective_scan (cuda)", "cu_seqlens",
                "u");
    in.cu_seqlens = cu->contiguous();
    rows = cu->numel() - 1;
  }
  if (const at::Tensor* h0 = present(initial_state_)) {
    check_arg(*h0, "initial_state", u, acc, {rows, dim, N},
              present(cu_seqlens_) != nullptr ? "[num_sequences, dim, N]" : "[batch, dim, N]");
    in.initial_state = h0->contiguous();
  }

  in.u = u.contiguous();
  in.delta = delta.contiguous();

  at::Tensor out = new_output(u.sizes(), u.options());  // contiguous, whatever u's strides
  at::Tensor last_state = new_output({rows, dim, N}, u.options().dtype(acc));

  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kFloat:
      err = launch<float>(in, delta_softplus, out, last_state, stream);
      break;
    case at::kDouble:
      err = launch<double>(in, delta_softplus, out, last_state, stream);
      break;
    case at::kHalf:
      err = launch<__half>(in, delta_softplus, out, last_state, stream);
      break;
    default:  // at::kBFloat16, checked above
      err = launch<__nv_bfloat16>(in, delta_softplus, out, last_state, stream);
      break;
  }
  TORCH_CHECK(err == cudaSuccess, kOp, "launching the CUDA kernel failed (", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err), ") for batch = ", batch, ", dim = ", dim, ", L = ", L, ", N = ", N,
              ", rows = ", rows, ", dtype ", dtype);
  return {out, last_state};
}

}  // namespace
}  // namespace ssm
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CUDA, m) {
  m.impl("selective_scan", &frontiers_fast::ssm::selective_scan_cuda);
}

#endif  // FRONTIERS_FAST_WITH_CUDA

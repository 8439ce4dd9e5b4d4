// Chunked block-scan selective scan (Mamba's S6; Gu & Dao, "Mamba: Linear-Time
// Sequence Modeling with Selective State Spaces", arXiv:2312.00752): the CUDA
// kernel of the op frontiers_fast::selective_scan's "cuda" backend (forward
// only).
//
// This header is included by both nvcc (scan.cu) and the host compiler
// (scan_cuda.cpp), so it holds declarations only and no torch types: the
// kernel takes raw pointers and a stream, and reports failure as cudaError_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace frontiers_fast {
namespace ssm {

// The compute (and parameter) type of a storage type: float64 inputs are
// scanned in double so the backend can be checked against the float64
// reference; everything else accumulates in float, as mamba_ssm does.
template <typename scalar_t>
struct ScanAcc {
  using type = float;
};
template <>
struct ScanAcc<double> {
  using type = double;
};

// The running state of every n of a channel lives in shared memory (two
// copies, see scan.cu), which bounds N: 1024 states take 16 KiB in double.
constexpr int64_t kScanMaxStates = 1024;

// One selective scan.  Shapes (all row-major, contiguous):
//
//   u, delta     [batch, dim, L]   scalar_t
//   A            [dim, N]          acc_t
//   B, C         by *_groups (told explicitly: an empty tensor may have no
//                pointer):
//                  0:  *_const [dim, N] acc_t (time-invariant);
//                  G:  *_seq [batch, G, N, L] scalar_t, channel d reading
//                      group d / (dim / G); a variable [batch, N, L] is G = 1
//   D, delta_bias [dim] acc_t or nullptr
//   z            [batch, dim, L] scalar_t or nullptr
//   initial_state [rows, dim, N] acc_t or nullptr (zeros)
//   cu_seqlens   nullptr, or [num_seqs + 1] offsets into L (int32 or int64:
//                set the one pointer that applies) with batch == 1; then
//                rows = num_seqs, else rows = batch
//   out          [batch, dim, L] scalar_t, every element written
//   last_state   [rows, dim, N] acc_t, every element written
//
// delta <- softplus(delta + delta_bias) when delta_softplus (identity above
// 20, torch's threshold); then per (row, d, n)
//   h[t] = exp(delta[t] A[d, n]) h[t-1] + delta[t] B[n, t] u[t]
//   out[t] = (sum_n C[n, t] h[t, n] + D[d] u[t]) * silu(z[t]).
//
// The offsets' values are not read on the host.  The kernel clamps each
// sequence to [0, L], so no offsets make it touch memory out of bounds; only
// valid ones (0 first, L last, never decreasing) write every element of out.
template <typename scalar_t>
struct SelectiveScanArgs {
  using acc_t = typename ScanAcc<scalar_t>::type;

  int64_t batch = 0;
  int64_t dim = 0;
  int64_t L = 0;
  int64_t N = 0;
  const scalar_t* u = nullptr;
  const scalar_t* delta = nullptr;
  const acc_t* A = nullptr;
  const acc_t* B_const = nullptr;
  const scalar_t* B_seq = nullptr;
  int64_t B_groups = 0;
  const acc_t* C_const = nullptr;
  const scalar_t* C_seq = nullptr;
  int64_t C_groups = 0;
  const acc_t* D = nullptr;
  const scalar_t* z = nullptr;
  const acc_t* delta_bias = nullptr;
  bool delta_softplus = false;
  const acc_t* initial_state = nullptr;
  const int32_t* cu_seqlens32 = nullptr;
  const int64_t* cu_seqlens64 = nullptr;
  int64_t num_seqs = 0;
  scalar_t* out = nullptr;
  acc_t* last_state = nullptr;
};

// scalar_t is float, double, __half or __nv_bfloat16.  Returns
// cudaErrorInvalidValue for inconsistent arguments (before launching
// anything), otherwise the launch status.
template <typename scalar_t>
cudaError_t selective_scan_forward(const SelectiveScanArgs<scalar_t>& args, cudaStream_t stream);

extern template cudaError_t selective_scan_forward<float>(const SelectiveScanArgs<float>&, cudaStream_t);
extern template cudaError_t selective_scan_forward<double>(const SelectiveScanArgs<double>&, cudaStream_t);
extern template cudaError_t selective_scan_forward<__half>(const SelectiveScanArgs<__half>&, cudaStream_t);
extern template cudaError_t selective_scan_forward<__nv_bfloat16>(const SelectiveScanArgs<__nv_bfloat16>&,
                                                                  cudaStream_t);

}  // namespace ssm
}  // namespace frontiers_fast

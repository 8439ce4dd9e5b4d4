// Warp-per-row CSR SpMM (GE-SpMM, Huang et al., SC'20): the CUDA kernel of
// the op frontiers_fast::spmm_fwd's "cuda" backend.
//
// This header is included by both nvcc (spmm.cu) and the host compiler
// (spmm_cuda.cpp), so it holds declarations only and no torch types: the
// kernel takes raw pointers and a stream, and reports failure as cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "common/reduce.h"

namespace frontiers_fast {
namespace gnn {

// out[i, f] = reduce_{k in [rowptr[i], rowptr[i+1])} w(k, f) * x[col[k], f]
// with w(k, f) = weight[wrow(k), f / (F / weight_heads)], wrow(k) = weight_index[k]
// (or k when weight_index is null)
//
//   rowptr  [num_dst + 1]  int64, CSR by destination
//   col     [E]            int64, source node of each edge, in [0, N_src)
//   weight  [E, weight_heads] or nullptr; feature f uses column
//           f / (F / weight_heads), so F % weight_heads must be 0
//   weight_index [E] int64 or nullptr: a permutation of [0, E), the weight
//           row of each CSR edge (weights in the user's edge order)
//   x       [N_src, F]     row-major, contiguous
//   out     [num_dst, F]   every element is written; empty rows get 0
//   arg     [num_dst, F]   for kMax / kMin only (may be nullptr otherwise):
//           the CSR position k of the first edge reaching the extremum
//           (a NaN message is the extremum: out is NaN and arg its first
//           edge), -1 for an empty row
//
// scalar_t is float, double, __half or __nv_bfloat16; the half types are
// accumulated in float.  Returns cudaErrorInvalidValue for inconsistent
// sizes (before launching anything), otherwise the launch status.  The
// contents of rowptr and col are not checked.
template <typename scalar_t>
cudaError_t spmm_csr_forward(const int64_t* rowptr, const int64_t* col, const scalar_t* weight,
                             const int64_t* weight_index, int64_t weight_heads, const scalar_t* x, int64_t num_dst,
                             int64_t F, Reduce reduce, scalar_t* out, int64_t* arg, cudaStream_t stream);

extern template cudaError_t spmm_csr_forward<float>(const int64_t*, const int64_t*, const float*, const int64_t*, int64_t,
                                                    const float*, int64_t, int64_t, Reduce, float*,
                                                    int64_t*, cudaStream_t);
extern template cudaError_t spmm_csr_forward<double>(const int64_t*, const int64_t*, const double*, const int64_t*, int64_t,
                                                     const double*, int64_t, int64_t, Reduce, double*,
                                                     int64_t*, cudaStream_t);
extern template cudaError_t spmm_csr_forward<__half>(const int64_t*, const int64_t*, const __half*, const int64_t*, int64_t,
                                                     const __half*, int64_t, int64_t, Reduce, __half*,
                                                     int64_t*, cudaStream_t);
extern template cudaError_t spmm_csr_forward<__nv_bfloat16>(const int64_t*, const int64_t*,
                                                            const __nv_bfloat16*, const int64_t*, int64_t,
                                                            const __nv_bfloat16*, int64_t, int64_t,
                                                            Reduce, __nv_bfloat16*, int64_t*,
                                                            cudaStream_t);

}  // namespace gnn
}  // namespace frontiers_fast

// MoE routing and permutation on the GPU: the CUDA kernels of the ops
// frontiers_fast::moe_route and frontiers_fast::moe_permute's "cuda" backend
// (forward only).  Semantics: frontiers_fast/reference/moe.py.
//
// This header is included by both nvcc (route.cu) and the host compiler
// (route_cuda.cpp), so it holds declarations only and no torch types: the
// launchers take raw pointers and a stream, and report failure as
// cudaError_t.  Nothing here reads the device from the host or synchronises:
// every launcher only enqueues work on `stream`, so both ops can be captured
// in a CUDA graph.
//
// Data errors (bad logits, ids out of range) are not returned: they are
// recorded on the device in a two-entry status buffer that the caller may
// read after the launch (route_cuda.cpp does, when the stream is not being
// captured).  The launchers initialise it themselves.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace frontiers_fast {
namespace moe {

// Scores are computed in float, or in double for float64 logits.
template <typename scalar_t>
struct RouteAcc {
  using type = float;
};
template <>
struct RouteAcc<double> {
  using type = double;
};

// Each routed row stages its E selection scores and n_group <= E group
// scores in shared memory: at this bound that is 32 KiB in double, within
// the 48 KiB a launch gets without opting in.  The models served have
// E <= 512.
constexpr int64_t kRouteMaxExperts = 2048;

// The status of moe_route: entry kRouteBadRow is the lowest row with fewer
// than top_k selectable experts (UINT64_MAX if none); entry kRouteFlags has
// kRouteBadLogit set if some logit is NaN or +inf and kRouteBadBias if the
// correction bias is not finite.
constexpr int kRouteBadRow = 0;
constexpr int kRouteFlags = 1;
constexpr unsigned long long kRouteBadLogit = 1ull;
constexpr unsigned long long kRouteBadBias = 2ull;

// weights[t, j], ids[t, j] = the j-th best expert of row t and its weight.
//
//   logits  [T, E] scalar_t, rows `logits_row_stride` elements apart (unit
//           column stride); -inf masks an expert
//   top_k   1 <= top_k <= E
//   softmax softmax over the row (else the sigmoid of each logit)
//   renormalize  divide the k weights by their sum + 1e-20
//   bias    [E] acc_t or nullptr: added to the scores for the choice only
//   n_group, topk_group  0 (no grouping), or E % n_group == 0 and
//           1 <= topk_group <= n_group: only the topk_group best groups
//           (a group scores the sum of its two best biased scores with a
//           bias and at least 2 experts per group, else its best score;
//           ties to the lowest group) compete
//   scaling factor on the weights
//   weights [T, top_k] acc_t, ids [T, top_k] int32, contiguous, every element
//           written; ties go to the lowest expert id
//   status  [2] device buffer (see above)
//
// A row with a NaN or +inf logit, or with every logit -inf, gets NaN weights
// and ids 0..top_k-1 (and is flagged); a row with some but fewer than top_k
// selectable experts is routed as the reference routes it (its last picks
// are masked experts, by lowest id) and flagged.  scalar_t is float, double,
// __half or __nv_bfloat16.  Returns cudaErrorInvalidValue for inconsistent
// sizes (before launching anything), otherwise the launch status.
template <typename scalar_t>
cudaError_t moe_route_forward(const scalar_t* logits, int64_t logits_row_stride, int64_t T, int64_t E,
                              int64_t top_k, bool softmax, bool renormalize,
                              const typename RouteAcc<scalar_t>::type* bias, int64_t n_group, int64_t topk_group,
                              typename RouteAcc<scalar_t>::type scaling, typename RouteAcc<scalar_t>::type* weights,
                              int32_t* ids, unsigned long long* status, cudaStream_t stream);

extern template cudaError_t moe_route_forward<float>(const float*, int64_t, int64_t, int64_t, int64_t, bool, bool,
                                                     const float*, int64_t, int64_t, float, float*, int32_t*,
                                                     unsigned long long*, cudaStream_t);
extern template cudaError_t moe_route_forward<double>(const double*, int64_t, int64_t, int64_t, int64_t, bool, bool,
                                                      const double*, int64_t, int64_t, double, double*, int32_t*,
                                                      unsigned long long*, cudaStream_t);
extern template cudaError_t moe_route_forward<__half>(const __half*, int64_t, int64_t, int64_t, int64_t, bool, bool,
                                                      const float*, int64_t, int64_t, float, float*, int32_t*,
                                                      unsigned long long*, cudaStream_t);
extern template cudaError_t moe_route_forward<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t, int64_t,
                                                             int64_t, bool, bool, const float*, int64_t, int64_t,
                                                             float, float*, int32_t*, unsigned long long*,
                                                             cudaStream_t);

// The status of moe_permute: the smallest and the largest id, each stored as
// its bits XOR the sign bit (so unsigned order is signed order); decode with
// permute_status_value.  Meaningless when there are no ids.
constexpr int kPermuteMinId = 0;
constexpr int kPermuteMaxId = 1;

inline int64_t permute_status_value(unsigned long long v) {
  return static_cast<int64_t>(v ^ (1ull << 63));
}

// Scratch for moe_permute_forward, in bytes, for n_pairs = T * k pairs and
// E experts (a few int32 per pair and one int64 per expert and block of
// pairs).  The caller allocates it on the device, 16-byte aligned.
size_t moe_permute_workspace_bytes(int64_t n_pairs, int64_t E);

// The stable expert-major permutation of the T*k (token, slot) pairs, and
// the row copy.  The flat pair n = t * k + j has expert ids[n]; pairs are
// ordered by expert, and by n within an expert.
//
//   x       [T, row_bytes] bytes of any dtype, rows x_row_stride bytes apart
//   ids     [T, k] contiguous, int32 or int64 (pass the one that applies)
//   E       1 <= E < 2^31
//   x_perm  [T*k, row_bytes], contiguous: row r = the token of the r-th pair
//   offsets [E + 1] int64: expert e owns rows offsets[e] .. offsets[e+1]
//   row_map [T, k] int64: the row of x_perm holding pair n
//   workspace  moe_permute_workspace_bytes(T * k, E) bytes
//   status  [2] device buffer (see above)
//
// A pair whose id is outside [0, E) is left out: it is not counted and its
// row_map entry is not written (the status shows it).  Every other output
// element is written.  Deterministic: the positions come from per-block
// counts, a scan over the blocks and in-block ranks, with no atomics.
cudaError_t moe_permute_forward(const void* x, int64_t x_row_stride, int64_t row_bytes, const int32_t* ids32,
                                const int64_t* ids64, int64_t T, int64_t k, int64_t E, void* x_perm,
                                int64_t* offsets, int64_t* row_map, void* workspace, unsigned long long* status,
                                cudaStream_t stream);

}  // namespace moe
}  // namespace frontiers_fast

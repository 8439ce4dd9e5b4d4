// Kernels of the GNN family on CPU, called by the validated entry points in
// gnn_cpu.cpp.  Every tensor reaching these is contiguous, on the CPU, of the
// dtype and shape the entry point checked.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace frontiers_fast {
namespace gnn {

enum class Reduce { kSum, kMean, kMax, kMin };

// out[i] = reduce_k w[k] * x[col[k]] over the CSR row i; arg for max/min.
void spmm_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor* weight, const at::Tensor& x,
                  Reduce reduce, at::Tensor& out, at::Tensor& arg);

// grad_x over the transpose (sum/mean: grad_out pre-scaled by the caller for mean).
void spmm_backward_x(const at::Tensor& csc_ptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
                     const at::Tensor* weight_t, const at::Tensor& grad, const at::Tensor* arg, at::Tensor& grad_x);

// out[k, h] = sum_c a[col[k], h, c] * b[i, h, c], optionally only where arg[i, h*C + c] == k.
void sddmm_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a, const at::Tensor& b,
                   int64_t H, int64_t C, const at::Tensor* arg, at::Tensor& out);

void edge_softmax_forward(const at::Tensor& rowptr, const at::Tensor& scores, at::Tensor& p);
void edge_softmax_backward(const at::Tensor& rowptr, const at::Tensor& p, const at::Tensor& grad_p,
                           at::Tensor& grad_s);

void gat_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& h, const at::Tensor& a_src,
                 const at::Tensor& a_dst, double negative_slope, at::Tensor& out, at::Tensor& lse);
void gat_backward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& csc_ptr,
                  const at::Tensor& csc_row, const at::Tensor& csc_perm, const at::Tensor& h,
                  const at::Tensor& a_src, const at::Tensor& a_dst, double negative_slope, const at::Tensor& out,
                  const at::Tensor& lse, const at::Tensor& grad_out, at::Tensor& grad_h, at::Tensor& grad_a_src,
                  at::Tensor& grad_a_dst);

}  // namespace gnn
}  // namespace frontiers_fast

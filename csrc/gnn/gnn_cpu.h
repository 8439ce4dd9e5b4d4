// Kernels of the GNN family on CPU, called by the validated entry points in
// gnn_cpu.cpp.  Every tensor reaching these is contiguous, on the CPU, of the
// dtype and shape the entry point checked.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/reduce.h"

namespace frontiers_fast {
namespace gnn {

// out[i] = reduce_k w[k] * x[col[k]] over the CSR row i (weights in CSR order); arg for max/min.
void spmm_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor* weight, const at::Tensor& x,
                  Reduce reduce, at::Tensor& out, at::Tensor& arg);

// grad_x over the transpose, with weight_t the weights in transposed order.
// (sum/mean: grad pre-scaled by the caller for mean; max/min: arg masks the edges.)
void spmm_backward_x(const at::Tensor& csc_ptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
                     const at::Tensor* weight_t, const at::Tensor& grad, const at::Tensor* arg, at::Tensor& grad_x);

// out[row(k), h] = sum_c a[col[k], h, c] * b[i, h, c], optionally only where arg[i, h*C + c] == k;
// row(k) = out_index[k], or k without out_index.
void sddmm_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a, const at::Tensor& b,
                   int64_t H, int64_t C, const at::Tensor* arg, const at::Tensor* out_index, at::Tensor& out);

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

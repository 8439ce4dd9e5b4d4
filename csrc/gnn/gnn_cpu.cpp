// CPU entry points of the GNN kernel ops: argument checks (common/checks.h),
// output allocation (common/alloc.h), and registration under
// frontiers_fast_native::<op> for the CPU dispatch key.  The schemas and their
// contract live in frontiers_fast/ops/gnn.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "common/alloc.h"
#include "common/checks.h"
#include "gnn/gnn_cpu.h"

namespace frontiers_fast {
namespace gnn {
namespace {

using at::Tensor;

// weight [E, Hw] with F % Hw == 0, or undefined.
std::optional<Tensor> weight_arg(const std::optional<Tensor>& weight, const Tensor& like, int64_t E, int64_t F,
                                 const char* op) {
  if (!weight.has_value() || !weight->defined()) return std::nullopt;
  Tensor w = float_arg(*weight, op, "weight", 2);
  same_dtype(w, like, op, "weight", "x");
  TORCH_CHECK(w.size(0) == E, op, ": weight must have one row per edge (", E, "), got shape ", w.sizes());
  TORCH_CHECK(w.size(1) >= 1 && F % w.size(1) == 0, op,
              ": weight must be [E, Hw] with the feature count divisible by Hw; got weight ", w.sizes(),
              " and ", F, " features");
  return w;
}

// grad / deg(i) per destination row, for the mean backward.
Tensor scale_by_inverse_degree(const Tensor& grad, const Tensor& rowptr) {
  Tensor out = at::empty_like(grad);
  const int64_t n = grad.size(0), F = grad.size(1);
  const int64_t* p = rowptr.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "spmm_bwd_mean", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t deg = p[i + 1] - p[i];
        const scalar_t s = deg > 0 ? scalar_t(1) / scalar_t(deg) : scalar_t(1);
        for (int64_t f = 0; f < F; ++f) o[i * F + f] = g[i * F + f] * s;
      }
    });
  });
  return out;
}

// out[k] = weight[index[k]]: the weights in the order the kernel walks the
// edges.  A parallel gather before the kernel, rather than reading through the
// index inside it: measured on the skewed 2M-edge graph, the dependent random
// load in the edge loop cost three times what this pass costs.
Tensor gather_rows(const Tensor& weight, const Tensor& index) {
  const int64_t E = index.numel(), hw = weight.size(1);
  Tensor out = new_output({E, hw}, weight.options());
  const int64_t* p = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spmm_gather", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, E, 32768, [&](int64_t b, int64_t e) {
      if (hw == 1) {
        for (int64_t t = b; t < e; ++t) o[t] = w[p[t]];
      } else {
        for (int64_t t = b; t < e; ++t)
          for (int64_t h = 0; h < hw; ++h) o[t * hw + h] = w[p[t] * hw + h];
      }
    });
  });
  return out;
}

// An optional index [E] into the rows of a weight (a permutation of [0, E), trusted).
std::optional<Tensor> weight_index_arg(const std::optional<Tensor>& index, int64_t E, const char* op,
                                       const char* name) {
  if (!index.has_value() || !index->defined()) return std::nullopt;
  Tensor t = index_arg(*index, op, name);
  TORCH_CHECK(t.numel() == E, op, ": ", name, " must have one entry per edge (", E, "), got ", t.numel());
  return t;
}

std::tuple<Tensor, Tensor> spmm_fwd_cpu(const Tensor& rowptr_, const Tensor& col_, const std::optional<Tensor>& weight_,
                                        const std::optional<Tensor>& weight_index_, const Tensor& x_,
                                        int64_t reduce_code) {
  const char* op = "spmm_fwd";
  const Reduce reduce = reduce_arg(reduce_code, op);
  Tensor rowptr = index_arg(rowptr_, op, "rowptr");
  Tensor col = index_arg(col_, op, "col");
  Tensor x = float_arg(x_, op, "x", 2);
  const int64_t E = col.numel();
  const int64_t n = offsets_arg(rowptr, E, op, "rowptr", "col");
  const int64_t F = x.size(1);
  std::optional<Tensor> w = weight_arg(weight_, x, E, F, op);
  std::optional<Tensor> wid = w ? weight_index_arg(weight_index_, E, op, "weight_index") : std::nullopt;
  TORCH_CHECK(E == 0 || x.size(0) > 0, op, ": x has no rows but the graph has ", E, " edges");
  Tensor out = new_output({n, F}, x.options());
  const bool ext = is_extremum(reduce);
  Tensor arg = new_output(ext ? at::IntArrayRef({n, F}) : at::IntArrayRef({0}), x.options().dtype(at::kLong));
  std::optional<Tensor> w_csr;
  if (w) w_csr = wid ? gather_rows(*w, *wid) : *w;
  spmm_forward(rowptr, col, w_csr ? &*w_csr : nullptr, x, reduce, out, arg);
  return {out, arg};
}

std::tuple<Tensor, Tensor> spmm_bwd_cpu(const Tensor& csc_ptr_, const Tensor& csc_row_, const Tensor& csc_perm_,
                                        const Tensor& rowptr_, const Tensor& col_,
                                        const std::optional<Tensor>& weight_,
                                        const std::optional<Tensor>& weight_index_,
                                        const std::optional<Tensor>& csc_weight_index_, const Tensor& x_,
                                        const Tensor& grad_out_, const Tensor& arg_, int64_t reduce_code,
                                        bool need_x, bool need_w) {
  const char* op = "spmm_bwd";
  const Reduce reduce = reduce_arg(reduce_code, op);
  const bool ext = is_extremum(reduce);
  Tensor rowptr = index_arg(rowptr_, op, "rowptr");
  Tensor col = index_arg(col_, op, "col");
  Tensor csc_ptr = index_arg(csc_ptr_, op, "csc_ptr");
  Tensor grad_out = float_arg(grad_out_, op, "grad_out", 2);
  const int64_t E = col.numel();
  const int64_t n_dst = offsets_arg(rowptr, E, op, "rowptr", "col");
  const int64_t n_src = csc_ptr.numel() - 1;
  TORCH_CHECK(n_src >= 0, op, ": csc_ptr must have at least one entry (N_src + 1 offsets)");
  const int64_t F = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == n_dst, op, ": grad_out must be [N_dst, F] with N_dst = ", n_dst,
              ", got shape ", grad_out.sizes());
  Tensor x = float_arg(x_, op, "x", 2);
  same_dtype(x, grad_out, op, "x", "grad_out");
  TORCH_CHECK(x.size(1) == F, op, ": x must have ", F, " features like grad_out, got shape ", x.sizes());
  std::optional<Tensor> w = weight_arg(weight_, grad_out, E, F, op);
  std::optional<Tensor> wid = w ? weight_index_arg(weight_index_, E, op, "weight_index") : std::nullopt;
  const bool want_w = need_w && w.has_value();
  if (want_w)
    TORCH_CHECK(x.size(0) == n_src, op, ": x must be [N_src, F] with N_src = ", n_src,
                " for the weight gradient, got shape ", x.sizes());
  Tensor arg;
  if (ext) {
    check_cpu(arg_, op, "arg");
    TORCH_CHECK(arg_.scalar_type() == at::kLong, op, ": arg must be int64, got ", arg_.scalar_type());
    TORCH_CHECK(arg_.dim() == 2 && arg_.size(0) == n_dst && arg_.size(1) == F, op, ": arg must be [", n_dst,
                ", ", F, "] for reduce ", reduce_code, " (max or min), got shape ", arg_.sizes());
    arg = arg_.contiguous();
  }
  Tensor csc_row, csc_perm, csc_wid;
  if (need_x) {
    csc_row = index_arg(csc_row_, op, "csc_row");
    csc_perm = index_arg(csc_perm_, op, "csc_perm");
    TORCH_CHECK(csc_row.numel() == E && csc_perm.numel() == E, op, ": csc_row and csc_perm must have ", E,
                " entries like col, got ", csc_row.numel(), " and ", csc_perm.numel());
    offsets_arg(csc_ptr, E, op, "csc_ptr", "col");
    // Transposed edge t reads weight row csc_weight_index[t]; without it the
    // weights are in CSR order, so that row is csc_perm[t].
    std::optional<Tensor> cw = w ? weight_index_arg(csc_weight_index_, E, op, "csc_weight_index") : std::nullopt;
    csc_wid = cw ? *cw : csc_perm;
  }

  Tensor g = reduce == Reduce::kMean ? scale_by_inverse_degree(grad_out, rowptr) : grad_out;
  Tensor grad_x = need_x ? new_output({n_src, F}, grad_out.options()) : at::empty({0}, grad_out.options());
  Tensor grad_w = want_w ? new_output({E, w->size(1)}, grad_out.options()) : at::empty({0}, grad_out.options());
  if (need_x) {
    std::optional<Tensor> w_t;
    if (w) w_t = gather_rows(*w, csc_wid);
    spmm_backward_x(csc_ptr, csc_row, csc_perm, w_t ? &*w_t : nullptr, g, ext ? &arg : nullptr, grad_x);
  }
  if (want_w) {
    const int64_t hw = w->size(1);
    // The weight gradient lands in the weight's own order: row weight_index[k] for CSR edge k.
    sddmm_forward(rowptr, col, x, g, hw, F / hw, ext ? &arg : nullptr, wid ? &*wid : nullptr, grad_w);
  }
  return {grad_x, grad_w};
}

Tensor sddmm_fwd_cpu(const Tensor& rowptr_, const Tensor& col_, const Tensor& a_, const Tensor& b_) {
  const char* op = "sddmm_fwd";
  Tensor rowptr = index_arg(rowptr_, op, "rowptr");
  Tensor col = index_arg(col_, op, "col");
  Tensor a = float_arg(a_, op, "a", 3);
  Tensor b = float_arg(b_, op, "b", 3);
  same_dtype(b, a, op, "b", "a");
  const int64_t E = col.numel();
  const int64_t n = offsets_arg(rowptr, E, op, "rowptr", "col");
  TORCH_CHECK(a.size(1) == b.size(1) && a.size(2) == b.size(2), op,
              ": a and b must agree past the node dimension, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(b.size(0) == n, op, ": b must be [N_dst, H, C] with N_dst = ", n, ", got shape ", b.sizes());
  TORCH_CHECK(E == 0 || a.size(0) > 0, op, ": a has no rows but the graph has ", E, " edges");
  const int64_t H = a.size(1);
  Tensor out = new_output({E, H}, a.options());
  sddmm_forward(rowptr, col, a, b, H, a.size(2), nullptr, nullptr, out);
  return out;
}

Tensor edge_softmax_fwd_cpu(const Tensor& rowptr_, const Tensor& scores_) {
  const char* op = "edge_softmax_fwd";
  Tensor rowptr = index_arg(rowptr_, op, "rowptr");
  Tensor scores = float_arg(scores_, op, "scores", 2);
  offsets_arg(rowptr, scores.size(0), op, "rowptr", "scores");
  Tensor p = new_output(scores.sizes(), scores.options());
  edge_softmax_forward(rowptr, scores, p);
  return p;
}

Tensor edge_softmax_bwd_cpu(const Tensor& rowptr_, const Tensor& p_, const Tensor& grad_p_) {
  const char* op = "edge_softmax_bwd";
  Tensor rowptr = index_arg(rowptr_, op, "rowptr");
  Tensor p = float_arg(p_, op, "p", 2);
  Tensor grad_p = float_arg(grad_p_, op, "grad_p", 2);
  same_dtype(grad_p, p, op, "grad_p", "p");
  TORCH_CHECK(grad_p.sizes() == p.sizes(), op, ": grad_p must have the shape of p ", p.sizes(), ", got ",
              grad_p.sizes());
  offsets_arg(rowptr, p.size(0), op, "rowptr", "p");
  Tensor gs = new_output(p.sizes(), p.options());
  edge_softmax_backward(rowptr, p, grad_p, gs);
  return gs;
}

void check_gat(const Tensor& h, const Tensor& a_src, const Tensor& a_dst, int64_t n_dst, double slope,
               const char* op) {
  same_dtype(a_src, h, op, "a_src", "h");
  same_dtype(a_dst, h, op, "a_dst", "h");
  const int64_t H = h.size(1);
  TORCH_CHECK(a_src.size(0) == h.size(0) && a_src.size(1) == H, op, ": a_src must be [N_src, H] = [",
              h.size(0), ", ", H, "], got shape ", a_src.sizes());
  TORCH_CHECK(a_dst.size(0) == n_dst && a_dst.size(1) == H, op, ": a_dst must be [N_dst, H] = [", n_dst, ", ",
              H, "], got shape ", a_dst.sizes());
  TORCH_CHECK(std::isfinite(slope), op, ": negative_slope must be finite, got ", slope);
}

std::tuple<Tensor, Tensor> gat_fwd_cpu(const Tensor& rowptr_, const Tensor& col_, const Tensor& h_,
                                       const Tensor& a_src_, const Tensor& a_dst_, double negative_slope) {
  const char* op = "gat_fwd";
  Tensor rowptr = index_arg(rowptr_, op, "rowptr");
  Tensor col = index_arg(col_, op, "col");
  Tensor h = float_arg(h_, op, "h", 3);
  Tensor a_src = float_arg(a_src_, op, "a_src", 2);
  Tensor a_dst = float_arg(a_dst_, op, "a_dst", 2);
  const int64_t E = col.numel();
  const int64_t n = offsets_arg(rowptr, E, op, "rowptr", "col");
  check_gat(h, a_src, a_dst, n, negative_slope, op);
  TORCH_CHECK(E == 0 || h.size(0) > 0, op, ": h has no rows but the graph has ", E, " edges");
  Tensor out = new_output({n, h.size(1), h.size(2)}, h.options());
  Tensor lse = new_output({n, h.size(1)}, h.options());
  gat_forward(rowptr, col, h, a_src, a_dst, negative_slope, out, lse);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> gat_bwd_cpu(const Tensor& rowptr_, const Tensor& col_, const Tensor& csc_ptr_,
                                               const Tensor& csc_row_, const Tensor& csc_perm_, const Tensor& h_,
                                               const Tensor& a_src_, const Tensor& a_dst_, double negative_slope,
                                               const Tensor& out_, const Tensor& lse_, const Tensor& grad_out_) {
  const char* op = "gat_bwd";
  Tensor rowptr = index_arg(rowptr_, op, "rowptr");
  Tensor col = index_arg(col_, op, "col");
  Tensor csc_ptr = index_arg(csc_ptr_, op, "csc_ptr");
  Tensor csc_row = index_arg(csc_row_, op, "csc_row");
  Tensor csc_perm = index_arg(csc_perm_, op, "csc_perm");
  Tensor h = float_arg(h_, op, "h", 3);
  Tensor a_src = float_arg(a_src_, op, "a_src", 2);
  Tensor a_dst = float_arg(a_dst_, op, "a_dst", 2);
  Tensor out = float_arg(out_, op, "out", 3);
  Tensor lse = float_arg(lse_, op, "lse", 2);
  Tensor grad_out = float_arg(grad_out_, op, "grad_out", 3);
  const int64_t E = col.numel();
  const int64_t n_dst = offsets_arg(rowptr, E, op, "rowptr", "col");
  const int64_t n_src = offsets_arg(csc_ptr, E, op, "csc_ptr", "col");
  TORCH_CHECK(csc_row.numel() == E && csc_perm.numel() == E, op, ": csc_row and csc_perm must have ", E,
              " entries like col, got ", csc_row.numel(), " and ", csc_perm.numel());
  check_gat(h, a_src, a_dst, n_dst, negative_slope, op);
  TORCH_CHECK(h.size(0) == n_src, op, ": h must have N_src = ", n_src, " rows (csc_ptr), got shape ", h.sizes());
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{out, "out"}, {grad_out, "grad_out"}}) {
    same_dtype(t, h, op, name, "h");
    TORCH_CHECK(t.size(0) == n_dst && t.size(1) == h.size(1) && t.size(2) == h.size(2), op, ": ", name,
                " must be [N_dst, H, C] = [", n_dst, ", ", h.size(1), ", ", h.size(2), "], got shape ", t.sizes());
  }
  same_dtype(lse, h, op, "lse", "h");
  TORCH_CHECK(lse.sizes() == a_dst.sizes(), op, ": lse must be [N_dst, H] like a_dst ", a_dst.sizes(), ", got ",
              lse.sizes());
  Tensor grad_h = new_output(h.sizes(), h.options());
  Tensor grad_a_src = new_output(a_src.sizes(), h.options());
  Tensor grad_a_dst = new_output(a_dst.sizes(), h.options());
  gat_backward(rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, negative_slope, out, lse, grad_out, grad_h,
               grad_a_src, grad_a_dst);
  return {grad_h, grad_a_src, grad_a_dst};
}

}  // namespace
}  // namespace gnn
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  using namespace frontiers_fast::gnn;
  m.impl("spmm_fwd", &spmm_fwd_cpu);
  m.impl("spmm_bwd", &spmm_bwd_cpu);
  m.impl("sddmm_fwd", &sddmm_fwd_cpu);
  m.impl("edge_softmax_fwd", &edge_softmax_fwd_cpu);
  m.impl("edge_softmax_bwd", &edge_softmax_bwd_cpu);
  m.impl("gat_fwd", &gat_fwd_cpu);
  m.impl("gat_bwd", &gat_bwd_cpu);
}

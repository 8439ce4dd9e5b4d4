// MoE routing, permutation and combine for the CPU:
// frontiers_fast_native::moe_route{,_bwd}, moe_permute{,_bwd} and
// moe_unpermute{,_bwd}.  Schemas, semantics and the float64 truth:
// frontiers_fast/ops/moe.py and frontiers_fast/reference/moe.py.
//
// Routing is one pass per token row (rows split over threads): the scores
// (softmax or sigmoid, in float32, float64 for float64 logits), the biased
// choice with its -inf masks, the group filter, a top-k by repeated
// selection (a strict > keeps the lowest id among ties, which is the
// reference's stable-sort rule), the weights.  k and E are small (k <= 8 and
// E <= 256 in the models served), so O(k E) per row beats a sort.
//
// The permutation is a stable counting sort of the T*k ids
// (common/bucket_sort.h), then a row gather.  Gradients that sum over a
// token's k copies (permute_bwd, the combine) are gathers in slot order, and
// the one that sums over the slots naming a row of y (unpermute_bwd's
// grad_y, where row_map need not be a permutation) walks a counting sort of
// row_map: every sum has one writer and a fixed order, so the backward is
// bitwise the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/convert.h"
#include "common/sched.h"
#include "moe/moe_cpu.h"

namespace frontiers_fast {
namespace moe {
namespace {

using at::Tensor;

constexpr double kRenormEps = 1e-20;  // reference.RENORM_EPS

bool softmax_arg(std::string_view scoring, const char* op) {
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid", op,
                    ": scoring must be 'softmax' or 'sigmoid', got '", std::string(scoring), "'");
  return scoring == "softmax";
}

// Scores of one row in acc: softmax over the experts or the sigmoid of each.
template <typename A>
void row_scores(const A* l, int64_t E, bool softmax, A* s) {
  if (softmax) {
    A m = -std::numeric_limits<A>::infinity();
    for (int64_t e = 0; e < E; ++e) m = l[e] > m ? l[e] : m;
    A sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(l[e] - m));
    const A inv = A(1) / sum;
    for (int64_t e = 0; e < E; ++e) s[e] *= inv;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = A(1) / (A(1) + std::exp(-l[e]));
  }
}

// The index of the largest of v[0..n) not taken, the lowest one among ties.
template <typename A>
int64_t best_free(const A* v, int64_t n, const std::vector<char>& taken) {
  int64_t b = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (b < 0 || v[i] > v[b])) b = i;
  return b;
}

enum RowError : int8_t { kRowOk = 0, kRowBadLogit = 1, kRowUnselectable = 2 };

template <typename T, typename A>
void route_kernel(const T* logits, int64_t nt, int64_t E, int64_t k, bool softmax, bool renorm, const A* bias,
                  int64_t n_group, int64_t topk_group, A scaling, A* w_out, int32_t* id_out, int8_t* err) {
  const A ninf = -std::numeric_limits<A>::infinity();
  at::parallel_for(0, nt, 64, [&](int64_t t0, int64_t t1) {
    std::vector<A> l(E), s(E), c(E), g(n_group > 0 ? n_group : 0);
    std::vector<char> taken(E), gtaken(n_group > 0 ? n_group : 0);
    for (int64_t t = t0; t < t1; ++t) {
      err[t] = kRowOk;
      load_row(logits + t * E, 1, E, l.data());
      bool bad = false, finite = false;
      for (int64_t e = 0; e < E; ++e) {
        bad |= std::isnan(l[e]) || l[e] == -ninf;
        finite |= l[e] != ninf;
      }
      if (bad) {
        err[t] = kRowBadLogit;
        continue;
      }
      if (!finite) {  // every expert masked (a softmax of all -inf would be NaN)
        err[t] = kRowUnselectable;
        continue;
      }
      row_scores(l.data(), E, softmax, s.data());
      for (int64_t e = 0; e < E; ++e) c[e] = l[e] == ninf ? ninf : (bias ? s[e] + bias[e] : s[e]);
      if (n_group > 0) {
        const int64_t per = E / n_group;
        for (int64_t q = 0; q < n_group; ++q) {
          const A* cq = c.data() + q * per;
          if (bias != nullptr && per >= 2) {  // the sum of the group's two best (DeepSeek-V3)
            A a = ninf, b = ninf;
            for (int64_t i = 0; i < per; ++i) {
              if (cq[i] > a) {
                b = a;
                a = cq[i];
              } else if (cq[i] > b) {
                b = cq[i];
              }
            }
            g[q] = a + b;
          } else {
            A a = ninf;
            for (int64_t i = 0; i < per; ++i) a = cq[i] > a ? cq[i] : a;
            g[q] = a;
          }
          gtaken[q] = 0;
        }
        for (int64_t j = 0; j < topk_group; ++j) gtaken[best_free(g.data(), n_group, gtaken)] = 1;
        for (int64_t q = 0; q < n_group; ++q)
          if (!gtaken[q])
            for (int64_t i = 0; i < per; ++i) c[q * per + i] = ninf;
      }
      for (int64_t e = 0; e < E; ++e) taken[e] = 0;
      A* w = w_out + t * k;
      int32_t* id = id_out + t * k;
      A sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t b = best_free(c.data(), E, taken);
        taken[b] = 1;
        if (c[b] == ninf) err[t] = kRowUnselectable;
        id[j] = int32_t(b);
        sum += (w[j] = s[b]);
      }
      if (renorm)
        for (int64_t j = 0; j < k; ++j) w[j] = (w[j] / (sum + A(kRenormEps))) * scaling;
      else
        for (int64_t j = 0; j < k; ++j) w[j] *= scaling;
    }
  });
}

std::tuple<Tensor, Tensor> moe_route_cpu(const Tensor& logits_, int64_t top_k, std::string_view scoring,
                                         bool renormalize, const std::optional<Tensor>& correction_bias,
                                         std::optional<int64_t> n_group, std::optional<int64_t> topk_group,
                                         double scaling) {
  const char* op = "moe_route";
  data_arg(logits_, op, "logits", 2);
  const Tensor logits = logits_.contiguous();
  const int64_t nt = logits.size(0), E = logits.size(1);
  const bool softmax = route_options(op, scoring, top_k, E, n_group, topk_group);
  const int64_t ng = n_group.value_or(0), tg = topk_group.value_or(0);
  const auto acc = acc_scalar_type(logits.scalar_type());
  Tensor bias;
  if (const Tensor* b = present(correction_bias)) {
    check_cpu(*b, op, "correction_bias");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == E, op, ": correction_bias must be [E]=[", E, "], got shape ",
                b->sizes());
    bias = b->to(acc).contiguous();
    TORCH_CHECK_VALUE(bool(at::isfinite(bias).all().item<bool>()),
                      "correction_bias must be finite (it contains NaN or inf)");
  }
  Tensor w = new_output({nt, top_k}, logits.options().dtype(acc));
  Tensor ids = new_output({nt, top_k}, logits.options().dtype(at::kInt));
  std::vector<int8_t> err(size_t(nt), kRowOk);
  FF_MOE_DISPATCH(logits.scalar_type(), "moe", [&] {
    using A = acc_t<scalar_t>;
    route_kernel<scalar_t, A>(logits.data_ptr<scalar_t>(), nt, E, top_k, softmax, renormalize,
                              bias.defined() ? bias.data_ptr<A>() : nullptr, ng, tg, A(scaling),
                              w.data_ptr<A>(), ids.data_ptr<int32_t>(), err.data());
  });
  for (int64_t t = 0; t < nt; ++t) {
    TORCH_CHECK_VALUE(err[t] != kRowBadLogit, "logits must not contain NaN or +inf (-inf is allowed: it masks an expert)");
  }
  for (int64_t t = 0; t < nt; ++t) {
    TORCH_CHECK_VALUE(err[t] != kRowUnselectable, "logits row ", t, " has fewer than top_k=", top_k,
                      " selectable experts", n_group ? " in its topk_group kept groups" : "",
                      ": each row needs at least top_k finite (not -inf) logits");
  }
  return {w, ids};
}

// d weights / d logits, row by row: through the renormalisation, then the
// softmax (p * (g - p.g)) or the sigmoid (g s (1 - s)); the chosen ids are
// distinct, so the score gradient is k sparse entries.
template <typename T, typename G, typename A>
void route_bwd_kernel(const T* logits, const int32_t* ids, const G* gw, int64_t nt, int64_t E, int64_t k,
                      bool softmax, bool renorm, A scaling, T* out) {
  at::parallel_for(0, nt, 64, [&](int64_t t0, int64_t t1) {
    std::vector<A> l(E), s(E), gs(E), g(k);
    for (int64_t t = t0; t < t1; ++t) {
      load_row(logits + t * E, 1, E, l.data());
      row_scores(l.data(), E, softmax, s.data());
      const int32_t* id = ids + t * k;
      for (int64_t j = 0; j < k; ++j) g[j] = A(gw[t * k + j]) * scaling;
      if (renorm) {
        A sum = 0, gsum = 0;
        for (int64_t j = 0; j < k; ++j) sum += s[id[j]];
        const A den = sum + A(kRenormEps);
        for (int64_t j = 0; j < k; ++j) gsum += g[j] * s[id[j]];
        const A corr = gsum / (den * den);
        for (int64_t j = 0; j < k; ++j) g[j] = g[j] / den - corr;
      }
      for (int64_t e = 0; e < E; ++e) gs[e] = 0;
      for (int64_t j = 0; j < k; ++j) gs[id[j]] += g[j];
      if (softmax) {
        A dot = 0;
        for (int64_t j = 0; j < k; ++j) dot += s[id[j]] * g[j];
        for (int64_t e = 0; e < E; ++e) gs[e] = s[e] * (gs[e] - dot);
      } else {
        for (int64_t e = 0; e < E; ++e) gs[e] = gs[e] * s[e] * (A(1) - s[e]);
      }
      store_row(gs.data(), E, out + t * E, 1);
    }
  });
}

Tensor moe_route_bwd_cpu(const Tensor& logits_, const Tensor& ids_, const Tensor& grad_weights_,
                         std::string_view scoring, bool renormalize, double scaling) {
  const char* op = "moe_route_bwd";
  data_arg(logits_, op, "logits", 2);
  const Tensor logits = logits_.contiguous();
  const Tensor ids = index2d_arg(ids_, op, "ids").to(at::kInt);
  data_arg(grad_weights_, op, "grad_weights", 2);
  const bool softmax = softmax_arg(scoring, op);
  const int64_t nt = logits.size(0), E = logits.size(1), k = ids.size(1);
  TORCH_CHECK(ids.size(0) == nt, op, ": ids must have T=", nt, " rows, got shape ", ids.sizes());
  shape_arg(grad_weights_, ids.sizes(), op, "grad_weights", "[T, k]");
  index_range(ids, E, "ids", experts_note(E));
  const auto acc = acc_scalar_type(logits.scalar_type());
  const Tensor gw = grad_weights_.to(acc).contiguous();
  Tensor out = new_output(logits.sizes(), logits.options());
  FF_MOE_DISPATCH(logits.scalar_type(), "moe", [&] {
    using A = acc_t<scalar_t>;
    route_bwd_kernel<scalar_t, A, A>(logits.data_ptr<scalar_t>(), ids.data_ptr<int32_t>(), gw.data_ptr<A>(), nt,
                                     E, k, softmax, renormalize, A(scaling), out.data_ptr<scalar_t>());
  });
  return out;
}

// ---------------------------------------------------------------------------
// permutation
// ---------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> moe_permute_cpu(const Tensor& x_, const Tensor& ids_, int64_t num_experts) {
  const char* op = "moe_permute";
  data_arg(x_, op, "x", 2);
  const Tensor x = x_.contiguous();
  const Tensor ids = index2d_arg(ids_, op, "ids");
  TORCH_CHECK(ids.size(0) == x.size(0), op, ": ids has ", ids.size(0), " rows but x has ", x.size(0), " tokens");
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  index_range(ids, num_experts, "ids", experts_note(num_experts));
  const int64_t nt = x.size(0), k = ids.size(1), H = x.size(1), R = nt * k;
  Dispatch d = dispatch_of(ids, num_experts);
  Tensor xp = new_output({R, H}, x.options());
  const int64_t* order = d.order.data_ptr<int64_t>();
  const size_t bytes = size_t(H) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(xp.data_ptr());
  for_range(R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + size_t(r) * bytes, src + size_t(order[r] / k) * bytes, bytes);
  });
  return {xp, d.offsets, d.row_map.view({nt, k})};
}

Tensor moe_permute_bwd_cpu(const Tensor& grad_x_perm_, const Tensor& row_map_) {
  const char* op = "moe_permute_bwd";
  data_arg(grad_x_perm_, op, "grad_x_perm", 2);
  const Tensor g = grad_x_perm_.contiguous();
  const Tensor rm = index2d_arg(row_map_, op, "row_map").to(at::kLong);
  index_range(rm, g.size(0), "row_map", " (grad_x_perm has " + std::to_string(g.size(0)) + " rows)");
  const int64_t nt = rm.size(0), k = rm.size(1), H = g.size(1);
  Tensor out = new_output({nt, H}, g.options());
  FF_MOE_DISPATCH(g.scalar_type(), "moe", [&] {
    using A = acc_t<scalar_t>;
    gather_sum<scalar_t, A>(g.data_ptr<scalar_t>(), rm.data_ptr<int64_t>(), nullptr, nt, k, H,
                            out.data_ptr<scalar_t>());
  });
  return out;
}

// ---------------------------------------------------------------------------
// combine
// ---------------------------------------------------------------------------
// float64 if either is float64, else float32 (reference.compute_dtype).
at::ScalarType compute_type(at::ScalarType a, at::ScalarType b) {
  return a == at::kDouble || b == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor moe_unpermute_cpu(const Tensor& y_, const Tensor& row_map_, const Tensor& weights_) {
  const char* op = "moe_unpermute";
  data_arg(y_, op, "y", 2);
  data_arg(weights_, op, "weights", 2);
  const Tensor rm = index2d_arg(row_map_, op, "row_map").to(at::kLong);
  shape_arg(weights_, rm.sizes(), op, "weights", "the shape of row_map");
  index_range(rm, y_.size(0), "row_map", " (y has " + std::to_string(y_.size(0)) + " rows)");
  const auto cdt = compute_type(y_.scalar_type(), weights_.scalar_type());
  // A float64 weight with float32 y computes in float64, as the reference does.
  const Tensor y = (cdt == at::kDouble ? y_.to(cdt) : y_).contiguous();
  const Tensor w = weights_.to(cdt).contiguous();
  const int64_t nt = rm.size(0), k = rm.size(1), H = y.size(1);
  Tensor out = new_output({nt, H}, y.options());
  FF_MOE_DISPATCH(y.scalar_type(), "moe", [&] {
    using A = acc_t<scalar_t>;
    gather_sum<scalar_t, A>(y.data_ptr<scalar_t>(), rm.data_ptr<int64_t>(), w.data_ptr<A>(), nt, k, H,
                            out.data_ptr<scalar_t>());
  });
  return out.to(y_.scalar_type());
}

template <typename T, typename A>
void unpermute_bwd_kernel(const T* y, const int64_t* rm, const A* w, const T* go, int64_t nt, int64_t k,
                          int64_t R, int64_t H, T* gy, A* gw) {
  if (gy != nullptr) {
    // The slots naming each row of y, in slot order: a counting sort of row_map.
    std::vector<int64_t> ptr(size_t(R) + 1), slots(size_t(nt * k));
    bucket_sort(rm, nt * k, R, ptr.data(), slots.data());
    for_range(R, 16, [&](int64_t r0, int64_t r1) {
      std::vector<A> acc(H), row(H);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t h = 0; h < H; ++h) acc[h] = 0;
        for (int64_t p = ptr[r]; p < ptr[r + 1]; ++p) {
          const int64_t s = slots[p];
          load_row(go + (s / k) * H, 1, H, row.data());
          const A c = w[s];
          for (int64_t h = 0; h < H; ++h) acc[h] += c * row[h];
        }
        store_row(acc.data(), H, gy + r * H, 1);
      }
    });
  }
  if (gw != nullptr) {
    for_range(nt, 16, [&](int64_t t0, int64_t t1) {
      std::vector<A> a(H), b(H);
      for (int64_t t = t0; t < t1; ++t) {
        load_row(go + t * H, 1, H, b.data());
        for (int64_t j = 0; j < k; ++j) {
          load_row(y + rm[t * k + j] * H, 1, H, a.data());
          A dot = 0;
          for (int64_t h = 0; h < H; ++h) dot += a[h] * b[h];
          gw[t * k + j] = dot;
        }
      }
    });
  }
}

std::tuple<Tensor, Tensor> moe_unpermute_bwd_cpu(const Tensor& y_, const Tensor& row_map_, const Tensor& weights_,
                                                 const Tensor& grad_out_, bool need_y, bool need_weights) {
  const char* op = "moe_unpermute_bwd";
  data_arg(y_, op, "y", 2);
  data_arg(weights_, op, "weights", 2);
  data_arg(grad_out_, op, "grad_out", 2);
  const Tensor rm = index2d_arg(row_map_, op, "row_map").to(at::kLong);
  shape_arg(weights_, rm.sizes(), op, "weights", "the shape of row_map");
  const int64_t nt = rm.size(0), k = rm.size(1), R = y_.size(0), H = y_.size(1);
  shape_arg(grad_out_, {nt, H}, op, "grad_out", "[T, H]");
  index_range(rm, R, "row_map", " (y has " + std::to_string(R) + " rows)");
  const auto cdt = compute_type(y_.scalar_type(), weights_.scalar_type());
  const auto st = cdt == at::kDouble ? at::kDouble : y_.scalar_type();
  const Tensor y = y_.to(st).contiguous(), go = grad_out_.to(st).contiguous();
  const Tensor w = weights_.to(cdt).contiguous();
  Tensor gy = need_y ? new_output({R, H}, y.options()) : y_.new_empty({0});
  Tensor gw = need_weights ? new_output({nt, k}, w.options()) : y_.new_empty({0});
  FF_MOE_DISPATCH(st, "moe", [&] {
    using A = acc_t<scalar_t>;
    unpermute_bwd_kernel<scalar_t, A>(y.data_ptr<scalar_t>(), rm.data_ptr<int64_t>(), w.data_ptr<A>(),
                                      go.data_ptr<scalar_t>(), nt, k, R, H,
                                      need_y ? gy.data_ptr<scalar_t>() : nullptr,
                                      need_weights ? gw.data_ptr<A>() : nullptr);
  });
  if (need_y) gy = gy.to(y_.scalar_type());
  if (need_weights) gw = gw.to(weights_.scalar_type());
  return {gy, gw};
}

}  // namespace
}  // namespace moe
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  using namespace frontiers_fast::moe;
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_route_bwd", &moe_route_bwd_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_permute_bwd", &moe_permute_bwd_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute_bwd", &moe_unpermute_bwd_cpu);
}

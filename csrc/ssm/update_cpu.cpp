// The two decoding steps of the selective-scan family, for the CPU:
// frontiers_fast_native::causal_conv1d_update and ::selective_state_update.
// The schemas and the calling convention live in frontiers_fast/ops/ssm.py.
//
// Decoding is latency-bound (batch x channels is small, one step of work per
// channel), so both are one pass over the channels, split across threads,
// that reads and writes the state in place through its strides and its own
// dtype, and allocates nothing but the output (and, for a batch over 64, a
// sorted copy of state_batch_indices to check that they are distinct).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/convert.h"
#include "common/sched.h"
#include "common/simd.h"

namespace frontiers_fast {
namespace ssm {
namespace {

using at::Tensor;


// ---------------------------------------------------------------------------
// argument checks (O(1), except the state indices' values)
// ---------------------------------------------------------------------------
void float_data_arg(const Tensor& t, const char* op, const char* name, int64_t dim) {
  check_cpu(t, op, name);
  TORCH_CHECK(is_storage_type(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// A tensor in x's dtype of the given shape.
void like_x_arg(const Tensor& t, const Tensor& x, at::IntArrayRef shape, const char* op, const char* name,
                const char* layout) {
  check_cpu(t, op, name);
  same_dtype(t, x, op, name, "x");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must be ", layout, " = ", shape, ", got shape ", t.sizes());
}

// A parameter in acc (float32, float64 for float64 x) of the given shape.
void acc_param_arg(const Tensor& t, const Tensor& x, at::IntArrayRef shape, const char* op, const char* name,
                   const char* layout) {
  check_cpu(t, op, name);
  const at::ScalarType acc = acc_scalar_type(x.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " (the accumulate dtype of x's ",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must be ", layout, " = ", shape, ", got shape ", t.sizes());
}


// state_batch_indices [batch]: rows of the state in [0, rows), none twice.
void check_state_rows(const int64_t* idx, int64_t batch, int64_t rows, const char* op) {
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK_VALUE(idx[b] >= 0 && idx[b] < rows, op, ": state_batch_indices must index the ", rows,
                      " rows of state (values in [0, ", rows - 1, "]), got state_batch_indices[", b, "]=", idx[b]);
  bool repeated = false;
  if (batch <= 64) {  // a decoding batch: pairwise, nothing allocated
    for (int64_t b = 1; b < batch && !repeated; ++b)
      for (int64_t c = 0; c < b && !repeated; ++c) repeated = idx[b] == idx[c];
  } else {
    std::vector<int64_t> sorted(idx, idx + batch);
    std::sort(sorted.begin(), sorted.end());
    repeated = std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end();
  }
  TORCH_CHECK_VALUE(!repeated, op,
                    ": state_batch_indices must not repeat a row (two batch entries would write the same row "
                    "of state)");
}

// The lanes of v summed pairwise (a fixed tree: log2(W) dependent adds rather than W - 1).
template <typename A>
inline A hsum(VecT<A> v) {
  constexpr int W = Simd<A>::W;
  A t[W];
  storeu(t, v);
  for (int h = W / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) t[l] += t[l + h];
  return t[0];
}

// ---------------------------------------------------------------------------
// causal_conv1d_update
// ---------------------------------------------------------------------------
// The window of row (b, d) is conv_state's S entries then the L new inputs;
// output t reads its entries S - (W - 1) + t .. S + t, and the state keeps
// the last S.  A row's outputs are computed before its state is overwritten,
// and the shift runs forwards (entry i takes entry L + i, not yet written).
// The outputs are contiguous: their pre-activations are gathered VW at a time
// (across rows) for one vector silu and store.
template <typename T, typename S>
void conv_update(const Tensor& x, const Tensor& state, const Tensor& weight, const Tensor* bias, bool silu_on,
                 Tensor& out) {
  using A = acc_t<T>;
  using V = VecT<A>;
  constexpr int VW = Simd<A>::W;
  const bool one_step = x.dim() == 2;
  const int64_t batch = x.size(0), dim = x.size(1), L = one_step ? 1 : x.size(2);
  const int64_t Ss = state.size(2), W = weight.size(1), Wm1 = W - 1;
  const T* xp = x.data_ptr<T>();
  const int64_t sxb = x.stride(0), sxd = x.stride(1), sxl = one_step ? 0 : x.stride(2);
  S* sp = state.data_ptr<S>();
  const int64_t ssb = state.stride(0), ssd = state.stride(1), sss = state.stride(2);
  const A* wp = weight.data_ptr<A>();
  const int64_t swd = weight.stride(0), swk = weight.stride(1);
  const A* bp = bias ? bias->data_ptr<A>() : nullptr;
  const int64_t sbd = bias ? bias->stride(0) : 0;
  T* op = out.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 4096 / ((L + Ss) * W + 1));
  for_range(batch * dim, grain, [&](int64_t r0, int64_t r1) {
    A pre[VW] __attribute__((aligned(64)));
    int npre = 0;
    int64_t e0 = r0 * L;  // the output element of pre[0]
    auto flush = [&] {
      V v = loadu<V>(pre);
      if (silu_on) v = vsilu<A>(v);
      store_lanes<A>(v, op + e0, 1, npre);
      e0 += npre;
      npre = 0;
    };
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / dim, d = row % dim;
      S* st = sp + b * ssb + d * ssd;
      const T* xr = xp + b * sxb + d * sxd;
      const A* w = wp + d * swd;
      auto window = [&](int64_t j) -> A {
        return j < Ss ? static_cast<A>(st[j * sss]) : static_cast<A>(xr[(j - Ss) * sxl]);
      };
      for (int64_t t = 0; t < L; ++t) {
        const int64_t j0 = Ss - Wm1 + t;
        A acc = window(j0) * w[0];
        for (int64_t k = 1; k < W; ++k) acc += window(j0 + k) * w[k * swk];
        if (bp) acc += bp[d * sbd];
        pre[npre++] = acc;
        if (npre == VW) flush();
      }
      for (int64_t i = 0; i < Ss; ++i) {
        const int64_t j = L + i;
        st[i * sss] = j < Ss ? st[j * sss] : static_cast<S>(static_cast<A>(xr[(j - Ss) * sxl]));
      }
    }
    if (npre > 0) {
      for (int l = npre; l < VW; ++l) pre[l] = A(0);
      flush();
    }
  });
}

Tensor causal_conv1d_update_cpu(const Tensor& x, const Tensor& conv_state, const Tensor& weight,
                                const std::optional<Tensor>& bias_, bool silu_on) {
  const char* op = "causal_conv1d_update";
  check_cpu(x, op, "x");
  TORCH_CHECK(is_storage_type(x.scalar_type()), op, ": x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be [batch, dim] or [batch, dim, L], got shape ",
              x.sizes());
  const int64_t batch = x.size(0), dim = x.size(1);
  float_data_arg(conv_state, op, "conv_state", 3);
  check_cpu(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dim && weight.size(1) >= 1, op,
              ": weight must be [dim, width] with dim = ", dim, " and width >= 1, got shape ", weight.sizes());
  const int64_t W = weight.size(1);
  acc_param_arg(weight, x, {dim, W}, op, "weight", "[dim, width]");
  TORCH_CHECK(conv_state.size(0) == batch && conv_state.size(1) == dim && conv_state.size(2) >= W - 1, op,
              ": conv_state must be [batch, dim, S] = [", batch, ", ", dim, ", S] with S >= width - 1 = ", W - 1,
              ", got shape ", conv_state.sizes());
  const Tensor* bias = present(bias_);
  if (bias) acc_param_arg(*bias, x, {dim}, op, "bias", "[dim]");
  Tensor out = new_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;  // no row, or no step (the state stays)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_update_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv_state.scalar_type(),
                                    "causal_conv1d_update_cpu_state", [&] {
                                      conv_update<T, scalar_t>(x, conv_state, weight, bias, silu_on, out);
                                    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// selective_state_update
// ---------------------------------------------------------------------------
// The (batch, head, channel) units, VW at a time: their step sizes (and
// softplus), D x and silu(z) as vectors across the units, then each unit's N
// states in vectors of acc,
//   h = exp(dt A) h + (dt x) B,   y = (sum_n C h + D x) silu(z),
// with the new state written back in the state's dtype and y read from the
// unrounded h, as the reference.
template <typename T, typename S>
void state_update(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& Am, const Tensor& Bm,
                  const Tensor& Cm, const Tensor* Dp, const Tensor* zp, const Tensor* biasp, bool softplus,
                  const int64_t* idx, Tensor& out) {
  using A = acc_t<T>;
  using V = VecT<A>;
  constexpr int VW = Simd<A>::W;
  const int64_t batch = x.size(0), H = x.size(1), P = x.size(2), N = state.size(3);
  const int64_t hpg_b = H / Bm.size(1), hpg_c = H / Cm.size(1);  // heads per group
  S* sp = state.data_ptr<S>();
  const T* xp = x.data_ptr<T>();
  const T* dtp = dt.data_ptr<T>();
  const A* ap = Am.data_ptr<A>();
  const T* bp = Bm.data_ptr<T>();
  const T* cp = Cm.data_ptr<T>();
  const A* dp = Dp ? Dp->data_ptr<A>() : nullptr;
  const T* zpp = zp ? zp->data_ptr<T>() : nullptr;
  const A* dbp = biasp ? biasp->data_ptr<A>() : nullptr;
  T* yp = out.data_ptr<T>();
  const int64_t s0 = state.stride(0), s1 = state.stride(1), s2 = state.stride(2), sn = state.stride(3);
  const int64_t xb = x.stride(0), xh = x.stride(1), xq = x.stride(2);
  const int64_t tb = dt.stride(0), th = dt.stride(1), tq = dt.stride(2);
  const int64_t zb = zp ? zp->stride(0) : 0, zh = zp ? zp->stride(1) : 0, zq = zp ? zp->stride(2) : 0;
  const int64_t ah = Am.stride(0), aq = Am.stride(1), an = Am.stride(2);
  const int64_t bb = Bm.stride(0), bg = Bm.stride(1), bn = Bm.stride(2);
  const int64_t cb = Cm.stride(0), cg = Cm.stride(1), cn = Cm.stride(2);
  const int64_t dh = Dp ? Dp->stride(0) : 0, dq = Dp ? Dp->stride(1) : 0;
  const int64_t eh = biasp ? biasp->stride(0) : 0, eq = biasp ? biasp->stride(1) : 0;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(N, 1));
  for_range(batch * H * P, grain, [&](int64_t ub, int64_t ue) {
    // VW (batch, head, channel) units at a time: their step sizes, softplus, D and silu(z) as vectors.
    for (int64_t u0 = ub; u0 < ue; u0 += VW) {
      const int c = int(std::min<int64_t>(VW, ue - u0));
      A dt_[VW] __attribute__((aligned(64))) = {}, x_[VW] __attribute__((aligned(64))) = {};
      A z_[VW] __attribute__((aligned(64))) = {}, d_[VW] __attribute__((aligned(64))) = {};
      A y_[VW] __attribute__((aligned(64))) = {};
      for (int l = 0; l < c; ++l) {
        const int64_t u = u0 + l, b = u / (H * P), h = (u / P) % H, p = u % P;
        dt_[l] = static_cast<A>(dtp[b * tb + h * th + p * tq]);
        if (dbp) dt_[l] += dbp[h * eh + p * eq];
        x_[l] = static_cast<A>(xp[b * xb + h * xh + p * xq]);
        if (zpp) z_[l] = static_cast<A>(zpp[b * zb + h * zh + p * zq]);
        if (dp) d_[l] = dp[h * dh + p * dq];
      }
      V dtv = loadu<V>(dt_);
      if (softplus) dtv = vsoftplus(dtv);
      const V xv = loadu<V>(x_);
      const V dxv = dtv * xv;
      for (int l = 0; l < c; ++l) {
        const int64_t u = u0 + l, b = u / (H * P), h = (u / P) % H, p = u % P;
        const int64_t r = idx ? idx[b] : b;
        const V dtb = bcast(A(dtv[l])), dxb = bcast(A(dxv[l]));
        S* sr = sp + r * s0 + h * s1 + p * s2;
        const A* ar = ap + h * ah + p * aq;
        const T* br = bp + b * bb + (h / hpg_b) * bg;
        const T* cr = cp + b * cb + (h / hpg_c) * cg;
        V yv = V{};
        for (int64_t n0 = 0; n0 < N; n0 += VW) {
          const int m = int(std::min<int64_t>(VW, N - n0));
          const V av = load_lanes<A>(ar + n0 * an, an, m);
          const V hv =
              vexp(dtb * av) * load_lanes<A>(sr + n0 * sn, sn, m) + dxb * load_lanes<A>(br + n0 * bn, bn, m);
          store_lanes<A>(hv, sr + n0 * sn, sn, m);
          const V prod = hv * load_lanes<A>(cr + n0 * cn, cn, m);
          // Lanes past N hold exp(dt 0) 0 + (dt x) 0, NaN for an infinite dt: keep them out of y.
          yv += m == VW ? prod : select<A>(iota<A>() < m, prod, V{});
        }
        y_[l] = hsum<A>(yv);
      }
      V y = loadu<V>(y_);
      if (dp) y = y + loadu<V>(d_) * xv;
      if (zpp) y = y * vsilu<A>(loadu<V>(z_));
      store_lanes<A>(y, yp + u0, 1, c);
    }
  });
}

Tensor selective_state_update_cpu(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& Am,
                                  const Tensor& Bm, const Tensor& Cm, const std::optional<Tensor>& D_,
                                  const std::optional<Tensor>& z_, const std::optional<Tensor>& dt_bias_,
                                  bool dt_softplus, const std::optional<Tensor>& state_batch_indices) {
  const char* op = "selective_state_update";
  float_data_arg(state, op, "state", 4);
  float_data_arg(x, op, "x", 3);
  const int64_t batch = x.size(0), H = x.size(1), P = x.size(2), rows = state.size(0), N = state.size(3);
  TORCH_CHECK(state.size(1) == H && state.size(2) == P, op, ": state must be [rows, nheads, headdim, N] with ",
              "nheads = ", H, " and headdim = ", P, " (from x), got shape ", state.sizes());
  like_x_arg(dt, x, {batch, H, P}, op, "dt", "[batch, nheads, headdim]");
  acc_param_arg(Am, x, {H, P, N}, op, "A", "[nheads, headdim, N]");
  for (const auto& [M, name] : {std::pair<const Tensor&, const char*>{Bm, "B"}, {Cm, "C"}}) {
    check_cpu(M, op, name);
    same_dtype(M, x, op, name, "x");
    TORCH_CHECK(M.dim() == 3 && M.size(0) == batch && M.size(1) >= 1 && H % M.size(1) == 0 && M.size(2) == N, op,
                ": ", name, " must be [batch, ngroups, N] = [", batch, ", G, ", N, "] with G dividing nheads = ",
                H, ", got shape ", M.sizes());
  }
  const Tensor* D = present(D_);
  const Tensor* z = present(z_);
  const Tensor* dt_bias = present(dt_bias_);
  if (D) acc_param_arg(*D, x, {H, P}, op, "D", "[nheads, headdim]");
  if (z) like_x_arg(*z, x, {batch, H, P}, op, "z", "[batch, nheads, headdim]");
  if (dt_bias) acc_param_arg(*dt_bias, x, {H, P}, op, "dt_bias", "[nheads, headdim]");
  Tensor idx;
  if (const Tensor* sbi = present(state_batch_indices)) {
    idx = index_arg(*sbi, op, "state_batch_indices");
    TORCH_CHECK(idx.numel() == batch, op, ": state_batch_indices must be [batch] = [", batch, "], got shape ",
                idx.sizes());
    check_state_rows(idx.data_ptr<int64_t>(), batch, rows, op);
  } else {
    TORCH_CHECK(rows == batch, op, ": state has ", rows, " rows but x has batch ", batch,
                "; pass state_batch_indices to update some rows of a larger cache");
  }
  Tensor out = new_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const int64_t* ip = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "selective_state_update_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, state.scalar_type(),
                                    "selective_state_update_cpu_state", [&] {
                                      state_update<T, scalar_t>(state, x, dt, Am, Bm, Cm, D, z, dt_bias,
                                                                dt_softplus, ip, out);
                                    });
  });
  return out;
}

}  // namespace
}  // namespace ssm
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  using namespace frontiers_fast::ssm;
  m.impl("causal_conv1d_update", &causal_conv1d_update_cpu);
  m.impl("selective_state_update", &selective_state_update_cpu);
}

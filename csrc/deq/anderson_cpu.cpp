// The fused Anderson step of the fixed-point family for the CPU:
// frontiers_fast_native::anderson_step.  Semantics and the float64 truth:
// frontiers_fast/reference/deq.py (anderson_step, which mirrors the solver
// loop _anderson); the schema is in frontiers_fast/ops/deq.py.
//
// With s = i % m and n = min(i + 1, m) valid slots, per sample:
//   X[s] = x, F[s] = fx;  R_j = F_j - X_j (rounded in the input dtype, as the reference's G)
//   GG[s][j] = GG[j][s] = <R_s, R_j>  (j < n),   abs = sqrt(<R_s, R_s>),  rel = abs / (||fx|| + 1e-9)
//   i = 0:  x_next = fx
//   i > 0:  [[0, 1^T], [1, GG_n + lam I]] [mu; alpha] = [1; 0],
//           x_next = tau (alpha F_n) + (1 - tau) (alpha X_n),
//           or tau F[s] + (1 - tau) X[s] where that is not finite (a singular system).
//
// Four steps, none of which rebuilds the Gram matrix:
//   1. per (sample, chunk of D): write slot s, and the chunk's partial dot
//      products <R_s, R_j> and ||fx||^2;
//   2. per sample: sum the partials in chunk order, write GG's row and column
//      s and the norms, and solve the small bordered system;
//   3. per (sample, chunk): mix the slots with the weights, noting whether
//      the chunk's values are finite;
//   4. per (sample, chunk) of the samples with a non-finite value: the damped
//      fallback step.
// With at least as many samples as threads, one parallel region runs the four
// steps sample by sample; with fewer, each step is a region over (sample,
// chunk) items.  With tau = 1 the mix skips X (its weight is 0).
// Every sum accumulates in double (float32 inputs included) in a fixed
// order: eight interleaved lanes within a chunk of kChunk entries, the lanes
// combined pairwise, then the chunks in order.  The chunks are fixed by D
// alone, and threads only choose which (sample, chunk) items they run, so
// the result is bitwise the same for any thread count and any split (whether
// the threads go over the samples or, for a small batch, over chunks of D).
// The solve is Gaussian elimination with partial pivoting in double; an
// exactly zero pivot gives NaN weights, so the sample takes the fallback, as
// the loop's torch.linalg.solve_ex does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/sched.h"

namespace frontiers_fast {
namespace deq {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 1024;  // entries of D per work item; a multiple of the lanes
constexpr int64_t kMaxM = 256;    // ring slots: the (m + 1)^2 solve is per sample, in double
constexpr double kRelEps = 1e-9;  // reference.deq.REL_EPS

// sum_k double(a[k] - c[k]) b[k] over k < len (c = nullptr: a[k] alone), in kLanes
// interleaved lanes combined pairwise: a fixed order that the compiler can vectorise.
constexpr int kLanes = 8;
template <typename T>
inline double dot_lanes(const T* a, const T* c, const double* b, int64_t len) {
  double l[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int q = 0; q < kLanes; ++q) l[q] += static_cast<double>(c ? T(a[k + q] - c[k + q]) : a[k + q]) * b[k + q];
  for (int q = 0; k < len; ++k, ++q) l[q] += static_cast<double>(c ? T(a[k] - c[k]) : a[k]) * b[k];
  for (int h = kLanes / 2; h >= 1; h /= 2)
    for (int q = 0; q < h; ++q) l[q] += l[q + h];
  return l[0];
}

// Solves the (n+1)x(n+1) bordered system in place; alpha[j] = solution entry j + 1.
// M is row-major (n+1)x(n+1), rhs has n+1 entries.  A zero pivot gives NaN weights.
void bordered_solve(std::vector<double>& M, std::vector<double>& rhs, int64_t n, double* alpha) {
  const int64_t N = n + 1;
  for (int64_t k = 0; k < N; ++k) {
    int64_t p = k;
    double best = std::fabs(M[k * N + k]);
    for (int64_t r = k + 1; r < N; ++r) {
      const double v = std::fabs(M[r * N + k]);
      if (v > best) best = v, p = r;
    }
    if (M[p * N + k] == 0.0) {
      for (int64_t j = 0; j < n; ++j) alpha[j] = std::numeric_limits<double>::quiet_NaN();
      return;
    }
    if (p != k) {
      for (int64_t c = 0; c < N; ++c) std::swap(M[k * N + c], M[p * N + c]);
      std::swap(rhs[k], rhs[p]);
    }
    const double piv = M[k * N + k];
    for (int64_t r = k + 1; r < N; ++r) {
      const double f = M[r * N + k] / piv;
      if (f == 0.0) continue;
      for (int64_t c = k; c < N; ++c) M[r * N + c] -= f * M[k * N + c];
      rhs[r] -= f * rhs[k];
    }
  }
  for (int64_t k = N - 1; k >= 0; --k) {
    double v = rhs[k];
    for (int64_t c = k + 1; c < N; ++c) v -= M[k * N + c] * rhs[c];
    rhs[k] = v / M[k * N + k];
  }
  for (int64_t j = 0; j < n; ++j) alpha[j] = rhs[j + 1];
}

template <typename T>
void anderson_step_kernel(const Tensor& X, const Tensor& F, const Tensor& GG, const Tensor& x, const Tensor& fx,
                          int64_t i, double lam, double tau, Tensor& x_next, Tensor& abs_out, Tensor& rel_out) {
  const int64_t B = X.size(0), m = X.size(1), D = X.size(2);
  const int64_t s = i % m, n = std::min<int64_t>(i + 1, m);
  const int64_t nc = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  const int64_t items = B * nc;
  const int64_t nv = n + 1;  // per chunk: <R_s, R_j> for j < n, then ||fx||^2
  T* Xp = X.data_ptr<T>();
  T* Fp = F.data_ptr<T>();
  T* Gp = GG.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* fp = fx.data_ptr<T>();
  T* op = x_next.data_ptr<T>();
  T* ap = abs_out.data_ptr<T>();
  T* rp = rel_out.data_ptr<T>();
  // Items run serially below about 8k multiply-adds of work per thread (a full chunk is more).
  const int64_t item_work = std::min(D, kChunk) * (n + 2) + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 13) / item_work);
  const bool pure = tau == 1.0;  // the mix is alpha F alone (X's term has weight 0)

  // The four steps of the work, per (sample, chunk) item or per sample.
  // 1: slot s, and the item's partial dot products (pv: nv entries); rs: kChunk doubles of scratch.
  auto store_item = [&](int64_t it, double* pv, double* rs) {
    const int64_t b = it / nc, d0 = (it % nc) * kChunk, len = std::max<int64_t>(0, std::min(D - d0, kChunk));
    const T* xr = xp + b * D + d0;
    const T* fr = fp + b * D + d0;
    T* Xs = Xp + (b * m + s) * D + d0;
    T* Fs = Fp + (b * m + s) * D + d0;
    for (int64_t k = 0; k < len; ++k) {
      Xs[k] = xr[k];
      Fs[k] = fr[k];
      rs[k] = static_cast<double>(static_cast<T>(fr[k] - xr[k]));
    }
    for (int64_t j = 0; j < n; ++j)
      pv[j] = dot_lanes(Fp + (b * m + j) * D + d0, Xp + (b * m + j) * D + d0, rs, len);
    for (int64_t k = 0; k < len; ++k) rs[k] = static_cast<double>(fr[k]);
    pv[n] = dot_lanes<T>(fr, nullptr, rs, len);
  };
  // 2: the sums of sample b's partials in chunk order, GG's row and column s, the norms and the weights.
  std::vector<double> alpha(static_cast<size_t>(i == 0 ? 0 : B * n));
  auto solve_sample = [&](int64_t b, const double* part_b, std::vector<double>& tot, std::vector<double>& M,
                          std::vector<double>& rhs) {
    std::fill(tot.begin(), tot.end(), 0.0);
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t v = 0; v < nv; ++v) tot[v] += part_b[c * nv + v];
    T* G = Gp + b * m * m;
    for (int64_t j = 0; j < n; ++j) G[s * m + j] = G[j * m + s] = static_cast<T>(tot[j]);
    const double a = std::sqrt(tot[s]);
    ap[b] = static_cast<T>(a);
    rp[b] = static_cast<T>(a / (std::sqrt(tot[n]) + kRelEps));
    if (i == 0) return;
    // [[0, 1^T], [1, GG_n + lam I]] from GG as stored (its other rows came from earlier steps).
    M.assign(static_cast<size_t>(nv * nv), 0.0);
    rhs.assign(static_cast<size_t>(nv), 0.0);
    rhs[0] = 1.0;
    for (int64_t j = 0; j < n; ++j) {
      M[j + 1] = M[(j + 1) * nv] = 1.0;
      for (int64_t k = 0; k < n; ++k) M[(j + 1) * nv + k + 1] = static_cast<double>(G[j * m + k]);
      M[(j + 1) * nv + j + 1] += lam;
    }
    bordered_solve(M, rhs, n, alpha.data() + b * n);
  };
  // 3: the item's x_next; false where a value is not finite.  af, ax: kChunk doubles of scratch.
  auto mix_item = [&](int64_t it, double* af, double* ax) -> bool {
    const int64_t b = it / nc, d0 = (it % nc) * kChunk, len = std::max<int64_t>(0, std::min(D - d0, kChunk));
    T* out = op + b * D + d0;
    if (i == 0) {
      std::copy(fp + b * D + d0, fp + b * D + d0 + len, out);
      return true;
    }
    // The slots in order (j outer) for every entry: the same sum as entry by entry, vectorisable.
    const double* w = alpha.data() + b * n;
    std::fill(af, af + len, 0.0);
    if (!pure) std::fill(ax, ax + len, 0.0);
    for (int64_t j = 0; j < n; ++j) {
      const T* Fj = Fp + (b * m + j) * D + d0;
      const double wj = w[j];
      for (int64_t k = 0; k < len; ++k) af[k] += wj * static_cast<double>(Fj[k]);
      if (pure) continue;
      const T* Xj = Xp + (b * m + j) * D + d0;
      for (int64_t k = 0; k < len; ++k) ax[k] += wj * static_cast<double>(Xj[k]);
    }
    bool ok = true;
    for (int64_t k = 0; k < len; ++k) {
      const T y = static_cast<T>(pure ? af[k] : tau * af[k] + (1.0 - tau) * ax[k]);
      out[k] = y;
      ok = ok && std::isfinite(y);
    }
    return ok;
  };
  // 4: the damped step from the newest slot (for a sample whose mix is not finite).
  auto fallback_item = [&](int64_t it) {
    const int64_t b = it / nc, d0 = (it % nc) * kChunk, len = std::max<int64_t>(0, std::min(D - d0, kChunk));
    const T* Xs = Xp + (b * m + s) * D + d0;
    const T* Fs = Fp + (b * m + s) * D + d0;
    T* out = op + b * D + d0;
    for (int64_t k = 0; k < len; ++k)
      out[k] = static_cast<T>(tau * static_cast<double>(Fs[k]) + (1.0 - tau) * static_cast<double>(Xs[k]));
  };

  if (B >= at::get_num_threads()) {
    // Enough samples for every thread: one parallel region over the samples, each sample's
    // four steps in a row (the same arithmetic as below, so the same bits, with one wake-up of
    // the threads instead of three or four).
    const int64_t sample_grain = std::max<int64_t>(1, (int64_t(1) << 13) / (nc * item_work));
    for_range(B, sample_grain, [&](int64_t b0, int64_t b1) {
      std::vector<double> part_b(static_cast<size_t>(nc * nv)), tot(static_cast<size_t>(nv)), M, rhs;
      std::vector<double> s1(static_cast<size_t>(kChunk)), s2(static_cast<size_t>(pure ? 0 : kChunk));
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t c = 0; c < nc; ++c) store_item(b * nc + c, part_b.data() + c * nv, s1.data());
        solve_sample(b, part_b.data(), tot, M, rhs);
        bool ok = true;
        for (int64_t c = 0; c < nc; ++c) ok = mix_item(b * nc + c, s1.data(), s2.data()) && ok;
        if (!ok && i != 0)
          for (int64_t c = 0; c < nc; ++c) fallback_item(b * nc + c);
      }
    });
    return;
  }

  // Fewer samples than threads: each step in its own region, over (sample, chunk) items.
  std::vector<double> part(static_cast<size_t>(items * nv));
  for_range(items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<double> rs(static_cast<size_t>(kChunk));
    for (int64_t it = i0; it < i1; ++it) store_item(it, part.data() + it * nv, rs.data());
  });
  const int64_t solve_grain = std::max<int64_t>(1, 4096 / (nv * nv * nv + nc * nv));
  for_range(B, solve_grain, [&](int64_t b0, int64_t b1) {
    std::vector<double> tot(static_cast<size_t>(nv)), M, rhs;
    for (int64_t b = b0; b < b1; ++b) solve_sample(b, part.data() + b * nc * nv, tot, M, rhs);
  });
  std::vector<uint8_t> finite(static_cast<size_t>(items), 1);
  for_range(items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<double> af(static_cast<size_t>(kChunk)), ax(static_cast<size_t>(pure ? 0 : kChunk));
    for (int64_t it = i0; it < i1; ++it) finite[it] = mix_item(it, af.data(), ax.data());
  });
  if (i == 0) return;
  std::vector<uint8_t> bad(static_cast<size_t>(B), 0);
  bool any = false;
  for (int64_t it = 0; it < items; ++it)
    if (!finite[it]) bad[it / nc] = 1, any = true;
  if (!any) return;
  for_range(items, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it)
      if (bad[it / nc]) fallback_item(it);
  });
}

// A buffer the step writes in place: X's dtype, the given shape, contiguous (a copy would lose the writes).
void buffer_arg(const Tensor& t, const Tensor& X, at::IntArrayRef shape, const char* op, const char* name,
                const char* layout) {
  check_cpu(t, op, name);
  same_dtype(t, X, op, name, "X");
  shape_arg(t, shape, op, name, layout);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (it is written in place)");
}

std::tuple<Tensor, Tensor, Tensor> anderson_step_cpu(const Tensor& X, const Tensor& F, const Tensor& GG,
                                                     const Tensor& x_, const Tensor& fx_, int64_t i, double lam,
                                                     double tau) {
  const char* op = "anderson_step";
  check_cpu(X, op, "X");
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble, op,
              ": X must be float32 or float64, got ", X.scalar_type());
  TORCH_CHECK(X.dim() == 3, op, ": X must be [B, m, D], got shape ", X.sizes());
  TORCH_CHECK(X.is_contiguous(), op, ": X must be contiguous (it is written in place)");
  const int64_t B = X.size(0), m = X.size(1), D = X.size(2);
  TORCH_CHECK(m >= 1 && m <= kMaxM, op, ": X must have 1 to ", kMaxM, " ring slots (m = X.shape[1]), got ", m);
  buffer_arg(F, X, X.sizes(), op, "F", "[B, m, D]");
  buffer_arg(GG, X, {B, m, m}, op, "GG", "[B, m, m]");
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{x_, "x"}, {fx_, "fx"}}) {
    check_cpu(t, op, name);
    same_dtype(t, X, op, name, "X");
    shape_arg(t, {B, D}, op, name, "[B, D]");
  }
  // The public wrappers' wording (frontiers_fast._checks: check_int, check_real).
  TORCH_CHECK_VALUE(i >= 0, op, ": i must be >= 0, got ", i);
  TORCH_CHECK_VALUE(std::isfinite(lam), op, ": lam must be finite, got ", lam);
  TORCH_CHECK_VALUE(lam >= 0.0, op, ": lam must be >= 0.0, got ", lam);
  TORCH_CHECK_VALUE(std::isfinite(tau), op, ": tau must be finite, got ", tau);
  TORCH_CHECK_VALUE(tau > 0.0, op, ": tau must be > 0.0, got ", tau);
  const Tensor x = x_.contiguous(), fx = fx_.contiguous();
  Tensor x_next = new_output({B, D}, X.options());
  Tensor abs_out = new_output({B}, X.options());
  Tensor rel_out = new_output({B}, X.options());
  if (B == 0) return {x_next, abs_out, rel_out};
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "anderson_step_cpu", [&] {
    anderson_step_kernel<scalar_t>(X, F, GG, x, fx, i, lam, tau, x_next, abs_out, rel_out);
  });
  return {x_next, abs_out, rel_out};
}

}  // namespace
}  // namespace deq
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) { m.impl("anderson_step", &frontiers_fast::deq::anderson_step_cpu); }

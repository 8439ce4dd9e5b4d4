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
// order: within a chunk of kChunk entries, vectors of eight lanes in four
// chains (common/wide.h), the lanes combined in a fixed tree, then the chunks
// in order; the mix sums the slots in order for every entry.  The chunks are fixed by D
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
#include "common/wide.h"

namespace frontiers_fast {
namespace deq {
namespace {

using at::Tensor;
using namespace frontiers_fast::wide;

constexpr int64_t kChunk = 1024;  // entries of D per work item; a multiple of the lanes
constexpr int64_t kMaxM = 256;    // ring slots: the (m + 1)^2 solve is per sample, in double
constexpr double kRelEps = 1e-9;  // reference.deq.REL_EPS

constexpr int kVecs = int(kChunk / kLanes);

// sum_k T(a[k] - c[k]) y[k] over a chunk of m elements (nv vectors): dot_chunk's order.
template <typename T>
FF_INLINE double dot_diff(const T* a, const T* c, const D8* y, int nv, int64_t m) {
  auto r = [&](int k) { return round_to(vec_at(a, k, m) - vec_at(c, k, m), (T*)nullptr); };
  D8 q0 = {}, q1 = {}, q2 = {}, q3 = {};
  int k = 0;
  for (; k + 4 <= nv; k += 4) {
    q0 += r(k) * y[k];
    q1 += r(k + 1) * y[k + 1];
    q2 += r(k + 2) * y[k + 2];
    q3 += r(k + 3) * y[k + 3];
  }
  if (k < nv) q0 += r(k) * y[k];
  if (k + 1 < nv) q1 += r(k + 1) * y[k + 1];
  if (k + 2 < nv) q2 += r(k + 2) * y[k + 2];
  return hsum((q0 + q1) + (q2 + q3));
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
  // 1: slot s, and the item's partial dot products (pv: nv entries).
  auto store_item = [&](int64_t it, double* pv) {
    const int64_t b = it / nc, d0 = (it % nc) * kChunk, len = std::max<int64_t>(0, std::min(D - d0, kChunk));
    const T* xr = xp + b * D + d0;
    const T* fr = fp + b * D + d0;
    std::memcpy(Xp + (b * m + s) * D + d0, xr, sizeof(T) * size_t(len));
    std::memcpy(Fp + (b * m + s) * D + d0, fr, sizeof(T) * size_t(len));
    const int vecs = int((len + kLanes - 1) / kLanes);
    D8 rs[kVecs], fv[kVecs];
    for (int k = 0; k < vecs; ++k) {
      fv[k] = vec_at(fr, k, len);
      rs[k] = round_to(fv[k] - vec_at(xr, k, len), (T*)nullptr);  // R_s rounded to T, as stored
    }
    for (int64_t j = 0; j < n; ++j)
      pv[j] = dot_diff(Fp + (b * m + j) * D + d0, Xp + (b * m + j) * D + d0, rs, vecs, len);
    pv[n] = dot_chunk(fv, fv, vecs);
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
  // 3: the item's x_next; false where a value is not finite.  Elements outer, slots inner, the
  // partial sums in registers (the slots in order for every element, so the same sums).
  auto mix_item = [&](int64_t it) -> bool {
    const int64_t b = it / nc, d0 = (it % nc) * kChunk, len = std::max<int64_t>(0, std::min(D - d0, kChunk));
    T* out = op + b * D + d0;
    if (i == 0) {
      std::copy(fp + b * D + d0, fp + b * D + d0 + len, out);
      return true;
    }
    const double* w = alpha.data() + b * n;
    const T* Fb = Fp + b * m * D + d0;
    const T* Xb = Xp + b * m * D + d0;
    const int vecs = int((len + kLanes - 1) / kLanes);
    D8 bad = {};  // NaN in a lane once a rounded value is not finite (y - y is 0 only for finite y)
    auto put = [&](int k, D8 af, D8 ax) {
      const D8 y = round_to(pure ? af : tau * af + (1.0 - tau) * ax, (T*)nullptr);
      put_at(out, k, len, y);
      bad += y - y;
    };
    int k = 0;
    for (; k + 4 <= vecs && int64_t(k + 4) * kLanes <= len; k += 4) {
      const int64_t at = int64_t(k) * kLanes;
      D8 f0 = {}, f1 = {}, f2 = {}, f3 = {}, x0 = {}, x1 = {}, x2 = {}, x3 = {};
      for (int64_t j = 0; j < n; ++j) {
        const T* Fj = Fb + j * D + at;
        const double wj = w[j];
        f0 += wj * load8(Fj);
        f1 += wj * load8(Fj + kLanes);
        f2 += wj * load8(Fj + 2 * kLanes);
        f3 += wj * load8(Fj + 3 * kLanes);
        if (pure) continue;
        const T* Xj = Xb + j * D + at;
        x0 += wj * load8(Xj);
        x1 += wj * load8(Xj + kLanes);
        x2 += wj * load8(Xj + 2 * kLanes);
        x3 += wj * load8(Xj + 3 * kLanes);
      }
      put(k, f0, x0);
      put(k + 1, f1, x1);
      put(k + 2, f2, x2);
      put(k + 3, f3, x3);
    }
    for (; k < vecs; ++k) {
      D8 f0 = {}, x0 = {};
      for (int64_t j = 0; j < n; ++j) {
        f0 += w[j] * vec_at(Fb + j * D, k, len);
        if (!pure) x0 += w[j] * vec_at(Xb + j * D, k, len);
      }
      put(k, f0, x0);
    }
    return hsum(bad) == 0.0;
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
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t c = 0; c < nc; ++c) store_item(b * nc + c, part_b.data() + c * nv);
        solve_sample(b, part_b.data(), tot, M, rhs);
        bool ok = true;
        for (int64_t c = 0; c < nc; ++c) ok = mix_item(b * nc + c) && ok;
        if (!ok && i != 0)
          for (int64_t c = 0; c < nc; ++c) fallback_item(b * nc + c);
      }
    });
    return;
  }

  // Fewer samples than threads: each step in its own region, over (sample, chunk) items.
  std::vector<double> part(static_cast<size_t>(items * nv));
  for_range(items, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) store_item(it, part.data() + it * nv);
  });
  const int64_t solve_grain = std::max<int64_t>(1, 4096 / (nv * nv * nv + nc * nv));
  for_range(B, solve_grain, [&](int64_t b0, int64_t b1) {
    std::vector<double> tot(static_cast<size_t>(nv)), M, rhs;
    for (int64_t b = b0; b < b1; ++b) solve_sample(b, part.data() + b * nc * nv, tot, M, rhs);
  });
  std::vector<uint8_t> finite(static_cast<size_t>(items), 1);
  for_range(items, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) finite[it] = mix_item(it);
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

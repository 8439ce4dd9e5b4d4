// Solver-loop kernels of the fixed-point family for the CPU:
// frontiers_fast_native::broyden_step, ::broyden_residual, ::residual_norms and ::residual_norms_bwd.
// Semantics and the float64 truth: frontiers_fast/reference/deq.py
// (broyden_step, residual_norms) and _ref_residual_norms_bwd in
// frontiers_fast/ops/deq.py, where the schemas live.
//
// broyden_step, per sample, with Jinv = -I + U_n^T V_n:
//   a_j = U_j . dx, c_j = V_j . dg             (j < n)
//   e_j = V_j . gx                             (j < n_after, j != slot)
//   v   = -dx + sum_j a_j V_j                  (Jinv^T dx)
//   num = dx - (-dg + sum_j c_j U_j)           (dx - Jinv dg)
//   den = v . dg, u = num / den                (non-finite entries of u, v -> 0)
//   U_slot = u, V_slot = v, e_slot = v . gx
//   update = -(-gx + sum_{j < n_after} e_j U_j)
//   out = active ? x + update : x             (the next estimate; a stopped sample keeps x)
// Pass 1 reads the rows once for the three dot products, pass 2 once more
// for the combinations (the sample's rows are still in L2 when it runs
// alone on a thread), writing num and v into row slot and the partial sum
// over the old rows into the output; pass 3 touches only row slot and the
// output, to divide by den and add the new term.  Row slot is read by
// passes 1 and 2 before pass 2 writes it, chunk by chunk, so a slot among
// the first n rows contributes its old value to (u, v), as in the reference.
//
// Accumulation: every dot product and every combination is accumulated in
// double (for float32 inputs too), and rounded to the dtype once when it is
// stored.  D is cut into chunks of kChunk elements; a chunk's dot products are
// summed over 8 double lanes and then a fixed tree, and the chunks' partial
// sums are added in chunk order.  A sample's chunks run on one thread when
// B >= threads and spread over threads otherwise, but the arithmetic is the
// same either way, so the results are bitwise the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Elements of D per chunk: a fixed number, never derived from the thread
// count, so the order of every sum is a function of D alone.
constexpr int64_t kChunk = 512;
constexpr int kChunkVecs = kChunk / kLanes;
constexpr double kRelEps = 1e-9;  // ref.REL_EPS

// out[0..3] = sum_r a[r] * (4 vectors of rows[r] from element at), the rows in order.
template <typename T>
FF_INLINE void sum_rows4(const T* const* rows, const double* a, int cnt, int64_t at, D8* out) {
  D8 x0 = {}, x1 = {}, x2 = {}, x3 = {};
  for (int r = 0; r < cnt; ++r) {
    const T* p = rows[r] + at;
    const double c = a[r];
    x0 += c * load8(p);
    x1 += c * load8(p + kLanes);
    x2 += c * load8(p + 2 * kLanes);
    x3 += c * load8(p + 3 * kLanes);
  }
  out[0] = x0, out[1] = x1, out[2] = x2, out[3] = x3;
}

inline int64_t num_chunks(int64_t D) { return (D + kChunk - 1) / kChunk; }

// ---------------------------------------------------------------------------
// argument checks
// ---------------------------------------------------------------------------
// A float32/float64 CPU tensor of `dim` dimensions that the op writes in place: it must be contiguous.
void inplace_arg(const Tensor& t, const char* op, const char* name, int64_t dim) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (it is written in place)");
}

// ---------------------------------------------------------------------------
// broyden_step
// ---------------------------------------------------------------------------
template <typename T>
struct Step {
  T *U, *V, *out;
  const T *dx, *dg, *gx, *x;
  const bool* active;
  int64_t B, L, D, n, slot, n_after, R, nch;
  // Per (sample, chunk): the partial dot products a [L], c [L], e [L], then den, e_slot.
  // Per sample (after the chunk partials): the same, summed in chunk order.
  double *part, *coef;
  int64_t stride() const { return 3 * L + 2; }

  bool uses_e(int64_t j) const { return j < n_after && j != slot; }
  const T* row(const T* base, int64_t b, int64_t j) const { return base + (b * L + j) * D; }
  T* row(T* base, int64_t b, int64_t j) const { return base + (b * L + j) * D; }

  void load(const T* p, int64_t m, D8* x) const {
    for (int k = 0; k < (m + kLanes - 1) / kLanes; ++k) x[k] = vec_at(p, k, m);
  }

  // Pass 1: the dot products of the old rows with dx, dg and gx over one chunk, each row read
  // straight from memory once (a V row serves both of its products).
  void dots(int64_t b, int64_t c) const {
    const int64_t d0 = c * kChunk, m = std::min(kChunk, D - d0);
    const int nv = int((m + kLanes - 1) / kLanes);
    D8 xd[kChunkVecs], gd[kChunkVecs], hd[kChunkVecs];
    load(dx + b * D + d0, m, xd);
    load(dg + b * D + d0, m, gd);
    load(gx + b * D + d0, m, hd);
    double* p = part + (b * nch + c) * stride();
    for (int64_t j = 0; j < R; ++j) {
      if (j < n) p[j] = dot_row(row(U, b, j) + d0, xd, nv, m);
      const bool e = uses_e(j);
      if (j < n && e)
        dot_row2(row(V, b, j) + d0, gd, hd, nv, m, p[L + j], p[2 * L + j]);
      else if (j < n)
        p[L + j] = dot_row(row(V, b, j) + d0, gd, nv, m);
      else if (e)
        p[2 * L + j] = dot_row(row(V, b, j) + d0, hd, nv, m);
    }
  }

  // Pass 2: v, num and the old rows' part of the update over one chunk; writes num and v into row
  // slot (after the chunk's reads of it) and that part into out.
  void combine(int64_t b, int64_t c) const {
    const int64_t d0 = c * kChunk, m = std::min(kChunk, D - d0);
    const int nv = int((m + kLanes - 1) / kLanes);
    D8 accv[kChunkVecs], accw[kChunkVecs], accs[kChunkVecs];
    const double* q = coef + b * stride();
    // The terms of each sum, rows in order: the same additions, element by element, as a loop
    // over the rows outside a loop over the elements, with the partial sums in registers.
    thread_local std::vector<const T*> rows_buf;
    thread_local std::vector<double> coef_buf;
    rows_buf.resize(size_t(3 * R));
    coef_buf.resize(size_t(3 * R));
    const T** vrow = rows_buf.data();
    const T** urow = vrow + R;
    const T** erow = urow + R;
    double* va = coef_buf.data();
    double* uc = va + R;
    double* ue = uc + R;
    int nvr = 0, nur = 0, ner = 0;
    for (int64_t j = 0; j < R; ++j) {
      if (j < n) {
        vrow[nvr] = row(V, b, j) + d0, va[nvr++] = q[j];
        urow[nur] = row(U, b, j) + d0, uc[nur++] = q[L + j];
      }
      if (uses_e(j)) erow[ner] = row(U, b, j) + d0, ue[ner++] = q[2 * L + j];
    }
    int k = 0;
    if (m == kChunk) {  // whole vectors, four at a time
      for (; k + 4 <= nv; k += 4) {
        const int64_t at = int64_t(k) * kLanes;
        sum_rows4(vrow, va, nvr, at, accv + k);
        sum_rows4(urow, uc, nur, at, accw + k);
        sum_rows4(erow, ue, ner, at, accs + k);
      }
    }
    for (; k < nv; ++k) {
      D8 v0 = {}, w0 = {}, s0 = {};
      for (int r = 0; r < nvr; ++r) v0 += va[r] * vec_at(vrow[r], k, m);
      for (int r = 0; r < nur; ++r) w0 += uc[r] * vec_at(urow[r], k, m);
      for (int r = 0; r < ner; ++r) s0 += ue[r] * vec_at(erow[r], k, m);
      accv[k] = v0, accw[k] = w0, accs[k] = s0;
    }
    T* us = row(U, b, slot) + d0;
    T* vs = row(V, b, slot) + d0;
    const T* xp = dx + b * D + d0;
    const T* gp = dg + b * D + d0;
    const T* hp = gx + b * D + d0;
    T* op = out + b * D + d0;
    D8 den = {}, es = {};
    for (int k = 0; k < nv; ++k) {
      const D8 x = vec_at(xp, k, m), g = vec_at(gp, k, m), h = vec_at(hp, k, m);
      const D8 v = round_to(-x + accv[k], (T*)nullptr);  // v as the reference has it, before the zeroing
      den += v * g;
      const D8 vz = finite_or_zero(v);
      es += vz * h;
      const D8 num = x - (-g + accw[k]);
      put_at(us, k, m, num);
      put_at(vs, k, m, vz);
      put_at(op, k, m, accs[k]);
    }
    double* p = part + (b * nch + c) * stride();
    p[3 * L] = hsum(den);
    p[3 * L + 1] = hsum(es);
  }

  // Pass 3: u = num / den (zeroed where not finite) into row slot, and its term into the update.
  void finish(int64_t b, int64_t c) const {
    const int64_t d0 = c * kChunk, m = std::min(kChunk, D - d0);
    const int nv = int((m + kLanes - 1) / kLanes);
    const double* q = coef + b * stride();
    const double den = q[3 * L], es = q[3 * L + 1];
    T* us = row(U, b, slot) + d0;
    const T* hp = gx + b * D + d0;
    const T* xp = x + b * D + d0;
    T* op = out + b * D + d0;
    const bool live = active[b];
    for (int k = 0; k < nv; ++k) {
      const D8 u = finite_or_zero(round_to(vec_at(us, k, m) / den, (T*)nullptr));
      put_at(us, k, m, u);
      // The update rounded to the dtype, then x + update rounded once more, as the tensor ops do
      // (float32 sums taken in double and rounded are the float32 sums: 53 >= 2 * 24 + 2).
      const D8 upd = round_to(vec_at(hp, k, m) - (vec_at(op, k, m) + es * u), (T*)nullptr);
      const D8 xv = vec_at(xp, k, m);
      put_at(op, k, m, live ? xv + upd : xv);
    }
  }

  // The chunk partials of sample b summed in chunk order, entries [lo, hi) of a record.
  void reduce(int64_t b, int64_t lo, int64_t hi) const {
    double* q = coef + b * stride();
    for (int64_t i = lo; i < hi; ++i) q[i] = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
      const double* p = part + (b * nch + c) * stride();
      for (int64_t i = lo; i < hi; ++i) {
        const bool used = i < L ? i < n : i < 2 * L ? i - L < n : i < 3 * L ? uses_e(i - 2 * L) : true;
        if (used) q[i] += p[i];
      }
    }
  }

  void sample(int64_t b) const {
    for (int64_t c = 0; c < nch; ++c) dots(b, c);
    reduce(b, 0, 3 * L);
    for (int64_t c = 0; c < nch; ++c) combine(b, c);
    reduce(b, 3 * L, 3 * L + 2);
    for (int64_t c = 0; c < nch; ++c) finish(b, c);
  }
};

template <typename T>
void broyden_step_kernel(Step<T>& s) {
  const int64_t items = s.B * s.nch;
  Workspace<double> work(size_t((items + s.B) * s.stride()));
  s.part = work.data();
  s.coef = work.data() + items * s.stride();
  if (s.B >= at::get_num_threads() || items <= 1) {
    at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) s.sample(b);
    });
    return;
  }
  // Fewer samples than threads: each pass spreads the (sample, chunk) items over the threads.
  auto each = [&](auto fn) {
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) fn(i / s.nch, i % s.nch);
    });
  };
  each([&](int64_t b, int64_t c) { s.dots(b, c); });
  for (int64_t b = 0; b < s.B; ++b) s.reduce(b, 0, 3 * s.L);
  each([&](int64_t b, int64_t c) { s.combine(b, c); });
  for (int64_t b = 0; b < s.B; ++b) s.reduce(b, 3 * s.L, 3 * s.L + 2);
  each([&](int64_t b, int64_t c) { s.finish(b, c); });
}

Tensor broyden_step_cpu(const Tensor& U, const Tensor& V, const Tensor& dx_, const Tensor& dg_, const Tensor& gx_,
                        const Tensor& x_, const Tensor& active_, int64_t n, int64_t slot, int64_t n_after) {
  const char* op = "broyden_step";
  inplace_arg(U, op, "U", 3);
  inplace_arg(V, op, "V", 3);
  same_dtype(V, U, op, "V", "U");
  shape_arg(V, U.sizes(), op, "V", "U's shape [B, L, D]");
  const int64_t B = U.size(0), L = U.size(1), D = U.size(2);
  const Tensor dx = float_arg(dx_, op, "dx", 2), dg = float_arg(dg_, op, "dg", 2), gx = float_arg(gx_, op, "gx", 2);
  const Tensor x = float_arg(x_, op, "x", 2);
  for (auto [t, name] : {std::pair{&dx, "dx"}, std::pair{&dg, "dg"}, std::pair{&gx, "gx"}, std::pair{&x, "x"}}) {
    same_dtype(*t, U, op, name, "U");
    shape_arg(*t, {B, D}, op, name, "[B, D]");
  }
  check_cpu(active_, op, "active");
  TORCH_CHECK_VALUE(active_.scalar_type() == at::kBool, op, ": active must be bool, got ", active_.scalar_type());
  shape_arg(active_, {B}, op, "active", "[B]");
  const Tensor active = active_.contiguous();
  TORCH_CHECK_VALUE(0 <= n && n <= L, op, ": n must be in [0, L=", L, "], got ", n);
  TORCH_CHECK_VALUE(1 <= n_after && n_after <= L, op, ": n_after must be in [1, L=", L, "], got ", n_after);
  TORCH_CHECK_VALUE(0 <= slot && slot < n_after, op, ": slot must be in [0, n_after=", n_after, "), got ", slot);
  Tensor out = new_output({B, D}, gx.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "broyden_step_cpu", [&] {
    Step<scalar_t> s{U.data_ptr<scalar_t>(), V.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                     dx.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                     x.data_ptr<scalar_t>(), active.data_ptr<bool>(), B, L, D, n, slot, n_after, std::max(n, n_after), num_chunks(D), nullptr, nullptr};
    broyden_step_kernel(s);
  });
  return out;
}

// ---------------------------------------------------------------------------
// residual_norms, residual_norms_bwd
// ---------------------------------------------------------------------------
// ||fz - z||^2 and ||fz||^2 per sample into sq [B, 2], with the chunk scheme above (chunk partials
// summed in chunk order, any thread count giving the same bits).
template <typename T>
void squared_norms(const T* fz, const T* z, int64_t B, int64_t D, double* sq) {
  const int64_t nch = num_chunks(D), items = B * nch;
  Workspace<double> part(size_t(2 * std::max<int64_t>(items, 1)));
  double* p = part.data();
  at::parallel_for(0, items, wake_aware_grain(items, 4 * kChunk, std::max<int64_t>(1, 32768 / kChunk)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nch, d0 = (i % nch) * kChunk, m = std::min(kChunk, D - d0);
      const T* f = fz + b * D + d0;
      const T* x = z + b * D + d0;
      D8 fv[kChunkVecs], rv[kChunkVecs];
      const int nv = int((m + kLanes - 1) / kLanes);
      for (int k = 0; k < nv; ++k) {
        fv[k] = vec_at(f, k, m);
        rv[k] = fv[k] - vec_at(x, k, m);
      }
      p[2 * i] = dot_chunk(rv, rv, nv);
      p[2 * i + 1] = dot_chunk(fv, fv, nv);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    double a = 0.0, s = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
      a += p[2 * (b * nch + c)];
      s += p[2 * (b * nch + c) + 1];
    }
    sq[2 * b] = a;
    sq[2 * b + 1] = s;
  }
}

void pair_args(const Tensor& fz, const Tensor& z, const char* op) {
  same_dtype(z, fz, op, "z", "fz");
  shape_arg(z, fz.sizes(), op, "z", "fz's shape [B, D]");
}

std::tuple<Tensor, Tensor> residual_norms_cpu(const Tensor& fz_, const Tensor& z_) {
  const char* op = "residual_norms";
  const Tensor fz = float_arg(fz_, op, "fz", 2), z = float_arg(z_, op, "z", 2);
  pair_args(fz, z, op);
  const int64_t B = fz.size(0), D = fz.size(1);
  Tensor abs = new_output({B}, fz.options()), rel = new_output({B}, fz.options());
  AT_DISPATCH_FLOATING_TYPES(fz.scalar_type(), "residual_norms_cpu", [&] {
    Workspace<double> sq(size_t(2 * std::max<int64_t>(B, 1)));
    squared_norms(fz.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), B, D, sq.data());
    scalar_t* ap = abs.data_ptr<scalar_t>();
    scalar_t* rp = rel.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const double a = std::sqrt(sq.data()[2 * b]), s = std::sqrt(sq.data()[2 * b + 1]);
      ap[b] = static_cast<scalar_t>(a);
      rp[b] = static_cast<scalar_t>(a / (s + kRelEps));
    }
  });
  return {abs, rel};
}

// With r = fz - z, a = ||r||, s = ||fz||, den = s + 1e-9:
//   grad_fz = g_a r / a + g_s fz / s, grad_z = -g_a r / a
//   g_a = grad_abs + grad_rel / den, g_s = -grad_rel a / den^2
// where r / a (fz / s) is taken as 0 when a (s) is not > 0, NaN included, as the reference does.
std::tuple<Tensor, Tensor> residual_norms_bwd_cpu(const Tensor& fz_, const Tensor& z_, const Tensor& ga_,
                                                  const Tensor& gr_) {
  const char* op = "residual_norms_bwd";
  const Tensor fz = float_arg(fz_, op, "fz", 2), z = float_arg(z_, op, "z", 2);
  pair_args(fz, z, op);
  const int64_t B = fz.size(0), D = fz.size(1);
  const Tensor ga = float_arg(ga_, op, "grad_abs", 1), gr = float_arg(gr_, op, "grad_rel", 1);
  for (auto [t, name] : {std::pair{&ga, "grad_abs"}, std::pair{&gr, "grad_rel"}}) {
    same_dtype(*t, fz, op, name, "fz");
    shape_arg(*t, {B}, op, name, "[B]");
  }
  Tensor gfz = new_output({B, D}, fz.options()), gz = new_output({B, D}, fz.options());
  AT_DISPATCH_FLOATING_TYPES(fz.scalar_type(), "residual_norms_bwd_cpu", [&] {
    using T = scalar_t;
    const T *f = fz.data_ptr<T>(), *x = z.data_ptr<T>();
    const T *gap = ga.data_ptr<T>(), *grp = gr.data_ptr<T>();
    T *gf = gfz.data_ptr<T>(), *gx = gz.data_ptr<T>();
    Workspace<double> sq(size_t(4 * std::max<int64_t>(B, 1)));
    double* w = sq.data();
    squared_norms(f, x, B, D, w);
    // Per sample: a, s, g_a, g_s.
    Workspace<double> k4(size_t(4 * std::max<int64_t>(B, 1)));
    double* k = k4.data();
    for (int64_t b = 0; b < B; ++b) {
      const double a = std::sqrt(w[2 * b]), s = std::sqrt(w[2 * b + 1]), den = s + kRelEps;
      const double g_rel = static_cast<double>(grp[b]);
      k[4 * b] = a;
      k[4 * b + 1] = s;
      k[4 * b + 2] = static_cast<double>(gap[b]) + g_rel / den;
      k[4 * b + 3] = -g_rel * a / (den * den);
    }
    at::parallel_for(0, B * D, 16384, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const double* kb = k + 4 * (e / D);
        const double a = kb[0], s = kb[1];
        const double fv = static_cast<double>(f[e]), r = fv - static_cast<double>(x[e]);
        const double unit_r = a > 0 ? r / a : 0.0, unit_f = s > 0 ? fv / s : 0.0;
        const double g = kb[2] * unit_r;
        gf[e] = static_cast<T>(g + kb[3] * unit_f);
        gx[e] = static_cast<T>(-g);
      }
    });
  });
  return {gfz, gz};
}

// ---------------------------------------------------------------------------
// broyden_residual
// ---------------------------------------------------------------------------
// The loop's bookkeeping between f and the step, in one pass over the chunks of squared_norms:
// gx_new = active ? fx - x_new : gx, dx = x_new - x, dg = gx_new - gx (each rounded once to the
// dtype, as the tensor ops round it), and the norms of (fx, x_new) with residual_norms' bits.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> broyden_residual_cpu(const Tensor& fx_, const Tensor& xn_,
                                                                        const Tensor& x_, const Tensor& gx_,
                                                                        const Tensor& active_) {
  const char* op = "broyden_residual";
  const Tensor fx = float_arg(fx_, op, "fx", 2);
  const int64_t B = fx.size(0), D = fx.size(1);
  const Tensor xn = float_arg(xn_, op, "x_new", 2), x = float_arg(x_, op, "x", 2), g = float_arg(gx_, op, "gx", 2);
  for (auto [t, name] : {std::pair{&xn, "x_new"}, std::pair{&x, "x"}, std::pair{&g, "gx"}}) {
    same_dtype(*t, fx, op, name, "fx");
    shape_arg(*t, fx.sizes(), op, name, "fx's shape [B, D]");
  }
  check_cpu(active_, op, "active");
  TORCH_CHECK_VALUE(active_.scalar_type() == at::kBool, op, ": active must be bool, got ", active_.scalar_type());
  shape_arg(active_, {B}, op, "active", "[B]");
  const Tensor active = active_.contiguous();
  Tensor gn = new_output({B, D}, fx.options()), dx = new_output({B, D}, fx.options()),
         dg = new_output({B, D}, fx.options());
  Tensor abs = new_output({B}, fx.options()), rel = new_output({B}, fx.options());
  AT_DISPATCH_FLOATING_TYPES(fx.scalar_type(), "broyden_residual_cpu", [&] {
    using T = scalar_t;
    const T *f = fx.data_ptr<T>(), *xv = xn.data_ptr<T>(), *xo = x.data_ptr<T>(), *go = g.data_ptr<T>();
    const bool* act = active.data_ptr<bool>();
    T *gp = gn.data_ptr<T>(), *dxp = dx.data_ptr<T>(), *dgp = dg.data_ptr<T>();
    const int64_t nch = num_chunks(D), items = B * nch;
    Workspace<double> part(size_t(2 * std::max<int64_t>(items, 1)));
    double* p = part.data();
    at::parallel_for(0, items, wake_aware_grain(items, 4 * kChunk, std::max<int64_t>(1, 32768 / kChunk)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nch, d0 = (i % nch) * kChunk, m = std::min(kChunk, D - d0), o = b * D + d0;
        if (act[b]) {
          for (int64_t e = 0; e < m; ++e) {
            const T r = f[o + e] - xv[o + e];
            gp[o + e] = r;
            dxp[o + e] = xv[o + e] - xo[o + e];
            dgp[o + e] = r - go[o + e];
          }
        } else {
          for (int64_t e = 0; e < m; ++e) {
            gp[o + e] = go[o + e];
            dxp[o + e] = xv[o + e] - xo[o + e];
            dgp[o + e] = go[o + e] - go[o + e];  // 0, or NaN where gx is not finite, as the tensor ops give
          }
        }
        D8 fv[kChunkVecs], rv[kChunkVecs];
        const int nv = int((m + kLanes - 1) / kLanes);
        for (int k = 0; k < nv; ++k) {
          fv[k] = vec_at(f + o, k, m);
          rv[k] = fv[k] - vec_at(xv + o, k, m);
        }
        p[2 * i] = dot_chunk(rv, rv, nv);
        p[2 * i + 1] = dot_chunk(fv, fv, nv);
      }
    });
    T* ap = abs.data_ptr<T>();
    T* rp = rel.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      double a2 = 0.0, s2 = 0.0;
      for (int64_t c = 0; c < nch; ++c) {
        a2 += p[2 * (b * nch + c)];
        s2 += p[2 * (b * nch + c) + 1];
      }
      const double a = std::sqrt(a2), s = std::sqrt(s2);
      ap[b] = static_cast<T>(a);
      rp[b] = static_cast<T>(a / (s + kRelEps));
    }
  });
  return {gn, dx, dg, abs, rel};
}

}  // namespace
}  // namespace deq
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  using namespace frontiers_fast::deq;
  m.impl("broyden_step", &broyden_step_cpu);
  m.impl("residual_norms", &residual_norms_cpu);
  m.impl("residual_norms_bwd", &residual_norms_bwd_cpu);
  m.impl("broyden_residual", &broyden_residual_cpu);
}

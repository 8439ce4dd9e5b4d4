// The tile rasterizer of the splatting family for the CPU:
// frontiers_fast_native::rasterize_to_pixels and rasterize_to_pixels_bwd.
// Semantics and the float64 truth: frontiers_fast/reference/splat.py
// (rasterize_to_pixels, blend_blocks); schemas in frontiers_fast/ops/splat.py.
//
// Per pixel (centre (j + 0.5, i + 0.5)), walking its tile's depth-sorted list:
//   sigma = c dy^2 / 2 + a dx^2 / 2 + b dx dy          (skipped if < 0)
//   alpha = min(0.99, o exp(-sigma))                     (skipped if < 1/255)
//   stop before the Gaussian that would bring T to 1e-4 or below
//   out += colour alpha T;  T *= 1 - alpha
// and render = out + T background.  The forward also gives each pixel's final
// T and the index (into flatten_ids) of the last Gaussian it blended, -1 if
// none: the backward starts there.
//
// Forward.  Tiles are independent and dynamically scheduled.  A tile's list
// is first gathered into a small structure-of-arrays (L1-resident), with
// each Gaussian's alpha >= 1/255 box: |dx| <= sqrt(2 ln(255 o) Sigma_xx),
// |dy| <= sqrt(2 ln(255 o) Sigma_yy), Sigma = conic^-1 (a margin makes it
// conservative; outside it every pixel skips the Gaussian anyway, so testing
// it changes no pixel).  Then each vector of W pixels (W = 16 floats or 8
// doubles, a tile row at tile_size 16) walks the list with its colour in
// registers, skipping the Gaussians whose box misses its pixels, and leaves
// as soon as all its pixels have stopped.
//
// Backward, back to front from each pixel's last Gaussian:
//   T_k = T_{k+1} / (1 - alpha_k)                (T before Gaussian k)
//   dL/dcolour_k = alpha_k T_k g
//   dL/dalpha_k  = T_k g.(colour_k - S_k) - T_final gT / (1 - alpha_k)
//   S_{k-1} = alpha_k colour_k + (1 - alpha_k) S_k,    S = 0 behind the last
// with g = dL/drender, gT = g.background - dL/dalpha_render; then through
// alpha = o exp(-sigma) (nothing where the 0.99 clamp is active) to o, the
// conic and the mean.  Deterministic: the contributions of a tile's pixels
// to one intersection are summed in a fixed order (per lane, vectors in
// order, then the lanes), into a record per intersection; a second pass
// sums each Gaussian's records in intersection order (a stable counting
// sort of flatten_ids).  No atomics, nothing that depends on the threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "common/bucket_sort.h"
#include "common/checks.h"
#include "common/sched.h"
#include "common/simd.h"

namespace frontiers_fast {
namespace splat {
namespace {

using at::Tensor;

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.99;
constexpr double kTMin = 1e-4;
// The stop test is T (1 - alpha) <= 1e-4 (1 + 1e-9).  The slack decides the
// one tie real scenes hit often: two opaque Gaussians clamped at alpha 0.99
// give T = 0.01^2 = 1e-4 exactly, a stop -- in float64, 1 - 0.99 rounds up
// and the bare product lands 2e-20 above 1e-4.  The reference (log-space
// sums) and gsplat's float32 test both stop there; elsewhere a slack of
// 1e-9 is far below any other rounding in the blend.
constexpr double kTStop = kTMin * (1 + 1e-9);

// ---------------------------------------------------------------------------
// arguments
// ---------------------------------------------------------------------------
struct Args {
  Tensor means2d, conics, colors, opacities, backgrounds, offsets, fids;  // contiguous; backgrounds may be undefined
  // R rows of Gaussians: C * N ([C, N, ...] tables) or nnz (packed [nnz, ...] tables); C images (the offsets').
  int64_t C, R, D, W, H, ts, tw, th, M;
  bool packed;
};

Args check_args(const char* op, const Tensor& means2d, const Tensor& conics, const Tensor& colors,
                const Tensor& opacities, const std::optional<Tensor>& backgrounds, int64_t width, int64_t height,
                int64_t tile_size, const Tensor& offsets, const Tensor& fids) {
  check_cpu(means2d, op, "means2d");
  TORCH_CHECK(means2d.scalar_type() == at::kFloat || means2d.scalar_type() == at::kDouble, op,
              ": means2d must be float32 or float64, got ", means2d.scalar_type());
  TORCH_CHECK((means2d.dim() == 3 || means2d.dim() == 2) && means2d.size(-1) == 2, op,
              ": means2d must be [C, N, 2] (or packed [nnz, 2]), got shape ", means2d.sizes());
  const bool packed = means2d.dim() == 2;
  TORCH_CHECK(offsets.dim() == 3, op, ": isect_offsets must be [C, tile_height, tile_width], got shape ",
              offsets.sizes());
  const int64_t C = packed ? offsets.size(0) : means2d.size(0);
  // Row shape prefix: {C, N} or {nnz}.
  const std::vector<int64_t> rows = packed ? std::vector<int64_t>{means2d.size(0)}
                                           : std::vector<int64_t>{means2d.size(0), means2d.size(1)};
  const char* lead = packed ? "[nnz" : "[C, N";
  auto with = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> v = rows;
    v.insert(v.end(), tail);
    return v;
  };
  for (auto [t, name] : {std::pair{&conics, "conics"}, {&colors, "colors"}, {&opacities, "opacities"}}) {
    check_cpu(*t, op, name);
    same_dtype(*t, means2d, op, name, "means2d");
  }
  TORCH_CHECK(conics.sizes() == at::IntArrayRef(with({3})), op, ": conics must be ", lead, ", 3] = ",
              at::IntArrayRef(with({3})), ", got shape ", conics.sizes());
  TORCH_CHECK(colors.dim() == int64_t(rows.size()) + 1 && colors.sizes().slice(0, rows.size()) == at::IntArrayRef(rows),
              op, ": colors must be ", lead, ", D] = ", at::IntArrayRef(with({-1})), " (D any), got shape ",
              colors.sizes());
  TORCH_CHECK(opacities.sizes() == at::IntArrayRef(rows), op, ": opacities must be ", lead, "] = ",
              at::IntArrayRef(rows), ", got shape ", opacities.sizes());
  const int64_t D = colors.size(-1);
  const int64_t R = packed ? rows[0] : rows[0] * rows[1];
  Tensor bg;
  if (const Tensor* b = present(backgrounds)) {
    check_cpu(*b, op, "backgrounds");
    same_dtype(*b, means2d, op, "backgrounds", "means2d");
    TORCH_CHECK(b->sizes() == at::IntArrayRef({C, D}), op, ": backgrounds must be [C, D] = [", C, ", ", D,
                "], got shape ", b->sizes());
    bg = b->contiguous();
  }
  TORCH_CHECK_VALUE(width >= 1 && height >= 1, op, ": width and height must be >= 1, got ", width, " x ", height);
  TORCH_CHECK_VALUE(tile_size >= 1, op, ": tile_size must be >= 1, got ", tile_size);
  const int64_t tw = (width + tile_size - 1) / tile_size, th = (height + tile_size - 1) / tile_size;
  check_cpu(offsets, op, "isect_offsets");
  check_cpu(fids, op, "flatten_ids");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.sizes() == at::IntArrayRef({C, th, tw}), op,
              ": isect_offsets must be int32 [C, tile_height, tile_width] = [", C, ", ", th, ", ", tw, "], got ",
              offsets.scalar_type(), " ", offsets.sizes());
  TORCH_CHECK(fids.scalar_type() == at::kInt && fids.dim() == 1, op, ": flatten_ids must be int32 [M], got ",
              fids.scalar_type(), " ", fids.sizes());
  return {means2d.contiguous(), conics.contiguous(), colors.contiguous(), opacities.contiguous(), bg,
          offsets.contiguous(), fids.contiguous(), C, R, D, width, height, tile_size, tw, th, fids.numel(), packed};
}

// flatten_ids index the R rows (the forward's and the backward's check).
void check_ids(const char* op, const Args& a) {
  const int64_t CN = a.R;
  const char* what = a.packed ? "nnz" : "C * N";
  const char* rows = a.packed ? "packed rows" : "Gaussians";
  TORCH_CHECK_VALUE(a.M == 0 || CN > 0, op, ": flatten_ids must be empty when there are no Gaussians (", what,
                    " = 0), got ", a.M, " entries");
  if (a.M > 0) {
    const int32_t* f = a.fids.data_ptr<int32_t>();
    const auto mm = std::minmax_element(f, f + a.M);
    TORCH_CHECK_VALUE(*mm.first >= 0 && int64_t(*mm.second) < CN, op, ": flatten_ids must lie in [0, ", CN - 1,
                      "] (indices into the ", what, " = ", CN, " ", rows, "), got values in [", *mm.first, ", ",
                      *mm.second, "]");
  }
}

// The value checks of the reference entry (ops/splat.py, _check_blend_values),
// with its messages.
template <typename T>
void check_values(const char* op, const Args& a) {
  auto finite = [&](const Tensor& t, const char* name) {
    if (!t.defined()) return;
    const T* p = t.data_ptr<T>();
    std::atomic<bool> bad{false};
    at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      T s = 0;  // x * 0 is NaN exactly when x is NaN or inf
      for (int64_t i = b; i < e; ++i) s += p[i] * T(0);
      if (s != s) bad = true;
    });
    TORCH_CHECK_VALUE(!bad, op, ": ", name, " must be finite (it contains NaN or inf)");
  };
  finite(a.means2d, "means2d");
  finite(a.conics, "conics");
  finite(a.colors, "colors");
  finite(a.opacities, "opacities");
  finite(a.backgrounds, "backgrounds");
  const int64_t CN = a.R;
  if (CN > 0) {
    const T* o = a.opacities.data_ptr<T>();
    const auto mm = std::minmax_element(o, o + CN);
    if (!(*mm.first >= T(0) && *mm.second <= T(1))) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "opacities must lie in [0, 1], got values in [%g, %g]", double(*mm.first),
                    double(*mm.second));
      TORCH_CHECK_VALUE(false, op, ": ", buf);
    }
  }
  check_ids(op, a);
  const int64_t nt = a.C * a.tw * a.th;
  const int32_t* s = a.offsets.data_ptr<int32_t>();
  bool ok = nt == 0 || (s[0] >= 0 && int64_t(s[nt - 1]) <= a.M);
  for (int64_t i = 1; ok && i < nt; ++i) ok = s[i] >= s[i - 1];
  TORCH_CHECK_VALUE(ok, op,
                    ": isect_offsets must be non-decreasing (flattened over [C, tile_height, tile_width]) and lie in "
                    "[0, M] = [0, ",
                    a.M, "] (M = flatten_ids.numel()), as isect_offset_encode returns them");
}

// The inputs' data, as the forward and the backward read them.
template <typename T>
struct Data {
  const T *m2d, *con, *opa, *col, *bgs;  // bgs null without backgrounds
  const int32_t *off, *ids;
  explicit Data(const Args& a)
      : m2d(a.means2d.data_ptr<T>()),
        con(a.conics.data_ptr<T>()),
        opa(a.opacities.data_ptr<T>()),
        col(a.colors.data_ptr<T>()),
        bgs(a.backgrounds.defined() ? a.backgrounds.data_ptr<T>() : nullptr),
        off(a.offsets.data_ptr<int32_t>()),
        ids(a.fids.data_ptr<int32_t>()) {}
};

// ---------------------------------------------------------------------------
// one tile's Gaussians, gathered
// ---------------------------------------------------------------------------
template <typename T>
struct TileList {
  int64_t n = 0;
  std::vector<T> mx, my, ha, b, hc, a, c, o, x0, x1, y0, y1, col;  // col: [n, D]

  void gather(const Args& a_, const Data<T>& in, int64_t s, int64_t e) {
    const T *m2d = in.m2d, *con = in.con, *opa = in.opa, *colr = in.col;
    const int32_t* ids = in.ids;
    const int64_t D = a_.D;
    n = e - s;
    for (auto* v : {&mx, &my, &ha, &b, &hc, &a, &c, &o, &x0, &x1, &y0, &y1})
      if (int64_t(v->size()) < n) v->resize(n);
    if (int64_t(col.size()) < n * D) col.resize(n * D);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t g = ids[s + k];
      const T ga = con[g * 3], gb = con[g * 3 + 1], gc = con[g * 3 + 2], go = opa[g];
      mx[k] = m2d[g * 2];
      my[k] = m2d[g * 2 + 1];
      a[k] = ga, b[k] = gb, c[k] = gc, o[k] = go;
      ha[k] = T(0.5) * ga;
      hc[k] = T(0.5) * gc;
      for (int64_t d = 0; d < D; ++d) col[k * D + d] = colr[g * D + d];
      // The alpha >= 1/255 box, in double with a margin; a conic that is not
      // positive definite gets an unbounded box, an opacity under 1/255 an empty one.
      const double inf = std::numeric_limits<double>::infinity();
      double hx = inf, hy = inf;
      if (double(go) < kAlphaMin) {
        hx = hy = -inf;
      } else {
        const double da = ga, db = gb, dc = gc, det = da * dc - db * db;
        if (da > 0 && det > 0) {
          const double two_l = 2.0 * std::max(std::log(255.0 * double(go)), 0.0);
          hx = std::sqrt(two_l * dc / det) * (1 + 1e-5) + 1e-3;
          hy = std::sqrt(two_l * da / det) * (1 + 1e-5) + 1e-3;
        }
      }
      x0[k] = T(double(mx[k]) - hx), x1[k] = T(double(mx[k]) + hx);
      y0[k] = T(double(my[k]) - hy), y1[k] = T(double(my[k]) + hy);
    }
  }
};

// The pixels of a tile in vectors of W: lane coordinates and the bounds of each vector.
template <typename T>
struct TilePixels {
  static constexpr int W = Simd<T>::W;
  int64_t nv = 0;
  std::vector<T> px, py;                // [nv * W] pixel centres
  std::vector<int64_t> pix;             // [nv * W] y * width + x, -1 outside the image
  std::vector<T> vx0, vx1, vy0, vy1;    // [nv] bounds of the vector's pixel centres

  void setup(int64_t ts, int64_t tx, int64_t ty, int64_t width, int64_t height) {
    const int64_t P = ts * ts;
    nv = (P + W - 1) / W;
    px.assign(nv * W, T(0));
    py.assign(nv * W, T(0));
    pix.assign(nv * W, -1);
    vx0.resize(nv), vx1.resize(nv), vy0.resize(nv), vy1.resize(nv);
    for (int64_t v = 0; v < nv; ++v) {
      T lx = std::numeric_limits<T>::infinity(), hx = -lx, ly = lx, hy = -lx;
      for (int l = 0; l < W; ++l) {
        const int64_t p = v * W + l;
        if (p >= P) continue;
        const int64_t x = tx * ts + p % ts, y = ty * ts + p / ts;
        px[p] = T(x) + T(0.5);
        py[p] = T(y) + T(0.5);
        if (x < width && y < height) pix[p] = y * width + x;
        lx = std::min(lx, px[p]), hx = std::max(hx, px[p]);
        ly = std::min(ly, py[p]), hy = std::max(hy, py[p]);
      }
      vx0[v] = lx, vx1[v] = hx, vy0[v] = ly, vy1[v] = hy;
    }
  }
};

template <typename T>
inline bool box_misses(const TileList<T>& L, int64_t k, const TilePixels<T>& P, int64_t v) {
  return L.y1[k] < P.vy0[v] || L.y0[k] > P.vy1[v] || L.x1[k] < P.vx0[v] || L.x0[k] > P.vx1[v];
}

// sigma, alpha before the clamp (o e^-sigma) and the lanes that blend it, for
// Gaussian k at the lanes' pixels (the reference's order of operations).
template <typename T>
struct Eval {
  VecT<T> dx, dy, sigma, e, raw, alpha;
  IdxT<T> used;
};

template <typename T>
inline Eval<T> eval(const TileList<T>& L, int64_t k, VecT<T> px, VecT<T> py) {
  using V = VecT<T>;
  Eval<T> r;
  r.dx = px - bcast(L.mx[k]);
  r.dy = py - bcast(L.my[k]);
  const V sx = bcast(L.ha[k]) * r.dx * r.dx;
  const V sy = bcast(L.hc[k]) * r.dy * r.dy;
  r.sigma = (sy + sx) + (bcast(L.b[k]) * r.dy) * r.dx;
  const IdxT<T> pos = r.sigma >= V{};
  r.e = vexp(-(pos ? r.sigma : V{}));
  r.raw = bcast(L.o[k]) * r.e;
  r.alpha = r.raw < bcast(T(kAlphaMax)) ? r.raw : bcast(T(kAlphaMax));
  r.used = pos & (r.alpha >= bcast(T(kAlphaMin)));
  return r;
}

template <typename T>
inline bool none(IdxT<T> m) {
  IdxT<T> z{};
  return std::memcmp(&m, &z, sizeof m) == 0;
}

// ---------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------
// DC: the channel count when it is a small constant, 0 for any D (colours
// accumulated in memory).
template <typename T, int DC>
void blend_tile(const Args& a, const TileList<T>& L, const TilePixels<T>& P, int64_t s, const T* bg, T* out,
                T* final_t, T* alphas, int32_t* last_ids, std::vector<VecT<T>>& acc_mem) {
  using V = VecT<T>;
  using I = IdxT<T>;
  constexpr int W = Simd<T>::W;
  const int64_t D = DC > 0 ? DC : a.D;
  V acc_reg[DC > 0 ? DC : 1];
  if (DC == 0 && int64_t(acc_mem.size()) < D) acc_mem.resize(D);
  V* acc = DC > 0 ? acc_reg : acc_mem.data();
  for (int64_t v = 0; v < P.nv; ++v) {
    const V px = loadu<V>(&P.px[v * W]), py = loadu<V>(&P.py[v * W]);
    I live{};
    for (int l = 0; l < W; ++l) live[l] = P.pix[v * W + l] >= 0 ? -1 : 0;
    V t = bcast(T(1));
    I last = I{} - 1;
    for (int64_t d = 0; d < D; ++d) acc[d] = V{};
    if (!none<T>(live)) {
      for (int64_t k = 0; k < L.n; ++k) {
        if (box_misses(L, k, P, v)) continue;
        const Eval<T> r = eval(L, k, px, py);
        const I use = r.used & live;
        if (none<T>(use)) continue;
        const V tn = t * (bcast(T(1)) - r.alpha);
        const I stop = use & (tn <= bcast(T(kTStop)));
        const I take = use & ~stop;
        const V w = take ? r.alpha * t : V{};
        const T* ck = &L.col[k * D];
        for (int64_t d = 0; d < D; ++d) acc[d] = fmadd(w, bcast(ck[d]), acc[d]);
        t = take ? tn : t;
        last = take ? I{} + typename Simd<T>::Lane(s + k) : last;
        live &= ~stop;
        if (none<T>(live)) break;
      }
    }
    for (int l = 0; l < W; ++l) {
      const int64_t p = P.pix[v * W + l];
      if (p < 0) continue;
      for (int64_t d = 0; d < D; ++d) out[p * a.D + d] = acc[d][l] + (bg ? t[l] * bg[d] : T(0));
      final_t[p] = t[l];
      alphas[p] = T(1) - t[l];
      last_ids[p] = int32_t(last[l]);
    }
  }
}

template <typename T, int DC>
void forward_impl(const Args& a, Tensor& out, Tensor& final_t, Tensor& alphas, Tensor& last_ids) {
  const Data<T> in(a);
  const T* bgs = in.bgs;
  const int32_t* off = in.off;
  const int64_t per_cam = a.tw * a.th, n_tiles = a.C * per_cam, HW = a.H * a.W;
  T* o = out.data_ptr<T>();
  T* ft = final_t.data_ptr<T>();
  T* al = alphas.data_ptr<T>();
  int32_t* li = last_ids.data_ptr<int32_t>();
  for_each_chunk(n_tiles, [&](int64_t tile) {
    // Scratch of the thread running the tile, kept for its next tiles.
    thread_local TileList<T> L;
    thread_local TilePixels<T> P;
    thread_local std::vector<VecT<T>> acc;
    const int64_t cam = tile / per_cam, local = tile % per_cam;
    const int64_t s = off[tile], e = tile + 1 < n_tiles ? off[tile + 1] : a.M;
    L.gather(a, in, s, e);
    P.setup(a.ts, local % a.tw, local / a.tw, a.W, a.H);
    blend_tile<T, DC>(a, L, P, s, bgs ? bgs + cam * a.D : nullptr, o + cam * HW * a.D, ft + cam * HW,
                      al + cam * HW, li + cam * HW, acc);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rasterize_to_pixels_cpu(
    const Tensor& means2d, const Tensor& conics, const Tensor& colors, const Tensor& opacities,
    const std::optional<Tensor>& backgrounds, int64_t width, int64_t height, int64_t tile_size,
    const Tensor& isect_offsets, const Tensor& flatten_ids, bool /*absgrad: the backward's*/) {
  const char* op = "rasterize_to_pixels";
  const Args a = check_args(op, means2d, conics, colors, opacities, backgrounds, width, height, tile_size,
                            isect_offsets, flatten_ids);
  const auto opts = a.means2d.options();
  Tensor out = new_output({a.C, a.H, a.W, a.D}, opts);
  Tensor alphas = new_output({a.C, a.H, a.W, 1}, opts);
  Tensor final_t = new_output({a.C, a.H, a.W}, opts);
  Tensor last = new_output({a.C, a.H, a.W}, opts.dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(a.means2d.scalar_type(), "rasterize_to_pixels", [&] {
    using T = scalar_t;
    check_values<T>(op, a);
    switch (a.D) {
      case 1: forward_impl<T, 1>(a, out, final_t, alphas, last); break;
      case 2: forward_impl<T, 2>(a, out, final_t, alphas, last); break;
      case 3: forward_impl<T, 3>(a, out, final_t, alphas, last); break;
      case 4: forward_impl<T, 4>(a, out, final_t, alphas, last); break;
      default: forward_impl<T, 0>(a, out, final_t, alphas, last);
    }
  });
  return {out, alphas, final_t, last};
}

// ---------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------
// Per-tile state of each pixel vector, and the per-intersection records
// [M, R]: mean (2), conic (3), opacity, colour (D), and with absgrad the
// sums of |d/dmean| over the pixels (2), the densification signal.
template <typename T>
struct BwdState {
  std::vector<VecT<T>> t, tf, gt, g, buf;  // [nv], [nv], [nv], [nv * D], [nv * D]
  std::vector<IdxT<T>> last;               // [nv]
};

template <typename T, int DC, bool ABS>
void backward_tile(const Args& a, const TileList<T>& L, const TilePixels<T>& P, BwdState<T>& S, int64_t s,
                   const T* bg, const T* g_out, const T* g_alpha, const T* final_t, const int32_t* last_ids,
                   T* rec, T* bg_acc) {
  using V = VecT<T>;
  using I = IdxT<T>;
  using Lane = typename Simd<T>::Lane;
  constexpr int W = Simd<T>::W;
  const int64_t D = DC > 0 ? DC : a.D, R = 6 + D + (ABS ? 2 : 0), nv = P.nv;
  S.t.resize(nv), S.tf.resize(nv), S.gt.resize(nv), S.last.resize(nv);
  S.g.resize(nv * D), S.buf.resize(nv * D);
  int64_t kmax = -1;
  for (int64_t d = 0; d < D; ++d) bg_acc[d] = T(0);
  for (int64_t v = 0; v < nv; ++v) {
    V t{}, gt{};
    I last = I{} - 1;
    for (int64_t d = 0; d < D; ++d) S.g[v * D + d] = V{}, S.buf[v * D + d] = V{};
    for (int l = 0; l < W; ++l) {
      const int64_t p = P.pix[v * W + l];
      if (p < 0) continue;
      t[l] = final_t[p];
      last[l] = last_ids[p];
      kmax = std::max<int64_t>(kmax, last_ids[p]);
      T dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        S.g[v * D + d][l] = g_out[p * a.D + d];
        if (bg) dot += g_out[p * a.D + d] * bg[d];
      }
      gt[l] = dot - g_alpha[p];
    }
    if (bg)
      for (int64_t d = 0; d < D; ++d) {
        T sum = 0;
        for (int l = 0; l < W; ++l) sum += t[l] * S.g[v * D + d][l];  // padding lanes have t = 0
        bg_acc[d] += sum;
      }
    S.t[v] = t, S.tf[v] = t, S.gt[v] = gt, S.last[v] = last;
  }
  for (int64_t k = 0; k < L.n; ++k)
    for (int64_t j = 0; j < R; ++j) rec[k * R + j] = T(0);
  V gcol_reg[DC > 0 ? DC : 1];
  std::vector<V> gcol_mem(DC > 0 ? 0 : D);
  V* gcol = DC > 0 ? gcol_reg : gcol_mem.data();
  for (int64_t k = kmax - s; k >= 0; --k) {
    const Lane kg = Lane(s + k);
    V gmx{}, gmy{}, ga{}, gb{}, gc{}, go{}, amx{}, amy{};
    for (int64_t d = 0; d < D; ++d) gcol[d] = V{};
    bool any = false;
    const T* ck = &L.col[k * D];
    for (int64_t v = 0; v < nv; ++v) {
      if (box_misses(L, k, P, v)) continue;
      const I mine = S.last[v] >= kg;  // padding lanes have last = -1
      if (none<T>(mine)) continue;
      const Eval<T> r = eval(L, k, loadu<V>(&P.px[v * W]), loadu<V>(&P.py[v * W]));
      const I use = r.used & mine;
      if (none<T>(use)) continue;
      any = true;
      const V one_m = bcast(T(1)) - r.alpha;
      const V tb = use ? S.t[v] / one_m : V{};
      const V w = r.alpha * tb;
      V dot{};
      V* g = &S.g[v * D];
      V* buf = &S.buf[v * D];
      for (int64_t d = 0; d < D; ++d) {
        gcol[d] += w * g[d];
        dot += g[d] * (bcast(ck[d]) - buf[d]);
        buf[d] = use ? r.alpha * bcast(ck[d]) + one_m * buf[d] : buf[d];
      }
      S.t[v] = use ? tb : S.t[v];
      const V d_alpha = tb * dot - S.tf[v] * S.gt[v] / one_m;
      const I open = use & (r.raw <= bcast(T(kAlphaMax)));  // the 0.99 clamp passes no gradient
      const V d_raw = open ? d_alpha : V{};
      go += d_raw * r.e;
      const V d_sig = -(d_raw * r.raw);
      ga += d_sig * (bcast(T(0.5)) * r.dx * r.dx);
      gb += d_sig * (r.dx * r.dy);
      gc += d_sig * (bcast(T(0.5)) * r.dy * r.dy);
      const V pmx = -(d_sig * (bcast(L.a[k]) * r.dx + bcast(L.b[k]) * r.dy));
      const V pmy = -(d_sig * (bcast(L.c[k]) * r.dy + bcast(L.b[k]) * r.dx));
      gmx += pmx;
      gmy += pmy;
      if constexpr (ABS) {
        amx += pmx < V{} ? -pmx : pmx;
        amy += pmy < V{} ? -pmy : pmy;
      }
    }
    if (!any) continue;
    auto hsum = [](V x) {
      T sum = 0;
      for (int l = 0; l < W; ++l) sum += x[l];
      return sum;
    };
    T* rk = rec + k * R;
    rk[0] = hsum(gmx), rk[1] = hsum(gmy), rk[2] = hsum(ga), rk[3] = hsum(gb), rk[4] = hsum(gc), rk[5] = hsum(go);
    for (int64_t d = 0; d < D; ++d) rk[6 + d] = hsum(gcol[d]);
    if constexpr (ABS) rk[6 + D] = hsum(amx), rk[7 + D] = hsum(amy);
  }
}

template <typename T, int DC, bool ABS>
void backward_impl(const Args& a, const Tensor& final_t_, const Tensor& last_, const Tensor& g_out_,
                   const Tensor& g_alpha_, Tensor& gm, Tensor& gcon, Tensor& gcol, Tensor& gop, Tensor& gbg,
                   Tensor& gabs) {
  const Data<T> in(a);
  const T* bgs = in.bgs;
  const int32_t *off = in.off, *ids = in.ids;
  const T* ft = final_t_.data_ptr<T>();
  const int32_t* li = last_.data_ptr<int32_t>();
  const T* go = g_out_.data_ptr<T>();
  const T* ga = g_alpha_.data_ptr<T>();
  const int64_t per_cam = a.tw * a.th, n_tiles = a.C * per_cam, HW = a.H * a.W, D = a.D;
  const int64_t R = 6 + D + (ABS ? 2 : 0), CN = a.R;
  std::vector<T> rec(std::max<int64_t>(a.M, 1) * R);
  std::vector<T> tile_bg(std::max<int64_t>(n_tiles, 1) * D);
  for_each_chunk(n_tiles, [&](int64_t tile) {
    thread_local TileList<T> L;
    thread_local TilePixels<T> P;
    thread_local BwdState<T> S;
    const int64_t cam = tile / per_cam, local = tile % per_cam;
    const int64_t s = off[tile], e = tile + 1 < n_tiles ? off[tile + 1] : a.M;
    P.setup(a.ts, local % a.tw, local / a.tw, a.W, a.H);
    // Each pixel's last Gaussian lies in its tile's run (it came from the forward).
    for (int64_t p : P.pix) {
      if (p < 0) continue;
      const int64_t l = li[cam * HW + p];
      TORCH_CHECK_VALUE(l == -1 || (l >= s && l < e), "rasterize_to_pixels_bwd: last_ids must be -1 or an index "
                        "into its tile's run of flatten_ids, as the forward returns them; got ", l,
                        " for a tile whose run is [", s, ", ", e, ")");
    }
    L.gather(a, in, s, e);
    backward_tile<T, DC, ABS>(a, L, P, S, s, bgs ? bgs + cam * D : nullptr, go + cam * HW * D, ga + cam * HW,
                         ft + cam * HW, li + cam * HW, rec.data() + s * R, tile_bg.data() + tile * D);
  });
  // Each Gaussian's records, in intersection order.
  std::vector<int64_t> ptr(CN + 1), perm(std::max<int64_t>(a.M, 1));
  bucket_sort(ids, a.M, CN, ptr.data(), perm.data());
  T* pm = gm.data_ptr<T>();
  T* pc = gcon.data_ptr<T>();
  T* pcol = gcol.data_ptr<T>();
  T* po = gop.data_ptr<T>();
  T* pa = ABS ? gabs.data_ptr<T>() : nullptr;
  at::parallel_for(0, CN, 4096, [&](int64_t g0, int64_t g1) {
    std::vector<T> sum(R);
    for (int64_t g = g0; g < g1; ++g) {
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t j = ptr[g]; j < ptr[g + 1]; ++j) {
        const T* r = &rec[perm[j] * R];
        for (int64_t q = 0; q < R; ++q) sum[q] += r[q];
      }
      pm[g * 2] = sum[0], pm[g * 2 + 1] = sum[1];
      pc[g * 3] = sum[2], pc[g * 3 + 1] = sum[3], pc[g * 3 + 2] = sum[4];
      po[g] = sum[5];
      for (int64_t d = 0; d < D; ++d) pcol[g * D + d] = sum[6 + d];
      if (ABS) pa[g * 2] = sum[6 + D], pa[g * 2 + 1] = sum[7 + D];
    }
  });
  if (bgs) {
    T* pb = gbg.data_ptr<T>();
    for (int64_t c = 0; c < a.C; ++c)
      for (int64_t d = 0; d < D; ++d) {
        T sum = 0;
        for (int64_t t = 0; t < per_cam; ++t) sum += tile_bg[(c * per_cam + t) * D + d];
        pb[c * D + d] = sum;
      }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rasterize_to_pixels_bwd_cpu(
    const Tensor& means2d, const Tensor& conics, const Tensor& colors, const Tensor& opacities,
    const std::optional<Tensor>& backgrounds, int64_t width, int64_t height, int64_t tile_size,
    const Tensor& isect_offsets, const Tensor& flatten_ids, bool absgrad, const Tensor& final_ts,
    const Tensor& last_ids, const Tensor& grad_colors, const Tensor& grad_alphas) {
  const char* op = "rasterize_to_pixels_bwd";
  const Args a = check_args(op, means2d, conics, colors, opacities, backgrounds, width, height, tile_size,
                            isect_offsets, flatten_ids);
  const std::vector<int64_t> img = {a.C, a.H, a.W};
  for (auto [t, name, shape] : {std::tuple{&final_ts, "final_ts", img},
                                {&grad_colors, "grad_colors", std::vector<int64_t>{a.C, a.H, a.W, a.D}},
                                {&grad_alphas, "grad_alphas", std::vector<int64_t>{a.C, a.H, a.W, 1}}}) {
    check_cpu(*t, op, name);
    same_dtype(*t, means2d, op, name, "means2d");
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), op, ": ", name, " must be ", at::IntArrayRef(shape),
                ", got ", t->sizes());
  }
  check_cpu(last_ids, op, "last_ids");
  TORCH_CHECK(last_ids.scalar_type() == at::kInt && last_ids.sizes() == at::IntArrayRef(img), op,
              ": last_ids must be int32 ", at::IntArrayRef(img), ", got ", last_ids.scalar_type(), " ",
              last_ids.sizes());
  check_ids(op, a);
  const auto opts = a.means2d.options();
  // Gradients in the inputs' own shapes ([C, N, ...] or packed [nnz, ...]).
  Tensor gm = new_output(means2d.sizes(), opts), gcon = new_output(conics.sizes(), opts);
  Tensor gcol = new_output(colors.sizes(), opts), gop = new_output(opacities.sizes(), opts);
  Tensor gbg = a.backgrounds.defined() ? new_output({a.C, a.D}, opts) : at::empty({0}, opts);
  Tensor gabs = absgrad ? new_output(means2d.sizes(), opts) : at::empty({0}, opts);
  const Tensor ft = final_ts.contiguous(), li = last_ids.contiguous(), g_out = grad_colors.contiguous(),
               g_al = grad_alphas.contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.means2d.scalar_type(), "rasterize_to_pixels_bwd", [&] {
    using T = scalar_t;
    auto run = [&](auto abs) {
      constexpr bool ABS = decltype(abs)::value;
      switch (a.D) {
        case 1: backward_impl<T, 1, ABS>(a, ft, li, g_out, g_al, gm, gcon, gcol, gop, gbg, gabs); break;
        case 2: backward_impl<T, 2, ABS>(a, ft, li, g_out, g_al, gm, gcon, gcol, gop, gbg, gabs); break;
        case 3: backward_impl<T, 3, ABS>(a, ft, li, g_out, g_al, gm, gcon, gcol, gop, gbg, gabs); break;
        case 4: backward_impl<T, 4, ABS>(a, ft, li, g_out, g_al, gm, gcon, gcol, gop, gbg, gabs); break;
        default: backward_impl<T, 0, ABS>(a, ft, li, g_out, g_al, gm, gcon, gcol, gop, gbg, gabs);
      }
    };
    if (absgrad)
      run(std::true_type{});
    else
      run(std::false_type{});
  });
  return {gm, gcon, gcol, gop, gbg, gabs};
}

}  // namespace

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  m.impl("rasterize_to_pixels", &rasterize_to_pixels_cpu);
  m.impl("rasterize_to_pixels_bwd", &rasterize_to_pixels_bwd_cpu);
}

}  // namespace splat
}  // namespace frontiers_fast

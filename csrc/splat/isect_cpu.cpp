// Tile intersection of the splatting family for the CPU:
// frontiers_fast_native::isect_tiles and isect_offset_encode.
// Semantics: frontiers_fast/reference/splat.py (isect_tiles, tile_touched,
// exact_conics, ln_upper, check_isect_count, isect_offset_encode); schemas
// and the value checks (_check_isect_values, _check_isect_ids) in
// frontiers_fast/ops/splat.py.  Every ValueError of the reference entries is
// raised here with the same message, in the same order.
//
// isect_tiles, over the flattened [C * N] Gaussians:
// 0. the value checks (one parallel pass);
// 1. count (parallel): each Gaussian's bounding box of tiles and, with conics
//    and opacities, how many of them the exact test keeps;
// 2. an exclusive prefix sum gives each Gaussian its place; M is checked
//    (int32 indices, max_intersections, memory) before anything of size M
//    exists;
// 3. fill (parallel): Gaussian g writes its keys camera | tile | float32
//    depth bits at its place, box row-major, which is the reference's order
//    before its sort;
// 4. a stable LSD radix sort of the (key, Gaussian) pairs on the 32 +
//    tile_bits + cam_bits significant bits.  Each pass: per-chunk digit
//    histograms, offsets in (digit, chunk) order, a scatter that keeps each
//    chunk's order.  A stable sort has one result, so it equals the
//    reference's torch.sort(stable=True) bit for bit, for any thread count.
//
// The exact test must decide every tile as the reference does: it is float64
// in the reference's operation order, and compiled without FMA contraction
// (GCC's default -ffp-contract=fast would fuse a * b + c into one rounding
// under -march=native).  Those functions carry the attribute and are not
// inlined (GCC may inline across a contraction mismatch and then contract
// with the caller's setting); each handles a whole Gaussian, so the call
// costs nothing measurable.
//
// isect_offset_encode: the value checks, then one parallel pass over the
// sorted keys: key i writes i to every (camera, tile) slot in (linear key of
// i - 1, linear key of i], and the slots past the last key get M.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"

#if defined(__clang__)
#define FF_STRICT_FP __attribute__((noinline))
#define FF_NO_CONTRACT _Pragma("clang fp contract(off)")
#else
#define FF_STRICT_FP __attribute__((noinline, optimize("fp-contract=off")))
#define FF_NO_CONTRACT
#endif

namespace frontiers_fast {
namespace splat {
namespace {

using at::Tensor;

constexpr int64_t kInt32Limit = int64_t(1) << 31;  // reference INT32_LIMIT
// reference EXACT_REL_MARGIN, EXACT_ABS_MARGIN, LN2, LN_FLOOR
constexpr double kRelMargin = 1e-5;
constexpr double kAbsMargin = 1e-3;
constexpr double kLn2 = 0.6931471805599453;
constexpr double kLnFloor = 0x1p-20;
constexpr int64_t kGrain = 1024;

inline int bits_for_count(int64_t count) { return count > 1 ? 64 - __builtin_clzll(uint64_t(count - 1)) : 0; }

// ---------------------------------------------------------------------------
// the exact test (reference: ln_upper, exact_conics, tile_touched)
// ---------------------------------------------------------------------------
struct Exact {
  double mx, my, ap, b, cp, thr;
  bool pd;
};

FF_STRICT_FP double ln_upper(double x) {
  FF_NO_CONTRACT
  int e = 0;
  const double m = __builtin_frexp(x < kLnFloor ? kLnFloor : x, &e);
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double p = 1.0 / 15;
  for (int k = 13; k >= 1; k -= 2) p = p * s2 + 1.0 / double(k);
  return double(e) * kLn2 + 2.0 * s * p;
}

FF_STRICT_FP Exact exact_conic(double mx, double my, double a, double b, double c, double o) {
  FF_NO_CONTRACT
  Exact g;
  g.mx = mx, g.my = my, g.b = b;
  const double ab = __builtin_fabs(b);
  g.ap = a - kRelMargin * (__builtin_fabs(a) + ab);
  g.cp = c - kRelMargin * (__builtin_fabs(c) + ab);
  g.pd = (g.ap > 0) && (g.ap * g.cp - b * b > 0);
  g.thr = ln_upper(255.0 * o) + kAbsMargin;
  return g;
}

// Tiles [x0, x1) x [y0, y1) of one box, row-major, that the test keeps;
// their indices y * tile_width + x go to `tiles` when it is given.
FF_STRICT_FP int64_t exact_tiles(const Exact& g, int64_t x0, int64_t x1, int64_t y0, int64_t y1, int64_t ts,
                                 int64_t tile_width, int64_t* tiles) {
  FF_NO_CONTRACT
  int64_t n = 0;
  const double ap = g.ap, b = g.b, cp = g.cp, thr = g.thr;
  const double ext = double(ts - 1);
  for (int64_t ty = y0; ty < y1; ++ty) {
    const double py = double(ty * ts) + 0.5;
    const double dy0 = py - g.my, dy1 = (py + ext) - g.my;
    for (int64_t tx = x0; tx < x1; ++tx) {
      bool keep = !g.pd;
      if (!keep) {
        const double px = double(tx * ts) + 0.5;
        const double dx0 = px - g.mx, dx1 = (px + ext) - g.mx;
        const bool inside = (dx0 <= 0) && (dx1 >= 0) && (dy0 <= 0) && (dy1 >= 0);
        bool far = !inside || (thr < 0);
        const double X[2] = {dx0, dx1}, Y[2] = {dy0, dy1};
        for (int k = 0; k < 2 && far; ++k) {
          double y = -(b * X[k]) / cp;
          y = y < dy0 ? dy0 : (y > dy1 ? dy1 : y);
          const double q = 0.5 * (ap * X[k] * X[k] + cp * y * y) + b * X[k] * y;
          far = q > thr;
        }
        for (int k = 0; k < 2 && far; ++k) {
          double x = -(b * Y[k]) / ap;
          x = x < dx0 ? dx0 : (x > dx1 ? dx1 : x);
          const double q = 0.5 * (ap * x * x + cp * Y[k] * Y[k]) + b * x * Y[k];
          far = q > thr;
        }
        keep = !far;
      }
      if (keep) {
        if (tiles) tiles[n] = ty * tile_width + tx;
        ++n;
      }
    }
  }
  return n;
}

// The box [lo, hi) of tiles on one axis, clamped to [0, grid] in float64 as the reference does.
inline void box_axis(double m, double r, int64_t grid, int64_t* lo, int64_t* hi) {
  const double g = double(grid);
  double l = std::floor(m - r), h = std::ceil(m + r);
  l = l < 0 ? 0.0 : (l > g ? g : l);
  h = h < 0 ? 0.0 : (h > g ? g : h);
  *lo = int64_t(l), *hi = int64_t(h);
}

// ---------------------------------------------------------------------------
// messages of the reference (Python formats, restated)
// ---------------------------------------------------------------------------
std::string fmt_g(double v) {  // Python's f"{v:g}"
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string fmt_gib(double v) {  // Python's f"{v:,.1f}"
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.1f", v);
  std::string s(buf);
  size_t start = s[0] == '-' ? 1 : 0, dot = s.find('.');
  for (size_t i = dot; i > start + 3; i -= 3) s.insert(i - 3, ",");
  return s;
}

// reference check_isect_sizes
// (packed: N is the number of rows, which the int32 flatten_ids index)
void check_sizes(int64_t C, int64_t N, int64_t n_tiles, bool packed) {
  const int cam_bits = bits_for_count(C), tile_bits = bits_for_count(n_tiles);
  TORCH_CHECK_VALUE(cam_bits + tile_bits <= 31, "means2d has ", C, " cameras and tile_width x tile_height is ",
                    n_tiles, " tiles: ", cam_bits, " + ", tile_bits,
                    " bits do not fit in the 31 bits of the intersection keys above the depth; render fewer "
                    "cameras per call or use a larger tile_size");
  if (packed) {
    TORCH_CHECK_VALUE(N <= kInt32Limit, "means2d has ", N,
                      " packed rows, more than the int32 flatten_ids can index (2^31); render fewer cameras per call");
  } else {
    TORCH_CHECK_VALUE(C * N <= kInt32Limit, "means2d has C * N = ", C, " x ", N, " = ", C * N,
                      " (camera, Gaussian) pairs, more than the int32 flatten_ids can index (2^31); render fewer "
                      "cameras per call");
  }
}

// reference check_isect_count (check_memory: the CPU's physical memory, as _checks.memory_bytes reads it)
void check_count(int64_t M, std::optional<int64_t> max_intersections) {
  TORCH_CHECK_VALUE(M < kInt32Limit, "the Gaussians cover M = ", M,
                    " (Gaussian, tile) pairs, more than the int32 isect_offsets can index (2^31 - 1); use a larger "
                    "tile_size or fewer Gaussians per call");
  if (max_intersections.has_value())
    TORCH_CHECK_VALUE(M <= *max_intersections, "the Gaussians cover M = ", M,
                      " (Gaussian, tile) pairs, more than max_intersections = ", *max_intersections,
                      "; raise max_intersections, use a larger tile_size or fewer Gaussians per call");
  const long page = sysconf(_SC_PAGE_SIZE), pages = sysconf(_SC_PHYS_PAGES);
  if (page <= 0 || pages <= 0) return;  // unknown, as memory_bytes' None
  const int64_t total = int64_t(page) * int64_t(pages), nbytes = 12 * M;
  TORCH_CHECK_VALUE(nbytes <= total, "the tile intersection list (M = ", M,
                    " (Gaussian, tile) pairs) is too large: it needs ", fmt_gib(double(nbytes) / double(1 << 30)),
                    " GiB for its buffers, more than the ", fmt_gib(double(total) / double(1 << 30)),
                    " GiB of memory on cpu");
}

// The smallest i in [0, n) with pred(i), or -1; deterministic for any thread count.
template <typename Pred>
int64_t first_index(int64_t n, const Pred& pred) {
  std::atomic<int64_t> best{n};
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e && i < best.load(std::memory_order_relaxed); ++i)
      if (pred(i)) {
        int64_t cur = best.load();
        while (i < cur && !best.compare_exchange_weak(cur, i)) {
        }
        return;
      }
  });
  return best.load() == n ? -1 : best.load();
}

// ---------------------------------------------------------------------------
// stable LSD radix sort of (key, id) pairs on the low `bits` bits of the keys
// ---------------------------------------------------------------------------
void radix_sort(uint64_t* keys, int32_t* ids, int64_t n, int bits) {
  if (n <= 1 || bits <= 0) return;
  const int passes = (bits + 10) / 11;
  const int digit = (bits + passes - 1) / passes;
  const int64_t R = int64_t(1) << digit;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / (1 << 16)));
  Workspace<uint64_t> kbuf(static_cast<size_t>(n));
  Workspace<int32_t> ibuf(static_cast<size_t>(n));
  uint64_t *ks = keys, *kd = kbuf.data();
  int32_t *is = ids, *id = ibuf.data();
  std::vector<int64_t> hist(size_t(T * R));
  auto lo = [&](int64_t t) { return n * t / T; };
  for (int shift = 0; shift < bits; shift += digit) {
    const uint64_t mask = uint64_t(R - 1);
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t* h = hist.data() + t * R;
        for (int64_t i = lo(t); i < lo(t + 1); ++i) ++h[(ks[i] >> shift) & mask];
      }
    });
    // Offsets in (digit, chunk) order; a digit that holds every key leaves the order as it is.
    bool trivial = false;
    int64_t run = 0;
    for (int64_t r = 0; r < R; ++r) {
      int64_t tot = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t c = hist[t * R + r];
        hist[t * R + r] = run;
        run += c;
        tot += c;
      }
      if (tot == n) trivial = true;
    }
    if (trivial) continue;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t* off = hist.data() + t * R;
        for (int64_t i = lo(t); i < lo(t + 1); ++i) {
          const int64_t j = off[(ks[i] >> shift) & mask]++;
          kd[j] = ks[i];
          id[j] = is[i];
        }
      }
    });
    std::swap(ks, kd);
    std::swap(is, id);
  }
  if (ks != keys) {
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      std::memcpy(keys + b, ks + b, size_t(e - b) * sizeof(uint64_t));
      std::memcpy(ids + b, is + b, size_t(e - b) * sizeof(int32_t));
    });
  }
}

// ---------------------------------------------------------------------------
// isect_tiles
// ---------------------------------------------------------------------------
// reference _check_isect_values, in its order (conics and opacities: where given)
template <typename T>
void check_values(const Tensor& means2d, const Tensor& radii, const Tensor& depths, const Tensor& conics,
                  const Tensor& opacities) {
  const int64_t G = depths.numel();
  const T* m2d = means2d.data_ptr<T>();
  const int32_t* rad = radii.data_ptr<int32_t>();
  const T* dep = depths.data_ptr<T>();
  const T* con = conics.defined() ? conics.data_ptr<T>() : nullptr;
  const T* opa = opacities.defined() ? opacities.data_ptr<T>() : nullptr;
  std::atomic<bool> bad_means{false}, bad_depths{false}, neg_depth{false}, bad_conics{false}, bad_opac{false},
      opac_range{false};
  at::parallel_for(0, G, 1 << 14, [&](int64_t g0, int64_t g1) {
    // x * 0 is NaN exactly when x is NaN or inf: one sum per chunk and input tells.
    T fm = 0, fd = 0, fc = 0, fo = 0;
    bool neg = false, range = false;
    for (int64_t g = g0; g < g1; ++g) {
      fm += m2d[2 * g] * T(0) + m2d[2 * g + 1] * T(0);
      fd += dep[g] * T(0);
      neg |= rad[2 * g] > 0 && rad[2 * g + 1] > 0 && dep[g] < 0;
    }
    if (con)
      for (int64_t j = g0 * 3; j < g1 * 3; ++j) fc += con[j] * T(0);
    if (opa)
      for (int64_t g = g0; g < g1; ++g) {
        fo += opa[g] * T(0);
        range |= !(opa[g] >= 0 && opa[g] <= 1);
      }
    if (fm != fm) bad_means = true;
    if (fd != fd) bad_depths = true;
    if (neg) neg_depth = true;
    if (fc != fc) bad_conics = true;
    if (fo != fo) bad_opac = true;
    if (range) opac_range = true;
  });
  TORCH_CHECK_VALUE(!bad_means, "means2d must be finite (it contains NaN or inf)");
  TORCH_CHECK_VALUE(!bad_depths, "depths must be finite (it contains NaN or inf)");
  TORCH_CHECK_VALUE(!neg_depth, "depths must be >= 0 where radii > 0 (the keys sort depths by their float32 bits)");
  TORCH_CHECK_VALUE(!bad_conics, "conics must be finite (it contains NaN or inf)");
  TORCH_CHECK_VALUE(!bad_opac, "opacities must be finite (it contains NaN or inf)");
  if (opac_range) {
    const auto mm = at::aminmax(opacities);
    TORCH_CHECK_VALUE(false, "opacities must lie in [0, 1], got values in [", fmt_g(std::get<0>(mm).item<double>()),
                      ", ", fmt_g(std::get<1>(mm).item<double>()), "]");
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> isect_impl(const Tensor& means2d, const Tensor& radii, const Tensor& depths,
                                              int64_t ts, int64_t tw, int64_t th, const Tensor& conics,
                                              const Tensor& opacities, std::optional<int64_t> max_isects,
                                              const Tensor& image_ids, int64_t n_images) {
  // Rows: C * N Gaussians, camera g / N; packed: nnz rows, camera image_ids[g].
  const bool packed = image_ids.defined();
  const int64_t C = packed ? n_images : depths.size(0), N = packed ? depths.size(0) : depths.size(1);
  const int64_t G = packed ? N : C * N;
  const int32_t* cam_of = packed ? image_ids.data_ptr<int32_t>() : nullptr;
  const int64_t n_tiles = tw * th;
  const int tile_bits = bits_for_count(n_tiles), cam_bits = bits_for_count(C);
  const bool exact = conics.defined();
  const T* m2d = means2d.data_ptr<T>();
  const int32_t* rad = radii.data_ptr<int32_t>();
  const T* dep = depths.data_ptr<T>();
  const T* con = exact ? conics.data_ptr<T>() : nullptr;
  const T* opa = exact ? opacities.data_ptr<T>() : nullptr;

  // 1. count (the values are checked)
  std::vector<int64_t> start(size_t(G) + 1);
  int64_t* count = start.data() + 1;
  at::parallel_for(0, G, kGrain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      count[g] = 0;
      const T mx = m2d[2 * g], my = m2d[2 * g + 1];
      if (!(rad[2 * g] > 0 && rad[2 * g + 1] > 0)) continue;
      int64_t x0, x1, y0, y1;
      box_axis(double(mx) / double(ts), double(rad[2 * g]) / double(ts), tw, &x0, &x1);
      box_axis(double(my) / double(ts), double(rad[2 * g + 1]) / double(ts), th, &y0, &y1);
      if (!exact) {
        count[g] = (x1 - x0) * (y1 - y0);
      } else if (x1 > x0 && y1 > y0) {
        const Exact e = exact_conic(double(mx), double(my), double(con[3 * g]), double(con[3 * g + 1]),
                                    double(con[3 * g + 2]), double(opa[g]));
        count[g] = exact_tiles(e, x0, x1, y0, y1, ts, tw, nullptr);
      }
    }
  });

  // 2. places, and M checked before anything of its size exists
  start[0] = 0;
  for (int64_t g = 0; g < G; ++g) start[g + 1] += start[g];
  const int64_t M = start[G];
  check_count(M, max_isects);

  Tensor tpg = new_output(depths.sizes(), depths.options().dtype(at::kInt));
  Tensor keys_t = new_output({M}, depths.options().dtype(at::kLong));
  Tensor ids_t = new_output({M}, depths.options().dtype(at::kInt));
  int32_t* tpgp = tpg.data_ptr<int32_t>();
  uint64_t* keys = reinterpret_cast<uint64_t*>(keys_t.data_ptr<int64_t>());
  int32_t* ids = ids_t.data_ptr<int32_t>();

  // 3. fill, Gaussian by Gaussian at its place
  at::parallel_for(0, G, kGrain, [&](int64_t g0, int64_t g1) {
    std::vector<int64_t> tiles;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = start[g], n = start[g + 1] - b;
      tpgp[g] = int32_t(n);
      if (n == 0) continue;
      const T mx = m2d[2 * g], my = m2d[2 * g + 1];
      int64_t x0, x1, y0, y1;
      box_axis(double(mx) / double(ts), double(rad[2 * g]) / double(ts), tw, &x0, &x1);
      box_axis(double(my) / double(ts), double(rad[2 * g + 1]) / double(ts), th, &y0, &y1);
      const float zf = float(dep[g]);
      uint32_t zbits;
      std::memcpy(&zbits, &zf, sizeof(zbits));
      const uint64_t cam = packed ? uint64_t(cam_of[g]) : uint64_t(g / N);
      const uint64_t head = (cam << (32 + tile_bits)) | uint64_t(zbits);
      uint64_t* k = keys + b;
      int32_t* ip = ids + b;
      if (!exact) {
        for (int64_t ty = y0; ty < y1; ++ty)
          for (int64_t tx = x0; tx < x1; ++tx) *k++ = head | (uint64_t(ty * tw + tx) << 32);
      } else {
        tiles.resize(size_t(n));
        const Exact e = exact_conic(double(mx), double(my), double(con[3 * g]), double(con[3 * g + 1]),
                                    double(con[3 * g + 2]), double(opa[g]));
        exact_tiles(e, x0, x1, y0, y1, ts, tw, tiles.data());
        for (int64_t i = 0; i < n; ++i) k[i] = head | (uint64_t(tiles[size_t(i)]) << 32);
      }
      for (int64_t i = 0; i < n; ++i) ip[i] = int32_t(g);
    }
  });

  // 4. the stable sort on the significant bits
  radix_sort(keys, ids, M, 32 + tile_bits + cam_bits);
  return {tpg, keys_t, ids_t};
}

// A float32/float64 CPU tensor of `dim` dimensions and of depths' dtype (not yet made contiguous).
void float_input(const Tensor& t, const Tensor& like, const char* name, int64_t dim) {
  const char* op = "isect_tiles";
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  same_dtype(t, like, op, name, "depths");
}

std::tuple<Tensor, Tensor, Tensor> isect_tiles_cpu(const Tensor& means2d_, const Tensor& radii_,
                                                   const Tensor& depths_, int64_t tile_size, int64_t tile_width,
                                                   int64_t tile_height, const std::optional<Tensor>& conics_,
                                                   const std::optional<Tensor>& opacities_,
                                                   std::optional<int64_t> max_intersections,
                                                   const std::optional<Tensor>& image_ids_, int64_t n_images) {
  const char* op = "isect_tiles";
  const Tensor* image_ids_p = present(image_ids_);
  const bool packed = image_ids_p != nullptr;
  float_input(depths_, depths_, "depths", packed ? 1 : 2);
  // Row shape prefix: {C, N} or packed {nnz}.
  const std::vector<int64_t> rows = packed ? std::vector<int64_t>{depths_.size(0)}
                                           : std::vector<int64_t>{depths_.size(0), depths_.size(1)};
  const int64_t C = packed ? n_images : rows[0], N = packed ? rows[0] : rows[1];
  auto with = [&](int64_t tail) {
    std::vector<int64_t> v = rows;
    v.push_back(tail);
    return v;
  };
  const char* lead = packed ? "[nnz, " : "[C, N, ";
  float_input(means2d_, depths_, "means2d", packed ? 2 : 3);
  shape_arg(means2d_, with(2), op, "means2d", (std::string(lead) + "2]").c_str());
  check_cpu(radii_, op, "radii");
  TORCH_CHECK(radii_.scalar_type() == at::kInt, op, ": radii must be int32, got ", radii_.scalar_type());
  shape_arg(radii_, with(2), op, "radii", (std::string(lead) + "2]").c_str());
  TORCH_CHECK(tile_size >= 1 && tile_width >= 1 && tile_height >= 1, op,
              ": tile_size, tile_width and tile_height must be >= 1");
  const Tensor* conics_p = present(conics_);
  const Tensor* opacities_p = present(opacities_);
  if (conics_p) {
    float_input(*conics_p, depths_, "conics", packed ? 2 : 3);
    shape_arg(*conics_p, with(3), op, "conics", (std::string(lead) + "3]").c_str());
  }
  if (opacities_p) {
    float_input(*opacities_p, depths_, "opacities", packed ? 1 : 2);
    shape_arg(*opacities_p, rows, op, "opacities", packed ? "[nnz]" : "[C, N]");
  }
  if (packed) {
    check_cpu(*image_ids_p, op, "image_ids");
    TORCH_CHECK(image_ids_p->scalar_type() == at::kInt, op, ": image_ids must be int32, got ",
                image_ids_p->scalar_type());
    shape_arg(*image_ids_p, rows, op, "image_ids", "[nnz]");
    TORCH_CHECK_VALUE(n_images >= 1, "n_images must be >= 1 with image_ids, got ", n_images);
  }
  // The reference entry's order: sizes (before any O(C N) work, contiguous
  // copies included), values, then the arguments, then M.
  check_sizes(C, N, tile_width * tile_height, packed);
  const Tensor depths = depths_.contiguous(), means2d = means2d_.contiguous(), radii = radii_.contiguous();
  const Tensor image_ids = packed ? image_ids_p->contiguous() : Tensor();
  const Tensor conics = conics_p ? conics_p->contiguous() : Tensor();
  const Tensor opacities = opacities_p ? opacities_p->contiguous() : Tensor();
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(depths.scalar_type(), "isect_tiles", [&] {
    check_values<scalar_t>(means2d, radii, depths, conics, opacities);
    if (packed && N > 0) {  // reference _check_image_ids
      const int32_t* c = image_ids.data_ptr<int32_t>();
      const auto mm = std::minmax_element(c, c + N);
      TORCH_CHECK_VALUE(*mm.first >= 0 && int64_t(*mm.second) < n_images,
                        "image_ids must lie in [0, n_images) = [0, ", n_images,
                        ") (each packed row's camera), got values in [", *mm.first, ", ", *mm.second, "]");
    }
    TORCH_CHECK_VALUE(conics.defined() == opacities.defined(),
                      "conics and opacities must be given together (exact tile culling needs both) or not at all");
    TORCH_CHECK_VALUE(!max_intersections.has_value() || *max_intersections >= 0,
                      "max_intersections must be >= 0 or None, got ", max_intersections.value_or(0));
    out = isect_impl<scalar_t>(means2d, radii, depths, tile_size, tile_width, tile_height, conics, opacities,
                               max_intersections, image_ids, n_images);
  });
  return out;
}

// ---------------------------------------------------------------------------
// isect_offset_encode
// ---------------------------------------------------------------------------
Tensor isect_offset_encode_cpu(const Tensor& isect_ids_, int64_t n_images, int64_t tile_width, int64_t tile_height) {
  const char* op = "isect_offset_encode";
  const Tensor ids_t = index_arg(isect_ids_, op, "isect_ids");
  TORCH_CHECK(n_images >= 1 && tile_width >= 1 && tile_height >= 1, op,
              ": n_images, tile_width and tile_height must be >= 1");
  const int64_t n_tiles = tile_width * tile_height, M = ids_t.numel();
  const int tile_bits = bits_for_count(n_tiles);
  const int64_t mask = (int64_t(1) << tile_bits) - 1;
  const int64_t* p = ids_t.data_ptr<int64_t>();
  // reference _check_isect_ids
  if (M > 0) {
    const int64_t k = first_index(M - 1, [&](int64_t i) { return p[i + 1] < p[i]; });
    TORCH_CHECK_VALUE(k < 0, "isect_ids must be sorted (non-decreasing), as isect_tiles returns them; isect_ids[", k,
                      "] > isect_ids[", k + 1, "]");
    const int64_t cam_lo = (p[0] >> 32) >> tile_bits, cam_hi = (p[M - 1] >> 32) >> tile_bits;
    if (cam_lo < 0 || cam_hi >= n_images) {
      const int64_t at = cam_lo < 0 ? 0 : M - 1, c = cam_lo < 0 ? cam_lo : cam_hi;
      TORCH_CHECK_VALUE(false, "isect_ids must hold cameras in [0, n_images) = [0, ", n_images, ") above their ",
                        32 + tile_bits, " low bits; isect_ids[", at, "] has camera ", c);
    }
    const int64_t t = first_index(M, [&](int64_t i) { return ((p[i] >> 32) & mask) >= n_tiles; });
    TORCH_CHECK_VALUE(t < 0, "isect_ids must hold tiles in [0, tile_width * tile_height) = [0, ", n_tiles,
                      ") in bits 32..", 31 + tile_bits, "; isect_ids[", t, "] has tile ",
                      t < 0 ? 0 : (p[t] >> 32) & mask);
  }
  Tensor out = new_output({n_images, tile_height, tile_width}, ids_t.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  const int64_t total = n_images * n_tiles;
  auto linear = [&](int64_t i) { return ((p[i] >> 32) >> tile_bits) * n_tiles + ((p[i] >> 32) & mask); };
  // Slot s gets the first i with linear(i) >= s (torch.searchsorted): key i fills (linear(i - 1), linear(i)].
  at::parallel_for(0, M, 1 << 14, [&](int64_t b, int64_t e) {
    int64_t prev = b == 0 ? -1 : linear(b - 1);
    for (int64_t i = b; i < e; ++i) {
      const int64_t cur = linear(i);
      for (int64_t s = prev + 1; s <= cur; ++s) o[s] = int32_t(i);
      prev = cur;
    }
  });
  const int64_t last = M == 0 ? -1 : linear(M - 1);
  at::parallel_for(last + 1, total, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) o[s] = int32_t(M);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  m.impl("isect_tiles", &isect_tiles_cpu);
  m.impl("isect_offset_encode", &isect_offset_encode_cpu);
}

}  // namespace splat
}  // namespace frontiers_fast

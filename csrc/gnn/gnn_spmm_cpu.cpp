// SpMM (sum / mean / max / min, optional per-head edge weights), its backward
// over the transposed graph, and SDDMM.
//
// One destination row per task (the transpose's rows for the backward), rows
// grouped into chunks of equal cost (gnn_sched_cpu.h), features in register
// tiles (gnn_tile_cpu.h).  Max/min keep, per lane, the offset of the first
// edge reaching the extremum, so the arg is the smallest CSR position as the
// contract requires.
#include "gnn/gnn_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/sched.h"
#include "common/simd.h"
#include "gnn/gnn_tile_cpu.h"

namespace frontiers_fast {
namespace gnn {
namespace {

template <typename T>
struct RowAgg {
  typedef VecT<T> V;
  typedef IdxT<T> I;
  static constexpr int W = Simd<T>::W;

  const int64_t* col = nullptr;
  const int64_t* kpos = nullptr;
  const int64_t* argin = nullptr;
  const T* x = nullptr;
  int64_t F = 0, C = 1, E = 0;
  int mode = kModeSum;
  bool perm = false;
  WeightSrc<T> ws;
  RowTiles<T> rt;
  HeadLanes<T> hl;
  T one = T(1);

  // w: the weights of the edges in their order [E, hw] (null: unweighted).
  void init(const T* w, int64_t hw) {
    rt.init(F);
    C = F / std::max<int64_t>(hw, 1);
    if (w == nullptr) {
      ws.w = &one;
      ws.ws = 0;
      perm = false;
    } else {
      ws.w = w;
      ws.ws = hw;
      ws.hw = hw;
      ws.lim = E * hw;
      perm = hw > 1;
      if (perm && F >= W) {
        hl.init(rt, C);
        const int64_t room = ws.lim - W - hl.hb_max;
        ws.k_safe = room >= 0 ? std::min<int64_t>(E, room / hw + 1) : 0;
      }
    }
  }

  T weight_scalar(int64_t k, int64_t f) const { return ws.w[k * ws.ws + (ws.ws ? f / C : 0)]; }

  // Rows narrower than one vector: plain loops.
  void narrow(int64_t kb, int64_t ke, T* dst, int64_t* darg, T scale) const {
    T acc[W];
    int64_t arg[W];
    if (ke <= kb) {
      for (int64_t f = 0; f < F; ++f) dst[f] = T(0);
      if (darg)
        for (int64_t f = 0; f < F; ++f) darg[f] = -1;
      return;
    }
    if (mode == kModeSum || mode == kModeMasked) {
      for (int64_t f = 0; f < F; ++f) acc[f] = T(0);
      for (int64_t k = kb; k < ke; ++k) {
        const T* xr = x + col[k] * F;
        for (int64_t f = 0; f < F; ++f) {
          if (mode == kModeMasked && argin[col[k] * F + f] != kpos[k]) continue;
          acc[f] += weight_scalar(k, f) * xr[f];
        }
      }
      for (int64_t f = 0; f < F; ++f) dst[f] = acc[f] * scale;
      return;
    }
    const bool mx = mode == kModeMax;
    for (int64_t k = kb; k < ke; ++k) {
      const T* xr = x + col[k] * F;
      for (int64_t f = 0; f < F; ++f) {
        const T m = weight_scalar(k, f) * xr[f];
        if (k == kb || beats(m, acc[f], mx)) {
          acc[f] = m;
          arg[f] = k;
        }
      }
    }
    for (int64_t f = 0; f < F; ++f) {
      dst[f] = acc[f];
      darg[f] = arg[f];
    }
  }

  TileArgs<T> tile_args(int64_t t) const {
    TileArgs<T> A{col, kpos, argin, x, F, E, rt.base(t), rt.last(t), nullptr, nullptr};
    if (perm) {
      A.hb = hl.hb.data() + rt.first(t);
      A.idx = hl.idx.data() + rt.first(t);
    }
    return A;
  }

  // One tile of one row piece [kb, ke), ke > kb.
  template <int NV, int MODE, bool PERM>
  inline void body(const TileArgs<T>& A, int64_t kb, int64_t ke, T* dst, int64_t* darg, T scale) const {
    int64_t o[NV];
    for (int v = 0; v < NV; ++v) o[v] = v < NV - 1 ? A.base + v * W : A.last;
    if (MODE == kModeSum || MODE == kModeMasked) {
      V a0[NV], a1[NV];
      for (int v = 0; v < NV; ++v) a0[v] = a1[v] = V{};
      sum_edges<T, NV, PERM, MODE == kModeMasked>(A, ws, kb, ke, a0, a1);
      const V s = bcast<T>(scale);
      for (int v = 0; v < NV; ++v) storeu(dst + o[v], (a0[v] + a1[v]) * s);
      return;
    }
    V acc[NV];
    I arg[NV];
    ext_edges<T, NV, PERM, MODE == kModeMax>(A, ws, kb, ke, acc, arg);
    for (int v = 0; v < NV; ++v) {
      storeu(dst + o[v], acc[v]);
      for (int l = 0; l < W; ++l) darg[o[v] + l] = kb + int64_t(arg[v][l]);
    }
  }

  template <int NV>
  inline void empty_tile(const TileArgs<T>& A, T* dst, int64_t* darg) const {
    for (int v = 0; v < NV; ++v) {
      const int64_t o = v < NV - 1 ? A.base + v * W : A.last;
      storeu(dst + o, V{});
      if (darg)
        for (int l = 0; l < W; ++l) darg[o + l] = -1;
    }
  }

  // Whole rows [r0, r1) of tile t.
  template <int NV, int MODE, bool PERM>
  void rows_tile(int64_t t, const int64_t* ptr, int64_t r0, int64_t r1, T* out, int64_t* arg, bool mean) const {
    const TileArgs<T> A = tile_args(t);
    const bool ext = MODE == kModeMax || MODE == kModeMin;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t kb = ptr[r], ke = ptr[r + 1];
      T* dst = out + r * F;
      int64_t* darg = ext ? arg + r * F : nullptr;
      if (ke == kb) {
        empty_tile<NV>(A, dst, darg);
        continue;
      }
      body<NV, MODE, PERM>(A, kb, ke, dst, darg, mean ? T(1) / T(ke - kb) : T(1));
    }
  }

  template <int NV, int MODE, bool PERM>
  void piece_tile(int64_t t, int64_t kb, int64_t ke, T* dst, int64_t* darg) const {
    const TileArgs<T> A = tile_args(t);
    if (ke == kb)
      empty_tile<NV>(A, dst, darg);
    else
      body<NV, MODE, PERM>(A, kb, ke, dst, darg, T(1));
  }

  // Calls fn(NV, MODE, PERM) with compile-time constants for tile t.
  template <class Fn>
  void dispatch(int64_t t, const Fn& fn) const {
    auto with_mode = [&](auto nv) {
      auto with_perm = [&](auto md) {
        if (perm)
          fn(nv, md, std::true_type());
        else
          fn(nv, md, std::false_type());
      };
      switch (mode) {
        case kModeSum: with_perm(std::integral_constant<int, kModeSum>()); break;
        case kModeMax: with_perm(std::integral_constant<int, kModeMax>()); break;
        case kModeMin: with_perm(std::integral_constant<int, kModeMin>()); break;
        default: with_perm(std::integral_constant<int, kModeMasked>()); break;
      }
    };
    switch (rt.nv(t)) {
      case 1: with_mode(std::integral_constant<int, 1>()); break;
      case 2: with_mode(std::integral_constant<int, 2>()); break;
      case 3: with_mode(std::integral_constant<int, 3>()); break;
      case 4: with_mode(std::integral_constant<int, 4>()); break;
      case 5: with_mode(std::integral_constant<int, 5>()); break;
      case 6: with_mode(std::integral_constant<int, 6>()); break;
      case 7: with_mode(std::integral_constant<int, 7>()); break;
      default: with_mode(std::integral_constant<int, 8>()); break;
    }
  }

  // Whole rows [r0, r1) into out (and arg).  With one tile the specialised
  // loop runs over all rows; with several, rows stay outermost so a row's
  // gathered source rows are still in cache for its next tile.
  void rows(const int64_t* ptr, int64_t r0, int64_t r1, T* out, int64_t* arg, bool mean) const {
    if (r1 <= r0) return;
    if (F < W) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t kb = ptr[r], ke = ptr[r + 1];
        narrow(kb, ke, out + r * F, arg ? arg + r * F : nullptr, (mean && ke > kb) ? T(1) / T(ke - kb) : T(1));
      }
      return;
    }
    auto go = [&](int64_t t, int64_t a, int64_t b) {
      dispatch(t, [&](auto nv, auto md, auto pm) {
        rows_tile<decltype(nv)::value, decltype(md)::value, decltype(pm)::value>(t, ptr, a, b, out, arg, mean);
      });
    };
    if (rt.ntiles == 1) {
      go(0, r0, r1);
      return;
    }
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t t = 0; t < rt.ntiles; ++t) go(t, r, r + 1);
  }

  // Row piece [kb, ke) into dst (and darg for max/min), unscaled.
  void piece(int64_t kb, int64_t ke, T* dst, int64_t* darg) const {
    if (F < W) {
      narrow(kb, ke, dst, darg, T(1));
      return;
    }
    for (int64_t t = 0; t < rt.ntiles; ++t)
      dispatch(t, [&](auto nv, auto md, auto pm) {
        piece_tile<decltype(nv)::value, decltype(md)::value, decltype(pm)::value>(t, kb, ke, dst, darg);
      });
  }
};

// Runs agg over every row of (ptr, E) into out [n, F] (and arg), splitting
// rows longer than a chunk and combining their pieces in edge order.
template <typename T>
void run_rows(const RowAgg<T>& agg, const int64_t* ptr, int64_t n, T* out, int64_t* arg, bool mean) {
  const int64_t F = agg.F;
  if (n == 0 || F == 0) return;
  const bool ext = agg.mode == kModeMax || agg.mode == kModeMin;
  const Plan plan = make_plan(ptr, n, agg.E, F, true);
  const int64_t np = int64_t(plan.pieces.size());
  std::vector<T> carry(size_t(np * F));
  std::vector<int64_t> carry_arg(ext ? size_t(np * F) : 0);
  auto row_scale = [&](int64_t r) -> T {
    const int64_t deg = ptr[r + 1] - ptr[r];
    return (mean && deg > 0) ? T(1) / T(deg) : T(1);
  };
  for_each_chunk(int64_t(plan.chunks.size()), [&](int64_t c) {
    const Chunk& ch = plan.chunks[c];
    auto do_piece = [&](int64_t p) {
      const Piece& pc = plan.pieces[p];
      agg.piece(pc.kb, pc.ke, carry.data() + p * F, ext ? carry_arg.data() + p * F : nullptr);
    };
    if (ch.head >= 0) do_piece(ch.head);
    agg.rows(ptr, ch.rs, ch.re, out, ext ? arg : nullptr, mean);
    if (ch.tail >= 0) do_piece(ch.tail);
  });
  for_each_split_row(plan, [&](int64_t a, int64_t b) {
    const int64_t r = plan.pieces[a].row;
    T* o = out + r * F;
    if (!ext) {
      const T s = row_scale(r);
      for (int64_t f = 0; f < F; ++f) {
        T acc = carry[a * F + f];
        for (int64_t p = a + 1; p < b; ++p) acc += carry[p * F + f];
        o[f] = acc * s;
      }
      return;
    }
    int64_t* g = arg + r * F;
    const bool mx = agg.mode == kModeMax;
    bool have = false;
    for (int64_t p = a; p < b; ++p) {
      if (plan.pieces[p].ke <= plan.pieces[p].kb) continue;
      const T* cv = carry.data() + p * F;
      const int64_t* ca = carry_arg.data() + p * F;
      for (int64_t f = 0; f < F; ++f) {
        // A later piece holds later edges: it wins only when strictly better.
        if (!have || beats(cv[f], o[f], mx)) {
          o[f] = cv[f];
          g[f] = ca[f];
        }
      }
      have = true;
    }
  });
}

// ---------------------------------------------------------------------------
// SDDMM: out[k, h] = <a[col[k], h, :], b[i, h, :]> (optionally masked).
// ---------------------------------------------------------------------------
template <typename T>
void sddmm_impl(const int64_t* ptr, int64_t n, const int64_t* col, int64_t E, const T* a, const T* b, int64_t H,
                int64_t C, const int64_t* arg, const int64_t* out_index, T* out) {
  typedef VecT<T> V;
  constexpr int W = Simd<T>::W;
  if (E == 0 || H == 0) return;
  const int64_t F = H * C;
  if (F == 0) {
    std::fill(out, out + E * H, T(0));
    return;
  }
  SegDot<T> sd;
  sd.init(int(H), int(C));
  const Plan plan = make_plan(ptr, n, E, std::max<int64_t>(F, 1), true);
  const int HV = sd.HV;
  for_each_chunk(int64_t(plan.chunks.size()), [&](int64_t c) {
    const Chunk& ch = plan.chunks[c];
    std::vector<V> hv(HV);
    auto run = [&](int64_t r, int64_t kb, int64_t ke) {
      const T* br = b + r * F;
      const int64_t* ar = arg ? arg + r * F : nullptr;
      for (int64_t k = kb; k < ke; ++k) {
        if (k + kPrefetch < E) {
          // The whole row: the segmented dot products need all of it at once.
          const T* pf = a + col[k + kPrefetch] * F;
          for (int64_t f = 0; f < F; f += 64 / int64_t(sizeof(T))) __builtin_prefetch(pf + f);
        }
        const T* xr = a + col[k] * F;
        if (ar == nullptr) {
          sd.dot(xr, br, hv.data());
        } else {
          sd.run(
              [&](int64_t o) {
                return select<T>(eq_mask(ar + o, k, (T*)nullptr), loadu<V>(xr + o) * loadu<V>(br + o), V{});
              },
              [&](int64_t f) { return ar[f] == k ? xr[f] * br[f] : T(0); }, hv.data());
        }
        // Edge k's row of out: k, or out_index[k] (a permutation: each row has one writer).
        T* dst = out + (out_index ? out_index[k] : k) * H;
        for (int j = 0; j < HV; ++j) store_n(dst + j * W, hv[j], int(std::min<int64_t>(W, H - j * W)));
      }
    };
    if (ch.head >= 0) run(plan.pieces[ch.head].row, plan.pieces[ch.head].kb, plan.pieces[ch.head].ke);
    for (int64_t r = ch.rs; r < ch.re; ++r) run(r, ptr[r], ptr[r + 1]);
    if (ch.tail >= 0) run(plan.pieces[ch.tail].row, plan.pieces[ch.tail].kb, plan.pieces[ch.tail].ke);
  });
}

}  // namespace

void spmm_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor* weight, const at::Tensor& x,
                  Reduce reduce, at::Tensor& out, at::Tensor& arg) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_fwd", [&] {
    RowAgg<scalar_t> agg;
    agg.col = col.data_ptr<int64_t>();
    agg.x = x.data_ptr<scalar_t>();
    agg.F = x.size(1);
    agg.E = col.numel();
    agg.mode = reduce == Reduce::kMax ? kModeMax : reduce == Reduce::kMin ? kModeMin : kModeSum;
    agg.init(weight ? weight->data_ptr<scalar_t>() : nullptr, weight ? weight->size(1) : 1);
    const bool ext = agg.mode != kModeSum;
    run_rows(agg, rowptr.data_ptr<int64_t>(), rowptr.numel() - 1, out.data_ptr<scalar_t>(),
             ext ? arg.data_ptr<int64_t>() : nullptr, reduce == Reduce::kMean);
  });
}

void spmm_backward_x(const at::Tensor& csc_ptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
                     const at::Tensor* weight_t, const at::Tensor& grad, const at::Tensor* arg, at::Tensor& grad_x) {
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "spmm_bwd", [&] {
    RowAgg<scalar_t> agg;
    agg.col = csc_row.data_ptr<int64_t>();
    agg.x = grad.data_ptr<scalar_t>();
    agg.F = grad.size(1);
    agg.E = csc_row.numel();
    if (arg) {
      agg.mode = kModeMasked;
      agg.kpos = csc_perm.data_ptr<int64_t>();
      agg.argin = arg->data_ptr<int64_t>();
    }
    agg.init(weight_t ? weight_t->data_ptr<scalar_t>() : nullptr, weight_t ? weight_t->size(1) : 1);
    run_rows(agg, csc_ptr.data_ptr<int64_t>(), csc_ptr.numel() - 1, grad_x.data_ptr<scalar_t>(), nullptr, false);
  });
}

void sddmm_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a, const at::Tensor& b,
                   int64_t H, int64_t C, const at::Tensor* arg, const at::Tensor* out_index, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sddmm_fwd", [&] {
    sddmm_impl<scalar_t>(rowptr.data_ptr<int64_t>(), rowptr.numel() - 1, col.data_ptr<int64_t>(), col.numel(),
                         a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), H, C,
                         arg ? arg->data_ptr<int64_t>() : nullptr,
                         out_index ? out_index->data_ptr<int64_t>() : nullptr, out.data_ptr<scalar_t>());
  });
}

}  // namespace gnn
}  // namespace frontiers_fast

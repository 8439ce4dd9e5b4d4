// Register-tiled accumulation over the edges of one row, shared by the SpMM
// and GAT kernels.
//
// The feature axis of a row is cut into tiles of at most kMaxNV 64-byte
// vectors whose accumulators stay in registers for the whole edge loop; each
// edge then costs one gather of its source row tile and one FMA per vector.
// A feature count that is not a multiple of the vector width ends with one
// vector that overlaps the previous one: the overlapped lanes see the same
// edges in the same order, so they are computed twice bit-identically and no
// masked tail is needed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/reduce.h"
#include "common/simd.h"

namespace frontiers_fast {
namespace gnn {

constexpr int kMaxNV = 8;          // accumulator vectors per tile (plus as many loads: fits 32 zmm)
// Gathers are independent, so out-of-order execution already overlaps them;
// a software prefetch a few edges ahead covers tiles spanning many lines.
constexpr int64_t kPrefetch = 8;

// What a row pass computes: a reduce of frontiers_fast::Reduce (mean is a sum
// scaled afterwards), or the masked sum of the max/min backward, which keeps
// only the edges that won the forward's arg.  Numbered as Reduce, so there is
// one code per reduce throughout.
enum Mode {
  kModeSum = int(Reduce::kSum),
  kModeMax = int(Reduce::kMax),
  kModeMin = int(Reduce::kMin),
  kModeMasked = kNumReduces
};

template <typename T>
struct RowTiles {
  static constexpr int W = Simd<T>::W;
  int64_t F = 0, nvt = 0, ntiles = 0;
  std::vector<int64_t> first_, nv_;
  void init(int64_t F_) {
    F = F_;
    nvt = (F + W - 1) / W;
    ntiles = (nvt + kMaxNV - 1) / kMaxNV;
    first_.assign(ntiles, 0);
    nv_.assign(ntiles, kMaxNV);
    for (int64_t t = 0; t < ntiles; ++t) first_[t] = t * kMaxNV;
    if (ntiles > 0) nv_[ntiles - 1] = nvt - (ntiles - 1) * kMaxNV;
    // The overlapping last vector must share a tile with the vector it
    // overlaps, or a kernel accumulating into memory would add the shared
    // lanes twice.
    if (ntiles > 1 && nv_[ntiles - 1] == 1) {
      nv_[ntiles - 2] -= 1;
      nv_[ntiles - 1] = 2;
      first_[ntiles - 1] -= 1;
    }
  }
  int64_t off(int64_t v) const { return std::min<int64_t>(v * W, F - W); }
  int64_t first(int64_t t) const { return first_[t]; }
  int nv(int64_t t) const { return int(nv_[t]); }
  int64_t base(int64_t t) const { return first_[t] * W; }
  int64_t last(int64_t t) const { return off(first_[t] + nv_[t] - 1); }
};

// Per-head weights: lane l of vector v uses weight column hb[v] + idx[v][l].
// A vector spans at most W heads, so one unaligned load and one permutation
// give all its lanes' weights.
template <typename T>
struct HeadLanes {
  std::vector<int64_t> hb;
  std::vector<IdxT<T>> idx;
  int64_t hb_max = 0;
  void init(const RowTiles<T>& rt, int64_t C) {
    const int W = Simd<T>::W;
    hb.assign(rt.nvt, 0);
    idx.assign(rt.nvt, IdxT<T>{});
    for (int64_t v = 0; v < rt.nvt; ++v) {
      const int64_t o = rt.off(v);
      hb[v] = o / C;
      for (int l = 0; l < W; ++l) idx[v][l] = (o + l) / C - hb[v];
      hb_max = std::max(hb_max, hb[v]);
    }
  }
};

template <typename T>
struct WeightSrc {
  const T* w = nullptr;  // weights of edge k at w + k * ws
  int64_t ws = 0;        // 0: the same weight (1) for every edge
  int64_t hw = 1;        // columns
  int64_t k_safe = 0;    // edges below this may read W values past any head base
  int64_t lim = 0;       // valid elements of w
};

template <typename T, int NV, bool PERM>
inline void edge_weights(const WeightSrc<T>& ws, int64_t k, const int64_t* hb, const IdxT<T>* idx, VecT<T>* wv) {
  typedef VecT<T> V;
  if (!PERM) {
    const V b = bcast<T>(ws.w[k * ws.ws]);
    for (int v = 0; v < NV; ++v) wv[v] = b;
  } else {
    const T* r = ws.w + k * ws.ws;
    if (k < ws.k_safe) {
      for (int v = 0; v < NV; ++v) wv[v] = perm1<T>(loadu<V>(r + hb[v]), idx[v]);
    } else {
      for (int v = 0; v < NV; ++v) {
        const int64_t room = ws.lim - (k * ws.ws + hb[v]);
        wv[v] = perm1<T>(load_n(r + hb[v], int(std::min<int64_t>(room, Simd<T>::W))), idx[v]);
      }
    }
  }
}

template <typename T, int NV>
inline void prefetch_tile(const T* r, int64_t base, int64_t last) {
  for (int v = 0; v < NV; ++v) __builtin_prefetch(r + base + v * Simd<T>::W);
  __builtin_prefetch(r + last + Simd<T>::W - 1);
}

// Everything one tile of one row piece needs.
template <typename T>
struct TileArgs {
  const int64_t* col;  // source row of each edge (the transpose: destination)
  const int64_t* kpos;  // masked mode: CSR position of each transposed edge
  const int64_t* arg;   // masked mode: [N, F] arg-extremum of the forward
  const T* x;
  int64_t ldx;
  int64_t kpf;  // edges [0, kpf) exist, for prefetching ahead
  int64_t base, last;
  const int64_t* hb;
  const IdxT<T>* idx;
};

// Sum (or masked sum) of w * x over edges [kb, ke), added to a0 + a1.  Two
// accumulator sets break the FMA dependency chain when a tile is narrow, and
// the sum is two-level (fresh accumulators per block of kSumBlock edges,
// added into the totals) so that float32 rounding error grows with the block
// size plus the block count rather than with the degree of a hub row.
constexpr int64_t kSumBlock = 128;

template <typename T, int NV, bool PERM, bool MASKED>
inline void sum_edges(const TileArgs<T>& A, const WeightSrc<T>& ws, int64_t kb, int64_t ke, VecT<T>* a0,
                      VecT<T>* a1) {
  typedef VecT<T> V;
  constexpr int W = Simd<T>::W;
  const T* __restrict x = A.x;
  const int64_t* __restrict col = A.col;
  int64_t o[NV];
  for (int v = 0; v < NV; ++v) o[v] = v < NV - 1 ? A.base + v * W : A.last;
  // s + w * x; masked, only the lanes whose arg is this edge add anything (the
  // product is masked, not x alone, so a NaN weight of an edge that did not win
  // contributes 0, as it does on every backend).
  auto step = [&](V w, int64_t k, int v, const T* xr, V s) -> V {
    if (!MASKED) return fmadd(w, loadu<V>(xr + o[v]), s);
    const int64_t* ar = A.arg + col[k] * A.ldx;
    return s + select<T>(eq_mask(ar + o[v], A.kpos[k], (T*)nullptr), w * loadu<V>(xr + o[v]), V{});
  };
  for (int64_t b0 = kb; b0 < ke; b0 += kSumBlock) {
    const int64_t b1 = std::min(ke, b0 + kSumBlock);
    V s0[NV], s1[NV];
    for (int v = 0; v < NV; ++v) s0[v] = s1[v] = V{};
    int64_t k = b0;
    for (; k + 2 <= b1; k += 2) {
      if (k + 1 + kPrefetch < A.kpf) {
        prefetch_tile<T, NV>(x + col[k + kPrefetch] * A.ldx, A.base, A.last);
        prefetch_tile<T, NV>(x + col[k + 1 + kPrefetch] * A.ldx, A.base, A.last);
      }
      const T* x0 = x + col[k] * A.ldx;
      const T* x1 = x + col[k + 1] * A.ldx;
      V w0[NV], w1[NV];
      edge_weights<T, NV, PERM>(ws, k, A.hb, A.idx, w0);
      edge_weights<T, NV, PERM>(ws, k + 1, A.hb, A.idx, w1);
      for (int v = 0; v < NV; ++v) {
        s0[v] = step(w0[v], k, v, x0, s0[v]);
        s1[v] = step(w1[v], k + 1, v, x1, s1[v]);
      }
    }
    if (k < b1) {
      const T* x0 = x + col[k] * A.ldx;
      V w0[NV];
      edge_weights<T, NV, PERM>(ws, k, A.hb, A.idx, w0);
      for (int v = 0; v < NV; ++v) s0[v] = step(w0[v], k, v, x0, s0[v]);
    }
    for (int v = 0; v < NV; ++v) {
      a0[v] += s0[v];
      a1[v] += s1[v];
    }
  }
}

// Whether message m replaces the running extremum best of a max (mx) or min:
// when it is strictly better, or when it is the first NaN.  So a NaN message
// makes the output NaN (torch.amax and amin propagate NaN too) and the arg is
// the first NaN edge; among equal values the first edge keeps the arg.
template <typename T>
inline bool beats(T m, T best, bool mx) {
  return (mx ? m > best : m < best) || (m != m && best == best);
}

// Running max (min) of w * x over edges [kb, ke), ke > kb, with the offset
// from kb of the first edge reaching it.
template <typename T, int NV, bool PERM, bool MAX>
inline void ext_edges(const TileArgs<T>& A, const WeightSrc<T>& ws, int64_t kb, int64_t ke, VecT<T>* acc,
                      IdxT<T>* arg) {
  typedef VecT<T> V;
  typedef IdxT<T> I;
  constexpr int W = Simd<T>::W;
  int64_t o[NV];
  for (int v = 0; v < NV; ++v) o[v] = v < NV - 1 ? A.base + v * W : A.last;
  {
    const T* x0 = A.x + A.col[kb] * A.ldx;
    V w0[NV];
    edge_weights<T, NV, PERM>(ws, kb, A.hb, A.idx, w0);
    for (int v = 0; v < NV; ++v) {
      acc[v] = w0[v] * loadu<V>(x0 + o[v]);
      arg[v] = I{};
    }
  }
  for (int64_t k = kb + 1; k < ke; ++k) {
    if (k + kPrefetch < A.kpf) prefetch_tile<T, NV>(A.x + A.col[k + kPrefetch] * A.ldx, A.base, A.last);
    const T* x0 = A.x + A.col[k] * A.ldx;
    V w0[NV];
    edge_weights<T, NV, PERM>(ws, k, A.hb, A.idx, w0);
    const I rel = typename Simd<T>::Lane(k - kb) - I{};
    for (int v = 0; v < NV; ++v) {
      const V m = w0[v] * loadu<V>(x0 + o[v]);
      // NaN wins once and then keeps its place, as in torch.amax: see beats().
      const I better = (MAX ? (m > acc[v]) : (m < acc[v])) | ((m != m) & (acc[v] == acc[v]));
      acc[v] = better ? m : acc[v];
      arg[v] = better ? rel : arg[v];
    }
  }
}

// acc[0, F) += sum over edges [kb, ke) of w * x (register tiles, any F >= W).
template <typename T, bool PERM>
inline void add_edges_to_row(const RowTiles<T>& rt, const HeadLanes<T>& hl, TileArgs<T> A, const WeightSrc<T>& ws,
                             int64_t kb, int64_t ke, T* acc) {
  typedef VecT<T> V;
  constexpr int W = Simd<T>::W;
  for (int64_t t = 0; t < rt.ntiles; ++t) {
    A.base = rt.base(t);
    A.last = rt.last(t);
    if (PERM) {
      A.hb = hl.hb.data() + rt.first(t);
      A.idx = hl.idx.data() + rt.first(t);
    }
    auto run = [&](auto nv_tag) {
      constexpr int NV = decltype(nv_tag)::value;
      V a0[NV], a1[NV];
      int64_t o[NV];
      for (int v = 0; v < NV; ++v) {
        o[v] = v < NV - 1 ? A.base + v * W : A.last;
        a0[v] = loadu<V>(acc + o[v]);
        a1[v] = V{};
      }
      sum_edges<T, NV, PERM, false>(A, ws, kb, ke, a0, a1);
      for (int v = 0; v < NV; ++v) storeu(acc + o[v], a0[v] + a1[v]);
    };
    switch (rt.nv(t)) {
      case 1: run(std::integral_constant<int, 1>()); break;
      case 2: run(std::integral_constant<int, 2>()); break;
      case 3: run(std::integral_constant<int, 3>()); break;
      case 4: run(std::integral_constant<int, 4>()); break;
      case 5: run(std::integral_constant<int, 5>()); break;
      case 6: run(std::integral_constant<int, 6>()); break;
      case 7: run(std::integral_constant<int, 7>()); break;
      default: run(std::integral_constant<int, 8>()); break;
    }
  }
}

}  // namespace gnn
}  // namespace frontiers_fast

// Fused GAT attention (forward and backward) and edge softmax.
//
// Forward, per destination row i: edges are taken in blocks; a block's logits
// e = LeakyReLU(a_src[j] + a_dst[i]) come first (H values per edge), then the
// running max is raised once per block (rescaling the accumulator only when
// it actually rises, which after the first block is rare), then the block's
// weights p = exp(e - m) go through the same register-tiled row accumulation
// as SpMM.  Only O(H) numbers per edge are ever stored, and only per block.
//
// Backward, in one pass over the transpose (source rows j) instead of one pass
// per orientation: the edge's gradient needs dp = <grad_out[i], h[j]> per head,
// and with h[j] resident for the whole source row, the only gathered row per
// edge is grad_out[i] — used both for dp and for grad_h[j] += p grad_out[i].
// The destination-side numbers it needs (a_dst, lse, delta = <grad_out, out>)
// are packed per destination first so each edge reads them from one place.
// de is written to its CSR position (each position once), and grad_a_dst is
// then a plain row sum over CSR rows.  No atomics; each output row has one
// writer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "common/alloc.h"
#include "common/sched.h"
#include "common/simd.h"
#include "gnn/gnn_cpu.h"
#include "gnn/gnn_tile_cpu.h"

namespace frontiers_fast {
namespace gnn {
namespace {

constexpr int64_t kBlock = 32;

template <typename T>
inline T lrelu(T s, T slope) {
  return s > T(0) ? s : s * slope;
}

template <typename I>
inline bool any_lane(I m) {
  bool r = false;
  for (size_t l = 0; l < sizeof(I) / sizeof(m[0]); ++l) r |= m[l] != 0;
  return r;
}

// Vector whose lane l holds vals[l % H]; H divides W.
template <typename T>
inline VecT<T> tile_heads(const T* vals, int64_t H) {
  VecT<T> v;
  for (int l = 0; l < Simd<T>::W; ++l) v[l] = vals[l % H];
  return v;
}

// ---------------------------------------------------------------------------
// Reductions over one CSR row of an [E, H] edge array (rows are contiguous,
// nE * H values starting at a multiple of H).  When H divides W the row is
// processed as a flat array whose lane l always holds head l % H.
// ---------------------------------------------------------------------------
// Requires W % H == 0 and nE * H >= W.
template <typename T, class Load, class Combine, class CombineS>
inline void row_head_reduce(int64_t nE, int64_t H, T init, Load load, Combine comb, CombineS comb_s, T* out) {
  typedef VecT<T> V;
  constexpr int W = Simd<T>::W;
  const int64_t n = nE * H;
  V acc = bcast<T>(init);
  int64_t f = 0;
  // Two-level, as in sum_edges: bounded rounding growth on hub rows.
  constexpr int64_t kBlk = 128 * W;
  for (; f + kBlk <= n; f += kBlk) {
    V blk = load(f);
    for (int64_t q = W; q < kBlk; q += W) blk = comb(blk, load(f + q));
    acc = comb(acc, blk);
  }
  for (; f + W <= n; f += W) acc = comb(acc, load(f));
  if (f < n) {
    // The last vector overlaps the previous one; keep only its new lanes.
    // n - W is a multiple of H, so lane l still holds head l % H.
    const int64_t s = n - W;
    const IdxT<T> fresh = iota<T>() >= typename Simd<T>::Lane(f - s);
    acc = comb(acc, fresh ? load(s) : bcast<T>(init));
  }
  T tmp[W];
  storeu(tmp, acc);
  for (int64_t h = 0; h < H; ++h) {
    T r = tmp[h];
    for (int64_t g = h + H; g < W; g += H) r = comb_s(r, tmp[g]);
    out[h] = r;
  }
}

// ---------------------------------------------------------------------------
// Edge softmax.
// ---------------------------------------------------------------------------
template <typename T>
void edge_softmax_fwd_impl(const int64_t* ptr, int64_t n, int64_t E, int64_t H, const T* s, T* p) {
  typedef VecT<T> V;
  constexpr int W = Simd<T>::W;
  if (E == 0 || H == 0) return;
  const Plan plan = make_plan(ptr, n, E, 8 * H, false);
  const bool vec = W % H == 0;
  for_each_chunk(int64_t(plan.chunks.size()), [&](int64_t c) {
    const Chunk& ch = plan.chunks[c];
    std::vector<T> m(H), sum(H), inv(H);
    for (int64_t r = ch.rs; r < ch.re; ++r) {
      const int64_t kb = ptr[r], nE = ptr[r + 1] - kb, cnt = nE * H;
      if (nE == 0) continue;
      const T* sr = s + kb * H;
      T* pr = p + kb * H;
      if (!vec || cnt < W) {
        for (int64_t h = 0; h < H; ++h) m[h] = -std::numeric_limits<T>::infinity(), sum[h] = T(0);
        for (int64_t q = 0; q < cnt; ++q) m[q % H] = std::max(m[q % H], sr[q]);
        for (int64_t q = 0; q < cnt; ++q) {
          pr[q] = std::exp(sr[q] - m[q % H]);
          sum[q % H] += pr[q];
        }
        for (int64_t q = 0; q < cnt; ++q) pr[q] /= sum[q % H];
        continue;
      }
      row_head_reduce<T>(
          nE, H, -std::numeric_limits<T>::infinity(), [&](int64_t f) { return loadu<V>(sr + f); },
          [](V a, V b) { return a > b ? a : b; }, [](T a, T b) { return std::max(a, b); }, m.data());
      const V mt = tile_heads(m.data(), H);
      int64_t f = 0;
      for (; f + W <= cnt; f += W) storeu(pr + f, vexp(loadu<V>(sr + f) - mt));
      if (f < cnt) {
        // Overlapping last vector: the overlap is recomputed identically.
        const int64_t o = cnt - W;
        storeu(pr + o, vexp(loadu<V>(sr + o) - mt));
      }
      row_head_reduce<T>(
          nE, H, T(0), [&](int64_t q) { return loadu<V>(pr + q); }, [](V a, V b) { return a + b; },
          [](T a, T b) { return a + b; }, sum.data());
      for (int64_t h = 0; h < H; ++h) inv[h] = T(1) / sum[h];
      const V it = tile_heads(inv.data(), H);
      // Scale in place; the overlapping tail must not be scaled twice.
      f = 0;
      for (; f + W <= cnt; f += W) storeu(pr + f, loadu<V>(pr + f) * it);
      for (; f < cnt; ++f) pr[f] *= inv[f % H];
    }
  });
}

template <typename T>
void edge_softmax_bwd_impl(const int64_t* ptr, int64_t n, int64_t E, int64_t H, const T* p, const T* g, T* gs) {
  typedef VecT<T> V;
  constexpr int W = Simd<T>::W;
  if (E == 0 || H == 0) return;
  const Plan plan = make_plan(ptr, n, E, 2 * H, false);
  const bool vec = W % H == 0;
  for_each_chunk(int64_t(plan.chunks.size()), [&](int64_t c) {
    const Chunk& ch = plan.chunks[c];
    std::vector<T> dot(H);
    for (int64_t r = ch.rs; r < ch.re; ++r) {
      const int64_t kb = ptr[r], nE = ptr[r + 1] - kb, cnt = nE * H;
      if (nE == 0) continue;
      const T* pr = p + kb * H;
      const T* gr = g + kb * H;
      T* o = gs + kb * H;
      if (!vec || cnt < W) {
        for (int64_t h = 0; h < H; ++h) dot[h] = T(0);
        for (int64_t q = 0; q < cnt; ++q) dot[q % H] += pr[q] * gr[q];
        for (int64_t q = 0; q < cnt; ++q) o[q] = pr[q] * (gr[q] - dot[q % H]);
        continue;
      }
      row_head_reduce<T>(
          nE, H, T(0), [&](int64_t f) { return loadu<V>(pr + f) * loadu<V>(gr + f); },
          [](V a, V b) { return a + b; }, [](T a, T b) { return a + b; }, dot.data());
      const V dt = tile_heads(dot.data(), H);
      int64_t f = 0;
      for (; f + W <= cnt; f += W) storeu(o + f, loadu<V>(pr + f) * (loadu<V>(gr + f) - dt));
      if (f < cnt) {
        const int64_t s = cnt - W;
        storeu(o + s, loadu<V>(pr + s) * (loadu<V>(gr + s) - dt));
      }
    }
  });
}

// ---------------------------------------------------------------------------
// GAT forward.
// ---------------------------------------------------------------------------
template <typename T>
struct GatFwd {
  typedef VecT<T> V;
  static constexpr int W = Simd<T>::W;

  const int64_t* col;
  const T* h;
  const T* a_src;
  const T* a_dst;
  int64_t E, H, C, F, HV, HP;
  T slope;
  RowTiles<T> rt;
  HeadLanes<T> hl;

  void init() {
    F = H * C;
    HV = (H + W - 1) / W;
    HP = HV * W;
    if (F >= W) {
      rt.init(F);
      hl.init(rt, C);
    }
  }
  int nh(int64_t hv) const { return int(std::min<int64_t>(W, H - hv * W)); }

  // Unnormalised piece: acc[F] = sum_k exp(e_k - m) h[j_k], l = sum_k exp(e_k - m), m = max_k e_k.
  void piece_scalar(int64_t i, int64_t kb, int64_t ke, T* acc, T* m, T* l) const {
    const T* ad = a_dst + i * H;
    for (int64_t hh = 0; hh < H; ++hh) m[hh] = -std::numeric_limits<T>::infinity(), l[hh] = T(0);
    for (int64_t f = 0; f < F; ++f) acc[f] = T(0);
    for (int64_t k = kb; k < ke; ++k) {
      const int64_t j = col[k];
      for (int64_t hh = 0; hh < H; ++hh) {
        const T e = lrelu(a_src[j * H + hh] + ad[hh], slope);
        T* ar = acc + hh * C;
        if (e > m[hh]) {
          const T sc = std::exp(m[hh] - e);
          for (int64_t c = 0; c < C; ++c) ar[c] *= sc;
          l[hh] *= sc;
          m[hh] = e;
        }
        const T p = std::exp(e - m[hh]);
        l[hh] += p;
        const T* hr = h + (j * H + hh) * C;
        for (int64_t c = 0; c < C; ++c) ar[c] += p * hr[c];
      }
    }
  }

  // Scratch: logits [kBlock * HV] vectors, weights [kBlock * HP + W] values.
  void piece_vec(int64_t i, int64_t kb, int64_t ke, T* acc, T* m_out, T* l_out, V* eb, T* pb) const {
    V adst[4], m[4], l[4];  // HV <= 4 on this path (H <= 4 W)
    for (int64_t hv = 0; hv < HV; ++hv) {
      adst[hv] = load_n(a_dst + i * H + hv * W, nh(hv));
      m[hv] = bcast<T>(-std::numeric_limits<T>::infinity());
      l[hv] = V{};
    }
    std::fill(acc, acc + F, T(0));
    const V vs = bcast<T>(slope);
    WeightSrc<T> ws;
    ws.w = pb;
    ws.ws = HP;
    ws.k_safe = std::numeric_limits<int64_t>::max();
    bool first = true;
    for (int64_t kb0 = kb; kb0 < ke; kb0 += kBlock) {
      const int64_t nb = std::min<int64_t>(kBlock, ke - kb0);
      V bm[4];
      for (int64_t hv = 0; hv < HV; ++hv) bm[hv] = bcast<T>(-std::numeric_limits<T>::infinity());
      for (int64_t b = 0; b < nb; ++b) {
        if (kb0 + b + 2 * kBlock < E) __builtin_prefetch(a_src + col[kb0 + b + 2 * kBlock] * H);
        const T* as = a_src + col[kb0 + b] * H;
        for (int64_t hv = 0; hv < HV; ++hv) {
          const V s = load_n(as + hv * W, nh(hv)) + adst[hv];
          const V e = s > V{} ? s : s * vs;
          eb[b * HV + hv] = e;
          bm[hv] = e > bm[hv] ? e : bm[hv];
        }
      }
      for (int64_t hv = 0; hv < HV; ++hv) {
        const V mn = bm[hv] > m[hv] ? bm[hv] : m[hv];
        if (!first && any_lane(mn > m[hv])) {
          const V sc = vexp(m[hv] - mn);
          l[hv] *= sc;
          for (int lane = 0; lane < nh(hv); ++lane) {
            T* ar = acc + (hv * W + lane) * C;
            const T s = sc[lane];
            if (s != T(1))
              for (int64_t c = 0; c < C; ++c) ar[c] *= s;
          }
        }
        m[hv] = mn;
      }
      first = false;
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t hv = 0; hv < HV; ++hv) {
          const V p = vexp(eb[b * HV + hv] - m[hv]);
          l[hv] += p;
          storeu(pb + b * HP + hv * W, p);
        }
      }
      TileArgs<T> A{col + kb0, nullptr, nullptr, h, F, E - kb0, 0, 0, nullptr, nullptr};
      add_edges_to_row<T, true>(rt, hl, A, ws, 0, nb, acc);
    }
    for (int64_t hv = 0; hv < HV; ++hv) {
      store_n(m_out + hv * W, m[hv], nh(hv));
      store_n(l_out + hv * W, l[hv], nh(hv));
    }
  }

  bool vec_path() const { return F >= W && HV <= 4; }

  // out[i] = acc / l, lse[i] = m + log l (empty row: 0 and -inf).
  void finalize(const T* acc, const T* m, const T* l, T* out_row, T* lse_row, T* inv) const {
    for (int64_t hh = 0; hh < H; ++hh) {
      const bool any = l[hh] > T(0);
      inv[hh] = any ? T(1) / l[hh] : T(0);
      lse_row[hh] = any ? m[hh] + std::log(l[hh]) : -std::numeric_limits<T>::infinity();
    }
    if (!vec_path()) {
      for (int64_t hh = 0; hh < H; ++hh)
        for (int64_t c = 0; c < C; ++c) out_row[hh * C + c] = acc[hh * C + c] * inv[hh];
      return;
    }
    // acc may alias out_row: the overlapping last vector is computed before
    // the one it overlaps is scaled in place, and stored after it.
    auto scaled = [&](int64_t v) {
      return loadu<V>(acc + rt.off(v)) * perm1<T>(loadu<V>(inv + hl.hb[v]), hl.idx[v]);
    };
    const V last = scaled(rt.nvt - 1);
    for (int64_t v = 0; v + 1 < rt.nvt; ++v) storeu(out_row + rt.off(v), scaled(v));
    storeu(out_row + rt.off(rt.nvt - 1), last);
  }
};

template <typename T>
void gat_fwd_impl(GatFwd<T>& G, const int64_t* ptr, int64_t n, T* out, T* lse) {
  typedef VecT<T> V;
  constexpr int W = Simd<T>::W;
  G.init();
  const int64_t F = G.F, H = G.H, HP = G.HP;
  if (n == 0) return;
  const bool vec = G.vec_path();
  const Plan plan = make_plan(ptr, n, G.E, std::max<int64_t>(F + 4 * H, 1), true);
  const int64_t np = int64_t(plan.pieces.size());
  std::vector<T> c_acc(size_t(np * F)), c_m(size_t(np * HP)), c_l(size_t(np * HP));
  for_each_chunk(int64_t(plan.chunks.size()), [&](int64_t c) {
    const Chunk& ch = plan.chunks[c];
    std::vector<V> eb(size_t(kBlock * G.HV));
    std::vector<T> pb(size_t(kBlock * HP + W)), m(HP), l(HP), inv(HP + W);
    auto run = [&](int64_t i, int64_t kb, int64_t ke, T* acc, T* mm, T* ll) {
      if (vec)
        G.piece_vec(i, kb, ke, acc, mm, ll, eb.data(), pb.data());
      else
        G.piece_scalar(i, kb, ke, acc, mm, ll);
    };
    auto do_piece = [&](int64_t p) {
      const Piece& pc = plan.pieces[p];
      run(pc.row, pc.kb, pc.ke, c_acc.data() + p * F, c_m.data() + p * HP, c_l.data() + p * HP);
    };
    if (ch.head >= 0) do_piece(ch.head);
    for (int64_t r = ch.rs; r < ch.re; ++r) {
      T* o = out + r * F;
      run(r, ptr[r], ptr[r + 1], o, m.data(), l.data());
      G.finalize(o, m.data(), l.data(), o, lse + r * H, inv.data());
    }
    if (ch.tail >= 0) do_piece(ch.tail);
  });
  // Split rows: merge the pieces' (m, l, acc) in edge order.
  for_each_split_row(plan, [&](int64_t a, int64_t b) {
    const int64_t r = plan.pieces[a].row;
    std::vector<T> acc(c_acc.begin() + a * F, c_acc.begin() + (a + 1) * F);
    std::vector<T> m(c_m.begin() + a * HP, c_m.begin() + a * HP + H), l(c_l.begin() + a * HP, c_l.begin() + a * HP + H);
    std::vector<T> inv(HP + W);
    for (int64_t p = a + 1; p < b; ++p) {
      const T* pa = c_acc.data() + p * F;
      const T* pm = c_m.data() + p * HP;
      const T* pl = c_l.data() + p * HP;
      for (int64_t hh = 0; hh < H; ++hh) {
        if (!(pl[hh] > T(0))) continue;
        const T mn = std::max(m[hh], pm[hh]);
        const T s0 = l[hh] > T(0) ? std::exp(m[hh] - mn) : T(0);
        const T s1 = std::exp(pm[hh] - mn);
        for (int64_t cc = 0; cc < G.C; ++cc) acc[hh * G.C + cc] = acc[hh * G.C + cc] * s0 + pa[hh * G.C + cc] * s1;
        l[hh] = l[hh] * s0 + pl[hh] * s1;
        m[hh] = mn;
      }
    }
    G.finalize(acc.data(), m.data(), l.data(), out + r * F, lse + r * H, inv.data());
  });
}

// ---------------------------------------------------------------------------
// GAT backward.
// ---------------------------------------------------------------------------
template <typename T>
struct GatBwd {
  typedef VecT<T> V;
  static constexpr int W = Simd<T>::W;

  const int64_t* csc_row;
  const int64_t* csc_perm;
  const T* h;
  const T* a_src;
  const T* go;   // user's grad_out [N_dst, F]
  const T* comb;  // [N_dst, S]: grad_out row, then a_dst, lse, delta (H each)
  T* de;          // [E, H] in CSR order
  int64_t E, H, C, F, HV, HP, S, block;
  T slope;
  RowTiles<T> rt;
  HeadLanes<T> hl;
  SegDot<T> sd;

  void init() {
    F = H * C;
    HV = (H + W - 1) / W;
    HP = HV * W;
    if (F >= W) {
      rt.init(F);
      hl.init(rt, C);
    }
    sd.init(int(H), int(C));
    S = (F + 3 * H + W - 1) / W * W;
    block = std::max<int64_t>(4, std::min<int64_t>(kBlock, 32768 / std::max<int64_t>(F * int64_t(sizeof(T)), 1)));
  }
  int nh(int64_t hv) const { return int(std::min<int64_t>(W, H - hv * W)); }
  bool vec_path() const { return F >= W && HV <= 4; }

  void piece_scalar(int64_t j, int64_t tb, int64_t te, T* gh, T* gas) const {
    std::fill(gh, gh + F, T(0));
    std::fill(gas, gas + H, T(0));
    const T* hj = h + j * F;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t i = csc_row[t], k = csc_perm[t];
      const T* g = comb + i * S;
      const T* ax = g + F;
      for (int64_t hh = 0; hh < H; ++hh) {
        const T s = a_src[j * H + hh] + ax[hh];
        const T e = lrelu(s, slope);
        const T p = std::exp(e - ax[H + hh]);
        T dp = T(0);
        for (int64_t c = 0; c < C; ++c) dp += g[hh * C + c] * hj[hh * C + c];
        const T ds = p * (dp - ax[2 * H + hh]);
        const T d = s > T(0) ? ds : ds * slope;
        gas[hh] += d;
        de[k * H + hh] = d;
        for (int64_t c = 0; c < C; ++c) gh[hh * C + c] += p * g[hh * C + c];
      }
    }
  }

  void piece_vec(int64_t j, int64_t tb, int64_t te, T* gh, T* gas_out, T* pb) const {
    V asrc[4], gas[4], dp[4];
    for (int64_t hv = 0; hv < HV; ++hv) {
      asrc[hv] = load_n(a_src + j * H + hv * W, nh(hv));
      gas[hv] = V{};
    }
    std::fill(gh, gh + F, T(0));
    const T* hj = h + j * F;
    const V vs = bcast<T>(slope);
    WeightSrc<T> ws;
    ws.w = pb;
    ws.ws = HP;
    ws.k_safe = std::numeric_limits<int64_t>::max();
    for (int64_t tb0 = tb; tb0 < te; tb0 += block) {
      const int64_t nb = std::min<int64_t>(block, te - tb0);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t t = tb0 + b;
        if (t + kPrefetch < E) {
          const T* gp = comb + csc_row[t + kPrefetch] * S;
          for (int64_t f = 0; f < S; f += 64 / int64_t(sizeof(T))) __builtin_prefetch(gp + f);
          // de is scattered to CSR positions: fetch the line for writing early.
          __builtin_prefetch(de + csc_perm[t + kPrefetch] * H, 1);
        }
        const int64_t i = csc_row[t], k = csc_perm[t];
        const T* g = comb + i * S;
        const T* ax = g + F;
        sd.dot(g, hj, dp);
        for (int64_t hv = 0; hv < HV; ++hv) {
          const int n = nh(hv);
          const V s = asrc[hv] + load_n(ax + hv * W, n);
          const auto pos = s > V{};
          const V e = pos ? s : s * vs;
          const V p = vexp(e - load_n(ax + H + hv * W, n));
          const V ds = p * (dp[hv] - load_n(ax + 2 * H + hv * W, n));
          const V d = pos ? ds : ds * vs;
          gas[hv] += d;
          storeu(pb + b * HP + hv * W, p);
          store_n(de + k * H + hv * W, d, n);
        }
      }
      TileArgs<T> A{csc_row + tb0, nullptr, nullptr, comb, S, E - tb0, 0, 0, nullptr, nullptr};
      add_edges_to_row<T, true>(rt, hl, A, ws, 0, nb, gh);
    }
    for (int64_t hv = 0; hv < HV; ++hv) store_n(gas_out + hv * W, gas[hv], nh(hv));
  }
};

template <typename T>
void gat_bwd_impl(GatBwd<T>& G, const int64_t* rowptr, int64_t n_dst, const int64_t* csc_ptr, int64_t n_src,
                  const T* a_dst, const T* lse, const T* out, T* gh, T* gas, T* gad) {
  typedef VecT<T> V;
  constexpr int W = Simd<T>::W;
  G.init();
  const int64_t F = G.F, H = G.H, HP = G.HP, E = G.E;
  // Each destination's grad_out row with its a_dst, lse and delta = <grad_out,
  // out> appended, rows 64-byte aligned: the transpose pass then gathers one
  // contiguous row per edge instead of four scattered ones.
  const int64_t S = G.S;
  Workspace<T> comb_ws(size_t(n_dst * S)), de(size_t(E * H));
  T* comb = comb_ws.data();
  at::parallel_for(0, n_dst, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)), [&](int64_t b, int64_t e) {
    std::vector<V> dl(G.HV);
    std::vector<T> tmp(size_t(G.HV * W));
    for (int64_t i = b; i < e; ++i) {
      T* row = comb + i * S;
      std::copy(G.go + i * F, G.go + (i + 1) * F, row);
      T* ax = row + F;
      for (int64_t hh = 0; hh < H; ++hh) {
        ax[hh] = a_dst[i * H + hh];
        ax[H + hh] = lse[i * H + hh];
      }
      G.sd.dot(G.go + i * F, out + i * F, dl.data());
      for (int64_t hv = 0; hv < G.HV; ++hv) storeu(tmp.data() + hv * W, dl[hv]);
      for (int64_t hh = 0; hh < H; ++hh) ax[2 * H + hh] = tmp[hh];
      for (int64_t f = F + 3 * H; f < S; ++f) row[f] = T(0);
    }
  });
  G.comb = comb;
  G.de = de.data();

  // Pass over the transpose: grad_h, grad_a_src, and de at CSR positions.
  if (n_src > 0) {
    const bool vec = G.vec_path();
    const Plan plan = make_plan(csc_ptr, n_src, E, std::max<int64_t>(2 * F + 4 * H, 1), true);
    const int64_t np = int64_t(plan.pieces.size());
    std::vector<T> c_gh(size_t(np * F)), c_gas(size_t(np * HP));
    for_each_chunk(int64_t(plan.chunks.size()), [&](int64_t c) {
      const Chunk& ch = plan.chunks[c];
      std::vector<T> pb(size_t(G.block * HP + W));
      auto run = [&](int64_t j, int64_t tb, int64_t te, T* g, T* s) {
        if (vec)
          G.piece_vec(j, tb, te, g, s, pb.data());
        else
          G.piece_scalar(j, tb, te, g, s);
      };
      if (ch.head >= 0) {
        const Piece& pc = plan.pieces[ch.head];
        run(pc.row, pc.kb, pc.ke, c_gh.data() + ch.head * F, c_gas.data() + ch.head * HP);
      }
      for (int64_t j = ch.rs; j < ch.re; ++j) run(j, csc_ptr[j], csc_ptr[j + 1], gh + j * F, gas + j * H);
      if (ch.tail >= 0) {
        const Piece& pc = plan.pieces[ch.tail];
        run(pc.row, pc.kb, pc.ke, c_gh.data() + ch.tail * F, c_gas.data() + ch.tail * HP);
      }
    });
    for_each_split_row(plan, [&](int64_t a, int64_t b) {
      const int64_t j = plan.pieces[a].row;
      for (int64_t f = 0; f < F; ++f) {
        T s = c_gh[a * F + f];
        for (int64_t p = a + 1; p < b; ++p) s += c_gh[p * F + f];
        gh[j * F + f] = s;
      }
      for (int64_t hh = 0; hh < H; ++hh) {
        T s = c_gas[a * HP + hh];
        for (int64_t p = a + 1; p < b; ++p) s += c_gas[p * HP + hh];
        gas[j * H + hh] = s;
      }
    });
  }

  // grad_a_dst: row sums of de over CSR rows.
  if (n_dst > 0) {
    const Plan plan = make_plan(rowptr, n_dst, E, std::max<int64_t>(H, 1), false);
    const T* d = de.data();
    for_each_chunk(int64_t(plan.chunks.size()), [&](int64_t c) {
      const Chunk& ch = plan.chunks[c];
      for (int64_t i = ch.rs; i < ch.re; ++i) {
        const int64_t kb = rowptr[i], nE = rowptr[i + 1] - kb;
        T* o = gad + i * H;
        if (W % H == 0 && nE * H >= W) {
          row_head_reduce<T>(
              nE, H, T(0), [&](int64_t f) { return loadu<V>(d + kb * H + f); }, [](V x, V y) { return x + y; },
              [](T x, T y) { return x + y; }, o);
        } else {
          for (int64_t hh = 0; hh < H; ++hh) o[hh] = T(0);
          for (int64_t k = kb; k < kb + nE; ++k)
            for (int64_t hh = 0; hh < H; ++hh) o[hh] += d[k * H + hh];
        }
      }
    });
  }
}

}  // namespace

void edge_softmax_forward(const at::Tensor& rowptr, const at::Tensor& scores, at::Tensor& p) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "edge_softmax_fwd", [&] {
    edge_softmax_fwd_impl<scalar_t>(rowptr.data_ptr<int64_t>(), rowptr.numel() - 1, scores.size(0), scores.size(1),
                                    scores.data_ptr<scalar_t>(), p.data_ptr<scalar_t>());
  });
}

void edge_softmax_backward(const at::Tensor& rowptr, const at::Tensor& p, const at::Tensor& grad_p,
                           at::Tensor& grad_s) {
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "edge_softmax_bwd", [&] {
    edge_softmax_bwd_impl<scalar_t>(rowptr.data_ptr<int64_t>(), rowptr.numel() - 1, p.size(0), p.size(1),
                                    p.data_ptr<scalar_t>(), grad_p.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>());
  });
}

void gat_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& h, const at::Tensor& a_src,
                 const at::Tensor& a_dst, double negative_slope, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gat_fwd", [&] {
    GatFwd<scalar_t> G;
    G.col = col.data_ptr<int64_t>();
    G.h = h.data_ptr<scalar_t>();
    G.a_src = a_src.data_ptr<scalar_t>();
    G.a_dst = a_dst.data_ptr<scalar_t>();
    G.E = col.numel();
    G.H = h.size(1);
    G.C = h.size(2);
    G.slope = scalar_t(negative_slope);
    gat_fwd_impl<scalar_t>(G, rowptr.data_ptr<int64_t>(), rowptr.numel() - 1, out.data_ptr<scalar_t>(),
                           lse.data_ptr<scalar_t>());
  });
}

void gat_backward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& csc_ptr,
                  const at::Tensor& csc_row, const at::Tensor& csc_perm, const at::Tensor& h,
                  const at::Tensor& a_src, const at::Tensor& a_dst, double negative_slope, const at::Tensor& out,
                  const at::Tensor& lse, const at::Tensor& grad_out, at::Tensor& grad_h, at::Tensor& grad_a_src,
                  at::Tensor& grad_a_dst) {
  (void)col;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gat_bwd", [&] {
    GatBwd<scalar_t> G;
    G.csc_row = csc_row.data_ptr<int64_t>();
    G.csc_perm = csc_perm.data_ptr<int64_t>();
    G.h = h.data_ptr<scalar_t>();
    G.a_src = a_src.data_ptr<scalar_t>();
    G.go = grad_out.data_ptr<scalar_t>();
    G.E = csc_row.numel();
    G.H = h.size(1);
    G.C = h.size(2);
    G.slope = scalar_t(negative_slope);
    gat_bwd_impl<scalar_t>(G, rowptr.data_ptr<int64_t>(), rowptr.numel() - 1, csc_ptr.data_ptr<int64_t>(),
                           csc_ptr.numel() - 1, a_dst.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(), grad_a_src.data_ptr<scalar_t>(),
                           grad_a_dst.data_ptr<scalar_t>());
  });
}

}  // namespace gnn
}  // namespace frontiers_fast

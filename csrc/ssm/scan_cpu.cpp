// Selective scan (Mamba's S6; Gu & Dao 2023, arXiv:2312.00752) on the CPU:
// the "cpp" backend of frontiers_fast::selective_scan and ::selective_scan_bwd,
// registered as frontiers_fast_native::* under the CPU key.  The schemas and the
// calling convention are in frontiers_fast/ops/ssm.py.
//
// Layout of the work.  The recurrence h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] u[t]
// is independent per (batch row, channel, state), so a SIMD vector holds W
// channels (16 in float32) and the loop over the N states runs inside each
// time step: N independent exp/FMA chains per step, no horizontal sums in the
// forward, and the per-step scalars of variable B and C (shared by all the
// channels of a group) are broadcast from a time-major copy.  Activations are
// [batch, dim, L] with L contiguous, so each block of W channels moves through
// time in tiles of kChunk steps, transposed into [step][channel] buffers on the
// way in and out (that costs 1/N of the exps).  Blocks never straddle a group
// of B or C, so a block reads one group's B and C.
//
// The exps -- one per (row, channel, state, step) -- bound the kernel, so they
// are the polynomial vexp of common/simd.h; softplus and silu are vectorised
// along their own axis.
//
// The backward keeps no [batch, dim, N, L] states.  A forward pass stores the
// state at the start of every chunk (N W values per chunk); the reverse pass
// then recomputes each chunk's states and exps from its checkpoint into an
// L2-sized buffer and runs the adjoint through it.  Memory: O(rows dim N L /
// kChunk).
//
// Determinism.  Every gradient is a fixed-order sum that does not depend on
// the thread count or the schedule: per-channel gradients (A, D, delta_bias,
// constant B and C) are summed over time inside a task and written per row;
// the channel sums of variable B and C are summed over a block's lanes with a
// fixed reduction tree, then over the blocks of a task in order, and written
// per task; a final pass adds the per-row and per-task partials in index
// order.  No atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/convert.h"
#include "common/sched.h"
#include "common/simd.h"

namespace frontiers_fast {
namespace ssm {
namespace {

constexpr int64_t kChunk = 64;        // time steps per tile and per checkpoint
constexpr int64_t kTasksPerUnit = 8;  // backward: tasks a group's channels are cut into

enum Coef { kConst = 0, kTime = 1 };  // how a block reads B or C

template <typename T>
struct Scan {
  typedef acc_t<T> A;
  typedef VecT<A> V;
  static constexpr int W = Simd<A>::W;

  int64_t batch = 0, dim = 0, L = 0, N = 0, rows = 0;
  const T* u = nullptr;
  const T* delta = nullptr;
  const T* z = nullptr;
  const A* Am = nullptr;    // [dim, N]
  const A* D = nullptr;     // [dim]
  const A* bias = nullptr;  // [dim]
  const A* h0 = nullptr;    // [rows, dim, N]
  bool softplus = false;
  const int64_t* cu = nullptr;
  // B and C: constant [dim, N] (Bc) or a time-major copy [batch, G, L, N] (Bt).
  Coef bmode = kConst, cmode = kConst;
  const A* Bc = nullptr;
  const A* Cc = nullptr;
  const A* Bt = nullptr;
  const A* Ct = nullptr;
  int64_t GB = 1, GC = 1, cpgB = 1, cpgC = 1;
  // Channels are cut into units that lie in one group of B and one of C, and
  // each unit into blocks of W channels.
  int64_t unit = 1, nunits = 0, bpu = 0, nblocks = 0;

  void plan() {
    unit = std::gcd(cpgB, cpgC);
    nunits = unit > 0 ? dim / unit : 0;
    bpu = (unit + W - 1) / W;
    nblocks = nunits * bpu;
  }
  void block(int64_t cb, int64_t& d0, int& nc) const {
    const int64_t k = cb / bpu, j = cb % bpu;
    d0 = k * unit + j * W;
    nc = int(std::min<int64_t>(W, unit - j * W));
  }
  void span(int64_t r, int64_t& b, int64_t& t0, int64_t& t1) const {
    if (cu) {
      b = 0;
      t0 = cu[r];
      t1 = cu[r + 1];
    } else {
      b = r;
      t0 = 0;
      t1 = L;
    }
  }

  // lanes(p, stride): lane c = p[c * stride] for the block's nc channels, zero beyond.
  static V lanes(const A* p, int64_t stride, int nc) {
    V v = V{};
    if (p)
      for (int c = 0; c < nc; ++c) v[c] = p[c * stride];
    return v;
  }
  // [channel][time] rows of src (row length L) -> tile[t * W + c], in A.
  // Lanes past the block's nc channels are zeroed: a tile is reused across the
  // blocks of a task, and a partial block must not see its predecessor's data.
  void load_tile(const T* src, int64_t b, int64_t d0, int nc, int64_t tc, int64_t nt, A* tile) const {
    for (int c = 0; c < nc; ++c) {
      const T* p = src + ((b * dim + d0 + c) * L + tc);
      for (int64_t t = 0; t < nt; ++t) tile[t * W + c] = A(p[t]);
    }
    if (nc < W)
      for (int64_t t = 0; t < nt; ++t) std::fill(tile + t * W + nc, tile + (t + 1) * W, A(0));
  }
  template <typename O>
  void store_tile(const A* tile, int64_t b, int64_t d0, int nc, int64_t tc, int64_t nt, O* dst) const {
    for (int c = 0; c < nc; ++c) {
      O* p = dst + ((b * dim + d0 + c) * L + tc);
      for (int64_t t = 0; t < nt; ++t) p[t] = O(tile[t * W + c]);
    }
  }
  // delta (+ bias, softplus) in place, and dt * u.
  void discretize(A* DT, const A* U, A* DTU, int64_t nt, V biasv) const {
    for (int64_t t = 0; t < nt; ++t) {
      V dt = loadu<V>(DT + t * W) + biasv;
      if (softplus) dt = vsoftplus(dt);
      storeu(DT + t * W, dt);
      storeu(DTU + t * W, dt * loadu<V>(U + t * W));
    }
  }
  const A* time_row(const A* Mt, int64_t G, int64_t cpg, int64_t b, int64_t d0) const {
    return Mt ? Mt + (b * G + d0 / cpg) * L * N : nullptr;
  }

  // ---------------------------------------------------------------- forward
  // NF > 0: N is that constant, so the loop over states unrolls and the states
  // stay in registers (N = 16 is Mamba's default).
  template <int BM, int CM, int NF>
  void forward_task(int64_t r, int64_t cb, T* out, A* last) const {
    int64_t b, t0, t1, d0;
    int nc;
    span(r, b, t0, t1);
    block(cb, d0, nc);
    const int64_t NN = NF > 0 ? NF : N;
    std::vector<V> Av(NN), hv(NF > 0 ? 0 : NN), Bv(BM == kConst ? NN : 0), Cv(CM == kConst ? NN : 0);
    V hfix[NF > 0 ? NF : 1];
    V* h = NF > 0 ? hfix : hv.data();
    for (int64_t n = 0; n < NN; ++n) {
      Av[n] = lanes(Am + d0 * N + n, N, nc);
      h[n] = lanes(h0 ? h0 + (r * dim + d0) * N + n : nullptr, N, nc);
      if constexpr (BM == kConst) Bv[n] = lanes(Bc + d0 * N + n, N, nc);
      if constexpr (CM == kConst) Cv[n] = lanes(Cc + d0 * N + n, N, nc);
    }
    const V Dv = lanes(D ? D + d0 : nullptr, 1, nc), biasv = lanes(bias ? bias + d0 : nullptr, 1, nc);
    const A* brow = time_row(Bt, GB, cpgB, b, d0);
    const A* crow = time_row(Ct, GC, cpgC, b, d0);
    const V* Ap = Av.data();
    alignas(64) A U[kChunk * W] = {}, DT[kChunk * W] = {}, DTU[kChunk * W], Y[kChunk * W], Z[kChunk * W] = {};
    for (int64_t tc = t0; tc < t1; tc += kChunk) {
      const int64_t nt = std::min(kChunk, t1 - tc);
      load_tile(u, b, d0, nc, tc, nt, U);
      load_tile(delta, b, d0, nc, tc, nt, DT);
      discretize(DT, U, DTU, nt, biasv);
      for (int64_t t = 0; t < nt; ++t) {
        const V dt = loadu<V>(DT + t * W), dtu = loadu<V>(DTU + t * W);
        V y = D ? Dv * loadu<V>(U + t * W) : V{};
        const A* bt = BM == kTime ? brow + (tc + t) * N : nullptr;
        const A* ct = CM == kTime ? crow + (tc + t) * N : nullptr;
#pragma GCC unroll 16
        for (int64_t n = 0; n < NN; ++n) {
          const V dA = vexp(dt * Ap[n]);
          const V bn = BM == kConst ? Bv[n] : bcast<A>(bt[n]);
          const V cn = CM == kConst ? Cv[n] : bcast<A>(ct[n]);
          h[n] = fmadd(dA, h[n], dtu * bn);
          y = fmadd(h[n], cn, y);
        }
        storeu(Y + t * W, y);
      }
      if (z) {
        load_tile(z, b, d0, nc, tc, nt, Z);
        for (int64_t t = 0; t < nt; ++t) {
          const V zz = loadu<V>(Z + t * W);
          storeu(Y + t * W, loadu<V>(Y + t * W) * zz * vsigmoid<A>(zz));
        }
      }
      store_tile(Y, b, d0, nc, tc, nt, out);
    }
    for (int c = 0; c < nc; ++c)
      for (int64_t n = 0; n < NN; ++n) last[(r * dim + d0 + c) * N + n] = h[n][c];
  }

  template <int BM, int CM>
  void forward(T* out, A* last) const {
    for_each_chunk(rows * nblocks, [&](int64_t task) {
      if (N == 16)
        forward_task<BM, CM, 16>(task / nblocks, task % nblocks, out, last);
      else
        forward_task<BM, CM, 0>(task / nblocks, task % nblocks, out, last);
    });
  }

  // ---------------------------------------------------------------- backward
  struct Grads {
    const T* gout = nullptr;   // [batch, dim, L]
    const A* glast = nullptr;  // [rows, dim, N]
    T* gu = nullptr;
    T* gdelta = nullptr;
    T* gz = nullptr;
    A* gh0 = nullptr;  // [rows, dim, N]
    // per-row partials, summed over rows afterwards
    A* pA = nullptr;     // [rows, dim, N]
    A* pBc = nullptr;    // [rows, dim, N] (constant B)
    A* pCc = nullptr;    // [rows, dim, N] (constant C)
    A* pD = nullptr;     // [rows, dim]
    A* pbias = nullptr;  // [rows, dim]
    // per-task channel sums of variable B and C: [batch, nunits, kTasksPerUnit, L, N]
    A* pBt = nullptr;
    A* pCt = nullptr;
    int64_t nsb = 1, sb = 1;  // tasks per unit, blocks per task
  };

  template <int BM, int CM>
  void backward_task(int64_t r, int64_t k, int64_t s, const Grads& g) const {
    const int64_t cb0 = k * bpu + s * g.sb, cb1 = std::min(k * bpu + (s + 1) * g.sb, (k + 1) * bpu);
    int64_t b, t0, t1;
    span(r, b, t0, t1);
    const int64_t nblk = std::max<int64_t>(cb1 - cb0, 0);
    const int64_t nchunks = (t1 - t0 + kChunk - 1) / kChunk;
    // per block: parameters, state, adjoint, gradients
    std::vector<V> Av(nblk * N), Bv(BM == kConst ? nblk * N : 0), Cv(CM == kConst ? nblk * N : 0);
    std::vector<V> lam(nblk * N), gA(nblk * N), gBc(BM == kConst ? nblk * N : 0), gCc(CM == kConst ? nblk * N : 0);
    std::vector<V> ck(nblk * std::max<int64_t>(nchunks, 1) * N);
    std::vector<V> Dv(nblk), biasv(nblk), gD(nblk), gbias(nblk);
    std::vector<int64_t> d0s(nblk);
    std::vector<int> ncs(nblk);
    for (int64_t i = 0; i < nblk; ++i) {
      block(cb0 + i, d0s[i], ncs[i]);
      const int64_t d0 = d0s[i];
      const int nc = ncs[i];
      for (int64_t n = 0; n < N; ++n) {
        Av[i * N + n] = lanes(Am + d0 * N + n, N, nc);
        if constexpr (BM == kConst) Bv[i * N + n] = lanes(Bc + d0 * N + n, N, nc);
        if constexpr (CM == kConst) Cv[i * N + n] = lanes(Cc + d0 * N + n, N, nc);
        lam[i * N + n] = lanes(g.glast ? g.glast + (r * dim + d0) * N + n : nullptr, N, nc);
        gA[i * N + n] = V{};
        if constexpr (BM == kConst) gBc[i * N + n] = V{};
        if constexpr (CM == kConst) gCc[i * N + n] = V{};
      }
      Dv[i] = lanes(D ? D + d0 : nullptr, 1, nc);
      biasv[i] = lanes(bias ? bias + d0 : nullptr, 1, nc);
      gD[i] = gbias[i] = V{};
    }
    alignas(64) A U[kChunk * W] = {}, DT[kChunk * W] = {}, RAW[kChunk * W] = {}, DTU[kChunk * W], Z[kChunk * W] = {},
                                  G[kChunk * W] = {}, Y[kChunk * W], GU[kChunk * W], GDT[kChunk * W], GZ[kChunk * W];
    // Pass 1: the state at the start of every chunk.
    for (int64_t i = 0; i < nblk; ++i) {
      const int64_t d0 = d0s[i];
      const int nc = ncs[i];
      const A* brow = time_row(Bt, GB, cpgB, b, d0);
      std::vector<V> h(N);
      for (int64_t n = 0; n < N; ++n) h[n] = lanes(h0 ? h0 + (r * dim + d0) * N + n : nullptr, N, nc);
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t tc = t0 + c * kChunk, nt = std::min(kChunk, t1 - tc);
        std::copy(h.begin(), h.end(), ck.begin() + (i * nchunks + c) * N);
        if (c == nchunks - 1) break;  // the last chunk's end state is not needed
        load_tile(u, b, d0, nc, tc, nt, U);
        load_tile(delta, b, d0, nc, tc, nt, DT);
        discretize(DT, U, DTU, nt, biasv[i]);
        for (int64_t t = 0; t < nt; ++t) {
          const V dt = loadu<V>(DT + t * W), dtu = loadu<V>(DTU + t * W);
          const A* bt = BM == kTime ? brow + (tc + t) * N : nullptr;
          for (int64_t n = 0; n < N; ++n) {
            const V bn = BM == kConst ? Bv[i * N + n] : bcast<A>(bt[n]);
            h[n] = fmadd(vexp(dt * Av[i * N + n]), h[n], dtu * bn);
          }
        }
      }
    }
    // Pass 2: chunks in reverse; each chunk's states and exps are recomputed.
    std::vector<V> H(kChunk * N), DA(kChunk * N), PB(BM == kTime ? N : 0), PC(CM == kTime ? N : 0);
    std::vector<A> accB(BM == kTime ? kChunk * N : 0), accC(CM == kTime ? kChunk * N : 0);
    SegDot<A> seg;
    seg.init(int(N), W);
    std::vector<V> red((N + W - 1) / W + 1);
    for (int64_t c = nchunks - 1; c >= 0; --c) {
      const int64_t tc = t0 + c * kChunk, nt = std::min(kChunk, t1 - tc);
      std::fill(accB.begin(), accB.end(), A(0));
      std::fill(accC.begin(), accC.end(), A(0));
      for (int64_t i = 0; i < nblk; ++i) {
        const int64_t d0 = d0s[i];
        const int nc = ncs[i];
        const A* brow = time_row(Bt, GB, cpgB, b, d0);
        const A* crow = time_row(Ct, GC, cpgC, b, d0);
        const V* Ai = Av.data() + i * N;
        V* lami = lam.data() + i * N;
        load_tile(u, b, d0, nc, tc, nt, U);
        load_tile(delta, b, d0, nc, tc, nt, RAW);
        std::memcpy(DT, RAW, sizeof(A) * nt * W);
        discretize(DT, U, DTU, nt, biasv[i]);
        if (softplus)
          for (int64_t t = 0; t < nt; ++t) storeu(RAW + t * W, loadu<V>(RAW + t * W) + biasv[i]);
        load_tile(g.gout, b, d0, nc, tc, nt, G);
        if (z) load_tile(z, b, d0, nc, tc, nt, Z);
        // recompute the chunk
        {
          std::vector<V> h(ck.begin() + (i * nchunks + c) * N, ck.begin() + (i * nchunks + c + 1) * N);
          for (int64_t t = 0; t < nt; ++t) {
            const V dt = loadu<V>(DT + t * W), dtu = loadu<V>(DTU + t * W);
            const A* bt = BM == kTime ? brow + (tc + t) * N : nullptr;
            const A* ct = CM == kTime ? crow + (tc + t) * N : nullptr;
            V y = D ? Dv[i] * loadu<V>(U + t * W) : V{};
            for (int64_t n = 0; n < N; ++n) {
              const V dA = vexp(dt * Ai[n]);
              const V bn = BM == kConst ? Bv[i * N + n] : bcast<A>(bt[n]);
              h[n] = fmadd(dA, h[n], dtu * bn);
              DA[t * N + n] = dA;
              H[t * N + n] = h[n];
              if (z) y = fmadd(h[n], CM == kConst ? Cv[i * N + n] : bcast<A>(ct[n]), y);
            }
            storeu(Y + t * W, y);
          }
        }
        const V* hstart = ck.data() + (i * nchunks + c) * N;
        // the channel sums of B and C gradients add only the block's own lanes
        const IdxT<A> live = iota<A>() < (IdxT<A>{} + nc);
        V gDi = gD[i], gbi = gbias[i];
        for (int64_t t = nt - 1; t >= 0; --t) {
          const V gt = loadu<V>(G + t * W), ut = loadu<V>(U + t * W);
          const V dt = loadu<V>(DT + t * W), dtu = loadu<V>(DTU + t * W);
          V gy = gt;
          if (z) {
            const V zz = loadu<V>(Z + t * W), sg = vsigmoid<A>(zz);
            const V one = bcast<A>(A(1));
            storeu(GZ + t * W, gt * loadu<V>(Y + t * W) * sg * (one + zz * (one - sg)));
            gy = gt * zz * sg;
          }
          gDi = fmadd(gy, ut, gDi);
          V gu = D ? gy * Dv[i] : V{}, gdt = V{}, lamB = V{};
          const A* bt = BM == kTime ? brow + (tc + t) * N : nullptr;
          const A* ct = CM == kTime ? crow + (tc + t) * N : nullptr;
          const V* Ht = H.data() + t * N;
          const V* Hp = t > 0 ? H.data() + (t - 1) * N : hstart;
          const V* DAt = DA.data() + t * N;
          for (int64_t n = 0; n < N; ++n) {
            const V cn = CM == kConst ? Cv[i * N + n] : bcast<A>(ct[n]);
            const V bn = BM == kConst ? Bv[i * N + n] : bcast<A>(bt[n]);
            const V l = fmadd(gy, cn, lami[n]);
            const V gdA = l * Hp[n] * DAt[n];
            gA[i * N + n] = fmadd(gdA, dt, gA[i * N + n]);
            gdt = fmadd(gdA, Ai[n], gdt);
            lamB = fmadd(l, bn, lamB);
            if constexpr (CM == kConst)
              gCc[i * N + n] = fmadd(gy, Ht[n], gCc[i * N + n]);
            else
              PC[n] = select<A>(live, gy * Ht[n], V{});
            if constexpr (BM == kConst)
              gBc[i * N + n] = fmadd(l, dtu, gBc[i * N + n]);
            else
              PB[n] = select<A>(live, l * dtu, V{});
            lami[n] = l * DAt[n];
          }
          // channel sums of this step's B and C gradients (fixed reduction tree)
          auto fold = [&](const std::vector<V>& P, A* acc) {
            seg.run([&](int64_t o) { return loadu<V>(P.data() + o / W); },
                    [&](int64_t f) { return P[f / W][f % W]; }, red.data());
            for (int64_t n = 0; n < N; ++n) acc[t * N + n] += red[n / W][n % W];
          };
          if constexpr (BM == kTime) fold(PB, accB.data());
          if constexpr (CM == kTime) fold(PC, accC.data());
          gdt = fmadd(lamB, ut, gdt);
          gu = fmadd(lamB, dt, gu);
          if (softplus) {
            const V raw = loadu<V>(RAW + t * W);
            gdt = raw > bcast<A>(A(kSoftplusThreshold)) ? gdt : gdt * vsigmoid<A>(raw);
          }
          gbi += gdt;
          storeu(GU + t * W, gu);
          storeu(GDT + t * W, gdt);
        }
        gD[i] = gDi;
        gbias[i] = gbi;
        store_tile(GU, b, d0, nc, tc, nt, g.gu);
        store_tile(GDT, b, d0, nc, tc, nt, g.gdelta);
        if (z) store_tile(GZ, b, d0, nc, tc, nt, g.gz);
      }
      const int64_t part = ((b * nunits + k) * g.nsb + s) * L;
      if constexpr (BM == kTime) std::copy(accB.begin(), accB.begin() + nt * N, g.pBt + (part + tc) * N);
      if constexpr (CM == kTime) std::copy(accC.begin(), accC.begin() + nt * N, g.pCt + (part + tc) * N);
    }
    for (int64_t i = 0; i < nblk; ++i) {
      const int64_t d0 = d0s[i];
      for (int c = 0; c < ncs[i]; ++c) {
        const int64_t rd = r * dim + d0 + c;
        for (int64_t n = 0; n < N; ++n) {
          if (g.gh0) g.gh0[rd * N + n] = lam[i * N + n][c];
          g.pA[rd * N + n] = gA[i * N + n][c];
          if constexpr (BM == kConst) g.pBc[rd * N + n] = gBc[i * N + n][c];
          if constexpr (CM == kConst) g.pCc[rd * N + n] = gCc[i * N + n][c];
        }
        g.pD[rd] = gD[i][c];
        g.pbias[rd] = gbias[i][c];
      }
    }
  }

  template <int BM, int CM>
  void backward(const Grads& g) const {
    const int64_t ntasks = rows * nunits * g.nsb;
    for_each_chunk(ntasks, [&](int64_t task) {
      const int64_t r = task / (nunits * g.nsb), rest = task % (nunits * g.nsb);
      backward_task<BM, CM>(r, rest / g.nsb, rest % g.nsb, g);
    });
  }
};

// dst[m] = sum over r of src[r M + m], r in increasing order for every m: the
// split over threads is along m only, so the sums do not depend on it (a
// torch reduction may split the reduced axis when the output is small).
template <typename A>
at::Tensor sum_rows(const at::Tensor& part, int64_t R) {
  std::vector<int64_t> shape(part.sizes().begin() + 1, part.sizes().end());
  int64_t M = 1;
  for (int64_t v : shape) M *= v;
  at::Tensor out = at::empty(shape, part.options());
  const A* src = part.const_data_ptr<A>();
  A* dst = out.mutable_data_ptr<A>();
  at::parallel_for(0, M, 1 << 14, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) dst[m] = A(0);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t m = m0; m < m1; ++m) dst[m] += src[r * M + m];
  });
  return out;
}

// ------------------------------------------------------------------ arguments
constexpr const char* kFwd = "frontiers_fast_native::selective_scan (cpp)";
constexpr const char* kBwd = "frontiers_fast_native::selective_scan_bwd (cpp)";

void check_float(const at::Tensor& t, const char* op, const char* name, at::ScalarType want, int64_t dim) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}


struct Prepared {
  at::Tensor u, delta, z, A, D, bias, h0, Bc, Cc, Bt, Ct, cu;
  int64_t batch, dim, L, N, rows;
};

// The time-major [batch, G, L, N] copy of a variable or grouped B or C, in the accumulate dtype.
at::Tensor time_major(const at::Tensor& M, at::ScalarType acc) {
  at::Tensor m = M.dim() == 3 ? M.unsqueeze(1) : M;  // [batch, G, N, L]
  return m.transpose(2, 3).to(acc).contiguous();
}

Prepared prepare(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                 const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
                 const std::optional<at::Tensor>& cu_seqlens) {
  Prepared p;
  check_cpu(u, op, "u");
  TORCH_CHECK(u.dim() == 3, op, ": u must be [batch, dim, L], got shape ", u.sizes());
  const auto T = u.scalar_type();
  const auto acc = T == at::kDouble ? at::kDouble : at::kFloat;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.L = u.size(2);
  check_float(delta, op, "delta", T, 3);
  TORCH_CHECK(delta.sizes() == u.sizes(), op, ": delta must have u's shape ", u.sizes(), ", got ", delta.sizes());
  check_float(A, op, "A", acc, 2);
  TORCH_CHECK(A.size(0) == p.dim, op, ": A must be [dim, N] with dim=", p.dim, ", got ", A.sizes());
  p.N = A.size(1);
  p.u = u.contiguous();
  p.delta = delta.contiguous();
  p.A = A.contiguous();
  auto bc = [&](const at::Tensor& M, const char* name, at::Tensor& constant, at::Tensor& timed) {
    check_cpu(M, op, name);
    if (M.dim() == 2) {
      check_float(M, op, name, acc, 2);
      TORCH_CHECK(M.size(0) == p.dim && M.size(1) == p.N, op, ": constant ", name, " must be [dim, N], got ",
                  M.sizes());
      constant = M.contiguous();
    } else {
      check_float(M, op, name, T, M.dim());
      TORCH_CHECK(M.dim() == 3 || M.dim() == 4, op, ": ", name, " must be [batch, N, L] or [batch, G, N, L]");
      const int64_t G = M.dim() == 3 ? 1 : M.size(1);
      TORCH_CHECK(M.size(0) == p.batch && G >= 1 && p.dim % G == 0 && M.size(-2) == p.N && M.size(-1) == p.L, op,
                  ": ", name, " has shape ", M.sizes(), ", which does not fit u ", u.sizes(), " and N=", p.N);
      timed = time_major(M, acc);
    }
  };
  bc(B, "B", p.Bc, p.Bt);
  bc(C, "C", p.Cc, p.Ct);
  auto vec = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return at::Tensor();
    check_float(*t, op, name, acc, 1);
    TORCH_CHECK(t->size(0) == p.dim, op, ": ", name, " must be [dim], got ", t->sizes());
    return t->contiguous();
  };
  p.D = vec(D, "D");
  p.bias = vec(delta_bias, "delta_bias");
  if (z.has_value()) {
    check_float(*z, op, "z", T, 3);
    TORCH_CHECK(z->sizes() == u.sizes(), op, ": z must have u's shape ", u.sizes(), ", got ", z->sizes());
    p.z = z->contiguous();
  }
  p.rows = p.batch;
  if (cu_seqlens.has_value()) {
    p.cu = seqlens_arg(*cu_seqlens, p.batch, p.L, op, "cu_seqlens", "u");
    p.rows = p.cu.numel() - 1;
  }
  if (initial_state.has_value()) {
    check_float(*initial_state, op, "initial_state", acc, 3);
    TORCH_CHECK(initial_state->size(0) == p.rows && initial_state->size(1) == p.dim && initial_state->size(2) == p.N,
                op, ": initial_state must be [", p.rows, ", ", p.dim, ", ", p.N, "], got ", initial_state->sizes());
    p.h0 = initial_state->contiguous();
  }
  return p;
}

template <typename T>
Scan<T> make_scan(const Prepared& p, bool softplus) {
  typedef acc_t<T> A;
  Scan<T> s;
  s.batch = p.batch;
  s.dim = p.dim;
  s.L = p.L;
  s.N = p.N;
  s.rows = p.rows;
  s.u = p.u.const_data_ptr<T>();
  s.delta = p.delta.const_data_ptr<T>();
  s.z = p.z.defined() ? p.z.const_data_ptr<T>() : nullptr;
  s.Am = p.A.const_data_ptr<A>();
  s.D = p.D.defined() ? p.D.const_data_ptr<A>() : nullptr;
  s.bias = p.bias.defined() ? p.bias.const_data_ptr<A>() : nullptr;
  s.h0 = p.h0.defined() ? p.h0.const_data_ptr<A>() : nullptr;
  s.softplus = softplus;
  s.cu = p.cu.defined() ? p.cu.const_data_ptr<int64_t>() : nullptr;
  s.bmode = p.Bc.defined() ? kConst : kTime;
  s.cmode = p.Cc.defined() ? kConst : kTime;
  if (p.Bc.defined()) s.Bc = p.Bc.const_data_ptr<A>();
  if (p.Cc.defined()) s.Cc = p.Cc.const_data_ptr<A>();
  if (p.Bt.defined()) s.Bt = p.Bt.const_data_ptr<A>();
  if (p.Ct.defined()) s.Ct = p.Ct.const_data_ptr<A>();
  s.GB = p.Bt.defined() ? p.Bt.size(1) : 1;
  s.GC = p.Ct.defined() ? p.Ct.size(1) : 1;
  s.cpgB = std::max<int64_t>(p.dim / s.GB, 1);
  s.cpgC = std::max<int64_t>(p.dim / s.GC, 1);
  s.plan();
  return s;
}

template <class Fn>
void by_modes(Coef bm, Coef cm, const Fn& fn) {
  if (bm == kConst && cm == kConst)
    fn(std::integral_constant<int, kConst>{}, std::integral_constant<int, kConst>{});
  else if (bm == kConst)
    fn(std::integral_constant<int, kConst>{}, std::integral_constant<int, kTime>{});
  else if (cm == kConst)
    fn(std::integral_constant<int, kTime>{}, std::integral_constant<int, kConst>{});
  else
    fn(std::integral_constant<int, kTime>{}, std::integral_constant<int, kTime>{});
}

std::tuple<at::Tensor, at::Tensor> selective_scan_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens) {
  const Prepared p = prepare(kFwd, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens);
  at::Tensor out = new_output(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor last = new_output({p.rows, p.dim, p.N}, A.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_cpu", [&] {
    const Scan<scalar_t> s = make_scan<scalar_t>(p, delta_softplus);
    auto* o = out.mutable_data_ptr<scalar_t>();
    auto* h = last.mutable_data_ptr<acc_t<scalar_t>>();
    by_modes(s.bmode, s.cmode, [&](auto bm, auto cm) { s.template forward<decltype(bm)::value, decltype(cm)::value>(o, h); });
  });
  return {out, last};
}

using Grads9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor>;

Grads9 selective_scan_bwd_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const std::optional<at::Tensor>& D,
                              const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                              bool delta_softplus, const std::optional<at::Tensor>& initial_state,
                              const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& grad_out,
                              const std::optional<at::Tensor>& grad_last_state) {
  const Prepared p = prepare(kBwd, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens);
  const auto acc = A.scalar_type();
  check_float(grad_out, kBwd, "grad_out", u.scalar_type(), 3);
  TORCH_CHECK(grad_out.sizes() == u.sizes(), kBwd, ": grad_out must have u's shape");
  const at::Tensor gout = grad_out.contiguous();
  at::Tensor glast;
  if (grad_last_state.has_value()) {
    check_float(*grad_last_state, kBwd, "grad_last_state", acc, 3);
    TORCH_CHECK(grad_last_state->size(0) == p.rows && grad_last_state->size(1) == p.dim &&
                    grad_last_state->size(2) == p.N,
                kBwd, ": grad_last_state must be [", p.rows, ", ", p.dim, ", ", p.N, "]");
    glast = grad_last_state->contiguous();
  }
  const auto fopt = A.options();
  at::Tensor gu = new_output(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gdelta = new_output(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gz = z.has_value() ? new_output(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous))
                                : u.new_empty({0});
  at::Tensor gh0 = initial_state.has_value() ? new_output({p.rows, p.dim, p.N}, fopt) : u.new_empty({0});
  at::Tensor pA = at::empty({p.rows, p.dim, p.N}, fopt);
  at::Tensor pBc = p.Bc.defined() ? at::empty({p.rows, p.dim, p.N}, fopt) : at::Tensor();
  at::Tensor pCc = p.Cc.defined() ? at::empty({p.rows, p.dim, p.N}, fopt) : at::Tensor();
  at::Tensor pD = at::empty({p.rows, p.dim}, fopt), pbias = at::empty({p.rows, p.dim}, fopt);
  at::Tensor gB, gC;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_bwd_cpu", [&] {
    typedef acc_t<scalar_t> Acc;
    const Scan<scalar_t> s = make_scan<scalar_t>(p, delta_softplus);
    typename Scan<scalar_t>::Grads g;
    g.nsb = std::min<int64_t>(kTasksPerUnit, std::max<int64_t>(s.bpu, 1));
    g.sb = (s.bpu + g.nsb - 1) / std::max<int64_t>(g.nsb, 1);
    g.nsb = g.sb > 0 ? (s.bpu + g.sb - 1) / g.sb : 1;
    at::Tensor pBt = p.Bt.defined() ? at::empty({p.batch, s.nunits, g.nsb, p.L, p.N}, fopt) : at::Tensor();
    at::Tensor pCt = p.Ct.defined() ? at::empty({p.batch, s.nunits, g.nsb, p.L, p.N}, fopt) : at::Tensor();
    g.gout = gout.const_data_ptr<scalar_t>();
    g.glast = glast.defined() ? glast.const_data_ptr<Acc>() : nullptr;
    g.gu = gu.mutable_data_ptr<scalar_t>();
    g.gdelta = gdelta.mutable_data_ptr<scalar_t>();
    g.gz = z.has_value() ? gz.mutable_data_ptr<scalar_t>() : nullptr;
    g.gh0 = initial_state.has_value() ? gh0.mutable_data_ptr<Acc>() : nullptr;
    g.pA = pA.mutable_data_ptr<Acc>();
    g.pBc = pBc.defined() ? pBc.mutable_data_ptr<Acc>() : nullptr;
    g.pCc = pCc.defined() ? pCc.mutable_data_ptr<Acc>() : nullptr;
    g.pD = pD.mutable_data_ptr<Acc>();
    g.pbias = pbias.mutable_data_ptr<Acc>();
    g.pBt = pBt.defined() ? pBt.mutable_data_ptr<Acc>() : nullptr;
    g.pCt = pCt.defined() ? pCt.mutable_data_ptr<Acc>() : nullptr;
    by_modes(s.bmode, s.cmode, [&](auto bm, auto cm) { s.template backward<decltype(bm)::value, decltype(cm)::value>(g); });
    // Channel sums of variable/grouped B and C: add the per-task partials of
    // the units of each group in index order, then put L last.
    auto fold = [&](const at::Tensor& part, const at::Tensor& M, int64_t G) {
      const int64_t upg = s.nunits / G;  // units per group
      at::Tensor grouped = part.view({p.batch * G, upg * g.nsb, p.L * p.N});
      at::Tensor summed = at::empty({p.batch * G, p.L * p.N}, fopt);
      for (int64_t i = 0; i < p.batch * G; ++i) summed[i].copy_(sum_rows<Acc>(grouped[i], upg * g.nsb));
      at::Tensor out = summed.view({p.batch, G, p.L, p.N}).transpose(2, 3).to(M.scalar_type());
      return M.dim() == 3 ? out.squeeze(1).contiguous() : out.contiguous();
    };
    if (p.Bt.defined()) gB = fold(pBt, B, s.GB);
    if (p.Ct.defined()) gC = fold(pCt, C, s.GC);
  });
  // Per-row partials, summed over rows in order.
  at::Tensor gA, gD, gbias;
  AT_DISPATCH_FLOATING_TYPES(acc, "selective_scan_bwd_sums", [&] {
    if (p.Bc.defined()) gB = sum_rows<scalar_t>(pBc, p.rows).to(B.scalar_type());
    if (p.Cc.defined()) gC = sum_rows<scalar_t>(pCc, p.rows).to(C.scalar_type());
    gA = sum_rows<scalar_t>(pA, p.rows);
    gD = D.has_value() ? sum_rows<scalar_t>(pD, p.rows) : u.new_empty({0});
    gbias = delta_bias.has_value() ? sum_rows<scalar_t>(pbias, p.rows) : u.new_empty({0});
  });
  return {gu, gdelta, gA, gB, gC, gD, gz, gbias, gh0};
}

}  // namespace
}  // namespace ssm
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  using namespace frontiers_fast::ssm;
  m.impl("selective_scan", &selective_scan_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
}

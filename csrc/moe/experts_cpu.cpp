// The fused mixture of gated-MLP experts for the CPU:
// frontiers_fast_native::fused_moe and fused_moe_bwd.  Semantics and the
// float64 truth: frontiers_fast/ops/moe.py and frontiers_fast/reference/moe.py.
//
// Forward.  The T*k (token, slot) pairs are sorted by expert (a stable
// counting sort), and each expert with rows runs on its own rows:
//   X  = x[tokens]                  gathered, [n, H]
//   GU = X w_gate_up[e]^T           at::mm (MKL)
//   h  = act(GU[:, :I]) * GU[:, I:] one vector pass
//   Y  = h w_down[e]^T              at::mm, straight into Y's rows of e
// and the combine sums each token's k rows of Y, weighted, in slot order.
// The GEMMs run on the weights in place (transposed views, no copies) and
// write into slices of preallocated buffers.  Dtypes: float32 and float64
// compute in their own dtype; float16 experts, and without AMX bfloat16
// experts with many rows, are converted to float32 one expert at a time
// into a scratch buffer (torch's CPU float16 GEMM is slow, and its bfloat16
// one runs at half the float32 rate without AMX); other bfloat16 experts run
// bfloat16 GEMMs (oneDNN, float32 accumulation, the intermediates rounded to
// bfloat16 as in transformers), their row counts rounded up (gemm_rows) so
// that oneDNN compiles a bounded set of kernels.  An expert with at most
// kSkinnyRows rows skips the GEMM libraries (the skinny kernel below); with
// AMX, a bfloat16 expert with at most kAmxSkinnyRows rows runs AMX tiles on
// its weights in place (common/amx_gemm.h: oneDNN would reorder the whole
// weight first), gate/up and the output in float32, h rounded to bfloat16.
//
// Threads.  An expert with many rows keeps both cores busy inside its GEMMs,
// so such experts run one after the other with threaded GEMMs.  With few
// rows per expert (decoding, small batches) a GEMM is a stream over the
// expert's weights that one core can sustain, and a threaded one pays a
// synchronisation per call: the experts are then spread over the threads
// (largest first, dynamically), each running single-threaded GEMMs, so the
// cores stream different experts' weights at the same time.
//
// Backward.  Per expert, the forward GEMM of gate/up is recomputed (the
// forward saves nothing but its inputs), then
//   G   = grad_out[tokens] w_down[e]              [n, I]
//   grad weight of a slot = sum_i h G             (no second down GEMM)
//   gh  = w G;  dGU = [gh u act'(g), gh act(g)]
//   grad w_down[e]    = grad_out[tokens]^T (w h)
//   grad w_gate_up[e] = dGU^T X
//   grad X            = dGU w_gate_up[e]
// and grad x sums each token's k rows of grad X in slot order.  The experts
// run one after the other, each in pieces of fixed size: row tiles for the
// part above that works row by row, then pieces of the weight gradients'
// rows, each one GEMM over all of the expert's rows.  The pieces are spread
// over the threads with every GEMM single-threaded (common/sched.h's
// for_each_piece: a threaded GEMM may split its inner dimension by the
// thread count), and nothing is accumulated across pieces, so the gradients
// are bitwise the same for any thread count (tests/test_determinism.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <omp.h>
#include <string_view>
#include <vector>

#include "common/alloc.h"
#include "common/amx_gemm.h"
#include "common/checks.h"
#include "common/convert.h"
#include "common/sched.h"
#include "common/simd.h"
#include "moe/moe_cpu.h"

namespace frontiers_fast {
namespace moe {
namespace {

using at::Tensor;

// Experts with at most this many rows on average run spread over the
// threads, each with single-threaded GEMMs (see the file comment).
constexpr int64_t kSpreadRows = 96;
// Without AMX, torch's bfloat16 GEMM runs at about half the float32 one's
// rate: an expert with this many rows or more converts its weights to
// float32 (a pass over them) and runs float32 GEMMs.
constexpr int64_t kConvertRows = 128;

// AMX for bfloat16 (CPUID.7.0:EDX[22]), enabled for this process (torch's init_amx).
bool has_amx_bf16() {
  static const bool amx = [] {
#if defined(__x86_64__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22))) return false;
    return at::cpu::init_amx();
#else
    return false;
#endif
  }();
  return amx;
}

// Rows per GEMM pass of the forward at most: bounds the [rows, 2I] scratch.
constexpr int64_t kFwdTile = 1024;
// The backward's pieces (fixed sizes, so that the results do not depend on
// the thread count): row tiles of an expert, and rows of its weight gradients.
constexpr int64_t kBwdTile = 128;
constexpr int64_t kGradPiece = 256;

enum class Act { kSilu, kGelu };

Act act_arg(std::string_view a, const char* op) {
  TORCH_CHECK_VALUE(a == "silu" || a == "gelu", op, ": activation must be 'silu' or 'gelu', got '",
                    std::string(a), "'");
  return a == "silu" ? Act::kSilu : Act::kGelu;
}

template <typename A>
inline A gelu(A g) {
  return A(0.5) * g * (A(1) + std::erf(g * A(M_SQRT1_2)));
}
template <typename A>
inline A gelu_grad(A g) {
  const A cdf = A(0.5) * (A(1) + std::erf(g * A(M_SQRT1_2)));
  return cdf + g * std::exp(A(-0.5) * g * g) * A(0.5 * M_2_SQRTPI * M_SQRT1_2);
}

// h[r] = act(gu[r, :I]) * gu[r, I:] for n rows, in A, rounded to S.
template <typename S, typename A>
void gated_rows(const S* gu, int64_t n, int64_t I, Act act, S* h) {
  constexpr int W = Simd<A>::W;
  typedef VecT<A> V;
  for (int64_t r = 0; r < n; ++r) {
    const S* g = gu + r * 2 * I;
    const S* u = g + I;
    S* o = h + r * I;
    if (act == Act::kSilu) {
      for (int64_t i = 0; i < I; i += W) {
        const int m = int(std::min<int64_t>(W, I - i));
        const V gv = load_lanes<A>(g + i, 1, m), uv = load_lanes<A>(u + i, 1, m);
        store_lanes<A>(vsilu<A>(gv) * uv, o + i, 1, m);
      }
    } else {
      for (int64_t i = 0; i < I; ++i) o[i] = S(gelu(A(g[i])) * A(u[i]));
    }
  }
}

// The elementwise part of the backward for n rows of one expert:
// gw_row[r] = sum_i h G (h = act(g) u); dgu = [w G u act'(g), w G act(g)];
// hw = w h.  gu [n, 2I], G [n, I] in S; w [n] in A.  dgu or hw may be null.
template <typename S, typename A>
void gated_rows_bwd(const S* gu, const S* G, const A* w, int64_t n, int64_t I, Act act, A* gw_row, S* dgu, S* hw) {
  constexpr int W = Simd<A>::W;
  typedef VecT<A> V;
  std::vector<A> part(W);
  for (int64_t r = 0; r < n; ++r) {
    const S* g = gu + r * 2 * I;
    const S* u = g + I;
    const S* gr = G + r * I;
    const A wr = w[r];
    V dot{};
    if (act == Act::kSilu) {
      const V wv = bcast(wr);
      for (int64_t i = 0; i < I; i += W) {
        const int m = int(std::min<int64_t>(W, I - i));
        const V gv = load_lanes<A>(g + i, 1, m), uv = load_lanes<A>(u + i, 1, m);
        const V Gv = load_lanes<A>(gr + i, 1, m);
        const V s = vsigmoid<A>(gv);
        const V a = gv * s;
        const V h = a * uv;
        dot += h * Gv;  // unused lanes are 0 * 0
        const V gh = wv * Gv;
        if (dgu != nullptr) {
          store_lanes<A>(gh * uv * (s * (bcast(A(1)) + gv * (bcast(A(1)) - s))), dgu + r * 2 * I + i, 1, m);
          store_lanes<A>(gh * a, dgu + r * 2 * I + I + i, 1, m);
        }
        if (hw != nullptr) store_lanes<A>(wv * h, hw + r * I + i, 1, m);
      }
    } else {
      A d = 0;
      for (int64_t i = 0; i < I; ++i) {
        const A gv = A(g[i]), uv = A(u[i]), Gv = A(gr[i]);
        const A a = gelu(gv), h = a * uv, gh = wr * Gv;
        d += h * Gv;
        if (dgu != nullptr) {
          dgu[r * 2 * I + i] = S(gh * uv * gelu_grad(gv));
          dgu[r * 2 * I + I + i] = S(gh * a);
        }
        if (hw != nullptr) hw[r * I + i] = S(wr * h);
      }
      dot[0] = d;
    }
    // A fixed lane order: the sum does not depend on the thread that ran the row.
    A sum = 0;
    for (int l = 0; l < W; ++l) sum += dot[l];
    gw_row[r] = sum;
  }
}

// ---------------------------------------------------------------------------
// the skinny GEMM: a few rows against a whole expert
// ---------------------------------------------------------------------------
// Y[m, n] = sum_k X[m, k] W[n, k] for M <= kSkinnyRows rows of X (float32,
// [M, K]) against W ([N, K], float32 or bfloat16/float16, read in place).
// Decoding and small batches give each expert a handful of rows, and then a
// GEMM is a stream over the expert's weights: MKL packs the weights first
// (a copy of them per call) and, for half weights, a converted copy is one
// more.  Here each weight row is read once, converted to float32 in
// registers, and dotted with the rows of X four at a time: NB weight rows by
// MB rows of X in MB * NB vector accumulators, summed across lanes at the
// end by a fixed tree (the same result on any thread).
constexpr int64_t kSkinnyRows = 48;
// The same for bfloat16 experts when the CPU has AMX (see skinny_limit).
constexpr int64_t kSkinnyRowsAmx = 4;
// bfloat16 experts with at most this many rows run common/amx_gemm.h's
// skinny AMX GEMM (weights in place) when the CPU has AMX; more rows go to
// oneDNN, whose per-call reorder of the weights is then amortised.
constexpr int64_t kAmxSkinnyRows = 96;

// The sum of a vector's 16 lanes by a fixed tree (halves, then quarters, ...).
inline float hsum(VecT<float> v) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  const V8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

template <int MB, int NB, typename S>
inline void skinny_tile(const float* X, int64_t ldx, const S* W, int64_t K, float* Y, int64_t ldy) {
  typedef VecT<float> V;
  constexpr int L = Simd<float>::W;
  V acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = V{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V w[NB];
    for (int j = 0; j < NB; ++j) w[j] = load_lanes<float>(W + j * K + k, 1, L);
    for (int m = 0; m < MB; ++m) {
      const V xv = loadu<V>(X + m * ldx + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = fmadd(xv, w[j], acc[m][j]);
    }
  }
  if (k < K) {
    const int r = int(K - k);
    V w[NB];
    for (int j = 0; j < NB; ++j) w[j] = load_lanes<float>(W + j * K + k, 1, r);
    for (int m = 0; m < MB; ++m) {
      const V xv = load_lanes<float>(X + m * ldx + k, 1, r);
      for (int j = 0; j < NB; ++j) acc[m][j] = fmadd(xv, w[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) Y[m * ldy + j] = hsum(acc[m][j]);
}

// All M rows of X against NB rows of W: the weight tile stays in L1 while
// the rows of X (in L2) go past it four at a time, so W is read once.
template <int NB, typename S>
inline void skinny_rows(const float* X, int64_t M, const S* W, int64_t K, float* Y, int64_t ldy) {
  if constexpr (!std::is_same_v<S, float>) {
    if (M > 4) {  // several row blocks: convert the weight tile once, not once per block
      thread_local std::vector<float> tile;
      if (tile.size() < size_t(NB * K)) tile.resize(size_t(NB * K));
      load_row(W, 1, NB * K, tile.data());
      skinny_rows<NB, float>(X, M, tile.data(), K, Y, ldy);
      return;
    }
  }
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) skinny_tile<4, NB>(X + m * K, K, W, K, Y + m * ldy, ldy);
  switch (M - m) {
    case 1: skinny_tile<1, NB>(X + m * K, K, W, K, Y + m * ldy, ldy); break;
    case 2: skinny_tile<2, NB>(X + m * K, K, W, K, Y + m * ldy, ldy); break;
    case 3: skinny_tile<3, NB>(X + m * K, K, W, K, Y + m * ldy, ldy); break;
    default: break;
  }
}

template <typename S>
void skinny_gemm(const float* X, int64_t M, const S* W, int64_t N, int64_t K, float* Y) {
  constexpr int NB = 4;
  const int64_t nb = N / NB;
  for_range(nb, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) skinny_rows<NB>(X, M, W + b * NB * K, K, Y + b * NB, N);
  });
  for (int64_t n = nb * NB; n < N; ++n) skinny_rows<1>(X, M, W + n * K, K, Y + n, N);
}

// Rows src[idx[i] / div] of a [*, H] matrix of S into dst [n, H] of C.
template <typename S, typename C>
void gather_rows(const S* src, int64_t H, const int64_t* idx, int64_t n, int64_t div, C* dst) {
  for (int64_t i = 0; i < n; ++i) load_row(src + (idx[i] / div) * H, 1, H, dst + i * H);
}

struct Work {
  int64_t e, lo, hi;
};

// The experts that received rows, and whether to spread them over the threads.
std::vector<Work> expert_work(const int64_t* off, int64_t E, bool& spread) {
  std::vector<Work> w;
  int64_t rows = 0;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e]) {
      w.push_back({e, off[e], off[e + 1]});
      rows += off[e + 1] - off[e];
    }
  spread = w.size() >= 2 && at::get_num_threads() > 1 && rows <= kSpreadRows * int64_t(w.size());
  // Largest first: the dynamic schedule then balances the tail.
  std::stable_sort(w.begin(), w.end(), [](const Work& a, const Work& b) { return a.hi - a.lo > b.hi - b.lo; });
  return w;
}

// fn(work, slot) for every expert with rows; `slot` (< the thread count)
// names the scratch buffers the call may use.
template <class Fn>
void run_work(const std::vector<Work>& work, bool spread, const Fn& fn) {
  if (spread)  // single-threaded GEMMs, one expert per thread at a time
    for_each_piece(int64_t(work.size()), [&](int64_t i) { fn(work[size_t(i)], omp_get_thread_num()); });
  else
    for (const Work& w : work) fn(w, 0);
}

// Per-thread scratch: the compute-dtype copies of one expert's weights (or
// its weight gradients), reused from expert to expert within a call.
struct Scratch {
  Tensor a, b;
};

// Expert e of w ([E, r, c], storage S) as a [r, c] tensor of C: the slice
// itself when S is C, else a converted copy in `buf`.
template <typename S, typename C>
Tensor expert_weight(const Tensor& w, int64_t e, Tensor& buf) {
  const Tensor we = w[e];
  if constexpr (std::is_same_v<S, C>) {
    return we;
  } else {
    if (!buf.defined()) buf = at::empty(we.sizes(), w.options().dtype(c10::CppTypeToScalarType<C>::value));
    const int64_t n = we.numel();
    const S* src = we.data_ptr<S>();
    C* dst = buf.data_ptr<C>();
    for_range(n, int64_t(1) << 16, [&](int64_t i0, int64_t i1) { load_row(src + i0, 1, i1 - i0, dst + i0); });
    return buf;
  }
}

// A [r, c] gradient buffer of C for expert e of out ([E, r, c], storage S):
// the slice itself when S is C, else `buf` (stored by store_expert).
template <typename S, typename C>
Tensor expert_grad(Tensor& out, int64_t e, Tensor& buf) {
  if constexpr (std::is_same_v<S, C>) {
    return out[e];
  } else {
    if (!buf.defined()) buf = at::empty({out.size(1), out.size(2)}, out.options().dtype(c10::CppTypeToScalarType<C>::value));
    return buf;
  }
}

template <typename S, typename C>
void store_expert(const Tensor& g, Tensor& out, int64_t e) {
  if constexpr (!std::is_same_v<S, C>) {
    const Tensor oe = out[e];
    store_row(g.data_ptr<C>(), g.numel(), oe.data_ptr<S>(), 1);
  }
}

struct Args {
  Tensor x, w_gate_up, w_down, weights, ids;
  int64_t T, H, E, I, k;
  at::ScalarType st;  // the storage dtype (of x and the experts)
  at::ScalarType cdt;  // the compute dtype: float32, or float64
};

Args check_args(const char* op, const Tensor& x, const Tensor& w_gate_up, const Tensor& w_down, const Tensor& weights,
                const Tensor& ids_) {
  data_arg(x, op, "x", 2);
  data_arg(w_gate_up, op, "w_gate_up", 3);
  data_arg(w_down, op, "w_down", 3);
  data_arg(weights, op, "weights", 2);
  same_dtype(w_gate_up, x, op, "w_gate_up", "x");
  same_dtype(w_down, x, op, "w_down", "x");
  const Tensor ids = index2d_arg(ids_, op, "ids");
  const int64_t T = x.size(0), H = x.size(1), E = w_gate_up.size(0), k = ids.size(1);
  TORCH_CHECK(w_gate_up.size(2) == H && w_gate_up.size(1) % 2 == 0, op,
              ": w_gate_up must be [E, 2I, H] with H=", H, " and an even 2I, got shape ", w_gate_up.sizes());
  const int64_t I = w_gate_up.size(1) / 2;
  shape_arg(w_down, {E, H, I}, op, "w_down", "[E, H, I]");
  TORCH_CHECK(ids.size(0) == T, op, ": ids has ", ids.size(0), " rows but x has ", T, " tokens");
  shape_arg(weights, ids.sizes(), op, "weights", "the shape of ids");
  index_range(ids, E, "ids", experts_note(E));
  const bool f64 = x.scalar_type() == at::kDouble || weights.scalar_type() == at::kDouble;
  // A float64 router weight computes in float64, as the reference does.
  const auto st = f64 ? at::kDouble : x.scalar_type();
  const auto cdt = f64 ? at::kDouble : at::kFloat;
  // detach(): the GEMMs are plain kernels, whatever the tensors record (the op's autograd is its own).
  return {x.detach().to(st).contiguous(),
          w_gate_up.detach().to(st).contiguous(),
          w_down.detach().to(st).contiguous(),
          weights.detach().to(cdt).contiguous(),
          ids,
          T,
          H,
          E,
          I,
          k,
          st,
          cdt};
}

// Rows per forward pass of an expert with n rows: at most kFwdTile, in
// passes of equal size (a pass reads the expert's weights whatever its rows,
// so 530 rows run as 265 + 265, not 512 + 18).
inline int64_t fwd_tile(int64_t n) {
  const int64_t passes = (n + kFwdTile - 1) / kFwdTile;
  return (n + passes - 1) / passes;
}

// Experts with at most this many rows run the skinny kernel.  With AMX the
// AMX tiles (common/amx_gemm.h) outrun float32 FMAs from a few rows on.
template <typename S>
int64_t skinny_limit() {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (has_amx_bf16()) return kSkinnyRowsAmx;
  }
  return kSkinnyRows;
}

// A [rows, cols] buffer of `opt` in t, reallocated only when it is too small
// or of another dtype.  Zero-filled when allocated: rows past those a pass
// writes stay finite (see gemm_rows).
inline Tensor scratch_rows(Tensor& t, int64_t rows, int64_t cols, const at::TensorOptions& opt) {
  if (!t.defined() || t.size(0) < rows || t.size(1) != cols || t.scalar_type() != opt.dtype())
    t = at::zeros({rows, cols}, opt);
  return t.narrow(0, 0, rows);
}

// The rows a bfloat16 GEMM of n rows runs on: n rounded up to a multiple of
// 16 (to 32 past 128).  oneDNN compiles a kernel for every new GEMM shape
// (about 5 ms for a Mixtral expert, against 3 ms to run it), and with fresh
// routing every call gives each expert a new row count; rounded, an expert
// sees a few dozen shapes in all.  The extra rows are scratch rows of the
// same buffers, computed and ignored (a GEMM's output row depends only on
// its input row).
inline int64_t gemm_rows(int64_t n) {
  const int64_t g = n <= 128 ? 16 : 32;
  return (n + g - 1) / g * g;
}

// fn(r0, r1) over [0, n) rows of `cols` values each: threaded for the
// experts that run one after the other, inline inside the spread region.
template <class Fn>
inline void for_rows(int64_t n, int64_t cols, const Fn& fn) {
  for_range(n, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cols, 1)), fn);
}

// The forward's scratch of one thread: the gathered rows, gate/up, h, and
// (bfloat16 GEMMs) the bfloat16 output rows; reused from expert to expert.
struct FwdScratch {
  Tensor X, GU, h, Y;
};

template <typename S>
Tensor fused_moe_impl(const Args& a, Act act) {
  using C = acc_t<S>;
  const int64_t R = a.T * a.k;
  Dispatch d = dispatch_of(a.ids, a.E);
  const int64_t* order = d.order.data_ptr<int64_t>();
  const auto copt = a.x.options().dtype(a.cdt);
  const auto sopt = a.x.options();
  Tensor Y = at::empty({R, a.H}, copt);
  bool spread = false;
  const std::vector<Work> work = expert_work(d.offsets.data_ptr<int64_t>(), a.E, spread);
  const size_t slots = size_t(spread ? at::get_num_threads() : 1);
  std::vector<Scratch> scratch(slots);
  std::vector<FwdScratch> bufs(slots);
  const S* x = a.x.data_ptr<S>();
  const int64_t I = a.I, H = a.H;
  run_work(work, spread, [&](const Work& w, int slot) {
    Scratch& sc = scratch[size_t(slot)];
    FwdScratch& b = bufs[size_t(slot)];
    const int64_t rows = w.hi - w.lo, tile = fwd_tile(rows);
    const auto gather = [&](int64_t lo, int64_t n, auto* dst) {
      for_rows(n, H, [&](int64_t r0, int64_t r1) { gather_rows(x, H, order + lo + r0, r1 - r0, a.k, dst + r0 * H); });
    };
    const auto gated = [&](const auto* gu, int64_t n, auto* h) {
      for_rows(n, I, [&](int64_t r0, int64_t r1) {
        gated_rows<std::remove_cv_t<std::remove_pointer_t<decltype(gu)>>, C>(gu + r0 * 2 * I, r1 - r0, I, act,
                                                                              h + r0 * I);
      });
    };
    if constexpr (std::is_same_v<C, float>) {
      if (rows <= skinny_limit<S>()) {  // the weights straight from their storage, no copy
        Tensor X = scratch_rows(b.X, rows, H, copt), GU = scratch_rows(b.GU, rows, 2 * I, copt);
        Tensor h = scratch_rows(b.h, rows, I, copt);
        gather(w.lo, rows, X.data_ptr<C>());
        skinny_gemm(X.data_ptr<float>(), rows, a.w_gate_up[w.e].data_ptr<S>(), 2 * I, H, GU.data_ptr<float>());
        gated(GU.data_ptr<C>(), rows, h.data_ptr<C>());
        skinny_gemm(h.data_ptr<float>(), rows, a.w_down[w.e].data_ptr<S>(), H, I, Y.data_ptr<float>() + w.lo * H);
        return;
      }
    }
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      if (has_amx_bf16() && rows <= kAmxSkinnyRows && amx::amx_skinny_ok(2 * I, H) && amx::amx_skinny_ok(H, I)) {
        // AMX tiles on the weights in place (common/amx_gemm.h); gate/up and Y in float32, h rounded to bfloat16.
        Tensor Xs = scratch_rows(b.X, rows, H, sopt), GU = scratch_rows(b.GU, rows, 2 * I, copt);
        Tensor hf = scratch_rows(b.h, rows, I, copt), hs = scratch_rows(b.Y, rows, I, sopt);
        gather(w.lo, rows, Xs.data_ptr<S>());
        amx::skinny_gemm(Xs.data_ptr<S>(), rows, a.w_gate_up[w.e].data_ptr<S>(), 2 * I, H, GU.data_ptr<float>(), 2 * I);
        gated(GU.data_ptr<float>(), rows, hf.data_ptr<float>());
        store_row(hf.data_ptr<float>(), rows * I, hs.data_ptr<S>(), 1);
        amx::skinny_gemm(hs.data_ptr<S>(), rows, a.w_down[w.e].data_ptr<S>(), H, I, Y.data_ptr<float>() + w.lo * H, H);
        return;
      }
      // bfloat16 GEMMs on the weights in place (oneDNN, float32 accumulation), or (below) converted.
      if (has_amx_bf16() || rows < kConvertRows) {
        const int64_t cap = gemm_rows(tile);
        Tensor Xs = scratch_rows(b.X, cap, H, sopt), GUs = scratch_rows(b.GU, cap, 2 * I, sopt);
        Tensor hs = scratch_rows(b.h, cap, I, sopt), Ys = scratch_rows(b.Y, cap, H, sopt);
        const Tensor wgu_t = a.w_gate_up[w.e].t(), wd_t = a.w_down[w.e].t();
        for (int64_t lo = w.lo; lo < w.hi; lo += tile) {
          const int64_t n = std::min(tile, w.hi - lo), m = gemm_rows(n);
          Tensor Xn = Xs.narrow(0, 0, m), GUn = GUs.narrow(0, 0, m), hn = hs.narrow(0, 0, m), Yn = Ys.narrow(0, 0, m);
          gather(lo, n, Xn.data_ptr<S>());
          at::mm_out(GUn, Xn, wgu_t);
          gated(GUn.data_ptr<S>(), n, hn.data_ptr<S>());
          at::mm_out(Yn, hn, wd_t);
          const S* ys = Yn.data_ptr<S>();
          C* yd = Y.data_ptr<C>() + lo * H;
          for_rows(n, H, [&](int64_t r0, int64_t r1) { load_row(ys + r0 * H, 1, (r1 - r0) * H, yd + r0 * H); });
        }
        return;
      }
    }
    const Tensor wgu_t = expert_weight<S, C>(a.w_gate_up, w.e, sc.a).t();
    const Tensor wd_t = expert_weight<S, C>(a.w_down, w.e, sc.b).t();
    Tensor X = scratch_rows(b.X, tile, H, copt), GU = scratch_rows(b.GU, tile, 2 * I, copt);
    Tensor h = scratch_rows(b.h, tile, I, copt);
    for (int64_t lo = w.lo; lo < w.hi; lo += tile) {
      const int64_t n = std::min(tile, w.hi - lo);
      Tensor Xn = X.narrow(0, 0, n), GUn = GU.narrow(0, 0, n), hn = h.narrow(0, 0, n);
      gather(lo, n, Xn.data_ptr<C>());
      at::mm_out(GUn, Xn, wgu_t);
      gated(GUn.data_ptr<C>(), n, hn.data_ptr<C>());
      Tensor Yn = Y.narrow(0, lo, n);
      at::mm_out(Yn, hn, wd_t);
    }
  });
  Tensor out = new_output({a.T, a.H}, a.x.options());
  gather_sum<C, C, S>(Y.data_ptr<C>(), d.row_map.data_ptr<int64_t>(), a.weights.data_ptr<C>(), a.T, a.k, a.H,
                      out.data_ptr<S>());
  return out;
}

Tensor fused_moe_cpu(const Tensor& x_, const Tensor& w_gate_up_, const Tensor& w_down_, const Tensor& weights_,
                     const Tensor& ids_, std::string_view activation) {
  const char* op = "fused_moe";
  const Act act = act_arg(activation, op);
  const Args a = check_args(op, x_, w_gate_up_, w_down_, weights_, ids_);
  Tensor out;
  FF_MOE_DISPATCH(a.st, "fused_moe", [&] { out = fused_moe_impl<scalar_t>(a, act); });
  return out.to(x_.scalar_type());
}

struct Needs {
  bool x, w_gate_up, w_down, weights;
};

template <typename S>
std::tuple<Tensor, Tensor, Tensor, Tensor> fused_moe_bwd_impl(const Args& a, const Tensor& go_, Act act, Needs need) {
  using C = acc_t<S>;
  const int64_t R = a.T * a.k;
  Dispatch d = dispatch_of(a.ids, a.E);
  const int64_t* off = d.offsets.data_ptr<int64_t>();
  const int64_t* order = d.order.data_ptr<int64_t>();
  const auto sopt = a.x.options();
  const auto copt = sopt.dtype(a.cdt);
  // The router weight of each permuted row, and its gradient.
  Tensor w_row = at::empty({R}, copt), gw_row = at::empty({R}, copt);
  C* wr = w_row.data_ptr<C>();
  const C* wsrc = a.weights.data_ptr<C>();
  for (int64_t r = 0; r < R; ++r) wr[r] = wsrc[order[r]];
  Tensor gXp = need.x ? at::empty({R, a.H}, copt) : Tensor();
  Tensor g_wgu = need.w_gate_up ? new_output(a.w_gate_up.sizes(), sopt) : Tensor();
  Tensor g_wd = need.w_down ? new_output(a.w_down.sizes(), sopt) : Tensor();
  // Experts no token chose get zero weight gradients.
  for (int64_t e = 0; e < a.E; ++e)
    if (off[e + 1] == off[e]) {
      if (need.w_gate_up) g_wgu[e].zero_();
      if (need.w_down) g_wd[e].zero_();
    }
  bool spread = false;
  const std::vector<Work> work = expert_work(off, a.E, spread);
  const bool want_dgu = need.x || need.w_gate_up;
  const S* x = a.x.data_ptr<S>();
  const S* go = go_.data_ptr<S>();
  C* gwr = gw_row.data_ptr<C>();
  Scratch wbuf, gbuf;  // the experts run one at a time, each split into pieces
  for (const Work& w : work) {
    const int64_t n = w.hi - w.lo, I2 = 2 * a.I;
    Tensor X = at::empty({n, a.H}, copt), GO = at::empty({n, a.H}, copt);
    Tensor dGU = want_dgu ? at::empty({n, I2}, copt) : Tensor();
    Tensor hw = need.w_down ? at::empty({n, a.I}, copt) : Tensor();
    const Tensor wgu = expert_weight<S, C>(a.w_gate_up, w.e, wbuf.a);
    const Tensor wd = expert_weight<S, C>(a.w_down, w.e, wbuf.b);
    // Row tiles: the recomputed gate/up, the elementwise part and grad X, row by row.
    for_each_piece((n + kBwdTile - 1) / kBwdTile, [&](int64_t t) {
      const int64_t r0 = t * kBwdTile, m = std::min(kBwdTile, n - r0);
      Tensor Xt = X.narrow(0, r0, m), GOt = GO.narrow(0, r0, m);
      gather_rows(x, a.H, order + w.lo + r0, m, a.k, Xt.data_ptr<C>());
      gather_rows(go, a.H, order + w.lo + r0, m, a.k, GOt.data_ptr<C>());
      Tensor GU = at::empty({m, I2}, copt), G = at::empty({m, a.I}, copt);
      at::mm_out(GU, Xt, wgu.t());
      at::mm_out(G, GOt, wd);
      gated_rows_bwd<C, C>(GU.data_ptr<C>(), G.data_ptr<C>(), wr + w.lo + r0, m, a.I, act, gwr + w.lo + r0,
                           want_dgu ? dGU.data_ptr<C>() + r0 * I2 : nullptr,
                           need.w_down ? hw.data_ptr<C>() + r0 * a.I : nullptr);
      if (need.x) {
        Tensor gx = gXp.narrow(0, w.lo + r0, m);
        at::mm_out(gx, dGU.narrow(0, r0, m), wgu);
      }
    });
    // Weight gradients, in pieces of their rows: each piece one GEMM over all n rows of the expert.
    Tensor gwgu = need.w_gate_up ? expert_grad<S, C>(g_wgu, w.e, gbuf.a) : Tensor();
    Tensor gwd = need.w_down ? expert_grad<S, C>(g_wd, w.e, gbuf.b) : Tensor();
    const int64_t pg = need.w_gate_up ? (I2 + kGradPiece - 1) / kGradPiece : 0;
    const int64_t pd = need.w_down ? (a.H + kGradPiece - 1) / kGradPiece : 0;
    for_each_piece(pg + pd, [&](int64_t p) {
      const bool up = p < pg;
      const int64_t r0 = (up ? p : p - pg) * kGradPiece, m = std::min(kGradPiece, (up ? I2 : a.H) - r0);
      Tensor o = (up ? gwgu : gwd).narrow(0, r0, m);
      if (up)
        at::mm_out(o, dGU.narrow(1, r0, m).t(), X);
      else
        at::mm_out(o, GO.narrow(1, r0, m).t(), hw);
    });
    if (need.w_gate_up) store_expert<S, C>(gwgu, g_wgu, w.e);
    if (need.w_down) store_expert<S, C>(gwd, g_wd, w.e);
  }
  Tensor gx = a.x.new_empty({0}), gw = a.x.new_empty({0});
  if (need.x) {
    gx = new_output({a.T, a.H}, sopt);
    gather_sum<C, C, S>(gXp.data_ptr<C>(), d.row_map.data_ptr<int64_t>(), static_cast<const C*>(nullptr), a.T, a.k,
                        a.H, gx.data_ptr<S>());
  }
  if (need.weights) gw = gw_row.index_select(0, d.row_map).view({a.T, a.k});
  return {gx, need.w_gate_up ? g_wgu : a.x.new_empty({0}), need.w_down ? g_wd : a.x.new_empty({0}), gw};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_moe_bwd_cpu(const Tensor& x_, const Tensor& w_gate_up_,
                                                             const Tensor& w_down_, const Tensor& weights_,
                                                             const Tensor& ids_, const Tensor& grad_out_,
                                                             std::string_view activation, bool need_x,
                                                             bool need_w_gate_up, bool need_w_down,
                                                             bool need_weights) {
  const char* op = "fused_moe_bwd";
  const Act act = act_arg(activation, op);
  const Args a = check_args(op, x_, w_gate_up_, w_down_, weights_, ids_);
  data_arg(grad_out_, op, "grad_out", 2);
  shape_arg(grad_out_, {a.T, a.H}, op, "grad_out", "[T, H]");
  const Tensor go = grad_out_.detach().to(a.st).contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor> g;
  FF_MOE_DISPATCH(a.st, "fused_moe_bwd", [&] {
    g = fused_moe_bwd_impl<scalar_t>(a, go, act, {need_x, need_w_gate_up, need_w_down, need_weights});
  });
  auto& [gx, gwgu, gwd, gw] = g;
  if (need_x) gx = gx.to(x_.scalar_type());
  if (need_w_gate_up) gwgu = gwgu.to(w_gate_up_.scalar_type());
  if (need_w_down) gwd = gwd.to(w_down_.scalar_type());
  if (need_weights) gw = gw.to(weights_.scalar_type());
  return g;
}

}  // namespace
}  // namespace moe
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  using namespace frontiers_fast::moe;
  m.impl("fused_moe", &fused_moe_cpu);
  m.impl("fused_moe_bwd", &fused_moe_bwd_cpu);
}

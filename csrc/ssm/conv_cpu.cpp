// Depthwise causal convolution (causal-conv1d's causal_conv1d_fn) and its
// backward, for the CPU: frontiers_fast_native::causal_conv1d{,_bwd}.  The
// schemas and the calling convention live in frontiers_fast/ops/ssm.py.
//
// One (batch, channel) row per task, walked in blocks of time steps.  A block
// reads its inputs as the window [initial states, x] (SeqWindow): in place
// for contiguous x of the accumulate dtype, else converted into a scratch
// buffer after the width - 1 inputs before it, so the sequence start
// (initial_states or zeros) and the block seams look the same to the vector
// loop.  Packed sequences (cu_seqlens) are walked one after the other inside
// the row, each from its own initial states.
//
// The backward computes, per block, the activation's derivative, the
// transposed convolution for grad_x (grad_xcat[j] = sum_k g[j - k] w[k]) and
// the filter's gradients.  Those reduce over batch and time: each row sums
// its own in a fixed order (acc vectors over short blocks, folded into
// float64 lanes) into a workspace, and the rows are combined over
// batch in batch order after the parallel loop, so the result is bitwise the
// same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/convert.h"
#include "common/sched.h"
#include "common/simd.h"

namespace frontiers_fast {
namespace ssm {
namespace {

using at::Tensor;

// Time steps per block of the forward (its scratch buffer stays in L1).
constexpr int64_t kTile = 1024;

// ---------------------------------------------------------------------------
// argument checks (O(1), except the offsets' values)
// ---------------------------------------------------------------------------
// A tensor in x's dtype (`like`) of the given shape.
void like_arg(const Tensor& t, const Tensor& like, at::IntArrayRef shape, const char* op, const char* name,
              const char* layout) {
  check_cpu(t, op, name);
  same_dtype(t, like, op, name, "x");
  TORCH_CHECK(t.dim() == int64_t(shape.size()), op, ": ", name, " must be ", layout, ", got shape ", t.sizes());
  shape_arg(t, shape, op, name, layout);
}

// A parameter in acc (float32, float64 for float64 x).
void param_arg(const Tensor& t, const Tensor& x, at::IntArrayRef shape, const char* op, const char* name,
               const char* layout) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == acc_scalar_type(x.scalar_type()), op, ": ", name, " must be ",
              acc_scalar_type(x.scalar_type()), " (the accumulate dtype of x's ", x.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == int64_t(shape.size()), op, ": ", name, " must be ", layout, ", got shape ", t.sizes());
  shape_arg(t, shape, op, name, layout);
}


// cu_seqlens [S + 1] over the L steps of x (batch 1), values checked.
Tensor cu_seqlens_arg(const Tensor& cu, int64_t batch, int64_t L, const char* op) {
  return seqlens_arg(cu, batch, L, op, "cu_seqlens", "x");
}

// ---------------------------------------------------------------------------
// the kernels
// ---------------------------------------------------------------------------
// Everything a row kernel reads, by pointer and element strides.
template <typename T, typename A>
struct ConvArgs {
  int64_t batch = 0, dim = 0, L = 0, W = 1;
  const T* x = nullptr;
  int64_t sxb = 0, sxd = 0, sxl = 0;
  const A* w = nullptr;
  int64_t swd = 0, swk = 0;
  const A* bias = nullptr;  // null: no bias
  int64_t sbd = 0;
  const T* init = nullptr;  // null: zeros before each sequence
  int64_t sib = 0, sid = 0, sik = 0;
  const int64_t* cu = nullptr;  // null: one sequence per row
  int64_t nseq = 1;
  bool silu = false;
  // backward only
  const T* go = nullptr;
  int64_t sgb = 0, sgd = 0, sgl = 0;
  const T* gfin = nullptr;  // null: no gradient of the final states
  int64_t sfb = 0, sfd = 0, sfk = 0;

  int64_t seq_begin(int64_t s) const { return cu ? cu[s] : 0; }
  int64_t seq_end(int64_t s) const { return cu ? cu[s + 1] : L; }
  int64_t nseqs() const { return cu ? nseq : 1; }
  // The state row of sequence s in batch row b: one per batch entry, or one per packed sequence.
  int64_t state_row(int64_t b, int64_t s) const { return cu ? s : b; }
  int64_t tile() const { return std::clamp<int64_t>(L, 1, kTile); }
  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)); }
};

// The lanes summed in lane order.
inline double lane_sum(const double* v, int n) {
  double s = v[0];
  for (int l = 1; l < n; ++l) s += v[l];
  return s;
}

// Lanes [0, n) from p, zero beyond (n <= W; a full vector is a plain load).
template <typename A>
inline VecT<A> load_upto(const A* p, int n) {
  return n >= Simd<A>::W ? loadu<VecT<A>>(p) : load_n(p, n);
}

// bias + sum_k w[k] xt[k + l] for the W lanes l: the pre-activations of W consecutive steps.  Only
// the first n lanes are read (nothing past xt[n - 1 + width - 1]); the others hold the bias.
template <typename A, int KW>
inline VecT<A> window_dot(const A* xt, const A* w, int W, VecT<A> bias, int n) {
  const int nk = KW > 0 ? KW : W;
  VecT<A> acc = bias;
  if (n >= Simd<A>::W) {
    for (int k = 0; k < nk; ++k) acc = fmadd(bcast(w[k]), loadu<VecT<A>>(xt + k), acc);
  } else {
    for (int k = 0; k < nk; ++k) acc = fmadd(bcast(w[k]), load_n(xt + k, n), acc);
  }
  return acc;
}

// The inputs of one sequence of a row, as its window xcat = [initial states, x]: fetch(lt, len)
// gives xt with xt[q] = xcat[lt + q] for q < len + W - 1, the inputs that steps [lt, lt + len) read,
// and done(len) moves on.  x of the acc dtype, contiguous along L, is read in place once the window
// is past the initial states (`direct`); otherwise each block is converted into buf after the
// W - 1 entries before it, which done() carries to the next block.
template <typename T, typename A>
struct SeqWindow {
  const T* xs;  // the sequence's first input
  int64_t sxl, n;
  int Wm1;
  bool direct;
  A* buf;  // [W - 1 entries before the block][the block][padding]
  bool in_place = false;

  // buf's head for the first block: the initial states (or zeros).
  void start(const T* init, int64_t sik) {
    if (init)
      load_row(init, sik, Wm1, buf);
    else
      std::fill(buf, buf + Wm1, A(0));
  }
  // The next block's length from lt: one vector to get past the initial states when reading in place.
  int64_t block(int64_t lt, int64_t most) const {
    return std::min(n - lt, direct && lt == 0 ? int64_t(Simd<A>::W) : most);
  }
  const A* fetch(int64_t lt, int64_t len) {
    if constexpr (std::is_same_v<T, A>) {
      in_place = direct && lt >= Wm1;
      if (in_place) return xs + lt - Wm1;
    }
    load_row(xs + lt * sxl, sxl, len, buf + Wm1);
    return buf;
  }
  void done(int64_t len) {
    if (!in_place) std::memmove(buf, buf + len, sizeof(A) * Wm1);
  }
  // The last W - 1 entries of xcat (the initial states' tail for a sequence shorter than W - 1).
  const A* tail() {
    if (in_place) load_row(xs + (n - Wm1) * sxl, sxl, Wm1, buf);
    return buf;
  }
};

template <typename T, int KW>
void conv_fwd(const ConvArgs<T, acc_t<T>>& a, T* out, T* fin) {
  using A = acc_t<T>;
  using V = VecT<A>;
  constexpr int VW = Simd<A>::W;
  const int W = int(a.W), Wm1 = W - 1;
  const int64_t tile = a.tile();
  const bool direct = std::is_same_v<T, A> && a.sxl == 1 && Wm1 <= VW;
  for_range(a.batch * a.dim, a.grain(), [&](int64_t r0, int64_t r1) {
    std::vector<A> xbuf(tile + Wm1 + 2 * VW, A(0)), w(W);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / a.dim, d = row % a.dim;
      for (int k = 0; k < W; ++k) w[k] = a.w[d * a.swd + k * a.swk];
      const V bv = bcast(a.bias ? a.bias[d * a.sbd] : A(0));
      const T* xr = a.x + b * a.sxb + d * a.sxd;
      T* orow = out + row * a.L;
      for (int64_t s = 0; s < a.nseqs(); ++s) {
        const int64_t r = a.state_row(b, s), ts = a.seq_begin(s), n = a.seq_end(s) - ts;
        SeqWindow<T, A> win{xr + ts * a.sxl, a.sxl, n, Wm1, direct, xbuf.data()};
        win.start(a.init ? a.init + r * a.sib + d * a.sid : nullptr, a.sik);
        for (int64_t lt = 0, len = 0; lt < n; lt += len) {
          len = win.block(lt, tile);
          const A* xt = win.fetch(lt, len);
          for (int64_t i = 0; i < len; i += VW) {
            const int m = int(std::min<int64_t>(VW, len - i));
            V p = window_dot<A, KW>(xt + i, w.data(), W, bv, m);
            if (a.silu) p = vsilu<A>(p);
            store_lanes<A>(p, orow + ts + lt + i, 1, m);
          }
          win.done(len);
        }
        // The last width - 1 inputs, the initial states included for a short sequence.
        store_row(win.tail(), Wm1, fin + (r * a.dim + d) * Wm1, 1);
      }
    }
  });
}

// Lanes of v added into the float64 lanes acc[0 .. W).
template <typename A>
inline void fold(VecT<A> v, double* acc) {
  for (int l = 0; l < Simd<A>::W; ++l) acc[l] += double(v[l]);
}

// Steps per block of the backward: the filter gradients of a block sum in acc
// vectors (a few terms per lane), then fold into float64 lanes, so that a sum
// over thousands of steps keeps float32's accuracy on its terms.
constexpr int64_t kFoldSteps = 256;

// pw [batch * dim, W], pb [batch * dim]: each row's filter gradients, in float64.
template <typename T, int KW>
void conv_bwd(const ConvArgs<T, acc_t<T>>& a, T* gx, T* ginit, double* pw, double* pb) {
  using A = acc_t<T>;
  using V = VecT<A>;
  constexpr int VW = Simd<A>::W;
  const int W = int(a.W), Wm1 = W - 1;
  const int64_t blk = kFoldSteps;
  const bool direct = std::is_same_v<T, A> && a.sxl == 1 && Wm1 <= VW;
  const bool go_direct = std::is_same_v<T, A> && a.sgl == 1;
  for_range(a.batch * a.dim, a.grain(), [&](int64_t r0, int64_t r1) {
    std::vector<A> xbuf(blk + Wm1 + 2 * VW, A(0)), gobuf(blk + VW, A(0)), gbuf(blk + 2 * Wm1 + 2 * VW, A(0));
    std::vector<A> w(W), gi(std::max(Wm1, 1));
    std::vector<double> wide_w(size_t(W) * VW), wide_b(VW);
    A* gb = gbuf.data();  // gb[q] = g[lt - (W - 1) + q]: the block's output gradients after W - 1 earlier ones
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / a.dim, d = row % a.dim;
      for (int k = 0; k < W; ++k) w[k] = a.w[d * a.swd + k * a.swk];
      const V bv = bcast(a.bias ? a.bias[d * a.sbd] : A(0));
      const T* xr = a.x + b * a.sxb + d * a.sxd;
      const T* gr = a.go + b * a.sgb + d * a.sgd;
      T* gxr = gx + row * a.L;
      std::fill(wide_w.begin(), wide_w.end(), 0.0);
      std::fill(wide_b.begin(), wide_b.end(), 0.0);
      for (int64_t s = 0; s < a.nseqs(); ++s) {
        const int64_t r = a.state_row(b, s), ts = a.seq_begin(s), n = a.seq_end(s) - ts;
        SeqWindow<T, A> win{xr + ts * a.sxl, a.sxl, n, Wm1, direct, xbuf.data()};
        win.start(a.init ? a.init + r * a.sib + d * a.sid : nullptr, a.sik);
        std::fill(gb, gb + Wm1, A(0));  // no output before the sequence
        for (int64_t lt = 0, len = 0; lt < n; lt += len) {
          len = win.block(lt, blk);
          const A* xt = win.fetch(lt, len);
          const A* got = nullptr;  // grad_out of the block
          if constexpr (std::is_same_v<T, A>) {
            if (go_direct) got = gr + ts + lt;
          }
          if (!go_direct) {
            load_row(gr + (ts + lt) * a.sgl, a.sgl, len, gobuf.data());
            got = gobuf.data();
          }
          // g = grad_out silu'(pre) into gb, with the filter's gradients over exactly the len steps.
          V bacc = V{};
          if constexpr (KW > 0) {
            V wacc[KW];
            for (int k = 0; k < KW; ++k) wacc[k] = V{};
            for (int64_t i = 0; i < len; i += VW) {
              const int m = int(std::min<int64_t>(VW, len - i));
              V xv[KW];
              for (int k = 0; k < KW; ++k) xv[k] = load_upto(xt + i + k, m);
              V g = load_upto(got + i, m);
              if (a.silu) {
                V p = bv;
                for (int k = 0; k < KW; ++k) p = fmadd(bcast(w[k]), xv[k], p);
                const V sg = vsigmoid<A>(p);
                g = g * (sg * (bcast(A(1)) + p * (bcast(A(1)) - sg)));
                if (m < VW) g = select<A>(iota<A>() < m, g, V{});
              }
              storeu(gb + Wm1 + i, g);
              bacc += g;
              for (int k = 0; k < KW; ++k) wacc[k] = fmadd(g, xv[k], wacc[k]);
            }
            for (int k = 0; k < KW; ++k) fold<A>(wacc[k], &wide_w[size_t(k) * VW]);
          } else {
            for (int64_t i = 0; i < len; i += VW) {
              const int m = int(std::min<int64_t>(VW, len - i));
              V g = load_upto(got + i, m);
              if (a.silu) {
                const V p = window_dot<A, 0>(xt + i, w.data(), W, bv, m);
                const V sg = vsigmoid<A>(p);
                g = g * (sg * (bcast(A(1)) + p * (bcast(A(1)) - sg)));
                if (m < VW) g = select<A>(iota<A>() < m, g, V{});
              }
              storeu(gb + Wm1 + i, g);
              bacc += g;
            }
            for (int k = 0; k < W; ++k) {
              V wk = V{};
              for (int64_t i = 0; i < len; i += VW) {
                const int m = int(std::min<int64_t>(VW, len - i));
                wk = fmadd(load_upto(gb + Wm1 + i, m), load_upto(xt + i + k, m), wk);
              }
              fold<A>(wk, &wide_w[size_t(k) * VW]);
            }
          }
          fold<A>(bacc, wide_b.data());
          // grad_xcat[j] = sum_k g[j - k] w[k] for the block's j, from g[j - (W-1)] (as the reference's
          // correlation with the flipped filter); j < W - 1 are the initial states' positions.
          const int nk = KW > 0 ? KW : W;
          for (int64_t i = 0; i < len; i += VW) {
            const int m = int(std::min<int64_t>(VW, len - i));
            V v = loadu<V>(gb + i) * bcast(w[Wm1]);
            for (int k = 1; k < nk; ++k) v = fmadd(loadu<V>(gb + i + k), bcast(w[Wm1 - k]), v);
            const int64_t j0 = lt + i;
            if (j0 >= Wm1) {
              store_lanes<A>(v, gxr + ts + j0 - Wm1, 1, m);
            } else {
              A tmp[VW] __attribute__((aligned(64)));
              storeu(tmp, v);
              for (int l = 0; l < m; ++l) {
                if (j0 + l < Wm1)
                  gi[j0 + l] = tmp[l];
                else
                  gxr[ts + j0 + l - Wm1] = static_cast<T>(tmp[l]);
              }
            }
          }
          std::memmove(gb, gb + len, sizeof(A) * Wm1);
          win.done(len);
        }
        // The last W - 1 positions, j = n .. n + W - 2: fed by the last outputs and the final states.
        std::fill(gb + Wm1, gb + 2 * Wm1, A(0));
        for (int i = 0; i < Wm1; ++i) {
          A v = gb[i] * w[Wm1];
          for (int k = 1; k < W; ++k) v += gb[i + k] * w[Wm1 - k];
          if (a.gfin) v += static_cast<A>(a.gfin[r * a.sfb + d * a.sfd + i * a.sfk]);
          const int64_t j = n + i;
          if (j < Wm1)
            gi[j] = v;
          else
            gxr[ts + j - Wm1] = static_cast<T>(v);
        }
        if (ginit) store_row(gi.data(), Wm1, ginit + (r * a.dim + d) * Wm1, 1);
      }
      for (int k = 0; k < W; ++k) pw[row * W + k] = lane_sum(&wide_w[size_t(k) * VW], VW);
      pb[row] = lane_sum(wide_b.data(), VW);
    }
  });
}

template <typename T>
void conv_fwd_any(const ConvArgs<T, acc_t<T>>& a, T* out, T* fin) {
  switch (a.W) {
    case 1: return conv_fwd<T, 1>(a, out, fin);
    case 2: return conv_fwd<T, 2>(a, out, fin);
    case 3: return conv_fwd<T, 3>(a, out, fin);
    case 4: return conv_fwd<T, 4>(a, out, fin);
    default: return conv_fwd<T, 0>(a, out, fin);
  }
}

template <typename T>
void conv_bwd_any(const ConvArgs<T, acc_t<T>>& a, T* gx, T* ginit, double* pw, double* pb) {
  switch (a.W) {
    case 1: return conv_bwd<T, 1>(a, gx, ginit, pw, pb);
    case 2: return conv_bwd<T, 2>(a, gx, ginit, pw, pb);
    case 3: return conv_bwd<T, 3>(a, gx, ginit, pw, pb);
    case 4: return conv_bwd<T, 4>(a, gx, ginit, pw, pb);
    default: return conv_bwd<T, 0>(a, gx, ginit, pw, pb);
  }
}

// ---------------------------------------------------------------------------
// entry points
// ---------------------------------------------------------------------------
struct Checked {
  int64_t batch, dim, L, W, rows;
  const Tensor* bias;
  const Tensor* init;
  Tensor cu;  // undefined: no packing
};

Checked check_conv(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias_,
                   const std::optional<Tensor>& init_, const std::optional<Tensor>& cu_, const char* op) {
  data_arg(x, op, "x", 3);
  Checked c{x.size(0), x.size(1), x.size(2), 0, 0, present(bias_), present(init_), Tensor()};
  check_cpu(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == c.dim && weight.size(1) >= 1, op,
              ": weight must be [dim, width] with dim = ", c.dim, " and width >= 1, got shape ", weight.sizes());
  c.W = weight.size(1);
  param_arg(weight, x, {c.dim, c.W}, op, "weight", "[dim, width]");
  if (c.bias) param_arg(*c.bias, x, {c.dim}, op, "bias", "[dim]");
  c.rows = c.batch;
  if (const Tensor* cu = present(cu_)) {
    c.cu = cu_seqlens_arg(*cu, c.batch, c.L, op);
    c.rows = c.cu.numel() - 1;
  }
  if (c.init) like_arg(*c.init, x, {c.rows, c.dim, c.W - 1}, op, "initial_states", "[rows, dim, width - 1]");
  return c;
}

template <typename T>
ConvArgs<T, acc_t<T>> conv_args(const Tensor& x, const Tensor& weight, const Checked& c, bool silu) {
  using A = acc_t<T>;
  ConvArgs<T, A> a;
  a.batch = c.batch;
  a.dim = c.dim;
  a.L = c.L;
  a.W = c.W;
  a.x = x.data_ptr<T>();
  a.sxb = x.stride(0);
  a.sxd = x.stride(1);
  a.sxl = x.stride(2);
  a.w = weight.data_ptr<A>();
  a.swd = weight.stride(0);
  a.swk = weight.stride(1);
  if (c.bias) {
    a.bias = c.bias->data_ptr<A>();
    a.sbd = c.bias->stride(0);
  }
  if (c.init) {
    a.init = c.init->data_ptr<T>();
    a.sib = c.init->stride(0);
    a.sid = c.init->stride(1);
    a.sik = c.init->stride(2);
  }
  if (c.cu.defined()) {
    a.cu = c.cu.data_ptr<int64_t>();
    a.nseq = c.cu.numel() - 1;
  }
  a.silu = silu;
  return a;
}

std::tuple<Tensor, Tensor> causal_conv1d_cpu(const Tensor& x, const Tensor& weight,
                                             const std::optional<Tensor>& bias,
                                             const std::optional<Tensor>& initial_states, bool silu,
                                             const std::optional<Tensor>& cu_seqlens) {
  const char* op = "causal_conv1d";
  const Checked c = check_conv(x, weight, bias, initial_states, cu_seqlens, op);
  Tensor out = new_output({c.batch, c.dim, c.L}, x.options());
  Tensor fin = new_output({c.rows, c.dim, c.W - 1}, x.options());
  if (c.batch * c.dim == 0) return {out, fin};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_cpu", [&] {
    conv_fwd_any<scalar_t>(conv_args<scalar_t>(x, weight, c, silu), out.data_ptr<scalar_t>(),
                           fin.data_ptr<scalar_t>());
  });
  return {out, fin};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> causal_conv1d_bwd_cpu(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& initial_states, bool silu, const std::optional<Tensor>& cu_seqlens,
    const Tensor& grad_out, const std::optional<Tensor>& grad_final_states) {
  const char* op = "causal_conv1d_bwd";
  const Checked c = check_conv(x, weight, bias, initial_states, cu_seqlens, op);
  like_arg(grad_out, x, {c.batch, c.dim, c.L}, op, "grad_out", "[batch, dim, L] like x");
  const Tensor* gfin = present(grad_final_states);
  if (gfin)
    like_arg(*gfin, x, {c.rows, c.dim, c.W - 1}, op, "grad_final_states", "[rows, dim, width - 1]");
  Tensor gx = new_output({c.batch, c.dim, c.L}, x.options());
  Tensor gw = new_output({c.dim, c.W}, weight.options());
  Tensor gb = c.bias ? new_output({c.dim}, weight.options()) : x.new_empty({0});
  Tensor g0 = c.init ? new_output({c.rows, c.dim, c.W - 1}, x.options()) : x.new_empty({0});
  const int64_t nrow = c.batch * c.dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    Workspace<double> pw{size_t(nrow * c.W)}, pb{size_t(nrow)};
    if (nrow > 0) {
      auto a = conv_args<scalar_t>(x, weight, c, silu);
      a.go = grad_out.data_ptr<scalar_t>();
      a.sgb = grad_out.stride(0);
      a.sgd = grad_out.stride(1);
      a.sgl = grad_out.stride(2);
      if (gfin) {
        a.gfin = gfin->data_ptr<scalar_t>();
        a.sfb = gfin->stride(0);
        a.sfd = gfin->stride(1);
        a.sfk = gfin->stride(2);
      }
      conv_bwd_any<scalar_t>(a, gx.data_ptr<scalar_t>(), c.init ? g0.data_ptr<scalar_t>() : nullptr, pw.data(),
                             pb.data());
    }
    // The filter's gradients: the rows of each channel summed in batch order.
    A* w = gw.data_ptr<A>();
    A* bsum = c.bias ? gb.data_ptr<A>() : nullptr;
    const int64_t W = c.W, dim = c.dim, batch = c.batch;
    for_range(dim, 256, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) {
        for (int64_t k = 0; k < W; ++k) {
          double s = 0.0;
          for (int64_t b = 0; b < batch; ++b) s += pw.data()[(b * dim + d) * W + k];
          w[d * W + k] = A(s);
        }
        if (bsum) {
          double s = 0.0;
          for (int64_t b = 0; b < batch; ++b) s += pb.data()[b * dim + d];
          bsum[d] = A(s);
        }
      }
    });
  });
  return {gx, gw, gb, g0};
}

}  // namespace
}  // namespace ssm
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  using namespace frontiers_fast::ssm;
  m.impl("causal_conv1d", &causal_conv1d_cpu);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd_cpu);
}

// Portable 64-byte vectors for the CPU kernels of every family.
//
// GCC/Clang vector extensions rather than intrinsics: with -march=native on
// an AVX-512 machine they become zmm registers, and under
// FRONTIERS_FAST_PORTABLE=1 the compiler splits them into whatever the target
// has, so one source serves both builds.  The few operations the extensions
// cannot express (fused multiply-add, masked stores) use AVX-512 intrinsics
// when available and a plain fallback otherwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Without AVX-512 the compiler notes that passing 64-byte vectors by value
// would change the ABI; every such function here is inline and internal.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace frontiers_fast {

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  static constexpr int W = 16;
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t Lane;
  typedef int32_t I __attribute__((vector_size(64)));  // lane masks and permutation indices
};

template <>
struct Simd<double> {
  static constexpr int W = 8;
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t Lane;
  typedef int64_t I __attribute__((vector_size(64)));
};

typedef int64_t L8 __attribute__((vector_size(64)));
typedef int32_t I8 __attribute__((vector_size(32)));

template <typename T>
using VecT = typename Simd<T>::V;
template <typename T>
using IdxT = typename Simd<T>::I;

template <typename V>
inline V loadu(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void storeu(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// `s - 0` keeps the sign of -0 (`0 + s` would not).
template <typename T>
inline VecT<T> bcast(T s) {
  return s - VecT<T>{};
}

template <typename T>
inline IdxT<T> iota() {
  IdxT<T> v;
  for (int l = 0; l < Simd<T>::W; ++l) v[l] = l;
  return v;
}

// a * b + c with one rounding where the hardware has FMA (the build uses
// -std=c++17, which turns off implicit contraction).
inline Simd<float>::V fmadd(Simd<float>::V a, Simd<float>::V b, Simd<float>::V c) {
#if defined(__AVX512F__)
  return (Simd<float>::V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  return a * b + c;
#endif
}
inline Simd<double>::V fmadd(Simd<double>::V a, Simd<double>::V b, Simd<double>::V c) {
#if defined(__AVX512F__)
  return (Simd<double>::V)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#else
  return a * b + c;
#endif
}

template <typename T>
inline VecT<T> select(IdxT<T> m, VecT<T> a, VecT<T> b) {
  return m ? a : b;
}

// Lanes [0, n) of v to p; p[n..W) untouched.
inline void store_n(float* p, Simd<float>::V v, int n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#else
  for (int l = 0; l < n; ++l) p[l] = v[l];
#endif
}
inline void store_n(double* p, Simd<double>::V v, int n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1u), (__m512d)v);
#else
  for (int l = 0; l < n; ++l) p[l] = v[l];
#endif
}

// Lanes [0, n) from p, the rest 0; never reads past p[n-1].
inline Simd<float>::V load_n(const float* p, int n) {
#if defined(__AVX512F__)
  return (Simd<float>::V)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#else
  Simd<float>::V v = {};
  for (int l = 0; l < n; ++l) v[l] = p[l];
  return v;
#endif
}
inline Simd<double>::V load_n(const double* p, int n) {
#if defined(__AVX512F__)
  return (Simd<double>::V)_mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1u), p);
#else
  Simd<double>::V v = {};
  for (int l = 0; l < n; ++l) v[l] = p[l];
  return v;
#endif
}

// Single- and two-source lane permutations (vpermps / vpermt2ps on AVX-512).
template <typename T>
inline VecT<T> perm1(VecT<T> a, IdxT<T> idx) {
  return __builtin_shuffle(a, idx);
}
template <typename T>
inline VecT<T> perm2(VecT<T> a, VecT<T> b, IdxT<T> idx) {
  return __builtin_shuffle(a, b, idx);
}

// Lane mask (all ones where equal) of a 64-bit index row against k, with as
// many lanes as a value vector of T has.
inline Simd<float>::I eq_mask(const int64_t* a, int64_t k, float*) {
  L8 kk = k - L8{};
  L8 lo = loadu<L8>(a) == kk;
  L8 hi = loadu<L8>(a + 8) == kk;
  I8 l32 = __builtin_convertvector(lo, I8);
  I8 h32 = __builtin_convertvector(hi, I8);
  return __builtin_shufflevector(l32, h32, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline Simd<double>::I eq_mask(const int64_t* a, int64_t k, double*) {
  return loadu<L8>(a) == (k - L8{});
}

// ---------------------------------------------------------------------------
// exp, vectorised.  Range reduction x = n ln2 + r, |r| <= ln2/2, a polynomial
// for e^r, then 2^n: with AVX-512 by vscalef, which gets the overflow, the
// denormals and the underflow right by itself; otherwise in two halves, so
// that results down to the denormals and up to the overflow threshold need no
// special path.  Relative error about 1 ulp (float: Cephes expf polynomial;
// double: Taylor to r^13).  The AVX-512 path is about half the instructions:
// the exps bound the selective scan.
// ---------------------------------------------------------------------------
inline Simd<float>::V vexp(Simd<float>::V x) {
  typedef Simd<float>::V V;
#if defined(__AVX512F__)
  // vscalefps computes y 2^n with the overflow to inf, the denormals and the
  // underflow to 0 done right, so only the reduction needs a bounded input:
  // the clamp keeps r small (min(hi, x) and max(lo, .) pass a NaN x through).
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), (__m512)x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = fmadd((V)n, bcast(-0.693359375f), (V)xc);
  r = fmadd((V)n, bcast(2.12194440e-4f), r);
  V y = bcast(1.9875691500e-4f);
  y = fmadd(y, r, bcast(1.3981999507e-3f));
  y = fmadd(y, r, bcast(8.3334519073e-3f));
  y = fmadd(y, r, bcast(4.1665795894e-2f));
  y = fmadd(y, r, bcast(1.6666665459e-1f));
  y = fmadd(y, r, bcast(5.0000001201e-1f));
  y = fmadd(y, r * r, r + bcast(1.0f));
  return (V)_mm512_scalef_ps((__m512)y, n);
#else
  typedef Simd<float>::I I;
  const float hi = 88.72283935546875f, lo = -103.972084045410f;
  V xc = x > bcast(hi) ? bcast(hi) : x;
  xc = xc < bcast(lo) ? bcast(lo) : xc;
  const V magic = bcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V n = (xc * bcast(1.44269504088896341f) + magic) - magic;
  V r = fmadd(n, bcast(-0.693359375f), xc);
  r = fmadd(n, bcast(2.12194440e-4f), r);
  V y = bcast(1.9875691500e-4f);
  y = fmadd(y, r, bcast(1.3981999507e-3f));
  y = fmadd(y, r, bcast(8.3334519073e-3f));
  y = fmadd(y, r, bcast(4.1665795894e-2f));
  y = fmadd(y, r, bcast(1.6666665459e-1f));
  y = fmadd(y, r, bcast(5.0000001201e-1f));
  y = fmadd(y, r * r, r + bcast(1.0f));
  I ni = __builtin_convertvector(n, I);
  I n1 = ni >> 1;
  I n2 = ni - n1;
  V s1 = (V)((n1 + 127) << 23);
  V s2 = (V)((n2 + 127) << 23);
  y = (y * s1) * s2;
  y = x < bcast(lo) ? V{} : y;
  y = x > bcast(hi) ? bcast(std::numeric_limits<float>::infinity()) : y;
  return x != x ? x : y;
#endif
}

inline Simd<double>::V vexp(Simd<double>::V x) {
  typedef Simd<double>::V V;
#if defined(__AVX512F__)
  const __m512d xc = _mm512_max_pd(_mm512_set1_pd(-746.0), _mm512_min_pd(_mm512_set1_pd(710.0), (__m512d)x));
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(xc, _mm512_set1_pd(1.44269504088896340736)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = fmadd((V)n, bcast(-6.93145751953125e-1), (V)xc);
  r = fmadd((V)n, bcast(-1.42860682030941723212e-6), r);
  static const double k[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                             1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
                             1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        0.5};
  V y = bcast(k[0]);
  for (int i = 1; i < 12; ++i) y = fmadd(y, r, bcast(k[i]));
  y = fmadd(y, r * r, r + bcast(1.0));
  return (V)_mm512_scalef_pd((__m512d)y, n);
#else
  typedef Simd<double>::I I;
  const double hi = 709.782712893383973, lo = -745.133219101941108;
  V xc = x > bcast(hi) ? bcast(hi) : x;
  xc = xc < bcast(lo) ? bcast(lo) : xc;
  const V magic = bcast(6755399441055744.0);  // 1.5 * 2^52
  V n = (xc * bcast(1.44269504088896340736) + magic) - magic;
  V r = fmadd(n, bcast(-6.93145751953125e-1), xc);
  r = fmadd(n, bcast(-1.42860682030941723212e-6), r);
  // Taylor coefficients 1/k!, k = 13 .. 2, Horner.
  static const double c[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                             1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
                             1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        0.5};
  V y = bcast(c[0]);
  for (int i = 1; i < 12; ++i) y = fmadd(y, r, bcast(c[i]));
  y = fmadd(y, r * r, r + bcast(1.0));
  I ni = __builtin_convertvector(n, I);
  I n1 = ni >> 1;
  I n2 = ni - n1;
  V s1 = (V)((n1 + 1023) << 52);
  V s2 = (V)((n2 + 1023) << 52);
  y = (y * s1) * s2;
  y = x < bcast(lo) ? V{} : y;
  y = x > bcast(hi) ? bcast(std::numeric_limits<double>::infinity()) : y;
  return x != x ? x : y;
#endif
}

// The activations around the kernels, on top of vexp.  NaN stays NaN.
// sigmoid(x) = 1 / (1 + e^-x); silu(x) = x sigmoid(x) (large |x| saturate).
template <typename T>
inline VecT<T> vsigmoid(VecT<T> x) {
  return bcast(T(1)) / (bcast(T(1)) + vexp(-x));
}
template <typename T>
inline VecT<T> vsilu(VecT<T> x) {
  return x / (bcast(T(1)) + vexp(-x));
}

// Where softplus becomes the identity: torch.nn.functional.softplus's default
// threshold, which mamba_ssm's kernels use too.
constexpr double kSoftplusThreshold = 20.0;

// log1p(u) for u in [0, 1] (float32): 2 atanh(s) with s = u / (2 + u) <= 1/3,
// its odd series to s^15 (the next term is below 2^-24 relative).
inline Simd<float>::V log1p_unit(Simd<float>::V u) {
  typedef Simd<float>::V V;
  const V s = u / (bcast(2.0f) + u);
  const V s2 = s * s;
  V p = bcast(2.0f / 15.0f);
  p = fmadd(p, s2, bcast(2.0f / 13.0f));
  p = fmadd(p, s2, bcast(2.0f / 11.0f));
  p = fmadd(p, s2, bcast(2.0f / 9.0f));
  p = fmadd(p, s2, bcast(2.0f / 7.0f));
  p = fmadd(p, s2, bcast(2.0f / 5.0f));
  p = fmadd(p, s2, bcast(2.0f / 3.0f));
  p = fmadd(p, s2, bcast(2.0f));
  return p * s;
}

// softplus(x) = log1p(e^x), as max(x, 0) + log1p(e^-|x|) so that no lane
// overflows, and x itself above kSoftplusThreshold.
inline Simd<float>::V vsoftplus(Simd<float>::V x) {
  typedef Simd<float>::V V;
  const V ax = x < V{} ? -x : x;
  V r = (x > V{} ? x : V{}) + log1p_unit(vexp(-ax));
  r = x > bcast(float(kSoftplusThreshold)) ? x : r;
  return x != x ? x : r;
}
// float64 is the testing dtype: the scalar library is exact and fast enough.
inline Simd<double>::V vsoftplus(Simd<double>::V x) {
  for (int l = 0; l < Simd<double>::W; ++l)
    if (!(x[l] > kSoftplusThreshold)) x[l] = std::log1p(std::exp(x[l]));
  return x;
}

// ---------------------------------------------------------------------------
// Segmented dot products: out[h] = sum_c a[h*C + c] * b[h*C + c] for a row of
// H heads of C channels, returned as head vectors (head h in lane h % W of
// vector h / W).  Reducing each head with its own horizontal sum would cost
// about log2(W) shuffles per head; instead the per-head partial vectors are
// reduced together in a tree (each step halves the lanes per head and packs
// two vectors into one), so all H sums cost about 2H shuffles in total.
// ---------------------------------------------------------------------------
template <typename T>
struct SegDot {
  typedef VecT<T> V;
  typedef IdxT<T> I;
  static constexpr int W = Simd<T>::W;
  static constexpr int LOGW = W == 16 ? 4 : 3;

  int H = 0, C = 0;
  int HV = 0;        // head vectors
  int mode = 0;      // 0 scalar, 1 one head per partial vector (C % W == 0), 2 W/C heads per vector
  int cv = 0;        // vectors per head (mode 1)
  int n = 0;         // partial vectors in all
  int g0 = 0;        // heads per partial vector
  int nb = 0;        // partial vectors per batch (power of two)
  int hpb = 0;       // heads per batch
  int nstage = 0;    // pairing steps
  int nfly = 0;      // butterfly steps after pairing
  I mx[LOGW + 1], my[LOGW + 1];  // pairing shuffles, indexed by log2(lanes per head)
  I fly[LOGW + 1];               // butterfly shuffles, indexed by log2(distance)
  I outmap;                      // final lane -> head order
  int fly0 = 0;                  // log2 lanes per head after pairing

  static int ilog2(int v) {
    int r = 0;
    while ((1 << r) < v) ++r;
    return r;
  }

  void init(int H_, int C_) {
    H = H_;
    C = C_;
    HV = (H + W - 1) / W;
    if (H <= 0 || C <= 0) {
      mode = 0;
      return;
    }
    if (C % W == 0) {
      mode = 1;
      cv = C / W;
      n = H;
      g0 = 1;
    } else if (C < W && W % C == 0 && (H * C) % W == 0) {
      mode = 2;
      n = H * C / W;
      g0 = W / C;
    } else {
      mode = 0;
      return;
    }
    const int L0 = W / g0;
    nb = 1 << ilog2(n);
    if (nb > L0) nb = L0;
    hpb = g0 * nb;
    nstage = ilog2(nb);
    fly0 = ilog2(L0 / nb);
    for (int lg = 1; lg <= LOGW; ++lg) {
      const int L = 1 << lg;
      for (int l = 0; l < W; ++l) {
        const int g = l / L, m = l % L;
        mx[lg][l] = m < L / 2 ? g * L + m : W + g * L + (m - L / 2);
        my[lg][l] = m < L / 2 ? g * L + L / 2 + m : W + g * L + m;
      }
    }
    for (int lg = 0; lg < LOGW; ++lg)
      for (int l = 0; l < W; ++l) fly[lg][l] = l ^ (1 << lg);
    // Follow the head held by each lane through the same pairing steps.
    int head[W][W];
    for (int v = 0; v < nb; ++v)
      for (int l = 0; l < W; ++l) head[v][l] = v * g0 + l / L0;
    int len = nb, L = L0;
    while (len > 1) {
      for (int m = 0; m < len / 2; ++m) {
        int res[W];
        for (int l = 0; l < W; ++l) {
          const int g = l / L, mm = l % L;
          res[l] = mm < L / 2 ? head[2 * m][g * L] : head[2 * m + 1][g * L];
        }
        std::memcpy(head[m], res, sizeof(res));
      }
      len /= 2;
      L /= 2;
    }
    for (int l = 0; l < W; ++l) outmap[l] = 0;
    for (int l = W - 1; l >= 0; --l)
      if (head[0][l] < W) outmap[head[0][l]] = l;
  }

  // prod(off) -> V: the elementwise product of the W values at row offset off.
  // prod_s(f) -> T: the product at row offset f (scalar fallback).
  template <class Prod, class ProdS>
  inline void run(Prod prod, ProdS prod_s, V* out) const {
    if (mode == 0) {
      T tmp[W] __attribute__((aligned(64)));
      for (int hv = 0; hv < HV; ++hv) {
        for (int l = 0; l < W; ++l) {
          const int h = hv * W + l;
          T s = T(0);
          if (h < H)
            for (int c = 0; c < C; ++c) s += prod_s(int64_t(h) * C + c);
          tmp[l] = s;
        }
        out[hv] = loadu<V>(tmp);
      }
      return;
    }
    switch (g0 * 32 + nb) {
#define FF_SEGDOT_CASE(G, B)                                 \
  case (G) * 32 + (B):                                       \
    if constexpr ((G) * (B) <= W) run_fixed<G, B>(prod, out); \
    return;
      FF_SEGDOT_CASE(1, 1)
      FF_SEGDOT_CASE(1, 2)
      FF_SEGDOT_CASE(1, 4)
      FF_SEGDOT_CASE(1, 8)
      FF_SEGDOT_CASE(1, 16)
      FF_SEGDOT_CASE(2, 1)
      FF_SEGDOT_CASE(2, 2)
      FF_SEGDOT_CASE(2, 4)
      FF_SEGDOT_CASE(2, 8)
      FF_SEGDOT_CASE(4, 1)
      FF_SEGDOT_CASE(4, 2)
      FF_SEGDOT_CASE(4, 4)
      FF_SEGDOT_CASE(8, 1)
      FF_SEGDOT_CASE(8, 2)
      FF_SEGDOT_CASE(16, 1)
#undef FF_SEGDOT_CASE
      default:
        break;
    }
  }

  static constexpr int clog2(int v) { return v <= 1 ? 0 : 1 + clog2(v / 2); }

  template <int LEN, int LG>
  inline void pair_stages(V* buf) const {
    if constexpr (LEN > 1) {
      for (int m = 0; m < LEN / 2; ++m)
        buf[m] = perm2<T>(buf[2 * m], buf[2 * m + 1], mx[LG]) + perm2<T>(buf[2 * m], buf[2 * m + 1], my[LG]);
      pair_stages<LEN / 2, LG - 1>(buf);
    }
  }

  // The tree with its shape fixed at compile time, so the partial vectors
  // live in registers: G0 heads per partial vector, NB vectors per batch.
  template <int G0, int NB, class Prod>
  inline void run_fixed(Prod prod, V* out) const {
    constexpr int LG0 = clog2(W / G0);
    constexpr int FLY = LG0 - clog2(NB);
    const int nbatch = (n + NB - 1) / NB;
    for (int bt = 0; bt < nbatch; ++bt) {
      V buf[NB];
      for (int m = 0; m < NB; ++m) {
        const int v = bt * NB + m;
        if (v >= n) {
          buf[m] = V{};
        } else if (G0 == 1) {
          const int64_t o = int64_t(v) * C;
          V s = prod(o);
          for (int c = 1; c < cv; ++c) s += prod(o + int64_t(c) * W);
          buf[m] = s;
        } else {
          buf[m] = prod(int64_t(v) * W);
        }
      }
      pair_stages<NB, LG0>(buf);
      V r = buf[0];
      for (int f = FLY - 1; f >= 0; --f) r += perm1<T>(r, fly[f]);
      r = perm1<T>(r, outmap);
      const int valid = H - bt * hpb;
      if (valid < W) r = (iota<T>() < valid) ? r : V{};
      out[bt] = r;
    }
  }

  inline void dot(const T* a, const T* b, V* out) const {
    run([&](int64_t o) { return loadu<V>(a + o) * loadu<V>(b + o); }, [&](int64_t f) { return a[f] * b[f]; },
        out);
  }
};

}  // namespace frontiers_fast

// Float data in double lanes, for the CPU kernels that accumulate in double (the fixed-point
// solver's Anderson and Broyden steps): 8 elements of T as a vector of 8 doubles and back, and dot
// products summed in a fixed order (four chains of vectors, then a fixed tree over the lanes), so
// a result depends on the data and its length alone.
//
// GCC/Clang vector extensions, with one AVX-512 instruction for the float <-> double
// conversions where the target has it (the generic conversion splits into halves and
// shuffles, and the shuffle port then bounds a kernel).  Every helper is always inlined:
// out of line, a 64-byte vector passed by value goes through memory.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

#define FF_INLINE inline __attribute__((always_inline))

namespace frontiers_fast {
namespace wide {

typedef double D8 __attribute__((vector_size(64)));
typedef float F8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

// ---------------------------------------------------------------------------
// 8 elements of T as 8 doubles, and back
// ---------------------------------------------------------------------------
FF_INLINE D8 load8(const double* p) {
  D8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FF_INLINE D8 load8(const float* p) {
#if defined(__AVX512F__)
  // One conversion instruction: the generic path splits it in halves and shuffles, and the
  // shuffle port then bounds the whole kernel.
  const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(p));
  D8 r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
#else
  F8 f;
  std::memcpy(&f, p, sizeof(f));
  return __builtin_convertvector(f, D8);
#endif
}
FF_INLINE void store8(double* p, D8 v) { std::memcpy(p, &v, sizeof(v)); }
FF_INLINE void store8(float* p, D8 v) {
#if defined(__AVX512F__)
  __m512d w;
  std::memcpy(&w, &v, sizeof(w));
  _mm256_storeu_ps(p, _mm512_cvtpd_ps(w));
#else
  const F8 f = __builtin_convertvector(v, F8);
  std::memcpy(p, &f, sizeof(f));
#endif
}

// The first m (< 8) elements, the other lanes 0.
template <typename T>
FF_INLINE D8 load8_n(const T* p, int64_t m) {
  T buf[kLanes] = {};
  std::memcpy(buf, p, m * sizeof(T));
  return load8(buf);
}
template <typename T>
FF_INLINE void store8_n(T* p, D8 v, int64_t m) {
  T buf[kLanes];
  store8(buf, v);
  std::memcpy(p, buf, m * sizeof(T));
}

// Vector k of a chunk of m elements starting at p (zero-padded past m).
template <typename T>
FF_INLINE D8 vec_at(const T* p, int k, int64_t m) {
  const int64_t at = int64_t(k) * kLanes;
  return at + kLanes <= m ? load8(p + at) : load8_n(p + at, m - at);
}
template <typename T>
FF_INLINE void put_at(T* p, int k, int64_t m, D8 v) {
  const int64_t at = int64_t(k) * kLanes;
  if (at + kLanes <= m)
    store8(p + at, v);
  else
    store8_n(p + at, v, m - at);
}

// v rounded to T (exact for double; float32's rounding, as the stored value will have).
FF_INLINE D8 round_to(D8 v, double*) { return v; }
FF_INLINE D8 round_to(D8 v, float*) {
#if defined(__AVX512F__)
  __m512d w;
  std::memcpy(&w, &v, sizeof(w));
  w = _mm512_cvtps_pd(_mm512_cvtpd_ps(w));
  D8 r;
  std::memcpy(&r, &w, sizeof(r));
  return r;
#else
  return __builtin_convertvector(__builtin_convertvector(v, F8), D8);
#endif
}

// Lanes that are finite keep their value, the others become 0 (x - x is 0 only for finite x).
FF_INLINE D8 finite_or_zero(D8 v) {
  const D8 zero = {};
  return (v - v == zero) ? v : zero;
}

// The lanes summed in a fixed tree.
FF_INLINE double hsum(D8 v) {
  double t[kLanes];
  std::memcpy(t, &v, sizeof(v));
  for (int h = kLanes / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) t[l] += t[l + h];
  return t[0];
}

// Four accumulators (vector k goes to k % 4, then ((0 + 1) + (2 + 3))): a fixed order, and four
// independent chains of adds rather than one.
FF_INLINE double dot_chunk(const D8* x, const D8* y, int nv) {
  D8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int k = 0;
  for (; k + 4 <= nv; k += 4) {
    a0 += x[k] * y[k];
    a1 += x[k + 1] * y[k + 1];
    a2 += x[k + 2] * y[k + 2];
    a3 += x[k + 3] * y[k + 3];
  }
  if (k < nv) a0 += x[k] * y[k];
  if (k + 1 < nv) a1 += x[k + 1] * y[k + 1];
  if (k + 2 < nv) a2 += x[k + 2] * y[k + 2];
  return hsum((a0 + a1) + (a2 + a3));
}

// dot_chunk(x, y, nv) with x read from memory (m elements at p): the same order, so the same bits.
template <typename T>
FF_INLINE double dot_row(const T* p, const D8* y, int nv, int64_t m) {
  D8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int k = 0;
  if (m == int64_t(nv) * kLanes) {
    for (; k + 4 <= nv; k += 4) {
      a0 += load8(p + k * kLanes) * y[k];
      a1 += load8(p + (k + 1) * kLanes) * y[k + 1];
      a2 += load8(p + (k + 2) * kLanes) * y[k + 2];
      a3 += load8(p + (k + 3) * kLanes) * y[k + 3];
    }
  } else {
    for (; k + 4 <= nv; k += 4) {
      a0 += vec_at(p, k, m) * y[k];
      a1 += vec_at(p, k + 1, m) * y[k + 1];
      a2 += vec_at(p, k + 2, m) * y[k + 2];
      a3 += vec_at(p, k + 3, m) * y[k + 3];
    }
  }
  if (k < nv) a0 += vec_at(p, k, m) * y[k];
  if (k + 1 < nv) a1 += vec_at(p, k + 1, m) * y[k + 1];
  if (k + 2 < nv) a2 += vec_at(p, k + 2, m) * y[k + 2];
  return hsum((a0 + a1) + (a2 + a3));
}

// dot_row(p, y) and dot_row(p, z) in one read of the row.
template <typename T>
FF_INLINE void dot_row2(const T* p, const D8* y, const D8* z, int nv, int64_t m, double& py, double& pz) {
  D8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
  int k = 0;
  for (; k + 4 <= nv; k += 4) {
    const D8 r0 = vec_at(p, k, m), r1 = vec_at(p, k + 1, m), r2 = vec_at(p, k + 2, m), r3 = vec_at(p, k + 3, m);
    a0 += r0 * y[k];
    a1 += r1 * y[k + 1];
    a2 += r2 * y[k + 2];
    a3 += r3 * y[k + 3];
    b0 += r0 * z[k];
    b1 += r1 * z[k + 1];
    b2 += r2 * z[k + 2];
    b3 += r3 * z[k + 3];
  }
  for (int t = 0; k + t < nv; ++t) {
    const D8 r = vec_at(p, k + t, m);
    D8& a = t == 0 ? a0 : t == 1 ? a1 : a2;
    D8& bb = t == 0 ? b0 : t == 1 ? b1 : b2;
    a += r * y[k + t];
    bb += r * z[k + t];
  }
  py = hsum((a0 + a1) + (a2 + a3));
  pz = hsum((b0 + b1) + (b2 + b3));
}

}  // namespace wide
}  // namespace frontiers_fast

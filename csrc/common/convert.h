// Rows of a storage dtype (float16, bfloat16, float32, float64) read into and
// written from the accumulate dtype (float32, or float64), for the CPU
// kernels of every family that take half inputs "read natively".
//
// A kernel loads a piece of a row into a small scratch buffer of acc, works
// there with the Simd vectors, and stores its results back in the output's
// dtype.  Contiguous half rows convert 16 lanes at a time (vcvtph2ps, a
// shift for bfloat16); strided rows and the other pairs go element by
// element.  Every conversion rounds exactly as c10's scalar ones do (round to
// nearest even; bfloat16 NaN becomes 0x7FC0), so a kernel's output does not
// depend on which path wrote it.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/simd.h"

namespace frontiers_fast {

// float64 for float64 storage, float32 for the rest.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The storage dtypes, and acc_t as a ScalarType.
inline bool is_storage_type(c10::ScalarType s) {
  return s == c10::kHalf || s == c10::kBFloat16 || s == c10::kFloat || s == c10::kDouble;
}
inline c10::ScalarType acc_scalar_type(c10::ScalarType s) { return s == c10::kDouble ? c10::kDouble : c10::kFloat; }

namespace convert_detail {

typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));

inline Simd<float>::V bf16_to_float(const c10::BFloat16* p) {
  U16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return (Simd<float>::V)(__builtin_convertvector(h, U32x16) << 16);
}

inline void float_to_bf16(Simd<float>::V v, c10::BFloat16* p) {
  const U32x16 u = (U32x16)v;
  U32x16 r = (u + (((u >> 16) & 1) + 0x7FFFu)) >> 16;
  r = (v != v) ? U32x16{} + 0x7FC0u : r;
  const U16x16 h = __builtin_convertvector(r, U16x16);
  std::memcpy(p, &h, sizeof(h));
}

inline Simd<float>::V half_to_float(const c10::Half* p) {
#if defined(__AVX512F__)
  return (Simd<float>::V)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  Simd<float>::V v;
  for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(p[l]);
  return v;
#endif
}

inline void float_to_half(Simd<float>::V v, c10::Half* p) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int l = 0; l < 16; ++l) p[l] = c10::Half(v[l]);
#endif
}

}  // namespace convert_detail

// dst[i] = src[i * stride] in A, for i < n.
template <typename A, typename T>
inline void load_row(const T* src, int64_t stride, int64_t n, A* dst) {
  if (stride == 1) {
    if constexpr (std::is_same_v<A, T>) {
      std::memcpy(dst, src, sizeof(A) * size_t(n > 0 ? n : 0));
      return;
    } else if constexpr (std::is_same_v<A, float> &&
                         (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>)) {
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        Simd<float>::V v;
        if constexpr (std::is_same_v<T, c10::Half>)
          v = convert_detail::half_to_float(src + i);
        else
          v = convert_detail::bf16_to_float(src + i);
        storeu(dst + i, v);
      }
      for (; i < n; ++i) dst[i] = static_cast<A>(src[i]);
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i * stride]);
}

// dst[i * stride] = src[i] rounded to T, for i < n.
template <typename A, typename T>
inline void store_row(const A* src, int64_t n, T* dst, int64_t stride) {
  if (stride == 1) {
    if constexpr (std::is_same_v<A, T>) {
      std::memcpy(dst, src, sizeof(A) * size_t(n > 0 ? n : 0));
      return;
    } else if constexpr (std::is_same_v<A, float> &&
                         (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>)) {
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        const Simd<float>::V v = loadu<Simd<float>::V>(src + i);
        if constexpr (std::is_same_v<T, c10::Half>)
          convert_detail::float_to_half(v, dst + i);
        else
          convert_detail::float_to_bf16(v, dst + i);
      }
      for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<T>(src[i]);
}

// Lanes [0, n) of a vector of A from p[i * stride] (n <= W; the rest 0).
template <typename A, typename T>
inline VecT<A> load_lanes(const T* p, int64_t stride, int n) {
  if constexpr (std::is_same_v<A, T>) {
    if (stride == 1) return n >= Simd<A>::W ? loadu<VecT<A>>(p) : load_n(p, n);
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, c10::Half>) {
    if (stride == 1 && n >= 16) return convert_detail::half_to_float(p);
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, c10::BFloat16>) {
    if (stride == 1 && n >= 16) return convert_detail::bf16_to_float(p);
  }
  A tmp[Simd<A>::W] __attribute__((aligned(64))) = {};
  load_row(p, stride, n, tmp);
  return loadu<VecT<A>>(tmp);
}

// Lanes [0, n) of v to p[i * stride], rounded to T.
template <typename A, typename T>
inline void store_lanes(VecT<A> v, T* p, int64_t stride, int n) {
  if constexpr (std::is_same_v<A, T>) {
    if (stride == 1) {
      if (n >= Simd<A>::W)
        storeu(p, v);
      else
        store_n(p, v, n);
      return;
    }
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, c10::Half>) {
    if (stride == 1 && n >= 16) return convert_detail::float_to_half(v, p);
  } else if constexpr (std::is_same_v<A, float> && std::is_same_v<T, c10::BFloat16>) {
    if (stride == 1 && n >= 16) return convert_detail::float_to_bf16(v, p);
  }
  A tmp[Simd<A>::W] __attribute__((aligned(64)));
  storeu(tmp, v);
  store_row(tmp, n, p, stride);
}

}  // namespace frontiers_fast

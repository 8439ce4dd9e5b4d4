// Shared pieces of the MoE family's CPU kernels (moe_cpu.cpp: routing,
// permutation, combine; experts_cpu.cpp: the fused expert MLPs).  The op
// schemas and their semantics live in frontiers_fast/ops/moe.py and
// frontiers_fast/reference/moe.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/bucket_sort.h"
#include "common/checks.h"
#include "common/convert.h"
#include "common/sched.h"
#include "moe/route_args.h"

namespace frontiers_fast {
namespace moe {

// A 2-D int32/int64 index tensor ([T, k] ids or row_map), made contiguous.
inline at::Tensor index2d_arg(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be [T, k], got shape ", t.sizes());
  return t.contiguous();
}

// Every value of an index tensor in [0, n): the op bodies read them (so a
// compiled graph refuses bad ids as eagerly as the public function does),
// with the public function's message.  ValueError.
template <typename I>
inline void index_range(const I* p, int64_t count, int64_t n, const char* name, const std::string& what) {
  int64_t lo = 0, hi = 0;
  bool bad = false;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t v = int64_t(p[i]);
    if (i == 0 || v < lo) lo = v;
    if (i == 0 || v > hi) hi = v;
    bad |= v < 0 || v >= n;
  }
  TORCH_CHECK_VALUE(!bad, name, " must lie in [0, ", n - 1, "]", what, ", got values in [", lo, ", ", hi, "]");
}

inline void index_range(const at::Tensor& t, int64_t n, const char* name, const std::string& what) {
  if (t.scalar_type() == at::kInt)
    index_range(t.data_ptr<int32_t>(), t.numel(), n, name, what);
  else
    index_range(t.data_ptr<int64_t>(), t.numel(), n, name, what);
}

inline std::string experts_note(int64_t E) { return " (there are " + std::to_string(E) + " experts)"; }

// The expert-major order of the T*k (token, slot) pairs, as
// reference.permutation: offsets [E+1], order [T*k] (the flat slot t*k + j
// of each permuted row; tokens ascend within an expert) and row_map [T*k]
// (its inverse: the permuted row of each slot).  ids must be in range.
struct Dispatch {
  at::Tensor offsets, order, row_map;
};

inline Dispatch dispatch_of(const at::Tensor& ids, int64_t E) {
  const int64_t n = ids.numel();
  const auto opt = ids.options().dtype(at::kLong);
  Dispatch d{at::empty({E + 1}, opt), at::empty({n}, opt), at::empty({n}, opt)};
  int64_t* off = d.offsets.data_ptr<int64_t>();
  int64_t* order = d.order.data_ptr<int64_t>();
  const int64_t bad = ids.scalar_type() == at::kInt ? bucket_sort(ids.data_ptr<int32_t>(), n, E, off, order)
                                                    : bucket_sort(ids.data_ptr<int64_t>(), n, E, off, order);
  TORCH_CHECK(bad < 0, "dispatch_of: an expert id is out of range (the caller checks them first)");
  int64_t* rm = d.row_map.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) rm[order[r]] = r;
  return d;
}

// out[t] = sum_j scale[t, j] * y[rows[t, j]] (scale absent: 1), in slot
// order, accumulated in A and rounded to O: the combine, and the
// permutation's backward.
template <typename T, typename A, typename O = T>
inline void gather_sum(const T* y, const int64_t* rows, const A* scale, int64_t nt, int64_t k, int64_t H, O* out) {
  for_range(nt, 16, [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(H), row(H);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h = 0; h < H; ++h) acc[h] = 0;
      for (int64_t j = 0; j < k; ++j) {
        const T* src = y + rows[t * k + j] * H;
        const A c = scale ? scale[t * k + j] : A(1);
        if constexpr (std::is_same_v<T, A>) {
          for (int64_t h = 0; h < H; ++h) acc[h] += c * src[h];
        } else {
          load_row(src, 1, H, row.data());
          for (int64_t h = 0; h < H; ++h) acc[h] += c * row[h];
        }
      }
      store_row(acc.data(), H, out + t * H, 1);
    }
  });
}

// Float types of the family: the storage dtypes.
#define FF_MOE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace moe
}  // namespace frontiers_fast

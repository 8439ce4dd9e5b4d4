// A stable counting sort of integer keys in [0, num_buckets), shared by the
// graph's CSR (keys: destinations) and the MoE permutation (keys: expert
// ids).  O(n + buckets) and stable: equal keys keep their input order, which
// both families' semantics pin (duplicate edges; tokens ascending within an
// expert).
#pragma once

#include <cstdint>
#include <vector>

namespace frontiers_fast {

// ptr[0..buckets] (buckets + 1 entries) gets the offsets and perm[0..n) the
// input positions in sorted order.  Returns -1, or the first position whose
// key lies outside [0, buckets) (then ptr and perm are unspecified).
template <typename K>
inline int64_t bucket_sort(const K* key, int64_t n, int64_t buckets, int64_t* ptr, int64_t* perm) {
  for (int64_t b = 0; b <= buckets; ++b) ptr[b] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = int64_t(key[i]);
    if (b < 0 || b >= buckets) return i;
    ++ptr[b + 1];
  }
  for (int64_t b = 0; b < buckets; ++b) ptr[b + 1] += ptr[b];
  // A serial scatter keeps the sort stable; it is one pass of n writes.
  std::vector<int64_t> cursor(ptr, ptr + buckets);
  for (int64_t i = 0; i < n; ++i) perm[cursor[int64_t(key[i])]++] = i;
  return -1;
}

}  // namespace frontiers_fast

// A stable counting sort of integer keys in [0, num_buckets): the graph's CSR
// (keys: destinations) and its transpose (keys: sources).  O(E + N) instead
// of a comparison sort's O(E log E), and stable, so equal keys (duplicate
// edges) keep their order.  Schema and reference: frontiers_fast/ops/common.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace frontiers_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> stable_bucket_sort_cpu(const at::Tensor& keys_, int64_t num_buckets) {
  const char* op = "stable_bucket_sort";
  const at::Tensor keys = index_arg(keys_, op, "keys");
  TORCH_CHECK(num_buckets >= 0, op, ": num_buckets must be non-negative, got ", num_buckets);
  const int64_t E = keys.numel();
  const int64_t* key = keys.data_ptr<int64_t>();
  at::Tensor ptr = at::zeros({num_buckets + 1}, keys.options());
  at::Tensor perm = at::empty({E}, keys.options());
  int64_t* p = ptr.data_ptr<int64_t>();
  int64_t* out = perm.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t b = key[e];
    TORCH_CHECK(b >= 0 && b < num_buckets, op, ": key ", b, " at position ", e, " is out of range [0, ",
                num_buckets, ")");
    ++p[b + 1];
  }
  for (int64_t b = 0; b < num_buckets; ++b) p[b + 1] += p[b];
  // A serial scatter keeps the sort stable; it is one pass of E writes.
  std::vector<int64_t> cursor(p, p + num_buckets);
  for (int64_t e = 0; e < E; ++e) out[cursor[key[e]]++] = e;
  return {ptr, perm};
}

}  // namespace
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) { m.impl("stable_bucket_sort", &frontiers_fast::stable_bucket_sort_cpu); }

// The op frontiers_fast_native::stable_bucket_sort (common/bucket_sort.h):
// the graph's CSR (keys: destinations) and its transpose (keys: sources).  Schema and reference: frontiers_fast/ops/common.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common/bucket_sort.h"
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
  const int64_t bad = bucket_sort(key, E, num_buckets, ptr.data_ptr<int64_t>(), perm.data_ptr<int64_t>());
  TORCH_CHECK(bad < 0, op, ": key ", bad < 0 ? 0 : key[bad], " at position ", bad, " is out of range [0, ",
              num_buckets, ")");
  return {ptr, perm};
}

}  // namespace
}  // namespace frontiers_fast

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) { m.impl("stable_bucket_sort", &frontiers_fast::stable_bucket_sort_cpu); }

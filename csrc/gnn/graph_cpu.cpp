// Graph construction: a stable counting sort of edge keys (destinations for
// the CSR, sources for its transpose).  O(E + N) instead of the O(E log E)
// comparison sort, and stable, so duplicate edges keep the user's order.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace frontiers_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> stable_bucket_sort_cpu(const at::Tensor& keys, int64_t num_buckets) {
  TORCH_CHECK(keys.device().is_cpu(), "stable_bucket_sort: keys must be a CPU tensor");
  TORCH_CHECK(keys.scalar_type() == at::kLong, "stable_bucket_sort: keys must be int64, got ", keys.scalar_type());
  TORCH_CHECK(keys.dim() == 1, "stable_bucket_sort: keys must be 1-D, got ", keys.dim(), " dims");
  TORCH_CHECK(num_buckets >= 0, "stable_bucket_sort: num_buckets must be non-negative, got ", num_buckets);
  const at::Tensor k = keys.contiguous();
  const int64_t E = k.numel();
  const int64_t* key = k.data_ptr<int64_t>();
  at::Tensor ptr = at::zeros({num_buckets + 1}, k.options());
  at::Tensor perm = at::empty({E}, k.options());
  int64_t* p = ptr.data_ptr<int64_t>();
  int64_t* out = perm.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t b = key[e];
    TORCH_CHECK(b >= 0 && b < num_buckets, "stable_bucket_sort: key ", b, " at position ", e,
                " is out of range [0, ", num_buckets, ")");
    ++p[b + 1];
  }
  for (int64_t b = 0; b < num_buckets; ++b) p[b + 1] += p[b];
  // Serial scatter keeps the sort stable; it is a single pass of E writes.
  std::vector<int64_t> cursor(p, p + num_buckets);
  for (int64_t e = 0; e < E; ++e) out[cursor[key[e]]++] = e;
  return {ptr, perm};
}

}  // namespace

TORCH_LIBRARY_IMPL(frontiers_fast, CPU, m) {
  m.impl("stable_bucket_sort", &stable_bucket_sort_cpu);
}

}  // namespace frontiers_fast

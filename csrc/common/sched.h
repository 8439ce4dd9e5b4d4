// Load balancing and thread scheduling for the CPU kernels: row-wise sparse
// passes (merge-path chunks) and dense ranges.
//
// Rows of a CSR matrix are cut into chunks of about equal cost with the
// merge-path partition (Merrill & Garland, "Merge-based parallel sparse
// matrix-vector multiplication", SC'16): the cost of a chunk counts its
// edges and its rows, so a run of empty rows is as well balanced as a hub.
// A chunk boundary that falls inside a short row moves to the row's end, so
// only rows longer than a chunk are ever split.  A split row is computed in
// pieces, each piece goes to a carry slot, and the pieces are combined after
// the parallel loop in edge order: no atomics, and the result depends only on
// the graph and the feature width, never on the thread count or the schedule.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <strings.h>
#include <exception>
#include <limits>
#include <vector>

namespace frontiers_fast {

struct Piece {
  int64_t row, kb, ke;
};

struct Chunk {
  int64_t rs, re;    // rows [rs, re) lie wholly in this chunk
  int64_t head = -1;  // piece index: the end part of a row begun in an earlier chunk
  int64_t tail = -1;  // piece index: the start of a row that goes on past this chunk
};

struct Plan {
  std::vector<Chunk> chunks;
  std::vector<Piece> pieces;  // in edge order
};

// width: work per edge and per row in units of one multiply-add (the feature
// width), so that narrow problems get few chunks and wide ones many.
inline Plan make_plan(const int64_t* ptr, int64_t n, int64_t E, int64_t width, bool allow_split) {
  const int64_t total = n + E;
  const int64_t kChunkWork = int64_t(1) << 16;
  const int64_t kMaxChunks = 1024;
  width = std::max<int64_t>(width, 1);
  int64_t nc = (total * width + kChunkWork - 1) / kChunkWork;
  nc = std::max<int64_t>(1, std::min(nc, kMaxChunks));
  // Keep every piece under 2^31 edges so the kernels can use 32-bit offsets.
  nc = std::max(nc, (total >> 29) + 1);
  const int64_t split_min = allow_split ? std::max<int64_t>(total / nc, 64) : std::numeric_limits<int64_t>::max();

  std::vector<int64_t> br(nc + 1), bk(nc + 1);
  br[0] = 0;
  bk[0] = 0;
  br[nc] = n;
  bk[nc] = E;
  for (int64_t c = 1; c < nc; ++c) {
    const int64_t d = total / nc * c + std::min<int64_t>(c, total % nc);
    // Smallest r such that row end r is not among the first d merge steps.
    int64_t lo = std::max<int64_t>(0, d - E), hi = std::min(d, n);
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (ptr[mid + 1] <= d - mid - 1)
        lo = mid + 1;
      else
        hi = mid;
    }
    int64_t r = lo, k = d - lo;
    if (r < n && k > ptr[r] && ptr[r + 1] - ptr[r] <= split_min) {
      k = ptr[r + 1];
      r = r + 1;
    }
    br[c] = r;
    bk[c] = k;
  }

  Plan plan;
  plan.chunks.resize(nc);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r0 = br[c], k0 = bk[c], r1 = br[c + 1], k1 = bk[c + 1];
    Chunk& ch = plan.chunks[c];
    const bool started = r0 < n && k0 > ptr[r0];
    ch.rs = r0;
    if (started) {
      ch.head = int64_t(plan.pieces.size());
      plan.pieces.push_back({r0, k0, r1 > r0 ? ptr[r0 + 1] : k1});
      ch.rs = r0 + 1;
    }
    ch.re = std::max(ch.rs, r1);
    if (r1 < n && (r1 > r0 || !started)) {
      const int64_t kb = std::max(k0, ptr[r1]);
      if (k1 > kb) {
        ch.tail = int64_t(plan.pieces.size());
        plan.pieces.push_back({r1, kb, k1});
      }
    }
  }
  return plan;
}

namespace sched_detail {

// fn(c) for c < nc, dynamically scheduled over `threads` OpenMP threads.
// An exception must not leave an OpenMP region (that aborts): the first one
// is kept, the remaining iterations are skipped, and it is rethrown after.
// The workers take the caller's thread-local state (dispatch keys, grad
// mode), as at::parallel_for's do, so aten calls inside fn behave as they
// would on the calling thread.
template <class Fn>
inline void parallel_iterations(int64_t nc, int threads, const Fn& fn) {
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  const at::ThreadLocalState state;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < nc; ++c) {
    if (failed.load(std::memory_order_relaxed)) continue;
    try {
      at::ThreadLocalStateGuard guard(state);
      fn(c);
    } catch (...) {
#pragma omp critical(frontiers_fast_parallel_iterations)
      if (!failed.exchange(true)) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace sched_detail

// Runs fn(c) for every chunk, dynamically scheduled over at::get_num_threads()
// threads (serially inside another parallel region).
template <class Fn>
inline void for_each_chunk(int64_t nc, const Fn& fn) {
  const int nt = at::get_num_threads();
  if (nt <= 1 || nc <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < nc; ++c) fn(c);
    return;
  }
  sched_detail::parallel_iterations(nc, nt, fn);
}

// MKL's threads for the calling thread only, when torch's MKL exports it; a
// weak reference, so a torch without MKL still loads the extension.  (This
// is MKL's C entry point: the lower-case mkl_set_num_threads_local that
// libtorch_cpu exports is the Fortran one, which takes a pointer.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// While alive, BLAS calls made by this thread run single-threaded (MKL; other
// BLAS libraries are left as they are).  Restores the previous setting.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : -1) {}
  ~SingleThreadedBlas() {
    if (prev_ >= 0) MKL_Set_Num_Threads_Local(prev_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int prev_;
};

// fn(c) for every piece c, like for_each_chunk, with every BLAS call inside
// fn single-threaded: a threaded GEMM may split its inner dimension by the
// thread count, a single-threaded one gives the same bits for any.  The
// pieces supply the parallelism instead; with pieces fixed by the data
// alone, a sequence of GEMMs is then bitwise reproducible across thread
// counts.
template <class Fn>
inline void for_each_piece(int64_t nc, const Fn& fn) {
  const auto one = [&](int64_t c) {
    SingleThreadedBlas blas;
    fn(c);
  };
  for_each_chunk(nc, one);
}

// Whether OpenMP's threads sleep between parallel regions (OMP_WAIT_POLICY=passive): each
// region then pays for waking them and for the master's wait on the join, measured at 60-130 us
// on the 2-core development VM, against about 5 us with spinning threads.
inline bool threads_sleep() {
  static const bool sleep = [] {
    const char* p = std::getenv("OMP_WAIT_POLICY");
    return p != nullptr && strcasecmp(p, "passive") == 0;
  }();
  return sleep;
}

// The grain for at::parallel_for over n items of about `work` multiply-adds each: n (the loop
// runs on the calling thread) when the whole loop is cheaper than a region's wake-up, `grain`
// otherwise.  Which thread runs an item never changes a result in these kernels, only the time.
inline int64_t wake_aware_grain(int64_t n, int64_t work, int64_t grain) {
  const int64_t floor = threads_sleep() ? (int64_t(1) << 19) : (int64_t(1) << 13);
  return n * std::max<int64_t>(work, 1) < floor ? std::max<int64_t>(n, 1) : grain;
}

// Static split of [0, n) into about equal blocks, for the dense passes.
template <class Fn>
inline void for_range(int64_t n, int64_t grain, const Fn& fn) {
  at::parallel_for(0, n, grain, fn);
}

// Calls fn(first, last) for each run of consecutive pieces of the same row.
template <class Fn>
inline void for_each_split_row(const Plan& plan, const Fn& fn) {
  const int64_t np = int64_t(plan.pieces.size());
  for (int64_t a = 0; a < np;) {
    int64_t b = a + 1;
    while (b < np && plan.pieces[b].row == plan.pieces[a].row) ++b;
    fn(a, b);
    a = b;
  }
}

}  // namespace frontiers_fast

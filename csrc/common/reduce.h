// The one encoding of an aggregation's reduce, shared by the C++ and CUDA
// kernels (no torch headers, so nvcc can compile it alone).  The numbers are
// the indices of frontiers_fast._reduce.REDUCES, which the registered ops
// pass down; tests/test_library.py reads this file to check that they agree.
#pragma once

#include <cstdint>

namespace frontiers_fast {

enum class Reduce : int { kSum = 0, kMean = 1, kMax = 2, kMin = 3 };

constexpr int kNumReduces = 4;

constexpr bool is_extremum(Reduce r) { return r == Reduce::kMax || r == Reduce::kMin; }

}  // namespace frontiers_fast

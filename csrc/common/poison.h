// Debug poisoning of kernel outputs.
//
// With FRONTIERS_FAST_DEBUG_POISON=1 every floating output a C++ kernel
// allocates is filled with NaN before the kernel writes it, so a kernel that
// leaves an element unwritten fails the comparison against the reference
// instead of passing on whatever the allocator happened to return.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace frontiers_fast {

inline bool debug_poison() {
  // Read once: getenv is not free and the setting must not change mid-run.
  static const bool on = [] {
    const char* v = std::getenv("FRONTIERS_FAST_DEBUG_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

// at::empty, NaN-filled under debug poisoning (floating dtypes only).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (debug_poison() && at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

}  // namespace frontiers_fast

// Memory for the CPU kernels: outputs (at::Tensor) and scratch buffers.
//
// Outputs.  new_output() is at::empty with two additions:
// * under FRONTIERS_FAST_DEBUG_POISON=1 a floating output is filled with NaN
//   (an integer one with -2) before the kernel writes it, so a kernel that
//   leaves an element unwritten fails its comparison with the reference
//   instead of passing on whatever the allocator returned;
// * an output of 32 MiB or more asks for transparent huge pages.  Such a
//   buffer comes from the allocator as untouched pages (glibc mmaps it), and
//   its first touch costs one page fault per 4 KiB -- for the [N, F] int64
//   arg of a max/min SpMM that was a third of the op's time.  Only the 2 MiB-
//   aligned interior is advised, so small or recycled buffers are left alone.
//   It changes where the memory comes from, never the values.
//
// Scratch.  Workspace<T> is an uninitialised buffer, 2 MiB-aligned and
// advised for huge pages when it is 4 MiB or more, for the same reason.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace frontiers_fast {

inline bool debug_poison() {
  // Read once: getenv is not free and the setting must not change mid-run.
  static const bool on = [] {
    const char* v = std::getenv("FRONTIERS_FAST_DEBUG_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

inline void advise_huge_pages(void* ptr, size_t nbytes, size_t min_bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (nbytes < min_bytes) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + nbytes) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // advisory: errors are harmless
#else
  (void)ptr;
  (void)nbytes;
  (void)min_bytes;
#endif
}

// at::empty for a kernel output: huge pages when large, poisoned under FRONTIERS_FAST_DEBUG_POISON=1.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.device().is_cpu()) advise_huge_pages(t.data_ptr(), t.nbytes(), size_t(32) << 20);
  if (debug_poison()) {
    if (at::isFloatingType(t.scalar_type()))
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (at::isIntegralType(t.scalar_type(), /*includeBool=*/false))
      t.fill_(-2);  // neither an index nor the -1 of "no edge"
  }
  return t;
}

template <typename T>
class Workspace {
 public:
  Workspace() = default;
  explicit Workspace(size_t n) { reset(n); }
  ~Workspace() { std::free(ptr_); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  void reset(size_t n) {
    std::free(ptr_);
    ptr_ = nullptr;
    size_t bytes = (n == 0 ? 1 : n) * sizeof(T);
    const size_t kHuge = size_t(2) << 20;
    const bool huge = bytes >= 2 * kHuge;
    const size_t align = huge ? kHuge : 64;
    bytes = (bytes + align - 1) / align * align;
    ptr_ = static_cast<T*>(std::aligned_alloc(align, bytes));
    if (ptr_ == nullptr) throw std::bad_alloc();
    if (huge) advise_huge_pages(ptr_, bytes, 0);
  }
  T* data() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

}  // namespace frontiers_fast

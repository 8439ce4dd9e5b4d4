// Uninitialised scratch buffers for kernels.
//
// A kernel temporary of tens of megabytes is fresh memory from the OS on every
// call, and touching it costs one page fault per 4 KiB page, which can rival
// the kernel's own work.  Large buffers are therefore aligned to 2 MiB and
// marked for transparent huge pages, so they fault in 2 MiB at a time where
// the system allows it (THP "madvise" or "always"); elsewhere this is simply an
// aligned allocation.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace frontiers_fast {

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
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(ptr_, bytes, MADV_HUGEPAGE);  // advisory: failure just means small pages
#endif
  }
  T* data() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

}  // namespace frontiers_fast

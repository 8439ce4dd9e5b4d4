// Argument checks for the C++ entry points of every family.
//
// They guard direct calls of the registered ops (the Python layer has already
// validated user input), so they are O(1): device, dtype, rank, shape, and
// the two ends of an offset array.  Index values are trusted, as the Python
// layer built them -- except user-given packed-sequence offsets (seqlens_arg).  Every message starts with the op and names the argument.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/reduce.h"

namespace frontiers_fast {

// An optional tensor argument: its address, or nullptr when absent (None or undefined).
inline const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// A 1-D int64 CPU tensor, made contiguous.
inline at::Tensor index_arg(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  return t.contiguous();
}

// A float32/float64 CPU tensor of `dim` dimensions, made contiguous.
inline at::Tensor float_arg(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  return t.contiguous();
}

// A CPU tensor of a storage dtype (float16, bfloat16, float32, float64) and `dim` dimensions.
inline void data_arg(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  check_cpu(t, op, name);
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", s);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void shape_arg(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name,
                      const char* layout) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must be ", layout, " = ", shape, ", got shape ", t.sizes());
}

inline void same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
}

// An offset array [n + 1] over `count` entries (of the tensor named `of`): its
// length and both ends.  Returns n.
inline int64_t offsets_arg(const at::Tensor& ptr, int64_t count, const char* op, const char* name, const char* of) {
  TORCH_CHECK(ptr.numel() >= 1, op, ": ", name, " must have at least one entry (n + 1 offsets)");
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t n = ptr.numel() - 1;
  TORCH_CHECK(p[0] == 0, op, ": ", name, "[0] must be 0, got ", p[0]);
  TORCH_CHECK(p[n] == count, op, ": ", name, "[-1] must equal the length of ", of, " (", count, "), got ", p[n]);
  return n;
}

// Packed-sequence offsets a user gave (cu_seqlens of the selective-scan
// family): int64 [S + 1], S >= 1, over a batch of one, 0 first, `total` (the
// length of `of`) last, never decreasing.  Unlike the O(1) checks above these
// read every value: the op bodies run them, so a compiled graph refuses bad
// offsets too.  ValueError, naming the argument.  Returns it contiguous.
inline at::Tensor seqlens_arg(const at::Tensor& t, int64_t batch, int64_t total, const char* op, const char* name,
                              const char* of) {
  at::Tensor cu = index_arg(t, op, name);
  TORCH_CHECK_VALUE(cu.numel() >= 2, op, ": ", name, " must hold S + 1 >= 2 offsets, got ", cu.numel());
  TORCH_CHECK_VALUE(batch == 1, op, ": ", name, " packs sequences along L of a batch of one, but ", of,
                    " has batch ", batch);
  const int64_t* p = cu.data_ptr<int64_t>();
  const int64_t S = cu.numel() - 1;
  TORCH_CHECK_VALUE(p[0] == 0 && p[S] == total, op, ": ", name, " must start at 0 and end at the length of ", of,
                    " (L=", total, "), got ", p[0], " ... ", p[S]);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK_VALUE(p[s] <= p[s + 1], op, ": ", name, " must not decrease, got ", name, "[", s, "]=", p[s], " > ",
                      name, "[", s + 1, "]=", p[s + 1]);
  return cu;
}

inline Reduce reduce_arg(int64_t code, const char* op) {
  TORCH_CHECK(code >= 0 && code < kNumReduces, op, ": reduce must be a code in [0, ", kNumReduces,
              ") (sum, mean, max, min), got ", code);
  return static_cast<Reduce>(code);
}

}  // namespace frontiers_fast

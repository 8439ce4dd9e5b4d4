// moe_route's option checks, shared by the CPU kernels (moe_cpu.cpp) and the
// CUDA binding (route_cuda.cpp); ATen only, so the binding's host syntax
// check needs no OpenMP.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace frontiers_fast {
namespace moe {

// moe_route's options, checked the same way by every native backend; returns whether scoring is softmax.
inline bool route_options(const char* op, std::string_view scoring, int64_t top_k, int64_t E,
                          const std::optional<int64_t>& n_group, const std::optional<int64_t>& topk_group) {
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid", op,
                    ": scoring must be 'softmax' or 'sigmoid', got '", std::string(scoring), "'");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, op, ": top_k must lie in [1, ", E, "], got ", top_k);
  TORCH_CHECK_VALUE(n_group.has_value() == topk_group.has_value(), op,
                    ": n_group and topk_group must be given together");
  if (n_group) {
    const int64_t ng = *n_group, tg = *topk_group;
    TORCH_CHECK_VALUE(ng >= 1 && E % ng == 0, op, ": n_group must divide E=", E, ", got ", ng);
    TORCH_CHECK_VALUE(tg >= 1 && tg <= ng, op, ": topk_group must lie in [1, ", ng, "], got ", tg);
    TORCH_CHECK_VALUE(top_k <= tg * (E / ng), op, ": top_k=", top_k, " exceeds the ", tg * (E / ng),
                      " experts in the topk_group=", tg, " kept groups");
  }
  return scoring == "softmax";
}

}  // namespace moe
}  // namespace frontiers_fast

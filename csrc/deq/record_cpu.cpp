// The fixed-point solver loop's per-step bookkeeping for the CPU:
// frontiers_fast_native::solver_record.  Semantics: frontiers_fast/reference/deq.py
// (solver_record); schema in frontiers_fast/ops/deq.py.
//
// One pass over the samples updates every piece of their state in place:
// the lowest residual per mode (abs, rel), the best estimate and its step in
// the stop mode, the trace column of this step (a stopped sample's gets what
// it holds), the diverged flag (a non-finite abs residual stops the sample)
// and the running mask (a residual below tol stops it).  The reference does
// the same with about fifteen small tensor ops; here it is one loop whose
// only O(D) work is copying the rows that improved (and, with hold, the
// best rows of the samples that stopped into the loop's next iterate).  Nothing is summed, so it
// is deterministic for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "common/checks.h"

namespace frontiers_fast {
namespace deq {
namespace {

using at::Tensor;

constexpr const char* kOp = "solver_record";

void need(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  check_cpu(t, kOp, name);
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous (it is updated in place)");
}

template <typename T>
void record(Tensor& best, Tensor& lowest, Tensor& blown, Tensor& nstep, Tensor& trace, Tensor& active,
            Tensor& diverged, const Tensor& est, const Tensor& res_abs, const Tensor& res_rel, int64_t step,
            double tol, int64_t stop, T* phold) {
  const int64_t B = best.size(0), D = best.size(1), T_max = trace.size(2);
  T* pbest = best.data_ptr<T>();
  T* plow = lowest.data_ptr<T>();
  T* pblown = blown.data_ptr<T>();
  int64_t* pn = nstep.data_ptr<int64_t>();
  T* ptr = trace.data_ptr<T>();
  bool* pact = active.data_ptr<bool>();
  bool* pdiv = diverged.data_ptr<bool>();
  const T* pest = est.data_ptr<T>();
  const T* res[2] = {res_abs.data_ptr<T>(), res_rel.data_ptr<T>()};
  const T t_tol = T(tol);
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool live = pact[b];
      const bool blown_now = live && !std::isfinite(res[0][b]);
      for (int mode = 0; mode < 2; ++mode) {
        const T r = res[mode][b];
        T& low = plow[mode * B + b];
        const bool better = live && r < low;  // false for NaN
        if (better) low = r;
        if (mode == stop && better) {
          std::memcpy(pbest + b * D, pest + b * D, sizeof(T) * size_t(D));
          pn[b] = step;
        }
        const T held = pdiv[b] ? pblown[mode * B + b] : low;
        ptr[(mode * B + b) * T_max + (step - 1)] = live ? r : held;
        if (blown_now) pblown[mode * B + b] = r;
      }
      pact[b] = live && !(res[stop][b] < t_tol) && !blown_now;
      pdiv[b] = pdiv[b] || blown_now;
      // A stopped sample's next iterate is its best estimate (written above where it improved).
      if (phold && !pact[b]) std::memcpy(phold + b * D, pbest + b * D, sizeof(T) * size_t(D));
    }
  });
}

void solver_record_cpu(const Tensor& best_, const Tensor& lowest_, const Tensor& blown_, const Tensor& nstep_,
                       const Tensor& trace_, const Tensor& active_, const Tensor& diverged_, const Tensor& est,
                       const Tensor& res_abs, const Tensor& res_rel,
                       int64_t step, double tol, int64_t stop, const std::optional<Tensor>& hold_) {
  // Updated in place (Tensor(a!) in the schema): handles to the caller's tensors.
  Tensor best = best_, lowest = lowest_, blown = blown_, nstep = nstep_, trace = trace_, active = active_,
         diverged = diverged_;
  check_cpu(best, kOp, "best");
  TORCH_CHECK(best.scalar_type() == at::kFloat || best.scalar_type() == at::kDouble, kOp,
              ": best must be float32 or float64, got ", best.scalar_type());
  TORCH_CHECK(best.dim() == 2 && best.is_contiguous(), kOp, ": best must be a contiguous [B, D], got shape ",
              best.sizes());
  const auto dt = best.scalar_type();
  const int64_t B = best.size(0), D = best.size(1);
  need(est, "est", dt, {B, D});
  need(lowest, "lowest", dt, {2, B});
  need(blown, "blown", dt, {2, B});
  need(res_abs, "res_abs", dt, {B});
  need(res_rel, "res_rel", dt, {B});
  need(nstep, "nstep", at::kLong, {B});
  need(active, "active", at::kBool, {B});
  need(diverged, "diverged", at::kBool, {B});
  check_cpu(trace, kOp, "trace");
  TORCH_CHECK(trace.scalar_type() == dt && trace.dim() == 3 && trace.size(0) == 2 && trace.size(1) == B &&
                  trace.is_contiguous(),
              kOp, ": trace must be a contiguous ", dt, " [2, B, max_iter] with B = ", B, ", got ",
              trace.scalar_type(), " ", trace.sizes());
  TORCH_CHECK_VALUE(step >= 1 && step <= trace.size(2), kOp, ": step must be in [1, max_iter] = [1, ",
                    trace.size(2), "], got ", step);
  TORCH_CHECK_VALUE(stop == 0 || stop == 1, kOp, ": stop must be 0 (abs) or 1 (rel), got ", stop);
  Tensor hold;
  if (hold_.has_value() && hold_->defined()) {
    hold = *hold_;
    need(hold, "hold", dt, {B, D});
  }
  AT_DISPATCH_FLOATING_TYPES(dt, kOp, [&] {
    record<scalar_t>(best, lowest, blown, nstep, trace, active, diverged, est, res_abs, res_rel, step, tol, stop,
                     hold.defined() ? hold.data_ptr<scalar_t>() : nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) { m.impl("solver_record", &solver_record_cpu); }

}  // namespace deq
}  // namespace frontiers_fast

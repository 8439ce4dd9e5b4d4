// Spherical harmonics of the splatting family for the CPU:
// frontiers_fast_native::spherical_harmonics and spherical_harmonics_bwd.
// Semantics and the float64 truth: frontiers_fast/reference/splat.py
// (sh_basis, spherical_harmonics); schemas in frontiers_fast/ops/splat.py.
//
//   v = dirs / max(|dirs|, 1e-12)          (torch's F.normalize)
//   colour[c] = mask * sum_{b < (degree+1)^2} Y_b(v) coeffs[b][c]
//
// One pass over the entries, each independent of the others: the basis and
// (backward) its derivative in registers, then the few products.  The
// backward is analytic:
//   grad coeffs[b][c] = mask Y_b(v) g[c]       (0 for b past the degree)
//   grad v = mask sum_b dY_b/dv (sum_c coeffs[b][c] g[c])
//   grad dirs = (grad v - v (v . grad v)) / |dirs|    (|dirs| > 1e-12)
//             = grad v / 1e-12                         (otherwise, as F.normalize)
// Nothing is reduced across entries, so it is deterministic for any thread
// count.  NaN or inf in dirs or coeffs is refused by the forward, as the
// reference op does (the backward, like the reference's, takes the inputs
// its forward accepted).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>

#include "common/alloc.h"
#include "common/checks.h"

namespace frontiers_fast {
namespace splat {
namespace {

using at::Tensor;

constexpr double kC0 = 0.28209479177387814;
constexpr double kC1 = 0.4886025119029199;
constexpr double kC2[5] = {1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
                           0.5462742152960396};
constexpr double kC3[7] = {-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
                           -0.4570457994644658, 1.445305721320277,  -0.5900435899266435};
constexpr double kNormEps = 1e-12;  // F.normalize's eps

// The basis Y[0, nb) at the unit vector (x, y, z) and, when d is given, its
// gradient d[b] = (dY_b/dx, dY_b/dy, dY_b/dz).
template <typename T>
inline void basis(int degree, T x, T y, T z, T* Y, T (*d)[3]) {
  Y[0] = T(kC0);
  if (d) d[0][0] = d[0][1] = d[0][2] = T(0);
  if (degree < 1) return;
  const T c1 = T(kC1);
  Y[1] = -c1 * y;
  Y[2] = c1 * z;
  Y[3] = -c1 * x;
  if (d) {
    d[1][0] = 0, d[1][1] = -c1, d[1][2] = 0;
    d[2][0] = 0, d[2][1] = 0, d[2][2] = c1;
    d[3][0] = -c1, d[3][1] = 0, d[3][2] = 0;
  }
  if (degree < 2) return;
  const T xx = x * x, yy = y * y, zz = z * z;
  const T a0 = T(kC2[0]), a1 = T(kC2[1]), a2 = T(kC2[2]), a3 = T(kC2[3]), a4 = T(kC2[4]);
  Y[4] = a0 * x * y;
  Y[5] = a1 * y * z;
  Y[6] = a2 * (T(2) * zz - xx - yy);
  Y[7] = a3 * x * z;
  Y[8] = a4 * (xx - yy);
  if (d) {
    d[4][0] = a0 * y, d[4][1] = a0 * x, d[4][2] = 0;
    d[5][0] = 0, d[5][1] = a1 * z, d[5][2] = a1 * y;
    d[6][0] = T(-2) * a2 * x, d[6][1] = T(-2) * a2 * y, d[6][2] = T(4) * a2 * z;
    d[7][0] = a3 * z, d[7][1] = 0, d[7][2] = a3 * x;
    d[8][0] = T(2) * a4 * x, d[8][1] = T(-2) * a4 * y, d[8][2] = 0;
  }
  if (degree < 3) return;
  const T b0 = T(kC3[0]), b1 = T(kC3[1]), b2 = T(kC3[2]), b3 = T(kC3[3]), b4 = T(kC3[4]), b5 = T(kC3[5]),
          b6 = T(kC3[6]);
  Y[9] = b0 * y * (T(3) * xx - yy);
  Y[10] = b1 * x * y * z;
  Y[11] = b2 * y * (T(4) * zz - xx - yy);
  Y[12] = b3 * z * (T(2) * zz - T(3) * xx - T(3) * yy);
  Y[13] = b4 * x * (T(4) * zz - xx - yy);
  Y[14] = b5 * z * (xx - yy);
  Y[15] = b6 * x * (xx - T(3) * yy);
  if (d) {
    d[9][0] = T(6) * b0 * x * y, d[9][1] = T(3) * b0 * (xx - yy), d[9][2] = 0;
    d[10][0] = b1 * y * z, d[10][1] = b1 * x * z, d[10][2] = b1 * x * y;
    d[11][0] = T(-2) * b2 * x * y, d[11][1] = b2 * (T(4) * zz - xx - T(3) * yy), d[11][2] = T(8) * b2 * y * z;
    d[12][0] = T(-6) * b3 * x * z, d[12][1] = T(-6) * b3 * y * z, d[12][2] = b3 * (T(6) * zz - T(3) * xx - T(3) * yy);
    d[13][0] = b4 * (T(4) * zz - T(3) * xx - yy), d[13][1] = T(-2) * b4 * x * y, d[13][2] = T(8) * b4 * x * z;
    d[14][0] = T(2) * b5 * x * z, d[14][1] = T(-2) * b5 * y * z, d[14][2] = b5 * (xx - yy);
    d[15][0] = T(3) * b6 * (xx - yy), d[15][1] = T(-6) * b6 * x * y, d[15][2] = 0;
  }
}

// The unit vector of d and the length it was divided by (F.normalize).
template <typename T>
inline T normalize(const T* d, T* v) {
  const T n = std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
  const T s = std::max(n, T(kNormEps));
  v[0] = d[0] / s, v[1] = d[1] / s, v[2] = d[2] / s;
  return n;
}

struct Args {
  Tensor dirs, coeffs, masks;  // masks undefined when absent
  int64_t n, K;
  int degree;
};

Args check_args(const char* op, int64_t degree, const Tensor& dirs_, const Tensor& coeffs_,
                const std::optional<Tensor>& masks_) {
  TORCH_CHECK_VALUE(degree >= 0 && degree <= 3, op, ": degree must be 0 to 3, got ", degree);
  check_cpu(dirs_, op, "dirs");
  check_cpu(coeffs_, op, "coeffs");
  TORCH_CHECK(dirs_.scalar_type() == at::kFloat || dirs_.scalar_type() == at::kDouble, op,
              ": dirs must be float32 or float64, got ", dirs_.scalar_type());
  same_dtype(coeffs_, dirs_, op, "coeffs", "dirs");
  TORCH_CHECK(dirs_.dim() >= 1 && dirs_.size(-1) == 3, op, ": dirs must be [..., 3], got shape ", dirs_.sizes());
  const int64_t n = dirs_.numel() / 3;
  TORCH_CHECK(coeffs_.dim() == dirs_.dim() + 1 && coeffs_.size(-1) == 3 &&
                  coeffs_.sizes().slice(0, dirs_.dim() - 1) == dirs_.sizes().slice(0, dirs_.dim() - 1),
              op, ": coeffs must be [..., K, 3] over the batch of dirs ", dirs_.sizes(), ", got shape ",
              coeffs_.sizes());
  const int64_t K = coeffs_.size(-2);
  TORCH_CHECK_VALUE(K >= (degree + 1) * (degree + 1), op, ": coeffs has ", K, " bases but degree ", degree,
                    " needs ", (degree + 1) * (degree + 1));
  Tensor masks;
  if (const Tensor* m = present(masks_)) {
    check_cpu(*m, op, "masks");
    TORCH_CHECK(m->scalar_type() == at::kBool, op, ": masks must be bool, got ", m->scalar_type());
    TORCH_CHECK(m->sizes() == dirs_.sizes().slice(0, dirs_.dim() - 1), op, ": masks must be shaped like dirs' batch ",
                dirs_.sizes().slice(0, dirs_.dim() - 1), ", got ", m->sizes());
    masks = m->contiguous();
  }
  return {dirs_.contiguous(), coeffs_.contiguous(), masks, n, K, int(degree)};
}

constexpr int64_t kGrain = 2048;

Tensor spherical_harmonics_cpu(int64_t degree, const Tensor& dirs_, const Tensor& coeffs_,
                               const std::optional<Tensor>& masks_) {
  const Args a = check_args("spherical_harmonics", degree, dirs_, coeffs_, masks_);
  auto shape = dirs_.sizes().vec();
  Tensor out = new_output(shape, a.dirs.options());
  AT_DISPATCH_FLOATING_TYPES(a.dirs.scalar_type(), "spherical_harmonics", [&] {
    using T = scalar_t;
    const T* dirs = a.dirs.data_ptr<T>();
    const T* coeffs = a.coeffs.data_ptr<T>();
    const bool* masks = a.masks.defined() ? a.masks.data_ptr<bool>() : nullptr;
    T* o = out.data_ptr<T>();
    const int nb = (a.degree + 1) * (a.degree + 1);
    const int64_t kc = a.K * 3;
    std::atomic<bool> bad_dirs{false}, bad_coeffs{false};
    at::parallel_for(0, a.n, kGrain, [&](int64_t i0, int64_t i1) {
      // The finiteness check rides on this pass: x * 0 is NaN exactly when
      // x is NaN or inf, so one sum per chunk tells (every coefficient,
      // masked-out and unused ones included, as the reference checks them).
      T fd = 0, fc = 0;
      for (int64_t j = i0 * 3; j < i1 * 3; ++j) fd += dirs[j] * T(0);
      for (int64_t j = i0 * kc; j < i1 * kc; ++j) fc += coeffs[j] * T(0);
      if (fd != fd) bad_dirs = true;
      if (fc != fc) bad_coeffs = true;
      T Y[16], v[3];
      for (int64_t i = i0; i < i1; ++i) {
        T* oi = o + i * 3;
        if (masks && !masks[i]) {
          oi[0] = oi[1] = oi[2] = T(0);
          continue;
        }
        normalize(dirs + i * 3, v);
        basis<T>(a.degree, v[0], v[1], v[2], Y, nullptr);
        const T* c = coeffs + i * a.K * 3;
        T r = 0, g = 0, b = 0;
        for (int k = 0; k < nb; ++k) {
          r += Y[k] * c[k * 3];
          g += Y[k] * c[k * 3 + 1];
          b += Y[k] * c[k * 3 + 2];
        }
        oi[0] = r, oi[1] = g, oi[2] = b;
      }
    });
    TORCH_CHECK_VALUE(!bad_dirs, "spherical_harmonics: dirs must be finite (it contains NaN or inf)");
    TORCH_CHECK_VALUE(!bad_coeffs, "spherical_harmonics: coeffs must be finite (it contains NaN or inf)");
  });
  return out;
}

std::tuple<Tensor, Tensor> spherical_harmonics_bwd_cpu(int64_t degree, const Tensor& dirs_, const Tensor& coeffs_,
                                                       const std::optional<Tensor>& masks_,
                                                       const Tensor& grad_colors_) {
  const char* op = "spherical_harmonics_bwd";
  const Args a = check_args(op, degree, dirs_, coeffs_, masks_);
  check_cpu(grad_colors_, op, "grad_colors");
  same_dtype(grad_colors_, dirs_, op, "grad_colors", "dirs");
  TORCH_CHECK(grad_colors_.sizes() == dirs_.sizes(), op, ": grad_colors must be shaped like dirs ", dirs_.sizes(),
              ", got ", grad_colors_.sizes());
  const Tensor go = grad_colors_.contiguous();
  Tensor gd = new_output(dirs_.sizes(), a.dirs.options());
  Tensor gc = new_output(coeffs_.sizes(), a.coeffs.options());
  AT_DISPATCH_FLOATING_TYPES(a.dirs.scalar_type(), "spherical_harmonics_bwd", [&] {
    using T = scalar_t;
    const T* dirs = a.dirs.data_ptr<T>();
    const T* coeffs = a.coeffs.data_ptr<T>();
    const T* g = go.data_ptr<T>();
    const bool* masks = a.masks.defined() ? a.masks.data_ptr<bool>() : nullptr;
    T* gdp = gd.data_ptr<T>();
    T* gcp = gc.data_ptr<T>();
    const int nb = (a.degree + 1) * (a.degree + 1);
    at::parallel_for(0, a.n, kGrain, [&](int64_t i0, int64_t i1) {
      T Y[16], dY[16][3], v[3];
      for (int64_t i = i0; i < i1; ++i) {
        T* gci = gcp + i * a.K * 3;
        T* gdi = gdp + i * 3;
        const bool off = masks && !masks[i];
        // Bases past the degree (all of them where masked out) get no gradient.
        for (int64_t k = off ? 0 : nb * 3; k < a.K * 3; ++k) gci[k] = T(0);
        if (off) {
          gdi[0] = gdi[1] = gdi[2] = T(0);
          continue;
        }
        const T n = normalize(dirs + i * 3, v);
        basis<T>(a.degree, v[0], v[1], v[2], Y, dY);
        const T* c = coeffs + i * a.K * 3;
        const T* gi = g + i * 3;
        T gv[3] = {0, 0, 0};
        for (int k = 0; k < nb; ++k) {
          gci[k * 3] = Y[k] * gi[0];
          gci[k * 3 + 1] = Y[k] * gi[1];
          gci[k * 3 + 2] = Y[k] * gi[2];
          const T s = c[k * 3] * gi[0] + c[k * 3 + 1] * gi[1] + c[k * 3 + 2] * gi[2];
          gv[0] += dY[k][0] * s;
          gv[1] += dY[k][1] * s;
          gv[2] += dY[k][2] * s;
        }
        if (n > T(kNormEps)) {
          const T vg = v[0] * gv[0] + v[1] * gv[1] + v[2] * gv[2];
          for (int j = 0; j < 3; ++j) gdi[j] = (gv[j] - v[j] * vg) / n;
        } else {
          for (int j = 0; j < 3; ++j) gdi[j] = gv[j] / T(kNormEps);
        }
      }
    });
  });
  return {gd, gc};
}

}  // namespace

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  m.impl("spherical_harmonics", &spherical_harmonics_cpu);
  m.impl("spherical_harmonics_bwd", &spherical_harmonics_bwd_cpu);
}

}  // namespace splat
}  // namespace frontiers_fast

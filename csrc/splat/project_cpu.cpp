// EWA projection of the splatting family for the CPU:
// frontiers_fast_native::project_gaussians and project_gaussians_bwd.
// Semantics and the float64 truth: frontiers_fast/reference/splat.py
// (project_gaussians); schemas and the reference entries (_ref_project, whose
// value checks this forward repeats) in frontiers_fast/ops/splat.py.
//
// Per Gaussian: q^ = q / max(|q|, 1e-12), M = R(q^) diag(s), Sigma = M M^T.
// Per (camera, Gaussian), with the camera's R, t, fx, fy, cx, cy:
//   p = R mu + t = (x, y, z),  Sigma_c = R Sigma R^T
//   u = clamp(x/z, -(cx/fx + 0.3 tan_x), (W - cx)/fx + 0.3 tan_x),  tan_x = W / (2 fx)   (v likewise)
//   J = [[fx/z, 0, -fx u/z], [0, fy/z, -fy v/z]],  cov2d = J Sigma_c J^T
//   (a, b, c) = (cov2d_00, (cov2d_01 + cov2d_10) / 2, cov2d_11), blurred by eps2d on the diagonal
//   conic = (c', -b, a') / det',  comp = sqrt(max(det / det', 0.005^2))
//   radius = ceil(min(3.33, sqrt(2 ln(255 o'))) sqrt(a' or c'))   (o' = o comp when antialiased)
// computed in the input dtype in the reference's order of operations, so the
// integer radii and the culling follow the reference in that dtype (up to the
// rounding of a value that sits on an integer or a cut).  Culled entries are
// the reference's values times 0, so a value that overflowed comes out NaN
// and is refused as the reference's _check_projected refuses it.
//
// The backward is analytic and projects each pair twice.  First in the input
// dtype, with the forward's own function (noinline, noclone: one body, so the
// culling, the FOV clamp and the compensation floor are decided as the
// forward decided them, to the bit).  Then, for a kept pair, in float64 from
// the inputs widened to float64 (pair_values), on those branches: the values
// the gradient is pulled back through.  A float32 call thus gets the float64
// gradient of the branches its forward took; pulling back through float32
// intermediates instead loses most digits on a thin Gaussian, whose cov2d
// entries cancel in its det and whose Sigma = M M^T hides its thin widths.
// The pull-back, in float64:
//   conic:  d det' = -(g . conic) / det',  d a' = g_C / det' + d det' c', d c' = g_A / det' + d det' a',
//           d b = -g_B / det' - 2 b d det'
//   comp:   r = det / det' >= 0.005^2 only (torch.clamp passes no gradient below), d r = g / (2 comp)
//   cov2d:  G = [[d a, d b / 2], [d b / 2, d c]],  d J = 2 G J Sigma_c,  d Sigma_c = J^T G J
//   clamp:  d (x/z) inside the bounds; outside, the active bound gets it (torch.clamp with tensor
//           bounds), and through it fx and cx
//   d R += 2 d Sigma_c R Sigma + d p mu^T,  d Sigma += R^T d Sigma_c R,  d mu += R^T d p
//   d M = 2 d Sigma M,  then the rotation matrix, and F.normalize: (d q^ - q^ (q^ . d q^)) / |q|
// Culled pairs contribute nothing; their incoming gradients are not read (the
// reference multiplies them by 0, which a NaN there would survive).  The
// per-Gaussian gradients sum over the cameras in camera order.  The
// per-camera ones (viewmats, Ks) sum over the Gaussians: fixed chunks of
// kChunk Gaussians, whose number does not depend on the thread count, each
// write float64 partial sums, added after the parallel loop in chunk order.
// So the gradients are bitwise the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/sched.h"

namespace frontiers_fast {
namespace splat {
namespace {

using at::Tensor;

// The constants of frontiers_fast/reference/splat.py.
constexpr double kAlphaThreshold = 1.0 / 255.0;
constexpr double kMaxExtend = 3.33;
constexpr double kFovClamp = 0.3;
constexpr double kMinCompensation = 0.005;
constexpr double kQuatMinNorm = 1e-12;  // F.normalize's eps

template <typename T>
struct Camera {
  T R[3][3], t[3];
  T fx, fy, cx, cy;
  T lox, hix, loy, hiy;  // the FOV clamp of x/z and y/z
};

template <typename T>
struct Params {
  T eps2d, near_plane, far_plane, radius_clip, width, height;
  T thr, min_comp2, max_extend;
  bool antialiased;
};

template <typename T>
struct Gaussian {
  T mean[3], s[3], opac;
  T qn, q[4];  // |q| and q / max(|q|, eps)
  T R[3][3], M[3][3], cov[3][3];
};

// Everything the backward needs of one (camera, Gaussian) pair.
template <typename T>
struct Pair {
  T p[3], zs, tx, ty, u, v;
  T covc[3][3];
  T J00, J02, J11, J12;
  T a, b, c, ab, cb;  // cov2d before and after the blur (ab = a + eps2d)
  T det_orig, dets, r, comp;
  T mx, my, conic[3];
  T rx, ry;
  bool keep;
};

template <typename T>
Camera<T> make_camera(const T* V, const T* K, T width, T height) {
  Camera<T> k;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) k.R[i][j] = V[i * 4 + j];
    k.t[i] = V[i * 4 + 3];
  }
  k.fx = K[0], k.fy = K[4], k.cx = K[2], k.cy = K[5];
  // As the reference writes them (0.5 * width / fx is torch's reciprocal(fx) * (0.5 * width)).
  const T tan_x = (T(1) / k.fx) * (T(0.5) * width), tan_y = (T(1) / k.fy) * (T(0.5) * height);
  const T f = T(kFovClamp);
  k.lox = -(k.cx / k.fx + f * tan_x);
  k.hix = (width - k.cx) / k.fx + f * tan_x;
  k.loy = -(k.cy / k.fy + f * tan_y);
  k.hiy = (height - k.cy) / k.fy + f * tan_y;
  return k;
}

template <typename T>
__attribute__((noinline, noclone)) void make_gaussian(const T* mean, const T* quat, const T* scale, T opac,
                                                      Gaussian<T>& g) {
  for (int i = 0; i < 3; ++i) g.mean[i] = mean[i], g.s[i] = scale[i];
  g.opac = opac;
  g.qn = std::sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
  const T den = g.qn < T(kQuatMinNorm) ? T(kQuatMinNorm) : g.qn;
  for (int i = 0; i < 4; ++i) g.q[i] = quat[i] / den;
  const T w = g.q[0], x = g.q[1], y = g.q[2], z = g.q[3];
  g.R[0][0] = T(1) - T(2) * (y * y + z * z);
  g.R[0][1] = T(2) * (x * y - w * z);
  g.R[0][2] = T(2) * (x * z + w * y);
  g.R[1][0] = T(2) * (x * y + w * z);
  g.R[1][1] = T(1) - T(2) * (x * x + z * z);
  g.R[1][2] = T(2) * (y * z - w * x);
  g.R[2][0] = T(2) * (x * z - w * y);
  g.R[2][1] = T(2) * (y * z + w * x);
  g.R[2][2] = T(1) - T(2) * (x * x + y * y);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) g.M[i][j] = g.R[i][j] * g.s[j];
  for (int i = 0; i < 3; ++i)
    for (int j = i; j < 3; ++j)
      g.cov[i][j] = g.cov[j][i] = g.M[i][0] * g.M[j][0] + g.M[i][1] * g.M[j][1] + g.M[i][2] * g.M[j][2];
}

template <typename T>
__attribute__((noinline, noclone)) void project_pair(const Gaussian<T>& g, const Camera<T>& k, const Params<T>& P,
                                                     Pair<T>& o) {
  for (int i = 0; i < 3; ++i)
    o.p[i] = k.R[i][0] * g.mean[0] + k.R[i][1] * g.mean[1] + k.R[i][2] * g.mean[2] + k.t[i];
  T RS[3][3];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) RS[i][j] = k.R[i][0] * g.cov[0][j] + k.R[i][1] * g.cov[1][j] + k.R[i][2] * g.cov[2][j];
  for (int i = 0; i < 3; ++i)
    for (int j = i; j < 3; ++j)
      o.covc[i][j] = o.covc[j][i] = RS[i][0] * k.R[j][0] + RS[i][1] * k.R[j][1] + RS[i][2] * k.R[j][2];
  const T x = o.p[0], y = o.p[1], z = o.p[2];
  const bool depth_ok = z >= P.near_plane && z <= P.far_plane;
  // Culled pairs get a safe depth, as in the reference, so their values stay finite.
  const T zs = depth_ok ? z : T(1);
  o.zs = zs;
  o.tx = x / zs, o.ty = y / zs;
  o.u = o.tx < k.lox ? k.lox : (o.tx > k.hix ? k.hix : o.tx);
  o.v = o.ty < k.loy ? k.loy : (o.ty > k.hiy ? k.hiy : o.ty);
  o.J00 = k.fx / zs, o.J02 = -k.fx * o.u / zs;
  o.J11 = k.fy / zs, o.J12 = -k.fy * o.v / zs;
  T A0[3], A1[3];  // the rows of J Sigma_c
  for (int j = 0; j < 3; ++j) {
    A0[j] = o.J00 * o.covc[0][j] + o.J02 * o.covc[2][j];
    A1[j] = o.J11 * o.covc[1][j] + o.J12 * o.covc[2][j];
  }
  o.a = A0[0] * o.J00 + A0[2] * o.J02;
  o.b = T(0.5) * ((A0[1] * o.J11 + A0[2] * o.J12) + (A1[0] * o.J00 + A1[2] * o.J02));
  o.c = A1[1] * o.J11 + A1[2] * o.J12;
  o.mx = k.fx * x / zs + k.cx;
  o.my = k.fy * y / zs + k.cy;
  o.det_orig = o.a * o.c - o.b * o.b;
  o.ab = o.a + P.eps2d, o.cb = o.c + P.eps2d;
  const T det = o.ab * o.cb - o.b * o.b;
  const bool det_ok = det > T(0);
  o.dets = det_ok ? det : T(1);
  o.conic[0] = o.cb / o.dets, o.conic[1] = -o.b / o.dets, o.conic[2] = o.ab / o.dets;
  o.r = o.det_orig / o.dets;
  o.comp = std::sqrt(o.r < P.min_comp2 ? P.min_comp2 : o.r);  // a NaN r stays NaN, as in torch.clamp
  const T opac = P.antialiased ? g.opac * o.comp : g.opac;
  const bool opac_ok = opac >= P.thr;
  T extend = std::sqrt(T(2) * std::log((opac < P.thr ? P.thr : opac) / P.thr));
  extend = extend > P.max_extend ? P.max_extend : extend;
  o.rx = std::ceil(extend * std::sqrt(o.ab < T(0) ? T(0) : o.ab));
  o.ry = std::ceil(extend * std::sqrt(o.cb < T(0) ? T(0) : o.cb));
  const bool big_enough = o.rx > P.radius_clip || o.ry > P.radius_clip;
  const bool on_image =
      o.mx + o.rx > T(0) && o.mx - o.rx < P.width && o.my + o.ry > T(0) && o.my - o.ry < P.height;
  o.keep = depth_ok && det_ok && opac_ok && big_enough && on_image;
}

// The values of a pair that project_pair kept, in float64 (A), on the branches o, its projection in the
// input dtype, took: the depth is in range, x/z and y/z take the bound o passed, det' > 0.  Only what the
// backward reads: p, Sigma_c, zs, u, v, J, cov2d before and after the blur, det', r and comp.  In the
// reference's order of operations, as project_pair.
template <typename A, typename T>
void pair_values(const Gaussian<A>& g, const Camera<A>& k, const Params<A>& P, const Camera<T>& kt,
                 const Pair<T>& o, Pair<A>& w) {
  for (int i = 0; i < 3; ++i)
    w.p[i] = k.R[i][0] * g.mean[0] + k.R[i][1] * g.mean[1] + k.R[i][2] * g.mean[2] + k.t[i];
  A RS[3][3];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) RS[i][j] = k.R[i][0] * g.cov[0][j] + k.R[i][1] * g.cov[1][j] + k.R[i][2] * g.cov[2][j];
  for (int i = 0; i < 3; ++i)
    for (int j = i; j < 3; ++j)
      w.covc[i][j] = w.covc[j][i] = RS[i][0] * k.R[j][0] + RS[i][1] * k.R[j][1] + RS[i][2] * k.R[j][2];
  const A z = w.p[2];
  w.zs = z;
  w.tx = w.p[0] / z, w.ty = w.p[1] / z;
  w.u = o.tx < kt.lox ? k.lox : (o.tx > kt.hix ? k.hix : w.tx);
  w.v = o.ty < kt.loy ? k.loy : (o.ty > kt.hiy ? k.hiy : w.ty);
  w.J00 = k.fx / z, w.J02 = -k.fx * w.u / z;
  w.J11 = k.fy / z, w.J12 = -k.fy * w.v / z;
  A A0[3], A1[3];  // the rows of J Sigma_c
  for (int j = 0; j < 3; ++j) {
    A0[j] = w.J00 * w.covc[0][j] + w.J02 * w.covc[2][j];
    A1[j] = w.J11 * w.covc[1][j] + w.J12 * w.covc[2][j];
  }
  w.a = A0[0] * w.J00 + A0[2] * w.J02;
  w.b = A(0.5) * ((A0[1] * w.J11 + A0[2] * w.J12) + (A1[0] * w.J00 + A1[2] * w.J02));
  w.c = A1[1] * w.J11 + A1[2] * w.J12;
  w.det_orig = w.a * w.c - w.b * w.b;
  w.ab = w.a + P.eps2d, w.cb = w.c + P.eps2d;
  w.dets = w.ab * w.cb - w.b * w.b;
  w.r = w.det_orig / w.dets;
  // Where o is above the floor, float64's r may still sit under it (o's r is a rounded cancellation):
  // the floor keeps 1 / comp, the gradient's factor, as bounded as the forward's.
  w.comp = std::sqrt(w.r < P.min_comp2 ? P.min_comp2 : w.r);
}

// narrow itself where it already is the float64 one (a float64 call), else wide.
template <typename Wide, typename Narrow>
const Wide& wide_or(const Narrow& narrow, const Wide& wide) {
  if constexpr (std::is_same_v<Wide, Narrow>)
    return narrow;
  else
    return wide;
}

// torch's float -> int32 on x86: the integer indefinite (INT32_MIN) out of range.
template <typename T>
inline int32_t to_int32(T r) {
  return r >= T(-2147483648.0) && r < T(2147483648.0) ? int32_t(r) : std::numeric_limits<int32_t>::min();
}

struct Args {
  Tensor means, quats, scales, opacities, viewmats, Ks;
  int64_t N, C;
};

Args check_args(const char* op, const Tensor& means, const Tensor& quats, const Tensor& scales,
                const Tensor& opacities, const Tensor& viewmats, const Tensor& Ks) {
  Args a;
  a.means = float_arg(means, op, "means", 2);
  const int64_t N = a.means.size(0);
  a.quats = float_arg(quats, op, "quats", 2);
  a.scales = float_arg(scales, op, "scales", 2);
  a.opacities = float_arg(opacities, op, "opacities", 1);
  a.viewmats = float_arg(viewmats, op, "viewmats", 3);
  const int64_t C = a.viewmats.size(0);
  a.Ks = float_arg(Ks, op, "Ks", 3);
  shape_arg(a.means, {N, 3}, op, "means", "[N, 3]");
  shape_arg(a.quats, {N, 4}, op, "quats", "[N, 4]");
  shape_arg(a.scales, {N, 3}, op, "scales", "[N, 3]");
  shape_arg(a.opacities, {N}, op, "opacities", "[N]");
  shape_arg(a.viewmats, {C, 4, 4}, op, "viewmats", "[C, 4, 4]");
  shape_arg(a.Ks, {C, 3, 3}, op, "Ks", "[C, 3, 3]");
  same_dtype(a.quats, a.means, op, "quats", "means");
  same_dtype(a.scales, a.means, op, "scales", "means");
  same_dtype(a.opacities, a.means, op, "opacities", "means");
  same_dtype(a.viewmats, a.means, op, "viewmats", "means");
  same_dtype(a.Ks, a.means, op, "Ks", "means");
  a.N = N, a.C = C;
  return a;
}

template <typename T>
Params<T> make_params(int64_t width, int64_t height, double eps2d, double near_plane, double far_plane,
                      double radius_clip, bool antialiased) {
  // Python floats meet the tensors in the tensors' dtype, as in the reference.
  Params<T> P;
  P.eps2d = T(eps2d), P.near_plane = T(near_plane), P.far_plane = T(far_plane), P.radius_clip = T(radius_clip);
  P.width = T(width), P.height = T(height);
  P.thr = T(kAlphaThreshold), P.min_comp2 = T(kMinCompensation * kMinCompensation), P.max_extend = T(kMaxExtend);
  P.antialiased = antialiased;
  return P;
}

std::string fmt(const char* spec, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, spec, v);
  return buf;
}

// The value errors of _ref_project (_check_gaussian_values, _check_camera_values), in its order, with
// its messages; only reached when the pass flagged one, so they may read the tensors again.
template <typename T>
void raise_input_error(const char* op, const Args& a, const bool* bad) {
  const int64_t N = a.N;
  const char* names[4] = {"means", "quats", "scales", "opacities"};
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK_VALUE(!bad[i], op, ": ", names[i], " must be finite (it contains NaN or inf)");
  if (bad[4]) {
    const T* s = a.scales.data_ptr<T>();
    T lo = s[0];
    for (int64_t i = 1; i < N * 3; ++i) lo = s[i] < lo ? s[i] : lo;
    TORCH_CHECK_VALUE(false, op, ": scales must be positive, got a minimum of ", fmt("%g", double(lo)));
  }
  if (bad[5]) {
    const T* q = a.quats.data_ptr<T>();
    int64_t arg = 0;
    double lo = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < N; ++i) {
      double n2 = 0;
      for (int j = 0; j < 4; ++j) n2 += double(q[i * 4 + j]) * double(q[i * 4 + j]);
      const double n = std::sqrt(n2);
      if (n < lo) lo = n, arg = i;
    }
    TORCH_CHECK_VALUE(false, op, ": quats must be non-zero with norm >= ", fmt("%g", kQuatMinNorm),
                      " (each is normalised); quats[", arg, "] has norm ", fmt("%.3g", lo));
  }
  if (bad[6]) {
    const T* o = a.opacities.data_ptr<T>();
    T lo = o[0], hi = o[0];
    for (int64_t i = 1; i < N; ++i) lo = o[i] < lo ? o[i] : lo, hi = o[i] > hi ? o[i] : hi;
    TORCH_CHECK_VALUE(false, op, ": opacities must lie in [0, 1], got values in [", fmt("%g", double(lo)), ", ",
                      fmt("%g", double(hi)), "]");
  }
  TORCH_CHECK_VALUE(!bad[7], op, ": viewmats must be finite (it contains NaN or inf)");
  TORCH_CHECK_VALUE(!bad[8], op, ": Ks must be finite (it contains NaN or inf)");
  TORCH_CHECK_VALUE(!bad[9], op, ": Ks must have positive focal lengths (Ks[:, 0, 0] and Ks[:, 1, 1] > 0)");
}

// The camera checks (flags 7-9 of raise_input_error) and the cameras.
template <typename T>
std::vector<Camera<T>> cameras(const Args& a, const Params<T>& P, bool* bad) {
  const T* V = a.viewmats.data_ptr<T>();
  const T* K = a.Ks.data_ptr<T>();
  std::vector<Camera<T>> cams(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    for (int j = 0; j < 16; ++j) bad[7] |= !std::isfinite(V[c * 16 + j]);
    for (int j = 0; j < 9; ++j) bad[8] |= !std::isfinite(K[c * 9 + j]);
    bad[9] |= !(K[c * 9] > T(0) && K[c * 9 + 4] > T(0));
    cams[c] = make_camera(V + c * 16, K + c * 9, P.width, P.height);
  }
  return cams;
}

constexpr int64_t kGrain = 256;  // Gaussians per forward task (each is C pairs)

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> project_gaussians_cpu(
    const Tensor& means_, const Tensor& quats_, const Tensor& scales_, const Tensor& opacities_,
    const Tensor& viewmats_, const Tensor& Ks_, int64_t width, int64_t height, double eps2d, double near_plane,
    double far_plane, double radius_clip, bool antialiased) {
  const char* op = "project_gaussians";
  const Args a = check_args(op, means_, quats_, scales_, opacities_, viewmats_, Ks_);
  const int64_t N = a.N, C = a.C;
  const auto opts = a.means.options();
  Tensor means2d = new_output({C, N, 2}, opts);
  Tensor depths = new_output({C, N}, opts);
  Tensor conics = new_output({C, N, 3}, opts);
  Tensor comps = new_output({C, N}, opts);
  Tensor radii = new_output({C, N, 2}, opts.dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(a.means.scalar_type(), "project_gaussians", [&] {
    using T = scalar_t;
    const Params<T> P = make_params<T>(width, height, eps2d, near_plane, far_plane, radius_clip, antialiased);
    bool bad[10] = {};
    const std::vector<Camera<T>> cams = cameras<T>(a, P, bad);
    const T* mu = a.means.data_ptr<T>();
    const T* qu = a.quats.data_ptr<T>();
    const T* sc = a.scales.data_ptr<T>();
    const T* op_ = a.opacities.data_ptr<T>();
    T* m2d = means2d.data_ptr<T>();
    T* dep = depths.data_ptr<T>();
    T* con = conics.data_ptr<T>();
    T* cmp = comps.data_ptr<T>();
    int32_t* rad = radii.data_ptr<int32_t>();
    // flags 0-6 of raise_input_error, then "an output is not finite"
    std::atomic<bool> flags[8] = {};
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      bool f[8] = {};
      Gaussian<T> g;
      Pair<T> o;
      for (int64_t n = n0; n < n1; ++n) {
        const T *m = mu + n * 3, *q = qu + n * 4, *s = sc + n * 3;
        const T opac = op_[n];
        for (int j = 0; j < 3; ++j) f[0] |= !std::isfinite(m[j]), f[2] |= !std::isfinite(s[j]), f[4] |= !(s[j] > 0);
        for (int j = 0; j < 4; ++j) f[1] |= !std::isfinite(q[j]);
        f[3] |= !std::isfinite(opac);
        f[6] |= !(opac >= T(0) && opac <= T(1));
        const double qn2 = double(q[0]) * q[0] + double(q[1]) * q[1] + double(q[2]) * q[2] + double(q[3]) * q[3];
        f[5] |= !(std::sqrt(qn2) >= kQuatMinNorm);
        make_gaussian(m, q, s, opac, g);
        for (int64_t c = 0; c < C; ++c) {
          project_pair(g, cams[c], P, o);
          const T kf = o.keep ? T(1) : T(0);  // the reference's outputs times keep (inf * 0 is NaN)
          const int64_t i = c * N + n;
          T* mi = m2d + i * 2;
          T* ci = con + i * 3;
          mi[0] = o.mx * kf, mi[1] = o.my * kf;
          dep[i] = o.p[2] * kf;
          ci[0] = o.conic[0] * kf, ci[1] = o.conic[1] * kf, ci[2] = o.conic[2] * kf;
          cmp[i] = antialiased ? o.comp * kf : kf;
          rad[i * 2] = o.keep ? to_int32(o.rx) : 0;
          rad[i * 2 + 1] = o.keep ? to_int32(o.ry) : 0;
          f[7] |= !std::isfinite(mi[0] + mi[1] + dep[i] + ci[0] + ci[1] + ci[2] + cmp[i]);
        }
      }
      for (int i = 0; i < 8; ++i)
        if (f[i]) flags[i] = true;
    });
    for (int i = 0; i < 7; ++i) bad[i] = flags[i];
    raise_input_error<T>(op, a, bad);
    if (flags[7]) {
      // _check_projected: the first non-finite entry of the first output that has one.
      const char* names[4] = {"means2d", "depths", "conics", "compensations"};
      const T* outs[4] = {m2d, dep, con, cmp};
      const int width_of[4] = {2, 1, 3, 1};
      for (int k = 0; k < 4; ++k)
        for (int64_t i = 0; i < C * N * width_of[k]; ++i)
          TORCH_CHECK_VALUE(std::isfinite(outs[k][i]), op,
                            ": means, scales, viewmats, Ks or eps2d are too large for torch.",
                            sizeof(T) == 4 ? "float32" : "float64", ": the projection overflows (the ", names[k],
                            " of Gaussian ", i / width_of[k] % N, " in camera ", i / width_of[k] / N,
                            " is not finite)");
    }
  });
  return {means2d, depths, conics, comps, radii};
}

constexpr int64_t kChunk = 512;  // Gaussians per backward chunk: fixed, so the sums do not depend on the threads
constexpr int kCamGrads = 16;    // per camera: d R (9), d t (3), d fx, d fy, d cx, d cy

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> project_gaussians_bwd_cpu(
    const Tensor& means_, const Tensor& quats_, const Tensor& scales_, const Tensor& opacities_,
    const Tensor& viewmats_, const Tensor& Ks_, int64_t width, int64_t height, double eps2d, double near_plane,
    double far_plane, double radius_clip, bool antialiased, const Tensor& grad_means2d_, const Tensor& grad_depths_,
    const Tensor& grad_conics_, const Tensor& grad_compensations_) {
  const char* op = "project_gaussians_bwd";
  const Args a = check_args(op, means_, quats_, scales_, opacities_, viewmats_, Ks_);
  const int64_t N = a.N, C = a.C;
  const Tensor gm2d = float_arg(grad_means2d_, op, "grad_means2d", 3);
  const Tensor gdep = float_arg(grad_depths_, op, "grad_depths", 2);
  const Tensor gcon = float_arg(grad_conics_, op, "grad_conics", 3);
  const Tensor gcmp = float_arg(grad_compensations_, op, "grad_compensations", 2);
  shape_arg(gm2d, {C, N, 2}, op, "grad_means2d", "[C, N, 2]");
  shape_arg(gdep, {C, N}, op, "grad_depths", "[C, N]");
  shape_arg(gcon, {C, N, 3}, op, "grad_conics", "[C, N, 3]");
  shape_arg(gcmp, {C, N}, op, "grad_compensations", "[C, N]");
  same_dtype(gm2d, a.means, op, "grad_means2d", "means");
  same_dtype(gdep, a.means, op, "grad_depths", "means");
  same_dtype(gcon, a.means, op, "grad_conics", "means");
  same_dtype(gcmp, a.means, op, "grad_compensations", "means");
  const auto opts = a.means.options();
  Tensor g_means = new_output({N, 3}, opts);
  Tensor g_quats = new_output({N, 4}, opts);
  Tensor g_scales = new_output({N, 3}, opts);
  Tensor g_viewmats = new_output({C, 4, 4}, opts);
  Tensor g_Ks = new_output({C, 3, 3}, opts);
  AT_DISPATCH_FLOATING_TYPES(a.means.scalar_type(), "project_gaussians_bwd", [&] {
    using T = scalar_t;
    using A = double;
    const Params<T> P = make_params<T>(width, height, eps2d, near_plane, far_plane, radius_clip, antialiased);
    bool unused[10] = {};
    const std::vector<Camera<T>> cams = cameras<T>(a, P, unused);
    // The float64 pass meets the forward's constants (the Python floats rounded to T, as it used them).
    Params<A> PA;
    PA.eps2d = P.eps2d, PA.near_plane = P.near_plane, PA.far_plane = P.far_plane, PA.radius_clip = P.radius_clip;
    PA.width = P.width, PA.height = P.height, PA.thr = P.thr, PA.min_comp2 = P.min_comp2;
    PA.max_extend = P.max_extend, PA.antialiased = P.antialiased;
    // A float64 call's first pass has the float64 values already: its second is skipped.
    constexpr bool widened = !std::is_same_v<T, A>;
    std::vector<Camera<A>> camsA(C);
    for (int64_t c = 0; c < C; ++c) {
      A V[16], K[9];
      for (int j = 0; j < 16; ++j) V[j] = a.viewmats.data_ptr<T>()[c * 16 + j];
      for (int j = 0; j < 9; ++j) K[j] = a.Ks.data_ptr<T>()[c * 9 + j];
      camsA[c] = make_camera(V, K, PA.width, PA.height);
    }
    const T* mu = a.means.data_ptr<T>();
    const T* qu = a.quats.data_ptr<T>();
    const T* sc = a.scales.data_ptr<T>();
    const T* op_ = a.opacities.data_ptr<T>();
    const T* gm = gm2d.data_ptr<T>();
    const T* gz = gdep.data_ptr<T>();
    const T* gc = gcon.data_ptr<T>();
    const T* gk = gcmp.data_ptr<T>();
    T* out_m = g_means.data_ptr<T>();
    T* out_q = g_quats.data_ptr<T>();
    T* out_s = g_scales.data_ptr<T>();
    const int64_t nchunks = (N + kChunk - 1) / kChunk;
    std::vector<A> partial(size_t(nchunks * C * kCamGrads), A(0));
    const A W = PA.width, H = PA.height, f = kFovClamp * 0.5;
    for_each_chunk(nchunks, [&](int64_t chunk) {
      A* part = partial.data() + chunk * C * kCamGrads;
      Gaussian<T> g;   // in T: the forward's branches
      Gaussian<A> gw;  // in float64: the values
      Pair<T> o;
      Pair<A> pv;
      const int64_t n1 = std::min(N, (chunk + 1) * kChunk);
      for (int64_t n = chunk * kChunk; n < n1; ++n) {
        make_gaussian(mu + n * 3, qu + n * 4, sc + n * 3, op_[n], g);
        if (widened) {
          A mean[3], quat[4], scale[3];
          for (int j = 0; j < 3; ++j) mean[j] = mu[n * 3 + j], scale[j] = sc[n * 3 + j];
          for (int j = 0; j < 4; ++j) quat[j] = qu[n * 4 + j];
          make_gaussian(mean, quat, scale, A(op_[n]), gw);
        }
        const Gaussian<A>& gv = wide_or(g, gw);
        A dmean[3] = {0, 0, 0}, dcov[3][3] = {};
        const auto& cov = gv.cov;
        const auto& mean = gv.mean;
        for (int64_t c = 0; c < C; ++c) {
          const Camera<T>& k = cams[c];
          project_pair(g, k, P, o);
          if (!o.keep) continue;
          const Camera<A>& kw = camsA[c];
          if (widened) pair_values(gv, kw, PA, k, o, pv);
          const Pair<A>& val = wide_or(o, pv);
          const int64_t i = c * N + n;
          const A fx = kw.fx, fy = kw.fy, cx = kw.cx, cy = kw.cy;
          const A x = val.p[0], y = val.p[1], z = val.zs, u = val.u, v = val.v;
          const A a_ = val.a, b = val.b, c_ = val.c, ab = val.ab, cb = val.cb, det = val.dets;
          const A J00 = val.J00, J02 = val.J02, J11 = val.J11, J12 = val.J12;
          // conic = (c', -b, a') / det'
          const A inv = A(1) / det;
          const A gA = gc[i * 3], gB = gc[i * 3 + 1], gC = gc[i * 3 + 2];
          A ddet = -(gA * cb - gB * b + gC * ab) * inv * inv;
          A ddo = 0;  // d det (before the blur)
          if (antialiased && !(o.r < P.min_comp2)) {  // above the floor in the forward
            const A gr = A(gk[i]) * 0.5 / val.comp;
            ddo = gr * inv;
            ddet -= gr * val.r * inv;
          }
          const A ga = gC * inv + ddet * cb + ddo * c_;
          const A gcc = gA * inv + ddet * ab + ddo * a_;
          const A h = 0.5 * (-gB * inv - 2 * b * (ddet + ddo));  // d cov2d_01 = d cov2d_10 = d b / 2
          // cov2d = J Sigma_c J^T
          const auto& covc = val.covc;
          A JS0[3], JS1[3];
          for (int j = 0; j < 3; ++j) {
            JS0[j] = J00 * covc[0][j] + J02 * covc[2][j];
            JS1[j] = J11 * covc[1][j] + J12 * covc[2][j];
          }
          const A dJ00 = 2 * (ga * JS0[0] + h * JS1[0]);
          const A dJ02 = 2 * (ga * JS0[2] + h * JS1[2]);
          const A dJ11 = 2 * (h * JS0[1] + gcc * JS1[1]);
          const A dJ12 = 2 * (h * JS0[2] + gcc * JS1[2]);
          const A GJ0[3] = {ga * J00, h * J11, ga * J02 + h * J12};
          const A GJ1[3] = {h * J00, gcc * J11, h * J02 + gcc * J12};
          A dcc[3][3];  // d Sigma_c = J^T G J
          for (int s = 0; s < 3; ++s) {
            dcc[0][s] = J00 * GJ0[s];
            dcc[1][s] = J11 * GJ1[s];
            dcc[2][s] = J02 * GJ0[s] + J12 * GJ1[s];
          }
          // J = [[fx/z, 0, -fx u/z], [0, fy/z, -fy v/z]] and means2d = (fx x/z + cx, fy y/z + cy)
          const A iz = A(1) / z, iz2 = iz * iz;
          const A gmx = gm[i * 2], gmy = gm[i * 2 + 1];
          A dfx = dJ00 * iz - dJ02 * u * iz + gmx * x * iz;
          A dfy = dJ11 * iz - dJ12 * v * iz + gmy * y * iz;
          A dcx = gmx, dcy = gmy;
          const A du = -dJ02 * fx * iz, dv = -dJ12 * fy * iz;
          A dp[3] = {gmx * fx * iz, gmy * fy * iz,
                     (-dJ00 * fx + dJ02 * fx * u - dJ11 * fy + dJ12 * fy * v - gmx * fx * x - gmy * fy * y) * iz2 +
                         A(gz[i])};
          // torch.clamp with tensor bounds: x/z inside [lo, hi] takes the gradient, else the bound it passed.
          if (o.tx < k.lox) {  // lo = -(cx + 0.15 W) / fx
            dcx -= du / fx;
            dfx += du * (cx + f * W) / (fx * fx);
          } else if (o.tx > k.hix) {  // hi = (W - cx + 0.15 W) / fx
            dcx -= du / fx;
            dfx -= du * (W - cx + f * W) / (fx * fx);
          } else {
            dp[0] += du * iz;
            dp[2] -= du * x * iz2;
          }
          if (o.ty < k.loy) {
            dcy -= dv / fy;
            dfy += dv * (cy + f * H) / (fy * fy);
          } else if (o.ty > k.hiy) {
            dcy -= dv / fy;
            dfy -= dv * (H - cy + f * H) / (fy * fy);
          } else {
            dp[1] += dv * iz;
            dp[2] -= dv * y * iz2;
          }
          // p = R mu + t, Sigma_c = R Sigma R^T
          const auto& R = kw.R;
          A DR[3][3];  // d Sigma_c R
          for (int r = 0; r < 3; ++r)
            for (int s = 0; s < 3; ++s) DR[r][s] = dcc[r][0] * R[0][s] + dcc[r][1] * R[1][s] + dcc[r][2] * R[2][s];
          A* pc = part + c * kCamGrads;
          for (int r = 0; r < 3; ++r) {
            for (int s = 0; s < 3; ++s) {
              pc[r * 3 + s] +=
                  2 * (DR[r][0] * cov[0][s] + DR[r][1] * cov[1][s] + DR[r][2] * cov[2][s]) + dp[r] * mean[s];
              dcov[r][s] += R[0][r] * DR[0][s] + R[1][r] * DR[1][s] + R[2][r] * DR[2][s];
            }
            pc[9 + r] += dp[r];
            dmean[r] += R[0][r] * dp[0] + R[1][r] * dp[1] + R[2][r] * dp[2];
          }
          pc[12] += dfx, pc[13] += dfy, pc[14] += dcx, pc[15] += dcy;
        }
        // Sigma = M M^T, M = R(q^) diag(s)
        A dRq[3][3], ds[3] = {0, 0, 0};
        for (int r = 0; r < 3; ++r)
          for (int s = 0; s < 3; ++s) {
            const A dM = 2 * (dcov[r][0] * gv.M[0][s] + dcov[r][1] * gv.M[1][s] + dcov[r][2] * gv.M[2][s]);
            dRq[r][s] = dM * gv.s[s];
            ds[s] += dM * gv.R[r][s];
          }
        const A w = gv.q[0], qx = gv.q[1], qy = gv.q[2], qz = gv.q[3];
        A dq[4];
        dq[0] = 2 * (-qz * dRq[0][1] + qy * dRq[0][2] + qz * dRq[1][0] - qx * dRq[1][2] - qy * dRq[2][0] +
                     qx * dRq[2][1]);
        dq[1] = 2 * (qy * dRq[0][1] + qz * dRq[0][2] + qy * dRq[1][0] - 2 * qx * dRq[1][1] - w * dRq[1][2] +
                     qz * dRq[2][0] + w * dRq[2][1] - 2 * qx * dRq[2][2]);
        dq[2] = 2 * (-2 * qy * dRq[0][0] + qx * dRq[0][1] + w * dRq[0][2] + qx * dRq[1][0] + qz * dRq[1][2] -
                     w * dRq[2][0] + qz * dRq[2][1] - 2 * qy * dRq[2][2]);
        dq[3] = 2 * (-2 * qz * dRq[0][0] - w * dRq[0][1] + qx * dRq[0][2] + w * dRq[1][0] - 2 * qz * dRq[1][1] +
                     qy * dRq[1][2] + qx * dRq[2][0] + qy * dRq[2][1]);
        // F.normalize: q / max(|q|, eps)
        T* oq = out_q + n * 4;
        if (!(g.qn < T(kQuatMinNorm))) {
          const A dot = w * dq[0] + qx * dq[1] + qy * dq[2] + qz * dq[3];
          for (int j = 0; j < 4; ++j) oq[j] = T((dq[j] - gv.q[j] * dot) / gv.qn);
        } else {
          for (int j = 0; j < 4; ++j) oq[j] = T(dq[j] / kQuatMinNorm);
        }
        for (int j = 0; j < 3; ++j) out_m[n * 3 + j] = T(dmean[j]), out_s[n * 3 + j] = T(ds[j]);
      }
    });
    T* ov = g_viewmats.data_ptr<T>();
    T* ok = g_Ks.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      A sum[kCamGrads] = {};
      for (int64_t chunk = 0; chunk < nchunks; ++chunk)
        for (int j = 0; j < kCamGrads; ++j) sum[j] += partial[size_t((chunk * C + c) * kCamGrads + j)];
      T* V = ov + c * 16;
      for (int r = 0; r < 3; ++r) {
        for (int s = 0; s < 3; ++s) V[r * 4 + s] = T(sum[r * 3 + s]);
        V[r * 4 + 3] = T(sum[9 + r]);
      }
      V[12] = V[13] = V[14] = V[15] = T(0);
      T* K = ok + c * 9;
      for (int j = 0; j < 9; ++j) K[j] = T(0);
      K[0] = T(sum[12]), K[4] = T(sum[13]), K[2] = T(sum[14]), K[5] = T(sum[15]);
    }
  });
  return {g_means, g_quats, g_scales, g_viewmats, g_Ks};
}

}  // namespace

TORCH_LIBRARY_IMPL(frontiers_fast_native, CPU, m) {
  m.impl("project_gaussians", &project_gaussians_cpu);
  m.impl("project_gaussians_bwd", &project_gaussians_bwd_cpu);
}

}  // namespace splat
}  // namespace frontiers_fast

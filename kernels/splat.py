"""Triton kernels of the splatting family (launchers named after their ops).

Projection (``project_gaussians``, ``project_gaussians_bwd``): the EWA
projection of frontiers_fast/reference/splat.py and csrc/splat/project_cpu.cpp
(covariance from quaternion and scales, world to camera, the Jacobian at x/z
and y/z clamped to 1.3x the half field of view, the eps2d blur, conic,
3-sigma radius and culling, the antialiased compensation), one program per
block of Gaussians and camera, in the inputs' dtype and the reference's
order of operations.  The backward is analytic: a program per block of
Gaussians walks the cameras in order and recomputes each pair with the
forward's function (in the inputs' dtype for the branches, in float64 for
the values the gradient, also float64, goes through); the camera gradients
are per-block sums, added over a fixed shape afterwards, so it is
deterministic without atomics.  Culled
pairs contribute nothing.  The forward refuses what ``_ref_project`` refuses.

Spherical harmonics: one program per ``BLOCK`` entries, each entry
independent (the basis and, backward, its gradient in registers), so the
backward is deterministic.  Semantics: frontiers_fast/reference/splat.py
(``sh_basis``, ``spherical_harmonics``), the same formulas as the C++
kernel (csrc/splat/sh_cpu.cpp):

    v = dirs / max(|dirs|, 1e-12);  colour = mask * sum_{b < (degree+1)^2} Y_b(v) coeffs[b]
    grad coeffs[b] = mask Y_b(v) g;  grad v = mask sum_b dY_b/dv (coeffs[b] . g)
    grad dirs = (grad v - v (v . grad v)) / |dirs|   (|dirs| > 1e-12; grad v / 1e-12 otherwise)

NaN or inf in dirs or coeffs is refused before the launch, as the reference
entry does (one reduction and a host read per call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from frontiers_fast._checks import check_finite

from ._utils import on_device

SH_BLOCK = 128


# ---------------------------------------------------------------------------
# project_gaussians: EWA projection, forward and analytic backward
# ---------------------------------------------------------------------------
# Forward: grid (cdiv(N, PROJECT_BLOCK), C), one program per block of
# Gaussians seen by one camera.  Backward: grid (cdiv(N, PROJECT_BLOCK),),
# each program walks the cameras in order, recomputing each pair with the
# forward's own function: in the inputs' dtype for the branches (so culling,
# the FOV clamp and the compensation floor agree with the forward), and in
# float64 for the values the gradient is pulled back through, in float64 (as
# the C++ kernel does).  It keeps the Gaussian's gradients in registers
# across the cameras and writes, per camera, the block's sum of the 16
# camera gradients into its own row of [C, nblocks, 16]; the rows are added
# after the launch over a fixed shape.
PROJECT_BLOCK = 128
_CAM_GRADS = 16  # per camera: d R (9), d t (3), d fx, d fy, d cx, d cy


@triton.jit
def _sqrt(x):
    """IEEE square root in x's dtype (tl.sqrt may be an approximation in float32; the radii's ceil needs it exact)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _rsrt(r00, r01, r02, r10, r11, r12, r20, r21, r22, s00, s01, s02, s11, s12, s22):
    """The upper triangle of R S R^T for a symmetric S (given by its upper triangle), as (R S) R^T."""
    a00 = r00 * s00 + r01 * s01 + r02 * s02
    a01 = r00 * s01 + r01 * s11 + r02 * s12
    a02 = r00 * s02 + r01 * s12 + r02 * s22
    a10 = r10 * s00 + r11 * s01 + r12 * s02
    a11 = r10 * s01 + r11 * s11 + r12 * s12
    a12 = r10 * s02 + r11 * s12 + r12 * s22
    a20 = r20 * s00 + r21 * s01 + r22 * s02
    a21 = r20 * s01 + r21 * s11 + r22 * s12
    a22 = r20 * s02 + r21 * s12 + r22 * s22
    o00 = a00 * r00 + a01 * r01 + a02 * r02
    o01 = a00 * r10 + a01 * r11 + a02 * r12
    o02 = a00 * r20 + a01 * r21 + a02 * r22
    o11 = a10 * r10 + a11 * r11 + a12 * r12
    o12 = a10 * r20 + a11 * r21 + a12 * r22
    o22 = a20 * r20 + a21 * r21 + a22 * r22
    return o00, o01, o02, o11, o12, o22


@triton.jit
def _gaussian(quats_ptr, scales_ptr, n, ok, DT: tl.constexpr):
    """q^ = q / max(|q|, 1e-12) (F.normalize), |q|, R(q^), the scales and Sigma = (R S)(R S)^T's upper triangle.

    Computed in DT: the inputs' dtype for the projection, float64 for the backward's arithmetic."""
    q0 = tl.load(quats_ptr + n * 4, mask=ok, other=1.0).to(DT)
    q1 = tl.load(quats_ptr + n * 4 + 1, mask=ok, other=0.0).to(DT)
    q2 = tl.load(quats_ptr + n * 4 + 2, mask=ok, other=0.0).to(DT)
    q3 = tl.load(quats_ptr + n * 4 + 3, mask=ok, other=0.0).to(DT)
    s0 = tl.load(scales_ptr + n * 3, mask=ok, other=1.0).to(DT)
    s1 = tl.load(scales_ptr + n * 3 + 1, mask=ok, other=1.0).to(DT)
    s2 = tl.load(scales_ptr + n * 3 + 2, mask=ok, other=1.0).to(DT)
    qn = _sqrt(q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3)
    den = tl.maximum(qn, tl.full((), 1e-12, qn.dtype))
    w, x, y, z = q0 / den, q1 / den, q2 / den, q3 / den
    r00 = 1.0 - 2.0 * (y * y + z * z)
    r01 = 2.0 * (x * y - w * z)
    r02 = 2.0 * (x * z + w * y)
    r10 = 2.0 * (x * y + w * z)
    r11 = 1.0 - 2.0 * (x * x + z * z)
    r12 = 2.0 * (y * z - w * x)
    r20 = 2.0 * (x * z - w * y)
    r21 = 2.0 * (y * z + w * x)
    r22 = 1.0 - 2.0 * (x * x + y * y)
    # M = R diag(s): column j scaled by s_j; Sigma = M M^T
    m00, m01, m02 = r00 * s0, r01 * s1, r02 * s2
    m10, m11, m12 = r10 * s0, r11 * s1, r12 * s2
    m20, m21, m22 = r20 * s0, r21 * s1, r22 * s2
    c00 = m00 * m00 + m01 * m01 + m02 * m02
    c01 = m00 * m10 + m01 * m11 + m02 * m12
    c02 = m00 * m20 + m01 * m21 + m02 * m22
    c11 = m10 * m10 + m11 * m11 + m12 * m12
    c12 = m10 * m20 + m11 * m21 + m12 * m22
    c22 = m20 * m20 + m21 * m21 + m22 * m22
    return (w, x, y, z, qn, r00, r01, r02, r10, r11, r12, r20, r21, r22, s0, s1, s2,
            c00, c01, c02, c11, c12, c22)  # fmt: skip


@triton.jit
def _camera(viewmats_ptr, Ks_ptr, params_ptr, c, DT: tl.constexpr):
    """Camera c's R, t, fx, fy, cx, cy, the FOV clamp bounds of x/z and y/z, and the scalar parameters, in DT.

    The parameters come from a tensor of the inputs' dtype, as the reference
    meets Python floats in the tensors' dtype (a float kernel argument would be float32)."""
    v = viewmats_ptr + c * 16
    k = Ks_ptr + c * 9
    eps2d = tl.load(params_ptr).to(DT)
    near = tl.load(params_ptr + 1).to(DT)
    far = tl.load(params_ptr + 2).to(DT)
    clip = tl.load(params_ptr + 3).to(DT)
    W = tl.load(params_ptr + 4).to(DT)
    H = tl.load(params_ptr + 5).to(DT)
    fx, fy, cx, cy = tl.load(k).to(DT), tl.load(k + 4).to(DT), tl.load(k + 2).to(DT), tl.load(k + 5).to(DT)
    f = tl.full((), 0.3, fx.dtype)  # FOV_CLAMP
    # 0.5 * W / fx as torch evaluates a Python float over a tensor: reciprocal(fx) * (0.5 W)
    tan_x = (1.0 / fx) * (0.5 * W)
    tan_y = (1.0 / fy) * (0.5 * H)
    lox = -(cx / fx + f * tan_x)
    hix = (W - cx) / fx + f * tan_x
    loy = -(cy / fy + f * tan_y)
    hiy = (H - cy) / fy + f * tan_y
    R00, R01, R02 = tl.load(v).to(DT), tl.load(v + 1).to(DT), tl.load(v + 2).to(DT)
    R10, R11, R12 = tl.load(v + 4).to(DT), tl.load(v + 5).to(DT), tl.load(v + 6).to(DT)
    R20, R21, R22 = tl.load(v + 8).to(DT), tl.load(v + 9).to(DT), tl.load(v + 10).to(DT)
    t0, t1, t2 = tl.load(v + 3).to(DT), tl.load(v + 7).to(DT), tl.load(v + 11).to(DT)
    return (R00, R01, R02, R10, R11, R12, R20, R21, R22, t0, t1, t2,
            fx, fy, cx, cy, lox, hix, loy, hiy, eps2d, near, far, clip, W, H)  # fmt: skip


@triton.jit
def _pair(m0, m1, m2, opac, c00, c01, c02, c11, c12, c22,
          R00, R01, R02, R10, R11, R12, R20, R21, R22, t0, t1, t2,
          fx, fy, cx, cy, lox, hix, loy, hiy, eps2d, near, far, clip, W, H, ANTIALIASED: tl.constexpr):  # fmt: skip
    """One (camera, Gaussian) pair's projection in the reference's order of operations, in its arguments' dtype.

    Returns the camera-space mean, x/z and y/z before and after the clamp,
    Sigma_c, the Jacobian's non-zero entries, cov2d before (a, b, c) and
    after (ab, cb) the blur, the safe det, det / det', the compensation,
    means2d, the radii and whether the pair is kept."""
    x = R00 * m0 + R01 * m1 + R02 * m2 + t0
    y = R10 * m0 + R11 * m1 + R12 * m2 + t1
    z = R20 * m0 + R21 * m1 + R22 * m2 + t2
    k00, k01, k02, k11, k12, k22 = _rsrt(
        R00, R01, R02, R10, R11, R12, R20, R21, R22, c00, c01, c02, c11, c12, c22
    )
    depth_ok = (z >= near) & (z <= far)
    zs = tl.where(depth_ok, z, 1.0)  # culled pairs keep finite values, as in the reference
    tx = x / zs
    ty = y / zs
    u = tl.minimum(tl.maximum(tx, lox), hix)
    v = tl.minimum(tl.maximum(ty, loy), hiy)
    J00 = fx / zs
    J02 = -fx * u / zs
    J11 = fy / zs
    J12 = -fy * v / zs
    # rows of J Sigma_c, then cov2d = (J Sigma_c) J^T
    a0, a1, a2 = J00 * k00 + J02 * k02, J00 * k01 + J02 * k12, J00 * k02 + J02 * k22
    b0, b1, b2 = J11 * k01 + J12 * k02, J11 * k11 + J12 * k12, J11 * k12 + J12 * k22
    a = a0 * J00 + a2 * J02
    b = 0.5 * ((a1 * J11 + a2 * J12) + (b0 * J00 + b2 * J02))
    c = b1 * J11 + b2 * J12
    mx = fx * x / zs + cx
    my = fy * y / zs + cy
    det_orig = a * c - b * b
    ab = a + eps2d  # the low-pass blur
    cb = c + eps2d
    det = ab * cb - b * b
    det_ok = det > 0.0
    dets = tl.where(det_ok, det, 1.0)
    r = det_orig / dets
    floor2 = tl.full((), 0.005 * 0.005, r.dtype)  # MIN_COMPENSATION ** 2
    comp = _sqrt(tl.where(r < floor2, floor2, r))  # a NaN r stays NaN, as torch.clamp leaves it
    if ANTIALIASED:
        o = opac * comp
    else:
        o = opac
    thr = tl.full((), 1.0 / 255.0, r.dtype)  # ALPHA_THRESHOLD
    top = tl.full((), 3.33, r.dtype)  # MAX_EXTEND
    extend = _sqrt(2.0 * tl.log(tl.where(o < thr, thr, o) / thr))
    extend = tl.where(extend > top, top, extend)
    rx = tl.ceil(extend * _sqrt(tl.where(ab < 0.0, 0.0, ab)))
    ry = tl.ceil(extend * _sqrt(tl.where(cb < 0.0, 0.0, cb)))
    big_enough = (rx > clip) | (ry > clip)
    on_image = (mx + rx > 0.0) & (mx - rx < W) & (my + ry > 0.0) & (my - ry < H)
    keep = depth_ok & det_ok & (o >= thr) & big_enough & on_image
    return (x, y, zs, tx, ty, u, v, k00, k01, k02, k11, k12, k22, J00, J02, J11, J12,
            a, b, c, ab, cb, dets, r, comp, mx, my, rx, ry, keep)  # fmt: skip


@triton.jit
def _project_fwd_kernel(means_ptr, quats_ptr, scales_ptr, opac_ptr, viewmats_ptr, Ks_ptr, params_ptr,
                        means2d_ptr, depths_ptr, conics_ptr, comps_ptr, radii_ptr, N,
                        ANTIALIASED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    T: tl.constexpr = means_ptr.dtype.element_ty
    cam = tl.program_id(1)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    m0 = tl.load(means_ptr + n * 3, mask=ok, other=0.0)
    m1 = tl.load(means_ptr + n * 3 + 1, mask=ok, other=0.0)
    m2 = tl.load(means_ptr + n * 3 + 2, mask=ok, other=0.0)
    opac = tl.load(opac_ptr + n, mask=ok, other=0.0)
    (_, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _,
     c00, c01, c02, c11, c12, c22) = _gaussian(quats_ptr, scales_ptr, n, ok, T)  # fmt: skip
    (R00, R01, R02, R10, R11, R12, R20, R21, R22, t0, t1, t2,
     fx, fy, cx, cy, lox, hix, loy, hiy, eps2d, near, far, clip, W, H) = _camera(viewmats_ptr, Ks_ptr, params_ptr, cam, T)  # fmt: skip
    (_, _, z, _, _, _, _, _, _, _, _, _, _, _, _, _, _,
     _, b, _, ab, cb, dets, _, comp, mx, my, rx, ry, keep) = _pair(
        m0, m1, m2, opac, c00, c01, c02, c11, c12, c22, R00, R01, R02, R10, R11, R12, R20, R21, R22, t0, t1, t2,
        fx, fy, cx, cy, lox, hix, loy, hiy, eps2d, near, far, clip, W, H, ANTIALIASED)  # fmt: skip
    # Culled pairs are the values times 0, as in the reference: an overflowed value comes out NaN and is refused.
    kf = keep.to(z.dtype)
    i = cam * N + n
    tl.store(means2d_ptr + i * 2, mx * kf, mask=ok)
    tl.store(means2d_ptr + i * 2 + 1, my * kf, mask=ok)
    tl.store(depths_ptr + i, z * kf, mask=ok)
    tl.store(conics_ptr + i * 3, cb / dets * kf, mask=ok)
    tl.store(conics_ptr + i * 3 + 1, -b / dets * kf, mask=ok)
    tl.store(conics_ptr + i * 3 + 2, ab / dets * kf, mask=ok)
    if ANTIALIASED:
        tl.store(comps_ptr + i, comp * kf, mask=ok)
    else:
        tl.store(comps_ptr + i, kf, mask=ok)
    tl.store(radii_ptr + i * 2, tl.where(keep, rx, 0.0).to(tl.int32), mask=ok)
    tl.store(radii_ptr + i * 2 + 1, tl.where(keep, ry, 0.0).to(tl.int32), mask=ok)


@triton.jit
def _project_bwd_kernel(means_ptr, quats_ptr, scales_ptr, opac_ptr, viewmats_ptr, Ks_ptr, params_ptr,
                        g_means2d_ptr, g_depths_ptr, g_conics_ptr, g_comps_ptr,
                        g_means_ptr, g_quats_ptr, g_scales_ptr, cam_part_ptr, N, C, n_blocks,
                        ANTIALIASED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # Each pair is projected twice: in the inputs' dtype T, for the forward's branches (culling,
    # the FOV clamp, the compensation floor), and in float64, A, for the values the gradient is
    # pulled back through, in A too.  So a float32 call gets float64's gradient of the same
    # branches: in float32 the conic's derivatives cancel to a few digits for thin Gaussians.
    T: tl.constexpr = means_ptr.dtype.element_ty
    A: tl.constexpr = tl.float64
    pid = tl.program_id(0)
    n = pid * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    m0 = tl.load(means_ptr + n * 3, mask=ok, other=0.0)
    m1 = tl.load(means_ptr + n * 3 + 1, mask=ok, other=0.0)
    m2 = tl.load(means_ptr + n * 3 + 2, mask=ok, other=0.0)
    opac = tl.load(opac_ptr + n, mask=ok, other=0.0)
    (_, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _, _,
     c00, c01, c02, c11, c12, c22) = _gaussian(quats_ptr, scales_ptr, n, ok, T)  # fmt: skip
    (qw, qx, qy, qz, qn, q00, q01, q02, q10, q11, q12, q20, q21, q22, s0, s1, s2,
     w00, w01, w02, w11, w12, w22) = _gaussian(quats_ptr, scales_ptr, n, ok, A)  # fmt: skip
    wm0, wm1, wm2, wopac = m0.to(A), m1.to(A), m2.to(A), opac.to(A)
    zero = wm0 * 0.0
    # d mean and the upper triangle of d Sigma, summed over the cameras in order
    dm0, dm1, dm2 = zero, zero, zero
    d00, d01, d02, d11, d12, d22 = zero, zero, zero, zero, zero, zero
    for cam in range(C):
        # the pass in T (names with a v): which branches the forward took
        (V00, V01, V02, V10, V11, V12, V20, V21, V22, vt0, vt1, vt2, vfx, vfy, vcx, vcy,
         vlox, vhix, vloy, vhiy, veps2d, vnear, vfar, vclip, vW, vH) = _camera(
            viewmats_ptr, Ks_ptr, params_ptr, cam, T)  # fmt: skip
        (_, _, _, vtx, vty, _, _, _, _, _, _, _, _, _, _, _, _,
         _, _, _, _, _, _, vr, _, _, _, _, _, keep) = _pair(
            m0, m1, m2, opac, c00, c01, c02, c11, c12, c22, V00, V01, V02, V10, V11, V12, V20, V21, V22,
            vt0, vt1, vt2, vfx, vfy, vcx, vcy, vlox, vhix, vloy, vhiy, veps2d, vnear, vfar, vclip, vW, vH,
            ANTIALIASED)  # fmt: skip
        keep = keep & ok
        below_floor = vr < tl.full((), 0.005 * 0.005, T)  # torch.clamp passes no gradient there
        x_lo, x_hi, y_lo, y_hi = vtx < vlox, vtx > vhix, vty < vloy, vty > vhiy
        # the pass in A: the values
        (R00, R01, R02, R10, R11, R12, R20, R21, R22, t0, t1, t2,
         fx, fy, cx, cy, lox, hix, loy, hiy, eps2d, near, far, clip, W, H) = _camera(
            viewmats_ptr, Ks_ptr, params_ptr, cam, A)  # fmt: skip
        (x, y, z, _, _, u, v, k00, k01, k02, k11, k12, k22, J00, J02, J11, J12,
         a, b, c, ab, cb, dets, r, comp, _, _, _, _, _) = _pair(
            wm0, wm1, wm2, wopac, w00, w01, w02, w11, w12, w22, R00, R01, R02, R10, R11, R12, R20, R21, R22,
            t0, t1, t2, fx, fy, cx, cy, lox, hix, loy, hiy, eps2d, near, far, clip, W, H, ANTIALIASED)  # fmt: skip
        # Culled pairs contribute nothing and their incoming gradients are not read.
        i = cam * N + n
        gmx = tl.load(g_means2d_ptr + i * 2, mask=keep, other=0.0).to(A)
        gmy = tl.load(g_means2d_ptr + i * 2 + 1, mask=keep, other=0.0).to(A)
        gz = tl.load(g_depths_ptr + i, mask=keep, other=0.0).to(A)
        gA = tl.load(g_conics_ptr + i * 3, mask=keep, other=0.0).to(A)
        gB = tl.load(g_conics_ptr + i * 3 + 1, mask=keep, other=0.0).to(A)
        gC = tl.load(g_conics_ptr + i * 3 + 2, mask=keep, other=0.0).to(A)
        # conic = (c', -b, a') / det'
        inv = 1.0 / dets
        ddet = -(gA * cb - gB * b + gC * ab) * inv * inv
        ddo = zero  # d det before the blur
        if ANTIALIASED:
            # comp = sqrt(det / det'), above its floor
            gk = tl.load(g_comps_ptr + i, mask=keep, other=0.0).to(A)
            gr = tl.where(below_floor, 0.0, gk * 0.5 / comp)
            ddo = gr * inv
            ddet -= gr * r * inv
        ga = gC * inv + ddet * cb + ddo * c
        gc = gA * inv + ddet * ab + ddo * a
        h = 0.5 * (-gB * inv - 2.0 * b * (ddet + ddo))  # d cov2d_01 = d cov2d_10
        # cov2d = J Sigma_c J^T with G = [[ga, h], [h, gc]]: d J = 2 G J Sigma_c, d Sigma_c = J^T G J
        a0, a2 = J00 * k00 + J02 * k02, J00 * k02 + J02 * k22
        b1, b2 = J11 * k11 + J12 * k12, J11 * k12 + J12 * k22
        a1, b0 = J00 * k01 + J02 * k12, J11 * k01 + J12 * k02
        dJ00 = 2.0 * (ga * a0 + h * b0)
        dJ02 = 2.0 * (ga * a2 + h * b2)
        dJ11 = 2.0 * (h * a1 + gc * b1)
        dJ12 = 2.0 * (h * a2 + gc * b2)
        e2 = ga * J02 + h * J12
        f2 = h * J02 + gc * J12
        e00 = tl.where(keep, J00 * ga * J00, 0.0)
        e01 = tl.where(keep, J00 * h * J11, 0.0)
        e02 = tl.where(keep, J00 * e2, 0.0)
        e11 = tl.where(keep, J11 * gc * J11, 0.0)
        e12 = tl.where(keep, J11 * f2, 0.0)
        e22 = tl.where(keep, J02 * e2 + J12 * f2, 0.0)
        # J's entries and means2d = (fx x / z + cx, fy y / z + cy)
        iz = 1.0 / z
        iz2 = iz * iz
        dfx = dJ00 * iz - dJ02 * u * iz + gmx * x * iz
        dfy = dJ11 * iz - dJ12 * v * iz + gmy * y * iz
        dcx = gmx
        dcy = gmy
        du = -dJ02 * fx * iz
        dv = -dJ12 * fy * iz
        dp0 = gmx * fx * iz
        dp1 = gmy * fy * iz
        dp2 = (
            -dJ00 * fx + dJ02 * fx * u - dJ11 * fy + dJ12 * fy * v - gmx * fx * x - gmy * fy * y
        ) * iz2 + gz
        # torch.clamp with tensor bounds: inside them x/z takes the gradient, outside the bound
        # reached does, and through it fx and cx (lo = -(cx + 0.15 W) / fx, hi = (W - cx + 0.15 W) / fx)
        fW = tl.full((), 0.15, W.dtype) * W
        fH = tl.full((), 0.15, H.dtype) * H
        out_x = x_lo | x_hi
        out_y = y_lo | y_hi
        dcx = tl.where(out_x, dcx - du / fx, dcx)
        dfx = tl.where(x_lo, dfx + du * (cx + fW) / (fx * fx), dfx)
        dfx = tl.where(x_hi, dfx - du * (W - cx + fW) / (fx * fx), dfx)
        dcy = tl.where(out_y, dcy - dv / fy, dcy)
        dfy = tl.where(y_lo, dfy + dv * (cy + fH) / (fy * fy), dfy)
        dfy = tl.where(y_hi, dfy - dv * (H - cy + fH) / (fy * fy), dfy)
        dp0 = tl.where(out_x, dp0, dp0 + du * iz)
        dp1 = tl.where(out_y, dp1, dp1 + dv * iz)
        dp2 = tl.where(out_x, dp2, dp2 - du * x * iz2)
        dp2 = tl.where(out_y, dp2, dp2 - dv * y * iz2)
        dp0 = tl.where(keep, dp0, 0.0)
        dp1 = tl.where(keep, dp1, 0.0)
        dp2 = tl.where(keep, dp2, 0.0)
        # p = R mu + t, Sigma_c = R Sigma R^T: d R = 2 (d Sigma_c R) Sigma + d p mu^T, d Sigma = R^T d Sigma_c R
        D00 = e00 * R00 + e01 * R10 + e02 * R20
        D01 = e00 * R01 + e01 * R11 + e02 * R21
        D02 = e00 * R02 + e01 * R12 + e02 * R22
        D10 = e01 * R00 + e11 * R10 + e12 * R20
        D11 = e01 * R01 + e11 * R11 + e12 * R21
        D12 = e01 * R02 + e11 * R12 + e12 * R22
        D20 = e02 * R00 + e12 * R10 + e22 * R20
        D21 = e02 * R01 + e12 * R11 + e22 * R21
        D22 = e02 * R02 + e12 * R12 + e22 * R22
        row = cam_part_ptr + (cam * n_blocks + pid) * 16
        tl.store(row, tl.sum(2.0 * (D00 * w00 + D01 * w01 + D02 * w02) + dp0 * wm0, axis=0))
        tl.store(row + 1, tl.sum(2.0 * (D00 * w01 + D01 * w11 + D02 * w12) + dp0 * wm1, axis=0))
        tl.store(row + 2, tl.sum(2.0 * (D00 * w02 + D01 * w12 + D02 * w22) + dp0 * wm2, axis=0))
        tl.store(row + 3, tl.sum(2.0 * (D10 * w00 + D11 * w01 + D12 * w02) + dp1 * wm0, axis=0))
        tl.store(row + 4, tl.sum(2.0 * (D10 * w01 + D11 * w11 + D12 * w12) + dp1 * wm1, axis=0))
        tl.store(row + 5, tl.sum(2.0 * (D10 * w02 + D11 * w12 + D12 * w22) + dp1 * wm2, axis=0))
        tl.store(row + 6, tl.sum(2.0 * (D20 * w00 + D21 * w01 + D22 * w02) + dp2 * wm0, axis=0))
        tl.store(row + 7, tl.sum(2.0 * (D20 * w01 + D21 * w11 + D22 * w12) + dp2 * wm1, axis=0))
        tl.store(row + 8, tl.sum(2.0 * (D20 * w02 + D21 * w12 + D22 * w22) + dp2 * wm2, axis=0))
        tl.store(row + 9, tl.sum(dp0, axis=0))
        tl.store(row + 10, tl.sum(dp1, axis=0))
        tl.store(row + 11, tl.sum(dp2, axis=0))
        tl.store(row + 12, tl.sum(tl.where(keep, dfx, 0.0), axis=0))
        tl.store(row + 13, tl.sum(tl.where(keep, dfy, 0.0), axis=0))
        tl.store(row + 14, tl.sum(tl.where(keep, dcx, 0.0), axis=0))
        tl.store(row + 15, tl.sum(tl.where(keep, dcy, 0.0), axis=0))
        dm0 += R00 * dp0 + R10 * dp1 + R20 * dp2
        dm1 += R01 * dp0 + R11 * dp1 + R21 * dp2
        dm2 += R02 * dp0 + R12 * dp1 + R22 * dp2
        d00 += R00 * D00 + R10 * D10 + R20 * D20
        d01 += R00 * D01 + R10 * D11 + R20 * D21
        d02 += R00 * D02 + R10 * D12 + R20 * D22
        d11 += R01 * D01 + R11 * D11 + R21 * D21
        d12 += R01 * D02 + R11 * D12 + R21 * D22
        d22 += R02 * D02 + R12 * D12 + R22 * D22
    # Sigma = M M^T, M = R(q^) diag(s): d M = 2 d Sigma M, then d R(q^) = d M diag(s), d s_j = sum_i d M_ij R_ij
    M00, M01, M02 = q00 * s0, q01 * s1, q02 * s2
    M10, M11, M12 = q10 * s0, q11 * s1, q12 * s2
    M20, M21, M22 = q20 * s0, q21 * s1, q22 * s2
    G00 = 2.0 * (d00 * M00 + d01 * M10 + d02 * M20)
    G01 = 2.0 * (d00 * M01 + d01 * M11 + d02 * M21)
    G02 = 2.0 * (d00 * M02 + d01 * M12 + d02 * M22)
    G10 = 2.0 * (d01 * M00 + d11 * M10 + d12 * M20)
    G11 = 2.0 * (d01 * M01 + d11 * M11 + d12 * M21)
    G12 = 2.0 * (d01 * M02 + d11 * M12 + d12 * M22)
    G20 = 2.0 * (d02 * M00 + d12 * M10 + d22 * M20)
    G21 = 2.0 * (d02 * M01 + d12 * M11 + d22 * M21)
    G22 = 2.0 * (d02 * M02 + d12 * M12 + d22 * M22)
    ds0 = G00 * q00 + G10 * q10 + G20 * q20
    ds1 = G01 * q01 + G11 * q11 + G21 * q21
    ds2 = G02 * q02 + G12 * q12 + G22 * q22
    G00, G01, G02 = G00 * s0, G01 * s1, G02 * s2
    G10, G11, G12 = G10 * s0, G11 * s1, G12 * s2
    G20, G21, G22 = G20 * s0, G21 * s1, G22 * s2
    # d q^ through the rotation matrix's entries (each is linear in two components of q^)
    dw = 2.0 * (-qz * G01 + qy * G02 + qz * G10 - qx * G12 - qy * G20 + qx * G21)
    dx = 2.0 * (
        qy * G01 + qz * G02 + qy * G10 - 2.0 * qx * G11 - qw * G12 + qz * G20 + qw * G21 - 2.0 * qx * G22
    )
    dy = 2.0 * (
        -2.0 * qy * G00 + qx * G01 + qw * G02 + qx * G10 + qz * G12 - qw * G20 + qz * G21 - 2.0 * qy * G22
    )
    dz = 2.0 * (
        -2.0 * qz * G00 - qw * G01 + qx * G02 + qw * G10 - 2.0 * qz * G11 + qy * G12 + qx * G20 + qy * G21
    )
    # F.normalize, q / max(|q|, eps): project out q^ above the eps, a plain division by it below
    eps = tl.full((), 1e-12, qn.dtype)
    above = qn >= eps
    dot = tl.where(above, qw * dw + qx * dx + qy * dy + qz * dz, 0.0)
    den = tl.where(above, qn, eps)
    tl.store(g_quats_ptr + n * 4, (dw - qw * dot) / den, mask=ok)
    tl.store(g_quats_ptr + n * 4 + 1, (dx - qx * dot) / den, mask=ok)
    tl.store(g_quats_ptr + n * 4 + 2, (dy - qy * dot) / den, mask=ok)
    tl.store(g_quats_ptr + n * 4 + 3, (dz - qz * dot) / den, mask=ok)
    tl.store(g_means_ptr + n * 3, dm0, mask=ok)
    tl.store(g_means_ptr + n * 3 + 1, dm1, mask=ok)
    tl.store(g_means_ptr + n * 3 + 2, dm2, mask=ok)
    tl.store(g_scales_ptr + n * 3, ds0, mask=ok)
    tl.store(g_scales_ptr + n * 3 + 1, ds1, mask=ok)
    tl.store(g_scales_ptr + n * 3 + 2, ds2, mask=ok)


def _project_params(means, width, height, eps2d, near_plane, far_plane, radius_clip):
    """The scalar parameters in the inputs' dtype, on their device (see _camera)."""
    values = (eps2d, near_plane, far_plane, radius_clip, width, height)
    return torch.tensor(values, dtype=means.dtype).to(means.device)


@on_device
def project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane,
                      radius_clip, antialiased):  # fmt: skip
    """EWA projection of N Gaussians [N, 3] into C cameras; see frontiers_fast.reference.splat.project_gaussians.

    Returns (means2d [C, N, 2], depths [C, N], conics [C, N, 3], compensations
    [C, N], radii [C, N, 2] int32), the op's order; refuses what _ref_project refuses.
    """
    from frontiers_fast.ops.splat import _check_camera_values, _check_gaussian_values, _check_projected

    _check_gaussian_values(means, quats, scales, opacities)
    _check_camera_values(viewmats, Ks)
    means, quats, scales, opacities, viewmats, Ks = (
        t.contiguous() for t in (means, quats, scales, opacities, viewmats, Ks)
    )
    C, N = viewmats.shape[0], means.shape[0]
    new = lambda *shape, dtype=means.dtype: torch.empty(shape, dtype=dtype, device=means.device)  # noqa: E731
    means2d, depths, conics, comps = new(C, N, 2), new(C, N), new(C, N, 3), new(C, N)
    radii = new(C, N, 2, dtype=torch.int32)
    if C and N:
        params = _project_params(means, width, height, eps2d, near_plane, far_plane, radius_clip)
        _project_fwd_kernel[(triton.cdiv(N, PROJECT_BLOCK), C)](
            means, quats, scales, opacities, viewmats, Ks, params, means2d, depths, conics, comps, radii, N,
            ANTIALIASED=bool(antialiased), BLOCK=PROJECT_BLOCK,
        )  # fmt: skip
    _check_projected(means.dtype, (means2d, depths, conics, comps))
    return means2d, depths, conics, comps, radii


@on_device
def project_gaussians_bwd(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane,
                          far_plane, radius_clip, antialiased, grad_means2d, grad_depths, grad_conics,
                          grad_compensations):  # fmt: skip
    """The analytic gradients (means [N, 3], quats [N, 4], scales [N, 3], viewmats [C, 4, 4], Ks [C, 3, 3]).

    Deterministic: each Gaussian sums its cameras in order inside one
    program, and each camera's gradients are per-block sums added over a
    fixed [C, nblocks, 16] shape.  Culled pairs contribute nothing.
    """
    means, quats, scales, opacities, viewmats, Ks, gm, gz, gc, gk = (
        t.contiguous()
        for t in (means, quats, scales, opacities, viewmats, Ks, grad_means2d, grad_depths, grad_conics,
                  grad_compensations)
    )  # fmt: skip
    C, N = viewmats.shape[0], means.shape[0]
    new = lambda *shape: torch.empty(shape, dtype=means.dtype, device=means.device)  # noqa: E731
    g_means, g_quats, g_scales = new(N, 3), new(N, 4), new(N, 3)
    n_blocks = triton.cdiv(N, PROJECT_BLOCK)
    part = torch.zeros((C, n_blocks, _CAM_GRADS), dtype=torch.float64, device=means.device)  # A of the kernel
    if N:
        params = _project_params(means, width, height, eps2d, near_plane, far_plane, radius_clip)
        _project_bwd_kernel[(n_blocks,)](
            means, quats, scales, opacities, viewmats, Ks, params, gm, gz, gc, gk, g_means, g_quats, g_scales, part,
            N, C, n_blocks, ANTIALIASED=bool(antialiased), BLOCK=PROJECT_BLOCK,
        )  # fmt: skip
    cam = part.sum(1).to(means.dtype)  # [C, 16], over a fixed number of blocks
    g_viewmats = torch.zeros((C, 4, 4), dtype=means.dtype, device=means.device)
    g_viewmats[:, :3, :3] = cam[:, :9].reshape(C, 3, 3)
    g_viewmats[:, :3, 3] = cam[:, 9:12]
    g_Ks = torch.zeros((C, 3, 3), dtype=means.dtype, device=means.device)
    for j, (r, s) in enumerate(((0, 0), (1, 1), (0, 2), (1, 2))):  # fx, fy, cx, cy
        g_Ks[:, r, s] = cam[:, 12 + j]
    return g_means, g_quats, g_scales, g_viewmats, g_Ks


@triton.jit
def _basis(b: tl.constexpr, x, y, z):
    """Y_b(x, y, z) and its gradient (dY/dx, dY/dy, dY/dz), for a constant basis index b.

    The constants are made in x's dtype (a bare float literal would be a float32 constant)."""
    zero = x * 0.0
    if b == 0:
        return zero + tl.full((), 0.28209479177387814, x.dtype), zero, zero, zero
    elif b == 1:
        return (
            tl.full((), -0.4886025119029199, x.dtype) * y,
            zero,
            zero - tl.full((), 0.4886025119029199, x.dtype),
            zero,
        )
    elif b == 2:
        return (
            tl.full((), 0.4886025119029199, x.dtype) * z,
            zero,
            zero,
            zero + tl.full((), 0.4886025119029199, x.dtype),
        )
    elif b == 3:
        return (
            tl.full((), -0.4886025119029199, x.dtype) * x,
            zero - tl.full((), 0.4886025119029199, x.dtype),
            zero,
            zero,
        )
    elif b == 4:
        a = tl.full((), 1.0925484305920792, x.dtype)
        return a * x * y, a * y, a * x, zero
    elif b == 5:
        a = tl.full((), -1.0925484305920792, x.dtype)
        return a * y * z, zero, a * z, a * y
    elif b == 6:
        a = tl.full((), 0.31539156525252005, x.dtype)
        return a * (2.0 * z * z - x * x - y * y), -2.0 * a * x, -2.0 * a * y, 4.0 * a * z
    elif b == 7:
        a = tl.full((), -1.0925484305920792, x.dtype)
        return a * x * z, a * z, zero, a * x
    elif b == 8:
        a = tl.full((), 0.5462742152960396, x.dtype)
        return a * (x * x - y * y), 2.0 * a * x, -2.0 * a * y, zero
    elif b == 9:
        a = tl.full((), -0.5900435899266435, x.dtype)
        return a * y * (3.0 * x * x - y * y), 6.0 * a * x * y, 3.0 * a * (x * x - y * y), zero
    elif b == 10:
        a = tl.full((), 2.890611442640554, x.dtype)
        return a * x * y * z, a * y * z, a * x * z, a * x * y
    elif b == 11:
        a = tl.full((), -0.4570457994644658, x.dtype)
        return (
            a * y * (4.0 * z * z - x * x - y * y),
            -2.0 * a * x * y,
            a * (4.0 * z * z - x * x - 3.0 * y * y),
            8.0 * a * y * z,
        )
    elif b == 12:
        a = tl.full((), 0.3731763325901154, x.dtype)
        return (
            a * z * (2.0 * z * z - 3.0 * x * x - 3.0 * y * y),
            -6.0 * a * x * z,
            -6.0 * a * y * z,
            a * (6.0 * z * z - 3.0 * x * x - 3.0 * y * y),
        )
    elif b == 13:
        a = tl.full((), -0.4570457994644658, x.dtype)
        return (
            a * x * (4.0 * z * z - x * x - y * y),
            a * (4.0 * z * z - 3.0 * x * x - y * y),
            -2.0 * a * x * y,
            8.0 * a * x * z,
        )
    elif b == 14:
        a = tl.full((), 1.445305721320277, x.dtype)
        return a * z * (x * x - y * y), 2.0 * a * x * z, -2.0 * a * y * z, a * (x * x - y * y)
    else:
        a = tl.full((), -0.5900435899266435, x.dtype)
        return a * x * (x * x - 3.0 * y * y), 3.0 * a * (x * x - y * y), -6.0 * a * x * y, zero


@triton.jit
def _unit(dirs_ptr, i, ok):
    dx = tl.load(dirs_ptr + i * 3, mask=ok, other=0.0)
    dy = tl.load(dirs_ptr + i * 3 + 1, mask=ok, other=0.0)
    dz = tl.load(dirs_ptr + i * 3 + 2, mask=ok, other=0.0)
    n = tl.sqrt(dx * dx + dy * dy + dz * dz)
    s = tl.maximum(n, tl.full((), 1e-12, n.dtype))
    return dx / s, dy / s, dz / s, n


@triton.jit
def _sh_fwd_kernel(dirs_ptr, coeffs_ptr, masks_ptr, out_ptr, n, K, NB: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x, y, z, _ = _unit(dirs_ptr, i, ok)
    r = x * 0.0
    g = x * 0.0
    b = x * 0.0
    for k in tl.static_range(NB):
        Y, _, _, _ = _basis(k, x, y, z)
        c = coeffs_ptr + (i * K + k) * 3
        r += Y * tl.load(c, mask=ok, other=0.0)
        g += Y * tl.load(c + 1, mask=ok, other=0.0)
        b += Y * tl.load(c + 2, mask=ok, other=0.0)
    if HAS_MASK:
        on = tl.load(masks_ptr + i, mask=ok, other=0) != 0
        r = tl.where(on, r, 0.0)
        g = tl.where(on, g, 0.0)
        b = tl.where(on, b, 0.0)
    tl.store(out_ptr + i * 3, r, mask=ok)
    tl.store(out_ptr + i * 3 + 1, g, mask=ok)
    tl.store(out_ptr + i * 3 + 2, b, mask=ok)


@triton.jit
def _sh_bwd_kernel(dirs_ptr, coeffs_ptr, masks_ptr, g_ptr, gd_ptr, gc_ptr, n, K, NB: tl.constexpr,
                   HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    x, y, z, nrm = _unit(dirs_ptr, i, ok)
    g0 = tl.load(g_ptr + i * 3, mask=ok, other=0.0)
    g1 = tl.load(g_ptr + i * 3 + 1, mask=ok, other=0.0)
    g2 = tl.load(g_ptr + i * 3 + 2, mask=ok, other=0.0)
    if HAS_MASK:
        on = tl.load(masks_ptr + i, mask=ok, other=0) != 0
        g0 = tl.where(on, g0, 0.0)
        g1 = tl.where(on, g1, 0.0)
        g2 = tl.where(on, g2, 0.0)
    vx = x * 0.0
    vy = x * 0.0
    vz = x * 0.0
    for k in tl.static_range(NB):
        Y, dX, dY, dZ = _basis(k, x, y, z)
        c = coeffs_ptr + (i * K + k) * 3
        s = tl.load(c, mask=ok, other=0.0) * g0 + tl.load(c + 1, mask=ok, other=0.0) * g1
        s += tl.load(c + 2, mask=ok, other=0.0) * g2
        gc = gc_ptr + (i * K + k) * 3
        tl.store(gc, Y * g0, mask=ok)
        tl.store(gc + 1, Y * g1, mask=ok)
        tl.store(gc + 2, Y * g2, mask=ok)
        vx += dX * s
        vy += dY * s
        vz += dZ * s
    vg = x * vx + y * vy + z * vz
    eps = tl.full((), 1e-12, nrm.dtype)
    big = nrm > eps
    ox = tl.where(big, (vx - x * vg) / tl.where(big, nrm, 1.0), vx / eps)
    oy = tl.where(big, (vy - y * vg) / tl.where(big, nrm, 1.0), vy / eps)
    oz = tl.where(big, (vz - z * vg) / tl.where(big, nrm, 1.0), vz / eps)
    tl.store(gd_ptr + i * 3, ox, mask=ok)
    tl.store(gd_ptr + i * 3 + 1, oy, mask=ok)
    tl.store(gd_ptr + i * 3 + 2, oz, mask=ok)


def _sh_args(dirs, coeffs, masks):
    dirs, coeffs = dirs.contiguous(), coeffs.contiguous()
    n = dirs.numel() // 3
    m = masks.contiguous() if masks is not None else dirs  # a placeholder pointer when there is no mask
    return dirs, coeffs, m, n, coeffs.shape[-2]


@on_device
def spherical_harmonics(degree, dirs, coeffs, masks):
    check_finite("dirs", dirs)
    check_finite("coeffs", coeffs)
    dirs, coeffs, m, n, K = _sh_args(dirs, coeffs, masks)
    out = torch.empty(dirs.shape, dtype=dirs.dtype, device=dirs.device)
    if n:
        _sh_fwd_kernel[(triton.cdiv(n, SH_BLOCK),)](
            dirs, coeffs, m, out, n, K, NB=(degree + 1) ** 2, HAS_MASK=masks is not None, BLOCK=SH_BLOCK
        )
    return out


@on_device
def spherical_harmonics_bwd(degree, dirs, coeffs, masks, grad_colors):
    dirs, coeffs, m, n, K = _sh_args(dirs, coeffs, masks)
    g = grad_colors.contiguous()
    gd = torch.empty(dirs.shape, dtype=dirs.dtype, device=dirs.device)
    gc = torch.zeros(coeffs.shape, dtype=coeffs.dtype, device=coeffs.device)  # bases past the degree get 0
    if n:
        _sh_bwd_kernel[(triton.cdiv(n, SH_BLOCK),)](
            dirs, coeffs, m, g, gd, gc, n, K, NB=(degree + 1) ** 2, HAS_MASK=masks is not None, BLOCK=SH_BLOCK
        )
    return gd, gc


# ---------------------------------------------------------------------------
# isect_tiles: the sorted (camera, tile, depth) keys of every Gaussian-tile overlap
# ---------------------------------------------------------------------------
# One row per Gaussian: [C * N] of them unpacked (camera = row // N), or the
# nnz packed rows with their camera in image_ids.  Four steps, as the C++
# kernel (csrc/splat/isect_cpu.cpp):
# 1. _isect_count_kernel: each row's bounding box of tiles and, with conics and
#    opacities, how many of its tiles the exact test keeps (one program per
#    ISECT_BLOCK rows, each walking its box row-major);
# 2. a cumsum of the counts gives each row its place, and M is checked
#    (ref.check_isect_count) before anything of size M is allocated;
# 3. _isect_fill_kernel walks the same boxes again and writes the kept tiles'
#    keys and row ids at the row's place, in the reference's order;
# 4. a stable sort of the keys, which has one result: the reference's.
# The exact test is a discrete decision that must match the reference tile
# for tile, so it runs in float64 whatever the input dtype (the reference
# casts to float64 too), in the reference's operation order, with every
# constant made in float64 and FMA contraction off (a fused a * b + c rounds
# once, where the reference rounds twice).  No floats are summed: the counts
# are integers.
ISECT_BLOCK = 64


@triton.jit
def _f64(v: tl.constexpr):
    """The float64 constant v (constexpr: passed as a value, a bare literal would be rounded to float32)."""
    return tl.full((), v, tl.float64)


@triton.jit
def _ln_upper(x):
    """ref.ln_upper: an upper bound of ln(max(x, 2^-20)) from frexp and the atanh series cut after s^15.

    frexp is read off the bits: above 2^-20 x is a normal float64, so x = m 2^e with m the mantissa
    under the exponent of 0.5 (m in [0.5, 1)) and e the biased exponent - 1022.  inf and NaN give NaN,
    as torch.frexp's (inf, 0) and (NaN, 0) do through (m - 1) / (m + 1)."""
    x = tl.where(x < _f64(2.0**-20), _f64(2.0**-20), x)
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1022
    m = ((bits & 0xFFFFFFFFFFFFF) | (1022 << 52)).to(tl.float64, bitcast=True)
    one = _f64(1.0)
    s = (m - one) / (m + one)
    s2 = s * s
    p = x * 0.0 + _f64(1.0 / 15)
    p = p * s2 + _f64(1.0 / 13)
    p = p * s2 + _f64(1.0 / 11)
    p = p * s2 + _f64(1.0 / 9)
    p = p * s2 + _f64(1.0 / 7)
    p = p * s2 + _f64(1.0 / 5)
    p = p * s2 + _f64(1.0 / 3)
    p = p * s2 + one
    out = e.to(tl.float64) * _f64(0.6931471805599453) + _f64(2.0) * s * p
    return tl.where(x - x == 0, out, x - x)


@triton.jit
def _isect_box(m_ptr, r_ptr, row, ok, ts, tw, th):
    """ref._tile_boxes for a block of rows: the box's first tile (x0, y0) and extent (w, h), int64,
    clamped to the grid in float64; 0 x 0 where a radius is not positive."""
    zero = tl.zeros(row.shape, dtype=tl.float64)
    tsf = zero + ts
    mx = tl.load(m_ptr + row * 2, mask=ok, other=0.0).to(tl.float64) / tsf
    my = tl.load(m_ptr + row * 2 + 1, mask=ok, other=0.0).to(tl.float64) / tsf
    ri = tl.load(r_ptr + row * 2, mask=ok, other=0)
    rj = tl.load(r_ptr + row * 2 + 1, mask=ok, other=0)
    rx = ri.to(tl.float64) / tsf
    ry = rj.to(tl.float64) / tsf
    gx = zero + tw
    gy = zero + th
    x0 = tl.minimum(tl.maximum(tl.floor(mx - rx), zero), gx).to(tl.int64)
    x1 = tl.minimum(tl.maximum(tl.ceil(mx + rx), zero), gx).to(tl.int64)
    y0 = tl.minimum(tl.maximum(tl.floor(my - ry), zero), gy).to(tl.int64)
    y1 = tl.minimum(tl.maximum(tl.ceil(my + ry), zero), gy).to(tl.int64)
    visible = (ri > 0) & (rj > 0)
    return x0, y0, tl.where(visible, x1 - x0, 0), tl.where(visible, y1 - y0, 0)


@triton.jit
def _exact_conic(m_ptr, c_ptr, o_ptr, row, ok):
    """ref.exact_conics for a block of rows: the mean, the shrunk conic (a', b, c'), whether it is
    positive definite and the threshold ln_upper(255 o) + EXACT_ABS_MARGIN, all float64."""
    mx = tl.load(m_ptr + row * 2, mask=ok, other=0.0).to(tl.float64)
    my = tl.load(m_ptr + row * 2 + 1, mask=ok, other=0.0).to(tl.float64)
    a = tl.load(c_ptr + row * 3, mask=ok, other=1.0).to(tl.float64)
    b = tl.load(c_ptr + row * 3 + 1, mask=ok, other=0.0).to(tl.float64)
    c = tl.load(c_ptr + row * 3 + 2, mask=ok, other=1.0).to(tl.float64)
    o = tl.load(o_ptr + row, mask=ok, other=1.0).to(tl.float64)
    rel = _f64(1e-5)  # ref.EXACT_REL_MARGIN
    ab = tl.abs(b)
    ap = a - rel * (tl.abs(a) + ab)
    cp = c - rel * (tl.abs(c) + ab)
    pd = (ap > 0) & (ap * cp - b * b > 0)
    thr = _ln_upper(_f64(255.0) * o) + _f64(1e-3)  # ref.EXACT_ABS_MARGIN
    return mx, my, ap, b, cp, pd, thr


@triton.jit
def _quad(ap, b, cp, dx, dy):
    return _f64(0.5) * (ap * dx * dx + cp * dy * dy) + b * dx * dy


@triton.jit
def _clamp(v, lo, hi):
    # torch.clamp's order, a NaN kept (tl.minimum / tl.maximum need not propagate it)
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _tile_touched(mx, my, ap, b, cp, pd, thr, tx, ty, ts):
    """ref.tile_touched: whether the shrunk ellipse q(d) <= thr reaches tile (tx, ty)'s pixel centres."""
    zero = mx * 0.0
    x0 = (zero + tx * ts) + _f64(0.5)
    y0 = (zero + ty * ts) + _f64(0.5)
    ext = zero + (ts - 1)
    dx0 = x0 - mx
    dy0 = y0 - my
    dx1 = (x0 + ext) - mx
    dy1 = (y0 + ext) - my
    inside = (dx0 <= 0) & (dx1 >= 0) & (dy0 <= 0) & (dy1 >= 0)
    far = (inside == 0) | (thr < 0)
    far = far & (_quad(ap, b, cp, dx0, _clamp(-(b * dx0) / cp, dy0, dy1)) > thr)
    far = far & (_quad(ap, b, cp, dx1, _clamp(-(b * dx1) / cp, dy0, dy1)) > thr)
    far = far & (_quad(ap, b, cp, _clamp(-(b * dy0) / ap, dx0, dx1), dy0) > thr)
    far = far & (_quad(ap, b, cp, _clamp(-(b * dy1) / ap, dx0, dx1), dy1) > thr)
    return (pd == 0) | (far == 0)


@triton.jit
def _isect_count_kernel(m_ptr, r_ptr, c_ptr, o_ptr, count_ptr, n_rows, ts, tw, th, EXACT: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    # EXACT is constexpr: without conics the count is the box, and the loop is not compiled at all.
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = row < n_rows
    x0, y0, w, h = _isect_box(m_ptr, r_ptr, row, ok, ts, tw, th)
    box = w * h
    if EXACT:
        mx, my, ap, b, cp, pd, thr = _exact_conic(m_ptr, c_ptr, o_ptr, row, ok)
        wj = tl.maximum(w, 1)
        n = tl.zeros((BLOCK,), dtype=tl.int64)
        for j in range(0, tl.max(box, axis=0)):
            keep = (j < box) & _tile_touched(mx, my, ap, b, cp, pd, thr, x0 + j % wj, y0 + j // wj, ts)
            n += keep.to(tl.int64)
        box = n
    tl.store(count_ptr + row, box, mask=ok)


@triton.jit
def _isect_fill_kernel(m_ptr, r_ptr, c_ptr, o_ptr, d_ptr, img_ptr, start_ptr, keys_ptr, ids_ptr, n_rows, N, ts,
                       tw, th, EXACT: tl.constexpr, PACKED: tl.constexpr, TILE_BITS: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    # PACKED is constexpr: the camera is image_ids[row] there and row // N unpacked.
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = row < n_rows
    x0, y0, w, h = _isect_box(m_ptr, r_ptr, row, ok, ts, tw, th)
    box = w * h
    if PACKED:
        cam = tl.load(img_ptr + row, mask=ok, other=0).to(tl.int64)
    else:
        cam = row // N
    # positive float32 depths sort like their bit patterns read as integers (ref._depth_bits)
    depth = tl.load(d_ptr + row, mask=ok, other=0.0).to(tl.float32)
    high = (cam << (32 + TILE_BITS)) | (depth.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
    pos = tl.load(start_ptr + row, mask=ok, other=0)
    if EXACT:
        mx, my, ap, b, cp, pd, thr = _exact_conic(m_ptr, c_ptr, o_ptr, row, ok)
    wj = tl.maximum(w, 1)
    for j in range(0, tl.max(box, axis=0)):
        tx = x0 + j % wj
        ty = y0 + j // wj
        keep = j < box
        if EXACT:
            keep = keep & _tile_touched(mx, my, ap, b, cp, pd, thr, tx, ty, ts)
        tl.store(keys_ptr + pos, high | ((ty * tw + tx) << 32), mask=keep)
        tl.store(ids_ptr + pos, row.to(tl.int32), mask=keep)
        pos += keep.to(tl.int64)


def _check_isect_options(conics, opacities, max_intersections):
    # ref.isect_tiles' own refusals, with its messages, in its order (after the value checks)
    if (conics is None) != (opacities is None):
        raise ValueError(
            "conics and opacities must be given together (exact tile culling needs both) or not at all"
        )
    if max_intersections is not None and max_intersections < 0:
        raise ValueError(f"max_intersections must be >= 0 or None, got {max_intersections}")


@on_device
def isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, conics, opacities, max_intersections,
                image_ids, n_images):  # fmt: skip
    """Unpacked (image_ids None): means2d [C, N, 2], radii [C, N, 2] int32, depths [C, N], conics
    [C, N, 3] and opacities [C, N] or None; n_images is ignored.  Packed: the same per row of [nnz]
    with image_ids [nnz] int32 (in [0, n_images), any order) and n_images cameras.  Returns tiles_per_gauss
    (depths' shape) int32, isect_ids [M] int64 sorted and flatten_ids [M] int32 (row indices), equal
    to ref.isect_tiles (unpacked) bit for bit."""
    from frontiers_fast.ops.splat import _check_image_ids, _check_isect_values, _check_packed_isect_sizes
    from frontiers_fast.reference.splat import bits_for_count, check_isect_count, check_isect_sizes

    # The reference entry's checks, in its order.
    n_tiles = tile_width * tile_height
    packed = image_ids is not None
    if packed:
        n_rows = means2d.shape[0]
        _check_packed_isect_sizes(n_images, n_rows, n_tiles)
        N = 1
    else:
        C, N = depths.shape
        check_isect_sizes(C, N, n_tiles)
        n_rows, n_images = C * N, C
    _check_isect_values(means2d, radii, depths, conics, opacities)
    if packed:
        _check_image_ids(image_ids, n_images)
    _check_isect_options(conics, opacities, max_intersections)
    dev = means2d.device
    m2d, rad, dep = means2d.detach().contiguous(), radii.contiguous(), depths.detach().contiguous()
    exact = conics is not None
    con = conics.detach().contiguous() if exact else m2d  # placeholder pointers without the exact test
    opa = opacities.detach().contiguous() if exact else m2d
    img = image_ids.contiguous() if packed else rad
    count = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    grid = (triton.cdiv(n_rows, ISECT_BLOCK),)
    if n_rows:
        _isect_count_kernel[grid](
            m2d, rad, con, opa, count, n_rows, tile_size, tile_width, tile_height, EXACT=exact, BLOCK=ISECT_BLOCK,
            enable_fp_fusion=False,
        )  # fmt: skip
    end = torch.cumsum(count, 0)
    n_isects = int(end[-1]) if n_rows else 0
    check_isect_count(n_isects, max_intersections, dev)
    keys = torch.empty(n_isects, dtype=torch.int64, device=dev)
    ids = torch.empty(n_isects, dtype=torch.int32, device=dev)
    if n_isects:
        _isect_fill_kernel[grid](
            m2d, rad, con, opa, dep, img, end - count, keys, ids, n_rows, N, tile_size, tile_width, tile_height,
            EXACT=exact, PACKED=packed, TILE_BITS=bits_for_count(n_tiles), BLOCK=ISECT_BLOCK,
            enable_fp_fusion=False,
        )  # fmt: skip
    keys, order = torch.sort(keys, stable=True)
    return count.to(torch.int32).reshape(depths.shape), keys, ids[order]


# ---------------------------------------------------------------------------
# isect_offset_encode: the start of each (camera, tile) run in the sorted keys
# ---------------------------------------------------------------------------
# Each program binary-searches BLOCK targets at once: target t's offset is the
# number of keys whose linear (camera, tile) index is below t, the
# reference's searchsorted (left).  A fixed number of halvings, STEPS =
# bit_length(M) + 1, reaches it for every target.
ENCODE_BLOCK = 256


@triton.jit
def _offset_encode_kernel(ids_ptr, out_ptr, M, n_targets, n_tiles, TILE_BITS: tl.constexpr, STEPS: tl.constexpr,
                          BLOCK: tl.constexpr):  # fmt: skip
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = t < n_targets
    target = t.to(tl.int64)
    lo = tl.zeros((BLOCK,), dtype=tl.int64)
    hi = tl.zeros((BLOCK,), dtype=tl.int64) + M
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        live = lo < hi
        key = tl.load(ids_ptr + mid, mask=live & ok & (mid < M), other=0)
        top = key >> 32
        linear = (top >> TILE_BITS) * n_tiles + (top & ((1 << TILE_BITS) - 1))
        below = linear < target
        lo = tl.where(live & below, mid + 1, lo)
        hi = tl.where(live & ~below, mid, hi)
    tl.store(out_ptr + t, lo.to(tl.int32), mask=ok)


@on_device
def isect_offset_encode(isect_ids, n_images, tile_width, tile_height):
    from frontiers_fast.ops.splat import _check_isect_ids
    from frontiers_fast.reference.splat import bits_for_count

    _check_isect_ids(isect_ids, n_images, tile_width, tile_height)
    ids = isect_ids.contiguous()
    n_tiles = tile_width * tile_height
    n_targets = n_images * n_tiles
    out = torch.empty((n_images, tile_height, tile_width), dtype=torch.int32, device=ids.device)
    M = ids.numel()
    if n_targets:
        _offset_encode_kernel[(triton.cdiv(n_targets, ENCODE_BLOCK),)](
            ids, out, M, n_targets, n_tiles, TILE_BITS=bits_for_count(n_tiles), STEPS=max(M, 1).bit_length() + 1,
            BLOCK=ENCODE_BLOCK,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# rasterize_to_pixels: front-to-back tile blending, forward and backward
# ---------------------------------------------------------------------------
# The rules of frontiers_fast/reference/splat.py (rasterize_to_pixels,
# blend_blocks) with the C++ kernel's structure (csrc/splat/raster_cpu.cpp).
# Per pixel, centre (x + 0.5, y + 0.5), walking its tile's depth-sorted run:
#   sigma = (c dy^2 / 2 + a dx^2 / 2) + b dy dx      (skipped if < 0)
#   alpha = min(0.99, o exp(-sigma))                  (skipped if < 1/255)
#   stop before the Gaussian that would make T (1 - alpha) <= 1e-4 (1 + 1e-9)
#   out += colour alpha T;  T *= 1 - alpha;   render = out + T background
# The 1e-9 of the stop is the C++ kTStop's slack: two opaque Gaussians
# clamped at 0.99 leave T = 1e-4 exactly in real arithmetic, a stop, while
# float64 rounds the bare product just above it.
#
# The Gaussian tensors are row tables: R = opacities.numel() rows, row r's
# mean is means2d.reshape(-1, 2)[r] and so on, and flatten_ids index rows.
# [C, N, ...] and gsplat's packed [nnz, ...] layouts are then the same
# kernel; C (the image count) is isect_offsets.shape[0].
#
# Forward: one program per (camera, tile), the tile's pixels as one vector
# (padded to RASTER_MIN_PIXELS), the colour channels as a second axis padded
# to a power of two.  The program leaves its run as soon as every pixel has
# stopped.  It writes each pixel's final T and its last blended intersection
# (the index into flatten_ids, -1 if none), where the backward starts.
#
# Backward: one program per (camera, tile) walks back from the tile's
# largest last_ids, recovering the T before each Gaussian as T / (1 - alpha):
#   dL/dcolour_k = alpha_k T_k g
#   dL/dalpha_k  = T_k g.(colour_k - S_k) - T_final gT / (1 - alpha_k)
#   S_{k-1} = alpha_k colour_k + (1 - alpha_k) S_k     (S = 0 behind the last)
# with g = dL/drender and gT = g.background - dL/dalpha_render; then through
# o exp(-sigma) (nothing where the 0.99 clamp holds) to the opacity, the conic
# and the mean.  Deterministic without atomics: each intersection's
# gradient, summed over its tile's pixels by tl.sum (a fixed tree for a fixed
# block), is one record row [M, 8 + D] (mean 2, conic 3, opacity, the |d/dmean|
# sums 2, colour D); a second kernel sums each Gaussian row's records in
# intersection order (a stable sort of flatten_ids), one lane per row.  The
# background gradient is a per-tile partial [C * tiles, D] summed over the
# tiles afterwards (a fixed shape).
RASTER_MIN_PIXELS = 16  # pixel vectors never shorter than this (tile_size 1, 2)
_REC_GEO = 8  # record columns before the colour: d mean (2), d conic (3), d opacity, |d mean| sums (2)
SEGSUM_ROWS = 64


@triton.jit
def _tile_pixels(cam, local, tw, width, height, TS: tl.constexpr, P: tl.constexpr, DT: tl.constexpr):
    """The pixels of tile ``local`` of camera ``cam``: centres (px, py) in DT, their flat index into
    the [C, H, W] image (int64) and whether each lies inside the image."""
    p = tl.arange(0, P)
    x = (local % tw) * TS + p % TS
    y = (local // tw) * TS + p // TS
    inside = (p < TS * TS) & (x < width) & (y < height)
    half = tl.full((), 0.5, DT)
    px = x.to(DT) + half
    py = y.to(DT) + half
    pix = (cam.to(tl.int64) * height + y) * width + x
    return px, py, pix, inside


@triton.jit
def _tile_run(off_ptr, tile, n_tiles, M):
    """[start, end) of the tile's run in flatten_ids."""
    start = tl.load(off_ptr + tile)
    end = tl.load(off_ptr + tile + 1, mask=tile + 1 < n_tiles, other=M)
    return start, end


@triton.jit
def _splat_at(m2d_ptr, con_ptr, opa_ptr, g, px, py):
    """Row g at the pixel centres: dx, dy, the conic, sigma, e = exp(-max(sigma, 0)), o e, clamped alpha
    and where it blends (sigma >= 0, alpha >= 1/255), in the reference's order of operations.

    sigma's two additions are fused multiply-adds.  For a thin ellipse its terms are large and cancel,
    so each rounding matters in float32; fused, the error is that of compiled code (a GPU compiler
    contracts them anyway, the interpreter would not), and the forward and the backward share it."""
    mx = tl.load(m2d_ptr + 2 * g)
    my = tl.load(m2d_ptr + 2 * g + 1)
    ca = tl.load(con_ptr + 3 * g)
    cb = tl.load(con_ptr + 3 * g + 1)
    cc = tl.load(con_ptr + 3 * g + 2)
    o = tl.load(opa_ptr + g)
    DT = mx.dtype
    half = tl.full((), 0.5, DT)
    dx = px - mx
    dy = py - my
    sigma = tl.fma(cb * dy, dx, tl.fma(half * cc * dy, dy, half * ca * dx * dx))
    pos = sigma >= 0
    e = tl.exp(-tl.where(pos, sigma, 0.0))
    raw = o * e
    alpha = tl.minimum(raw, tl.full((), 0.99, DT))
    used = pos & (alpha >= tl.full((), 1.0 / 255.0, DT))
    return dx, dy, ca, cb, cc, sigma, e, raw, alpha, used


@triton.jit
def _raster_fwd_kernel(m2d_ptr, con_ptr, col_ptr, opa_ptr, bg_ptr, off_ptr, ids_ptr, out_ptr, alpha_ptr, ft_ptr,
                       last_ptr, width, height, tw, per_cam, n_tiles, M, D, TS: tl.constexpr, P: tl.constexpr,
                       DB: tl.constexpr, HAS_BG: tl.constexpr):  # fmt: skip
    tile = tl.program_id(0)
    cam = tile // per_cam
    DT = m2d_ptr.dtype.element_ty
    px, py, pix, inside = _tile_pixels(cam, tile % per_cam, tw, width, height, TS, P, DT)
    d = tl.arange(0, DB)
    dm = d < D
    start, end = _tile_run(off_ptr, tile, n_tiles, M)
    one = tl.full((), 1.0, DT)
    t_stop = tl.full((), 1e-4 * (1 + 1e-9), DT)
    T = tl.zeros((P,), DT) + one
    acc = tl.zeros((P, DB), DT)
    last = tl.zeros((P,), tl.int32) - 1
    live = inside.to(tl.int32)
    n_live = tl.sum(live, axis=0)
    k = start
    while (k < end) & (n_live > 0):
        g = tl.load(ids_ptr + k).to(tl.int64)
        _, _, _, _, _, _, _, _, alpha, used = _splat_at(m2d_ptr, con_ptr, opa_ptr, g, px, py)
        use = used & (live != 0)
        tn = T * (one - alpha)
        stop = use & (tn <= t_stop)
        take = use & ~stop
        w = tl.where(take, alpha * T, 0.0)
        c = tl.load(col_ptr + g * D + d, mask=dm, other=0.0)
        acc += w[:, None] * c[None, :]
        T = tl.where(take, tn, T)
        last = tl.where(take, k, last)
        live = tl.where(stop, 0, live)
        n_live = tl.sum(live, axis=0)
        k += 1
    if HAS_BG:
        bg = tl.load(bg_ptr + cam * D + d, mask=dm, other=0.0)
        acc += T[:, None] * bg[None, :]
    on = inside[:, None] & dm[None, :]
    tl.store(out_ptr + pix[:, None] * D + d[None, :], acc, mask=on)
    tl.store(alpha_ptr + pix, one - T, mask=inside)
    tl.store(ft_ptr + pix, T, mask=inside)
    tl.store(last_ptr + pix, last, mask=inside)


@triton.jit
def _raster_bwd_kernel(m2d_ptr, con_ptr, col_ptr, opa_ptr, bg_ptr, off_ptr, ids_ptr, ft_ptr, last_ptr, gout_ptr,
                       galpha_ptr, rec_ptr, bgp_ptr, width, height, tw, per_cam, n_tiles, M, D, RC,
                       TS: tl.constexpr, P: tl.constexpr, DB: tl.constexpr, HAS_BG: tl.constexpr):  # fmt: skip
    tile = tl.program_id(0)
    cam = tile // per_cam
    DT = m2d_ptr.dtype.element_ty
    px, py, pix, inside = _tile_pixels(cam, tile % per_cam, tw, width, height, TS, P, DT)
    d = tl.arange(0, DB)
    dm = d < D
    on = inside[:, None] & dm[None, :]
    start, end = _tile_run(off_ptr, tile, n_tiles, M)
    one = tl.full((), 1.0, DT)
    half = tl.full((), 0.5, DT)
    clamp = tl.full((), 0.99, DT)
    T = tl.load(ft_ptr + pix, mask=inside, other=0.0)  # padding pixels: T = 0, no last Gaussian
    t_final = T
    last = tl.load(last_ptr + pix, mask=inside, other=-1)
    g = tl.load(gout_ptr + pix[:, None] * D + d[None, :], mask=on, other=0.0)
    gT = -tl.load(galpha_ptr + pix, mask=inside, other=0.0)
    if HAS_BG:
        bg = tl.load(bg_ptr + cam * D + d, mask=dm, other=0.0)
        gT += tl.sum(g * bg[None, :], axis=1)
        tl.store(bgp_ptr + tile * D + d, tl.sum(T[:, None] * g, axis=0), mask=dm)
    S = tl.zeros((P, DB), DT)  # colour behind the current Gaussian, per pixel
    k = tl.max(last, axis=0)
    while k >= start:
        gid = tl.load(ids_ptr + k).to(tl.int64)
        dx, dy, ca, cb, cc, _, e, raw, alpha, used = _splat_at(m2d_ptr, con_ptr, opa_ptr, gid, px, py)
        use = used & (last >= k)
        one_m = one - alpha
        t_before = tl.where(use, T / one_m, 0.0)
        w = alpha * t_before
        c = tl.load(col_ptr + gid * D + d, mask=dm, other=0.0)
        dot = tl.sum(g * (c[None, :] - S), axis=1)
        S = tl.where(use[:, None], alpha[:, None] * c[None, :] + one_m[:, None] * S, S)
        T = tl.where(use, t_before, T)
        d_alpha = t_before * dot - t_final * gT / one_m
        d_raw = tl.where(use & (raw <= clamp), d_alpha, 0.0)  # the 0.99 clamp passes no gradient
        d_sig = -(d_raw * raw)
        pmx = -(d_sig * (ca * dx + cb * dy))
        pmy = -(d_sig * (cc * dy + cb * dx))
        r = rec_ptr + k.to(tl.int64) * RC
        tl.store(r, tl.sum(pmx, axis=0))
        tl.store(r + 1, tl.sum(pmy, axis=0))
        tl.store(r + 2, tl.sum(d_sig * (half * dx * dx), axis=0))
        tl.store(r + 3, tl.sum(d_sig * (dx * dy), axis=0))
        tl.store(r + 4, tl.sum(d_sig * (half * dy * dy), axis=0))
        tl.store(r + 5, tl.sum(d_raw * e, axis=0))
        tl.store(r + 6, tl.sum(tl.abs(pmx), axis=0))
        tl.store(r + 7, tl.sum(tl.abs(pmy), axis=0))
        tl.store(r + 8 + d, tl.sum(w[:, None] * g, axis=0), mask=dm)
        k -= 1


@triton.jit
def _segment_sum_kernel(rec_ptr, perm_ptr, ptr_ptr, out_ptr, R, RC, ROWS: tl.constexpr, CB: tl.constexpr):
    """out[r] = sum of rec[perm[j]] over j in [ptr[r], ptr[r + 1]), added in j order (one lane per row)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < R
    cols = tl.arange(0, CB)
    cm = cols < RC
    s = tl.load(ptr_ptr + rows, mask=ok, other=0)
    n = tl.load(ptr_ptr + rows + 1, mask=ok, other=0) - s
    acc = tl.zeros((ROWS, CB), rec_ptr.dtype.element_ty)
    for j in range(0, tl.max(n, axis=0)):
        live = ok & (j < n)
        src = tl.load(perm_ptr + s + j, mask=live, other=0)
        acc += tl.load(
            rec_ptr + src[:, None] * RC + cols[None, :], mask=live[:, None] & cm[None, :], other=0.0
        )
    dst = rows.to(tl.int64)[:, None] * RC + cols[None, :]
    tl.store(out_ptr + dst, acc, mask=ok[:, None] & cm[None, :])


def _raster_tables(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids):
    """The row tables, the launch geometry and the constexprs both kernels share."""
    D = colors.shape[-1]
    tables = (
        means2d.reshape(-1, 2).contiguous(),
        conics.reshape(-1, 3).contiguous(),
        colors.reshape(-1, D).contiguous(),
        opacities.reshape(-1).contiguous(),
    )
    bg = backgrounds.contiguous() if backgrounds is not None else tables[0]  # a placeholder pointer
    return tables, bg, isect_offsets.contiguous(), flatten_ids.contiguous(), D


def _raster_launch(width, height, tile_size, D):
    tw, th = -(-width // tile_size), -(-height // tile_size)
    P = max(tile_size * tile_size, RASTER_MIN_PIXELS)
    meta = dict(TS=tile_size, P=P, DB=triton.next_power_of_2(D), num_warps=8 if P >= 1024 else 4)
    return tw, th, meta


@on_device
def rasterize_to_pixels(means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets,
                        flatten_ids, absgrad):  # fmt: skip
    from frontiers_fast.ops.splat import _check_blend_values

    _check_blend_values(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids)
    (m2d, con, col, opa), bg, off, ids, D = _raster_tables(
        means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids
    )
    C = isect_offsets.shape[0]
    tw, th, meta = _raster_launch(width, height, tile_size, D)
    new = dict(dtype=m2d.dtype, device=m2d.device)
    out = torch.empty((C, height, width, D), **new)
    alphas = torch.empty((C, height, width, 1), **new)
    final_ts = torch.empty((C, height, width), **new)
    last_ids = torch.empty((C, height, width), dtype=torch.int32, device=m2d.device)
    n_tiles = C * tw * th
    if n_tiles:
        _raster_fwd_kernel[(n_tiles,)](
            m2d, con, col, opa, bg, off, ids, out, alphas, final_ts, last_ids, width, height, tw, tw * th,
            n_tiles, ids.numel(), D, HAS_BG=backgrounds is not None, **meta,
        )  # fmt: skip
    return out, alphas, final_ts, last_ids


def _check_raster_state(opacities, flatten_ids, last_ids, isect_offsets, tile_size):
    """The backward reads flatten_ids at each pixel's last_ids and rows at flatten_ids: refuse values
    that would read out of bounds, with the forward's and the C++ backward's messages."""
    from frontiers_fast._checks import check_in_range

    R = opacities.numel()
    what, rows = ("nnz", "packed rows") if opacities.dim() == 1 else ("C * N", "Gaussians")
    check_in_range("flatten_ids", flatten_ids, 0, R - 1, f" (indices into the {what} = {R} {rows})")
    C, H, W = last_ids.shape
    if last_ids.numel() == 0:
        return
    M = flatten_ids.numel()
    starts = isect_offsets.reshape(-1).long()
    ends = torch.cat([starts[1:], starts.new_full((1,), M)])
    th, tw = isect_offsets.shape[1:]
    dev = last_ids.device
    ty = torch.arange(H, device=dev) // tile_size
    tx = torch.arange(W, device=dev) // tile_size
    tile = (torch.arange(C, device=dev)[:, None, None] * th + ty[None, :, None]) * tw + tx[None, None, :]
    lid = last_ids.long()
    bad = (lid != -1) & ((lid < starts[tile]) | (lid >= ends[tile]))
    if bool(bad.any()):
        c, y, x = (int(i) for i in bad.nonzero()[0])
        t = int(tile[c, y, x])
        raise ValueError(
            f"rasterize_to_pixels_bwd: last_ids must be -1 or an index into its tile's run of flatten_ids, as "
            f"the forward returns them; got {int(lid[c, y, x])} for a tile whose run is "
            f"[{int(starts[t])}, {int(ends[t])})"
        )


@on_device
def rasterize_to_pixels_bwd(means2d, conics, colors, opacities, backgrounds, width, height, tile_size,
                            isect_offsets, flatten_ids, absgrad, final_ts, last_ids, grad_colors,
                            grad_alphas):  # fmt: skip
    from frontiers_fast._library import absent

    _check_raster_state(opacities, flatten_ids, last_ids, isect_offsets, tile_size)
    (m2d, con, col, opa), bg, off, ids, D = _raster_tables(
        means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids
    )
    C, R = isect_offsets.shape[0], opa.numel()
    tw, th, meta = _raster_launch(width, height, tile_size, D)
    n_tiles, M, RC = C * tw * th, ids.numel(), _REC_GEO + D
    new = dict(dtype=m2d.dtype, device=m2d.device)
    # Intersections behind every pixel's last one get no record written: zeros.
    rec = torch.zeros((M, RC), **new)
    bg_part = torch.empty((n_tiles, D), **new)
    if n_tiles:
        _raster_bwd_kernel[(n_tiles,)](
            m2d, con, col, opa, bg, off, ids, final_ts.contiguous(), last_ids.contiguous(),
            grad_colors.contiguous(), grad_alphas.contiguous(), rec, bg_part, width, height, tw, tw * th, n_tiles,
            M, D, RC, HAS_BG=backgrounds is not None, **meta,
        )  # fmt: skip
    # Each row's records in intersection order: a stable sort of flatten_ids, then its run.
    sorted_ids, perm = torch.sort(ids.long(), stable=True)
    ptr = torch.searchsorted(sorted_ids, torch.arange(R + 1, device=ids.device))
    sums = torch.empty((R, RC), **new)
    if R:
        _segment_sum_kernel[(triton.cdiv(R, SEGSUM_ROWS),)](
            rec, perm, ptr, sums, R, RC, ROWS=SEGSUM_ROWS, CB=triton.next_power_of_2(RC)
        )
    grad_means2d = sums[:, 0:2].reshape(means2d.shape).contiguous()
    grad_conics = sums[:, 2:5].reshape(conics.shape).contiguous()
    grad_opacities = sums[:, 5].reshape(opacities.shape).contiguous()
    grad_cols = sums[:, _REC_GEO:].reshape(colors.shape).contiguous()
    grad_bg = bg_part.reshape(C, tw * th, D).sum(1) if backgrounds is not None else absent(colors)
    grad_abs = sums[:, 6:8].reshape(means2d.shape).contiguous() if absgrad else absent(colors)
    return grad_means2d, grad_conics, grad_cols, grad_opacities, grad_bg, grad_abs

"""Gaussian splat rasterization: registered ops, autograd and the public functions.

Ops in the ``frontiers_fast::`` namespace, all defined with
:func:`frontiers_fast._library.define_op` (the last argument, ``backend``, is
left out below).  Every op has its ``reference``; the C++ kernels
(``csrc/splat/*_cpu.cpp``) register under the same schemas, as ``native``
backends of every op, and so does the CUDA extension's blender forward
(``csrc/splat/raster.cu``; forward only: ``backend="cuda"`` is refused where a
gradient is needed).  Every op also has its Triton launcher
(``kernels/splat.py``), the default on a GPU.

  project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane,
                    far_plane, radius_clip, antialiased) -> (means2d, depths, conics, compensations, radii)
  project_gaussians_bwd(<the same inputs>, grad_means2d, grad_depths, grad_conics, grad_compensations)
      -> (grad_means, grad_quats, grad_scales, grad_viewmats, grad_Ks)
  spherical_harmonics(degree, dirs, coeffs, masks?) -> colors
  spherical_harmonics_bwd(degree, dirs, coeffs, masks?, grad_colors) -> (grad_dirs, grad_coeffs)
  isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, conics?, opacities?,
              max_intersections?, image_ids?, n_images) -> (tiles_per_gauss, isect_ids, flatten_ids)   [no autograd]
  isect_offset_encode(isect_ids, n_images, tile_width, tile_height) -> isect_offsets   [no autograd]
  rasterize_to_pixels(means2d, conics, colors, opacities, backgrounds?, width, height, tile_size,
                      isect_offsets, flatten_ids, absgrad) -> (render_colors, render_alphas, final_ts, last_ids)
  rasterize_to_pixels_bwd(<the same inputs>, final_ts, last_ids, grad_colors, grad_alphas)
      -> (grad_means2d, grad_conics, grad_colors, grad_opacities, grad_backgrounds, grad_means2d_abs)

Shapes are those of :mod:`frontiers_fast.reference.splat`.  Packed mode
(gsplat's ``packed=True``) needs no op of its own: ``isect_tiles`` takes
``image_ids`` [nnz] (the camera of each row; None: the [C, N] layout, and
n_images is ignored), and the blender's tables are flat rows, so its
means2d, conics, colors and opacities may be [C, N, ...] or packed
[nnz, ...] (the image count is isect_offsets.shape[0]).  A ``_bwd`` op
is a kernel op without autograd of its own, run with the forward's backend.
Its reference recomputes the reference forward under autograd inside the
op; the blender's does so one chunk of pixel blocks at a time, so its memory
stays bounded like the forward's (plain autograd through the reference would
keep every chunk).  ``grad_backgrounds`` is
:func:`~frontiers_fast._library.absent` when there is no background.

The blender's forward also returns ``final_ts`` [C, H, W] (each pixel's
final transmittance, exact: ``1 - render_alphas`` loses its low bits where
T is small) and ``last_ids`` [C, H, W] int32 (the index into flatten_ids of
the last Gaussian each pixel blended, -1 if none).  They are the state a
back-to-front backward starts from (the C++ one); the public functions drop
them.

Bad input.  The public functions check types, dtypes, shapes, devices and
the scalar parameters.  The checks that read tensor values live in the
forward ops' reference entries, which run on real tensors in eager calls and
inside compiled graphs alike, so a compiled call refuses what an eager one
does.  A kernel added to one of these ops later must refuse the same values.

NaN.  No float input of this family is a plain data tensor whose NaN could
flow through to the outputs the same way on every backend: the Gaussians'
parameters and the projected ones decide integer radii, tile keys, sort
orders and block lists, and colours and backgrounds are blended with weights
that are exactly zero wherever a Gaussian is skipped (0 * NaN is NaN in one
implementation and never computed in another).  So NaN and inf are refused
everywhere, with a ValueError naming the tensor, and no NaN reaches an
output.

:func:`rasterization` composes the ops into gsplat's ``rasterization``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    FP32_64,
    FP32_64_WHAT,
    check_bool,
    check_choice,
    check_finite,
    check_has_values,
    check_in_range,
    check_int,
    check_like,
    check_memory,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    has_values,
)
from .._library import absent, define_op, zeros_if_none
from ..reference import splat as ref

_ops = torch.ops.frontiers_fast
# The reference computes in the input's dtype; half types would lose the
# depth bits of the tile keys and most of the blending's precision.


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd inside an op's kernel: the dispatcher runs kernels with the
    autograd keys excluded, so ``enable_grad`` alone records nothing.  A
    backward called under ``torch.inference_mode()`` (plain autograd allows
    it) would make the recomputed forward's tensors inference tensors, which
    autograd cannot save: inference mode is switched off here too."""
    K = torch._C.DispatchKey
    with (
        torch._C._SetExcludeDispatchKeyGuard(K.AutogradFunctionality, False),
        torch._C._SetExcludeDispatchKeyGuard(K.ADInplaceOrView, False),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        yield


# ---------------------------------------------------------------------------
# value checks (read tensor data: called from the op bodies)
# ---------------------------------------------------------------------------
def _check_gaussian_values(means, quats, scales, opacities):
    for name, t in (("means", means), ("quats", quats), ("scales", scales), ("opacities", opacities)):
        check_finite(name, t)
    if has_values(scales) and not bool((scales > 0).all()):
        raise ValueError(f"scales must be positive, got a minimum of {float(scales.min()):g}")
    if has_values(quats):
        # F.normalize divides by max(|q|, eps): a shorter quaternion would
        # silently come out near the identity rotation instead of unit length.
        norms = torch.linalg.vector_norm(quats, dim=-1)
        if not bool((norms >= ref.QUAT_MIN_NORM).all()):
            i = int(torch.argmin(norms))
            raise ValueError(
                f"quats must be non-zero with norm >= {ref.QUAT_MIN_NORM:g} (each is normalised); "
                f"quats[{i}] has norm {float(norms[i]):.3g}"
            )
    check_in_range("opacities", opacities, 0, 1)


def _check_camera_values(viewmats, Ks):
    check_finite("viewmats", viewmats)
    check_finite("Ks", Ks)
    if has_values(Ks) and not bool(((Ks[:, 0, 0] > 0) & (Ks[:, 1, 1] > 0)).all()):
        raise ValueError("Ks must have positive focal lengths (Ks[:, 0, 0] and Ks[:, 1, 1] > 0)")


def _check_isect_values(means2d, radii, depths, conics, opacities):
    check_finite("means2d", means2d)
    check_finite("depths", depths)
    # The keys sort the float32 bit patterns of the depths, which order only non-negative values.
    if has_values(depths) and bool(((depths < 0) & (radii > 0).all(-1)).any()):
        raise ValueError("depths must be >= 0 where radii > 0 (the keys sort depths by their float32 bits)")
    # The exact tile test reads them (a NaN would decide tiles differently per backend).
    if conics is not None:
        check_finite("conics", conics)
    if opacities is not None:  # rasterization's opacities may carry a graph: their values alone are read
        check_finite("opacities", opacities.detach())
        check_in_range("opacities", opacities.detach(), 0, 1)


def _check_packed_isect_sizes(n_images, nnz, n_tiles):
    """Packed isect_tiles: at least one camera, and the key fields and int32 row ids hold the problem."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1 with image_ids, got {n_images}")
    ref.check_isect_sizes(n_images, nnz, n_tiles, packed_rows=nnz)


def _check_image_ids(image_ids, n_images):
    """Packed rows' cameras: each must address one of the n_images images."""
    if has_values(image_ids) and image_ids.numel():
        lo, hi = int(image_ids.min()), int(image_ids.max())
        if lo < 0 or hi >= n_images:
            raise ValueError(
                f"image_ids must lie in [0, n_images) = [0, {n_images}) (each packed row's camera), "
                f"got values in [{lo}, {hi}]"
            )


def _check_isect_ids(isect_ids, n_images, tile_width, tile_height):
    """The keys are sorted and their camera and tile fields address the [n_images, tiles] grid.

    The offsets come from a binary search over the keys, so an unsorted list
    or a key for a camera or tile outside the grid would give offsets that
    are silently wrong rather than an error.
    """
    if not has_values(isect_ids):
        return
    if isect_ids.numel() > 1:
        down = isect_ids[1:] < isect_ids[:-1]
        if bool(down.any()):
            k = int(down.nonzero()[0, 0])
            raise ValueError(
                f"isect_ids must be sorted (non-decreasing), as isect_tiles returns them; "
                f"isect_ids[{k}] > isect_ids[{k + 1}]"
            )
    n_tiles = tile_width * tile_height
    tile_bits = ref.bits_for_count(n_tiles)
    hi = isect_ids >> 32
    # Sorted keys have non-decreasing camera fields (the shift keeps the
    # order, negative keys included): the ends bound them all.
    cam_lo, cam_hi = int(hi[0] >> tile_bits), int(hi[-1] >> tile_bits)
    if cam_lo < 0 or cam_hi >= n_images:
        k, c = (0, cam_lo) if cam_lo < 0 else (isect_ids.numel() - 1, cam_hi)
        raise ValueError(
            f"isect_ids must hold cameras in [0, n_images) = [0, {n_images}) above their "
            f"{32 + tile_bits} low bits; isect_ids[{k}] has camera {c}"
        )
    tile = hi & ((1 << tile_bits) - 1)
    past = tile >= n_tiles
    if bool(past.any()):
        k = int(past.nonzero()[0, 0])
        raise ValueError(
            f"isect_ids must hold tiles in [0, tile_width * tile_height) = [0, {n_tiles}) in bits "
            f"32..{31 + tile_bits}; isect_ids[{k}] has tile {int(tile[k])}"
        )


def _check_blend_values(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids):
    for name, t in (("means2d", means2d), ("conics", conics), ("colors", colors), ("opacities", opacities)):
        check_finite(name, t)
    if backgrounds is not None:
        check_finite("backgrounds", backgrounds)
    # Opacities above 1 would reach the 0.99 clamp where a real splat does
    # not, and negative ones would only ever be skipped: neither is a splat.
    check_in_range("opacities", opacities, 0, 1)
    R = opacities.numel()  # rows: C * N, or nnz when packed
    what, rows = ("nnz", "packed rows") if opacities.dim() == 1 else ("C * N", "Gaussians")
    M = flatten_ids.numel()
    if M and R == 0:
        raise ValueError(
            f"flatten_ids must be empty when there are no Gaussians ({what} = 0), got {M} entries"
        )
    check_in_range("flatten_ids", flatten_ids, 0, R - 1, f" (indices into the {what} = {R} {rows})")
    # Tile t's run is offsets[t] : offsets[t + 1] (M for the last tile).
    starts = isect_offsets.reshape(-1)
    if has_values(starts) and (
        int(starts[0]) < 0 or int(starts[-1]) > M or bool((starts[1:] < starts[:-1]).any())
    ):
        raise ValueError(
            f"isect_offsets must be non-decreasing (flattened over [C, tile_height, tile_width]) and lie in "
            f"[0, M] = [0, {M}] (M = flatten_ids.numel()), as isect_offset_encode returns them"
        )


# ---------------------------------------------------------------------------
# projection
# ---------------------------------------------------------------------------
_PROJECT_ARGS = (
    "Tensor means, Tensor quats, Tensor scales, Tensor opacities, Tensor viewmats, Tensor Ks, SymInt width, "
    "SymInt height, float eps2d, float near_plane, float far_plane, float radius_clip, bool antialiased"
)
_FIVE = "(Tensor, Tensor, Tensor, Tensor, Tensor)"


def _ref_project(
    means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
    antialiased,
):  # fmt: skip
    _check_gaussian_values(means, quats, scales, opacities)
    _check_camera_values(viewmats, Ks)
    radii, *rest = ref.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        antialiased,
    )  # fmt: skip
    _check_projected(means.dtype, rest)
    # The integer radii come last: float outputs first keeps generic tooling
    # (opcheck's output sums) in floating point.
    return tuple(t.contiguous() for t in (*rest, radii))


def _check_projected(dtype, outputs):
    """Finite inputs can still overflow the dtype (a conic of 1 / det with det = inf).

    Caught here, where the inputs are known, rather than in the blender,
    which would blame its own argument (conics) for the caller's scene.
    """
    for out_name, t in zip(("means2d", "depths", "conics", "compensations"), outputs):
        if has_values(t) and not bool(torch.isfinite(t).all()):
            c, n = (int(i) for i in (~torch.isfinite(t)).nonzero()[0, :2])
            raise ValueError(
                f"means, scales, viewmats, Ks or eps2d are too large for {dtype}: the projection overflows "
                f"(the {out_name} of Gaussian {n} in camera {c} is not finite)"
            )


def _fake_project(means, quats, scales, opacities, viewmats, Ks, *rest):
    torch._check(means.dim() == 2 and means.shape[1] == 3, lambda: "means must be [N, 3]")
    torch._check(viewmats.dim() == 3, lambda: "viewmats must be [C, 4, 4]")
    C, N = viewmats.shape[0], means.shape[0]
    return (
        means.new_empty((C, N, 2)),
        means.new_empty((C, N)),
        means.new_empty((C, N, 3)),
        means.new_empty((C, N)),
        means.new_empty((C, N, 2), dtype=torch.int32),
    )


def _ref_project_bwd(
    means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
    antialiased, grad_means2d, grad_depths, grad_conics, grad_compensations,
):  # fmt: skip
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_(True) for t in (means, quats, scales, viewmats, Ks)]
        m, q, s, v, k = leaves
        _, m2d, z, con, comp = ref.project_gaussians(
            m, q, s, opacities.detach(), v, k, width, height, eps2d, near_plane, far_plane, radius_clip,
            antialiased,
        )  # fmt: skip
        outs = [
            (o, g)
            for o, g in zip((m2d, z, con, comp), (grad_means2d, grad_depths, grad_conics, grad_compensations))
            if o.requires_grad
        ]  # classic mode's compensations are constant ones: no graph to walk
        grads = torch.autograd.grad([o for o, _ in outs], leaves, [g for _, g in outs], allow_unused=True)
    return tuple(zeros_if_none(g, x).contiguous() for g, x in zip(grads, leaves))


def _project_setup(ctx, a, output):
    ctx.args = (a.width, a.height, a.eps2d, a.near_plane, a.far_plane, a.radius_clip, a.antialiased)
    ctx.save_for_backward(a.means, a.quats, a.scales, a.opacities, a.viewmats, a.Ks)


def _project_backward(ctx, g_means2d, g_depths, g_conics, g_comp, _g_radii):
    # Opacities only choose the (integer) radii: their gradient here is zero,
    # so a call where only they need one has nothing to compute.
    if not ctx.needs.any("means", "quats", "scales", "viewmats", "Ks"):
        return {}
    means, quats, scales, opacities, viewmats, Ks = ctx.saved_tensors
    C, N = viewmats.shape[0], means.shape[0]
    z2 = means.new_zeros((C, N, 2))
    z1 = means.new_zeros((C, N))
    z3 = means.new_zeros((C, N, 3))
    gm, gq, gs, gv, gk = _ops.project_gaussians_bwd(
        means, quats, scales, opacities, viewmats, Ks, *ctx.args,
        z2 if g_means2d is None else g_means2d.contiguous(),
        z1 if g_depths is None else g_depths.contiguous(),
        z3 if g_conics is None else g_conics.contiguous(),
        z1 if g_comp is None else g_comp.contiguous(),
        ctx.backend,
    )  # fmt: skip
    return {"means": gm, "quats": gq, "scales": gs, "viewmats": gv, "Ks": gk}


define_op(
    f"project_gaussians({_PROJECT_ARGS}) -> {_FIVE}",
    fake=_fake_project,
    reference=_ref_project,
    triton="frontiers_fast.kernels.splat:project_gaussians",
    native=("cpp",),  # csrc/splat/project_cpu.cpp: the same value checks and messages as _ref_project
    backward=_project_backward,
    setup_context=_project_setup,
)
define_op(
    f"project_gaussians_bwd({_PROJECT_ARGS}, Tensor grad_means2d, Tensor grad_depths, Tensor grad_conics, "
    f"Tensor grad_compensations) -> {_FIVE}",
    fake=lambda means, quats, scales, opacities, viewmats, Ks, *rest: tuple(
        torch.empty_like(t) for t in (means, quats, scales, viewmats, Ks)
    ),
    reference=_ref_project_bwd,
    triton="frontiers_fast.kernels.splat:project_gaussians_bwd",
    native=("cpp",),  # analytic; deterministic per-camera sums (fixed chunks of Gaussians)
)


# ---------------------------------------------------------------------------
# spherical harmonics
# ---------------------------------------------------------------------------
def _ref_sh(degree, dirs, coeffs, masks):
    check_finite("dirs", dirs)
    check_finite("coeffs", coeffs)
    return ref.spherical_harmonics(degree, dirs, coeffs, masks).contiguous()


def _fake_sh(degree, dirs, coeffs, masks, backend):
    torch._check(dirs.shape[-1] == 3, lambda: "dirs must be [..., 3]")
    return dirs.new_empty(tuple(dirs.shape[:-1]) + (3,))


def _ref_sh_bwd(degree, dirs, coeffs, masks, grad_colors):
    with _autograd_inside_op():
        d = dirs.detach().requires_grad_(True)
        c = coeffs.detach().requires_grad_(True)
        out = ref.spherical_harmonics(degree, d, c, masks)
        gd, gc = torch.autograd.grad(out, (d, c), grad_colors, allow_unused=True)
    return zeros_if_none(gd, d).contiguous(), zeros_if_none(gc, c).contiguous()


def _sh_setup(ctx, a, output):
    ctx.degree = a.degree
    ctx.save_for_backward(a.dirs, a.coeffs, a.masks)


def _sh_backward(ctx, grad):
    dirs, coeffs, masks = ctx.saved_tensors
    gd, gc = _ops.spherical_harmonics_bwd(ctx.degree, dirs, coeffs, masks, grad.contiguous(), ctx.backend)
    return {"dirs": gd, "coeffs": gc}


define_op(
    "spherical_harmonics(SymInt degree, Tensor dirs, Tensor coeffs, Tensor? masks) -> Tensor",
    fake=_fake_sh,
    reference=_ref_sh,
    triton="frontiers_fast.kernels.splat:spherical_harmonics",
    native=("cpp",),
    backward=_sh_backward,
    setup_context=_sh_setup,
)
define_op(
    "spherical_harmonics_bwd(SymInt degree, Tensor dirs, Tensor coeffs, Tensor? masks, Tensor grad_colors) "
    "-> (Tensor, Tensor)",
    fake=lambda degree, dirs, coeffs, masks, grad_colors, backend: (
        torch.empty_like(dirs),
        torch.empty_like(coeffs),
    ),
    reference=_ref_sh_bwd,
    triton="frontiers_fast.kernels.splat:spherical_harmonics_bwd",
    native=("cpp",),
)


# ---------------------------------------------------------------------------
# tile intersection (integer outputs, no autograd)
# ---------------------------------------------------------------------------
def _ref_isect_tiles(
    means2d, radii, depths, tile_size, tile_width, tile_height, conics, opacities, max_intersections, image_ids,
    n_images,
):  # fmt: skip
    # Sizes first (with concrete sizes: under torch.compile the public
    # function sees symbolic ones): they are refused before any O(C N) work.
    if image_ids is None:
        ref.check_isect_sizes(depths.shape[0], depths.shape[1], tile_width * tile_height)
    else:
        _check_packed_isect_sizes(n_images, depths.shape[0], tile_width * tile_height)
    _check_isect_values(means2d, radii, depths, conics, opacities)
    if image_ids is not None:
        _check_image_ids(image_ids, n_images)
    return ref.isect_tiles(
        means2d, radii, depths, tile_size, tile_width, tile_height, conics, opacities, max_intersections,
        image_ids, n_images,
    )  # fmt: skip


def _fake_isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, *rest):
    m = torch.library.get_ctx().new_dynamic_size()  # the number of overlaps depends on the data
    return (
        depths.new_empty(depths.shape, dtype=torch.int32),
        depths.new_empty((m,), dtype=torch.int64),
        depths.new_empty((m,), dtype=torch.int32),
    )


def _ref_isect_offset_encode(isect_ids, n_images, tile_width, tile_height):
    _check_isect_ids(isect_ids, n_images, tile_width, tile_height)
    return ref.isect_offset_encode(isect_ids, n_images, tile_width, tile_height)


define_op(
    "isect_tiles(Tensor means2d, Tensor radii, Tensor depths, SymInt tile_size, SymInt tile_width, "
    "SymInt tile_height, Tensor? conics, Tensor? opacities, int? max_intersections, Tensor? image_ids, "
    "SymInt n_images) -> (Tensor, Tensor, Tensor)",
    fake=_fake_isect_tiles,
    reference=_ref_isect_tiles,
    triton="frontiers_fast.kernels.splat:isect_tiles",
    native=("cpp",),
)
define_op(
    "isect_offset_encode(Tensor isect_ids, SymInt n_images, SymInt tile_width, SymInt tile_height) -> Tensor",
    fake=lambda isect_ids, n_images, tile_width, tile_height, backend: isect_ids.new_empty(
        (n_images, tile_height, tile_width), dtype=torch.int32
    ),
    reference=_ref_isect_offset_encode,
    triton="frontiers_fast.kernels.splat:isect_offset_encode",
    native=("cpp",),
)


# ---------------------------------------------------------------------------
# blending
# ---------------------------------------------------------------------------
_RASTER_ARGS = (
    "Tensor means2d, Tensor conics, Tensor colors, Tensor opacities, Tensor? backgrounds, SymInt width, "
    "SymInt height, SymInt tile_size, Tensor isect_offsets, Tensor flatten_ids, bool absgrad"
)


def _ref_raster(
    means2d,
    conics,
    colors,
    opacities,
    backgrounds,
    width,
    height,
    tile_size,
    isect_offsets,
    flatten_ids,
    absgrad,
):
    _check_blend_values(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids)
    outs = ref.rasterize_to_pixels(
        means2d, conics, colors, opacities, width, height, tile_size, isect_offsets, flatten_ids, backgrounds,
        with_state=True,
    )  # fmt: skip
    return tuple(t.contiguous() for t in outs)


def _fake_raster(
    means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, *rest
):
    torch._check(colors.dim() in (2, 3), lambda: "colors must be [C, N, D] or packed [nnz, D]")
    C, D = isect_offsets.shape[0], colors.shape[-1]
    return (
        colors.new_empty((C, height, width, D)),
        colors.new_empty((C, height, width, 1)),
        colors.new_empty((C, height, width)),
        colors.new_empty((C, height, width), dtype=torch.int32),
    )


def _ref_raster_bwd(
    means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids,
    absgrad, final_ts, last_ids, grad_colors, grad_alphas,
):  # fmt: skip
    # final_ts and last_ids (the forward's state for a back-to-front pass) are
    # not needed here: each chunk's forward is recomputed under autograd.
    C, D, R = isect_offsets.shape[0], colors.shape[-1], opacities.numel()  # R rows: C * N, or nnz packed
    plan = ref.BlendPlan(means2d, conics, opacities, isect_offsets, flatten_ids, width, height, tile_size)
    order, chunks = ref.block_chunks(plan.count, plan.block**2)
    g_out = ref.image_to_blocks(grad_colors, plan)  # [B, P, D]; padding pixels carry no gradient
    # T_final enters as alpha = 1 - T and as T * background.
    g_T = -ref.image_to_blocks(grad_alphas, plan)[..., 0]
    per_cam = plan.blocks_w * plan.blocks_h
    if backgrounds is not None:
        g_T = g_T + (g_out * backgrounds.repeat_interleave(per_cam, 0)[:, None, :]).sum(-1)
    flat_shapes = ((R, 2), (R, 3), (R, D), (R,))
    leaves = [
        t.detach().reshape(shape).requires_grad_(True)
        for t, shape in zip((means2d, conics, colors, opacities), flat_shapes)
    ]
    acc = [torch.zeros_like(t) for t in leaves]
    g_bg = colors.new_zeros((C, D)) if backgrounds is not None else absent(colors)
    g_abs = means2d.new_zeros((R, 2)) if absgrad else None
    # One chunk at a time: recompute its forward with autograd, pull the
    # gradient back, free it.  Peak memory stays that of one forward chunk.
    for b, e, K in chunks:
        blocks = order[b:e]
        stash = {} if absgrad else None
        with _autograd_inside_op():
            out, T = ref.blend_blocks(blocks, K, plan, *leaves, stash=stash)
            # With no intersection at all the blend is constant (out 0, T 1):
            # no graph to walk, but the background still gets sum(g_out * T).
            grads = ()
            if out.requires_grad:
                loss = (out * g_out[blocks]).sum() + (T * g_T[blocks]).sum()
                extra = [stash["sigma"]] if absgrad else []
                grads = torch.autograd.grad(loss, leaves + extra, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a += g
        if absgrad and grads and grads[4] is not None:
            # Each pixel's own d/dmean = -dL/dsigma (a dx + b dy, c dy + b dx); |.| summed over the pixels.
            gs, dx, dy, con = grads[4], stash["dx"], stash["dy"], stash["con"].detach()
            a, bb, c = (con[:, None, :, i] for i in range(3))
            per = torch.stack(
                [(gs * (a * dx + bb * dy)).abs().sum(1), (gs * (c * dy + bb * dx)).abs().sum(1)], -1
            )
            valid = stash["valid"]
            g_abs.index_add_(0, stash["g"][valid], per[valid])
        if backgrounds is not None:
            g_bg.index_add_(0, blocks // per_cam, torch.einsum("tp,tpd->td", T.detach(), g_out[blocks]))
    gm, gc, gcol, go = (a.reshape(t.shape) for a, t in zip(acc, (means2d, conics, colors, opacities)))
    return gm, gc, gcol, go, g_bg, g_abs.reshape(means2d.shape) if absgrad else absent(colors)


def _fake_raster_bwd(
    means2d, conics, colors, opacities, backgrounds, w, h, ts, offsets, fids, absgrad, *rest
):
    return (
        torch.empty_like(means2d),
        torch.empty_like(conics),
        torch.empty_like(colors),
        torch.empty_like(opacities),
        torch.empty_like(backgrounds) if backgrounds is not None else absent(colors),
        torch.empty_like(means2d) if absgrad else absent(colors),
    )


def _raster_setup(ctx, a, output):
    ctx.args = (a.width, a.height, a.tile_size)
    ctx.absgrad = a.absgrad
    _, _, final_ts, last_ids = output
    ctx.save_for_backward(
        a.means2d, a.conics, a.colors, a.opacities, a.backgrounds, a.isect_offsets, a.flatten_ids, final_ts,
        last_ids,
    )  # fmt: skip


def _raster_backward(ctx, g_colors, g_alphas, _g_final_ts, _g_last_ids):
    # final_ts and last_ids are the backward's own state, never returned to
    # a caller (the public functions drop them): no gradient comes through them.
    means2d, conics, colors, opacities, backgrounds, offsets, flatten_ids, final_ts, last_ids = (
        ctx.saved_tensors
    )
    C, D = offsets.shape[0], colors.shape[-1]
    W, H = ctx.args[0], ctx.args[1]
    g_colors = colors.new_zeros((C, H, W, D)) if g_colors is None else g_colors.contiguous()
    g_alphas = colors.new_zeros((C, H, W, 1)) if g_alphas is None else g_alphas.contiguous()
    gm, gc, gcol, go, gbg, gabs = _ops.rasterize_to_pixels_bwd(
        means2d, conics, colors, opacities, backgrounds, *ctx.args, offsets, flatten_ids, ctx.absgrad, final_ts,
        last_ids, g_colors, g_alphas, ctx.backend,
    )  # fmt: skip
    if ctx.absgrad:
        # gsplat's densification signal, where gsplat puts it: an attribute of
        # the means2d tensor the caller holds (meta["means2d"]).
        means2d.absgrad = gabs
    return {"means2d": gm, "conics": gc, "colors": gcol, "opacities": go, "backgrounds": gbg}


define_op(
    f"rasterize_to_pixels({_RASTER_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_raster,
    reference=_ref_raster,
    triton="frontiers_fast.kernels.splat:rasterize_to_pixels",
    # cuda: csrc/splat/raster.cu, forward only: the _bwd op has none, so backend="cuda" is refused where the
    # inputs require grad (as for selective_scan); its binding makes _ref_raster's value checks.
    native=("cpp", "cuda"),
    backward=_raster_backward,
    setup_context=_raster_setup,
)
define_op(
    f"rasterize_to_pixels_bwd({_RASTER_ARGS}, Tensor final_ts, Tensor last_ids, Tensor grad_colors, "
    f"Tensor grad_alphas) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_raster_bwd,
    reference=_ref_raster_bwd,
    triton="frontiers_fast.kernels.splat:rasterize_to_pixels_bwd",
    native=("cpp",),
)


_backend.register_function(
    "project_gaussians", ops=("project_gaussians",), grad_ops=("project_gaussians_bwd",)
)
_backend.register_function(
    "spherical_harmonics", ops=("spherical_harmonics",), grad_ops=("spherical_harmonics_bwd",)
)
_backend.register_function("isect_tiles", ops=("isect_tiles",))
_backend.register_function("isect_offset_encode", ops=("isect_offset_encode",))
_backend.register_function(
    "rasterize_to_pixels", ops=("rasterize_to_pixels",), grad_ops=("rasterize_to_pixels_bwd",)
)
_backend.register_function(
    "rasterization",
    ops=(
        "project_gaussians",
        "spherical_harmonics",
        "isect_tiles",
        "isect_offset_encode",
        "rasterize_to_pixels",
    ),
    grad_ops=("project_gaussians_bwd", "spherical_harmonics_bwd", "rasterize_to_pixels_bwd"),
)


# ---------------------------------------------------------------------------
# argument checks of the public functions (types, shapes, scalars)
# ---------------------------------------------------------------------------
def _check_float(name, t, shape, like=None, like_name="means", hint=""):
    """A float32/float64 tensor of ``shape`` (see check_shape), on ``like``'s device and of its dtype."""
    check_tensor(name, t, FP32_64, FP32_64_WHAT)
    if like is not None:
        check_like(name, t, like_name, like)
    check_shape(name, t, shape, hint)


def _check_tile_size(tile_size):
    """A positive power of two, as gsplat's rasterizer requires of its tiles."""
    tile_size = check_int("tile_size", tile_size, 1)
    if tile_size & (tile_size - 1):
        raise ValueError(f"tile_size must be a positive power of two, got {tile_size}")
    return tile_size


def _check_int32(name, t, shape, like, like_name):
    check_tensor(name, t, (torch.int32,), "int32")
    check_shape(name, t, shape)
    check_same_device(name, t, like_name, like.device)


def _check_exact_culling(conics, opacities, means2d):
    """The optional conics [C, N, 3] and opacities [C, N] (packed: [nnz, 3] and [nnz]) of isect_tiles'
    exact culling: both or neither."""
    if (conics is None) != (opacities is None):
        given, missing = ("conics", "opacities") if opacities is None else ("opacities", "conics")
        raise ValueError(
            f"isect_tiles got {given} but not {missing}: exact tile culling needs both (or neither, for the "
            "bounding-box lists)"
        )
    if conics is None:
        return
    rows = tuple(means2d.shape[:-1])
    _check_float("conics", conics, rows + (3,), means2d, "means2d")
    _check_float("opacities", opacities, rows, means2d, "means2d")


def _check_gaussians(means, quats, scales, opacities):
    _check_float("means", means, (None, 3))
    N = means.shape[0]
    _check_float("quats", quats, (N, 4), means)
    _check_float("scales", scales, (N, 3), means)
    _check_float("opacities", opacities, (N,), means)
    return N


def _check_camera(means, viewmats, Ks, width, height):
    _check_float("viewmats", viewmats, (None, 4, 4), means)
    C = viewmats.shape[0]
    if C == 0:
        raise ValueError("viewmats must hold at least one camera, got shape [0, 4, 4]")
    _check_float("Ks", Ks, (C, 3, 3), means)
    return C, check_int("width", width, 1), check_int("height", height, 1)


def _check_planes(near_plane, far_plane, eps2d, radius_clip):
    near_plane = check_real("near_plane", near_plane, 0.0, strict=True)
    far_plane = check_real("far_plane", far_plane, allow_inf=True)
    if not far_plane > near_plane:
        raise ValueError(f"far_plane must be > near_plane ({near_plane}), got {far_plane}")
    eps2d = check_real("eps2d", eps2d, 0.0)
    radius_clip = check_real("radius_clip", radius_clip, 0.0)
    return near_plane, far_plane, eps2d, radius_clip


def _check_image_memory(C, width, height, tile_size, D, dtype, device):
    # The blender works on whole tiles: C padded images of D + 1 channels
    # (colour and transmittance), and as much again for the gradients.
    if not not torch.compiler.is_compiling():
        return
    tw, th = ref.tile_grid(width, height, tile_size)
    pixels = C * tw * tile_size * th * tile_size
    nbytes = 2 * pixels * (D + 1) * dtype.itemsize
    check_memory(
        f"width x height ({width} x {height}, in whole tiles of tile_size={tile_size})", nbytes, device
    )


# ---------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------
def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    antialiased: bool = False,
    *,
    packed: bool = False,
    backend: str | None = None,
):
    """Project N 3D Gaussians into C pinhole cameras (EWA splatting).

    means [N, 3], quats [N, 4] (w, x, y, z; normalised here), scales [N, 3] > 0,
    opacities [N] in [0, 1], viewmats [C, 4, 4] world-to-camera, Ks [C, 3, 3]
    (positive focal lengths); all float32 or float64, of one dtype.
    ``far_plane`` may be ``math.inf``.

    Returns radii [C, N, 2] int32 (0 = culled), means2d [C, N, 2], depths [C, N],
    conics [C, N, 3] and compensations [C, N] (ones unless ``antialiased``).
    Differentiable with respect to means, quats, scales, viewmats and Ks.

    ``packed=True`` (gsplat's packed layout) keeps only the nnz visible
    (camera, Gaussian) pairs, camera-major: returns camera_ids [nnz] int32,
    gaussian_ids [nnz] int32, radii [nnz, 2], means2d [nnz, 2], depths [nnz],
    conics [nnz, 3] and compensations [nnz] (:func:`pack`).  The [C, N]
    projection is a transient: only the nnz rows outlive the call.

    NaN or inf in any input tensor is refused (ValueError naming it), in
    eager and compiled calls alike; so is every out-of-range value above.
    Meta tensors give meta outputs of the right shapes (nothing is read).

    Example::

        radii, means2d, depths, conics, comp = project_gaussians(means, quats, scales, opac, viewmats, Ks, 640, 480)
    """
    _check_gaussians(means, quats, scales, opacities)
    _, width, height = _check_camera(means, viewmats, Ks, width, height)
    near_plane, far_plane, eps2d, radius_clip = _check_planes(near_plane, far_plane, eps2d, radius_clip)
    antialiased = check_bool("antialiased", antialiased)
    grad = _backend.records_grad(means, quats, scales, opacities, viewmats, Ks)
    backend = _backend.resolve(backend, means.device, "project_gaussians", grad)
    # Value checks (finite, scales > 0, quaternion norms, opacities in [0, 1],
    # focal lengths) run in the op body.
    means2d, depths, conics, compensations, radii = _ops.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        antialiased, backend,
    )  # fmt: skip
    if check_bool("packed", packed):
        cam, gid = pack_ids(radii)
        return (cam, gid, *pack(cam, gid, radii, means2d, depths, conics, compensations))
    return radii, means2d, depths, conics, compensations


def pack_ids(radii):
    """The visible (camera, Gaussian) pairs of radii [C, N, 2], camera-major (gsplat's packed order):
    camera_ids [nnz] int32 and gaussian_ids [nnz] int32."""
    cam, gid = (radii > 0).all(-1).nonzero(as_tuple=True)
    return cam.to(torch.int32), gid.to(torch.int32)


def pack(camera_ids, gaussian_ids, *tensors):
    """Per-(camera, Gaussian) tensors [C, N, ...] gathered to the packed rows [nnz, ...].

    Differentiable: the gradient of each row goes back to its own (camera,
    Gaussian) entry (the pairs are distinct, so nothing is summed)."""
    c, g = camera_ids.long(), gaussian_ids.long()
    return tuple(t[c, g] for t in tensors)


def spherical_harmonics(
    degree: int, dirs: Tensor, coeffs: Tensor, masks: Tensor | None = None, *, backend=None
):
    """View-dependent colour [..., 3] from real SH of ``degree`` (0-3).

    dirs [..., 3] (normalised here), coeffs [..., K, 3] with K >= (degree + 1)^2,
    masks [...] bool (False gives 0).  Raw SH sum: :func:`rasterization` adds
    0.5 and clamps at 0.

    NaN or inf in ``dirs`` or ``coeffs`` is refused (ValueError naming it), in
    eager and compiled calls alike: a masked-out entry would otherwise come
    out NaN here (NaN * 0) but 0 from a kernel that skips it.

    Example: ``rgb = spherical_harmonics(3, means - campos, sh)  # sh [N, 16, 3]``
    """
    degree = check_int("degree", degree, 0, 3)
    check_tensor("dirs", dirs, FP32_64, FP32_64_WHAT)
    if dirs.dim() == 0:
        raise ValueError("dirs must have shape [..., 3], got a 0-dim tensor")
    check_shape("dirs", dirs, (None,) * (dirs.dim() - 1) + (3,))
    batch = tuple(dirs.shape[:-1])
    _check_float("coeffs", coeffs, batch + (None, 3), dirs, "dirs")
    if coeffs.shape[-2] < (degree + 1) ** 2:
        raise ValueError(f"coeffs has {coeffs.shape[-2]} bases but degree {degree} needs {(degree + 1) ** 2}")
    if masks is not None:
        check_tensor("masks", masks, (torch.bool,), "a bool tensor")
        check_shape("masks", masks, batch)
        check_same_device("masks", masks, "dirs", dirs.device)
    backend = _backend.resolve(
        backend, dirs.device, "spherical_harmonics", _backend.records_grad(dirs, coeffs)
    )
    return _ops.spherical_harmonics(degree, dirs, coeffs, masks, backend)


def isect_tiles(
    means2d, radii, depths, tile_size, tile_width, tile_height, conics=None, opacities=None, *,
    max_intersections=None, packed=False, n_images=None, image_ids=None, backend=None,
):  # fmt: skip
    """Tile overlaps as sorted 64-bit keys (camera | tile | depth bits).

    means2d [C, N, 2], radii [C, N, 2] int32, depths [C, N] (>= 0 where
    radii > 0).  Without ``conics`` and ``opacities`` every tile of a
    Gaussian's bounding box is listed (gsplat 1.5.3's ``isect_tiles``).  With
    conics [C, N, 3] and the blending opacities [C, N] in [0, 1] (both or
    neither; of means2d's dtype and device) only the box's tiles that the
    ``alpha >= 1/255`` ellipse reaches are (gsplat main's exact culling): the
    rendered images are the same, the lists shorter.  See
    :func:`frontiers_fast.reference.splat.isect_tiles`.

    Returns tiles_per_gauss [C, N] int32, isect_ids [M] int64 (sorted),
    flatten_ids [M] int32.

    ``packed=True`` (gsplat's signature): the rows are nnz (camera,
    Gaussian) pairs, means2d [nnz, 2], radii [nnz, 2], depths [nnz], conics
    [nnz, 3], opacities [nnz], with ``image_ids`` [nnz] int32 their cameras
    in [0, ``n_images``); tiles_per_gauss is [nnz] and flatten_ids index the
    rows.  Rows in camera-major order (as :func:`project_gaussians` with
    ``packed=True`` gives them) list the same keys as the unpacked call.  The intersections are counted before the outputs
    are allocated: ValueError when M exceeds ``max_intersections`` (None:
    when the 12 M bytes of isect_ids and flatten_ids exceed the device's
    memory), when the camera and tile fields need more than 31 bits,
    C * N > 2^31 or M >= 2^31.

    NaN or inf in ``means2d``, ``depths``, ``conics`` or ``opacities`` is
    refused (ValueError naming it), in eager and compiled calls alike: they
    decide integer tiles and the sort order.  M depends on the values, so
    meta tensors are refused.

    Example: ``tpg, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, 16, 40, 30, conics, opac)``
    """
    packed = check_bool("packed", packed)
    if packed:
        _check_float("means2d", means2d, (None, 2), hint=" (packed rows)")
        rows = tuple(means2d.shape[:1])
        if n_images is None or image_ids is None:
            raise ValueError(
                "isect_tiles with packed=True needs n_images and image_ids (the camera of each row)"
            )
        n_images = check_int("n_images", n_images, 1)
        _check_int32("image_ids", image_ids, rows, means2d, "means2d")
    else:
        if n_images is not None or image_ids is not None:
            raise ValueError("isect_tiles takes n_images and image_ids only with packed=True")
        _check_float("means2d", means2d, (None, None, 2))
        rows = tuple(means2d.shape[:2])
    _check_int32("radii", radii, rows + (2,), means2d, "means2d")
    _check_float("depths", depths, rows, means2d, "means2d")
    tile_size = _check_tile_size(tile_size)
    tile_width = check_int("tile_width", tile_width, 1)
    tile_height = check_int("tile_height", tile_height, 1)
    _check_exact_culling(conics, opacities, means2d)
    if max_intersections is not None:
        max_intersections = check_int("max_intersections", max_intersections, 0)
    check_has_values("means2d", means2d)
    # The op body repeats this size check with concrete sizes (under
    # torch.compile C and N may be symbolic) and runs the value checks
    # (finite means2d and depths, depths >= 0, image_ids in range).
    if not torch.compiler.is_compiling():
        if packed:
            ref.check_isect_sizes(n_images, rows[0], tile_width * tile_height, packed_rows=rows[0])
        else:
            ref.check_isect_sizes(*rows, tile_width * tile_height)
    backend = _backend.resolve(backend, means2d.device, "isect_tiles", False)
    return _ops.isect_tiles(
        means2d, radii, depths, tile_size, tile_width, tile_height, conics, opacities, max_intersections,
        image_ids if packed else None, n_images if packed else 0, backend,
    )  # fmt: skip


def isect_offset_encode(isect_ids, n_images, tile_width, tile_height, *, backend=None):
    """Start of each tile's run in the sorted keys: [n_images, tile_height, tile_width] int32.

    isect_ids [M] int64, sorted, as :func:`isect_tiles` returns them; their
    camera and tile fields must lie in [0, n_images) and [0, tile_width *
    tile_height) (ValueError naming isect_ids otherwise, in eager and
    compiled calls alike).  Integer input only: there is no NaN to propagate.

    Example: ``offsets = isect_offset_encode(isect_ids, C, 40, 30)``
    """
    check_tensor("isect_ids", isect_ids, (torch.int64,), "int64")
    check_shape("isect_ids", isect_ids, (None,))
    n_images = check_int("n_images", n_images, 1)
    tile_width = check_int("tile_width", tile_width, 1)
    tile_height = check_int("tile_height", tile_height, 1)
    if not torch.compiler.is_compiling():
        # The search allocates one int64 target and one int32 offset per (camera, tile).
        check_memory(
            "n_images x tile_width x tile_height", 12 * n_images * tile_width * tile_height, isect_ids.device
        )
    backend = _backend.resolve(backend, isect_ids.device, "isect_offset_encode", False)
    return _ops.isect_offset_encode(isect_ids, n_images, tile_width, tile_height, backend)


def rasterize_to_pixels(
    means2d, conics, colors, opacities, width, height, tile_size, isect_offsets, flatten_ids, backgrounds=None,
    *, packed=False, absgrad=False, backend=None,
):  # fmt: skip
    """Front-to-back alpha blending of projected Gaussians, tile by tile.

    means2d [C, N, 2], conics [C, N, 3], colors [C, N, D], opacities [C, N]
    in [0, 1], isect_offsets [C, tile_height, tile_width] int32
    (non-decreasing, in [0, M]), flatten_ids [M] int32 (in [0, C * N)),
    backgrounds [C, D] or None.  Returns render_colors [C, H, W, D] and
    render_alphas [C, H, W, 1], differentiable with respect to means2d,
    conics, colors, opacities and backgrounds.  ``absgrad=True``: the
    backward also sets ``means2d.absgrad`` [C, N, 2], the sum over pixels of
    each pixel's |d loss / d means2d| (gsplat's densification signal).
    ``packed=True``: means2d [nnz, 2], conics [nnz, 3], colors [nnz, D] and
    opacities [nnz] are packed rows (:func:`project_gaussians` with
    ``packed=True``), flatten_ids index them, and C is isect_offsets.shape[0].

    NaN or inf in any float input is refused (ValueError naming it), in
    eager and compiled calls alike: a skipped Gaussian's colour meets a zero
    weight, which would turn a NaN into NaN pixels here but not in a kernel
    that skips it.  Meta tensors give meta outputs (nothing is read).

    Example: ``img, alpha = rasterize_to_pixels(means2d, conics, rgb, opac, 640, 480, 16, offsets, flatten_ids)``
    """
    if check_bool("packed", packed):
        _check_float("means2d", means2d, (None, 2), hint=" (packed rows)")
        rows = tuple(means2d.shape[:1])
        check_tensor("isect_offsets", isect_offsets, (torch.int32,), "int32")
        check_shape("isect_offsets", isect_offsets, (None, None, None))
        C = isect_offsets.shape[0]
        if C == 0:
            raise ValueError(
                f"isect_offsets must hold at least one camera, got shape {list(isect_offsets.shape)}"
            )
    else:
        _check_float("means2d", means2d, (None, None, 2))
        rows = tuple(means2d.shape[:2])
        C = rows[0]
        if C == 0:
            raise ValueError(f"means2d must hold at least one camera, got shape {list(means2d.shape)}")
    _check_float("conics", conics, rows + (3,), means2d, "means2d")
    _check_float("colors", colors, rows + (None,), means2d, "means2d")
    _check_float("opacities", opacities, rows, means2d, "means2d")
    D = colors.shape[-1]
    if backgrounds is not None:
        _check_float("backgrounds", backgrounds, (C, D), means2d, "means2d")
    width = check_int("width", width, 1)
    height = check_int("height", height, 1)
    tile_size = _check_tile_size(tile_size)
    tw, th = ref.tile_grid(width, height, tile_size)
    _check_int32("isect_offsets", isect_offsets, (C, th, tw), means2d, "means2d")
    _check_int32("flatten_ids", flatten_ids, (None,), means2d, "means2d")
    _check_image_memory(C, width, height, tile_size, D, means2d.dtype, means2d.device)
    grad = _backend.records_grad(means2d, conics, colors, opacities, backgrounds)
    backend = _backend.resolve(backend, means2d.device, "rasterize_to_pixels", grad)
    # Value checks (finite inputs, opacities in [0, 1], flatten_ids and
    # isect_offsets ranges) run in the op body.
    absgrad = check_bool("absgrad", absgrad)
    render_colors, render_alphas, _, _ = _ops.rasterize_to_pixels(
        means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids,
        absgrad, backend,
    )  # fmt: skip
    return render_colors, render_alphas


def rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
    radius_clip: float = 0.0,
    tile_size: int = 16,
    *,
    max_intersections: int | None = None,
    packed: bool = False,
    absgrad: bool = False,
    backend: str | None = None,
):
    """Render N 3D Gaussians into C pinhole cameras (3D Gaussian Splatting, Kerbl et al. 2023).

    means [N, 3], quats [N, 4] (wxyz), scales [N, 3], opacities [N];
    colors [N, D] or [C, N, D] (``sh_degree=None``), or SH coefficients
    [N, K, 3] or [C, N, K, 3] with K >= (sh_degree + 1)^2 (colour =
    max(SH + 0.5, 0)); viewmats [C, 4, 4] world-to-camera; Ks [C, 3, 3];
    backgrounds [C, D].  ``render_mode``: "RGB", "D" (accumulated depth),
    "ED" (D / alpha), "RGB+D", "RGB+ED" (depth as the last channel).
    ``rasterize_mode="antialiased"`` multiplies opacities by the eps2d
    compensation (Mip-Splatting).

    Returns render_colors [C, H, W, D'], render_alphas [C, H, W, 1] and a meta
    dict (radii, means2d, depths, conics, opacities, tiles_per_gauss,
    isect_ids, flatten_ids, isect_offsets, tile_width, tile_height, ...).
    The tile lists are culled exactly, as on gsplat main's CUDA path: the
    conics and the blending opacities go to :func:`isect_tiles`, which keeps
    only the tiles of each bounding box that the alpha >= 1/255 ellipse
    reaches (the images and gradients are those of the box lists, which are
    longer).  ``max_intersections`` caps the number of (Gaussian, tile)
    pairs (ValueError past it; None: bounded by memory).  ``absgrad=True``:
    the backward sets ``meta["means2d"].absgrad`` [C, N, 2], the summed
    per-pixel |d loss / d means2d| that gsplat's densification reads.

    ``packed=True`` (gsplat's packed mode): after the projection only the
    nnz visible (camera, Gaussian) pairs go on, as packed rows; meta gains
    camera_ids and gaussian_ids [nnz] and its per-pair tensors (radii,
    means2d, depths, conics, opacities, tiles_per_gauss) are [nnz, ...].
    The images and the gradients are those of the unpacked call.

    NaN or inf in any input tensor is refused (ValueError naming it; inside a
    compiled graph the stage op that meets it names its own argument, e.g.
    ``coeffs`` for SH colours), so no NaN reaches the images.  The tile
    lists depend on the values, so meta tensors are refused.

    Example::

        img, alpha, meta = rasterization(means, quats, scales, opac, rgb, viewmats, Ks, 648, 420)
    """
    N = _check_gaussians(means, quats, scales, opacities)
    C, width, height = _check_camera(means, viewmats, Ks, width, height)
    near_plane, far_plane, eps2d, radius_clip = _check_planes(near_plane, far_plane, eps2d, radius_clip)
    tile_size = _check_tile_size(tile_size)
    if max_intersections is not None:
        max_intersections = check_int("max_intersections", max_intersections, 0)
    check_choice("render_mode", render_mode, ref.RENDER_MODES)
    absgrad = check_bool("absgrad", absgrad)
    packed = check_bool("packed", packed)
    check_choice("rasterize_mode", rasterize_mode, ref.RASTERIZE_MODES)
    check_tensor("colors", colors, FP32_64, FP32_64_WHAT)
    if sh_degree is None:
        _check_float("colors", colors, [(N, None), (C, N, None)], means)
        D = colors.shape[-1]
    else:
        sh_degree = check_int("sh_degree", sh_degree, 0, 3)
        hint = f" (SH coefficients, as sh_degree={sh_degree} is given)"
        _check_float("colors", colors, [(N, None, 3), (C, N, None, 3)], means, hint=hint)
        if colors.shape[-2] < (sh_degree + 1) ** 2:
            raise ValueError(
                f"colors has {colors.shape[-2]} SH bases but sh_degree {sh_degree} needs {(sh_degree + 1) ** 2}"
            )
        D = 3
    if backgrounds is not None:
        _check_float("backgrounds", backgrounds, (C, D), means)
    # The tile lists (their length, then every later shape) come from the values.
    check_has_values("means", means)
    if sh_degree is not None and has_values(viewmats):
        # The SH view directions start at the camera centre, inv(viewmats)[:, :3, 3].
        _, info = torch.linalg.inv_ex(viewmats)
        if bool((info != 0).any()):
            c = int((info != 0).nonzero()[0, 0])
            raise ValueError(
                f"viewmats must be invertible when sh_degree is given (the SH view directions need the "
                f"camera centre); viewmats[{c}] is singular"
            )
    # The projection's op body checks the Gaussians and cameras; the colours
    # and backgrounds are checked here under their own names (the stage ops
    # would call SH colours coeffs).
    check_finite("colors", colors)
    if backgrounds is not None:
        check_finite("backgrounds", backgrounds)
    D_out = {"RGB": D, "D": 1, "ED": 1}.get(render_mode, D + 1)
    _check_image_memory(C, width, height, tile_size, D_out, means.dtype, means.device)
    grad = _backend.records_grad(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    backend = _backend.resolve(backend, means.device, "rasterization", grad)

    antialiased = rasterize_mode == "antialiased"
    means2d, depths, conics, comp, radii = _ops.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        antialiased, backend,
    )  # fmt: skip
    packed_ids = {}
    if packed:
        # The visible pairs as rows; the [C, N] projection is not kept.
        cam, gid = pack_ids(radii)
        radii, means2d, depths, conics, comp = pack(cam, gid, radii, means2d, depths, conics, comp)
        cam_l, gid_l = cam.long(), gid.long()
        packed_ids = dict(camera_ids=cam, gaussian_ids=gid)
        opac = opacities[gid_l] * comp if antialiased else opacities[gid_l]
        if sh_degree is None:
            colors = colors[gid_l] if colors.dim() == 2 else colors[cam_l, gid_l]
        else:
            campos = torch.linalg.inv(viewmats)[:, :3, 3]
            dirs = means[gid_l] - campos[cam_l]
            coeffs = colors[gid_l] if colors.dim() == 3 else colors[cam_l, gid_l]
            rgb = _ops.spherical_harmonics(sh_degree, dirs, coeffs.contiguous(), None, backend)
            colors = (rgb + 0.5).clamp(min=0.0)
    else:
        cam = None
        opac = opacities[None, :] * comp if antialiased else opacities[None, :].expand(C, N)
        if sh_degree is None:
            colors = colors.expand(C, N, D) if colors.dim() == 2 else colors
        else:
            campos = torch.linalg.inv(viewmats)[:, :3, 3]
            dirs = means[None, :, :] - campos[:, None, :]
            coeffs = colors.expand(C, *colors.shape) if colors.dim() == 3 else colors
            rgb = _ops.spherical_harmonics(sh_degree, dirs, coeffs.contiguous(), (radii > 0).all(-1), backend)
            colors = (rgb + 0.5).clamp(min=0.0)
    colors, backgrounds = ref.with_depth_channel(colors, depths, backgrounds, render_mode)
    tile_width, tile_height = ref.tile_grid(width, height, tile_size)
    # Exact culling: conics and the opacities the blender sees (antialiased: times the compensation).
    tiles_per_gauss, isect_ids, flatten_ids = _ops.isect_tiles(
        means2d, radii, depths, tile_size, tile_width, tile_height, conics, opac, max_intersections, cam, C,
        backend,
    )  # fmt: skip
    offsets = _ops.isect_offset_encode(isect_ids, C, tile_width, tile_height, backend)
    render_colors, render_alphas, _, _ = _ops.rasterize_to_pixels(
        means2d, conics, colors.contiguous(), opac.contiguous(), backgrounds, width, height, tile_size, offsets,
        flatten_ids, absgrad, backend,
    )  # fmt: skip
    render_colors = ref.expected_depth(render_colors, render_alphas, render_mode)
    meta = dict(
        radii=radii, means2d=means2d, depths=depths, conics=conics, opacities=opac, tiles_per_gauss=tiles_per_gauss,
        isect_ids=isect_ids, flatten_ids=flatten_ids, isect_offsets=offsets, tile_width=tile_width,
        tile_height=tile_height, tile_size=tile_size, width=width, height=height, n_cameras=C, **packed_ids,
    )  # fmt: skip
    return render_colors, render_alphas, meta


__all__ = [
    "isect_offset_encode",
    "isect_tiles",
    "pack",
    "pack_ids",
    "project_gaussians",
    "rasterization",
    "rasterize_to_pixels",
    "spherical_harmonics",
]

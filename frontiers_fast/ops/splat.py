"""Gaussian splat rasterization: registered ops, autograd and argument checks.

Ops in the ``frontiers_fast::`` namespace (reference backend only for now;
later issues add kernels to these same schemas):

  project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane,
                    far_plane, radius_clip, antialiased) -> (means2d, depths, conics, compensations, radii)
  project_gaussians_bwd(<the same inputs>, grad_means2d, grad_depths, grad_conics, grad_compensations)
      -> (grad_means, grad_quats, grad_scales, grad_viewmats, grad_Ks)
  spherical_harmonics(degree, dirs, coeffs, masks?) -> colors
  spherical_harmonics_bwd(degree, dirs, coeffs, masks?, grad_colors) -> (grad_dirs, grad_coeffs)
  isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height)
      -> (tiles_per_gauss, isect_ids, flatten_ids)                        [no autograd]
  isect_offset_encode(isect_ids, n_images, tile_width, tile_height) -> isect_offsets   [no autograd]
  rasterize_to_pixels(means2d, conics, colors, opacities, backgrounds?, width, height, tile_size,
                      isect_offsets, flatten_ids) -> (render_colors, render_alphas)
  rasterize_to_pixels_bwd(<the same inputs>, grad_colors, grad_alphas)
      -> (grad_means2d, grad_conics, grad_colors, grad_opacities, grad_backgrounds)

Shapes are those of :mod:`frontiers_fast.reference.splat`.  A ``_bwd`` op
recomputes the reference forward under autograd; the blender's does so one
chunk of pixel blocks at a time, so its memory stays bounded like the
forward's (plain autograd through the reference would keep every chunk).
``grad_backgrounds`` is an empty [0] tensor when there is no background.

:func:`rasterization` composes the ops into gsplat's ``rasterization``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .. import _backend
from ..reference import splat as ref

NS = "frontiers_fast"
_ops = torch.ops.frontiers_fast
_FLOATS = (torch.float32, torch.float64)
IMPLEMENTED = ("reference",)


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


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
# projection
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::project_gaussians", mutates_args=())
def _project_op(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float,
    near_plane: float,
    far_plane: float,
    radius_clip: float,
    antialiased: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    radii, *rest = ref.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        antialiased,
    )  # fmt: skip
    # The integer radii come last: float outputs first keeps generic tooling
    # (opcheck's output sums) in floating point.
    return tuple(t.contiguous() for t in (*rest, radii))


@_project_op.register_fake
def _(
    means,
    quats,
    scales,
    opacities,
    viewmats,
    Ks,
    width,
    height,
    eps2d,
    near_plane,
    far_plane,
    radius_clip,
    aa,
):
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


@torch.library.custom_op(f"{NS}::project_gaussians_bwd", mutates_args=())
def _project_bwd_op(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float,
    near_plane: float,
    far_plane: float,
    radius_clip: float,
    antialiased: bool,
    grad_means2d: Tensor,
    grad_depths: Tensor,
    grad_conics: Tensor,
    grad_compensations: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_(True) for t in (means, quats, scales, viewmats, Ks)]
        m, q, s, v, k = leaves
        _, m2d, z, con, comp = ref.project_gaussians(
            m,
            q,
            s,
            opacities.detach(),
            v,
            k,
            width,
            height,
            eps2d,
            near_plane,
            far_plane,
            radius_clip,
            antialiased,
        )
        outs = [
            (o, g)
            for o, g in zip((m2d, z, con, comp), (grad_means2d, grad_depths, grad_conics, grad_compensations))
            if o.requires_grad
        ]  # classic mode's compensations are constant ones: no graph to walk
        grads = torch.autograd.grad([o for o, _ in outs], leaves, [g for _, g in outs], allow_unused=True)
    return tuple(_zeros_if_none(g, x).contiguous() for g, x in zip(grads, leaves))


@_project_bwd_op.register_fake
def _(means, quats, scales, opacities, viewmats, Ks, *rest):
    return tuple(torch.empty_like(t) for t in (means, quats, scales, viewmats, Ks))


def _project_setup(ctx, inputs, output):
    ctx.args = inputs[6:]
    ctx.save_for_backward(*inputs[:6])


def _project_backward(ctx, g_means2d, g_depths, g_conics, g_comp, _g_radii):
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
    )  # fmt: skip
    # Opacities only choose the (integer) radii: their gradient here is zero.
    return gm, gq, gs, None, gv, gk, None, None, None, None, None, None, None


_project_op.register_autograd(_project_backward, setup_context=_project_setup)


# ---------------------------------------------------------------------------
# spherical harmonics
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::spherical_harmonics", mutates_args=())
def _sh_op(degree: int, dirs: Tensor, coeffs: Tensor, masks: Tensor | None) -> Tensor:
    return ref.spherical_harmonics(degree, dirs, coeffs, masks).contiguous()


@_sh_op.register_fake
def _(degree, dirs, coeffs, masks):
    torch._check(dirs.shape[-1] == 3, lambda: "dirs must be [..., 3]")
    return dirs.new_empty(tuple(dirs.shape[:-1]) + (3,))


@torch.library.custom_op(f"{NS}::spherical_harmonics_bwd", mutates_args=())
def _sh_bwd_op(
    degree: int, dirs: Tensor, coeffs: Tensor, masks: Tensor | None, grad_colors: Tensor
) -> tuple[Tensor, Tensor]:
    with _autograd_inside_op():
        d = dirs.detach().requires_grad_(True)
        c = coeffs.detach().requires_grad_(True)
        out = ref.spherical_harmonics(degree, d, c, masks)
        gd, gc = torch.autograd.grad(out, (d, c), grad_colors, allow_unused=True)
    return _zeros_if_none(gd, d).contiguous(), _zeros_if_none(gc, c).contiguous()


@_sh_bwd_op.register_fake
def _(degree, dirs, coeffs, masks, grad_colors):
    return torch.empty_like(dirs), torch.empty_like(coeffs)


def _sh_setup(ctx, inputs, output):
    ctx.degree = inputs[0]
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])


def _sh_backward(ctx, grad):
    dirs, coeffs, masks = ctx.saved_tensors
    gd, gc = _ops.spherical_harmonics_bwd(ctx.degree, dirs, coeffs, masks, grad.contiguous())
    return None, gd, gc, None


_sh_op.register_autograd(_sh_backward, setup_context=_sh_setup)


# ---------------------------------------------------------------------------
# tile intersection (integer outputs, no autograd)
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::isect_tiles", mutates_args=())
def _isect_op(
    means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tile_width: int, tile_height: int
) -> tuple[Tensor, Tensor, Tensor]:
    # The value checks live in the op body: it runs on real tensors even
    # inside a compiled graph, where a data-dependent check in the public
    # function would break the trace (as in ops/moe.py).  Sizes first: they
    # are raised before any O(C N) work.
    ref.check_isect_sizes(depths.shape[0], depths.shape[1], tile_width * tile_height)
    _check_isect_values(means2d, radii, depths)
    return ref.isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height)


@_isect_op.register_fake
def _(means2d, radii, depths, tile_size, tile_width, tile_height):
    m = torch.library.get_ctx().new_dynamic_size()  # the number of overlaps depends on the data
    return (
        depths.new_empty(depths.shape, dtype=torch.int32),
        depths.new_empty((m,), dtype=torch.int64),
        depths.new_empty((m,), dtype=torch.int32),
    )


@torch.library.custom_op(f"{NS}::isect_offset_encode", mutates_args=())
def _offsets_op(isect_ids: Tensor, n_images: int, tile_width: int, tile_height: int) -> Tensor:
    return ref.isect_offset_encode(isect_ids, n_images, tile_width, tile_height)


@_offsets_op.register_fake
def _(isect_ids, n_images, tile_width, tile_height):
    return isect_ids.new_empty((n_images, tile_height, tile_width), dtype=torch.int32)


# ---------------------------------------------------------------------------
# blending
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::rasterize_to_pixels", mutates_args=())
def _raster_op(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    backgrounds: Tensor | None,
    width: int,
    height: int,
    tile_size: int,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
) -> tuple[Tensor, Tensor]:
    # Value checks in the op body: see _isect_op.
    _check_blend_values(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids)
    rc, ra = ref.rasterize_to_pixels(
        means2d, conics, colors, opacities, width, height, tile_size, isect_offsets, flatten_ids, backgrounds
    )
    return rc.contiguous(), ra.contiguous()


@_raster_op.register_fake
def _(means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids):
    torch._check(colors.dim() == 3, lambda: "colors must be [C, N, D]")
    C, D = colors.shape[0], colors.shape[2]
    return colors.new_empty((C, height, width, D)), colors.new_empty((C, height, width, 1))


@torch.library.custom_op(f"{NS}::rasterize_to_pixels_bwd", mutates_args=())
def _raster_bwd_op(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    backgrounds: Tensor | None,
    width: int,
    height: int,
    tile_size: int,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    grad_colors: Tensor,
    grad_alphas: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    C, N, D = colors.shape
    plan = ref.BlendPlan(means2d, conics, opacities, isect_offsets, flatten_ids, width, height, tile_size)
    order, chunks = ref.block_chunks(plan.count, plan.block**2)
    g_out = ref.image_to_blocks(grad_colors, plan)  # [B, P, D]; padding pixels carry no gradient
    # T_final enters as alpha = 1 - T and as T * background.
    g_T = -ref.image_to_blocks(grad_alphas, plan)[..., 0]
    per_cam = plan.blocks_w * plan.blocks_h
    if backgrounds is not None:
        g_T = g_T + (g_out * backgrounds.repeat_interleave(per_cam, 0)[:, None, :]).sum(-1)
    flat_shapes = ((C * N, 2), (C * N, 3), (C * N, D), (C * N,))
    leaves = [
        t.detach().reshape(shape).requires_grad_(True)
        for t, shape in zip((means2d, conics, colors, opacities), flat_shapes)
    ]
    acc = [torch.zeros_like(t) for t in leaves]
    g_bg = colors.new_zeros((C, D)) if backgrounds is not None else colors.new_zeros((0,))
    # One chunk at a time: recompute its forward with autograd, pull the
    # gradient back, free it.  Peak memory stays that of one forward chunk.
    for b, e, K in chunks:
        blocks = order[b:e]
        with _autograd_inside_op():
            out, T = ref.blend_blocks(blocks, K, plan, *leaves)
            # With no intersection at all the blend is constant (out 0, T 1):
            # no graph to walk, but the background still gets sum(g_out * T).
            grads = ()
            if out.requires_grad:
                loss = (out * g_out[blocks]).sum() + (T * g_T[blocks]).sum()
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a += g
        if backgrounds is not None:
            g_bg.index_add_(0, blocks // per_cam, torch.einsum("tp,tpd->td", T.detach(), g_out[blocks]))
    gm, gc, gcol, go = (a.reshape(t.shape) for a, t in zip(acc, (means2d, conics, colors, opacities)))
    return gm, gc, gcol, go, g_bg


@_raster_bwd_op.register_fake
def _(
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
    gc,
    ga,
):
    g_bg = torch.empty_like(backgrounds) if backgrounds is not None else colors.new_empty((0,))
    return (
        torch.empty_like(means2d),
        torch.empty_like(conics),
        torch.empty_like(colors),
        torch.empty_like(opacities),
        g_bg,
    )


def _raster_setup(ctx, inputs, output):
    ctx.args = inputs[5:8]
    ctx.has_bg = inputs[4] is not None
    ctx.save_for_backward(*inputs[:5], *inputs[8:])


def _raster_backward(ctx, g_colors, g_alphas):
    means2d, conics, colors, opacities, backgrounds, offsets, flatten_ids = ctx.saved_tensors
    C, D = colors.shape[0], colors.shape[2]
    W, H = ctx.args[0], ctx.args[1]
    g_colors = colors.new_zeros((C, H, W, D)) if g_colors is None else g_colors.contiguous()
    g_alphas = colors.new_zeros((C, H, W, 1)) if g_alphas is None else g_alphas.contiguous()
    gm, gc, gcol, go, gbg = _ops.rasterize_to_pixels_bwd(
        means2d, conics, colors, opacities, backgrounds, *ctx.args, offsets, flatten_ids, g_colors, g_alphas
    )
    return gm, gc, gcol, go, (gbg if ctx.has_bg else None), None, None, None, None, None


_raster_op.register_autograd(_raster_backward, setup_context=_raster_setup)


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def _is_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(name, t, shape, like=None, like_name="means", hint=""):
    """t is a float32/float64 tensor of ``shape`` (see :func:`_check_shape`), on ``like``'s device and dtype."""
    _is_tensor(name, t)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; they must match")
        if t.device != like.device:
            raise ValueError(
                f"{name} is on {t.device} but {like_name} is on {like.device}; they must be on one device"
            )
    _check_shape(name, t, shape, hint)


def _check_shape(name, t, shape, hint=""):
    """``shape`` is one shape (None = any size) or a list of alternatives."""
    shapes = shape if isinstance(shape, list) else [shape]
    if any(t.dim() == len(s) and all(w is None or w == d for w, d in zip(s, t.shape)) for s in shapes):
        return
    want = " or ".join("[" + ", ".join("*" if w is None else str(w) for w in s) + "]" for s in shapes)
    raise ValueError(f"{name} must have shape {want}{hint}, got {list(t.shape)}")


def _check_finite(name, t):
    # A value check syncs with the device; under torch.compile it is skipped
    # so that the traced graph has no data-dependent branch.
    if not torch.compiler.is_compiling() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _require_finite(name, t):
    # For op bodies: they run on real tensors, in eager mode and inside compiled graphs alike.
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _check_isect_values(means2d, radii, depths):
    _require_finite("means2d", means2d)
    _require_finite("depths", depths)
    # The keys sort the float32 bit patterns of the depths, which order only non-negative values.
    if depths.numel() and bool(((depths < 0) & (radii > 0).all(-1)).any()):
        raise ValueError("depths must be >= 0 where radii > 0 (the keys sort depths by their float32 bits)")


def _check_blend_values(means2d, conics, colors, opacities, backgrounds, isect_offsets, flatten_ids):
    for name, t in (("means2d", means2d), ("conics", conics), ("colors", colors), ("opacities", opacities)):
        _require_finite(name, t)
    if backgrounds is not None:
        _require_finite("backgrounds", backgrounds)
    C, N = opacities.shape
    M = flatten_ids.numel()
    if M:
        lo, hi = (int(v) for v in flatten_ids.aminmax())
        if lo < 0 or hi >= C * N:
            raise ValueError(f"flatten_ids must lie in [0, C * N) = [0, {C * N}), got values in [{lo}, {hi}]")
    # Tile t's run is offsets[t] : offsets[t + 1] (M for the last tile).
    starts = isect_offsets.reshape(-1)
    if starts.numel() and (
        int(starts[0]) < 0 or int(starts[-1]) > M or bool((starts[1:] < starts[:-1]).any())
    ):
        raise ValueError(
            f"isect_offsets must be non-decreasing (flattened over [C, tile_height, tile_width]) and lie in "
            f"[0, M] = [0, {M}] (M = flatten_ids.numel()), as isect_offset_encode returns them"
        )


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def _check_number(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return float(v)


def _check_camera(means, viewmats, Ks, width, height):
    _check_float("viewmats", viewmats, (None, 4, 4), means)
    C = viewmats.shape[0]
    if C == 0:
        raise ValueError("viewmats must hold at least one camera, got shape [0, 4, 4]")
    _check_float("Ks", Ks, (C, 3, 3), means)
    _check_int("width", width, 1)
    _check_int("height", height, 1)
    _check_finite("viewmats", viewmats)
    _check_finite("Ks", Ks)
    if not torch.compiler.is_compiling() and not bool(((Ks[:, 0, 0] > 0) & (Ks[:, 1, 1] > 0)).all()):
        raise ValueError("Ks must have positive focal lengths (Ks[:, 0, 0] and Ks[:, 1, 1] > 0)")
    return C


def _check_gaussians(means, quats, scales, opacities):
    _check_float("means", means, (None, 3))
    N = means.shape[0]
    _check_float("quats", quats, (N, 4), means)
    _check_float("scales", scales, (N, 3), means)
    _check_float("opacities", opacities, (N,), means)
    for name, t in (("means", means), ("quats", quats), ("scales", scales), ("opacities", opacities)):
        _check_finite(name, t)
    if not torch.compiler.is_compiling():
        if N and not bool((scales > 0).all()):
            raise ValueError("scales must be positive")
        if N:
            # F.normalize divides by max(|q|, eps): a shorter quaternion would
            # silently come out near the identity rotation instead of unit length.
            norms = torch.linalg.vector_norm(quats, dim=-1)
            if not bool((norms >= ref.QUAT_MIN_NORM).all()):
                i = int(torch.argmin(norms))
                raise ValueError(
                    f"quats must be non-zero with norm >= {ref.QUAT_MIN_NORM:g} (each is normalised); "
                    f"quats[{i}] has norm {float(norms[i]):.3g}"
                )
        if N and not bool(((opacities >= 0) & (opacities <= 1)).all()):
            raise ValueError("opacities must lie in [0, 1]")
    return N


def _check_planes(near_plane, far_plane, eps2d, radius_clip):
    near_plane = _check_number("near_plane", near_plane)
    far_plane = _check_number("far_plane", far_plane) if far_plane != math.inf else far_plane
    eps2d = _check_number("eps2d", eps2d)
    radius_clip = _check_number("radius_clip", radius_clip)
    if near_plane <= 0:
        raise ValueError(f"near_plane must be > 0, got {near_plane}")
    if not far_plane > near_plane:
        raise ValueError(f"far_plane must be > near_plane ({near_plane}), got {far_plane}")
    if eps2d < 0:
        raise ValueError(f"eps2d must be >= 0, got {eps2d}")
    if radius_clip < 0:
        raise ValueError(f"radius_clip must be >= 0, got {radius_clip}")
    return near_plane, far_plane, eps2d, radius_clip


def _resolve(backend, t, op):
    _backend.resolve(backend, t.device, op, implemented=IMPLEMENTED)


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
    backend: str | None = None,
):
    """Project N 3D Gaussians into C pinhole cameras (EWA splatting).

    means [N, 3], quats [N, 4] (w, x, y, z; normalised here), scales [N, 3] > 0,
    opacities [N] in [0, 1], viewmats [C, 4, 4] world-to-camera, Ks [C, 3, 3].

    Returns radii [C, N, 2] int32 (0 = culled), means2d [C, N, 2], depths [C, N],
    conics [C, N, 3] and compensations [C, N] (ones unless ``antialiased``).
    Differentiable with respect to means, quats, scales, viewmats and Ks.

    Example::

        radii, means2d, depths, conics, comp = project_gaussians(means, quats, scales, opac, viewmats, Ks, 640, 480)
    """
    _check_gaussians(means, quats, scales, opacities)
    _check_camera(means, viewmats, Ks, width, height)
    near_plane, far_plane, eps2d, radius_clip = _check_planes(near_plane, far_plane, eps2d, radius_clip)
    if not isinstance(antialiased, bool):
        raise TypeError(f"antialiased must be a bool, got {type(antialiased).__name__}")
    _resolve(backend, means, "project_gaussians")
    means2d, depths, conics, compensations, radii = _ops.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        antialiased,
    )  # fmt: skip
    return radii, means2d, depths, conics, compensations


def spherical_harmonics(
    degree: int, dirs: Tensor, coeffs: Tensor, masks: Tensor | None = None, *, backend=None
):
    """View-dependent colour [..., 3] from real SH of ``degree`` (0-3).

    dirs [..., 3] (normalised here), coeffs [..., K, 3] with K >= (degree + 1)^2,
    masks [...] bool (False gives 0).  Raw SH sum: :func:`rasterization` adds
    0.5 and clamps at 0.

    Example: ``rgb = spherical_harmonics(3, means - campos, sh)  # sh [N, 16, 3]``
    """
    _check_int("degree", degree, 0)
    if degree > 3:
        raise ValueError(f"degree must be in 0..3, got {degree}")
    _check_float("dirs", dirs, (None,) * (dirs.dim() - 1) + (3,) if isinstance(dirs, torch.Tensor) else ())
    batch = tuple(dirs.shape[:-1])
    _check_float("coeffs", coeffs, batch + (None, 3), dirs, "dirs")
    if coeffs.shape[-2] < (degree + 1) ** 2:
        raise ValueError(f"coeffs has {coeffs.shape[-2]} bases but degree {degree} needs {(degree + 1) ** 2}")
    if masks is not None:
        _is_tensor("masks", masks)
        if masks.dtype != torch.bool:
            raise TypeError(f"masks must be a bool tensor, got {masks.dtype}")
        _check_shape("masks", masks, batch)
        if masks.device != dirs.device:
            raise ValueError(f"masks is on {masks.device} but dirs is on {dirs.device}")
    _check_finite("dirs", dirs)
    _check_finite("coeffs", coeffs)
    _resolve(backend, dirs, "spherical_harmonics")
    return _ops.spherical_harmonics(degree, dirs, coeffs, masks)


def isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, *, backend=None):
    """Tile overlaps as sorted 64-bit keys (camera | tile | depth bits).

    means2d [C, N, 2] (finite), radii [C, N, 2] int32, depths [C, N] (finite,
    >= 0 where radii > 0).  Returns tiles_per_gauss [C, N] int32 (bounding-box
    tiles: see :func:`frontiers_fast.reference.splat.isect_tiles`), isect_ids
    [M] int64, flatten_ids [M] int32.  ValueError when the camera and tile
    fields need more than 31 bits, C * N > 2^31 or M >= 2^31.

    Example: ``tpg, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, 16, 40, 30)``
    """
    _check_float("means2d", means2d, (None, None, 2))
    C, N = means2d.shape[:2]
    _is_tensor("radii", radii)
    if radii.dtype != torch.int32:
        raise TypeError(f"radii must be int32, got {radii.dtype}")
    _check_shape("radii", radii, (C, N, 2))
    _check_float("depths", depths, (C, N), means2d, "means2d")
    for name, v in (("tile_size", tile_size), ("tile_width", tile_width), ("tile_height", tile_height)):
        _check_int(name, v, 1)
    if radii.device != means2d.device:
        raise ValueError(f"radii is on {radii.device} but means2d is on {means2d.device}")
    # The op body repeats this size check with concrete sizes (under
    # torch.compile C and N may be symbolic) and runs the value checks
    # (finite means2d and depths, depths >= 0).
    if not torch.compiler.is_compiling():
        ref.check_isect_sizes(C, N, tile_width * tile_height)
    _resolve(backend, means2d, "isect_tiles")
    return _ops.isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height)


def isect_offset_encode(isect_ids, n_images, tile_width, tile_height, *, backend=None):
    """Start of each tile's run in the sorted keys: [n_images, tile_height, tile_width] int32.

    Example: ``offsets = isect_offset_encode(isect_ids, C, 40, 30)``
    """
    _is_tensor("isect_ids", isect_ids)
    if isect_ids.dtype != torch.int64 or isect_ids.dim() != 1:
        raise TypeError(
            f"isect_ids must be a 1-D int64 tensor, got {isect_ids.dtype} of shape {list(isect_ids.shape)}"
        )
    for name, v in (("n_images", n_images), ("tile_width", tile_width), ("tile_height", tile_height)):
        _check_int(name, v, 1)
    _resolve(backend, isect_ids, "isect_offset_encode")
    return _ops.isect_offset_encode(isect_ids, n_images, tile_width, tile_height)


def rasterize_to_pixels(
    means2d, conics, colors, opacities, width, height, tile_size, isect_offsets, flatten_ids, backgrounds=None,
    *, backend=None,
):  # fmt: skip
    """Front-to-back alpha blending of projected Gaussians, tile by tile.

    means2d [C, N, 2], conics [C, N, 3], colors [C, N, D], opacities [C, N],
    isect_offsets [C, tile_height, tile_width] int32 (non-decreasing, in
    [0, M]), flatten_ids [M] int32 (in [0, C * N)), backgrounds [C, D] or
    None; float inputs finite.  Returns render_colors [C, H, W, D] and
    render_alphas [C, H, W, 1], differentiable with respect to means2d,
    conics, colors, opacities and backgrounds.

    Example: ``img, alpha = rasterize_to_pixels(means2d, conics, rgb, opac, 640, 480, 16, offsets, flatten_ids)``
    """
    _check_float("means2d", means2d, (None, None, 2))
    C, N = means2d.shape[:2]
    _check_float("conics", conics, (C, N, 3), means2d, "means2d")
    _check_float("colors", colors, (C, N, None), means2d, "means2d")
    _check_float("opacities", opacities, (C, N), means2d, "means2d")
    D = colors.shape[2]
    if backgrounds is not None:
        _check_float("backgrounds", backgrounds, (C, D), means2d, "means2d")
    _check_int("width", width, 1)
    _check_int("height", height, 1)
    _check_int("tile_size", tile_size, 1)
    tw, th = ref.tile_grid(width, height, tile_size)
    _is_tensor("isect_offsets", isect_offsets)
    if isect_offsets.dtype != torch.int32:
        raise TypeError(f"isect_offsets must be int32, got {isect_offsets.dtype}")
    _check_shape("isect_offsets", isect_offsets, (C, th, tw))
    _is_tensor("flatten_ids", flatten_ids)
    if flatten_ids.dtype != torch.int32:
        raise TypeError(f"flatten_ids must be int32, got {flatten_ids.dtype}")
    _check_shape("flatten_ids", flatten_ids, (None,))
    for name, t in (("isect_offsets", isect_offsets), ("flatten_ids", flatten_ids)):
        if t.device != means2d.device:
            raise ValueError(f"{name} is on {t.device} but means2d is on {means2d.device}")
    # Value checks (finite inputs, flatten_ids and isect_offsets ranges) run in the op body.
    _resolve(backend, means2d, "rasterize_to_pixels")
    return _ops.rasterize_to_pixels(
        means2d, conics, colors, opacities, backgrounds, width, height, tile_size, isect_offsets, flatten_ids
    )


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
    The tile lists come from each Gaussian's bounding box; gsplat main's CUDA
    path also passes conics and opacities to its tile test and drops the
    box's tiles that miss the alpha >= 1/255 ellipse, so its tiles_per_gauss
    and lists are shorter but the images and gradients are the same.

    Example::

        img, alpha, meta = rasterization(means, quats, scales, opac, rgb, viewmats, Ks, 648, 420)
    """
    N = _check_gaussians(means, quats, scales, opacities)
    C = _check_camera(means, viewmats, Ks, width, height)
    near_plane, far_plane, eps2d, radius_clip = _check_planes(near_plane, far_plane, eps2d, radius_clip)
    _check_int("tile_size", tile_size, 1)
    if render_mode not in ref.RENDER_MODES:
        raise ValueError(f"render_mode must be one of {ref.RENDER_MODES}, got {render_mode!r}")
    if rasterize_mode not in ref.RASTERIZE_MODES:
        raise ValueError(f"rasterize_mode must be one of {ref.RASTERIZE_MODES}, got {rasterize_mode!r}")
    _is_tensor("colors", colors)
    if sh_degree is None:
        _check_float("colors", colors, [(N, None), (C, N, None)], means)
        D = colors.shape[-1]
    else:
        _check_int("sh_degree", sh_degree, 0)
        if sh_degree > 3:
            raise ValueError(f"sh_degree must be in 0..3, got {sh_degree}")
        hint = f" (SH coefficients, as sh_degree={sh_degree} is given)"
        _check_float("colors", colors, [(N, None, 3), (C, N, None, 3)], means, hint=hint)
        if not torch.compiler.is_compiling():
            # The SH view directions start at the camera centre, inv(viewmats)[:, :3, 3].
            _, info = torch.linalg.inv_ex(viewmats)
            if bool((info != 0).any()):
                c = int((info != 0).nonzero()[0, 0])
                raise ValueError(
                    f"viewmats must be invertible when sh_degree is given (the SH view directions need the "
                    f"camera centre); viewmats[{c}] is singular"
                )
        if colors.shape[-2] < (sh_degree + 1) ** 2:
            raise ValueError(
                f"colors has {colors.shape[-2]} SH bases but sh_degree {sh_degree} needs {(sh_degree + 1) ** 2}"
            )
        D = 3
    _check_finite("colors", colors)
    if backgrounds is not None:
        _check_float("backgrounds", backgrounds, (C, D), means)
        _check_finite("backgrounds", backgrounds)
    _resolve(backend, means, "rasterization")

    antialiased = rasterize_mode == "antialiased"
    means2d, depths, conics, comp, radii = _ops.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        antialiased,
    )  # fmt: skip
    opac = opacities[None, :] * comp if antialiased else opacities[None, :].expand(C, N)
    if sh_degree is None:
        colors = colors.expand(C, N, D) if colors.dim() == 2 else colors
    else:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]
        dirs = means[None, :, :] - campos[:, None, :]
        coeffs = colors.expand(C, *colors.shape) if colors.dim() == 3 else colors
        rgb = _ops.spherical_harmonics(sh_degree, dirs, coeffs.contiguous(), (radii > 0).all(-1))
        colors = (rgb + 0.5).clamp(min=0.0)
    colors, backgrounds = ref.with_depth_channel(colors, depths, backgrounds, render_mode)
    tile_width, tile_height = ref.tile_grid(width, height, tile_size)
    tiles_per_gauss, isect_ids, flatten_ids = _ops.isect_tiles(
        means2d, radii, depths, tile_size, tile_width, tile_height
    )
    offsets = _ops.isect_offset_encode(isect_ids, C, tile_width, tile_height)
    render_colors, render_alphas = _ops.rasterize_to_pixels(
        means2d, conics, colors.contiguous(), opac.contiguous(), backgrounds, width, height, tile_size, offsets,
        flatten_ids,
    )  # fmt: skip
    render_colors = ref.expected_depth(render_colors, render_alphas, render_mode)
    meta = dict(
        radii=radii, means2d=means2d, depths=depths, conics=conics, opacities=opac, tiles_per_gauss=tiles_per_gauss,
        isect_ids=isect_ids, flatten_ids=flatten_ids, isect_offsets=offsets, tile_width=tile_width,
        tile_height=tile_height, tile_size=tile_size, width=width, height=height, n_cameras=C,
    )  # fmt: skip
    return render_colors, render_alphas, meta

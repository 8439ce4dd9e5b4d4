"""Reference 3D Gaussian splatting (Kerbl et al., SIGGRAPH 2023), plain PyTorch.

The renderer is split into the stages the kernels will implement:

1. :func:`project_gaussians` -- EWA projection of 3D Gaussians to 2D conics,
   with culling and an opacity-aware screen-space radius.
2. :func:`spherical_harmonics` -- view-dependent colour from SH coefficients.
3. :func:`isect_tiles` / :func:`isect_offset_encode` -- which tiles each
   Gaussian touches, as 64-bit sort keys, and where each tile's run starts.
4. :func:`rasterize_to_pixels` -- front-to-back alpha blending per tile.

:func:`rasterization` composes them.  Semantics follow gsplat's
``rasterization`` for a pinhole camera (main branch), with two choices
pinned by our issue where gsplat 1.5.3 differs:

* the blending alpha is clamped at 0.99, the value of the original 3DGS
  rasterizer (gsplat 1.5.3's kernels clamp at 0.999);
* the screen radius is ``ceil(min(3.33, sqrt(2 ln(255 o))) * sigma)`` per axis
  and Gaussians with ``o < 1/255`` are culled, as gsplat's CUDA projection
  does when given opacities (its Python ``_torch_impl`` uses ``3.33 * sigma``
  and no opacity culling, so the tests compare radii against the rule itself);
* the antialiased compensation is floored at ``MIN_COMPENSATION`` = 0.005,
  as on gsplat main (1.5.3 clamps at 0);
* the tile field of the intersection keys is ``bits_for_count(n_tiles) =
  (n_tiles - 1).bit_length()`` bits wide, as on gsplat main (1.5.3 takes
  ``n_tiles.bit_length()``: one bit more when n_tiles is a power of two).

Tile intersection follows gsplat main's CUDA path: :func:`rasterization`
passes the conics and opacities, so only the tiles that the ``alpha >=
1/255`` ellipse reaches are listed (see :func:`isect_tiles`; called without
them it lists each Gaussian's bounding box, as gsplat 1.5.3 and main's
PyTorch path do).  Images and gradients are the same either way.

Shapes: N Gaussians, C cameras, D colour channels, K SH coefficients per
channel ((degree + 1)^2 of them used), M tile intersections.  All float
inputs share one dtype (float32 or float64).  Every function is
differentiable by autograd in its float outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_memory

ALPHA_THRESHOLD = 1.0 / 255.0  # below this a Gaussian's contribution is dropped
MAX_ALPHA = 0.99  # keeps 1 - alpha >= 0.01, so log(1 - alpha) is always finite
T_MIN = 1e-4  # a pixel stops blending before its transmittance would reach this
MAX_EXTEND = 3.33  # radius in standard deviations when the opacity is high
FOV_CLAMP = 0.3  # the Jacobian is taken at most 30% of the half-FOV outside the image
# Floor of the antialiased compensation sqrt(det(cov2d) / det(cov2d + eps2d I)),
# gsplat main's MIN_COMPENSATION: a Gaussian that is flat on screen (det 0,
# e.g. a flat one seen edge-on) keeps a finite gradient and its culling
# follows gsplat's.
MIN_COMPENSATION = 0.005
QUAT_MIN_NORM = 1e-12  # F.normalize's eps: a shorter quaternion would not come out unit length

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")

# Real SH constants (Inria 3DGS convention), bands 0..3.
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


# ---------------------------------------------------------------------------
# projection
# ---------------------------------------------------------------------------
def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from (w, x, y, z) quaternions [..., 4] (normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1, eps=QUAT_MIN_NORM).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """Sigma = R S S^T R^T, [..., 3, 3], from quats [..., 4] and scales [..., 3].

    Example: ``quat_scale_to_covar(torch.tensor([1., 0, 0, 0]), torch.ones(3))`` is the identity.
    """
    m = quat_to_rotmat(quats) * scales.unsqueeze(-2)  # R S: column j scaled by s_j
    return m @ m.transpose(-1, -2)


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
):
    """EWA-project N Gaussians into C pinhole cameras.

    means [N, 3], quats [N, 4] (wxyz, any norm), scales [N, 3], opacities [N],
    viewmats [C, 4, 4] (world to camera), Ks [C, 3, 3].

    Returns ``radii`` [C, N, 2] int32 (0 where culled), ``means2d`` [C, N, 2],
    ``depths`` [C, N], ``conics`` [C, N, 3] (the upper triangle a, b, c of the
    inverse blurred 2D covariance) and ``compensations`` [C, N]
    (``sqrt(max(det(cov2d) / det(cov2d + eps2d I), 0.005^2))``, floored at
    ``MIN_COMPENSATION`` as in gsplat main; ones unless ``antialiased``).
    Culled entries have zero means2d, depths, conics and compensations, as
    gsplat's kernels leave them.

    The Jacobian is evaluated at x/z clamped to ``[-(cx/fx + 0.3 tan_x),
    (W - cx)/fx + 0.3 tan_x]`` with ``tan_x = W / (2 fx)`` (and likewise in
    y): 1.3 times the half field of view for a centred principal point,
    gsplat's formulation otherwise.  Culling: depth outside [near, far],
    det <= 0 after the eps2d blur, effective opacity < 1/255, both radii <=
    radius_clip, or the box off the image.

    Example: ``radii, m2d, z, conics, comp = project_gaussians(means, quats, scales, opac, V, K, 64, 48)``
    """
    R = viewmats[:, :3, :3]  # [C, 3, 3]
    t = viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]  # [C, N, 3]
    covar = quat_scale_to_covar(quats, scales)  # [N, 3, 3]
    covar_c = R[:, None] @ covar[None] @ R.transpose(-1, -2)[:, None]  # [C, N, 3, 3]

    x, y, z = means_c.unbind(-1)
    depth_ok = (z >= near_plane) & (z <= far_plane)
    # Culled Gaussians still flow through the graph; a safe depth keeps their
    # (discarded) values finite so their zero gradient stays zero, not NaN.
    zs = torch.where(depth_ok, z, torch.ones_like(z))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # The affine approximation degrades far outside the view: evaluate the
    # Jacobian at most FOV_CLAMP * tan(half-FOV) beyond the image border.
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    u = (x / zs).clamp(min=-(cx / fx + FOV_CLAMP * tan_x), max=(width - cx) / fx + FOV_CLAMP * tan_x)
    v = (y / zs).clamp(min=-(cy / fy + FOV_CLAMP * tan_y), max=(height - cy) / fy + FOV_CLAMP * tan_y)
    zero = torch.zeros_like(zs)
    J = torch.stack(
        [torch.stack([fx / zs, zero, -fx * u / zs], -1), torch.stack([zero, fy / zs, -fy * v / zs], -1)], -2
    )  # [C, N, 2, 3]
    cov2d = J @ covar_c @ J.transpose(-1, -2)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)

    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d  # low-pass filter: every splat covers about a pixel
    det = a * c - b * b
    det_ok = det > 0
    dets = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c / dets, -b / dets, a / dets], -1)
    comp = torch.sqrt((det_orig / dets).clamp(min=MIN_COMPENSATION**2))

    with torch.no_grad():
        opac = opacities[None, :] * (comp if antialiased else 1.0)
        opac_ok = opac >= ALPHA_THRESHOLD
        # Beyond sqrt(2 ln(255 o)) sigmas the Gaussian's alpha is under 1/255.
        extend = torch.sqrt(2.0 * torch.log(opac.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp(
            max=MAX_EXTEND
        )
        rx = torch.ceil(extend * torch.sqrt(a.clamp(min=0)))
        ry = torch.ceil(extend * torch.sqrt(c.clamp(min=0)))
        big_enough = (rx > radius_clip) | (ry > radius_clip)
        mx, my = means2d[..., 0], means2d[..., 1]
        on_image = (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        keep = depth_ok & det_ok & opac_ok & big_enough & on_image
        radii = torch.stack([rx, ry], -1).masked_fill(~keep[..., None], 0).to(torch.int32)

    kf = keep.to(means.dtype)
    compensations = comp if antialiased else torch.ones_like(comp)
    return radii, means2d * kf[..., None], z * kf, conics * kf[..., None], compensations * kf


# ---------------------------------------------------------------------------
# spherical harmonics
# ---------------------------------------------------------------------------
def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis [..., (degree + 1)^2] at unit directions dirs [..., 3]."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, -1)


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor, masks: Tensor | None = None) -> Tensor:
    """Colour [..., 3] = sum_k Y_k(dirs / |dirs|) coeffs[..., k, :] over the first (degree + 1)^2 bases.

    dirs [..., 3] (any length), coeffs [..., K, 3] with K >= (degree + 1)^2,
    masks [...] bool (False entries give 0).  No +0.5 offset or clamp here:
    :func:`rasterization` applies them, as gsplat does.

    Example: ``spherical_harmonics(0, d, sh)`` is ``0.2820948 * sh[..., 0, :]``.
    """
    nb = (degree + 1) ** 2
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))  # [..., nb]
    colors = (basis.unsqueeze(-1) * coeffs[..., :nb, :]).sum(-2)
    if masks is not None:
        colors = colors * masks.unsqueeze(-1).to(colors.dtype)
    return colors


# ---------------------------------------------------------------------------
# tile intersection
# ---------------------------------------------------------------------------
def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(tile_width, tile_height): tiles per row and per column, partial tiles included."""
    return -(-width // tile_size), -(-height // tile_size)


INT32_LIMIT = 1 << 31  # flatten_ids and isect_offsets are int32: every value must be below this


def bits_for_count(count: int) -> int:
    """Bits that index ``count`` items 0..count-1 (0 when count <= 1): gsplat main's field width.

    ``count - 1``, not ``count``: 8 tiles take 3 bits, not 4.
    """
    return (count - 1).bit_length() if count > 1 else 0


def check_isect_sizes(n_images: int, n_gaussians: int, n_tiles: int, packed_rows: int | None = None) -> None:
    """ValueError unless the keys and the int32 indices of :func:`isect_tiles` can hold this problem.

    Shapes only, so it costs nothing.  The camera and tile fields share the
    31 bits above the depth (bit 63 is the int64 sign: a key using it would
    sort first), and flatten_ids index the flattened [C * N] (packed: the
    ``packed_rows`` rows) with int32.
    """
    cam_bits, tile_bits = bits_for_count(n_images), bits_for_count(n_tiles)
    if cam_bits + tile_bits > 31:
        raise ValueError(
            f"means2d has {n_images} cameras and tile_width x tile_height is {n_tiles} tiles: "
            f"{cam_bits} + {tile_bits} bits do not fit in the 31 bits of the intersection keys above the depth; "
            "render fewer cameras per call or use a larger tile_size"
        )
    if packed_rows is not None:
        if packed_rows > INT32_LIMIT:
            raise ValueError(
                f"means2d has {packed_rows} packed rows, more than the int32 flatten_ids can index (2^31); "
                "render fewer cameras per call"
            )
    elif n_images * n_gaussians > INT32_LIMIT:
        raise ValueError(
            f"means2d has C * N = {n_images} x {n_gaussians} = {n_images * n_gaussians} (camera, Gaussian) "
            f"pairs, more than the int32 flatten_ids can index (2^31); render fewer cameras per call"
        )


def _depth_bits(depths: Tensor) -> Tensor:
    # Positive float32 values sort like their bit patterns read as integers.
    return depths.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


# Exact culling: a tile is listed only if the opacity-aware ellipse
# sigma <= ln(255 o) can reach one of its pixel centres.  The rasterizer
# evaluates sigma in its own dtype (float32 at worst): in any order of
# evaluation its rounding error is a few 2^-24 of S = |a| dx^2 / 2 +
# |c| dy^2 / 2 + |b dx dy|, the sum of the terms' magnitudes, which can far
# exceed sigma for a thin, long ellipse.  S <= (|a| + |b|) dx^2 / 2 + (|c| + |b|)
# dy^2 / 2, so the conic with its diagonal shrunk by EXACT_REL_MARGIN of those
# sums is below sigma - EXACT_REL_MARGIN * S everywhere: testing that conic
# covers every pixel whose rounded sigma could pass.  EXACT_ABS_MARGIN covers
# the rounding of exp, of o * exp(-sigma) against 1/255 and of this test
# (float64: 1e-16 of S, under 1e-4 while S < 1e12), and the 1e-9 of ln_upper.  1e-5 is 40 times the float32 error
# bound and grows a typical splat's ellipse by 5e-6 of its size.
EXACT_REL_MARGIN = 1e-5
EXACT_ABS_MARGIN = 1e-3
LN2 = 0.6931471805599453
LN_FLOOR = 2.0**-20  # ln_upper's argument is clamped here: ln < -13, far below any sigma that passes
ISECT_CHUNK = 1 << 22  # box intersections expanded at once: bounds the temporaries of isect_tiles


def ln_upper(x: Tensor) -> Tensor:
    """An upper bound (within 1e-9) of ln(max(x, 2^-20)), float64.

    Made of frexp, +, -, * and / alone, which round the same everywhere
    (torch.log's vectorised and scalar paths can differ in the last bit), so
    the C++ backend reproduces every bit: x = m 2^e with m in [0.5, 1), and
    ln m = 2 atanh(s) with s = (m - 1) / (m + 1) in [-1/3, 0), cut after s^15.
    Every term is negative, so the cut series lies above ln m.
    """
    m, e = torch.frexp(x.clamp(min=LN_FLOOR))
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = torch.full_like(s, 1.0 / 15)
    for k in (13, 11, 9, 7, 5, 3, 1):
        p = p * s2 + 1.0 / k
    return e.to(torch.float64) * LN2 + 2.0 * s * p


def exact_conics(conics: Tensor, opacities: Tensor):
    """Per Gaussian, the shrunk conic (a', b, c') of the exact test, float64, whether it is positive
    definite, and the threshold ln_upper(255 o) + EXACT_ABS_MARGIN.  Shapes: conics [..., 3], opacities [...]."""
    a, b, c = conics.detach().to(torch.float64).unbind(-1)
    ab = b.abs()
    ap = a - EXACT_REL_MARGIN * (a.abs() + ab)
    cp = c - EXACT_REL_MARGIN * (c.abs() + ab)
    pd = (ap > 0) & (ap * cp - b * b > 0)
    thr = ln_upper(255.0 * opacities.detach().to(torch.float64)) + EXACT_ABS_MARGIN
    return ap, b, cp, pd, thr


def _quad(ap, b, cp, dx, dy):
    return 0.5 * (ap * dx * dx + cp * dy * dy) + b * dx * dy


def tile_touched(mx, my, ap, b, cp, pd, thr, tx, ty, tile_size: int) -> Tensor:
    """Whether the shrunk ellipse ``q(d) <= thr`` reaches the rectangle of tile (tx, ty)'s pixel centres.

    The minimum of the quadratic q over the rectangle is 0 where the mean is
    inside; otherwise it lies on an edge, where the 1-D minimiser
    ``-b X / c'`` (on the edges x = X) or ``-b Y / a'`` is clamped to the
    edge.  A tile is dropped only when all four edge minima exceed thr and
    the mean is outside it (or thr < 0); a NaN keeps it, and so does a conic
    that is not positive definite.  All
    float64, in this operation order: the C++ backend repeats it step for step.
    """
    x0 = (tx * tile_size).to(torch.float64) + 0.5
    y0 = (ty * tile_size).to(torch.float64) + 0.5
    dx0, dy0 = x0 - mx, y0 - my
    dx1, dy1 = (x0 + (tile_size - 1)) - mx, (y0 + (tile_size - 1)) - my
    inside = (dx0 <= 0) & (dx1 >= 0) & (dy0 <= 0) & (dy1 >= 0)
    far = ~inside | (thr < 0)  # inside, the minimum is q(0) = 0
    for X in (dx0, dx1):
        y = torch.clamp(-(b * X) / cp, dy0, dy1)
        far &= _quad(ap, b, cp, X, y) > thr
    for Y in (dy0, dy1):
        x = torch.clamp(-(b * Y) / ap, dx0, dx1)
        far &= _quad(ap, b, cp, x, Y) > thr
    return ~pd | ~far


def _tile_boxes(means2d, radii, tile_size, tile_width, tile_height):
    """Per flattened Gaussian [C * N]: the first tile (x, y) of its box and the box's extent, int64 [C * N, 2]
    (0 where a radius is not positive).  Clamped to the grid in float64, before the int64 conversion."""
    m = means2d.detach().to(torch.float64).reshape(-1, 2) / tile_size
    r = radii.reshape(-1, 2).to(torch.float64) / tile_size
    grid = torch.tensor([tile_width, tile_height], dtype=torch.float64, device=means2d.device)
    lo = torch.minimum(torch.floor(m - r).clamp(min=0), grid).to(torch.int64)
    hi = torch.minimum(torch.ceil(m + r).clamp(min=0), grid).to(torch.int64)
    visible = (radii > 0).all(-1).reshape(-1, 1)
    return lo, (hi - lo) * visible


def box_intersections(
    means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int
) -> int:
    """M of the bounding-box tile lists (``isect_tiles`` without conics): to compare with the exact count."""
    _, span = _tile_boxes(means2d, radii, tile_size, tile_width, tile_height)
    return int((span[:, 0] * span[:, 1]).sum())


def check_isect_count(n_isects: int, max_intersections: int | None, device) -> None:
    """ValueError unless M = ``n_isects`` intersections fit: int32 indices, the cap, then memory.

    ``max_intersections`` None bounds M by the device's memory alone (the 12
    bytes of an isect_ids and a flatten_ids entry per intersection).
    """
    if n_isects >= INT32_LIMIT:
        raise ValueError(
            f"the Gaussians cover M = {n_isects} (Gaussian, tile) pairs, more than the int32 isect_offsets can "
            "index (2^31 - 1); use a larger tile_size or fewer Gaussians per call"
        )
    if max_intersections is not None and n_isects > max_intersections:
        raise ValueError(
            f"the Gaussians cover M = {n_isects} (Gaussian, tile) pairs, more than max_intersections = "
            f"{max_intersections}; raise max_intersections, use a larger tile_size or fewer Gaussians per call"
        )
    check_memory(f"the tile intersection list (M = {n_isects} (Gaussian, tile) pairs)", 12 * n_isects, device)


def isect_tiles(
    means2d: Tensor,
    radii: Tensor,
    depths: Tensor,
    tile_size: int,
    tile_width: int,
    tile_height: int,
    conics: Tensor | None = None,
    opacities: Tensor | None = None,
    max_intersections: int | None = None,
    image_ids: Tensor | None = None,
    n_images: int | None = None,
):
    """Sorted (camera, tile, depth) keys of every Gaussian-tile overlap.

    means2d [C, N, 2], radii [C, N, 2] int32, depths [C, N] (>= 0 where the
    radii are positive).  A Gaussian with a positive radius covers tiles
    ``floor((m - r) / ts) <= t < ceil((m + r) / ts)`` on each axis, clamped to
    the grid: its bounding box, as gsplat 1.5.3 and gsplat main's PyTorch
    path do.

    With ``conics`` [C, N, 3] and ``opacities`` [C, N] (the blending
    opacities; both or neither), the box's tiles are culled exactly, as
    gsplat main's CUDA ``rasterization`` does (its snug-box / AccuTile test):
    a tile is kept only if the ellipse ``sigma <= ln(255 o)``, where a pixel
    sees ``alpha >= 1/255``, reaches the rectangle of its pixel centres
    (:func:`tile_touched`, with a margin for rounding: ``EXACT_REL_MARGIN``).
    Every dropped tile has only pixels that skip the Gaussian, so rendered
    images and gradients are those of the box lists; ``tiles_per_gauss`` and
    the lists are shorter.  A conic that is not positive definite keeps its box.

    The key is ``camera << (32 + tile_bits) | tile << 32 | float32 bits of
    depth`` with ``tile_bits = bits_for_count(tile_width * tile_height)``, so
    one sort orders by camera, then tile (row-major), then depth front to
    back; ties keep the Gaussian order (intersections are generated Gaussian
    by Gaussian in flattened [C * N] order, each box row-major).

    The intersections are counted before anything of size M is allocated.
    Returns ``tiles_per_gauss`` [C, N] int32, ``isect_ids`` [M] int64 (sorted)
    and ``flatten_ids`` [M] int32 (index into the flattened [C * N]).
    Raises ValueError when the keys or int32 indices would overflow
    (:func:`check_isect_sizes`, and M >= 2^31), when M exceeds
    ``max_intersections``, or when the outputs would not fit in memory
    (:func:`check_isect_count`).

    Packed (gsplat's ``packed=True``): with ``image_ids`` [nnz] int32, the
    rows are nnz (camera, Gaussian) pairs: means2d [nnz, 2], radii [nnz, 2],
    depths [nnz], conics [nnz, 3], opacities [nnz], and row i's camera is
    ``image_ids[i]`` in [0, n_images).  tiles_per_gauss is [nnz] and
    flatten_ids index the rows.  With the rows in camera-major order (as
    :func:`pack` gives them) the keys are those of the unpacked call and the
    flatten_ids map through the rows to its flatten_ids.

    Example: ``tpg, ids, fid = isect_tiles(m2d, radii, z, 16, *tile_grid(W, H, 16), conics, opac)``
    """
    dev = means2d.device
    n_tiles = tile_width * tile_height
    if image_ids is None:
        C, N = depths.shape
        check_isect_sizes(C, N, n_tiles)
    else:
        C, N = n_images, depths.shape[0]
        check_isect_sizes(C, N, n_tiles, packed_rows=N)
    if (conics is None) != (opacities is None):
        raise ValueError(
            "conics and opacities must be given together (exact tile culling needs both) or not at all"
        )
    if max_intersections is not None and max_intersections < 0:
        raise ValueError(f"max_intersections must be >= 0 or None, got {max_intersections}")
    tile_bits = bits_for_count(n_tiles)
    lo, span = _tile_boxes(means2d, radii, tile_size, tile_width, tile_height)
    box = span[:, 0] * span[:, 1]  # [C * N]
    box_end = torch.cumsum(box, 0)
    box_start = box_end - box
    n_box = int(box_end[-1]) if box.numel() else 0
    exact = None
    if conics is not None and n_box:
        mean = means2d.detach().to(torch.float64).reshape(-1, 2)
        exact = (mean[:, 0], mean[:, 1], *exact_conics(conics.reshape(-1, 3), opacities.reshape(-1)))

    def chunks():
        # The box intersections, in Gaussian order and row-major inside each
        # box, ISECT_CHUNK at a time: (Gaussian, tile x, tile y, kept).
        for s in range(0, n_box, ISECT_CHUNK):
            idx = torch.arange(s, min(s + ISECT_CHUNK, n_box), device=dev)
            gid = torch.searchsorted(box_end, idx, right=True)
            j = idx - box_start[gid]  # rank of the tile inside its box
            w = span[gid, 0].clamp(min=1)
            tx, ty = lo[gid, 0] + j % w, lo[gid, 1] + j // w
            if exact is None:
                yield gid, tx, ty, None
            else:
                yield gid, tx, ty, tile_touched(*(t[gid] for t in exact), tx, ty, tile_size)

    if exact is None:
        count = box
    else:  # counted first: nothing of size M exists before the checks
        count = torch.zeros_like(box)
        for gid, _, _, keep in chunks():
            count.index_add_(0, gid, keep.to(torch.int64))
    n_isects = int(count.sum())
    check_isect_count(n_isects, max_intersections, dev)
    keys = torch.empty(n_isects, dtype=torch.int64, device=dev)
    ids = torch.empty(n_isects, dtype=torch.int32, device=dev)
    depth_bits = _depth_bits(depths).reshape(-1)
    pos = 0
    for gid, tx, ty, keep in chunks():
        if keep is not None:
            gid, tx, ty = gid[keep], tx[keep], ty[keep]
        k = gid.numel()
        cam = gid // N if image_ids is None else image_ids[gid].to(torch.int64)
        keys[pos : pos + k] = (cam << (32 + tile_bits)) | ((ty * tile_width + tx) << 32) | depth_bits[gid]
        ids[pos : pos + k] = gid
        pos += k
    keys, order = torch.sort(keys, stable=True)
    return count.reshape(depths.shape).to(torch.int32), keys, ids[order]


def isect_offset_encode(isect_ids: Tensor, n_images: int, tile_width: int, tile_height: int) -> Tensor:
    """Start of each (camera, tile)'s run in the sorted keys, [n_images, tile_height, tile_width] int32.

    An empty tile gets the start of the next non-empty one, so tile t's run is
    ``offsets.flatten()[t] : offsets.flatten()[t + 1]`` (M for the last).
    """
    n_tiles = tile_width * tile_height
    tile_bits = bits_for_count(n_tiles)
    hi = isect_ids >> 32
    linear = (hi >> tile_bits) * n_tiles + (hi & ((1 << tile_bits) - 1))
    want = torch.arange(n_images * n_tiles, device=isect_ids.device)
    return torch.searchsorted(linear, want).to(torch.int32).reshape(n_images, tile_height, tile_width)


# ---------------------------------------------------------------------------
# per-tile blending
# ---------------------------------------------------------------------------
CHUNK_ELEMENTS = 1 << 22  # pixels x padded list length per chunk: bounds peak memory
BLOCK = 4  # edge of the pixel blocks the blender works on (when it divides tile_size)


def tile_ranges(isect_offsets: Tensor, n_isects: int) -> tuple[Tensor, Tensor]:
    """(start, count) of every tile's run, flattened over [C * tile_height * tile_width]."""
    start = isect_offsets.reshape(-1).to(torch.int64)
    end = torch.cat([start[1:], start.new_tensor([n_isects])])
    return start, end - start


class BlendPlan:
    """Depth-ordered Gaussian lists for every block x block pixel block.

    Each tile's list is split among the tile's blocks, keeping only the
    Gaussians whose ``alpha >= 1/255`` region can reach a pixel centre of the
    block.  That region is the ellipse ``sigma <= ln(255 o)``, inside the box
    ``|dx| <= sqrt(2 ln(255 o) Sigma_xx)``, ``|dy| <= sqrt(2 ln(255 o) Sigma_yy)``
    (Sigma = conic^-1); a pixel outside the box sees alpha < 1/255 and would
    skip the Gaussian anyway, so the split changes no pixel.  A conic that is
    not positive definite keeps the whole tile.  Blocks only save work.

    Attributes: ``block``, ``blocks_w``, ``blocks_h`` (per camera), ``start``
    and ``count`` [C * blocks_h * blocks_w] into ``ids`` [M'] (flat C * N
    Gaussian indices) and ``isect`` [M'] (the intersection each entry came
    from: its index into flatten_ids).
    """

    def __init__(self, means2d, conics, opacities, isect_offsets, flatten_ids, width, height, tile_size):
        C = isect_offsets.shape[0]
        dev = means2d.device
        tw, th = tile_grid(width, height, tile_size)
        self.block = b = BLOCK if tile_size % BLOCK == 0 else tile_size
        per = tile_size // b  # blocks per tile edge
        self.blocks_w, self.blocks_h = tw * per, th * per
        n_blocks = C * self.blocks_w * self.blocks_h
        start, count = tile_ranges(isect_offsets, flatten_ids.numel())
        tile = torch.repeat_interleave(
            torch.arange(C * tw * th, device=dev), count
        )  # tile of each intersection
        g = flatten_ids.to(torch.int64)
        with torch.no_grad():
            # float64 and a small margin: the box only has to contain the region.
            a, bb, c = conics.detach().reshape(-1, 3)[g].double().unbind(-1)
            o = opacities.detach().reshape(-1)[g].double()
            m = means2d.detach().reshape(-1, 2)[g].double()
            det = a * c - bb * bb
            pd = (a > 0) & (det > 0)
            two_l = 2 * torch.log((255 * o).clamp(min=1e-30)).clamp(min=0)
            dets = torch.where(pd, det, 1.0)
            hx = torch.sqrt(two_l * c / dets).nan_to_num(0) * (1 + 1e-6) + 1e-3
            hy = torch.sqrt(two_l * a / dets).nan_to_num(0) * (1 + 1e-6) + 1e-3
            cam, local = tile // (tw * th), tile % (tw * th)
            x_lo, y_lo = (local % tw) * tile_size, (local // tw) * tile_size  # the tile's first pixel
            # Pixels j with |j + 0.5 - mean| <= half-width, kept inside the tile.
            j0 = torch.ceil(m[:, 0] - hx - 0.5).clamp(min=-1).to(torch.int64)
            j1 = torch.floor(m[:, 0] + hx - 0.5).clamp(max=width + tile_size).to(torch.int64)
            i0 = torch.ceil(m[:, 1] - hy - 0.5).clamp(min=-1).to(torch.int64)
            i1 = torch.floor(m[:, 1] + hy - 0.5).clamp(max=height + tile_size).to(torch.int64)
            j0 = torch.where(pd, torch.maximum(j0, x_lo), x_lo)
            j1 = torch.where(pd, torch.minimum(j1, x_lo + tile_size - 1), x_lo + tile_size - 1)
            i0 = torch.where(pd, torch.maximum(i0, y_lo), y_lo)
            i1 = torch.where(pd, torch.minimum(i1, y_lo + tile_size - 1), y_lo + tile_size - 1)
            bx0, by0 = j0.div(b, rounding_mode="floor"), i0.div(b, rounding_mode="floor")
            nbx = (j1.div(b, rounding_mode="floor") - bx0 + 1).clamp(min=0)
            nby = (i1.div(b, rounding_mode="floor") - by0 + 1).clamp(min=0)
            nbx = torch.where((j1 >= j0) & (i1 >= i0), nbx, 0)
            n = nbx * nby
            # Expand every intersection to its blocks (row-major), then order by
            # block; the sort is stable, so each block keeps its tile's depth order.
            isect = torch.repeat_interleave(torch.arange(g.numel(), device=dev), n)
            first = torch.cumsum(n, 0) - n
            k = torch.arange(isect.numel(), device=dev) - first[isect]
            w = nbx[isect].clamp(min=1)
            bx = bx0[isect] + k % w
            by = by0[isect] + k // w
            block_id = (cam[isect] * self.blocks_h + by) * self.blocks_w + bx
            block_id, order = torch.sort(block_id, stable=True)
            self.isect = isect[order]
            self.ids = g[self.isect]
            self.count = torch.bincount(block_id, minlength=n_blocks)
            self.start = torch.cumsum(self.count, 0) - self.count


def block_chunks(count: Tensor, pixels: int, chunk_elements: int = CHUNK_ELEMENTS):
    """Blocks ordered by list length, cut into chunks of at most ``chunk_elements``
    pixel-Gaussian pairs after padding each block to its chunk's longest list.

    Returns the order [B] and a list of (begin, end, K) over that order.
    """
    order = torch.argsort(count, stable=True)
    sorted_count = count[order].tolist()
    chunks, b, n = [], 0, len(sorted_count)
    while b < n:
        # Within a chunk the last (longest) block sets K; grow while it fits
        # and while padding wastes at most about a third of the chunk.
        e = b + 1
        cap = max(sorted_count[b] * 3 // 2, sorted_count[b] + 8)
        while (
            e < n
            and sorted_count[e] <= cap
            and (e + 1 - b) * pixels * max(sorted_count[e], 1) <= chunk_elements
        ):
            e += 1
        chunks.append((b, e, max(sorted_count[e - 1], 1)))
        b = e
    return order, chunks


def blend_blocks(
    blocks: Tensor, K: int, plan: BlendPlan, means2d, conics, colors, opacities, with_last=False, stash=None
):
    """Blend a chunk of blocks: returns (colour [nb, P, D], final transmittance [nb, P]).

    With ``with_last``, also each pixel's last blended Gaussian [nb, P] int64:
    its intersection (index into flatten_ids), -1 where none is blended.
    A ``stash`` dict receives the intermediates a per-pixel gradient needs:
    sigma [nb, P, K] (in the graph), dx and dy [nb, P, K], the conics
    [nb, K, 3], the Gaussian ids g [nb, K] and the valid mask [nb, K].

    ``blocks`` [nb] are flat (camera, block row, block column) indices into
    ``plan``; K >= their longest list.  means2d [C * N, 2], conics [C * N, 3],
    colors [C * N, D], opacities [C * N].  Everything is a [nb, P, K] tensor:
    each block's Gaussians are padded to K, and the per-pixel front-to-back
    loop becomes a cumulative sum of log(1 - alpha).
    """
    dev = means2d.device
    b = plan.block
    start, count = plan.start[blocks], plan.count[blocks]
    if plan.ids.numel() == 0:  # nothing reaches any pixel
        out = (
            colors.new_zeros((blocks.numel(), b * b, colors.shape[-1])),
            colors.new_ones((blocks.numel(), b * b)),
        )
        return (*out, torch.full((blocks.numel(), b * b), -1, device=dev)) if with_last else out
    k = torch.arange(K, device=dev)
    valid = k[None, :] < count[:, None]  # [nb, K]
    idx = (start[:, None] + k[None, :]).clamp(max=plan.ids.numel() - 1)
    g = torch.where(valid, plan.ids[idx], 0)

    local = blocks % (plan.blocks_w * plan.blocks_h)
    r = torch.arange(b, device=dev, dtype=means2d.dtype) + 0.5  # pixel centres inside a block
    px = ((local % plan.blocks_w) * b).to(means2d.dtype)[:, None] + r  # [nb, b] columns
    py = ((local // plan.blocks_w) * b).to(means2d.dtype)[:, None] + r  # [nb, b] rows

    mean, con = means2d[g], conics[g]  # [nb, K, 2], [nb, K, 3]
    opac = torch.where(valid, opacities[g], 0.0)  # padding gets alpha 0: below the cut, never used
    # sigma separates into a column term, a row term and one cross product, so
    # only the last step touches the full [nb, rows, cols, K] grid.
    dx = px[:, :, None] - mean[:, None, :, 0]  # [nb, b, K]
    dy = py[:, :, None] - mean[:, None, :, 1]
    sx = 0.5 * con[:, None, :, 0] * dx * dx
    sy = 0.5 * con[:, None, :, 2] * dy * dy
    bdy = con[:, None, :, 1] * dy
    sigma = (sy[:, :, None] + sx[:, None]) + bdy[:, :, None] * dx[:, None]  # [nb, b(y), b(x), K]
    sigma = sigma.reshape(-1, b * b, K)
    if stash is not None:
        P = b * b
        stash.update(
            sigma=sigma, con=con, g=g, valid=valid,
            dx=dx[:, None].expand(-1, b, b, K).reshape(-1, P, K), dy=dy[:, :, None].expand(-1, b, b, K).reshape(-1, P, K),
        )  # fmt: skip
    with torch.no_grad():
        sig_ok = sigma >= 0  # a non-positive-definite conic: skipped where sigma < 0
    # exp(-sigma) of a skipped sigma << 0 would overflow: its zero gradient
    # times inf is NaN.  Those pixels skip the Gaussian, so any finite value does.
    alpha = (opac[:, None, :] * torch.exp(-torch.where(sig_ok, sigma, 0.0))).clamp(max=MAX_ALPHA)
    with torch.no_grad():
        used = sig_ok & (alpha >= ALPHA_THRESHOLD)
    log1m = torch.log1p(-torch.where(used, alpha, 0.0))
    # Transmittance after each Gaussian as if no pixel had stopped.  It only
    # decreases, so the Gaussians at which it would reach T_MIN are the first
    # such one and everything after it: dropping them leaves the prefix sums
    # of the kept Gaussians, and so their weights, unchanged.
    log_t = torch.cumsum(log1m, -1)
    with torch.no_grad():
        keep = used & (log_t > math.log(T_MIN))
    weight = torch.where(keep, alpha * torch.exp(log_t - log1m), 0.0)  # alpha_k * T before k
    out = torch.bmm(weight, colors[g])  # [nb, P, D]
    final_t = torch.exp(torch.where(keep, log1m, 0.0).sum(-1))
    if not with_last:
        return out, final_t
    pos = torch.where(keep, k, -1).amax(-1)  # [nb, P]: list position of the last kept Gaussian
    at = (start[:, None] + pos.clamp(min=0)).clamp(max=plan.ids.numel() - 1)
    return out, final_t, torch.where(pos >= 0, plan.isect[at], -1)


def blocks_to_image(x: Tensor, plan: BlendPlan, C: int, width: int, height: int) -> Tensor:
    """[C * blocks_h * blocks_w, b * b, D] -> [C, height, width, D]."""
    b = plan.block
    x = x.reshape(C, plan.blocks_h, plan.blocks_w, b, b, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(C, plan.blocks_h * b, plan.blocks_w * b, -1)[:, :height, :width]


def image_to_blocks(img: Tensor, plan: BlendPlan) -> Tensor:
    """[C, H, W, D] -> [C * blocks_h * blocks_w, b * b, D], zero-padded to whole blocks."""
    C, H, W, D = img.shape
    b = plan.block
    img = F.pad(img, (0, 0, 0, plan.blocks_w * b - W, 0, plan.blocks_h * b - H))
    img = img.reshape(C, plan.blocks_h, b, plan.blocks_w, b, D).permute(0, 1, 3, 2, 4, 5)
    return img.reshape(C * plan.blocks_h * plan.blocks_w, b * b, D)


def rasterize_to_pixels(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    width: int,
    height: int,
    tile_size: int,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    backgrounds: Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    with_state: bool = False,
):
    """Front-to-back alpha blending of projected Gaussians into C images.

    means2d [C, N, 2], conics [C, N, 3], colors [C, N, D], opacities [C, N],
    isect_offsets [C, tile_height, tile_width] int32, flatten_ids [M] int32
    (from :func:`isect_tiles` / :func:`isect_offset_encode`), backgrounds [C, D].
    The four Gaussian tensors are read as tables of rows (flatten_ids index
    the rows; C is isect_offsets.shape[0]), so packed [nnz, ...] tables work
    as they are.

    Pixel (i, j) has centre (j + 0.5, i + 0.5) and walks its tile's list in
    order.  Per Gaussian: sigma = a dx^2 / 2 + c dy^2 / 2 + b dx dy (skipped
    if negative), alpha = min(0.99, o exp(-sigma)) (skipped below 1/255); a
    pixel stops before the Gaussian that would bring its transmittance T to
    1e-4 or below.  out = sum_k c_k alpha_k T_k + T_final * background.

    Returns render_colors [C, H, W, D] and render_alphas [C, H, W, 1] (1 - T_final).
    With ``with_state``, also what a back-to-front backward starts from:
    final_ts [C, H, W] (T_final itself: 1 - alpha would lose its low bits
    where T_final is small) and last_ids [C, H, W] int32, each pixel's last
    blended Gaussian as an index into flatten_ids (-1 if none).

    The Python loop runs over chunks of pixel blocks (see :class:`BlendPlan`;
    blocks sorted by list length so the padding is small), never over pixels
    or Gaussians.

    Example: ``img, alpha = rasterize_to_pixels(m2d, conics, rgb, opac, W, H, 16, offsets, fids)``
    """
    C, D = isect_offsets.shape[0], colors.shape[-1]
    plan = BlendPlan(means2d, conics, opacities, isect_offsets, flatten_ids, width, height, tile_size)
    order, chunks = block_chunks(plan.count, plan.block**2, chunk_elements)
    flat = (means2d.reshape(-1, 2), conics.reshape(-1, 3), colors.reshape(-1, D), opacities.reshape(-1))
    outs, trans, lasts = [], [], []
    for b, e, K in chunks:
        o, t, *last = blend_blocks(order[b:e], K, plan, *flat, with_last=with_state)
        outs.append(o)
        trans.append(t)
        lasts += last
    inv = torch.argsort(order)
    T = blocks_to_image(torch.cat(trans)[inv].unsqueeze(-1), plan, C, width, height)
    render_colors = blocks_to_image(torch.cat(outs)[inv], plan, C, width, height)
    if backgrounds is not None:
        render_colors = render_colors + T * backgrounds[:, None, None, :]
    if not with_state:
        return render_colors, 1.0 - T
    last_ids = blocks_to_image(torch.cat(lasts)[inv].unsqueeze(-1), plan, C, width, height)[..., 0]
    return render_colors, 1.0 - T, T[..., 0], last_ids.to(torch.int32)


# ---------------------------------------------------------------------------
# the whole renderer
# ---------------------------------------------------------------------------
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
    max_intersections: int | None = None,
):
    """Render N Gaussians into C cameras; see :func:`frontiers_fast.ops.splat.rasterization`.

    Returns (render_colors [C, H, W, D'], render_alphas [C, H, W, 1], meta).
    """
    C = viewmats.shape[0]
    antialiased = rasterize_mode == "antialiased"
    radii, means2d, depths, conics, comp = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        antialiased,
    )  # fmt: skip
    opac = opacities[None, :] * comp if antialiased else opacities[None, :].expand(C, -1)
    colors = view_colors(means, colors, viewmats, radii, sh_degree)
    colors, backgrounds = with_depth_channel(colors, depths, backgrounds, render_mode)
    tile_width, tile_height = tile_grid(width, height, tile_size)
    tiles_per_gauss, isect_ids, flatten_ids = isect_tiles(
        means2d, radii, depths, tile_size, tile_width, tile_height, conics, opac, max_intersections
    )
    offsets = isect_offset_encode(isect_ids, C, tile_width, tile_height)
    render_colors, render_alphas = rasterize_to_pixels(
        means2d, conics, colors, opac, width, height, tile_size, offsets, flatten_ids, backgrounds
    )
    render_colors = expected_depth(render_colors, render_alphas, render_mode)
    meta = dict(
        radii=radii, means2d=means2d, depths=depths, conics=conics, opacities=opac, tiles_per_gauss=tiles_per_gauss,
        isect_ids=isect_ids, flatten_ids=flatten_ids, isect_offsets=offsets, tile_width=tile_width,
        tile_height=tile_height, tile_size=tile_size, width=width, height=height, n_cameras=C,
    )  # fmt: skip
    return render_colors, render_alphas, meta


def view_colors(means, colors, viewmats, radii, sh_degree):
    """Per-camera colours [C, N, D]: broadcast plain colours, or evaluate SH from the camera centre."""
    C, N = radii.shape[:2]
    if sh_degree is None:
        return colors.expand(C, N, colors.shape[-1]) if colors.dim() == 2 else colors
    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = means[None, :, :] - campos[:, None, :]
    coeffs = colors.expand(C, *colors.shape) if colors.dim() == 3 else colors
    rgb = spherical_harmonics(sh_degree, dirs, coeffs, (radii > 0).all(-1))
    return (rgb + 0.5).clamp(min=0.0)  # the Inria convention: SH encode colour - 0.5


def with_depth_channel(colors, depths, backgrounds, render_mode):
    """Append (RGB+D, RGB+ED) or substitute (D, ED) the depth channel; depth has a zero background."""
    if render_mode == "RGB":
        return colors, backgrounds
    z = depths.unsqueeze(-1)
    if render_mode in ("D", "ED"):
        return z, (None if backgrounds is None else backgrounds.new_zeros(backgrounds.shape[0], 1))
    bg = (
        None
        if backgrounds is None
        else torch.cat([backgrounds, backgrounds.new_zeros(backgrounds.shape[0], 1)], -1)
    )
    return torch.cat([colors, z], -1), bg


def expected_depth(render_colors, render_alphas, render_mode):
    """ED modes: accumulated depth / accumulated alpha (alpha floored at 1e-10)."""
    if render_mode not in ("ED", "RGB+ED"):
        return render_colors
    return torch.cat([render_colors[..., :-1], render_colors[..., -1:] / render_alphas.clamp(min=1e-10)], -1)

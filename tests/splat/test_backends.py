"""The splatting stages with fast backends, on every backend, against the float64 reference.

Spherical harmonics (C++): every degree, batched and flat directions, more
bases than the degree needs, masks, directions of every length (including
zero, where F.normalize divides by its eps), float32 and float64; outputs
and the gradients of dirs and coeffs; opcheck, compile, fp64 gradcheck, and
the errors the reference entry gives (non-finite input).

Rasterization (C++): odd image sizes, tile sizes 2 to 32, one to three
cameras, 1 to 5 channels, with and without backgrounds, in scenes that hit
every branch of the blend (the 0.99 clamp, the 1e-4 stop, alphas under
1/255, conics that are not positive definite); the images, the backward's
state (T_final, each pixel's last Gaussian: exactly) and every gradient;
empty lists; opcheck, compile, fp64 gradcheck and the value errors.

Projection (C++): small scenes with one and three cameras, odd image sizes,
classic and antialiased, default planes and clipping ones (no blur, near and
far planes that cut, radius_clip), with Gaussians placed behind the camera,
beyond the far plane, off-screen, beyond the FOV clamp bound on every side
(kept), transparent, a needle on the compensation floor and a point with a
zero covariance; the radii exactly as the reference in the same dtype, the
outputs and every gradient against float64; fp64 gradcheck, opcheck,
compile, and every value the reference entry refuses, with its message.
Outputs are NaN-poisoned (FRONTIERS_FAST_DEBUG_POISON=1, set by conftest),
so an entry left unwritten fails the comparison.

Tile intersection and offsets (C++): all three outputs of isect_tiles and
the offsets equal the reference's bit for bit (one and three cameras, odd
image sizes, tiles of 8 and 16, bounding-box and exact culling, float32 and
float64), for 1 and 2 threads; every bad value the reference entries refuse
is refused with the same ValueError; opcheck and compile.
"""

import math
import re

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.reference import splat as ref

from ..helpers import assert_close, backend_cases, check_compiled, grads, opcheck
from .scenes import cameras, gaussians, isect_inputs, projected

ops = torch.ops.frontiers_fast
SH_CASES = backend_cases("spherical_harmonics")


def _sh_inputs(batch, K, gen, dtype=torch.float64):
    dirs = torch.randn(*batch, 3, generator=gen, dtype=torch.float64) * 3
    flat = dirs.view(-1, 3)
    if flat.shape[0] > 2:
        flat[0] = 0.0  # a zero direction: normalize divides by its eps
        flat[1] *= 1e-14  # below the eps too
        flat[2] *= 1e6
    coeffs = torch.randn(*batch, K, 3, generator=gen, dtype=torch.float64)
    masks = torch.rand(batch, generator=gen) > 0.3
    return dirs.to(dtype), coeffs.to(dtype), masks


@pytest.mark.parametrize("device,backend", SH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("batch,extra", [((1,), 0), ((37,), 3), ((3, 129), 0), ((2, 5, 7), 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_spherical_harmonics(degree, batch, extra, masked, dtype, device, backend):
    gen = torch.Generator().manual_seed(degree * 100 + len(batch) * 10 + extra)
    K = (degree + 1) ** 2 + extra
    dirs, coeffs, masks = _sh_inputs(batch, K, gen, dtype)
    m = masks.to(device) if masked else None
    d = dirs.to(device).requires_grad_(True)
    c = coeffs.to(device).requires_grad_(True)
    out = ff.spherical_harmonics(degree, d, c, m, backend=backend)
    rd = dirs.double().requires_grad_(True)
    rc = coeffs.double().requires_grad_(True)
    want = ref.spherical_harmonics(degree, rd, rc, masks if masked else None)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out.cpu(), want, dtype)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got = grads(out, [d, c], g.to(dtype).to(device))
    expect = grads(want, [rd, rc], g.to(dtype).double())
    # The directions below F.normalize's eps have gradients of ~1e12 (1 / eps): compared relative.
    tiny = dirs.view(-1, 3).norm(dim=-1) <= 1e-12
    gd, ed = got[0].cpu().view(-1, 3), expect[0].view(-1, 3)
    assert_close(gd[~tiny], ed[~tiny], dtype, msg="grad dirs")
    if tiny.any():
        assert_close(gd[tiny] * 1e-12, ed[tiny] * 1e-12, dtype, msg="grad dirs below the eps")
    assert_close(got[1].cpu(), expect[1], dtype, msg="grad coeffs")


@pytest.mark.parametrize("device,backend", SH_CASES)
def test_spherical_harmonics_gradcheck_and_registration(device, backend):
    gen = torch.Generator().manual_seed(7)
    dirs = torch.randn(6, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    coeffs = torch.randn(6, 17, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    masks = (torch.rand(6, generator=gen) > 0.3).to(device)
    for degree in (0, 1, 2, 3):
        for m in (None, masks):
            fn = lambda d, c, degree=degree, m=m: ff.spherical_harmonics(degree, d, c, m, backend=backend)
            assert torch.autograd.gradcheck(fn, (dirs, coeffs))
    for degree in (0, 3):
        opcheck(ops.spherical_harmonics, (degree, dirs, coeffs, masks, backend))
        opcheck(ops.spherical_harmonics, (degree, dirs, coeffs, None, backend))
    go = torch.randn(6, 3, dtype=torch.float64, device=device)
    opcheck(ops.spherical_harmonics_bwd, (2, dirs.detach(), coeffs.detach(), masks, go, backend), full=False)
    check_compiled(lambda d, c: ff.spherical_harmonics(3, d, c, masks, backend=backend).sum(), [dirs, coeffs])


@pytest.mark.parametrize("device,backend", SH_CASES)
def test_spherical_harmonics_refuses_non_finite(device, backend):
    dirs = torch.randn(4, 3, device=device)
    coeffs = torch.randn(4, 4, 3, device=device)
    for bad in (float("nan"), float("inf")):
        d = dirs.clone()
        d[2, 1] = bad
        with pytest.raises(ValueError, match="dirs must be finite"):
            ff.spherical_harmonics(1, d, coeffs, backend=backend)
        c = coeffs.clone()
        c[3, 0, 2] = bad
        # A masked-out entry is refused too: the reference would give NaN * 0 there.
        with pytest.raises(ValueError, match="coeffs must be finite"):
            ff.spherical_harmonics(
                1, dirs, c, torch.tensor([True, True, True, False], device=device), backend=backend
            )
    # direct op calls are checked the same way
    d = dirs.clone()
    d[0, 0] = float("nan")
    with pytest.raises(ValueError, match="dirs must be finite"):
        ops.spherical_harmonics(1, d, coeffs, None, backend)


# ---------------------------------------------------------------------------
# rasterize_to_pixels
# ---------------------------------------------------------------------------
RASTER_CASES = backend_cases("rasterize_to_pixels")


def _raster_scene(C, N, W, H, ts, D, gen_seed, dtype=torch.float64):
    """A projected random scene with every branch of the blend in it: opaque Gaussians (the 0.99
    clamp, pixels that stop at T = 1e-4), faint ones (alpha under 1/255), and a few conics that are
    not positive definite (sigma < 0 on part of the tile: skipped there)."""
    torch.manual_seed(gen_seed)
    means2d, conics, opac, _, _, radii, depths = projected(
        C, N, W, H, ts, scale=(0.05, 0.5), opacity=(0.0, 1.0)
    )

    # Three wide opaque Gaussians near the image centre: alpha 0.99 twice takes T to 1e-4, so the
    # pixels around their centres stop there.
    def extra(t, rows):  # rows [3, ...] appended to every camera
        rows = t.new_tensor(rows)
        return torch.cat([t, rows.expand(C, *rows.shape)], 1)

    centre = [[W / 2, H / 2], [W / 2 + 0.7, H / 2 - 0.4], [W / 2 - 0.3, H / 2]]
    means2d = extra(means2d, centre)
    conics = extra(conics, [[0.04, 0.01, 0.05]] * 3)
    radii = extra(radii, [[17, 15]] * 3)
    depths = extra(depths, [0.5, 0.6, 0.7])
    opac = extra(opac, [1.0, 1.0, 1.0])
    opac[:, ::7] = 1.0  # o e^-sigma > 0.99 near the centre: the clamp
    opac[:, 3::11] = 0.002  # never reaches 1/255
    conics[:, 5::13, 1] = 2.0 * (conics[:, 5::13, 0] * conics[:, 5::13, 2]).sqrt()  # b^2 > a c
    tw, th = ref.tile_grid(W, H, ts)
    _, ids, fids = ref.isect_tiles(means2d, radii, depths, ts, tw, th)
    offsets = ref.isect_offset_encode(ids, C, tw, th)
    N = N + 3
    colors = torch.rand(C, N, D, dtype=torch.float64)
    bg = torch.rand(C, D, dtype=torch.float64)
    return [t.to(dtype) for t in (means2d, conics, colors, opac, bg)], offsets, fids


@pytest.mark.parametrize("device,backend", RASTER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "C,N,W,H,ts,D,with_bg",
    [(1, 80, 37, 29, 16, 3, False), (3, 60, 50, 33, 8, 4, True), (2, 40, 20, 17, 4, 1, True),
     (2, 50, 40, 24, 16, 5, True), (1, 30, 9, 7, 2, 2, False), (1, 25, 70, 40, 32, 3, True)],
)  # fmt: skip
def test_rasterize_to_pixels(C, N, W, H, ts, D, with_bg, dtype, device, backend):
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(C, N, W, H, ts, D, 1000 * C + W)
    bg = bg if with_bg else None
    state = ops.rasterize_to_pixels(m2d, con, col, opac, bg, W, H, ts, offsets, fids, False, "reference")
    _, _, final_t, last = state
    assert (last >= 0).any(), "the scene should cover some pixels"
    assert bool(((final_t < 2e-4) & (last >= 0)).any()), "some pixel should stop at T = 1e-4"

    inputs = [m2d, con, col, opac] + ([bg] if with_bg else [])
    ours = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in inputs]
    theirs = [t.clone().requires_grad_(True) for t in inputs]

    def run(xs, b, dev):
        o, f = offsets.to(dev), fids.to(dev)
        return ff.rasterize_to_pixels(*xs[:4], W, H, ts, o, f, xs[4] if with_bg else None, backend=b)

    got = run(ours, backend, device)
    want = run(theirs, "reference", "cpu")
    for g, w, name in zip(got, want, ("render_colors", "render_alphas")):
        assert g.dtype == dtype
        assert_close(g.cpu(), w, dtype, msg=name)
    # The state the backward starts from: T_final, and the last Gaussian of every pixel exactly.
    fast = ops.rasterize_to_pixels(*[t.detach() for t in ours[:4]], ours[4].detach() if with_bg else None, W, H,
                                   ts, offsets.to(device), fids.to(device), False, backend)  # fmt: skip
    assert_close(fast[2].cpu(), final_t, dtype, msg="final_ts")
    assert torch.equal(fast[3].cpu(), last), "last_ids"
    seeds = [torch.randn_like(w) for w in want]
    g_got = grads(list(got), ours, [s.to(device=device, dtype=dtype) for s in seeds])
    g_want = grads(list(want), theirs, seeds)
    for g, w, name in zip(g_got, g_want, ("means2d", "conics", "colors", "opacities", "backgrounds")):
        assert_close(g.cpu(), w, dtype, msg=f"grad {name}")


@pytest.mark.parametrize("device,backend", RASTER_CASES)
def test_rasterize_to_pixels_empty(device, backend):
    # No intersection at all, and no Gaussian at all: background everywhere, and zero gradients.
    W, H, ts = 13, 10, 4
    for N in (5, 0):
        m2d = torch.rand(2, N, 2, dtype=torch.float64, device=device).requires_grad_(True)
        con = torch.ones(2, N, 3, dtype=torch.float64, device=device).requires_grad_(True)
        col = torch.rand(2, N, 3, dtype=torch.float64, device=device).requires_grad_(True)
        opac = torch.rand(2, N, dtype=torch.float64, device=device).requires_grad_(True)
        bg = torch.rand(2, 3, dtype=torch.float64, device=device).requires_grad_(True)
        offsets = torch.zeros(2, 3, 4, dtype=torch.int32, device=device)
        fids = torch.zeros(0, dtype=torch.int32, device=device)
        rc, ra = ff.rasterize_to_pixels(m2d, con, col, opac, W, H, ts, offsets, fids, bg, backend=backend)
        assert torch.equal(rc, bg[:, None, None, :].expand(2, H, W, 3))
        assert torch.equal(ra, torch.zeros(2, H, W, 1, dtype=torch.float64, device=device))
        g = grads([rc], [m2d, con, col, opac, bg], [torch.ones_like(rc)])
        for t in g[:4]:
            assert torch.equal(t, torch.zeros_like(t))
        assert torch.equal(g[4], torch.full_like(bg, float(H * W)))


@pytest.mark.parametrize("device,backend", RASTER_CASES)
def test_rasterize_to_pixels_gradcheck_and_registration(device, backend):
    w, h, ts = 11, 9, 8
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 8, w, h, ts, 2, 5)
    offsets, fids = offsets.to(device), fids.to(device)
    leaves = [t.to(device).requires_grad_(True) for t in (m2d, con, col, opac.clamp(0.3, 0.8), bg)]

    def fn(m, c, cl, o, b):
        return ff.rasterize_to_pixels(m, c, cl, o, w, h, ts, offsets, fids, b, backend=backend)

    # fast_mode checks random projections of the Jacobian (the full one takes a backward per pixel).
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    for b in (leaves[4], None):
        args = (*leaves[:4], b, w, h, ts, offsets, fids, b is None, backend)
        opcheck(ops.rasterize_to_pixels, args)
        _, _, final_t, last = ops.rasterize_to_pixels(*args)
        gc = torch.randn(2, h, w, 2, dtype=torch.float64, device=device)
        ga = torch.randn(2, h, w, 1, dtype=torch.float64, device=device)
        bwd_args = (*[t.detach() for t in leaves[:4]], None if b is None else b.detach(), w, h, ts, offsets, fids,
                    b is None, final_t, last, gc, ga, backend)  # fmt: skip
        opcheck(ops.rasterize_to_pixels_bwd, bwd_args, full=False)
    check_compiled(lambda *xs: fn(*xs)[0].square().sum(), leaves)


@pytest.mark.parametrize("device,backend", RASTER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rasterize_to_pixels_absgrad(dtype, device, backend):
    # absgrad: sum over pixels of |d loss / d means2d| per pixel (gsplat's densification signal), set on
    # means2d by the backward.  Against a brute force: one backward per pixel, float64.
    W, H, ts = 14, 11, 4
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(1, 12, W, H, ts, 3, 21)
    seed = torch.randn(1, H, W, 3, dtype=torch.float64)
    want = torch.zeros_like(m2d)
    for i in range(H):
        for j in range(W):
            m = m2d.clone().requires_grad_(True)
            img, _ = ff.rasterize_to_pixels(
                m, con, col, opac, W, H, ts, offsets, fids, bg, backend="reference"
            )
            (g,) = torch.autograd.grad((img[0, i, j] * seed[0, i, j]).sum(), m)
            want += g.abs()
    m = m2d.to(device=device, dtype=dtype).requires_grad_(True)
    xs = [t.to(device=device, dtype=dtype) for t in (con, col, opac, bg)]
    img, _ = ff.rasterize_to_pixels(m, *xs[:3], W, H, ts, offsets.to(device), fids.to(device), xs[3], absgrad=True,
                                    backend=backend)  # fmt: skip
    (g,) = torch.autograd.grad(img, m, seed.to(device=device, dtype=dtype))
    assert_close(m.absgrad.cpu(), want, dtype, msg="absgrad")
    assert bool((m.absgrad >= g.abs() * (1 - 1e-5)).all())  # |sum| <= sum of |.|
    assert bool((want > 0).any())
    # without absgrad nothing is set
    m2 = m.detach().clone().requires_grad_(True)
    img, _ = ff.rasterize_to_pixels(
        m2, *xs[:3], W, H, ts, offsets.to(device), fids.to(device), xs[3], backend=backend
    )
    img.sum().backward()
    assert not hasattr(m2, "absgrad")


@pytest.mark.parametrize("device,backend", RASTER_CASES)
def test_rasterize_to_pixels_refuses_bad_values(device, backend):
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 10, 16, 12, 8, 3, 9, torch.float32)
    args = [t.to(device) for t in (m2d, con, col, opac)] + [
        16,
        12,
        8,
        offsets.to(device),
        fids.to(device),
        bg,
    ]
    ff.rasterize_to_pixels(*args, backend=backend)  # the unmodified call is fine
    for i, name in enumerate(("means2d", "conics", "colors", "opacities")):
        for bad in (float("nan"), float("inf")):
            x = args[i].clone()
            x.view(-1)[3] = bad
            with pytest.raises(ValueError, match=f"{name} must be finite"):
                ff.rasterize_to_pixels(*args[:i], x, *args[i + 1 :], backend=backend)
    with pytest.raises(ValueError, match=r"opacities must lie in \[0, 1\]"):
        ff.rasterize_to_pixels(*args[:3], args[3] * 1.5 + 0.01, *args[4:], backend=backend)
    CN = args[3].numel()
    with pytest.raises(
        ValueError, match=rf"flatten_ids must lie in \[0, {CN - 1}\] \(indices into the C \* N"
    ):
        ff.rasterize_to_pixels(*args[:8], args[8] + CN, args[9], backend=backend)
    with pytest.raises(ValueError, match="isect_offsets must be non-decreasing"):
        ff.rasterize_to_pixels(*args[:7], args[7].flip(-1).contiguous(), *args[8:], backend=backend)


# ---------------------------------------------------------------------------
# projection
# ---------------------------------------------------------------------------
PROJ_CASES = backend_cases("project_gaussians")
PLANES = {
    "default": {},
    # no blur (a zero covariance has det 0), a near and a far plane that cut, small radii clipped
    "clipped": dict(eps2d=0.0, near_plane=0.5, far_plane=20.0, radius_clip=3.0),
}


def _proj_scene(C, W, H, dtype, blur=True, tiny=None):
    """C cameras about 4 units from the origin, random Gaussians, and ones placed to hit every branch.

    Returns the float64 inputs (means, quats, scales, opacities, viewmats, Ks),
    rounded to ``dtype``, and the index of each special Gaussian.  The
    specials sit in camera 0's frame (the others differ by a small rotation):
    behind the camera, beyond the far plane of "clipped", off-screen and
    small, large and centred beyond the 1.3x FOV bound on each side and in a
    corner (kept, their Jacobian clamped), below 1/255 opacity, at 1/255 and
    a little, a needle (thin enough that the antialiased compensation sits
    on its 0.005 floor, yet its widths still move that det; not with
    ``blur=False``, where its det would be a rounding error in float32) and
    a point (zero covariance: det 0 without blur).
    """
    viewmats, Ks = cameras(C, W, H)
    means, quats, scales, opacities = gaussians(60, extent=2.5)
    tiny = tiny if tiny is not None else (1e-30 if dtype == torch.float32 else 1e-200)
    R, t = viewmats[0, :3, :3], viewmats[0, :3, 3]
    fx, fy, cx, cy = (float(Ks[0, i, j]) for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    # x/z, y/z 0.4 (in units of the half field of view) past the clamp bound of each side
    ux = ((W - cx) / fx * 1.3 + 0.4 * W / (2 * fx), -(cx / fx * 1.3 + 0.4 * W / (2 * fx)))
    uy = ((H - cy) / fy * 1.3 + 0.4 * H / (2 * fy), -(cy / fy * 1.3 + 0.4 * H / (2 * fy)))
    special = {  # name: (camera-space mean, scales, opacity)
        "behind": ([0.1, 0.0, -0.5], [0.2] * 3, 0.8),
        "far": ([0.0, 0.2, 30.0], [0.3] * 3, 0.8),
        "off_screen": ([4.0 * ux[0] * 2, 0.0, 4.0], [0.05] * 3, 0.8),
        "clamp_right": ([4.0 * ux[0], 0.1, 4.0], [1.2, 0.6, 0.9], 0.9),
        "clamp_left": ([4.0 * ux[1], -0.1, 4.0], [0.7, 1.1, 0.8], 0.9),
        "clamp_bottom": ([0.2, 4.0 * uy[0], 4.0], [1.0, 1.0, 0.6], 0.9),
        "clamp_corner": ([4.0 * ux[1], 4.0 * uy[1], 4.0], [1.2, 1.0, 0.9], 0.9),
        "transparent": ([0.0, 0.1, 4.0], [0.2] * 3, 0.003),
        "faint": ([0.1, 0.1, 4.0], [0.2] * 3, 0.0045),
        "point": ([-0.2, 0.1, 3.0], [tiny] * 3, 0.9),
    }
    if blur:
        special["needle"] = ([0.3, -0.2, 3.5], [1e-4, 1e-4, 0.4], 0.9)
    extra = torch.tensor([p for p, _, _ in special.values()], dtype=torch.float64)
    means = torch.cat([means, (extra - t) @ R])  # camera 0 -> world
    quats = torch.cat([quats, torch.randn(len(special), 4, dtype=torch.float64)])
    scales = torch.cat([scales, torch.tensor([s for _, s, _ in special.values()], dtype=torch.float64)])
    opacities = torch.cat([opacities, torch.tensor([o for _, _, o in special.values()], dtype=torch.float64)])
    index = {name: 60 + i for i, name in enumerate(special)}
    inputs = [t.to(dtype).double() for t in (means, quats, scales, opacities, viewmats, Ks)]
    return inputs, index


def _fov_clamped(means, viewmats, Ks, W, H):
    """[C, N] bool: x/z or y/z outside the reference's clamp bounds (float64)."""
    p = torch.einsum("cij,nj->cni", viewmats[:, :3, :3], means) + viewmats[:, None, :3, 3]
    fx, fy, cx, cy = (Ks[:, i, j, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    u, v = p[..., 0] / p[..., 2], p[..., 1] / p[..., 2]
    fc = ref.FOV_CLAMP
    out_x = (u < -(cx / fx + fc * W / (2 * fx))) | (u > (W - cx) / fx + fc * W / (2 * fx))
    out_y = (v < -(cy / fy + fc * H / (2 * fy))) | (v > (H - cy) / fy + fc * H / (2 * fy))
    return out_x | out_y


@pytest.mark.parametrize("device,backend", PROJ_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C,W,H", [(1, 33, 25), (3, 47, 31)])
@pytest.mark.parametrize("antialiased", [False, True])
@pytest.mark.parametrize("planes", list(PLANES))
def test_project_gaussians(C, W, H, antialiased, planes, dtype, device, backend):
    kw = dict(PLANES[planes], antialiased=antialiased)
    inputs, idx = _proj_scene(C, W, H, dtype, blur=planes == "default")
    leaves = [t.to(dtype).to(device).requires_grad_(True) for t in inputs]
    radii, *out = ff.project_gaussians(*leaves, W, H, **kw, backend=backend)
    radii, out = radii.cpu(), [o.cpu() for o in out]
    # The integer radii follow the reference run in the same dtype exactly.
    same = ref.project_gaussians(*(t.to(dtype) for t in inputs), W, H, **kw)
    assert radii.dtype == torch.int32 and torch.equal(radii, same[0])
    ref_in = [t.clone().requires_grad_(True) for t in inputs]
    want_radii, *want = ref.project_gaussians(*ref_in, W, H, **kw)
    keep = (radii > 0).all(-1)
    assert torch.equal(keep, (want_radii > 0).all(-1))

    # Every branch is taken: culled by depth, by the image border and by
    # opacity; kept with the Jacobian clamped; the compensation floor; det
    # and radius_clip culling without blur.
    cull = ~keep
    assert cull[:, idx["behind"]].all() and cull[:, idx["off_screen"]].all()
    assert cull[:, idx["transparent"]].all()
    clamped = _fov_clamped(*(t.double() for t in (inputs[0], inputs[4], inputs[5])), W, H)
    for side in ("clamp_right", "clamp_left", "clamp_bottom", "clamp_corner"):
        assert keep[0, idx[side]] and clamped[0, idx[side]], side
    assert keep.sum() > 20 * C
    if planes == "clipped":
        assert cull[:, idx["far"]].all() and cull[:, idx["point"]].all()  # det 0: no blur to lift it
        no_clip = ref.project_gaussians(*(t.to(dtype) for t in inputs), W, H, **{**kw, "radius_clip": 0.0})[0]
        assert ((no_clip > 0).all(-1) & cull).any()  # radius_clip culls some
    else:
        assert keep[:, idx["far"]].all() and keep[:, idx["point"]].all()
        if antialiased:
            assert (out[3][:, idx["needle"]] == ref.MIN_COMPENSATION).all()
    if not antialiased and planes == "default":
        assert keep[:, idx["faint"]].all()  # 0.0045 >= 1/255; antialiased it may fall below

    for name, a, b in zip(("means2d", "depths", "conics", "compensations"), out, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, msg=name)
        assert (a[cull] == 0).all(), f"culled {name} are not zero"
    # Gradients of every output against float64 autograd (classic
    # compensations are constant ones: the seed given them must be ignored).
    seeds = [torch.randn(b.shape, dtype=torch.float64) for b in want]
    loss = sum((a * s.to(dtype)).sum() for a, s in zip(out, seeds))
    got = grads(loss, leaves, torch.ones((), dtype=dtype))
    expect = grads(
        sum((b * s).sum() for b, s in zip(want, seeds)), ref_in, torch.ones((), dtype=torch.float64)
    )
    for name, a, b in zip(("means", "quats", "scales", "opacities", "viewmats", "Ks"), got, expect):
        assert_close(a.cpu(), b, dtype, msg=f"grad {name}")


def _proj_args(inputs, W, H, antialiased, backend):
    """The positional arguments of the project_gaussians op (default planes)."""
    return (*inputs, W, H, 0.3, 0.01, 1e10, 0.0, antialiased, backend)


@pytest.mark.parametrize("device,backend", PROJ_CASES)
def test_project_gaussians_gradcheck_and_registration(device, backend):
    W, H = 21, 15
    # A small scene with every special; the needle and point keep clear of
    # gradcheck's 1e-6 steps (scales stay positive, culling does not flip).
    inputs, idx = _proj_scene(2, W, H, torch.float64, tiny=1e-3)
    keep = torch.arange(inputs[0].shape[0]) % 6 == 0
    keep[list(idx.values())] = True
    inputs = [t[keep] for t in inputs[:4]] + inputs[4:]
    means, quats, scales, opac, viewmats, Ks = (
        t.to(device).requires_grad_(i != 3) for i, t in enumerate(inputs)
    )
    leaves = [means, quats, scales, viewmats, Ks]
    for aa in (False, True):

        def fn(m, q, s, v, k, aa=aa):
            return ff.project_gaussians(m, q, s, opac, v, k, W, H, antialiased=aa, backend=backend)[1:]

        radii = ff.project_gaussians(*leaves[:3], opac, *leaves[3:], W, H, antialiased=aa, backend=backend)[0]
        assert 0 < (radii > 0).all(-1).sum() < radii.shape[0] * radii.shape[1]
        assert torch.autograd.gradcheck(fn, leaves)
        opcheck(
            ops.project_gaussians, _proj_args([means, quats, scales, opac, viewmats, Ks], W, H, aa, backend)
        )
        C, N = viewmats.shape[0], means.shape[0]
        g = [
            torch.randn(*s, dtype=torch.float64, device=device)
            for s in ((C, N, 2), (C, N), (C, N, 3), (C, N))
        ]
        bwd_args = _proj_args(
            [t.detach() for t in (means, quats, scales, opac, viewmats, Ks)], W, H, aa, backend
        )
        opcheck(ops.project_gaussians_bwd, (*bwd_args[:-1], *g, backend), full=False)

    def loss(m, s, v):
        _, m2d, z, con, comp = ff.project_gaussians(
            m, quats, s, opac, v, Ks, W, H, antialiased=True, backend=backend
        )
        return (m2d * m2d).sum() + z.sum() + (con * con).sum() + comp.sum()

    check_compiled(loss, [means, scales, viewmats])


def _bad_project_inputs(dtype):
    """(what is wrong, inputs): one row per value _ref_project refuses, and two wrong at once."""
    viewmats, Ks = cameras(2, 16, 12)
    g = list(gaussians(10))
    base = [t.to(dtype) for t in (*g, viewmats, Ks)]

    def poke(i, index, value):
        t = [x.clone() for x in base]
        t[i][index] = value
        return t

    nan, inf = float("nan"), float("inf")
    rows = [("means nan", poke(0, (3, 1), nan)), ("means inf", poke(0, (9, 2), -inf))]
    rows += [("quats nan", poke(1, (2, 0), nan)), ("scales inf", poke(2, (5, 1), inf))]
    rows += [("opacities nan", poke(3, 7, nan)), ("scales zero", poke(2, (4, 2), 0.0))]
    rows += [("scales negative", poke(2, (1, 0), -0.25)), ("quats zero", poke(1, 6, 0.0))]
    rows += [("quats short", poke(1, 4, 1e-20)), ("opacities above 1", poke(3, 2, 1.5))]
    rows += [("opacities below 0", poke(3, 8, -0.125))]
    # The camera rows the projection never reads are checked too.
    rows += [("viewmats nan", poke(4, (1, 3, 0), nan)), ("Ks inf", poke(5, (0, 2, 1), inf))]
    rows += [("fx negative", poke(5, (1, 0, 0), -5.0)), ("fy zero", poke(5, (0, 1, 1), 0.0))]
    both = poke(5, (0, 2, 2), nan)
    both[2] = -both[2]
    rows += [("Ks nan and scales negative", both)]
    # Finite inputs whose projection overflows: all pairs, or one culled pair (behind the camera).
    big = 1e30 if dtype == torch.float32 else 1e200  # squared, past the dtype's range
    rows += [("overflow", [t * big if i == 2 else t for i, t in enumerate(base)])]
    behind = poke(0, 6, torch.tensor([0.0, 0.0, -10.0], dtype=dtype))
    behind[2][6] = big
    rows += [("overflow of a culled pair", behind)]
    return rows


@pytest.mark.parametrize("device,backend", PROJ_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_gaussians_refuses_what_the_reference_refuses(dtype, device, backend):
    for what, inputs in _bad_project_inputs(dtype):
        inputs = [t.to(device) for t in inputs]
        for aa in (False, True):
            args = _proj_args(inputs, 16, 12, aa, backend)
            with pytest.raises(ValueError) as want:
                ops.project_gaussians(*args[:-1], "reference")
            # The reference's message, the C++ op's name before it.
            with pytest.raises(ValueError) as got:
                ops.project_gaussians(*args)
            assert str(got.value).removeprefix("project_gaussians: ") == str(want.value), what
            with pytest.raises(ValueError, match=f"^(project_gaussians: )?{re.escape(str(want.value))}$"):
                ff.project_gaussians(*inputs, 16, 12, antialiased=aa, backend=backend)


# ---------------------------------------------------------------------------
# tile intersection (C++): exact equality with the reference, both modes
# ---------------------------------------------------------------------------
ISECT_CASES = backend_cases("isect_tiles", grad=False)
ENCODE_CASES = backend_cases("isect_offset_encode", grad=False)


def _assert_isect_equal(got, want):
    for name, a, b in zip(("tiles_per_gauss", "isect_ids", "flatten_ids"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs"


@pytest.mark.parametrize("device,backend", ISECT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C,width,height", [(1, 37, 29), (3, 61, 45), (3, 128, 64)])
@pytest.mark.parametrize("tile_size", [8, 16])
@pytest.mark.parametrize("exact", [False, True])
def test_isect_tiles_equals_reference(C, width, height, tile_size, exact, dtype, device, backend):
    gen = torch.Generator().manual_seed(C * 1000 + width + tile_size + exact)
    means2d, radii, depths, conics, opac = isect_inputs(C, 300, width, height, gen, dtype)
    tw, th = ref.tile_grid(width, height, tile_size)
    extra = (conics, opac) if exact else ()
    want = ref.isect_tiles(means2d, radii, depths, tile_size, tw, th, *extra)
    dev = [t.to(device) for t in (means2d, radii, depths, *extra)]
    got = ff.isect_tiles(*dev[:3], tile_size, tw, th, *dev[3:], backend=backend)
    _assert_isect_equal([t.cpu() for t in got], want)
    assert want[1].numel() > 200
    offsets = ff.isect_offset_encode(got[1], C, tw, th, backend=backend)
    assert torch.equal(offsets.cpu(), ref.isect_offset_encode(want[1], C, tw, th))
    box = ref.box_intersections(means2d, radii, tile_size, tw, th)
    assert (want[1].numel() < box) if exact else (want[1].numel() == box)
    # Packed rows (the visible pairs, camera-major): the same keys, and ids that map to the unpacked ones.
    cam, gid = (radii > 0).all(-1).nonzero(as_tuple=True)
    rows = [t[cam, gid].to(device) for t in (means2d, radii, depths, *extra)]
    image_ids = cam.to(torch.int32).to(device)
    tpg, keys, fids = ff.isect_tiles(
        *rows[:3], tile_size, tw, th, *rows[3:], packed=True, n_images=C, image_ids=image_ids, backend=backend
    )
    assert torch.equal(keys.cpu(), want[1])
    assert torch.equal((cam * means2d.shape[1] + gid)[fids.cpu().long()].to(torch.int32), want[2])
    assert torch.equal(tpg.cpu(), want[0][cam, gid])


@pytest.mark.parametrize("device,backend", ENCODE_CASES)
def test_isect_offset_encode_equals_reference(device, backend):
    # Empty lists, empty leading and trailing tiles and cameras, one key, runs of repeated keys.
    for ids, C, tw, th in [
        (torch.zeros(0, dtype=torch.int64), 2, 3, 2),
        (torch.tensor([5 << 32]), 1, 4, 2),
        (torch.tensor([(1 << 35) | (2 << 32) | 7] * 4 + [(1 << 35) | (5 << 32)]), 3, 3, 2),
        (torch.tensor([0, 0, 1 << 32, 3 << 32, 3 << 32, 9 << 32]), 1, 5, 2),
    ]:
        got = ff.isect_offset_encode(ids.to(device), C, tw, th, backend=backend)
        assert torch.equal(got.cpu(), ref.isect_offset_encode(ids, C, tw, th))


@pytest.mark.parametrize("device,backend", ISECT_CASES)
def test_isect_tiles_thread_counts(device, backend):
    # Large enough for the C++ sort to split its passes across threads (M > 2^17).
    gen = torch.Generator().manual_seed(5)
    means2d, radii, depths, conics, opac = isect_inputs(3, 10000, 240, 160, gen, torch.float32)
    tw, th = ref.tile_grid(240, 160, 8)
    args = [t.to(device) for t in (means2d, radii, depths)]
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            for extra in ((), (conics.to(device), opac.to(device))):
                out = ff.isect_tiles(*args, 8, tw, th, *extra, backend=backend)
                runs.append([*out, ff.isect_offset_encode(out[1], 3, tw, th, backend=backend)])
    finally:
        torch.set_num_threads(before)
    assert runs[0][1].numel() > 1 << 17
    for i, run in enumerate(runs[2:]):
        for a, b in zip(runs[i % 2], run):
            assert torch.equal(a, b), "an output differs between runs or thread counts"


def _bad_isect_values():
    """(name, op arguments) the reference entry refuses, each with one thing wrong."""
    gen = torch.Generator().manual_seed(11)
    means2d, radii, depths, conics, opac = isect_inputs(2, 40, 37, 29, gen, torch.float32)
    tw, th = ref.tile_grid(37, 29, 8)
    base = dict(
        means2d=means2d, radii=radii, depths=depths, conics=conics, opacities=opac, max_intersections=None
    )

    def poke(name, value, idx=5):
        t = base[name].clone()
        t.view(-1)[idx] = value
        return {name: t}

    visible = (radii > 0).all(-1)
    cases = [
        ("means2d-nan", poke("means2d", math.nan)),
        ("depths-inf", poke("depths", math.inf)),
        ("depths-negative", {"depths": depths.masked_fill(visible, -2.0)}),
        ("conics-nan", poke("conics", math.nan)),
        ("opacities-inf", poke("opacities", -math.inf)),
        ("opacities-above", {"opacities": opac * 1.5}),
        ("opacities-below", {"opacities": opac - 0.25}),
        ("conics-alone", {"opacities": None}),
        ("opacities-alone", {"conics": None}),
        ("opacities-alone-bad-conics", {"conics": None, **poke("opacities", 2.0)}),
        ("cap-negative", {"max_intersections": -1}),
        ("cap", {"max_intersections": 10}),
        ("nan-and-cap", {**poke("means2d", math.nan), "max_intersections": 10}),
    ]
    for name, change in cases:
        a = {**base, **change}
        yield name, (a["means2d"], a["radii"], a["depths"], 8, tw, th, a["conics"], a["opacities"],
                     a["max_intersections"], None, 0)  # fmt: skip
    # The key fields: 12 camera bits + 20 tile bits.
    yield "key-bits", (means2d[:1].expand(2049, 40, 2), radii[:1].expand(2049, 40, 2), depths[:1].expand(2049, 40),
                       8, 1024, 1024, None, None, None, None, 0)  # fmt: skip
    # Packed rows: the visible pairs, with their cameras.
    cam, gid = visible.nonzero(as_tuple=True)
    rows = [t[cam, gid] for t in (means2d, radii, depths, conics, opac)]
    ids = cam.to(torch.int32)
    for name, image_ids, n_images, k in [
        ("packed-image-id-past", ids.index_fill(0, torch.tensor([3]), 2), 2, None),
        ("packed-image-id-negative", ids.index_fill(0, torch.tensor([0]), -1), 2, None),
        ("packed-one-camera", ids, 1, None),
        ("packed-depth-nan", ids, 2, 2),
        ("packed-cap", ids, 2, -10),
    ]:
        r = list(rows)
        if k == 2:
            r[2] = r[2].clone()
            r[2][4] = math.nan
        cap = 10 if k == -10 else None
        yield name, (*r[:3], 8, tw, th, *r[3:], cap, image_ids, n_images)


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the type is what the test compares
        return type(e), str(e)
    return None


@pytest.mark.parametrize("device,backend", ISECT_CASES)
def test_isect_tiles_refuses_what_the_reference_refuses(device, backend):
    for name, args in _bad_isect_values():
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        want = _error(lambda: ops.isect_tiles(*args, "reference"))
        assert want is not None and want[0] is ValueError, name
        assert _error(lambda: ops.isect_tiles(*args, backend)) == want, name


@pytest.mark.parametrize("device,backend", ENCODE_CASES)
def test_isect_offset_encode_refuses_what_the_reference_refuses(device, backend):
    ids = torch.tensor([(0 << 35) | (1 << 32), (1 << 35) | (2 << 32) | 5, (2 << 35) | (7 << 32)])
    for name, args in [
        ("unsorted", (ids.flip(0), 3, 4, 2)),
        ("camera-past", (ids, 2, 4, 2)),
        ("camera-negative", (torch.cat([torch.tensor([-(1 << 40)]), ids]), 3, 4, 2)),
        ("tile-past", (ids, 3, 3, 2)),  # 6 tiles in 3 bits: tile 7 is past them
        ("tile-past-one-camera", (torch.tensor([1 << 32, 3 << 32]), 1, 3, 1)),
    ]:
        args = (args[0].to(device), *args[1:])
        want = _error(lambda: ops.isect_offset_encode(*args, "reference"))
        assert want is not None and want[0] is ValueError, name
        assert _error(lambda: ops.isect_offset_encode(*args, backend)) == want, name


@pytest.mark.parametrize("device,backend", ISECT_CASES)
def test_isect_opcheck_and_compile(device, backend):
    gen = torch.Generator().manual_seed(3)
    means2d, radii, depths, conics, opac = (t.to(device) for t in isect_inputs(2, 30, 37, 29, gen))
    tw, th = ref.tile_grid(37, 29, 8)
    for extra in ((None, None, None), (conics, opac, None), (conics, opac, 10_000)):
        opcheck(ops.isect_tiles, (means2d, radii, depths, 8, tw, th, *extra, None, 0, backend), full=False)
    cam, gid = (radii > 0).all(-1).nonzero(as_tuple=True)
    rows = [t[cam, gid] for t in (means2d, radii, depths, conics, opac)]
    packed = (*rows[:3], 8, tw, th, *rows[3:], None, cam.to(torch.int32), 2, backend)
    opcheck(ops.isect_tiles, packed, full=False)
    _, ids, _ = ops.isect_tiles(means2d, radii, depths, 8, tw, th, conics, opac, None, None, 0, backend)
    opcheck(ops.isect_offset_encode, (ids, 2, tw, th, backend), full=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        fn = torch.compile(
            lambda m, z: ff.isect_tiles(m, radii, z, 8, tw, th, conics, opac, backend=backend),
            backend="aot_eager",
        )
        _assert_isect_equal(
            fn(means2d, depths), ref.isect_tiles(means2d, radii, depths, 8, tw, th, conics, opac)
        )
    enc = torch.compile(lambda i: ff.isect_offset_encode(i, 2, tw, th, backend=backend), fullgraph=True,
                        backend="aot_eager")  # fmt: skip
    assert torch.equal(enc(ids), ref.isect_offset_encode(ids, 2, tw, th))


@pytest.mark.parametrize("device,backend", backend_cases("rasterization"))
def test_rasterization_absgrad_on_meta_means2d(device, backend):
    # rasterization(absgrad=True): the backward leaves the signal on meta["means2d"], as gsplat does.
    W, H = 30, 22
    means, quats, scales, opacities = (t.to(device) for t in gaussians(40))
    viewmats, Ks = (t.to(device) for t in cameras(2, W, H))
    colors = torch.rand(40, 3, dtype=torch.float64, device=device)
    got = {}
    for b in (backend, "reference"):
        img, _, meta = ff.rasterization(means, quats, scales, opacities, colors.clone().requires_grad_(True), viewmats,
                                        Ks, W, H, tile_size=8, absgrad=True, backend=b)  # fmt: skip
        img.square().sum().backward()
        got[b] = meta["means2d"].absgrad
        assert got[b].shape == (2, 40, 2)
    assert bool((got[backend] > 0).any())
    assert_close(got[backend].cpu(), got["reference"].cpu(), torch.float64)

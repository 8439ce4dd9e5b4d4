"""Numerics of the splat stages: peers (gsplat's _torch_impl), brute force, dtypes, render modes."""

import math

import pytest
import torch

from frontiers_fast.ops import splat as ops
from frontiers_fast.reference import splat as ref

from ..helpers import assert_close
from .scenes import blend_depth_order, blend_pixel_loop, cameras, gaussians, isect_inputs, projected

W, H = 37, 29


def _gsplat():
    return pytest.importorskip("gsplat.cuda._torch_impl")


# ---------------------------------------------------------------------------
# projection
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("antialiased", [False, True])
def test_projection_matches_gsplat(dtype, antialiased):
    G = _gsplat()
    viewmats, Ks = cameras(3, W, H, dtype)
    # A wide cloud: some Gaussians fall outside the view (FOV clamp, off-image culling).
    means, quats, scales, opacities = gaussians(300, dtype, extent=2.5)
    means[:10, 2] = -4.2  # behind the near plane of every camera
    radii, means2d, depths, conics, comp = ops.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, W, H, antialiased=antialiased
    )
    covars, _ = G._quat_scale_to_covar_preci(quats, scales, True, False)
    g_radii, g_means2d, g_depths, g_conics, g_comp = G._fully_fused_projection(
        means, covars, viewmats, Ks, W, H, calc_compensations=antialiased
    )
    # gsplat main floors the compensation at MIN_COMPENSATION; 1.5.3 clamps at 0.
    if antialiased:
        g_comp = g_comp.clamp(min=ref.MIN_COMPENSATION)
    # The radius and culling rules of the issue, evaluated on gsplat's own 2D
    # covariance (1.5.3's Python path has a 3.33-sigma radius, no opacity or
    # det culling, so its radii only give the depth test).
    means_c, covars_c = G._world_to_cam(means, covars, viewmats)
    _, cov2d = G._persp_proj(means_c, covars_c, Ks, W, H)
    o = opacities[None] * (g_comp if antialiased else 1.0)
    extend = torch.sqrt(2 * torch.log(255 * o.clamp(min=1 / 255))).clamp(max=3.33)
    diag = torch.stack([cov2d[..., 0, 0], cov2d[..., 1, 1]], -1) + 0.3
    arg = extend[..., None] * diag.sqrt()
    want = torch.ceil(arg)
    det = diag.prod(-1) - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    z = means_c[..., 2]
    mx, my = g_means2d.unbind(-1)
    rx, ry = want.unbind(-1)
    keep = (
        (z >= 0.01) & (z <= 1e10) & (det > 0) & (o >= 1 / 255) & ((rx > 0) | (ry > 0))
        & (mx + rx > 0) & (mx - rx < W) & (my + ry > 0) & (my - ry < H)
    )  # fmt: skip
    ours = (radii > 0).all(-1)
    assert ours.sum() > 100 and torch.equal(ours, keep)
    assert (ours & ~(g_radii > 0).all(-1)).sum() == 0  # gsplat keeps a superset
    for a, b in ((means2d, g_means2d), (depths, g_depths), (conics, g_conics)):
        assert_close(a[ours], b[ours])
    if antialiased:
        assert_close(comp[ours], g_comp[ours])
    else:
        assert (comp[ours] == 1).all()
    # Skip the few whose ceil argument sits within rounding of an integer.
    safe = ours[..., None] & ((arg - arg.round()).abs() > 1e-4)
    assert (radii[safe].double() == want[safe].double()).all()
    # Culled entries are zero, as gsplat's kernels leave them.
    assert (means2d[~ours] == 0).all() and (conics[~ours] == 0).all() and (depths[~ours] == 0).all()


def test_projection_culling_rules():
    viewmats, Ks = cameras(1, W, H)
    means, quats, scales, opacities = gaussians(6)
    means[:] = torch.tensor([0.0, 0.0, 0.0])
    viewmats = torch.eye(4, dtype=torch.float64)[None].clone()
    viewmats[0, 2, 3] = 4.0
    opacities[:] = 0.5
    opacities[1] = 0.5 / 255  # under the 1/255 threshold
    means[2, 2] = -3.995  # depth 0.005 < near 0.01
    means[3, 0] = 40.0  # far off the image
    means[4, 2] = 50.0  # beyond far_plane=20
    radii, *_ = ref.project_gaussians(means, quats, scales, opacities, viewmats, Ks, W, H, far_plane=20.0)
    assert (radii[0, [0, 5]] > 0).all()
    assert (radii[0, 1:5] == 0).all()
    # radius_clip drops Gaussians whose radii are both at most the clip.
    big = int(radii[0, 0].max())
    radii, *_ = ref.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, W, H, radius_clip=float(big)
    )
    assert (radii[0, 0] == 0).all()
    # The opacity-aware radius shrinks with the opacity.
    lo = opacities.clone()
    lo[0] = 0.05
    r_lo, *_ = ref.project_gaussians(means, quats, scales, lo, viewmats, Ks, W, H)
    r_hi, *_ = ref.project_gaussians(means, quats, scales, opacities, viewmats, Ks, W, H)
    assert (r_lo[0, 0] < r_hi[0, 0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compensation_floor_keeps_gradients_finite(dtype):
    # Gaussian 0 is flat in x and sits on the optical axis: its 2D covariance
    # before the blur has det exactly 0.  The compensation is floored at
    # MIN_COMPENSATION (gsplat main), not 0: its sqrt has a finite gradient.
    means = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.2, 0.0], [-0.2, 0.1, 0.3]], dtype=dtype)
    quats = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.9, 0.2, -0.3, 0.1]], dtype=dtype)
    scales = torch.tensor([[1e-30, 0.2, 0.2], [0.1, 0.1, 0.1], [0.15, 0.05, 0.1]], dtype=dtype)
    opac = torch.tensor([0.9, 0.9, 0.7], dtype=dtype)
    V = torch.eye(4, dtype=dtype)[None].clone()
    V[0, 2, 3] = 4
    K = torch.tensor([[[30.0, 0, 16], [0, 30, 12], [0, 0, 1]]], dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac)]
    radii, _, _, _, comp = ops.project_gaussians(*leaves, V, K, 32, 24, antialiased=True)
    assert comp[0, 0] == torch.tensor(ref.MIN_COMPENSATION, dtype=dtype)
    # 0.9 * 0.005 >= 1/255: kept (a zero compensation would have culled it).
    assert (radii[0] > 0).all()
    img, alpha, _ = ops.rasterization(*leaves, torch.rand(3, 3, dtype=dtype), V, K, 32, 24,
                                      rasterize_mode="antialiased")  # fmt: skip
    grads = torch.autograd.grad((img * torch.rand_like(img)).sum() + alpha.sum(), leaves)
    for g in grads:
        assert torch.isfinite(g).all()
    assert grads[0][1].abs().sum() > 0


def test_projection_fp32_matches_fp64():
    viewmats, Ks = cameras(2, W, H)
    g = gaussians(200)
    r64 = ops.project_gaussians(*g, viewmats, Ks, W, H, antialiased=True)
    r32 = ops.project_gaussians(*(t.float() for t in g), viewmats.float(), Ks.float(), W, H, antialiased=True)
    keep = (r64[0] > 0).all(-1) & (r32[0] > 0).all(-1)
    assert keep.sum() > 100
    for a, b in zip(r32[1:], r64[1:]):
        # conics ~ 1/det of entries of size focal^2 * scale^2 / z^2: relative error of a few eps32.
        assert_close(a[keep], b[keep].float().double())


# ---------------------------------------------------------------------------
# spherical harmonics
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_gsplat(dtype, degree):
    G = _gsplat()
    dirs = torch.randn(3, 41, 3, dtype=dtype) * 3
    coeffs = torch.randn(3, 41, 16, 3, dtype=dtype)
    got = ops.spherical_harmonics(degree, dirs, coeffs)
    assert_close(got, G._spherical_harmonics(degree, dirs, coeffs))
    masks = torch.rand(3, 41) > 0.3
    got = ops.spherical_harmonics(degree, dirs, coeffs[..., : (degree + 1) ** 2, :], masks)
    assert_close(got, G._spherical_harmonics(degree, dirs, coeffs) * masks[..., None])


def test_sh_basis_is_orthonormal():
    # Monte-Carlo on the sphere: E[Y_i Y_j] = delta_ij / (4 pi), a check that
    # does not go through any peer's constants.
    gen = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(400_000, 3, generator=gen, dtype=torch.float64), dim=-1)
    Y = ref.sh_basis(3, d)
    gram = 4 * math.pi * (Y.T @ Y) / d.shape[0]
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=0.03, rtol=0)


# ---------------------------------------------------------------------------
# tile intersection
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("tile_size", [8, 16])
def test_isect_matches_gsplat(tile_size):
    G = _gsplat()
    means2d, conics, _, _, _, radii, depths = projected(2, 60, W, H, tile_size)
    tw, th = ops.ref.tile_grid(W, H, tile_size)
    tpg, ids, fids = ops.isect_tiles(means2d, radii, depths, tile_size, tw, th)
    g_tpg, g_ids, g_fids = G._isect_tiles(means2d, radii, depths, tile_size, tw, th)
    # 20 and 6 tiles: not powers of two, where gsplat 1.5.3's tile field is
    # one bit wider than main's (test_isect_keys_layout covers that case).
    assert tw * th in (20, 6)
    assert ids.numel() > 50
    assert torch.equal(tpg, g_tpg)
    assert torch.equal(ids, g_ids)
    # gsplat's unstable sort may order equal keys differently: compare the pairs.
    assert sorted(zip(ids.tolist(), fids.tolist())) == sorted(zip(g_ids.tolist(), g_fids.tolist()))
    offsets = ops.isect_offset_encode(ids, 2, tw, th)
    assert torch.equal(offsets, G._isect_offset_encode(g_ids, 2, tw, th))


@pytest.mark.parametrize("w,h,ts", [(W, H, 8), (32, 16, 8)])  # 5 x 4 tiles; 4 x 2 = 8 tiles
def test_isect_keys_layout(w, h, ts):
    means2d, _, _, _, _, radii, depths = projected(3, 40, w, h, ts)
    tw, th = ref.tile_grid(w, h, ts)
    _, ids, fids = ref.isect_tiles(means2d, radii, depths, ts, tw, th)
    # gsplat main's field width: bits for indices 0..n-1 (8 tiles -> 3 bits;
    # gsplat 1.5.3 takes n.bit_length() = 4).
    tile_bits = (tw * th - 1).bit_length()
    assert ref.bits_for_count(tw * th) == tile_bits == {20: 5, 8: 3}[tw * th]
    cam = ids >> (32 + tile_bits)
    tile = (ids >> 32) & ((1 << tile_bits) - 1)
    assert torch.equal(cam, fids.long() // 40)
    assert (tile < tw * th).all()
    d = depths.reshape(-1)[fids.long()].float()
    assert torch.equal((ids & 0xFFFFFFFF).to(torch.int32).view(torch.float32), d)
    # Sorted by (camera, tile, depth).
    key = torch.stack([cam, tile], 1)
    same = (key[1:] == key[:-1]).all(1)
    assert (d[1:][same] >= d[:-1][same]).all()
    # The camera field sits right above the tile field.
    assert torch.equal(ids >> 32, cam * (1 << tile_bits) + tile)
    assert ids.numel() > 50 and cam.max() == 2
    offsets = ref.isect_offset_encode(ids, 3, tw, th)
    runs = torch.bincount(cam * (tw * th) + tile, minlength=3 * tw * th)
    assert torch.equal(offsets.reshape(-1).long(), torch.cumsum(runs, 0) - runs)


# ---------------------------------------------------------------------------
# blending
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("with_bg,ts", [(False, 8), (True, 8), (True, 2), (False, 32)])
def test_blend_matches_pixel_loop(with_bg, ts):
    # ts=8 and 32 split tiles into 4x4 blocks in the reference; ts=2 blends whole tiles.
    C, N, w, h = 2, 40, 23, 17
    means2d, conics, opac, offsets, fids, radii, _ = projected(
        C, N, w, h, ts, scale=(0.1, 0.5), opacity=(0.3, 1.0)
    )
    opac = opac.clone()
    opac[:, ::3] = 1.0  # alpha hits the 0.99 clamp: two such layers end a pixel
    colors = torch.rand(C, N, 3, dtype=torch.float64)
    bg = torch.rand(C, 3, dtype=torch.float64) if with_bg else None
    want, want_a, stopped = blend_pixel_loop(means2d, conics, colors, opac, w, h, ts, offsets, fids, bg)
    assert stopped > 0, "the scene should exercise the early stop"
    got, got_a = ops.rasterize_to_pixels(means2d, conics, colors, opac, w, h, ts, offsets, fids, bg)
    assert_close(got, want)
    assert_close(got_a, want_a)
    # Small chunks: many chunks of differently padded tiles give the same image.
    got2, got2_a = ref.rasterize_to_pixels(
        means2d, conics, colors, opac, w, h, ts, offsets, fids, bg, chunk_elements=300
    )
    assert_close(got2, want)
    assert_close(got2_a, want_a)


def test_blend_non_positive_definite_conic():
    # A conic that is not positive definite has sigma < 0 somewhere: those
    # pixels skip it (as in gsplat's kernel), the others blend it normally.
    C, N, w, h, ts = 1, 12, 23, 17, 8
    means2d, conics, opac, offsets, fids, _, _ = projected(C, N, w, h, ts, scale=(0.2, 0.5))
    conics = conics.clone()
    conics[0, :4, 1] = 2 * (conics[0, :4, 0] * conics[0, :4, 2]).sqrt()  # b^2 > ac
    colors = torch.rand(C, N, 3, dtype=torch.float64)
    want, want_a, _ = blend_pixel_loop(means2d, conics, colors, opac, w, h, ts, offsets, fids, None)
    got, got_a = ops.rasterize_to_pixels(means2d, conics, colors, opac, w, h, ts, offsets, fids)
    assert_close(got, want)
    assert_close(got_a, want_a)
    # Where sigma << 0, exp(-sigma) overflows: the skipped pixels must not
    # turn its zero gradient into 0 * inf = NaN.  Scaling the conics makes
    # sigma reach -1e4 (exp overflows in float32 and float64 alike).
    conics = conics.clone()
    conics[0, :4] *= 300.0
    bg = torch.rand(C, 3, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        leaves = [t.to(dtype).requires_grad_(True) for t in (means2d, conics, colors, opac, bg)]
        img, alpha = ops.rasterize_to_pixels(*leaves[:4], w, h, ts, offsets, fids, leaves[4])
        grads = torch.autograd.grad((img * torch.rand_like(img)).sum() + alpha.sum(), leaves)
        for g in grads:
            assert torch.isfinite(g).all()
        assert grads[1][0, :4].abs().sum() > 0  # the bad conics do blend where sigma >= 0

    def fn(m, c, col, o):
        return ops.rasterize_to_pixels(m, c, col, o, w, h, ts, offsets, fids)

    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opac)],
                                    fast_mode=True)  # fmt: skip


def test_blend_fp32_matches_fp64():
    C, N, ts = 2, 80, 8
    means2d, conics, opac, offsets, fids, _, _ = projected(C, N, W, H, ts, opacity=(0.2, 0.8))
    colors = torch.rand(C, N, 4, dtype=torch.float64)
    bg = torch.rand(C, 4, dtype=torch.float64)
    want = ops.rasterize_to_pixels(means2d, conics, colors, opac, W, H, ts, offsets, fids, bg)
    f = lambda t: t.float()
    got = ops.rasterize_to_pixels(f(means2d), f(conics), f(colors), f(opac), W, H, ts, offsets, fids, f(bg))
    for a, b in zip(got, want):
        # alpha = o exp(-sigma) with sigma up to ~5.5 and tens of factors in T:
        # each step loses ~eps32 * sigma, i.e. under 1e-5 relative.
        assert_close(a, b)


def test_blend_gradients_match_autograd_reference():
    C, N, ts = 2, 30, 8
    means2d, conics, opac, offsets, fids, _, _ = projected(C, N, W, H, ts, opacity=(0.3, 0.8))
    colors = torch.rand(C, N, 3, dtype=torch.float64)
    bg = torch.rand(C, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opac, bg)]
    gc = torch.randn(C, H, W, 3, dtype=torch.float64)
    ga = torch.randn(C, H, W, 1, dtype=torch.float64)

    def grads(fn):
        rc, ra = fn(*leaves[:4], W, H, ts, offsets, fids, leaves[4])
        return torch.autograd.grad((rc * gc).sum() + (ra * ga).sum(), leaves)

    for a, b in zip(grads(ops.rasterize_to_pixels), grads(ref.rasterize_to_pixels)):
        assert_close(a, b)


def test_empty_tiles_and_no_gaussians():
    C, ts = 2, 8
    tw, th = ref.tile_grid(W, H, ts)
    offsets = torch.zeros(C, th, tw, dtype=torch.int32)
    fids = torch.zeros(0, dtype=torch.int32)
    gc, ga = torch.randn(C, H, W, 3), torch.randn(C, H, W, 1)
    for N in (0, 3):  # no Gaussians at all; Gaussians that reach no tile
        leaves = [torch.rand(C, N, 2) * 10, torch.rand(C, N, 3) + 1, torch.rand(C, N, 3), torch.rand(C, N),
                  torch.rand(C, 3)]  # fmt: skip
        leaves = [t.requires_grad_(True) for t in leaves]
        bg = leaves[4]
        rc, ra = ops.rasterize_to_pixels(*leaves[:4], W, H, ts, offsets, fids, bg)
        assert (ra == 0).all() and torch.equal(rc, bg[:, None, None, :].expand(C, H, W, 3))
        # T = 1 everywhere: d(sum gc * out)/d(bg) is the sum of gc over the pixels.
        grads = torch.autograd.grad((rc * gc).sum() + (ra * ga).sum(), leaves)
        assert_close(grads[4], gc.sum((1, 2)))
        for g in grads[:4]:
            assert (g == 0).all()
    # The whole renderer, with a camera that looks away from every Gaussian.
    means, quats, scales, opacities, viewmats, Ks = _scene(C=2, N=20, dtype=torch.float32)
    # Turn camera 1 by pi about its x axis: the scene is now behind it.
    viewmats[1] = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])) @ viewmats[1]
    leaves = [t.clone().requires_grad_(True) for t in (means, torch.rand(20, 3), torch.rand(2, 3))]
    img, alpha, meta = ops.rasterization(leaves[0], quats, scales, opacities, leaves[1], viewmats, Ks, W, H,
                                         backgrounds=leaves[2])  # fmt: skip
    assert (meta["radii"][0] > 0).any() and (meta["radii"][1] == 0).all()
    gi = torch.randn_like(img)
    g_means, g_colors, g_bg = torch.autograd.grad((img * gi).sum(), leaves)
    assert_close(g_bg[1], gi[1].sum((0, 1)))
    assert torch.isfinite(g_means).all() and g_means.abs().sum() > 0
    # Camera 1 alone: nothing is visible, so nothing but the background gets a gradient.
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    img, _, _ = ops.rasterization(leaves[0], quats, scales, opacities, leaves[1], viewmats[1:], Ks[1:], W, H,
                                  backgrounds=leaves[2][1:])  # fmt: skip
    g_means, g_colors, g_bg = torch.autograd.grad((img * gi[1:]).sum(), leaves)
    assert_close(g_bg[1], gi[1].sum((0, 1)))
    assert (g_means == 0).all() and (g_colors == 0).all() and (g_bg[0] == 0).all()


# ---------------------------------------------------------------------------
# the whole renderer
# ---------------------------------------------------------------------------
def _scene(C=2, N=60, dtype=torch.float64):
    viewmats, Ks = cameras(C, W, H, dtype)
    return (*gaussians(N, dtype), viewmats, Ks)


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_rasterization_matches_depth_order_loop(rasterize_mode):
    means, quats, scales, opacities, viewmats, Ks = _scene()
    colors = torch.rand(2, 60, 3, dtype=torch.float64)
    bg = torch.rand(2, 3, dtype=torch.float64)
    img, alpha, meta = ops.rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H, backgrounds=bg,
                                         rasterize_mode=rasterize_mode, tile_size=8)  # fmt: skip
    want, want_a = blend_depth_order(meta["means2d"], meta["conics"], colors, meta["opacities"], meta["radii"],
                                     meta["depths"], W, H, bg)  # fmt: skip
    assert_close(img, want)
    assert_close(alpha, want_a)
    assert img.shape == (2, H, W, 3) and alpha.shape == (2, H, W, 1)


def test_render_modes():
    means, quats, scales, opacities, viewmats, Ks = _scene()
    colors = torch.rand(60, 3, dtype=torch.float64)
    bg = torch.rand(2, 3, dtype=torch.float64)
    args = (means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    rgb, a, meta = ops.rasterization(*args, backgrounds=bg)
    d, a_d, _ = ops.rasterization(*args, backgrounds=bg, render_mode="D")
    want_d, _ = blend_depth_order(meta["means2d"], meta["conics"], meta["depths"][..., None], meta["opacities"],
                                  meta["radii"], meta["depths"], W, H)  # fmt: skip
    assert_close(d, want_d)  # accumulated depth, with a zero background
    ed, _, _ = ops.rasterization(*args, backgrounds=bg, render_mode="ED")
    assert_close(ed, want_d / a.clamp(min=1e-10))
    rgbd, _, _ = ops.rasterization(*args, backgrounds=bg, render_mode="RGB+D")
    assert_close(rgbd, torch.cat([rgb, want_d], -1))
    rgbed, _, _ = ops.rasterization(*args, render_mode="RGB+ED")
    rgb0, _, _ = ops.rasterization(*args)
    assert_close(rgbed, torch.cat([rgb0, ed], -1))
    assert_close(a_d, a)


@pytest.mark.parametrize("per_camera", [False, True])
def test_rasterization_sh_colors(per_camera):
    means, quats, scales, opacities, viewmats, Ks = _scene()
    sh = (
        torch.randn(2, 60, 9, 3, dtype=torch.float64)
        if per_camera
        else torch.randn(60, 9, 3, dtype=torch.float64)
    )
    img, _, meta = ops.rasterization(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=2)
    campos = torch.linalg.inv(viewmats)[:, :3, 3]
    dirs = means[None] - campos[:, None]
    coeffs = sh if per_camera else sh.expand(2, *sh.shape)
    rgb = (ref.spherical_harmonics(2, dirs, coeffs) + 0.5).clamp(min=0)
    plain, _, _ = ops.rasterization(means, quats, scales, opacities, rgb, viewmats, Ks, W, H)
    assert_close(img, plain)


def test_rasterization_fp32_matches_fp64():
    scene = _scene(N=100)
    colors = torch.rand(100, 3, dtype=torch.float64)
    want, want_a, _ = ops.rasterization(*scene[:4], colors, *scene[4:], W, H)
    got, got_a, _ = ops.rasterization(*(t.float() for t in scene[:4]), colors.float(), *(t.float() for t in scene[4:]),
                                      W, H)  # fmt: skip
    # Measured error ~1e-6 (rounding in the projection, carried through the
    # blend), well inside the float32 tolerances.  A pixel where a Gaussian's
    # alpha sits within rounding of the 1/255 cut (or T of the 1e-4 stop)
    # could blend it in one dtype only; none does in this scene.
    assert_close(got, want, torch.float32)
    assert_close(got_a, want_a, torch.float32)


def test_garden_small_resolution():
    G = _gsplat()
    from frontiers_fast.data import load_garden

    s = load_garden(max_points=1500, seed=0)
    scale = 8  # 81 x 52 pixels
    Ks = s.Ks.double().clone()
    Ks[:, :2] /= scale
    w, h = s.width // scale, s.height // scale
    args = [t.double() for t in (s.means, s.quats, s.scales, s.opacities, s.colors)] + [
        s.viewmats.double(),
        Ks,
    ]
    img, alpha, meta = ops.rasterization(*args, w, h, tile_size=8)
    assert img.shape == (3, h, w, 3) and (meta["radii"] > 0).all(-1).sum() > 300
    want, want_a = blend_depth_order(meta["means2d"], meta["conics"], s.colors.double().expand(3, -1, -1),
                                     meta["opacities"], meta["radii"], meta["depths"], w, h)  # fmt: skip
    assert_close(img, want)
    assert_close(alpha, want_a)
    # gsplat's own rasterization() cannot run here: its tile intersection and
    # blending need the CUDA extension even on its PyTorch path.  Its Python
    # projection can, so compare that stage on the real scene.
    covars, _ = G._quat_scale_to_covar_preci(args[1], args[2], True, False)
    _, g_m2d, g_z, g_con, _ = G._fully_fused_projection(args[0], covars, args[5], Ks, w, h)
    keep = (meta["radii"] > 0).all(-1)
    assert_close(meta["means2d"][keep], g_m2d[keep])
    assert_close(meta["conics"][keep], g_con[keep])


def _pairs(ids, fids):
    return set(zip(ids.tolist(), fids.tolist()))


def _dropped_pixels_pass(means2d, conics, opac, pairs, tile_bits, tile_width, ts):
    """Per dropped (key, Gaussian) pair: whether any pixel centre of its tile has alpha >= 1/255,
    in float64 and in the dtype of the inputs with the reference blender's operation order."""
    keys = torch.tensor([k for k, _ in pairs], dtype=torch.int64)
    g = torch.tensor([f for _, f in pairs], dtype=torch.int64)
    tile = (keys >> 32) & ((1 << tile_bits) - 1)
    r = torch.arange(ts, dtype=torch.float64) + 0.5
    out = []
    for dt in {torch.float64, means2d.dtype}:
        m = means2d.reshape(-1, 2)[g].to(dt)
        q = conics.reshape(-1, 3)[g].to(dt)
        o = opac.reshape(-1)[g].to(dt)
        px = ((tile % tile_width) * ts).to(dt)[:, None] + r.to(dt)  # [P, ts]
        py = ((tile // tile_width) * ts).to(dt)[:, None] + r.to(dt)
        dx, dy = px - m[:, :1], py - m[:, 1:]
        sx, sy, bdy = 0.5 * q[:, :1] * dx * dx, 0.5 * q[:, 2:] * dy * dy, q[:, 1:2] * dy
        sigma = (sy[:, :, None] + sx[:, None, :]) + bdy[:, :, None] * dx[:, None, :]  # [P, ts(y), ts(x)]
        alpha = (o[:, None, None] * torch.exp(-sigma)).clamp(max=ref.MAX_ALPHA)
        out.append(((sigma >= 0) & (alpha >= ref.ALPHA_THRESHOLD)).flatten(1).any(1))
    return torch.stack(out).any(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["projected", "direct"])
@pytest.mark.parametrize("ts", [8, 16])
def test_isect_exact_culling_drops_only_unused_tiles(kind, ts, dtype):
    # A subset of the box lists, in the same order, and brute force over every
    # pixel centre of every dropped tile: none sees alpha >= 1/255.
    w, h = 61, 45
    if kind == "projected":
        means2d, conics, opac, _, _, radii, depths = projected(2, 150, w, h, ts, dtype, scale=(0.02, 0.4))
    else:
        means2d, radii, depths, conics, opac = isect_inputs(
            2, 300, w, h, torch.Generator().manual_seed(ts), dtype
        )
    tw, th = ref.tile_grid(w, h, ts)
    box = ref.isect_tiles(means2d, radii, depths, ts, tw, th)
    exact = ref.isect_tiles(means2d, radii, depths, ts, tw, th, conics, opac)
    kept, every = _pairs(*exact[1:]), _pairs(*box[1:])
    assert kept <= every
    assert (exact[0] <= box[0]).all() and exact[0].sum() == exact[1].numel()
    # Same order: the exact lists are the box lists with entries removed.
    in_exact = torch.tensor([p in kept for p in zip(box[1].tolist(), box[2].tolist())])
    assert torch.equal(box[1][in_exact], exact[1]) and torch.equal(box[2][in_exact], exact[2])
    dropped = every - kept
    assert len(dropped) > 0.1 * len(every)
    used = _dropped_pixels_pass(means2d, conics, opac, sorted(dropped), ref.bits_for_count(tw * th), tw, ts)
    assert not used.any(), f"{int(used.sum())} dropped tiles have a pixel with alpha >= 1/255"


def test_isect_exact_culling_thin_ellipses_and_edge_cases():
    # A long thin ellipse along the diagonal: its box holds many tiles its
    # ellipse misses.  A non-positive-definite conic keeps its whole box; an
    # opacity under 1/255 lists no tile; the mean inside a tile keeps it.
    ts, tw, th = 8, 8, 8
    means2d = torch.tensor([[[32.0, 32.0], [32.0, 32.0], [20.0, 20.0], [3.0, 3.0]]], dtype=torch.float64)
    cov = torch.tensor([[400.0, 399.0], [399.0, 400.0]], dtype=torch.float64)
    ic = torch.linalg.inv(cov)
    thin = torch.stack([ic[0, 0], ic[0, 1], ic[1, 1]])
    conics = torch.stack(
        [thin, torch.tensor([1.0, 2.0, 1.0]).double(), thin, torch.tensor([0.5, 0.0, 0.5]).double()]
    )
    conics = conics[None]
    opac = torch.tensor([[1.0, 1.0, 0.9 / 255, 1.0]], dtype=torch.float64)
    radii = torch.tensor([[[20, 20], [9, 9], [20, 20], [2, 2]]], dtype=torch.int32)
    depths = torch.ones(1, 4, dtype=torch.float64)
    box = ref.isect_tiles(means2d, radii, depths, ts, tw, th)[0]
    exact = ref.isect_tiles(means2d, radii, depths, ts, tw, th, conics, opac)[0]
    assert exact[0, 0] < box[0, 0] // 2  # the thin one: diagonal tiles only
    assert exact[0, 1] == box[0, 1]  # not positive definite
    assert exact[0, 2] == 0 and box[0, 2] > 0  # o < 1/255: no pixel uses it
    assert exact[0, 3] == 1  # mean (3, 3) in tile 0, radius 2: tile 0 alone


@pytest.mark.parametrize("ts", [8, 16])
def test_isect_exact_lists_render_the_same_images(ts):
    # The reference blender with the exact lists and with the box lists: the
    # same images and gradients.
    C, N, w, h = 2, 120, 45, 37
    means2d, conics, opac, _, _, radii, depths = projected(
        C, N, w, h, ts, scale=(0.05, 0.4), opacity=(0.05, 1.0)
    )
    colors = torch.rand(C, N, 3, dtype=torch.float64)
    bg = torch.rand(C, 3, dtype=torch.float64)
    tw, th = ref.tile_grid(w, h, ts)
    renders = []
    for extra in ((), (conics, opac)):
        _, ids, fids = ops.isect_tiles(means2d, radii, depths, ts, tw, th, *extra)
        offsets = ops.isect_offset_encode(ids, C, tw, th)
        leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opac)]
        img, alpha = ops.rasterize_to_pixels(*leaves, w, h, ts, offsets, fids, bg)
        g = torch.autograd.grad(
            (img * torch.linspace(0, 1, 3, dtype=torch.float64)).sum() + alpha.sum(), leaves
        )
        renders.append((ids.numel(), img, alpha, *g))
    (n_box, *box), (n_exact, *exact) = renders
    assert n_exact < 0.9 * n_box
    for name, a, b in zip(("image", "alpha", "means2d", "conics", "colors", "opacities"), box, exact):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)

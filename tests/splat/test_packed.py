"""Packed mode (gsplat's ``packed=True``): rows of visible (camera, Gaussian) pairs instead of [C, N].

On every backend of each function:
- rasterize_to_pixels on packed row tables gives the images, the backward's
  state and the gradients of the [C, N] call, gathered to the rows (and the
  rows nobody references get zero gradient);
- isect_tiles on packed rows lists the same keys (tests/splat/test_backends.py);
- rasterization(packed=True) renders the images of the unpacked call, with the
  same gradients for every input, in every render mode, with SH colours,
  antialiased, with backgrounds and three cameras; absgrad lands on the
  packed means2d, equal to the unpacked one at the visible pairs;
- opcheck and fp64 gradcheck on packed tables;
- the refusals: packed flatten_ids outside the rows, image_ids outside the
  cameras, tables whose rows disagree, and packed-only arguments without
  packed=True.
"""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.ops import splat as splat_ops
from frontiers_fast.reference import splat as ref

from ..helpers import assert_close, backend_cases, grads, opcheck
from .scenes import cameras, gaussians
from .test_backends import _raster_scene

ops = torch.ops.frontiers_fast
RASTER_CASES = backend_cases("rasterize_to_pixels")
RASTERIZATION_CASES = backend_cases("rasterization")


def _pack_tables(m2d, con, col, opac, fids, extra=3, seed=0):
    """Row tables of the rows flatten_ids reference plus ``extra`` unreferenced ones, in row order:
    (rows [R] int64 into the flattened [C * N], the packed tables, the remapped flatten_ids)."""
    C, N = opac.shape
    used = torch.unique(fids.long())
    gen = torch.Generator().manual_seed(seed)
    spare = torch.randperm(C * N, generator=gen)[:extra]
    rows = torch.unique(torch.cat([used, spare]))
    tables = [t.reshape(C * N, *t.shape[2:])[rows] for t in (m2d, con, col, opac)]
    new_ids = torch.searchsorted(rows, fids.long()).to(torch.int32)
    return rows, tables, new_ids


@pytest.mark.parametrize("device,backend", RASTER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C,N,W,H,ts,D,with_bg", [(1, 60, 37, 29, 16, 3, False), (3, 50, 45, 31, 8, 5, True)])
def test_rasterize_to_pixels_packed_equals_unpacked(C, N, W, H, ts, D, with_bg, dtype, device, backend):
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(C, N, W, H, ts, D, 7 * C + W, dtype)
    bg = bg.to(device) if with_bg else None
    N = opac.shape[1]  # the scene appends a few rows
    rows, tables, pids = _pack_tables(m2d, con, col, opac, fids)
    dense = [t.to(device).requires_grad_(True) for t in (m2d, con, col, opac)]
    packed = [t.to(device).requires_grad_(True) for t in tables]
    offsets, fids, pids = offsets.to(device), fids.to(device), pids.to(device)
    want = ff.rasterize_to_pixels(*dense, W, H, ts, offsets, fids, bg, absgrad=True, backend=backend)
    got = ff.rasterize_to_pixels(
        *packed, W, H, ts, offsets, pids, bg, packed=True, absgrad=True, backend=backend
    )
    # The same arithmetic on the same values: equal, not merely close.
    for g, w, name in zip(got, want, ("render_colors", "render_alphas")):
        assert g.shape == w.shape and torch.equal(g, w), name
    state_d = ops.rasterize_to_pixels(
        *[t.detach() for t in dense], bg, W, H, ts, offsets, fids, False, backend
    )
    state_p = ops.rasterize_to_pixels(
        *[t.detach() for t in packed], bg, W, H, ts, offsets, pids, False, backend
    )
    assert torch.equal(state_p[2], state_d[2]) and torch.equal(state_p[3], state_d[3]), "final_ts / last_ids"
    seeds = [torch.randn_like(w) for w in want]
    g_dense = grads(list(want), dense, seeds)
    g_packed = grads(list(got), packed, seeds)
    rows_d = rows.to(device)
    for gd, gp, name in zip(g_dense, g_packed, ("means2d", "conics", "colors", "opacities")):
        flat = gd.reshape(C * N, *gd.shape[2:])
        assert gp.shape == packed[0].shape[:1] + flat.shape[1:], name
        assert torch.equal(gp, flat[rows_d]), f"grad {name}"
        rest = torch.ones(C * N, dtype=torch.bool, device=device)
        rest[rows_d] = False
        assert not bool(flat[rest].any()), f"grad {name} outside the rows"
    assert torch.equal(packed[0].absgrad, dense[0].absgrad.reshape(C * N, 2)[rows_d]), "absgrad"
    assert bool((packed[0].absgrad > 0).any())


@pytest.mark.parametrize("device,backend", RASTER_CASES)
def test_rasterize_to_pixels_packed_gradcheck_and_opcheck(device, backend):
    w, h, ts = 11, 9, 8
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 8, w, h, ts, 2, 5)
    _, tables, pids = _pack_tables(m2d, con, col, opac.clamp(0.3, 0.8), fids, extra=2)
    offsets, pids = offsets.to(device), pids.to(device)
    leaves = [t.to(device).requires_grad_(True) for t in (*tables, bg)]

    def fn(m, c, cl, o, b):
        return ff.rasterize_to_pixels(m, c, cl, o, w, h, ts, offsets, pids, b, packed=True, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    args = (*leaves[:4], leaves[4], w, h, ts, offsets, pids, True, backend)
    opcheck(ops.rasterize_to_pixels, args)


def _scene(C, N, W, H, dtype=torch.float64, sh_degree=None, per_camera_colors=False):
    torch.manual_seed(C * 100 + N + (sh_degree or 0))
    means, quats, scales, opacities = gaussians(N, dtype)
    viewmats, Ks = cameras(C, W, H, dtype)
    means[: N // 6, 2] = -6.0  # behind every camera (they look down +z from about z = -4): culled
    means[N // 6 : N // 4, 0] = 40.0  # far off to the side: culled
    if sh_degree is None:
        colors = torch.rand(*((C,) if per_camera_colors else ()), N, 3, dtype=dtype)
    else:
        colors = (
            torch.randn(*((C,) if per_camera_colors else ()), N, (sh_degree + 1) ** 2, 3, dtype=dtype) * 0.3
        )
    return means, quats, scales, opacities, colors, viewmats, Ks


@pytest.mark.parametrize("device,backend", RASTERIZATION_CASES)
@pytest.mark.parametrize(
    "render_mode,sh_degree,rasterize_mode,with_bg,per_camera",
    [("RGB", None, "classic", True, False), ("RGB+ED", 2, "antialiased", False, False),
     ("D", 3, "classic", True, True), ("RGB+D", None, "antialiased", True, True), ("ED", 0, "classic", False, False)],
)  # fmt: skip
def test_rasterization_packed_equals_unpacked(
    render_mode, sh_degree, rasterize_mode, with_bg, per_camera, device, backend
):  # fmt: skip
    C, N, W, H = 3, 48, 29, 23
    inputs = [t.to(device) for t in _scene(C, N, W, H, sh_degree=sh_degree, per_camera_colors=per_camera)]
    D = 3
    bg = torch.rand(C, D, dtype=torch.float64, device=device) if with_bg else None
    kw = dict(sh_degree=sh_degree, render_mode=render_mode, rasterize_mode=rasterize_mode, backgrounds=bg,
              tile_size=8, absgrad=True, backend=backend)  # fmt: skip
    outs = {}
    for packed in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        img, alpha, meta = ff.rasterization(*leaves, W, H, packed=packed, **kw)
        seeds = [torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=t.dtype).to(device)
                 for t in (img, alpha)]  # fmt: skip
        g = grads([img, alpha], leaves, seeds)
        outs[packed] = img, alpha, meta, g
    img_d, alpha_d, meta_d, g_d = outs[False]
    img_p, alpha_p, meta_p, g_p = outs[True]
    assert_close(img_p, img_d, torch.float64, msg="render_colors")
    assert_close(alpha_p, alpha_d, torch.float64, msg="render_alphas")
    names = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")
    for a, b, name in zip(g_p, g_d, names):
        assert_close(a, b, torch.float64, msg=f"grad {name}")
    cam, gid = meta_p["camera_ids"].long(), meta_p["gaussian_ids"].long()
    visible = (meta_d["radii"] > 0).all(-1)
    assert torch.equal(visible.nonzero(), torch.stack([cam, gid], -1)), "the visible pairs, camera-major"
    assert 0 < cam.numel() < C * N
    for key in ("radii", "means2d", "depths", "conics", "opacities", "tiles_per_gauss"):
        assert torch.equal(meta_p[key].detach(), meta_d[key].detach()[cam, gid]), key
    assert torch.equal(meta_p["isect_ids"], meta_d["isect_ids"])
    assert_close(meta_p["means2d"].absgrad, meta_d["means2d"].absgrad[cam, gid], torch.float64, msg="absgrad")


@pytest.mark.parametrize("device,backend", backend_cases("project_gaussians"))
def test_project_gaussians_packed(device, backend):
    C, N, W, H = 2, 30, 25, 19
    means, quats, scales, opacities, _, viewmats, Ks = (t.to(device) for t in _scene(C, N, W, H))
    dense = ff.project_gaussians(means, quats, scales, opacities, viewmats, Ks, W, H, backend=backend)
    cam, gid, *rows = ff.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, W, H, packed=True, backend=backend
    )
    visible = (dense[0] > 0).all(-1)
    assert cam.dtype == gid.dtype == torch.int32
    assert torch.equal(torch.stack([cam.long(), gid.long()], -1), visible.nonzero())
    for got, want in zip(rows, dense):
        assert torch.equal(got, want[cam.long(), gid.long()])


@pytest.mark.parametrize("device,backend", RASTER_CASES)
def test_packed_rasterize_refuses_bad_ids_and_shapes(device, backend):
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 10, 16, 12, 8, 3, 9, torch.float32)
    _, tables, pids = _pack_tables(m2d, con, col, opac, fids, extra=0)
    R = tables[0].shape[0]
    tables = [t.to(device) for t in tables]
    offsets, pids = offsets.to(device), pids.to(device)

    def call(ids=pids, ts=tables, packed=True):
        return ff.rasterize_to_pixels(*ts, 16, 12, 8, offsets, ids, packed=packed, backend=backend)

    call()
    past = pids.clone()
    past[3] = R
    with pytest.raises(
        ValueError, match=rf"flatten_ids must lie in \[0, {R - 1}\] \(indices into the nnz = {R} packed"
    ):
        call(past)
    neg = pids.clone()
    neg[0] = -1
    with pytest.raises(ValueError, match="flatten_ids must lie in"):
        call(neg)
    with pytest.raises(ValueError, match=rf"colors must have shape \[{R}, \*\]"):
        call(ts=[tables[0], tables[1], tables[2][:-1], tables[3]])
    with pytest.raises(ValueError, match=r"means2d must have shape \[\*, 2\] \(packed rows\)"):
        call(ts=[tables[0][None], *tables[1:]])
    with pytest.raises(ValueError, match=r"means2d must have shape \[\*, \*, 2\]"):
        call(packed=False)


@pytest.mark.parametrize("device,backend", backend_cases("isect_tiles", grad=False))
def test_packed_isect_refuses_bad_arguments(device, backend):
    W, H, ts = 30, 22, 8
    means, quats, scales, opacities, _, viewmats, Ks = (t.to(device) for t in _scene(2, 20, W, H))
    cam, gid, radii, m2d, depths, conics, _ = ff.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, W, H, packed=True
    )
    tw, th = ref.tile_grid(W, H, ts)
    args = (m2d, radii, depths, ts, tw, th)
    kw = dict(packed=True, n_images=2, image_ids=cam, backend=backend)
    ff.isect_tiles(*args, **kw)
    with pytest.raises(ValueError, match="needs n_images and image_ids"):
        ff.isect_tiles(*args, packed=True, n_images=2, backend=backend)
    with pytest.raises(ValueError, match="only with packed=True"):
        ff.isect_tiles(m2d[None], radii[None], depths[None], ts, tw, th, n_images=1, backend=backend)
    with pytest.raises(ValueError, match=rf"image_ids must have shape \[{cam.numel()}\]"):
        ff.isect_tiles(*args, **{**kw, "image_ids": cam[:-1]})
    with pytest.raises(TypeError, match="image_ids must be int32"):
        ff.isect_tiles(*args, **{**kw, "image_ids": cam.long()})
    with pytest.raises(ValueError, match=r"image_ids must lie in \[0, n_images\) = \[0, 1\)"):
        ff.isect_tiles(*args, **{**kw, "n_images": 1})
    with pytest.raises(ValueError, match="conics must have shape"):
        ff.isect_tiles(*args, conics[:-1], opacities[gid.long()][:-1], **kw)


def test_pack_gradient_goes_to_its_pair():
    # pack() is a gather of distinct pairs: each row's gradient lands on its own entry, nothing summed.
    t = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    cam = torch.tensor([0, 0, 1], dtype=torch.int32)
    gid = torch.tensor([1, 4, 0], dtype=torch.int32)
    (rows,) = splat_ops.pack(cam, gid, t)
    g = torch.randn_like(rows)
    (gt,) = torch.autograd.grad(rows, t, g)
    want = torch.zeros_like(t)
    want[0, 1], want[0, 4], want[1, 0] = g[0], g[1], g[2]
    assert torch.equal(gt, want)

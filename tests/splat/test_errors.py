"""Bad input gets a clear error naming the argument."""

import unittest.mock

import pytest
import torch

from frontiers_fast import _checks
from frontiers_fast.ops import splat as ops
from frontiers_fast.reference import splat as ref

from ..helpers import backends_for
from .scenes import cameras, gaussians, projected

W, H = 16, 12


@pytest.fixture
def scene():
    viewmats, Ks = cameras(2, W, H, torch.float32)
    means, quats, scales, opacities = gaussians(10, torch.float32)
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=torch.rand(10, 3),
                viewmats=viewmats, Ks=Ks, width=W, height=H)  # fmt: skip


def _with(scene, **kw):
    return ops.rasterization(**{**scene, **kw})


def _nan(t, idx=0):
    t = t.clone()
    t.view(-1)[idx] = float("nan")
    return t


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda s: dict(means=s["means"][:, :2]), ValueError, r"means must have shape \[\*, 3\]"),
        (lambda s: dict(means=s["means"].double()), TypeError, "quats has dtype"),
        (lambda s: dict(means=s["means"].long()), TypeError, "means must be float32 or float64"),
        (lambda s: dict(means=s["means"].tolist()), TypeError, "means must be a torch.Tensor"),
        (lambda s: dict(means=_nan(s["means"])), ValueError, "means must be finite"),
        (
            lambda s: dict(means=s["means"].clone().index_fill_(0, torch.tensor([3]), float("inf"))),
            ValueError,
            "means must be finite",
        ),
        (lambda s: dict(quats=s["quats"][:9]), ValueError, r"quats must have shape \[10, 4\]"),
        (lambda s: dict(quats=torch.zeros(10, 4)), ValueError, "quats must be non-zero"),
        # F.normalize would leave these ~1e-8 long: a near-identity rotation, not a unit quaternion.
        (
            lambda s: dict(quats=s["quats"].clone().index_fill_(0, torch.tensor([4]), 1e-20)),
            ValueError,
            r"quats must be non-zero with norm >= 1e-12 .*quats\[4\] has norm 2e-20",
        ),
        (lambda s: dict(scales=-s["scales"]), ValueError, "scales must be positive"),
        (lambda s: dict(scales=s["scales"].half()), TypeError, "scales must be float32 or float64"),
        (lambda s: dict(opacities=s["opacities"] + 1.5), ValueError, "opacities must lie in"),
        (lambda s: dict(opacities=s["opacities"][None]), ValueError, "opacities must have shape"),
        (lambda s: dict(opacities=_nan(s["opacities"])), ValueError, "opacities must be finite"),
        (
            lambda s: dict(colors=torch.rand(11, 3)),
            ValueError,
            r"colors must have shape \[10, \*\] or \[2, 10, \*\]",
        ),
        (
            lambda s: dict(colors=torch.rand(3, 10, 3)),
            ValueError,
            r"colors must have shape \[10, \*\] or \[2, 10, \*\]",
        ),
        (
            lambda s: dict(colors=torch.rand(10, 3), sh_degree=0),
            ValueError,
            r"colors must have shape \[10, \*, 3\] or \[2, 10, \*, 3\] \(SH coefficients",
        ),
        (
            lambda s: dict(colors=torch.rand(2, 11, 4, 3), sh_degree=1),
            ValueError,
            r"colors must have shape \[10, \*, 3\] or \[2, 10, \*, 3\]",
        ),
        (
            lambda s: dict(viewmats=torch.zeros(2, 4, 4), colors=torch.rand(10, 4, 3), sh_degree=1),
            ValueError,
            r"viewmats must be invertible .*viewmats\[0\] is singular",
        ),
        (
            # Projection reads only the top three rows: the camera is fine, its inverse is not.
            lambda s: dict(
                viewmats=s["viewmats"] * torch.tensor([1.0, 1, 1, 0])[:, None],
                colors=torch.rand(10, 4, 3),
                sh_degree=1,
            ),
            ValueError,
            "viewmats must be invertible",
        ),
        (lambda s: dict(colors=_nan(s["colors"])), ValueError, "colors must be finite"),
        (lambda s: dict(colors=torch.rand(10, 3, 3), sh_degree=2), ValueError, "colors has 3 SH bases"),
        (
            lambda s: dict(colors=torch.rand(10, 16, 3), sh_degree=4),
            ValueError,
            r"sh_degree must be in \[0, 3\]",
        ),
        (lambda s: dict(colors=torch.rand(10, 16, 3), sh_degree=1.0), TypeError, "sh_degree must be an int"),
        (lambda s: dict(viewmats=s["viewmats"][:, :3]), ValueError, r"viewmats must have shape \[\*, 4, 4\]"),
        (
            lambda s: dict(viewmats=s["viewmats"][:0], Ks=s["Ks"][:0]),
            ValueError,
            "viewmats must hold at least one",
        ),
        (lambda s: dict(viewmats=_nan(s["viewmats"], 3)), ValueError, "viewmats must be finite"),
        (lambda s: dict(Ks=s["Ks"][:1]), ValueError, r"Ks must have shape \[2, 3, 3\]"),
        (
            lambda s: dict(Ks=s["Ks"] * torch.tensor([[-1.0, 1, 1], [1, 1, 1], [1, 1, 1]])),
            ValueError,
            "Ks must have positive focal",
        ),
        (
            lambda s: dict(Ks=s["Ks"] * torch.tensor([[1.0, 1, 1], [1, 0, 1], [1, 1, 1]])),
            ValueError,
            "Ks must have positive focal",
        ),
        (lambda s: dict(width=0), ValueError, "width must be >= 1"),
        (lambda s: dict(height=-3), ValueError, "height must be >= 1"),
        (lambda s: dict(width=16.0), TypeError, "width must be an int"),
        (lambda s: dict(near_plane=0.0), ValueError, "near_plane must be > 0"),
        (lambda s: dict(far_plane=0.001), ValueError, "far_plane must be > near_plane"),
        (lambda s: dict(eps2d=-0.1), ValueError, "eps2d must be >= 0"),
        (lambda s: dict(eps2d=float("nan")), ValueError, "eps2d must be finite"),
        (lambda s: dict(radius_clip=-1.0), ValueError, "radius_clip must be >= 0"),
        (lambda s: dict(tile_size=0), ValueError, "tile_size must be >= 1"),
        (lambda s: dict(tile_size=12), ValueError, "tile_size must be a positive power of two, got 12"),
        (lambda s: dict(render_mode="RGBD"), ValueError, "render_mode must be one of"),
        (lambda s: dict(rasterize_mode="mip"), ValueError, "rasterize_mode must be one of"),
        (lambda s: dict(backgrounds=torch.rand(2, 4)), ValueError, r"backgrounds must have shape \[2, 3\]"),
        (
            lambda s: dict(backgrounds=torch.rand(2, 3, dtype=torch.float64)),
            TypeError,
            "backgrounds has dtype",
        ),
        (lambda s: dict(Ks=s["Ks"].to("meta")), ValueError, "Ks is on meta"),
        (lambda s: dict(colors=s["colors"].to("meta")), ValueError, "colors is on meta"),
        (lambda s: dict(backend="fast"), ValueError, "backend"),
    ],
)
def test_rasterization_bad_inputs(scene, change, exc, match):
    with pytest.raises(exc, match=match):
        _with(scene, **change(scene))


def test_gpu_backends_on_cpu_tensors(scene):
    # Every stage has its Triton kernel: forced on CPU tensors, each function says where Triton runs
    # (the launchers themselves run on CPU tensors only under the interpreter, in the Triton tests).
    on_cuda = "backend 'triton' runs on CUDA tensors, got tensors on cpu"
    with pytest.raises(ValueError, match=on_cuda):
        _with(scene, backend="triton")
    with pytest.raises(ValueError, match=on_cuda):
        ops.spherical_harmonics(0, torch.randn(3, 3), torch.randn(3, 1, 3), backend="triton")
    with pytest.raises(ValueError, match=on_cuda):
        ops.isect_tiles(torch.zeros(1, 1, 2), torch.ones(1, 1, 2, dtype=torch.int32), torch.ones(1, 1), 16, 1, 1,
                        backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match=on_cuda):
        ops.isect_offset_encode(torch.zeros(0, dtype=torch.int64), 1, 1, 1, backend="triton")


def test_unimplemented_cuda_backend(scene):
    # The CUDA extension has the blender's forward only: a render forced to it, or any other stage, is
    # refused by name rather than run elsewhere.
    with pytest.raises(NotImplementedError, match="not implemented"):
        _with(scene, backend="cuda")
    with pytest.raises(NotImplementedError, match="not implemented"):
        ops.spherical_harmonics(0, torch.randn(3, 3), torch.randn(3, 1, 3), backend="cuda")
    with pytest.raises(NotImplementedError, match="not implemented"):
        ops.isect_tiles(torch.zeros(1, 1, 2), torch.ones(1, 1, 2, dtype=torch.int32), torch.ones(1, 1), 16, 1, 1,
                        backend="cuda")  # fmt: skip
    with pytest.raises(NotImplementedError, match="not implemented"):
        ops.isect_offset_encode(torch.zeros(0, dtype=torch.int64), 1, 1, 1, backend="cuda")


def test_stage_bad_inputs(scene):
    s = scene
    with pytest.raises(ValueError, match="Ks must have positive focal"):
        ops.project_gaussians(
            s["means"], s["quats"], s["scales"], s["opacities"], s["viewmats"], -s["Ks"], W, H
        )
    with pytest.raises(TypeError, match="antialiased must be a bool"):
        ops.project_gaussians(s["means"], s["quats"], s["scales"], s["opacities"], s["viewmats"], s["Ks"], W, H,
                              antialiased=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"degree must be in \[0, 3\]"):
        ops.spherical_harmonics(4, torch.randn(3, 3), torch.randn(3, 25, 3))
    with pytest.raises(ValueError, match="coeffs has 4 bases"):
        ops.spherical_harmonics(2, torch.randn(3, 3), torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match=r"dirs must have shape"):
        ops.spherical_harmonics(1, torch.randn(3, 2), torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match=r"coeffs must have shape \[3, \*, 3\]"):
        ops.spherical_harmonics(1, torch.randn(3, 3), torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="masks must be a bool"):
        ops.spherical_harmonics(1, torch.randn(3, 3), torch.randn(3, 4, 3), torch.ones(3))
    with pytest.raises(ValueError, match="dirs must be finite"):
        ops.spherical_harmonics(1, _nan(torch.randn(3, 3)), torch.randn(3, 4, 3))

    means2d, conics, opac, offsets, fids, radii, depths = projected(2, 10, W, H, 8, dtype=torch.float32)
    colors = torch.rand(2, 10, 3)
    with pytest.raises(TypeError, match="radii must be int32"):
        ops.isect_tiles(means2d, radii.float(), depths, 8, 2, 2)
    with pytest.raises(ValueError, match=r"depths must have shape \[2, 10\]"):
        ops.isect_tiles(means2d, radii, depths[:, :5], 8, 2, 2)
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        ops.isect_tiles(means2d, radii, depths, 0, 2, 2)
    with pytest.raises(ValueError, match="tile_size must be a positive power of two, got 6"):
        ops.isect_tiles(means2d, radii, depths, 6, 2, 2)
    with pytest.raises(TypeError, match="isect_ids must be int64"):
        ops.isect_offset_encode(torch.zeros(3, dtype=torch.int32), 2, 2, 2)
    args = (means2d, conics, colors, opac, W, H, 8, offsets, fids)
    ops.rasterize_to_pixels(*args)  # the unmodified call is fine
    with pytest.raises(ValueError, match=r"isect_offsets must have shape \[2, 2, 2\]"):
        ops.rasterize_to_pixels(*args[:7], offsets[:, :1], fids)
    with pytest.raises(TypeError, match="flatten_ids must be int32"):
        ops.rasterize_to_pixels(*args[:8], fids.long())
    with pytest.raises(ValueError, match="flatten_ids must lie in"):
        ops.rasterize_to_pixels(*args[:8], fids + 100)
    with pytest.raises(ValueError, match=r"conics must have shape \[2, 10, 3\]"):
        ops.rasterize_to_pixels(means2d, conics[..., :2], *args[2:])
    with pytest.raises(ValueError, match=r"backgrounds must have shape \[2, 3\]"):
        ops.rasterize_to_pixels(*args, torch.rand(3))
    with pytest.raises(TypeError, match="colors has dtype torch.float64 but means2d has torch.float32"):
        ops.rasterize_to_pixels(means2d, conics, colors.double(), *args[3:])
    with pytest.raises(TypeError, match="coeffs has dtype torch.float64 but dirs"):
        ops.spherical_harmonics(1, torch.randn(3, 3), torch.randn(3, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="opacities is on meta"):
        ops.rasterize_to_pixels(means2d, conics, colors, opac.to("meta"), *args[4:])


def test_stage_bad_values(scene):
    # Value checks run in the op bodies, so they hold for the stage ops called directly.
    means2d, conics, opac, offsets, fids, radii, depths = projected(2, 10, W, H, 8, dtype=torch.float32)
    colors, bg = torch.rand(2, 10, 3), torch.rand(2, 3)
    ops.isect_tiles(means2d, radii, depths, 8, 2, 2)  # the unmodified call is fine
    radii = radii.clone()
    radii[:, :4] = 0  # culled
    visible = (radii > 0).all(-1)
    assert visible.any()
    # A culled Gaussian may have any depth (gsplat's Python projection leaves them negative).
    ops.isect_tiles(means2d, radii, depths.masked_fill(~visible, -1.0), 8, 2, 2)
    with pytest.raises(ValueError, match="depths must be >= 0 where radii > 0"):
        ops.isect_tiles(means2d, radii, depths.masked_fill(visible, -1.0), 8, 2, 2)
    with pytest.raises(ValueError, match="depths must be finite"):
        ops.isect_tiles(means2d, radii, _nan(depths, 3), 8, 2, 2)
    with pytest.raises(ValueError, match="means2d must be finite"):
        ops.isect_tiles(_nan(means2d, 5), radii, depths, 8, 2, 2)

    args = dict(means2d=means2d, conics=conics, colors=colors, opacities=opac, width=W, height=H, tile_size=8,
                isect_offsets=offsets, flatten_ids=fids, backgrounds=bg)  # fmt: skip
    ops.rasterize_to_pixels(**args)
    for name in ("means2d", "conics", "colors", "opacities", "backgrounds"):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            ops.rasterize_to_pixels(**{**args, name: _nan(args[name], 1)})
    assert fids.numel() > 2 and offsets.reshape(-1)[-1] > 0
    # Decreasing, past M, negative.
    for off in (offsets.flip(-1), offsets + fids.numel(), offsets - 1):
        with pytest.raises(ValueError, match=r"isect_offsets must be non-decreasing .* lie in \[0, M\]"):
            ops.rasterize_to_pixels(**{**args, "isect_offsets": off.contiguous()})
    with pytest.raises(
        ValueError, match=r"flatten_ids must lie in \[0, 19\] \(indices into the C \* N = 20 Gaussians\)"
    ):
        ops.rasterize_to_pixels(**{**args, "flatten_ids": fids - 1})


def _bits(count):  # gsplat main's bits_for_count, restated
    return max(count - 1, 0).bit_length()


@pytest.mark.parametrize("C,tw,th,fits", [
    (1 << 11, 1 << 10, 1 << 10, True),  # 11 + 20 = 31 bits: the largest that fits
    (1 + (1 << 11), 1 << 10, 1 << 10, False),  # 12 + 20
    (1 << 11, 1 + (1 << 10), 1 << 10, False),  # 11 + 21
    (3000, 1024, 1023, False),  # 12 + 20 = 32: the camera field would reach the int64 sign bit
    (1, 1 << 16, 1 << 15, True),  # 0 + 31
])  # fmt: skip
def test_isect_key_bits_boundary(C, tw, th, fits):
    assert (_bits(C) + _bits(tw * th) <= 31) == fits
    # One Gaussian per camera, a 1-pixel radius around the centre of tile 0.
    means2d = torch.full((C, 1, 2), 8.0)
    radii = torch.ones(C, 1, 2, dtype=torch.int32)
    depths = torch.rand(C, 1) + 1
    if not fits:
        with pytest.raises(
            ValueError, match=r"means2d has \d+ cameras and tile_width x tile_height is \d+ tiles"
        ):
            ops.isect_tiles(means2d, radii, depths, 16, tw, th)
        return
    _, ids, fids = ops.isect_tiles(means2d, radii, depths, 16, tw, th)
    assert ids.numel() == C and (ids >= 0).all()
    assert torch.equal(fids.long(), torch.arange(C))  # sorted by camera first
    assert torch.equal(ids >> (32 + _bits(tw * th)), torch.arange(C))
    # (No isect_offset_encode here: at 31 bits its output has ~2^31 entries.)


def test_isect_int32_limits():
    L = ref.INT32_LIMIT
    assert L == 2**31
    # C * N: flatten_ids index [0, C * N) with int32, so C * N = 2^31 is the largest.
    ref.check_isect_sizes(2, L // 2, 1)
    ref.check_isect_sizes(L, 1, 1)
    with pytest.raises(ValueError, match=r"means2d has C \* N = 2 x 1073741825"):
        ref.check_isect_sizes(2, L // 2 + 1, 1)
    # Shape-only: raised before any O(C * N) work (expanded views allocate nothing).
    C, N = 2, L // 2 + 1
    means2d, depths = torch.zeros(1, 1, 2).expand(C, N, 2), torch.ones(1, 1).expand(C, N)
    radii = torch.ones(1, 1, 2, dtype=torch.int32).expand(C, N, 2)
    with pytest.raises(ValueError, match="more than the int32 flatten_ids can index"):
        ops.isect_tiles(means2d, radii, depths, 16, 1, 1)

    # M: isect_offsets hold run starts up to M, so M <= 2^31 - 1.  On a
    # 2^16 x 2^15 grid of 1-pixel tiles, Gaussian 0 covers all columns of the
    # first 2^15 - 1 rows and Gaussian 1 the last row from column `x0` on:
    # M = 2^31 - 2^16 + (2^16 - x0).
    def overlaps(x0):
        means2d = torch.tensor([[[2.0**15, 2.0**14 - 1], [2.0**15 + x0, 2.0**15 + 0.5]]])
        radii = torch.tensor([[[1 << 15, 1 << 14], [1 << 15, 1]]], dtype=torch.int32)
        return means2d, radii, torch.ones(1, 2), 1, 1 << 16, 1 << 15

    for backend in backends_for("isect_tiles", "cpu", grad=False):
        with pytest.raises(ValueError, match=r"the Gaussians cover M = 2147483648 \(Gaussian, tile\) pairs"):
            ops.isect_tiles(*overlaps(0), backend=backend)
    # Just at the limit the keys would take 24 GiB: stop at the allocation
    # that follows the checks (the memory check told to pass), and read the M
    # it was given.
    calls = []

    def stop(*a, **k):
        calls.append(a[0])
        raise RuntimeError("past the check")

    with (
        unittest.mock.patch.object(_checks, "memory_bytes", lambda device: None),
        unittest.mock.patch.object(torch, "empty", stop),
        pytest.raises(RuntimeError, match="past"),
    ):
        ref.isect_tiles(*overlaps(1))
    assert calls == [L - 1]
    # Without the patch, on a machine with less than 24 GiB: refused, by every backend alike.
    if 12 * (L - 1) > _checks.memory_bytes("cpu"):
        msgs = set()
        for backend in backends_for("isect_tiles", "cpu", grad=False):
            with pytest.raises(
                ValueError, match=r"the tile intersection list \(M = 2147483647 .* is too large"
            ) as e:
                ops.isect_tiles(*overlaps(1), backend=backend)
            msgs.add(str(e.value))
        assert len(msgs) == 1


def test_isect_max_intersections():
    means2d, conics, opac, _, _, radii, depths = projected(2, 20, W, H, 8, dtype=torch.float32)
    tw, th = ref.tile_grid(W, H, 8)
    for backend in backends_for("isect_tiles", "cpu", grad=False):
        for extra in ((), (conics, opac)):
            _, ids, _ = ops.isect_tiles(means2d, radii, depths, 8, tw, th, *extra, backend=backend)
            M = ids.numel()
            assert M > 5
            got = ops.isect_tiles(
                means2d, radii, depths, 8, tw, th, *extra, max_intersections=M, backend=backend
            )
            assert torch.equal(got[1], ids)
            with pytest.raises(
                ValueError,
                match=rf"the Gaussians cover M = {M} \(Gaussian, tile\) pairs, more than max_intersections = {M - 1};",
            ):
                ops.isect_tiles(
                    means2d, radii, depths, 8, tw, th, *extra, max_intersections=M - 1, backend=backend
                )
    # The reference's memory bound: M's 12 bytes per intersection against the device's memory.
    with (
        unittest.mock.patch.object(_checks, "memory_bytes", lambda device: 12 * M - 1),
        pytest.raises(
            ValueError, match=rf"the tile intersection list \(M = {M} .*is too large: it needs 0.0 GiB"
        ),
    ):
        ref.isect_tiles(means2d, radii, depths, 8, tw, th, conics, opac)
    with pytest.raises(ValueError, match="max_intersections must be >= 0"):
        ops.isect_tiles(means2d, radii, depths, 8, tw, th, max_intersections=-1)
    with pytest.raises(TypeError, match="max_intersections must be an int"):
        ops.isect_tiles(means2d, radii, depths, 8, tw, th, max_intersections=10.0)
    with pytest.raises(ValueError, match="isect_tiles got conics but not opacities"):
        ops.isect_tiles(means2d, radii, depths, 8, tw, th, conics)
    with pytest.raises(ValueError, match=r"opacities must have shape \[2, 20\]"):
        ops.isect_tiles(means2d, radii, depths, 8, tw, th, conics, opac[:1])
    with pytest.raises(TypeError, match="conics has dtype torch.float64 but means2d"):
        ops.isect_tiles(means2d, radii, depths, 8, tw, th, conics.double(), opac)
    with pytest.raises(ValueError, match="opacities must lie in"):
        ops.isect_tiles(means2d, radii, depths, 8, tw, th, conics, opac * 2)
    # rasterization passes its cap on.
    viewmats, Ks = cameras(2, W, H, torch.float32)
    means, quats, scales, opacities = gaussians(10, torch.float32)
    args = (means, quats, scales, opacities, torch.rand(10, 3), viewmats, Ks, W, H)
    _, _, meta = ops.rasterization(*args, tile_size=8)
    M = meta["isect_ids"].numel()
    ops.rasterization(*args, tile_size=8, max_intersections=M)
    with pytest.raises(ValueError, match=rf"more than max_intersections = {M - 1}"):
        ops.rasterization(*args, tile_size=8, max_intersections=M - 1)

"""Bad input gets a clear error naming the argument."""

import pytest
import torch

from frontiers_fast.ops import splat as ops
from frontiers_fast.reference import splat as ref

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
        (lambda s: dict(means=_nan(s["means"])), ValueError, "means contains non-finite"),
        (
            lambda s: dict(means=s["means"].clone().index_fill_(0, torch.tensor([3]), float("inf"))),
            ValueError,
            "means contains non-finite",
        ),
        (lambda s: dict(quats=s["quats"][:9]), ValueError, r"quats must have shape \[10, 4\]"),
        (lambda s: dict(quats=torch.zeros(10, 4)), ValueError, "quats must be non-zero"),
        (lambda s: dict(scales=-s["scales"]), ValueError, "scales must be positive"),
        (lambda s: dict(scales=s["scales"].half()), TypeError, "scales must be float32 or float64"),
        (lambda s: dict(opacities=s["opacities"] + 1.5), ValueError, "opacities must lie in"),
        (lambda s: dict(opacities=s["opacities"][None]), ValueError, "opacities must have shape"),
        (lambda s: dict(opacities=_nan(s["opacities"])), ValueError, "opacities contains non-finite"),
        (lambda s: dict(colors=torch.rand(11, 3)), ValueError, r"colors must have shape \[10, \*\]"),
        (lambda s: dict(colors=torch.rand(3, 10, 3)), ValueError, r"colors must have shape \[2, 10, \*\]"),
        (lambda s: dict(colors=_nan(s["colors"])), ValueError, "colors contains non-finite"),
        (lambda s: dict(colors=torch.rand(10, 3, 3), sh_degree=2), ValueError, "colors has 3 SH bases"),
        (lambda s: dict(colors=torch.rand(10, 16, 3), sh_degree=4), ValueError, "sh_degree must be in 0..3"),
        (lambda s: dict(colors=torch.rand(10, 16, 3), sh_degree=1.0), TypeError, "sh_degree must be an int"),
        (lambda s: dict(viewmats=s["viewmats"][:, :3]), ValueError, r"viewmats must have shape \[\*, 4, 4\]"),
        (
            lambda s: dict(viewmats=s["viewmats"][:0], Ks=s["Ks"][:0]),
            ValueError,
            "viewmats must hold at least one",
        ),
        (lambda s: dict(viewmats=_nan(s["viewmats"], 3)), ValueError, "viewmats contains non-finite"),
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


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_unimplemented_backends(scene, backend):
    with pytest.raises(NotImplementedError, match="not implemented"):
        _with(scene, backend=backend)
    with pytest.raises(NotImplementedError, match="not implemented"):
        ops.spherical_harmonics(0, torch.randn(3, 3), torch.randn(3, 1, 3), backend=backend)


def test_stage_bad_inputs(scene):
    s = scene
    with pytest.raises(ValueError, match="Ks must have positive focal"):
        ops.project_gaussians(
            s["means"], s["quats"], s["scales"], s["opacities"], s["viewmats"], -s["Ks"], W, H
        )
    with pytest.raises(TypeError, match="antialiased must be a bool"):
        ops.project_gaussians(s["means"], s["quats"], s["scales"], s["opacities"], s["viewmats"], s["Ks"], W, H,
                              antialiased=1)  # fmt: skip
    with pytest.raises(ValueError, match="degree must be in 0..3"):
        ops.spherical_harmonics(4, torch.randn(3, 3), torch.randn(3, 25, 3))
    with pytest.raises(ValueError, match="coeffs has 4 bases"):
        ops.spherical_harmonics(2, torch.randn(3, 3), torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match=r"dirs must have shape"):
        ops.spherical_harmonics(1, torch.randn(3, 2), torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match=r"coeffs must have shape \[3, \*, 3\]"):
        ops.spherical_harmonics(1, torch.randn(3, 3), torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="masks must be a bool"):
        ops.spherical_harmonics(1, torch.randn(3, 3), torch.randn(3, 4, 3), torch.ones(3))
    with pytest.raises(ValueError, match="dirs contains non-finite"):
        ops.spherical_harmonics(1, _nan(torch.randn(3, 3)), torch.randn(3, 4, 3))

    means2d, conics, opac, offsets, fids, radii, depths = projected(2, 10, W, H, 8, dtype=torch.float32)
    colors = torch.rand(2, 10, 3)
    with pytest.raises(TypeError, match="radii must be int32"):
        ops.isect_tiles(means2d, radii.float(), depths, 8, 2, 2)
    with pytest.raises(ValueError, match=r"depths must have shape \[2, 10\]"):
        ops.isect_tiles(means2d, radii, depths[:, :5], 8, 2, 2)
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        ops.isect_tiles(means2d, radii, depths, 0, 2, 2)
    with pytest.raises(TypeError, match="isect_ids must be a 1-D int64"):
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


def test_too_many_tiles_for_the_key():
    means2d, _, _, _, _, radii, depths = projected(1, 4, 8, 8, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        ref.isect_tiles(means2d, radii, depths, 1, 1 << 16, 1 << 16)

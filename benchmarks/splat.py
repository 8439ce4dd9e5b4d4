"""pytest-benchmark suite for the Gaussian splatting stages, for tracking regressions:

    .venv/bin/python -m pytest benchmarks/splat.py --benchmark-only --benchmark-json=out.json

The comparative report is `python -m frontiers_fast.bench`; this suite times
our registered ops on a fixed seeded subset of the garden scene (camera 0,
648 x 420) so that a change can be compared with `--benchmark-compare`.
"""

import pytest
import torch

from frontiers_fast.data import load_garden
from frontiers_fast.ops import splat as ops
from frontiers_fast.reference import splat as ref

N = 20_000


@pytest.fixture(scope="module")
def scene():
    s = load_garden(max_points=N, seed=0)
    return (s.means, s.quats, s.scales, s.opacities, s.colors, s.viewmats[:1], s.Ks[:1], s.width, s.height)


@pytest.fixture(scope="module")
def projected(scene):
    means, quats, scales, opacities, colors, viewmats, Ks, W, H = scene
    radii, means2d, depths, conics, _ = ops.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, W, H
    )
    tw, th = ref.tile_grid(W, H, 16)
    _, ids, fids = ops.isect_tiles(means2d, radii, depths, 16, tw, th)
    offsets = ops.isect_offset_encode(ids, 1, tw, th)
    return means2d, conics, colors[None], opacities[None], offsets, fids, radii, depths


def test_project(benchmark, scene):
    means, quats, scales, opacities, _, viewmats, Ks, W, H = scene
    benchmark(lambda: ops.project_gaussians(means, quats, scales, opacities, viewmats, Ks, W, H))


def test_isect(benchmark, scene, projected):
    means2d, radii, depths = projected[0], projected[6], projected[7]
    benchmark(lambda: ops.isect_tiles(means2d, radii, depths, 16, *ref.tile_grid(scene[7], scene[8], 16)))


def test_rasterize_to_pixels(benchmark, scene, projected):
    means2d, conics, colors, opac, offsets, fids = projected[:6]
    benchmark(
        lambda: ops.rasterize_to_pixels(means2d, conics, colors, opac, scene[7], scene[8], 16, offsets, fids)
    )


def test_rasterization_fwd(benchmark, scene):
    benchmark(lambda: ops.rasterization(*scene))


def test_rasterization_fwd_bwd(benchmark, scene):
    leaves = [t.clone().requires_grad_(True) for t in scene[:5]]

    def step():
        img, _, _ = ops.rasterization(*leaves, *scene[5:])
        return torch.autograd.grad(img.sum(), leaves)

    benchmark(step)

"""Data sets shipped with the package (see the README.*.md files beside this one
for provenance and LICENSE.* for licences)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Planetoid:
    x: torch.Tensor  # [N, F] float32
    y: torch.Tensor  # [N] int64
    edge_index: torch.Tensor  # [2, E] int64
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    test_mask: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.y.max().item()) + 1


def load_cora(normalize_features: bool = True) -> Planetoid:
    """Cora with the standard Planetoid split (140 / 500 / 1000 nodes).

    ``normalize_features`` row-normalises the bag-of-words features, as the
    usual GCN recipe does (PyG's ``NormalizeFeatures``).
    """
    with np.load(os.path.join(_HERE, "cora.npz")) as z:
        x = torch.from_numpy(z["x"].astype(np.float32))
        d = {k: torch.from_numpy(z[k]) for k in ("y", "edge_index", "train_mask", "val_mask", "test_mask")}
    if normalize_features:
        x = x / x.sum(1, keepdim=True).clamp(min=1)
    return Planetoid(x=x, **d)


@dataclass
class GardenScene:
    means: torch.Tensor  # [N, 3] float32, world frame
    quats: torch.Tensor  # [N, 4] float32, (w, x, y, z), unit norm
    scales: torch.Tensor  # [N, 3] float32
    opacities: torch.Tensor  # [N] float32
    colors: torch.Tensor  # [N, 3] float32 in [0, 1]
    viewmats: torch.Tensor  # [3, 4, 4] float32, world to camera
    Ks: torch.Tensor  # [3, 3, 3] float32
    width: int
    height: int

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]


def load_garden(max_points: int | None = None, seed: int = 0, tile: int = 1) -> GardenScene:
    """The Mip-NeRF 360 "garden" SfM point cloud with three cameras (from gsplat's test asset).

    The points inside [-2, 2]^3 are kept.  ``tile`` (odd) repeats that cloud
    on a tile x tile grid in the x-y plane, 4 units apart, to mimic a bigger
    scene.  The file has no Gaussian shapes, so everything random comes from
    one ``torch.Generator().manual_seed(seed)``, in this order: first, when
    ``max_points`` is below the point count, the subset it keeps
    (``randperm(n)[:max_points]``); then scales U[1e-4, 0.02] [N, 3],
    quaternions normalised standard-normal [N, 4] and opacities U[0, 1] [N]
    (see README.garden.md).  So the shapes of a subset are not those of the
    same points in the full cloud.
    """
    if not isinstance(tile, int) or tile < 1 or tile % 2 == 0:
        raise ValueError(f"tile must be a positive odd int, got {tile!r}")
    with np.load(os.path.join(_HERE, "garden.npz")) as z:
        means = torch.from_numpy(z["means3d"].astype(np.float32))
        colors = torch.from_numpy(z["colors"].astype(np.float32) / 255.0)
        viewmats = torch.from_numpy(z["viewmats"].astype(np.float32))
        Ks = torch.from_numpy(z["Ks"].astype(np.float32))
        width, height = int(z["width"]), int(z["height"])
    inside = (means.abs() <= 2.0).all(1)
    means, colors = means[inside], colors[inside]
    if tile > 1:
        r = torch.arange(tile, dtype=torch.float32) - tile // 2
        shift = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2) * 4.0
        shift = torch.cat([shift, torch.zeros(shift.shape[0], 1)], 1)  # [tile^2, 3]
        means = (means[None] + shift[:, None]).reshape(-1, 3)
        colors = colors.repeat(tile * tile, 1)
    gen = torch.Generator().manual_seed(seed)
    if max_points is not None and max_points < means.shape[0]:
        keep = torch.randperm(means.shape[0], generator=gen)[:max_points]
        means, colors = means[keep], colors[keep]
    N = means.shape[0]
    scales = torch.rand(N, 3, generator=gen) * (0.02 - 1e-4) + 1e-4
    quats = torch.nn.functional.normalize(torch.randn(N, 4, generator=gen), dim=-1)
    opacities = torch.rand(N, generator=gen)
    return GardenScene(means, quats, scales, opacities, colors, viewmats, Ks, width, height)

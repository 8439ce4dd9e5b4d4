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

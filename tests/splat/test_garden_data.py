"""The shipped garden scene and its randomisation convention."""

import hashlib
import os

import pytest
import torch

from frontiers_fast.data import load_garden


def test_file_is_the_gsplat_asset():
    import frontiers_fast.data as data

    here = os.path.dirname(data.__file__)
    assert os.path.exists(os.path.join(here, "LICENSE.garden"))
    shared = os.path.join(
        os.path.dirname(here), "..", "..", "shared", "data", "gsplat_garden", "test_garden.npz"
    )
    if not os.path.exists(shared):
        pytest.skip("the shared copy of the asset is not on this machine")
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
    assert digest(os.path.join(here, "garden.npz")) == digest(shared)


def test_load_garden_convention():
    s = load_garden()
    assert s.num_gaussians == 111_785 and (s.width, s.height) == (648, 420)
    assert s.viewmats.shape == (3, 4, 4) and s.Ks.shape == (3, 3, 3)
    assert (s.means.abs() <= 2).all()
    assert (s.colors >= 0).all() and (s.colors <= 1).all()
    assert (s.scales >= 1e-4).all() and (s.scales <= 0.02).all()
    assert (s.opacities >= 0).all() and (s.opacities <= 1).all()
    torch.testing.assert_close(s.quats.norm(dim=-1), torch.ones(s.num_gaussians))
    again = load_garden()
    assert torch.equal(s.scales, again.scales) and torch.equal(s.quats, again.quats)
    assert not torch.equal(s.opacities, load_garden(seed=1).opacities)


def test_load_garden_tiling_and_subset():
    s = load_garden()
    t = load_garden(tile=3)
    assert t.num_gaussians == 9 * s.num_gaussians
    centre = t.means[4 * s.num_gaussians : 5 * s.num_gaussians]  # the middle copy of the 3 x 3 grid
    assert torch.equal(centre, s.means)
    assert t.means[:, :2].abs().max() <= 6 and t.means[:, 2].abs().max() <= 2
    sub = load_garden(max_points=500, seed=3)
    assert sub.num_gaussians == 500 and torch.equal(sub.means, load_garden(max_points=500, seed=3).means)
    with pytest.raises(ValueError, match="tile"):
        load_garden(tile=2)

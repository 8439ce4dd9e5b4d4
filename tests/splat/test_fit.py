"""The splatting family's end-to-end use: fitting a perturbed scene back to its images.

The garden subset's three quarter-resolution renders are the targets; the
means are jittered, the colours and opacities reset; 200 Adam steps through
the renderer's forward and backward must raise the PSNR by at least 6 dB
(issue: the splatting kernels).  Run on the CPU's default backend (C++)
and, in float64 with fewer steps, checked to follow the reference's curve.
"""

import pytest
import torch

from frontiers_fast.bench.splat_fit import fit


def test_fit_raises_psnr_by_6_db():
    r = fit(steps=200)
    assert r.backend == "cpp"
    assert len(r.psnr) == 201
    gain = r.psnr[-1] - r.psnr[0]
    assert gain >= 6.0, f"PSNR rose by only {gain:.2f} dB ({r.psnr[0]:.2f} -> {r.psnr[-1]:.2f})"
    assert r.psnr[-1] > max(r.psnr[:-1]) - 0.5  # no late divergence


@pytest.mark.parametrize("backend", ["cpp"])
def test_fit_follows_the_reference(backend):
    # Same scene, same steps, float64: the optimiser sees the same gradients up to rounding, so the
    # PSNR curves agree closely (the reference is slow: a small subset and a few steps).
    ours = fit(n_points=500, steps=5, backend=backend, dtype=torch.float64)
    ref = fit(n_points=500, steps=5, backend="reference", dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(ours.psnr), torch.tensor(ref.psnr), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.after, ref.after, rtol=1e-6, atol=1e-8)

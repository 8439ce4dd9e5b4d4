"""Fitting Gaussians to images through our renderer: the splatting family's end-to-end use.

The garden subset (``load_garden(max_points=n)``) rendered by its three
cameras at quarter resolution gives the target images.  The scene is then
perturbed -- means jittered by ``jitter`` times the cloud's extent, colours
reset to grey and opacities to 0.1 -- and Adam, through our forward and
backward, fits means, colours, opacities and scales back to the targets.
:func:`fit` returns the PSNR curve and the time per step; ``examples/fit_garden.py``
prints progress and saves a before/after image; ``tests/splat/test_fit.py``
checks that the PSNR rises by at least 6 dB in 200 steps.

Parameters are unconstrained: opacities are sigmoid(logits) and scales
exp(log_scales), so every step stays a valid scene for the renderer's
checks (opacities in [0, 1], scales > 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .. import _backend
from ..data import load_garden
from ..ops import splat as ops


@dataclass
class FitResult:
    psnr: list[float] = field(
        default_factory=list
    )  # PSNR (dB) against the targets before each step, then after the last
    seconds_per_step: float = 0.0
    backend: str = ""
    targets: torch.Tensor | None = None  # [3, H, W, 3]
    before: torch.Tensor | None = None  # renders of the perturbed scene
    after: torch.Tensor | None = None  # renders after the last step


def psnr(img: torch.Tensor, target: torch.Tensor) -> float:
    """10 log10(1 / MSE) for images in [0, 1]."""
    mse = float((img.clamp(0, 1) - target).square().mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))


def quarter_cameras(scene, factor: int = 4):
    """The scene's cameras at 1/factor of its resolution: Ks' focal lengths and principal points scaled."""
    Ks = scene.Ks.clone()
    Ks[:, :2, :] /= factor
    return scene.viewmats, Ks, scene.width // factor, scene.height // factor


def fit(
    n_points: int = 10_000,
    steps: int = 200,
    jitter: float = 0.005,
    seed: int = 0,
    backend: str | None = None,
    log_every: int = 0,
    dtype: torch.dtype = torch.float32,
) -> FitResult:
    """Perturb the garden subset and fit it back to its three quarter-resolution renders.

    Example: ``r = fit(steps=200); print(r.psnr[0], r.psnr[-1], r.seconds_per_step)``
    """
    s = load_garden(max_points=n_points, seed=seed)
    viewmats, Ks, W, H = quarter_cameras(s)
    viewmats, Ks = viewmats.to(dtype), Ks.to(dtype)
    means, quats, scales, opacities, colors = (
        t.to(dtype) for t in (s.means, s.quats, s.scales, s.opacities, s.colors)
    )

    def render(m, q, sc, o, c):
        img, _, _ = ops.rasterization(m, q, sc, o, c, viewmats, Ks, W, H, backend=backend)
        return img

    with torch.no_grad():
        targets = render(means, quats, scales, opacities, colors)

    gen = torch.Generator().manual_seed(seed + 1)
    extent = float((means.amax(0) - means.amin(0)).max())
    p_means = (means + jitter * extent * torch.randn(means.shape, generator=gen, dtype=dtype)).requires_grad_(
        True
    )
    p_colors = torch.full_like(colors, 0.5).requires_grad_(True)
    p_logits = torch.full_like(opacities, math.log(0.1 / 0.9)).requires_grad_(True)  # opacity 0.1
    p_log_scales = scales.log().clone().requires_grad_(True)
    opt = torch.optim.Adam(
        [
            {"params": [p_means], "lr": 2e-4 * extent},
            {"params": [p_colors], "lr": 0.05},
            {"params": [p_logits], "lr": 0.1},
            {"params": [p_log_scales], "lr": 0.01},
        ]
    )

    def current():
        return render(p_means, quats, p_log_scales.exp(), torch.sigmoid(p_logits), p_colors)

    out = FitResult(
        targets=targets, backend=backend or _backend.resolve(None, means.device, "rasterization", True)
    )
    start = time.perf_counter()
    for step in range(steps):
        img = current()
        if step == 0:
            out.before = img.detach()
        out.psnr.append(psnr(img.detach(), targets))
        loss = (img - targets).abs().mean()  # L1, as 3DGS trains
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {float(loss.detach()):.5f}  PSNR {out.psnr[-1]:.2f} dB", flush=True)
    out.seconds_per_step = (time.perf_counter() - start) / max(steps, 1)
    with torch.no_grad():
        out.after = current()
    out.psnr.append(psnr(out.after, targets))
    return out


def save_images(result: FitResult, path: str, camera: int = 0) -> None:
    """Target, before and after of one camera side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = torch.cat([result.targets[camera], result.before[camera], result.after[camera]], 1)
    plt.imsave(path, row.clamp(0, 1).cpu().numpy())


def save_curve(result: FitResult, path: str) -> None:
    """The PSNR curve (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    ax.plot(range(len(result.psnr)), result.psnr)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("PSNR vs targets (dB)")
    ax.set_title(f"garden subset, 3 cameras, quarter resolution ({result.backend})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

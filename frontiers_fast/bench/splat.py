"""Gaussian splatting benchmark: the reference renderer on the real garden scene.

The renderer is a baseline (its stages do not all have kernels yet):
``frontiers_fast[reference]`` is the registered ``rasterization`` running its
PyTorch reference, timed in float32 after checking it against a float64
render of the same scene.  One camera (camera 0 of the three in the file) at
the file's 648 x 420.  The spherical-harmonics stage, which has its C++
kernel, is also timed alone against the reference.
"""

from __future__ import annotations

import os

import torch

TARGETS: list = []  # baselines only in this issue
QUICK_POINTS = 10_000


def _scene(quick, device):
    from ..data import load_garden

    # quick: a seeded 10k subset of the cloud, same cameras and resolution.
    s = load_garden(max_points=QUICK_POINTS if quick else None, seed=0)
    to = lambda t, dt: t.to(device=device, dtype=dt)
    cam = slice(0, 1)

    def args(dt):
        return (to(s.means, dt), to(s.quats, dt), to(s.scales, dt), to(s.opacities, dt), to(s.colors, dt),
                to(s.viewmats[cam], dt), to(s.Ks[cam], dt), s.width, s.height)  # fmt: skip

    return s, args


def _save_png(img, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, img.detach().clamp(0, 1).cpu().numpy())


def run(bench, out_dir=None):
    from ..ops import splat as ops

    device, quick = bench.device, bench.quick
    s, args = _scene(quick, device)
    n = s.num_gaussians
    case = f"rasterization / garden{f' {QUICK_POINTS // 1000}k' if quick else ''} {s.width}x{s.height}"
    print(
        f"[splat] {case}: {n} Gaussians, camera 0 (no CPU peer: gsplat's rasterizer needs CUDA)", flush=True
    )

    # The float64 render is the truth; float32 differs where a pair's alpha
    # sits within rounding of the 1/255 cut or a pixel's T of the 1e-4 stop,
    # i.e. by at most ~1/255 of a colour in a handful of pixels.
    img64, alpha64, _ = ops.rasterization(*args(torch.float64))
    expected = [img64, alpha64]
    a32 = args(torch.float32)

    def fwd():
        img, alpha, _ = ops.rasterization(*a32)
        return [img, alpha]

    first = fwd()
    bench.case(case, "fwd", expected, 1e-2).run("frontiers_fast[reference]", fwd, check=lambda: first)

    # Backward on a subset: the reference backward recomputes every block, and
    # the whole cloud would not fit the benchmark's time budget on a CPU.
    sub = 2_000 if quick else 10_000
    bcase = f"rasterization fwd+bwd / garden {sub // 1000}k {s.width}x{s.height}"
    b32 = _subset(a32, sub)
    b64 = [t.double() if isinstance(t, torch.Tensor) else t for t in b32]
    gen = torch.Generator().manual_seed(1)
    seed = torch.rand(1, s.height, s.width, 3, generator=gen).to(device)

    def fwd_bwd(a, seed):
        leaves = [t.clone().requires_grad_(True) for t in a[:5]]
        img, _, _ = ops.rasterization(*leaves, *a[5:])
        return [img.detach(), *torch.autograd.grad(img, leaves, seed)]

    expected = fwd_bwd(b64, seed.double())
    bfirst = fwd_bwd(b32, seed)
    bench.case(bcase, "fwd+bwd", expected, 1e-2).run(
        "frontiers_fast[reference]", lambda: fwd_bwd(b32, seed), check=lambda: bfirst
    )

    _sh_cases(bench, s, a32)

    sections = []
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        _save_png(first[0][0], os.path.join(out_dir, "garden.png"))
        line = (f"{n:,} Gaussians (garden SfM points in [-2, 2]^3), camera 0 of 3, {s.width}x{s.height}; "
                "scales U[1e-4, 0.02], quaternions normalised N(0, 1), opacities U[0, 1], seed 0; plain RGB point "
                "colours (sh_degree=None), classic mode, eps2d 0.3, tile 16, black background; float32 reference.")  # fmt: skip
        sections.append(
            ("Garden render", f"![garden render, camera 0, {s.width}x{s.height}](garden.png)\n\n{line}")
        )
    return sections


def _sh_cases(bench, s, a32):
    """The spherical-harmonics stage alone, degree 3, on every Gaussian of the scene.

    Directions from camera 0's centre to the means; coefficients N(0, 1)
    (the file has plain colours).  Its data (about 21 MB) fits in the L3.
    """
    from ..ops import splat as ops

    means, viewmats = a32[0], a32[5]
    R, t = viewmats[0, :3, :3], viewmats[0, :3, 3]
    dirs = means - (-R.T @ t)
    gen = torch.Generator().manual_seed(3)
    coeffs = torch.randn(means.shape[0], 16, 3, generator=gen).to(means.device)
    n = means.shape[0]
    want = ops.spherical_harmonics(3, dirs.double(), coeffs.double(), backend="reference")
    providers = [*bench.ours("spherical_harmonics"), "reference"]
    with bench.case(f"spherical_harmonics degree 3 / garden {n} Gaussians", "fwd", want, 1e-5) as case:
        for b in providers:
            case.run(f"frontiers_fast[{b}]", lambda b=b: ops.spherical_harmonics(3, dirs, coeffs, backend=b))
    seed = torch.randn(n, 3, generator=gen).to(means.device)

    def fwd_bwd(d, c, b):
        d, c = d.clone().requires_grad_(True), c.clone().requires_grad_(True)
        out = ops.spherical_harmonics(3, d, c, backend=b)
        return [out.detach(), *torch.autograd.grad(out, [d, c], seed.to(d.dtype))]

    want = fwd_bwd(dirs.double(), coeffs.double(), "reference")
    with bench.case(f"spherical_harmonics degree 3 / garden {n} Gaussians", "fwd+bwd", want, 1e-5) as case:
        for b in providers:
            case.run(f"frontiers_fast[{b}]", lambda b=b: fwd_bwd(dirs, coeffs, b))


def _subset(a, n):
    """The first n Gaussians of a (seeded, shuffled-by-construction) scene."""
    gen = torch.Generator().manual_seed(2)
    keep = torch.randperm(a[0].shape[0], generator=gen)[:n].to(a[0].device)
    return [t[keep] for t in a[:5]] + list(a[5:])

"""Fit perturbed Gaussians of the garden scene back to its three camera images.

    python examples/fit_garden.py [--steps 200] [--points 10000] [--backend cpp] [--out fit_garden.png]

The targets are the subset's own renders at quarter resolution; the means
are jittered, the colours reset to grey and the opacities to 0.1, and Adam
fits them back through frontiers_fast's renderer (forward and backward).
Prints the loss and PSNR as it goes, then saves target | before | after of
camera 0 and the PSNR curve.
"""

import argparse

from frontiers_fast.bench.splat_fit import fit, save_curve, save_images


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--points", type=int, default=10_000)
    p.add_argument("--backend", default=None, help="cpp, reference, ... (default: the device's fastest)")
    p.add_argument("--out", default="fit_garden.png", help="before/after image; the curve goes to *_psnr.png")
    args = p.parse_args()
    r = fit(n_points=args.points, steps=args.steps, backend=args.backend, log_every=20)
    print(
        f"PSNR {r.psnr[0]:.2f} -> {r.psnr[-1]:.2f} dB (+{r.psnr[-1] - r.psnr[0]:.2f}) in {args.steps} steps, "
        f"{r.seconds_per_step * 1000:.1f} ms per step ({r.backend})"
    )
    save_images(r, args.out)
    curve = args.out.rsplit(".", 1)[0] + "_psnr.png"
    save_curve(r, curve)
    print(f"saved {args.out} (target | before | after, camera 0) and {curve}")


if __name__ == "__main__":
    main()

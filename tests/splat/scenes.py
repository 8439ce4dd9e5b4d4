"""Random small scenes, direct tile-intersection inputs and an independent, obviously sequential blender."""

import math

import torch

from frontiers_fast.reference import splat as ref


def random_rotation(dtype):
    q = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    return ref.quat_to_rotmat(q).to(dtype)


def cameras(C, width, height, dtype=torch.float64, focal=None):
    """C cameras looking roughly down +z at the origin from about 4 units away."""
    focal = focal or 0.9 * width
    viewmats = torch.zeros(C, 4, 4, dtype=dtype)
    for c in range(C):
        # Small random rotation about a random axis keeps the scene in view.
        axis = torch.nn.functional.normalize(torch.randn(3, dtype=torch.float64), dim=0)
        half = 0.1 * torch.rand(()).item()
        q = torch.cat([torch.tensor([math.cos(half)], dtype=torch.float64), math.sin(half) * axis])
        viewmats[c, :3, :3] = ref.quat_to_rotmat(q).to(dtype)
        viewmats[c, :3, 3] = torch.tensor([0.2 * torch.randn(()).item(), 0.2 * torch.randn(()).item(), 4.0])
        viewmats[c, 3, 3] = 1
    Ks = torch.zeros(C, 3, 3, dtype=dtype)
    Ks[:, 0, 0] = focal * (1 + 0.1 * torch.rand(C, dtype=dtype))
    Ks[:, 1, 1] = focal * (1 + 0.1 * torch.rand(C, dtype=dtype))
    Ks[:, 0, 2] = width / 2 + torch.randn(C, dtype=dtype)
    Ks[:, 1, 2] = height / 2 + torch.randn(C, dtype=dtype)
    Ks[:, 2, 2] = 1
    return viewmats, Ks


def gaussians(N, dtype=torch.float64, extent=1.0, scale=(0.05, 0.3), opacity=(0.05, 1.0)):
    means = (torch.rand(N, 3, dtype=dtype) * 2 - 1) * extent
    quats = torch.randn(N, 4, dtype=dtype)
    scales = torch.empty(N, 3, dtype=dtype).uniform_(*scale)
    opacities = torch.empty(N, dtype=dtype).uniform_(*opacity)
    return means, quats, scales, opacities


def projected(C, N, width, height, tile_size, dtype=torch.float64, **kw):
    """A projected random scene: (means2d, conics, opacities [C, N], offsets, flatten_ids, radii, depths)."""
    viewmats, Ks = cameras(C, width, height, dtype)
    means, quats, scales, opacities = gaussians(N, dtype, **kw)
    radii, means2d, depths, conics, _ = ref.project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height
    )
    tw, th = ref.tile_grid(width, height, tile_size)
    _, ids, fids = ref.isect_tiles(means2d, radii, depths, tile_size, tw, th)
    offsets = ref.isect_offset_encode(ids, C, tw, th)
    return means2d, conics, opacities[None].expand(C, N).contiguous(), offsets, fids, radii, depths


def isect_inputs(C, N, width, height, gen, dtype=torch.float64):
    """Direct isect_tiles inputs with every case the tests need: means on and off the image, small and
    huge, round and thin ellipses, non-positive-definite conics, opacities at and below 1/255, culled
    Gaussians (radius 0, negative depth), and repeated depths (ties keep the Gaussian order)."""
    f64 = dict(generator=gen, dtype=torch.float64)
    means2d = torch.rand(C, N, 2, **f64) * torch.tensor([width * 1.3, height * 1.3]) - 0.15 * torch.tensor(
        [width, height]
    )
    # Covariance R diag(s1, s2) R^T + 0.3 I, as after the projection's blur.
    theta = torch.rand(C, N, **f64) * math.pi
    s1 = torch.exp(torch.rand(C, N, **f64) * 7 - 2)  # 0.14 .. 150 px^2
    s2 = s1 * torch.exp(-torch.rand(C, N, **f64) * 6)  # aspect up to 1:400
    cos, sin = torch.cos(theta), torch.sin(theta)
    sxx = s1 * cos**2 + s2 * sin**2 + 0.3
    syy = s1 * sin**2 + s2 * cos**2 + 0.3
    sxy = (s1 - s2) * cos * sin
    det = sxx * syy - sxy**2
    conics = torch.stack([syy / det, -sxy / det, sxx / det], -1)
    opac = torch.rand(C, N, **f64)
    opac.view(-1)[::7] = 1.0
    opac.view(-1)[3::11] = 1 / 255 + torch.rand(opac.view(-1)[3::11].shape, **f64) * 1e-3
    opac.view(-1)[5::13] *= 1 / 255  # below the cut: no pixel uses them
    extend = torch.sqrt(2 * torch.log(255 * opac.clamp(min=1 / 255))).clamp(max=3.33)
    radii = torch.stack([torch.ceil(extend * sxx.sqrt()), torch.ceil(extend * syy.sqrt())], -1).to(
        torch.int32
    )
    radii.view(C * N, 2)[2::9] = 0  # culled
    depths = torch.rand(C, N, **f64) * 10 + 0.1
    depths.view(-1)[1::4] = depths.view(-1)[0]  # ties
    depths.view(-1)[2::9] = -1.0  # culled Gaussians may have any depth
    conics.view(C * N, 3)[4::17, 1] = (
        2 * (conics.view(C * N, 3)[4::17, 0] * conics.view(C * N, 3)[4::17, 2]).sqrt()
    )
    conics.view(C * N, 3)[6::23] *= -1  # not positive definite: they keep their whole box
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in (means2d, radii, depths, conics, opac))


def blend_pixel_loop(
    means2d, conics, colors, opacities, width, height, tile_size, offsets, flatten_ids, backgrounds
):
    """The textbook loop: every pixel walks its tile's list front to back.

    Returns colours [C, H, W, D], alphas [C, H, W, 1] (float64) and how many
    pixels stopped early.
    """
    C, N, D = colors.shape
    tw, th = ref.tile_grid(width, height, tile_size)
    m = means2d.double().reshape(C * N, 2).tolist()
    q = conics.double().reshape(C * N, 3).tolist()
    col = colors.double().reshape(C * N, D).tolist()
    o = opacities.double().reshape(C * N).tolist()
    off = offsets.reshape(-1).tolist() + [flatten_ids.numel()]
    ids = flatten_ids.tolist()
    out = torch.zeros(C, height, width, D, dtype=torch.float64)
    alphas = torch.zeros(C, height, width, 1, dtype=torch.float64)
    stopped = 0
    for c in range(C):
        for i in range(height):
            for j in range(width):
                t = c * tw * th + (i // tile_size) * tw + j // tile_size
                T, acc = 1.0, [0.0] * D
                for g in ids[off[t] : off[t + 1]]:
                    dx, dy = j + 0.5 - m[g][0], i + 0.5 - m[g][1]
                    sigma = 0.5 * (q[g][0] * dx * dx + q[g][2] * dy * dy) + q[g][1] * dx * dy
                    if sigma < 0:
                        continue
                    a = min(0.99, o[g] * math.exp(-sigma))
                    if a < 1 / 255:
                        continue
                    if T * (1 - a) <= 1e-4:
                        stopped += 1
                        break
                    for d in range(D):
                        acc[d] += col[g][d] * a * T
                    T *= 1 - a
                bg = [0.0] * D if backgrounds is None else backgrounds[c].double().tolist()
                out[c, i, j] = torch.tensor([acc[d] + T * bg[d] for d in range(D)], dtype=torch.float64)
                alphas[c, i, j, 0] = 1 - T
    return out, alphas, stopped


def blend_depth_order(means2d, conics, colors, opacities, radii, depths, width, height, backgrounds=None):
    """No tiles: per camera, visible Gaussians in (float32 depth, index) order.

    Each Gaussian touches only the pixels inside its bounding box: outside it
    its alpha is below 1/255, so neither the box nor the tile lists change the
    result.  Returns float64 colours [C, H, W, D] and alphas [C, H, W, 1].
    """
    C, N, D = colors.shape
    outs, alphas = [], []
    for c in range(C):
        vis = (radii[c] > 0).all(-1).nonzero().flatten()
        order = vis[torch.sort(depths[c, vis].float(), stable=True).indices]
        T = torch.ones(height, width, dtype=torch.float64)
        done = torch.zeros(height, width, dtype=torch.bool)
        acc = torch.zeros(height, width, D, dtype=torch.float64)
        for g in order.tolist():
            mx, my = means2d[c, g].double().tolist()
            rx, ry = radii[c, g].tolist()
            x0, x1 = max(0, math.floor(mx - rx) - 1), min(width, math.ceil(mx + rx) + 1)
            y0, y1 = max(0, math.floor(my - ry) - 1), min(height, math.ceil(my + ry) + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            a_, b_, c_ = conics[c, g].double().tolist()
            dx = torch.arange(x0, x1, dtype=torch.float64)[None, :] + 0.5 - mx
            dy = torch.arange(y0, y1, dtype=torch.float64)[:, None] + 0.5 - my
            sigma = 0.5 * (a_ * dx * dx + c_ * dy * dy) + b_ * dx * dy
            alpha = (float(opacities[c, g]) * torch.exp(-sigma)).clamp(max=0.99)
            win = (slice(y0, y1), slice(x0, x1))
            Tw = T[win]
            use = (sigma >= 0) & (alpha >= 1 / 255) & ~done[win]
            nxt = Tw * (1 - alpha)
            stop = use & (nxt <= 1e-4)
            done[win] |= stop
            use &= ~stop
            acc[win] += torch.where(use, alpha * Tw, 0.0)[..., None] * colors[c, g].double()
            T[win] = torch.where(use, nxt, Tw)
        if backgrounds is not None:
            acc = acc + T[..., None] * backgrounds[c].double()
        outs.append(acc)
        alphas.append(1 - T)
    return torch.stack(outs), torch.stack(alphas)[..., None]

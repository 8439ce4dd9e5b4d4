"""torch.library registration (opcheck, fake tensors, compile), backend choice and fp64 gradchecks."""

import pytest
import torch

from frontiers_fast import _backend
from frontiers_fast.ops import splat as splat_ops
from frontiers_fast.reference import splat as ref

from ..helpers import check_compiled, first_cpu_backend, opcheck, spy_backends
from .scenes import cameras, gaussians, projected

ops = torch.ops.frontiers_fast
W, H = 19, 13
B = first_cpu_backend("rasterization")


def _grad(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


def _visible_scene(N=12):
    """Gaussians well inside the view, opacities away from the thresholds."""
    viewmats, Ks = cameras(2, W, H)
    means, quats, scales, opacities = gaussians(N, extent=0.5, scale=(0.15, 0.3), opacity=(0.3, 0.8))
    return means, quats, scales, opacities, viewmats, Ks


def test_opcheck_project_gaussians():
    means, quats, scales, opacities, viewmats, Ks = _visible_scene()
    for aa in (False, True):
        args = (*_grad(means, quats, scales), opacities, *_grad(viewmats, Ks), W, H, 0.3, 0.01, 1e10, 0.0, aa,
                B)  # fmt: skip
        opcheck(ops.project_gaussians, args)
    g = [torch.randn(2, 12, 2, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64),
         torch.randn(2, 12, 3, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)]  # fmt: skip
    args = (means, quats, scales, opacities, viewmats, Ks, W, H, 0.3, 0.01, 1e10, 0.0, True, *g, B)
    opcheck(ops.project_gaussians_bwd, args, full=False)


def test_opcheck_spherical_harmonics():
    dirs = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(5, 16, 3, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(5) > 0.3
    for degree in (0, 3):
        opcheck(ops.spherical_harmonics, (degree, dirs, coeffs, masks, B))
        opcheck(ops.spherical_harmonics, (degree, dirs, coeffs, None, B))
    args = (2, dirs.detach(), coeffs.detach(), masks, torch.randn(5, 3, dtype=torch.float64), B)
    opcheck(ops.spherical_harmonics_bwd, args, full=False)


def test_opcheck_isect():
    means2d, conics, opac, _, _, radii, depths = projected(2, 20, W, H, 8)
    tw, th = ref.tile_grid(W, H, 8)
    opcheck(ops.isect_tiles, (means2d, radii, depths, 8, tw, th, None, None, None, None, 0, B), full=False)
    opcheck(ops.isect_tiles, (means2d, radii, depths, 8, tw, th, conics, opac, 1000, None, 0, B), full=False)
    _, ids, _ = ops.isect_tiles(means2d, radii, depths, 8, tw, th, conics, opac, None, None, 0, B)
    opcheck(ops.isect_offset_encode, (ids, 2, tw, th, B), full=False)


def test_opcheck_rasterize_to_pixels():
    means2d, conics, opac, offsets, fids, _, _ = projected(2, 20, W, H, 8, opacity=(0.3, 0.8))
    colors = torch.rand(2, 20, 3, dtype=torch.float64)
    bg = torch.rand(2, 3, dtype=torch.float64)
    for b, absgrad in ((bg, False), (None, True)):
        args = (*_grad(means2d, conics, colors, opac), None if b is None else b.clone().requires_grad_(True), W, H, 8,
                offsets, fids, absgrad, B)  # fmt: skip
        opcheck(ops.rasterize_to_pixels, args)
        _, _, final_t, last = ops.rasterize_to_pixels(*args)
        gc, ga = torch.randn(2, H, W, 3, dtype=torch.float64), torch.randn(2, H, W, 1, dtype=torch.float64)
        args = (means2d, conics, colors, opac, b, W, H, 8, offsets, fids, absgrad, final_t, last, gc, ga, B)
        opcheck(ops.rasterize_to_pixels_bwd, args, full=False)


def test_compile_fullgraph():
    means, quats, scales, opacities, viewmats, Ks = (t.float() for t in _visible_scene())
    sh = torch.randn(2, 12, 4, 3, requires_grad=True)

    def model(means, scales, sh):
        radii, means2d, depths, conics, _ = splat_ops.project_gaussians(means, quats, scales, opacities, viewmats, Ks,
                                                                        W, H)  # fmt: skip
        rgb = splat_ops.spherical_harmonics(1, means[None] - viewmats[:, None, :3, 3], sh)
        return means2d.sum() + depths.pow(2).sum() + conics.sum() + rgb.pow(2).sum()

    check_compiled(model, [*_grad(means, scales), sh])


@pytest.mark.gradcheck
@pytest.mark.parametrize("antialiased", [False, True])
def test_gradcheck_project_gaussians(antialiased):
    means, quats, scales, opacities, viewmats, Ks = _visible_scene(6)

    def fn(m, q, s, v, k):
        _, m2d, z, con, comp = splat_ops.project_gaussians(
            m, q, s, opacities, v, k, W, H, antialiased=antialiased
        )
        return m2d, z, con, comp

    assert torch.autograd.gradcheck(fn, _grad(means, quats, scales, viewmats, Ks))


@pytest.mark.gradcheck
def test_gradcheck_spherical_harmonics():
    dirs = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(4, 16, 3, dtype=torch.float64, requires_grad=True)
    masks = torch.tensor([True, False, True, True])
    for degree in range(4):
        assert torch.autograd.gradcheck(
            lambda d, c: splat_ops.spherical_harmonics(degree, d, c, masks), (dirs, coeffs)
        )


@pytest.mark.gradcheck
def test_gradcheck_rasterize_to_pixels():
    w, h, ts = 11, 9, 8
    means2d, conics, opac, offsets, fids, _, _ = projected(2, 8, w, h, ts, extent=0.5, scale=(0.2, 0.4),
                                                           opacity=(0.3, 0.8))  # fmt: skip
    colors = torch.rand(2, 8, 2, dtype=torch.float64)
    bg = torch.rand(2, 2, dtype=torch.float64)

    def fn(m, c, col, o, b):
        return splat_ops.rasterize_to_pixels(m, c, col, o, w, h, ts, offsets, fids, b)

    # fast_mode checks random projections of the Jacobian: the full one would
    # take one backward pass per output pixel.
    assert torch.autograd.gradcheck(fn, _grad(means2d, conics, colors, opac, bg), fast_mode=True)


@pytest.mark.gradcheck
def test_gradcheck_rasterization():
    means, quats, scales, opacities, viewmats, Ks = _visible_scene(5)
    colors = torch.rand(5, 3, dtype=torch.float64)
    bg = torch.rand(2, 3, dtype=torch.float64)

    def fn(m, q, s, o, c):
        img, alpha, _ = splat_ops.rasterization(m, q, s, o, c, viewmats, Ks, W, H, backgrounds=bg, tile_size=8,
                                                render_mode="RGB+D", rasterize_mode="antialiased")  # fmt: skip
        return img, alpha

    assert torch.autograd.gradcheck(fn, _grad(means, quats, scales, opacities, colors), fast_mode=True)


def test_reference_gradcheck():
    # The reference itself is differentiable by autograd (the ops' backward relies on it).
    dirs = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(3, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, c: ref.spherical_harmonics(2, d, c), (dirs, coeffs))


@pytest.mark.gradcheck
def test_gradcheck_rasterize_to_pixels_full_jacobian():
    w, h, ts = 6, 5, 4  # partial tiles on both axes; 90 outputs, so the full Jacobian is affordable
    means2d, conics, opac, offsets, fids, _, _ = projected(1, 5, w, h, ts, extent=0.4, scale=(0.3, 0.5),
                                                           opacity=(0.3, 0.8))  # fmt: skip
    colors = torch.rand(1, 5, 2, dtype=torch.float64)
    bg = torch.rand(1, 2, dtype=torch.float64)

    def fn(m, c, col, o, b):
        return splat_ops.rasterize_to_pixels(m, c, col, o, w, h, ts, offsets, fids, b)

    assert fids.numel() >= 5
    assert torch.autograd.gradcheck(fn, _grad(means2d, conics, colors, opac, bg))


def test_backward_under_inference_mode():
    # Plain autograd allows loss.backward() inside torch.inference_mode(); so
    # must the _bwd ops, which recompute a forward with autograd inside.
    means, quats, scales, opacities, viewmats, Ks = (t.float() for t in _visible_scene(20))
    sh = torch.randn(20, 4, 3)
    bg = torch.rand(2, 3)

    def grads(inference):
        leaves = _grad(means, scales, sh, bg)
        img, alpha, _ = splat_ops.rasterization(leaves[0], quats, leaves[1], opacities, leaves[2], viewmats, Ks, W, H,
                                                sh_degree=1, backgrounds=leaves[3], tile_size=8,
                                                rasterize_mode="antialiased")  # fmt: skip
        loss = img.pow(2).sum() + alpha.sum()
        with torch.inference_mode(inference):
            loss.backward()
        return [t.grad for t in leaves]

    for a, b in zip(grads(True), grads(False)):
        assert torch.equal(a, b) and a.abs().sum() > 0


def test_compile_fullgraph_blend_checks_values():
    # The blender's value checks run in its op body: a compiled fullgraph
    # still traces, matches eager, and still rejects bad values at run time.
    means2d, conics, opac, offsets, fids, _, _ = projected(
        2, 20, W, H, 8, dtype=torch.float32, opacity=(0.3, 0.8)
    )
    colors = torch.rand(2, 20, 3)

    def model(means2d, opac):
        img, alpha = splat_ops.rasterize_to_pixels(means2d, conics, colors, opac, W, H, 8, offsets, fids)
        return img.pow(2).sum() + alpha.sum()

    check_compiled(model, _grad(means2d, opac))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    bad = opac.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="opacities must be finite"):
        compiled(means2d, bad)
    with pytest.raises(ValueError, match=r"opacities must lie in \[0, 1\]"):
        compiled(means2d, opac * 2)


# ---------------------------------------------------------------------------
# backend choice: one resolve per public function, passed to every op
# ---------------------------------------------------------------------------
def _calls():
    """(public function name, call taking backend=, inputs that require grad) for every public function."""
    means, quats, scales, opacities, viewmats, Ks = _visible_scene(8)
    m2d, conics, opac, offsets, fids, radii, depths = projected(2, 8, W, H, 8, opacity=(0.3, 0.8))
    tw, th = ref.tile_grid(W, H, 8)
    _, ids, _ = ref.isect_tiles(m2d, radii, depths, 8, tw, th)
    leaves = _grad(means, scales)
    sh = torch.randn(8, 4, 3, dtype=torch.float64, requires_grad=True)
    dirs = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    colors = torch.rand(2, 8, 3, dtype=torch.float64, requires_grad=True)
    return [
        ("project_gaussians", lambda b: splat_ops.project_gaussians(
            leaves[0], quats, leaves[1], opacities, viewmats, Ks, W, H, backend=b)[1], leaves),
        ("spherical_harmonics", lambda b: splat_ops.spherical_harmonics(1, dirs, sh, backend=b), [dirs, sh]),
        ("isect_tiles", lambda b: splat_ops.isect_tiles(m2d, radii, depths, 8, tw, th, backend=b)[1], []),
        ("isect_offset_encode", lambda b: splat_ops.isect_offset_encode(ids, 2, tw, th, backend=b), []),
        ("rasterize_to_pixels", lambda b: splat_ops.rasterize_to_pixels(
            m2d, conics, colors, opac, W, H, 8, offsets, fids, backend=b)[0], [colors]),
        ("rasterization", lambda b: splat_ops.rasterization(
            leaves[0], quats, leaves[1], opacities, sh, viewmats, Ks, W, H, sh_degree=1, tile_size=8,
            backend=b)[0], [*leaves, sh]),
    ]  # fmt: skip


FUNCTIONS = [c[0] for c in _calls()]


@pytest.mark.parametrize("index", range(len(FUNCTIONS)), ids=FUNCTIONS)
def test_forced_cpp_runs_only_cpp_or_is_refused_naming_the_function(index):
    name, call, leaves = _calls()[index]
    if "cpp" in _backend.FUNCTIONS[name].implemented(bool(leaves)):
        with spy_backends() as calls:
            out = call("cpp")
            if leaves:
                torch.autograd.grad(out.double().pow(2).sum(), leaves, allow_unused=True)
        assert {b for _, b in calls} == {"cpp"}
        return
    with pytest.raises(
        NotImplementedError, match=rf"frontiers_fast\.{name}: backend 'cpp' is not implemented"
    ):
        call("cpp")


@pytest.mark.parametrize("index", range(len(FUNCTIONS)), ids=FUNCTIONS)
def test_reference_runs_every_op_forward_and_backward(index):
    name, call, leaves = _calls()[index]
    spec = _backend.FUNCTIONS[name]
    with spy_backends() as calls:
        out = call("reference")
        if leaves:
            torch.autograd.grad(out.double().pow(2).sum(), leaves, allow_unused=True)
    assert set(b for _, b in calls) == {"reference"}
    ran = {op for op, _ in calls}
    # rasterization calls every stage; the backward ops run with the forward's backend.
    assert ran <= set(spec.ops + spec.grad_ops)
    assert set(spec.ops) <= ran
    if leaves:
        assert ran & set(spec.grad_ops)


# Every stage has its C++ kernel (issue: the splatting kernels), and so rasterization, which composes them.
FAST = {
    name: ["cpp", "reference"]
    for name in ("spherical_harmonics", "project_gaussians", "rasterize_to_pixels", "isect_tiles",
                 "isect_offset_encode", "rasterization")
}  # fmt: skip


# The stages with a Triton kernel so far, and the one with a CUDA-extension kernel (forward only).
TRITON = {
    "spherical_harmonics",
    "isect_offset_encode",
    "project_gaussians",
    "rasterize_to_pixels",
    "isect_tiles",
    "rasterization",
}
CUDA = {"rasterize_to_pixels"}


def test_default_backend_is_cpp_and_reported():
    assert B == "cpp"
    for name in FUNCTIONS:
        report = _backend.backends(op=name)
        want = (["triton"] if name in TRITON else []) + (["cuda"] if name in CUDA else [])
        want += FAST.get(name, ["reference"])
        assert [b for b, r in report.items() if r["implemented"]] == want
        assert report["reference"]["available"]
    for name in FAST:
        for grad in (False, True):
            assert _backend.resolve(None, torch.device("cpu"), name, grad) == "cpp"

"""rasterization(backend="triton") end to end: every stage's Triton launcher, through the ops and autograd.

Under the interpreter the ops' refusal of the Triton backend on CPU tensors
(it is a CUDA backend) is lifted for the test, so each op runs the launcher
it names; on CUDA the launchers compile.  A small scene with SH colours, two
cameras, odd image sizes, every render mode, SH degrees 0 to 3 and plain
per-camera colours, classic and antialiased, packed and unpacked: the
images, the alphas, every input's gradient and absgrad against the float64
reference, and each stage's Triton forward and backward counted.  Then the
registration checks on the Triton backend of every stage: fp64 gradcheck,
opcheck (the ops and the _bwd kernel ops) and torch.compile against eager.
"""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast import _backend

from ..helpers import assert_close, check_compiled, grads, opcheck, spy_backends, triton_devices
from .scenes import cameras, gaussians

pytest.importorskip("triton")

STAGES = (
    "project_gaussians",
    "spherical_harmonics",
    "isect_tiles",
    "isect_offset_encode",
    "rasterize_to_pixels",
)
GRAD_STAGES = ("project_gaussians_bwd", "spherical_harmonics_bwd", "rasterize_to_pixels_bwd")


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize(
    "packed,rasterize_mode,render_mode,sh_degree",
    [(False, "classic", "RGB", 1), (True, "antialiased", "RGB+ED", 3), (True, "classic", "D", 0),
     (False, "antialiased", "ED", 2), (False, "classic", "RGB+D", None)],
)  # fmt: skip
def test_rasterization_triton_end_to_end(packed, rasterize_mode, render_mode, sh_degree, device, monkeypatch):
    if device == "cpu":
        monkeypatch.setitem(_backend._DEVICE, "triton", "cpu")
    torch.manual_seed(3)
    C, N, W, H = 2, 24, 23, 17
    means, quats, scales, opacities = gaussians(N)
    viewmats, Ks = cameras(C, W, H)
    if sh_degree is None:
        colors = torch.rand(C, N, 3, dtype=torch.float64)  # per camera
    else:
        colors = torch.randn(N, (sh_degree + 1) ** 2, 3, dtype=torch.float64) * 0.3
    bg = torch.rand(
        C, 3, dtype=torch.float64
    )  # the colour channels' (a depth channel gets a zero background)
    inputs = [means, quats, scales, opacities, colors]
    kw = dict(sh_degree=sh_degree, backgrounds=bg, rasterize_mode=rasterize_mode, render_mode=render_mode,
              tile_size=8, absgrad=True, packed=packed)  # fmt: skip
    theirs = [t.clone().requires_grad_(True) for t in inputs]
    img_w, alpha_w, meta_w = ff.rasterization(*theirs, viewmats, Ks, W, H, **kw, backend="reference")
    seeds = [torch.randn_like(img_w), torch.randn_like(alpha_w)]
    g_want = grads([img_w, alpha_w], theirs, seeds)

    ours = [t.clone().to(device).requires_grad_(True) for t in inputs]
    cams = [t.to(device) for t in (viewmats, Ks)]
    with spy_backends() as calls:
        img, alpha, meta = ff.rasterization(*ours, *cams, W, H, **{**kw, "backgrounds": bg.to(device)},
                                            backend="triton")  # fmt: skip
        g_got = grads([img, alpha], ours, [s.to(device) for s in seeds])
    for op in STAGES + GRAD_STAGES:
        no_sh = sh_degree is None or (op == "spherical_harmonics_bwd" and render_mode in ("D", "ED"))
        if "spherical" not in op or not no_sh:  # depth-only images do not read the colours' gradient
            assert calls[(op, "triton")] >= 1, op
    assert not any(b != "triton" for (_, b) in calls), calls
    assert_close(img.cpu(), img_w, torch.float64, msg="render_colors")
    assert_close(alpha.cpu(), alpha_w, torch.float64, msg="render_alphas")
    for name, g, w in zip(("means", "quats", "scales", "opacities", "colors"), g_got, g_want):
        assert_close(g.cpu(), w, torch.float64, msg=f"grad {name}")
    assert_close(meta["means2d"].absgrad.cpu(), meta_w["means2d"].absgrad, torch.float64, msg="absgrad")
    assert torch.equal(meta["isect_ids"].cpu(), meta_w["isect_ids"])


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The ops' CUDA-only refusal of the Triton backend lifted, so the interpreter runs the launchers on
    CPU tensors (on a GPU the backend tests list (cuda, triton) themselves: skipped there)."""
    if "cuda" in triton_devices():
        pytest.skip("on a GPU tests/splat/test_backends.py runs these on (cuda, triton)")
    monkeypatch.setitem(_backend._DEVICE, "triton", "cpu")


@pytest.mark.parametrize(
    "name", ["test_isect_opcheck_and_compile", "test_rasterize_to_pixels_gradcheck_and_registration"]
)
def test_registration_under_the_interpreter(name, triton_on_cpu):
    # The backend tests' fp64 gradcheck, opcheck and torch.compile checks, on the Triton backend.
    from . import test_backends

    getattr(test_backends, name)("cpu", "triton")


def test_spherical_harmonics_registration_under_the_interpreter(triton_on_cpu):
    # test_backends' SH registration test, slimmed for the interpreter (fast-mode gradcheck, one degree).
    gen = torch.Generator().manual_seed(7)
    dirs = torch.randn(6, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    coeffs = torch.randn(6, 17, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    masks = torch.rand(6, generator=gen) > 0.3
    fn = lambda d, c: ff.spherical_harmonics(3, d, c, masks, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (dirs, coeffs), fast_mode=True)
    opcheck(torch.ops.frontiers_fast.spherical_harmonics, (3, dirs, coeffs, masks, "triton"))
    go = torch.randn(6, 3, dtype=torch.float64)
    opcheck(torch.ops.frontiers_fast.spherical_harmonics_bwd, (2, dirs.detach(), coeffs.detach(), masks, go,
            "triton"), full=False)  # fmt: skip
    check_compiled(lambda d, c: fn(d, c).sum(), [dirs, coeffs])


def test_project_gaussians_registration_under_the_interpreter(triton_on_cpu):
    # test_backends' projection registration test, slimmed for the interpreter: its scene (every
    # special case), antialiased, fast-mode gradcheck.
    from .test_backends import _proj_args, _proj_scene

    W, H = 21, 15
    inputs, idx = _proj_scene(1, W, H, torch.float64, tiny=1e-3)
    keep = torch.arange(inputs[0].shape[0]) % 12 == 0
    keep[list(idx.values())] = True
    inputs = [t[keep] for t in inputs[:4]] + inputs[4:]
    means, quats, scales, opac, viewmats, Ks = (t.requires_grad_(i != 3) for i, t in enumerate(inputs))
    leaves = [means, quats, scales, viewmats, Ks]

    def fn(m, q, s, v, k):
        return ff.project_gaussians(m, q, s, opac, v, k, W, H, antialiased=True, backend="triton")[1:]

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    ops = torch.ops.frontiers_fast
    opcheck(
        ops.project_gaussians, _proj_args([means, quats, scales, opac, viewmats, Ks], W, H, True, "triton")
    )
    C, N = viewmats.shape[0], means.shape[0]
    g = [torch.randn(*s, dtype=torch.float64) for s in ((C, N, 2), (C, N), (C, N, 3), (C, N))]
    bwd_args = _proj_args(
        [t.detach() for t in (means, quats, scales, opac, viewmats, Ks)], W, H, True, "triton"
    )
    opcheck(ops.project_gaussians_bwd, (*bwd_args[:-1], *g, "triton"), full=False)
    check_compiled(lambda m, s: sum(o.square().sum() for o in fn(m, quats, s, viewmats, Ks)), [means, scales])

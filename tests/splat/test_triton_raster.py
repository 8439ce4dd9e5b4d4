"""The Triton blender (kernels/splat.py: rasterize_to_pixels and its _bwd) against the float64 reference.

Called directly: on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1 when there is no GPU), on CUDA tensors natively.  Scenes
with every branch of the blend (tests/splat/test_backends.py's
``_raster_scene``: the 0.99 clamp, pixels stopping at T = 1e-4, alphas under
1/255, conics that are not positive definite), odd image sizes that leave
partial tiles, tiles of 8 and 16, 1, 3 and 7 channels, backgrounds on and off,
several cameras, float32 and float64:
- the forward's four outputs (last_ids exactly the reference's);
- every gradient of the backward, absgrad and the background's included;
- packed row tables give the [C, N] call's outputs and gradients, bit for bit;
- two backward runs are bitwise equal;
- no intersection and no Gaussian at all;
- the registration: ff.rasterize_to_pixels(backend="triton") runs both
  launchers through the ops and autograd (absgrad lands on means2d);
- the refusals: the reference entry's value checks with its messages, and a
  backward state (last_ids) that does not come from the forward.
"""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast import _backend
from frontiers_fast.ops import splat as splat_ops
from tests.helpers import assert_close, grads, spy_backends, triton_devices, triton_params

pytest.importorskip("triton")
from frontiers_fast.kernels import splat as K  # noqa: E402

from .test_backends import _raster_scene  # noqa: E402
from .test_packed import _pack_tables  # noqa: E402

# float32 and float64 only, on CUDA too: the splatting ops take no half types.
CASES = [
    p for p in triton_params((torch.float32, torch.float64)) if p.values[1] in (torch.float32, torch.float64)
]


def _on(device, dtype):
    return lambda t: (
        None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    )


def _run(device, dtype, tables, bg, W, H, ts, offsets, fids, g_colors, g_alphas):
    """The Triton forward and backward on ``tables`` (means2d, conics, colors, opacities), moved to
    device and dtype: (forward outputs, backward gradients), on the CPU."""
    on = _on(device, dtype)
    args = (*map(on, tables), on(bg), W, H, ts, on(offsets), on(fids), True)
    fwd = K.rasterize_to_pixels(*args)
    bwd = K.rasterize_to_pixels_bwd(*args, fwd[2], fwd[3], on(g_colors), on(g_alphas))
    return [t.cpu() for t in fwd], [t.cpu() for t in bwd]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize(
    "C,N,W,H,ts,D,with_bg",
    [(2, 36, 37, 29, 8, 3, True), (3, 24, 40, 30, 16, 1, False), (1, 40, 23, 19, 16, 7, True)],
)
def test_rasterize_to_pixels(C, N, W, H, ts, D, with_bg, device, dtype):
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(C, N, W, H, ts, D, 100 * C + W)
    bg = bg if with_bg else None
    want = splat_ops._ref_raster(m2d, con, col, opac, bg, W, H, ts, offsets, fids, True)
    _, _, final_t, last = want
    assert bool(((final_t < 2e-4) & (last >= 0)).any()), "some pixel should stop at T = 1e-4"
    g_colors, g_alphas = torch.randn_like(want[0]), torch.randn_like(want[1])
    want_g = splat_ops._ref_raster_bwd(
        m2d, con, col, opac, bg, W, H, ts, offsets, fids, True, final_t, last, g_colors, g_alphas
    )
    got, got_g = _run(device, dtype, (m2d, con, col, opac), bg, W, H, ts, offsets, fids, g_colors, g_alphas)
    for g, w, name in zip(got[:3], want[:3], ("render_colors", "render_alphas", "final_ts")):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert_close(g, w, dtype, msg=name)
    assert got[3].dtype == torch.int32
    assert torch.equal(got[3], last), "last_ids"
    names = ("means2d", "conics", "colors", "opacities", "backgrounds", "absgrad")
    for g, w, name in zip(got_g, want_g, names):
        assert g.dtype == dtype and g.shape == w.shape, f"grad {name}"
        assert_close(g, w, dtype, msg=f"grad {name}")
    if not with_bg:
        assert got_g[4].numel() == 0


@pytest.mark.parametrize("device", triton_devices())
def test_rasterize_to_pixels_packed_equals_unpacked(device):
    # Row tables of the visible rows (camera-major, plus a few nobody references), flatten_ids remapped:
    # the same arithmetic on the same values, so the images, the state and the gradients are equal.
    C, N, W, H, ts, D = 3, 24, 27, 21, 8, 3
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(C, N, W, H, ts, D, 11)
    N = opac.shape[1]  # the scene appends a few rows
    rows, tables, pids = _pack_tables(m2d, con, col, opac, fids)
    g_colors, g_alphas = (
        torch.randn(C, H, W, D, dtype=torch.float64),
        torch.randn(C, H, W, 1, dtype=torch.float64),
    )
    dense = _run(
        device, torch.float64, (m2d, con, col, opac), bg, W, H, ts, offsets, fids, g_colors, g_alphas
    )
    packed = _run(device, torch.float64, tables, bg, W, H, ts, offsets, pids, g_colors, g_alphas)
    for g, w, name in zip(packed[0], dense[0], ("render_colors", "render_alphas", "final_ts", "last_ids")):
        assert torch.equal(g, w), name
    names = ("means2d", "conics", "colors", "opacities", "backgrounds", "absgrad")
    for gp, gd, name in zip(packed[1], dense[1], names):
        if name == "backgrounds":
            assert torch.equal(gp, gd), name
            continue
        flat = gd.reshape(C * N, *gd.shape[2:])
        assert gp.shape == (rows.numel(), *flat.shape[1:]), name
        assert torch.equal(gp, flat[rows]), f"grad {name}"
        rest = torch.ones(C * N, dtype=torch.bool)
        rest[rows] = False
        assert not bool(flat[rest].any()), f"grad {name} of rows nobody references"


@pytest.mark.parametrize("device,dtype", CASES)
def test_rasterize_to_pixels_bwd_is_deterministic(device, dtype):
    # Many Gaussians per tile and per pixel: each intersection's tile sum and each row's sum over its
    # intersections run in a fixed order, so two runs agree to the bit.
    W, H, ts, D = 19, 17, 16, 3
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 40, W, H, ts, D, 3)
    g_colors, g_alphas = (
        torch.randn(2, H, W, D, dtype=torch.float64),
        torch.randn(2, H, W, 1, dtype=torch.float64),
    )
    first = _run(device, dtype, (m2d, con, col, opac), bg, W, H, ts, offsets, fids, g_colors, g_alphas)[1]
    second = _run(device, dtype, (m2d, con, col, opac), bg, W, H, ts, offsets, fids, g_colors, g_alphas)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b), "a gradient differs between runs"


@pytest.mark.parametrize("device", triton_devices())
def test_rasterize_to_pixels_registered(device, monkeypatch):
    # Through the public function, the ops and autograd: the forward op runs the Triton forward, the
    # backward the Triton backward.  On the CPU the ops refuse the Triton backend (it is a CUDA one):
    # here it is let through, so the interpreter runs the launchers the ops name.
    if device == "cpu":
        monkeypatch.setitem(_backend._DEVICE, "triton", "cpu")
    W, H, ts = 19, 13, 8
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 12, W, H, ts, 3, 5)
    on = _on(device, torch.float64)
    ours = [on(t).requires_grad_(True) for t in (m2d, con, col, opac, bg)]
    theirs = [t.clone().requires_grad_(True) for t in (m2d, con, col, opac, bg)]

    def run(xs, backend, o, f):
        return ff.rasterize_to_pixels(*xs[:4], W, H, ts, o, f, xs[4], absgrad=True, backend=backend)

    want = run(theirs, "reference", offsets, fids)
    seeds = [torch.randn_like(w) for w in want]
    with spy_backends() as calls:
        got = run(ours, "triton", on(offsets), on(fids))
        g_got = grads(list(got), ours, [on(s) for s in seeds])
    assert calls[("rasterize_to_pixels", "triton")] == 1 and calls[("rasterize_to_pixels_bwd", "triton")] == 1
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, torch.float64)
    for g, w in zip(g_got, grads(list(want), theirs, seeds)):
        assert_close(g.cpu(), w, torch.float64)
    assert_close(ours[0].absgrad.cpu(), theirs[0].absgrad, torch.float64, msg="absgrad")


@pytest.mark.parametrize("device", triton_devices())
def test_rasterize_to_pixels_empty(device):
    # No intersection at all, and no Gaussian at all: the background everywhere, zero gradients, and
    # the background's gradient is the sum of the pixels' (T = 1).
    W, H, ts = 13, 10, 4
    for N in (5, 0):
        tables = (torch.rand(2, N, 2), torch.ones(2, N, 3), torch.rand(2, N, 3), torch.rand(2, N))
        bg = torch.rand(2, 3)
        offsets = torch.zeros(2, 3, 4, dtype=torch.int32)
        fids = torch.zeros(0, dtype=torch.int32)
        g_colors = torch.rand(2, H, W, 3)
        (rc, ra, ft, last), grads = _run(
            device, torch.float64, tables, bg, W, H, ts, offsets, fids, g_colors, torch.rand(2, H, W, 1)
        )
        assert torch.equal(rc, bg.double()[:, None, None, :].expand(2, H, W, 3))
        assert torch.equal(ra, torch.zeros(2, H, W, 1, dtype=torch.float64))
        assert torch.equal(ft, torch.ones(2, H, W, dtype=torch.float64))
        assert torch.equal(last, torch.full((2, H, W), -1, dtype=torch.int32))
        for g, t in zip(grads[:4], tables):
            assert g.shape == t.shape and not bool(g.any())
        assert_close(grads[4], g_colors.double().sum((1, 2)), torch.float64)


@pytest.mark.parametrize("device", triton_devices())
def test_rasterize_to_pixels_refuses_bad_values(device):
    # The reference entry's value checks, with its messages, before anything is launched.
    W, H, ts = 16, 12, 8
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 10, W, H, ts, 3, 9, torch.float32)
    on = _on(device, torch.float32)
    tables = [on(t) for t in (m2d, con, col, opac)]
    rest = [on(bg), W, H, ts, on(offsets), on(fids), False]
    out = K.rasterize_to_pixels(*tables, *rest)  # the unmodified call is fine
    for i, name in enumerate(("means2d", "conics", "colors", "opacities", "backgrounds")):
        for bad in (float("nan"), float("inf")):
            args = [*tables, *rest]
            args[i] = args[i].clone()
            args[i].view(-1)[3] = bad
            with pytest.raises(ValueError, match=f"{name} must be finite"):
                K.rasterize_to_pixels(*args)
    with pytest.raises(ValueError, match=r"opacities must lie in \[0, 1\]"):
        K.rasterize_to_pixels(*tables[:3], tables[3] * 1.5 + 0.01, *rest)
    CN = opac.numel()
    msg = rf"flatten_ids must lie in \[0, {CN - 1}\] \(indices into the C \* N = {CN} Gaussians\)"
    with pytest.raises(ValueError, match=msg):
        K.rasterize_to_pixels(*tables, *rest[:5], rest[5] + CN, False)
    with pytest.raises(ValueError, match="isect_offsets must be non-decreasing"):
        K.rasterize_to_pixels(*tables, *rest[:4], rest[4].flip(-1).contiguous(), *rest[5:])
    # The backward reads flatten_ids at last_ids: a last_ids outside its tile's run is refused.
    g_colors, g_alphas = torch.zeros_like(out[0]), torch.zeros_like(out[1])
    bad_last = out[3].clone()
    bad_last[1, 11, 15] = fids.numel()
    with pytest.raises(ValueError, match="last_ids must be -1 or an index into its tile's run"):
        K.rasterize_to_pixels_bwd(*tables, *rest, out[2], bad_last, g_colors, g_alphas)
    with pytest.raises(ValueError, match=msg):
        K.rasterize_to_pixels_bwd(*tables, *rest[:5], rest[5] + CN, False, out[2], out[3], g_colors, g_alphas)

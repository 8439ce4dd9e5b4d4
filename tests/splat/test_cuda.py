"""The CUDA extension's tile rasterizer (csrc/splat/raster.cu): ``rasterize_to_pixels``'s forward.

``backend="cuda"`` against the float64 reference on fresh random scenes
(test_backends' ``_raster_scene``: the 0.99 clamp, the 1e-4 stop, alphas
under 1/255, conics that are not positive definite): the images and alphas
to the dtype's tolerance, T_final likewise and each pixel's last Gaussian
exactly; float32 and float64, one to three cameras, odd image sizes, every
tile size from 1 to 32 (tiles wider than 16 pixels are split into
sub-tiles), 1 to 20 channels (the exact, capacity and in-output
accumulators), with and without backgrounds; packed row tables [R, ...]
(gsplat's packed layout: only the rows the lists use, renumbered) and
flattened dense ones; empty lists; strided inputs; bitwise-equal reruns; the
public function (forward, and its refusal where the inputs require grad: the
kernel has no backward); opcheck; the reference entry's value errors.
Outputs are NaN-poisoned (FRONTIERS_FAST_DEBUG_POISON=1, set by conftest),
so an element the kernel leaves unwritten fails the comparison.

Needs a CUDA device and an extension built with CUDA (benchmarks/gpu_check.sh
runs the suite on a GPU machine).
"""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast import _backend

from ..helpers import assert_close, opcheck
from .test_backends import _raster_scene

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not _backend.OPS["rasterize_to_pixels"].available("cuda")[0],
        reason="frontiers_fast._C was built without CUDA",
    ),
]

ops = torch.ops.frontiers_fast
DEV = "cuda"
DTYPES = [torch.float32, torch.float64]
# (C, N, W, H, tile_size, D, backgrounds)
SCENES = [
    (1, 80, 37, 29, 16, 3, False),
    (3, 60, 50, 33, 8, 4, True),
    (2, 40, 20, 17, 4, 1, True),
    (2, 50, 40, 24, 16, 5, True),  # capacity accumulator (8)
    (1, 30, 9, 7, 2, 2, False),
    (1, 25, 70, 40, 32, 3, True),  # sub-tiles
    (2, 20, 13, 11, 1, 3, True),  # one pixel per tile
    (1, 30, 23, 19, 8, 12, True),  # capacity accumulator (16)
    (2, 30, 31, 18, 16, 20, True),  # the in-output accumulator
]


def _reference(m2d, con, col, opac, bg, W, H, ts, offsets, fids):
    return ops.rasterize_to_pixels(m2d, con, col, opac, bg, W, H, ts, offsets, fids, False, "reference")


def _cuda(tables, bg, W, H, ts, offsets, fids, dtype):
    on = lambda t: None if t is None else t.to(device=DEV, dtype=dtype if t.is_floating_point() else t.dtype)
    return ops.rasterize_to_pixels(
        *[on(t) for t in tables], on(bg), W, H, ts, on(offsets), on(fids), False, "cuda"
    )


def _compare(got, want, dtype):
    names = ("render_colors", "render_alphas", "final_ts")
    for g, w, name in zip(got[:3], want[:3], names):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert_close(g.cpu(), w, dtype, msg=name)
    assert got[3].dtype == torch.int32
    assert torch.equal(got[3].cpu(), want[3]), "last_ids"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,N,W,H,ts,D,with_bg", SCENES)
def test_forward(C, N, W, H, ts, D, with_bg, dtype):
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(C, N, W, H, ts, D, 1000 * C + W + D)
    bg = bg if with_bg else None
    want = _reference(m2d, con, col, opac, bg, W, H, ts, offsets, fids)
    assert (want[3] >= 0).any(), "the scene should cover some pixels"
    assert bool(((want[2] < 2e-4) & (want[3] >= 0)).any()), "some pixel should stop at T = 1e-4"
    got = _cuda((m2d, con, col, opac), bg, W, H, ts, offsets, fids, dtype)
    _compare(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_row_tables(dtype):
    # gsplat's packed layout: the tables hold only the rows the lists use ([nnz, ...]), flatten_ids
    # index those rows, and C comes from isect_offsets.  Also the dense tables flattened to [C N, ...].
    C, N, W, H, ts, D = 3, 50, 41, 27, 8, 3
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(C, N, W, H, ts, D, 7)
    want = _reference(m2d, con, col, opac, bg, W, H, ts, offsets, fids)
    flat = [t.reshape(C * (N + 3), -1) for t in (m2d, con, col)] + [opac.reshape(-1)]
    got = _cuda(flat, bg, W, H, ts, offsets, fids, dtype)
    _compare(got, want, dtype)
    rows, new_ids = torch.unique(fids.long(), return_inverse=True)
    assert rows.numel() < C * (N + 3), "some rows should be unused"
    packed = [t[rows] for t in flat]
    got = _cuda(packed, bg, W, H, ts, offsets, new_ids.to(torch.int32), dtype)
    _compare(got, want, dtype)


def test_empty_lists():
    # No intersection at all, and no Gaussian at all: background everywhere, T = 1, no last Gaussian.
    W, H, ts = 13, 10, 4
    for N in (5, 0):
        tables = [torch.rand(2, N, k, dtype=torch.float64, device=DEV) for k in (2, 3, 3)]
        tables.append(torch.rand(2, N, dtype=torch.float64, device=DEV))
        bg = torch.rand(2, 3, dtype=torch.float64, device=DEV)
        offsets = torch.zeros(2, 3, 4, dtype=torch.int32, device=DEV)
        fids = torch.zeros(0, dtype=torch.int32, device=DEV)
        rc, ra, T, last = ops.rasterize_to_pixels(*tables, bg, W, H, ts, offsets, fids, False, "cuda")
        assert torch.equal(rc, bg[:, None, None, :].expand(2, H, W, 3))
        assert torch.equal(ra, torch.zeros(2, H, W, 1, dtype=torch.float64, device=DEV))
        assert torch.equal(T, torch.ones(2, H, W, dtype=torch.float64, device=DEV))
        assert torch.equal(last, torch.full((2, H, W), -1, dtype=torch.int32, device=DEV))


def test_strided_inputs_and_bitwise_reruns():
    C, N, W, H, ts, D = 2, 40, 29, 21, 16, 3
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(C, N, W, H, ts, D, 11)
    want = _reference(m2d, con, col, opac, bg, W, H, ts, offsets, fids)
    # Each table a slice of a wider one (non-contiguous), on the device.
    wide = [torch.cat([t, torch.rand_like(t)], -1).to(DEV)[..., : t.shape[-1]] for t in (m2d, con, col)]
    opac_s = torch.stack([opac, torch.rand_like(opac)], -1).to(DEV)[..., 0]
    assert not any(t.is_contiguous() for t in (*wide, opac_s))
    args = (*wide, opac_s, bg.to(DEV), W, H, ts, offsets.to(DEV), fids.to(DEV), False, "cuda")
    first = ops.rasterize_to_pixels(*args)
    _compare(first, want, torch.float64)
    for _ in range(2):
        again = ops.rasterize_to_pixels(*args)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "two runs differ"


def test_public_function_forward_only():
    C, N, W, H, ts, D = 2, 30, 24, 17, 8, 3
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(C, N, W, H, ts, D, 13)
    want = _reference(m2d, con, col, opac, bg, W, H, ts, offsets, fids)
    xs = [t.to(DEV, torch.float32) for t in (m2d, con, col, opac, bg)]
    img, alpha = ff.rasterize_to_pixels(
        *xs[:4], W, H, ts, offsets.to(DEV), fids.to(DEV), xs[4], backend="cuda"
    )
    assert_close(img.cpu(), want[0], torch.float32, msg="render_colors")
    assert_close(alpha.cpu(), want[1], torch.float32, msg="render_alphas")
    # The kernel has no backward: with inputs that require grad, backend="cuda" is refused.
    leaf = xs[0].clone().requires_grad_(True)
    with pytest.raises(NotImplementedError, match=r"backend 'cuda' is not implemented for its backward"):
        ff.rasterize_to_pixels(leaf, *xs[1:4], W, H, ts, offsets.to(DEV), fids.to(DEV), xs[4], backend="cuda")
    with torch.no_grad():  # no graph recorded: allowed
        ff.rasterize_to_pixels(leaf, *xs[1:4], W, H, ts, offsets.to(DEV), fids.to(DEV), xs[4], backend="cuda")


def test_opcheck():
    W, H, ts = 11, 9, 8
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 8, W, H, ts, 2, 5)
    tables = [t.to(DEV) for t in (m2d, con, col, opac)]
    for b in (bg.to(DEV), None):
        args = (*tables, b, W, H, ts, offsets.to(DEV), fids.to(DEV), False, "cuda")
        opcheck(ops.rasterize_to_pixels, args, full=False)


def test_refuses_bad_values():
    # The messages of the reference entry (_check_blend_values), raised by the binding.
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(2, 10, 16, 12, 8, 3, 9, torch.float32)
    args = [t.to(DEV) for t in (m2d, con, col, opac)] + [16, 12, 8, offsets.to(DEV), fids.to(DEV), bg.to(DEV)]
    ff.rasterize_to_pixels(*args, backend="cuda")  # the unmodified call is fine
    for i, name in enumerate(("means2d", "conics", "colors", "opacities")):
        for bad in (float("nan"), float("inf")):
            x = args[i].clone()
            x.view(-1)[3] = bad
            with pytest.raises(ValueError, match=f"{name} must be finite"):
                ff.rasterize_to_pixels(*args[:i], x, *args[i + 1 :], backend="cuda")
    x = args[9].clone()
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="backgrounds must be finite"):
        ff.rasterize_to_pixels(*args[:9], x, backend="cuda")
    with pytest.raises(ValueError, match=r"opacities must lie in \[0, 1\], got values in \["):
        ff.rasterize_to_pixels(*args[:3], args[3] * 1.5 + 0.01, *args[4:], backend="cuda")
    CN = args[3].numel()
    with pytest.raises(
        ValueError,
        match=rf"flatten_ids must lie in \[0, {CN - 1}\] \(indices into the C \* N = {CN} Gaussians\)",
    ):
        ff.rasterize_to_pixels(*args[:8], args[8] + CN, args[9], backend="cuda")
    with pytest.raises(ValueError, match=r"isect_offsets must be non-decreasing .* lie in \[0, M\]"):
        ff.rasterize_to_pixels(*args[:7], args[7].flip(-1).contiguous(), *args[8:], backend="cuda")
    with pytest.raises(ValueError, match=r"isect_offsets must be non-decreasing"):
        ff.rasterize_to_pixels(*args[:7], args[7] + args[8].numel() + 1, *args[8:], backend="cuda")
    empty = [t[:, :0] for t in args[:4]]
    with pytest.raises(ValueError, match=r"flatten_ids must be empty when there are no Gaussians"):
        ops.rasterize_to_pixels(*empty, args[9], 16, 12, 8, args[7], args[8], False, "cuda")


def test_binding_checks_arguments():
    (m2d, con, col, opac, bg), offsets, fids = _raster_scene(1, 10, 16, 12, 8, 3, 3)
    t = [x.to(DEV) for x in (m2d, con, col, opac)]
    o, f = offsets.to(DEV), fids.to(DEV)
    native = torch.ops.frontiers_fast_native.rasterize_to_pixels
    with pytest.raises(RuntimeError, match="conics must be a CUDA tensor"):
        native(t[0], t[1].cpu(), t[2], t[3], None, 16, 12, 8, o, f, False)
    with pytest.raises(RuntimeError, match="colors has dtype"):
        native(t[0], t[1], t[2].float(), t[3], None, 16, 12, 8, o, f, False)
    with pytest.raises(RuntimeError, match="opacities must be"):
        native(t[0], t[1], t[2], t[3][:, :-1], None, 16, 12, 8, o, f, False)
    with pytest.raises(RuntimeError, match="isect_offsets must be int32"):
        native(t[0], t[1], t[2], t[3], None, 16, 12, 4, o, f, False)
    with pytest.raises(ValueError, match="tile_size must be a positive power of two"):
        native(t[0], t[1], t[2], t[3], None, 16, 12, 6, o, f, False)

"""The Triton isect_tiles launcher (kernels/splat.py) against the reference, unpacked and packed.

Called directly: on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1 when there is no GPU), on CUDA tensors natively.  The
outputs are integers decided by the exact test, so every comparison is
torch.equal: the bounding boxes and the exact culling in float32 and float64,
one and three cameras, odd image sizes, tile sizes 8 and 16.  Packed rows
(camera-major visible pairs, with image_ids) give the unpacked keys, and
their flatten_ids map through the rows to the unpacked ones.  The float64
pieces of the exact test (ln_upper, the shrunk conic) equal the reference's
bit for bit; two runs are equal; the reference entry's refusals are repeated
with its messages, and bad image_ids are refused.
"""

import pytest
import torch

from frontiers_fast.reference import splat as ref
from tests.helpers import triton_devices, triton_params

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from frontiers_fast.kernels import splat as K  # noqa: E402

from .scenes import isect_inputs  # noqa: E402
from .test_backends import _assert_isect_equal, _bad_isect_values, _error  # noqa: E402

CASES = [
    p for p in triton_params((torch.float32, torch.float64)) if p.values[1] in (torch.float32, torch.float64)
]


def _scene(C, N, width, height, tile_size, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed)
    means2d, radii, depths, conics, opac = isect_inputs(C, N, width, height, gen, dtype)
    tw, th = ref.tile_grid(width, height, tile_size)
    return [t.to(device) for t in (means2d, radii, depths, conics, opac)], tw, th


def _packed(means2d, radii, depths, conics, opac):
    """The visible (camera, Gaussian) pairs in camera-major order (torch.nonzero's), as packed rows:
    (means2d, radii, depths, conics, opacities, image_ids) and each row's index into the flattened [C * N]."""
    cam, g = torch.nonzero((radii > 0).all(-1), as_tuple=True)
    rows = tuple(t[cam, g].contiguous() for t in (means2d, radii, depths, conics, opac))
    return (*rows, cam.to(torch.int32)), cam * means2d.shape[1] + g


def _reference_entry(args):
    """The reference entry's error on the unpacked op arguments (image_ids None)."""
    from frontiers_fast.ops import splat as ops_splat

    return _error(lambda: ops_splat._ref_isect_tiles(*args, None, args[2].shape[0]))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("C,width,height", [(1, 37, 29), (3, 61, 45)])
@pytest.mark.parametrize("tile_size", [8, 16])
@pytest.mark.parametrize("exact", [False, True])
def test_isect_tiles_equals_reference(C, width, height, tile_size, exact, device, dtype):
    (means2d, radii, depths, conics, opac), tw, th = _scene(
        C, 70, width, height, tile_size, dtype, C + width, device
    )
    extra = (conics, opac) if exact else (None, None)
    want = ref.isect_tiles(*(t.cpu() for t in (means2d, radii, depths)), tile_size, tw, th,
                           *(None if t is None else t.cpu() for t in extra))  # fmt: skip
    got = K.isect_tiles(means2d, radii, depths, tile_size, tw, th, *extra, None, None, 12345)
    _assert_isect_equal([t.cpu() for t in got], want)
    box = ref.box_intersections(means2d.cpu(), radii.cpu(), tile_size, tw, th)
    assert want[1].numel() > 40
    assert (want[1].numel() < box) if exact else (want[1].numel() == box)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("exact", [False, True])
def test_isect_tiles_packed_equals_unpacked(C, exact, device, dtype):
    (means2d, radii, depths, conics, opac), tw, th = _scene(C, 60, 53, 41, 8, dtype, 7 * C + exact, device)
    if C == 3:
        radii[1] = 0  # a camera with no visible Gaussian: its keys are absent, the next camera's keep 2
    extra = (conics, opac) if exact else (None, None)
    tpg, keys, fids = K.isect_tiles(means2d, radii, depths, 8, tw, th, *extra, None, None, None)
    (pm, pr, pd, pc, po, image_ids), flat = _packed(means2d, radii, depths, conics, opac)
    pextra = (pc, po) if exact else (None, None)
    ptpg, pkeys, pfids = K.isect_tiles(pm, pr, pd, 8, tw, th, *pextra, None, image_ids, C)
    assert ptpg.shape == (image_ids.numel(),) and ptpg.dtype == torch.int32
    assert pkeys.dtype == torch.int64 and pfids.dtype == torch.int32
    assert torch.equal(pkeys, keys)
    assert torch.equal(flat[pfids.long()], fids.long())
    assert torch.equal(ptpg, tpg.reshape(-1)[flat])
    assert keys.numel() > 40 and int(image_ids.max()) == C - 1


@pytest.mark.parametrize("device", triton_devices())
def test_isect_tiles_runs_are_equal(device):
    # Integers only (no float sums), then a stable sort: two runs are bitwise equal, non-contiguous
    # inputs (made by slicing) included.
    (means2d, radii, depths, conics, opac), tw, th = _scene(2, 80, 45, 37, 8, torch.float32, 3, device)
    wide = torch.stack([means2d, means2d], -1)[..., 0]
    assert not wide.is_contiguous() and torch.equal(wide, means2d)
    runs = [K.isect_tiles(wide, radii, depths, 8, tw, th, conics, opac, None, None, None) for _ in range(2)]
    (pm, pr, pd, pc, po, image_ids), _ = _packed(means2d, radii, depths, conics, opac)
    runs += [K.isect_tiles(pm, pr, pd, 8, tw, th, pc, po, None, image_ids, 2) for _ in range(2)]
    for a, b in ((runs[0], runs[1]), (runs[2], runs[3])):
        for x, y in zip(a, b):
            assert torch.equal(x, y), "an output differs between runs"


@pytest.mark.parametrize("device,dtype", CASES)
def test_isect_tiles_empty(device, dtype):
    # Nothing visible (radii 0), no Gaussians at all, and no packed rows: no keys, zero counts.
    (means2d, radii, depths, conics, opac), tw, th = _scene(3, 50, 37, 29, 8, dtype, 5, device)
    for extra in ((None, None), (conics, opac)):
        got = K.isect_tiles(means2d, torch.zeros_like(radii), depths, 8, tw, th, *extra, None, None, None)
        want = ref.isect_tiles(means2d.cpu(), torch.zeros_like(radii).cpu(), depths.cpu(), 8, tw, th,
                               *(None if t is None else t.cpu() for t in extra))  # fmt: skip
        _assert_isect_equal([t.cpu() for t in got], want)
        assert want[1].numel() == 0
        sub = [t[:, :0] for t in (means2d, radii, depths, *extra) if t is not None]
        got = K.isect_tiles(*sub[:3], 8, tw, th, *(sub[3:] or extra), None, None, None)
        assert got[0].shape == (3, 0) and got[1].numel() == 0 and got[2].numel() == 0
        rows = [t[0, :0] for t in (means2d, radii, depths, *extra) if t is not None]
        none = torch.zeros(0, dtype=torch.int32, device=device)
        got = K.isect_tiles(*rows[:3], 8, tw, th, *(rows[3:] or extra), None, none, 3)
        assert got[0].shape == (0,) and got[1].numel() == 0 and got[2].numel() == 0


@pytest.mark.parametrize("device", triton_devices())
def test_isect_tiles_refuses_what_the_reference_refuses(device):
    from frontiers_fast.ops import splat as ops_splat

    # The op arguments (packed cases among them), each with one thing wrong.
    for name, args in _bad_isect_values():
        want = _error(lambda: ops_splat._ref_isect_tiles(*args))
        assert want is not None and want[0] is ValueError, name
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        assert _error(lambda: K.isect_tiles(*args)) == want, name


@pytest.mark.parametrize("device", triton_devices())
def test_isect_tiles_max_intersections(device):
    # M itself passes, M - 1 is refused with the reference's message, packed too.
    (means2d, radii, depths, conics, opac), tw, th = _scene(2, 50, 37, 29, 16, torch.float32, 9, device)
    args = (means2d, radii, depths, 16, tw, th, conics, opac)
    M = K.isect_tiles(*args, None, None, None)[1].numel()
    assert K.isect_tiles(*args, M, None, None)[1].numel() == M
    want = _reference_entry((*(t.cpu() if isinstance(t, torch.Tensor) else t for t in args), M - 1))
    assert want[0] is ValueError and f"max_intersections = {M - 1}" in want[1]
    assert _error(lambda: K.isect_tiles(*args, M - 1, None, None)) == want
    (pm, pr, pd, pc, po, image_ids), _ = _packed(means2d, radii, depths, conics, opac)
    assert _error(lambda: K.isect_tiles(pm, pr, pd, 16, tw, th, pc, po, M - 1, image_ids, 2)) == want


@pytest.mark.parametrize("device", triton_devices())
def test_isect_tiles_refuses_bad_image_ids(device):
    # The reference entry's refusals of packed rows, with its messages; and rows in any camera order.
    from frontiers_fast.ops import splat as ops_splat

    (means2d, radii, depths, conics, opac), tw, th = _scene(3, 40, 37, 29, 8, torch.float32, 2, device)
    (pm, pr, pd, pc, po, image_ids), _ = _packed(means2d, radii, depths, conics, opac)
    past, negative = image_ids.clone(), image_ids.clone()
    past[-1] = 3
    negative[0] = -1
    cases = [
        (pm, pr, pd, pc, po, past, 3),
        (pm, pr, pd, pc, po, image_ids, 2),
        (pm, pr, pd, pc, po, negative, 3),
        (pm, pr, pd, pc, po, image_ids, 0),
        (pm, pr, pd, None, None, image_ids, 2049),  # 12 camera bits + 20 tile bits do not fit in 31
        (pm, pr, pd, pc, po * 2, image_ids, 3),
        (pm, pr, -pd, pc, po, image_ids, 3),
    ]
    for m, r, d, c, o, ids, n in cases:
        tiles = (1024, 1024) if n == 2049 else (tw, th)
        args = (m, r, d, 8, *tiles, c, o, None, ids, n)
        want = _error(
            lambda: ops_splat._ref_isect_tiles(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
        )
        assert want is not None and want[0] is ValueError, (n, want)
        assert _error(lambda: K.isect_tiles(*args)) == want
    assert (
        "image_ids must lie in [0, n_images) = [0, 3)"
        in _error(lambda: K.isect_tiles(pm, pr, pd, 8, tw, th, pc, po, None, past, 3))[1]
    )
    # Rows need not be camera-major: the reference takes any order, and so does the kernel.
    perm = torch.randperm(pm.shape[0], generator=torch.Generator().manual_seed(0)).to(device)
    rows = [t[perm] for t in (pm, pr, pd, pc, po, image_ids)]
    got = K.isect_tiles(*rows[:3], 8, tw, th, *rows[3:5], None, rows[5], 3)
    want = ref.isect_tiles(*(t.cpu() for t in rows[:3]), 8, tw, th, *(t.cpu() for t in rows[3:5]), None,
                           rows[5].cpu(), 3)  # fmt: skip
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@triton.jit
def _exact_pieces_kernel(x_ptr, ln_ptr, m_ptr, c_ptr, o_ptr, out_ptr, n_x, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n_x, other=1.0)
    tl.store(ln_ptr + i, K._ln_upper(x), mask=i < n_x)
    ok = i < n
    mx, my, ap, b, cp, pd, thr = K._exact_conic(m_ptr, c_ptr, o_ptr, i, ok)
    tl.store(out_ptr + i * 7, mx, mask=ok)
    tl.store(out_ptr + i * 7 + 1, my, mask=ok)
    tl.store(out_ptr + i * 7 + 2, ap, mask=ok)
    tl.store(out_ptr + i * 7 + 3, b, mask=ok)
    tl.store(out_ptr + i * 7 + 4, cp, mask=ok)
    tl.store(out_ptr + i * 7 + 5, pd.to(tl.float64), mask=ok)
    tl.store(out_ptr + i * 7 + 6, thr, mask=ok)


@pytest.mark.parametrize("device,dtype", CASES)
def test_exact_test_pieces_are_the_references_bits(device, dtype):
    # ln_upper and the shrunk conic decide tiles: they must be the reference's float64 bits (every
    # constant made in float64, no FMA), on the clamp (2^-20), powers of two and random opacities.
    gen = torch.Generator().manual_seed(4)
    _, _, _, conics, opac = isect_inputs(1, 100, 37, 29, gen, dtype)
    m = (torch.rand(100, 2, generator=gen, dtype=torch.float64) * 40).to(dtype)
    c, o = conics.reshape(-1, 3), opac.reshape(-1)
    x = torch.cat(
        [255.0 * o.double(), torch.tensor([0.0, 2.0**-21, 2.0**-20, 0.5, 1.0, 2.0, 255.0, 1e-3, 3.7])]
    )
    ln = torch.empty_like(x, device=device)
    out = torch.empty(100, 7, dtype=torch.float64, device=device)
    ins = [t.to(device) for t in (m, c, o)]
    _exact_pieces_kernel[(1,)](x.to(device), ln, *ins, out, x.numel(), 100, BLOCK=128, enable_fp_fusion=False)
    assert torch.equal(ln.cpu(), ref.ln_upper(x))
    ap, b, cp, pd, thr = ref.exact_conics(c, o)
    want = torch.stack([m[:, 0].double(), m[:, 1].double(), ap, b, cp, pd.double(), thr], -1)
    assert torch.equal(out.cpu(), want)
    assert not bool(pd.all())  # the inputs hold conics that are not positive definite

"""The splatting stages with fast backends, on every backend, against the float64 reference.

Spherical harmonics (C++): every degree, batched and flat directions, more
bases than the degree needs, masks, directions of every length (including
zero, where F.normalize divides by its eps), float32 and float64; outputs
and the gradients of dirs and coeffs; opcheck, compile, fp64 gradcheck, and
the errors the reference entry gives (non-finite input).

Tile intersection and offsets (C++): all three outputs of isect_tiles and
the offsets equal the reference's bit for bit (one and three cameras, odd
image sizes, tiles of 8 and 16, bounding-box and exact culling, float32 and
float64), for 1 and 2 threads; every bad value the reference entries refuse
is refused with the same ValueError; opcheck and compile.
"""

import math

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.reference import splat as ref

from ..helpers import assert_close, backend_cases, check_compiled, grads, opcheck
from .scenes import isect_inputs

ops = torch.ops.frontiers_fast
SH_CASES = backend_cases("spherical_harmonics")


def _sh_inputs(batch, K, gen, dtype=torch.float64):
    dirs = torch.randn(*batch, 3, generator=gen, dtype=torch.float64) * 3
    flat = dirs.view(-1, 3)
    if flat.shape[0] > 2:
        flat[0] = 0.0  # a zero direction: normalize divides by its eps
        flat[1] *= 1e-14  # below the eps too
        flat[2] *= 1e6
    coeffs = torch.randn(*batch, K, 3, generator=gen, dtype=torch.float64)
    masks = torch.rand(batch, generator=gen) > 0.3
    return dirs.to(dtype), coeffs.to(dtype), masks


@pytest.mark.parametrize("device,backend", SH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("batch,extra", [((1,), 0), ((37,), 3), ((3, 129), 0), ((2, 5, 7), 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_spherical_harmonics(degree, batch, extra, masked, dtype, device, backend):
    gen = torch.Generator().manual_seed(degree * 100 + len(batch) * 10 + extra)
    K = (degree + 1) ** 2 + extra
    dirs, coeffs, masks = _sh_inputs(batch, K, gen, dtype)
    m = masks.to(device) if masked else None
    d = dirs.to(device).requires_grad_(True)
    c = coeffs.to(device).requires_grad_(True)
    out = ff.spherical_harmonics(degree, d, c, m, backend=backend)
    rd = dirs.double().requires_grad_(True)
    rc = coeffs.double().requires_grad_(True)
    want = ref.spherical_harmonics(degree, rd, rc, masks if masked else None)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out.cpu(), want, dtype)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got = grads(out, [d, c], g.to(dtype).to(device))
    expect = grads(want, [rd, rc], g.to(dtype).double())
    # The directions below F.normalize's eps have gradients of ~1e12 (1 / eps): compared relative.
    tiny = dirs.view(-1, 3).norm(dim=-1) <= 1e-12
    gd, ed = got[0].cpu().view(-1, 3), expect[0].view(-1, 3)
    assert_close(gd[~tiny], ed[~tiny], dtype, msg="grad dirs")
    if tiny.any():
        assert_close(gd[tiny] * 1e-12, ed[tiny] * 1e-12, dtype, msg="grad dirs below the eps")
    assert_close(got[1].cpu(), expect[1], dtype, msg="grad coeffs")


@pytest.mark.parametrize("device,backend", SH_CASES)
def test_spherical_harmonics_gradcheck_and_registration(device, backend):
    gen = torch.Generator().manual_seed(7)
    dirs = torch.randn(6, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    coeffs = torch.randn(6, 17, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    masks = (torch.rand(6, generator=gen) > 0.3).to(device)
    for degree in (0, 1, 2, 3):
        for m in (None, masks):
            fn = lambda d, c, degree=degree, m=m: ff.spherical_harmonics(degree, d, c, m, backend=backend)
            assert torch.autograd.gradcheck(fn, (dirs, coeffs))
    for degree in (0, 3):
        opcheck(ops.spherical_harmonics, (degree, dirs, coeffs, masks, backend))
        opcheck(ops.spherical_harmonics, (degree, dirs, coeffs, None, backend))
    go = torch.randn(6, 3, dtype=torch.float64, device=device)
    opcheck(ops.spherical_harmonics_bwd, (2, dirs.detach(), coeffs.detach(), masks, go, backend), full=False)
    check_compiled(lambda d, c: ff.spherical_harmonics(3, d, c, masks, backend=backend).sum(), [dirs, coeffs])


@pytest.mark.parametrize("device,backend", SH_CASES)
def test_spherical_harmonics_refuses_non_finite(device, backend):
    dirs = torch.randn(4, 3, device=device)
    coeffs = torch.randn(4, 4, 3, device=device)
    for bad in (float("nan"), float("inf")):
        d = dirs.clone()
        d[2, 1] = bad
        with pytest.raises(ValueError, match="dirs must be finite"):
            ff.spherical_harmonics(1, d, coeffs, backend=backend)
        c = coeffs.clone()
        c[3, 0, 2] = bad
        # A masked-out entry is refused too: the reference would give NaN * 0 there.
        with pytest.raises(ValueError, match="coeffs must be finite"):
            ff.spherical_harmonics(
                1, dirs, c, torch.tensor([True, True, True, False], device=device), backend=backend
            )
    # direct op calls are checked the same way
    d = dirs.clone()
    d[0, 0] = float("nan")
    with pytest.raises(ValueError, match="dirs must be finite"):
        ops.spherical_harmonics(1, d, coeffs, None, backend)


# ---------------------------------------------------------------------------
# tile intersection (C++): exact equality with the reference, both modes
# ---------------------------------------------------------------------------
ISECT_CASES = backend_cases("isect_tiles", grad=False)
ENCODE_CASES = backend_cases("isect_offset_encode", grad=False)


def _assert_isect_equal(got, want):
    for name, a, b in zip(("tiles_per_gauss", "isect_ids", "flatten_ids"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs"


@pytest.mark.parametrize("device,backend", ISECT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C,width,height", [(1, 37, 29), (3, 61, 45), (3, 128, 64)])
@pytest.mark.parametrize("tile_size", [8, 16])
@pytest.mark.parametrize("exact", [False, True])
def test_isect_tiles_equals_reference(C, width, height, tile_size, exact, dtype, device, backend):
    gen = torch.Generator().manual_seed(C * 1000 + width + tile_size + exact)
    means2d, radii, depths, conics, opac = isect_inputs(C, 300, width, height, gen, dtype)
    tw, th = ref.tile_grid(width, height, tile_size)
    extra = (conics, opac) if exact else ()
    want = ref.isect_tiles(means2d, radii, depths, tile_size, tw, th, *extra)
    dev = [t.to(device) for t in (means2d, radii, depths, *extra)]
    got = ff.isect_tiles(*dev[:3], tile_size, tw, th, *dev[3:], backend=backend)
    _assert_isect_equal([t.cpu() for t in got], want)
    assert want[1].numel() > 200
    offsets = ff.isect_offset_encode(got[1], C, tw, th, backend=backend)
    assert torch.equal(offsets.cpu(), ref.isect_offset_encode(want[1], C, tw, th))
    box = ref.box_intersections(means2d, radii, tile_size, tw, th)
    assert (want[1].numel() < box) if exact else (want[1].numel() == box)


@pytest.mark.parametrize("device,backend", ENCODE_CASES)
def test_isect_offset_encode_equals_reference(device, backend):
    # Empty lists, empty leading and trailing tiles and cameras, one key, runs of repeated keys.
    for ids, C, tw, th in [
        (torch.zeros(0, dtype=torch.int64), 2, 3, 2),
        (torch.tensor([5 << 32]), 1, 4, 2),
        (torch.tensor([(1 << 35) | (2 << 32) | 7] * 4 + [(1 << 35) | (5 << 32)]), 3, 3, 2),
        (torch.tensor([0, 0, 1 << 32, 3 << 32, 3 << 32, 9 << 32]), 1, 5, 2),
    ]:
        got = ff.isect_offset_encode(ids.to(device), C, tw, th, backend=backend)
        assert torch.equal(got.cpu(), ref.isect_offset_encode(ids, C, tw, th))


@pytest.mark.parametrize("device,backend", ISECT_CASES)
def test_isect_tiles_thread_counts(device, backend):
    # Large enough for the C++ sort to split its passes across threads (M > 2^17).
    gen = torch.Generator().manual_seed(5)
    means2d, radii, depths, conics, opac = isect_inputs(3, 10000, 240, 160, gen, torch.float32)
    tw, th = ref.tile_grid(240, 160, 8)
    args = [t.to(device) for t in (means2d, radii, depths)]
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            for extra in ((), (conics.to(device), opac.to(device))):
                out = ff.isect_tiles(*args, 8, tw, th, *extra, backend=backend)
                runs.append([*out, ff.isect_offset_encode(out[1], 3, tw, th, backend=backend)])
    finally:
        torch.set_num_threads(before)
    assert runs[0][1].numel() > 1 << 17
    for i, run in enumerate(runs[2:]):
        for a, b in zip(runs[i % 2], run):
            assert torch.equal(a, b), "an output differs between runs or thread counts"


def _bad_isect_values():
    """(name, op arguments) the reference entry refuses, each with one thing wrong."""
    gen = torch.Generator().manual_seed(11)
    means2d, radii, depths, conics, opac = isect_inputs(2, 40, 37, 29, gen, torch.float32)
    tw, th = ref.tile_grid(37, 29, 8)
    base = dict(
        means2d=means2d, radii=radii, depths=depths, conics=conics, opacities=opac, max_intersections=None
    )

    def poke(name, value, idx=5):
        t = base[name].clone()
        t.view(-1)[idx] = value
        return {name: t}

    visible = (radii > 0).all(-1)
    cases = [
        ("means2d-nan", poke("means2d", math.nan)),
        ("depths-inf", poke("depths", math.inf)),
        ("depths-negative", {"depths": depths.masked_fill(visible, -2.0)}),
        ("conics-nan", poke("conics", math.nan)),
        ("opacities-inf", poke("opacities", -math.inf)),
        ("opacities-above", {"opacities": opac * 1.5}),
        ("opacities-below", {"opacities": opac - 0.25}),
        ("conics-alone", {"opacities": None}),
        ("opacities-alone", {"conics": None}),
        ("opacities-alone-bad-conics", {"conics": None, **poke("opacities", 2.0)}),
        ("cap-negative", {"max_intersections": -1}),
        ("cap", {"max_intersections": 10}),
        ("nan-and-cap", {**poke("means2d", math.nan), "max_intersections": 10}),
    ]
    for name, change in cases:
        a = {**base, **change}
        yield name, (a["means2d"], a["radii"], a["depths"], 8, tw, th, a["conics"], a["opacities"],
                     a["max_intersections"])  # fmt: skip
    # The key fields: 12 camera bits + 20 tile bits.
    yield "key-bits", (means2d[:1].expand(2049, 40, 2), radii[:1].expand(2049, 40, 2), depths[:1].expand(2049, 40),
                       8, 1024, 1024, None, None, None)  # fmt: skip


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the type is what the test compares
        return type(e), str(e)
    return None


@pytest.mark.parametrize("device,backend", ISECT_CASES)
def test_isect_tiles_refuses_what_the_reference_refuses(device, backend):
    for name, args in _bad_isect_values():
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        want = _error(lambda: ops.isect_tiles(*args, "reference"))
        assert want is not None and want[0] is ValueError, name
        assert _error(lambda: ops.isect_tiles(*args, backend)) == want, name


@pytest.mark.parametrize("device,backend", ENCODE_CASES)
def test_isect_offset_encode_refuses_what_the_reference_refuses(device, backend):
    ids = torch.tensor([(0 << 35) | (1 << 32), (1 << 35) | (2 << 32) | 5, (2 << 35) | (7 << 32)])
    for name, args in [
        ("unsorted", (ids.flip(0), 3, 4, 2)),
        ("camera-past", (ids, 2, 4, 2)),
        ("camera-negative", (torch.cat([torch.tensor([-(1 << 40)]), ids]), 3, 4, 2)),
        ("tile-past", (ids, 3, 3, 2)),  # 6 tiles in 3 bits: tile 7 is past them
        ("tile-past-one-camera", (torch.tensor([1 << 32, 3 << 32]), 1, 3, 1)),
    ]:
        args = (args[0].to(device), *args[1:])
        want = _error(lambda: ops.isect_offset_encode(*args, "reference"))
        assert want is not None and want[0] is ValueError, name
        assert _error(lambda: ops.isect_offset_encode(*args, backend)) == want, name


@pytest.mark.parametrize("device,backend", ISECT_CASES)
def test_isect_opcheck_and_compile(device, backend):
    gen = torch.Generator().manual_seed(3)
    means2d, radii, depths, conics, opac = (t.to(device) for t in isect_inputs(2, 30, 37, 29, gen))
    tw, th = ref.tile_grid(37, 29, 8)
    for extra in ((None, None, None), (conics, opac, None), (conics, opac, 10_000)):
        opcheck(ops.isect_tiles, (means2d, radii, depths, 8, tw, th, *extra, backend), full=False)
    _, ids, _ = ops.isect_tiles(means2d, radii, depths, 8, tw, th, conics, opac, None, backend)
    opcheck(ops.isect_offset_encode, (ids, 2, tw, th, backend), full=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        fn = torch.compile(
            lambda m, z: ff.isect_tiles(m, radii, z, 8, tw, th, conics, opac, backend=backend),
            backend="aot_eager",
        )
        _assert_isect_equal(
            fn(means2d, depths), ref.isect_tiles(means2d, radii, depths, 8, tw, th, conics, opac)
        )
    enc = torch.compile(lambda i: ff.isect_offset_encode(i, 2, tw, th, backend=backend), fullgraph=True,
                        backend="aot_eager")  # fmt: skip
    assert torch.equal(enc(ids), ref.isect_offset_encode(ids, 2, tw, th))

"""The splatting stages with fast backends, on every backend, against the float64 reference.

Spherical harmonics (C++): every degree, batched and flat directions, more
bases than the degree needs, masks, directions of every length (including
zero, where F.normalize divides by its eps), float32 and float64; outputs
and the gradients of dirs and coeffs; opcheck, compile, fp64 gradcheck, and
the errors the reference entry gives (non-finite input).
"""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.reference import splat as ref

from ..helpers import assert_close, backend_cases, check_compiled, grads, opcheck

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

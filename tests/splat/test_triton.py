"""Triton launchers of the splatting family (kernels/splat.py) against the float64 reference.

Called directly: on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1 when there is no GPU), on CUDA tensors natively.
Offsets: equal to the reference's searchsorted.  Spherical harmonics: every degree, masks, more bases than the degree needs,
zero and tiny directions (F.normalize's eps), float32 and float64; the
outputs and both gradients, and the non-finite refusals.
"""

import pytest
import torch

from frontiers_fast.reference import splat as ref
from tests.helpers import assert_close, triton_devices, triton_params

pytest.importorskip("triton")
from frontiers_fast.kernels import splat as K  # noqa: E402

from .scenes import projected  # noqa: E402
from .test_backends import _sh_inputs  # noqa: E402

# float32 and float64 only, on CUDA too: the splatting ops take no half types.
CASES = [
    p for p in triton_params((torch.float32, torch.float64)) if p.values[1] in (torch.float32, torch.float64)
]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_spherical_harmonics(degree, masked, device, dtype):
    gen = torch.Generator().manual_seed(degree)
    dirs, coeffs, masks = _sh_inputs((3, 67), (degree + 1) ** 2 + 2, gen)
    masks = masks if masked else None
    d, c = dirs.clone().requires_grad_(True), coeffs.clone().requires_grad_(True)
    want = ref.spherical_harmonics(degree, d, c, masks)
    g = torch.randn_like(want)
    wd, wc = torch.autograd.grad(want, (d, c), g, allow_unused=True)
    wd = torch.zeros_like(dirs) if wd is None else wd  # degree 0 does not read the directions
    on = lambda t: (
        None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    )
    got = K.spherical_harmonics(degree, on(dirs), on(coeffs), on(masks))
    assert got.dtype == dtype
    assert_close(got.cpu(), want.detach(), dtype)
    gd, gc = K.spherical_harmonics_bwd(degree, on(dirs), on(coeffs), on(masks), on(g))
    big = dirs.norm(dim=-1) > 1e-12
    assert_close(gd[big.to(device)].cpu(), wd[big], dtype, msg="grad dirs")
    # below F.normalize's eps the gradient is grad v / 1e-12: compare it scaled back
    assert_close(gd[~big.to(device)].cpu() * 1e-12, wd[~big] * 1e-12, dtype, msg="grad dirs below the eps")
    assert_close(gc.cpu(), wc, dtype, msg="grad coeffs")


@pytest.mark.parametrize("device,dtype", triton_params((torch.float32,)))
def test_spherical_harmonics_refuses_non_finite(device, dtype):
    dirs = torch.randn(4, 3, device=device, dtype=dtype)
    coeffs = torch.randn(4, 4, 3, device=device, dtype=dtype)
    bad = dirs.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="dirs must be finite"):
        K.spherical_harmonics(1, bad, coeffs, None)
    bad = coeffs.clone()
    bad[3, 3, 0] = float("inf")
    with pytest.raises(ValueError, match="coeffs must be finite"):
        K.spherical_harmonics(1, dirs, bad, None)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("C,W,H,ts", [(1, 37, 29, 16), (3, 61, 45, 8), (2, 16, 16, 16)])
def test_isect_offset_encode(C, W, H, ts, device):
    # Equal to the reference's searchsorted, empty tiles and cameras included; and on no keys at all.
    torch.manual_seed(C * W)
    m2d, conics, opac, offsets, fids, radii, depths = projected(C, 40, W, H, ts)
    tw, th = ref.tile_grid(W, H, ts)
    _, ids, _ = ref.isect_tiles(m2d, radii, depths, ts, tw, th)
    for keys in (ids, ids[: ids.numel() // 3], ids[:0]):
        want = ref.isect_offset_encode(keys, C, tw, th)
        got = K.isect_offset_encode(keys.to(device), C, tw, th)
        assert got.dtype == torch.int32
        assert torch.equal(got.cpu(), want)
    with pytest.raises(ValueError, match="isect_ids must be sorted"):
        K.isect_offset_encode(ids.flip(0).to(device), C, tw, th)

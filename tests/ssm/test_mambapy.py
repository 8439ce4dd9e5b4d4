"""Agreement with the peer package mambapy (pure PyTorch Mamba) on the
semantics both implement: variable B and C, a delta that is already positive
(mambapy applies softplus and the bias before its scan), D, no z, zero
initial state.  mambapy's layout is (batch, L, dim) and (batch, L, N)."""

import types

import pytest
import torch

from frontiers_fast.ops import ssm as ops
from frontiers_fast.reference import ssm as ref

from ..helpers import assert_close
from .inputs import scan_inputs

mamba = pytest.importorskip("mambapy.mamba")
pscan_mod = pytest.importorskip("mambapy.pscan")


def _their_layout(kw):
    t = lambda x: x.transpose(1, 2).contiguous()
    return t(kw["u"]), t(kw["delta"]), kw["A"], t(kw["B"]), t(kw["C"]), kw["D"]


def _inputs(L, dtype):
    kw = scan_inputs(batch=2, dim=8, N=4, L=L, layout="variable", dtype=dtype, options=False)
    kw["D"] = torch.randn(8, dtype=dtype)
    return kw


def _seq_self(dim, N):
    # selective_scan_seq reads only these two sizes from its module.
    return types.SimpleNamespace(config=types.SimpleNamespace(d_inner=dim, d_state=N))


# L = 37 is not a power of two: pscan pads it.  The float32 runs are held to
# conftest's float32 tolerance against our float64 result; a float32
# recurrence of 37 steps with decaying states adds at most ~37 * 2**-24
# relative error, far inside it.
@pytest.mark.parametrize("L", [16, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_scan_pscan_and_sequential(L, dtype):
    kw = _inputs(L, dtype)
    x, dt, A, B, C, D = _their_layout(kw)
    want = ref.selective_scan(**{k: v.double() for k, v in kw.items()}).transpose(1, 2)
    par = mamba.MambaBlock.selective_scan(None, x, dt, A, B, C, D)
    seq = mamba.MambaBlock.selective_scan_seq(_seq_self(8, 4), x, dt, A, B, C, D)
    ours = ops.selective_scan(**kw).transpose(1, 2)
    assert_close(par, want, dtype)
    assert_close(seq, want, dtype)
    assert_close(ours, want, dtype)


def test_pscan_states_match_last_state():
    kw = _inputs(24, torch.float64)
    x, dt, A, B, C, D = _their_layout(kw)
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (batch, L, dim, N)
    dBu = dt.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan_mod.pscan(dA, dBu)
    _, last = ops.selective_scan(**kw, return_last_state=True)
    assert_close(last, hs[:, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_pscan(dtype):
    kw = _inputs(20, dtype)
    names = ["u", "delta", "A", "B", "C", "D"]
    ours_in = {k: kw[k].clone().requires_grad_(True) for k in names}
    theirs_in = [t.detach().clone().requires_grad_(True) for t in _their_layout(kw)]
    seed = torch.randn(2, 8, 20, dtype=dtype)
    ours = torch.autograd.grad(ops.selective_scan(**ours_in), list(ours_in.values()), seed)
    theirs_out = mamba.MambaBlock.selective_scan(None, *theirs_in)
    theirs = torch.autograd.grad(theirs_out, theirs_in, seed.transpose(1, 2))
    back = lambda g, k: g.transpose(1, 2) if k in ("u", "delta", "B", "C") else g
    # float32 gradients are sums over batch and time of float32 products;
    # compare both against our float64 gradients.
    ref_in = {k: kw[k].double().requires_grad_(True) for k in names}
    want = torch.autograd.grad(ref.selective_scan(**ref_in), list(ref_in.values()), seed.double())
    for k, a, b, w in zip(names, ours, theirs, want):
        assert_close(a, w, dtype, msg=f"ours, grad of {k}")
        assert_close(back(b, k), w, dtype, msg=f"mambapy, grad of {k}")

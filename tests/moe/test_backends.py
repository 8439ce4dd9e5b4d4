"""Every MoE op on every backend against the float64 reference: outputs and every gradient, on odd
sizes (T = 1, 7, 129), experts left idle, k = 1, 2, 8, both scorings and activations, every dtype.

Outputs are NaN-poisoned (conftest for torch.empty, FRONTIERS_FAST_DEBUG_POISON for the C++
kernels), so an element a kernel forgets to write fails the comparison.
"""

import pytest
import torch

from frontiers_fast.ops import moe
from frontiers_fast.reference import moe as ref

from ..helpers import assert_close, backend_cases, grads

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (T, E, k): odd token counts; E much larger than T*k leaves experts idle; k up to 8.
SIZES = [(1, 4, 1), (7, 5, 2), (129, 8, 2), (7, 16, 8), (129, 64, 8), (1, 32, 8)]
ROUTINGS = {
    "softmax": dict(),
    "softmax-raw-scaled": dict(renormalize=False, scaling=1.7),
    "sigmoid-bias-grouped": dict(scoring="sigmoid", bias=True, groups=True, scaling=2.5),
    "softmax-grouped": dict(groups=True),
}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fresh(t, dtype, device, grad=True):
    return t.detach().to(device=device, dtype=dtype).requires_grad_(grad)


def _compare_grads(out, ours, want, ref_in, dtype, what):
    """The gradients of ``out`` (ours) and ``want`` (float64) for one random output gradient."""
    g = torch.randn_like(want)
    got = grads(out, ours, g.to(out.dtype).to(out.device))
    # the reference gradient for the output gradient ours saw (rounded to the dtype)
    expect = grads(want, ref_in, g.to(out.dtype).double())
    for i, (a, b) in enumerate(zip(got, expect)):
        assert_close(a.cpu(), b, dtype, msg=f"{what}: gradient of input {i}")


@pytest.mark.parametrize("device,backend", backend_cases("moe_route"))
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("T,E,k", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_route(T, E, k, routing, dtype, device, backend):
    kw = dict(ROUTINGS[routing])
    bias = torch.randn(E) * 0.3 if kw.pop("bias", False) else None
    if kw.pop("groups", False):
        if E % 4 or k > E // 2:
            pytest.skip("grouping needs 4 groups of at least k / 2 experts")
        kw.update(n_group=4, topk_group=2)
    logits = torch.randn(T, E) * 2
    logits[:, 1] = float("-inf")  # a masked expert in every row
    if E - 1 < k or (kw.get("n_group") and k > E // 2 - 1):
        logits[:, 1] = 0.0
    ours = _fresh(logits, dtype, device)
    w, ids = moe.moe_route(
        ours, k, correction_bias=None if bias is None else bias.to(device), backend=backend, **kw
    )
    r_in = ours.detach().cpu().double().requires_grad_(True)
    want_w, want_ids = ref.moe_route(r_in, k, correction_bias=None if bias is None else bias.double(), **kw)
    assert ids.dtype == torch.int32 and w.dtype == _acc(dtype)
    assert torch.equal(ids.cpu(), want_ids), "the chosen experts differ from the reference"
    assert_close(w.cpu(), want_w, _acc(dtype))
    # the logits' gradient is rounded to their dtype
    _compare_grads(w, [ours], want_w, [r_in], dtype, "moe_route")


@pytest.mark.parametrize("device,backend", backend_cases("moe_permute"))
@pytest.mark.parametrize("T,E,k", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_permute_unpermute(T, E, k, dtype, id_dtype, device, backend):
    H = 19
    _, ids = ref.moe_route(torch.randn(T, E), k)
    ids = ids.to(id_dtype).to(device)
    x = _fresh(torch.randn(T, H), dtype, device)
    xp, off, row_map = moe.moe_permute(x, ids, E, backend=backend)
    r_x = x.detach().cpu().double().requires_grad_(True)
    want_xp, want_off, want_rm = ref.moe_permute(r_x, ids.cpu(), E)
    assert torch.equal(off.cpu(), want_off) and torch.equal(row_map.cpu(), want_rm)
    assert off.dtype == row_map.dtype == torch.int64
    assert torch.equal(xp.cpu().double(), want_xp.detach())  # a copy: exact
    _compare_grads(xp, [x], want_xp, [r_x], dtype, "moe_permute")
    # The combine, with y in the dtype and the router weights in float32 (as moe_route returns them).
    y = _fresh(torch.randn(T * k, H), dtype, device)
    w = _fresh(torch.rand(T, k), _acc(dtype), device)
    out = moe.moe_unpermute(y, row_map, w, backend=backend)
    r_y, r_w = (t.detach().cpu().double().requires_grad_(True) for t in (y, w))
    want = ref.moe_unpermute(r_y, row_map.cpu(), r_w)
    assert out.dtype == dtype
    assert_close(out.cpu(), want, dtype)
    _compare_grads(out, [y, w], want, [r_y, r_w], dtype, "moe_unpermute")


@pytest.mark.parametrize("device,backend", backend_cases("moe_unpermute"))
def test_unpermute_rows_named_twice_or_never(device, backend):
    # row_map need not be a permutation: a row read by several slots sums their gradients, an unread one gets 0.
    y = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    row_map = torch.tensor([[0, 0], [3, 0], [5, 3]], device=device)
    w = torch.rand(3, 2, dtype=torch.float64, device=device, requires_grad=True)
    out = moe.moe_unpermute(y, row_map, w, backend=backend)
    r_y, r_w = (t.detach().cpu().requires_grad_(True) for t in (y, w))
    want = ref.moe_unpermute(r_y, row_map.cpu(), r_w)
    assert_close(out.cpu(), want)
    _compare_grads(out, [y, w], want, [r_y, r_w], torch.float64, "moe_unpermute")


@pytest.mark.parametrize("device,backend", backend_cases("fused_moe"))
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("T,E,k", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe(T, E, k, dtype, activation, device, backend):
    H, inter = 24, 40
    gen = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    x = torch.randn(T, H, generator=gen)
    wgu = torch.randn(E, 2 * inter, H, generator=gen) / H**0.5
    wd = torch.randn(E, H, inter, generator=gen) / inter**0.5
    w, ids = ref.moe_route(torch.randn(T, E, generator=gen), k)
    ours = [_fresh(t, dtype, device) for t in (x, wgu, wd)] + [_fresh(w, _acc(dtype), device)]
    out = moe.fused_moe(*ours, ids.to(device), activation, backend=backend)
    r_in = [t.detach().cpu().double().requires_grad_(True) for t in ours]
    want = ref.fused_moe(*r_in, ids, activation)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close(out.cpu(), want, dtype)
    _compare_grads(out, ours, want, r_in, dtype, "fused_moe")


@pytest.mark.parametrize("device,backend", backend_cases("fused_moe"))
def test_fused_moe_skewed_and_many_rows(device, backend):
    # One expert takes most rows (the threaded-GEMM path), the others a few (the spread path) in one call.
    T, H, inter, E, k = 700, 16, 24, 6, 2
    x = torch.randn(T, H, dtype=torch.float64)
    wgu = torch.randn(E, 2 * inter, H, dtype=torch.float64) / H**0.5
    wd = torch.randn(E, H, inter, dtype=torch.float64) / inter**0.5
    ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.randint(1, E, (T,))], 1)
    w = torch.rand(T, k, dtype=torch.float64)
    ours = [_fresh(t, torch.float32, device) for t in (x, wgu, wd, w)]
    out = moe.fused_moe(*ours, ids.to(device), backend=backend)
    r_in = [t.detach().cpu().double().requires_grad_(True) for t in ours]
    want = ref.fused_moe(*r_in, ids)
    assert_close(out.cpu(), want, torch.float32)
    _compare_grads(out, ours, want, r_in, torch.float32, "fused_moe")


@pytest.mark.parametrize("device,backend", backend_cases("fused_moe"))
def test_fused_moe_mixed_precision_weights(device, backend):
    # Half tokens and experts with float32 router weights (what moe_route returns), and float64
    # router weights with float32 experts, which compute in float64 (as the reference does).
    T, H, inter, E, k = 9, 16, 8, 4, 2
    x, wgu, wd = torch.randn(T, H), torch.randn(E, 2 * inter, H) / 4, torch.randn(E, H, inter) / 3
    w, ids = ref.moe_route(torch.randn(T, E), k)
    for dt, wdt in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        ours = [_fresh(t, dt, device) for t in (x, wgu, wd)] + [_fresh(w, wdt, device)]
        out = moe.fused_moe(*ours, ids.to(device), backend=backend)
        r_in = [t.detach().cpu().double().requires_grad_(True) for t in ours]
        want = ref.fused_moe(*r_in, ids)
        assert out.dtype == dt
        assert_close(out.cpu(), want, dt)
        _compare_grads(out, ours, want, r_in, dt, f"fused_moe {dt} x {wdt}")


@pytest.mark.parametrize("device,backend", backend_cases("fused_moe"))
@pytest.mark.parametrize("spread", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fused_moe_every_gemm_path(dtype, spread, device, backend):
    # H and I multiples of 32 (the AMX kernel's blocks) and row counts per expert that reach every
    # GEMM path of the C++ kernel: a few rows (skinny kernels), up to 96 (AMX tiles, bfloat16 on an
    # AMX CPU), row counts off the 16/32 rounding of the bfloat16 GEMMs, and (not spread) an expert
    # past the 1024-row forward pass, which runs in equal passes.
    H, inter = 64, 96
    counts = [3, 9, 17, 33, 64, 70, 100] if spread else [1100, 129, 64, 40, 5]
    E = len(counts) + 1  # the last expert stays idle
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(len(ids))].unsqueeze(1)
    T = len(ids)
    x = torch.randn(T, H)
    wgu = torch.randn(E, 2 * inter, H) / H**0.5
    wd = torch.randn(E, H, inter) / inter**0.5
    w = torch.rand(T, 1) + 0.5
    ours = [_fresh(t, dtype, device) for t in (x, wgu, wd)] + [_fresh(w, torch.float32, device)]
    out = moe.fused_moe(*ours, ids.to(device), backend=backend)
    r_in = [t.detach().cpu().double().requires_grad_(True) for t in ours]
    want = ref.fused_moe(*r_in, ids)
    assert_close(out.cpu(), want, dtype)
    if spread:
        _compare_grads(out, ours, want, r_in, dtype, "fused_moe")
    else:
        # The weight gradients of the 1100-row expert are float32 sums of 1100 products, past the
        # O(100)-term sums the float32 tolerance is derived for (the reference backend misses it
        # too); long weight-gradient sums are checked by test_fused_moe_skewed_and_many_rows.
        # Here: the gradients of x and of the router weights, sums over I and H only.
        g = torch.randn_like(want)
        got = grads(out, [ours[0], ours[3]], g.to(out.dtype))
        expect = grads(want, [r_in[0], r_in[3]], g.to(out.dtype).double())
        for a, b in zip(got, expect):
            assert_close(a, b, dtype)

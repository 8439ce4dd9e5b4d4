"""Triton launchers (kernels/moe.py) against the float64 reference.

The launchers are called directly: on CPU tensors through the Triton
interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU), and on
CUDA tensors natively when a GPU is present.  Under the interpreter the
tests run in float32 and float64 on small hidden sizes (H=24, I=40); on
CUDA they also run in float16 and bfloat16.  Every buffer the launchers
allocate starts as NaN (FRONTIERS_FAST_DEBUG_POISON=1, forced below), so an
element a kernel leaves unwritten fails the comparison.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frontiers_fast.ops import moe as ops
from frontiers_fast.reference import moe as ref
from tests.helpers import assert_close, check_against_reference, triton_devices, triton_params

pytest.importorskip("triton")
# imported after conftest, which has set TRITON_INTERPRET for a GPU-less machine
from frontiers_fast.kernels import moe as K  # noqa: E402

f64 = torch.float64
H, FF = 24, 40  # hidden and expert intermediate sizes: small, so that the interpreter stays fast
E = 20
IDLE = (3, 11, 19)  # experts no token is routed to in the dispatch tests
SMALL = triton_params((torch.float32, torch.float64))
SWEEP = triton_params((torch.float32,))
GRAD_NAMES = ("x", "w_gate_up", "w_down", "weights")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FRONTIERS_FAST_DEBUG_POISON", "1")


def _randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, dtype=f64) * scale).to(device=device, dtype=dtype)


def _f64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _ids(T, k, num_experts, device, idle=(), dtype=torch.int32):
    """k distinct experts per token, never one of ``idle``."""
    score = torch.rand(T, num_experts)
    score[:, list(idle)] = -1.0
    return score.argsort(dim=1, descending=True)[:, :k].to(device=device, dtype=dtype)


def moe_args(T, k, dtype, device, *, experts=E, idle=IDLE, ids_dtype=torch.int32):
    """(x, w_gate_up, w_down, weights, ids) with O(1) activations at every stage."""
    return [
        _randn(T, H, dtype=dtype, device=device),
        _randn(experts, 2 * FF, H, dtype=dtype, device=device, scale=H**-0.5),
        _randn(experts, H, FF, dtype=dtype, device=device, scale=FF**-0.5),
        (torch.rand(T, k, dtype=f64) + 0.1).to(device=device, dtype=dtype),
        _ids(T, k, experts, device, idle, ids_dtype),
    ]


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------
def check_route(logits, top_k, scoring="softmax", renormalize=True, bias=None, n_group=None, topk_group=None,
                scaling=1.0, backward=True):  # fmt: skip
    """ids exactly, weights and the logits' gradient against the float64 reference."""
    args = (top_k, scoring, renormalize, bias, n_group, topk_group, scaling)
    w, ids = K.moe_route_fwd(logits, *args)
    rbias = None if bias is None else bias.double()
    rw, rids = ops._ref_route(
        logits.double(), top_k, scoring, renormalize, rbias, n_group, topk_group, scaling
    )
    assert ids.dtype == torch.int32 and ids.shape == (logits.shape[0], top_k)
    assert torch.equal(ids, rids), "ids must equal the reference's (ties to the lowest id)"
    assert w.dtype == ref.score_dtype(logits.dtype)
    assert_close(w, rw, w.dtype, msg="weights")
    if not backward:
        return ids
    gw = torch.randn_like(w)
    g = K.moe_route_bwd(logits, ids, gw, scoring, renormalize, scaling)
    want = ops._ref_route_bwd(logits.double(), ids, gw.double(), scoring, renormalize, scaling)
    assert g.dtype == logits.dtype and g.shape == logits.shape
    assert_close(g, want, logits.dtype, msg="grad_logits")
    return ids


ROUTES = {
    "mixtral-top2": dict(top_k=2),
    "top1-no-renorm": dict(top_k=1, renormalize=False),
    "top8-scaled": dict(top_k=8, scaling=1.7),
    "sigmoid-bias": dict(top_k=2, scoring="sigmoid", bias=True),
    "deepseek-v3": dict(top_k=4, scoring="sigmoid", bias=True, n_group=4, topk_group=2, scaling=2.5),
    "grouped-max": dict(top_k=3, n_group=4, topk_group=2),
    "grouped-per-1": dict(top_k=3, scoring="sigmoid", bias=True, n_group=16, topk_group=5, renormalize=False),
}


@pytest.mark.parametrize("T", [1, 7, 129])
@pytest.mark.parametrize("case", list(ROUTES))
@pytest.mark.parametrize("device,dtype", SMALL)
def test_route(device, dtype, case, T):
    kw = dict(ROUTES[case])
    bias = _randn(16, dtype=torch.float32, device=device, scale=0.3) if kw.pop("bias", False) else None
    check_route(_randn(T, 16, dtype=dtype, device=device), bias=bias, **kw)


@pytest.mark.parametrize("device,dtype", SWEEP)
def test_route_many_experts(device, dtype):
    # E = 160 (DeepSeek-V2's count, not a power of two): one token per program, padded lanes
    bias = _randn(160, dtype=torch.float32, device=device, scale=0.1)
    check_route(_randn(9, 160, dtype=dtype, device=device), 6, "sigmoid", True, bias, 8, 3, 2.5)
    check_route(_randn(9, 160, dtype=dtype, device=device), 8)


@pytest.mark.parametrize("device,dtype", SMALL)
def test_route_ties(device, dtype):
    # integer logits: many exactly equal scores, which go to the lowest expert id
    logits = torch.randint(-2, 3, (40, 16)).to(device=device, dtype=dtype)
    logits[0] = 0.5  # one row of all-equal experts
    for scoring in ("softmax", "sigmoid"):
        check_route(logits, 5, scoring)
        check_route(logits, 3, scoring, n_group=4, topk_group=2)
    # identical groups: the group scores tie too, the lowest groups are kept
    grouped = torch.randint(-2, 3, (8, 4)).repeat(1, 4).to(device=device, dtype=dtype)
    ids = check_route(grouped, 2, "softmax", n_group=4, topk_group=1)
    assert bool((ids < 4).all()), "with equal groups only group 0 may be kept"
    bias = torch.zeros(16, device=device)
    ids = check_route(grouped, 2, "sigmoid", bias=bias, n_group=4, topk_group=2)
    assert bool((ids < 8).all())


@pytest.mark.parametrize("device,dtype", SMALL)
def test_route_masked(device, dtype):
    # -inf masks an expert: never chosen, even with a bias that would lift its zero score
    T = 33
    logits = _randn(T, 16, dtype=dtype, device=device)
    mask = torch.rand(T, 16, device=device) < 0.4
    mask[:, :4] = False  # every row keeps 4 selectable experts
    logits = logits.masked_fill(mask[:, torch.randperm(16)], float("-inf"))
    bias = torch.full((16,), 5.0, device=device)
    for scoring in ("softmax", "sigmoid"):
        ids = check_route(logits, 4, scoring, bias=bias if scoring == "sigmoid" else None)
        assert not bool(torch.isneginf(logits.gather(1, ids.long())).any())
    # grouped: one masked expert in every group leaves 3 per group
    logits = _randn(T, 16, dtype=dtype, device=device)
    logits[:, ::4] = float("-inf")
    check_route(logits, 4, "sigmoid", True, bias, 4, 2, 1.0)
    check_route(logits, 5, "softmax", True, None, 4, 2, 1.0)


@pytest.mark.parametrize("device", triton_devices())
def test_route_errors_name_the_argument(device):
    logits = torch.randn(6, 8, device=device)
    few = logits.clone()
    few[4, 1:] = float("-inf")
    with pytest.raises(ValueError, match="logits row 4 has fewer than top_k=2 selectable experts"):
        K.moe_route_fwd(few, 2, "softmax", True, None, None, None, 1.0)
    grouped = logits.clone()
    grouped[2, :6] = float("-inf")  # groups 0-2 of 4 are masked: one kept group of 2 cannot give 3
    with pytest.raises(ValueError, match="logits row 2 .* in its topk_group kept groups"):
        K.moe_route_fwd(grouped, 3, "softmax", True, None, 4, 2, 1.0)
    for bad in (float("nan"), float("inf")):
        lg = logits.clone()
        lg[1, 3] = bad
        with pytest.raises(ValueError, match="logits must not contain NaN or"):
            K.moe_route_fwd(lg, 2, "softmax", True, None, None, None, 1.0)
    bias = torch.zeros(8, device=device)
    bias[5] = float("nan")
    with pytest.raises(ValueError, match="correction_bias must be finite"):
        K.moe_route_fwd(logits, 2, "sigmoid", True, bias, None, None, 1.0)


# ---------------------------------------------------------------------------
# permutation
# ---------------------------------------------------------------------------
def check_permute(x, ids, num_experts):
    dtype, (T, k) = x.dtype, ids.shape
    xp, offsets, row_map = K.moe_permute_fwd(x, ids, num_experts)
    want_xp, want_off, want_map = ops._ref_permute(x, ids, num_experts)
    assert offsets.dtype == torch.int64 and row_map.dtype == torch.int64
    assert torch.equal(offsets, want_off), "expert_offsets"
    assert torch.equal(row_map, want_map), "row_map: tokens ascending within an expert"
    assert torch.equal(xp, want_xp), "x_perm is a copy: exact"
    g = torch.randn_like(xp)
    assert_close(
        K.moe_permute_bwd(g, row_map), ops._ref_permute_bwd(g.double(), row_map), dtype, msg="grad_x"
    )
    w = torch.rand(T, k, device=x.device, dtype=dtype)
    out = K.moe_unpermute_fwd(xp, row_map, w)
    assert_close(out, ops._ref_unpermute(xp.double(), row_map, w.double()), dtype, msg="unpermute")
    go = torch.randn_like(out)
    gy, gw = K.moe_unpermute_bwd(xp, row_map, w, go, True, True)
    want_gy, want_gw = ops._ref_unpermute_bwd(xp.double(), row_map, w.double(), go.double(), True, True)
    assert gy.dtype == dtype and gw.dtype == dtype
    assert_close(gy, want_gy, dtype, msg="grad_y")
    assert_close(gw, want_gw, dtype, msg="grad_weights")


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("T", [1, 7, 129])
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_permute(device, dtype, T, k):
    # int64 ids for the odd T: both index dtypes reach the kernels
    ids = _ids(T, k, E, device, IDLE, torch.int64 if T % 2 else torch.int32)
    check_permute(_randn(T, H, dtype=dtype, device=device), ids, E)


@pytest.mark.parametrize("device,dtype", SMALL)
def test_permute_many_blocks_and_repeats(device, dtype):
    # 300 tokens x 3 slots span several sort blocks; a token may choose the same expert twice
    ids = torch.randint(0, 6, (300, 3), device=device)
    ids[:, 1] = ids[:, 0]
    check_permute(_randn(300, 5, dtype=dtype, device=device), ids, 9)


@pytest.mark.parametrize("device,dtype", SMALL)
def test_unpermute_any_row_map(device, dtype):
    # row_map need not be a permutation: rows used twice, rows never used (their gradient is 0)
    T, k, R = 31, 3, 50
    y = _randn(R, H, dtype=dtype, device=device)
    row_map = torch.randint(0, R - 5, (T, k), device=device)
    row_map[:, 2] = row_map[:, 0]
    w = _randn(T, k, dtype=dtype, device=device)
    out = K.moe_unpermute_fwd(y, row_map, w)
    assert_close(out, ops._ref_unpermute(y.double(), row_map, w.double()), dtype)
    go = _randn(T, H, dtype=dtype, device=device)
    got = K.moe_unpermute_bwd(y, row_map, w, go, True, True)
    want = ops._ref_unpermute_bwd(y.double(), row_map, w.double(), go.double(), True, True)
    for name, a, b in zip(("grad_y", "grad_weights"), got, want):
        assert_close(a, b, dtype, msg=name)
    gy, gw = K.moe_unpermute_bwd(y, row_map, w, go, False, True)
    assert gy.numel() == 0 and torch.equal(gw, got[1])
    # float64 weights with float32 rows: the combine runs in float64, as the reference
    out = K.moe_unpermute_fwd(y, row_map, w.double())
    assert out.dtype == dtype
    assert_close(out, ops._ref_unpermute(y.double(), row_map, w.double()), dtype)


@pytest.mark.parametrize("device", triton_devices())
def test_dispatch_errors_name_the_argument(device):
    x, wgu, wd, w, ids = moe_args(5, 2, torch.float32, device)
    bad = ids.clone()
    bad[3, 1] = E
    with pytest.raises(ValueError, match=rf"ids must lie in \[0, {E - 1}\] \(there are {E} experts\)"):
        K.fused_moe_fwd(x, wgu, wd, w, bad, "silu")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 19\]"):
        K.moe_permute_fwd(x, bad, E)
    with pytest.raises(ValueError, match="ids must lie in"):
        K.moe_permute_fwd(x, -ids - 1, E)
    row_map = torch.arange(10, device=device).view(5, 2)
    with pytest.raises(ValueError, match=r"row_map must lie in \[0, 8\] \(y has 9 rows\)"):
        K.moe_unpermute_fwd(torch.randn(9, H, device=device), row_map, w)


# ---------------------------------------------------------------------------
# fused experts
# ---------------------------------------------------------------------------
def check_fused(args, activation, padded, block_m=None, needs=(True, True, True, True)):
    """The output and the four gradients against the float64 reference."""
    x = args[0]
    dtype = x.dtype
    out = K.fused_moe_fwd(*args, activation, padded=padded, block_m=block_m)
    want = ops._ref_fused(*_f64(args), activation)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, want, dtype, msg="out")
    go = _randn(*x.shape, dtype=dtype, device=x.device)
    got = K.fused_moe_bwd(*args, go, activation, *needs, padded=padded, block_m=block_m)
    want = ops._ref_fused_bwd(*_f64(args), go.double(), activation, *needs)
    for name, g, r, like, need in zip(GRAD_NAMES, got, want, args[:4], needs):
        if not need:
            assert g.numel() == 0, name
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert_close(g, r, dtype, msg=f"grad_{name}")
    return out, got


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("T,k", [(1, 1), (7, 2), (129, 8)])
@pytest.mark.parametrize("device,dtype", SMALL)
def test_fused(device, dtype, T, k, activation, padded):
    check_fused(moe_args(T, k, dtype, device), activation, padded)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_fused_small_tiles(device, dtype, padded):
    # 16-row tiles: several tiles per expert, partial last tiles, int64 ids; one expert holds most rows
    args = moe_args(70, 2, dtype, device, experts=6, idle=(4,), ids_dtype=torch.int64)
    args[4][::2, 0] = 2
    args[4][::2, 1] = torch.where(args[4][::2, 1] == 2, 5, args[4][::2, 1])
    check_fused(args, "silu", padded, block_m=16)


@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False), (False, True, False, False), (False, False, True, False),
     (False, False, False, True), (True, False, True, True)],
    ids=["x", "w_gate_up", "w_down", "weights", "x-w_down-weights"],
)  # fmt: skip
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_fused_some_gradients(device, dtype, needs):
    check_fused(moe_args(9, 2, dtype, device), "gelu", False, needs=needs)


@pytest.mark.parametrize("device", triton_devices())
def test_fused_noncontiguous_and_wide_weights(device):
    x, wgu, wd, w, ids = moe_args(11, 3, torch.float32, device, experts=5, idle=(1,))
    # views with no unit row stride, transposed expert matrices, float64 router weights
    xs = torch.full((11, 2 * H), float("nan"), device=device)
    xs[:, ::2] = x
    wgu_t = wgu.transpose(1, 2).contiguous().transpose(1, 2)
    wd_t = wd.transpose(1, 2).contiguous().transpose(1, 2)
    args = [xs[:, ::2], wgu_t, wd_t, w.double().t().contiguous().t(), ids.t().contiguous().t()]
    assert not any(a.is_contiguous() for a in args)
    for padded in (False, True):
        check_fused(args, "silu", padded)


@pytest.mark.parametrize("device", triton_devices())
def test_fused_bwd_deterministic(device):
    # bitwise identical across runs: one writer per element, sums in a fixed order, no atomics
    args = moe_args(97, 4, torch.float32, device, experts=8, idle=(6,))
    go = torch.randn_like(args[0])
    for padded in (False, True):
        first = K.fused_moe_bwd(*args, go, "silu", True, True, True, True, padded=padded)
        again = K.fused_moe_bwd(*args, go, "silu", True, True, True, True, padded=padded)
        for name, a, b in zip(GRAD_NAMES, first, again):
            assert torch.equal(a, b), f"grad_{name} must be bitwise reproducible"
        out = K.fused_moe_fwd(*args, "silu", padded=padded)
        assert torch.equal(out, K.fused_moe_fwd(*args, "silu", padded=padded))


@pytest.mark.parametrize("device", triton_devices())
def test_fused_nan_reaches_only_its_rows(device):
    x, wgu, wd, w, ids = moe_args(13, 2, torch.float32, device)
    x[5, 7] = float("nan")
    wgu[IDLE[0]] = float("nan")  # an expert no token chose is never read
    wd[IDLE[1]] = float("nan")
    out = K.fused_moe_fwd(x, wgu, wd, w, ids, "silu")
    bad = out.isnan().any(1)
    assert bool(bad[5]) and int(bad.sum()) == 1
    gx, gwgu, gwd, gw = K.fused_moe_bwd(
        x, wgu, wd, w, ids, torch.randn_like(x), "silu", True, True, True, True
    )
    assert int(gx.isnan().any(1).sum()) == 1 and bool(gx[5].isnan().all())
    assert not bool(gwgu[IDLE[0]].isnan().any()) and not bool(gwgu[IDLE[0]].ne(0).any())
    assert not bool(gw.isnan()[torch.arange(13, device=device) != 5].any())


@pytest.mark.parametrize("device", triton_devices())
def test_empty_inputs(device):
    x, wgu, wd, w, ids = moe_args(0, 2, torch.float32, device)
    out = K.fused_moe_fwd(x, wgu, wd, w, ids, "silu")
    assert out.shape == (0, H)
    gx, gwgu, gwd, gw = K.fused_moe_bwd(x, wgu, wd, w, ids, out, "silu", True, True, True, True)
    assert gx.shape == (0, H) and gw.shape == (0, 2)
    assert torch.equal(gwgu, torch.zeros_like(wgu)) and torch.equal(gwd, torch.zeros_like(wd))
    xp, offsets, row_map = K.moe_permute_fwd(x, ids, E)
    assert xp.shape == (0, H) and row_map.shape == (0, 2) and torch.equal(offsets, torch.zeros_like(offsets))
    w, ids = K.moe_route_fwd(torch.randn(0, 8, device=device), 2, "softmax", True, None, None, None, 1.0)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_poisoned_buffers(monkeypatch):
    # what FRONTIERS_FAST_DEBUG_POISON=1 (set for every test here) does to the launchers' buffers
    assert bool(K._new((3, 4), torch.float32, "cpu").isnan().all())
    assert bool((K._new((5,), torch.int64, "cpu") == -2).all())
    monkeypatch.setenv("FRONTIERS_FAST_DEBUG_POISON", "0")
    assert K._new((2, 2), torch.int32, "cpu").shape == (2, 2)


# ---------------------------------------------------------------------------
# int64 index arithmetic
# ---------------------------------------------------------------------------
def _huge(shape, dtype=torch.float32):
    """A view of ``shape`` whose first-dimension stride puts its last row past 2^31 elements.

    The storage is one untouched allocation of ~2^31 elements: virtual
    memory, of which only the pages of the view's rows are ever written.
    """
    inner = math.prod(shape[1:])
    stride0 = max(inner, -(-(2**31) // (shape[0] - 1)))
    base = torch.empty_strided(((shape[0] - 1) * stride0 + inner,), (1,), dtype=dtype)
    inner_strides = [math.prod(shape[d + 1 :]) for d in range(1, len(shape))]
    return base.as_strided(shape, (stride0, *inner_strides))


def _huge_offsets_main():
    """Every launcher with its inputs and its own buffers laid out like tensors of more than 2^31 elements.

    Each 2-D or 3-D float tensor here, input or buffer, is a view whose
    row (or expert) stride times the last row index exceeds 2^31, as in a
    [T*k, H] tensor with T*k*H > 2^31.  With int32 index arithmetic the
    offsets wrap (a wrong value, or a read of an unmapped address); with
    int64 the results equal those on ordinary tensors.
    """
    torch.manual_seed(0)

    def huge_copy(t):
        v = _huge(tuple(t.shape), t.dtype)
        v.copy_(t)
        return v

    orig = K._new

    def huge_new(shape, dtype, device):
        shape = tuple(shape)
        if dtype.is_floating_point and len(shape) >= 2 and shape[0] >= 2 and math.prod(shape) > 0:
            return _huge(shape, dtype).fill_(float("nan"))
        return orig(shape, dtype, device)

    T, k, experts = 6, 2, 3
    x, wgu, wd, w, ids = moe_args(T, k, torch.float32, "cpu", experts=experts, idle=())
    logits = torch.randn(T, experts)
    go = torch.randn(T, H)
    K._new = huge_new
    try:
        hx, hwgu, hwd, hgo, hlogits = (huge_copy(t) for t in (x, wgu, wd, go, logits))
        hw, hids = K.moe_route_fwd(hlogits, k, "softmax", True, None, None, None, 1.0)
        rw, rids = ops._ref_route(logits.double(), k, "softmax", True, None, None, None, 1.0)
        assert torch.equal(hids, rids)
        assert_close(hw, rw, torch.float32)
        assert_close(
            K.moe_route_bwd(hlogits, hids, w, "softmax", True, 1.0),
            ops._ref_route_bwd(logits.double(), rids, w.double(), "softmax", True, 1.0),
        )
        xp, offsets, row_map = K.moe_permute_fwd(hx, ids, experts)
        want_xp, want_off, want_map = ops._ref_permute(x, ids, experts)
        assert torch.equal(xp, want_xp) and torch.equal(offsets, want_off) and torch.equal(row_map, want_map)
        assert_close(
            K.moe_permute_bwd(huge_copy(want_xp), row_map), ops._ref_permute_bwd(want_xp.double(), row_map)
        )
        assert_close(
            K.moe_unpermute_fwd(xp, row_map, w), ops._ref_unpermute(want_xp.double(), row_map, w.double())
        )
        got = K.moe_unpermute_bwd(xp, row_map, w, hgo, True, True)
        want = ops._ref_unpermute_bwd(want_xp.double(), row_map, w.double(), go.double(), True, True)
        for a, b in zip(got, want):
            assert_close(a, b)
        ref_args = _f64([x, wgu, wd, w, ids])
        for padded in (False, True):
            out = K.fused_moe_fwd(hx, hwgu, hwd, w, ids, "gelu", padded=padded)
            assert_close(out, ops._ref_fused(*ref_args, "gelu"))
            got = K.fused_moe_bwd(hx, hwgu, hwd, w, ids, hgo, "gelu", True, True, True, True, padded=padded)
            want = ops._ref_fused_bwd(*ref_args, go.double(), "gelu", True, True, True, True)
            for name, a, b in zip(GRAD_NAMES, got, want):
                assert_close(a, b, torch.float32, msg=name)
    finally:
        K._new = orig
    print("huge offsets: ok")


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's virtual-memory views"
)
def test_index_arithmetic_past_2_31_elements():
    # In a child process: an int32 offset that wraps may read an unmapped address and kill the process,
    # which must fail this test rather than end the whole run.
    env = dict(os.environ, TRITON_INTERPRET="1", FRONTIERS_FAST_DEBUG_POISON="1")
    code = "from tests.moe.test_triton import _huge_offsets_main; _huge_offsets_main()"
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "huge offsets: ok" in res.stdout, (
        f"exit code {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    )


# ---------------------------------------------------------------------------
# CUDA only: graph capture and the public functions end to end
# ---------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_fused_moe_cuda_graph(padded):
    # no host synchronisation: the schedule is built on the device, so new ids replay correctly
    x, wgu, wd, w, ids = moe_args(200, 4, torch.bfloat16, "cuda", experts=16, idle=(7,))
    eager = K.fused_moe_fwd(x, wgu, wd, w, ids, "silu", padded=padded)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        K.fused_moe_fwd(x, wgu, wd, w, ids, "silu", padded=padded)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.fused_moe_fwd(x, wgu, wd, w, ids, "silu", padded=padded)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    x.copy_(torch.randn_like(x))
    ids.copy_(_ids(200, 4, 16, "cuda", (2, 9)))
    w.copy_(torch.rand_like(w))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, K.fused_moe_fwd(x, wgu, wd, w, ids, "silu", padded=padded))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_functions_on_cuda(dtype):
    # the ops route backend="triton" to these launchers, forward and backward
    T = 77
    logits = torch.randn(T, 16, device="cuda", requires_grad=True)
    check_against_reference(
        lambda lg, backend=None: ops.moe_route(lg, 4, "sigmoid", True, None, 4, 2, 2.5, backend=backend)[0],
        lambda lg: ref.moe_route(lg, 4, "sigmoid", True, None, 4, 2, 2.5)[0],
        [logits], torch.float32, "triton",
    )  # fmt: skip
    x, wgu, wd, w, ids = moe_args(T, 4, torch.float32, "cuda")
    inputs = [t.requires_grad_() for t in (x, wgu, wd, w)]
    check_against_reference(
        lambda x, wgu, wd, w, backend=None: ops.fused_moe(x, wgu, wd, w, ids, "gelu", backend=backend),
        lambda x, wgu, wd, w: ref.fused_moe(x, wgu, wd, w, ids, "gelu"),
        inputs, dtype, "triton",
    )  # fmt: skip

    def permute_roundtrip(x, w, backend=None):
        xp, _, row_map = ops.moe_permute(x, ids, E, backend=backend)
        return ops.moe_unpermute(xp * 2.0, row_map, w, backend=backend)

    check_against_reference(
        permute_roundtrip,
        lambda x, w: ref.moe_unpermute(2.0 * ref.moe_permute(x, ids, E)[0], ref.permutation(ids, E)[2], w),
        [x.detach().requires_grad_(), w.detach().requires_grad_()], dtype, "triton",
    )  # fmt: skip

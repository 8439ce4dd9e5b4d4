"""Public MoE ops and the reference against loop-by-loop statements of the semantics."""

import pytest
import torch

from frontiers_fast.ops import moe
from frontiers_fast.reference import moe as ref

from ..helpers import assert_close
from .naive import naive_moe, naive_route, random_moe

E = 16
ROUTE_CASES = {
    "mixtral-top2": dict(top_k=2),
    "top1": dict(top_k=1),
    "topE": dict(top_k=E),
    "no-renorm-scaled": dict(top_k=3, renormalize=False, scaling=1.7),
    "sigmoid": dict(top_k=2, scoring="sigmoid"),
    "sigmoid-bias": dict(top_k=2, scoring="sigmoid", bias=True),
    "deepseek-v3-grouped": dict(top_k=4, scoring="sigmoid", bias=True, n_group=4, topk_group=2, scaling=2.5),
    "vllm-grouped-max": dict(top_k=3, n_group=4, topk_group=2),
    "grouped-all-groups": dict(top_k=5, scoring="sigmoid", n_group=8, topk_group=8, renormalize=False),
}


def _route_args(case, dtype):
    case = dict(case)
    bias = torch.randn(E) * 0.3 if case.pop("bias", False) else None
    return bias, case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(ROUTE_CASES))
def test_route_matches_naive(name, dtype):
    bias, kw = _route_args(ROUTE_CASES[name], dtype)
    logits = torch.randn(29, E).to(dtype)
    w, ids = moe.moe_route(logits, correction_bias=bias, **kw)
    want_w, want_ids = naive_route(logits, bias=bias, **kw)
    assert ids.dtype == torch.int32 and ids.shape == (29, kw["top_k"])
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(ids.long(), want_ids)
    assert_close(w, want_w)
    rw, rids = ref.moe_route(logits, correction_bias=bias, **kw)
    assert torch.equal(rids, ids)
    assert_close(rw, want_w)


def test_route_ties_go_to_lowest_id():
    logits = torch.tensor(
        [[0.5] * 8, [1.0, 3, 3, 2, 3, 0, 3, 1], [2.0, 2, -1, -1, 2, 2, 0, 0], [-1.0, 0, 0, 0, 0, 0, 0, 7]]
    )
    for scoring in ("softmax", "sigmoid"):
        w, ids = moe.moe_route(logits, 3, scoring)
        assert ids.tolist() == [[0, 1, 2], [1, 2, 4], [0, 1, 4], [7, 1, 2]]
        assert_close(w[0], torch.full((3,), 1 / 3))
    # Whole groups tie too: the lowest group ids are kept.
    w, ids = moe.moe_route(
        torch.zeros(2, 8), 3, "sigmoid", correction_bias=torch.zeros(8), n_group=4, topk_group=2
    )
    assert ids.tolist() == [[0, 1, 2]] * 2
    # Heavily tied random rows (values from {0, 1, 2}) follow the rule everywhere.
    logits = torch.randint(0, 3, (64, E)).float()
    for kw in (dict(top_k=5), dict(top_k=6, n_group=4, topk_group=3), dict(top_k=3, scoring="sigmoid")):
        _, ids = moe.moe_route(logits, **kw)
        assert torch.equal(ids.long(), naive_route(logits, **kw)[1])


def _masked_logits(T, dtype=torch.float32):
    # Each row masks up to E - 6 experts with -inf (at least 6 stay, >= every top_k below but topE).
    logits = torch.randn(T, E, dtype=dtype)
    n_masked = torch.randint(0, E - 5, (T,))
    for t in range(T):
        logits[t, torch.randperm(E)[: int(n_masked[t])]] = float("-inf")
    return logits


@pytest.mark.parametrize("name", [n for n in ROUTE_CASES if n != "topE"])
def test_route_masked_experts(name):
    bias, kw = _route_args(ROUTE_CASES[name], torch.float32)
    if bias is not None:
        bias = bias * 10  # large enough to lift a masked expert's 0 score, were it counted
    logits = _masked_logits(29)
    w, ids = moe.moe_route(logits, correction_bias=bias, **kw)
    want_w, want_ids = naive_route(logits, bias=bias, **kw)
    assert torch.equal(ids.long(), want_ids)
    assert_close(w, want_w)
    assert torch.isfinite(logits.gather(1, ids.long())).all()  # no masked expert is ever chosen
    if name == "mixtral-top2":
        # transformers' Mixtral router: softmax (masked experts get 0), top-k, renormalise.
        probs = torch.softmax(logits, -1)
        top, idx = torch.topk(probs, 2, -1)
        assert torch.equal(ids.long(), idx)
        assert_close(w, top / top.sum(-1, keepdim=True))


@pytest.mark.gradcheck
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gradcheck_route_masked(scoring):
    logits = _masked_logits(6, torch.float64).requires_grad_(True)
    f = lambda lg: moe.moe_route(lg, 3, scoring, n_group=4, topk_group=3)[0]
    assert torch.autograd.gradcheck(f, (logits,))
    g = torch.autograd.grad(f(logits).sum(), logits)[0]
    assert torch.isfinite(g).all() and (g[torch.isneginf(logits)] == 0).all()


@pytest.mark.parametrize("name", ["mixtral-top2", "deepseek-v3-grouped", "no-renorm-scaled"])
def test_route_gradient(name):
    bias, kw = _route_args(ROUTE_CASES[name], torch.float64)
    logits = torch.randn(13, E, dtype=torch.float64)
    seed = torch.randn(13, kw["top_k"], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        lg = logits.to(dtype).requires_grad_(True)
        b = None if bias is None else bias.clone().requires_grad_(True)
        w, ids = moe.moe_route(lg, correction_bias=b, **kw)
        got = torch.autograd.grad(
            w, [lg] + ([b] if b is not None else []), seed.to(w.dtype), allow_unused=True
        )
        lr = logits.clone().requires_grad_(True)
        want = torch.autograd.grad(ref.moe_route(lr, correction_bias=bias, **kw)[0], lr, seed)[0]
        assert_close(got[0], want, dtype)
        if b is not None:
            assert got[1] is None  # the bias only steers the selection


def _check_permutation(x, ids, num_experts):
    T, k = ids.shape
    x_perm, offsets, row_map = moe.moe_permute(x, ids, num_experts)
    assert x_perm.shape == (T * k, x.shape[1]) and x_perm.dtype == x.dtype
    assert offsets.dtype == torch.int64 and row_map.dtype == torch.int64 and row_map.shape == (T, k)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=num_experts)
    assert offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert sorted(row_map.reshape(-1).tolist()) == list(range(T * k))
    for t in range(T):
        for j in range(k):
            assert torch.equal(x_perm[row_map[t, j]], x[t])
    # Row r holds (token, slot) = who[r]; rows go by expert, then by token, then by slot.
    who = [None] * (T * k)
    for t in range(T):
        for j in range(k):
            who[int(row_map[t, j])] = (int(ids[t, j]), t, j)
    assert who == sorted(who)
    for e in range(num_experts):
        assert all(who[r][0] == e for r in range(int(offsets[e]), int(offsets[e + 1])))
    return x_perm, row_map


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_permute_unpermute(id_dtype):
    T, k, num_experts = 23, 3, 7
    x = torch.randn(T, 5)
    _, ids = moe.moe_route(torch.randn(T, num_experts - 2), k)  # experts 5 and 6 get no token
    x_perm, row_map = _check_permutation(x, ids.to(id_dtype), num_experts)
    # Repeated ids in a row are legal for the dispatch ops.
    _check_permutation(x, torch.randint(0, 3, (T, k), dtype=id_dtype), num_experts)
    # Non-contiguous input: every other column of a wider tensor.
    _check_permutation(torch.randn(T, 10)[:, ::2], ids, num_experts)
    w = torch.rand(T, k, dtype=torch.float64)
    y = torch.randn(T * k, 5)
    out = moe.moe_unpermute(y, row_map, w)
    want = torch.stack([sum(w[t, j] * y[row_map[t, j]].double() for j in range(k)) for t in range(T)])
    assert out.dtype == y.dtype
    assert_close(out, want, torch.float32)
    assert_close(moe.moe_unpermute(x_perm, row_map, w), x.double() * w.sum(1, keepdim=True), torch.float32)


def _dispatch_cases():
    # (T, H, I, E, k, experts allowed): zero-token experts, T = 1, k = 1, k = E
    return {
        "mixtral-like": (37, 16, 24, 8, 2, None),
        "one-token": (1, 16, 24, 8, 2, None),
        "top1": (20, 8, 12, 4, 1, None),
        "topE": (9, 8, 12, 4, 4, None),
        "idle-experts": (15, 8, 12, 6, 2, [1, 3, 4]),
    }


def _route_for(T, E, k, allowed, dtype=torch.float32):
    logits = torch.randn(T, E)
    if allowed is not None:
        mask = torch.full((E,), -30.0)
        mask[allowed] = 0.0
        logits = logits + mask  # the other experts never make the top k
    return moe.moe_route(logits.to(dtype), k)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(_dispatch_cases()))
def test_fused_moe_matches_naive(case, dtype, activation):
    T, H, inter, E_, k, allowed = _dispatch_cases()[case]
    x, wgu, wd, _ = random_moe(T, H, inter, E_, dtype)
    w, ids = _route_for(T, E_, k, allowed)
    if allowed is not None:
        assert set(ids.unique().tolist()) <= set(allowed)
    out = moe.fused_moe(x, wgu, wd, w, ids, activation)
    assert out.dtype == dtype and out.shape == (T, H)
    # The truth sees the same (rounded) inputs, so only the op's own rounding counts.
    assert_close(out, naive_moe(x, wgu, wd, w, ids, activation), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["mixtral-like", "idle-experts", "topE"])
def test_fused_moe_gradients(case, dtype):
    T, H, inter, E_, k, allowed = _dispatch_cases()[case]
    x, wgu, wd, _ = random_moe(T, H, inter, E_, torch.float64)
    w, ids = _route_for(T, E_, k, allowed, torch.float64)
    w = w.detach()
    seed = torch.randn(T, H, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_(True) for t in (x, wgu, wd, w)]
    want = torch.autograd.grad(ref.fused_moe(*leaves64, ids), leaves64, seed)
    # Router weights come in float32 (float64 for a float64 model), as moe_route returns them.
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, wgu, wd, w)]
    out = moe.fused_moe(*leaves, ids)
    got = torch.autograd.grad(out, leaves, seed.to(dtype))
    for g, v, leaf in zip(got, want, leaves):
        assert g.dtype == leaf.dtype
        assert_close(g, v, dtype)
    if allowed is not None:  # idle experts get exactly zero gradient
        idle = [e for e in range(E_) if e not in allowed]
        assert got[1][idle].abs().max() == 0 and got[2][idle].abs().max() == 0


def test_fused_moe_partial_gradients():
    x, wgu, wd, logits = random_moe(11, 8, 6, 4, torch.float64)
    w, ids = moe.moe_route(logits, 2)
    x.requires_grad_(True)
    gx = torch.autograd.grad(moe.fused_moe(x, wgu, wd, w, ids).sum(), x)[0]
    xr = x.detach().clone().requires_grad_(True)
    assert_close(gx, torch.autograd.grad(ref.fused_moe(xr, wgu, wd, w, ids).sum(), xr)[0])


def test_route_then_moe_end_to_end_gradient():
    x, wgu, wd, _ = random_moe(10, 8, 6, 4, torch.float64)
    router = torch.randn(4, 8, dtype=torch.float64)

    def model(f_route, f_moe, x, router, wgu, wd):
        w, ids = f_route(x @ router.T, 2)
        return f_moe(x, wgu, wd, w, ids)

    leaves = [t.clone().requires_grad_(True) for t in (x, router, wgu, wd)]
    got = torch.autograd.grad(model(moe.moe_route, moe.fused_moe, *leaves).pow(2).sum(), leaves)
    leaves = [t.clone().requires_grad_(True) for t in (x, router, wgu, wd)]
    want = torch.autograd.grad(model(ref.moe_route, ref.fused_moe, *leaves).pow(2).sum(), leaves)
    for g, v in zip(got, want):
        assert_close(g, v)


def test_no_tokens():
    x, wgu, wd, logits = random_moe(0, 8, 5, 4)
    leaves = [t.requires_grad_(True) for t in (x, wgu, logits)]
    w, ids = moe.moe_route(logits, 2)
    out = moe.fused_moe(x, wgu, wd, w, ids)
    assert out.shape == (0, 8) and ids.shape == (0, 2)
    gx, gwgu, glogits = torch.autograd.grad(out.sum(), leaves)
    assert gx.shape == (0, 8) and glogits.shape == (0, 4) and torch.equal(gwgu, torch.zeros_like(gwgu))
    x_perm, offsets, row_map = moe.moe_permute(x, ids, 4)
    assert x_perm.shape == (0, 8) and offsets.tolist() == [0] * 5 and row_map.shape == (0, 2)

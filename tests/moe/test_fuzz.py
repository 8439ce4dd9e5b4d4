"""Bad and edge inputs thrown at every public MoE function and module, one class of input per row.

Each bad row must raise TypeError (wrong kind) or ValueError (right kind,
wrong value) with a message that names the argument; each edge row must give
the right shapes.  The NaN tests check what the docstrings promise.
"""

import numpy as np
import pytest
import torch

from frontiers_fast.nn.moe import (
    MixtralSparseMoeBlock,
    MoeExperts,
    MoeTopKRouter,
    from_mixtral,
    mixtral_activation,
)
from frontiers_fast.ops import moe

from ..helpers import backend_cases

META = torch.device("meta")
NAN, INF = float("nan"), float("inf")
T, H, INTER, E, K = 6, 8, 5, 4, 2


def _inputs():
    """A good call's inputs: x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], logits [T, E], weights, ids."""
    x = torch.randn(T, H)
    wgu = torch.randn(E, 2 * INTER, H) / H**0.5
    wd = torch.randn(E, H, INTER) / INTER**0.5
    logits = torch.randn(T, E)
    w, ids = moe.moe_route(logits, K)
    return dict(x=x, w_gate_up=wgu, w_down=wd, logits=logits, weights=w, ids=ids)


def route(**change):
    a = _inputs()
    kw = {"logits": a["logits"], "top_k": K, **change}
    return moe.moe_route(**kw)


def permute(**change):
    a = _inputs()
    kw = {"x": a["x"], "ids": a["ids"], "num_experts": E, **change}
    return moe.moe_permute(**kw)


def unpermute(**change):
    a = _inputs()
    _, _, row_map = moe.moe_permute(a["x"], a["ids"], E)
    kw = {"y": torch.randn(T * K, H), "row_map": row_map, "weights": a["weights"], **change}
    return moe.moe_unpermute(**kw)


def fused(**change):
    a = _inputs()
    kw = {k: a[k] for k in ("x", "w_gate_up", "w_down", "weights", "ids")}
    return moe.fused_moe(**{**kw, **change})


def router(hidden_states=None, **sizes):
    m = MoeTopKRouter(**{"hidden_size": H, "num_experts": E, "top_k": K, **sizes})
    return m(torch.randn(T, H) if hidden_states is None else hidden_states)


def experts(hidden_states=None, top_k_index=None, top_k_weights=None, **sizes):
    m = MoeExperts(**{"hidden_size": H, "intermediate_size": INTER, "num_experts": E, **sizes})
    a = _inputs()
    return m(
        a["x"] if hidden_states is None else hidden_states,
        a["ids"] if top_k_index is None else top_k_index,
        a["weights"] if top_k_weights is None else top_k_weights,
    )


def block(hidden_states=None, train=False, **sizes):
    m = MixtralSparseMoeBlock(
        **{"hidden_size": H, "intermediate_size": INTER, "num_experts": E, "top_k": K, **sizes}
    )
    m.train(train)
    return m(torch.randn(2, 3, H) if hidden_states is None else hidden_states)


def _i(*shape, high=E):
    return torch.randint(0, high, shape)


# (id, call, exception, message regex): each regex names the argument.
BAD = [
    # moe_route
    ("route-logits-list", lambda: route(logits=[[1.0, 2.0]]), TypeError, "logits must be a torch.Tensor"),
    ("route-logits-numpy", lambda: route(logits=np.zeros((T, E), np.float32)), TypeError, "logits must be a torch.Tensor"),
    ("route-logits-int", lambda: route(logits=_i(T, E)), TypeError, "logits must be a floating"),
    ("route-logits-bool", lambda: route(logits=torch.ones(T, E, dtype=torch.bool)), TypeError, "logits must be a floating"),
    ("route-logits-complex", lambda: route(logits=torch.randn(T, E, dtype=torch.complex64)), TypeError, "logits must be a floating"),
    ("route-logits-1d", lambda: route(logits=torch.randn(E)), ValueError, r"logits must have shape \[T, E\]"),
    ("route-logits-no-experts", lambda: route(logits=torch.randn(T, 0), top_k=1), ValueError, "logits must have at least one expert"),
    ("route-logits-nan", lambda: route(logits=torch.tensor([[0.0, NAN, 1.0]])), ValueError, "logits must not contain NaN"),
    ("route-logits-posinf", lambda: route(logits=torch.tensor([[0.0, INF, 1.0]])), ValueError, r"logits must not contain NaN or \+inf"),
    ("route-logits-all-masked", lambda: route(logits=torch.full((2, E), -INF)), ValueError, "logits row 0 has fewer than top_k=2"),
    ("route-top_k-float", lambda: route(top_k=2.0), TypeError, "top_k must be an int"),
    ("route-top_k-tensor", lambda: route(top_k=torch.tensor(2)), TypeError, "top_k must be an int"),
    ("route-top_k-zero", lambda: route(top_k=0), ValueError, r"top_k must be in \[1, 4\]"),
    ("route-top_k-above-E", lambda: route(top_k=E + 1), ValueError, r"top_k must be in \[1, 4\]"),
    ("route-scoring-none", lambda: route(scoring=None), TypeError, "scoring must be a str"),
    ("route-scoring-unknown", lambda: route(scoring="relu"), ValueError, "scoring must be one of"),
    ("route-renormalize-int", lambda: route(renormalize=1), TypeError, "renormalize must be a bool"),
    ("route-bias-list", lambda: route(correction_bias=[0.0] * E), TypeError, "correction_bias must be a torch.Tensor"),
    ("route-bias-int", lambda: route(correction_bias=torch.zeros(E, dtype=torch.long)), TypeError, "correction_bias must be a floating"),
    ("route-bias-2d", lambda: route(correction_bias=torch.zeros(1, E)), ValueError, r"correction_bias must have shape \[E\]"),
    ("route-bias-size", lambda: route(correction_bias=torch.zeros(E + 1)), ValueError, r"correction_bias must have shape \[E\]=\[4\]"),
    ("route-bias-meta", lambda: route(correction_bias=torch.zeros(E, device=META)), ValueError, "correction_bias is on meta"),
    ("route-bias-nan", lambda: route(correction_bias=torch.tensor([0.0, NAN, 0.0, 0.0])), ValueError, "correction_bias must be finite"),
    ("route-bias-inf", lambda: route(correction_bias=torch.tensor([0.0, 0.0, -INF, 0.0])), ValueError, "correction_bias must be finite"),
    ("route-n_group-alone", lambda: route(n_group=2), ValueError, "n_group and topk_group must be given together"),
    ("route-n_group-float", lambda: route(n_group=2.0, topk_group=1), TypeError, "n_group must be an int"),
    ("route-n_group-zero", lambda: route(n_group=0, topk_group=1), ValueError, "n_group must be in"),
    ("route-n_group-indivisible", lambda: route(n_group=3, topk_group=1), ValueError, "n_group must divide"),
    ("route-topk_group-above", lambda: route(n_group=2, topk_group=3), ValueError, "topk_group must be in"),
    ("route-top_k-above-kept", lambda: route(top_k=3, n_group=2, topk_group=1), ValueError, "top_k=3 exceeds"),
    ("route-scaling-str", lambda: route(scaling="2"), TypeError, "scaling must be a real number"),
    ("route-scaling-nan", lambda: route(scaling=NAN), ValueError, "scaling must be finite"),
    ("route-scaling-inf", lambda: route(scaling=-INF), ValueError, "scaling must be finite"),
    ("route-backend-unknown", lambda: route(backend="fast"), ValueError, "backend must be one of"),
    # moe_permute
    ("permute-x-list", lambda: permute(x=[[1.0]] * T), TypeError, "x must be a torch.Tensor"),
    ("permute-x-int", lambda: permute(x=_i(T, H)), TypeError, "x must be a floating"),
    ("permute-x-complex", lambda: permute(x=torch.randn(T, H, dtype=torch.complex64)), TypeError, "x must be a floating"),
    ("permute-x-3d", lambda: permute(x=torch.randn(T, 2, H)), ValueError, r"x must have shape \[T, H\]"),
    ("permute-ids-float", lambda: permute(ids=_i(T, K).float()), TypeError, "ids must be an integer tensor"),
    ("permute-ids-bool", lambda: permute(ids=_i(T, K) > 0), TypeError, "ids must be an integer tensor"),
    ("permute-ids-uint8", lambda: permute(ids=_i(T, K).to(torch.uint8)), TypeError, "ids must be an integer tensor"),
    ("permute-ids-1d", lambda: permute(ids=_i(T)), ValueError, r"ids must have shape \[T, k\]"),
    ("permute-ids-rows", lambda: permute(ids=_i(T - 1, K)), ValueError, "ids has 5 rows but x has 6"),
    ("permute-ids-k-above-E", lambda: permute(ids=_i(T, E + 1)), ValueError, r"ids has k=5 columns .* \(k > E\)"),
    ("permute-ids-meta", lambda: permute(ids=_i(T, K).to(META)), ValueError, "ids is on meta"),
    ("permute-ids-high", lambda: permute(ids=_i(T, K) + E), ValueError, r"ids must lie in \[0, 3\] \(there are 4 experts\)"),
    ("permute-ids-negative", lambda: permute(ids=-1 - _i(T, K)), ValueError, r"ids must lie in \[0, 3\]"),
    ("permute-num_experts-float", lambda: permute(num_experts=4.0), TypeError, "num_experts must be an int"),
    ("permute-num_experts-zero", lambda: permute(num_experts=0), ValueError, "num_experts must be >= 1"),
    ("permute-num_experts-huge", lambda: permute(num_experts=2**70), ValueError, "num_experts is too large"),
    # moe_unpermute
    ("unpermute-y-tuple", lambda: unpermute(y=(1.0, 2.0)), TypeError, "y must be a torch.Tensor"),
    ("unpermute-y-int", lambda: unpermute(y=_i(T * K, H)), TypeError, "y must be a floating"),
    ("unpermute-y-1d", lambda: unpermute(y=torch.randn(T * K)), ValueError, r"y must have shape \[R, H\]"),
    ("unpermute-row_map-float", lambda: unpermute(row_map=_i(T, K).float()), TypeError, "row_map must be an integer tensor"),
    ("unpermute-row_map-3d", lambda: unpermute(row_map=_i(T, K, 1)), ValueError, r"row_map must have shape \[T, k\]"),
    ("unpermute-row_map-meta", lambda: unpermute(row_map=_i(T, K).to(META)), ValueError, "row_map is on meta"),
    ("unpermute-row_map-high", lambda: unpermute(row_map=_i(T, K) + T * K), ValueError, r"row_map must lie in \[0, 11\] \(y has 12 rows\)"),
    ("unpermute-row_map-negative", lambda: unpermute(row_map=_i(T, K) - T * K), ValueError, "row_map must lie in"),
    ("unpermute-row_map-empty-y", lambda: unpermute(y=torch.randn(0, H)), ValueError, r"row_map must lie in .*\(y has 0 rows\)"),
    ("unpermute-weights-bool", lambda: unpermute(weights=torch.ones(T, K, dtype=torch.bool)), TypeError, "weights must be a floating"),
    ("unpermute-weights-shape", lambda: unpermute(weights=torch.rand(T, K + 1)), ValueError, "weights must have the shape of row_map"),
    ("unpermute-weights-meta", lambda: unpermute(weights=torch.rand(T, K, device=META)), ValueError, "weights is on meta"),
    # fused_moe
    ("fused-x-none", lambda: fused(x=None), TypeError, "x must be a torch.Tensor"),
    ("fused-x-int", lambda: fused(x=_i(T, H)), TypeError, "x must be a floating"),
    ("fused-x-1d", lambda: fused(x=torch.randn(H)), ValueError, r"x must have shape \[T, H\]"),
    ("fused-w_gate_up-int", lambda: fused(w_gate_up=_i(E, 2 * INTER, H)), TypeError, "w_gate_up must be a floating"),
    ("fused-w_gate_up-2d", lambda: fused(w_gate_up=torch.randn(2 * INTER, H)), ValueError, r"w_gate_up must have shape \[E, 2I, H\]"),
    ("fused-w_gate_up-H", lambda: fused(w_gate_up=torch.randn(E, 2 * INTER, H + 1)), ValueError, "w_gate_up must have shape .* H=8"),
    ("fused-w_gate_up-odd", lambda: fused(w_gate_up=torch.randn(E, 2 * INTER + 1, H)), ValueError, "w_gate_up .* even 2I"),
    ("fused-w_gate_up-no-experts", lambda: fused(w_gate_up=torch.randn(0, 2 * INTER, H)), ValueError, "w_gate_up must hold at least one expert"),
    ("fused-w_gate_up-dtype", lambda: fused(w_gate_up=torch.randn(E, 2 * INTER, H, dtype=torch.float64)), TypeError, "w_gate_up has dtype torch.float64 but x"),
    ("fused-w_gate_up-meta", lambda: fused(w_gate_up=torch.randn(E, 2 * INTER, H, device=META)), ValueError, "w_gate_up is on meta"),
    ("fused-w_down-complex", lambda: fused(w_down=torch.randn(E, H, INTER, dtype=torch.complex64)), TypeError, "w_down must be a floating"),
    ("fused-w_down-shape", lambda: fused(w_down=torch.randn(E, H, INTER + 1)), ValueError, r"w_down must have shape \[E, H, I\]=\[4, 8, 5\]"),
    ("fused-w_down-dtype", lambda: fused(w_down=torch.randn(E, H, INTER).half()), TypeError, "w_down has dtype torch.float16"),
    ("fused-weights-int", lambda: fused(weights=_i(T, K)), TypeError, "weights must be a floating"),
    ("fused-weights-shape", lambda: fused(weights=torch.rand(T, K + 1)), ValueError, "weights must have the shape of ids"),
    ("fused-weights-meta", lambda: fused(weights=torch.rand(T, K, device=META)), ValueError, "weights is on meta"),
    ("fused-ids-float", lambda: fused(ids=_i(T, K).double()), TypeError, "ids must be an integer tensor"),
    ("fused-ids-rows", lambda: fused(ids=_i(T + 1, K), weights=torch.rand(T + 1, K)), ValueError, "ids has 7 rows but x has 6"),
    ("fused-ids-high", lambda: fused(ids=_i(T, K) + E), ValueError, r"ids must lie in \[0, 3\]"),
    ("fused-ids-meta", lambda: fused(ids=_i(T, K).to(META)), ValueError, "ids is on meta"),
    ("fused-activation-none", lambda: fused(activation=None), TypeError, "activation must be a str"),
    ("fused-activation-unknown", lambda: fused(activation="relu"), ValueError, "activation must be one of"),
    # MoeTopKRouter
    ("router-hidden_size-float", lambda: router(hidden_size=8.0), TypeError, "hidden_size must be an int"),
    ("router-num_experts-zero", lambda: router(num_experts=0), ValueError, "num_experts must be >= 1"),
    ("router-top_k-above", lambda: router(top_k=E + 1), ValueError, r"top_k must be in \[1, 4\] \(num_experts=4\)"),
    ("router-input-width", lambda: router(torch.randn(T, 2 * H)), ValueError, "hidden_states has last dimension 16 .* hidden_size=8"),
    ("router-input-int", lambda: router(_i(T, H)), TypeError, "hidden_states must be a floating"),
    ("router-input-0d", lambda: router(torch.tensor(1.0)), ValueError, "hidden_states has no dimensions .* hidden_size=8"),
    ("router-input-list", lambda: router([[0.0] * H]), TypeError, "hidden_states must be a torch.Tensor"),
    ("router-input-meta", lambda: router(torch.randn(T, H, device=META)), ValueError, "hidden_states is on meta but weight"),
    ("router-input-dtype", lambda: router(torch.randn(T, H, dtype=torch.float64)), TypeError, "hidden_states has dtype torch.float64 but weight"),
    # MoeExperts
    ("experts-intermediate_size-zero", lambda: experts(intermediate_size=0), ValueError, "intermediate_size must be >= 1"),
    ("experts-hidden_size-str", lambda: experts(hidden_size="8"), TypeError, "hidden_size must be an int"),
    ("experts-activation", lambda: experts(activation="tanh"), ValueError, "activation must be one of"),
    ("experts-input-width", lambda: experts(torch.randn(T, H - 1)), ValueError, "hidden_states has last dimension 7 .* hidden_size=8"),
    ("experts-input-3d", lambda: experts(torch.randn(1, T, H)), ValueError, r"hidden_states must have shape \[T, hidden_size\]"),
    ("experts-input-bool", lambda: experts(torch.ones(T, H, dtype=torch.bool)), TypeError, "hidden_states must be a floating"),
    ("experts-index-float", lambda: experts(top_k_index=_i(T, K).float()), TypeError, "top_k_index must be an integer tensor"),
    ("experts-index-1d", lambda: experts(top_k_index=_i(T)), ValueError, r"top_k_index must have shape \[T, top_k\]"),
    ("experts-index-rows", lambda: experts(top_k_index=_i(T - 1, K)), ValueError, "top_k_index has 5 rows but hidden_states has 6"),
    ("experts-index-high", lambda: experts(top_k_index=_i(T, K) + E), ValueError, r"top_k_index must lie in \[0, 3\] \(num_experts=4\)"),
    ("experts-weights-int", lambda: experts(top_k_weights=_i(T, K)), TypeError, "top_k_weights must be a floating"),
    ("experts-weights-shape", lambda: experts(top_k_weights=torch.rand(T, 1)), ValueError, "top_k_weights must have the shape of top_k_index"),
    # MixtralSparseMoeBlock
    ("block-hidden_size-missing", lambda: block(hidden_size=None), ValueError, "hidden_size must be given"),
    ("block-hidden_size-bool", lambda: block(hidden_size=True), TypeError, "hidden_size must be an int"),
    ("block-intermediate_size-negative", lambda: block(intermediate_size=-1), ValueError, "intermediate_size must be >= 1"),
    ("block-num_experts-float", lambda: block(num_experts=4.5), TypeError, "num_experts must be an int"),
    ("block-top_k-zero", lambda: block(top_k=0), ValueError, "top_k must be >= 1"),
    ("block-top_k-above", lambda: block(top_k=E + 1), ValueError, "top_k=5 must be <= num_experts=4"),
    ("block-hidden_act-unknown", lambda: block(hidden_act="relu"), ValueError, "hidden_act must be one of"),
    ("block-hidden_act-none", lambda: block(hidden_act=None), TypeError, "hidden_act must be a str"),
    ("block-jitter-nan", lambda: block(router_jitter_noise=NAN), ValueError, "router_jitter_noise must be finite"),
    ("block-jitter-negative", lambda: block(router_jitter_noise=-0.1), ValueError, "router_jitter_noise must be >= 0"),
    # [2, 3, 16] would reshape into [12, 8] rows without the check: a silently wrong answer.
    ("block-input-width", lambda: block(torch.randn(2, 3, 2 * H)), ValueError, "hidden_states has last dimension 16 .* hidden_size=8"),
    ("block-input-int", lambda: block(_i(2, 3, H), train=True, router_jitter_noise=0.1), TypeError, "hidden_states must be a floating"),
    ("block-input-0d", lambda: block(torch.tensor(0.5)), ValueError, "hidden_states has no dimensions"),
    ("block-input-meta", lambda: block(torch.randn(2, 3, H, device=META)), ValueError, "hidden_states is on meta"),
    # from_mixtral / mixtral_activation
    ("from_mixtral-not-a-block", lambda: from_mixtral(torch.nn.Linear(3, 3)), TypeError, "block must have .gate.weight"),
    ("mixtral_activation-not-a-block", lambda: mixtral_activation(42), TypeError, "block must have .experts"),
    ("block-from_mixtral-not-a-block", lambda: MixtralSparseMoeBlock.from_mixtral(object()), TypeError, "block must have"),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,match", [pytest.param(*r[1:], id=r[0]) for r in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _shapes(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [(tuple(t.shape), t.device.type) for t in outs]


# (id, call, expected [(shape, device)]): empty sizes and all-meta calls.  No MoE
# function needs tensor values to size its outputs, so on meta tensors the
# value checks are skipped (the policy) and the fake kernels answer.
EDGE = [
    ("route-no-tokens", lambda: route(logits=torch.randn(0, E)), [((0, K), "cpu")] * 2),
    ("route-all-meta", lambda: route(logits=torch.randn(T, E, device=META), correction_bias=torch.zeros(E, device=META)), [((T, K), "meta")] * 2),
    ("permute-no-tokens", lambda: permute(x=torch.randn(0, H), ids=_i(0, K)), [((0, H), "cpu"), ((E + 1,), "cpu"), ((0, K), "cpu")]),
    ("permute-k0", lambda: permute(ids=_i(T, 0)), [((0, H), "cpu"), ((E + 1,), "cpu"), ((T, 0), "cpu")]),
    ("permute-H0", lambda: permute(x=torch.randn(T, 0)), [((T * K, 0), "cpu"), ((E + 1,), "cpu"), ((T, K), "cpu")]),
    ("permute-all-meta", lambda: permute(x=torch.randn(T, H, device=META), ids=_i(T, K).to(META)), [((T * K, H), "meta"), ((E + 1,), "meta"), ((T, K), "meta")]),
    ("unpermute-no-tokens", lambda: unpermute(row_map=_i(0, K), weights=torch.rand(0, K)), [((0, H), "cpu")]),
    ("unpermute-k0", lambda: unpermute(y=torch.randn(0, H), row_map=_i(T, 0), weights=torch.rand(T, 0)), [((T, H), "cpu")]),
    ("unpermute-all-meta", lambda: unpermute(y=torch.randn(T * K, H, device=META), row_map=_i(T, K).to(META), weights=torch.rand(T, K, device=META)), [((T, H), "meta")]),
    ("fused-no-tokens", lambda: fused(x=torch.randn(0, H), weights=torch.rand(0, K), ids=_i(0, K)), [((0, H), "cpu")]),
    ("fused-k0", lambda: fused(weights=torch.rand(T, 0), ids=_i(T, 0)), [((T, H), "cpu")]),
    ("fused-H0", lambda: fused(x=torch.randn(T, 0), w_gate_up=torch.randn(E, 2 * INTER, 0), w_down=torch.randn(E, 0, INTER)), [((T, 0), "cpu")]),
    ("fused-I0", lambda: fused(w_gate_up=torch.randn(E, 0, H), w_down=torch.randn(E, H, 0)), [((T, H), "cpu")]),
    ("fused-all-meta", lambda: fused(**{k: v.to(META) for k, v in _inputs().items() if k != "logits"}), [((T, H), "meta")]),
    ("router-no-tokens", lambda: router(torch.randn(0, H)), [((0, E), "cpu"), ((0, K), "cpu"), ((0, K), "cpu")]),
    ("experts-no-tokens", lambda: experts(torch.randn(0, H), _i(0, K), torch.rand(0, K)), [((0, H), "cpu")]),
    ("block-no-tokens", lambda: block(torch.randn(2, 0, H)), [((2, 0, H), "cpu")]),
    ("block-all-meta", lambda: MixtralSparseMoeBlock(hidden_size=H, intermediate_size=INTER, num_experts=E, top_k=K).to(META)(torch.randn(2, 3, H, device=META)), [((2, 3, H), "meta")]),
]  # fmt: skip


@pytest.mark.parametrize("call,want", [pytest.param(r[1], r[2], id=r[0]) for r in EDGE])
def test_edge_input(call, want):
    out = call()
    assert _shapes(out) == want
    for t in out if isinstance(out, tuple) else (out,):
        if t.device.type != "meta" and t.is_floating_point():
            assert torch.isfinite(t).all()


def _others(n, t):
    return torch.arange(n) != t


# --------------------------------------------------------------------------
# NaN, as the docstrings state it
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", backend_cases("fused_moe"))
def test_fused_moe_nan_propagates_per_token(device, backend):
    a = {k: v.to(device) for k, v in _inputs().items()}
    a["ids"][:, 0] = torch.arange(T) % (E - 1)  # expert E-1 is chosen by no token
    a["ids"][:, 1] = (torch.arange(T) + 1) % (E - 1)
    run = lambda **c: moe.fused_moe(*(c.get(k, a[k]) for k in ("x", "w_gate_up", "w_down", "weights", "ids")), backend=backend)  # fmt: skip
    base = run()
    x = a["x"].clone()
    x[2, 3] = NAN
    out = run(x=x)
    assert out[2].isnan().all() and torch.equal(out[_others(T, 2)], base[_others(T, 2)])
    w = a["weights"].clone()
    w[4, 1] = NAN
    out = run(weights=w)
    assert out[4].isnan().all() and torch.equal(out[_others(T, 4)], base[_others(T, 4)])
    # An expert's NaN reaches the tokens routed to it, even one with weight 0.
    hit = (a["ids"] == 1).any(1)
    w = a["weights"].clone()
    w[a["ids"] == 1] = 0.0
    for name, e_idx in (("w_gate_up", (1, 0, 0)), ("w_down", (1, 0, 0))):
        p = a[name].clone()
        p[e_idx] = NAN
        out = run(**{name: p, "weights": w})
        assert out[hit].isnan().any(1).all() and torch.equal(out[~hit], run(weights=w)[~hit])
    p = a["w_gate_up"].clone()
    p[E - 1] = NAN  # an idle expert is never read
    assert torch.equal(run(w_gate_up=p), base)


@pytest.mark.parametrize("device,backend", backend_cases("moe_permute"))
def test_permute_copies_nan(device, backend):
    x = torch.randn(T, H, device=device, requires_grad=True)
    ids = _i(T, K).to(device)
    xn = x.detach().clone()
    xn[3, 0] = NAN
    x_perm, offsets, row_map = moe.moe_permute(xn, ids, E, backend=backend)
    want = moe.moe_permute(x.detach(), ids, E, backend=backend)
    assert torch.equal(offsets, want[1]) and torch.equal(row_map, want[2])
    assert x_perm.isnan().any(1).tolist() == [r in row_map[3].tolist() for r in range(T * K)]
    # A NaN in the gradient of one copy reaches its token only.
    g = torch.randn(T * K, H, device=device)
    g[int(row_map[1, 0]), 2] = NAN
    (gx,) = torch.autograd.grad(moe.moe_permute(x, ids, E, backend=backend)[0], x, g)
    assert gx.isnan().any(1).tolist() == [t == 1 for t in range(T)]


@pytest.mark.parametrize("device,backend", backend_cases("moe_unpermute"))
def test_unpermute_nan_propagates_per_token(device, backend):
    row_map = torch.randperm(T * K, device=device).view(T, K)
    y, w = torch.randn(T * K, H, device=device), torch.rand(T, K, device=device)
    base = moe.moe_unpermute(y, row_map, w, backend=backend)
    yn = y.clone()
    yn[int(row_map[2, 1])] = NAN
    wz = w.clone()
    wz[2, 1] = 0.0  # 0 * NaN is NaN
    out = moe.moe_unpermute(yn, row_map, wz, backend=backend)
    assert out[2].isnan().all() and torch.equal(out[_others(T, 2)], base[_others(T, 2)])
    wn = w.clone()
    wn[5, 0] = NAN
    out = moe.moe_unpermute(y, row_map, wn, backend=backend)
    assert out[5].isnan().all() and torch.equal(out[_others(T, 5)], base[_others(T, 5)])


@pytest.mark.parametrize("device,backend", backend_cases("moe_route"))
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_weights_finite_for_every_accepted_input(device, backend, scoring):
    # Extreme but accepted logits: huge magnitudes, -inf masks, large scaling.
    logits = torch.randn(16, 8, device=device) * 1e30
    logits[:, ::3] = -INF
    for renorm in (True, False):
        w, ids = moe.moe_route(logits, 3, scoring, renorm, scaling=1e30, backend=backend)
        assert torch.isfinite(w).all()
        assert torch.isfinite(logits.gather(1, ids.long())).all()
    with pytest.raises(ValueError, match="logits must not contain NaN"):
        moe.moe_route(torch.full((2, 8), NAN, device=device), 1, scoring, backend=backend)

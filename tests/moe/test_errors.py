"""Bad input gets a clear error naming the argument, never a crash or a wrong answer."""

import numpy as np
import pytest
import torch

from frontiers_fast.nn.moe import MixtralSparseMoeBlock
from frontiers_fast.ops import moe

from .naive import random_moe

META = torch.device("meta")


def test_route_bad_inputs():
    lg = torch.randn(5, 8)
    cases = [
        (dict(logits=[[1.0]], top_k=1), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.randint(0, 3, (5, 8)), top_k=1), TypeError, "logits must be a floating"),
        (dict(logits=torch.randn(5, 8, 2), top_k=1), ValueError, r"logits must have shape \[T, E\]"),
        (dict(logits=lg, top_k=9), ValueError, r"top_k must be in \[1, 8\]"),
        (dict(logits=lg, top_k=0), ValueError, "top_k"),
        (dict(logits=lg, top_k=2.0), TypeError, "top_k must be an int"),
        (dict(logits=lg, top_k=True), TypeError, "top_k must be an int"),
        (dict(logits=lg, top_k=2, scoring="relu"), ValueError, "scoring"),
        (dict(logits=lg, top_k=2, renormalize=1), TypeError, "renormalize"),
        (dict(logits=lg, top_k=2, correction_bias=torch.randn(7)), ValueError, "correction_bias must have shape"),
        (dict(logits=lg, top_k=2, correction_bias=torch.randn(8, device=META)), ValueError, "correction_bias is on meta"),
        (dict(logits=lg, top_k=2, correction_bias=torch.tensor([float("nan")] * 8)), ValueError, "correction_bias must be finite"),
        (dict(logits=lg, top_k=2, n_group=4), ValueError, "n_group and topk_group"),
        (dict(logits=lg, top_k=2, n_group=3, topk_group=1), ValueError, "n_group must divide"),
        (dict(logits=lg, top_k=2, n_group=4, topk_group=5), ValueError, "topk_group must be in"),
        (dict(logits=lg, top_k=5, n_group=4, topk_group=2), ValueError, "top_k=5 exceeds"),
        (dict(logits=lg, top_k=2, scaling=float("inf")), ValueError, "scaling must be finite"),
        (dict(logits=lg, top_k=2, scaling="2"), TypeError, "scaling must be a real number"),
        (dict(logits=lg, top_k=2, scaling=np.bool_(True)), TypeError, "scaling must be a real number"),
        (dict(logits=lg, top_k=2, scaling=torch.tensor(2.0)), TypeError, "scaling must be a real number"),
        (dict(logits=lg, top_k=2, renormalize=np.int64(1)), TypeError, "renormalize must be a bool"),
        (dict(logits=lg, top_k=np.float32(2)), TypeError, "top_k must be an int"),
        (dict(logits=torch.randn(5, 0), top_k=1), ValueError, r"logits must have at least one expert"),
        (dict(logits=torch.tensor([[0.0, float("nan")]]), top_k=1), ValueError, "logits must not contain NaN"),
        (dict(logits=torch.tensor([[0.0, float("inf")]]), top_k=1), ValueError, r"logits must not contain NaN or \+inf"),
        (dict(logits=lg, top_k=2, correction_bias=torch.tensor([-float("inf")] + [0.0] * 7)), ValueError, "correction_bias must be finite"),
    ]  # fmt: skip
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            moe.moe_route(**kw)


def test_permute_bad_inputs():
    x = torch.randn(6, 4)
    ids = torch.randint(0, 3, (6, 2))
    cases = [
        ((x, ids.float(), 3), TypeError, r"ids must be an integer tensor \(torch.int32, torch.int64\)"),
        ((x, ids[:5], 3), ValueError, "ids has 5 rows but x has 6"),
        ((x, ids.view(-1), 3), ValueError, r"ids must have shape \[T, k\]"),
        ((x, ids, 2), ValueError, r"ids must lie in \[0, 1\] \(there are 2 experts\)"),
        ((x, ids - 1, 3), ValueError, "ids must lie in"),
        ((x, ids, 0), ValueError, "num_experts"),
        ((x, torch.randint(0, 3, (6, 4)), 3), ValueError, r"k=4 .* only 3 experts"),
        ((x.view(6, 2, 2), ids, 3), ValueError, r"x must have shape \[T, H\]"),
        ((x.int(), ids, 3), TypeError, "x must be a floating"),
        ((x, ids.to(META), 3), ValueError, "ids is on meta"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            moe.moe_permute(*args)


def test_unpermute_bad_inputs():
    y, w = torch.randn(12, 4), torch.rand(6, 2)
    row_map = torch.randperm(12).view(6, 2)
    cases = [
        ((y, row_map + 1, w), ValueError, r"row_map must lie in \[0, 11\] \(y has 12 rows\)"),
        ((y, row_map.float(), w), TypeError, "row_map must be an int"),
        ((y, row_map, w[:, :1]), ValueError, "weights must have the shape of row_map"),
        ((y, row_map, w.to(META)), ValueError, "weights is on meta"),
        ((y[0], row_map, w), ValueError, r"y must have shape \[R, H\]"),
        ((y, row_map, w.long()), TypeError, "weights must be a floating"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            moe.moe_unpermute(*args)


def test_fused_moe_bad_inputs():
    x, wgu, wd, logits = random_moe(6, 8, 5, 4)
    w, ids = moe.moe_route(logits, 2)
    good = dict(x=x, w_gate_up=wgu, w_down=wd, weights=w, ids=ids)
    cases = [
        (dict(w_gate_up=wgu[:, :, :7]), ValueError, r"w_gate_up must have shape \[E, 2I, H\] with H=8"),
        (dict(w_gate_up=wgu[:, :9]), ValueError, "w_gate_up .* even 2I"),
        (dict(w_gate_up=wgu[0]), ValueError, r"w_gate_up must have shape \[E, 2I, H\]"),
        (dict(w_down=wd[:3]), ValueError, r"w_down must have shape \[E, H, I\]=\[4, 8, 5\]"),
        (dict(w_down=wd[:, :, :4]), ValueError, "w_down must have shape"),
        (dict(w_down=wd.double()), TypeError, "w_down has dtype torch.float64 but x has torch.float32"),
        (dict(w_gate_up=wgu.half()), TypeError, "w_gate_up has dtype"),
        (dict(w_gate_up=wgu.to(META)), ValueError, "w_gate_up is on meta"),
        (dict(w_down=wd.to(META)), ValueError, "w_down is on meta"),
        (dict(weights=w.to(META)), ValueError, "weights is on meta"),
        (dict(ids=ids.to(META)), ValueError, "ids is on meta"),
        (dict(weights=w[:, :1]), ValueError, "weights must have the shape of ids"),
        (dict(ids=ids + 3), ValueError, r"ids must lie in \[0, 3\] \(there are 4 experts\)"),
        (dict(ids=-ids - 1), ValueError, "ids must lie in"),
        (dict(ids=ids.float()), TypeError, "ids must be an int"),
        (dict(ids=torch.zeros(6, 5, dtype=torch.long), weights=torch.rand(6, 5)), ValueError, "k > E"),
        (dict(ids=ids[:5], weights=w[:5]), ValueError, "ids has 5 rows but x has 6"),
        (dict(x=x.long()), TypeError, "x must be a floating"),
        (dict(x=x[None]), ValueError, r"x must have shape \[T, H\]"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
    ]
    for change, exc, match in cases:
        with pytest.raises(exc, match=match):
            moe.fused_moe(**{**good, **change})


def test_module_bad_config():
    with pytest.raises(ValueError, match="hidden_size"):
        MixtralSparseMoeBlock(hidden_size=None, intermediate_size=4, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="top_k=5 must be <= num_experts=4"):
        MixtralSparseMoeBlock(hidden_size=8, intermediate_size=4, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="hidden_act"):
        MixtralSparseMoeBlock(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, hidden_act="relu")


def test_route_too_many_masked_experts():
    # -inf masks an expert; a row must keep top_k unmasked ones.
    ninf = float("-inf")
    lg = torch.randn(4, 8)
    all_masked = lg.clone()
    all_masked[2] = ninf
    few = lg.clone()
    few[1, 1:] = ninf  # one finite logit, top_k = 2
    for bad, row in ((all_masked, 2), (few, 1)):
        for scoring in ("softmax", "sigmoid"):
            with pytest.raises(
                ValueError, match=rf"logits row {row} has fewer than top_k=2 selectable experts"
            ):
                moe.moe_route(bad, 2, scoring)
    assert moe.moe_route(few, 1)[1][1].tolist() == [0]  # one finite logit is enough for top_k = 1
    # Grouped: the kept groups must hold top_k unmasked experts.  Group 0 wins
    # on its one huge logit but holds a single unmasked expert.
    grouped = torch.zeros(1, 8)
    grouped[0, 0], grouped[0, 1:4] = 10.0, ninf
    with pytest.raises(
        ValueError, match="fewer than top_k=2 selectable experts in its topk_group kept groups"
    ):
        moe.moe_route(grouped, 2, "softmax", n_group=2, topk_group=1)
    assert moe.moe_route(grouped, 2, "softmax", n_group=2, topk_group=2)[1].tolist() == [[0, 4]]


def test_numpy_scalars_accepted():
    lg = torch.randn(5, 8)
    want = moe.moe_route(lg, 2, "sigmoid", False, scaling=2.5)
    for kw in (
        dict(top_k=np.int64(2), renormalize=np.bool_(False), scaling=np.float32(2.5)),
        dict(top_k=2, renormalize=False, scaling=np.float64(2.5)),
    ):
        got = moe.moe_route(lg, scoring="sigmoid", **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(moe.moe_route(lg, 2, scaling=3)[0], 3 * moe.moe_route(lg, 2)[0])
    x, ids = torch.randn(5, 4), want[1]
    for a, b in zip(moe.moe_permute(x, ids, np.int32(8)), moe.moe_permute(x, ids, 8)):
        assert torch.equal(a, b)

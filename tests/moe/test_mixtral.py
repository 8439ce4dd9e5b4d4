"""Peer comparison: our MixtralSparseMoeBlock and converter against transformers' Mixtral block."""

import copy

import pytest
import torch
from torch import nn

from frontiers_fast.nn.moe import MixtralSparseMoeBlock, from_mixtral, mixtral_activation
from frontiers_fast.ops import moe

from ..helpers import assert_close

mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
MixtralConfig = pytest.importorskip("transformers").MixtralConfig

H, INTER, E, TOP, T = 32, 48, 8, 2, 37


def _hf_block(dtype=torch.float32, **cfg):
    config = MixtralConfig(
        hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=TOP, **cfg
    )
    block = mixtral.MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():  # transformers leaves the tensors uninitialised until a model's init runs
        block.gate.weight.copy_(torch.randn(E, H) / H**0.5)
        block.experts.gate_up_proj.copy_(torch.randn(E, 2 * INTER, H) / H**0.5)
        block.experts.down_proj.copy_(torch.randn(E, H, INTER) / INTER**0.5)
    return block.to(dtype), config


def _params(module):
    return [p for _, p in sorted(module.named_parameters())]


def test_state_dict_loads_strictly_and_forward_matches():
    hf, config = _hf_block()
    ours = MixtralSparseMoeBlock(config).eval()
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(1, T, H)
    with torch.no_grad():
        want = hf(x.clone())
        got = ours(x)
    assert isinstance(want, torch.Tensor) and got.shape == want.shape == (1, T, H)
    assert_close(got, want)
    # The same block driven through the functional ops by hand.
    w_router, w_gate_up, w_down = from_mixtral(hf)
    flat = x.view(T, H)
    w, ids = moe.moe_route(flat @ w_router.T, TOP)
    assert_close(moe.fused_moe(flat, w_gate_up, w_down, w, ids).view(1, T, H), want)


def test_gradients_match_in_float64():
    hf, config = _hf_block(torch.float64)
    ours = MixtralSparseMoeBlock.from_mixtral(hf).eval()
    assert ours.gate.weight.dtype == torch.float64
    x = torch.randn(2, T, H, dtype=torch.float64)
    seed = torch.randn(2, T, H, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    got = torch.autograd.grad(ours(xs[0]), [xs[0], *_params(ours)], seed)
    want = torch.autograd.grad(hf(xs[1]), [xs[1], *_params(hf)], seed)
    # transformers rounds the router softmax to float32 even in a float64 block
    # (router_logits.float()), so the routing weights and every gradient that
    # passes through them carry float32 rounding: compare at float32 tolerance.
    for g, v in zip(got, want):
        assert g.dtype == torch.float64
        assert_close(g, v, torch.float32)


def test_jitter_noise_only_in_training():
    hf, config = _hf_block(router_jitter_noise=0.1)
    ours = MixtralSparseMoeBlock(config)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(1, 5, H)
    ours.eval()
    assert_close(ours(x), hf.eval()(x.clone()))
    ours.train()
    assert not torch.allclose(ours(x), ours.eval()(x))


class _LegacyExpert(nn.Module):
    """transformers 4.x MixtralBlockSparseTop2MLP: w1 gate, w3 up, w2 down, and act_fn."""

    def __init__(self, act_fn):
        super().__init__()
        self.w1 = nn.Linear(H, INTER, bias=False)
        self.w2 = nn.Linear(INTER, H, bias=False)
        self.w3 = nn.Linear(H, INTER, bias=False)
        self.act_fn = act_fn


class _LegacyBlock(nn.Module):
    def __init__(self, act_fn=None):
        super().__init__()
        self.top_k = TOP
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_LegacyExpert(act_fn or nn.SiLU()) for _ in range(E))

    def forward(self, x):  # the 4.x computation, one expert at a time
        probs = torch.softmax(self.gate(x).float(), -1)
        top, idx = torch.topk(probs, self.top_k, -1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(self.top_k):
                m = self.experts[int(idx[t, j])]
                out[t] += top[t, j] * m.w2(m.act_fn(m.w1(x[t])) * m.w3(x[t]))
        return out


ACT2FN = pytest.importorskip("transformers.activations").ACT2FN


@pytest.mark.parametrize(
    "act_fn,name",
    [(nn.SiLU(), "silu"), (nn.GELU(), "gelu"), (ACT2FN["silu"], "silu"), (ACT2FN["gelu"], "gelu")],
)
def test_from_mixtral_legacy_activation(act_fn, name):
    legacy = _LegacyBlock(act_fn)
    with torch.no_grad():
        for p in legacy.parameters():
            p.normal_(0.0, 0.3)
    ours = MixtralSparseMoeBlock.from_mixtral(legacy)
    assert ours.experts.activation == mixtral_activation(legacy) == name
    x = torch.randn(9, H)
    with torch.no_grad():
        assert_close(ours(x), legacy(x))


def test_from_mixtral_gelu_block():
    hf, config = _hf_block(hidden_act="gelu")
    ours = MixtralSparseMoeBlock.from_mixtral(hf)
    assert ours.experts.activation == "gelu"
    x = torch.randn(1, T, H)
    with torch.no_grad():
        assert_close(ours(x), hf(x.clone()))


@pytest.mark.parametrize(
    "act_fn", [nn.GELU(approximate="tanh"), nn.ReLU(), ACT2FN["gelu_new"], ACT2FN["quick_gelu"]]
)
def test_from_mixtral_refuses_other_activations(act_fn):
    with pytest.raises(ValueError, match=r"block.experts\[0\].act_fn .* is neither SiLU nor the exact GELU"):
        MixtralSparseMoeBlock.from_mixtral(_LegacyBlock(act_fn))
    mixed = _LegacyBlock()
    mixed.experts[3].act_fn = nn.GELU()
    with pytest.raises(ValueError, match="different activations"):
        MixtralSparseMoeBlock.from_mixtral(mixed)


def test_from_mixtral_legacy_layout():
    legacy = _LegacyBlock()
    with torch.no_grad():
        for p in legacy.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(T, H)
    ours = MixtralSparseMoeBlock.from_mixtral(legacy)
    with torch.no_grad():
        assert_close(ours(x), legacy(x))
        # and the converted tensors drive transformers' 5.x block identically
        hf, _ = _hf_block()
        w_router, w_gate_up, w_down = from_mixtral(legacy)
        hf.load_state_dict(
            {"gate.weight": w_router, "experts.gate_up_proj": w_gate_up, "experts.down_proj": w_down}
        )
        assert_close(hf(x.view(1, T, H)).view(T, H), legacy(x))


def test_from_mixtral_transposed_and_interleaved_variants():
    hf, _ = _hf_block()
    w_router, w_gate_up, w_down = from_mixtral(hf)
    t = copy.deepcopy(hf)
    t.experts.is_transposed = True
    t.experts.gate_up_proj = nn.Parameter(w_gate_up.transpose(1, 2).clone())
    t.experts.down_proj = nn.Parameter(w_down.transpose(1, 2).clone())
    for a, b in zip(from_mixtral(t), (w_router, w_gate_up, w_down)):
        assert torch.equal(a, b)
    i = copy.deepcopy(hf)
    i.experts.is_concatenated = False
    inter = torch.stack([w_gate_up[:, :INTER], w_gate_up[:, INTER:]], dim=2).reshape(E, 2 * INTER, H)
    i.experts.gate_up_proj = nn.Parameter(inter)
    assert torch.equal(from_mixtral(i)[1], w_gate_up)
    with pytest.raises(TypeError, match="block"):
        from_mixtral(nn.Linear(3, 3))

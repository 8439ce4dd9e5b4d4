"""Peer comparison: our Qwen3-MoE and DeepSeek-V3 blocks against transformers 5.x's, plus their bad input."""

import math

import pytest
import torch

from frontiers_fast.nn import DeepseekV3MoE, Qwen3MoeSparseMoeBlock

from ..helpers import assert_close

transformers = pytest.importorskip("transformers")
qwen = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")

H, INTER, T = 32, 16, 29


def _fill(module):
    """Fan-in scaled random weights, and a random DeepSeek-V3 correction bias.

    A block built from a config leaves its expert tensors uninitialised
    (NaN here, as the tests poison torch.empty) and its router at zero.
    """
    with torch.no_grad():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=1.0 / math.sqrt(max(1, p.shape[-1])))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return module


def _qwen_config(**cfg):
    cfg = {"num_experts": 8, "num_experts_per_tok": 2, **cfg}
    return transformers.Qwen3MoeConfig(
        hidden_size=H, moe_intermediate_size=INTER, experts_implementation="eager", **cfg
    )


def _deepseek_config(**cfg):
    cfg = {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, **cfg}
    return transformers.DeepseekV3Config(
        hidden_size=H, moe_intermediate_size=INTER, experts_implementation="eager", **cfg
    )


def _params(module):
    return [p for _, p in sorted(module.named_parameters())]


def _check_against(hf, ours):
    """Strict load of hf's state into ours, then the output and every gradient (input, parameters)."""
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert [n for n, _ in sorted(ours.named_parameters())] == [n for n, _ in sorted(hf.named_parameters())]
    x = torch.randn(2, T, H)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    got, want = ours(xs[0]), hf(xs[1])
    assert isinstance(want, torch.Tensor) and got.shape == want.shape == x.shape and got.dtype == want.dtype
    assert_close(got, want)
    seed = torch.randn_like(want)
    names = ["input"] + [n for n, _ in sorted(ours.named_parameters())]
    g_ours = torch.autograd.grad(got, [xs[0], *_params(ours)], seed)
    g_hf = torch.autograd.grad(want, [xs[1], *_params(hf)], seed)
    for name, a, b in zip(names, g_ours, g_hf):
        assert_close(a, b, msg=f"gradient of {name}")


@pytest.mark.parametrize(
    "cfg",
    [dict(norm_topk_prob=True), dict(norm_topk_prob=False), dict(norm_topk_prob=True, hidden_act="gelu")],
    ids=["norm", "no-norm", "gelu"],
)
def test_qwen3_moe_matches_transformers(cfg):
    config = _qwen_config(**cfg)
    hf = _fill(qwen.Qwen3MoeSparseMoeBlock(config))
    ours = Qwen3MoeSparseMoeBlock(config)
    assert ours.norm_topk_prob == cfg["norm_topk_prob"]
    assert ours.experts.activation == cfg.get("hidden_act", "silu")
    _check_against(hf, ours)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),  # DeepSeek-V3's own settings: grouped, renormalised, scaled by 2.5, one shared expert
        dict(norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2),
        dict(n_routed_experts=12, num_experts_per_tok=1, n_group=6, topk_group=5, hidden_act="gelu"),
        dict(num_experts_per_tok=8, n_group=4, topk_group=2),  # every expert of the kept groups is chosen
        # transformers builds a zero-width shared MLP (torch warns at its init); so do we
        pytest.param(
            dict(n_shared_experts=0), marks=pytest.mark.filterwarnings("ignore:Initializing zero-element")
        ),
    ],
    ids=["v3", "no-norm-2-shared", "gelu-k1", "k-fills-groups", "no-shared"],
)
def test_deepseek_v3_matches_transformers(cfg):
    config = _deepseek_config(**cfg)
    hf = _fill(ds.DeepseekV3MoE(config))
    ours = DeepseekV3MoE(config)
    assert ours.gate.n_group == config.n_group and ours.gate.topk_group == config.topk_group
    assert ours.routed_scaling_factor == config.routed_scaling_factor
    _check_against(hf, ours)


def test_deepseek_v3_ungrouped_is_one_group():
    # Our explicit-size block without grouping routes as transformers' does with a single group.
    hf = _fill(ds.DeepseekV3MoE(_deepseek_config(n_group=1, topk_group=1)))
    ours = DeepseekV3MoE(hidden_size=H, intermediate_size=INTER, num_experts=16, top_k=4)
    assert ours.gate.n_group is None
    _check_against(hf, ours)


def test_explicit_sizes_build_the_config_block():
    pairs = [
        (
            Qwen3MoeSparseMoeBlock(_qwen_config(norm_topk_prob=True)),
            Qwen3MoeSparseMoeBlock(hidden_size=H, intermediate_size=INTER, num_experts=8, top_k=2, norm_topk_prob=True),
        ),
        (
            DeepseekV3MoE(_deepseek_config(n_shared_experts=2)),
            DeepseekV3MoE(
                hidden_size=H, intermediate_size=INTER, num_experts=16, top_k=4, n_shared_experts=2,
                n_group=4, topk_group=2,
            ),
        ),
    ]  # fmt: skip
    for from_config, explicit in pairs:
        a, b = from_config.state_dict(), explicit.state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        for name in ("scoring", "renormalize", "scaling", "n_group", "topk_group", "top_k"):
            assert getattr(from_config.gate, name) == getattr(explicit.gate, name), name
        for k, v in a.items():  # initialised: finite, and the routers start unbiased
            assert torch.isfinite(v).all(), k
    assert (explicit.gate.e_score_correction_bias == 0).all()


def test_deepseek_v3_keeps_a_float32_router_in_bf16():
    # transformers keeps DeepSeek-V3's router in float32 in a bf16 model (_keep_in_fp32_modules_strict).
    ours = DeepseekV3MoE(_deepseek_config()).to(torch.bfloat16)
    ours.gate.float()
    x = torch.randn(3, H, dtype=torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    logits, weights, _ = ours.gate(x)
    assert logits.dtype == weights.dtype == torch.float32


def _qwen(**kw):
    return Qwen3MoeSparseMoeBlock(
        **{"hidden_size": 8, "intermediate_size": 4, "num_experts": 4, "top_k": 2, **kw}
    )


def _deepseek(**kw):
    sizes = {
        "hidden_size": 8,
        "intermediate_size": 4,
        "num_experts": 8,
        "top_k": 2,
        "n_group": 4,
        "topk_group": 2,
    }
    return DeepseekV3MoE(**{**sizes, **kw})


NAN = float("nan")

# (id, call, exception, message regex): each regex names the argument.
BAD = [
    ("qwen-hidden_size-missing", lambda: _qwen(hidden_size=None), ValueError, "hidden_size must be given"),
    ("qwen-intermediate-zero", lambda: _qwen(intermediate_size=0), ValueError, "intermediate_size must be >= 1"),
    ("qwen-top_k-above", lambda: _qwen(top_k=5), ValueError, "top_k=5 must be <= num_experts=4"),
    ("qwen-norm-int", lambda: _qwen(norm_topk_prob=1), TypeError, "norm_topk_prob must be a bool"),
    ("qwen-act-relu", lambda: _qwen(hidden_act="relu"), ValueError, "hidden_act must be one of"),
    ("qwen-wrong-config", lambda: Qwen3MoeSparseMoeBlock(transformers.MixtralConfig()), TypeError, r"config must have \.moe_intermediate_size"),
    ("qwen-input-width", lambda: _qwen()(torch.randn(2, 3, 16)), ValueError, "hidden_states has last dimension 16 .* hidden_size=8"),
    ("qwen-input-int", lambda: _qwen()(torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, "hidden_states must be a floating"),
    ("qwen-input-dtype", lambda: _qwen()(torch.randn(2, 8, dtype=torch.float64)), TypeError, "hidden_states has dtype torch.float64 but experts.gate_up_proj"),
    ("ds-num_experts-float", lambda: _deepseek(num_experts=8.0), TypeError, "num_experts must be an int"),
    ("ds-groups-alone", lambda: _deepseek(topk_group=None), ValueError, "n_group and topk_group must be given together"),
    ("ds-n_group-divides", lambda: _deepseek(n_group=3), ValueError, "n_group=3 must divide num_experts=8"),
    ("ds-n_group-above", lambda: _deepseek(n_group=16), ValueError, r"n_group must be in \[1, 8\]"),
    ("ds-topk_group-above", lambda: _deepseek(topk_group=5), ValueError, r"topk_group must be in \[1, 4\] \(n_group=4\)"),
    ("ds-top_k-kept", lambda: _deepseek(top_k=5), ValueError, "top_k=5 exceeds the 4 experts of the topk_group=2 groups"),
    ("ds-scaling-nan", lambda: _deepseek(routed_scaling_factor=NAN), ValueError, "routed_scaling_factor must be finite"),
    ("ds-scaling-str", lambda: _deepseek(routed_scaling_factor="2.5"), TypeError, "routed_scaling_factor must be a real number"),
    ("ds-shared-negative", lambda: _deepseek(n_shared_experts=-1), ValueError, "n_shared_experts must be >= 0"),
    ("ds-norm-none-config", lambda: DeepseekV3MoE(transformers.Qwen3MoeConfig()), TypeError, r"config must have \.n_routed_experts"),
    ("ds-input-width", lambda: _deepseek()(torch.randn(5, 7)), ValueError, "hidden_states has last dimension 7 .* hidden_size=8"),
    ("ds-input-0d", lambda: _deepseek()(torch.tensor(1.0)), ValueError, "hidden_states has no dimensions"),
    ("ds-input-meta", lambda: _deepseek()(torch.randn(5, 8, device="meta")), ValueError, "hidden_states is on meta"),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,match", [pytest.param(*r[1:], id=r[0]) for r in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()

"""The "frontiers_fast" experts implementation inside transformers 5.x models.

Small Mixtral, Qwen3-MoE and DeepSeek-V3 causal LMs built from configs with
random weights (nothing is downloaded) run with transformers' eager experts
and with ours: logits, greedy generation and a training step's gradients
agree.  The layout variants, dtypes and refusals are checked on experts
modules alone, against transformers' ``batched_mm`` implementation.
"""

import copy
import math

import pytest
import torch
from torch import nn

from ..helpers import TOL, assert_close, spy_backends

transformers = pytest.importorskip("transformers")
hf_moe = pytest.importorskip("transformers.integrations.moe")
if not hasattr(hf_moe, "ExpertsInterface"):
    pytest.skip("transformers has no experts interface (needs 5.x)", allow_module_level=True)
fft = pytest.importorskip("frontiers_fast.integrations.transformers")
ACT2FN = transformers.activations.ACT2FN

NAME = "frontiers_fast"
V = 96


def _fill(module):
    """Fan-in scaled random weights (norms stay at one) and a random DeepSeek-V3 correction bias.

    Decisive routing (not the near-uniform router of a 0.02-std init) keeps a
    float32 rounding difference from flipping an expert choice.
    """
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return module


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


def _deepseek_v3():
    config = transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    )  # fmt: skip
    return transformers.DeepseekV3ForCausalLM(config)


MODELS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3}
MOE_LAYERS = {"mixtral": 2, "qwen3_moe": 2, "deepseek_v3": 2}


def _model(name):
    return _fill(MODELS[name]())


def _fused_calls(calls):
    return sum(n for (op, _), n in calls.items() if op == "fused_moe")


def test_registered_once_on_import():
    assert hf_moe.ALL_EXPERTS_FUNCTIONS[NAME] is fft.experts_forward
    assert fft.register_experts_implementation() == NAME == fft.EXPERTS_IMPLEMENTATION
    assert fft.register_experts_implementation() == NAME
    keys = list(hf_moe.ALL_EXPERTS_FUNCTIONS.keys())
    assert keys.count(NAME) == 1
    # class-wide: an interface instance made later (as a model file may) sees it too
    assert hf_moe.ExpertsInterface()[NAME] is fft.experts_forward


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_greedy_generation_match_eager(name):
    model = _model(name).eval()
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        want = model(ids).logits
        want_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        model.set_experts_implementation(NAME)
        assert model.get_experts_implementation()[""] == NAME
        with spy_backends() as calls:
            got = model(ids).logits
        assert _fused_calls(calls) == MOE_LAYERS[name]
        got_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert_close(got, want)
    assert torch.equal(got_tokens, want_tokens)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_gradients_match_eager(name):
    model = _model(name).train()
    ids = torch.randint(0, V, (2, 9))
    results = {}
    for impl in ("eager", NAME):
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_e, grads_e), (loss_f, grads_f) = results["eager"], results[NAME]
    assert_close(loss_f, loss_e)
    assert grads_e.keys() == grads_f.keys()
    assert any("experts.gate_up_proj" in n for n in grads_f)
    for n in grads_e:
        assert_close(grads_f[n], grads_e[n], msg=f"gradient of {n}")


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_from_pretrained_selects_it(name, tmp_path):
    model = _model(name).eval()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=NAME).eval()
    assert loaded.config._experts_implementation == NAME
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        want = model(ids).logits
        with spy_backends() as calls:
            got = loaded(ids).logits
    assert _fused_calls(calls) == MOE_LAYERS[name]
    assert_close(got, want)


def test_unknown_name_is_named():
    model = _mixtral()
    with pytest.raises(ValueError, match=r'experts_implementation="frontiers_fsat"` is not supported') as err:
        model.set_experts_implementation("frontiers_fsat")
    assert f'"{NAME}"' in str(err.value)  # and the error lists ours among the valid names
    with pytest.raises(ValueError, match='experts_implementation="nope"'):
        transformers.MixtralForCausalLM._from_config(model.config, experts_implementation="nope")
    # An experts module whose config names an unknown implementation fails when it runs, naming it.
    experts = _experts(implementation="nope")
    with pytest.raises(KeyError, match="`nope` is not a valid experts implementation"):
        experts(*_route())


# ---------------------------------------------------------------------------
# experts modules alone: layouts, dtypes, refusals
# ---------------------------------------------------------------------------
E, HID, INTER, T, K = 6, 16, 8, 23, 2


def _config(implementation=NAME, **cfg):
    return transformers.MixtralConfig(
        hidden_size=HID, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=K,
        experts_implementation=implementation, **cfg,
    )  # fmt: skip


def _experts(implementation=NAME, **cfg):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    return _fill(MixtralExperts(_config(implementation, **cfg)))


def _route():
    """hidden_states [T, H], distinct expert ids [T, k] and router weights [T, k]."""
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K), -1)
    return torch.randn(T, HID), ids, weights


@hf_moe.use_experts_implementation(is_transposed=True)
class _TransposedExperts(nn.Module):
    """Experts stored [E, H, 2I] / [E, I, H] (transformers' is_transposed layout, as in Aria)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, HID, 2 * INTER) / HID**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, INTER, HID) / INTER**0.5)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("the tests pick an implementation")


@hf_moe.use_experts_implementation(is_concatenated=False)
class _InterleavedExperts(nn.Module):
    """Gate and up rows alternate; its _apply_gate reads them so (as GPT-OSS's does, minus its clamp)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INTER, HID) / HID**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, HID, INTER) / INTER**0.5)
        self.act_fn = ACT2FN[config.hidden_act]

    def _apply_gate(self, gate_up):
        return self.act_fn(gate_up[..., 0::2]) * gate_up[..., 1::2]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("the tests pick an implementation")


def _run(experts, impl, x, ids, weights):
    """Output and the gradients of x, the router weights and the expert tensors under ``impl``."""
    experts.config._experts_implementation = impl
    x, weights = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    out = experts(x, ids, weights)
    seed = torch.ones_like(out) + 0.1 * torch.arange(out.numel(), dtype=out.dtype).view(out.shape).sin()
    grads = torch.autograd.grad(out, [x, weights, experts.gate_up_proj, experts.down_proj], seed)
    return out, grads


@pytest.mark.parametrize(
    "make,act",
    [
        (lambda act: _experts(hidden_act=act), "silu"),
        (lambda act: _experts(hidden_act=act), "gelu"),
        (lambda act: _TransposedExperts(_config(hidden_act=act)), "silu"),
        (lambda act: _InterleavedExperts(_config(hidden_act=act)), "gelu"),
    ],
    ids=["fused-silu", "fused-gelu", "transposed", "interleaved"],
)
def test_layouts_match_batched_mm(make, act):
    experts = make(act)
    x, ids, weights = _route()
    want, want_grads = _run(experts, "batched_mm", x, ids, weights)
    with spy_backends() as calls:
        got, got_grads = _run(experts, NAME, x, ids, weights)
    assert _fused_calls(calls) == 1
    assert fft._GATES[experts][1] == (act, isinstance(experts, _InterleavedExperts))
    assert_close(got, want)
    for name, a, b in zip(["x", "weights", "gate_up_proj", "down_proj"], got_grads, want_grads):
        assert a.shape == b.shape
        assert_close(a, b, msg=f"gradient of {name}")


def test_half_precision_and_mixed_input():
    experts = _experts().to(torch.bfloat16)
    x, ids, weights = _route()
    exact = copy.deepcopy(experts).double()  # the same bf16 values, computed in float64
    exact.config._experts_implementation = "batched_mm"
    with torch.no_grad():
        want = exact(x.to(torch.bfloat16).double(), ids, weights.double())
        got = experts(x.to(torch.bfloat16), ids, weights)
        assert got.dtype == torch.bfloat16
        assert_close(got, want, torch.bfloat16)
        # A float32 input (autocast, an upcast norm) meets bf16 experts: computed in bf16, returned in float32.
        mixed = experts(x, ids, weights)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.double(), want, rtol=TOL[torch.bfloat16][0], atol=TOL[torch.bfloat16][1])


def test_expert_parallel_sentinels_get_no_weight():
    experts = _experts()
    experts._is_expert_parallel = True
    x, ids, weights = _route()
    ids[::3, 1] = E  # routed to another rank's expert
    want, want_grads = _run(experts, "batched_mm", x, ids, weights)
    got, got_grads = _run(experts, NAME, x, ids, weights)
    assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b)


def test_refuses_what_it_cannot_compute():
    x, ids, weights = _route()
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    cfg = transformers.GptOssConfig(
        hidden_size=HID, intermediate_size=INTER, num_local_experts=E, experts_implementation=NAME
    )
    with pytest.raises(
        NotImplementedError, match=r'"frontiers_fast" cannot run GptOssExperts: .*has_bias=True'
    ):
        _fill(gpt_oss.GptOssExperts(cfg))(x, ids, weights)
    with pytest.raises(NotImplementedError, match="MixtralExperts: .*does not compute act"):
        _experts(hidden_act="gelu_new")(x, ids, weights)
    clamped = _InterleavedExperts(_config())
    clamped._apply_gate = lambda gate_up: (
        clamped.act_fn(gate_up[..., 0::2].clamp(max=1.0)) * gate_up[..., 1::2]
    )
    with pytest.raises(NotImplementedError, match="_InterleavedExperts: .*does not compute act"):
        clamped(x, ids, weights)
    no_gate = _experts()
    no_gate.has_gate = False
    with pytest.raises(NotImplementedError, match="has_gate=False"):
        no_gate(x, ids, weights)
    experts = _experts()
    with pytest.raises(ValueError, match=r"MixtralExperts.gate_up_proj \[6, 16, 16\] and down_proj .* H=12"):
        experts(torch.randn(T, 12), ids, weights)
    with pytest.raises(ValueError, match="ids must lie in"):
        experts(x, ids + E, weights)

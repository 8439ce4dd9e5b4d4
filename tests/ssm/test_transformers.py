"""transformers' Mamba on our kernels (frontiers_fast.integrations.transformers.kernelize).

A small random MambaForCausalLM is copied and the copy kernelized; the
untouched model (whose CPU MambaMixer runs its PyTorch loop, ``slow_forward``)
is the reference: logits, greedy generation, one training step's gradients,
decoding with transformers' own cache, and the parameters shared rather
than copied.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.mamba.modeling_mamba import MambaMixer  # noqa: E402

from frontiers_fast.integrations.transformers import FastMambaMixer, kernelize  # noqa: E402

from ..helpers import assert_close, first_cpu_backend, spy_backends  # noqa: E402

VOCAB = 100


def _config(**kw):
    # initializer_range above the default spreads the logits, so that greedy
    # decoding does not settle on one token and the generation test means something.
    return transformers.MambaConfig(
        hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, state_size=8, initializer_range=0.2, **kw
    )


@pytest.fixture
def models():
    torch.manual_seed(0)
    ref = transformers.MambaForCausalLM(_config()).eval()
    ours = kernelize(copy.deepcopy(ref))
    return ref, ours


def _mixers(model):
    return [m for m in model.modules() if isinstance(m, (MambaMixer, FastMambaMixer))]


def test_every_mixer_is_replaced(models):
    ref, ours = models
    assert [type(m) for m in _mixers(ref)] == [MambaMixer] * 2
    assert [type(m) for m in _mixers(ours)] == [FastMambaMixer] * 2
    assert [m.layer_idx for m in _mixers(ours)] == [0, 1]


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match(models, padded):
    ref, ours = models
    ids = torch.randint(0, VOCAB, (3, 17))
    mask = None
    if padded:  # left padding, as generate uses it: the mixer zeroes those positions
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        mask[2, :1] = 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generate_gives_the_same_tokens(models, padded):
    ref, ours = models
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=True)
    want = ref.generate(ids, **kw)
    with spy_backends() as calls:
        got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert len(set(want[:, 9:].flatten().tolist())) > 2, (
        "degenerate generation: the test would not discriminate"
    )
    # The prefill ran the scan, and each new token one decoding step per layer.
    steps = 2 * (10 - 1)
    backend = first_cpu_backend("selective_state_update")
    assert calls[("selective_state_update", backend)] == steps
    assert calls[("causal_conv1d_update", backend)] == steps
    assert calls[("selective_scan", first_cpu_backend("selective_scan"))] == 2


@pytest.mark.parametrize("record_past", [False, True])
def test_decoding_with_the_cache_reproduces_the_full_forward(models, record_past):
    _, ours = models
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        want = ours(ids).logits
        cache = transformers.DynamicCache(config=ours.config)
        if record_past:
            # As assisted decoding asks: the conv states grow until cropped, and one-token
            # calls go through the chunk path.
            cache.activate_past_recording()
        got = [ours(ids[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, 8):  # one token at a time
            got.append(ours(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        # A multi-token chunk after a prefill continues from both states (the reference
        # mixer restarts its scan from zero there).
        got.append(ours(ids[:, 8:], cache=cache, use_cache=True).logits)
    assert_close(torch.cat(got, 1), want, torch.float32)


@pytest.mark.parametrize("padded", [False, True])
def test_one_training_step_gives_the_same_gradients(models, padded):
    ref, ours = models
    ref.train()
    ours.train()
    ids = torch.randint(0, VOCAB, (2, 15))
    labels = torch.randint(0, VOCAB, (2, 15))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
    want = ref(ids, labels=labels, attention_mask=mask).loss
    got = ours(ids, labels=labels, attention_mask=mask).loss
    assert_close(got, want, torch.float32)
    want.backward()
    got.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and theirs[name].grad is not None, name
        assert_close(p.grad, theirs[name].grad, torch.float32, msg=name)


def test_gradient_checkpointing(models):
    ref, ours = models
    for m in (ref, ours):
        m.train()
        m.gradient_checkpointing_enable()
    ids, labels = torch.randint(0, VOCAB, (2, 11)), torch.randint(0, VOCAB, (2, 11))
    ref(ids, labels=labels).loss.backward()
    ours(ids, labels=labels).loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs[name].grad, torch.float32, msg=name)


def test_parameters_are_shared_not_copied():
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(_config())
    before = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    mixer = model.backbone.layers[1].mixer
    assert kernelize(model) is model
    after = dict(model.named_parameters())
    assert list(after) == list(before)  # same names, same order (an optimizer sees the same list)
    for name, (p, ptr) in before.items():
        assert after[name] is p and after[name].data_ptr() == ptr, name
    assert list(model.state_dict()) == keys
    new = model.backbone.layers[1].mixer
    assert new.in_proj is mixer.in_proj and new.A_log is mixer.A_log and new.config is mixer.config
    assert model.lm_head.weight is model.backbone.embeddings.weight  # tied weights stay tied


def test_a_model_without_mamba_layers_is_left_alone_with_a_warning():
    lin = torch.nn.Linear(4, 3)
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    with pytest.warns(UserWarning, match="holds no supported layer.*MambaMixer"):
        assert kernelize(lin) is lin
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in state.items())
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    )
    modules = list(gpt2.modules())
    with pytest.warns(UserWarning, match="GPT2LMHeadModel holds no supported layer"):
        assert kernelize(gpt2) is gpt2
    assert list(gpt2.modules()) == modules


def test_an_already_kernelized_model_does_not_warn(models):
    _, ours = models
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert kernelize(ours) is ours


def test_an_unsupported_mixer_keeps_the_transformers_path():
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(_config(hidden_act="gelu"))
    with pytest.warns(UserWarning, match=r"2 MambaMixer layer\(s\) keep transformers' own path.*'gelu'"):
        kernelize(model)
    assert [type(m) for m in _mixers(model)] == [MambaMixer] * 2
    with pytest.raises(ValueError, match="mixer cannot run on frontiers_fast's kernels"):
        FastMambaMixer(model.backbone.layers[0].mixer)
    with pytest.raises(TypeError, match="mixer must be a transformers MambaMixer"):
        FastMambaMixer(torch.nn.Linear(2, 2))


def test_a_bare_mixer_is_replaced():
    mixer = MambaMixer(_config(), layer_idx=0)
    fast = kernelize(mixer)
    assert isinstance(fast, FastMambaMixer) and fast.in_proj is mixer.in_proj
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert_close(fast(x), mixer(x), torch.float32)
        # The deprecated keyword, as MambaMixer's decorator maps it.
        cache = transformers.DynamicCache(config=_config())
        assert_close(fast(x, cache_params=cache), mixer(x), torch.float32)
    # mamba_ssm's calling convention is there too.
    assert_close(fast.mamba_forward(x), mixer(x), torch.float32)


def test_mixer_bad_input_names_the_argument(models):
    _, ours = models
    mixer = _mixers(ours)[0]
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[2, 5\]"):
        mixer(x, attention_mask=torch.ones(2, 6))
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        mixer(x, attention_mask=[[1] * 5] * 2)
    with pytest.raises(TypeError, match="cache must be a transformers Cache"):
        mixer(x, cache=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="cache and cache_params"):
        mixer(x, cache=object(), cache_params=object())
    with pytest.raises(ValueError, match="hidden_states has .* but d_model=64"):
        mixer(torch.randn(2, 5, 63))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        kernelize("model")

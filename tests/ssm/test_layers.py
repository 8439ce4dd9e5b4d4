"""The Mamba mixer layer: same numbers as mambapy's MambaBlock and
transformers' MambaMixer with the same weights; its memory-lean backward
gives the gradients of the plain composition of the public functions (eager,
autocast, float64 gradcheck, compiled) while keeping less; prefill plus
decoding steps reproduce the full forward."""

import pytest
import torch

from frontiers_fast import use_backend
from frontiers_fast.nn.ssm import InferenceParams, Mamba

from ..helpers import assert_close, backends_for, check_compiled, devices


def test_step_reproduces_forward():
    layer = Mamba(8, d_state=4, d_conv=3, expand=2).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    want = layer(x)
    conv_state, ssm_state = layer.allocate_inference_cache(2, 11)  # mamba_ssm's (batch_size, max_seqlen)
    assert conv_state.dtype == ssm_state.dtype == torch.float64
    got = torch.stack([layer.step(x[:, t], conv_state, ssm_state) for t in range(11)], 1)
    assert_close(got, want)


def test_allocate_inference_cache_like_mamba_ssm():
    layer = Mamba(8, d_state=4, d_conv=3, dtype=torch.bfloat16)
    conv_state, ssm_state = layer.allocate_inference_cache(3, max_seqlen=64, inference_params=None)
    assert conv_state.shape == (3, 16, 3) and conv_state.dtype == torch.bfloat16
    # The state accumulates over the sequence: at least float32 (dt_proj.weight's dtype otherwise).
    assert ssm_state.shape == (3, 16, 4) and ssm_state.dtype == torch.float32
    conv_state, ssm_state = layer.allocate_inference_cache(3, 64, torch.float16)
    assert conv_state.dtype == torch.float16 and ssm_state.dtype == torch.float32
    conv_state, ssm_state = layer.allocate_inference_cache(3, dtype=torch.float64)
    assert conv_state.dtype == ssm_state.dtype == torch.float64
    assert not conv_state.any() and not ssm_state.any()


def test_matches_mambapy_block():
    mamba = pytest.importorskip("mambapy.mamba")
    cfg = mamba.MambaConfig(d_model=8, n_layers=1, d_state=4, d_conv=4, expand_factor=2)
    theirs = mamba.MambaBlock(cfg)
    ours = Mamba(8, d_state=4, d_conv=4, expand=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 13, 8)
    out = theirs(x)
    # Both in float32 against ours in float64 on the same weights.
    ref64 = Mamba(8, d_state=4, d_conv=4, expand=2).double()
    ref64.load_state_dict(theirs.state_dict())
    want = ref64(x.double())
    assert_close(out, want, torch.float32)
    assert_close(ours(x), want, torch.float32)
    # Parameter gradients too, by name.
    seed = torch.randn_like(out)
    gt = dict(zip(dict(theirs.named_parameters()), torch.autograd.grad(out, list(theirs.parameters()), seed)))
    w = ref64(x.double())
    gw = dict(
        zip(dict(ref64.named_parameters()), torch.autograd.grad(w, list(ref64.parameters()), seed.double()))
    )
    for name, g in gt.items():
        assert_close(g, gw[name], torch.float32, msg=name)


def test_compile_inductor_layer():
    torch._dynamo.reset()
    layer = Mamba(16, d_state=4)
    x = torch.randn(2, 20, 16)
    compiled = torch.compile(layer, fullgraph=True)
    assert_close(compiled(x), layer(x))


def test_autocast_input_of_another_dtype_is_accepted():
    # Outside autocast a bf16 input to a float32 layer is refused by name (tests/ssm/test_fuzz.py);
    # inside, the projections cast it, as for any torch layer.
    layer = Mamba(8, d_state=4)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x.bfloat16())
        want = layer(x.bfloat16().float())
    assert got.dtype == torch.bfloat16
    assert_close(got, want, torch.bfloat16)


# ---------------------------------------------------------------------------
# the memory-lean backward (_MambaInner) against the plain composition
# ---------------------------------------------------------------------------
def _param_grads(layer, forward, x, seed):
    """(output, d(out . seed)/dx, {name: d(out . seed)/dparam}) of ``forward(x)``."""
    x = x.detach().clone().requires_grad_(True)
    out = forward(x)
    names, params = zip(*layer.named_parameters())
    gx, *gp = torch.autograd.grad(out, [x, *params], seed)
    return out, gx, dict(zip(names, gp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conv_bias,bias", [(True, False), (False, True)])
def test_gradients_match_the_composition(dtype, conv_bias, bias):
    layer = Mamba(8, d_state=4, d_conv=4, expand=2, conv_bias=conv_bias, bias=bias).to(dtype)
    x = torch.randn(2, 13, 8, dtype=dtype)
    seed = torch.randn(2, 13, 8, dtype=dtype)
    out, gx, gp = _param_grads(layer, layer, x, seed)
    want, wx, wp = _param_grads(layer, layer._composed_forward, x, seed)
    assert_close(out, want)
    assert_close(gx, wx, msg="hidden_states")
    assert set(gp) == set(wp) and len(gp) == (9 if conv_bias else 8) + 2 * bias
    for name in wp:
        assert_close(gp[name], wp[name], msg=name)


def test_gradients_match_the_composition_under_autocast():
    layer = Mamba(8, d_state=4)
    x = torch.randn(2, 9, 8)
    seed = torch.randn(2, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, gx, gp = _param_grads(layer, layer, x, seed)
        want, wx, wp = _param_grads(layer, layer._composed_forward, x, seed)
    assert out.dtype == want.dtype == torch.bfloat16
    assert_close(out, want, torch.bfloat16)
    assert_close(gx, wx, torch.bfloat16, msg="hidden_states")
    for name in wp:
        # Parameter gradients land in the parameters' dtype (float32), from bfloat16 products.
        assert gp[name].dtype == wp[name].dtype == torch.float32, name
        assert_close(gp[name], wp[name], torch.bfloat16, msg=name)


def _layer_cases():
    """(device, backend) for every backend that runs all four ops of the layer there."""
    functions = ("selective_scan", "causal_conv1d", "selective_state_update", "causal_conv1d_update")
    return [
        pytest.param(d, b, id=f"{d}-{b}")
        for d in devices()
        for b in backends_for("selective_scan", d)
        if all(b in backends_for(f, d, grad=f in functions[:2]) for f in functions)
    ]


@pytest.mark.parametrize("device,backend", _layer_cases())
def test_every_backend_matches_float64(device, backend):
    layer = Mamba(8, d_state=4, d_conv=4, layer_idx=0).to(device)
    ref64 = Mamba(8, d_state=4, d_conv=4).to(device).double()
    ref64.load_state_dict(layer.state_dict())
    x = torch.randn(2, 13, 8, device=device)
    seed = torch.randn(2, 13, 8, device=device)
    with use_backend(backend):
        out, gx, gp = _param_grads(layer, layer, x, seed)
        # Prefill 5 tokens, then decoding steps.
        states = layer.allocate_inference_cache(2)
        with torch.no_grad():
            steps = torch.cat(
                [layer(x[:, :5], states)] + [layer(x[:, t : t + 1], states) for t in range(5, 13)], 1
            )
    with use_backend("reference"):
        want, wx, wp = _param_grads(ref64, ref64, x.double(), seed.double())
    assert_close(out, want, torch.float32)
    assert_close(steps, want, torch.float32)
    assert_close(gx, wx, torch.float32, msg="hidden_states")
    for name in wp:
        assert_close(gp[name], wp[name], torch.float32, msg=name)


@pytest.mark.gradcheck
def test_gradcheck_float64():
    layer = Mamba(4, d_state=2, d_conv=3, expand=2, bias=True).double()
    names, params = zip(*layer.named_parameters())
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    ps = [p.detach().clone().requires_grad_(True) for p in params]
    assert torch.autograd.gradcheck(fn, (x, *ps), eps=1e-6, atol=1e-7)


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for the backward of ``fn()``."""
    seen = {}

    def pack(t):
        # Views of one buffer (xz's halves, x_dbl's slices) count once.
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_backward_keeps_less_than_the_composition():
    d_model, L, batch = 16, 64, 2
    layer = Mamba(d_model, d_state=4)
    x = torch.randn(batch, L, d_model, requires_grad=True)
    _, ours = _saved_bytes(lambda: layer(x))
    _, plain = _saved_bytes(lambda: layer._composed_forward(x))
    # The conv output and delta ([batch, d_inner, L] float32 each) are recomputed,
    # not kept; everything else is kept by both.
    per_activation = batch * layer.d_inner * L * 4
    assert plain - ours >= 2 * per_activation, (plain, ours)


def test_compiled_gradients_match_eager():
    layer = Mamba(8, d_state=4)
    names, params = zip(*layer.named_parameters())
    x = torch.randn(2, 7, 8, requires_grad=True)
    seed = torch.randn(2, 7, 8)

    def loss(x, *ps):
        return (torch.func.functional_call(layer, dict(zip(names, ps)), (x,)) * seed).sum()

    ps = [p.detach().clone().requires_grad_(True) for p in params]
    check_compiled(loss, [x, *ps])
    check_compiled(loss, [x, *ps], backend="inductor")


def test_double_backward_is_refused():
    layer = Mamba(8, d_state=4)
    x = torch.randn(2, 5, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


def test_loads_a_transformers_mixer_strictly():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = transformers.MambaConfig(hidden_size=16, state_size=4, conv_kernel=4, expand=2, num_hidden_layers=1)
    theirs = MambaMixer(cfg, layer_idx=0)
    ours = Mamba(16, d_state=4, d_conv=4, expand=2, dt_rank=theirs.time_step_rank)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), torch.float32)


# ---------------------------------------------------------------------------
# decoding with an inference cache: prefill k tokens, step the rest
# ---------------------------------------------------------------------------
def _decode(layer, x, k, cache, advance):
    """Prefill x[:, :k], then one token at a time; ``advance(n)`` moves the cache's offset on."""
    outs = [layer(x[:, :k], inference_params=cache)]
    advance(k)
    for t in range(k, x.shape[1]):
        outs.append(layer(x[:, t : t + 1], inference_params=cache))
        advance(1)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 11])  # d_conv - 1 = 3
@pytest.mark.parametrize("kind", ["InferenceParams", "tuple"])
def test_prefill_then_steps_reproduce_forward(k, kind):
    layer = Mamba(8, d_state=4, d_conv=4, expand=2, layer_idx=3).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    want = layer(x)
    if kind == "tuple":
        cache = layer.allocate_inference_cache(2)
        got = _decode(layer, x, k, cache, lambda n: None)
    else:
        cache = InferenceParams(max_seqlen=11, max_batch_size=2)
        # Stale states from an earlier sequence: a prefill (offset 0) must ignore them.
        cache.key_value_memory_dict[3] = tuple(torch.randn_like(s) for s in layer.allocate_inference_cache(2))

        def advance(n):
            cache.seqlen_offset += n

        got = _decode(layer, x, k, cache, advance)
    assert_close(got, want)
    conv_state, ssm_state = cache if kind == "tuple" else cache.key_value_memory_dict[3]
    # The states after the sequence are those of a prefill of all of it.
    fresh = layer.allocate_inference_cache(2)
    layer(x, inference_params=fresh)
    assert_close(conv_state, fresh[0])
    assert_close(ssm_state, fresh[1])


def test_chunks_continue_a_sequence():
    # Beyond mamba_ssm (whose step takes one token): a multi-token call after a prefill continues from the states.
    layer = Mamba(8, d_state=4, d_conv=4, layer_idx=0).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    cache = InferenceParams()
    outs = []
    for a, b in ((0, 2), (2, 7), (7, 8), (8, 12)):
        outs.append(layer(x[:, a:b], inference_params=cache))
        cache.seqlen_offset += b - a
    assert_close(torch.cat(outs, 1), layer(x))


def test_prefill_gradients_reach_the_input():
    layer = Mamba(8, d_state=4, layer_idx=0).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(2, 6, 8, dtype=torch.float64)
    got = torch.autograd.grad(layer(x, inference_params=layer.allocate_inference_cache(2)), x, seed)[0]
    assert_close(got, torch.autograd.grad(layer(x), x, seed)[0])


def test_inference_params_errors_name_the_argument():
    layer = Mamba(8, d_state=4)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="needs a layer_idx"):
        layer(x, inference_params=InferenceParams())
    with pytest.raises(TypeError, match="inference_params must be an InferenceParams"):
        layer(x, inference_params={"seqlen_offset": 0})
    with pytest.raises(ValueError, match=r"inference_params as a tuple must be \(conv_state, ssm_state\)"):
        layer(x, inference_params=layer.allocate_inference_cache(2)[:1])
    with pytest.raises(ValueError, match=r"ssm_state must have shape \[2, 16, 4\]"):
        layer(x, inference_params=(torch.zeros(2, 16, 4), torch.zeros(3, 16, 4)))
    with pytest.raises(ValueError, match="layer_idx must be >= 0"):
        Mamba(8, layer_idx=-1)
    layer = Mamba(8, d_state=4, layer_idx=1)
    cache = InferenceParams(seqlen_offset=-1)
    with pytest.raises(ValueError, match="inference_params.seqlen_offset must be >= 0"):
        layer(x, inference_params=cache)
    cache = InferenceParams(seqlen_offset=1, key_value_memory_dict={1: layer.allocate_inference_cache(3)})
    with pytest.raises(
        ValueError, match=r"conv_state must have shape \[2, 16, \*\].*key_value_memory_dict\[1\]"
    ):
        layer(x, inference_params=cache)

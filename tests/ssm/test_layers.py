"""The Mamba mixer layer: same numbers as mambapy's MambaBlock with the same
weights, and token-by-token decoding reproduces the full forward."""

import pytest
import torch

from frontiers_fast.nn.ssm import Mamba

from ..helpers import assert_close


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

"""Bad inputs get a clear error that names the argument."""

import numpy as np
import pytest
import torch

from frontiers_fast.ops import ssm as ops

from .inputs import scan_inputs

f64 = torch.float64


def _scan(**changes):
    kw = scan_inputs(batch=2, dim=6, N=3, L=5, layout="variable", dtype=torch.float32)
    kw.update(changes)
    return ops.selective_scan(**kw)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("u", torch.randn(2, 6), r"u must have shape \[batch, dim, L\]"),
        ("u", [[1.0]], "u must be a torch.Tensor"),
        ("u", torch.randint(0, 3, (2, 6, 5)), "u must be a floating tensor"),
        ("delta", torch.randn(2, 6, 4), r"delta must have shape \[2, 6, 5\]"),
        ("delta", torch.randn(2, 6, 5, device="meta"), "delta is on meta"),
        ("A", torch.randn(5, 3), r"A must have shape \[6, \*\]"),
        ("A", torch.randn(6, 3, dtype=torch.complex64), "A must be real"),
        ("A", torch.randn(6, 3, 1), r"A must have shape \[dim, N\]"),
        ("B", torch.randn(2, 3, 4), r"B must have shape \[2, 3, 5\]"),
        ("B", torch.randn(2, 4, 3, 5), "B has G=4 groups"),
        ("B", torch.randn(2, 3, 3, 5, 1), r"B must have shape \[dim, N\], \[batch, N, L\] or"),
        ("B", torch.randn(6, 4), r"B must have shape \[6, 3\] \(\[dim, N\]"),
        ("C", torch.randn(2, 2, 4, 5), r"C must have shape \[2, 2, 3, 5\]"),
        ("C", torch.randn(2, 3, 5, device="meta"), "C is on meta"),
        ("C", torch.randn(2, 3, 5).int(), "C must be a floating tensor"),
        ("D", torch.randn(5), r"D must have shape \[6\]"),
        ("D", torch.randn(6, 1), r"D must have shape \[dim\]"),
        ("z", torch.randn(2, 6, 4), r"z must have shape \[2, 6, 5\]"),
        ("z", torch.randn(2, 6, 5, device="meta"), "z is on meta"),
        ("delta_bias", torch.randn(7), r"delta_bias must have shape \[6\]"),
        ("delta_bias", torch.randn(6, dtype=torch.complex64), "delta_bias must be real"),
        ("initial_state", torch.randn(2, 6, 4), r"initial_state must have shape \[2, 6, 3\]"),
        ("initial_state", torch.randn(2, 6, 3, device="meta"), "initial_state is on meta"),
        ("delta_softplus", 1, "delta_softplus must be a bool"),
    ],
)
def test_selective_scan_bad_inputs(name, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _scan(**{name: bad})


def test_selective_scan_bad_flags_and_backend():
    with pytest.raises(TypeError, match="return_last_state must be a bool"):
        _scan(return_last_state="yes")
    kw = scan_inputs(L=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="u must have at least one time step"):
        ops.selective_scan(**kw)
    kw = scan_inputs(dtype=torch.float32)
    for backend in ("cpp", "triton", "cuda"):
        with pytest.raises(NotImplementedError, match="selective_scan"):
            ops.selective_scan(**kw, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.selective_scan(**kw, backend="fast")
    assert ops.selective_scan(**kw, backend="reference").shape == kw["u"].shape


def _step_args():
    return dict(
        state=torch.randn(2, 6, 3),
        x=torch.randn(2, 6),
        dt=torch.rand(2, 6),
        A=-torch.rand(6, 3),
        B=torch.randn(2, 3),
        C=torch.randn(2, 3),
    )


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("state", torch.randn(2, 2, 6, 3), r"state must have shape \[batch, dim, N\]"),
        ("state", torch.randn(2, 6, 3).int(), "state must be a floating tensor"),
        ("x", torch.randn(2, 5), r"x must have shape \[2, 6\]"),
        ("x", torch.randn(2, 6, device="meta"), "x is on meta"),
        ("dt", torch.randn(3, 6), r"dt must have shape \[2, 6\]"),
        ("A", torch.randn(6, 4), r"A must have shape \[6, 3\]"),
        ("A", torch.randn(6, 3, dtype=torch.complex64), "A must be real"),
        ("B", torch.randn(2, 4), r"B must have shape \[2, 3\]"),
        ("B", torch.randn(2, 4, 3), "B has G=4 groups"),
        ("C", torch.randn(2, 3, 3, 1), r"C must have shape \[batch, N\] or \[batch, G, N\]"),
        ("D", torch.randn(3), r"D must have shape \[6\]"),
        ("z", torch.randn(2, 6, device="meta"), "z is on meta"),
        ("dt_bias", torch.randn(6, 1), r"dt_bias must have shape \[dim\]"),
        ("dt_softplus", "yes", "dt_softplus must be a bool"),
    ],
)
def test_state_update_bad_inputs(name, bad, match):
    args = _step_args()
    args[name] = bad
    with pytest.raises((ValueError, TypeError), match=match):
        ops.selective_state_update(**args)


def test_state_update_backend():
    with pytest.raises(NotImplementedError, match="selective_state_update"):
        ops.selective_state_update(**_step_args(), backend="triton")


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("x", torch.randn(2, 6), r"x must have shape \[batch, dim, L\]"),
        ("x", torch.randint(0, 2, (2, 6, 9)), "x must be a floating tensor"),
        ("weight", torch.randn(5, 4), "weight must be"),
        ("weight", torch.randn(6, 0), "weight must be"),
        ("weight", torch.randn(6, 4, device="meta"), "weight is on meta"),
        ("weight", torch.randn(6, 4, dtype=torch.complex64), "weight must be real"),
        ("bias", torch.randn(5), r"bias must have shape \[6\]"),
        ("bias", torch.randn(6, device="meta"), "bias is on meta"),
        ("initial_states", torch.randn(2, 6, 4), r"initial_states must have shape \[2, 6, 3\]"),
        ("activation", "relu", "activation must be"),
        ("return_final_states", None, "return_final_states must be a bool"),
    ],
)
def test_causal_conv1d_bad_inputs(name, bad, match):
    args = dict(x=torch.randn(2, 6, 9), weight=torch.randn(6, 4))
    args[name] = bad
    with pytest.raises((ValueError, TypeError), match=match):
        ops.causal_conv1d(**args)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("x", torch.randn(6), r"x must have shape \[batch, dim\] or \[batch, dim, L\]"),
        ("conv_state", torch.randn(2, 6, 2), "conv_state must be"),
        ("conv_state", torch.randn(2, 5, 4), "conv_state must be"),
        ("conv_state", torch.randn(2, 6, 4, device="meta"), "conv_state is on meta"),
        ("weight", torch.randn(6), r"weight must have shape \[dim, width\]"),
        ("bias", torch.randn(6, dtype=torch.complex64), "bias must be real"),
        ("activation", "gelu", "activation must be"),
    ],
)
def test_conv_update_bad_inputs(name, bad, match):
    args = dict(x=torch.randn(2, 6), conv_state=torch.randn(2, 6, 4), weight=torch.randn(6, 4))
    args[name] = bad
    with pytest.raises((ValueError, TypeError), match=match):
        ops.causal_conv1d_update(**args)


def test_causal_conv1d_refuses_empty_sequence():
    # As selective_scan does: L = 0 is an error naming x, not a crash in the backward.
    with pytest.raises(ValueError, match="x must have at least one time step"):
        ops.causal_conv1d(torch.randn(2, 6, 0), torch.randn(6, 4), initial_states=torch.randn(2, 6, 3),
                          return_final_states=True)  # fmt: skip


def test_in_place_states_must_be_writable():
    # An expanded (stride-0) state cannot be written in place: the error names it.
    args = _step_args()
    args["state"] = torch.zeros(1, 6, 3).expand(2, 6, 3)
    with pytest.raises(
        ValueError, match=r"state is updated in place, so it cannot be an expanded \(stride-0\)"
    ):
        ops.selective_state_update(**args)
    conv_state = torch.zeros(2, 6, 1).expand(2, 6, 4)
    with pytest.raises(ValueError, match=r"conv_state is updated in place, so it cannot be an expanded"):
        ops.causal_conv1d_update(torch.randn(2, 6), conv_state, torch.randn(6, 4))
    # Strided but not overlapping is fine, and is written through.
    conv_state = torch.zeros(2, 6, 8)[..., ::2]
    ops.causal_conv1d_update(torch.ones(2, 6), conv_state, torch.randn(6, 4))
    assert (conv_state[..., -1] == 1).all()


def test_numpy_bools_accepted():
    kw = scan_inputs(dtype=torch.float32)
    kw["delta_softplus"] = np.bool_(True)
    out, last = ops.selective_scan(**kw, return_last_state=np.bool_(True))
    want, want_last = ops.selective_scan(**dict(kw, delta_softplus=True), return_last_state=True)
    assert torch.equal(out, want) and torch.equal(last, want_last)
    x, w = torch.randn(2, 6, 9), torch.randn(6, 4)
    assert len(ops.causal_conv1d(x, w, return_final_states=np.bool_(True))) == 2
    args = _step_args()
    y = ops.selective_state_update(**dict(args, state=args["state"].clone()), dt_softplus=np.bool_(True))
    assert torch.equal(y, ops.selective_state_update(**args, dt_softplus=True))


def test_conv_backends():
    with pytest.raises(NotImplementedError, match="causal_conv1d"):
        ops.causal_conv1d(torch.randn(2, 6, 9), torch.randn(6, 4), backend="cpp")
    with pytest.raises(NotImplementedError, match="causal_conv1d_update"):
        ops.causal_conv1d_update(torch.randn(2, 6), torch.randn(2, 6, 4), torch.randn(6, 4), backend="triton")

"""Bad inputs get a clear error that names the argument."""

import numpy as np
import pytest
import torch

from frontiers_fast.ops import ssm as ops

from ..helpers import backends_for
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
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
        ops.selective_scan(**kw, backend="triton")
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        ops.selective_scan(**kw, backend="cuda")
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
        ("state", torch.randn(2, 2, 6, 3, 1), r"state must have shape \[batch, dim, N\] or \[batch, nheads"),
        ("state", torch.randn(3, 6, 3), "state has 3 rows but x has batch 2; pass state_batch_indices"),
        ("state", torch.randn(2, 5, 3), "state has dim=5"),
        ("state", torch.randn(2, 6, 3).int(), "state must be a floating tensor"),
        ("x", torch.randn(2, 5), "state has dim=6 .* but x has dim=5"),
        ("x", torch.randn(2, 6).double(), "dt has dtype torch.float32 but x has torch.float64"),
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
    with pytest.raises(ValueError, match="selective_state_update: backend 'triton' runs on CUDA tensors"):
        ops.selective_state_update(**_step_args(), backend="triton")
    with pytest.raises(
        NotImplementedError, match="selective_state_update: backend 'cuda' is not implemented"
    ):
        ops.selective_state_update(**_step_args(), backend="cuda")


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
    with pytest.raises(NotImplementedError, match="causal_conv1d: backend 'cuda' is not implemented"):
        ops.causal_conv1d(torch.randn(2, 6, 9), torch.randn(6, 4), backend="cuda")
    with pytest.raises(ValueError, match="causal_conv1d_update: backend 'triton' runs on CUDA tensors"):
        ops.causal_conv1d_update(torch.randn(2, 6), torch.randn(2, 6, 4), torch.randn(6, 4), backend="triton")


# ---------------------------------------------------------------------------
# packed sequences, state caches, multi-head states and dtypes
# ---------------------------------------------------------------------------
def _packed(**changes):
    kw = scan_inputs(batch=1, dim=6, N=3, L=10, layout="variable", dtype=torch.float32)
    kw["initial_state"] = torch.randn(3, 6, 3)
    kw["cu_seqlens"] = torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    kw.update(changes)
    return kw


CU_CASES = [
    (dict(cu_seqlens=torch.tensor([1, 4, 4, 10])), ValueError, "cu_seqlens must start at 0 and end at"),
    (dict(cu_seqlens=torch.tensor([0, 4, 4, 9])), ValueError, "cu_seqlens must start at 0 and end at"),
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 10])), ValueError, "cu_seqlens must not decrease"),
    (dict(cu_seqlens=torch.tensor([0.0, 4.0, 4.0, 10.0])), TypeError, "cu_seqlens must be an integer tensor"),
    (
        dict(cu_seqlens=torch.tensor([0, 4, 4, 10], dtype=torch.int16)),
        TypeError,
        "cu_seqlens must be an integer",
    ),
    (
        dict(cu_seqlens=torch.tensor([[0, 4, 4, 10]])),
        ValueError,
        r"cu_seqlens must have shape \[num_sequences \+ 1\]",
    ),
    (dict(cu_seqlens=torch.tensor([0])), ValueError, r"cu_seqlens must hold S \+ 1 >= 2 offsets"),
    (dict(cu_seqlens=torch.tensor([0, 4, 4, 10], device="meta")), ValueError, "cu_seqlens is on meta"),
    (
        dict(initial_state=torch.randn(2, 6, 3)),
        ValueError,
        r"initial_state must have shape \[3, 6, 3\] \(\[num_sequences",
    ),
]


@pytest.mark.parametrize("changes,exc,match", CU_CASES)
def test_packed_scan_bad_inputs(changes, exc, match):
    with pytest.raises(exc, match=match):
        ops.selective_scan(**_packed(**changes))


def test_packed_scan_refuses_batches():
    kw = scan_inputs(batch=2, dim=6, N=3, L=10, layout="variable", dtype=torch.float32)
    with pytest.raises(
        ValueError, match="cu_seqlens packs sequences along L of a batch of one, but u has batch 2"
    ):
        ops.selective_scan(**kw, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="but x has batch 2"):
        ops.causal_conv1d(torch.randn(2, 6, 10), torch.randn(6, 4), cu_seqlens=torch.tensor([0, 10]))


@pytest.mark.parametrize("changes,exc,match", CU_CASES[:3])
@pytest.mark.parametrize("backend", backends_for("selective_scan", "cpu"))
def test_bad_offsets_are_refused_inside_the_ops(changes, exc, match, backend):
    # The op bodies check the values too, so direct calls and compiled graphs refuse them.
    kw = _packed(**changes)
    A, D, bias, h0 = (kw[k].float() for k in ("A", "D", "delta_bias", "initial_state"))
    with pytest.raises(exc, match=match):
        torch.ops.frontiers_fast.selective_scan(kw["u"], kw["delta"], A, kw["B"], kw["C"], D, kw["z"], bias, True,
                                                h0, kw["cu_seqlens"].long(), backend)  # fmt: skip
    x, w = torch.randn(1, 6, 10), torch.randn(6, 4)
    with pytest.raises(exc, match=match):
        torch.ops.frontiers_fast.causal_conv1d(x, w, None, None, True, kw["cu_seqlens"].long(), backend)


def test_packed_conv_bad_inputs():
    x, w = torch.randn(1, 6, 10), torch.randn(6, 4)
    cu = torch.tensor([0, 3, 10])
    with pytest.raises(ValueError, match=r"initial_states must have shape \[2, 6, 3\] \(\[num_sequences"):
        ops.causal_conv1d(x, w, initial_states=torch.randn(1, 6, 3), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must not decrease"):
        ops.causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 7, 3, 10]))


def _heads(**changes):
    """A multi-head decoding step: batch 2, 4 heads of headdim 2, N 3, 2 groups, into a cache of 5 rows."""
    kw = dict(state=torch.randn(5, 4, 2, 3), x=torch.randn(2, 4, 2), dt=torch.rand(2, 4, 2), A=-torch.rand(4, 2, 3),
              B=torch.randn(2, 2, 3), C=torch.randn(2, 2, 3), D=torch.randn(4, 2), z=torch.randn(2, 4, 2),
              dt_bias=torch.randn(4, 2), dt_softplus=True, state_batch_indices=torch.tensor([4, 1]))  # fmt: skip
    kw.update(changes)
    return kw


@pytest.mark.parametrize(
    "changes,exc,match",
    [
        (
            dict(state=torch.randn(5, 3, 2, 3)),
            ValueError,
            "state has 3 heads of headdim 2 .* but x has 4 of 2",
        ),
        (dict(state=torch.randn(5, 4, 1, 3)), ValueError, "state has 4 heads of headdim 1"),
        (dict(x=torch.randn(2, 4, 3)), ValueError, "but x has 4 of 3"),
        (dict(x=torch.randn(2, 8)), ValueError, r"x must have shape \[batch, nheads, headdim\]"),
        (dict(dt=torch.rand(2, 4, 1)), ValueError, r"dt must have shape \[2, 4, 2\]"),
        (dict(A=-torch.rand(4, 3, 3)), ValueError, r"A must have shape \[4, 2, 3\] \(\[nheads, headdim, N\]"),
        (dict(A=-torch.rand(4, 2, 4)), ValueError, r"A must have shape \[4, 2, 3\]"),
        (dict(B=torch.randn(2, 3, 3)), ValueError, "B has G=3 groups .* which must divide nheads=4"),
        (dict(B=torch.randn(2, 2, 4)), ValueError, r"B must have shape \[2, 2, 3\]"),
        (dict(C=torch.randn(2, 2, 5)), ValueError, r"C must have shape \[2, 2, 3\]"),
        (dict(C=torch.randn(3, 2, 3)), ValueError, r"C must have shape \[2, 2, 3\]"),
        (dict(D=torch.randn(4)), ValueError, r"D must have shape \[nheads, headdim\]"),
        (dict(dt_bias=torch.randn(4, 3)), ValueError, r"dt_bias must have shape \[4, 2\]"),
        (
            dict(z=torch.randn(2, 4, 2).double()),
            TypeError,
            "z has dtype torch.float64 but x has torch.float32",
        ),
        (
            dict(state_batch_indices=torch.tensor([5, 1])),
            ValueError,
            r"state_batch_indices must index the 5 rows",
        ),
        (
            dict(state_batch_indices=torch.tensor([-1, 1])),
            ValueError,
            r"state_batch_indices must index the 5 rows",
        ),
        (
            dict(state_batch_indices=torch.tensor([1, 1])),
            ValueError,
            "state_batch_indices must not repeat a row",
        ),
        (
            dict(state_batch_indices=torch.tensor([1.0, 2.0])),
            TypeError,
            "state_batch_indices must be an integer",
        ),
        (
            dict(state_batch_indices=torch.tensor([1, 2, 3])),
            ValueError,
            r"state_batch_indices must have shape \[2\]",
        ),
        (dict(state_batch_indices=None), ValueError, "state has 5 rows but x has batch 2"),
    ],
)
def test_multihead_state_update_bad_inputs(changes, exc, match):
    with pytest.raises(exc, match=match):
        ops.selective_state_update(**_heads(**changes))


@pytest.mark.parametrize("backend", backends_for("selective_state_update", "cpu", grad=False))
def test_bad_state_indices_are_refused_inside_the_op(backend):
    kw = _heads()
    args = [kw[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus")]
    for idx, match in (
        (torch.tensor([5, 1]), "must index the 5 rows"),
        (torch.tensor([2, 2]), "must not repeat"),
    ):
        with pytest.raises(ValueError, match=match):
            torch.ops.frontiers_fast.selective_state_update(*args, idx, backend)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("delta", torch.rand(2, 6, 5).double(), "delta has dtype torch.float64 but u has torch.float32"),
        ("z", torch.randn(2, 6, 5).half(), "z has dtype torch.float16 but u"),
        ("B", torch.randn(2, 3, 5).bfloat16(), "B has dtype torch.bfloat16 but u"),
        (
            "A",
            -torch.rand(6, 3).double(),
            r"A has dtype torch.float64; it must have u's dtype \(torch.float32\)",
        ),
        ("D", torch.randn(6).half(), "D has dtype torch.float16; it must have u's dtype"),
        ("initial_state", torch.randn(2, 6, 3).double(), "initial_state has dtype torch.float64"),
    ],
)
def test_scan_dtype_mismatch(name, bad, match):
    with pytest.raises(TypeError, match=match):
        _scan(**{name: bad})


def test_half_activations_take_float32_parameters():
    kw = scan_inputs(batch=2, dim=6, N=3, L=5, layout="variable", dtype=torch.bfloat16)
    kw.update(A=kw["A"].float(), D=kw["D"].float(), delta_bias=kw["delta_bias"].float(),
              initial_state=kw["initial_state"].float())  # fmt: skip
    out = ops.selective_scan(**kw)
    assert out.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="weight has dtype torch.float64; it must have x's dtype"):
        ops.causal_conv1d(torch.randn(2, 6, 9), torch.randn(6, 4).double())
    with pytest.raises(TypeError, match="initial_states has dtype torch.float64 but x has torch.float32"):
        ops.causal_conv1d(
            torch.randn(2, 6, 9), torch.randn(6, 4), initial_states=torch.randn(2, 6, 3).double()
        )


@pytest.mark.parametrize("backend", backends_for("selective_scan", "cpu"))
def test_direct_packed_call_with_a_batch_is_refused(backend):
    # the public functions refuse it first; the op bodies must too
    kw = scan_inputs(batch=2, dim=6, N=3, L=10, layout="variable", dtype=torch.float32)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    with pytest.raises(ValueError, match="cu_seqlens packs sequences along L of a batch of one"):
        torch.ops.frontiers_fast.selective_scan(*args, True, None, torch.tensor([0, 4, 10]), backend)
    with pytest.raises(ValueError, match="cu_seqlens packs sequences along L of a batch of one"):
        torch.ops.frontiers_fast.causal_conv1d(kw["u"], torch.randn(6, 4), None, None, True, torch.tensor([0, 10]),
                                               backend)  # fmt: skip

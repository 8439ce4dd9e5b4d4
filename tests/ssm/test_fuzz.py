"""Bad and edge inputs thrown at every public function and module of the selective-scan family.

One table, one row per (function, class of bad input): wrong Python type,
wrong dtype, wrong number of dimensions, wrong sizes, a meta tensor among CPU
ones, out-of-range layout indices (groups, state widths), bad parameters and
options, empty sizes.  Each row names the exception and the argument its
message must name.  Then what the policy accepts: all-meta calls (no function
of this family reads values, so they give meta outputs), empty batch, dim and
N, and NaN in data tensors, which must propagate exactly as the docstrings say.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frontiers_fast.nn.ssm import Mamba
from frontiers_fast.ops import ssm as ops

from ..helpers import assert_close, backend_cases

META = "meta"
nan = float("nan")


def t(*shape, dtype=torch.float32, device="cpu"):
    """A fresh tensor of ``shape``: random floats, small ints, alternating bools or complex."""
    if dtype == torch.bool:
        return torch.arange(int(np.prod(shape))).reshape(shape).remainder(2).bool().to(device)
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.randint(0, 3, shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------
# valid calls (batch 2, dim 6, N 3, L 5; conv width 4; Mamba d_model 8, d_inner 16)
# ---------------------------------------------------------------------------
def _scan():
    return dict(u=t(2, 6, 5), delta=t(2, 6, 5), A=-torch.rand(6, 3), B=t(2, 3, 5), C=t(2, 3, 5), D=t(6),
                z=t(2, 6, 5), delta_bias=t(6), delta_softplus=True, initial_state=t(2, 6, 3))  # fmt: skip


def _step():
    return dict(state=t(2, 6, 3), x=t(2, 6), dt=torch.rand(2, 6), A=-torch.rand(6, 3), B=t(2, 3), C=t(2, 3),
                D=t(6), z=t(2, 6), dt_bias=t(6), dt_softplus=True)  # fmt: skip


def _conv():
    return dict(x=t(2, 6, 9), weight=t(6, 4), bias=t(6), activation="silu", initial_states=t(2, 6, 3))


def _conv_update():
    return dict(x=t(2, 6), conv_state=t(2, 6, 4), weight=t(6, 4), bias=t(6), activation="silu")


def _layer():
    return Mamba(8, d_state=4, d_conv=4, expand=2)


def _step_call(kw):
    layer = _layer()
    conv_state, ssm_state = layer.allocate_inference_cache(2)
    args = dict(hidden_states=t(2, 8), conv_state=conv_state, ssm_state=ssm_state)
    return layer.step(**{**args, **kw})


CALLS = {
    "selective_scan": (_scan, lambda kw: ops.selective_scan(**kw)),
    "selective_state_update": (_step, lambda kw: ops.selective_state_update(**kw)),
    "causal_conv1d": (_conv, lambda kw: ops.causal_conv1d(**kw)),
    "causal_conv1d_update": (_conv_update, lambda kw: ops.causal_conv1d_update(**kw)),
    "Mamba": (dict, lambda kw: Mamba(**{"d_model": 8, **kw})),
    "Mamba.forward": (lambda: dict(hidden_states=t(2, 5, 8)), lambda kw: _layer()(**kw)),
    "Mamba.step": (dict, _step_call),
    "Mamba.allocate_inference_cache": (
        lambda: dict(batch_size=2),
        lambda kw: _layer().allocate_inference_cache(**kw),
    ),
}

ROWS = []


def rows(function, kind, exc, *cases):
    """Each case: (changes to the valid call, regex the message must match; it starts with the name)."""
    for i, (changes, match) in enumerate(cases):
        ROWS.append(pytest.param(function, changes, exc, match, id=f"{function}-{kind}-{i}"))


I64, BOOL, C64 = torch.int64, torch.bool, torch.complex64

# --- selective_scan --------------------------------------------------------
fn = "selective_scan"
rows(fn, "type", TypeError,
     (dict(u=[[1.0]]), "u must be a torch.Tensor"), (dict(delta=np.ones((2, 6, 5))), "delta must be a torch.Tensor"),
     (dict(A=None), "A must be a torch.Tensor"), (dict(D=1.0), "D must be a torch.Tensor"),
     (dict(delta_softplus=1), "delta_softplus must be a bool"), (dict(return_last_state="yes"), "return_last_state must be a bool"))  # fmt: skip
rows(fn, "dtype", TypeError,
     (dict(u=t(2, 6, 5, dtype=I64)), "u must be a floating tensor"), (dict(delta=t(2, 6, 5, dtype=BOOL)), "delta must be a floating"),
     (dict(A=t(6, 3, dtype=C64)), "A must be real"), (dict(B=t(2, 3, 5, dtype=I64)), "B must be a floating"),
     (dict(C=t(2, 3, 5, dtype=C64)), "C must be real"), (dict(z=t(2, 6, 5, dtype=BOOL)), "z must be a floating"),
     (dict(initial_state=t(2, 6, 3, dtype=I64)), "initial_state must be a floating"))  # fmt: skip
rows(fn, "ndim", ValueError,
     (dict(u=t(2, 6)), r"u must have shape \[batch, dim, L\]"), (dict(A=t(6)), r"A must have shape \[dim, N\]"),
     (dict(B=t(2, 3, 3, 5, 1)), "B must have shape"), (dict(C=t(5)), "C must have shape"),
     (dict(D=t()), r"D must have shape \[dim\]"), (dict(initial_state=t(2, 6)), "initial_state must have shape"))  # fmt: skip
rows(fn, "size", ValueError,
     (dict(delta=t(2, 6, 4)), r"delta must have shape \[2, 6, 5\]"), (dict(A=t(5, 3)), r"A must have shape \[6, \*\]"),
     (dict(B=t(6, 4)), r"B must have shape \[6, 3\]"), (dict(C=t(3, 3, 5)), r"C must have shape \[2, 3, 5\]"),
     (dict(D=t(7)), r"D must have shape \[6\]"), (dict(z=t(2, 6, 6)), r"z must have shape \[2, 6, 5\]"),
     (dict(delta_bias=t(5)), r"delta_bias must have shape \[6\]"),
     (dict(initial_state=t(2, 6, 4)), r"initial_state must have shape \[2, 6, 3\]"))  # fmt: skip
rows(fn, "meta_mix", ValueError,
     (dict(delta=t(2, 6, 5, device=META)), "delta is on meta but u is on cpu"), (dict(B=t(2, 3, 5, device=META)), "B is on meta"),
     (dict(D=t(6, device=META)), "D is on meta"), (dict(initial_state=t(2, 6, 3, device=META)), "initial_state is on meta"))  # fmt: skip
rows(fn, "range", ValueError,
     (dict(B=t(2, 4, 3, 5)), "B has G=4 groups .* must divide dim=6"), (dict(C=t(2, 0, 3, 5)), "C has G=0 groups"))  # fmt: skip
rows(fn, "param", ValueError, (dict(backend="fast"), "backend must be one of"), (dict(backend=1), "backend must be one of"))  # fmt: skip
rows(fn, "empty", ValueError,
     (dict(u=t(2, 6, 0), delta=t(2, 6, 0), B=t(2, 3, 0), C=t(2, 3, 0), z=None), "u must have at least one time step"))  # fmt: skip

# --- selective_state_update ------------------------------------------------
fn = "selective_state_update"
rows(fn, "type", TypeError,
     (dict(state=np.zeros((2, 6, 3))), "state must be a torch.Tensor"), (dict(x=1.0), "x must be a torch.Tensor"),
     (dict(dt_softplus="yes"), "dt_softplus must be a bool"))  # fmt: skip
rows(fn, "dtype", TypeError,
     (dict(state=t(2, 6, 3, dtype=I64)), "state must be a floating"), (dict(x=t(2, 6, dtype=BOOL)), "x must be a floating"),
     (dict(A=t(6, 3, dtype=C64)), "A must be real"), (dict(dt_bias=t(6, dtype=I64)), "dt_bias must be a floating"))  # fmt: skip
rows(fn, "ndim", ValueError,
     (dict(state=t(2, 2, 6, 3, 1)), r"state must have shape \[batch, dim, N\] or \[batch, nheads"), (dict(dt=t(2, 6, 1)), r"dt must have shape \[batch, dim\]"),
     (dict(B=t(2)), r"B must have shape \[batch, N\] or \[batch, G, N\]"), (dict(z=t(2, 6, 1)), "z must have shape"))  # fmt: skip
rows(fn, "size", ValueError,
     (dict(x=t(2, 5)), r"state has dim=6 \(shape \[2, 6, 3\]\) but x has dim=5"), (dict(A=t(6, 4)), r"A must have shape \[6, 3\]"),
     (dict(C=t(3, 3)), r"C must have shape \[2, 3\]"), (dict(D=t(3)), r"D must have shape \[6\]"))  # fmt: skip
rows(fn, "meta_mix", ValueError,
     (dict(x=t(2, 6, device=META)), "x is on meta but state is on cpu"), (dict(C=t(2, 3, device=META)), "C is on meta"))  # fmt: skip
rows(fn, "range", ValueError,
     (dict(B=t(2, 4, 3)), "B has G=4 groups"),
     (dict(state=torch.zeros(1, 6, 3).expand(2, 6, 3)), r"state is updated in place, so it cannot be an expanded"))  # fmt: skip
rows(fn, "param", ValueError, (dict(backend="gpu"), "backend must be one of"))
rows(fn, "empty", ValueError, (dict(state=t(0, 6, 3)), r"state has 0 rows but x has batch 2"))

# --- causal_conv1d ---------------------------------------------------------
fn = "causal_conv1d"
rows(fn, "type", TypeError,
     (dict(x=[1.0]), "x must be a torch.Tensor"), (dict(weight=3), "weight must be a torch.Tensor"),
     (dict(return_final_states=None), "return_final_states must be a bool"))  # fmt: skip
rows(fn, "dtype", TypeError,
     (dict(x=t(2, 6, 9, dtype=I64)), "x must be a floating"), (dict(weight=t(6, 4, dtype=C64)), "weight must be real"),
     (dict(bias=t(6, dtype=BOOL)), "bias must be a floating"))  # fmt: skip
rows(fn, "ndim", ValueError,
     (dict(x=t(2, 6)), r"x must have shape \[batch, dim, L\]"), (dict(weight=t(6)), r"weight must have shape \[dim, width\]"),
     (dict(initial_states=t(2, 6)), "initial_states must have shape"))  # fmt: skip
rows(fn, "size", ValueError,
     (dict(weight=t(5, 4)), r"weight must be \[dim, width\] with dim=6"), (dict(bias=t(5)), r"bias must have shape \[6\]"),
     (dict(initial_states=t(2, 6, 4)), r"initial_states must have shape \[2, 6, 3\]"))  # fmt: skip
rows(fn, "meta_mix", ValueError,
     (dict(weight=t(6, 4, device=META)), "weight is on meta but x is on cpu"), (dict(bias=t(6, device=META)), "bias is on meta"))  # fmt: skip
rows(fn, "range", ValueError, (dict(weight=t(6, 0)), "weight must be .* width >= 1"))
rows(fn, "param", ValueError,
     (dict(activation="relu"), "activation must be one of"), (dict(activation=1), "activation must be one of"),
     (dict(backend="fast"), "backend must be one of"))  # fmt: skip
rows(fn, "empty", ValueError, (dict(x=t(2, 6, 0)), "x must have at least one time step"))

# --- causal_conv1d_update --------------------------------------------------
fn = "causal_conv1d_update"
rows(fn, "type", TypeError, (dict(conv_state=[0.0]), "conv_state must be a torch.Tensor"), (dict(bias=0.5), "bias must be a torch.Tensor"))  # fmt: skip
rows(fn, "dtype", TypeError,
     (dict(x=t(2, 6, dtype=I64)), "x must be a floating"), (dict(conv_state=t(2, 6, 4, dtype=BOOL)), "conv_state must be a floating"),
     (dict(bias=t(6, dtype=C64)), "bias must be real"))  # fmt: skip
rows(fn, "ndim", ValueError,
     (dict(x=t(6)), r"x must have shape \[batch, dim\] or \[batch, dim, L\]"), (dict(conv_state=t(2, 6)), r"conv_state must have shape \[batch, dim, S\]"))  # fmt: skip
rows(fn, "size", ValueError,
     (dict(conv_state=t(2, 5, 4)), r"conv_state must be \[batch, dim, S\] = \[2, 6, S\]"), (dict(weight=t(7, 4)), "weight must be .* dim=6"))  # fmt: skip
rows(
    fn,
    "meta_mix",
    ValueError,
    (dict(conv_state=t(2, 6, 4, device=META)), "conv_state is on meta but x is on cpu"),
)
rows(fn, "range", ValueError,
     (dict(conv_state=t(2, 6, 2)), "conv_state must be .* S >= width - 1 = 3"),
     (dict(conv_state=torch.zeros(2, 6, 1).expand(2, 6, 4)), "conv_state is updated in place"))  # fmt: skip
rows(fn, "param", ValueError, (dict(activation="gelu"), "activation must be one of"))
rows(fn, "empty", ValueError, (dict(x=t(0, 6)), r"conv_state must be \[batch, dim, S\] = \[0, 6, S\]"))

# --- Mamba (constructor) ---------------------------------------------------
fn = "Mamba"
rows(fn, "type", TypeError,
     (dict(d_model=8.0), "d_model must be an int"), (dict(d_state="16"), "d_state must be an int"),
     (dict(d_conv=True), "d_conv must be an int"), (dict(expand=1.5), "expand must be an int"),
     (dict(dt_rank=2.0), "dt_rank must be an int"), (dict(dt_min="0.001"), "dt_min must be a real number"),
     (dict(dt_max=None), "dt_max must be a real number"), (dict(dt_init_floor=[0.0]), "dt_init_floor must be a real"),
     (dict(conv_bias=1), "conv_bias must be a bool"), (dict(bias="no"), "bias must be a bool"))  # fmt: skip
rows(fn, "dtype", ValueError, (dict(dtype=torch.int64), "dtype must be one of"), (dict(dtype=torch.complex64), "dtype must be one of"))  # fmt: skip
rows(fn, "size", ValueError,
     (dict(d_model=0), "d_model must be >= 1"), (dict(d_model=-3), "d_model must be >= 1"),
     (dict(d_state=0), "d_state must be >= 1"), (dict(d_conv=0), "d_conv must be >= 1"),
     (dict(expand=0), "expand must be >= 1"), (dict(dt_rank=0), r"dt_rank must be >= 1 \(or 'auto'\)"),
     (dict(dt_rank="full"), "dt_rank must be one of"),
     (dict(d_model=10**7), r"Mamba\(d_model=10000000, .* is too large"))  # fmt: skip
rows(fn, "param", ValueError,
     (dict(dt_min=0.0), "dt_min must be > 0"), (dict(dt_min=-1e-3), "dt_min must be > 0"),
     (dict(dt_min=nan), "dt_min must be finite"), (dict(dt_max=float("inf")), "dt_max must be finite"),
     (dict(dt_max=1e-4), "dt_min must be <= dt_max"), (dict(dt_init_floor=-1e-4), "dt_init_floor must be >= 0"),
     (dict(dt_init_floor=nan), "dt_init_floor must be finite"),
     (dict(dt_min=1e-50, dt_init_floor=0.0), "dt_min=1e-50 .* too small"),
     (dict(dt_max=1e5, dtype=torch.float16), "dt_max=100000.0 is too large"),
     (dict(dt_init_floor=1e39), "dt_init_floor=1e\\+39 is too large"))  # fmt: skip

# --- Mamba.forward, step, allocate_inference_cache -------------------------
fn = "Mamba.forward"
rows(fn, "type", TypeError, (dict(hidden_states=[[0.0] * 8]), "hidden_states must be a torch.Tensor"))
rows(fn, "dtype", TypeError,
     (dict(hidden_states=t(2, 5, 8, dtype=I64)), "hidden_states must be a floating"),
     (dict(hidden_states=t(2, 5, 8, dtype=C64)), "hidden_states must be a floating"),
     (dict(hidden_states=t(2, 5, 8, dtype=torch.float64)), "hidden_states has dtype torch.float64 but the layer's"))  # fmt: skip
rows(fn, "ndim", ValueError,
     (dict(hidden_states=t(2, 8)), r"hidden_states must have shape \[batch, L, d_model\]"),
     (dict(hidden_states=t()), "hidden_states has .*0-dim tensor.* but d_model=8"))  # fmt: skip
rows(fn, "size", ValueError, (dict(hidden_states=t(2, 5, 7)), r"hidden_states has \D*7\b.* but d_model=8"))
rows(
    fn,
    "meta_mix",
    ValueError,
    (dict(hidden_states=t(2, 5, 8, device=META)), "hidden_states is on meta but the layer's"),
)
rows(
    fn,
    "empty",
    ValueError,
    (dict(hidden_states=t(2, 0, 8)), "hidden_states must have at least one time step"),
)

fn = "Mamba.step"
rows(fn, "type", TypeError, (dict(ssm_state=None), "ssm_state must be a torch.Tensor"))
rows(fn, "dtype", TypeError,
     (dict(hidden_states=t(2, 8, dtype=I64)), "hidden_states must be a floating"),
     (dict(ssm_state=t(2, 16, 4, dtype=I64)), "ssm_state must be a floating"))  # fmt: skip
rows(fn, "ndim", ValueError,
     (dict(hidden_states=t(2, 1, 8)), r"hidden_states must have shape \[batch, d_model\]"),
     (dict(conv_state=t(2, 16)), r"conv_state must have shape \[2, 16, \*\]"))  # fmt: skip
rows(fn, "size", ValueError,
     (dict(hidden_states=t(2, 9)), r"hidden_states has \D*9\b.* but d_model=8"),
     (dict(ssm_state=t(2, 16, 5)), r"ssm_state must have shape \[2, 16, 4\] \(\[batch, d_inner, d_state\]"),
     (dict(conv_state=t(3, 16, 4)), r"conv_state must have shape \[2, 16, \*\]"))  # fmt: skip
rows(fn, "meta_mix", ValueError, (dict(ssm_state=t(2, 16, 4, device=META)), "ssm_state is on meta but hidden_states is on cpu"))  # fmt: skip
rows(fn, "range", ValueError, (dict(conv_state=t(2, 16, 2)), "conv_state must hold S >= d_conv - 1 = 3"))

fn = "Mamba.allocate_inference_cache"
rows(fn, "type", TypeError, (dict(batch_size=2.0), "batch_size must be an int"))
rows(fn, "size", ValueError, (dict(batch_size=-1), "batch_size must be >= 0"))
rows(fn, "dtype", ValueError, (dict(batch_size=2, dtype=torch.int32), "dtype must be one of"))


@pytest.mark.parametrize("function,changes,exc,match", ROWS)
def test_bad_input(function, changes, exc, match):
    base, call = CALLS[function]
    with pytest.raises(exc, match=match):
        call({**base(), **changes})


def test_every_function_and_class_has_rows():
    # A new public function (or a class left out for one) shows up here.
    kinds = {}
    for p in ROWS:
        kinds.setdefault(p.values[0], set()).add(p.id.split("-")[1])
    assert set(kinds) == set(CALLS)
    for function in ("selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update"):
        assert {"type", "dtype", "ndim", "size", "meta_mix", "range", "param", "empty"} <= kinds[function], (
            function
        )


# ---------------------------------------------------------------------------
# all-meta calls: nothing here reads values, so shapes come back
# ---------------------------------------------------------------------------
def _on_meta(kw):
    return {k: v.to(META) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def test_all_meta_calls_give_meta_shapes():
    out, last = ops.selective_scan(**_on_meta(_scan()), return_last_state=True)
    assert out.device.type == META and out.shape == (2, 6, 5) and last.shape == (2, 6, 3)
    assert last.dtype == torch.float32
    y = ops.selective_state_update(**_on_meta(_step()))
    assert y.device.type == META and y.shape == (2, 6)
    out, final = ops.causal_conv1d(**_on_meta(_conv()), return_final_states=True)
    assert out.device.type == META and out.shape == (2, 6, 9) and final.shape == (2, 6, 3)
    y = ops.causal_conv1d_update(**_on_meta(_conv_update()))
    assert y.device.type == META and y.shape == (2, 6)
    layer = Mamba(8, d_state=4, device=META)
    out = layer(t(2, 5, 8, device=META))
    assert out.device.type == META and out.shape == (2, 5, 8)
    conv_state, ssm_state = layer.allocate_inference_cache(2)
    assert layer.step(t(2, 8, device=META), conv_state, ssm_state).shape == (2, 8)


def test_meta_sizes_are_still_checked():
    with pytest.raises(ValueError, match=r"delta must have shape \[2, 6, 5\]"):
        ops.selective_scan(**_on_meta(dict(_scan(), delta=t(2, 6, 4))))
    with pytest.raises(ValueError, match=r"hidden_states has \D*7\b.* but d_model=8"):
        Mamba(8, device=META)(t(2, 5, 7, device=META))


# ---------------------------------------------------------------------------
# empty batch, dim or N are accepted and give the right (empty) results
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch,dim,N", [(0, 6, 3), (2, 0, 3), (2, 6, 0)])
@pytest.mark.parametrize("layout", ["constant", "variable", "grouped"])
def test_empty_scan_sizes(batch, dim, N, layout):
    L = 5
    bc = {"constant": (dim, N), "variable": (batch, N, L), "grouped": (batch, 1, N, L)}[layout]
    kw = dict(u=t(batch, dim, L), delta=torch.rand(batch, dim, L), A=-torch.rand(dim, N), B=t(*bc), C=t(*bc),
              D=t(dim), z=t(batch, dim, L), initial_state=t(batch, dim, N))  # fmt: skip
    leaves = {k: v.requires_grad_(True) for k, v in kw.items()}
    out, last = ops.selective_scan(**leaves, return_last_state=True)
    assert out.shape == (batch, dim, L) and last.shape == (batch, dim, N)
    if N == 0:  # no state: only the skip connection is left
        assert_close(out, kw["D"][:, None] * kw["u"] * torch.nn.functional.silu(kw["z"]))
    grads = torch.autograd.grad(out.sum() + last.sum(), list(leaves.values()))
    assert all(g.shape == v.shape for g, v in zip(grads, leaves.values()))


@pytest.mark.parametrize("batch,dim", [(0, 6), (2, 0)])
def test_empty_conv_and_step_sizes(batch, dim):
    x = t(batch, dim, 9, dtype=torch.float64).requires_grad_(True)
    w = t(dim, 4, dtype=torch.float64).requires_grad_(True)
    out, final = ops.causal_conv1d(x, w, activation="silu", return_final_states=True)
    assert out.shape == (batch, dim, 9) and final.shape == (batch, dim, 3)
    gx, gw = torch.autograd.grad(out.sum(), [x, w])
    assert gx.shape == x.shape and gw.shape == w.shape and not gw.any()
    assert ops.causal_conv1d_update(t(batch, dim), t(batch, dim, 4), t(dim, 4)).shape == (batch, dim)
    y = ops.selective_state_update(t(batch, dim, 3), t(batch, dim), torch.rand(batch, dim), -torch.rand(dim, 3),
                                   t(batch, 3), t(batch, 3))  # fmt: skip
    assert y.shape == (batch, dim)


def test_empty_batch_layer_and_zero_conv_steps():
    layer = _layer()
    assert layer(t(0, 5, 8)).shape == (0, 5, 8)
    conv_state, ssm_state = layer.allocate_inference_cache(0)
    assert layer.step(t(0, 8), conv_state, ssm_state).shape == (0, 8)
    # No new input: no output, and the state is left as it was.
    state = t(2, 6, 4)
    before = state.clone()
    assert ops.causal_conv1d_update(t(2, 6, 0), state, t(6, 4)).shape == (2, 6, 0)
    assert torch.equal(state, before)


# ---------------------------------------------------------------------------
# NaN in data tensors propagates as documented, on every backend
# ---------------------------------------------------------------------------
def _with_nan(kw, name, index):
    kw = dict(kw)
    kw[name] = kw[name].clone()
    kw[name][index] = nan
    return kw


def _mask(shape, *index):
    m = torch.zeros(shape, dtype=torch.bool)
    m[index] = True
    return m


# (tensor, where the NaN goes, where out [2, 6, 7] is NaN, where last [2, 6, 3] is NaN); grouped B/C: G=3
_ALL = slice(None)
SCAN_NAN = [
    ("u", (1, 2, 3), (1, 2, slice(3, None)), (1, 2, _ALL)),
    ("delta", (0, 4, 0), (0, 4, _ALL), (0, 4, _ALL)),
    ("B", (1, 2, 4), (1, _ALL, slice(4, None)), (1, _ALL, 2)),  # variable [batch, N, L]
    ("Bg", (0, 1, 0, 5), (0, slice(2, 4), slice(5, None)), (0, slice(2, 4), 0)),  # group 1 = channels 2, 3
    ("Bc", (3, 1), (_ALL, 3, _ALL), (_ALL, 3, 1)),  # constant [dim, N]: every step
    ("C", (0, 1, 2), (0, _ALL, 2), None),
    ("Cg", (1, 2, 0, 6), (1, slice(4, 6), 6), None),
    ("z", (1, 5, 6), (1, 5, 6), None),
    ("D", (2,), (_ALL, 2, _ALL), None),
    ("A", (1, 2), (_ALL, 1, _ALL), (_ALL, 1, 2)),
    ("delta_bias", (5,), (_ALL, 5, _ALL), (_ALL, 5, _ALL)),
    ("initial_state", (0, 3, 1), (0, 3, _ALL), (0, 3, 1)),
]


@pytest.mark.parametrize("device,backend", backend_cases("selective_scan"))
@pytest.mark.parametrize("name,index,out_nan,last_nan", SCAN_NAN, ids=[r[0] for r in SCAN_NAN])
def test_scan_nan_propagation(device, backend, name, index, out_nan, last_nan):
    kw = dict(u=t(2, 6, 7), delta=t(2, 6, 7), A=-torch.rand(6, 3), B=t(2, 3, 7), C=t(2, 3, 7), D=t(6),
              z=t(2, 6, 7), delta_bias=t(6), delta_softplus=True, initial_state=t(2, 6, 3))  # fmt: skip
    arg = name[0] if name[0] in "BC" else name
    if name.endswith("g"):
        kw[arg] = t(2, 3, 3, 7)
    elif name.endswith("c"):
        kw[arg] = t(6, 3)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out, last = ops.selective_scan(**_with_nan(kw, arg, index), return_last_state=True, backend=backend)
    assert torch.equal(out.isnan().cpu(), _mask((2, 6, 7), *out_nan))
    want_last = torch.zeros(2, 6, 3, dtype=torch.bool) if last_nan is None else _mask((2, 6, 3), *last_nan)
    assert torch.equal(last.isnan().cpu(), want_last)


# (tensor, where the NaN goes, where y [2, 6] is NaN, where the new state [2, 6, 3] is NaN)
STEP_NAN = [
    ("state", (1, 2, 0), (1, 2), (1, 2, 0)),
    ("x", (0, 3), (0, 3), (0, 3, _ALL)),
    ("dt", (1, 5), (1, 5), (1, 5, _ALL)),
    ("A", (4, 2), (_ALL, 4), (_ALL, 4, 2)),
    ("B", (0, 1), (0, _ALL), (0, _ALL, 1)),
    ("dt_bias", (0,), (_ALL, 0), (_ALL, 0, _ALL)),
    ("C", (1, 2), (1, _ALL), None),
    ("z", (0, 0), (0, 0), None),
    ("D", (3,), (_ALL, 3), None),
]


@pytest.mark.parametrize("device,backend", backend_cases("selective_state_update", grad=False))
@pytest.mark.parametrize("name,index,y_nan,state_nan", STEP_NAN, ids=[r[0] for r in STEP_NAN])
def test_state_update_nan_propagation(device, backend, name, index, y_nan, state_nan):
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _step().items()}
    kw = _with_nan(kw, name, index)
    y = ops.selective_state_update(**kw, backend=backend)
    assert torch.equal(y.isnan().cpu(), _mask((2, 6), *y_nan))
    want = torch.zeros(2, 6, 3, dtype=torch.bool) if state_nan is None else _mask((2, 6, 3), *state_nan)
    assert torch.equal(kw["state"].isnan().cpu(), want)


@pytest.mark.parametrize("device,backend", backend_cases("causal_conv1d"))
def test_conv_nan_propagation(device, backend):
    width, L = 4, 9
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _conv().items()}
    conv = lambda **c: ops.causal_conv1d(**{**kw, **c}, return_final_states=True, backend=backend)
    # x at step 2: the outputs whose window [t - 3, t] holds it, 2..5.
    out, final = conv(**_with_nan(kw, "x", (1, 4, 2)))
    assert torch.equal(out.isnan().cpu(), _mask((2, 6, L), 1, 4, slice(2, 2 + width)))
    assert not final.isnan().any()
    # x at step 7: outputs 7 and 8, and the final states keep it (they are inputs 6..8).
    out, final = conv(**_with_nan(kw, "x", (0, 1, 7)))
    assert torch.equal(out.isnan().cpu(), _mask((2, 6, L), 0, 1, slice(7, None)))
    assert torch.equal(final.isnan().cpu(), _mask((2, 6, 3), 0, 1, 1))
    # initial_states position 1 is input -2: read by outputs 0 and 1.
    out, _ = conv(**_with_nan(kw, "initial_states", (0, 0, 1)))
    assert torch.equal(out.isnan().cpu(), _mask((2, 6, L), 0, 0, slice(0, 2)))
    for name, index in (("weight", (3, 0)), ("bias", (3,))):
        out, final = conv(**_with_nan(kw, name, index))
        assert torch.equal(out.isnan().cpu(), _mask((2, 6, L), _ALL, 3, _ALL)), name
        assert not final.isnan().any(), name


@pytest.mark.parametrize("device,backend", backend_cases("causal_conv1d_update", grad=False))
def test_conv_update_nan_leaves_after_S_steps(device, backend):
    width = S = 4
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _conv_update().items()}
    state, x = kw.pop("conv_state"), kw.pop("x")
    x[1, 2] = nan
    y = ops.causal_conv1d_update(x, state, **kw, backend=backend)
    assert torch.equal(y.isnan().cpu(), _mask((2, 6), 1, 2))
    for step in range(1, S + 1):
        y = ops.causal_conv1d_update(t(2, 6).to(device), state, **kw, backend=backend)
        # read while it is among the last `width` inputs, kept while among the last S
        assert bool(y[1, 2].isnan()) == (step < width) and y.isnan().sum() == int(step < width)
        assert bool(state.isnan().any()) == (step < S)
    for name, index in (("weight", (5, 3)), ("bias", (5,))):
        y = ops.causal_conv1d_update(x.nan_to_num(), state, **_with_nan(kw, name, index), backend=backend)
        assert torch.equal(y.isnan().cpu(), _mask((2, 6), _ALL, 5)), name


def test_mamba_nan_token_spoils_itself_and_later_tokens():
    layer = _layer()
    x = t(2, 7, 8)
    x[1, 3, 5] = nan
    out = layer(x)
    assert torch.equal(out.isnan(), _mask((2, 7, 8), 1, slice(3, None), _ALL))
    # Decoding token by token: the same, and the states keep it.
    conv_state, ssm_state = layer.allocate_inference_cache(2)
    ys = torch.stack([layer.step(x[:, i], conv_state, ssm_state) for i in range(7)], 1)
    assert torch.equal(ys.isnan(), out.isnan())
    assert ssm_state[1].isnan().all() and not ssm_state[0].isnan().any()

"""torch.library registration of the selective-scan ops: opcheck, torch.compile, and the backend
that each public function resolves and hands to every op it runs."""

import pytest
import torch

from frontiers_fast import _backend
from frontiers_fast.ops import ssm as ops

from ..helpers import assert_close, check_compiled, first_cpu_backend, opcheck, spy_backends
from .inputs import scan_inputs

tops = torch.ops.frontiers_fast
f64 = torch.float64
ORDER = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "initial_state"]
SCAN = first_cpu_backend("selective_scan")
CONV = first_cpu_backend("causal_conv1d")


def _scan_args(kw, grad=True):
    args = []
    for k in ORDER:
        v = kw.get(k, False if k == "delta_softplus" else None)
        if isinstance(v, torch.Tensor) and grad:
            v = v.clone().requires_grad_(True)
        args.append(v)
    return (*args, SCAN)


@pytest.mark.parametrize("layout,options", [("variable", True), ("grouped", True), ("constant", False)])
def test_opcheck_selective_scan(layout, options):
    kw = scan_inputs(batch=2, dim=4, N=3, L=5, layout=layout, options=options, groups=2)
    opcheck(tops.selective_scan, _scan_args(kw))
    args = _scan_args(kw, grad=False)
    out, last = tops.selective_scan(*args)
    grads = (torch.randn_like(out), torch.randn_like(last))
    opcheck(tops.selective_scan_bwd, (*args[:-1], *grads, SCAN), full=False)
    opcheck(tops.selective_scan_bwd, (*args[:-1], grads[0], None, SCAN), full=False)


def test_opcheck_half_scan():
    kw = scan_inputs(batch=2, dim=4, N=3, L=5, layout="variable", dtype=torch.bfloat16)
    opcheck(tops.selective_scan, _scan_args(kw, grad=False), full=False)


@pytest.mark.parametrize("with_extras", [False, True])
def test_opcheck_causal_conv1d(with_extras):
    x, w = torch.randn(2, 3, 7, dtype=f64), torch.randn(3, 4, dtype=f64)
    b = torch.randn(3, dtype=f64) if with_extras else None
    init = torch.randn(2, 3, 3, dtype=f64) if with_extras else None
    args = (x, w, b, init, with_extras, CONV)
    grad_args = tuple(t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args)
    opcheck(tops.causal_conv1d, grad_args)
    out, final = tops.causal_conv1d(*args)
    opcheck(
        tops.causal_conv1d_bwd, (*args[:-1], torch.randn_like(out), torch.randn_like(final), CONV), full=False
    )


def test_opcheck_decoding_steps():
    kw = scan_inputs(batch=2, dim=4, N=3, L=1, layout="grouped", groups=2)
    state = torch.randn(2, 4, 3, dtype=f64)
    step = (state, kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0],
            kw["D"], kw["z"][..., 0], kw["delta_bias"], True, first_cpu_backend("selective_state_update"))  # fmt: skip
    opcheck(tops.selective_state_update, step)
    conv_state = torch.randn(2, 4, 4, dtype=f64)
    w, b = torch.randn(4, 4, dtype=f64), torch.randn(4, dtype=f64)
    backend = first_cpu_backend("causal_conv1d_update")
    opcheck(tops.causal_conv1d_update, (torch.randn(2, 4, dtype=f64), conv_state, w, b, True, backend))
    opcheck(tops.causal_conv1d_update, (torch.randn(2, 4, 3, dtype=f64), conv_state, w, None, False, backend))


def test_compile_fullgraph_conv_then_scan():
    kw = scan_inputs(batch=2, dim=4, N=3, L=8, layout="variable", dtype=torch.float32)
    w = torch.randn(4, 4, requires_grad=True)
    leaves = [kw[k].clone().requires_grad_(True) for k in ("u", "delta", "A", "B", "C", "D")]

    def model(w, u, delta, A, B, C, D):
        x = ops.causal_conv1d(u, w, activation="silu")
        out, last = ops.selective_scan(x, delta, A, B, C, D, z=u, delta_bias=kw["delta_bias"],
                                       delta_softplus=True, return_last_state=True)  # fmt: skip
        return out.square().sum() + last.sum()

    check_compiled(model, [w, *leaves])


def test_compile_fullgraph_decoding_step():
    # No gradients here, but the states are graph inputs written in place:
    # the compiled step must write them back as eager does.
    torch._dynamo.reset()
    kw = scan_inputs(batch=2, dim=4, N=3, L=1, layout="variable", dtype=torch.float32)
    args = [kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0]]
    conv_w = torch.randn(4, 4)

    def step(state, conv_state, x, dt, A, B, C):
        x = ops.causal_conv1d_update(x, conv_state, conv_w, activation="silu")
        return ops.selective_state_update(state, x, dt, A, B, C, dt_softplus=True)

    s1, c1 = kw["initial_state"].float().clone(), torch.randn(2, 4, 3)
    s2, c2 = s1.clone(), c1.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(s1, c1, *args)
    want = step(s2, c2, *args)
    assert_close(got, want)
    assert_close(s1, s2)
    assert_close(c1, c2)


# ---------------------------------------------------------------------------
# backends: each public function resolves once and every op it runs gets that backend
# ---------------------------------------------------------------------------
def _calls():
    """Per public function: a call with inputs that require grad where it has autograd."""
    kw = scan_inputs(batch=2, dim=4, N=3, L=5, layout="variable", dtype=torch.float32)
    step = dict(state=torch.randn(2, 4, 3), x=torch.randn(2, 4), dt=torch.rand(2, 4), A=-torch.rand(4, 3),
                B=torch.randn(2, 3), C=torch.randn(2, 3))  # fmt: skip
    leaf = lambda t: t.clone().requires_grad_(True)
    return {
        "selective_scan": lambda **b: ops.selective_scan(
            **{k: leaf(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}, **b
        ),  # fmt: skip
        "causal_conv1d": lambda **b: ops.causal_conv1d(
            leaf(kw["u"]), torch.randn(4, 3), activation="silu", **b
        ),
        "selective_state_update": lambda **b: ops.selective_state_update(**step, **b),
        "causal_conv1d_update": lambda **b: ops.causal_conv1d_update(
            torch.randn(2, 4), torch.randn(2, 4, 3), torch.randn(4, 3), **b
        ),  # fmt: skip
    }


FUNCTIONS = ["selective_scan", "causal_conv1d", "selective_state_update", "causal_conv1d_update"]


@pytest.mark.parametrize("function", FUNCTIONS)
def test_registered(function):
    spec = _backend.FUNCTIONS[function]
    assert spec.implemented(True) == ("reference",)
    assert first_cpu_backend(function) == "reference"


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("forced", ["cpp", "triton", "cuda"])
def test_unimplemented_backend_is_refused(function, forced):
    with pytest.raises(NotImplementedError, match=rf"frontiers_fast\.{function}: backend '{forced}'"):
        _calls()[function](backend=forced)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_unknown_backend_is_refused(function):
    with pytest.raises(ValueError, match="backend must be one of"):
        _calls()[function](backend="fast")


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_every_op_runs_the_resolved_backend(function, backend):
    spec = _backend.FUNCTIONS[function]
    with spy_backends() as calls:
        out = _calls()[function](backend=backend)
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad:
            out.sum().backward()
    want = {(op, "reference") for op in spec.ops + (spec.grad_ops if out.requires_grad else ())}
    assert set(calls) == want, calls
    assert all(n == 1 for n in calls.values()), calls


def test_use_backend_block_is_honoured():
    with _backend.use_backend("reference"), spy_backends() as calls:
        _calls()["selective_scan"]()
    assert set(calls) == {("selective_scan", "reference")}
    with (
        _backend.use_backend("cpp"),
        pytest.raises(NotImplementedError, match="frontiers_fast.selective_scan"),
    ):
        _calls()["selective_scan"]()

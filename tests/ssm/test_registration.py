"""torch.library registration of the selective-scan ops: opcheck, torch.compile, and the backend
that each public function resolves and hands to every op it runs."""

import pytest
import torch

from frontiers_fast import _backend
from frontiers_fast.ops import ssm as ops

from ..helpers import assert_close, backends_for, check_compiled, first_cpu_backend, opcheck, spy_backends
from .inputs import scan_inputs

tops = torch.ops.frontiers_fast
f64 = torch.float64
ORDER = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "initial_state", "cu_seqlens"]
PARAMS = ("A", "D", "delta_bias", "initial_state")  # in the accumulate dtype


def _scan_args(kw, backend, grad=True):
    acc = torch.float64 if kw["u"].dtype == f64 else torch.float32
    args = []
    for k in ORDER:
        v = kw.get(k, False if k == "delta_softplus" else None)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            if k in PARAMS or v.dim() == 2:
                v = v.to(acc)
            if grad:
                v = v.clone().requires_grad_(True)
        args.append(v)
    return (*args, backend)


@pytest.mark.parametrize("backend", backends_for("selective_scan", "cpu"))
@pytest.mark.parametrize("layout,options", [("variable", True), ("grouped", True), ("constant", False)])
def test_opcheck_selective_scan(layout, options, backend):
    kw = scan_inputs(batch=2, dim=4, N=3, L=5, layout=layout, options=options, groups=2)
    opcheck(tops.selective_scan, _scan_args(kw, backend))
    args = _scan_args(kw, backend, grad=False)
    out, last = tops.selective_scan(*args)
    grads = (torch.randn_like(out), torch.randn_like(last))
    opcheck(tops.selective_scan_bwd, (*args[:-1], *grads, backend), full=False)
    opcheck(tops.selective_scan_bwd, (*args[:-1], grads[0], None, backend), full=False)


@pytest.mark.parametrize("backend", backends_for("selective_scan", "cpu"))
def test_opcheck_packed_scan(backend):
    kw = scan_inputs(batch=1, dim=4, N=3, L=9, layout="variable")
    kw["initial_state"] = torch.randn(3, 4, 3, dtype=f64)
    kw["cu_seqlens"] = torch.tensor([0, 4, 4, 9])
    opcheck(tops.selective_scan, _scan_args(kw, backend))
    args = _scan_args(kw, backend, grad=False)
    out, last = tops.selective_scan(*args)
    opcheck(tops.selective_scan_bwd, (*args[:-1], torch.randn_like(out), torch.randn_like(last), backend),
            full=False)  # fmt: skip


@pytest.mark.parametrize("backend", backends_for("selective_scan", "cpu"))
def test_opcheck_half_scan(backend):
    kw = scan_inputs(batch=2, dim=4, N=3, L=5, layout="variable", dtype=torch.bfloat16)
    opcheck(tops.selective_scan, _scan_args(kw, backend, grad=False), full=False)


@pytest.mark.parametrize("backend", backends_for("causal_conv1d", "cpu"))
@pytest.mark.parametrize("with_extras", [False, True])
def test_opcheck_causal_conv1d(with_extras, backend):
    x, w = torch.randn(2, 3, 7, dtype=f64), torch.randn(3, 4, dtype=f64)
    b = torch.randn(3, dtype=f64) if with_extras else None
    init = torch.randn(2, 3, 3, dtype=f64) if with_extras else None
    args = (x, w, b, init, with_extras, None, backend)
    grad_args = tuple(t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args)
    opcheck(tops.causal_conv1d, grad_args)
    out, final = tops.causal_conv1d(*args)
    opcheck(
        tops.causal_conv1d_bwd,
        (*args[:-1], torch.randn_like(out), torch.randn_like(final), backend),
        full=False,
    )
    packed = (x[:1], w, b, init, with_extras, torch.tensor([0, 2, 7]), backend)
    opcheck(tops.causal_conv1d, packed, full=False)


@pytest.mark.parametrize("backend", backends_for("selective_state_update", "cpu", grad=False))
def test_opcheck_decoding_steps(backend):
    # the multi-head form, through a state cache
    state = torch.randn(5, 4, 2, 3, dtype=f64)
    x, dt, z = (torch.randn(2, 4, 2, dtype=f64) for _ in range(3))
    A = -torch.rand(4, 2, 3, dtype=f64)
    B, C = torch.randn(2, 2, 3, dtype=f64), torch.randn(2, 2, 3, dtype=f64)
    D, dt_bias = torch.randn(4, 2, dtype=f64), torch.randn(4, 2, dtype=f64)
    step = (state, x, dt, A, B, C, D, z, dt_bias, True, torch.tensor([3, 0]), backend)
    opcheck(tops.selective_state_update, step)
    opcheck(tops.selective_state_update, (state[:2], x, dt, A, B, C, None, None, None, False, None, backend))


@pytest.mark.parametrize("backend", backends_for("causal_conv1d_update", "cpu", grad=False))
def test_opcheck_conv_update(backend):
    conv_state = torch.randn(2, 4, 4, dtype=f64)
    w, b = torch.randn(4, 4, dtype=f64), torch.randn(4, dtype=f64)
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


def test_compile_fullgraph_packed_and_multihead():
    # packed sequences through conv and scan, and a multi-head step into a state cache, in one graph
    torch._dynamo.reset()
    kw = scan_inputs(batch=1, dim=4, N=3, L=12, layout="variable", dtype=torch.float32)
    cu = torch.tensor([0, 5, 5, 12])
    w = torch.randn(4, 4, requires_grad=True)
    leaves = [kw[k].clone().requires_grad_(True) for k in ("u", "delta", "A", "B", "C")]

    def model(w, u, delta, A, B, C):
        x = ops.causal_conv1d(u, w, activation="silu", cu_seqlens=cu)
        out, last = ops.selective_scan(x, delta, A, B, C, delta_softplus=True, return_last_state=True,
                                       cu_seqlens=cu)  # fmt: skip
        return out.square().sum() + last.sum()

    check_compiled(model, [w, *leaves])

    state = torch.randn(6, 4, 2, 3)
    x, dt = torch.randn(2, 4, 2), torch.rand(2, 4, 2)
    A, B, C = -torch.rand(4, 2, 3), torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    rows = torch.tensor([5, 1])

    def step(state, x, dt, A, B, C):
        return ops.selective_state_update(state, x, dt, A, B, C, dt_softplus=True, state_batch_indices=rows)

    s1, s2 = state.clone(), state.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(s1, x, dt, A, B, C)
    assert_close(got, step(s2, x, dt, A, B, C))
    assert torch.equal(s1, s2)
    # bad offsets are refused inside the compiled graph too (the op bodies check them)
    bad = torch.tensor([0, 7, 5, 12])
    f = torch.compile(
        lambda u: ops.causal_conv1d(u, w.detach(), cu_seqlens=bad), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(ValueError, match="cu_seqlens must not decrease"):
        f(kw["u"])


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
    want = (
        ("reference", "triton", "cpp", "cuda")
        if function == "selective_scan"
        else ("reference", "triton", "cpp")
    )
    assert set(spec.implemented(False)) == set(want)
    # the CUDA kernel has the scan's forward only
    assert set(spec.implemented(True)) == {"reference", "triton", "cpp"}
    assert first_cpu_backend(function) == "cpp"


@pytest.mark.parametrize("function", FUNCTIONS)
def test_cuda_backend_refused_where_missing(function):
    if function == "selective_scan":  # forward only: refused when the inputs require grad
        with pytest.raises(NotImplementedError, match=r"backend 'cuda' is not implemented for its backward"):
            _calls()[function](backend="cuda")
        return
    with pytest.raises(NotImplementedError, match=rf"frontiers_fast\.{function}: backend 'cuda'"):
        _calls()[function](backend="cuda")


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("forced", ["triton"])
def test_gpu_backend_on_cpu_tensors_is_refused(function, forced):
    with pytest.raises(
        ValueError, match=rf"frontiers_fast\.{function}: backend '{forced}' runs on CUDA tensors"
    ):
        _calls()[function](backend=forced)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_unknown_backend_is_refused(function):
    with pytest.raises(ValueError, match="backend must be one of"):
        _calls()[function](backend="fast")


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("backend", [None, "reference", "cpp"])
def test_every_op_runs_the_resolved_backend(function, backend):
    spec = _backend.FUNCTIONS[function]
    with spy_backends() as calls:
        out = _calls()[function](backend=backend)
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad:
            out.sum().backward()
    ran = backend or "cpp"
    want = {(op, ran) for op in spec.ops + (spec.grad_ops if out.requires_grad else ())}
    assert set(calls) == want, calls
    assert all(n == 1 for n in calls.values()), calls


def test_use_backend_block_is_honoured():
    with _backend.use_backend("reference"), spy_backends() as calls:
        _calls()["selective_scan"]()
    assert set(calls) == {("selective_scan", "reference")}
    with _backend.use_backend("cpp"), spy_backends() as calls:
        _calls()["selective_scan"]()
    assert set(calls) == {("selective_scan", "cpp")}
    with (
        _backend.use_backend("cuda"),
        pytest.raises(NotImplementedError, match="frontiers_fast.selective_scan"),
    ):
        _calls()["selective_scan"]()

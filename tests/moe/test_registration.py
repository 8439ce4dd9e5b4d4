"""Op registration: opcheck (schema, fake, autograd), the backend argument, gradcheck and torch.compile."""

import pytest
import torch

from frontiers_fast import _backend
from frontiers_fast.ops import moe
from frontiers_fast.reference import moe as ref

from ..helpers import assert_close, check_compiled, first_cpu_backend, opcheck, spy_backends
from .naive import random_moe

ops = torch.ops.frontiers_fast
B = first_cpu_backend("fused_moe")
f64 = torch.float64
FUNCTIONS = ("moe_route", "moe_permute", "moe_unpermute", "fused_moe")


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("backend", ["reference", B])
def test_opcheck_route(backend):
    logits = torch.randn(9, 8, dtype=f64, requires_grad=True)
    bias = torch.randn(8, dtype=f64)
    opcheck(ops.moe_route, (logits, 2, "softmax", True, None, None, None, 1.0, backend))
    opcheck(ops.moe_route, (logits, 3, "sigmoid", True, bias, 4, 2, 2.5, backend))
    opcheck(ops.moe_route, (logits.float(), 1, "sigmoid", False, None, 2, 1, 1.0, backend))
    w, ids = ops.moe_route(logits.detach(), 3, "sigmoid", True, bias, 4, 2, 2.5, backend)
    for scoring, renorm in (("sigmoid", True), ("softmax", False)):
        args = (logits.detach(), ids, torch.randn_like(w), scoring, renorm, 2.5, backend)
        opcheck(ops.moe_route_bwd, args, full=False)


@pytest.mark.parametrize("backend", ["reference", B])
def test_opcheck_dispatch_ops(backend):
    x = torch.randn(11, 6, dtype=f64, requires_grad=True)
    _, ids = ref.moe_route(torch.randn(11, 5), 2)
    opcheck(ops.moe_permute, (x, ids, 7, backend))
    x_perm, _, row_map = ops.moe_permute(x.detach(), ids, 7, backend)
    opcheck(ops.moe_permute_bwd, (torch.randn_like(x_perm), row_map, backend), full=False)
    y = _leaf(torch.randn_like(x_perm))
    w = torch.rand(11, 2, dtype=f64, requires_grad=True)
    opcheck(ops.moe_unpermute, (y, row_map, w, backend))
    go = torch.randn(11, 6, dtype=f64)
    for need in ((True, True), (True, False), (False, True)):
        opcheck(ops.moe_unpermute_bwd, (y.detach(), row_map, w.detach(), go, *need, backend), full=False)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("backend", ["reference", B])
def test_opcheck_fused_moe(activation, backend):
    x, wgu, wd, logits = random_moe(10, 6, 4, 5, f64)
    w, ids = ref.moe_route(logits, 2)
    leaves = [_leaf(t) for t in (x, wgu, wd, w)]
    opcheck(ops.fused_moe, (*leaves, ids, activation, backend))
    go = torch.randn(10, 6, dtype=f64)
    for need in ((True, True, True, True), (False, True, False, True), (True, False, True, False)):
        opcheck(ops.fused_moe_bwd, (x, wgu, wd, w, ids, go, activation, *need, backend), full=False)


def test_registry():
    for name in FUNCTIONS:
        spec = _backend.FUNCTIONS[name]
        assert spec.ops == (name,) and spec.grad_ops == (f"{name}_bwd",)
        assert spec.implemented(True) == ("triton", "cpp", "reference")
    # The CUDA extension has the routing and the permutation's forward (no backward).
    for name in ("moe_route", "moe_permute"):
        assert _backend.FUNCTIONS[name].implemented(False) == ("triton", "cuda", "cpp", "reference")
    assert B == "cpp"


def _calls():
    """One call per public function, differentiable inputs included: name -> f(backend)."""
    x, wgu, wd, logits = random_moe(6, 8, 5, 4)
    w, ids = ref.moe_route(logits, 2)
    x_perm, _, row_map = ref.moe_permute(x, ids, 4)
    # Leaves, so that each backward runs the one function's backward op.
    x, wgu, wd, logits, w, x_perm = (_leaf(t) for t in (x, wgu, wd, logits, w, x_perm))
    return {
        "moe_route": lambda b: moe.moe_route(logits, 2, backend=b)[0],
        "moe_permute": lambda b: moe.moe_permute(x, ids, 4, backend=b)[0],
        "moe_unpermute": lambda b: moe.moe_unpermute(x_perm, row_map, w, backend=b),
        "fused_moe": lambda b: moe.fused_moe(x, wgu, wd, w, ids, backend=b),
    }


@pytest.mark.parametrize("name", FUNCTIONS)
def test_backend_argument(name):
    call = _calls()[name]
    # The GPU backends refuse CPU tensors, naming the backend and the device.
    for b in ("triton", "cuda"):
        with pytest.raises(
            (NotImplementedError, ValueError), match=rf"frontiers_fast\.{name}: backend '{b}'"
        ):
            call(b)
    with pytest.raises(ValueError, match="backend must be one of"):
        call("fast")
    assert torch.equal(call("cpp"), call(None))  # the CPU default
    assert_close(call("cpp"), call("reference"))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_backward_runs_the_forward_backend(name, backend):
    call = _calls()[name]
    with spy_backends() as calls:
        out = call(backend)
        out.backward(torch.randn_like(out))
    assert calls == {(name, backend): 1, (f"{name}_bwd", backend): 1}


def test_compile_fullgraph():
    x, wgu, wd, _ = random_moe(12, 8, 6, 4)
    router = torch.randn(4, 8)
    bias = torch.randn(4) * 0.1
    leaves = [_leaf(t) for t in (x, router, wgu, wd)]

    def model(x, router, wgu, wd):
        w, ids = moe.moe_route(x @ router.T, 2, "sigmoid", correction_bias=bias, n_group=2, topk_group=1)
        x_perm, _, row_map = moe.moe_permute(x, ids, 4)
        y = moe.fused_moe(x, wgu, wd, w, ids) + moe.moe_unpermute(x_perm, row_map, w)
        return y.pow(2).sum()

    check_compiled(model, leaves)


def test_value_checks_run_in_the_ops_and_under_compile():
    # The public functions skip their data checks while torch.compile traces;
    # the op implementations repeat them, so the compiled path still raises.
    torch._dynamo.reset()
    x, wgu, wd, logits = random_moe(4, 3, 2, 4)
    w = torch.rand(4, 2)
    bad_ids = torch.tensor([[0, 5], [1, 2], [3, 0], [2, 1]], dtype=torch.int32)  # 5 >= E = 4
    ninf = float("-inf")
    cases = [
        (lambda x, i: moe.moe_permute(x, i, 4), (x, bad_ids), r"ids must lie in \[0, 3\] \(there are 4 experts\)"),
        (lambda x, i: moe.fused_moe(x, wgu, wd, w, i), (x, bad_ids), r"ids must lie in \[0, 3\] \(there are 4 experts\)"),
        (lambda y, m: moe.moe_unpermute(y, m, w), (torch.randn(8, 3), torch.tensor([[0, 1]] * 3 + [[2, 8]])),
         r"row_map must lie in \[0, 7\] \(y has 8 rows\)"),
        (lambda lg: moe.moe_route(lg, 1), (torch.tensor([[float("nan"), 0.0, 1.0, 2.0]]),), "logits must not contain NaN"),
        (lambda lg: moe.moe_route(lg, 2), (torch.tensor([[ninf, 0.0, ninf, ninf]]),), "fewer than top_k=2 selectable"),
        (lambda lg: moe.moe_route(lg, 1, correction_bias=torch.tensor([0.0, float("nan"), 0.0, 0.0])), (logits,),
         "correction_bias must be finite"),
    ]  # fmt: skip
    for fn, args, match in cases:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        with pytest.raises(ValueError, match=match):
            compiled(*args)
    # and the registered ops check on their own
    with pytest.raises(ValueError, match="ids must lie in"):
        ops.moe_permute(x, bad_ids, 4, B)
    with pytest.raises(ValueError, match="ids must lie in"):
        ops.fused_moe(x, wgu, wd, w, bad_ids, "silu", B)
    with pytest.raises(ValueError, match="logits must not contain NaN"):
        ops.moe_route(torch.tensor([[float("nan"), 0.0]]), 1, "softmax", True, None, None, None, 1.0, B)
    # Good inputs, -inf masks included, still compile and agree with eager.
    masked = logits.clone()
    masked[:, 1] = ninf
    route = lambda lg: moe.moe_route(lg, 2, "sigmoid", correction_bias=torch.ones(4))
    got = torch.compile(route, fullgraph=True, backend="aot_eager")(masked)
    want = route(masked)
    assert torch.equal(got[1], want[1]) and (got[1] != 1).all()
    assert_close(got[0], want[0])


@pytest.mark.gradcheck
@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=2),
        dict(top_k=1, renormalize=False, scaling=0.5),
        dict(top_k=8, scoring="sigmoid"),
        dict(top_k=3, scoring="sigmoid", bias=True, n_group=4, topk_group=2, scaling=2.5),
        dict(top_k=3, n_group=2, topk_group=1),
    ],
)
def test_gradcheck_route(kw):
    kw = dict(kw)
    bias = torch.randn(8, dtype=f64) if kw.pop("bias", False) else None
    logits = torch.randn(6, 8, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda lg: moe.moe_route(lg, correction_bias=bias, **kw)[0], (logits,))


@pytest.mark.gradcheck
def test_gradcheck_permute_unpermute():
    x = torch.randn(7, 3, dtype=f64, requires_grad=True)
    ids = torch.randint(0, 4, (7, 3))  # repeats and idle experts allowed
    w = torch.rand(7, 3, dtype=f64, requires_grad=True)

    def fn(x, w):
        x_perm, _, row_map = moe.moe_permute(x, ids, 4)
        return moe.moe_unpermute(x_perm.sin(), row_map, w)

    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.gradcheck
@pytest.mark.parametrize(
    "T,E,k,allowed,activation",
    [(5, 4, 2, None, "silu"), (1, 4, 2, None, "gelu"), (6, 4, 1, None, "silu"), (3, 3, 3, None, "silu"),
     (6, 5, 2, [0, 3, 4], "silu")],
)  # fmt: skip
def test_gradcheck_fused_moe(T, E, k, allowed, activation):
    x, wgu, wd, logits = random_moe(T, 4, 3, E, f64)
    if allowed is not None:
        mask = torch.full((E,), -30.0, dtype=f64)
        mask[allowed] = 0.0
        logits = logits + mask
    w, ids = moe.moe_route(logits, k)
    leaves = [_leaf(t) for t in (x, wgu, wd, w)]
    assert torch.autograd.gradcheck(lambda *a: moe.fused_moe(*a, ids, activation), leaves)


@pytest.mark.gradcheck
def test_gradcheck_router_through_experts():
    x, wgu, wd, _ = random_moe(5, 4, 3, 4, f64)
    router = torch.randn(4, 4, dtype=f64, requires_grad=True)

    def fn(x, router):
        w, ids = moe.moe_route(x @ router.T, 2)
        return moe.fused_moe(x, wgu, wd, w, ids)

    assert torch.autograd.gradcheck(fn, (_leaf(x), router))

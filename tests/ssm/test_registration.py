"""torch.library registration of the selective-scan ops: opcheck and torch.compile."""

import pytest
import torch

from frontiers_fast.ops import ssm as ops

from ..helpers import assert_close
from .inputs import scan_inputs

tops = torch.ops.frontiers_fast
f64 = torch.float64
ALL = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
PLAIN = ("test_schema", "test_faketensor")
ORDER = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "initial_state"]


def _scan_args(kw, grad=True):
    args = []
    for k in ORDER:
        v = kw.get(k, False if k == "delta_softplus" else None)
        if isinstance(v, torch.Tensor) and grad:
            v = v.clone().requires_grad_(True)
        args.append(v)
    return tuple(args)


@pytest.mark.parametrize("layout,options", [("variable", True), ("grouped", True), ("constant", False)])
def test_opcheck_selective_scan(layout, options):
    kw = scan_inputs(batch=2, dim=4, N=3, L=5, layout=layout, options=options, groups=2)
    torch.library.opcheck(tops.selective_scan, _scan_args(kw), test_utils=ALL)
    args = _scan_args(kw, grad=False)
    out, last = tops.selective_scan(*args)
    grads = (torch.randn_like(out), torch.randn_like(last))
    torch.library.opcheck(tops.selective_scan_bwd, (*args, *grads), test_utils=PLAIN)
    torch.library.opcheck(tops.selective_scan_bwd, (*args, grads[0], None), test_utils=PLAIN)


def test_opcheck_half_scan():
    kw = scan_inputs(batch=2, dim=4, N=3, L=5, layout="variable", dtype=torch.bfloat16)
    torch.library.opcheck(tops.selective_scan, _scan_args(kw, grad=False), test_utils=PLAIN)


@pytest.mark.parametrize("with_extras", [False, True])
def test_opcheck_causal_conv1d(with_extras):
    x, w = torch.randn(2, 3, 7, dtype=f64), torch.randn(3, 4, dtype=f64)
    b = torch.randn(3, dtype=f64) if with_extras else None
    init = torch.randn(2, 3, 3, dtype=f64) if with_extras else None
    args = (x, w, b, init, with_extras)
    grad_args = tuple(t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(tops.causal_conv1d, grad_args, test_utils=ALL)
    out, final = tops.causal_conv1d(*args)
    torch.library.opcheck(
        tops.causal_conv1d_bwd, (*args, torch.randn_like(out), torch.randn_like(final)), test_utils=PLAIN
    )


def test_opcheck_decoding_steps():
    kw = scan_inputs(batch=2, dim=4, N=3, L=1, layout="grouped", groups=2)
    state = torch.randn(2, 4, 3, dtype=f64)
    step = (state, kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0],
            kw["D"], kw["z"][..., 0], kw["delta_bias"], True)  # fmt: skip
    torch.library.opcheck(tops.selective_state_update, step, test_utils=ALL)
    conv_state = torch.randn(2, 4, 4, dtype=f64)
    w, b = torch.randn(4, 4, dtype=f64), torch.randn(4, dtype=f64)
    torch.library.opcheck(tops.causal_conv1d_update, (torch.randn(2, 4, dtype=f64), conv_state, w, b, True),
                          test_utils=ALL)  # fmt: skip
    torch.library.opcheck(tops.causal_conv1d_update, (torch.randn(2, 4, 3, dtype=f64), conv_state, w, None, False),
                          test_utils=ALL)  # fmt: skip


def test_compile_fullgraph_conv_then_scan():
    torch._dynamo.reset()
    kw = scan_inputs(batch=2, dim=4, N=3, L=8, layout="variable", dtype=torch.float32)
    w = torch.randn(4, 4, requires_grad=True)
    leaves = {k: kw[k].clone().requires_grad_(True) for k in ("u", "delta", "A", "B", "C", "D")}

    def model(w, u, delta, A, B, C, D):
        x = ops.causal_conv1d(u, w, activation="silu")
        out, last = ops.selective_scan(x, delta, A, B, C, D, z=u, delta_bias=kw["delta_bias"],
                                       delta_softplus=True, return_last_state=True)  # fmt: skip
        return out.square().sum() + last.sum()

    inputs = [w, *leaves.values()]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    got_g = torch.autograd.grad(got, inputs)
    want = model(*inputs)
    want_g = torch.autograd.grad(want, inputs)
    assert_close(got, want)
    for a, b in zip(got_g, want_g):
        assert_close(a, b)


def test_compile_fullgraph_decoding_step():
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

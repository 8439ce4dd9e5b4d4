"""torch.library registration: opcheck (schema, fake, autograd) and torch.compile."""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.reference import gnn as ref

from ..conftest import assert_close
from .graphs import random_graph

ops = torch.ops.frontiers_fast


def _graph_tensors(g):
    return (g.rowptr, g.col, *g.csc)


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                               "test_aot_dispatch_dynamic"))  # fmt: skip


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_opcheck_spmm(reduce):
    g = random_graph(23, 90)
    x = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(g.num_edges, 2, dtype=torch.float64, requires_grad=True)
    _opcheck(ops.spmm, (*_graph_tensors(g), w, x, reduce))
    _opcheck(ops.spmm, (*_graph_tensors(g), None, x, reduce))


def test_opcheck_sddmm_softmax_gat():
    g = random_graph(19, 70, 11)
    a = torch.randn(19, 2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 2, 4, dtype=torch.float64, requires_grad=True)
    _opcheck(ops.sddmm, (*_graph_tensors(g), a, b))
    s = torch.randn(g.num_edges, 3, dtype=torch.float64, requires_grad=True)
    _opcheck(ops.edge_softmax, (g.rowptr, s))
    h = torch.randn(19, 2, 5, dtype=torch.float64, requires_grad=True)
    asrc = torch.randn(19, 2, dtype=torch.float64, requires_grad=True)
    adst = torch.randn(11, 2, dtype=torch.float64, requires_grad=True)
    _opcheck(ops.gat_aggregate, (*_graph_tensors(g), h, asrc, adst, 0.2))


def test_opcheck_kernel_ops():
    g = random_graph(17, 60)
    x = torch.randn(17, 4, dtype=torch.float64)
    w = torch.rand(g.num_edges, 1, dtype=torch.float64)
    plain = ("test_schema", "test_faketensor")
    for reduce in ["sum", "max"]:
        torch.library.opcheck(ops.spmm_fwd, (g.rowptr, g.col, w, x, reduce), test_utils=plain)
        out, arg = ops.spmm_fwd(g.rowptr, g.col, w, x, reduce)
        go = torch.randn_like(out)
        torch.library.opcheck(
            ops.spmm_bwd, (*g.csc, g.rowptr, g.col, w, x, go, arg, reduce, True, True), test_utils=plain
        )
    s = torch.randn(g.num_edges, 2, dtype=torch.float64)
    p = ops.edge_softmax_fwd(g.rowptr, s)
    torch.library.opcheck(ops.edge_softmax_fwd, (g.rowptr, s), test_utils=plain)
    torch.library.opcheck(ops.edge_softmax_bwd, (g.rowptr, p, torch.randn_like(p)), test_utils=plain)
    h = torch.randn(17, 2, 3, dtype=torch.float64)
    a1, a2 = torch.randn(17, 2, dtype=torch.float64), torch.randn(17, 2, dtype=torch.float64)
    torch.library.opcheck(ops.sddmm_fwd, (g.rowptr, g.col, h, h), test_utils=plain)
    torch.library.opcheck(ops.gat_fwd, (g.rowptr, g.col, h, a1, a2, 0.2), test_utils=plain)
    out, lse = ops.gat_fwd(g.rowptr, g.col, h, a1, a2, 0.2)
    torch.library.opcheck(
        ops.gat_bwd,
        (g.rowptr, g.col, *g.csc, h, a1, a2, 0.2, out, lse, torch.randn_like(out)),
        test_utils=plain,
    )


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    g = random_graph(41, 200)
    _ = g.csc  # build the transpose outside the compiled region
    x = torch.randn(41, 2, 8, requires_grad=True)
    s = torch.randn(41, 2, requires_grad=True)
    d = torch.randn(41, 2, requires_grad=True)
    w = torch.rand(g.num_edges, requires_grad=True)

    def model(x, s, d, w):
        y = ff.gat_aggregate(g, x, s, d)
        y = ff.spmm(g, y.reshape(41, 16), w, "max")
        e = ff.sddmm(g, y.view(41, 2, 8), y.view(41, 2, 8))
        return y.sum() + ff.edge_softmax(g, e).pow(2).sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x, s, d, w)
    gx = torch.autograd.grad(got, [x, s, d, w])
    want = model(x, s, d, w)
    wx = torch.autograd.grad(want, [x, s, d, w])
    assert_close(got, want)
    for a, b in zip(gx, wx):
        assert_close(a, b)


def test_compile_inductor_layer():
    torch._dynamo.reset()
    g = random_graph(41, 200)
    conv = ff.nn.SAGEConv(8, 4, aggr="max")
    x = torch.randn(41, 8)
    compiled = torch.compile(lambda x: conv(x, g), fullgraph=True)
    assert_close(compiled(x), conv(x, g))


@pytest.mark.gradcheck
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_gradcheck_spmm(reduce):
    g = random_graph(9, 30)
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(g.num_edges, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: ff.spmm(g, x, w, reduce), (x, w))


@pytest.mark.gradcheck
def test_gradcheck_gat_sddmm_softmax():
    g = random_graph(9, 30, 6)
    h = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    d = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, s, d: ff.gat_aggregate(g, h, s, d, 0.3), (h, s, d))
    b = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, b: ff.sddmm(g, h, b), (h, b))
    e = torch.randn(g.num_edges, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: ff.edge_softmax(g, e), (e,))


def test_reference_gradcheck():
    g = random_graph(8, 25)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ref.spmm(g, x, None, "mean"), (x,))

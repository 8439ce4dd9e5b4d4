"""torch.library registration: opcheck (schema, fake, autograd) and torch.compile."""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast._reduce import MAX, REDUCES
from frontiers_fast.reference import gnn as ref

from ..helpers import assert_close, check_compiled, first_cpu_backend, opcheck
from .graphs import random_graph

ops = torch.ops.frontiers_fast
B = first_cpu_backend("spmm")


def _graph_tensors(g):
    return (g.rowptr, g.col, *g.csc)


@pytest.mark.parametrize("reduce", range(len(REDUCES)), ids=REDUCES)
def test_opcheck_spmm(reduce):
    g = random_graph(23, 90)
    x = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(g.num_edges, 2, dtype=torch.float64, requires_grad=True)
    opcheck(ops.spmm, (*_graph_tensors(g), g.csc_eid, w, g.perm, x, reduce, B))
    opcheck(ops.spmm, (*_graph_tensors(g), None, w, None, x, reduce, B))
    opcheck(ops.spmm, (*_graph_tensors(g), None, None, None, x, reduce, B))


def test_opcheck_sddmm_softmax_gat():
    g = random_graph(19, 70, 11)
    a = torch.randn(19, 2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 2, 4, dtype=torch.float64, requires_grad=True)
    opcheck(ops.sddmm, (*_graph_tensors(g), a, b, B))
    s = torch.randn(g.num_edges, 3, dtype=torch.float64, requires_grad=True)
    opcheck(ops.edge_softmax, (g.rowptr, s, B))
    h = torch.randn(19, 2, 5, dtype=torch.float64, requires_grad=True)
    asrc = torch.randn(19, 2, dtype=torch.float64, requires_grad=True)
    adst = torch.randn(11, 2, dtype=torch.float64, requires_grad=True)
    opcheck(ops.gat_aggregate, (*_graph_tensors(g), h, asrc, adst, 0.2, B))


def test_opcheck_kernel_ops():
    g = random_graph(17, 60)
    x = torch.randn(17, 4, dtype=torch.float64)
    w = torch.rand(g.num_edges, 1, dtype=torch.float64)
    for reduce in (0, MAX):
        opcheck(ops.spmm_fwd, (g.rowptr, g.col, w, g.perm, x, reduce, B), full=False)
        out, arg = ops.spmm_fwd(g.rowptr, g.col, w, g.perm, x, reduce, B)
        go = torch.randn_like(out)
        args = (*g.csc, g.rowptr, g.col, w, g.perm, g.csc_eid, x, go, arg, reduce, True, True, B)
        opcheck(ops.spmm_bwd, args, full=False)
    s = torch.randn(g.num_edges, 2, dtype=torch.float64)
    p = ops.edge_softmax_fwd(g.rowptr, s, B)
    opcheck(ops.edge_softmax_fwd, (g.rowptr, s, B), full=False)
    opcheck(ops.edge_softmax_bwd, (g.rowptr, p, torch.randn_like(p), B), full=False)
    h = torch.randn(17, 2, 3, dtype=torch.float64)
    a1, a2 = torch.randn(17, 2, dtype=torch.float64), torch.randn(17, 2, dtype=torch.float64)
    opcheck(ops.sddmm_fwd, (g.rowptr, g.col, h, h, B), full=False)
    opcheck(ops.gat_fwd, (g.rowptr, g.col, h, a1, a2, 0.2, B), full=False)
    out, lse = ops.gat_fwd(g.rowptr, g.col, h, a1, a2, 0.2, B)
    opcheck(
        ops.gat_bwd, (g.rowptr, g.col, *g.csc, h, a1, a2, 0.2, out, lse, torch.randn_like(out), B), full=False
    )
    keys = torch.randint(0, 9, (50,))
    opcheck(ops.stable_bucket_sort, (keys, 9, B), full=False)


def test_compile_fullgraph_cpu():
    g = random_graph(41, 200)
    _ = g.csc  # build the transpose outside the compiled region

    def model(x, s, d, w):
        y = ff.gat_aggregate(g, x, s, d)
        y = ff.spmm(g, y.reshape(41, 16), w, "max")
        e = ff.sddmm(g, y.view(41, 2, 8), y.view(41, 2, 8))
        return y.sum() + ff.edge_softmax(g, e).pow(2).sum()

    leaves = [torch.randn(41, 2, 8), torch.randn(41, 2), torch.randn(41, 2), torch.rand(g.num_edges)]
    check_compiled(model, [t.requires_grad_(True) for t in leaves])


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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck_kernel_ops_on_cuda(backend):
    """Every GPU implementation of a GNN kernel op passes opcheck on CUDA tensors (gpu_check.sh runs this)."""
    from frontiers_fast import _backend

    dev = "cuda"
    g = random_graph(17, 60, device=dev)
    x = torch.randn(17, 4, dtype=torch.float64, device=dev)
    w = torch.rand(g.num_edges, 2, dtype=torch.float64, device=dev)
    h = torch.randn(17, 2, 3, dtype=torch.float64, device=dev)
    a1, a2 = (
        torch.randn(17, 2, dtype=torch.float64, device=dev),
        torch.randn(17, 2, dtype=torch.float64, device=dev),
    )
    s = torch.randn(g.num_edges, 2, dtype=torch.float64, device=dev)
    out, arg = ops.spmm_fwd(g.rowptr, g.col, w, g.perm, x, MAX, "reference")
    p = ops.edge_softmax_fwd(g.rowptr, s, "reference")
    gout, lse = ops.gat_fwd(g.rowptr, g.col, h, a1, a2, 0.2, "reference")
    cases = {
        "spmm_fwd": (g.rowptr, g.col, w, g.perm, x, MAX),
        "spmm_bwd": (
            *g.csc,
            g.rowptr,
            g.col,
            w,
            g.perm,
            g.csc_eid,
            x,
            torch.randn_like(out),
            arg,
            MAX,
            True,
            True,
        ),
        "sddmm_fwd": (g.rowptr, g.col, h, h),
        "edge_softmax_fwd": (g.rowptr, s),
        "edge_softmax_bwd": (g.rowptr, p, torch.randn_like(p)),
        "gat_fwd": (g.rowptr, g.col, h, a1, a2, 0.2),
        "gat_bwd": (g.rowptr, g.col, *g.csc, h, a1, a2, 0.2, gout, lse, torch.randn_like(gout)),
    }
    ran = 0
    for name, args in cases.items():
        if backend in _backend.OPS[name].impls:
            opcheck(getattr(ops, name), (*args, backend), full=False)
            ran += 1
    assert ran, f"no GNN kernel op has a {backend} implementation"

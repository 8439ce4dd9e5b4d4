"""Bad and edge inputs thrown at every public GNN function and layer, one class per row.

Each row names the exception and a fragment of its message: the argument at
fault must be named.  The NaN rows check that NaN in the data propagates the
same way on every backend as the reference (the op docstrings say how).
"""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.nn import GATConv, GCNConv, GINConv, SAGEConv
from frontiers_fast.reference import gnn as ref

from ..helpers import assert_close, backend_cases
from .graphs import random_graph

EI = torch.tensor([[0, 1, 2, 2], [1, 2, 0, 1]])
META = torch.device("meta")


def _g():
    return ff.Graph(EI, 3)


# (id, callable, exception, message fragment)
CASES = [
    # Graph
    ("graph-list", lambda: ff.Graph([[0, 1], [1, 0]], 2), TypeError, "edge_index"),
    ("graph-float", lambda: ff.Graph(EI.float(), 3), TypeError, "edge_index"),
    ("graph-bool", lambda: ff.Graph(EI.bool(), 3), TypeError, "edge_index"),
    ("graph-dims", lambda: ff.Graph(EI[0], 3), ValueError, r"edge_index.*\[2, E\]"),
    ("graph-rows", lambda: ff.Graph(torch.zeros(3, 4, dtype=torch.long), 3), ValueError, r"edge_index"),
    ("graph-meta", lambda: ff.Graph(EI.to(META), 3), ValueError, "edge_index is a meta tensor"),
    ("graph-negative", lambda: ff.Graph(torch.tensor([[0, -1], [1, 0]]), 2), ValueError, "negative"),
    ("graph-range", lambda: ff.Graph(EI, 2), ValueError, r"edge_index\[0\].*out of range"),
    ("graph-num-nodes-float", lambda: ff.Graph(EI, 3.0), TypeError, "num_nodes"),
    ("graph-num-nodes-bool", lambda: ff.Graph(EI, True), TypeError, "num_nodes"),
    ("graph-num-nodes-negative", lambda: ff.Graph(EI, -3), ValueError, "num_nodes"),
    ("graph-num-nodes-pair", lambda: ff.Graph(EI, (3, 3, 3)), ValueError, "num_nodes"),
    ("graph-num-nodes-tensor", lambda: ff.Graph(EI, torch.tensor([3, 4])), ValueError, "num_nodes"),
    ("graph-num-nodes-huge", lambda: ff.Graph(EI, 10**13), ValueError, "num_nodes is too large"),
    # gcn_norm
    ("gcn-float", lambda: ff.gcn_norm(EI.float(), num_nodes=3), TypeError, "edge_index"),
    ("gcn-bool", lambda: ff.gcn_norm(EI.bool(), num_nodes=3), TypeError, "edge_index"),
    (
        "gcn-negative",
        lambda: ff.gcn_norm(torch.tensor([[0, -1], [1, 0]]), num_nodes=2),
        ValueError,
        "negative",
    ),
    ("gcn-range", lambda: ff.gcn_norm(EI, num_nodes=2), ValueError, r"edge_index\[0\].*out of range"),
    ("gcn-weight-shape", lambda: ff.gcn_norm(EI, torch.ones(3), 3), ValueError, "edge_weight"),
    ("gcn-weight-int", lambda: ff.gcn_norm(EI, torch.ones(4, dtype=torch.long), 3), TypeError, "edge_weight"),
    ("gcn-dtype", lambda: ff.gcn_norm(EI, None, 3, dtype=torch.int32), TypeError, "dtype"),
    ("gcn-num-nodes-huge", lambda: ff.gcn_norm(EI, num_nodes=10**13), ValueError, "num_nodes is too large"),
    # spmm
    ("spmm-x-list", lambda: ff.spmm(_g(), [[1.0]] * 3), TypeError, "x must be a torch.Tensor"),
    (
        "spmm-x-int",
        lambda: ff.spmm(_g(), torch.ones(3, 2, dtype=torch.long)),
        TypeError,
        "x must be a floating",
    ),
    ("spmm-x-complex", lambda: ff.spmm(_g(), torch.ones(3, 2, dtype=torch.cfloat)), TypeError, "x must be"),
    ("spmm-x-dims", lambda: ff.spmm(_g(), torch.ones(3)), ValueError, "x must have"),
    ("spmm-x-rows", lambda: ff.spmm(_g(), torch.ones(4, 2)), ValueError, "x has 4 rows"),
    ("spmm-x-meta", lambda: ff.spmm(_g(), torch.ones(3, 2, device=META)), ValueError, "x is on meta"),
    (
        "spmm-w-meta",
        lambda: ff.spmm(_g(), torch.ones(3, 2), torch.ones(4, device=META)),
        ValueError,
        "edge_weight is on meta",
    ),
    ("spmm-w-len", lambda: ff.spmm(_g(), torch.ones(3, 2), torch.ones(5)), ValueError, "edge_weight has 5"),
    (
        "spmm-w-dtype",
        lambda: ff.spmm(_g(), torch.ones(3, 2), torch.ones(4, dtype=torch.float64)),
        TypeError,
        "edge_weight has dtype",
    ),
    (
        "spmm-reduce",
        lambda: ff.spmm(_g(), torch.ones(3, 2), reduce="prod"),
        ValueError,
        "reduce must be one of",
    ),
    (
        "spmm-reduce-type",
        lambda: ff.spmm(_g(), torch.ones(3, 2), reduce=1),
        ValueError,
        "reduce must be one of",
    ),
    (
        "spmm-backend",
        lambda: ff.spmm(_g(), torch.ones(3, 2), backend="fast"),
        ValueError,
        "backend must be one of",
    ),
    (
        "spmm-backend-device",
        lambda: ff.spmm(_g(), torch.ones(3, 2), backend="triton"),
        ValueError,
        "runs on CUDA tensors",
    ),
    (
        "spmm-backend-cuda",
        lambda: ff.spmm(_g(), torch.ones(3, 2), backend="cuda"),
        ValueError,
        "runs on CUDA tensors",
    ),
    # sddmm
    (
        "sddmm-b-dtype",
        lambda: ff.sddmm(_g(), torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64)),
        TypeError,
        "b has dtype",
    ),
    (
        "sddmm-shapes",
        lambda: ff.sddmm(_g(), torch.ones(3, 2), torch.ones(3, 3)),
        ValueError,
        "a and b must agree",
    ),
    ("sddmm-a-rows", lambda: ff.sddmm(_g(), torch.ones(2, 2), torch.ones(3, 2)), ValueError, "a has 2 rows"),
    (
        "sddmm-b-meta",
        lambda: ff.sddmm(_g(), torch.ones(3, 2), torch.ones(3, 2, device=META)),
        ValueError,
        "b is on meta",
    ),
    # edge_softmax
    ("softmax-len", lambda: ff.edge_softmax(_g(), torch.ones(3)), ValueError, "scores has 3 entries"),
    (
        "softmax-int",
        lambda: ff.edge_softmax(_g(), torch.ones(4, dtype=torch.long)),
        TypeError,
        "scores must be",
    ),
    ("softmax-dims", lambda: ff.edge_softmax(_g(), torch.ones(4, 2, 2)), ValueError, "scores must have"),
    # gat_aggregate
    (
        "gat-h-dims",
        lambda: ff.gat_aggregate(_g(), torch.ones(3, 4), torch.ones(3, 1), torch.ones(3, 1)),
        ValueError,
        "h must have",
    ),
    (
        "gat-src-shape",
        lambda: ff.gat_aggregate(_g(), torch.ones(3, 2, 4), torch.ones(3, 1), torch.ones(3, 2)),
        ValueError,
        "a_src must have shape",
    ),
    (
        "gat-dst-shape",
        lambda: ff.gat_aggregate(_g(), torch.ones(3, 2, 4), torch.ones(3, 2), torch.ones(2, 2)),
        ValueError,
        "a_dst must have shape",
    ),
    (
        "gat-slope-nan",
        lambda: ff.gat_aggregate(_g(), torch.ones(3, 1, 4), torch.ones(3, 1), torch.ones(3, 1), float("nan")),
        ValueError,
        "negative_slope must be finite",
    ),
    (
        "gat-slope-type",
        lambda: ff.gat_aggregate(_g(), torch.ones(3, 1, 4), torch.ones(3, 1), torch.ones(3, 1), "0.2"),
        TypeError,
        "negative_slope",
    ),
    # layers: constructors
    ("gcn-in", lambda: GCNConv(0, 4), ValueError, "in_channels"),
    ("gcn-out-float", lambda: GCNConv(4, 2.5), TypeError, "out_channels"),
    ("gcn-loops", lambda: GCNConv(4, 2, add_self_loops=True, normalize=False), ValueError, "add_self_loops"),
    ("gcn-kwarg", lambda: GCNConv(4, 2, flow="target_to_source"), TypeError, "unsupported arguments"),
    ("gat-heads", lambda: GATConv(4, 2, heads=0), ValueError, "heads"),
    ("gat-dropout", lambda: GATConv(4, 2, dropout=1.0), ValueError, "dropout"),
    ("gat-dropout-nan", lambda: GATConv(4, 2, dropout=float("nan")), ValueError, "dropout"),
    ("gat-slope", lambda: GATConv(4, 2, negative_slope=float("inf")), ValueError, "negative_slope"),
    ("gat-in-pair", lambda: GATConv((4, 0), 2), ValueError, r"in_channels\[1\]"),
    ("sage-aggr", lambda: SAGEConv(4, 2, aggr="median"), ValueError, "aggr must be one of"),
    ("sage-out", lambda: SAGEConv(4, -1), ValueError, "out_channels"),
    ("gin-nn-none", lambda: GINConv(None), TypeError, "nn must be"),
    ("gin-eps-nan", lambda: GINConv(torch.nn.Identity(), eps=float("nan")), ValueError, "eps must be finite"),
    ("gin-train-eps", lambda: GINConv(torch.nn.Identity(), train_eps="yes"), TypeError, "train_eps"),
    # layers: inputs
    (
        "gcn-x-width",
        lambda: GCNConv(4, 2)(torch.ones(3, 5), EI),
        ValueError,
        "x has last dimension 5.*in_channels=4",
    ),
    (
        "gcn-x-int",
        lambda: GCNConv(4, 2)(torch.ones(3, 4, dtype=torch.long), EI),
        TypeError,
        "x must be a floating",
    ),
    (
        "gat-x-width",
        lambda: GATConv(4, 2, heads=2)(torch.ones(3, 3), EI),
        ValueError,
        "x has last dimension 3.*in_channels=4",
    ),
    (
        "gat-x-int",
        lambda: GATConv(4, 2)(torch.ones(3, 4, dtype=torch.int32), EI),
        TypeError,
        "x must be a floating",
    ),
    (
        "sage-x-width",
        lambda: SAGEConv(4, 2)(torch.ones(3, 6), EI),
        ValueError,
        "x has last dimension 6.*in_channels=4",
    ),
    (
        "sage-pair-width",
        lambda: SAGEConv((4, 3), 2)((torch.ones(3, 4), torch.ones(3, 4)), EI),
        ValueError,
        "x_dst has last dimension 4.*in_channels=3",
    ),
    ("gin-x-list", lambda: GINConv(torch.nn.Identity())([[1.0]], EI), TypeError, "x must be a torch.Tensor"),
    ("layer-graph-type", lambda: SAGEConv(4, 2)(torch.ones(3, 4), [[0, 1], [1, 2]]), TypeError, "edge_index"),
    ("layer-graph-size", lambda: SAGEConv(4, 2)(torch.ones(4, 4), _g()), ValueError, "the graph has"),
]


@pytest.mark.parametrize("fn,exc,match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_empty_sizes_work():
    g = ff.Graph(torch.zeros(2, 0, dtype=torch.long), 4)
    assert torch.equal(ff.spmm(g, torch.ones(4, 3)), torch.zeros(4, 3))
    assert ff.edge_softmax(g, torch.ones(0, 2)).shape == (0, 2)
    assert ff.sddmm(g, torch.ones(4, 2), torch.ones(4, 2)).shape == (0,)
    assert torch.equal(
        ff.gat_aggregate(g, torch.ones(4, 1, 2), torch.ones(4, 1), torch.ones(4, 1)), torch.zeros(4, 1, 2)
    )
    g0 = ff.Graph(torch.zeros(2, 0, dtype=torch.long), 0)
    assert ff.spmm(g0, torch.ones(0, 3)).shape == (0, 3)
    assert GCNConv(3, 2)(torch.ones(0, 3), g0).shape == (0, 2)


def test_meta_features_give_meta_outputs():
    # Shapes only: a meta x on a graph built on the meta device is refused by Graph,
    # but the registered ops answer meta tensors through their fakes.
    g = _g()
    op = torch.ops.frontiers_fast.spmm_fwd
    out, arg = op(g.rowptr.to(META), g.col.to(META), None, None, torch.ones(3, 5, device=META), 2, "cpp")
    assert out.device.type == "meta" and out.shape == (3, 5) and arg.shape == (3, 5)


# ---------------------------------------------------------------------------
# NaN in the data: the same pattern on every backend as in the reference
# ---------------------------------------------------------------------------
def _nan_graph():
    g = random_graph(30, 200, skew=True)
    x = torch.randn(30, 2, 6, dtype=torch.float64)
    x[3, 0, 1] = float("nan")
    x[7, 1, :] = float("nan")
    return g, x


@pytest.mark.parametrize("device,backend", backend_cases("spmm"))
@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_nan_spmm(device, backend, reduce):
    g, x = _nan_graph()
    x = x.requires_grad_(True)
    w = torch.rand(g.num_edges, 2, dtype=torch.float64)
    w[[4, 17, 60], [0, 1, 1]] = float("nan")  # NaN weights too: data, not parameters
    w.requires_grad_(True)
    out = ff.spmm(g, x, w, reduce, backend=backend)
    want = ref.spmm(g, x, w, reduce)
    assert torch.isnan(want).any()
    assert_close(out, want, equal_nan=True)
    seed = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(out, [x, w], seed), torch.autograd.grad(want, [x, w], seed)):
        assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_cases("edge_softmax"))
def test_nan_edge_softmax(device, backend):
    g = random_graph(30, 200, skew=True)
    s = torch.randn(g.num_edges, 3, dtype=torch.float64)
    s[5, 1] = float("nan")
    out = ff.edge_softmax(g, s, backend=backend)
    want = ref.edge_softmax(g, s)
    assert torch.isnan(want).any() and not torch.isnan(want).all()
    assert_close(out, want, equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_cases("gat_aggregate"))
def test_nan_gat(device, backend):
    g, h = _nan_graph()
    a_src = torch.randn(30, 2, dtype=torch.float64)
    a_dst = torch.randn(30, 2, dtype=torch.float64)
    a_src[11, 0] = float("nan")
    out = ff.gat_aggregate(g, h, a_src, a_dst, backend=backend)
    want = ref.gat_aggregate(g, h, a_src, a_dst)
    assert torch.isnan(want).any() and not torch.isnan(want).all()
    assert_close(out, want, equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_cases("sddmm"))
def test_nan_sddmm(device, backend):
    g, a = _nan_graph()
    b = torch.randn(30, 2, 6, dtype=torch.float64)
    assert_close(ff.sddmm(g, a, b, backend=backend), ref.sddmm(g, a, b), equal_nan=True)


def test_graph_to_takes_a_device_and_num_nodes_must_agree():
    with pytest.raises(TypeError, match="Graph.to takes a device"):
        _g().to(torch.float64)
    assert _g().to("cpu").rowptr.dtype == torch.int64
    with pytest.raises(ValueError, match="num_nodes=99 disagrees"):
        ff.spmm(_g(), torch.ones(3, 2), num_nodes=99)
    assert ff.spmm(_g(), torch.ones(3, 2), num_nodes=3).shape == (3, 2)

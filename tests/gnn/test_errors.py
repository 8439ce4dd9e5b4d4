"""Bad input gets a clear error naming the argument, never a crash or a wrong answer."""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast import Graph

from .graphs import random_graph


@pytest.fixture
def g():
    return random_graph(10, 30)


@pytest.mark.parametrize(
    "edge_index,num_nodes,exc,match",
    [
        (torch.tensor([[0, 1], [1, 5]]), 3, ValueError, r"edge_index\[1\].*out of range"),
        (torch.tensor([[0, 7], [1, 2]]), 3, ValueError, r"edge_index\[0\].*out of range"),
        (torch.tensor([[0, -1], [1, 2]]), 3, ValueError, "negative"),
        (torch.tensor([[0, 1], [1, 2]]), -1, ValueError, "num_nodes"),
        (torch.tensor([[0.0, 1.0], [1.0, 2.0]]), 3, TypeError, "edge_index.*integer"),
        (torch.tensor([0, 1, 2]), 3, ValueError, r"edge_index.*\[2, E\]"),
        (torch.zeros(3, 4, dtype=torch.long), 3, ValueError, r"edge_index.*\[2, E\]"),
        ([[0, 1], [1, 2]], 3, TypeError, "edge_index"),
        (torch.tensor([[0, 1], [1, 2]]), 2.5, TypeError, "num_nodes"),
        (torch.tensor([[0, 1], [1, 2]]), (3, 2), ValueError, r"edge_index\[1\]"),
    ],
)
def test_graph_construction(edge_index, num_nodes, exc, match):
    with pytest.raises(exc, match=match):
        Graph(edge_index, num_nodes)


def test_spmm_bad_inputs(g):
    with pytest.raises(ValueError, match="x has 9 rows"):
        ff.spmm(g, torch.randn(9, 4))
    with pytest.raises(TypeError, match="x must be a floating"):
        ff.spmm(g, torch.randint(0, 3, (10, 4)))
    with pytest.raises(ValueError, match="x must have"):
        ff.spmm(g, torch.randn(10))
    with pytest.raises(ValueError, match="reduce"):
        ff.spmm(g, torch.randn(10, 4), reduce="prod")
    with pytest.raises(ValueError, match="edge_weight has"):
        ff.spmm(g, torch.randn(10, 4), torch.randn(29))
    with pytest.raises(TypeError, match="edge_weight has dtype"):
        ff.spmm(g, torch.randn(10, 4), torch.randn(g.num_edges, dtype=torch.float64))
    with pytest.raises(ValueError, match="edge_weight of shape"):
        ff.spmm(g, torch.randn(10, 4), torch.randn(g.num_edges, 2))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ff.spmm(g, [[1.0]])
    with pytest.raises(ValueError, match="backend"):
        ff.spmm(g, torch.randn(10, 4), backend="fast")
    with pytest.raises(ValueError, match="CUDA tensors"):
        ff.spmm(g, torch.randn(10, 4), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch(g):
    with pytest.raises(ValueError, match="x is on cuda"):
        ff.spmm(g, torch.randn(10, 4, device="cuda"))


def test_device_mismatch_meta(g):
    # A meta tensor stands in for "another device" on a CPU-only machine.
    with pytest.raises(ValueError, match="x is on meta"):
        ff.spmm(g, torch.randn(10, 4, device="meta"))
    with pytest.raises(ValueError, match="edge_weight is on meta"):
        ff.spmm(g, torch.randn(10, 4), torch.randn(g.num_edges, device="meta"))


def test_gat_bad_inputs(g):
    h, s, d = torch.randn(10, 2, 4), torch.randn(10, 2), torch.randn(10, 2)
    with pytest.raises(ValueError, match="a_src must have shape"):
        ff.gat_aggregate(g, h, torch.randn(10, 3), d)
    with pytest.raises(ValueError, match="a_dst must have shape"):
        ff.gat_aggregate(g, h, s, torch.randn(9, 2))
    with pytest.raises(ValueError, match="h must have 3"):
        ff.gat_aggregate(g, torch.randn(10, 8), s, d)
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        ff.gat_aggregate(g, h, s, d, float("nan"))
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        ff.gat_aggregate(g, h, s, d, float("inf"))
    with pytest.raises(TypeError, match="a_dst has dtype"):
        ff.gat_aggregate(g, h, s, d.double())
    with pytest.raises(ValueError, match="b has 9 rows"):
        ff.sddmm(g, h, h[:9])
    with pytest.raises(ValueError, match="scores has"):
        ff.edge_softmax(g, torch.randn(g.num_edges + 1))


def test_direct_kernel_op_checks(g):
    # The C++ kernels check their own arguments when called directly.
    if not ff.backends()["cpp"]["available"]:
        pytest.skip("C++ backend not built")
    ops = torch.ops.frontiers_fast
    x = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="reduce"):
        ops.spmm_fwd(g.rowptr, g.col, None, x, "prod")
    with pytest.raises(RuntimeError, match="weight"):
        ops.spmm_fwd(g.rowptr, g.col, torch.randn(g.num_edges, 3), x, "sum")
    with pytest.raises(RuntimeError, match="rowptr"):
        ops.spmm_fwd(g.rowptr.int(), g.col, None, x, "sum")


def test_layers_bad_inputs(g):
    with pytest.raises(NotImplementedError, match="edge_dim"):
        ff.nn.GATConv(4, 4, edge_dim=3)
    with pytest.raises(ValueError, match="aggr"):
        ff.nn.SAGEConv(4, 4, aggr="lstm")
    with pytest.raises(ValueError, match="dropout"):
        ff.nn.GATConv(4, 4, dropout=1.5)
    with pytest.raises(TypeError, match="edge_index"):
        ff.nn.GCNConv(4, 4)(torch.randn(10, 4), "edges")
    with pytest.raises(ValueError, match="graph has"):
        ff.nn.GCNConv(4, 4)(torch.randn(12, 4), g)

"""Layers against PyTorch Geometric on the same weights (state_dict loads unchanged)."""

import pytest
import torch

import frontiers_fast as ff

from ..helpers import assert_close
from .graphs import random_graph

pyg = pytest.importorskip("torch_geometric.nn")


def _pair(ours_cls, pyg_cls, *args, **kwargs):
    theirs = pyg_cls(*args, **kwargs)
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())  # strict: every name and shape must match
    return ours, theirs


def _compare(ours, theirs, x_inputs, edge_index, graph, **fw):
    out_t = theirs(*x_inputs, edge_index, **fw)
    for ei in (edge_index, graph):
        xs = [t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in x_inputs]
        out_o = ours(*xs, ei, **fw)
        assert_close(out_o, out_t, torch.float32)
        g = torch.randn_like(out_t)
        ps_o = [p for p in ours.parameters()]
        ps_t = [p for p in theirs.parameters()]
        got = torch.autograd.grad(out_o, ps_o, g, allow_unused=True)
        want = torch.autograd.grad(out_t, ps_t, g, retain_graph=True, allow_unused=True)
        names = [n for n, _ in ours.named_parameters()]
        for n, a, b in zip(names, got, want):
            if b is None:
                assert a is None or a.abs().max() == 0, n
                continue
            # parameter gradients are sums over all nodes: scale atol with the count
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * out_t.shape[0] ** 0.5, msg=n)


@pytest.fixture
def data():
    g = random_graph(61, 400, skew=True)
    return g, g.edge_index, torch.randn(61, 12)


@pytest.mark.parametrize("improved", [False, True])
@pytest.mark.parametrize("self_loops", [True, False])
def test_gcn(data, improved, self_loops):
    g, ei, x = data
    # put some explicit self-loops in, to exercise add_remaining_self_loops
    ei = torch.cat([ei, torch.tensor([[3, 5], [3, 5]])], 1)
    g = ff.Graph(ei, 61)
    ours, theirs = _pair(ff.nn.GCNConv, pyg.GCNConv, 12, 7, improved=improved, add_self_loops=self_loops)
    _compare(ours, theirs, [x], ei, g)
    w = torch.rand(ei.shape[1])
    assert_close(ours(x, ei, w), theirs(x, ei, w), torch.float32)


@pytest.mark.parametrize("heads,concat", [(1, True), (4, True), (3, False)])
@pytest.mark.parametrize("residual", [False, True])
def test_gat(data, heads, concat, residual):
    g, ei, x = data
    ours, theirs = _pair(ff.nn.GATConv, pyg.GATConv, 12, 5, heads=heads, concat=concat, residual=residual)
    _compare(ours, theirs, [x], ei, g)


def test_gat_bipartite_and_attention_weights():
    g = random_graph(30, 150, 20)
    xs, xd = torch.randn(30, 6), torch.randn(20, 9)
    ours, theirs = _pair(ff.nn.GATConv, pyg.GATConv, (6, 9), 4, heads=2)
    assert_close(ours((xs, xd), g), theirs((xs, xd), g.edge_index), torch.float32)
    out_o, (ei_o, a_o) = ours((xs, xd), g, return_attention_weights=True)
    out_t, (ei_t, a_t) = theirs((xs, xd), g.edge_index, return_attention_weights=True)
    assert_close(out_o, out_t, torch.float32)
    # same edge set: compare attention per (src, dst) after sorting
    ko = (ei_o[1] * 1000 + ei_o[0]).argsort(stable=True)
    kt = (ei_t[1] * 1000 + ei_t[0]).argsort(stable=True)
    assert torch.equal(ei_o[:, ko], ei_t[:, kt])
    assert_close(a_o[ko], a_t[kt], torch.float32)


@pytest.mark.parametrize("aggr", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("out_channels", [5, 20])
@pytest.mark.parametrize("normalize,project", [(False, False), (True, True)])
def test_sage(data, aggr, out_channels, normalize, project):
    g, ei, x = data
    ours, theirs = _pair(
        ff.nn.SAGEConv, pyg.SAGEConv, 12, out_channels, aggr=aggr, normalize=normalize, project=project
    )
    _compare(ours, theirs, [x], ei, g)


@pytest.mark.parametrize("train_eps", [False, True])
def test_gin(data, train_eps):
    g, ei, x = data
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    theirs = pyg.GINConv(mlp, eps=0.3, train_eps=train_eps)
    ours = ff.nn.GINConv(torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)),
                         eps=0.3, train_eps=train_eps)  # fmt: skip
    ours.load_state_dict(theirs.state_dict())
    _compare(ours, theirs, [x], ei, g)


def test_state_dict_keys_match():
    for ours, theirs in [
        (ff.nn.GCNConv(4, 5), pyg.GCNConv(4, 5)),
        (ff.nn.GATConv(4, 5, heads=2, residual=True), pyg.GATConv(4, 5, heads=2, residual=True)),
        (ff.nn.GATConv((4, 3), 5, heads=2), pyg.GATConv((4, 3), 5, heads=2)),
        (ff.nn.SAGEConv(4, 5, project=True), pyg.SAGEConv(4, 5, project=True)),
        (
            ff.nn.SAGEConv(4, 5, bias=False, root_weight=False),
            pyg.SAGEConv(4, 5, bias=False, root_weight=False),
        ),
    ]:
        so, st = ours.state_dict(), theirs.state_dict()
        assert list(so) == list(st)
        assert all(so[k].shape == st[k].shape for k in so)


@pytest.mark.parametrize("prebuilt", [False, True])
def test_gcn_float64_normalisation_is_float64(prebuilt):
    # The normalisation follows the features' dtype: a float64 layer matches the float64 formula.
    g = random_graph(40, 300)
    conv = ff.nn.GCNConv(6, 3).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    out = conv(x, g if prebuilt else g.edge_index)
    ei = g.edge_index[:, g.edge_index[0] != g.edge_index[1]]
    loops = torch.arange(40)
    ei = torch.cat([ei, torch.stack([loops, loops])], 1)
    deg = torch.zeros(40, dtype=torch.float64).index_add(
        0, ei[1], torch.ones(ei.shape[1], dtype=torch.float64)
    )
    w = deg.pow(-0.5)[ei[0]] * deg.pow(-0.5)[ei[1]]
    h = conv.lin(x)
    want = torch.zeros(40, 3, dtype=torch.float64).index_add(0, ei[1], h[ei[0]] * w[:, None]) + conv.bias
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-13)

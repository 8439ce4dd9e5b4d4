"""pytest-benchmark suite for the GNN kernels, for tracking regressions:

    .venv/bin/python -m pytest benchmarks/gnn.py --benchmark-only --benchmark-json=out.json

The comparative report (peers, ratios, memory) is `python -m frontiers_fast.bench`;
this suite times our own kernels on fixed inputs so a change can be compared
with `--benchmark-compare`.
"""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.bench.gnn import skewed_graph

N, E, F = 20_000, 400_000, 64


@pytest.fixture(scope="module")
def graph():
    g = ff.Graph(skewed_graph(N, E), N)
    _ = g.csc  # build the transpose once, outside the timed region
    return g


@pytest.fixture(scope="module")
def feats():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, F, generator=gen), torch.rand(E, generator=gen) + 0.5


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_spmm_fwd(benchmark, graph, feats, reduce):
    x, w = feats
    benchmark(lambda: ff.spmm(graph, x, w, reduce))


def test_spmm_fwd_bwd(benchmark, graph, feats):
    x, w = feats
    xg = x.clone().requires_grad_(True)
    benchmark(lambda: torch.autograd.grad(ff.spmm(graph, xg, w).sum(), xg))


def test_gat_fwd_bwd(benchmark, graph):
    h = torch.randn(N, 4, 16, requires_grad=True)
    s = torch.randn(N, 4, requires_grad=True)
    d = torch.randn(N, 4, requires_grad=True)
    benchmark(lambda: torch.autograd.grad(ff.gat_aggregate(graph, h, s, d).sum(), [h, s, d]))


def test_graph_build(benchmark):
    ei = skewed_graph(N, E)
    benchmark(lambda: ff.Graph(ei, N).csc)

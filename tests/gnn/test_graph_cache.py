"""Graph.to_csr_order reorders static edge values once per (tensor, version)."""

import torch

import frontiers_fast as ff
from frontiers_fast.reference import gnn as ref

from ..conftest import assert_close
from .graphs import random_graph


def _unsorted_graph():
    g = random_graph(40, 300)
    assert not g.is_sorted
    return g


def test_cached_reorder_is_reused_and_correct():
    g = _unsorted_graph()
    w = torch.rand(g.num_edges) + 0.5
    first = g.to_csr_order(w)
    assert torch.equal(first, w.index_select(0, g.perm))
    assert g.to_csr_order(w) is first  # same tensor, same version: no second gather


def test_in_place_update_invalidates_the_cache():
    g = _unsorted_graph()
    x = torch.randn(40, 5)
    w = torch.rand(g.num_edges) + 0.5
    ff.spmm(g, x, w)
    w.mul_(torch.rand(g.num_edges) + 0.5)  # bumps the version counter
    assert_close(ff.spmm(g, x, w), ref.spmm(g, x, w))


def test_distinct_tensors_never_share_a_cached_copy():
    g = _unsorted_graph()
    x = torch.randn(40, 3)
    for _ in range(3):
        w = torch.rand(g.num_edges) + 0.5  # a fresh tensor may reuse a freed one's id
        assert_close(ff.spmm(g, x, w), ref.spmm(g, x, w))


def test_weights_that_need_grad_bypass_the_cache():
    g = _unsorted_graph()
    x = torch.randn(40, 4)
    w = (torch.rand(g.num_edges) + 0.5).requires_grad_(True)
    for _ in range(2):  # a cached copy would cut the graph (or reuse a freed one)
        (gw,) = torch.autograd.grad(ff.spmm(g, x, w).sum(), w)
        w64 = w.detach().double().requires_grad_(True)
        (gw64,) = torch.autograd.grad(ref.spmm(g, x.double(), w64).sum(), w64)
        assert_close(gw, gw64, dtype=torch.float32)


def test_inference_mode_tensors_are_reordered_without_caching():
    g = _unsorted_graph()
    x = torch.randn(40, 4)
    with torch.inference_mode():
        w = torch.rand(g.num_edges) + 0.5
        assert_close(ff.spmm(g, x, w), ref.spmm(g, x, w))

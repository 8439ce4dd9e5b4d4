"""Edge weights are read where they are on every call: never a stale copy.

The kernels read a weight in the user's edge order through the graph's
permutation (``weight_index``), so no reordered copy of it is kept anywhere:
a write that bypasses autograd's version counter (``w.data.mul_``, a numpy
view) is seen by the next call, eager or compiled.
"""

import numpy as np
import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.reference import gnn as ref

from ..helpers import assert_close, backend_cases, spy_backends
from .graphs import random_graph


def _unsorted_graph():
    g = random_graph(40, 300)
    assert not g.is_sorted
    return g


@pytest.mark.parametrize("device,backend", backend_cases("spmm"))
def test_write_through_data_is_seen(device, backend):
    g = _unsorted_graph()
    x = torch.randn(40, 5)
    w = torch.rand(g.num_edges) + 0.5
    assert_close(ff.spmm(g, x, w, backend=backend), ref.spmm(g, x, w))
    version = w._version
    w.data.mul_(2)  # no version bump
    assert w._version == version
    assert_close(ff.spmm(g, x, w, backend=backend), ref.spmm(g, x, w))


def test_write_through_numpy_is_seen():
    g = _unsorted_graph()
    x = torch.randn(40, 3)
    w = torch.rand(g.num_edges) + 0.5
    ff.spmm(g, x, w)
    w.numpy()[:] *= 3.0  # shares the memory, bypasses torch entirely
    assert_close(ff.spmm(g, x, w), ref.spmm(g, x, w))
    np.copyto(w.numpy(), np.linspace(0.5, 2.0, g.num_edges, dtype=np.float32))
    assert_close(ff.spmm(g, x, w), ref.spmm(g, x, w))


def test_gcnconv_without_normalisation_sees_new_weights():
    g = _unsorted_graph()
    conv = ff.nn.GCNConv(5, 4, normalize=False)
    x = torch.randn(40, 5)
    w = torch.rand(g.num_edges) + 0.5
    conv(x, g, w)
    w.data.mul_(-1.5)
    want = ref.spmm(g, conv.lin(x), w) + conv.bias
    assert_close(conv(x, g, w), want)


def test_compiled_call_sees_new_weights_and_gathers_nothing():
    torch._dynamo.reset()
    g = _unsorted_graph()
    x = torch.randn(40, 6)
    w = torch.rand(g.num_edges) + 0.5
    fn = torch.compile(lambda x, w: ff.spmm(g, x, w, "mean"), fullgraph=True, backend="aot_eager")
    assert_close(fn(x, w), ref.spmm(g, x, w, "mean"))
    w.data.mul_(0.25)
    assert_close(fn(x, w), ref.spmm(g, x, w, "mean"))


def test_weights_are_not_reordered_on_the_python_side(monkeypatch):
    # The weight reaches the kernel as given (plus a view), with the permutation beside it.
    g = _unsorted_graph()
    x = torch.randn(40, 4)
    w = torch.rand(g.num_edges) + 0.5
    seen = []
    with spy_backends() as calls:
        from frontiers_fast import _backend

        impl = _backend.OPS["spmm_fwd"].impls["cpp"]

        def look(rowptr, col, weight, weight_index, x_, reduce):
            seen.append((weight, weight_index))
            return impl(rowptr, col, weight, weight_index, x_, reduce)

        monkeypatch.setitem(_backend.OPS["spmm_fwd"].impls, "cpp", look)
        ff.spmm(g, x, w, backend="cpp")
    ((weight, weight_index),) = seen
    assert weight.data_ptr() == w.data_ptr()
    assert weight_index is g.perm
    assert calls[("spmm_fwd", "cpp")] == 1


@pytest.mark.parametrize("device,backend", backend_cases("spmm"))
@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_gradient_of_user_ordered_weights(device, backend, reduce):
    g = _unsorted_graph()
    x = torch.randn(40, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(g.num_edges, 3, dtype=torch.float64, requires_grad=True)
    out = ff.spmm(g, x, w, reduce, backend=backend)
    want = ref.spmm(g, x, w, reduce)
    seed = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(out, [x, w], seed), torch.autograd.grad(want, [x, w], seed)):
        assert_close(a, b)

"""``cuda_graph=True``: the solver steps captured once and replayed (frontiers_fast.reference.deq.GraphSteps).

A real capture needs a GPU (tests/deq/test_cuda.py runs it there).  Here the
loop runs with ``FakeGraphs``, which keeps what a CUDA graph does to the
loop's tensors and needs no GPU: a step's first use runs eagerly, its second
"captures" it, and every "replay" reruns the body on the one set of static
input buffers and writes the results into the outputs of the first replay,
in place.  A loop that fed a step an input without the static buffers'
copy, or whose results depended on a step's outputs read after the next
replay, would differ from the eager solve; so every solver, on batches whose samples converge at
different steps, diverge or never converge, must match ``cuda_graph=False``
bit for bit, with each key captured once.  Also the refusals: a CPU ``z0``,
a non-bool flag, and an ``f`` whose output shape changes at the capture.
"""

import pytest
import torch

from frontiers_fast.nn.deq import DEQFixedPoint
from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

from .cells import Poisoned, mixed_batch

pytestmark = pytest.mark.usefixtures("solve_backend")

SOLVERS = ["anderson", "broyden", "picard"]


class FakeGraphs(ref.GraphSteps):
    """A CUDA graph's effect on the loop's tensors, on any device."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def __call__(self, key, body, *inputs):
        self.keys.append(key)
        return super().__call__(key, body, *inputs)

    def _capture(self, body):
        return [body, None]

    def _replay(self, graph):
        body, out = graph
        res = body(*self.static)
        if out is None:
            graph[1] = res
            return res
        for o, r in zip(out, res):
            o.copy_(r)
        return out


def _solve(f, z0, cuda_graph, **kw):
    kernels = ops._loop_kernels(ops._backend.resolve(None, z0.device, "fixed_point_solve", False))
    opts = dict(max_iter=30, tol=1e-5, stop_mode="abs", m=3, lam=1e-4, tau=1.0, check_every=3, memory=None)
    opts.update(kw)
    return ref.solve_loop(f, z0, kernels=kernels, cuda_graph=cuda_graph, **opts)


def _same(a, b, msg):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=msg)


def _expected_keys(solver, steps, m):
    if solver == "anderson":
        return [i if i < m else m + i % m for i in range(steps)]
    return [()] * steps


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_graphs_equal_eager(solver, dtype, tau):
    f, z0 = mixed_batch(dtype, seed=11)
    tol = 1e-5 if dtype == torch.float32 else 1e-8
    z_e, info_e = _solve(f, z0, False, solver=solver, tol=tol, tau=tau, max_iter=50)
    graphs = FakeGraphs()
    z_g, info_g = _solve(f, z0, graphs, solver=solver, tol=tol, tau=tau, max_iter=50)
    assert int(info_e["nstep"].min()) < int(info_e["nstep"].max()), (
        "the samples should stop at different steps"
    )
    _same(z_g, z_e, "z")
    for key in info_e:
        _same(info_g[key], info_e[key], key)
    steps = len(graphs.keys)
    assert graphs.keys == _expected_keys(solver, steps, 3)
    # Each key: one eager run, one capture at its second use, replays from then on.
    distinct = set(graphs.keys)
    repeated = {k for k in distinct if graphs.keys.count(k) > 1}
    assert graphs.captures == len(repeated)
    assert graphs.replays == steps - len(distinct)
    assert graphs.replays > 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_graphs_with_diverging_and_unconverged_samples(solver):
    # One sample's f goes NaN at its fifth call, one never reaches tol (the masking path throughout).
    f, z0 = mixed_batch(torch.float64, B=4, seed=11)
    g = Poisoned(f, nan_from=5)
    runs = []
    for cuda_graph in (False, FakeGraphs()):
        g.calls = 0
        with pytest.warns(RuntimeWarning, match="1 of 4 samples diverged"):
            runs.append(_solve(g, z0, cuda_graph, solver=solver, tol=1e-9, max_iter=25))
    (z_e, info_e), (z_g, info_g) = runs
    assert bool(info_e["diverged"][1]) and not bool(info_e["diverged"][3])
    _same(z_g, z_e, "z")
    for key in info_e:
        _same(info_g[key], info_e[key], key)


def test_graphs_with_limited_memory_broyden():
    f, z0 = mixed_batch(torch.float64, seed=11)
    runs = [
        _solve(f, z0, cg, solver="broyden", tol=0.0, memory=4, max_iter=20) for cg in (False, FakeGraphs())
    ]
    (z_e, info_e), (z_g, info_g) = runs
    _same(z_g, z_e, "z")
    _same(info_g["abs_trace"], info_e["abs_trace"], "abs_trace")


@pytest.mark.parametrize("solver", SOLVERS)
def test_f_changing_shape_at_capture_is_named(solver):
    f, z0 = mixed_batch(torch.float64, seed=11)
    count = {"n": 0}

    def g(z):
        count["n"] += 1
        out = f(z)
        return out if count["n"] < 4 else out[:, :-1]

    with pytest.raises(ValueError, match="f must return a tensor of z0's shape"):
        _solve(g, z0, FakeGraphs(), solver=solver, tol=0.0, m=1)


def test_cpu_z0_is_refused():
    f, z0 = mixed_batch(torch.float64, seed=11)
    with pytest.raises(ValueError, match="cuda_graph=True .* needs a CUDA z0; z0 is on cpu"):
        ops.fixed_point_solve(f, z0, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True .* needs a CUDA z0"):
        ops.deq(f, z0, cuda_graph=True)

    class Cell(torch.nn.Module):
        def forward(self, z, x):
            return f(z) + 0 * x

    layer = DEQFixedPoint(Cell(), cuda_graph=True)  # the device is known at the call
    with pytest.raises(ValueError, match="cuda_graph=True .* needs a CUDA z0"):
        layer(z0)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_cuda_graph_must_be_bool(bad):
    f, z0 = mixed_batch(torch.float64, seed=11)
    with pytest.raises((TypeError, ValueError), match="cuda_graph"):
        ops.fixed_point_solve(f, z0, cuda_graph=bad)
    with pytest.raises((TypeError, ValueError), match="cuda_graph"):
        ops.deq(f, z0, cuda_graph=bad)

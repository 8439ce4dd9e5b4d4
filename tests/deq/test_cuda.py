"""The fixed-point solver on a CUDA device: the Triton loop kernels compiled for it, and ``cuda_graph=True``.

- The Triton backend against the reference on the same CUDA inputs, at
  every step of the trace (``tol = 0`` and a fixed number of steps, so both
  run the same steps), in float32 and float64, for every solver, Broyden's
  limited memory included.
- ``cuda_graph=True`` against ``cuda_graph=False``: for an elementwise ``f``
  the same kernels run in the same order, so the results are equal bit for
  bit, on batches whose samples stop at different steps; for an ``f`` with a
  matrix product (cuBLAS may pick another algorithm on the capture stream),
  to the dtype's tolerance, with the same step counts.  Graphs are really
  captured and replayed; the layer's forward with an implicit backward gives
  the same gradient; an ``f`` that syncs with the host is refused with an
  error that names ``cuda_graph``.

Needs a CUDA device (benchmarks/gpu_check.sh runs it on a GPU machine); the
CPU side of ``cuda_graph`` (its bookkeeping, with a stand-in for the graphs,
and the refusals) is tests/deq/test_cuda_graph.py.
"""

import subprocess
import sys

import pytest
import torch

from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

from ..helpers import assert_close

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
SOLVERS = ["anderson", "broyden", "picard"]


def _cell(B, D, dtype, elementwise=False, seed=3):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rate = torch.linspace(0.05, 0.9, B, dtype=dtype)[:, None].to(DEV)  # the samples stop at different steps
    x = torch.randn(B, D, generator=g, dtype=dtype).to(DEV)
    if elementwise:
        return (lambda z: rate * torch.tanh(z + x)), torch.randn(B, D, generator=g, dtype=dtype).to(DEV)
    W = torch.randn(D, D, generator=g, dtype=dtype)
    W = (0.9 * W / torch.linalg.matrix_norm(W, 2)).to(DEV)
    return (lambda z: rate * torch.tanh(z @ W.T + x)), torch.randn(B, D, generator=g, dtype=dtype).to(DEV)


class CountingGraphs(ref.GraphSteps):
    pass


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory", [None, 4])
def test_triton_loop_matches_reference(solver, dtype, memory):
    if memory is not None and solver != "broyden":
        pytest.skip("memory is Broyden's")
    f, z0 = _cell(16, 96, dtype)
    kw = dict(solver=solver, tol=0.0, max_iter=20, m=4, memory=memory)
    z_t, info_t = ops.fixed_point_solve(f, z0, backend="triton", **kw)
    z_r, info_r = ops.fixed_point_solve(f, z0, backend="reference", **kw)
    assert_close(z_t, z_r, dtype)
    assert_close(info_t["abs_trace"], info_r["abs_trace"], dtype)
    assert_close(info_t["rel_trace"], info_r["rel_trace"], dtype)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("check_every", [1, 4])
def test_cuda_graph_equals_eager(solver, dtype, check_every):
    f, z0 = _cell(32, 256, dtype, elementwise=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    kw = dict(solver=solver, tol=tol, max_iter=60, m=3, check_every=check_every)
    z_e, info_e = ops.fixed_point_solve(f, z0, **kw)
    z_g, info_g = ops.fixed_point_solve(f, z0, cuda_graph=True, **kw)
    assert int(info_e["nstep"].min()) < int(info_e["nstep"].max())
    torch.testing.assert_close(z_g, z_e, rtol=0, atol=0)
    for key in info_e:
        torch.testing.assert_close(info_g[key], info_e[key], rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_graph_captures_and_replays(solver):
    f, z0 = _cell(8, 64, torch.float32)
    graphs = CountingGraphs()
    kernels = ops._loop_kernels("triton")
    opts = dict(solver=solver, max_iter=30, tol=0.0, stop_mode="abs", m=3, lam=1e-4, tau=1.0, check_every=4)
    z_g, info_g = ref.solve_loop(f, z0, kernels=kernels, cuda_graph=graphs, memory=None, **opts)
    z_e, info_e = ref.solve_loop(f, z0, kernels=kernels, cuda_graph=False, memory=None, **opts)
    assert graphs.captures == (3 if solver == "anderson" else 1)
    assert graphs.replays == (30 - 6 if solver == "anderson" else 29)
    assert_close(z_g, z_e, torch.float32)
    assert_close(info_g["abs_trace"], info_e["abs_trace"], torch.float32)


def test_cuda_graph_layer_gradient():
    B, D = 16, 64
    g = torch.Generator(device="cpu").manual_seed(9)
    W = torch.nn.Parameter((0.5 * torch.randn(D, D, generator=g) / D**0.5).to(DEV))
    x = torch.randn(B, D, generator=g).to(DEV)
    grads = []
    for cuda_graph in (False, True):
        W.grad = None
        z, info = ops.deq(
            lambda z: torch.tanh(z @ W.T + x), torch.zeros(B, D, device=DEV), cuda_graph=cuda_graph
        )
        z.square().sum().backward()
        grads.append((z.detach(), W.grad.clone(), info["nstep"]))
    (z_e, g_e, n_e), (z_g, g_g, n_g) = grads
    assert torch.equal(n_g, n_e)
    assert_close(z_g, z_e, torch.float32)
    assert_close(g_g, g_e, torch.float32)


def test_cuda_graph_refuses_an_f_that_syncs():
    # In a child process: a capture that fails leaves this process's CUDA state to the driver's
    # mercy, and the tests after this one must not pay for it.
    code = """
import pytest, torch
from frontiers_fast.ops import deq as ops
z0 = torch.randn(8, 64, device="cuda")
def g(z):
    if float(z.abs().max()) > 1e6:  # a host read: not capturable
        raise AssertionError("unreachable")
    return torch.tanh(0.5 * z + 1)
with pytest.raises(RuntimeError, match="cuda_graph=True"):
    ops.fixed_point_solve(g, z0, solver="picard", tol=0.0, max_iter=5, cuda_graph=True)
print("refused")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "refused" in out.stdout, out.stdout + out.stderr

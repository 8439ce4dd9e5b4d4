"""The solver options of the on-device loop: ``check_every`` and Broyden's ``memory``.

- ``check_every`` (the host reads the convergence masks every k steps): the
  solution and every info entry equal reading them every step, bit for bit,
  for each solver, in float32 and float64, on batches whose samples converge
  at different steps, diverge, or never converge; the layer's forward and its
  implicit and phantom gradients too; and f runs at most k - 1 extra times.
- ``memory`` (limited-memory Broyden): ``memory >= max_iter`` is the
  full-memory solver bit for bit; a small memory still converges on a
  contraction, really drops terms (its iterates leave the full-memory ones
  once the ring wraps) and its buffers hold ``memory`` rows.
- The refusals, each naming its argument.
"""

import pytest
import torch

from frontiers_fast.ops import deq as ops

from ..helpers import grads
from .cells import Poisoned, contraction, mixed_batch

pytestmark = pytest.mark.usefixtures("solve_backend")

SOLVERS = ["anderson", "broyden", "picard"]


def _same(a, b, msg):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=msg)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("check_every", [2, 3, 4, 7])
def test_check_every_equals_checking_every_step(solver, dtype, check_every):
    f, z0 = mixed_batch(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    runs = {}
    for k in (1, check_every):
        calls = []
        z, info = ops.fixed_point_solve(
            lambda z: (calls.append(1), f(z))[1], z0, solver=solver, tol=tol, max_iter=50, check_every=k
        )
        runs[k] = z, info, len(calls)
    z1, info1, n1 = runs[1]
    zk, infok, nk = runs[check_every]
    assert int(info1["nstep"].min()) < int(info1["nstep"].max()), "the samples should stop at different steps"
    _same(zk, z1, "z")
    for key in info1:
        _same(infok[key], info1[key], key)
    assert n1 <= nk <= n1 + check_every - 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_default_check_every_reads_every_step_on_the_cpu(solver):
    # None: 1 on the CPU (a read syncs nothing), so no evaluation of f runs after every sample stopped.
    f, z0 = mixed_batch(torch.float64)
    calls = {}
    for k in (None, 1, 4):
        n = []
        z, info = ops.fixed_point_solve(
            lambda z: (n.append(1), f(z))[1], z0, solver=solver, tol=1e-8, max_iter=50, check_every=k
        )
        calls[k] = len(n), int(info["nstep"].max())
    assert calls[None] == calls[1]
    stopped = calls[1][0]  # f calls when reading every step: the step the last sample stopped at
    assert stopped < 50, "every sample should converge"
    if stopped % 4:  # it stopped between two reads of check_every=4
        assert calls[4][0] > stopped


@pytest.mark.parametrize("solver", SOLVERS)
def test_check_every_with_diverging_and_unconverged_samples(solver):
    # One sample's f goes NaN at its third call, one never reaches tol: still equal to every-step reads.
    f, z0 = mixed_batch(torch.float64, B=4)
    g = Poisoned(f, nan_from=3)
    res = {}
    for k in (1, 4):
        g.calls = 0
        with pytest.warns(RuntimeWarning, match="1 of 4 samples diverged"):
            res[k] = ops.fixed_point_solve(g, z0, solver=solver, tol=1e-9, max_iter=25, check_every=k)
    _same(res[4][0], res[1][0], "z")
    for key in res[1][1]:
        _same(res[4][1][key], res[1][1][key], key)
    assert res[1][1]["diverged"].tolist() == [False, True, False, False]


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_deq_gradients_do_not_depend_on_check_every(backward, solver):
    torch.manual_seed(2)
    f, params = contraction(5, 16, requires_grad=True, lip=0.8)
    z0 = torch.zeros(5, 16, dtype=torch.float64)
    out = {}
    for k in (1, 3):
        z, info = ops.deq(f, z0, solver=solver, b_solver=solver, backward=backward, tol=1e-9, b_tol=1e-10,
                          check_every=k, b_check_every=k)  # fmt: skip
        seed = torch.linspace(-1, 1, z.numel(), dtype=z.dtype).reshape(z.shape)
        out[k] = z.detach(), grads(z, params, seed)
    _same(out[3][0], out[1][0], "z")
    for a, b in zip(out[3][1], out[1][1]):
        _same(a, b, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_broyden_memory_at_max_iter_is_the_full_memory_solver(dtype):
    f, z0 = mixed_batch(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    full = ops.fixed_point_solve(f, z0, solver="broyden", tol=tol, max_iter=30)
    for memory in (30, None):
        got = ops.fixed_point_solve(f, z0, solver="broyden", tol=tol, max_iter=30, memory=memory)
        _same(got[0], full[0], "z")
        for key in full[1]:
            _same(got[1][key], full[1][key], key)


@pytest.mark.parametrize("memory", [2, 5, 8])
def test_limited_memory_broyden_converges_and_drops_terms(memory):
    torch.manual_seed(7)
    f, _ = contraction(4, 64, lip=0.95)
    z0 = torch.zeros(4, 64, dtype=torch.float64)
    tol = 1e-10
    seen = {}
    for mem in (None, memory):
        calls = []
        z, info = ops.fixed_point_solve(
            lambda z: (calls.append(z.clone()), f(z))[1], z0, solver="broyden", tol=tol, max_iter=100,
            memory=mem, check_every=1,
        )  # fmt: skip
        seen[mem] = z, info, calls
        assert (info["abs_lowest"] < tol).all(), f"memory={mem} did not converge"
        assert float(torch.linalg.vector_norm(f(z) - z, dim=1).max()) < tol  # the returned estimate
    # Up to the step where the ring wraps the iterates are the full-memory ones; after it they differ.
    full, lim = seen[None][2], seen[memory][2]
    for a, b in zip(full[: memory + 1], lim[: memory + 1]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(full[memory + 1 :], lim[memory + 1 :]))


def test_limited_memory_broyden_buffers_are_bounded():
    # U and V take memory rows, not max_iter: the solve's peak allocation shows it (the CPU allocator
    # does not track peaks, so the buffers are measured where the loop allocates them).
    f, _ = contraction(2, 32)
    z0 = torch.zeros(2, 32, dtype=torch.float64)
    shapes = []
    real = torch.Tensor.new_empty

    def spy(self, size, *a, **kw):
        shapes.append(tuple(size) if isinstance(size, (tuple, list, torch.Size)) else (size,))
        return real(self, size, *a, **kw)

    for memory in (None, 4):
        shapes.clear()
        torch.Tensor.new_empty = spy
        try:
            ops.fixed_point_solve(f, z0, solver="broyden", max_iter=60, tol=0.0, memory=memory)
        finally:
            torch.Tensor.new_empty = real
        rows = {s[1] for s in shapes if len(s) == 3 and s[2] == 32}  # U and V: [B, rows, D]
        assert rows == {60 if memory is None else 4}


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(check_every=0), ValueError, r"check_every must be >= 1, got 0"),
        (dict(check_every=2.0), TypeError, "check_every must be an int"),
        (dict(memory=0), ValueError, r"memory must be in \[1, 40\]"),
        (dict(memory=41), ValueError, r"memory must be in \[1, 40\] \(Broyden's rank-one terms kept, at most max_iter\)"),
        (dict(memory=8, max_iter=5), ValueError, r"memory must be in \[1, 5\]"),
        (dict(memory=True), TypeError, "memory must be an int"),
    ],
)  # fmt: skip
def test_option_errors(kw, exc, match):
    f, _ = contraction(2, 8)
    z0 = torch.zeros(2, 8, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        ops.fixed_point_solve(f, z0, solver="broyden", **kw)
    with pytest.raises(exc, match=match):
        ops.deq(f, z0, solver="broyden", **kw)


def test_backward_option_errors():
    f, _ = contraction(2, 8)
    z0 = torch.zeros(2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"b_check_every must be >= 1"):
        ops.deq(f, z0, b_check_every=0)
    with pytest.raises(ValueError, match=r"b_memory must be in \[1, 40\] .*at most b_max_iter"):
        ops.deq(f, z0, b_solver="broyden", b_memory=100)

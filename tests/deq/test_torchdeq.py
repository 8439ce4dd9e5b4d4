"""Agreement with the peer, torchdeq 0.1.0, where its semantics and ours coincide.

Differences (documented in frontiers_fast.reference.deq): torchdeq stops only
when every sample is below tol and keeps iterating converged samples, we
freeze each sample as it converges; it ignores Anderson's two warm-up steps
for the best estimate and the stopping test; its traces start with a 1e8
placeholder.  So the comparisons use a batch of one (stopping coincides), or
tol = 0 (nothing stops: every step of every sample is compared), and an f
whose warm-up residuals are far above tol (z0 = 0, far from z*).

The iterates are compared at every step by recording the inputs f is called
with.  Both libraries run the same float64 operations in the same order, so
the bound is the float64 table (a contraction damps any round-off).
"""

import pytest
import torch

from frontiers_fast.ops import deq as ops

from ..helpers import assert_close
from .cells import contraction

pytestmark = pytest.mark.usefixtures("solve_backend")

torchdeq_solver = pytest.importorskip("torchdeq.solver")

# Columns of torchdeq's trace that correspond to ours: it pads one 1e8 in
# front, and its Anderson records from step 3 on.
TRACE_OFFSET = {"anderson": (2, 1), "broyden": (0, 1)}


def _recording(f):
    calls = []

    def g(z):
        calls.append(z.detach().clone())
        return f(z)

    return g, calls


def _run_both(solver, f, z0, **kw):
    ours_f, ours_calls = _recording(f)
    theirs_f, theirs_calls = _recording(f)
    # torchdeq reads the residuals on the host at every step: so do we here, for the same count of f calls
    # (check_every > 1 gives the same results after a few more calls on frozen estimates: test_solvers).
    z, info = ops.fixed_point_solve(ours_f, z0, solver=solver, check_every=1, **kw)
    with torch.no_grad():
        zt, _, it = torchdeq_solver.get_solver(solver)(theirs_f, z0, **kw)
    return (z, info, ours_calls), (zt, it, theirs_calls)


def _compare_traces(solver, info, it):
    o, t = TRACE_OFFSET[solver]
    for mode in ("abs", "rel"):
        ours, theirs = info[f"{mode}_trace"][:, o:], it[f"{mode}_trace"][:, t:]
        assert ours.shape == theirs.shape
        assert_close(ours, theirs.to(ours.dtype))


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_batch_of_one_matches_every_step(solver, stop_mode):
    f, _ = contraction(1, 32, lip=0.7)
    z0 = torch.zeros(1, 32, dtype=torch.float64)
    kw = dict(max_iter=40, tol=1e-6, stop_mode=stop_mode)
    if solver == "anderson":
        kw.update(m=5, lam=1e-4, tau=0.9)
    (z, info, oc), (zt, it, tc) = _run_both(solver, f, z0, **kw)
    assert len(oc) == len(tc)
    for a, b in zip(oc, tc):
        assert_close(a, b)
    assert_close(z, zt)
    assert torch.equal(info["nstep"], it["nstep"].long())
    assert_close(info["abs_lowest"], it["abs_lowest"])
    assert_close(info["rel_lowest"], it["rel_lowest"])
    _compare_traces(solver, info, it)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_batch_without_stopping_matches(solver):
    # tol = 0: nobody stops, so the per-sample and batch-wide rules agree and
    # every sample's lowest/best tracking (per sample in both) is compared.
    f, _ = contraction(5, 16, lip=0.6)
    z0 = torch.zeros(5, 16, dtype=torch.float64)
    # Stop well above float64 round-off (Broyden converges superlinearly): near the floor
    # the residuals are noise and which step is lowest would be a coin toss.
    kw = dict(max_iter=25 if solver == "anderson" else 7, tol=0.0)
    (z, info, oc), (zt, it, tc) = _run_both(solver, f, z0, **kw)
    assert len(oc) == len(tc)
    for a, b in zip(oc, tc):
        assert_close(a, b)
    assert_close(z, zt)
    assert torch.equal(info["nstep"], it["nstep"].long())
    _compare_traces(solver, info, it)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_batch_with_stopping_matches_until_each_sample_stops(solver):
    # Samples converge at different steps: each of our samples follows
    # torchdeq's trajectory up to the step at which it stopped.
    B, D = 4, 16
    f, _ = contraction(B, D, lip=0.6)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    z0[0] = 0.5 * f(z0)[0]  # a head start for one sample
    kw = dict(max_iter=40, tol=1e-7)
    (z, info, oc), (zt, it, tc) = _run_both(solver, f, z0, **kw)
    shift = 1 if solver == "broyden" else 0  # Broyden's first call is at z0 (step 0)
    for i in range(B):
        n = int(info["nstep"][i]) + shift
        for a, b in zip(oc[:n], tc[:n]):
            assert_close(a[i], b[i])
    # Both reach the same fixed point within the solver tolerance: ||z - z*|| <= tol / (1 - L).
    assert (torch.linalg.vector_norm(z - zt, dim=1) <= 2 * 1e-7 / (1 - 0.6)).all()
    assert int(info["nstep"].max()) == int(it["nstep"].max())


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_finite_samples_match_next_to_a_diverged_one(solver):
    # Sample 1's input injection is NaN, so f is NaN for it from the first call: it is marked
    # diverged and stops.  The other samples follow torchdeq's run on them alone, step by step.
    B, D = 3, 16
    W = torch.randn(D, D, dtype=torch.float64)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    c = torch.randn(B, D, dtype=torch.float64)
    c[1, 5] = float("nan")
    keep = [0, 2]
    f = lambda z: torch.tanh(z @ W.T + c)
    f_keep = lambda z: torch.tanh(z @ W.T + c[keep])
    z0 = torch.zeros(B, D, dtype=torch.float64)
    kw = dict(max_iter=25 if solver == "anderson" else 7, tol=0.0)
    ours_f, oc = _recording(f)
    with pytest.warns(RuntimeWarning, match="1 of 3 samples diverged"):
        z, info = ops.fixed_point_solve(ours_f, z0, solver=solver, **kw)
    theirs_f, tc = _recording(f_keep)
    with torch.no_grad():
        zt, _, it = torchdeq_solver.get_solver(solver)(theirs_f, z0[keep], **kw)
    assert info["diverged"].tolist() == [False, True, False]
    assert len(oc) == len(tc)
    for a, b in zip(oc, tc):
        assert_close(a[keep], b)
    assert_close(z[keep], zt)
    assert torch.equal(info["nstep"][keep], it["nstep"].long())
    o, t = TRACE_OFFSET[solver]
    for mode in ("abs", "rel"):
        assert_close(info[f"{mode}_trace"][keep, o:], it[f"{mode}_trace"][:, t:])


def test_picard_matches_fixed_point_iter():
    f, _ = contraction(1, 16)
    z0 = torch.zeros(1, 16, dtype=torch.float64)
    z, info = ops.fixed_point_solve(f, z0, solver="picard", max_iter=40, tol=1e-8)
    zt, _, it = torchdeq_solver.get_solver("fixed_point_iter")(f, z0, max_iter=40, tol=1e-8)
    assert_close(z, zt)
    assert torch.equal(info["nstep"], it["nstep"].long())
    assert_close(info["abs_trace"], it["abs_trace"][:, 1:])


@pytest.mark.parametrize("tol", [1e-9, 1e-12])
def test_broyden_batch_of_one_past_30_steps(tol):
    # torchdeq's "no progress" test only acts after step 30, and for one sample it reduces to
    # "residual < 3 tol" (its max/min ratio is across the batch).  This map (||W||_2 = 2, not a
    # contraction) makes Broyden run past step 30 and pass below 3 tol before it passes tol.
    gen = torch.Generator().manual_seed(0)
    D = 128
    W = torch.randn(D, D, dtype=torch.float64, generator=gen)
    W = 2.0 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(1, D, dtype=torch.float64, generator=gen)
    f = lambda z: torch.tanh(z @ W.T + x)
    z0 = torch.zeros(1, D, dtype=torch.float64)
    (z, info, oc), (zt, it, tc) = _run_both("broyden", f, z0, max_iter=80, tol=tol)
    assert int(it["nstep"]) > 30  # the rule under test was reached
    # ... and did the stopping: torchdeq stopped between tol and 3 tol.
    assert tol <= float(it["abs_lowest"]) < 3 * tol
    assert len(oc) == len(tc)
    # Not a contraction, but the iterates converge (superlinearly at the end), so round-off
    # differences between the two implementations' matvecs stay at round-off (~1e-15 here).
    for a, b in zip(oc, tc):
        assert_close(a, b)
    assert_close(z, zt)
    assert torch.equal(info["nstep"], it["nstep"].long())
    _compare_traces("broyden", info, it)


def test_module_with_torchdeq_names_matches_get_deq():
    # Phantom gradient with torchdeq's option names (tau -> pg_tau): same iterates, same k damped steps.
    from frontiers_fast.nn.deq import DEQFixedPoint

    torchdeq = pytest.importorskip("torchdeq")
    f, params = contraction(3, 12, lip=0.5, requires_grad=True)
    z0 = torch.zeros(3, 12, dtype=torch.float64)
    seed = torch.randn(3, 12, dtype=torch.float64)
    kw = dict(f_solver="anderson", f_max_iter=60, f_tol=1e-11, grad=2)
    zt = torchdeq.get_deq(core="indexing", tau=0.7, **kw)(f, z0)[0][-1]
    z, _ = DEQFixedPoint(lambda z, x: f(z), ift=False, pg_tau=0.7, **kw)(z0, z0)
    assert_close(z, zt)
    gt = torch.autograd.grad(zt, params, seed)
    for a, b in zip(torch.autograd.grad(z, params, seed), gt):
        assert_close(a, b)

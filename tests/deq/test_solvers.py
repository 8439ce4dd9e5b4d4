"""Solver semantics: convergence, per-sample best iterate and freezing, step counts, traces, shapes."""

from types import SimpleNamespace

import pytest
import torch

from frontiers_fast.ops import deq as ops
from frontiers_fast.reference import deq as ref

from ..helpers import assert_close, backends_for
from .cells import contraction

SOLVERS = ["anderson", "broyden", "picard"]


def _fixed_point_64(f, z0):
    # Plain iteration of a contraction with constant 1/2: 200 steps reach float64 round-off.
    z = z0.double()
    with torch.no_grad():
        for _ in range(200):
            z = f(z)
    return z


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converges_to_fixed_point(solver, dtype):
    f, _ = contraction(5, 24, dtype=dtype)
    z0 = torch.randn(5, 24, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    z, info = ops.fixed_point_solve(f, z0, solver=solver, tol=tol, max_iter=200, lam=1e-10)
    assert z.dtype == dtype and z.shape == z0.shape
    assert (info["abs_lowest"] < tol).all()
    # ||z - z*|| <= ||f(z') - z'|| / (1 - L) with L = 1/2 (for Anderson/Picard z = f(z'), still within the bound).
    z_star = _fixed_point_64(f, z0)
    err = torch.linalg.vector_norm(z.double() - z_star, dim=1)
    assert (err <= 2 * info["abs_lowest"].double() + 1e-12).all()


@pytest.mark.parametrize("backend", backends_for("fixed_point_solve", "cpu"))
@pytest.mark.parametrize("solver", SOLVERS)
def test_reference_and_registered_ops_agree(solver, backend):
    # The registered ops on the reference backend are the reference loop bit for bit; a fast
    # backend takes the same steps, its values to float64's tolerance.
    f, _ = contraction(4, 16)
    z0 = torch.randn(4, 16, dtype=torch.float64)
    a = ops.fixed_point_solve(f, z0, solver=solver, tol=1e-9, backend=backend)
    b = ref.fixed_point_solve(f, z0, solver=solver, tol=1e-9)
    exact = backend == "reference"
    check = (lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0)) if exact else assert_close
    check(a[0], b[0])
    for k in a[1]:
        if a[1][k].is_floating_point():
            check(a[1][k], b[1][k])
        else:
            torch.testing.assert_close(a[1][k], b[1][k], rtol=0, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_trailing_shape_matches_flat(solver):
    f3, _ = contraction(3, 24, trailing=(2, 3, 4))
    z0 = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    z, info = ops.fixed_point_solve(f3, z0, solver=solver, tol=1e-8)
    flat = lambda z: f3(z.view(3, 2, 3, 4)).reshape(3, 24)
    zf, infof = ops.fixed_point_solve(flat, z0.reshape(3, 24), solver=solver, tol=1e-8)
    assert z.shape == z0.shape
    assert_close(z.reshape(3, 24), zf)
    assert torch.equal(info["nstep"], infof["nstep"])


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_semantics(solver):
    """Best iterate per sample, consistent info, and converged samples frozen."""
    B, D, max_iter, tol = 6, 12, 30, 1e-6
    f, _ = contraction(B, D)
    z0 = torch.randn(B, D, dtype=torch.float64)
    # Start two samples at (nearly) their fixed point so they converge much earlier than the rest.
    z_star = _fixed_point_64(f, z0)
    z0[:2] = z_star[:2] + 1e-6 * torch.randn(2, D, dtype=torch.float64)
    calls = []

    def f_rec(z):
        calls.append(z.clone())
        return f(z)

    # lam small: with the default 1e-4 Anderson slows down once ||G||^2 drops below lam.
    z, info = ops.fixed_point_solve(f_rec, z0, solver=solver, max_iter=max_iter, tol=tol, lam=1e-10)
    nstep, abs_tr = info["nstep"], info["abs_trace"]
    assert info["abs_trace"].shape == (B, max_iter) and info["rel_trace"].shape == (B, max_iter)
    assert nstep.dtype == torch.int64 and (nstep >= 1).all()
    assert (nstep[:2] < nstep[2:].min()).all()
    # The reported lowest residuals are the minima of the traces, and the best step holds it.
    assert_close(info["abs_lowest"], abs_tr.min(1).values)
    assert_close(info["rel_lowest"], info["rel_trace"].min(1).values)
    assert_close(abs_tr.gather(1, (nstep - 1).unsqueeze(1))[:, 0], info["abs_lowest"])
    # Converged samples: residual below tol at nstep, trace constant (= lowest) afterwards.
    assert (info["abs_lowest"] < tol).all()
    for i in range(B):
        tail = abs_tr[i, nstep[i] - 1 :]
        assert torch.equal(tail, torch.full_like(tail, info["abs_lowest"][i].item()))
    # z is f(x) at the best step (Anderson, Picard) or x itself (Broyden): its residual
    # is consistent with the reported one.
    a, _ = ops.residual_norms(f(z), z)
    assert (a <= 2 * info["abs_lowest"] + 1e-12).all()
    # After a sample froze, f only ever saw its frozen estimate.
    n0 = int(nstep[0])
    offset = 0 if solver != "broyden" else 1  # Broyden evaluates f at z0 first (step 0)
    frozen_inputs = torch.stack([c[0] for c in calls[n0 + offset :]])
    if len(frozen_inputs) > 1:
        assert torch.equal(frozen_inputs, frozen_inputs[:1].expand_as(frozen_inputs))


def test_rel_stop_mode_and_max_iter_one():
    f, _ = contraction(3, 8)
    z0 = torch.randn(3, 8, dtype=torch.float64)
    z, info = ops.fixed_point_solve(f, z0, solver="anderson", stop_mode="rel", tol=1e-7, max_iter=60)
    assert (info["rel_lowest"] < 1e-7).all()
    for solver in SOLVERS:
        z, info = ops.fixed_point_solve(f, z0, solver=solver, max_iter=1)
        assert (info["nstep"] == 1).all() and info["abs_trace"].shape == (3, 1)
        if solver != "broyden":
            assert_close(z, f(z0))  # the only estimate: f(z0)


def test_no_gradient_from_solve():
    f, (W, *_) = contraction(2, 8, requires_grad=True)
    z, _ = ops.fixed_point_solve(f, torch.randn(2, 8, dtype=torch.float64, requires_grad=True))
    assert not z.requires_grad


@pytest.mark.parametrize("solver", SOLVERS)
def test_tol_zero_runs_max_iter(solver):
    # Nothing is below tol = 0, not even Broyden's 3 tol after step 30: max_iter = 40 takes the
    # solves down to float64 round-off (zero steps, zero-denominator rank-one terms) and past 30.
    f, _ = contraction(3, 8)
    z0 = torch.randn(3, 8, dtype=torch.float64)
    calls = []
    # lam small: with the default 1e-4 Anderson slows down once ||G||^2 drops below lam.
    z, info = ops.fixed_point_solve(
        lambda z: (calls.append(1), f(z))[1], z0, solver=solver, tol=0.0, max_iter=40, lam=1e-10
    )
    assert len(calls) == 40 + (solver == "broyden")  # Broyden also evaluates f at z0 (step 0)
    assert torch.isfinite(z).all()
    assert torch.isfinite(info["abs_trace"]).all() and torch.isfinite(info["rel_trace"]).all()
    assert (info["abs_lowest"] < 1e-12).all() and (info["nstep"] >= 1).all()


@pytest.mark.parametrize("lam", [0.0, 1e-20])
def test_anderson_singular_mixing_falls_back_to_a_damped_step(lam):
    # An affine map with a scalar state: Anderson hits the fixed point z* = 2 exactly at step 3,
    # after which the stored iterates repeat and the bordered system is singular for lam = 0
    # (and for a lam lost to rounding).  Sample 1 starts at z*, so its residuals are 0 from
    # step 1; sample 2 is an ordinary contraction that must not notice the others.
    tau = 0.9
    a = torch.tensor([[0.5], [0.5], [0.25]], dtype=torch.float64)
    f = lambda z: a * z + 1.0
    z0 = torch.tensor([[0.0], [2.0], [0.3]], dtype=torch.float64)
    calls = []
    z, info = ops.fixed_point_solve(
        lambda z: (calls.append(z.clone()), f(z))[1], z0, tol=0.0, lam=lam, tau=tau, max_iter=12
    )
    # Without the fallback the samples' iterates and traces are NaN from the first singular step on.
    assert all(torch.isfinite(c).all() for c in calls)
    assert torch.isfinite(info["abs_trace"]).all() and torch.isfinite(info["rel_trace"]).all()
    assert torch.equal(z[:2], torch.full((2, 1), 2.0, dtype=torch.float64))
    assert_close(z[2:], torch.tensor([[4.0 / 3.0]], dtype=torch.float64))
    assert (info["abs_lowest"][:2] == 0).all()
    # Sample 1 sits at z*: with lam = 0 every step is the damped fallback (exactly z*); with
    # lam = 1e-20 the weights are ~1/n and sum n equal rows, off by at most ~n eps |z*| each in x
    # and f(x): n <= m = 6 gives 2 * 6 * eps * 2 ~ 5e-15.
    eps = torch.finfo(torch.float64).eps
    assert info["abs_trace"][1].max() <= (0.0 if lam == 0 else 2 * 6 * eps * 2.0)
    # Per sample: the third sample's run is the one it has alone.
    z3, info3 = ops.fixed_point_solve(
        lambda z: a[2:] * z + 1.0, z0[2:], tol=0.0, lam=lam, tau=tau, max_iter=12
    )
    torch.testing.assert_close(z[2:], z3, rtol=0, atol=0)
    torch.testing.assert_close(info["abs_trace"][2:], info3["abs_trace"], rtol=0, atol=0)


def test_anderson_buffer_is_capped_at_max_iter():
    # Slots past max_iter are never written; the buffer the mixing kernel sees has min(m, max_iter).
    f, _ = contraction(2, 6)
    z0 = torch.randn(2, 6, dtype=torch.float64)
    seen = []

    def step(X, F, GG, x, fx, i, lam, tau):
        seen.append(X.shape[1])
        return ref.anderson_step(X, F, GG, x, fx, i, lam, tau)

    kernels = SimpleNamespace(**{**vars(ref.KERNELS), "anderson_step": step})
    opts = dict(solver="anderson", max_iter=5, tol=0.0, stop_mode="abs", lam=1e-4, tau=1.0)
    z, info = ref.solve_loop(f, z0, m=10, kernels=kernels, **opts)
    assert seen and set(seen) == {5}
    zm, infom = ref.solve_loop(f, z0, m=5, **opts)
    torch.testing.assert_close(z, zm, rtol=0, atol=0)
    torch.testing.assert_close(info["abs_trace"], infom["abs_trace"], rtol=0, atol=0)


def _nan_after(f, sample, first_bad_call):
    calls = []

    def g(z):
        calls.append(1)
        out = f(z)
        if len(calls) >= first_bad_call:
            out = out.clone()
            out[sample] = float("nan")
        return out

    return g


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_or_diverging_f_is_never_the_best_iterate(solver):
    B, D = 3, 8
    f, _ = contraction(B, D)
    z0 = torch.randn(B, D, dtype=torch.float64)
    # (a) f is NaN for sample 1 from its 5th call on: the sample keeps its best finite estimate,
    # is flagged as diverged and stops; one warning says so.
    with pytest.warns(RuntimeWarning, match="1 of 3 samples diverged") as rec:
        z, info = ops.fixed_point_solve(_nan_after(f, 1, 5), z0, solver=solver, tol=0.0, max_iter=12)
    assert len(rec) == 1
    assert info["diverged"].tolist() == [False, True, False]
    tr = info["abs_trace"][1]
    last_finite_step = 4 - (solver == "broyden")  # Broyden's first call is step 0
    assert torch.isfinite(tr[:last_finite_step]).all() and tr[last_finite_step:].isnan().all()
    assert 1 <= int(info["nstep"][1]) <= last_finite_step
    assert torch.isfinite(z).all()
    assert info["abs_lowest"][1] == tr[:last_finite_step].min()
    # The other samples are those of a clean run.
    zc, infoc = ops.fixed_point_solve(f, z0, solver=solver, tol=0.0, max_iter=12)
    assert_close(z[[0, 2]], zc[[0, 2]])
    assert torch.equal(info["nstep"][[0, 2]], infoc["nstep"][[0, 2]])
    assert not infoc["diverged"].any()
    # (b) f NaN everywhere for one sample: no step is ever its best (nstep 0, z0 returned).
    with pytest.warns(RuntimeWarning, match="1 of 3 samples diverged"):
        z, info = ops.fixed_point_solve(_nan_after(f, 1, 1), z0, solver=solver, tol=1e-8, max_iter=12)
    assert info["diverged"].tolist() == [False, True, False]
    assert int(info["nstep"][1]) == 0 and info["abs_lowest"][1] == float("inf")
    assert torch.equal(z[1], z0[1]) and (info["nstep"][[0, 2]] >= 1).all()
    # (c) f diverges: f(0) = 1e100, f(1e100) = inf, then inf - inf = NaN.  Anderson and Picard
    # propose f(0) at step 1 (finite residual 1e100), which stays their best; Broyden's step 1
    # is already x = 1e100 (residual inf) and its z0 (step 0) is no candidate: nothing is best.
    g = lambda z: 1e100 * torch.exp(z)
    z0 = torch.zeros(2, 4, dtype=torch.float64)
    calls = []
    with pytest.warns(RuntimeWarning, match="2 of 2 samples diverged"):
        z, info = ops.fixed_point_solve(
            lambda z: (calls.append(1), g(z))[1], z0, solver=solver, tol=1e-8, max_iter=8, check_every=1
        )
    assert info["diverged"].all()
    # Every sample stopped at its first non-finite residual, so the solve ended there (read every step).
    assert len(calls) == 2
    # Read every 4 steps: the same results, after at most 4 evaluations (the frozen ones discarded).
    calls4 = []
    with pytest.warns(RuntimeWarning, match="2 of 2 samples diverged"):
        z4, info4 = ops.fixed_point_solve(
            lambda z: (calls4.append(1), g(z))[1], z0, solver=solver, tol=1e-8, max_iter=8, check_every=4
        )
    assert len(calls4) == 4 + (solver == "broyden") and torch.equal(z4, z)  # Broyden also evaluates z0
    for key in info:
        torch.testing.assert_close(info4[key], info[key], rtol=0, atol=0, equal_nan=True, msg=key)
    tr = info["abs_trace"]
    assert not torch.isfinite(tr[:, 1:]).any()  # it did blow up
    assert torch.isfinite(z).all()
    if solver == "broyden":
        assert (info["nstep"] == 0).all() and torch.equal(z, z0) and (info["abs_lowest"] == torch.inf).all()
    else:
        assert (info["nstep"] == 1).all() and torch.equal(info["abs_lowest"], tr[:, 0])
        assert torch.equal(z, g(z0))


@pytest.mark.parametrize("solver", SOLVERS)
def test_diverged_sample_stops_iterating(solver):
    f, _ = contraction(3, 8)
    z0 = torch.randn(3, 8, dtype=torch.float64)
    bad = _nan_after(f, 1, 4)
    inputs = []
    with pytest.warns(RuntimeWarning, match="1 of 3 samples diverged"):
        z, info = ops.fixed_point_solve(
            lambda z: (inputs.append(z.clone()), bad(z))[1], z0, solver=solver, tol=0.0, max_iter=12
        )
    # From the call after the first NaN on, f only sees the sample's frozen input.
    after = torch.stack([c[1] for c in inputs[4:]])
    assert len(after) > 1 and torch.equal(after, after[:1].expand_as(after))
    assert torch.isfinite(after).all()
    # Its traces hold the NaN residual from the diverging step on; its estimate is finite.
    step = 4 - (solver == "broyden")
    for mode in ("abs", "rel"):
        tr = info[f"{mode}_trace"][1]
        assert torch.isfinite(tr[: step - 1]).all() and tr[step - 1 :].isnan().all()
    assert torch.isfinite(z).all() and info["nstep"][1] < step


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_in_z0_is_refused_and_the_loop_isolates_it(solver):
    f, _ = contraction(3, 8)
    z0 = torch.randn(3, 8, dtype=torch.float64)
    clean_z, clean = ops.fixed_point_solve(f, z0, solver=solver, tol=1e-8)
    z0[1, 3] = float("nan")
    with pytest.raises(ValueError, match="z0 must be finite"):
        ops.fixed_point_solve(f, z0, solver=solver, tol=1e-8)
    with pytest.raises(ValueError, match="z0 must be finite"):
        ops.deq(f, z0, solver=solver)
    # The loop itself (which the adjoint solve also runs) still isolates a NaN start: that sample
    # diverges at once and comes back as its z0, the others are solved as without it.
    with pytest.warns(RuntimeWarning, match="1 of 3 samples diverged"):
        z, info = ref.solve_loop(
            f,
            z0,
            solver=solver,
            max_iter=40,
            tol=1e-8,
            stop_mode="abs",
            m=6,
            lam=1e-4,
            tau=1.0,
            check_every=4,
        )
    assert info["diverged"].tolist() == [False, True, False]
    assert int(info["nstep"][1]) == 0 and info["abs_lowest"][1] == float("inf")
    assert torch.equal(z[1].isnan(), z0[1].isnan()) and torch.equal(z[1].nan_to_num(), z0[1].nan_to_num())
    assert_close(z[[0, 2]], clean_z[[0, 2]])
    assert torch.equal(info["nstep"][[0, 2]], clean["nstep"][[0, 2]])


def test_anderson_with_memory_one_is_picard():
    # With one slot the bordered system forces alpha = 1: the next iterate is f of the last one.
    f, _ = contraction(3, 8)
    z0 = torch.randn(3, 8, dtype=torch.float64)
    runs = {}
    for solver, m in (("anderson", 1), ("picard", 6)):
        calls = []
        z, info = ops.fixed_point_solve(
            lambda z: (calls.append(z.clone()), f(z))[1], z0, solver=solver, m=m, tol=0.0
        )
        runs[solver] = (z, info, calls)
    (za, ia, ca), (zp, ip, cp) = runs["anderson"], runs["picard"]
    assert len(ca) == len(cp)
    for a, b in zip(ca, cp):
        assert_close(a, b)
    assert_close(za, zp)
    assert torch.equal(ia["nstep"], ip["nstep"])

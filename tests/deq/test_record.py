"""solver_record (the solver loop's per-step bookkeeping) on every backend against the reference.

Random states with running, stopped and diverged samples; residuals that
improve, tie, rise, fall below tol, and are NaN or inf; both stop modes;
float32 and float64; several steps in a row.  Every piece of state must be
the reference's exactly (the op only compares and copies).  Plus opcheck and
the argument errors.
"""

import math

import pytest
import torch

from frontiers_fast.reference import deq as ref

from ..helpers import assert_close, backend_cases, opcheck, triton_devices

ops = torch.ops.frontiers_fast
CASES = backend_cases("solver_record", grad=False)


def _state(B, D, T, dtype, gen):
    best = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    lowest = torch.rand(2, B, generator=gen, dtype=torch.float64).to(dtype)
    lowest[:, ::5] = math.inf  # nothing recorded yet
    blown = torch.full((2, B), math.inf, dtype=dtype)
    nstep = torch.randint(0, 3, (B,), generator=gen)
    trace = torch.rand(2, B, T, generator=gen, dtype=torch.float64).to(dtype)
    active = torch.rand(B, generator=gen) > 0.3
    diverged = ~active & (torch.rand(B, generator=gen) > 0.5)
    blown[:, diverged] = math.nan
    return [best, lowest, blown, nstep, trace, active, diverged]


def _step(B, D, dtype, gen, lowest):
    est = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    res = torch.rand(2, B, generator=gen, dtype=torch.float64).to(dtype) * 2 * lowest.nan_to_num(1.0, 1.0)
    res[:, 1::7] = lowest[:, 1::7]  # ties keep the first
    res[:, 2::9] = 1e-9  # below tol: the sample stops
    res[0, 3::11] = math.nan  # diverges
    res[0, 4::13] = math.inf
    res[1, 6::10] = math.nan  # a NaN rel alone does not diverge
    return est, res[0].contiguous(), res[1].contiguous()


def _equal(a, b, name):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stop", [0, 1])
@pytest.mark.parametrize("B,D", [(1, 5), (37, 64), (300, 3)])
@pytest.mark.parametrize("with_hold", [False, True])
def test_solver_record_equals_reference(B, D, stop, dtype, device, backend, with_hold):
    gen = torch.Generator().manual_seed(B * 10 + D + stop)
    T = 6
    ours = [t.to(device) for t in _state(B, D, T, dtype, gen)]
    theirs = [t.clone() for t in ours]
    for step in range(1, T + 1):
        est, ra, rr = (t.to(device) for t in _step(B, D, dtype, gen, theirs[1]))
        # hold: the loop's next iterate (fresh values each step), whose stopped rows get the best estimate.
        hold = torch.randn(B, D, generator=gen, dtype=dtype).to(device) if with_hold else None
        hold_ref = hold.clone() if with_hold else None
        ops.solver_record(*ours, est, ra, rr, step, 1e-6, stop, hold, backend)
        ref.solver_record(*theirs, est, ra, rr, step, 1e-6, stop, hold_ref)
        names = ("best", "lowest", "blown", "nstep", "trace", "active", "diverged")
        for a, b, name in zip(ours, theirs, names):
            _equal(a, b, f"{name} after step {step}")
        if with_hold:
            _equal(hold, hold_ref, f"hold after step {step}")
            stopped = ~theirs[5]
            assert torch.equal(hold[stopped], theirs[0][stopped])
    if B > 10:  # the scene covers stopping and diverging
        assert not bool(ours[5].all()) and bool(ours[6].any())


@pytest.mark.parametrize("device,backend", CASES)
def test_solver_record_opcheck(device, backend):
    gen = torch.Generator().manual_seed(0)
    state = [t.to(device) for t in _state(8, 4, 5, torch.float64, gen)]
    est, ra, rr = (t.to(device) for t in _step(8, 4, torch.float64, gen, state[1]))
    opcheck(ops.solver_record, (*state, est, ra, rr, 2, 1e-6, 0, None, backend), full=False)
    hold = torch.randn(8, 4, generator=gen, dtype=torch.float64).to(device)
    opcheck(ops.solver_record, (*state, est, ra, rr, 2, 1e-6, 0, hold, backend), full=False)


def test_solver_record_cpp_refuses_bad_arguments():
    if "cpp" not in [p.values[1] for p in CASES]:
        pytest.skip("no C++ extension")
    gen = torch.Generator().manual_seed(1)
    state = _state(4, 3, 5, torch.float32, gen)
    est, ra, rr = _step(4, 3, torch.float32, gen, state[1])
    with pytest.raises(ValueError, match=r"step must be in \[1, max_iter\] = \[1, 5\], got 6"):
        ops.solver_record(*state, est, ra, rr, 6, 1e-6, 0, None, "cpp")
    with pytest.raises(ValueError, match="stop must be 0"):
        ops.solver_record(*state, est, ra, rr, 1, 1e-6, 2, None, "cpp")
    with pytest.raises(RuntimeError, match=r"est must have shape \[4, 3\]"):
        ops.solver_record(*state, est[:, :2], ra, rr, 1, 1e-6, 0, None, "cpp")
    with pytest.raises(RuntimeError, match="res_abs must be Float"):
        ops.solver_record(*state, est, ra.double(), rr, 1, 1e-6, 0, None, "cpp")
    with pytest.raises(RuntimeError, match=r"hold must have shape \[4, 3\]"):
        ops.solver_record(*state, est, ra, rr, 1, 1e-6, 0, est[:, :2].contiguous(), "cpp")


# ---------------------------------------------------------------------------
# the Triton launchers (kernels/deq.py), called directly: the interpreter on CPU tensors, compiled on CUDA
# ---------------------------------------------------------------------------
def _triton():
    pytest.importorskip("triton")
    from frontiers_fast.kernels import deq as K

    return K


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stop", [0, 1])
def test_triton_solver_record(stop, dtype, device):
    K = _triton()
    B, D, T = 37, 70, 4
    gen = torch.Generator().manual_seed(stop)
    ours = [t.to(device) for t in _state(B, D, T, dtype, gen)]
    theirs = [t.clone().cpu() for t in ours]
    for step in range(1, T + 1):
        est, ra, rr = _step(B, D, dtype, gen, theirs[1])
        hold_ref = torch.randn(B, D, generator=gen, dtype=dtype)
        hold = hold_ref.clone().to(device)
        K.solver_record(*ours, est.to(device), ra.to(device), rr.to(device), step, 1e-6, stop, hold)
        ref.solver_record(*theirs, est, ra, rr, step, 1e-6, stop, hold_ref)
        for a, b, name in zip(
            ours + [hold],
            theirs + [hold_ref],
            ("best", "lowest", "blown", "nstep", "trace", "active", "diverged", "hold"),
        ):
            _equal(a.cpu(), b, f"{name} after step {step}")


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,D", [(3, 1), (5, 70), (2, 2500), (0, 4)])
def test_triton_residual_norms(B, D, dtype, device):
    K = _triton()
    gen = torch.Generator().manual_seed(B + D)
    fz = torch.randn(B, D, generator=gen, dtype=torch.float64)
    z = torch.randn(B, D, generator=gen, dtype=torch.float64)
    if B > 1:
        z[1] = fz[1]  # r = 0: the subgradient 0
    a, r = K.residual_norms(fz.to(device, dtype), z.to(device, dtype))
    wa, wr = ref.residual_norms(fz, z)
    assert_close(a.cpu(), wa, dtype)
    assert_close(r.cpu(), wr, dtype)
    ga, gr = (
        torch.randn(B, generator=gen, dtype=torch.float64),
        torch.randn(B, generator=gen, dtype=torch.float64),
    )
    from frontiers_fast.ops.deq import _ref_residual_norms_bwd

    want = _ref_residual_norms_bwd(fz, z, ga, gr)
    got = K.residual_norms_bwd(*(t.to(device, dtype) for t in (fz, z, ga, gr)))
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, dtype)
    again = K.residual_norms_bwd(*(t.to(device, dtype) for t in (fz, z, ga, gr)))
    assert all(torch.equal(x, y) for x, y in zip(got, again))  # fixed-order sums: bitwise repeatable

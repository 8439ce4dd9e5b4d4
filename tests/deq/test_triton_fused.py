"""The Triton fused solver steps (kernels/deq.py: anderson_step, broyden_step), called directly.

Under the interpreter on CPU tensors (compiled on CUDA).  Each drives a whole
iteration on a contractive map, step by step, against the same iteration
built from the reference pieces (ref.anderson_mix and ref.residual_norms on
the ring buffers, with the loop's fallback; ref.broyden_update and
ref.broyden_matvec), in float32 and float64: the next iterate, the norms and
every buffer after each step, the ring wrapping, a singular Anderson system
(the fallback) and a zero Broyden denominator (the term zeroed).
"""

import pytest
import torch

from frontiers_fast.reference import deq as ref

from ..helpers import assert_close, triton_devices
from .cells import contraction

pytest.importorskip("triton")
from frontiers_fast.kernels import deq as K  # noqa: E402

# The interpreter computes with numpy, which warns where a zero denominator is meant (it is zeroed after).
pytestmark = pytest.mark.filterwarnings("ignore:(divide by zero|invalid value) encountered:RuntimeWarning")


def _anderson_oracle(X, F, x, fx, i, lam, tau):
    B, m, D = X.shape
    s, n = i % m, min(i + 1, m)
    X[:, s], F[:, s] = x, fx
    a, r = ref.residual_norms(fx, x)
    G = F[:, :n] - X[:, :n]
    GG = torch.bmm(G, G.transpose(1, 2))
    if i == 0:
        return fx.clone(), a, r, GG
    mixed, _ = ref.anderson_mix(X, F, n, lam, tau)
    ok = torch.isfinite(mixed).all(1, keepdim=True)
    return torch.where(ok, mixed, tau * F[:, s] + (1 - tau) * X[:, s]), a, r, GG


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "B,D,m,lam,tau",
    [(1, 1, 1, 1e-4, 1.0), (2, 9, 1, 1e-4, 0.7), (3, 17, 2, 0.0, 0.7), (5, 300, 5, 1e-4, 1.0)],
)
def test_anderson_step(B, D, m, lam, tau, dtype, device):
    torch.manual_seed(B + D + m)
    f, _ = contraction(B, D, dtype=dtype, lip=0.8)
    X, F, GG = (
        torch.zeros(B, m, D, dtype=dtype),
        torch.zeros(B, m, D, dtype=dtype),
        torch.zeros(B, m, m, dtype=dtype),
    )
    Xo, Fo = X.clone(), F.clone()
    Xd, Fd, GGd = (t.to(device) for t in (X, F, GG))
    x = torch.zeros(B, D, dtype=dtype)
    for i in range(2 * m + 3):  # the ring wraps
        fx = f(x)
        # The oracle in float64 on the same values (the buffers hold dtype values); the kernel in dtype.
        X64, F64 = Xo.double().clone(), Fo.double().clone()
        want = _anderson_oracle(X64, F64, x.double(), fx.double(), i, lam, tau)
        Xo.copy_(X64)
        Fo.copy_(F64)
        got = K.anderson_step(Xd, Fd, GGd, x.to(device), fx.to(device), i, lam, tau)
        for g, w, name in zip(got, want[:3], ("x_next", "abs", "rel")):
            assert_close(g.cpu(), w, dtype, msg=f"{name} at step {i}")
        assert torch.equal(Xd.cpu(), Xo) and torch.equal(Fd.cpu(), Fo), f"buffers at step {i}"
        n = min(i + 1, m)
        assert_close(GGd[:, :n, :n].cpu(), want[3], dtype, msg=f"Gram at step {i}")
        x = want[0].to(dtype)


@pytest.mark.parametrize("device", triton_devices())
def test_anderson_step_singular_system_takes_the_damped_step(device):
    # f constant: every stored residual is the same after the first, lam = 0 -> a singular system.
    B, D, m, tau = 2, 8, 3, 0.6
    c = torch.randn(B, D, dtype=torch.float64)
    X, F = torch.zeros(B, m, D, dtype=torch.float64), torch.zeros(B, m, D, dtype=torch.float64)
    Xo, Fo = X.clone(), F.clone()
    Xd, Fd, GGd = X.to(device), F.to(device), torch.zeros(B, m, m, dtype=torch.float64, device=device)
    x = c.clone()
    for i in range(4):
        want = _anderson_oracle(Xo, Fo, x, c, i, 0.0, tau)
        got = K.anderson_step(Xd, Fd, GGd, x.to(device), c.to(device), i, 0.0, tau)
        assert torch.isfinite(got[0]).all()
        assert_close(got[0].cpu(), want[0], torch.float64)
        x = want[0]


def _broyden_oracle(U, V, dx, dg, gx, n, slot, n_after):
    u, v = ref.broyden_update(U, V, dx, dg, n)
    U[:, slot], V[:, slot] = u, v
    return -ref.broyden_matvec(U, V, gx, n_after, False)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,D,L,steps", [(1, 1, 6, 5), (3, 17, 12, 10), (4, 300, 4, 9)])
def test_broyden_step(B, D, L, steps, dtype, device):
    # The loop's calls of the op, step by step: rows [0, n) in use before the step, the slot zeroed when
    # the ring is full.  Each call gets fresh random rows and vectors, scaled so that the denominator
    # v . dg does not cancel (a real iteration soon reaches the round-off regime, where it does and any two
    # summation orders disagree); the float64 oracle runs on the same values.
    gen = torch.Generator().manual_seed(B * D + L)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    for step in range(1, steps + 1):
        slot, n = (step - 1) % L, min(step - 1, L)
        U, V = 0.3 * rnd(B, L, D) / D**0.5, 0.3 * rnd(B, L, D) / D**0.5
        U[:, n:], V[:, n:] = 0, 0
        U[:, slot], V[:, slot] = 0, 0  # the row the new term takes: zeroed before reuse
        dx, gx = rnd(B, D), rnd(B, D)
        dg = ref.broyden_matvec(U, V, dx, n, True) + 0.1 * rnd(B, D)  # v . dg is then about |v|^2
        if B > 1 and step == 3:
            dg[1] = 0  # a zero denominator for sample 1: its term is zeroed
        U, V, dx, dg, gx = (t.to(dtype) for t in (U, V, dx, dg, gx))
        U64, V64 = U.double().clone(), V.double().clone()  # copies: the oracle writes its row
        want = _broyden_oracle(U64, V64, dx.double(), dg.double(), gx.double(), n, slot, min(step, L))
        Ud, Vd = U.to(device).clone(), V.to(device).clone()
        x = rnd(B, D).to(dtype)
        active = torch.arange(B) % 3 != 1  # sample 1 (of 3 and more) stopped: it keeps x
        got = K.broyden_step(Ud, Vd, dx.to(device), dg.to(device), gx.to(device), x.to(device), active.to(device),
                             n, slot, min(step, L)).cpu()  # fmt: skip
        assert_close(
            got, torch.where(active[:, None], x.double() + want, x.double()), dtype, msg=f"step {step}"
        )
        assert torch.equal(got[~active], x[~active])
        assert_close(Ud.cpu(), U64, dtype, msg=f"U at step {step}")
        assert_close(Vd.cpu(), V64, dtype, msg=f"V at step {step}")
        if B > 1 and step == 3:
            assert not bool(Ud[1, slot].any()), "a zero denominator zeroes the term"

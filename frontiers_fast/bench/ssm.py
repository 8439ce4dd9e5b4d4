"""Selective-scan (Mamba) benchmark cases: the scan against mambapy's
parallel (Blelloch pscan) and sequential scans, and the causal depthwise
convolution against a padded ``F.conv1d``.  Providers and sizes only; the
harness does the measuring.

The scan is compared on the semantics both libraries share: variable B and C,
a delta that is already positive (mambapy applies softplus and the bias
before its scan), D, no z, a zero initial state.  Each provider gets its own
layout ((batch, dim, L) for ours, (batch, L, dim) for mambapy), prepared
outside the timed region.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F

from ..ops import ssm as ops
from ..reference import ssm as ref
from .harness import Result, run_provider

FAMILY = "ssm"
TARGETS = []  # baselines only for now; kernels will add (case, ours, peer, speed-up, memory) rows


def _mambapy():
    try:
        from mambapy.mamba import MambaBlock

        return MambaBlock
    except Exception:
        return None


def _sizes(quick):
    return (2, 64, 16, 512) if quick else (2, 256, 16, 2048)


def _scan_inputs(batch, dim, N, L, device):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, L, generator=gen)
    # Mamba's ranges: dt = softplus(...) in about [1e-3, 1e-1], A = -exp(A_log) with A_log = log(1..N).
    delta = 0.001 * torch.exp(torch.rand(batch, dim, L, generator=gen) * math.log(100.0))
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(batch, N, L, generator=gen)
    C = torch.randn(batch, N, L, generator=gen)
    D = torch.randn(dim, generator=gen)
    return [t.to(device) for t in (u, delta, A, B, C, D)]


def _scan_case(results, device, quick, min_time, MambaBlock):
    batch, dim, N, L = _sizes(quick)
    case = f"selective_scan / b{batch}-d{dim}-n{N}-L{L}"
    ours_in = _scan_inputs(batch, dim, N, L, device)
    to_theirs = lambda t, k: t.transpose(1, 2).contiguous() if k in (0, 1, 3, 4) else t
    theirs_in = [to_theirs(t, k) for k, t in enumerate(ours_in)]
    seq_self = types.SimpleNamespace(config=types.SimpleNamespace(d_inner=dim, d_state=N))
    # Norm-wise relative error of a float32 recurrence of L steps: at most about L * 2**-24.
    tol = L * 2.0**-24

    print(f"[ssm] {case} fwd", flush=True)
    expected = ref.selective_scan(*[t.double() for t in ours_in])
    common = dict(
        family=FAMILY, case=case, mode="fwd", device=device, expected=expected, tol=tol, min_time=min_time
    )
    fn = lambda: ops.selective_scan(*ours_in)
    run_provider(results, provider="frontiers_fast[reference]", fn=fn, check=fn, **common)
    if MambaBlock is not None:
        fn = lambda: MambaBlock.selective_scan(None, *theirs_in)
        run_provider(results, provider="mambapy pscan", fn=fn, check=lambda: fn().transpose(1, 2), **common)
        fn = lambda: MambaBlock.selective_scan_seq(seq_self, *theirs_in)
        run_provider(
            results, provider="mambapy sequential", fn=fn, check=lambda: fn().transpose(1, 2), **common
        )

    print(f"[ssm] {case} fwd+bwd", flush=True)
    gen = torch.Generator().manual_seed(1)
    seed = torch.randn(batch, dim, L, generator=gen).to(device)
    x64 = [t.double().requires_grad_(True) for t in ours_in]
    # The float64 truth is autograd through the reference, not our written-out backward.
    expected = list(torch.autograd.grad(ref.selective_scan(*x64), x64, seed.double()))
    del x64
    common = dict(common, mode="fwd+bwd", expected=expected, memory=True)
    xg = [t.clone().requires_grad_(True) for t in ours_in]
    fn = lambda: torch.autograd.grad(ops.selective_scan(*xg), xg, seed)
    run_provider(results, provider="frontiers_fast[reference]", fn=fn, check=fn, **common)
    if MambaBlock is not None:
        tg = [t.clone().requires_grad_(True) for t in theirs_in]
        seed_t = seed.transpose(1, 2).contiguous()
        fn = lambda: torch.autograd.grad(MambaBlock.selective_scan(None, *tg), tg, seed_t)
        check = lambda: [to_theirs(g, k) for k, g in enumerate(fn())]  # transposing back is its own inverse
        run_provider(results, provider="mambapy pscan", fn=fn, check=check, **common)
        # Its backward scatters each step's gradient into a full (batch, L, dim, N)
        # tensor: quadratic in L, minutes at this size.
        results.append(
            Result(
                FAMILY,
                case,
                "fwd+bwd",
                "mambapy sequential",
                device,
                status="skipped: backward is quadratic in L (per-step slices of the full tensor)",
            )  # fmt: skip
        )
        print(f"  {'mambapy sequential':<28} skipped (quadratic backward)", flush=True)


def _conv_case(results, device, quick, min_time):
    batch, dim, _, L = _sizes(quick)
    width = 4
    case = f"causal_conv1d silu / b{batch}-d{dim}-w{width}-L{L}"
    gen = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*s, generator=gen).to(device) for s in ((batch, dim, L), (dim, width), (dim,)))

    def padded(x, w, b):  # what mambapy's nn.Conv1d(padding=width-1) computes, cut to L
        return F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=width - 1, groups=dim)[..., :L])

    print(f"[ssm] {case} fwd", flush=True)
    expected = ref.causal_conv1d(x.double(), w.double(), b.double(), "silu")
    common = dict(
        family=FAMILY, case=case, mode="fwd", device=device, expected=expected, tol=1e-5, min_time=min_time
    )
    fn = lambda: ops.causal_conv1d(x, w, b, "silu")
    run_provider(results, provider="frontiers_fast[reference]", fn=fn, check=fn, **common)
    fn = lambda: padded(x, w, b)
    run_provider(results, provider="F.conv1d (padded)", fn=fn, check=fn, **common)

    print(f"[ssm] {case} fwd+bwd", flush=True)
    seed = torch.randn(batch, dim, L, generator=gen).to(device)
    x64 = [t.double().requires_grad_(True) for t in (x, w, b)]
    expected = list(torch.autograd.grad(ref.causal_conv1d(*x64, "silu"), x64, seed.double()))
    common = dict(common, mode="fwd+bwd", expected=expected, memory=True)
    xg = [t.clone().requires_grad_(True) for t in (x, w, b)]
    fn = lambda: torch.autograd.grad(ops.causal_conv1d(*xg, "silu"), xg, seed)
    run_provider(results, provider="frontiers_fast[reference]", fn=fn, check=fn, **common)
    fn = lambda: torch.autograd.grad(padded(*xg), xg, seed)
    run_provider(results, provider="F.conv1d (padded)", fn=fn, check=fn, **common)


def run(results, device="cpu", quick=False, min_time=0.5, out_dir=None):
    MambaBlock = _mambapy()
    if MambaBlock is None:
        print("[ssm] mambapy is not importable: its providers are left out", flush=True)
    _scan_case(results, device, quick, min_time, MambaBlock)
    _conv_case(results, device, quick, min_time)
    note = (
        "Selective scan on the semantics shared with mambapy: variable B and C, delta already "
        "positive (mambapy applies softplus and the bias outside its scan), D, no z, zero initial "
        "state; each provider gets its own layout, prepared outside the timed region.  "
        "`frontiers_fast[reference]` is the registered op running the PyTorch reference: a Python "
        "loop over the L time steps forward and a written-out reverse loop backward.  "
        "`mambapy pscan` is `MambaBlock.selective_scan` (Blelloch scan, L padded to a power of two); "
        "`mambapy sequential` is `MambaBlock.selective_scan_seq`, timed forward only because autograd "
        "through its per-step slices is quadratic in L.  Agreement is checked against the float64 "
        "reference (autograd through it for the gradients) with a norm-wise tolerance of L * 2^-24."
    )
    return [("Selective scan (Mamba): what is compared", note)]

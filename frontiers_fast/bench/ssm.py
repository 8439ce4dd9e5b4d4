"""Selective-scan (Mamba) benchmark cases: the scan against mambapy's
parallel (Blelloch pscan) and sequential scans and against the exp floor,
the scan in bf16 against our fp32, the causal depthwise convolution against
a padded ``F.conv1d``, and (:mod:`frontiers_fast.bench.ssm_layers`) the Mamba
layer and greedy decoding against transformers.  Providers and sizes only;
the harness does the measuring.

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
from . import ssm_layers
from .harness import peer, time_fn

# What the report checks: (case prefix, our provider prefix, peer, min speed-up, min memory ratio or None, mode)
TARGETS = [
    ("selective_scan / b2-d256-n16-L2048", "frontiers_fast[cpp]", "mambapy pscan", 10.0, None, "fwd"),
    ("selective_scan / b2-d256-n16-L2048", "frontiers_fast[cpp]", "mambapy pscan", 10.0, 4.0, "fwd+bwd"),
    ("nn.Mamba d768-x2-n16 / b1-L2048", "frontiers_fast[cpp]", "transformers MambaMixer", 8.0, None, "fwd"),
    (
        "nn.Mamba d768-x2-n16 / b1-L512",
        "frontiers_fast[cpp]",
        "transformers MambaMixer",
        50.0,
        None,
        "fwd+bwd",
    ),
    (
        "MambaForCausalLM 4x d768 greedy",
        "frontiers_fast[cpp]",
        "transformers MambaForCausalLM",
        3.0,
        None,
        "fwd",
    ),
    (
        "causal_conv1d silu / b2-d256-w4-L2048",
        "frontiers_fast[cpp]",
        "F.conv1d (padded)",
        2.0,
        None,
        "fwd+bwd",
    ),
]


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


def _scan_case(bench, MambaBlock):
    batch, dim, N, L = _sizes(bench.quick)
    name = f"selective_scan / b{batch}-d{dim}-n{N}-L{L}"
    ours_in = _scan_inputs(batch, dim, N, L, bench.device)
    to_theirs = lambda t, k: t.transpose(1, 2).contiguous() if k in (0, 1, 3, 4) else t
    theirs_in = [to_theirs(t, k) for k, t in enumerate(ours_in)]
    seq_self = types.SimpleNamespace(config=types.SimpleNamespace(d_inner=dim, d_state=N))
    # Norm-wise relative error of a float32 recurrence of L steps: at most about L * 2**-24.
    tol = L * 2.0**-24
    # One exp(delta A) per (batch, channel, state, step) is the work no scan avoids.
    exps = batch * dim * N * L

    case = bench.case(
        name, "fwd", ref.selective_scan(*[t.double() for t in ours_in]), tol, roof=("exp", exps)
    )
    for b in bench.ours("selective_scan"):
        case.run(f"frontiers_fast[{b}]", lambda b=b: ops.selective_scan(*ours_in, backend=b))
    if MambaBlock is not None:
        fn = lambda: MambaBlock.selective_scan(None, *theirs_in)
        case.run("mambapy pscan", fn, check=lambda: fn().transpose(1, 2))
        fn_seq = lambda: MambaBlock.selective_scan_seq(seq_self, *theirs_in)
        case.run("mambapy sequential", fn_seq, check=lambda: fn_seq().transpose(1, 2))

    gen = torch.Generator().manual_seed(1)
    seed = torch.randn(batch, dim, L, generator=gen).to(bench.device)
    x64 = [t.double().requires_grad_(True) for t in ours_in]
    # The float64 truth is autograd through the reference, not our written-out backward.
    expected = list(torch.autograd.grad(ref.selective_scan(*x64), x64, seed.double()))
    del x64
    # The backward needs the exps again (recomputed, or stored and read back).
    case = bench.case(name, "fwd+bwd", expected, tol, memory=True, roof=("exp", 2 * exps))
    xg = [t.clone().requires_grad_(True) for t in ours_in]
    for b in bench.ours("selective_scan"):
        fn = lambda b=b: torch.autograd.grad(ops.selective_scan(*xg, backend=b), xg, seed)
        case.run(f"frontiers_fast[{b}]", fn)
    if MambaBlock is not None:
        tg = [t.clone().requires_grad_(True) for t in theirs_in]
        seed_t = seed.transpose(1, 2).contiguous()
        fn = lambda: torch.autograd.grad(MambaBlock.selective_scan(None, *tg), tg, seed_t)
        # transposing back is its own inverse
        case.run("mambapy pscan", fn, check=lambda: [to_theirs(g, k) for k, g in enumerate(fn())])
        # Its backward scatters each step's gradient into a full (batch, L, dim, N)
        # tensor: quadratic in L, minutes at this size.
        case.skip("mambapy sequential", "backward is quadratic in L (per-step slices of the full tensor)")
    return name, exps


def _exp_floor_ms(bench, exps):
    """b d N L exps at the in-cache rate of torch.exp into a preallocated 1M-float buffer, timed now."""
    z = torch.randn(1 << 20, device=bench.device)
    buf = torch.empty_like(z)
    ms = time_fn(lambda: torch.exp(z, out=buf), bench.device, min_time=0.2, max_reps=200, warmup=3)[0]
    return exps / (1 << 20) * ms


def _bf16_case(bench):
    """The scan with bf16 activations (float32 parameters and accumulation) against our float32."""
    batch, dim, N, L = _sizes(bench.quick)
    u, delta, A, B, C, D = _scan_inputs(batch, dim, N, L, bench.device)
    half = [t.bfloat16() for t in (u, delta, B, C)]
    # the truth of the bf16 values, so that both providers are checked against it
    u16, d16, B16, C16 = half
    expected = ref.selective_scan(
        u16.double(), d16.double(), A.double(), B16.double(), C16.double(), D.double()
    )
    # bf16 output: half a bf16 ulp of rounding on top of the fp32 recurrence
    case = bench.case(f"selective_scan bf16 / b{batch}-d{dim}-n{N}-L{L}", "fwd", expected, 2.0**-8)
    f32 = [t.float() for t in half]
    for b in bench.ours("selective_scan"):
        if b == "reference":
            continue
        case.run(
            f"frontiers_fast[{b}] bf16", lambda b=b: ops.selective_scan(u16, d16, A, B16, C16, D, backend=b)
        )
        case.run(f"float32 inputs (ours, {b})",
                 lambda b=b: ops.selective_scan(f32[0], f32[1], A, f32[2], f32[3], D, backend=b))  # fmt: skip


def _conv_case(bench):
    batch, dim, _, L = _sizes(bench.quick)
    width = 4
    name = f"causal_conv1d silu / b{batch}-d{dim}-w{width}-L{L}"
    gen = torch.Generator().manual_seed(2)
    x, w, b = (
        torch.randn(*s, generator=gen).to(bench.device) for s in ((batch, dim, L), (dim, width), (dim,))
    )

    def padded(x, w, b):  # what mambapy's nn.Conv1d(padding=width-1) computes, cut to L
        return F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=width - 1, groups=dim)[..., :L])

    nbytes = 4 * batch * dim * L  # x read once, out written once
    case = bench.case(name, "fwd", ref.causal_conv1d(x.double(), w.double(), b.double(), "silu"), 1e-5,
                      roof=("dram", 2 * nbytes))  # fmt: skip
    for be in bench.ours("causal_conv1d"):
        case.run(f"frontiers_fast[{be}]", lambda be=be: ops.causal_conv1d(x, w, b, "silu", backend=be))
    case.run("F.conv1d (padded)", lambda: padded(x, w, b))

    seed = torch.randn(batch, dim, L, generator=gen).to(bench.device)
    x64 = [t.double().requires_grad_(True) for t in (x, w, b)]
    expected = list(torch.autograd.grad(ref.causal_conv1d(*x64, "silu"), x64, seed.double()))
    case = bench.case(name, "fwd+bwd", expected, 1e-5, memory=True, roof=("dram", 4 * nbytes))
    xg = [t.clone().requires_grad_(True) for t in (x, w, b)]
    for be in bench.ours("causal_conv1d"):
        fn = lambda be=be: torch.autograd.grad(ops.causal_conv1d(*xg, "silu", backend=be), xg, seed)
        case.run(f"frontiers_fast[{be}]", fn)
    case.run("F.conv1d (padded)", lambda: torch.autograd.grad(padded(*xg), xg, seed))


def _floor_note(bench, name, exps):
    floor = _exp_floor_ms(bench, exps)
    rows = [r for r in bench.results if r.case == name and r.mode == "fwd" and r.status == "ok"]
    lines = [f"Exp floor of `{name}` forward: {exps:,} exps at the in-cache rate of `torch.exp(z, out=buf)` "
             f"on a preallocated 1M-float buffer, timed in this run: {floor:.2f} ms."]  # fmt: skip
    for r in rows:
        if r.provider.startswith("frontiers_fast"):
            lines.append(f"{r.provider}: {r.ms:.2f} ms = {r.ms / floor:.2f}x the floor (goal <= 2x).")
    return " ".join(lines)


def run(bench, out_dir=None):
    MambaBlock = peer("mambapy.mamba", "MambaBlock")
    name, exps = _scan_case(bench, MambaBlock)
    floor = _floor_note(bench, name, exps)
    _bf16_case(bench)
    _conv_case(bench)
    layers = ssm_layers.run(bench, out_dir)
    note = (
        "Selective scan on the semantics shared with mambapy: variable B and C, delta already "
        "positive (mambapy applies softplus and the bias outside its scan), D, no z, zero initial "
        "state; each provider gets its own layout, prepared outside the timed region.  "
        "`frontiers_fast[reference]` is the registered op running the PyTorch reference: a Python "
        "loop over the L time steps forward and a written-out reverse loop backward.  "
        "`mambapy pscan` is `MambaBlock.selective_scan` (Blelloch scan, L padded to a power of two); "
        "`mambapy sequential` is `MambaBlock.selective_scan_seq`, timed forward only because autograd "
        "through its per-step slices is quadratic in L.  Agreement is checked against the float64 "
        "reference (autograd through it for the gradients) with a norm-wise tolerance of L * 2^-24.  "
        "`frontiers_fast[cpp]` is the C++ kernel (SIMD over channels, polynomial exp; the backward "
        "recomputes the states chunk by chunk from checkpoints).  The bf16 case feeds bf16 activations "
        "(float32 A and D, float32 accumulation) and, as its comparison point, the same values in float32."
    )
    return [("Selective scan (Mamba): what is compared", note), ("Selective scan: the exp floor", floor),
            *layers]  # fmt: skip

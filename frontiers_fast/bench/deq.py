"""Fixed-point (DEQ) benchmark cases: Anderson and Broyden solves of a small MLP
cell, forward (the solve) and forward + backward (the DEQ layer with implicit
differentiation), ours against torchdeq on the same cell, start and settings.
Providers and sizes only; the harness does the measuring."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import deq as ops
from ..reference import deq as ref
from .harness import peak_memory_mb, peer, time_interleaved

TARGETS = []  # baselines only for now

B, D = 64, 1024
LIP = 0.5  # Lipschitz bound of the cell: ||W1||_2 = 1, ||W2||_2 = LIP
SETTINGS = dict(max_iter=40, tol=1e-3, stop_mode="abs")
B_SETTINGS = dict(b_max_iter=40, b_tol=1e-6)


class MLPCell(nn.Module):
    """``z -> tanh(W2 relu(W1 z) + x)``, a contraction with constant ``lip``."""

    def __init__(self, dim, hidden=None, lip=LIP, seed=0):
        super().__init__()
        hidden = hidden or dim
        gen = torch.Generator().manual_seed(seed)
        w1 = torch.randn(hidden, dim, generator=gen)
        w2 = torch.randn(dim, hidden, generator=gen)
        self.w1 = nn.Parameter(w1 / torch.linalg.matrix_norm(w1, 2))
        self.w2 = nn.Parameter(lip * w2 / torch.linalg.matrix_norm(w2, 2))

    def forward(self, z, x):
        return torch.tanh(torch.relu(z @ self.w1.T) @ self.w2.T + x)


def _reference_64(cell, x, z0, seed):
    """Float64 fixed point and implicit gradients of the same cell, solved to round-off."""
    c64 = copy.deepcopy(cell).double()
    x64 = x.double().requires_grad_(True)
    f64 = lambda z: c64(z, x64)
    # Plain iteration of a 1/2-contraction: 60 steps reach float64 round-off.
    z64, _ = ref.fixed_point_solve(f64, z0.double(), solver="picard", max_iter=60, tol=1e-12)
    # Warm-started at z64, the layer's forward is one step; the adjoint also contracts by 1/2.
    zg, _ = ops.deq(
        f64, z64, solver="picard", max_iter=60, tol=1e-12, b_solver="picard", b_max_iter=60, b_tol=1e-12
    )
    return z64, [zg.detach(), *torch.autograd.grad(zg, [c64.w1, c64.w2, x64], seed.double())]


def _torchdeq_layer(torchdeq, solver):
    """torchdeq's DEQ layer with our settings and the same forward and backward solver."""
    return torchdeq.get_deq(
        core="indexing", ift=True, f_solver=solver, b_solver=solver, f_max_iter=SETTINGS["max_iter"],
        f_tol=SETTINGS["tol"], f_stop_mode=SETTINGS["stop_mode"], b_max_iter=B_SETTINGS["b_max_iter"],
        b_tol=B_SETTINGS["b_tol"],
    )  # fmt: skip


def run(bench, out_dir=None):
    device, quick = bench.device, bench.quick
    torchdeq = peer("torchdeq")
    get_solver = peer("torchdeq.solver", "get_solver")
    gen = torch.Generator().manual_seed(1)
    cell = MLPCell(D).to(device)
    x = torch.randn(B, D, generator=gen).to(device)
    z0 = torch.zeros(B, D, device=device)
    seed = torch.randn(B, D, generator=gen).to(device)
    f = lambda z: cell(z, x)
    z64, expected_bwd = _reference_64(cell, x, z0, seed)
    zmax = z64.abs().max().item()
    # Every sample's residual is below tol, so ||z - z*|| <= tol / (1 - LIP) (2-norm, hence
    # max-abs); plus float32 round-off of the state.  As the harness's norm-wise error:
    fwd_tol = (SETTINGS["tol"] / (1 - LIP) + 1e-5) / zmax
    xg = x.clone().requires_grad_(True)
    params = [cell.w1, cell.w2, xg]
    fg = lambda z: cell(z, xg)
    # The gradients are taken at a z within tol / (1 - LIP) of z*: f's second derivatives are
    # O(1), so they move by O(1e-3) relative to their scale; the adjoint residual (1e-6, or the
    # float32 floor) adds far less.  Same bound for both providers.
    bwd_tol = 1e-2
    cell_flops = 4 * B * D * D  # one evaluation of f: two [B, D] x [D, D] GEMMs

    steps = []
    for solver in ("anderson", "broyden"):
        name = f"fixed point {solver} / MLP cell b{B}-d{D}"

        def ours_fwd(solver=solver, backend=None):
            with torch.no_grad():
                return ops.fixed_point_solve(f, z0, solver=solver, backend=backend, **SETTINGS)

        row = {"solver": solver, "ours": ours_fwd()[1]}
        # The f evaluations the solve makes are its unavoidable GEMM work (one per step, plus the first).
        evals = int(row["ours"]["nstep"].max()) + 1
        case = bench.case(name, "fwd", z64.float(), fwd_tol, roof=("gemm_fp32", evals * cell_flops))
        # The fast backends, then the reference loop (the same solver on torch ops) as a baseline.
        for b in [*bench.ours("fixed_point_solve"), "reference"]:
            case.run(f"frontiers_fast[{b}]", lambda b=b: ours_fwd(backend=b)[0])
        if get_solver is not None:

            def theirs_fwd(solver=solver):
                with torch.no_grad():
                    z, _, info = get_solver(solver)(f, z0, **SETTINGS)
                return z, info

            case.run("torchdeq", lambda: theirs_fwd()[0])
            row["torchdeq"] = theirs_fwd()[1]
        steps.append(row)

        case = bench.case(name, "fwd+bwd", expected_bwd, bwd_tol, memory=not quick)

        def ours_bwd(solver=solver, backend=None):
            z, _ = ops.deq(fg, z0, solver=solver, b_solver=solver, backend=backend, **SETTINGS, **B_SETTINGS)
            return [z.detach(), *torch.autograd.grad(z, params, seed)]

        for b in [*bench.ours("deq"), "reference"]:
            case.run(f"frontiers_fast[{b}]", lambda b=b: ours_bwd(backend=b))
        if torchdeq is not None:
            layer = _torchdeq_layer(torchdeq, solver)

            def theirs_bwd(layer=layer):
                z = layer(fg, z0)[0][-1]
                return [z.detach(), *torch.autograd.grad(z, params, seed)]

            case.run("torchdeq", theirs_bwd)
    sections = [
        (
            "Fixed-point solver steps (forward solve, batch 64)",
            _steps_table(steps, (bench.ours("fixed_point_solve") or ["reference"])[0]),
        )
    ]
    if device == "cpu" or get_solver is not None:
        sections.append(("Fixed-point targets", _targets(bench, get_solver, torchdeq, quick)))
    return sections


def _steps_table(rows, ours_label):
    lines = [
        f"Same MLP cell (d={D}, Lipschitz <= {LIP}), z0 = 0, max_iter {SETTINGS['max_iter']}, "
        f"tol {SETTINGS['tol']:g} ({SETTINGS['stop_mode']}). Steps: the step of each sample's best "
        "estimate (max / mean over the batch); residual: the largest per-sample lowest residual.",
        "",
        "| solver | provider | steps (max) | steps (mean) | max abs residual |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        for name in ("ours", "torchdeq"):
            info = row.get(name)
            if info is None:
                continue
            provider = f"frontiers_fast[{ours_label}]" if name == "ours" else "torchdeq"
            n = info["nstep"].double()
            lines.append(
                f"| {row['solver']} | {provider} | {int(n.max())} | {n.mean().item():.1f} "
                f"| {info['abs_lowest'].max().item():.2e} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the targets: solver overhead, the layer end to end, Broyden's memory
# ---------------------------------------------------------------------------
class _Counted:
    """f with a call counter (the solver's evaluations of f)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, z):
        self.n += 1
        return self.f(z)


def _overhead(device, f, z0, ours, theirs, min_time):
    """(our ms, their ms, f ms, our f calls, their f calls) for one solve each, timed in alternation.

    Overhead is a solve's time minus its number of f calls times one call of f alone."""
    fo, ft = _Counted(f), _Counted(f)
    with torch.no_grad():
        ours(fo, z0)
        theirs(ft, z0) if theirs else None
    n_ours, n_theirs = fo.n, ft.n
    fns = [lambda: ours(f, z0), lambda: f(z0)] + ([lambda: theirs(f, z0)] if theirs else [])
    with torch.no_grad():
        times = [t[0] for t in time_interleaved(fns, device, min_time)]
    t_ours, t_f = times[0], times[1]
    t_theirs = times[2] if theirs else None
    return t_ours, t_theirs, t_f, n_ours, n_theirs


def _targets(bench, get_solver, torchdeq, quick):
    device = bench.device
    min_time = 0.3 if quick else 1.0
    gen = torch.Generator().manual_seed(3)
    rows = []

    def cell(Bn, Dn):
        W = torch.randn(Dn, Dn, generator=gen)
        W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).to(device)
        x = torch.randn(Bn, Dn, generator=gen).to(device)
        return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(Bn, Dn, device=device)

    steps = 30
    fixed = dict(max_iter=steps, tol=0.0, stop_mode="abs")  # tol 0: every solve takes all 30 steps
    for solver, Bn, Dn, target, per_step in (
        ("anderson", B, D, 4.0, False),
        ("broyden", B, D, 8.0, False),
        ("anderson", 4, 64, 3.0, True),
    ):
        f, z0 = cell(Bn, Dn)
        extra = dict(m=6) if solver == "anderson" else {}
        ours = lambda f, z0, solver=solver, extra=extra: ops.fixed_point_solve(
            f, z0, solver=solver, **fixed, **extra
        )
        theirs = None
        if get_solver is not None:
            theirs = lambda f, z0, solver=solver, extra=extra: get_solver(solver)(f, z0, **fixed, **extra)
        t_o, t_t, t_f, n_o, n_t = _overhead(device, f, z0, ours, theirs, min_time)
        ov_o, ov_t = t_o - n_o * t_f, (t_t - n_t * t_f) if t_t is not None else None
        what = f"{solver}{' (m 6)' if solver == 'anderson' else ''}, tanh(Wz + x), B{Bn} D{Dn} fp32, {steps} steps"
        unit = "per step" if per_step else "per solve"
        scale = 1 / steps if per_step else 1.0
        if ov_t is None:
            rows.append((what, f"solver overhead {unit}", f"ours {ov_o * scale:.3f} ms; torchdeq not installed",
                         f">= {target:g}x less", "not run"))  # fmt: skip
            continue
        ratio = ov_t / ov_o if ov_o > 0 else float("inf")
        rows.append((
            what, f"solver overhead {unit}",
            f"{ratio:.2f}x less: ours {ov_o * scale:.3f} ms vs torchdeq {ov_t * scale:.3f} ms "
            f"(f alone {t_f:.3f} ms; calls {n_o} / {n_t}); f is {100 * n_o * t_f / t_o:.0f}% of our solve, "
            f"{100 * n_t * t_f / t_t:.0f}% of torchdeq's",
            f">= {target:g}x less", "met" if ratio >= target else "missed",
        ))  # fmt: skip

    # The layer, forward + implicit backward, on the report's MLP cell (the fwd+bwd case above, timed here
    # in alternation with torchdeq's layer with the same solvers).
    if torchdeq is not None:
        gen2 = torch.Generator().manual_seed(1)
        mlp = MLPCell(D).to(device)
        x = torch.randn(B, D, generator=gen2).to(device).requires_grad_(True)
        z0 = torch.zeros(B, D, device=device)
        seed = torch.randn(B, D, generator=gen2).to(device)
        fg = lambda z: mlp(z, x)
        params = [mlp.w1, mlp.w2, x]
        for solver in ("anderson", "broyden"):
            layer = _torchdeq_layer(torchdeq, solver)

            def ours_layer(solver=solver):
                z, _ = ops.deq(fg, z0, solver=solver, b_solver=solver, **SETTINGS, **B_SETTINGS)
                return torch.autograd.grad(z, params, seed)

            def theirs_layer(layer=layer):
                z = layer(fg, z0)[0][-1]
                return torch.autograd.grad(z, params, seed)

            t_o, t_t = (t[0] for t in time_interleaved([ours_layer, theirs_layer], device, min_time))
            ratio = t_t / t_o
            rows.append((
                f"DEQ layer ({solver}), forward + implicit backward, MLP cell B{B} D{D}", "torchdeq's layer",
                f"{ratio:.2f}x (ours {t_o:.1f} ms, torchdeq {t_t:.1f} ms)", ">= 1.5x",
                "met" if ratio >= 1.5 else "missed",
            ))  # fmt: skip

    # Broyden's buffers: max_iter 100, B64 D1024 (peak bytes allocated during one solve).
    if not quick:
        f, z0 = cell(B, D)
        big = dict(max_iter=100, tol=0.0, stop_mode="abs")
        mem = {
            "ours, full memory": peak_memory_mb(
                lambda: ops.fixed_point_solve(f, z0, solver="broyden", **big), device
            ),
            "ours, memory=8": peak_memory_mb(
                lambda: ops.fixed_point_solve(f, z0, solver="broyden", memory=8, **big), device
            ),
        }
        if get_solver is not None:
            mem["torchdeq"] = peak_memory_mb(lambda: get_solver("broyden")(f, z0, **big), device)
        text = "; ".join(f"{k} {v:.0f} MB" for k, v in mem.items())
        if "torchdeq" in mem:
            ratio = mem["torchdeq"] / mem["ours, memory=8"]
            rows.append(("Broyden, max_iter 100, B64 D1024 fp32", "peak memory vs torchdeq",
                         f"{text}: {ratio:.1f}x less with memory=8", ">= 4x less with memory=8",
                         "met" if ratio >= 4 else "missed"))  # fmt: skip
        else:
            rows.append(("Broyden, max_iter 100, B64 D1024 fp32", "peak memory", text, "report", "reported"))
    lines = [
        "Solver overhead: a solve's time minus its number of f calls times the time of one call of f alone, "
        "all timed in alternation in this run (tol 0, so every solve takes all its steps). Our solver is the "
        "loop of fused kernels of the device's backend (C++ on the CPU: one anderson_step per Anderson step; "
        "broyden_residual and broyden_step per Broyden step; one solver_record each), with convergence read "
        "on the host every 4 steps.",
        "",
        "| case | measure | measured | target | result |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines)

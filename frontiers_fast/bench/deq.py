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
from .harness import peer

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

        def ours_fwd(solver=solver):
            with torch.no_grad():
                return ops.fixed_point_solve(f, z0, solver=solver, **SETTINGS)

        row = {"solver": solver, "ours": ours_fwd()[1]}
        # The f evaluations the solve makes are its unavoidable GEMM work (one per step, plus the first).
        evals = int(row["ours"]["nstep"].max()) + 1
        case = bench.case(name, "fwd", z64.float(), fwd_tol, roof=("gemm_fp32", evals * cell_flops))
        case.run("frontiers_fast[reference]", lambda: ours_fwd()[0])
        if get_solver is not None:

            def theirs_fwd(solver=solver):
                with torch.no_grad():
                    z, _, info = get_solver(solver)(f, z0, **SETTINGS)
                return z, info

            case.run("torchdeq", lambda: theirs_fwd()[0])
            row["torchdeq"] = theirs_fwd()[1]
        steps.append(row)

        case = bench.case(name, "fwd+bwd", expected_bwd, bwd_tol, memory=not quick)

        def ours_bwd(solver=solver):
            z, _ = ops.deq(fg, z0, solver=solver, b_solver=solver, **SETTINGS, **B_SETTINGS)
            return [z.detach(), *torch.autograd.grad(z, params, seed)]

        case.run("frontiers_fast[reference]", ours_bwd)
        if torchdeq is not None:
            layer = torchdeq.get_deq(
                core="indexing", ift=True, f_solver=solver, b_solver=solver, f_max_iter=SETTINGS["max_iter"],
                f_tol=SETTINGS["tol"], f_stop_mode=SETTINGS["stop_mode"], b_max_iter=B_SETTINGS["b_max_iter"],
                b_tol=B_SETTINGS["b_tol"],
            )  # fmt: skip

            def theirs_bwd(layer=layer):
                z = layer(fg, z0)[0][-1]
                return [z.detach(), *torch.autograd.grad(z, params, seed)]

            case.run("torchdeq", theirs_bwd)
    return [("Fixed-point solver steps (forward solve, batch 64)", _steps_table(steps))]


def _steps_table(rows):
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
            provider = "frontiers_fast[reference]" if name == "ours" else "torchdeq"
            n = info["nstep"].double()
            lines.append(
                f"| {row['solver']} | {provider} | {int(n.max())} | {n.mean().item():.1f} "
                f"| {info['abs_lowest'].max().item():.2e} |"
            )
    return "\n".join(lines)

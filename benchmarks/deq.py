"""pytest-benchmark suite for the fixed-point (DEQ) solvers, for tracking regressions:

    .venv/bin/python -m pytest benchmarks/deq.py --benchmark-only --benchmark-json=out.json

The comparative report (torchdeq, agreement checks) is `python -m frontiers_fast.bench --family deq`;
this suite times our own solver and layer on the bench's MLP cell so a change
can be compared with `--benchmark-compare`.
"""

import pytest
import torch

from frontiers_fast.bench.deq import SETTINGS, MLPCell
from frontiers_fast.ops import deq as ops

B, D = 64, 1024


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    return MLPCell(D), torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
def test_solve(benchmark, problem, solver):
    cell, x, _ = problem
    z0 = torch.zeros(B, D)
    with torch.no_grad():
        benchmark(lambda: ops.fixed_point_solve(lambda z: cell(z, x), z0, solver=solver, **SETTINGS))


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_layer_fwd_bwd(benchmark, problem, backward):
    cell, x, seed = problem
    z0 = torch.zeros(B, D)
    params = list(cell.parameters())

    def step():
        z, _ = ops.deq(lambda z: cell(z, x), z0, backward=backward, pg_steps=2, **SETTINGS)
        return torch.autograd.grad(z, params, seed)

    benchmark(step)

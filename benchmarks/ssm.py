"""pytest-benchmark suite for the selective-scan (Mamba) ops, for tracking regressions:

    .venv/bin/python -m pytest benchmarks/ssm.py --benchmark-only --benchmark-json=out.json

The comparative report (mambapy, F.conv1d, memory) is `python -m frontiers_fast.bench`;
this suite times our own ops on fixed inputs so a change can be compared with
`--benchmark-compare`.
"""

import pytest
import torch

from frontiers_fast.bench.ssm import _scan_inputs
from frontiers_fast.ops import ssm as ops

BATCH, DIM, N, L = 2, 256, 16, 2048


@pytest.fixture(scope="module")
def scan_inputs():
    return _scan_inputs(BATCH, DIM, N, L, "cpu")


def test_selective_scan_fwd(benchmark, scan_inputs):
    benchmark(lambda: ops.selective_scan(*scan_inputs))


def test_selective_scan_fwd_bwd(benchmark, scan_inputs):
    xs = [t.clone().requires_grad_(True) for t in scan_inputs]
    benchmark(lambda: torch.autograd.grad(ops.selective_scan(*xs).sum(), xs))


def test_selective_state_update(benchmark, scan_inputs):
    u, delta, A, B, C, D = scan_inputs
    state = torch.zeros(BATCH, DIM, N)
    benchmark(lambda: ops.selective_state_update(state, u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D))


def test_causal_conv1d_fwd_bwd(benchmark):
    x = torch.randn(BATCH, DIM, L, requires_grad=True)
    w = torch.randn(DIM, 4, requires_grad=True)
    benchmark(lambda: torch.autograd.grad(ops.causal_conv1d(x, w, activation="silu").sum(), [x, w]))

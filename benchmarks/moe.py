"""pytest-benchmark suite for the MoE dispatch ops, for tracking regressions:

    .venv/bin/python -m pytest benchmarks/moe.py --benchmark-only --benchmark-json=out.json

The comparative report (transformers' Mixtral block, agreement, memory) is
`python -m frontiers_fast.bench`; this suite times our own ops on fixed
inputs so a change can be compared with `--benchmark-compare`.
"""

import pytest
import torch

from frontiers_fast.ops import moe

T, H, INTER, E, TOP = 512, 1024, 2816, 8, 2


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen)
    w_gate_up = torch.randn(E, 2 * INTER, H, generator=gen) / H**0.5
    w_down = torch.randn(E, H, INTER, generator=gen) / INTER**0.5
    logits = torch.randn(T, E, generator=gen)
    return x, w_gate_up, w_down, logits


def test_route(benchmark, inputs):
    logits = inputs[3]
    benchmark(lambda: moe.moe_route(logits, TOP))


def test_route_grouped_sigmoid(benchmark):
    logits, bias = torch.randn(T, 256), torch.randn(256) * 0.1
    benchmark(
        lambda: moe.moe_route(
            logits, 8, "sigmoid", correction_bias=bias, n_group=8, topk_group=4, scaling=2.5
        )
    )


def test_permute_unpermute(benchmark, inputs):
    x, _, _, logits = inputs
    w, ids = moe.moe_route(logits, TOP)

    def fn():
        x_perm, _, row_map = moe.moe_permute(x, ids, E)
        return moe.moe_unpermute(x_perm, row_map, w)

    benchmark(fn)


def test_fused_moe_fwd(benchmark, inputs):
    x, w_gate_up, w_down, logits = inputs
    w, ids = moe.moe_route(logits, TOP)
    benchmark(lambda: moe.fused_moe(x, w_gate_up, w_down, w, ids))


def test_fused_moe_fwd_bwd(benchmark, inputs):
    x, w_gate_up, w_down, logits = inputs
    w, ids = moe.moe_route(logits, TOP)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_gate_up, w_down, w)]
    benchmark(lambda: torch.autograd.grad(moe.fused_moe(*leaves, ids).sum(), leaves))

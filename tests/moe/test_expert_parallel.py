"""expert_parallel on real gloo process groups: 2 and 4 ranks spawned on 127.0.0.1.

Each rank feeds different tokens (different counts too, one rank none at
all in one round).  The reference is the unsharded block on every rank's
tokens at once: routing is per token, so its output and input gradient on
rank r's slice are what rank r must get, and its weight gradients are the
sums over all ranks' tokens, which a local expert's gradient must equal
(the replicated parameters' ones after all_reduce_replicated_grads).

One spawn per world size runs every check (process start-up dominates).  A
rank that fails raises in its process, which fails the test with its
traceback; a spawn still running past its deadline means a collective
hung, and fails the test too.
"""

from __future__ import annotations

import copy
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from frontiers_fast.distributed import (
    ExpertParallelError,
    ExpertParallelExperts,
    all_reduce_replicated_grads,
    expert_parallel,
)
from frontiers_fast.nn import moe as nn_moe

from ..helpers import assert_close

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

H, INTER, E = 16, 12, 8  # E divisible by 2 and 4
COLLECTIVE_TIMEOUT = timedelta(seconds=30)  # the process group's: a hang inside a collective raises
SPAWN_DEADLINE = 120.0  # whole spawn, start-up included (four ranks share two cores)


# ---------------------------------------------------------------------------
# spawning
# ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, check, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        check(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(check, world, *args):
    ctx = mp.spawn(_entry, args=(world, _free_port(), check, args), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException when a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{world} ranks still running after {SPAWN_DEADLINE:.0f} s: a collective hung")


# ---------------------------------------------------------------------------
# what the ranks run
# ---------------------------------------------------------------------------
def _make(kind, dtype):
    """The same full block on every rank (one seed), as loaded from one checkpoint."""
    torch.manual_seed(0)
    if kind == "mixtral":
        block = nn_moe.MixtralSparseMoeBlock(hidden_size=H, intermediate_size=INTER, num_experts=E, top_k=2)
    elif kind == "qwen3":
        block = nn_moe.Qwen3MoeSparseMoeBlock(hidden_size=H, intermediate_size=INTER, num_experts=E, top_k=3)
    else:
        block = nn_moe.DeepseekV3MoE(
            hidden_size=H, intermediate_size=INTER, num_experts=E, top_k=3, n_group=4, topk_group=2
        )
        with torch.no_grad():
            block.gate.e_score_correction_bias.copy_(torch.randn(E) * 0.3)
    return block.to(dtype)


def _tokens(counts, dtype, seed, shape=None):
    """Every rank's tokens (and output gradients): each rank can build all of them from the seeds."""
    out = []
    for r, n in enumerate(counts):
        g = torch.Generator().manual_seed(seed + r)
        out.append(torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype))
    return out


def _check_round(rank, world, ep, ref, xs, gs, batch_dims=False):
    """One forward and backward on every rank against the unsharded block on all tokens."""
    for p in (*ep.parameters(), *ref.parameters()):
        p.grad = None
    x = xs[rank].clone().requires_grad_(True)
    x_in = x.unsqueeze(0) if batch_dims else x  # [1, T, H]: the blocks take [..., H]
    out = ep(x_in)
    assert out.shape == x_in.shape
    out.reshape(x.shape).mul(gs[rank]).sum().backward()
    all_reduce_replicated_grads(ep)

    X = torch.cat(xs).requires_grad_(True)
    want = ref(X)
    want.mul(torch.cat(gs)).sum().backward()
    lo = sum(t.shape[0] for t in xs[:rank])
    rows = slice(lo, lo + xs[rank].shape[0])
    assert_close(out.reshape(x.shape).detach(), want[rows].detach(), msg="output")
    assert_close(x.grad, X.grad[rows], msg="input gradient")

    n = E // world
    local = slice(rank * n, (rank + 1) * n)
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        full = ref_params[name].grad
        if name.startswith("experts."):
            assert p.shape[0] == n, name
            assert_close(p.detach(), ref_params[name].detach()[local], msg=f"{name}: the shard")
            assert_close(p.grad, full[local], msg=f"{name}.grad: summed over every rank's tokens")
        else:
            assert_close(p.grad, full, msg=f"{name}.grad after all_reduce_replicated_grads")


def _check_matches_unsharded(rank, world):
    for kind, dtype in (
        ("mixtral", torch.float64),
        ("mixtral", torch.float32),
        ("mixtral", torch.bfloat16),
        ("qwen3", torch.float64),
        ("deepseek", torch.float64),
    ):
        block = _make(kind, dtype)
        ref = copy.deepcopy(block)
        ep = expert_parallel(block)
        assert ep is block and isinstance(ep, type(ref)), "sharded in place, still a block of its class"
        assert isinstance(ep.experts, ExpertParallelExperts)
        assert ep.experts.expert_start == rank * (E // world)
        assert ep.experts.gate_up_proj.shape == (E // world, 2 * INTER, H)
        if kind == "deepseek":  # the shared experts stay whole on every rank
            assert ep.shared_experts.gate_proj.weight.shape == ref.shared_experts.gate_proj.weight.shape
        counts = [3 + 4 * r for r in range(world)]
        _check_round(rank, world, ep, ref, _tokens(counts, dtype, 100), _tokens(counts, dtype, 200))
        # a rank with no tokens still takes part; [1, T, H] inputs
        counts = [5 + r for r in range(world - 1)] + [0]
        xs, gs = _tokens(counts, dtype, 300), _tokens(counts, dtype, 400)
        _check_round(rank, world, ep, ref, xs, gs, batch_dims=True)

    # Every token routed to rank 0's experts: the other ranks receive no rows and their experts no gradient.
    ref = _make("mixtral", torch.float64)
    u = torch.randn(H, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    u = u / u.norm()
    with torch.no_grad():
        sign = torch.where(torch.arange(E) < E // world, 1.0, -1.0).double()
        ref.gate.weight.copy_(5.0 * sign[:, None] * u + 0.1 * ref.gate.weight)
    ep = expert_parallel(copy.deepcopy(ref))
    xs = [u + 0.1 * x for x in _tokens([6] * world, torch.float64, 500)]
    _check_round(rank, world, ep, ref, xs, _tokens([6] * world, torch.float64, 600))
    if rank:
        assert not ep.experts.gate_up_proj.grad.any()


def _expect(rank, bad, fn, own_error, own_match):
    """``fn()`` raises ``own_error`` on rank ``bad`` and ExpertParallelError naming it on the others."""
    if rank == bad:
        with pytest.raises(own_error, match=own_match):
            fn()
    else:
        with pytest.raises(ExpertParallelError, match=rf"rank\(s\) \[{bad}\].*{own_match}"):
            fn()


def _check_bad_input(rank, world):
    bad = world - 1
    block = _make("mixtral", torch.float64)
    ref = copy.deepcopy(block)
    ep = expert_parallel(block)
    x = _tokens([4 + rank], torch.float64, 700 + rank)[0]

    # Failures before any row is sent, on one rank only: every rank raises, and nobody hangs.
    wide = torch.randn(4, H + 1, dtype=torch.float64) if rank == bad else x
    _expect(rank, bad, lambda: ep(wide), ValueError, "hidden_states")  # in the router
    nan = x.clone()
    if rank == bad:
        nan[1, 2] = float("nan")
    _expect(rank, bad, lambda: ep(nan), ValueError, "NaN")  # router logits
    ids = torch.randint(0, E, (x.shape[0], 2), dtype=torch.int32)
    if rank == bad:
        ids[0, 1] = E
    w = torch.rand(x.shape[0], 2, dtype=torch.float64)
    _expect(rank, bad, lambda: ep.experts(x, ids, w), ValueError, "top_k_index")  # inside the experts

    # The group is still in step: a good round after the failures.
    counts = [2 + 3 * r for r in range(world)]
    _check_round(
        rank, world, ep, ref, _tokens(counts, torch.float64, 800), _tokens(counts, torch.float64, 900)
    )

    # Blocks expert_parallel refuses, on every rank.
    with pytest.raises(ValueError, match="already sharded"):
        expert_parallel(ep)
    odd = nn_moe.MixtralSparseMoeBlock(hidden_size=H, intermediate_size=INTER, num_experts=world + 1, top_k=2)
    with pytest.raises(ValueError, match=rf"E={world + 1}.*divisible by the group's world size {world}"):
        expert_parallel(odd)
    partial = _make("mixtral", torch.float64)
    partial.experts = nn_moe.MoeExperts(H, INTER, E // world)
    with pytest.raises(ValueError, match="look sharded already"):
        expert_parallel(partial)
    marked = _make("mixtral", torch.float64)
    marked.experts.sharded = True
    with pytest.raises(ValueError, match="marked sharded"):
        expert_parallel(marked)
    assert isinstance(marked.experts, nn_moe.MoeExperts), "a refused block is left as it was"

    # ... and on one rank only: the others raise too.
    not_a_block = torch.nn.Linear(H, H) if rank == bad else _make("mixtral", torch.float64)
    _expect(rank, bad, lambda: expert_parallel(not_a_block), TypeError, "must have .experts")
    size = H + 2 if rank == bad else H
    other = nn_moe.MixtralSparseMoeBlock(hidden_size=size, intermediate_size=INTER, num_experts=E, top_k=2)
    with pytest.raises(ValueError, match="same sizes on every rank"):
        expert_parallel(other)


# ---------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------
def _check_all(rank, world):
    _check_matches_unsharded(rank, world)
    _check_bad_input(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel(world):
    """Outputs and gradients equal the unsharded block's; bad input raises on every rank (one spawn)."""
    _spawn(_check_all, world)


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(_make("mixtral", torch.float32))


def test_time_split_runs():
    from frontiers_fast.bench.moe_ep import time_split

    split = time_split(T=6, H=8, I=12, E=4, top_k=2, world=2, repeats=2)
    phases = ("total", "routing", "permute", "all_to_all", "compute", "combine")
    for name in (*phases, "all_to_all_counts", "all_to_all_tokens", "all_to_all_return"):
        assert split[name] > 0.0, name
    assert split["total"] >= split["compute"]
    assert split["world"] == 2 and split["T"] == 6

"""Where an expert-parallel MoE forward spends its time: routing, the all-to-alls, the local experts, the combine.

:func:`time_split` spawns ``world`` gloo ranks on this machine; under
``torchrun`` the same measurement runs in the launched process group::

    torchrun --nproc-per-node 2 -m frontiers_fast.bench.moe_ep --tokens 256 --dtype bfloat16

Each rank feeds ``T`` fresh tokens of its own to a Mixtral-shaped block
(fan-in scaled weights, the same on every rank) sharded by
:func:`frontiers_fast.distributed.expert_parallel`, forward only.  Phases
are timed with a clock that synchronises the device at each boundary.
Each phase's figure is the slowest rank's time in a repeat, and the
median over repeats: a rank waiting for a slower peer shows as time in the
all-to-all that follows (the count exchange absorbs routing imbalance).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

# The phases of one forward, as (name, from mark, to mark) of the clock.
_PHASES = (
    ("total", "start", "end"),
    ("routing", "route_begin", "routing"),
    ("permute", "begin", "permute"),
    ("all_to_all_counts", "permute", "counts"),
    ("all_to_all_tokens", "counts", "tokens"),
    ("compute", "tokens", "compute"),
    ("all_to_all_return", "compute", "return"),
    ("combine", "return", "combine"),
)
_A2A = ("all_to_all_counts", "all_to_all_tokens", "all_to_all_return")


def _measure(T, H, inter, E, top_k, dtype, repeats, device) -> dict | None:
    """The split on the current process group; the dict on rank 0, None elsewhere."""
    from ..distributed import expert_parallel
    from ..nn.moe import MixtralSparseMoeBlock

    rank = dist.get_rank()
    torch.manual_seed(0)  # the same full weights on every rank, as from one checkpoint
    block = MixtralSparseMoeBlock(hidden_size=H, intermediate_size=inter, num_experts=E, top_k=top_k)
    block = expert_parallel(block.to(device=device, dtype=dtype))
    gen = torch.Generator().manual_seed(1000 + rank)

    marks: dict[str, float] = {}

    def clock(name):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks[name] = time.perf_counter()

    block.experts._clock = clock
    block.gate.register_forward_pre_hook(lambda m, a: clock("route_begin"))
    block.gate.register_forward_hook(lambda m, a, o: clock("routing"))
    rows = []
    with torch.no_grad():
        for i in range(repeats + 1):  # the first call warms up
            x = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
            marks.clear()
            clock("start")
            block(x)
            clock("end")
            if i:
                rows.append([(marks[b] - marks[a]) * 1e3 for _, a, b in _PHASES])
    table = torch.tensor(rows, dtype=torch.float64, device=device)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    if rank:
        return None
    cols = dict(zip((name for name, _, _ in _PHASES), table.cpu().T.tolist()))
    # Summed per repeat before the median: the three exchanges of one forward.
    cols["all_to_all"] = [sum(parts) for parts in zip(*(cols[n] for n in _A2A))]
    return {name: statistics.median(col) for name, col in cols.items()}


def _spawned(rank, world, port, path, args):
    *sizes, dtype, repeats, threads = args
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=5),
    )
    try:
        out = _measure(*sizes, dtype, repeats, torch.device("cpu"))
        if out is not None:
            with open(path, "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_split(
    T: int,
    H: int,
    I: int,  # noqa: E741 (the intermediate size, named as in the issue's tables)
    E: int,
    top_k: int,
    world: int = 2,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    threads: int | None = None,
) -> dict:
    """Median milliseconds of one expert-parallel forward over ``world`` spawned gloo ranks on this CPU.

    Every rank feeds ``T`` tokens of width ``H`` to a block of ``E``
    experts (intermediate size ``I``, ``top_k`` per token), ``E/world`` per
    rank.  ``threads``: torch threads per rank (default: the cores shared
    out, at least 1).  Returns ``total``, ``routing``, ``permute`` (grouping
    rows by expert), ``all_to_all`` (the sum of ``all_to_all_counts``,
    ``all_to_all_tokens`` and ``all_to_all_return``, also given),
    ``compute`` (the local experts) and ``combine``, in ms, plus the
    arguments.  Each phase is the slowest rank's, taken phase by phase, so
    the phases need not add up to ``total`` (nor does the glue between
    them show anywhere but in ``total``).

    Example::

        >>> split = time_split(T=256, H=1024, I=2816, E=8, top_k=2, world=2)
        >>> split["compute"] / split["all_to_all"]
    """
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "split.json")
        args = (T, H, I, E, top_k, dtype, repeats, threads)
        mp.spawn(_spawned, args=(world, _free_port(), path, args), nprocs=world, join=True)
        with open(path) as f:
            out = json.load(f)
    out.update(T=T, H=H, I=I, E=E, top_k=top_k, world=world, dtype=str(dtype).replace("torch.", ""))
    out.update(repeats=repeats, threads=threads)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m frontiers_fast.bench.moe_ep", description=__doc__.split("\n")[0]
    )
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--world", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    sizes = (a.tokens, a.hidden, a.intermediate, a.experts, a.top_k)
    if "RANK" in os.environ:  # launched by torchrun: measure in its process group
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        try:
            split = _measure(*sizes, dtype, a.repeats, device)
        finally:
            dist.destroy_process_group()
        if split is None:
            return
    else:
        split = time_split(*sizes, world=a.world, dtype=dtype, repeats=a.repeats)
    for name in ("total", "routing", "permute", "all_to_all", *_A2A, "compute", "combine"):
        print(f"{name:<18} {split[name]:9.3f} ms")


if __name__ == "__main__":
    main()

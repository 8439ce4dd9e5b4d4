"""Expert parallelism for the MoE blocks over ``torch.distributed``.

:func:`expert_parallel` shards a block that holds all E experts (as loaded
from a checkpoint) so that rank r of a group of W keeps only the contiguous
experts ``[r E/W, (r+1) E/W)``.  Everything else in the block (the router,
a DeepSeek-V3 block's shared experts, the jitter noise) stays replicated
and runs on each rank's own tokens.  One forward:

1. the block routes its tokens locally with its own router;
2. the (token, slot) rows are grouped by expert (``moe_permute``), the
   per-expert row counts are exchanged with ``all_to_all_single`` (one host
   read of the split sizes), then the rows themselves, so that each row
   lands on the rank owning its expert; the receiver rebuilds each row's
   local expert id from the counts, so no ids travel;
3. the owner runs its local experts on the rows it received (``fused_moe``
   with unit weights: the router weights never leave the token's rank);
4. the expert outputs travel back along the reverse split, and each token
   sums its k rows, weighted, in slot order (``moe_unpermute``): the
   combine is deterministic.

Autograd runs through both row exchanges (the backward of an all-to-all is
the all-to-all with the splits swapped), so gradients reach the input, the
router and the local expert weights.  Every rank must therefore run the
backward of every expert-parallel forward, in the same order, as with DDP.

Gradients.  A local expert's weight gradient is summed over the tokens of
*every* rank, exactly as the unsharded block's would be on all ranks'
tokens together.  The replicated parameters (router, shared experts, the
rest of the model) only see their own rank's tokens: sum them with
:func:`all_reduce_replicated_grads` (a sum, not DDP's mean, so that both
kinds agree with the unsharded gradient of the sum of the ranks' losses;
scale the loss by 1/W for a mean).  Do not wrap the sharded block in DDP
over the same group: it would average different experts' gradients.

Failures.  A rank whose forward fails before its rows are sent (bad input,
a router error) does not leave its peers waiting: the count exchange
carries an error flag, every rank learns who failed, the failing rank
raises its own error and the others raise :class:`ExpertParallelError`,
and the group stays usable.  :func:`expert_parallel` agrees the same way on
the block's sizes.  A failure later (inside the local expert computation,
or in the backward) is covered only by the process group's timeout.

Works with any backend that has ``all_to_all_single``: gloo on CPU, NCCL
on GPU (the small control tensors live on the device of the experts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .nn.moe import MoeExperts, check_expert_inputs
from .ops.moe import ACTIVATIONS, fused_moe, moe_permute, moe_unpermute

__all__ = [
    "ExpertParallelError",
    "ExpertParallelExperts",
    "all_reduce_replicated_grads",
    "expert_parallel",
    "replicated_parameters",
]


class ExpertParallelError(RuntimeError):
    """Raised on every healthy rank when a peer's part of an expert-parallel step failed."""


# ---------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send`` to the ranks, rows received concatenated by ``recv``.

    The backward is the same exchange with the splits swapped; written here
    rather than taken from ``torch.distributed.nn``, whose functional
    collectives are deprecated.
    """

    @staticmethod
    def forward(ctx, x, recv, send, group):
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _AllToAll.apply(grad_out, ctx.send, ctx.recv, ctx.group), None, None, None


def _control_device(group, hint: torch.device | None) -> torch.device:
    """Where the tiny flag and count tensors go: NCCL takes only CUDA tensors, gloo CPU ones."""
    if hint is not None:
        return hint
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _fail_together(failed: list[int], error: BaseException | None, group, what: str) -> None:
    """Raise on every rank once the ranks in ``failed`` are known to all.

    The failing ranks re-raise their own error; the others raise
    :class:`ExpertParallelError` carrying the failing ranks' messages (one
    object all-gather, on this failure path only).
    """
    try:
        msgs: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(msgs, None if error is None else _describe(error), group=group)
    except Exception:  # the messages are a courtesy: the failure itself is already agreed
        msgs = [None] * dist.get_world_size(group)
    if error is not None:
        raise error
    detail = "; ".join(f"rank {r}: {msgs[r] or 'failed'}" for r in failed)
    raise ExpertParallelError(
        f"{what} failed on rank(s) {failed} of {dist.get_world_size(group)} ({detail}); "
        "this rank raises too instead of waiting for them"
    )


# ---------------------------------------------------------------------------
# the sharded experts
# ---------------------------------------------------------------------------
class ExpertParallelExperts(nn.Module):
    """This rank's share of a block's experts, dispatching tokens to their owners.

    A drop-in for :class:`frontiers_fast.nn.moe.MoeExperts` inside its block:
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``,
    with ``top_k_index`` holding *global* expert ids in ``[0, num_experts)``.
    Holds ``gate_up_proj`` [E/W, 2I, H] and ``down_proj`` [E/W, H, I], the
    experts ``expert_start ... expert_start + num_local_experts - 1``.

    It is a collective: every rank of the group must call it the same
    number of times (with any number of tokens, zero included).
    """

    # expert_parallel refuses experts modules carrying a true ``sharded``.
    sharded = True

    def __init__(self, experts: nn.Module, group, rank: int, world: int):
        super().__init__()
        E = experts.gate_up_proj.shape[0]
        self.num_experts = E
        self.num_local_experts = E // world
        self.expert_start = rank * self.num_local_experts
        self.hidden_dim = experts.gate_up_proj.shape[2]
        self.intermediate_dim = experts.down_proj.shape[2]
        self.activation = experts.activation
        self.group, self.rank, self.world_size = group, rank, world
        lo, hi = self.expert_start, self.expert_start + self.num_local_experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            # A copy, so that the full tensors can be freed once the caller lets go of them.
            shard = full.detach()[lo:hi].clone()
            setattr(self, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        # Set by the block's forward (see _ExpertParallelBlock): this rank still owes its peers the count
        # exchange of the current step, so a failure before it must be announced there.
        self._owed = False
        # Optional timing hook, called with a phase name after each phase (frontiers_fast.bench.moe_ep).
        self._clock: Callable[[str], None] | None = None

    def reset_parameters(self):
        # The full experts' initialiser, applied to this shard (it reads only the two tensors).
        MoeExperts.reset_parameters(self)

    def extra_repr(self) -> str:
        return (
            f"experts {self.expert_start}..{self.expert_start + self.num_local_experts - 1} of "
            f"{self.num_experts}, rank {self.rank} of {self.world_size}, hidden_size={self.hidden_dim}, "
            f"intermediate_size={self.intermediate_dim}, activation={self.activation!r}"
        )

    def _check(self, hidden_states, top_k_index, top_k_weights):
        check_expert_inputs(
            hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.num_experts,
            f" (global ids: num_experts={self.num_experts})",
        )  # fmt: skip

    def _exchange_counts(self, counts: Tensor | None, error: BaseException | None):
        """All-to-all of the per-expert row counts, with this rank's error flag on every row.

        Returns (rows sent to each rank, rows received from each rank, the
        received [W, E/W] counts on the device); raises on every rank if any
        rank flagged an error.
        """
        W, El = self.world_size, self.num_local_experts
        dev = _control_device(self.group, self.gate_up_proj.device)
        send = torch.zeros((W, El + 1), dtype=torch.int64, device=dev)
        if error is None:
            send[:, :El] = counts.view(W, El)
        else:
            send[:, El] = 1
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # The one host read of a step: the split sizes of the row exchanges.
        sent, got = torch.stack([send, recv]).tolist()
        failed = [r for r in range(W) if got[r][El]]
        if failed:
            _fail_together(failed, error, self.group, "expert_parallel forward")
        return [sum(row[:El]) for row in sent], [sum(row[:El]) for row in got], recv[:, :El]

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        self._owed = False
        clock = self._clock
        if clock:
            clock("begin")
        W, El = self.world_size, self.num_local_experts
        error = counts = None
        try:
            self._check(hidden_states, top_k_index, top_k_weights)
            # Rows grouped by global expert id, hence by owner rank: owner r's rows are one contiguous run.
            x_perm, offsets, row_map = moe_permute(hidden_states, top_k_index, self.num_experts)
            counts = offsets.diff().to(self.gate_up_proj.device)
        except Exception as exc:
            error = exc
        if clock and error is None:
            clock("permute")
        send_splits, recv_splits, recv_counts = self._exchange_counts(counts, error)
        if clock:
            clock("counts")
        x_recv = _AllToAll.apply(x_perm, recv_splits, send_splits, self.group)
        if clock:
            clock("tokens")
        # Received rows come by source rank, then by local expert: rebuild each row's local id from the counts.
        R = x_recv.shape[0]
        local = torch.arange(El, device=x_recv.device).repeat(W)
        ids = local.repeat_interleave(recv_counts.reshape(-1).to(x_recv.device), output_size=R).view(R, 1)
        # Unit weights: the router weights stay on the token's rank and are applied in the combine.
        ones = torch.ones((R, 1), dtype=x_recv.dtype, device=x_recv.device)
        y = fused_moe(x_recv, self.gate_up_proj, self.down_proj, ones, ids, self.activation)
        if clock:
            clock("compute")
        y_back = _AllToAll.apply(y, send_splits, recv_splits, self.group)
        if clock:
            clock("return")
        out = moe_unpermute(y_back, row_map, top_k_weights)
        if clock:
            clock("combine")
        return out


# ---------------------------------------------------------------------------
# the block
# ---------------------------------------------------------------------------
class _ExpertParallelBlock:
    """Mixed in front of a block's class by :func:`expert_parallel`.

    The block's own forward runs unchanged (its ``self.experts`` call is
    what dispatches); this layer only makes sure that a rank failing before
    it reaches its experts (in the router, say) still takes part in the
    step's count exchange, flagged, so that its peers raise too.
    """

    def forward(self, *args, **kwargs):
        experts = self.experts
        experts._owed = True
        try:
            return super().forward(*args, **kwargs)
        except Exception as exc:
            if experts._owed:
                # Re-raises exc here after the flagged exchange; the peers raise ExpertParallelError.
                experts._owed = False
                experts._exchange_counts(None, exc)
            raise
        finally:
            experts._owed = False


_BLOCK_CLASSES: dict[type, type] = {}


def _sharded_class(cls: type) -> type:
    # One subclass per block class, so that isinstance(block, MixtralSparseMoeBlock) still holds.
    if cls not in _BLOCK_CLASSES:
        _BLOCK_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (_ExpertParallelBlock, cls), {})
    return _BLOCK_CLASSES[cls]


def _router_experts(gate) -> int | None:
    """How many experts the block's router scores, when it says."""
    w = getattr(gate, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return w.shape[0]
    n = getattr(gate, "num_experts", None)
    return n if isinstance(n, int) else None


def _check_block(block, world: int) -> tuple[int, int, int]:
    """The block's (E, H, I) after checking that it holds all its experts in the fused layout."""
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be an nn.Module MoE block, got {type(block).__name__}")
    experts = getattr(block, "experts", None)
    if isinstance(block, _ExpertParallelBlock) or isinstance(experts, ExpertParallelExperts):
        raise ValueError(
            "block was already sharded by expert_parallel: pass the block that holds all experts, once"
        )
    if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), Tensor):
        raise TypeError(
            f"block must have .experts with fused gate_up_proj [E, 2I, H] and down_proj [E, H, I] "
            f"(frontiers_fast.nn.moe.MoeExperts), got {type(block).__name__} with experts "
            f"{type(experts).__name__}"
        )
    if getattr(experts, "sharded", False) or getattr(block, "sharded", False):
        raise ValueError("block is marked sharded (a true .sharded): expert_parallel needs all experts")
    from torch.distributed.tensor import DTensor

    w_gu, w_d = experts.gate_up_proj, getattr(experts, "down_proj", None)
    if isinstance(w_gu, DTensor) or isinstance(w_d, DTensor):
        raise ValueError("block.experts holds DTensors, which are sharded already: pass plain full tensors")
    if w_gu.dim() != 3 or w_gu.shape[1] % 2:
        raise ValueError(f"block.experts.gate_up_proj must be [E, 2I, H], got shape {tuple(w_gu.shape)}")
    E, two_i, H = w_gu.shape
    if not isinstance(w_d, Tensor) or tuple(w_d.shape) != (E, H, two_i // 2):
        got = tuple(w_d.shape) if isinstance(w_d, Tensor) else type(w_d).__name__
        raise ValueError(f"block.experts.down_proj must be [E, H, I]=[{E}, {H}, {two_i // 2}], got {got}")
    activation = getattr(experts, "activation", None)
    if activation not in ACTIVATIONS:
        raise ValueError(f"block.experts.activation must be one of {ACTIVATIONS}, got {activation!r}")
    routed = _router_experts(getattr(block, "gate", None))
    if routed is not None and routed != E:
        raise ValueError(
            f"block.experts holds {E} experts but block.gate routes over {routed}: the experts look "
            "sharded already; expert_parallel needs the block that holds all experts"
        )
    if E % world:
        raise ValueError(
            f"the block's number of experts E={E} (block.experts.gate_up_proj.shape[0]) must be divisible "
            f"by the group's world size {world}, so that every rank holds E/world experts"
        )
    return E, H, two_i // 2


def _block_device(block) -> torch.device | None:
    w = getattr(getattr(block, "experts", None), "gate_up_proj", None)
    if isinstance(w, Tensor):
        return w.device
    p = next(block.parameters(), None) if isinstance(block, nn.Module) else None
    return None if p is None else p.device


def expert_parallel(block: nn.Module, group=None) -> nn.Module:
    """Shard a MoE block's experts over ``group`` (default: the world), in place.

    ``block`` holds all E experts (``block.experts`` with ``gate_up_proj``
    [E, 2I, H] and ``down_proj`` [E, H, I], as :class:`MoeExperts` in
    :class:`~frontiers_fast.nn.MixtralSparseMoeBlock` and the other blocks of
    :mod:`frontiers_fast.nn.moe`) and the same weights on every rank.  Rank r
    of W keeps experts ``[r E/W, (r+1) E/W)``: ``block.experts`` becomes an
    :class:`ExpertParallelExperts` (its state_dict holds that shard, under
    the same names) and the block's forward dispatches each (token, slot)
    to its expert's owner; the router and any shared experts stay
    replicated.  The block's class becomes a subclass of its own, so
    ``isinstance`` checks still hold.  Returns the block.

    Every rank of the group must call this, and then every forward and
    backward, collectively (see the module docstring for gradients and
    failures).  A rank whose block is unfit raises its own error; the
    others raise :class:`ExpertParallelError` instead of hanging.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        TypeError: ``block`` has no ``experts`` in the fused layout.
        ValueError: E not divisible by the world size; a block already
            sharded (by this function, marked ``sharded``, DTensor experts,
            or fewer experts than its router scores); blocks of different
            sizes on different ranks.

    Example (run under ``torchrun --nproc-per-node 2``)::

        >>> dist.init_process_group("gloo")
        >>> block = MixtralSparseMoeBlock(hidden_size=64, intermediate_size=128, num_experts=8, top_k=2)
        >>> block.load_state_dict(checkpoint)  # the same full weights on every rank
        >>> block = expert_parallel(block)  # rank r keeps experts 4r .. 4r+3
        >>> out = block(tokens_of_this_rank)  # [..., 64], as the unsharded block would give
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "expert_parallel needs torch.distributed: call torch.distributed.init_process_group first"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group does not contain this rank: call expert_parallel on the group's members only")
    error, sizes = None, (0, 0, 0)
    try:
        sizes = _check_block(block, world)
    except Exception as exc:
        error = exc
    # Agree before touching anything: who failed, and whether every rank holds the same block sizes.
    dev = _control_device(group, None if error else _block_device(block))
    # A gather spelled as a sum of one-hot rows: all_reduce exists on every backend and torch version.
    every = torch.zeros((world, 4), dtype=torch.int64, device=dev)
    every[rank] = torch.tensor([int(error is not None), *sizes], dtype=torch.int64)
    dist.all_reduce(every, group=group)
    table = every.tolist()
    failed = [r for r in range(world) if table[r][0]]
    if failed:
        _fail_together(failed, error, group, "expert_parallel")
    if any(row[1:] != table[0][1:] for row in table):
        listed = ", ".join(f"rank {r}: E={e} H={h} I={i}" for r, (_, e, h, i) in enumerate(table))
        raise ValueError(f"block must have the same sizes on every rank of the group, got {listed}")
    block.experts = ExpertParallelExperts(block.experts, group, rank, world)
    block.__class__ = _sharded_class(type(block))
    return block


# ---------------------------------------------------------------------------
# gradients of the replicated parameters
# ---------------------------------------------------------------------------
def replicated_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``module`` outside its :class:`ExpertParallelExperts`: the same on every rank."""
    sharded = {
        id(p) for m in module.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()
    }
    for p in module.parameters():
        if id(p) not in sharded:
            yield p


def all_reduce_replicated_grads(module: nn.Module, group=None) -> None:
    """Sum the ``.grad`` of :func:`replicated_parameters` over ``group``, in place.

    After it, every replicated parameter's gradient is that of the sum of
    the ranks' losses, as the sharded experts' gradients already are.  One
    all-reduce per (device, dtype) of the gradients, flattened.  Every rank
    must call it with the same parameters holding gradients.

    Example::

        >>> block(x).pow(2).sum().backward()
        >>> all_reduce_replicated_grads(block)
    """
    buckets: dict[tuple, list[Tensor]] = {}
    for p in replicated_parameters(module):
        if p.grad is not None:
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

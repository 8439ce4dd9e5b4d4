"""Mixture-of-experts dispatch ops: registration, autograd and validation.

Public ops (``frontiers_fast::``), each with a fake kernel and a registered
autograd whose backward is itself a registered op:

  moe_route(logits, top_k, scoring, renormalize, correction_bias?, n_group?, topk_group?, scaling)
      -> (weights [T, k], ids [T, k] int32)
  moe_route_bwd(logits, ids, grad_weights, scoring, renormalize, scaling) -> grad_logits
  moe_permute(x, ids, num_experts) -> (x_perm [T*k, H], expert_offsets [E+1] int64, row_map [T, k] int64)
  moe_permute_bwd(grad_x_perm, row_map) -> grad_x
  moe_unpermute(y, row_map, weights) -> out [T, H]
  moe_unpermute_bwd(y, row_map, weights, grad_out, need_y, need_weights) -> (grad_y, grad_weights)
  fused_moe(x, w_gate_up, w_down, weights, ids, activation) -> out [T, H]
  fused_moe_bwd(x, w_gate_up, w_down, weights, ids, grad_out, activation,
                need_x, need_w_gate_up, need_w_down, need_weights) -> 4 gradients

Only the reference backend exists today: every op's implementation is the
plain PyTorch of :mod:`frontiers_fast.reference.moe` (registered for every
device).  Gradients not asked for come back as empty [0] tensors.  The
backward ops are written out rather than autograd through the reference,
because op implementations run below the autograd dispatch key.

The data checks (ids and row_map in range, logits free of NaN and +inf,
enough unmasked experts per row) run in the public functions and again in
the forward op implementations: under torch.compile the former are skipped
(a data read would break the graph) but the latter still run, on real
tensors, so bad input raises the same ValueError compiled or not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    check_bool,
    check_choice,
    check_dims,
    check_finite,
    check_int,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
    has_values,
)
from ..reference import moe as ref

NS = "frontiers_fast"
_ops = torch.ops.frontiers_fast
SCORINGS = ref.SCORINGS
ACTIVATIONS = ref.ACTIVATIONS
_IMPLEMENTED = ("reference",)


def _none(t: Tensor) -> Tensor:
    return t.new_empty((0,))


# ---------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::moe_route", mutates_args=())
def _route_op(
    logits: Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    correction_bias: Tensor | None,
    n_group: int | None,
    topk_group: int | None,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    # The value checks run here too: this body runs on real tensors even
    # inside a compiled graph, where the public function's checks are skipped.
    _check_logits(logits)
    if correction_bias is not None:
        check_finite("correction_bias", correction_bias)
    scores, choice, ids = ref.selection(logits, top_k, scoring, correction_bias, n_group, topk_group)
    _check_selectable(choice, ids, top_k, n_group)
    w = ref.route_weights(scores, ids, renormalize, scaling)
    return w.contiguous(), ids.to(torch.int32).contiguous()


@_route_op.register_fake
def _(logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group, scaling):
    torch._check(logits.dim() == 2, lambda: "logits must be [T, E]")
    T = logits.shape[0]
    w = logits.new_empty((T, top_k), dtype=ref.score_dtype(logits.dtype))
    return w, logits.new_empty((T, top_k), dtype=torch.int32)


@torch.library.custom_op(f"{NS}::moe_route_bwd", mutates_args=())
def _route_bwd_op(
    logits: Tensor, ids: Tensor, grad_weights: Tensor, scoring: str, renormalize: bool, scaling: float
) -> Tensor:
    scores = ref.scores_of(logits, scoring)
    idx = ids.long()
    g = grad_weights.to(scores.dtype) * scaling
    if renormalize:
        s = scores.gather(1, idx)
        den = s.sum(-1, keepdim=True) + ref.RENORM_EPS
        # d(s_j / den)/ds_i = delta_ij / den - s_j / den^2
        g = g / den - (g * s).sum(-1, keepdim=True) / (den * den)
    g_scores = torch.zeros_like(scores).scatter_add(1, idx, g)
    if scoring == "softmax":
        g_logits = scores * (g_scores - (scores * g_scores).sum(-1, keepdim=True))
    else:
        g_logits = g_scores * scores * (1.0 - scores)
    return g_logits.to(logits.dtype)


@_route_bwd_op.register_fake
def _(logits, ids, grad_weights, scoring, renormalize, scaling):
    return logits.new_empty(logits.shape)


def _route_setup(ctx, inputs, output):
    logits, _, scoring, renormalize, _, _, _, scaling = inputs
    ctx.scoring, ctx.renormalize, ctx.scaling = scoring, renormalize, scaling
    ctx.save_for_backward(logits, output[1])


def _route_backward(ctx, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0] and grad_weights is not None:
        g = _ops.moe_route_bwd(
            logits, ids, grad_weights.contiguous(), ctx.scoring, ctx.renormalize, ctx.scaling
        )
    # correction_bias only steers the selection: it gets no gradient.
    return g, None, None, None, None, None, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


# ---------------------------------------------------------------------------
# moe_permute / moe_unpermute
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::moe_permute", mutates_args=())
def _permute_op(x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    _check_ids("ids", ids, num_experts)  # also under torch.compile: see _route_op
    return ref.moe_permute(x, ids, num_experts)


@_permute_op.register_fake
def _(x, ids, num_experts):
    torch._check(x.dim() == 2 and ids.dim() == 2, lambda: "x must be [T, H] and ids [T, k]")
    T, k = ids.shape
    return (
        x.new_empty((T * k, x.shape[1])),
        x.new_empty((num_experts + 1,), dtype=torch.int64),
        x.new_empty((T, k), dtype=torch.int64),
    )


@torch.library.custom_op(f"{NS}::moe_permute_bwd", mutates_args=())
def _permute_bwd_op(grad_x_perm: Tensor, row_map: Tensor) -> Tensor:
    # Each token's gradient is the sum of its k copies' gradients: a gather, no atomics.
    T, k = row_map.shape
    cdt = ref.compute_dtype(grad_x_perm.dtype)
    picked = grad_x_perm.index_select(0, row_map.reshape(-1)).view(T, k, grad_x_perm.shape[1])
    return picked.to(cdt).sum(1).to(grad_x_perm.dtype)


@_permute_bwd_op.register_fake
def _(grad_x_perm, row_map):
    return grad_x_perm.new_empty((row_map.shape[0], grad_x_perm.shape[1]))


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _permute_backward(ctx, grad_x_perm, _g_offsets, _g_map):
    (row_map,) = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0] and grad_x_perm is not None:
        g = _ops.moe_permute_bwd(grad_x_perm.contiguous(), row_map)
    return g, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op(f"{NS}::moe_unpermute", mutates_args=())
def _unpermute_op(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    _check_row_map(row_map, y.shape[0])  # also under torch.compile: see _route_op
    return ref.moe_unpermute(y, row_map, weights)


@_unpermute_op.register_fake
def _(y, row_map, weights):
    torch._check(y.dim() == 2 and row_map.dim() == 2, lambda: "y must be [R, H] and row_map [T, k]")
    return y.new_empty((row_map.shape[0], y.shape[1]))


@torch.library.custom_op(f"{NS}::moe_unpermute_bwd", mutates_args=())
def _unpermute_bwd_op(
    y: Tensor, row_map: Tensor, weights: Tensor, grad_out: Tensor, need_y: bool, need_weights: bool
) -> tuple[Tensor, Tensor]:
    cdt = ref.compute_dtype(y.dtype, weights.dtype)
    T, k = row_map.shape
    rows = row_map.reshape(-1)
    go = grad_out.to(cdt)
    gy, gw = _none(y), _none(y)
    if need_y:
        contrib = (weights.to(cdt).unsqueeze(-1) * go.unsqueeze(1)).reshape(T * k, y.shape[1])
        # index_add, not a scatter: row_map need not be a permutation of y's rows.
        gy = torch.zeros(y.shape, dtype=cdt, device=y.device).index_add(0, rows, contrib).to(y.dtype)
    if need_weights:
        picked = y.index_select(0, rows).view(T, k, y.shape[1]).to(cdt)
        gw = (picked * go.unsqueeze(1)).sum(-1).to(weights.dtype)
    return gy, gw


@_unpermute_bwd_op.register_fake
def _(y, row_map, weights, grad_out, need_y, need_weights):
    gy = y.new_empty(y.shape) if need_y else _none(y)
    gw = weights.new_empty(weights.shape) if need_weights else _none(y)
    return gy, gw


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad_out):
    y, row_map, weights = ctx.saved_tensors
    need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if grad_out is None or not (need_y or need_w):
        return None, None, None
    gy, gw = _ops.moe_unpermute_bwd(y, row_map, weights, grad_out.contiguous(), need_y, need_w)
    return (gy if need_y else None), None, (gw if need_w else None)


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---------------------------------------------------------------------------
# fused_moe
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::fused_moe", mutates_args=())
def _fused_op(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, weights: Tensor, ids: Tensor, activation: str
) -> Tensor:
    _check_ids("ids", ids, w_gate_up.shape[0])  # also under torch.compile: see _route_op
    return ref.fused_moe(x, w_gate_up, w_down, weights, ids, activation)


@_fused_op.register_fake
def _(x, w_gate_up, w_down, weights, ids, activation):
    torch._check(x.dim() == 2, lambda: "x must be [T, H]")
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{NS}::fused_moe_bwd", mutates_args=())
def _fused_bwd_op(
    x: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    weights: Tensor,
    ids: Tensor,
    grad_out: Tensor,
    activation: str,
    need_x: bool,
    need_w_gate_up: bool,
    need_w_down: bool,
    need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    act = ref.activation_fn(activation)
    act_grad = ref.ACTIVATION_GRADS[activation]
    T, k = ids.shape
    E, H = w_gate_up.shape[0], x.shape[1]
    cdt = ref.compute_dtype(x.dtype, w_gate_up.dtype, w_down.dtype, weights.dtype)
    order, offsets, row_map = ref.permutation(ids, E)
    token = order // k
    w_row = weights.reshape(-1).index_select(0, order).to(cdt)
    go_row = grad_out.index_select(0, token).to(cdt)  # [T*k, H]: gradient reaching each row
    gx_perm = torch.zeros((T * k, H), dtype=cdt, device=x.device) if need_x else None
    g_wgu = torch.zeros(w_gate_up.shape, dtype=cdt, device=x.device) if need_w_gate_up else None
    g_wd = torch.zeros(w_down.shape, dtype=cdt, device=x.device) if need_w_down else None
    g_wrow = torch.zeros((T * k,), dtype=cdt, device=x.device) if need_weights else None
    bounds = offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        xs = x.index_select(0, token[lo:hi]).to(cdt)
        wgu, wd = w_gate_up[e].to(cdt), w_down[e].to(cdt)
        gate, up = (xs @ wgu.T).chunk(2, dim=-1)
        a_gate = act(gate)
        h = a_gate * up
        go = go_row[lo:hi]
        if need_weights:
            g_wrow[lo:hi] = (go * (h @ wd.T)).sum(-1)
        gy = go * w_row[lo:hi].unsqueeze(-1)
        if need_w_down:
            g_wd[e] = gy.T @ h
        gh = gy @ wd
        g_gate_up = torch.cat([gh * up * act_grad(gate), gh * a_gate], dim=-1)
        if need_w_gate_up:
            g_wgu[e] = g_gate_up.T @ xs
        if need_x:
            gx_perm[lo:hi] = g_gate_up @ wgu
    # Separate placeholders: a custom op's outputs may not alias each other.
    gx, gwgu, gwd, gw = (_none(x) for _ in range(4))
    if need_x:
        gx = gx_perm.index_select(0, row_map.reshape(-1)).view(T, k, H).sum(1).to(x.dtype)
    if need_w_gate_up:
        gwgu = g_wgu.to(w_gate_up.dtype)
    if need_w_down:
        gwd = g_wd.to(w_down.dtype)
    if need_weights:
        gw = g_wrow.index_select(0, row_map.reshape(-1)).view(T, k).to(weights.dtype)
    return gx, gwgu, gwd, gw


@_fused_bwd_op.register_fake
def _(
    x,
    w_gate_up,
    w_down,
    weights,
    ids,
    grad_out,
    activation,
    need_x,
    need_w_gate_up,
    need_w_down,
    need_weights,
):
    pick = lambda need, t: t.new_empty(t.shape) if need else _none(x)
    return (
        pick(need_x, x),
        pick(need_w_gate_up, w_gate_up),
        pick(need_w_down, w_down),
        pick(need_weights, weights),
    )


def _fused_setup(ctx, inputs, output):
    x, w_gate_up, w_down, weights, ids, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, w_gate_up, w_down, weights, ids)


def _fused_backward(ctx, grad_out):
    x, w_gate_up, w_down, weights, ids = ctx.saved_tensors
    need = [ctx.needs_input_grad[i] for i in range(4)]
    if grad_out is None or not any(need):
        return None, None, None, None, None, None
    grads = _ops.fused_moe_bwd(
        x, w_gate_up, w_down, weights, ids, grad_out.contiguous(), ctx.activation, *need
    )
    return (*(g if n else None for g, n in zip(grads, need)), None, None)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


# ---------------------------------------------------------------------------
# public functional API (validation, backend choice)
# ---------------------------------------------------------------------------
_INTS = (torch.int32, torch.int64)


def _tensor(name, t, layout, ndim, kind="float"):
    if kind == "float":
        check_tensor(name, t)
    else:
        check_tensor(name, t, _INTS, "an int32 or int64 tensor")
    check_dims(name, t, ndim, layout)


def _values_checkable(t: Tensor) -> bool:
    # The public functions read the data only in eager mode: while
    # torch.compile traces, a data read would break the graph.  The op
    # bodies repeat the checks, and they run on real tensors even in a graph.
    return not torch.compiler.is_compiling() and has_values(t)


def _check_ids(name, ids, num_experts):
    if has_values(ids):
        lo, hi = (int(v) for v in ids.aminmax())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"{name} must lie in [0, {num_experts}) (there are {num_experts} experts), got values in [{lo}, {hi}]"
            )


def _check_row_map(row_map, rows):
    if has_values(row_map):
        lo, hi = (int(v) for v in row_map.aminmax())
        if lo < 0 or hi >= rows:
            raise ValueError(f"row_map must lie in [0, {rows}) (the rows of y), got values in [{lo}, {hi}]")


def _check_logits(logits):
    # -inf masks an expert (as with transformers' Mixtral router); NaN and +inf have no meaning.
    if has_values(logits) and bool((torch.isnan(logits) | torch.isposinf(logits)).any()):
        raise ValueError("logits must not contain NaN or +inf (-inf is allowed: it masks an expert)")


def _check_selectable(choice, ids, top_k, n_group):
    # A chosen expert with a -inf selection score means the row had fewer than
    # top_k experts with a finite logit (in its kept groups, when grouping).
    if not has_values(ids):
        return
    bad = torch.isneginf(choice.gather(1, ids)).any(-1)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        where = " in its topk_group kept groups" if n_group is not None else ""
        raise ValueError(
            f"logits row {t} has fewer than top_k={top_k} selectable experts{where}: "
            f"each row needs at least top_k finite (not -inf) logits"
        )


def moe_route(
    logits: Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    scaling: float = 1.0,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k expert routing (Mixtral softmax, or DeepSeek-V3 sigmoid with grouped top-k).

    Scores are ``softmax`` or ``sigmoid`` of the logits in float32 (float64
    for float64 logits).  Experts are chosen on ``scores + correction_bias``
    (restricted to each token's ``topk_group`` best of ``n_group`` groups when
    grouping is on; a group scores its top-2 biased sum with a bias, its max
    without), ties to the lowest expert id.  The weights are the *unbiased*
    scores of the chosen experts, divided by their sum (+1e-20) if
    ``renormalize``, times ``scaling``; they are differentiable in ``logits``.

    A ``-inf`` logit masks an expert: it is never chosen (the bias cannot
    revive it), its softmax score is 0, and it counts as ``-inf`` in its
    group's score (so under the biased top-2 rule a group needs two unmasked
    experts to compete).  Every row needs ``top_k`` unmasked experts (in its
    kept groups, when grouping); a row with fewer is an error, as are NaN and
    ``+inf`` logits.

    Args:
        logits: [T, E] router logits: finite, or ``-inf`` to mask an expert.
        top_k: experts per token, 1 <= top_k <= E (and <= the experts in the kept groups).
        scoring: ``"softmax"`` or ``"sigmoid"``.
        renormalize: make each token's weights sum to 1.
        correction_bias: optional [E] finite selection bias (no gradient).
        n_group, topk_group: grouped top-k; E % n_group == 0, 1 <= topk_group <= n_group.
        scaling: finite factor on the weights (int, float or numpy scalar).
        backend: only ``"reference"`` exists for this op.

    Returns:
        weights [T, k] float32 (float64 for float64 logits), ids [T, k] int32, best first.
        The ids are int32 (as vLLM's); code that indexes or one-hot encodes
        with them the transformers way (``F.one_hot`` needs int64) should
        call ``ids.long()`` first.

    Example::

        >>> weights, ids = moe_route(torch.randn(16, 8), top_k=2)
    """
    _tensor("logits", logits, "[T, E]", 2)
    E = logits.shape[1]
    if E < 1:
        raise ValueError(f"logits must have at least one expert (E >= 1), got shape {tuple(logits.shape)}")
    top_k = check_int("top_k", top_k, 1, E, why=f" (logits has E={E} experts)")
    check_choice("scoring", scoring, SCORINGS)
    renormalize = check_bool("renormalize", renormalize)
    if correction_bias is not None:
        _tensor("correction_bias", correction_bias, "[E]", 1)
        check_same_device("correction_bias", correction_bias, "logits", logits.device)
        if correction_bias.shape[0] != E:
            raise ValueError(f"correction_bias must have shape [E]=[{E}], got {tuple(correction_bias.shape)}")
    if (n_group is None) != (topk_group is None):
        raise ValueError(
            f"n_group and topk_group must be given together, got n_group={n_group}, topk_group={topk_group}"
        )
    if n_group is not None:
        n_group = check_int("n_group", n_group, 1, E)
        if E % n_group:
            raise ValueError(f"n_group must divide the number of experts E={E}, got {n_group}")
        topk_group = check_int("topk_group", topk_group, 1, n_group, why=f" (n_group={n_group})")
        kept = topk_group * (E // n_group)
        if top_k > kept:
            raise ValueError(
                f"top_k={top_k} exceeds the {kept} experts in the topk_group={topk_group} kept groups"
            )
    scaling = check_real("scaling", scaling)
    if _values_checkable(logits):
        _check_logits(logits)
    if correction_bias is not None and _values_checkable(correction_bias):
        check_finite("correction_bias", correction_bias)
    _backend.resolve(backend, logits.device, "moe_route", implemented=_IMPLEMENTED)
    return _ops.moe_route(logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group, scaling)


def _check_dispatch(x, ids, num_experts, x_name="x"):
    _tensor(x_name, x, "[T, H]", 2)
    _tensor("ids", ids, "[T, k]", 2, kind="int")
    check_same_device("ids", ids, x_name, x.device)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids has {ids.shape[0]} rows but {x_name} has {x.shape[0]} tokens")
    if ids.shape[1] > num_experts:
        raise ValueError(f"ids has k={ids.shape[1]} columns but there are only {num_experts} experts (k > E)")


def moe_permute(x: Tensor, ids: Tensor, num_experts: int, *, backend: str | None = None):
    """Copy each token once per chosen expert, grouped by expert (stable by token).

    Args:
        x: [T, H] tokens.
        ids: [T, k] int32/int64 expert ids in [0, num_experts).
        num_experts: E >= 1.

    Returns:
        x_perm [T*k, H] (dtype of x), expert_offsets [E+1] int64 (expert e owns
        rows ``offsets[e]:offsets[e+1]``), row_map [T, k] int64 with
        ``x_perm[row_map[t, j]] == x[t]``; pass it to :func:`moe_unpermute`.
        Differentiable in ``x``.

    Example::

        >>> x_perm, offsets, row_map = moe_permute(torch.randn(4, 8), torch.tensor([[0, 2]] * 4), 3)
    """
    num_experts = check_int("num_experts", num_experts, 1)
    _check_dispatch(x, ids, num_experts)
    if _values_checkable(ids):
        _check_ids("ids", ids, num_experts)
    _backend.resolve(backend, x.device, "moe_permute", implemented=_IMPLEMENTED)
    return _ops.moe_permute(x, ids, num_experts)


def moe_unpermute(y: Tensor, row_map: Tensor, weights: Tensor, *, backend: str | None = None) -> Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j weights[t, j] * y[row_map[t, j]]``.

    Args:
        y: [R, H] rows in permuted order (R = T*k after :func:`moe_permute`).
        row_map: [T, k] int64 from :func:`moe_permute`, values in [0, R).
        weights: [T, k] router weights.

    Returns:
        [T, H] in ``y``'s dtype (half types accumulate in float32).
        Differentiable in ``y`` and ``weights``.

    Example::

        >>> x, (weights, ids) = torch.randn(4, 8), moe_route(torch.randn(4, 3), top_k=2)
        >>> x_perm, offsets, row_map = moe_permute(x, ids, 3)
        >>> out = moe_unpermute(2.0 * x_perm, row_map, weights)  # == 2 x, as the weights sum to 1
    """
    _tensor("y", y, "[R, H]", 2)
    _tensor("row_map", row_map, "[T, k]", 2, kind="int")
    _tensor("weights", weights, "[T, k]", 2)
    check_same_device("row_map", row_map, "y", y.device)
    check_same_device("weights", weights, "y", y.device)
    if weights.shape != row_map.shape:
        raise ValueError(
            f"weights must have the shape of row_map {tuple(row_map.shape)}, got {tuple(weights.shape)}"
        )
    if _values_checkable(row_map):
        _check_row_map(row_map, y.shape[0])
    _backend.resolve(backend, y.device, "moe_unpermute", implemented=_IMPLEMENTED)
    return _ops.moe_unpermute(y, row_map.long(), weights)


def fused_moe(
    x: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    weights: Tensor,
    ids: Tensor,
    activation: str = "silu",
    *,
    backend: str | None = None,
) -> Tensor:
    """Dropless top-k mixture of gated-MLP experts (SwiGLU by default).

    ``out[t] = sum_j weights[t, j] * (act(x_t G_e^T) * (x_t U_e^T)) D_e^T`` with
    ``e = ids[t, j]``, ``[G_e; U_e] = w_gate_up[e]`` (gate rows first: the
    vLLM and transformers layout) and ``D_e = w_down[e]``.  No capacity and
    no dropped tokens; experts that receive no token contribute nothing.

    Args:
        x: [T, H]; w_gate_up: [E, 2I, H] and w_down: [E, H, I] in x's dtype;
        weights: [T, k] router weights (any float dtype); ids: [T, k] int32/int64 in [0, E).
        activation: ``"silu"`` or ``"gelu"`` (exact).
        backend: only ``"reference"`` exists for this op.

    Returns:
        [T, H] in x's dtype (half types accumulate in float32).  Differentiable
        in x, w_gate_up, w_down and weights.

    Example::

        >>> w, ids = moe_route(torch.randn(16, 8), top_k=2)
        >>> out = fused_moe(torch.randn(16, 32), torch.randn(8, 96, 32), torch.randn(8, 32, 48), w, ids)
    """
    _tensor("x", x, "[T, H]", 2)
    _tensor("w_gate_up", w_gate_up, "[E, 2I, H]", 3)
    _tensor("w_down", w_down, "[E, H, I]", 3)
    _tensor("weights", weights, "[T, k]", 2)
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down), ("weights", weights)):
        check_same_device(name, t, "x", x.device)
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_same_dtype(name, t, "x", x.dtype)
    T, H = x.shape
    E, two_i, _ = w_gate_up.shape
    if w_gate_up.shape[2] != H or two_i % 2:
        raise ValueError(
            f"w_gate_up must have shape [E, 2I, H] with H={H} and an even 2I, got {tuple(w_gate_up.shape)}"
        )
    if E < 1:
        raise ValueError(f"w_gate_up must hold at least one expert, got shape {tuple(w_gate_up.shape)}")
    if tuple(w_down.shape) != (E, H, two_i // 2):
        raise ValueError(
            f"w_down must have shape [E, H, I]=[{E}, {H}, {two_i // 2}], got {tuple(w_down.shape)}"
        )
    _check_dispatch(x, ids, E)
    if weights.shape != ids.shape:
        raise ValueError(f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
    check_choice("activation", activation, ACTIVATIONS)
    if _values_checkable(ids):
        _check_ids("ids", ids, E)
    _backend.resolve(backend, x.device, "fused_moe", implemented=_IMPLEMENTED)
    return _ops.fused_moe(x, w_gate_up, w_down, weights, ids, activation)


__all__ = ["moe_route", "moe_permute", "moe_unpermute", "fused_moe"]

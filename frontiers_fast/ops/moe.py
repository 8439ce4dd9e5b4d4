"""Mixture-of-experts dispatch ops: registration, autograd and the public functions.

The ops of the ``frontiers_fast::`` namespace, all defined with
:func:`frontiers_fast._library.define_op` (the last argument, ``backend``, is
left out below).  The four forward ops carry a registered autograd whose
backward is the matching ``*_bwd`` op, run with the forward's backend:

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

Backends: ``reference`` (plain PyTorch on :mod:`frontiers_fast.reference.moe`,
every device), ``cpp`` (``csrc/moe``: routing, counting-sort permutation and
combine kernels, expert GEMMs through MKL), ``triton`` (``kernels/moe.py``:
one routing kernel, an on-device stable sort, grouped GEMMs with the gather
fused into the first one's loads) and, for ``moe_route`` and ``moe_permute``'s
forward, ``cuda`` (``csrc/moe/*.cu``).  Gradients not asked
for come back as :func:`~frontiers_fast._library.absent` placeholders.  The
backward ops are written out rather than left to autograd through the
reference, because op implementations run below the autograd dispatch key.

The data checks (ids and row_map in range, logits free of NaN and +inf,
enough unmasked experts per row) run in the public functions and again in
the forward op bodies: while torch.compile traces, the former are skipped
(a data read would break the graph), but the op bodies run on real tensors
inside the compiled graph, so bad input raises the same ValueError there.

NaN policy: router logits and the correction bias are refused when they hold
NaN (a NaN logit cannot be ranked); the data (tokens, expert outputs, router
weights, expert weights) may hold NaN, which reaches exactly the output rows
that read it (see each function's docstring).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    check_bool,
    check_dims,
    check_finite,
    check_in_range,
    check_index_tensor,
    check_int,
    check_memory,
    check_option,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
    has_values,
)
from .._library import absent, define_op
from ..reference import moe as ref

_ops = torch.ops.frontiers_fast
SCORINGS = ref.SCORINGS
ACTIVATIONS = ref.ACTIVATIONS
_INTS = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------
# value checks: called by the public functions and again by the op bodies
# ---------------------------------------------------------------------------
def _check_ids(name, ids, num_experts):
    check_in_range(name, ids, 0, num_experts - 1, f" (there are {num_experts} experts)")


def _check_row_map(row_map, rows):
    check_in_range("row_map", row_map, 0, rows - 1, f" (y has {rows} rows)")


def _check_logits(logits):
    # -inf masks an expert (as with transformers' Mixtral router); NaN and +inf cannot be ranked.
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


# ---------------------------------------------------------------------------
# reference implementations
# ---------------------------------------------------------------------------
def _ref_route(logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group, scaling):
    _check_logits(logits)
    if correction_bias is not None:
        check_finite("correction_bias", correction_bias)
    scores, choice, ids = ref.selection(logits, top_k, scoring, correction_bias, n_group, topk_group)
    _check_selectable(choice, ids, top_k, n_group)
    w = ref.route_weights(scores, ids, renormalize, scaling)
    return w.contiguous(), ids.to(torch.int32).contiguous()


def _ref_route_bwd(logits, ids, grad_weights, scoring, renormalize, scaling):
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


def _ref_permute(x, ids, num_experts):
    _check_ids("ids", ids, num_experts)
    return ref.moe_permute(x, ids, num_experts)


def _ref_permute_bwd(grad_x_perm, row_map):
    # Each token's gradient is the sum of its k copies' gradients: a gather, no atomics.
    T, k = row_map.shape
    cdt = ref.compute_dtype(grad_x_perm.dtype)
    picked = grad_x_perm.index_select(0, row_map.reshape(-1)).view(T, k, grad_x_perm.shape[1])
    return picked.to(cdt).sum(1).to(grad_x_perm.dtype)


def _ref_unpermute(y, row_map, weights):
    _check_row_map(row_map, y.shape[0])
    return ref.moe_unpermute(y, row_map, weights)


def _ref_unpermute_bwd(y, row_map, weights, grad_out, need_y, need_weights):
    cdt = ref.compute_dtype(y.dtype, weights.dtype)
    T, k = row_map.shape
    rows = row_map.reshape(-1)
    go = grad_out.to(cdt)
    gy, gw = absent(y), absent(y)
    if need_y:
        contrib = (weights.to(cdt).unsqueeze(-1) * go.unsqueeze(1)).reshape(T * k, y.shape[1])
        # index_add, not a scatter: row_map need not be a permutation of y's rows.
        gy = torch.zeros(y.shape, dtype=cdt, device=y.device).index_add(0, rows, contrib).to(y.dtype)
    if need_weights:
        picked = y.index_select(0, rows).view(T, k, y.shape[1]).to(cdt)
        gw = (picked * go.unsqueeze(1)).sum(-1).to(weights.dtype)
    return gy, gw


def _ref_fused(x, w_gate_up, w_down, weights, ids, activation):
    _check_ids("ids", ids, w_gate_up.shape[0])
    return ref.fused_moe(x, w_gate_up, w_down, weights, ids, activation)


def _ref_fused_bwd(
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
    gx, gwgu, gwd, gw = (absent(x) for _ in range(4))
    if need_x:
        gx = gx_perm.index_select(0, row_map.reshape(-1)).view(T, k, H).sum(1).to(x.dtype)
    if need_w_gate_up:
        gwgu = g_wgu.to(w_gate_up.dtype)
    if need_w_down:
        gwd = g_wd.to(w_down.dtype)
    if need_weights:
        gw = g_wrow.index_select(0, row_map.reshape(-1)).view(T, k).to(weights.dtype)
    return gx, gwgu, gwd, gw


# ---------------------------------------------------------------------------
# fake kernels
# ---------------------------------------------------------------------------
def _fake_route(logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group, scaling, backend):
    torch._check(logits.dim() == 2, lambda: "logits must be [T, E]")
    T = logits.shape[0]
    w = logits.new_empty((T, top_k), dtype=ref.score_dtype(logits.dtype))
    return w, logits.new_empty((T, top_k), dtype=torch.int32)


def _fake_permute(x, ids, num_experts, backend):
    torch._check(x.dim() == 2 and ids.dim() == 2, lambda: "x must be [T, H] and ids [T, k]")
    T, k = ids.shape
    return (
        x.new_empty((T * k, x.shape[1])),
        x.new_empty((num_experts + 1,), dtype=torch.int64),
        x.new_empty((T, k), dtype=torch.int64),
    )


def _fake_unpermute(y, row_map, weights, backend):
    torch._check(y.dim() == 2 and row_map.dim() == 2, lambda: "y must be [R, H] and row_map [T, k]")
    return y.new_empty((row_map.shape[0], y.shape[1]))


def _fake_unpermute_bwd(y, row_map, weights, grad_out, need_y, need_weights, backend):
    gy = y.new_empty(y.shape) if need_y else absent(y)
    gw = weights.new_empty(weights.shape) if need_weights else absent(y)
    return gy, gw


def _fake_fused(x, w_gate_up, w_down, weights, ids, activation, backend):
    torch._check(x.dim() == 2, lambda: "x must be [T, H]")
    return x.new_empty(x.shape)


def _fake_fused_bwd(
    x, w_gate_up, w_down, weights, ids, grad_out, activation, need_x, need_w_gate_up, need_w_down, need_weights,
    backend,
):  # fmt: skip
    pick = lambda need, t: t.new_empty(t.shape) if need else absent(x)
    return (
        pick(need_x, x),
        pick(need_w_gate_up, w_gate_up),
        pick(need_w_down, w_down),
        pick(need_weights, weights),
    )


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------
def _route_setup(ctx, a, output):
    ctx.scoring, ctx.renormalize, ctx.scaling = a.scoring, a.renormalize, a.scaling
    ctx.save_for_backward(a.logits, output[1])


def _route_backward(ctx, grad_weights, _grad_ids):
    # correction_bias only steers the selection: it gets no gradient.
    if not ctx.needs.logits:
        return {}
    logits, ids = ctx.saved_tensors
    g = _ops.moe_route_bwd(
        logits, ids, grad_weights.contiguous(), ctx.scoring, ctx.renormalize, ctx.scaling, ctx.backend
    )
    return {"logits": g}


def _permute_setup(ctx, a, output):
    ctx.save_for_backward(output[2])


def _permute_backward(ctx, grad_x_perm, _grad_offsets, _grad_row_map):
    (row_map,) = ctx.saved_tensors
    return {"x": _ops.moe_permute_bwd(grad_x_perm.contiguous(), row_map, ctx.backend)}


def _unpermute_setup(ctx, a, output):
    # Each of y and weights is read by the other's gradient; both are inputs, so saving them copies nothing.
    ctx.save_for_backward(a.y, a.row_map, a.weights)


def _unpermute_backward(ctx, grad_out):
    y, row_map, weights = ctx.saved_tensors
    gy, gw = _ops.moe_unpermute_bwd(
        y, row_map, weights, grad_out.contiguous(), ctx.needs.y, ctx.needs.weights, ctx.backend
    )
    return {"y": gy, "weights": gw}


def _fused_setup(ctx, a, output):
    ctx.activation = a.activation
    ctx.save_for_backward(a.x, a.w_gate_up, a.w_down, a.weights, a.ids)


def _fused_backward(ctx, grad_out):
    x, w_gate_up, w_down, weights, ids = ctx.saved_tensors
    n = ctx.needs
    gx, gwgu, gwd, gw = _ops.fused_moe_bwd(
        x, w_gate_up, w_down, weights, ids, grad_out.contiguous(), ctx.activation,
        n.x, n.w_gate_up, n.w_down, n.weights, ctx.backend,
    )  # fmt: skip
    return {"x": gx, "w_gate_up": gwgu, "w_down": gwd, "weights": gw}


# ---------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------
_K = "frontiers_fast.kernels.moe:"
define_op(
    "moe_route(Tensor logits, int top_k, str scoring, bool renormalize, Tensor? correction_bias, "
    "int? n_group, int? topk_group, float scaling) -> (Tensor, Tensor)",
    fake=_fake_route,
    reference=_ref_route,
    triton=_K + "moe_route_fwd",
    native=("cpp", "cuda"),
    backward=_route_backward,
    setup_context=_route_setup,
)
define_op(
    "moe_route_bwd(Tensor logits, Tensor ids, Tensor grad_weights, str scoring, bool renormalize, "
    "float scaling) -> Tensor",
    fake=lambda logits, ids, grad_weights, scoring, renormalize, scaling, backend: logits.new_empty(
        logits.shape
    ),
    reference=_ref_route_bwd,
    triton=_K + "moe_route_bwd",
    native=("cpp",),
)
define_op(
    "moe_permute(Tensor x, Tensor ids, int num_experts) -> (Tensor, Tensor, Tensor)",
    fake=_fake_permute,
    reference=_ref_permute,
    triton=_K + "moe_permute_fwd",
    native=("cpp", "cuda"),
    backward=_permute_backward,
    setup_context=_permute_setup,
)
define_op(
    "moe_permute_bwd(Tensor grad_x_perm, Tensor row_map) -> Tensor",
    fake=lambda grad_x_perm, row_map, backend: grad_x_perm.new_empty(
        (row_map.shape[0], grad_x_perm.shape[1])
    ),
    reference=_ref_permute_bwd,
    triton=_K + "moe_permute_bwd",
    native=("cpp",),
)
define_op(
    "moe_unpermute(Tensor y, Tensor row_map, Tensor weights) -> Tensor",
    fake=_fake_unpermute,
    reference=_ref_unpermute,
    triton=_K + "moe_unpermute_fwd",
    native=("cpp",),
    backward=_unpermute_backward,
    setup_context=_unpermute_setup,
)
define_op(
    "moe_unpermute_bwd(Tensor y, Tensor row_map, Tensor weights, Tensor grad_out, bool need_y, "
    "bool need_weights) -> (Tensor, Tensor)",
    fake=_fake_unpermute_bwd,
    reference=_ref_unpermute_bwd,
    triton=_K + "moe_unpermute_bwd",
    native=("cpp",),
)
define_op(
    "fused_moe(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor weights, Tensor ids, str activation) -> Tensor",
    fake=_fake_fused,
    reference=_ref_fused,
    triton=_K + "fused_moe_fwd",
    native=("cpp",),
    backward=_fused_backward,
    setup_context=_fused_setup,
)
define_op(
    "fused_moe_bwd(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor weights, Tensor ids, Tensor grad_out, "
    "str activation, bool need_x, bool need_w_gate_up, bool need_w_down, bool need_weights) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_fused_bwd,
    reference=_ref_fused_bwd,
    triton=_K + "fused_moe_bwd",
    native=("cpp",),
)

_backend.register_function("moe_route", ops=("moe_route",), grad_ops=("moe_route_bwd",))
_backend.register_function("moe_permute", ops=("moe_permute",), grad_ops=("moe_permute_bwd",))
_backend.register_function("moe_unpermute", ops=("moe_unpermute",), grad_ops=("moe_unpermute_bwd",))
_backend.register_function("fused_moe", ops=("fused_moe",), grad_ops=("fused_moe_bwd",))


# ---------------------------------------------------------------------------
# public functions (validation, backend choice)
# ---------------------------------------------------------------------------
def _tensor(name, t, layout, ndim):
    check_tensor(name, t)
    check_dims(name, t, ndim, layout)


def _index(name, t, layout):
    check_index_tensor(name, t, _INTS)
    check_dims(name, t, 2, layout)


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
    kept groups, when grouping); a row with fewer is an error.

    NaN: the logits steer a discrete choice, so they are treated like a
    configuration: NaN and ``+inf`` logits, and a non-finite
    ``correction_bias``, are refused with a ValueError (also under
    torch.compile, where the op itself checks).  For every accepted input the
    weights are finite.

    Args:
        logits: [T, E] router logits: finite, or ``-inf`` to mask an expert.
        top_k: experts per token, 1 <= top_k <= E (and <= the experts in the kept groups).
        scoring: ``"softmax"`` or ``"sigmoid"``.
        renormalize: make each token's weights sum to 1.
        correction_bias: optional [E] finite selection bias (no gradient).
        n_group, topk_group: grouped top-k; E % n_group == 0, 1 <= topk_group <= n_group.
        scaling: finite factor on the weights (int, float or numpy scalar).
        backend: ``"cpp"`` (CPU), ``"triton"`` (CUDA) or ``"reference"``; None picks the device's default.

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
    check_option("scoring", scoring, SCORINGS)
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
    _check_logits(logits)
    if correction_bias is not None:
        check_finite("correction_bias", correction_bias)
    backend = _backend.resolve(backend, logits.device, "moe_route", _backend.records_grad(logits))
    return _ops.moe_route(
        logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group, scaling, backend
    )


def _check_dispatch(x, ids, num_experts, x_name="x"):
    _tensor(x_name, x, "[T, H]", 2)
    _index("ids", ids, "[T, k]")
    check_same_device("ids", ids, x_name, x.device)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids has {ids.shape[0]} rows but {x_name} has {x.shape[0]} tokens")
    if ids.shape[1] > num_experts:
        raise ValueError(f"ids has k={ids.shape[1]} columns but there are only {num_experts} experts (k > E)")
    _check_ids("ids", ids, num_experts)


def moe_permute(x: Tensor, ids: Tensor, num_experts: int, *, backend: str | None = None):
    """Copy each token once per chosen expert, grouped by expert (stable by token).

    NaN in ``x`` is copied as it is: a NaN in ``x[t]`` shows in the k rows of
    ``x_perm`` that hold token t and nowhere else; ``expert_offsets`` and
    ``row_map`` depend on ``ids`` only.  The gradient of ``x[t]`` is the sum
    of its k rows' gradients, so a NaN there reaches token t alone.

    Args:
        x: [T, H] tokens.
        ids: [T, k] int32/int64 expert ids in [0, num_experts).
        num_experts: E >= 1.
        backend: ``"cpp"`` (CPU), ``"triton"`` (CUDA) or ``"reference"``; None picks the device's default.

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
    # The expert counts and offsets are two int64 buffers of E entries: refuse an E no device could hold.
    # (Not while torch.compile traces: dynamo cannot trace the os.sysconf that asks for the RAM size.)
    if not torch.compiler.is_compiling():
        check_memory("num_experts", 16 * (num_experts + 1), x.device)
    backend = _backend.resolve(backend, x.device, "moe_permute", _backend.records_grad(x))
    return _ops.moe_permute(x, ids, num_experts, backend)


def moe_unpermute(y: Tensor, row_map: Tensor, weights: Tensor, *, backend: str | None = None) -> Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j weights[t, j] * y[row_map[t, j]]``.

    NaN propagates per token: a NaN in row r of ``y`` makes NaN the output
    rows of the tokens whose ``row_map`` names r (whatever their weight, as
    ``0 * NaN`` is NaN), and a NaN in ``weights[t]`` makes row t NaN; the
    other tokens are untouched.

    Args:
        y: [R, H] rows in permuted order (R = T*k after :func:`moe_permute`).
        row_map: [T, k] int32/int64 from :func:`moe_permute`, values in [0, R).
        weights: [T, k] router weights.
        backend: ``"cpp"`` (CPU), ``"triton"`` (CUDA) or ``"reference"``; None picks the device's default.

    Returns:
        [T, H] in ``y``'s dtype (half types accumulate in float32).
        Differentiable in ``y`` and ``weights``.

    Example::

        >>> x, (weights, ids) = torch.randn(4, 8), moe_route(torch.randn(4, 3), top_k=2)
        >>> x_perm, offsets, row_map = moe_permute(x, ids, 3)
        >>> out = moe_unpermute(2.0 * x_perm, row_map, weights)  # == 2 x, as the weights sum to 1
    """
    _tensor("y", y, "[R, H]", 2)
    _index("row_map", row_map, "[T, k]")
    _tensor("weights", weights, "[T, k]", 2)
    check_same_device("row_map", row_map, "y", y.device)
    check_same_device("weights", weights, "y", y.device)
    if weights.shape != row_map.shape:
        raise ValueError(
            f"weights must have the shape of row_map {tuple(row_map.shape)}, got {tuple(weights.shape)}"
        )
    _check_row_map(row_map, y.shape[0])
    backend = _backend.resolve(backend, y.device, "moe_unpermute", _backend.records_grad(y, weights))
    return _ops.moe_unpermute(y, row_map.long(), weights, backend)


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

    NaN propagates per token: a NaN in ``x[t]`` or ``weights[t]`` makes
    output row t NaN, and a NaN in expert e's ``w_gate_up[e]`` or
    ``w_down[e]`` reaches the rows of the tokens routed to e (whatever their
    weight, as ``0 * NaN`` is NaN); the other rows are exactly what they
    would be without it.  An expert no token chose is never read.

    Args:
        x: [T, H]; w_gate_up: [E, 2I, H] and w_down: [E, H, I] in x's dtype;
        weights: [T, k] router weights (any float dtype); ids: [T, k] int32/int64 in [0, E).
        activation: ``"silu"`` or ``"gelu"`` (exact).
        backend: ``"cpp"`` (CPU), ``"triton"`` (CUDA) or ``"reference"``; None picks the device's default.

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
    check_option("activation", activation, ACTIVATIONS)
    grad = _backend.records_grad(x, w_gate_up, w_down, weights)
    backend = _backend.resolve(backend, x.device, "fused_moe", grad)
    return _ops.fused_moe(x, w_gate_up, w_down, weights, ids, activation, backend)


__all__ = ["moe_route", "moe_permute", "moe_unpermute", "fused_moe"]

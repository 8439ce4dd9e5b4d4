"""Reference mixture-of-experts dispatch: routing, permutation, expert MLPs.

Plain PyTorch, differentiable by autograd, in float32 or float64.  The kernels
of later issues are tested against these functions.

Shapes: ``T`` tokens, ``H`` hidden size, ``E`` experts, ``k`` experts per
token, ``I`` expert intermediate size.

  moe_route(logits [T, E], top_k, ...)            -> weights [T, k], ids [T, k] int32
  moe_permute(x [T, H], ids [T, k], num_experts)  -> x_perm [T*k, H], expert_offsets [E+1] int64,
                                                     row_map [T, k] int64
  moe_unpermute(y [T*k, H], row_map [T, k], weights [T, k]) -> [T, H]
  fused_moe(x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], weights [T, k], ids [T, k]) -> [T, H]

Conventions pinned here:

* Selection ties go to the lowest expert id (a stable descending sort, not
  ``torch.topk``, whose order among equal values is unspecified).
* ``ids[t]`` lists the chosen experts best first.
* Renormalisation divides by ``sum + 1e-20`` (DeepSeek-V3's guard against a
  zero sum of underflowed sigmoid scores); for softmax scores the sum is at
  least 1/E, so the guard is below half an ulp and changes nothing.
* ``row_map[t, j]`` is the row of ``x_perm`` that holds token ``t``'s
  ``j``-th choice, so undoing the permutation is a gather.
* A ``-inf`` logit masks an expert: it is ranked below every unmasked one
  whatever the correction bias (callers must leave ``top_k`` unmasked).
* ``ids`` are int32 (transformers indexes with int64: call ``.long()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import stable_bucket_sort

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu")
RENORM_EPS = 1e-20


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing runs in float32, or float64 when the logits are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Expert math accumulates in float32 for half types, float64 if any input is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def scores_of(logits: Tensor, scoring: str) -> Tensor:
    """Router probabilities [T, E] in :func:`score_dtype`."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    s = logits.to(score_dtype(logits.dtype))
    return torch.softmax(s, dim=-1) if scoring == "softmax" else torch.sigmoid(s)


def topk_lowest_id(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of each row, best first, ties to the lowest index.

    A stable sort keeps equal values in their original (ascending index) order,
    which is exactly the tie rule; ``torch.topk`` promises no order among ties.
    """
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def group_mask(choice: Tensor, n_group: int, topk_group: int, biased: bool) -> Tensor:
    """[T, E] bool: experts in each token's ``topk_group`` best groups.

    A group's score is its largest ``choice`` score, or with a correction bias
    the sum of its two largest biased scores (DeepSeek-V3; vLLM ``grouped_topk``).
    """
    T, E = choice.shape
    per = E // n_group
    grouped = choice.view(T, n_group, per)
    if biased:
        gscore = torch.topk(grouped, min(2, per), dim=-1).values.sum(-1)
    else:
        gscore = grouped.amax(-1)
    keep = topk_lowest_id(gscore, topk_group)
    mask = torch.zeros(T, n_group, dtype=torch.bool, device=choice.device).scatter(1, keep, True)
    return mask.repeat_interleave(per, dim=1)


def selection(
    logits: Tensor,
    top_k: int,
    scoring: str = "softmax",
    correction_bias: Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(scores [T, E], choice [T, E], ids [T, k] int64): the routing decision without the weights.

    ``choice`` is what the experts are ranked on: the scores plus the bias,
    ``-inf`` for masked experts (a ``-inf`` logit) and, when grouping, for
    the experts outside the kept groups.  A chosen id whose choice is
    ``-inf`` means the row had fewer than ``top_k`` selectable experts.
    """
    scores = scores_of(logits, scoring)
    choice = scores.detach()
    if correction_bias is not None:
        # The bias steers which experts are chosen, never how much they weigh.
        choice = choice + correction_bias.detach().to(choice.dtype)
    # A masked expert's score is 0, which a bias could lift: rank it last instead.
    choice = choice.masked_fill(torch.isneginf(logits), float("-inf"))
    if n_group is not None:
        keep = group_mask(choice, n_group, topk_group, correction_bias is not None)
        choice = choice.masked_fill(~keep, float("-inf"))
    return scores, choice, topk_lowest_id(choice, top_k)


def select_experts(
    logits: Tensor,
    top_k: int,
    scoring: str = "softmax",
    correction_bias: Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(scores [T, E], ids [T, k] int64): :func:`selection` without the ranking values."""
    scores, _, ids = selection(logits, top_k, scoring, correction_bias, n_group, topk_group)
    return scores, ids


def route_weights(scores: Tensor, ids: Tensor, renormalize: bool, scaling: float) -> Tensor:
    """The unbiased scores of the chosen experts, renormalised if asked, times ``scaling``."""
    w = scores.gather(1, ids.long())
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + RENORM_EPS)
    return w * scaling


def moe_route(
    logits: Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Top-k routing: which experts each token goes to, and with what weight.

    Args:
        logits: [T, E] router logits (``-inf`` masks an expert).
        top_k: experts per token.
        scoring: ``"softmax"`` over the experts (Mixtral) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: make each token's ``k`` weights sum to 1.
        correction_bias: optional [E], added to the scores for selection only.
        n_group, topk_group: grouped top-k: keep each token's ``topk_group``
            best of ``n_group`` equal groups of experts, then pick ``top_k``.
        scaling: multiplies the final weights.

    Returns:
        weights [T, k] (float32; float64 for float64 logits), ids [T, k] int32, best first.

    Example::

        >>> w, ids = moe_route(torch.randn(5, 8), top_k=2)
    """
    scores, ids = select_experts(logits, top_k, scoring, correction_bias, n_group, topk_group)
    return route_weights(scores, ids, renormalize, scaling), ids.to(torch.int32)


def permutation(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order [T*k], expert_offsets [E+1], row_map [T, k]) for the flattened (token, slot) pairs.

    ``order[r]`` is the flat slot ``t*k + j`` whose row ``r`` it is; the
    bucket sort by expert is stable, so tokens stay in ascending order within
    each expert.
    """
    T, k = ids.shape
    offsets, order = stable_bucket_sort(ids, num_experts)
    # row_map inverts order: the slot at sorted position r goes back to row r.
    row_map = torch.zeros_like(order).scatter(0, order, torch.arange(T * k, device=ids.device))
    return order, offsets, row_map.view(T, k)


def moe_permute(x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Copy each token once per chosen expert, grouped by expert.

    Args:
        x: [T, H] tokens.
        ids: [T, k] expert ids in [0, num_experts).
        num_experts: E.

    Returns:
        x_perm [T*k, H] (expert 0's rows first, tokens ascending within an
        expert), expert_offsets [E+1] int64 (expert e owns rows
        ``offsets[e]:offsets[e+1]``), row_map [T, k] int64 (the row of
        ``x_perm`` holding token t's j-th choice).

    Example::

        >>> xp, off, row_map = moe_permute(torch.randn(5, 4), torch.tensor([[0, 1]] * 5), 2)
    """
    order, offsets, row_map = permutation(ids, num_experts)
    return x.index_select(0, order // ids.shape[1]), offsets, row_map


def moe_unpermute(y: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j weights[t, j] * y[row_map[t, j]]``.

    Args:
        y: [R, H] expert outputs in permuted order (R = T*k from :func:`moe_permute`).
        row_map: [T, k] int64 rows of ``y``.
        weights: [T, k] router weights.

    Returns:
        [T, H] in ``y``'s dtype (accumulated in float32 for half types).

    Example::

        >>> weights, ids = moe_route(torch.randn(5, 4), 2)
        >>> x_perm, _, row_map = moe_permute(torch.randn(5, 8), ids, 4)
        >>> out = moe_unpermute(x_perm.relu(), row_map, weights)
    """
    cdt = compute_dtype(y.dtype, weights.dtype)
    T, k = row_map.shape
    picked = y.index_select(0, row_map.reshape(-1)).view(T, k, y.shape[1]).to(cdt)
    return (picked * weights.to(cdt).unsqueeze(-1)).sum(1).to(y.dtype)


def activation_fn(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu  # the exact (erf) GELU, as transformers' "gelu"
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def expert_mlp(xs: Tensor, w_gate_up: Tensor, w_down: Tensor, act) -> Tensor:
    """One expert on its rows: act(xs gate^T) * (xs up^T), then down^T.  Gate rows come first."""
    gate, up = (xs @ w_gate_up.T).chunk(2, dim=-1)
    return (act(gate) * up) @ w_down.T


def fused_moe(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, weights: Tensor, ids: Tensor, activation: str = "silu"
) -> Tensor:
    """Dropless top-k mixture of gated MLP experts.

    ``out[t] = sum_j weights[t, j] * down_e(act(gate_e x_t) * up_e x_t)`` with
    ``e = ids[t, j]``; ``w_gate_up[e]`` stacks the gate rows over the up rows
    (the vLLM and transformers layout).  No capacity limit: every (token,
    slot) pair is computed, and experts that receive no token are skipped.

    The experts see ragged row counts, so after :func:`moe_permute` each one
    is one dense GEMM pair on its slice of rows: a loop over the E experts
    (never over tokens) is the grouped GEMM written in plain PyTorch.

    Args:
        x: [T, H]; w_gate_up: [E, 2I, H]; w_down: [E, H, I];
        weights: [T, k] router weights; ids: [T, k] expert ids.
        activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (exact GELU).

    Returns:
        [T, H] in ``x``'s dtype; half inputs accumulate in float32.

    Example::

        >>> w, ids = moe_route(torch.randn(6, 4), 2)
        >>> out = fused_moe(torch.randn(6, 8), torch.randn(4, 10, 8), torch.randn(4, 8, 5), w, ids)
    """
    act = activation_fn(activation)
    E, H = w_gate_up.shape[0], x.shape[1]
    cdt = compute_dtype(x.dtype, w_gate_up.dtype, w_down.dtype, weights.dtype)
    x_perm, offsets, row_map = moe_permute(x, ids, E)
    bounds = offsets.tolist()
    parts = [
        expert_mlp(x_perm[lo:hi].to(cdt), w_gate_up[e].to(cdt), w_down[e].to(cdt), act)
        for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
        if hi > lo
    ]
    y = torch.cat(parts) if parts else x.new_zeros((0, H), dtype=cdt)
    return moe_unpermute(y, row_map, weights.to(cdt)).to(x.dtype)


def gelu_grad(g: Tensor) -> Tensor:
    """d/dg of the exact GELU g * Phi(g)."""
    return 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0)))) + g * torch.exp(-0.5 * g * g) / math.sqrt(
        2.0 * math.pi
    )


def silu_grad(g: Tensor) -> Tensor:
    """d/dg of g * sigmoid(g)."""
    s = torch.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


ACTIVATION_GRADS = {"silu": silu_grad, "gelu": gelu_grad}

__all__ = ["moe_route", "moe_permute", "moe_unpermute", "fused_moe", "SCORINGS", "ACTIVATIONS"]

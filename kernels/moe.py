"""Triton kernels for mixture-of-experts dispatch: routing, permutation and the grouped expert GEMMs.

Routing (``moe_route_fwd``) is one kernel.  A program owns ``BLOCK_T``
tokens and all E experts as a [BLOCK_T, BLOCK_E] tile: it forms the scores
(softmax over the experts, or a sigmoid) in float32 (float64 for float64
logits), adds the correction bias to rank on, masks ``-inf`` logits, and
with grouping scores each of the ``n_group`` groups (the sum of its two
best biased scores with a bias, its best score without: DeepSeek-V3's rule)
and keeps the ``topk_group`` best groups.  The ``top_k`` experts are then
taken one at a time as an arg-max whose ties go to the lowest id, so the
result is the stable descending sort of the reference for any input.  The
weights are the unbiased scores of the chosen experts, renormalised
(``sum + 1e-20``) and scaled.  Its backward recomputes the scores and
applies the softmax (or sigmoid) Jacobian to the scattered weight gradients.

Permutation.  The (token, slot) pairs ``n = t*k + j`` are bucket-sorted by
expert, stably, on the device and without a host synchronisation (the
counting sort of Blelloch's "Prefix Sums and Their Applications", 1990,
arranged like a GPU radix-sort pass):

1. ``_expert_histogram_kernel``: each block of ``BLOCK_N`` pairs counts its
   pairs per expert, into ``counts[E, n_blocks]``;
2. ``_block_scan_kernel``: per expert, an exclusive scan over the blocks
   turns the counts into each block's first position inside the expert;
3. ``_expert_offsets_kernel``: one program scans the expert totals into
   the int64 ``expert_offsets`` (and the GEMM's tile offsets);
4. ``_expert_scatter_kernel``: each pair's position is its expert's offset
   plus its block's base plus its rank among the earlier pairs of its block
   with the same expert (a [BLOCK_N, BLOCK_N] comparison), so pairs keep
   their flat order within an expert: exactly the reference permutation.

Grouped GEMMs (``fused_moe_fwd``).  The sorted rows are cut into tiles of
``BLOCK_M`` rows of one expert (``_tile_map_kernel``: tile -> expert and
first row, read from the device).  Two layouts are offered: unpadded (the
tiles of expert e cover rows ``offsets[e]:offsets[e+1]`` of the sorted
order and the last tile is masked) and block-padded (every expert's rows
are rounded up to a multiple of ``BLOCK_M``, with -1 for the padding, as in
vLLM's ``moe_align_block_size``; a tile's first row is then simply
``tile * BLOCK_M``).  The grid is sized for the worst case,
``(T*k + min(E, T*k) * (BLOCK_M - 1)) // BLOCK_M`` tiles, and tiles past the
real count return at once: no shape depends on the data.

* ``_gate_up_kernel`` gathers the token rows inside its loads (the permuted
  [T*k, H] copy of x is never written), computes the gate and up products
  of one column tile in the same pass over H, and stores
  ``h = act(gate) * up`` (SwiGLU, or the exact erf GELU);
* ``_rows_gemm_kernel`` multiplies ``h`` by the expert's down projection and
  scales each row by its router weight in the epilogue, storing rows in
  (token, slot) order;
* ``_combine_kernel`` sums each token's k rows in slot order j = 0..k-1, so
  the combine needs no float atomics and is bitwise reproducible.

Backward (``fused_moe_bwd``).  ``_bwd_rows_kernel`` recomputes gate and up
and, in the same pass over H, ``q = grad_out @ D_e``; its epilogue gives the
router-weight gradient ``<h, q>`` (as per-column-tile partials summed in a
fixed order), ``h`` for dW_down, and the gate/up gradients ``G``.  dX is
``G @ W_gate_up[e]`` (``_rows_gemm_kernel``) combined per token as above.
The weight gradients are per-expert ``A^T B`` products
(``_expert_wgrad_kernel``): a program owns one output tile of one expert
and loops over that expert's rows in order, so every element has one
writer and a fixed summation order (idle experts get exact zeros).

Index arithmetic.  Every product of an index with a stride is formed in
int64 (tokens, rows, experts and columns are cast before multiplying): at
T*k*H > 2^31 elements an int32 offset wraps, the bug vLLM and SGLang fixed.

Arithmetic is float32 for fp16/bf16/fp32 inputs and float64 for float64
inputs (the ``ACC`` constexpr); fp32 products use ``input_precision="ieee"``
(never tf32).  The intermediates between GEMMs (h, G, the weighted rows of
each pair) are stored in x's dtype, so half types round once per stage, as
vLLM's intermediate caches do; every sum runs in ``ACC``.  Float constants that must hold in float64
are built with ``tl.full`` in ``ACC`` (a Python float literal in a kernel is
float32), and ``scaling`` reaches the router kernel as a one-element tensor.

Host reads.  The value checks of the ops (ids in range, logits free of NaN,
enough selectable experts) read the device; they are skipped while a CUDA
graph is being captured (``torch.cuda.is_current_stream_capturing()``),
where such a read is illegal, so inputs captured into a graph must be valid.
With ``FRONTIERS_FAST_DEBUG_POISON=1`` every buffer allocated here starts
as NaN (floats) or -2 (integers), so an unwritten element shows.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from frontiers_fast._checks import check_finite
from frontiers_fast._library import absent
from frontiers_fast.ops.moe import _check_ids, _check_logits, _check_row_map, _check_selectable
from frontiers_fast.reference import moe as ref

from ._utils import acc_dtype, acc_type, col_block, num_warps, on_device, row_block

RENORM_EPS = tl.constexpr(ref.RENORM_EPS)
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SORT_BLOCK = 128  # (token, slot) pairs per block of the bucket sort: its in-block rank is a [128, 128] tile
ROUTE_TILE = 2048  # elements of the router's [BLOCK_T, BLOCK_E] tile


# ---------------------------------------------------------------------------
# host-side helpers
# ---------------------------------------------------------------------------
def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _new(shape, dtype, device):
    """torch.empty for a buffer of this module; NaN (floats) or -2 (integers) under FRONTIERS_FAST_DEBUG_POISON=1."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FRONTIERS_FAST_DEBUG_POISON") == "1" and t.numel() > 0:
        t.fill_(float("nan") if t.is_floating_point() else -2)
    return t


def _capturing() -> bool:
    # A value check reads the device from the host, which a CUDA graph capture forbids.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _launchable(grid) -> bool:
    return all(g > 0 for g in grid)


def _dot_block(n: int, cap: int) -> int:
    # tl.dot needs every tile dimension >= 16
    return max(16, min(cap, _np2(n)))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be rounded to tf32 (10 mantissa bits) by tl.dot; halves ignore it.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _block_m(rows: int, experts: int, dtype: torch.dtype) -> int:
    """Rows per GEMM tile: about the mean rows per used expert, 16 to 64 (32 in float64)."""
    used = max(1, min(experts, rows))
    return max(16, min(32 if dtype == torch.float64 else 64, _np2(rows // used)))


def _widen(x, w_gate_up, w_down, weights):
    """The reference computes in float64 when the router weights are float64: do the same."""
    cdt = ref.compute_dtype(x.dtype, w_gate_up.dtype, w_down.dtype, weights.dtype)
    if cdt == torch.float64 and x.dtype != torch.float64:
        return x.double(), w_gate_up.double(), w_down.double()
    return x, w_gate_up, w_down


class _Schedule(NamedTuple):
    """The bucket sort of the (token, slot) pairs by expert, and the GEMM tiles over it."""

    offsets: torch.Tensor  # [E+1] int64: expert e owns sorted rows offsets[e]:offsets[e+1]
    row_map: torch.Tensor | None  # [T, k] int64: the sorted row of pair (t, j)
    slot_of_row: torch.Tensor | None  # [rows] int64: the pair t*k+j of each (padded) sorted row, -1 padding
    tile_off: torch.Tensor | None  # [E+1] int64: expert e owns tiles tile_off[e]:tile_off[e+1]
    tile_expert: torch.Tensor | None  # [max_tiles] int32, -1 past the last tile
    tile_row: torch.Tensor | None  # [max_tiles] int64: first row of the tile
    tile_end: torch.Tensor | None  # [max_tiles] int64: one past its last row
    max_tiles: int
    rows: int  # rows of the sorted layout: T*k, or max_tiles * block_m when padded
    block_m: int
    padded: bool


def _expert_sort(ids, E, *, block_m=None, padded=False, want_row_map=False, x=None, x_perm=None):
    """Stable bucket sort of ``ids`` [T, k] by expert on the device; see the module docstring.

    ``block_m`` also builds the GEMM tile map; ``x``/``x_perm`` also copy x's rows to sorted order.
    """
    dev = ids.device
    T, k = ids.shape
    N = T * k
    keys = ids.contiguous().view(-1)
    bn = min(SORT_BLOCK, max(16, _np2(N)))
    n_blocks = triton.cdiv(N, bn)
    tiles = block_m is not None
    counts = _new((E, n_blocks), torch.int64, dev)
    totals = _new((E,), torch.int64, dev)
    offsets = _new((E + 1,), torch.int64, dev)
    tile_off = _new((E + 1,), torch.int64, dev) if tiles else None
    be_hist = max(1, min(_np2(E), 4096 // bn))
    _expert_histogram_kernel[(n_blocks,)](
        keys, counts, N, E, n_blocks, BLOCK_N=bn, BLOCK_E=be_hist, num_warps=4
    )  # fmt: skip
    bb = min(64, _np2(n_blocks))
    be_scan = max(1, min(_np2(E), 2048 // bb))
    _block_scan_kernel[(triton.cdiv(E, be_scan),)](
        counts, totals, E, n_blocks, BLOCK_E=be_scan, BLOCK_B=bb, num_warps=4
    )  # fmt: skip
    _expert_offsets_kernel[(1,)](
        totals, offsets, tile_off if tiles else offsets, E, block_m or 1,
        TILES=tiles, BLOCK_E=min(1024, _np2(E)), num_warps=4,
    )  # fmt: skip

    max_tiles = (N + min(E, N) * (block_m - 1)) // block_m if tiles else 0
    rows = max_tiles * block_m if (tiles and padded) else N
    row_map = _new((T, k), torch.int64, dev) if want_row_map else None
    if tiles and padded:
        slot_of_row = torch.full((rows,), -1, dtype=torch.int64, device=dev)
    elif tiles:
        slot_of_row = _new((N,), torch.int64, dev)
    else:
        slot_of_row = None
    copy = x is not None
    H = x.shape[1] if copy else 0
    bh = max(1, min(col_block(H), 4096 // bn))
    dummy = offsets
    _expert_scatter_kernel[(n_blocks,)](
        keys, counts, offsets, tile_off if tiles else dummy,
        slot_of_row if slot_of_row is not None else dummy, row_map if want_row_map else dummy,
        x if copy else dummy, x_perm if copy else dummy,
        N, E, k, H, n_blocks,
        *(x.stride() if copy else (0, 0)), *(x_perm.stride() if copy else (0, 0)),
        ORDER=tiles, PADDED=tiles and padded, ROW_MAP=want_row_map, COPY=copy, BLOCK_M=block_m or 1,
        BLOCK_N=bn, BLOCK_H=bh, num_warps=4,
    )  # fmt: skip
    tile_expert = tile_row = tile_end = None
    if tiles and max_tiles > 0:
        tile_expert = _new((max_tiles,), torch.int32, dev)
        tile_row = _new((max_tiles,), torch.int64, dev)
        tile_end = _new((max_tiles,), torch.int64, dev)
        btl = min(64, _np2(max_tiles))
        _tile_map_kernel[(triton.cdiv(max_tiles, btl),)](
            tile_off, offsets, tile_expert, tile_row, tile_end, E, max_tiles,
            BLOCK_M=block_m, PADDED=padded, BLOCK_TL=btl, BLOCK_E=max(1, min(_np2(E), 4096 // btl)),
            num_warps=4,
        )  # fmt: skip
    return _Schedule(
        offsets, row_map, slot_of_row, tile_off, tile_expert, tile_row, tile_end, max_tiles, rows,
        block_m or 0, padded,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# shared device pieces
# ---------------------------------------------------------------------------
@triton.jit
def _act_and_grad(g, GELU: tl.constexpr, ACC: tl.constexpr):
    """(act(g), act'(g)) for SiLU g*sigmoid(g) or the exact GELU g*Phi(g)."""
    if GELU:
        cdf = 0.5 * (1.0 + tl.erf(g * tl.full((), INV_SQRT2, ACC)))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * tl.full((), INV_SQRT_2PI, ACC)
    else:
        sg = 1.0 / (1.0 + tl.exp(-g))
        a = g * sg
        da = sg * (1.0 + g * (1.0 - sg))
    return a, da


@triton.jit
def _tile_rows(tile, tile_row_ptr, tile_end_ptr, slot_ptr, PADDED: tl.constexpr, BLOCK_M: tl.constexpr):
    """The sorted rows of a GEMM tile, which of them hold a pair, and that pair t*k+j (0 where none)."""
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M).to(tl.int64)
    if PADDED:
        slot = tl.load(slot_ptr + rows)
        valid = slot >= 0
        slot = tl.maximum(slot, 0)
    else:
        valid = rows < tl.load(tile_end_ptr + tile)
        slot = tl.load(slot_ptr + rows, mask=valid, other=0)
    return rows, valid, slot


@triton.jit
def _router_scores(l, SIGMOID: tl.constexpr):
    """softmax over the experts (axis 1) or sigmoid, with -inf logits scoring exactly 0."""
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-l))
    else:
        m = tl.max(l, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row with every expert masked: no inf - inf
        ex = tl.exp(l - m[:, None])
        den = tl.sum(ex, axis=1)
        s = ex / tl.where(den == 0.0, 1.0, den)[:, None]
    return s


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------
@triton.jit
def _route_fwd_kernel(
    logits_ptr, bias_ptr, scale_ptr, w_ptr, ids_ptr, sel_ptr,
    T, E, top_k, per_group, n_group, topk_group,
    logits_stride_t, logits_stride_e, bias_stride, w_stride_t, ids_stride_t, sel_stride_t,
    SIGMOID: tl.constexpr,  # constexpr: the scoring function
    RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # constexpr flags: absent options must not load anything
    GROUPED: tl.constexpr,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 logits)
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):  # fmt: skip
    """Scores, selection and weights for BLOCK_T tokens; see the module docstring.

    Ranking value c = score + bias, -inf for masked experts (and, grouped,
    for experts outside the kept groups).  Selection j takes
    argmax{c_e : e not yet taken}, the lowest e among equals: the j-th entry
    of the stable descending sort.  ``sel`` receives the ranking value of
    each pick, so the launcher can refuse rows that ran out of experts.
    """
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lane = tl.arange(0, BLOCK_E)
    mask_t = t < T
    mask_e = lane < E
    m2 = mask_t[:, None] & mask_e[None, :]
    l = tl.load(
        logits_ptr + t[:, None] * logits_stride_t + lane.to(tl.int64)[None, :] * logits_stride_e,
        mask=m2,
        other=float("-inf"),
    ).to(ACC)
    s = _router_scores(l, SIGMOID)
    c = s
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + lane.to(tl.int64) * bias_stride, mask=mask_e, other=0.0).to(ACC)[None, :]
    # a masked expert's score is 0, which a bias could lift: rank it last instead
    c = tl.where(l == float("-inf"), float("-inf"), c)

    if GROUPED:
        grp = lane // per_group
        gl = tl.arange(0, BLOCK_G)
        gscore = tl.full([BLOCK_T, BLOCK_G], float("-inf"), ACC)
        for g in range(0, n_group):
            member = (grp == g)[None, :] & mask_e[None, :]
            cg = tl.where(member, c, float("-inf"))
            best = tl.max(cg, axis=1)
            if HAS_BIAS:
                # with a bias a group scores its two best: drop the first best once, take the max again
                at = tl.min(tl.where(member & (cg == best[:, None]), lane[None, :], BLOCK_E), axis=1)
                second = tl.max(tl.where(lane[None, :] == at[:, None], float("-inf"), cg), axis=1)
                # (a tensor condition: per_group == 1 may arrive as a constexpr)
                n_member = tl.sum(member.to(tl.int32), axis=1)
                best = tl.where(n_member > 1, best + second, best)
            gscore = tl.where(gl[None, :] == g, best[:, None], gscore)
        gtaken = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int32)
        kept = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
        for _r in range(0, topk_group):
            cand = (gl[None, :] < n_group) & (gtaken == 0)
            gbest = tl.max(tl.where(cand, gscore, float("-inf")), axis=1)
            gi = tl.min(tl.where(cand & (gscore == gbest[:, None]), gl[None, :], BLOCK_G), axis=1)
            gtaken = tl.where(gl[None, :] == gi[:, None], 1, gtaken)
            kept = tl.where(grp[None, :] == gi[:, None], 1, kept)
        c = tl.where(kept != 0, c, float("-inf"))

    kl = tl.arange(0, BLOCK_K)
    taken = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    w = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
    sel = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
    idx = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in range(0, top_k):
        cand = mask_e[None, :] & (taken == 0)
        best = tl.max(tl.where(cand, c, float("-inf")), axis=1)
        pick = tl.min(tl.where(cand & (c == best[:, None]), lane[None, :], BLOCK_E), axis=1)
        hit = lane[None, :] == pick[:, None]
        taken = tl.where(hit, 1, taken)
        col = kl[None, :] == j
        w = tl.where(col, tl.sum(tl.where(hit, s, 0.0), axis=1)[:, None], w)
        sel = tl.where(col, best[:, None], sel)
        idx = tl.where(col, pick[:, None], idx)
    if RENORM:
        w = w / (tl.sum(w, axis=1)[:, None] + tl.full((), RENORM_EPS, ACC))
    w = w * tl.load(scale_ptr).to(ACC)
    mk = mask_t[:, None] & (kl < top_k)[None, :]
    kk = kl.to(tl.int64)[None, :]
    tl.store(w_ptr + t[:, None] * w_stride_t + kk, w.to(w_ptr.dtype.element_ty), mask=mk)
    tl.store(ids_ptr + t[:, None] * ids_stride_t + kk, idx, mask=mk)
    tl.store(sel_ptr + t[:, None] * sel_stride_t + kk, sel, mask=mk)


@triton.jit
def _route_bwd_kernel(
    logits_ptr, ids_ptr, gw_ptr, scale_ptr, gl_ptr,
    T, E, top_k,
    logits_stride_t, logits_stride_e, gl_stride_t, gl_stride_e,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 logits)
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Gradient of the weights w_j = scaling * s_{e_j} (/ (sum_i s_{e_i} + eps)) with respect to the logits.

    With g_j = scaling * dL/dw_j and den = sum_i s_{e_i} + eps, renormalising
    gives dL/ds_{e_j} = g_j / den - (sum_i g_i s_{e_i}) / den^2 (summed over
    repeated ids); then softmax: s * (gs - <s, gs>), sigmoid: gs s (1 - s).
    ``ids`` and ``gw`` are contiguous [T, k], read at the pair t*k + j.
    """
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lane = tl.arange(0, BLOCK_E)
    mask_t = t < T
    mask_e = lane < E
    m2 = mask_t[:, None] & mask_e[None, :]
    l = tl.load(
        logits_ptr + t[:, None] * logits_stride_t + lane.to(tl.int64)[None, :] * logits_stride_e,
        mask=m2,
        other=float("-inf"),
    ).to(ACC)
    s = _router_scores(l, SIGMOID)
    scale = tl.load(scale_ptr).to(ACC)
    pair = t * top_k
    if RENORM:
        den = tl.zeros([BLOCK_T], dtype=ACC)
        dot = tl.zeros([BLOCK_T], dtype=ACC)
        for j in range(0, top_k):
            e = tl.load(ids_ptr + pair + j, mask=mask_t, other=0).to(tl.int32)
            g = tl.load(gw_ptr + pair + j, mask=mask_t, other=0.0).to(ACC) * scale
            sj = tl.sum(tl.where(lane[None, :] == e[:, None], s, 0.0), axis=1)
            den += sj
            dot += g * sj
        den += tl.full((), RENORM_EPS, ACC)
    gs = tl.zeros([BLOCK_T, BLOCK_E], dtype=ACC)
    for j in range(0, top_k):
        e = tl.load(ids_ptr + pair + j, mask=mask_t, other=0).to(tl.int32)
        g = tl.load(gw_ptr + pair + j, mask=mask_t, other=0.0).to(ACC) * scale
        if RENORM:
            g = g / den - dot / (den * den)
        gs += tl.where(lane[None, :] == e[:, None], g[:, None], 0.0)
    if SIGMOID:
        gl = gs * s * (1.0 - s)
    else:
        gl = s * (gs - tl.sum(s * gs, axis=1)[:, None])
    tl.store(
        gl_ptr + t[:, None] * gl_stride_t + lane.to(tl.int64)[None, :] * gl_stride_e,
        gl.to(gl_ptr.dtype.element_ty),
        mask=m2,
    )


def _route_blocks(E: int):
    be = _np2(E)
    return max(1, min(32, ROUTE_TILE // be)), be


@on_device
def moe_route_fwd(logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group, scaling):
    """Top-k routing in one kernel (Mixtral softmax, or DeepSeek-V3 sigmoid with grouped top-k).

    Args:
        logits: [T, E] (-inf masks an expert); top_k: 1 <= k <= E.
        scoring: ``"softmax"`` or ``"sigmoid"``; renormalize: divide by the sum (+1e-20).
        correction_bias: None or [E], for the selection only.
        n_group, topk_group: None, or grouped top-k (E % n_group == 0).
        scaling: factor on the weights.

    Returns:
        weights [T, k] float32 (float64 for float64 logits), ids [T, k] int32, best first.

    Example::

        >>> w, ids = moe_route_fwd(torch.randn(16, 8, device="cuda"), 2, "softmax", True, None, None, None, 1.0)
    """
    check = not _capturing()
    if check:
        _check_logits(logits)
        if correction_bias is not None:
            check_finite("correction_bias", correction_bias)
    T, E = logits.shape
    dev = logits.device
    sdt = ref.score_dtype(logits.dtype)
    weights = _new((T, top_k), sdt, dev)
    ids = _new((T, top_k), torch.int32, dev)
    sel = _new((T, top_k), sdt, dev)
    if T == 0:
        return weights, ids
    grouped = n_group is not None
    bt, be = _route_blocks(E)
    # scaling as a tensor of the score dtype: a float argument reaches a kernel as float32
    scale = torch.full((1,), float(scaling), dtype=sdt, device=dev)
    bias = correction_bias if correction_bias is not None else scale
    _route_fwd_kernel[(triton.cdiv(T, bt),)](
        logits, bias, scale, weights, ids, sel,
        T, E, top_k, E // n_group if grouped else 1, n_group or 1, topk_group or 1,
        *logits.stride(), bias.stride(0), weights.stride(0), ids.stride(0), sel.stride(0),
        SIGMOID=scoring == "sigmoid", RENORM=bool(renormalize), HAS_BIAS=correction_bias is not None,
        GROUPED=grouped, ACC=acc_type(sdt), BLOCK_T=bt, BLOCK_E=be, BLOCK_K=_np2(top_k),
        BLOCK_G=_np2(n_group or 1), num_warps=num_warps(bt, be),
    )  # fmt: skip
    if check:
        # the helper gathers choice[t, ids[t]]; sel already holds those values, in pick order
        _check_selectable(sel, torch.arange(top_k, device=dev).expand(T, top_k), top_k, n_group)
    return weights, ids


@on_device
def moe_route_bwd(logits, ids, grad_weights, scoring, renormalize, scaling):
    """Gradient of :func:`moe_route_fwd`'s weights with respect to the logits (the bias has none).

    Args:
        logits: [T, E]; ids: [T, k] from the forward; grad_weights: [T, k].

    Returns:
        grad_logits [T, E] in the logits' dtype.

    Example::

        >>> g = moe_route_bwd(logits, ids, torch.ones_like(w), "softmax", True, 1.0)
    """
    T, E = logits.shape
    dev = logits.device
    grad = _new((T, E), logits.dtype, dev)
    if T == 0 or E == 0:
        return grad
    sdt = ref.score_dtype(logits.dtype)
    bt, be = _route_blocks(E)
    scale = torch.full((1,), float(scaling), dtype=sdt, device=dev)
    _route_bwd_kernel[(triton.cdiv(T, bt),)](
        logits, ids.contiguous(), grad_weights.contiguous(), scale, grad,
        T, E, ids.shape[1],
        *logits.stride(), *grad.stride(),
        SIGMOID=scoring == "sigmoid", RENORM=bool(renormalize), ACC=acc_type(sdt),
        BLOCK_T=bt, BLOCK_E=be, num_warps=num_warps(bt, be),
    )  # fmt: skip
    return grad


# ---------------------------------------------------------------------------
# the bucket sort by expert
# ---------------------------------------------------------------------------
@triton.jit
def _expert_histogram_kernel(
    keys_ptr, counts_ptr, N, E, n_blocks, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr
):
    """counts[e, b] = #{pairs n of block b with keys[n] == e}, E in chunks of BLOCK_E (no atomics)."""
    b = tl.program_id(0).to(tl.int64)
    n = b * BLOCK_N + tl.arange(0, BLOCK_N)
    key = tl.load(keys_ptr + n, mask=n < N, other=-1).to(tl.int32)
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E)
        c = tl.sum((key[:, None] == ex[None, :]).to(tl.int64), axis=0)
        tl.store(counts_ptr + ex.to(tl.int64) * n_blocks + b, c, mask=ex < E)


@triton.jit
def _block_scan_kernel(counts_ptr, totals_ptr, E, n_blocks, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    """In place, per expert: counts[e, b] -> sum_{b' < b} counts[e, b'] (exclusive); totals[e] = the sum."""
    ex = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    me = ex < E
    run = tl.zeros([BLOCK_E], dtype=tl.int64)
    for b0 in range(0, n_blocks, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        m = me[:, None] & (bb < n_blocks)[None, :]
        ptrs = counts_ptr + ex[:, None] * n_blocks + bb[None, :]
        c = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, run[:, None] + tl.cumsum(c, axis=1) - c, mask=m)
        run += tl.sum(c, axis=1)
    tl.store(totals_ptr + ex, run, mask=me)


@triton.jit
def _expert_offsets_kernel(
    totals_ptr, offsets_ptr, tile_off_ptr, E, BLOCK_M,
    TILES: tl.constexpr,  # constexpr: also the GEMM's tiles per expert, cdiv(count, BLOCK_M), scanned
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """One program: offsets = [0, cumsum(totals)] (int64), and tile_off = [0, cumsum(cdiv(totals, BLOCK_M))]."""
    zero = tl.sum(tl.zeros([BLOCK_E], dtype=tl.int64), axis=0)
    carry = zero
    tcarry = zero
    tl.store(offsets_ptr, zero)
    if TILES:
        tl.store(tile_off_ptr, zero)
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        me = ex < E
        c = tl.load(totals_ptr + ex, mask=me, other=0)
        tl.store(offsets_ptr + ex + 1, carry + tl.cumsum(c, axis=0), mask=me)
        carry += tl.sum(c, axis=0)
        if TILES:
            nt = (c + BLOCK_M - 1) // BLOCK_M
            tl.store(tile_off_ptr + ex + 1, tcarry + tl.cumsum(nt, axis=0), mask=me)
            tcarry += tl.sum(nt, axis=0)


@triton.jit
def _expert_scatter_kernel(
    keys_ptr, base_ptr, offsets_ptr, tile_off_ptr, order_ptr, row_map_ptr, x_ptr, xp_ptr,
    N, E, k, H, n_blocks,
    x_stride_t, x_stride_h, xp_stride_r, xp_stride_h,
    ORDER: tl.constexpr,  # constexpr: write order[row] = pair (padded rows when PADDED)
    PADDED: tl.constexpr,  # constexpr: rows of expert e start at tile_off[e] * BLOCK_M
    ROW_MAP: tl.constexpr,  # constexpr: write row_map[pair] = row
    COPY: tl.constexpr,  # constexpr: also copy x[pair // k] to row `row` of xp
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Each pair's sorted row: offsets[e] + (pairs of e in earlier blocks) + (earlier pairs of e in this block).

    The in-block rank compares every pair with every earlier one, so equal
    experts keep their flat order: the sort is stable, whatever the
    scheduling.  Keys outside [0, E) are left unplaced (never written).
    """
    b = tl.program_id(0).to(tl.int64)
    loc = tl.arange(0, BLOCK_N)
    n = b * BLOCK_N + loc
    key = tl.load(keys_ptr + n, mask=n < N, other=-1).to(tl.int32)
    ok = (n < N) & (key >= 0) & (key < E)
    same = (key[:, None] == key[None, :]) & (loc[None, :] < loc[:, None]) & ok[None, :]
    rank = tl.sum(same.to(tl.int64), axis=1)
    e = tl.where(ok, key, 0).to(tl.int64)
    before = tl.load(base_ptr + e * n_blocks + b, mask=ok, other=0) + rank
    row = tl.load(offsets_ptr + e, mask=ok, other=0) + before
    if ORDER:
        if PADDED:
            prow = tl.load(tile_off_ptr + e, mask=ok, other=0) * BLOCK_M + before
            tl.store(order_ptr + prow, n, mask=ok)
        else:
            tl.store(order_ptr + row, n, mask=ok)
    if ROW_MAP:
        tl.store(row_map_ptr + n, row, mask=ok)
    if COPY:
        tok = n // k
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
            m = ok[:, None] & (hh < H)[None, :]
            v = tl.load(x_ptr + tok[:, None] * x_stride_t + hh[None, :] * x_stride_h, mask=m)
            tl.store(xp_ptr + row[:, None] * xp_stride_r + hh[None, :] * xp_stride_h, v, mask=m)


@triton.jit
def _tile_map_kernel(
    tile_off_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr, E, max_tiles,
    BLOCK_M: tl.constexpr,
    PADDED: tl.constexpr,  # constexpr: padded segments are tile-aligned, so tile t starts at row t * BLOCK_M
    BLOCK_TL: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Tile t belongs to expert e = #{e' : tile_off[e'+1] <= t}; -1 for the tiles past the last one."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_TL + tl.arange(0, BLOCK_TL)
    mt = t < max_tiles
    e = tl.zeros([BLOCK_TL], dtype=tl.int64)
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        me = ex < E
        ends = tl.load(tile_off_ptr + ex + 1, mask=me, other=0)
        e += tl.sum(((ends[None, :] <= t[:, None]) & me[None, :]).to(tl.int64), axis=1)
    live = t < tl.load(tile_off_ptr + E)
    e = tl.where(live, e, 0)
    if PADDED:
        row = t * BLOCK_M
        end = row + BLOCK_M
    else:
        row = tl.load(offsets_ptr + e) + (t - tl.load(tile_off_ptr + e)) * BLOCK_M
        end = tl.minimum(row + BLOCK_M, tl.load(offsets_ptr + e + 1))
    tl.store(tile_expert_ptr + t, tl.where(live, e, -1).to(tl.int32), mask=mt)
    tl.store(tile_row_ptr + t, row, mask=mt)
    tl.store(tile_end_ptr + t, end, mask=mt)


# ---------------------------------------------------------------------------
# gathers and combines
# ---------------------------------------------------------------------------
@triton.jit
def _combine_kernel(
    src_ptr, idx_ptr, w_ptr, out_ptr,
    T, k, H,
    src_stride_r, src_stride_h, out_stride_t, out_stride_h,
    HAS_IDX: tl.constexpr,  # constexpr: rows src[idx[t, j]]; without, src[t*k + j] (pair order)
    HAS_W: tl.constexpr,  # constexpr: weigh row j by w[t, j]
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """out[t] = sum_{j=0..k-1} (w[t, j]) src[row(t, j)], summed in slot order: one writer, fixed order.

    ``idx`` and ``w`` are contiguous [T, k], read at the pair p = t*k + j.
    """
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    hh = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask_t = t < T
    m = mask_t[:, None] & (hh < H)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC)
    for j in range(0, k):
        p = t * k + j
        if HAS_IDX:
            r = tl.load(idx_ptr + p, mask=mask_t, other=0).to(tl.int64)
        else:
            r = p
        v = tl.load(src_ptr + r[:, None] * src_stride_r + hh[None, :] * src_stride_h, mask=m, other=0.0).to(
            ACC
        )
        if HAS_W:
            v = v * tl.load(w_ptr + p, mask=mask_t, other=0.0).to(ACC)[:, None]
        acc += v
    tl.store(
        out_ptr + t[:, None] * out_stride_t + hh[None, :] * out_stride_h,
        acc.to(out_ptr.dtype.element_ty),
        mask=m,
    )


def _combine(src, idx, w, out, T, k, acc):
    """out[t] = sum_j (w[t, j]) src[idx[t, j] or t*k + j], j in order; idx and w are [T, k] (or None)."""
    H = out.shape[1]
    bh = col_block(H)
    bt = row_block(bh, lo=1, hi=64)
    grid = (triton.cdiv(T, bt), triton.cdiv(H, bh))
    if not _launchable(grid):
        return out
    dummy = out
    _combine_kernel[grid](
        src, idx.contiguous() if idx is not None else dummy, w.contiguous() if w is not None else dummy, out,
        T, k, H,
        *src.stride(), *out.stride(),
        HAS_IDX=idx is not None, HAS_W=w is not None, ACC=acc, BLOCK_T=bt, BLOCK_H=bh, num_warps=num_warps(bt, bh),
    )  # fmt: skip
    return out


@triton.jit
def _segment_sum_kernel(
    go_ptr, w_ptr, order_ptr, starts_ptr, gy_ptr,
    R, H, k,
    go_stride_t, go_stride_h, gy_stride_r, gy_stride_h,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """gy[r] = sum over the pairs p = order[starts[r]:starts[r+1]] (ascending) of w[p] * go[p // k]."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    hh = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask_r = r < R
    mask_h = hh < H
    s0 = tl.load(starts_ptr + r, mask=mask_r, other=0)
    s1 = tl.load(starts_ptr + r + 1, mask=mask_r, other=0)
    acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC)
    for i in range(0, tl.max(s1 - s0, axis=0)):
        live = mask_r & (s0 + i < s1)
        p = tl.load(order_ptr + s0 + i, mask=live, other=0)
        m = live[:, None] & mask_h[None, :]
        g = tl.load(go_ptr + (p // k)[:, None] * go_stride_t + hh[None, :] * go_stride_h, mask=m, other=0.0)
        acc += g.to(ACC) * tl.load(w_ptr + p, mask=live, other=0.0).to(ACC)[:, None]
    tl.store(
        gy_ptr + r[:, None] * gy_stride_r + hh[None, :] * gy_stride_h,
        acc.to(gy_ptr.dtype.element_ty),
        mask=mask_r[:, None] & mask_h[None, :],
    )


@triton.jit
def _row_dot_kernel(
    y_ptr, go_ptr, row_map_ptr, gw_ptr,
    N, H, k,
    y_stride_r, y_stride_h, go_stride_t, go_stride_h, gw_stride_t, gw_stride_j,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """gw[p] = <y[row_map[p]], go[p // k]> for the pairs p = t*k + j."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = p < N
    r = tl.load(row_map_ptr + p, mask=mp, other=0).to(tl.int64)
    tok = p // k
    acc = tl.zeros([BLOCK_P], dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
        m = mp[:, None] & (hh < H)[None, :]
        yv = tl.load(y_ptr + r[:, None] * y_stride_r + hh[None, :] * y_stride_h, mask=m, other=0.0).to(ACC)
        gv = tl.load(go_ptr + tok[:, None] * go_stride_t + hh[None, :] * go_stride_h, mask=m, other=0.0).to(
            ACC
        )
        acc += tl.sum(yv * gv, axis=1)
    gw_at = gw_ptr + tok * gw_stride_t + (p - tok * k) * gw_stride_j
    tl.store(gw_at, acc.to(gw_ptr.dtype.element_ty), mask=mp)


@on_device
def moe_permute_fwd(x, ids, num_experts):
    """Copy each token once per chosen expert, grouped by expert, tokens ascending within one.

    No host synchronisation: counts, offsets and the stable order are computed
    on the device (the ids check reads the host, except during CUDA graph capture).

    Args:
        x: [T, H]; ids: [T, k] int32/int64 in [0, num_experts); num_experts: E.

    Returns:
        x_perm [T*k, H], expert_offsets [E+1] int64, row_map [T, k] int64.

    Example::

        >>> x_perm, offsets, row_map = moe_permute_fwd(x, ids, 8)
    """
    if not _capturing():
        _check_ids("ids", ids, num_experts)
    T, H = x.shape
    k = ids.shape[1]
    dev = x.device
    x_perm = _new((T * k, H), x.dtype, dev)
    if T * k == 0:
        row_map = _new((T, k), torch.int64, dev)
        return x_perm, torch.zeros((num_experts + 1,), dtype=torch.int64, device=dev), row_map
    sched = _expert_sort(ids, num_experts, want_row_map=True, x=x, x_perm=x_perm)
    return x_perm, sched.offsets, sched.row_map


@on_device
def moe_permute_bwd(grad_x_perm, row_map):
    """grad_x[t] = sum_j grad_x_perm[row_map[t, j]] in slot order (a gather: no atomics).

    ``row_map`` comes from the forward and is not checked again.

    Returns:
        grad_x [T, H] in grad_x_perm's dtype.

    Example::

        >>> gx = moe_permute_bwd(torch.ones_like(x_perm), row_map)
    """
    T, k = row_map.shape
    H = grad_x_perm.shape[1]
    gx = _new((T, H), grad_x_perm.dtype, grad_x_perm.device)
    if T == 0 or H == 0:
        return gx
    if k == 0:
        return gx.zero_()
    return _combine(grad_x_perm, row_map, None, gx, T, k, acc_type(grad_x_perm.dtype))


@on_device
def moe_unpermute_fwd(y, row_map, weights):
    """Weighted combine back to token order: ``out[t] = sum_j weights[t, j] * y[row_map[t, j]]``, j in order.

    Args:
        y: [R, H]; row_map: [T, k] int32/int64 in [0, R); weights: [T, k].

    Returns:
        [T, H] in y's dtype (float64 arithmetic if y or weights is float64, else float32).

    Example::

        >>> out = moe_unpermute_fwd(x_perm, row_map, w)
    """
    if not _capturing():
        _check_row_map(row_map, y.shape[0])
    T, k = row_map.shape
    H = y.shape[1]
    out = _new((T, H), y.dtype, y.device)
    if T == 0 or H == 0:
        return out
    if k == 0:
        return out.zero_()
    acc = acc_type(ref.compute_dtype(y.dtype, weights.dtype))
    return _combine(y, row_map, weights, out, T, k, acc)


@on_device
def moe_unpermute_bwd(y, row_map, weights, grad_out, need_y, need_weights):
    """Gradients of :func:`moe_unpermute_fwd`, deterministic (no atomics).

    ``row_map`` need not be a permutation, so the y gradient is an index-add:
    the pairs are stably sorted by their row (``torch.sort``, stable, on the
    device: the expert bucket sort is sized for E buckets, not for y's rows)
    and each row sums its pairs in ascending order.

    Returns:
        (grad_y [R, H] or absent, grad_weights [T, k] or absent).

    Example::

        >>> gy, gw = moe_unpermute_bwd(y, row_map, w, torch.ones(T, H), True, True)
    """
    T, k = row_map.shape
    R, H = y.shape
    dev = y.device
    acc = acc_type(ref.compute_dtype(y.dtype, weights.dtype))
    gy, gw = absent(y), absent(y)
    flat_map = row_map.reshape(-1).long()
    if need_y:
        gy = _new((R, H), y.dtype, dev)
        if R > 0 and H > 0:
            srt = torch.sort(flat_map, stable=True)
            starts = torch.searchsorted(srt.values, torch.arange(R + 1, device=dev))
            w_flat = weights.contiguous().view(-1)
            bh = col_block(H)
            br = row_block(bh, lo=1, hi=64)
            _segment_sum_kernel[(triton.cdiv(R, br), triton.cdiv(H, bh))](
                grad_out, w_flat, srt.indices, starts, gy,
                R, H, k,
                *grad_out.stride(), *gy.stride(),
                ACC=acc, BLOCK_R=br, BLOCK_H=bh, num_warps=num_warps(br, bh),
            )  # fmt: skip
    if need_weights:
        gw = _new((T, k), weights.dtype, dev)
        N = T * k
        if N > 0:
            bh = col_block(H)
            bp = row_block(bh, lo=1, hi=64)
            _row_dot_kernel[(triton.cdiv(N, bp),)](
                y, grad_out, flat_map, gw,
                N, H, k,
                *y.stride(), *grad_out.stride(), *gw.stride(),
                ACC=acc, BLOCK_P=bp, BLOCK_H=bh, num_warps=num_warps(bp, bh),
            )  # fmt: skip
    return gy, gw


# ---------------------------------------------------------------------------
# grouped expert GEMMs
# ---------------------------------------------------------------------------
@triton.jit
def _gate_up_kernel(
    x_ptr, wgu_ptr, h_ptr, slot_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr,
    H, I, k,
    x_stride_t, x_stride_h, w_stride_e, w_stride_n, w_stride_h, h_stride_r, h_stride_i,
    GELU: tl.constexpr,  # constexpr: the activation (SiLU -> SwiGLU, or the exact GELU)
    PADDED: tl.constexpr,  # constexpr: the tile's rows come from the padded layout (-1 = padding)
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,  # constexpr: "ieee" keeps fp32 inputs out of tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h[row, n] = act(x_t . G_e[n]) * (x_t . U_e[n]) for the rows of one expert tile, t = pair // k.

    The token rows are gathered inside the loads of x; gate (rows n of
    w_gate_up[e]) and up (rows I + n) share each loaded x tile.
    """
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    rows, valid, slot = _tile_rows(tile, tile_row_ptr, tile_end_ptr, slot_ptr, PADDED, BLOCK_M)
    tok = slot // k
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = cols < I
    w_e = wgu_ptr + e.to(tl.int64) * w_stride_e
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for h0 in range(0, H, BLOCK_K):
        kk = h0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mk = kk < H
        a = tl.load(
            x_ptr + tok[:, None] * x_stride_t + kk[None, :] * x_stride_h,
            mask=valid[:, None] & mk[None, :],
            other=0.0,
        )
        wm = mk[:, None] & mask_n[None, :]
        bg = tl.load(w_e + cols[None, :] * w_stride_n + kk[:, None] * w_stride_h, mask=wm, other=0.0)
        bu = tl.load(w_e + (cols + I)[None, :] * w_stride_n + kk[:, None] * w_stride_h, mask=wm, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
    a_g, _ = _act_and_grad(acc_g, GELU, ACC)
    tl.store(
        h_ptr + rows[:, None] * h_stride_r + cols[None, :] * h_stride_i,
        (a_g * acc_u).to(h_ptr.dtype.element_ty),
        mask=valid[:, None] & mask_n[None, :],
    )


@triton.jit
def _rows_gemm_kernel(
    a_ptr, b_ptr, w_ptr, out_ptr, slot_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr,
    K, NC,
    a_stride_r, a_stride_k, b_stride_e, b_stride_k, b_stride_n, out_stride_p, out_stride_n,
    HAS_W: tl.constexpr,  # constexpr: scale each row by its router weight w[pair] (the down GEMM)
    PADDED: tl.constexpr,  # constexpr: the tile's rows come from the padded layout (-1 = padding)
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,  # constexpr: "ieee" keeps fp32 inputs out of tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[pair, n] = (w[pair]) sum_c A[row, c] B_e[c, n] for the rows of one expert tile.

    Down GEMM: A = h, B_e = w_down[e]^T, scaled by the router weight.
    dX: A = the gate/up gradients, B_e = w_gate_up[e].  Rows are written in
    pair order (t*k + j), ready for the slot-ordered combine.
    """
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    rows, valid, slot = _tile_rows(tile, tile_row_ptr, tile_end_ptr, slot_ptr, PADDED, BLOCK_M)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = cols < NC
    b_e = b_ptr + e.to(tl.int64) * b_stride_e
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for c0 in range(0, K, BLOCK_K):
        cc = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mc = cc < K
        a = tl.load(
            a_ptr + rows[:, None] * a_stride_r + cc[None, :] * a_stride_k,
            mask=valid[:, None] & mc[None, :],
            other=0.0,
        )
        b = tl.load(
            b_e + cc[:, None] * b_stride_k + cols[None, :] * b_stride_n,
            mask=mc[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_W:
        acc = acc * tl.load(w_ptr + slot, mask=valid, other=0.0).to(ACC)[:, None]
    tl.store(
        out_ptr + slot[:, None] * out_stride_p + cols[None, :] * out_stride_n,
        acc.to(out_ptr.dtype.element_ty),
        mask=valid[:, None] & mask_n[None, :],
    )


@triton.jit
def _bwd_rows_kernel(
    x_ptr, go_ptr, wgu_ptr, wd_ptr, w_ptr, g_ptr, hb_ptr, part_ptr, slot_ptr,
    tile_expert_ptr, tile_row_ptr, tile_end_ptr,
    H, I, k, N,
    x_stride_t, x_stride_h, go_stride_t, go_stride_h,
    wgu_stride_e, wgu_stride_n, wgu_stride_h, wd_stride_e, wd_stride_h, wd_stride_i,
    g_stride_r, g_stride_c, hb_stride_r, hb_stride_i, part_stride_c,
    GELU: tl.constexpr,
    NEED_G: tl.constexpr,  # constexpr flags: write only what the requested gradients read
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    PADDED: tl.constexpr,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Per expert tile and column tile n of I, in one pass over H:

    gate = x_t G_e^T,  up = x_t U_e^T,  q = go_t D_e        (D_e = w_down[e], [H, I])
    h = act(gate) up,  gh = w q
    G = [gh up act'(gate), gh act(gate)]   (the gradient of [gate, up])
    part[n-tile, pair] = sum_n h q          (the router weight's gradient, one partial per column tile)
    """
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e < 0:
        return
    rows, valid, slot = _tile_rows(tile, tile_row_ptr, tile_end_ptr, slot_ptr, PADDED, BLOCK_M)
    tok = slot // k
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = cols < I
    e64 = e.to(tl.int64)
    wgu_e = wgu_ptr + e64 * wgu_stride_e
    wd_e = wd_ptr + e64 * wd_stride_e
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_q = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for h0 in range(0, H, BLOCK_K):
        kk = h0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mk = kk < H
        am = valid[:, None] & mk[None, :]
        a = tl.load(x_ptr + tok[:, None] * x_stride_t + kk[None, :] * x_stride_h, mask=am, other=0.0)
        go = tl.load(go_ptr + tok[:, None] * go_stride_t + kk[None, :] * go_stride_h, mask=am, other=0.0)
        wm = mk[:, None] & mask_n[None, :]
        bg = tl.load(wgu_e + cols[None, :] * wgu_stride_n + kk[:, None] * wgu_stride_h, mask=wm, other=0.0)
        bu = tl.load(
            wgu_e + (cols + I)[None, :] * wgu_stride_n + kk[:, None] * wgu_stride_h, mask=wm, other=0.0
        )
        d = tl.load(wd_e + kk[:, None] * wd_stride_h + cols[None, :] * wd_stride_i, mask=wm, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
        acc_q = tl.dot(go.to(d.dtype), d, acc_q, input_precision=DOT_PRECISION)
    a_g, da_g = _act_and_grad(acc_g, GELU, ACC)
    h = a_g * acc_u
    m = valid[:, None] & mask_n[None, :]
    if NEED_G:
        gh = acc_q * tl.load(w_ptr + slot, mask=valid, other=0.0).to(ACC)[:, None]
        g_row = g_ptr + rows[:, None] * g_stride_r
        tl.store(g_row + cols[None, :] * g_stride_c, (gh * acc_u * da_g).to(g_ptr.dtype.element_ty), mask=m)
        tl.store(g_row + (cols + I)[None, :] * g_stride_c, (gh * a_g).to(g_ptr.dtype.element_ty), mask=m)
    if NEED_H:
        tl.store(
            hb_ptr + rows[:, None] * hb_stride_r + cols[None, :] * hb_stride_i,
            h.to(hb_ptr.dtype.element_ty),
            mask=m,
        )
    if NEED_W:
        part = tl.sum(h * acc_q, axis=1)
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * part_stride_c + slot, part, mask=valid)


@triton.jit
def _expert_wgrad_kernel(
    a_ptr, b_ptr, w_ptr, out_ptr, slot_ptr, offsets_ptr, tile_off_ptr,
    M, NC, k,
    a_stride_r, a_stride_m, b_stride_r, b_stride_n, out_stride_e, out_stride_m, out_stride_n,
    A_BY_TOKEN: tl.constexpr,  # constexpr: row r of A is A[pair // k] (a token-order tensor), else A[r]
    B_BY_TOKEN: tl.constexpr,
    A_SCALE: tl.constexpr,  # constexpr: scale row r of A by the router weight w[pair]
    PADDED: tl.constexpr,  # constexpr: expert e's rows start at tile_off[e] * BLOCK_ROWS
    BLOCK_ROWS: tl.constexpr,  # the forward's M tile (the padding unit)
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[e, m, n] = sum over expert e's rows r, in order, of A[r, m] B[r, n]: one program per output tile.

    dW_gate_up[e] = G^T X (A = G, B = x by token); dW_down[e] = (w go)^T h
    (A = grad_out by token scaled by w, B = h).  The loop over the rows is the
    only reduction, so the result is the same on every run; an expert with
    no rows writes zeros.
    """
    e = tl.program_id(0).to(tl.int64)
    lo = tl.load(offsets_ptr + e)
    cnt = tl.load(offsets_ptr + e + 1) - lo
    if PADDED:
        lo = tl.load(tile_off_ptr + e) * BLOCK_ROWS
    hi = lo + cnt
    mm = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nn = (tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = mm < M
    mask_n = nn < NC
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for r0 in range(lo, hi, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        vr = rr < hi
        slot = tl.load(slot_ptr + rr, mask=vr, other=0)
        if A_BY_TOKEN:
            ra = slot // k
        else:
            ra = rr
        if B_BY_TOKEN:
            rb = slot // k
        else:
            rb = rr
        b = tl.load(
            b_ptr + rb[:, None] * b_stride_r + nn[None, :] * b_stride_n,
            mask=vr[:, None] & mask_n[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + ra[None, :] * a_stride_r + mm[:, None] * a_stride_m,
            mask=mask_m[:, None] & vr[None, :],
            other=0.0,
        )
        if A_SCALE:
            a = (a.to(ACC) * tl.load(w_ptr + slot, mask=vr, other=0.0).to(ACC)[None, :]).to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    tl.store(
        out_ptr + e * out_stride_e + mm[:, None] * out_stride_m + nn[None, :] * out_stride_n,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _caps(dtype: torch.dtype):
    """(BLOCK_N, BLOCK_K) caps of the row GEMMs: narrower tiles for wider types (registers, shared memory)."""
    if dtype == torch.float64:
        return 32, 32
    if dtype == torch.float32:
        return 64, 32
    return 64, 64


def _tile_args(s: _Schedule):
    return s.slot_of_row, s.tile_expert, s.tile_row, s.tile_end


@on_device
def fused_moe_fwd(x, w_gate_up, w_down, weights, ids, activation, *, padded=False, block_m=None):
    """Dropless top-k mixture of gated-MLP experts with grouped GEMMs; see the module docstring.

    ``out[t] = sum_j weights[t, j] * (act(x_t G_e^T) * (x_t U_e^T)) D_e^T``, e = ids[t, j].
    No host synchronisation: the schedule (sort, offsets, tiles) lives on the
    device and the grids are sized for the worst case, so the call can be
    captured in a CUDA graph (the ids check is skipped while capturing).

    Args:
        x: [T, H]; w_gate_up: [E, 2I, H] (gate rows first); w_down: [E, H, I] (x's dtype);
        weights: [T, k] (any float dtype); ids: [T, k] int32/int64 in [0, E).
        activation: ``"silu"`` or ``"gelu"``.
        padded: round each expert's rows up to the GEMM's M tile (vLLM's layout)
            instead of masking each expert's last tile.
        block_m: rows per GEMM tile (16, 32 or 64); None picks from the mean rows per expert.

    Returns:
        [T, H] in x's dtype.

    Example::

        >>> out = fused_moe_fwd(x, w_gate_up, w_down, w, ids, "silu")
    """
    E = w_gate_up.shape[0]
    if not _capturing():
        _check_ids("ids", ids, E)
    out_dtype = x.dtype
    x, w_gate_up, w_down = _widen(x, w_gate_up, w_down, weights)
    T, H = x.shape
    I = w_gate_up.shape[1] // 2
    k = ids.shape[1]
    N = T * k
    dev = x.device
    out = _new((T, H), x.dtype, dev)
    if T == 0 or H == 0:
        return out.to(out_dtype)
    if N == 0:
        return out.zero_().to(out_dtype)
    acc, prec = acc_type(x.dtype), _precision(x.dtype)
    bm = block_m or _block_m(N, E, x.dtype)
    s = _expert_sort(ids, E, block_m=bm, padded=padded)
    cap_n, cap_k = _caps(x.dtype)
    w_flat = weights.contiguous().view(-1)

    h = _new((s.rows, I), x.dtype, dev)
    bn, bk = _dot_block(I, cap_n), _dot_block(H, cap_k)
    grid = (s.max_tiles, triton.cdiv(I, bn))
    if _launchable(grid):
        _gate_up_kernel[grid](
            x, w_gate_up, h, *_tile_args(s),
            H, I, k,
            *x.stride(), *w_gate_up.stride(), *h.stride(),
            GELU=activation == "gelu", PADDED=padded, ACC=acc, DOT_PRECISION=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
        )  # fmt: skip
    y = _new((N, H), x.dtype, dev)
    bn, bk = _dot_block(H, cap_n), _dot_block(I, cap_k)
    grid = (s.max_tiles, triton.cdiv(H, bn))
    if _launchable(grid):
        _rows_gemm_kernel[grid](
            h, w_down, w_flat, y, *_tile_args(s),
            I, H,
            *h.stride(), w_down.stride(0), w_down.stride(2), w_down.stride(1), *y.stride(),
            HAS_W=True, PADDED=padded, ACC=acc, DOT_PRECISION=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
        )  # fmt: skip
    return _combine(y, None, None, out, T, k, acc).to(out_dtype)


@on_device
def fused_moe_bwd(
    x, w_gate_up, w_down, weights, ids, grad_out, activation, need_x, need_w_gate_up, need_w_down, need_weights,
    *, padded=False, block_m=None,
):  # fmt: skip
    """Gradients of :func:`fused_moe_fwd`: dX, dW_gate_up, dW_down and the router weights'.

    Deterministic: every output element has one writer and a fixed summation
    order (per-expert weight-gradient GEMMs that loop over the expert's rows,
    slot-ordered combines, fixed-shape partial sums); no float atomics.

    Args:
        as :func:`fused_moe_fwd`; grad_out: [T, H]; need_*: which gradients to compute.

    Returns:
        (grad_x, grad_w_gate_up, grad_w_down, grad_weights), each in its input's
        dtype and shape, or an empty placeholder when not asked for.

    Example::

        >>> gx, gwgu, gwd, gw = fused_moe_bwd(x, wgu, wd, w, ids, g, "silu", True, True, True, True)
    """
    need_x, need_w_gate_up, need_w_down, need_weights = (
        bool(v) for v in (need_x, need_w_gate_up, need_w_down, need_weights)
    )
    x0 = x  # the placeholders have the caller's dtype, as the reference's
    dtypes = (x.dtype, w_gate_up.dtype, w_down.dtype)
    x, w_gate_up, w_down = _widen(x, w_gate_up, w_down, weights)
    grad_out = grad_out.to(x.dtype)
    T, H = x.shape
    E, two_i = w_gate_up.shape[:2]
    I = two_i // 2
    k = ids.shape[1]
    N = T * k
    dev = x.device
    acc, prec = acc_type(x.dtype), _precision(x.dtype)
    gx = _new((T, H), x.dtype, dev) if need_x else absent(x0)
    gwgu = _new(w_gate_up.shape, x.dtype, dev) if need_w_gate_up else absent(x0)
    gwd = _new(w_down.shape, x.dtype, dev) if need_w_down else absent(x0)
    gw = _new((T, k), weights.dtype, dev) if need_weights else absent(x0)
    casts = lambda: (
        gx.to(dtypes[0]) if need_x else gx,
        gwgu.to(dtypes[1]) if need_w_gate_up else gwgu,
        gwd.to(dtypes[2]) if need_w_down else gwd,
        gw,
    )
    if not (need_x or need_w_gate_up or need_w_down or need_weights):
        return casts()
    if N == 0:
        for g, need in ((gx, need_x), (gwgu, need_w_gate_up), (gwd, need_w_down), (gw, need_weights)):
            if need:
                g.zero_()
        return casts()

    bm = block_m or _block_m(N, E, x.dtype)
    s = _expert_sort(ids, E, block_m=bm, padded=padded)
    w_flat = weights.contiguous().view(-1)
    need_g = need_x or need_w_gate_up
    G = _new((s.rows, two_i) if need_g else (0, 0), x.dtype, dev)
    hb = _new((s.rows, I) if need_w_down else (0, 0), x.dtype, dev)
    bn = _dot_block(I, 32)
    bk = _dot_block(H, 32)
    n_col = triton.cdiv(I, bn)
    part = _new((n_col, N) if need_weights else (0, 0), acc_dtype(x.dtype), dev)
    grid = (s.max_tiles, n_col)
    if _launchable(grid):
        # a buffer not asked for is a [0, 0] tensor: hand the kernel a real one its flags keep unread
        real = lambda t: t if t.numel() else x
        _bwd_rows_kernel[grid](
            x, grad_out, w_gate_up, w_down, w_flat, real(G), real(hb), real(part), *_tile_args(s),
            H, I, k, N,
            *x.stride(), *grad_out.stride(), *w_gate_up.stride(), *w_down.stride(),
            G.stride(0), G.stride(1), hb.stride(0), hb.stride(1), part.stride(0),
            GELU=activation == "gelu", NEED_G=need_g, NEED_H=need_w_down, NEED_W=need_weights,
            PADDED=padded, ACC=acc, DOT_PRECISION=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=2,
        )  # fmt: skip
    if need_weights:
        # the column tiles' partials, summed over a fixed axis
        gw.copy_(part.sum(0).view(T, k) if n_col > 0 else torch.zeros((T, k), device=dev))
    cap_n, cap_k = _caps(x.dtype)
    if need_x:
        dxs = _new((N, H), x.dtype, dev)
        bn2, bk2 = _dot_block(H, cap_n), _dot_block(two_i, cap_k)
        grid = (s.max_tiles, triton.cdiv(H, bn2))
        if _launchable(grid):
            _rows_gemm_kernel[grid](
                G, w_gate_up, w_flat, dxs, *_tile_args(s),
                two_i, H,
                G.stride(0), G.stride(1), *w_gate_up.stride(), *dxs.stride(),
                HAS_W=False, PADDED=padded, ACC=acc, DOT_PRECISION=prec,
                BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=bk2, num_warps=4,
            )  # fmt: skip
        _combine(dxs, None, None, gx, T, k, acc)
    wm, wn, wk = (32, 32, 16) if x.dtype == torch.float64 else (64, 64, 32)
    common = dict(PADDED=padded, BLOCK_ROWS=bm, ACC=acc, DOT_PRECISION=prec, BLOCK_K=wk, num_warps=4)
    if need_w_gate_up:
        bm_, bn_ = _dot_block(two_i, wm), _dot_block(H, wn)
        grid = (E, triton.cdiv(two_i, bm_), triton.cdiv(H, bn_))
        if _launchable(grid):
            _expert_wgrad_kernel[grid](
                G, x, w_flat, gwgu, s.slot_of_row, s.offsets, s.tile_off,
                two_i, H, k,
                G.stride(0), G.stride(1), *x.stride(), *gwgu.stride(),
                A_BY_TOKEN=False, B_BY_TOKEN=True, A_SCALE=False, BLOCK_M=bm_, BLOCK_N=bn_, **common,
            )  # fmt: skip
    if need_w_down:
        bm_, bn_ = _dot_block(H, wm), _dot_block(I, wn)
        grid = (E, triton.cdiv(H, bm_), triton.cdiv(I, bn_))
        if _launchable(grid):
            _expert_wgrad_kernel[grid](
                grad_out, hb, w_flat, gwd, s.slot_of_row, s.offsets, s.tile_off,
                H, I, k,
                *grad_out.stride(), hb.stride(0), hb.stride(1), *gwd.stride(),
                A_BY_TOKEN=True, B_BY_TOKEN=False, A_SCALE=True, BLOCK_M=bm_, BLOCK_N=bn_, **common,
            )  # fmt: skip
    return casts()

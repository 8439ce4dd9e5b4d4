"""Triton kernels for sparse message passing (the GNN family).

Every kernel is row-parallel over a CSR matrix, after GE-SpMM (Huang et al.,
"GE-SpMM: General-purpose Sparse Matrix-Matrix Multiplication on GPUs for
Graph Neural Networks", SC 2020): one program owns one destination row ``i``
(and one tile of features), walks the row's edges ``rowptr[i]:rowptr[i+1]``
``BLOCK_E`` at a time so that many gathers of ``x[col[k]]`` are in flight,
and writes its output row once.  Backward passes that scatter to sources walk
the transpose (``csc_ptr``, ``csc_row``, ``csc_perm``) instead, so every output
element again has exactly one writer: no atomics, deterministic results.

Layout (see :mod:`frontiers_fast.graph` and :mod:`frontiers_fast.ops.gnn`,
whose module docstring is the contract for the launchers below):
``rowptr`` [N_dst+1], ``col`` [E] (source of CSR edge k), ``csc_ptr``
[N_src+1], ``csc_row`` [E] (destination of transposed edge t), ``csc_perm``
[E] (CSR position of transposed edge t); all int64.  Edge tensors are in CSR
order.

Arithmetic is float32 for fp16/bf16/fp32 inputs and float64 for float64
inputs (the ``ACC`` constexpr); outputs have the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from frontiers_fast import _reduce

from ._utils import acc_dtype, acc_type, col_block, num_warps, on_device, row_block

# Reduce codes (frontiers_fast._reduce), as constants the kernels can read.
R_SUM = tl.constexpr(_reduce.SUM)
R_MEAN = tl.constexpr(_reduce.MEAN)
R_MAX = tl.constexpr(_reduce.MAX)
R_MIN = tl.constexpr(_reduce.MIN)


def _heads_of(weight, F: int) -> int:
    hw = 1 if weight is None else weight.shape[1]
    if F % hw != 0:
        raise ValueError(f"F={F} is not a multiple of the weight's {hw} heads")
    return hw


# ---------------------------------------------------------------------------
# SpMM: out[i, f] = reduce_{k in row i} w[wrow(k), f // FH] * x[col[k], f]
# ---------------------------------------------------------------------------
@triton.jit
def _spmm_fwd_kernel(
    rowptr_ptr,
    col_ptr,
    weight_ptr,
    widx_ptr,
    x_ptr,
    out_ptr,
    arg_ptr,
    F,
    FH,
    weight_stride_e,
    x_stride_n,
    out_stride_n,
    arg_stride_n,
    HAS_WEIGHT: tl.constexpr,  # constexpr: the unweighted kernel must not load a weight at all
    HAS_WIDX: tl.constexpr,  # constexpr: weights in the user's edge order, read through widx
    REDUCE: tl.constexpr,  # constexpr: a code of frontiers_fast._reduce; unused branches compile away
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Row-parallel CSR SpMM (GE-SpMM, Huang et al. 2020).

    Program (i, t) owns out[i, t*BLOCK_F : (t+1)*BLOCK_F].  With
    m_k = w[wrow(k), f // FH] * x[col[k], f] for the edges k of row i
    (wrow(k) = widx[k], or k):

      sum:  out[i, f] = sum_k m_k          mean: the sum over deg(i) = |row i|
      max:  out[i, f] = max_k m_k,  arg[i, f] = min{k : m_k = out[i, f]}
      min:  as max on -m_k (negation is exact, so ties are kept)

    A NaN message is the extremum (out NaN, arg its first edge), as in
    torch.amax.  An empty row gives out = 0 and, for max/min, arg = -1.  Edge
    blocks are visited in increasing k and a block only replaces the running
    extremum when strictly better, so ties resolve to the first edge.
    """
    row = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    if HAS_WEIGHT:
        head_f = offs_f // FH

    if REDUCE == R_SUM or REDUCE == R_MEAN:
        acc = tl.full([BLOCK_F], 0.0, dtype=ACC)
    else:
        best = tl.full([BLOCK_F], float("-inf"), dtype=ACC)
        arg = tl.full([BLOCK_F], -1, dtype=tl.int64)

    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        mask = mask_e[:, None] & mask_f[None, :]
        src = tl.load(col_ptr + offs_e, mask=mask_e, other=0)
        msg = tl.load(x_ptr + src[:, None] * x_stride_n + offs_f[None, :], mask=mask, other=0.0).to(ACC)
        if HAS_WEIGHT:
            if HAS_WIDX:
                wrow = tl.load(widx_ptr + offs_e, mask=mask_e, other=0)
            else:
                wrow = offs_e
            w = tl.load(weight_ptr + wrow[:, None] * weight_stride_e + head_f[None, :], mask=mask, other=0.0)
            msg = msg * w.to(ACC)
        if REDUCE == R_SUM or REDUCE == R_MEAN:
            acc += tl.sum(msg, axis=0)
        else:
            if REDUCE == R_MIN:
                msg = -msg
            nan = msg != msg
            msg = tl.where(mask & ~nan, msg, float("-inf"))
            block_best = tl.max(msg, axis=0)
            hit = mask & ~nan & (msg == block_best[None, :])
            block_arg = tl.min(tl.where(hit, offs_e[:, None], end), axis=0)
            # The block's first NaN, if any, is its extremum.
            nan_arg = tl.min(tl.where(mask & nan, offs_e[:, None], end), axis=0)
            block_nan = nan_arg < end
            block_best = tl.where(block_nan, float("nan"), block_best)
            block_arg = tl.where(block_nan, nan_arg, block_arg)
            # Nothing replaces a NaN; the (arg < 0) term admits a first value of -inf.
            better = (best == best) & (block_nan | (block_best > best) | ((arg < 0) & (block_arg < end)))
            best = tl.where(better, block_best, best)
            arg = tl.where(better, block_arg, arg)

    if REDUCE == R_SUM or REDUCE == R_MEAN:
        if REDUCE == R_MEAN:
            acc = acc / tl.maximum(end - start, 1).to(ACC)
        res = acc
    else:
        if REDUCE == R_MIN:
            best = -best
        res = tl.where(arg >= 0, best, 0.0)
        tl.store(arg_ptr + row * arg_stride_n + offs_f, arg, mask=mask_f)
    tl.store(out_ptr + row * out_stride_n + offs_f, res.to(out_ptr.dtype.element_ty), mask=mask_f)


@triton.jit
def _spmm_bwd_x_kernel(
    csc_ptr_ptr,
    csc_row_ptr,
    csc_perm_ptr,
    csc_widx_ptr,
    rowptr_ptr,
    weight_ptr,
    grad_out_ptr,
    arg_ptr,
    grad_x_ptr,
    F,
    FH,
    weight_stride_e,
    grad_out_stride_n,
    arg_stride_n,
    grad_x_stride_n,
    HAS_WEIGHT: tl.constexpr,  # constexpr: the unweighted kernel must not load a weight at all
    REDUCE: tl.constexpr,  # constexpr: a code of frontiers_fast._reduce; unused branches compile away
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Gradient of SpMM with respect to x, one program per source row j.

    Walks the transpose of the CSR: for transposed edge t, i = csc_row[t],
    k = csc_perm[t] (its CSR position) and r = csc_widx[t] (its weight row),

      sum:      grad_x[j, f] = sum_t w[r, f // FH] * g[i, f]
      mean:     g[i, f] is divided by deg(i)
      max/min:  only edges with arg[i, f] == k contribute.

    Each grad_x row is written by one program, so no atomics are needed.
    """
    j = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    start = tl.load(csc_ptr_ptr + j)
    end = tl.load(csc_ptr_ptr + j + 1)
    if HAS_WEIGHT:
        head_f = offs_f // FH
    acc = tl.full([BLOCK_F], 0.0, dtype=ACC)
    for t0 in range(start, end, BLOCK_E):
        offs_t = t0 + tl.arange(0, BLOCK_E)
        mask_t = offs_t < end
        mask = mask_t[:, None] & mask_f[None, :]
        dst = tl.load(csc_row_ptr + offs_t, mask=mask_t, other=0)
        g = tl.load(grad_out_ptr + dst[:, None] * grad_out_stride_n + offs_f[None, :], mask=mask, other=0.0)
        g = g.to(ACC)
        if HAS_WEIGHT:
            r = tl.load(csc_widx_ptr + offs_t, mask=mask_t, other=0)
            w = tl.load(weight_ptr + r[:, None] * weight_stride_e + head_f[None, :], mask=mask, other=0.0)
            g = g * w.to(ACC)
        if REDUCE == R_MEAN:
            deg = tl.load(rowptr_ptr + dst + 1, mask=mask_t, other=1) - tl.load(
                rowptr_ptr + dst, mask=mask_t, other=0
            )
            g = g / deg.to(ACC)[:, None]
        if REDUCE == R_MAX or REDUCE == R_MIN:
            k = tl.load(csc_perm_ptr + offs_t, mask=mask_t, other=0)
            chosen = tl.load(arg_ptr + dst[:, None] * arg_stride_n + offs_f[None, :], mask=mask, other=-1)
            g = tl.where(chosen == k[:, None], g, 0.0)
        acc += tl.sum(g, axis=0)
    tl.store(grad_x_ptr + j * grad_x_stride_n + offs_f, acc.to(grad_x_ptr.dtype.element_ty), mask=mask_f)


@triton.jit
def _spmm_bwd_w_kernel(
    rowptr_ptr,
    col_ptr,
    widx_ptr,
    x_ptr,
    grad_out_ptr,
    arg_ptr,
    grad_w_ptr,
    FH,
    x_stride_n,
    grad_out_stride_n,
    arg_stride_n,
    grad_w_stride_e,
    HAS_WIDX: tl.constexpr,  # constexpr: the weights (and so their gradient) are in the user's edge order
    REDUCE: tl.constexpr,  # constexpr: a code of frontiers_fast._reduce; unused branches compile away
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Gradient of SpMM with respect to the edge weight, one program per (row i, head h).

      grad_w[wrow(k), h] = sum_{f in head h} g[i, f] * x[col[k], f]     (f = h*FH + c)

    with g[i] divided by deg(i) for mean and, for max/min, only the features
    whose arg[i, f] == k.  The head's FH features are reduced BLOCK_C at a
    time; every edge of the row is written once (wrow is a permutation).
    """
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    scale = 1.0
    if REDUCE == R_MEAN:
        scale = 1.0 / tl.maximum(end - start, 1).to(ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        src = tl.load(col_ptr + offs_e, mask=mask_e, other=0)
        acc = tl.full([BLOCK_E], 0.0, dtype=ACC)
        for c0 in range(0, FH, BLOCK_C):
            offs_f = head * FH + c0 + tl.arange(0, BLOCK_C)
            mask_c = (c0 + tl.arange(0, BLOCK_C)) < FH
            mask = mask_e[:, None] & mask_c[None, :]
            g = tl.load(grad_out_ptr + row * grad_out_stride_n + offs_f, mask=mask_c, other=0.0).to(ACC)
            xv = tl.load(x_ptr + src[:, None] * x_stride_n + offs_f[None, :], mask=mask, other=0.0).to(ACC)
            prod = xv * g[None, :]
            if REDUCE == R_MAX or REDUCE == R_MIN:
                chosen = tl.load(arg_ptr + row * arg_stride_n + offs_f, mask=mask_c, other=-1)
                prod = tl.where(chosen[None, :] == offs_e[:, None], prod, 0.0)
            acc += tl.sum(prod, axis=1)
        acc = acc * scale
        if HAS_WIDX:
            wrow = tl.load(widx_ptr + offs_e, mask=mask_e, other=0)
        else:
            wrow = offs_e
        tl.store(grad_w_ptr + wrow * grad_w_stride_e + head, acc.to(grad_w_ptr.dtype.element_ty), mask=mask_e)


@on_device
def spmm_fwd(rowptr, col, weight, weight_index, x, reduce):
    """CSR SpMM: ``out[i] = reduce_{k in row i} weight[wrow(k)] * x[col[k]]``.

    Args:
        rowptr: [N_dst+1] int64; col: [E] int64 (CSR order).
        weight: None or [E, Hw] with F % Hw == 0 (feature f uses column f // (F // Hw)).
        weight_index: None (weight is in CSR order: wrow(k) = k) or [E] int64,
            a permutation: wrow(k) = weight_index[k] (the graph's ``perm``
            for weights in the user's edge order).
        x: [N_src, F].
        reduce: a code of :mod:`frontiers_fast._reduce` (sum, mean, max, min).

    Returns:
        out [N_dst, F] (dtype of x) and arg [N_dst, F] int64 (first arg-extremum
        CSR position, -1 for an empty row) for max/min, else an empty [0] int64.

    Example::

        >>> out, _ = spmm_fwd(g.rowptr, g.col, None, None, torch.randn(g.num_src, 16, device="cuda"), 0)
    """
    x = x.contiguous()
    n_dst, F, E = rowptr.shape[0] - 1, x.shape[1], col.shape[0]
    hw = _heads_of(weight, F)
    out = torch.empty((n_dst, F), dtype=x.dtype, device=x.device)
    extremum = reduce in (_reduce.MAX, _reduce.MIN)
    arg = torch.empty((n_dst, F) if extremum else (0,), dtype=torch.int64, device=x.device)
    if n_dst == 0 or F == 0:
        return out, arg
    if E == 0:
        out.zero_()
        arg.fill_(-1)
        return out, arg
    rowptr, col = rowptr.contiguous(), col.contiguous()
    w = weight.contiguous() if weight is not None else x
    widx = weight_index.contiguous() if (weight is not None and weight_index is not None) else col
    bf = col_block(F)
    be = row_block(bf)
    _spmm_fwd_kernel[(n_dst, triton.cdiv(F, bf))](
        rowptr, col, w, widx, x, out, arg if extremum else out,
        F, F // hw,
        w.stride(0), x.stride(0), out.stride(0), arg.stride(0) if extremum else 0,
        HAS_WEIGHT=weight is not None, HAS_WIDX=weight is not None and weight_index is not None,
        REDUCE=reduce, ACC=acc_type(x.dtype), BLOCK_E=be, BLOCK_F=bf, num_warps=num_warps(be, bf),
    )  # fmt: skip
    return out, arg


@on_device
def spmm_bwd(
    csc_ptr, csc_row, csc_perm, rowptr, col, weight, weight_index, csc_weight_index, x, grad_out, arg, reduce,
    need_x, need_w,
):  # fmt: skip
    """Gradients of :func:`spmm_fwd`, with no atomics.

    Args:
        csc_ptr: [N_src+1]; csc_row, csc_perm: [E] (the transpose of the CSR).
        rowptr, col, weight, weight_index, reduce: as in :func:`spmm_fwd`.
        csc_weight_index: None (the weight row of transposed edge t is
            csc_perm[t], right for CSR-ordered weights) or [E] int64: that row
            (the graph's ``csc_eid`` for weights in the user's edge order).
        x: [N_src, F] (may be [0, F] when ``need_w`` is false).
        grad_out: [N_dst, F]; arg: from :func:`spmm_fwd`.

    Returns:
        grad_x [N_src, F] if ``need_x`` else an empty [0]; grad_w [E, Hw] (in
        the weight's order) if ``need_w`` and ``weight`` is given, else an empty [0].

    Example::

        >>> gx, gw = spmm_bwd(*g.csc, g.rowptr, g.col, w, g.perm, g.csc_eid, x, go, arg, 2, True, True)
    """
    F = grad_out.shape[1]
    n_src, E = csc_ptr.shape[0] - 1, col.shape[0]
    hw = _heads_of(weight, F)
    need_w = bool(need_w) and weight is not None
    # grad_out, not x, gives the dtype: x may be a [0, F] placeholder
    dev, dtype = grad_out.device, grad_out.dtype
    grad_out = grad_out.contiguous()
    rowptr = rowptr.contiguous()
    acc_t = acc_type(dtype)
    extremum = reduce in (_reduce.MAX, _reduce.MIN)
    if extremum:
        arg = arg.contiguous()
    w = weight.contiguous() if weight is not None else grad_out
    a = arg if extremum else grad_out

    grad_x = torch.empty((n_src, F) if need_x else (0,), dtype=dtype, device=dev)
    if need_x and n_src > 0 and F > 0:
        if E == 0:
            grad_x.zero_()
        else:
            bf = col_block(F)
            be = row_block(bf)
            csc_perm = csc_perm.contiguous()
            cw = csc_weight_index.contiguous() if csc_weight_index is not None else csc_perm
            _spmm_bwd_x_kernel[(n_src, triton.cdiv(F, bf))](
                csc_ptr.contiguous(), csc_row.contiguous(), csc_perm, cw, rowptr, w, grad_out, a, grad_x,
                F, F // hw,
                w.stride(0), grad_out.stride(0), a.stride(0) if extremum else 0, grad_x.stride(0),
                HAS_WEIGHT=weight is not None, REDUCE=reduce, ACC=acc_t,
                BLOCK_E=be, BLOCK_F=bf, num_warps=num_warps(be, bf),
            )  # fmt: skip

    grad_w = torch.empty((E, hw) if need_w else (0,), dtype=weight.dtype if need_w else dtype, device=dev)
    if need_w and E > 0:
        if F == 0:
            grad_w.zero_()
        else:
            x = x.contiguous()
            fh = F // hw
            bc = col_block(fh)
            be = row_block(bc)
            col = col.contiguous()
            widx = weight_index.contiguous() if weight_index is not None else col
            _spmm_bwd_w_kernel[(rowptr.shape[0] - 1, hw)](
                rowptr, col, widx, x, grad_out, a, grad_w,
                fh,
                x.stride(0), grad_out.stride(0), a.stride(0) if extremum else 0, grad_w.stride(0),
                HAS_WIDX=weight_index is not None, REDUCE=reduce, ACC=acc_t,
                BLOCK_E=be, BLOCK_C=bc, num_warps=num_warps(be, bc),
            )  # fmt: skip
    return grad_x, grad_w


# ---------------------------------------------------------------------------
# SDDMM: out[k, h] = <a[col[k], h, :], b[i, h, :]>
# ---------------------------------------------------------------------------
@triton.jit
def _sddmm_fwd_kernel(
    rowptr_ptr,
    col_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    C,
    a_stride_n,
    a_stride_h,
    b_stride_n,
    b_stride_h,
    out_stride_e,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sampled dense-dense product on the CSR pattern, one program per (row i, head h).

      out[k, h] = sum_c a[col[k], h, c] * b[i, h, c]     for k in row i

    b[i, h] is read once per edge block and stays in cache; the a rows are
    gathered BLOCK_E at a time.
    """
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        src = tl.load(col_ptr + offs_e, mask=mask_e, other=0)
        acc = tl.full([BLOCK_E], 0.0, dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            bv = tl.load(b_ptr + row * b_stride_n + head * b_stride_h + offs_c, mask=mask_c, other=0.0)
            av = tl.load(
                a_ptr + src[:, None] * a_stride_n + head * a_stride_h + offs_c[None, :],
                mask=mask_e[:, None] & mask_c[None, :],
                other=0.0,
            ).to(ACC)
            acc += tl.sum(av * bv.to(ACC)[None, :], axis=1)
        tl.store(out_ptr + offs_e * out_stride_e + head, acc.to(out_ptr.dtype.element_ty), mask=mask_e)


@on_device
def sddmm_fwd(rowptr, col, a, b):
    """Per-edge dot product in CSR order.

    Args:
        rowptr: [N_dst+1]; col: [E]; a: [N_src, H, C]; b: [N_dst, H, C].

    Returns:
        out [E, H] in CSR order, dtype of a.

    Example::

        >>> s = sddmm_fwd(g.rowptr, g.col, torch.randn(n, 4, 16), torch.randn(n, 4, 16))
    """
    a, b = a.contiguous(), b.contiguous()
    E, H, C = col.shape[0], a.shape[1], a.shape[2]
    n_dst = rowptr.shape[0] - 1
    out = torch.empty((E, H), dtype=a.dtype, device=a.device)
    if E == 0 or H == 0:
        return out
    if C == 0:
        return out.zero_()
    bc = col_block(C)
    be = row_block(bc)
    _sddmm_fwd_kernel[(n_dst, H)](
        rowptr.contiguous(), col.contiguous(), a, b, out,
        C,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        ACC=acc_type(a.dtype), BLOCK_E=be, BLOCK_C=bc, num_warps=num_warps(be, bc),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# edge softmax over each row of the CSR
# ---------------------------------------------------------------------------
@triton.jit
def _edge_softmax_fwd_kernel(
    rowptr_ptr,
    scores_ptr,
    p_ptr,
    H,
    scores_stride_e,
    p_stride_e,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Softmax over the edges of row i, per head, one program per (row, head tile).

      p[k, h] = exp(s[k, h] - m[h]) / sum_{k' in row i} exp(s[k', h] - m[h]),
      m[h] = max_{k in row i} s[k, h].

    The first pass keeps the running max and the rescaled running sum (online
    softmax, Milakov & Gimelshein 2018), the second writes p.
    """
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    m = tl.full([BLOCK_H], float("-inf"), dtype=ACC)
    l = tl.full([BLOCK_H], 0.0, dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        # padded heads read 0 (not -inf) so that m stays finite there
        s = tl.load(
            scores_ptr + offs_e[:, None] * scores_stride_e + offs_h[None, :],
            mask=mask_e[:, None] & mask_h[None, :],
            other=0.0,
        ).to(ACC)
        s = tl.where(mask_e[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[None, :]), axis=0)
        m = m_new
    # l >= 1 in a non-empty row (its max contributes exp(0)); the clamp only
    # keeps empty rows, which store nothing, away from 1/0
    inv_l = 1.0 / tl.maximum(l, 1.0)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask = (offs_e < end)[:, None] & mask_h[None, :]
        s = tl.load(scores_ptr + offs_e[:, None] * scores_stride_e + offs_h[None, :], mask=mask, other=0.0)
        p = tl.exp(s.to(ACC) - m[None, :]) * inv_l[None, :]
        tl.store(
            p_ptr + offs_e[:, None] * p_stride_e + offs_h[None, :], p.to(p_ptr.dtype.element_ty), mask=mask
        )


@triton.jit
def _edge_softmax_bwd_kernel(
    rowptr_ptr,
    p_ptr,
    grad_p_ptr,
    grad_s_ptr,
    H,
    p_stride_e,
    grad_p_stride_e,
    grad_s_stride_e,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Softmax backward over the edges of row i, one program per (row, head tile).

    grad_s[k, h] = p[k, h] * (g[k, h] - sum_{k' in row i} p[k', h] g[k', h])
    """
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    dot = tl.full([BLOCK_H], 0.0, dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask = (offs_e < end)[:, None] & mask_h[None, :]
        p = tl.load(p_ptr + offs_e[:, None] * p_stride_e + offs_h[None, :], mask=mask, other=0.0).to(ACC)
        g = tl.load(grad_p_ptr + offs_e[:, None] * grad_p_stride_e + offs_h[None, :], mask=mask, other=0.0)
        dot += tl.sum(p * g.to(ACC), axis=0)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask = (offs_e < end)[:, None] & mask_h[None, :]
        p = tl.load(p_ptr + offs_e[:, None] * p_stride_e + offs_h[None, :], mask=mask, other=0.0).to(ACC)
        g = tl.load(grad_p_ptr + offs_e[:, None] * grad_p_stride_e + offs_h[None, :], mask=mask, other=0.0)
        gs = p * (g.to(ACC) - dot[None, :])
        tl.store(
            grad_s_ptr + offs_e[:, None] * grad_s_stride_e + offs_h[None, :],
            gs.to(grad_s_ptr.dtype.element_ty),
            mask=mask,
        )


def _edge_softmax_launch(kernel, rowptr, tensors, out):
    E, H = out.shape
    n_dst = rowptr.shape[0] - 1
    if E == 0 or H == 0:
        return out
    bh = min(triton.next_power_of_2(H), 64)
    be = row_block(bh)
    strides = [t.stride(0) for t in (*tensors, out)]
    kernel[(n_dst, triton.cdiv(H, bh))](
        rowptr.contiguous(), *tensors, out, H, *strides,
        ACC=acc_type(out.dtype), BLOCK_E=be, BLOCK_H=bh, num_warps=num_warps(be, bh),
    )  # fmt: skip
    return out


@on_device
def edge_softmax_fwd(rowptr, scores):
    """Softmax of ``scores`` [E, H] (CSR order) over each row's edges.

    Example::

        >>> p = edge_softmax_fwd(g.rowptr, torch.randn(g.num_edges, 4, device="cuda"))
    """
    scores = scores.contiguous()
    out = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    return _edge_softmax_launch(_edge_softmax_fwd_kernel, rowptr, (scores,), out)


@on_device
def edge_softmax_bwd(rowptr, p, grad_p):
    """Backward of :func:`edge_softmax_fwd`: ``p * (grad_p - rowsum(p * grad_p))``, [E, H].

    Example::

        >>> gs = edge_softmax_bwd(g.rowptr, p, torch.randn_like(p))
    """
    p, grad_p = p.contiguous(), grad_p.contiguous()
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    return _edge_softmax_launch(_edge_softmax_bwd_kernel, rowptr, (p, grad_p), out)


def _split_slope(negative_slope):
    """Split the slope into two float32 scalars whose sum is the float64 slope to 2**-48.

    Triton passes a Python float as float32, which would cost float64 inputs
    ~1e-8 relative error on the negative side of the LeakyReLU; float32
    kernels simply get ``hi``.
    """
    slope = float(negative_slope)
    hi = float(torch.tensor(slope, dtype=torch.float32))
    return hi, slope - hi


# ---------------------------------------------------------------------------
# GAT: fused LeakyReLU + edge softmax + aggregation
# ---------------------------------------------------------------------------
@triton.jit
def _gat_fwd_kernel(
    rowptr_ptr,
    col_ptr,
    h_ptr,
    a_src_ptr,
    a_dst_ptr,
    out_ptr,
    lse_ptr,
    slope_hi,
    slope_lo,
    C,
    h_stride_n,
    h_stride_h,
    a_src_stride_n,
    a_dst_stride_n,
    out_stride_n,
    out_stride_h,
    lse_stride_n,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """GAT attention (Velickovic et al. 2018) in one pass, one program per (row i, head h, channel tile).

      e_k = LeakyReLU(a_src[col[k], h] + a_dst[i, h])
      out[i, h, c] = sum_k softmax_k(e)_k h[col[k], h, c]
      lse[i, h] = log sum_k exp(e_k)       (-inf and out = 0 for an empty row)

    Online softmax (Milakov & Gimelshein 2018; Dao et al., FlashAttention
    2022): a running max m, a running sum l and an accumulator rescaled by
    exp(m_old - m_new) each block, so no [E, H, C] (nor even [E, H]) tensor is
    materialised.  Channel tiles recompute the cheap scalar softmax.
    """
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ctile = tl.program_id(2)
    offs_c = ctile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    a_i = tl.load(a_dst_ptr + row * a_dst_stride_n + head).to(ACC)
    negative_slope = (tl.full([], 0.0, dtype=ACC) + slope_hi) + slope_lo  # summed in ACC
    m = tl.full([], float("-inf"), dtype=ACC)
    l = tl.full([], 0.0, dtype=ACC)
    acc = tl.full([BLOCK_C], 0.0, dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        src = tl.load(col_ptr + offs_e, mask=mask_e, other=0)
        s = tl.load(a_src_ptr + src * a_src_stride_n + head, mask=mask_e, other=0.0).to(ACC) + a_i
        e = tl.where(s > 0, s, s * negative_slope)
        e = tl.where(mask_e, e, float("-inf"))
        m_new = tl.maximum(m, tl.max(e, axis=0))
        rescale = tl.exp(m - m_new)
        p = tl.exp(e - m_new)
        l = l * rescale + tl.sum(p, axis=0)
        hv = tl.load(
            h_ptr + src[:, None] * h_stride_n + head * h_stride_h + offs_c[None, :],
            mask=mask_e[:, None] & mask_c[None, :],
            other=0.0,
        ).to(ACC)
        acc = acc * rescale + tl.sum(p[:, None] * hv, axis=0)
        m = m_new
    # l >= 1 in a non-empty row (its max contributes exp(0)); l == 0 in an empty one
    res = tl.where(l > 0, acc / tl.maximum(l, 1.0), 0.0)
    tl.store(
        out_ptr + row * out_stride_n + head * out_stride_h + offs_c,
        res.to(out_ptr.dtype.element_ty),
        mask=mask_c,
    )
    lse = tl.where(l > 0, m + tl.log(tl.maximum(l, 1.0)), float("-inf"))
    tl.store(lse_ptr + row * lse_stride_n + head, lse.to(lse_ptr.dtype.element_ty), mask=ctile == 0)


@triton.jit
def _gat_pre_block(col_ptr, a_src_ptr, offs_e, mask_e, head, a_i, a_src_stride_n, ACC: tl.constexpr):
    """Sources and LeakyReLU pre-activations a_src[col[k], h] + a_dst[i, h] of one edge block."""
    src = tl.load(col_ptr + offs_e, mask=mask_e, other=0)
    s = tl.load(a_src_ptr + src * a_src_stride_n + head, mask=mask_e, other=0.0).to(ACC) + a_i
    return src, s


@triton.jit
def _gat_dp_block(
    h_ptr, g_row, src, mask_e, head, C, h_stride_n, h_stride_h,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dp_k = <g[i, h], h[col[k], h]> for one edge block, C reduced BLOCK_C at a time."""
    dp = tl.full([BLOCK_E], 0.0, dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        g = tl.load(g_row + offs_c, mask=mask_c, other=0.0).to(ACC)
        hv = tl.load(
            h_ptr + src[:, None] * h_stride_n + head * h_stride_h + offs_c[None, :],
            mask=mask_e[:, None] & mask_c[None, :],
            other=0.0,
        ).to(ACC)
        dp += tl.sum(hv * g[None, :], axis=1)
    return dp


@triton.jit
def _gat_bwd_row_kernel(
    rowptr_ptr,
    col_ptr,
    h_ptr,
    a_src_ptr,
    a_dst_ptr,
    out_ptr,
    lse_ptr,
    grad_out_ptr,
    p_ptr,
    de_ptr,
    grad_a_dst_ptr,
    slope_hi,
    slope_lo,
    C,
    h_stride_n,
    h_stride_h,
    a_src_stride_n,
    a_dst_stride_n,
    out_stride_n,
    out_stride_h,
    lse_stride_n,
    grad_out_stride_n,
    grad_out_stride_h,
    p_stride_e,
    grad_a_dst_stride_n,
    # constexpr: half inputs have out and lse rounded to 8-11 bits, so lse and
    # delta are then recomputed in ACC from the row (two more light passes)
    RECOMPUTE_STATS: tl.constexpr,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """GAT backward, CSR pass: one program per (row i, head h).

      p_k     = exp(e_k - lse[i, h])
      dp_k    = <g[i, h], h[col[k], h]>
      delta   = <g[i, h], out[i, h]>  (= sum_k p_k dp_k, FlashAttention's D)
      de_k    = p_k (dp_k - delta) * (pre-activation > 0 ? 1 : slope)
      grad_a_dst[i, h] = sum_k de_k

    p and de are written to [E, H] scratch (in ACC) for the transpose pass.
    With RECOMPUTE_STATS, lse comes from an online-softmax pass and delta from
    sum_k p_k dp_k (dp parked in the de scratch), so that sum_k de_k, which
    cancels to 0 when every logit in the row has one sign, does not inherit
    the rounding of a half-precision out.
    """
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    a_i = tl.load(a_dst_ptr + row * a_dst_stride_n + head).to(ACC)
    negative_slope = (tl.full([], 0.0, dtype=ACC) + slope_hi) + slope_lo  # summed in ACC
    g_row = grad_out_ptr + row * grad_out_stride_n + head * grad_out_stride_h
    delta = tl.full([], 0.0, dtype=ACC)
    if RECOMPUTE_STATS:
        m = tl.full([], float("-inf"), dtype=ACC)
        l = tl.full([], 0.0, dtype=ACC)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < end
            src, s = _gat_pre_block(col_ptr, a_src_ptr, offs_e, mask_e, head, a_i, a_src_stride_n, ACC)
            e = tl.where(mask_e, tl.where(s > 0, s, s * negative_slope), float("-inf"))
            m_new = tl.maximum(m, tl.max(e, axis=0))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(e - m_new), axis=0)
            m = m_new
        lse = m + tl.log(tl.maximum(l, 1.0))  # only used by a non-empty row, where l >= 1
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < end
            src, s = _gat_pre_block(col_ptr, a_src_ptr, offs_e, mask_e, head, a_i, a_src_stride_n, ACC)
            p = tl.where(mask_e, tl.exp(tl.where(s > 0, s, s * negative_slope) - lse), 0.0)
            dp = _gat_dp_block(
                h_ptr, g_row, src, mask_e, head, C, h_stride_n, h_stride_h, ACC, BLOCK_E, BLOCK_C
            )
            tl.store(de_ptr + offs_e * p_stride_e + head, dp, mask=mask_e)
            delta += tl.sum(p * dp, axis=0)
    else:
        lse = tl.load(lse_ptr + row * lse_stride_n + head).to(ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            g = tl.load(g_row + offs_c, mask=mask_c, other=0.0).to(ACC)
            o = tl.load(out_ptr + row * out_stride_n + head * out_stride_h + offs_c, mask=mask_c, other=0.0)
            delta += tl.sum(g * o.to(ACC), axis=0)

    de_sum = tl.full([], 0.0, dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        src, s = _gat_pre_block(col_ptr, a_src_ptr, offs_e, mask_e, head, a_i, a_src_stride_n, ACC)
        p = tl.where(mask_e, tl.exp(tl.where(s > 0, s, s * negative_slope) - lse), 0.0)
        if RECOMPUTE_STATS:
            dp = tl.load(de_ptr + offs_e * p_stride_e + head, mask=mask_e, other=0.0)
        else:
            dp = _gat_dp_block(
                h_ptr, g_row, src, mask_e, head, C, h_stride_n, h_stride_h, ACC, BLOCK_E, BLOCK_C
            )
        de = p * (dp - delta) * tl.where(s > 0, 1.0, negative_slope)
        tl.store(p_ptr + offs_e * p_stride_e + head, p, mask=mask_e)
        tl.store(de_ptr + offs_e * p_stride_e + head, de, mask=mask_e)
        de_sum += tl.sum(de, axis=0)
    tl.store(grad_a_dst_ptr + row * grad_a_dst_stride_n + head, de_sum.to(grad_a_dst_ptr.dtype.element_ty))


@triton.jit
def _gat_bwd_col_kernel(
    csc_ptr_ptr,
    csc_row_ptr,
    csc_perm_ptr,
    grad_out_ptr,
    p_ptr,
    de_ptr,
    grad_h_ptr,
    grad_a_src_ptr,
    C,
    grad_out_stride_n,
    grad_out_stride_h,
    p_stride_e,
    grad_h_stride_n,
    grad_h_stride_h,
    grad_a_src_stride_n,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """GAT backward, transpose pass: one program per (source j, head h, channel tile).

    For the transposed edges t of source j (i = csc_row[t], k = csc_perm[t]):

      grad_h[j, h, c]  = sum_t p_k g[i, h, c]
      grad_a_src[j, h] = sum_t de_k

    Each output is written by one program (grad_a_src by channel tile 0).
    """
    j = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ctile = tl.program_id(2)
    offs_c = ctile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    start = tl.load(csc_ptr_ptr + j)
    end = tl.load(csc_ptr_ptr + j + 1)
    acc = tl.full([BLOCK_C], 0.0, dtype=ACC)
    de_sum = tl.full([], 0.0, dtype=ACC)
    for t0 in range(start, end, BLOCK_E):
        offs_t = t0 + tl.arange(0, BLOCK_E)
        mask_t = offs_t < end
        dst = tl.load(csc_row_ptr + offs_t, mask=mask_t, other=0)
        k = tl.load(csc_perm_ptr + offs_t, mask=mask_t, other=0)
        p = tl.load(p_ptr + k * p_stride_e + head, mask=mask_t, other=0.0)
        de_sum += tl.sum(tl.load(de_ptr + k * p_stride_e + head, mask=mask_t, other=0.0), axis=0)
        g = tl.load(
            grad_out_ptr + dst[:, None] * grad_out_stride_n + head * grad_out_stride_h + offs_c[None, :],
            mask=mask_t[:, None] & mask_c[None, :],
            other=0.0,
        ).to(ACC)
        acc += tl.sum(p[:, None] * g, axis=0)
    tl.store(
        grad_h_ptr + j * grad_h_stride_n + head * grad_h_stride_h + offs_c,
        acc.to(grad_h_ptr.dtype.element_ty),
        mask=mask_c,
    )
    tl.store(
        grad_a_src_ptr + j * grad_a_src_stride_n + head,
        de_sum.to(grad_a_src_ptr.dtype.element_ty),
        mask=ctile == 0,
    )


@on_device
def gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope):
    """Fused GAT aggregation in CSR order.

    Args:
        rowptr: [N_dst+1]; col: [E]; h: [N_src, H, C]; a_src: [N_src, H];
        a_dst: [N_dst, H]; negative_slope: LeakyReLU slope.

    Returns:
        out [N_dst, H, C] and lse [N_dst, H] (log-sum-exp of the row's
        attention logits, -inf for an empty row), both of h's dtype.

    Example::

        >>> out, lse = gat_fwd(g.rowptr, g.col, h, a_src, a_dst, 0.2)
    """
    h, a_src, a_dst = h.contiguous(), a_src.contiguous(), a_dst.contiguous()
    n_dst, H, C = rowptr.shape[0] - 1, h.shape[1], h.shape[2]
    out = torch.empty((n_dst, H, C), dtype=h.dtype, device=h.device)
    lse = torch.empty((n_dst, H), dtype=h.dtype, device=h.device)
    if n_dst == 0 or H == 0:
        return out, lse
    if col.shape[0] == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    bc = col_block(C)
    be = row_block(bc)
    # one channel tile even for C == 0: that program still writes lse
    _gat_fwd_kernel[(n_dst, H, max(triton.cdiv(C, bc), 1))](
        rowptr.contiguous(), col.contiguous(), h, a_src, a_dst, out, lse,
        *_split_slope(negative_slope), C,
        h.stride(0), h.stride(1), a_src.stride(0), a_dst.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        ACC=acc_type(h.dtype), BLOCK_E=be, BLOCK_C=bc, num_warps=num_warps(be, bc),
    )  # fmt: skip
    return out, lse


@on_device
def gat_bwd(rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, negative_slope, out, lse, grad_out):
    """Gradients of :func:`gat_fwd` (FlashAttention-style, with no atomics).

    A CSR pass computes p and de = dL/de per edge into [E, H] scratch and
    grad_a_dst; a transpose pass sums them into grad_h and grad_a_src.

    Returns:
        grad_h [N_src, H, C], grad_a_src [N_src, H], grad_a_dst [N_dst, H].

    Example::

        >>> gh, gs, gd = gat_bwd(g.rowptr, g.col, *g.csc, h, a_src, a_dst, 0.2, out, lse, go)
    """
    h, a_src, a_dst = h.contiguous(), a_src.contiguous(), a_dst.contiguous()
    out, lse, grad_out = out.contiguous(), lse.contiguous(), grad_out.contiguous()
    n_src, H, C = h.shape
    n_dst, E = rowptr.shape[0] - 1, col.shape[0]
    dev, dtype = h.device, h.dtype
    grad_h = torch.empty((n_src, H, C), dtype=dtype, device=dev)
    grad_a_src = torch.empty((n_src, H), dtype=a_src.dtype, device=dev)
    grad_a_dst = torch.empty((n_dst, H), dtype=a_dst.dtype, device=dev)
    if H == 0:
        return grad_h, grad_a_src, grad_a_dst
    if E == 0:
        return grad_h.zero_(), grad_a_src.zero_(), grad_a_dst.zero_()
    p = torch.empty((E, H), dtype=acc_dtype(dtype), device=dev)
    de = torch.empty((E, H), dtype=acc_dtype(dtype), device=dev)
    acc_t = acc_type(dtype)
    bc = col_block(C)
    be = row_block(bc)
    _gat_bwd_row_kernel[(n_dst, H)](
        rowptr.contiguous(), col.contiguous(), h, a_src, a_dst, out, lse, grad_out, p, de, grad_a_dst,
        *_split_slope(negative_slope), C,
        h.stride(0), h.stride(1), a_src.stride(0), a_dst.stride(0), out.stride(0), out.stride(1),
        lse.stride(0), grad_out.stride(0), grad_out.stride(1), p.stride(0), grad_a_dst.stride(0),
        RECOMPUTE_STATS=dtype in (torch.float16, torch.bfloat16), ACC=acc_t,
        BLOCK_E=be, BLOCK_C=bc, num_warps=num_warps(be, bc),
    )  # fmt: skip
    # one channel tile even for C == 0: that program still writes grad_a_src
    _gat_bwd_col_kernel[(n_src, H, max(triton.cdiv(C, bc), 1))](
        csc_ptr.contiguous(), csc_row.contiguous(), csc_perm.contiguous(), grad_out, p, de, grad_h, grad_a_src,
        C,
        grad_out.stride(0), grad_out.stride(1), p.stride(0), grad_h.stride(0), grad_h.stride(1),
        grad_a_src.stride(0),
        ACC=acc_t, BLOCK_E=be, BLOCK_C=bc, num_warps=num_warps(be, bc),
    )  # fmt: skip
    return grad_h, grad_a_src, grad_a_dst


__all__ = [
    "spmm_fwd",
    "spmm_bwd",
    "sddmm_fwd",
    "edge_softmax_fwd",
    "edge_softmax_bwd",
    "gat_fwd",
    "gat_bwd",
]

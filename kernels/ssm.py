"""Triton kernels for the selective state-space (Mamba) family.

The selective scan (S6 of Gu & Dao, "Mamba: Linear-Time Sequence Modeling
with Selective State Spaces", arXiv:2312.00752), per channel d and state n::

    dt[t]  = softplus(delta[t] + delta_bias)          (softplus optional; the identity above 20)
    h[t]   = exp(dt[t] A) h[t-1] + dt[t] B[t] u[t]    h[-1] = initial_state, or 0
    out[t] = (sum_n C[t] h[t] + D u[t]) * silu(z[t])

is a first-order linear recurrence h[t] = a[t] h[t-1] + b[t].  Its steps
compose associatively as affine maps, (a1, b1) then (a2, b2) =
(a1 a2, a2 b1 + b2), so a chunk of steps is a prefix scan (Blelloch,
"Prefix Sums and Their Applications", 1990) over (a, b) pairs, as Martin &
Cundy ("Parallelizing Linear Recurrent Neural Nets Over Sequence Length",
ICLR 2018) do for linear RNNs.

Chunked scan.  One program owns one batch row (one packed sequence with
``cu_seqlens``) and a block of channels with all N states, a
[BLOCK_D, BLOCK_N] state in registers.  It walks time in chunks of BLOCK_L
steps: each chunk is a ``tl.associative_scan`` along the time axis of a
[BLOCK_D, BLOCK_N, BLOCK_L] tile, and the state is carried from one chunk to
the next (h = P h_in + S with (P, S) the scanned pairs).  Channels are
blocked within *segments*, runs of channels that read the same group of a
variable or grouped B and C, so those are loaded once as a [BLOCK_N, BLOCK_L]
tile for the whole block.

Backward.  The adjoint lam[t] = dL/dh[t] obeys the reversed recurrence
lam[t] = C[t] g[t] + exp(dt[t+1] A) lam[t+1], again a pair scan, run with
``reverse=True`` chunk by chunk from the end of each sequence.  Storing every
state would take [batch, dim, N, L]; instead a forward pass (the forward
kernel in checkpoint mode) writes the state at the start of each chunk,
O(batch dim N L / BLOCK_L), and the backward program recomputes a chunk's
states from its checkpoint before running the chunk's adjoint.  Per-step
gradients (u, delta, z) have one writer each.  Reductions over time, batch
and channels (A, D, delta_bias, constant B and C, and the channel sum of a
variable or grouped B and C) are written as per-program partials and summed
over a fixed axis afterwards, so the results do not depend on scheduling:
no atomics, bitwise reproducible.

The depthwise causal convolution (causal-conv1d's ``causal_conv1d_fn``)
``out[t] = act(bias + sum_k w[k] x[t - (width-1) + k])`` reads inputs before
a sequence's start from ``initial_states``; programs own a block of channels
and a contiguous piece of one sequence, and its backward recomputes the
pre-activation where the SiLU needs it.  The decoding steps
(``selective_state_update``, ``causal_conv1d_update``) update their state in
place, one writer per element.

Layouts and dtypes follow :mod:`frontiers_fast.ops.ssm`, whose module
docstring is the contract for the launchers below.  Arithmetic is float32
for fp16/bf16/fp32 inputs and float64 for float64 inputs (the ``ACC``
constexpr).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from frontiers_fast._library import absent

from ._utils import acc_dtype, acc_type, col_block, num_warps, on_device, row_block

SCAN_TILE = 2048  # elements of the forward's [BLOCK_D, BLOCK_N, BLOCK_L] chunk
SCAN_TILE_BWD = 4096  # the backward keeps more chunk-sized tensors alive: 8 warps for twice the tile
SCAN_MAX_L = 64  # time steps per forward chunk
SCAN_MAX_L_BWD = 64
PROGRAMS = 1024  # enough programs to fill a GPU, for splitting the convolution along time


# ---------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------
@triton.jit
def _pair_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): x -> a2 (a1 x + b1) + b2.  Reversed scans apply the
    # same map in reversed time, which is what the adjoint recurrence is.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus(x, threshold=20)."""
    e = tl.exp(x)
    up = 1.0 + e
    # log1p(e) without a log1p (the interpreter has no libdevice): Goldberg's
    # correction log(up) * e / (up - 1) cancels the rounding of 1 + e.
    lp = tl.where(up == 1.0, e, tl.log(up) * (e / (up - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _check_cu(cu_seqlens, L, batch):
    if cu_seqlens is not None:
        # imported here: frontiers_fast.ops.ssm names this module's launchers
        from frontiers_fast.ops.ssm import check_cu_seqlens

        check_cu_seqlens(cu_seqlens, L, batch)


def _arg(t, stand_in):
    """A kernel's tensor argument: ``t``, or for None a stand-in its constexpr flag keeps unread."""
    return stand_in if t is None else t


# ---------------------------------------------------------------------------
# selective scan: forward (and the backward's checkpoint pass)
# ---------------------------------------------------------------------------
@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, cu_ptr,
    out_ptr, last_ptr, ck_ptr,
    L, N, seg, dpg_B, dpg_C, n_ck,
    u_stride_b, u_stride_d, u_stride_l,
    delta_stride_b, delta_stride_d, delta_stride_l,
    A_stride_d, A_stride_n,
    B_stride_b, B_stride_g, B_stride_n, B_stride_l,
    C_stride_b, C_stride_g, C_stride_n, C_stride_l,
    D_stride, bias_stride,
    z_stride_b, z_stride_d, z_stride_l,
    h0_stride_r, h0_stride_d, h0_stride_n,
    out_stride_b, out_stride_d, out_stride_l,
    last_stride_r, last_stride_d, last_stride_n,
    ck_stride_c, ck_stride_d,
    B_CONST: tl.constexpr,  # constexpr: a constant [dim, N] B is loaded once, a variable one per chunk
    C_CONST: tl.constexpr,
    HAS_D: tl.constexpr,  # constexpr flags: absent options must not load anything
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    VARLEN: tl.constexpr,  # constexpr: rows are packed sequences of batch row 0, bounded by cu_seqlens
    WRITE_OUT: tl.constexpr,  # constexpr: False in the backward's checkpoint pass (no C, z, out)
    CHECKPOINT: tl.constexpr,  # constexpr: write the state entering each chunk to ck
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Chunked selective scan, one program per (row, channel segment, channel block).

    With a[t] = exp(dt[t] A) and b[t] = dt[t] u[t] B[t], a chunk's scanned pairs
    give every state of the chunk from the one entering it:
    h[t] = P[t] h_in + S[t].  Steps past the end of a sequence are the identity
    pair (1, 0), so the chunk's last column is the state leaving it.  B and C of
    the segment's group are [BLOCK_N, BLOCK_L] tiles shared by the block.
    """
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    d_local = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d_local < seg
    d = (sid * seg + d_local).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    ar = tl.arange(0, BLOCK_L)
    if VARLEN:
        start = tl.load(cu_ptr + row)
        end = tl.load(cu_ptr + row + 1)
        b = row * 0
        ck_base = start // BLOCK_L + row  # sequence s's chunks never reach sequence s+1's first
    else:
        start = row * 0
        end = row * 0 + L
        b = row
        ck_base = row * n_ck

    A = tl.load(A_ptr + d[:, None] * A_stride_d + n[None, :] * A_stride_n, mask=mask_dn, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d * bias_stride, mask=mask_d, other=0.0).to(ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + d * D_stride, mask=mask_d, other=0.0).to(ACC)
    if HAS_H0:
        h = tl.load(
            h0_ptr + row * h0_stride_r + d[:, None] * h0_stride_d + n[None, :] * h0_stride_n,
            mask=mask_dn,
            other=0.0,
        ).to(ACC)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    if B_CONST:
        Bt = tl.load(B_ptr + d[:, None] * B_stride_g + n[None, :] * B_stride_n, mask=mask_dn, other=0.0)
        Bt = Bt.to(ACC)[:, :, None]
    else:
        B_base = B_ptr + b * B_stride_b + ((sid * seg) // dpg_B).to(tl.int64) * B_stride_g
    if WRITE_OUT:
        if C_CONST:
            Ct = tl.load(C_ptr + d[:, None] * C_stride_g + n[None, :] * C_stride_n, mask=mask_dn, other=0.0)
            Ct = Ct.to(ACC)[:, :, None]
        else:
            C_base = C_ptr + b * C_stride_b + ((sid * seg) // dpg_C).to(tl.int64) * C_stride_g
    u_row = u_ptr + b * u_stride_b + d[:, None] * u_stride_d
    delta_row = delta_ptr + b * delta_stride_b + d[:, None] * delta_stride_d

    n_chunks = tl.cdiv(end - start, BLOCK_L)
    for k in range(0, n_chunks):
        t = start + k * BLOCK_L + ar
        mask_t = t < end
        m2 = mask_d[:, None] & mask_t[None, :]
        m3 = m2[:, None, :] & mask_n[None, :, None]
        uu = tl.load(u_row + t[None, :] * u_stride_l, mask=m2, other=0.0).to(ACC)
        dt = tl.load(delta_row + t[None, :] * delta_stride_l, mask=m2, other=0.0).to(ACC)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        if not B_CONST:
            Bt = tl.load(
                B_base + n[:, None] * B_stride_n + t[None, :] * B_stride_l,
                mask=mask_n[:, None] & mask_t[None, :],
                other=0.0,
            ).to(ACC)[None, :, :]
        dA = tl.where(m3, tl.exp(dt[:, None, :] * A[:, :, None]), 1.0)
        dBu = tl.where(m3, (dt * uu)[:, None, :] * Bt, 0.0)
        if CHECKPOINT:
            tl.store(
                ck_ptr + (ck_base + k) * ck_stride_c + d[:, None] * ck_stride_d + n[None, :], h, mask=mask_dn
            )
        P, S = tl.associative_scan((dA, dBu), 2, _pair_combine)
        hs = P * h[:, :, None] + S
        if WRITE_OUT:
            if not C_CONST:
                Ct = tl.load(
                    C_base + n[:, None] * C_stride_n + t[None, :] * C_stride_l,
                    mask=mask_n[:, None] & mask_t[None, :],
                    other=0.0,
                ).to(ACC)[None, :, :]
            y = tl.sum(hs * Ct, axis=1)
            if HAS_D:
                y += Dv[:, None] * uu
            if HAS_Z:
                zz = tl.load(
                    z_ptr + b * z_stride_b + d[:, None] * z_stride_d + t[None, :] * z_stride_l,
                    mask=m2,
                    other=0.0,
                ).to(ACC)
                y = y * (zz * _sigmoid(zz))
            tl.store(
                out_ptr + b * out_stride_b + d[:, None] * out_stride_d + t[None, :] * out_stride_l,
                y.to(out_ptr.dtype.element_ty),
                mask=m2,
            )
        # the last column: padded steps are the identity, so it is the state after the chunk
        h = tl.sum(tl.where(ar[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)
    if WRITE_OUT:
        tl.store(
            last_ptr + row * last_stride_r + d[:, None] * last_stride_d + n[None, :] * last_stride_n,
            h.to(last_ptr.dtype.element_ty),
            mask=mask_dn,
        )


# ---------------------------------------------------------------------------
# selective scan: backward
# ---------------------------------------------------------------------------
@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, cu_ptr, ck_ptr, go_ptr, glast_ptr,
    gu_ptr, gdelta_ptr, gz_ptr, gh0_ptr, pA_ptr, pD_ptr, pbias_ptr, pB_ptr, pC_ptr,
    L, N, seg, dpg_B, dpg_C, spg_B, spg_C, n_ck,
    u_stride_b, u_stride_d, u_stride_l,
    delta_stride_b, delta_stride_d, delta_stride_l,
    A_stride_d, A_stride_n,
    B_stride_b, B_stride_g, B_stride_n, B_stride_l,
    C_stride_b, C_stride_g, C_stride_n, C_stride_l,
    D_stride, bias_stride,
    z_stride_b, z_stride_d, z_stride_l,
    go_stride_b, go_stride_d, go_stride_l,
    glast_stride_r, glast_stride_d, glast_stride_n,
    gu_stride_b, gu_stride_d, gu_stride_l,
    gdelta_stride_b, gdelta_stride_d, gdelta_stride_l,
    gz_stride_b, gz_stride_d, gz_stride_l,
    gh0_stride_r, gh0_stride_d, gh0_stride_n,
    pB_stride_b, pB_stride_g, pB_stride_k, pB_stride_n, pB_stride_l,
    pC_stride_b, pC_stride_g, pC_stride_k, pC_stride_n, pC_stride_l,
    ck_stride_c, ck_stride_d, p_stride_r, p_stride_d, pv_stride_r,
    B_CONST: tl.constexpr,  # constexpr: constant B's gradient is a [dim, N] sum, a variable one per step
    C_CONST: tl.constexpr,
    HAS_D: tl.constexpr,  # constexpr flags: absent options must not load anything
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_GLAST: tl.constexpr,
    VARLEN: tl.constexpr,  # constexpr: rows are packed sequences of batch row 0, bounded by cu_seqlens
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Backward of the chunked scan, one program per (row, segment, channel block), chunks in reverse.

    For each chunk: the states h[t] from the chunk's checkpoint (forward scan),
    then the adjoint lam[t] = C[t] g[t] + a[t+1] lam[t+1] (reverse scan, with
    a[t+1] taken as 1 at the chunk's last step, where the carry
    mu = a[t0'] lam[t0'] of the following chunk enters instead), and with
    a[t] h[t-1] = h[t] - b[t]:

      dL/d(dt A)[t] = lam[t] a[t] h[t-1]       grad_A = sum_t dL/d(dt A) dt
      grad_dt = sum_n dL/d(dt A) A + u sum_n lam B        grad_u = g D + dt sum_n lam B
      grad_B = sum dt u lam,  grad_C = sum g h   (over t for constant, over channels per step otherwise)

    where g is grad_out times silu(z).  The time and channel sums go to
    per-program partials (pA, pD, pbias, pB, pC); grad_h0 is the carry left
    after the first chunk.
    """
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    jblk = tl.program_id(2)
    d_local = jblk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d_local < seg
    d = (sid * seg + d_local).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    ar = tl.arange(0, BLOCK_L)
    if VARLEN:
        start = tl.load(cu_ptr + row)
        end = tl.load(cu_ptr + row + 1)
        b = row * 0
        ck_base = start // BLOCK_L + row
    else:
        start = row * 0
        end = row * 0 + L
        b = row
        ck_base = row * n_ck

    A = tl.load(A_ptr + d[:, None] * A_stride_d + n[None, :] * A_stride_n, mask=mask_dn, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d * bias_stride, mask=mask_d, other=0.0).to(ACC)
        acc_bias = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + d * D_stride, mask=mask_d, other=0.0).to(ACC)
        acc_D = tl.zeros([BLOCK_D], dtype=ACC)
    acc_A = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    if B_CONST:
        Bt = tl.load(B_ptr + d[:, None] * B_stride_g + n[None, :] * B_stride_n, mask=mask_dn, other=0.0)
        Bt = Bt.to(ACC)[:, :, None]
        acc_B = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    else:
        gB = ((sid * seg) // dpg_B).to(tl.int64)
        B_base = B_ptr + b * B_stride_b + gB * B_stride_g
        # partial k of group gB: which of the group's blocks of channels this program is
        k_B = (sid - gB * spg_B) * tl.num_programs(2) + jblk
        pB_base = pB_ptr + b * pB_stride_b + gB * pB_stride_g + k_B.to(tl.int64) * pB_stride_k
    if C_CONST:
        Ct = tl.load(C_ptr + d[:, None] * C_stride_g + n[None, :] * C_stride_n, mask=mask_dn, other=0.0)
        Ct = Ct.to(ACC)[:, :, None]
        acc_C = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    else:
        gC = ((sid * seg) // dpg_C).to(tl.int64)
        C_base = C_ptr + b * C_stride_b + gC * C_stride_g
        k_C = (sid - gC * spg_C) * tl.num_programs(2) + jblk
        pC_base = pC_ptr + b * pC_stride_b + gC * pC_stride_g + k_C.to(tl.int64) * pC_stride_k
    if HAS_GLAST:
        carry = tl.load(
            glast_ptr + row * glast_stride_r + d[:, None] * glast_stride_d + n[None, :] * glast_stride_n,
            mask=mask_dn,
            other=0.0,
        ).to(ACC)
    else:
        carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    u_row = u_ptr + b * u_stride_b + d[:, None] * u_stride_d
    delta_row = delta_ptr + b * delta_stride_b + d[:, None] * delta_stride_d

    n_chunks = tl.cdiv(end - start, BLOCK_L)
    for kk in range(0, n_chunks):
        k = n_chunks - 1 - kk
        t = start + k * BLOCK_L + ar
        mask_t = t < end
        m2 = mask_d[:, None] & mask_t[None, :]
        m3 = m2[:, None, :] & mask_n[None, :, None]
        mask_nt = mask_n[:, None] & mask_t[None, :]
        # the next step's decay a[t+1], inside this chunk only (the carry holds the rest)
        mask_next = (t + 1 < end) & (ar < BLOCK_L - 1)
        m2n = mask_d[:, None] & mask_next[None, :]
        m3n = m2n[:, None, :] & mask_n[None, :, None]

        uu = tl.load(u_row + t[None, :] * u_stride_l, mask=m2, other=0.0).to(ACC)
        dt_raw = tl.load(delta_row + t[None, :] * delta_stride_l, mask=m2, other=0.0).to(ACC)
        dtn = tl.load(delta_row + (t + 1)[None, :] * delta_stride_l, mask=m2n, other=0.0).to(ACC)
        if HAS_BIAS:
            dt_raw = dt_raw + bias[:, None]
            dtn = dtn + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt_raw)
            dtn = _softplus(dtn)
        else:
            dt = dt_raw
        if not B_CONST:
            Bt = tl.load(
                B_base + n[:, None] * B_stride_n + t[None, :] * B_stride_l, mask=mask_nt, other=0.0
            ).to(ACC)[None, :, :]
        if not C_CONST:
            Ct = tl.load(
                C_base + n[:, None] * C_stride_n + t[None, :] * C_stride_l, mask=mask_nt, other=0.0
            ).to(ACC)[None, :, :]
        dA = tl.where(m3, tl.exp(dt[:, None, :] * A[:, :, None]), 1.0)
        dAn = tl.where(m3n, tl.exp(dtn[:, None, :] * A[:, :, None]), 1.0)
        dtu = dt * uu
        dBu = tl.where(m3, dtu[:, None, :] * Bt, 0.0)

        # the chunk's states, recomputed from the state entering it
        hc = tl.load(
            ck_ptr + (ck_base + k) * ck_stride_c + d[:, None] * ck_stride_d + n[None, :],
            mask=mask_dn,
            other=0.0,
        )
        P, S = tl.associative_scan((dA, dBu), 2, _pair_combine)
        hs = P * hc[:, :, None] + S

        g = tl.load(
            go_ptr + b * go_stride_b + d[:, None] * go_stride_d + t[None, :] * go_stride_l, mask=m2, other=0.0
        ).to(ACC)
        if HAS_Z:
            zz = tl.load(
                z_ptr + b * z_stride_b + d[:, None] * z_stride_d + t[None, :] * z_stride_l, mask=m2, other=0.0
            ).to(ACC)
            y = tl.sum(hs * Ct, axis=1)
            if HAS_D:
                y += Dv[:, None] * uu
            sig = _sigmoid(zz)
            gz = g * y * sig * (1.0 + zz * (1.0 - sig))
            tl.store(
                gz_ptr + b * gz_stride_b + d[:, None] * gz_stride_d + t[None, :] * gz_stride_l,
                gz.to(gz_ptr.dtype.element_ty),
                mask=m2,
            )
            g = g * (zz * sig)
        if HAS_D:
            acc_D += tl.sum(tl.where(m2, g * uu, 0.0), axis=1)
            gu = g * Dv[:, None]
        else:
            gu = tl.zeros([BLOCK_D, BLOCK_L], dtype=ACC)
        gh = tl.where(m3, g[:, None, :] * hs, 0.0)
        if C_CONST:
            acc_C += tl.sum(gh, axis=2)
        else:
            tl.store(
                pC_base + n[:, None] * pC_stride_n + t[None, :] * pC_stride_l,
                tl.sum(gh, axis=0).to(pC_ptr.dtype.element_ty),
                mask=mask_nt,
            )

        gCt = tl.where(m3, g[:, None, :] * Ct, 0.0)
        R, Sr = tl.associative_scan((dAn, gCt), 2, _pair_combine, reverse=True)
        lam = Sr + R * carry[:, :, None]
        # dL/dh just before the chunk, for the chunk before it
        carry = tl.sum(tl.where(ar[None, None, :] == 0, dA * lam, 0.0), axis=2)

        gdA = tl.where(m3, lam * (hs - dBu), 0.0)
        acc_A += tl.sum(gdA * dt[:, None, :], axis=2)
        lamB = tl.sum(lam * Bt, axis=1)
        gdt = tl.sum(gdA * A[:, :, None], axis=1) + lamB * uu
        gu += lamB * dt
        lamu = tl.where(m3, dtu[:, None, :] * lam, 0.0)
        if B_CONST:
            acc_B += tl.sum(lamu, axis=2)
        else:
            tl.store(
                pB_base + n[:, None] * pB_stride_n + t[None, :] * pB_stride_l,
                tl.sum(lamu, axis=0).to(pB_ptr.dtype.element_ty),
                mask=mask_nt,
            )
        if SOFTPLUS:
            gdt = gdt * tl.where(dt_raw > 20.0, 1.0, _sigmoid(dt_raw))
        if HAS_BIAS:
            acc_bias += tl.sum(tl.where(m2, gdt, 0.0), axis=1)
        tl.store(
            gu_ptr + b * gu_stride_b + d[:, None] * gu_stride_d + t[None, :] * gu_stride_l,
            gu.to(gu_ptr.dtype.element_ty),
            mask=m2,
        )
        tl.store(
            gdelta_ptr + b * gdelta_stride_b + d[:, None] * gdelta_stride_d + t[None, :] * gdelta_stride_l,
            gdt.to(gdelta_ptr.dtype.element_ty),
            mask=m2,
        )

    if HAS_H0:
        tl.store(
            gh0_ptr + row * gh0_stride_r + d[:, None] * gh0_stride_d + n[None, :] * gh0_stride_n,
            carry.to(gh0_ptr.dtype.element_ty),
            mask=mask_dn,
        )
    p_dn = row * p_stride_r + d[:, None] * p_stride_d + n[None, :]
    tl.store(pA_ptr + p_dn, acc_A, mask=mask_dn)
    if B_CONST:
        tl.store(pB_ptr + p_dn, acc_B, mask=mask_dn)
    if C_CONST:
        tl.store(pC_ptr + p_dn, acc_C, mask=mask_dn)
    if HAS_D:
        tl.store(pD_ptr + row * pv_stride_r + d, acc_D, mask=mask_d)
    if HAS_BIAS:
        tl.store(pbias_ptr + row * pv_stride_r + d, acc_bias, mask=mask_d)


# ---------------------------------------------------------------------------
# selective scan: launchers
# ---------------------------------------------------------------------------
def _bc(M, dim):
    """(constant?, strides (batch, group, n, l), channels per group) of B or C in any of its layouts.

    A constant [dim, N] B is read with its channel stride in the group slot;
    a variable [batch, N, L] one is the grouped layout with one group.
    """
    if M.dim() == 2:
        return True, (0, M.stride(0), M.stride(1), 0), dim
    if M.dim() == 3:
        return False, (M.stride(0), 0, M.stride(1), M.stride(2)), dim
    return False, (M.stride(0), M.stride(1), M.stride(2), M.stride(3)), dim // M.shape[1]


def _segment(dim, B_info, C_info):
    """Channels per segment: runs of channels that read one group of B and one of C.

    Both layouts cut dim into equal groups, so the common refinement has
    gcd(channels per group of B, of C) channels; constant layouts impose nothing.
    """
    dpgs = [info[2] for info in (B_info, C_info) if not info[0]]
    return math.gcd(*dpgs) if dpgs else dim


def _fwd_blocks(N, L, seg, bl=None):
    bn = _np2(N)
    if bl is None:
        bl = min(SCAN_MAX_L, _np2(L))
        while bl > 4 and bn * bl > SCAN_TILE:
            bl //= 2
    bd = max(1, min(_np2(seg), SCAN_TILE // (bn * bl)))
    return bd, bn, bl


def _bwd_blocks(N, L, seg):
    # About N channels per program: the channel-sum partials of a variable B
    # and C then take about as much memory as u (N / BLOCK_D of it).
    bn = _np2(N)
    bd = min(_np2(seg), max(bn, 16))
    bl = min(SCAN_MAX_L_BWD, _np2(L), max(4, SCAN_TILE_BWD // (bn * bd)))
    bd = max(1, min(bd, SCAN_TILE_BWD // (bn * bl)))
    return bd, bn, bl


def _n_checkpoints(rows, L, bl, varlen):
    # with cu_seqlens, sequence s's chunks start at cu[s] // bl + s (see the kernels)
    return L // bl + rows + 1 if varlen else rows * triton.cdiv(L, bl)


def _strides(t, ndim):
    """``t``'s strides, or zeros for an absent (None) tensor of ``ndim`` dimensions."""
    return (0,) * ndim if t is None else t.stride()


def _launch_scan_fwd(args, out, last, ck, blocks):
    """The forward kernel on the op's arguments ``args``: writing out and last (the forward) or,
    with out None, only the checkpoints ck (the backward's first pass)."""
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens = args
    batch, dim, L = u.shape
    N = A.shape[1]
    rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    B_info, C_info = _bc(B, dim), _bc(C, dim)
    seg = _segment(dim, B_info, C_info)
    bd, bn, bl = blocks
    write_out = out is not None
    grid = (rows, dim // seg, triton.cdiv(seg, bd))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, _arg(D, u), _arg(z, u), _arg(delta_bias, u), _arg(initial_state, u),
        _arg(cu_seqlens, u), _arg(out, u), _arg(last, u), _arg(ck, u),
        L, N, seg, B_info[2], C_info[2], triton.cdiv(L, bl),
        *u.stride(), *delta.stride(), *A.stride(), *B_info[1], *C_info[1],
        *_strides(D, 1), *_strides(delta_bias, 1), *_strides(z, 3), *_strides(initial_state, 3),
        *_strides(out, 3), *_strides(last, 3), dim * N, N,
        B_CONST=B_info[0], C_CONST=C_info[0], HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_H0=initial_state is not None,
        VARLEN=cu_seqlens is not None, WRITE_OUT=write_out, CHECKPOINT=ck is not None,
        ACC=acc_type(u.dtype), BLOCK_D=bd, BLOCK_N=bn, BLOCK_L=bl,
        num_warps=num_warps(bd * bn, bl),
    )  # fmt: skip


@on_device
def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens):
    """Selective scan (Mamba's S6): ``h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] u[t]``.

    Args:
        u, delta: [batch, dim, L] (T).  A: [dim, N] (acc).
        B, C: constant [dim, N] (acc), variable [batch, N, L] or grouped
            [batch, G, N, L] (T; channel d reads group d // (dim // G)).
        D, delta_bias: None or [dim] (acc).  z: None or [batch, dim, L] (T).
        delta_softplus: apply softplus (threshold 20) to delta + delta_bias.
        initial_state: None or [rows, dim, N] (acc), rows = batch, or S with cu_seqlens.
        cu_seqlens: None or int64 [S + 1] offsets of S packed sequences (batch 1).

    Returns:
        out [batch, dim, L] in T and the last state [rows, dim, N] in acc.

    Example::

        >>> out, last = selective_scan_fwd(u, dt, A, B, C, None, None, None, False, None, None)
    """
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens)
    batch, dim, L = u.shape
    N = A.shape[1]
    _check_cu(cu_seqlens, L, batch)
    rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    last = torch.empty((rows, dim, N), dtype=acc_dtype(u.dtype), device=u.device)
    if rows == 0 or dim == 0:
        return out, last
    seg = _segment(dim, _bc(B, dim), _bc(C, dim))
    _launch_scan_fwd(args, out, last, None, _fwd_blocks(N, L, seg))
    return out, last


@on_device
def selective_scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, grad_out, grad_last_state
):
    """Gradients of :func:`selective_scan_fwd`, deterministic (no atomics).

    Args:
        as :func:`selective_scan_fwd`; grad_out [batch, dim, L] (T) and
        grad_last_state None or [rows, dim, N] (acc).

    Returns:
        (grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z,
        grad_delta_bias, grad_initial_state), each in its input's dtype and
        shape; an empty [0] for an input that was None.

    Example::

        >>> grads = selective_scan_bwd(u, dt, A, B, C, None, None, None, False, None, None, g, None)
    """
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens)
    batch, dim, L = u.shape
    N = A.shape[1]
    _check_cu(cu_seqlens, L, batch)
    rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dev, acc = u.device, acc_dtype(u.dtype)
    if rows == 0 or dim == 0:
        return tuple(
            absent(u) if t is None else torch.zeros_like(t)
            for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
        )
    new = lambda shape, dtype=acc: torch.empty(shape, dtype=dtype, device=dev)
    maybe = lambda t, shape: None if t is None else new(shape)

    B_info, C_info = _bc(B, dim), _bc(C, dim)
    seg = _segment(dim, B_info, C_info)
    bd, bn, bl = _bwd_blocks(N, L, seg)
    n_j = triton.cdiv(seg, bd)
    varlen = cu_seqlens is not None

    # first pass: the state entering every chunk of the backward's chunking
    ck = new((_n_checkpoints(rows, L, bl, varlen), dim, N))
    _launch_scan_fwd(args, None, None, ck, _fwd_blocks(N, L, seg, bl))

    grad_u, grad_delta = new(u.shape, u.dtype), new(delta.shape, delta.dtype)
    grad_z = None if z is None else new(z.shape, z.dtype)
    grad_h0 = None if initial_state is None else new(initial_state.shape, initial_state.dtype)
    # per-program partials of the sums over time, batch and channels
    pA, pD, pbias = new((rows, dim, N)), maybe(D, (rows, dim)), maybe(delta_bias, (rows, dim))
    part_strides = lambda p, info: _strides(None, 5) if info[0] else p.stride()

    def partials(M, info):
        """(where the kernel writes M's gradient, M's gradient or None, whether they are one tensor).

        A constant M gets per-row [rows, dim, N] sums; a variable or grouped one per-block
        [batch, G, K, N, L] sums over the channels of a block, its gradient itself when K = 1."""
        if info[0]:
            return new((rows, dim, N)), None, False
        G, K = dim // info[2], (info[2] // seg) * n_j
        grad = new(M.shape, M.dtype)
        if K == 1:
            return grad.view(batch, G, 1, N, L), grad, True
        return new((batch, G, K, N, L)), grad, False

    pB, grad_B, B_direct = partials(B, B_info)
    pC, grad_C, C_direct = partials(C, C_info)
    grid = (rows, dim // seg, n_j)
    _selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, _arg(D, u), _arg(z, u), _arg(delta_bias, u), _arg(cu_seqlens, u), ck, grad_out,
        _arg(grad_last_state, u),
        grad_u, grad_delta, _arg(grad_z, u), _arg(grad_h0, u), pA, _arg(pD, u), _arg(pbias, u), pB, pC,
        L, N, seg, B_info[2], C_info[2], max(1, B_info[2] // seg), max(1, C_info[2] // seg),
        triton.cdiv(L, bl),
        *u.stride(), *delta.stride(), *A.stride(), *B_info[1], *C_info[1],
        *_strides(D, 1), *_strides(delta_bias, 1), *_strides(z, 3), *grad_out.stride(),
        *_strides(grad_last_state, 3), *grad_u.stride(), *grad_delta.stride(), *_strides(grad_z, 3),
        *_strides(grad_h0, 3),
        *part_strides(pB, B_info), *part_strides(pC, C_info),
        dim * N, N, dim * N, N, dim,
        B_CONST=B_info[0], C_CONST=C_info[0], HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_H0=initial_state is not None,
        HAS_GLAST=grad_last_state is not None, VARLEN=varlen,
        ACC=acc_type(u.dtype), BLOCK_D=bd, BLOCK_N=bn, BLOCK_L=bl,
        num_warps=8 if bd * bn * bl >= SCAN_TILE_BWD else 4,
    )  # fmt: skip

    # Fixed-order reductions of the partials: torch's sum is deterministic for a given shape.
    def reduced(p, grad, direct, M):
        if grad is None:
            return p.sum(0).to(M.dtype)
        if not direct:
            grad.copy_(p.sum(2).view(grad.shape))
        return grad

    total = lambda p, M: absent(u) if M is None else p.sum(0).to(M.dtype)
    return (
        grad_u,
        grad_delta,
        total(pA, A),
        reduced(pB, grad_B, B_direct, B),
        reduced(pC, grad_C, C_direct, C),
        total(pD, D),
        _arg(grad_z, absent(u)),
        total(pbias, delta_bias),
        _arg(grad_h0, absent(u)),
    )


# ---------------------------------------------------------------------------
# causal conv1d: out[t] = act(bias + sum_k w[k] xcat[t + k]),  xcat = [initial_states, x]
# ---------------------------------------------------------------------------
@triton.jit
def _conv_input(x_row, init_row, src, start, mask, x_stride_l, init_stride_l, W: tl.constexpr,
                HAS_INIT: tl.constexpr):  # fmt: skip
    """x at sequence positions ``src`` (absolute), or the initial state before the sequence's start."""
    in_x = src >= start
    v = tl.load(x_row + src * x_stride_l, mask=mask & in_x, other=0.0)
    if HAS_INIT:
        v0 = tl.load(init_row + (src - start + W - 1) * init_stride_l, mask=mask & (src < start), other=0.0)
        v = tl.where(in_x, v, v0)
    return v


@triton.jit
def _conv_pre(x_row, init_row, w_row, bias, o, start, mask, mask_d, x_stride_l, init_stride_l, w_stride_k,
              W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The pre-activation at output positions ``o``: bias + sum_k w[k] xcat[o - (W-1) + k]."""
    acc = tl.zeros(o.shape, dtype=ACC) + bias[:, None]
    for k in tl.static_range(W):
        wk = tl.load(w_row + k * w_stride_k, mask=mask_d, other=0.0).to(ACC)
        v = _conv_input(x_row, init_row, o - (W - 1) + k, start, mask, x_stride_l, init_stride_l, W, HAS_INIT)
        acc += wk[:, None] * v.to(ACC)
    return acc


@triton.jit
def _conv_grad_pre(x_row, init_row, w_row, go_row, bias, o, start, mask, mask_d, x_stride_l, init_stride_l,
                   w_stride_k, go_stride_l, W: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                   ACC: tl.constexpr):  # fmt: skip
    """dL/d(pre-activation) at output positions ``o`` (0 where ``mask`` is off)."""
    g = tl.load(go_row + o * go_stride_l, mask=mask, other=0.0).to(ACC)
    if SILU:
        pre = _conv_pre(x_row, init_row, w_row, bias, o, start, mask, mask_d, x_stride_l, init_stride_l,
                        w_stride_k, W, HAS_INIT, ACC)  # fmt: skip
        sig = _sigmoid(pre)
        g = tl.where(mask, g * sig * (1.0 + pre * (1.0 - sig)), 0.0)
    return g


@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, cu_ptr, out_ptr, final_ptr,
    L, dim, n_pieces,
    x_stride_b, x_stride_d, x_stride_l,
    w_stride_d, w_stride_k,
    bias_stride,
    init_stride_r, init_stride_d, init_stride_l,
    out_stride_b, out_stride_d, out_stride_l,
    final_stride_r, final_stride_d, final_stride_l,
    W: tl.constexpr,  # constexpr: the filter's taps are unrolled
    HAS_BIAS: tl.constexpr,  # constexpr flags: absent options must not load anything
    HAS_INIT: tl.constexpr,
    SILU: tl.constexpr,
    VARLEN: tl.constexpr,  # constexpr: rows are packed sequences of batch row 0, bounded by cu_seqlens
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Depthwise causal convolution, one program per (row, channel block, piece of the row's time).

    A row (batch entry, or packed sequence) is cut into ``n_pieces`` runs of
    whole BLOCK_L blocks.  Positions before the row's start read
    ``initial_states`` (zeros without), never the previous sequence.  The
    first piece also writes the final states, the last width - 1 entries of
    [initial_states, x] (the initial states where the row is shorter).
    """
    row = tl.program_id(0).to(tl.int64)
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask_d = d < dim
    piece = tl.program_id(2)
    if VARLEN:
        start = tl.load(cu_ptr + row)
        end = tl.load(cu_ptr + row + 1)
        b = row * 0
    else:
        start = row * 0
        end = row * 0 + L
        b = row
    span = tl.cdiv(tl.cdiv(end - start, n_pieces), BLOCK_L) * BLOCK_L
    t_lo = start + piece * span
    t_hi = tl.minimum(end, t_lo + span)
    x_row = x_ptr + b * x_stride_b + d[:, None] * x_stride_d
    init_row = init_ptr + row * init_stride_r + d[:, None] * init_stride_d
    w_row = w_ptr + d * w_stride_d
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d * bias_stride, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros([BLOCK_D], dtype=ACC)
    zero_d = tl.zeros([BLOCK_D, 1], dtype=tl.int64)
    for t0 in range(t_lo, t_hi, BLOCK_L):
        t = t0 + tl.arange(0, BLOCK_L)
        m = mask_d[:, None] & (t < t_hi)[None, :]
        pre = _conv_pre(x_row, init_row, w_row, bias, t[None, :] + zero_d, start, m, mask_d, x_stride_l,
                        init_stride_l, w_stride_k, W, HAS_INIT, ACC)  # fmt: skip
        if SILU:
            pre = pre * _sigmoid(pre)
        out_ptrs = out_ptr + b * out_stride_b + d[:, None] * out_stride_d + t[None, :] * out_stride_l
        tl.store(out_ptrs, pre.to(out_ptr.dtype.element_ty), mask=m)
    if W > 1:
        if piece == 0:
            j = tl.arange(0, BLOCK_W)
            mj = mask_d[:, None] & (j < W - 1)[None, :]
            # entry j of the final states is xcat[len + j], x at start + len + j - (W-1)
            src = (end + j - (W - 1))[None, :] + zero_d
            v = _conv_input(x_row, init_row, src, start, mj, x_stride_l, init_stride_l, W, HAS_INIT)
            final_ptrs = (
                final_ptr + row * final_stride_r + d[:, None] * final_stride_d + j[None, :] * final_stride_l
            )
            tl.store(final_ptrs, v.to(final_ptr.dtype.element_ty), mask=mj)


@triton.jit
def _causal_conv1d_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, cu_ptr, go_ptr, gfinal_ptr,
    gx_ptr, ginit_ptr, pw_ptr, pbias_ptr,
    L, dim, n_pieces,
    x_stride_b, x_stride_d, x_stride_l,
    w_stride_d, w_stride_k,
    bias_stride,
    init_stride_r, init_stride_d, init_stride_l,
    go_stride_b, go_stride_d, go_stride_l,
    gfinal_stride_r, gfinal_stride_d, gfinal_stride_l,
    gx_stride_b, gx_stride_d, gx_stride_l,
    ginit_stride_r, ginit_stride_d, ginit_stride_l,
    W: tl.constexpr,  # constexpr: the filter's taps are unrolled
    HAS_BIAS: tl.constexpr,  # constexpr flags: absent options must not load anything
    HAS_INIT: tl.constexpr,
    HAS_GFINAL: tl.constexpr,
    SILU: tl.constexpr,
    VARLEN: tl.constexpr,  # constexpr: rows are packed sequences of batch row 0, bounded by cu_seqlens
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Backward of the causal convolution, on the pieces of :func:`_causal_conv1d_fwd_kernel`.

    With gp = dL/d(pre-activation) (recomputed from x where the SiLU needs it):

      grad_x[t] = sum_k w[k] gp[t + (W-1) - k]  (+ the final states' gradient for the last W-1 inputs)
      grad_w[k] = sum_t gp[t] xcat[t + k],  grad_bias = sum_t gp[t]

    Each input gathers the W outputs that read it, so grad_x has one writer
    and needs gp of the next W-1 outputs, recomputed here rather than read
    from a neighbour.  grad_w and grad_bias are per-program partials.
    """
    row = tl.program_id(0).to(tl.int64)
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask_d = d < dim
    piece = tl.program_id(2)
    if VARLEN:
        start = tl.load(cu_ptr + row)
        end = tl.load(cu_ptr + row + 1)
        b = row * 0
    else:
        start = row * 0
        end = row * 0 + L
        b = row
    span = tl.cdiv(tl.cdiv(end - start, n_pieces), BLOCK_L) * BLOCK_L
    t_lo = start + piece * span
    t_hi = tl.minimum(end, t_lo + span)
    x_row = x_ptr + b * x_stride_b + d[:, None] * x_stride_d
    init_row = init_ptr + row * init_stride_r + d[:, None] * init_stride_d
    go_row = go_ptr + b * go_stride_b + d[:, None] * go_stride_d
    gfinal_row = gfinal_ptr + row * gfinal_stride_r + d[:, None] * gfinal_stride_d
    w_row = w_ptr + d * w_stride_d
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d * bias_stride, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros([BLOCK_D], dtype=ACC)
    kk = tl.arange(0, BLOCK_W)
    acc_w = tl.zeros([BLOCK_D, BLOCK_W], dtype=ACC)
    acc_b = tl.zeros([BLOCK_D], dtype=ACC)
    zero_d = tl.zeros([BLOCK_D, 1], dtype=tl.int64)
    for t0 in range(t_lo, t_hi, BLOCK_L):
        t = t0 + tl.arange(0, BLOCK_L)
        tt = t[None, :] + zero_d
        m = mask_d[:, None] & (t < t_hi)[None, :]
        gp = _conv_grad_pre(x_row, init_row, w_row, go_row, bias, tt, start, m, mask_d, x_stride_l,
                            init_stride_l, w_stride_k, go_stride_l, W, HAS_INIT, SILU, ACC)  # fmt: skip
        acc_b += tl.sum(gp, axis=1)
        gx = tl.zeros([BLOCK_D, BLOCK_L], dtype=ACC)
        for k in tl.static_range(W):
            v = _conv_input(
                x_row, init_row, tt - (W - 1) + k, start, m, x_stride_l, init_stride_l, W, HAS_INIT
            )
            acc_w += tl.where(kk[None, :] == k, tl.sum(gp * v.to(ACC), axis=1)[:, None], 0.0)
            # output t + s reads this input through tap W-1-s
            s = W - 1 - k
            if s == 0:
                gs = gp
            else:
                ms = m & (tt + s < end)
                gs = _conv_grad_pre(x_row, init_row, w_row, go_row, bias, tt + s, start, ms, mask_d,
                                    x_stride_l, init_stride_l, w_stride_k, go_stride_l, W, HAS_INIT, SILU,
                                    ACC)  # fmt: skip
            wk = tl.load(w_row + k * w_stride_k, mask=mask_d, other=0.0).to(ACC)
            gx += wk[:, None] * gs
        if HAS_GFINAL:
            # the last W-1 inputs are also the final states, entry f = t - end + W - 1
            f = tt - end + W - 1
            gx += tl.load(gfinal_row + f * gfinal_stride_l, mask=m & (f >= 0), other=0.0).to(ACC)
        gx_ptrs = gx_ptr + b * gx_stride_b + d[:, None] * gx_stride_d + t[None, :] * gx_stride_l
        tl.store(gx_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=m)
    p = (row * n_pieces + piece) * dim + d
    tl.store(pw_ptr + p[:, None] * W + kk[None, :], acc_w, mask=mask_d[:, None] & (kk < W)[None, :])
    if HAS_BIAS:
        tl.store(pbias_ptr + p, acc_b, mask=mask_d)
    if HAS_INIT:
        if piece == 0:
            # initial state entry j is xcat[j]: read by outputs j - k through tap k
            j = tl.arange(0, BLOCK_W)
            jj = j[None, :] + zero_d
            mj = mask_d[:, None] & (jj < W - 1)
            gi = tl.zeros([BLOCK_D, BLOCK_W], dtype=ACC)
            for k in tl.static_range(W):
                o = start + jj - k
                mo = mj & (o >= start) & (o < end)
                gs = _conv_grad_pre(x_row, init_row, w_row, go_row, bias, o, start, mo, mask_d,
                                    x_stride_l, init_stride_l, w_stride_k, go_stride_l, W, HAS_INIT, SILU,
                                    ACC)  # fmt: skip
                wk = tl.load(w_row + k * w_stride_k, mask=mask_d, other=0.0).to(ACC)
                gi += wk[:, None] * gs
            if HAS_GFINAL:
                # a row shorter than W-1 keeps initial entries in its final states: entry j - len
                f = jj - (end - start)
                gi += tl.load(gfinal_row + f * gfinal_stride_l, mask=mj & (f >= 0), other=0.0).to(ACC)
            ginit_ptrs = (
                ginit_ptr + row * ginit_stride_r + d[:, None] * ginit_stride_d + j[None, :] * ginit_stride_l
            )
            tl.store(ginit_ptrs, gi.to(ginit_ptr.dtype.element_ty), mask=mj)


def _conv_blocks(dim, L):
    bl = col_block(L)
    bd = min(_np2(dim), row_block(bl))
    return bd, bl


def _conv_pieces(rows, dim, L, bd, bl):
    # Split rows along time until the grid has about PROGRAMS programs; a
    # function of the shapes only, so the partials (and their sum) are too.
    per_row = rows * triton.cdiv(dim, bd)
    return max(1, min(triton.cdiv(L, bl), triton.cdiv(PROGRAMS, per_row)))


@on_device
def causal_conv1d_fwd(x, weight, bias, initial_states, silu, cu_seqlens):
    """Depthwise causal convolution: ``out[t] = act(bias + sum_k weight[:, k] x[t - (width-1) + k])``.

    Args:
        x: [batch, dim, L] (T).  weight: [dim, width] (acc).  bias: None or [dim] (acc).
        initial_states: None or [rows, dim, width - 1] (T), the inputs before each row.
        silu: apply SiLU.  cu_seqlens: None or int64 [S + 1] (batch 1; rows = S).

    Returns:
        out [batch, dim, L] (T) and the final states [rows, dim, width - 1] (T).

    Example::

        >>> out, final = causal_conv1d_fwd(x, w, b, None, True, None)
    """
    batch, dim, L = x.shape
    W = weight.shape[1]
    _check_cu(cu_seqlens, L, batch)
    rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    final = torch.empty((rows, dim, W - 1), dtype=x.dtype, device=x.device)
    if rows == 0 or dim == 0:
        return out, final
    bd, bl = _conv_blocks(dim, L)
    pieces = _conv_pieces(rows, dim, L, bd, bl)
    dummy = x
    _causal_conv1d_fwd_kernel[(rows, triton.cdiv(dim, bd), pieces)](
        x, weight, _arg(bias, dummy), _arg(initial_states, dummy),
        _arg(cu_seqlens, dummy), out, final,
        L, dim, pieces,
        *x.stride(), *weight.stride(), *_strides(bias, 1),
        *_strides(initial_states, 3),
        *out.stride(), *final.stride(),
        W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None, SILU=bool(silu),
        VARLEN=cu_seqlens is not None, ACC=acc_type(x.dtype), BLOCK_D=bd, BLOCK_L=bl, BLOCK_W=_np2(W - 1),
        num_warps=num_warps(bd, bl),
    )  # fmt: skip
    return out, final


@on_device
def causal_conv1d_bwd(x, weight, bias, initial_states, silu, cu_seqlens, grad_out, grad_final_states):
    """Gradients of :func:`causal_conv1d_fwd`, deterministic (no atomics).

    Args:
        as :func:`causal_conv1d_fwd`; grad_out [batch, dim, L] (T) and
        grad_final_states None or [rows, dim, width - 1] (T).

    Returns:
        (grad_x, grad_weight, grad_bias, grad_initial_states) in their inputs'
        dtypes and shapes; an empty [0] for an input that was None.

    Example::

        >>> gx, gw, gb, g0 = causal_conv1d_bwd(x, w, b, None, True, None, g, None)
    """
    batch, dim, L = x.shape
    W = weight.shape[1]
    _check_cu(cu_seqlens, L, batch)
    rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dev, acc = x.device, acc_dtype(x.dtype)
    if rows == 0 or dim == 0:
        zero = lambda t: absent(x) if t is None else torch.zeros_like(t)
        return tuple(zero(t) for t in (x, weight, bias, initial_states))
    bd, bl = _conv_blocks(dim, L)
    pieces = _conv_pieces(rows, dim, L, bd, bl)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=dev)
    grad_init = None
    if initial_states is not None:
        grad_init = torch.empty(initial_states.shape, dtype=initial_states.dtype, device=dev)
    pw = torch.empty((rows, pieces, dim, W), dtype=acc, device=dev)
    pb = torch.empty((rows, pieces, dim), dtype=acc, device=dev) if bias is not None else None
    # W == 1: there are no states, and grad_final_states is [rows, dim, 0]
    has_gfinal = grad_final_states is not None and W > 1
    dummy = x
    _causal_conv1d_bwd_kernel[(rows, triton.cdiv(dim, bd), pieces)](
        x, weight, _arg(bias, dummy), _arg(initial_states, dummy),
        _arg(cu_seqlens, dummy), grad_out, grad_final_states if has_gfinal else dummy,
        grad_x, _arg(grad_init, dummy), pw, _arg(pb, dummy),
        L, dim, pieces,
        *x.stride(), *weight.stride(), *_strides(bias, 1),
        *_strides(initial_states, 3),
        *grad_out.stride(),
        *(grad_final_states.stride() if has_gfinal else (0, 0, 0)),
        *grad_x.stride(),
        *_strides(grad_init, 3),
        W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None, HAS_GFINAL=has_gfinal,
        SILU=bool(silu), VARLEN=cu_seqlens is not None, ACC=acc_type(x.dtype),
        BLOCK_D=bd, BLOCK_L=bl, BLOCK_W=_np2(W), num_warps=num_warps(bd, bl),
    )  # fmt: skip
    # the partials summed over (row, piece) in a fixed order, whatever the scheduling
    return (
        grad_x,
        pw.sum((0, 1)).to(weight.dtype),
        pb.sum((0, 1)).to(bias.dtype) if bias is not None else absent(x),
        grad_init if grad_init is not None else absent(x),
    )


# ---------------------------------------------------------------------------
# decoding steps
# ---------------------------------------------------------------------------
@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, idx_ptr, y_ptr,
    nheads, headdim, N, heads_per_group,
    state_stride_r, state_stride_h, state_stride_p, state_stride_n,
    x_stride_b, x_stride_h, x_stride_p,
    dt_stride_b, dt_stride_h, dt_stride_p,
    A_stride_h, A_stride_p, A_stride_n,
    B_stride_b, B_stride_g, B_stride_n,
    C_stride_b, C_stride_g, C_stride_n,
    D_stride_h, D_stride_p,
    z_stride_b, z_stride_h, z_stride_p,
    dt_bias_stride_h, dt_bias_stride_p,
    y_stride_b, y_stride_h, y_stride_p,
    HAS_D: tl.constexpr,  # constexpr flags: absent options must not load anything
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_IDX: tl.constexpr,  # constexpr: batch entry b updates row state_batch_indices[b] of a larger cache
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One step of the scan, one program per (batch entry, block of heads, block of headdim).

      h = exp(dt A) h + dt x B[group],  y = (sum_n C[group] h + D x) silu(z)

    Head h reads group h // heads_per_group.  Every state element is read and
    written by this program only; y uses the new state before it is rounded
    to the state's dtype, as the reference does.
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    mask_h = h < nheads
    mask_n = n < N
    m2 = mask_h[:, None] & (p < headdim)[None, :]
    m3 = m2[:, :, None] & mask_n[None, None, :]
    if HAS_IDX:
        r = tl.load(idx_ptr + b)
    else:
        r = b
    g = h // heads_per_group
    hh = h[:, None]
    pp = p[None, :]
    s_ptrs = (
        state_ptr
        + r * state_stride_r
        + h[:, None, None] * state_stride_h
        + p[None, :, None] * state_stride_p
        + n[None, None, :] * state_stride_n
    )
    s = tl.load(s_ptrs, mask=m3, other=0.0).to(ACC)
    x = tl.load(x_ptr + b * x_stride_b + hh * x_stride_h + pp * x_stride_p, mask=m2, other=0.0).to(ACC)
    dt = tl.load(dt_ptr + b * dt_stride_b + hh * dt_stride_h + pp * dt_stride_p, mask=m2, other=0.0).to(ACC)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + hh * dt_bias_stride_h + pp * dt_bias_stride_p, mask=m2, other=0.0).to(ACC)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(
        A_ptr + h[:, None, None] * A_stride_h + p[None, :, None] * A_stride_p + n[None, None, :] * A_stride_n,
        mask=m3,
        other=0.0,
    ).to(ACC)
    mgn = mask_h[:, None] & mask_n[None, :]
    Bv = tl.load(
        B_ptr + b * B_stride_b + g[:, None] * B_stride_g + n[None, :] * B_stride_n, mask=mgn, other=0.0
    )
    Cv = tl.load(
        C_ptr + b * C_stride_b + g[:, None] * C_stride_g + n[None, :] * C_stride_n, mask=mgn, other=0.0
    )
    s = tl.exp(dt[:, :, None] * A) * s + (dt * x)[:, :, None] * Bv.to(ACC)[:, None, :]
    y = tl.sum(s * Cv.to(ACC)[:, None, :], axis=2)
    if HAS_D:
        y += tl.load(D_ptr + hh * D_stride_h + pp * D_stride_p, mask=m2, other=0.0).to(ACC) * x
    if HAS_Z:
        zz = tl.load(z_ptr + b * z_stride_b + hh * z_stride_h + pp * z_stride_p, mask=m2, other=0.0).to(ACC)
        y = y * (zz * _sigmoid(zz))
    # every thread's reads of the state happen before any thread writes it
    tl.debug_barrier()
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=m3)
    tl.store(
        y_ptr + b * y_stride_b + hh * y_stride_h + pp * y_stride_p, y.to(y_ptr.dtype.element_ty), mask=m2
    )


@on_device
def selective_state_update_fwd(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    """One decoding step of the selective scan; ``state`` is updated in place.

    Args:
        state: [rows, nheads, headdim, N], any float dtype (may be a view).
        x, dt, z: [batch, nheads, headdim] (T; z may be None).
        A: [nheads, headdim, N] (acc).  B, C: [batch, ngroups, N] (T).
        D, dt_bias: None or [nheads, headdim] (acc).  dt_softplus: softplus(dt + dt_bias).
        state_batch_indices: None (rows == batch) or int64 [batch], distinct rows.

    Returns:
        y [batch, nheads, headdim] (T).

    Example::

        >>> y = selective_state_update_fwd(state, x, dt, A, B, C, None, None, None, True, None)
    """
    batch, nheads, headdim = x.shape
    N = state.shape[-1]
    if state_batch_indices is not None:
        # imported here: frontiers_fast.ops.ssm names this module's launchers
        from frontiers_fast.ops.ssm import check_state_batch_indices

        check_state_batch_indices(state_batch_indices, state.shape[0])
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    ngroups = B.shape[1]
    bn = _np2(N)
    bp = min(_np2(headdim), max(1, SCAN_TILE // bn))
    bh = max(1, min(_np2(nheads), SCAN_TILE // (bn * bp)))
    dummy = x
    _selective_state_update_kernel[(batch, triton.cdiv(nheads, bh), triton.cdiv(headdim, bp))](
        state, x, dt, A, B, C, _arg(D, dummy), _arg(z, dummy),
        _arg(dt_bias, dummy),
        _arg(state_batch_indices, dummy), y,
        nheads, headdim, N, nheads // ngroups,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides(D, 2),
        *_strides(z, 3), *_strides(dt_bias, 2), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_IDX=state_batch_indices is not None, ACC=acc_type(x.dtype),
        BLOCK_H=bh, BLOCK_P=bp, BLOCK_N=bn, num_warps=num_warps(bh * bp, bn),
    )  # fmt: skip
    return y


@triton.jit
def _causal_conv1d_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr,
    dim, Lx, S,
    x_stride_b, x_stride_d, x_stride_l,
    state_stride_b, state_stride_d, state_stride_s,
    w_stride_d, w_stride_k, bias_stride,
    out_stride_b, out_stride_d, out_stride_l,
    W: tl.constexpr,  # constexpr: the filter's taps are unrolled
    HAS_BIAS: tl.constexpr,  # constexpr: without a bias nothing is loaded
    SILU: tl.constexpr,
    ACC: tl.constexpr,  # constexpr: a dtype (float32, or float64 for float64 inputs)
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Lx steps of the causal convolution from a rolling state, one program per (batch entry, channel block).

    With xcat = [state (S), x (Lx)]: out[t] = act(bias + sum_k w[k] xcat[S + t - (W-1) + k])
    and the new state is xcat[Lx:].  The new state is a shifted copy of the
    old one, so everything is read before the state is written.
    """
    b = tl.program_id(0).to(tl.int64)
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask_d = d < dim
    x_row = x_ptr + b * x_stride_b + d[:, None] * x_stride_d
    s_row = state_ptr + b * state_stride_b + d[:, None] * state_stride_d
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d * bias_stride, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros([BLOCK_D], dtype=ACC)
    for t0 in range(0, Lx, BLOCK_L):
        t = t0 + tl.arange(0, BLOCK_L)
        m = mask_d[:, None] & (t < Lx)[None, :]
        acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=ACC) + bias[:, None]
        for k in tl.static_range(W):
            i = (S + t - (W - 1) + k)[None, :]
            old = tl.load(s_row + i * state_stride_s, mask=m & (i < S), other=0.0)
            new = tl.load(x_row + (i - S) * x_stride_l, mask=m & (i >= S), other=0.0)
            wk = tl.load(w_ptr + d * w_stride_d + k * w_stride_k, mask=mask_d, other=0.0).to(ACC)
            acc += wk[:, None] * tl.where(i < S, old.to(ACC), new.to(ACC))
        if SILU:
            acc = acc * _sigmoid(acc)
        tl.store(
            out_ptr + b * out_stride_b + d[:, None] * out_stride_d + t[None, :] * out_stride_l,
            acc.to(out_ptr.dtype.element_ty),
            mask=m,
        )
    j = tl.arange(0, BLOCK_S)
    mj = mask_d[:, None] & (j < S)[None, :]
    i = (Lx + j)[None, :]
    old = tl.load(s_row + i * state_stride_s, mask=mj & (i < S), other=0.0)
    new = tl.load(x_row + (i - S) * x_stride_l, mask=mj & (i >= S), other=0.0)
    shifted = tl.where(i < S, old.to(state_ptr.dtype.element_ty), new.to(state_ptr.dtype.element_ty))
    # every thread's reads of the state happen before any thread writes it
    tl.debug_barrier()
    tl.store(s_row + j[None, :] * state_stride_s, shifted, mask=mj)


@on_device
def causal_conv1d_update_fwd(x, conv_state, weight, bias, silu):
    """Decoding step(s) of the causal convolution; ``conv_state`` is updated in place.

    Args:
        x: [batch, dim] or [batch, dim, L] (T).  conv_state: [batch, dim, S], S >= width - 1,
            the last S inputs, oldest first (may be a view).
        weight: [dim, width] (acc).  bias: None or [dim] (acc).  silu: apply SiLU.

    Returns:
        out with x's shape (T).

    Example::

        >>> out = causal_conv1d_update_fwd(x, conv_state, w, b, True)
    """
    one_step = x.dim() == 2
    xs = x.unsqueeze(-1) if one_step else x
    batch, dim, Lx = xs.shape
    S, W = conv_state.shape[-1], weight.shape[1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if batch == 0 or dim == 0 or Lx == 0:
        return out
    outs = out.unsqueeze(-1) if one_step else out
    bl = min(_np2(Lx), 64)
    bs = _np2(S)
    bd = min(_np2(dim), max(1, 4096 // max(bl, bs)), 256)
    _causal_conv1d_update_kernel[(batch, triton.cdiv(dim, bd))](
        xs, conv_state, weight, _arg(bias, x), outs,
        dim, Lx, S,
        *xs.stride(), *conv_state.stride(), *weight.stride(), *_strides(bias, 1), *outs.stride(),
        W=W, HAS_BIAS=bias is not None, SILU=bool(silu), ACC=acc_type(x.dtype),
        BLOCK_D=bd, BLOCK_L=bl, BLOCK_S=bs, num_warps=num_warps(bd, max(bl, bs)),
    )  # fmt: skip
    return out

"""Reference selective state-space ops (Mamba, Gu & Dao 2023, arXiv:2312.00752).

The layout and semantics are those of mamba_ssm's ``selective_scan_fn`` and
causal-conv1d's ``causal_conv1d_fn`` / ``causal_conv1d_update``:

* ``u``, ``delta``, ``z``: [batch, dim, L]; ``A``: [dim, N] (real);
  ``D``, ``delta_bias``: [dim].
* ``B`` and ``C`` each come in one of three layouts, told apart by their
  number of dimensions: constant [dim, N], variable [batch, N, L], or grouped
  [batch, G, N, L], where channel ``d`` reads group ``d // (dim // G)``.
* The scan, per channel d and state n::

      delta  = softplus(delta + delta_bias)        (softplus optional; x when x > 20)
      h[t]   = exp(delta[t] A) h[t-1] + delta[t] B[t] u[t]      h[-1] = initial_state or 0
      out[t] = (sum_n C[t, n] h[t, n] + D u[t]) * silu(z[t])

Everything is computed in float32, or in float64 when any input is float64
(so the references can be gradient-checked), and returned in the dtype of
``u`` (``x`` for the convolution); the scan's last state stays in the compute
dtype.  The recurrence is a Python loop over time steps; everything else is
vectorised.  The backward formulas are written out (``selective_scan_bwd``,
``causal_conv1d_bwd``) because the registered backward ops run below the
autograd dispatch key, where autograd cannot be re-entered; the tests check
them against autograd through the forward references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# torch.nn.functional.softplus switches to the identity above this input, as
# mamba_ssm's kernels do; the backward uses the same switch.
SOFTPLUS_THRESHOLD = 20.0


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _per_step(M: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """B or C in time-major form, broadcastable to [L, batch, dim, N]."""
    M = M.to(dtype)
    if M.dim() == 2:  # constant [dim, N]
        return M.unsqueeze(0).unsqueeze(0)
    if M.dim() == 3:  # variable [batch, N, L]: shared by every channel
        return M.permute(2, 0, 1).unsqueeze(2)
    # grouped [batch, G, N, L]: each group serves dim // G consecutive channels
    return M.permute(3, 0, 1, 2).repeat_interleave(dim // M.shape[1], dim=2)


def _contract(X: Tensor, M: Tensor) -> Tensor:
    """sum_n X[t, b, d, n] M[..., n] with B or C in its own layout: [L, batch, dim]."""
    if M.dim() == 2:
        return torch.einsum("tbdn,dn->tbd", X, M.to(X.dtype))
    if M.dim() == 3:
        return torch.einsum("tbdn,bnt->tbd", X, M.to(X.dtype))
    L, batch, dim, N = X.shape
    G = M.shape[1]
    out = torch.einsum("tbgkn,bgnt->tbgk", X.view(L, batch, G, dim // G, N), M.to(X.dtype))
    return out.reshape(L, batch, dim)


def _contract_grad(w: Tensor, X: Tensor, M: Tensor) -> Tensor:
    """Gradient of sum(w * _contract(X, M)) with respect to M, in M's layout and dtype."""
    if M.dim() == 2:
        return torch.einsum("tbd,tbdn->dn", w, X).to(M.dtype)
    if M.dim() == 3:
        return torch.einsum("tbd,tbdn->bnt", w, X).to(M.dtype)
    L, batch, dim, N = X.shape
    G = M.shape[1]
    g = torch.einsum("tbgk,tbgkn->bgnt", w.view(L, batch, G, dim // G), X.view(L, batch, G, dim // G, N))
    return g.to(M.dtype)


def _discretize(u, delta, A, B, delta_bias, delta_softplus, ct):
    """delta before and after softplus, exp(delta A) and delta B u, time-major."""
    dim = u.shape[1]
    dt_raw = delta.to(ct).permute(2, 0, 1)  # [L, batch, dim]
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.to(ct)
    dt = F.softplus(dt_raw, threshold=SOFTPLUS_THRESHOLD) if delta_softplus else dt_raw
    u_t = u.to(ct).permute(2, 0, 1)
    dA = torch.exp(dt.unsqueeze(-1) * A.to(ct))  # [L, batch, dim, N]
    dBu = (dt * u_t).unsqueeze(-1) * _per_step(B, dim, ct)
    return dt_raw, dt, u_t, dA, dBu


def _recurrence(dA: Tensor, dBu: Tensor, h0: Tensor) -> Tensor:
    """All states h[t] = dA[t] h[t-1] + dBu[t], stacked: [L, batch, dim, N]."""
    h, states = h0, []
    # unbind, not dA[t]: autograd then stacks the step gradients once instead
    # of scattering each into a full-size zero tensor (quadratic in L).
    for dA_t, dBu_t in zip(dA.unbind(0), dBu.unbind(0)):  # the recurrence is the one sequential part
        h = torch.addcmul(dBu_t, dA_t, h)
        states.append(h)
    return torch.stack(states)


def _initial(initial_state, u, A, ct):
    if initial_state is not None:
        return initial_state.to(ct)
    return torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=ct, device=u.device)


def _offsets(cu_seqlens: Tensor) -> list[int]:
    return [int(v) for v in cu_seqlens.tolist()]


def _sequences(cu_seqlens, initial_state, *steps):
    """(s, {name: piece}) for each packed sequence s: the per-step tensors cut along L.

    ``steps`` are the per-step tensors in the order u, delta, B, C, z (or x for
    the convolution); constant [dim, N] B and C and None pass through whole.
    """
    names = ("u", "delta", "B", "C", "z") if len(steps) == 5 else ("x",)
    cu = _offsets(cu_seqlens)
    for s in range(len(cu) - 1):
        cut = lambda t: t if t is None or t.dim() == 2 else t[..., cu[s] : cu[s + 1]]
        piece = {n: cut(t) for n, t in zip(names, steps)}
        piece["initial_state"] = None if initial_state is None else initial_state[s : s + 1]
        yield s, piece


def _packed_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out, grad_last_state,
                cu_seqlens):  # fmt: skip
    per_step = {"u": [], "delta": [], "B": [], "C": [], "z": []}
    shared = {"A": None, "B": None, "C": None, "D": None, "delta_bias": None}
    init = []
    cu = _offsets(cu_seqlens)
    for s, piece in _sequences(cu_seqlens, initial_state, u, delta, B, C, z):
        g_last = None if grad_last_state is None else grad_last_state[s : s + 1]
        g = selective_scan_bwd(piece["u"], piece["delta"], A, piece["B"], piece["C"], D, piece["z"], delta_bias,
                               delta_softplus, piece["initial_state"], grad_out[..., cu[s] : cu[s + 1]], g_last)  # fmt: skip
        gu, gdt, gA, gB, gC, gD, gz, gbias, g0 = g
        per_step["u"].append(gu)
        per_step["delta"].append(gdt)
        per_step["z"].append(gz)
        for name, value, M in (("B", gB, B), ("C", gC, C)):
            (shared if M.dim() == 2 else per_step)[name] = (
                _acc(shared[name], value) if M.dim() == 2 else per_step[name] + [value]
            )
        for name, value in (("A", gA), ("D", gD), ("delta_bias", gbias)):
            shared[name] = _acc(shared[name], value)
        init.append(g0)
    cat = lambda xs: None if xs[0] is None else torch.cat(xs, dim=-1)
    grad = lambda name, M: shared[name] if M.dim() == 2 else cat(per_step[name])
    return (
        cat(per_step["u"]),
        cat(per_step["delta"]),
        shared["A"],
        grad("B", B),
        grad("C", C),
        shared["D"],
        cat(per_step["z"]) if z is not None else None,
        shared["delta_bias"],
        torch.cat(init) if initial_state is not None else None,
    )


def _acc(total, value):
    if value is None:
        return None
    return value if total is None else total + value


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
):
    """Selective scan (S6), differentiable by autograd.

    Args:
        u, delta: [batch, dim, L].  A: [dim, N].  B, C: [dim, N], [batch, N, L]
            or [batch, G, N, L].  D, delta_bias: [dim].  z: [batch, dim, L].
        initial_state: [batch, dim, N], the state before the first step
            ([S, dim, N], one per sequence, with ``cu_seqlens``).
        cu_seqlens: [S + 1] offsets of S packed sequences along L (batch 1):
            each sequence is scanned on its own, from its own initial state.

    Returns:
        out [batch, dim, L] in u's dtype; with ``return_last_state`` also the
        state after the last step, [batch, dim, N] in float32 (float64 when an
        input is float64).

    Example::

        >>> out = selective_scan(torch.randn(2, 4, 9), torch.rand(2, 4, 9), -torch.rand(4, 3),
        ...                      torch.randn(2, 3, 9), torch.randn(2, 3, 9))
    """
    if cu_seqlens is not None:
        outs, lasts = [], []
        for _, piece in _sequences(cu_seqlens, initial_state, u, delta, B, C, z):
            o, h = selective_scan(piece["u"], piece["delta"], A, piece["B"], piece["C"], D, piece["z"],
                                  delta_bias, delta_softplus, True, piece["initial_state"])  # fmt: skip
            outs.append(o)
            lasts.append(h)
        out = torch.cat(outs, dim=-1)
        return (out, torch.cat(lasts)) if return_last_state else out
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.shape[-1] == 0:  # an empty packed sequence: no step, the state stays
        h0 = _initial(initial_state, u, A, ct)
        out = u.new_empty(u.shape)
        return (out, h0) if return_last_state else out
    _, _, u_t, dA, dBu = _discretize(u, delta, A, B, delta_bias, delta_softplus, ct)
    H = _recurrence(dA, dBu, _initial(initial_state, u, A, ct))
    y = _contract(H, C)  # [L, batch, dim]
    if D is not None:
        y = y + D.to(ct) * u_t
    out = y.permute(1, 2, 0)
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(u.dtype)
    return (out, H[-1]) if return_last_state else out


def selective_scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out, grad_last_state=None,
    cu_seqlens=None,
):  # fmt: skip
    """Gradients of :func:`selective_scan` (with the last state as a second output).

    The adjoint state runs backwards in time:
    ``lam[t] = C[t] g_y[t] + exp(delta[t+1] A) lam[t+1]`` with
    ``lam[L-1] = C[L-1] g_y[L-1] + grad_last_state``; then
    ``d h[t-1]`` and every parameter gradient follow from ``lam`` and the
    recomputed states.

    Returns:
        (grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z,
        grad_delta_bias, grad_initial_state), each in its input's dtype and
        layout; None for an input that was None.  With ``cu_seqlens`` each
        sequence's gradients are computed on their own; those of the shared
        parameters are summed over the sequences.
    """
    if cu_seqlens is not None:
        return _packed_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out,
                           grad_last_state, cu_seqlens)  # fmt: skip
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dim = u.shape[1]
    if u.shape[-1] == 0:  # an empty packed sequence: only the state passes through
        g0 = (
            torch.zeros_like(_initial(initial_state, u, A, ct))
            if grad_last_state is None
            else grad_last_state
        )
        zero = lambda t: None if t is None else torch.zeros_like(t)
        return (zero(u), zero(delta), zero(A), zero(B), zero(C), zero(D), zero(z), zero(delta_bias),
                g0.to(initial_state.dtype) if initial_state is not None else None)  # fmt: skip
    dt_raw, dt, u_t, dA, dBu = _discretize(u, delta, A, B, delta_bias, delta_softplus, ct)
    h0 = _initial(initial_state, u, A, ct)
    H = _recurrence(dA, dBu, h0)

    g = grad_out.to(ct).permute(2, 0, 1)  # [L, batch, dim]
    grad_z = None
    if z is not None:
        z_t = z.to(ct).permute(2, 0, 1)
        y = _contract(H, C)
        if D is not None:
            y = y + D.to(ct) * u_t
        sig = torch.sigmoid(z_t)
        grad_z = (g * y * sig * (1 + z_t * (1 - sig))).permute(1, 2, 0).to(z.dtype)
        g = g * z_t * sig
    grad_u = torch.zeros_like(u_t)
    grad_D = None
    if D is not None:
        grad_D = (g * u_t).sum((0, 1)).to(D.dtype)
        grad_u = grad_u + g * D.to(ct)
    grad_C = _contract_grad(g, H, C)

    # Adjoint of the states, backwards in time.
    gyC = g.unsqueeze(-1) * _per_step(C, dim, ct)
    lam = torch.zeros_like(h0) if grad_last_state is None else grad_last_state.to(ct)
    lams = [None] * dA.shape[0]
    for t in range(dA.shape[0] - 1, -1, -1):
        lam = lam + gyC[t]
        lams[t] = lam
        lam = lam * dA[t]
    grad_h0 = lam
    Lam = torch.stack(lams)

    H_prev = torch.cat([h0.unsqueeze(0), H[:-1]])
    g_dtA = Lam * H_prev * dA  # gradient of the exponent delta[t] * A
    grad_A = (g_dtA * dt.unsqueeze(-1)).sum((0, 1)).to(A.dtype)
    lam_B = _contract(Lam, B)
    grad_dt = (g_dtA * A.to(ct)).sum(-1) + lam_B * u_t
    grad_u = grad_u + lam_B * dt
    grad_B = _contract_grad(dt * u_t, Lam, B)
    if delta_softplus:
        grad_dt = grad_dt * torch.where(
            dt_raw > SOFTPLUS_THRESHOLD, torch.ones_like(dt_raw), torch.sigmoid(dt_raw)
        )
    grad_delta_bias = grad_dt.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
    return (
        grad_u.permute(1, 2, 0).to(u.dtype),
        grad_dt.permute(1, 2, 0).to(delta.dtype),
        grad_A,
        grad_B,
        grad_C,
        grad_D,
        grad_z,
        grad_delta_bias,
        grad_h0.to(initial_state.dtype) if initial_state is not None else None,
    )


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: Tensor | None = None,
) -> Tensor:
    """One decoding step of :func:`selective_scan`; ``state`` is updated in place.

    Two forms, told by ``state.dim()``:

    * 3-D: state [batch, dim, N]; x, dt, z [batch, dim]; A [dim, N]; B, C
      [batch, N] or grouped [batch, G, N]; D, dt_bias [dim].
    * multi-head (mamba_ssm's): state [batch, nheads, headdim, N]; x, dt, z
      [batch, nheads, headdim]; A [nheads, headdim, N]; B, C [batch, N] or
      [batch, ngroups, N] (head h reads group h // (nheads // ngroups));
      D, dt_bias [nheads, headdim].

    ``state_batch_indices`` [batch]: batch entry b reads and writes row
    ``state_batch_indices[b]`` of a larger state cache (distinct rows).

    Returns:
        y with x's shape and dtype.

    Example::

        >>> state = torch.zeros(2, 4, 3)
        >>> y = selective_state_update(state, torch.randn(2, 4), torch.rand(2, 4), -torch.rand(4, 3),
        ...                            torch.randn(2, 3), torch.randn(2, 3))
    """
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    if state.dim() == 3:  # the 3-D form is the multi-head one with one channel per head
        B = B.unsqueeze(1) if B.dim() == 2 else B
        C = C.unsqueeze(1) if C.dim() == 2 else C
        one = lambda t: None if t is None else t.unsqueeze(-1)
        y = selective_state_update(state.unsqueeze(2), one(x), one(dt), A.unsqueeze(1), B, C, one(D), one(z),
                                   one(dt_bias), dt_softplus, state_batch_indices)  # fmt: skip
        return y.squeeze(-1)
    nheads = x.shape[1]

    def per_head(M):  # [batch, N] or [batch, ngroups, N] -> broadcastable to [batch, nheads, headdim, N]
        M = M.to(ct)
        M = M.unsqueeze(1) if M.dim() == 2 else M.repeat_interleave(nheads // M.shape[1], dim=1)
        return M.unsqueeze(2)

    rows = state if state_batch_indices is None else state[state_batch_indices]
    dtc = dt.to(ct)
    if dt_bias is not None:
        dtc = dtc + dt_bias.to(ct)
    if dt_softplus:
        dtc = F.softplus(dtc, threshold=SOFTPLUS_THRESHOLD)
    xc = x.to(ct)
    h = torch.exp(dtc.unsqueeze(-1) * A.to(ct)) * rows.to(ct) + (dtc * xc).unsqueeze(-1) * per_head(B)
    if state_batch_indices is None:
        state.copy_(h)
    else:
        state[state_batch_indices] = h.to(state.dtype)
    y = (h * per_head(C)).sum(-1)
    if D is not None:
        y = y + D.to(ct) * xc
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype)


def _correlate(xcat: Tensor, w: Tensor) -> Tensor:
    """out[b, d, t] = sum_k w[d, k] xcat[b, d, t + k], for t < len - width + 1.

    One shifted multiply-add per filter tap (width is small, 2 to 4 in
    Mamba) rather than a grouped F.conv1d, whose CPU path for a depthwise
    filter is slow to start and stalls when threads are contended.
    """
    n = xcat.shape[-1] - w.shape[1] + 1
    out = xcat[..., :n] * w[:, :1]
    for k in range(1, w.shape[1]):
        out = torch.addcmul(out, xcat[..., k : k + n], w[:, k : k + 1])
    return out


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    cu_seqlens: Tensor | None = None,
):
    """Depthwise causal convolution: ``out[t] = sum_k weight[:, k] x[t - (width-1) + k] + bias``.

    Inputs before the start are ``initial_states`` (zeros if None), so
    ``weight[:, -1]`` multiplies the current input.

    Args:
        x: [batch, dim, L].  weight: [dim, width].  bias: [dim].
        activation: None or ``"silu"`` (``"swish"`` is the same).
        initial_states: [batch, dim, width - 1], the inputs just before x
            ([S, dim, width - 1], one per sequence, with ``cu_seqlens``).
        cu_seqlens: [S + 1] offsets of S packed sequences along L (batch 1):
            no sequence sees the inputs of the one before it.

    Returns:
        out [batch, dim, L] in x's dtype; with ``return_final_states`` also the
        last width - 1 inputs (initial states included, zeros where the
        sequence is shorter), [batch, dim, width - 1], ready to be passed as
        the next call's ``initial_states``.

    Example::

        >>> out = causal_conv1d(torch.randn(2, 8, 30), torch.randn(8, 4), activation="silu")
    """
    if cu_seqlens is not None:
        pieces = [
            causal_conv1d(p["x"], weight, bias, activation, p["initial_state"], True)
            for _, p in _sequences(cu_seqlens, initial_states, x)
        ]
        out = torch.cat([o for o, _ in pieces], dim=-1)
        return (out, torch.cat([f for _, f in pieces])) if return_final_states else out
    ct = compute_dtype(x, weight, bias, initial_states)
    batch, dim, _ = x.shape
    width = weight.shape[1]
    if initial_states is None:
        past = torch.zeros(batch, dim, width - 1, dtype=ct, device=x.device)
    else:
        past = initial_states.to(ct)
    xcat = torch.cat([past, x.to(ct)], dim=-1)
    out = _correlate(xcat, weight.to(ct))
    if bias is not None:
        out = out + bias.to(ct).unsqueeze(-1)
    if activation is not None:
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    return out, xcat[..., xcat.shape[-1] - (width - 1) :].to(x.dtype)


def causal_conv1d_bwd(
    x, weight, bias, activation, initial_states, grad_out, grad_final_states=None, cu_seqlens=None
):
    """Gradients of :func:`causal_conv1d` (with the final states as a second output).

    Returns:
        (grad_x, grad_weight, grad_bias, grad_initial_states), each in its
        input's dtype; None for an input that was None.  With ``cu_seqlens``
        the sequences are differentiated one by one and the filter's
        gradients summed.
    """
    if cu_seqlens is not None:
        cu = _offsets(cu_seqlens)
        gx, gw, gb, g0 = [], None, None, []
        for s, p in _sequences(cu_seqlens, initial_states, x):
            g_final = None if grad_final_states is None else grad_final_states[s : s + 1]
            a, w_, b_, i_ = causal_conv1d_bwd(p["x"], weight, bias, activation, p["initial_state"],
                                              grad_out[..., cu[s] : cu[s + 1]], g_final)  # fmt: skip
            gx.append(a)
            g0.append(i_)
            gw, gb = _acc(gw, w_), _acc(gb, b_)
        return torch.cat(gx, dim=-1), gw, gb, (torch.cat(g0) if initial_states is not None else None)
    ct = compute_dtype(x, weight, bias, initial_states)
    batch, dim, _ = x.shape
    width = weight.shape[1]
    if initial_states is None:
        past = torch.zeros(batch, dim, width - 1, dtype=ct, device=x.device)
    else:
        past = initial_states.to(ct)
    xcat = torch.cat([past, x.to(ct)], dim=-1)
    w = weight.to(ct)
    g = grad_out.to(ct)
    if activation is not None:
        pre = _correlate(xcat, w)
        if bias is not None:
            pre = pre + bias.to(ct).unsqueeze(-1)
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    grad_bias = g.sum((0, 2)).to(bias.dtype) if bias is not None else None
    # Tap k reads xcat[..., k : k + L]; per tap, so that any L (0 and L < width - 1 too) works.
    L = g.shape[-1]
    grad_weight = torch.stack(
        [torch.einsum("bdt,bdt->d", g, xcat[..., k : k + L]) for k in range(width)], dim=-1
    ).to(weight.dtype)
    # Each input feeds `width` outputs: correlating the zero-padded output
    # gradient with the flipped filter gathers them (a transposed convolution).
    grad_xcat = _correlate(F.pad(g, (width - 1, width - 1)), w.flip(-1))
    if grad_final_states is not None and width > 1:
        tail = grad_xcat[..., grad_xcat.shape[-1] - (width - 1) :] + grad_final_states.to(ct)
        grad_xcat = torch.cat([grad_xcat[..., : grad_xcat.shape[-1] - (width - 1)], tail], dim=-1)
    grad_x = grad_xcat[..., width - 1 :].to(x.dtype)
    grad_init = grad_xcat[..., : width - 1].to(initial_states.dtype) if initial_states is not None else None
    return grad_x, grad_weight, grad_bias, grad_init


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Decoding step(s) of :func:`causal_conv1d`; ``conv_state`` is updated in place.

    ``conv_state`` [batch, dim, S] holds the last S inputs, oldest first, with
    S >= width - 1 (mamba allocates S = width).  The new inputs are appended,
    the output reads the last width inputs, and the state keeps the last S.
    Stepping token by token from ``conv_state = initial_states`` (S = width - 1)
    reproduces :func:`causal_conv1d`.

    Args:
        x: [batch, dim] (one step) or [batch, dim, L] (L steps).
        weight: [dim, width].  bias: [dim].  activation: None or ``"silu"``.

    Returns:
        out with x's shape and dtype.

    Example::

        >>> conv_state = torch.zeros(2, 8, 4)
        >>> y = causal_conv1d_update(torch.randn(2, 8), conv_state, torch.randn(8, 4))
    """
    ct = compute_dtype(x, conv_state, weight, bias)
    one_step = x.dim() == 2
    xs = x.unsqueeze(-1) if one_step else x
    dim, width = weight.shape
    S, steps = conv_state.shape[-1], xs.shape[-1]
    xcat = torch.cat([conv_state.to(ct), xs.to(ct)], dim=-1)
    conv_state.copy_(xcat[..., xcat.shape[-1] - S :])
    window = xcat[..., xcat.shape[-1] - (steps + width - 1) :]
    out = _correlate(window, weight.to(ct))
    if bias is not None:
        out = out + bias.to(ct).unsqueeze(-1)
    if activation is not None:
        out = F.silu(out)
    return (out.squeeze(-1) if one_step else out).to(x.dtype)


__all__ = [
    "causal_conv1d",
    "causal_conv1d_bwd",
    "causal_conv1d_update",
    "compute_dtype",
    "selective_scan",
    "selective_scan_bwd",
    "selective_state_update",
]

"""Reference message passing: scatter/gather over the user's edge list.

Every function takes a :class:`~frontiers_fast.graph.Graph` and uses only
``graph.src``, ``graph.dst`` and the node counts, so it is independent of the
CSR layout the kernels use.  Messages flow from ``src = j`` to ``dst = i``.

Shapes: ``x`` is [N_src, F] or [N_src, H, C]; ``edge_weight`` is [E] or
[E, H] (one weight per head, broadcast over C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._reduce import REDUCES


def _broadcast_weight(w: torch.Tensor, x_src: torch.Tensor) -> torch.Tensor:
    # w [E] or [E, H]; messages [E, F] or [E, H, C]
    return w.reshape(w.shape + (1,) * (x_src.dim() - w.dim()))


def first_arg_extremum(msg, dst, num_dst, reduce):
    """Per destination and feature, the edge (lowest edge id) whose message is the max (min).

    Ties resolve to the first edge so that the routed gradient is well
    defined.  A NaN message is the extremum, as in ``torch.amax``: the first
    NaN edge is chosen, and the output is NaN.  Returns E where the
    destination has no edge.
    """
    E = msg.shape[0]
    idx = dst.view((E,) + (1,) * (msg.dim() - 1)).expand_as(msg)
    m = msg.detach()
    nan = torch.isnan(m)
    amax = "amax" if reduce == "max" else "amin"
    # NaN messages take no part in finding the (non-NaN) extremum...
    neutral = float("-inf") if reduce == "max" else float("inf")
    ext = torch.zeros((num_dst,) + msg.shape[1:], dtype=msg.dtype, device=msg.device)
    ext = ext.scatter_reduce(0, idx, m.masked_fill(nan, neutral), amax, include_self=False)
    hit = (m == ext.gather(0, idx)) & ~nan
    eid = torch.arange(E, device=msg.device).view((E,) + (1,) * (msg.dim() - 1)).expand_as(msg)
    none = torch.full_like(eid, E)

    def first(where):
        out = torch.full((num_dst,) + msg.shape[1:], E, dtype=torch.int64, device=msg.device)
        return out.scatter_reduce(0, idx, torch.where(where, eid, none), "amin", include_self=True)

    # ... but the first of them, if there is one, wins.
    first_nan = first(nan)
    return torch.where(first_nan < E, first_nan, first(hit))


def spmm(graph, x, edge_weight=None, reduce="sum"):
    """out[i] = reduce_{e: j -> i} w_e * x[j]; destinations with no edge get 0.

    Max and min take the first edge reaching the extremum, a NaN message
    being the extremum; the gradient goes to that edge only.
    """
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    src, dst = graph.src, graph.dst
    msg = x.index_select(0, src)
    if edge_weight is not None:
        msg = msg * _broadcast_weight(edge_weight, msg)
    out_shape = (graph.num_dst,) + tuple(x.shape[1:])
    if reduce in ("sum", "mean"):
        out = torch.zeros(out_shape, dtype=msg.dtype, device=x.device).index_add(0, dst, msg)
        if reduce == "mean":
            cnt = torch.bincount(dst, minlength=graph.num_dst).clamp(min=1).to(out.dtype)
            out = out / cnt.view((-1,) + (1,) * (out.dim() - 1))
        return out
    first = first_arg_extremum(msg, dst, graph.num_dst, reduce)
    empty = first == graph.num_edges
    # Gather the chosen edge's x and weight and multiply only those, so that
    # autograd routes the gradient to the chosen edge alone: the other edges
    # get exactly 0, even where their message is NaN (no 0 * NaN).  A zero
    # row past the end stands for "no edge".
    pad = lambda t: torch.cat([t, t.new_zeros((1,) + tuple(t.shape[1:]))], 0)
    src_pad = torch.cat([src, src.new_full((1,), graph.num_src)])
    out = pad(x).gather(0, src_pad[first])
    if edge_weight is not None:
        out = out * pad(_broadcast_weight(edge_weight, msg).expand_as(msg)).gather(0, first)
    return out.masked_fill(empty, 0.0)


def sddmm(graph, a, b):
    """out[e, h] = <a[src_e, h, :], b[dst_e, h, :]>  (a, b: [N, H, C] or [N, C] -> out [E, H] or [E])."""
    return (a.index_select(0, graph.src) * b.index_select(0, graph.dst)).sum(-1)


def edge_softmax(graph, scores):
    """Softmax of ``scores`` [E] or [E, H] over the edges entering each destination."""
    dst = graph.dst
    E = scores.shape[0]
    idx = dst.view((E,) + (1,) * (scores.dim() - 1)).expand_as(scores)
    shape = (graph.num_dst,) + tuple(scores.shape[1:])
    # Softmax is shift invariant, so the max needs no gradient.
    m = torch.full(shape, float("-inf"), dtype=scores.dtype, device=scores.device)
    m = m.scatter_reduce(0, idx, scores.detach(), "amax", include_self=True)
    ex = torch.exp(scores - m.gather(0, idx))
    den = torch.zeros(shape, dtype=scores.dtype, device=scores.device).index_add(0, dst, ex)
    return ex / den.gather(0, idx)


def gat_aggregate(graph, h, a_src, a_dst, negative_slope=0.2):
    """GAT attention and aggregation.

    e_ji = LeakyReLU(a_src[j] + a_dst[i]); alpha = softmax over j of e_ji;
    out[i] = sum_j alpha_ji h[j].   h: [N_src, H, C], a_src: [N_src, H],
    a_dst: [N_dst, H] -> out [N_dst, H, C].
    """
    e = a_src.index_select(0, graph.src) + a_dst.index_select(0, graph.dst)
    alpha = edge_softmax(graph, F.leaky_relu(e, negative_slope))
    return spmm(graph, h, alpha, "sum")

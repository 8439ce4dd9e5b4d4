"""Sparse message-passing ops: registration, autograd and the public functions.

Two layers of ops in the ``frontiers_fast::`` namespace, all defined with
:func:`frontiers_fast._library.define_op` (the last argument, ``backend``, is
left out below):

*Kernel ops* work on CSR tensors and have no autograd.  Backends: ``cpp``
(``csrc/gnn/gnn_cpu.cpp``), ``triton`` (``kernels/gnn.py``), ``reference``
(below: the reference re-indexed to CSR order) and, for ``spmm_fwd``,
``cuda`` (``csrc/gnn/spmm_cuda.cpp``).

  spmm_fwd(rowptr, col, weight?, weight_index?, x, reduce) -> (out, arg)
  spmm_bwd(csc_ptr, csc_row, csc_perm, rowptr, col, weight?, weight_index?, csc_weight_index?,
           x, grad_out, arg, reduce, need_x, need_w) -> (grad_x, grad_w)
  sddmm_fwd(rowptr, col, a, b) -> out
  edge_softmax_fwd(rowptr, scores) -> p
  edge_softmax_bwd(rowptr, p, grad_p) -> grad_scores
  gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope) -> (out, lse)
  gat_bwd(rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, negative_slope, out, lse, grad_out)
      -> (grad_h, grad_a_src, grad_a_dst)

Shapes: rowptr [N_dst+1] int64, col [E] int64, csc_ptr [N_src+1], csc_row [E]
and csc_perm [E] int64 (see :mod:`frontiers_fast.graph`).  x [N_src, F];
weight [E, Hw] with F % Hw == 0 (feature f uses weight column f // (F // Hw)).
The weight of CSR edge k is row ``weight_index[k]`` (row k when it is None):
weights stay in the user's edge order and are read through the graph's
``perm``; backward, transposed edge t reads row ``csc_weight_index[t]``
(``csc_perm[t]`` when None), and grad_w comes back in the weight's order.
``reduce`` is a code of :mod:`frontiers_fast._reduce`.  arg [N_dst, F] int64
is the CSR position of the chosen edge (-1 for an empty row; [0] for sum and
mean).  a [N_src, H, C], b [N_dst, H, C], scores [E, H], h [N_src, H, C],
a_src [N_src, H], a_dst [N_dst, H], lse [N_dst, H] (-inf for an empty row).

*Autograd ops* (``spmm``, ``sddmm``, ``edge_softmax``, ``gat_aggregate``) take
the graph's tensors, transpose included, call the kernel ops with their
backend, and carry the registered autograd, whose backward is made of kernel
ops run with the same backend.

NaN in the data propagates the same way on every backend: a sum or mean over
a NaN message is NaN; max and min take a NaN message as the extremum (the
output is NaN and the gradient goes to the first NaN edge, as in
``torch.amax``); a NaN score makes its destination's softmax and GAT output
NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_dims, check_real, check_same_device, check_same_dtype, check_tensor
from .._library import absent, define_op
from .._reduce import MAX, MEAN, MIN, REDUCES, reduce_code, reduce_name
from ..graph import Graph, as_graph
from ..reference import gnn as ref

_ops = torch.ops.frontiers_fast
_TRITON = "frontiers_fast.kernels.gnn:"


# ---------------------------------------------------------------------------
# reference kernels in CSR form
# ---------------------------------------------------------------------------
class _CSR:
    """Just enough of a Graph for the reference, with edges in CSR order."""

    def __init__(self, rowptr, col, num_src):
        self.num_dst = rowptr.shape[0] - 1
        self.num_src = num_src
        self.num_edges = col.shape[0]
        self.src = col
        self.dst = torch.repeat_interleave(
            torch.arange(self.num_dst, device=col.device), rowptr.diff(), output_size=self.num_edges
        )


def _heads_view(x, weight):
    """[N, F] with weight [E, Hw] -> [N, Hw, F/Hw] so the reference broadcasts per head."""
    hw = 1 if weight is None else weight.shape[1]
    return x.view(x.shape[0], hw, x.shape[1] // hw)


def _csr_weight(weight, index):
    return weight if (weight is None or index is None) else weight.index_select(0, index)


def _ref_spmm_fwd(rowptr, col, weight, weight_index, x, reduce):
    g = _CSR(rowptr, col, x.shape[0])
    weight = _csr_weight(weight, weight_index)
    name = reduce_name(reduce)
    xv = _heads_view(x, weight)
    out = ref.spmm(g, xv, weight, name).reshape(g.num_dst, x.shape[1])
    if reduce not in (MAX, MIN):
        return out, x.new_empty((0,), dtype=torch.int64)
    msg = xv.index_select(0, g.src)
    if weight is not None:
        msg = msg * weight.unsqueeze(-1)
    arg = ref.first_arg_extremum(msg.reshape(g.num_edges, x.shape[1]), g.dst, g.num_dst, name)
    return out, arg.masked_fill(arg == g.num_edges, -1)


def _ref_spmm_bwd(
    csc_ptr, csc_row, csc_perm, rowptr, col, weight, weight_index, csc_weight_index, x, grad_out, arg, reduce,
    need_x, need_w,
):  # fmt: skip
    g = _CSR(rowptr, col, csc_ptr.shape[0] - 1)
    # grad_x reads, for transposed edge t, weight row csc_weight_index[t]
    # (csc_perm[t] when None), as the kernels do: per CSR edge csc_perm[t].
    weight_t = None
    if weight is not None and need_x:
        rows = csc_perm if csc_weight_index is None else csc_weight_index
        weight_t = torch.empty_like(weight).index_copy(0, csc_perm, weight.index_select(0, rows))
    F_ = grad_out.shape[1]
    hw = 1 if weight is None else weight.shape[1]
    geff = grad_out.index_select(0, g.dst)  # [E, F]: gradient arriving at each edge's message
    chosen = None
    if reduce == MEAN:
        geff = geff / rowptr.diff().clamp(min=1).to(geff.dtype).index_select(0, g.dst).unsqueeze(1)
    elif reduce in (MAX, MIN):
        k = torch.arange(g.num_edges, device=col.device).unsqueeze(1)
        chosen = (arg.index_select(0, g.dst) == k).view(g.num_edges, hw, F_ // hw)
    geff = geff.view(g.num_edges, hw, F_ // hw)

    def only_chosen(t):
        # Edges that were not the extremum get exactly 0, even if their weight or x is NaN.
        return t if chosen is None else torch.where(chosen, t, 0.0)

    gx, gw = absent(grad_out), absent(grad_out)
    if need_x:
        msg = only_chosen(geff if weight is None else geff * weight_t.unsqueeze(-1))
        gx = grad_out.new_zeros((g.num_src, F_)).index_add(0, col, msg.reshape(g.num_edges, F_))
    if need_w and weight is not None:
        gw = only_chosen(geff * x.index_select(0, col).view(g.num_edges, hw, F_ // hw)).sum(-1)
        if weight_index is not None:
            gw = torch.empty_like(gw).index_copy(0, weight_index, gw)
    return gx, gw


def _ref_sddmm_fwd(rowptr, col, a, b):
    return ref.sddmm(_CSR(rowptr, col, a.shape[0]), a, b)


def _ref_edge_softmax_fwd(rowptr, scores):
    col = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    return ref.edge_softmax(_CSR(rowptr, col, 0), scores)


def _ref_edge_softmax_bwd(rowptr, p, grad_p):
    dst = _CSR(rowptr, torch.zeros(p.shape[0], dtype=torch.int64, device=p.device), 0).dst
    pg = p * grad_p
    row_sum = torch.zeros((rowptr.shape[0] - 1,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
    row_sum = row_sum.index_add(0, dst, pg)
    return pg - p * row_sum.index_select(0, dst)


def _ref_gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope):
    g = _CSR(rowptr, col, h.shape[0])
    out = ref.gat_aggregate(g, h, a_src, a_dst, negative_slope)
    e = torch.nn.functional.leaky_relu(
        a_src.index_select(0, g.src) + a_dst.index_select(0, g.dst), negative_slope
    )
    idx = g.dst.unsqueeze(1).expand_as(e)
    m = torch.full_like(a_dst, float("-inf")).scatter_reduce(0, idx, e, "amax", include_self=True)
    den = torch.zeros_like(a_dst).index_add(0, g.dst, torch.exp(e - m.gather(0, idx)))
    return out, m + torch.log(den)


def _ref_gat_bwd(
    rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, negative_slope, out, lse, grad_out
):
    # Written out (not autograd): kernels run below the autograd dispatch key.
    g = _CSR(rowptr, col, h.shape[0])
    pre = a_src.index_select(0, g.src) + a_dst.index_select(0, g.dst)
    p = torch.exp(torch.nn.functional.leaky_relu(pre, negative_slope) - lse.index_select(0, g.dst))
    g_dst = grad_out.index_select(0, g.dst)  # [E, H, C]
    delta = (grad_out * out).sum(-1)  # [N_dst, H]
    dp = (g_dst * h.index_select(0, g.src)).sum(-1)
    de = p * (dp - delta.index_select(0, g.dst))
    de = torch.where(pre > 0, de, de * negative_slope)
    grad_h = torch.zeros_like(h).index_add(0, g.src, p.unsqueeze(-1) * g_dst)
    return (
        grad_h,
        torch.zeros_like(a_src).index_add(0, g.src, de),
        torch.zeros_like(a_dst).index_add(0, g.dst, de),
    )


# ---------------------------------------------------------------------------
# kernel ops
# ---------------------------------------------------------------------------
def _fake_spmm_fwd(rowptr, col, weight, weight_index, x, reduce, backend):
    torch._check(x.dim() == 2, lambda: "x must be [N_src, F]")
    torch._check(
        0 <= reduce < len(REDUCES), lambda: f"reduce must be a code in [0, {len(REDUCES)}), got {reduce}"
    )
    n_dst = rowptr.shape[0] - 1
    out = x.new_empty((n_dst, x.shape[1]))
    arg = x.new_empty((n_dst, x.shape[1]) if reduce in (MAX, MIN) else (0,), dtype=torch.int64)
    return out, arg


def _fake_spmm_bwd(
    csc_ptr, csc_row, csc_perm, rowptr, col, weight, weight_index, csc_weight_index, x, grad_out, arg, reduce,
    need_x, need_w, backend,
):  # fmt: skip
    # x may be a [0, F] placeholder when only grad_x is wanted: N_src comes from csc_ptr.
    gx = grad_out.new_empty((csc_ptr.shape[0] - 1, grad_out.shape[1])) if need_x else absent(grad_out)
    gw = torch.empty_like(weight) if (need_w and weight is not None) else absent(grad_out)
    return gx, gw


def _fake_gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope, backend):
    n_dst = rowptr.shape[0] - 1
    return h.new_empty((n_dst, h.shape[1], h.shape[2])), h.new_empty((n_dst, h.shape[1]))


define_op(
    "spmm_fwd(Tensor rowptr, Tensor col, Tensor? weight, Tensor? weight_index, Tensor x, int reduce) "
    "-> (Tensor, Tensor)",
    fake=_fake_spmm_fwd,
    reference=_ref_spmm_fwd,
    triton=_TRITON + "spmm_fwd",
    native=("cpp", "cuda"),
)
define_op(
    "spmm_bwd(Tensor csc_ptr, Tensor csc_row, Tensor csc_perm, Tensor rowptr, Tensor col, Tensor? weight, "
    "Tensor? weight_index, Tensor? csc_weight_index, Tensor x, Tensor grad_out, Tensor arg, int reduce, "
    "bool need_x, bool need_w) -> (Tensor, Tensor)",
    fake=_fake_spmm_bwd,
    reference=_ref_spmm_bwd,
    triton=_TRITON + "spmm_bwd",
    native=("cpp",),
)
define_op(
    "sddmm_fwd(Tensor rowptr, Tensor col, Tensor a, Tensor b) -> Tensor",
    fake=lambda rowptr, col, a, b, backend: a.new_empty((col.shape[0], a.shape[1])),
    reference=_ref_sddmm_fwd,
    triton=_TRITON + "sddmm_fwd",
    native=("cpp",),
)
define_op(
    "edge_softmax_fwd(Tensor rowptr, Tensor scores) -> Tensor",
    fake=lambda rowptr, scores, backend: torch.empty_like(scores),
    reference=_ref_edge_softmax_fwd,
    triton=_TRITON + "edge_softmax_fwd",
    native=("cpp",),
)
define_op(
    "edge_softmax_bwd(Tensor rowptr, Tensor p, Tensor grad_p) -> Tensor",
    fake=lambda rowptr, p, grad_p, backend: torch.empty_like(p),
    reference=_ref_edge_softmax_bwd,
    triton=_TRITON + "edge_softmax_bwd",
    native=("cpp",),
)
define_op(
    "gat_fwd(Tensor rowptr, Tensor col, Tensor h, Tensor a_src, Tensor a_dst, float negative_slope) "
    "-> (Tensor, Tensor)",
    fake=_fake_gat_fwd,
    reference=_ref_gat_fwd,
    triton=_TRITON + "gat_fwd",
    native=("cpp",),
)
define_op(
    "gat_bwd(Tensor rowptr, Tensor col, Tensor csc_ptr, Tensor csc_row, Tensor csc_perm, Tensor h, "
    "Tensor a_src, Tensor a_dst, float negative_slope, Tensor out, Tensor lse, Tensor grad_out) "
    "-> (Tensor, Tensor, Tensor)",
    fake=lambda rowptr, col, cp, cr, cperm, h, a_src, a_dst, slope, out, lse, go, backend: (
        torch.empty_like(h),
        torch.empty_like(a_src),
        torch.empty_like(a_dst),
    ),
    reference=_ref_gat_bwd,
    triton=_TRITON + "gat_bwd",
    native=("cpp",),
)


# ---------------------------------------------------------------------------
# autograd ops
# ---------------------------------------------------------------------------
_CSC = "Tensor csc_ptr, Tensor csc_row, Tensor csc_perm"


def _spmm(
    rowptr, col, csc_ptr, csc_row, csc_perm, csc_weight_index, weight, weight_index, x, reduce, backend
):
    return _ops.spmm_fwd(rowptr, col, weight, weight_index, x, reduce, backend)


def _spmm_setup(ctx, a, output):
    ctx.reduce = a.reduce
    # x is only read by the weight gradient; keep it alive only then.  The
    # weight (an [E, Hw] input, saved by reference) tells the kernel Hw.
    need_w = ctx.needs.weight
    ctx.save_for_backward(
        a.rowptr, a.col, a.csc_ptr, a.csc_row, a.csc_perm, a.csc_weight_index, a.weight, a.weight_index,
        a.x if need_w else None, output[1],
    )  # fmt: skip


def _spmm_backward(ctx, grad_out, _grad_arg):
    rowptr, col, csc_ptr, csc_row, csc_perm, csc_wid, weight, wid, x, arg = ctx.saved_tensors
    if x is None:
        x = grad_out.new_empty((0, grad_out.shape[1]))
    gx, gw = _ops.spmm_bwd(
        csc_ptr, csc_row, csc_perm, rowptr, col, weight, wid, csc_wid, x, grad_out.contiguous(), arg, ctx.reduce,
        ctx.needs.x, ctx.needs.weight, ctx.backend,
    )  # fmt: skip
    return {"x": gx, "weight": gw}


define_op(
    f"spmm(Tensor rowptr, Tensor col, {_CSC}, Tensor? csc_weight_index, Tensor? weight, Tensor? weight_index, "
    "Tensor x, int reduce) -> (Tensor, Tensor)",
    fake=lambda rowptr, col, cp, cr, cperm, cwid, weight, wid, x, reduce, backend: _fake_spmm_fwd(
        rowptr, col, weight, wid, x, reduce, backend
    ),
    composite=_spmm,
    uses=("spmm_fwd", "spmm_bwd"),
    backward=_spmm_backward,
    setup_context=_spmm_setup,
)


def _sddmm(rowptr, col, csc_ptr, csc_row, csc_perm, a, b, backend):
    return _ops.sddmm_fwd(rowptr, col, a, b, backend)


def _sddmm_setup(ctx, a, output):
    ctx.save_for_backward(a.rowptr, a.col, a.csc_ptr, a.csc_row, a.csc_perm, a.a, a.b)


def _sddmm_backward(ctx, grad):
    rowptr, col, csc_ptr, csc_row, csc_perm, a, b = ctx.saved_tensors
    grad = grad.contiguous()
    H, C = a.shape[1], a.shape[2]
    out = {}
    if ctx.needs.b:
        # grad_b[i] = sum_{k in row i} g[k] a[col[k]]
        flat = a.reshape(a.shape[0], H * C)
        out["b"] = _ops.spmm_fwd(rowptr, col, grad, None, flat, 0, ctx.backend)[0].view(b.shape)
    if ctx.needs.a:
        # grad_a[j] = sum over the transpose of g[k] b[dst(k)], g read through csc_perm
        flat = b.reshape(b.shape[0], H * C)
        out["a"] = _ops.spmm_fwd(csc_ptr, csc_row, grad, csc_perm, flat, 0, ctx.backend)[0].view(a.shape)
    return out


define_op(
    f"sddmm(Tensor rowptr, Tensor col, {_CSC}, Tensor a, Tensor b) -> Tensor",
    fake=lambda rowptr, col, cp, cr, cperm, a, b, backend: a.new_empty((col.shape[0], a.shape[1])),
    composite=_sddmm,
    uses=("sddmm_fwd", "spmm_fwd"),
    backward=_sddmm_backward,
    setup_context=_sddmm_setup,
)


def _edge_softmax_setup(ctx, a, output):
    ctx.save_for_backward(a.rowptr, output)


def _edge_softmax_backward(ctx, grad):
    rowptr, p = ctx.saved_tensors
    return {"scores": _ops.edge_softmax_bwd(rowptr, p, grad.contiguous(), ctx.backend)}


define_op(
    "edge_softmax(Tensor rowptr, Tensor scores) -> Tensor",
    fake=lambda rowptr, scores, backend: torch.empty_like(scores),
    composite=lambda rowptr, scores, backend: _ops.edge_softmax_fwd(rowptr, scores, backend),
    uses=("edge_softmax_fwd", "edge_softmax_bwd"),
    backward=_edge_softmax_backward,
    setup_context=_edge_softmax_setup,
)


def _gat(rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, negative_slope, backend):
    return _ops.gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope, backend)


def _gat_setup(ctx, a, output):
    # lse is the backward's saved statistic, not a result: it has no gradient.
    ctx.mark_non_differentiable(output[1])
    ctx.slope = a.negative_slope
    ctx.save_for_backward(a.rowptr, a.col, a.csc_ptr, a.csc_row, a.csc_perm, a.h, a.a_src, a.a_dst, *output)


def _gat_backward(ctx, grad_out, _grad_lse):
    rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, out, lse = ctx.saved_tensors
    gh, gs, gd = _ops.gat_bwd(
        rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, ctx.slope, out, lse, grad_out.contiguous(),
        ctx.backend,
    )  # fmt: skip
    return {"h": gh, "a_src": gs, "a_dst": gd}


define_op(
    f"gat_aggregate(Tensor rowptr, Tensor col, {_CSC}, Tensor h, Tensor a_src, Tensor a_dst, "
    "float negative_slope) -> (Tensor, Tensor)",
    fake=lambda rowptr, col, cp, cr, cperm, h, a_src, a_dst, slope, backend: _fake_gat_fwd(
        rowptr, col, h, a_src, a_dst, slope, backend
    ),
    composite=_gat,
    uses=("gat_fwd", "gat_bwd"),
    backward=_gat_backward,
    setup_context=_gat_setup,
)

_backend.register_function("spmm", ops=("spmm_fwd",), grad_ops=("spmm_bwd",))
_backend.register_function("sddmm", ops=("sddmm_fwd",), grad_ops=("spmm_fwd",))
_backend.register_function("edge_softmax", ops=("edge_softmax_fwd",), grad_ops=("edge_softmax_bwd",))
_backend.register_function("gat_aggregate", ops=("gat_fwd",), grad_ops=("gat_bwd",))


# ---------------------------------------------------------------------------
# public functions (validation, layout, backend choice)
# ---------------------------------------------------------------------------
def _check_input(name, t, graph, dims, dtype=None):
    check_tensor(name, t)
    if dtype is not None:
        check_same_dtype(name, t, "x", dtype)
    check_same_device(name, t, "the graph", graph.device)
    check_dims(name, t, dims)


def _kernel_dtype(t: Tensor) -> torch.dtype:
    # The C++ kernels compute in float32/float64; half types are widened on CPU.
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def _csc_for(graph, grad):
    # Forward-only calls skip building the transpose.
    if grad or graph._csc is not None:
        return graph.csc
    e = graph.rowptr.new_empty((0,))
    return (graph.rowptr.new_zeros((graph.num_src + 1,)), e, e)


def spmm(graph, x, edge_weight=None, reduce="sum", *, num_nodes=None, backend=None):
    """Sparse aggregation: ``out[i] = reduce_{e: j -> i} w_e * x[j]``.

    Args:
        graph: a :class:`Graph`, or an ``edge_index`` [2, E] (then ``num_nodes``).
        x: [N_src, F] or [N_src, H, C] node features.
        edge_weight: optional [E] (or [E, H] with a 3-D ``x``) in edge order;
            read where it is on every call (no copy is kept).
        reduce: ``"sum"``, ``"mean"`` (divides by the in-degree), ``"max"`` or
            ``"min"`` (gradients go to the first arg-extremum edge).
            Destinations with no incoming edge get 0.  NaN propagates: a NaN
            message makes a sum or mean NaN, and is the extremum of a max or
            min (its first edge gets the gradient).
        backend: force ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"reference"``
            (``"cuda"`` has the forward only).

    Returns:
        [N_dst, F] (or [N_dst, H, C]), dtype of ``x``.

    Example::

        >>> g = Graph(torch.tensor([[0, 1, 1], [1, 0, 2]]), num_nodes=3)
        >>> spmm(g, torch.ones(3, 4), reduce="mean").shape
        torch.Size([3, 4])
    """
    graph = as_graph(graph, num_nodes)
    code = reduce_code(reduce)
    _check_input("x", x, graph, (2, 3))
    if x.shape[0] != graph.num_src:
        raise ValueError(f"x has {x.shape[0]} rows but the graph has {graph.num_src} source nodes")
    if edge_weight is not None:
        _check_input("edge_weight", edge_weight, graph, (1, 2), x.dtype)
        if edge_weight.shape[0] != graph.num_edges:
            raise ValueError(
                f"edge_weight has {edge_weight.shape[0]} entries but the graph has {graph.num_edges} edges"
            )
        if edge_weight.dim() == 2 and (x.dim() != 3 or edge_weight.shape[1] != x.shape[1]):
            raise ValueError(
                f"edge_weight of shape [E, H] needs x of shape [N, H, C] with the same H; "
                f"got edge_weight {tuple(edge_weight.shape)} and x {tuple(x.shape)}"
            )
    grad = _backend.records_grad(x, edge_weight)
    backend = _backend.resolve(backend, x.device, "spmm", grad)
    kd = _kernel_dtype(x)
    x2 = x.reshape(x.shape[0], math.prod(x.shape[1:])).to(kd).contiguous()
    w = wid = cwid = None
    if edge_weight is not None:
        w = edge_weight.to(kd)
        w = (w if w.dim() == 2 else w.unsqueeze(1)).contiguous()
        wid = graph.weight_index
        if wid is not None and grad:
            cwid = graph.csc_eid
    if grad:
        out, _ = _ops.spmm(graph.rowptr, graph.col, *graph.csc, cwid, w, wid, x2, code, backend)
    else:  # no graph to record: the kernel op alone, without the autograd op around it
        out, _ = _ops.spmm_fwd(graph.rowptr, graph.col, w, wid, x2, code, backend)
    return out.view((graph.num_dst,) + tuple(x.shape[1:])).to(x.dtype)


def sddmm(graph, a, b, *, num_nodes=None, backend=None):
    """Per-edge dot product: ``out[e, h] = <a[src_e, h], b[dst_e, h]>``.

    Args:
        a: [N_src, H, C] (or [N_src, C]); b: [N_dst, H, C] (or [N_dst, C]).

    Returns:
        [E, H] (or [E]) in edge order.  NaN in a row of ``a`` or ``b`` makes
        the dot products that read it NaN.

    Example::

        >>> sddmm(g, torch.randn(3, 2, 8), torch.randn(3, 2, 8)).shape
        torch.Size([3, 2])
    """
    graph = as_graph(graph, num_nodes)
    _check_input("a", a, graph, (2, 3))
    _check_input("b", b, graph, (2, 3), a.dtype)
    if a.dim() != b.dim() or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"a and b must agree past the node dimension, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] != graph.num_src:
        raise ValueError(f"a has {a.shape[0]} rows but the graph has {graph.num_src} source nodes")
    if b.shape[0] != graph.num_dst:
        raise ValueError(f"b has {b.shape[0]} rows but the graph has {graph.num_dst} destination nodes")
    grad = _backend.records_grad(a, b)
    backend = _backend.resolve(backend, a.device, "sddmm", grad)
    kd = _kernel_dtype(a)
    a3 = (a if a.dim() == 3 else a.unsqueeze(1)).to(kd).contiguous()
    b3 = (b if b.dim() == 3 else b.unsqueeze(1)).to(kd).contiguous()
    if grad:
        out = _ops.sddmm(graph.rowptr, graph.col, *_csc_for(graph, a.requires_grad), a3, b3, backend)
    else:
        out = _ops.sddmm_fwd(graph.rowptr, graph.col, a3, b3, backend)
    out = graph.from_csr_order(out).to(a.dtype)
    return out if a.dim() == 3 else out.squeeze(1)


def edge_softmax(graph, scores, *, num_nodes=None, backend=None):
    """Softmax of ``scores`` over the edges entering each destination (max-subtracted).

    Args:
        scores: [E] or [E, H] in edge order.

    Returns:
        the same shape; each destination's incoming edges sum to 1.  A NaN
        score makes its destination's whole softmax NaN.

    Example::

        >>> p = edge_softmax(g, torch.randn(g.num_edges, 4))
    """
    graph = as_graph(graph, num_nodes)
    _check_input("scores", scores, graph, (1, 2))
    if scores.shape[0] != graph.num_edges:
        raise ValueError(f"scores has {scores.shape[0]} entries but the graph has {graph.num_edges} edges")
    grad = _backend.records_grad(scores)
    backend = _backend.resolve(backend, scores.device, "edge_softmax", grad)
    s = graph.to_csr_order(scores.to(_kernel_dtype(scores)))
    s2 = (s if s.dim() == 2 else s.unsqueeze(1)).contiguous()
    p = (_ops.edge_softmax if grad else _ops.edge_softmax_fwd)(graph.rowptr, s2, backend)
    p = graph.from_csr_order(p if scores.dim() == 2 else p.squeeze(1))
    return p.to(scores.dtype)


def gat_aggregate(graph, h, a_src, a_dst, negative_slope=0.2, *, num_nodes=None, backend=None):
    """Fused GAT attention: LeakyReLU, edge softmax and weighted sum in one op.

    ``out[i] = sum_j softmax_j(LeakyReLU(a_src[j] + a_dst[i])) h[j]``, computed
    per destination with an online softmax; no [E, H, C] tensor is ever made.

    Args:
        h: [N_src, H, C]; a_src: [N_src, H]; a_dst: [N_dst, H].
        negative_slope: LeakyReLU slope (finite).

    Returns:
        [N_dst, H, C]; destinations with no incoming edge get 0.  A NaN
        attention logit (from ``a_src`` or ``a_dst``) makes its destination's
        output NaN, in that head.

    Example::

        >>> out = gat_aggregate(g, torch.randn(3, 2, 8), torch.randn(3, 2), torch.randn(3, 2))
    """
    graph = as_graph(graph, num_nodes)
    _check_input("h", h, graph, (3,))
    _check_input("a_src", a_src, graph, (2,), h.dtype)
    _check_input("a_dst", a_dst, graph, (2,), h.dtype)
    H = h.shape[1]
    if h.shape[0] != graph.num_src:
        raise ValueError(f"h has {h.shape[0]} rows but the graph has {graph.num_src} source nodes")
    if a_src.shape != (graph.num_src, H):
        raise ValueError(f"a_src must have shape [N_src, H]=[{graph.num_src}, {H}], got {tuple(a_src.shape)}")
    if a_dst.shape != (graph.num_dst, H):
        raise ValueError(f"a_dst must have shape [N_dst, H]=[{graph.num_dst}, {H}], got {tuple(a_dst.shape)}")
    negative_slope = check_real("negative_slope", negative_slope)
    grad = _backend.records_grad(h, a_src, a_dst)
    backend = _backend.resolve(backend, h.device, "gat_aggregate", grad)
    kd = _kernel_dtype(h)
    hs, s, d = (t.to(kd).contiguous() for t in (h, a_src, a_dst))
    if grad:
        out, _ = _ops.gat_aggregate(graph.rowptr, graph.col, *graph.csc, hs, s, d, negative_slope, backend)
    else:
        out, _ = _ops.gat_fwd(graph.rowptr, graph.col, hs, s, d, negative_slope, backend)
    return out.to(h.dtype)


__all__ = ["Graph", "REDUCES", "spmm", "sddmm", "edge_softmax", "gat_aggregate"]

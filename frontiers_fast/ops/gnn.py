"""Sparse message-passing ops: registration, autograd and backend choice.

Two layers of ops live in the ``frontiers_fast::`` namespace.

*Kernel ops* work on CSR tensors with edge values in CSR order and have no
autograd.  Each has a fake kernel; its CPU kernel comes from the C++ library
(``csrc/gnn/gnn_cpu.cpp``), its CUDA kernel is a Python function here that
calls the Triton launcher or the CUDA extension.  If ``_C`` did not load, the
reference (re-indexed to CSR order) is registered for CPU instead.

  spmm_fwd(rowptr, col, weight?, x, reduce) -> (out, arg)
  spmm_bwd(csc_ptr, csc_row, csc_perm, rowptr, col, weight?, x, grad_out, arg, reduce, need_x, need_w)
      -> (grad_x, grad_w)
  sddmm_fwd(rowptr, col, a, b) -> out
  edge_softmax_fwd(rowptr, scores) -> p
  edge_softmax_bwd(rowptr, p, grad_p) -> grad_scores
  gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope) -> (out, lse)
  gat_bwd(rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, negative_slope, out, lse, grad_out)
      -> (grad_h, grad_a_src, grad_a_dst)
  spmm_fwd_warp(rowptr, col, weight?, x, reduce) -> (out, arg)      [CUDA extension only]

Shapes: rowptr [N_dst+1] int64, col [E] int64, csc_ptr [N_src+1], csc_row [E]
and csc_perm [E] int64 (see :mod:`frontiers_fast.graph`).  x [N_src, F];
weight [E, Hw] with F % Hw == 0 (feature f uses weight column f // (F // Hw));
arg [N_dst, F] int64, the CSR position of the chosen edge (-1 for an empty row;
[0] for sum and mean).  a [N_src, H, C], b [N_dst, H, C], scores [E, H],
h [N_src, H, C], a_src [N_src, H], a_dst [N_dst, H], lse [N_dst, H] (-inf for
an empty row).

*Public ops* (``spmm``, ``sddmm``, ``edge_softmax``, ``gat_aggregate``) take
the graph tensors, call the kernel ops, and carry the registered autograd,
whose backward is itself made of kernel ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_choice, check_dims, check_same_device, check_same_dtype, check_tensor
from ..graph import Graph, as_graph
from ..reference import gnn as ref

NS = "frontiers_fast"
_lib = torch.library.Library(NS, "FRAGMENT")

_KERNEL_SCHEMAS = {
    "spmm_fwd": "spmm_fwd(Tensor rowptr, Tensor col, Tensor? weight, Tensor x, str reduce) -> (Tensor, Tensor)",
    "spmm_bwd": (
        "spmm_bwd(Tensor csc_ptr, Tensor csc_row, Tensor csc_perm, Tensor rowptr, Tensor col, Tensor? weight, "
        "Tensor x, Tensor grad_out, Tensor arg, str reduce, bool need_x, bool need_w) -> (Tensor, Tensor)"
    ),
    "sddmm_fwd": "sddmm_fwd(Tensor rowptr, Tensor col, Tensor a, Tensor b) -> Tensor",
    "edge_softmax_fwd": "edge_softmax_fwd(Tensor rowptr, Tensor scores) -> Tensor",
    "edge_softmax_bwd": "edge_softmax_bwd(Tensor rowptr, Tensor p, Tensor grad_p) -> Tensor",
    "gat_fwd": (
        "gat_fwd(Tensor rowptr, Tensor col, Tensor h, Tensor a_src, Tensor a_dst, float negative_slope) "
        "-> (Tensor, Tensor)"
    ),
    "gat_bwd": (
        "gat_bwd(Tensor rowptr, Tensor col, Tensor csc_ptr, Tensor csc_row, Tensor csc_perm, Tensor h, "
        "Tensor a_src, Tensor a_dst, float negative_slope, Tensor out, Tensor lse, Tensor grad_out) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "spmm_fwd_warp": "spmm_fwd_warp(Tensor rowptr, Tensor col, Tensor? weight, Tensor x, str reduce) -> (Tensor, Tensor)",
    "stable_bucket_sort": "stable_bucket_sort(Tensor keys, int num_buckets) -> (Tensor, Tensor)",
}
for _schema in _KERNEL_SCHEMAS.values():
    _lib.define(_schema)

_ops = torch.ops.frontiers_fast
REDUCES = ref.REDUCES


# ---------------------------------------------------------------------------
# fake kernels
# ---------------------------------------------------------------------------
def _fake_spmm_fwd(rowptr, col, weight, x, reduce):
    torch._check(x.dim() == 2, lambda: "x must be [N_src, F]")
    torch._check(reduce in REDUCES, lambda: f"reduce must be one of {REDUCES}")
    n_dst = rowptr.shape[0] - 1
    out = x.new_empty((n_dst, x.shape[1]))
    arg = x.new_empty((n_dst, x.shape[1]) if reduce in ("max", "min") else (0,), dtype=torch.int64)
    return out, arg


def _fake_spmm_bwd(csc_ptr, csc_row, csc_perm, rowptr, col, weight, x, grad_out, arg, reduce, need_x, need_w):
    # x may be a [0, F] placeholder when only grad_x is wanted: N_src comes from csc_ptr.
    gx = grad_out.new_empty((csc_ptr.shape[0] - 1, grad_out.shape[1])) if need_x else grad_out.new_empty((0,))
    gw = torch.empty_like(weight) if (need_w and weight is not None) else grad_out.new_empty((0,))
    return gx, gw


def _fake_sddmm_fwd(rowptr, col, a, b):
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "a and b must be [N, H, C]")
    return a.new_empty((col.shape[0], a.shape[1]))


def _fake_edge_softmax_fwd(rowptr, scores):
    return torch.empty_like(scores)


def _fake_edge_softmax_bwd(rowptr, p, grad_p):
    return torch.empty_like(p)


def _fake_stable_bucket_sort(keys, num_buckets):
    return keys.new_empty((num_buckets + 1,)), torch.empty_like(keys)


def _fake_gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope):
    n_dst = rowptr.shape[0] - 1
    return h.new_empty((n_dst, h.shape[1], h.shape[2])), h.new_empty((n_dst, h.shape[1]))


def _fake_gat_bwd(
    rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, negative_slope, out, lse, grad_out
):
    return torch.empty_like(h), torch.empty_like(a_src), torch.empty_like(a_dst)


for _name, _fake in {
    "spmm_fwd": _fake_spmm_fwd,
    "spmm_fwd_warp": _fake_spmm_fwd,
    "spmm_bwd": _fake_spmm_bwd,
    "sddmm_fwd": _fake_sddmm_fwd,
    "edge_softmax_fwd": _fake_edge_softmax_fwd,
    "edge_softmax_bwd": _fake_edge_softmax_bwd,
    "gat_fwd": _fake_gat_fwd,
    "gat_bwd": _fake_gat_bwd,
    "stable_bucket_sort": _fake_stable_bucket_sort,
}.items():
    torch.library.register_fake(f"{NS}::{_name}", _fake, lib=_lib)


# ---------------------------------------------------------------------------
# reference kernels in CSR form (fallback for CPU without _C, and for CUDA
# without Triton or the extension)
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


def _ref_spmm_fwd(rowptr, col, weight, x, reduce):
    g = _CSR(rowptr, col, x.shape[0])
    xv = _heads_view(x, weight)
    out = ref.spmm(g, xv, weight, reduce).reshape(g.num_dst, x.shape[1])
    if reduce in ("sum", "mean"):
        return out, x.new_empty((0,), dtype=torch.int64)
    msg = xv.index_select(0, g.src)
    if weight is not None:
        msg = msg * weight.unsqueeze(-1)
    arg = ref._first_arg_extremum(msg.reshape(g.num_edges, x.shape[1]), g.dst, g.num_dst, reduce)
    return out, arg.masked_fill(arg == g.num_edges, -1)


def _ref_spmm_bwd(csc_ptr, csc_row, csc_perm, rowptr, col, weight, x, grad_out, arg, reduce, need_x, need_w):
    g = _CSR(rowptr, col, csc_ptr.shape[0] - 1)
    F_ = grad_out.shape[1]
    hw = 1 if weight is None else weight.shape[1]
    geff = grad_out.index_select(0, g.dst)  # [E, F]: gradient arriving at each edge's message
    if reduce == "mean":
        geff = geff / rowptr.diff().clamp(min=1).to(geff.dtype).index_select(0, g.dst).unsqueeze(1)
    elif reduce in ("max", "min"):
        k = torch.arange(g.num_edges, device=col.device).unsqueeze(1)
        geff = geff * (arg.index_select(0, g.dst) == k).to(geff.dtype)
    geff = geff.view(g.num_edges, hw, F_ // hw)
    gx = gw = grad_out.new_empty((0,))
    if need_x:
        msg = geff if weight is None else geff * weight.unsqueeze(-1)
        gx = grad_out.new_zeros((g.num_src, F_)).index_add(0, col, msg.reshape(g.num_edges, F_))
    if need_w and weight is not None:
        gw = (geff * x.index_select(0, col).view(g.num_edges, hw, F_ // hw)).sum(-1)
    return gx, gw


def _ref_sddmm_fwd(rowptr, col, a, b):
    return ref.sddmm(_CSR(rowptr, col, a.shape[0]), a, b)


def _ref_edge_softmax_fwd(rowptr, scores):
    return ref.edge_softmax(
        _CSR(rowptr, torch.zeros_like(rowptr[:-1]).repeat_interleave(rowptr.diff()), 0), scores
    )


def _ref_edge_softmax_bwd(rowptr, p, grad_p):
    dst = _CSR(rowptr, torch.empty(p.shape[0], dtype=torch.int64, device=p.device), 0).dst
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


def _ref_stable_bucket_sort(keys, num_buckets):
    _, perm = torch.sort(keys, stable=True)
    ptr = keys.new_zeros((num_buckets + 1,))
    torch.cumsum(torch.bincount(keys, minlength=num_buckets), 0, out=ptr[1:])
    return ptr, perm


_REFERENCE_KERNELS = {
    "spmm_fwd": _ref_spmm_fwd,
    "spmm_bwd": _ref_spmm_bwd,
    "sddmm_fwd": _ref_sddmm_fwd,
    "edge_softmax_fwd": _ref_edge_softmax_fwd,
    "edge_softmax_bwd": _ref_edge_softmax_bwd,
    "gat_fwd": _ref_gat_fwd,
    "gat_bwd": _ref_gat_bwd,
    "stable_bucket_sort": _ref_stable_bucket_sort,
}


# ---------------------------------------------------------------------------
# CUDA kernels: Triton launcher or CUDA extension
# ---------------------------------------------------------------------------
def _cuda_impl(name):
    ref_fn = _REFERENCE_KERNELS[name]

    def impl(*args):
        if name == "stable_bucket_sort":
            return ref_fn(*args)  # torch.sort is fast on the GPU
        choice = _backend.gpu_choice()
        if choice == "cuda" and name == "spmm_fwd" and _backend.available("cuda"):
            return _ops.spmm_fwd_warp(*args)
        if _backend.available("triton"):
            from ..kernels import gnn as tk

            return getattr(tk, name)(*args)
        return ref_fn(*args)

    return impl


def _register_impls():
    _backend._probe()
    for name, fn in _REFERENCE_KERNELS.items():
        torch.library.impl(f"{NS}::{name}", "CUDA", lib=_lib)(_cuda_impl(name))
        # A missing or stale _C leaves the CPU key empty: the reference fills it.
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NS}::{name}", "CPU"):
            torch.library.impl(f"{NS}::{name}", "CPU", lib=_lib)(fn)


_register_impls()


# ---------------------------------------------------------------------------
# public ops with autograd
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::spmm", mutates_args=())
def _spmm_op(
    rowptr: Tensor,
    col: Tensor,
    csc_ptr: Tensor,
    csc_row: Tensor,
    csc_perm: Tensor,
    weight: Tensor | None,
    x: Tensor,
    reduce: str,
) -> tuple[Tensor, Tensor]:
    return _ops.spmm_fwd(rowptr, col, weight, x, reduce)


@_spmm_op.register_fake
def _(rowptr, col, csc_ptr, csc_row, csc_perm, weight, x, reduce):
    return _fake_spmm_fwd(rowptr, col, weight, x, reduce)


def _spmm_setup(ctx, inputs, output):
    rowptr, col, csc_ptr, csc_row, csc_perm, weight, x, reduce = inputs
    _, arg = output
    ctx.reduce = reduce
    ctx.has_weight = weight is not None
    need_w = weight is not None and ctx.needs_input_grad[5]
    # x is only read by the weight gradient; keep it alive only then.  The
    # weight (an [E, Hw] input, saved by reference) tells the kernel Hw.
    ctx.save_for_backward(rowptr, col, csc_ptr, csc_row, csc_perm, weight, x if need_w else None, arg)


def _spmm_backward(ctx, grad_out, _grad_arg):
    rowptr, col, csc_ptr, csc_row, csc_perm, weight, x, arg = ctx.saved_tensors
    need_x = ctx.needs_input_grad[6]
    need_w = ctx.has_weight and ctx.needs_input_grad[5]
    if x is None:
        x = grad_out.new_empty((0, grad_out.shape[1]))
    gx, gw = _ops.spmm_bwd(
        csc_ptr,
        csc_row,
        csc_perm,
        rowptr,
        col,
        weight,
        x,
        grad_out.contiguous(),
        arg,
        ctx.reduce,
        need_x,
        need_w,
    )
    return None, None, None, None, None, (gw if need_w else None), (gx if need_x else None), None


_spmm_op.register_autograd(_spmm_backward, setup_context=_spmm_setup)


@torch.library.custom_op(f"{NS}::sddmm", mutates_args=())
def _sddmm_op(
    rowptr: Tensor, col: Tensor, csc_ptr: Tensor, csc_row: Tensor, csc_perm: Tensor, a: Tensor, b: Tensor
) -> Tensor:
    return _ops.sddmm_fwd(rowptr, col, a, b)


@_sddmm_op.register_fake
def _(rowptr, col, csc_ptr, csc_row, csc_perm, a, b):
    return _fake_sddmm_fwd(rowptr, col, a, b)


def _sddmm_setup(ctx, inputs, output):
    rowptr, col, csc_ptr, csc_row, csc_perm, a, b = inputs
    ctx.save_for_backward(rowptr, col, csc_ptr, csc_row, csc_perm, a, b)


def _sddmm_backward(ctx, grad):
    rowptr, col, csc_ptr, csc_row, csc_perm, a, b = ctx.saved_tensors
    grad = grad.contiguous()
    H, C = a.shape[1], a.shape[2]
    ga = gb = None
    if ctx.needs_input_grad[6]:
        # grad_b[i] = sum_{k in row i} g[k] a[col[k]]
        gb = _ops.spmm_fwd(rowptr, col, grad, a.reshape(a.shape[0], H * C), "sum")[0].view(b.shape)
    if ctx.needs_input_grad[5]:
        # grad_a[j] = sum over the transpose of g[k] b[dst(k)]
        gcsc = grad.index_select(0, csc_perm)
        ga = _ops.spmm_fwd(csc_ptr, csc_row, gcsc, b.reshape(b.shape[0], H * C), "sum")[0].view(a.shape)
    return None, None, None, None, None, ga, gb


_sddmm_op.register_autograd(_sddmm_backward, setup_context=_sddmm_setup)


@torch.library.custom_op(f"{NS}::edge_softmax", mutates_args=())
def _edge_softmax_op(rowptr: Tensor, scores: Tensor) -> Tensor:
    return _ops.edge_softmax_fwd(rowptr, scores)


@_edge_softmax_op.register_fake
def _(rowptr, scores):
    return torch.empty_like(scores)


def _edge_softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _edge_softmax_backward(ctx, grad):
    rowptr, p = ctx.saved_tensors
    return None, _ops.edge_softmax_bwd(rowptr, p, grad.contiguous())


_edge_softmax_op.register_autograd(_edge_softmax_backward, setup_context=_edge_softmax_setup)


@torch.library.custom_op(f"{NS}::gat_aggregate", mutates_args=())
def _gat_op(
    rowptr: Tensor,
    col: Tensor,
    csc_ptr: Tensor,
    csc_row: Tensor,
    csc_perm: Tensor,
    h: Tensor,
    a_src: Tensor,
    a_dst: Tensor,
    negative_slope: float,
) -> tuple[Tensor, Tensor]:
    return _ops.gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope)


@_gat_op.register_fake
def _(rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, negative_slope):
    return _fake_gat_fwd(rowptr, col, h, a_src, a_dst, negative_slope)


def _gat_setup(ctx, inputs, output):
    rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, slope = inputs
    out, lse = output
    ctx.slope = slope
    ctx.save_for_backward(rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, out, lse)


def _gat_backward(ctx, grad_out, _grad_lse):
    rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, out, lse = ctx.saved_tensors
    gh, gs, gd = _ops.gat_bwd(
        rowptr, col, csc_ptr, csc_row, csc_perm, h, a_src, a_dst, ctx.slope, out, lse, grad_out.contiguous()
    )
    return None, None, None, None, None, gh, gs, gd, None


_gat_op.register_autograd(_gat_backward, setup_context=_gat_setup)


# ---------------------------------------------------------------------------
# public functional API (validation, layout, backend choice)
# ---------------------------------------------------------------------------
def _check_tensor(name, t, graph, dims, dtype=None):
    check_tensor(name, t)
    if dtype is not None:
        check_same_dtype(name, t, "x", dtype)
    check_same_device(name, t, "the graph", graph.device)
    check_dims(name, t, dims)


def _kernel_dtype(t: Tensor, device_type: str) -> torch.dtype:
    # The C++ kernels compute in float32/float64; half types are widened on CPU.
    if device_type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def _run(backend, device, op, fn_kernel, fn_reference):
    choice = _backend.resolve(backend, device, op)
    if choice == "reference":
        return fn_reference()
    if device.type == "cuda":
        with _backend.use_backend(choice):
            return fn_kernel()
    return fn_kernel()


def spmm(graph, x, edge_weight=None, reduce="sum", *, num_nodes=None, backend=None):
    """Sparse aggregation: ``out[i] = reduce_{e: j -> i} w_e * x[j]``.

    Args:
        graph: a :class:`Graph`, or an ``edge_index`` [2, E] (then ``num_nodes``).
        x: [N_src, F] or [N_src, H, C] node features.
        edge_weight: optional [E] (or [E, H] with a 3-D ``x``) in edge order.
        reduce: ``"sum"``, ``"mean"`` (divides by the in-degree), ``"max"`` or
            ``"min"`` (gradients go to the first arg-extremum edge).
            Destinations with no incoming edge get 0.
        backend: force ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"reference"``.

    Returns:
        [N_dst, F] (or [N_dst, H, C]), dtype of ``x``.

    Example::

        >>> g = Graph(torch.tensor([[0, 1, 1], [1, 0, 2]]), num_nodes=3)
        >>> spmm(g, torch.ones(3, 4), reduce="mean").shape
        torch.Size([3, 4])
    """
    graph = as_graph(graph, num_nodes)
    check_choice("reduce", reduce, REDUCES)
    _check_tensor("x", x, graph, (2, 3))
    if x.shape[0] != graph.num_src:
        raise ValueError(f"x has {x.shape[0]} rows but the graph has {graph.num_src} source nodes")
    if edge_weight is not None:
        _check_tensor("edge_weight", edge_weight, graph, (1, 2), x.dtype)
        if edge_weight.shape[0] != graph.num_edges:
            raise ValueError(
                f"edge_weight has {edge_weight.shape[0]} entries but the graph has {graph.num_edges} edges"
            )
        if edge_weight.dim() == 2 and (x.dim() != 3 or edge_weight.shape[1] != x.shape[1]):
            raise ValueError(
                f"edge_weight of shape [E, H] needs x of shape [N, H, C] with the same H; "
                f"got edge_weight {tuple(edge_weight.shape)} and x {tuple(x.shape)}"
            )

    def kernel():
        kd = _kernel_dtype(x, x.device.type)
        x2 = x.reshape(x.shape[0], math.prod(x.shape[1:])).to(kd).contiguous()
        w = None
        if edge_weight is not None:
            w = graph.to_csr_order(edge_weight.to(kd))
            w = (w if w.dim() == 2 else w.unsqueeze(1)).contiguous()
        csc = (
            graph.csc
            if torch.is_grad_enabled() and (x.requires_grad or (w is not None and w.requires_grad))
            else _no_csc(graph)
        )
        out, _ = _spmm_op(graph.rowptr, graph.col, *csc, w, x2, reduce)
        return out.view((graph.num_dst,) + tuple(x.shape[1:])).to(x.dtype)

    return _run(backend, x.device, "spmm", kernel, lambda: ref.spmm(graph, x, edge_weight, reduce))


def _no_csc(graph):
    # Forward-only calls skip building the transpose.
    if graph._csc is not None:
        return graph._csc
    e = graph.rowptr.new_empty((0,))
    return (graph.rowptr.new_zeros((graph.num_src + 1,)), e, e)


def sddmm(graph, a, b, *, num_nodes=None, backend=None):
    """Per-edge dot product: ``out[e, h] = <a[src_e, h], b[dst_e, h]>``.

    Args:
        a: [N_src, H, C] (or [N_src, C]); b: [N_dst, H, C] (or [N_dst, C]).

    Returns:
        [E, H] (or [E]) in edge order.

    Example::

        >>> sddmm(g, torch.randn(3, 2, 8), torch.randn(3, 2, 8)).shape
        torch.Size([3, 2])
    """
    graph = as_graph(graph, num_nodes)
    _check_tensor("a", a, graph, (2, 3))
    _check_tensor("b", b, graph, (2, 3), a.dtype)
    if a.dim() != b.dim() or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"a and b must agree past the node dimension, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] != graph.num_src:
        raise ValueError(f"a has {a.shape[0]} rows but the graph has {graph.num_src} source nodes")
    if b.shape[0] != graph.num_dst:
        raise ValueError(f"b has {b.shape[0]} rows but the graph has {graph.num_dst} destination nodes")

    def kernel():
        kd = _kernel_dtype(a, a.device.type)
        a3 = (a if a.dim() == 3 else a.unsqueeze(1)).to(kd).contiguous()
        b3 = (b if b.dim() == 3 else b.unsqueeze(1)).to(kd).contiguous()
        csc = graph.csc if torch.is_grad_enabled() and a.requires_grad else _no_csc(graph)
        out = _sddmm_op(graph.rowptr, graph.col, *csc, a3, b3)
        out = graph.from_csr_order(out).to(a.dtype)
        return out if a.dim() == 3 else out.squeeze(1)

    return _run(backend, a.device, "sddmm", kernel, lambda: ref.sddmm(graph, a, b))


def edge_softmax(graph, scores, *, num_nodes=None, backend=None):
    """Softmax of ``scores`` over the edges entering each destination (max-subtracted).

    Args:
        scores: [E] or [E, H] in edge order.

    Returns:
        the same shape; each destination's incoming edges sum to 1.

    Example::

        >>> p = edge_softmax(g, torch.randn(g.num_edges, 4))
    """
    graph = as_graph(graph, num_nodes)
    _check_tensor("scores", scores, graph, (1, 2))
    if scores.shape[0] != graph.num_edges:
        raise ValueError(f"scores has {scores.shape[0]} entries but the graph has {graph.num_edges} edges")

    def kernel():
        kd = _kernel_dtype(scores, scores.device.type)
        s = graph.to_csr_order(scores.to(kd))
        s2 = (s if s.dim() == 2 else s.unsqueeze(1)).contiguous()
        p = _edge_softmax_op(graph.rowptr, s2)
        p = graph.from_csr_order(p if scores.dim() == 2 else p.squeeze(1))
        return p.to(scores.dtype)

    return _run(backend, scores.device, "edge_softmax", kernel, lambda: ref.edge_softmax(graph, scores))


def gat_aggregate(graph, h, a_src, a_dst, negative_slope=0.2, *, num_nodes=None, backend=None):
    """Fused GAT attention: LeakyReLU, edge softmax and weighted sum in one op.

    ``out[i] = sum_j softmax_j(LeakyReLU(a_src[j] + a_dst[i])) h[j]``, computed
    per destination with an online softmax; no [E, H, C] tensor is ever made.

    Args:
        h: [N_src, H, C]; a_src: [N_src, H]; a_dst: [N_dst, H].
        negative_slope: LeakyReLU slope (finite).

    Returns:
        [N_dst, H, C]; destinations with no incoming edge get 0.

    Example::

        >>> out = gat_aggregate(g, torch.randn(3, 2, 8), torch.randn(3, 2), torch.randn(3, 2))
    """
    graph = as_graph(graph, num_nodes)
    _check_tensor("h", h, graph, (3,))
    _check_tensor("a_src", a_src, graph, (2,), h.dtype)
    _check_tensor("a_dst", a_dst, graph, (2,), h.dtype)
    H = h.shape[1]
    if h.shape[0] != graph.num_src:
        raise ValueError(f"h has {h.shape[0]} rows but the graph has {graph.num_src} source nodes")
    if a_src.shape != (graph.num_src, H):
        raise ValueError(f"a_src must have shape [N_src, H]=[{graph.num_src}, {H}], got {tuple(a_src.shape)}")
    if a_dst.shape != (graph.num_dst, H):
        raise ValueError(f"a_dst must have shape [N_dst, H]=[{graph.num_dst}, {H}], got {tuple(a_dst.shape)}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    negative_slope = float(negative_slope)
    if negative_slope != negative_slope or negative_slope in (float("inf"), float("-inf")):
        raise ValueError(f"negative_slope must be finite, got {negative_slope}")

    def kernel():
        kd = _kernel_dtype(h, h.device.type)
        hs, s, d = (t.to(kd).contiguous() for t in (h, a_src, a_dst))
        need = torch.is_grad_enabled() and any(t.requires_grad for t in (h, a_src, a_dst))
        csc = graph.csc if need else _no_csc(graph)
        out, _ = _gat_op(graph.rowptr, graph.col, *csc, hs, s, d, negative_slope)
        return out.to(h.dtype)

    return _run(
        backend,
        h.device,
        "gat_aggregate",
        kernel,
        lambda: ref.gat_aggregate(graph, h, a_src, a_dst, negative_slope),
    )


__all__ = ["Graph", "spmm", "sddmm", "edge_softmax", "gat_aggregate"]

"""Triton launchers (kernels/gnn.py) against the float64 reference kernels.

The launchers are called directly: on CPU tensors through the Triton
interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU), and on
CUDA tensors natively when a GPU is present.  The interpreter is slow, so on
CPU the sweep over graphs runs in float32 and float64 gets the small-graph
tests; on CUDA every test also runs in float64, float16 and bfloat16.
"""

import pytest
import torch

from frontiers_fast import Graph
from frontiers_fast._reduce import MAX, MEAN, MIN, REDUCES
from frontiers_fast.ops import gnn as ops
from tests.gnn.graphs import GRAPH_CASES, random_graph
from tests.helpers import assert_close, triton_devices, triton_params

pytest.importorskip("triton")
# imported after conftest, which has set TRITON_INTERPRET for a GPU-less machine
from frontiers_fast.kernels import gnn as K  # noqa: E402

SWEEP = triton_params((torch.float32,))
SMALL = triton_params((torch.float32, torch.float64))

# every case of graphs.py, plus a hub *source* with more out-edges than one
# edge block, so the transposed (backward) loops run several blocks
GRAPHS = [
    pytest.param(c, id="x".join(str(v) for v in c[:3] if v is not None) + ("-skew" if c[3] else ""))
    for c in GRAPH_CASES
]
GRAPHS.append(pytest.param("hub", id="hub"))
SMALL_GRAPH = (13, 40, None, False)


def _graph(case, device):
    if case == "hub":
        n = 20
        src = torch.cat([torch.zeros(100, dtype=torch.int64), torch.randint(0, n, (30,))])
        dst = torch.randint(0, n, (130,))
        return Graph(torch.stack([src, dst]).to(device), n)
    num_src, num_edges, num_dst, skew = case
    return random_graph(num_src, num_edges, num_dst, skew, device=device)


def _randn(*shape, dtype, device):
    return torch.randn(*shape, device=device).to(dtype)


def _f64(t):
    return None if t is None else t.double()


# ---------------------------------------------------------------------------
# spmm
# ---------------------------------------------------------------------------
def _weight_layout(g, w, user_order):
    """(weight, weight_index, csc_weight_index): w read in CSR order, or in the user's order through perm."""
    if w is None or not user_order:
        return w, None, None
    return g.from_csr_order(w), g.perm, g.csc_eid


def _check_spmm(g, reduce, hw, F, dtype, device, user_order=False):
    """Forward (out, arg) and both gradients against the reference."""
    x = _randn(g.num_src, F, dtype=dtype, device=device)
    w = None if hw is None else _randn(g.num_edges, hw, dtype=dtype, device=device)
    w, wid, cwid = _weight_layout(g, w, user_order)
    out, arg = K.spmm_fwd(g.rowptr, g.col, w, wid, x, reduce)
    ref_out, ref_arg = ops._ref_spmm_fwd(g.rowptr, g.col, _f64(w), wid, x.double(), reduce)
    assert out.dtype == dtype and out.shape == (g.num_dst, F)
    assert_close(out, ref_out)
    assert arg.dtype == torch.int64
    assert torch.equal(arg, ref_arg), "arg differs from the first arg-extremum edge"

    grad_out = _randn(g.num_dst, F, dtype=dtype, device=device)
    gx, gw = K.spmm_bwd(*g.csc, g.rowptr, g.col, w, wid, cwid, x, grad_out, arg, reduce, True, True)
    ref_gx, ref_gw = ops._ref_spmm_bwd(
        *g.csc,
        g.rowptr,
        g.col,
        _f64(w),
        wid,
        cwid,
        x.double(),
        grad_out.double(),
        ref_arg,
        reduce,
        True,
        True,
    )
    assert gx.dtype == dtype and gx.shape == x.shape
    assert_close(gx, ref_gx)
    if w is None:
        assert gw.numel() == 0
    else:
        assert gw.dtype == dtype and gw.shape == w.shape
        assert_close(gw, ref_gw)


# mean covers the sum path plus the degree scaling, max the arg-extremum path
# (min is max on negated messages); every reduce runs on every weight layout below.
@pytest.mark.parametrize("reduce", [MEAN, MAX])
@pytest.mark.parametrize("case", GRAPHS)
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_spmm_graphs(device, dtype, case, reduce):
    _check_spmm(_graph(case, device), reduce, 1, 33, dtype, device, user_order=True)


WEIGHT_LAYOUTS = [(None, 1), (None, 33), (1, 1), (1, 33), (3, 33)]  # (Hw or None, F)


@pytest.mark.parametrize("user_order", [False, True], ids=["csr-order", "user-order"])
@pytest.mark.parametrize("hw,F", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("reduce", range(len(REDUCES)), ids=REDUCES)
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_spmm_weights(device, dtype, reduce, hw, F, user_order):
    _check_spmm(_graph(SMALL_GRAPH, device), reduce, hw, F, dtype, device, user_order)


# on CPU, float64 runs the heads layout only; on CUDA test_spmm_weights covers it all
@pytest.mark.parametrize("reduce", range(len(REDUCES)), ids=REDUCES)
@pytest.mark.parametrize("device,dtype", [p for p in SMALL if p.values == ("cpu", torch.float64)])
def test_spmm_float64_cpu(device, dtype, reduce):
    _check_spmm(_graph(SMALL_GRAPH, device), reduce, 3, 33, dtype, device, user_order=True)


@pytest.mark.parametrize("reduce", [MEAN, MIN])
@pytest.mark.parametrize("device,dtype", SMALL)
def test_spmm_bwd_need_flags(device, dtype, reduce):
    g = _graph(SMALL_GRAPH, device)
    F, hw = 6, 2
    x = _randn(g.num_src, F, dtype=dtype, device=device)
    w, wid, cwid = _weight_layout(g, _randn(g.num_edges, hw, dtype=dtype, device=device), True)
    out, arg = K.spmm_fwd(g.rowptr, g.col, w, wid, x, reduce)
    go = _randn(g.num_dst, F, dtype=dtype, device=device)
    ref_gx, ref_gw = ops._ref_spmm_bwd(
        *g.csc, g.rowptr, g.col, w.double(), wid, cwid, x.double(), go.double(), arg, reduce, True, True
    )
    # only grad_x: x may be an empty [0, F] placeholder (autograd does not save it)
    gx, gw = K.spmm_bwd(*g.csc, g.rowptr, g.col, w, wid, cwid, x[:0], go, arg, reduce, True, False)
    assert_close(gx, ref_gx)
    assert gw.numel() == 0
    # only grad_w
    gx, gw = K.spmm_bwd(*g.csc, g.rowptr, g.col, w, wid, cwid, x, go, arg, reduce, False, True)
    assert gx.numel() == 0
    assert_close(gw, ref_gw)
    # neither
    gx, gw = K.spmm_bwd(*g.csc, g.rowptr, g.col, w, wid, cwid, x, go, arg, reduce, False, False)
    assert gx.numel() == 0 and gw.numel() == 0


@pytest.mark.parametrize("device", triton_devices())
def test_spmm_noncontiguous_and_deterministic(device):
    g = _graph(SMALL_GRAPH, device)
    big = torch.randn(g.num_src, 66, device=device)
    x = big[:, ::2]  # [N, 33], stride 66
    w = torch.randn(3, g.num_edges, device=device).t()  # [E, 3], column-major
    assert not x.is_contiguous() and not w.is_contiguous()
    out, arg = K.spmm_fwd(g.rowptr, g.col, w, g.perm, x, MAX)
    ref_out, ref_arg = ops._ref_spmm_fwd(g.rowptr, g.col, w.double(), g.perm, x.double(), MAX)
    assert_close(out, ref_out)
    assert torch.equal(arg, ref_arg)
    go = torch.randn(g.num_dst, 66, device=device)[:, 1::2]
    args = (*g.csc, g.rowptr, g.col, w, g.perm, g.csc_eid, x, go, arg, MAX, True, True)
    first, again = K.spmm_bwd(*args), K.spmm_bwd(*args)
    ref = ops._ref_spmm_bwd(
        *g.csc,
        g.rowptr,
        g.col,
        w.double(),
        g.perm,
        g.csc_eid,
        x.double(),
        go.double(),
        ref_arg,
        MAX,
        True,
        True,
    )
    for a, b, r in zip(first, again, ref):
        assert torch.equal(a, b), "the backward has no atomics, so it must be bitwise reproducible"
        assert_close(a, r)


@pytest.mark.parametrize("reduce", [MAX, MIN], ids=["max", "min"])
@pytest.mark.parametrize("device", triton_devices())
def test_spmm_nan_is_the_extremum(device, reduce):
    # A NaN message wins (first NaN edge) exactly as in the reference and the C++ kernels.
    g = _graph("hub", device)
    x = torch.randn(g.num_src, 5, device=device)
    x[0, 1] = float("nan")  # node 0 is the hub source: its NaN reaches many rows
    x[3, 4] = float("nan")
    out, arg = K.spmm_fwd(g.rowptr, g.col, None, None, x, reduce)
    ref_out, ref_arg = ops._ref_spmm_fwd(g.rowptr, g.col, None, None, x.double(), reduce)
    assert_close(out, ref_out, equal_nan=True)
    assert torch.equal(arg, ref_arg)


# ---------------------------------------------------------------------------
# sddmm
# ---------------------------------------------------------------------------
def _check_sddmm(g, H, C, dtype, device):
    a = _randn(g.num_src, H, C, dtype=dtype, device=device)
    b = _randn(g.num_dst, H, C, dtype=dtype, device=device)
    out = K.sddmm_fwd(g.rowptr, g.col, a, b)
    assert out.dtype == dtype and out.shape == (g.num_edges, H)
    assert_close(out, ops._ref_sddmm_fwd(g.rowptr, g.col, a.double(), b.double()))


@pytest.mark.parametrize("case", GRAPHS)
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_sddmm_graphs(device, dtype, case):
    _check_sddmm(_graph(case, device), 2, 33, dtype, device)


@pytest.mark.parametrize("C", [1, 33])
@pytest.mark.parametrize("device,dtype", SMALL)
def test_sddmm_small(device, dtype, C):
    _check_sddmm(_graph(SMALL_GRAPH, device), 3, C, dtype, device)


# ---------------------------------------------------------------------------
# edge softmax
# ---------------------------------------------------------------------------
def _check_edge_softmax(g, H, dtype, device):
    scores = 3 * _randn(g.num_edges, H, dtype=dtype, device=device)
    p = K.edge_softmax_fwd(g.rowptr, scores)
    ref_p = ops._ref_edge_softmax_fwd(g.rowptr, scores.double())
    assert p.dtype == dtype and p.shape == scores.shape
    assert_close(p, ref_p)

    p_in = ref_p.to(dtype)
    grad_p = _randn(g.num_edges, H, dtype=dtype, device=device)
    gs = K.edge_softmax_bwd(g.rowptr, p_in, grad_p)
    assert gs.dtype == dtype and gs.shape == scores.shape
    assert_close(gs, ops._ref_edge_softmax_bwd(g.rowptr, p_in.double(), grad_p.double()))


@pytest.mark.parametrize("case", GRAPHS)
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_edge_softmax_graphs(device, dtype, case):
    _check_edge_softmax(_graph(case, device), 3, dtype, device)


@pytest.mark.parametrize("H", [1, 5])
@pytest.mark.parametrize("device,dtype", SMALL)
def test_edge_softmax_small(device, dtype, H):
    _check_edge_softmax(_graph(SMALL_GRAPH, device), H, dtype, device)


# ---------------------------------------------------------------------------
# GAT
# ---------------------------------------------------------------------------
def _check_gat(g, H, C, dtype, device, slope=0.2):
    h = _randn(g.num_src, H, C, dtype=dtype, device=device)
    a_src = _randn(g.num_src, H, dtype=dtype, device=device)
    a_dst = _randn(g.num_dst, H, dtype=dtype, device=device)
    out, lse = K.gat_fwd(g.rowptr, g.col, h, a_src, a_dst, slope)
    ref_out, ref_lse = ops._ref_gat_fwd(g.rowptr, g.col, h.double(), a_src.double(), a_dst.double(), slope)
    # the fake kernel makes both outputs with h.new_empty
    assert out.dtype == dtype and out.shape == (g.num_dst, H, C)
    assert lse.dtype == dtype and lse.shape == (g.num_dst, H)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)  # -inf for empty rows on both sides

    grad_out = _randn(g.num_dst, H, C, dtype=dtype, device=device)
    grads = K.gat_bwd(g.rowptr, g.col, *g.csc, h, a_src, a_dst, slope, out, lse, grad_out)
    refs = ops._ref_gat_bwd(
        g.rowptr, g.col, *g.csc, h.double(), a_src.double(), a_dst.double(), slope,
        ref_out, ref_lse, grad_out.double(),
    )  # fmt: skip
    for name, got, ref, like in zip(("grad_h", "grad_a_src", "grad_a_dst"), grads, refs, (h, a_src, a_dst)):
        assert got.dtype == dtype and got.shape == like.shape, name
        assert_close(got, ref, msg=name)


@pytest.mark.parametrize("case", GRAPHS)
@pytest.mark.parametrize("device,dtype", SWEEP)
def test_gat_graphs(device, dtype, case):
    # one head keeps the interpreter fast; the small-graph tests cover several
    _check_gat(_graph(case, device), 1, 33, dtype, device)


@pytest.mark.parametrize("H,C,slope", [(1, 1, 0.2), (3, 33, 0.2), (2, 5, 1.5)])
@pytest.mark.parametrize("device,dtype", SMALL)
def test_gat_small(device, dtype, H, C, slope):
    _check_gat(_graph(SMALL_GRAPH, device), H, C, dtype, device, slope)


@pytest.mark.parametrize("device", triton_devices())
def test_gat_bwd_deterministic(device):
    g = _graph("hub", device)
    h = torch.randn(g.num_src, 2, 8, device=device)
    a_src, a_dst = torch.randn(g.num_src, 2, device=device), torch.randn(g.num_dst, 2, device=device)
    out, lse = K.gat_fwd(g.rowptr, g.col, h, a_src, a_dst, 0.2)
    go = torch.randn_like(out)
    first = K.gat_bwd(g.rowptr, g.col, *g.csc, h, a_src, a_dst, 0.2, out, lse, go)
    again = K.gat_bwd(g.rowptr, g.col, *g.csc, h, a_src, a_dst, 0.2, out, lse, go)
    for a, b in zip(first, again):
        assert torch.equal(a, b)

"""Public GNN ops against the float64 reference, on every backend that can run here."""

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast import Graph
from frontiers_fast.reference import gnn as ref

from ..helpers import TOL, assert_close, backend_cases, check_against_reference
from .graphs import GRAPH_CASES, random_graph

CASES = backend_cases("spmm")
DTYPES = [torch.float32, torch.float64]
REDUCES = ["sum", "mean", "max", "min"]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("case", GRAPH_CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_spmm(device, backend, dtype, reduce, case, weighted):
    g = random_graph(case[0], case[1], case[2], case[3], device=device)
    for feat in [(1,), (33,)]:
        x = torch.randn((g.num_src,) + feat, device=device, requires_grad=True)
        w = torch.rand(g.num_edges, device=device, requires_grad=True) + 0.5 if weighted else None
        inputs = [x] + ([w] if weighted else [])
        check_against_reference(
            lambda x, w=None, backend=None: ff.spmm(g, x, w, reduce, backend=backend),
            lambda x, w=None: ref.spmm(g, x, w, reduce),
            inputs,
            dtype,
            backend,
        )


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("reduce", REDUCES)
def test_spmm_multihead_weight(device, backend, reduce):
    g = random_graph(57, 300, skew=True, device=device)
    x = torch.randn(g.num_src, 3, 5, device=device, requires_grad=True)
    w = torch.randn(g.num_edges, 3, device=device, requires_grad=True)
    check_against_reference(
        lambda x, w, backend=None: ff.spmm(g, x, w, reduce, backend=backend),
        lambda x, w: ref.spmm(g, x, w, reduce),
        [x, w],
        torch.float64,
        backend,
    )


@pytest.mark.parametrize("device,backend", CASES)
def test_spmm_max_ties_route_to_first_edge(device, backend):
    # Duplicate edges give exactly tied messages: the gradient goes to the first.
    ei = torch.tensor([[0, 1, 0, 2], [1, 1, 1, 1]], device=device)
    g = Graph(ei, 3)
    x = torch.tensor([[2.0], [1.0], [-1.0]], device=device)
    w = torch.ones(4, device=device, requires_grad=True)
    out = ff.spmm(g, x, w, "max", backend=backend)
    (gw,) = torch.autograd.grad(out.sum(), w)
    assert gw.tolist() == [2.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("device,backend", backend_cases("sddmm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GRAPH_CASES)
def test_sddmm(device, backend, dtype, case):
    g = random_graph(case[0], case[1], case[2], case[3], device=device)
    a = torch.randn(g.num_src, 2, 7, device=device, requires_grad=True)
    b = torch.randn(g.num_dst, 2, 7, device=device, requires_grad=True)
    check_against_reference(
        lambda a, b, backend=None: ff.sddmm(g, a, b, backend=backend),
        lambda a, b: ref.sddmm(g, a, b),
        [a, b],
        dtype,
        backend,
    )


@pytest.mark.parametrize("device,backend", backend_cases("edge_softmax"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GRAPH_CASES)
@pytest.mark.parametrize("heads", [None, 3])
def test_edge_softmax(device, backend, dtype, case, heads):
    g = random_graph(case[0], case[1], case[2], case[3], device=device)
    shape = (g.num_edges,) if heads is None else (g.num_edges, heads)
    s = (3 * torch.randn(shape, device=device)).requires_grad_(True)
    check_against_reference(
        lambda s, backend=None: ff.edge_softmax(g, s, backend=backend),
        lambda s: ref.edge_softmax(g, s),
        [s],
        dtype,
        backend,
    )


@pytest.mark.parametrize("device,backend", backend_cases("gat_aggregate"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GRAPH_CASES)
@pytest.mark.parametrize("hc", [(1, 1), (3, 16), (2, 33)])
def test_gat_aggregate(device, backend, dtype, case, hc):
    g = random_graph(case[0], case[1], case[2], case[3], device=device)
    H, C = hc
    h = torch.randn(g.num_src, H, C, device=device, requires_grad=True)
    s = torch.randn(g.num_src, H, device=device, requires_grad=True)
    d = torch.randn(g.num_dst, H, device=device, requires_grad=True)
    check_against_reference(
        lambda h, s, d, backend=None: ff.gat_aggregate(g, h, s, d, 0.2, backend=backend),
        lambda h, s, d: ref.gat_aggregate(g, h, s, d, 0.2),
        [h, s, d],
        dtype,
        backend,
    )


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_inputs(device, backend):
    g = random_graph(40, 200, device=device)
    big = torch.randn(g.num_src, 2, 24, device=device)
    x = big[:, 1, ::3].requires_grad_(True)  # [N, 8], strided
    assert not x.is_contiguous()
    wbig = torch.rand(g.num_edges, 2, device=device) + 0.1
    w = wbig[:, 0].requires_grad_(True)
    for reduce in REDUCES:
        check_against_reference(
            lambda x, w, backend=None: ff.spmm(g, x, w, reduce, backend=backend),
            lambda x, w: ref.spmm(g, x, w, reduce),
            [x, w],
            torch.float64,
            backend,
        )
    h = big.transpose(1, 2)[:, :5, :].requires_grad_(True)  # [N, 5, 2], strided
    s = torch.randn(2, g.num_src, device=device).T.requires_grad_(True)  # [N, 2], transposed storage
    dd = torch.randn(2, g.num_dst, device=device).T.requires_grad_(True)
    check_against_reference(
        lambda h, s, d, backend=None: ff.gat_aggregate(g, h.transpose(1, 2)[:, :2, :], s, d, backend=backend),
        lambda h, s, d: ref.gat_aggregate(g, h.transpose(1, 2)[:, :2, :], s, d),
        [h, s, dd],
        torch.float64,
        backend,
    )


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types(device, backend, dtype):
    g = random_graph(60, 400, device=device)
    x = torch.randn(g.num_src, 24, device=device).to(dtype).requires_grad_(True)
    check_against_reference(
        lambda x, backend=None: ff.spmm(g, x, None, "mean", backend=backend),
        lambda x: ref.spmm(g, x, None, "mean"),
        [x],
        dtype,
        backend,
    )


def test_reference_backend_matches_reference_module():
    g = random_graph(30, 100)
    x = torch.randn(30, 4)
    torch.testing.assert_close(ff.spmm(g, x, backend="reference"), ref.spmm(g, x))


def test_env_var_forces_backend(monkeypatch):
    g = random_graph(30, 100)
    x = torch.randn(30, 4, dtype=torch.float64)
    monkeypatch.setenv("FRONTIERS_FAST_BACKEND", "reference")
    out_ref = ff.spmm(g, x)
    monkeypatch.setenv("FRONTIERS_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FRONTIERS_FAST_BACKEND must be one of"):
        ff.spmm(g, x)
    monkeypatch.delenv("FRONTIERS_FAST_BACKEND")
    assert_close(ff.spmm(g, x), out_ref)


def test_backends_report():
    info = ff.backends()
    assert set(info) == {"triton", "cuda", "cpp", "reference"}
    for v in info.values():
        assert isinstance(v["available"], bool) and v["why"]
    assert info["reference"]["available"]


def test_tolerance_table_is_tight():
    # Guard against someone loosening the table to get green.
    assert TOL[torch.float32][0] <= 1e-4 and TOL[torch.float64][0] <= 1e-10


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_reference_kernels_match_autograd(case):
    """The CSR-form reference kernels (the fallback backend) agree with autograd through the reference."""
    from frontiers_fast.ops import gnn as ops

    g = random_graph(case[0], case[1], case[2], case[3])
    dt = torch.float64
    h = torch.randn(g.num_src, 2, 3, dtype=dt, requires_grad=True)
    s = torch.randn(g.num_src, 2, dtype=dt, requires_grad=True)
    d = torch.randn(g.num_dst, 2, dtype=dt, requires_grad=True)
    out_ref = ref.gat_aggregate(g, h, s, d, 0.2)
    go = torch.randn_like(out_ref)
    want = torch.autograd.grad(out_ref, [h, s, d], go, allow_unused=True) if out_ref.numel() else None
    with torch.no_grad():
        out, lse = ops._ref_gat_fwd(g.rowptr, g.col, h, s, d, 0.2)
        got = ops._ref_gat_bwd(g.rowptr, g.col, *g.csc, h, s, d, 0.2, out, lse, go)
    assert_close(out, out_ref)
    if want is not None:
        for a, b, t in zip(got, want, (h, s, d)):
            assert_close(a, b if b is not None else torch.zeros_like(t))
    x = torch.randn(g.num_src, 4, dtype=dt, requires_grad=True)
    w = torch.rand(g.num_edges, 2, dtype=dt, requires_grad=True)  # in the user's edge order
    for code, reduce in enumerate(REDUCES):
        out_ref = ref.spmm(g, x.view(-1, 2, 2), w, reduce).view(-1, 4)
        go = torch.randn_like(out_ref)
        with torch.no_grad():
            out, arg = ops._ref_spmm_fwd(g.rowptr, g.col, w, g.perm, x, code)
            gx, gw = ops._ref_spmm_bwd(
                *g.csc, g.rowptr, g.col, w, g.perm, g.csc_eid, x, go, arg, code, True, True
            )
        assert_close(out, out_ref)
        if out_ref.numel():
            wx, ww = torch.autograd.grad(out_ref, [x, w], go, allow_unused=True)
            assert_close(gx, wx)
            assert_close(gw, ww if ww is not None else torch.zeros_like(w))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("reduce", REDUCES)
def test_spmm_weight_grad_only(device, backend, reduce):
    # Only the edge weight asks for a gradient (e.g. learned edge weights on fixed features).
    g = random_graph(31, 150, device=device)
    x = torch.randn(g.num_src, 6, device=device)
    w = torch.randn(g.num_edges, device=device, requires_grad=True)
    check_against_reference(
        lambda x, w, backend=None: ff.spmm(g, x, w, reduce, backend=backend),
        lambda x, w: ref.spmm(g, x, w, reduce),
        [x, w],
        torch.float64,
        backend,
    )

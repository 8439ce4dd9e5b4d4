"""Every backward is deterministic: bitwise the same across repeats and thread counts.

Each case computes the gradients of one public function four times (1 and 2
threads, twice each) on the same inputs and asserts they are identical to the
bit.  The graphs have hub rows long enough for the C++ scheduler to split them
into pieces, which is where an order-dependent reduction would show.
"""

import pytest
import torch

import frontiers_fast as ff

from .gnn.graphs import random_graph
from .helpers import backends_for


def _grads_four_ways(fn, leaves):
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            out = fn(*leaves)
            seed = torch.ones_like(out)
            runs.append(torch.autograd.grad(out, leaves, seed, allow_unused=True))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), "a gradient differs between runs or thread counts"


def _hub_graph():
    # 2000 nodes, 40k edges, a few destinations with thousands of edges.
    return random_graph(2000, 40_000, skew=True)


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("backend", backends_for("spmm", "cpu"))
@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_spmm(backend, reduce):
    g = _hub_graph()
    x = _leaf(g.num_src, 3, 8)
    w = (torch.rand(g.num_edges, 3) + 0.5).requires_grad_(True)
    _grads_four_ways(lambda x, w: ff.spmm(g, x, w, reduce, backend=backend), [x, w])


@pytest.mark.parametrize("backend", backends_for("gat_aggregate", "cpu"))
def test_gat_sddmm_softmax(backend):
    g = _hub_graph()
    h, s, d = _leaf(g.num_src, 2, 16), _leaf(g.num_src, 2), _leaf(g.num_dst, 2)
    _grads_four_ways(lambda h, s, d: ff.gat_aggregate(g, h, s, d, backend=backend), [h, s, d])
    a, b = _leaf(g.num_src, 2, 8), _leaf(g.num_dst, 2, 8)
    _grads_four_ways(lambda a, b: ff.sddmm(g, a, b, backend=backend), [a, b])
    e = _leaf(g.num_edges, 2)
    _grads_four_ways(lambda e: ff.edge_softmax(g, e, backend=backend).pow(2), [e])


@pytest.mark.parametrize("backend", backends_for("selective_scan", "cpu"))
@pytest.mark.parametrize("layout", ["constant", "variable", "grouped", "packed"])
def test_ssm_scan(backend, layout):
    # dim 80 with 2 groups: several channel blocks per group, whose channel sums
    # of B and C are combined across tasks; L 300 spans several checkpoints.
    batch, dim, N, L = (1, 80, 16, 300) if layout == "packed" else (3, 80, 16, 300)
    u, dt = _leaf(batch, dim, L), (torch.rand(batch, dim, L) * 0.1).requires_grad_(True)
    A, D, bias = (-torch.rand(dim, N)).requires_grad_(True), _leaf(dim), _leaf(dim)
    shape = {"constant": (dim, N), "grouped": (batch, 2, N, L)}.get(layout, (batch, N, L))
    B, C, z = _leaf(*shape), _leaf(*shape), _leaf(batch, dim, L)
    cu = torch.tensor([0, 70, 70, 200, 300]) if layout == "packed" else None
    h0 = _leaf(4 if cu is not None else batch, dim, N)

    def scan(u, dt, A, B, C, D, z, bias, h0):
        out, last = ff.selective_scan(u, dt, A, B, C, D, z, bias, True, True, h0, cu, backend=backend)
        return out * 1.5 + last.sum()

    _grads_four_ways(scan, [u, dt, A, B, C, D, z, bias, h0])


@pytest.mark.parametrize("backend", backends_for("causal_conv1d", "cpu"))
def test_ssm_conv(backend):
    u, w, b = _leaf(3, 40, 500), _leaf(40, 4), _leaf(40)
    _grads_four_ways(lambda u, w, b: ff.causal_conv1d(u, w, b, activation="silu", backend=backend), [u, w, b])
    cu = torch.tensor([0, 2, 300, 500])
    x = _leaf(1, 40, 500)
    _grads_four_ways(lambda x, w: ff.causal_conv1d(x, w, cu_seqlens=cu, backend=backend), [x, w])


_MOE_CASES = [(b, 64) for b in backends_for("fused_moe", "cpu")] + [
    # The reference's expert GEMMs are torch.mm calls, which MKL threads over their inner dimension
    # once it is long: it pins the semantics, and only the kernels promise reproducible bits there.
    (b, 900)
    for b in backends_for("fused_moe", "cpu")
    if b != "reference"
]


@pytest.mark.parametrize("backend,T", _MOE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe(backend, T, dtype):
    # T=64 spreads the experts over the threads; at T=900 one expert takes half of the rows, and its
    # weight gradients sum over 900 of them.
    x, logits = _leaf(T, 64, dtype=dtype), _leaf(T, 8)
    wgu, wd = _leaf(8, 96, 64, dtype=dtype), _leaf(8, 64, 48, dtype=dtype)
    bias = torch.zeros(8)
    bias[0] = 2.0  # pulls every token's first choice to expert 0

    def block(x, logits, wgu, wd):
        weights, ids = ff.moe_route(logits, 2, "sigmoid", correction_bias=bias, backend=backend)
        x_perm, _, row_map = ff.moe_permute(x, ids, 8, backend=backend)
        y = ff.fused_moe(x, wgu, wd, weights, ids, backend=backend)
        return y + ff.moe_unpermute(x_perm, row_map, weights, backend=backend)

    _grads_four_ways(block, [x, logits, wgu, wd])


def test_deq():
    W = torch.nn.Parameter(0.3 * torch.randn(16, 16) / 4)
    x = _leaf(8, 16)

    def layer(W, x):
        z, _ = ff.deq(lambda z: torch.tanh(z @ W + x), torch.zeros(8, 16), tol=1e-6, b_tol=1e-8)
        return z

    _grads_four_ways(layer, [W, x])


@pytest.mark.parametrize("packed", [False, True])
def test_splat(packed):
    from .splat.scenes import cameras, gaussians

    W, H = 40, 30
    means, quats, scales, opacities = gaussians(40, dtype=torch.float32)
    viewmats, Ks = cameras(2, W, H, dtype=torch.float32)
    colors = torch.rand(40, 3)
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]

    def render(means, quats, scales, opacities, colors):
        img, _, _ = ff.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, W, H, tile_size=8, packed=packed
        )
        return img

    _grads_four_ways(render, leaves)


@pytest.mark.parametrize("backend", backends_for("spherical_harmonics", "cpu"))
def test_spherical_harmonics(backend):
    dirs, coeffs = _leaf(5000, 3), _leaf(5000, 16, 3)
    masks = torch.rand(5000) > 0.2
    _grads_four_ways(lambda d, c: ff.spherical_harmonics(3, d, c, masks, backend=backend), [dirs, coeffs])


@pytest.mark.parametrize(
    "backend", [b for b in backends_for("rasterize_to_pixels", "cpu") if b != "reference"]
)
def test_rasterize_to_pixels(backend):
    # Many Gaussians per tile and per pixel: every tile's records and every
    # Gaussian's sum over its tiles are reduced in a fixed order.  (The
    # reference's backward is autograd through torch's bmm and sums, whose
    # splits follow the thread count: it is not among the cases.)
    from .splat.scenes import projected

    W, H, ts = 96, 64, 16
    means2d, conics, opac, offsets, fids, _, _ = projected(2, 3000, W, H, ts, dtype=torch.float32)
    colors = torch.rand(2, 3000, 3)
    bg = torch.rand(2, 3)
    leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opac, bg)]

    def render(m, c, col, o, b):
        img, alpha = ff.rasterize_to_pixels(m, c, col, o, W, H, ts, offsets, fids, b, backend=backend)
        return img.sum(-1) + alpha[..., 0]

    _grads_four_ways(render, leaves)


@pytest.mark.parametrize("backend", backends_for("project_gaussians", "cpu"))
@pytest.mark.parametrize("antialiased", [False, True])
def test_project_gaussians(backend, antialiased):
    # 3000 Gaussians: several of the C++ backward's fixed chunks, whose
    # per-camera partial sums (viewmats, Ks) are added in chunk order.  In
    # float64: the C++ sums run in float64, and rounding them to float32
    # would hide a change of order.
    from .splat.scenes import cameras, gaussians

    W, H = 64, 48
    means, quats, scales, opacities = gaussians(3000, extent=2.0)
    viewmats, Ks = cameras(3, W, H)
    weights = torch.randn(
        3 * 3000 * 7, dtype=torch.float64
    )  # (means2d, depths, conics, compensations) of each pair
    leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, viewmats, Ks)]

    def project(m, q, s, v, k):
        _, m2d, z, con, comp = ff.project_gaussians(m, q, s, opacities, v, k, W, H, antialiased=antialiased,
                                                    backend=backend)  # fmt: skip
        return torch.cat([m2d.flatten(), z.flatten(), con.flatten(), comp.flatten()]) * weights

    _grads_four_ways(project, leaves)

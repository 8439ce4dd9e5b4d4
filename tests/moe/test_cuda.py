"""The CUDA extension's MoE kernels (csrc/moe/route.cu): ``moe_route`` and ``moe_permute``'s forward.

``backend="cuda"`` against the float64 reference on fresh random inputs: the
chosen ids, the expert offsets and the row map exactly, the weights to the
score dtype's tolerance, the permuted rows bit for bit.  Odd token counts
(T = 1, 7, 129), k = 1, 2, 8, every routing option and storage dtype, ties,
``-inf`` masks, idle experts, int32 and int64 ids, strided inputs, the value
checks' messages, and a CUDA-graph capture of both ops replayed on new
inputs.  Outputs are NaN-poisoned (FRONTIERS_FAST_DEBUG_POISON=1, set by
conftest), so an element a kernel leaves unwritten fails the comparison.

These ops have no cuda backward, so the inputs here never require grad.
Needs a CUDA device and an extension built with CUDA (benchmarks/gpu_check.sh
runs this file on a GPU machine).
"""

import pytest
import torch

from frontiers_fast import _backend
from frontiers_fast.ops import moe
from frontiers_fast.reference import moe as ref

from ..helpers import assert_close, spy_backends


def _cuda_built() -> bool:
    return all(_backend.OPS[op].available("cuda")[0] for op in ("moe_route", "moe_permute"))


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not _cuda_built(), reason="frontiers_fast._C was built without CUDA"
    ),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (T, E, k): odd token counts, k = 1, 2, 8; E much larger than T*k leaves experts idle.
SIZES = [(1, 4, 1), (7, 5, 2), (129, 8, 2), (7, 16, 8), (129, 64, 8), (1, 32, 8), (129, 256, 8)]
ROUTINGS = {
    "softmax": dict(),
    "softmax-raw-scaled": dict(renormalize=False, scaling=1.7),
    "softmax-bias": dict(bias=True),
    "softmax-grouped": dict(groups=True),
    "sigmoid": dict(scoring="sigmoid"),
    "sigmoid-bias-grouped": dict(scoring="sigmoid", bias=True, groups=True, scaling=2.5),
}
_native = torch.ops.frontiers_fast_native


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _route_both(logits, top_k, scoring="softmax", renormalize=True, bias=None, n_group=None, topk_group=None,
                scaling=1.0):  # fmt: skip
    """(ours on CUDA, the float64 reference on the same values)."""
    got = moe.moe_route(
        logits, top_k, scoring, renormalize, bias, n_group, topk_group, scaling, backend="cuda"
    )
    rbias = None if bias is None else bias.double().cpu()
    want = ref.moe_route(
        logits.double().cpu(), top_k, scoring, renormalize, rbias, n_group, topk_group, scaling
    )
    return got, want


def _check_route(got, want, dtype, what=""):
    (w, ids), (want_w, want_ids) = got, want
    assert w.device.type == "cuda" and ids.dtype == torch.int32 and w.dtype == _acc(dtype)
    assert w.is_contiguous() and ids.is_contiguous()
    assert torch.equal(ids.cpu(), want_ids), f"{what}: the chosen experts differ from the reference"
    assert_close(w.cpu(), want_w, _acc(dtype), msg=what)


# ---------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", SIZES)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_route(routing, T, E, k, dtype):
    kw = dict(ROUTINGS[routing])
    bias = (torch.randn(E) * 0.3).to(DEV) if kw.pop("bias", False) else None
    if kw.pop("groups", False):
        if E % 4 or k > E // 2:
            pytest.skip("grouping needs 4 groups of at least k / 2 experts")
        kw.update(n_group=4, topk_group=2)
    logits = torch.randn(T, E) * 2
    # a masked expert in every row, when enough are left to choose from
    if E - 1 >= k and not (kw.get("n_group") and k > E // 2 - 1):
        logits[:, 1] = float("-inf")
    logits = logits.to(DEV, dtype)
    with spy_backends() as calls:
        got, want = _route_both(logits, k, bias=bias, **kw)
    assert calls[("moe_route", "cuda")] == 1
    _check_route(got, want, dtype, routing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_route_many_rows_and_wide_rows(dtype):
    # more rows than one wave of blocks; E up to the kernel's limit (few rows per block fit in shared memory)
    for T, E, k, groups in (
        (5000, 8, 2, None),
        (33, 2048, 8, (16, 3)),
        (9, 384, 8, (8, 4)),
        (9, 96, 8, (96, 40)),
    ):
        logits = (torch.randn(T, E) * 2).to(DEV, dtype)
        bias = (torch.randn(E) * 0.2).to(DEV)
        ng, tg = groups or (None, None)
        _check_route(*_route_both(logits, k, "sigmoid", True, bias, ng, tg, 2.5), dtype, f"T={T} E={E}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_ties_go_to_the_lowest_id(dtype):
    # Equal logits give equal scores in every precision, so these ties are exact on both sides.
    T, E = 7, 16
    logits = torch.randn(T, E)
    logits[:, 9] = logits[:, 3]
    logits[:, 12] = logits[:, 3]
    logits[:, 5] = logits[:, 0]
    logits[0] = 0.25  # a row of ties
    logits[1, :8] = logits[1, 8:]  # two identical halves: groups 0-1 tie with groups 2-3
    logits = logits.to(DEV, dtype)
    for k in (1, 2, 5, 16):
        _check_route(*_route_both(logits, k), dtype, f"softmax k={k}")
        _check_route(*_route_both(logits, k, "sigmoid", False), dtype, f"sigmoid k={k}")
    # grouped: identical groups tie on their score, the lower group is kept
    same = torch.randn(1, 4).repeat(T, 4).to(DEV, dtype)
    bias = torch.zeros(E, device=DEV)
    for tg, k in ((1, 2), (2, 6), (3, 4)):
        _check_route(*_route_both(same, k, "sigmoid", True, bias, 4, tg), dtype, f"grouped tg={tg}")
        _check_route(*_route_both(same, k, "softmax", True, None, 4, tg), dtype, f"grouped tg={tg}")
        # the ids themselves: the first tg groups, best expert first, lowest id among equals
        _, ids = moe.moe_route(same, k, "sigmoid", True, bias, 4, tg, backend="cuda")
        assert int(ids.max()) < 4 * tg


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_minus_inf_masks(dtype):
    T, E, k = 9, 12, 3
    logits = torch.randn(T, E)
    logits[:, 0] = float("-inf")
    # row 2: exactly k unmasked experts (1, 2 and 11)
    logits[2, 3:] = float("-inf")
    logits[2, 1:3] = torch.tensor([0.5, -0.5])
    logits[2, 11] = 2.0
    logits[4, :9] = float("-inf")  # the last three are the only choice
    bias = torch.zeros(E)
    bias[0] = 50.0  # a bias cannot revive a masked expert
    bias[4] = -50.0
    logits, bias = logits.to(DEV, dtype), bias.to(DEV)
    for scoring in ("softmax", "sigmoid"):
        got, want = _route_both(logits, k, scoring, True, bias)
        _check_route(got, want, dtype, scoring)
        assert not (got[1] == 0).any()
        assert sorted(got[1][4].tolist()) == [9, 10, 11]
    # grouped, with masks: groups of 3 (0-2, 3-5, 6-8, 9-11); the top-2 rule needs two unmasked experts
    lg = torch.randn(T, E)
    lg[:, [0, 1, 4]] = float("-inf")  # group 0 has one unmasked expert, group 1 two
    lg = lg.to(DEV, dtype)
    for bias in (None, torch.randn(E, device=DEV) * 0.1):
        for scoring in ("softmax", "sigmoid"):
            _check_route(*_route_both(lg, 2, scoring, True, bias, 4, 2), dtype, f"grouped masks {scoring}")


def test_route_strided_logits_and_side_stream():
    big = torch.randn(40, 70, device=DEV)
    logits = big[3:, 5:69:2]  # strided columns: copied; strided rows are read in place
    _check_route(*_route_both(logits, 4), torch.float32, "strided columns")
    logits = big[3:, 1:65]
    _check_route(*_route_both(logits, 4, "sigmoid", True, None, 8, 3), torch.float32, "strided rows")
    eager = moe.moe_route(logits, 4, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = moe.moe_route(logits, 4, backend="cuda")
    side.synchronize()
    assert torch.equal(on_side[0], eager[0]) and torch.equal(on_side[1], eager[1])


def test_route_no_tokens():
    w, ids = moe.moe_route(torch.randn(0, 8, device=DEV), 2, backend="cuda")
    assert w.shape == ids.shape == (0, 2) and w.device.type == "cuda"


def test_route_errors():
    lg = torch.randn(5, 8, device=DEV)
    op = lambda logits, k=2, bias=None, ng=None, tg=None: _native.moe_route(
        logits, k, "softmax", True, bias, ng, tg, 1.0
    )
    bad = lg.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits must not contain NaN or \+inf"):
        op(bad)
    bad = lg.clone()
    bad[1, 6] = float("inf")
    with pytest.raises(ValueError, match=r"logits must not contain NaN or \+inf"):
        op(bad)
    bad = lg.clone()
    bad[3, 1:] = float("-inf")
    bad[4, :] = float("-inf")
    with pytest.raises(ValueError, match=r"logits row 3 has fewer than top_k=2 selectable experts: each row"):
        op(bad)
    bad = lg.clone()
    bad[2, [0, 2, 3, 4, 5, 6, 7]] = float("-inf")  # one unmasked expert in group 0, none elsewhere
    with pytest.raises(
        ValueError, match="logits row 2 has fewer than top_k=2 selectable experts in its topk_group"
    ):
        op(bad, 2, None, 4, 1)
    with pytest.raises(ValueError, match=r"correction_bias must be finite \(it contains NaN or inf\)"):
        op(lg, 2, torch.tensor([float("nan")] + [0.0] * 7, device=DEV))
    with pytest.raises(ValueError, match="correction_bias must be finite"):
        op(lg[:0], 2, torch.tensor([float("-inf")] + [0.0] * 7, device=DEV))
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, 8\], got 9"):
        op(lg, 9)
    with pytest.raises(ValueError, match="scoring must be 'softmax' or 'sigmoid'"):
        _native.moe_route(lg, 2, "relu", True, None, None, None, 1.0)
    with pytest.raises(ValueError, match="n_group and topk_group must be given together"):
        op(lg, 2, None, 4, None)
    with pytest.raises(ValueError, match="n_group must divide E=8, got 3"):
        op(lg, 2, None, 3, 1)
    with pytest.raises(ValueError, match=r"topk_group must lie in \[1, 4\], got 5"):
        op(lg, 2, None, 4, 5)
    with pytest.raises(ValueError, match="top_k=5 exceeds the 4 experts in the topk_group=2 kept groups"):
        op(lg, 5, None, 4, 2)
    with pytest.raises(RuntimeError, match=r"correction_bias must be \[E\]=\[8\]"):
        op(lg, 2, torch.zeros(7, device=DEV))
    with pytest.raises(RuntimeError, match="correction_bias"):
        op(lg, 2, torch.zeros(8))  # on the CPU
    with pytest.raises(RuntimeError, match="logits must be float16, bfloat16, float32 or float64"):
        op(lg.int())
    with pytest.raises(RuntimeError, match="supports E <= 2048"):
        op(torch.randn(2, 2049, device=DEV))
    # a good call still works after the errors
    _check_route(*_route_both(lg, 2), torch.float32)


# ---------------------------------------------------------------------------
# moe_permute
# ---------------------------------------------------------------------------
def _check_permute(x, ids, E, what=""):
    xp, off, row_map = moe.moe_permute(x, ids, E, backend="cuda")
    want_xp, want_off, want_rm = ref.moe_permute(x.cpu(), ids.cpu(), E)
    assert off.dtype == row_map.dtype == torch.int64 and xp.dtype == x.dtype
    assert xp.shape == want_xp.shape and row_map.shape == ids.shape and off.shape == (E + 1,)
    assert torch.equal(off.cpu(), want_off), f"{what}: expert offsets"
    assert torch.equal(row_map.cpu(), want_rm), f"{what}: row map"
    assert torch.equal(xp.cpu(), want_xp), f"{what}: permuted rows"  # a copy: bit for bit (NaN-free inputs)
    return xp, off, row_map


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", SIZES)
def test_permute(T, E, k, dtype, id_dtype):
    idle = {1, E - 1} if E > k + 2 else set()
    score = torch.rand(T, E)
    score[:, list(idle)] = -1.0
    ids = score.argsort(dim=1, descending=True)[:, :k].to(DEV, id_dtype)
    for H in (19, 64, 1):  # odd rows (2-byte copies), 16-byte-aligned rows, one feature
        x = torch.randn(T, H).to(DEV, dtype)
        xp, off, _ = _check_permute(x, ids, E, f"H={H}")
        counts = (off[1:] - off[:-1]).cpu()
        assert all(counts[e] == 0 for e in idle)
        again = moe.moe_permute(x, ids, E, backend="cuda")
        assert torch.equal(again[0], xp) and torch.equal(again[1], off)  # deterministic


def test_permute_many_tiles_skewed_strided():
    # several tiles of 256 pairs; one expert takes most pairs; a token may pick an expert twice
    T, E, k = 1500, 9, 3
    ids = torch.where(torch.rand(T, k) < 0.7, 0, torch.randint(0, E, (T, k))).to(DEV)
    wide = torch.randn(T, 70, device=DEV, dtype=torch.bfloat16)
    _check_permute(wide[:, 3:67], ids, E, "strided rows")  # read in place
    _check_permute(wide[:, 1:69:2], ids.int(), E, "strided columns")  # copied first
    _check_permute(torch.randn(T, 0, device=DEV), ids, E, "no features")
    xp, off, row_map = moe.moe_permute(torch.randn(0, 4, device=DEV), torch.zeros(0, 2, dtype=torch.long, device=DEV), 3, backend="cuda")  # fmt: skip
    assert xp.shape == (0, 4) and row_map.shape == (0, 2) and off.tolist() == [0, 0, 0, 0]


def test_permute_errors():
    x = torch.randn(6, 4, device=DEV)
    ids = torch.randint(0, 3, (6, 2), device=DEV)
    ids[4, 1] = 3
    with pytest.raises(
        ValueError, match=r"ids must lie in \[0, 2\] \(there are 3 experts\), got values in \[0, 3\]"
    ):
        _native.moe_permute(x, ids, 3)
    ids[4, 1] = -5
    with pytest.raises(ValueError, match=r"got values in \[-5, 2\]"):
        _native.moe_permute(x, ids.int(), 3)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 2\]"):
        torch.ops.frontiers_fast.moe_permute(x, ids, 3, "cuda")
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        _native.moe_permute(x, ids.clamp(0), 0)
    with pytest.raises(RuntimeError, match="ids has 5 rows but x has 6 tokens"):
        _native.moe_permute(x, ids[:5].clamp(0), 3)
    with pytest.raises(RuntimeError, match="ids must be int32 or int64"):
        _native.moe_permute(x, ids.clamp(0).float(), 3)
    with pytest.raises(RuntimeError, match="ids"):
        _native.moe_permute(x, ids.clamp(0).cpu(), 3)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.mem_get_info()[0] < 12 * 2**30,
    reason="needs 12 GiB of free GPU memory",
)
def test_permute_past_2_31_elements():
    # T*k*H > 2^31: every row offset must be formed in int64
    T, k, H, E = 65_600, 8, 4096, 64
    ids = torch.randint(0, E, (T, k), device=DEV, dtype=torch.int32)
    x = torch.randn(T, H, device=DEV, dtype=torch.float16)
    assert T * k * H > 2**31
    xp, off, row_map = moe.moe_permute(x, ids, E, backend="cuda")
    order, want_off, want_rm = ref.permutation(ids, E)
    assert torch.equal(off, want_off) and torch.equal(row_map, want_rm)
    tail = slice(T * k - 3000, T * k)  # the rows past 2^31 elements
    assert torch.equal(xp[tail], x.index_select(0, order[tail] // k))
    assert torch.equal(xp[:3000], x.index_select(0, order[:3000] // k))
    del xp


# ---------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture(dtype):
    # No host synchronisation inside: both ops replay on new inputs, as eager computes them.
    T, E, k, H = 300, 32, 4, 40
    logits = torch.randn(T, E, device=DEV, dtype=dtype)
    bias = torch.randn(E, device=DEV) * 0.1
    x = torch.randn(T, H, device=DEV, dtype=dtype)

    def step():
        w, ids = torch.ops.frontiers_fast.moe_route(logits, k, "sigmoid", True, bias, 8, 3, 2.5, "cuda")
        xp, off, row_map = torch.ops.frontiers_fast.moe_permute(x, ids, E, "cuda")
        return w, ids, xp, off, row_map

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for name, a, b in zip(("weights", "ids", "x_perm", "offsets", "row_map"), captured, eager):
            assert torch.equal(a, b), f"replay differs from eager in {name}"
        # and eager agrees with the reference
        _check_route(
            (eager[0], eager[1]),
            ref.moe_route(logits.double().cpu(), k, "sigmoid", True, bias.double().cpu(), 8, 3, 2.5),
            dtype,
        )
        _, want_off, want_rm = ref.moe_permute(x.cpu(), eager[1].cpu(), E)
        assert torch.equal(eager[3].cpu(), want_off) and torch.equal(eager[4].cpu(), want_rm)
        logits.copy_(torch.randn_like(logits))
        x.copy_(torch.randn_like(x))

"""selective_scan on every backend against the float64 reference: output, last state and every
gradient, for each layout of B and C, each option, odd lengths, packed sequences and every dtype.

Outputs are NaN-poisoned (conftest for torch.empty, FRONTIERS_FAST_DEBUG_POISON for the C++
kernels), so an element a kernel forgets to write fails the comparison.
"""

import pytest
import torch

from frontiers_fast.ops import ssm as ops
from frontiers_fast.reference import ssm as ref

from ..helpers import assert_close, backend_cases
from .inputs import scan_inputs

CASES = backend_cases("selective_scan")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PARAMS = ("A", "D", "delta_bias", "initial_state")  # given in float32 with half activations, as Mamba does
LENGTHS = [1, 2, 63, 301, 2049]
# gradients that are sums over batch and time (A, D, delta_bias, constant B and C) or over channels
# (variable and grouped B and C)
SUMMED = ("A", "D", "delta_bias", "B", "C")


def _ours(kw, dtype, device):
    """The inputs in ``dtype`` on ``device`` (parameters and constant B/C in float32 for half dtypes)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            want = acc if k in PARAMS or v.dim() == 2 else dtype
            v = v.to(device=device, dtype=want).requires_grad_(True)
        elif isinstance(v, torch.Tensor):
            v = v.to(device)
        out[k] = v
    return out


def _compare(kw, dtype, device, backend):
    ours = _ours(kw, dtype, device)
    ref_in = {k: v.clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
              for k, v in kw.items()}  # fmt: skip
    # the reference sees the values ours sees (rounded to the dtype), in float64
    for k, v in ours.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            ref_in[k] = v.detach().cpu().double().requires_grad_(True)
    out, last = ops.selective_scan(**ours, return_last_state=True, backend=backend)
    want, want_last = ref.selective_scan(**ref_in, return_last_state=True)
    assert out.dtype == dtype and out.shape == want.shape
    assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out.cpu(), want, dtype)
    assert_close(last.cpu(), want_last, torch.float32 if dtype != torch.float64 else dtype)
    g, g_last = torch.randn_like(want), torch.randn_like(want_last)
    names = [k for k, v in ours.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    got = torch.autograd.grad(
        (out, last), [ours[k] for k in names], (g.to(dtype).to(device), g_last.to(last))
    )
    # the reference gradient for the rounded output gradient
    expect = torch.autograd.grad(
        (want, want_last), [ref_in[k] for k in names], (g.to(dtype).double(), g_last)
    )
    for name, a, b in zip(names, got, expect):
        assert a.dtype == ours[name].dtype, name
        if name in SUMMED:
            # compared norm-wise: at its dtype's tolerance relative to its largest entry (when above 1)
            scale = b.abs().max().clamp_min(1.0)
            assert_close(a.cpu() / scale, b / scale, a.dtype, msg=f"grad of {name}")
        else:
            assert_close(a.cpu(), b, a.dtype, msg=f"grad of {name}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("L", LENGTHS)
def test_every_length_and_layout(device, backend, layout, L):
    kw = scan_inputs(batch=2, dim=6, N=3, L=L, layout=layout, groups=3)
    _compare(kw, torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["constant", "variable", "grouped"])
def test_every_dtype(device, backend, dtype, layout):
    # dim 40 (3 channel blocks, the last partial), N 17 (a partial state vector), 2 groups of 20
    kw = scan_inputs(batch=2, dim=40, N=17, L=130, layout=layout, groups=2)
    _compare(kw, dtype, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["variable", "grouped"])
@pytest.mark.parametrize("dtype,dim", [(torch.float32, 150), (torch.float64, 75)])
def test_many_channel_blocks(device, backend, layout, dtype, dim):
    # Enough channels that the C++ backward gives a task several blocks, the last one partial
    # (float32: 16 lanes, 10 blocks; float64: 8 lanes, 10 blocks): its lanes must not keep the
    # previous block's data.
    kw = scan_inputs(batch=1, dim=dim, N=16, L=64, layout=layout, groups=5 if dim == 75 else 3)
    _compare(kw, dtype, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("options", [False, True])
@pytest.mark.parametrize("drop", [None, "D", "z", "delta_bias", "initial_state"])
def test_options(device, backend, options, drop):
    kw = scan_inputs(batch=2, dim=5, N=4, L=77, layout="variable", options=options)
    if drop is not None:
        kw.pop(drop, None)
    _compare(kw, torch.float64, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_packed_sequences(device, backend, layout, dtype):
    # an empty sequence, a one-step one, and sequences across the 64-step chunks
    cu = torch.tensor([0, 0, 1, 65, 200, 200, 331], dtype=torch.int32)
    kw = scan_inputs(batch=1, dim=6, N=3, L=331, layout=layout, groups=2)
    kw["initial_state"] = torch.randn(6, 6, 3, dtype=torch.float64)
    kw["cu_seqlens"] = cu
    _compare(kw, dtype, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_packed_equals_separate_calls(device, backend):
    cu = [0, 40, 41, 120]
    kw = scan_inputs(batch=1, dim=6, N=3, L=120, layout="variable", dtype=torch.float32)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    h0 = torch.randn(3, 6, 3, device=device)
    out, last = ops.selective_scan(**dict(kw, initial_state=h0), return_last_state=True,
                                   cu_seqlens=torch.tensor(cu, device=device), backend=backend)  # fmt: skip
    for s in range(3):
        piece = {
            k: v[..., cu[s] : cu[s + 1]] if k in ("u", "delta", "z", "B", "C") else v for k, v in kw.items()
        }
        o, h = ops.selective_scan(**dict(piece, initial_state=h0[s : s + 1]), return_last_state=True,
                                  backend=backend)  # fmt: skip
        # the same arithmetic on the same values: equal to the float32 tolerance of the kernel
        assert_close(out[..., cu[s] : cu[s + 1]], o)
        assert_close(last[s : s + 1], h)


@pytest.mark.parametrize("device,backend", CASES)
def test_noncontiguous_inputs(device, backend):
    kw = scan_inputs(batch=2, dim=6, N=3, L=50, layout="grouped", groups=2)
    # every activation a strided view of a bigger tensor
    for k in ("u", "delta", "z"):
        kw[k] = torch.randn(2, 12, 100, dtype=torch.float64)[:, ::2, ::2]
    for k in ("B", "C"):
        kw[k] = torch.randn(2, 2, 50, 3, dtype=torch.float64).transpose(2, 3)
    _compare(kw, torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_large_state_decay_and_softplus_switch(device, backend):
    # deltas on both sides of the softplus threshold (20), strongly decaying states
    kw = scan_inputs(batch=1, dim=7, N=5, L=90, layout="variable")
    kw["delta"] = torch.linspace(-30, 30, 90, dtype=torch.float64).repeat(1, 7, 1)
    kw["A"] = -torch.rand(7, 5, dtype=torch.float64) * 3
    _compare(kw, torch.float64, device, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_sizes(device, backend):
    for batch, dim, N in ((0, 6, 3), (2, 0, 3), (2, 6, 0)):
        kw = scan_inputs(batch=batch, dim=dim, N=N, L=9, layout="variable", dtype=torch.float32)
        kw = {
            k: v.to(device).requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in kw.items()
        }
        out, last = ops.selective_scan(**kw, return_last_state=True, backend=backend)
        assert out.shape == (batch, dim, 9) and last.shape == (batch, dim, N)
        if N == 0 and batch and dim:
            # no state: out = D u * silu(z)
            want = (kw["D"][:, None] * kw["u"]) * torch.nn.functional.silu(kw["z"])
            assert_close(out, want.detach())
        grads = torch.autograd.grad(out.sum() + last.sum(), [kw["u"], kw["A"]], allow_unused=True)
        assert grads[0].shape == kw["u"].shape

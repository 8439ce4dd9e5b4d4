"""Helpers every family's tests use: tolerances, the device x backend axis,
comparison with the reference (output and every gradient), opcheck,
torch.compile against eager, and a spy on the backend registry.
"""

from __future__ import annotations

import collections
import contextlib
import os

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast import _backend

# Per-dtype tolerances (rtol, atol) for a kernel against the float64 reference.
# float32: sums of O(100) products accumulate ~sqrt(n)*eps32 relative error;
# half types: the inputs themselves are rounded to 8 (bf16) / 11 (fp16) bits.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# opcheck's utilities: every one for an op with autograd, the plain ones for a
# kernel op (a ``_bwd``, or an op whose gradient is not defined).
FULL_OPCHECK = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
KERNEL_OPCHECK = ("test_schema", "test_faketensor")


def assert_close(actual, expected, dtype=None, msg="", equal_nan=False):
    dtype = dtype or actual.dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=equal_nan, msg=msg or None
    )


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


# Triton launchers tested directly: on CPU tensors through the interpreter, on CUDA compiled.
TRITON_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def triton_devices():
    """Where the Triton launchers can be called here: CPU tensors only reach a kernel through the
    interpreter (conftest sets TRITON_INTERPRET=1 without a GPU); CUDA tensors compile it."""
    out = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def triton_params(cpu_dtypes):
    """pytest params ``(device, dtype)``: ``cpu_dtypes`` under the interpreter (it is slow), every dtype on CUDA."""
    return [
        pytest.param(dev, dt, id=f"{dev}-{str(dt).replace('torch.', '')}")
        for dev in triton_devices()
        for dt in (cpu_dtypes if dev == "cpu" else TRITON_CUDA_DTYPES)
    ]


def backends_for(function: str, device: str, grad: bool = True) -> list[str]:
    """The backends of public ``function`` that can run on ``device`` here, the reference included."""
    spec = _backend.FUNCTIONS[function]
    out = []
    for b in spec.implemented(grad):
        on = _backend._DEVICE.get(b, device)
        if on == device and spec.available(b, grad)[0]:
            out.append(b)
    return out


def backend_cases(function: str, grad: bool = True):
    """pytest params ``(device, backend)`` for every device here and every backend of ``function`` on it."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in devices() for b in backends_for(function, d, grad)]


def grads(out, inputs, seed):
    """d(out . seed)/d(inputs), zeros for inputs out does not depend on."""
    got = torch.autograd.grad(out, inputs, seed, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, inputs)]


def check_against_reference(fn, ref_fn, inputs, dtype, backend, equal_nan=False):
    """Run ``fn(*inputs, backend=backend)`` in ``dtype`` and ``ref_fn`` in float64 on the same values.

    Compares the output and the gradient of every input that requires grad,
    for one fresh random output gradient.
    """
    ours_in = [t.detach().clone().to(dtype).requires_grad_(t.requires_grad) for t in inputs]
    ref_in = [t.detach().clone().double().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*ours_in, backend=backend)
    expected = ref_fn(*ref_in)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, equal_nan=equal_nan)
    diff = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not diff or out.numel() == 0:
        return
    g = torch.randn_like(expected)
    got = grads(out, [ours_in[i] for i in diff], g.to(dtype))
    want = grads(expected, [ref_in[i] for i in diff], g)
    for i, a, b in zip(diff, got, want):
        assert_close(a, b, dtype, msg=f"gradient of input {i}", equal_nan=equal_nan)


def opcheck(op, args, full=True):
    """torch.library.opcheck with every utility (``full``) or the kernel-op ones."""
    torch.library.opcheck(op, args, test_utils=FULL_OPCHECK if full else KERNEL_OPCHECK)


def check_compiled(fn, inputs, backend="aot_eager", check=assert_close):
    """``torch.compile(fn, fullgraph=True)`` against eager: the output (a scalar) and its gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = compiled(*inputs)
    want = fn(*inputs)
    check(got, want)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if leaves:
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
            check(a, b)
    return got


@contextlib.contextmanager
def spy_backends():
    """Count which implementation of which op ran: yields a Counter of (op, backend)."""
    calls = collections.Counter()
    saved = {}
    for name, info in _backend.OPS.items():
        for b, fn in list(info.impls.items()):
            saved[(name, b)] = fn

            def wrapped(*args, _fn=fn, _key=(name, b)):
                calls[_key] += 1
                return _fn(*args)

            info.impls[b] = wrapped
    try:
        yield calls
    finally:
        for (name, b), fn in saved.items():
            _backend.OPS[name].impls[b] = fn


def first_cpu_backend(function: str) -> str:
    """The default backend of ``function`` on the CPU (what runs without a force)."""
    return _backend.default_backend(torch.device("cpu"), function, True)


__all__ = [
    "FULL_OPCHECK",
    "KERNEL_OPCHECK",
    "TOL",
    "assert_close",
    "backend_cases",
    "backends_for",
    "check_against_reference",
    "check_compiled",
    "devices",
    "ff",
    "first_cpu_backend",
    "grads",
    "opcheck",
    "spy_backends",
]

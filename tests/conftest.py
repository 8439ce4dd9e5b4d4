"""Shared test fixtures: tolerances, devices, and NaN-poisoned empty().

Outputs of every kernel are allocated with torch.empty; poisoning it with NaN
makes a kernel that leaves an element unwritten fail loudly.
"""

import os
import zlib

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU exists.
# Must be set before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The C++ kernels fill their outputs with NaN before running when this is set.
os.environ.setdefault("FRONTIERS_FAST_DEBUG_POISON", "1")

# Per-dtype tolerances (rtol, atol) for a kernel against the float64 reference.
# float32: sums of O(100) products accumulate ~sqrt(n)*eps32 relative error;
# half types: the inputs themselves are rounded to 8 (bf16) / 11 (fp16) bits.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or actual.dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=msg or None)


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


_orig_empty = torch.empty
_orig_empty_like = torch.empty_like


def _poisoned_empty(*args, **kwargs):
    t = _orig_empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _poisoned_empty_like(*args, **kwargs):
    t = _orig_empty_like(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


@pytest.fixture(autouse=True)
def seed():
    # Fresh random inputs in every test, but reproducible from the test name
    # (crc32, not hash(): str hashes change from run to run with PYTHONHASHSEED).
    torch.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    yield

"""Fixtures for every test: NaN-poisoned empty() and a seed per test (helpers: tests/helpers.py).

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

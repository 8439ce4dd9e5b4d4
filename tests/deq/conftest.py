"""``solve_backend``: runs a test once per backend of the solver loop that can run here.

The reference, the C++ kernels, and the Triton launchers on CPU tensors
through the interpreter (when conftest set TRITON_INTERPRET=1; on a GPU
machine the Triton backend runs on CUDA tensors in tests/deq/test_cuda.py
instead).  The backend is forced for every public function the test calls,
so a module that uses it calls only the solves (and the layer built on them).
"""

import pytest

from frontiers_fast import _backend

from ..helpers import backends_for, triton_devices

SOLVE_BACKENDS = backends_for("fixed_point_solve", "cpu") + (["triton"] if "cpu" in triton_devices() else [])


@pytest.fixture(params=SOLVE_BACKENDS)
def solve_backend(request, monkeypatch):
    name = request.param
    if name == "triton":
        monkeypatch.setitem(_backend._DEVICE, "triton", "cpu")
    with _backend.use_backend(name):
        yield name

"""What can run here, and which backend a call uses.

Backends: ``cpp`` (the C++/OpenMP kernels in ``frontiers_fast._C``, CPU
tensors), ``triton`` and ``cuda`` (GPU tensors), ``reference`` (plain PyTorch,
any device).  The choice, highest priority first: the ``backend=`` argument,
the ``FRONTIERS_FAST_BACKEND`` environment variable, then the default for the
tensors' device.  A default backend that is missing falls back to the
reference with one warning; a *forced* backend that is missing is an error.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpp", "reference")

_status: dict[str, tuple[bool, str]] = {}
_warned: set[str] = set()
_local = threading.local()


def _load_native():
    try:
        importlib.import_module("frontiers_fast._C")
    except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
        return (
            False,
            f"frontiers_fast._C did not load ({type(exc).__name__}: {exc}); reinstall with `pip install --no-build-isolation -e .`",
        )
    return True, "loaded"


def _probe():
    if _status:
        return
    ok, why = _load_native()
    _status["cpp"] = (ok, why)
    cuda_ext = ok and _native_has_cuda()
    if not ok:
        _status["cuda"] = (False, why)
    elif not cuda_ext:
        _status["cuda"] = (
            False,
            "frontiers_fast._C was built without CUDA (torch was a CPU build or nvcc was not found)",
        )
    else:
        _status["cuda"] = (True, "built")
    try:
        import triton  # noqa: F401

        _status["triton"] = (True, f"triton {triton.__version__}")
    except Exception as exc:
        _status["triton"] = (False, f"triton is not importable ({type(exc).__name__}: {exc})")
    _status["reference"] = (True, "always available")


def _native_has_cuda() -> bool:
    # The CUDA binding registers its kernels under the CUDA dispatch key.
    return torch._C._dispatch_has_kernel_for_dispatch_key("frontiers_fast::spmm_fwd_warp", "CUDA")


def backends() -> dict[str, dict]:
    """Report every backend: ``{"cpp": {"available": True, "why": "loaded"}, ...}``."""
    _probe()
    out = {}
    for name in BACKENDS:
        ok, why = _status[name]
        if name in ("triton", "cuda") and ok and not torch.cuda.is_available():
            why += " (no CUDA device visible)"
        out[name] = {"available": ok, "why": why}
    return out


def available(name: str) -> bool:
    _probe()
    return _status[name][0]


def _requested(backend):
    if backend is None:
        backend = getattr(_local, "forced", None) or os.environ.get("FRONTIERS_FAST_BACKEND") or None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(backend, device: torch.device, op: str, implemented: tuple[str, ...] | None = None) -> str:
    """The backend that runs ``op`` on ``device``.

    ``implemented`` lists the backends ``op`` has (``None``: all of them).  A
    family whose kernels are not written yet passes ``("reference",)``: its
    default is then the reference without a warning (nothing is missing from
    the build), and forcing another backend is an error that says so.
    """
    _probe()
    explicit = backend is not None
    backend = _requested(backend)
    gpu = device.type == "cuda"
    if implemented is not None and backend is not None and backend not in implemented:
        msg = (
            f"frontiers_fast.{op}: backend {backend!r} is not implemented for this op yet "
            f"(implemented: {', '.join(implemented)})"
        )
        if explicit:
            raise NotImplementedError(msg)
        # A process-wide force (environment or use_backend) covers every family;
        # one that lacks the forced backend runs its reference and says so once.
        if op not in _warned and not torch.compiler.is_compiling():
            _warned.add(op)
            warnings.warn(msg + "; running the reference", RuntimeWarning, stacklevel=3)
        return "reference"
    if backend is None and implemented is not None:
        order = ("triton", "cuda") if gpu else ("cpp",)
        if not any(b in implemented for b in order):
            return "reference"
    if backend is None:
        if gpu:
            # Until a GPU run measures CUDA faster for an op, Triton is the default.
            choice = "triton" if available("triton") else ("cuda" if available("cuda") else "reference")
        else:
            choice = "cpp" if available("cpp") else "reference"
        # (No warning while torch.compile traces: dynamo cannot trace warnings.warn.)
        if choice == "reference" and op not in _warned and not torch.compiler.is_compiling():
            _warned.add(op)
            want = "triton" if gpu else "cpp"
            warnings.warn(
                f"frontiers_fast.{op}: the {want} backend is unavailable ({_status[want][1]}); "
                "falling back to the PyTorch reference",
                RuntimeWarning,
                stacklevel=3,
            )
        return choice
    if backend == "reference":
        return backend
    if backend == "cpp" and gpu:
        raise ValueError(f"frontiers_fast.{op}: backend 'cpp' runs on CPU tensors, got tensors on {device}")
    if backend in ("triton", "cuda") and not gpu:
        raise ValueError(
            f"frontiers_fast.{op}: backend {backend!r} runs on CUDA tensors, got tensors on {device} "
            "(Triton launchers can be called directly on CPU tensors under TRITON_INTERPRET=1)"
        )
    if not available(backend):
        raise RuntimeError(f"frontiers_fast.{op}: backend {backend!r} is unavailable: {_status[backend][1]}")
    return backend


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend for the ops called inside the block (thread-local)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def gpu_choice() -> str:
    """Inside a CUDA kernel op: which GPU implementation to run."""
    forced = _requested(None)
    if forced in ("triton", "cuda"):
        return forced
    return "triton" if available("triton") else "cuda"

"""What can run here, which backend a call uses, and the registry behind both.

Backends: ``cpp`` (the C++/OpenMP kernels of ``frontiers_fast._C``, CPU
tensors), ``triton`` and ``cuda`` (the Triton kernels and the CUDA extension,
CUDA tensors) and ``reference`` (plain PyTorch, any device).

Two registries, filled when the op modules are imported:

* ``OPS``: every registered op (``frontiers_fast::<name>``, defined with
  :func:`frontiers_fast._library.define_op`) and the backends it implements.
* ``FUNCTIONS``: every public function and the ops it calls in the forward
  and in the backward.  Its backends are those that all of them implement.

A public function resolves its backend once (:func:`resolve`) and passes the
name down as the last schema argument of every op it calls; autograd saves it
for the backward.  Nothing is read back from global state inside an op, so
the choice survives ``torch.compile`` and backward passes.

The choice, highest priority first: the ``backend=`` argument, a
:func:`use_backend` block, the ``FRONTIERS_FAST_BACKEND`` environment
variable (read when a compiled function is traced, so set it before
compiling), then the default for the tensors' device (CUDA: ``triton``, then
``cuda``; CPU: ``cpp``; the first one the function implements and this
install can run).  A default that cannot run falls back to the reference with
one warning.  A forced backend is honoured or refused: one the function does
not implement raises ``NotImplementedError`` naming the function and what it
has; one it implements that cannot run here raises ``ValueError`` (wrong
device) or ``RuntimeError`` (not built, Triton missing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("triton", "cuda", "cpp", "reference")
NATIVE = ("cpp", "cuda")  # backends whose kernels live in frontiers_fast._C
NATIVE_NS = "frontiers_fast_native"  # their private op namespace
_DEVICE = {"cpp": "cpu", "triton": "cuda", "cuda": "cuda"}
_DEFAULT_ORDER = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}

_status: dict[str, tuple[bool, str]] = {}
_warned: set[str] = set()
_resolved: dict[tuple, str] = {}  # (function, device type, grad, forced) -> backend
_local = threading.local()


# ---------------------------------------------------------------------------
# what this install can run
# ---------------------------------------------------------------------------
def _probe():
    """Load frontiers_fast._C and look for Triton, once (frontiers_fast's import does it, so
    that a first call inside torch.compile has nothing left to import)."""
    if _status:
        return
    try:
        native = importlib.import_module("frontiers_fast._C")
    except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
        why = (
            f"frontiers_fast._C did not load ({type(exc).__name__}: {exc}); "
            "reinstall with `pip install --no-build-isolation -e .`"
        )
        _status["cpp"] = _status["cuda"] = (False, why)
    else:
        _status["cpp"] = (True, "loaded")
        if getattr(native, "with_cuda", False):
            _status["cuda"] = (True, "built")
        else:
            _status["cuda"] = (
                False,
                "frontiers_fast._C was built without CUDA (torch was a CPU build, nvcc was not found, "
                "or FRONTIERS_FAST_NO_CUDA was set)",
            )
    # Triton is found, not imported: importing it costs a second, and the
    # launchers import it when they first run.
    try:
        found = importlib.util.find_spec("triton") is not None
        why = f"triton {importlib.metadata.version('triton')}" if found else "triton is not installed"
    except Exception as exc:
        found, why = False, f"triton cannot be found ({type(exc).__name__}: {exc})"
    _status["triton"] = (found, why)
    _status["reference"] = (True, "always available")


def available(name: str) -> bool:
    """Whether the install can run ``name`` at all (see :meth:`OpInfo.available` for one op)."""
    _probe()
    return _status[name][0]


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return name


# ---------------------------------------------------------------------------
# the registries
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class OpInfo:
    """One registered op and its implementations, by backend.

    ``impls`` maps a backend to the callable that runs it (the op's arguments
    without ``backend``).  The router of :mod:`frontiers_fast._library` looks
    it up on every call, so a test may wrap an entry to see which one ran.
    """

    name: str
    impls: dict[str, Callable]
    uses: tuple[str, ...] = ()  # a composite op: the ops it calls decide its backends
    _seen: dict = dataclasses.field(default_factory=dict, repr=False)  # availability, asked once per backend

    @property
    def backends(self) -> tuple[str, ...]:
        if self.uses:
            return tuple(b for b in BACKENDS if all(b in OPS[u].backends for u in self.uses))
        return tuple(b for b in BACKENDS if b in self.impls)

    def available(self, backend: str) -> tuple[bool, str]:
        """(True, why) if this op's ``backend`` can run in this install."""
        if backend not in self._seen:
            self._seen[backend] = self._available(backend)
        return self._seen[backend]

    def _available(self, backend: str) -> tuple[bool, str]:
        if backend not in self.backends:
            return False, f"not implemented for {self.name} (implemented: {', '.join(self.backends)})"
        if self.uses:
            for u in self.uses:
                ok, why = OPS[u].available(backend)
                if not ok:
                    return False, f"{u}: {why}"
            return True, _status[backend][1]
        _probe()
        ok, why = _status[backend]
        if ok and backend in NATIVE:
            key = "CPU" if backend == "cpp" else "CUDA"
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NATIVE_NS}::{self.name}", key):
                return False, (
                    f"frontiers_fast._C has no {key} kernel for {NATIVE_NS}::{self.name} "
                    "(a build older than the sources? reinstall)"
                )
        return ok, why


@dataclasses.dataclass
class FunctionInfo:
    """A public function: the ops its forward calls, and those its backward adds."""

    name: str
    ops: tuple[str, ...]
    grad_ops: tuple[str, ...] = ()

    def implemented(self, grad: bool) -> tuple[str, ...]:
        used = self.ops + (self.grad_ops if grad else ())
        return tuple(b for b in BACKENDS if all(b in OPS[o].backends for o in used))

    def available(self, backend: str, grad: bool) -> tuple[bool, str]:
        for o in self.ops + (self.grad_ops if grad else ()):
            ok, why = OPS[o].available(backend)
            if not ok:
                return False, f"{o}: {why}"
        return True, _status[backend][1]


OPS: dict[str, OpInfo] = {}
FUNCTIONS: dict[str, FunctionInfo] = {}


def register_function(name: str, ops, grad_ops=()) -> FunctionInfo:
    """Declare a public function and the registered ops it runs (forward, then backward only)."""
    missing = [o for o in (*ops, *grad_ops) if o not in OPS]
    if missing:
        raise KeyError(f"register_function({name!r}): unknown ops {missing}")
    FUNCTIONS[name] = info = FunctionInfo(name, tuple(ops), tuple(grad_ops))
    _resolved.clear()
    return info


# ---------------------------------------------------------------------------
# the choice
# ---------------------------------------------------------------------------
def records_grad(*tensors) -> bool:
    """resolve()'s ``grad``: the call records a graph (grad mode on, some input requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve(backend, device: torch.device, function: str, grad: bool = False) -> str:
    """The backend that runs the public function ``function`` on ``device``.

    ``grad``: the call records a graph, so the backward's ops must have the
    backend too.  See the module docstring for the rules.
    """
    # The force is read here, in code torch.compile traces: dynamo guards on
    # the use_backend state, so a compiled function is retraced when a block
    # changes it.  The environment variable is process configuration, read
    # when a function is traced (dynamo does not guard on os.environ).
    forced = getattr(_local, "forced", None) if backend is None else backend
    if forced is None:
        forced = os.environ.get("FRONTIERS_FAST_BACKEND") or None
        source = "FRONTIERS_FAST_BACKEND"
    else:
        source = "backend" if backend is not None else "use_backend"
    kind, value = _choose(forced, source, device.type, function, grad)
    if kind == "ok":
        return value
    raise _ERRORS[kind](value)


_ERRORS = {"NotImplementedError": NotImplementedError, "ValueError": ValueError, "RuntimeError": RuntimeError}


# Traced by torch.compile as its value (every argument is a constant of the
# graph): the registry walk calls into the dispatcher, which dynamo cannot
# trace.  An error comes back as data and is raised by resolve: eager code and
# compiled code (without fullgraph) raise the same exception; under
# fullgraph=True dynamo reports it as Unsupported, with the message.
@torch.compiler.assume_constant_result
def _choose(forced, source, device_type, function, grad):
    try:
        if forced is not None and forced not in BACKENDS:
            raise ValueError(f"{source} must be one of {BACKENDS} or None, got {forced!r}")
        # The answer depends only on these (availability does not change in a
        # process): a call pays for a dict lookup, not for the walk below.
        key = (function, device_type, grad, forced)
        hit = _resolved.get(key)
        if hit is None:
            hit = _resolve(forced, torch.device(device_type), function, grad)
            # Not cached while compiling: a fallback then skips its warning,
            # and the first eager call must still give it.
            if not torch.compiler.is_compiling():
                _resolved[key] = hit
        return ("ok", hit)
    except (NotImplementedError, ValueError, RuntimeError) as exc:
        return (type(exc).__name__, str(exc))


def _resolve(forced, device, function, grad):
    _probe()
    spec = FUNCTIONS[function]
    implemented = spec.implemented(grad)
    kind = device.type
    if forced is not None:
        if forced not in implemented:
            fwd_only = grad and forced in spec.implemented(False)
            raise NotImplementedError(
                f"frontiers_fast.{function}: backend {forced!r} is not implemented"
                + (" for its backward (the inputs require grad)" if fwd_only else "")
                + f"; implemented: {', '.join(implemented)}"
            )
        if forced == "reference" or kind == "meta":
            return forced
        if _DEVICE[forced] != kind:
            hint = (
                " (Triton launchers can be called directly on CPU tensors under TRITON_INTERPRET=1)"
                if forced == "triton"
                else ""
            )
            raise ValueError(
                f"frontiers_fast.{function}: backend {forced!r} runs on {_DEVICE[forced].upper()} tensors, "
                f"got tensors on {device}{hint}"
            )
        ok, why = spec.available(forced, grad)
        if not ok:
            raise RuntimeError(f"frontiers_fast.{function}: backend {forced!r} is unavailable: {why}")
        return forced
    return default_backend(device, function, grad)


def default_backend(device: torch.device, function: str, grad: bool = False) -> str:
    """The default of :func:`resolve`, ignoring any force (for internal plumbing such as graph building)."""
    _probe()
    spec = FUNCTIONS[function]
    implemented = spec.implemented(grad)
    kind = device.type
    if kind == "meta":  # fake kernels answer for every backend
        return "reference"
    if kind not in _DEFAULT_ORDER:
        raise ValueError(
            f"frontiers_fast.{function}: tensors on {device} are not supported (frontiers_fast runs on cpu and cuda)"
        )
    wanted = [b for b in _DEFAULT_ORDER[kind] if b in implemented]
    for b in wanted:
        if spec.available(b, grad)[0]:
            return b
    # (No warning while torch.compile traces: dynamo cannot trace warnings.warn.)
    if wanted and function not in _warned and not torch.compiler.is_compiling():
        _warned.add(function)
        why = spec.available(wanted[0], grad)[1]
        warnings.warn(
            f"frontiers_fast.{function}: the {wanted[0]} backend is unavailable ({why}); "
            "falling back to the PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend for the public functions called inside the block (this thread only)."""
    if name is not None:
        _check_name(name)
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------
def backends(op: str | None = None) -> dict[str, dict]:
    """What can run here.

    Without ``op``: every backend of the install,
    ``{"cpp": {"available": True, "why": "loaded"}, ...}``.

    With ``op`` (a public function such as ``"spmm"``, or a registered op such
    as ``"spmm_fwd"``): per backend, whether it is ``implemented`` (the
    forward), has a ``backward``, is ``available`` here, and ``why`` not.

    Example::

        >>> frontiers_fast.backends(op="spmm")["cpp"]
        {'implemented': True, 'backward': True, 'available': True, 'why': 'loaded'}
    """
    _probe()
    if op is None:
        out = {}
        for name in BACKENDS:
            ok, why = _status[name]
            if name in ("triton", "cuda") and ok and not torch.cuda.is_available():
                why += " (no CUDA device visible)"
            out[name] = {"available": ok, "why": why}
        return out
    name = op.split("::")[-1]
    if name in FUNCTIONS:
        spec = FUNCTIONS[name]
        fwd, both = spec.implemented(False), spec.implemented(True)
        report = {}
        for b in BACKENDS:
            ok, why = spec.available(b, b in both) if b in fwd else (False, "not implemented")
            report[b] = {"implemented": b in fwd, "backward": b in both, "available": ok, "why": why}
        return report
    if name in OPS:
        info = OPS[name]
        report = {}
        for b in BACKENDS:
            ok, why = info.available(b)
            report[b] = {"implemented": b in info.backends, "available": ok, "why": why}
        return report
    raise KeyError(f"backends(op={op!r}): no such function or op (functions: {', '.join(sorted(FUNCTIONS))})")

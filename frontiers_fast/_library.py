"""How every op of frontiers_fast is defined: one schema, one fake, its backends.

:func:`define_op` is the one way to register an op.  From a schema written
*without* the backend, it

* defines ``frontiers_fast::<name>(..., str backend)``: the backend is the last
  argument, chosen by the public function (:func:`frontiers_fast._backend.resolve`);
* registers the fake kernel (shapes and dtypes only, for torch.compile and
  meta tensors);
* registers, for the CPU and the CUDA dispatch keys, a router that runs the
  implementation of the requested backend from the op's entry in
  :data:`frontiers_fast._backend.OPS` (and refuses a backend the op does not
  have, or one for the other device, with an error that names the op);
* for the native backends (``cpp``, ``cuda``), defines the private op
  ``frontiers_fast_native::<name>`` with the schema as written: the C++ kernels
  register under its CPU key (``csrc/<family>/*_cpu.cpp``) and the CUDA
  extension under its CUDA key (``csrc/<family>/*_cuda.cpp``);
* optionally registers autograd.  The setup sees ``ctx.backend`` (saved from
  the call, so the backward runs the same backend) and ``ctx.needs.<arg>``
  (whether the input named ``arg`` needs a gradient); the backward returns a
  dict ``{arg: gradient}``, and arguments it leaves out get None.

A *composite* op (``composite=fn``) has one implementation for every backend:
it calls other ops and passes the backend on.  The GNN family's autograd ops,
which carry the graph's transpose for their backward, are of this kind.

Schemas are defined from Python, so the ops and their fakes exist even when
``frontiers_fast._C`` did not load: the router then reports the backend as
unavailable, and the public functions fall back to the reference.
"""

from __future__ import annotations

import collections
import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from . import _backend
from ._backend import NATIVE, NATIVE_NS, OPS, OpInfo

NS = "frontiers_fast"
_lib = torch.library.Library(NS, "FRAGMENT")
_native_lib = torch.library.Library(NATIVE_NS, "FRAGMENT")


def absent(like: Tensor) -> Tensor:
    """The [0] placeholder an op returns for a gradient (or optional output) it did not compute.

    Ops cannot return None for a Tensor output, and each placeholder is a new
    tensor: outputs of one op may not alias each other.
    """
    return like.new_empty((0,))


def zeros_if_none(g, like: Tensor) -> Tensor:
    """``g``, or zeros shaped like ``like`` when it is None: autograd hands a backward None for an
    output the loss did not use, and ``autograd.grad(allow_unused=True)`` returns None for an input
    the output does not depend on; both mean a gradient of exactly zero."""
    return torch.zeros_like(like) if g is None else g


class Needs:
    """``needs.<arg>``: whether the input named ``arg`` needs a gradient (False for None inputs)."""

    def __init__(self, names, flags, inputs):
        for n, f, v in zip(names, flags, inputs):
            setattr(self, n, bool(f) and isinstance(v, Tensor))

    def any(self, *names) -> bool:
        return any(getattr(self, n) for n in names)


def _with_backend(schema: str) -> str:
    head, sep, ret = schema.partition(") ->")
    if not sep or "(" not in head:
        raise ValueError(f"define_op: cannot read the schema {schema!r}")
    args = head[head.index("(") + 1 :].strip()
    return f"{head[: head.index('(')]}({args}{', ' if args else ''}str backend{sep}{ret}"


def _lazy(target):
    """``"module:function"`` -> a callable that imports the module on first use (Triton is optional)."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    fn = None

    def call(*args):
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(module), attr)
        return fn(*args)

    call.__qualname__ = call.__name__ = f"lazy[{target}]"
    return call


def _native(name: str):
    def call(*args):
        return getattr(torch.ops.frontiers_fast_native, name)(*args)

    call.__qualname__ = call.__name__ = f"{NATIVE_NS}::{name}"
    return call


def _router(info: OpInfo, device_type: str):
    def run(*args):
        *args, backend = args
        fn = info.impls.get(backend)
        if fn is None:
            if backend not in _backend.BACKENDS:
                raise ValueError(
                    f"{NS}::{info.name}: backend must be one of {_backend.BACKENDS}, got {backend!r}"
                )
            raise NotImplementedError(
                f"{NS}::{info.name}: backend {backend!r} is not implemented (implemented: {', '.join(info.backends)})"
            )
        want = _backend._DEVICE.get(backend)
        if want is not None and want != device_type:
            raise ValueError(
                f"{NS}::{info.name}: backend {backend!r} runs on {want.upper()} tensors, got {device_type.upper()} ones"
            )
        if backend in NATIVE or backend == "triton":
            ok, why = info.available(backend)
            if not ok:
                raise RuntimeError(f"{NS}::{info.name}: backend {backend!r} is unavailable: {why}")
        return fn(*args)

    run.__qualname__ = run.__name__ = f"{info.name}_{device_type}_router"
    return run


def define_op(
    schema: str,
    *,
    fake: Callable,
    reference: Callable | None = None,
    triton: Callable | str | None = None,
    native: tuple[str, ...] = (),
    composite: Callable | None = None,
    uses: tuple[str, ...] = (),
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    double_backward: bool = False,
):
    """Define ``frontiers_fast::<name>`` from ``schema`` (written without the backend argument).

    Args:
        schema: e.g. ``"spmm_fwd(Tensor rowptr, Tensor col, Tensor x, int reduce) -> (Tensor, Tensor)"``.
        fake: shapes and dtypes of the outputs, from the same arguments (backend included).
        reference: the plain PyTorch implementation (every device).
        triton: the Triton launcher, or ``"module:function"`` to import it lazily.
        native: which of ``("cpp", "cuda")`` ``frontiers_fast._C`` implements.
        composite: instead of the four above, one function for every backend
            (it receives the backend and passes it on); ``uses`` names the
            ops it calls, whose backends it has.
        backward, setup_context: autograd (see the module docstring).
        double_backward: the backward is itself differentiable (plain tensor
            ops).  Otherwise (backward ops have no autograd) a backward run
            with ``create_graph=True`` raises instead of returning
            second derivatives of zero.

    Returns:
        the op's :class:`~frontiers_fast._backend.OpInfo`.
    """
    full = _with_backend(schema)
    name = full[: full.index("(")]
    if name in OPS:
        raise ValueError(f"define_op: {NS}::{name} is defined twice")
    _lib.define(full)
    qualname = f"{NS}::{name}"
    torch.library.register_fake(qualname, fake, lib=_lib)
    if composite is not None:
        if reference or triton or native:
            raise ValueError(f"define_op({name}): a composite op has no per-backend implementations")
        info = OpInfo(name, {}, uses=tuple(uses))
        for key in ("CPU", "CUDA"):
            _lib.impl(name, composite, key)
    else:
        if reference is None:
            raise ValueError(f"define_op({name}): every op needs its reference implementation")
        impls = {"reference": reference}
        if triton is not None:
            impls["triton"] = _lazy(triton)
        for b in native:
            if b not in NATIVE:
                raise ValueError(f"define_op({name}): native backends are {NATIVE}, got {b!r}")
            impls[b] = _native(name)
        if native:
            _native_lib.define(schema)
        info = OpInfo(name, impls)
        for key, dev in (("CPU", "cpu"), ("CUDA", "cuda")):
            _lib.impl(name, _router(info, dev), key)
    OPS[name] = info
    if backward is not None:
        _register_autograd(qualname, full, backward, setup_context, double_backward)
    return info


def _register_autograd(qualname, full_schema, backward, setup_context, double_backward):
    names = [a.name for a in torch._C.parse_schema(f"{NS}::{full_schema}").arguments]
    Inputs = collections.namedtuple(f"{qualname.split('::')[1]}_inputs", names)

    def setup(ctx, inputs, output):
        ctx.backend = inputs[-1]
        ctx.needs = Needs(names, ctx.needs_input_grad, inputs)
        if setup_context is not None:
            setup_context(ctx, Inputs(*inputs), output)

    def bwd(ctx, *grads):
        if torch.is_grad_enabled() and not double_backward:
            # Grad mode is on in a backward only under create_graph=True.
            raise NotImplementedError(
                f"{qualname}: double backward (create_graph=True) is not supported: its backward ops have no "
                "autograd, so second derivatives would silently be zero"
            )
        got = backward(ctx, *grads)
        unknown = set(got) - set(names)
        if unknown:
            raise KeyError(f"{qualname} backward returned gradients for unknown inputs {sorted(unknown)}")
        return tuple(got.get(n) if getattr(ctx.needs, n) else None for n in names)

    torch.library.register_autograd(qualname, bwd, setup_context=setup, lib=_lib)


__all__ = ["absent", "define_op", "Needs", "NS", "zeros_if_none"]

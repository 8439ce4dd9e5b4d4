"""Argument checks shared by the op families.

Each check names the argument in its error: TypeError for a wrong kind of
value (a float where an int is wanted, an int tensor where a float one is),
ValueError for a right kind with a wrong value (out of range, wrong number
of dimensions, another device, NaN).  The scalar checks return the value as
the plain Python type the op schemas need (numpy scalars are accepted).

Family-specific contracts (layouts, index ranges, in-place states) stay in
their ``ops/<family>.py``, built from these.

The policy every family follows:

* *Parameters* (sizes, tolerances, eps, indices, probabilities, options) are
  validated and refused with an error that names them.
* *Data tensors* (features, states, logits of a layer) may hold NaN and inf;
  NaN propagates the same way on every backend, as each op's docstring says.
* Value checks read tensor data, so they are skipped where there is none:
  meta and fake tensors, and while ``torch.compile`` traces (a data read
  would break the graph).  Ops whose checks must hold compiled too repeat
  them in their op body, which runs on real tensors.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Families whose references need float32 or float64 (no half types), and how an error says it.
FP32_64 = (torch.float32, torch.float64)
FP32_64_WHAT = "float32 or float64"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every kernel accumulates in for inputs of ``dtype``: float64 stays, the rest widen to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kind(v) -> str:
    return "None" if v is None else type(v).__name__


def check_bool(name: str, v) -> bool:
    # numpy.bool_ is no subclass of bool; the op schemas need a Python bool.
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_kind(v)}")
    return bool(v)


def check_bools(**flags) -> tuple[bool, ...]:
    """:func:`check_bool` on each keyword, in order: ``a, b = check_bools(a=a, b=b)``."""
    return tuple(check_bool(n, v) for n, v in flags.items())


def check_int(name: str, v, low: int, high: int | None = None, why: str = "") -> int:
    """An integer in ``[low, high]`` (``high=None``: no upper bound); ``why`` explains the range."""
    # numbers.Integral takes Python and numpy integers; bool is refused although it is an int.
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_kind(v)}")
    v = int(v)
    if v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}{why}, got {v}")
    return v


def check_real(
    name: str, v, low: float | None = None, strict: bool = False, allow_inf: bool = False
) -> float:
    """A finite real number, ``>= low`` (``> low`` when ``strict``) if ``low`` is given.

    ``allow_inf``: +inf is accepted too (a far plane with no far culling, say).
    """
    # numbers.Real takes Python and numpy ints and floats; bools and tensors are refused.
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number (int, float or numpy scalar), got {_kind(v)}")
    v = float(v)
    if allow_inf and v == math.inf:
        return v
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v <= low if strict else v < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {v}")
    return v


def check_choice(name: str, v, choices):
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


def check_tensor(name: str, t, dtypes=FLOATS, what: str | None = None) -> None:
    """A tensor whose dtype is one of ``dtypes``; ``what`` describes them in the error."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_kind(t)}")
    if t.dtype not in dtypes:
        what = what or f"a floating tensor ({', '.join(map(str, dtypes))})"
        raise TypeError(f"{name} must be {what}, got {t.dtype}")


def check_dims(name: str, t: Tensor, dims, layout: str | None = None) -> None:
    """``t.dim()`` is ``dims`` (an int or a tuple of allowed counts); ``layout`` (``"[T, H]"``) names the shape."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if t.dim() not in dims:
        want = f"shape {layout}" if layout else f"{' or '.join(map(str, dims))} dimensions"
        raise ValueError(f"{name} must have {want}, got shape {tuple(t.shape)}")


def check_same_device(name: str, t: Tensor, ref_name: str, device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {device}; they must be on one device")


def check_same_dtype(name: str, t: Tensor, ref_name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {dtype}; they must match")


INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_index_tensor(name: str, t, dtypes=INTS) -> None:
    """An integer tensor (bool is refused: it is a mask, not an index)."""
    check_tensor(name, t, dtypes, "an integer tensor (" + ", ".join(str(d) for d in dtypes) + ")")


def check_shape(name: str, t: Tensor, shape, hint: str = "") -> None:
    """``shape`` is one shape (None = any size along that dimension) or a list of alternatives."""
    shapes = shape if isinstance(shape, list) else [shape]
    if any(t.dim() == len(s) and all(w is None or w == d for w, d in zip(s, t.shape)) for s in shapes):
        return
    want = " or ".join("[" + ", ".join("*" if w is None else str(w) for w in s) + "]" for s in shapes)
    raise ValueError(f"{name} must have shape {want}{hint}, got {list(t.shape)}")


def check_like(name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    """``t`` has the dtype and the device of ``like`` (the dtype is checked first)."""
    check_same_dtype(name, t, like_name, like.dtype)
    check_same_device(name, t, like_name, like.device)


def has_values(t: Tensor) -> bool:
    """Whether ``t``'s values can be read here: not meta or fake, not empty, not while torch.compile
    traces, and not while a CUDA graph is being captured (a read would synchronise, which capture
    forbids; the graph then runs without the value checks, as a compiled kernel would)."""
    return (
        t.device.type != "meta"
        and t.numel() > 0
        and not isinstance(t, torch._subclasses.FakeTensor)
        and not torch.compiler.is_compiling()
        and not (t.is_cuda and torch.cuda.is_current_stream_capturing())
    )


def check_has_values(name: str, t: Tensor) -> None:
    """Refuse a meta tensor where the values are needed (they decide shapes, not just fill them)."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is a meta tensor, which holds no values; this function reads them (not only their shape)"
        )


def check_finite(name: str, t: Tensor) -> None:
    """No NaN or inf in ``t`` (skipped where :func:`has_values` is false)."""
    if not has_values(t) or not (t.is_floating_point() or t.is_complex()):
        return
    # A sum is finite only if every term is (NaN and inf absorb), in one pass; only a sum that
    # is not (a bad value, or finite values that overflow it) needs the elementwise test.
    if t.numel() and math.isfinite(abs(complex(t.sum()))):
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (it contains NaN or inf)")


def check_in_range(name: str, t: Tensor, low, high, what: str = "") -> None:
    """Every value of ``t`` in ``[low, high]`` (skipped where :func:`has_values` is false; NaN is refused)."""
    if not has_values(t):
        return
    lo, hi = (float(v) if t.is_floating_point() else int(v) for v in t.aminmax())
    bad_nan = t.is_floating_point() and bool(torch.isnan(t).any())
    if bad_nan or lo < low or hi > high:
        got = "NaN" if bad_nan else f"values in [{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}]{what}, got {got}")


def check_offsets(name: str, t: Tensor, total: int, of: str) -> None:
    """Offsets [S + 1] of S packed segments of ``of`` (``total`` long): 0 first, ``total`` last, never
    decreasing (empty segments are allowed).  Skipped where :func:`has_values` is false."""
    if not has_values(t):
        return
    v = t.tolist()
    if v[0] != 0 or v[-1] != total:
        raise ValueError(
            f"{name} must start at 0 and end at the length of {of} ({total}), got {v[0]} ... {v[-1]}"
        )
    steps = t[1:] - t[:-1]
    if bool((steps < 0).any()):
        k = int(torch.nonzero(steps < 0)[0])
        raise ValueError(f"{name} must not decrease, got {name}[{k}]={v[k]} > {name}[{k + 1}]={v[k + 1]}")


def check_distinct_indices(name: str, t: Tensor, n: int, of: str) -> None:
    """Row indices into ``of`` (``n`` rows): each in [0, n), none repeated (each row has one writer).
    Skipped where :func:`has_values` is false."""
    if not has_values(t):
        return
    lo, hi = (int(v) for v in t.aminmax())
    if lo < 0 or hi >= n:
        raise ValueError(
            f"{name} must index the {n} rows of {of} (values in [0, {n - 1}]), got values in [{lo}, {hi}]"
        )
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} must not repeat a row (two batch entries would write the same row of {of})")


def memory_bytes(device) -> int | None:
    """The memory of ``device`` in bytes (CPU: physical RAM), or None when it cannot be told."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None
    return None


def check_memory(name: str, nbytes: int, device) -> None:
    """Refuse a size whose buffers (``nbytes``) exceed the device's whole memory, before allocating them."""
    total = memory_bytes(device)
    if total is not None and nbytes > total:
        raise ValueError(
            f"{name} is too large: it needs {nbytes / 2**30:,.1f} GiB for its buffers, more than the "
            f"{total / 2**30:,.1f} GiB of memory on {torch.device(device)}"
        )


def check_features(name: str, t, size_name: str, size: int, like=None, dtypes=FLOATS) -> None:
    """A layer's input: a floating tensor whose last dimension is the layer's ``size_name`` = ``size``.

    For modules, so that a wrong width says which constructor argument it
    disagrees with instead of failing inside a matmul (or, worse, being
    regrouped by a reshape).  ``like``: (name, parameter) whose device and
    dtype the input must share.
    """
    check_tensor(name, t, dtypes)
    if t.dim() == 0 or t.shape[-1] != size:
        got = (
            "no dimensions (a 0-dim tensor)"
            if t.dim() == 0
            else f"last dimension {t.shape[-1]} (shape {list(t.shape)})"
        )
        raise ValueError(f"{name} has {got} but {size_name}={size}; they must agree")
    if like is not None:
        check_like(name, t, *like)


def check_option(name: str, v, choices):
    """A string option among ``choices``: TypeError for a non-string, ValueError for an unknown one."""
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {_kind(v)}")
    return check_choice(name, v, choices)


def check_module(name: str, m) -> None:
    """A callable sub-network (an nn.Module or any callable)."""
    if not callable(m):
        raise TypeError(f"{name} must be an nn.Module or a callable, got {_kind(m)}")


def check_writable(name: str, t: Tensor) -> None:
    """A tensor an op updates in place: not an expanded (stride-0) view, whose elements are shared."""
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise ValueError(
            f"{name} is updated in place, so it cannot be an expanded (stride-0) view "
            f"(shape {list(t.shape)}, strides {list(t.stride())}); pass {name}.clone()"
        )

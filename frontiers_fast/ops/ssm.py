"""Selective state-space (Mamba) ops: registration, autograd and argument checks.

Registered in the ``frontiers_fast::`` namespace (every device runs the
PyTorch reference of :mod:`frontiers_fast.reference.ssm` until kernels land):

  selective_scan(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, initial_state?)
      -> (out, last_state)                                          [autograd]
  selective_scan_bwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, initial_state?,
                     grad_out, grad_last_state?)
      -> (grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_delta_bias, grad_initial_state)
  causal_conv1d(x, weight, bias?, initial_states?, silu) -> (out, final_states)     [autograd]
  causal_conv1d_bwd(x, weight, bias?, initial_states?, silu, grad_out, grad_final_states?)
      -> (grad_x, grad_weight, grad_bias, grad_initial_states)
  selective_state_update(state!, x, dt, A, B, C, D?, z?, dt_bias?, dt_softplus) -> y
  causal_conv1d_update(x, conv_state!, weight, bias?, silu) -> out

The backward ops return a [0]-shaped tensor in place of the gradient of an
absent optional input.  The two decoding ops write their state in place and
have no autograd: they serve inference, and the public functions run them
under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_bool, check_dims, check_same_device, check_tensor
from ..reference import ssm as ref

NS = "frontiers_fast"
_IMPLEMENTED = ("reference",)
_ops = torch.ops.frontiers_fast


def _absent(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---------------------------------------------------------------------------
# selective_scan
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::selective_scan", mutates_args=())
def _selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    out, last = ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state)
    # The last state is a view of the stacked states: hand back its own storage.
    return out.contiguous(), last.clone(memory_format=torch.contiguous_format)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    torch._check(u.dim() == 3, lambda: "u must be [batch, dim, L]")
    torch._check(A.dim() == 2, lambda: "A must be [dim, N]")
    ct = ref.compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=ct)


@torch.library.custom_op(f"{NS}::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    grad_out: Tensor,
    grad_last_state: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = ref.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out, grad_last_state
    )
    return tuple(_absent(u) if g is None else g.contiguous() for g in grads)


@_selective_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out, grad_last_state):
    ins = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(_absent(u) if t is None else t.new_empty(t.shape) for t in ins)


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state = inputs
    ctx.delta_softplus = delta_softplus
    # The backward recomputes the states from the inputs rather than keeping [L, batch, dim, N].
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)


def _scan_backward(ctx, grad_out, grad_last_state):
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    grads = _ops.selective_scan_bwd(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        ctx.delta_softplus,
        initial_state,
        grad_out.contiguous(),
        grad_last_state,
    )
    needs = ctx.needs_input_grad
    present = (
        True,
        True,
        True,
        True,
        True,
        D is not None,
        z is not None,
        delta_bias is not None,
        initial_state is not None,
    )
    out = [g if (p and n) else None for g, p, n in zip(grads, present, needs[:8] + needs[9:])]
    return (*out[:8], None, out[8])


_selective_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)


# ---------------------------------------------------------------------------
# causal_conv1d
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::causal_conv1d", mutates_args=())
def _causal_conv1d_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_states: Tensor | None, silu: bool
) -> tuple[Tensor, Tensor]:
    out, final = ref.causal_conv1d(x, weight, bias, "silu" if silu else None, initial_states, True)
    return out.contiguous(), final.clone(memory_format=torch.contiguous_format)


@_causal_conv1d_op.register_fake
def _(x, weight, bias, initial_states, silu):
    torch._check(x.dim() == 3, lambda: "x must be [batch, dim, L]")
    torch._check(weight.dim() == 2, lambda: "weight must be [dim, width]")
    return x.new_empty(x.shape), x.new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1))


@torch.library.custom_op(f"{NS}::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_states: Tensor | None,
    silu: bool,
    grad_out: Tensor,
    grad_final_states: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = ref.causal_conv1d_bwd(
        x, weight, bias, "silu" if silu else None, initial_states, grad_out, grad_final_states
    )
    # grad_x and grad_initial_states are two slices of one buffer; outputs may not alias.
    return tuple(_absent(x) if g is None else g.clone(memory_format=torch.contiguous_format) for g in grads)


@_causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, initial_states, silu, grad_out, grad_final_states):
    return tuple(_absent(x) if t is None else t.new_empty(t.shape) for t in (x, weight, bias, initial_states))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, initial_states, silu = inputs
    ctx.silu = silu
    ctx.save_for_backward(x, weight, bias, initial_states)


def _conv_backward(ctx, grad_out, grad_final_states):
    x, weight, bias, initial_states = ctx.saved_tensors
    gx, gw, gb, gi = _ops.causal_conv1d_bwd(
        x, weight, bias, initial_states, ctx.silu, grad_out.contiguous(), grad_final_states
    )
    n = ctx.needs_input_grad
    return (
        gx if n[0] else None,
        gw if n[1] else None,
        gb if (n[2] and bias is not None) else None,
        gi if (n[3] and initial_states is not None) else None,
        None,
    )


_causal_conv1d_op.register_autograd(_conv_backward, setup_context=_conv_setup)


# ---------------------------------------------------------------------------
# decoding steps (in place, no autograd)
# ---------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::selective_state_update", mutates_args=("state",))
def _state_update_op(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
) -> Tensor:
    return ref.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    torch._check(x.dim() == 2, lambda: "x must be [batch, dim]")
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{NS}::causal_conv1d_update", mutates_args=("conv_state",))
def _conv_update_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    return ref.causal_conv1d_update(x, conv_state, weight, bias, "silu" if silu else None)


@_conv_update_op.register_fake
def _(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------
def _check_tensor(name, t, first, ndims, optional=False):
    """``first``: (name, tensor) of the input whose device the others must share; None for that input."""
    if t is None and optional:
        return
    if isinstance(t, Tensor) and t.is_complex():
        raise TypeError(
            f"{name} is complex ({t.dtype}); complex parameters (as in S4D-Lin) are not supported, pass a real tensor"
        )
    check_tensor(name, t)
    if first is not None:
        check_same_device(name, t, first[0], first[1].device)
    check_dims(name, t, ndims)


def _check_shape(name, t, shape, what):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {what} = {list(shape)}, got {list(t.shape)}")


def _check_writable(name, t):
    # An expanded (stride-0) view shares one element among several indices:
    # the in-place update cannot write to it.
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise ValueError(
            f"{name} is updated in place, so it cannot be an expanded (stride-0) view "
            f"(shape {list(t.shape)}, strides {list(t.stride())}); pass {name}.clone()"
        )


def _check_bc(name, M, batch, dim, N, L=None):
    """Scan (L given): constant [dim, N], variable [batch, N, L] or grouped
    [batch, G, N, L].  Decoding step: [batch, N] or grouped [batch, G, N]."""
    steps = () if L is None else (L,)
    tail = ", L]" if steps else "]"
    if steps and M.dim() == 2:
        _check_shape(name, M, (dim, N), "[dim, N] (constant)")
    elif M.dim() == 2 + len(steps):
        _check_shape(name, M, (batch, N, *steps), "[batch, N" + tail)
    else:
        G = M.shape[1]
        if G < 1 or dim % G:
            raise ValueError(f"{name} has G={G} groups (shape {list(M.shape)}), which must divide dim={dim}")
        _check_shape(name, M, (batch, G, N, *steps), "[batch, G, N" + tail)


def _activation(activation):
    if activation is None:
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


# ---------------------------------------------------------------------------
# public functional API
# ---------------------------------------------------------------------------
def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    initial_state=None,
    *,
    backend=None,
):
    """Selective scan (Mamba's S6), with mamba_ssm ``selective_scan_fn``'s layout and semantics.

    ``delta = softplus(delta + delta_bias)`` (softplus only when
    ``delta_softplus``; it is the identity above 20), then for every channel
    and state ``h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] u[t]`` from
    ``h[-1] = initial_state`` (zeros if None), and
    ``out[t] = (sum_n C[t] h[t] + D u[t]) * silu(z[t])``.

    Args:
        u, delta: [batch, dim, L].
        A: [dim, N], real (complex A is refused).
        B, C: constant [dim, N], variable [batch, N, L], or grouped
            [batch, G, N, L] with dim % G == 0 (channel d reads group
            d // (dim // G)); the layout is told by the number of dimensions.
        D, delta_bias: [dim].  z: [batch, dim, L].
        initial_state: [batch, dim, N] (an extension of mamba_ssm's API: pass a
            previous call's last state to continue a sequence).
        backend: only ``"reference"`` exists for this op so far.

    Computed in float32 (float64 when any input is float64); fp16 and bf16
    inputs are accepted.

    Returns:
        out [batch, dim, L] in u's dtype, or ``(out, last_state)`` when
        ``return_last_state``; last_state is [batch, dim, N] in float32
        (float64 when an input is float64) and is differentiable.

    Example::

        >>> u, dt = torch.randn(2, 8, 64), torch.rand(2, 8, 64)
        >>> A = -torch.rand(8, 16)
        >>> B, C = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
        >>> out, h = selective_scan(u, dt, A, B, C, return_last_state=True)
    """
    _check_tensor("u", u, None, (3,))
    dev = u.device
    first = ("u", u)
    batch, dim, L = u.shape
    _check_tensor("delta", delta, first, (3,))
    _check_shape("delta", delta, u.shape, "[batch, dim, L] like u")
    _check_tensor("A", A, first, (2,))
    if A.shape[0] != dim:
        raise ValueError(f"A must be [dim, N] with dim={dim} (from u), got {list(A.shape)}")
    N = A.shape[1]
    _check_tensor("B", B, first, (2, 3, 4))
    _check_bc("B", B, batch, dim, N, L)
    _check_tensor("C", C, first, (2, 3, 4))
    _check_bc("C", C, batch, dim, N, L)
    _check_tensor("D", D, first, (1,), optional=True)
    _check_shape("D", D, (dim,), "[dim]")
    _check_tensor("z", z, first, (3,), optional=True)
    _check_shape("z", z, u.shape, "[batch, dim, L] like u")
    _check_tensor("delta_bias", delta_bias, first, (1,), optional=True)
    _check_shape("delta_bias", delta_bias, (dim,), "[dim]")
    _check_tensor("initial_state", initial_state, first, (3,), optional=True)
    _check_shape("initial_state", initial_state, (batch, dim, N), "[batch, dim, N]")
    delta_softplus = check_bool("delta_softplus", delta_softplus)
    return_last_state = check_bool("return_last_state", return_last_state)
    if L == 0:
        raise ValueError("u must have at least one time step (L >= 1), got L=0")
    _backend.resolve(backend, dev, "selective_scan", implemented=_IMPLEMENTED)
    out, last = _ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (out, last) if return_last_state else out


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, backend=None
):
    """One decoding step of :func:`selective_scan`; ``state`` is updated in place.

    Stepping it over t = 0..L-1 with ``x = u[..., t]``, ``dt = delta[..., t]``,
    ``B = B[..., t]`` and so on reproduces :func:`selective_scan` (whose
    ``initial_state`` and last state match ``state`` before and after).

    Only the 3-D form of mamba_ssm's ``selective_state_update`` is supported
    (state [batch, dim, N]); its multi-head form ([batch, nheads, dim, N]) is
    not.  There is no autograd: the op runs under ``torch.no_grad()`` and its
    output does not require grad.

    Args:
        state: [batch, dim, N], any float dtype (written back in that dtype).
        x, dt, z: [batch, dim].  A: [dim, N].  B, C: [batch, N] or grouped
            [batch, G, N] with dim % G == 0.  D, dt_bias: [dim].

    Returns:
        y [batch, dim] in x's dtype (computed in float32, or float64 when an
        input is float64).

    Example::

        >>> state = torch.zeros(2, 8, 16)
        >>> y = selective_state_update(state, torch.randn(2, 8), torch.rand(2, 8), -torch.rand(8, 16),
        ...                            torch.randn(2, 16), torch.randn(2, 16))
    """
    _check_tensor("state", state, None, (3,))
    _check_writable("state", state)
    dev = state.device
    first = ("state", state)
    batch, dim, N = state.shape
    _check_tensor("x", x, first, (2,))
    _check_shape("x", x, (batch, dim), "[batch, dim] (from state)")
    _check_tensor("dt", dt, first, (2,))
    _check_shape("dt", dt, (batch, dim), "[batch, dim] (from state)")
    _check_tensor("A", A, first, (2,))
    _check_shape("A", A, (dim, N), "[dim, N] (from state)")
    _check_tensor("B", B, first, (2, 3))
    _check_bc("B", B, batch, dim, N)
    _check_tensor("C", C, first, (2, 3))
    _check_bc("C", C, batch, dim, N)
    _check_tensor("D", D, first, (1,), optional=True)
    _check_shape("D", D, (dim,), "[dim]")
    _check_tensor("z", z, first, (2,), optional=True)
    _check_shape("z", z, (batch, dim), "[batch, dim]")
    _check_tensor("dt_bias", dt_bias, first, (1,), optional=True)
    _check_shape("dt_bias", dt_bias, (dim,), "[dim]")
    dt_softplus = check_bool("dt_softplus", dt_softplus)
    _backend.resolve(backend, dev, "selective_state_update", implemented=_IMPLEMENTED)
    with torch.no_grad():
        return _ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d(
    x, weight, bias=None, activation=None, initial_states=None, return_final_states=False, *, backend=None
):
    """Depthwise causal 1-D convolution, as causal-conv1d's ``causal_conv1d_fn``.

    ``out[:, d, t] = act(sum_k weight[d, k] x[:, d, t - (width-1) + k] + bias[d])``
    with the inputs before t = 0 taken from ``initial_states`` (zeros if None).
    Note the argument order follows this project's issue (activation before
    initial_states); pass them by keyword to be safe.

    Args:
        x: [batch, dim, L].  weight: [dim, width].  bias: [dim].
        activation: None, ``"silu"`` or ``"swish"``.
        initial_states: [batch, dim, width - 1].
        return_final_states: also return the last width - 1 inputs
            [batch, dim, width - 1] (taken from ``initial_states``, or zeros,
            when L < width - 1), the next call's ``initial_states``.

    L must be at least 1, as for :func:`selective_scan`; any L below the
    filter width is fine.

    Returns:
        out [batch, dim, L] in x's dtype (computed in float32, or float64 when
        an input is float64), or ``(out, final_states)``.

    Example::

        >>> out = causal_conv1d(torch.randn(2, 8, 100), torch.randn(8, 4), torch.randn(8), activation="silu")
    """
    _check_tensor("x", x, None, (3,))
    dev = x.device
    first = ("x", x)
    batch, dim, L = x.shape
    _check_tensor("weight", weight, first, (2,))
    if weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(
            f"weight must be [dim, width] with dim={dim} (from x) and width >= 1, got {list(weight.shape)}"
        )
    width = weight.shape[1]
    _check_tensor("bias", bias, first, (1,), optional=True)
    _check_shape("bias", bias, (dim,), "[dim]")
    _check_tensor("initial_states", initial_states, first, (3,), optional=True)
    _check_shape("initial_states", initial_states, (batch, dim, width - 1), "[batch, dim, width - 1]")
    silu = _activation(activation)
    return_final_states = check_bool("return_final_states", return_final_states)
    if L == 0:
        # As selective_scan (and causal-conv1d's kernels): an empty sequence is refused.
        raise ValueError("x must have at least one time step (L >= 1), got L=0")
    _backend.resolve(backend, dev, "causal_conv1d", implemented=_IMPLEMENTED)
    out, final = _ops.causal_conv1d(x, weight, bias, initial_states, silu)
    return (out, final) if return_final_states else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, backend=None):
    """Decoding step(s) of :func:`causal_conv1d`; ``conv_state`` is updated in place.

    ``conv_state`` [batch, dim, S] holds the last S inputs, oldest first,
    with S >= width - 1.  The new inputs are appended, the output reads the
    last ``width`` of them, and the state keeps the last S.  With S = width
    (the size mamba allocates) this is also causal-conv1d 1.0's convention
    (shift left, write the new input last, dot with weight); with
    S = width - 1 the state is exactly :func:`causal_conv1d`'s
    ``initial_states``/``final_states``.  There is no autograd.

    Args:
        x: [batch, dim] (one step) or [batch, dim, L] (L steps).
        conv_state: [batch, dim, S], S >= width - 1.
        weight: [dim, width].  bias: [dim].  activation: None, ``"silu"`` or ``"swish"``.

    Returns:
        out with x's shape and dtype.

    Example::

        >>> conv_state = torch.zeros(2, 8, 4)
        >>> y = causal_conv1d_update(torch.randn(2, 8), conv_state, torch.randn(8, 4), activation="silu")
    """
    _check_tensor("x", x, None, (2, 3))
    dev = x.device
    first = ("x", x)
    batch, dim = x.shape[:2]
    _check_tensor("conv_state", conv_state, first, (3,))
    _check_writable("conv_state", conv_state)
    _check_tensor("weight", weight, first, (2,))
    if weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(
            f"weight must be [dim, width] with dim={dim} (from x) and width >= 1, got {list(weight.shape)}"
        )
    width = weight.shape[1]
    if conv_state.shape[:2] != (batch, dim) or conv_state.shape[2] < width - 1:
        raise ValueError(
            f"conv_state must be [batch, dim, S] = [{batch}, {dim}, S] with S >= width - 1 = {width - 1}, "
            f"got {list(conv_state.shape)}"
        )
    _check_tensor("bias", bias, first, (1,), optional=True)
    _check_shape("bias", bias, (dim,), "[dim]")
    silu = _activation(activation)
    _backend.resolve(backend, dev, "causal_conv1d_update", implemented=_IMPLEMENTED)
    with torch.no_grad():
        return _ops.causal_conv1d_update(x, conv_state, weight, bias, silu)


__all__ = ["causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update"]

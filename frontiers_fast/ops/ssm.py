"""Selective state-space (Mamba) ops: registration, autograd and the public functions.

Every op is defined with :func:`frontiers_fast._library.define_op` in the
``frontiers_fast::`` namespace; the last argument, ``backend``, is left out
below.  The only backend so far is ``reference`` (the PyTorch code of
:mod:`frontiers_fast.reference.ssm`, on every device), so forcing ``cpp``,
``triton`` or ``cuda`` raises ``NotImplementedError`` naming the function.

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

The backward ops compute every gradient and hand back :func:`absent` for an
optional input that was None.  The two decoding ops write their state in
place and have no autograd: they serve inference, and the public functions
run them under ``torch.no_grad()``.

NaN in any tensor argument propagates along the data flow of the recurrence
(each public function's docstring says where to); no value is read to
validate an argument, so meta tensors and torch.compile see the same checks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    FLOATS,
    check_bool,
    check_choice,
    check_dims,
    check_same_device,
    check_shape,
    check_tensor,
    check_writable,
)
from .._library import absent, define_op
from ..reference import ssm as ref

_ops = torch.ops.frontiers_fast


# ---------------------------------------------------------------------------
# reference implementations in the ops' calling convention
# ---------------------------------------------------------------------------
def _ref_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    out, last = ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state)
    # The last state is a view of the stacked states: give it storage of its own.
    return out.contiguous(), last.clone(memory_format=torch.contiguous_format)


def _ref_selective_scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out, grad_last_state
):
    grads = ref.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out, grad_last_state
    )
    return tuple(absent(u) if g is None else g.contiguous() for g in grads)


def _ref_causal_conv1d(x, weight, bias, initial_states, silu):
    out, final = ref.causal_conv1d(x, weight, bias, "silu" if silu else None, initial_states, True)
    return out.contiguous(), final.clone(memory_format=torch.contiguous_format)


def _ref_causal_conv1d_bwd(x, weight, bias, initial_states, silu, grad_out, grad_final_states):
    grads = ref.causal_conv1d_bwd(
        x, weight, bias, "silu" if silu else None, initial_states, grad_out, grad_final_states
    )
    # grad_x and grad_initial_states are slices of one buffer, and outputs may not alias.
    return tuple(absent(x) if g is None else g.clone(memory_format=torch.contiguous_format) for g in grads)


def _ref_causal_conv1d_update(x, conv_state, weight, bias, silu):
    return ref.causal_conv1d_update(x, conv_state, weight, bias, "silu" if silu else None)


# ---------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------
def _fake_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend):
    torch._check(u.dim() == 3, lambda: "u must be [batch, dim, L]")
    torch._check(A.dim() == 2, lambda: "A must be [dim, N]")
    ct = ref.compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=ct)


def _fake_selective_scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out, grad_last_state, backend
):
    ins = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(absent(u) if t is None else t.new_empty(t.shape) for t in ins)


def _fake_causal_conv1d(x, weight, bias, initial_states, silu, backend):
    torch._check(x.dim() == 3, lambda: "x must be [batch, dim, L]")
    torch._check(weight.dim() == 2, lambda: "weight must be [dim, width]")
    return x.new_empty(x.shape), x.new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1))


def _fake_causal_conv1d_bwd(x, weight, bias, initial_states, silu, grad_out, grad_final_states, backend):
    return tuple(absent(x) if t is None else t.new_empty(t.shape) for t in (x, weight, bias, initial_states))


def _fake_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, backend):
    torch._check(x.dim() == 2, lambda: "x must be [batch, dim]")
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------
_SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
_CONV_GRADS = ("x", "weight", "bias", "initial_states")


def _scan_setup(ctx, a, output):
    ctx.delta_softplus = a.delta_softplus
    # The backward recomputes the states rather than keeping [L, batch, dim, N] of them.
    ctx.save_for_backward(*(getattr(a, n) for n in _SCAN_GRADS))


def _scan_backward(ctx, grad_out, grad_last_state):
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    grads = _ops.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state,
        grad_out.contiguous(), grad_last_state, ctx.backend,
    )  # fmt: skip
    return dict(zip(_SCAN_GRADS, grads))


def _conv_setup(ctx, a, output):
    ctx.silu = a.silu
    ctx.save_for_backward(*(getattr(a, n) for n in _CONV_GRADS))


def _conv_backward(ctx, grad_out, grad_final_states):
    x, weight, bias, initial_states = ctx.saved_tensors
    grads = _ops.causal_conv1d_bwd(
        x, weight, bias, initial_states, ctx.silu, grad_out.contiguous(), grad_final_states, ctx.backend
    )
    return dict(zip(_CONV_GRADS, grads))


# ---------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------
_SCAN_ARGS = (
    "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus, Tensor? initial_state"
)
define_op(
    f"selective_scan({_SCAN_ARGS}) -> (Tensor, Tensor)",
    fake=_fake_selective_scan,
    reference=_ref_selective_scan,
    backward=_scan_backward,
    setup_context=_scan_setup,
)
define_op(
    f"selective_scan_bwd({_SCAN_ARGS}, Tensor grad_out, Tensor? grad_last_state) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_selective_scan_bwd,
    reference=_ref_selective_scan_bwd,
)
define_op(
    "causal_conv1d(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, bool silu) -> (Tensor, Tensor)",
    fake=_fake_causal_conv1d,
    reference=_ref_causal_conv1d,
    backward=_conv_backward,
    setup_context=_conv_setup,
)
define_op(
    "causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, bool silu, "
    "Tensor grad_out, Tensor? grad_final_states) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_causal_conv1d_bwd,
    reference=_ref_causal_conv1d_bwd,
)
define_op(
    "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? z, Tensor? dt_bias, bool dt_softplus) -> Tensor",
    fake=_fake_selective_state_update,
    reference=ref.selective_state_update,
)
define_op(
    "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu) -> Tensor",
    fake=lambda x, conv_state, weight, bias, silu, backend: x.new_empty(x.shape),
    reference=_ref_causal_conv1d_update,
)

_backend.register_function("selective_scan", ops=("selective_scan",), grad_ops=("selective_scan_bwd",))
_backend.register_function("causal_conv1d", ops=("causal_conv1d",), grad_ops=("causal_conv1d_bwd",))
_backend.register_function("selective_state_update", ops=("selective_state_update",))
_backend.register_function("causal_conv1d_update", ops=("causal_conv1d_update",))


# ---------------------------------------------------------------------------
# argument checks (the family's layouts, built from the shared checks)
# ---------------------------------------------------------------------------
_REAL = "real: complex tensors (as S4D-Lin's complex A) are not supported"


def _check_input(name, t, dims, layout, like=None, optional=False):
    """A real floating tensor of ``layout`` (``dims`` dimensions) on the device of ``like`` = (name, tensor)."""
    if t is None and optional:
        return
    # Complex parameters (S4D-Lin's complex A) would need a complex recurrence the
    # kernels do not have: say so, instead of the generic dtype message.
    complex_ = isinstance(t, Tensor) and t.is_complex()
    check_tensor(name, t, FLOATS, _REAL if complex_ else None)
    if like is not None:
        check_same_device(name, t, like[0], like[1].device)
    check_dims(name, t, dims, layout)


def _check_sized(name, t, shape, layout, like, optional=False):
    """:func:`_check_input`, then ``shape`` (None: any size there); ``layout`` names its dimensions."""
    _check_input(name, t, len(shape), layout, like, optional)
    if t is not None:
        check_shape(name, t, shape, f" ({layout})")


def _check_bc(name, M, batch, dim, N, L=None):
    """B or C.  Scan (L given): constant [dim, N], variable [batch, N, L] or grouped
    [batch, G, N, L].  Decoding step: [batch, N] or grouped [batch, G, N]."""
    steps = () if L is None else (L,)
    tail = ", L]" if steps else "]"
    if steps and M.dim() == 2:
        check_shape(name, M, (dim, N), " ([dim, N], constant)")
    elif M.dim() == 2 + len(steps):
        check_shape(name, M, (batch, N, *steps), " ([batch, N" + tail + ")")
    else:
        G = M.shape[1]
        if G < 1 or dim % G:
            raise ValueError(f"{name} has G={G} groups (shape {list(M.shape)}), which must divide dim={dim}")
        check_shape(name, M, (batch, G, N, *steps), " ([batch, G, N" + tail + ")")


def _check_weight(weight, dim, like):
    _check_input("weight", weight, 2, "[dim, width]", like)
    if weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(
            f"weight must be [dim, width] with dim={dim} (from {like[0]}) and width >= 1, got {list(weight.shape)}"
        )
    return weight.shape[1]


def _silu(activation) -> bool:
    return check_choice("activation", activation, (None, "silu", "swish")) is not None


# ---------------------------------------------------------------------------
# public functions
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
        u, delta: [batch, dim, L], L >= 1.
        A: [dim, N], real (complex A is refused).
        B, C: constant [dim, N], variable [batch, N, L], or grouped
            [batch, G, N, L] with dim % G == 0 (channel d reads group
            d // (dim // G)); the layout is told by the number of dimensions.
        D, delta_bias: [dim].  z: [batch, dim, L].
        initial_state: [batch, dim, N] (an extension of mamba_ssm's API: pass a
            previous call's last state to continue a sequence).
        backend: force one; only ``"reference"`` is implemented so far.

    Computed in float32 (float64 when any input is float64); fp16 and bf16
    inputs are accepted.  Empty batch, dim or N give empty (or, for N = 0,
    state-free) results.

    NaN is not refused; it follows the recurrence.  A NaN in ``u``,
    ``delta`` or ``B`` at step t (or in ``initial_state``) enters the state,
    so the output is NaN from step t (from the start) to the end, and so are
    the states it reached in the last state, in every channel that reads it
    (a constant ``B`` or ``C`` is read at every step; a variable one by every
    channel, a grouped one by its group's).  A NaN in ``C`` or ``z`` at step
    t makes only step t's output NaN and leaves the state alone.  A NaN in
    ``A``, ``D`` or ``delta_bias`` makes its channel's whole output NaN; in
    the last state, ``A[d, n]`` spoils state n of channel d, ``delta_bias[d]``
    all of channel d's states, and ``D`` none.

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
    _check_input("u", u, 3, "[batch, dim, L]")
    like = ("u", u)
    batch, dim, L = u.shape
    _check_sized("delta", delta, u.shape, "[batch, dim, L]", like)
    _check_sized("A", A, (dim, None), "[dim, N]", like)
    N = A.shape[1]
    bc_layout = "[dim, N], [batch, N, L] or [batch, G, N, L]"
    _check_input("B", B, (2, 3, 4), bc_layout, like)
    _check_bc("B", B, batch, dim, N, L)
    _check_input("C", C, (2, 3, 4), bc_layout, like)
    _check_bc("C", C, batch, dim, N, L)
    _check_sized("D", D, (dim,), "[dim]", like, optional=True)
    _check_sized("z", z, u.shape, "[batch, dim, L]", like, optional=True)
    _check_sized("delta_bias", delta_bias, (dim,), "[dim]", like, optional=True)
    _check_sized("initial_state", initial_state, (batch, dim, N), "[batch, dim, N]", like, optional=True)
    delta_softplus = check_bool("delta_softplus", delta_softplus)
    return_last_state = check_bool("return_last_state", return_last_state)
    if L == 0:
        raise ValueError("u must have at least one time step (L >= 1), got L=0")
    grad = _backend.records_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = _backend.resolve(backend, u.device, "selective_scan", grad)
    out, last = _ops.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, backend
    )
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
        backend: force one; only ``"reference"`` is implemented so far.

    NaN is not refused.  A NaN in ``state``, ``x``, ``dt``, ``B``, ``A`` or
    ``dt_bias`` makes the new state NaN where it flows (a channel's states,
    or for ``B`` a state of every channel of its group) and so the output of
    those channels; a NaN in ``C``, ``z`` or ``D`` makes the output NaN and
    leaves the state alone.

    Returns:
        y [batch, dim] in x's dtype (computed in float32, or float64 when an
        input is float64).

    Example::

        >>> state = torch.zeros(2, 8, 16)
        >>> y = selective_state_update(state, torch.randn(2, 8), torch.rand(2, 8), -torch.rand(8, 16),
        ...                            torch.randn(2, 16), torch.randn(2, 16))
    """
    _check_input("state", state, 3, "[batch, dim, N]")
    check_writable("state", state)
    like = ("state", state)
    batch, dim, N = state.shape
    _check_sized("x", x, (batch, dim), "[batch, dim]", like)
    _check_sized("dt", dt, (batch, dim), "[batch, dim]", like)
    _check_sized("A", A, (dim, N), "[dim, N]", like)
    _check_input("B", B, (2, 3), "[batch, N] or [batch, G, N]", like)
    _check_bc("B", B, batch, dim, N)
    _check_input("C", C, (2, 3), "[batch, N] or [batch, G, N]", like)
    _check_bc("C", C, batch, dim, N)
    _check_sized("D", D, (dim,), "[dim]", like, optional=True)
    _check_sized("z", z, (batch, dim), "[batch, dim]", like, optional=True)
    _check_sized("dt_bias", dt_bias, (dim,), "[dim]", like, optional=True)
    dt_softplus = check_bool("dt_softplus", dt_softplus)
    backend = _backend.resolve(backend, state.device, "selective_state_update", False)
    with torch.no_grad():
        return _ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, backend)


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
        backend: force one; only ``"reference"`` is implemented so far.

    L must be at least 1, as for :func:`selective_scan`; any L below the
    filter width is fine.

    NaN is not refused.  A NaN input (in ``x`` or ``initial_states``) makes
    NaN exactly the outputs of its channel whose window of ``width`` inputs
    holds it (and the final states that keep it); a NaN in ``weight`` or
    ``bias`` makes its channel's whole output NaN.

    Returns:
        out [batch, dim, L] in x's dtype (computed in float32, or float64 when
        an input is float64), or ``(out, final_states)``.

    Example::

        >>> out = causal_conv1d(torch.randn(2, 8, 100), torch.randn(8, 4), torch.randn(8), activation="silu")
    """
    _check_input("x", x, 3, "[batch, dim, L]")
    like = ("x", x)
    batch, dim, L = x.shape
    width = _check_weight(weight, dim, like)
    _check_sized("bias", bias, (dim,), "[dim]", like, optional=True)
    shape = (batch, dim, width - 1)
    _check_sized("initial_states", initial_states, shape, "[batch, dim, width - 1]", like, optional=True)
    silu = _silu(activation)
    return_final_states = check_bool("return_final_states", return_final_states)
    if L == 0:
        # As selective_scan (and causal-conv1d's kernels): an empty sequence is refused.
        raise ValueError("x must have at least one time step (L >= 1), got L=0")
    grad = _backend.records_grad(x, weight, bias, initial_states)
    backend = _backend.resolve(backend, x.device, "causal_conv1d", grad)
    out, final = _ops.causal_conv1d(x, weight, bias, initial_states, silu, backend)
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
        x: [batch, dim] (one step) or [batch, dim, L] (L steps; L = 0 leaves
            the state as it is).
        conv_state: [batch, dim, S], S >= width - 1.
        weight: [dim, width].  bias: [dim].  activation: None, ``"silu"`` or ``"swish"``.
        backend: force one; only ``"reference"`` is implemented so far.

    NaN is not refused, and behaves as in :func:`causal_conv1d`: a NaN input
    (new, or held in ``conv_state``) makes NaN the outputs whose window of
    the last ``width`` inputs holds it, and stays in the state until S newer
    inputs have pushed it out; a NaN in ``weight`` or ``bias`` makes its
    channel's output NaN.

    Returns:
        out with x's shape and dtype.

    Example::

        >>> conv_state = torch.zeros(2, 8, 4)
        >>> y = causal_conv1d_update(torch.randn(2, 8), conv_state, torch.randn(8, 4), activation="silu")
    """
    _check_input("x", x, (2, 3), "[batch, dim] or [batch, dim, L]")
    like = ("x", x)
    batch, dim = x.shape[:2]
    _check_input("conv_state", conv_state, 3, "[batch, dim, S]", like)
    check_writable("conv_state", conv_state)
    width = _check_weight(weight, dim, like)
    if conv_state.shape[:2] != (batch, dim) or conv_state.shape[2] < width - 1:
        raise ValueError(
            f"conv_state must be [batch, dim, S] = [{batch}, {dim}, S] with S >= width - 1 = {width - 1}, "
            f"got {list(conv_state.shape)}"
        )
    _check_sized("bias", bias, (dim,), "[dim]", like, optional=True)
    silu = _silu(activation)
    backend = _backend.resolve(backend, x.device, "causal_conv1d_update", False)
    with torch.no_grad():
        return _ops.causal_conv1d_update(x, conv_state, weight, bias, silu, backend)


__all__ = ["causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update"]

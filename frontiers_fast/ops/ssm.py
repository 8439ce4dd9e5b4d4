"""Selective state-space (Mamba) ops: registration, autograd and the public functions.

Every op is defined with :func:`frontiers_fast._library.define_op` in the
``frontiers_fast::`` namespace; the last argument, ``backend``, is left out
below.  Backends: ``reference`` (:mod:`frontiers_fast.reference.ssm`, every
device), ``cpp`` (``csrc/ssm/*_cpu.cpp``), ``triton`` (:mod:`frontiers_fast.kernels.ssm`)
and, for the scan's forward, ``cuda`` (``csrc/ssm/scan.cu``).

  selective_scan(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, initial_state?, cu_seqlens?)
      -> (out, last_state)                                          [autograd]
  selective_scan_bwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, initial_state?, cu_seqlens?,
                     grad_out, grad_last_state?)
      -> (grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_delta_bias, grad_initial_state)
  causal_conv1d(x, weight, bias?, initial_states?, silu, cu_seqlens?) -> (out, final_states)  [autograd]
  causal_conv1d_bwd(x, weight, bias?, initial_states?, silu, cu_seqlens?, grad_out, grad_final_states?)
      -> (grad_x, grad_weight, grad_bias, grad_initial_states)
  selective_state_update(state!, x, dt, A, B, C, D?, z?, dt_bias?, dt_softplus, state_batch_indices?) -> y
  causal_conv1d_update(x, conv_state!, weight, bias?, silu) -> out

The calling convention every backend implements (the public functions
establish it):

* T is u's (x's) dtype; acc is float64 for float64 inputs, else float32.
  u, delta, z and variable [batch, N, L] or grouped [batch, G, N, L] B and C
  are in T; A [dim, N], D, delta_bias, constant [dim, N] B and C and
  initial_state are in acc; the last state comes back in acc.  The
  convolution's weight and bias are in acc, its states in T.
* cu_seqlens is None or int64 [S + 1] (batch 1); the states are then
  [S, ...], one per sequence.  Its values are checked inside every backend
  (:func:`check_cu_seqlens`), so compiled graphs refuse bad offsets too.
* selective_state_update takes the multi-head form only: state
  [rows, nheads, headdim, N], x, dt, z [batch, nheads, headdim],
  A [nheads, headdim, N], B, C [batch, ngroups, N], D, dt_bias
  [nheads, headdim] in acc; state_batch_indices None (rows == batch) or
  int64 [batch], distinct and in range (:func:`check_state_batch_indices`).
  The 3-D form is this with headdim 1.

The backward ops compute every gradient and hand back :func:`absent` for an
optional input that was None.  The two decoding ops write their state in
place and have no autograd: they serve inference, and the public functions
run them under ``torch.no_grad()``.

NaN in any tensor argument propagates along the data flow of the recurrence
(each public function's docstring says where to).  Apart from the offsets
and state indices, no value is read to validate an argument, so meta
tensors and torch.compile see the same checks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._checks import (
    FLOATS,
    acc_dtype,
    check_bool,
    check_choice,
    check_dims,
    check_distinct_indices,
    check_index_tensor,
    check_offsets,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    check_writable,
)
from .._library import absent, define_op
from ..reference import ssm as ref

_ops = torch.ops.frontiers_fast


# ---------------------------------------------------------------------------
# value checks that hold inside the op bodies too (compiled graphs raise them)
# ---------------------------------------------------------------------------
def check_cu_seqlens(cu_seqlens, L: int, batch: int = 1) -> None:
    """``cu_seqlens`` offsets of a batch of one: int64, 0 first, L last, never decreasing (every
    backend's op body calls this or its C++ twin, ``seqlens_arg``)."""
    if batch != 1:
        raise ValueError(
            f"cu_seqlens packs sequences along L of a batch of one, but the input has batch {batch}"
        )
    if cu_seqlens.dtype != torch.int64 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be int64 [S + 1] with S >= 1 inside the ops, got {cu_seqlens.dtype} {list(cu_seqlens.shape)}"
        )
    check_offsets("cu_seqlens", cu_seqlens, L, "u (its L)")


def check_state_batch_indices(state_batch_indices, rows: int) -> None:
    """Rows of the state cache that the batch entries update: in range and distinct."""
    check_distinct_indices("state_batch_indices", state_batch_indices, rows, "state")


# ---------------------------------------------------------------------------
# reference implementations in the ops' calling convention
# ---------------------------------------------------------------------------
def _ref_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens):
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, u.shape[-1], u.shape[0])
    out, last = ref.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, initial_state, cu_seqlens
    )
    # The last state is a view of the stacked states: give it storage of its own.
    return out.contiguous(), last.clone(memory_format=torch.contiguous_format)


def _ref_selective_scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, grad_out, grad_last_state
):
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, u.shape[-1], u.shape[0])
    grads = ref.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, grad_out, grad_last_state,
        cu_seqlens,
    )  # fmt: skip
    return tuple(absent(u) if g is None else g.contiguous() for g in grads)


def _ref_causal_conv1d(x, weight, bias, initial_states, silu, cu_seqlens):
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[-1], x.shape[0])
    out, final = ref.causal_conv1d(
        x, weight, bias, "silu" if silu else None, initial_states, True, cu_seqlens
    )
    return out.contiguous(), final.clone(memory_format=torch.contiguous_format)


def _ref_causal_conv1d_bwd(x, weight, bias, initial_states, silu, cu_seqlens, grad_out, grad_final_states):
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[-1], x.shape[0])
    grads = ref.causal_conv1d_bwd(
        x, weight, bias, "silu" if silu else None, initial_states, grad_out, grad_final_states, cu_seqlens
    )
    # grad_x and grad_initial_states are slices of one buffer, and outputs may not alias.
    return tuple(absent(x) if g is None else g.clone(memory_format=torch.contiguous_format) for g in grads)


def _ref_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    if state_batch_indices is not None:
        check_state_batch_indices(state_batch_indices, state.shape[0])
    return ref.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def _ref_causal_conv1d_update(x, conv_state, weight, bias, silu):
    return ref.causal_conv1d_update(x, conv_state, weight, bias, "silu" if silu else None)


# ---------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------
def _rows(batch, cu_seqlens):
    """Rows of the initial and last states: one per batch entry, or one per packed sequence."""
    return batch if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _fake_selective_scan(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, backend
):
    torch._check(u.dim() == 3, lambda: "u must be [batch, dim, L]")
    torch._check(A.dim() == 2, lambda: "A must be [dim, N]")
    rows = _rows(u.shape[0], cu_seqlens)
    return u.new_empty(u.shape), u.new_empty((rows, u.shape[1], A.shape[1]), dtype=A.dtype)


def _fake_selective_scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, grad_out, grad_last_state,
    backend,
):  # fmt: skip
    ins = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(absent(u) if t is None else t.new_empty(t.shape) for t in ins)


def _fake_causal_conv1d(x, weight, bias, initial_states, silu, cu_seqlens, backend):
    torch._check(x.dim() == 3, lambda: "x must be [batch, dim, L]")
    torch._check(weight.dim() == 2, lambda: "weight must be [dim, width]")
    rows = _rows(x.shape[0], cu_seqlens)
    return x.new_empty(x.shape), x.new_empty((rows, x.shape[1], weight.shape[1] - 1))


def _fake_causal_conv1d_bwd(
    x, weight, bias, initial_states, silu, cu_seqlens, grad_out, grad_final_states, backend
):
    return tuple(absent(x) if t is None else t.new_empty(t.shape) for t in (x, weight, bias, initial_states))


def _fake_selective_state_update(
    state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, backend
):
    torch._check(x.dim() == 3, lambda: "x must be [batch, nheads, headdim]")
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------
_SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
_CONV_GRADS = ("x", "weight", "bias", "initial_states")


def _scan_setup(ctx, a, output):
    ctx.delta_softplus = a.delta_softplus
    # The backward recomputes the states rather than keeping [L, batch, dim, N] of them.
    ctx.save_for_backward(*(getattr(a, n) for n in _SCAN_GRADS), a.cu_seqlens)


def _scan_backward(ctx, grad_out, grad_last_state):
    *saved, cu_seqlens = ctx.saved_tensors
    u, delta, A, B, C, D, z, delta_bias, initial_state = saved
    grads = _ops.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, cu_seqlens,
        grad_out.contiguous(), grad_last_state, ctx.backend,
    )  # fmt: skip
    return dict(zip(_SCAN_GRADS, grads))


def _conv_setup(ctx, a, output):
    ctx.silu = a.silu
    ctx.save_for_backward(*(getattr(a, n) for n in _CONV_GRADS), a.cu_seqlens)


def _conv_backward(ctx, grad_out, grad_final_states):
    x, weight, bias, initial_states, cu_seqlens = ctx.saved_tensors
    grads = _ops.causal_conv1d_bwd(
        x, weight, bias, initial_states, ctx.silu, cu_seqlens, grad_out.contiguous(), grad_final_states,
        ctx.backend,
    )  # fmt: skip
    return dict(zip(_CONV_GRADS, grads))


# ---------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------
_K = "frontiers_fast.kernels.ssm:"
_SCAN_ARGS = (
    "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus, Tensor? initial_state, Tensor? cu_seqlens"
)
define_op(
    f"selective_scan({_SCAN_ARGS}) -> (Tensor, Tensor)",
    fake=_fake_selective_scan,
    reference=_ref_selective_scan,
    triton=_K + "selective_scan_fwd",
    native=("cpp", "cuda"),
    backward=_scan_backward,
    setup_context=_scan_setup,
)
define_op(
    f"selective_scan_bwd({_SCAN_ARGS}, Tensor grad_out, Tensor? grad_last_state) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_selective_scan_bwd,
    reference=_ref_selective_scan_bwd,
    triton=_K + "selective_scan_bwd",
    native=("cpp",),
)
_CONV_ARGS = "Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, bool silu, Tensor? cu_seqlens"
define_op(
    f"causal_conv1d({_CONV_ARGS}) -> (Tensor, Tensor)",
    fake=_fake_causal_conv1d,
    reference=_ref_causal_conv1d,
    triton=_K + "causal_conv1d_fwd",
    native=("cpp",),
    backward=_conv_backward,
    setup_context=_conv_setup,
)
define_op(
    f"causal_conv1d_bwd({_CONV_ARGS}, Tensor grad_out, Tensor? grad_final_states) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_causal_conv1d_bwd,
    reference=_ref_causal_conv1d_bwd,
    triton=_K + "causal_conv1d_bwd",
    native=("cpp",),
)
define_op(
    "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices) -> Tensor",
    fake=_fake_selective_state_update,
    reference=_ref_selective_state_update,
    triton=_K + "selective_state_update_fwd",
    native=("cpp",),
)
define_op(
    "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu) -> Tensor",
    fake=lambda x, conv_state, weight, bias, silu, backend: x.new_empty(x.shape),
    reference=_ref_causal_conv1d_update,
    triton=_K + "causal_conv1d_update_fwd",
    native=("cpp",),
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


def _param(name, t, like):
    """A parameter (A, D, biases, constant B/C, a scan state) in ``like``'s dtype or its accumulate dtype,
    handed to the op in the accumulate dtype (mamba_ssm keeps A, D and the biases in float32 for bf16
    activations, and so do the kernels)."""
    if t is None:
        return None
    acc = acc_dtype(like[1].dtype)
    if t.dtype not in (like[1].dtype, acc):
        raise TypeError(
            f"{name} has dtype {t.dtype}; it must have {like[0]}'s dtype ({like[1].dtype}) or {acc}"
        )
    return t.to(acc)


def _data(name, t, like):
    """Activations read once per step (delta, z, variable B/C): exactly ``like``'s dtype."""
    if t is not None:
        check_same_dtype(name, t, like[0], like[1].dtype)
    return t


def _check_cu_seqlens(cu_seqlens, like, batch):
    """``cu_seqlens``: int32 or int64 [S + 1], S >= 1, with batch 1; returns it as int64."""
    check_index_tensor("cu_seqlens", cu_seqlens, (torch.int32, torch.int64))
    check_same_device("cu_seqlens", cu_seqlens, like[0], like[1].device)
    check_dims("cu_seqlens", cu_seqlens, 1, "[num_sequences + 1]")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must hold S + 1 >= 2 offsets, got {cu_seqlens.shape[0]}")
    if batch != 1:
        raise ValueError(
            f"cu_seqlens packs sequences along L of a batch of one, but {like[0]} has batch {batch}; "
            f"concatenate the sequences into [1, dim, total]"
        )
    # Its values are checked inside the op, by every backend (check_cu_seqlens, or seqlens_arg in C++).
    return cu_seqlens.to(torch.int64)


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
    cu_seqlens=None,
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
            previous call's last state to continue a sequence), or
            [num_sequences, dim, N] with ``cu_seqlens``.
        cu_seqlens: packed variable-length sequences: int32 or int64 offsets
            [S + 1] (0 first, L last, never decreasing; empty sequences are
            allowed) with batch 1, u [1, dim, total].  The state restarts
            (from ``initial_state[s]``, or zeros) at each sequence's start,
            and the last state is [S, dim, N], one row per sequence.
        backend: force one of ``"reference"``, ``"cpp"`` (CPU), ``"triton"``
            or ``"cuda"`` (GPU; the CUDA kernel has the forward only).

    Dtypes: u, delta, z and variable or grouped B and C share u's dtype
    (float16, bfloat16, float32 or float64), read as they are; A, D,
    delta_bias, constant B and C and initial_state have u's dtype or float32
    (as mamba_ssm keeps them).  Everything accumulates in float32 (float64
    for float64 inputs).  Empty batch, dim or N give empty (or, for N = 0,
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
    delta_softplus = check_bool("delta_softplus", delta_softplus)
    return_last_state = check_bool("return_last_state", return_last_state)
    if L == 0:
        raise ValueError("u must have at least one time step (L >= 1), got L=0")
    rows, what = batch, "batch"
    if cu_seqlens is not None:
        cu_seqlens = _check_cu_seqlens(cu_seqlens, like, batch)
        rows, what = cu_seqlens.shape[0] - 1, "num_sequences"
    _check_sized("initial_state", initial_state, (rows, dim, N), f"[{what}, dim, N]", like, optional=True)
    _data("delta", delta, like)
    _data("z", z, like)
    B = _param("B", B, like) if B.dim() == 2 else _data("B", B, like)
    C = _param("C", C, like) if C.dim() == 2 else _data("C", C, like)
    A, D, delta_bias = _param("A", A, like), _param("D", D, like), _param("delta_bias", delta_bias, like)
    initial_state = _param("initial_state", initial_state, like)
    grad = _backend.records_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = _backend.resolve(backend, u.device, "selective_scan", grad)
    out, last = _ops.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, backend
    )
    return (out, last) if return_last_state else out


def selective_state_update(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    state_batch_indices=None,
    *,
    backend=None,
):
    """One decoding step of :func:`selective_scan`; ``state`` is updated in place.

    Stepping it over t = 0..L-1 with ``x = u[..., t]``, ``dt = delta[..., t]``,
    ``B = B[..., t]`` and so on reproduces :func:`selective_scan` (whose
    ``initial_state`` and last state match ``state`` before and after).

    Two forms, as mamba_ssm's ``selective_state_update``, told by ``state.dim()``:

    * 3-D: state [batch, dim, N]; x, dt, z [batch, dim]; A [dim, N]; B, C
      [batch, N] or grouped [batch, G, N] with dim % G == 0; D, dt_bias [dim].
    * multi-head: state [batch, nheads, headdim, N]; x, dt, z
      [batch, nheads, headdim]; A [nheads, headdim, N]; B, C [batch, N] or
      [batch, ngroups, N] with nheads % ngroups == 0 (head h reads group
      h // (nheads // ngroups)); D, dt_bias [nheads, headdim].

    ``state_batch_indices`` (int32 or int64 [batch]), as serving engines use
    it: ``state`` is a cache of any number of rows, and batch entry b reads
    and updates row ``state_batch_indices[b]``; the rows must be distinct
    and in range.  There is no autograd: the op runs under
    ``torch.no_grad()`` and its output does not require grad.

    Dtypes: x, dt, z, B and C share x's dtype; A, D and dt_bias have x's
    dtype or float32; ``state`` may have any float dtype and is written back
    in it.  Computed in float32 (float64 for float64 inputs).

    Args:
        backend: force one of ``"reference"``, ``"cpp"`` or ``"triton"``.

    NaN is not refused.  A NaN in ``state``, ``x``, ``dt``, ``B``, ``A`` or
    ``dt_bias`` makes the new state NaN where it flows (a channel's states,
    or for ``B`` a state of every channel of its group) and so the output of
    those channels; a NaN in ``C``, ``z`` or ``D`` makes the output NaN and
    leaves the state alone.

    Returns:
        y with x's shape and dtype.

    Example::

        >>> state = torch.zeros(2, 8, 16)
        >>> y = selective_state_update(state, torch.randn(2, 8), torch.rand(2, 8), -torch.rand(8, 16),
        ...                            torch.randn(2, 16), torch.randn(2, 16))
    """
    _check_input("state", state, (3, 4), "[batch, dim, N] or [batch, nheads, headdim, N]")
    check_writable("state", state)
    like = ("x", x)
    heads = state.dim() == 4
    rows, N = state.shape[0], state.shape[-1]
    if heads:
        _check_input("x", x, 3, "[batch, nheads, headdim] (state is multi-head)", ("state", state))
        batch, nheads, headdim = x.shape
        if state.shape[1:3] != (nheads, headdim):
            raise ValueError(
                f"state has {state.shape[1]} heads of headdim {state.shape[2]} (shape {list(state.shape)}), "
                f"but x has {nheads} of {headdim} (shape {list(x.shape)})"
            )
        chan, chan_layout = (nheads, headdim), "[batch, nheads, headdim]"
        a_shape, a_layout = (nheads, headdim, N), "[nheads, headdim, N]"
        p_shape, p_layout = (nheads, headdim), "[nheads, headdim]"
        units, unit = nheads, "nheads"
    else:
        _check_input("x", x, 2, "[batch, dim] (state is [batch, dim, N])", ("state", state))
        batch, dim = x.shape
        if state.shape[1] != dim:
            raise ValueError(
                f"state has dim={state.shape[1]} (shape {list(state.shape)}) but x has dim={dim}"
            )
        chan, chan_layout = (dim,), "[batch, dim]"
        a_shape, a_layout = (dim, N), "[dim, N]"
        p_shape, p_layout = (dim,), "[dim]"
        units, unit = dim, "dim"
    _check_sized("dt", dt, (batch, *chan), chan_layout, like)
    _check_sized("A", A, a_shape, a_layout, like)
    for name, M in (("B", B), ("C", C)):
        _check_input(name, M, (2, 3), "[batch, N] or [batch, G, N]", like)
        if M.dim() == 2:
            check_shape(name, M, (batch, N), " ([batch, N])")
        else:
            G = M.shape[1]
            if G < 1 or units % G:
                raise ValueError(
                    f"{name} has G={G} groups (shape {list(M.shape)}), which must divide {unit}={units}"
                )
            check_shape(name, M, (batch, G, N), " ([batch, G, N])")
    _check_sized("D", D, p_shape, p_layout, like, optional=True)
    _check_sized("z", z, (batch, *chan), chan_layout, like, optional=True)
    _check_sized("dt_bias", dt_bias, p_shape, p_layout, like, optional=True)
    dt_softplus = check_bool("dt_softplus", dt_softplus)
    if state_batch_indices is None:
        if rows != batch:
            raise ValueError(
                f"state has {rows} rows but x has batch {batch}; pass state_batch_indices to update "
                "some rows of a larger cache"
            )
    else:
        check_index_tensor("state_batch_indices", state_batch_indices, (torch.int32, torch.int64))
        check_same_device("state_batch_indices", state_batch_indices, "x", x.device)
        check_shape("state_batch_indices", state_batch_indices, (batch,), " ([batch])")
        # range and distinctness: checked inside the op, by every backend
        state_batch_indices = state_batch_indices.to(torch.int64)
    for name, t in (("dt", dt), ("z", z), ("B", B), ("C", C)):
        _data(name, t, like)
    A, D, dt_bias = _param("A", A, like), _param("D", D, like), _param("dt_bias", dt_bias, like)
    if not heads:  # the 3-D form is the multi-head one with one channel per head
        one = lambda t: None if t is None else t.unsqueeze(-1)
        state, x, dt, z, D, dt_bias, A = (
            state.unsqueeze(2),
            one(x),
            one(dt),
            one(z),
            one(D),
            one(dt_bias),
            A.unsqueeze(1),
        )
    B = B.unsqueeze(1) if B.dim() == 2 else B
    C = C.unsqueeze(1) if C.dim() == 2 else C
    backend = _backend.resolve(backend, x.device, "selective_state_update", False)
    with torch.no_grad():
        y = _ops.selective_state_update(
            state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, backend
        )
    return y if heads else y.squeeze(-1)


def causal_conv1d(
    x,
    weight,
    bias=None,
    activation=None,
    initial_states=None,
    return_final_states=False,
    cu_seqlens=None,
    *,
    backend=None,
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
        cu_seqlens: packed sequences, as for :func:`selective_scan`: offsets
            [S + 1] with batch 1; no sequence sees its neighbour's tail (its
            window starts from ``initial_states[s]``, or zeros), and
            ``initial_states`` and the final states are [S, dim, width - 1].
        backend: force one of ``"reference"``, ``"cpp"`` or ``"triton"``.

    Dtypes: ``initial_states`` has x's dtype; ``weight`` and ``bias`` have
    x's dtype or float32.

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
    silu = _silu(activation)
    return_final_states = check_bool("return_final_states", return_final_states)
    if L == 0:
        # As selective_scan (and causal-conv1d's kernels): an empty sequence is refused.
        raise ValueError("x must have at least one time step (L >= 1), got L=0")
    rows, what = batch, "batch"
    if cu_seqlens is not None:
        cu_seqlens = _check_cu_seqlens(cu_seqlens, like, batch)
        rows, what = cu_seqlens.shape[0] - 1, "num_sequences"
    shape = (rows, dim, width - 1)
    _check_sized("initial_states", initial_states, shape, f"[{what}, dim, width - 1]", like, optional=True)
    _data("initial_states", initial_states, like)
    weight, bias = _param("weight", weight, like), _param("bias", bias, like)
    grad = _backend.records_grad(x, weight, bias, initial_states)
    backend = _backend.resolve(backend, x.device, "causal_conv1d", grad)
    out, final = _ops.causal_conv1d(x, weight, bias, initial_states, silu, cu_seqlens, backend)
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
        backend: force one of ``"reference"``, ``"cpp"`` or ``"triton"``.

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
    weight, bias = _param("weight", weight, like), _param("bias", bias, like)
    backend = _backend.resolve(backend, x.device, "causal_conv1d_update", False)
    with torch.no_grad():
        return _ops.causal_conv1d_update(x, conv_state, weight, bias, silu, backend)


__all__ = ["causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update"]

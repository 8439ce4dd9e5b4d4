"""Mamba mixer layer (Gu & Dao 2023) on the selective-scan ops.

Parameter names follow mamba_ssm's ``Mamba`` block (and mambapy's
``MambaBlock`` and transformers' ``MambaMixer``, which use the same ones), so
their state dicts load as they are: ``in_proj``, ``conv1d``, ``x_proj``,
``dt_proj``, ``A_log``, ``D``, ``out_proj``.

The forward runs the convolution, the projections and the scan in one
autograd function (:class:`_MambaInner`) that keeps only the in-projection's
output ``xz`` and ``x_dbl = x_proj(conv out)`` for the backward and
recomputes the convolution output and delta there, as mamba_ssm's
``mamba_inner_fn`` (checkpoint_lvl=1) does.  Decoding follows mamba_ssm: an
:class:`InferenceParams` cache (``key_value_memory_dict[layer_idx]``,
``seqlen_offset``) or a ``(conv_state, ssm_state)`` tuple.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from .._checks import (
    FLOATS,
    acc_dtype,
    check_bool,
    check_choice,
    check_dims,
    check_features,
    check_int,
    check_memory,
    check_real,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from ..ops.ssm import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update

_ops = torch.ops.frontiers_fast


def _check_dt_init(dt_min, dt_max, dt_init_floor, dtype):
    """The initial steps lie in [max(dt_min, floor), max(dt_max, floor)]: their inverse softplus
    (dt_proj.bias) must be finite in the dtypes it is computed in and stored in."""
    lo, hi = max(dt_min, dt_init_floor), max(dt_max, dt_init_floor)
    # The ends in torch.rand's dtype, as __init__ computes them; the inverse
    # softplus is increasing, so finite ends mean a finite bias throughout.
    ends = torch.tensor([lo, hi])
    bias = (ends + torch.log(-torch.expm1(-ends))).to(dtype or ends.dtype)
    # The high end first: when both overflow, the low end is not too small.
    if not torch.isfinite(bias[1]):
        name, value = ("dt_max", dt_max) if dt_max >= dt_init_floor else ("dt_init_floor", dt_init_floor)
        where = ends.dtype if not torch.isfinite(ends[1]) else (dtype or ends.dtype)
        raise ValueError(
            f"{name}={value} is too large: the initial dt_proj.bias (about {hi:g}) overflows {where}"
        )
    if not torch.isfinite(bias[0]):
        raise ValueError(
            f"dt_min={dt_min} (floored at dt_init_floor={dt_init_floor}) is too small: the initial step "
            f"size rounds to 0 in {ends.dtype} and dt_proj.bias would be {bias[0].item()}"
        )


def _split_x_dbl(x_dbl, dt_proj_weight, d_state):
    """x_dbl [batch, L, R + 2N] -> delta [batch, d_inner, L] (dt_proj without its bias, which goes into the
    scan's softplus) and B, C [batch, N, L], the scan's layout (views of x_dbl)."""
    dt, B, C = x_dbl.split([dt_proj_weight.shape[1], d_state, d_state], dim=-1)
    return F.linear(dt, dt_proj_weight).transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)


class _MambaInner(torch.autograd.Function):
    """xz -> y: causal conv + SiLU, the padding mask, x_proj, dt_proj, the selective scan gated by silu(z).

    out_proj stays outside: its weight gradient needs y, which only a second
    scan could give back, and autograd keeping y costs d_inner per token.
    Saved for the backward: xz [batch, 2 d_inner, L], x_dbl [batch, L, R + 2N]
    and the parameters; the conv output u and delta ([batch, d_inner, L] each)
    are recomputed, as mamba_ssm's mamba_inner_fn with checkpoint_lvl=1.

    Dtypes: xz, x_proj_weight, dt_proj_weight, mask, conv_initial_states in
    T; conv_weight, conv_bias, A, D, dt_bias, initial_state in the accumulate
    dtype (the ops' calling convention; the caller casts, so autograd carries
    the casts' gradients).  The final conv states and the last scan state
    come back for decoding and are not differentiable.
    """

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, mask,
                conv_initial_states, initial_state, conv_backend, scan_backend):  # fmt: skip
        x, z = xz.chunk(2, dim=1)
        u, conv_final = _ops.causal_conv1d(
            x, conv_weight, conv_bias, conv_initial_states, True, None, conv_backend
        )
        if mask is not None:
            u = u * mask.unsqueeze(1)
        x_dbl = F.linear(u.transpose(1, 2), x_proj_weight)
        delta, B, C = _split_x_dbl(x_dbl, dt_proj_weight, A.shape[1])
        y, last = _ops.selective_scan(
            u, delta, A, B, C, D, z, dt_bias, True, initial_state, None, scan_backend
        )
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, mask,
                              conv_initial_states, initial_state, x_dbl)  # fmt: skip
        ctx.conv_backend, ctx.scan_backend = conv_backend, scan_backend
        ctx.mark_non_differentiable(conv_final, last)
        return y, conv_final, last

    @staticmethod
    def backward(ctx, grad_y, grad_conv_final, grad_last):
        # Grad mode is on in a backward only under create_graph=True; the backward ops
        # have no autograd, so second derivatives would silently be zero.
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "Mamba: double backward (create_graph=True) is not supported: its backward ops have no "
                "autograd, so second derivatives would silently be zero"
            )
        (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, mask, conv_initial_states,
         initial_state, x_dbl) = ctx.saved_tensors  # fmt: skip
        x, z = xz.chunk(2, dim=1)
        u, _ = _ops.causal_conv1d(
            x, conv_weight, conv_bias, conv_initial_states, True, None, ctx.conv_backend
        )
        if mask is not None:
            u = u * mask.unsqueeze(1)
        delta, B, C = _split_x_dbl(x_dbl, dt_proj_weight, A.shape[1])
        g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_dt_bias, g_h0 = _ops.selective_scan_bwd(
            u, delta, A, B, C, D, z, dt_bias, True, initial_state, None, grad_y.contiguous(), None,
            ctx.scan_backend,
        )  # fmt: skip
        # Back through dt_proj and x_proj, by hand: [batch, L, .] rows flattened into one GEMM each.
        g_delta = g_delta.transpose(1, 2)  # [batch, L, d_inner], dt_proj's output layout
        dt = x_dbl[..., : dt_proj_weight.shape[1]]
        g_x_dbl = torch.cat([g_delta @ dt_proj_weight, g_B.transpose(1, 2), g_C.transpose(1, 2)], dim=-1)
        g_dt_proj_weight = g_delta.reshape(-1, g_delta.shape[-1]).T @ dt.reshape(-1, dt.shape[-1])
        u_rows = u.transpose(1, 2).reshape(-1, u.shape[1])
        g_x_proj_weight = g_x_dbl.reshape(-1, g_x_dbl.shape[-1]).T @ u_rows
        g_u = g_u + (g_x_dbl @ x_proj_weight).transpose(1, 2)
        if mask is not None:
            g_u = g_u * mask.unsqueeze(1)
        g_x, g_conv_weight, g_conv_bias, g_conv_initial = _ops.causal_conv1d_bwd(
            x, conv_weight, conv_bias, conv_initial_states, True, None, g_u.contiguous(), None, ctx.conv_backend,
        )  # fmt: skip
        given = lambda g, t: None if t is None else g  # the ops hand back [0] placeholders for None inputs
        return (
            torch.cat([g_x, g_z], dim=1), g_conv_weight, given(g_conv_bias, conv_bias), g_x_proj_weight,
            g_dt_proj_weight, g_A, given(g_D, D), given(g_dt_bias, dt_bias), None,
            given(g_conv_initial, conv_initial_states), given(g_h0, initial_state), None, None,
        )  # fmt: skip


@dataclasses.dataclass
class InferenceParams:
    """A decoding cache in mamba_ssm's layout (``mamba_ssm.utils.generation.InferenceParams``).

    ``key_value_memory_dict[layer_idx]`` holds each layer's
    ``(conv_state, ssm_state)``, allocated by the layer on its first call;
    ``seqlen_offset`` is the number of tokens already seen: 0 means the next
    call is a prefill that starts a new sequence.  The caller advances it, as
    in mamba_ssm.  mamba_ssm's own object works too (only these two
    attributes are read).

    Example::

        >>> layer = Mamba(64, layer_idx=0)
        >>> cache = InferenceParams(max_seqlen=100, max_batch_size=2)
        >>> y = layer(torch.randn(2, 10, 64), inference_params=cache)  # prefill
        >>> cache.seqlen_offset += 10
        >>> y = layer(torch.randn(2, 1, 64), inference_params=cache)  # one step
    """

    max_seqlen: int = 0
    max_batch_size: int = 0
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = dataclasses.field(default_factory=dict)
    lengths_per_sample: torch.Tensor | None = None

    def reset(self, max_seqlen, max_batch_size):
        """Start a new sequence: seqlen_offset 0 (the states are overwritten by the next prefill)."""
        self.max_seqlen, self.max_batch_size, self.seqlen_offset = max_seqlen, max_batch_size, 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


class Mamba(nn.Module):
    """Mamba mixer: in-projection, causal depthwise convolution, selective scan gated by silu(z), out-projection.

    Args:
        d_model: width of the input and output (int >= 1).
        d_state: N, the state size per channel (int >= 1).
        d_conv: width of the causal convolution (int >= 1).
        expand: d_inner = expand * d_model channels inside the block (int >= 1).
        dt_rank: rank of the delta projection, an int >= 1 or ``"auto"``
            (ceil(d_model / 16)).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes:
            0 < dt_min <= dt_max and dt_init_floor >= 0, all finite, and such
            that the initial ``dt_proj.bias`` (their inverse softplus) is
            finite in the layer's dtype.
        conv_bias, bias: biases of the convolution and of the two projections (bools).
        layer_idx: the key of this layer's states in an
            :class:`InferenceParams` cache (None or an int >= 0), as mamba_ssm.
        dtype: a floating dtype, or None for the default.

    Sizes whose parameters would not fit in the device's memory are refused
    before anything is allocated.

    Shapes: ``forward`` maps [batch, L, d_model] to [batch, L, d_model];
    ``step`` maps [batch, d_model] to [batch, d_model] and updates the two
    states from :meth:`allocate_inference_cache` in place.  The input must
    be a floating tensor with d_model features on the layer's device, in the
    layer's dtype unless autocast is on.

    NaN is not refused: a NaN in a token makes that token's output and every
    later one NaN (in its batch element), and the same holds for ``step``,
    whose states then keep it.

    Example::

        >>> layer = Mamba(64)
        >>> layer(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        d_model = check_int("d_model", d_model, 1)
        d_state = check_int("d_state", d_state, 1)
        d_conv = check_int("d_conv", d_conv, 1)
        expand = check_int("expand", expand, 1)
        if isinstance(dt_rank, str):
            check_choice("dt_rank", dt_rank, ("auto",))
        else:
            dt_rank = check_int("dt_rank", dt_rank, 1, why=" (or 'auto')")
        dt_min = check_real("dt_min", dt_min, 0.0, strict=True)
        dt_max = check_real("dt_max", dt_max, 0.0, strict=True)
        if dt_min > dt_max:
            raise ValueError(f"dt_min must be <= dt_max, got dt_min={dt_min} and dt_max={dt_max}")
        dt_init_floor = check_real("dt_init_floor", dt_init_floor, 0.0)
        conv_bias, bias = check_bool("conv_bias", conv_bias), check_bool("bias", bias)
        self.layer_idx = None if layer_idx is None else check_int("layer_idx", layer_idx, 0, why=" (or None)")
        check_choice("dtype", dtype, (None, *FLOATS))
        _check_dt_init(dt_min, dt_max, dt_init_floor, dtype)
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        # The parameters, counted before any is allocated, so that sizes too big
        # for the device are an error naming them rather than an out-of-memory kill.
        per_channel = (
            3 * d_model  # in_proj, out_proj
            + d_conv + 1  # conv1d
            + 2 * self.dt_rank + 2 * d_state + 1  # x_proj, dt_proj
            + d_state + 1  # A_log, D
        )  # fmt: skip
        check_memory(
            f"Mamba(d_model={d_model}, d_state={d_state}, d_conv={d_conv}, expand={expand}, "
            f"dt_rank={self.dt_rank})",
            self.d_inner * per_channel * (dtype or torch.get_default_dtype()).itemsize,
            device if device is not None else torch.get_default_device(),
        )
        kw = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **kw)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias, **kw
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)
        # S4D-real initialisation: A = -(1..N) per channel, stored as its log to keep A < 0.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        with torch.no_grad():
            # Initial step sizes log-uniform in [dt_min, dt_max]; the bias is their inverse softplus.
            u = torch.rand(self.d_inner, device=device)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(
                min=dt_init_floor
            )
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _ssm_params(self):
        # Half parameters are widened (as mamba_ssm does); float64 ones stay float64.
        wide = lambda p: p.to(torch.promote_types(p.dtype, torch.float32))
        return -torch.exp(wide(self.A_log)), wide(self.D), wide(self.dt_proj.bias)

    def _check_input(self, name, t, dims, layout):
        check_features(name, t, "d_model", self.d_model)
        check_dims(name, t, dims, layout)
        w = self.in_proj.weight
        check_same_device(name, t, "the layer's parameters", w.device)
        # Under autocast the projections cast for themselves; otherwise a
        # mismatch would surface as a bare matmul dtype error.
        # (Meta tensors have no autocast to ask about.)
        if t.device.type == "meta" or not torch.is_autocast_enabled(t.device.type):
            check_same_dtype(name, t, "the layer's parameters", w.dtype)

    def _check_states(self, conv_state, ssm_state, batch, device, what):
        """The decoding states of ``batch`` sequences (``what`` says where they came from, for the errors)."""
        for name, t, shape, layout in (
            ("conv_state", conv_state, (batch, self.d_inner, None), "[batch, d_inner, S]"),
            ("ssm_state", ssm_state, (batch, self.d_inner, self.d_state), "[batch, d_inner, d_state]"),
        ):
            check_tensor(name, t)
            check_same_device(name, t, "hidden_states", device)
            check_shape(name, t, shape, f" ({layout}, as {what})")
        if conv_state.shape[2] < self.d_conv - 1:
            raise ValueError(
                f"conv_state must hold S >= d_conv - 1 = {self.d_conv - 1} past inputs (shape [batch, d_inner, S], "
                f"as {what}), got S={conv_state.shape[2]}"
            )

    def _mix(self, xz, mask=None, conv_initial_states=None, initial_state=None):
        """The layer between its two projections, on :class:`_MambaInner`.

        xz [batch, 2 d_inner, L] (in_proj's output, transposed); mask None or
        [batch, L] (multiplies the conv output, as transformers' padding
        mask); conv_initial_states [batch, d_inner, d_conv - 1] and
        initial_state [batch, d_inner, d_state] continue a sequence.  Returns
        y [batch, d_inner, L] in xz's dtype, the final conv states and the
        last scan state (for decoding; not differentiable).
        """
        T = xz.dtype  # the activations' dtype: the layer's, or autocast's
        acc = acc_dtype(T)
        # The casts happen here, outside the autograd function, so that autograd
        # carries their gradients back to the parameters' dtypes (no-ops when the
        # layer already has the dtypes the ops want).
        conv_weight = self.conv1d.weight.squeeze(1).to(acc)
        conv_bias = None if self.conv1d.bias is None else self.conv1d.bias.to(acc)
        # Under autocast the projections run in T, as an autocast F.linear would.
        x_proj_weight, dt_proj_weight = self.x_proj.weight.to(T), self.dt_proj.weight.to(T)
        A, D, dt_bias = (p.to(acc) for p in self._ssm_params())
        if mask is not None:
            mask = mask.to(T)
        if conv_initial_states is not None:
            conv_initial_states = conv_initial_states.to(T)
        if initial_state is not None:
            initial_state = initial_state.to(acc)
        tensors = (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, conv_initial_states,
                   initial_state)  # fmt: skip
        grad = _backend.records_grad(*tensors)
        conv_backend = _backend.resolve(None, xz.device, "causal_conv1d", grad)
        scan_backend = _backend.resolve(None, xz.device, "selective_scan", grad)
        return _MambaInner.apply(
            xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, mask, conv_initial_states,
            initial_state, conv_backend, scan_backend,
        )  # fmt: skip

    def _composed_forward(self, hidden_states):
        """The forward as a plain composition of the public functions, every intermediate kept by autograd.

        Not used by the layer: the tests check :class:`_MambaInner`'s
        gradients against it, and the benchmark its memory.
        """
        xz = self.in_proj(hidden_states).transpose(1, 2)  # [batch, 2 d_inner, L]
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # the bias goes into the scan's softplus
        A, D, dt_bias = self._ssm_params()
        y = selective_scan(
            x, dt, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z, delta_bias=dt_bias, delta_softplus=True
        )
        return self.out_proj(y.transpose(1, 2))

    def _cache_states(self, inference_params, batch, device):
        """``(conv_state, ssm_state, continues)`` from a forward's ``inference_params``.

        ``continues``: the call extends the sequence the states hold (False
        for a prefill, which starts from zero states and overwrites them).
        """
        if isinstance(inference_params, (tuple, list)):
            if len(inference_params) != 2:
                raise ValueError(
                    f"inference_params as a tuple must be (conv_state, ssm_state), got {len(inference_params)} items"
                )
            conv_state, ssm_state = inference_params
            # The states are the sequence so far (zeros from allocate_inference_cache start one).
            self._check_states(conv_state, ssm_state, batch, device, "inference_params holds them")
            return conv_state, ssm_state, True
        if not (
            hasattr(inference_params, "key_value_memory_dict") and hasattr(inference_params, "seqlen_offset")
        ):
            raise TypeError(
                "inference_params must be an InferenceParams (an object with key_value_memory_dict and "
                f"seqlen_offset, as mamba_ssm's) or a (conv_state, ssm_state) tuple, got {type(inference_params).__name__}"
            )
        if self.layer_idx is None:
            raise ValueError(
                "inference_params keeps the states by layer, so this Mamba needs a layer_idx (pass layer_idx= "
                "to the constructor), or pass the states as a (conv_state, ssm_state) tuple"
            )
        offset = check_int("inference_params.seqlen_offset", inference_params.seqlen_offset, 0)
        memory = inference_params.key_value_memory_dict
        if self.layer_idx not in memory:
            memory[self.layer_idx] = self.allocate_inference_cache(batch)
        states = memory[self.layer_idx]
        if not (isinstance(states, (tuple, list)) and len(states) == 2):
            raise ValueError(
                f"inference_params.key_value_memory_dict[{self.layer_idx}] must be (conv_state, ssm_state), "
                f"got {type(states).__name__}"
            )
        what = f"inference_params.key_value_memory_dict[{self.layer_idx}] holds them"
        self._check_states(*states, batch, device, what)
        return states[0], states[1], offset > 0

    def forward(self, hidden_states, inference_params=None):
        """[batch, L, d_model] -> [batch, L, d_model], L >= 1; NaN in a token propagates as in
        :func:`~frontiers_fast.selective_scan` (to that token and every later one).

        ``inference_params``, as mamba_ssm's ``Mamba.forward``: an
        :class:`InferenceParams` (needs ``layer_idx``) or a
        ``(conv_state, ssm_state)`` tuple from :meth:`allocate_inference_cache`;
        the states are updated in place.  With an InferenceParams,
        ``seqlen_offset == 0`` makes the call a prefill from zero states;
        otherwise (and always with a tuple) the call continues the sequence
        the states hold: one token runs :meth:`step`, more run the scan from
        the states.  Gradients do not flow into or out of the states.

        Example::

            >>> layer = Mamba(64).double()
            >>> x = torch.randn(2, 10, 64, dtype=torch.float64)
            >>> states = layer.allocate_inference_cache(2)
            >>> y = layer(x[:, :7], states)  # prefill
            >>> y = layer(x[:, 7:8], states)  # one step; y equals layer(x)[:, 7:8]
        """
        self._check_input("hidden_states", hidden_states, 3, "[batch, L, d_model]")
        batch, L, _ = hidden_states.shape
        if L == 0:
            raise ValueError("hidden_states must have at least one time step (L >= 1), got L=0")
        if inference_params is None:
            xz = self.in_proj(hidden_states).transpose(1, 2)  # [batch, 2 d_inner, L]
            y, _, _ = self._mix(xz)
            return self.out_proj(y.transpose(1, 2))
        conv_state, ssm_state, continues = self._cache_states(inference_params, batch, hidden_states.device)
        if continues and L == 1:
            return self.step(hidden_states[:, 0], conv_state, ssm_state).unsqueeze(1)
        xz = self.in_proj(hidden_states).transpose(1, 2)
        conv_init = ssm_init = None
        if continues:
            # Copies: the states are overwritten below, and the backward would read them.
            conv_init = conv_state[..., conv_state.shape[-1] - (self.d_conv - 1) :].clone()
            ssm_init = ssm_state.clone()
        y, _, last = self._mix(xz, None, conv_init, ssm_init)
        with torch.no_grad():
            self._keep_inputs(conv_state, xz[:, : self.d_inner], continues)
            ssm_state.copy_(last)
        return self.out_proj(y.transpose(1, 2))

    @staticmethod
    def _keep_inputs(conv_state, x, continues):
        """conv_state [batch, d_inner, S] <- the last S conv inputs (from before this call too when it
        ``continues``, zeros before the start otherwise), as causal_conv1d_update keeps them."""
        S = conv_state.shape[-1]
        past = conv_state if continues else torch.zeros_like(conv_state)
        conv_state.copy_(
            torch.cat([past, x[..., max(0, x.shape[-1] - S) :].to(conv_state.dtype)], dim=-1)[..., -S:]
        )

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        """Zero ``(conv_state [batch, d_inner, d_conv], ssm_state [batch, d_inner, d_state])``.

        mamba_ssm's signature: ``max_seqlen`` and any extra keyword are
        accepted and unused (the states do not grow with the sequence).
        conv_state takes ``dtype`` or the convolution weight's dtype;
        ssm_state takes ``dtype`` or ``dt_proj.weight``'s dtype (as
        mamba_ssm), promoted to at least float32 because the state
        accumulates over the whole sequence.
        """
        batch_size = check_int("batch_size", batch_size, 0)
        check_choice("dtype", dtype, (None, *FLOATS))
        device = self.out_proj.weight.device
        conv_state = torch.zeros(
            batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype or self.conv1d.weight.dtype
        )
        ssm_dtype = torch.promote_types(dtype or self.dt_proj.weight.dtype, torch.float32)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, hidden_states, conv_state, ssm_state):
        """One decoding step: [batch, d_model] -> [batch, d_model]; both states are updated in place.

        ``conv_state`` [batch, d_inner, S] (S >= d_conv - 1) and ``ssm_state``
        [batch, d_inner, d_state] are those of :meth:`allocate_inference_cache`.
        """
        self._check_input("hidden_states", hidden_states, 2, "[batch, d_model]")
        batch = hidden_states.shape[0]
        self._check_states(
            conv_state, ssm_state, batch, hidden_states.device, "allocate_inference_cache makes them"
        )
        return self.out_proj(self._step_inner(self.in_proj(hidden_states), conv_state, ssm_state))

    def _step_inner(self, xz, conv_state, ssm_state, mask=None):
        """xz [batch, 2 d_inner] (one in_proj output) -> y [batch, d_inner]; the states are updated in place.
        ``mask`` None or [batch, 1] multiplies the conv output (transformers' padding mask)."""
        x, z = xz.chunk(2, dim=-1)  # [batch, d_inner] each
        x = causal_conv1d_update(
            x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
        )
        if mask is not None:
            x = x * mask.to(x.dtype)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        A, D, dt_bias = self._ssm_params()
        return selective_state_update(ssm_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)


__all__ = ["InferenceParams", "Mamba"]

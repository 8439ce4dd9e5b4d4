"""Mamba mixer layer (Gu & Dao 2023) on the selective-scan ops.

Parameter names follow mamba_ssm's ``Mamba`` block (and mambapy's
``MambaBlock``, which uses the same ones), so their state dicts load as they
are: ``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    FLOATS,
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

    def forward(self, hidden_states):
        """[batch, L, d_model] -> [batch, L, d_model], L >= 1; NaN in a token propagates as in
        :func:`~frontiers_fast.selective_scan` (to that token and every later one)."""
        self._check_input("hidden_states", hidden_states, 3, "[batch, L, d_model]")
        if hidden_states.shape[1] == 0:
            raise ValueError("hidden_states must have at least one time step (L >= 1), got L=0")
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
        for name, t, shape, layout in (
            ("conv_state", conv_state, (batch, self.d_inner, None), "[batch, d_inner, S]"),
            ("ssm_state", ssm_state, (batch, self.d_inner, self.d_state), "[batch, d_inner, d_state]"),
        ):
            check_tensor(name, t)
            check_same_device(name, t, "hidden_states", hidden_states.device)
            check_shape(name, t, shape, f" ({layout}, as allocate_inference_cache makes it)")
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # [batch, d_inner] each
        x = causal_conv1d_update(
            x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
        )
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        A, D, dt_bias = self._ssm_params()
        y = selective_state_update(ssm_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
        return self.out_proj(y)


__all__ = ["Mamba"]

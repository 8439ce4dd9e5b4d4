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

from ..ops.ssm import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update


class Mamba(nn.Module):
    """Mamba mixer: in-projection, causal depthwise convolution, selective scan gated by silu(z), out-projection.

    Args:
        d_model: width of the input and output.
        d_state: N, the state size per channel.
        d_conv: width of the causal convolution.
        expand: d_inner = expand * d_model channels inside the block.
        dt_rank: rank of the delta projection (``"auto"``: ceil(d_model / 16)).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes.
        conv_bias, bias: biases of the convolution and of the two projections.

    Shapes: ``forward`` maps [batch, L, d_model] to [batch, L, d_model];
    ``step`` maps [batch, d_model] to [batch, d_model] and updates the two
    states from :meth:`allocate_inference_cache` in place.

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
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
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

    def forward(self, hidden_states):
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
        device = self.out_proj.weight.device
        conv_state = torch.zeros(
            batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype or self.conv1d.weight.dtype
        )
        ssm_dtype = torch.promote_types(dtype or self.dt_proj.weight.dtype, torch.float32)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, hidden_states, conv_state, ssm_state):
        """One decoding step: [batch, d_model] -> [batch, d_model]; both states are updated in place."""
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

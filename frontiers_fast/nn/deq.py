"""Deep-equilibrium layer: a thin module around :func:`frontiers_fast.ops.deq.deq`."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import deq as _deq


class DEQFixedPoint(nn.Module):
    """``z* = cell(z*, x)``, solved in the forward and differentiated implicitly (or by phantom gradient).

    Args:
        cell: an ``nn.Module`` (or callable) mapping ``(z, x)`` to the next
            ``z`` (same shape as ``z``); its parameters get the gradients.
        **options: keyword options of :func:`frontiers_fast.ops.deq.deq`
            (``solver``, ``max_iter``, ``tol``, ``backward``, ``b_solver``,
            ``pg_steps``, ...); checked here, so a typo fails at construction.

    Forward:
        ``x`` [B, ...]; ``z0`` [B, ...] (default: zeros shaped like ``x``).
        Returns ``(z*, info)``; the last ``info`` is also kept in ``self.info``.

    Example::

        >>> class Cell(nn.Module):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.lin = nn.Linear(d, d)
        ...     def forward(self, z, x):
        ...         return torch.tanh(self.lin(z) + x)
        >>> layer = DEQFixedPoint(Cell(16), solver="anderson", max_iter=30)
        >>> z, info = layer(torch.randn(8, 16))
    """

    def __init__(self, cell, **options):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be callable, got {type(cell).__name__}")
        self.cell = cell
        opts = {k: v for k, v in options.items() if k != "backend"}
        _deq._deq_options(**opts)  # unknown or bad options fail here, with deq's messages
        self.options = dict(options)
        self.info = None

    def forward(self, x, z0=None):
        if z0 is None:
            z0 = torch.zeros_like(x)
        z, self.info = _deq.deq(lambda z: self.cell(z, x), z0, **self.options)
        return z, self.info

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["DEQFixedPoint"]

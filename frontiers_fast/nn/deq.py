"""Deep-equilibrium layer: a thin module around :func:`frontiers_fast.ops.deq.deq`."""

from __future__ import annotations

import torch
from torch import nn

from .. import _backend
from .._checks import check_bool, check_choice, check_has_values, check_int, check_module, check_tensor
from ..ops import deq as _deq

# torchdeq (``get_deq`` / ``DEQIndexing``) option names that mean exactly one of
# ours.  ``b_solver``, ``b_max_iter``, ``b_tol`` and ``b_stop_mode`` are already
# spelt the same in both.
TORCHDEQ_ALIASES = {
    "f_solver": "solver",
    "f_max_iter": "max_iter",
    "f_tol": "tol",
    "f_stop_mode": "stop_mode",
    "grad": "pg_steps",
    "ift": "backward",
}


def _canonical_options(options: dict) -> dict:
    """Map torchdeq's names onto ours; refuse duplicates and the ambiguous ``tau``."""
    out = {}
    for name, value in options.items():
        ours = TORCHDEQ_ALIASES.get(name)
        if ours is None:
            continue
        if ours in options:
            raise TypeError(f"got both {name!r} (torchdeq's name) and {ours!r}; pass one of them")
        if name == "grad":
            # torchdeq also takes a list (one k per sampled state); this layer has one state.
            value = check_int("grad", value, 1)
        elif name == "ift":
            value = "implicit" if check_bool("ift", value) else "phantom"
        out[ours] = value
    if "grad" in options and "ift" not in options and "backward" not in options:
        raise ValueError(
            "grad (torchdeq's phantom-gradient steps) was given without the backward mode: torchdeq uses "
            "the phantom gradient unless ift=True, this layer defaults to backward='implicit'; "
            "pass backward='phantom' (or ift=False)"
        )
    if "tau" in options and out:
        raise ValueError(
            "tau is ambiguous next to torchdeq's option names "
            f"({', '.join(k for k in options if k in TORCHDEQ_ALIASES)}): torchdeq's tau is the phantom-gradient "
            "damping, which is pg_tau here, while this layer's tau damps the forward solver; pass pg_tau, "
            "or use this layer's names throughout to set the solver's tau"
        )
    out.update((k, v) for k, v in options.items() if k not in TORCHDEQ_ALIASES)
    return out


class DEQFixedPoint(nn.Module):
    """``z* = cell(z*, x)``, solved in the forward and differentiated implicitly (or by phantom gradient).

    Args:
        cell: an ``nn.Module`` (or callable) mapping ``(z, x)`` to the next
            ``z`` (same shape as ``z``); its parameters get the gradients.
        **options: keyword options of :func:`frontiers_fast.ops.deq.deq`
            (``solver``, ``max_iter``, ``tol``, ``backward``, ``b_solver``,
            ``pg_steps``, ...); checked here, so a typo fails at construction.

    torchdeq's names are accepted where they mean exactly one of ours (the
    module stores and shows ours):

    ==================  ===================================================
    torchdeq            here
    ==================  ===================================================
    ``f_solver``        ``solver``
    ``f_max_iter``      ``max_iter``
    ``f_tol``           ``tol``
    ``f_stop_mode``     ``stop_mode``
    ``b_*``             ``b_*`` (same names)
    ``grad=k`` (int)    ``pg_steps=k``; needs ``backward`` or ``ift`` too
    ``ift=True/False``  ``backward="implicit"`` / ``"phantom"``
    ``tau``             ``pg_tau`` -- *not* an alias, see below
    ==================  ===================================================

    * ``tau`` is not mapped: torchdeq's layer ``tau`` damps the phantom
      gradient, ours damps the forward solver (torchdeq's solver keyword
      ``tau``).  Passing ``tau`` next to any torchdeq name above is refused as
      ambiguous; use ``pg_tau`` for the phantom damping.
    * ``grad`` alone is refused: in torchdeq it means the phantom gradient
      (unless ``ift=True``), but this layer defaults to the implicit one, so
      the mode must be said (``backward="phantom"`` or ``ift=False``).
    * Defaults are ours, not torchdeq's: ``solver="anderson"`` and
      ``backward="implicit"`` (torchdeq: fixed-point iteration and a 1-step
      phantom gradient).  Options torchdeq has and we do not (``core``,
      ``n_states``, ``indexing``, ``norm_*``, ``eval_f_max_iter``, ...) are
      errors, as is a list for ``grad``.

    Gradient vs training mode: the layer builds its backward whenever grad
    mode is on (``torch.is_grad_enabled()``), in ``train()`` and ``eval()``
    alike, and only solves under ``torch.no_grad()``.  torchdeq switches on
    ``self.training`` instead: in eval mode it solves without a graph even if
    grad mode is on.  Keying on grad mode keeps gradients available where
    they are wanted in eval mode (input gradients, attacks, meta-learning)
    and costs nothing in the usual ``torch.no_grad()`` evaluation loop; for
    torchdeq's eval behaviour, wrap the call in ``torch.no_grad()``.

    Forward:
        ``x`` [B, ...]; ``z0`` [B, ...] (default: zeros shaped like ``x``,
        which must then be a float32/float64 tensor with values).
        Returns ``(z*, info)``; the last ``info`` is also kept in ``self.info``.
        NaN and inf are handled as :func:`frontiers_fast.ops.deq.deq` says: a
        sample whose residual is not finite stops at its best finite estimate
        and is flagged in ``info["diverged"]``, with a RuntimeWarning.

    Raises (at construction): TypeError for a ``cell`` that is not callable
    or an unknown option (both named); the option values are checked as
    :func:`~frontiers_fast.ops.deq.deq` checks them.

    Example::

        >>> class Cell(nn.Module):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.lin = nn.Linear(d, d)
        ...     def forward(self, z, x):
        ...         return torch.tanh(self.lin(z) + x)
        >>> layer = DEQFixedPoint(Cell(16), solver="anderson", max_iter=30)
        >>> z, info = layer(torch.randn(8, 16))
        >>> same = DEQFixedPoint(Cell(16), f_solver="anderson", f_max_iter=30, ift=True)
    """

    def __init__(self, cell, **options):
        super().__init__()
        check_module("cell", cell)
        self.cell = cell
        options = _canonical_options(options)
        unknown = [k for k in options if k not in _deq.DEQ_OPTIONS]
        if unknown:
            raise TypeError(
                f"DEQFixedPoint: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"(options: {', '.join(_deq.DEQ_OPTIONS)}, or torchdeq's {', '.join(TORCHDEQ_ALIASES)})"
            )
        opts = {k: v for k, v in options.items() if k != "backend"}
        _deq._deq_options(**opts)  # bad values fail here, with deq's messages
        if options.get("backend") is not None:
            # Which backends the layer has is decided per call (device, grad); the name is checked now.
            check_choice("backend", options["backend"], _backend.BACKENDS)
        self.options = options
        self.info = None

    def forward(self, x, z0=None):
        if z0 is None:
            # z0 defaults to zeros shaped like x: the errors name x, which the caller passed.
            check_tensor(
                "x", x, (torch.float32, torch.float64), "float32 or float64 (z0 defaults to zeros like x)"
            )
            check_has_values("x", x)
            z0 = torch.zeros_like(x)
        z, self.info = _deq.deq(lambda z: self.cell(z, x), z0, **self.options)
        return z, self.info

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["DEQFixedPoint", "TORCHDEQ_ALIASES"]

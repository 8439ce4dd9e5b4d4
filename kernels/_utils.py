"""Launch helpers shared by the Triton kernels of every family.

A launcher (``<op>_fwd``, ``<op>_bwd`` in ``kernels/<family>.py``) takes
tensors, picks block sizes and warps with these, and launches on the device
of its inputs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from frontiers_fast._checks import acc_dtype  # noqa: F401  (re-exported: the launchers size scratch with it)

MAX_BLOCK = 128  # columns per program: a [rows, 128] fp32 tile stays in registers
TILE = 4096  # elements per [rows, columns] tile


def acc_type(dtype: torch.dtype):
    """The accumulator type for inputs of ``dtype``: float64 stays float64, the rest sum in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def col_block(n: int, max_block: int = MAX_BLOCK) -> int:
    """Columns per program for ``n`` columns: the next power of two, at most ``max_block``."""
    return min(triton.next_power_of_2(max(n, 1)), max_block)


def row_block(cols: int, lo: int = 16, hi: int = 64) -> int:
    """Rows per tile next to ``cols`` columns, so that a tile holds about :data:`TILE` elements.

    Wide tiles need fewer rows to fill; narrow ones take more, which keeps
    more independent loads (edges, tokens) in flight.
    """
    return max(lo, min(hi, TILE // cols))


def num_warps(rows: int, cols: int) -> int:
    return 4 if rows * cols >= 2048 else 2


def on_device(launcher):
    """Launch on the device of the first tensor argument, not the current one (Triton's default)."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and first.is_cuda:
            with torch.cuda.device(first.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return wrapper

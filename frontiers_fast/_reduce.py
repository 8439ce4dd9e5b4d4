"""The one encoding of an aggregation's ``reduce``, from Python down to CUDA.

Public functions take the name; registered ops, Triton launchers, C++ and
CUDA kernels take its code, the index in :data:`REDUCES`.  The C++ and CUDA
side reads the same numbers from ``csrc/common/reduce.h`` (``enum class
Reduce``); ``tests/test_library.py`` checks that the two agree.
"""

from __future__ import annotations

REDUCES = ("sum", "mean", "max", "min")
SUM, MEAN, MAX, MIN = range(len(REDUCES))


def reduce_code(reduce: str) -> int:
    """The code of a reduce name (ValueError naming ``reduce`` otherwise)."""
    if not isinstance(reduce, str) or reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    return REDUCES.index(reduce)


def reduce_name(code: int) -> str:
    if not 0 <= code < len(REDUCES):
        raise ValueError(f"reduce code must be in [0, {len(REDUCES)}), got {code}")
    return REDUCES[code]

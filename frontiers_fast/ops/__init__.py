"""Registered ``frontiers_fast::`` ops, one module per family."""

from . import gnn, moe

__all__ = ["gnn", "moe"]

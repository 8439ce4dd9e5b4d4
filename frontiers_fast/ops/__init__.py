"""Registered ``frontiers_fast::`` ops, one module per family."""

from . import gnn

__all__ = ["gnn"]

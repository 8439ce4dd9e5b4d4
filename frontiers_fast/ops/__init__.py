"""Registered ``frontiers_fast::`` ops, one module per family."""

from . import deq, gnn, moe, ssm

__all__ = ["deq", "gnn", "moe", "ssm"]

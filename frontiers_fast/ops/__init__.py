"""Registered ``frontiers_fast::`` ops, one module per family."""

from . import deq, gnn, moe, splat, ssm

__all__ = ["deq", "gnn", "moe", "splat", "ssm"]

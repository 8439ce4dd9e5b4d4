"""Registered ``frontiers_fast::`` ops, one module per family."""

from . import common, deq, gnn, moe, splat, ssm

__all__ = ["common", "deq", "gnn", "moe", "splat", "ssm"]

"""Registered ``frontiers_fast::`` ops, one module per family."""

from . import gnn, moe, ssm

__all__ = ["gnn", "moe", "ssm"]

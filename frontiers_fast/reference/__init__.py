"""Plain PyTorch references.  They pin the semantics every kernel is tested
against, run in float64, and serve as the fallback backend."""

from . import common, deq, gnn, moe, splat, ssm

__all__ = ["common", "deq", "gnn", "moe", "splat", "ssm"]

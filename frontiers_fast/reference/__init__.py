"""Plain PyTorch references.  They pin the semantics every kernel is tested
against, run in float64, and serve as the fallback backend."""

from . import gnn, moe, ssm

__all__ = ["gnn", "moe", "ssm"]

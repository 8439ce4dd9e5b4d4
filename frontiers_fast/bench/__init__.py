"""The benchmark report: ``python -m frontiers_fast.bench [--family gnn] [--device cpu|cuda] [--quick]``."""

FAMILIES = ("gnn", "ssm", "moe", "deq", "splat")

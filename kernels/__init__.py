"""Triton kernels, installed as ``frontiers_fast.kernels``.

Importing this package does not import Triton; each family module does.
"""

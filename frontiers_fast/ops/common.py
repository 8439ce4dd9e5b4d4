"""Ops shared by several families.

  stable_bucket_sort(keys, num_buckets) -> (ptr [num_buckets + 1], perm [E])   [cpp, reference]

The graph's CSR and its transpose (:mod:`frontiers_fast.graph`) are built
with it.  It is O(E + num_buckets) on the CPU (``csrc/common/bucket_sort_cpu.cpp``);
on a GPU the reference's ``torch.sort`` is the fast one.
"""

from __future__ import annotations

import torch

from .. import _backend
from .._library import define_op
from ..reference import common as ref

define_op(
    "stable_bucket_sort(Tensor keys, int num_buckets) -> (Tensor, Tensor)",
    fake=lambda keys, num_buckets, backend: (keys.new_empty((num_buckets + 1,)), torch.empty_like(keys)),
    reference=ref.stable_bucket_sort,
    native=("cpp",),
)
_backend.register_function("stable_bucket_sort", ops=("stable_bucket_sort",))


def stable_bucket_sort(keys: torch.Tensor, num_buckets: int):
    """(ptr, perm): a stable sort of int64 ``keys`` [E] in ``[0, num_buckets)`` (checked by the caller).

    Internal plumbing: it always runs the device's default backend, whatever
    a :func:`~frontiers_fast.use_backend` block or the environment forces.
    """
    backend = _backend.default_backend(keys.device, "stable_bucket_sort")
    return torch.ops.frontiers_fast.stable_bucket_sort(keys.contiguous(), num_buckets, backend)

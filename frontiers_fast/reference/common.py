"""References shared by several families."""

from __future__ import annotations

import torch
from torch import Tensor


def stable_bucket_sort(keys: Tensor, num_buckets: int) -> tuple[Tensor, Tensor]:
    """A stable sort of integer keys in ``[0, num_buckets)``.

    Returns ``ptr`` [num_buckets + 1] int64 (bucket b holds sorted positions
    ``ptr[b]:ptr[b+1]``) and ``perm`` [E] int64 (the position in ``keys`` of
    the element at each sorted position; equal keys keep their order).
    The graph's CSR (keys: destinations) and the MoE permutation (keys:
    expert ids) are both this sort.
    """
    keys = keys.reshape(-1).long()
    perm = torch.sort(keys, stable=True).indices
    ptr = keys.new_zeros((num_buckets + 1,))
    torch.cumsum(torch.bincount(keys, minlength=num_buckets), 0, out=ptr[1:])
    return ptr, perm

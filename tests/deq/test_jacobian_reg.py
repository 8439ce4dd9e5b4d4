"""The Jacobian regulariser: exact on a full set of probes, unbiased on random ones, and torchdeq's jac_reg.

(Kept apart from test_grad and test_torchdeq, which run every solver backend:
the regulariser has only the reference.)
"""

import pytest
import torch

from frontiers_fast.ops import deq as ops

from ..helpers import assert_close
from .cells import contraction


def test_jacobian_regularizer_exact_and_statistical():
    f, _ = contraction(2, 5)
    z = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    fz = f(z)
    J = torch.autograd.functional.jacobian(f, z.detach())  # [2, 5, 2, 5]
    N = z.numel()
    exact = J.pow(2).sum() / N
    probes = (N**0.5) * torch.eye(N, dtype=torch.float64).view(N, 2, 5)
    got = ops.jacobian_regularizer(fz, z, vecs=N, probes=probes)
    assert_close(got, exact)
    assert got.requires_grad  # create_graph: trainable
    # Random probes: mean of K draws of ||v^T J||^2 has std sqrt(2 ||J J^T||_F^2 / K); 6 sigma.
    K = 2000
    est = ops.jacobian_regularizer(fz, z, vecs=K, create_graph=False) * N
    Jm = J.reshape(N, N)
    std = (2 * (Jm @ Jm.T).pow(2).sum() / K).sqrt()
    assert abs(est - exact * N) < 6 * std


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jacobian_regularizer_matches_jac_reg(dtype):
    jac_reg = pytest.importorskip("torchdeq.loss").jac_reg

    f, _ = contraction(3, 10, dtype=dtype)
    z = torch.randn(3, 10, dtype=dtype, requires_grad=True)
    fz = f(z)
    torch.manual_seed(7)
    ours = ops.jacobian_regularizer(fz, z, vecs=3)
    torch.manual_seed(7)
    theirs = jac_reg(fz, z, vecs=3)
    # Same probes in both dtypes (float32 CPU draws from the same seed, then converted);
    # the sums of squares differ in order only.
    assert_close(ours, theirs.to(ours.dtype))

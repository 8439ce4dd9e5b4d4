"""Contractive test maps for the fixed-point tests."""

import math

import torch


def contraction(B, D, dtype=torch.float64, lip=0.5, trailing=None, requires_grad=False):
    """``f(z) = tanh(z W^T + x U^T + b)`` with ``||W||_2 = lip``: a contraction with Lipschitz constant <= lip.

    Returns ``(f, params)`` where params is ``[W, U, b, x]``; with ``trailing``
    the state is [B, *trailing] (prod(trailing) == D) and f works on that shape.
    """
    W = torch.randn(D, D, dtype=dtype)
    W = lip * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(D, D, dtype=dtype) / D**0.5
    b = 0.1 * torch.randn(D, dtype=dtype)
    x = torch.randn(B, D, dtype=dtype)
    params = [t.requires_grad_(requires_grad) for t in (W, U, b, x)]
    shape = (B, *(trailing or (D,)))

    def f(z, W=W, U=U, b=b, x=x):
        # Parameters follow z's dtype so a float32 map can be re-run in float64.
        W, U, b, x = (t.to(z.dtype) for t in (W, U, b, x))
        out = torch.tanh(z.reshape(z.shape[0], D) @ W.T + x @ U.T + b)
        return out.reshape(shape)

    return f, params


def unrolled_picard(f, z0, steps):
    """``steps`` plain iterations with the autograd graph kept (the gradient reference)."""
    z = z0
    for _ in range(steps):
        z = f(z)
    return z


def mixed_batch(dtype, B=6, D=24, seed=5):
    """``(f, z0)``: a batch whose samples converge at different steps (each sample's map contracts at its
    own rate)."""
    torch.manual_seed(seed)
    f, _ = contraction(B, D, dtype=dtype, lip=0.9)
    rate = torch.linspace(0.05, 1.0, B, dtype=dtype)[:, None]
    return (lambda z: rate * f(z)), torch.randn(B, D, dtype=dtype)


class Poisoned:
    """``f`` whose sample 1 is NaN from its ``nan_from``-th call on and whose sample 3 keeps moving (never
    below a small tol); ``calls`` counts the calls (set it to 0 before each solve)."""

    def __init__(self, f, nan_from):
        self.f, self.nan_from, self.calls = f, nan_from, 0

    def __call__(self, z):
        self.calls += 1
        out = self.f(z).clone()
        if self.calls >= self.nan_from:
            out[1] = math.nan
        out[3] = out[3] + 1e-3 * torch.sin(self.calls * z[3])
        return out

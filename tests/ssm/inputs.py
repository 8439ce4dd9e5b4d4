"""Random inputs for the selective-scan tests, in mamba_ssm's layout."""

import torch


def bc(layout, batch, dim, N, L, groups, dtype):
    """B or C: constant [dim, N], variable [batch, N, L] or grouped [batch, G, N, L]."""
    if layout == "constant":
        return torch.randn(dim, N, dtype=dtype)
    if layout == "variable":
        return torch.randn(batch, N, L, dtype=dtype)
    return torch.randn(batch, groups, N, L, dtype=dtype)


def scan_inputs(batch=2, dim=6, N=3, L=7, layout="variable", dtype=torch.float64, options=True, groups=3):
    """Keyword arguments for selective_scan; ``options`` adds D, z, delta_bias, softplus and an initial state."""
    kw = dict(
        u=torch.randn(batch, dim, L, dtype=dtype),
        A=-(torch.rand(dim, N, dtype=dtype) + 0.2),  # decaying states, as Mamba's -exp(A_log)
        B=bc(layout, batch, dim, N, L, groups, dtype),
        C=bc(layout, batch, dim, N, L, groups, dtype),
    )
    if options:
        kw["delta"] = torch.randn(batch, dim, L, dtype=dtype)  # raw: softplus makes it positive
        kw.update(
            D=torch.randn(dim, dtype=dtype),
            z=torch.randn(batch, dim, L, dtype=dtype),
            delta_bias=torch.randn(dim, dtype=dtype) * 0.5,
            delta_softplus=True,
            initial_state=torch.randn(batch, dim, N, dtype=dtype),
        )
    else:
        kw["delta"] = torch.rand(batch, dim, L, dtype=dtype) + 0.05
    return kw


LAYOUTS = ["constant", "variable", "grouped"]

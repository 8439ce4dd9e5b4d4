"""frontiers_fast: fast, validated kernels for newer neural-network architectures.

Importing never fails for lack of the compiled library, a GPU or Triton:
:func:`backends` says what is available and why not, and an op whose fast
backend is missing falls back to the PyTorch reference with one warning.
"""

from . import _backend, nn, reference
from ._backend import backends, use_backend
from .graph import Graph, gcn_norm
from .ops.deq import deq, fixed_point_solve, jacobian_regularizer
from .ops.gnn import edge_softmax, gat_aggregate, sddmm, spmm
from .ops.moe import fused_moe, moe_permute, moe_route, moe_unpermute
from .ops.splat import (
    isect_offset_encode,
    isect_tiles,
    project_gaussians,
    rasterization,
    rasterize_to_pixels,
    spherical_harmonics,
)
from .ops.ssm import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update

__version__ = "0.1.0"

# What can run here is settled at import (never raises): a first call made
# inside a compiled graph must not have to import anything.
_backend._probe()

__all__ = [
    "backends",
    "causal_conv1d",
    "causal_conv1d_update",
    "deq",
    "edge_softmax",
    "fixed_point_solve",
    "fused_moe",
    "gat_aggregate",
    "gcn_norm",
    "Graph",
    "isect_offset_encode",
    "isect_tiles",
    "jacobian_regularizer",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "nn",
    "project_gaussians",
    "rasterization",
    "rasterize_to_pixels",
    "reference",
    "sddmm",
    "selective_scan",
    "selective_state_update",
    "spherical_harmonics",
    "spmm",
    "use_backend",
]

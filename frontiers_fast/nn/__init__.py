"""Drop-in layers whose names and parameters match the libraries users come from."""

from .deq import DEQFixedPoint
from .gnn import GATConv, GCNConv, GINConv, SAGEConv
from .moe import MixtralSparseMoeBlock
from .ssm import InferenceParams, Mamba

__all__ = [
    "GCNConv",
    "GATConv",
    "SAGEConv",
    "GINConv",
    "MixtralSparseMoeBlock",
    "Mamba",
    "InferenceParams",
    "DEQFixedPoint",
]

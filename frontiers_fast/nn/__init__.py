"""Drop-in layers whose names and parameters match the libraries users come from."""

from .deq import DEQFixedPoint
from .gnn import GATConv, GCNConv, GINConv, SAGEConv
from .moe import DeepseekV3MoE, MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock
from .ssm import InferenceParams, Mamba

__all__ = [
    "GCNConv",
    "GATConv",
    "SAGEConv",
    "GINConv",
    "MixtralSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "DeepseekV3MoE",
    "Mamba",
    "InferenceParams",
    "DEQFixedPoint",
]

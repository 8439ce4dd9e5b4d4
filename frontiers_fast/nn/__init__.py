"""Drop-in layers whose names and parameters match the libraries users come from."""

from .gnn import GATConv, GCNConv, GINConv, SAGEConv

__all__ = ["GCNConv", "GATConv", "SAGEConv", "GINConv"]

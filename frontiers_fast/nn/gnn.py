"""Drop-in graph layers with PyTorch Geometric's constructor arguments and
parameter names, so a PyG ``state_dict`` loads unchanged.

Every layer accepts ``edge_index`` [2, E] or a prebuilt
:class:`~frontiers_fast.Graph`.  With a Graph, the derived graphs (self-loops
added, GCN-normalised weights) are cached on it, so repeated calls pay for the
sort once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_bools,
    check_choice,
    check_features,
    check_int,
    check_module,
    check_real,
    check_tensor,
)
from ..graph import Graph, gcn_norm
from ..ops.gnn import edge_softmax, gat_aggregate, spmm

__all__ = ["GCNConv", "GATConv", "SAGEConv", "GINConv"]


def _pair(x):
    return x if isinstance(x, tuple) else (x, x)


def _channels(name, v):
    """in_channels: an int >= 1, or a pair (source, destination) of them for bipartite graphs."""
    if isinstance(v, tuple):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair (source, destination), got {v!r}")
        return (check_int(f"{name}[0]", v[0], 1), check_int(f"{name}[1]", v[1], 1))
    return check_int(name, v, 1)


def _inputs(x, in_channels):
    """(x_src, x_dst) checked against in_channels; x is a tensor or a pair (x_dst may be None)."""
    in_src, in_dst = _pair(in_channels)
    x_src, x_dst = _pair(x) if isinstance(x, tuple) else (x, x)
    if isinstance(x, tuple) and len(x) != 2:
        raise ValueError(f"x must be a tensor or a pair (x_src, x_dst), got a tuple of {len(x)}")
    check_features("x_src" if isinstance(x, tuple) else "x", x_src, "in_channels", in_src)
    if x_dst is not None:
        check_features("x_dst" if isinstance(x, tuple) else "x", x_dst, "in_channels", in_dst)
    return x_src, x_dst


def _glorot(t: Tensor):
    # PyG's 'glorot' initialiser: uniform in +-sqrt(6 / (fan_in + fan_out)).
    if t is not None:
        a = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
        nn.init.uniform_(t, -a, a)


def _to_graph(edge_index, num_src, num_dst) -> Graph:
    if isinstance(edge_index, Graph):
        if (edge_index.num_src, edge_index.num_dst) != (num_src, num_dst):
            raise ValueError(
                f"the graph has (num_src, num_dst) = ({edge_index.num_src}, {edge_index.num_dst}) "
                f"but x implies ({num_src}, {num_dst})"
            )
        return edge_index
    if not isinstance(edge_index, Tensor):
        raise TypeError(
            f"edge_index must be a [2, E] tensor or a frontiers_fast.Graph, got {type(edge_index).__name__}"
        )
    return Graph(edge_index, num_src if num_src == num_dst else (num_src, num_dst))


def _cached(graph: Graph, key, build):
    cache = graph.__dict__.setdefault("_derived", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _with_self_loops(graph: Graph) -> Graph:
    """PyG's remove_self_loops + add_self_loops: every node i < min(N_src, N_dst) gets exactly one loop."""

    def build():
        ei = graph.edge_index
        ei = ei[:, ei[0] != ei[1]]
        n = min(graph.num_src, graph.num_dst)
        loops = torch.arange(n, device=ei.device)
        ei = torch.cat([ei, torch.stack([loops, loops])], 1)
        nn_ = graph.num_src if graph.num_src == graph.num_dst else (graph.num_src, graph.num_dst)
        return Graph(ei, nn_)

    return _cached(graph, "self_loops", build)


class GCNConv(nn.Module):
    """Graph convolution (Kipf & Welling, 2017), as PyG's ``GCNConv``.

    ``out = D^-1/2 (A + I) D^-1/2 X W + b``.  x: [N, in_channels] -> [N, out_channels].

    Example::

        >>> conv = GCNConv(16, 32)
        >>> out = conv(torch.randn(4, 16), torch.tensor([[0, 1, 2], [1, 2, 3]]))
    """

    def __init__(self, in_channels, out_channels, improved=False, cached=False, add_self_loops=None,
                 normalize=True, bias=True, **kwargs):  # fmt: skip
        super().__init__()
        if kwargs:
            raise TypeError(f"GCNConv got unsupported arguments: {sorted(kwargs)}")
        in_channels, out_channels = (
            check_int("in_channels", in_channels, 1),
            check_int("out_channels", out_channels, 1),
        )
        improved, cached, normalize, bias = check_bools(
            improved=improved, cached=cached, normalize=normalize, bias=bias
        )
        if add_self_loops is None:
            add_self_loops = normalize
        if add_self_loops and not normalize:
            raise ValueError("GCNConv does not support add_self_loops=True with normalize=False")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.improved, self.cached = improved, cached
        self.add_self_loops, self.normalize = add_self_loops, normalize
        self._cache = None
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        _glorot(self.lin.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self._cache = None

    def _norm_graph(self, edge_index, edge_weight, n, dtype):
        g = _to_graph(edge_index, n, n)
        if not self.normalize:
            return g, edge_weight

        def build():
            # In the features' dtype: a float64 layer gets the float64 normalisation.
            ei, w = gcn_norm(g.edge_index, edge_weight, n, self.improved, self.add_self_loops, dtype=dtype)
            return Graph(ei, n), w

        if edge_weight is None:
            # The normalised graph depends only on the structure: cache it on the Graph.
            key = ("gcn_norm", self.improved, self.add_self_loops, dtype)
            return _cached(g, key, build) if isinstance(edge_index, Graph) else build()
        return build()

    def forward(self, x: Tensor, edge_index, edge_weight: Tensor | None = None) -> Tensor:
        check_features("x", x, "in_channels", self.in_channels)
        if x.dim() != 2:
            raise ValueError(f"x must be [N, in_channels], got shape {tuple(x.shape)}")
        if self.cached and self._cache is not None:
            g, w = self._cache
        else:
            g, w = self._norm_graph(edge_index, edge_weight, x.shape[0], x.dtype)
            if self.cached:
                self._cache = (g, w)
        x = self.lin(x)
        if w is not None:
            w = w.to(x.dtype)
        out = spmm(g, x, w, "sum")
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}"


class GATConv(nn.Module):
    """Graph attention (Velickovic et al., 2018), as PyG's ``GATConv``.

    Attention, softmax and aggregation run as one fused op
    (:func:`frontiers_fast.gat_aggregate`) that never builds an [E, H, C]
    tensor.  With attention dropout in training, or when attention weights are
    returned, the unfused ops (edge_softmax, spmm) are used.

    Example::

        >>> conv = GATConv(16, 8, heads=4)
        >>> out = conv(torch.randn(5, 16), torch.tensor([[0, 1, 2], [1, 2, 3]]))  # [5, 32]
    """

    def __init__(self, in_channels, out_channels, heads=1, concat=True, negative_slope=0.2, dropout=0.0,
                 add_self_loops=True, edge_dim=None, fill_value="mean", bias=True, residual=False, **kwargs):  # fmt: skip
        super().__init__()
        if kwargs:
            raise TypeError(f"GATConv got unsupported arguments: {sorted(kwargs)}")
        if edge_dim is not None:
            raise NotImplementedError("GATConv: edge_dim (edge features in attention) is not supported yet")
        in_channels = _channels("in_channels", in_channels)
        out_channels, heads = check_int("out_channels", out_channels, 1), check_int("heads", heads, 1)
        negative_slope = check_real("negative_slope", negative_slope)
        dropout = check_real("dropout", dropout, 0.0)
        if dropout >= 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        concat, add_self_loops, bias, residual = check_bools(
            concat=concat, add_self_loops=add_self_loops, bias=bias, residual=residual
        )
        if fill_value != "mean":
            raise NotImplementedError(
                f"GATConv: fill_value={fill_value!r} is not supported (only 'mean', which needs no edge features)"
            )
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.concat, self.negative_slope, self.dropout = concat, float(negative_slope), float(dropout)
        self.add_self_loops, self.edge_dim, self.fill_value, self.residual = (
            add_self_loops,
            edge_dim,
            fill_value,
            residual,
        )
        total = heads * out_channels
        self.lin = self.lin_src = self.lin_dst = None
        if isinstance(in_channels, int):
            self.lin = nn.Linear(in_channels, total, bias=False)
        else:
            self.lin_src = nn.Linear(in_channels[0], total, bias=False)
            self.lin_dst = nn.Linear(in_channels[1], total, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        out_dim = total if concat else out_channels
        self.res = nn.Linear(_pair(in_channels)[1], out_dim, bias=False) if residual else None
        self.bias = nn.Parameter(torch.empty(out_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.lin, self.lin_src, self.lin_dst, self.res):
            if lin is not None:
                _glorot(lin.weight)
        _glorot(self.att_src)
        _glorot(self.att_dst)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, edge_index, edge_attr=None, size=None, return_attention_weights=None):
        if edge_attr is not None:
            raise NotImplementedError("GATConv: edge_attr is not supported yet (edge_dim=None)")
        H, C = self.heads, self.out_channels
        res = None
        _inputs(x, self.in_channels)
        if isinstance(x, Tensor):
            if x.dim() != 2:
                raise ValueError(f"x must be [N, in_channels], got shape {tuple(x.shape)}")
            if self.res is not None:
                res = self.res(x)
            if self.lin is not None:
                x_src = x_dst = self.lin(x).view(-1, H, C)
            else:
                x_src, x_dst = self.lin_src(x).view(-1, H, C), self.lin_dst(x).view(-1, H, C)
        else:
            x_src, x_dst = x
            if x_dst is not None and self.res is not None:
                res = self.res(x_dst)
            lin_s = self.lin if self.lin is not None else self.lin_src
            lin_d = self.lin if self.lin is not None else self.lin_dst
            x_src = lin_s(x_src).view(-1, H, C)
            x_dst = lin_d(x_dst).view(-1, H, C) if x_dst is not None else None
        if x_dst is None:
            raise ValueError("GATConv needs destination features (x_dst is None)")
        a_src = (x_src * self.att_src).sum(-1)
        a_dst = (x_dst * self.att_dst).sum(-1)
        n_src, n_dst = size if size is not None else (x_src.shape[0], x_dst.shape[0])
        g = _to_graph(edge_index, n_src, n_dst)
        if self.add_self_loops:
            g = _with_self_loops(g)
        alpha = None
        if (self.dropout > 0 and self.training) or return_attention_weights:
            e = F.leaky_relu(a_src.index_select(0, g.src) + a_dst.index_select(0, g.dst), self.negative_slope)
            alpha = edge_softmax(g, e)
            p = F.dropout(alpha, p=self.dropout, training=self.training)
            out = spmm(g, x_src, p, "sum")
        else:
            out = gat_aggregate(g, x_src, a_src, a_dst, self.negative_slope)
        out = out.reshape(-1, H * C) if self.concat else out.mean(dim=1)
        if res is not None:
            out = out + res
        if self.bias is not None:
            out = out + self.bias
        if return_attention_weights:
            return out, (g.edge_index, alpha)
        return out

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, heads={self.heads}"


class SAGEConv(nn.Module):
    """GraphSAGE (Hamilton et al., 2017), as PyG's ``SAGEConv``.

    ``out = W_l · aggr_{j -> i} x_j + W_r · x_i``, aggr in sum/mean/max/min.

    Example::

        >>> conv = SAGEConv(16, 32, aggr="max")
        >>> out = conv(torch.randn(4, 16), torch.tensor([[0, 1, 2], [1, 2, 3]]))
    """

    def __init__(self, in_channels, out_channels, aggr="mean", normalize=False, root_weight=True,
                 project=False, bias=True, **kwargs):  # fmt: skip
        super().__init__()
        if kwargs:
            raise TypeError(f"SAGEConv got unsupported arguments: {sorted(kwargs)}")
        aggr = {"add": "sum"}.get(aggr, aggr)
        check_choice("aggr", aggr, ("sum", "mean", "max", "min"))
        in_channels, out_channels = (
            _channels("in_channels", in_channels),
            check_int("out_channels", out_channels, 1),
        )
        normalize, root_weight, project, bias = check_bools(
            normalize=normalize, root_weight=root_weight, project=project, bias=bias
        )
        self.in_channels, self.out_channels, self.aggr = in_channels, out_channels, aggr
        self.normalize, self.root_weight, self.project = normalize, root_weight, project
        in_src, in_dst = _pair(in_channels)
        self.lin = nn.Linear(in_src, in_src, bias=True) if project else None
        self.lin_l = nn.Linear(in_src, out_channels, bias=bias)
        self.lin_r = nn.Linear(in_dst, out_channels, bias=False) if root_weight else None
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.lin, self.lin_l, self.lin_r):
            if lin is not None:
                lin.reset_parameters()

    def forward(self, x, edge_index, size=None):
        x_src, x_dst = _inputs(x, self.in_channels)
        if self.project:
            x_src = F.relu(self.lin(x_src))
        n_src, n_dst = size if size is not None else (x_src.shape[0], x_dst.shape[0])
        g = _to_graph(edge_index, n_src, n_dst)
        if self.aggr in ("sum", "mean") and self.out_channels < x_src.shape[1]:
            # Aggregation is linear for sum/mean: project first, aggregate fewer features.
            out = spmm(g, F.linear(x_src, self.lin_l.weight), None, self.aggr)
            if self.lin_l.bias is not None:
                out = out + self.lin_l.bias
        else:
            out = self.lin_l(spmm(g, x_src, None, self.aggr))
        if self.lin_r is not None and x_dst is not None:
            out = out + self.lin_r(x_dst)
        if self.normalize:
            out = F.normalize(out, p=2.0, dim=-1)
        return out

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, aggr={self.aggr}"


class GINConv(nn.Module):
    """Graph isomorphism network layer (Xu et al., 2019), as PyG's ``GINConv``.

    ``out = nn((1 + eps) x_i + sum_{j -> i} x_j)``.

    Example::

        >>> conv = GINConv(torch.nn.Linear(16, 16), train_eps=True)
    """

    def __init__(self, nn: torch.nn.Module, eps: float = 0.0, train_eps: bool = False, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"GINConv got unsupported arguments: {sorted(kwargs)}")
        check_module("nn", nn)
        eps = check_real("eps", eps)
        (train_eps,) = check_bools(train_eps=train_eps)
        self.nn = nn
        self.initial_eps = eps
        if train_eps:
            self.eps = torch.nn.Parameter(torch.empty(1))
        else:
            self.register_buffer("eps", torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self):
        if hasattr(self.nn, "reset_parameters"):
            self.nn.reset_parameters()
        self.eps.data.fill_(self.initial_eps)

    def forward(self, x, edge_index, size=None):
        x_src, x_dst = _pair(x)
        check_tensor("x", x_src)
        if x_dst is not None:
            check_tensor("x_dst", x_dst)
        n_src, n_dst = size if size is not None else (x_src.shape[0], x_dst.shape[0])
        g = _to_graph(edge_index, n_src, n_dst)
        # The feature width is the wrapped network's business.
        out = spmm(g, x_src, None, "sum")
        if x_dst is not None:
            out = out + (1 + self.eps) * x_dst
        return self.nn(out)

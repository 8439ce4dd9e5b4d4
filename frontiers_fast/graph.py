"""Graph structure shared by every message-passing op.

A :class:`Graph` holds one edge list in three layouts:

* the user's ``edge_index`` [2, E] (row 0 = source j, row 1 = destination i),
  in the order it was given, duplicates kept;
* CSR by destination: ``rowptr`` [N_dst + 1], ``col`` [E] (source of the edge at
  CSR position k) and ``perm`` [E] (original edge id at CSR position k);
* its transpose, CSR by source (built lazily and cached, used by backward
  passes): ``csc_ptr`` [N_src + 1], ``csc_row`` [E] (destination) and
  ``csc_perm`` [E] (CSR position k of the edge at transposed position t).

Edge-valued tensors given to the public ops (``edge_weight``, ``scores``) are
in the user's edge order.  The kernels read edge weights through the
permutation (``perm`` forward, ``csc_eid`` = ``perm[csc_perm]`` backward)
instead of a reordered copy, so a weight is read where it is on every call
and can never be stale; other edge tensors are gathered with ``perm``.  The
sort is stable, so among duplicate edges CSR order follows the user's order.
All index tensors are int64: edge counts and offsets may pass 2**31.
"""

from __future__ import annotations

import torch

from ._checks import (
    check_has_values,
    check_index_tensor,
    check_int,
    check_memory,
    check_same_device,
    check_tensor,
)

__all__ = ["Graph", "as_graph", "gcn_norm"]


def stable_bucket_sort(keys, num_buckets):
    # Imported here: frontiers_fast.ops imports this module (ops.gnn needs Graph).
    from .ops.common import stable_bucket_sort as sort

    return sort(keys, num_buckets)


def _check_num_nodes(num_nodes, name="num_nodes"):
    if isinstance(num_nodes, torch.Tensor):
        if num_nodes.numel() != 1 or num_nodes.is_floating_point() or num_nodes.is_complex():
            raise ValueError(
                f"{name} must be a single integer, got a {num_nodes.dtype} tensor of shape {tuple(num_nodes.shape)}"
            )
        check_has_values(name, num_nodes)
        num_nodes = int(num_nodes.item())
    return check_int(name, num_nodes, 0)


def _check_edge_index(edge_index, name="edge_index"):
    check_index_tensor(name, edge_index)
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"{name} must have shape [2, E], got {tuple(edge_index.shape)}")
    check_has_values(name, edge_index)
    return edge_index.to(torch.int64)


def _check_node_range(edge_index, num_src, num_dst, name="edge_index"):
    if edge_index.shape[1] == 0:
        return
    src, dst = edge_index[0], edge_index[1]
    lo = int(torch.minimum(src.min(), dst.min()).item())
    if lo < 0:
        raise ValueError(f"{name} has a negative node index ({lo})")
    smax, dmax = int(src.max().item()), int(dst.max().item())
    if smax >= num_src:
        raise ValueError(f"{name}[0] has node index {smax}, out of range for {num_src} source nodes")
    if dmax >= num_dst:
        raise ValueError(f"{name}[1] has node index {dmax}, out of range for {num_dst} destination nodes")


class Graph:
    """A directed graph stored for fast message passing (messages flow j -> i).

    Args:
        edge_index: integer tensor [2, E]; ``edge_index[0]`` are sources,
            ``edge_index[1]`` destinations.  Any order; duplicates are kept.
        num_nodes: number of nodes, or ``(num_src, num_dst)`` for a bipartite
            graph.  Defaults to ``max(edge_index) + 1``.

    Example::

        >>> g = Graph(torch.tensor([[0, 1, 2], [1, 2, 0]]), num_nodes=3)
        >>> out = frontiers_fast.spmm(g, torch.randn(3, 8))
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes=None):
        edge_index = _check_edge_index(edge_index)
        num_edges = edge_index.shape[1]
        if num_nodes is None:
            n = int(edge_index.max().item()) + 1 if num_edges > 0 else 0
            num_src = num_dst = n
        elif isinstance(num_nodes, (tuple, list)):
            if len(num_nodes) != 2:
                raise ValueError(f"num_nodes must be an int or a pair (num_src, num_dst), got {num_nodes!r}")
            num_src = _check_num_nodes(num_nodes[0], "num_nodes[0]")
            num_dst = _check_num_nodes(num_nodes[1], "num_nodes[1]")
        else:
            num_src = num_dst = _check_num_nodes(num_nodes)
        # The CSR offsets and their transpose: refuse a node count no memory holds before allocating.
        check_memory("num_nodes", 8 * (num_src + num_dst + 2), edge_index.device)
        _check_node_range(edge_index, num_src, num_dst)
        self.edge_index = edge_index
        self.num_src = num_src
        self.num_dst = num_dst
        self.num_edges = num_edges
        dst = edge_index[1]
        # Stable sort so duplicate edges keep the user's relative order
        # (max/min ties resolve to the first of them).
        self.rowptr, self.perm = stable_bucket_sort(dst, num_dst)
        self.col = edge_index[0].index_select(0, self.perm).contiguous()
        self.in_degree = self.rowptr.diff()
        self.is_sorted = bool(num_edges == 0 or (dst[1:] >= dst[:-1]).all().item())
        self._csc = None
        self._csc_eid = None

    # -- layouts -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    @property
    def src(self) -> torch.Tensor:
        return self.edge_index[0]

    @property
    def dst(self) -> torch.Tensor:
        return self.edge_index[1]

    def _build_csc(self):
        csc_ptr, csc_perm = stable_bucket_sort(self.col, self.num_src)
        dst_csr = self.edge_index[1].index_select(0, self.perm)
        csc_row = dst_csr.index_select(0, csc_perm).contiguous()
        self._csc = (csc_ptr, csc_row, csc_perm)

    @property
    def csc(self):
        """(csc_ptr, csc_row, csc_perm): the transpose, built once and cached."""
        if self._csc is None:
            self._build_csc()
        return self._csc

    @property
    def csc_eid(self) -> torch.Tensor:
        """[E]: the user's edge id of each transposed edge (``perm[csc_perm]``), cached with the transpose."""
        if self._csc_eid is None:
            self._csc_eid = self.perm.index_select(0, self.csc[2])
        return self._csc_eid

    @property
    def weight_index(self):
        """``perm``, the weight row of each CSR edge for weights in the user's order (None if already sorted)."""
        return None if self.is_sorted else self.perm

    def to_csr_order(self, edge_values: torch.Tensor) -> torch.Tensor:
        """Reorder an [E, ...] tensor from the user's edge order to CSR order (a gather; nothing is cached)."""
        if self.is_sorted:
            return edge_values
        return edge_values.index_select(0, self.perm)

    def from_csr_order(self, edge_values: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_csr_order`."""
        if self.is_sorted:
            return edge_values
        out = torch.empty_like(edge_values)
        return out.index_copy(0, self.perm, edge_values)

    def to(self, device) -> Graph:
        """The same graph on ``device`` (its index tensors stay int64: there is no dtype to change)."""
        if isinstance(device, torch.dtype) or not isinstance(device, (str, int, torch.device)):
            raise TypeError(f"Graph.to takes a device, got {device!r}")
        device = torch.device(device)
        g = Graph.__new__(Graph)
        g.__dict__.update(
            {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        )
        g.__dict__.pop("_derived", None)  # the layers' derived graphs live on the old device
        g._csc = None if self._csc is None else tuple(t.to(device) for t in self._csc)
        g._csc_eid = None if self._csc_eid is None else self._csc_eid.to(device)
        return g

    def __repr__(self):
        shape = self.num_src if self.num_src == self.num_dst else (self.num_src, self.num_dst)
        return f"Graph(num_nodes={shape}, num_edges={self.num_edges}, device={self.device})"


def as_graph(graph_or_edge_index, num_nodes=None) -> Graph:
    """Accept a :class:`Graph` or an ``edge_index`` tensor and return a Graph."""
    if isinstance(graph_or_edge_index, Graph):
        g = graph_or_edge_index
        if num_nodes is not None:
            want = tuple(num_nodes) if isinstance(num_nodes, (tuple, list)) else (num_nodes, num_nodes)
            if want != (g.num_src, g.num_dst):
                raise ValueError(
                    f"num_nodes={num_nodes!r} disagrees with the graph's (num_src, num_dst) = ({g.num_src}, {g.num_dst})"
                )
        return g
    return Graph(graph_or_edge_index, num_nodes)


def gcn_norm(edge_index, edge_weight=None, num_nodes=None, improved=False, add_self_loops=True, dtype=None):
    """Symmetric GCN normalisation with PyTorch Geometric's semantics.

    Self-loops already present are removed and re-added at the end with their
    weight (``add_remaining_self_loops``); nodes without one get a loop of
    weight 1, or 2 if ``improved`` *and* ``edge_weight`` is given.  (PyG fills
    loops only when it has edge weights, so for an unweighted graph
    ``improved`` changes nothing; we keep that so outputs match PyG's.)  Then ``w_ji <- d_j^-1/2 w_ji d_i^-1/2`` with
    ``d`` the weighted in-degree and ``inf`` (isolated nodes) set to 0.

    Args:
        edge_index: [2, E] integer tensor (sources, destinations).
        edge_weight: optional [E] float tensor (default ones).
        num_nodes: number of nodes (default ``max(edge_index) + 1``).

    Returns:
        ``(edge_index [2, E'], edge_weight [E'])``.

    Example::

        >>> ei, w = gcn_norm(torch.tensor([[0, 1], [1, 0]]), num_nodes=2)
    """
    edge_index = _check_edge_index(edge_index)
    if num_nodes is None:
        num_nodes = int(edge_index.max().item()) + 1 if edge_index.numel() else 0
    num_nodes = _check_num_nodes(num_nodes)
    check_memory("num_nodes", 8 * num_nodes, edge_index.device)
    _check_node_range(edge_index, num_nodes, num_nodes)
    if edge_weight is not None:
        check_tensor("edge_weight", edge_weight)
        check_same_device("edge_weight", edge_weight, "edge_index", edge_index.device)
    if dtype is None:
        dtype = edge_weight.dtype if edge_weight is not None else torch.get_default_dtype()
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if edge_weight is None:
        improved = False  # PyG's add_remaining_self_loops ignores fill_value without edge weights
        edge_weight = torch.ones(edge_index.shape[1], dtype=dtype, device=edge_index.device)
    elif edge_weight.shape != (edge_index.shape[1],):
        raise ValueError(
            f"edge_weight must have shape [E]=[{edge_index.shape[1]}], got {tuple(edge_weight.shape)}"
        )
    edge_index = edge_index.to(torch.int64)
    fill = 2.0 if improved else 1.0
    if add_self_loops:
        row, col = edge_index[0], edge_index[1]
        is_loop = row == col
        keep = ~is_loop
        loop_w = torch.full((num_nodes,), fill, dtype=edge_weight.dtype, device=edge_weight.device)
        loop_w = loop_w.index_put((row[is_loop],), edge_weight[is_loop])
        loops = torch.arange(num_nodes, device=edge_index.device)
        edge_index = torch.cat([edge_index[:, keep], torch.stack([loops, loops])], dim=1)
        edge_weight = torch.cat([edge_weight[keep], loop_w])
    row, col = edge_index[0], edge_index[1]
    deg = torch.zeros(num_nodes, dtype=edge_weight.dtype, device=edge_weight.device).index_add(
        0, col, edge_weight
    )
    dis = deg.pow(-0.5)
    dis = dis.masked_fill(torch.isinf(dis), 0.0)
    return edge_index, dis[row] * edge_weight * dis[col]

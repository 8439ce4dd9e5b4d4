"""Random graphs for the GNN tests: odd sizes, duplicates, self-loops,
isolated and high-degree nodes, empty graphs, bipartite graphs."""

import torch

from frontiers_fast import Graph


def random_graph(num_src, num_edges, num_dst=None, skew=False, generator=None, device="cpu"):
    num_dst = num_src if num_dst is None else num_dst
    if num_edges == 0 or num_src == 0 or num_dst == 0:
        ei = torch.zeros(2, 0, dtype=torch.int64)
    else:
        src = torch.randint(0, num_src, (num_edges,), generator=generator)
        if skew:
            # power-law-ish destinations: a few hubs receive most edges
            r = torch.rand(num_edges, generator=generator)
            dst = (r**3 * num_dst).long().clamp(max=num_dst - 1)
        else:
            dst = torch.randint(0, num_dst, (num_edges,), generator=generator)
        ei = torch.stack([src, dst])
        # a few exact duplicate edges, so max/min ties and stable order are exercised
        k = min(5, num_edges)
        ei = torch.cat([ei, ei[:, :k]], 1)
    nn = num_src if num_src == num_dst else (num_src, num_dst)
    return Graph(ei.to(device), nn)


# (num_src, num_edges, num_dst, skew)
GRAPH_CASES = [
    (1, 1, None, False),
    (7, 0, None, False),
    (0, 0, None, False),
    (13, 40, None, False),
    (129, 700, None, True),
    (151, 300, 37, False),
]

"""Independent, loop-by-loop statements of the MoE semantics (small sizes only).

Written per token in plain Python so that they share no code path with the
reference or the ops they check.
"""

import torch
import torch.nn.functional as F


def naive_route(logits, top_k, scoring="softmax", renormalize=True, bias=None, n_group=None, topk_group=None,
                scaling=1.0):  # fmt: skip
    """(weights [T, k] float64, ids [T, k] int64); ties to the lowest expert id, -inf logits never chosen."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    s = logits.to(dt)
    scores = torch.softmax(s, -1) if scoring == "softmax" else torch.sigmoid(s)
    biased = scores if bias is None else scores + bias.to(dt)
    T, E = scores.shape
    ws, idss = [], []
    for t in range(T):
        row, choice = scores[t].tolist(), biased[t].tolist()
        # A -inf logit masks its expert, whatever the bias.
        choice = [float("-inf") if float(logits[t, e]) == float("-inf") else c for e, c in enumerate(choice)]
        allowed = range(E)
        if n_group is not None:
            per = E // n_group
            gscores = []
            for g in range(n_group):
                vals = sorted(choice[g * per : (g + 1) * per], reverse=True)
                gscores.append(sum(vals[:2]) if bias is not None else vals[0])
            kept = sorted(range(n_group), key=lambda g: (-gscores[g], g))[:topk_group]
            allowed = [e for g in kept for e in range(g * per, (g + 1) * per)]
        ids = sorted(allowed, key=lambda e: (-choice[e], e))[:top_k]
        w = [row[e] for e in ids]
        if renormalize:
            tot = sum(w) + 1e-20
            w = [v / tot for v in w]
        ws.append([v * scaling for v in w])
        idss.append(ids)
    return torch.tensor(ws, dtype=torch.float64), torch.tensor(idss, dtype=torch.int64)


def naive_moe(x, w_gate_up, w_down, weights, ids, activation="silu"):
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]), one token and one slot at a time, in float64."""
    act = F.silu if activation == "silu" else F.gelu
    inter = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w_gate_up[e].double() @ x[t].double()
            out[t] += float(weights[t, j]) * (w_down[e].double() @ (act(h[:inter]) * h[inter:]))
    return out


def random_moe(T, H, inter, E, dtype=torch.float32):
    """x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], router logits [T, E], all O(1) after each matmul."""
    x = torch.randn(T, H, dtype=dtype)
    w_gate_up = torch.randn(E, 2 * inter, H, dtype=dtype) / H**0.5
    w_down = torch.randn(E, H, inter, dtype=dtype) / inter**0.5
    logits = torch.randn(T, E, dtype=dtype)
    return x, w_gate_up, w_down, logits

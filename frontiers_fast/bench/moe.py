"""MoE benchmark cases: whole sparse MoE blocks, ours against transformers'.

* A Mixtral-shaped block (H1024, I2816, E8, top-2) in float32 and bfloat16
  at T = 1, 16, 256 and 2048 tokens, forward; and float32 T=2048 forward +
  backward with peak memory.  transformers 5.x runs its experts through one
  of two CPU implementations, ``eager`` (a loop over the experts that were
  hit) and ``grouped_mm`` (``torch._grouped_mm``): both are timed, and the
  faster one at each size is the peer to beat.
* The bfloat16 T=2048 case also times one dense bfloat16 GEMM of the same
  FLOPs, the yardstick of how close a grouped GEMM gets to a dense one.
* A Qwen3-MoE-shaped block (E128 top-8, H2048, I768) in bfloat16 at T=256.
* Expert parallelism over 2 gloo ranks: where the time goes
  (:func:`frontiers_fast.bench.moe_ep.time_split`).

Every call gets fresh tokens (a few input sets are cycled), so the routing,
and with it the experts each call reads, changes from call to call.  The
providers of a case are timed in alternation (``with bench.case(...)``).
Providers and sizes only; the harness does the measuring.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .. import _backend
from ..nn.moe import MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock
from .harness import peer, time_fn

H, INTER, E, TOP = 1024, 2816, 8, 2
TOKENS = (1, 16, 256, 2048)
QWEN = dict(H=2048, I=768, E=128, top=8, T=256)
OURS = "frontiers_fast[cpp]"
PEERS = ("transformers eager", "transformers grouped_mm")
DENSE = "dense bf16 GEMM, same FLOPs"


def _name(dt, T):
    return f"Mixtral MoE {dt} / T{T}-H{H}-I{INTER}-E{E}-top{TOP}"


def _targets():
    speed = {
        ("fp32", 16): 2.0,
        ("fp32", 256): 1.5,
        ("bf16", 16): 2.0,
        ("bf16", 256): 2.0,
        ("bf16", 2048): 1.8,
    }
    out = [
        (_name(dt, T), OURS, PEERS, speed.get((dt, T), 1.0), None, "fwd")
        for dt in ("fp32", "bf16")
        for T in TOKENS
    ]
    out.append((_name("bf16", 2048), OURS, DENSE, 0.65, None, "fwd"))
    out.append((_name("fp32", 2048), OURS, PEERS, 1.5, 1.5, "fwd+bwd"))
    q = QWEN
    out.append((f"Qwen3-MoE bf16 / T{q['T']}-H{q['H']}-I{q['I']}-E{q['E']}-top{q['top']}", OURS, PEERS, 2.0,
                None, "fwd"))  # fmt: skip
    return out


# What the report checks: (case prefix, our provider prefix, peer(s), min speed-up, min memory ratio, mode).
TARGETS = _targets()

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _params(module):
    # Same order for every block: the parameter names are the same.
    return [p for _, p in sorted(module.named_parameters())]


class _Cycle:
    """``next()`` gives the next of a few input sets: fresh tokens on every call."""

    def __init__(self, xs):
        self.xs, self.i = xs, 0

    def next(self):
        x = self.xs[self.i % len(self.xs)]
        self.i += 1
        return x


def _fwd(module, cycle, ctx):
    def fn():
        with torch.no_grad(), ctx():
            return module(cycle.next())

    return fn


def _fwd_bwd(module, x, seed, ctx):
    xg = x.detach().clone().requires_grad_(True)
    params = _params(module)

    def fn():
        with ctx():
            out = module(xg)
            grads = torch.autograd.grad(out, [xg, *params], seed)
        return [out.detach(), *grads]

    return fn


def _backend_ctx(b):
    return lambda: _backend.use_backend(b)


def _hf_block(kind, config_kw, impl, state, device):
    """transformers' block with our weight tensors (shared, not copied), or None when not installed."""
    if kind == "mixtral":
        Config = peer("transformers", "MixtralConfig")
        Block = peer("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock")
    else:
        Config = peer("transformers", "Qwen3MoeConfig")
        Block = peer("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock")
    if Config is None or Block is None:
        return None
    config = Config(**config_kw)
    config._experts_implementation = impl
    with torch.device("meta"):
        b = Block(config)
    b.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    return b.eval()


def _our_block(cls, kw, state, device):
    with torch.device("meta"):
        b = cls(**kw)
    b.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    return b.eval()


def _inputs(T, H_, n, device, dtype, gen):
    return [torch.randn(1, T, H_, generator=gen).to(device=device, dtype=dtype) for _ in range(n)]


def _providers(bench, kind, cls, our_kw, hf_kw, state):
    device = bench.device
    out = [(f"frontiers_fast[{b}]", _our_block(cls, our_kw, state, device), _backend_ctx(b))
           for b in bench.ours("fused_moe")]  # fmt: skip
    for impl, name in zip(("eager", "grouped_mm"), PEERS):
        hf = _hf_block(kind, hf_kw, impl, state, device)
        if hf is not None:
            out.append((name, hf, contextlib.nullcontext))
    return out


def _mixtral_state(dtype, gen):
    # Fan-in scaled weights keep the router logits and expert activations O(1).
    s = {
        "gate.weight": torch.randn(E, H, generator=gen) / H**0.5,
        "experts.gate_up_proj": torch.randn(E, 2 * INTER, H, generator=gen) / H**0.5,
        "experts.down_proj": torch.randn(E, H, INTER, generator=gen) / INTER**0.5,
    }
    return {k: v.to(dtype) for k, v in s.items()}


def _truth(cls, kw, state, xs, seed=None):
    """The float64 reference block on the same (rounded) weights: forward, or forward + backward."""
    r64 = _our_block(cls, kw, {k: v.double() for k, v in state.items()}, "cpu")
    ctx = _backend_ctx("reference")
    if seed is None:
        with torch.no_grad(), ctx():
            return r64(xs.double().cpu())
    return _fwd_bwd(r64, xs.double().cpu(), seed.double().cpu(), ctx)()


def _mixtral_cases(bench, notes):
    device, quick = bench.device, bench.quick
    tokens = (1, 16, 128) if quick else TOKENS
    kw = dict(hidden_size=H, intermediate_size=INTER, num_experts=E, top_k=TOP)
    hf_kw = dict(hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=TOP)
    flops1 = 2 * TOP * 3 * INTER * H  # per token: [H] x [2I, H], then [I] x [H, I], for each of its k experts
    weight_bytes = {dt: E * 3 * INTER * H * _DT[dt].itemsize for dt in _DT}
    for dt in ("fp32", "bf16"):
        dtype = _DT[dt]
        gen = torch.Generator().manual_seed(0)
        state = _mixtral_state(dtype, gen)
        provs = _providers(bench, "mixtral", MixtralSparseMoeBlock, kw, hf_kw, state)
        tol = 1e-4 if dt == "fp32" else 3e-2
        for T in tokens:
            xs = _inputs(T, H, 4, device, dtype, gen)
            t_check = min(T, 256)
            want = _truth(MixtralSparseMoeBlock, kw, state, xs[0][:, :t_check])
            # Decoding reads each chosen expert's weights: memory, not FLOPs, bounds it.
            if T <= 16:
                hit = min(E, T * TOP)
                roof = ("dram", hit * weight_bytes[dt] // E)
            else:
                roof = ("gemm_bf16" if dt == "bf16" else "gemm_fp32", T * flops1)
            mt = min(bench.min_time, 0.3)
            with bench.case(_name(dt, T), "fwd", want, tol, min_time=mt, roof=roof) as case:
                for provider, module, ctx in provs:
                    cyc = _Cycle(xs)
                    fn = _fwd(module, cyc, ctx)
                    check = lambda m=module, c=ctx: _fwd(m, _Cycle(xs[:1]), c)()[:, :t_check]
                    case.run(provider, fn, check=check)
                if dt == "bf16" and T == tokens[-1]:
                    a = torch.randn(T * TOP, H, generator=gen).to(device=device, dtype=dtype)
                    b = torch.randn(H, 3 * INTER, generator=gen).to(device=device, dtype=dtype)
                    case.run(DENSE, lambda a=a, b=b: a @ b, compare=False)
        if dt == "fp32" and not quick:
            # Are the weights cache-resident between calls?  Read them the way a decode step does.
            ws = [state["experts.gate_up_proj"], state["experts.down_proj"]]
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            ms = time_fn(lambda: [w.sum() for w in ws], device, min_time=0.3)[0]
            notes.append(
                f"Reading the float32 Mixtral experts ({nbytes / 1e6:.0f} MB, `sum`) ran at {nbytes / ms / 1e6:.1f} GB/s "
                "in this run, to compare with the memory-read roof above: the machine reports a 480 MB L3, "
                "which could hold them, so the decode cases may measure cache-resident weights."
            )
        if dt == "fp32":
            T = tokens[-1]
            t_check = min(T, 256)
            x = _inputs(T, H, 1, device, dtype, gen)[0]
            seed = torch.randn(1, T, H, generator=gen).to(device)
            t0 = time.perf_counter()
            want = _truth(MixtralSparseMoeBlock, kw, state, x[:, :t_check], seed[:, :t_check])
            notes.append(f"float64 fwd+bwd truth on {t_check} tokens: {time.perf_counter() - t0:.1f} s")
            case = bench.case(_name(dt, T), "fwd+bwd", want, 1e-4, memory=not quick,
                              min_time=min(bench.min_time, 0.2), roof=("gemm_fp32", 3 * T * flops1))  # fmt: skip
            with case:
                for provider, module, ctx in provs:
                    # Weight gradients sum over all tokens: check a run on the checked tokens alone.
                    check = _fwd_bwd(module, x[:, :t_check], seed[:, :t_check], ctx)
                    case.run(provider, _fwd_bwd(module, x, seed, ctx), check=check)
        del provs, state


def _qwen_case(bench):
    q = QWEN
    device, quick = bench.device, bench.quick
    Hq, Iq, Eq, top, T = q["H"], q["I"], q["E"], q["top"], q["T"]
    if quick:
        Eq, T = 32, 64
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    state = {
        "gate.weight": torch.randn(Eq, Hq, generator=gen) / Hq**0.5,
        "experts.gate_up_proj": (torch.randn(Eq, 2 * Iq, Hq, generator=gen) / Hq**0.5).to(dtype),
        "experts.down_proj": (torch.randn(Eq, Hq, Iq, generator=gen) / Iq**0.5).to(dtype),
    }
    state["gate.weight"] = state["gate.weight"].to(dtype)
    kw = dict(hidden_size=Hq, intermediate_size=Iq, num_experts=Eq, top_k=top, norm_topk_prob=True)
    hf_kw = dict(hidden_size=Hq, moe_intermediate_size=Iq, num_experts=Eq, num_experts_per_tok=top,
                 norm_topk_prob=True)  # fmt: skip
    xs = _inputs(T, Hq, 4, device, dtype, gen)
    # bfloat16 router logits tie often (8 bits of mantissa, 128 experts): transformers' topk breaks a
    # tie at the top-k boundary its own way, so the check uses the first 64 tokens without one.
    logits = torch.nn.functional.linear(xs[0][0], state["gate.weight"].to(device)).float()
    kth = logits.topk(top + 1, dim=-1).values
    rows = torch.nonzero(kth[:, top - 1] != kth[:, top]).flatten()[:64]
    want = _truth(Qwen3MoeSparseMoeBlock, kw, state, xs[0][:, rows])
    name = f"Qwen3-MoE bf16 / T{T}-H{Hq}-I{Iq}-E{Eq}-top{top}"
    case = bench.case(name, "fwd", want, 3e-2, min_time=min(bench.min_time, 0.3),
                      roof=("gemm_bf16", T * 2 * top * 3 * Iq * Hq))  # fmt: skip
    with case:
        for provider, module, ctx in _providers(bench, "qwen3", Qwen3MoeSparseMoeBlock, kw, hf_kw, state):
            check = lambda m=module, c=ctx: _fwd(m, _Cycle(xs[:1]), c)()[:, rows]
            case.run(provider, _fwd(module, _Cycle(xs), ctx), check=check)


def _ep_section(bench):
    if bench.device != "cpu":
        return None
    try:
        from .moe_ep import time_split
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        return f"(not measured: {exc})"
    T = 64 if bench.quick else 256
    try:
        r = time_split(T, H, INTER, E, TOP, world=2, dtype=torch.float32, repeats=3)
    except Exception as exc:  # a failed spawn must not stop the report
        return f"(not measured: {type(exc).__name__}: {exc})"
    phases = ("total", "routing", "permute", "all_to_all_counts", "all_to_all_tokens", "compute",
              "all_to_all_return", "combine", "all_to_all")  # fmt: skip
    rows = ["| phase | ms (median of 3, slowest rank) | share of total |", "|---|---|---|"]
    rows += [f"| {k} | {r[k]:.2f} | {r[k] / r['total']:.0%} |" for k in phases if k in r]
    return (
        f"`expert_parallel` Mixtral block (H{H} I{INTER} E{E} top-{TOP}, float32), {T} tokens per rank, "
        "2 gloo ranks on this machine's 2 cores (each rank gets one thread).  The all-to-all rows include "
        "the time a rank waits for its slower peer.\n\n" + "\n".join(rows)
    )


def run(bench, out_dir=None):
    notes = []
    _mixtral_cases(bench, notes)
    _qwen_case(bench)
    ep = _ep_section(bench)
    note = (
        "Every provider is checked against a float64 run of the reference block (routing included) on the "
        "same weights (rounded to the case's dtype first) before it is timed: forward cases on the first "
        "rows of a full-size call, fwd+bwd on a run over the first 256 tokens (output and the gradients of "
        "the input and of all three weight tensors).  The error column is the largest error relative to "
        "the largest value (the Qwen3-MoE case checks the first 64 tokens whose bfloat16 router logits "
        "have no tie at the top-k boundary, where transformers' topk and our lowest-id rule may pick "
        "differently).  Weights are fan-in scaled normals.  Each call gets fresh tokens (four input "
        "sets, cycled).  transformers' blocks share our weight tensors; each runs one experts "
        "implementation (`config._experts_implementation`), `eager` or `grouped_mm`, and a target is "
        "checked against the faster of the two at each size.  The decode cases' (T=1, 16) roof is the "
        "time to read the chosen experts' weights at the memory-read rate.  The dense "
        "GEMM row is `[T*k, H] @ [H, 3I]` in bfloat16 (the FLOPs of the experts' GEMMs), not a MoE.  "
        + " ".join(notes)
    )
    sections = [("MoE: how the comparison was made", note)]
    if ep is not None:
        sections.append(("MoE: expert parallelism, where the time goes", ep))
    return sections

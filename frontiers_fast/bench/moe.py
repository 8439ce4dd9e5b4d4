"""MoE benchmark case: one Mixtral-shaped sparse MoE block, forward and
forward + backward, our registered ops (reference backend) against
transformers' ``MixtralSparseMoeBlock`` on the same weights.  Providers and
sizes only; the harness does the measuring."""

from __future__ import annotations

import time

import torch

from ..nn.moe import MixtralSparseMoeBlock
from .harness import peer

TARGETS: list = []  # baselines only until kernels land

H, INTER, E, TOP = 1024, 2816, 8, 2


def _params(module):
    # Same order for both blocks: the parameter names are the same.
    return [p for _, p in sorted(module.named_parameters())]


def _fwd(module, x):
    def fn():
        with torch.no_grad():
            return module(x)

    return fn


def _fwd_bwd(module, x, seed):
    xg = x.detach().clone().requires_grad_(True)

    def fn():
        out = module(xg)
        grads = torch.autograd.grad(out, [xg, *_params(module)], seed)
        return [out.detach(), *grads]

    return fn


def _skip_calls(fn, n):
    """``fn`` whose first ``n`` calls do nothing.

    The harness warms up with two calls before timing.  At full size one call
    takes seconds, and one real warm-up (or the full-size agreement check
    just before) is enough, so the spare warm-ups are skipped to keep the
    family inside its time budget.  Every timed call runs ``fn`` in full.
    """
    left = [n]

    def wrapped():
        if left[0] > 0:
            left[0] -= 1
            return None
        return fn()

    return wrapped


def run(bench, out_dir=None):
    device, quick = bench.device, bench.quick
    T = 128 if quick else 2048
    # The float64 truth runs on the first t_check tokens: a full float64
    # forward + backward at T=2048 alone would take most of the time budget.
    t_check = min(T, 256)
    name = f"fused MoE / T{T}-H{H}-I{INTER}-E{E}-top{TOP}"
    gen = torch.Generator().manual_seed(0)
    # Fan-in scaled weights keep the router logits and expert activations O(1).
    w_router = torch.randn(E, H, generator=gen) / H**0.5
    w_gate_up = torch.randn(E, 2 * INTER, H, generator=gen) / H**0.5
    w_down = torch.randn(E, H, INTER, generator=gen) / INTER**0.5
    state = {"gate.weight": w_router, "experts.gate_up_proj": w_gate_up, "experts.down_proj": w_down}
    x = torch.randn(1, T, H, generator=gen).to(device)
    seed = torch.randn(1, T, H, generator=gen).to(device)
    xc, seedc = x[:, :t_check].contiguous(), seed[:, :t_check].contiguous()

    def block(dtype):
        # Built on the meta device: the 70M-parameter random init would be thrown away anyway.
        with torch.device("meta"):
            b = MixtralSparseMoeBlock(hidden_size=H, intermediate_size=INTER, num_experts=E, top_k=TOP)
        b.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
        return b.eval()

    t0 = time.perf_counter()
    r64 = block(torch.float64)
    with torch.no_grad():
        expected_fwd = r64(xc.double())
    expected_bwd = _fwd_bwd(r64, xc.double(), seedc.double())()
    del r64
    t64 = time.perf_counter() - t0
    print(f"  float64 reference on {t_check} of {T} tokens (fwd and fwd+bwd): {t64:.1f} s", flush=True)

    providers = [("frontiers_fast[reference]", block(torch.float32))]
    MixtralConfig = peer("transformers", "MixtralConfig")
    HFBlock = peer("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock")
    if MixtralConfig is not None and HFBlock is not None:
        config = MixtralConfig(
            hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=TOP
        )
        hf = HFBlock(config)
        hf.load_state_dict(state)
        providers.append(("transformers MixtralSparseMoeBlock", hf.to(device).eval()))

    mt = min(bench.min_time, 0.2)  # calls take seconds: the harness's minimum of 3 repeats is plenty
    # Two GEMMs per routed token and expert: x [H] by [2I, H], then [I] by [H, I].
    flops = 2 * T * TOP * (2 * INTER * H + INTER * H)
    for mode, expected in (("fwd", expected_fwd), ("fwd+bwd", expected_bwd)):
        case = bench.case(name, mode, expected, 1e-4, memory=mode == "fwd+bwd" and not quick, min_time=mt,
                          roof=("gemm_fp32", flops if mode == "fwd" else 3 * flops))  # fmt: skip
        for provider, module in providers:
            if mode == "fwd":
                fn = _fwd(module, x)
                # Tokens are independent in the forward: the full-size call is checked on its first rows,
                # and it doubles as the warm-up.
                check = lambda fn=fn: fn()[:, :t_check]
                timed = _skip_calls(fn, 2)
            else:
                # Gradients of the weights sum over all tokens: check a run on the checked tokens alone.
                check = _fwd_bwd(module, xc, seedc)
                timed = _skip_calls(_fwd_bwd(module, x, seed), 1)
            case.run(provider, timed, check=check)

    note = (
        f"Before timing, each provider was checked against a float64 run of the reference (routing "
        f"included) on the first {t_check} of the {T} tokens (a full float64 run would take most of the "
        f"time budget; it took {t64:.1f} s on the slice): the forward check compares the first "
        f"{t_check} rows of the full-size output, the fwd+bwd check a run on those tokens alone (output "
        "and the gradients of the input and all three weight tensors).  The error column is the norm-wise "
        "relative error.  Weights are fan-in scaled normals; the router is Mixtral's (softmax in float32, "
        "top-2, renormalised).  `frontiers_fast[reference]` is `frontiers_fast.nn.moe.MixtralSparseMoeBlock` "
        "(moe_route + fused_moe ops on the reference backend: permute, one GEMM pair per expert on its "
        "rows, gather-combine; its backward recomputes the expert forward).  transformers' block loops over "
        "the experts that were hit and combines with index_add.  Times are medians of 3 calls after one "
        "warm-up call."
    )
    return [("MoE: how the comparison was made", note)]

"""Mamba layer benchmark cases: :class:`frontiers_fast.nn.Mamba` against
transformers' ``MambaMixer`` (forward at L 2048; forward and backward at
L 512, gradients of the input and of every parameter), and greedy decoding
of a 4-layer ``MambaForCausalLM`` run through
:func:`frontiers_fast.integrations.transformers.kernelize` against the same
model untouched.  Providers and sizes only; the harness does the measuring.

transformers' CPU mixer is its PyTorch path (a Python loop over the time
steps, ``slow_forward``): seconds per call forward, tens of seconds with the
backward.  The harness's timing loop makes at least five calls, so those
peers are timed on one call (:func:`_run_once`); ours go through the
harness.  The bench's ``run(bench)`` is called from
:mod:`frontiers_fast.bench.ssm`.
"""

from __future__ import annotations

import copy
import time

import torch

from .. import _backend
from ..nn.ssm import Mamba
from .harness import Result, _sync, max_error, peak_memory_mb, peer

# The public functions the layer runs, forward (and with the backward).
_FWD = ("causal_conv1d", "selective_scan")
_DECODE = ("causal_conv1d", "selective_scan", "causal_conv1d_update", "selective_state_update")


def _sizes(quick):
    if quick:
        return dict(d_model=128, L_fwd=256, L_bwd=128, layers=2, vocab=1000, prompt=32, new=8)
    return dict(d_model=768, L_fwd=2048, L_bwd=512, layers=4, vocab=1000, prompt=256, new=64)


def _backends(bench, functions, grad=False):
    """Our fast backends that every one of ``functions`` has here (with its backward when ``grad``),
    then the reference, which always runs."""
    fast = [b for b in bench.ours(functions[0]) if all(b in bench.ours(f) for f in functions)]
    if grad:
        fast = [b for b in fast if all(_backend.FUNCTIONS[f].available(b, True)[0] for f in functions)]
    return [*fast, "reference"]


def _run_once(case, provider, fn, convert=None):
    """Check and time one call of a slow peer (its output, through ``convert``, against the truth).

    The harness's :func:`~frontiers_fast.bench.harness.time_fn` makes two
    warm-up calls and three timed ones: minutes for transformers' Python
    loop.  The timed call is the checked one; a case with ``memory`` then
    measures one more call.
    """
    f = case.family
    r = Result(f.name, case.name, case.mode, provider, f.device)
    try:
        _sync(f.device)
        t0 = time.perf_counter()
        out = fn()
        _sync(f.device)
        ms = (time.perf_counter() - t0) * 1e3
        r.max_err = max_error(convert(out) if convert else out, case.expected)
        if r.max_err <= case.tol:
            r.ms = r.ms_p20 = r.ms_p80 = ms
            if case.memory:
                r.peak_mb = peak_memory_mb(fn, f.device)
        else:
            r.status = f"mismatch: max error {r.max_err:.2e} > {case.tol:.0e}"
    except Exception as exc:  # a peer failing must not stop the report
        r.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    r.roof_ms = case.roof_ms
    f.results.append(r)
    shown = f"{r.ms:9.3f} ms (one call)" if r.ms is not None else r.status
    mem = f"  peak {r.peak_mb:8.1f} MB" if r.peak_mb is not None else ""
    print(f"  {provider:<28} {shown}{mem}", flush=True)
    return r


def _saved_mb(forward, module):
    """MB of the distinct buffers autograd keeps for the backward of ``forward()``, ``module``'s
    parameters excluded (a GEMM keeps its weight as a transposed view, no Parameter)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        # Views of one buffer (xz's halves, x_dbl's slices) count once.
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values()) / 2**20


def _layer_flops(batch, L, d_model, d_inner, dt_rank, N):
    """The projections' GEMMs, the work no implementation of the layer avoids (forward)."""
    per_token = d_model * 2 * d_inner + d_inner * (dt_rank + 2 * N) + dt_rank * d_inner + d_inner * d_model
    return 2 * batch * L * per_token


def _layer_cases(bench, tf, sz):
    d_model, N = sz["d_model"], 16
    cfg = tf.MambaConfig(hidden_size=d_model, state_size=N, conv_kernel=4, expand=2, num_hidden_layers=1)
    gen = torch.Generator().manual_seed(3)
    theirs = tf.models.mamba.modeling_mamba.MambaMixer(cfg, layer_idx=0).to(bench.device)
    ours = Mamba(d_model, d_state=N, d_conv=4, expand=2, dt_rank=theirs.time_step_rank, device=bench.device)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same weights in both
    truth = copy.deepcopy(theirs).double()  # float64 transformers: the truth is not our code
    names = [n for n, _ in theirs.named_parameters()]
    flops = _layer_flops(1, 1, d_model, ours.d_inner, ours.dt_rank, N)
    # Norm-wise relative error of float32 recurrences of L steps, at most about L * 2**-24 (as the
    # scan's case), with room for the GEMMs' sums of d_inner products.
    tol = lambda L: max(L, ours.d_inner) * 2.0**-24 * 4

    # --- forward, L_fwd -------------------------------------------------------------
    L = sz["L_fwd"]
    x = torch.randn(1, L, d_model, generator=gen).to(bench.device)
    name = f"nn.Mamba d{d_model}-x2-n{N} / b1-L{L}"
    with torch.no_grad():
        expected = truth.eval()(x.double())
    case = bench.case(name, "fwd", expected, tol(L), roof=("gemm_fp32", flops * L))
    for b in _backends(bench, _FWD):

        def fwd(b=b):
            with torch.no_grad(), _backend.use_backend(b):
                return ours(x)

        case.run(f"frontiers_fast[{b}]", fwd)
    theirs.eval()
    with torch.no_grad():
        _run_once(case, "transformers MambaMixer", lambda: theirs(x))

    # --- forward + backward, L_bwd --------------------------------------------------
    L = sz["L_bwd"]
    x = torch.randn(1, L, d_model, generator=gen).to(bench.device)
    seed = torch.randn(1, L, d_model, generator=gen).to(bench.device)
    name = f"nn.Mamba d{d_model}-x2-n{N} / b1-L{L}"
    truth.train()
    x64 = x.double().requires_grad_(True)
    expected = list(torch.autograd.grad(truth(x64), [x64, *truth.parameters()], seed.double()))
    del x64
    case = bench.case(name, "fwd+bwd", expected, tol(L), memory=True, roof=("gemm_fp32", 3 * flops * L))
    xg = x.clone().requires_grad_(True)
    ours_params = [dict(ours.named_parameters())[n] for n in names]  # in transformers' order
    backends = _backends(bench, _FWD, grad=True)
    for b in backends:

        def train(b=b):
            with _backend.use_backend(b):
                return torch.autograd.grad(ours(xg), [xg, *ours_params], seed)

        case.run(f"frontiers_fast[{b}]", train)
    theirs.train()
    _run_once(
        case,
        "transformers MambaMixer",
        lambda: torch.autograd.grad(theirs(xg), [xg, *theirs.parameters()], seed),
    )
    # One layer's peak is its backward's working set, the same whether the conv output and delta
    # were kept or are recomputed; what recomputation saves is what autograd keeps between the
    # forward and the backward, which a deep model holds for every layer at once.
    with _backend.use_backend(backends[0]):
        kept = {
            f"frontiers_fast[{backends[0]}]": _saved_mb(lambda: ours(xg), ours),
            f"frontiers_fast[{backends[0]}] composed (every intermediate kept)": _saved_mb(
                lambda: ours._composed_forward(xg), ours
            ),
        }
    kept["transformers MambaMixer"] = _saved_mb(lambda: theirs(xg), theirs)
    return name, kept


def _decode_case(bench, tf, sz):
    from ..integrations.transformers import kernelize

    torch.manual_seed(4)
    # initializer_range above the default spreads the logits, so that greedy decoding does not
    # settle on one token and the check (identical tokens) means something.
    cfg = tf.MambaConfig(
        hidden_size=sz["d_model"], num_hidden_layers=sz["layers"], vocab_size=sz["vocab"], state_size=16,
        expand=2, initializer_range=0.1,
    )  # fmt: skip
    plain = tf.MambaForCausalLM(cfg).to(bench.device).eval()
    fast = kernelize(copy.deepcopy(plain))
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, sz["vocab"], (1, sz["prompt"]), generator=gen).to(bench.device)
    new = sz["new"]
    # min_new_tokens: an end-of-sequence token must not stop one provider early.
    kw = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
        use_cache=True, pad_token_id=0,
    )  # fmt: skip

    def generate(model):
        with torch.no_grad():
            return model.generate(prompt, **kw)

    expected = generate(plain)  # the plain model's tokens: the check is that ours are identical
    name = f"MambaForCausalLM {sz['layers']}x d{sz['d_model']} greedy / prompt {sz['prompt']} + {new} new"
    case = bench.case(name, "fwd", expected, 0.0)
    for b in _backends(bench, _DECODE):

        def run(b=b):
            with _backend.use_backend(b):
                return generate(fast)

        case.run(f"frontiers_fast[{b}] kernelize", run)
    _run_once(case, "transformers MambaForCausalLM", lambda: generate(plain))
    return name, new


def run(bench, out_dir=None):
    tf = peer("transformers")
    if tf is None:
        return [
            (
                "Mamba layers: what is compared",
                "transformers is not importable: the layer cases were not run.",
            )
        ]
    sz = _sizes(bench.quick)
    train_name, kept = _layer_cases(bench, tf, sz)
    decode_name, new = _decode_case(bench, tf, sz)
    rates = [
        f"{r.provider} {new / (r.ms * 1e-3):.1f} tokens/s"
        for r in bench.results
        if r.case == decode_name and r.ms is not None
    ]
    note = (
        "`nn.Mamba` (in_proj, causal conv + SiLU, x_proj, dt_proj, selective scan gated by silu(z), "
        "out_proj) against transformers' `MambaMixer` with the same weights (loaded with "
        "`load_state_dict(strict=True)`), batch 1, expand 2, N 16.  transformers runs its CPU path, a "
        "Python loop over the time steps; being slow, it is timed on one call (ours: the harness's "
        "median).  Truth: the transformers mixer in float64 (autograd through it for the gradients of "
        "the input and of every parameter); tolerance norm-wise 4 max(L, d_inner) 2^-24.  "
        "`frontiers_fast[b]` forces backend b for every op of the layer; its backward keeps xz and "
        "x_dbl and recomputes the conv output and delta (mamba_ssm's checkpoint_lvl=1).  A single "
        "layer's peak memory is its backward's working set, which recomputation does not change; what "
        "it saves is what autograd keeps from the forward to the backward, held for every layer of a "
        f"deep model at once.  Kept by autograd ({train_name}, parameters excluded): "
        + "; ".join(f"{k} {v:.1f} MB" for k, v in kept.items())
        + ".  Decoding: greedy `generate` of a random "
        f"`MambaForCausalLM`, {new} new tokens after the prompt, timed as the whole call (prefill "
        "included) of `kernelize`d vs untouched copies; the check is identical tokens.  "
        + ("Rates: " + "; ".join(rates) + "." if rates else "")
    )
    return [("Mamba layers: what is compared", note)]

"""Timing, memory, agreement and roofs shared by every family's benchmark.

A family module (``frontiers_fast/bench/<family>.py``) only builds its inputs
and names its cases and providers::

    bench = Family("gnn", results, device, quick, min_time)
    case = bench.case("spmm sum / cora", "fwd", expected=truth64, tol=1e-5, roof=("dram", nbytes))
    for b in bench.ours("spmm"):
        case.run(f"frontiers_fast[{b}]", lambda b=b: ff.spmm(g, x, w, backend=b))
    case.run("torch.sparse.mm (CSR)", lambda: torch.sparse.mm(A, x))

and the harness does the rest the same way for everyone: each provider's
output is checked against the float64 truth first (a mismatch is reported,
not timed), then timed, and its peak memory measured when the case asks.
Written as ``with bench.case(...) as case:``, the case times its providers
together when the block ends, calling them in alternation, so that a slow
phase of a shared machine hits every provider alike.

Every figure is taken in one process, on the same inputs.  CPU times are
medians of repeats with ``time.perf_counter``; CUDA times use events.
Peak memory is the peak of bytes allocated during one call, counted from the
allocator's events (CPU, through the profiler) or ``max_memory_allocated``
(CUDA), above what was allocated when the call started.

A case may name its roof: the work it cannot avoid, as ``(kind, amount)``
with kind one of :data:`ROOFS` (FLOPs of fp32 or bf16 GEMMs, exponentials,
bytes read from memory).  The rates are measured at the start of the run on
the same machine (:func:`measure_roofs`), and the report gives each case's
best time as a fraction of the time its roof allows.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Result:
    family: str
    case: str  # e.g. "spmm sum / skewed-100k"
    mode: str  # "fwd" or "fwd+bwd"
    provider: str
    device: str
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    peak_mb: float | None = None
    max_err: float | None = None
    status: str = "ok"  # "ok", "mismatch: ...", "error: ...", "skipped: ..."
    roof_ms: float | None = None  # the time the case's roof allows on this machine

    def to_json(self):
        return dataclasses.asdict(self)


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object], device: str, min_time: float = 0.5, max_reps: int = 50, warmup: int = 2
):
    """Median, 20th and 80th percentile of wall time in ms."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        times.append(_time_once(fn, device))
    return _summary(times)


def _summary(times):
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    return statistics.median(times), q(0.2), q(0.8)


def _time_once(fn, device):
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    fns: list[Callable[[], object]], device: str, min_time: float = 0.5, max_reps: int = 50, warmup: int = 2
):
    """:func:`time_fn` for several providers at once, called in alternation.

    Each round calls every provider once, starting one further along each
    round, so a slow phase of a shared machine (another process, a clock
    change, a page-cache flush) lands on all of them alike instead of on
    whichever happened to run then.  Returns one (median, p20, p80) per fn.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < 3 or time.perf_counter() - start < min_time * len(fns)):
        for j in range(len(fns)):
            i = (j + rounds) % len(fns)
            times[i].append(_time_once(fns[i], device))
        rounds += 1
    return [_summary(t) for t in times]


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def max_error(out, expected) -> float:
    """Norm-wise relative error: max over tensors of max|out - expected| / max|expected|.

    Element-wise checks live in the tests; here long float32 sums (hub rows
    with tens of thousands of edges, parameter gradients summed over every
    edge) make an element-wise relative bound meaningless for small entries.
    """
    if isinstance(out, torch.Tensor):
        out, expected = [out], [expected]
    err = 0.0
    for a, b in zip(out, expected):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            return math.inf
        if a.numel():
            err = max(err, ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())
    return err


def _error_status(exc) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _checked(r: Result, check, expected, tol) -> bool:
    """Fill ``r.max_err``; False (with ``r.status`` set) when the output disagrees or raises."""
    try:
        if check is not None and expected is not None:
            r.max_err = max_error(check(), expected)
            if not r.max_err <= tol:
                r.status = f"mismatch: max error {r.max_err:.2e} > {tol:.0e}"
                return False
    except Exception as exc:  # a peer failing must not stop the report
        r.status = _error_status(exc)
        return False
    return True


def _print(r: Result):
    mem = f"  peak {r.peak_mb:8.1f} MB" if r.peak_mb is not None else ""
    err = f"  err {r.max_err:.1e}" if r.max_err is not None else ""
    shown = f"{r.ms:9.3f} ms" if r.ms is not None else r.status
    print(f"  {r.provider:<28} {shown}{mem}{err}", flush=True)


def _time_into(r: Result, fn, device, min_time, memory, timed=None):
    """Fill ``r``'s times (``timed``, or :func:`time_fn` of ``fn``) and peak memory, then print it."""
    try:
        r.ms, r.ms_p20, r.ms_p80 = timed if timed is not None else time_fn(fn, device, min_time=min_time)
        if memory:
            r.peak_mb = peak_memory_mb(fn, device)
    except Exception as exc:  # a peer failing must not stop the report
        r.status = _error_status(exc)
    _print(r)


def run_interleaved(entries: list[tuple[Result, Callable[[], object]]], device: str, min_time: float,
                    memory: bool = False):  # fmt: skip
    """Time the ``(result, fn)`` pairs in alternation (:func:`time_interleaved`) and fill the results.

    If one provider raises while timed, each is timed again alone, so the
    error names its provider and the others keep their figures.
    """
    try:
        got = time_interleaved([fn for _, fn in entries], device, min_time=min_time)
    except Exception:
        got = [None] * len(entries)
    for (r, fn), timed in zip(entries, got):
        _time_into(r, fn, device, min_time, memory, timed)


# ---------------------------------------------------------------------------
# roofs
# ---------------------------------------------------------------------------
ROOFS = {
    "gemm_fp32": "fp32 GEMM, FLOP/s",
    "gemm_bf16": "bf16 GEMM, FLOP/s",
    "exp": "torch.exp into a preallocated output, data in cache, elements/s",
    "dram": "streaming read of a buffer larger than the last-level cache, bytes/s",
}


def _rate(fn, amount, device, reps=5):
    ms = time_fn(fn, device, min_time=0.05, max_reps=reps, warmup=1)[0]
    return amount / (ms * 1e-3)


def measure_roofs(device: str, quick: bool = False) -> dict[str, float]:
    """The rates behind :data:`ROOFS`, measured here and now."""
    dev = torch.device(device)
    n = 1024 if quick else 2048
    out = {}
    for kind, dt in (("gemm_fp32", torch.float32), ("gemm_bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        c = torch.empty(n, n, device=dev, dtype=dt)
        out[kind] = _rate(lambda: torch.mm(a, b, out=c), 2 * n**3, device)
    m = 1 << 22  # 16 MB of float32: in cache on either device
    x = torch.randn(m, device=dev)
    y = torch.empty_like(x)
    out["exp"] = _rate(lambda: torch.exp(x, out=y), m, device)
    # 1 GiB (quick: 256 MiB) is beyond this CPU's 480 MB L3 and any GPU's L2.
    big = torch.ones((1 << 28) if not quick else (1 << 26), device=dev)
    out["dram"] = _rate(lambda: big.sum(), big.numel() * 4, device, reps=3)
    return out


def roof_ms(roof, rates) -> float | None:
    if roof is None or not rates:
        return None
    kind, amount = roof
    if kind not in ROOFS:
        raise ValueError(f"roof kind must be one of {tuple(ROOFS)}, got {kind!r}")
    return amount / rates[kind] * 1e3


# ---------------------------------------------------------------------------
# the provider loop every family uses
# ---------------------------------------------------------------------------
def peer(module: str, *names: str):
    """Import an optional peer: ``module`` (or its attributes ``names``), or None if it is not importable.

    A peer that is missing leaves its providers out of the report, which says so;
    it never stops the run.
    """
    try:
        import importlib

        mod = importlib.import_module(module)
        got = tuple(getattr(mod, n) for n in names)
    except Exception as exc:
        print(f"  (peer {module} is not importable: {type(exc).__name__}: {exc}; its providers are left out)")
        return None
    if not names:
        return mod
    return got[0] if len(got) == 1 else got


def our_backends(function: str, device: str) -> list[str]:
    """The fast backends (not the reference) of public ``function`` that can run on ``device`` here."""
    from .. import _backend

    spec = _backend.FUNCTIONS[function]
    want = ("cpp",) if device == "cpu" else ("triton", "cuda")
    return [b for b in want if b in spec.implemented(False) and spec.available(b, False)[0]]


class Case:
    """One benchmark case: a float64 truth, a tolerance, and the providers timed against it.

    Used as a context manager (``with bench.case(...) as case:``), the
    providers are checked as they are added and timed together when the
    block ends, in alternation (:func:`time_interleaved`): on a shared
    machine the ratios between them are then far steadier than when each is
    timed in its own stretch.
    """

    def __init__(
        self, family: Family, name: str, mode: str, expected, tol: float, memory: bool, roof, min_time
    ):
        self.family, self.name, self.mode = family, name, mode
        self.expected, self.tol, self.memory, self.min_time = expected, tol, memory, min_time
        self.roof_ms = roof_ms(roof, family.rates)
        self._queue = None
        print(f"[{family.name}] {name} ({mode})", flush=True)

    def __enter__(self):
        self._queue = []
        return self

    def __exit__(self, exc_type, exc, tb):
        queue, self._queue = self._queue, None
        if exc_type is None and queue:
            run_interleaved(queue, self.family.device, self.min_time, self.memory)
        return False

    def run(
        self,
        provider: str,
        fn: Callable[[], object],
        check: Callable[[], object] | None = None,
        *,
        compare: bool = True,
    ) -> Result:
        """Check ``check()`` (default: ``fn()``) against the truth, then time ``fn``.

        ``compare=False`` times a yardstick that computes something else (a
        dense GEMM of the same FLOPs): it is not checked, and its error
        column in the report stays empty.
        """
        f = self.family
        r = Result(f.name, self.name, self.mode, provider, f.device, roof_ms=self.roof_ms)
        f.results.append(r)
        if not _checked(r, (check or fn) if compare else None, self.expected, self.tol):
            _print(r)
        elif self._queue is not None:
            self._queue.append((r, fn))
        else:
            _time_into(r, fn, f.device, self.min_time, self.memory)
        return r

    def skip(self, provider: str, why: str) -> Result:
        f = self.family
        r = Result(f.name, self.name, self.mode, provider, f.device, status=f"skipped: {why}")
        f.results.append(r)
        print(f"  {provider:<28} skipped ({why})", flush=True)
        return r


class Family:
    """A family's run: the results list, the device, and the roofs measured for it."""

    def __init__(self, name, results, device="cpu", quick=False, min_time=0.5, rates=None):
        self.name, self.results, self.device, self.quick, self.min_time = (
            name,
            results,
            device,
            quick,
            min_time,
        )
        self.rates = rates or {}

    def case(self, name, mode, expected, tol, *, memory=False, roof=None, min_time=None) -> Case:
        return Case(
            self, name, mode, expected, tol, memory, roof, self.min_time if min_time is None else min_time
        )

    def ours(self, function: str) -> list[str]:
        return our_backends(function, self.device)

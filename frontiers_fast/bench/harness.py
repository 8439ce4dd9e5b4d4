"""Timing, memory and agreement checks shared by every family's benchmark.

Every figure is taken in one process, on the same inputs, after checking that
the provider's output agrees with the float64 reference.  CPU times are
medians of repeats with ``time.perf_counter``; CUDA times use events.
Peak memory is the peak of bytes allocated during one call, counted from the
allocator's events (CPU, through the profiler) or ``max_memory_allocated``
(CUDA), above what was allocated when the call started.
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
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    return statistics.median(times), q(0.2), q(0.8)


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


def run_provider(
    results: list,
    *,
    family: str,
    case: str,
    mode: str,
    provider: str,
    device: str,
    fn: Callable[[], object],
    check: Callable[[], object] | None,
    expected,
    tol: float,
    min_time: float,
    memory: bool = False,
):
    """Check ``check()`` against ``expected`` (within ``tol``), then time ``fn``."""
    r = Result(family, case, mode, provider, device)
    try:
        if check is not None and expected is not None:
            r.max_err = max_error(check(), expected)
            if not r.max_err <= tol:
                r.status = f"mismatch: max error {r.max_err:.2e} > {tol:.0e}"
                results.append(r)
                print(f"  {provider:<28} {r.status}", flush=True)
                return r
        r.ms, r.ms_p20, r.ms_p80 = time_fn(fn, device, min_time=min_time)
        if memory:
            r.peak_mb = peak_memory_mb(fn, device)
    except Exception as exc:  # a peer failing must not stop the report
        r.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    results.append(r)
    mem = f"  peak {r.peak_mb:8.1f} MB" if r.peak_mb is not None else ""
    err = f"  err {r.max_err:.1e}" if r.max_err is not None else ""
    shown = f"{r.ms:9.3f} ms" if r.ms is not None else r.status
    print(f"  {provider:<28} {shown}{mem}{err}", flush=True)
    return r

#!/usr/bin/env bash
# Everything that needs a GPU, in one run: peers (gsplat, from .wheels/), build, import, CUDA-extension
# smoke tests (spmm, selective_scan, MoE routing and permutation), the MoE
# GPU tests (CUDA extension and Triton, CUDA-graph captures included), the
# rest of the test suite, benchmark report.
#
# Usage: bash benchmarks/gpu_check.sh OUTDIR
#
# Made for a lent GPU machine that has python3, torch (CUDA build), triton,
# nvcc and torch_geometric but no internet: nothing is ever downloaded (pip
# runs with --no-index --no-deps).  Every step runs under `timeout` and is
# logged to OUTDIR/<nn>_<step>.log; a failing step is recorded and the next
# one still runs.  The whole script keeps to GPU_CHECK_BUDGET_S seconds
# (default 450, so it ends inside 8 minutes): a step's timeout is cut so the
# steps after it keep their minimum share, and a step with no time left is
# skipped.  OUTDIR/summary.txt gets the final table (step, status, seconds).
#
# Env: GPU_CHECK_BUDGET_S (seconds, default 450)
#      GPU_CHECK_BENCH_ARGS (extra flags for frontiers_fast.bench, e.g. "--quick")
set -uo pipefail  # no -e: a failed step must not stop the later ones

if [[ $# -ne 1 ]]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUTDIR="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OUTDIR ROOT

BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
T_END=$((SECONDS + BUDGET_S))
KILL_GRACE_S=10  # after SIGINT (pytest then still writes its junit xml), SIGKILL
SUMMARY=()
STEP_NO=0
FAILED=0

# step NAME NOMINAL_TIMEOUT_S MIN_S RESERVE_S COMMAND...
#   MIN_S: what this step gets even if that eats into the reserve;
#   RESERVE_S: seconds kept back for the steps after this one.
step() {
  local name="$1" nominal="$2" min_s="$3" reserve="$4"
  shift 4
  STEP_NO=$((STEP_NO + 1))
  local log
  log="$OUTDIR/$(printf '%02d' "$STEP_NO")_$name.log"
  local left_total=$((T_END - SECONDS - KILL_GRACE_S))
  local share=$((left_total - reserve))
  local limit=$((nominal < share ? nominal : share))
  limit=$((limit > min_s ? limit : min_s))
  limit=$((limit < left_total ? limit : left_total))
  echo
  echo "=== [$STEP_NO] $name (timeout ${limit}s) ==="
  if [[ $limit -lt 5 ]]; then
    echo "skipped: out of time budget" | tee "$log"
    SUMMARY+=("$name|SKIPPED (no time left)|0")
    FAILED=$((FAILED + 1))
    return
  fi
  local start=$SECONDS rc
  timeout -s INT -k "$KILL_GRACE_S" "$limit" "$@" >"$log" 2>&1
  rc=$?
  local took=$((SECONDS - start)) status
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAIL (rc=$rc)" ;;
  esac
  # The full log is in OUTDIR; the console (often only its tail survives)
  # gets the end of it, longer when the step failed.
  if [[ $rc -eq 0 ]]; then tail -n 25 "$log"; else tail -n 80 "$log"; fi
  echo "--- $name: $status (${took}s, log: $log)"
  SUMMARY+=("$name|$status|$took")
  [[ $rc -eq 0 ]] || FAILED=$((FAILED + 1))
}

# --- step bodies (exported so `timeout` can run them in a child bash) ------
gc_versions() {
  python3 - <<'EOF'
import platform, sys
print("python", sys.version.replace("\n", " "), "on", platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
for mod in ("triton", "torch_geometric", "numpy", "pytest", "setuptools", "ninja"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "NOT IMPORTABLE:", type(exc).__name__, exc)
EOF
  local rc=$?
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -n 40
  return $rc
}

gc_build() {
  export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FRONTIERS_FAST_CUDA_ARCH=9.0
  export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  if python3 -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
    return 0
  fi
  # An old pip/setuptools may not do editable installs of this layout; an
  # in-place build is enough for running from the repository root.
  echo "pip install -e . failed; trying python3 setup.py build_ext --inplace"
  python3 setup.py build_ext --inplace
}

gc_peers() {
  # gsplat, the splatting family's GPU peer, is not on the GPU machine: its
  # wheel and the pure-Python ones it needs come in .wheels/ (`make
  # gpu-wheels` fills it; the device tool carries it).  Only what python3
  # cannot import yet is installed (into the user site, offline).  gsplat
  # compiles its CUDA extension on first use, for minutes: that build starts
  # here, in the background, so it runs beside our build and tests and the
  # bench finds it cached (the bench waits at most
  # FRONTIERS_FAST_BENCH_GSPLAT_BUILD_S for it, then reports gsplat skipped).
  local wheels="$ROOT/.wheels"
  if [[ ! -d "$wheels" ]]; then
    echo "no $wheels: gsplat is a peer only if this machine has it"
  else
    local whl mod
    for whl in "$wheels"/*.whl; do
      mod="$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')"
      case "$mod" in markdown_it_py) mod=markdown_it ;; wadler_lindig) mod=wadler_lindig ;; esac
      if python3 -c "import $mod" 2>/dev/null; then
        echo "have $mod"
      else
        echo "installing $(basename "$whl")"
        python3 -m pip install -q --user --no-index --no-deps "$whl" || echo "could not install $whl"
      fi
    done
  fi
  if python3 -c "import gsplat" 2>/dev/null; then
    echo "gsplat $(python3 -c 'import gsplat; print(gsplat.__version__)'): building its CUDA extension in the background"
    MAX_JOBS=6 TORCH_CUDA_ARCH_LIST=9.0 setsid nohup timeout 420 python3 -c \
      "from gsplat.cuda._backend import _C; print('gsplat extension:', _C)" \
      >"$OUTDIR/gsplat_build.log" 2>&1 </dev/null &
  else
    echo "gsplat is not importable: the report will say so"
  fi
  return 0
}

gc_backends() {
  python3 - <<'EOF'
import frontiers_fast
b = frontiers_fast.backends()
print(b)
for name, info in b.items():
    print(f"  {name:10s} {'yes' if info['available'] else 'NO ':3s}  {info['why']}")
missing = [n for n in ("cuda", "triton", "cpp") if not b[n]["available"]]
if missing:
    raise SystemExit(f"unavailable on a GPU machine: {missing}")
EOF
}

gc_cuda_ext() {
  # Poisoned outputs (NaN, arg -2) make an unwritten element a mismatch.
  FRONTIERS_FAST_DEBUG_POISON=1 python3 - <<'EOF'
"""spmm_fwd's cuda backend (csrc/gnn/spmm.cu) against the reference backend of
the same op, then its speed against the triton backend and cuSPARSE."""
import torch
import frontiers_fast as ff
from frontiers_fast._reduce import REDUCES

op = torch.ops.frontiers_fast.spmm_fwd
dev = "cuda"
gen = torch.Generator(device="cpu").manual_seed(0)
# normalised max error allowed per dtype (max |out - ref| / (1 + max |ref|))
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def csr(n_dst, n_src, avg_deg, skew):
    if skew:  # a few hub rows with thousands of edges, many empty rows
        deg = (torch.rand(n_dst, generator=gen) ** 6 * avg_deg * 7).long()
    else:
        deg = torch.randint(0, 2 * avg_deg + 1, (n_dst,), generator=gen)
    rowptr = torch.zeros(n_dst + 1, dtype=torch.int64)
    rowptr[1:] = deg.cumsum(0)
    col = torch.randint(0, max(n_src, 1), (int(rowptr[-1]),), generator=gen)
    return rowptr.to(dev), col.to(dev)


checked, bad = 0, []
graphs = [(1, 1, 0, False), (5, 3, 40, False), (37, 50, 3, False), (2000, 900, 12, True)]
for n_dst, n_src, avg, skew in graphs:
    rowptr, col = csr(n_dst, n_src, avg, skew)
    E = col.numel()
    perm = torch.randperm(E, generator=gen).to(dev)
    for F in (1, 33, 130, 600):
        for hw in (0, 1, 3):
            if hw and F % hw:
                continue
            for dtype in TOL:
                for code, reduce in enumerate(REDUCES):
                    extremum = reduce in ("max", "min")
                    if extremum:  # few distinct values, so ties are common
                        x = torch.randint(-3, 4, (n_src, F), generator=gen).to(dev, dtype)
                        w = torch.randint(-1, 3, (E, hw), generator=gen).to(dev, dtype) if hw else None
                    else:
                        x = torch.randn(n_src, F, generator=gen).to(dev, dtype)
                        w = torch.rand(E, hw, generator=gen).to(dev, dtype) if hw else None
                    for widx in (None, perm) if hw else (None,):
                        out, arg = op(rowptr, col, w, widx, x, code, "cuda")
                        if extremum:  # exact: same messages, same first-edge rule
                            ref_out, ref_arg = op(rowptr, col, w, widx, x, code, "reference")
                            ok = torch.equal(out, ref_out) and torch.equal(arg, ref_arg)
                            err = "exact mismatch"
                        else:
                            w64 = None if w is None else w.double()
                            ref_out, _ = op(rowptr, col, w64, widx, x.double(), code, "reference")
                            e = ((out.double() - ref_out).abs().max() / (1 + ref_out.abs().max())).item() if out.numel() else 0.0
                            ok = e <= TOL[dtype] and arg.numel() == 0
                            err = f"normalised error {e:.2e}"
                        checked += 1
                        if not ok:
                            bad.append(f"N_dst={n_dst} E={E} F={F} Hw={hw} index={widx is not None} {dtype} {reduce}: {err}")

# NaN: the first NaN edge is the extremum, as on every other backend
rowptr, col = csr(300, 300, 8, True)
x = torch.randn(300, 64, device=dev)
x[5, 3] = float("nan")
for code in (2, 3):
    out, arg = op(rowptr, col, None, None, x, code, "cuda")
    ref_out, ref_arg = op(rowptr, col, None, None, x, code, "reference")
    checked += 1
    if not (torch.equal(arg, ref_arg) and torch.equal(out.isnan(), ref_out.isnan())):
        bad.append(f"NaN pattern differs for reduce {REDUCES[code]}")
# a side stream must give the same answer
ref_out, _ = op(rowptr, col, None, None, x, 0, "cuda")
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    side, _ = op(rowptr, col, None, None, x, 0, "cuda")
s.synchronize()
checked += 1
if not torch.equal(side.nan_to_num(), ref_out.nan_to_num()):
    bad.append("result on a side stream differs")
# validation errors name the argument
try:
    torch.ops.frontiers_fast_native.spmm_fwd(rowptr, col, None, None, x.cpu(), 0)
    bad.append("a CPU x was accepted")
except (RuntimeError, NotImplementedError) as exc:
    print("expected error:", str(exc).splitlines()[0])
torch.cuda.synchronize()
print(f"spmm_fwd (cuda): {checked - len(bad)}/{checked} cases agree with the reference")
for line in bad[:40]:
    print("MISMATCH", line)

# --- speed, same inputs, results checked first ---------------------------
print(f"\ntimings on {torch.cuda.get_device_name()} (median ms of 30, CUDA events)")


def median_ms(fn, reps=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


print(f"{'case':38s} {'cuda':>10s} {'triton':>10s} {'cusparse':>10s}")
for n, deg, F, skew in ((100_000, 16, 64, False), (100_000, 16, 256, False), (200_000, 10, 128, True)):
    rowptr, col = csr(n, n, deg, skew)
    x = torch.randn(n, F, device=dev)
    for code in (0, 2):
        run = lambda b: op(rowptr, col, None, None, x, code, b)
        row = [median_ms(lambda: run("cuda"))]
        ref_out = run("cuda")[0]
        try:
            agree = torch.allclose(run("triton")[0], ref_out, rtol=1e-4, atol=1e-4)
            row.append(median_ms(lambda: run("triton")) if agree else "mismatch")
        except Exception as exc:
            row.append(f"err {type(exc).__name__}")
        if code == 0:
            A = torch.sparse_csr_tensor(rowptr, col, torch.ones(col.numel(), device=dev), (n, n))
            agree = torch.allclose(A @ x, ref_out, rtol=1e-4, atol=1e-4)
            row.append(median_ms(lambda: A @ x) if agree else "mismatch")
        else:
            row.append("-")
        cells = [f"{v:10.3f}" if isinstance(v, float) else f"{v:>10s}" for v in row]
        print(f"{f'N={n} E={col.numel()} F={F} {REDUCES[code]}' + (' skew' if skew else ''):38s} " + " ".join(cells))

if bad:
    raise SystemExit(f"{len(bad)} mismatches")
EOF
  local rc=$?
  # selective_scan's cuda backend (csrc/ssm/scan.cu, forward only) against the reference backend
  FRONTIERS_FAST_DEBUG_POISON=1 python3 - <<'EOF2' || rc=1
import torch
op = torch.ops.frontiers_fast.selective_scan
dev = "cuda"
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
bad, checked = [], 0
for batch, dim, N, L in ((2, 6, 3, 1), (2, 40, 17, 301), (1, 64, 16, 2049)):
    for layout in ("constant", "variable", "grouped"):
        for dtype in TOL:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            g = torch.Generator(device="cpu").manual_seed(checked)
            r = lambda *s: torch.randn(*s, generator=g)
            u, dt, z = r(batch, dim, L), r(batch, dim, L), r(batch, dim, L)
            A = -(torch.rand(dim, N, generator=g) + 0.2)
            shape = {"constant": (dim, N), "variable": (batch, N, L), "grouped": (batch, 2, N, L)}[layout]
            B, C = r(*shape), r(*shape)
            D, bias, h0 = r(dim), r(dim) * 0.5, r(batch, dim, N)
            cast = lambda t, k: (t.to(acc) if k else t.to(dtype)).to(dev)
            args = [cast(u, 0), cast(dt, 0), cast(A, 1), cast(B, B.dim() == 2), cast(C, C.dim() == 2),
                    cast(D, 1), cast(z, 0), cast(bias, 1), True, cast(h0, 1), None]
            out, last = op(*args, "cuda")
            ref = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
            rout, rlast = op(*ref, "reference")
            e = ((out.double() - rout).abs().max() / (1 + rout.abs().max())).item()
            el = ((last.double() - rlast).abs().max() / (1 + rlast.abs().max())).item()
            checked += 1
            if not (e <= TOL[dtype] and el <= TOL[torch.float32 if dtype != torch.float64 else dtype]):
                bad.append(f"b{batch} d{dim} N{N} L{L} {layout} {dtype}: out err {e:.2e}, last err {el:.2e}")
# packed sequences
u = torch.randn(1, 8, 300, device=dev)
cu = torch.tensor([0, 0, 1, 100, 300], device=dev)
args = [u, torch.randn_like(u), -torch.rand(8, 4, device=dev), torch.randn(1, 4, 300, device=dev),
        torch.randn(1, 4, 300, device=dev), None, None, None, True, torch.randn(4, 8, 4, device=dev), cu]
out, last = op(*args, "cuda")
rout, rlast = op(*args, "reference")
checked += 1
if not (torch.allclose(out, rout, rtol=1e-4, atol=1e-4) and torch.allclose(last, rlast, rtol=1e-4, atol=1e-4)):
    bad.append("packed sequences differ")
print(f"selective_scan (cuda): {checked - len(bad)}/{checked} cases agree with the reference")
for line in bad:
    print("MISMATCH", line)


def median_ms(fn, reps=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


for batch, dim, L in ((2, 256, 2048), (8, 2048, 2048)):
    u = torch.randn(batch, dim, L, device=dev, dtype=torch.bfloat16)
    args = [u, torch.rand_like(u) * 0.1, -torch.rand(dim, 16, device=dev), torch.randn(batch, 16, L, device=dev,
            dtype=torch.bfloat16), torch.randn(batch, 16, L, device=dev, dtype=torch.bfloat16),
            torch.randn(dim, device=dev), u, None, False, None, None]
    t = {b: median_ms(lambda b=b: op(*args, b)) for b in ("cuda", "triton")}
    print(f"scan fwd bf16 b{batch} d{dim} N16 L{L}: cuda {t['cuda']:.3f} ms, triton {t['triton']:.3f} ms")
if bad:
    raise SystemExit(1)
EOF2
  # moe_route / moe_permute's cuda backend (csrc/moe/route.cu, forward only) against the reference
  FRONTIERS_FAST_DEBUG_POISON=1 python3 - <<'EOF3' || rc=1
import torch
from frontiers_fast.reference import moe as ref
route, permute = torch.ops.frontiers_fast.moe_route, torch.ops.frontiers_fast.moe_permute
dev = "cuda"
bad, checked = [], 0
# (T, E, k, scoring, bias, n_group, topk_group): Mixtral, Qwen3-MoE and DeepSeek-V3 routers, odd sizes
cases = [(1, 8, 2, "softmax", False, None, None), (129, 8, 2, "softmax", False, None, None),
         (7, 128, 8, "softmax", False, None, None), (333, 256, 8, "sigmoid", True, 8, 4),
         (64, 64, 6, "softmax", False, 8, 3)]
for T, E, k, scoring, use_bias, ng, tg in cases:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        logits = (torch.randn(T, E) * 2).to(dev, dtype)
        logits[:, 3] = float("-inf")  # a masked expert
        bias = torch.randn(E, device=dev) * 0.1 if use_bias else None
        w, ids = route(logits, k, scoring, True, bias, ng, tg, 2.5, "cuda")
        rb = None if bias is None else bias.double().cpu()
        rw, rids = ref.moe_route(logits.double().cpu(), k, scoring, True, rb, ng, tg, 2.5)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        checked += 1
        if not (torch.equal(ids.cpu(), rids) and torch.allclose(w.cpu().double(), rw, rtol=tol, atol=tol)):
            bad.append(f"route T={T} E={E} k={k} {scoring} bias={use_bias} groups={ng} {dtype}")
        for H in (1, 19, 64):
            x = torch.randn(T, H, device=dev, dtype=dtype)
            for idt in (torch.int32, torch.int64):
                xp, off, rm = permute(x, ids.to(idt), E, "cuda")
                wxp, woff, wrm = ref.moe_permute(x.cpu(), ids.cpu(), E)
                checked += 1
                if not (torch.equal(xp.cpu(), wxp) and torch.equal(off.cpu(), woff) and torch.equal(rm.cpu(), wrm)):
                    bad.append(f"permute T={T} E={E} k={k} H={H} {dtype} {idt}")
try:
    route(torch.tensor([[0.0, float("nan")]], device=dev), 1, "softmax", True, None, None, None, 1.0, "cuda")
    bad.append("NaN logits were accepted")
except ValueError as exc:
    print("expected error:", exc)
print(f"moe_route / moe_permute (cuda): {checked - len(bad)}/{checked} cases agree with the reference")
for line in bad:
    print("MISMATCH", line)


def median_ms(fn, reps=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


# Eager calls: each figure includes the host read of the value checks (one for cuda; triton's own).
for T in (16, 4096):
    logits = torch.randn(T, 256, device=dev, dtype=torch.bfloat16)
    bias = torch.randn(256, device=dev) * 0.1
    x = torch.randn(T, 4096, device=dev, dtype=torch.bfloat16)
    ids = route(logits, 8, "sigmoid", True, bias, 8, 4, 2.5, "cuda")[1]
    t = {b: median_ms(lambda b=b: route(logits, 8, "sigmoid", True, bias, 8, 4, 2.5, b)) for b in ("cuda", "triton")}
    print(f"route DeepSeek-V3 T={T} E256 k8 bf16: cuda {t['cuda']:.3f} ms, triton {t['triton']:.3f} ms")
    t = {b: median_ms(lambda b=b: permute(x, ids, 256, b)) for b in ("cuda", "triton")}
    print(f"permute T={T} H4096 E256 k8 bf16: cuda {t['cuda']:.3f} ms, triton {t['triton']:.3f} ms")
if bad:
    raise SystemExit(1)
EOF3
  return $rc
}

gc_moe_tests() {
  # The MoE family's GPU tests: the CUDA extension's routing and permutation
  # (tests/moe/test_cuda.py, with its CUDA-graph capture) and the Triton
  # launchers compiled for CUDA (tests/moe/test_triton.py, with the fused-MoE
  # capture).  Run before the whole suite, so that they get their time.
  python3 -m pytest tests/moe/test_cuda.py tests/moe/test_triton.py -q -rfE --maxfail=50 -p no:cacheprovider \
    --junitxml="$OUTDIR/junit_moe.xml"
}

gc_tests() {
  # The MoE GPU tests ran in their own step (gc_moe_tests).
  python3 -m pytest tests -q -rfE --maxfail=50 -p no:cacheprovider --junitxml="$OUTDIR/junit.xml" \
    --ignore=tests/moe/test_cuda.py --ignore=tests/moe/test_triton.py
}

gc_bench() {
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of flags
  python3 -m frontiers_fast.bench --device cuda --out "$OUTDIR/report" ${GPU_CHECK_BENCH_ARGS:-}
}

gc_copy_report() {
  if [[ ! -d "$OUTDIR/report" ]] || [[ -z "$(ls -A "$OUTDIR/report" 2>/dev/null)" ]]; then
    echo "no report in $OUTDIR/report"
    return 1
  fi
  # Keep a copy beside the other results, named after the GPU.
  local gpu dest
  gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')"
  dest="$ROOT/benchmarks/results/${gpu:-gpu}"
  mkdir -p "$dest" && cp -r "$OUTDIR/report/." "$dest/"
  echo "report copied to $dest:"
  find "$OUTDIR/report" -type f -printf '  %P (%s bytes)\n' | LC_ALL=C sort
  local md
  md="$(find "$OUTDIR/report" -name '*.md' -type f | LC_ALL=C sort | head -n 1)"
  if [[ -n "$md" ]]; then
    echo
    head -n 60 "$md"
  fi
}

export -f gc_versions gc_peers gc_build gc_backends gc_cuda_ext gc_moe_tests gc_tests gc_bench gc_copy_report

# --- the run -----------------------------------------------------------------
echo "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET_S}s, logs in $OUTDIR"
# name, nominal timeout, own minimum, time kept for the later steps (the sum
# of their minimums)
step nvidia_smi 20 10 430 nvidia-smi
step versions 60 20 410 bash -c gc_versions
step peers 30 10 400 bash -c gc_peers
step build 300 110 290 bash -c gc_build
step backends 60 20 270 bash -c gc_backends
step cuda_ext 100 40 230 bash -c gc_cuda_ext
step moe_tests 120 30 200 bash -c gc_moe_tests
step tests 240 110 90 bash -c gc_tests
step bench 200 80 10 bash -c gc_bench
step copy_report 20 10 0 bash -c gc_copy_report

{
  echo
  echo "=== summary ($((SECONDS))s of ${BUDGET_S}s budget) ==="
  printf '%-12s  %-24s  %7s\n' step status seconds
  for row in "${SUMMARY[@]}"; do
    IFS='|' read -r name status took <<<"$row"
    printf '%-12s  %-24s  %7s\n' "$name" "$status" "$took"
  done
  for junit in junit_moe.xml junit.xml; do
    [[ -f "$OUTDIR/$junit" ]] || continue
    python3 - "$OUTDIR/$junit" <<'EOF' 2>/dev/null || true
import os, sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
f = {k: s.get(k, "?") for k in ("tests", "failures", "errors", "skipped", "time")}
f["name"] = os.path.basename(sys.argv[1])
print("{name}: {tests} run, {failures} failed, {errors} errors, {skipped} skipped, {time}s".format(**f))
EOF
  done
} | tee "$OUTDIR/summary.txt"

exit $((FAILED > 0 ? 1 : 0))

"""The one op pattern: registry, backend choice, and how the choice travels.

A forced backend must be honoured in eager mode, inside a compiled graph and
in the backward, or refused with an error naming the function; the spy on
the registry counts which implementation actually ran.
"""

import ast
import inspect
import pathlib
import re
import threading

import pytest
import torch

import frontiers_fast as ff
from frontiers_fast import _backend, _reduce
from frontiers_fast.ops import deq as deq_ops
from frontiers_fast.reference import gnn as ref

from .gnn.graphs import random_graph
from .helpers import assert_close, spy_backends

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _spmm_inputs():
    g = random_graph(40, 300)
    _ = g.csc
    x = torch.randn(40, 6, requires_grad=True)
    w = (torch.rand(g.num_edges) + 0.5).requires_grad_(True)
    return g, x, w


def _ran(calls):
    return {k for k, v in calls.items() if v}


# ---------------------------------------------------------------------------
# a forced backend is honoured: eager, compiled, backward
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("forced", ["reference", "cpp"])
def test_forced_backend_eager_and_backward(forced):
    g, x, w = _spmm_inputs()
    with spy_backends() as calls:
        out = ff.spmm(g, x, w, "max", backend=forced)
        out.sum().backward()
    assert _ran(calls) == {("spmm_fwd", forced), ("spmm_bwd", forced)}
    assert_close(out, ref.spmm(g, x, w, "max"))


@pytest.mark.parametrize("forced", ["reference", "cpp"])
def test_forced_backend_inside_compile_and_its_backward(forced):
    torch._dynamo.reset()
    g, x, w = _spmm_inputs()
    fn = torch.compile(
        lambda x, w: ff.spmm(g, x, w, "mean", backend=forced), fullgraph=True, backend="aot_eager"
    )
    with spy_backends() as calls:
        out = fn(x, w)
        out.sum().backward()
    assert _ran(calls) == {("spmm_fwd", forced), ("spmm_bwd", forced)}


def test_use_backend_and_environment_reach_compiled_graphs(monkeypatch):
    g, x, w = _spmm_inputs()
    for how in ("block", "env"):
        torch._dynamo.reset()
        fn = torch.compile(lambda x, w: ff.sddmm(g, x.view(40, 2, 3), x.view(40, 2, 3)).sum() + ff.spmm(g, x, w).sum(),
                           fullgraph=True, backend="aot_eager")  # fmt: skip
        with spy_backends() as calls:
            if how == "block":
                with ff.use_backend("reference"):
                    fn(x, w).backward()
            else:
                monkeypatch.setenv("FRONTIERS_FAST_BACKEND", "reference")
                fn(x, w).backward()
                monkeypatch.delenv("FRONTIERS_FAST_BACKEND")
        assert {b for _, b in _ran(calls)} == {"reference"}, how
        assert ("spmm_bwd", "reference") in _ran(calls)


def test_default_is_the_fast_backend_in_forward_and_backward():
    g, x, w = _spmm_inputs()
    with spy_backends() as calls:
        ff.gat_aggregate(g, x.view(40, 2, 3), x[:, :2], x[:, 2:4]).sum().backward()
    assert _ran(calls) == {("gat_fwd", "cpp"), ("gat_bwd", "cpp")}


def test_use_backend_is_per_thread():
    g, x, _ = _spmm_inputs()
    seen = {}

    def other():
        with spy_backends() as calls:
            ff.spmm(g, x.detach())
        seen.update(calls)

    with ff.use_backend("reference"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert ("spmm_fwd", "cpp") in seen and ("spmm_fwd", "reference") not in seen


# ---------------------------------------------------------------------------
# a backend an op does not have is refused, naming it
# ---------------------------------------------------------------------------
def test_cuda_on_a_function_without_a_cuda_kernel_raises():
    g, x, w = _spmm_inputs()
    with pytest.raises(
        NotImplementedError, match=r"frontiers_fast\.sddmm: backend 'cuda' is not implemented"
    ):
        ff.sddmm(g, x.view(40, 2, 3), x.view(40, 2, 3), backend="cuda")
    # spmm has a CUDA forward but no CUDA backward: refused when a graph is recorded
    with pytest.raises(NotImplementedError, match=r"frontiers_fast\.spmm: backend 'cuda'.*for its backward"):
        ff.spmm(g, x, w, backend="cuda")
    # a function with no C++ kernel yet (the fixed-point updates)
    with pytest.raises(NotImplementedError, match=r"broyden_matvec.*'cpp' is not implemented.*reference"):
        deq_ops.broyden_matvec(
            torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.zeros(2, 3), 0, backend="cpp"
        )
    # the scan's CUDA kernel is a forward only
    u = torch.randn(1, 2, 3, requires_grad=True)
    with pytest.raises(NotImplementedError, match=r"selective_scan: backend 'cuda'.*for its backward"):
        ff.selective_scan(
            u, u.abs(), -torch.rand(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3), backend="cuda"
        )


def test_a_process_wide_force_is_a_force(monkeypatch):
    monkeypatch.setenv("FRONTIERS_FAST_BACKEND", "cpp")
    with pytest.raises(NotImplementedError, match="broyden_matvec"):
        deq_ops.broyden_matvec(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.zeros(2, 3), 0)


def test_direct_op_calls_are_checked():
    g, x, _ = _spmm_inputs()
    ops = torch.ops.frontiers_fast
    h = torch.randn(40, 2, 3)
    with pytest.raises(
        NotImplementedError, match=r"frontiers_fast::sddmm_fwd: backend 'cuda' is not implemented"
    ):
        ops.sddmm_fwd(g.rowptr, g.col, h, h, "cuda")
    with pytest.raises(ValueError, match=r"frontiers_fast::spmm_fwd: backend 'triton' runs on CUDA tensors"):
        ops.spmm_fwd(g.rowptr, g.col, None, None, x.detach(), 0, "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.spmm_fwd(g.rowptr, g.col, None, None, x.detach(), 0, "fast")


# ---------------------------------------------------------------------------
# resolve's default branch honours what a function implements
# ---------------------------------------------------------------------------
@pytest.fixture
def fake_function(monkeypatch):
    """A function whose one op implements only the given backends, all of them available."""

    def make(impls):
        monkeypatch.setattr(_backend, "_resolved", {})  # choices are cached per function name
        info = _backend.OpInfo("_test_op", {b: (lambda *a: None) for b in impls})
        for b in impls:
            info._seen[b] = (True, "test")
        monkeypatch.setitem(_backend.OPS, "_test_op", info)
        monkeypatch.setitem(_backend.FUNCTIONS, "_test_fn", _backend.FunctionInfo("_test_fn", ("_test_op",)))
        return "_test_fn"

    return make


def test_default_picks_an_implemented_backend(fake_function):
    cuda = torch.device("cuda")  # resolve reads only the device type; no GPU needed
    assert _backend.resolve(None, cuda, fake_function(("cuda", "reference"))) == "cuda"
    assert _backend.resolve(None, cuda, fake_function(("triton", "cuda", "reference"))) == "triton"
    assert _backend.resolve(None, cuda, fake_function(("reference",))) == "reference"
    assert _backend.resolve(None, torch.device("cpu"), fake_function(("triton", "reference"))) == "reference"
    assert _backend.resolve(None, torch.device("cpu"), fake_function(("cpp", "reference"))) == "cpp"


def test_an_unavailable_default_warns_once_and_runs_the_reference(fake_function):
    name = fake_function(("cpp", "reference"))
    _backend.OPS["_test_op"]._seen["cpp"] = (False, "not built in this test")
    _backend._warned.discard(name)
    with pytest.warns(RuntimeWarning, match="not built in this test"):
        assert _backend.resolve(None, torch.device("cpu"), name) == "reference"
    with pytest.raises(RuntimeError, match="unavailable: .*not built in this test"):
        _backend.resolve("cpp", torch.device("cpu"), name)


def test_unsupported_device_is_refused(fake_function):
    with pytest.raises(ValueError, match="not supported"):
        _backend.resolve(None, torch.device("mps"), fake_function(("reference",)))


# ---------------------------------------------------------------------------
# the registry and the native library agree
# ---------------------------------------------------------------------------
def test_every_op_is_complete():
    for name, info in _backend.OPS.items():
        qual = f"frontiers_fast::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Meta"), f"{qual} has no fake"
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, key), f"{qual} has no {key} router"
        assert info.uses or "reference" in info.impls, f"{qual} has no reference implementation"
        for b in ("cpp", "cuda"):
            if b in info.impls and _backend.available(b):
                key = "CPU" if b == "cpp" else "CUDA"
                assert torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"frontiers_fast_native::{name}", key
                ), f"{name} declares {b} but frontiers_fast._C registers no {key} kernel for it"


def test_every_native_kernel_belongs_to_a_declared_op():
    _backend._probe()
    native = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("frontiers_fast_native::")]
    assert native, "frontiers_fast._C registered nothing"
    for qual in native:
        name = qual.split("::")[1]
        assert name in _backend.OPS, f"{qual} is registered by the C++ library but no op declares it"
        for key, b in (("CPU", "cpp"), ("CUDA", "cuda")):
            if torch._C._dispatch_has_kernel_for_dispatch_key(qual, key):
                assert b in _backend.OPS[name].impls, (
                    f"{qual} has a {key} kernel the op does not declare ({b})"
                )


def test_every_function_registers_its_ops():
    for name, spec in _backend.FUNCTIONS.items():
        assert spec.ops, name
        assert all(o in _backend.OPS for o in spec.ops + spec.grad_ops), name


def test_cuda_probe_is_the_library_flag():
    native = pytest.importorskip("frontiers_fast._C")
    assert isinstance(native.with_cuda, bool)
    assert ff.backends()["cuda"]["available"] == native.with_cuda
    probe = inspect.getsource(_backend._probe)
    named = [op for op in _backend.OPS if re.search(rf"\b{op}\b", probe)]
    assert not named, f"the backend probe must not depend on one family's op, but names {named}"


def test_backends_per_function_and_op():
    spmm = ff.backends(op="spmm")
    assert spmm["cpp"] == {"implemented": True, "backward": True, "available": True, "why": "loaded"}
    assert spmm["cuda"]["implemented"] and not spmm["cuda"]["backward"]
    assert ff.backends(op="frontiers_fast::spmm_fwd")["cuda"]["implemented"]
    assert not ff.backends(op="sddmm")["cuda"]["implemented"]
    assert ff.backends(op="selective_scan")["reference"]["available"]
    with pytest.raises(KeyError, match="no such function"):
        ff.backends(op="matmul")


# ---------------------------------------------------------------------------
# one encoding of reduce; one build rule
# ---------------------------------------------------------------------------
def test_reduce_codes_match_the_cpp_header():
    text = (ROOT / "csrc" / "common" / "reduce.h").read_text()
    enum = re.search(r"enum class Reduce : int \{([^}]*)\}", text).group(1)
    pairs = [tuple(p.split("=")) for p in enum.replace(" ", "").split(",")]
    assert [(n, int(v)) for n, v in pairs] == [
        ("k" + r.capitalize(), i) for i, r in enumerate(_reduce.REDUCES)
    ]
    assert f"kNumReduces = {len(_reduce.REDUCES)}" in text
    assert [_reduce.reduce_code(r) for r in _reduce.REDUCES] == list(range(4))


def _native_sources():
    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "native_sources")
    ns = {}
    module = ast.fix_missing_locations(
        ast.Module(body=[ast.Import(names=[ast.alias("os")]), fn], type_ignores=[])
    )
    exec(compile(module, "setup.py", "exec"), ns)
    return ns["native_sources"]


def test_setup_builds_every_source_and_refuses_unknown_files(tmp_path):
    native_sources = _native_sources()
    cpu, cuda = native_sources(str(ROOT / "csrc"))
    on_disk = {p.resolve() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu")}
    assert {pathlib.Path(p).resolve() for p in cpu + cuda} == on_disk
    root = tmp_path / "csrc"
    (root / "fam").mkdir(parents=True)
    (root / "init.cpp").write_text("")
    (root / "fam" / "k_cpu.cpp").write_text("")
    (root / "fam" / "k.cu").write_text("")
    (root / "fam" / "k_cuda.cpp").write_text("")
    (root / "fam" / "k.h").write_text("")
    cpu, cuda = native_sources(str(root))
    assert len(cpu) == 2 and len(cuda) == 2
    (root / "fam" / "helpers.cpp").write_text("")
    with pytest.raises(SystemExit, match=r"helpers\.cpp"):
        native_sources(str(root))


def test_first_call_of_a_process_may_be_inside_a_compiled_graph():
    # Nothing is imported or probed lazily on the first call: a fresh process
    # whose first frontiers_fast call is traced with fullgraph=True works.
    import subprocess
    import sys

    code = (
        "import torch, frontiers_fast as ff\n"
        "g = ff.Graph(torch.tensor([[0, 1, 2], [1, 2, 0]]), 3)\n"
        "f = torch.compile(lambda x: ff.spmm(g, x, reduce='max').sum(), fullgraph=True, backend='aot_eager')\n"
        "x = torch.randn(3, 4, requires_grad=True)\n"
        "f(x).backward()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_a_force_changed_after_compiling_is_honoured():
    torch._dynamo.reset()
    g, x, _ = _spmm_inputs()
    x = x.detach()
    fn = torch.compile(lambda x: ff.spmm(g, x, reduce="max"), fullgraph=True, backend="aot_eager")
    fn(x)  # traced under the default
    with spy_backends() as calls, ff.use_backend("reference"):
        fn(x)
    assert _ran(calls) == {("spmm_fwd", "reference")}
    with spy_backends() as calls:
        fn(x)
    assert _ran(calls) == {("spmm_fwd", "cpp")}

    def inner(x):
        with ff.use_backend("reference"):
            return ff.spmm(g, x)

    with spy_backends() as calls:
        torch.compile(inner, backend="aot_eager")(x)
    assert _ran(calls) == {("spmm_fwd", "reference")}


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_double_backward_is_refused_not_zero(backend):
    g, x, w = _spmm_inputs()
    out = ff.spmm(g, x, w, backend=backend)
    with pytest.raises(NotImplementedError, match=r"frontiers_fast::spmm: double backward"):
        torch.autograd.grad(out.pow(2).sum(), (x, w), create_graph=True)
    u = torch.randn(1, 2, 3, requires_grad=True)
    y = ff.selective_scan(u, u.abs().detach(), -torch.rand(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3))
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(y.pow(2).sum(), u, create_graph=True)


def test_gat_lse_is_not_differentiable():
    g, _, _ = _spmm_inputs()
    h = torch.randn(40, 2, 3, requires_grad=True)
    a = torch.randn(40, 2, requires_grad=True)
    out, lse = torch.ops.frontiers_fast.gat_aggregate(g.rowptr, g.col, *g.csc, h, a, a, 0.2, "reference")
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("which", ["none", "eid", "arange"])
def test_reference_spmm_bwd_reads_the_transposed_weight_index(which):
    g, x, _ = _spmm_inputs()
    x = x.detach()
    w = torch.rand(g.num_edges, 1)
    go = torch.randn(g.num_dst, 6)
    cwid = {"none": None, "eid": g.csc_eid, "arange": torch.arange(g.num_edges)}[which]
    args = (*g.csc, g.rowptr, g.col, w, g.perm, cwid, x, go, torch.empty(0, dtype=torch.long), 0, True, True)
    got = torch.ops.frontiers_fast.spmm_bwd(*args, "reference")
    want = torch.ops.frontiers_fast.spmm_bwd(*args, "cpp")
    for a, b in zip(got, want):
        assert_close(a, b)


def test_fallback_warning_survives_a_compiled_first_call(fake_function, monkeypatch):
    name = fake_function(("cpp", "reference"))
    _backend.OPS["_test_op"]._seen["cpp"] = (False, "not built in this test")
    _backend._warned.discard(name)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _backend.resolve(None, torch.device("cpu"), name) == "reference"  # no warning while tracing
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with pytest.warns(RuntimeWarning, match="not built in this test"):
        assert _backend.resolve(None, torch.device("cpu"), name) == "reference"

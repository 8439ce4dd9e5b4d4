"""python -m frontiers_fast.bench [--family gnn] [--device cpu|cuda] [--quick] [--out DIR]"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from . import FAMILIES
from .harness import Family, machine_name, measure_roofs
from .report import write


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m frontiers_fast.bench", description=__doc__)
    p.add_argument(
        "--family", choices=FAMILIES, action="append", help="family to run (repeatable; default all)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller graphs and fewer repeats (a smoke run)")
    p.add_argument("--out", default=None, help="output folder (default reports/<device>)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("reports", args.device)
    machine = machine_name(args.device)
    print(f"frontiers_fast bench on {machine}", flush=True)
    os.makedirs(out, exist_ok=True)
    print("measuring the roofs (GEMM, exp, memory read)", flush=True)
    rates = measure_roofs(args.device, args.quick)
    for kind, v in rates.items():
        print(f"  {kind:<10} {v:.3g}", flush=True)
    results, targets, sections = [], {}, []
    for fam in args.family or FAMILIES:
        mod = importlib.import_module(f"frontiers_fast.bench.{fam}")
        torch.manual_seed(0)  # layers initialised from the global generator: same weights every run
        bench = Family(fam, results, args.device, args.quick, 0.2 if args.quick else 0.5, rates)
        # A family may return extra report sections [(title, markdown)], and
        # write files they link to (a render, a plot) into ``out_dir``.
        extra = mod.run(bench, out_dir=out)
        sections += [(fam, title, body) for title, body in (extra or [])]
        targets[fam] = mod.TARGETS
    path, checks = write(results, targets, args.device, machine, out, extra_sections=sections, rates=rates)
    print(f"\nwrote {path}")
    for desc, ratio, speed, mratio, mem, passed in checks:
        rs = f"{ratio:.2f}x" if ratio is not None else "n/a"
        mr = f"{mratio:.1f}x" if mratio is not None else "n/a"
        ms = f", memory {mr} (target {mem}x)" if mem else ""
        print(f"  {'met   ' if passed else 'MISSED'} {desc}: {rs} (target {speed}x){ms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

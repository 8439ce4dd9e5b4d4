"""Write <out>/report.md, results.json and one plot per family (plot_<family>.png)."""

from __future__ import annotations

import datetime
import json
import os
from collections import OrderedDict

import torch

from .harness import ROOFS


def _ours(provider):
    return provider.startswith("frontiers_fast")


def _by_case(results):
    cases = OrderedDict()
    for r in results:
        cases.setdefault((r.family, r.case, r.mode), []).append(r)
    return cases


def _families(results):
    fams = OrderedDict()
    for key, rows in _by_case(results).items():
        fams.setdefault(key[0], []).append((key, rows))
    return fams


def best_ours(rows):
    ok = [r for r in rows if _ours(r.provider) and r.status == "ok" and r.ms is not None]
    return min(ok, key=lambda r: r.ms) if ok else None


def _peers(rows):
    return [r for r in rows if not _ours(r.provider) and r.status == "ok" and r.ms is not None]


def check_targets(results, targets):
    """[(description, ratio, target, mem_ratio, mem_target, passed)]"""
    out = []
    for (family, case, mode), rows in _by_case(results).items():
        for target in targets.get(family, []):
            # (prefix, ours, peer, speed-up, memory ratio[, mode]): the mode, when given, picks fwd or fwd+bwd
            prefix, ours_prefix, peer, speed, mem = target[:5]
            if not case.startswith(prefix) or (len(target) > 5 and target[5] != mode):
                continue
            mine = best_ours([r for r in rows if r.provider.startswith(ours_prefix)])
            # A tuple of peers: the faster of them is the one to beat (a library with two implementations).
            names = (peer,) if isinstance(peer, str) else tuple(peer)
            ok = [r for r in rows if r.provider in names and r.status == "ok"]
            theirs = min(ok, key=lambda r: r.ms) if ok else None
            if mine is None or theirs is None:
                out.append((f"{case}: ours vs {' / '.join(names)}", None, speed, None, mem, False))
                continue
            peer = theirs.provider if len(names) == 1 else f"{theirs.provider} (the faster of {len(names)})"
            ratio = theirs.ms / mine.ms
            mratio = None
            if mem is not None and mine.peak_mb and theirs.peak_mb:
                mratio = theirs.peak_mb / max(mine.peak_mb, 1e-9)
            passed = ratio >= speed and (mem is None or (mratio is not None and mratio >= mem))
            out.append((f"{case} ({mode}): {mine.provider} vs {peer}", ratio, speed, mratio, mem, passed))
    return out


def _fmt_rate(kind, v):
    if kind.startswith("gemm"):
        return f"{v / 1e12:.2f} TFLOP/s"
    if kind == "exp":
        return f"{v / 1e9:.2f} G/s"
    return f"{v / 1e9:.1f} GB/s"


def _summary(rows_by_case):
    """One line per case: our best, its fraction of the roof, and the speed-up over each peer."""
    lines = ["| case | mode | ours (ms) | of roof | speed-up over the peers |", "|---|---|---|---|---|"]
    for (_, case, mode), rows in rows_by_case:
        best = best_ours(rows)
        if best is None:
            continue
        roof = f"{best.roof_ms / best.ms:.0%}" if best.roof_ms else ""
        peers = ", ".join(f"{r.provider} {r.ms / best.ms:.2f}x" for r in _peers(rows)) or "(no peer)"
        lines.append(f"| {case} | {mode} | {best.ms:.3f} ({best.provider}) | {roof} | {peers} |")
    return lines


def write(results, targets, device, machine, out_dir, extra_sections=(), rates=None, stamp=None):
    """Write the report.  ``extra_sections``: (family or None, title, markdown), placed in the family's section.

    ``stamp``: when the results were measured (default: now).
    """
    os.makedirs(out_dir, exist_ok=True)
    stamp = stamp or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "device": device,
        "machine": machine,
        "date": stamp,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "roofs": rates or {},
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": [r.to_json() for r in results]}, f, indent=1)

    lines = [
        f"# frontiers_fast benchmark report ({device})",
        "",
        f"Machine: **{machine}**. torch {torch.__version__}, {torch.get_num_threads()} threads. {stamp}.",
        "",
        "Every figure below comes from one run of `python -m frontiers_fast.bench` in one process, "
        "on the same inputs for every provider, after checking each provider's output against the "
        "float64 reference (max error is norm-wise: max|ours - ref| / max|ref|, over the output "
        "and every gradient). Times are medians of repeats; "
        "*speed-up* is (provider time) / (our best time), so > 1 means we are faster. Peak memory is "
        "the peak of bytes allocated during one call above what was allocated before it. "
        "*Of roof* is the time the case's unavoidable work takes at the rates below divided by our "
        "best time (100% = at the roof).",
        "",
    ]
    if rates:
        lines += ["## Roofs measured in this run", "", "| roof | rate |", "|---|---|"]
        lines += [f"| {ROOFS[k]} | {_fmt_rate(k, v)} |" for k, v in rates.items()]
        lines += [""]
    checks = check_targets(results, targets)
    if checks:
        lines += [
            "## Targets",
            "",
            "| comparison | speed-up | target | memory ratio | target | |",
            "|---|---|---|---|---|---|",
        ]
        for desc, ratio, speed, mratio, mem, passed in checks:
            rs = f"{ratio:.2f}x" if ratio is not None else "n/a"
            ms = f"{mratio:.1f}x" if mratio is not None else ("n/a" if mem else "")
            lines.append(f"| {desc} | {rs} | >= {speed}x | {ms} | {f'>= {mem}x' if mem else ''} | "
                         f"{'met' if passed else '**MISSED**'} |")  # fmt: skip
        lines.append("")
    sections = list(extra_sections)
    for fam, rows_by_case in _families(results).items():
        lines += [f"## {fam}", ""]
        plot = _plot_family(fam, rows_by_case, out_dir, device)
        if plot:
            lines += [
                f"![{fam}: speed-up over each peer, and fraction of the roof]({os.path.basename(plot)})",
                "",
            ]
        lines += _summary(rows_by_case) + [""]
        for (_, case, mode), rows in rows_by_case:
            lines += _case_table(case, mode, rows)
        for sfam, title, body in sections:
            if sfam == fam:
                lines += [f"### {title}", "", body, ""]
    for sfam, title, body in sections:
        if sfam is None or sfam not in _families(results):
            lines += [f"## {title}", "", body, ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path, checks


def _case_table(case, mode, rows):
    best = best_ours(rows)
    lines = [
        f"### {case} ({mode})",
        "",
        "| provider | time (ms) | p20-p80 | speed-up | peak MB | max err | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = f"{r.ms:.3f}" if r.ms is not None else ""
        q = f"{r.ms_p20:.3f}-{r.ms_p80:.3f}" if r.ms is not None else ""
        sp = f"{r.ms / best.ms:.2f}x" if (best and r.ms and r is not best) else ("ours" if r is best else "")
        pm = f"{r.peak_mb:.1f}" if r.peak_mb is not None else ""
        er = f"{r.max_err:.1e}" if r.max_err is not None else ""
        lines.append(f"| {r.provider} | {t} | {q} | {sp} | {pm} | {er} | {r.status} |")
    return lines + [""]


def _plot_family(fam, rows_by_case, out_dir, device):
    """Horizontal bars, one group per case: our speed-up over each peer (log, 1x marked), and the roof fraction."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception:
        return None
    cases = [(key, rows, best_ours(rows)) for key, rows in rows_by_case if best_ours(rows)]
    if not cases:
        return None
    peers = sorted({r.provider for _, rows, _ in cases for r in _peers(rows)})
    roofs = any(best.roof_ms for _, _, best in cases)
    height = max(2.5, 0.55 * len(cases) * max(1, len(peers)) ** 0.5 + 1.2)
    fig, axes = plt.subplots(1, 2 if roofs else 1, figsize=(13 if roofs else 9, height), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]} if roofs else None)  # fmt: skip
    ax = axes[0][0]
    bar = 0.8 / max(1, len(peers))
    labels = [f"{case} ({mode})" for (_, case, mode), _, _ in cases]
    for j, peer in enumerate(peers):
        ys, xs = [], []
        for i, (_, rows, best) in enumerate(cases):
            r = next((r for r in _peers(rows) if r.provider == peer), None)
            if r:
                ys.append(i + j * bar)
                xs.append(r.ms / best.ms)
        ax.barh(ys, xs, bar, label=peer)
    ax.axvline(1.0, color="k", lw=1.0)
    ax.text(1.0, 1.0, " 1x", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    ax.set_xscale("log")
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("our best time vs the provider's (x, log; > 1: we are faster)")
    ax.set_yticks([i + bar * (len(peers) - 1) / 2 for i in range(len(cases))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    if peers:
        ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{fam} ({device}): speed-up")
    if roofs:
        rx = axes[0][1]
        fr = [(best.roof_ms / best.ms) if best.roof_ms else 0.0 for _, _, best in cases]
        rx.barh(range(len(cases)), fr, 0.6, color="tab:gray")
        rx.axvline(1.0, color="k", lw=1.0)
        rx.set_xlim(0, max(1.05, max(fr) * 1.1))
        rx.set_yticks(range(len(cases)))
        rx.set_yticklabels([])
        rx.invert_yaxis()
        rx.set_xlabel("fraction of the roof (1 = at the roof)")
        rx.set_title("our best vs its roof")
    fig.tight_layout()
    path = os.path.join(out_dir, f"plot_{fam}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Write reports/<device>/report.md, results.json and PNG plots."""

from __future__ import annotations

import datetime
import json
import os
from collections import OrderedDict

import torch


def _ours(provider):
    return provider.startswith("frontiers_fast")


def _by_case(results):
    cases = OrderedDict()
    for r in results:
        cases.setdefault((r.family, r.case, r.mode), []).append(r)
    return cases


def best_ours(rows):
    ok = [r for r in rows if _ours(r.provider) and r.status == "ok" and r.ms is not None]
    return min(ok, key=lambda r: r.ms) if ok else None


def check_targets(results, targets):
    """[(description, ratio, target, mem_ratio, mem_target, passed)]"""
    out = []
    for (family, case, _mode), rows in _by_case(results).items():
        for prefix, ours_prefix, peer, speed, mem in targets.get(family, []):
            if not case.startswith(prefix):
                continue
            mine = best_ours([r for r in rows if r.provider.startswith(ours_prefix)])
            theirs = next((r for r in rows if r.provider == peer and r.status == "ok"), None)
            if mine is None or theirs is None:
                out.append((f"{case}: ours vs {peer}", None, speed, None, mem, False))
                continue
            ratio = theirs.ms / mine.ms
            mratio = None
            if mem is not None and mine.peak_mb and theirs.peak_mb:
                mratio = theirs.peak_mb / max(mine.peak_mb, 1e-9)
            passed = ratio >= speed and (mem is None or (mratio is not None and mratio >= mem))
            out.append((f"{case}: {mine.provider} vs {peer}", ratio, speed, mratio, mem, passed))
    return out


def write(results, targets, device, machine, out_dir, extra_sections=()):
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "device": device,
        "machine": machine,
        "date": stamp,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
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
        "the peak of bytes allocated during one call above what was allocated before it.",
        "",
    ]
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
    family = None
    for (fam, case, mode), rows in _by_case(results).items():
        if fam != family:
            lines += [f"## {fam}", ""]
            family = fam
        best = best_ours(rows)
        lines += [f"### {case} ({mode})", "", "| provider | time (ms) | p20-p80 | speed-up | peak MB | max err | status |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            t = f"{r.ms:.3f}" if r.ms is not None else ""
            q = f"{r.ms_p20:.3f}-{r.ms_p80:.3f}" if r.ms is not None else ""
            sp = (
                f"{r.ms / best.ms:.2f}x"
                if (best and r.ms and r is not best)
                else ("ours" if r is best else "")
            )
            pm = f"{r.peak_mb:.1f}" if r.peak_mb is not None else ""
            er = f"{r.max_err:.1e}" if r.max_err is not None else ""
            lines.append(f"| {r.provider} | {t} | {q} | {sp} | {pm} | {er} | {r.status} |")
        lines.append("")
    for title, body in extra_sections:
        lines += [f"## {title}", "", body, ""]
    plot = _plot(results, out_dir, device)
    if plot:
        lines += ["## Plot", "", f"![speed-up]({os.path.basename(plot)})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path, checks


def _plot(results, out_dir, device):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    cases = [(k, rows) for k, rows in _by_case(results).items() if best_ours(rows)]
    if not cases:
        return None
    peers = sorted({r.provider for _, rows in cases for r in rows if not _ours(r.provider) and r.ms})
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cases)), 5))
    width = 0.8 / max(1, len(peers))
    for j, peer in enumerate(peers):
        xs, ys = [], []
        for i, (_, rows) in enumerate(cases):
            best = best_ours(rows)
            r = next((r for r in rows if r.provider == peer and r.ms), None)
            if r:
                xs.append(i + j * width)
                ys.append(r.ms / best.ms)
        ax.bar(xs, ys, width, label=peer)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("our speed-up over provider (x, log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{c[1]}\n({c[2]})".replace(" / ", "\n") for c, _ in cases], fontsize=7)
    ax.legend(fontsize=7)
    ax.set_title(f"frontiers_fast speed-up ({device})")
    fig.tight_layout()
    path = os.path.join(out_dir, "speedup.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

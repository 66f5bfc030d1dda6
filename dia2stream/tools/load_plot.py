"""The load script's picture: speech onset per turn kind, and underruns over the run.

    python -m dia2stream.tools.load ws://127.0.0.1:8765/ --calls 8 --turns 3 --plot load.png
    python -m dia2stream.tools.load_plot load.json -o load.png      # again, from a saved --json run
    plot_load(calls, summary, "load.png", title)   # calls: [Call.to_dict()], summary: load.summarize()

Left: every turn's speech onset (what the caller waits for before the first word), one column of
points per turn kind (`start`, `inject` after `done`), with the p50 and p95 the table reports.
Right: underruns per second of the run (bars) and their running total (line), on the seconds
since the first turn was sent. matplotlib is an optional extra (`pip install 'dia2stream[plot]'`);
it draws off-screen (Agg), so no display is needed.
"""

from __future__ import annotations

import math
from typing import Any

KINDS = ("start", "inject")
COLORS = {"start": "#2563eb", "inject": "#16a34a", "underruns": "#dc2626"}


def plot_load(calls: list[dict[str, Any]], summary: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    turns = [t for call in calls for t in call["turns"]]
    with plt.rc_context({"svg.fonttype": "none"}):  # an SVG keeps its text as text
        figure, (onset_ax, underrun_ax) = plt.subplots(1, 2, figsize=(11, 4.2),
                                                       gridspec_kw={"width_ratios": [1, 1.4]})
        figure.suptitle(title, fontsize=11)
        draw_onsets(onset_ax, turns, summary, np)
        draw_underruns(underrun_ax, turns, summary, np)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


def draw_onsets(ax, turns, summary, np) -> None:
    rng = np.random.default_rng(0)  # the jitter only spreads points sideways: same picture each time
    for x, kind in enumerate(KINDS):
        onsets = [t["onset_ms"] for t in turns if t["kind"] == kind and t["onset_ms"] is not None]
        if not onsets:
            continue
        ax.scatter(x + rng.uniform(-0.18, 0.18, len(onsets)), onsets, s=14, alpha=0.6, color=COLORS[kind],
                   label=f"{kind} (n={len(onsets)})")
        stats = summary["by_kind"][kind]["onset_ms"]
        for q, style in (("p50", "-"), ("p95", "--")):
            ax.hlines(stats[q], x - 0.3, x + 0.3, colors="black", linestyles=style, linewidth=1.2)
            ax.annotate(f"{q} {stats[q]:.0f}", (x + 0.32, stats[q]), fontsize=8, va="center")
    ax.set_xticks(range(len(KINDS)), [f"{k}" for k in KINDS])
    ax.set_xlim(-0.6, len(KINDS) - 0.2)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("speech onset (ms)")
    ax.set_title("speech onset per turn kind", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=8, loc="lower right")


def draw_underruns(ax, turns, summary, np) -> None:
    if not turns:
        ax.set_title("no turns", fontsize=10)
        return
    t0 = min(t["sent_at_s"] for t in turns)
    times = sorted(at - t0 for t in turns for at in t["underruns_at_s"])
    last = max([0.0] + [at - t0 for t in turns for at in t["underruns_at_s"]] + [t["sent_at_s"] - t0 for t in turns])
    end = summary.get("wall_s") or last + 1.0
    seconds = max(1, math.ceil(max(end, last)))
    counts, edges = np.histogram(times, bins=seconds, range=(0, seconds))
    ax.bar(edges[:-1], counts, width=1.0, align="edge", color=COLORS["underruns"], alpha=0.45,
           label="underruns per second")
    ax.set_xlim(0, seconds)
    ax.set_xlabel("seconds since the first turn")
    ax.set_ylabel("underruns per second")
    ax.set_ylim(0, max(1, int(counts.max()) + 1))
    total = ax.twinx()
    total.step([0.0] + times + [seconds], list(range(len(times) + 1)) + [len(times)], where="post",
               color=COLORS["underruns"], linewidth=1.5, label="total")
    total.set_ylim(0, max(1, len(times)) * 1.15)
    total.set_ylabel("underruns, running total")
    from matplotlib.ticker import MaxNLocator

    for axis in (ax, total):  # counts: whole numbers only
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    starts = [t["sent_at_s"] - t0 for t in turns]
    ax.plot(starts, [0] * len(starts), "|", color="#6b7280", markersize=8, label="a turn begins")
    ax.set_title(f"underruns over the run: {summary['underruns']} in {summary['turns']} turns, "
                 f"{summary['frames']} frames", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")


def main(argv: list[str] | None = None) -> int:
    """Draw a saved run again: `python -m dia2stream.tools.load_plot load.json -o load.png`."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m dia2stream.tools.load_plot", description=main.__doc__)
    ap.add_argument("json", help="a file written by `python -m dia2stream.tools.load ... --json`")
    ap.add_argument("-o", "--output", required=True, help="the picture (PNG/SVG/PDF)")
    ap.add_argument("--title", help="default: calls, turns and URL of the run")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        run = json.load(f)
    config = run["config"]
    title = args.title or f"{config['calls']} calls x {config['turns']} turns, {config['url']}"
    plot_load(run["calls"], run["summary"], args.output, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

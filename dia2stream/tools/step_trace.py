"""Where new turns' start-ups go, from an engine's step trace (`server.py --step-trace FILE`).

    python -m dia2stream.tools.step_trace FILE [--json OUT]

A turn is *starting* from its first step until its first audio (and again after a resume or a
rollback until it catches up): each such stretch is a start-up window. For every window this
counts the steps it ran in (by why they ran and their lane: a decoder-only step is ~a third of a
full one) and what ran beside it without it (steps of other calls, slot moves, planned work),
then prints the window lengths' percentiles and the average make-up of the slowest tenth against
the fastest half. The first thing to read when new turns' onset has a long tail.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

WINDOW_GAP_S = 0.25  # a turn absent from the steps this long has started (a later stretch is another window)


@dataclass
class Window:
    turn: int
    first: int  # index of its first and last event in the trace
    last: int
    own: Counter = field(default_factory=Counter)  # its steps, by "reason lane"
    beside: Counter = field(default_factory=Counter)  # what ran meanwhile without it

    def seconds(self, events: list[dict]) -> float:
        return events[self.last]["t"] - events[self.first]["t"]


def read_events(path: Path) -> list[dict]:
    events = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError:
                raise SystemExit(f"{path}:{number}: not a step-trace line: {line[:80]!r}")
    return sorted(events, key=lambda e: e["t"])


def label(event: dict) -> str:
    if event["kind"] == "step":
        return f"{event['reason']} {'full' if event['full'] else 'decoder-only'}"
    return event["kind"]


def windows(events: list[dict]) -> list[Window]:
    """Each turn's start-up stretches, with what ran in and beside them."""
    done, open_ = [], {}
    for index, event in enumerate(events):
        for turn in event.get("starting", ()):
            window = open_.get(turn)
            if window is not None and event["t"] - events[window.last]["t"] <= WINDOW_GAP_S:
                window.last = index
            else:
                if window is not None:
                    done.append(window)
                open_[turn] = Window(turn, index, index)
    done += open_.values()
    for window in done:
        for event in events[window.first:window.last + 1]:
            if event["kind"] == "applied":
                continue  # the step itself is counted at its launch
            mine = window.turn in event.get("starting", ())
            (window.own if mine else window.beside)[label(event)] += event.get("count", 1)  # moves count each
    return done


def _mean(counters: list[Counter]) -> dict[str, float]:
    total = Counter()
    for counter in counters:
        total.update(counter)
    return {key: round(value / max(1, len(counters)), 1) for key, value in sorted(total.items())}


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {f"p{int(q * 100)}": round(ordered[round(q * (len(ordered) - 1))], 2) for q in (0.5, 0.95)}


def step_costs(events: list[dict]) -> dict[str, dict]:
    """Applied steps by padded batch and lane: the time from launch to outputs, the device wait and
    the host work, p50 / p95 (what a simulated profile should hold for a real GPU under load)."""
    groups: dict[tuple[int, bool], list[dict]] = {}
    for event in events:
        if event["kind"] == "applied":
            groups.setdefault((event["batch"], event["full"]), []).append(event)
    return {f"{batch} {'full' if full else 'decoder-only'}": {
                "steps": len(rows),
                **{f"{name}_{q}": value for name in ("since_launch_ms", "wait_ms", "host_ms")
                   for q, value in _percentiles([row[name] for row in rows]).items()}}
            for (batch, full), rows in sorted(groups.items())}


def summary(events: list[dict]) -> dict:
    steps = [e for e in events if e["kind"] == "step"]
    span = events[-1]["t"] - events[0]["t"] if len(events) > 1 else 0.0
    by_reason = {}
    for reason in sorted({e["reason"] for e in steps}):
        mine = [e for e in steps if e["reason"] == reason]
        by_reason[reason] = {"steps": len(mine), "per_s": round(len(mine) / span, 1) if span else None,
                             "mean_calls": round(sum(e["calls"] for e in mine) / len(mine), 1),
                             "mean_batch": round(sum(e["batch"] for e in mine) / len(mine), 1),
                             "full_share": round(sum(e["full"] for e in mine) / len(mine), 2)}
    found = sorted(windows(events), key=lambda w: w.seconds(events))
    lengths = [w.seconds(events) * 1000 for w in found]
    tail = found[int(0.9 * len(found)):]
    head = found[: max(1, len(found) // 2)] if found else []
    return {
        "seconds": round(span, 3),
        "moves": sum(e["count"] for e in events if e["kind"] == "moves"),
        "planned": len([e for e in events if e["kind"] == "planned"]),
        "steps": by_reason,
        "windows": len(found),
        "window_ms": {f"p{int(q * 100)}": round(lengths[int(q * (len(lengths) - 1))], 1)
                      for q in (0.5, 0.9, 0.95, 0.99)} if lengths else {},
        "step_costs": step_costs(events),
        "slowest_tenth": {"own": _mean([w.own for w in tail]), "beside": _mean([w.beside for w in tail])},
        "fastest_half": {"own": _mean([w.own for w in head]), "beside": _mean([w.beside for w in head])},
    }


def print_summary(s: dict, out=sys.stdout) -> None:
    print(f"{s['seconds']:.1f} s traced: {s['moves']} slot moves, {s['planned']} pieces of planned work", file=out)
    for reason, row in s["steps"].items():
        print(f"  {reason:>9} steps {row['steps']:>6} ({row['per_s']}/s), {row['mean_calls']} calls, padded "
              f"{row['mean_batch']}, {row['full_share']:.0%} full", file=out)
    if s["step_costs"]:
        print("applied steps, by padded batch and lane (ms, p50 / p95): launch to outputs, device wait, host",
              file=out)
    for key, row in s["step_costs"].items():
        print(f"  {key:>18}: {row['steps']:>6} steps, {row['since_launch_ms_p50']} / {row['since_launch_ms_p95']}, "
              f"{row['wait_ms_p50']} / {row['wait_ms_p95']}, {row['host_ms_p50']} / {row['host_ms_p95']}", file=out)
    print(f"start-up windows: {s['windows']}, length {s['window_ms']} ms", file=out)
    for name in ("slowest_tenth", "fastest_half"):
        print(f"  {name.replace('_', ' ')}: its steps {s[name]['own']}", file=out)
        print(f"  {'':>{len(name)}}  beside it {s[name]['beside']}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    events = read_events(args.trace)
    if not events:
        print(f"{args.trace}: no events", file=sys.stderr)
        return 1
    s = summary(events)
    print_summary(s)
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

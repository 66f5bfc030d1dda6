"""The browser pages the server serves itself: the playground (`GET /`), the dashboard
(`GET /dashboard`), their static assets (`/web/...`) and the dashboard's JSON feed.

No framework and no build step: the files in `dia2stream/serve/web/` are read once at start-up
and served as they are. The only generated asset is `/web/formats.json`, the wire formats'
rates and resampler lead-in from `dia2stream.wire.formats`, so the page decodes frames from the
same table the server encodes them with.

The feed is the server's `/health` body plus samples of `/metrics` families and nothing else:

    {"health": {...}, "metrics": {"dia2_frames_sent_total": 812.0,
                                  "dia2_speech_onset_seconds": {"count": 3, "sum": 0.61,
                                                                "buckets": [[0.05, 0], ..., ["+Inf", 3]]},
                                  "dia2_calls_refused_total": {"busy": 0, ...}, ...}}

so a page that can read it learns nothing a `/health` poller and a `/metrics` scraper could
not; it is gated like `/metrics` (token, browser Origin).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

from dia2stream.wire.formats import FORMATS, FrameEncoder
from dia2stream.wire.protocol import FRAME_RATE

PLAYGROUND_PATH = "/"
DASHBOARD_PATH = "/dashboard"
FEED_PATH = "/dashboard/feed"
ASSET_PREFIX = "/web/"
FORMATS_ASSET = "formats.json"
PAGE_FILES = {PLAYGROUND_PATH: "playground.html", DASHBOARD_PATH: "dashboard.html"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json"}
# Same-origin only, no inline script: the pages load their own modules and talk to their own
# server; an injected <script> or a foreign frame gets nowhere.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data:; media-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'")

# The /metrics families the dashboard draws; the feed carries these and nothing else of /metrics.
FEED_FAMILIES = ("dia2_calls_active", "dia2_frame_step_calls", "dia2_frame_step_seconds",
                 "dia2_frames_sent_total", "dia2_underruns_total", "dia2_speech_onset_seconds",
                 "dia2_time_to_first_byte_seconds", "dia2_calls_refused_total")


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


class WebPages:
    """The static files, read once, and the feed (`health()` and the metrics registry)."""

    def __init__(self, health: Callable[[], dict[str, Any]], registry) -> None:
        """`registry`: the prometheus_client registry behind /metrics (`Metrics.registry`)."""
        self._health = health
        self._registry = registry
        self._assets = load_assets()

    def page(self, path: str) -> Asset | None:
        """The page or asset at `path`, or None if there is none."""
        if path in PAGE_FILES:
            return self._assets.get(PAGE_FILES[path])
        if path.startswith(ASSET_PREFIX):
            return self._assets.get(path[len(ASSET_PREFIX):])
        return None

    def feed(self) -> dict[str, Any]:
        return {"health": self._health(), "metrics": metric_samples(self._registry, FEED_FAMILIES)}


def is_web_path(path: str) -> bool:
    return path in PAGE_FILES or path == FEED_PATH or path.startswith(ASSET_PREFIX)


def load_assets() -> dict[str, Asset]:
    """Every file of the package's `web/` folder by name, plus the generated formats table."""
    assets: dict[str, Asset] = {}
    for entry in resources.files("dia2stream.serve").joinpath("web").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            assets[entry.name] = Asset(entry.read_bytes(), CONTENT_TYPES[suffix])
    assets[FORMATS_ASSET] = Asset(json.dumps(formats_table()).encode(), CONTENT_TYPES[".json"])
    return assets


def formats_table() -> dict[str, Any]:
    """What the page needs to decode and time each format's frames."""
    table = {}
    for name, fmt in FORMATS.items():
        table[name] = {"sample_rate": fmt.sample_rate, "encoding": fmt.encoding,
                       "frame_samples": fmt.frame_samples, "lead_ms": FrameEncoder(fmt).latency_ms}
    return {"frame_rate": FRAME_RATE, "formats": table}


def metric_samples(registry, families: tuple[str, ...]) -> dict[str, Any]:
    """The current samples of `families` as /metrics exposes them: a number for a gauge or an
    unlabelled counter, `{label value: number}` for a counter with one label, and
    `{"count", "sum", "buckets": [[le, cumulative count], ...]}` for a histogram."""
    out: dict[str, Any] = {}
    for family in registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, _number(sample.value)
            if family.type == "histogram":
                base = family.name
                if base not in families:
                    continue
                hist = out.setdefault(base, {"count": 0.0, "sum": 0.0, "buckets": []})
                if name == base + "_bucket":
                    hist["buckets"].append([labels["le"], value])
                elif name in (base + "_count", base + "_sum"):
                    hist[name[len(base) + 1:]] = value
            elif name in families:
                if labels:
                    out.setdefault(name, {})[next(iter(labels.values()))] = value
                else:
                    out[name] = value
    return out


def _number(value: float) -> float | str:
    # JSON has no infinities; Prometheus writes them as +Inf.
    return value if math.isfinite(value) else ("+Inf" if value > 0 else "-Inf")

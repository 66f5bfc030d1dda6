"""The web pages as HTTP (issue 23): routes, `--no-web`, the feed's gate and contents, the
own-origin rule, packaging. Unit tests on the gate, then one real tiny server with `--no-web`.
The pages in a browser: tests/test_web_browser.py."""

from __future__ import annotations

import http.client
import json
import tomllib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.http11 import Request

from dia2stream.serve.config import ServerConfig, parse_args
from dia2stream.serve.http import HttpGate, HttpPolicy, is_own_origin
from dia2stream.serve.metrics import Metrics
from dia2stream.serve.web_pages import FEED_FAMILIES, WebPages, formats_table
from dia2stream.wire.formats import FORMATS

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "dia2stream" / "serve" / "web"
TOKEN = "t0ken"
HEALTH = {"status": "ok", "model": "tiny", "device": "cpu", "calls": 1, "max_calls": 2, "busy": False,
          "overloaded": False, "step_ms": 12.5, "step_calls": 1}


def get(path, method="GET", upgrade=False, **headers) -> Request:
    pairs = [("Upgrade", "websocket"), ("Connection", "Upgrade")] if upgrade else []
    return Request(path, Headers(pairs + [(k, v) for k, v in headers.items()]), method)


def busy_metrics() -> Metrics:
    metrics = Metrics(gpu_memory=None, process=False)
    metrics.frame_step_ms(14.0, calls=1)
    metrics.frame_step_ms(31.0, calls=2)
    metrics.speech_onset_ms(180.0)
    metrics.speech_onset_ms(420.0)
    metrics.first_byte_ms(100.0)
    metrics.frames_sent(45)
    metrics.underrun(2)
    metrics.calls_active(1)
    metrics.call_refused("busy")
    metrics.error("busy")
    return metrics


def web_gate(token=None, origins=None, metrics=None, pages=True) -> HttpGate:
    metrics = metrics or busy_metrics()
    return HttpGate(HttpPolicy(auth_token=token, allowed_origins=origins, own_origin=pages),
                    health=lambda: dict(HEALTH), metrics=metrics.render,
                    pages=WebPages(lambda: dict(HEALTH), metrics.registry) if pages else None)


def test_pages_and_assets_are_served_with_their_types_and_policy():
    g = web_gate()
    for path, kind, marker in (("/", "text/html", b"/web/playground.js"), ("/dashboard", "text/html", b"/web/dashboard.js"),
                               ("/web/player-worklet.js", "text/javascript", b"registerProcessor"),
                               ("/web/style.css", "text/css", b".word.heard")):
        response = g.respond(get(path))
        assert response.status_code == 200, path
        assert response.headers["Content-Type"].startswith(kind) and marker in response.body
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        head = g.respond(get(path, "HEAD"))
        assert head.body == b"" and head.headers["Content-Length"] == str(len(response.body))
    # Every file in the folder is served, by its name and nothing else.
    for file in WEB_DIR.iterdir():
        assert g.respond(get("/web/" + file.name)).body == file.read_bytes()
    for missing in ("/web/nope.js", "/web/../http.py", "/web/", "/web/%2e%2e/web_pages.py"):
        assert g.respond(get(missing)).status_code == 404, missing


def test_the_formats_table_is_the_servers():
    table = json.loads(web_gate().respond(get("/web/formats.json")).body)
    assert table == formats_table()
    assert set(table["formats"]) == set(FORMATS) and table["frame_rate"] == 12.5
    assert table["formats"]["ulaw_8000"] == {"sample_rate": 8000, "encoding": "ulaw", "frame_samples": 640,
                                             "lead_ms": 25.0}
    assert table["formats"]["pcm_16000"]["lead_ms"] == 10.0  # docs/protocol.md: 10 ms at 16 kHz


def test_a_websocket_upgrade_to_the_playground_path_is_still_the_websocket():
    g = web_gate()
    assert g.respond(get("/", upgrade=True)) is None
    assert web_gate(token=TOKEN).respond(get("/", upgrade=True)).status_code == 401
    # Other methods on a page path: 405, naming the methods that path answers (HEAD is the page's).
    response = g.respond(get("/", "POST"))
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"
    assert g.respond(get("/", "HEAD")).status_code == 200


def test_no_web_answers_404_for_both_pages_and_keeps_the_websocket():
    g = web_gate(pages=False)
    for path in ("/", "/dashboard", "/dashboard/feed", "/web/playground.js"):
        response = g.respond(get(path))
        assert response.status_code == 404 and b"--no-web" in response.body, path
    assert g.respond(get("/", upgrade=True)) is None


def test_the_feed_is_behind_the_token_and_origin_like_metrics():
    refused = []
    metrics = busy_metrics()
    g = HttpGate(HttpPolicy(auth_token=TOKEN, allowed_origins=("https://ops.example.com",), own_origin=True),
                 health=lambda: dict(HEALTH), metrics=metrics.render, on_refused=refused.append,
                 pages=WebPages(lambda: dict(HEALTH), metrics.registry))
    assert g.respond(get("/dashboard/feed")).status_code == 401
    assert g.respond(get("/dashboard/feed?token=nope")).status_code == 401
    assert g.respond(get("/dashboard/feed", Authorization=f"Bearer {TOKEN}")).status_code == 200
    assert g.respond(get(f"/dashboard/feed?token={TOKEN}")).status_code == 200
    assert g.respond(get("/dashboard/feed", Authorization=f"Bearer {TOKEN}",
                         Origin="https://evil.example.com")).status_code == 403
    assert refused == ["unauthorized", "unauthorized", "origin"]
    # The pages themselves hold no secret: open like /health.
    assert g.respond(get("/dashboard")).status_code == 200


def test_the_feed_exposes_nothing_health_and_metrics_do_not():
    metrics = busy_metrics()
    g = web_gate(metrics=metrics)
    feed = json.loads(g.respond(get("/dashboard/feed")).body)
    health = json.loads(g.respond(get("/health")).body)
    assert set(feed) == {"health", "metrics"}
    assert feed["health"] == health
    exposed = {}
    for family in text_string_to_metric_families(g.respond(get("/metrics")).body.decode()):
        for sample in family.samples:
            exposed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert set(feed["metrics"]) == set(FEED_FAMILIES)
    checked = 0
    for name, value in feed["metrics"].items():
        if isinstance(value, dict) and "buckets" in value:
            for le, count in value["buckets"]:
                assert exposed[(name + "_bucket", (("le", le),))] == count
            assert exposed[(name + "_count", ())] == value["count"]
            assert exposed[(name + "_sum", ())] == value["sum"]
            checked += len(value["buckets"]) + 2
        elif isinstance(value, dict):
            for label, v in value.items():
                assert exposed[(name, (("reason", label),))] == v
                checked += 1
        else:
            assert exposed[(name, ())] == value
            checked += 1
    assert checked > 40
    assert feed["metrics"]["dia2_frames_sent_total"] == 45 and feed["metrics"]["dia2_underruns_total"] == 2
    assert feed["metrics"]["dia2_speech_onset_seconds"]["count"] == 2


def test_own_origin_rule():
    assert is_own_origin("http://127.0.0.1:8765", "127.0.0.1:8765")
    assert is_own_origin("https://[::1]:8443", "[::1]:8443")
    assert is_own_origin("http://localhost:8765", "LOCALHOST:8765")
    assert is_own_origin("http://10.0.0.7", "10.0.0.7")
    assert not is_own_origin("http://127.0.0.1:9999", "127.0.0.1:8765")  # another port: another origin
    assert not is_own_origin("http://attacker.example:8765", "attacker.example:8765")  # DNS rebinding
    assert not is_own_origin("null", "127.0.0.1:8765")
    assert not is_own_origin("file://127.0.0.1:8765", "127.0.0.1:8765")
    own = {"Origin": "http://127.0.0.1:8765", "Host": "127.0.0.1:8765"}
    # Default policy (no token, no --allowed-origins): the server's own page is let in, nothing else.
    assert web_gate().respond(get("/", upgrade=True, **own)) is None
    assert web_gate().respond(get("/", upgrade=True, Origin="http://127.0.0.1:9999",
                                  Host="127.0.0.1:8765")).status_code == 403
    # --no-web: no page of ours, so no exception to the rule.
    assert web_gate(pages=False).respond(get("/", upgrade=True, **own)).status_code == 403
    # With an explicit list, the own page still works; a foreign one not on the list does not.
    origins = ("https://app.example.com",)
    assert web_gate(origins=origins).respond(get("/", upgrade=True, **own)) is None
    assert web_gate(origins=origins).respond(get("/", upgrade=True, Origin="https://x.example.com",
                                                 Host="127.0.0.1:8765")).status_code == 403


def test_web_flag():
    assert parse_args([]).web is True and ServerConfig().web is True
    assert parse_args(["--no-web"]).web is False
    assert parse_args(["--web"], environ={"DIA2_WEB": "0"}).web is True
    assert parse_args([], environ={"DIA2_WEB": "off"}).web is False
    with pytest.raises(SystemExit):
        parse_args([], environ={"DIA2_WEB": "maybe"})
    assert HttpPolicy.from_config(parse_args(["--no-web"])).own_origin is False
    assert HttpPolicy.from_config(parse_args([])).own_origin is True


def test_the_static_files_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "dia2stream*" in config["packages"]["find"]["include"]
    globs = config["package-data"]["dia2stream.serve"]
    for file in WEB_DIR.iterdir():
        assert any(Path(file.name).match(g.removeprefix("web/")) for g in globs), file.name


@pytest.mark.slow
async def test_a_no_web_server_answers_404_and_still_speaks():
    from helpers import ServerThread, server_config

    srv = ServerThread(server_config(log_level="WARNING",
                                    web=False)).start()
    try:
        for path in ("/", "/dashboard"):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            conn.request("GET", path)
            assert conn.getresponse().status == 404, path
            conn.close()
        async with connect(srv.url) as ws:
            assert json.loads(await ws.recv())["event"] == "ready"
    finally:
        srv.stop()

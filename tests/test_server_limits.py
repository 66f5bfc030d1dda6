"""Issue 13's findings through the real server on 127.0.0.1 (tiny checkpoint): access, limits,
private voices, voice loading off the generation thread, metrics. Each test names its finding;
docs/operations.md maps findings to tests. Shutdown (finding 8) is in test_shutdown.py."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import socket
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from dia2stream.voices import voice as v
from dia2stream.serve.config import ServerConfig

from helpers import Client, LONG_TEXT, ServerThread, server_config, http_call
from dia2stream.serve.limits import Limits
from dia2stream.serve.server import run
from test_voice import tone, wav_bytes

pytestmark = pytest.mark.slow

TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("voice-cache")
    srv = ServerThread(server_config(mimi="random-small",
                                    log_level="WARNING", max_calls=2, auth_token=TOKEN, voice_cache=str(cache),
                                    max_voices_per_connection=2, voice_cache_mb=1, max_voice_seconds=2.0,
                                    max_pending_text_chars=4096, commands_per_second=20, command_burst=40,
                                    flood_close_s=0,  # refuse only: closing a flood is test_isolation.py's
                                    allowed_origins="https://ok.example")).start()
    srv.cache = cache
    srv.authed = f"{srv.url}?token={TOKEN}"
    yield srv
    srv.stop()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def scrape(port: int) -> str:
    status, _, body = await asyncio.to_thread(http_call, port, "GET", "/metrics",
                                              {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    return body.decode()


async def next_event(client: Client, name: str, timeout: float = 60.0) -> dict:
    """The next `name` event, whatever comes before it (errors included)."""
    deadline = time.perf_counter() + timeout
    while True:
        _, kind, payload = await client.next(deadline - time.perf_counter())
        if kind == "event" and payload["event"] == name:
            return payload


def voice_audio(seed: int, seconds: float = 0.5) -> str:
    return base64.b64encode(wav_bytes(tone(seconds, seed=seed))).decode()


# ---------------------------------------------------------------------------------------------
# Finding 10: token, Origin, /health methods
# ---------------------------------------------------------------------------------------------


async def test_token_origin_and_health_methods(server):
    for url, headers, origin in ((server.url, None, None), (server.url, {"Authorization": "Bearer wrong"}, None),
                                 (f"{server.url}?token=nope", None, None)):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers=headers, origin=origin, open_timeout=10):
                pass
        assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        async with connect(server.url, additional_headers={"Authorization": f"Bearer {TOKEN}"},
                           origin="https://evil.example", open_timeout=10):
            pass
    assert info.value.response.status_code == 403
    async with connect(server.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, open_timeout=10) as ws:
        assert json.loads(await ws.recv())["event"] == "ready"

    got = {m: await asyncio.to_thread(http_call, server.port, m, "/health") for m in ("GET", "HEAD", "PUT", "DELETE")}
    assert got["GET"][0] == 200 and json.loads(got["GET"][2])["model"] == "tiny"
    assert got["HEAD"][0] == 200 and got["HEAD"][2] == b""
    assert got["PUT"][0] == 405 and got["DELETE"][0] == 405
    status, _, _ = await asyncio.to_thread(http_call, server.port, "GET", "/metrics")
    assert status == 401
    assert "dia2_calls_refused_total" in await scrape(server.port)


# ---------------------------------------------------------------------------------------------
# Finding 4: a command flood gets rate_limited, bounded replies, no log line per command,
# and the flooding call's own audio keeps coming
# ---------------------------------------------------------------------------------------------


async def test_flood_is_rate_limited_with_bounded_replies_and_audio_goes_on(server, caplog):
    client, _ = await Client.open(server.authed)
    flood = 5000
    try:
        await client.send(cmd="start", text=LONG_TEXT, id="u")
        await client.until("started", id="u")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dia2stream"):
            t0 = time.perf_counter()
            for i in range(flood):
                await client.send_raw('{"cmd": "ping", "id": %d}' % i if i % 2 else "{not json")
            sent_s = time.perf_counter() - t0
            done = await next_event(client, "done")
        assert done["id"] == "u" and done["frames"] > 5
        await asyncio.sleep(0.3)
        rest = await client.quiet(1.0)
    finally:
        await client.close()
    events = client.events() + [e for _, k, e in rest if k == "event"]
    pongs = sum(e["event"] == "pong" for e in events)
    refusals = [e for e in events if e["event"] == "error" and e["code"] == "rate_limited"]
    answered = pongs + sum(e["event"] == "error" and e["code"] == "invalid_json" for e in events)
    # the burst, the sustained rate over the flood and the wait, and one refusal a second
    bound = 40 + 20 * (sent_s + 3) + 10
    assert answered <= bound, f"{answered} answers to {flood} messages in {sent_s:.1f} s"
    assert refusals and len(refusals) <= sent_s + 5
    per_command = [r for r in caplog.records if r.levelno >= logging.INFO and "command" in r.getMessage()]
    assert len(per_command) < 10, per_command[:3]


# ---------------------------------------------------------------------------------------------
# Finding 6: no permessage-deflate; a large message that is not a voice is refused
# ---------------------------------------------------------------------------------------------


async def test_no_compression_and_large_non_voice_messages_refused(server):
    # No `async with`: closing again after the server's 1009 can trip over the closed transport
    # in the client library; the connection is over either way.
    ws = await connect(server.authed, compression="deflate", open_timeout=10, max_size=None)
    try:
        assert ws.protocol.extensions == []  # offered, declined: nothing is ever inflated
        assert json.loads(await ws.recv())["event"] == "ready"
        await ws.send('{"cmd": "ping", "id": "big"' + " " * 200_000 + "}")  # valid, but no voice
        error = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert error["code"] == "message_too_large" and "id" not in error  # refused unparsed (issue 19)
        await ws.send("z" * (9 * 1024 * 1024))  # past max_size: the transport closes 1009
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 30)
        assert ws.close_code == 1009
    finally:
        if ws.state is not State.CLOSED:
            ws.transport.abort()


# ---------------------------------------------------------------------------------------------
# Finding 9: voices are private to the connection that made them; quota; bounded disk cache
# ---------------------------------------------------------------------------------------------


async def test_voices_are_private_limited_and_the_cache_is_bounded(server):
    a, ready_a = await Client.open(server.authed)
    try:
        assert ready_a["voices"] == []
        await a.send(cmd="set_voice", name="mine", audio=voice_audio(1), transcript="[S1] Hello.", id="v1")
        assert (await a.until("voice_ready", id="v1", timeout=120))["name"] == "mine"
        b, ready_b = await Client.open(server.authed)
        try:
            assert ready_b["voices"] == []
            await b.send(cmd="voices", id="l")
            assert (await b.until("voices", id="l"))["voices"] == []
            await b.send(cmd="start", text="[S1] Hi.", voice="mine", id="s")
            error = await b.event()
            assert error["code"] == "unknown_voice" and error["id"] == "s" and "~" not in error["message"]
        finally:
            await b.close()
        await a.send(cmd="voices", id="l")
        assert [x["name"] for x in (await a.until("voices", id="l"))["voices"]] == ["mine"]
        await a.send(cmd="start", text="[S1] Hi.", voice="mine", id="s")
        assert (await a.until("started", id="s"))["voice"] == "mine"
        await a.until("done", id="s")
        await a.send(cmd="reset", id="r")
        assert (await a.until("reset", id="r"))["voice"] == "mine"
        # quota: 2 names per connection; replacing one's own is free
        await a.send(cmd="set_voice", name="two", audio=voice_audio(2), transcript="[S1] Two.", id="v2")
        await a.until("voice_ready", id="v2", timeout=120)
        await a.send(cmd="set_voice", name="mine", audio=voice_audio(3), transcript="[S1] Again.", id="v3")
        await a.until("voice_ready", id="v3", timeout=120)
        await a.send(cmd="set_voice", name="three", audio=voice_audio(4), transcript="[S1] Three.", id="v4")
        error = await a.event()
        assert error["code"] == "too_many_voices" and error["id"] == "v4"
    finally:
        await a.close()
    # more voices from new connections: the disk cache stays within --voice-cache-mb (1 MiB)
    entry = max(v._size(d) for d in (server.cache / "states").iterdir())
    for seed in range(5, 9):
        c, _ = await Client.open(server.authed)
        try:
            await c.send(cmd="set_voice", name="x", audio=voice_audio(seed, 1.5), transcript="[S1] Many words here.",
                         id="x")
            await c.until("voice_ready", id="x", timeout=120)
        finally:
            await c.close()
    assert v._size(server.cache / "states") <= (1 << 20) + entry


# ---------------------------------------------------------------------------------------------
# Finding 11: set_voice audio and whisper off the generation thread; never a download
# ---------------------------------------------------------------------------------------------


async def test_voice_loading_never_stalls_another_call(server, monkeypatch):
    threads = []
    real_load = v.VoicePreparer.load

    def slow_load(self, request):  # stands for a long decode or a whisper transcription
        threads.append(threading.current_thread().name)
        time.sleep(1.5)
        return real_load(self, request)

    monkeypatch.setattr(v.VoicePreparer, "load", slow_load)
    speaker, _ = await Client.open(server.authed)
    other, _ = await Client.open(server.authed)
    try:
        await speaker.send(cmd="start", text="[S1] " + " ".join(["word"] * 40), id="long")
        await speaker.frames(3)
        await other.send(cmd="set_voice", name="slow", audio=voice_audio(9), transcript="[S1] Hey.", id="sv")
        while not threads:
            await speaker.frames(1)
        t_start = time.perf_counter()
        await speaker.frames(5)
        during = [t for t in speaker.frame_times() if t >= t_start]
        assert (await other.until("voice_ready", id="sv", timeout=60))["name"] == "slow"
    finally:
        await speaker.close()
        await other.close()
    assert threads and all(name != "dia2-engine" for name in threads), threads
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert during[0] - t_start < 1.0 and max(gaps, default=0) < 1.0, "the speaking call stalled"


def test_whisper_weights_are_never_downloaded_while_serving(tmp_path, monkeypatch):
    """The server builds its engine with allow_download=False: with no local weights, a
    set_voice without a transcript is transcript_required and whisper's loader is never called,
    even where downloads are allowed (HF_HUB_OFFLINE unset)."""
    from dia2stream.serve.build import build_engine

    loads = []

    def load_model(name, **kwargs):  # openai-whisper downloads missing weights here
        loads.append(name)
        raise RuntimeError("no network in tests")

    fake = types.SimpleNamespace(_MODELS={"turbo": "https://example.invalid/turbo.pt"}, load_model=load_model)
    monkeypatch.setitem(sys.modules, "whisper", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, engine = build_engine(ServerConfig(checkpoint="tiny", device="cpu", mimi="random-small",
                                          voice_cache=str(tmp_path / "c")))
    try:
        assert engine.voices.preparer.settings.allow_download is False
        from dia2stream.wire import protocol as p
        with pytest.raises(v.VoiceError) as info:
            engine.load_voice(p.SetVoice(name="n", audio_b64=voice_audio(1)), "n")
        assert info.value.code == "transcript_required"
        assert loads == []
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------
# Pending text per call
# ---------------------------------------------------------------------------------------------


async def test_pending_text_is_bounded_per_call(server):
    client, _ = await Client.open(server.authed)
    try:
        words = " ".join(f"w{i}" for i in range(1200))[:4000]
        await client.send(cmd="start", text="[S1] " + words[:4000 - 5], final=False, id="s")
        await client.until("started", id="s")
        await client.send(cmd="inject", text=" more" * 800, final=False, id="i")
        error = await client.until("error", code="pending_text_full")
        assert error["id"] == "i" and error["cmd"] == "inject"
        await client.frames(2)  # the utterance goes on
        await client.send(cmd="reset", id="r")
        await client.until("reset", id="r")
    finally:
        await client.close()


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


async def test_metrics_count_frames_latency_steps_errors_and_refusals(server):
    before = await scrape(server.port)
    client, _ = await Client.open(server.authed)
    try:
        await client.send(cmd="start", text="[S1] Hello there.", id="m")
        done = await client.until("done", id="m")
        await client.send_raw("{oops")
        assert (await client.event())["code"] == "invalid_json"
        second, _ = await Client.open(server.authed)  # both slots taken: the next is refused
        refused = await connect(server.authed, open_timeout=10)
        assert json.loads(await refused.recv())["code"] == "busy"
        await refused.close()
        await second.close()
    finally:
        await client.close()
    after = await scrape(server.port)
    frames = metric(after, "dia2_frames_sent_total") - metric(before, "dia2_frames_sent_total")
    assert frames >= done["frames"] > 0
    assert metric(after, "dia2_audio_sent_seconds_total") > metric(before, "dia2_audio_sent_seconds_total")
    assert metric(after, "dia2_speech_onset_seconds_count") > metric(before, "dia2_speech_onset_seconds_count")
    assert metric(after, "dia2_time_to_first_byte_seconds_count") > \
        metric(before, "dia2_time_to_first_byte_seconds_count")
    assert metric(after, "dia2_frame_step_seconds_count") > metric(before, "dia2_frame_step_seconds_count")
    assert metric(after, 'dia2_errors_total{code="invalid_json"}') > metric(before, 'dia2_errors_total{code="invalid_json"}')
    assert metric(after, 'dia2_calls_refused_total{reason="busy"}') > \
        metric(before, 'dia2_calls_refused_total{reason="busy"}')
    assert "dia2_underruns_total" in after and "dia2_gpu_memory_allocated_bytes" in after


# ---------------------------------------------------------------------------------------------
# Finding 7: idle connections are closed (own server: a short timeout)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_server():
    srv = ServerThread(server_config(mimi="random-small",
                                    log_level="WARNING", max_calls=2, idle_timeout_s=1.5, max_lead_ms=200)).start()
    yield srv
    srv.stop()


async def test_idle_connection_is_closed_with_a_reason_but_a_speaking_one_is_not(idle_server):
    idle, _ = await Client.open(idle_server.url)
    speaking, _ = await Client.open(idle_server.url)
    try:
        t0 = time.perf_counter()
        await speaking.send(cmd="start", text="[S1] " + " ".join(["word"] * 20), id="long")
        error = await idle.event(timeout=10)
        waited = time.perf_counter() - t0
        assert error["code"] == "idle_timeout" and 1.0 < waited < 5.0
        with pytest.raises(ConnectionClosed):
            await idle.next(timeout=5)
        assert idle.ws.close_code == 1000 and idle.ws.close_reason == "idle timeout"
        done = await speaking.until("done", id="long", timeout=60)  # longer than the timeout, never closed
        assert done["wall_s"] > 1.5
    finally:
        await idle.close()
        await speaking.close()


# ---------------------------------------------------------------------------------------------
# Finding 3: the documented top_k range is the one the server takes
# Finding 5: voice audio refused from its header, never decoded whole
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_server():
    """Default flags only, so these two tests also run against code older than the limits."""
    srv = ServerThread(server_config(mimi="random-small",
                                    log_level="WARNING")).start()
    yield srv
    srv.stop()


def documented_range(field: str) -> tuple[int, int]:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    row = re.search(rf"^\| `{field}` \| int \| (\d+) \| (\d+) \|$", doc, re.M)
    assert row, f"docs/protocol.md has no range row for {field}"
    return int(row.group(1)), int(row.group(2))


async def test_documented_top_k_range_is_what_the_server_takes(plain_server):
    low, high = documented_range("top_k")
    client, _ = await Client.open(plain_server.url)
    try:
        await client.send(cmd="start", text="[S1] Hi.", top_k=high, id="top")
        await client.until("done", id="top")
        for bad in (low - 1, high + 1):
            await client.send(cmd="start", text="[S1] Hi.", top_k=bad, id="bad")
            error = await client.event()
            assert error["code"] == "invalid_field" and "top_k" in error["message"]
    finally:
        await client.close()


async def test_voice_bomb_is_refused_from_its_header(plain_server, monkeypatch):
    from test_voice import constant_flac

    bomb = constant_flac(60, 8)  # ~30 KB of FLAC, 92 MB decoded
    decoded = []
    real_read = v.sf.read
    monkeypatch.setattr(v.sf, "read", lambda *a, **k: decoded.append(1) or real_read(*a, **k))
    client, _ = await Client.open(plain_server.url)
    try:
        t0 = time.perf_counter()
        await client.send(cmd="set_voice", name="bomb", audio=base64.b64encode(bomb).decode(), transcript="Hi.",
                          id="b")
        error = await client.event()
        assert error["code"] == "bad_audio" and error["id"] == "b"
        assert "channels" in error["message"] or "longer than" in error["message"]
        assert time.perf_counter() - t0 < 2.0
    finally:
        await client.close()
    assert decoded == []


# ---------------------------------------------------------------------------------------------
# Finding 4, memory: a client that floods and stops reading is closed, not queued for
# ---------------------------------------------------------------------------------------------


class LimitedServer(ServerThread):
    """A server with limits the flags do not reach (here: a small outbox)."""

    def __init__(self, config: ServerConfig, limits: Limits):
        super().__init__(config)
        self.limits = limits

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        await run(self.config, self._port, stop=self._stop, limits=self.limits)


async def test_a_client_that_stops_reading_is_closed_not_queued_for():
    srv = await asyncio.to_thread(LimitedServer(
        server_config(mimi="random-small",
                     log_level="ERROR"),
        Limits(max_outbox_items=16, commands_per_second=1e6, command_burst=10**6)).start)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # stops reading: backs up fast
        sock.connect(("127.0.0.1", srv.port))
        ws = await connect(srv.url, sock=sock, max_queue=1, open_timeout=30, close_timeout=1)
        assert b'"calls": 1' in (await asyncio.to_thread(http_call, srv.port, "GET", "/health"))[2]

        async def flood():  # pongs the client never reads
            with pytest.raises(ConnectionClosed):
                for _ in range(1_000_000):
                    await ws.send('{"cmd": "ping", "id": "%s"}' % ("x" * 100))

        t0 = time.perf_counter()
        flooding = asyncio.create_task(flood())
        while b'"calls": 0' not in (await asyncio.to_thread(http_call, srv.port, "GET", "/health"))[2]:
            assert time.perf_counter() - t0 < 10, "the call of a client that stopped reading was kept"
            await asyncio.sleep(0.05)
        freed_s = time.perf_counter() - t0
        await asyncio.wait_for(flooding, 30)
        # 1008 "not reading" if the client got to read the close frame, else 1006: the server cut
        # the connection after its close timeout
        assert ws.close_code in (1008, 1006) and freed_s < 5
    finally:
        await asyncio.to_thread(srv.stop)

"""The native LiveKit plugin (`dia2stream.integrations.livekit.TTS`) with the real livekit-agents,
against an in-process server whose context fills after 100 frames with no rollover: a refused
`start` and an engine reset leave the call able to speak (the next turn sends `start`), errors
are LiveKit's own (`retryable` only when worth it), an LLM pause longer than the timeout does not
fail the turn, a lost connection is an `APIConnectionError`, and streamed pieces of words go out
as whole words, coalesced (no `rate_limited`). Loopback only; skipped without livekit."""

from __future__ import annotations

import asyncio
import json

import pytest

from compat_clients import need, start_server
from livekit_streams import speak

need("livekit.agents", "websockets")

from livekit.agents import APIConnectionError, APIConnectOptions, APIError  # noqa: E402

from dia2stream.integrations import livekit as plugin  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_S = 60.0
OPTIONS = APIConnectOptions(timeout=WAIT_S, max_retry=0)
TOKENS = ["Hello", " there", ",", " how", " are", " you", " today", "?"]
WORDS = ["Hello", "there,", "how", "are", "you", "today?"]
LONG = [" one", " two", " three", " four", " five", " six", " seven", " eight", " nine", " ten", ".",
        " Eleven", " twelve", " thirteen", " fourteen", " fifteen", " sixteen", "."] * 2


@pytest.fixture(scope="module")
def server():
    srv = start_server(context_frames=100, rollover_frames=0)
    yield srv
    srv.stop()


@pytest.fixture
def wire(monkeypatch):
    """The commands the plugin sends, in order."""
    sent: list[dict] = []
    connection = plugin._Call._connection

    async def recording(call, timeout):
        ws = await connection(call, timeout)
        if not getattr(ws, "_recorded", False):
            ws._recorded, send = True, ws.send

            async def send_and_note(message):
                sent.append(json.loads(message))
                await send(message)
            ws.send = send_and_note
        return ws

    monkeypatch.setattr(plugin._Call, "_connection", recording)
    return sent


async def _speak(tts, tokens, *, options=OPTIONS, gap_at: int | None = None, gap_s: float = 0.0):
    """`tokens` as an LLM would send them (optionally pausing); (frames, the words stripped)."""
    frames, words = await speak(tts, tokens, options, WAIT_S * 2, gap_at=gap_at, gap_s=gap_s)
    return frames, [w.strip() for w in words]


async def test_a_refused_voice_is_reported_not_retried_and_the_next_turn_starts_again(server, wire):
    tts = plugin.TTS(url=f"ws://127.0.0.1:{server.port}/", voice="no_such_voice")
    for _ in range(2):  # each turn asks again (`start`), and hears the real cause
        with pytest.raises(APIError, match="unknown_voice") as caught:
            await _speak(tts, TOKENS, options=APIConnectOptions(timeout=WAIT_S, max_retry=2, retry_interval=0.1))
        assert caught.value.retryable is False
    starts = [c for c in wire if c["cmd"] == "start"]
    assert len(starts) == 2  # not retried
    tts._call.voice = None  # the application fixes its voice: the same call speaks
    _, words = await _speak(tts, TOKENS)
    await tts.aclose()
    assert words == WORDS
    assert [c["cmd"] for c in wire].count("start") == 3


async def test_after_the_engine_resets_the_call_the_next_turns_speak(server, wire):
    tts = plugin.TTS(url=f"ws://127.0.0.1:{server.port}/")
    with pytest.raises(APIError, match="context_full"):
        await _speak(tts, LONG)  # longer than the 100 frames: the engine resets the call
    for _ in range(2):
        _, words = await _speak(tts, TOKENS)
        assert words == WORDS
    await tts.aclose()
    assert sum(c["cmd"] == "start" for c in wire) == 2  # the long turn's, then the turn after the reset


async def test_an_llm_pause_longer_than_the_timeout_does_not_fail_the_turn(server):
    tts = plugin.TTS(url=f"ws://127.0.0.1:{server.port}/")
    options = APIConnectOptions(timeout=2.0, max_retry=0)
    _, words = await _speak(tts, TOKENS, options=options, gap_at=3, gap_s=3.5)
    await tts.aclose()
    assert words == WORDS


async def test_pieces_of_words_go_out_whole_and_coalesced(server, wire):
    tts = plugin.TTS(url=f"ws://127.0.0.1:{server.port}/")
    _, words = await _speak(tts, ["Un", "believ", "able", " sto", "ry", "."])
    assert words == ["Unbelievable", "story."]
    # a fast LLM: 150 tokens at once are a few commands, not 150 (the server allows 100 at once)
    del wire[:]
    async with tts.stream(conn_options=OPTIONS) as stream:
        for token in [" a"] * 149 + ["."]:
            stream.push_text(token)
        stream.end_input()
        async with asyncio.timeout(WAIT_S):
            async for _ in stream:
                break  # speaking: the interruption pauses it
    await tts.aclose()
    texts = [c for c in wire if c["cmd"] in ("start", "inject")]
    assert 1 <= len(texts) <= 3, [c["cmd"] for c in wire]
    assert "".join(c["text"] for c in texts).split() == ["a"] * 148 + ["a."]


class _Proxy:
    """A TCP relay to the server whose connections can be cut."""

    def __init__(self, port: int):
        self.port, self.target, self.links = 0, port, []

    async def start(self):
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _link(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.links += [writer, up_writer]

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self):
        for writer in self.links:
            writer.transport.abort()
        self.links.clear()

    async def stop(self):
        self.cut()
        self.server.close()


async def test_a_lost_connection_is_livekits_error_and_the_next_turn_reconnects(server):
    proxy = _Proxy(server.port)
    await proxy.start()
    tts = plugin.TTS(url=f"ws://127.0.0.1:{proxy.port}/")
    errors = []
    tts.on("error", lambda ev: errors.append(ev.error))
    with pytest.raises(APIConnectionError):
        async with tts.stream(conn_options=OPTIONS) as stream:
            for token in TOKENS:
                stream.push_text(token)
            stream.end_input()
            async with asyncio.timeout(WAIT_S):
                async for _ in stream:
                    proxy.cut()
    assert errors and isinstance(errors[-1], APIConnectionError)
    _, words = await _speak(tts, TOKENS)
    await tts.aclose()
    await proxy.stop()
    assert words == WORDS

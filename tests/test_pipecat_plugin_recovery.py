"""The native Pipecat plugin (`Dia2TTSService`) in a real pipeline, against an in-process server
whose context fills after 100 frames with no rollover and whose idle timeout is 3 s: a refused
`start` and an engine reset leave the call able to speak (the next turn sends `start`), streamed
tokens go out as whole words, the keepalive `ping` keeps a quiet call open; and the README's
drop-in lines for the stock clients run as written. Loopback only; skipped without pipecat."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from compat_clients import need, start_server

need("pipecat.services.elevenlabs.tts", "websockets")

from pipecat.frames.frames import TTSStoppedFrame, TTSTextFrame  # noqa: E402

from test_compat_pipecat import LONG_TOKENS, TOKENS, Harness  # noqa: E402

pytestmark = pytest.mark.slow

WORDS = ["Hello", "there,", "how", "are", "you", "today?"]


@pytest.fixture(scope="module")
def server():
    srv = start_server(context_frames=100, rollover_frames=0, idle_timeout_s=3.0)
    yield srv
    srv.stop()


def _service(port: int, **kwargs):
    from dia2stream.integrations.pipecat import Dia2TTSService

    service = Dia2TTSService(url=f"ws://127.0.0.1:{port}/", **kwargs)
    service.sent = []
    send = service._send

    async def noting(command):
        service.sent.append(command)
        await send(command)
    service._send = noting
    return service


async def _turn(h, tokens=TOKENS) -> list[str]:
    """One LLM response; the words of its TTSTextFrames once it stopped."""
    stopped, words = len(h.collector.of(TTSStoppedFrame)), len(h.collector.of(TTSTextFrame))
    await h.say(tokens)
    await h.collector.until(lambda: len(h.collector.of(TTSStoppedFrame)) > stopped)
    return [f.text for f in h.collector.of(TTSTextFrame)][words:]


async def test_a_refused_voice_ends_the_turn_and_the_next_turn_starts_again(server):
    service = _service(server.port, voice="no_such_voice")
    async with Harness(service) as h:
        await _turn(h)  # refused: the turn still ends
        await _turn(h)
        assert [c["cmd"] for c in service.sent if c["cmd"] in ("start", "inject")] == ["start", "start"]
        service._voice = None  # the application fixes its voice: the same call speaks
        await asyncio.sleep(0.5)
        assert await _turn(h) == WORDS
    assert [c["cmd"] for c in service.sent if c["cmd"] in ("start", "inject")] == ["start"] * 3


async def test_after_the_engine_resets_the_call_the_next_turns_speak(server):
    service = _service(server.port)
    async with Harness(service) as h:
        await _turn(h, LONG_TOKENS)  # longer than 100 frames: `context_full`, the call is reset
        assert await _turn(h) == WORDS
        assert await _turn(h) == WORDS
    assert [c["cmd"] for c in service.sent].count("start") == 2  # the long turn's, then the turn after the reset


async def test_streamed_tokens_go_out_as_whole_words(server):
    service = _service(server.port, text_aggregation_mode=_token_mode())
    async with Harness(service) as h:
        assert await _turn(h, ["Un", "believ", "able", " sto", "ry", "."]) == ["Unbelievable", "story."]


def _token_mode():
    import pipecat.services.tts_service as tts_service

    return tts_service.TextAggregationMode.TOKEN


async def test_the_keepalive_keeps_a_quiet_call_open(server):
    service = _service(server.port, keepalive_s=1.0)
    async with Harness(service) as h:
        assert await _turn(h) == WORDS
        ws = service._websocket
        await asyncio.sleep(5.0)  # longer than the server's 3 s idle timeout
        assert await _turn(h) == WORDS
        assert service._websocket is ws  # the same, warm call
    assert {"cmd": "ping"} in service.sent


def _readme_lines() -> dict[str, ast.Call]:
    """The README's drop-in lines, by constructor name."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Drop-in for ElevenLabs", 1)[1].split("\n## ", 1)[0]
    calls = {}
    for line in block.splitlines():
        code = line.split("  #", 1)[0].strip()
        if code.startswith(("ElevenLabsTTSService(", "CartesiaTTSService(", "elevenlabs.TTS(", "cartesia.TTS(")):
            calls[code.split("(", 1)[0]] = ast.parse(code, mode="eval").body
    return calls


def _build(call: ast.Call, namespace: dict, port: int, **extra):
    """The README line's constructor, its arguments as written (the port changed)."""
    fn = eval(compile(ast.Expression(call.func), "README", "eval"), namespace)
    kwargs = {k.arg: eval(compile(ast.Expression(k.value), "README", "eval"), namespace) for k in call.keywords}
    kwargs = {k: v.replace("127.0.0.1:8765", f"127.0.0.1:{port}") if isinstance(v, str) else v for k, v in kwargs.items()}
    return fn(**kwargs, **extra)


@pytest.mark.parametrize("name", ["ElevenLabsTTSService", "CartesiaTTSService"])
async def test_the_readmes_pipecat_drop_in_lines_run_as_written(server, name):
    from pipecat.services.cartesia.tts import CartesiaTTSService
    from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

    namespace = {"ElevenLabsTTSService": ElevenLabsTTSService, "CartesiaTTSService": CartesiaTTSService}
    service = _build(_readme_lines()[name], namespace, server.port)
    async with Harness(service) as h:
        assert await _turn(h) == WORDS


@pytest.mark.parametrize("name", ["elevenlabs.TTS", "cartesia.TTS"])
async def test_the_readmes_livekit_drop_in_lines_run_as_written(server, name):
    need("livekit.plugins.elevenlabs", "livekit.plugins.cartesia", "aiohttp")
    import aiohttp
    from livekit.agents import APIConnectOptions
    from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
    from livekit.plugins import cartesia, elevenlabs

    async with aiohttp.ClientSession() as session:
        # outside an agent job LiveKit has no HTTP session of its own: the only argument added
        tts = _build(_readme_lines()[name], {"elevenlabs": elevenlabs, "cartesia": cartesia}, server.port,
                     http_session=session)
        words = []
        async with tts.stream(conn_options=APIConnectOptions(timeout=60, max_retry=0)) as stream:
            for token in TOKENS:
                stream.push_text(token)
            stream.end_input()
            async with asyncio.timeout(120):
                async for ev in stream:
                    words.extend(ev.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT) or [])
        await tts.aclose()
    assert [w.strip() for w in words] == WORDS

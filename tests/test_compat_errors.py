"""Bad input on every compatible endpoint gets that API's error shape, and never disturbs another
call on the same server. Raw websockets clients (no extras needed)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from compat_clients import start_server

pytestmark = pytest.mark.slow

WAIT_S = 60.0
EL = "/v1/text-to-speech/{voice}/multi-stream-input?output_format={fmt}"


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    srv.stop()


async def _messages(ws, until, timeout=WAIT_S) -> list:
    """Read until `until(message)` is true (bounded in time); the messages, decoded."""
    out = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            msg = raw if isinstance(raw, bytes) else json.loads(raw)
            out.append(msg)
            if until(msg):
                return out


async def _elevenlabs_turn(port: int, context: str = "c1") -> int:
    """One normal ElevenLabs context on its own connection; the audio bytes it got."""
    async with connect(f"ws://127.0.0.1:{port}" + EL.format(voice="default", fmt="pcm_16000")) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": context}))
        await ws.send(json.dumps({"text": "Hello there, how are you today? ", "context_id": context, "flush": True}))
        await ws.send(json.dumps({"context_id": context, "close_context": True}))
        msgs = await _messages(ws, lambda m: isinstance(m, dict) and m.get("isFinal"))
    assert not [m for m in msgs if "error" in m], msgs
    return sum(len(base64.b64decode(m["audio"])) for m in msgs if m.get("audio"))


async def test_elevenlabs_refusals_at_connect(server):
    for voice, fmt, code in (("nobody", "pcm_24000", "voice_not_found"),
                             ("default", "opus_48000_32", "invalid_output_format"),
                             ("default", "pcm_12345", "invalid_output_format")):
        async with connect(f"ws://127.0.0.1:{server.port}" + EL.format(voice=voice, fmt=fmt)) as ws:
            msg = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert msg["error"] == code and msg["message"], msg
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), WAIT_S)
            assert ws.close_code == 1008


async def test_elevenlabs_bad_messages_leave_the_connection_and_other_calls_working(server):
    url = f"ws://127.0.0.1:{server.port}" + EL.format(voice="default", fmt="pcm_24000")
    other = asyncio.create_task(_elevenlabs_turn(server.port, "other"))
    async with connect(url) as ws:
        for bad in ("not json", "[1, 2]", json.dumps({"text": 5, "context_id": "a"}),
                    json.dumps({"text": "hi", "context_id": "a", "flush": "yes"}),
                    json.dumps({"text": "no context"}), json.dumps({"text": "x", "context_id": ""})):
            await ws.send(bad)
            msg = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert msg["error"] == "invalid_message" and msg["message"], (bad, msg)
        # more than five open contexts: the sixth is refused in ElevenLabs' shape, naming it
        for i in range(6):
            await ws.send(json.dumps({"text": " ", "context_id": f"k{i}", "unknown_field": 1}))
        msg = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert msg["error"] == "max_active_conversations" and msg["contextId"] == "k5"
        # and the connection still speaks
        await ws.send(json.dumps({"text": "Fine, thanks. ", "context_id": "k0", "flush": True}))
        await ws.send(json.dumps({"context_id": "k0", "close_context": True}))
        msgs = await _messages(ws, lambda m: m.get("isFinal") and m.get("contextId") == "k0")
        assert any(m.get("audio") for m in msgs)
    assert await other > 0


async def test_cartesia_errors_in_its_shape(server):
    async with connect(f"ws://127.0.0.1:{server.port}/tts/websocket?cartesia_version=2025-04-16") as ws:
        base = {"context_id": "c", "model_id": "sonic-2", "voice": {"mode": "id", "id": "default"},
                "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000}}
        for bad in ("{", json.dumps({**base, "voice": {"mode": "id", "id": "nobody"}, "transcript": "Hi"}),
                    json.dumps({**base, "output_format": {"container": "mp3"}, "transcript": "Hi"}),
                    json.dumps({**base, "output_format": {"container": "raw", "encoding": "pcm_s16le",
                                                          "sample_rate": 11}, "transcript": "Hi"}),
                    json.dumps({"transcript": "no context"})):
            await ws.send(bad)
            msg = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert msg["type"] == "error" and msg["error"] and msg["done"] is True, (bad, msg)
        await ws.send(json.dumps({**base, "transcript": "Hello there. ", "continue": False, "add_timestamps": True}))
        msgs = await _messages(ws, lambda m: m.get("type") == "done")
        assert {m["type"] for m in msgs} >= {"chunk", "timestamps", "done"}
        words = [w for m in msgs if m["type"] == "timestamps" for w in m["word_timestamps"]["words"]]
        assert words == ["Hello", "there."]


async def test_deepgram_errors_in_its_shape(server):
    async with connect(f"ws://127.0.0.1:{server.port}/v1/speak?encoding=opus") as ws:
        msg = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert msg["type"] == "Error" and msg["err_code"] == "INVALID_QUERY"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT_S)
    async with connect(f"ws://127.0.0.1:{server.port}/v1/speak?encoding=mulaw&sample_rate=8000") as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))["type"] == "Metadata"
        for bad in ("nope", json.dumps({"type": "Sing"}), json.dumps({"type": "Speak", "text": 3})):
            await ws.send(bad)
            msg = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert msg["type"] == "Error" and msg["err_msg"], (bad, msg)
        await ws.send(json.dumps({"type": "Speak", "text": "Hello there."}))
        await ws.send(json.dumps({"type": "Flush"}))
        msgs = await _messages(ws, lambda m: isinstance(m, dict) and m.get("type") == "Flushed")
        audio = b"".join(m for m in msgs if isinstance(m, bytes))
        assert len(audio) >= 640 and msgs[-1]["sequence_id"] == 1  # µ-law, one byte a sample at 8 kHz
        await ws.send(json.dumps({"type": "Close"}))
        with pytest.raises(ConnectionClosed):
            await _messages(ws, lambda m: False)
        assert ws.close_code == 1000


async def test_busy_is_refused_in_each_apis_shape():
    srv = start_server(max_calls=1)
    try:
        async with connect(f"ws://127.0.0.1:{srv.port}/v1/speak") as holder:
            await asyncio.wait_for(holder.recv(), WAIT_S)  # Metadata: the only slot is taken
            for path, check in ((EL.format(voice="default", fmt="pcm_24000"), lambda m: m["error"] == "busy"),
                                ("/tts/websocket", lambda m: m["type"] == "error"),
                                ("/v1/speak", lambda m: m["type"] == "Error" and m["err_code"] == "busy")):
                async with connect(f"ws://127.0.0.1:{srv.port}{path}") as ws:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
                    assert check(msg), msg
                    with pytest.raises(ConnectionClosed):
                        await asyncio.wait_for(ws.recv(), WAIT_S)
                    assert ws.close_code == 1013
    finally:
        srv.stop()


async def test_the_apis_key_headers_carry_the_token():
    srv = start_server(auth_token="s3cret")
    try:
        for path, headers in ((EL.format(voice="default", fmt="pcm_24000"), {"xi-api-key": "s3cret"}),
                              ("/tts/websocket", {"X-API-Key": "s3cret"}),
                              ("/v1/speak", {"Authorization": "Token s3cret"})):
            async with connect(f"ws://127.0.0.1:{srv.port}{path}", additional_headers=headers):
                pass
            with pytest.raises(Exception, match="401"):
                async with connect(f"ws://127.0.0.1:{srv.port}{path}", additional_headers={"xi-api-key": "wrong"}):
                    pass
    finally:
        srv.stop()


async def test_shutdown_closes_compatible_connections_going_away():
    srv = start_server()
    try:
        async with connect(f"ws://127.0.0.1:{srv.port}" + EL.format(voice="default", fmt="pcm_24000")) as ws:
            await ws.send(json.dumps({"text": "One two three four five six seven eight nine ten. ", "context_id": "c"}))
            await asyncio.wait_for(ws.recv(), WAIT_S)  # speaking
            stopping = asyncio.create_task(asyncio.to_thread(srv.stop))
            seen = []
            with pytest.raises(ConnectionClosed):
                await _messages(ws, lambda m: seen.append(m) and False)
            assert ws.close_code == 1001
            assert seen[-1]["error"] == "shutting_down"  # in ElevenLabs' error shape
            await stopping
    finally:
        if srv._thread.is_alive():
            srv.stop()

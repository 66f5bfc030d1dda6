"""The POST endpoints on --http-port: ElevenLabs' REST text-to-speech (whole, chunked, with
timestamps, through pipecat's own ElevenLabsHttpTTSService) and the native /v1/speech; busy as
503 + Retry-After, errors in each API's shape. Loopback only; skipped without aiohttp."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest

from compat_clients import free_port, need, start_server

need("aiohttp")

import aiohttp  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_S = 60.0
TIMEOUT = aiohttp.ClientTimeout(total=WAIT_S * 2)


@pytest.fixture(scope="module")
def server():
    port = free_port()
    srv = start_server(http_port=port)
    srv.http = f"http://127.0.0.1:{port}"
    yield srv
    srv.stop()


async def test_elevenlabs_whole_stream_and_timestamps(server):
    body = {"text": "Hello there, how are you?", "model_id": "eleven_flash_v2_5", "voice_settings": {"stability": 0.5}}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(f"{server.http}/v1/text-to-speech/default?output_format=pcm_24000", json=body) as r:
            assert r.status == 200
            whole = await r.read()
        async with http.post(f"{server.http}/v1/text-to-speech/default/stream?output_format=pcm_16000", json=body) as r:
            assert r.status == 200
            streamed = b"".join([chunk async for chunk in r.content.iter_any()])
        async with http.post(f"{server.http}/v1/text-to-speech/default/stream/with-timestamps", json=body,
                             params={"output_format": "pcm_24000"}) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines() if line.strip()]
    assert whole and len(whole) % 3840 == 0  # whole 80 ms frames at 24 kHz
    assert streamed and len(streamed) % 2 == 0
    audio = b"".join(base64.b64decode(line["audio_base64"]) for line in lines)
    assert len(audio) % 3840 == 0
    chars = "".join(c for line in lines if "alignment" in line for c in line["alignment"]["characters"])
    assert chars.split() == ["Hello", "there,", "how", "are", "you?"]
    ends = [t for line in lines if "alignment" in line for t in line["alignment"]["character_end_times_seconds"]]
    assert ends == sorted(ends) and abs(ends[-1] - len(audio) / 2 / 24000) < 1e-3


async def test_pipecat_elevenlabs_http_service(server):
    need("pipecat.services.elevenlabs.tts")
    from pipecat.frames.frames import TTSAudioRawFrame, TTSStoppedFrame, TTSTextFrame
    from pipecat.services.elevenlabs.tts import ElevenLabsHttpTTSService
    from test_compat_pipecat import TOKENS, Harness

    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        service = ElevenLabsHttpTTSService(api_key="any-key", aiohttp_session=http, base_url=server.http,
                                           sample_rate=24000,
                                           settings=ElevenLabsHttpTTSService.Settings(voice="default"))
        async with Harness(service) as h:
            await h.say(TOKENS)
            await h.collector.until(lambda: h.collector.of(TTSStoppedFrame))
    assert [f.text for f in h.collector.of(TTSTextFrame)] == ["Hello", "there,", "how", "are", "you", "today?"]
    assert h.audio_bytes() > 0 and h.audio_bytes() % 3840 == 0
    assert all(isinstance(f, TTSAudioRawFrame) for f in h.collector.of(TTSAudioRawFrame))


async def test_native_speech_wav_and_frames(server):
    import soundfile as sf

    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        body = {"text": "[S1] Hello there.", "format": "pcm_16000"}
        async with http.post(f"{server.http}/v1/speech", json=body) as r:
            assert r.status == 200 and r.content_type == "audio/wav"
            samples, rate = sf.read(io.BytesIO(await r.read()), dtype="int16")
        async with http.post(f"{server.http}/v1/speech", json={"text": "[S1] Hello there.", "format": "ulaw_8000"},
                             headers={"Accept": "application/octet-stream"}) as r:
            data = await r.read()
    assert rate == 16000 and len(samples) > 0 and len(samples) % 1280 == 0
    assert data and len(data) % 644 == 0  # native frames: 4-byte count + 640 µ-law bytes


async def test_errors_in_each_shape_and_busy_is_503():
    port = free_port()
    srv = start_server(http_port=port, max_calls=1)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            for url, body, status, code in ((f"{base}/v1/text-to-speech/nobody", {"text": "Hi"}, 404,
                                             "voice_not_found"),
                                            (f"{base}/v1/text-to-speech/default?output_format=ogg", {"text": "Hi"}, 422,
                                             "invalid_output_format"),
                                            (f"{base}/v1/text-to-speech/default", {"text": ""}, 400, "empty_text")):
                async with http.post(url, json=body) as r:
                    assert r.status == status and (await r.json())["detail"]["status"] == code
            async with http.post(f"{base}/v1/speech", data=b"{not json") as r:
                assert r.status == 400 and (await r.json())["code"] == "invalid_json"
            async with http.post(f"{base}/v1/speech", json={"text": "Hi", "colour": "red"}) as r:
                assert r.status == 400 and (await r.json())["code"] == "invalid_field"
            # the only slot is held by a websocket call: a request is refused, with Retry-After
            from websockets.asyncio.client import connect

            async with connect(f"ws://127.0.0.1:{srv.port}/v1/speak") as ws:
                await asyncio.wait_for(ws.recv(), WAIT_S)
                async with http.post(f"{base}/v1/speech", json={"text": "Hi"}) as r:
                    assert r.status == 503 and r.headers["Retry-After"] == "1"
                    assert (await r.json())["code"] == "busy"
            # and once it is free, requests are served again (bounded retries: the slot frees within a frame)
            for _ in range(50):
                async with http.post(f"{base}/v1/speech", json={"text": "[S1] Hi there."}) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert r.status == 200
    finally:
        srv.stop()


async def test_a_port_in_use_fails_the_start_and_leaves_no_runner_behind(monkeypatch):
    import socket

    from aiohttp import web

    from dia2stream.serve.http_api import start_http_api

    cleaned = []
    real_cleanup = web.AppRunner.cleanup

    async def cleanup(runner):
        cleaned.append(runner)
        await real_cleanup(runner)

    monkeypatch.setattr(web.AppRunner, "cleanup", cleanup)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            await start_http_api(object(), "127.0.0.1", taken.getsockname()[1])
    assert len(cleaned) == 1
    runner, port = await start_http_api(object(), "127.0.0.1", 0)  # a free port still starts
    assert port > 0
    await runner.cleanup()

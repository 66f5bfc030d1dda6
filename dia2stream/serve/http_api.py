"""POST endpoints on `--http-port` (aiohttp's web server): ElevenLabs' REST text-to-speech and a
native `POST /v1/speech`, each request one short call on the engine.

    POST /v1/text-to-speech/{voice_id}                        whole audio body
    POST /v1/text-to-speech/{voice_id}/stream                 chunked audio as it is made
    POST /v1/text-to-speech/{voice_id}/stream/with-timestamps JSON lines: audio_base64 + alignment
    POST /v1/speech   {"text", "voice", "format"}              WAV; chunked native frames with
                                                               Accept: application/octet-stream

A request takes a call slot like a websocket call (HTTP 503 with Retry-After when none is free),
passes the same token check (`HttpGate.authorized`: Bearer, the APIs' key headers, ?token=),
and a client that goes away ends its call within a frame. Why a second port: docs/compat.md.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from contextlib import asynccontextmanager

import numpy as np
from aiohttp import web
from websockets.datastructures import Headers
from websockets.http11 import Request

from dia2stream.clock import FRAME_SECONDS
from dia2stream.wire.frames import AudioFrame, FrameWriter
from dia2stream.serve.outbox import Outbox
from dia2stream.wire import protocol as p
from dia2stream.wire.compat.audio import StreamEncoder, parse_elevenlabs_format
from dia2stream.wire.compat.elevenlabs import DEFAULT_FORMAT, DEFAULT_VOICE_ID
from dia2stream.wire.formats import FORMATS, decode_frame

log = logging.getLogger("dia2stream.http")

RETRY_AFTER_S = 1
MAX_BODY_BYTES = 64 * 1024
SHUTDOWN_S = 0.5


class Refused(Exception):
    """A request we answer with an error in the API's shape (`status`, `code`, `message`)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class HttpApi:
    def __init__(self, server) -> None:
        self.server = server
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.add_routes([
            web.post("/v1/text-to-speech/{voice}", self.elevenlabs),
            web.post("/v1/text-to-speech/{voice}/stream", self.elevenlabs),
            web.post("/v1/text-to-speech/{voice}/stream/with-timestamps", self.elevenlabs),
            web.post("/v1/speech", self.speech),
        ])

    # -- ElevenLabs -----------------------------------------------------------------------------------

    async def elevenlabs(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_access(request)
            voice = self._voice(request.match_info["voice"], DEFAULT_VOICE_ID)
            try:
                output = parse_elevenlabs_format(request.query.get("output_format", DEFAULT_FORMAT))
            except ValueError as exc:
                raise Refused(422, "invalid_output_format", str(exc)) from None
            text = _text(await _json_body(request))
            mode = request.path.rsplit("/", 1)[-1]
            async with self._call() as items:
                if mode == "with-timestamps":
                    return await _elevenlabs_timestamps(request, items, text, voice, StreamEncoder(output))
                return await _elevenlabs_audio(request, items, text, voice, StreamEncoder(output),
                                               streaming=mode == "stream")
        except Refused as err:
            return _refusal(err, {"detail": {"status": err.code, "message": err.message}})

    # -- native ---------------------------------------------------------------------------------------

    async def speech(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_access(request)
            body = await _json_body(request)
            unknown = set(body) - {"text", "voice", "format"}
            if unknown:
                raise Refused(400, p.ErrorCode.INVALID_FIELD, f"unknown field(s): {', '.join(sorted(unknown))}")
            text = _text(body)
            voice = self._voice(body.get("voice"), None)
            fmt = body.get("format", "pcm_24000")
            if fmt not in FORMATS:
                raise Refused(400, p.ErrorCode.INVALID_FIELD, f"format: one of {', '.join(FORMATS)}")
            frames = request.headers.get("Accept", "") == "application/octet-stream"
            async with self._call() as items:
                start = p.Start(text=text, voice=voice, format=fmt, id=1)
                if frames:
                    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                    response.enable_chunked_encoding()
                    await response.prepare(request)
                    writer = FrameWriter()
                    async for item in items(start):
                        if isinstance(item, AudioFrame):
                            await response.write(writer.message(item))
                    await response.write_eof()
                    return response
                writer = FrameWriter()
                pcm = [decode_frame(writer.message(item), fmt) async for item in items(start)
                       if isinstance(item, AudioFrame)]
                return web.Response(body=_wav(pcm, FORMATS[fmt].sample_rate), content_type="audio/wav")
        except Refused as err:
            return _refusal(err, {"event": "error", "code": err.code, "message": err.message})

    # -- shared ---------------------------------------------------------------------------------------

    def _check_access(self, request: web.Request) -> None:
        if self.server.stopping:
            raise Refused(503, p.ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        probe = Request(request.path_qs, Headers(list(request.headers.items())))
        if not self.server.gate.authorized(probe):
            self.server.metrics.call_refused("unauthorized")
            raise Refused(401, "unauthorized", "missing or wrong token")

    def _voice(self, name, default):
        if name is None or name == default:
            return None
        voices = list(self.server.engine.voices)
        if name not in voices:
            raise Refused(404, "voice_not_found",
                          f"no voice named {name!r} (prepared: {', '.join(sorted(voices)) or 'none'})")
        return name

    @asynccontextmanager
    async def _call(self):
        """A call for one request; `items(start)` submits `start` and yields the call's items up
        to its `done` (an error before any audio is a `Refused`)."""
        engine, server = self.server.engine, self.server
        outbox = Outbox(asyncio.get_running_loop(), server.limits, on_overflow=lambda: None)
        call = engine.open_call(outbox.put_threadsafe)
        if call is None:
            server.metrics.call_refused("busy")
            server.metrics.error(p.ErrorCode.BUSY)
            raise Refused(503, p.ErrorCode.BUSY, "all call slots are taken; try again later")
        server.metrics.calls_active(engine.calls)

        async def items(start: p.Start):
            engine.submit(call, start)
            audio = False
            while True:
                item = await outbox.get()
                if isinstance(item, p.ErrorEvent):
                    if not audio:
                        raise Refused(400, item.code, item.message)
                    log.warning("call %d: %s after audio: %s", call.slot.index, item.code, item.message)
                    return
                if isinstance(item, AudioFrame):
                    call.frames_acked += 1
                    server.metrics.frames_sent(1)
                    audio = True
                yield item
                if isinstance(item, p.Done):
                    return

        try:
            yield items
        finally:
            engine.close_call(call)
            server.metrics.calls_active(engine.calls)


async def _elevenlabs_audio(request, items, text, voice, encoder, streaming: bool) -> web.StreamResponse:
    start = p.Start(text=text, voice=voice, format="pcm_24000", id=1)
    headers = {"Content-Type": encoder.format.mime_type}
    if not streaming:
        chunks = [encoder.encode(item.pcm) async for item in items(start) if isinstance(item, AudioFrame)]
        return web.Response(body=b"".join(chunks) + encoder.finish(), headers=headers)
    response = web.StreamResponse(headers=headers)
    response.enable_chunked_encoding()
    async for item in items(start):
        if isinstance(item, AudioFrame):
            if not response.prepared:
                await response.prepare(request)
            await response.write(encoder.encode(item.pcm))
    if not response.prepared:
        await response.prepare(request)
    await response.write(encoder.finish())
    await response.write_eof()
    return response


async def _elevenlabs_timestamps(request, items, text, voice, encoder) -> web.StreamResponse:
    """JSON lines, one per frame: `audio_base64` and, for frames where words start, `alignment`
    (and the same `normalized_alignment`) with times in seconds from the start of the audio."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    words: list[str] = []
    frames = 0
    async for item in items(p.Start(text=text, voice=voice, format="pcm_24000", id=1)):
        if isinstance(item, p.Word):
            words.append(item.word)
        elif isinstance(item, AudioFrame):
            if not response.prepared:
                await response.prepare(request)
            line = {"audio_base64": base64.b64encode(encoder.encode(item.pcm)).decode("ascii")}
            line.update(_http_alignment(words, frames * FRAME_SECONDS, FRAME_SECONDS))
            words = []
            frames += 1
            await response.write(json.dumps(line).encode() + b"\n")
    if not response.prepared:
        await response.prepare(request)
    # the rest of the audio, and a " " to the end of it: the last word closes, and a client's
    # clock (pipecat adds the last end time) moves on by the whole utterance
    end = round(frames * FRAME_SECONDS, 3)
    line = {"audio_base64": base64.b64encode(encoder.finish()).decode("ascii")}
    line.update(_http_alignment(words + [""], end, 0.0))
    await response.write(json.dumps(line).encode() + b"\n")
    await response.write_eof()
    return response


def _http_alignment(words: list[str], start_s: float, span_s: float) -> dict:
    if not words:
        return {}
    chars, starts, ends = [], [], []
    for i, word in enumerate(words):
        lo = start_s + span_s * i / len(words)
        hi = start_s + span_s * (i + 1) / len(words)
        letters = list(word) + [" "]
        for j, letter in enumerate(letters):
            chars.append(letter)
            starts.append(round(lo + (hi - lo) * j / len(letters), 3))
            ends.append(round(lo + (hi - lo) * (j + 1) / len(letters), 3))
    alignment = {"characters": chars, "character_start_times_seconds": starts, "character_end_times_seconds": ends}
    return {"alignment": alignment, "normalized_alignment": alignment}


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Refused(400, p.ErrorCode.INVALID_JSON, f"the body is not JSON: {exc}") from None
    except web.HTTPRequestEntityTooLarge:
        raise Refused(413, p.ErrorCode.MESSAGE_TOO_LARGE, f"a body may be at most {MAX_BODY_BYTES} bytes") from None
    if not isinstance(body, dict):
        raise Refused(400, p.ErrorCode.INVALID_MESSAGE, "the body must be a JSON object")
    return body


def _text(body: dict) -> str:
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Refused(400, p.ErrorCode.EMPTY_TEXT if isinstance(text, str) else p.ErrorCode.INVALID_FIELD,
                      "text: a non-empty string is required")
    if len(text) > p.MAX_TEXT_CHARS:
        raise Refused(400, p.ErrorCode.TEXT_TOO_LONG, f"text: at most {p.MAX_TEXT_CHARS} characters")
    return text


def _wav(pcm: list[np.ndarray], rate: int) -> bytes:
    import soundfile as sf

    out = io.BytesIO()
    samples = np.concatenate(pcm) if pcm else np.zeros(0, np.int16)
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _refusal(err: Refused, body: dict) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
    return web.json_response(body, status=err.status, headers=headers)


async def start_http_api(server, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on `port` (0: a free one); the runner (cleanup() at shutdown) and the port."""
    # a streaming request in flight must not hold a stopping server (aiohttp waits 60 s by default)
    runner = web.AppRunner(HttpApi(server).app, access_log=None, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()  # a port in use: the runner set up must not outlive the failed start
        raise
    bound = runner.addresses[0][1]
    log.info("HTTP API on http://%s:%d/", host, bound)
    return runner, bound

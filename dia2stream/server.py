"""The websockets server: connects the wire protocol to the streaming session.

One handler coroutine per connection parses commands and hands them to the session; one sender
task per connection writes the session's events and frames in order. No model work happens on
the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import protocol as p
from .config import ServerConfig
from .session import AudioFrame, SessionConfig, StreamingSession
from .voice import VoiceRequest, VoiceSettings

log = logging.getLogger("dia2stream")

CLOSE_TRY_AGAIN_LATER = 1013


class Dia2Server:
    def __init__(self, session: StreamingSession, model_name: str, device: str, max_lead_ms: float):
        self.session, self.model_name, self.device, self.max_lead_ms = session, model_name, device, max_lead_ms

    # -- HTTP before the upgrade ----------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != "/health":
            return None
        body = json.dumps({"status": "ok", "model": self.model_name, "device": self.device,
                           "busy": self.session.busy}).encode()
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-store")])
        return Response(HTTPStatus.OK, "OK", headers, body)

    # -- one connection -------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:  # called from the generation thread
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:
                pass  # loop closed during shutdown

        peer = ws.remote_address
        if not self.session.attach(sink):
            log.info("refused %s: busy", peer)
            await ws.send(p.ErrorEvent(code=p.ErrorCode.BUSY, message="another client holds the session").to_json())
            await ws.close(CLOSE_TRY_AGAIN_LATER, "busy")
            return
        log.info("client %s connected", peer)
        sender = None
        try:
            # `ready` goes out before the sender task exists: it is always the first message.
            await ws.send(p.Ready(model=self.model_name, device=self.device, voices=list(self.session.voices),
                                  max_lead_ms=int(self.max_lead_ms),
                                  context_frames=self.session.context_frames).to_json())
            sender = asyncio.create_task(self._send_loop(ws, out))
            async for message in ws:
                self._dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            self.session.detach(sink)
            if sender is not None:
                sender.cancel()
            log.info("client %s disconnected", peer)

    def _dispatch(self, message) -> None:
        # Answers made here still go through the session's queue, so events answer commands in the
        # order the commands were received (an error for a bad message never overtakes the
        # `started` of the `start` before it).
        try:
            command = p.parse_command(message)
        except p.ProtocolError as err:
            log.info("bad command: %s %s", err.code, err.message)
            self.session.reply(err.to_event())
            return
        log.info("cmd %s%s", command.cmd, f" id={command.id}" if getattr(command, "id", None) is not None else "")
        if isinstance(command, p.Ping):
            self.session.reply(p.Pong(id=command.id))
        else:  # set_voice and voices too: voices live on the generation thread
            self.session.submit(command)

    async def _send_loop(self, ws: ServerConnection, out: asyncio.Queue) -> None:
        sent_in_turn = 0  # frames really written for the current utterance (dropped ones excluded)
        try:
            while True:
                item = await out.get()
                if isinstance(item, AudioFrame):
                    self.session.frames_acked += 1
                    if item.epoch < self.session.min_epoch:
                        continue  # generated before a pause/reset: never play stale audio
                    await ws.send(p.encode_audio_frame(item.pcm))
                    sent_in_turn += 1
                    continue
                if isinstance(item, p.Started):
                    sent_in_turn = 0
                elif isinstance(item, p.Paused) and item.frames_sent:
                    item = dataclasses.replace(item, frames_sent=sent_in_turn, audio_s=round(sent_in_turn / p.FRAME_RATE, 3))
                elif isinstance(item, p.Done):
                    item = dataclasses.replace(item, frames=sent_in_turn, audio_s=round(sent_in_turn / p.FRAME_RATE, 3))
                await ws.send(item.to_json())
        except ConnectionClosed:
            pass


def build_session(config: ServerConfig):
    """Load the model and make the session (CUDA graphs, if any, are captured here, not on the first request)."""
    import torch

    from vendor_dia2 import Dia2

    threads = config.threads
    if threads is None and (os.cpu_count() or 1) <= 2 and not (config.device or "").startswith("cuda") \
            and not torch.cuda.is_available():
        threads = 1  # two spinning OpenMP threads fight the event loop on a 2-core box (up to 10x slower)
    if threads:
        torch.set_num_threads(threads)
    # The generation thread waits on the GPU once a frame; with the default 5 ms GIL switch
    # interval the event loop can hold it that long when the frame is done.
    sys.setswitchinterval(0.0005)
    t0 = time.perf_counter()
    tts = Dia2.from_pretrained(config.checkpoint, device=config.device, dtype=config.dtype, mimi=config.mimi)
    tts.compile_steps = config.compile == "on" or (config.compile == "auto" and tts.device.type == "cuda")
    voice = VoiceSettings(voice_dir=config.voice_dir, max_seconds=config.max_voice_seconds,
                          whisper_model=config.whisper_model, cache_dir=config.voice_cache)
    session = StreamingSession(tts, SessionConfig(max_lead_ms=config.max_lead_ms, context_frames=config.context_frames,
                                                  cfg_scale=config.cfg_scale, seed=config.seed, voice=voice))
    log.info("loaded %s on %s (%s) in %.1f s", tts.name, tts.device, tts.dtype, time.perf_counter() - t0)
    try:
        for spec in config.voices:
            state = session.preload_voice(parse_voice_spec(spec))
            log.info("voice %s ready (%.2f s prefix, %.0f ms)", state.name, state.prefix_s, state.prepare_ms)
    except BaseException:
        session.close()
        raise
    return tts, session


def parse_voice_spec(spec: str) -> VoiceRequest:
    """`NAME=PATH[,TRANSCRIPT]` (the transcript is everything after the first comma; a transcript
    starting with @ names a text file)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--voice {spec!r}: expected NAME=PATH[,TRANSCRIPT]")
    if not p.VOICE_NAME_RE.match(name):
        raise ValueError(f"--voice {spec!r}: the name must be 1-64 characters of A-Z a-z 0-9 _ . -")
    path, _, transcript = rest.partition(",")
    transcript = transcript.strip() or None
    if transcript and transcript.startswith("@"):
        with open(transcript[1:], encoding="utf-8") as f:
            transcript = f.read().strip()
    return VoiceRequest(name=name, path=path, transcript=transcript, trusted=True)


async def run(config: ServerConfig, ready: asyncio.Future | concurrent.futures.Future | None = None,
              stop: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM or until `stop` is set.

    `ready` receives the listening port (useful with port 0), or the exception if the server
    could not start; a `concurrent.futures.Future` lets another thread wait for it.
    """
    stop = stop or asyncio.Event()
    session = None
    try:
        tts, session = await asyncio.to_thread(build_session, config)
        server = Dia2Server(session, tts.name, str(tts.device), config.max_lead_ms)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests) or no signals on this platform
        async with serve(server.handle, config.host, config.port, process_request=server.process_request,
                         max_size=p.MAX_MESSAGE_BYTES) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            log.info("listening on ws://%s:%d/", config.host, port)
            print(f"dia2stream ready on ws://{config.host}:{port}/", flush=True)
            if ready is not None:
                ready.set_result(port)
            await stop.wait()
    except BaseException as exc:
        if ready is not None and not ready.done():
            if isinstance(exc, Exception):
                ready.set_exception(exc)
            else:
                ready.cancel()
        raise
    finally:
        if session is not None:
            await asyncio.to_thread(session.close)

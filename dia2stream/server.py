"""The websockets server: connects the wire protocol to the engine's calls.

One handler coroutine per connection opens a call on the engine, parses commands and hands them
to it; one sender task per connection writes the call's events and frames in order. No model
work happens on the event loop.
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
from .call import AudioFrame, Call
from .engine import Engine, EngineConfig
from .voice import VoiceRequest, VoiceSettings

log = logging.getLogger("dia2stream")

CLOSE_TRY_AGAIN_LATER = 1013


class Dia2Server:
    def __init__(self, engine: Engine, model_name: str, device: str, max_lead_ms: float):
        self.engine, self.model_name, self.device, self.max_lead_ms = engine, model_name, device, max_lead_ms

    # -- HTTP before the upgrade ----------------------------------------------------------------

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "device": self.device, **self.engine.health()}

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != "/health":
            return None
        body = json.dumps(self.health()).encode()
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
        call = self.engine.open_call(sink)
        if call is None:
            health = self.engine.health()
            why = "the server is behind real time" if health["overloaded"] else \
                f"all {health['max_calls']} call slots are taken"
            log.info("refused %s: busy (%s)", peer, why)
            await ws.send(p.ErrorEvent(code=p.ErrorCode.BUSY, message=f"{why}; try again later").to_json())
            await ws.close(CLOSE_TRY_AGAIN_LATER, "busy")
            return
        log.info("client %s connected (call %d)", peer, call.slot)
        sender = None
        try:
            # `ready` goes out before the sender task exists: it is always the first message.
            await ws.send(p.Ready(model=self.model_name, device=self.device, voices=list(self.engine.voices),
                                  max_lead_ms=int(self.max_lead_ms),
                                  context_frames=self.engine.context_frames).to_json())
            sender = asyncio.create_task(self._send_loop(ws, call, out))
            async for message in ws:
                self._dispatch(call, message)
        except ConnectionClosed:
            pass
        finally:
            self.engine.close_call(call)
            if sender is not None:
                sender.cancel()
            log.info("client %s disconnected (call %d)", peer, call.slot)

    def _dispatch(self, call: Call, message) -> None:
        # Answers made here still go through the engine's queue, so events answer commands in the
        # order the commands were received (an error for a bad message never overtakes the
        # `started` of the `start` before it).
        try:
            command = p.parse_command(message)
        except p.ProtocolError as err:
            log.info("call %d: bad command: %s %s", call.slot, err.code, err.message)
            self.engine.reply(call, err.to_event())
            return
        log.debug("call %d: cmd %s", call.slot, command.cmd)
        if isinstance(command, p.Ping):
            self.engine.reply(call, p.Pong(id=command.id))
        else:  # set_voice and voices too: voices live on the generation thread
            self.engine.submit(call, command)

    async def _send_loop(self, ws: ServerConnection, call: Call, out: asyncio.Queue) -> None:
        sent_in_turn = 0  # frames really written for the current utterance (dropped ones excluded)
        try:
            while True:
                item = await out.get()
                if isinstance(item, AudioFrame):
                    call.frames_acked += 1
                    if item.epoch < call.epoch:
                        continue  # generated before a pause/reset: never play stale audio
                    await ws.send(item.data)
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


def default_max_calls(device) -> int:
    """One call on CPU; on a GPU, 64: measured on an H100 at the 2b shape, a batched step for 64
    calls (~25 ms) plus their batched Mimi decode (~4 ms) stays far inside a frame's 80 ms
    (docs/benchmarks.md). The engine still refuses calls if it ever falls behind."""
    return 64 if str(device).startswith("cuda") else 1


def build_engine(config: ServerConfig):
    """Load the model and make the engine (CUDA graphs, if any, are captured here, not on the first request)."""
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
    compile_steps = config.compile == "on" or (config.compile == "auto" and tts.device.type == "cuda")
    max_calls = config.max_calls or default_max_calls(tts.device)
    voice = VoiceSettings(voice_dir=config.voice_dir, max_seconds=config.max_voice_seconds,
                          whisper_model=config.whisper_model, cache_dir=config.voice_cache)
    engine = Engine(tts, EngineConfig(max_calls=max_calls, max_lead_ms=config.max_lead_ms,
                                      context_frames=config.context_frames, cfg_scale=config.cfg_scale,
                                      seed=config.seed, voice=voice, lead_in_frames=config.lead_in_frames,
                                      rollover_frames=config.rollover_frames, prefix_boundary=config.prefix_boundary,
                                      compile=compile_steps))
    log.info("loaded %s on %s (%s) in %.1f s: %d call slots, step batch sizes %s", tts.name, tts.device, tts.dtype,
             time.perf_counter() - t0, max_calls, engine.stepper.batch_sizes)
    try:
        for spec in config.voices:
            state = engine.preload_voice(parse_voice_spec(spec))
            log.info("voice %s ready (%.2f s prefix, %.0f ms)", state.name, state.prefix_s, state.prepare_ms)
    except BaseException:
        engine.close()
        raise
    return tts, engine


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
    engine = None
    try:
        tts, engine = await asyncio.to_thread(build_engine, config)
        server = Dia2Server(engine, tts.name, str(tts.device), config.max_lead_ms)
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
        if engine is not None:
            await asyncio.to_thread(engine.close)

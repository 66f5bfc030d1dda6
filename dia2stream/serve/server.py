"""The websockets server: connects the wire protocol to the engine's calls.

One handler coroutine per connection opens a call on the engine, parses commands and hands them
to it; one sender task per connection writes the call's events and frames in order. No model
work happens on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from dia2stream.wire import protocol as p
from dia2stream.serve.config import ServerConfig
from dia2stream.call.call import AudioFrame, Call
from dia2stream.serve.delivery import DeliveryMeter
from dia2stream.engine.engine import Engine, EngineConfig
from dia2stream.serve.http import HttpGate, HttpPolicy, unprotected_bind_warning
from dia2stream.serve.limits import (IDLE_CLOSE_CODE, NOT_READING_CLOSE_CODE, Admission, CommandRateLimiter, IdleClock,
                     LargeMessageGate, Limits, VoiceQuota, idle_timeout_error, rate_limited_error)
from dia2stream.serve.metrics import Metrics
from dia2stream.serve.outbox import Outbox
from dia2stream.voices.voice import VoiceError, VoiceRequest, VoiceSettings
from dia2stream.serve.voice_scope import VoiceScope

log = logging.getLogger("dia2stream")

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_GOING_AWAY = 1001
IDLE_CHECK_S = 1.0  # the idle watchdog looks at most this often (timeouts are minutes)
# At shutdown a client has this long to read `shutting_down` and answer the close (a reading
# client takes milliseconds); then it is cut off. Leaves room in the 2 s an orchestrator waits
# for the process to exit, after the engine's last frame and the interpreter's teardown (~0.6 s).
SHUTDOWN_CLOSE_S = 0.5
MAX_PARALLEL_VOICE_LOADS = 2  # set_voice audio decodes / transcriptions at once, server-wide


@dataclass(eq=False)
class Connection:
    """What the server keeps per connection (the call itself lives on the engine)."""

    ws: ServerConnection
    call: Call
    outbox: Outbox
    rate: CommandRateLimiter
    idle: IdleClock
    voices: VoiceScope
    meter: DeliveryMeter
    sender: asyncio.Task | None = None
    closer: asyncio.Future | None = None  # a close started from a callback (kept: the loop holds tasks weakly)
    closing: bool = False  # a close was started (idle, not reading, shutdown): send nothing more
    call_closed: bool = False  # close_call is called once: a second detach would reset the slot's next call


class Dia2Server:
    def __init__(self, engine: Engine, model_name: str, device: str, max_lead_ms: float,
                 limits: Limits | None = None, policy: HttpPolicy | None = None, metrics: Metrics | None = None):
        """`metrics`: the registry the engine records frame steps in (`Engine(metrics=...)`); a
        fresh one when None (then /metrics has no frame-step figures)."""
        self.engine, self.model_name, self.device, self.max_lead_ms = engine, model_name, device, max_lead_ms
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.metrics.set_info(model=model_name, device=device, max_calls=engine.max_calls)
        self.gate = HttpGate(policy or HttpPolicy(), health=self.health, metrics=self.metrics.render,
                             on_refused=self.metrics.call_refused)
        self.large = LargeMessageGate(self.limits)
        # Voice audio decodes and transcriptions in worker threads, server-wide.
        self._voice_loads = asyncio.Semaphore(MAX_PARALLEL_VOICE_LOADS)
        self.connections: set[Connection] = set()
        self.stopping = False

    # -- HTTP before the upgrade ----------------------------------------------------------------

    def health(self) -> dict:
        return {"status": "stopping" if self.stopping else "ok", "model": self.model_name, "device": self.device,
                **self.engine.health()}

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        response = self.gate.respond(request)
        if response is None and self.stopping:
            self.metrics.call_refused("shutting_down")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down\n")
        return response

    # -- one connection -------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        # The outbox exists before the call (it is the call's sink) and tells its connection,
        # made just below, when the client stops reading.
        outbox = Outbox(asyncio.get_running_loop(), self.limits, on_overflow=lambda: self._not_reading(conn))
        call = self.engine.open_call(outbox.put_threadsafe)
        if call is None:
            await self._refuse_busy(ws, peer)
            return
        limits = self.limits
        conn = Connection(ws, call, outbox,
                          CommandRateLimiter(limits.commands_per_second, limits.command_burst,
                                             limits.refusals_per_second),
                          IdleClock(limits.idle_timeout_s), VoiceScope(VoiceQuota(limits.max_voices_per_connection)),
                          DeliveryMeter(self.metrics))
        self.connections.add(conn)
        self.metrics.calls_active(self.engine.calls)
        log.info("client %s connected (call %d)", peer, call.slot)
        watchdog = None
        try:
            # `ready` goes out before the sender task exists: it is always the first message.
            await ws.send(p.Ready(model=self.model_name, device=self.device,
                                  voices=conn.voices.visible(list(self.engine.voices)),
                                  max_lead_ms=int(self.max_lead_ms),
                                  context_frames=self.engine.context_frames).to_json())
            conn.sender = asyncio.create_task(self._send_loop(conn))
            if self.limits.idle_timeout_s:
                watchdog = asyncio.create_task(self._idle_watch(conn))
            async for message in ws:
                conn.idle.activity()
                await self._dispatch(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self._end_call(conn)
            self.engine.forget_voices(conn.voices.keys())  # queued after the detach: no build outlives it
            for task in (conn.sender, watchdog):
                if task is not None:
                    task.cancel()
            conn.meter.flush()
            self.metrics.calls_active(self.engine.calls)
            log.info("client %s disconnected (call %d)", peer, call.slot)

    async def _refuse_busy(self, ws: ServerConnection, peer) -> None:
        health = self.engine.health()
        overloaded = health["overloaded"]
        why = "the server is behind real time" if overloaded else f"all {health['max_calls']} call slots are taken"
        log.info("refused %s: busy (%s)", peer, why)
        self.metrics.call_refused("overloaded" if overloaded else "busy")
        self.metrics.error(p.ErrorCode.BUSY)
        await close_within(ws, CLOSE_TRY_AGAIN_LATER, "busy", self.limits.close_timeout_s,
                           p.ErrorEvent(code=p.ErrorCode.BUSY, message=f"{why}; try again later"))

    async def _dispatch(self, conn: Connection, message) -> None:
        # Answers made here still go through the engine's queue, so events answer commands in the
        # order the commands were received (an error for a bad message never overtakes the
        # `started` of the `start` before it).
        call = conn.call
        verdict = conn.rate.admit()  # before parsing: a flood costs no parse
        if verdict is Admission.DROP:
            return
        if verdict is Admission.REFUSE:
            self.engine.reply(call, rate_limited_error(conn.rate.refused))
            return
        try:
            command = await self.large.parse(message)
            if not isinstance(command, (p.Ping, p.SetVoice)):
                command = conn.voices.command(command, list(self.engine.voices))
        except p.ProtocolError as err:
            log.debug("call %d: bad command: %s %s", call.slot, err.code, err.message)
            self.engine.reply(call, err.to_event())
            return
        log.debug("call %d: cmd %s", call.slot, command.cmd)
        if isinstance(command, p.Ping):
            self.engine.reply(call, p.Pong(id=command.id))
        elif isinstance(command, p.SetVoice):
            await self._set_voice(conn, command)
        else:  # voices too: the list is made on the generation thread, in command order
            self.engine.submit(call, command)

    async def _set_voice(self, conn: Connection, command: p.SetVoice) -> None:
        """Load the audio and transcript in a worker thread (finding 11: never on the generation
        thread), then hand the loaded voice to the engine for the model work. The next command
        of this connection is read once the audio is loaded, so `voice_ready` (or the error)
        keeps its place in the event order like any other answer."""
        try:
            key = conn.voices.key_for(command)
        except p.ProtocolError as err:
            self.engine.reply(conn.call, err.to_event())
            return
        async with self._voice_loads:
            try:
                loaded = await asyncio.to_thread(self.engine.load_voice, command, key)
            except VoiceError as err:
                log.info("set_voice %s failed: %s %s", command.name, err.code, err.message)
                self.engine.reply(conn.call, p.ErrorEvent(code=err.code, message=err.message, cmd=command.cmd,
                                                          id=command.id))
                return
        conn.voices.made(command.name, key)
        self.engine.submit_voice(conn.call, command, loaded, key)

    async def _send_loop(self, conn: Connection) -> None:
        ws, call, meter = conn.ws, conn.call, conn.meter
        sent_in_turn = 0  # frames really written for the current utterance (dropped ones excluded)
        try:
            while True:
                item = await conn.outbox.get()
                if isinstance(item, AudioFrame):
                    call.frames_acked += 1
                    if item.epoch < call.epoch:
                        continue  # generated before a pause/reset: never play stale audio
                    meter.frame_sent()
                    await ws.send(item.data)
                    sent_in_turn += 1
                    continue
                if isinstance(item, p.Started):
                    sent_in_turn = 0
                elif isinstance(item, p.Paused) and item.frames_sent:
                    item = dataclasses.replace(item, frames_sent=sent_in_turn, audio_s=round(sent_in_turn / p.FRAME_RATE, 3))
                elif isinstance(item, p.Done):
                    item = dataclasses.replace(item, frames=sent_in_turn, audio_s=round(sent_in_turn / p.FRAME_RATE, 3))
                meter.event(item)
                await ws.send(conn.voices.event(item).to_json())
        except ConnectionClosed:
            pass
        finally:
            meter.flush()

    # -- closing a connection from the server's side ----------------------------------------------

    async def _idle_watch(self, conn: Connection) -> None:
        """Close the connection once nothing is generating and no command came for the idle
        timeout (finding 7). A call that is speaking is not idle."""
        while not conn.closing:
            await asyncio.sleep(max(conn.idle.remaining() or 0.0, IDLE_CHECK_S))
            if conn.idle.expired(busy=conn.call.generating):
                log.info("call %d: idle for %g s; closing", conn.call.slot, self.limits.idle_timeout_s)
                await self._close(conn, IDLE_CLOSE_CODE, "idle timeout", idle_timeout_error(self.limits.idle_timeout_s))

    def _not_reading(self, conn: Connection) -> None:
        log.warning("call %d: the client stopped reading (%d items queued); closing", conn.call.slot,
                    self.limits.max_outbox_items)
        conn.closer = asyncio.ensure_future(self._close(conn, NOT_READING_CLOSE_CODE, "not reading"))

    async def _close(self, conn: Connection, code: int, reason: str, error: p.ErrorEvent | None = None,
                     timeout: float | None = None) -> None:
        """Stop this connection's audio, tell the client why (if it still reads) and close, all
        within the close timeout; a client that does not read is cut off after it."""
        if conn.closing:
            return
        conn.closing = True
        self._end_call(conn)  # generation stops within a frame
        if conn.sender is not None:
            conn.sender.cancel()  # a frame being written is written whole; nothing after it
        if error is not None:
            self.metrics.error(error.code)
        await close_within(conn.ws, code, reason, timeout or self.limits.close_timeout_s, error)

    def _end_call(self, conn: Connection) -> None:
        if not conn.call_closed:
            conn.call_closed = True
            self.engine.close_call(conn.call)

    async def shut_down(self) -> None:
        """SIGTERM/SIGINT: refuse new connections (503), tell every call `shutting_down` and close
        it with 1001, concurrently, each within the close timeout."""
        self.stopping = True
        closing = [self._close(conn, CLOSE_GOING_AWAY, "server shutting down",
                               p.ErrorEvent(code=p.ErrorCode.SHUTTING_DOWN, message="the server is shutting down; "
                                            "reconnect to another instance"),
                               timeout=min(SHUTDOWN_CLOSE_S, self.limits.close_timeout_s))
                   for conn in list(self.connections)]
        if closing:
            t0 = time.perf_counter()
            await asyncio.gather(*closing, return_exceptions=True)
            log.info("shutting down: closed %d connection(s) in %.2f s", len(closing), time.perf_counter() - t0)


async def close_within(ws: ServerConnection, code: int, reason: str, timeout: float,
                       error: p.ErrorEvent | None = None) -> None:
    """Send `error` (if any), then close with `code`, in at most `timeout` seconds. websockets'
    own close waits for its write buffer to drain first, without a bound: a client that does not
    read held a stopping server for 10.9 s (finding 8)."""
    try:
        async with asyncio.timeout(timeout):
            if error is not None:
                await ws.send(error.to_json())
            await ws.close(code, reason)
    except (TimeoutError, ConnectionClosed):
        pass
    if ws.state is not State.CLOSED:
        ws.transport.abort()


def resolve_kernels(setting: str, device) -> str:
    """`--kernels auto`: the fused Triton depformer where it can run (CUDA with triton), else torch."""
    from vendor_dia2 import kernels

    if setting != "auto":
        return setting
    return "triton" if str(device).startswith("cuda") and kernels.available(device) else "torch"


def default_max_calls(device) -> int:
    """One call on CPU; on a GPU, 64: measured on an H100 at the 2b shape, a batched step for 64
    calls (~25 ms) plus their batched Mimi decode (~4 ms) stays far inside a frame's 80 ms
    (docs/benchmarks.md). The engine still refuses calls if it ever falls behind."""
    return 64 if str(device).startswith("cuda") else 1


def build_engine(config: ServerConfig, metrics: Metrics | None = None):
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
    kernels = resolve_kernels(config.kernels, tts.device)
    from vendor_dia2 import kernels as fused_kernels
    fused_kernels.PDL = {"auto": None, "on": True, "off": False}[config.pdl]  # read as the graphs are captured
    max_calls = config.max_calls or default_max_calls(tts.device)
    # allow_download=False: whisper weights are never fetched while serving (finding 11); without
    # local weights a set_voice with no transcript is `transcript_required`.
    voice = VoiceSettings(voice_dir=config.voice_dir, max_seconds=config.max_voice_seconds,
                          whisper_model=config.whisper_model, cache_dir=config.voice_cache,
                          allow_download=False, cache_max_mb=config.voice_cache_mb or None)
    engine = Engine(tts, EngineConfig(max_calls=max_calls, max_lead_ms=config.max_lead_ms,
                                      context_frames=config.context_frames, cfg_scale=config.cfg_scale,
                                      seed=config.seed, voice=voice, lead_in_frames=config.lead_in_frames,
                                      rollover_frames=config.rollover_frames, prefix_boundary=config.prefix_boundary,
                                      compile=compile_steps, compile_max_calls=config.compile_max_calls,
                                      kernels=kernels, weights=config.weights,
                                      max_pending_text_chars=config.max_pending_text_chars),
                    metrics=metrics)
    log.info("loaded %s on %s (%s) in %.1f s: %d call slots, step batch sizes %s, %s kernels, %s depformer weights",
             tts.name, tts.device, tts.dtype, time.perf_counter() - t0, max_calls, engine.stepper.batch_sizes, kernels,
             config.weights)
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
              stop: asyncio.Event | None = None, limits: Limits | None = None) -> None:
    """Serve until SIGINT/SIGTERM or until `stop` is set, then shut down (`Dia2Server.shut_down`).

    `ready` receives the listening port (useful with port 0), or the exception if the server
    could not start; a `concurrent.futures.Future` lets another thread wait for it. `limits`
    replaces the ones the configuration asks for (tests, embedding).
    """
    stop = stop or asyncio.Event()
    engine = None
    try:
        limits = limits or Limits.from_config(config)
        policy = HttpPolicy.from_config(config)
        warning = unprotected_bind_warning(config.host, policy.auth_token)
        if warning:
            log.warning(warning)
        metrics = Metrics()
        tts, engine = await asyncio.to_thread(build_engine, config, metrics)
        server = Dia2Server(engine, tts.name, str(tts.device), config.max_lead_ms, limits=limits, policy=policy,
                            metrics=metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError) as exc:
                # not the main thread (tests), or a platform without loop signal handlers
                log.debug("no %s handler on this loop: %s", sig.name, exc)
        async with serve(server.handle, config.host, config.port, process_request=server.process_request,
                         **limits.websocket_settings()) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            log.info("listening on ws://%s:%d/", config.host, port)
            print(f"dia2stream ready on ws://{config.host}:{port}/", flush=True)
            if ready is not None:
                ready.set_result(port)
            await stop.wait()
            ws_server.close(close_connections=False)  # stop accepting; our own close tells each call why
            await server.shut_down()
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

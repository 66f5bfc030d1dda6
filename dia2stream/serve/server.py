"""The websockets server: connects the wire protocol to the engine's calls.

One handler coroutine per connection opens a call on the engine, parses commands and hands them
to it; one sender task per connection writes the call's events and frames in order, encoding
the frames in the call's format. No model work happens on the event loop; by default the engine
runs in a process of its own (`engine_process.EngineProxy`), so none of this work can slow it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from dia2stream.clock import FRAME_RATE
from dia2stream.wire import compat
from dia2stream.wire import protocol as p
from dia2stream.serve.config import ServerConfig, Switch
from dia2stream.call.call import Call, Drained
from dia2stream.wire.frames import AudioFrame, FrameWriter
from dia2stream.serve.agent import AgentResponder
from dia2stream.serve.build import build_engine, freeze_startup_objects, use_device
from dia2stream.serve.compat_session import serve_compat
from dia2stream.serve.delivery import DeliveryMeter
from dia2stream.engine.engine import Engine
from dia2stream.serve.engine_process import CallHandle, EngineProxy
from dia2stream.serve.http import HttpGate, HttpPolicy, unprotected_bind_warning
from dia2stream.serve.limits import (IDLE_CLOSE_CODE, NOT_READING_CLOSE_CODE, POLICY_CLOSE_CODE, AbuseWatch, Admission,
                                    CommandRateLimiter, IdleClock, LargeMessageGate, Limits, Offence, VoiceQuota,
                                    idle_timeout_error, misfit, misfit_error, policy_error, rate_limited_error)
from dia2stream.serve.liveness import (ENGINE_FAILED_CLOSE_CODE, EXIT_ENGINE_FAILED, FAILED_EXIT_DELAY_S,
                                      WATCH_INTERVAL_S, engine_failure)
from dia2stream.serve.metrics import Metrics
from dia2stream.serve.outbox import Outbox
from dia2stream.voices.voice import VoiceError
from dia2stream.serve.voice_scope import VoiceScope
from dia2stream.serve.web_pages import WebPages

log = logging.getLogger("dia2stream")

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_GOING_AWAY = 1001
IDLE_CHECK_S = 1.0  # the idle watchdog looks at most this often (timeouts are minutes)
# At shutdown a client has this long to read `shutting_down` and answer the close (a reading
# client takes milliseconds); then it is cut off. Leaves room in the 2 s an orchestrator waits
# for the process to exit, after the engine's last frame and the interpreter's teardown (~0.6 s).
SHUTDOWN_CLOSE_S = 0.5
MAX_PARALLEL_VOICE_LOADS = 2  # set_voice / user_turn audio decodes and transcriptions at once, server-wide


class StartupError(Exception):
    """The server could not start, for a reason its message says in one line (a port in use, a
    setting this model cannot take): `server.py` prints it, no traceback. `usage`: a bad setting
    (exit status 2, as for a bad flag), not a failure of the machine (1)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


@dataclass(eq=False)
class Connection:
    """What the server keeps per connection (the call itself lives on the engine)."""

    ws: ServerConnection
    call: Call | CallHandle
    outbox: Outbox
    rate: CommandRateLimiter
    idle: IdleClock
    voices: VoiceScope
    meter: DeliveryMeter
    abuse: AbuseWatch
    writer: FrameWriter = dataclasses.field(default_factory=FrameWriter)  # frames to binary messages, here
    sender: asyncio.Task | None = None
    closer: asyncio.Future | None = None  # a close started from a callback (kept: the loop holds tasks weakly)
    closing: bool = False  # a close was started (idle, not reading, shutdown): send nothing more
    call_closed: bool = False  # close_call is called once: a second detach would reset the slot's next call


class Dia2Server:
    def __init__(self, engine: Engine | EngineProxy, model_name: str, device: str, max_lead_ms: float,
                 limits: Limits | None = None, policy: HttpPolicy | None = None, metrics: Metrics | None = None,
                 web: bool = True, engine_stall_s: float | None = None):
        """`engine`: an `Engine` on a thread of this process, or an `EngineProxy` to one in its own
        process (`--engine-process`), used alike. `metrics`: the registry the engine's frame steps
        are recorded in (`Engine(metrics=...)`, or the proxy's from each batch); a fresh one when
        None (then /metrics has no frame-step figures). `web`: serve the
        playground and dashboard pages (`--no-web`: False). `engine_stall_s`: the watchdog's
        stall limit (`liveness.engine_failure`; None: the configuration's default)."""
        self.engine, self.model_name, self.device, self.max_lead_ms = engine, model_name, device, max_lead_ms
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.metrics.set_info(model=model_name, device=device, max_calls=engine.max_calls)
        pages = WebPages(self.health, self.metrics.registry) if web else None
        self.gate = HttpGate(policy or HttpPolicy(own_origin=web), health=self.health, metrics=self.metrics.render,
                             on_refused=self.metrics.call_refused, pages=pages)
        self.large = LargeMessageGate(self.limits)
        # Voice audio decodes and transcriptions in worker threads, server-wide.
        self._voice_loads = asyncio.Semaphore(MAX_PARALLEL_VOICE_LOADS)
        self.connections: set[Connection] = set()
        self._no_connections = asyncio.Event()  # set whenever `connections` is empty
        self._no_connections.set()
        self.draining = False
        self.starting = False  # run(): until every port is bound and the websocket is served
        self.compat_sessions: set = set()  # serve.compat_session.CompatSession, one per compatible-API connection
        self.stopping = False
        self.http_port: int | None = None  # where the POST endpoints listen, when --http-port is set
        self.engine_stall_s = ServerConfig().engine_stall_s if engine_stall_s is None else engine_stall_s
        self.failure: str | None = None  # why the engine cannot serve (`watch_engine`); then the process exits
        self.failed = asyncio.Event()  # set once every call was told of the failure

    # -- HTTP before the upgrade ----------------------------------------------------------------

    def health(self) -> dict:
        """The /health and /ready body, and what the agent check answers from."""
        figures = self.engine.health()
        failure = self.failure or figures.get("failure")
        return {"status": self.status, "model": self.model_name, "device": self.device, **figures, "failure": failure}

    @property
    def status(self) -> str:
        if self.failure is not None or not self.engine.running:
            return "failed"
        if self.starting:
            return "starting"
        if self.stopping:
            return "stopping"
        return "draining" if self.draining else "ok"

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        response = self.gate.respond(request)
        if response is None and self.status == "failed":
            self.metrics.call_refused("other")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "the engine has failed; the server restarts\n")
        if response is None and (self.stopping or self.draining):
            self.metrics.call_refused("shutting_down")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down\n")
        return response

    # -- one connection -------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        adapter = compat.adapter_for(ws.request.path, list(self.engine.voices))
        if adapter is not None:  # a hosted API's protocol on this port (docs/compat.md)
            await serve_compat(self, ws, adapter)
            return
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
                          DeliveryMeter(self.metrics), AbuseWatch(limits))
        self.connections.add(conn)
        self._no_connections.clear()
        if self.draining:  # upgraded just before the drain began: it ends like the others
            self.engine.drain_call(call)
        self.metrics.calls_active(self.engine.calls)
        log.info("client %s connected (call %d)", peer, call.slot.index)
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
                if conn.closing:
                    break  # the server closed it (abuse, idle, failure): what is still buffered is not read
                conn.idle.activity()
                await self._dispatch(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            if not self.connections:
                self._no_connections.set()
            self._end_call(conn)
            self.engine.forget_voices(conn.voices.keys())  # queued after the detach: no build outlives it
            for task in (conn.sender, watchdog):
                if task is not None:
                    task.cancel()
            conn.meter.flush()
            self.metrics.calls_active(self.engine.calls)
            log.info("client %s disconnected (call %d)", peer, call.slot.index)

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
        # `started` of the `start` before it). Everything before `parse` looks at the message's
        # type and length only: a flood, binary junk or megabytes of text cost no parse, and a
        # connection that keeps at it is closed (limits.AbuseWatch).
        call = conn.call
        verdict = conn.rate.admit()
        if verdict is not Admission.ACCEPT:
            offence = conn.abuse.refused()
            if offence is not None:
                await self._close_for_abuse(conn, offence)
            elif verdict is Admission.REFUSE:
                self.engine.reply(call, rate_limited_error(conn.rate.refused))
            return
        kind = misfit(message, self.limits)
        if kind is not None:
            if conn.abuse.bad_message(kind) is not None:
                await self._close_for_abuse(conn, kind)
            else:
                self.engine.reply(call, misfit_error(kind, self.limits))
            return
        try:
            command = await self.large.parse(message)
            if not isinstance(command, (p.Ping, p.SetVoice)):
                command = conn.voices.command(command, list(self.engine.voices))
        except p.ProtocolError as err:
            log.debug("call %d: bad command: %s %s", call.slot.index, err.code, err.message)
            self.engine.reply(call, err.to_event())
            return
        log.debug("call %d: cmd %s", call.slot.index, command.cmd)
        if isinstance(command, p.Ping):
            self.engine.reply(call, p.Pong(id=command.id))
        elif isinstance(command, p.SetVoice) and self.draining:  # the call ends soon: no model work for it
            self.engine.reply(call, p.ErrorEvent(code=p.ErrorCode.DRAINING, message="the server is draining for a "
                                                 "restart; reconnect to prepare voices on another server",
                                                 cmd=command.cmd, id=command.id))
        elif isinstance(command, p.SetVoice):
            await self._set_voice(conn, command)
        elif isinstance(command, p.UserTurn):
            await self._user_turn(conn, command)
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

    async def _user_turn(self, conn: Connection, command: p.UserTurn) -> None:
        """Decode the caller's audio and place its words in a worker thread (never on the event
        loop or the generation thread), under the same server-wide bound as voice loads; then hand
        it to the engine, whose model work is planned between frames. Like set_voice, the next
        command of this connection is read once the audio is loaded, so answers keep their order."""
        async with self._voice_loads:
            try:
                loaded = await asyncio.to_thread(self.engine.load_user_turn, command)
            except p.ProtocolError as err:
                log.info("call %d: user_turn refused: %s %s", conn.call.slot.index, err.code, err.message)
                self.engine.reply(conn.call, err.to_event())
                return
        self.engine.submit_user_turn(conn.call, command, loaded)

    async def _send_loop(self, conn: Connection) -> None:
        ws, call, meter = conn.ws, conn.call, conn.meter
        sent_in_turn = 0  # frames really written for the current utterance (dropped ones excluded)
        try:
            while True:
                item = await conn.outbox.get()
                if isinstance(item, Drained):  # everything the call had to say is sent
                    conn.closer = asyncio.ensure_future(self._close(conn, CLOSE_GOING_AWAY, "server draining",
                                                                    _going_away_error()))
                    return
                if isinstance(item, AudioFrame):
                    call.frames_acked += 1
                    if item.epoch < call.epoch:
                        continue  # generated before a pause/reset: never play stale audio
                    meter.frame_sent()
                    await ws.send(conn.writer.message(item))
                    sent_in_turn += 1
                    continue
                if isinstance(item, p.Started):
                    sent_in_turn = 0
                elif isinstance(item, p.Paused) and item.spoken is not None:
                    # a barge-in: the frames past what the caller heard were taken back, and the
                    # utterance goes on from there (its next frame and word are numbered from it)
                    sent_in_turn = item.frames_sent
                elif isinstance(item, p.Paused) and item.frames_sent:
                    item = dataclasses.replace(item, frames_sent=sent_in_turn, audio_s=round(sent_in_turn / FRAME_RATE, 3))
                elif isinstance(item, p.Done):
                    item = dataclasses.replace(item, frames=sent_in_turn, audio_s=round(sent_in_turn / FRAME_RATE, 3))
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
                log.info("call %d: idle for %g s; closing", conn.call.slot.index, self.limits.idle_timeout_s)
                await self._close(conn, IDLE_CLOSE_CODE, "idle timeout", idle_timeout_error(self.limits.idle_timeout_s),
                                  why="idle_timeout")

    def _not_reading(self, conn: Connection) -> None:
        log.warning("call %d: the client stopped reading (%d items queued); closing", conn.call.slot.index,
                    self.limits.max_outbox_items)
        conn.closer = asyncio.ensure_future(self._close(conn, NOT_READING_CLOSE_CODE, "not reading",
                                                        why="not_reading"))

    async def _close_for_abuse(self, conn: Connection, offence: Offence) -> None:
        log.warning("call %d: closing the connection (1008): %s", conn.call.slot.index, offence.value)
        await self._close(conn, POLICY_CLOSE_CODE, f"policy violation: {offence.value}",
                          policy_error(offence, self.limits), why=offence.value)

    async def _close(self, conn: Connection, code: int, reason: str, error: p.ErrorEvent | None = None,
                     timeout: float | None = None, why: str | None = None) -> None:
        """Stop this connection's audio, tell the client why (if it still reads) and close, all
        within the close timeout; a client that does not read is cut off after it. `why`: the
        reason the closures metric counts (None: a close it does not count, such as shutdown)."""
        if conn.closing:
            return
        conn.closing = True
        if why is not None:
            self.metrics.connection_closed(why)
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

    # -- liveness ------------------------------------------------------------------------------------

    async def watch_engine(self) -> None:
        """The watchdog (issue 19), on the event loop, never on the generation thread: a few times
        a second, look at the engine's figures; once it cannot serve (`liveness.engine_failure`),
        fail the server."""
        while self.failure is None:
            reason = engine_failure(self.engine.health(), self.engine_stall_s)
            if reason is not None:
                await self.fail(reason)
                return
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def fail(self, reason: str) -> None:
        """The engine cannot serve: from now on /health, /ready and the agent say `failed` and
        upgrades get 503; every connection gets `internal_error` with the reason and close 1011,
        concurrently, each within the close timeout; then `failed` is set (run() exits 1)."""
        if self.failure is not None:
            return
        self.failure = reason
        log.critical("the engine cannot serve (%s): closing %d connection(s); the process exits with status %d "
                     "for its supervisor to restart it", reason, len(self.connections), EXIT_ENGINE_FAILED)
        error = p.ErrorEvent(code=p.ErrorCode.INTERNAL_ERROR,
                             message=f"the server's engine failed ({reason}); the utterance is lost. The server "
                                     "restarts: reconnect (a balancer sends you to another server)")
        await asyncio.gather(*[self._close(conn, ENGINE_FAILED_CLOSE_CODE, "engine failed", error, why="engine_failed")
                               for conn in list(self.connections)], return_exceptions=True)
        self.failed.set()

    async def drain(self, timeout_s: float, interrupted: asyncio.Event) -> bool:
        """The first SIGTERM: take no new call (upgrades 503, /ready 503, agent `drain`), let every
        call finish the utterance it is speaking, closing each with 1001 once it has (after its
        `done`), for at most `timeout_s` or until `interrupted` is set. True when every call ended
        by itself; `shut_down` then closes whatever is left."""
        self.draining = True
        t0 = time.perf_counter()
        speaking = sum(conn.call.speaking for conn in self.connections)
        log.info("draining: %d connection(s), %d speaking; up to %g s", len(self.connections), speaking, timeout_s)
        for conn in list(self.connections):
            self.engine.drain_call(conn.call)
        ended = asyncio.ensure_future(self._no_connections.wait())
        stop = asyncio.ensure_future(interrupted.wait())
        try:
            await asyncio.wait((ended, stop), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            stop.cancel()
        drained = not self.connections
        why = "every call finished" if drained else "interrupted" if interrupted.is_set() else "timed out"
        log.info("drain: %s in %.2f s (%d connection(s) left)", why, time.perf_counter() - t0, len(self.connections))
        return drained

    async def shut_down(self) -> None:
        """Then (or at once, for a second SIGTERM or `--drain-timeout-s 0`): refuse new connections
        (503), tell every call `shutting_down` and close it with 1001, concurrently, each within
        the close timeout."""
        self.stopping = True
        closing = [self._close(conn, CLOSE_GOING_AWAY, "server shutting down", _going_away_error(),
                               timeout=min(SHUTDOWN_CLOSE_S, self.limits.close_timeout_s))
                   for conn in list(self.connections)]
        closing += [session.shut_down(min(SHUTDOWN_CLOSE_S, self.limits.close_timeout_s))
                    for session in list(self.compat_sessions)]
        if closing:
            t0 = time.perf_counter()
            await asyncio.gather(*closing, return_exceptions=True)
            log.info("shutting down: closed %d connection(s) in %.2f s", len(closing), time.perf_counter() - t0)


def _going_away_error() -> p.ErrorEvent:
    return p.ErrorEvent(code=p.ErrorCode.SHUTTING_DOWN, message="the server is shutting down; reconnect to "
                        "another instance")


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


def tls_context(cert: str | None, key: str | None):
    """An SSL context for wss:// when a certificate is given (clients such as the ElevenLabs SDK
    only speak wss://), else None. ValueError when only one of the two files is given;
    StartupError when they cannot be loaded (missing, unreadable, not PEM, a key of another
    certificate)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"--tls-cert {cert} / --tls-key {key}: cannot load them: "
                           f"{getattr(exc, 'strerror', None) or exc}", usage=True) from exc
    return context


def check_against_model(config: ServerConfig, context_frames: int) -> None:
    """The settings only the model can judge, once it is loaded (`context_frames`: the engine's
    context, the model's limit or less): a context asked beyond the model's limit, and a rollover
    beyond half the context, are clamped (as the engine does) with a warning; a lead-in of half
    the context or more is refused (StartupError): a turn's first word could not follow it in the
    room a rollover leaves."""
    if config.context_frames and config.context_frames > context_frames:
        log.warning("--context-frames %d is more than this model's limit: its %d frames are used",
                    config.context_frames, context_frames)
    half = context_frames // 2
    if config.rollover_frames > half and config.rollover_frames != ServerConfig.rollover_frames:  # (default: in --help)
        log.warning("--rollover-frames %d is more than half the context (%d frames): a rollover keeps at most %d",
                    config.rollover_frames, context_frames, half)
    if config.lead_in_frames >= half:
        raise StartupError(f"--lead-in-frames {config.lead_in_frames}: must be less than half the context "
                           f"({half} of {context_frames} frames), the room a rollover leaves a turn", usage=True)


def _cannot_listen(flag: str, host: str, port: int, exc: OSError) -> StartupError:
    """A bind that failed (a port in use, an address not on this machine, a name that does not
    resolve), as one line that names the flag."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        reason = exc.strerror or str(exc)
    else:
        reason = os.strerror(exc.errno).lower()
    return StartupError(f"{flag} {port}: cannot listen on {host}:{port}: {reason}")


async def run(config: ServerConfig, ready: asyncio.Future | concurrent.futures.Future | None = None,
              stop: asyncio.Event | None = None, limits: Limits | None = None,
              drain: asyncio.Event | None = None, agent_ready: concurrent.futures.Future | None = None,
              engine_init=None) -> int:
    """Serve until SIGTERM/SIGINT, `drain` or `stop`, then shut down; or until the engine fails.
    Returns the process's exit status: 0 after a stop, EXIT_ENGINE_FAILED (1) after an engine
    failure (`Dia2Server.watch_engine`), so a supervisor restarts it.

    The first SIGTERM/SIGINT (or `drain` set) drains (`Dia2Server.drain`, up to
    `--drain-timeout-s`); a second one (or `stop` set) ends at once (`Dia2Server.shut_down`).
    `ready` receives the listening port (useful with port 0), or the exception if the server
    could not start; a `concurrent.futures.Future` lets another thread wait for it. `agent_ready`
    receives the agent-check port (with `--agent-port`). `limits` replaces the ones the
    configuration asks for (tests, embedding). `engine_init`: a picklable function called where the
    engine runs (its process with `--engine-process on`, else here) before it is built (tests wrap
    their own stepper there).
    """
    stop = stop or asyncio.Event()
    drain = drain or asyncio.Event()
    engine = None
    server: Dia2Server | None = None
    try:
        limits = limits or Limits.from_config(config)
        policy = HttpPolicy.from_config(config)
        tls = tls_context(config.tls_cert, config.tls_key)
        warning = unprotected_bind_warning(config.host, policy.auth_token)
        if warning:
            log.warning(warning)
        metrics = Metrics()
        async with contextlib.AsyncExitStack() as stack:
            # Every port is bound before anything is announced or served (audit 2: `ready` was
            # printed and /health said 200, then the HTTP API's bind failed). The websocket's first,
            # not yet served: a port in use is said at once, not after the model has loaded.
            try:
                ws_server = await stack.enter_async_context(
                    serve(lambda ws: server.handle(ws), config.host, config.port,
                          process_request=lambda conn, request: server.process_request(conn, request),
                          ssl=tls, start_serving=False, **limits.websocket_settings()))
            except OSError as exc:
                raise _cannot_listen("--port", config.host, config.port, exc) from exc
            if config.engine_process == Switch.ON:
                engine = await asyncio.to_thread(EngineProxy.start, config, metrics, engine_init)
                metrics.gpu_memory_from(engine.gpu_memory)  # the engine process's allocator, as it last said
                metrics.engine_process(engine.pid)
                model_name, device = engine.model_name, engine.device
                freeze_startup_objects()  # this process sends every frame: its full GC passes stall them too
            else:
                tts, engine = await asyncio.to_thread(_build_here, config, metrics, engine_init)
                use_device(str(tts.device))  # /metrics reads the allocator's figures on this thread
                model_name, device = tts.name, str(tts.device)
            check_against_model(config, engine.context_frames)
            server = Dia2Server(engine, model_name, device, config.max_lead_ms, limits=limits, policy=policy,
                                metrics=metrics, web=config.web, engine_stall_s=config.engine_stall_s)
            server.starting = True  # the agent, bound next, says `down #starting` until the websocket is served
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, _first_drain_then_stop, sig, drain, stop)
                except (NotImplementedError, RuntimeError, ValueError) as exc:
                    # not the main thread (tests), or a platform without loop signal handlers
                    log.debug("no %s handler on this loop: %s", sig.name, exc)
            scheme = "wss" if tls is not None else "ws"
            agent = None
            if config.agent_port is not None:
                try:
                    agent = await stack.enter_async_context(AgentResponder(server.health, config.host,
                                                                           config.agent_port))
                except OSError as exc:
                    raise _cannot_listen("--agent-port", config.host, config.agent_port, exc) from exc
            if config.http_port is not None:
                try:
                    from dia2stream.serve.http_api import start_http_api  # aiohttp: the [compat] extra
                except ImportError as exc:
                    raise StartupError(f"--http-port needs aiohttp, the [compat] extra ({exc})") from exc
                try:
                    http_api, server.http_port = await start_http_api(server, config.host, config.http_port)
                except OSError as exc:
                    raise _cannot_listen("--http-port", config.host, config.http_port, exc) from exc
                stack.push_async_callback(http_api.cleanup)
            await ws_server.start_serving()
            server.starting = False
            port = ws_server.sockets[0].getsockname()[1]
            log.info("listening on %s://%s:%d/%s", scheme, config.host, port,
                     f" (playground http://{config.host}:{port}/, dashboard /dashboard)" if config.web else "")
            if agent is not None:
                print(f"dia2stream agent-check on {config.host}:{agent.port}", flush=True)
            print(f"dia2stream ready on {scheme}://{config.host}:{port}/", flush=True)
            if ready is not None:
                ready.set_result(port)
            if agent_ready is not None and agent is not None:
                agent_ready.set_result(agent.port)
            watchdog = asyncio.create_task(server.watch_engine())
            stack.callback(watchdog.cancel)
            await _first_set(drain, stop, server.failed)
            if not stop.is_set() and not server.failed.is_set() and config.drain_timeout_s > 0:
                await server.drain(config.drain_timeout_s, interrupted=stop)  # a failure closes every call: it ends
            if server.failure is not None:
                await asyncio.sleep(FAILED_EXIT_DELAY_S)  # /health says why to a probe on its way
            ws_server.close(close_connections=False)  # stop accepting; our own close tells each call why
            await server.shut_down()
            return EXIT_ENGINE_FAILED if server.failure is not None else 0
    except BaseException as exc:
        for future in (ready, agent_ready):
            if future is not None and not future.done():
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
        raise
    finally:
        if engine is not None:
            await asyncio.to_thread(engine.close)


def _build_here(config: ServerConfig, metrics: Metrics, engine_init=None):
    if engine_init is not None:
        engine_init()
    return build_engine(config, metrics)


def _first_drain_then_stop(sig: signal.Signals, drain: asyncio.Event, stop: asyncio.Event) -> None:
    if drain.is_set():
        log.info("%s again: closing every call now", sig.name)
        stop.set()
    else:
        log.info("%s: draining (again to stop at once)", sig.name)
        drain.set()


async def _first_set(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()

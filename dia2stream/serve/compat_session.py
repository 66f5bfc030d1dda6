"""One connection of a compatible API (ElevenLabs, Cartesia, Deepgram): a call on the engine
like a native connection, with an adapter (`wire/compat/`) translating both ways.

The same edges apply as on a native connection: a free slot or the API's `busy` refusal
(closed 1013), the command rate, the message size, the idle timeout (the API's own when it
has one), the outbox bound for a client that stops reading, metrics, and at shutdown the
server's close (1001). Stale frames after a barge-in are dropped by epoch, as natively.
"""

from __future__ import annotations

import asyncio
import logging

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from dia2stream.wire.frames import AudioFrame
from dia2stream.serve.delivery import DeliveryMeter
from dia2stream.serve.limits import Admission, CommandRateLimiter, IdleClock, NOT_READING_CLOSE_CODE
from dia2stream.serve.outbox import Outbox
from dia2stream.wire import protocol as p
from dia2stream.wire.compat.base import (CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER, Adapter, Close, Later,
                                         Send, Submit)

log = logging.getLogger("dia2stream.compat")

IDLE_CHECK_S = 1.0


class _Deferred:
    """An adapter action queued behind the call's own items (through `Engine.reply`)."""

    def __init__(self, action) -> None:
        self.action = action


class CompatSession:
    def __init__(self, server, ws: ServerConnection, adapter: Adapter) -> None:
        self.server, self.ws, self.adapter = server, ws, adapter
        self.engine, self.limits = server.engine, server.limits
        self.call = None
        self.closing = False
        self.closer: asyncio.Task | None = None
        self.sender: asyncio.Task | None = None

    async def run(self) -> None:
        ws, server, adapter = self.ws, self.server, self.adapter
        opening = adapter.opening()
        if any(isinstance(a, Close) for a in opening):  # the request itself is refused: no call
            await self._carry_out_now(opening)
            return
        outbox = Outbox(asyncio.get_running_loop(), self.limits, on_overflow=self._not_reading)
        self.outbox = outbox
        call = self.call = self.engine.open_call(outbox.put_threadsafe)
        if call is None:
            health = self.engine.health()
            why = "the server is behind real time" if health["overloaded"] else \
                f"all {health['max_calls']} call slots are taken"
            server.metrics.call_refused("overloaded" if health["overloaded"] else "busy")
            server.metrics.error(p.ErrorCode.BUSY)
            await self._carry_out_now([Send(adapter.refuse("busy", f"{why}; try again later")),
                                       Close(CLOSE_TRY_AGAIN_LATER, "busy")])
            return
        self.meter = DeliveryMeter(server.metrics)
        rate = CommandRateLimiter(self.limits.commands_per_second, self.limits.command_burst,
                                  self.limits.refusals_per_second)
        idle_s = adapter.idle_timeout_s if adapter.idle_timeout_s is not None else self.limits.idle_timeout_s
        self.idle = IdleClock(idle_s)
        server.metrics.calls_active(self.engine.calls)
        server.compat_sessions.add(self)
        log.info("%s client %s connected (call %d)", adapter.api, ws.remote_address, call.slot.index)
        sender = self.sender = asyncio.create_task(self._send_loop())
        watchdog = asyncio.create_task(self._idle_watch()) if idle_s else None
        ticker = asyncio.create_task(self._tick_loop(adapter.tick_s)) if adapter.tick_s else None
        try:
            await self._carry_out_now(opening)
            async for message in ws:
                self.idle.activity()
                verdict = rate.admit()
                if verdict is Admission.DROP:
                    continue
                if verdict is Admission.REFUSE:
                    self._carry_out([Send(adapter.refuse(p.ErrorCode.RATE_LIMITED, "too many messages; slow down"))])
                    continue
                if len(message) > self.limits.max_command_bytes:
                    limit = self.limits.max_command_bytes
                    self._carry_out([Send(adapter.refuse(p.ErrorCode.MESSAGE_TOO_LARGE,
                                                         f"a message may be at most {limit} bytes"))])
                    continue
                self._carry_out(self._guarded(adapter.receive, message))  # a Close ends this loop from the sender
        except ConnectionClosed:
            pass
        finally:
            server.compat_sessions.discard(self)
            self.engine.close_call(call)
            if self.closing and self.closer is not None:
                await asyncio.gather(self.closer, return_exceptions=True)
            for task in (sender, watchdog, ticker):
                if task is not None:
                    task.cancel()
            self.meter.flush()
            server.metrics.calls_active(self.engine.calls)
            log.info("%s client %s disconnected (call %d)", adapter.api, ws.remote_address, call.slot.index)

    def _guarded(self, step, *args) -> list:
        """An adapter fault answers this message with an internal error; the call and the
        server go on."""
        try:
            return step(*args)
        except Exception as exc:
            log.exception("%s call %d: adapter fault", self.adapter.api, self.call.slot.index)
            self.server.metrics.error(p.ErrorCode.INTERNAL_ERROR)
            return [Send(self.adapter.refuse(p.ErrorCode.INTERNAL_ERROR, f"internal error: {exc}"))]

    # -- actions -----------------------------------------------------------------------------------

    def _carry_out(self, actions: list) -> None:
        """From the receiving side: commands go to the call now; everything else waits its turn
        behind what the call has already emitted."""
        for action in actions:
            if isinstance(action, Submit):
                self.engine.submit(self.call, action.command)
            else:
                if isinstance(action, Close):
                    self.closing = True
                self.engine.reply(self.call, _Deferred(action))

    async def _carry_out_now(self, actions: list) -> None:
        """From the sending side (or before there is a call): in order, at once."""
        for action in actions:
            if isinstance(action, Submit):
                self.engine.submit(self.call, action.command)
            elif isinstance(action, Send):
                await self.ws.send(action.payload)
            elif isinstance(action, Later):
                await self._carry_out_now(action.run())
            elif isinstance(action, Close):
                self.closing = True
                await self._close(action.code, action.reason)
                return

    async def _send_loop(self) -> None:
        call, adapter, meter = self.call, self.adapter, self.meter
        try:
            while True:
                item = await self.outbox.get()
                if isinstance(item, _Deferred):
                    await self._carry_out_now([item.action])
                    continue
                if isinstance(item, AudioFrame):
                    call.frames_acked += 1
                    if item.epoch < call.epoch:
                        continue  # generated before a barge-in: never sent
                    meter.frame_sent()
                else:
                    meter.event(item)
                await self._carry_out_now(self._guarded(adapter.translate, item))
        except ConnectionClosed:
            pass
        finally:
            meter.flush()

    async def shut_down(self, timeout: float) -> None:
        """The server is stopping: the call stops within a frame, the client hears why in its
        API's shape and is closed going away (1001), within `timeout`."""
        if self.closing:
            return
        self.closing = True
        self.engine.close_call(self.call)
        if self.sender is not None:
            self.sender.cancel()
        try:
            async with asyncio.timeout(timeout):
                await self.ws.send(self.adapter.refuse(p.ErrorCode.SHUTTING_DOWN, "the server is shutting down; "
                                                       "reconnect to another instance"))
        except (TimeoutError, ConnectionClosed):
            pass
        await self._close(CLOSE_GOING_AWAY, "server shutting down", timeout)

    async def _close(self, code: int, reason: str, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout or self.limits.close_timeout_s):
                await self.ws.close(code, reason)
        except (TimeoutError, ConnectionClosed):
            pass
        if self.ws.state is not State.CLOSED:
            self.ws.transport.abort()

    async def _tick_loop(self, every_s: float) -> None:
        """The adapter's timed rules (a context left idle gives up the floor), carried out as a
        client message's actions are."""
        while not self.closing:
            await asyncio.sleep(every_s)
            if not self.closing:
                self._carry_out(self._guarded(self.adapter.tick))

    # -- closing from the server's side --------------------------------------------------------------

    async def _idle_watch(self) -> None:
        while not self.closing:
            await asyncio.sleep(max(self.idle.remaining() or 0.0, IDLE_CHECK_S))
            if self.idle.expired(busy=self.call.generating):
                log.info("%s call %d: idle; closing", self.adapter.api, self.call.slot.index)
                self.server.metrics.error(p.ErrorCode.IDLE_TIMEOUT)
                self.closing = True
                self.engine.close_call(self.call)
                try:
                    await self.ws.send(self.adapter.refuse(p.ErrorCode.IDLE_TIMEOUT, "no input for the inactivity "
                                                           "timeout; closing"))
                except ConnectionClosed:
                    pass
                await self._close(CLOSE_POLICY, "idle timeout")

    def _not_reading(self) -> None:
        log.warning("%s call %d: the client stopped reading; closing", self.adapter.api, self.call.slot.index)
        self.closing = True
        self.closer = asyncio.ensure_future(self._close(NOT_READING_CLOSE_CODE, "not reading"))


async def serve_compat(server, ws: ServerConnection, adapter: Adapter) -> None:
    await CompatSession(server, ws, adapter).run()

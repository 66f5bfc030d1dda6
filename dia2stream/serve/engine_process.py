"""The engine in a process of its own (issue 19 item 1), as vLLM V1 runs `EngineCore` apart from
its API server: connection work (websockets, parsing, compatible APIs, HTTP, encoders) runs on
the server's interpreter and can no longer take the generation thread's interpreter lock.

    server process                                       engine process (a fresh interpreter)
    event loop ── EngineProxy.submit(...) ─► writer ══ commands ══► reader ─► Engine (unchanged):
                  CallHandle per call       thread      (pipe)      thread    inbox, generation
                                                                              thread, Calls
    outboxes ◄─ CallHandle.sink ◄──── reader ◄══ one Batch a step ══ sender ◄─ Engine(flush=...)
                                      thread      (pipe)              thread

Commands cross one way (`Open`, `Submit`, ... below), in the order the server gave them; the
engine process applies them through the engine's own methods, so the engine and its calls run
exactly as in one process. What the calls emit crosses back batched: the engine calls `flush`
after each frame step and before it waits for its inbox, and everything its calls emitted since
the last one goes out as one `Batch` (every call's frames and events, the frame steps for
/metrics, the engine's /health figures, each call's phase), sent by a thread of its own so the
generation thread never waits on the server. With nothing to send, a heartbeat `Batch` every
`HEARTBEAT_S` keeps the figures fresh.

The server never waits on the engine: `open_call` admits from the last published figures (the
engine process opens the admitted call on its own lowest free slot: calls move between slots
there, so a handle's `slot.index` is the slot it was opened on as this side counts them, a name
for logs, not where the call is now), epochs are counted on both sides in the same command order, and the
frames a client has taken (`frames_acked`, which the engine paces on) go back every `ACK_EVERY_S`.
Replies the event loop answers itself (`reply`) keep their place in the call's event order as a
`ReplyMark` that crosses and comes back; the reply itself never leaves this process (a compatible
API's deferred action is not picklable, and need not be).

Liveness (docs/operations.md): the engine process's death (the pipe's end) or a failure it
reports (a sticky device error) is `failure_reason()`; while calls generate, `stalled_s` grows
from the last figures the engine process published, so a hung or frozen engine process is seen
by the same rule as a hung thread. The engine process ignores SIGINT and SIGTERM (a terminal's
Ctrl-C or systemd's group kill must not kill it under a draining server); it ends when the server
says `Shutdown`, or when the server's end of the pipe closes (the server died).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from dia2stream.call.call import Sink
from dia2stream.wire import protocol as p

log = logging.getLogger("dia2stream.engine_process")

HEARTBEAT_S = 0.25  # the engine process publishes its figures at least this often
GPU_MEMORY_EVERY_S = 1.0  # the allocator's figures are read at most this often (each read builds its whole stats dict)
ACK_EVERY_S = 0.05  # frames taken by clients go back to the engine at most this late (it paces at 250 frames)
CLOSE_TIMEOUT_S = 15.0  # a closing engine process that has not exited by then is killed (its thread joins in 5)
FAILED_EXIT_S = 5.0  # an engine process that could not build its engine exits by itself (at once); else killed
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# -- server → engine process ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    """The first message: what to build (after the server's sys.path, sent on its own before it,
    so that `engine_init`'s module can be found)."""

    config: object  # ServerConfig
    engine_init: Callable[[], None] | None


@dataclass(frozen=True)
class Open:
    serial: int  # the call's name on both sides (a slot is reused; a serial never is)


@dataclass(frozen=True)
class Close:
    serial: int


@dataclass(frozen=True)
class Submit:
    serial: int
    command: object  # a protocol command


@dataclass(frozen=True)
class Reply:
    serial: int
    token: int  # the reply waits in the server; this keeps its place in the call's order


@dataclass(frozen=True)
class DrainCall:
    serial: int


@dataclass(frozen=True)
class SubmitVoice:
    serial: int
    command: p.SetVoice  # without its audio (loaded already)
    loaded: object  # voices.voice.LoadedVoice
    key: str


@dataclass(frozen=True)
class SubmitUserTurn:
    serial: int
    command: p.UserTurn  # without its audio (loaded already)
    loaded: object  # call.user_turn.LoadedUserTurn


@dataclass(frozen=True)
class ForgetVoices:
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Acks:
    frames: dict[int, int]  # serial → frames its client has taken so far


@dataclass(frozen=True)
class Shutdown:
    pass


# -- engine process → server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The engine is built and running."""

    pid: int
    model_name: str
    device: str
    max_calls: int
    context_frames: int
    tokenizer: object  # the model's tokenizer: a user_turn's words are placed in the server's worker threads
    figures: "Figures"


@dataclass(frozen=True)
class StartFailed:
    error: BaseException


@dataclass(frozen=True)
class Figures:
    """The engine's /health figures and what the server needs besides, at one moment."""

    health: dict  # Engine.health() (its `calls` is the server's count, not this)
    generating: int  # calls generating: while > 0, `stalled_s` grows until the next figures
    admits_calls: int  # Engine.admits_calls(): calls in all it would take now
    voices: tuple[str, ...]  # the prepared voices' keys
    gpu_memory: tuple[float, float] | None  # (allocated, reserved) bytes, for /metrics
    at: float  # time.monotonic() when taken (one clock for every process on the machine)


@dataclass(frozen=True)
class Batch:
    """One engine step's output (or a heartbeat, with no items)."""

    items: list  # (serial, item): every call's frames and events, in the order they were emitted
    steps: list  # (ms, calls) of each frame step since the last batch: /metrics' frame_step_seconds
    phases: dict  # serial → (generating, speaking) of every open call
    figures: Figures


@dataclass(frozen=True)
class ReplyMark:
    """Stands for a reply the server keeps (`Reply.token`), in the call's event order."""

    token: int


# -- the server's side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotRef:
    index: int


class CallHandle:
    """The server's view of a call in the engine process: the surface a connection uses of a
    `Call` (epoch, generating, speaking, slot.index, frames_acked)."""

    def __init__(self, serial: int, slot: int, sink: Sink) -> None:
        self.serial, self.slot, self.sink = serial, SlotRef(slot), sink
        self.epoch = 0  # raised here by pause, reset and close, as the engine process raises its own
        self.frames_acked = 0  # set by the connection's sender; sent back every ACK_EVERY_S
        self.generating = False  # as of the last batch
        self.speaking = False
        self._replies: dict[int, object] = {}
        self._tokens = itertools.count()

    def keep_reply(self, event: object) -> int:
        token = next(self._tokens)
        self._replies[token] = event
        return token

    def take_reply(self, token: int) -> object | None:
        return self._replies.pop(token, None)


class EngineProxy:
    """The engine's surface for the server (`Engine`'s, as `serve/server.py`, `compat_session.py`
    and `http_api.py` use it), over an engine in its own process. `EngineProxy.start(config)`
    spawns it and returns once its engine is built (voices preloaded)."""

    def __init__(self, process, commands, events, hello: Hello, config, metrics) -> None:
        from dia2stream.voices.voice import VoicePreparer

        self._process, self._commands, self._events = process, commands, events
        self.pid, self.model_name, self.device = hello.pid, hello.model_name, hello.device
        self.max_calls, self.context_frames = hello.max_calls, hello.context_frames
        self._tokenizer = hello.tokenizer
        self._max_user_turn_seconds = config.max_user_turn_seconds
        # set_voice audio is decoded (and transcribed) in the server's worker threads, as before:
        # in the engine process it would take the generation thread's interpreter lock
        self._preparer = VoicePreparer(None, config.voice_settings(whisper_device=hello.device))
        self.metrics = metrics
        self._figures = hello.figures
        self.voices: tuple[str, ...] = hello.figures.voices
        self._lock = threading.Lock()
        self._slots: list[CallHandle | None] = [None] * self.max_calls
        self._handles: dict[int, CallHandle] = {}
        self._serials = itertools.count(1)
        self._closed = False
        self._death: str | None = None  # why the engine process is gone, when it went by itself
        self.batches = 0  # batches received (each engine step's output is one)
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_commands, name="dia2-engine-commands", daemon=True)
        self._reader = threading.Thread(target=self._read_batches, name="dia2-engine-batches", daemon=True)
        self._writer.start()
        self._reader.start()

    @classmethod
    def start(cls, config, metrics=None, engine_init: Callable[[], None] | None = None,
              timeout_s: float | None = None) -> "EngineProxy":
        """Spawn the engine process and wait until its engine is built. `engine_init`: a picklable
        function the engine process calls first (tests wrap their own stepper there). Raises
        what building the engine raised."""
        # A fresh interpreter (never a fork of one that may hold CUDA state), started by exec
        # rather than multiprocessing's spawn, which would import the embedding program's main
        # module again in the child.
        command_fds, event_fds = os.pipe(), os.pipe()
        t0 = time.perf_counter()
        try:
            process = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(sys.path), str(command_fds[0]),
                                        str(event_fds[1])], pass_fds=(command_fds[0], event_fds[1]))
        finally:
            os.close(command_fds[0])  # the engine process's ends: held there only, so each side sees the
            os.close(event_fds[1])    # other's end close
        command_writer = Connection(command_fds[1], readable=False)
        event_reader = Connection(event_fds[0], writable=False)
        try:
            command_writer.send(Build(config, engine_init))
            first = _first_message(process, event_reader, timeout_s)
        except BaseException:
            _end(process, quiet=True)  # still building (a timeout, an interrupt), or gone: the error says why
            command_writer.close()
            event_reader.close()
            raise
        if isinstance(first, StartFailed):
            # It said why and exits by itself: no warning that it had to be killed before that reason
            # (a checkpoint that does not exist is one line, not a warning and then the line).
            _end(process, FAILED_EXIT_S, quiet=True)
            command_writer.close()
            event_reader.close()
            raise first.error
        log.info("engine process %d ready in %.1f s", first.pid, time.perf_counter() - t0)
        return cls(process, command_writer, event_reader, first, config, metrics)

    # -- calls -------------------------------------------------------------------------------------

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self._handles)

    def open_call(self, sink: Sink) -> CallHandle | None:
        """A call on the lowest free slot, or None when every slot is taken or the engine would
        not take one more call in real time (as of its last figures). Never waits on the engine."""
        with self._lock:
            free = [slot for slot, handle in enumerate(self._slots) if handle is None]
            if not free or len(self._handles) + 1 > self._figures.admits_calls:
                return None
            handle = CallHandle(next(self._serials), free[0], sink)
            self._slots[free[0]] = self._handles[handle.serial] = handle
        self._send(Open(handle.serial))
        return handle

    def close_call(self, call: CallHandle) -> None:
        with self._lock:
            if self._handles.pop(call.serial, None) is None:
                return
            self._slots[call.slot.index] = None
        call.epoch += 1
        self._send(Close(call.serial))

    def submit(self, call: CallHandle, command: object) -> None:
        if isinstance(command, (p.Pause, p.Reset)):
            call.epoch += 1  # as Engine.submit does, here and there in the same order
        self._send(Submit(call.serial, command))

    def reply(self, call: CallHandle, event: object) -> None:
        self._send(Reply(call.serial, call.keep_reply(event)))

    def drain_call(self, call: CallHandle) -> None:
        self._send(DrainCall(call.serial))

    def load_voice(self, cmd: p.SetVoice, key: str):
        """Decode a set_voice's audio and find its words: blocking, in a worker thread. VoiceError."""
        from dia2stream.voices.voice import VoiceRequest

        return self._preparer.load(dataclasses.replace(VoiceRequest.from_command(cmd), name=key))

    def submit_voice(self, call: CallHandle, cmd: p.SetVoice, loaded, key: str) -> None:
        self._send(SubmitVoice(call.serial, dataclasses.replace(cmd, audio_b64=None, speaker2_audio_b64=None),
                               loaded, key))

    def load_user_turn(self, cmd: p.UserTurn):
        """Decode a user_turn's audio and place its words: blocking, in a worker thread. ProtocolError."""
        from dia2stream.call.user_turn import load_user_turn

        return load_user_turn(cmd, self._tokenizer, self._max_user_turn_seconds)

    def submit_user_turn(self, call: CallHandle, cmd: p.UserTurn, loaded) -> None:
        self._send(SubmitUserTurn(call.serial, dataclasses.replace(cmd, audio_b64=""), loaded))

    def forget_voices(self, keys: list[str]) -> None:
        if keys:
            self._send(ForgetVoices(tuple(keys)))

    # -- figures and liveness ------------------------------------------------------------------------

    def health(self) -> dict:
        figures = self._figures
        calls = self.calls
        stalled = 0.0
        if figures.generating:
            stalled = float(figures.health.get("stalled_s") or 0.0) + max(0.0, time.monotonic() - figures.at)
        return {**figures.health, "calls": calls, "busy": calls >= self.max_calls or figures.health["overloaded"],
                "stalled_s": round(stalled, 2), "failure": self.failure_reason(), "engine_pid": self.pid}

    @property
    def running(self) -> bool:
        return not self._closed and self.failure_reason() is None

    def failure_reason(self) -> str | None:
        return self._death or self._figures.health.get("failure")

    def stalled_s(self) -> float:
        return self.health()["stalled_s"]

    def gpu_memory(self) -> tuple[float, float] | None:
        return self._figures.gpu_memory

    def close(self) -> None:
        """Stop the engine process (its engine finishes the step it is in) and wait for it; kill
        it if it does not exit in CLOSE_TIMEOUT_S. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._outgoing.put(Shutdown())
        self._writer.join(timeout=CLOSE_TIMEOUT_S)
        _end(self._process, CLOSE_TIMEOUT_S)
        self._reader.join(timeout=CLOSE_TIMEOUT_S)
        self._commands.close()
        self._events.close()

    # -- the two threads -----------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        self._outgoing.put(message)  # never blocks the event loop, whatever the engine process does

    def _write_commands(self) -> None:
        """Commands to the engine process in order, and the clients' frame counts every ACK_EVERY_S."""
        sent_acks: dict[int, int] = {}
        while True:
            try:
                message = self._outgoing.get(timeout=ACK_EVERY_S)
            except queue.Empty:
                message = None
            acks = self._changed_acks(sent_acks)
            try:
                if acks:
                    self._commands.send(Acks(acks))
                if message is not None:
                    self._commands.send(message)
            except (OSError, ValueError):
                return  # the engine process is gone: the reader says why
            if isinstance(message, Shutdown):
                return

    def _changed_acks(self, sent: dict[int, int]) -> dict[int, int]:
        with self._lock:
            handles = list(self._handles.values())
        changed = {h.serial: h.frames_acked for h in handles if sent.get(h.serial) != h.frames_acked}
        sent.update(changed)
        for serial in set(sent) - {h.serial for h in handles}:
            del sent[serial]
        return changed

    def _read_batches(self) -> None:
        while True:
            try:
                batch = self._events.recv()
            except (EOFError, OSError):
                break
            try:
                self._apply(batch)
            except Exception:
                log.exception("engine process batch not applied")
        if not self._closed:
            try:
                code = self._process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                code = None  # its end of the pipe closed, but it runs on
            self._death = f"the engine process {self.pid} exited ({_exit_description(code)})"
            log.critical("%s", self._death)

    def _apply(self, batch: Batch) -> None:
        self.batches += 1
        self._figures = batch.figures
        self.voices = batch.figures.voices
        if self.metrics is not None:
            for ms, calls in batch.steps:
                self.metrics.frame_step_ms(ms, calls)
        with self._lock:
            handles = dict(self._handles)
        for serial, (generating, speaking) in batch.phases.items():
            handle = handles.get(serial)
            if handle is not None:
                handle.generating, handle.speaking = generating, speaking
        for serial, item in batch.items:
            handle = handles.get(serial)
            if handle is None:
                continue  # closed here already: nobody reads its items
            if isinstance(item, ReplyMark):
                item = handle.take_reply(item.token)
                if item is None:
                    continue
            handle.sink(item)


def _first_message(process, events, timeout_s: float | None) -> Hello | StartFailed:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not events.poll(0.2):
        if process.poll() is not None:
            raise RuntimeError(f"the engine process exited ({_exit_description(process.returncode)}) before its "
                               "engine was built")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the engine process did not build its engine in {timeout_s:g} s")
    try:
        message = events.recv()
    except EOFError:
        raise RuntimeError(f"the engine process exited ({_exit_description(process.wait(timeout=5))}) before "
                           "its engine was built") from None
    return message


def _end(process: subprocess.Popen, timeout_s: float = 0.0, quiet: bool = False) -> None:
    """Wait `timeout_s` for the engine process to exit, then kill it: with a warning, unless the
    caller has said why already (`quiet`: a start-up that failed)."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        (log.debug if quiet else log.warning)("the engine process %d did not exit; killing it", process.pid)
        process.kill()
        process.wait(timeout=5)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"


# -- the engine process's side -------------------------------------------------------------------------------


# The engine process's first lines: the server's import path first, then this module.
_BOOT = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
         "from dia2stream.serve.engine_process import engine_main; engine_main(int(sys.argv[2]), int(sys.argv[3]))")


def engine_main(command_fd: int, event_fd: int) -> None:
    """The engine process: build the engine as `build_engine(config)` does, say `Hello`, then
    apply commands until `Shutdown` or the server's end closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when this process ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    commands, events = Connection(command_fd, writable=False), Connection(event_fd, readable=False)
    try:
        build = commands.recv()
    except EOFError:
        return
    config = build.config
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    try:
        if build.engine_init is not None:
            build.engine_init()
        side = EngineSide(config, events)
    except BaseException as exc:  # noqa: BLE001 - the server raises it
        events.send(StartFailed(_picklable(exc)))
        events.close()
        _exit_now(1)  # the server waits for this exit (FAILED_EXIT_S): no teardown of torch first
    events.send(Hello(pid=os.getpid(), model_name=side.tts.name, device=str(side.tts.device),
                      max_calls=side.engine.max_calls, context_frames=side.engine.context_frames,
                      tokenizer=side.tts.tokenizer, figures=side.figures()))
    side.serve(commands)
    _exit_now(0)


def _exit_now(status: int) -> None:
    """Everything is closed: flush and skip the interpreter's teardown (over a second with torch
    loaded), which the server would wait for."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class EngineSide:
    """The engine and its calls in the engine process, with the sender of its batches."""

    def __init__(self, config, events) -> None:
        from dia2stream.serve.build import build_engine

        self._events = events
        self._items: list = []  # (serial, item) emitted since the last flush: generation thread only
        self._steps: list = []
        self._calls: dict[int, Any] = {}  # serial → Call
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        self.engine = None
        self.tts, self.engine = build_engine(config, metrics=self, flush=self.flush)
        # The scheduler's step costs change on the generation thread only: read them there (at
        # each flush) and let the heartbeat repeat the last figure.
        self._admits_calls = self.engine.admits_calls()
        # read at every flush the allocator's figures were ~6 % of the generation thread at 64
        # calls (H200, py-spy, run 35b): each read builds its whole stats dict
        self._gpu_memory = Recent(_gpu_memory, GPU_MEMORY_EVERY_S)
        self._sender = threading.Thread(target=self._send_batches, name="dia2-engine-sender", daemon=True)
        self._sender.start()

    # what the engine and its calls call, on the generation thread

    def frame_step_ms(self, ms: float, calls: int | None = None) -> None:
        self._steps.append((ms, calls))

    def _sink(self, serial: int) -> Sink:
        items = self._items
        return lambda item: items.append((serial, item))

    def flush(self) -> None:
        """What the calls emitted since the last flush, as one batch (the generation thread)."""
        if self.engine is None:
            return
        admits = self.engine.admits_calls()  # overload ends between steps too: say so at once
        if not (self._items or self._steps or admits != self._admits_calls):
            return
        self._admits_calls = admits
        items = self._items.copy()
        self._items.clear()  # in place: the calls' sinks hold this list
        steps, self._steps = self._steps, []
        self._batches.put(self._batch(items, steps))

    def _batch(self, items: list, steps: list) -> Batch:
        calls = dict(self._calls)
        return Batch(items, steps, {serial: (call.generating, call.speaking) for serial, call in calls.items()},
                     self.figures(calls))

    def figures(self, calls: dict | None = None) -> Figures:
        engine = self.engine
        calls = dict(self._calls) if calls is None else calls
        return Figures(health=engine.health(), generating=sum(call.generating for call in calls.values()),
                       admits_calls=self._admits_calls, voices=tuple(engine.voices),
                       gpu_memory=self._gpu_memory(), at=time.monotonic())

    # the sender thread

    def _send_batches(self) -> None:
        while True:
            try:
                batch = self._batches.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                try:
                    batch = self._batch([], [])  # a heartbeat: fresh figures, nothing else
                except Exception:  # noqa: BLE001 - this thread must outlive any one figure
                    log.exception("engine process: no heartbeat")
                    continue
            if batch is None:
                return
            try:
                self._events.send(batch)
            except (OSError, ValueError):
                return  # the server is gone; the command reader ends this process

    # the main thread: commands

    def serve(self, commands) -> None:
        while True:
            try:
                message = commands.recv()
            except (EOFError, OSError):
                log.warning("the server's end of the engine pipe closed; stopping the engine")
                break
            if isinstance(message, Shutdown):
                break
            try:
                self._apply(message)
            except Exception:
                log.exception("engine process: command %s not applied", type(message).__name__)
        self.engine.close()
        self._batches.put(None)
        self._sender.join(timeout=5)
        self._events.close()
        commands.close()

    def _apply(self, message: object) -> None:
        engine = self.engine
        match message:
            case Acks(frames=frames):
                for serial, n in frames.items():
                    call = self._calls.get(serial)
                    if call is not None:
                        call.frames_acked = n
                return
            case Open(serial=serial):
                self._calls[serial] = engine.open_call(self._sink(serial), admitted=True)
                return
            case ForgetVoices(keys=keys):
                engine.forget_voices(list(keys))
                return
        call = self._calls.get(message.serial)
        if call is None:
            return  # closed already: as a command that raced with a disconnect in one process
        match message:
            case Close():
                del self._calls[message.serial]
                engine.close_call(call)
            case Submit(command=command):
                engine.submit(call, command)
            case Reply(token=token):
                engine.reply(call, ReplyMark(token))
            case DrainCall():
                engine.drain_call(call)
            case SubmitVoice(command=command, loaded=loaded, key=key):
                engine.submit_voice(call, command, loaded, key)
            case SubmitUserTurn(command=command, loaded=loaded):
                engine.submit_user_turn(call, command, loaded)
            case _:
                raise TypeError(f"unknown command {message!r}")


class Recent:
    """A figure that is slow to read and asked for often: read at most every `every_s`, the last
    reading given in between (from any thread: the reading and its time are replaced together)."""

    def __init__(self, read: Callable[[], Any], every_s: float, clock: Callable[[], float] = time.monotonic):
        self._read, self._every_s, self._clock = read, every_s, clock
        self._last: tuple[float, Any] | None = None

    def __call__(self) -> Any:
        now, last = self._clock(), self._last
        if last is None or now - last[0] >= self._every_s:
            last = self._last = (now, self._read())
        return last[1]


def _gpu_memory() -> tuple[float, float] | None:
    from dia2stream.serve.metrics import torch_gpu_memory

    return torch_gpu_memory()


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    from dia2stream.voices.voice import VoiceError

    if isinstance(exc, VoiceError):  # a --voice preload; its (code, message) constructor does not unpickle
        exc = _PicklableVoiceError(exc.code, exc.message)
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _voice_error(code: str, message: str) -> BaseException:
    from dia2stream.voices.voice import VoiceError

    return VoiceError(code, message)


class _PicklableVoiceError(Exception):
    """A VoiceError on its way to the server, where it is a VoiceError again."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):
        return _voice_error, (self.code, self.message)

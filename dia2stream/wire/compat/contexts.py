"""The context machinery the streaming APIs share (ElevenLabs contexts, Cartesia contexts,
Deepgram's one stream): several contexts on one call, speaking one at a time in the order they
were opened.

The call is one conversation; each context is a stretch of it. One context at a time has the
floor: its text is fed to the call (`start`, then `inject`s with `final: false`); the others wait
in the adapter. The floor goes to the first open context that has something to say (text, a
flush, or its end): a context that was opened and given nothing waits without blocking the ones
behind it. A flush is the call's `flush`; more text after it is a further utterance of the same
context. A context ends in one of four ways:
- finishing (`finish_context`): its audio is completed, then the API's end-of-context message
  (`final_messages`); then the next context speaks;
- barge-in (`cancel_context`): a `pause` with `played_ms` = the audio sent so far of the call's
  utterance (the APIs do not say what the caller heard, so what was sent counts as heard): the
  call stops within a frame, the words not sent are dropped (the next context's text replaces
  them), and nothing more goes out for that context. If the call cannot roll back that far it
  is reset to the voice instead (the next text starts afresh);
- timing out (`tick`, where the API has `context_idle_s`): while another context waits to speak,
  the one with the floor that has had no input and sent no audio for that long is finished as if
  its client had ended it (the hosted services time idle contexts out; here one would otherwise
  hold the floor for ever);
- the engine resetting the call (an `internal_error` or `context_full` error): the error, then
  its end-of-context message; its words not yet spoken are lost, and the next text starts a
  fresh utterance (`start`).
Each native command carries the context's serial number as its id, so `word` and `done` events
name their context.

A subclass turns frames and words into its API's messages (`audio_messages`, `final_messages`),
and errors into its error shape (`error`).
"""

from __future__ import annotations

import abc
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from dia2stream.clock import FRAME_MS
from dia2stream.wire import protocol as p
from dia2stream.wire.compat.audio import StreamEncoder, StreamFormat
from dia2stream.wire.frames import AudioFrame
from dia2stream.wire.compat.base import Adapter, Later, Send, Submit

log = logging.getLogger("dia2stream.compat")

NATIVE_FORMAT = "pcm_24000"  # what the call encodes; adapters re-encode its float frames themselves
# The call's own errors after which it has no utterance: the engine ended it and reset the call.
CALL_RESET_CODES = frozenset({p.ErrorCode.INTERNAL_ERROR, p.ErrorCode.CONTEXT_FULL})
TICK_S = 0.5  # how often a context's idle time is checked
KEEP_ENDED_CONTEXTS = 16  # ended contexts whose late events are still recognised


@dataclass
class Context:
    id: str
    serial: int  # the native command id of its text
    encoder: StreamEncoder
    waiting: list[str] = field(default_factory=list)  # text not fed to the call yet (context queued)
    flush_waiting: bool = False  # a flush came while queued
    closing: bool = False  # finish, then the end-of-context message
    open_utterance: bool = False  # text fed since the last `done`
    flushed: bool = False  # the last thing it got was a flush
    held_space: str = ""  # whitespace-only text kept for the next chunk (the call refuses empty text)
    audio_frames: int = 0  # its clock: frames sent
    words: list[str] = field(default_factory=list)  # words waiting for their frame
    words_sent: int = 0
    unaligned_ms: int = 0  # for the subclass's clock
    last_activity: float = 0.0  # the adapter's clock at its last input or audio (its idle time counts from here)
    extra: dict = field(default_factory=dict)  # the subclass's own per-context state

    @property
    def wants_floor(self) -> bool:
        """It has something for the call or the client: text, a flush to answer, or its end."""
        return bool(self.waiting) or self.flush_waiting or self.closing


class ContextAdapter(Adapter):
    max_contexts = 5
    context_idle_s: float | None = None  # the API's idle time after which a context gives up the floor

    def __init__(self, voice: str | None, output: StreamFormat, clock=time.monotonic):
        self.voice, self.output = voice, output
        self.clock = clock
        self.contexts: OrderedDict[str, Context] = OrderedDict()  # open, in speaking order
        self.active: Context | None = None  # the one fed to the call
        self.by_serial: dict[int, Context] = {}
        self._serials = itertools.count(1)
        self.call_started = False  # a `start` was sent: later text is `inject`
        self.utterance_frames = 0  # frames sent of the call's current utterance (played_ms of a barge-in)
        self.barrier: int | None = None  # the id of a barge-in pause not answered yet: no new text meanwhile

    # -- for subclasses ---------------------------------------------------------------------------

    @abc.abstractmethod
    def audio_messages(self, ctx: Context, audio: bytes, words: list[str]) -> list:
        """A context's audio (and its words) in this API's messages."""

    @abc.abstractmethod
    def final_messages(self, ctx: Context, tail: bytes, words: list[str]) -> list:
        """The last of a finished context: its tail audio and the API's end message."""

    @abc.abstractmethod
    def error(self, code: str, message: str, context_id: str | None = None) -> str:
        """An error in this API's shape."""

    def utterance_done(self, ctx: Context) -> list:
        """The call finished speaking what a context was given so far (after a flush)."""
        return []

    def refuse(self, code: str, message: str) -> str:
        return self.error(code, message)

    @property
    def tick_s(self) -> float | None:
        return TICK_S if self.context_idle_s is not None else None

    # -- contexts (receiving side) ------------------------------------------------------------------

    def open_context(self, cid: str, output: StreamFormat | None = None) -> Context | None:
        """A new context (in `output`, else the connection's format), or None when too many are open."""
        if len(self.contexts) >= self.max_contexts:
            return None
        ctx = Context(id=cid, serial=next(self._serials), encoder=StreamEncoder(output or self.output),
                      last_activity=self.clock())
        self.contexts[cid] = ctx
        self.by_serial[ctx.serial] = ctx
        self._forget_ended_contexts(ctx.serial)
        return ctx

    def _forget_ended_contexts(self, newest: int) -> None:
        """A context's late events (its `done`, words of a cut turn) come soon after it ends:
        keep the last few ended ones for them, not every context a long call ever had (each holds
        an encoder: a resampler, or LAME's buffers)."""
        current = {ctx.serial for ctx in self.contexts.values()}
        if self.active is not None:
            current.add(self.active.serial)
        for serial in [s for s in self.by_serial if s <= newest - KEEP_ENDED_CONTEXTS and s not in current]:
            del self.by_serial[serial]

    def add_text(self, ctx: Context, text: str) -> list:
        ctx.last_activity = self.clock()  # even an empty text: the API's keep-alive for a context
        if not text:
            return []
        if not text.strip():
            ctx.held_space += text
            return []
        text, ctx.held_space = ctx.held_space + text, ""
        ctx.flushed = False
        if ctx is not self.active or self.barrier is not None:
            ctx.waiting.append(text)
            return []
        return self._feed(ctx, text)

    def flush(self, ctx: Context) -> list:
        ctx.last_activity = self.clock()
        ctx.flushed = True
        if ctx is not self.active or self.barrier is not None:
            ctx.flush_waiting = True
            return []
        if ctx.open_utterance:
            return [Submit(p.Flush(id=ctx.serial))]
        return self.utterance_done(ctx)

    def finish_context(self, ctx: Context) -> list:
        """No more input: complete its audio, then its end-of-context message."""
        actions = [] if ctx.flushed else self.flush(ctx)
        ctx.closing = True
        return actions + self.advance()

    def cancel_context(self, ctx: Context) -> list:
        """Barge-in (see the module docstring)."""
        del self.contexts[ctx.id]
        if ctx is not self.active:
            return []  # queued: nothing of it was fed or sent
        self.active = None
        actions = []
        if self.call_started and self.barrier is None:
            self.barrier = -ctx.serial
            actions.append(Submit(p.Pause(id=self.barrier, played_ms=self.utterance_frames * FRAME_MS)))
        log.debug("%s: context %r interrupted after %d frames", self.api, ctx.id, ctx.audio_frames)
        return actions + self.advance()

    def advance(self) -> list:
        """Give the floor to the first context with something to say when none has it; finish the
        active one when it is closing and all its audio is out."""
        if self.barrier is not None:
            return []
        if self.active is None:
            ctx = self.active = next((c for c in self.contexts.values() if c.wants_floor), None)
            if ctx is None:
                return []
            ctx.last_activity = self.clock()  # its idle time counts from here: waiting for the floor is not idling
            actions = []
            for text in ctx.waiting:
                actions += self._feed(ctx, text)
            ctx.waiting.clear()
            if ctx.flush_waiting:
                ctx.flush_waiting = False
                actions += self.flush(ctx)
            return actions + self.advance()
        ctx = self.active
        if ctx is not None and ctx.closing and not ctx.open_utterance:
            # in the send order: after every frame the call has already queued for it
            return [Later(lambda: self._finish(ctx))]
        return []

    def _feed(self, ctx: Context, text: str) -> list:
        ctx.open_utterance = True
        actions = []
        for piece in _pieces(text, p.MAX_TEXT_CHARS):  # these APIs take longer texts than one command
            if not self.call_started:
                self.call_started = True
                actions.append(Submit(p.Start(text=piece, final=False, id=ctx.serial, voice=self.voice,
                                              format=NATIVE_FORMAT)))
            else:
                actions.append(Submit(p.Inject(text=piece, final=False, id=ctx.serial)))
        return actions

    def _finish(self, ctx: Context) -> list:
        if self.active is not ctx or ctx.open_utterance:
            return []  # interrupted meanwhile, or its text reopened it
        return self._end(ctx) + self.advance()

    def _end(self, ctx: Context) -> list:
        """The active context is over: the rest of its audio and its end-of-context message."""
        self.active = None
        self.contexts.pop(ctx.id, None)
        words, ctx.words = ctx.words, []
        return self.final_messages(ctx, ctx.encoder.finish(), words)

    # -- timed rules ----------------------------------------------------------------------------------

    def tick(self) -> list:
        """Finish the context that has the floor if it has been idle `context_idle_s` while
        another context waits to speak (see the module docstring)."""
        ctx = self.active
        if ctx is None or ctx.closing or self.barrier is not None or self.context_idle_s is None:
            return []
        if not any(other.wants_floor for other in self.contexts.values() if other is not ctx):
            return []
        idle_s = self.clock() - ctx.last_activity
        if idle_s < self.context_idle_s:
            return []
        log.info("%s: context %r idle for %.1f s while another waits to speak; finishing it", self.api, ctx.id,
                 idle_s)
        return self.finish_context(ctx)

    # -- call → client ------------------------------------------------------------------------------

    def translate(self, item) -> list:
        ctx = self.active
        if isinstance(item, AudioFrame):
            self.utterance_frames += 1
            if ctx is None:
                return []
            ctx.last_activity = self.clock()  # speaking: not idle, however long its client is silent
            audio = ctx.encoder.encode(item.pcm)
            words, ctx.words = ctx.words, []
            actions = self.audio_messages(ctx, audio, words)
            ctx.audio_frames += 1
            ctx.words_sent += len(words)
            return actions
        if isinstance(item, p.Started):
            self.utterance_frames = 0
        elif isinstance(item, p.Word):
            if ctx is not None and self.by_serial.get(item.id) is ctx:
                ctx.words.append(item.word)
        elif isinstance(item, p.Done):
            owner = self.by_serial.get(item.id)
            actions = []
            if owner is not None and owner.open_utterance:
                owner.open_utterance = False
                if owner is ctx:
                    actions += self.utterance_done(owner)
            return actions + self.advance()
        elif isinstance(item, p.Paused) and self.barrier is not None and item.id == self.barrier:
            self.barrier = None
            return self.advance()
        elif isinstance(item, p.ErrorEvent):
            return self._call_error(item)
        return []

    def _call_error(self, event: p.ErrorEvent) -> list:
        if self.barrier is not None and event.id == self.barrier:
            self.barrier = None
            self.call_started = False
            return [Submit(p.Reset(format=NATIVE_FORMAT))] + self.advance()
        if event.code in CALL_RESET_CODES:
            return self._call_was_reset(event)
        owner = self.by_serial.get(event.id) if isinstance(event.id, int) else None
        if event.code == p.ErrorCode.NOT_STARTED:
            return self._no_utterance(owner)
        actions = [Send(self.error(event.code, event.message, owner.id if owner is not None else None))]
        if event.cmd == "start":  # refused: no utterance began, and the next text must start one
            self.call_started = False
            if owner is not None:
                owner.open_utterance = False
            actions += self.advance()
        return actions

    def _call_was_reset(self, event: p.ErrorEvent) -> list:
        """The engine ended the call's utterance and reset the call. The error belongs to the
        context with the floor (its id names the turn, which another context may have started),
        and ends it; the next text starts a fresh utterance, where `inject` or `flush` would be
        refused (`not_started`) and the connection would never speak again."""
        self.call_started = False
        self.utterance_frames = 0
        ctx = self.active
        log.info("%s: the call was reset (%s) while context %r spoke", self.api, event.code, ctx and ctx.id)
        actions = [Send(self.error(event.code, event.message, ctx.id if ctx is not None else None))]
        if ctx is not None:
            if ctx.open_utterance:
                ctx.open_utterance = False
                actions += self.utterance_done(ctx)  # a flush it was waiting on is answered: nothing more comes
            actions += self._end(ctx)
        return actions + self.advance()

    def _no_utterance(self, owner: Context | None) -> list:
        """`not_started`: a command of ours reached the call after the engine had reset it. The
        reset's own error told the client; this one is ours, not theirs."""
        log.debug("%s: a command for context %r came after the call was reset", self.api, owner and owner.id)
        if owner is None or owner is not self.active:
            return []  # a context the reset already ended
        self.call_started = False  # it has the floor and no utterance: its next text starts one
        actions = []
        if owner.open_utterance:
            owner.open_utterance = False
            actions += self.utterance_done(owner)
        return actions + self.advance()


def _pieces(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut after whitespace where there is some."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit) + 1 or limit
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text] if text.strip() or not pieces else pieces

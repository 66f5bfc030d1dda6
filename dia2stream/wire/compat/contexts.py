"""The context machinery the streaming APIs share (ElevenLabs contexts, Cartesia contexts,
Deepgram's one stream): several contexts on one call, speaking one at a time in the order they
were opened.

The call is one conversation; each context is a stretch of it. The first open context's text is
fed to the call (`start`, then `inject`s with `final: false`); later contexts wait in the
adapter. A flush is the call's `flush`; more text after it is a further utterance of the same
context. A context ends in one of two ways:
- finishing (`finish_context`): its audio is completed, then the API's end-of-context message
  (`final_messages`); then the next context speaks;
- barge-in (`cancel_context`): a `pause` with `played_ms` = the audio sent so far of the call's
  utterance (the APIs do not say what the caller heard, so what was sent counts as heard): the
  call stops within a frame, the words not sent are dropped (the next context's text replaces
  them), and nothing more goes out for that context. If the call cannot roll back that far it
  is reset to the voice instead (the next text starts afresh).
Each native command carries the context's serial number as its id, so `word` and `done` events
name their context.

A subclass turns frames and words into its API's messages (`audio_messages`, `final_messages`),
and errors into its error shape (`error`).
"""

from __future__ import annotations

import abc
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from dia2stream.clock import FRAME_MS
from dia2stream.wire import protocol as p
from dia2stream.wire.compat.audio import StreamEncoder, StreamFormat
from dia2stream.wire.frames import AudioFrame
from dia2stream.wire.compat.base import Adapter, Later, Send, Submit

log = logging.getLogger("dia2stream.compat")

NATIVE_FORMAT = "pcm_24000"  # what the call encodes; adapters re-encode its float frames themselves


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
    extra: dict = field(default_factory=dict)  # the subclass's own per-context state


class ContextAdapter(Adapter):
    max_contexts = 5

    def __init__(self, voice: str | None, output: StreamFormat):
        self.voice, self.output = voice, output
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

    # -- contexts (receiving side) ------------------------------------------------------------------

    def open_context(self, cid: str, output: StreamFormat | None = None) -> Context | None:
        """A new context (in `output`, else the connection's format), or None when too many are open."""
        if len(self.contexts) >= self.max_contexts:
            return None
        ctx = Context(id=cid, serial=next(self._serials), encoder=StreamEncoder(output or self.output))
        self.contexts[cid] = ctx
        self.by_serial[ctx.serial] = ctx
        return ctx

    def add_text(self, ctx: Context, text: str) -> list:
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
        """Start feeding the next context when none is active; finish the active one when it is
        closing and all its audio is out."""
        if self.barrier is not None:
            return []
        if self.active is None and self.contexts:
            ctx = self.active = next(iter(self.contexts.values()))
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
        self.active = None
        self.contexts.pop(ctx.id, None)
        words, ctx.words = ctx.words, []
        return self.final_messages(ctx, ctx.encoder.finish(), words) + self.advance()

    # -- call → client ------------------------------------------------------------------------------

    def translate(self, item) -> list:
        ctx = self.active
        if isinstance(item, AudioFrame):
            self.utterance_frames += 1
            if ctx is None:
                return []
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
        owner = self.by_serial.get(event.id) if isinstance(event.id, int) else None
        actions = [Send(self.error(event.code, event.message, owner.id if owner is not None else None))]
        if event.cmd == "start":  # refused: no utterance began, and the next text must start one
            self.call_started = False
            if owner is not None:
                owner.open_utterance = False
            actions += self.advance()
        return actions


def _pieces(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut after whitespace where there is some."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit) + 1 or limit
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text] if text.strip() or not pieces else pieces

"""ElevenLabs' websocket TTS on a native call: multi-context
`/v1/text-to-speech/{voice_id}/multi-stream-input` and single-context `.../stream-input`.

Contexts and the call. The call is one conversation; each context is a stretch of it. Contexts
speak one at a time, in the order they were opened: the first one's text is fed to the call
(`start`, then `inject`s with `final: false`), later ones wait in the adapter. A `flush` is the
call's `flush`; more text after it is a further utterance of the same context. A context ends:
- finishing: `close_context` after a flush (or after an empty-text flush): its audio is
  completed, then `{"isFinal": true, "contextId"}`; then the next context speaks;
- barge-in: `close_context` with no flush before it, or a second `close_context`: a `pause` with
  `played_ms` = the audio sent so far (we cannot know what the caller heard, so what was sent
  counts as heard): the call stops within a frame, the words not sent are dropped, and nothing
  more goes out for that context. Both pipecat and LiveKit end every normal turn with flush +
  close_context long before its audio has played, and interrupt with a (second) close_context.

Alignment. Every audio message (one per 80 ms frame) carries `alignment` and the same
`normalizedAlignment`: the words whose first frame it is, each spread over an equal share of the
frame and followed by a " " so a word is complete in the message that starts it. Times are
relative to the message (pipecat adds up the spans, so a message with no word start carries one
" " over its whole 80 ms; the frames before a context's first word carry no alignment, and the
first word's times count from the context's start, since pipecat strips a context's leading
spaces and their time with them) unless the client asked for `sync_alignment=true` (LiveKit), where they
count from the context's first audio and a message with no word start carries empty lists (a
" " per silent frame would end up inside LiveKit's timed words).
"""

from __future__ import annotations

import base64
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from dia2stream.call.call import AudioFrame
from dia2stream.wire import protocol as p
from dia2stream.wire.compat.audio import StreamEncoder, StreamFormat, parse_elevenlabs_format
from dia2stream.wire.compat.base import (CLOSE_NORMAL, CLOSE_POLICY, Adapter, Close, IgnoredFields, Later, Send,
                                         Submit, parse_object, to_json)

log = logging.getLogger("dia2stream.compat")

FRAME_MS = 1000 / p.FRAME_RATE  # 80
MAX_CONTEXTS = 5  # open contexts per connection, as the hosted service allows
DEFAULT_INACTIVITY_S = 20.0
MAX_INACTIVITY_S = 180.0
DEFAULT_VOICE_ID = "default"
DEFAULT_FORMAT = "mp3_44100_128"  # the hosted service's default output_format
# Fields ElevenLabs defines on a message that we accept and do not act on.
KNOWN_FIELDS = {"text", "context_id", "flush", "close_context", "close_socket", "voice_settings",
                "generation_config", "try_trigger_generation", "xi_api_key", "authorization",
                "pronunciation_dictionary_locators", "model_id", "language_code", "voice_id"}


@dataclass
class Context:
    id: str
    serial: int  # the native command id of its text: words and `done` name the context by it
    waiting: list[str] = field(default_factory=list)  # text not fed to the call yet (context queued)
    flush_waiting: bool = False  # a flush came while queued
    closing: bool = False  # finish, then isFinal
    open_utterance: bool = False  # text fed since the last `done`
    flushed: bool = False  # the last thing it got was a flush (a close_context now finishes)
    held_space: str = ""  # whitespace-only text kept for the next chunk (the call refuses empty text)
    audio_frames: int = 0  # its clock: frames sent
    unaligned_ms: int = 0  # relative alignment: audio before the first word, spanned by the first word's message
    encoder: StreamEncoder | None = None
    words: list[str] = field(default_factory=list)  # words waiting for their frame
    words_sent: int = 0


@dataclass(frozen=True)
class ElevenLabsRequest:
    voice: str | None  # None: the server's default voice
    output: StreamFormat
    sync_alignment: bool
    inactivity_s: float
    single: bool  # /stream-input: one implicit context, `{"text": ""}` ends it


def parse_request(voice_id: str, query: dict[str, str], voices: list[str], single: bool) -> ElevenLabsRequest:
    """The URL's voice and query; ValueError(code, message) when the connection must be refused."""
    if voice_id != DEFAULT_VOICE_ID and voice_id not in voices:
        raise ValueError("voice_not_found", f"A voice with voice_id {voice_id!r} does not exist "
                         f"(prepared: {', '.join(sorted(voices)) or 'none'}; 'default' is the server's default voice)")
    try:
        output = parse_elevenlabs_format(query.get("output_format", DEFAULT_FORMAT))
    except ValueError as exc:
        raise ValueError("invalid_output_format", str(exc)) from None
    raw = query.get("inactivity_timeout", str(DEFAULT_INACTIVITY_S))
    try:
        inactivity = float(raw)
    except ValueError:
        inactivity = -1.0
    if not 0 < inactivity <= MAX_INACTIVITY_S:
        raise ValueError("invalid_inactivity_timeout",
                         f"inactivity_timeout must be a number of seconds in (0, {MAX_INACTIVITY_S:g}], not {raw!r}")
    return ElevenLabsRequest(voice=None if voice_id == DEFAULT_VOICE_ID else voice_id, output=output,
                             sync_alignment=query.get("sync_alignment", "false").lower() == "true",
                             inactivity_s=inactivity, single=single)


class ElevenLabsAdapter(Adapter):
    api = "elevenlabs"

    def __init__(self, voice_id: str, query: dict[str, str], voices: list[str], single: bool = False):
        self._refusal: tuple[str, str] | None = None
        try:
            self.request = parse_request(voice_id, query, voices, single)
            self.idle_timeout_s = self.request.inactivity_s
        except ValueError as exc:
            self._refusal = exc.args
            self.request = None
        self.ignored = IgnoredFields(self.api)
        self.ignored.note(k for k in query if k not in ("output_format", "inactivity_timeout", "sync_alignment"))
        self.contexts: OrderedDict[str, Context] = OrderedDict()  # open, in speaking order
        self.active: Context | None = None  # the one fed to the call
        self.by_serial: dict[int, Context] = {}
        self._serials = itertools.count(1)
        self.call_started = False  # a `start` was sent: later text is `inject`
        self.utterance_frames = 0  # frames sent of the call's current utterance (played_ms of a barge-in)
        self.barrier: int | None = None  # the id of a barge-in pause not answered yet: no new text meanwhile
        self.single_done = False

    # -- connection ------------------------------------------------------------------------------

    def opening(self) -> list:
        if self._refusal is not None:
            code, message = self._refusal
            return [Send(self._error(code, message)), Close(CLOSE_POLICY, code)]
        return []

    def refuse(self, code: str, message: str) -> str:
        return self._error(code, message)

    # -- client → call ---------------------------------------------------------------------------

    def receive(self, message) -> list:
        try:
            msg = parse_object(message)
        except ValueError as exc:
            return [Send(self._error("invalid_message", str(exc)))]
        unknown = set(msg) - KNOWN_FIELDS
        if unknown:
            self.ignored.note(sorted(unknown))
        text = msg.get("text")
        if text is not None and not isinstance(text, str):
            return [Send(self._error("invalid_message", "text must be a string"))]
        for key in ("flush", "close_context", "close_socket", "try_trigger_generation"):
            if key in msg and not isinstance(msg[key], bool):
                return [Send(self._error("invalid_message", f"{key} must be true or false"))]
        if self.request.single:
            return self._receive_single(msg, text)
        if msg.get("close_socket"):
            return self._close_socket()
        cid = msg.get("context_id")
        if cid is None:
            if text:
                return [Send(self._error("invalid_message", "context_id is required with text on "
                                         "multi-stream-input"))]
            return []  # keep-alive
        if not isinstance(cid, str) or not cid or len(cid) > 256:
            return [Send(self._error("invalid_message", "context_id must be a non-empty string of at most 256 characters"))]
        ctx = self.contexts.get(cid)
        if msg.get("close_context"):
            return self._close_context(cid, ctx)
        if ctx is None:
            if text == "" and not msg.get("flush"):
                return []  # keep-alive for a context that is gone (LiveKit, pipecat after isFinal)
            if len(self.contexts) >= MAX_CONTEXTS:
                return [Send(self._error("max_active_conversations", f"at most {MAX_CONTEXTS} contexts may be open "
                                         "on one connection; close one first", cid))]
            ctx = self._open(cid)
        actions = self._text(ctx, text or "")
        if msg.get("flush"):
            actions += self._flush(ctx)
        return actions + self._advance()

    def _receive_single(self, msg: dict, text: str | None) -> list:
        ctx = self.contexts.get("") or (None if self.single_done else self._open(""))
        if ctx is None:
            return [Send(self._error("invalid_message", "the stream has ended"))]
        if text == "" and not msg.get("flush"):  # end of input
            self.single_done = True
            return self._flush(ctx) + self._close_context("", ctx, finishing=True)
        actions = self._text(ctx, text or "")
        if msg.get("flush"):
            actions += self._flush(ctx)
        return actions + self._advance()

    def _open(self, cid: str) -> Context:
        ctx = Context(id=cid, serial=next(self._serials), encoder=StreamEncoder(self.request.output))
        self.contexts[cid] = ctx
        self.by_serial[ctx.serial] = ctx
        return ctx

    def _text(self, ctx: Context, text: str) -> list:
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

    def _feed(self, ctx: Context, text: str) -> list:
        ctx.open_utterance = True
        if not self.call_started:
            self.call_started = True
            return [Submit(p.Start(text=text, final=False, id=ctx.serial, voice=self.request.voice, format="pcm_24000"))]
        return [Submit(p.Inject(text=text, final=False, id=ctx.serial))]

    def _flush(self, ctx: Context) -> list:
        ctx.flushed = True
        if ctx is not self.active or self.barrier is not None:
            ctx.flush_waiting = True
            return []
        if ctx.open_utterance:
            return [Submit(p.Flush(id=ctx.serial))]
        return []

    def _close_context(self, cid: str, ctx: Context | None, finishing: bool | None = None) -> list:
        if ctx is None:
            return []  # already finished (isFinal sent) or never opened: nothing left to stop
        if finishing is None:
            finishing = ctx.flushed and not ctx.closing
        if finishing:
            ctx.closing = True
            return self._advance()
        return self._barge_in(ctx)

    def _barge_in(self, ctx: Context) -> list:
        del self.contexts[ctx.id]
        if ctx is not self.active:
            return []  # queued: nothing of it was fed or sent
        self.active = None
        actions = []
        if self.call_started and self.barrier is None:
            self.barrier = -ctx.serial
            actions.append(Submit(p.Pause(id=self.barrier, played_ms=self.utterance_frames * FRAME_MS)))
        log.debug("elevenlabs: context %r interrupted after %d frames", ctx.id, ctx.audio_frames)
        return actions

    def _close_socket(self) -> list:
        actions = []
        for ctx in list(self.contexts.values()):
            actions += self._barge_in(ctx)
        return actions + [Close(CLOSE_NORMAL, "close_socket")]

    def _advance(self) -> list:
        """Start feeding the next context when none is active; finish the active one when it
        is closing and all its audio is out."""
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
                actions += self._flush(ctx)
            return actions + self._advance()
        ctx = self.active
        if ctx is not None and ctx.closing and not ctx.open_utterance:
            # In the send order: after every frame the call has already queued for it.
            return [Later(lambda: self._finish(ctx))]
        return []

    def _finish(self, ctx: Context) -> list:
        if self.active is not ctx or ctx.open_utterance:
            return []  # interrupted meanwhile, or its text reopened it
        self.active = None
        self.contexts.pop(ctx.id, None)
        actions = []
        tail = ctx.encoder.finish()
        if tail or ctx.words:
            actions.append(Send(self._audio(ctx, tail, self._alignment(ctx, ctx.words, 0))))
            ctx.words = []
        final = {"isFinal": True}
        if not self.request.single:
            final["contextId"] = ctx.id
        actions.append(Send(to_json(final)))
        if self.request.single:
            return actions + [Close(CLOSE_NORMAL, "stream finished")]
        return actions + self._advance()

    # -- call → client ---------------------------------------------------------------------------

    def translate(self, item) -> list:
        ctx = self.active
        if isinstance(item, AudioFrame):
            self.utterance_frames += 1
            if ctx is None:
                return []
            audio = ctx.encoder.encode(item.pcm)
            alignment = self._alignment(ctx, ctx.words, FRAME_MS)
            ctx.words = []
            ctx.audio_frames += 1
            return [Send(self._audio(ctx, audio, alignment))]
        if isinstance(item, p.Started):
            self.utterance_frames = 0
        elif isinstance(item, p.Word):
            owner = self.by_serial.get(item.id)
            if owner is not None and owner is ctx:
                ctx.words.append(item.word)
        elif isinstance(item, p.Done):
            owner = self.by_serial.get(item.id)
            if owner is not None:
                owner.open_utterance = False
            return self._advance()
        elif isinstance(item, p.Paused) and item.id == self.barrier and self.barrier is not None:
            self.barrier = None
            return self._advance()
        elif isinstance(item, p.ErrorEvent):
            return self._call_error(item)
        return []

    def _call_error(self, event: p.ErrorEvent) -> list:
        if self.barrier is not None and event.id == self.barrier:
            # the rollback was refused (out of range): stop by reset instead; the next text starts afresh
            self.barrier = None
            self.call_started = False
            return [Submit(p.Reset(format="pcm_24000"))] + self._advance()
        owner = self.by_serial.get(event.id) if isinstance(event.id, int) else None
        return [Send(self._error(event.code, event.message, owner.id if owner is not None else None))]

    # -- message shapes --------------------------------------------------------------------------

    def _alignment(self, ctx: Context, words: list[str], span_ms: float) -> dict | None:
        """Chars of `words` spread over this message's span (see the module docstring)."""
        base = 0 if not self.request.sync_alignment else round(ctx.audio_frames * FRAME_MS)
        chars, starts, durations = [], [], []
        if not self.request.sync_alignment and not ctx.words_sent:
            if not words:  # pipecat strips a context's leading spaces, and their time with them
                ctx.unaligned_ms += round(span_ms)
                return None
            base, ctx.unaligned_ms = ctx.unaligned_ms, 0
        ctx.words_sent += len(words)
        if not words:
            if span_ms and not self.request.sync_alignment:
                chars, starts, durations = [" "], [base], [round(span_ms)]
        else:
            span = round(span_ms)
            for i, word in enumerate(words):
                lo, hi = span * i // len(words), span * (i + 1) // len(words)
                letters = list(word) + [" "]
                for j, letter in enumerate(letters):
                    a, b = lo + (hi - lo) * j // len(letters), lo + (hi - lo) * (j + 1) // len(letters)
                    chars.append(letter)
                    starts.append(base + a)
                    durations.append(b - a)
        return {"chars": chars, "charStartTimesMs": starts, "charDurationsMs": durations}

    def _audio(self, ctx: Context, audio: bytes, alignment: dict | None) -> str:
        msg = {"audio": base64.b64encode(audio).decode("ascii"), "isFinal": False,
               "normalizedAlignment": alignment, "alignment": alignment}
        if not self.request.single:
            msg["contextId"] = ctx.id
        return to_json(msg)

    def _error(self, code: str, message: str, context_id: str | None = None) -> str:
        msg = {"message": message, "error": code, "code": CLOSE_POLICY}
        if context_id is not None and self.request is not None and not self.request.single:
            msg["contextId"] = context_id
        return to_json(msg)

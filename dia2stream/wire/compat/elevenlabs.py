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
A context opens with its first text (the init `{"text": " "}` included); a flush, a close or an
empty keep-alive for a context that is not open opens nothing. A context that was given no text
does not hold up the others, and one that holds the floor but has had no message and sent no
audio for `inactivity_timeout` seconds is finished (`isFinal`) once another context waits to
speak, as the hosted service times out idle contexts (`contexts.py`).

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
from dataclasses import dataclass

from dia2stream.wire.compat.audio import StreamFormat, parse_elevenlabs_format
from dia2stream.wire.compat.base import (CLOSE_NORMAL, CLOSE_POLICY, MAX_CONTEXT_ID_CHARS, Close, IgnoredFields, Send,
                                         parse_known, refused_context_id, to_json)
from dia2stream.wire.compat.contexts import FRAME_MS, Context, ContextAdapter


MAX_CONTEXTS = 5  # open contexts per connection, as the hosted service allows
DEFAULT_INACTIVITY_S = 20.0
MAX_INACTIVITY_S = 180.0
DEFAULT_VOICE_ID = "default"
DEFAULT_FORMAT = "mp3_44100_128"  # the hosted service's default output_format
# Fields ElevenLabs defines on a message that we accept and do not act on.
KNOWN_FIELDS = {"text", "context_id", "flush", "close_context", "close_socket", "voice_settings",
                "generation_config", "try_trigger_generation", "xi_api_key", "authorization",
                "pronunciation_dictionary_locators", "model_id", "language_code", "voice_id"}


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


class ElevenLabsAdapter(ContextAdapter):
    api = "elevenlabs"
    max_contexts = MAX_CONTEXTS

    def __init__(self, voice_id: str, query: dict[str, str], voices: list[str], single: bool = False):
        self._refusal: tuple[str, str] | None = None
        try:
            self.request = parse_request(voice_id, query, voices, single)
        except ValueError as exc:
            self._refusal = exc.args
            self.request = ElevenLabsRequest(None, parse_elevenlabs_format("pcm_24000"), False,
                                             DEFAULT_INACTIVITY_S, single)
        super().__init__(self.request.voice, self.request.output)
        self.idle_timeout_s = self.request.inactivity_s
        self.context_idle_s = self.request.inactivity_s  # the hosted service's per-context timeout too
        self.ignored = IgnoredFields(self.api)
        self.ignored.note(k for k in query if k not in ("output_format", "inactivity_timeout", "sync_alignment"))
        self.single_done = False

    def opening(self) -> list:
        if self._refusal is not None:
            code, message = self._refusal
            return [Send(self.error(code, message)), Close(CLOSE_POLICY, code)]
        return []

    # -- client → call ---------------------------------------------------------------------------

    def receive(self, message) -> list:
        try:
            msg = parse_known(message, KNOWN_FIELDS, self.ignored)
        except ValueError as exc:
            return [Send(self.error("invalid_message", str(exc), refused_context_id(exc)))]
        text = msg.get("text")
        if text is not None and not isinstance(text, str):
            return [Send(self.error("invalid_message", "text must be a string"))]
        for key in ("flush", "close_context", "close_socket", "try_trigger_generation"):
            if key in msg and not isinstance(msg[key], bool):
                return [Send(self.error("invalid_message", f"{key} must be true or false"))]
        if self.request.single:
            return self._receive_single(msg, text)
        if msg.get("close_socket"):
            actions = []
            for ctx in list(self.contexts.values()):
                actions += self.cancel_context(ctx)
            return actions + [Close(CLOSE_NORMAL, "close_socket")]
        cid = msg.get("context_id")
        if cid is None:
            if text:
                return [Send(self.error("invalid_message", "context_id is required with text on multi-stream-input"))]
            return []  # keep-alive
        if not isinstance(cid, str) or not cid or len(cid) > MAX_CONTEXT_ID_CHARS:
            return [Send(self.error("invalid_message", "context_id must be a non-empty string of at most "
                                    f"{MAX_CONTEXT_ID_CHARS} characters"))]
        ctx = self.contexts.get(cid)
        if msg.get("close_context"):
            if ctx is None:
                return []  # already finished (isFinal sent) or never opened: nothing left to stop
            if ctx.flushed and not ctx.closing:
                return self.finish_context(ctx)
            return self.cancel_context(ctx)  # no flush before it, or a second close: barge-in
        if ctx is None:
            if not text:
                # a keep-alive or a flush for a context that is gone (after isFinal) or was never
                # opened: opening one here would hold the floor with nothing to say
                return []
            ctx = self.open_context(cid)
            if ctx is None:
                return [Send(self.error("max_active_conversations", f"at most {MAX_CONTEXTS} contexts may be open "
                                        "on one connection; close one first", cid))]
        actions = self.add_text(ctx, text or "")
        if msg.get("flush"):
            actions += self.flush(ctx)
        return actions + self.advance()

    def _receive_single(self, msg: dict, text: str | None) -> list:
        ctx = self.contexts.get("") or (None if self.single_done else self.open_context(""))
        if ctx is None:
            return [Send(self.error("invalid_message", "the stream has ended"))]
        if text == "" and not msg.get("flush"):  # end of input
            self.single_done = True
            return self.finish_context(ctx)
        actions = self.add_text(ctx, text or "")
        if msg.get("flush"):
            actions += self.flush(ctx)
        return actions + self.advance()

    # -- call → client ---------------------------------------------------------------------------

    def audio_messages(self, ctx: Context, audio: bytes, words: list[str]) -> list:
        return [Send(self._audio(ctx, audio, self._alignment(ctx, words, FRAME_MS)))]

    def final_messages(self, ctx: Context, tail: bytes, words: list[str]) -> list:
        actions = []
        if tail or words:
            actions.append(Send(self._audio(ctx, tail, self._alignment(ctx, words, 0))))
        final = {"isFinal": True}
        if not self.request.single:
            final["contextId"] = ctx.id
        actions.append(Send(to_json(final)))
        if self.request.single:
            actions.append(Close(CLOSE_NORMAL, "stream finished"))
        return actions

    def _alignment(self, ctx: Context, words: list[str], span_ms: float) -> dict | None:
        """Chars of `words` spread over this message's span (see the module docstring)."""
        base = 0 if not self.request.sync_alignment else round(ctx.audio_frames * FRAME_MS)
        chars, starts, durations = [], [], []
        if not self.request.sync_alignment and not ctx.words_sent:
            if not words:  # pipecat strips a context's leading spaces, and their time with them
                ctx.unaligned_ms += round(span_ms)
                return None
            base, ctx.unaligned_ms = ctx.unaligned_ms, 0
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

    def error(self, code: str, message: str, context_id: str | None = None) -> str:
        msg = {"message": message, "error": code, "code": CLOSE_POLICY}
        if context_id is not None and not self.request.single:
            msg["contextId"] = context_id
        return to_json(msg)

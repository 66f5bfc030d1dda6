"""Deepgram Aura's websocket TTS (`GET /v1/speak?model=..&encoding=..&sample_rate=..`) on a
native call.

Client messages: `{"type": "Speak", "text"}`, `{"type": "Flush"}` (answered `Flushed` with a
`sequence_id` once the audio of the text before it is out), `{"type": "Clear"}` (barge-in:
the speaking stops within a frame, the text not spoken is dropped; answered `Cleared`),
`{"type": "Close"}` (finish speaking, then the server closes). Audio goes out as binary
messages with no header, one per 80 ms frame; `Metadata` is the first message.

Deepgram's stream has no contexts: it is one context that a `Clear` ends and the next `Speak`
opens again (`contexts.py`).
"""

from __future__ import annotations

import uuid

from dia2stream.clock import SAMPLE_RATE
from dia2stream.wire.compat.audio import ALAW, PCM_S16LE, ULAW, StreamEncoder, StreamFormat
from dia2stream.wire.compat.base import CLOSE_NORMAL, CLOSE_POLICY, Close, IgnoredFields, Send, parse_object, to_json
from dia2stream.wire.compat.contexts import Context, ContextAdapter

ENCODINGS = {"linear16": (PCM_S16LE, (8_000, 16_000, 24_000, 32_000, 48_000)),
             "mulaw": (ULAW, (8_000, 16_000)), "alaw": (ALAW, (8_000, 16_000))}
DEFAULT_MODEL = "aura-2-thalia-en"


def parse_query(query: dict[str, str]) -> StreamFormat:
    """`encoding` and `sample_rate`; ValueError naming what is supported."""
    name = query.get("encoding", "linear16")
    if name not in ENCODINGS:
        raise ValueError(f"encoding {name!r} is not supported on the websocket; use {', '.join(ENCODINGS)}")
    codec, rates = ENCODINGS[name]
    raw = query.get("sample_rate", "24000")
    if not raw.isdigit() or int(raw) not in rates:
        raise ValueError(f"sample_rate {raw!r} is not supported for {name}; use {', '.join(map(str, rates))}")
    return StreamFormat(codec, int(raw))


class DeepgramAdapter(ContextAdapter):
    api = "deepgram"
    max_contexts = 2  # the one speaking and, after a Clear, the next

    def __init__(self, query: dict[str, str], voices: list[str]):
        self._refusal = None
        try:
            output = parse_query(query)
        except ValueError as exc:
            self._refusal, output = str(exc), StreamFormat(PCM_S16LE, SAMPLE_RATE)
        super().__init__(voice=None, output=output)
        self.model = query.get("model", DEFAULT_MODEL)
        self.ignored = IgnoredFields(self.api)
        self.ignored.note(k for k in query if k not in ("encoding", "sample_rate", "model"))
        self.streams = 0
        self.sequence = 0  # Flush messages answered so far
        self.closing = False

    def opening(self) -> list:
        if self._refusal is not None:
            return [Send(self.error("INVALID_QUERY", self._refusal)), Close(CLOSE_POLICY, "invalid query")]
        return [Send(to_json({"type": "Metadata", "request_id": str(uuid.uuid4()), "model_name": self.model,
                              "model_version": "dia2stream", "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                                                          self.model))}))]

    def receive(self, message) -> list:
        try:
            msg = parse_object(message)
        except ValueError as exc:
            return [Send(self.error("INVALID_MESSAGE", str(exc)))]
        kind = msg.get("type")
        if kind == "Speak":
            text = msg.get("text")
            if not isinstance(text, str):
                return [Send(self.error("INVALID_MESSAGE", "Speak needs a string text"))]
            if self.closing:
                return [Send(self.error("INVALID_MESSAGE", "the stream is closing"))]
            return self.add_text(self._current(), text) + self.advance()
        if kind == "Flush":
            return self.flush(self._current()) + self.advance()
        if kind == "Clear":
            ctx = self._speaking()
            actions = self.cancel_context(ctx) if ctx is not None else []
            return actions + [Send(to_json({"type": "Cleared", "sequence_id": self.sequence}))]
        if kind == "Close":
            self.closing = True
            ctx = self._speaking()
            if ctx is None:
                return [Close(CLOSE_NORMAL, "Close")]
            return self.finish_context(ctx)
        return [Send(self.error("INVALID_MESSAGE", f"unknown message type {kind!r}; expected Speak, Flush, Clear "
                                "or Close"))]

    def _speaking(self) -> Context | None:
        return next(reversed(self.contexts.values()), None)

    def _current(self) -> Context:
        ctx = self._speaking()
        if ctx is None or ctx.closing:
            self.streams += 1
            ctx = self.open_context(str(self.streams))
        return ctx

    # -- call → client -----------------------------------------------------------------------------

    def utterance_done(self, ctx: Context) -> list:
        if not ctx.flushed:
            return []
        tail = ctx.encoder.finish()
        ctx.encoder = StreamEncoder(self.output)
        self.sequence += 1
        actions = [Send(tail)] if tail else []
        return actions + [Send(to_json({"type": "Flushed", "sequence_id": self.sequence}))]

    def audio_messages(self, ctx: Context, audio: bytes, words: list[str]) -> list:
        return [Send(audio)] if audio else []

    def final_messages(self, ctx: Context, tail: bytes, words: list[str]) -> list:
        actions = [Send(tail)] if tail else []
        return actions + ([Close(CLOSE_NORMAL, "Close")] if self.closing else [])

    def error(self, code: str, message: str, context_id: str | None = None) -> str:
        return to_json({"type": "Error", "err_code": code, "err_msg": message, "description": message})

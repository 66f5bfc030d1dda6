"""Cartesia's websocket TTS (`GET /tts/websocket`) on a native call.

Client messages name a context: `{"context_id", "transcript", "continue", "model_id", "voice":
{"mode": "id", "id"}, "output_format": {"container": "raw", "encoding", "sample_rate"},
"add_timestamps", "flush", "max_buffer_delay_ms", "language", ...}`; `{"context_id", "cancel":
true}` cancels. A context's first message sets its voice and format. `continue: false` ends its
input (finish: `done` after its audio); `cancel` is a barge-in (`contexts.py`).

Server messages: `chunk` (base64 audio), `timestamps` (words with start/end in seconds from the
context's first audio; each word is given an equal share of the frame it starts in), `flush_done`,
`done`, `error`. LiveKit reads the `done` boolean, pipecat the `type`.

Every message carries a `context_id`, errors included: pipecat reads `msg["context_id"]` from
every message before anything else (a message without one raises in its receive loop, and it
drops the connection), LiveKit skips messages naming a context other than its own. An error
names the context of the message it refuses, else the context that has the floor, else "" (which
both plugins skip as no context of theirs; the hosted API sends `context_id` on errors "when
available").

A context that holds the floor with no input and no audio for `CONTEXT_IDLE_S` while another
waits to speak is finished (`done`): the hosted service expires a context a second after its
last audio (`contexts.py`).
"""

from __future__ import annotations

import base64

from dia2stream.wire.compat.audio import ALAW, PCM_F32LE, PCM_RATES, PCM_S16LE, ULAW, StreamFormat
from dia2stream.clock import SAMPLE_RATE
from dia2stream.wire.compat.base import (MAX_CONTEXT_ID_CHARS, IgnoredFields, Send, parse_known, refused_context_id,
                                         to_json)
from dia2stream.wire.compat.contexts import FRAME_MS, Context, ContextAdapter

ENCODINGS = {"pcm_s16le": PCM_S16LE, "pcm_f32le": PCM_F32LE, "pcm_mulaw": ULAW, "pcm_alaw": ALAW}
DEFAULT_VOICE_ID = "default"
CONTEXT_IDLE_S = 1.0  # the hosted service expires a context this long after its last audio
KNOWN_FIELDS = {"context_id", "transcript", "continue", "model_id", "voice", "output_format", "add_timestamps",
                "add_phoneme_timestamps", "use_normalized_timestamps", "flush", "cancel", "max_buffer_delay_ms",
                "language", "generation_config", "pronunciation_dict_id", "duration", "speed",
                "__experimental_controls"}


def parse_output(value) -> StreamFormat:
    """`output_format` of a context's first message; ValueError naming what is supported."""
    if not isinstance(value, dict):
        raise ValueError("output_format must be an object with container, encoding and sample_rate")
    if value.get("container", "raw") != "raw":
        raise ValueError(f"output_format.container {value.get('container')!r} is not supported; use raw")
    encoding = ENCODINGS.get(value.get("encoding"))
    if encoding is None:
        raise ValueError(f"output_format.encoding {value.get('encoding')!r} is not supported; use one of "
                         f"{', '.join(ENCODINGS)}")
    rate = value.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate not in PCM_RATES:
        raise ValueError(f"output_format.sample_rate {rate!r} is not supported; use one of "
                         f"{', '.join(map(str, PCM_RATES))}")
    return StreamFormat(encoding, rate)


class CartesiaAdapter(ContextAdapter):
    api = "cartesia"
    max_contexts = 5
    context_idle_s = CONTEXT_IDLE_S

    def __init__(self, query: dict[str, str], voices: list[str]):
        super().__init__(voice=None, output=StreamFormat(PCM_S16LE, SAMPLE_RATE))
        self.voices = voices
        self.voice_chosen = False
        self.ignored = IgnoredFields(self.api)
        self.ignored.note(k for k in query if k not in ("api_key", "cartesia_version"))

    def receive(self, message) -> list:
        try:
            msg = parse_known(message, KNOWN_FIELDS, self.ignored)
        except ValueError as exc:
            return [Send(self.error("invalid_message", str(exc), refused_context_id(exc)))]
        cid = msg.get("context_id")
        if not isinstance(cid, str) or not cid or len(cid) > MAX_CONTEXT_ID_CHARS:
            return [Send(self.error("invalid_message", "context_id must be a non-empty string of at most "
                                    f"{MAX_CONTEXT_ID_CHARS} characters"))]
        ctx = self.contexts.get(cid)
        if msg.get("cancel") is True:
            return self.cancel_context(ctx) if ctx is not None else []
        transcript = msg.get("transcript", "")
        if not isinstance(transcript, str):
            return [Send(self.error("invalid_message", "transcript must be a string", cid))]
        for key in ("continue", "flush", "add_timestamps"):
            if key in msg and not isinstance(msg[key], bool):
                return [Send(self.error("invalid_message", f"{key} must be true or false", cid))]
        if ctx is None:
            try:
                ctx = self._open(cid, msg)
            except ValueError as exc:
                return [Send(self.error("invalid_request", str(exc), cid))]
            if ctx is None:
                return [Send(self.error("too_many_contexts", f"at most {self.max_contexts} contexts may be open "
                                        "on one connection", cid))]
        actions = self.add_text(ctx, transcript)
        if msg.get("flush"):
            ctx.extra["flushes"] = ctx.extra.get("flushes", 0) + 1
            actions += self.flush(ctx)
            actions.append(Send(to_json({"type": "flush_done", "context_id": cid, "flush_id": ctx.extra["flushes"],
                                         "flush_done": True, "done": False, "status_code": 206})))
        if msg.get("continue", False) is False:
            actions += self.finish_context(ctx)
        return actions + self.advance()

    def _open(self, cid: str, msg: dict) -> Context | None:
        voice = msg.get("voice")
        if not isinstance(voice, dict) or voice.get("mode", "id") != "id" or not isinstance(voice.get("id"), str):
            raise ValueError("voice must be {\"mode\": \"id\", \"id\": \"<voice id>\"} (embeddings are not supported)")
        name = voice["id"]
        if name != DEFAULT_VOICE_ID and name not in self.voices:
            raise ValueError(f"voice {name!r} not found (prepared: {', '.join(sorted(self.voices)) or 'none'}; "
                             "'default' is the server's default voice)")
        output = parse_output(msg.get("output_format", {"container": "raw", "encoding": "pcm_s16le",
                                                        "sample_rate": SAMPLE_RATE}))
        if not self.voice_chosen:  # the call has one voice: the first context's
            self.voice, self.voice_chosen = (None if name == DEFAULT_VOICE_ID else name), True
        ctx = self.open_context(cid, output)
        if ctx is not None:
            ctx.extra["timestamps"] = msg.get("add_timestamps", False) is True
        return ctx

    # -- call → client -----------------------------------------------------------------------------

    def audio_messages(self, ctx: Context, audio: bytes, words: list[str]) -> list:
        actions = []
        if audio:
            actions.append(Send(to_json({"type": "chunk", "data": base64.b64encode(audio).decode("ascii"),
                                         "done": False, "status_code": 206, "step_time": FRAME_MS,
                                         "context_id": ctx.id})))
        if words and ctx.extra.get("timestamps"):
            start = ctx.audio_frames * FRAME_MS / 1000
            share = FRAME_MS / 1000 / len(words)
            actions.append(Send(to_json({
                "type": "timestamps", "context_id": ctx.id, "status_code": 206, "done": False,
                "word_timestamps": {"words": words,
                                    "start": [round(start + i * share, 3) for i in range(len(words))],
                                    "end": [round(start + (i + 1) * share, 3) for i in range(len(words))]}})))
        return actions

    def final_messages(self, ctx: Context, tail: bytes, words: list[str]) -> list:
        actions = self.audio_messages(ctx, tail, words) if tail or words else []
        return actions + [Send(to_json({"type": "done", "done": True, "status_code": 200, "context_id": ctx.id}))]

    def error(self, code: str, message: str, context_id: str | None = None) -> str:
        if context_id is None:  # a connection-level error (busy, bad JSON, shutting down, ...)
            context_id = self.active.id if self.active is not None else ""
        return to_json({"type": "error", "context_id": context_id, "done": True, "status_code": 400,
                        "error": message, "title": code})


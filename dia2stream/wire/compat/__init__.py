"""Hosted TTS APIs spoken on our port: which request path is which API's websocket.

`adapter_for(path, voices)` gives the adapter for a websocket request path (and its query), or
None for the native protocol. docs/compat.md says what each API supports."""

from __future__ import annotations

import re
from typing import Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from dia2stream.wire.compat.base import Adapter

Factory = Callable[[re.Match, dict[str, str], list[str]], Adapter]


def _elevenlabs(single: bool) -> Factory:
    def make(match, query, voices):
        from dia2stream.wire.compat.elevenlabs import ElevenLabsAdapter
        return ElevenLabsAdapter(unquote(match["voice"]), query, voices, single=single)
    return make


def _cartesia(match, query, voices):
    from dia2stream.wire.compat.cartesia import CartesiaAdapter
    return CartesiaAdapter(query, voices)


def _deepgram(match, query, voices):
    from dia2stream.wire.compat.deepgram import DeepgramAdapter
    return DeepgramAdapter(query, voices)


ROUTES: list[tuple[re.Pattern, Factory]] = [
    (re.compile(r"/v1/text-to-speech/(?P<voice>[^/]+)/multi-stream-input"), _elevenlabs(single=False)),
    (re.compile(r"/v1/text-to-speech/(?P<voice>[^/]+)/stream-input"), _elevenlabs(single=True)),
    (re.compile(r"/tts/websocket"), _cartesia),
    (re.compile(r"/v1/speak"), _deepgram),
]


def adapter_for(path: str, voices: list[str]) -> Adapter | None:
    parts = urlsplit(path)
    for pattern, make in ROUTES:
        match = pattern.fullmatch(parts.path.rstrip("/") or "/")
        if match is not None:
            return make(match, dict(parse_qsl(parts.query, keep_blank_values=True)), voices)
    return None

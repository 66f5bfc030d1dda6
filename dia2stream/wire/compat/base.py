"""What every compatible-API adapter is: a translator between one hosted TTS API's websocket
messages and one native call, with no sockets and no engine.

The server's compat session (`serve/compat_session.py`) owns the socket and the call. It hands
each client message to `Adapter.receive` and each item the call emits (native events, and
`AudioFrame`s not silenced by a barge-in) to `Adapter.translate`; both answer with a list of
actions, carried out in order:

- `Submit(command)`: a native command for the call (`Start`, `Inject`, `Flush`, `Pause`, `Reset`).
- `Send(payload)`: a message for the client. From `receive` it is queued behind everything the
  call has already emitted, so an answer never overtakes the audio before it.
- `Later(fn)`: run `fn()` in the same place in that order, on the sending side; it returns
  more actions (how an adapter finishes a stream after the audio queued before it).
- `Close(code, reason)`: close the connection once what precedes it is sent.

An adapter keeps its own state (contexts, alignment clocks, encoders) in plain attributes. An
adapter with timed rules (a context left idle) sets `tick_s`; the session then calls `tick()`
that often, and carries out its actions as it does `receive`'s.
"""

from __future__ import annotations

import abc
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Union

from dia2stream.wire import protocol as p

MAX_CONTEXT_ID_CHARS = 256  # the longest context id a client may name (ElevenLabs, Cartesia)

log = logging.getLogger("dia2stream.compat")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # what the hosted APIs close with after a fatal error in a request
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True)
class Submit:
    command: object


@dataclass(frozen=True)
class Send:
    payload: str | bytes


@dataclass(frozen=True)
class Later:
    run: Callable[[], list]


@dataclass(frozen=True)
class Close:
    code: int = CLOSE_NORMAL
    reason: str = ""


Action = Union[Submit, Send, Later, Close]


class Adapter(abc.ABC):
    """The interface the compat session drives (see the module docstring)."""

    api = "?"  # for logs and metrics
    idle_timeout_s: float | None = None  # the API's own inactivity rule; None: the server's
    tick_s: float | None = None  # how often the session calls `tick`; None: never

    def opening(self) -> list[Action]:
        """Actions right after the upgrade (a refusal of the request's parameters, a greeting)."""
        return []

    @abc.abstractmethod
    def receive(self, message: str | bytes) -> list[Action]:
        """What one client message asks for."""

    @abc.abstractmethod
    def translate(self, item: object) -> list[Action]:
        """What one of the call's events or frames becomes on this API's wire."""

    def tick(self) -> list[Action]:
        """What is due by now (see `tick_s`)."""
        return []

    @abc.abstractmethod
    def refuse(self, code: str, message: str) -> str:
        """A connection-level refusal (`busy`, `idle_timeout`, `message_too_large`, ...) in the
        API's error shape."""


class UnencodableField(ValueError):
    """A message whose JSON parsed but holds a string UTF-8 cannot encode; `message` is the parsed
    object, so an adapter can still name the context the refusal belongs to."""

    def __init__(self, field: str, message: dict[str, Any]) -> None:
        super().__init__(p.unencodable_message(field))
        self.message = message


def to_json(obj: dict[str, Any]) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if not p.is_encodable(text):  # never expected (messages with such strings are refused), but a
        # websocket send of it would fail and end the sending side, so escape it rather than lose the socket
        text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    return text


def parse_object(message: str | bytes) -> dict[str, Any]:
    """A JSON object from a text message; ValueError with a readable reason otherwise.

    JSON lets a client write a lone surrogate ("\\ud800"), which Python's parser accepts and every
    later step that encodes the string (the model's tokenizer, a websocket send) fails on; such a
    message is refused here, as the native protocol refuses it, so no adapter can pass one on."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        raise ValueError("binary messages are not accepted; send JSON text")
    try:
        obj = json.loads(message)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    field = unencodable_field(obj)
    if field is not None:
        raise UnencodableField(field, obj)
    return obj


def unencodable_field(obj: Any) -> str | None:
    """The first field of a parsed JSON value (a path such as `voice.id` or `words[2]`) whose key
    or string UTF-8 cannot encode, by the native protocol's check (`protocol.is_encodable`); None
    when every string encodes. Walked with a stack: a deeply nested message must not recurse."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not p.is_encodable(value):
                return p.printable(path or "the message", limit=MAX_CONTEXT_ID_CHARS)
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                name = f"{path}.{key}" if path else str(key)
                if not p.is_encodable(key):
                    return f"the key of {p.printable(name, limit=MAX_CONTEXT_ID_CHARS)}"
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def refused_context_id(exc: ValueError) -> str | None:
    """The context id of a message refused by `parse_object`, when it had a usable one."""
    message = exc.message if isinstance(exc, UnencodableField) else {}
    cid = message.get("context_id")
    if isinstance(cid, str) and cid and len(cid) <= MAX_CONTEXT_ID_CHARS and p.is_encodable(cid):
        return cid
    return None


def parse_known(message: str | bytes, known: frozenset | set, ignored: "IgnoredFields") -> dict[str, Any]:
    """`parse_object`, noting (once, in the log) the fields this API has that we ignore."""
    obj = parse_object(message)
    unknown = set(obj) - known
    if unknown:
        ignored.note(sorted(unknown))
    return obj


class IgnoredFields:
    """Logs, once per adapter and field, the fields an API defines that we accept and ignore."""

    def __init__(self, api: str) -> None:
        self.api, self._seen = api, set()

    def note(self, keys) -> None:
        for key in keys:
            if key not in self._seen:
                self._seen.add(key)
                log.info("%s: accepting and ignoring %r", self.api, key)

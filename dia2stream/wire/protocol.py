"""dia2stream wire protocol: typed commands and events, parsing and validation, audio frames.

Everything a client can send is parsed and validated here, and nowhere else: `parse_command`
turns one websocket message into a frozen command dataclass or raises `ProtocolError` with a
stable code. Events are frozen dataclasses with `to_json()`. Binary audio frames are
`<u32 LE sample count><int16 LE PCM>`. No I/O, no model knowledge: `docs/protocol.md` is the
reference for what the server does with each command.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Union

import numpy as np

from dia2stream.clock import FRAME_RATE, FRAME_SAMPLES, MAX_TOP_K, SAMPLE_RATE
from dia2stream.wire.formats import FORMAT_NAMES, FORMATS

# ---------------------------------------------------------------------------------------------
# Constants and limits
# ---------------------------------------------------------------------------------------------

PROTOCOL_VERSION = 1


MAX_TEXT_CHARS = 4_096  # `text` of start/inject, and voice transcripts
MAX_ID_CHARS = 128  # string client ids
MAX_ID_INT = 2**63 - 1  # integer client ids lie in [-MAX_ID_INT, MAX_ID_INT]
MAX_AUDIO_B64_CHARS = 16 * 1024 * 1024  # base64 `audio` / `speaker2_audio` (~12 MiB of file)
MAX_PATH_CHARS = 4_096
# A set_voice message may carry two base64 audios; everything else is far smaller.
# The server must pass at least this as websockets' `max_size`.
MAX_MESSAGE_BYTES = 2 * MAX_AUDIO_B64_CHARS + 64 * 1024

# `user_turn` audio: the telephony formats the server sends (headerless samples), or a file
# (WAV/FLAC, header checked before decoding as a voice's is).
USER_TURN_FILE_FORMATS = ("wav", "flac")
USER_TURN_FORMATS: tuple[str, ...] = (*FORMAT_NAMES, *USER_TURN_FILE_FORMATS)
MAX_USER_TURN_WORDS = 2_000  # entries of `words` (a 30 s turn has well under 200)

VOICE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# Sampling ranges (inclusive). temperature 0 means greedy (argmax). TOP_K_RANGE's upper end is
# the runtime's candidate table (MAX_TOP_K).
TEMPERATURE_RANGE = (0.0, 5.0)
TOP_K_RANGE = (1, MAX_TOP_K)
CFG_SCALE_RANGE = (0.5, 20.0)
SEED_RANGE = (0, 2**63 - 1)

# The numeric fields of `start` and their inclusive ranges: the parser builds its checks from this
# table, and docs/protocol.md's *Ranges* table is tested against it, so they cannot disagree.
FIELD_RANGES: dict[str, tuple[float, float]] = {
    "seed": SEED_RANGE,
    "temperature": TEMPERATURE_RANGE,
    "text_temperature": TEMPERATURE_RANGE,
    "audio_temperature": TEMPERATURE_RANGE,
    "top_k": TOP_K_RANGE,
    "text_top_k": TOP_K_RANGE,
    "audio_top_k": TOP_K_RANGE,
    "cfg_scale": CFG_SCALE_RANGE,
}

MAX_PLAYED_MS = 24 * 3600 * 1000.0  # a day: anything above is not a duration a call can have played

_FRAME_HEADER = struct.Struct("<I")

# Code points a str can hold but UTF-8 cannot encode: lone UTF-16 surrogates, which JSON lets a
# client write as "\ud800". Python's json.loads accepts them; every later step that encodes the
# string (the tokenizer, a websocket send, a file name) fails on them.
_UNENCODABLE = re.compile("[\ud800-\udfff]")


def is_encodable(text: str) -> bool:
    """True if `text` can be encoded as UTF-8 (holds no lone surrogate)."""
    return _UNENCODABLE.search(text) is None


def printable(text: str, limit: int = 64) -> str:
    """`text` cut to `limit` characters with unencodable code points replaced by U+FFFD, for
    echoing a client's string back in an error message or a log line."""
    return _UNENCODABLE.sub("\ufffd", text[:limit])


class ErrorCode(enum.StrEnum):
    """Stable error codes carried by `error` events. Members compare equal to their strings."""

    # Raised by parse_command (the message itself is wrong).
    INVALID_JSON = "invalid_json"  # text frame is not valid JSON
    INVALID_MESSAGE = "invalid_message"  # not a JSON object, or `cmd` missing / not a string
    BINARY_NOT_SUPPORTED = "binary_not_supported"  # client sent a binary frame
    UNKNOWN_COMMAND = "unknown_command"  # `cmd` names no command
    INVALID_FIELD = "invalid_field"  # missing/unknown field, wrong type, out of range
    EMPTY_TEXT = "empty_text"  # text empty or only whitespace
    TEXT_TOO_LONG = "text_too_long"  # text longer than MAX_TEXT_CHARS
    MESSAGE_TOO_LARGE = "message_too_large"  # message longer than MAX_MESSAGE_BYTES
    # Raised by the server (the command is well formed but cannot run now / here).
    NOT_STARTED = "not_started"  # inject/flush/resume with no utterance since connect/reset
    NOT_PAUSED = "not_paused"  # resume while not paused
    BUSY = "busy"  # another client holds the session, or start while generating
    CONTEXT_FULL = "context_full"  # the context limit was reached; the session was reset
    UNKNOWN_VOICE = "unknown_voice"  # start/reset names a voice that was never prepared
    BAD_AUDIO = "bad_audio"  # voice or caller audio unreadable, corrupt, silent, empty or too long
    PATH_NOT_ALLOWED = "path_not_allowed"  # set_voice path outside the operator's folder
    TRANSCRIPT_REQUIRED = "transcript_required"  # no transcript and no whisper available
    VOICE_ERROR = "voice_error"  # voice preparation failed for another reason
    INTERNAL_ERROR = "internal_error"  # a server bug; the session was reset
    # Raised by the server's limits (dia2stream.serve.limits); the connection keeps working.
    RATE_LIMITED = "rate_limited"  # more commands per second than the connection may send
    PENDING_TEXT_FULL = "pending_text_full"  # too much text queued but not yet spoken on this call
    TOO_MANY_VOICES = "too_many_voices"  # the connection already made its share of voices
    IDLE_TIMEOUT = "idle_timeout"  # no command for too long; the connection is closed after it
    SHUTTING_DOWN = "shutting_down"  # the server is stopping; the connection is closed after it
    DRAINING = "draining"  # the server is draining for a restart: no new turn here; reconnect
    POLICY_VIOLATION = "policy_violation"  # flood, or repeated binary/oversize messages: closed (1008) after it


class ProtocolError(Exception):
    """A client-caused error with a stable `code`; becomes an `error` event."""

    def __init__(
        self,
        code: str,
        message: str,
        cmd: str | None = None,
        id: str | int | None = None,  # noqa: A002 - the wire name
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message
        self.cmd = cmd
        self.id = id

    def to_event(self) -> ErrorEvent:
        return ErrorEvent(code=self.code, message=self.message, cmd=self.cmd, id=self.id)


ClientId = Union[str, int]


@dataclass(frozen=True)
class TimedWordField:
    """One entry of `user_turn.words`: a word and where the caller said it, seconds from the
    audio's start."""

    word: str
    start_s: float
    end_s: float

# ---------------------------------------------------------------------------------------------
# Commands (client -> server)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin an utterance from the session's voice (or clean) state."""

    cmd: ClassVar[str] = "start"
    text: str
    final: bool = True
    id: ClientId | None = None
    voice: str | None = None
    seed: int | None = None
    temperature: float | None = None  # sets both text and audio temperature
    top_k: int | None = None  # sets both text and audio top-k
    text_temperature: float | None = None  # overrides `temperature` for the text stream
    audio_temperature: float | None = None  # overrides `temperature` for the audio codebooks
    text_top_k: int | None = None
    audio_top_k: int | None = None
    cfg_scale: float | None = None
    format: str | None = None  # audio format of the frames from now on (formats.FORMATS)


@dataclass(frozen=True)
class Inject:
    """Append text to the utterance being spoken, or continue warm after `done`."""

    cmd: ClassVar[str] = "inject"
    text: str
    final: bool = True
    id: ClientId | None = None


@dataclass(frozen=True)
class Flush:
    """End the current turn's text (same as a later fragment with final=true)."""

    cmd: ClassVar[str] = "flush"
    id: ClientId | None = None


@dataclass(frozen=True)
class Pause:
    cmd: ClassVar[str] = "pause"
    id: ClientId | None = None
    # Audio of this utterance that reached the caller (barge-in): the call rolls back to it.
    played_ms: float | None = None


@dataclass(frozen=True)
class Resume:
    cmd: ClassVar[str] = "resume"
    id: ClientId | None = None


@dataclass(frozen=True)
class Reset:
    """Back to the voice (or clean) state; `voice` switches to another prepared voice."""

    cmd: ClassVar[str] = "reset"
    voice: str | None = None
    id: ClientId | None = None
    format: str | None = None  # audio format of the frames from now on (formats.FORMATS)


@dataclass(frozen=True)
class SetVoice:
    """Prepare a named voice from speaker-1 audio (base64 `audio` xor server-side `path`)."""

    cmd: ClassVar[str] = "set_voice"
    name: str
    audio_b64: str | None = None  # JSON field `audio`
    path: str | None = None
    transcript: str | None = None
    speaker2_audio_b64: str | None = None  # JSON field `speaker2_audio`
    speaker2_path: str | None = None
    speaker2_transcript: str | None = None
    id: ClientId | None = None

    def audio_bytes(self) -> bytes | None:
        """The decoded speaker-1 audio file, or None when `path` was given."""
        return None if self.audio_b64 is None else base64.b64decode(self.audio_b64)

    def speaker2_audio_bytes(self) -> bytes | None:
        return None if self.speaker2_audio_b64 is None else base64.b64decode(self.speaker2_audio_b64)


@dataclass(frozen=True)
class UserTurn:
    """The caller's speech between agent turns: it enters the call's context as speaker 2."""

    cmd: ClassVar[str] = "user_turn"
    audio_b64: str  # JSON field `audio`
    format: str  # USER_TURN_FORMATS
    transcript: str
    words: tuple[TimedWordField, ...] | None = None  # the STT's word times, when it gave them
    id: ClientId | None = None

    def audio_bytes(self) -> bytes:
        return base64.b64decode(self.audio_b64)


@dataclass(frozen=True)
class ListVoices:
    cmd: ClassVar[str] = "voices"
    id: ClientId | None = None


@dataclass(frozen=True)
class Ping:
    cmd: ClassVar[str] = "ping"
    id: ClientId | None = None


Command = Union[Start, Inject, Flush, Pause, Resume, Reset, SetVoice, UserTurn, ListVoices, Ping]

# JSON field name -> dataclass attribute, where they differ.
_JSON_TO_ATTR = {"audio": "audio_b64", "speaker2_audio": "speaker2_audio_b64"}
_ATTR_TO_JSON = {v: k for k, v in _JSON_TO_ATTR.items()}


def command_to_json(command: Command) -> str:
    """Serialise a command as a client would send it (None fields omitted)."""
    obj: dict[str, Any] = {"cmd": command.cmd}
    for f in dataclasses.fields(command):
        value = getattr(command, f.name)
        if value is not None:
            if f.name == "words":
                value = [dataclasses.asdict(w) for w in value]
            obj[_ATTR_TO_JSON.get(f.name, f.name)] = value
    return json.dumps(obj, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Events (server -> client)
# ---------------------------------------------------------------------------------------------


class _Event:
    event: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"event": self.event}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                obj[f.name] = value
        return obj

    def to_json(self) -> str:
        """JSON text that always encodes to UTF-8: if any string in the event holds an
        unencodable code point (it should not: the parser refuses them), the event is written
        with ASCII escapes instead of failing later in the websocket send."""
        text = json.dumps(self.to_dict(), ensure_ascii=False)
        if not is_encodable(text):
            text = json.dumps(self.to_dict(), ensure_ascii=True)
        return text


@dataclass(frozen=True, kw_only=True)
class Ready(_Event):
    """First message on every accepted connection."""

    event: ClassVar[str] = "ready"
    protocol: int = PROTOCOL_VERSION
    model: str
    sample_rate: int = SAMPLE_RATE
    frame_samples: int = FRAME_SAMPLES
    frame_rate: float = FRAME_RATE
    device: str
    voices: list[str]  # names of the prepared voices
    max_text_chars: int = MAX_TEXT_CHARS
    max_lead_ms: int
    context_frames: int | None = None  # the context limit in frames (1500 for Dia2)
    formats: list[str] = dataclasses.field(default_factory=lambda: list(FORMAT_NAMES))


@dataclass(frozen=True, kw_only=True)
class Started(_Event):
    """Before the first audio frame of an utterance."""

    event: ClassVar[str] = "started"
    id: ClientId | None = None
    voice: str | None = None
    position: int  # context position (frames) where the utterance begins


@dataclass(frozen=True, kw_only=True)
class Word(_Event):
    event: ClassVar[str] = "word"
    id: ClientId | None = None
    word: str
    start_s: float  # seconds of audio from the utterance's first sent frame
    frame: int  # index of that frame within the utterance (start_s = frame / 12.5)


@dataclass(frozen=True, kw_only=True)
class Done(_Event):
    """After the last audio frame of an utterance."""

    event: ClassVar[str] = "done"
    id: ClientId | None = None
    frames: int
    audio_s: float
    wall_s: float
    ttfa_ms: float | None = None
    onset_ms: float | None = None


@dataclass(frozen=True, kw_only=True)
class Paused(_Event):
    """No audio frame follows this event until `resumed` (or a new `started`)."""

    event: ClassVar[str] = "paused"
    id: ClientId | None = None
    frames_sent: int  # frames of the current utterance sent so far
    position: int  # context position (frames) where generation stopped
    audio_s: float  # frames_sent / 12.5
    # With `played_ms` (barge-in rollback): the words the caller heard, each {"word", "start_s"},
    # and the words generated or queued but not heard, in order.
    spoken: list[dict[str, Any]] | None = None
    unspoken: list[str] | None = None


@dataclass(frozen=True, kw_only=True)
class Resumed(_Event):
    event: ClassVar[str] = "resumed"
    id: ClientId | None = None


@dataclass(frozen=True, kw_only=True)
class ResetDone(_Event):
    event: ClassVar[str] = "reset"
    voice: str | None = None
    id: ClientId | None = None


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(_Event):
    event: ClassVar[str] = "error"
    code: str
    message: str
    cmd: str | None = None
    id: ClientId | None = None


@dataclass(frozen=True, kw_only=True)
class VoiceReady(_Event):
    event: ClassVar[str] = "voice_ready"
    name: str
    prefix_s: float  # seconds of prefix audio (speaker 1 + speaker 2)
    prepare_ms: float
    speakers: int  # distinct speaker prefixes supplied: 1 (speaker 1 reused) or 2
    id: ClientId | None = None


@dataclass(frozen=True, kw_only=True)
class UserTurnDone(_Event):
    """The caller's turn is in the call's context; no audio is sent for it."""

    event: ClassVar[str] = "user_turn_done"
    id: ClientId | None = None
    frames: int  # frames of caller audio appended (12.5 per second)
    position: int  # context position (frames) after it: where the next turn begins
    prefill_ms: float  # the model work: Mimi encode, text warm-up and the prefill


@dataclass(frozen=True, kw_only=True)
class Voices(_Event):
    event: ClassVar[str] = "voices"
    voices: list[dict[str, Any]]  # [{"name", "prefix_s", "speakers"}, ...]
    id: ClientId | None = None


@dataclass(frozen=True, kw_only=True)
class Pong(_Event):
    event: ClassVar[str] = "pong"
    id: ClientId | None = None


Event = Union[
    Ready, Started, Word, Done, Paused, Resumed, ResetDone, ErrorEvent, VoiceReady, UserTurnDone, Voices, Pong
]
EVENT_TYPES: dict[str, type] = {
    cls.event: cls
    for cls in (Ready, Started, Word, Done, Paused, Resumed, ResetDone, ErrorEvent,
                VoiceReady, UserTurnDone, Voices, Pong)
}


def parse_event(message: str | bytes) -> Event:
    """Parse a server event (client side). Unknown fields are ignored; raises ValueError."""
    obj = json.loads(message)
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        raise ValueError("event message must be an object with a string 'event'")
    cls = EVENT_TYPES.get(obj["event"])
    if cls is None:
        raise ValueError(f"unknown event {obj['event']!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in obj.items() if k in names})
    except TypeError as e:
        raise ValueError(f"bad {obj['event']!r} event: {e}") from None


# ---------------------------------------------------------------------------------------------
# Command parsing
# ---------------------------------------------------------------------------------------------


def parse_command(message: str | bytes | bytearray | memoryview) -> Command:
    """Parse one websocket message into a command, or raise ProtocolError."""
    if not isinstance(message, str):
        raise ProtocolError(
            ErrorCode.BINARY_NOT_SUPPORTED, "binary messages are not accepted; send JSON text"
        )
    if _utf8_len_exceeds(message, MAX_MESSAGE_BYTES):
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE, f"message larger than {MAX_MESSAGE_BYTES} bytes"
        )
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")
    client_id = _readable_id(obj.get("id"))
    name = obj.get("cmd")
    if name is None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "missing 'cmd'", id=client_id)
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'cmd' must be a string", id=client_id)
    if not is_encodable(name):
        raise ProtocolError(ErrorCode.INVALID_FIELD, unencodable_message("cmd"), id=client_id)
    spec = _COMMANDS.get(name)
    if spec is None:
        shown = name[:64]
        raise ProtocolError(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {shown!r}; known: {', '.join(sorted(_COMMANDS))}",
            cmd=shown,
            id=client_id,
        )
    cls, fields = spec
    try:
        unknown = sorted(k for k in obj if k != "cmd" and k not in fields)
        if unknown:
            raise _FieldError(
                ErrorCode.INVALID_FIELD,
                f"unknown field(s) {', '.join(repr(k[:64]) for k in unknown)} for {name!r}",
            )
        kwargs: dict[str, Any] = {}
        for key, (required, check) in fields.items():
            value = obj.get(key)
            if value is None:
                if required:
                    raise _FieldError(ErrorCode.INVALID_FIELD, f"missing required field {key!r}")
                continue
            kwargs[_JSON_TO_ATTR.get(key, key)] = check(key, value)
        command = cls(**kwargs)
        if isinstance(command, SetVoice):
            _check_voice_sources(command)
    except _FieldError as e:
        raise ProtocolError(e.code, e.message, cmd=name, id=client_id) from None
    return command


class _FieldError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _utf8_len_exceeds(text: str, limit: int) -> bool:
    if len(text) > limit:
        return True
    if len(text) * 4 <= limit:  # at most 4 bytes per code point
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


def _readable_id(value: Any) -> ClientId | None:
    """The client id if it is valid, for echoing on errors; None otherwise."""
    try:
        return _check_id("id", value) if value is not None else None
    except _FieldError:
        return None


# --- field checks: (json key, raw value) -> validated value, or raise _FieldError -----------


def _type_error(key: str, expected: str, value: Any) -> _FieldError:
    got = "boolean" if isinstance(value, bool) else type(value).__name__
    return _FieldError(ErrorCode.INVALID_FIELD, f"field {key!r} must be {expected}, got {got}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unencodable_message(key: str) -> str:
    """The refusal of a string UTF-8 cannot encode, in field `key` (one wording for every door)."""
    return (f"field {key!r} holds a code point that UTF-8 cannot encode (a lone UTF-16 surrogate such as "
            "\\ud800); send text as valid Unicode")


def _check_str(key: str, value: Any, expected: str = "a string") -> str:
    """Every string field goes through here: type, then encodability."""
    if not isinstance(value, str):
        raise _type_error(key, expected, value)
    if not is_encodable(value):
        raise _FieldError(ErrorCode.INVALID_FIELD, unencodable_message(key))
    return value


def _check_text(key: str, value: Any) -> str:
    _check_str(key, value)
    if len(value) > MAX_TEXT_CHARS:
        raise _FieldError(
            ErrorCode.TEXT_TOO_LONG,
            f"field {key!r} has {len(value)} characters; the limit is {MAX_TEXT_CHARS}",
        )
    if not value.strip():
        raise _FieldError(ErrorCode.EMPTY_TEXT, f"field {key!r} is empty")
    return value


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, "a boolean", value)
    return value


def _check_id(key: str, value: Any) -> ClientId:
    if isinstance(value, str):
        _check_str(key, value)
        if not 1 <= len(value) <= MAX_ID_CHARS:
            raise _FieldError(
                ErrorCode.INVALID_FIELD, f"field {key!r} must have 1 to {MAX_ID_CHARS} characters"
            )
        return value
    if _is_int(value):
        if abs(value) > MAX_ID_INT:
            raise _FieldError(ErrorCode.INVALID_FIELD, f"field {key!r} is out of range")
        return value
    raise _type_error(key, "a string or an integer", value)


def _check_voice_name(key: str, value: Any) -> str:
    _check_str(key, value)
    if not VOICE_NAME_RE.match(value):
        raise _FieldError(
            ErrorCode.INVALID_FIELD,
            f"field {key!r} must be 1-64 characters of A-Z a-z 0-9 _ . -",
        )
    return value


def _shown(value: int | float) -> str:
    """A number for an error message, cut short: JSON admits integers of thousands of digits."""
    text = repr(value) if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def _int_in(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if not _is_int(value):
            raise _type_error(key, "an integer", value)
        if not lo <= value <= hi:
            raise _FieldError(
                ErrorCode.INVALID_FIELD, f"field {key!r} must be in [{lo}, {hi}], got {_shown(value)}"
            )
        return value

    return check


def _float_in(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if not (_is_int(value) or isinstance(value, float)):
            raise _type_error(key, "a number", value)
        try:
            number = float(value)
        except OverflowError:  # an integer literal of 309+ digits
            number = math.inf
        if not (math.isfinite(number) and lo <= number <= hi):
            raise _FieldError(
                ErrorCode.INVALID_FIELD, f"field {key!r} must be in [{lo:g}, {hi:g}], got {_shown(value)}"
            )
        return number

    return check


def _check_b64(key: str, value: Any) -> str:
    _check_str(key, value, "a base64 string")
    if not value:
        raise _FieldError(ErrorCode.INVALID_FIELD, f"field {key!r} is empty")
    if len(value) > MAX_AUDIO_B64_CHARS:
        raise _FieldError(
            ErrorCode.INVALID_FIELD,
            f"field {key!r} has {len(value)} characters; the limit is {MAX_AUDIO_B64_CHARS}",
        )
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _FieldError(ErrorCode.INVALID_FIELD, f"field {key!r} is not valid base64") from None
    return value


def _check_path(key: str, value: Any) -> str:
    _check_str(key, value)
    if not value or len(value) > MAX_PATH_CHARS or "\x00" in value:
        raise _FieldError(
            ErrorCode.INVALID_FIELD,
            f"field {key!r} must be a non-empty path of at most {MAX_PATH_CHARS} characters",
        )
    return value


def _check_transcript(key: str, value: Any) -> str:
    _check_str(key, value)
    if not value.strip():
        raise _FieldError(ErrorCode.INVALID_FIELD, f"field {key!r} is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise _FieldError(
            ErrorCode.INVALID_FIELD,
            f"field {key!r} has {len(value)} characters; the limit is {MAX_TEXT_CHARS}",
        )
    return value


def _check_format(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(key, "a string", value)
    if value not in FORMATS:
        raise _FieldError(
            ErrorCode.INVALID_FIELD,
            f"field {key!r} must be one of {', '.join(FORMAT_NAMES)}, got {value[:64]!r}",
        )
    return value


def _check_user_turn_format(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(key, "a string", value)
    if value not in USER_TURN_FORMATS:
        raise _FieldError(
            ErrorCode.INVALID_FIELD,
            f"field {key!r} must be one of {', '.join(USER_TURN_FORMATS)}, got {printable(value)!r}",
        )
    return value


def _check_words(key: str, value: Any) -> tuple[TimedWordField, ...]:
    """`words`: [{"word", "start_s", "end_s"}, ...], in order, each ending after it starts. Whether
    they fit the audio and the transcript is checked once the audio is decoded."""
    if not isinstance(value, list):
        raise _type_error(key, "a list of {word, start_s, end_s} objects", value)
    if not value or len(value) > MAX_USER_TURN_WORDS:
        raise _FieldError(ErrorCode.INVALID_FIELD, f"field {key!r} must hold 1 to {MAX_USER_TURN_WORDS} words")
    seconds = _float_in(0.0, MAX_PLAYED_MS / 1000)
    out = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) != {"word", "start_s", "end_s"}:
            raise _FieldError(ErrorCode.INVALID_FIELD, f"{where} must be an object with exactly 'word', 'start_s' "
                              "and 'end_s'")
        word = _check_str(f"{where}.word", item["word"]).strip()
        if not word or len(word) > MAX_TEXT_CHARS:
            raise _FieldError(ErrorCode.INVALID_FIELD, f"{where}.word must be a non-empty word")
        start, end = seconds(f"{where}.start_s", item["start_s"]), seconds(f"{where}.end_s", item["end_s"])
        if end < start or (out and start < out[-1].start_s):
            raise _FieldError(ErrorCode.INVALID_FIELD, f"{where}: words must be in order, each ending after it "
                              f"starts (got {start:g}-{end:g} s)")
        out.append(TimedWordField(word, start, end))
    return tuple(out)


def _check_voice_sources(command: SetVoice) -> None:
    if (command.audio_b64 is None) == (command.path is None):
        raise _FieldError(ErrorCode.INVALID_FIELD, "give exactly one of 'audio' or 'path'")
    if command.speaker2_audio_b64 is not None and command.speaker2_path is not None:
        raise _FieldError(
            ErrorCode.INVALID_FIELD, "give at most one of 'speaker2_audio' or 'speaker2_path'"
        )
    if (
        command.speaker2_transcript is not None
        and command.speaker2_audio_b64 is None
        and command.speaker2_path is None
    ):
        raise _FieldError(
            ErrorCode.INVALID_FIELD,
            "'speaker2_transcript' needs 'speaker2_audio' or 'speaker2_path'",
        )


def _range_check(key: str) -> Callable[[str, Any], Any]:
    """The check of a numeric field, from FIELD_RANGES (ints where both ends are ints)."""
    lo, hi = FIELD_RANGES[key]
    if isinstance(lo, int) and isinstance(hi, int):
        return _int_in(lo, hi)
    return _float_in(lo, hi)


# cmd -> (class, {json key: (required, check)}); dict order is validation order.
_FieldSpec = dict[str, tuple[bool, Callable[[str, Any], Any]]]
_ID: _FieldSpec = {"id": (False, _check_id)}
_COMMANDS: dict[str, tuple[type, _FieldSpec]] = {
    "start": (
        Start,
        {
            "text": (True, _check_text),
            "final": (False, _check_bool),
            **_ID,
            "voice": (False, _check_voice_name),
            **{key: (False, _range_check(key)) for key in FIELD_RANGES},
            "format": (False, _check_format),
        },
    ),
    "inject": (
        Inject,
        {"text": (True, _check_text), "final": (False, _check_bool), **_ID},
    ),
    "flush": (Flush, dict(_ID)),
    "pause": (Pause, {**_ID, "played_ms": (False, _float_in(0.0, MAX_PLAYED_MS))}),
    "resume": (Resume, dict(_ID)),
    "reset": (Reset, {"voice": (False, _check_voice_name), **_ID, "format": (False, _check_format)}),
    "set_voice": (
        SetVoice,
        {
            "name": (True, _check_voice_name),
            "audio": (False, _check_b64),
            "path": (False, _check_path),
            "transcript": (False, _check_transcript),
            "speaker2_audio": (False, _check_b64),
            "speaker2_path": (False, _check_path),
            "speaker2_transcript": (False, _check_transcript),
            **_ID,
        },
    ),
    "user_turn": (
        UserTurn,
        {
            "audio": (True, _check_b64),
            "format": (True, _check_user_turn_format),
            "transcript": (True, _check_transcript),
            "words": (False, _check_words),
            **_ID,
        },
    ),
    "voices": (ListVoices, dict(_ID)),
    "ping": (Ping, dict(_ID)),
}

# ---------------------------------------------------------------------------------------------
# Binary audio frames
# ---------------------------------------------------------------------------------------------


def encode_audio_frame(samples: np.ndarray) -> bytes:
    """`<u32 LE sample count><int16 LE PCM>` from 1-D float samples in [-1, 1] or int16.

    Floats are clipped to [-1, 1] and scaled by 32767 with rounding (1.0 -> 32767,
    -1.0 -> -32767); int16 is sent unchanged.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"audio frame must be 1-D, got shape {samples.shape}")
    if samples.dtype == np.int16:
        pcm = samples
    elif np.issubdtype(samples.dtype, np.floating):
        pcm = np.rint(np.clip(samples.astype(np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)
    else:
        raise TypeError(f"audio frame must be float or int16, got {samples.dtype}")
    return _FRAME_HEADER.pack(pcm.shape[0]) + pcm.astype("<i2", copy=False).tobytes()


def decode_audio_frame(data: bytes | bytearray | memoryview) -> np.ndarray:
    """int16 samples of one binary audio message; ValueError if the length prefix is wrong."""
    data = bytes(data)
    if len(data) < _FRAME_HEADER.size:
        raise ValueError(f"audio frame of {len(data)} bytes has no 4-byte length prefix")
    (count,) = _FRAME_HEADER.unpack_from(data)
    if len(data) != _FRAME_HEADER.size + 2 * count:
        raise ValueError(
            f"audio frame prefix says {count} samples ({2 * count} bytes) but carries "
            f"{len(data) - _FRAME_HEADER.size} bytes"
        )
    return np.frombuffer(data, dtype="<i2", offset=_FRAME_HEADER.size).astype(np.int16)

"""Per-connection and per-call limits that hold under abuse, with stable error codes.

Nothing here touches a socket; the server wires it in (see docs/operations.md, *Limits*):

    limits = Limits.from_config(config)                   # from the ServerConfig
    serve(handler, host, port, **limits.websocket_settings(), process_request=...)
    large = LargeMessageGate(limits)                      # one per server
    # per connection:
    rate = CommandRateLimiter(limits.commands_per_second, limits.command_burst)
    idle = IdleClock(limits.idle_timeout_s)
    voices = VoiceQuota(limits.max_voices_per_connection)
    # per message:
    abuse = AbuseWatch(limits)
    # per message:
    verdict = rate.admit()                                # before parsing: a flood costs no parse
    if verdict is not Admission.ACCEPT and abuse.refused(): close(POLICY_CLOSE_CODE, ...)
    if verdict is Admission.REFUSE: reply(rate_limited_error()); continue
    if verdict is Admission.DROP: continue               # no reply: replies are capped too
    kind = misfit(message, limits)                        # binary / oversize, told before parsing
    if kind and abuse.bad_message(kind): close(POLICY_CLOSE_CODE, ...)
    command = await large.parse(message)                  # ProtocolError -> error event
    idle.activity()

Abuse (see docs/operations.md, *Abuse policy*): refusing is enough for a client that bursts now
and then; one that stays over the command rate for `flood_close_s` (2 s), or has 10 x the burst
refused in one stretch, or keeps sending binary or oversize messages (more than
`bad_message_burst` at once, or more than `bad_messages_per_second` sustained), is closed with
1008 and a `policy_violation` error naming the rule; `flood_close_s = 0` turns closing off (the
limits only refuse). Every decision is made from the message's type and length, before any parsing.

Message sizes: websockets refuses (close 1009) anything above `max_size` =
max(max_command_bytes, max_voice_message_bytes) before it is buffered whole. A message above
`max_command_bytes` may only be a `set_voice` or `user_turn` carrying audio: it is parsed (JSON + base64 check)
in a worker thread, at most `max_parallel_large` at a time across the server, never on the
event loop; any other command that large is `message_too_large`. With
max_voice_message_bytes = 0 no inline audio is accepted at all (voices by server-side path only).
Compression is off: a permessage-deflate message of 31 KB on the wire can inflate to 32 MB
(finding 6), and commands and PCM frames gain little from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from dataclasses import dataclass
from typing import Any, Callable

from dia2stream.serve.config import MIN_COMMAND_BYTES, ServerConfig
from dia2stream.wire import protocol as p

Clock = Callable[[], float]


_SERVER = ServerConfig()  # the one home of the flag-backed defaults below


@dataclass(frozen=True)
class Limits:
    max_command_bytes: int = _SERVER.max_command_bytes  # any message but a set_voice or user_turn with audio
    # A set_voice or user_turn with base64 audio: 8 MiB holds ~6 MiB of file, e.g. 30 s of 48 kHz
    # stereo 16-bit WAV, or both speakers as mono WAV. 0: no inline audio (server-side paths only).
    max_voice_message_bytes: int = _SERVER.max_voice_message_bytes
    max_parallel_large: int = 2  # large messages parsed at once, server-wide
    commands_per_second: float = _SERVER.commands_per_second  # sustained, per connection
    command_burst: int = _SERVER.command_burst  # commands a connection may send at once before the rate applies
    refusals_per_second: float = 1.0  # rate_limited replies; the excess is dropped unanswered
    max_voices_per_connection: int = _SERVER.max_voices_per_connection  # distinct voice names one connection may create
    idle_timeout_s: float = _SERVER.idle_timeout_s  # no command and nothing generating: close; 0 = never
    ping_interval_s: float = _SERVER.ping_interval_s  # websocket keepalive ping; 0 = none
    ping_timeout_s: float = _SERVER.ping_timeout_s  # no pong within this: the connection is dropped
    close_timeout_s: float = 1.0  # closing handshake wait (websockets' default 10 s held SIGTERM)
    recv_queue_frames: int = 4  # frames buffered per connection before reading pauses
    max_outbox_items: int = 1024  # events + frames waiting to be sent: past this the client is not reading
    # Abuse: when refusing is not enough and the connection is closed (POLICY_CLOSE_CODE).
    flood_close_s: float = _SERVER.flood_close_s  # sustained excess over the command rate; 0 = never close for abuse
    flood_close_bursts: int = 10  # or this many bursts' worth of messages refused in one stretch
    bad_message_burst: int = 10  # binary or oversize messages tolerated at once...
    bad_messages_per_second: float = 1.0  # ...and sustained

    def __post_init__(self) -> None:
        if self.max_command_bytes < MIN_COMMAND_BYTES:
            raise ValueError(f"max_command_bytes must be at least {MIN_COMMAND_BYTES}")
        if not 0 <= self.max_voice_message_bytes <= p.MAX_MESSAGE_BYTES:
            raise ValueError(f"max_voice_message_bytes must be in [0, {p.MAX_MESSAGE_BYTES}]")
        if self.commands_per_second <= 0 or self.command_burst < 1 or self.refusals_per_second <= 0:
            raise ValueError("command rate, burst and refusal rate must be positive")
        if min(self.idle_timeout_s, self.ping_interval_s, self.ping_timeout_s) < 0:
            raise ValueError("timeouts must be >= 0 (0 disables)")
        if self.max_voices_per_connection < 0 or self.max_parallel_large < 1 or self.recv_queue_frames < 1:
            raise ValueError("max_voices_per_connection >= 0, max_parallel_large >= 1, recv_queue_frames >= 1")
        if self.max_outbox_items < 16:
            raise ValueError("max_outbox_items must be at least 16")
        if self.flood_close_s < 0 or self.flood_close_bursts < 1 or self.bad_message_burst < 1 \
                or self.bad_messages_per_second <= 0:
            raise ValueError("flood_close_s >= 0; flood_close_bursts, bad_message_burst, bad_messages_per_second > 0")

    @classmethod
    def from_config(cls, config: ServerConfig) -> "Limits":
        """The limits a `ServerConfig` asks for: every field the two share (ValueError if inconsistent)."""
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(config)}
        return cls(**{name: getattr(config, name) for name in shared})

    @property
    def max_message_bytes(self) -> int:
        """websockets' `max_size`: the largest message the transport accepts at all."""
        return max(self.max_command_bytes, self.max_voice_message_bytes)

    def websocket_settings(self) -> dict[str, Any]:
        """Keyword arguments for `websockets.asyncio.server.serve`.

        Memory a connection can make the server hold in received messages is about
        (recv_queue_frames + 1) x max_message_bytes: 40 MiB with the defaults, only for a
        client that sends maximal set_voice messages (and is authorised, when a token is set)."""
        return {
            "max_size": self.max_message_bytes,
            "compression": None,
            "ping_interval": self.ping_interval_s or None,
            "ping_timeout": self.ping_timeout_s or None,
            "close_timeout": self.close_timeout_s,
            "max_queue": (self.recv_queue_frames, max(1, self.recv_queue_frames // 4)),
        }


def outbox_overflowing(queued: int, limits: Limits) -> bool:
    """True when a connection's send queue holds more than `max_outbox_items`: the client has
    stopped reading. The server then closes it (NOT_READING_CLOSE_CODE) instead of queueing
    more; pacing already bounds frames, this bounds replies to commands too."""
    return queued > limits.max_outbox_items


NOT_READING_CLOSE_CODE = 1008  # policy violation, reason "not reading"


def is_large(message: str | bytes, limit: int) -> bool:
    """True if `message` is more than `limit` bytes as UTF-8 (cheap for short text)."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return len(message) > limit
    if len(message) > limit:
        return True
    if len(message) * 4 <= limit:  # at most 4 bytes per code point
        return False
    return len(message.encode("utf-8", "surrogatepass")) > limit


AUDIO_COMMANDS = (p.SetVoice, p.UserTurn)  # the commands that carry base64 audio: the large size class


def parse_large(message: str) -> p.SetVoice | p.UserTurn:
    """Parse a message above max_command_bytes: only a set_voice or user_turn (with audio) may be
    that large. Blocking (JSON and base64 of megabytes): run it off the event loop."""
    command = p.parse_command(message)
    if not isinstance(command, AUDIO_COMMANDS):
        raise p.ProtocolError(p.ErrorCode.MESSAGE_TOO_LARGE,
                              f"only set_voice or user_turn with audio may exceed the command limit; {command.cmd!r} "
                              f"is too large", cmd=command.cmd, id=command.id)
    return command


class LargeMessageGate:
    """Parses every message, the large ones in a worker thread, a few at a time server-wide."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_parallel_large)

    async def parse(self, message: str | bytes) -> p.Command:
        """A command, or ProtocolError (message_too_large for a large non-voice message)."""
        if isinstance(message, str) and is_large(message, self.limits.max_command_bytes):
            if self.limits.max_voice_message_bytes == 0:
                raise p.ProtocolError(p.ErrorCode.MESSAGE_TOO_LARGE,
                                      f"messages are limited to {self.limits.max_command_bytes} bytes "
                                      "(this server takes no inline audio: use set_voice 'path')")
            async with self._slots:
                return await asyncio.to_thread(parse_large, message)
        return p.parse_command(message)


# --- command rate ------------------------------------------------------------------------------


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; starts full."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, float(burst), clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self, n: float = 1.0) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


class Admission(enum.Enum):
    ACCEPT = "accept"  # parse and handle the message
    REFUSE = "refuse"  # answer with rate_limited_error(), do not parse
    DROP = "drop"  # ignore silently: the refusals themselves are over their cap


class CommandRateLimiter:
    """Per connection: commands over the rate are refused, and refusals over theirs dropped, so
    a client that floods (and may not read) costs O(1) memory and at most
    `commands_per_second + refusals_per_second` replies a second."""

    def __init__(self, rate: float, burst: int, refusals_per_second: float = 1.0,
                 clock: Clock = time.monotonic) -> None:
        self._commands = TokenBucket(rate, burst, clock)
        self._refusals = TokenBucket(refusals_per_second, 1, clock)
        self.refused = 0  # messages not handled because of the rate (answered or not)

    def admit(self) -> Admission:
        if self._commands.take():
            return Admission.ACCEPT
        self.refused += 1
        return Admission.REFUSE if self._refusals.take() else Admission.DROP


# --- abuse: closing a connection that refusals do not stop ------------------------------------


POLICY_CLOSE_CODE = 1008  # policy violation; the reason names the rule
EXCESS_GAP_S = 1.0  # a second with no refused message ends a stretch of excess


class Offence(enum.StrEnum):
    """Why a connection was closed for abuse; also the `reason` label of the closures metric."""

    FLOOD = "flood"  # over the command rate for flood_close_s, or flood_close_bursts x burst refused
    BINARY = "binary"  # binary messages past the bad-message allowance
    OVERSIZE = "oversize"  # messages past the command limit that cannot be a set_voice, past the allowance


class AbuseWatch:
    """Per connection: decides, from counts and times only, when a connection has to be closed.

    Flood: a *stretch of excess* begins at a refused message and lasts while refusals keep coming
    (less than EXCESS_GAP_S apart). A stretch longer than `flood_close_s`, or one with more than
    `flood_close_bursts x command_burst` refused messages (a client sending as fast as it can
    reaches it within milliseconds), is a flood. Binary and oversize messages are never useful:
    each takes a token from a bucket of `bad_message_burst` refilled at `bad_messages_per_second`,
    and an empty bucket is an offence."""

    def __init__(self, limits: Limits, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._close_after_s = limits.flood_close_s
        self._close_after_refusals = limits.flood_close_bursts * limits.command_burst
        self._since: float | None = None  # the current stretch of excess began
        self._last = 0.0
        self._refused = 0  # in the current stretch
        self._bad = {kind: TokenBucket(limits.bad_messages_per_second, limits.bad_message_burst, clock)
                     for kind in (Offence.BINARY, Offence.OVERSIZE)}

    def refused(self) -> Offence | None:
        """A message was refused for the rate: FLOOD when the connection must now be closed."""
        now = self._clock()
        if self._since is None or now - self._last > EXCESS_GAP_S:
            self._since, self._refused = now, 0
        self._last = now
        self._refused += 1
        if not self._close_after_s:
            return None
        if self._refused > self._close_after_refusals or now - self._since > self._close_after_s:
            return Offence.FLOOD
        return None

    def bad_message(self, kind: Offence) -> Offence | None:
        """A binary or oversize message: `kind` when the allowance is spent (never with
        flood_close_s = 0: the policy then only refuses)."""
        return None if self._bad[kind].take() or not self._close_after_s else kind


def misfit(message: str | bytes, limits: Limits) -> Offence | None:
    """What is wrong with a message before it is parsed, from its type and length (and, for a
    large text, one substring search): BINARY for a binary message, OVERSIZE for a text above
    the command limit that cannot be a set_voice or user_turn (it names neither command) or that
    is above the audio limit, else None."""
    if not isinstance(message, str):
        return Offence.BINARY
    if not is_large(message, limits.max_command_bytes):
        return None
    if limits.max_voice_message_bytes == 0 or not any(cmd in message for cmd in LARGE_COMMANDS):
        return Offence.OVERSIZE
    return None


LARGE_COMMANDS = ('"set_voice"', '"user_turn"')  # the commands that may carry audio past the command limit


def policy_error(offence: Offence, limits: Limits) -> p.ErrorEvent:
    """The error a connection gets just before it is closed for `offence`."""
    why = {
        Offence.FLOOD: f"more than {limits.commands_per_second:g} commands a second for over "
                       f"{limits.flood_close_s:g} s, or {limits.flood_close_bursts} x the burst of "
                       f"{limits.command_burst} at once",
        Offence.BINARY: "binary messages, repeatedly (commands are JSON text)",
        Offence.OVERSIZE: f"messages over {limits.max_command_bytes} bytes that are not a set_voice with audio, "
                          "repeatedly",
    }[offence]
    return p.ErrorEvent(code=p.ErrorCode.POLICY_VIOLATION, message=f"closing this connection: {why}")


def misfit_error(kind: Offence, limits: Limits) -> p.ErrorEvent:
    """The reply to a binary or oversize message that is tolerated (not parsed)."""
    if kind is Offence.BINARY:
        return p.ErrorEvent(code=p.ErrorCode.BINARY_NOT_SUPPORTED,
                            message="binary messages are not accepted; send JSON text")
    voice = ("this server takes no inline audio: use set_voice 'path', and keep user_turn audio within it"
             if limits.max_voice_message_bytes == 0 else "only set_voice or user_turn with audio may exceed it")
    return p.ErrorEvent(code=p.ErrorCode.MESSAGE_TOO_LARGE,
                        message=f"messages are limited to {limits.max_command_bytes} bytes; {voice}")


def rate_limited_error(refused: int = 0) -> p.ErrorEvent:
    """The reply to a refused message (its id is unknown: it was not parsed)."""
    return p.ErrorEvent(code=p.ErrorCode.RATE_LIMITED,
                        message=f"too many commands; {refused} message(s) ignored so far on this connection, "
                                "send fewer")


# --- idle connections -----------------------------------------------------------------------


class IdleClock:
    """When a connection with no command and nothing generating should be closed."""

    def __init__(self, timeout_s: float, clock: Clock = time.monotonic) -> None:
        self.timeout_s, self._clock = timeout_s, clock
        self._last = clock()

    def activity(self) -> None:
        self._last = self._clock()

    def remaining(self) -> float | None:
        """Seconds to wait for the next command before checking again; None: no timeout."""
        if not self.timeout_s:
            return None
        return max(0.0, self._last + self.timeout_s - self._clock())

    def expired(self, busy: bool) -> bool:
        """True when idle past the timeout. A call that is speaking is not idle (and restarts
        the clock, so the timeout counts from the end of its speech)."""
        if busy:
            self.activity()
            return False
        remaining = self.remaining()
        return remaining is not None and remaining <= 0


IDLE_CLOSE_CODE = 1000  # normal closure, with reason "idle timeout", after an idle_timeout error


def idle_timeout_error(timeout_s: float) -> p.ErrorEvent:
    return p.ErrorEvent(code=p.ErrorCode.IDLE_TIMEOUT,
                        message=f"no command for {timeout_s:g} s; closing the connection")


# --- per call / per connection quotas -------------------------------------------------------


class VoiceQuota:
    """Distinct voice names one connection may create (replacing its own voice is free)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.names: set[str] = set()

    def check(self, command: p.SetVoice) -> None:
        if command.name not in self.names and len(self.names) >= self.limit:
            raise p.ProtocolError(p.ErrorCode.TOO_MANY_VOICES,
                                  f"this connection already made {len(self.names)} voice(s), the limit; "
                                  "replace one of them by name", cmd=command.cmd, id=command.id)

    def add(self, name: str) -> None:
        """Call after the voice was made (a failed set_voice does not use the quota)."""
        self.names.add(name)

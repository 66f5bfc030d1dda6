"""What both plugins read of the native protocol's events (docs/protocol.md) the same way."""

from __future__ import annotations

import json


def answers_pause(message: str | bytes) -> bool:
    """The server's answer to a `pause`: `paused`, or an error for it. Until it arrives, what the
    server sends is the interrupted turn's tail (frames and words generated before it took the
    pause), which a plugin drops rather than play in the next turn."""
    if isinstance(message, bytes):
        return False
    event = json.loads(message)
    kind = event.get("event")
    return kind == "paused" or (kind == "error" and event.get("cmd") == "pause")


# Errors after which the call has no utterance: the next turn must `start` again. `context_full`
# and `internal_error` reset the call (a `reset` event may follow); `not_started` says so.
_ENDS_UTTERANCE = frozenset({"context_full", "internal_error", "not_started"})


def still_started(event: dict, started: bool) -> bool:
    """Whether the call has an utterance (later turns `inject`) after `event`, given it had one
    (`started`) before: a `started` begins one; a `reset` (also the automatic one after
    `context_full`), an error answering a `start` (e.g. `unknown_voice`: nothing began) and
    an error that ends or denies the utterance leave none, so the next turn sends `start`."""
    kind = event.get("event")
    if kind == "started":
        return True
    if kind == "reset":
        return False
    if kind == "error" and (event.get("code") in _ENDS_UTTERANCE
                            or (event.get("cmd") == "start" and event.get("code") != "busy")):
        return False
    return started


def ends_turn(event: dict) -> bool:
    """An error that ends the utterance being spoken (no `done` will come for it)."""
    return event.get("event") == "error" and event.get("code") in ("context_full", "internal_error")


class WholeWords:
    """Streamed text (LLM tokens, often pieces of words) as whole words: the server takes each
    fragment's text as whole words (a fragment's last word is not continued by the next one),
    so only the text up to the last whitespace goes out; the rest waits for more text or the
    end of the input."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, text: str) -> None:
        self.text += text

    def take(self, final: bool = False) -> str:
        """The whole words received and not yet taken ("" when none); with `final`, all of it."""
        cut = len(self.text) if final else max(self.text.rfind(c) for c in (" ", "\n", "\t", "\r")) + 1
        ready = self.text[:cut]
        if not ready.strip():  # only whitespace so far: nothing to say yet (empty_text)
            if final:
                self.text = ""
            return ""
        self.text = self.text[cut:]
        return ready

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

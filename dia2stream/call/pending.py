"""The call's pending-text quota: how much text may wait to be spoken (`--max-pending-text-chars`)."""

from __future__ import annotations

from dia2stream.wire import protocol as p


def check_pending_text(pending_chars: int, adding: str, limit: int, command: p.Command) -> None:
    """Refuse a start/inject whose text would leave more than `limit` characters queued but not
    yet spoken on the call (an LLM streaming faster than speech, or a client looping inject)."""
    if pending_chars + len(adding) > limit:
        raise p.ProtocolError(p.ErrorCode.PENDING_TEXT_FULL,
                              f"{pending_chars} characters are still waiting to be spoken; at most {limit} "
                              "may be queued: wait for words or done, or reset",
                              cmd=command.cmd, id=getattr(command, "id", None))


def pending_text_chars(machine) -> int:
    """Characters pushed to a call's text state machine and not yet consumed by the model."""
    return machine.queued_chars()


def check_turn_text(machine, command: p.Start | p.Inject, limit: int) -> None:
    """`check_pending_text` for a start/inject, where its text is pushed: a start replaces
    whatever was pending, so only its own text counts."""
    pending = 0 if isinstance(command, p.Start) else pending_text_chars(machine)
    check_pending_text(pending, command.text, limit, command)

"""Driving a LiveKit Agents TTS (any plugin) as an agent does, for the tests that need livekit."""

from __future__ import annotations

import asyncio


async def speak(tts, pieces, options, timeout_s: float, *, gap_at: int | None = None,
                gap_s: float = 0.0) -> tuple[list, list]:
    """Push `pieces` as an LLM writes them (pausing `gap_s` before piece `gap_at`), end the input,
    read every frame within `timeout_s`: (frames, the timed words as the plugin gave them)."""
    from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT

    frames, words = [], []
    async with tts.stream(conn_options=options) as stream:
        for i, piece in enumerate(pieces):
            if i == gap_at:
                await asyncio.sleep(gap_s)
            stream.push_text(piece)
        stream.end_input()
        async with asyncio.timeout(timeout_s):
            async for ev in stream:
                frames.append(ev.frame)
                words.extend(ev.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT) or [])
    return frames, words

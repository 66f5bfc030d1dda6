"""The per-connection pieces of the server on their own: the bounded outbox (finding 4: a client
that does not read costs bounded memory), the delivery meter's underrun definition, and the
voice scope that keeps a connection's voices private (finding 9)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from dia2stream.wire import protocol as p
from dia2stream.serve.delivery import DeliveryMeter
from dia2stream.serve.limits import Limits, VoiceQuota
from dia2stream.serve.metrics import Metrics
from dia2stream.serve.outbox import Outbox
from dia2stream.serve.voice_scope import VoiceScope


async def test_outbox_stops_taking_items_past_its_bound_and_says_so_once():
    overflows = []
    outbox = Outbox(asyncio.get_running_loop(), Limits(max_outbox_items=16), on_overflow=lambda: overflows.append(1))
    feeder = threading.Thread(target=lambda: [outbox.put_threadsafe(i) for i in range(10_000)])
    feeder.start()
    feeder.join()
    await asyncio.sleep(0.05)  # let the loop run the handed-over puts
    assert outbox.qsize() == 16 and overflows == [1] and outbox.overflowed
    assert [await outbox.get() for _ in range(16)] == list(range(16))  # in order, the first ones


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_underruns_are_late_frames_for_a_back_to_back_player_and_the_schedule_slips():
    metrics, clock = Metrics(gpu_memory=None, process=False), Clock()
    meter = DeliveryMeter(metrics, clock)
    meter.event(p.Started(id="u", position=0))
    for t in (0.0, 0.05, 0.10, 0.30, 0.33, 0.36):  # due: 0, .08, .16, .24 -> sent .30: late, slips to .38, .46
        clock.now = t
        meter.frame_sent()
    assert meter.underruns == 1
    meter.event(p.Paused(frames_sent=6, position=9, audio_s=0.48))
    clock.now = 5.0  # a pause is silence the client asked for, not an underrun
    meter.event(p.Resumed())
    meter.frame_sent()
    meter.event(p.Done(id="u", frames=7, audio_s=0.56, wall_s=5.1, ttfa_ms=120.0, onset_ms=200.0))
    meter.event(p.ErrorEvent(code="rate_limited", message="x"))
    assert metrics.value("dia2_underruns_total") == 1
    assert metrics.value("dia2_frames_sent_total") == 7
    assert metrics.value("dia2_speech_onset_seconds_sum") == pytest.approx(0.2)
    assert metrics.value("dia2_time_to_first_byte_seconds_sum") == pytest.approx(0.12)
    assert metrics.value("dia2_errors_total", code="rate_limited") == 1


def test_voice_scope_hides_other_connections_voices_and_maps_names_both_ways():
    mine, theirs = VoiceScope(VoiceQuota(2)), VoiceScope(VoiceQuota(2))
    key = mine.key_for(p.SetVoice(name="alice", path="x"))
    mine.made("alice", key)
    other = theirs.key_for(p.SetVoice(name="bob", path="y"))
    theirs.made("bob", other)
    engine_voices = ["shared", key, other]
    assert "~" in key and key != other
    assert mine.visible(engine_voices) == ["shared", "alice"]
    assert theirs.visible(engine_voices) == ["shared", "bob"]
    assert mine.command(p.Start(text="hi", voice="alice"), engine_voices).voice == key
    assert mine.command(p.Start(text="hi", voice="shared"), engine_voices).voice == "shared"
    with pytest.raises(p.ProtocolError) as info:
        mine.command(p.Reset(voice="bob", id=4), engine_voices)
    assert info.value.code == "unknown_voice" and info.value.id == 4 and "~" not in info.value.message
    assert mine.event(p.Started(voice=key, position=3)).voice == "alice"
    listing = p.Voices(voices=[{"name": n, "prefix_s": 1.0, "speakers": 1} for n in engine_voices])
    assert [v["name"] for v in mine.event(listing).voices] == ["shared", "alice"]
    # an own voice shadows a shared one of the same name, for this connection only
    shadow = mine.key_for(p.SetVoice(name="shared", path="z"))
    mine.made("shared", shadow)
    assert mine.command(p.Start(text="hi", voice="shared"), engine_voices + [shadow]).voice == shadow
    assert theirs.command(p.Start(text="hi", voice="shared"), engine_voices + [shadow]).voice == "shared"
    assert mine.key_for(p.SetVoice(name="alice", path="again")) == key  # replacing is free
    with pytest.raises(p.ProtocolError) as info:
        mine.key_for(p.SetVoice(name="third", path="w"))
    assert info.value.code == "too_many_voices"

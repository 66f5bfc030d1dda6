"""The playback model (dia2stream/playback.py) on hand-made timelines."""

from __future__ import annotations

import pytest

from dia2stream.tools.playback import simulate


def test_frames_ahead_of_time_play_back_to_back_from_the_first():
    # command at 10.0; first frame after 0.2 s, then a burst (the server runs ahead)
    heard = simulate([10.2, 10.21, 10.22, 10.23, 10.5], command_at=10.0, onset_frame=2)
    assert heard.play_starts == pytest.approx((10.2, 10.28, 10.36, 10.44, 10.52))
    assert heard.underruns == 0 and heard.stall_s == 0
    assert heard.first_byte_s == pytest.approx(0.2)
    assert heard.onset_s == pytest.approx(0.36)  # two frames of padding before the first word
    assert heard.end_s == pytest.approx(10.6)


def test_a_late_frame_is_one_underrun_and_the_schedule_slips():
    # frame 2 is due at 0.16 but arrives at 0.30: a 0.14 s gap; later frames slip with it
    heard = simulate([0.0, 0.05, 0.30, 0.31, 0.32], command_at=0.0, onset_frame=3)
    assert heard.play_starts == pytest.approx((0.0, 0.08, 0.30, 0.38, 0.46))
    assert heard.underruns == 1
    assert heard.late_s == pytest.approx((0, 0, 0.14, 0, 0))
    assert heard.stall_s == pytest.approx(0.14)
    assert heard.onset_s == pytest.approx(0.38)  # the stall delays the first word too


def test_every_frame_late_at_a_slow_cadence():
    # a server that only makes 10 frames/s: each frame after the first is 20 ms late
    arrivals = [0.1 * i for i in range(6)]
    heard = simulate(arrivals, command_at=0.0)
    assert heard.underruns == 5
    assert heard.stall_s == pytest.approx(0.1)
    assert heard.play_starts == pytest.approx(tuple(arrivals))


def test_exactly_on_time_frames_are_not_underruns():
    arrivals = [0.3 + 0.08 * i for i in range(50)]  # float rounding puts some a hair late
    heard = simulate(arrivals, command_at=0.0, onset_frame=0)
    assert heard.underruns == 0
    assert heard.onset_s == pytest.approx(0.3)
    assert heard.gaps_s == pytest.approx([0.08] * 49)


def test_onset_is_unknown_without_a_word_or_when_its_frame_never_came():
    assert simulate([1.0, 1.1], command_at=0.0).onset_s is None
    assert simulate([1.0, 1.1], command_at=0.0, onset_frame=2).onset_s is None
    empty = simulate([], command_at=0.0, onset_frame=0)
    assert empty.first_byte_s is None and empty.onset_s is None and empty.underruns == 0
    assert empty.end_s is None


def test_played_seconds_at_a_barge_in():
    heard = simulate([0.0, 0.01, 0.02], command_at=0.0)
    assert heard.played_s(-1.0) == 0
    assert heard.played_s(0.04) == pytest.approx(0.04)
    assert heard.played_s(0.12) == pytest.approx(0.12)
    assert heard.played_s(5.0) == pytest.approx(0.24)
    stalled = simulate([0.0, 0.5], command_at=0.0)  # silence from 0.08 to 0.5 is not audio
    assert stalled.played_s(0.5) == pytest.approx(0.08)


def test_arrivals_must_be_in_order():
    with pytest.raises(ValueError):
        simulate([0.2, 0.1], command_at=0.0)

"""test_client.py's --format, --pause-at/--played-ms and speech-onset report, without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import test_client as tc
from dia2stream.wire import protocol as p
from dia2stream.wire.formats import FORMATS, FrameEncoder


def test_format_goes_into_start_and_frames_decode_to_a_wav_at_its_rate(tmp_path):
    args = tc.parse_args(["[S1] Hi.", "--format", "ulaw_8000"])
    start = tc.build_actions(args)[0].command
    assert json.loads(p.command_to_json(start))["format"] == "ulaw_8000"

    state = tc.Run(format=FORMATS["ulaw_8000"], sample_rate=8000, frame_samples=640)
    encoder = FrameEncoder("ulaw_8000")
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(1920 * 5) / 24000)).astype(np.float32)
    for i in range(5):
        assert tc.handle_audio(encoder.encode(tone[i * 1920:(i + 1) * 1920]), state)
    assert state.odd_frames == 0
    tc.write_wav(str(tmp_path / "out.wav"), state)
    audio, rate = sf.read(tmp_path / "out.wav", dtype="int16")
    assert rate == 8000 and len(audio) == 5 * 640 and np.abs(audio).max() > 10_000

    # a 24 kHz PCM frame is not a µ-law frame: reported, not mis-decoded
    assert not tc.handle_audio(p.encode_audio_frame(tone[:1920]), state)
    assert "not ulaw_8000" in state.failure


def test_played_ms_rides_on_the_pause_only_when_asked():
    plain = tc.build_actions(tc.parse_args(["[S1] Hi.", "--pause-at", "1"]))
    assert [a.played_ms for a in plain] == [None, None]
    asked = tc.build_actions(tc.parse_args(["[S1] Hi.", "--pause-at", "1", "--played-ms", "480"]))
    assert isinstance(asked[1].command, p.Pause) and asked[1].played_ms == 480
    assert tc.parse_args(["x", "--pause-at", "1", "--played-ms", "auto"]).played_ms == "auto"
    for bad in (["x", "--played-ms", "480"], ["x", "--pause-at", "1", "--played-ms", "soon"],
                ["x", "--format", "mp3"]):
        with pytest.raises(SystemExit):
            tc.parse_args(bad)


def test_utterance_onset_word_times_and_played_ms():
    u = tc.Utterance("t", command_at=10.0, segments=[[10.1, 10.12, 10.14], [11.0, 11.01]])
    u.words.append(p.Word(id="t", word="Hi", start_s=0.16, frame=2))
    heard = u.playback()
    assert heard.first_byte_s == pytest.approx(0.1) and heard.onset_s == pytest.approx(0.26)
    assert u.play_starts() == pytest.approx([10.1, 10.18, 10.26, 11.0, 11.08])
    assert u.played_ms(10.2) == pytest.approx(100)  # 80 ms of frame 0 + 20 ms of frame 1
    assert u.played_ms(20.0) == pytest.approx(400)


def test_a_bad_url_or_timeout_is_a_usage_error_not_a_traceback(capsys):
    for bad, says in ((["--url", "notaurl"], "not a websocket URL"), (["--url", "http://h:1/"], "not a websocket URL"),
                      (["--timeout", "-1"], "--timeout"), (["--timeout", "nan"], "--timeout")):
        with pytest.raises(SystemExit) as exit_:
            tc.parse_args(["[S1] Hi.", *bad])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert tc.parse_args(["[S1] Hi.", "--url", "wss://example.org/tts"]).url == "wss://example.org/tts"


def test_busy_retries_option():
    assert tc.parse_args(["[S1] Hi."]).busy_retries == 3
    assert tc.parse_args(["[S1] Hi.", "--busy-retries", "0"]).busy_retries == 0
    with pytest.raises(SystemExit):
        tc.parse_args(["[S1] Hi.", "--busy-retries", "-1"])

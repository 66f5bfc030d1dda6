"""dia2stream.wire.protocol: command parsing and validation, events, audio frames."""

import base64
import json
import struct

import numpy as np
import pytest

from dia2stream.wire import protocol as p
def error_of(message) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_command(message)
    return info.value


def cmd(**fields) -> str:
    return json.dumps(fields)


# --- good commands ---------------------------------------------------------------------------


def test_start_minimal_defaults():
    c = p.parse_command(cmd(cmd="start", text="[S1] Hello there."))
    assert c == p.Start(text="[S1] Hello there.")
    assert c.final is True and c.id is None and c.voice is None and c.seed is None


def test_start_all_fields():
    c = p.parse_command(cmd(
        cmd="start", text=" [S1] Hi.", final=False, id="t-1", voice="alice.v2", seed=7,
        temperature=0, top_k=50, text_temperature=0.6, audio_temperature=1.2, text_top_k=1,
        audio_top_k=256, cfg_scale=3,
    ))
    assert c == p.Start(
        text=" [S1] Hi.", final=False, id="t-1", voice="alice.v2", seed=7, temperature=0.0,
        top_k=50, text_temperature=0.6, audio_temperature=1.2, text_top_k=1, audio_top_k=256,
        cfg_scale=3.0,
    )
    assert isinstance(c.temperature, float) and isinstance(c.cfg_scale, float)


def test_text_is_kept_verbatim_for_streaming_fragments():
    assert p.parse_command(cmd(cmd="inject", text=" world", final=False)).text == " world"


@pytest.mark.parametrize("message, expected", [
    (cmd(cmd="inject", text="more words", id=12), p.Inject(text="more words", id=12)),
    (cmd(cmd="inject", text="x", final=False), p.Inject(text="x", final=False)),
    (cmd(cmd="flush"), p.Flush()),
    (cmd(cmd="flush", id="f"), p.Flush(id="f")),
    (cmd(cmd="pause", id=-3), p.Pause(id=-3)),
    (cmd(cmd="resume"), p.Resume()),
    (cmd(cmd="reset"), p.Reset()),
    (cmd(cmd="reset", voice="bob"), p.Reset(voice="bob")),
    (cmd(cmd="voices"), p.ListVoices()),
    (cmd(cmd="ping", id="abc"), p.Ping(id="abc")),
    (cmd(cmd="start", text="a", id=None, seed=None), p.Start(text="a")),  # null = omitted
])
def test_good_commands(message, expected):
    assert p.parse_command(message) == expected


def test_set_voice_audio_and_speaker2_path():
    audio = base64.b64encode(b"RIFF....WAVE").decode()
    c = p.parse_command(cmd(cmd="set_voice", name="alice", audio=audio, transcript="[S1] Hi.",
                            speaker2_path="voices/b.wav", speaker2_transcript="[S2] Yo."))
    assert c == p.SetVoice(name="alice", audio_b64=audio, transcript="[S1] Hi.",
                           speaker2_path="voices/b.wav", speaker2_transcript="[S2] Yo.")
    assert c.audio_bytes() == b"RIFF....WAVE"
    assert c.speaker2_audio_bytes() is None


def test_set_voice_path_only():
    c = p.parse_command(cmd(cmd="set_voice", name="a", path="/srv/voices/a.flac"))
    assert c == p.SetVoice(name="a", path="/srv/voices/a.flac")
    assert c.audio_bytes() is None


@pytest.mark.parametrize("command", [
    p.Start(text="[S1] a", final=False, id=5, voice="v", seed=1, temperature=0.5, top_k=3,
            cfg_scale=2.0),
    p.Inject(text=" b", final=False, id="x"),
    p.Flush(), p.Pause(id=1), p.Resume(id="r"), p.Reset(voice="v"), p.ListVoices(), p.Ping(id=9),
    p.SetVoice(name="n", audio_b64="AAEC", speaker2_audio_b64="AwQF", speaker2_transcript="t"),
])
def test_command_json_round_trip(command):
    text = p.command_to_json(command)
    assert json.loads(text)["cmd"] == command.cmd
    assert p.parse_command(text) == command


def test_command_to_json_uses_wire_names():
    obj = json.loads(p.command_to_json(p.SetVoice(name="n", audio_b64="AAEC")))
    assert obj == {"cmd": "set_voice", "name": "n", "audio": "AAEC"}


# --- errors ----------------------------------------------------------------------------------


def test_binary_frame():
    e = error_of(b'{"cmd": "ping"}')
    assert (e.code, e.cmd, e.id) == ("binary_not_supported", None, None)
    assert error_of(bytearray(b"x")).code == "binary_not_supported"


@pytest.mark.parametrize("message", ["", "not json", "{\"cmd\": ", "[" * 100_000, "{'cmd': 1}"])
def test_invalid_json(message):
    e = error_of(message)
    assert (e.code, e.cmd, e.id) == ("invalid_json", None, None)


@pytest.mark.parametrize("message, carried_id", [
    ("[1, 2]", None), ('"start"', None), ("3", None), ("null", None),
    (cmd(text="hi", id="q"), "q"),  # missing cmd
    (cmd(cmd=3, id=4), 4),  # non-string cmd
    (cmd(cmd=None), None),
    (cmd(cmd=["start"], id=True), None),  # a boolean id is not readable
])
def test_invalid_message(message, carried_id):
    e = error_of(message)
    assert (e.code, e.cmd, e.id) == ("invalid_message", None, carried_id)


def test_unknown_command_carries_cmd_and_id():
    e = error_of(cmd(cmd="speak", id="u1"))
    assert (e.code, e.cmd, e.id) == ("unknown_command", "speak", "u1")
    assert "start" in e.message


def test_message_too_large():
    e = error_of('{"cmd": "start", "text": "' + "a" * p.MAX_MESSAGE_BYTES + '"}')
    assert e.code == "message_too_large"
    # multi-byte characters count as UTF-8 bytes
    n = p.MAX_MESSAGE_BYTES // 3
    assert error_of(" " * 10 + "€" * n).code == "message_too_large"


def test_empty_text():
    for text in ["", "   ", "\n\t"]:
        e = error_of(cmd(cmd="start", text=text, id="e1"))
        assert (e.code, e.cmd, e.id) == ("empty_text", "start", "e1")
    e = error_of(cmd(cmd="inject", text=" ", final=True, id=2))
    assert (e.code, e.cmd, e.id) == ("empty_text", "inject", 2)


def test_text_length_limit():
    assert p.parse_command(cmd(cmd="start", text="a" * p.MAX_TEXT_CHARS)).text == "a" * 4096
    e = error_of(cmd(cmd="inject", text="a" * (p.MAX_TEXT_CHARS + 1), id="long"))
    assert (e.code, e.cmd, e.id) == ("text_too_long", "inject", "long")
    assert "4097" in e.message


@pytest.mark.parametrize("fields, named", [
    ({"cmd": "start"}, "text"),  # missing required
    ({"cmd": "start", "text": None}, "text"),
    ({"cmd": "start", "text": 5}, "text"),
    ({"cmd": "start", "text": "a", "final": "yes"}, "final"),
    ({"cmd": "start", "text": "a", "final": 1}, "final"),
    ({"cmd": "start", "text": "a", "seed": True}, "seed"),  # bool is not an int
    ({"cmd": "start", "text": "a", "seed": 1.5}, "seed"),
    ({"cmd": "start", "text": "a", "seed": -1}, "seed"),
    ({"cmd": "start", "text": "a", "temperature": 5.01}, "temperature"),
    ({"cmd": "start", "text": "a", "temperature": -0.1}, "temperature"),
    ({"cmd": "start", "text": "a", "temperature": "1"}, "temperature"),
    ({"cmd": "start", "text": "a", "audio_temperature": False}, "audio_temperature"),
    ({"cmd": "start", "text": "a", "top_k": 0}, "top_k"),
    ({"cmd": "start", "text": "a", "text_top_k": 257}, "text_top_k"),
    ({"cmd": "start", "text": "a", "audio_top_k": 10.0}, "audio_top_k"),
    ({"cmd": "start", "text": "a", "cfg_scale": 0.4}, "cfg_scale"),
    ({"cmd": "start", "text": "a", "cfg_scale": 20.5}, "cfg_scale"),
    ({"cmd": "start", "text": "a", "voice": "bad name"}, "voice"),
    ({"cmd": "start", "text": "a", "voice": "x" * 65}, "voice"),
    ({"cmd": "start", "text": "a", "voice": 3}, "voice"),
    ({"cmd": "start", "text": "a", "speed": 2}, "speed"),  # unknown field
    ({"cmd": "flush", "text": "a"}, "text"),
    ({"cmd": "reset", "voice": ""}, "voice"),
    ({"cmd": "set_voice", "path": "a.wav"}, "name"),
    ({"cmd": "set_voice", "name": "../x", "path": "a.wav"}, "name"),
    ({"cmd": "set_voice", "name": "a", "audio": "@@@@"}, "audio"),
    ({"cmd": "set_voice", "name": "a", "audio": ""}, "audio"),
    ({"cmd": "set_voice", "name": "a", "path": ""}, "path"),
    ({"cmd": "set_voice", "name": "a", "path": "a\u0000b"}, "path"),
    ({"cmd": "set_voice", "name": "a", "path": "a.wav", "transcript": " "}, "transcript"),
    ({"cmd": "set_voice", "name": "a", "path": "a.wav", "speaker2_audio": 7}, "speaker2_audio"),
    ({"cmd": "set_voice", "name": "a", "audio": "AAAA", "path": "a.wav"}, "audio"),
    ({"cmd": "set_voice", "name": "a"}, "path"),
    ({"cmd": "set_voice", "name": "a", "path": "a", "speaker2_path": "b",
      "speaker2_audio": "AAAA"}, "speaker2_path"),
    ({"cmd": "set_voice", "name": "a", "path": "a", "speaker2_transcript": "t"}, "speaker2"),
])
def test_invalid_field_names_the_field(fields, named):
    e = error_of(json.dumps({**fields, "id": "bad-1"}))
    assert (e.code, e.cmd, e.id) == ("invalid_field", fields["cmd"], "bad-1")
    assert named in e.message


def test_unknown_fields_are_all_named():
    e = error_of(cmd(cmd="pause", zz=1, aa=2))
    assert e.code == "invalid_field" and "'aa', 'zz'" in e.message


def test_nonfinite_numbers_rejected():
    e = error_of('{"cmd": "start", "text": "a", "temperature": NaN}')
    assert e.code == "invalid_field" and "temperature" in e.message
    assert error_of('{"cmd": "start", "text": "a", "cfg_scale": Infinity}').code == "invalid_field"


@pytest.mark.parametrize("bad_id", [True, 1.5, "", "x" * 129, [1], {"a": 1}, 2**63])
def test_invalid_id_is_invalid_field_and_not_echoed(bad_id):
    e = error_of(json.dumps({"cmd": "ping", "id": bad_id}))
    assert (e.code, e.cmd, e.id) == ("invalid_field", "ping", None)
    assert "'id'" in e.message


def test_id_limits_accepted():
    assert p.parse_command(cmd(cmd="ping", id="x" * 128)).id == "x" * 128
    assert p.parse_command(cmd(cmd="ping", id=0)).id == 0


def test_audio_size_limit():
    too_big = "A" * (p.MAX_AUDIO_B64_CHARS + 4)
    e = error_of(cmd(cmd="set_voice", name="a", audio=too_big))
    assert e.code == "invalid_field" and "audio" in e.message


def test_error_event_from_protocol_error():
    e = error_of(cmd(cmd="start", text="", id=77))
    event = e.to_event()
    assert isinstance(event, p.ErrorEvent)
    assert json.loads(event.to_json()) == {
        "event": "error", "code": "empty_text", "message": "field 'text' is empty",
        "cmd": "start", "id": 77,
    }


def test_error_codes_are_stable_strings():
    assert p.ErrorCode.BUSY == "busy"
    assert json.dumps({"code": p.ErrorCode.CONTEXT_FULL}) == '{"code": "context_full"}'
    assert {c.value for c in p.ErrorCode} >= {
        "invalid_json", "invalid_message", "binary_not_supported", "unknown_command",
        "invalid_field", "empty_text", "text_too_long", "message_too_large", "not_started",
        "not_paused", "busy", "context_full", "unknown_voice", "bad_audio", "path_not_allowed",
        "transcript_required", "voice_error", "internal_error",
    }
    err = p.ProtocolError(p.ErrorCode.NOT_STARTED, "send start first", cmd="inject", id="i")
    assert err.code == "not_started" and type(err.code) is str
    assert err.to_event().to_json() == (
        '{"event": "error", "code": "not_started", "message": "send start first", '
        '"cmd": "inject", "id": "i"}'
    )


# --- events ----------------------------------------------------------------------------------


def test_ready_json():
    ready = p.Ready(model="tiny", device="cpu", voices=["alice"], max_lead_ms=1000)
    assert json.loads(ready.to_json()) == {
        "event": "ready", "protocol": 1, "model": "tiny", "sample_rate": 24000,
        "frame_samples": 1920, "frame_rate": 12.5, "device": "cpu", "voices": ["alice"],
        "max_text_chars": 4096, "max_lead_ms": 1000,
        "formats": ["pcm_24000", "pcm_16000", "pcm_8000", "ulaw_8000", "alaw_8000"],
    }
    assert ready.to_json().startswith('{"event": "ready"')


def test_none_fields_omitted():
    assert json.loads(p.Started(position=0).to_json()) == {"event": "started", "position": 0}
    assert json.loads(p.Pong().to_json()) == {"event": "pong"}


@pytest.mark.parametrize("event", [
    p.Ready(model="m", device="cuda:0", voices=[], max_lead_ms=800, context_frames=1500),
    p.Started(id="t", voice="alice", position=212),
    p.Word(id=3, word="Hello", start_s=0.16, frame=2),
    p.Done(id="t", frames=40, audio_s=3.2, wall_s=3.5, ttfa_ms=120.5),
    p.Done(frames=0, audio_s=0.0, wall_s=0.01),
    p.Paused(id="t", frames_sent=12, position=300, audio_s=0.96),
    p.Resumed(id="t"),
    p.ResetDone(voice="alice"),
    p.ErrorEvent(code="busy", message="another client is connected"),
    p.VoiceReady(name="alice", prefix_s=9.84, prepare_ms=85.0, speakers=1),
    p.Voices(voices=[{"name": "alice", "prefix_s": 9.84, "speakers": 1}], id=1),
    p.Pong(id="p"),
])
def test_event_round_trip(event):
    text = event.to_json()
    assert json.loads(text)["event"] == event.event
    assert p.parse_event(text) == event


def test_event_names():
    assert p.ResetDone().event == "reset"
    assert p.ErrorEvent(code="x", message="y").event == "error"
    assert p.ListVoices.cmd == "voices" and p.Voices.event == "voices"
    assert p.VoiceReady.event == "voice_ready"


def test_parse_event_ignores_unknown_fields_and_rejects_unknown_events():
    assert p.parse_event('{"event": "pong", "id": 1, "later": true}') == p.Pong(id=1)
    with pytest.raises(ValueError):
        p.parse_event('{"event": "nope"}')
    with pytest.raises(ValueError):
        p.parse_event('{"event": "done", "id": 1}')  # frames etc. missing
    with pytest.raises(ValueError):
        p.parse_event("[1]")


# --- audio frames ----------------------------------------------------------------------------


def test_encode_float_frame_layout():
    data = p.encode_audio_frame(np.array([0.0, 1.0, -1.0, 0.5, 2.0, -3.0], dtype=np.float32))
    assert data[:4] == struct.pack("<I", 6) == b"\x06\x00\x00\x00"
    # 0.5 * 32767 = 16383.5 rounds (half to even) to 16384; out-of-range values are clipped.
    assert list(struct.unpack("<6h", data[4:])) == [0, 32767, -32767, 16384, 32767, -32767]
    assert data[4:] == bytes.fromhex("0000ff7f01800040ff7f0180")


def test_encode_rounds_not_truncates():
    data = p.encode_audio_frame(np.array([0.9999 / 32767, -1.6 / 32767], dtype=np.float64))
    assert struct.unpack("<2h", data[4:]) == (1, -2)


def test_encode_int16_unchanged():
    pcm = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    data = p.encode_audio_frame(pcm)
    assert len(data) == 4 + 10
    assert struct.unpack("<I5h", data) == (5, -32768, -1, 0, 1, 32767)
    big_endian = pcm.astype(">i2")  # encoded values, not bytes, are preserved
    assert p.encode_audio_frame(big_endian.astype(np.int16)) == data


def test_full_frame_round_trip():
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32768, size=p.FRAME_SAMPLES, dtype=np.int16)
    data = p.encode_audio_frame(pcm)
    assert len(data) == 4 + 2 * 1920
    out = p.decode_audio_frame(data)
    assert out.dtype == np.int16 and out.shape == (1920,)
    np.testing.assert_array_equal(out, pcm)
    out[0] = 1  # a writable copy, not a view of the message
    np.testing.assert_array_equal(p.decode_audio_frame(memoryview(data)), pcm)


def test_decode_rejects_bad_prefix():
    good = p.encode_audio_frame(np.zeros(4, dtype=np.int16))
    with pytest.raises(ValueError):
        p.decode_audio_frame(good[:-1])  # truncated
    with pytest.raises(ValueError):
        p.decode_audio_frame(good + b"\x00\x00")  # extra sample
    with pytest.raises(ValueError):
        p.decode_audio_frame(struct.pack("<I", 5) + good[4:])  # wrong count
    with pytest.raises(ValueError):
        p.decode_audio_frame(b"\x01\x00")  # no prefix
    assert p.decode_audio_frame(struct.pack("<I", 0)).shape == (0,)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        p.encode_audio_frame(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(TypeError):
        p.encode_audio_frame(np.zeros(4, dtype=np.int32))

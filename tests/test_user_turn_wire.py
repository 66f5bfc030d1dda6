"""`user_turn` on the wire and its loading (issue 21), without a model: the parser, the docs'
tables against the code, and the checks a caller's audio and words go through before the call
is touched."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vendor_dia2.checkpoint import resolve, tokenizer_location
from vendor_dia2.config import Dia2Config
from vendor_dia2.tokenizer import Dia2Tokenizer

from dia2stream.call.user_turn import CALLER_TAG, load_user_turn
from dia2stream.serve.limits import parse_large
from dia2stream.wire import protocol as p
from dia2stream.wire.formats import ulaw_encode

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def message(audio: bytes, fmt: str = "wav", transcript: str = "yes it is", **fields) -> str:
    return json.dumps({"cmd": "user_turn", "audio": base64.b64encode(audio).decode(), "format": fmt,
                       "transcript": transcript, **fields})


def wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    files = resolve("tiny")
    return Dia2Tokenizer.from_dir(tokenizer_location(files, Dia2Config.from_file(files.config)))


def test_user_turn_parses_with_its_words_and_round_trips():
    words = [{"word": "yes", "start_s": 0.1, "end_s": 0.3}, {"word": "it", "start_s": 0.4, "end_s": 0.5},
             {"word": "is", "start_s": 0.6, "end_s": 0.8}]
    cmd = p.parse_command(message(wav(tone(1.0, 16_000), 16_000), words=words, id=7))
    assert isinstance(cmd, p.UserTurn) and cmd.format == "wav" and cmd.id == 7
    assert [w.word for w in cmd.words] == ["yes", "it", "is"] and cmd.words[1].start_s == 0.4
    assert p.parse_command(p.command_to_json(cmd)) == cmd


@pytest.mark.parametrize("fields, says", [
    ({"format": "mp3"}, "format"),
    ({"audio": "@@@"}, "base64"),
    ({"transcript": "  "}, "empty"),
    ({"words": []}, "words"),
    ({"words": [{"word": "a", "start_s": 0.5}]}, "exactly"),
    ({"words": [{"word": "a", "start_s": 0.5, "end_s": 0.2}]}, "in order"),
    ({"words": [{"word": "a", "start_s": float("nan"), "end_s": 0.2}]}, "start_s"),
    ({"words": "yes it is"}, "list"),
])
def test_malformed_user_turns_are_invalid_field(fields, says):
    obj = json.loads(message(b"\x01\x02" * 100, "pcm_8000"))
    obj.update(fields)
    with pytest.raises(p.ProtocolError) as caught:
        p.parse_command(json.dumps(obj))
    assert caught.value.code == "invalid_field" and says in caught.value.message
    assert caught.value.cmd == "user_turn"


def test_a_large_user_turn_passes_the_large_message_gate():
    cmd = parse_large(message(bytes(ulaw_encode((tone(20.0, 8_000) * 32767).astype(np.int16))), "ulaw_8000"))
    assert isinstance(cmd, p.UserTurn)


def test_docs_user_turn_fields_are_the_parsers_fields():
    section = DOCS.read_text().split("### `user_turn`", 1)[1].split("\n### ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert documented == list(p._COMMANDS["user_turn"][1])
    for fmt in p.USER_TURN_FORMATS:
        assert f"`{fmt}`" in section


def test_docs_events_table_lists_every_event():
    section = DOCS.read_text().split("## Events", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert documented == set(p.EVENT_TYPES)


def test_words_are_placed_on_the_callers_frames_as_s2(tokenizer):
    cmd = p.parse_command(message(wav(tone(3.0, 24_000), 24_000)))
    loaded = load_user_turn(cmd, tokenizer, max_seconds=30)
    assert loaded.frames == 38 and loaded.words == ["yes", "it", "is"]
    assert loaded.entries[0].tokens[: len(tokenizer.encode(CALLER_TAG))] == tuple(tokenizer.encode(CALLER_TAG))
    assert list(loaded.steps) == sorted(loaded.steps) and loaded.steps[-1] < loaded.frames


def test_stt_word_times_are_used_when_given(tokenizer):
    words = [{"word": "yes", "start_s": 0.8, "end_s": 1.0}, {"word": "it", "start_s": 1.6, "end_s": 1.8},
             {"word": "is", "start_s": 2.4, "end_s": 2.6}]
    loaded = load_user_turn(p.parse_command(message(wav(tone(3.0, 16_000), 16_000), words=words)), tokenizer, 30)
    assert list(loaded.steps) == [9, 19, 29]  # round(start_s x 12.5) - 1: each word's new-word step


@pytest.mark.parametrize("audio, fmt, fields, code, says", [
    (wav(tone(3.0, 16_000), 16_000), "wav", {"transcript": "a b c"}, None, None),
    (wav(tone(31.0, 8_000), 8_000), "wav", {}, "bad_audio", "limit"),
    (bytes(ulaw_encode((tone(31.0, 8_000) * 32767).astype(np.int16))), "ulaw_8000", {}, "bad_audio", "limit"),
    (bytes(640), "pcm_8000", {}, "bad_audio", "silent"),
    (wav(tone(0.3, 16_000), 16_000), "wav", {"transcript": "one two three four five six seven"},
     "invalid_field", "do not fit"),
    (wav(tone(2.0, 16_000), 16_000), "wav", {"words": [{"word": "yes", "start_s": 0.1, "end_s": 0.2}]},
     "invalid_field", "transcript has 3"),
])
def test_loading_refuses_what_does_not_fit_with_a_coded_error(tokenizer, audio, fmt, fields, code, says):
    cmd = p.parse_command(message(audio, fmt, **fields))
    if code is None:
        assert load_user_turn(cmd, tokenizer, 30).words == ["a", "b", "c"]
        return
    with pytest.raises(p.ProtocolError) as caught:
        load_user_turn(cmd, tokenizer, 30)
    assert (caught.value.code, caught.value.cmd) == (code, "user_turn") and says in caught.value.message

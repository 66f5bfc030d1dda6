"""The compatible-API adapters without a server or a model: what they ask of the call for each
client message, and what they send for each call event (dia2stream/wire/compat/)."""

from __future__ import annotations

import base64
import importlib.util
import json

import numpy as np
import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from dia2stream.call.call import AudioFrame
from dia2stream.serve.http import HttpGate, HttpPolicy
from dia2stream.wire import protocol as p
from dia2stream.wire.compat import adapter_for
from dia2stream.wire.compat.audio import StreamEncoder, parse_elevenlabs_format
from dia2stream.wire.compat.base import Close, Later, Send, Submit
from dia2stream.wire.compat.contexts import KEEP_ENDED_CONTEXTS
from dia2stream.wire.compat.deepgram import DeepgramAdapter
from dia2stream.wire.compat.elevenlabs import ElevenLabsAdapter

FRAME = np.zeros(1920, np.float32)


def frame(epoch=0):
    return AudioFrame(FRAME, epoch, 0)


def run(actions):
    """Carry out Later actions as the session's sender does; the flat list of the rest."""
    out = []
    for action in actions:
        out += run(action.run()) if isinstance(action, Later) else [action]
    return out


def sent(actions) -> list:
    return [json.loads(a.payload) if isinstance(a.payload, str) else a.payload
            for a in run(actions) if isinstance(a, Send)]


def commands(actions) -> list:
    return [a.command for a in actions if isinstance(a, Submit)]


def el(query="output_format=pcm_24000", voices=(), single=False) -> ElevenLabsAdapter:
    path = "/v1/text-to-speech/default/" + ("stream-input" if single else "multi-stream-input") + "?" + query
    return adapter_for(path, list(voices))


def test_routes():
    assert isinstance(el(), ElevenLabsAdapter) and not el().request.single
    assert el(single=True).request.single
    assert type(adapter_for("/tts/websocket?cartesia_version=x", [])).__name__ == "CartesiaAdapter"
    assert isinstance(adapter_for("/v1/speak?encoding=linear16", []), DeepgramAdapter)
    assert adapter_for("/", []) is None and adapter_for("/anything", []) is None


def test_elevenlabs_finishing_context_ends_with_isfinal_after_its_audio():
    a = el()
    acts = a.receive(json.dumps({"text": " ", "context_id": "c"}))
    assert commands(acts) == []
    (start,) = commands(a.receive(json.dumps({"text": "Hello there. ", "context_id": "c"})))
    # the context init's " " is kept for the next text (the call refuses whitespace-only text)
    assert isinstance(start, p.Start) and start.final is False and start.text == " Hello there. "
    (flush,) = commands(a.receive(json.dumps({"context_id": "c", "flush": True})))
    assert isinstance(flush, p.Flush)
    assert run(a.receive(json.dumps({"context_id": "c", "close_context": True}))) == []  # audio still to come
    a.translate(p.Started(id=start.id, position=0))
    a.translate(p.Word(id=start.id, word="Hello", start_s=0.0, frame=0))
    (audio,) = sent(a.translate(frame()))
    assert audio["contextId"] == "c" and base64.b64decode(audio["audio"])
    assert audio["alignment"]["chars"][:5] == list("Hello")
    final = sent(a.translate(p.Done(id=start.id, frames=1, audio_s=0.08, wall_s=0.1)))
    assert final[-1] == {"isFinal": True, "contextId": "c"}


def test_elevenlabs_close_without_flush_is_a_barge_in_and_the_next_context_waits_for_the_pause():
    a = el()
    (start,) = commands(a.receive(json.dumps({"text": "One two three. ", "context_id": "a"})))
    a.translate(p.Started(id=start.id, position=0))
    for _ in range(3):
        a.translate(frame())
    (pause,) = commands(a.receive(json.dumps({"context_id": "a", "close_context": True})))
    assert isinstance(pause, p.Pause) and pause.played_ms == 3 * 80
    assert commands(a.receive(json.dumps({"text": "Next. ", "context_id": "b"}))) == []  # not before the pause lands
    assert sent(a.translate(frame())) == []  # nothing more for the interrupted context
    (inject,) = commands(a.translate(p.Paused(id=pause.id, frames_sent=3, position=9, audio_s=0.24)))
    assert isinstance(inject, p.Inject) and inject.text == "Next. "


def test_elevenlabs_second_close_is_a_barge_in_and_an_out_of_range_rollback_resets():
    a = el()
    start, flush = commands(a.receive(json.dumps({"text": "Hi. ", "context_id": "a", "flush": True})))
    assert isinstance(flush, p.Flush)
    assert commands(a.receive(json.dumps({"context_id": "a", "close_context": True}))) == []  # finishing
    (pause,) = commands(a.receive(json.dumps({"context_id": "a", "close_context": True})))  # pipecat's interrupt
    assert isinstance(pause, p.Pause)
    a.receive(json.dumps({"text": "Again. ", "context_id": "b"}))
    acts = a.translate(p.ErrorEvent(code="invalid_field", message="out of range", id=pause.id))
    reset, start2 = commands(acts)
    assert isinstance(reset, p.Reset) and isinstance(start2, p.Start)  # afresh from the voice


def test_elevenlabs_alignment_spans():
    rel, syn = el(), el("output_format=pcm_24000&sync_alignment=true")
    for a in (rel, syn):
        (start,) = commands(a.receive(json.dumps({"text": "Hello big world. ", "context_id": "c"})))
        a.translate(p.Started(id=start.id, position=0))
    lead = sent(rel.translate(frame()))[0]
    assert lead["alignment"] is None  # before the first word: its time goes to the first word's message
    for word in ("Hello", "big"):
        rel.translate(p.Word(id=1, word=word, start_s=0.08, frame=1))
    first = sent(rel.translate(frame()))[0]["alignment"]
    assert first["chars"] == list("Hello ") + list("big ")
    assert first["charStartTimesMs"][0] == 80 and first["charStartTimesMs"][0] + sum(first["charDurationsMs"]) == 160
    silence = sent(rel.translate(frame()))[0]["alignment"]
    assert silence == {"chars": [" "], "charStartTimesMs": [0], "charDurationsMs": [80]}
    sent(syn.translate(frame()))
    syn.translate(p.Word(id=1, word="Hello", start_s=0.08, frame=1))
    absolute = sent(syn.translate(frame()))[0]["alignment"]
    assert absolute["charStartTimesMs"][0] == 80 and absolute["chars"][-1] == " "
    assert sent(syn.translate(frame()))[0]["alignment"]["chars"] == []


def test_elevenlabs_limits_and_refusals():
    a = el()
    for i in range(5):
        assert not sent(a.receive(json.dumps({"text": " ", "context_id": f"k{i}"})))
    (err,) = sent(a.receive(json.dumps({"text": " ", "context_id": "k5"})))
    assert err["error"] == "max_active_conversations" and err["contextId"] == "k5"
    bad = el(voices=["alice"], query="output_format=pcm_24000").opening()
    assert bad == []
    refused = adapter_for("/v1/text-to-speech/bob/multi-stream-input", ["alice"]).opening()
    assert json.loads(refused[0].payload)["error"] == "voice_not_found" and isinstance(refused[1], Close)
    assert json.loads(el("output_format=pcm_24000&inactivity_timeout=500").opening()[0].payload)["error"] == \
        "invalid_inactivity_timeout"


def test_single_stream_ends_with_isfinal_and_a_close():
    a = el(single=True)
    (start,) = commands(a.receive(json.dumps({"text": "Hi there. ", "try_trigger_generation": True})))
    acts = a.receive(json.dumps({"text": ""}))
    assert [type(c) for c in commands(acts)] == [p.Flush]
    out = run(a.translate(p.Done(id=start.id, frames=0, audio_s=0, wall_s=0)))
    assert json.loads(out[-2].payload) == {"isFinal": True} and isinstance(out[-1], Close) and out[-1].code == 1000


def test_deepgram_flush_clear_close():
    a = DeepgramAdapter({"encoding": "linear16", "sample_rate": "16000"}, [])
    assert json.loads(a.opening()[0].payload)["type"] == "Metadata"
    (start,) = commands(a.receive(json.dumps({"type": "Speak", "text": "Hello."})))
    (flush,) = commands(a.receive(json.dumps({"type": "Flush"})))
    a.translate(p.Started(id=start.id, position=0))
    (chunk,) = sent(a.translate(frame()))
    assert isinstance(chunk, bytes)
    out = sent(a.translate(p.Done(id=start.id, frames=1, audio_s=0.08, wall_s=0.1)))
    assert out[-1] == {"type": "Flushed", "sequence_id": 1}
    (inject,) = commands(a.receive(json.dumps({"type": "Speak", "text": "More words."})))
    a.translate(frame())
    acts = a.receive(json.dumps({"type": "Clear"}))
    assert isinstance(commands(acts)[0], p.Pause) and sent(acts)[-1]["type"] == "Cleared"


def test_stream_encoder_lengths():
    n = 25
    for name, per_frame_bytes in (("pcm_16000", 2560), ("ulaw_8000", 640), ("pcm_44100", 7056)):
        enc = StreamEncoder(parse_elevenlabs_format(name))
        data = b"".join(enc.encode(np.sin(np.arange(1920) / 7).astype(np.float32)) for _ in range(n)) + enc.finish()
        assert abs(len(data) - n * per_frame_bytes) <= per_frame_bytes // 80, name  # within a millisecond
    with pytest.raises(ValueError, match="not supported"):
        parse_elevenlabs_format("opus_48000_32")


@pytest.mark.skipif(importlib.util.find_spec("lameenc") is None, reason="MP3 needs lameenc (the [compat] extra)")
def test_mp3_stream():
    enc = StreamEncoder(parse_elevenlabs_format("mp3_22050_32"))
    data = b"".join(enc.encode(FRAME) for _ in range(25)) + enc.finish()
    assert data[:2] in (b"\xff\xf3", b"\xff\xf2", b"\xff\xfb") or data[:3] == b"ID3"
    assert abs(len(data) - 2.0 * 32000 / 8) < 1000  # 2 s at 32 kbit/s


def test_gate_takes_each_apis_key_header():
    gate = HttpGate(HttpPolicy(auth_token="t0k"), health=dict)

    def req(**headers):
        return Request("/v1/speak", Headers(list(headers.items())))

    for good in ({"xi-api-key": "t0k"}, {"X-API-Key": "t0k"}, {"Authorization": "Token t0k"},
                 {"Authorization": "Bearer t0k"}):
        assert gate.respond(req(**good)) is None, good
    for bad in ({"xi-api-key": "nope"}, {"Authorization": "Basic t0k"}, {}):
        assert gate.respond(req(**bad)).status_code == 401, bad


def test_mp3_without_lameenc_is_refused_clearly(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lameenc" else real(name, *a))
    with pytest.raises(ValueError, match="no MP3 encoder"):
        parse_elevenlabs_format("mp3_44100_128")
    refused = adapter_for("/v1/text-to-speech/default/multi-stream-input", []).opening()  # the default is MP3
    assert json.loads(refused[0].payload)["error"] == "invalid_output_format"


def test_an_adapter_fault_is_answered_not_raised():
    from dia2stream.serve.compat_session import CompatSession

    class Broken(DeepgramAdapter):
        def receive(self, message):
            raise RuntimeError("boom")

    class Metrics:
        def error(self, code):
            self.code = code

    class Server:
        engine = limits = None
        metrics = Metrics()

    session = CompatSession(Server(), ws=None, adapter=Broken({}, []))
    session.call = type("Call", (), {"slot": type("Slot", (), {"index": 0})()})()
    (reply,) = session._guarded(session.adapter.receive, "{}")
    assert json.loads(reply.payload)["err_code"] == "internal_error" and Server.metrics.code == "internal_error"


def test_long_text_goes_out_in_commands_the_call_accepts_and_a_refused_start_is_undone():
    a = el()
    text = ("word " * 2000).strip() + ". "
    cmds = commands(a.receive(json.dumps({"text": text, "context_id": "c"})))
    assert isinstance(cmds[0], p.Start) and all(isinstance(c, p.Inject) for c in cmds[1:])
    assert "".join(c.text for c in cmds) == text and max(len(c.text) for c in cmds) <= p.MAX_TEXT_CHARS
    b = el()
    (start,) = commands(b.receive(json.dumps({"text": "Hi. ", "context_id": "c"})))
    (err,) = sent(b.translate(p.ErrorEvent(code="pending_text_full", message="too much", cmd="start", id=start.id)))
    assert err["error"] == "pending_text_full" and err["contextId"] == "c"
    (again,) = commands(b.receive(json.dumps({"text": "Hello. ", "context_id": "c"})))
    assert isinstance(again, p.Start)


# -- lone surrogates, call resets, idle contexts ----------------------------------------------------

SURROGATE = '"Hello \\ud800 there. "'  # JSON text with a lone surrogate escape, as a client may write it
CARTESIA_FIELDS = {"voice": {"mode": "id", "id": "default"},
                   "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000}}


def cartesia():
    from dia2stream.wire.compat.cartesia import CartesiaAdapter

    return CartesiaAdapter({}, [])


def cartesia_msg(cid: str, transcript: str = "", more: bool = True, **fields) -> str:
    return json.dumps({"context_id": cid, "transcript": transcript, "continue": more, **CARTESIA_FIELDS, **fields})


def deepgram():
    return DeepgramAdapter({"encoding": "linear16", "sample_rate": "16000"}, [])


def test_a_lone_surrogate_is_refused_as_a_bad_message_and_the_connection_speaks_on():
    cases = [  # (adapter, message holding a surrogate, what its error must look like, a good message after)
        (el(), '{"text": %s, "context_id": "s"}' % SURROGATE,
         lambda e: e["error"] == "invalid_message" and e["contextId"] == "s",
         json.dumps({"text": "Fine. ", "context_id": "s"})),
        (el(single=True), '{"text": %s}' % SURROGATE, lambda e: e["error"] == "invalid_message",
         json.dumps({"text": "Fine. "})),
        (cartesia(), cartesia_msg("s").replace('"transcript": ""', '"transcript": ' + SURROGATE),
         lambda e: e["type"] == "error" and e["title"] == "invalid_message" and e["context_id"] == "s",
         cartesia_msg("s", "Fine. ")),
        (deepgram(), '{"type": "Speak", "text": %s}' % SURROGATE,
         lambda e: e["type"] == "Error" and e["err_code"] == "INVALID_MESSAGE",
         json.dumps({"type": "Speak", "text": "Fine."})),
        (el(), '{"text": "Hi. ", "context_id": "\\udc00"}',  # anywhere in the message, ids included
         lambda e: e["error"] == "invalid_message" and "contextId" not in e,
         json.dumps({"text": "Hi. ", "context_id": "c"})),
    ]
    for adapter, bad, is_refusal, good in cases:
        acts = adapter.receive(bad)
        (err,) = sent(acts)
        assert commands(acts) == [] and is_refusal(err), (bad, err)
        assert "surrogate" in json.dumps(err) and run(acts)[0].payload.encode("utf-8")  # it can be sent
        (start,) = commands(adapter.receive(good))
        assert isinstance(start, p.Start), bad


def test_a_call_reset_ends_its_context_and_the_next_one_starts_a_fresh_utterance():
    for code in ("internal_error", "context_full"):
        a = el()
        (start,) = commands(a.receive(json.dumps({"text": "One two. ", "context_id": "a"})))
        a.translate(p.Started(id=start.id, position=0))
        sent(a.translate(frame()))
        out = sent(a.translate(p.ErrorEvent(code=code, message="reset", id=start.id)))
        assert out[0]["error"] == code and out[0]["contextId"] == "a" and out[-1] == {"isFinal": True, "contextId": "a"}
        (again,) = commands(a.receive(json.dumps({"text": "Three. ", "context_id": "b"})))
        assert isinstance(again, p.Start), code  # an inject would be refused: the call has no utterance
        assert commands(a.receive(json.dumps({"text": "Four. ", "context_id": "a"}))) == []
        assert a.contexts["a"].waiting == ["Four. "]  # `a` had ended: its id opens a new context, behind `b`


def test_a_call_reset_names_the_context_speaking_not_the_one_that_started_the_turn():
    a = cartesia()
    start, _ = commands(a.receive(cartesia_msg("first", "Hello. ", more=False)))
    assert run(a.translate(p.Done(id=start.id, frames=3, audio_s=0.24, wall_s=0.3)))  # `first` is done
    inject, flush = commands(a.receive(cartesia_msg("second", "More words. ", more=False)))
    assert isinstance(inject, p.Inject)
    # the engine's error names its turn, which `first` started; the words lost were `second`'s
    out = sent(a.translate(p.ErrorEvent(code="internal_error", message="boom", id=start.id)))
    assert [m["type"] for m in out] == ["error", "done"] and {m["context_id"] for m in out} == {"second"}
    assert sent(a.translate(p.ErrorEvent(code="not_started", message="nothing to flush", cmd="flush",
                                         id=flush.id))) == []  # ours, sent before we knew of the reset
    assert isinstance(commands(a.receive(cartesia_msg("third", "Again. ", more=False)))[0], p.Start)


def test_deepgram_after_a_call_reset_answers_its_flush_speaks_again_and_close_closes():
    a = deepgram()
    (start,) = commands(a.receive(json.dumps({"type": "Speak", "text": "Hello."})))
    (flush,) = commands(a.receive(json.dumps({"type": "Flush"})))
    out = sent(a.translate(p.ErrorEvent(code="internal_error", message="boom", id=start.id)))
    assert out[0]["err_code"] == "internal_error" and out[-1] == {"type": "Flushed", "sequence_id": 1}
    assert sent(a.translate(p.ErrorEvent(code="not_started", message="x", cmd="flush", id=flush.id))) == []
    (again,) = commands(a.receive(json.dumps({"type": "Speak", "text": "Alive?"})))
    assert isinstance(again, p.Start)
    (flush2,) = commands(a.receive(json.dumps({"type": "Flush"})))
    a.translate(p.ErrorEvent(code="context_full", message="full", id=again.id))
    acts = a.receive(json.dumps({"type": "Close"}))
    assert isinstance(run(acts)[-1], Close) and commands(acts) == []  # no flush to a call with nothing to flush


def test_every_cartesia_error_names_a_context_as_pipecat_reads_them():
    a = cartesia()
    assert json.loads(a.refuse("busy", "all slots taken"))["context_id"] == ""  # before any context
    for bad in ("{bad", b"\x01\x02", json.dumps({"transcript": "hi"})):
        (err,) = sent(a.receive(bad))
        assert err["type"] == "error" and err["context_id"] == "", bad
    (start,) = commands(a.receive(cartesia_msg("c", "Speaking now. ")))
    for bad in ("{bad", b"\x01\x02", json.dumps({"transcript": "hi"})):
        (err,) = sent(a.receive(bad))
        assert err["context_id"] == "c", bad  # the context that has the floor
    assert json.loads(a.refuse("shutting_down", "bye"))["context_id"] == "c"
    (err,) = sent(a.receive(cartesia_msg("d", 5)))
    assert err["context_id"] == "d"  # the message's own


def test_pipecats_cartesia_receive_loop_takes_every_error_we_send():
    pytest.importorskip("pipecat.services.cartesia.tts")
    import asyncio

    from pipecat.services.cartesia.tts import CartesiaTTSService

    a = cartesia()
    errors = [a.refuse("busy", "all slots taken")] + [run(a.receive(bad))[0].payload
                                                       for bad in ("{bad", b"\x01", json.dumps({"transcript": "x"}))]
    service = CartesiaTTSService(api_key="k", url="ws://127.0.0.1:1/tts/websocket", sample_rate=24000,
                                 settings=CartesiaTTSService.Settings(voice="default"))

    class Socket:  # what `_process_messages` iterates
        async def __aiter__(self):
            for message in errors:
                yield message

    service._websocket = Socket()
    asyncio.run(service._process_messages())  # pipecat 1.14.0 reads msg["context_id"] first: a KeyError before


def test_a_flush_or_close_for_a_context_never_opened_opens_nothing():
    a = el()
    for msg in ({"context_id": "ghost", "flush": True}, {"context_id": "ghost", "text": "", "flush": True},
                {"context_id": "ghost", "close_context": True}, {"context_id": "ghost", "text": ""}):
        assert run(a.receive(json.dumps(msg))) == [], msg
    assert a.contexts == {}
    assert isinstance(commands(a.receive(json.dumps({"text": "Hello. ", "context_id": "real", "flush": True})))[0],
                      p.Start)


def test_a_context_given_no_text_does_not_hold_up_the_next():
    a = el()
    assert commands(a.receive(json.dumps({"text": " ", "context_id": "init-only"}))) == []
    (start,) = commands(a.receive(json.dumps({"text": "Hello there. ", "context_id": "ok"})))
    assert isinstance(start, p.Start) and start.id == a.contexts["ok"].serial
    a.receive(json.dumps({"context_id": "ok", "flush": True}))
    a.receive(json.dumps({"context_id": "ok", "close_context": True}))
    out = sent(a.translate(p.Done(id=start.id, frames=1, audio_s=0.08, wall_s=0.1)))
    assert out[-1] == {"isFinal": True, "contextId": "ok"}
    (inject,) = commands(a.receive(json.dumps({"text": "Later. ", "context_id": "init-only"})))
    assert isinstance(inject, p.Inject)  # it takes the floor once it has text


def test_an_idle_context_gives_up_the_floor_after_the_inactivity_timeout():
    now = [100.0]
    a = el("output_format=pcm_24000&inactivity_timeout=5")
    a.clock = lambda: now[0]
    assert a.tick_s and a.tick() == []
    (start,) = commands(a.receive(json.dumps({"text": "Hello. ", "context_id": "a"})))
    a.translate(p.Started(id=start.id, position=0))
    a.translate(frame())
    now[0] += 30
    assert a.tick() == []  # idle, but nobody waits for the floor
    assert commands(a.receive(json.dumps({"text": "Next one. ", "context_id": "b"}))) == []  # waits behind `a`
    now[0] += 4.9
    a.translate(frame())  # `a` still speaking: its audio keeps it from being idle
    now[0] += 4.9
    assert a.tick() == []
    now[0] += 0.2
    (flush,) = commands(a.tick())  # idle 5 s with `b` waiting: finished as if closed after a flush
    assert isinstance(flush, p.Flush) and flush.id == start.id
    out = run(a.translate(p.Done(id=start.id, frames=2, audio_s=0.16, wall_s=0.2)))
    assert {"isFinal": True, "contextId": "a"} in [json.loads(x.payload) for x in out if isinstance(x, Send)]
    (inject,) = commands(out)
    assert isinstance(inject, p.Inject) and inject.text == "Next one. "


def test_cartesia_contexts_follow_the_same_floor_rules():
    now = [0.0]
    a = cartesia()
    a.clock = lambda: now[0]
    assert commands(a.receive(cartesia_msg("empty"))) == []  # opened with no text: holds nothing up
    (start,) = commands(a.receive(cartesia_msg("a", "Hello. ")))
    assert a.active.id == "a"
    a.receive(cartesia_msg("b", "Then this. "))
    now[0] += 1.5  # the hosted service expires a context a second after its last audio
    (flush,) = commands(a.tick())
    out = run(a.translate(p.Done(id=start.id, frames=1, audio_s=0.08, wall_s=0.1)))
    assert json.loads([x for x in out if isinstance(x, Send)][-1].payload)["type"] == "done"
    assert [c.text for c in commands(out)] == ["Then this. "]


def test_audio_message_sizes_are_the_docs():
    """docs/compat.md's *Audio message sizes* table is what a stream of 80 ms frames becomes."""
    import re
    from pathlib import Path

    from dia2stream.wire.compat.audio import PCM_RATES, PCM_S16LE, StreamFormat

    table = (Path(__file__).parents[1] / "docs" / "compat.md").read_text().split("## Audio message sizes", 1)[1]
    rows = [tuple(map(int, row)) for row in re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", table, re.M)]
    assert [rate for rate, *_ in rows] == list(PCM_RATES)
    n = 10
    for rate, first, later, tail in rows:
        enc = StreamEncoder(StreamFormat(PCM_S16LE, rate))
        chunks = [enc.encode(np.sin(np.arange(1920) / 7).astype(np.float32)) for _ in range(n)] + [enc.finish()]

        def ms(data: bytes) -> int:
            return round(len(data) / 2 * 1000 / rate)

        assert (ms(chunks[0]), {ms(c) for c in chunks[1:-1]}, ms(chunks[-1])) == (first, {later}, tail), rate
        assert sum(map(len, chunks)) == n * rate * 80 // 1000 * 2, rate  # the frames' audio, to the sample


def test_a_long_call_does_not_keep_every_context_it_ever_had():
    a = el()
    for i in range(100):
        run(a.receive(json.dumps({"text": " ", "context_id": f"c{i}"})))
        run(a.receive(json.dumps({"context_id": f"c{i}", "close_context": True})))
    assert not a.contexts
    assert len(a.by_serial) <= KEEP_ENDED_CONTEXTS + 1

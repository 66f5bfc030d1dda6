"""End-to-end tests of the websockets server (docs/protocol.md) on the tiny checkpoint.

One real server runs for the module, on 127.0.0.1 with a free port, in a background thread with
its own event loop; each test talks to it as a client would. A second server with a small
context is started only by the context-limit test. Run with `-s` to see TTFA and frame times.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers import Client, FRAME_BYTES, LONG_TEXT, STEP_TIMEOUT, ServerThread, http_get, server_config, speak


pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------------------------
# Handshake, frames, latency
# ---------------------------------------------------------------------------------------------


async def test_ready_event_fields(server):
    client, ready = await Client.open(server.url)
    try:
        assert ready["event"] == "ready"
        assert ready["protocol"] == 1
        assert ready["model"] == "tiny"
        assert ready["sample_rate"] == 24000
        assert ready["frame_samples"] == 1920
        assert ready["frame_rate"] == 12.5
        assert ready["device"] == "cpu"
        assert ready["voices"] == []
        assert ready["max_text_chars"] == 4096
        assert ready["max_lead_ms"] == 1000
        assert ready["context_frames"] == 1500
    finally:
        await client.close()


async def test_frames_format_ttfa_and_frame_time(server):
    client, _ = await Client.open(server.url)
    try:
        t_sent = await client.send(cmd="start", text="[S1] Hello there.", id="t1")
        done = await client.until("done", id="t1")
    finally:
        await client.close()
    frames = [(t, data) for t, kind, data in client.items if kind == "frame"]
    assert frames, "no audio"
    pcm = []
    for _, data in frames:
        assert len(data) == FRAME_BYTES
        assert struct.unpack_from("<I", data)[0] == 1920
        pcm.append(np.frombuffer(data, "<i2", offset=4))
    assert np.abs(np.concatenate(pcm)).max() > 0, "all frames are silent"
    # started before the first frame, done after the last, and done counts what was sent
    kinds = [k if k == "frame" else e["event"] for _, k, e in client.items]
    assert kinds[0] == "started" and kinds[-1] == "done"
    assert done["frames"] == len(frames)
    assert done["audio_s"] == pytest.approx(len(frames) * 0.08)
    assert [w["word"] for w in client.events("word")] == ["Hello", "there."]
    assert all(w["id"] == "t1" for w in client.events("word"))

    ttfa_ms = (frames[0][0] - t_sent) * 1000
    gaps = np.diff([t for t, _ in frames]) * 1000
    print(f"\n[tiny/cpu] TTFA client {ttfa_ms:.0f} ms, server {done['ttfa_ms']} ms; {len(frames)} frames, "
          f"inter-frame {gaps.mean():.0f} ms mean / {np.median(gaps):.0f} ms median / {gaps.max():.0f} ms max; "
          f"wall {done['wall_s']:.2f} s for {done['audio_s']:.2f} s of audio (RTF {done['wall_s'] / done['audio_s']:.2f})")
    assert 0 < ttfa_ms < 5000
    assert 0 < done["ttfa_ms"] < 5000
    assert done["ttfa_ms"] <= ttfa_ms + 50  # the server's figure cannot exceed what the client saw


# ---------------------------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------------------------


async def test_inject_during_speech_extends_the_same_stream(server):
    client, _ = await Client.open(server.url)
    try:
        await client.send(cmd="start", text="[S1] Hello there friend.", id="a")
        await client.frames(1)  # speech is under way
        await client.send(cmd="inject", text=" And more words.", id="b")
        done = await client.until("done", id="b")
        assert await client.quiet(0.5) == []  # one done covers it all: nothing follows
    finally:
        await client.close()
    assert len(client.events("started")) == 1
    assert len(client.events("done")) == 1
    words = client.events("word")
    assert [(w["word"], w["id"]) for w in words] == [
        ("Hello", "a"), ("there", "a"), ("friend.", "a"), ("And", "b"), ("more", "b"), ("words.", "b")]
    assert [w["frame"] for w in words] == sorted(w["frame"] for w in words)
    assert done["frames"] == client.count("frame")
    assert all(w["frame"] < done["frames"] for w in words)
    # no gap: frames kept coming at generation pace across the inject
    gaps = np.diff(client.frame_times())
    assert gaps.max() < 2.0, f"gap of {gaps.max():.2f} s in the frame stream"


async def test_inject_after_done_continues_warm(server):
    client, _ = await Client.open(server.url)
    try:
        first = await speak(client, "[S1] Hi there.", id="one")
        assert first["frames"] > 0
        await client.send(cmd="inject", text=" Bye now.", id="two")
        second = await client.until("done", id="two")
    finally:
        await client.close()
    started = client.events("started")
    assert [s["id"] for s in started] == ["one", "two"]
    assert started[0]["position"] == 0
    assert started[1]["position"] > 0  # the same conversation, not a restart
    assert started[1]["position"] >= first["frames"]
    assert second["frames"] > 0 and second["ttfa_ms"] > 0
    second_words = [w for w in client.events("word") if w["id"] == "two"]
    assert [w["word"] for w in second_words] == ["Bye", "now."]
    print(f"\n[tiny/cpu] warm next-turn TTFA {second['ttfa_ms']} ms (first turn {first['ttfa_ms']} ms)")


# ---------------------------------------------------------------------------------------------
# pause / resume, streamed text, reset, start while generating
# ---------------------------------------------------------------------------------------------


async def test_pause_mid_utterance_sends_no_frame_after_paused(server):
    client, _ = await Client.open(server.url)
    try:
        await client.send(cmd="start", text=LONG_TEXT, id="u")
        await client.frames(3)
        await client.send(cmd="pause", id="p")
        paused = await client.until("paused", id="p")
        before = client.count("frame")
        late = await client.quiet(1.0)
        assert [k for _, k, _ in late if k == "frame"] == [], "audio frame after 'paused'"
        assert paused["frames_sent"] == before  # every frame sent came before `paused`
        assert paused["position"] > 0
        assert paused["audio_s"] == pytest.approx(before * 0.08)

        await client.send(cmd="resume", id="r")
        await client.until("resumed", id="r")
        assert client.count("frame") == before  # `resumed` comes before any further frame
        done = await client.until("done", id="u")
    finally:
        await client.close()
    assert client.count("frame") > before, "no audio after resume"
    assert done["frames"] == client.count("frame")
    assert [w["word"] for w in client.events("word")] == LONG_TEXT[5:].split()


async def test_after_a_barge_in_frames_are_counted_from_what_the_caller_heard(server):
    """`paused.frames_sent` is what the caller heard (`played_ms`), and `done.frames` counts on
    from there: every frame after the resume, numbered as its words are."""
    client, _ = await Client.open(server.url)
    try:
        await client.send(cmd="start", text=LONG_TEXT, id="u")
        await client.until("done", id="u")
        await client.send(cmd="pause", played_ms=400.0, id="p")
        paused = await client.until("paused", id="p")
        assert paused["frames_sent"] == 5 and paused["audio_s"] == pytest.approx(0.4)
        before = client.count("frame")
        await client.send(cmd="resume", id="r")
        done = await client.until("done", id="u")
        await client.send(cmd="pause", played_ms=0.0, id="again")
        again = await client.until("paused", id="again")
    finally:
        await client.close()
    resumed_frames = client.count("frame") - before
    assert resumed_frames > 0
    assert done["frames"] == 5 + resumed_frames
    assert done["audio_s"] == pytest.approx(done["frames"] * 0.08)
    assert again["frames_sent"] == 0


async def test_word_by_word_turn_holds_until_flush(server):
    client, _ = await Client.open(server.url)
    try:
        await client.send(cmd="start", text="[S1] Sure,", final=False, id="w")
        for word in (" let", " me", " check."):
            await asyncio.sleep(0.1)
            await client.send(cmd="inject", text=word, final=False)
        await client.until("word", word="check.")
        # all words are out; the turn's text is not final: the session must hold, not end.
        deadline = time.perf_counter() + 8.0
        while True:  # wait for a silent second (the delay tail may still be playing out)
            got = await client.quiet(1.0)
            assert not any(k == "event" and e["event"] in ("done", "error") for _, k, e in got), got
            if not got:
                break
            assert time.perf_counter() < deadline, "frames never stopped while holding"
        held = client.count("frame")
        await asyncio.sleep(0.5)
        assert await client.quiet(0.1) == []
        assert client.events("done") == []

        # pause while holding, end the text while paused, resume: the tail is spoken, then done
        await client.send(cmd="pause", id="p")
        await client.until("paused", id="p")
        await client.send(cmd="flush")
        assert await client.quiet(0.3) == []  # flush while paused neither resumes nor ends
        await client.send(cmd="resume", id="r")
        await client.until("resumed", id="r")
        done = await client.until("done", id="w", timeout=20.0)
    finally:
        await client.close()
    assert client.count("frame") > held, "no tail after flush"
    assert done["frames"] == client.count("frame")
    assert len(client.events("started")) == 1
    assert [w["word"] for w in client.events("word")] == ["Sure,", "let", "me", "check."]


async def test_reset_stops_and_forgets(server):
    client, _ = await Client.open(server.url)
    try:
        await client.send(cmd="start", text=LONG_TEXT, id="u")
        await client.frames(2)
        await client.send(cmd="reset", id="r")
        reset = await client.until("reset", id="r")
        assert reset == {"event": "reset", "id": "r"}
        after = await client.quiet(0.7)
        assert [k for _, k, _ in after if k == "frame"] == [], "audio after 'reset'"
        assert client.events("done") == []
        await client.send(cmd="inject", text=" more", id="i")
        error = await client.event()
        assert (error["event"], error["code"], error["cmd"], error["id"]) == ("error", "not_started", "inject", "i")
    finally:
        await client.close()


async def test_start_while_generating_is_busy(server):
    client, _ = await Client.open(server.url)
    try:
        await client.send(cmd="start", text=LONG_TEXT, id="a")
        await client.frames(1)
        await client.send(cmd="start", text="[S1] Something else.", id="b")
        error = await client.until("error", code="busy")
        assert (error["cmd"], error["id"]) == ("start", "b")
        await client.frames(2)  # the first utterance goes on
        await client.send(cmd="reset")
        await client.until("reset")
    finally:
        await client.close()
    assert [s["id"] for s in client.events("started")] == ["a"]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

BAD_MESSAGES = [  # (message, code, cmd echoed, id echoed)
    ("this is not json", "invalid_json", None, None),
    ('["start", "[S1] hi"]', "invalid_message", None, None),
    ('"start"', "invalid_message", None, None),
    ('{"text": "[S1] hi", "id": "m1"}', "invalid_message", None, "m1"),
    ('{"cmd": 7, "id": "m2"}', "invalid_message", None, "m2"),
    ('{"cmd": "dance", "id": "m3"}', "unknown_command", "dance", "m3"),
    ('{"cmd": "start", "text": 5, "id": "m4"}', "invalid_field", "start", "m4"),
    ('{"cmd": "start", "text": "[S1] hi", "final": "no", "id": "m5"}', "invalid_field", "start", "m5"),
    ('{"cmd": "start", "text": "[S1] hi", "seed": true, "id": "m6"}', "invalid_field", "start", "m6"),
    ('{"cmd": "start", "text": "[S1] hi", "temperature": "hot", "id": "m7"}', "invalid_field", "start", "m7"),
    ('{"cmd": "start", "id": "m8"}', "invalid_field", "start", "m8"),
    ('{"cmd": "start", "text": "[S1] hi", "colour": "red", "id": "m9"}', "invalid_field", "start", "m9"),
    ('{"cmd": "start", "text": "[S1] hi", "id": [1]}', "invalid_field", "start", None),
    ('{"cmd": "start", "text": "", "id": "m10"}', "empty_text", "start", "m10"),
    ('{"cmd": "inject", "text": "   ", "id": "m11"}', "empty_text", "inject", "m11"),
    ('{"cmd": "start", "text": "[S1] [S2]", "id": "m17"}', "empty_text", "start", "m17"),  # no word to speak
    (json.dumps({"cmd": "start", "text": "[S1] " + "a" * 4096, "id": "m12"}), "text_too_long", "start", "m12"),
    (b"\x00\x01binary", "binary_not_supported", None, None),
    ('{"cmd": "inject", "text": " hello", "id": "m13"}', "not_started", "inject", "m13"),
    ('{"cmd": "resume", "id": "m14"}', "not_started", "resume", "m14"),
    ('{"cmd": "flush", "id": "m15"}', "not_started", "flush", "m15"),
]


async def test_bad_input_gets_specific_errors_and_session_keeps_working(server):
    client, _ = await Client.open(server.url)
    try:
        for message, code, cmd, cid in BAD_MESSAGES:
            await client.send_raw(message)
            error = await client.event()
            assert error["event"] == "error", (message, error)
            assert error["code"] == code, (message, error)
            assert error.get("cmd") == cmd, (message, error)
            assert error.get("id") == cid, (message, error)
            assert isinstance(error["message"], str) and error["message"]
        # the connection and the session still work
        await client.send(cmd="ping", id=99)
        assert await client.event() == {"event": "pong", "id": 99}
        done = await speak(client, "[S1] Still here.", id="ok")
        assert done["frames"] == client.count("frame") > 0
        # resume when not paused (an utterance exists, it is done)
        await client.send(cmd="resume", id="m16")
        error = await client.event()
        assert (error["code"], error["cmd"], error["id"]) == ("not_paused", "resume", "m16")
        # errors keep their place in the event order: a bad message sent right after `start`
        # is answered after that start's `started`
        await client.send(cmd="start", text="[S1] Ok.", id="again")
        await client.send_raw("{oops")
        order = []
        while len(order) < 2:
            _, kind, event = await client.next()
            if kind == "event":
                order.append(event["event"])
        assert order == ["started", "error"]
        await client.until("done", id="again")
    finally:
        await client.close()


# ---------------------------------------------------------------------------------------------
# Connections: disconnect, busy, health
# ---------------------------------------------------------------------------------------------


async def wait_not_busy(port: int, timeout: float = 3.0) -> None:
    deadline = time.perf_counter() + timeout
    while (await asyncio.to_thread(http_get, port))[2]["busy"]:
        assert time.perf_counter() < deadline, "session still busy after the client left"
        await asyncio.sleep(0.02)


async def test_disconnect_mid_stream_then_reconnect(server):
    old, _ = await Client.open(server.url)
    await old.send(cmd="start", text=LONG_TEXT, id="old")
    await old.frames(2)
    old.ws.transport.abort()  # vanish without a close handshake
    await wait_not_busy(server.port)

    new, ready = await Client.open(server.url)
    try:
        assert ready["event"] == "ready"
        leaked = await new.quiet(0.5)
        assert leaked == [], f"the old utterance leaked into the new connection: {leaked}"
        # nothing of the old connection's state: pause reports no utterance, inject is refused
        await new.send(cmd="pause")
        paused = await new.event()
        assert paused["event"] == "paused" and paused["frames_sent"] == 0 and "id" not in paused
        await new.send(cmd="inject", text=" more")
        assert (await new.event())["code"] == "not_started"
        done = await speak(new, "[S1] Hi again.", id="new")
    finally:
        await new.close()
    assert new.events("started")[0]["position"] == 0  # a fresh conversation
    assert done["frames"] == new.count("frame") > 0
    assert all(e.get("id") != "old" for e in new.events())


async def test_second_client_is_busy_and_first_keeps_working(server):
    first, _ = await Client.open(server.url)
    try:
        await first.send(cmd="start", text="[S1] Hello again.", id="f")
        await first.frames(1)
        second = await connect(server.url, open_timeout=STEP_TIMEOUT)
        try:
            message = json.loads(await asyncio.wait_for(second.recv(), STEP_TIMEOUT))
            assert message["event"] == "error" and message["code"] == "busy"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(second.recv(), STEP_TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        finally:
            await second.close()
        done = await first.until("done", id="f")
        assert done["frames"] == first.count("frame")
    finally:
        await first.close()


async def test_health(server):
    await wait_not_busy(server.port)
    status, content_type, body = await asyncio.to_thread(http_get, server.port)
    assert status == 200 and content_type == "application/json"
    assert {k: body[k] for k in ("status", "model", "device", "busy", "calls", "max_calls", "overloaded")} == \
        {"status": "ok", "model": "tiny", "device": "cpu", "busy": False, "calls": 0, "max_calls": 1,
         "overloaded": False}
    assert isinstance(body["step_ms"], float)
    client, _ = await Client.open(server.url)
    try:
        status, _, body = await asyncio.to_thread(http_get, server.port)
        assert status == 200 and body["busy"] is True
    finally:
        await client.close()
    await wait_not_busy(server.port)


# ---------------------------------------------------------------------------------------------
# Context limit (its own small server)
# ---------------------------------------------------------------------------------------------


async def test_a_full_context_rolls_over_and_the_utterance_goes_on():
    srv = await asyncio.to_thread(ServerThread(server_config(context_frames=40, log_level="WARNING")).start)
    try:
        client, ready = await Client.open(srv.url)
        try:
            assert ready["context_frames"] == 40
            words = [f"word{i}" for i in range(30)]
            done = await speak(client, "[S1] " + " ".join(words) + ".", id="long")
            assert client.events("error") == []
            assert [e["word"] for e in client.events("word")] == words[:-1] + [words[-1] + "."]
            assert done["frames"] > 40  # longer than the context: it was rebuilt on the way
            frames = [e for e in client.items if e[1] == "frame"]
            assert len(frames) == done["frames"]
        finally:
            await client.close()
    finally:
        await asyncio.to_thread(srv.stop)


async def test_context_full_resets_and_keeps_working_when_rollover_is_off():
    srv = await asyncio.to_thread(ServerThread(server_config(context_frames=40, rollover_frames=0,
        log_level="WARNING")).start)
    try:
        client, ready = await Client.open(srv.url)
        try:
            assert ready["context_frames"] == 40
            words = " ".join(f"word{i}" for i in range(30))
            await client.send(cmd="start", text=f"[S1] {words}.", id="long")
            error = await client.until("error", code="context_full")
            assert error["id"] == "long"
            assert (await client.event())["event"] == "reset"
            assert client.events("done") == []
            assert await client.quiet(0.3) == []
            await client.send(cmd="inject", text=" more")
            assert (await client.event())["code"] == "not_started"
            done = await speak(client, "[S1] Hi.", id="short")
            assert done["frames"] > 0
            assert client.events("started")[-1]["position"] == 0
        finally:
            await client.close()
    finally:
        await asyncio.to_thread(srv.stop)


# --- hostile strings through the server: coded errors, the call goes on -----------------------------

async def test_lone_surrogate_in_id_and_cmd_gets_an_error_and_the_connection_lives(server):
    client, _ = await Client.open(server.url)
    try:
        # Finding 1: this used to abort the connection without a close frame.
        await client.send_raw('{"cmd": "\\ud800", "id": "\\ud800"}')
        error = await client.event()
        assert error["event"] == "error" and error["code"] == "invalid_field" and "'cmd'" in error["message"]
        assert "id" not in error
        await client.send_raw('{"cmd": "ping", "id": "\\udfff"}')
        error = await client.event()
        assert error["code"] == "invalid_field" and "'id'" in error["message"]
        await client.send(cmd="ping", id="still-here")
        assert await client.event() == {"event": "pong", "id": "still-here"}
    finally:
        await client.close()


async def test_lone_surrogate_in_inject_during_speech_keeps_the_utterance(server):
    client, _ = await Client.open(server.url)
    try:
        await client.send(cmd="start", text=LONG_TEXT, id="utt")
        await client.until("started", id="utt")
        await client.frames(2)
        # Finding 2: this used to end the utterance with internal_error carrying "utt".
        await client.send_raw('{"cmd": "inject", "text": " more \\ud800 words", "id": "inj"}')
        while True:
            _, kind, payload = await client.next()
            if kind == "event" and payload["event"] == "error":
                break
            assert not (kind == "event" and payload["event"] in ("done", "reset")), payload
        assert payload["code"] == "invalid_field" and payload["id"] == "inj" and payload["cmd"] == "inject"
        assert "'text'" in payload["message"]
        done = await client.until("done", id="utt")
        assert done["frames"] > 2
    finally:
        await client.close()

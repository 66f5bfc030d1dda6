"""Many calls on one engine (issue 10) and the decoder-only lane (issue 12), on the tiny checkpoint.

In-process tests drive `Engine` with queue sinks; the websocket tests run the real server with
`--max-calls 4` and talk to it as clients would.
"""

from __future__ import annotations

import asyncio
import json
import queue

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from dia2stream.wire import protocol as p
from dia2stream.call.call import AudioFrame
from dia2stream.engine.engine import Engine

from helpers import ServerThread, engine_config, server_config
from vendor_dia2.runtime import SamplingParams
from vendor_dia2.script import parse_script


pytestmark = pytest.mark.slow

TEXTS = ["[S1] Hello there, how are you?", "[S1] Good morning to you.", "[S1] One two three.",
         "[S1] Thanks for calling today."]


@pytest.fixture(scope="module")
def small_tts(tiny_dir):
    from vendor_dia2 import Dia2

    return Dia2.from_pretrained(str(tiny_dir), device="cpu", mimi="random-small")


# ---------------------------------------------------------------------------------------------
# The stepper: slots are independent
# ---------------------------------------------------------------------------------------------


def _slot_state(stepper, call: int) -> list[torch.Tensor]:
    return list(stepper.slot_tensors(call).values())


def _cache_keys(stepper, call: int, length: int) -> list[torch.Tensor]:
    """The decoder keys of a slot's first `length` cache slots, per layer."""
    tensors = stepper.slot_tensors(call)
    return [t[:, :, :length] for name, t in tensors.items() if name.startswith("decoder_cache.") and name.endswith(".k")]


def _steps(stepper, machines, active, count):
    for _ in range(count):
        choices = [m.preview(stepper.position(i)) if active[i] else None for i, m in enumerate(machines)]
        actions = stepper.step(choices, active)
        for i, m in enumerate(machines):
            if active[i]:
                m.process(stepper.position(i) - 1, actions[i])


def test_slot_reset_snapshot_restore_prefill_leave_other_slots_bit_identical(small_tts):
    stepper = small_tts.new_stepper(n_calls=3, cfg=True, max_positions=64)
    machines = []
    for call in range(3):
        stepper.set_sampling(call, SamplingParams(seed=call))
        m = small_tts.new_state_machine()
        m.push(parse_script(TEXTS[call], small_tts.tokenizer))
        machines.append(m)
    _steps(stepper, machines, [True] * 3, 6)
    valid = {call: _cache_keys(stepper, call, 6) for call in (0, 2)}
    snap = stepper.snapshot(1)
    _steps(stepper, machines, [False, True, False], 3)  # only slot 1 advances
    # an inactive slot's cache may take a write past its position (overwritten by its next real
    # step); everything it holds up to its position is untouched
    for call, before in valid.items():
        assert all(torch.equal(b, a) for b, a in zip(before, _cache_keys(stepper, call, 6)))
    others = {call: _slot_state(stepper, call) for call in (0, 2)}
    stepper.restore(snap, 1)
    d = small_tts.config.data
    frames = 10
    delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay), generator=torch.Generator().manual_seed(1))
    stepper.prefill(1, delayed, torch.full((frames + 1, 2), d.text_pad_token_id), frames)
    stepper.reset_call(1)
    for call, before in others.items():
        after = _slot_state(stepper, call)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), f"slot {call} changed"
    assert stepper.position(0) == stepper.position(2) == 6


def test_inactive_slots_do_not_advance_and_active_ones_match_running_alone(small_tts):
    """A slot's tokens do not depend on what the other slots do (same padded batch size)."""
    def run(active_others: bool):
        stepper = small_tts.new_stepper(n_calls=3, cfg=True, max_positions=64, batch_sizes=(3,))
        machines = []
        for call in range(3):
            stepper.set_sampling(call, SamplingParams(seed=10 + call))
            m = small_tts.new_state_machine()
            m.push(parse_script(TEXTS[call], small_tts.tokenizer))
            machines.append(m)
        active = [True, active_others, active_others]
        _steps(stepper, machines, active, 25)
        return stepper, machines

    alone, m_alone = run(False)
    crowd, m_crowd = run(True)
    assert [alone.position(c) for c in range(3)] == [25, 0, 0]
    assert torch.equal(alone.written_codes(1), torch.full_like(alone.written_codes(1), -2))  # never written
    assert [crowd.position(c) for c in range(3)] == [25, 25, 25]
    assert torch.equal(alone.written_codes(0), crowd.written_codes(0))
    assert m_alone[0].transcript == m_crowd[0].transcript


@pytest.mark.parametrize("prefix", [None, "upstream", "clean"])
@pytest.mark.parametrize("cfg", [False, True])
def test_decoder_only_lane_gives_the_same_tokens_as_the_full_step(small_tts, prefix, cfg):
    """Steps whose depformer codes nothing reads may skip the depformer: same actions, text,
    buffer, next inputs, for a fresh call and after a prefix with either boundary (the clean one
    teacher-forces the codes after the prefix; upstream's samples them, so they are read)."""
    d = small_tts.config.data

    def run(skip: bool):
        stepper = small_tts.new_stepper(cfg=cfg, max_positions=96)
        stepper.skip_unread_stages = skip
        stepper.set_sampling(0, SamplingParams(seed=3, cfg_scale=2.0 if cfg else 1.0))
        machine = small_tts.new_state_machine()
        start = 0
        if prefix:
            frames = 12
            delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay),
                                    generator=torch.Generator().manual_seed(4))
            for k, delay in enumerate(d.delay_pattern):
                delayed[k, :delay] = d.audio_bos
            stepper.prefill(0, delayed, torch.full((frames + 1, 2), d.text_pad_token_id), frames, boundary=prefix)
            start = stepper.position(0)
        machine.push(parse_script(TEXTS[0], small_tts.tokenizer))
        record, lanes = [], []
        for t in range(start, start + 30):
            action = stepper.step([machine.preview(t)])[0]
            machine.process(t, action)
            lanes.append(stepper.last_full)
            record.append((action, stepper.text_out.clone(), stepper.step_inputs(0)))
        return record, stepper.written_codes(0).clone(), machine.transcript, lanes

    lite, buf_lite, words_lite, lanes_lite = run(True)
    full, buf_full, words_full, lanes_full = run(False)
    for (a1, t1, i1), (a2, t2, i2) in zip(lite, full):
        assert a1 == a2 and torch.equal(t1, t2) and torch.equal(i1, i2)
    assert torch.equal(buf_lite, buf_full)
    assert words_lite == words_full
    assert all(lanes_full)
    # fresh, or past a teacher-forced prefix alike: the lane is taken until codebook 1 starts;
    # past an upstream-boundary prefix every code is read from the first generated step on
    assert lanes_lite.count(False) == (0 if prefix == "upstream" else min(d.delay_pattern[1:]) - 1)


# ---------------------------------------------------------------------------------------------
# The engine in process
# ---------------------------------------------------------------------------------------------


def _collect(got: queue.Queue, until=p.Done, timeout=120.0) -> list:
    items = []
    while True:
        item = got.get(timeout=timeout)
        items.append(item)
        assert not isinstance(item, p.ErrorEvent), item
        if isinstance(item, until):
            return items


def _frames(items):
    return [i.pcm for i in items if isinstance(i, AudioFrame)]


def _words(items):
    return [(i.word, i.frame) for i in items if isinstance(i, p.Word)]


def test_a_seeded_call_sounds_the_same_alone_and_alongside_three_others(small_tts):
    engine = Engine(small_tts, engine_config(small_tts, max_calls=4, max_lead_ms=1e6, batch_sizes=(4,)))
    try:
        sinks = [queue.Queue() for _ in range(4)]
        calls = [engine.open_call(s.put) for s in sinks]
        assert [c.slot.index for c in calls] == [0, 1, 2, 3]
        engine.submit(calls[0], p.Start(text=TEXTS[0], seed=42, id="a"))
        alone = _collect(sinks[0])
        buffer_alone = engine.stepper.written_codes(0).clone()
        engine.submit(calls[0], p.Reset())
        _collect(sinks[0], until=p.ResetDone)
        for i, call in enumerate(calls):
            engine.submit(call, p.Start(text=TEXTS[i], seed=42 if i == 0 else i, id=f"c{i}"))
        together = [_collect(s) for s in sinks]
        assert torch.equal(engine.stepper.written_codes(0), buffer_alone)
        assert _words(together[0]) == _words(alone)
        assert len(_frames(together[0])) == len(_frames(alone))
        for a, b in zip(_frames(together[0]), _frames(alone)):
            np.testing.assert_allclose(a, b, atol=1e-5)
        for i in range(1, 4):  # every call got its own words and its own done
            assert [w for w, _ in _words(together[i])] == TEXTS[i].removeprefix("[S1] ").split()
            done = together[i][-1]
            assert done.id == f"c{i}" and done.frames == len(_frames(together[i])) > 0
    finally:
        engine.close()


def test_calls_moved_between_slots_sound_as_they_do_unmoved(small_tts):
    """A turn starting alone on slot 3 is moved to slot 0 (the idle call there goes to slot 3),
    and that call's next turn, warm, is moved back: every turn keeps its words and audio, as on
    an engine that never moves a call."""
    def run(move_slots: bool):
        engine = Engine(small_tts, engine_config(small_tts, max_calls=4, max_lead_ms=1e6, move_slots=move_slots))
        try:
            sinks = [queue.Queue() for _ in range(4)]
            calls = [engine.open_call(s.put) for s in sinks]
            turns, slots = [], []
            for call, command in ((0, p.Start(text=TEXTS[0], seed=7)), (3, p.Start(text=TEXTS[3], seed=42)),
                                  (0, p.Inject(text=" And one more thing."))):
                engine.submit(calls[call], command)
                turns.append(_collect(sinks[call]))
                slots.append([c.slot.index for c in calls])
            return turns, slots, engine.slot_moves
        finally:
            engine.close()

    still, still_slots, still_moves = run(move_slots=False)
    moved, moved_slots, moves = run(move_slots=True)
    assert still_moves == 0 and still_slots[-1] == [0, 1, 2, 3]
    assert moves == 2 and moved_slots == [[0, 1, 2, 3], [3, 1, 2, 0], [0, 1, 2, 3]]
    for turn_moved, turn_still in zip(moved, still):
        assert _words(turn_moved) == _words(turn_still)
        assert len(_frames(turn_moved)) == len(_frames(turn_still)) > 0
        for a, b in zip(_frames(turn_moved), _frames(turn_still)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_pause_of_one_call_stops_its_frames_while_the_others_stream(small_tts):
    engine = Engine(small_tts, engine_config(small_tts, max_calls=2, max_lead_ms=1e6))
    try:
        a, b = queue.Queue(), queue.Queue()
        call_a, call_b = engine.open_call(a.put), engine.open_call(b.put)
        long = "[S1] " + " ".join(["word"] * 40)
        engine.submit(call_a, p.Start(text=long, id="a"))
        engine.submit(call_b, p.Start(text=long, id="b"))
        while not isinstance(a.get(timeout=60), AudioFrame):
            pass
        engine.submit(call_a, p.Pause(id="pa"))
        after = []
        while True:
            item = a.get(timeout=60)
            if isinstance(item, p.Paused):
                break
        position = engine.stepper.position(call_a.slot.index)
        b_frames = 0
        while b_frames < 10:
            item = b.get(timeout=60)
            b_frames += isinstance(item, AudioFrame)
            while not a.empty():
                after.append(a.get_nowait())
        assert not any(isinstance(i, AudioFrame) for i in after), "frame after paused"
        assert engine.stepper.position(call_a.slot.index) == position  # a paused call never advances
    finally:
        engine.close()


def test_fresh_start_sends_from_the_first_word_less_the_lead_in(small_tts):
    for lead_in in (0, 1, 2):
        engine = Engine(small_tts, engine_config(small_tts, max_lead_ms=1e6, lead_in_frames=lead_in))
        try:
            got = queue.Queue()
            call = engine.open_call(got.put)
            engine.submit(call, p.Start(text=TEXTS[0], seed=1))
            items = _collect(got)
            first_word = next(i for i in items if isinstance(i, p.Word))
            assert first_word.frame == lead_in
            # the frames before it were decoded (codec continuity) but never sent
            assert call.turn.send_from == call.turn.first_word_frame - lead_in
            done = items[-1]
            assert done.onset_ms == pytest.approx(done.ttfa_ms + lead_in * 80, abs=0.2)
            # the next turn after done: its first sent frame is again its first word less the lead-in
            engine.submit(call, p.Inject(text=" And more.", id="i"))
            items = _collect(got)
            assert next(i for i in items if isinstance(i, p.Word)).frame == lead_in
            assert isinstance(items[0], p.Started)
        finally:
            engine.close()


# ---------------------------------------------------------------------------------------------
# The real server with four call slots
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_slots():
    srv = ServerThread(server_config(mimi="random-small",
                                    log_level="WARNING", max_calls=4, max_lead_ms=60_000)).start()
    yield srv
    srv.stop()


async def _open(url):
    ws = await connect(url, open_timeout=30, close_timeout=2, max_size=None)
    ready = json.loads(await ws.recv())
    return ws, ready


async def _utterance(ws, text, seed, uid, garbage_every: int = 0):
    """Speak one utterance; returns (pcm frames, words, done)."""
    await ws.send(json.dumps({"cmd": "start", "text": text, "seed": seed, "id": uid}))
    frames, words = [], []
    while True:
        msg = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(msg, bytes):
            assert len(msg) == 4 + 2 * 1920 and int.from_bytes(msg[:4], "little") == 1920
            frames.append(msg[4:])
            continue
        event = json.loads(msg)
        assert event["event"] != "error", event
        if event["event"] == "word":
            assert event["id"] == uid
            words.append((event["word"], event["frame"]))
        if event["event"] == "done":
            assert event["id"] == uid
            return frames, words, event


async def test_four_concurrent_calls_fifth_is_busy_and_a_freed_slot_is_reused(four_slots):
    opened = [await _open(four_slots.url) for _ in range(4)]
    assert all(ready["event"] == "ready" for _, ready in opened)
    extra = await connect(four_slots.url, open_timeout=30)
    refusal = json.loads(await extra.recv())
    assert refusal["event"] == "error" and refusal["code"] == "busy"
    with pytest.raises(ConnectionClosed):
        await extra.recv()
    assert extra.close_code == 1013
    results = await asyncio.gather(*[_utterance(ws, TEXTS[i], i, f"u{i}") for i, (ws, _) in enumerate(opened)])
    for i, (frames, words, done) in enumerate(results):
        assert [w for w, _ in words] == TEXTS[i].removeprefix("[S1] ").split()
        assert done["frames"] == len(frames) > 0
    await opened[0][0].close()
    for _ in range(50):  # the slot is free as soon as the server has seen the close
        ws, ready = await _open(four_slots.url)
        if ready["event"] == "ready":
            break
        await ws.close()
        await asyncio.sleep(0.1)
    assert ready["event"] == "ready"
    frames, words, done = await _utterance(ws, TEXTS[0], 0, "again")
    assert done["frames"] == len(frames) > 0
    for conn in [ws] + [w for w, _ in opened[1:]]:
        await conn.close()


async def test_a_client_that_sends_garbage_and_leaves_mid_utterance_changes_nothing_for_another(four_slots):
    """Call B's frames and events are the same with or without a hostile neighbour."""
    ws_b, _ = await _open(four_slots.url)
    quiet = await _utterance(ws_b, TEXTS[1], 99, "b")
    await ws_b.send(json.dumps({"cmd": "reset"}))
    while json.loads(await ws_b.recv())["event"] != "reset":
        pass

    ws_a, _ = await _open(four_slots.url)

    async def hostile():
        await ws_a.send(json.dumps({"cmd": "start", "text": "[S1] " + " ".join(["la"] * 30), "id": "a"}))
        for junk in ("{not json", json.dumps({"cmd": "nope"}), json.dumps([1, 2]), b"\x00\x01",
                     json.dumps({"cmd": "start", "text": ""}), json.dumps({"cmd": "inject", "text": 5})):
            await ws_a.send(junk)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await ws_a.close()  # mid-utterance

    noisy, _ = await asyncio.gather(_utterance(ws_b, TEXTS[1], 99, "b"), hostile())
    assert noisy[1] == quiet[1]  # same words at the same frames
    assert len(noisy[0]) == len(quiet[0])
    for x, y in zip(noisy[0], quiet[0]):
        a = np.frombuffer(x, dtype="<i2").astype(np.int32)
        b = np.frombuffer(y, dtype="<i2").astype(np.int32)
        assert np.abs(a - b).max() <= 1
    await ws_b.close()


async def test_health_reports_calls_and_slots(four_slots):
    import urllib.request

    def get():
        with urllib.request.urlopen(f"http://127.0.0.1:{four_slots.port}/health", timeout=10) as r:
            return json.loads(r.read())

    ws, _ = await _open(four_slots.url)
    body = await asyncio.to_thread(get)
    assert body["max_calls"] == 4 and body["calls"] >= 1 and body["busy"] is False
    await ws.close()


@pytest.mark.parametrize("fmt, samples, width", [("ulaw_8000", 640, 1), ("pcm_16000", 1280, 2), ("alaw_8000", 640, 1)])
async def test_a_start_in_a_telephony_format_gets_frames_of_that_format(four_slots, fmt, samples, width):
    ws, ready = await _open(four_slots.url)
    assert fmt in ready["formats"]
    await ws.send(json.dumps({"cmd": "start", "text": TEXTS[2], "format": fmt, "id": "f"}))
    frames = 0
    while True:
        msg = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(msg, bytes):
            assert int.from_bytes(msg[:4], "little") == samples and len(msg) == 4 + samples * width
            frames += 1
        elif json.loads(msg)["event"] == "done":
            break
    assert frames > 0
    await ws.send(json.dumps({"cmd": "reset", "format": "bogus"}))
    error = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert error["code"] == "invalid_field" and "format" in error["message"]
    await ws.close()


def test_a_call_behind_real_time_makes_the_engine_refuse_new_calls(small_tts):
    """When a playing call falls behind (here: its client is made to have played 10 s more than
    was sent), the engine says so in health and refuses new calls instead of adding load."""
    engine = Engine(small_tts, engine_config(small_tts, max_calls=2, max_lead_ms=1e6, max_unsent_frames=10**9,
                                                   overload_refusal_s=5.0))
    try:
        got = queue.Queue()
        call = engine.open_call(got.put)
        engine.submit(call, p.Start(text="[S1] " + " ".join(["word"] * 60)))
        while not isinstance(got.get(timeout=60), AudioFrame):
            pass
        assert engine.health()["overloaded"] is False
        call.turn.pace_origin -= 10.0  # the player is now 10 s ahead of what it was sent
        for _ in range(100):
            if engine.health()["overloaded"]:
                break
            got.get(timeout=60)
        health = engine.health()
        assert health["overloaded"] is True and health["busy"] is True
        assert engine.open_call(queue.Queue().put) is None  # busy: refused, though a slot is free
        assert engine.admits_calls() == 0  # the same rule as a figure (what an engine process publishes)
    finally:
        engine.close()

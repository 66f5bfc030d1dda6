"""The deadline scheduler (engine/scheduler.py), alone on fake calls and in an engine on the
simulated GPU (engine/simulated.py): playing calls never run dry, new turns step in small batches
while the others coast, planned work never stalls a playing call, one slow step refuses no call."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import pytest

from dia2stream.call.call import CODEC_MARK_EVERY, AudioFrame
from dia2stream.clock import FRAME_SECONDS
from dia2stream.engine.engine import PLANNED_WORK_EVERY, Engine
from dia2stream.engine.scheduler import RIDE_BATCH, URGENT_MARGIN_S, Scheduler, StepCosts, StepPlan, compacting_moves
from dia2stream.engine.simulated import GpuProfile, SimulatedDevice, SimulatedDia2, _interpolate
from dia2stream.tools import playback
from dia2stream.wire import protocol as p

from helpers import engine_config

LONG = "[S1] " + " ".join(["word"] * 80)


# --- the scheduler on fake calls ---------------------------------------------------------------


@dataclass
class FakeSlot:
    index: int
    depformer: bool = True
    pending_replay: object = None

    def needs_depformer(self) -> bool:
        return self.depformer


@dataclass(eq=False)  # compared and hashed by identity, as a Call is
class FakeCall:
    index: int
    lead: float = 0.0
    starting: bool = False
    unsent_frames: int = 0
    peak: float = 1.0  # the most lead since its audio started: a full buffer unless a test says otherwise
    slot: FakeSlot = field(init=False)

    def __post_init__(self):
        self.slot = FakeSlot(self.index)

    def lead_seconds(self) -> float:
        return self.lead

    def lead_peak_seconds(self) -> float:
        return self.peak

    @property
    def awaiting_first_audio(self) -> bool:
        return self.starting

    catching_up = False


def scheduler(step_s: float = 0.015) -> Scheduler:
    costs = StepCosts()
    for batch in (1, 2, 4, 8, 16, 32):
        costs.observe(batch, True, step_s)
    costs.observe_decode(0.004)
    return Scheduler(max_lead_s=1.0, max_unsent_frames=250, batch_size_for=lambda n: 1 << (n - 1).bit_length(),
                     costs=costs)


def test_new_turns_step_alone_while_playing_calls_coast():
    s = scheduler()
    playing = [FakeCall(i, lead=0.7) for i in range(8)]
    new = FakeCall(8, starting=True)
    plan = s.plan(playing + [new])
    assert plan.reason == "starting" and plan.calls == (new,)


def test_a_call_whose_buffer_is_short_steps_before_a_new_turns_next_step():
    s = scheduler()
    floor = s.coast_floor(9)
    assert URGENT_MARGIN_S < floor < 1.0
    short = FakeCall(3, lead=floor - 0.01)
    others = [FakeCall(i, lead=0.9) for i in (0, 1, 2)]
    new = FakeCall(4, starting=True)
    plan = s.plan(others + [short, new])
    assert plan.reason == "deadline" and short in plan.calls and new in plan.calls
    assert [c.index for c in plan.calls] == [0, 1, 2, 3, 4]  # everyone below max_lead rides along


def test_the_frame_a_step_in_flight_brings_counts_in_a_calls_lead():
    s = scheduler()
    short = FakeCall(3, lead=s.coast_floor(5) - 0.01)
    others = [FakeCall(i, lead=0.9) for i in (0, 1, 2)]
    new = FakeCall(4, starting=True)
    assert s.plan(others + [short, new]).reason == "deadline"
    # its step in flight brings it a frame: not short any more, and the new turn steps alone
    plan = s.plan(others + [short, new], in_flight=frozenset({short}))
    assert plan.reason == "starting" and plan.calls == (new,)
    # nor does a top-up take a call past max_lead on a frame that is on its way
    low, nearly_full = FakeCall(0, lead=0.5), FakeCall(1, lead=0.95)
    assert s.plan([low, nearly_full]).calls == (low, nearly_full)
    assert s.plan([low, nearly_full], in_flight=frozenset({nearly_full})).calls == (low,)


def test_a_call_still_filling_its_buffer_rides_in_the_starting_step_not_with_everyone():
    s = scheduler()
    floor = s.coast_floor(10)
    others = [FakeCall(i, lead=0.9) for i in range(8)]
    fresh = FakeCall(8, lead=0.08, peak=0.08)  # its turn's first audio just went out
    new = FakeCall(9, starting=True)
    plan = s.plan(others + [fresh, new])
    assert plan.reason == "starting" and plan.calls == (fresh, new)
    assert plan.urgent  # planned work (a re-decode) waits, as it does for a deadline step
    assert not s.plan(others + [new]).urgent
    # above the coast floor it coasts like any playing call
    assert s.plan(others + [FakeCall(8, lead=floor + 0.01, peak=floor + 0.01), new]).calls == (new,)
    # a call whose buffer was full once and ran short still makes every call step
    plan = s.plan(others + [FakeCall(8, lead=0.08, peak=0.9), new])
    assert plan.reason == "deadline" and len(plan.calls) == 10
    # with nothing starting, a short call tops every call up, as before
    assert s.plan(others + [fresh]).reason == "deadline"


def test_a_filling_call_with_lead_to_spare_waits_out_a_decoder_only_starting_step():
    s = scheduler()
    others = [FakeCall(i, lead=0.9) for i in range(8)]
    new = FakeCall(9, starting=True)
    new.slot.depformer = False  # a new turn's first steps: the decoder-only lane, unless a rider joins
    floor = s.ride_floor(10)
    assert 0 < floor < FRAME_SECONDS
    fresh = FakeCall(8, lead=floor + 0.01, peak=0.08)
    plan = s.plan(others + [fresh, new])
    assert plan.reason == "starting" and plan.calls == (new,) and not plan.urgent
    # out of lead to spare it rides, as it does in a full step whatever its lead
    fresh.lead = floor - 0.01
    assert s.plan(others + [fresh, new]).calls == (fresh, new)
    fresh.lead, new.slot.depformer = floor + 0.01, True
    assert s.plan(others + [fresh, new]).calls == (fresh, new)
    # a call whose buffer was full once is no rider: short, it makes every call step as before
    new.slot.depformer = False
    plan = s.plan(others + [FakeCall(8, lead=floor + 0.01, peak=0.9), new])
    assert plan.reason == "deadline"


def test_new_turns_that_read_no_codes_yet_step_alone_between_full_steps():
    s = scheduler()
    playing = [FakeCall(i, lead=0.9) for i in range(8)]
    early = [FakeCall(8 + i, starting=True) for i in range(3)]
    for call in early:
        call.slot.depformer = False  # in their first steps: the decoder-only lane
    late = FakeCall(11, starting=True)  # its first codes are read: the full lane
    calls = playing + early + [late]
    first = s.plan(calls)
    assert first.calls == (*early, late) and first.compact
    lite = s.plan(calls)
    assert lite.calls == tuple(early) and not lite.compact  # alone after the full step, where it compacted them
    assert s.plan(calls).calls == (*early, late)  # then all of them again
    assert s.lite_between_steps == 1
    # all of them in the decoder-only lane: one step, as ever
    assert s.plan(playing + early).calls == tuple(early) == s.plan(playing + early).calls
    # a playing call below the coast floor, even one with lead to wait out a lite step, has lite
    # steps yield: it rides in every full starting step, with no lite step between
    floor = s.coast_floor(13)
    for lead in (s.ride_floor(13) - 0.01, s.ride_floor(13) + 0.01, floor - 0.01):
        fresh = FakeCall(20, lead=lead, peak=0.08)
        assert s.plan(calls + [fresh]).calls == (*early, late, fresh)
        assert s.plan(calls + [fresh]).calls == (*early, late, fresh)
    fresh.lead = floor + 0.01  # above the coast floor it coasts, and lite steps come back
    assert s.plan(calls + [fresh]).calls == tuple(early)
    assert s.plan(calls + [fresh]).calls == (*early, late)
    # switched off, every starting call steps in every starting step
    s.split_lanes = False
    assert s.plan(calls).calls == s.plan(calls).calls == (*early, late)


def test_riders_keep_the_starting_step_small():
    s = scheduler()
    others = [FakeCall(i, lead=0.9) for i in range(20)]
    new = FakeCall(30, starting=True)
    fresh = [FakeCall(20 + i, lead=0.05 + 0.01 * i, peak=0.1) for i in range(RIDE_BATCH - 1)]
    plan = s.plan(others + fresh + [new])
    assert plan.reason == "starting" and [c.index for c in plan.calls] == [c.index for c in fresh + [new]]
    # one filling call more than the step has room for: every call steps, the starting one included
    more = fresh + [FakeCall(29, lead=0.05, peak=0.1)]
    plan = s.plan(others + more + [new])
    assert plan.reason == "deadline" and len(plan.calls) == 20 + RIDE_BATCH + 1
    # four starting calls take a 4-slot step alone: up to four more ride, in an 8-slot step
    starting = [FakeCall(30 + i, starting=True) for i in range(4)]
    plan = s.plan(others + more + starting)
    assert plan.reason == "starting" and len(plan.calls) == 8


def test_with_nothing_starting_playing_calls_are_topped_up_together():
    s = scheduler()
    calls = [FakeCall(0, lead=0.95), FakeCall(1, lead=0.5), FakeCall(2, lead=1.2)]
    plan = s.plan(calls)
    assert plan.reason == "top-up" and [c.index for c in plan.calls] == [0, 1]  # 1.2 s ahead: not eligible
    assert s.plan([FakeCall(0, lead=0.95)]) is None
    assert s.wait_seconds([FakeCall(0, lead=0.95)]) == pytest.approx(0.95 - (1.0 - URGENT_MARGIN_S))


def test_calls_not_read_or_waiting_for_a_replay_do_not_step():
    s = scheduler()
    stuck = FakeCall(0, lead=0.1, unsent_frames=251)
    replaying = FakeCall(1, starting=True)
    replaying.slot.pending_replay = object()
    assert s.plan([stuck, replaying]) is None
    assert s.wait_seconds([stuck, replaying]) == 0.0  # the replay is work to do now


def test_the_calls_a_step_needs_are_moved_under_the_smallest_batch_the_moves_reach():
    sizes = (1, 2, 4, 8, 16, 32, 64)
    # a new turn on slot 50 swaps with the call on slot 0, which coasts: a 1-slot step, not 64
    assert compacting_moves([50], movable=[0, 1, 2, 7], batch_sizes=sizes) == [(50, 0)]
    # four new turns: the ones at or above 4 go to the lowest slots not stepping
    assert compacting_moves([1, 9, 33, 40], movable=[0, 2, 3, 5], batch_sizes=sizes) == [(9, 0), (33, 2), (40, 3)]
    # too few movable slots below 4 or 8: the smallest size the moves reach (16)
    assert compacting_moves([1, 9, 33, 40], movable=[0, 6], batch_sizes=sizes) == [(33, 0), (40, 6)]
    # already as small as it gets, or no move would shrink it: nothing moves
    assert compacting_moves([0, 3], movable=[1, 2], batch_sizes=sizes) == [(3, 1)]  # 2 slots, not 4
    assert compacting_moves([0, 1], movable=[2, 3], batch_sizes=sizes) == []
    assert compacting_moves([5, 60], movable=[40], batch_sizes=sizes) == []


def test_admission_follows_the_measured_step_cost():
    assert scheduler(step_s=0.015).admits(32)
    assert not scheduler(step_s=0.070).admits(32)  # 70 ms + 4 ms decode > 80 % of a frame
    one_call = StepCosts()
    one_call.observe(1, True, 0.014)  # only one call measured so far: 64 calls are not refused on a guess
    assert Scheduler(max_lead_s=1.0, max_unsent_frames=250, batch_size_for=lambda n: n, costs=one_call).admits(64)


def test_step_costs_average_and_scale_to_unmeasured_sizes():
    costs = StepCosts(smoothing=0.5)
    assert costs.estimate(8) == 0.0
    costs.observe(8, True, 0.010)
    costs.observe(8, True, 0.020)
    assert costs.estimate(8) == pytest.approx(0.015)
    assert costs.estimate(16) == pytest.approx(0.015)  # unmeasured and larger: the largest measured, a lower bound
    assert costs.estimate(4) == pytest.approx(0.015)  # a smaller batch costs at most the measured one
    costs.observe(32, True, 0.040)
    assert costs.estimate(16) == pytest.approx(0.040)  # the next larger measured size bounds it from above


# --- the simulated GPU ---------------------------------------------------------------------------


def test_profile_interpolates_and_extrapolates():
    table = {1: 7.0, 64: 17.0}
    assert _interpolate(table, 1) == 7.0 and _interpolate(table, 64) == 17.0
    assert _interpolate(table, 128) == pytest.approx(17.0 + 64 * 10 / 63)
    profile = GpuProfile.load("profiles/h100-2b.json")
    assert profile.step_seconds(1, True) == pytest.approx(0.00746)
    assert profile.step_seconds(1, False) < profile.step_seconds(1, True)


def test_a_bad_profile_is_refused_with_a_clear_error(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"gpu": "x", "preset": "2b"}')
    with pytest.raises(ValueError, match="not a GPU profile"):
        GpuProfile.load(bad)


def test_simulated_work_is_asynchronous_until_a_sync():
    now = [0.0]
    device = SimulatedDevice(clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert device.launch(0.010) == pytest.approx(0.010)
    assert device.launch(0.005) == pytest.approx(0.015)  # queued behind the first
    assert now[0] == 0.0  # the host went on
    device.synchronize()
    assert now[0] == pytest.approx(0.015)
    device.stall_next(0.3)
    assert device.launch(0.010) == pytest.approx(0.325)


# --- an engine on the simulated GPU ------------------------------------------------------------


PROFILE = GpuProfile(gpu="test", preset="2b", full_step_ms={1: 7.5, 16: 12.8, 32: 13.4},
                     lite_step_ms={1: 2.8, 32: 5.0}, decode_ms={1: 2.0, 32: 4.8})


class Listener:
    """A client of one call: frames timestamped as they arrive (and acknowledged, as the
    server's sender does), events kept."""

    def __init__(self):
        self.call = None
        self.frames: list[float] = []
        self.events: queue.Queue = queue.Queue()

    def __call__(self, item) -> None:
        if isinstance(item, AudioFrame):
            self.frames.append(time.monotonic())
            self.call.frames_acked += 1
        else:
            self.events.put((time.monotonic(), item))

    def wait_for(self, kind, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            at, item = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, kind):
                return at, item

    def underruns(self, since: int = 0) -> int:
        """Late frames from frame `since` on, the whole utterance played from its first frame."""
        if not self.frames:
            return 0
        late = playback.simulate(self.frames, self.frames[0]).late_s
        return sum(1 for lateness in late[since:] if lateness > 0)


def open_calls(engine: Engine, n: int) -> list[Listener]:
    out = []
    for _ in range(n):
        listener = Listener()
        listener.call = engine.open_call(listener)
        assert listener.call is not None
        out.append(listener)
    return out


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def record_steps(engine: Engine, watched: list[Listener]) -> list[tuple[bool, int]]:
    """From now on, for each step: whether only `watched` calls stepped, and its padded batch."""
    steps: list[tuple[bool, int]] = []
    launch = engine.stepper.launch

    def recording(choices, active=None):
        out = launch(choices, active)
        rows = {row for row, on in enumerate(active) if on}
        steps.append((rows <= {listener.call.slot.index for listener in watched}, engine.stepper.last_batch))
        return out

    engine.stepper.launch = recording
    return steps


@pytest.fixture
def sim_engine():
    engines = []

    def make(profile: GpuProfile = PROFILE, **overrides) -> Engine:
        tts = SimulatedDia2(profile)
        engine = Engine(tts, engine_config(tts, **overrides))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.mark.slow
def test_a_burst_of_new_turns_while_16_calls_play(sim_engine):
    engine = sim_engine(max_calls=20, max_lead_ms=1000)
    playing = open_calls(engine, 16)
    for i, listener in enumerate(playing):
        engine.submit(listener.call, p.Start(text=LONG, seed=i))
    wait_until(lambda: all(len(listener.frames) >= 20 for listener in playing))
    burst = open_calls(engine, 4)  # on slots 16-19: a step over them alone would pad to 32 slots
    assert sorted(listener.call.slot.index for listener in burst) == [16, 17, 18, 19]
    steps = record_steps(engine, burst)
    sent = time.monotonic()
    for i, listener in enumerate(burst):
        engine.submit(listener.call, p.Start(text=LONG, seed=100 + i))
    wait_until(lambda: all(listener.frames for listener in burst))
    first_audio = max(listener.frames[0] for listener in burst) - sent
    time.sleep(1.0)  # the burst's calls play on beside the others
    assert sum(listener.underruns() for listener in playing) == 0
    # the new turns were moved to the lowest slots and stepped there, in 4-slot steps
    alone = [batch for only_burst, batch in steps if only_burst]
    assert len(alone) >= 18 and max(alone) <= 4, alone
    assert engine.slot_moves >= 4
    # 19 steps before a fresh turn's first frame (the 2b delay, plus the lead-in) at the cost of a
    # 4-slot step the engine measured on this machine, with room for two full steps of every call
    costs = engine.scheduler.costs
    predicted = 19 * costs.estimate(4, True) + 2 * costs.estimate(20, True) + 2 * costs.decode_seconds
    assert first_audio <= predicted + 0.25, (first_audio, predicted)


@pytest.mark.slow
def test_calls_with_short_buffers_step_between_a_bursts_start_up_steps(sim_engine):
    """With 300 ms buffers the playing calls cannot coast through four new turns' ~18 start-up
    steps: each time one runs short it steps (with everyone, the new turns included) before the
    new turns' next step, and none runs dry."""
    engine = sim_engine(max_calls=20, max_lead_ms=300)
    playing = open_calls(engine, 16)
    for i, listener in enumerate(playing):
        engine.submit(listener.call, p.Start(text=LONG, seed=i))
    wait_until(lambda: all(len(listener.frames) >= 20 for listener in playing))
    marks = [len(listener.frames) for listener in playing]
    burst = open_calls(engine, 4)
    steps = record_steps(engine, burst)
    for i, listener in enumerate(burst):
        engine.submit(listener.call, p.Start(text=LONG, seed=100 + i))
    wait_until(lambda: all(listener.frames for listener in burst))
    time.sleep(0.5)
    assert sum(listener.underruns(mark) for listener, mark in zip(playing, marks)) == 0
    alone = [i for i, (only_burst, _) in enumerate(steps) if only_burst]
    together = [i for i, (only_burst, _) in enumerate(steps) if not only_burst]
    assert alone and together and min(together) < max(alone)  # the playing calls stepped in between


@pytest.mark.slow
def test_a_new_turns_first_audio_makes_no_step_of_every_call_while_another_turn_starts(sim_engine):
    """A turn that has just sent its first frame has one frame buffered, under the coast floor:
    it steps in the other starting turn's small steps until its buffer is full, and the 16
    playing calls (full buffers) coast on without a step of everyone in between."""
    engine = sim_engine(max_calls=20, max_lead_ms=1000)
    playing = open_calls(engine, 16)
    for i, listener in enumerate(playing):
        engine.submit(listener.call, p.Start(text=LONG, seed=i))
    wait_until(lambda: all(len(listener.frames) >= 20 for listener in playing))
    first, second = open_calls(engine, 2)
    steps: list[tuple[bool, bool, bool]] = []  # (only the two stepped, first's audio out, second still starting)
    submitted: list[bool] = []
    launch = engine.stepper.launch

    def recording(choices, active=None):
        # the second turn starts once the first is 8 steps in: it is still starting when the
        # first turn's audio begins (~19 steps), whatever the speed of this machine
        if first.call.position >= 8 and not submitted:
            engine.submit(second.call, p.Start(text=LONG, seed=101))
            submitted.append(True)
        out = launch(choices, active)
        rows = {row for row, on in enumerate(active) if on}
        audio = first.call.turn is not None and first.call.turn.first_audio_at is not None
        steps.append((rows <= {first.call.slot.index, second.call.slot.index}, audio,
                      second.call.turn is None or second.call.awaiting_first_audio))
        return out

    engine.stepper.launch = recording
    engine.submit(first.call, p.Start(text=LONG, seed=100))
    wait_until(lambda: second.frames)
    time.sleep(0.5)
    assert sum(listener.underruns() for listener in playing + [first]) == 0
    between = [only_two for only_two, audio, waiting in steps if audio and waiting]
    assert len(between) >= 5 and all(between), between


def test_planned_work_alternates_with_steps_that_carry_a_short_rider(sim_engine):
    """Planned work goes first before a starting step, but only one piece of it before a step
    that carries a short call (a re-decode of up to CODEC_MARK_EVERY - 1 frames, one a loop, would drain a one-frame
    buffer); before deadline steps it gets a piece every PLANNED_WORK_EVERY steps."""
    engine = sim_engine(max_calls=4)
    engine.close()  # the loop below is driven by hand: no generation thread
    order: list[str] = []
    engine._active_calls = lambda: []
    engine._planned_work_waiting = engine._replay_waiting = lambda: True
    engine._prefill_one = lambda: False
    engine._replay_one_frame = lambda: order.append("work") or True
    engine._compacting_moves = lambda calls: []
    engine._step = lambda calls: order.append("step")

    def run(plan: StepPlan, loops: int = 6) -> list[str]:
        order.clear()
        engine.scheduler.plan = lambda calls, in_flight=frozenset(): plan
        for _ in range(loops):
            engine._step_once()
        return order[:]

    assert run(StepPlan((), "starting")) == ["work"] * 6
    # planned work ran last (above): the rider's step goes first, then one piece each
    assert run(StepPlan((), "starting", urgent=True)) == ["step", "work"] * 3
    assert run(StepPlan((), "deadline", urgent=True), loops=8) == ["step"] * PLANNED_WORK_EVERY + ["work"] + \
        ["step"] * PLANNED_WORK_EVERY + ["work"]


@pytest.mark.slow
def test_one_slow_step_refuses_no_call(sim_engine):
    engine = sim_engine(max_calls=8, max_lead_ms=200, overload_refusal_s=5.0)
    playing = open_calls(engine, 3)
    for i, listener in enumerate(playing):
        engine.submit(listener.call, p.Start(text=LONG, seed=i))
    wait_until(lambda: all(len(listener.frames) >= 10 for listener in playing))
    engine.tts.device_clock.stall_next(0.3)  # one step 300 ms late: every call falls behind once
    seen = len(playing[0].frames)
    wait_until(lambda: len(playing[0].frames) > seen + 15)
    late = Listener()
    late.call = engine.open_call(late)
    assert late.call is not None and not engine.health()["busy"]


@pytest.mark.slow
def test_a_rollback_while_16_calls_play_delays_none_of_their_frames(sim_engine):
    # A slow Mimi decode makes the old way (15 re-decoded frames in the pause handler, in a row)
    # stall every call by 15 x 25 ms, longer than their 240 ms lead (seen: one underrun each);
    # planned between their steps, it stalls none.
    slow_decode = GpuProfile(gpu="test", preset="2b", full_step_ms={1: 7.5, 32: 13.4}, lite_step_ms={1: 2.8, 32: 5.0},
                             decode_ms={1: 25.0, 32: 25.0})
    engine = sim_engine(slow_decode, max_calls=17, max_lead_ms=240)
    listeners = open_calls(engine, 17)
    for i, listener in enumerate(listeners):
        engine.submit(listener.call, p.Start(text=LONG, seed=i))
    wait_until(lambda: all(len(listener.frames) >= 30 for listener in listeners))
    barge, playing = listeners[0], listeners[1:]
    marks = [len(listener.frames) for listener in playing]
    heard = len(barge.frames) - 8
    while (barge.call.turn.send_from + heard) % CODEC_MARK_EVERY != CODEC_MARK_EVERY - 1:
        heard -= 1  # the longest re-decode: from the last codec mark, CODEC_MARK_EVERY - 1 frames back
    engine.submit(barge.call, p.Pause(played_ms=heard * 80.0))
    _, paused = barge.wait_for(p.Paused)
    assert paused.spoken is not None
    wait_until(lambda: barge.call.slot.pending_replay is None)
    time.sleep(0.5)
    late = [listener.underruns(mark) for listener, mark in zip(playing, marks)]
    assert sum(late) == 0, late


def test_a_call_catching_up_after_a_rollback_is_not_behind():
    from dia2stream.engine.scheduler import behind

    late = FakeCall(0, lead=-0.5)
    catching_up = FakeCall(1, lead=-0.5)
    catching_up.catching_up = True
    starting = FakeCall(2, lead=-0.5, starting=True)
    assert behind([late, catching_up, starting]) == [late]


@pytest.mark.slow
def test_a_rollover_between_turns_runs_as_planned_work_not_in_the_command_handler(sim_engine):
    """The next turn on a nearly full context rolls the context over first: a prefill, run by
    the engine between frames as planned work (where it waits for the playing calls' buffers),
    never inside the inject's handler, where it stalled every call for as long as it took."""
    engine = sim_engine(max_calls=2, max_lead_ms=1e6, max_unsent_frames=10**9, context_frames=120,
                        rollover_frames=40)
    (listener,) = open_calls(engine, 1)
    call = listener.call
    in_handler, prefills_in_handler, prefills = [False], [], []
    handle, prefill = call.handle, engine.stepper.prefill

    def handling(*args, **kwargs):
        in_handler[0] = True
        try:
            return handle(*args, **kwargs)
        finally:
            in_handler[0] = False

    def prefilling(*args, **kwargs):
        prefills.append(in_handler[0])
        return prefill(*args, **kwargs)

    call.handle, engine.stepper.prefill = handling, prefilling
    engine.submit(call, p.Start(text="[S1] One two three four five six seven eight nine ten.", seed=1))
    for turn in range(3):
        listener.wait_for(p.Done)
        engine.submit(call, p.Inject(text=" Eleven twelve thirteen fourteen fifteen sixteen.", id=turn))
    listener.wait_for(p.Done)
    assert call.rollovers >= 2  # the context rolled over before the next turns
    assert prefills and not any(prefills), prefills  # and never inside a command's handler

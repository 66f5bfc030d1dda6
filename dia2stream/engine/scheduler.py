"""Which calls step next, chosen by deadline, and whether the engine can take another call.

Every generating call has a deadline: the moment its caller's buffer runs dry. A playing call
has `lead` seconds of audio buffered (at most `max_lead_ms`), so its deadline is `now + lead`. A
turn that has not reached its first audio yet (a `start`, an `inject` after `done`, a resume or a
rollover that must replay heard frames) is *starting*: its caller is waiting now, and each of the
~18 steps before its first word is paid in onset. So:

- while any call is starting and no playing call is near its deadline, only the starting calls
  step, in small, fast batches (the decoder-only lane while none of them reads a codebook). A
  step is padded up to the highest slot it runs (the stepper's batches are slots 0..b-1), so
  before a step the engine moves the calls it needs into the lowest slots (`compacting_moves`:
  a swap with a call that is not stepping, one copy per move; a new turn on slot 50 then costs
  a one-call step, not a 64-call one, for each of its ~18 start-up steps);
- a playing call is near its deadline when its lead falls below `coast_floor`: two frames plus
  twice the measured cost of a step and decode over every call. Then every call that may run
  ahead steps together (the batch costs little more than one call alone, and tops everyone up),
  and planned work (a rollback's re-decode) waits;
- except a call whose buffer has not been full since its audio (re)started (a turn that has
  just sent its first frame has one frame buffered, under the floor at once): while others
  start, it rides in their small steps (up to `RIDE_BATCH` slots, or twice the starting calls'
  padded size) instead, and planned work alternates with such steps. Each new turn's first
  audio made every call step two or three times, in the middle of the other new turns' start-up
  (simulated H200, 64 calls: ~4 of a new turn's ~17 start-up steps were steps of every call).
  A rider makes a decoder-only step a full one, so while every starting call is in the
  decoder-only lane (a new turn's first ~16 steps) only the filling calls that cannot wait for
  a later, full step ride (`ride_floor`);
- while some starting calls read codes and others are still in the decoder-only lane, the
  latter also step alone right after each full step (`lite_between`): they go twice per full
  step and its lite one, instead of paying a full step for each of their ~16 lite ones;
- with no call starting, the playing calls are kept topped up as before: they step together as
  soon as one of them is two frames below `max_lead_ms`.

Admission uses the same costs: a new call is refused (`busy`) when a full step over one more
call, plus its decode, would not fit in a frame; or when calls have kept falling behind real time
for a while (`SUSTAINED_BEHIND_S`), never because of one slow step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dia2stream.clock import FRAME_SECONDS

URGENT_MARGIN_S = 2 * FRAME_SECONDS  # a topped-up call steps when it is this far below max_lead
BEHIND_S = FRAME_SECONDS  # a call whose caller would wait this long for audio is behind
SUSTAINED_BEHIND_S = 1.0  # calls behind for this long (not one slow step) make the engine refuse calls
RIDE_BATCH = 4  # slots a starting step may grow to with calls that are filling their buffer
RIDE_GROWTH = 2  # ... or this many times the padded size the starting calls take alone
RIDE_LITE_MARGIN_S = FRAME_SECONDS / 4  # host and delivery slack of a filling call that waits out a decoder-only step
FRAME_BUDGET = 0.8  # the share of a frame a full step plus its decode may take before calls are refused


class StepCosts:
    """Measured seconds of a step, by padded batch size and lane, as a moving average."""

    def __init__(self, smoothing: float = 0.1):
        self.smoothing = smoothing
        self._seconds: dict[tuple[int, bool], float] = {}
        self.decode_seconds = 0.0

    def observe(self, batch: int, full: bool, seconds: float) -> None:
        key = (batch, full)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else old + self.smoothing * (seconds - old)

    def observe_decode(self, seconds: float) -> None:
        self.decode_seconds += self.smoothing * (seconds - self.decode_seconds) if self.decode_seconds else seconds

    def estimate(self, batch: int, full: bool = True) -> float:
        """The cost of a step at `batch`: measured, else the nearest measured larger size (an
        upper bound: a bigger batch never costs less), else the nearest smaller one (a lower
        bound), else 0 (nothing measured yet)."""
        lane = {b: s for (b, f), s in self._seconds.items() if f == full} or \
            {b: s for (b, _), s in self._seconds.items()}
        if not lane:
            return 0.0
        if batch in lane:
            return lane[batch]
        above = [b for b in lane if b > batch]
        return lane[min(above)] if above else lane[max(lane)]


@dataclass(frozen=True)
class StepPlan:
    """One step: the calls (in slot order) and why they step."""

    calls: tuple
    reason: str  # "starting", "deadline" or "top-up"
    # a call in it is under the coast floor: a deadline plan (planned work waits), or a starting
    # one with a short call riding in it (planned work alternates with such steps, one piece each)
    urgent: bool = False
    # the calls are moved to the lowest slots first (`compacting_moves`); not for a lite step
    # between full ones: its calls were compacted for the full step before it
    compact: bool = True


@dataclass
class Scheduler:
    max_lead_s: float
    max_unsent_frames: int
    batch_size_for: object  # slots -> padded batch size (the stepper's)
    costs: StepCosts = field(default_factory=StepCosts)
    ride_filling: bool = True  # calls filling their buffer ride in starting steps (False: to measure it)
    split_lanes: bool = True  # starting calls not reading codes yet also step alone, between full steps
    lite_between_steps: int = field(default=0, init=False)  # plans made by `lite_between`
    _last_full: bool = field(default=False, init=False)  # the lane of the last plan made

    def riders(self, starting: list, short: list, leads: dict) -> list:
        """The short calls still filling their buffer that ride in the starting calls' step:
        lowest lead first, while the step stays within RIDE_BATCH slots or twice the padded size
        the starting calls take alone (a step of every call costs more than either: on the H200
        profile 15.3 ms at 64 slots against 8.2 at 4 and 10.1 at 8)."""
        room = max(RIDE_BATCH, RIDE_GROWTH * self.batch_size_for(len(starting))) - len(starting)
        if room <= 0:
            return []
        filling = sorted((c for c in short if self.filling(c)), key=leads.__getitem__)
        return filling[:room]

    def unable_to_wait(self, short: list, n_calls: int, leads: dict) -> list:
        """The short calls that may not wait out a decoder-only starting step: a rider would make
        it a full step (one call on the H100: 2.8 → 7.5 ms), and a new turn's first ~16 steps
        are decoder-only; a filling call with lead to spare rides in a later, full one instead.
        In the slowest tenth of new turns' start-ups, ~8 of their ~18 steps had been made full so
        (simulated H100, 64 calls)."""
        floor = self.ride_floor(n_calls)
        return [c for c in short if not (self.filling(c) and leads[c] >= floor)]

    def filling(self, call) -> bool:
        """A playing call whose buffer has not been full since its audio (re)started: it rides
        in the starting calls' small steps until it is, instead of making every call step."""
        return call.lead_peak_seconds() < self.max_lead_s - URGENT_MARGIN_S

    def eligible(self, calls, leads: dict | None = None) -> list:
        """Generating calls that may run ahead: below max_lead (`leads`, else their own), read
        by their client, with no codec replay pending."""
        out = []
        for call in calls:
            if call.unsent_frames > self.max_unsent_frames or call.slot.pending_replay is not None:
                continue
            if (call.lead_seconds() if leads is None else leads[call]) < self.max_lead_s:
                out.append(call)
        return out

    @staticmethod
    def leads(calls, in_flight: frozenset = frozenset()) -> dict:
        """Each call's lead, with the frame its step in flight brings: not sent yet, so not in
        its own lead, but on its way. Without it a deadline step was followed at once by another
        for the same short calls (half of them, simulated 128 calls), two big steps in a row in
        the middle of the new turns' start-ups."""
        return {call: call.lead_seconds() + (FRAME_SECONDS if call in in_flight else 0.0) for call in calls}

    def ride_floor(self, n_calls: int) -> float:
        """The lead below which a filling call rides in a decoder-only starting step (making it a
        full one) rather than wait for the next: the step in flight before its own (at worst one
        of every call), its own full step, both decodes, and a margin."""
        own = self.costs.estimate(RIDE_BATCH, True)  # a size measured above it, else the largest below
        ahead = self.costs.estimate(self.batch_size_for(max(1, n_calls)), True)
        return RIDE_LITE_MARGIN_S + ahead + own + 2 * self.costs.decode_seconds

    def coast_floor(self, n_calls: int) -> float:
        """The lead below which a playing call must step even while others start."""
        full = self.costs.estimate(self.batch_size_for(max(1, n_calls)), True)
        return URGENT_MARGIN_S + 2 * (full + self.costs.decode_seconds)

    def plan(self, calls, in_flight: frozenset = frozenset()) -> StepPlan | None:
        """`in_flight`: the calls whose step in flight brings them a frame."""
        lead_of = self.leads(calls, in_flight)
        eligible = self.eligible(calls, lead_of)
        if not eligible:
            return None
        starting = [c for c in eligible if is_starting(c)]
        playing = [c for c in eligible if not is_starting(c)]
        leads = [lead_of[c] for c in playing]
        floor = self.coast_floor(len(eligible))
        short = [call for call, lead in zip(playing, leads) if lead < floor]
        if starting and self.ride_filling and not any(c.slot.needs_depformer() for c in starting):
            short = self.unable_to_wait(short, len(eligible), lead_of)
        filling = self.riders(starting, short, lead_of) if starting and self.ride_filling else []
        if len(short) > len(filling):
            return self._made(StepPlan(tuple(sorted(eligible, key=_slot)), "deadline", urgent=True), full=True)
        if starting:
            lite = self.lite_between(starting, short)
            if lite:
                self.lite_between_steps += 1
                return self._made(StepPlan(tuple(sorted(lite, key=_slot)), "starting", compact=False), full=False)
            full = bool(filling) or any(c.slot.needs_depformer() for c in starting)
            return self._made(StepPlan(tuple(sorted(starting + filling, key=_slot)), "starting", urgent=bool(filling)),
                              full=full)
        refill = self.refill_below(len(eligible))
        if any(lead < refill for lead in leads):
            return self._made(StepPlan(tuple(sorted(playing, key=_slot)), "top-up"), full=True)
        return None

    def lite_between(self, starting: list, short: list) -> list:
        """The starting calls that read no codes yet, to step alone in the decoder-only lane right
        after a full step, when the others need the full lane: with them in it, each of their
        ~16 decoder-only steps cost a full one (simulated H200, 64 calls starting within a second:
        ~19 of the slowest tenth's ~20 start-up steps were full). Stepping alone in between (a
        step in flight lets them go again at once), they go twice per full step and its lite one
        (8 slots: 9.8 + 2.7 ms) instead of once per full step; the calls that need the full lane
        wait one lite step. Only while no playing call is short (below the coast floor), filling
        ones included: a lite step is a luxury taken when no deadline is near. Yielding only to the
        short calls that could not wait out one more step, the lite steps put 34 underruns (up to
        240 ms stalled) into lock-step 64 on the H200 (run 37), where the simulation showed none:
        the real steps and deliveries vary more than the margins the cost model leaves."""
        if not (self.split_lanes and self._last_full) or short:
            return []
        lite = [c for c in starting if not c.slot.needs_depformer()]
        if not lite or len(lite) == len(starting):
            return []
        return lite

    def _made(self, plan: StepPlan, full: bool) -> StepPlan:
        self._last_full = full
        return plan

    def wait_seconds(self, calls, ceiling: float = 0.5) -> float:
        """How long nothing needs a step (0: plan now)."""
        eligible = self.eligible(calls)
        wait = ceiling
        for call in calls:
            if call.slot.pending_replay is not None:
                return 0.0  # planned work is waiting
            if call.unsent_frames > self.max_unsent_frames:
                wait = min(wait, 0.02)  # the client is not reading: look again soon
        refill = self.refill_below(len(eligible))
        for call in eligible:
            if is_starting(call):
                return 0.0
            wait = min(wait, call.lead_seconds() - refill)
        return max(0.0, wait)

    def refill_below(self, n_calls: int) -> float:
        """With nothing starting, playing calls step together once one is below this lead: two
        frames under max_lead, or the coast floor when a short max_lead puts that lower (but a
        frame under max_lead, so a full buffer waits)."""
        top_up = self.max_lead_s - URGENT_MARGIN_S
        return max(top_up, min(self.coast_floor(n_calls), self.max_lead_s - FRAME_SECONDS))

    def admits(self, n_calls_after: int) -> bool:
        """Whether a full step over `n_calls_after` calls and its decode fit in a frame. A size
        never measured is judged by the largest one measured below it, a lower bound: the engine
        does not refuse on a guess (calls that then fall behind make it `overloaded`)."""
        step = self.costs.estimate(self.batch_size_for(n_calls_after), True)
        return step + self.costs.decode_seconds <= FRAME_BUDGET * FRAME_SECONDS


def compacting_moves(stepping: list[int], movable: list[int], batch_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """Slot swaps (high, low) that bring the slots a step needs (`stepping`) under the smallest
    padded batch size the moves can reach: each stepping slot at or above it goes to a `movable`
    slot below it (a slot whose call is not stepping and may go up instead), the first ones of
    `movable` first. No moves when none would shrink the step."""
    if not stepping:
        return []
    current = next(b for b in batch_sizes if b > max(stepping))
    for target in batch_sizes:
        if target < len(stepping):
            continue
        if target >= current:
            return []
        high = sorted(slot for slot in stepping if slot >= target)
        low = [slot for slot in movable if slot < target]
        if len(low) >= len(high):
            return list(zip(high, low))
    return []


def is_starting(call) -> bool:
    """A turn before its first audio, or catching up after a rollback: its caller waits now."""
    return call.awaiting_first_audio or call.catching_up


def behind(calls) -> list:
    """Playing calls whose caller is already waiting for audio. A call still starting its turn,
    or catching up after a rollback, is not: its caller hears the turn's onset, not an underrun."""
    return [c for c in calls if not is_starting(c) and c.lead_seconds() < -BEHIND_S]


def _slot(call) -> int:
    return call.slot.index

"""Shared by the CPU and GPU tests: four call slots stepped under a changing active pattern."""

from vendor_dia2.runtime import SamplingParams
from vendor_dia2.script import parse_script

SCRIPT = "[S1] Hello there, how are you doing today?"

# calls 0..3 for `step_with_moves`; the moves bring call 3 (a new turn) down to slot 0 and back
# up, and swap a call with an idle slot's call mid-utterance
MOVE_PATTERN = [[True, True, True, True]] * 8 + [[False, False, False, True]] * 6 + \
               [[True, False, True, True]] * 8 + [[True, True, True, True]] * 6
MOVES = {8: (0, 3), 12: (1, 2), 14: (3, 0), 20: (0, 2)}
# several pairs in one swap (`swap_rows_many`)
MOVES_TOGETHER = {8: [(0, 3), (1, 2)], 14: [(3, 1), (0, 2)], 20: [(0, 1), (2, 3)], 24: [(0, 2), (1, 3)]}


def step_pattern(tts, stepper, pattern, cfg: bool = True):
    """Step `stepper` (four slots) once per entry of `pattern` (which slots are active), each
    slot speaking SCRIPT with its own seed. Returns the actions of every step and the cache
    length each step read."""
    machines = []
    for call in range(4):
        stepper.set_sampling(call, SamplingParams(seed=call, cfg_scale=2.0 if cfg else 1.0))
        machine = tts.new_state_machine()
        machine.push(parse_script(SCRIPT, tts.tokenizer))
        machines.append(machine)
    actions, lengths = [], []
    for active in pattern:
        b = stepper.batch_size_for(max(i for i, on in enumerate(active) if on) + 1)
        lengths.append(stepper.cache_length_for(b))
        choices = [m.preview(stepper.position(i)) if active[i] else None for i, m in enumerate(machines)]
        got = stepper.step(choices, active)
        for i, m in enumerate(machines):
            if active[i]:
                m.process(stepper.position(i) - 1, got[i])
        actions.append(got)
    return actions, lengths


def move_pairs(moves: dict, i: int) -> list[tuple[int, int]]:
    """The slot pairs `moves` swaps before step i: one pair, or a list swapped in one go."""
    return moves[i] if isinstance(moves[i], list) else [moves[i]]


def step_with_moves(tts, stepper, pattern, moves, cfg: bool = True):
    """Four calls, each speaking SCRIPT with its own seed (call 2 with its own temperatures, call
    3 after a 6-frame prefix prefilled with the upstream boundary, so a cache offset of 1),
    stepped once per entry of `pattern` (which *calls* are active) while `moves[i]` (a pair of
    slots, or a list of pairs swapped in one go) is swapped before step i. Returns, per call, its actions, its delayed codes and its
    position, whatever slot it ended on."""
    import torch

    d = tts.config.data
    machines = []
    for call in range(4):
        temperature = dict(text_temperature=1.1, audio_temperature=0.5, audio_top_k=7) if call == 2 else {}
        stepper.set_sampling(call, SamplingParams(seed=call, cfg_scale=2.0 if cfg else 1.0, **temperature))
        machine = tts.new_state_machine()
        machine.push(parse_script(SCRIPT, tts.tokenizer))
        machines.append(machine)
    frames = 6
    delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay), generator=torch.Generator().manual_seed(3))
    for k, delay in enumerate(d.delay_pattern):
        delayed[k, :delay] = d.audio_bos
    stepper.prefill(3, delayed, torch.full((frames + 1, 2), d.text_pad_token_id), frames, boundary="upstream")
    row = list(range(4))  # call -> the slot it sits on
    actions: list[list[int]] = [[] for _ in range(4)]
    for i, calls_on in enumerate(pattern):
        if i in moves:
            pairs = move_pairs(moves, i)
            if len(pairs) == 1:
                stepper.swap_rows(*pairs[0])
            else:
                stepper.swap_rows_many(pairs)
            for a, b in pairs:
                call_a, call_b = row.index(a), row.index(b)
                row[call_a], row[call_b] = b, a
        active = [False] * 4
        choices = [None] * 4
        for call, on in enumerate(calls_on):
            if on:
                active[row[call]] = True
                choices[row[call]] = machines[call].preview(stepper.position(row[call]))
        got = stepper.step(choices, active)
        for call, on in enumerate(calls_on):
            if on:
                machines[call].process(stepper.position(row[call]) - 1, got[row[call]])
                actions[call].append(got[row[call]])
    return actions, [stepper.written_codes(row[c]).clone() for c in range(4)], [stepper.position(row[c]) for c in range(4)]


def prefill_voice(tts, stepper, frames: int = 12, seed: int = 4) -> None:
    """A voice prefix of `frames` random frames on slot 0, at the published runtime's boundary."""
    import torch

    d = tts.config.data
    delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay),
                            generator=torch.Generator().manual_seed(seed))
    for k, delay in enumerate(d.delay_pattern):
        delayed[k, :delay] = d.audio_bos
    stepper.prefill(0, delayed, torch.full((frames + 1, 2), d.text_pad_token_id), frames, boundary="upstream")


def speak_frames(tts, stepper, frames: int):
    """Step slot 0 `frames` times speaking SCRIPT four times over: (actions, codes [frames, ...] on the CPU)."""
    import torch

    machine = tts.new_state_machine()
    machine.push(parse_script((SCRIPT + " ") * 4, tts.tokenizer))
    actions, codes = [], []
    for _ in range(frames):
        t = stepper.position(0)
        action = stepper.step([machine.preview(t)])[0]
        machine.process(t, action)
        actions.append(action)
        codes.append(stepper.codes.clone())
    return actions, torch.stack(codes).cpu()


def run_steps(stepper, machine, start: int, stop: int) -> None:
    """Steps start..stop - 1 of slot 0 of a one-call stepper, the state machine answering each."""
    for position in range(start, stop):
        machine.process(position, stepper.step([machine.preview(position)])[0])

"""Shared by the CPU and GPU tests: four call slots stepped under a changing active pattern."""

from vendor_dia2.runtime import SamplingParams
from vendor_dia2.script import parse_script

SCRIPT = "[S1] Hello there, how are you doing today?"


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

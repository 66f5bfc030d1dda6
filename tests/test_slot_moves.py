"""Moving a call to another slot (issue 18): a step runs over slots 0..b-1, so the engine moves
the calls a step needs to the lowest slots. A moved call must go on token for token as if it had
never moved, in the stepper, the Mimi stream and the simulated GPU."""

from __future__ import annotations

import pytest
import torch

from stepping import MOVE_PATTERN, MOVES, MOVES_TOGETHER, move_pairs, step_with_moves


@pytest.fixture(scope="module")
def small_tts(tiny_dir):
    from vendor_dia2 import Dia2

    return Dia2.from_pretrained(str(tiny_dir), device="cpu", mimi="random-small")


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("whole", [False, True])
def test_a_moved_call_steps_on_token_for_token(small_tts, cfg, whole):
    """`whole`: the swaps copy whole cache rows, as a graphed swap (`row_swap.GRAPHED`) does."""
    def run(moves):
        stepper = small_tts.new_stepper(n_calls=4, cfg=cfg, max_positions=64)
        stepper.slots.capture_swap(graph=False, whole=whole)
        return step_with_moves(small_tts, stepper, MOVE_PATTERN, moves, cfg)

    still = run({})
    for moves in (MOVES, MOVES_TOGETHER):
        moved = run(moves)
        assert moved[0] == still[0]
        assert all(torch.equal(a, b) for a, b in zip(moved[1], still[1]))
        assert moved[2] == still[2]
    assert still[2][3] > still[2][1]  # call 3 stepped alone in between (the point of moving it)


def test_a_swap_exchanges_every_tensor_of_two_slots_and_touches_no_other(small_tts):
    stepper = small_tts.new_stepper(n_calls=3, cfg=True, max_positions=32)
    from vendor_dia2.runtime import SamplingParams

    stepper.set_sampling(0, SamplingParams(seed=5, text_top_k=9))
    pad = (small_tts.config.data.text_pad_token_id,) * 2
    stepper.step([(pad, pad)] * 3, [True, False, True])
    before = [stepper.slot_tensors(c) for c in range(3)]
    places = [stepper.place(c) for c in range(3)]
    stepper.swap_rows(0, 2)
    after = [stepper.slot_tensors(c) for c in range(3)]
    assert [stepper.place(c) for c in range(3)] == [places[2], places[1], places[0]]
    for name in before[0]:
        if name.startswith("decoder_cache"):
            filled = places[0].position + 1  # both stepped once: only the filled slots move
            assert torch.equal(after[0][name][:, :, :filled], before[2][name][:, :, :filled]), name
            assert torch.equal(after[2][name][:, :, :filled], before[0][name][:, :, :filled]), name
        else:
            assert torch.equal(after[0][name], before[2][name]) and torch.equal(after[2][name], before[0][name]), name
        assert torch.equal(after[1][name], before[1][name]), name


def test_the_mimi_stream_decodes_leading_rows_and_swaps_rows_as_the_whole_stream():
    from vendor_dia2.codec import MimiCodec

    codec = MimiCodec.load("random-small")
    codes = torch.randint(0, 2048, (8, 32, 6), generator=torch.Generator().manual_seed(0))
    codec.open_stream(8)
    whole = torch.stack([codec.decode_frame(codes[:, :, t]) for t in range(6)], 1)  # [8, 6, 1920]

    codec.open_stream(8, decode_sizes=(1, 2, 4))
    out = torch.zeros_like(whole)
    low, high = torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)
    low[:3], high[3:] = True, True
    for t in range(6):
        pcm = codec.decode_frame(codes[:, :, t], low)
        assert pcm.shape[0] == 4  # rows 0..2 decode over the first 4 rows only
        out[:3, t] = pcm[:3]
    for t in range(6):  # the other rows, untouched so far, catch up over the whole stream
        out[3:, t] = codec.decode_frame(codes[:, :, t], high)[3:]
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-4)

    codec.open_stream(8, decode_sizes=(1, 2, 4))
    for t in range(3):
        codec.decode_frame(codes[:, :, t])
    codec.swap_rows(1, 6)
    order = [0, 6, 2, 3, 4, 5, 1, 7]
    swapped = torch.stack([codec.decode_frame(codes[order, :, t]) for t in range(3, 6)], 1)
    torch.testing.assert_close(swapped[order], whole[:, 3:], atol=1e-5, rtol=1e-4)


def test_the_simulated_gpu_moves_a_call_as_the_stepper_does():
    """The simulated stepper keeps slot state as FrameStepper does: a moved call draws the same
    actions and writes the same codes as one that never moved."""
    from dia2stream.engine.simulated import GpuProfile, SimulatedDevice, SimulatedStepper
    from vendor_dia2.config import preset

    profile = GpuProfile(gpu="test", preset="tiny", full_step_ms={1: 0.0}, lite_step_ms={1: 0.0}, decode_ms={1: 0.0},
                         swap_ms=0.0)

    def run(moves):
        stepper = SimulatedStepper(preset("tiny"), profile, SimulatedDevice(), n_calls=4)
        from vendor_dia2.runtime import SamplingParams
        for call in range(4):
            stepper.set_sampling(call, SamplingParams(seed=call))
        row, actions = list(range(4)), [[] for _ in range(4)]
        for i, calls_on in enumerate(MOVE_PATTERN):
            if i in moves:
                pairs = move_pairs(moves, i)
                stepper.swap_rows_many(pairs)
                for a, b in pairs:
                    call_a, call_b = row.index(a), row.index(b)
                    row[call_a], row[call_b] = b, a
            active, choices = [False] * 4, [None] * 4
            for call, on in enumerate(calls_on):
                if on:
                    active[row[call]], choices[row[call]] = True, ((call, 0), (call, 1))
            got = stepper.step(choices, active)
            for call, on in enumerate(calls_on):
                if on:
                    actions[call].append(got[row[call]])
        return actions, [stepper.written_codes(row[c]).clone() for c in range(4)], [stepper.text_inputs(row[c])
                                                                                    for c in range(4)]

    still = run({})
    for moves in (MOVES, MOVES_TOGETHER):
        moved = run(moves)
        assert moved[0] == still[0] and moved[2] == still[2]
        assert all(torch.equal(a, b) for a, b in zip(moved[1], still[1]))


def test_a_simulated_swap_of_several_pairs_costs_one_swap_and_each_further_pairs_bytes():
    from dia2stream.engine.simulated import GpuProfile, SimulatedDevice, SimulatedStepper
    from vendor_dia2.config import preset

    profile = GpuProfile(gpu="test", preset="tiny", full_step_ms={1: 0.0}, lite_step_ms={1: 0.0}, decode_ms={1: 0.0},
                         swap_ms=1.0, swap_pair_ms=0.25)
    device = SimulatedDevice()
    stepper = SimulatedStepper(preset("tiny"), profile, device, n_calls=20)
    before = device.busy_seconds
    stepper.swap_rows_many([(0, 3), (1, 2), (4, 5)])
    assert device.busy_seconds - before == pytest.approx((1.0 + 2 * 0.25) / 1000)
    stepper.swap_rows_many([(i, 19 - i) for i in range(9)])  # nine pairs: a swap of eight, then one
    assert device.busy_seconds - before == pytest.approx((1.5 + (1.0 + 7 * 0.25) + 1.0) / 1000)

"""The Mimi decode on a stream of its own (`--decode-stream on`, issue 18 item 3): a frame's
decode runs beside the next frame step instead of before it. What must hold: the same tokens,
words, events and PCM as with one stream, whatever else touches the codec's rows in between
(rollback marks and restores, resets, slot moves, voice warm-ups); and the overlap itself, timed
on the simulated device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_step_in_flight import CUDA_PCM_ATOL, MidTurn, assert_same, run_conversations


def fake_device():
    from dia2stream.engine.simulated import SimulatedDevice

    now = [0.0]
    device = SimulatedDevice(clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    return device, now


def test_a_decode_beside_overlaps_the_next_step_and_slows_it_by_its_share():
    device, now = fake_device()
    step = device.launch(0.010)
    decode = device.launch_beside(0.002, slowdown=0.5)
    assert decode == pytest.approx(0.012)  # after the step it decodes, not before
    following = device.launch(0.010)
    assert following == pytest.approx(0.021)  # beside the decode: 10 ms + half of its 2 ms, not 22 ms
    device.wait_until(decode)
    assert now[0] == pytest.approx(0.012)  # the PCM is there before the following step ends
    assert step < decode < following


def test_work_that_uses_the_codec_rows_waits_for_the_decodes_beside():
    device, now = fake_device()
    device.launch(0.010)
    decode = device.launch_beside(0.004)
    device.join_side()  # a snapshot of the rows, a restore, a reset, a slot move
    assert device.launch(0.001) == pytest.approx(decode + 0.001)
    device.synchronize()
    assert now[0] == pytest.approx(0.015)


def test_a_decode_beside_waits_for_the_one_before_it():
    device, _ = fake_device()
    device.launch(0.001)
    first = device.launch_beside(0.005)
    device.launch(0.001)  # the next step, beside the first decode
    assert device.launch_beside(0.005) == pytest.approx(first + 0.005)


@pytest.mark.parametrize("kind", ["conversation", "mid-turn"])
def test_on_the_simulated_gpu_the_tokens_and_events_do_not_depend_on_where_the_decode_runs(kind):
    """With a step in flight (the decode then overlaps the step launched after it), the same
    conversations as `test_step_in_flight`'s: voices, rollovers, text pushed mid-turn, a barge-in."""
    from dia2stream.engine.simulated import GpuProfile, SimulatedDia2

    conversation = {"conversation": None, "mid-turn": MidTurn}[kind]
    extra = {} if conversation is None else {"kind": conversation}
    tts = SimulatedDia2(GpuProfile.load("profiles/h200-2b.json"))
    settings = dict(context_frames=150, rollover_frames=50, min_turn_frames=40, **extra)
    one = run_conversations(tts, "on", decode_stream="off", **settings)
    beside = run_conversations(tts, "on", decode_stream="on", **settings)
    assert tts.device_clock.side_busy_until > 0, "no decode ran beside"
    assert_same(beside, one, pcm=False)


def test_the_server_flag_reaches_the_codec():
    from dia2stream.engine.engine import Engine
    from dia2stream.engine.simulated import GpuProfile, SimulatedDia2

    from helpers import engine_config

    tts = SimulatedDia2(GpuProfile.load("profiles/h200-2b.json"))
    for flag, side in (("on", True), ("off", False)):
        engine = Engine(tts, engine_config(tts, max_calls=2, decode_stream=flag))
        try:
            assert tts.codec.side_stream is side
        finally:
            engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_decode_beside_gives_the_pcm_of_one_stream():
    """The codec alone: frames decoded beside work queued on the caller's stream (a busy kernel
    standing in for the next step, which overwrites the codes after the decode was queued), with
    row snapshots, restores and resets in between, give the PCM of decodes in one stream."""
    from vendor_dia2.codec import MimiCodec

    def run(side: bool) -> list[np.ndarray]:
        codec = MimiCodec.load("random-small", device="cuda")
        codec.open_stream(4, decode_sizes=(1, 2), side_stream=side)
        g = torch.Generator(device="cuda").manual_seed(0)
        codes = torch.empty(4, 32, dtype=torch.long, device="cuda")
        busy = torch.randn(2048, 2048, device="cuda")
        out, marks = [], {}
        for frame in range(24):
            codes.random_(0, 2048, generator=g)
            rows = torch.tensor([True, frame % 2 == 0, frame % 3 == 0, frame > 12])
            pending = codec.decode_frame_async(codes, rows)
            codes.fill_(0)  # the next step's write, after the decode was queued
            for _ in range(4):
                busy = torch.tanh(busy @ busy)
            if frame == 6:
                marks = dict(zip((0, 2), codec.snapshot_rows([0, 2])))
            if frame == 15:
                codec.restore_row(0, marks[0])
                codec.reset_stream(torch.tensor([False, True, False, False]))
            pcm = pending.wait()
            out.append(pcm[rows[: pcm.shape[0]].numpy()])
        return out

    for a, b in zip(run(True), run(False)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_seeded_calls_get_the_same_tokens_and_pcm_with_the_decode_beside_or_not(tiny_dir):
    """The whole engine on a GPU, step in flight on, with the torch depformer (whose tokens do not
    depend on the padded batch a call steps in)."""
    from dia2stream.serve.config import CompileMode, KernelChoice
    from vendor_dia2 import Dia2

    tts = Dia2.from_pretrained(str(tiny_dir), device="cuda", mimi="random-small")
    settings = dict(context_frames=80, rollover_frames=30, min_turn_frames=20, kernels=KernelChoice.TORCH,
                    compile=CompileMode.OFF)
    one = run_conversations(tts, "on", decode_stream="off", **settings)
    beside = run_conversations(tts, "on", decode_stream="on", **settings)
    assert_same(beside, one, atol=CUDA_PCM_ATOL)


class _ReadyCodes:
    """What the runner reads of a stepper for decodes: its ready codes, one row per slot."""

    def __init__(self, rows: int):
        self.n, self.num_codebooks = rows, 32
        self.ready_codes = torch.zeros(rows, 32, dtype=torch.long)


def test_a_rollback_re_decode_frame_taken_in_a_steps_decode_leaves_the_row_as_one_decoded_alone():
    """A rolled-back call's codec row takes its re-decode frames in the decodes of steps the other
    calls run (`Runner.decode_later(replays=)`), or in decodes of its own (`Runner.replay`): the
    row ends the same either way, and so does its next frame's PCM."""
    from dia2stream.engine.runner import Runner
    from vendor_dia2.codec import MimiCodec

    g = torch.Generator().manual_seed(1)
    frames = [torch.randint(0, 2048, (4, 32), generator=g) for _ in range(9)]

    def run(beside: bool) -> np.ndarray:
        torch.manual_seed(0)
        codec = MimiCodec.load("random-small")
        codec.open_stream(4)
        stepper = _ReadyCodes(4)
        runner = Runner(stepper, codec, rows=4)
        mark = None
        for i in range(5):
            if i == 2:
                mark = codec.snapshot_row(1)
            stepper.ready_codes.copy_(frames[i])
            runner.decode_later([0, 1, 2, 3]).wait()
        codec.restore_row(1, mark)  # rolled back to before frame 2: frames 2-4 are re-decoded
        for i in range(2, 5):
            if beside:  # while the others step on to frames 5-7
                stepper.ready_codes.copy_(frames[i + 3])
                runner.decode_later([0, 2, 3], {1: frames[i][1]}).wait()
            else:
                runner.replay(1, frames[i][1])
        stepper.ready_codes.copy_(frames[8])
        return runner.decode_later([1]).wait()[0][1]

    np.testing.assert_allclose(run(True), run(False), atol=1e-5)
    assert not np.allclose(run(True), 0)

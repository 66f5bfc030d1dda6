"""CUDA-only checks of the graph path (skipped without a GPU; run on the GPU machine)."""

import contextlib

import numpy as np
import pytest
import torch

from vendor_dia2.runtime import SamplingParams
from vendor_dia2.script import parse_script

from stepping import step_pattern

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def gpu_tts(tiny_dir):
    from vendor_dia2 import Dia2

    return Dia2.from_pretrained(str(tiny_dir), device="cuda", dtype=torch.float32)


def _run(tts, graph: bool, cfg: bool, frames: int = 40, **options):
    stepper = tts.new_stepper(cfg=cfg, max_positions=256, use_cuda_graph=graph, **options)
    stepper.set_sampling(0, SamplingParams(seed=7, cfg_scale=2.0 if cfg else 1.0))
    machine = tts.new_state_machine()
    machine.push(parse_script("[S1] Hello there, how are you doing today?", tts.tokenizer))
    actions, codes = [], []
    for t in range(frames):
        action = stepper.step([machine.preview(t)])[0]
        machine.process(t, action)
        actions.append(action)
        codes.append(stepper.codes.clone())
    return actions, torch.stack(codes), machine.transcript


@pytest.mark.parametrize("cfg", [False, True])
def test_graph_path_matches_eager_tokens(gpu_tts, cfg):
    eager = _run(gpu_tts, graph=False, cfg=cfg)
    graph = _run(gpu_tts, graph=True, cfg=cfg)
    assert eager[0] == graph[0]
    assert torch.equal(eager[1], graph[1])
    assert eager[2] == graph[2]


def test_graph_replay_after_restore_is_deterministic(gpu_tts):
    stepper = gpu_tts.new_stepper(cfg=True, max_positions=128, use_cuda_graph=True)
    d = gpu_tts.config.data
    pad, new = (d.text_pad_token_id,) * 2, (d.text_new_word_token_id, 20)
    for _ in range(4):
        stepper.step([(pad, new)])
    snap = stepper.snapshot()
    first = []
    for _ in range(5):
        stepper.step([(pad, new)])
        first.append(stepper.codes.clone())
    stepper.restore(snap)
    for expected in first:
        stepper.step([(pad, new)])
        assert torch.equal(stepper.codes, expected)


def test_graphed_mimi_stream_matches_eager():
    from vendor_dia2.codec import MimiCodec

    codec = MimiCodec.load("random", device="cuda")
    codes = torch.randint(0, 2048, (1, 32, 8), generator=torch.Generator().manual_seed(0)).cuda()
    codec.use_cuda_graph = False
    codec.open_stream(1)
    eager = [codec.decode_frame(codes[:, :, i]) for i in range(8)]
    codec.use_cuda_graph = True
    codec.open_stream(1)
    assert codec.stream_graphed
    graphed = [codec.decode_frame(codes[:, :, i]) for i in range(4)]
    snap = codec.snapshot_stream()
    graphed += [codec.decode_frame(codes[:, :, i]) for i in range(4, 8)]
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    codec.restore_stream(snap)  # restore copies in place: the graph keeps working
    again = [codec.decode_frame(codes[:, :, i]) for i in range(4, 8)]
    for a, b in zip(graphed[4:], again):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    codec.reset_stream()
    torch.testing.assert_close(codec.decode_frame(codes[:, :, 0]), eager[0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_triton_graph_matches_triton_eager_tokens(gpu_tts, cfg, weights):
    eager = _run(gpu_tts, graph=False, cfg=cfg, kernels="triton", weights=weights)
    graph = _run(gpu_tts, graph=True, cfg=cfg, kernels="triton", weights=weights)
    assert eager[0] == graph[0]
    assert torch.equal(eager[1], graph[1])
    codes = graph[1][gpu_tts.config.data.max_delay:]
    assert codes.min() >= 0 and codes.max() < 2048  # real codes, never pad/bos, once every stage is read


def test_compiled_graph_matches_eager_tokens(gpu_tts):
    eager = _run(gpu_tts, graph=False, cfg=True, frames=20)
    stepper = gpu_tts.new_stepper(cfg=True, max_positions=256, use_cuda_graph=True, compile=True)
    stepper.set_sampling(0, SamplingParams(seed=7, cfg_scale=2.0))
    machine = gpu_tts.new_state_machine()
    machine.push(parse_script("[S1] Hello there, how are you doing today?", gpu_tts.tokenizer))
    codes = []
    for t in range(20):
        machine.process(t, stepper.step([machine.preview(t)])[0])
        codes.append(stepper.codes.clone())
    assert torch.equal(eager[1], torch.stack(codes))


def _batched_run(tts, graph: bool, pattern, cfg: bool = True, **options):
    """Four slots stepped under a changing active pattern (padding to 1, 2 and 4 slots, both lanes)."""
    stepper = tts.new_stepper(n_calls=4, cfg=cfg, max_positions=128, use_cuda_graph=graph, **options)
    actions, _ = step_pattern(tts, stepper, pattern, cfg)
    return actions, torch.stack([stepper.written_codes(c) for c in range(4)]), [stepper.position(c) for c in range(4)]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_batched_graphs_match_eager_under_any_active_pattern(gpu_tts, kernels):
    pattern = [[True, False, False, False]] * 6 + [[True, True, False, False]] * 6 + \
              [[False, True, True, True]] * 20 + [[True, True, True, True]] * 10 + [[False, False, False, True]] * 4
    eager = _batched_run(gpu_tts, graph=False, pattern=pattern, kernels=kernels)
    graph = _batched_run(gpu_tts, graph=True, pattern=pattern, kernels=kernels)
    assert eager[0] == graph[0]
    assert torch.equal(eager[1], graph[1])
    assert eager[2] == graph[2] == [22, 36, 30, 34]


def test_decoder_only_lane_in_graphs_matches_full_steps(gpu_tts):
    results = []
    for skip in (True, False):
        stepper = gpu_tts.new_stepper(cfg=True, max_positions=128, use_cuda_graph=True)
        stepper.skip_unread_stages = skip
        stepper.set_sampling(0, SamplingParams(seed=7))
        machine = gpu_tts.new_state_machine()
        machine.push(parse_script("[S1] Hello there, how are you doing today?", gpu_tts.tokenizer))
        for t in range(30):
            machine.process(t, stepper.step([machine.preview(t)])[0])
        results.append((stepper.written_codes(0).clone(), machine.transcript))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def _prefixed_run(tts, graph: bool):
    """Three slots: an upstream-boundary prefix (cache offset 1), a clean one, a fresh call; padded
    batches and both lanes, then a snapshot restored into another slot."""
    d = tts.config.data
    stepper = tts.new_stepper(n_calls=3, cfg=True, max_positions=96, use_cuda_graph=graph)
    frames = 10
    delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay), generator=torch.Generator().manual_seed(4))
    for k, delay in enumerate(d.delay_pattern):
        delayed[k, :delay] = d.audio_bos
    text = torch.full((frames + 1, 2), d.text_pad_token_id)
    machines = []
    for call, boundary in enumerate(("upstream", "clean", None)):
        stepper.set_sampling(call, SamplingParams(seed=call))
        if boundary:
            stepper.prefill(call, delayed, text, frames, boundary=boundary)
        m = tts.new_state_machine()
        m.push(parse_script("[S1] Hello there, how are you doing today?", tts.tokenizer))
        machines.append(m)
    pattern = [[True, False, False]] * 3 + [[True, True, True]] * 12 + [[False, True, True]] * 4
    for active in pattern:
        choices = [m.preview(stepper.position(i)) if active[i] else None for i, m in enumerate(machines)]
        got = stepper.step(choices, active)
        for i, m in enumerate(machines):
            if active[i]:
                m.process(stepper.position(i) - 1, got[i])
    stepper.restore(stepper.snapshot(0), 2)  # the offset travels with the snapshot
    stepper.set_sampling(2, SamplingParams(seed=0))
    machines[2].restore(machines[0].snapshot())
    for _ in range(6):
        choices = [m.preview(stepper.position(i)) for i, m in enumerate(machines)]
        got = stepper.step(choices)
        for i, m in enumerate(machines):
            m.process(stepper.position(i) - 1, got[i])
    return (torch.stack([stepper.written_codes(c) for c in range(3)]), [stepper.position(c) for c in range(3)],
            [stepper.place(c).cache_offset for c in range(3)])


def test_graphs_match_eager_after_prefixes_of_both_boundaries(gpu_tts):
    eager = _prefixed_run(gpu_tts, graph=False)
    graph = _prefixed_run(gpu_tts, graph=True)
    assert torch.equal(eager[0], graph[0])
    assert eager[1] == graph[1] == [30, 32, 30] and eager[2] == graph[2] == [1, 0, 1]
    assert torch.equal(graph[0][0], graph[0][2])  # slot 2 replayed slot 0 from its snapshot


def test_compiled_small_batches_and_eager_large_ones_match_eager(gpu_tts):
    """compile_max_calls=1: the 1-slot graphs run compiled, the 2- and 4-slot graphs eager."""
    pattern = [[True, False, False, False]] * 8 + [[True, True, True, True]] * 14 + [[True, False, False, False]] * 6
    eager = _batched_run(gpu_tts, graph=False, pattern=pattern)
    mixed = _batched_run(gpu_tts, graph=True, pattern=pattern, compile=True, compile_max_calls=1)
    assert eager[0] == mixed[0]
    assert torch.equal(eager[1], mixed[1])


@pytest.mark.parametrize("compile", [False, True])
def test_bucketed_cache_graphs_match_whole_cache_eager(gpu_tts, compile):
    """Graphs per cache bucket (8 and 16 slots here) draw what eager steps over the whole cache draw."""
    pattern = [[True, False, False, False]] * 10 + [[True, True, True, True]] * 12 + [[False, True, False, False]] * 4
    eager = _batched_run(gpu_tts, graph=False, pattern=pattern, cache_buckets=())
    graph = _batched_run(gpu_tts, graph=True, pattern=pattern, cache_buckets=(8, 16), compile=compile)
    assert eager[0] == graph[0]
    assert torch.equal(eager[1], graph[1])


def test_graphs_compiled_with_every_shape_dynamic_match_whole_cache_eager(gpu_tts, monkeypatch):
    """`--compile-dynamic on`: one compile serves every batch size and cache bucket, and draws
    what eager draws."""
    from vendor_dia2 import graphs

    monkeypatch.setattr(graphs, "DYNAMIC_SHAPES", True)
    torch._dynamo.reset()  # no code compiled with automatic shapes serves this stepper
    try:
        pattern = [[True, False, False, False]] * 10 + [[True, True, True, True]] * 12 + [[False, True, False, False]] * 4
        eager = _batched_run(gpu_tts, graph=False, pattern=pattern, cache_buckets=())
        graph = _batched_run(gpu_tts, graph=True, pattern=pattern, cache_buckets=(8, 16), compile=True)
    finally:
        torch._dynamo.reset()
    assert eager[0] == graph[0]
    assert torch.equal(eager[1], graph[1])


# -- calls moved between slots (issue 18) --------------------------------------------------------

@pytest.mark.parametrize("together", [False, True])
@pytest.mark.parametrize("graphed_swaps", [False, True])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_moved_calls_under_graphs_give_the_tokens_of_unmoved_calls_in_eager(gpu_tts, kernels, graphed_swaps, together,
                                                                           monkeypatch):
    """With the torch depformer a call's tokens do not depend on its slot: moved and graphed, it
    draws what it draws unmoved and eager. The Triton depformer runs at <= 4 model rows only
    (cuBLAS above), so its tokens follow the padded batch a call steps in, which a move changes
    (as its neighbours always did): there, moved under graphs equals moved in eager."""
    from stepping import MOVE_PATTERN, MOVES, MOVES_TOGETHER, step_with_moves
    from vendor_dia2 import row_swap

    monkeypatch.setattr(row_swap, "GRAPHED", graphed_swaps)
    moves = MOVES_TOGETHER if together else MOVES  # `together`: several pairs in one swap (one replay)

    def run(graph: bool, moves):
        stepper = gpu_tts.new_stepper(n_calls=4, cfg=True, max_positions=128, use_cuda_graph=graph, kernels=kernels)
        assert stepper.slots.swap_graphed == (graph and graphed_swaps)
        return step_with_moves(gpu_tts, stepper, MOVE_PATTERN, moves)

    eager, graphed = run(False, {} if kernels == "torch" else moves), run(True, moves)
    assert graphed[0] == eager[0]
    assert all(torch.equal(a, b) for a, b in zip(graphed[1], eager[1]))
    assert graphed[2] == eager[2]


@pytest.mark.parametrize("graphed_swaps", [False, True])
def test_graphed_mimi_decodes_of_leading_rows_and_swaps_match_the_whole_stream_eager(graphed_swaps, monkeypatch):
    from vendor_dia2 import row_swap
    from vendor_dia2.codec import MimiCodec

    monkeypatch.setattr(row_swap, "GRAPHED", graphed_swaps)

    codec = MimiCodec.load("random", device="cuda")
    codes = torch.randint(0, 2048, (8, 32, 6), generator=torch.Generator().manual_seed(0)).cuda()
    codec.use_cuda_graph = False
    codec.open_stream(8)
    whole = torch.stack([codec.decode_frame(codes[:, :, t]) for t in range(6)], 1)
    codec.use_cuda_graph = True
    codec.open_stream(8, decode_sizes=(1, 2, 4))
    assert codec.stream_graphed and codec.swap_graphed == graphed_swaps
    low, high = torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)
    low[:3], high[3:] = True, True
    out = torch.zeros_like(whole)
    for t in range(3):
        pcm = codec.decode_frame(codes[:, :, t], low)
        assert pcm.shape[0] == 4
        out[:3, t] = pcm[:3]
    for t in range(3):
        out[3:, t] = codec.decode_frame(codes[:, :, t], high)[3:]
    codec.swap_rows(1, 6)
    order = [0, 6, 2, 3, 4, 5, 1, 7]
    for t in range(3, 6):
        out[order, t] = codec.decode_frame(codes[order, :, t])
    torch.testing.assert_close(out, whole, atol=1e-4, rtol=1e-3)


def test_a_decode_queued_with_its_pcm_on_the_way_gives_what_a_blocking_decode_gives():
    from vendor_dia2.codec import MimiCodec

    codec = MimiCodec.load("random", device="cuda")
    codes = torch.randint(0, 2048, (4, 32, 4), generator=torch.Generator().manual_seed(1)).cuda()
    rows = torch.tensor([True, True, False, False])
    codec.open_stream(4, decode_sizes=(1, 2))
    snap = codec.snapshot_stream()
    blocking = [codec.decode_frame(codes[:, :, t], rows).cpu().numpy() for t in range(4)]
    codec.restore_stream(snap)
    pending = [codec.decode_frame_async(codes[:, :, t], rows) for t in range(1)]
    queued = [pending[0].wait()] + [codec.decode_frame_async(codes[:, :, t], rows).wait() for t in range(1, 4)]
    for a, b in zip(blocking, queued):
        assert a.shape == b.shape == (2, 1920)
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_compiled_graphs_with_the_batched_stage_attention_match_eager(gpu_tts, monkeypatch):
    """`--batched-stage-attention on`, the server's path: the 4-slot batch (8 rows, past
    FUSED_MAX_ROWS) runs the torch stages with their attention as one Triton launch, compiled (a
    graph break at the launch, the stage's slot a dynamic int) and captured in CUDA graphs; the
    1- and 2-slot batches run the Triton depformer. The tokens of the same stages run eagerly."""
    from vendor_dia2 import decode_attention, model

    monkeypatch.setattr(model, "BATCHED_STAGE_ATTENTION", True)
    monkeypatch.setattr(decode_attention, "ENABLED", False)  # run 21: this test failed with it on, passed off
    pattern = [[True, True, True, True]] * 24 + [[True, False, False, False]] * 6 + [[True, True, True, True]] * 6
    eager = _batched_run(gpu_tts, graph=False, pattern=pattern, kernels="triton")
    graph = _batched_run(gpu_tts, graph=True, pattern=pattern, kernels="triton", compile=True)
    assert eager[0] == graph[0]
    assert torch.equal(eager[1], graph[1])
    assert sum(map(sum, graph[0])) > 0  # words were taken


def test_a_step_launch_its_decode_rollback_marks_and_a_calls_start_never_wait_for_the_device(gpu_tts):
    """With a step in flight the host works on the step before while the GPU runs: anything in the
    launch path, or in a command handled between steps, that blocks until the stream is done (a
    pageable copy, a `.item()`) makes the host sit out a whole step. Run 35 (H200): the rollback
    marks' row index, a blocking copy, cost ~10-14 ms of every 64-call step; each call's start
    waited on the step in flight three times (its codec row's reset mask, the voice snapshot's
    position read back, the slot's text inputs read back)."""
    run_launch_path(gpu_tts, "cuda")


@contextlib.contextmanager
def device_syncs(mode: str, cuda: bool):
    """torch's sync debug mode (`warn` or `error`) on CUDA while the block runs, from an idle
    device; nothing on the CPU."""
    if not cuda:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def run_launch_path(tts, device: str) -> None:
    from dia2stream.engine.runner import Runner
    from vendor_dia2.codec import MimiCodec

    n = 4
    stepper = tts.new_stepper(n_calls=n, cfg=True, max_positions=128, use_cuda_graph=device == "cuda")
    codec = MimiCodec.load("random", device=device)
    codec.open_stream(n, decode_sizes=(1, 2, 4), side_stream=device == "cuda")
    runner = Runner(stepper, codec, rows=n)
    d = tts.config.data
    known = ((d.text_pad_token_id,) * 2, (d.text_new_word_token_id, 20))
    choices = {slot: (known, known) for slot in range(n)}
    for _ in range(30):  # past the delays (the full lane, frames ready) and every graph captured
        runner.launch(choices).wait()
        runner.decode_later(list(range(n))).wait()
        runner.snapshot_codec_rows([0, 2])
    voice = stepper.snapshot(0)  # a prepared voice's state, as a call's start restores it
    reset_row = torch.zeros(n, dtype=torch.bool)
    reset_row[2] = True
    with device_syncs("error", device == "cuda"):
        first = runner.launch(choices)
        second = runner.launch(choices)  # one in flight behind another, as the engine runs
        marks = runner.snapshot_codec_rows([1, 3])
        decode = runner.decode_later(list(range(n)))
        # what a call's start and a rollback do meanwhile, between steps
        stepper.reset_call(2)
        codec.reset_stream(reset_row)
        stepper.restore(voice, 2)
        stepper.rewind(3, stepper.position(3) - 2, known[0])
    assert len(first.wait().actions) == len(second.wait().actions) == n
    pcm, _ = decode.wait()
    assert pcm.shape[0] == n and len(marks) == 2


def test_a_calls_commands_never_wait_for_the_device_between_steps(gpu_tts, tmp_path):
    """Start (with and without a voice), a next turn, a barge-in and reset on four calls, with the
    engine stepping: no synchronizing op on the generation thread (torch's sync debug mode). Each
    would wait for the step in flight: run 35b's lock-step starts came in pairs of steps with
    33-63 ms between them. Run 35c named SlotTable.place's and reset's element assignments."""
    found = run_commands_counting_syncs(gpu_tts, tmp_path)
    assert not found, "\n".join(f"{n} x [{phase}] {where}" for (phase, where), n in found.items())


def run_commands_counting_syncs(tts, tmp_path) -> dict:
    """The synchronizing ops (by phase and our innermost frames) the engine thread ran while four
    calls took a start, a next turn, a barge-in and a reset, twice (on CPU: none, the scenario only)."""
    import collections
    import queue
    import traceback
    import warnings

    from dia2stream.call.call import AudioFrame
    from dia2stream.engine.engine import Engine
    from dia2stream.serve.config import CompileMode
    from dia2stream.voices.voice import VoiceRequest, VoiceSettings
    from dia2stream.wire import protocol as p
    from helpers import engine_config
    from test_voice import tone, wav_bytes

    cuda = tts.device.type == "cuda"
    engine = Engine(tts, engine_config(tts, compile=CompileMode.OFF, max_calls=4, max_lead_ms=400,
                                       max_unsent_frames=10**9, voice=VoiceSettings(cache_dir=str(tmp_path))))
    found, phase = collections.Counter(), ["warm-up"]

    def count(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):
            ours = [f for f in traceback.extract_stack()[:-1]
                    if "dia2stream" in f.filename or "vendor_dia2" in f.filename][::-1][:4]
            found[(phase[0], " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in ours))] += 1

    boxes = [queue.Queue() for _ in range(4)]
    calls = [engine.open_call(box.put) for box in boxes]

    def wait_all(kind):
        for box in boxes:
            while not isinstance(item := box.get(timeout=60), kind):
                assert not isinstance(item, p.ErrorEvent), item

    text = "[S1] One two three four five six seven eight nine ten."
    try:
        engine.preload_voice(VoiceRequest("v", audio=wav_bytes(tone(0.8)), transcript="[S1] Hi there."), cache=False)
        for call in calls:  # every graph and lane once, before counting
            engine.submit(call, p.Start(text=text, seed=1, id="w"))
        wait_all(p.Done)
        with warnings.catch_warnings(), device_syncs("warn", cuda):
            warnings.simplefilter("always")
            warnings.showwarning = count
            for round_ in range(2):
                phase[0] = "start"
                for i, call in enumerate(calls):
                    engine.submit(call, p.Start(text=text, seed=round_, id="s", voice="v" if i % 2 else None))
                wait_all(p.Done)
                phase[0] = "next turn"
                for call in calls:
                    engine.submit(call, p.Inject(text=" Eleven twelve thirteen.", id="n"))
                wait_all(p.Done)
                phase[0] = "barge-in"
                for call in calls:
                    engine.submit(call, p.Inject(text=" Fourteen fifteen sixteen seventeen.", id="b"))
                wait_all(AudioFrame)  # and one more, so that 120 ms were sent
                wait_all(AudioFrame)
                for call in calls:
                    engine.submit(call, p.Pause(played_ms=120.0, id="barge"))
                wait_all(p.Paused)
                for call in calls:
                    engine.submit(call, p.Inject(text=" Okay then.", id="a"))
                wait_all(p.Done)
                phase[0] = "reset"
                for call in calls:
                    engine.submit(call, p.Reset())
                wait_all(p.ResetDone)
    finally:
        engine.close()
    return found

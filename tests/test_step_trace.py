"""The engine's step trace (`--step-trace`, engine/step_trace.py) and its reader (tools/step_trace.py)."""

from __future__ import annotations

import io
import json
import queue

import pytest

from dia2stream.engine.engine import Engine
from dia2stream.engine.simulated import GpuProfile, SimulatedDia2
from dia2stream.engine.step_trace import StepTrace
from dia2stream.tools import step_trace as tool
from dia2stream.wire import protocol as p

from helpers import engine_config

PROFILE = GpuProfile(gpu="test", preset="2b", full_step_ms={1: 4.0, 64: 8.0}, lite_step_ms={1: 1.5, 64: 3.0},
                     decode_ms={1: 1.0, 64: 2.0}, prefill_ms_per_frame=0.1)


def line(t, kind="step", **fields) -> str:
    return json.dumps({"t": t, "kind": kind, **fields})


def step(t, reason, starting=(), full=False, calls=1, batch=1) -> str:
    return line(t, reason=reason, calls=calls, batch=batch, full=full, starting=list(starting))


def test_a_start_up_window_counts_its_own_steps_and_what_ran_beside_it(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join([
        step(0.000, "starting", [7]),
        line(0.001, "moves", count=2),
        step(0.002, "deadline", full=True, calls=40, batch=64),  # turn 7 sat this one out
        step(0.020, "starting", [7, 8], full=True, calls=2, batch=2),
        line(0.021, "planned", what="replay"),
        step(0.030, "starting", [7]),
        step(0.900, "starting", [7]),  # much later: a second window of turn 7 (after a resume)
        step(0.910, "top-up", full=True, calls=30, batch=64),
    ]) + "\n")
    events = tool.read_events(trace)
    found = sorted(tool.windows(events), key=lambda w: (w.turn, w.first))
    assert [(w.turn, w.first, w.last) for w in found] == [(7, 0, 5), (7, 6, 6), (8, 3, 3)]
    first = found[0]
    assert first.own == {"starting decoder-only": 2, "starting full": 1}
    assert first.beside == {"moves": 2, "deadline full": 1, "planned": 1}
    assert first.seconds(events) == pytest.approx(0.030)
    s = tool.summary(events)
    assert s["windows"] == 3 and s["moves"] == 2 and s["planned"] == 1
    assert s["steps"]["starting"]["steps"] == 4 and s["steps"]["starting"]["full_share"] == 0.25
    out = io.StringIO()
    tool.print_summary(s, out)
    assert "start-up windows: 3" in out.getvalue()


def test_applied_steps_give_costs_by_batch_and_lane_and_are_not_counted_beside_a_start_up(tmp_path):
    def applied(t, batch, full, since):
        return line(t, "applied", batch=batch, full=full, since_launch_ms=since, wait_ms=since / 2, host_ms=1.0)

    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join([
        step(0.000, "starting", [3]),
        applied(0.003, 1, False, 3.0),
        step(0.004, "deadline", full=True, calls=40, batch=64),
        step(0.005, "starting", [3]),
        applied(0.012, 64, True, 8.0),
        applied(0.013, 1, False, 9.0),
    ]) + "\n")
    events = tool.read_events(trace)
    (window,) = tool.windows(events)
    assert window.beside == {"deadline full": 1}
    costs = tool.summary(events)["step_costs"]
    assert costs["1 decoder-only"]["steps"] == 2 and costs["1 decoder-only"]["since_launch_ms_p95"] == 9.0
    assert costs["64 full"]["wait_ms_p50"] == 4.0
    out = io.StringIO()
    tool.print_summary(tool.summary(events), out)
    assert "64 full:      1 steps, 8.0 / 8.0, 4.0 / 4.0, 1.0 / 1.0" in out.getvalue()


def test_the_reader_names_a_line_that_is_not_a_trace_line(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(step(0.0, "starting", [1]) + "\nnot json\n")
    with pytest.raises(SystemExit, match="trace.jsonl:2"):
        tool.read_events(trace)
    (tmp_path / "empty").write_text("")
    assert tool.main([str(tmp_path / "empty")]) == 1


def test_with_no_file_the_trace_writes_nothing():
    trace = StepTrace.to_file(None)
    assert not trace.on
    trace.step("starting", [], 1, False)
    trace.moves(3)
    trace.planned("replay")
    trace.applied(1, True, 0.01, 0.005, 0.001)
    trace.close()


@pytest.mark.slow
def test_an_engine_traces_a_new_turns_steps_until_its_first_audio(tmp_path):
    path = tmp_path / "steps.jsonl"
    tts = SimulatedDia2(PROFILE)
    engine = Engine(tts, engine_config(tts, max_calls=4, step_trace=str(path)))
    got = queue.Queue()
    call = engine.open_call(got.put)
    try:
        engine.submit(call, p.Start(text="[S1] Hello there, how are you?", id="a"))
        while not isinstance(got.get(timeout=60), p.Done):
            pass
        serial = call.turn.serial  # before the close: a closed call forgets its turn
    finally:
        engine.close_call(call)
        engine.close()  # flushes the trace
    events = tool.read_events(path)
    assert {e["kind"] for e in events} == {"step", "applied"}
    assert len([e for e in events if e["kind"] == "applied"]) == len([e for e in events if e["kind"] == "step"])
    assert all(e["since_launch_ms"] >= e["wait_ms"] >= 0 for e in events if e["kind"] == "applied")
    events = [e for e in events if e["kind"] == "step"]
    starting = [e for e in events if e["starting"]]
    assert starting and all(e["reason"] == "starting" and e["batch"] == 1 for e in starting)
    assert {turn for e in starting for turn in e["starting"]} == {serial}
    # a new turn's first steps read no codebook: the decoder-only lane, then full ones
    assert not starting[0]["full"] and starting[-1]["full"]
    assert tool.summary(events)["windows"] == 1


def test_a_trace_file_in_a_folder_that_does_not_exist_is_refused_at_the_command_line(tmp_path, capsys):
    from dia2stream.serve.config import parse_args

    assert parse_args(["--step-trace", str(tmp_path / "steps.jsonl")], environ={}).step_trace.endswith("steps.jsonl")
    with pytest.raises(SystemExit):
        parse_args(["--step-trace", str(tmp_path / "nowhere" / "steps.jsonl")], environ={})
    assert "--step-trace: the folder of" in capsys.readouterr().err

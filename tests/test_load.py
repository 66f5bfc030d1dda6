"""The load script (dia2stream/load.py): its figures on hand-made turns, and real runs against the
server on the tiny checkpoint (127.0.0.1)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from dia2stream.tools import load


def test_turn_metrics_and_summary_from_a_hand_made_timeline():
    start = load.Turn("start", "c0-t0", sent_at=1.0, segments=[[1.2, 1.21, 1.22, 1.5]],
                      words=[("Hi", 2), ("there", 3)], done={"ttfa_ms": 199.0})
    inject = load.Turn("inject", "c0-t1", sent_at=3.0, segments=[[3.05, 3.06], [4.0, 4.01]],
                       resumed_at=[3.9], words=[("Bye", 1)], paused=True, done={})
    m = start.metrics()
    assert m["ttfb_ms"] == pytest.approx(200) and m["onset_ms"] == pytest.approx(360)
    assert m["underruns"] == 1 and m["stall_ms"] == pytest.approx(60)  # arrived 1.5 s, due 1.44 s
    assert m["words"] == ["Hi", "there"] and m["frames"] == 4
    m = inject.metrics()
    assert m["onset_ms"] == pytest.approx(130) and m["underruns"] == 0  # the pause is no underrun
    assert m["gaps_ms"] == pytest.approx([10, 10])  # gaps within segments only

    calls = [load.Call(0, turns=[start, inject], finished=True), load.Call(1, busy=True, close_code=1013)]
    summary = load.summarize(calls, wall_s=5.0)
    assert summary["busy_refusals"] == 1 and summary["calls_with_errors"] == 0
    assert summary["by_kind"]["start"]["onset_ms"]["p50"] == pytest.approx(360)
    assert summary["by_kind"]["inject"]["ttfb_ms"]["p50"] == pytest.approx(50)
    assert summary["by_kind"]["all"]["turns"] == 2
    assert summary["underruns"] == 1
    assert "speech onset, inject (ms)" in load.format_table(summary)


def test_arguments_are_bounded():
    for bad in (["--calls", "0"], ["--calls", "100000"], ["--turns", "0"], ["http://127.0.0.1:1/"],
                ["--duration-limit", "0"], ["--user-turn-file", "caller.mp3", "hi"],
                ["--user-turn-file", "missing.wav", "hi"], ["--pattern", "call-centre", "--arrival-window", "-1"]):
        with pytest.raises(SystemExit):
            load.parse_args(bad)
    assert load.parse_args([]).url == "ws://127.0.0.1:8765/"


def test_call_centre_options_are_refused_with_the_lock_step_pattern(capsys):
    for option in (["--arrival-window", "5"], ["--barge-in-every", "0"], ["--user-turn-seconds", "2"]):
        with pytest.raises(SystemExit):
            load.parse_args(option)
        assert f"{option[0]}: only with --pattern call-centre" in capsys.readouterr().err
        args = load.parse_args(["--pattern", "call-centre", *option])
        assert getattr(args, option[0][2:].replace("-", "_")) == float(option[1])
    defaults = load.parse_args(["--pattern", "call-centre"])
    assert (defaults.arrival_window, defaults.barge_in_every, defaults.user_turn_seconds) == (20.0, 5, 0.0)


def test_a_missing_caller_file_is_named_missing(capsys, tmp_path):
    with pytest.raises(SystemExit):
        load.parse_args(["--pattern", "call-centre", "--user-turn-file", str(tmp_path / "nobody.wav"), "hi"])
    assert "does not exist" in capsys.readouterr().err


def max_calls(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return int(json.loads(response.read()).get("max_calls", 1))


SHORT = ["--text", "[S1] Hi there.", "--inject-text", " Bye now.", "--quiet", "--duration-limit", "120"]


@pytest.mark.slow
def test_one_call_two_turns_with_a_pause(server, tmp_path, capsys):
    out = tmp_path / "load.json"
    status = load.main([server.url, "--calls", "1", "--turns", "2", "--pause-every", "2", "--json", str(out),
                        "--text", "[S1] One two three four five six.", *SHORT[2:]])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert status == 0, report["summary"]["errors"]
    assert "speech onset, start (ms)" in table
    summary = report["summary"]
    assert (summary["calls"], summary["finished"], summary["busy_refusals"]) == (1, 1, 0)
    assert summary["by_kind"]["start"]["turns"] == 1 and summary["by_kind"]["inject"]["turns"] == 1
    first, second = report["calls"][0]["turns"]
    assert first["kind"] == "start" and second["kind"] == "inject" and second["paused"]
    assert first["words"] == "One two three four five six.".split() and second["words"] == ["Bye", "now."]
    for turn in (first, second):
        assert turn["done"] and turn["frames"] > 0 and turn["error"] is None
        assert 0 < turn["ttfb_ms"] <= turn["onset_ms"] < 10_000
        # the server's ttfa cannot exceed what the client saw
        assert turn["server_ttfa_ms"] <= turn["ttfb_ms"] + 50


@pytest.mark.slow
def test_calls_beyond_the_servers_slots_are_refused_busy(server, tmp_path):
    out = tmp_path / "load.json"
    calls = 2
    status = load.main([server.url, "--calls", str(calls), "--turns", "1", "--busy-retries", "0", "--json", str(out),
                        *SHORT])
    summary = json.loads(out.read_text())["summary"]
    assert status == 0, summary["errors"]
    slots = max_calls(server.port)
    assert summary["busy_refusals"] == max(0, calls - slots)
    assert summary["finished"] == min(calls, slots)
    refused = [c for c in json.loads(out.read_text())["calls"] if c["busy"]]
    assert all(c["close_code"] == 1013 for c in refused)


@pytest.mark.slow
def test_a_busy_call_tries_again_and_is_served_once_a_slot_frees(server, tmp_path):
    out = tmp_path / "load.json"
    slots = max_calls(server.port)
    calls = slots + 1
    # 20 tries with a backoff of up to 2 s: far longer than the other calls' short turn takes
    status = load.main([server.url, "--calls", str(calls), "--turns", "1", "--busy-retries", "20", "--json", str(out),
                        *SHORT])
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert status == 0, summary["errors"]
    assert summary["finished"] == calls and summary["busy_refusals"] == 0
    assert summary["busy_retried"] >= 1
    assert sum(c["refusals"] > 0 for c in report["calls"]) >= 1


@pytest.mark.slow
def test_duration_limit_stops_the_run_and_keeps_what_was_measured(server, tmp_path):
    out = tmp_path / "load.json"
    t0 = time.perf_counter()
    status = load.main([server.url, "--calls", "1", "--turns", "50", "--duration-limit", "1.5", "--quiet",
                        "--text", "[S1] " + " ".join(["word"] * 40), "--json", str(out)])
    assert time.perf_counter() - t0 < 10
    report = json.loads(out.read_text())
    assert status == 1
    assert any("duration-limit" in e for e in report["summary"]["errors"])
    assert report["calls"][0]["turns"][0]["frames"] > 0  # the cut-off turn is still reported


def recorded_caller(path) -> list[str]:
    """A 2 s recorded caller's turn (a 16 kHz WAV file) for `--user-turn-file`."""
    import numpy as np
    import soundfile as sf

    t = np.arange(32_000) / 16_000
    sf.write(path, 0.3 * np.sin(2 * np.pi * 180 * t), 16_000, subtype="PCM_16")
    return ["--user-turn-file", str(path), "yes that is right"]


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["synthetic", "recorded"])
def test_call_centre_sends_a_callers_turn_before_each_agent_turn_after_the_first(server, tmp_path, caller):
    out = tmp_path / "load.json"
    turn = ["--user-turn-seconds", "2"] if caller == "synthetic" else recorded_caller(tmp_path / "caller.wav")
    status = load.main([server.url, "--pattern", "call-centre", "--calls", "1", "--turns", "2", "--arrival-window", "0",
                        "--barge-in-every", "0", *turn, "--seed", "0", "--quiet", "--json", str(out)])
    report = json.loads(out.read_text())
    assert status == 0, report["summary"]["errors"]
    summary, (call,) = report["summary"], report["calls"]
    assert summary["user_turns"] == 1 and summary["user_turn_prefill_ms"]["n"] == 1
    assert len(call["user_turn_prefill_ms"]) == 1 and call["user_turn_prefill_ms"][0] >= 0
    assert [t["kind"] for t in call["turns"]] == ["first", "next"] and all(t["done"] for t in call["turns"])

"""`python -m dia2stream.tools.load ... --plot` (issue 23): the picture is drawn from the run's
own turns, and a saved --json run draws the same way. matplotlib is the `plot` extra."""

from __future__ import annotations

import json

import pytest

from dia2stream.tools import load

pytest.importorskip("matplotlib", reason="matplotlib is not installed (the `plot` extra; requirements.txt)")
from dia2stream.tools import load_plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def hand_made_run():
    start = load.Turn("start", "c0-t0", sent_at=1.0, segments=[[1.2, 1.21, 1.22, 1.5, 1.9]],
                      words=[("Hi", 2)], done={"ttfa_ms": 199.0})
    inject = load.Turn("inject", "c0-t1", sent_at=3.0, segments=[[3.05, 3.06]], words=[("Bye", 1)], done={})
    calls = [load.Call(0, turns=[start, inject], finished=True)]
    return [c.to_dict() for c in calls], load.summarize(calls, wall_s=4.0)


def test_turns_carry_when_their_frames_came_late():
    calls, _ = hand_made_run()
    start, inject = calls[0]["turns"]
    # 1.5 s was due at 1.44 s, 1.9 s at 1.58 s: two underruns, at their arrival times.
    assert start["underruns"] == 2 and start["underruns_at_s"] == [1.5, 1.9] and start["sent_at_s"] == 1.0
    assert inject["underruns_at_s"] == []


def test_plot_is_drawn_and_a_saved_run_draws_again(tmp_path):
    calls, summary = hand_made_run()
    out = tmp_path / "load.png"
    load_plot.plot_load(calls, summary, str(out), "hand-made")
    assert out.read_bytes().startswith(PNG)
    saved = tmp_path / "load.json"
    saved.write_text(json.dumps({"config": {"calls": 1, "turns": 2, "url": "ws://127.0.0.1:1/"}, "summary": summary,
                                 "calls": calls}))
    again = tmp_path / "again.svg"
    assert load_plot.main([str(saved), "-o", str(again)]) == 0
    svg = again.read_text()
    assert "speech onset per turn kind" in svg and "underruns over the run: 2 in 2 turns" in svg


def test_a_run_with_no_turns_still_draws(tmp_path):
    calls = [load.Call(0, busy=True, close_code=1013)]
    out = tmp_path / "empty.png"
    load_plot.plot_load([c.to_dict() for c in calls], load.summarize(calls, 1.0), str(out), "refused")
    assert out.read_bytes().startswith(PNG)


@pytest.mark.slow
def test_load_script_plots_a_real_run(server, tmp_path, capsys):
    out = tmp_path / "run.png"
    status = load.main([server.url, "--calls", "1", "--turns", "2", "--text", "[S1] One two three.",
                        "--inject-text", " Four five.", "--quiet", "--plot", str(out), "--duration-limit", "120"])
    assert status == 0
    assert f"plot: {out}" in capsys.readouterr().out
    assert out.read_bytes().startswith(PNG)


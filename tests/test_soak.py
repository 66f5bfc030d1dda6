"""A shortened soak (issue 13): long simulated calls on the tiny model with inject, flush,
pause/resume, next-turn and reset cycles; after a warm-up, neither the process's memory nor the
number of live Python objects may keep growing. The full run and its figures: `python -m
dia2stream.tools.soak` (docs/operations.md)."""

from __future__ import annotations

import pytest

from dia2stream.tools.soak import main, soak

pytestmark = pytest.mark.slow

FRAMES, WARMUP = 900, 300
RSS_GROWTH_MB = 12  # allocator noise (seen: +0.7 to +2.7); the object count below catches small leaks
OBJECT_GROWTH = 400  # seen: -160 to +30; a leak of one object per frame or event adds 600+


def test_short_soak_does_not_grow(small_tts):
    report = soak(FRAMES, calls=2, warmup=WARMUP, report_every=300, out=None, tts=small_tts)
    print(f"\n[soak] {report.frames} frames, {report.cycles} cycles, {report.frames_per_s} frames/s, "
          f"RSS {report.rss_growth_mb:+.1f} MiB, objects {report.object_growth:+d}, errors {report.errors}")
    assert report.frames >= FRAMES and report.cycles >= 4
    assert set(report.errors) <= {"not_paused"}, report.errors  # resume just after the turn ended
    assert report.rss_growth_mb < RSS_GROWTH_MB
    assert report.object_growth < OBJECT_GROWTH


def test_soak_command_line_checks_its_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["--frames", "0"])
    assert "--frames and --calls must be positive" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_tts(tiny_dir):
    from vendor_dia2 import Dia2

    return Dia2.from_pretrained(str(tiny_dir), device="cpu", mimi="random-small")

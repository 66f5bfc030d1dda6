"""`make demo` (python -m dia2stream.tools.demo): the README's first command, end to end on the
tiny checkpoint; it starts the server from the checkout, runs test_client.py, writes a WAV and stops."""

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_stops_by_itself(tmp_path):
    out = tmp_path / "demo.wav"
    proc = subprocess.run([sys.executable, "-m", "dia2stream.tools.demo", "-o", str(out), "--timeout", "240"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    info = sf.info(str(out))
    assert info.samplerate == 24_000 and info.frames > 0

"""`python -m vendor_dia2 ...` end to end, in subprocesses (offline, tiny checkpoint)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["DIA2_CACHE"] = os.environ["DIA2_CACHE"]  # conftest's per-run cache, never the user's
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "vendor_dia2", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    proc = _run("make-checkpoint", "--preset", "tiny", str(out), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote tiny checkpoint to {out}" in proc.stdout
    return out


@pytest.mark.slow
def test_make_checkpoint_writes_a_loadable_checkpoint(cli_checkpoint, tiny_dir):
    from vendor_dia2 import Dia2
    from vendor_dia2.config import preset

    names = {p.name for p in cli_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    # same preset, same default seed: the very bytes the library writes
    assert (cli_checkpoint / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    tts = Dia2.from_pretrained(str(cli_checkpoint), device="cpu")
    assert tts.config == preset("tiny")


@pytest.mark.slow
def test_generate_writes_24khz_mono_wav(cli_checkpoint, tmp_path):
    proc = _run("generate", "--checkpoint", str(cli_checkpoint), "[S1] Hi there.", "-o", "out.wav",
                "--max-frames", "40", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = sf.info(str(tmp_path / "out.wav"))
    assert info.samplerate == 24000 and info.channels == 1
    assert info.frames > 0 and info.frames % 1920 == 0  # whole Mimi frames
    assert info.frames <= 40 * 1920
    audio, rate = sf.read(str(tmp_path / "out.wav"))
    assert rate == 24000 and audio.ndim == 1 and abs(audio).max() > 0
    assert "wrote out.wav" in proc.stdout
    words = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert words == ["Hi", "there."]


def test_unknown_preset_is_a_one_line_error(tmp_path):
    proc = _run("make-checkpoint", "--preset", "huge", str(tmp_path / "x"), cwd=tmp_path)
    _assert_clean_error(proc, "'huge'", "tiny", "1b", "2b")
    assert not (tmp_path / "x").exists()


def test_bad_checkpoint_path_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    proc = _run("generate", "--checkpoint", str(missing), "[S1] Hi.", "-o", "out.wav", cwd=tmp_path)
    _assert_clean_error(proc, str(missing))
    assert not (tmp_path / "out.wav").exists()


def test_directory_without_checkpoint_is_a_one_line_error(tmp_path):
    proc = _run("generate", "--checkpoint", str(tmp_path), "[S1] Hi.", "-o", "out.wav", cwd=tmp_path)
    _assert_clean_error(proc, "config.json")


def test_kernel_flags_are_validated_and_auto_resolves_to_torch_on_cpu():
    from dia2stream.serve.config import KernelChoice, parse_args, resolve_kernels

    with pytest.raises(SystemExit):
        parse_args(["--kernels", "cuda"], environ={})
    with pytest.raises(SystemExit):
        parse_args(["--weights", "int8"], environ={})
    config = parse_args([], environ={"DIA2_KERNELS": "triton", "DIA2_WEIGHTS": "fp8"})
    assert (config.kernels, config.weights) == ("triton", "fp8")
    assert resolve_kernels(KernelChoice.AUTO, "cpu") == "torch"
    assert resolve_kernels(KernelChoice.TORCH, "cuda") == "torch"

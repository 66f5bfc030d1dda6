"""Checkpoints by Hugging Face repo id, with no network: our own tiny checkpoint in a cache laid
out as the hub lays it out, read with HF_HUB_OFFLINE=1; a hub that cannot be reached (a closed
loopback port as HF_ENDPOINT) gives a message naming the repo, the cache folder and the offline
setting, not a traceback; and which checkpoint the server serves by default."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dia2stream.serve.config import ServerConfig, checkpoint_for
from vendor_dia2.checkpoint import PUBLISHED_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "dia2stream-tests/tiny-offline"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo_id: str, files: Path, commit: str = COMMIT) -> Path:
    """`files` as the hub caches a download of `repo_id` at `commit`: contents in blobs/ named by
    their hash, snapshots/<commit>/ holding links to them, refs/main naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def closed_loopback_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=600)


LOAD_BY_REPO_ID = """
import json, sys, torch
from vendor_dia2 import Dia2
from vendor_dia2.checkpoint import resolve
repo_id, local = sys.argv[1], sys.argv[2]
by_id = Dia2.from_pretrained(repo_id, device="cpu")
by_dir = Dia2.from_pretrained(local, device="cpu")
a = by_id.generate("[S1] one two", seed=3, max_frames=12, decode=False)
b = by_dir.generate("[S1] one two", seed=3, max_frames=12, decode=False)
print(json.dumps({"root": str(resolve(repo_id).root), "name": by_id.name,
                  "same_tokens": torch.equal(a.audio_tokens, b.audio_tokens), "frames": a.frames}))
"""


@pytest.mark.slow
def test_a_repo_id_loads_our_checkpoint_from_a_hub_cache_offline(tmp_path, tiny_dir):
    cache = tmp_path / "hub"
    snapshot = hub_cache(cache, REPO_ID, tiny_dir)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
           "HF_ENDPOINT": closed_loopback_url()}  # were anything fetched, it would fail, not leave the box
    proc = run_python(LOAD_BY_REPO_ID, env, REPO_ID, str(tiny_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["root"]) == snapshot  # the snapshot folder of refs/main's commit
    assert out["name"] == REPO_ID
    assert out["same_tokens"] and out["frames"] == 12  # the same weights as the directory they came from


MISSING_REPO = "dia2stream-tests/not-cached"


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False])
def test_a_repo_the_hub_cannot_give_is_one_clear_error_from_the_server(tmp_path, offline):
    """`python server.py --checkpoint REPO` where the repo is not cached and the hub is out of
    reach (offline mode, or a refused connection): exit status 1 and one message, no traceback."""
    cache = tmp_path / "hub"
    env = {"HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_CACHE": str(cache),
           "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": closed_loopback_url(),
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    proc = run_python("", env, "server.py", "--checkpoint", MISSING_REPO, "--device", "cpu", "--port", "0",
                      "--log-level", "WARNING")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("server.py: could not fetch checkpoint")
    assert repr(MISSING_REPO) in message and str(cache) in message and "HF_HUB_OFFLINE" in message
    assert ("HF_HUB_OFFLINE is set" in message) == offline


def test_the_published_model_is_the_default_on_a_gpu_and_tiny_on_cpu():
    assert PUBLISHED_CHECKPOINT == "nari-labs/Dia2-2B"
    assert checkpoint_for(ServerConfig(device="cuda")) == PUBLISHED_CHECKPOINT
    assert checkpoint_for(ServerConfig(device="cuda:1")) == PUBLISHED_CHECKPOINT
    assert checkpoint_for(ServerConfig(device="cpu")) == "tiny"
    assert checkpoint_for(ServerConfig(checkpoint="1b", device="cuda")) == "1b"  # a named one always wins
    assert checkpoint_for(ServerConfig(checkpoint="some/repo", device="cpu")) == "some/repo"


def test_a_random_checkpoint_says_once_in_the_log_that_its_audio_is_noise(caplog):
    from dia2stream.serve.build import build_engine

    with caplog.at_level("WARNING", logger="dia2stream"):
        _, engine = build_engine(ServerConfig(device="cpu", mimi="random-small", context_frames=40))
        engine.close()
    noise = [r.getMessage() for r in caplog.records if "noise" in r.getMessage()]
    assert len(noise) == 1 and noise[0].startswith("checkpoint tiny has random weights")
    assert PUBLISHED_CHECKPOINT in noise[0]

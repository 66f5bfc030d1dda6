import os
import tempfile
from pathlib import Path

import pytest

# Preset checkpoints are written into a per-run cache, never into the user's home.
os.environ.setdefault("DIA2_CACHE", tempfile.mkdtemp(prefix="dia2-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from vendor_dia2.checkpoint import write_random_checkpoint
    from vendor_dia2.config import preset

    return write_random_checkpoint(preset("tiny"), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_tts(tiny_dir):
    from vendor_dia2 import Dia2

    return Dia2.from_pretrained(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def server():
    """One tiny-checkpoint server for a test module, on a free loopback port."""
    from helpers import ServerThread, server_config

    srv = ServerThread(server_config(log_level="WARNING", engine_process="on")).start()  # as the product runs
    yield srv
    srv.stop()

import os
import tempfile
from pathlib import Path

import pytest

# Preset checkpoints are written into a per-run cache, never into the user's home.
os.environ.setdefault("DIA2_CACHE", tempfile.mkdtemp(prefix="dia2-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _one_torch_thread_on_a_small_cpu() -> None:
    """The server runs torch on one thread on a CPU-only machine with <= 2 cores (serve/build.py:
    two spinning OpenMP threads fight everything else on the box). Tests that build an engine or
    run the model in this process do the same: with two threads beside a server, an engine
    process or another job, each step waits on a descheduled thread (test_rollover took 134 s
    with two, 32 s with one, on a shared 2-core machine). The programs tests start (the CLI,
    whose `generate` runs the model) inherit it through OMP_NUM_THREADS."""
    import torch

    if (os.cpu_count() or 1) <= 2 and not torch.cuda.is_available():
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")


_one_torch_thread_on_a_small_cpu()


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


@pytest.fixture(autouse=True)
def _shared_server_idle(request):
    """A test that shares its module's `server` starts once the calls of the tests before it are
    gone from the engine (helpers.wait_until_idle): with two test workers on a 2-core box, a
    compatibility test's first request was refused as busy (503) by the previous test's call."""
    if "server" in request.fixturenames:
        from helpers import wait_until_idle

        wait_until_idle(request.getfixturevalue("server").port)


# The test files that take longest on a 2-core box (durations of a two-worker run), handed to the
# workers first: `make test` gives each worker a whole file at a time in collection order, and a
# long file left for last keeps one worker busy while the other idles.
LONGEST_FILES_FIRST = ("test_longcalls.py", "test_rollover.py", "test_step_in_flight.py", "test_fleet.py",
                       "test_engine_failure.py", "test_soak.py", "test_whisper_voice.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole and in order

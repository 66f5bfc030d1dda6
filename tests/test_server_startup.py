"""Start-up (audit 2): a server that cannot start says why in one line (`server.py: error: ...`, or
the checkpoint's own message) with exit status 2 for a bad setting and 1 for a failure of the
machine, never a traceback; every port is bound before `ready` is announced or anything is
served; the settings only the model can judge are checked once it is loaded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dia2stream.serve.agent import agent_reply
from dia2stream.serve.config import ServerConfig
from dia2stream.serve.http import is_alive, is_ready
from dia2stream.serve.server import Dia2Server, StartupError, check_against_model, run

from helpers import server_config

ROOT = Path(__file__).resolve().parents[1]


def taken_port() -> socket.socket:
    """A loopback port some other program listens on (the socket: keep it open)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def server_py(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python server.py` on the tiny checkpoint with `flags`, run to its exit."""
    return subprocess.run([sys.executable, "server.py", "--checkpoint", "tiny", "--mimi", "random-small", "--device",
                           "cpu", "--host", "127.0.0.1", "--log-level", "WARNING", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def one_line_error(proc: subprocess.CompletedProcess, status: int) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


# --- the entry point -----------------------------------------------------------------------------------


def test_a_port_in_use_is_one_line_and_said_before_the_model_loads():
    with taken_port() as busy:
        port = busy.getsockname()[1]
        proc = server_py("--port", str(port), timeout=60)
    line = one_line_error(proc, 1)
    assert line == f"server.py: error: --port {port}: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "loaded" not in proc.stderr and "engine process" not in proc.stderr  # no model was loaded first


@pytest.mark.parametrize("flags, said", [
    (["--max-lead-ms", "nan"], "server.py: error: --max-lead-ms nan: must be a finite number, more than 0"),
    (["--log-level", "LOUD"], "server.py: error: argument --log-level: invalid value 'LOUD': expected one of DEBUG"),
])
def test_a_bad_flag_is_exit_status_2_without_a_traceback(flags, said):
    line = one_line_error(server_py("--port", "0", *flags, timeout=60), 2)
    assert line.startswith(said), line


@pytest.mark.slow
def test_a_port_in_use_for_the_http_api_is_one_line_and_nothing_is_announced():
    """Issue 3: the websocket announced `ready` (and /health said 200) before the HTTP API's
    bind failed. Now every port is bound first: the bind fails, nothing is announced."""
    pytest.importorskip("aiohttp")
    with taken_port() as busy:
        port = busy.getsockname()[1]
        proc = server_py("--port", "0", "--http-port", str(port), "--agent-port", "0")
    line = one_line_error(proc, 1)
    assert line == f"server.py: error: --http-port {port}: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "ready on" not in proc.stdout and "agent-check on" not in proc.stdout, proc.stdout


@pytest.mark.slow
def test_a_checkpoint_that_does_not_exist_is_its_message_alone():
    """Audit item 7: no warning that the engine process had to be killed before the message."""
    proc = server_py("--port", "0", "--checkpoint", "nosuch")
    line = one_line_error(proc, 1)
    assert line.startswith("server.py: checkpoint 'nosuch' is neither a preset"), line
    assert "killing it" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_voice_that_cannot_be_loaded_is_one_line_from_the_engine_process():
    line = one_line_error(server_py("--port", "0", "--voice", "alice=/nonexistent/alice.wav"), 1)
    assert line == "server.py: error: --voice: no audio file at '/nonexistent/alice.wav'", line


@pytest.mark.slow
def test_a_lead_in_the_model_cannot_take_is_a_bad_setting():
    line = one_line_error(server_py("--port", "0", "--lead-in-frames", "750"), 2)
    assert line == ("server.py: error: --lead-in-frames 750: must be less than half the context (750 of 1500 "
                    "frames), the room a rollover leaves a turn"), line


# --- run() ------------------------------------------------------------------------------------------------


def started(config: ServerConfig, **kwargs) -> tuple[int | BaseException, str]:
    """Run the server until it is ready (then stop it) or fails: the port or the exception."""
    ready: concurrent.futures.Future = concurrent.futures.Future()

    async def main():
        stop = asyncio.Event()
        serving = asyncio.ensure_future(run(config, ready, stop=stop, **kwargs))
        while not ready.done() and not serving.done():
            await asyncio.sleep(0.02)
        stop.set()
        try:
            await serving
        except Exception:  # noqa: BLE001 - the future has it
            pass

    asyncio.run(main())
    return ready.exception() or ready.result()


BUILT = []


def record_build() -> None:  # picklable: run() calls it where the engine is built, before it is
    BUILT.append(True)


def test_the_websocket_port_is_bound_before_the_model_is_loaded():
    BUILT.clear()
    with taken_port() as busy:
        port = busy.getsockname()[1]
        got = started(server_config(port=port, log_level="WARNING"), engine_init=record_build)
    assert isinstance(got, StartupError) and "address already in use" in str(got) and not got.usage
    assert BUILT == [], "the model was loaded before the port was found taken"


def test_nothing_is_announced_when_the_agent_port_is_taken(capsys):
    with taken_port() as busy:
        got = started(server_config(agent_port=busy.getsockname()[1], log_level="WARNING"))
    assert isinstance(got, StartupError) and str(got).startswith("--agent-port ")
    assert "ready on" not in capsys.readouterr().out


def test_context_beyond_the_model_is_clamped_with_a_warning_and_an_impossible_lead_in_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="dia2stream"):
        check_against_model(ServerConfig(context_frames=100_000, rollover_frames=100_000), 1500)
        check_against_model(ServerConfig(context_frames=0), 1500)  # 0: the model's limit, nothing to say
        check_against_model(ServerConfig(context_frames=400), 400)  # the default rollover is documented
    said = [r.getMessage() for r in caplog.records]
    assert said == ["--context-frames 100000 is more than this model's limit: its 1500 frames are used",
                    "--rollover-frames 100000 is more than half the context (1500 frames): a rollover keeps "
                    "at most 750"], said
    check_against_model(ServerConfig(lead_in_frames=749), 1500)
    with pytest.raises(StartupError, match=r"--lead-in-frames 750: must be less than half") as refused:
        check_against_model(ServerConfig(lead_in_frames=750), 1500)
    assert refused.value.usage


def test_run_checks_the_settings_against_the_model_it_loaded(caplog):
    with caplog.at_level(logging.WARNING, logger="dia2stream"):
        port = started(server_config(context_frames=100_000, log_level="WARNING"))
    assert isinstance(port, int)
    assert any("more than this model's limit" in r.getMessage() for r in caplog.records)
    got = started(server_config(lead_in_frames=100_000, log_level="WARNING"))
    assert isinstance(got, StartupError) and got.usage


class FakeEngine:
    max_calls, running, voices = 2, True, ()

    def health(self) -> dict:
        return {"calls": 0, "max_calls": 2, "busy": False, "overloaded": False, "failure": None}


async def test_until_it_serves_the_server_says_starting():
    server = Dia2Server(FakeEngine(), "tiny", "cpu", 1000.0)
    server.starting = True
    health = server.health()
    assert health["status"] == "starting" and agent_reply(health) == "down #starting\n"
    assert is_alive(health) and not is_ready(health)
    server.starting = False
    assert server.health()["status"] == "ok" and agent_reply(server.health()) == "up ready 100%\n"

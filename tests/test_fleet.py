"""A fleet behind HAProxy (issue 22): three tiny-checkpoint servers (`--max-calls 2`, agent port on)
behind a real HAProxy (Debian's package) running deploy/haproxy.cfg with the addresses, ports,
`maxconn` and check intervals substituted (`fleet_config`), everything on 127.0.0.1.

- six calls land two per server (least connections); a seventh is refused busy, never left hanging;
  HAProxy's weights follow the servers' agents down to 0 when full and back up when calls end
- `kill -9` one server: its caller sees the close and is served elsewhere on reconnecting; the
  other calls speak on; HAProxy marks it down
- SIGTERM one while it speaks a long utterance: every frame, then `done`, reaches the caller; no
  new call lands on it; it exits 0; a new server on the same ports rejoins and takes calls

Every wait polls for its condition with a generous bound: this runs on a busy 2-core machine.
Run with `-s` for the failover and drain figures.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from dia2stream.tools.haproxy_config import CONFIG, fleet_config, free_port
from dia2stream.tools.retry import Busy, BusyRetry, open_call

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("haproxy") is None,
                                 reason="haproxy is not installed (apt-get install haproxy; make test does it as root)")]

ROOT = Path(__file__).resolve().parents[1]
MAX_CALLS = 2
SERVERS = 3
DRAIN_TIMEOUT_S = 90
TIMEOUT = 60.0  # the most any one expected condition may take here
CHECK_MS = 300  # health and agent check interval in the test (deploy/haproxy.cfg: 2 s)
LONG_TEXT = "[S1] " + " ".join(["word"] * 30)  # about 9 s of audio at the tiny checkpoint's pace
SERVER_HEADER = "X-Dia2-Server"


# --- processes -------------------------------------------------------------------------------------


@dataclass
class Server:
    """One `python server.py` on fixed ports, its output in a file."""

    name: str
    port: int
    agent_port: int
    log: Path
    proc: subprocess.Popen | None = None
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "server.py", "--checkpoint", "tiny", "--mimi", "random-small", "--host", "127.0.0.1",
                 "--port", str(self.port), "--agent-port", str(self.agent_port), "--max-calls", str(MAX_CALLS),
                 "--drain-timeout-s", str(DRAIN_TIMEOUT_S), "--overload-refusal-s", "0", "--log-level", "INFO"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_listening(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if http_get(self.port, "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} did not start:\n{self.output()[-3000:]}")

    def health(self) -> dict:
        return http_get(self.port, "/health")[1]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def http_get(port: int, path: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


@dataclass
class Fleet:
    servers: list[Server]
    haproxy: subprocess.Popen
    calls_port: int
    stats_port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.calls_port}/"

    def by_name(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)

    def stats(self) -> dict[str, dict]:
        """HAProxy's view of each server (status UP/DOWN/DRAIN/MAINT, weight, scur)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=10) as response:
            text = response.read().decode().lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "dia2" and row["svname"].startswith("gpu")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    servers = [Server(f"gpu{i}", free_port(), free_port(), tmp / f"gpu{i}.log") for i in range(SERVERS)]
    calls_port, stats_port = free_port(), free_port()
    config = tmp / "haproxy.cfg"
    config.write_text(fleet_config(CONFIG.read_text(), [(s.port, s.agent_port) for s in servers], calls_port,
                                   stats_port, MAX_CALLS, CHECK_MS))
    check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    haproxy = None
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_listening()
        with open(tmp / "haproxy.log", "w") as out:
            haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        fleet = Fleet(servers, haproxy, calls_port, stats_port)
        deadline = time.monotonic() + TIMEOUT
        while not stats_answer(fleet):
            log = (tmp / "haproxy.log").read_text(errors="replace")
            assert haproxy.poll() is None and time.monotonic() < deadline, f"HAProxy did not start:\n{log[-3000:]}"
            time.sleep(0.1)
        yield fleet
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(30)
        for s in servers:
            s.stop()


# --- helpers ---------------------------------------------------------------------------------------


def stats_answer(fleet: Fleet) -> bool:
    try:
        return bool(fleet.stats())
    except OSError:
        return False


async def until(condition, what: str, timeout: float = TIMEOUT):
    """Poll a (blocking) condition in a thread until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(condition)
        except OSError as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what} (last: {last!r})")


def all_ready(fleet: Fleet) -> bool:
    """Every server UP, not drained and at full weight in HAProxy: the fleet is as at the start."""
    stats = fleet.stats()
    return len(stats) == SERVERS and all(row["status"] == "UP" and row["weight"] == "100" for row in stats.values())


@dataclass
class Caller:
    ws: ClientConnection
    server: str  # which server HAProxy chose (its response header)


async def call(fleet: Fleet, attempts: int = 1) -> Caller:
    ws, ready = await open_call(fleet.url, BusyRetry(attempts=attempts, first_delay_s=0.2), open_timeout=TIMEOUT)
    assert ready["event"] == "ready", ready
    return Caller(ws, ws.response.headers[SERVER_HEADER])


async def one_per_server(fleet: Fleet) -> list[Caller]:
    """A call for each server, opened one after another: HAProxy's leastconn spreads calls that
    are already connected, but calls arriving together may be picked before the first is counted
    (seen with its two threads on a busy machine: two of three on one server)."""
    callers: list[Caller] = []
    try:
        for _ in range(SERVERS):
            callers.append(await call(fleet))
        assert sorted(c.server for c in callers) == [s.name for s in fleet.servers]
    except BaseException:
        await hang_up(*callers)
        raise
    return callers


async def speak(caller: Caller, text: str, turn: str) -> dict:
    """Start an utterance and read it to its `done`: every frame counted, no error."""
    await caller.ws.send(json.dumps({"cmd": "start", "text": text, "id": turn}))
    frames = 0
    while True:
        message = await asyncio.wait_for(caller.ws.recv(), TIMEOUT)
        if isinstance(message, bytes):
            frames += 1
            continue
        event = json.loads(message)
        assert event["event"] != "error", event
        if event["event"] == "done":
            assert event["id"] == turn and event["frames"] == frames, (event, frames)
            return event


async def first_frames(caller: Caller, count: int) -> None:
    while count:
        count -= isinstance(await asyncio.wait_for(caller.ws.recv(), TIMEOUT), bytes)


async def hang_up(*callers: Caller) -> None:
    await asyncio.gather(*(c.ws.close() for c in callers))


# --- the tests -------------------------------------------------------------------------------------


def test_the_template_substitution_touches_only_what_it_says():
    text = CONFIG.read_text()
    ours = fleet_config(text, [(9001, 9101), (9002, 9102)], 8001, 8002, 2, 300)
    assert "server gpu0 127.0.0.1:9001 agent-port 9101" in ours and "server gpu1 127.0.0.1:9002 agent-port 9102" in ours
    assert "dia2-gpu" not in ours and "bind 127.0.0.1:8001" in ours and " maxconn 2 " in ours and "maxconn 8000" in ours
    for kept in ("balance leastconn", "option httpchk GET /ready", "agent-check", "weight 100", "timeout tunnel",
                 "retry-on conn-failure empty-response 503", "option redispatch"):
        assert kept in ours


async def test_six_calls_two_per_server_and_a_seventh_is_busy(fleet):
    await until(lambda: all_ready(fleet), "every server UP at full weight")
    callers = await asyncio.gather(*(call(fleet) for _ in range(SERVERS * MAX_CALLS)))
    try:
        assert Counter(c.server for c in callers) == {s.name: MAX_CALLS for s in fleet.servers}
        for s in fleet.servers:
            assert s.health()["calls"] == MAX_CALLS
        # HAProxy's weights follow the agents' `up ready 0%`.
        await until(lambda: all(row["weight"] == "0" for row in fleet.stats().values()), "weights 0 when full")
        t0 = time.monotonic()
        with pytest.raises(Busy) as refused:
            await asyncio.wait_for(call(fleet), TIMEOUT)
        print(f"\n[fleet] seventh call refused in {time.monotonic() - t0:.2f} s: {refused.value.refusals[-1]}")
        # The calls still work.
        await asyncio.gather(*(c.ws.send(json.dumps({"cmd": "ping", "id": 7})) for c in callers))
        for c in callers:
            assert json.loads(await asyncio.wait_for(c.ws.recv(), TIMEOUT)) == {"event": "pong", "id": 7}
    finally:
        await hang_up(*callers)
    await until(lambda: all_ready(fleet), "every server back to UP at full weight once the calls ended")


async def test_a_killed_server_is_taken_out_and_its_caller_served_elsewhere(fleet):
    await until(lambda: all_ready(fleet), "every server UP at full weight")
    callers = await one_per_server(fleet)
    survivors = []
    try:
        victim = next(c for c in callers if c.server == "gpu0")
        survivors = [c for c in callers if c is not victim]
        await victim.ws.send(json.dumps({"cmd": "start", "text": LONG_TEXT, "id": "cut"}))
        await first_frames(victim, 3)

        t0 = time.monotonic()
        fleet.by_name("gpu0").proc.kill()
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(victim.ws.recv(), TIMEOUT)
        closed_s = time.monotonic() - t0
        again = await call(fleet, attempts=20)  # the caller reconnects at once
        reconnected_s = time.monotonic() - t0
        survivors.append(again)
        assert again.server != "gpu0"
        await until(lambda: fleet.stats()["gpu0"]["status"].startswith("DOWN"), "HAProxy marks gpu0 DOWN")
        down_s = time.monotonic() - t0
        # The calls on the other servers were not touched: each speaks a turn to its end (one at a
        # time: three servers speaking at once can fall behind real time on this 2-core machine).
        for c in survivors:
            assert (await speak(c, "[S1] Still here.", "after"))["frames"] > 0
        print(f"\n[failover] kill -9: caller saw the close after {closed_s:.2f} s, was served by {again.server} "
              f"{reconnected_s:.2f} s after the kill; HAProxy marked it DOWN after {down_s:.2f} s "
              f"(checks every {CHECK_MS} ms, fall 2)")
    finally:
        await hang_up(*survivors)
        gpu0 = fleet.by_name("gpu0")
        gpu0.stop()
        gpu0.start()  # back on the same ports for the next test
        await asyncio.to_thread(gpu0.wait_listening)
    await until(lambda: all_ready(fleet), "gpu0 back UP after its restart")


async def test_sigterm_drains_a_server_while_it_speaks_and_a_new_one_rejoins(fleet):
    await until(lambda: all_ready(fleet), "every server UP at full weight")
    callers = await one_per_server(fleet)
    newcomers: list[Caller] = []
    gpu1 = fleet.by_name("gpu1")
    try:
        speaker = next(c for c in callers if c.server == "gpu1")
        await speaker.ws.send(json.dumps({"cmd": "start", "text": LONG_TEXT, "id": "last words"}))
        await first_frames(speaker, 3)
        frames = 3

        t0 = time.monotonic()
        gpu1.proc.send_signal(signal.SIGTERM)
        # New calls while it drains, as many as the other servers have free slots: never on gpu1,
        # not even before HAProxy has seen the drain (a 503 on the upgrade is retried elsewhere).
        for _ in range((SERVERS - 1) * (MAX_CALLS - 1)):
            newcomers.append(await call(fleet, attempts=20))
        assert all(c.server != "gpu1" for c in newcomers), [c.server for c in newcomers]
        await until(lambda: fleet.stats()["gpu1"]["status"].split()[0] in ("DRAIN", "DOWN"),
                    "HAProxy sees gpu1 draining")

        events = []
        with pytest.raises(ConnectionClosed):
            while True:
                message = await asyncio.wait_for(speaker.ws.recv(), TIMEOUT)
                if isinstance(message, bytes):
                    frames += 1
                    assert not any(e["event"] == "done" for e in events), "a frame after done"
                else:
                    events.append(json.loads(message))
        closed_s = time.monotonic() - t0
        done = [e for e in events if e["event"] == "done"]
        assert len(done) == 1 and done[0]["id"] == "last words" and done[0]["frames"] == frames, (done, frames)
        assert events[-1]["event"] == "error" and events[-1]["code"] == "shutting_down"
        assert speaker.ws.close_code == 1001
        code = await asyncio.to_thread(gpu1.proc.wait, DRAIN_TIMEOUT_S)
        exit_s = time.monotonic() - t0
        assert code == 0, gpu1.output()[-3000:]
        assert exit_s < DRAIN_TIMEOUT_S
        print(f"\n[drain] SIGTERM during an utterance: {frames} frames and done, close 1001 after {closed_s:.2f} s, "
              f"exit 0 after {exit_s:.2f} s; {len(newcomers)} calls opened meanwhile, none on gpu1")

        gpu1.start()  # the new version, on the same ports
        await asyncio.to_thread(gpu1.wait_listening)
        await hang_up(*newcomers, *callers)
        newcomers, callers = [], []
        await until(lambda: all_ready(fleet), "the new gpu1 rejoins (UP, drain cleared by its agent)")
        fresh = await one_per_server(fleet)
        newcomers = list(fresh)
        assert await speak(next(c for c in fresh if c.server == "gpu1"), "[S1] Back again.", "back")
    finally:
        await hang_up(*newcomers, *callers)
        if gpu1.proc.poll() is not None:
            gpu1.start()
            await asyncio.to_thread(gpu1.wait_listening)


def test_proxy_cost_measures_calls_streaming_through_haproxy(tmp_path):
    from dia2stream.tools import proxy_cost

    out = tmp_path / "cost.json"
    assert proxy_cost.main(["--calls", "3", "--seconds", "2", "--format", "ulaw_8000", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["calls"] == 3 and result["frame_bytes"] == 644
    assert 10 <= result["frames_per_s_per_call"] <= 13  # every call streamed at the wire's pace, through HAProxy
    assert result["loaded_cpu_percent"] >= 0 and result["rss_kib_loaded"] > 0 and "HAProxy" in result["haproxy"]


def test_the_templates_agree_with_the_tested_config():
    """docker-compose.yml and k8s/ are untested templates; at least their figures must match
    deploy/haproxy.cfg and each other: slots = maxconn, ports = agent-port, grace > drain."""
    yaml = pytest.importorskip("yaml")
    config = CONFIG.read_text()
    maxconn = int(re.search(r"default-server .*\bmaxconn (\d+)", config).group(1))
    agent_port = int(re.search(r"default-server .*\bagent-port (\d+)", config).group(1))
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    servers = {name: s for name, s in compose["services"].items() if name.startswith("dia2-gpu")}
    assert servers and set(re.findall(r"^\s*server (\S+) (\S+):8765$", config, flags=re.M)) == \
        {(name.removeprefix("dia2-"), name) for name in servers}
    for service in servers.values():
        env = service["environment"]
        assert int(env["DIA2_MAX_CALLS"]) == maxconn and int(env["DIA2_AGENT_PORT"]) == agent_port
        assert int(service["stop_grace_period"].rstrip("s")) > float(env["DIA2_DRAIN_TIMEOUT_S"])
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert int(env["DIA2_MAX_CALLS"]) == maxconn and int(env["DIA2_AGENT_PORT"]) == agent_port
    assert pod["terminationGracePeriodSeconds"] > float(env["DIA2_DRAIN_TIMEOUT_S"])
    probes = pod["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"

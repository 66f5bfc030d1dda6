"""End-to-end demo: start the server on the tiny checkpoint, speak through it with an inject, stop.

    python -m dia2stream.tools.demo [-o demo.wav] [--checkpoint tiny] [--timeout 120]

Starts `server.py` on a free port, waits until `GET /health` answers, runs `test_client.py`
against it (start, then an inject while speaking), prints the client's figures (TTFA, frames,
real-time factor), writes the WAV and stops the server. Offline; exits non-zero if the server
does not come up or the client fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: server.py and test_client.py
READY_RE = re.compile(r"dia2stream ready on ws://([^:/]+):(\d+)/")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default="demo.wav")
    ap.add_argument("--checkpoint", default="tiny")
    ap.add_argument("--text", default="[S1] Hello there, this is a streaming demo.")
    ap.add_argument("--inject", default=" And one more thing.")
    ap.add_argument("--inject-at", default="0.5")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the server to start, and for the client")
    args = ap.parse_args(argv)

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "server.py"), "--checkpoint", args.checkpoint, "--host", "127.0.0.1",
         "--port", "0", "--log-level", "WARNING",
         # one torch thread: the client shares this machine's cores, and two spinning OpenMP
         # threads competing with it made frames several times slower on a 2-core box
         "--threads", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = wait_for_port(server, args.timeout)
        if port is None:
            return 1
        health = wait_for_health(port, args.timeout)
        if health is None:
            print(f"demo: server on port {port} never answered /health", file=sys.stderr)
            return 1
        print(f"demo: server up on port {port}: {json.dumps(health)}", flush=True)
        client = subprocess.run(
            [sys.executable, str(ROOT / "test_client.py"), args.text, "--url", f"ws://127.0.0.1:{port}/",
             "--inject", args.inject, "--inject-at", args.inject_at, "-o", args.output,
             "--timeout", str(args.timeout)],
            cwd=ROOT, env=env)
        if client.returncode != 0:
            print(f"demo: test_client.py failed (exit {client.returncode})", file=sys.stderr)
            return client.returncode
        print(f"demo: ok, wrote {args.output}")
        return 0
    finally:
        stop(server)


def wait_for_port(server: subprocess.Popen, timeout: float) -> int | None:
    """Read the server's output until it prints its port; echo the rest in the background."""
    found: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        for line in server.stdout:
            match = READY_RE.search(line)
            if match and not found:
                found.append(int(match.group(2)))
                ready.set()
            else:
                sys.stdout.write("server: " + line)
        ready.set()  # output ended: the server exited

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if not found:
        print(f"demo: the server did not start (exit status {server.poll()})", file=sys.stderr)
        return None
    return found[0]


def wait_for_health(port: int, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    return None


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()  # SIGTERM: the server closes connections and the session, then exits
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())

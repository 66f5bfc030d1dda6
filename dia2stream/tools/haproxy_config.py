"""deploy/haproxy.cfg made to run on 127.0.0.1: what tests/test_fleet.py and
dia2stream.tools.proxy_cost run, so the file they test is the file that is deployed."""

from __future__ import annotations

import re
import socket
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"


def fleet_config(template: str, servers: list[tuple[int, int]], calls_port: int, stats_port: int,
                 max_calls: int, check_ms: int | None = None) -> str:
    """deploy/haproxy.cfg for servers on 127.0.0.1, given as (port, agent port) each: the listen
    addresses, the `server` lines, their `maxconn` and (if given) the check intervals replaced,
    nothing else. Each substitution must match as often as expected, so a changed template fails
    loudly instead of being half-substituted."""

    def swap(text: str, pattern: str, new: str, count: int = 1) -> str:
        found = len(re.findall(pattern, text, flags=re.M))
        if found != count:
            raise ValueError(f"deploy/haproxy.cfg: {pattern!r} found {found} times, expected {count}")
        return re.sub(pattern, new, text, flags=re.M)

    text = swap(template, r"^(\s*)bind :8080$", rf"\1bind 127.0.0.1:{calls_port}")
    text = swap(text, r"^(\s*)bind :8404$", rf"\1bind 127.0.0.1:{stats_port}")
    if check_ms is not None:
        text = swap(text, r"\binter 2s\b", f"inter {check_ms}ms", count=2)  # `inter` and `agent-inter`
    text = swap(text, r"^(\s*default-server .*\bmaxconn )\d+\b", rf"\g<1>{max_calls}")
    block = re.search(r"(^(\s*)server \S+ \S+\n)+", text, flags=re.M)
    if block is None:
        raise ValueError("deploy/haproxy.cfg has no `server NAME ADDRESS` lines")
    indent = block.group(2)
    ours = "".join(f"{indent}server gpu{i} 127.0.0.1:{port} agent-port {agent}\n"
                   for i, (port, agent) in enumerate(servers))
    return text[:block.start()] + ours + text[block.end():]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

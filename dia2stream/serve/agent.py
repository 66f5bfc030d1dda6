"""HAProxy agent-check responder: tells a balancer how much room this server has, on its own port.

HAProxy (`agent-check agent-port N` on a server line) connects every `agent-inter`, reads one line
and closes. We answer at once, whatever it sends (`agent-send`), with one of:

- `up ready 37%`: serving, with 37 % of the call slots free (0 % when full or behind real time):
  HAProxy scales the server's weight to it (give servers `weight 100`: with the default weight 1,
  every percentage under 100 rounds to 0). `ready` cancels a `drain` this port reported earlier,
  perhaps by the process this one replaced: only the agent may undo its own drain.
- `drain`: the server is draining (SIGTERM): no new calls, the ones it has finish.
- `down`: it cannot serve (stopping, or its engine has stopped).

The reply is a pure function of the server's /health figures (`agent_reply`), so it is tested
without sockets; `AgentResponder` is the small asyncio server around it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

AGENT_WRITE_TIMEOUT_S = 2.0  # a checker that does not take its line and close is dropped after this
AGENT_READ_BYTES = 4096


def free_percent(health: dict[str, Any]) -> int:
    """Free call slots as a whole percentage of all slots; 0 when no new call would be taken."""
    if health.get("busy"):
        return 0
    max_calls = int(health["max_calls"])
    return (max_calls - int(health["calls"])) * 100 // max_calls


def agent_reply(health: dict[str, Any]) -> str:
    """The agent line for /health figures (`Dia2Server.health()`), newline included."""
    status = health.get("status")
    if status == "draining":
        return "drain\n"
    if status != "ok":
        return f"down #{status}\n"
    return f"up ready {free_percent(health)}%\n"


class AgentResponder:
    """`async with AgentResponder(server.health, host, port) as agent:` serves until the block ends;
    `agent.port` is the port it listens on (useful with port 0)."""

    def __init__(self, health: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        self._health, self.host, self.port = health, host, port
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> "AgentResponder":
        self._server = await asyncio.start_server(self._answer, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("agent-check on %s:%d", self.host, self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(agent_reply(self._health()).encode("ascii"))
            async with asyncio.timeout(AGENT_WRITE_TIMEOUT_S):
                await writer.drain()
                # Half-close, then read to the checker's own close: closing with its `agent-send`
                # unread would reset the connection, and a reset may discard our reply unread.
                writer.write_eof()
                while await reader.read(AGENT_READ_BYTES):
                    pass
        except (OSError, TimeoutError) as exc:
            log.debug("agent check from %s not answered: %s", writer.get_extra_info("peername"), exc)
        finally:
            writer.close()

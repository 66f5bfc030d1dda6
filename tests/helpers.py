"""Helpers shared by the tests: engines and servers built the way the server builds them."""

from __future__ import annotations

from dia2stream.serve.config import ServerConfig


def engine_config(tts, **overrides):
    """The engine settings `server.py` would use for `tts`, with `overrides` (fields of ServerConfig
    or EngineConfig). Engines built for tests never refuse a call because this machine is slow."""
    overrides.setdefault("overload_refusal_s", 0.0)
    return ServerConfig().engine_config(tts.device, **overrides)


def server_config(**fields) -> ServerConfig:
    """A tiny-checkpoint CPU server on a free loopback port. It does not refuse calls because this
    machine is slow (`overload_refusal_s=0`): the refusal itself has a test of its own."""
    fields = {"host": "127.0.0.1", "port": 0, "checkpoint": "tiny", "device": "cpu", "overload_refusal_s": 0.0,
              **fields}
    return ServerConfig(**fields)

"""Shared pieces of the compatibility tests: a server with a few call slots, and a recorder of
what our adapters saw (the native `word` events and the audio frames sent per context), so a
real client's word times can be checked against ours."""

from __future__ import annotations

import importlib.util
import os

import pytest

from dia2stream.serve.config import ServerConfig
from test_server import ServerThread

MAX_CALLS = 3


def need(*modules: str):
    """Skip the module's tests when a client library is missing (the [compat-test] extra)."""
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (the test clients: docs/compat.md, Running the tests)",
                    allow_module_level=True)


def start_server(**overrides) -> ServerThread:
    config = dict(host="127.0.0.1", port=0, checkpoint="tiny", device="cpu",
                  log_level=os.environ.get("DIA2_TEST_LOG", "WARNING"),
                  max_calls=MAX_CALLS,
                  # a deep buffer: on a shared, loaded CPU the tiny model can dip below real time;
                  # and a call that falls behind must not make the engine refuse the next request
                  # (a busy machine, not the behaviour under test: seen as a 503 in test_compat_http)
                  max_lead_ms=5000.0, overload_refusal_s=0.0)
    config.update(overrides)
    return ServerThread(ServerConfig(**config)).start()


class ServerLog:
    """Records, inside the in-process server, what the context adapters saw and sent: our
    `word` events on each context's clock, frames sent per context (and when), barge-ins and
    the `paused` answers. Installed by patching the adapter class for one test."""

    def __init__(self):
        import collections

        self.words = collections.defaultdict(list)  # context id -> [(word, seconds of its audio before it)]
        self.frames = collections.Counter()
        self.frame_times = collections.defaultdict(list)
        self.barge_ins: list = []
        self.paused: list[float] = []
        self._saved = {}

    @classmethod
    def install(cls) -> "ServerLog":
        import time
        from types import SimpleNamespace

        from dia2stream.call.call import AudioFrame
        from dia2stream.wire import protocol as p
        from dia2stream.wire.compat.contexts import FRAME_MS, ContextAdapter

        log = cls()
        translate, barge_in = ContextAdapter.translate, ContextAdapter.cancel_context

        def recording_translate(adapter, item):
            ctx = adapter.active
            if isinstance(item, p.Word) and ctx is not None and adapter.by_serial.get(item.id) is ctx:
                log.words[ctx.id].append((item.word, ctx.audio_frames * FRAME_MS / 1000))
            if isinstance(item, AudioFrame) and ctx is not None:
                log.frames[ctx.id] += 1
                log.frame_times[ctx.id].append(time.monotonic())
            if isinstance(item, p.Paused):
                log.paused.append(time.monotonic())
            return translate(adapter, item)

        def recording_barge_in(adapter, ctx):
            if ctx is adapter.active:
                log.barge_ins.append(SimpleNamespace(context=ctx.id, at=time.monotonic()))
            return barge_in(adapter, ctx)

        log._saved = {"translate": translate, "cancel_context": barge_in}
        ContextAdapter.translate = recording_translate
        ContextAdapter.cancel_context = recording_barge_in
        return log

    def uninstall(self) -> None:
        from dia2stream.wire.compat.contexts import ContextAdapter

        for name, fn in self._saved.items():
            setattr(ContextAdapter, name, fn)

    def words_by_context(self) -> dict:
        return dict(self.words)

    def frames_by_context(self) -> dict:
        return dict(self.frames)

    def paused_after(self, context: str) -> bool:
        barge = next(b for b in self.barge_ins if b.context == context)
        return any(t >= barge.at for t in self.paused)

    async def until(self, predicate, timeout: float = 60.0) -> None:
        """Poll (the server runs on another thread's loop), bounded in time."""
        import asyncio

        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)


def free_port() -> int:
    """A loopback port nobody listens on now (for --http-port in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

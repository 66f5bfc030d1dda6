"""A bounded live fuzz run (issue 13): more than 10,000 malformed, hostile and out-of-order
messages from several connections at a real server on 127.0.0.1 (tiny checkpoint), then a normal
utterance must still work, and no thread, asyncio task or memory may have leaked.

The messages come from a seeded generator (`hostile_messages`): broken and deeply nested JSON,
binary frames, lone surrogates in every string field, wrong types and out-of-range numbers,
unknown commands and fields, valid commands in any order (inject before start, resume while
speaking, start while generating, pause/reset storms), junk set_voice payloads, messages just
past the command limit and past the transport limit (close 1009, then a reconnect), ping
floods, and connections that vanish mid-utterance. The command rate limit is raised for this
server so that every message is parsed and handled (the limit itself is tested elsewhere).
`FUZZ_MESSAGES` sets the count (docs/operations.md has the figures of a run).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import threading
import time
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


from helpers import Client, ServerThread, server_config, speak
from dia2stream.tools.soak import rss_mb

pytestmark = pytest.mark.slow

CONNECTIONS = 4
MESSAGES = int(os.environ.get("FUZZ_MESSAGES", "10400"))
MAX_COMMAND_BYTES = 16 * 1024
MAX_VOICE_BYTES = 256 * 1024
RSS_GROWTH_LIMIT_MB = 150
WORDS = ["hello", "there", "one", "two", "three", "okay", "sure", "thanks"]


def _text(rng: random.Random) -> str:
    return "[S1] " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + "."


def _junk_value(rng: random.Random):
    return rng.choice([None, True, 0, -1, 2**70, 1.5, -1e308, "", "\ud800", "x" * 200, [], {}, [1, [2]],
                       {"a": {"b": 1}}, "NaN", "[S1]", "\x00", "\U0001f600" * 3])


def hostile_message(rng: random.Random) -> str | bytes:
    """One message of a random hostile kind."""
    kind = rng.randrange(20)
    cmd = rng.choice(["start", "inject", "flush", "pause", "resume", "reset", "set_voice", "voices", "ping"])
    if kind == 0:
        return rng.randbytes(rng.randint(0, 64))
    if kind == 1:
        good = json.dumps({"cmd": "start", "text": _text(rng)})
        return good[: rng.randrange(len(good))]  # truncated JSON
    if kind == 2:
        depth = rng.choice([50, 2000, 100_000])
        return "[" * depth + "]" * depth
    if kind == 3:
        return json.dumps(_junk_value(rng))
    if kind == 4:  # lone surrogates in any field, cmd and id included
        field = rng.choice(["cmd", "id", "text", "voice", "name", "transcript", "path"])
        obj = {"cmd": cmd, "text": _text(rng), "name": "v"}
        obj[field] = rng.choice(["\ud800", "a\udfffb", "\udbff\udbff"])
        return json.dumps(obj)
    if kind == 5:  # wrong type or range in one field
        field = rng.choice(["text", "final", "id", "seed", "temperature", "top_k", "cfg_scale", "voice",
                            "format", "text_top_k", "audio_temperature"])
        return json.dumps({"cmd": "start", "text": _text(rng), field: _junk_value(rng)})
    if kind == 6:
        return json.dumps({"cmd": rng.choice(["dance", "START", "", "ping ", "\u0000"]), "id": rng.randint(0, 9)})
    if kind == 7:
        return json.dumps({"cmd": cmd, "unknown_field": 1, "id": "u"})
    if kind == 8:  # a valid-looking set_voice with junk audio, a bad path, or bad base64
        choice = rng.randrange(3)
        audio = {"audio": base64.b64encode(rng.randbytes(rng.randint(1, 2000))).decode()} if choice == 0 else \
            {"path": "../../etc/passwd"} if choice == 1 else {"audio": "@@not base64@@"}
        return json.dumps({"cmd": "set_voice", "name": f"v{rng.randrange(3)}", "transcript": "[S1] Hi.", **audio,
                           "id": rng.randrange(100)})
    if kind == 9:  # just past the command limit: message_too_large
        return '{"cmd": "ping", "id": 1' + " " * MAX_COMMAND_BYTES + "}"
    if kind == 10 and rng.random() < 0.02:  # past the transport limit: close 1009, reconnect
        return "x" * (MAX_VOICE_BYTES + 1)
    if kind == 11:
        return json.dumps({"cmd": "start", "text": _text(rng), "final": rng.random() < 0.5,
                           "seed": rng.randrange(2**63), "temperature": rng.uniform(0, 5),
                           "top_k": rng.randint(1, 256), "id": rng.randrange(10**6)})
    if kind == 12:
        return json.dumps({"cmd": "inject", "text": " " + _text(rng)[5:], "final": rng.random() < 0.7,
                           "id": f"i{rng.randrange(100)}"})
    if kind == 13:
        return json.dumps({"cmd": "start", "text": "[S1] " + "a" * 4100})  # text too long
    if kind == 14:
        return json.dumps({"cmd": "start", "text": _text(rng), "voice": rng.choice(["nobody", "v0", "a" * 65])})
    # out-of-order control commands: pause/resume/reset/flush/voices/ping in any order
    obj = {"cmd": rng.choice(["pause", "resume", "reset", "flush", "voices", "ping"])}
    if rng.random() < 0.5:
        obj["id"] = rng.choice([rng.randrange(10**9), "x" * rng.randint(1, 128), -(2**62)])
    return json.dumps(obj)


class ServerClosed(Exception):
    pass


async def fuzz_connection(url: str, rng: random.Random, budget: int, counts: dict) -> None:
    """Send `budget` hostile messages over as many connections as it takes (a closed connection
    is reopened), reading everything the server sends meanwhile."""
    sent = 0
    while sent < budget:
        try:
            ws = await connect(url, open_timeout=30, close_timeout=1, max_size=None)
        except Exception:
            await asyncio.sleep(0.05)  # the slot of the previous connection is not free yet
            counts["reconnect_waits"] += 1
            continue
        synced: dict = {}
        reader = asyncio.create_task(_drain(ws, counts, synced))

        async def sync() -> None:
            """Wait until the server has answered everything sent so far (before a message that
            ends the connection, so the answers to the ones before it are all counted)."""
            synced["end"] = end = asyncio.get_running_loop().create_future()
            await ws.send('{"cmd": "ping", "id": "end"}')
            await asyncio.wait([end, reader], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if not end.done():
                raise ServerClosed  # the reader ended: the server closed the connection

        try:
            while sent < budget:
                if rng.random() < 0.004:  # vanish mid-utterance without a close handshake
                    await sync()
                    await ws.send(json.dumps({"cmd": "start", "text": _text(rng)}))
                    await asyncio.sleep(rng.uniform(0, 0.2))
                    ws.transport.abort()
                    counts["aborts"] += 1
                    sent += 1
                    break
                if rng.random() < 0.001:  # a flood of pings
                    for _ in range(min(200, budget - sent)):
                        await ws.send('{"cmd": "ping"}')
                        sent += 1
                    continue
                message = hostile_message(rng)
                if len(message) > MAX_VOICE_BYTES:
                    await sync()
                await ws.send(message)
                sent += 1
                if sent % 50 == 0:
                    await asyncio.sleep(0)  # let the reader run
            else:  # every answer in: the server has handled all of it
                await sync()
        except (ConnectionClosed, ServerClosed):
            counts["closed_by_server"] += 1
            code = f"close_{ws.close_code}"
            counts[code] = counts.get(code, 0) + 1
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            ws.transport.abort()
    counts["messages"] += sent


async def _drain(ws, counts: dict, synced: dict) -> None:
    try:
        async for message in ws:
            if isinstance(message, bytes):
                counts["frames"] += 1
            else:
                event = json.loads(message)
                counts["errors" if event["event"] == "error" else "events"] += 1
                if event == {"event": "pong", "id": "end"}:
                    synced["end"].set_result(None)
    except ConnectionClosed:
        pass


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return json.loads(r.read())


def server_tasks(srv: ServerThread) -> int:
    """The server loop's asyncio tasks, once a closed connection's handler has wound down."""
    async def count():
        return len(asyncio.all_tasks())

    counts = []
    for _ in range(50):
        counts.append(asyncio.run_coroutine_threadsafe(count(), srv._loop).result(10))
        if len(counts) >= 3 and counts[-1] == counts[-2] == counts[-3]:
            break
        time.sleep(0.1)
    return counts[-1]


def thread_names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


async def wait_idle(port: int, timeout: float = 20.0) -> None:
    deadline = time.perf_counter() + timeout
    while (await asyncio.to_thread(health, port))["calls"]:
        assert time.perf_counter() < deadline, "calls still open after every client left"
        await asyncio.sleep(0.05)


async def test_live_fuzz_then_a_normal_utterance_and_nothing_leaked(capsys):
    srv = await asyncio.to_thread(ServerThread(server_config(mimi="random-small", log_level="ERROR",
        max_calls=CONNECTIONS + 1, commands_per_second=1e6, command_burst=1_000_000, idle_timeout_s=0,
        flood_close_s=0,  # the abuse policy off: every message is parsed (the policy has test_isolation.py)
        max_command_bytes=MAX_COMMAND_BYTES, max_voice_message_bytes=MAX_VOICE_BYTES)).start)
    try:
        client, _ = await Client.open(srv.url)  # warm up: the first utterance allocates what every one needs
        await speak(client, "[S1] Warm up.", id="w")
        await client.close()
        await wait_idle(srv.port)
        threads_before, tasks_before, rss_before = thread_names(), await asyncio.to_thread(server_tasks, srv), rss_mb()

        counts = dict.fromkeys(["messages", "frames", "events", "errors", "aborts", "closed_by_server",
                                "reconnect_waits"], 0)
        t0 = time.perf_counter()
        await asyncio.gather(*[fuzz_connection(srv.url, random.Random(seed), MESSAGES // CONNECTIONS + 1, counts)
                               for seed in range(CONNECTIONS)])
        fuzz_s = time.perf_counter() - t0
        await wait_idle(srv.port)

        client, _ = await Client.open(srv.url)
        try:
            done = await speak(client, "[S1] Still speaking clearly.", id="after")
            assert done["frames"] == client.count("frame") > 0
            assert [w["word"] for w in client.events("word")] == ["Still", "speaking", "clearly."]
        finally:
            await client.close()
        await wait_idle(srv.port)
        await asyncio.sleep(0.2)
        threads_after, tasks_after, rss_after = thread_names(), await asyncio.to_thread(server_tasks, srv), rss_mb()
    finally:
        await asyncio.to_thread(srv.stop)

    new_threads = [t for t in threads_after if t not in threads_before]
    with capsys.disabled():
        print(f"\n[fuzz] {counts['messages']} messages over {CONNECTIONS} connections in {fuzz_s:.1f} s: "
              f"{counts['errors']} error events, {counts['events']} other events, {counts['frames']} frames, "
              f"{counts['aborts']} aborts, {counts['closed_by_server']} closed by the server "
              f"({', '.join(f'{k}: {n}' for k, n in counts.items() if k.startswith('close_'))}); "
              f"threads {len(threads_before)} -> {len(threads_after)}, server tasks {tasks_before} -> {tasks_after}, "
              f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert counts["messages"] >= 10_000
    assert counts["errors"] > counts["messages"] // 3  # hostile input is answered with coded errors
    # worker threads of the loop's bounded default executor may have started; nothing else
    assert all(name.startswith("asyncio_") for name in new_threads), new_threads
    assert len(threads_after) <= len(threads_before) + min(32, (os.cpu_count() or 1) + 4)
    assert tasks_after == tasks_before
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB

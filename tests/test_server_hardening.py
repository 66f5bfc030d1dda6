"""Findings 1 and 2 of issue 13 through a real server on 127.0.0.1 (tiny checkpoint): hostile
strings get coded errors, the connection and the utterance in progress survive. The fixes
live in protocol.py, so these hold for whichever server handler parses with parse_command."""

from __future__ import annotations

import pytest

from test_server import LONG_TEXT, Client, server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


async def test_lone_surrogate_in_id_and_cmd_gets_an_error_and_the_connection_lives(server):
    client, _ = await Client.open(server.url)
    try:
        # Finding 1: this used to abort the connection without a close frame.
        await client.send_raw('{"cmd": "\\ud800", "id": "\\ud800"}')
        error = await client.event()
        assert error["event"] == "error" and error["code"] == "invalid_field" and "'cmd'" in error["message"]
        assert "id" not in error
        await client.send_raw('{"cmd": "ping", "id": "\\udfff"}')
        error = await client.event()
        assert error["code"] == "invalid_field" and "'id'" in error["message"]
        await client.send(cmd="ping", id="still-here")
        assert await client.event() == {"event": "pong", "id": "still-here"}
    finally:
        await client.close()


async def test_lone_surrogate_in_inject_during_speech_keeps_the_utterance(server):
    client, _ = await Client.open(server.url)
    try:
        await client.send(cmd="start", text=LONG_TEXT, id="utt")
        await client.until("started", id="utt")
        await client.frames(2)
        # Finding 2: this used to end the utterance with internal_error carrying "utt".
        await client.send_raw('{"cmd": "inject", "text": " more \\ud800 words", "id": "inj"}')
        while True:
            _, kind, payload = await client.next()
            if kind == "event" and payload["event"] == "error":
                break
            assert not (kind == "event" and payload["event"] in ("done", "reset")), payload
        assert payload["code"] == "invalid_field" and payload["id"] == "inj" and payload["cmd"] == "inject"
        assert "'text'" in payload["message"]
        done = await client.until("done", id="utt")
        assert done["frames"] > 2
    finally:
        await client.close()

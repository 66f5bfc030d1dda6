"""The official Cartesia SDK (`tts.websocket_connect()` with `websocket_base_url`) against our
`/tts/websocket`. Loopback only; skipped without the SDK."""

from __future__ import annotations

import base64

import pytest

from compat_clients import need, start_server

need("cartesia")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    srv.stop()


def test_cartesia_sdk_context_push_and_receive(server):
    from cartesia import Cartesia

    client = Cartesia(api_key="any-key", websocket_base_url=f"ws://127.0.0.1:{server.port}")
    with client.tts.websocket_connect() as connection:
        ctx = connection.context(model_id="sonic-3", voice={"mode": "id", "id": "default"},
                                 output_format={"container": "raw", "encoding": "pcm_f32le", "sample_rate": 16000},
                                 add_timestamps=True)
        ctx.push("Hello there, ")
        ctx.push("how are you?")
        ctx.no_more_inputs()
        events = list(ctx.receive())
    kinds = [e.type for e in events]
    assert kinds[-1] == "done" and "chunk" in kinds and "timestamps" in kinds
    audio = b"".join(base64.b64decode(e.data) if isinstance(e.data, str) else e.data
                     for e in events if e.type == "chunk")
    assert audio and len(audio) % 4 == 0  # float32 samples
    words = [w for e in events if e.type == "timestamps" for w in e.word_timestamps.words]
    assert words == ["Hello", "there,", "how", "are", "you?"]

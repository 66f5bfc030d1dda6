"""The official ElevenLabs SDK (`convert_realtime`, which only speaks wss://) against our
`stream-input` endpoint on a server started with --tls-cert/--tls-key and a self-signed
certificate. Loopback only; skipped without the SDK or the openssl program."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from compat_clients import need, start_server

need("elevenlabs.client")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl program to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_server(certificate):
    cert, key = certificate
    srv = start_server(tls_cert=str(cert), tls_key=str(key))
    yield srv
    srv.stop()


def test_elevenlabs_sdk_over_wss_with_a_self_signed_certificate(tls_server, certificate, monkeypatch):
    from elevenlabs.client import ElevenLabs

    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # the SDK's default context trusts our certificate
    client = ElevenLabs(api_key="any-key", base_url=f"https://127.0.0.1:{tls_server.port}")
    text = iter(["Hello there, ", "how are you?"])
    chunks = list(client.text_to_speech.convert_realtime(voice_id="default", text=text, output_format="pcm_24000"))
    audio = b"".join(chunks)
    assert audio and len(audio) % (2 * 1920) == 0  # whole 80 ms frames of 16-bit PCM at 24 kHz


def test_plain_websocket_is_refused_on_a_tls_port(tls_server):
    import asyncio

    from websockets.asyncio.client import connect

    async def attempt():
        async with connect(f"ws://127.0.0.1:{tls_server.port}/", open_timeout=10):
            pass

    with pytest.raises(Exception):
        asyncio.run(attempt())

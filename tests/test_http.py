"""dia2stream.serve.http: /health, /metrics and the token/Origin gate before the websocket upgrade
(issue 13, finding 10). Unit tests on Request objects, then a real websockets `serve()` on
127.0.0.1 with a stand-in handler (not the model server)."""

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request

from dia2stream.serve.http import (
    HttpGate,
    HttpPolicy,
    load_auth_token,
    parse_origins,
    unprotected_bind_warning,
)

from helpers import http_call

TOKEN = "s3cret-token"


def request(path="/", method="GET", upgrade=True, **headers) -> Request:
    """A websocket handshake by default (the gate tells it from a page request by `Upgrade`)."""
    upgrade_headers = [("Upgrade", "websocket"), ("Connection", "Upgrade")] if upgrade else []
    return Request(path, Headers(upgrade_headers + [(k.replace("_", "-"), v) for k, v in headers.items()]), method)


def gate(token=TOKEN, origins=None, refused=None) -> HttpGate:
    return HttpGate(HttpPolicy(auth_token=token, allowed_origins=origins),
                    health=lambda: {"status": "ok", "calls": 0},
                    metrics=lambda: (b"# metrics\n", "text/plain; version=0.0.4"),
                    on_refused=None if refused is None else refused.append)


# --- unit -----------------------------------------------------------------------------------


def test_websocket_needs_the_token_by_header_or_query():
    refused = []
    g = gate(refused=refused)
    assert g.respond(request(Authorization=f"Bearer {TOKEN}")) is None
    assert g.respond(request(Authorization=f"bearer {TOKEN}")) is None
    assert g.respond(request(f"/?token={TOKEN}")) is None
    assert g.respond(request("/?x=1&token=s3cret%2Dtoken")) is None  # percent-decoded
    for bad in (request(), request(Authorization="Bearer nope"), request(Authorization=f"Basic {TOKEN}"),
                request("/?token=nope"), request("/?token="), request(Authorization=f"Bearer {TOKEN}x")):
        response = g.respond(bad)
        assert response is not None and response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN.encode() not in response.body
    assert refused == ["unauthorized"] * 6


def test_no_token_configured_lets_non_browsers_in():
    assert gate(token=None).respond(request()) is None


def test_origin_policy():
    allowed = parse_origins("https://app.example.com, http://localhost:3000/")
    assert allowed == ("https://app.example.com", "http://localhost:3000")
    g = gate(origins=allowed)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert g.respond(request(Origin="https://app.example.com", **auth)) is None
    assert g.respond(request(Origin="http://localhost:3000", **auth)) is None
    assert g.respond(request(Origin="https://evil.example.com", **auth)).status_code == 403
    assert g.respond(request(**auth)) is None  # no Origin: not a browser
    # Auth comes first: a wrong token from an allowed origin is 401, not a hint about origins.
    assert g.respond(request(Origin="https://app.example.com")).status_code == 401
    assert gate(origins=("*",)).respond(request(Origin="https://any.where", **auth)) is None


def test_default_origin_policy_refuses_browsers_only_without_a_token():
    # No token: a page in the operator's browser must not drive a loopback server.
    assert gate(token=None).respond(request(Origin="https://evil.example.com")).status_code == 403
    # With a token the page has to know it anyway.
    assert gate().respond(request(Origin="https://x.example", Authorization=f"Bearer {TOKEN}")) is None


def test_health_is_open_get_and_head_only():
    g = gate()
    get = g.respond(request("/health"))
    assert get.status_code == 200 and json.loads(get.body) == {"status": "ok", "calls": 0}
    head = g.respond(request("/health?probe=1", "HEAD"))
    assert head.status_code == 200 and head.body == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    for method in ("PUT", "DELETE", "POST", "PATCH"):
        response = g.respond(request("/health", method))
        assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"


def test_metrics_follow_the_token():
    g = gate()
    assert g.respond(request("/metrics")).status_code == 401
    ok = g.respond(request("/metrics", Authorization=f"Bearer {TOKEN}"))
    assert ok.status_code == 200 and ok.body == b"# metrics\n"
    assert ok.headers["Content-Type"].startswith("text/plain")
    assert g.respond(request("/metrics", "DELETE")).status_code == 405
    assert gate(token=None).respond(request("/metrics")).status_code == 200


def test_non_get_upgrade_is_405_before_any_token_check():
    response = gate().respond(request("/", "PUT", Authorization="Bearer nope"))
    assert response.status_code == 405 and response.headers["Allow"] == "GET"


def test_load_auth_token(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(" from-file \n")
    assert load_auth_token(None, str(secret)) == "from-file"
    assert load_auth_token(" t ", None) == "t"
    assert load_auth_token(None, None) is None
    with pytest.raises(ValueError):
        load_auth_token("a", str(secret))
    with pytest.raises(ValueError):
        load_auth_token("  ", None)
    secret.write_text("\n")
    with pytest.raises(ValueError):
        load_auth_token(None, str(secret))


def test_unprotected_bind_warning():
    assert unprotected_bind_warning("127.0.0.1", None) is None
    assert unprotected_bind_warning("::1", None) is None
    assert unprotected_bind_warning("localhost", None) is None
    assert unprotected_bind_warning("0.0.0.0", "t") is None
    assert "auth-token" in unprotected_bind_warning("0.0.0.0", None)
    assert unprotected_bind_warning("", None) is not None  # all interfaces


# --- a real websockets server with a stand-in handler -------------------------------------------


async def echo_handler(ws):
    await ws.send("hello")
    await ws.wait_closed()


async def test_live_server_gate_health_and_metrics():
    g = gate(origins=("https://ok.example",))
    async with serve(echo_handler, "127.0.0.1", 0, process_request=lambda c, r: g.respond(r)) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/"

        def plain_http():
            return {
                "get": http_call(port, "GET", "/health"),
                "head": http_call(port, "HEAD", "/health"),
                "put": http_call(port, "PUT", "/health"),
                "delete": http_call(port, "DELETE", "/health"),
                "metrics_open": http_call(port, "GET", "/metrics"),
                "metrics_token": http_call(port, "GET", "/metrics", {"Authorization": f"Bearer {TOKEN}"}),
            }

        got = await asyncio.to_thread(plain_http)
        assert got["get"][0] == 200 and json.loads(got["get"][2])["status"] == "ok"
        assert got["head"][0] == 200 and got["head"][2] == b""
        assert got["put"][0] == 405 and got["put"][1]["Allow"] == "GET, HEAD"
        assert got["delete"][0] == 405
        assert got["metrics_open"][0] == 401
        assert got["metrics_token"][0] == 200 and got["metrics_token"][2] == b"# metrics\n"

        with pytest.raises(InvalidStatus) as info:
            async with connect(url):
                pass
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers={"Authorization": "Bearer wrong"}):
                pass
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"},
                               origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403

        async with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            assert await ws.recv() == "hello"
        async with connect(f"{url}?token={TOKEN}", origin="https://ok.example") as ws:
            assert await ws.recv() == "hello"

"""Everything answered over plain HTTP before the websocket upgrade: `/health`, `/ready`, `/metrics`,
and the gate (token, browser Origin) that every websocket connection passes first.

The server's `process_request` delegates here and nowhere else:

    gate = HttpGate(HttpPolicy(auth_token=..., allowed_origins=...),
                    health=lambda: {"status": "ok", ...}, metrics=metrics.render)
    async with serve(handler, ..., process_request=lambda conn, req: gate.respond(req)): ...

`respond` returns a `Response` to send instead of upgrading, or None to let the upgrade go on.
No sockets, no event loop: a pure function of the request, so it is tested without a server.

- `/health`: liveness. GET, or HEAD (same headers, no body); always open, so a load balancer needs
  no secret. 200 while the process can serve, full or not (an orchestrator must not restart a
  server for being full); 503 only when its engine has stopped. Other methods: 405 with `Allow`.
- `/ready`: readiness, for a balancer's health check. The same JSON body as `/health`, with 200
  when a new call would be accepted now and 503 when not (every slot taken, behind real time,
  draining or stopping). Open, like `/health`.
- `/metrics`: Prometheus text; behind the token like the websocket.
- The browser pages (`web_pages.WebPages`; `--no-web`: 404): the playground `/`, the dashboard
  `/dashboard` and their assets `/web/...` for a plain GET/HEAD (a websocket upgrade to `/` is
  still the websocket); the dashboard's feed `/dashboard/feed`, behind the token like /metrics.
- Any other path is the websocket: a token is required when one is configured
  (`Authorization: Bearer <token>`, or `?token=<token>` for clients that cannot set headers,
  such as browsers, or the key header of a hosted API whose client speaks to our compatible
  paths: `xi-api-key`, `X-API-Key`, `Authorization: Token`); wrong or missing → 401 and no
  websocket. A browser (a request with an `Origin` header) must come from an allowed origin →
  else 403. With the pages on, the server's own origin (the page it served) is allowed too,
  when the Host is an IP address or `localhost`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from dia2stream.serve import web_pages

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"
READ_METHODS = ("GET", "HEAD")
ANY_ORIGIN = "*"

# Why a request was refused; also the `reason` label of the refused-connections metric.
REFUSED_UNAUTHORIZED = "unauthorized"
REFUSED_ORIGIN = "origin"
REFUSED_METHOD = "method"


@dataclass(frozen=True)
class HttpPolicy:
    """Who may connect. `allowed_origins`: exact browser origins (`https://app.example.com`) or
    `*`; None means: no Origin check when a token is set (a page must know the token anyway),
    and no browser at all when there is no token (else any page the operator opens could drive
    a loopback server). `own_origin`: also allow a page this server served itself (the
    playground), recognised by an Origin equal to the request's Host; only for a Host that is an
    IP address or `localhost`, because a DNS name can be rebound to this server by any site."""

    auth_token: str | None = None
    allowed_origins: tuple[str, ...] | None = None
    own_origin: bool = False

    @classmethod
    def from_config(cls, config) -> "HttpPolicy":
        """From a `ServerConfig`: reads --auth-token-file (OSError/ValueError if unusable)."""
        return cls(auth_token=load_auth_token(config.auth_token, config.auth_token_file),
                   allowed_origins=parse_origins(config.allowed_origins), own_origin=config.web)

    def origin_allowed(self, origin: str | None, host: str | None = None) -> bool:
        """`host`: the request's Host header, for the own-origin rule."""
        if origin is None:
            return True  # not a browser: browsers always send Origin on a websocket upgrade
        if self.own_origin and host is not None and is_own_origin(origin, host):
            return True
        if self.allowed_origins is None:
            return self.auth_token is not None
        return ANY_ORIGIN in self.allowed_origins or origin.rstrip("/") in self.allowed_origins


class HttpGate:
    """Answers plain HTTP requests and gates websocket upgrades (see the module docstring)."""

    def __init__(
        self,
        policy: HttpPolicy,
        health: Callable[[], dict[str, Any]],
        metrics: Callable[[], tuple[bytes, str]] | None = None,
        on_refused: Callable[[str], None] | None = None,
        pages: web_pages.WebPages | None = None,
    ) -> None:
        """`health()` returns the JSON body of /health; `metrics()` returns (body, content type)
        for /metrics (None: 404); `on_refused(reason)` is told of every refused websocket,
        /metrics or feed request (for a counter); `pages`: the browser pages (None: 404)."""
        self.policy = policy
        self._health = health
        self._metrics = metrics
        self._pages = pages
        self._on_refused = on_refused
        self._token_digest = _digest(policy.auth_token) if policy.auth_token is not None else None

    def respond(self, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        method = request.method.upper()
        if path in (HEALTH_PATH, READY_PATH):
            if method not in READ_METHODS:
                return _method_not_allowed(READ_METHODS)
            health = self._health()
            good = is_ready(health) if path == READY_PATH else is_alive(health)
            status = HTTPStatus.OK if good else HTTPStatus.SERVICE_UNAVAILABLE
            return _response(status, json.dumps(health).encode(), "application/json", head=method == "HEAD")
        if path == METRICS_PATH and self._metrics is not None:
            if method not in READ_METHODS:
                return _method_not_allowed(READ_METHODS)
            refused = self._refusal(request)
            if refused is not None:
                return refused
            body, content_type = self._metrics()
            return _response(HTTPStatus.OK, body, content_type, head=method == "HEAD")
        if web_pages.is_web_path(path) and method in READ_METHODS and not _is_upgrade(request):
            return self._web(request, path, head=method == "HEAD")
        # The websocket. websockets itself answers 405 to a non-GET upgrade, but only after our
        # token check; refuse first so a wrong method never learns whether the token was right.
        if method != "GET":
            self._refused(REFUSED_METHOD)
            # a web page's path answers HEAD too (and "/" is a page and the websocket at once)
            page = self._pages is not None and web_pages.is_web_path(path)
            return _method_not_allowed(READ_METHODS if page else ("GET",))
        return self._refusal(request)

    def authorized(self, request: Request) -> bool:
        """True if no token is configured or the request carries it (header or query)."""
        if self._token_digest is None:
            return True
        return any(hmac.compare_digest(_digest(candidate), self._token_digest)
                   for candidate in _presented_tokens(request))

    def _web(self, request: Request, path: str, head: bool) -> Response:
        if self._pages is None:
            return _response(HTTPStatus.NOT_FOUND, b"not found (the web pages are off: --no-web)\n", "text/plain")
        if path == web_pages.FEED_PATH:
            refused = self._refusal(request)
            if refused is not None:
                return refused
            return _response(HTTPStatus.OK, json.dumps(self._pages.feed()).encode(), "application/json", head=head)
        asset = self._pages.page(path)
        if asset is None:
            return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        response = _response(HTTPStatus.OK, asset.body, asset.content_type, head=head)
        response.headers["Content-Security-Policy"] = web_pages.CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def _refusal(self, request: Request) -> Response | None:
        if not self.authorized(request):
            self._refused(REFUSED_UNAUTHORIZED)
            response = _response(HTTPStatus.UNAUTHORIZED, b"missing or wrong token\n", "text/plain")
            response.headers["WWW-Authenticate"] = 'Bearer realm="dia2stream"'
            return response
        origins = request.headers.get_all("Origin")
        hosts = request.headers.get_all("Host")
        host = hosts[0] if len(hosts) == 1 else None
        if len(origins) > 1 or not self.policy.origin_allowed(origins[0] if origins else None, host):
            self._refused(REFUSED_ORIGIN)
            return _response(HTTPStatus.FORBIDDEN, b"origin not allowed\n", "text/plain")
        return None

    def _refused(self, reason: str) -> None:
        log.info("refused a connection before the upgrade: %s", reason)  # never the token itself
        if self._on_refused is not None:
            self._on_refused(reason)


def is_own_origin(origin: str, host: str) -> bool:
    """True when a browser's Origin names the Host it sent the request to, and that Host is an
    IP address or `localhost` (names that no other site can make resolve here)."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.strip().lower():
        return False
    hostname = parts.hostname or ""
    if hostname == "localhost":
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def _is_upgrade(request: Request) -> bool:
    return any("websocket" in value.lower() for value in request.headers.get_all("Upgrade"))


def is_alive(health: dict[str, Any]) -> bool:
    """Liveness from /health figures: false only when the server can no longer serve at all."""
    return health.get("status") != "failed"


def is_ready(health: dict[str, Any]) -> bool:
    """Readiness from /health figures: a new call would be accepted now."""
    return health.get("status") == "ok" and not health.get("busy")


# The key headers of the hosted APIs a compatible endpoint speaks (docs/compat.md): their
# clients send the key there, so the operator's token goes where the client puts its API key.
API_KEY_HEADERS = ("xi-api-key", "X-API-Key")


def _presented_tokens(request: Request) -> list[str]:
    """At most four candidates (the first Authorization header, Bearer or Deepgram's Token; the
    first of each API key header; the first `token` query value), so a request cannot make us
    hash without bound."""
    found: list[str] = []
    for value in request.headers.get_all("Authorization")[:1]:
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() in ("bearer", "token") and credentials.strip():
            found.append(credentials.strip())
    for header in API_KEY_HEADERS:
        for value in request.headers.get_all(header)[:1]:
            if value.strip():
                found.append(value.strip())
    for key, value in parse_qsl(urlsplit(request.path).query, keep_blank_values=True):
        if key == "token":
            found.append(value)
            break
    return found


def _digest(token: str) -> bytes:
    # Compare fixed-length digests: compare_digest on the raw strings would leak the length,
    # and a header may hold bytes (decoded as Latin-1) that are not ASCII.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _response(status: HTTPStatus, body: bytes, content_type: str, head: bool = False) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")])
    # HEAD: the headers GET would send (Content-Length included), and no body.
    return Response(status.value, status.phrase, headers, b"" if head else body)


def _method_not_allowed(allowed: tuple[str, ...]) -> Response:
    response = _response(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain")
    response.headers["Allow"] = ", ".join(allowed)
    return response


# --- configuration helpers --------------------------------------------------------------------


def load_auth_token(token: str | None, token_file: str | None) -> str | None:
    """The token from `--auth-token` or `--auth-token-file` (the file is for secrets: not in the
    process list or the environment). Refuses both at once and an empty token, which would
    otherwise silently mean 'no authentication' (ValueError, one line; `config.parse_args` already
    refuses both and an empty --auth-token, and lets a flag override the other's env var)."""
    if token is not None and token_file is not None:
        raise ValueError("give --auth-token or --auth-token-file, not both")
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:  # one line for the operator, not a traceback
            raise ValueError(f"--auth-token-file {token_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise ValueError(f"--auth-token-file {token_file}: the file holds no token")
        return token
    if token is not None and not token.strip():
        raise ValueError("--auth-token is empty")
    return token.strip() if token is not None else None


def parse_origins(value: str | None) -> tuple[str, ...] | None:
    """`--allowed-origins` (comma list, or `*`) → a tuple; None or empty → None (the default)."""
    if value is None or not value.strip():
        return None
    return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())


def unprotected_bind_warning(host: str, token: str | None) -> str | None:
    """A warning to log when the server listens beyond loopback without a token, else None."""
    if token is not None:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"listening on {host} without --auth-token: anyone who reaches this port can use the "
            "GPU; set --auth-token or --auth-token-file")

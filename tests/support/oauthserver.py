"""A small OAuth2 world for tests: a token endpoint and a checking proxy in front of an archive.

``TokenServer(client_id, client_secret, lifetime=3)`` answers ``POST /token`` (grant type
``client_credentials``; the client authenticates with HTTP Basic or with form fields) with a new
random bearer token that is valid for *lifetime* seconds (``expires_in``).  It remembers every
token it issued and every request it got.  ``revoke_all()`` makes every token issued so far
invalid at once (a restarted identity provider, rotated keys): a client learns it from a 401.

``BearerProxy(upstream, tokens)`` passes every request to *upstream* (``http://127.0.0.1:PORT``)
only when it carries ``Authorization: Bearer <token>`` with a token of *tokens* that has not
expired; otherwise it answers 401 with ``WWW-Authenticate: Bearer error="invalid_token"``
and keeps a count.  The request body is read before the answer, so a refused upload leaves the
connection usable.

Both are ``ThreadingHTTPServer``s on free loopback ports, started on a thread by ``start()``
and closed by ``stop()`` (or used as context managers).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
from localserver import LocalServer

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "authorization",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest shows stderr of failed tests, and it is noise there

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers, then the empty line
                    pass
                return bytes(data)
            data += self.rfile.read(size)
            self.rfile.readline()  # CRLF after the chunk

    def answer(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def answer_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self.answer(status, json.dumps(doc).encode(), "application/json", headers)


# -- the token endpoint ---------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint, as seen (secrets left out)."""

    at: float
    client_id: str
    accepted: bool
    how: str  # "basic" or "form"
    scope: str


class TokenServer(LocalServer):
    """``POST /token``: client credentials in, a short-lived random bearer token out."""

    def __init__(self, client_id: str, client_secret: str, *, lifetime: int = 3) -> None:
        super().__init__(_TokenHandler)
        self.client_id = client_id
        self.client_secret = client_secret
        self.lifetime = lifetime
        self.lock = threading.Lock()
        self.expiry: dict[str, float] = {}  # token -> monotonic time it expires
        self.revoked: set[str] = set()
        self.requests: list[TokenRequest] = []

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def issued(self) -> list[str]:
        """Every token handed out, oldest first."""
        with self.lock:
            return list(self.expiry)

    def accepted_requests(self) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.accepted)

    def revoke_all(self) -> None:
        """Every token issued until now is refused from now on."""
        with self.lock:
            self.revoked |= set(self.expiry)

    def state(self, token: str) -> str:
        """``valid``, ``expired``, ``revoked`` or ``unknown``."""
        with self.lock:
            expires = self.expiry.get(token)
            revoked = token in self.revoked
        if expires is None:
            return "unknown"
        if revoked:
            return "revoked"
        return "valid" if time.monotonic() < expires else "expired"

    def issue(self) -> str:
        token = secrets.token_urlsafe(24)
        with self.lock:
            self.expiry[token] = time.monotonic() + self.lifetime
        return token

    def record(self, request: TokenRequest) -> None:
        with self.lock:
            self.requests.append(request)


class _TokenHandler(_Handler):
    def do_POST(self) -> None:
        owner: TokenServer = self.server.owner  # type: ignore[attr-defined]
        form = urllib.parse.parse_qs(self.read_body().decode("utf-8", "replace"))
        if self.path.split("?")[0] != "/token":
            self.answer_json(404, {"error": "not_found"})
            return
        client, secret, how = self._credentials(form)
        scope = form.get("scope", [""])[0]
        ok = client == owner.client_id and secret == owner.client_secret
        owner.record(TokenRequest(time.monotonic(), client, ok, how, scope))
        if form.get("grant_type", [""])[0] != "client_credentials":
            self.answer_json(400, {"error": "unsupported_grant_type"})
        elif not ok:
            headers = {"WWW-Authenticate": 'Basic realm="token"'}
            self.answer_json(401, {"error": "invalid_client"}, headers)
        else:
            doc = {
                "access_token": owner.issue(),
                "token_type": "Bearer",
                "expires_in": owner.lifetime,
            }
            self.answer_json(200, doc, {"Cache-Control": "no-store"})

    def _credentials(self, form: dict[str, list[str]]) -> tuple[str, str, str]:
        header = self.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                raw = base64.b64decode(header[6:].strip()).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return "", "", "basic"
            user, _, password = raw.partition(":")
            unquote = urllib.parse.unquote_plus  # RFC 6749 2.3.1: form-encoded first
            return unquote(user), unquote(password), "basic"
        client = form.get("client_id", [""])[0]
        return client, form.get("client_secret", [""])[0], "form"


# -- the checking proxy ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyEvent:
    """One request at the proxy: when, which method and path, and what happened."""

    at: float
    method: str
    path: str
    status: int
    token: str  # "valid", "expired", "revoked", "unknown" or "missing"


class BearerProxy(LocalServer):
    """Passes requests with a valid bearer token to *upstream*; refuses the others with 401."""

    def __init__(self, upstream: str, tokens: TokenServer) -> None:
        super().__init__(_ProxyHandler)
        self.upstream = upstream.rstrip("/")
        self.tokens = tokens
        self.client = httpx.Client(timeout=120.0)
        self.lock = threading.Lock()
        self.events: list[ProxyEvent] = []

    def stop(self) -> None:
        super().stop()
        self.client.close()

    def record(self, event: ProxyEvent) -> None:
        with self.lock:
            self.events.append(event)

    def history(self) -> list[ProxyEvent]:
        with self.lock:
            return list(self.events)

    def refused(self) -> list[ProxyEvent]:
        return [e for e in self.history() if e.status == 401]

    def forwarded(self) -> list[ProxyEvent]:
        return [e for e in self.history() if e.token == "valid"]


class _ProxyHandler(_Handler):
    def do_GET(self) -> None:
        self._pass()

    def do_POST(self) -> None:
        self._pass()

    def do_PUT(self) -> None:
        self._pass()

    def do_DELETE(self) -> None:
        self._pass()

    def do_OPTIONS(self) -> None:
        self._pass()

    def do_HEAD(self) -> None:
        self._pass()

    def _pass(self) -> None:
        owner: BearerProxy = self.server.owner  # type: ignore[attr-defined]
        body = self.read_body()
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        state = owner.tokens.state(token) if token else "missing"
        if state != "valid":
            owner.record(ProxyEvent(time.monotonic(), self.command, self.path, 401, state))
            challenge = f'Bearer realm="archive", error="invalid_token", state="{state}"'
            doc = {"error": "invalid_token", "state": state}
            self.answer_json(401, doc, {"WWW-Authenticate": challenge})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            response = owner.client.request(
                self.command, owner.upstream + self.path, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            owner.record(ProxyEvent(time.monotonic(), self.command, self.path, 502, state))
            self.answer(502, f"upstream failed: {exc}".encode(), "text/plain")
            return
        owner.record(
            ProxyEvent(time.monotonic(), self.command, self.path, response.status_code, state)
        )
        content_type = response.headers.get("Content-Type", "application/octet-stream")
        self.answer(response.status_code, response.content, content_type)

"""The status page's HTTP listener (``http.listen``): the page, ``/api/status``, ``/metrics``
and the page's two static files, read-only.

Paths served (anything else is 404; a method other than GET or HEAD is 405)::

    /                  the status page (HTML tables; ``?reason=`` filters the failures)
    /api/status        ``stowd status --json``'s document plus ``history`` and ``failures``
    /metrics           the Prometheus metrics (``metrics.registry``)
    /static/stowd.js   the script that refreshes the page and draws the charts
    /static/stowd.css  its style
    /static/icon.svg   its icon

The static files are the package's own (``stowd/service/static``), served from a fixed list:
no path from a request ever reaches the filesystem.  A listener on loopback answers only
requests addressed to a loopback name (``Host``: localhost, 127.0.0.1, [::1]; else 421), so
that a web page cannot rebind its own name to 127.0.0.1 and read the page as its own.  With
``http.auth`` every path asks for the login (HTTP basic, or a bearer token); a wrong one is
answered 401 with ``WWW-Authenticate``, and logged without what was sent.  Every answer
carries a Content Security Policy allowing only the page's own script and style (no inline
script), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
``no-store``.

Bounds: at most ``MAX_CONNECTIONS`` requests are handled at once (more are closed at once),
a request not all in within ``REQUEST_TIMEOUT`` is closed, a query longer than ``MAX_QUERY`` is
refused (414), one of more than ``MAX_FIELDS`` fields is a bad request (400), and the page
shows at most ``page.FAILURES_SHOWN`` failures.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from importlib import resources
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from stowd.config.httpconfig import is_loopback
from stowd.config.model import HTTP_REALM, Config, HttpAuth
from stowd.config.yamlwalk import host_port
from stowd.errors import QueueError, SecretUnavailable, StowdError
from stowd.printable import escape
from stowd.service import metrics, page

log = logging.getLogger("stowd.http")

MAX_CONNECTIONS = 16  # requests handled at once; more are closed without an answer
REQUEST_TIMEOUT = 30.0  # seconds a request (its line and headers) may take to arrive
MAX_QUERY = 2048  # characters of a query string
MAX_FIELDS = 20  # fields of a query string (``reason`` is the one read)
STATIC = {
    "stowd.js": "text/javascript; charset=utf-8",
    "stowd.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",  # named by the page: no browser asks for /favicon.ico (a 404)
}
SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
]
HTML = "text/html; charset=utf-8"
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

_METRICS = "metrics"  # the answer's status when the metrics app answers instead

StartResponse = Callable[..., Any]
Answer = tuple[str, str, bytes, list[tuple[str, str]]]  # status, type, body, more headers


# --------------------------------------------------------------------------- the app


class App:
    """The WSGI application: method, login, then the path."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = make_wsgi_app(metrics.for_config(config))
        self.auth = None if config.http is None else config.http.auth
        self.loopback = config.http is not None and is_loopback(config.http.host)
        self._secret_failing = False

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if method not in ("GET", "HEAD"):
            answer = _plain(
                "405 Method Not Allowed", "only GET and HEAD: this page changes nothing"
            )
            answer[3].append(("Allow", "GET, HEAD"))
        else:
            answer = self._answer(environ)
        if answer[0] == _METRICS:
            served: Iterable[bytes] = self.metrics(environ, _secured(start))
            return [] if method == "HEAD" else served
        return _send(answer, start, head=method == "HEAD")

    def _answer(self, environ: dict[str, Any]) -> Answer:
        try:
            return self._checked(environ)
        except Exception:  # a bug must not print a bare traceback past the log
            log.exception("status page: answering %s failed", environ.get("PATH_INFO", "?"))
            return _plain("500 Internal Server Error", "stowd could not answer (see its log)")

    def _checked(self, environ: dict[str, Any]) -> Answer:
        refused = self._misdirected(environ) or self._login(
            environ.get("HTTP_AUTHORIZATION", ""), environ
        )
        if refused is not None:
            return refused
        query = environ.get("QUERY_STRING", "")
        if len(query) > MAX_QUERY:
            return _plain("414 URI Too Long", f"a query of at most {MAX_QUERY} characters")
        try:
            asked = _query(query)
        except ValueError:  # more fields than parse_qs was allowed to read
            return _plain("400 Bad Request", f"a query of at most {MAX_FIELDS} fields")
        return self._route(environ.get("PATH_INFO", ""), asked)

    def _route(self, path: str, query: page.Query) -> Answer:
        if path == "/":
            return self._page(query)
        if path == "/api/status":
            return self._api(query)
        if path == "/metrics":
            return (_METRICS, "", b"", [])
        name = path.removeprefix("/static/")
        if path.startswith("/static/") and name in STATIC:
            return ("200 OK", STATIC[name], _static(name), [])
        return _plain("404 Not Found", "not found: this listener serves /, /api/status, /metrics")

    # -- the pages
    def _page(self, query: page.Query) -> Answer:
        try:
            doc = page.document(self.config, query)
        except QueueError as exc:  # unreadable, or gone ("no queue at ...")
            return ("503 Service Unavailable", HTML, page.render_error(str(exc)).encode(), [])
        return ("200 OK", HTML, page.render(doc).encode("utf-8", "backslashreplace"), [])

    def _api(self, query: page.Query) -> Answer:
        try:
            doc = page.document(self.config, query)
        except QueueError as exc:
            return ("503 Service Unavailable", JSON, _json({"error": str(exc)}), [])
        return ("200 OK", JSON, _json(doc), [])

    # -- the host name (DNS rebinding)
    def _misdirected(self, environ: dict[str, Any]) -> Answer | None:
        """A loopback listener answers requests for a loopback name only (None: this one
        is).  A web page that rebinds its own name to 127.0.0.1 would otherwise read the
        page as same-origin; the browser sends that name in ``Host``."""
        host = environ.get("HTTP_HOST")
        if not self.loopback or host is None or _loopback_name(host):
            return None
        log.warning(
            "status page: refused a request from %s for the host name %s: the listener is "
            "on loopback and answers localhost, 127.0.0.1 and [::1] only (421)",
            environ.get("REMOTE_ADDR", "?"),
            escape(host),
        )
        return _plain(
            "421 Misdirected Request",
            "this listener is on loopback: ask for localhost, 127.0.0.1 or [::1]",
        )

    # -- the login
    def _login(self, header: str, environ: dict[str, Any]) -> Answer | None:
        """None when no login is asked for or the request's is right; else the answer."""
        if self.auth is None:
            return None
        try:
            if _accepted(self.auth, header):
                self._secret_failing = False
                return None
        except SecretUnavailable as exc:
            if not self._secret_failing:
                log.error("status page: the login cannot be checked, answering 503: %s", exc)
            self._secret_failing = True
            return _plain("503 Service Unavailable", "the login cannot be checked (see the log)")
        said = log.warning if header else log.debug  # a browser asks first without one
        said(
            "status page: refused a request from %s: %s (401)",
            environ.get("REMOTE_ADDR", "?"),
            "wrong login" if header else "no login given",
        )
        answer = _plain("401 Unauthorized", "this page needs a login")
        answer[3].extend(("WWW-Authenticate", c) for c in _challenges(self.auth))
        return answer


def _accepted(auth: HttpAuth, header: str) -> bool:
    """Is ``header`` (``Authorization``) the configured basic login or bearer token?"""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and auth.token is not None:
        return hmac.compare_digest(_sent(value), _utf8(auth.token.value()))
    if scheme.lower() == "basic" and auth.password is not None and auth.user is not None:
        user, sep, password = _basic(value).partition(":")
        right_user = _same(user, auth.user)
        return bool(sep) and _same(password, auth.password.value()) and right_user
    return False


def _basic(value: str) -> str:
    """The decoded ``user:password`` ("" when it is not base64 of UTF-8 text).  A header
    byte that is not ASCII reaches here as a Latin-1 character, which ``b64decode`` refuses
    with a plain ``ValueError`` (``binascii.Error`` and ``UnicodeDecodeError`` are ones)."""
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except ValueError:
        return ""


def _same(given: str, expected: str) -> bool:
    """Compared in constant time (a timing difference must not tell how much was right)."""
    return hmac.compare_digest(_utf8(given), _utf8(expected))


def _sent(header: str) -> bytes:
    """The bytes a client sent in a header (WSGI hands them over as Latin-1 text)."""
    return header.encode("latin-1", "replace")


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _loopback_name(host: str) -> bool:
    """``host`` (a ``Host`` header: a name or address, maybe a port) names this machine's
    loopback: ``localhost`` or an address such as 127.0.0.1 or [::1]."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return is_loopback(name.removesuffix("."))


def _challenges(auth: HttpAuth) -> list[str]:
    found = [f'Basic realm="{HTTP_REALM}", charset="UTF-8"'] if auth.password else []
    return found + ([f'Bearer realm="{HTTP_REALM}"'] if auth.token else [])


# --------------------------------------------------------------------------- answers


def _query(query: str) -> page.Query:
    """What ``query`` asks for; raises ``ValueError`` for more than ``MAX_FIELDS`` fields."""
    reasons = parse_qs(query, max_num_fields=MAX_FIELDS).get("reason", [""])
    return page.Query(reason=reasons[0][: page.REASON_LIMIT])


def _plain(status: str, message: str) -> Answer:
    return (status, TEXT, (message + "\n").encode(), [])


def _json(doc: Any) -> bytes:
    """JSON as ``stowd status --json`` writes it (ASCII: every other character escaped);
    ``<``, ``>`` and ``&`` as \\u escapes, so no browser can take it for HTML."""
    text = json.dumps(doc, indent=2)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _static(name: str) -> bytes:
    return resources.files("stowd.service").joinpath("static", name).read_bytes()


def _secured(start: StartResponse) -> StartResponse:
    """``start_response`` that adds the security headers (for the metrics app)."""

    def secured(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
        return start(status, [*headers, *SECURITY_HEADERS], *rest)

    return secured


def _send(answer: Answer, start: StartResponse, *, head: bool) -> Iterable[bytes]:
    status, kind, body, more = answer
    headers = [("Content-Type", kind), ("Content-Length", str(len(body))), *SECURITY_HEADERS]
    start(status, [*headers, *more])
    return [] if head else [body]


# --------------------------------------------------------------------------- the server


class _Handler(WSGIRequestHandler):
    """Request lines are not logged (the app logs refused logins); silent clients time out,
    and so do slow ones: the request line and headers must all arrive within
    ``REQUEST_TIMEOUT`` (a byte now and then would keep a slot for ever otherwise)."""

    timeout = REQUEST_TIMEOUT

    def handle(self) -> None:
        self._expired = False
        self._deadline = threading.Timer(REQUEST_TIMEOUT, self._cut)
        self._deadline.daemon = True
        self._deadline.start()
        try:
            super().handle()
        finally:
            self._deadline.cancel()

    def parse_request(self) -> bool:
        read = super().parse_request()
        self._deadline.cancel()  # the request is in (or refused): the answer is ours to send
        return read and not self._expired

    def _cut(self) -> None:
        """The request did not arrive in time: its connection is shut, which ends the read."""
        self._expired = True
        log.debug(
            "status page: closed a connection from %s: no request in time", self.client_address[0]
        )
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: " + format, *args)


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request, at most ``MAX_CONNECTIONS`` at once."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: closed, never queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (none left): its slot is free again
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


Server = metrics.Server  # the listener in a thread of its own; ``close()`` stops it


def serve(config: Config) -> Server:
    """Serve ``config.http``'s listener (port 0: any free one, see ``Server.port``); raises
    ``StowdError`` when it cannot be bound."""
    assert config.http is not None
    host, port = config.http.host, config.http.port
    server_class = _Server6 if ":" in host else _Server
    try:
        httpd = make_server(host, port, App(config), server_class, _Handler)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StowdError(
            f"cannot serve the status page on {host_port(host, port)}: {reason}"
        ) from exc
    thread = threading.Thread(target=httpd.serve_forever, name="stowd-http", daemon=True)
    thread.start()
    return Server(httpd, thread)


def start(config: Config) -> Server | None:
    """Serve the status page when ``http.listen`` is set (None: it is not), and say where;
    raises ``StowdError``."""
    if config.http is None:
        return None
    server = serve(config)
    where = host_port(server.host, server.port)
    login = "without a login" if config.http.auth is None else "behind its login"
    log.info("serving the status page on http://%s/ (and /metrics), %s", where, login)
    return server

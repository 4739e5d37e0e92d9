"""``stowd check-config --connect``: reach each destination and say plainly what works.

One block per destination, one line per step; a step after a failed one is not tried::

    destination pacs: https://pacs.example/dicom-web
      ok    connect  pacs.example:443 (10.1.2.3) in 3 ms
      ok    TLS      TLSv1.3; certificate CN=pacs.example, issued by CN=Hospital CA, ...
      ok    login    basic as stowd (password from file /etc/stowd/pacs.pw): accepted
      ok    query    GET /dicom-web/studies?limit=1: HTTP 200, the archive answers DICOMweb ...

``connect`` is a plain socket to the archive's host and port (or to the proxy); everything
after it goes through ``client.http_client``, so the daemon's auth, TLS context, headers, proxy
and ``trust_env`` apply unchanged.  The TLS details come from that request's own connection.

Nothing here prints a secret: URLs are ``display_url``, secrets are named by where they come
from, and every line is scrubbed of the secret values as a last guard.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from stowd.config.model import Destination
from stowd.config.yamlwalk import redact_url
from stowd.dicomweb import answers, httperrors
from stowd.dicomweb.auth import OAuth2
from stowd.dicomweb.client import http_client
from stowd.dicomweb.stowanswer import is_server_root, server_root_hint
from stowd.errors import AnswerTooSlow, ClientSetupError, SecretUnavailable, TokenError
from stowd.printable import escape_lines

MAX_STEP = 10.0  # seconds, at most, for each step
QIDO_ACCEPT = "application/dicom+json"
OK, FAIL, SKIP, NOTE = "ok", "FAIL", "skip", "note"
STEPS = ("connect", "TLS", "login", "query")
_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Step:
    """One line of a destination's block."""

    name: str
    state: str  # OK, FAIL, SKIP (not tried after a failure) or NOTE (neither good nor bad)
    text: str


@dataclass
class ConnectReport:
    """What reaching one destination showed."""

    name: str
    url: str  # display_url: no user:password
    steps: list[Step] = field(default_factory=list)
    secrets: tuple[str, ...] = field(default=(), repr=False)  # values to scrub from the text

    @property
    def ok(self) -> bool:
        return all(s.state in (OK, NOTE) for s in self.steps)

    def add(self, name: str, state: str, text: str) -> None:
        self.steps.append(Step(name, state, text))

    def skip_rest(self, reason: str = "not tried") -> None:
        done = {s.name for s in self.steps}
        for name in STEPS:
            if name not in done:
                self.add(name, SKIP, reason)


def check(
    destination: Destination, *, transport: httpx.BaseTransport | None = None
) -> ConnectReport:
    """Reach ``destination``: TCP, TLS, login and a harmless QIDO-RS query."""
    report = ConnectReport(destination.name, destination.display_url)
    _read_secrets(report, destination)  # a missing secret is a failed login, found first
    target = _Target.for_destination(destination)
    if target is None:
        report.add("connect", FAIL, "the url has no host name")
    elif transport is None:  # an injected transport (tests) has no socket to reach
        _connect(report, target, _step_timeout(destination))
    if report.ok:
        _request(report, destination, transport)
    report.skip_rest()
    return report


def render(reports: list[ConnectReport]) -> str:
    """The blocks for humans, secrets scrubbed."""
    blocks = []
    for report in reports:
        verdict = "works" if report.ok else "does NOT work"
        lines = [f"destination {report.name}: {report.url}: {verdict}"]
        steps = sorted(report.steps, key=lambda s: STEPS.index(s.name))
        lines += [f"  {s.state:<5} {s.name:<8} {s.text}" for s in steps]
        # what the archive says (its certificate, its error pages) is escaped line by line
        blocks.append(escape_lines(_scrub(line, report.secrets) for line in lines))
    return "\n\n".join(blocks)


# -- connect ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    """Where the first TCP connection goes: the archive, or the proxy in front of it."""

    host: str
    port: int
    proxy: str | None  # the proxy's URL for display (no user:password), when one is used

    @classmethod
    def for_destination(cls, destination: Destination) -> _Target | None:
        url = urlsplit(destination.url)
        if not url.hostname:
            return None
        proxy = _proxy_for(destination, url.hostname, url.scheme)
        if proxy is not None:
            p = urlsplit(proxy)
            return cls(p.hostname or "", p.port or _PORTS.get(p.scheme, 80), redact_url(proxy))
        return cls(url.hostname, url.port or _PORTS.get(url.scheme, 80), None)


def _proxy_for(destination: Destination, host: str, scheme: str) -> str | None:
    if destination.access.proxy:
        return destination.access.proxy
    if not destination.access.trust_env:
        return None
    if urllib.request.proxy_bypass(host):
        return None
    found = urllib.request.getproxies_environment()
    return found.get(scheme) or found.get("all")


def _step_timeout(destination: Destination) -> float:
    return min(destination.timeouts.connect, MAX_STEP)


def _connect(report: ConnectReport, target: _Target, timeout: float) -> None:
    what = f"{target.host}:{target.port}"
    if target.proxy:
        what = f"proxy {target.proxy} ({what})"
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        report.add("connect", FAIL, f"cannot find the host {target.host!r} (DNS): {_os_text(exc)}")
        return
    started = time.monotonic()
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
            address = sock.getpeername()[0]
    except TimeoutError:
        report.add("connect", FAIL, f"{what}: no answer within {timeout:g} s (a firewall?)")
        return
    except OSError as exc:
        addresses = ", ".join(dict.fromkeys(str(i[4][0]) for i in infos))
        report.add("connect", FAIL, f"{what} ({addresses}): {_os_text(exc)}")
        return
    ms = (time.monotonic() - started) * 1000
    report.add("connect", OK, f"{what} ({address}) in {ms:.0f} ms")


def _os_text(exc: OSError | UnicodeError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on this port: check the url's port)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    return str(exc) or type(exc).__name__


# -- secrets and login -----------------------------------------------------------------------
def _read_secrets(report: ConnectReport, destination: Destination) -> None:
    """Read every secret now (a failed login when one cannot be); remember them to scrub."""
    for secret in destination.access.secrets:
        try:
            report.secrets += (secret.value(),)
        except SecretUnavailable as exc:
            report.add("login", FAIL, str(exc))
            return


def _login_words(destination: Destination) -> str:
    auth = destination.access.auth
    if auth is None:
        return "no auth set"
    where = auth.secret.where if auth.secret is not None else "?"
    if auth.type == "basic":
        return f"basic as {auth.username} (password from {where})"
    if auth.type == "bearer":
        return f"bearer token (from {where})"
    if auth.type == "google":
        return f"google service account (key from {where})"
    if auth.type == "aws":
        keys = f"access key {auth.client_id}" if auth.client_id else "the AWS credential chain"
        return f"aws SigV4 in {auth.region} ({keys})"
    return f"oauth2 client {auth.client_id} at {redact_url(auth.token_url)} (secret from {where})"


# -- the request -----------------------------------------------------------------------------
@dataclass
class _Answer:
    status: int
    content_type: str
    location: str | None
    tls: dict[str, Any] | None  # version and certificate, when https
    body: bytes = b""  # the start of the body of a refusal


def _request(
    report: ConnectReport, destination: Destination, transport: httpx.BaseTransport | None
) -> None:
    try:
        client = http_client(destination, transport=transport)
    except ClientSetupError as exc:
        report.add("TLS", FAIL, str(exc))
        return
    with client:
        if isinstance(client.auth, OAuth2) and not _fetch_token(report, destination, client.auth):
            return
        url = destination.url.rstrip("/") + "/studies"
        try:
            answer = _query(client, url, _step_timeout(destination))
        except httpx.TransportError as exc:
            _transport_failure(report, destination, exc)
            return
        except AnswerTooSlow as exc:  # a header or error page trickled past its deadline
            report.add("query", FAIL, str(exc))
            return
        except (SecretUnavailable, TokenError) as exc:  # read again for the request itself
            report.add("login", FAIL, f"{_login_words(destination)}: {exc}")
            return
    _tls_step(report, destination, answer.tls)
    _login_step(report, destination, answer.status)
    _query_step(report, destination, answer)


def _fetch_token(report: ConnectReport, destination: Destination, auth: OAuth2) -> bool:
    """Whether the token endpoint answered with a token (the login step for oauth2)."""
    words = _login_words(destination)
    try:
        report.secrets += (auth.token(),)
    except TokenError as exc:
        has_cert = destination.access.tls.client_cert is not None
        tls = httperrors.token_tls_problem(exc, has_cert)
        report.add("login", FAIL, f"{words}: {tls or exc}")
        return False
    except SecretUnavailable as exc:
        report.add("login", FAIL, f"{words}: {exc}")
        return False
    report.add("login", OK, f"{words}: the token endpoint answered with a token")
    return True


def _query(client: httpx.Client, url: str, step: float) -> _Answer:
    """The archive's answer to a QIDO-RS query, waited for ``step`` seconds at a time; its
    header and error page must have come within twice that (else ``AnswerTooSlow``)."""
    headers = {"Accept": QIDO_ACCEPT}
    started = time.monotonic()
    timeout = httpx.Timeout(step)
    with (
        answers.within(answers.answer_seconds(step), lambda: started, "the archive"),
        client.stream("GET", url, params={"limit": "1"}, headers=headers, timeout=timeout) as r,
    ):
        answer = _Answer(
            r.status_code,
            r.headers.get("Content-Type", ""),
            r.headers.get("Location"),
            _tls_details(r),
        )
        if r.status_code not in (200, 204):
            answer.body = _start(r)
        return answer


def _start(response: httpx.Response, limit: int = 2048) -> bytes:
    return answers.read_start(response, limit)


def _tls_details(response: httpx.Response) -> dict[str, Any] | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    ssl_object = stream.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    return {"version": ssl_object.version(), "cert": ssl_object.getpeercert() or {}}


def _transport_failure(
    report: ConnectReport, destination: Destination, exc: httpx.TransportError
) -> None:
    has_cert = destination.access.tls.client_cert is not None
    connecting = isinstance(exc, httpx.ConnectError)
    tls = httperrors.tls_problem(exc, has_cert=has_cert, connecting=connecting)
    if tls is not None and urlsplit(destination.url).scheme == "https":
        report.add("TLS", FAIL, tls)
    elif isinstance(exc, httpx.TimeoutException):
        report.add("query", FAIL, f"no answer within {_step_timeout(destination):g} s")
    elif isinstance(exc, httpx.ProxyError):
        report.add("connect", FAIL, f"the proxy refused the connection: {httperrors.plain(exc)}")
    elif connecting:
        report.add("connect", FAIL, f"cannot connect: {httperrors.plain(exc)}")
    else:
        report.add("query", FAIL, f"the request failed: {httperrors.plain(exc)}")


def _tls_step(report: ConnectReport, destination: Destination, tls: dict[str, Any] | None) -> None:
    if urlsplit(destination.url).scheme != "https":
        words = "none: http:// sends everything in clear text"
        report.add(
            "TLS", NOTE, words + (", including the login" if destination.access.auth else "")
        )
        return
    if tls is None:
        report.add("TLS", OK, "handshake done")
        return
    cert = tls["cert"]
    if not cert:
        report.add("TLS", NOTE, f"{tls['version']}; certificate NOT checked (verify_tls: false)")
        return
    subject, issuer = _name(cert.get("subject", ())), _name(cert.get("issuer", ()))
    until = cert.get("notAfter", "?")
    report.add(
        "TLS",
        OK,
        f"{tls['version']}; certificate {subject}, issued by {issuer}, valid until {until}",
    )


def _name(rdns: Any) -> str:
    parts = []
    for rdn in rdns:
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O", "countryName": "C"}.get(key)
            if short:
                parts.append(f"{short}={value}")
    return ", ".join(parts) or "(no name)"


def _login_step(report: ConnectReport, destination: Destination, status: int) -> None:
    words = _login_words(destination)
    auth = destination.access.auth
    if status in (401, 403):
        hint = "wrong or expired credentials?" if auth else "set auth"
        what = "refused the login" if auth else "wants a login"
        report.add("login", FAIL, f"{words}: the archive {what} (HTTP {status}): {hint}")
    elif status == 407:
        report.add("login", NOTE, f"{words}: not tried (the proxy refused first)")
    elif auth is None:
        report.add("login", NOTE, words)
    elif auth.type != "oauth2":  # oauth2: the token step said it
        report.add("login", OK, f"{words}: accepted")


def _query_step(report: ConnectReport, destination: Destination, answer: _Answer) -> None:
    path = urlsplit(destination.url).path.rstrip("/") + "/studies?limit=1"
    what = f"GET {path}: HTTP {answer.status}"
    status = answer.status
    if status in (200, 204) and "html" in answer.content_type.lower():
        report.add(
            "query",
            FAIL,
            f"{what} but an HTML page, not DICOM JSON (a login page or "
            "a web UI in the way? check the url)",
        )
    elif status in (200, 204):
        report.add("query", OK, f"{what}, the archive answers DICOMweb queries")
    elif status in (401, 403):
        report.add("query", FAIL, f"{what}, login refused")
    elif status == 404:
        report.add("query", FAIL, f"{what}, no DICOMweb service at this URL (check url)")
    elif status == 407:
        report.add("query", FAIL, f"{what}, the proxy wants credentials")
    elif 300 <= status < 400:
        to = f" to {redact_url(answer.location)}" if answer.location else ""
        report.add("query", FAIL, f"{what}, the archive redirects{to} (check url)")
    elif status == 400 and is_server_root(destination.url):
        # Orthanc's REST API at its root answers GET /studies?limit=1 with 400 and
        # "Missing \"since\" argument" (Orthanc 1.10.1, tests/support/orthanc.py)
        report.add(
            "query", FAIL, f"{what}, not a DICOMweb service: {server_root_hint(destination.url)}"
        )
    elif status == 400 and b"SSL certificate" in answer.body:  # nginx: ssl_verify_client
        fix = "set tls.client_cert and tls.client_key"
        if destination.access.tls.client_cert is not None:
            fix = "it refused ours (tls.client_cert)"
        report.add("query", FAIL, f"{what}, the archive wants a client certificate: {fix}")
    else:
        report.add("query", FAIL, what + (" (server error)" if status >= 500 else ""))


# -- text --------------------------------------------------------------------------------------
def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for value in sorted(secrets, key=len, reverse=True):
        if len(value) >= 3:
            text = text.replace(value, "***")
    return text

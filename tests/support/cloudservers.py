"""Stand-ins for the cloud archives' logins, checking what a client sends without trusting it.

``JwtTokenServer(email, public_key)`` is Google's OAuth2 token endpoint for service accounts:
``POST /token`` with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and an
``assertion`` (RFC 7523 2.1), a JWT signed RS256 with the account's private key whose claims
are ``iss`` (the account's email), ``scope``, ``aud`` (always Google's token endpoint
``https://oauth2.googleapis.com/token``, whatever the key's token_uri), ``iat`` and ``exp``
(at most an hour later) -- as Google documents it in "Using OAuth 2.0 for Server to Server
Applications" (developers.google.com/identity/protocols/oauth2/service-account, "Preparing to
make an authorized API call").  The signature is checked here with the public key, with
``cryptography`` (not google-auth, which signs it).  A bad assertion gets 400
``invalid_grant`` (RFC 6749 5.2, which RFC 7523 3.1 names for it).  Tokens are those of
``TokenServer``, so ``BearerProxy`` admits them.

``SigV4Proxy(upstream, keys, region)`` is an AWS endpoint: it recomputes each request's
Signature Version 4 from the request as received (``sigv4``, written here from AWS's
description, "Create a canonical request for Signature Version 4" in the IAM user guide,
and checked against AWS's published test-suite vectors in test_cloudauth.py) and passes only
a matching one to *upstream*.  A body sent with ``x-amz-content-sha256:
STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` must be as long as ``x-amz-decoded-content-length`` says
(HealthImaging's documented STOW-RS request sends both headers with the file as it is).
A refusal is 403 with ``x-amzn-ErrorType`` (AWS's "Common Errors": signature, unknown key and
expired token errors are 403; ``InvalidSignatureException`` is the name AWS's JSON services
give a signature that does not match) and a JSON ``message``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from localserver import LocalServer
from oauthserver import _HOP_BY_HOP, TokenRequest, TokenServer, _Handler, _TokenHandler

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_AUDIENCE = "https://oauth2.googleapis.com/token"
STREAMING = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
SKEW = 15 * 60  # AWS refuses a request dated more than 15 minutes off (RequestExpired)


# -- Google: the JWT bearer grant ------------------------------------------------------------


class JwtTokenServer(TokenServer):
    """Tokens for one service account, whose assertions must verify with ``public_key``."""

    def __init__(
        self, email: str, public_key: rsa.RSAPublicKey, *, scope: str, lifetime: int = 3600
    ) -> None:
        super().__init__(email, "", lifetime=lifetime)
        self._httpd.RequestHandlerClass = _JwtHandler
        self.public_key = public_key
        self.scope = scope
        self.refusals: list[str] = []  # why each refused assertion was refused


class _JwtHandler(_TokenHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server names)
        owner: JwtTokenServer = self.server.owner  # type: ignore[attr-defined]
        form = urllib.parse.parse_qs(self.read_body().decode("utf-8", "replace"))
        grant = form.get("grant_type", [""])[0]
        problem = "grant_type is not the JWT bearer grant" if grant != JWT_GRANT else None
        claims: dict[str, Any] = {}
        if problem is None:
            claims, problem = check_assertion(form.get("assertion", [""])[0], owner)
        owner.record(
            TokenRequest(time.monotonic(), claims.get("iss", ""), problem is None, "jwt", "")
        )
        if problem is not None:
            with owner.lock:
                owner.refusals.append(problem)
            self.answer_json(400, {"error": "invalid_grant", "error_description": problem})
            return
        doc = {"access_token": owner.issue(), "token_type": "Bearer", "expires_in": owner.lifetime}
        self.answer_json(200, doc, {"Cache-Control": "no-store"})


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_assertion(  # noqa: PLR0911 (one return per check, in the order Google makes them)
    jwt: str, owner: JwtTokenServer
) -> tuple[dict[str, Any], str | None]:
    """The assertion's claims, and why it is refused (None: good)."""
    parts = jwt.split(".")
    if len(parts) != 3:
        return {}, "the assertion is not a JWT"
    header, claims = json.loads(_b64(parts[0])), json.loads(_b64(parts[1]))
    if header.get("alg") != "RS256":
        return claims, "the assertion is not signed RS256"
    try:
        owner.public_key.verify(
            _b64(parts[2]), f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        return claims, "Invalid JWT Signature."
    now = time.time()
    wanted = {"iss": owner.client_id, "aud": GOOGLE_AUDIENCE, "scope": owner.scope}
    for name, value in wanted.items():
        if claims.get(name) != value:
            return claims, f"the assertion's {name} is not {value}"
    if not claims.get("iat", now + 999) <= now + 60 < claims.get("exp", 0) + 60:
        return claims, "the assertion is not valid now"
    if claims["exp"] - claims["iat"] > 3600:
        return claims, "the assertion is valid for more than an hour"
    return claims, None


# -- AWS: Signature Version 4 ----------------------------------------------------------------


def canonical_request(
    method: str, target: str, headers: Mapping[str, str], signed: list[str], payload: str
) -> str:
    """The canonical request of SigV4 (not S3: the path is normalised and encoded)."""
    path, _, query = target.partition("?")
    path = urllib.parse.quote(urllib.parse.unquote(path) or "/", safe="/~")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    encoded = sorted((_quote(k), _quote(v)) for k, v in pairs)
    canonical_query = "&".join(f"{k}={v}" for k, v in encoded)
    lines = [f"{name}:{' '.join(headers[name].split())}\n" for name in signed]
    return "\n".join([method, path, canonical_query, "".join(lines), ";".join(signed), payload])


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def signature(secret: str, amz_date: str, scope: str, canonical: str) -> str:
    """The hex signature of ``canonical`` for ``scope`` (date/region/service/aws4_request)."""
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<scope>[^,]+), *"
    r"SignedHeaders=(?P<signed>[^,]+), *Signature=(?P<signature>[0-9a-f]{64})"
)


@dataclass(frozen=True)
class SigV4Event:
    method: str
    path: str
    status: int
    verdict: str  # "ok" or why it was refused
    signed: str = ""  # the SignedHeaders list
    payload: str = ""  # x-amz-content-sha256 as sent


class SigV4Proxy(LocalServer):
    """Passes correctly signed requests to *upstream*; refuses the others with 403."""

    def __init__(
        self,
        upstream: str,
        keys: Mapping[str, str],
        region: str,
        *,
        service: str = "medical-imaging",
        session_tokens: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(_SigV4Handler)
        self.upstream = upstream.rstrip("/")
        self.keys = dict(keys)  # access key id -> secret access key
        self.session_tokens = dict(session_tokens or {})  # access key id -> its session token
        self.region = region
        self.service = service
        self.client = httpx.Client(timeout=120.0)
        self.lock = threading.Lock()
        self.events: list[SigV4Event] = []

    def stop(self) -> None:
        super().stop()
        self.client.close()

    def record(self, event: SigV4Event) -> None:
        with self.lock:
            self.events.append(event)

    def history(self) -> list[SigV4Event]:
        with self.lock:
            return list(self.events)


def _check_sigv4(  # noqa: PLR0911 (one return per check)
    owner: SigV4Proxy, method: str, target: str, headers: Mapping[str, str], body: bytes
) -> tuple[str | None, str]:
    """(None, "") for a good signature, else (the error type, why)."""
    match = _AUTHORIZATION.fullmatch(headers.get("authorization", ""))
    if match is None:
        return "IncompleteSignature", "no SigV4 Authorization header"
    secret = owner.keys.get(match["key"])
    if secret is None:
        return "UnrecognizedClientException", "unknown access key"
    date, region, service, terminal = [*match["scope"].split("/"), "", "", "", ""][:4]
    if (region, service, terminal) != (owner.region, owner.service, "aws4_request"):
        return "InvalidSignatureException", f"credential scope {match['scope']}"
    signed = match["signed"].split(";")
    problem = _headers_problem(owner, match["key"], headers, signed, body)
    if problem is not None:
        return "InvalidSignatureException", problem
    amz_date = headers["x-amz-date"]
    if not amz_date.startswith(date):
        return "InvalidSignatureException", "x-amz-date is not the scope's date"
    stamp = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    if abs(time.time() - stamp.timestamp()) > SKEW:
        return "InvalidSignatureException", "x-amz-date is more than 15 minutes off"
    payload = headers.get("x-amz-content-sha256") or hashlib.sha256(body).hexdigest()
    canonical = canonical_request(method, target, headers, signed, payload)
    expected = signature(secret, amz_date, match["scope"], canonical)
    if not hmac.compare_digest(expected, match["signature"]):
        return "InvalidSignatureException", "the signature does not match"
    return None, ""


def _headers_problem(
    owner: SigV4Proxy, key: str, headers: Mapping[str, str], signed: list[str], body: bytes
) -> str | None:
    needed = {"host", "x-amz-date"}
    if body:
        needed |= {"content-type", "x-amz-content-sha256", "x-amz-decoded-content-length"}
    token = owner.session_tokens.get(key)
    if token is not None:
        needed.add("x-amz-security-token")
        if headers.get("x-amz-security-token") != token:
            return "wrong session token"
    if not needed <= set(signed) or any(name not in headers for name in signed):
        return f"signed headers {';'.join(signed)} lack some of {';'.join(sorted(needed))}"
    if signed != sorted(signed):
        return "SignedHeaders is not sorted"
    sent = headers.get("x-amz-content-sha256")
    if body and sent != STREAMING:
        return f"x-amz-content-sha256 is {sent}, not the documented {STREAMING}"
    if body and headers["x-amz-decoded-content-length"] != str(len(body)):
        return "x-amz-decoded-content-length is not the body's length"
    return None


class _SigV4Handler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 (http.server names)
        self._pass()

    def do_POST(self) -> None:  # noqa: N802 (http.server names)
        self._pass()

    def _pass(self) -> None:
        owner: SigV4Proxy = self.server.owner  # type: ignore[attr-defined]
        body = self.read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        error, why = _check_sigv4(owner, self.command, self.path, headers, body)
        signed = _AUTHORIZATION.fullmatch(headers.get("authorization", ""))
        event = SigV4Event(
            self.command,
            self.path,
            403 if error else 0,
            why or "ok",
            signed["signed"] if signed else "",
            headers.get("x-amz-content-sha256", ""),
        )
        if error is not None:
            owner.record(event)
            doc = {"message": f"The request signature we calculated does not match ({why})"}
            self.answer_json(403, doc, {"x-amzn-ErrorType": f"{error}:http://internal/"})
            return
        forward = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        response = owner.client.request(
            self.command, owner.upstream + self.path, content=body, headers=forward
        )
        owner.record(
            SigV4Event(
                event.method, event.path, response.status_code, "ok", event.signed, event.payload
            )
        )
        content_type = response.headers.get("Content-Type", "application/octet-stream")
        self.answer(response.status_code, response.content, content_type)

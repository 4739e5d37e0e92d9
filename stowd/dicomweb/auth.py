"""Logins as ``httpx.Auth``: basic, bearer and OAuth2 client credentials; Google service
accounts (``googleauth.py``) and AWS SigV4 (``awsauth.py``) are imported only when configured,
since their libraries are optional extras.

Every request reads its secret again (``Secret.value()``), so a fixed secret file is used
without a restart; ``SecretUnavailable`` goes up to ``httperrors.py``, which holds the destination.

OAuth2 (RFC 6749 4.4): the access token is fetched from ``token_url`` with the client's id and
secret as HTTP Basic (2.3.1), cached with its expiry and fetched again at 80% of its life or
60 s before it ends, whichever is earlier; a token without ``expires_in`` is used until the
archive answers 401.  One lock per login: workers sharing a client wait for one fetch.

The token endpoint's failures become ``TokenRefused`` (our credentials or the endpoint are
wrong: hold the destination) or ``TokenUnreachable`` (try again later); ``httperrors.py`` maps them.
The retry after a 401 lives in ``stow.py`` too: a streamed body cannot be sent twice by httpx.

No message made here holds a secret: the token endpoint's ``error_description`` is cut short
and scrubbed of the client secret, its body is never quoted, and URLs are shown redacted.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from urllib.parse import quote_plus

import httpx

from stowd.config.access import Auth
from stowd.config.secrets import Secret
from stowd.config.yamlwalk import redact_url
from stowd.dicomweb import answers, httperrors
from stowd.errors import (
    AnswerTooSlow,
    SecretUnavailable,
    TokenError,
    TokenRefused,
    TokenUnreachable,
    UnusableAnswer,
)

log = logging.getLogger("stowd.auth")

TOKEN_TIMEOUT = 30.0  # seconds for each phase of a token request
REFRESH_SHARE = 0.8  # fetch a new token after this share of its life ...
REFRESH_MARGIN = 60.0  # ... or this many seconds before it ends, whichever is earlier
MAX_DESCRIPTION = 200
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5B\x5D-\x7E]{1,64}")  # RFC 6749 5.2 "error"
_BUSY = {408, 429}
HEADER_TOKEN = re.compile(r"[\x21-\x7E]+")  # visible ASCII: safe in an Authorization header


def make_auth(auth: Auth | None) -> httpx.Auth | None:
    """The ``httpx.Auth`` of a destination's ``auth`` setting (None: no login)."""
    if auth is not None and auth.type == "aws":  # its secret is None with the AWS chain
        from stowd.dicomweb.awsauth import AwsSigV4  # noqa: PLC0415 (an optional extra)

        return AwsSigV4(auth)
    if auth is None or auth.secret is None:
        return None
    if auth.type == "basic":
        return BasicLogin(auth.username, auth.secret)
    if auth.type == "bearer":
        return BearerToken(auth.secret)
    if auth.type == "google":
        from stowd.dicomweb.googleauth import GoogleServiceAccount  # noqa: PLC0415 (an optional extra)

        return GoogleServiceAccount(auth)
    return OAuth2(auth)


class BasicLogin(httpx.Auth):
    """HTTP Basic with the password read at each request."""

    def __init__(self, username: str, password: Secret) -> None:
        self.username = username
        self.password = password

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = basic_header(self.username, self.password.value())
        yield request


class BearerToken(httpx.Auth):
    """A static bearer token, read at each request."""

    def __init__(self, token: Secret) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        value = self.token.value()
        if not HEADER_TOKEN.fullmatch(value):
            raise SecretUnavailable(
                f"the token ({self.token.where}) holds spaces, line breaks or characters "
                "other than ASCII, which an HTTP header cannot carry"
            )
        request.headers["Authorization"] = f"Bearer {value}"
        yield request


RETRY_EARLY = 10.0  # a failed early refresh is tried again after this (the token still valid)


@dataclass(frozen=True)
class Token:
    value: str
    refresh_at: float | None  # monotonic; None: until refused
    expires_at: float | None = None  # monotonic: after this it is no use


class OAuth2(httpx.Auth):
    """OAuth2 client credentials: a cached access token, fetched through ``bind``'s client."""

    def __init__(
        self,
        auth: Auth,
        *,
        client_auth: str = "basic",  # or "post": client_id/client_secret in the form body
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert auth.secret is not None
        self.config = auth
        self.secret = auth.secret
        self.client_auth = client_auth
        self.clock = clock
        self.fetches = 0  # tokens fetched (for tests and check-config)
        self._lock = threading.Lock()
        self._token: Token | None = None
        self._client: httpx.Client | None = None

    def bind(self, client: httpx.Client) -> None:
        """Fetch tokens through ``client`` (its TLS, proxy and timeouts), without this login."""
        self._client = client

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        yield request

    def token(self) -> str:
        """A valid access token: the cached one, or a new one."""
        with self._lock:
            cached = self._token
            if cached is None or _due(cached, self.clock()):
                cached = self._token = self._renew(cached)
            return cached.value

    def _renew(self, cached: Token | None) -> Token:
        """A new token; when the early refresh fails, the old one while it is still valid."""
        try:
            return self._fetch()
        except TokenError as exc:
            now = self.clock()
            if cached is None or cached.expires_at is None or now >= cached.expires_at:
                raise
            log.warning(
                "%s; the current token is still valid for %.0fs and used meanwhile",
                exc,
                cached.expires_at - now,
            )
            retry = now + min(RETRY_EARLY, cached.expires_at - now)
            return Token(cached.value, retry, cached.expires_at)

    def invalidate(self, authorization: str | None) -> None:
        """The archive refused the token sent as ``authorization``: fetch a new one next time.

        A token another thread already replaced is left alone."""
        with self._lock:
            if self._token is not None and authorization in (None, f"Bearer {self._token.value}"):
                self._token = None

    # -- the token request -----------------------------------------------------------------
    def _fetch(self) -> Token:
        secret = self.secret.value()
        started = self.clock()
        response, content = self._post(secret)
        self.fetches += 1
        try:
            doc = json.loads(content)
        except (ValueError, RecursionError):  # not JSON, or nested beyond Python's limit
            doc = None
        if response.status_code != 200:
            secrets = (secret, quote_plus(secret), self._basic(secret))
            raise refusal(response, doc, self._where, secrets)
        token = _token_of(doc, started, self._where)
        life = "" if token.refresh_at is None else f", used for {token.refresh_at - started:.0f}s"
        log.debug("fetched an access token from %s%s", self._where, life)
        return token

    def _post(self, secret: str) -> tuple[httpx.Response, bytes]:
        if self._client is None:
            raise RuntimeError("OAuth2.bind() was not called")
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json"}
        if self.config.scope:
            form["scope"] = self.config.scope
        if self.client_auth == "basic":
            headers["Authorization"] = self._basic(secret)
        else:
            form |= {"client_id": self.config.client_id, "client_secret": secret}
        request = self._client.build_request(
            "POST", self.config.token_url, data=form, headers=headers, timeout=TOKEN_TIMEOUT
        )
        return self.exchange(request)

    def exchange(self, request: httpx.Request) -> tuple[httpx.Response, bytes]:
        """Send ``request`` to the token endpoint through ``bind``'s client (without this
        login); its answer, read within the deadline and size cap of token answers."""
        if self._client is None:
            raise RuntimeError("OAuth2.bind() was not called")
        started = time.monotonic()
        seconds = answers.answer_seconds(TOKEN_TIMEOUT)
        try:
            with answers.within(seconds, lambda: started, f"the token endpoint {self._where}"):
                response = self._client.send(request, auth=None, stream=True)
                return response, self._read(response, started)
        except httpx.TransportError as exc:
            raise httperrors.token_unreachable(exc, self._where) from exc
        except AnswerTooSlow as exc:  # its header was still arriving at the deadline
            raise TokenUnreachable(str(exc)) from exc

    def _read(self, response: httpx.Response, started: float) -> bytes:
        """The endpoint's answer, at most ``TOKEN_ANSWER_LIMIT`` and within twice
        ``TOKEN_TIMEOUT``: too large or undecodable -> ``TokenRefused``, too slow ->
        ``TokenUnreachable``."""
        who = f"the token endpoint {self._where}"
        try:
            return answers.read_body(
                response,
                limit=answers.TOKEN_ANSWER_LIMIT,
                seconds=answers.answer_seconds(TOKEN_TIMEOUT),
                started=started,
                who=who,
            )
        except AnswerTooSlow as exc:
            raise TokenUnreachable(str(exc)) from exc
        except UnusableAnswer as exc:
            raise TokenRefused(str(exc)) from exc

    def _basic(self, secret: str) -> str:
        """RFC 6749 2.3.1: id and secret form-encoded, then HTTP Basic."""
        return basic_header(quote_plus(self.config.client_id), quote_plus(secret))

    @property
    def _where(self) -> str:
        return redact_url(self.config.token_url)


def _due(token: Token, now: float) -> bool:
    return token.refresh_at is not None and now >= token.refresh_at


def basic_header(username: str, password: str) -> str:
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _token_of(doc: object, started: float, where: str) -> Token:
    if not isinstance(doc, dict) or not isinstance(doc.get("access_token"), str):
        raise TokenRefused(f"the token endpoint {where} answered without an access_token")
    if not HEADER_TOKEN.fullmatch(doc["access_token"]):
        raise TokenRefused(
            f"the token endpoint {where} issued an access_token with characters an HTTP "
            "header cannot carry"
        )
    kind = str(doc.get("token_type", "bearer"))
    if kind.lower() != "bearer":
        raise TokenRefused(
            f"the token endpoint {where} issued a token of type {kind[:30]!r}; "
            "stowd can send bearer tokens only"
        )
    return lived_token(doc["access_token"], _seconds(doc.get("expires_in")), started)


def lived_token(value: str, life: float | None, started: float) -> Token:
    """A token valid for ``life`` seconds from ``started`` (None: until refused)."""
    if life is None:
        return Token(value, None)
    # refresh at 80% of the life or a minute before the end; a short-lived token at half life
    refresh = max(life / 2, min(life * REFRESH_SHARE, life - REFRESH_MARGIN))
    return Token(value, started + refresh, started + life)


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        return float(value)
    return None


CLIENT_HINT = "check auth.client_id and auth.client_secret"
URL_HINT = "check auth.token_url"


def refusal(
    response: httpx.Response,
    doc: object,
    where: str,
    secrets: tuple[str, ...],
    *,
    client_hint: str = CLIENT_HINT,
    url_hint: str = URL_HINT,
) -> TokenError:
    """The ``TokenError`` of a token endpoint's answer other than 200."""
    status = response.status_code
    if status >= 500 or status in _BUSY:
        error: TokenError = TokenUnreachable(
            f"the token endpoint {where} is busy or unavailable (HTTP {status})", status=status
        )
        error.retry_after = response.headers.get("Retry-After")
        return error
    if 300 <= status < 400:
        text = f"the token endpoint {where} redirects (HTTP {status}): {url_hint}"
    elif status in (400, 401):
        text = f"the token endpoint {where} refused our client (HTTP {status}"
        text += _oauth_error(doc, secrets) + f"): {client_hint}"
    else:
        text = f"the token endpoint {where} answered HTTP {status}: {url_hint}"
    return TokenRefused(text, status=status)


def _oauth_error(doc: object, secrets: tuple[str, ...]) -> str:
    """``: invalid_client: <description>`` from an RFC 6749 5.2 answer, scrubbed of secrets."""
    if not isinstance(doc, dict):
        return ""
    code = doc.get("error")
    if not isinstance(code, str) or not _ERROR_CODE.fullmatch(code):
        return ""
    text = f": {code}"
    description = doc.get("error_description")
    if isinstance(description, str) and description.strip():
        text += f": {scrub(description, secrets)[:MAX_DESCRIPTION]}"
    return scrub(text, secrets)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every occurrence of a secret (and its parts after "Basic ") hidden."""
    for secret in secrets:
        for piece in (secret, secret.removeprefix("Basic ")):
            if piece:
                text = text.replace(piece, "***")
    return "".join(c if c.isprintable() else " " for c in text)

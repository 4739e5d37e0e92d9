"""Google Cloud Healthcare: a service account's access token, with the ``google-auth`` library
(the optional extra ``stowd[google]``; ``auth.py`` imports this module only when configured).

The key is a secret reference (``{file: ...}``, ``{credential: ...}`` or ``{env: ...}``), read
again at every token fetch, so a replaced key is used without a restart.  ``google-auth``
checks the key and signs the JWT assertion (RFC 7523) that the key's ``token_uri`` exchanges
for an access token; the exchange goes through the destination's own ``httpx.Client`` (its
TLS, proxy and timeouts) with the answer bounded as for OAuth2.  Caching, the refresh before
expiry and the one new token after a 401 are ``OAuth2``'s (this is one).

google-auth retries a token endpoint that answers 5xx or 429 twice itself, waiting about 1 s
and 2 s; after that the failure is ours (``TokenUnreachable``: try again later).

Nothing here shows the key: a key that cannot be used is described by what is wrong with it
(not JSON, a missing field, a private key that cannot be read), never by its content.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from google.auth import exceptions as google_errors
from google.auth import transport
from google.oauth2 import service_account

from stowd.config.access import Auth
from stowd.config.yamlwalk import redact_url
from stowd.dicomweb.auth import HEADER_TOKEN, TOKEN_TIMEOUT, OAuth2, Token, lived_token, refusal
from stowd.errors import SecretUnavailable, TokenRefused, TokenUnreachable

KEY_FIELDS = ("client_email", "private_key", "token_uri")
CLIENT_HINT = (
    "check that the service account's key (auth.key) is current: not deleted or disabled "
    "in the Google Cloud console"
)
URL_HINT = "check the token_uri in the service account's key"


class GoogleServiceAccount(OAuth2):
    """An ``OAuth2`` login whose token comes from a service account's key."""

    def __init__(self, auth: Auth, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(auth, clock=clock)
        self._token_uri = ""  # from the key, for messages

    @property
    def client(self) -> httpx.Client:
        """``bind``'s client."""
        if self._client is None:
            raise RuntimeError("GoogleServiceAccount.bind() was not called")
        return self._client

    def _fetch(self) -> Token:
        credentials = self._credentials()
        requests = _Requests(self)
        started = self.clock()
        try:
            credentials.refresh(requests)  # type: ignore[no-untyped-call]
        except google_errors.RefreshError as exc:
            raise self._refused(requests) from exc
        except google_errors.GoogleAuthError as exc:  # not an answer: reaching it failed
            text = f"the token endpoint {self._where} gave no access token: {type(exc).__name__}"
            raise TokenUnreachable(text) from exc
        except (ValueError, TypeError, OverflowError) as exc:  # google-auth reads expires_in
            text = (  # with int() and timedelta(): a string or a huge number ends here
                f"the token endpoint {self._where} answered with a token stowd cannot use "
                f"({type(exc).__name__}; such as an expires_in that is not a number of seconds, "
                "RFC 6749 5.1): check the token_uri in the service account's key, or a proxy "
                "in between"
            )
            raise TokenRefused(text) from exc
        self.fetches += 1
        return self._token_of(credentials, started)

    def _credentials(self) -> service_account.Credentials:
        """The service account of the key as it is now; ``SecretUnavailable`` if unusable."""
        info = _key_info(self.secret.value(), self.secret.where)
        self._token_uri = info["token_uri"]
        make = service_account.Credentials.from_service_account_info
        try:
            found: service_account.Credentials = make(info, scopes=[self.config.scope])  # type: ignore[no-untyped-call]
        except Exception:  # whatever the key's parser says, never its text
            raise SecretUnavailable(
                f"the service account key ({self.secret.where}) has a private_key that "
                "cannot be read (not an RSA key in PEM form)"
            ) from None
        return found

    def _token_of(self, credentials: service_account.Credentials, started: float) -> Token:
        token = credentials.token
        if not isinstance(token, str) or not HEADER_TOKEN.fullmatch(token):
            raise TokenRefused(
                f"the token endpoint {self._where} issued no access_token an HTTP header can carry"
            )
        return lived_token(token, _life(credentials.expiry), started)

    def _refused(self, requests: _Requests) -> Exception:
        if requests.answer is None or requests.answer[0].status_code == 200:
            text = f"the token endpoint {self._where} answered without an access_token"
            return TokenRefused(text)
        response, content = requests.answer
        try:
            doc = json.loads(content)
        except (ValueError, RecursionError):
            doc = None
        secrets = (self.secret.value(),)
        return refusal(
            response, doc, self._where, secrets, client_hint=CLIENT_HINT, url_hint=URL_HINT
        )

    @property
    def _where(self) -> str:
        return redact_url(self._token_uri) if self._token_uri else "(not known yet)"


def _key_info(text: str, where: str) -> dict[str, Any]:
    """The key's fields; ``SecretUnavailable`` saying what is wrong, never what it holds."""
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise SecretUnavailable(f"{where} is not a service account key (a JSON object)")
    if info.get("type") != "service_account":
        raise SecretUnavailable(
            f'{where} is not a service account key ("type" is not "service_account")'
        )
    missing = [name for name in KEY_FIELDS if not isinstance(info.get(name), str)]
    if missing:
        raise SecretUnavailable(f"the service account key ({where}) lacks {', '.join(missing)}")
    if not info["token_uri"].startswith(("https://", "http://")):
        raise SecretUnavailable(f"the service account key ({where}) has a token_uri that is no URL")
    return info


def _life(expiry: object) -> float | None:
    """Seconds until ``expiry`` (google-auth: naive UTC), None when not known."""
    if not isinstance(expiry, datetime.datetime):
        return None
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=datetime.UTC)
    return max(0.0, (expiry - datetime.datetime.now(datetime.UTC)).total_seconds())


class _Answer(transport.Response):
    def __init__(self, response: httpx.Response, content: bytes) -> None:
        self._response = response
        self._content = content

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return dict(self._response.headers)

    @property
    def data(self) -> bytes:
        return self._content


class _Requests(transport.Request):
    """google-auth's HTTP, through the login's client; keeps the last answer."""

    def __init__(self, login: GoogleServiceAccount) -> None:
        self.login = login
        self.answer: tuple[httpx.Response, bytes] | None = None

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _Answer:
        client = self.login.client
        request = client.build_request(
            method, url, content=body, headers=dict(headers or {}), timeout=TOKEN_TIMEOUT
        )
        response, content = self.login.exchange(request)
        self.answer = (response, content)
        return _Answer(response, content)

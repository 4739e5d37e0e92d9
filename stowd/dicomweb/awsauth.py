"""AWS HealthImaging: requests signed with SigV4 by botocore's signer (the optional extra
``stowd[aws]``; ``auth.py`` imports this module only when configured).

Credentials are ``auth.access_key_id`` with the secret ``auth.secret_access_key`` (and an
optional ``auth.session_token``), read again for every request; without them, botocore's
standard chain (environment, the shared files in ~/.aws of the user stowd, SSO, container
and instance roles), whose temporary credentials botocore renews before they expire.

The body is never hashed.  HealthImaging's STOW-RS example signs the header
``x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` with
``x-amz-decoded-content-length`` and sends the file as it is
(https://docs.aws.amazon.com/healthimaging/latest/devguide/dicomweb-storing.html, "Example 1:
To store a DICOM P10 file with the StoreDICOM action"); stowd signs the same two headers with
that value as the payload hash of the canonical request, so a request of any size is signed
without reading it first.  A request without a body (a QIDO-RS query) is signed with the
hash of the empty payload, as SigV4 does by default.

Only the request line, ``host``, ``content-type`` and the ``x-amz-*`` headers are signed:
headers a proxy may change (``accept-encoding``, ``connection``) are not.  AWS answers a
wrong key, a wrong signature or a missing permission with 403 and names the error in
``x-amzn-ErrorType``: that becomes ``TokenRefused`` (the destination is held, with the error
in the reason); the answer's body is never read or quoted.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Generator

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.exceptions import BotoCoreError
from botocore.session import Session

from stowd.config.access import Auth
from stowd.errors import SecretUnavailable, TokenRefused

SERVICE = "medical-imaging"  # the signing name in HealthImaging's documented curl example
STREAMING_PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
_COPIED = (
    "Authorization",
    "X-Amz-Date",
    "X-Amz-Security-Token",
    "X-Amz-Content-SHA256",
    "X-Amz-Decoded-Content-Length",
)
_ERROR_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,63}")
_HINT = "check auth.region and the credentials"
_HINTS = {
    "InvalidSignatureException": "the signature does not match: check auth.secret_access_key",
    "SignatureDoesNotMatch": "the signature does not match: check auth.secret_access_key",
    "UnrecognizedClientException": "the access key is not known: check auth.access_key_id",
    "InvalidClientTokenId": "the access key is not known: check auth.access_key_id",
    "IncompleteSignature": "the signature is incomplete: check auth.region",
    "MissingAuthenticationToken": "the request carried no signature AWS accepts",
    "ExpiredTokenException": "the temporary credentials have expired: renew them",
    "AccessDeniedException": "the credentials lack permission for medical-imaging:StoreDICOM "
    "on this data store",
}


class AwsSigV4(httpx.Auth):
    """SigV4 for service ``medical-imaging`` in ``auth.region``."""

    def __init__(self, auth: Auth) -> None:
        self.config = auth
        self._lock = threading.Lock()
        self._chain: Credentials | None = None  # from botocore's chain, renewed by botocore

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.sign(request, self.credentials())
        response = yield request
        if response.status_code == 403:
            raise TokenRefused(self._refused(response), status=403)

    def credentials(self) -> ReadOnlyCredentials:
        """The credentials for this request; ``SecretUnavailable`` if there are none."""
        auth = self.config
        if auth.secret is not None:
            token = None if auth.session_token is None else auth.session_token.value()
            return ReadOnlyCredentials(auth.client_id, auth.secret.value(), token)
        with self._lock:
            if self._chain is None:
                self._chain = _from_chain()
            try:
                return self._chain.get_frozen_credentials()  # renewed here when due
            except BotoCoreError as exc:
                raise SecretUnavailable(f"the AWS credentials cannot be renewed: {exc}") from None

    def sign(self, request: httpx.Request, credentials: ReadOnlyCredentials) -> None:
        """Add the SigV4 headers to ``request`` (its body is neither read nor hashed)."""
        headers = {}
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        length = request.headers.get("Content-Length")
        if length not in (None, "0") or "Transfer-Encoding" in request.headers:
            headers["X-Amz-Content-SHA256"] = STREAMING_PAYLOAD
            if length is not None:
                headers["X-Amz-Decoded-Content-Length"] = length
        signed = AWSRequest(method=request.method, url=str(request.url), headers=headers)
        SigV4Auth(credentials, SERVICE, self.config.region).add_auth(signed)
        for name in _COPIED:
            if name in signed.headers:
                request.headers[name] = signed.headers[name]

    def _refused(self, response: httpx.Response) -> str:
        kind = response.headers.get("x-amzn-ErrorType", "").partition(":")[0]
        if not _ERROR_TYPE.fullmatch(kind):
            return f"AWS refused the signed request (HTTP 403): {_HINT}"
        return f"AWS refused the signed request (HTTP 403, {kind}): {_HINTS.get(kind, _HINT)}"


def _from_chain() -> Credentials:
    try:
        found = Session().get_credentials()
    except BotoCoreError as exc:
        raise SecretUnavailable(f"the AWS credential chain failed: {exc}") from None
    if found is None:
        raise SecretUnavailable(
            "no AWS credentials: none in the environment (AWS_ACCESS_KEY_ID ...), in ~/.aws "
            "of the user stowd, nor an instance or container role; set auth.access_key_id "
            "and auth.secret_access_key"
        )
    return found

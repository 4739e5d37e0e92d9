"""The HTTP client of a destination: one configured ``httpx.Client`` (timeouts, TLS, login,
headers, proxy) and the QIDO-RS GET that lookups and verification make through it.

Every client stowd makes for an archive comes from ``http_client``, so the daemon's STOW-RS,
the lookups, the verification and ``check-config --connect`` share one login, one TLS context
and one way of reading answers (``answers.bound_reads``: each read within the answer's
deadline).  TLS files that cannot be used raise ``ClientSetupError``; a failure to reach the
archive is translated by ``httperrors.py``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Sequence

import httpx

from stowd.config.access import Tls
from stowd.config.model import Destination
from stowd.dicomweb import answers
from stowd.dicomweb.auth import OAuth2, make_auth
from stowd.dicomweb.httperrors import REACHING, failure_of, plain
from stowd.errors import ClientSetupError

QIDO_ACCEPT = "application/dicom+json, application/json;q=0.9"
QIDO_READ_TIMEOUT = 30.0  # seconds; a lookup is a small answer, unlike a STOW upload
# DICOM JSON only: Orthanc logs "Unsupported return MIME type" for every request that lists
# other types, and Azure's DICOM service accepts no other (its conformance statement v2).
# An archive that answers XML anyway is still read (parse_answer sniffs the body).
ACCEPT = "application/dicom+json"

USER_AGENT = "stowd/0.1"
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def http_client(
    destination: Destination, *, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """The configured ``httpx.Client`` of a destination: timeouts, TLS, login, headers, proxy.

    ``transport`` replaces the network (tests); the proxy setting is then not mounted, since a
    proxy mount would route every request around it.  Raises ``ClientSetupError``.
    """
    access = destination.access
    t = destination.timeouts
    auth = make_auth(access.auth)
    client = httpx.Client(
        timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
        limits=httpx.Limits(max_connections=destination.workers + 1),  # +1: a token request
        verify=tls_context(destination),
        trust_env=access.trust_env,
        proxy=access.proxy if transport is None else None,
        transport=transport,
        headers={
            "User-Agent": USER_AGENT,
            "Accept": ACCEPT,
            "Accept-Encoding": answers.ACCEPT_ENCODING,
        },
        auth=auth,
        event_hooks={"request": [_extra_headers(destination)]},
    )
    if isinstance(auth, OAuth2):
        auth.bind(client)
    answers.bound_reads(client)
    return client


def _extra_headers(destination: Destination) -> Callable[[httpx.Request], None]:
    """The configured headers, on requests to the archive's host only (not to a token
    endpoint elsewhere, which has no business seeing an archive's API key)."""
    host = httpx.URL(destination.url).host
    headers = dict(destination.access.headers)

    def add(request: httpx.Request) -> None:
        if request.url.host == host:
            request.headers.update(headers)

    return add


def _no_passphrase() -> bytes:
    raise ValueError("encrypted key")


def tls_context(destination: Destination) -> ssl.SSLContext | bool:
    """What httpx's ``verify`` gets: a context with our CA, client certificate and minimum
    version (with ``verify_tls: false`` it checks neither the certificate nor the host name)."""
    tls = destination.access.tls
    try:
        ctx = ssl.create_default_context()  # the system's CAs ...
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))  # ... plus the hospital's CA
        if not destination.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if tls.client_cert is not None:
            key = None if tls.client_key is None else str(tls.client_key)
            ctx.load_cert_chain(str(tls.client_cert), key, password=_no_passphrase)
    except ValueError as exc:
        if str(exc) != "encrypted key":
            raise ClientSetupError(_setup_text(tls, exc)) from exc
        raise ClientSetupError(
            f"the client key {tls.client_key or tls.client_cert} is encrypted: stowd needs it "
            "without a passphrase (openssl pkey -in KEY -out PLAIN_KEY; keep it readable by "
            "the stowd user only)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ClientSetupError(_setup_text(tls, exc)) from exc
    ctx.minimum_version = _TLS_VERSIONS[tls.min_version]
    return ctx


def _setup_text(tls: Tls, exc: BaseException) -> str:
    files = ", ".join(
        f"{name} {path}"
        for name, path in (("ca_file", tls.ca_file), ("client_cert", tls.client_cert))
        if path is not None
    )
    if tls.client_key is not None:
        files += f", client_key {tls.client_key}"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else plain(exc)
    return (
        f"the TLS files cannot be used ({files}): {reason} "
        "(each must be readable PEM, and the key must belong to the certificate)"
    )


def qido_get(
    client: httpx.Client, destination: Destination, url: str, params: Sequence[tuple[str, str]]
) -> tuple[int, bytes]:
    """A QIDO-RS GET (``lookup.py``, ``verify.py``): the status and body, or the
    ``StowFailure`` of not reaching ``destination`` (the same words as for STOW).  A query
    waits for its answer at most ``QIDO_READ_TIMEOUT`` (files are read one at a time
    meanwhile)."""
    headers = {"Accept": QIDO_ACCEPT}
    t = destination.timeouts
    read = min(t.read, QIDO_READ_TIMEOUT)
    timeout = httpx.Timeout(connect=t.connect, read=read, write=read, pool=t.pool)
    seconds = answers.answer_seconds(read)
    started = time.monotonic()
    try:
        request = client.build_request(
            "GET", url, params=list(params), headers=headers, timeout=timeout
        )
        with answers.within(seconds, lambda: started, "the archive"):
            response = client.send(request, stream=True)
            content = answers.read_body(
                response,
                limit=answers.QIDO_ANSWER_LIMIT,
                seconds=seconds,
                started=started,
                who="the archive",
            )
    except REACHING as exc:
        raise failure_of(exc, destination) from exc
    return response.status_code, content

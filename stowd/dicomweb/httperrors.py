"""httpx's exceptions in stowd's words: the one place where they become ours (``errors.py``).

Whatever may go wrong while a request is sent to an archive and its answer read (``REACHING``)
is translated here, with the same plain message wherever it happens (STOW-RS in ``stow.py``,
QIDO-RS in ``client.qido_get``, ``verify.py`` and ``lookup.py``; ``check-config --connect``
builds its own diagnosis from ``tls_problem`` and ``token_tls_problem``):

* transport trouble (connect errors, timeouts, a dropped connection) -> ``DestinationBusy``
  (``TimedOut`` for a timeout), carried by a ``QuickRetry`` where a quick in-process retry
  may help
* TLS failures (``tls_problem``: a certificate, the handshake, no TLS on the port)
  -> ``DestinationHeld``
* an answer over its size cap or undecodable -> ``DestinationHeld``; one still arriving at its
  deadline -> ``TimedOut`` (a ``DestinationBusy``)
* login trouble: a secret that cannot be read, TLS files that cannot be used, a token endpoint
  refusing our client -> ``DestinationHeld``; the token endpoint unreachable or 5xx
  -> ``DestinationBusy``

The token endpoint's own transport errors become ``TokenUnreachable`` (``token_unreachable``,
called by ``auth.py``) before they get here.
"""

from __future__ import annotations

import email.utils
import ssl
import time
from collections.abc import Iterator

import httpx

from stowd.config.model import Destination
from stowd.errors import (
    AnswerTooSlow,
    ClientSetupError,
    DestinationBusy,
    DestinationHeld,
    SecretUnavailable,
    StowFailure,
    TimedOut,
    TokenError,
    TokenRefused,
    TokenUnreachable,
    UnusableAnswer,
)

# what may go wrong while a request is sent and its answer read: mapped by ``failure``
REACHING = (
    ClientSetupError,
    SecretUnavailable,
    TokenError,
    UnusableAnswer,
    httpx.TransportError,
)


class QuickRetry(Exception):
    """A transport failure worth a quick in-process retry; carries the failure to raise."""

    def __init__(self, failure: StowFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def failure_of(exc: Exception, destination: Destination) -> StowFailure:
    """What a failure to reach ``destination`` means, for callers other than ``store`` (such
    as ``check-config --connect``): ``DestinationHeld`` or ``DestinationBusy``, with the same
    plain message.  For ``ClientSetupError``, ``SecretUnavailable``, ``TokenError``,
    ``UnusableAnswer`` and ``httpx.TransportError``; anything else is returned as a
    ``StowFailure`` of its text."""
    has_cert = destination.access.tls.client_cert is not None
    found = failure(exc, has_cert)
    if isinstance(found, QuickRetry):
        return found.failure
    return found if isinstance(found, StowFailure) else StowFailure(plain(exc))


def failure(exc: Exception, has_cert: bool) -> Exception:
    """Our exception (or a ``QuickRetry`` carrying it) for ``exc``, one of ``REACHING``;
    anything else is returned as it is."""
    if isinstance(exc, ClientSetupError):
        return DestinationHeld(str(exc))
    if isinstance(exc, UnusableAnswer):
        return _answer_failure(exc)
    if isinstance(exc, SecretUnavailable):
        return DestinationHeld(f"cannot log in: {exc}")
    if isinstance(exc, TokenError):
        return _token_failure(exc, has_cert)
    if isinstance(exc, httpx.TransportError):
        return _transport_failure(exc, has_cert)
    return exc


def _answer_failure(exc: UnusableAnswer) -> StowFailure:
    """An answer still arriving at its deadline: try later (no quick retry, it held a worker
    long enough); one too large or undecodable: hold, the same answer again would not help."""
    if isinstance(exc, AnswerTooSlow):
        return TimedOut(str(exc))
    return DestinationHeld(str(exc))


def _transport_failure(exc: httpx.TransportError, has_cert: bool) -> Exception:
    """Our exception (or a ``QuickRetry`` carrying it) for a failure to reach the archive."""
    tls = tls_problem(exc, has_cert=has_cert, connecting=isinstance(exc, httpx.ConnectError))
    if tls is not None:
        return DestinationHeld(f"TLS failure: {tls}")
    if isinstance(exc, httpx.ConnectError):
        return QuickRetry(DestinationBusy(f"cannot connect: {plain(exc)}"))
    if isinstance(exc, httpx.TimeoutException):
        return QuickRetry(TimedOut(f"timed out ({type(exc).__name__})"))
    return QuickRetry(DestinationBusy(f"connection failed: {plain(exc)}"))


def _token_failure(exc: TokenError, has_cert: bool) -> Exception:
    """The token endpoint's trouble: refused -> held; unreachable or 5xx -> busy."""
    if isinstance(exc, TokenRefused):
        return DestinationHeld(str(exc), status=exc.status)
    if isinstance(exc.__cause__, httpx.TransportError):
        tls = token_tls_problem(exc, has_cert)
        if tls is not None:
            return DestinationHeld(f"TLS failure at the token endpoint: {tls}")
        return QuickRetry(DestinationBusy(str(exc)))
    # no status: a login outage is never taken for "the archive answered 500 to these files"
    return DestinationBusy(str(exc), retry_after=retry_after(exc.retry_after))


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- TLS failures in plain words -----------------------------------------------------------------
_UNTRUSTED = (18, 19, 20, 21, 2)  # OpenSSL verify codes: self-signed, unknown issuer ...
_HOST_MISMATCH = (62, 64)  # hostname, IP address
_CLIENT_CERT_REFUSED = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_ACCESS_DENIED",
)
_NOT_TLS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "RECORD_LAYER")
_NO_VERSION = ("PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")


def tls_problem(
    exc: BaseException, *, has_cert: bool, connecting: bool = True, who: str = "the archive"
) -> str | None:
    """Plain words for a TLS failure behind ``exc``; None when it is not one.

    While connecting every SSL error counts; later (TLS 1.3 sends the client-certificate
    verdict after the handshake) only the server's alerts about our certificate do, and
    other errors stay transport trouble.
    """
    found = _ssl_error(exc)
    text = " ".join(plain(e) for e in _chain(exc))
    upper = text.upper()
    if "CERTIFICATE_REQUIRED" in upper:
        return f"{who} requires a client certificate: set tls.client_cert and tls.client_key"
    if any(alert in upper for alert in _CLIENT_CERT_REFUSED):
        if not has_cert:
            return f"{who} wants a client certificate: set tls.client_cert and tls.client_key"
        return (
            f"{who} refused our client certificate (tls.client_cert): is it signed by a CA "
            f"{who} trusts, and still valid? ({_detail(found, text)})"
        )
    if not connecting:
        return None
    if found is None and "CERTIFICATE_VERIFY_FAILED" not in upper and "SSL" not in upper:
        return None
    return _handshake_problem(found, upper, has_cert, who) + f" ({_detail(found, text)})"


def _handshake_problem(found: ssl.SSLError | None, upper: str, has_cert: bool, who: str) -> str:
    code = found.verify_code if isinstance(found, ssl.SSLCertVerificationError) else None
    cert_hint = (
        "our client certificate refused, or no common cipher?"
        if has_cert
        else "does it want a client certificate? set tls.client_cert and tls.client_key"
    )
    cases = (
        (
            code in _UNTRUSTED or (code is None and _untrusted_text(upper)),
            f"{who}'s certificate is not signed by a trusted CA (set tls.ca_file?)",
        ),
        (
            code in _HOST_MISMATCH or "MISMATCH" in upper,
            f"{who}'s certificate is made out to another host name than the one in the url",
        ),
        (code == 10 or "HAS EXPIRED" in upper, f"{who}'s certificate has expired"),
        (
            code == 9 or "NOT YET VALID" in upper,
            f"{who}'s certificate is not valid yet (check the clocks)",
        ),
        (
            any(marker in upper for marker in _NOT_TLS),
            f"{who} does not speak TLS on this port (is the url https:// by mistake?)",
        ),
        (
            any(marker in upper for marker in _NO_VERSION),
            f"{who} and stowd share no TLS version (see tls.min_version)",
        ),
        ("HANDSHAKE_FAILURE" in upper, f"{who} ended the TLS handshake ({cert_hint})"),
    )
    return next((text for hit, text in cases if hit), "the TLS handshake failed")


def _untrusted_text(upper: str) -> bool:
    return any(
        marker in upper
        for marker in ("SELF-SIGNED", "SELF SIGNED", "LOCAL ISSUER", "UNABLE TO GET ISSUER")
    )


def _detail(found: ssl.SSLError | None, text: str) -> str:
    if isinstance(found, ssl.SSLCertVerificationError) and found.verify_message:
        return f"OpenSSL: {found.verify_message}"
    if found is not None and found.reason:
        return f"OpenSSL: {found.reason}"
    return text[:200]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    return next((e for e in _chain(exc) if isinstance(e, ssl.SSLError)), None)


def plain(exc: BaseException) -> str:
    """An exception's text, or its type's name when it has none."""
    return str(exc) or type(exc).__name__


def token_tls_problem(exc: TokenError, has_cert: bool) -> str | None:
    """Plain words for a TLS failure of reaching the token endpoint behind ``exc``; None
    when it is not one."""
    cause = exc.__cause__
    if not isinstance(cause, httpx.TransportError):
        return None
    connecting = isinstance(cause, httpx.ConnectError)
    return tls_problem(cause, has_cert=has_cert, connecting=connecting, who="the token endpoint")


def token_unreachable(exc: httpx.TransportError, where: str) -> TokenUnreachable:
    """The ``TokenUnreachable`` of failing to reach the token endpoint at ``where``."""
    return TokenUnreachable(f"the token endpoint {where} cannot be reached: {plain(exc)}")

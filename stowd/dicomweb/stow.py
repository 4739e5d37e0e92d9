"""STOW-RS over HTTP: ``StowClient`` sends one request and returns the archive's answer.

It uses the parts of the DICOMweb client beside it: the multipart body streamed from disk
(``stowbody.py``), the configured HTTP client with its TLS and login (``client.py``), the
translation of httpx's exceptions into ours (``httperrors.py``) and the reading and judging of
answers, file by file (``stowanswer.py``).  Together they follow the retry table of
``docs/retries.md`` (what the worker then does with the files is there too):

* transport trouble, 408/429/502/503/504 -> ``DestinationBusy`` (retry, Retry-After honoured)
* 401/403/404/405/415, TLS failures      -> ``DestinationHeld`` (files stay queued)
* an answer over its size cap (``answers.py``) or undecodable -> ``DestinationHeld``; one
  still arriving at its deadline (twice the read timeout) -> ``DestinationBusy``
* login trouble: a secret that cannot be read, a token endpoint refusing our client
  -> ``DestinationHeld``; the token endpoint unreachable or 5xx -> ``DestinationBusy``;
  a 401 to an OAuth2 token -> one new token and one more attempt, then ``DestinationHeld``
* 200/202/409/400 bodies                 -> one ``Verdict`` per sent SOPInstanceUID; an
  instance the archive says it already holds (Azure's 45070) is stored (``StowOutcome.ALREADY``),
  or failed where the destination has ``duplicates: fail``; a refusal that may be transient
  is retried, the doubtful ones (``is_counted``) at most ``retry.max_refusals`` times
* a 4xx, 200 or 202 whose body is not a STOW-RS answer (empty, an HTML login page, other
  text)                                   -> ``DestinationHeld``
* stowd stopping while the destination's rate cap holds the body back (``pacing.py``)
                                          -> ``DestinationBusy`` (the files stay queued)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import httpx
import tenacity

from stowd.config.model import Destination
from stowd.dicomweb import answers
from stowd.dicomweb.auth import OAuth2
from stowd.dicomweb.client import http_client
from stowd.dicomweb.httperrors import (
    REACHING,
    QuickRetry,
    failure,
    plain,
    tls_problem,
)
from stowd.dicomweb.pacing import Pacing
from stowd.dicomweb.stowanswer import (
    Answer,
    answer_of,
)
from stowd.dicomweb.stowbody import Body, Part
from stowd.errors import ConnectionDropped, DestinationBusy, Stopping

# Names kept importable from here, where tests and the worker import them from.

log = logging.getLogger("stowd.stow")

IN_PROCESS_ATTEMPTS = 3


class StowClient:
    """One long-lived httpx client per destination; thread-safe.

    The client is made at the first request (and again after a TLS file problem), so a
    destination with a broken certificate file is held like any other, not a crash at start.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        stop: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
        pacing: Pacing | None = None,
    ) -> None:
        self.destination = destination
        self.stop = stop or threading.Event()
        self.pacing = pacing  # the destination's rate cap (max_rate), if it has one
        self._transport = transport
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        """The configured client; raises ``ClientSetupError``."""
        with self._lock:
            if self._http is None:
                self._http = http_client(self.destination, transport=self._transport)
            return self._http

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()

    def store(self, parts: Sequence[Part], progress: Callable[[], None] | None = None) -> Answer:
        """Send ``parts`` in one request; retry short transport blips in-process.

        An OAuth2 token the archive refuses (401) is fetched again once, and the request
        made again with a fresh body.  Raises ``FileVanished`` (before sending),
        ``DestinationBusy`` or ``DestinationHeld``.
        """
        try:
            return self._store(parts, progress, may_refresh=True)
        except _TokenRejected as rejected:
            rejected.auth.invalidate(rejected.authorization)
            log.info(
                "destination %s: the archive refused the access token (HTTP 401); "
                "fetching a new one",
                self.destination.name,
            )
            return self._store(parts, progress, may_refresh=False)

    def _store(
        self, parts: Sequence[Part], progress: Callable[[], None] | None, *, may_refresh: bool
    ) -> Answer:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(QuickRetry),
            stop=tenacity.stop_after_attempt(IN_PROCESS_ATTEMPTS),
            wait=tenacity.wait_exponential(multiplier=1, max=8),
            sleep=self._sleep,
            reraise=True,
        )
        dropped: list[QuickRetry] = []  # attempts whose connection the archive dropped

        def attempt() -> Answer:
            try:
                return self._attempt(parts, progress, may_refresh)
            except QuickRetry as blip:
                if isinstance(blip.failure, ConnectionDropped):
                    dropped.append(blip)
                raise

        try:
            return retrying(attempt)
        except QuickRetry as blip:
            # A drop among the attempts is what the worker must hear of (it may be a file),
            # even when the archive then refused the connection (it was restarting).
            last = dropped[-1] if dropped else blip
            raise last.failure from last.__cause__

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise DestinationBusy("stopping: stowd is shutting down")

    def _attempt(
        self, parts: Sequence[Part], progress: Callable[[], None] | None, may_refresh: bool = False
    ) -> Answer:
        body = Body(parts, progress, self.pacing)
        body.open()
        started = time.monotonic()
        try:
            response, content = self._post(body)
        finally:
            body.close()
        auth = self.http.auth
        if response.status_code == 401 and may_refresh and isinstance(auth, OAuth2):
            raise _TokenRejected(auth, response.request.headers.get("Authorization"))
        answer = answer_of(response, content, self.destination)
        answer.seconds = time.monotonic() - started
        return answer

    def _post(self, body: Body) -> tuple[httpx.Response, bytes]:
        """The archive's answer and its body, read within ``STOW_ANSWER_LIMIT`` and a
        deadline (twice the read timeout) counted from the end of the request body."""
        headers = {"Content-Type": body.content_type, "Content-Length": str(body.length)}
        url = self.destination.stow_url
        seconds = answers.answer_seconds(self.destination.timeouts.read)
        try:
            request = self.http.build_request("POST", url, content=iter(body), headers=headers)
            with answers.within(seconds, lambda: body.sent_at, "the archive"):
                response = _send(self.http, request, body, self._has_cert)
                content = answers.read_body(
                    response,
                    limit=answers.STOW_ANSWER_LIMIT,
                    seconds=seconds,
                    started=body.sent_at or time.monotonic(),
                    who="the archive",
                )
        except REACHING as exc:
            raise failure(exc, self._has_cert) from exc
        except Stopping as exc:  # a wait for the rate cap, ended because stowd stops
            raise DestinationBusy(str(exc)) from exc
        return response, content

    @property
    def _has_cert(self) -> bool:
        return self.destination.access.tls.client_cert is not None


def _send(http: httpx.Client, request: httpx.Request, body: Body, has_cert: bool) -> httpx.Response:
    """Send ``request``; a ``QuickRetry`` carrying ``ConnectionDropped`` when the archive closes
    the connection without a word after the whole body was sent (not a TLS alert about our
    certificate, which TLS 1.3 sends then: ``failure`` holds the destination for it)."""
    try:
        return http.send(request, stream=True)
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        if body.sent_at is None or tls_problem(exc, has_cert=has_cert, connecting=False):
            raise
        dropped = ConnectionDropped(
            f"connection failed: {plain(exc)} (the archive closed the connection without "
            "answering, after the request was sent)"
        )
        raise QuickRetry(dropped) from exc


class _TokenRejected(Exception):
    """The archive answered 401 to an OAuth2 token: fetch a new one and try once more."""

    def __init__(self, auth: OAuth2, authorization: str | None) -> None:
        super().__init__("the archive refused the access token")
        self.auth = auth
        self.authorization = authorization

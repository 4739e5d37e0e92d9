"""Reading an HTTP answer's body: streamed, decoded, capped in size and within a deadline.

Every answer stowd reads (STOW-RS, QIDO-RS lookups of studies and worklists, the OAuth2 token
endpoint) goes through ``read_body``; ``check-config --connect`` reads the start of an error
page with ``read_start``.  An archive or a proxy is not trusted to answer sanely: a small
gzip-encoded answer may inflate to gigabytes, and one trickled a byte at a time never trips
the read timeout (which httpx applies to each read).  So the body is inflated a piece at a
time (httpx inflates a whole network read at once), refused past ``limit``
(``AnswerTooLarge``), and must have arrived by its deadline (``AnswerTooSlow``).  The
callers say what that means for them: ``httperrors.py`` holds the destination for an answer
too large, and retries one too slow later.

The deadline covers the answer's status line and header too, which httpx reads before it
returns a response, again with the read timeout for each read: a header trickled a byte at a
time would hold a worker for as long as it lasts.  So every client stowd builds reads the
network through ``bound_reads``'s backend, which shortens each read's timeout to what is left
of the deadline set by ``within`` for the request this thread is making.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

from stowd.errors import AnswerTooLarge, AnswerTooSlow, UnusableAnswer

MIB = 1024 * 1024
STOW_ANSWER_LIMIT = 16 * MIB  # a STOW answer lists each instance in a few hundred bytes
QIDO_ANSWER_LIMIT = 16 * MIB  # a lookup asks for a few matches with a few attributes each
TOKEN_ANSWER_LIMIT = 1 * MIB  # an access token and its lifetime
DEADLINE_FACTOR = 2.0  # a whole answer must arrive within this many read timeouts
PIECE = 256 * 1024  # decoded bytes made from the network's data at a time
ACCEPT_ENCODING = "gzip, deflate"  # asked for on every request; nothing else is read
ENCODINGS = {"gzip": 47, "x-gzip": 47, "deflate": 47}  # zlib wbits 32+15: gzip or zlib header


def answer_seconds(read_timeout: float) -> float:
    """How long a whole answer may take to arrive, for a request with this read timeout."""
    return DEADLINE_FACTOR * read_timeout


def read_body(
    response: httpx.Response, *, limit: int, seconds: float, started: float, who: str
) -> bytes:
    """The decoded body of ``response`` (a streamed one), which is closed afterwards; it must
    have arrived ``seconds`` after ``started`` (``time.monotonic()``: when the request was
    sent).

    Raises ``AnswerTooLarge``, ``AnswerTooSlow``, ``UnusableAnswer`` (a body that cannot be
    decoded) or httpx's ``TransportError``.  ``who`` names the sender in messages.
    """
    deadline = started + seconds
    data = bytearray()
    try:
        for chunk in _decoded(response, who):
            if len(data) + len(chunk) > limit:  # checked first: the chunk is not copied
                raise AnswerTooLarge(
                    f"{who} sent an answer larger than {_size(limit)} (decoded); stowd stopped "
                    "reading it: check the archive or a proxy in between"
                )
            data += chunk
            if time.monotonic() > deadline:
                raise _too_slow(who, seconds)
    except zlib.error as exc:
        raise UnusableAnswer(f"{who} sent an answer that cannot be decoded ({exc})") from exc
    finally:
        response.close()
    return bytes(data)


def _too_slow(who: str, seconds: float) -> AnswerTooSlow:
    return AnswerTooSlow(
        f"{who} was still sending its answer {seconds:g} s after the request "
        f"(an answer may take {DEADLINE_FACTOR:g} times the read timeout)"
    )


# -- the deadline of the answer's header ------------------------------------------------------
_request = threading.local()  # .deadline: when this thread's answer must have arrived, or None


@contextmanager
def within(seconds: float, sent: Callable[[], float | None], who: str) -> Iterator[None]:
    """Every network read of this thread in the block (the answer's status line and header,
    then its body) must be done ``seconds`` after ``sent()``: when the request was sent
    (``time.monotonic()``; None while it is still being sent, which the write timeout
    bounds).  A read cut short by the deadline raises ``AnswerTooSlow``."""

    def deadline() -> float | None:
        at = sent()
        return None if at is None else at + seconds

    outer = getattr(_request, "deadline", None)
    _request.deadline = deadline
    try:
        yield
    except httpx.ReadTimeout as exc:
        at = deadline()
        if at is not None and time.monotonic() >= at:
            raise _too_slow(who, seconds) from exc
        raise
    finally:
        _request.deadline = outer


def _read_timeout(timeout: float | None) -> float | None:
    """``timeout`` shortened to what is left of this thread's deadline (``ReadTimeout`` when
    nothing is left)."""
    deadline: Callable[[], float | None] | None = getattr(_request, "deadline", None)
    at = None if deadline is None else deadline()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the answer's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _BoundedStream(httpcore.NetworkStream):
    """A connection whose reads end at the deadline of the request being answered."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _read_timeout(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _BoundedStream(self._stream.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _BoundedBackend(httpcore.NetworkBackend):
    """httpcore's network, with every connection made a ``_BoundedStream``."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _BoundedStream(self._backend.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _BoundedStream(self._backend.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def bound_reads(client: httpx.Client) -> None:
    """Make ``client`` read every answer through ``_BoundedBackend`` (its own transport and
    those of its proxies).  httpx offers no public way to give its transport a network
    backend, so its connection pool's is replaced; should a new httpx move it, this fails
    loudly rather than leaving answers without their deadline."""
    for transport in (client._transport, *client._mounts.values()):
        if not isinstance(transport, httpx.HTTPTransport):
            continue  # a test's transport, or no proxy for a scheme
        pool = transport._pool
        if not isinstance(getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
            raise RuntimeError("httpx's connection pool has changed: answers need a deadline")
        if not isinstance(pool._network_backend, _BoundedBackend):
            pool._network_backend = _BoundedBackend(pool._network_backend)


def read_start(response: httpx.Response, limit: int) -> bytes:
    """At most the first ``limit`` decoded bytes of ``response`` (what an error page says);
    what cannot be decoded ends it early."""
    data = b""
    try:
        for chunk in _decoded(response, "the archive"):
            data += chunk[: limit - len(data)]
            if len(data) >= limit:
                break
    except (zlib.error, UnusableAnswer):
        pass
    return data


def _decoded(response: httpx.Response, who: str) -> Iterator[bytes]:
    """The body as it arrives, inflated a ``PIECE`` at a time (httpx's own decoding inflates a
    whole network read at once: 64 KiB of a gzip bomb become 64 MiB, twice over)."""
    if response.is_stream_consumed:  # read and decoded already (httpx.MockTransport)
        yield response.content
        return
    coding = response.headers.get("Content-Encoding", "").strip().lower()
    if coding in ("", "identity"):
        yield from response.iter_raw()
        return
    if coding not in ENCODINGS:
        raise UnusableAnswer(
            f"{who} sent an answer in an encoding stowd did not ask for ({coding})"
        )
    inflater = zlib.decompressobj(ENCODINGS[coding])
    for raw in response.iter_raw():
        data = raw
        while data:
            yield inflater.decompress(data, PIECE)
            data = inflater.unconsumed_tail
    yield inflater.flush()


def _size(limit: int) -> str:
    return f"{limit // MIB} MiB" if limit >= MIB else f"{limit} bytes"

"""Reading an HTTP answer's body: streamed, decoded, capped in size and within a deadline.

Every answer stowd reads (STOW-RS, QIDO-RS lookups of studies and worklists, the OAuth2 token
endpoint) goes through ``read_body``; ``check-config --connect`` reads the start of an error
page with ``read_start``.  An archive or a proxy is not trusted to answer sanely: a small
gzip-encoded answer may inflate to gigabytes, and one trickled a byte at a time never trips
the read timeout (which httpx applies to each read).  So the body is inflated a piece at a
time (httpx inflates a whole network read at once), refused past ``limit``
(``AnswerTooLarge``), and must have arrived by its deadline (``AnswerTooSlow``).  The
callers say what that means for them: ``stow.py`` holds the destination for an answer too
large, and retries one too slow later.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator

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
                raise AnswerTooSlow(
                    f"{who} was still sending its answer {seconds:g} s after the request "
                    f"(an answer may take {DEADLINE_FACTOR:g} times the read timeout)"
                )
    except zlib.error as exc:
        raise UnusableAnswer(f"{who} sent an answer that cannot be decoded ({exc})") from exc
    finally:
        response.close()
    return bytes(data)


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

"""answers.py against a local server answering gzip bombs (hostileserver.py)."""

from __future__ import annotations

import time

import httpx
import pytest
from hostileserver import HostileArchive

from stowd.dicomweb import answers
from stowd.errors import AnswerTooLarge, AnswerTooSlow


def test_a_gzip_bomb_is_refused_past_the_limit() -> None:
    with HostileArchive() as archive, httpx.Client() as client:
        response = client.send(client.build_request("GET", archive.url), stream=True)
        with pytest.raises(AnswerTooLarge, match="larger than 1 MiB"):
            answers.read_body(
                response, limit=answers.MIB, seconds=60, started=time.monotonic(), who="x"
            )
        assert response.is_closed


def test_read_start_reads_only_the_start_of_a_bomb() -> None:
    with HostileArchive() as archive, httpx.Client() as client:
        response = client.send(client.build_request("GET", archive.url), stream=True)
        assert answers.read_start(response, 2048) == bytes(2048)


# -- the deadline covers the answer's header --------------------------------------------------
def _slow_header_query(client: httpx.Client, archive: HostileArchive, seconds: float) -> float:
    """Query ``archive`` (whose header trickles a byte a second for a minute) within
    ``seconds``; how long it took to give up."""
    started = time.monotonic()
    with (
        pytest.raises(AnswerTooSlow, match=f"still sending its answer {seconds:g} s after"),
        answers.within(seconds, lambda: started, "the archive"),
    ):
        client.send(client.build_request("GET", f"{archive.base}/studies"), stream=True)
    return time.monotonic() - started


def test_a_trickled_header_ends_at_the_deadline() -> None:
    """A read timeout of 2 s is never tripped by a byte a second; the deadline of 3 s is.
    Was: httpx read the header for as long as it kept coming (60 s here)."""
    with HostileArchive() as archive, httpx.Client(timeout=2.0) as client:
        archive.qido = "slow-headers"
        answers.bound_reads(client)
        took = _slow_header_query(client, archive, 3.0)
    assert took < 3.0 + 2.0 + 5.0  # the deadline, one read timeout, a busy machine's slack


def test_a_read_before_the_request_is_sent_keeps_its_read_timeout() -> None:
    """No deadline while the request is still being sent (``sent()`` None): the read timeout
    alone applies, so a slow header is an ordinary ``ReadTimeout``, not a deadline."""
    with HostileArchive() as archive, httpx.Client(timeout=1.0) as client:
        archive.qido = "slow-headers"
        answers.bound_reads(client)
        with answers.within(0.5, lambda: None, "the archive"), pytest.raises(httpx.ReadTimeout):
            client.send(client.build_request("GET", f"{archive.base}/studies", timeout=0.5))


def test_every_transport_of_a_client_reads_within_the_deadline() -> None:
    """The proxy's transport too (a trickle through a proxy is the same trickle), once only
    however often a client is bound."""
    with httpx.Client(proxy="http://127.0.0.1:9") as client:
        answers.bound_reads(client)
        answers.bound_reads(client)
        transports = [client._transport, *client._mounts.values()]
        pools = [t._pool for t in transports if isinstance(t, httpx.HTTPTransport)]
        assert len(pools) == 2
        for pool in pools:
            backend = pool._network_backend
            assert isinstance(backend, answers._BoundedBackend)
            assert not isinstance(backend._backend, answers._BoundedBackend)

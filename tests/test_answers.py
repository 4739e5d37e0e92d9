"""answers.py against a local server answering gzip bombs (hostileserver.py)."""

from __future__ import annotations

import time

import httpx
import pytest
from hostileserver import HostileArchive

from stowd import answers
from stowd.errors import AnswerTooLarge


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

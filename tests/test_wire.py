"""The requests in flight to a destination: a dropped connection counts against a file only
when its request was alone on the wire from start to end."""

from __future__ import annotations

from stowd.pipeline.wire import NOT_ALONE, Wire, wire_of


def test_a_request_alone_from_start_to_end_is_alone() -> None:
    wire = Wire()
    token = wire.begin()
    assert token is not None and wire.alone(token)
    wire.end()
    assert wire.idle()


def test_a_request_that_another_joined_is_not_alone() -> None:
    wire = Wire()
    first = wire.begin()
    second = wire.begin()  # began while the first was in flight
    assert first is not None and second == NOT_ALONE
    assert not wire.alone(first) and not wire.alone(second)
    wire.end()
    wire.end()
    third = wire.begin()
    assert third is not None and wire.alone(third)  # the others are over


def test_a_probe_begins_only_on_an_idle_wire() -> None:
    wire = Wire()
    assert wire.begin() is not None
    assert wire.begin(only=True) is None  # not counted: the wire stays with one request
    wire.end()
    assert wire.idle() and wire.begin(only=True) is not None


class Client:
    """Stands for a destination's ``StowClient``: any object a weak reference can follow."""


def test_the_workers_of_one_client_share_its_wire() -> None:
    one, other = Client(), Client()
    assert wire_of(one) is wire_of(one)
    assert wire_of(one) is not wire_of(other)

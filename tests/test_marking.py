"""tests/support/marking.py: which tests conftest marks ``integration``."""

from __future__ import annotations

import subprocess
import sys
from http.server import BaseHTTPRequestHandler

import harness
import pytest
from harness import Layout, Stowd, wait_for
from localserver import LocalServer
from marking import starts_something
from orthanc import Orthanc


def _starts_a_daemon(layout: Layout) -> None:
    with Stowd(layout) as daemon:
        wait_for(daemon.alive, 10, "the daemon")


def _through_a_helper(layout: Layout) -> None:
    _starts_a_daemon(layout)


def _through_a_module(layout: Layout) -> None:
    harness.run_until(layout, lambda: True, "nothing", 1)


def _in_a_lambda() -> object:
    return lambda folder: Orthanc(folder / "orthanc")


class _Rig:
    def serve(self) -> LocalServer:
        return LocalServer(BaseHTTPRequestHandler)


def _through_a_class() -> object:
    return _Rig()


def _a_child_process() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def _plain(layout: Layout) -> int:
    return len(layout.files(layout.drop))


@pytest.mark.parametrize(
    "func",
    [
        _starts_a_daemon,
        _through_a_helper,
        _through_a_module,
        _in_a_lambda,
        _through_a_class,
        _a_child_process,
    ],
)
def test_what_starts_a_daemon_a_server_or_a_child_is_found(func: object) -> None:
    assert starts_something(func)


def test_a_plain_function_is_not_marked() -> None:
    assert not starts_something(_plain)


def test_conftest_leaves_a_unit_test_unmarked(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("integration") is None

"""A destination that answers, but not as an archive, with the real daemon (issue 22): a 200
whose body is not a STOW-RS answer."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from localserver import LocalServer

# Answers Orthanc cannot give: what stands in front of an archive when the url is wrong.
EMPTY = ("text/plain", b"")  # a reverse proxy answering 200 with no body (issue 22's report)
# a web server's default page where the DICOMweb base was expected (Apache's "It works!")
TEXT = ("text/plain", b"It works!\n\x1b[31mdefault site\x1b[0m\n")
# an SSO gateway's sign-in page served with 200 in front of the archive (oauth2-proxy and
# Keycloak answer a POST without a session this way)
LOGIN = (
    "text/html; charset=utf-8",
    b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body><form method='post'>"
    b"<input name='username'><input name='password' type='password'></form></body></html>",
)


class OddArchive(LocalServer):
    """Answers every POST with ``status`` and ``answer`` (content type, body); records when."""

    def __init__(self, status: int, answer: tuple[str, bytes]) -> None:
        owner = self
        self.posts: list[float] = []
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with owner._lock:
                    owner.posts.append(time.monotonic())
                self.send_response(status)
                self.send_header("Content-Type", answer[0])
                self.send_header("Content-Length", str(len(answer[1])))
                self.end_headers()
                self.wfile.write(answer[1])

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)

    def asked_over(self, seconds: float) -> bool:
        """Asked again more than ``seconds`` after the first request."""
        with self._lock:
            return len(self.posts) > 1 and self.posts[-1] - self.posts[0] > seconds


def status(layout: Layout) -> dict[str, Any]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


MAX_AGE = 2.0  # seconds: on main the files went to failed/ after this


@pytest.mark.parametrize(
    ("answer", "looks"),
    [(EMPTY, "an empty body"), (TEXT, "text"), (LOGIN, "an HTML page")],
    ids=["empty", "text", "login-page"],
)
def test_a_200_that_is_not_a_stow_answer_holds_the_destination(
    tmp_path: Path, answer: tuple[str, bytes], looks: str
) -> None:
    with OddArchive(200, answer) as archive:
        retry = {"initial": "200ms", "maximum": "1s", "hold_probe": "200ms", "max_age": "2s"}
        layout = make_layout(tmp_path / "run", archive.url + "/dicom-web", retry=retry)
        make_instance(layout.drop / "a.dcm")
        make_instance(layout.drop / "b.dcm")
        with Stowd(layout) as daemon:
            wait_for(
                lambda: archive.asked_over(3 * MAX_AGE) or bool(layout.files(layout.failed)),
                60,
                "the destination asked again after three times retry.max_age (or a failure)",
                lambda: daemon.log,
            )
            health = status(layout)["destinations"]["pacs"]
            assert health["state"] == "held", health
            assert f"HTTP 200 with {looks}, not a STOW-RS answer" in health["reason"]
            assert layout.files(layout.failed) == set()
            assert layout.files(layout.drop) == {"a.dcm", "b.dcm"}
            assert daemon.terminate() == 0
    assert "\x1b" not in daemon.log  # the body's control characters are escaped


class SilentArchive(LocalServer):
    """Reads each POST and then says nothing until ``answer`` is set (then 503): an archive
    that stopped answering (issue 22: a hung archive behind a load balancer)."""

    def __init__(self) -> None:
        owner = self
        self.answer = threading.Event()
        self.asked = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                owner.asked.set()
                owner.answer.wait(120)
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)

    def stop(self) -> None:
        self.answer.set()
        super().stop()


def not_answering(layout: Layout) -> tuple[list[str], dict[str, Any]]:
    data = status(layout)
    said = [w for w in data["warnings"] if "not answering for" in w]
    return said, data["destinations"]["pacs"]


def test_a_destination_that_stopped_answering_shows_in_status_long_before_the_timeout(
    tmp_path: Path,
) -> None:
    with SilentArchive() as archive:
        # read timeout 2 min: "not answering" after a tenth of it, the timeout far after
        dest = {"url": archive.url + "/dicom-web", "workers": 1, "timeouts": {"read": "2m"}}
        layout = make_layout(tmp_path / "run", "", destinations={"pacs": dest})
        make_instance(layout.drop / "a.dcm")
        with Stowd(layout) as daemon:
            wait_for(archive.asked.is_set, 60, "the request", lambda: daemon.log)
            asked = time.monotonic()
            said = not_answering(layout)[0]
            if time.monotonic() - asked < 12:  # a tenth of the read timeout
                assert said == []  # not at once
            wait_for(
                lambda: bool(not_answering(layout)[0]),
                90,
                "status to say that the destination does not answer",
                lambda: daemon.log,
            )
            said, health = not_answering(layout)
            assert said[0].startswith("destination pacs: not answering for "), said
            assert "(a request in flight since " in said[0]
            assert 12 <= health["not_answering_seconds"] < 120, health
            assert "  answer:     none for " in run_cli("status", "-c", str(layout.config)).stdout
            archive.answer.set()  # a 503: the request is over, the destination busy
            wait_for(
                lambda: not not_answering(layout)[0],
                60,
                "the warning gone once the request ended",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0

"""The status page's listener against hostile requests (issue 21's review): what a client
sends before or instead of a login, a query built to break the parser, a web page that
reaches a loopback listener through a DNS name it rebinds.  A real daemon, real sockets."""

from __future__ import annotations

import base64
import socket
from html.parser import HTMLParser
from pathlib import Path

from harness import Layout, make_layout, serving_page, wait_for
from test_statuspage import UNREACHABLE, _config, _settle, get, raw

from stowd.pipeline.queue import SqliteQueue
from stowd.printable import escape
from stowd.service import page, web

UNEXPECTED = "status page: answering"  # the log line of an answer that failed (a 500)


def _status(got: bytes) -> int:
    return int(got.split(b"\r\n", 1)[0].split()[1])


def _login_layout(tmp_path: Path) -> tuple[Layout, dict[str, object]]:
    secret = tmp_path / "http-password"
    secret.write_text("pa:ss\n")  # a ':' in a password is the password's (RFC 7617)
    layout = make_layout(tmp_path, UNREACHABLE)
    return layout, {"user": "admin", "password": {"file": str(secret)}}


def test_an_authorization_header_that_is_not_ascii_is_a_wrong_login(tmp_path: Path) -> None:
    """An ``Authorization`` header with bytes that are not ASCII (sent before any login was
    checked) is a wrong login (401), not an unexpected error (500) with a traceback in the
    log for anyone who can reach the listener."""
    layout, auth = _login_layout(tmp_path)
    with serving_page(layout, auth=auth) as (daemon, base):
        for value in (b"Basic \xe9t\xe9", b"Basic YWRtaW46\xff", b"Bearer \xe9"):
            got = raw(base, b"GET / HTTP/1.0\r\nAuthorization: " + value + b"\r\n\r\n")
            assert _status(got) == 401, (value, got[:200])
        right = base64.b64encode(b"admin:pa:ss")
        got = raw(base, b"GET / HTTP/1.0\r\nAuthorization: Basic " + right + b"\r\n\r\n")
        assert _status(got) == 200
    assert UNEXPECTED not in daemon.log and "Traceback" not in daemon.log


def test_a_query_of_many_fields_is_a_bad_request(tmp_path: Path) -> None:
    """A query of more fields than the parser takes is the client's mistake (400, said in
    the answer), not stowd's (500 and a traceback in its log)."""
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout) as (daemon, base):
        many = "&".join(["reason=x"] * 50)
        for path in ("", "api/status"):
            answer = get(f"{base}{path}?{many}")
            assert answer.status_code == 400, (path, answer.text)
            assert "fields" in answer.text
        assert get(base + "?reason=x&reason=y").status_code == 200  # a few are fine
    assert UNEXPECTED not in daemon.log and "Traceback" not in daemon.log


def test_a_loopback_listener_answers_only_requests_for_a_loopback_name(tmp_path: Path) -> None:
    """DNS rebinding: a web page the administrator opens elsewhere points its own name at
    127.0.0.1 and reads the loopback page (no login) as same-origin, file names and all.
    Its requests carry that name in ``Host``; a loopback listener refuses them (421) and
    answers the names a browser on this machine, an SSH tunnel or Prometheus send."""
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout) as (daemon, base):
        port = base.rstrip("/").rsplit(":", 1)[1]
        for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}"):
            for path in ("/", "/api/status", "/metrics", "/static/stowd.js"):
                request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                got = raw(base, request.encode())
                assert _status(got) == 421, (host, path, got[:300])
                assert b"ct1" not in got and b"queue" not in got
        wait_for(lambda: "for the host name attacker.example" in daemon.log, 30, "the log")
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
            request = f"GET /api/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            assert _status(raw(base, request.encode())) == 200, host
        assert _status(raw(base, b"GET / HTTP/1.0\r\n\r\n")) == 200  # no Host: no browser


def test_a_request_sent_a_byte_at_a_time_is_cut_off(tmp_path: Path) -> None:
    """Slowloris: a client that sends its request line and headers a byte at a time, each
    well within ``REQUEST_TIMEOUT`` of the last, held its slot for as long as it liked (16
    such clients and nobody could read the page).  The whole request must arrive within
    ``REQUEST_TIMEOUT``; the test drips 10 bytes a second and waits up to four times that."""
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout) as (daemon, base):
        host, port = base.removeprefix("http://").rstrip("/").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")

            def cut_off() -> bool:
                try:
                    conn.sendall(b"a")  # one byte of a header line that never ends
                except OSError:  # reset or broken pipe: the listener closed it
                    return True
                return False

            wait_for(cut_off, 4 * web.REQUEST_TIMEOUT, "the slow request cut off")
        assert get(base).status_code == 200
    assert "Traceback" not in daemon.log


def test_a_queue_gone_from_under_the_daemon_is_said_not_an_unexpected_error(
    tmp_path: Path,
) -> None:
    """The queue's files removed while the daemon runs (a cleanup gone wrong): the page and
    ``/api/status`` answer 503 with ``stowd status``'s words ("no queue at ..."), as for a
    queue that cannot be read, not a 500 with a traceback in the log at each refresh."""
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout) as (daemon, base):
        assert get(base).status_code == 200
        for path in (layout.root / "state").glob("queue.db*"):
            path.unlink()
        page, api = get(base), get(base + "api/status")
        assert page.status_code == api.status_code == 503, (page.text, api.text)
        assert "no queue at" in page.text and "no queue at" in api.json()["error"]
    assert UNEXPECTED not in daemon.log and "Traceback" not in daemon.log


class _Options(HTMLParser):
    """The values of the reason filter's options, as a browser submits them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.values: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "option" and found.get("value"):
            self.values.append(str(found["value"]))


def test_the_reason_filter_finds_a_reason_with_a_line_break_or_a_backslash(
    tmp_path: Path,
) -> None:
    """An option's value is the reason as the page shows it (control characters and ``\\``
    escaped, so a line break cannot be altered by the form); choosing it must show that
    reason's files, not none."""
    config = _config(tmp_path)
    reasons = ["the archive said: first line\nsecond line", r"cannot read C:\share\a.dcm"]
    queue = SqliteQueue(config.queue).open()
    try:
        for n, reason in enumerate(reasons):
            _settle(queue, [f"{n}.dcm"], "failed", {"reason": reason, "http_status": 409})
    finally:
        queue.close()
    options = _Options()
    options.feed(page.render(page.document(config, page.Query())))
    assert len(options.values) == len(reasons)
    for value in options.values:
        doc = page.document(config, page.Query(reason=value))
        [shown] = doc["failures"]["shown"]
        assert escape(shown["reason"]) == value
        assert f'<option value="{page.text(shown["reason"])}" selected>' in page.render(doc)


def test_the_trouble_page_is_one_document() -> None:
    """The page served when the queue cannot be read opened ``<main>`` twice and never
    closed the document; the message is text, in one ``<main>``, and the page ends."""
    html = page.render_error("cannot read the queue </main><script>x</script>")
    assert html.count("<main>") == html.count("</main>") == 1
    assert html.rstrip().endswith("</body></html>") and html.count("<script") == 1


def test_a_bearer_token_that_is_not_ascii_is_accepted(tmp_path: Path) -> None:
    """A token is a secret like any other, UTF-8 in its file; a client sends it as those
    bytes.  The header arrives decoded as Latin-1 (as HTTP headers are), so the token was
    compared as mis-decoded text and such a token could never log in."""
    token = "jeton-sécurité-€"
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout, env={"PAGE_TOKEN": token}, auth={"token": {"env": "PAGE_TOKEN"}}) as (
        _daemon,
        base,
    ):
        header = b"Authorization: Bearer " + token.encode()
        got = raw(base, b"GET /api/status HTTP/1.0\r\n" + header + b"\r\n\r\n")
        assert _status(got) == 200, got[:200]
        wrong = b"Authorization: Bearer " + token.encode("latin-1", "replace")
        assert _status(raw(base, b"GET / HTTP/1.0\r\n" + wrong + b"\r\n\r\n")) == 401

"""The status page over HTTP (issue 21): config checks, the login, escaping, read-only, bounds,
and its data equal to ``stowd status --json``; a real daemon, a real Orthanc where files are
sent, real sockets.  The page in a real browser is tested in the browser tests."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dicomgen import make_instance, write_empty, write_garbage
from harness import PAGE_SERVED, Clock, Layout, Stowd, make_layout, run_cli, serving_page, wait_for
from orthanc import Orthanc, free_port
from stowproxy import StowProxy
from test_config import MINIMAL, find, load_text, problems_of
from test_migrate import ctrl_c, migrating

from stowd.config.load import load_config
from stowd.pipeline.queue import HISTORY_SPAN, Classification, NewFile, Queue, SqliteQueue
from stowd.pipeline.queue import sqlite as queue_module
from stowd.printable import escape
from stowd.service import page, web

UNREACHABLE = "http://127.0.0.1:1/dicom-web"  # nothing listens: files wait, nothing is sent


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, trust_env=False, timeout=30, **kwargs)


def status_json(layout: Layout) -> dict[str, Any]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def raw(base: str, request: bytes) -> bytes:
    """Send ``request`` as it is (no client normalises its path) and read the answer."""
    host, port = base.removeprefix("http://").rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.sendall(request)
        chunks = []
        while chunk := conn.sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        conn.close()


class Cells(HTMLParser):
    """The text of each ``data-field`` cell of the page, by row (its data-* key)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, dict[str, str]] = {}
        self.failures: list[dict[str, str]] = []
        self._row: dict[str, str] | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr":
            self._start_row(found)
        elif tag == "td" and self._row is not None:
            self._field = found.get("data-field")
            if self._field is not None:
                self._row[self._field] = ""

    def _start_row(self, found: dict[str, str | None]) -> None:
        self._row = None
        for key in ("data-source", "data-destination", "data-run"):
            name = found.get(key)
            if name is not None:
                self._row = self.rows.setdefault(f"{key[5:]}:{name}", {})
        if found.get("class") == "failure":
            self._row = {}
            self.failures.append(self._row)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._field = None

    def handle_data(self, data: str) -> None:
        if self._field is not None and self._row is not None:
            self._row[self._field] += data


def cells(html: str) -> Cells:
    parser = Cells()
    parser.feed(html)
    return parser


# --------------------------------------------------------------------------- config


HTTP_AT = MINIMAL + "http:\n  listen: '{listen}'\n"


@pytest.mark.parametrize("listen", ["0.0.0.0:9480", "[::]:9480", "gateway.example.org:9480"])
def test_a_listener_others_can_reach_needs_a_login(tmp_path: Path, listen: str) -> None:
    problem = find(problems_of(tmp_path, HTTP_AT.format(listen=listen)), "http.listen")
    assert problem.line == MINIMAL.count("\n") + 2
    assert "no login is set" in problem.message and "http.insecure: true" in problem.message


@pytest.mark.parametrize("listen", ["127.0.0.1:9480", "[::1]:9480", "localhost:9480"])
def test_a_loopback_listener_needs_no_login(tmp_path: Path, listen: str) -> None:
    http = load_text(tmp_path, HTTP_AT.format(listen=listen)).http
    assert http is not None and http.auth is None and http.port == 9480


def test_a_login_or_insecure_allows_any_address(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with_login = HTTP_AT.format(listen="0.0.0.0:9480") + "  auth: {token: {env: TOKEN}}\n"
    http = load_text(tmp_path / "a", with_login).http
    assert http is not None and http.auth is not None and http.auth.token is not None
    assert http.auth.token.where == "environment variable TOKEN"
    insecure = HTTP_AT.format(listen="0.0.0.0:9480") + "  insecure: true\n"
    http = load_text(tmp_path / "b", insecure).http
    assert http is not None and http.insecure and http.auth is None


def test_a_basic_login_needs_user_and_password(tmp_path: Path) -> None:
    text = HTTP_AT.format(listen="127.0.0.1:9480") + "  auth:\n    user: admin\n"
    problem = find(problems_of(tmp_path, text), "http.auth.password")
    assert problem.line == MINIMAL.count("\n") + 4
    assert "user and password" in problem.message


def test_metrics_listen_at_another_address_is_refused(tmp_path: Path) -> None:
    text = HTTP_AT.format(listen="127.0.0.1:9480") + "metrics:\n  listen: 127.0.0.1:9464\n"
    problem = find(problems_of(tmp_path, text), "metrics.listen")
    assert problem.line == MINIMAL.count("\n") + 4
    assert "differs from http.listen 127.0.0.1:9480" in problem.message


def test_metrics_listen_at_the_same_address_is_one_listener(tmp_path: Path) -> None:
    text = HTTP_AT.format(listen="127.0.0.1:9480") + "metrics:\n  listen: 127.0.0.1:9480\n"
    config = load_text(tmp_path, text)
    assert config.metrics is None and config.http is not None
    (tmp_path / "old").mkdir()
    alone = load_text(tmp_path / "old", MINIMAL + "metrics:\n  listen: 0.0.0.0:9464\n")
    assert alone.http is None and alone.metrics is not None  # as before: no login asked


def test_an_inline_login_secret_is_warned_about_when_others_may_read(tmp_path: Path) -> None:
    text = HTTP_AT.format(listen="127.0.0.1:9480") + "  auth: {token: s3cret}\n"
    config = load_text(tmp_path, text)
    config.path.chmod(0o644)
    assert any("http.auth" in w and "inline" in w for w in config.warnings)
    assert not any("s3cret" in w for w in config.warnings)


# --------------------------------------------------------------------------- the daemon


HOSTILE = {
    "script": Path("<script>alert(1)<") / "script>.dcm",  # the path: <script>alert(1)</script>
    "quotes": Path("\"quoted' & <b>bold</b>.dcm".replace("/", "")),
    "newline": Path("line\nbreak.dcm"),
    "control": Path("esc\x1b[31mred\x07.dcm"),
    "not utf-8": Path(os.fsdecode(b"bad\xffname.dcm")),
}


def test_the_page_and_api_agree_with_status_json_and_escape_hostile_names(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout = make_layout(tmp_path, orthanc.dicomweb_url)
    with serving_page(layout) as (daemon, base):
        uids = [make_instance(layout.drop / f"ok{n}.dcm", rows=8, columns=8) for n in range(3)]
        for rel in HOSTILE.values():
            write_garbage(layout.drop / rel)
        write_empty(layout.drop / "empty.dcm")
        wait_for(
            lambda: (
                len(layout.files(layout.sent)) == 3
                and len(layout.files(layout.failed)) == len(HOSTILE) + 1
            ),
            120,
            "3 files sent and the others failed",
            lambda: daemon.log,
        )
        wait_for(lambda: not status_json(layout)["counts"].get("settling"), 60, "all settled")
        api = get(base + "api/status")
        expected = status_json(layout)
        html = get(base).text
        assert api.status_code == 200 and api.headers["content-type"] == "application/json"
        doc = api.json()
        _same_counts(doc, expected)
        _cells_match(cells(html), doc)
        _history_counts(doc, layout, len(uids))
        _escaped(html, api.text, doc, layout)
        _filtered(base, doc)


def _same_counts(doc: dict[str, Any], expected: dict[str, Any]) -> None:
    assert doc["counts"] == expected["counts"] == {"sent": 3, "failed": len(HOSTILE) + 1}
    for key in ("by_source", "by_destination"):
        for name, figures in expected[key].items():
            assert doc[key][name]["counts"] == figures["counts"], (key, name)
    ct1 = doc["by_source"]["ct1"]
    assert (ct1["sent_today"], ct1["failed_today"]) == (3, len(HOSTILE) + 1)
    assert expected["by_source"]["ct1"]["sent_today"] == 3
    assert doc["destinations"]["pacs"]["state"] == expected["destinations"]["pacs"]["state"]
    assert doc["last_errors"] == expected["last_errors"]  # names as status --json has them


def _cells_match(found: Cells, doc: dict[str, Any]) -> None:
    source = found.rows["source:ct1"]
    counts = doc["by_source"]["ct1"]["counts"]
    assert source["waiting"] == str(counts["pending"] + counts["waiting"]) == "0"
    assert source["in_flight"] == str(counts["claimed"] + counts["settling"]) == "0"
    assert (source["sent_today"], source["failed_today"]) == ("3", str(len(HOSTILE) + 1))
    assert found.rows["destination:pacs"]["state"] == "idle"
    assert found.rows["destination:pacs"]["last_answer"].startswith("stored files, the last at")


def _history_counts(doc: dict[str, Any], layout: Layout, sent: int) -> None:
    minutes = doc["history"]["destinations"]["pacs"]
    assert sum(m[1] for m in minutes) == sent
    assert sum(m[2] for m in minutes) == sum(p.stat().st_size for p in layout.sent.rglob("*.dcm"))
    assert sum(m[3] for m in minutes) == len(HOSTILE) + 1


def _escaped(html: str, body: str, doc: dict[str, Any], layout: Layout) -> None:
    """Each hostile name is in the page as text (escaped as ``stowd status`` escapes it),
    never as markup; the JSON holds the names exactly and no ``<`` at all."""
    assert html.count("<script") == 1  # the page's own script, nothing a name brought
    assert "<b>" not in html and "\x1b" not in html and "\x07" not in html
    shown = {row["file"] for row in cells(html).failures}
    for rel in HOSTILE.values():
        path = str(layout.drop / rel)
        assert escape(path) in shown, path
        assert path in {e["file"] for e in doc["failures"]["shown"]}
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.dcm" in html
    assert "line\\nbreak.dcm" in html and "line\nbreak" not in html
    assert "bad\\xffname.dcm" in html
    assert "<" not in body and "\\u003cscript\\u003e" in body


def _filtered(base: str, doc: dict[str, Any]) -> None:
    """``?reason=`` keeps the failures with that reason only (without any script)."""
    reasons = doc["failures"]["reasons"]
    assert len(reasons) == 2  # not DICOM (the four), and empty
    for reason in reasons:
        found = get(base, params={"reason": reason})
        rows = cells(found.text).failures
        assert rows and {r["reason"] for r in rows} == {escape(reason)}
        api = get(base + "api/status", params={"reason": reason}).json()["failures"]
        assert {e["reason"] for e in api["shown"]} == {reason}
    assert cells(get(base, params={"reason": "no such reason"}).text).failures == []


def test_the_login_basic_and_bearer_and_no_secret_in_the_log(tmp_path: Path) -> None:
    password, token, wrong = "pa55-Word!", "t0ken-xyz", "guess-123"
    secret = tmp_path / "http-password"
    secret.write_text(password + "\n")
    auth = {"user": "admin", "password": {"file": str(secret)}, "token": {"env": "PAGE_TOKEN"}}
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout, env={"PAGE_TOKEN": token}, auth=auth) as (daemon, base):
        refused = get(base)
        assert refused.status_code == 401
        challenges = refused.headers.get_list("www-authenticate")
        assert challenges == ['Basic realm="stowd", charset="UTF-8"', 'Bearer realm="stowd"']
        assert get(base, auth=("admin", wrong)).status_code == 401
        assert get(base, auth=("root", password)).status_code == 401
        bearer_wrong = {"Authorization": f"Bearer {wrong}"}
        assert get(base + "api/status", headers=bearer_wrong).status_code == 401
        for path in ("", "api/status", "metrics", "static/stowd.js", "static/stowd.css"):
            assert get(base + path).status_code == 401, path
            assert get(base + path, auth=("admin", password)).status_code == 200, path
            bearer = {"Authorization": f"Bearer {token}"}
            assert get(base + path, headers=bearer).status_code == 200, path
        wait_for(lambda: "wrong login (401)" in daemon.log, 30, "the refusal logged")
        secret.unlink()  # a secret that cannot be read: no one is let in, and it is said
        assert get(base, auth=("admin", password)).status_code == 503
        wait_for(lambda: "the login cannot be checked" in daemon.log, 30, "the secret's problem")
        secret.write_text(password + "\n")  # read again at the next request: no reload
        assert get(base, auth=("admin", password)).status_code == 200
    for text in (password, token, wrong):
        assert text not in daemon.log


def test_a_reload_serves_the_page_again(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout) as (daemon, base):
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded " in daemon.log, 60, "the reload", lambda: daemon.log)
        wait_for(lambda: daemon.log.count(PAGE_SERVED) == 2, 60, "the page served again")
        assert get(base).status_code == 200


def test_a_listener_that_cannot_be_bound_stops_the_daemon_with_the_reason(
    tmp_path: Path,
) -> None:
    layout = make_layout(tmp_path, UNREACHABLE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        doc = yaml.safe_load(layout.config.read_text())
        doc["http"] = {"listen": f"127.0.0.1:{port}"}
        layout.config.write_text(yaml.safe_dump(doc))
        with Stowd(layout) as daemon:
            assert daemon.proc is not None
            assert daemon.proc.wait(60) != 0
    assert f"cannot serve the status page on 127.0.0.1:{port}: Address already in use" in daemon.log


def test_only_get_and_head_and_only_its_own_paths(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, UNREACHABLE)
    config_text = layout.config.read_text()
    with serving_page(layout) as (_daemon, base):
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            answer = httpx.request(method, base, trust_env=False, timeout=30)
            assert answer.status_code == 405, method
            assert answer.headers["allow"] == "GET, HEAD"
        head = httpx.head(base + "static/stowd.js", trust_env=False, timeout=30)
        js = get(base + "static/stowd.js")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(js.content)) != "0"
        for path in (
            "/static/../stowd.yaml",
            "/static/%2e%2e/stowd.yaml",
            "/static/..%2fstowd.yaml",
            "/static//etc/passwd",
            "/../../etc/passwd",
            "/static/stowd.js/../../stowd.yaml",
            "/stowd.yaml",
            "/static/",
            "/static/stowd.js%00.yaml",
        ):
            got = raw(base, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            head_line = got.split(b"\r\n", 1)[0]
            assert b" 404 " in head_line, (path, head_line)
            assert b"queue:" not in got and config_text.encode() not in got
        assert get(base, params={"reason": "x" * 5000}).status_code == 414
        too_long = raw(base, b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n")
        assert too_long.split(b"\r\n", 1)[0].split()[1] == b"414"


def test_requests_at_once_are_bounded(tmp_path: Path) -> None:
    """Connections beyond ``MAX_CONNECTIONS`` are closed at once, never queued behind
    clients that send nothing; once those go, the page answers again."""
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout) as (_daemon, base):
        host, port = base.removeprefix("http://").rstrip("/").split(":")
        idle = [
            socket.create_connection((host, int(port)), timeout=60)
            for _ in range(web.MAX_CONNECTIONS)
        ]
        try:
            assert _refused(base)
        finally:
            for conn in idle:
                conn.close()
        wait_for(lambda: _answers(base), 60, "the page answering again")


def _refused(base: str) -> bool:
    """Closed without an answer (a reset, when the request was still unread)."""
    try:
        return raw(base, b"GET / HTTP/1.0\r\n\r\n") == b""
    except ConnectionResetError:
        return True


def _answers(base: str) -> bool:
    try:
        return get(base).status_code == 200
    except httpx.TransportError:  # closed: the idle connections' threads are still ending
        return False


def test_every_answer_has_the_security_headers(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout) as (_daemon, base):
        for path in ("", "api/status", "metrics", "static/stowd.css", "nothing-here"):
            headers = get(base + path).headers
            policy = headers["content-security-policy"]
            assert "script-src 'self'" in policy and "default-src 'none'" in policy, path
            assert "unsafe-inline" not in policy
            assert headers["x-content-type-options"] == "nosniff", path
            assert headers["referrer-policy"] == "no-referrer", path
        html = get(base).text
        assert re.findall(r"<script[^>]*>", html) == ['<script src="static/stowd.js" defer>']
        assert "<style" not in html and " style=" not in html
        assert not re.search(r"<[^>]*\son\w+\s*=", html, re.I)  # no inline event handler


def test_metrics_are_served_on_the_pages_listener(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, UNREACHABLE)
    with serving_page(layout) as (_daemon, base):
        text = get(base + "metrics").text
    assert 'stowd_destination_held{destination="pacs"}' in text and "stowd_up 1.0" in text


# --------------------------------------------------------------------------- bounds


def _config(tmp_path: Path) -> Any:
    layout = make_layout(tmp_path, UNREACHABLE)
    doc = yaml.safe_load(layout.config.read_text())
    doc["http"] = {"listen": "127.0.0.1:9480"}
    layout.config.write_text(yaml.safe_dump(doc))
    return load_config(layout.config)


def _settle(
    queue: Queue, names: list[str], state: str, error: dict[str, Any] | None = None
) -> None:
    files = [NewFile("ct1", "pacs", f"/drop/{n}", n, 100, 1) for n in names]
    assert queue.enqueue(files) == len(files)
    jobs = [j for j in queue.jobs("pending") if j.rel in names]
    queue.set_classified([Classification(j, "dicom", "1.2", f"1.2.{j.id}", "1.2") for j in jobs])
    if error is None and state == "failed":
        error = {"reason": f"refused {state}"}
    queue.begin_settle([(j, state, f"/done/{j.rel}", error) for j in jobs])
    queue.finish_many([(j.id, state) for j in jobs])


def test_the_failures_shown_are_bounded(tmp_path: Path) -> None:
    config = _config(tmp_path)
    queue = SqliteQueue(config.queue).open()
    try:
        _settle(queue, [f"f{n}.dcm" for n in range(page.FAILURES_SHOWN + 50)], "failed")
    finally:
        queue.close()
    doc = page.document(config, page.Query())
    failures = doc["failures"]
    assert len(failures["shown"]) == page.FAILURES_SHOWN
    assert failures["matching"] == page.FAILURES_SHOWN + 50
    assert len(cells(page.render(doc)).failures) == page.FAILURES_SHOWN


def test_failed_files_show_however_many_waiting_files_carry_a_newer_error(
    tmp_path: Path,
) -> None:
    """A held destination leaves many files waiting for a retry, each with its error: the
    failed files are still the ones listed."""
    config = _config(tmp_path)
    clock = Clock(1_800_000_000.0)
    queue = SqliteQueue(config.queue, clock=clock).open()
    try:
        _settle(queue, ["bad.dcm"], "failed")
        clock.now += 60
        names = [f"w{n}.dcm" for n in range(page.FAILURES_READ + 10)]
        queue.enqueue([NewFile("ct1", "pacs", f"/drop/{n}", n, 100, 1) for n in names])
        ids = [j.id for j in queue.jobs("pending")]
        queue.retry_later(
            ids, at=clock.now + 600, error={"reason": "cannot connect"}, was="pending"
        )
    finally:
        queue.close()
    failures = page.document(config, page.Query(), now=clock.now)["failures"]
    assert [e["file"] for e in failures["shown"]] == ["/drop/bad.dcm"]
    assert failures["reasons"] == ["refused failed"]


def test_a_hostile_archive_answer_is_escaped_in_the_filter_and_the_table(tmp_path: Path) -> None:
    """An archive chooses its answers: one that closes an attribute and opens a script, with a
    line break, stays text in the reason filter's options and in the table."""
    config = _config(tmp_path)
    reason = 'refused: "><script>alert(1)</script>\nsecond line'
    queue = SqliteQueue(config.queue).open()
    try:
        _settle(queue, ["a.dcm"], "failed", {"reason": reason, "http_status": 409})
    finally:
        queue.close()
    doc = page.document(config, page.Query(reason=reason))
    html = page.render(doc)
    assert html.count("<script") == 1 and "\nsecond" not in html
    assert html.count("refused: &quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\\nsecond line") == 4
    [row] = cells(html).failures
    assert row["reason"] == escape(reason)


def test_the_last_answer_is_the_archives_not_a_files_own_problem(tmp_path: Path) -> None:
    config = _config(tmp_path)
    clock = Clock(1_800_000_000.0)
    queue = SqliteQueue(config.queue, clock=clock).open()
    reason = "the archive refused it (0xA700)"
    refused = {"reason": reason, "http_status": 409}
    unreadable = {"reason": "not a DICOM file", "stage": "reading the file"}
    try:
        _settle(queue, ["a.dcm"], "sent")
        clock.now += 120
        _settle(queue, ["b.dcm"], "failed", {**refused, "stage": "storing the file"})
        clock.now += 120
        _settle(queue, ["c.dcm"], "failed", unreadable)
    finally:
        queue.close()
    doc = page.document(config, page.Query(), now=clock.now)
    health = doc["destinations"]["pacs"]
    assert page.last_answer("pacs", health, doc).endswith(": " + reason)


def test_a_receiving_source_is_a_run_with_its_progress(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    watch: ./drop/ct1\n",
        "    receive: {ae_title: STOWD, port: 11112, bind: 127.0.0.1}\n",
    )
    config = load_text(tmp_path, text + "http:\n  listen: 127.0.0.1:9480\n")
    queue = SqliteQueue(config.queue).open()
    try:
        _settle(queue, ["a.dcm", "b.dcm"], "sent")
        queue.enqueue([NewFile("ct1", "pacs", "/r/c.dcm", "c.dcm", 100, 1)])
    finally:
        queue.close()
    rows = cells(page.render(page.document(config, page.Query()))).rows
    assert rows["run:ct1"]["progress"] == "2 of 3 files done (67%)"
    assert rows["run:ct1"]["eta"].startswith("about ")


def test_the_history_keeps_a_day_and_one_row_a_minute(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    queue = SqliteQueue(tmp_path / "q.db", clock=clock).open()
    try:
        _settle(queue, [f"a{n}" for n in range(30)], "sent")
        _settle(queue, ["b0", "b1"], "failed")
        [minute] = queue.throughput(0)
        assert (minute.sent, minute.bytes, minute.failed) == (30, 3000, 2)
        clock.now += HISTORY_SPAN + 120
        _settle(queue, ["c0"], "sent")
        rows = queue.throughput(0)
        assert [(r.minute, r.sent) for r in rows] == [(int(clock.now // 60 * 60), 1)]
        table = queue._conn().execute("SELECT COUNT(*) FROM throughput").fetchone()[0]
        assert table == 1
    finally:
        queue.close()


def test_a_schema_7_queue_gains_the_last_days_history(tmp_path: Path) -> None:
    path = tmp_path / "v7.db"
    old = sqlite3.connect(path)
    old.executescript(queue_module._SCHEMA)
    for statement in queue_module._SCHEMA_7:
        old.execute(statement)
    old.execute("PRAGMA user_version = 7")
    newest = 1_800_000_000.0
    rows = [  # (name, state, done_at)
        ("old", "sent", newest - HISTORY_SPAN - 600),  # older than a day before the newest
        ("a", "sent", newest - 3600),
        ("b", "sent", newest - 3590),
        ("c", "failed", newest),
        ("d", "pending", None),
    ]
    old.executemany(
        "INSERT INTO files (source, destination, path, rel, size, mtime_ns, state, queued_at, "
        "done_at) VALUES ('ct1', 'pacs', ?, ?, 10, 1, ?, 1.0, ?)",
        [(f"/d/{n}", n, state, done) for n, state, done in rows],
    )
    old.commit()
    old.close()
    queue = SqliteQueue(path, clock=Clock(newest + 30)).open()
    try:
        version = queue._conn().execute("PRAGMA user_version").fetchone()[0]
        assert version == queue_module.SCHEMA_VERSION == 10
        found = [(r.minute, r.sent, r.bytes, r.failed) for r in queue.throughput(0)]
        hour_ago = int((newest - 3600) // 60 * 60)
        assert found == [(hour_ago, 2, 20, 0), (int(newest // 60 * 60), 0, 0, 1)]
        assert len(queue.jobs()) == len(rows)
    finally:
        queue.close()


def test_status_reads_a_schema_7_queue_without_history(tmp_path: Path) -> None:
    """``stowd status`` (and the page) of a queue an older daemon keeps: no throughput table,
    so nothing sent today is counted, and nothing fails."""
    config = _config(tmp_path)
    config.queue.parent.mkdir(parents=True, exist_ok=True)
    old = sqlite3.connect(config.queue)
    old.executescript(queue_module._SCHEMA)
    for statement in queue_module._SCHEMA_7:
        old.execute(statement)
    old.execute("PRAGMA user_version = 7")
    old.commit()
    old.close()
    doc = page.document(config, page.Query())
    assert doc["by_source"]["ct1"]["sent_today"] == 0
    assert doc["history"]["destinations"] == {"pacs": []}


# --------------------------------------------------------------------------- stowd migrate


def test_a_migration_serves_the_page_with_its_run(tmp_path: Path) -> None:
    """``stowd migrate`` with ``http.listen`` shows its run (progress, ETA) while it goes on;
    here its archive cannot be reached, so the run waits and can be looked at."""
    layout = make_layout(tmp_path, UNREACHABLE)
    old = tmp_path / "old-archive"
    for n in range(3):
        make_instance(old / f"im{n}.dcm", rows=8, columns=8)
    for attempt in range(5):
        port = free_port()
        doc = yaml.safe_load(layout.config.read_text())
        doc["http"] = {"listen": f"127.0.0.1:{port}"}
        layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        log = tmp_path / f"migrate-{attempt}.log"
        with migrating(layout, log, "--destination", "pacs", str(old)) as proc:
            said = f"its status page is at http://127.0.0.1:{port}/"
            wait_for(
                lambda: said in log.read_text() or "cannot serve" in log.read_text(),  # noqa: B023
                60,
                "the migration's status page",
                log.read_text,
            )
            if said not in log.read_text():
                ctrl_c(proc, log)
                continue
            _shows_the_run(f"http://127.0.0.1:{port}/", log)
            ctrl_c(proc, log)
            return
    raise AssertionError("no free port for the migration's page in 5 tries")


def test_a_migration_shows_its_requests_in_flight(tmp_path: Path, orthanc: Orthanc) -> None:
    """``stowd migrate`` tells ``stowd status`` (and so the page) its requests in flight, as
    the daemon does; it wrote no state file, so the page showed 0 in flight while files were
    claimed and sent (seen in the screenshot of a migration)."""
    with StowProxy(orthanc.dicomweb_url) as proxy:
        layout = make_layout(tmp_path, proxy.base)
        old = tmp_path / "old-archive"
        for n in range(3):
            make_instance(old / f"im{n}.dcm", rows=8, columns=8)
        proxy.gate.clear()  # Orthanc stores, its answers wait: the requests stay in flight
        log = tmp_path / "migrate.log"
        with migrating(layout, log, "--destination", "pacs", str(old)) as proc:
            wait_for(lambda: proxy.arrivals >= 1, 60, "a request held back", log.read_text)

            def in_flight() -> int:
                result = run_cli("status", "--json", "-c", str(layout.config))
                return int(
                    json.loads(result.stdout)["destinations"]["pacs"].get("requests_in_flight", 0)
                )

            wait_for(lambda: in_flight() >= 1, 60, "status naming the request in flight")
            proxy.gate.set()
            assert proc.wait(120) == 0, log.read_text()
    assert not (layout.root / "state" / "queue.db.state").exists()  # removed at the end


def _shows_the_run(base: str, log: Path) -> None:
    def counted() -> bool:
        found = _run_row(base)
        return found is not None and found[1].get("progress", "").startswith("0 of 3 ")

    wait_for(counted, 60, "the run with its three files on the page", log.read_text)
    name, row = _run_row(base) or ("", {})
    assert name.startswith("run:migrate-old-archive-")
    assert row["eta"] in (
        "none while the destination is held",
        "unknown: nothing sent in the last minutes",
    )


def _run_row(base: str) -> tuple[str, dict[str, str]] | None:
    answer = get(base)
    if answer.status_code != 200:  # its queue's tables not made yet
        return None
    runs = {k: v for k, v in cells(answer.text).rows.items() if k.startswith("run:")}
    return next(iter(runs.items()), None)

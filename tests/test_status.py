"""``stowd status``: figures per source and destination, ETA, holds, errors, the short line.

Every test builds a real queue in ``tmp_path`` and puts its rows in their states through the
Queue API, with a fake clock; ``gather`` reads it back through ``open_readonly``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Clock, make_layout

from stowd.commands import cli
from stowd.config.load import load_config
from stowd.config.model import Config, Destination, Source
from stowd.pipeline.queue import Classification, Job, NewFile, Queue, SqliteQueue, open_readonly
from stowd.service import status
from stowd.service.status import RATE_WINDOW, gather, redact, render, short_line

NOW = 1_800_000_000.0  # 2027-01-15
MB = 1_000_000
SECRET = "s3cr#t/pw"
ERROR = {"reason": "the archive answered 409", "stage": "storing the file", "http_status": 409}


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def config_for(
    queue: Queue,
    sources: dict[str, str] | None = None,
    destinations: dict[str, bool] | None = None,
) -> Config:
    """``sources``: name -> destination; ``destinations``: name -> verify_tls."""
    sources = {"ct1": "pacs", "us2": "pacs", "lab1": "lab"} if sources is None else sources
    destinations = {"pacs": True, "lab": True} if destinations is None else destinations
    return Config(
        path=queue.path.with_name("stowd.yaml"),
        queue=queue.path,
        sources=tuple(
            Source(n, Path(f"/drop/{n}"), Path(f"/done/{n}/sent"), Path(f"/done/{n}/f"), d)
            for n, d in sources.items()
        ),
        destinations={
            n: Destination(n, f"http://archive-{n}:8042/dicom-web", verify_tls=tls)
            for n, tls in destinations.items()
        },
    )


class Rows:
    """Puts files in the queue in a given state, as the daemon would."""

    def __init__(self, queue: Queue, clock: Clock) -> None:
        self.queue, self.clock, self.made = queue, clock, 0

    def add(
        self,
        state: str,
        n: int,
        *,
        source: str = "ct1",
        dest: str = "pacs",
        size: int = MB,
        ago: float = 60.0,
        error: dict[str, Any] | None = None,
    ) -> list[Job]:
        """``n`` files queued ``ago`` seconds before NOW that reached ``state`` at NOW - ago/2.

        Files to be ``claimed`` must be added before the other pending ones of ``dest``
        (the queue claims the oldest ready study first).
        """
        self.clock.now = NOW - ago
        first = self.made
        self.made += n
        self.queue.enqueue(
            NewFile(source, dest, f"/drop/{source}/f{i}.dcm", f"f{i}.dcm", size, i)
            for i in range(first, self.made)
        )
        jobs = [j for j in self.queue.jobs("pending") if j.id > first]
        self.clock.now = NOW - ago / 2
        self._move(jobs, state, error or ERROR)
        self.clock.now = NOW
        return jobs

    def _move(self, jobs: list[Job], state: str, error: dict[str, Any]) -> None:
        q, ids = self.queue, [j.id for j in jobs]
        if state == "waiting":
            q.retry_later(ids, at=NOW + 600, error=error, was="pending")
        elif state in ("claimed", "settling"):
            q.set_classified(
                Classification(j, "dicom", "1.2.3", f"1.2.3.{j.id}", "1.2") for j in jobs
            )
            claimed = q.claim_batch(
                [jobs[0].destination], pick=lambda _d, c: c, candidates=len(jobs), lease=60
            )
            assert [j.id for j in claimed] == ids
            if state == "settling":
                q.begin_settle((j, "sent", f"/done/{j.rel}", None) for j in claimed)
        elif state == "failed":
            q.begin_settle((j, "failed", f"/done/{j.rel}", {**error, "file": j.path}) for j in jobs)
            q.finish_many((i, "failed") for i in ids)
        elif state != "pending":
            q.finish_many(((i, state) for i in ids), was="pending")


@pytest.fixture
def rows(queue: Queue, clock: Clock) -> Rows:
    return Rows(queue, clock)


def test_counts_per_source_and_destination_in_every_state(queue: Queue, rows: Rows) -> None:
    rows.add("claimed", 2)
    rows.add("settling", 1, source="lab1", dest="lab")
    rows.add("pending", 3, ago=100)
    rows.add("waiting", 4, source="us2")
    rows.add("sent", 5)
    rows.add("failed", 6, source="lab1", dest="lab")
    rows.add("gone", 1, source="us2")
    rows.add("ignored", 2, source="us2")
    data = gather(config_for(queue), now=NOW)
    assert data["counts"] == {
        "pending": 3,
        "waiting": 4,
        "claimed": 2,
        "settling": 1,
        "sent": 5,
        "failed": 6,
        "gone": 1,
        "ignored": 2,
    }
    zero = dict.fromkeys(data["counts"], 0)
    assert data["by_source"]["ct1"]["counts"] == {**zero, "claimed": 2, "pending": 3, "sent": 5}
    assert data["by_source"]["us2"]["counts"] == {**zero, "waiting": 4, "gone": 1, "ignored": 2}
    assert data["by_source"]["lab1"]["counts"] == {**zero, "settling": 1, "failed": 6}
    assert data["by_destination"]["pacs"]["counts"] == {
        **zero,
        "claimed": 2,
        "pending": 3,
        "waiting": 4,
        "sent": 5,
        "gone": 1,
        "ignored": 2,
    }
    assert data["by_destination"]["lab"]["counts"] == {**zero, "settling": 1, "failed": 6}
    assert data["oldest_pending_seconds"] == 100.0
    assert data["by_source"]["us2"]["oldest_pending_seconds"] == 60.0  # waiting counts
    assert data["by_source"]["lab1"]["oldest_pending_seconds"] == 60.0  # settling counts
    # the backlog is what is still to be sent: pending + waiting + claimed
    assert data["backlog_files"] == 9 and data["backlog_bytes"] == 9 * MB
    assert data["by_destination"]["lab"]["backlog_files"] == 0
    assert json.loads(json.dumps(data)) == data


def test_an_empty_queue_lists_every_configured_source_and_destination(queue: Queue) -> None:
    data = gather(config_for(queue), now=NOW)
    assert data["counts"] == {}
    assert set(data["by_source"]) == {"ct1", "us2", "lab1"}
    assert set(data["by_destination"]) == {"pacs", "lab"}
    assert data["eta"] == "empty" and data["eta_seconds"] == 0.0
    assert data["oldest_pending_seconds"] is None
    text = render(data)
    assert "files:        none yet" in text and "backlog:      nothing to send" in text


def test_rate_is_what_was_sent_in_the_last_five_minutes(queue: Queue, rows: Rows) -> None:
    rows.add("sent", 10, size=3 * MB, ago=200)  # sent 100 s ago: counts
    rows.add("sent", 7, ago=2 * RATE_WINDOW + 100)  # sent 400 s ago: too old
    rows.add("failed", 4, ago=20)  # failed is not a rate of sending
    rows.add("sent", 5, source="lab1", dest="lab", size=MB // 2, ago=20)
    data = gather(config_for(queue), now=NOW)
    assert data["files_per_minute"] == 3.0  # 15 files in 5 minutes
    assert data["mb_per_minute"] == 6.5  # (30 + 2.5) MB in 5 minutes
    assert data["by_destination"]["pacs"]["files_per_minute"] == 2.0
    assert data["by_destination"]["pacs"]["mb_per_minute"] == 6.0
    assert data["by_source"]["lab1"]["mb_per_minute"] == 0.5
    assert data["by_source"]["us2"]["files_per_minute"] == 0.0
    assert "3.0 files/min, 6.5 MB/min sent over the last 5 minutes" in render(data)


def test_eta_is_the_backlog_over_the_recent_rate(queue: Queue, rows: Rows) -> None:
    rows.add("sent", 10, size=2 * MB, ago=200)  # 20 MB in 5 min: 4 MB/min to pacs
    rows.add("pending", 3, size=10 * MB)
    rows.add("waiting", 1, source="us2", size=10 * MB)  # 40 MB backlog: 10 min
    rows.add("sent", 1, source="lab1", dest="lab", size=MB, ago=200)  # 0.2 MB/min to lab
    rows.add("pending", 1, source="lab1", dest="lab", size=MB)  # 1 MB: 5 min
    data = gather(config_for(queue), now=NOW)
    pacs, lab = data["by_destination"]["pacs"], data["by_destination"]["lab"]
    assert (pacs["eta"], pacs["eta_seconds"]) == ("estimated", 600.0)
    assert (lab["eta"], lab["eta_seconds"]) == ("estimated", 300.0)
    assert (data["eta"], data["eta_seconds"]) == ("estimated", 600.0)  # the slowest
    assert data["by_source"]["ct1"]["eta_seconds"] == 450.0  # its 30 MB at its 4 MB/min
    assert data["by_source"]["us2"]["eta"] == "unknown"  # sent nothing lately
    text = render(data)
    assert "backlog:      5 files, 41.0 MB; about 10 min to send at the recent rate" in text
    assert "ETA unknown: nothing was sent in the last 5 minutes" in text


def test_eta_is_unknown_without_a_recent_rate_and_held_when_the_destination_is(
    queue: Queue, rows: Rows
) -> None:
    rows.add("pending", 2)
    rows.add("sent", 2, ago=2 * RATE_WINDOW + 100)  # long ago: no rate
    data = gather(config_for(queue), now=NOW)
    assert (data["eta"], data["eta_seconds"]) == ("unknown", None)
    queue.hold("pacs", until=NOW + 30, reason="unavailable")
    data = gather(config_for(queue), now=NOW)
    assert data["by_destination"]["pacs"]["eta"] == "held"
    assert data["by_source"]["ct1"]["eta"] == "held"
    assert data["by_source"]["lab1"]["eta"] == "empty"
    assert (data["eta"], data["eta_seconds"]) == ("held", None)
    assert "2 files, 2.0 MB; no ETA while the destination is held" in render(data)
    assert "backlog:      2 files, 2.0 MB; no ETA while a destination is held" in render(data)


def test_a_held_destination_shows_since_until_why_and_failures(
    queue: Queue, rows: Rows, clock: Clock
) -> None:
    rows.add("waiting", 3)
    clock.now = NOW - 700
    queue.hold("pacs", until=NOW - 600, reason="first")
    clock.now = NOW - 30
    reason = f"cannot connect to http://stow:{SECRET}@archive:8042/dicom-web: refused"
    queue.hold("pacs", until=NOW + 45, reason=reason)
    clock.now = NOW
    data = gather(config_for(queue), now=NOW)
    pacs = data["destinations"]["pacs"]
    assert pacs["state"] == "held"
    assert pacs["held_since"] == NOW - 700 and pacs["held_for_seconds"] == 700.0
    assert pacs["held_until"] == NOW + 45 and pacs["next_try_in_seconds"] == 45.0
    assert pacs["failures"] == 2
    assert pacs["reason"] == "cannot connect to http://***@archive:8042/dicom-web: refused"
    assert data["destinations"]["lab"] == {
        "url": "http://archive-lab:8042/dicom-web",
        "verify_tls": True,
        "state": "ok",
    }
    text = render(data)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW - 700))
    assert f"  health:     HELD since {since} (12 min), 2 failed attempts" in text
    assert "(in 45s)" in text
    assert "why: cannot connect to http://***@archive:8042/dicom-web: refused" in text
    assert SECRET not in text and SECRET not in json.dumps(data)
    assert (
        short_line(queue, ["pacs", "lab"])
        == "0 pending, 3 waiting, 0 sent, 0 failed; pacs HELD, lab ok"
    )
    late = render(gather(config_for(queue), now=NOW + 60))
    assert "(due now)" in late


def test_last_errors_name_time_source_file_and_reason_without_secrets(
    queue: Queue, rows: Rows
) -> None:
    leaky = {**ERROR, "reason": f"POST https://user:{SECRET}@archive/dicom-web/studies: 503"}
    rows.add("failed", 1, source="lab1", dest="lab", ago=300)
    rows.add("waiting", 1, source="us2", ago=100, error=leaky)
    rows.add("sent", 3)  # sent files carry no error
    data = gather(config_for(queue), now=NOW)
    newest, older = data["last_errors"]
    assert newest == {
        "time": NOW - 50,
        "source": "us2",
        "destination": "pacs",
        "file": "/drop/us2/f1.dcm",
        "state": "waiting",
        "next_try_in_seconds": 600.0,
        "reason": "POST https://***@archive/dicom-web/studies: 503",
        "stage": "storing the file",
        "http_status": 409,
        "attempts": None,
    }
    assert (older["state"], older["source"], older["time"]) == ("failed", "lab1", NOW - 150)
    assert older["reason"] == "the archive answered 409"
    text = render(data)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW - 50))
    assert (
        f"  {stamp} us2 [waiting, next try in 10 min] /drop/us2/f1.dcm: "
        "POST https://***@archive/dicom-web/studies: 503"
    ) in text
    assert "lab1 [failed] /drop/lab1/f0.dcm: the archive answered 409" in text
    assert SECRET not in text and SECRET not in json.dumps(data)


def test_a_long_reason_is_one_short_line_in_the_human_form(queue: Queue, rows: Rows) -> None:
    long = {**ERROR, "reason": "server said:\n" + "x" * 500}
    rows.add("failed", 1, error=long)
    data = gather(config_for(queue), now=NOW)
    assert data["last_errors"][0]["reason"] == long["reason"]  # --json keeps it whole
    [line] = [ln for ln in render(data).splitlines() if "server said" in ln]
    assert line.endswith("…") and "\n" not in line and len(line) < 300


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://u:p@h/x failed", "http://***@h/x failed"),
        (
            f"to 'https://stow:{SECRET}@pacs:443/dw' timed out",
            "to 'https://***@pacs:443/dw' timed out",
        ),
        ("a@b http://user:p@ss@h:1 and HTTPS://x:y@z", "a@b http://***@h:1 and HTTPS://***@z"),
        ("no url here: user@host", "no url here: user@host"),
        ("http://archive:8042/dicom-web", "http://archive:8042/dicom-web"),
    ],
)
def test_redact_hides_the_userinfo_of_every_url(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_a_destination_without_tls_verification_is_a_warning(queue: Queue) -> None:
    data = gather(config_for(queue, destinations={"pacs": True, "lab": False}), now=NOW)
    assert data["warnings"] == ["TLS verification is OFF for destination lab"]
    assert data["destinations"]["lab"]["verify_tls"] is False
    assert "WARNING:      TLS verification is OFF for destination lab" in render(data)


def test_rows_of_a_source_no_longer_configured_are_parked(queue: Queue, rows: Rows) -> None:
    rows.add("pending", 2, source="old")
    queue.adopt({"ct1": "pacs"})  # what the daemon does at start: "old" has no destination now
    data = gather(config_for(queue, sources={"ct1": "pacs"}), now=NOW)
    old = data["by_source"]["old"]
    assert old["configured"] is False and old["eta"] == "parked"
    assert old["counts"]["pending"] == 2
    assert "" not in data["by_destination"]
    assert (data["eta"], data["eta_seconds"]) == ("parked", None)  # no destination for them
    assert data["warnings"] == [
        "source old is not in the config: its 2 queued file(s) wait until it is back"
    ]
    assert "source old (not in the config: its files wait until it is back)" in render(data)


def test_the_human_form_has_a_block_per_destination_and_source(queue: Queue, rows: Rows) -> None:
    rows.add("sent", 4, ago=100)
    rows.add("pending", 2)
    text = render(gather(config_for(queue), now=NOW))
    assert "daemon:       not running" in text
    assert "files:        2 pending, 4 sent" in text
    assert "destination pacs (http://archive-pacs:8042/dicom-web)\n  health:     ok" in text
    assert "source ct1 (/drop/ct1 -> pacs)\n  files:      2 pending, 4 sent" in text
    assert "source us2 (/drop/us2 -> pacs)\n  files:      none yet" in text
    assert text.endswith(
        "sent, failed and gone count the files still in the queue's history (history_days: 30)"
    )


def test_short_line_from_a_queue_or_from_gathered_data(queue: Queue, rows: Rows) -> None:
    rows.add("claimed", 1)
    rows.add("pending", 12)
    rows.add("waiting", 3)
    rows.add("sent", 1520, size=10)
    rows.add("failed", 2)
    line = "12 pending, 3 waiting, 1 sending, 1520 sent, 2 failed; pacs ok"
    assert short_line(queue, ["pacs"]) == line
    data = gather(config_for(queue, {"ct1": "pacs"}, {"pacs": True}), now=NOW)
    assert short_line(data) == line
    assert short_line(queue).endswith("; destinations ok")


def test_short_line_names_a_destination_outside_its_windows_paused(
    queue: Queue, rows: Rows
) -> None:
    """systemd's STATUS= said "pacs ok" all night while the schedule paused pacs."""
    rows.add("pending", 12)
    line = short_line(queue, ["pacs", "lab"], paused=["pacs"])
    assert line.endswith("; pacs paused, lab ok")
    many = [f"archive-number-{i}" for i in range(6)]
    line = short_line(queue, many, paused=many[:2])
    assert line.endswith("; 2 of 6 paused (schedule)")
    queue.hold("lab", until=NOW + 60, reason="down")
    assert short_line(queue, ["pacs", "lab"], paused=["pacs", "lab"]).endswith(
        "; pacs paused, lab HELD"
    )


def test_short_line_stays_within_80_characters(queue: Queue, rows: Rows) -> None:
    many = [f"archive-number-{i}" for i in range(6)]
    rows.add("pending", 12345)
    assert (
        short_line(queue, many)
        == "12345 pending, 0 waiting, 0 sent, 0 failed; all 6 destinations ok"
    )
    queue.hold("archive-number-3", until=NOW + 60, reason="down")
    line = short_line(queue, many)
    assert line == "12345 pending, 0 waiting, 0 sent, 0 failed; 1 of 6 HELD: archive-number-3"
    for i in range(6):
        queue.hold(f"archive-number-{i}", until=NOW + 60, reason="down")
    line = short_line(queue, many)
    assert len(line) == 80 and line.endswith("…")


def test_status_reads_while_the_daemon_holds_a_write_transaction(queue: Queue, rows: Rows) -> None:
    rows.add("pending", 3)
    writer = queue._conn()
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE files SET state = 'sent', done_at = ?", (NOW,))
    try:
        started = time.monotonic()
        data = gather(config_for(queue), now=NOW)
        assert time.monotonic() - started < 5  # not the 30 s busy timeout
        assert data["counts"] == {"pending": 3}  # what was committed
    finally:
        writer.execute("ROLLBACK")


def test_status_command_prints_json_and_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = make_layout(tmp_path, "http://stow:pw@127.0.0.1:9/dicom-web")
    config = load_config(layout.config)
    q = SqliteQueue(config.queue).open(lock=False)
    q.enqueue([NewFile("ct1", "pacs", str(layout.drop / "a.dcm"), "a.dcm", 10, 1)])
    q.close()
    assert cli.main(["status", "-c", str(layout.config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"pending": 1} and data["by_source"]["ct1"]["backlog_files"] == 1
    assert data["destinations"]["pacs"]["url"] == "http://***@127.0.0.1:9/dicom-web"
    assert cli.main(["status", "-c", str(layout.config)]) == 0
    text = capsys.readouterr().out
    assert "files:        1 pending" in text and ":pw@" not in text


def statements(queue: Queue, config: Config) -> list[str]:
    """The SQL one ``gather`` runs (its queries, on a read-only queue of our own)."""
    reader = open_readonly(queue.path)
    seen: list[str] = []
    reader._conn().set_trace_callback(seen.append)
    try:
        with reader.reading():
            status._gather(config, reader, NOW)
    finally:
        reader.close()
    return [s for s in seen if s.startswith("SELECT")]


def plan(queue: Queue, sql: str) -> str:
    rows = queue._conn().execute("EXPLAIN QUERY PLAN " + sql).fetchall()
    return "; ".join(r[3] for r in rows)


def test_status_queries_read_indexes_and_never_scan_the_table(queue: Queue, rows: Rows) -> None:
    """The counts come from ``tallies`` (kept by the queue's triggers) and the waiting rows'
    own index: no query passes over the files, so a queue of a million rows answers as
    quickly as one of a thousand (issue 19)."""
    rows.add("sent", 3)
    rows.add("failed", 1)
    rows.add("waiting", 1)
    config = config_for(queue)
    plans = [plan(queue, sql) for sql in statements(queue, config)]
    assert not [p for p in plans if "SCAN files" in p and "INDEX" not in p]
    assert "SCAN tallies" in plans
    assert any("SEARCH files USING INDEX files_waiting (next_attempt_at>?)" in p for p in plans)
    assert any("SEARCH files USING COVERING INDEX files_age (source=?" in p for p in plans)
    assert any("SEARCH files USING INDEX files_done (done_at>?)" in p for p in plans)
    assert "SCAN files USING INDEX files_errors" in plans  # newest first, LIMIT: no sort
    reader = open_readonly(queue.path)
    seen: list[str] = []
    reader._conn().set_trace_callback(seen.append)
    short_line(reader)
    reader.close()
    assert [plan(queue, s) for s in seen if s.startswith("SELECT")] == [
        "SCAN tallies; USE TEMP B-TREE FOR GROUP BY",
        "SEARCH files USING INDEX files_waiting (next_attempt_at>?)",
        "SCAN destinations",
    ]


def test_a_queue_of_100000_rows_answers_quickly(
    queue: Queue, clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    n, active = 100_000, 2000
    clock.now = NOW - 3600
    queue.enqueue(
        NewFile(f"src{i % 4}", "pacs" if i % 4 else "lab", f"/d/{i}.dcm", f"{i}.dcm", 500_000, i)
        for i in range(n)
    )
    jobs = queue.jobs("pending")
    done, waiting = jobs[: n - active], [j.id for j in jobs[-500:]]
    queue.begin_settle((j, "failed", "/f", ERROR) for j in done[::30])
    failed = {j.id for j in done[::30]}
    for at in range(0, len(done), 5000):  # done over the last hour, 5000 at a time
        clock.now = NOW - 3600 + at * 3600 / len(done)
        part = done[at : at + 5000]
        queue.finish_many((j.id, "failed") for j in part if j.id in failed)
        queue.finish_many(((j.id, "sent") for j in part if j.id not in failed), was="pending")
    clock.now = NOW - 10
    queue.retry_later(waiting, at=NOW + 300, error=ERROR, was="pending")
    clock.now = NOW
    config = config_for(queue, {f"src{i}": "pacs" if i else "lab" for i in range(4)})
    started = time.perf_counter()
    data = gather(config, now=NOW)
    took = time.perf_counter() - started
    reader = open_readonly(queue.path)
    started = time.perf_counter()
    line = short_line(reader, ["pacs", "lab"])
    took_line = time.perf_counter() - started
    reader.close()
    with capsys.disabled():
        print(f"\n100,000 rows: gather {took * 1000:.0f} ms, short_line {took_line * 1000:.0f} ms")
    assert sum(data["counts"].values()) == n
    assert data["counts"]["waiting"] == 500 and data["counts"]["pending"] == active - 500
    assert data["counts"]["failed"] == len(failed)
    assert data["eta"] == "estimated"
    assert line.startswith("1500 pending, 500 waiting, ")


def test_a_queue_that_cannot_be_read_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    queue_path = layout.root / "state" / "queue.db"
    queue_path.parent.mkdir(parents=True)
    queue_path.write_bytes(b"this is not an SQLite database" * 100)
    assert cli.main(["status", "-c", str(layout.config)]) == 1
    err = capsys.readouterr().err
    assert "cannot read the queue" in err and "sudo -u stowd" in err
    assert "Traceback" not in err


def test_a_queue_whose_tables_are_not_made_yet_says_stowd_is_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon's first moment: queue.db exists, empty, before its tables are made.  The
    hint was to run status as the daemon's user, which does not help."""
    layout = make_layout(tmp_path / "run", "http://127.0.0.1:9/dicom-web")
    queue_path = layout.root / "state" / "queue.db"
    queue_path.parent.mkdir(parents=True)
    queue_path.write_bytes(b"")  # an empty file is an empty SQLite database
    assert cli.main(["status", "-c", str(layout.config)]) == 1
    err = capsys.readouterr().err
    assert "no such table" in err
    assert "its tables are not made yet" in err and "try again in a moment" in err
    assert "sudo -u stowd" not in err

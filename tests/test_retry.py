"""``stowd retry``: files in failed/ go back to their watch folders, with their sidecars,
never overwriting, safe across filesystems; and end to end through the real Orthanc."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc

from stowd.commands import cli
from stowd.commands import putback as retry_mod
from stowd.commands.putback import Filters, parse_since, retry
from stowd.config.load import load_config
from stowd.config.model import Config, Source
from stowd.pipeline.queue import NewFile, Queue, SqliteQueue
from stowd.pipeline.settle import Decision, iso, settle_all
from stowd.service.status import daemon_pid

URL = "http://127.0.0.1:9/dicom-web"
LATER = time.time() + 3600  # "now" for files that must not count as just arrived
DAY = 86400.0


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return make_layout(tmp_path / "run", URL, source={"sidecars": True})


@pytest.fixture
def config(layout: Layout) -> Config:
    return load_config(layout.config)


@pytest.fixture
def queue(config: Config) -> Iterator[Queue]:
    q = SqliteQueue(config.queue).open()
    yield q
    q.close()


def fail(
    queue: Queue,
    source: Source,
    rel: str,
    data: bytes = b"data",
    *,
    sidecars: dict[str, str] | None = None,
    reason: str = "not a DICOM file: no DICM marker",
    when: float | None = None,
) -> Path:
    """Drop ``rel`` (with sidecars: name -> text, beside it) and settle it to failed/ the
    way the worker does; returns where it went."""
    path = source.watch / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    for name, text in (sidecars or {}).items():
        (path.parent / name).write_text(text, encoding="utf-8")
    st = path.stat()
    entries = [[str(path.parent / n), t] for n, t in (sidecars or {}).items()]
    queue.enqueue(
        [NewFile("ct1", "pacs", str(path), rel, st.st_size, st.st_mtime_ns, json.dumps(entries))]
    )
    job = [j for j in queue.jobs("pending") if j.path == str(path)][-1]
    error = {
        "file": str(path),
        "reason": reason,
        "stage": "reading the file",
        "first_try": iso(when),
        "last_try": iso(when),
        "source": "ct1",
    }
    [result] = settle_all(queue, [Decision(job, source, "failed", error)])
    assert result.target is not None and result.problem is None
    return result.target


def put(path: Path, data: str | bytes = "x", error: dict[str, object] | None = None) -> Path:
    """A file written straight into failed/ (or anywhere), with an error file if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if error is not None:
        Path(str(path) + ".error.json").write_text(json.dumps(error))
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- basics


def test_files_go_back_to_their_paths_and_their_error_files_go(
    config: Config, layout: Layout, queue: Queue
) -> None:
    source = config.sources[0]
    fail(queue, source, "P1/S1/a.dcm", b"A")
    fail(queue, source, "b.dcm", b"B")
    assert set(files(layout.drop)) == set()

    report = retry(config, Filters())

    assert report.ok and report.back == 2
    assert files(layout.drop) == {"P1/S1/a.dcm": b"A", "b.dcm": b"B"}
    assert list(layout.failed.iterdir()) == []  # error files gone, empty folders removed
    assert layout.failed.is_dir()  # failed/ itself stays
    text = retry_mod.render(report, None)
    assert f"back: [ct1] {layout.failed / 'b.dcm'} -> {layout.drop / 'b.dcm'}" in text
    assert "2 back in the watch folders, 0 left in failed/" in text
    assert "the daemon is not running" in text


def test_reason_filter_is_a_piece_of_the_reason_in_any_case(
    config: Config, layout: Layout, queue: Queue
) -> None:
    source = config.sources[0]
    fail(queue, source, "a.dcm", reason="rule rules[1] (config line 9): PatientBirthDate: bad")
    fail(queue, source, "b.dcm", reason="the file is empty")
    put(layout.failed / "c.dcm")  # no error file: no reason to match

    report = retry(config, Filters(reason="patientbirthdate"), now=LATER)

    assert [line.path.name for line in report.lines] == ["a.dcm"]
    assert set(files(layout.drop)) == {"a.dcm"}
    assert {"b.dcm", "b.dcm.error.json", "c.dcm"} == set(files(layout.failed))


def test_since_takes_the_last_try_else_when_the_error_file_was_written(
    config: Config, layout: Layout, queue: Queue
) -> None:
    now = time.time()
    source = config.sources[0]
    fail(queue, source, "old.dcm", when=now - 3 * DAY)
    fail(queue, source, "new.dcm", when=now - 3600)
    never_sent = fail(queue, source, "read.dcm")  # failed while reading: no tries
    old_read = fail(queue, source, "oldread.dcm")
    stamp = now - 5 * DAY
    os.utime(Path(str(old_read) + ".error.json"), (stamp, stamp))

    report = retry(config, Filters(since=parse_since("2h", now)), dry_run=True, now=now)
    assert sorted(line.path.name for line in report.lines) == ["new.dcm", "read.dcm"]
    iso_day = time.strftime("%Y-%m-%d", time.localtime(now - 4 * DAY))
    report = retry(config, Filters(since=parse_since(iso_day, now)), dry_run=True, now=now)
    assert sorted(line.path.name for line in report.lines) == ["new.dcm", "old.dcm", "read.dcm"]
    assert never_sent.exists()  # a dry run moves nothing


def test_parse_since() -> None:
    assert parse_since("3d", 1_000_000.0) == 1_000_000.0 - 3 * DAY
    utc = datetime(2026, 11, 27, 19, tzinfo=UTC).timestamp()
    assert parse_since("2026-11-27T19:00:00+00:00", 0) == utc
    assert parse_since("2026-11-27", 0) == datetime(2026, 11, 27).timestamp()  # local midnight
    with pytest.raises(ValueError, match="--since: expected a duration"):
        parse_since("yesterday", 0)


def test_a_file_already_in_the_watch_folder_is_not_overwritten(
    config: Config, layout: Layout, queue: Queue
) -> None:
    failed = fail(queue, config.sources[0], "P/a.dcm", b"old")
    put(layout.drop / "P/a.dcm", "dropped again")

    report = retry(config, Filters())

    assert not report.ok and report.left == 1
    assert (layout.drop / "P/a.dcm").read_text() == "dropped again"
    assert failed.read_bytes() == b"old" and Path(str(failed) + ".error.json").exists()
    assert "is in the watch folder already; not overwritten" in report.lines[0].detail
    assert "left: [ct1]" in retry_mod.render(report, None)


def test_a_numbered_copy_goes_back_under_its_dropped_name_with_its_sidecar(
    config: Config, layout: Layout, queue: Queue
) -> None:
    source = config.sources[0]
    first = fail(queue, source, "P/img.dcm", b"1", sidecars={"img.json": '{"PatientID": "A"}'})
    second = fail(queue, source, "P/img.dcm", b"2", sidecars={"img.json": '{"PatientID": "B"}'})
    assert (first.name, second.name) == ("img.dcm", "img~1.dcm")
    assert (layout.failed / "P/img~1.json").exists()

    report = retry(config, Filters(), dry_run=True)  # both would go to P/img.dcm
    assert [line.back for line in report.lines] == [True, False]
    assert "P/img.dcm is in the watch folder already" in report.lines[1].detail

    first.unlink()
    Path(str(first) + ".error.json").unlink()
    report = retry(config, Filters())
    assert report.ok and report.lines[0].detail == "with img~1.json"
    assert files(layout.drop) == {"P/img.dcm": b"2", "P/img.json": b'{"PatientID": "B"}'}
    assert set(files(layout.failed)) == {"P/img.json"}  # the first file's sidecar copy


def test_a_file_whose_sidecar_place_holds_something_else_stays(
    config: Config, layout: Layout, queue: Queue
) -> None:
    fail(queue, config.sources[0], "P/img.dcm", sidecars={"img.json": '{"PatientID": "A"}'})
    put(layout.drop / "P/img.json", '{"PatientID": "next patient"}')
    report = retry(config, Filters())
    assert report.left == 1 and "its sidecar" in report.lines[0].detail
    assert set(files(layout.drop)) == {"P/img.json"}

    (layout.drop / "P/img.json").write_text('{"PatientID": "A"}')  # the same: fine
    assert retry(config, Filters()).ok
    assert set(files(layout.drop)) == {"P/img.dcm", "P/img.json"}


# --------------------------------------------------------------------------- folder sidecars


def test_the_folder_sidecar_goes_back_when_the_watch_folder_has_none(
    config: Config, layout: Layout, queue: Queue
) -> None:
    source = config.sources[0]
    meta = {"_metadata.yaml": "PatientID: A\n"}
    fail(queue, source, "P/a.dcm", sidecars=meta, reason="bad a")
    fail(queue, source, "P/b.dcm", sidecars=meta, reason="bad b")
    (layout.drop / "P/_metadata.yaml").unlink()  # the watcher retired it

    report = retry(config, Filters(reason="bad a"))
    assert report.ok and report.lines[0].detail == "folder sidecar _metadata.yaml"
    assert (layout.drop / "P/_metadata.yaml").read_text() == "PatientID: A\n"
    assert (layout.failed / "P/_metadata.yaml").exists()  # b.dcm, still there, uses it

    assert retry(config, Filters()).ok
    assert set(files(layout.drop)) == {"P/a.dcm", "P/b.dcm", "P/_metadata.yaml"}
    assert not layout.failed.joinpath("P").exists()


def test_a_folder_sidecar_in_the_watch_folder_is_kept_and_the_copy_stays(
    config: Config, layout: Layout, queue: Queue
) -> None:
    fail(queue, config.sources[0], "P/a.dcm", sidecars={"_metadata.yaml": "PatientID: A\n"})
    (layout.drop / "P/_metadata.yaml").write_text("PatientID: fixed\n")

    report = retry(config, Filters())

    assert report.ok
    assert (layout.drop / "P/_metadata.yaml").read_text() == "PatientID: fixed\n"
    assert (layout.failed / "P/_metadata.yaml").read_text() == "PatientID: A\n"
    [note] = report.notes
    assert "is there already" in note and "_metadata.yaml stay in" in note


def test_the_queue_tells_which_copy_of_the_folder_sidecar_a_file_was_read_with(
    config: Config, layout: Layout, queue: Queue
) -> None:
    source = config.sources[0]
    fail(queue, source, "P/a.dcm", sidecars={"_metadata.yaml": "PatientID: A\n"}, reason="a")
    fail(queue, source, "P/b.dcm", sidecars={"_metadata.yaml": "PatientID: B\n"}, reason="b")
    (layout.drop / "P/_metadata.yaml").unlink()
    copies = sorted(p.name for p in (layout.failed / "P").glob("_metadata*"))
    assert len(copies) == 2 and copies[0] == "_metadata.yaml"

    report = retry(config, Filters(), dry_run=True)  # one folder sidecar per folder
    assert [line.back for line in report.lines] == [True, False]
    assert "goes back to" in report.lines[1].detail

    report = retry(config, Filters(reason="b"))
    assert report.ok and report.lines[0].detail == f"folder sidecar {copies[1]} as _metadata.yaml"
    assert (layout.drop / "P/_metadata.yaml").read_text() == "PatientID: B\n"
    assert (layout.failed / "P/_metadata.yaml").read_text() == "PatientID: A\n"
    assert (layout.failed / "P" / copies[1]).exists()  # kept while any file is left in P/


def test_without_the_queue_several_copies_cannot_be_told_apart(
    config: Config, layout: Layout
) -> None:
    put(layout.failed / "P/a.dcm", error={"reason": "x"})
    put(layout.failed / "P/_metadata.yaml", "PatientID: A\n")
    put(layout.failed / "P/_metadata~0123456789ab.yaml", "PatientID: B\n")

    report = retry(config, Filters())

    assert report.left == 1 and "does not tell which one" in report.lines[0].detail
    assert set(files(layout.drop)) == set()


# --------------------------------------------------------------------------- odd cases


def test_a_file_without_an_error_file_goes_back_unless_it_just_arrived(
    config: Config, layout: Layout
) -> None:
    put(layout.failed / "lost.dcm")
    report = retry(config, Filters())
    assert report.left == 1 and "less than a minute ago" in report.lines[0].detail

    report = retry(config, Filters(), now=LATER)
    assert report.ok and report.lines[0].detail == "it had no error file"
    assert set(files(layout.drop)) == {"lost.dcm"}


def test_an_unreadable_error_file_is_said_and_removed(config: Config, layout: Layout) -> None:
    failed = put(layout.failed / "a.dcm")
    Path(str(failed) + ".error.json").write_text("{not json")
    report = retry(config, Filters())
    assert report.ok and "its error file could not be read" in report.lines[0].detail
    assert files(layout.failed) == {}


def test_symlinked_folders_in_failed_are_not_followed(
    config: Config, layout: Layout, tmp_path: Path
) -> None:
    outside = put(tmp_path / "elsewhere/keep.dcm", error={"reason": "x"}).parent
    layout.failed.mkdir(parents=True)
    (layout.failed / "link").symlink_to(outside, target_is_directory=True)

    report = retry(config, Filters())

    assert report.lines == [] and set(os.listdir(outside)) == {"keep.dcm", "keep.dcm.error.json"}
    assert retry_mod.render(report, None) == "no file in failed/ matches"


def test_a_symlink_in_failed_goes_back_as_a_link(
    config: Config, layout: Layout, tmp_path: Path
) -> None:
    data = put(tmp_path / "data.dcm", "content")
    link = layout.failed / "l.dcm"
    link.parent.mkdir(parents=True)
    link.symlink_to(data)
    Path(str(link) + ".error.json").write_text("{}")
    assert retry(config, Filters()).ok
    assert os.readlink(layout.drop / "l.dcm") == str(data)


# --------------------------------------------------------------------------- moving safely


def test_across_filesystems_the_file_is_copied_synced_and_removed(
    config: Config, layout: Layout, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = fail(queue, config.sources[0], "P/a.dcm", b"A" * 100_000)
    mtime = failed.stat().st_mtime_ns
    real_link, real_rename = os.link, os.rename
    fsynced: list[int] = []
    real_fsync = os.fsync

    def cross_device(real: Callable[..., None]) -> Callable[..., None]:
        def op(src: str | Path, dst: str | Path, *args: Any, **kw: Any) -> None:
            if Path(src).is_relative_to(layout.failed):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst, *args, **kw)

        return op

    def fsync(fd: int) -> None:
        fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "link", cross_device(real_link))
    monkeypatch.setattr(os, "rename", cross_device(real_rename))
    monkeypatch.setattr(os, "fsync", fsync)

    assert retry(config, Filters()).ok

    back = layout.drop / "P/a.dcm"
    assert back.read_bytes() == b"A" * 100_000 and back.stat().st_mtime_ns == mtime
    assert not failed.exists() and files(layout.failed) == {}
    assert [p.name for p in (layout.drop / "P").iterdir()] == ["a.dcm"]  # no temp left
    assert len(fsynced) >= 2  # the copy, and the folder


def test_where_there_are_no_hard_links_a_checked_rename_is_used(
    config: Config, layout: Layout, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail(queue, config.sources[0], "P/a.dcm", b"A", sidecars={"a.json": "{}"})

    def no_links(*_args: object, **_kw: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert retry(config, Filters()).ok
    assert files(layout.drop) == {"P/a.dcm": b"A", "P/a.json": b"{}"}


def test_a_file_that_appears_at_the_target_meanwhile_wins(
    config: Config, layout: Layout, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = fail(queue, config.sources[0], "P/a.dcm", b"A", sidecars={"a.json": "{}"})
    real_link = os.link

    def racing(src: str | Path, dst: str | Path, *args: Any, **kw: Any) -> None:
        if Path(dst).name == "a.dcm":
            Path(dst).write_text("new drop")  # someone drops a.dcm just now
        return real_link(src, dst, *args, **kw)

    monkeypatch.setattr(os, "link", racing)
    report = retry(config, Filters())

    assert report.left == 1 and "appeared in the watch folder meanwhile" in report.lines[0].detail
    assert files(layout.drop) == {"P/a.dcm": b"new drop"}  # its sidecar copy was taken back
    assert failed.read_bytes() == b"A" and (layout.failed / "P/a.json").exists()


# --------------------------------------------------------------------------- command line


def test_cli_unknown_source_and_bad_since_are_usage_errors(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["retry", "-c", str(layout.config), "--source", "nope"]) == 2
    assert "no source named 'nope'; known: ct1" in capsys.readouterr().err
    assert cli.main(["retry", "-c", str(layout.config), "--since", "soon"]) == 2
    assert "--since: expected a duration" in capsys.readouterr().err


def test_cli_exit_codes_and_source_filter(
    config: Config, layout: Layout, queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    fail(queue, config.sources[0], "a.dcm")
    fail(queue, config.sources[0], "b.dcm")
    put(layout.drop / "b.dcm")
    argv = ["retry", "-c", str(layout.config), "--source", "ct1"]
    assert cli.main([*argv, "--dry-run"]) == 1
    assert "dry run: 1 would go back, 1 would stay; nothing moved" in capsys.readouterr().out
    assert cli.main(argv) == 1
    (layout.drop / "b.dcm").unlink()
    assert cli.main(argv) == 0
    assert "1 back in the watch folders, 0 left in failed/" in capsys.readouterr().out


# --------------------------------------------------------------------------- end to end


def test_retry_brings_a_fixed_file_from_failed_to_sent_through_orthanc(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    bad_rule = {
        "name": "birth date from folder",
        "match": {"regex": "^dates/(?P<d>[^/]+)/"},
        "set": {"PatientBirthDate": "{regex.d}"},
    }
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, rules=[bad_rule])
    uid = make_instance(layout.drop / "dates/2024-13-45/b.dcm")
    with Stowd(layout) as daemon:
        wait_for(
            lambda: layout.files(layout.failed) == {"dates/2024-13-45/b.dcm"},
            60,
            "the file to fail",
            lambda: daemon.log,
        )
        [error] = layout.error_files().values()
        assert "PatientBirthDate" in json.loads(error.read_text())["reason"]
        assert daemon.terminate() == 0

        doc = yaml.safe_load(layout.config.read_text())  # fix the cause: drop the rule
        del doc["rules"]
        layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    with Stowd(layout) as daemon:
        queue_path = load_config(layout.config).queue
        wait_for(lambda: daemon_pid(queue_path) is not None, 30, "the daemon to start")

        done = run_cli("retry", "-c", str(layout.config), "--reason", "PatientBirthDate")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 back in the watch folders, 0 left in failed/" in done.stdout
        assert "the daemon (pid" in done.stdout

        wait_for(
            lambda: layout.files(layout.sent) == {"dates/2024-13-45/b.dcm"},
            60,
            "the retried file to reach sent/",
            lambda: daemon.log,
        )
        assert uid in orthanc.sop_instance_uids()
        assert layout.files(layout.failed) == set() and layout.error_files() == {}
        assert daemon.terminate() == 0

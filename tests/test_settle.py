"""Moving finished files: relative paths kept, never overwritten, crash-safe, reasons beside."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stowd.config.model import Sidecars, Source
from stowd.errors import FileUnreadable
from stowd.pipeline import settle as settle_mod
from stowd.pipeline import sidecar as sidecar_mod
from stowd.pipeline.queue import Job, NewFile, Queue, SqliteQueue
from stowd.pipeline.settle import Decision, free_target, repair, settle_all


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return Source("ct", tmp_path / "drop", tmp_path / "sent", tmp_path / "failed", "pacs")


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    q = SqliteQueue(tmp_path / "q.db").open()
    yield q
    q.close()


def settle(
    queue: Queue, source: Source, job: Job, *, outcome: str, error: dict[str, object] | None
) -> Path | None:
    """Settle one job the way the worker settles a batch; raise what could not be moved."""
    [result] = settle_all(queue, [Decision(job, source, outcome, error)])
    if result.problem is not None:
        raise result.problem
    return result.target


def drop(source: Source, queue: Queue, rel: str, data: bytes = b"x") -> Path:
    path = source.watch / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    st = path.stat()
    queue.enqueue([NewFile("ct", "pacs", str(path), rel, st.st_size, st.st_mtime_ns)])
    return path


def test_sent_keeps_the_relative_path(source: Source, queue: Queue) -> None:
    path = drop(source, queue, "P1/S1/img.dcm", b"abc")
    [job] = queue.jobs()
    target = settle(queue, source, job, outcome="sent", error=None)
    assert target is not None
    assert target == source.sent / "P1/S1/img.dcm"
    assert target.read_bytes() == b"abc"
    assert not path.exists()
    assert queue.counts() == {"sent": 1}


def test_never_overwrites(source: Source, queue: Queue) -> None:
    (source.sent / "a").mkdir(parents=True)
    (source.sent / "a/img.dcm").write_bytes(b"old")
    drop(source, queue, "a/img.dcm", b"new")
    [job] = queue.jobs()
    target = settle(queue, source, job, outcome="sent", error=None)
    assert target is not None
    assert target.name == "img~1.dcm"
    assert (source.sent / "a/img.dcm").read_bytes() == b"old"
    assert free_target(source.sent, "a/img.dcm").name == "img~2.dcm"


def test_failed_gets_a_readable_reason(source: Source, queue: Queue) -> None:
    drop(source, queue, "bad.dcm")
    [job] = queue.jobs()
    target = settle(queue, source, job, outcome="failed", error={"reason": "not DICOM"})
    assert target is not None
    reason = json.loads(Path(str(target) + ".error.json").read_text())
    assert reason == {"reason": "not DICOM"}
    assert queue.counts() == {"failed": 1}


def test_repair_finishes_an_interrupted_move(source: Source, queue: Queue) -> None:
    path = drop(source, queue, "x.dcm")
    [job] = queue.jobs()
    target = source.failed / "x.dcm"
    queue.begin_settle([(job, "failed", str(target), {"reason": "r"})])
    assert repair(queue) == (1, set())  # crash before the move
    assert target.exists() and not path.exists()
    assert Path(str(target) + ".error.json").exists()
    assert queue.counts() == {"failed": 1}


def test_repair_after_the_move_only_marks_done(source: Source, queue: Queue) -> None:
    path = drop(source, queue, "y.dcm")
    [job] = queue.jobs()
    target = source.sent / "y.dcm"
    queue.begin_settle([(job, "sent", str(target), None)])
    settle_mod.move(path, target)  # crash after the move, before the bookkeeping
    assert repair(queue) == (1, set())
    assert queue.counts() == {"sent": 1}
    assert target.exists()


def test_vanished_file_is_gone_not_lost(source: Source, queue: Queue) -> None:
    path = drop(source, queue, "z.dcm")
    [job] = queue.jobs()
    path.unlink()
    settle(queue, source, job, outcome="sent", error=None)
    assert queue.counts() == {"gone": 1}


def test_move_across_filesystems(
    source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src.dcm"
    src.write_bytes(b"payload" * 1000)
    real_link = os.link
    calls = []

    def exdev_once(a: object, b: object, **folders: Any) -> None:
        calls.append((a, b))
        if len(calls) == 1:  # the name put in place (a link, never replacing a file)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(a, b, **folders)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", exdev_once)
    dst = tmp_path / "other" / "dst.dcm"
    settle_mod.move(src, dst)
    assert dst.read_bytes() == b"payload" * 1000
    assert not src.exists()
    assert not list(dst.parent.glob(".*stowd-tmp"))
    # the file's own link refused (EXDEV), then the copy's, made beside the target
    assert [str(a).endswith(".stowd-tmp") for a, _ in calls] == [False, True]


def test_remove_empty_parents_stops_at_root(tmp_path: Path) -> None:
    root = tmp_path / "drop"
    (root / "a/b").mkdir(parents=True)
    (root / "keep").mkdir()
    settle_mod.remove_empty_parents(root / "a/b/file.dcm", root)
    assert not (root / "a").exists()
    assert root.exists() and (root / "keep").exists()


def test_a_move_that_fails_stays_settling_until_it_can_be_done(
    source: Source, queue: Queue
) -> None:
    path = drop(source, queue, "sub/w.dcm")
    [job] = queue.jobs()
    source.failed.mkdir(parents=True)
    (source.failed / "sub").write_text("a file where the folder should be")
    with pytest.raises(OSError):
        settle(queue, source, job, outcome="failed", error={"reason": "r"})
    assert path.exists()
    assert queue.counts() == {"settling": 1}
    assert repair(queue, only={job.id}) == (0, {job.id})
    (source.failed / "sub").unlink()
    assert repair(queue, only={job.id}) == (1, set())
    assert (source.failed / "sub" / "w.dcm").exists()
    assert queue.counts() == {"failed": 1}


def test_one_batch_never_gives_two_files_the_same_name(source: Source, queue: Queue) -> None:
    first = drop(source, queue, "a/x.dcm")
    (source.sent / "a").mkdir(parents=True)
    (source.sent / "a" / "x.dcm").write_bytes(b"already there")
    other = Source("ct2", source.watch, source.sent, source.failed, "pacs")
    twin_path = Path(str(first) + ".twin")
    twin_path.write_bytes(b"twin")
    st = twin_path.stat()
    queue.enqueue([NewFile("ct2", "pacs", str(twin_path), "a/x.dcm", 4, st.st_mtime_ns)])
    jobs, [twin] = queue.jobs()[:1], queue.jobs()[1:]
    results = settle_all(
        queue,
        [Decision(jobs[0], source, "sent"), Decision(twin, other, "sent")],
    )
    names = sorted(r.target.name for r in results if r.target is not None)
    assert names == ["x~1.dcm", "x~2.dcm"]
    assert (source.sent / "a" / "x.dcm").read_bytes() == b"already there"


def test_a_file_replaced_after_it_was_read_is_left_for_the_watcher(
    source: Source, queue: Queue
) -> None:
    path = drop(source, queue, "img.dcm", b"old content")
    [job] = queue.jobs()
    path.write_bytes(b"new content, longer")  # the scanner replaced it meanwhile
    assert settle(queue, source, job, outcome="sent", error=None) is None
    assert path.read_bytes() == b"new content, longer"  # not moved: it was never sent
    assert not source.sent.exists() or not any(source.sent.rglob("*"))
    assert queue.counts() == {"sent": 1}
    st = path.stat()
    new_job = NewFile("ct", "pacs", str(path), "img.dcm", st.st_size, st.st_mtime_ns)
    assert queue.enqueue([new_job]) == 1  # the watcher queues the new content


def test_two_workers_settling_the_same_name_at_once_keep_both_files(
    tmp_path: Path, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sources share failed/; both fail an IM0001 at the same moment."""
    failed = tmp_path / "shared-failed"
    decisions = []
    for n, name in enumerate(("ct", "mr")):
        source = Source(name, tmp_path / name, tmp_path / f"sent-{name}", failed, "pacs")
        path = source.watch / "IM0001"
        path.parent.mkdir()
        path.write_bytes(f"content of {name}".encode())
        st = path.stat()
        queue.enqueue([NewFile(name, "pacs", str(path), "IM0001", st.st_size, st.st_mtime_ns)])
        job = queue.jobs()[n]
        decisions.append(Decision(job, source, "failed", {"reason": "x"}))
    real_move = settle_mod.move

    def slow_move(src: Path, dst: Path, **options: Any) -> bool:
        time.sleep(0.2)  # as slow as a copy to another filesystem
        return real_move(src, dst, **options)

    monkeypatch.setattr(settle_mod, "move", slow_move)
    threads = [threading.Thread(target=settle_all, args=(queue, [d])) for d in decisions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    kept = sorted(p.read_bytes() for p in failed.iterdir() if not p.name.endswith(".json"))
    assert kept == [b"content of ct", b"content of mr"]
    assert len(list(failed.glob("*.error.json"))) == 2


# --------------------------------------------------------------------------- sidecars


def with_sidecars(job: Job, *paths: Path) -> Job:
    """The job as read with these sidecars, holding the text they have now."""
    entries = [[str(p), p.read_text()] for p in paths]
    return dataclasses.replace(job, sidecars=json.dumps(entries))


def test_a_folder_sidecar_is_copied_once_per_content_and_stays(
    source: Source, queue: Queue
) -> None:
    source = dataclasses.replace(source, sidecars=Sidecars())
    meta = source.watch / "cam/_metadata.yaml"
    for n in range(3):
        drop(source, queue, f"cam/img{n}.dcm")
    meta.write_text("PatientID: A\n")
    jobs = queue.jobs()
    read_with_a = [with_sidecars(job, meta) for job in jobs[:2]]
    meta.write_text("PatientID: B\n")  # the folder's metadata changed for the next file
    read_with_b = with_sidecars(jobs[2], meta)
    for job in [*read_with_a, read_with_b]:  # A's files settle after the change
        settle(queue, source, job, outcome="sent", error=None)
    copies = {p.name: p.read_text() for p in (source.sent / "cam").glob("_metadata*")}
    assert copies.pop("_metadata.yaml") == "PatientID: A\n"  # what A's files were read with
    [(name, text)] = copies.items()  # one copy per content, not one per file
    assert name.startswith("_metadata~") and text == "PatientID: B\n"
    assert meta.exists()  # more files may come: the watcher retires it later
    assert settle_mod.has_copy(meta, source.sent / "cam")


def test_a_per_file_sidecar_leaves_with_its_file_even_after_a_crash(
    source: Source, queue: Queue
) -> None:
    source = dataclasses.replace(source, sidecars=Sidecars())
    path = drop(source, queue, "a/img1.dcm")
    own = source.watch / "a/img1.json"
    own.write_text("{}")
    [job] = queue.jobs()
    job = with_sidecars(job, own)
    target = source.sent / "a/img1.dcm"
    queue.begin_settle([(job, "sent", str(target), None)])
    settle_mod.move(path, target)  # ... and the daemon was killed right here
    done, stuck = repair(queue, sources={"ct": source})
    assert (done, stuck) == (1, set())
    assert not own.exists(), "the sidecar would describe the next img1.dcm dropped"
    assert (source.sent / "a/img1.json").read_text() == "{}"


def test_a_sidecar_that_cannot_be_checked_stays_and_the_batch_settles(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = dataclasses.replace(source, sidecars=Sidecars())
    drop(source, queue, "a/x.dcm")
    drop(source, queue, "a/y.dcm")
    own = source.watch / "a/x.json"
    own.write_text("{}")

    def flaky(*_args: object, **_kw: object) -> bool:
        raise FileUnreadable("reading the folder failed: Input/output error")

    monkeypatch.setattr(sidecar_mod, "still_needed", flaky)
    jobs = queue.jobs()
    decisions = [
        Decision(with_sidecars(jobs[0], own), source, "sent"),
        Decision(jobs[1], source, "sent"),
    ]
    results = settle_all(queue, decisions)
    assert all(r.problem is None for r in results)
    assert queue.counts() == {"sent": 2}
    assert own.exists()


def test_a_file_and_its_own_sidecar_keep_one_name(source: Source, queue: Queue) -> None:
    source = dataclasses.replace(source, sidecars=Sidecars())
    (source.sent / "s").mkdir(parents=True)
    (source.sent / "s/img.json").write_text('{"PatientID": "A"}')  # A's image was removed
    drop(source, queue, "s/img.dcm")
    own = source.watch / "s/img.json"
    own.write_text('{"PatientID": "B"}')
    [job] = queue.jobs()
    target = settle(queue, source, with_sidecars(job, own), outcome="sent", error=None)
    assert target == source.sent / "s/img~1.dcm"
    assert (source.sent / "s/img~1.json").read_text() == '{"PatientID": "B"}'
    assert not own.exists()


def test_a_kept_source_is_never_touched_and_its_files_are_remembered(
    source: Source, queue: Queue
) -> None:
    """stowd migrate --keep: done without a move, no error file, a re-run skips it."""
    kept = dataclasses.replace(source, keep=True)
    good = drop(kept, queue, "P1/a.dcm", b"abc")
    bad = drop(kept, queue, "P1/b.dcm", b"def")
    ok, failed = queue.jobs()
    error = {"reason": "refused", "stage": "storing the file"}
    decisions = [Decision(ok, kept, "sent"), Decision(failed, kept, "failed", error)]
    results = settle_all(queue, decisions)
    assert [r.target for r in results] == [None, None]
    assert sorted(p.name for p in (source.watch / "P1").iterdir()) == ["a.dcm", "b.dcm"]
    assert not source.sent.exists() and not source.failed.exists()
    assert [(j.path, j.outcome) for j in queue.jobs("sent")] == [(str(good), "kept")]
    [gone] = queue.jobs("failed")
    assert (gone.path, gone.outcome, json.loads(gone.error or "{}")) == (str(bad), "kept", error)
    assert queue.settling() == []
    again = [NewFile("ct", "pacs", str(p), p.name, 3, p.stat().st_mtime_ns) for p in (good, bad)]
    assert queue.finished_before(again) == {str(good)}  # the failed one is tried again
    assert queue.finished_before([dataclasses.replace(again[0], size=4)]) == set()


def test_a_target_that_cannot_be_chosen_now_is_chosen_by_repair(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Choosing a free name needs to look into failed/ (Path.exists raises PermissionError
    when a folder there lost its x bit; patched, as root could look anyway): the outcome is
    recorded without a target, and the repair chooses it later, never overwriting."""
    path = drop(source, queue, "sub/z.dcm", b"new")
    [job] = queue.jobs()

    def blind(*_args: object) -> bool:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(settle_mod, "_taken", blind)
    with pytest.raises(PermissionError):
        settle(queue, source, job, outcome="failed", error={"reason": "r"})
    assert queue.counts() == {"settling": 1}
    assert repair(queue, only={job.id}, sources={"ct": source}) == (0, {job.id})
    monkeypatch.undo()
    (source.failed / "sub").mkdir(parents=True)
    (source.failed / "sub" / "z.dcm").write_bytes(b"old")
    assert repair(queue, only={job.id}, sources={"ct": source}) == (1, set())
    assert not path.exists()
    assert (source.failed / "sub" / "z.dcm").read_bytes() == b"old"
    assert (source.failed / "sub" / "z~1.dcm").read_bytes() == b"new"
    assert (source.failed / "sub" / "z~1.dcm.error.json").exists()
    assert queue.counts() == {"failed": 1}


def test_a_name_too_long_for_its_reason_file_still_settles(
    source: Source, queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    """A name of 245..255 characters leaves no room for ``.error.json``: the file moves
    anyway (its reason is in the queue and the log), instead of failing every time."""
    source.sent.mkdir(parents=True)
    source.failed.mkdir(parents=True)
    name = "x" * 248 + ".dcm"
    drop(source, queue, "a" + name)
    drop(source, queue, "b" + name)
    stored, bad = queue.jobs()
    assert settle(queue, source, stored, outcome="sent", error=None) == source.sent / ("a" + name)
    assert settle(queue, source, bad, outcome="failed", error={"reason": "r"}) == (
        source.failed / ("b" + name)
    )
    assert queue.counts() == {"sent": 1, "failed": 1}
    assert "name too long for its reason file" in caplog.text
    drop(source, queue, "c" + "x" * 236 + ".dcm")  # room for .error.json, not for a temp name
    [fits] = queue.jobs("pending")
    target = settle(queue, source, fits, outcome="failed", error={"reason": "r"})
    assert json.loads(Path(f"{target}.error.json").read_text()) == {"reason": "r"}


def test_a_batch_spread_over_many_folders_settles_within_the_open_files_limit(
    source: Source, queue: Queue
) -> None:
    """A batch keeps the folders it moves between open (one lookup per folder per batch),
    but only so many: a batch whose files each sit in a folder of their own (a study exported
    one file per folder, ``batch.max_files`` raised) still settles under the limit of open
    files a service gets (``ulimit -n``, 1024 by default under systemd), instead of failing
    its moves with "Too many open files"."""
    files = 100  # 200 folders (drop/ and sent/), far more than the limit set below allows
    for n in range(files):
        drop(source, queue, f"s{n}/x.dcm")
    decisions = [Decision(job, source, "sent") for job in queue.jobs()]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 96, hard))
    try:
        results = settle_all(queue, decisions)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [r.problem for r in results] == [None] * files
    assert {p.relative_to(source.sent).as_posix() for p in source.sent.rglob("*.dcm")} == {
        f"s{n}/x.dcm" for n in range(files)
    }
    assert queue.counts() == {"sent": files}


def test_a_repair_never_replaces_a_file_that_took_its_target_meanwhile(
    source: Source, queue: Queue
) -> None:
    """The move to ``sent/x.dcm`` was recorded, then the node stopped (crash, SIGSTOP, lost
    database) before it moved the file; meanwhile another file took that name (another node
    settling a file of the same name from another source into this shared ``sent/``).  The
    repair, by this node or by the one that took its rows over, keeps both files."""
    path = drop(source, queue, "x.dcm", b"ours")
    [job] = queue.jobs()
    target = source.sent / "x.dcm"
    queue.begin_settle([(job, "sent", str(target), None)])
    source.sent.mkdir(parents=True)
    target.write_bytes(b"theirs")  # moved there by another node meanwhile
    assert repair(queue, sources={"ct": source}) == (1, set())
    assert target.read_bytes() == b"theirs"
    assert (source.sent / "x~1.dcm").read_bytes() == b"ours"
    assert not path.exists()
    assert queue.counts() == {"sent": 1}
    assert [j.target for j in queue.jobs()] == [str(source.sent / "x~1.dcm")]


def test_a_move_whose_chosen_name_another_node_took_takes_another_name(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between choosing a free name in sent/ and moving into it, another node's move (a
    shared sent/) puts its file there: the move never replaces it; this node records another
    free name and moves there.  (The other node is played by the first name's chooser, which
    writes its file there at once.)"""
    path = drop(source, queue, "x.dcm", b"ours")
    [job] = queue.jobs()
    chosen: list[Path] = []

    def taken_at_once(*args: Any, **kwargs: Any) -> Path:
        target = free_target(*args, **kwargs)
        if not chosen:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"theirs")
        chosen.append(target)
        return target

    monkeypatch.setattr(settle_mod, "free_target", taken_at_once)
    target = settle(queue, source, job, outcome="sent", error=None)
    assert (source.sent / "x.dcm").read_bytes() == b"theirs"
    assert target == source.sent / "x~1.dcm"
    assert target.read_bytes() == b"ours"
    assert not path.exists()
    assert queue.counts() == {"sent": 1}
    assert [j.target for j in queue.jobs()] == [str(target)]


def test_a_file_put_back_without_a_hard_link_never_takes_a_name_the_modality_wrote_meanwhile(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that changed after it was read goes back to the drop folder.  Where no hard
    link can be made (another filesystem: played by an EXDEV for every link), it is copied
    back; a file the modality wrote under that name meanwhile is neither replaced nor taken
    for "the target was taken" (which recorded a false outcome): the next free name is."""
    path = drop(source, queue, "b.dcm", b"read")
    [job] = queue.jobs()
    target = source.sent / "b.dcm"
    target.parent.mkdir(parents=True)
    os.rename(path, target)
    with open(target, "ab") as changed:
        changed.write(b" and written to after it was read")

    real_move = settle_mod.move

    def written_meanwhile(src: Path, dst: Path, **kwargs: Any) -> bool:
        if not dst.exists() and dst == path:
            dst.write_bytes(b"the modality's new file")
        return real_move(src, dst, **kwargs)

    _across_filesystems(monkeypatch)
    monkeypatch.setattr(settle_mod, "move", written_meanwhile)
    back = settle_mod._put_back(job, target)
    assert path.read_bytes() == b"the modality's new file"
    assert back == source.watch / "b~1.dcm"
    assert back.read_bytes() == b"read and written to after it was read"
    assert not target.exists()


@pytest.mark.parametrize("left", [b"ours", b"theirs"], ids=["our-copy", "another-file"])
def test_a_move_across_filesystems_cut_short_before_the_unlink_is_finished_not_copied_twice(
    source: Source, queue: Queue, monkeypatch: pytest.MonkeyPatch, left: bytes
) -> None:
    """Across filesystems (played by EXDEV for the file's own link) a move copies, puts the
    copy in place, then unlinks the source.  A crash between the last two leaves the file
    in both places: the repair finds its copy at the recorded target and finishes (one file
    in sent/, not a second copy beside an untracked first).  Another file at that name
    stays, and ours takes the next free name."""
    path = drop(source, queue, "a.dcm", b"ours")
    [job] = queue.jobs()
    target = source.sent / "a.dcm"
    queue.begin_settle([(job, "sent", str(target), None)])
    target.parent.mkdir(parents=True)
    target.write_bytes(left)
    st = path.stat()  # a copy keeps its source's times (fileops.copy_to)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    _across_filesystems(monkeypatch)
    assert repair(queue, sources={"ct": source}) == (1, set())
    assert not path.exists()
    assert queue.counts() == {"sent": 1}
    names = sorted(p.name for p in source.sent.iterdir())
    if left == b"ours":
        assert names == ["a.dcm"]
        assert [j.target for j in queue.jobs()] == [str(target)]
    else:
        assert names == ["a.dcm", "a~1.dcm"]
        assert target.read_bytes() == b"theirs"
        assert (source.sent / "a~1.dcm").read_bytes() == b"ours"


def _across_filesystems(monkeypatch: pytest.MonkeyPatch) -> None:
    """Play a move across filesystems: a file's own link fails with EXDEV (so it is
    copied), but the copy's name is put in place as on one filesystem."""
    real_link = os.link

    def exdev(a: object, b: object, **folders: Any) -> None:
        if str(a).endswith(".stowd-tmp"):  # the copy's name put in place: one filesystem
            real_link(a, b, **folders)  # type: ignore[arg-type]
            return
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", exdev)

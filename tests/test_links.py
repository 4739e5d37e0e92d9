"""Issue 14: links make stowd a confused deputy; files stowd writes follow the umask.

Each test acts as a writer of the drop folder with fewer rights than stowd.  The tests run
as root, so "a folder the writer cannot read" is a folder outside the watch folder: stowd
must not read, upload, copy or write anything outside the folders it was configured with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from hostileserver import HostileArchive
from orthanc import Orthanc

from stowd import dropped
from stowd.config.model import Source
from stowd.errors import FileProblem, LinkRefused

DEAD_URL = "http://127.0.0.1:9/dicom-web"  # nothing listens: no file reaches an archive
SECRET = b"SECRET-7f3a9c-do-not-leak\n"  # what a file the writer cannot read holds
LINK_REASON = "the file is a symbolic link; stowd does not follow symbolic links"


def stored_sop_uids(orthanc: Orthanc) -> set[str]:
    uids = set()
    for instance in orthanc.get_json("/instances"):
        tags = orthanc.get_json(f"/instances/{instance}/simplified-tags")
        uids.add(tags["SOPInstanceUID"])
    return uids


def hex_of(data: bytes) -> str:
    """The first bytes as the old reasons quoted them: ``53 45 43 ...``."""
    return " ".join(f"{byte:02X}" for byte in data[:8])


def everything_written(layout: Layout, daemon: Stowd) -> bytes:
    """The bytes of every file stowd wrote: the queue (and beside it), sent/, failed/, log."""
    found = [daemon.log.encode()]
    for folder in (layout.root / "state", layout.root / "done", layout.drop):
        for path in folder.rglob("*") if folder.exists() else ():
            if path.is_file() and not path.is_symlink():
                found.append(path.read_bytes())
    return b"\n".join(found)


def test_a_link_to_a_dicom_file_outside_is_not_uploaded(tmp_path: Path, orthanc: Orthanc) -> None:
    """Was: the linked file (in a folder the writer cannot read) was uploaded."""
    secret_uid = make_instance(tmp_path / "private/other-ward.dcm", patient_id="OTHER")
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url)
    own_uid = make_instance(layout.drop / "own.dcm")
    (layout.drop / "link.dcm").symlink_to(tmp_path / "private/other-ward.dcm")
    with Stowd(layout) as daemon:
        wait_for(
            lambda: (
                "own.dcm" in layout.files(layout.sent)
                and not os.path.lexists(layout.drop / "link.dcm")
            ),
            90,
            "own.dcm in sent/, link.dcm settled",
            lambda: daemon.log,
        )
        wait_for(lambda: "link.dcm" in layout.error_files(), 30, "link.dcm's reason")
        assert daemon.terminate() == 0
    assert stored_sop_uids(orthanc) == {own_uid}
    assert secret_uid not in daemon.log
    moved = layout.failed / "link.dcm"
    assert moved.is_symlink(), "the link itself is moved, never its target"
    reason = json.loads(layout.error_files()["link.dcm"].read_text())["reason"]
    assert LINK_REASON in reason and "follow_links: true" in reason, reason
    assert (tmp_path / "private/other-ward.dcm").is_file()  # the target stays where it is


def test_a_link_to_a_private_file_never_puts_its_content_in_a_reason(tmp_path: Path) -> None:
    """Was: the reason quoted the first bytes (as hex) in .error.json, the log and status."""
    (tmp_path / "private").mkdir()
    (tmp_path / "private/key.txt").write_bytes(SECRET)
    layout = make_layout(tmp_path / "run", DEAD_URL)
    (layout.drop / "key.bin").symlink_to(tmp_path / "private/key.txt")
    (layout.drop / "notes.bin").write_bytes(SECRET)  # a file of no known type, not a link
    with Stowd(layout) as daemon:
        wait_for(
            lambda: {"key.bin", "notes.bin"} <= set(layout.error_files()),
            60,
            "both files in failed/ with their reasons",
            lambda: daemon.log,
        )
        status = run_cli("status", "-c", str(layout.config)).stdout
        assert daemon.terminate() == 0
    reasons = {
        name: json.loads(path.read_text())["reason"] for name, path in layout.error_files().items()
    }
    assert LINK_REASON in reasons["key.bin"], reasons
    assert "does not start like any type stowd knows" in reasons["notes.bin"], reasons
    for shown in [*reasons.values(), daemon.log, status]:
        assert hex_of(SECRET) not in shown
        assert hex_of(SECRET).replace(" ", "") not in shown.replace(" ", "").upper()
        assert SECRET.decode().strip() not in shown


def test_a_sidecar_linked_to_a_secret_is_never_read(tmp_path: Path) -> None:
    """Was: the link's target was read, stored in the queue and copied into failed/."""
    (tmp_path / "private").mkdir()
    (tmp_path / "private/credentials").write_bytes(SECRET)
    layout = make_layout(tmp_path / "run", DEAD_URL, source={"sidecars": True})
    make_instance(layout.drop / "scan/img.dcm")
    (layout.drop / "scan/img.json").symlink_to(tmp_path / "private/credentials")
    make_instance(layout.drop / "env/img.dcm")
    (layout.drop / "env/_metadata.yaml").symlink_to("/proc/self/environ")
    with Stowd(layout, env={"STOWD_TEST_SECRET": SECRET.decode().strip()}) as daemon:
        wait_for(
            lambda: {"scan/img.dcm", "env/img.dcm"} <= set(layout.error_files()),
            60,
            "both files in failed/ with their reasons",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    written = everything_written(layout, daemon)
    assert SECRET.strip() not in written  # not in the queue, failed/, or the log
    assert b"STOWD_TEST_SECRET" not in written  # nor the daemon's environment
    errors = layout.error_files()
    scan = json.loads(errors["scan/img.dcm"].read_text())["reason"]
    assert "sidecar img.json: is a symbolic link" in scan, scan
    env = json.loads(errors["env/img.dcm"].read_text())["reason"]
    assert "sidecar _metadata.yaml: is a symbolic link" in env, env


def test_sent_replaced_by_a_link_is_never_written_through(tmp_path: Path, orthanc: Orthanc) -> None:
    """Was: with sent/ inside the watch folder replaced by a link, stowd moved new files
    into the folder it pointed to."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, source={"sent": "./drop/sent"})
    sent = layout.drop / "sent"
    make_instance(layout.drop / "a/first.dcm", instance_number=1)
    with Stowd(layout) as daemon:
        wait_for((sent / "a/first.dcm").is_file, 60, "first.dcm in sent/")
        sent.rename(tmp_path / "old-sent")
        sent.symlink_to(outside, target_is_directory=True)
        make_instance(layout.drop / "a/second.dcm", instance_number=2)
        wait_for(
            lambda: "the folder sent (below" in daemon.log or any(outside.rglob("*")),
            60,
            "the refused move reported",
            lambda: daemon.log,
        )
        assert list(outside.rglob("*")) == []
        assert "is a symbolic link; stowd never moves or writes a file through a link" in (
            daemon.log
        )
        assert (layout.drop / "a/second.dcm").is_file()  # it stays in the drop folder
        sent.unlink()
        sent.mkdir()
        wait_for(
            (sent / "a/second.dcm").is_file,
            90,
            "second.dcm moved once sent/ is a real folder again",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    assert list(outside.rglob("*")) == []
    assert not (layout.drop / "a/second.dcm").exists()


def test_follow_links_true_sends_a_link_to_a_file_outside(tmp_path: Path, orthanc: Orthanc) -> None:
    linked_uid = make_instance(tmp_path / "elsewhere/shared.dcm")
    layout = make_layout(tmp_path / "run", orthanc.dicomweb_url, source={"follow_links": True})
    (layout.drop / "link.dcm").symlink_to(tmp_path / "elsewhere/shared.dcm")
    with Stowd(layout) as daemon:
        wait_for(lambda: layout.files(layout.sent) == {"link.dcm"}, 60, "link.dcm in sent/")
        assert daemon.terminate() == 0
    assert stored_sop_uids(orthanc) == {linked_uid}
    assert (layout.sent / "link.dcm").is_symlink()


# -- modes -------------------------------------------------------------------------------------
@pytest.fixture
def umask_000() -> Iterator[None]:
    """The daemon started inside inherits umask 000 (the widest a site could set)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_files_stowd_writes_have_explicit_modes_whatever_the_umask(
    tmp_path: Path, umask_000: None
) -> None:
    """Was: queue.db 0644, spool copies 0644 in a 0755 folder, .error.json and sidecar
    copies 0644 for dropped files of 0600 (with umask 022; wider still with 000)."""
    rules = [{"name": "ward", "match": {"type": "dicom"}, "set": {"InstitutionName": "W"}}]
    with HostileArchive("trickle") as archive:  # holds the upload: the spool copy stays
        layout = make_layout(tmp_path / "run", archive.base, rules=rules, source={"sidecars": True})
        make_instance(layout.drop / "ok/a.dcm")
        (layout.drop / "bad").mkdir()
        (layout.drop / "bad/b.bin").write_bytes(b"\x00\x01 not any known type")
        (layout.drop / "bad/b.json").write_text('{"NoSuchKeyword": 1}')
        for path in (layout.drop / "ok/a.dcm", layout.drop / "bad/b.bin"):
            path.chmod(0o600)
        (layout.drop / "bad/b.json").chmod(0o644)
        layout.root.chmod(0o750)  # sent/ and failed/ are made by stowd in here
        spool = layout.root / "state/queue.db.spool"
        with Stowd(layout) as daemon:
            wait_for(
                lambda: spool.is_dir() and any(spool.glob("*.dcm")),
                60,
                "a spool copy being sent",
                lambda: daemon.log,
            )
            modes = {p.name: mode_of(p) for p in spool.iterdir()}
            wait_for(lambda: "bad/b.bin" in layout.error_files(), 60, "b.bin in failed/")
            state = {p.name: mode_of(p) for p in (layout.root / "state").iterdir()}
    assert all(mode == 0o600 for mode in modes.values()), oct_all(modes)
    assert state.pop("queue.db.spool") == 0o700
    assert {"queue.db", "queue.db-wal", "queue.db-shm", "queue.db.lock"} <= set(state)
    assert all(mode == 0o600 for mode in state.values()), oct_all(state)
    failed = layout.failed / "bad"
    assert mode_of(failed / "b.bin") == 0o600
    assert mode_of(failed / "b.bin.error.json") == 0o600
    assert mode_of(failed / "b.json") == 0o600  # the copy of its sidecar: no wider either
    for made in (layout.failed.parent, layout.failed, failed):  # like the folder made in
        assert mode_of(made) == 0o750, (made, oct(mode_of(made)))


def oct_all(modes: dict[str, int]) -> dict[str, str]:
    return {name: oct(mode) for name, mode in modes.items()}


# -- a link planted after the file was checked ---------------------------------------------------
def test_every_read_of_a_dropped_file_refuses_a_link_planted_since(tmp_path: Path) -> None:
    """The daemon tests above plant links before the file is read; a writer may also swap
    the file, or a folder on its path, for a link between the check and a later read (the
    upload, the spool copy): each read opens the path one name at a time, never a link."""
    watch = tmp_path / "drop"
    (watch / "a").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    (tmp_path / "private/x.dcm").write_bytes(SECRET)
    dropped.configure([Source("links", watch, tmp_path / "s", tmp_path / "f", "pacs")])
    path = watch / "a/x.dcm"
    path.write_bytes(b"the dropped content")
    with dropped.open_file(path) as fp:
        assert fp.read() == b"the dropped content"
    path.unlink()
    path.symlink_to(tmp_path / "private/x.dcm")
    with pytest.raises(LinkRefused, match="the file is a symbolic link"):
        dropped.open_file(path)
    path.unlink()
    (watch / "a").rmdir()
    (watch / "a").symlink_to(tmp_path / "private", target_is_directory=True)
    with pytest.raises(LinkRefused, match="the folder a on its path is a symbolic link"):
        dropped.open_file(path)


def test_a_link_that_loops_or_leads_nowhere_hides_no_other_file(tmp_path: Path) -> None:
    """A writer plants ``loop.dcm -> loop.dcm`` (checking it raises ELOOP) and a link to
    nothing among 40 files.  Was: the error of the looping link ended the listing of its
    folder, in every scan, so the files listed after it were never queued, and the link to
    nothing was left in the drop folder, unmentioned.  Both links now go to failed/ with
    the reason for links, and every file is sent."""
    with HostileArchive("ok") as archive:
        layout = make_layout(tmp_path / "run", archive.base)
        for n in range(20):
            make_instance(layout.drop / f"before{n:02}.dcm")
        (layout.drop / "loop.dcm").symlink_to("loop.dcm")
        (layout.drop / "gone.dcm").symlink_to(tmp_path / "nothing-here.dcm")
        for n in range(20):
            make_instance(layout.drop / f"after{n:02}.dcm")
        with Stowd(layout) as daemon:
            wait_for(
                lambda: (
                    len(layout.files(layout.sent)) == 40
                    and {"loop.dcm", "gone.dcm"} <= set(layout.error_files())
                ),
                120,
                "40 files sent and both links in failed/",
                lambda: daemon.log,
            )
            assert daemon.terminate() == 0
    for name in ("loop.dcm", "gone.dcm"):
        reason = json.loads(layout.error_files()[name].read_text())["reason"]
        assert LINK_REASON in reason, reason
    assert layout.files(layout.drop) == set()


@pytest.mark.parametrize("spelling", ["a/x.dcm", "a/./x.dcm", "a//x.dcm", "b/../a/x.dcm"])
def test_every_spelling_of_a_dropped_path_is_walked_the_same(tmp_path: Path, spelling: str) -> None:
    """A normal path (the watcher's) is cut at the watch folder; any other spelling goes
    through relpath as before (issue 19): each opens the file, and refuses the link."""
    watch = tmp_path / "drop"
    (watch / "a").mkdir(parents=True)
    (watch / "b").mkdir()
    (tmp_path / "private").mkdir()
    (tmp_path / "private/x.dcm").write_bytes(SECRET)
    dropped.configure([Source("spellings", watch, tmp_path / "s", tmp_path / "f", "pacs")])
    (watch / "a/x.dcm").write_bytes(b"the dropped content")
    path = f"{watch}/{spelling}"
    with dropped.open_file(path) as fp:
        assert fp.read() == b"the dropped content"
    (watch / "a/x.dcm").unlink()
    (watch / "a/x.dcm").symlink_to(tmp_path / "private/x.dcm")
    with pytest.raises(LinkRefused, match="the file is a symbolic link"):
        dropped.open_file(path)
    (watch / "a/x.dcm").unlink()
    (watch / "a").rmdir()
    (watch / "a").symlink_to(tmp_path / "private", target_is_directory=True)
    with pytest.raises(LinkRefused, match="the folder a on its path is a symbolic link"):
        dropped.open_file(path)


def test_a_path_that_climbs_out_of_its_watch_folder_is_never_opened(tmp_path: Path) -> None:
    """``drop/../private/x.dcm`` starts with the watch folder but names a file outside it.
    Was: relpath made it ``../private/x.dcm`` and the walk opened ``..`` from the watch
    folder, so the private file was read.  The watcher hands on only normal paths; any
    path that would leave the folder is now refused before a name is opened."""
    watch = tmp_path / "drop"
    watch.mkdir()
    (tmp_path / "private").mkdir()
    (tmp_path / "private/x.dcm").write_bytes(SECRET)
    dropped.configure([Source("climb", watch, tmp_path / "s", tmp_path / "f", "pacs")])
    with pytest.raises(FileProblem, match="leaves its watch folder"):
        dropped.open_file(f"{watch}/../private/x.dcm")


def test_a_file_is_opened_from_the_innermost_guarded_watch_folder_holding_it(
    tmp_path: Path,
) -> None:
    """Watch folders inside one another: a file is opened from the innermost guarded one
    (which may itself be a configured link), and a folder that follows links guards
    nothing (issue 19: the guarded folders are a snapshot, longest first)."""
    outer = tmp_path / "drop"
    outer.mkdir()
    (tmp_path / "elsewhere").mkdir()
    inner = outer / "ward"  # configured as it is: a link to a folder elsewhere
    inner.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere/x.dcm").write_bytes(b"the dropped content")
    sources = [
        Source("outer", outer, tmp_path / "s1", tmp_path / "f1", "pacs"),
        Source("inner", inner, tmp_path / "s2", tmp_path / "f2", "pacs"),
    ]
    dropped.configure(sources)
    with dropped.open_file(inner / "x.dcm") as fp:
        assert fp.read() == b"the dropped content"
    dropped.configure([dataclasses.replace(sources[1], follow_links=True)])
    with pytest.raises(LinkRefused, match="the folder ward on its path is a symbolic link"):
        dropped.open_file(inner / "x.dcm")  # the outer one guards it

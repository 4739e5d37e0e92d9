"""Reading what a file is from its header, and refusing what cannot be sent."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
import pytest
from dicomgen import make_instance_bytes
from pydicom.data import get_testdata_file

from stowd import dropped
from stowd.config.model import Source
from stowd.errors import (
    FileIncomplete,
    FileProblem,
    FileUnreadable,
    FileVanished,
    LinkRefused,
)
from stowd.pipeline import classify as classify_mod
from stowd.pipeline.classify import classify


def sample(name: str, tmp_path: Path) -> Path:
    src = get_testdata_file(name)
    assert isinstance(src, str)
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"])
def test_part10_files_give_their_uids(name: str, tmp_path: Path) -> None:
    path = sample(name, tmp_path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    c = classify(str(path))
    assert (c.kind, c.study_uid, c.sop_uid, c.sop_class) == (
        "dicom",
        ds.StudyInstanceUID,
        ds.SOPInstanceUID,
        ds.SOPClassUID,
    )


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm"])
def test_truncated_pixel_data_is_refused(name: str, tmp_path: Path) -> None:
    path = sample(name, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    with pytest.raises(FileProblem, match="truncated"):
        classify(str(path))


def test_a_file_without_preamble_is_accepted(tmp_path: Path) -> None:
    path = sample("CT_small.dcm", tmp_path)
    path.write_bytes(path.read_bytes()[132:])
    assert classify(str(path)).kind == "dicom"


def test_empty_garbage_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"this is not DICOM at all\n" * 20)
    with pytest.raises(FileProblem, match="empty"):
        classify(str(empty))
    with pytest.raises(FileProblem, match="not a DICOM file"):
        classify(str(garbage))
    with pytest.raises(FileVanished):
        classify(str(tmp_path / "nope.dcm"))


def test_missing_study_uid_is_named(tmp_path: Path) -> None:
    path = sample("CT_small.dcm", tmp_path)
    ds = pydicom.dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(path)
    with pytest.raises(FileProblem, match="no StudyInstanceUID"):
        classify(str(path))


def test_dicomdir_is_not_sent(tmp_path: Path) -> None:
    path = sample("DICOMDIR", tmp_path)
    with pytest.raises(FileProblem, match="DICOMDIR"):
        classify(str(path))


def damaged_meta(path: Path) -> Path:
    """A Part-10 file whose (0002,0002) carries an unknown VR: pydicom raises
    NotImplementedError, not one of its usual errors (found by fuzzing)."""
    data, _uid = make_instance_bytes(extra={"SOPClassUID": None})  # read from the meta then
    at = data.find(b"\x02\x00\x02\x00UI")
    path.write_bytes(data[: at + 4] + b"\x55\xc6" + data[at + 6 :])
    return path


def test_any_parse_error_of_a_damaged_header_is_a_file_problem(tmp_path: Path) -> None:
    with pytest.raises(FileProblem, match="damaged"):
        classify(str(damaged_meta(tmp_path / "odd.dcm")))


def test_a_file_stowd_may_not_read_is_unreadable_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sample("CT_small.dcm", tmp_path)

    def denied(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(FileUnreadable, match="permission denied"):
        classify(str(path))


@pytest.mark.parametrize("pad", [60_000, 65_400, 65_536, 70_000, 300_000])
def test_headers_longer_than_the_in_memory_copy_are_read_from_the_file(
    pad: int, tmp_path: Path
) -> None:
    """A header ending before, across or after the first 64 KiB (parsed from memory, else
    from the file) gives the same keys, and a cut pixel data is still found after it."""
    ds = pydicom.dcmread(sample("CT_small.dcm", tmp_path))
    del ds[0xFFFCFFFC]  # its trailing padding: cutting the file must cut the pixel data
    ds.add_new(0x00090010, "LO", "STOWD TEST")
    ds.add_new(0x00091010, "OB", b"\x00" * pad)  # a private value before the pixel data
    path = tmp_path / "long-header.dcm"
    ds.save_as(path)
    c = classify(str(path))
    assert (c.study_uid, c.sop_uid) == (ds.StudyInstanceUID, ds.SOPInstanceUID)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the pixel data cut short
    with pytest.raises(FileProblem, match="truncated"):
        classify(str(path))


def cut_before_pixel_data(tmp_path: Path) -> Path:
    path = sample("CT_small.dcm", tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\xe0\x7f\x10\x00")])  # (7FE0,0010) PixelData
    return path


def test_an_image_header_without_its_pixel_data_waits_for_the_rest(tmp_path: Path) -> None:
    with pytest.raises(FileIncomplete, match="describes an image of 128 x 128 pixels"):
        classify(str(cut_before_pixel_data(tmp_path)))


def test_the_image_is_described_only_when_its_pixel_data_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Describing the image converts Rows and Columns: work for every file that is only
    needed for one whose pixel data is missing (issue 19: CPU per file)."""
    asked: list[str] = []
    real = classify_mod._image_description

    def describe(ds: pydicom.Dataset) -> str | None:
        asked.append(str(ds.SOPInstanceUID))
        return real(ds)

    monkeypatch.setattr(classify_mod, "_image_description", describe)
    classify(str(sample("CT_small.dcm", tmp_path)))
    assert asked == []
    with pytest.raises(FileIncomplete):
        cut = tmp_path / "cut"
        cut.mkdir()
        classify(str(cut_before_pixel_data(cut)))
    assert len(asked) == 1


class _Trickle(io.FileIO):
    """A file whose every read gives at most 1,000 bytes, as a network filesystem's read may
    (the reader of new files reads a file unbuffered: each read one system call)."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(1000 if size is None or size < 0 else min(size, 1000))


def _as_read(path: Path, opened: Callable[[str], BinaryIO]) -> tuple[object, ...]:
    try:
        with opened(str(path)) as fp:
            c = classify_mod._classify_dicom(fp, path.stat().st_size)
    except FileProblem as problem:
        return (type(problem).__name__, str(problem))
    return (c.kind, c.study_uid, c.sop_uid, c.sop_class)


def test_short_reads_of_an_unbuffered_file_classify_as_whole_reads_do(tmp_path: Path) -> None:
    """Each read of the head, of the file beyond it (a header longer than 64 KiB, the
    fragments of compressed pixel data) and pydicom's own are made whole again: a short
    read is never taken for the end of the file (issue 19: classify reads unbuffered)."""
    files = [sample(name, tmp_path) for name in ("CT_small.dcm", "JPEG2000.dcm")]
    ds = pydicom.dcmread(sample("CT_small.dcm", tmp_path))
    ds.add_new(0x00090010, "LO", "STOWD TEST")
    ds.add_new(0x00091010, "OB", b"\x00" * 70_000)  # a header longer than the first 64 KiB
    ds.save_as(tmp_path / "long-header.dcm")
    files.append(tmp_path / "long-header.dcm")
    big = tmp_path / "big.dcm"
    big.write_bytes(make_instance_bytes(size_bytes=200_000)[0])
    files.append(big)
    for path in list(files):
        cut = tmp_path / f"cut-{path.name}"
        cut.write_bytes(path.read_bytes()[:-100])
        files.append(cut)
    for path in files:
        whole = _as_read(path, lambda p: cast(BinaryIO, open(p, "rb")))  # noqa: SIM115 - _as_read closes it
        assert _as_read(path, lambda p: cast(BinaryIO, _Trickle(p))) == whole, path.name
        assert whole[0] in ("dicom", "FileIncomplete"), path.name


def _read_of_fifo(path: Path) -> tuple[str, str] | None:
    """classify of the FIFO ``path``: the refusal it gave, or None when it still waited
    after ``FIFO_WAIT`` seconds (its writing end is then opened and closed, so that the
    waiting read ends and no thread is left behind)."""
    said: list[tuple[str, str]] = []

    def read() -> None:
        try:
            classify(str(path))
        except FileProblem as problem:
            said.append((type(problem).__name__, str(problem)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(FIFO_WAIT)
    if reader.is_alive():  # waiting in open() for a writer: let it go on
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(FIFO_WAIT)
        return None
    return said[0] if said else ("read", "")


FIFO_WAIT = 30.0  # a FIFO opened without waiting answers at once; this bounds the test only


@pytest.mark.parametrize("follow_links", [False, True])
def test_a_fifo_named_dcm_is_refused_at_once_whether_links_are_followed_or_not(
    follow_links: bool, tmp_path: Path
) -> None:
    """A writer may put a FIFO where a file was, between the watcher's check (a regular
    file) and the read.  Beneath a guarded watch folder the FIFO is opened without waiting
    for a writer, and refused as empty; in a folder that follows links it was opened with a
    plain ``open``, which waits for a writer forever: the reader of new files (and every
    file queued behind it) stopped for good."""
    watch = tmp_path / "drop"
    watch.mkdir()
    source = Source("fifo", watch, tmp_path / "s", tmp_path / "f", "pacs")
    dropped.configure([dataclasses.replace(source, follow_links=follow_links)])
    path = watch / "swapped.dcm"
    os.mkfifo(path)
    assert _read_of_fifo(path) == ("FileProblem", "the file is empty (0 bytes)")


def _long_header(path: Path, letter: str) -> str:
    """A file at ``path`` whose header is longer than the first 64 KiB: a TextValue (UT)
    larger than ``DEFER`` (read from the file only when asked for); that value."""
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    ds.TextValue = letter * (classify_mod.DEFER + 1000)
    ds.save_as(path)
    return str(ds.TextValue)


@pytest.mark.parametrize("follow_links", [False, True])
def test_a_large_value_of_a_long_header_is_read_from_its_file_when_asked_for(
    follow_links: bool, tmp_path: Path
) -> None:
    """A header longer than the first 64 KiB is parsed from the file, its values larger than
    ``DEFER`` read from it only when asked for (a rule matching on one).  Beneath a guarded
    watch folder (follow_links false, the default) the file was named by its descriptor,
    closed by then: reading the value raised, and the rule's file went to failed/ as
    damaged.  It is opened again by its name, and never through a link put there since."""
    watch = tmp_path / "drop"
    watch.mkdir()
    source = Source("long", watch, tmp_path / "s", tmp_path / "f", "pacs")
    dropped.configure([dataclasses.replace(source, follow_links=follow_links)])
    value = _long_header(watch / "long.dcm", "x")
    found = classify(str(watch / "long.dcm"))
    assert found.header is not None
    assert not found.held.in_memory()
    assert found.header.TextValue == value
    if follow_links:
        return  # a link is followed there, as any other read of the file follows it
    swapped = watch / "swapped.dcm"
    _long_header(swapped, "x")
    found = classify(str(swapped))
    mtime = os.stat(swapped).st_mtime_ns
    swapped.unlink()
    other = tmp_path / "other.dcm"
    _long_header(other, "y")
    swapped.symlink_to(other)  # a file like it, of another value
    os.utime(other, ns=(mtime, mtime))  # as pydicom checks it: the same time as when read
    assert found.header is not None
    with pytest.raises(LinkRefused):
        _ = found.header.TextValue

"""Batching: one study, within the file and byte limits, never empty."""

from __future__ import annotations

from stowd.config import BatchLimits, Destination
from stowd.group import take_batch
from stowd.queue import Job


def job(n: int, size: int) -> Job:
    return Job(n, "s", "d", f"/p/{n}", f"{n}", size, 0, "dicom", "1.2", f"sop{n}", 0, None)


def test_cut_by_file_count() -> None:
    jobs = [job(n, 10) for n in range(7)]
    assert [j.id for j in take_batch(jobs, BatchLimits(max_files=3, max_bytes=10**9))] == [0, 1, 2]


def test_cut_by_bytes() -> None:
    jobs = [job(n, 40) for n in range(5)]
    assert len(take_batch(jobs, BatchLimits(max_files=50, max_bytes=100))) == 2


def test_a_file_larger_than_the_byte_limit_goes_alone() -> None:
    jobs = [job(0, 500), job(1, 10)]
    assert [j.id for j in take_batch(jobs, BatchLimits(max_files=50, max_bytes=100))] == [0]


def test_nothing_in_nothing_out() -> None:
    assert take_batch([], BatchLimits()) == []


def test_display_url_hides_a_password() -> None:
    dest = Destination("pacs", "https://user:s3cret@pacs.example:8443/dicom-web")
    assert "s3cret" not in dest.display_url
    assert dest.display_url == "https://user:***@pacs.example:8443/dicom-web"
    assert Destination("p", "http://h/dw").display_url == "http://h/dw"

"""Generated DICOM files read back as intended; the shipped sample files are found offline."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import dicomgen
import pydicom
import pytest
from dicomgen import (
    make_instance,
    make_study,
    pydicom_sample_files,
    write_empty,
    write_garbage,
    write_truncated,
    write_without_study_uid,
)
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian


def has_part10_marker(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def test_make_instance_writes_a_valid_part10_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "one.dcm"
    uid = make_instance(path, patient_id="PX", instance_number=7)

    assert has_part10_marker(path)
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == uid
    assert UID(uid).is_valid
    assert ds.file_meta.MediaStorageSOPInstanceUID == uid
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert UID(ds.StudyInstanceUID).is_valid
    assert UID(ds.SeriesInstanceUID).is_valid
    assert len({ds.StudyInstanceUID, ds.SeriesInstanceUID, uid}) == 3
    assert ds.PatientID == "PX"
    assert ds.InstanceNumber == 7
    assert (ds.Rows, ds.Columns) == (16, 16)
    assert len(ds.PixelData) == 16 * 16


def test_make_instance_uses_given_uids_and_extra(tmp_path: Path) -> None:
    study, series, sop = "1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6"
    uid = make_instance(
        tmp_path / "a.dcm",
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        extra={"Modality": "CT", "PatientName": None, "AccessionNumber": "ACC1"},
    )
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert uid == sop
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (study, series, sop)
    assert ds.Modality == "CT"
    assert ds.AccessionNumber == "ACC1"
    assert "PatientName" not in ds


def test_generated_uids_are_unique(tmp_path: Path) -> None:
    uids = {make_instance(tmp_path / f"{i}.dcm") for i in range(20)}
    assert len(uids) == 20


@pytest.mark.parametrize("size", [4 * 1024, 512 * 1024, 3 * 1024 * 1024])
def test_size_bytes_pads_the_file_to_about_that_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "big.dcm"
    make_instance(path, size_bytes=size)
    actual = path.stat().st_size
    assert size * 0.98 <= actual <= size
    ds = pydicom.dcmread(path)
    assert len(ds.PixelData) == ds.Rows * ds.Columns


def test_make_study_writes_n_instances_of_one_study(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", 5, series=2, patient_id="P9")
    assert [p.name for p, _ in files] == [f"IM{i:05d}.dcm" for i in range(1, 6)]
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p, _ in files]
    assert [ds.SOPInstanceUID for ds in datasets] == [uid for _, uid in files]
    assert len({uid for _, uid in files}) == 5
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 2
    assert {ds.PatientID for ds in datasets} == {"P9"}
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3, 4, 5]


def test_make_study_keeps_a_given_study_uid(tmp_path: Path) -> None:
    files = make_study(tmp_path, 2, study_uid="1.2.3.99", prefix="X")
    assert [p.name for p, _ in files] == ["X00001.dcm", "X00002.dcm"]
    assert {pydicom.dcmread(p).StudyInstanceUID for p, _ in files} == {"1.2.3.99"}


def test_truncated_file_is_cut_inside_its_pixel_data(tmp_path: Path) -> None:
    full, cut = tmp_path / "full.dcm", tmp_path / "cut.dcm"
    same: dict[str, Any] = {"study_uid": "1.2.3.5", "series_uid": "1.2.3.6", "sop_uid": "1.2.3.7"}
    make_instance(full, size_bytes=64 * 1024, **same)
    uid = write_truncated(cut, size_bytes=64 * 1024, **same)

    assert uid == "1.2.3.7"
    assert 0 < cut.stat().st_size < full.stat().st_size
    assert cut.read_bytes() == full.read_bytes()[: cut.stat().st_size]
    header = pydicom.dcmread(cut, stop_before_pixels=True)
    assert header.SOPInstanceUID == uid
    # pydicom does not raise on it: the pixel value just comes back short.
    ds = pydicom.dcmread(cut)
    assert 0 < len(ds.PixelData) < ds.Rows * ds.Columns


def test_garbage_and_empty_files_are_not_dicom(tmp_path: Path) -> None:
    garbage = write_garbage(tmp_path / "garbage.dcm")
    empty = write_empty(tmp_path / "empty.dcm")
    assert garbage.stat().st_size == 4096
    assert not has_part10_marker(garbage)
    assert empty.stat().st_size == 0
    for path in (garbage, empty):
        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(path)


def test_file_without_study_uid(tmp_path: Path) -> None:
    path = tmp_path / "nostudy.dcm"
    uid = write_without_study_uid(path, patient_id="P2")
    ds = pydicom.dcmread(path)
    assert "StudyInstanceUID" not in ds
    assert ds.SOPInstanceUID == uid
    assert ds.PatientID == "P2"
    assert has_part10_marker(path)


def test_command_line_writes_a_study_and_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dicomgen.main(["study", str(tmp_path / "s"), "-n", "3"]) == 0
    assert dicomgen.main(["garbage", str(tmp_path / "junk.dcm")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "IM00001.dcm",
        "IM00002.dcm",
        "IM00003.dcm",
    ]
    assert not has_part10_marker(tmp_path / "junk.dcm")


def test_pydicom_sample_files_are_usable_instances() -> None:
    files = pydicom_sample_files()
    assert len(files) > 100
    assert len(set(files)) == len(files)
    for path in files:
        assert path.is_file()
        assert has_part10_marker(path)
    # Files from pydicom-data (package data_store) are found too.
    assert any("data_store" in path.parts for path in files)
    # Spot-check the content criteria on a few of them.
    for path in files[:: max(1, len(files) // 10)]:
        with warnings.catch_warnings():  # some shipped files have odd values
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID
        assert ds.SOPInstanceUID
        assert "TransferSyntaxUID" in ds.file_meta


def test_pydicom_sample_files_never_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> Path:
        raise AssertionError("pydicom_sample_files tried to download")

    monkeypatch.setattr("pydicom.data.data_manager.data_path_with_download", no_network)
    monkeypatch.setattr("pydicom.data.download.data_path_with_download", no_network)
    dicomgen._pydicom_sample_files.cache_clear()
    assert len(pydicom_sample_files()) > 100

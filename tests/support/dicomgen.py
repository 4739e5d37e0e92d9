"""Generated DICOM test files: valid Part-10 instances, studies, and deliberately bad files.

Every valid file is a Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7), explicit VR little
endian, with a 128-byte preamble and a File Meta group, MONOCHROME2 8-bit pixel data (16x16 by
default, or padded to about ``size_bytes``).  The real Orthanc STOW-RS stores them.

Also usable from the shell (the quick-start demo does)::

    python tests/support/dicomgen.py study OUT_DIR -n 5 [--size-bytes 524288] [--patient-id P1]
    python tests/support/dicomgen.py garbage|empty|truncated|no-study-uid FILE
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import data_manager
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

StrPath = str | os.PathLike[str]

DEFAULT_ROWS = 16
DEFAULT_COLUMNS = 16
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_PIXEL_ELEMENT_HEADER = 12  # tag (4) + VR "OB" (2) + reserved (2) + 32-bit length (4)
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


def _pixel_bytes(length: int, seed: int) -> bytes:
    """*length* bytes of a cheap, seed-dependent ramp (fast even for megabytes)."""
    pattern = bytes((i + seed) & 0xFF for i in range(256))
    repeats = length // len(pattern) + 1
    return (pattern * repeats)[:length]


def _build_dataset(
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    patient_id: str,
    instance_number: int,
    rows: int,
    columns: int,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "stowd test study"
    ds.SeriesDescription = "stowd test series"
    ds.PatientName = f"Test^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_instance_bytes(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "P1",
    instance_number: int = 1,
    size_bytes: int | None = None,
    rows: int = DEFAULT_ROWS,
    columns: int = DEFAULT_COLUMNS,
    extra: Mapping[str, Any] | None = None,
) -> tuple[bytes, str]:
    """Encode one instance in memory; return ``(part10_bytes, sop_instance_uid)``.

    See ``make_instance`` for the parameters.
    """
    sop_uid = sop_uid or generate_uid()
    ds = _build_dataset(
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        sop_uid=sop_uid,
        patient_id=patient_id,
        instance_number=instance_number,
        rows=rows,
        columns=columns,
    )
    for keyword, value in (extra or {}).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if size_bytes is not None:
        header = len(_encode(ds))
        wanted = max(size_bytes - header - _PIXEL_ELEMENT_HEADER, 4)
        columns = max(2, math.isqrt(wanted) & ~1)  # even, so rows * columns is even
        rows = max(1, wanted // columns)
        ds.Rows = rows
        ds.Columns = columns
    else:
        rows, columns = int(ds.Rows), int(ds.Columns)
    length = rows * columns
    ds.PixelData = _pixel_bytes(length + (length & 1), instance_number)
    ds["PixelData"].VR = "OB"
    return _encode(ds), sop_uid


def make_instance(
    path: StrPath,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "P1",
    instance_number: int = 1,
    size_bytes: int | None = None,
    rows: int = DEFAULT_ROWS,
    columns: int = DEFAULT_COLUMNS,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write one valid Part-10 Secondary Capture file at *path*; return its SOPInstanceUID.

    UIDs not given are generated.  *size_bytes* grows the pixel data so the whole file is about
    that many bytes (within a few hundred).  *extra* sets more attributes by keyword after the
    defaults (``{"Modality": "CT"}``); a value of None removes that attribute.  Missing parent
    folders are created.
    """
    data, uid = make_instance_bytes(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        patient_id=patient_id,
        instance_number=instance_number,
        size_bytes=size_bytes,
        rows=rows,
        columns=columns,
        extra=extra,
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return uid


def make_study(
    folder: StrPath,
    n: int,
    *,
    study_uid: str | None = None,
    patient_id: str = "P1",
    series: int = 1,
    size_bytes: int | None = None,
    prefix: str = "IM",
    extra: Mapping[str, Any] | None = None,
) -> list[tuple[Path, str]]:
    """Write *n* instances of one study into *folder* (created if missing).

    Files are named ``{prefix}00001.dcm`` ... and spread round-robin over *series* series.
    Returns ``[(path, sop_instance_uid), ...]`` in file-name order.
    """
    if n < 0 or series < 1:
        raise ValueError("n must be >= 0 and series >= 1")
    study_uid = study_uid or generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    for index in range(n):
        path = out / f"{prefix}{index + 1:05d}.dcm"
        uid = make_instance(
            path,
            study_uid=study_uid,
            series_uid=series_uids[index % series],
            patient_id=patient_id,
            instance_number=index + 1,
            size_bytes=size_bytes,
            extra=extra,
        )
        written.append((path, uid))
    return written


# -- bad files ---------------------------------------------------------------------------------


def write_garbage(path: StrPath, size: int = 4096) -> Path:
    """Write *size* bytes that are not DICOM (no preamble/DICM marker, no valid elements)."""
    line = b"this is not a DICOM file, just some text the daemon has to reject\n"
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((line * (size // len(line) + 1))[:size])
    return target


def write_empty(path: StrPath) -> Path:
    """Write a zero-byte file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"")
    return target


def write_truncated(path: StrPath, **kwargs: Any) -> str:
    """Write a valid instance cut in the middle of its pixel data; return its SOPInstanceUID.

    The header (and so the UIDs) reads fine with ``stop_before_pixels=True``; reading the
    pixel data fails.  *kwargs* go to ``make_instance_bytes``.
    """
    data, uid = make_instance_bytes(**kwargs)
    element = data.rfind(_PIXEL_DATA_TAG)
    if element < 0:
        raise AssertionError("generated file has no pixel data element")
    value_start = element + _PIXEL_ELEMENT_HEADER
    cut = value_start + (len(data) - value_start) // 2
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[:cut])
    return uid


def write_without_study_uid(path: StrPath, **kwargs: Any) -> str:
    """Write an otherwise valid instance that lacks StudyInstanceUID; return its SOP UID."""
    extra = dict(kwargs.pop("extra", None) or {})
    extra["StudyInstanceUID"] = None
    return make_instance(path, extra=extra, **kwargs)


# -- the files pydicom ships -------------------------------------------------------------------


def _sample_candidates() -> list[Path]:
    """Files of pydicom's own test data and of pydicom-data, without any download.

    ``pydicom.data.get_testdata_files()`` is not used: it also fetches every file of its URL
    map that is not cached, i.e. it goes to the network.
    """
    local = Path(data_manager.DATA_ROOT) / "test_files"
    candidates = sorted(local.glob("**/*"))
    for source in data_manager.external_data_sources().values():
        # Sources search their own folders (pydicom-data: data_store/data); no download.
        candidates.extend(sorted(Path(p) for p in source.get_paths("**/*", 0)))
    found: dict[Path, None] = {}
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix not in {".py", ".pyc", ".json"}:
            found[candidate.resolve()] = None
    return list(found)


def _is_usable_sample(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            return False
        with warnings.catch_warnings():
            # Shipped files may hold odd values; pydicom validates them lazily on access.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            meta = getattr(ds, "file_meta", None)
            if meta is None or "TransferSyntaxUID" not in meta:
                return False
            if meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
                return False
            return bool(ds.get("StudyInstanceUID")) and bool(ds.get("SOPInstanceUID"))
    except Exception:
        return False


@functools.cache
def _pydicom_sample_files() -> tuple[Path, ...]:
    return tuple(path for path in _sample_candidates() if _is_usable_sample(path))


def pydicom_sample_files() -> list[Path]:
    """Local DICOM files shipped by pydicom and pydicom-data that are usable instances.

    Kept: Part-10 files (preamble + ``DICM``) with a File Meta group that pydicom reads with
    ``stop_before_pixels=True`` and that carry StudyInstanceUID and SOPInstanceUID (DICOMDIRs
    are left out).  Some share a SOPInstanceUID (one image in several transfer syntaxes) and a
    few have broken pixel data that Orthanc refuses.  Never downloads anything.
    """
    return list(_pydicom_sample_files())


def pydicom_all_files() -> list[Path]:
    """Every local file of pydicom's and pydicom-data's test data: DICOM or not, good or bad."""
    return _sample_candidates()


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write generated DICOM test files.")
    commands = parser.add_subparsers(dest="command", required=True)
    study = commands.add_parser("study", help="write one study of N instances into a folder")
    study.add_argument("folder")
    study.add_argument("-n", "--count", type=int, default=5)
    study.add_argument("--size-bytes", type=int, default=None)
    study.add_argument("--patient-id", default="P1")
    study.add_argument("--series", type=int, default=1)
    study.add_argument("--prefix", default="IM")
    for name in ("garbage", "empty", "truncated", "no-study-uid"):
        commands.add_parser(name, help=f"write one {name} file").add_argument("file")
    args = parser.parse_args(argv)

    if args.command == "study":
        files = make_study(
            args.folder,
            args.count,
            patient_id=args.patient_id,
            series=args.series,
            size_bytes=args.size_bytes,
            prefix=args.prefix,
        )
        for path, uid in files:
            print(f"{path}\t{uid}")
    elif args.command == "garbage":
        print(write_garbage(args.file))
    elif args.command == "empty":
        print(write_empty(args.file))
    elif args.command == "truncated":
        print(f"{args.file}\t{write_truncated(args.file)}")
    else:
        print(f"{args.file}\t{write_without_study_uid(args.file)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

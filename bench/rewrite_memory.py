"""Peak memory and speed of ``stowd.rewrite`` on one very large multi-frame file.

Usage:  .venv/bin/python bench/rewrite_memory.py --size 1GiB [--dir DIR]

Writes a 16-bit MONOCHROME2 512x512 multi-frame file of at least ``--size`` bytes (streamed,
never held in memory), rewrites it in a child process with a rule that sets PatientID,
InstitutionName and a non-ASCII PatientName (recorded in the Original Attributes Sequence),
then prints sizes, time, throughput, the child's peak RSS, and whether the bytes from the
pixel data element to the end are the same in both files (compared by streaming SHA-256).
Figures, not assertions; the temporary files are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

from stowd.config.yamlwalk import parse_size  # noqa: E402
from stowd.media.rewrite import apply, rewrite  # noqa: E402
from stowd.pipeline.classify import classify  # noqa: E402

CHUNK = 1024 * 1024
ROWS = COLUMNS = 512
FRAME = ROWS * COLUMNS * 2  # 16 bits allocated
MAX_NATIVE = 0xFFFFFFFE  # a native Pixel Data element has a 32-bit even length
WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")  # Multi-frame Grayscale Word Secondary Capture
PIXEL_TAG = b"\xe0\x7f\x10\x00"
RULE = {"PatientID": "BENCH-2", "InstitutionName": "Klinikum Süd", "PatientName": "Müller^Jörg"}


def header(frames: int) -> bytes:
    """Preamble, File Meta and every attribute of the file up to (without) the pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WORD_SC
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = WORD_SC, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Large", "BENCH-1", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def big_multiframe(path: Path, size: int) -> int:
    """Write a file of at least ``size`` bytes; return the offset of its pixel data tag."""
    frames = max(1, -(-size // FRAME))
    length = frames * FRAME
    if length > MAX_NATIVE:
        raise SystemExit(f"--size too large: native pixel data holds at most {MAX_NATIVE} bytes")
    head = header(frames)
    noise = os.urandom(CHUNK)  # one random MiB, repeated: incompressible, cheap to make
    with open(path, "wb") as fp:
        fp.write(head + PIXEL_TAG + b"OW\0\0" + struct.pack("<I", length))
        for start in range(0, length, CHUNK):
            fp.write(noise[: min(CHUNK, length - start)])
    return len(head)


def tail_digest(path: Path, start: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        fp.seek(start)
        while chunk := fp.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def child(src: Path, dst: Path) -> int:
    """Run in the child: rewrite once, print seconds, output size and VmHWM as JSON."""
    started = time.monotonic()
    written = rewrite(src, dst, lambda ds: apply(ds, RULE, (), record_original=True))
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "size": written, "vmhwm_kib": peak_rss_kib()}))
    return 0


def check(src: Path, dst: Path, src_tail: int) -> tuple[bool, int]:
    """Same tail bytes (streamed SHA-256) at the matching offsets; the output reads back."""
    dst_tail = dst.stat().st_size - (src.stat().st_size - src_tail)
    with open(dst, "rb") as fp:
        fp.seek(dst_tail)
        at_tag = fp.read(4) == PIXEL_TAG
    same = at_tag and tail_digest(src, src_tail) == tail_digest(dst, dst_tail)
    out = pydicom.dcmread(dst, stop_before_pixels=True)
    classify(str(dst))  # the pixel data length matches the file (not truncated)
    read_back = all(str(out[k].value) == v for k, v in RULE.items())
    return same and read_back and len(out.OriginalAttributesSequence) == 1, dst_tail


def measure(folder: Path, size: int) -> None:
    src, dst = folder / "big.dcm", folder / "big-out.dcm"
    src_tail = big_multiframe(src, size)
    classify(str(src))  # a valid file for stowd, pixel data complete
    pydicom.dcmread(src, stop_before_pixels=True)
    cmd = [sys.executable, __file__, "--child", str(src), str(dst)]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
    ru_maxrss = _children_maxrss_kib()
    same, dst_tail = check(src, dst, src_tail)
    total = src.stat().st_size
    print(f"input file:   {total} bytes ({total / 2**30:.2f} GiB), pixel data at {src_tail}")
    print(f"output file:  {result['size']} bytes, pixel data at {dst_tail}")
    print(f"rewrite:      {result['seconds']:.2f} s, {total / result['seconds'] / 1e6:.0f} MB/s")
    print(
        f"child peak RSS: {result['vmhwm_kib'] / 1024:.1f} MB (VmHWM), "
        f"{ru_maxrss / 1024:.1f} MB (ru_maxrss)"
    )
    print(f"tail identical (SHA-256 from the pixel data tag to EOF) and header read back: {same}")


def _children_maxrss_kib() -> int:
    import resource  # noqa: PLC0415 - POSIX only, needed only here

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--dir", default=None, help="where the temporary files go")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), Path(args.child[1]))
    with tempfile.TemporaryDirectory(prefix="stowd-rewrite-", dir=args.dir) as tmp:
        measure(Path(tmp), parse_size(args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())

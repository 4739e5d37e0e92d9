"""Real bulkdata files for end-to-end tests: JPEG and PNG (Pillow), PDF (written by hand),
MPEG-2 and H.264 MP4 (Debian's ffmpeg, which ``.ci/run`` installs; missing under ``CI=true``
is a failure, not a skip).

Also a command line for the quick start: ``python tests/support/mediagen.py jpeg|pdf|png FILE``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from PIL import Image

FFMPEG = "/usr/bin/ffmpeg"


def make_jpeg(path: Path, size: tuple[int, int] = (320, 240), seed: int = 0) -> bytes:
    """A baseline JPEG photo (4:2:0) with some structure, written to ``path``."""
    image = Image.new("RGB", size)
    image.putdata(
        [((x * 7 + seed) % 256, (y * 5) % 256, (x + y + seed * 3) % 256) for y in range(size[1])
         for x in range(size[0])]
    )  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return _write(path, buffer.getvalue())


def make_png(path: Path, size: tuple[int, int] = (64, 48)) -> bytes:
    image = Image.new("RGB", size, (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return _write(path, buffer.getvalue())


def make_pdf(path: Path, text: str = "stowd test page", padding: int = 0) -> bytes:
    """A small valid one-page PDF; ``padding`` adds a comment of that many bytes."""
    stream = f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    if padding:
        out += b"%" + b"x" * padding + b"\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer << /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return _write(path, bytes(out))


def require_ffmpeg() -> str:
    require_tool(Path(FFMPEG))
    return shutil.which("ffmpeg", path="/usr/bin") or FFMPEG


def make_video(path: Path, codec: str, *, seconds: float = 1.0, size: str = "320x240") -> bytes:
    """An MPEG-2 (``codec="mpeg2"``) or H.264 MP4 (``codec="h264"``) test clip."""
    ffmpeg = require_ffmpeg()
    source = ["-f", "lavfi", "-i", f"testsrc=duration={seconds}:size={size}:rate=25"]
    options = {
        "mpeg2": ["-c:v", "mpeg2video", "-f", "mpeg"],
        "h264": ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-profile:v", "high", "-f", "mp4"],
    }[codec]
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([ffmpeg, "-v", "error", "-y", *source, *options, str(path)], check=True)
    return path.read_bytes()


def _write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


DCIODVFY = Path("/usr/bin/dciodvfy")


def require_tool(tool: Path) -> None:
    """Skip without ``tool`` (fail under ``CI=true``: CI installs it and must never skip)."""
    import pytest  # noqa: PLC0415 - the quick start runs this file without pytest installed

    if tool.exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {tool} is not installed", pytrace=False)
    pytest.skip(f"{tool} is not installed")


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for the DICOM file ``path``."""
    require_tool(DCIODVFY)
    done = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a generated photo or document.")
    parser.add_argument("kind", choices=("jpeg", "pdf", "png"))
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    makers: dict[str, Callable[[Path], bytes]] = {
        "jpeg": make_jpeg,
        "pdf": make_pdf,
        "png": make_png,
    }
    makers[args.kind](args.file)
    print(args.file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

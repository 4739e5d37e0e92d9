"""A destination's rate cap (``max_rate``, issue 20) measured where the bytes arrive.

Usage:  .venv/bin/python bench/ratecap.py [--caps 40Mbit/s,200Mbit/s] [--seconds 60]
                                          [--workers 4] [--files 8]

For each cap: ``stowd run`` with ``max_rate`` set to it and ``workers`` senders sends
``files`` DICOM files (sparse: no disk used) holding together ``seconds`` of the cap, to the
discarding endpoint (bench/discard.py, its own process).  The endpoint notes when body bytes
arrive; the measured rate is the body bytes over the time from the first to the last, printed
next to the cap, with the lowest and highest whole second in between.  Figures, not
assertions (tests/test_ratecap.py asserts the bounds).
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import count_files, discard_process, stowd_env, write_config
from dicomgen import make_instance_bytes

from stowd.config.yamlwalk import parse_rate

PIXEL_DATA = b"\xe0\x7f\x10\x00"


def sparse_dicom(path: Path, size: int) -> None:
    """A Part-10 file of about ``size`` bytes whose PixelData (OB) is a sparse hole of zeros."""
    data, _ = make_instance_bytes(rows=1, columns=1)
    head = data[: data.rfind(PIXEL_DATA)]
    pixels = size - len(head) - 12
    pixels -= pixels % 2
    with open(path, "wb") as fp:
        fp.write(head + PIXEL_DATA + b"OB\x00\x00" + struct.pack("<I", pixels))
        fp.truncate(len(head) + 12 + pixels)


def measure(cap: str, seconds: float, workers: int, files: int) -> dict[str, Any]:
    """Send ``seconds`` of ``cap`` in ``files`` files; the endpoint's report."""
    rate = parse_rate(cap)
    with tempfile.TemporaryDirectory(prefix="stowd-ratecap-") as tmp:
        folder = Path(tmp)
        (folder / "drop").mkdir()
        for n in range(files):
            sparse_dicom(folder / "drop" / f"IM{n:03d}.dcm", int(rate * seconds / files))
        with discard_process() as endpoint:
            dest = {"url": endpoint.url, "workers": workers, "max_rate": cap}
            path = write_config(folder, dest)
            proc = subprocess.Popen(
                [sys.executable, "-m", "stowd", "run", "-c", str(path)], env=stowd_env()
            )
            deadline = time.monotonic() + 3 * seconds + 60
            while count_files(folder / "sent") < files and time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"stowd exited with {proc.returncode}")
                time.sleep(0.2)
            proc.terminate()
            proc.wait(60)
        sent = count_files(folder / "sent")
    return {"rate": rate, "sent": sent, **endpoint.report}


def show(cap: str, got: dict[str, Any], files: int) -> None:
    span = got["last"] - got["first"]
    measured = got["bytes"] / span
    whole = got["per_second"][:-1]  # the last second is cut short
    low, high = (min(whole), max(whole)) if whole else (0, 0)
    print(
        f"cap {cap:>10} = {got['rate'] / 1e6:7.3f} MB/s: measured {measured / 1e6:7.3f} MB/s "
        f"({measured / got['rate']:.3f} of the cap) over {span:.1f} s, "
        f"{got['bytes'] / 1e6:.0f} MB; whole seconds {low / 1e6:.3f}-{high / 1e6:.3f} MB; "
        f"{got['sent']}/{files} files sent"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", default="40Mbit/s,200Mbit/s", help="comma-separated rates")
    parser.add_argument("--seconds", type=float, default=60.0, help="of upload per cap")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()
    for cap in args.caps.split(","):
        show(cap, measure(cap, args.seconds, args.workers, args.files), args.files)
    return 0


if __name__ == "__main__":
    sys.exit(main())

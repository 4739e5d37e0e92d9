"""The command line as a shell uses it: output piped into a reader that stops early."""

import os
import subprocess
import sys
from pathlib import Path

from harness import make_watch_folders

MINIMAL = """\
queue: {root}/queue.db
destinations:
  pacs: {{url: "http://127.0.0.1:9/dicom-web"}}
sources:
  - {{name: ct, watch: {root}/drop, sent: {root}/sent, failed: {root}/failed, destination: pacs}}
"""


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """``stowd check-config | head -1``: head exits after one line and stowd's next write
    meets a closed pipe. That ends stowd quietly, as SIGPIPE ends a C tool (exit 141), not
    with a BrokenPipeError traceback on the terminal."""
    config = tmp_path / "stowd.yaml"
    config.write_text(MINIMAL.format(root=tmp_path))
    make_watch_folders(config)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before stowd writes its first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stowd", "check-config", "-c", str(config)],
            check=False,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 141, done.stderr

"""Issue 18: each docs/scenario-*.md page's "Try it" path, run exactly as written.

The shell blocks a page marks with ``<!-- try-it -->`` are joined in their order into one bash
script (a reader types them into one shell, so variables carry from block to block) and run
under ``set -euo pipefail`` in a scratch folder, with ``REPO`` naming this checkout (the one
thing the page asks the reader to set).  The pages check their own promises as they go (a
``grep`` on Orthanc's counts fails the script when the count is wrong, every wait is bounded
by ``timeout``); this test then checks what each page says is left on disk.  The block a page
marks ``<!-- config -->`` (its production config) must load as it is written.

The whole script runs in its own process group with a time limit; whatever it started (stowd,
Orthanc) is stopped with the group afterwards, pass or fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_orthanc
from needs import require

from stowd.config.load import load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGE_LIMIT = 240.0  # seconds for one page's whole path; each takes 15-40 s on a busy machine
STOP_LIMIT = 45.0  # what the page left running gets this long after SIGTERM (stowd: 30 s)


def marked_blocks(page: Path, mark: str, language: str) -> list[str]:
    """The fenced blocks of ``language`` that directly follow a ``<!-- mark -->`` line."""
    text = page.read_text(encoding="utf-8")
    pattern = rf"^<!-- {mark} -->\n```{language}\n(.*?)^```$"
    return re.findall(pattern, text, flags=re.MULTILINE | re.DOTALL)


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    require(f"not installed here: {', '.join(missing)}" if missing else None)


def run_page(name: str, scratch: Path) -> str:
    """Run the page's try-it blocks in ``scratch``; return their output (stdout and stderr)."""
    blocks = marked_blocks(DOCS / name, "try-it", "sh")
    assert len(blocks) >= 3, f"{name}: expected its try-it blocks, found {len(blocks)}"
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = dict(os.environ, REPO=str(ROOT))  # the page puts $REPO/.venv/bin on PATH itself
    env.pop("CREDENTIALS_DIRECTORY", None)
    output = scratch / "try-it.log"
    with output.open("wb") as handle:
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code: int | None = process.wait(timeout=PAGE_LIMIT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_group(process.pid)
            process.wait()
    text = output.read_text(encoding="utf-8", errors="replace")
    assert code is not None, f"{name}: not done within {PAGE_LIMIT:.0f} s:\n{text[-6000:]}"
    assert code == 0, f"{name}: the try-it script stopped with exit code {code}:\n{text[-6000:]}"
    return text


def stop_group(group: int) -> None:
    """SIGTERM to what is left of the process group, SIGKILL after ``STOP_LIMIT``."""
    for sig, limit in ((signal.SIGTERM, STOP_LIMIT), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def files_below(folder: Path, pattern: str = "*") -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(pattern) if p.is_file())


@pytest.mark.parametrize(
    "name",
    [
        "scenario-modality-gateway.md",
        "scenario-capture-station.md",
        "scenario-overnight-migration.md",
    ],
)
def test_the_production_config_of_each_scenario_loads(name: str, tmp_path: Path) -> None:
    blocks = marked_blocks(DOCS / name, "config", "yaml")
    assert len(blocks) == 1, f"{name}: expected one block marked config, found {len(blocks)}"
    path = tmp_path / "config.yaml"
    path.write_text(blocks[0], encoding="utf-8")
    config = load_config(path, watch_exists=False)  # its folders are the deployment's
    assert config.sources and config.destinations


def test_the_modality_gateway_page_as_written(tmp_path: Path) -> None:
    require_orthanc()
    require_tools("storescu", "echoscu")
    output = run_page("scenario-modality-gateway.md", tmp_path)
    run = tmp_path / "try-gateway"
    assert "Received Echo Response (Status: 0x0000 - Success)" in output
    assert output.count("Received Store Response (Status: 0x0000 - Success)") == 4
    assert "Association Rejected" in output
    assert len(files_below(run / "done/modalities/sent", "*.dcm")) == 4
    assert files_below(run / "done/us1/sent") == [f"exam1/IM0000{i}.dcm" for i in (1, 2, 3)]
    assert files_below(run / "drop/us1") == []
    assert not (run / "done/modalities/failed").exists()
    assert "rejected: that calling AE title is not allowed" in (run / "stowd.log").read_text()


def test_the_capture_station_page_as_written(tmp_path: Path) -> None:
    require_orthanc()
    require_tools("dcmodify", "ffmpeg")
    output = run_page("scenario-capture-station.md", tmp_path)
    run = tmp_path / "try-capture"
    assert files_below(run / "done/photos/sent") == [
        "A2026-0815/IMG_0001.jpg",
        "A2026-0815/IMG_0002.jpg",
        "A2026-0815/clip.mp4",
    ]
    assert files_below(run / "done/scans/sent") == [
        "CS2/_metadata.yaml",
        "CS2/referral.pdf",
        "visit-7/_metadata.yaml",  # written after it failed, then put back with stowd retry
        "visit-7/letter.pdf",
    ]
    assert files_below(run / "done/scans/failed") == []
    assert "{sidecar.PatientID} has no value: the file has no sidecar" in output
    assert files_below(run / "drop/photos") == ["A2026-0999/IMG_0003.jpg"]  # waits for its order
    assert "no study with AccessionNumber A2026-0999 in pacs yet" in output
    (study,) = json.loads((run / "A2026-0815.json").read_text())  # the PACS's QIDO-RS answer
    assert study["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]  # the archive's patient
    assert study["00201206"]["Value"] == [3]  # the CT, the photos, the clip: one series each
    assert study["00201208"]["Value"] == [4]
    assert "Scanned documents" in output


def test_the_overnight_migration_page_as_written(tmp_path: Path) -> None:
    require_orthanc()
    output = run_page("scenario-overnight-migration.md", tmp_path)
    run = tmp_path / "try-migration"
    assert "give the migration a queue of its own with --queue PATH" in output
    assert "stay queued; run the same command again to go on" in output
    assert "60 stored file(s) listed by the archive when asked (QIDO-RS)" in output
    report = (run / "ct-failed.csv").read_text().splitlines()
    assert report[0] == "path,reason,http_status,stage"
    assert sorted(line.split(",")[0].rsplit("/", 1)[1] for line in report[1:]) == [
        "cut.dcm",
        "notes.dcm",
    ]
    assert len(files_below(run / "old-nas/ct", "*.dcm")) == 62  # --keep: nothing moved
    assert len(files_below(run / "old-nas/mr.sent", "*.dcm")) == 5
    assert files_below(run / "old-nas/mr") == []

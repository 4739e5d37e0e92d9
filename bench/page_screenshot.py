"""The screenshot of the status page in docs/ (issue 21): the page during a ``stowd migrate``.

Usage (from the repository root, after ``bash .ci/run``; needs Orthanc with its DICOMweb
plugin, and Debian's ``chromium`` and ``chromium-driver``)::

    .venv/bin/python bench/page_screenshot.py                      # docs/status-page.png
    .venv/bin/python bench/page_screenshot.py --minutes 1 --out /tmp/page.png

Starts a fresh local Orthanc behind the link emulator (``bench/linkproxy.py``, default
``--rate 12Mbit``, 10 ms each way: a migration over a modest link, so that it lasts), makes
a folder of studies to migrate (``--files`` instances of ``--size`` in ``--studies`` study
folders, plus a few files that fail: one that is not DICOM, one cut short), and runs
``stowd migrate --keep`` on it with ``http.listen`` set.  After ``--minutes`` of sending (the
charts then hold that many minutes), a headless Chromium (tests/support/browser.py) opens
the page, lets it refresh once, and saves a screenshot of the whole page; then the
migration is interrupted (a re-run would finish it) and everything is removed.
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from benchlib import ROOT, link_process, stowd_env
from browser import WINDOW, browser_missing_reason, headless_chromium
from dicomgen import write_garbage, write_truncated
from orthanc import Orthanc, free_port
from selenium.webdriver import Chrome
from throughput import generate

from stowd.config.yamlwalk import parse_size

PAGE_TIMEOUT = 120.0  # seconds the migration may take to say where its page is
SERVED = "its status page is at "
REFRESH_TIMEOUT = 60.0


def folder_to_migrate(top: Path, args: argparse.Namespace) -> Path:
    """Study folders of generated instances, and two files that fail among them."""
    folder = top / "old-pacs-export"
    generate(folder, args.files, parse_size(args.size), args.studies, prefix="study")
    write_garbage(folder / "study000" / "scanner-notes.dcm")
    write_truncated(folder / "study001" / "cut-short.dcm")
    return folder


def write_config(top: Path, url: str, port: int) -> Path:
    """A config with one destination, the page on a loopback port, and a daemon's source
    (empty: the daemon is stopped while the migration runs on the same queue)."""
    (top / "drop").mkdir()
    config = {
        "queue": "./state/queue.db",
        "log_level": "WARNING",
        "sources": [
            {
                "name": "ct1",
                "watch": "./drop",
                "sent": "./done/sent",
                "failed": "./done/failed",
                "destination": "pacs",
            }
        ],
        "destinations": {"pacs": {"url": url, "workers": 2}},
        "http": {"listen": f"127.0.0.1:{port}"},
    }
    path = top / "stowd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_served(log: Path, proc: subprocess.Popen[bytes]) -> str:
    """The page's URL, once the migration printed it."""
    deadline = time.monotonic() + PAGE_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace") if log.exists() else ""
        if SERVED in text:
            return text.split(SERVED, 1)[1].split()[0]
        time.sleep(0.2)
    raise RuntimeError(f"stowd migrate did not serve its page (exit code {proc.poll()})")


def screenshot(url: str, out: Path) -> None:
    """The whole page, after one refresh of its own (charts drawn, tables fresh), taken
    through the DevTools protocol beyond the window's height (WebDriver's own screenshot
    is the window only)."""
    with headless_chromium() as driver:
        driver.get(url)
        _wait_refresh(driver)
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": size["height"], "scale": 1}
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))


def _wait_refresh(driver: Chrome) -> None:
    script = "return document.getElementById('updated').textContent"
    seen = driver.execute_script(script)
    deadline = time.monotonic() + REFRESH_TIMEOUT
    while driver.execute_script(script) == seen:
        if time.monotonic() > deadline:
            raise RuntimeError("the page did not refresh itself")
        time.sleep(0.2)


def run(args: argparse.Namespace, top: Path) -> None:
    orthanc = Orthanc(top / "orthanc")
    orthanc.start()
    try:
        options = ["--rate", args.rate, "--delay", "10ms"]
        with link_process(orthanc.dicomweb_url, *options) as link:
            config = write_config(top, link.url, free_port())
            folder = folder_to_migrate(top, args)
            migrate(config, folder, args, top / "migrate.log")
    finally:
        orthanc.kill()


def migrate(config: Path, folder: Path, args: argparse.Namespace, log_path: Path) -> None:
    command = [sys.executable, "-m", "stowd", "migrate", "-c", str(config)]
    command += ["--destination", "pacs", "--keep", "--progress-every", "30", str(folder)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stderr=log, stdout=log, env=stowd_env(), cwd=ROOT)
    try:
        url = wait_served(log_path, proc)
        print(f"migrating; the page is at {url}; waiting {args.minutes} min", flush=True)
        time.sleep(args.minutes * 60)
        if proc.poll() is not None:
            raise RuntimeError("the migration ended before the screenshot: use more --files")
        screenshot(url, args.out)
        print(f"wrote {args.out}")
    finally:
        proc.terminate()
        proc.wait(120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=3000, help="instances to migrate (3000)")
    parser.add_argument("--size", default="256KiB", help="size of each (256KiB)")
    parser.add_argument("--studies", type=int, default=30, help="study folders (30)")
    parser.add_argument("--rate", default="12Mbit", help="the link's rate (12Mbit)")
    parser.add_argument("--minutes", type=float, default=3.0, help="sending before the shot (3)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "status-page.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = browser_missing_reason()
    if missing:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="stowd-page-shot-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real headless browser for the status page's tests: Debian's ``chromium`` driven by
Selenium through Debian's ``chromedriver`` (packages ``chromium`` and ``chromium-driver``).

``with headless_chromium() as driver:`` starts one (a fresh profile in a temp folder) and
always quits it, which stops chromedriver and the browser's processes.  ``javascript=False``
turns scripts off for the whole browser, as a locked-down workstation would: what the page
shows then is what it serves as plain HTML.

Nothing is ever downloaded.  Selenium's own driver manager (Selenium Manager, a binary in the
wheel that fetches a Chrome for Testing and its driver from the internet) runs only when no
driver path is given, so the ``Service`` is always given ``/usr/bin/chromedriver``; on top of
that the environment says ``SE_OFFLINE=true`` (its documented offline switch) and
``SE_MANAGER_PATH=/bin/false``, so that a later Selenium which ran it anyway would fail at
once instead of reaching the network.  Chromium's own background traffic (component
updates, field trials, safe browsing lists) is switched off by its flags below.

Every wait is bounded: page loads and scripts time out after ``TIMEOUT`` seconds, and the
tests poll the page with ``harness.wait_for``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIMEOUT = 60.0
"""Seconds a page load or a script may take (a busy 2-core machine; a hang fails, not waits)."""
WINDOW = (1280, 1000)

# Selenium Manager must never run; these make sure of it even if Selenium changed its mind.
NO_DOWNLOADS = {"SE_OFFLINE": "true", "SE_MANAGER_PATH": "/bin/false"}

_FLAGS = (
    "--headless=new",
    "--disable-gpu",
    "--disable-dev-shm-usage",  # /dev/shm is small in containers
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
    "--no-default-browser-check",
    "--safebrowsing-disable-auto-update",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
)


def browser_missing_reason() -> str | None:
    """Why no headless browser can run here, or None when Chromium and its driver are there."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian package {package})"
    return None


@contextmanager
def headless_chromium(*, javascript: bool = True) -> Iterator[webdriver.Chrome]:
    """A started headless Chromium (scripts on or off), quit when the block ends."""
    profile = Path(tempfile.mkdtemp(prefix="stowd-chromium-"))
    try:
        with _environment(NO_DOWNLOADS):
            driver = webdriver.Chrome(
                service=Service(executable_path=str(CHROMEDRIVER)),
                options=_options(profile, javascript),
            )
        try:
            driver.set_page_load_timeout(TIMEOUT)
            driver.set_script_timeout(TIMEOUT)
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment for the block, as they were after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _options(profile: Path, javascript: bool) -> Options:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in _FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    return options

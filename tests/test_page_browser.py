"""The status page in a real headless browser (issue 21): Debian's chromium, driven by
Selenium through Debian's chromedriver (``tests/support/browser.py``), looking at a real
``stowd run`` that sends to a real Orthanc.

- during a run, the figures on the page are those of ``stowd status --json`` (and of
  ``/api/status``), at a moment with files waiting and in flight (a proxy holds Orthanc's
  answers back) and after every file settled; the page refreshes itself meanwhile, never
  reloaded;
- a destination that becomes held shows as held within one refresh, and as sending again
  once the archive is back;
- a failed file whose folder and file names hold markup and a newline appears as text
  (escaped as ``stowd status`` escapes it), with and without the page's script, and nothing
  of the names becomes an element of the page;
- without JavaScript the page is plain tables with the same figures, the history as a table,
  and the failures filter works as a plain form (``?reason=``);
- everything the page loads comes from stowd (no other origin), and the browser's console
  has no error (nothing the page's own Content Security Policy blocked).

Every wait is bounded (``wait_for``); a refresh is seen as a change of ``#updated``, which
each of the page's refreshes replaces.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from browser import CHROMEDRIVER, CHROMIUM
from dicomgen import make_instance, write_garbage, write_truncated
from harness import Layout, make_layout, serving_page, wait_for
from orthanc import Orthanc
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from statuspage import failure_rows, page_rows, status_json, updated
from stowproxy import StowProxy

from stowd.printable import escape

REFRESHED = 60.0  # seconds a refresh of the page (every 5 s) may take on a busy machine
SETTLED = 120.0  # seconds a few files may take to reach sent/ or failed/
HOSTILE_FOLDER = "<i>study&amp;"
HOSTILE_FILE = "<script>window.owned=1<\n>\"'.dcm"
MARK = "window.stowdTestMark = 'still the same page'"  # gone if the page is ever reloaded
MARKED = "return window.stowdTestMark === 'still the same page'"


# -- helpers --------------------------------------------------------------------------------------
def layout_for(tmp_path: Path, url: str, **destination: object) -> Layout:
    dest = {"url": url, "workers": 2, "timeouts": {"read": "300s"}, **destination}
    return make_layout(tmp_path / "stowd", url, destinations={"pacs": dest})


def drop_study(layout: Layout, folder: str, files: int) -> None:
    for n in range(files):
        make_instance(layout.drop / folder / f"IM{n}.dcm")


def settled(layout: Layout, sent: int, failed: int) -> Callable[[], bool]:
    def done() -> bool:
        return len(layout.files(layout.sent)) == sent and len(layout.files(layout.failed)) == failed

    return done


def source_figures(doc: dict[str, Any], name: str = "ct1") -> dict[str, str]:
    """What the page's row of a source must show, from a ``status --json`` document."""
    figures = doc["by_source"][name]
    counts = figures["counts"]
    return {
        "waiting": str(counts["pending"] + counts["waiting"]),
        "in_flight": str(counts["claimed"] + counts["settling"]),
        "sent_today": str(figures["sent_today"]),
        "failed_today": str(figures["failed_today"]),
        "rate": f"{figures['files_per_minute']} files/min, {figures['mb_per_minute']} MB/min",
    }


def shown_figures(driver: WebDriver, name: str = "ct1") -> dict[str, str]:
    row = page_rows(driver, "sources", "data-source")[name]
    return {
        field: row[field]
        for field in ("waiting", "in_flight", "sent_today", "failed_today", "rate")
    }


def page_matches_status(driver: WebDriver, layout: Layout, api: str) -> Callable[[], bool]:
    """True once the page, ``/api/status`` and ``stowd status --json`` agree, each read between
    two ``status --json`` that agree with each other (the queue did not move meanwhile)."""

    def agree() -> bool:
        before = source_figures(status_json(layout))
        page = shown_figures(driver)
        served = source_figures(httpx.get(api, timeout=30).json())
        after = source_figures(status_json(layout))
        return before == after == page == served

    return agree


def requests_match(driver: WebDriver, layout: Layout) -> Callable[[], bool]:
    """True once the destination's requests in flight on the page are those of ``status
    --json``, and not none (a proxy holds Orthanc's answers back)."""

    def agree() -> bool:
        doc = status_json(layout)["destinations"]["pacs"]
        shown = page_rows(driver, "destinations", "data-destination")["pacs"]["in_flight"]
        return shown == str(doc.get("requests_in_flight", 0)) != "0"

    return agree


CHARTS = """
const found = {};
for (const svg of document.querySelectorAll('svg.chart[data-destination="pacs"]')) {
    const line = svg.querySelector("polyline.files");
    found[svg.getAttribute("data-span")] = line !== null && /[1-9]/.test(
        svg.querySelector("text.files").textContent);
}
return found;
"""


def charts_drawn(driver: WebDriver) -> dict[str, bool]:
    """Per span, whether the script drew pacs's chart with some files/s in it."""
    found: dict[str, bool] = driver.execute_script(CHARTS)
    return found


OTHER_ORIGINS = """
return performance.getEntriesByType("resource")
    .map((e) => e.name)
    .filter((url) => new URL(url).origin !== location.origin);
"""


def console_errors(driver: Chrome) -> list[str]:
    """The browser console's errors (a script, style or icon the page's Content Security
    Policy blocked, a failed request: a /favicon.ico the page did not name is a 404)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [str(e["message"]) for e in entries if e["level"] == "SEVERE"]


def refreshes(driver: WebDriver, times: int) -> None:
    """Until the page has refreshed itself ``times`` times from now."""
    for _ in range(times):
        seen = updated(driver)

        def changed(seen: str = seen) -> bool:
            return updated(driver) != seen

        wait_for(changed, REFRESHED, "the page's refresh")


def state_of(driver: WebDriver, destination: str = "pacs") -> str:
    return page_rows(driver, "destinations", "data-destination")[destination]["state"]


# -- the browser itself ---------------------------------------------------------------------------
def test_the_browser_is_debians_chromium_through_debians_driver(browser: Chrome) -> None:
    """The fixture drives /usr/bin/chromium through /usr/bin/chromedriver (nothing Selenium
    Manager could have fetched): the versions the session reports are theirs."""
    chromium = subprocess.run(
        [str(CHROMIUM), "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    driver = subprocess.run(
        [str(CHROMEDRIVER), "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert browser.capabilities["browserVersion"] in chromium
    assert browser.capabilities["chrome"]["chromedriverVersion"].split()[0] == driver[1]
    assert browser.service.path == str(CHROMEDRIVER)


# -- the figures ----------------------------------------------------------------------------------
def test_the_page_shows_the_figures_of_status_json_during_a_run(
    orthanc: Orthanc, browser: Chrome, tmp_path: Path
) -> None:
    proxy = StowProxy(orthanc.dicomweb_url)
    with proxy:
        layout = layout_for(tmp_path, proxy.base)
        with serving_page(layout) as (daemon, url):
            browser.get(url)
            browser.execute_script(MARK)
            drop_study(layout, "first", 3)
            write_garbage(layout.drop / "not-dicom.dcm")
            wait_for(settled(layout, 3, 1), SETTLED, "3 sent, 1 failed", lambda: daemon.log)

            proxy.gate.clear()  # Orthanc stores, its answers wait: files stay in flight
            drop_study(layout, "second", 4)
            drop_study(layout, "third", 3)
            wait_for(lambda: proxy.arrivals >= 1, SETTLED, "a request held back")
            check = page_matches_status(browser, layout, url + "api/status")
            wait_for(check, SETTLED, "the page and status --json agreeing", lambda: daemon.log)
            during = shown_figures(browser)
            assert int(during["waiting"]) + int(during["in_flight"]) == 7
            assert int(during["in_flight"]) >= 1
            assert (during["sent_today"], during["failed_today"]) == ("3", "1")
            wait_for(requests_match(browser, layout), SETTLED, "the requests in flight agreeing")

            proxy.gate.set()
            wait_for(settled(layout, 10, 1), SETTLED, "10 sent, 1 failed", lambda: daemon.log)
            wait_for(check, SETTLED, "the page and status --json agreeing", lambda: daemon.log)
            after = shown_figures(browser)
            assert (after["waiting"], after["in_flight"]) == ("0", "0")
            assert (after["sent_today"], after["failed_today"]) == ("10", "1")
            assert browser.execute_script(MARKED), "the page was reloaded, not refreshed"
            # the script fetches the charts' data every 6th refresh (they are per minute)
            drawn = {"1h": True, "24h": True}
            wait_for(lambda: charts_drawn(browser) == drawn, SETTLED, "the charts drawn")
            # nothing from another host (no CDN), nothing its own policy had to block
            assert browser.execute_script(OTHER_ORIGINS) == []
            assert console_errors(browser) == []


def test_a_held_destination_shows_as_held_within_one_refresh(
    orthanc: Orthanc, browser: Chrome, tmp_path: Path
) -> None:
    layout = layout_for(tmp_path, orthanc.dicomweb_url)
    with serving_page(layout) as (daemon, url):
        drop_study(layout, "first", 1)
        wait_for(settled(layout, 1, 0), SETTLED, "the first file sent", lambda: daemon.log)
        browser.get(url)
        browser.execute_script(MARK)
        assert state_of(browser).startswith(("idle", "sending"))

        orthanc.stop()  # the archive goes away: the next request cannot connect
        drop_study(layout, "second", 1)
        wait_for(
            lambda: status_json(layout)["destinations"]["pacs"]["state"] == "held",
            SETTLED,
            "status --json saying pacs is held",
            lambda: daemon.log,
        )
        # A refresh already under way may have read the queue before the hold; the one
        # after it started after the hold was written.
        refreshes(browser, 2)
        assert state_of(browser).startswith("held"), state_of(browser)

        orthanc.start()
        wait_for(settled(layout, 2, 0), SETTLED, "the second file sent", lambda: daemon.log)
        refreshes(browser, 2)
        assert state_of(browser).startswith(("idle", "sending")), state_of(browser)
        assert browser.execute_script(MARKED), "the page was reloaded, not refreshed"


# -- escaping -------------------------------------------------------------------------------------
NO_MARKUP = """
const table = document.getElementById("failures");
return {
    scripts: Array.from(document.scripts, (s) => s.getAttribute("src")),
    elements: Array.from(table.querySelectorAll("i, script, img"), (e) => e.outerHTML),
    owned: window.owned === undefined ? null : String(window.owned),
};
"""


def hostile_failure(layout: Layout) -> str:
    """Drop a file that fails, under names full of markup; the text its row must show."""
    path = layout.drop / HOSTILE_FOLDER / HOSTILE_FILE
    path.parent.mkdir()
    write_garbage(path)
    return escape(str(path))


def assert_shown_as_text(driver: WebDriver, expected: str) -> None:
    rows = failure_rows(driver)
    assert [row["file"] for row in rows] == [expected]
    found = driver.execute_script(NO_MARKUP)
    assert found == {"scripts": ["static/stowd.js"], "elements": [], "owned": None}, found


def test_a_failed_file_with_a_hostile_name_appears_escaped(
    orthanc: Orthanc, browser: Chrome, tmp_path: Path
) -> None:
    layout = layout_for(tmp_path, orthanc.dicomweb_url)
    with serving_page(layout) as (daemon, url):
        browser.get(url)
        expected = hostile_failure(layout)
        assert "\\n" in expected and "<script>" in expected
        wait_for(settled(layout, 0, 1), SETTLED, "the hostile file failed", lambda: daemon.log)
        wait_for(lambda: failure_rows(browser) != [], REFRESHED, "the failure on the page")
        assert_shown_as_text(browser, expected)  # as the script's refresh put it there
        browser.refresh()
        assert_shown_as_text(browser, expected)  # as stowd served it
        refreshes(browser, 1)
        assert_shown_as_text(browser, expected)
        title = browser.execute_script("return document.title")
        assert title == "stowd status"
        assert console_errors(browser) == []  # no inline script the policy had to stop


def test_a_hostile_name_appears_escaped_without_javascript(
    orthanc: Orthanc, browser_without_js: WebDriver, tmp_path: Path
) -> None:
    layout = layout_for(tmp_path, orthanc.dicomweb_url)
    with serving_page(layout) as (daemon, url):
        expected = hostile_failure(layout)
        wait_for(settled(layout, 0, 1), SETTLED, "the hostile file failed", lambda: daemon.log)
        browser_without_js.get(url)
        assert_shown_as_text(browser_without_js, expected)


# -- without JavaScript ---------------------------------------------------------------------------
def test_the_page_works_without_javascript(
    orthanc: Orthanc, browser_without_js: WebDriver, tmp_path: Path
) -> None:
    driver = browser_without_js
    layout = layout_for(tmp_path, orthanc.dicomweb_url)
    with serving_page(layout) as (daemon, url):
        drop_study(layout, "good", 2)
        write_garbage(layout.drop / "not-dicom.dcm")
        write_truncated(layout.drop / "cut-short.dcm")
        wait_for(settled(layout, 2, 2), SETTLED, "2 sent, 2 failed", lambda: daemon.log)
        driver.get(url)
        assert not driver.execute_script(
            "return document.documentElement.classList.contains('js')"
        ), "the page's script ran: JavaScript is not off"
        assert shown_figures(driver) == source_figures(status_json(layout))
        assert state_of(driver) == "idle"
        history = driver.find_elements(By.CSS_SELECTOR, 'table.history[data-destination="pacs"]')
        assert history and "2" in history[0].text  # the last 24 hours as a table
        assert charts_drawn(driver) == {"1h": False, "24h": False}

        rows = failure_rows(driver)
        assert sorted(row["file"] for row in rows) == sorted(
            str(layout.drop / name) for name in ("cut-short.dcm", "not-dicom.dcm")
        )
        chosen = next(row for row in rows if row["file"].endswith("cut-short.dcm"))["reason"]
        Select(
            driver.find_element(By.CSS_SELECTOR, "#failure-filter select[name=reason]")
        ).select_by_value(chosen)
        driver.find_element(By.CSS_SELECTOR, "#failure-filter [type=submit]").click()
        wait_for(lambda: "reason=" in driver.current_url, REFRESHED, "the filtered page")
        filtered = failure_rows(driver)
        assert [row["file"] for row in filtered] == [str(layout.drop / "cut-short.dcm")]
        assert filtered[0]["reason"] == chosen


# -- a page opened while the queue could not be read ---------------------------------------------
def test_a_page_opened_while_the_queue_was_unreadable_shows_the_tables_once_it_is_back(
    browser: Chrome, tmp_path: Path
) -> None:
    """The page served while the queue cannot be read (503) is the trouble alone, without
    the tables; its script refreshed only the parts it had, so that page said "no queue"
    until someone reloaded it, long after the queue was back.  It must show the tables at
    the first refresh that can read the queue."""
    layout = layout_for(tmp_path, "http://127.0.0.1:1/dicom-web")  # nothing is sent
    with serving_page(layout) as (_daemon, url):
        queue = layout.root / "state" / "queue.db"
        away = queue.with_name("queue.db.away")
        queue.rename(away)  # the daemon keeps its open file; a reader finds none by name
        try:
            browser.get(url)
            assert "no queue at" in browser.find_element(By.TAG_NAME, "main").text
        finally:
            away.rename(queue)
        wait_for(
            lambda: "ct1" in page_rows(browser, "sources", "data-source"),
            REFRESHED,
            "the sources table once the queue is readable again",
        )
        assert "no queue at" not in browser.find_element(By.TAG_NAME, "main").text

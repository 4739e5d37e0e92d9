"""The daemon serving its status page, and what a test reads back from it.

``with serving_page(layout) as (daemon, url):`` runs ``stowd run`` with ``http.listen`` on a
free loopback port (chosen by ``free_port()`` and bound later by the daemon, so another
process may take it in between: the daemon then exits saying it cannot serve the page, and
is started again on another port).  ``status_json(layout)`` is ``stowd status --json`` as a
user runs it; ``page_rows(driver, table, row)`` reads a table of the page in one script call
(an atomic look: the page's own refresh swaps its tables between two Selenium calls
otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml
from harness import Layout, Stowd, run_cli, wait_for
from orthanc import free_port
from selenium.webdriver.remote.webdriver import WebDriver

PAGE_SERVED = "serving the status page on "
_ATTEMPTS = 5

_ROWS = """
const [table, attribute] = arguments;
const rows = {};
for (const row of document.querySelectorAll(`table#${table} tr[${attribute}]`)) {
    const cells = {};
    for (const cell of row.querySelectorAll("td[data-field]")) {
        cells[cell.getAttribute("data-field")] = cell.textContent;
    }
    rows[row.getAttribute(attribute)] = cells;
}
return rows;
"""


@contextmanager
def serving_page(layout: Layout, **http: object) -> Iterator[tuple[Stowd, str]]:
    """The daemon serving its page on a free port: (daemon, the page's URL).  ``http``:
    more keys of the ``http`` section."""
    for _ in range(_ATTEMPTS):
        port = free_port()
        doc = yaml.safe_load(layout.config.read_text())
        doc["http"] = {"listen": f"127.0.0.1:{port}", **http}
        layout.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        url = f"http://127.0.0.1:{port}/"
        with Stowd(layout) as daemon:
            if _serves(daemon, url):
                yield daemon, url
                return
        assert "cannot serve the status page" in daemon.log, daemon.log
    raise AssertionError(f"no free port for the status page in {_ATTEMPTS} tries")


def _serves(daemon: Stowd, url: str) -> bool:
    wait_for(
        lambda: PAGE_SERVED in daemon.log or not daemon.alive(),
        60,
        "the status page served (or the daemon's exit)",
        lambda: daemon.log,
    )
    return f"{PAGE_SERVED}{url}" in daemon.log


def status_json(layout: Layout) -> dict[str, Any]:
    """``stowd status --json`` on the layout's config."""
    done = run_cli("status", "--json", "-c", str(layout.config))
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def page_rows(driver: WebDriver, table: str, attribute: str) -> dict[str, dict[str, str]]:
    """Each row of ``table#table`` with ``attribute`` (its value -> its ``data-field`` cells'
    text), read at one instant."""
    found: dict[str, dict[str, str]] = driver.execute_script(_ROWS, table, attribute)
    return found


def updated(driver: WebDriver) -> str:
    """The text of ``#updated``: the time of the data the page shows."""
    text: str = driver.execute_script("return document.getElementById('updated').textContent")
    return text


_FAILURES = """
return Array.from(document.querySelectorAll("table#failures tr.failure"), (row) => {
    const cells = {};
    for (const cell of row.querySelectorAll("td[data-field]")) {
        cells[cell.getAttribute("data-field")] = cell.textContent;
    }
    return cells;
});
"""


def failure_rows(driver: WebDriver) -> list[dict[str, str]]:
    """The rows of the failures table, each its ``data-field`` cells' text, in page order."""
    found: list[dict[str, str]] = driver.execute_script(_FAILURES)
    return found

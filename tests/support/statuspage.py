"""What a browser test reads back from the status page (the daemon serving it:
``harness.serving_page``), and ``stowd status --json`` to compare it with.

``status_json(layout)`` is ``stowd status --json`` as a user runs it; ``page_rows(driver,
table, attribute)`` and ``failure_rows(driver)`` read a table of the page in one script call
(an atomic look: the page's own refresh swaps its tables between two Selenium calls
otherwise); ``updated(driver)`` is the text of ``#updated``, which each refresh replaces.
"""

from __future__ import annotations

import json
from typing import Any

from harness import Layout, run_cli
from selenium.webdriver.remote.webdriver import WebDriver

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

"""A shared queue's nodes on the status page, in ``/api/status`` and in ``/metrics`` (issue 23,
"Seeing the fleet"): two nodes on one real PostgreSQL database, one alive and one vanished with
its claims, served over HTTP by node-a's listener; a host name from the database full of
markup shown as text; a SQLite queue's page without a nodes table."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from harness import Clock, make_watch_folders, wait_for
from postgres import PostgresCluster, node_config, pass_time
from selenium.webdriver import Chrome

from stowd.config.load import load_config
from stowd.config.model import Config, Http
from stowd.pipeline.queue import Classification, Job, NewFile, Queue, open_queue
from stowd.printable import escape
from stowd.service import page, web
from stowd.service.fleet import Fleet

HOSTILE_HOST = "<img src=x onerror=window.owned=1>\n\"'&amp;gw"
LEASE = 6.0


def get(url: str) -> httpx.Response:
    answer = httpx.get(url, trust_env=False, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer


class NodeRows(HTMLParser):
    """The text of each ``data-field`` cell of the nodes table, by node, and each row's class."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, dict[str, str]] = {}
        self.classes: dict[str, str | None] = {}
        self.elements: list[str] = []  # every start tag inside the nodes section
        self._inside = 0
        self._row: dict[str, str] | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "section" and found.get("id") == "nodes":
            self._inside = 1
        elif self._inside:
            self.elements.append(tag)
        if tag == "tr" and self._inside and found.get("data-node") is not None:
            name = str(found["data-node"])
            self._row = self.rows.setdefault(name, {})
            self.classes[name] = found.get("class")
        elif tag == "td" and self._row is not None:
            self._field = found.get("data-field")
            if self._field is not None:
                self._row[self._field] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._field = None
        elif tag == "section":
            self._inside = 0
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._field is not None and self._row is not None:
            self._row[self._field] += data


def node_rows(html: str) -> NodeRows:
    parser = NodeRows()
    parser.feed(html)
    return parser


def claimed(queue: Queue, count: int) -> list[Job]:
    files = [NewFile("src", "pacs", f"/t/f{i}", f"f{i}", 10, 1) for i in range(count)]
    queue.enqueue(files)
    jobs = queue.unclassified(count)
    queue.set_classified([Classification(j, "dicom", "st", f"sop{j.id}", "1.2") for j in jobs])
    return queue.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=count, lease=LEASE)


@dataclass
class Fleet2:
    """node-a (serving its page) alive, node-b vanished holding two claims, on one database."""

    a: Queue
    b: Queue
    config: Config
    base: str


@pytest.fixture
def fleet(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, clock: Clock
) -> Iterator[Fleet2]:
    configs = {
        n: replace(node_config(postgres_cluster, pg_database, tmp_path, n), lease=LEASE)
        for n in ("node-a", "node-b")
    }
    a, b = (open_queue(c, clock=clock).open() for c in configs.values())
    try:
        b.heartbeat(pid=4242, host=HOSTILE_HOST, started=clock.now, version="0", lease=LEASE)
        claimed(b, 2)
        pass_time(b, clock, 60)  # ten leases: node-b vanished, its claims' leases ran out
        Fleet(configs["node-a"], a, set, clock=clock).beat()
        config = replace(configs["node-a"], http=Http("127.0.0.1", 0))
        server = web.serve(config)
        try:
            yield Fleet2(a, b, config, f"http://127.0.0.1:{server.port}/")
        finally:
            server.close()
    finally:
        a.close()
        b.close()


@pytest.mark.integration
def test_the_page_shows_each_node_with_its_state_claims_and_leases(fleet: Fleet2) -> None:
    found = node_rows(get(fleet.base).text)
    assert set(found.rows) == {"node-a", "node-b"}
    a, b = found.rows["node-a"], found.rows["node-b"]
    assert a["state"] == "alive" and a["host"] == f"{socket.gethostname()} (pid {os.getpid()})"
    assert (a["claimed"], a["settling"], a["leases"]) == ("0", "0", "none held")
    assert b["state"] == "vanished" and found.classes["node-b"] == "vanished"
    assert b["host"] == f"{escape(HOSTILE_HOST)} (pid 4242)"  # as text: no element made of it
    assert "img" not in found.elements and "script" not in found.elements
    assert (b["claimed"], b["settling"]) == ("2", "0")
    assert b["leases"].startswith("expired ") and b["leases"].endswith(" ago")
    assert b["heartbeat"].endswith(" ago") and b["rate"] == "0.0 files/min"


@pytest.mark.integration
def test_api_status_carries_the_nodes_of_the_page(fleet: Fleet2) -> None:
    doc = get(fleet.base + "api/status").json()
    by_node = {n["node"]: n for n in doc["nodes"]}
    assert by_node["node-a"]["state"] == "alive"
    assert by_node["node-b"]["host"] == HOSTILE_HOST  # JSON: the text itself
    assert (by_node["node-b"]["state"], by_node["node-b"]["claimed"]) == ("vanished", 2)
    assert by_node["node-b"]["claims_expire_in"] < 0
    shown = node_rows(page.render(doc)).rows  # the page renders the same document
    assert shown["node-b"]["claimed"] == "2"


def sample(text: str, name: str) -> float:
    """The value of the series written exactly ``name`` (with its labels) in ``text``."""
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
    ]
    assert len(values) == 1, (name, values)
    return values[0]


@pytest.mark.integration
def test_metrics_carry_each_nodes_heartbeat_age_lease_and_files(
    fleet: Fleet2, clock: Clock
) -> None:
    text = get(fleet.base + "metrics").text
    assert sample(text, 'stowd_node_heartbeat_age_seconds{node="node-b"}') >= 60
    assert sample(text, 'stowd_node_heartbeat_age_seconds{node="node-a"}') < LEASE
    assert sample(text, 'stowd_node_lease_seconds{node="node-b"}') == LEASE
    assert sample(text, 'stowd_node_files{node="node-b",state="claimed"}') == 2
    assert sample(text, 'stowd_node_files{node="node-b",state="settling"}') == 0
    assert sample(text, 'stowd_node_files{node="node-a",state="claimed"}') == 0
    assert 'stowd_info{node="node-a",version="' in text
    # node-a takes node-b's claims over: the series follow at the next scrape
    assert fleet.a.reclaim(set()) == 2
    claimed_by_a = fleet.a.claim_batch(["pacs"], pick=lambda _d, js: js, candidates=2, lease=LEASE)
    assert len(claimed_by_a) == 2
    text = get(fleet.base + "metrics").text
    assert sample(text, 'stowd_node_files{node="node-b",state="claimed"}') == 0
    assert sample(text, 'stowd_node_files{node="node-a",state="claimed"}') == 2
    assert "node=" not in "".join(  # the node is a label of these series alone
        line
        for line in text.splitlines()
        if not line.startswith(("stowd_node_", "stowd_info", "#"))
    )


def _read(browser: Chrome, selector: str, field: str) -> object:
    """An element's property read in one script: the page's refresh replaces its table and
    time stamp, so an element found first and read after could be gone (a stale element)."""
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]);"
        " return e === null ? null : e[arguments[1]];",
        selector,
        field,
    )


@pytest.mark.integration
def test_the_nodes_table_in_a_browser_shows_the_host_as_text_after_a_refresh(
    fleet: Fleet2, browser: Chrome
) -> None:
    browser.get(fleet.base)
    first = _read(browser, "#updated", "innerText")
    wait_for(
        lambda: _read(browser, "#updated", "innerText") != first,
        60.0,
        "the page refreshed by its script",
    )
    cell = '#nodes tr[data-node="node-b"] td[data-field="host"]'
    assert _read(browser, cell, "innerText") == f"{escape(HOSTILE_HOST)} (pid 4242)"
    assert _read(browser, '#nodes tr[data-node="node-b"]', "className") == "vanished"
    found = browser.execute_script(
        "return {img: document.querySelectorAll('#nodes img, #nodes script').length,"
        " owned: window.owned === undefined ? null : String(window.owned)}"
    )
    assert found == {"img": 0, "owned": None}


def test_a_sqlite_queue_s_page_has_no_nodes_table(tmp_path: Path) -> None:
    from test_config import MINIMAL  # noqa: PLC0415

    (tmp_path / "stowd.yaml").write_text(MINIMAL + "node: gw-1\n", encoding="utf-8")
    make_watch_folders(tmp_path / "stowd.yaml")
    config = load_config(tmp_path / "stowd.yaml")
    open_queue(config).open().close()
    doc = page.document(config, page.Query())
    assert [n["node"] for n in doc["nodes"]] == ["gw-1"]
    html = page.render(doc)
    assert '<section id="nodes"></section>' in html and "<h2>Nodes</h2>" not in html

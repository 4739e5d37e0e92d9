"""docs/grafana-dashboard.json: checked against Grafana's own dashboard model, and every panel's
query answered by a real Prometheus scraping a real stowd that sends to a real Orthanc.

Grafana is not in Debian (nor on PyPI), so the dashboard is not loaded into a Grafana.  Its
model is checked with Grafana's own types instead: ``@grafana/schema`` (npm, pinned in
``tests/grafana/package.json``; ``.ci/run`` installs it) holds the TypeScript types Grafana
generates from its dashboard schema and from each panel plugin's options.  The test writes the
JSON as TypeScript literals typed as a ``Dashboard`` and each panel as a panel of its plugin
(timeseries, stat, ...), and the TypeScript compiler (``tsc --strict``) must accept them: a
misspelt key, a missing required option or a value outside an enum fails (the second test
shows it does).  An enum is taken as the strings it stands for (``Json<T>``), as the JSON holds
them.

The queries: a Prometheus from Debian's ``prometheus`` package scrapes the daemon every second;
each panel's expression, with the dashboard's variables replaced the way Grafana replaces them,
goes to ``/api/v1/query`` and ``/api/v1/query_range`` and must answer without an error and with
data above zero at some point of the run (the run makes every panel's fact happen: files sent
in two rounds, one failed, one destination held, one paused by its schedule, a rate cap, adaptive
concurrency).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from dicomgen import make_instance
from harness import Layout, make_layout, serving_metrics, wait_for
from needs import require
from orthanc import Orthanc
from prometheus import SCRAPE_INTERVAL, Prometheus, prometheus_missing_reason
from test_docs import exported_metrics

from stowd.config.schedule import DAY_NAMES, local_zone

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
TYPES = REPO / "tests" / "grafana"
MODULES = TYPES / "node_modules"
TSC_TIMEOUT = 300.0

# A panel type and its plugin's options types in @grafana/schema (module, types' file name,
# whether the plugin has its own field config).  A panel of another type has no types to check
# it by: add it here with its module.
PLUGINS = {
    "timeseries": ("timeseries", "TimeSeries", True),
    "stat": ("stat", "Stat", False),
    "bargauge": ("bargauge", "BarGauge", False),
    "state-timeline": ("statetimeline", "StateTimeline", True),
}
GRID_COLUMNS = 24


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = doc["panels"]
    return found


# -- Grafana's model --------------------------------------------------------------------------
def types_missing_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is missing (Debian: apt-get install nodejs npm)"
    for package in ("@grafana/schema", "typescript"):
        if not (MODULES / package / "package.json").is_file():
            return f"{package} is not installed in {TYPES} (npm ci --prefix tests/grafana)"
    return None


def typescript(doc: dict[str, Any]) -> str:
    """The dashboard as TypeScript: the whole typed as Grafana's ``Dashboard``, then each panel
    typed as a panel of its plugin (the dashboard type leaves a panel's options open)."""
    lines = ["import type { Dashboard, FieldConfigSource, Panel } from '@grafana/schema';"]
    for module, name, _ in PLUGINS.values():
        lines.append(
            f"import type * as {module} from '@grafana/schema/dist/esm/raw/composable/"
            f"{module}/panelcfg/x/{name}PanelCfg_types.gen';"
        )
    lines += [
        "type Json<T> = T extends string ? `${T}` : T extends ReadonlyArray<infer U> ? "
        "Array<Json<U>> : T extends object ? { [K in keyof T]: Json<T[K]> } : T;",
        "type Typed<O, F> = Omit<Json<Panel>, 'options' | 'fieldConfig'> & "
        "{ options: Json<O>; fieldConfig: Json<FieldConfigSource<F>> };",
        "type NoCustom = Record<string, never>;",
        f"export const dashboard: Json<Dashboard> = {json.dumps(doc, indent=1)};",
    ]
    for n, panel in enumerate(panels(doc)):
        module, _, custom = PLUGINS[panel["type"]]
        typed = f"Typed<{module}.Options, {module + '.FieldConfig' if custom else 'NoCustom'}>"
        lines.append(f"export const panel{n}: {typed} = {json.dumps(panel, indent=1)};")
    return "\n".join(lines) + "\n"


def type_check(doc: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    """``tsc --strict`` on the dashboard as TypeScript, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node_modules").symlink_to(MODULES, target_is_directory=True)
    shutil.copyfile(TYPES / "tsconfig.json", folder / "tsconfig.json")
    (folder / "dashboard.ts").write_text(typescript(doc), encoding="utf-8")
    tsc = str(MODULES / "typescript" / "bin" / "tsc")
    return subprocess.run(
        ["node", tsc, "-p", str(folder)],
        capture_output=True,
        text=True,
        timeout=TSC_TIMEOUT,
        check=False,
    )


def test_the_dashboard_is_a_dashboard_by_grafanas_own_types(tmp_path: Path) -> None:
    require(types_missing_reason())
    doc = dashboard()
    unknown = {p["type"] for p in panels(doc)} - set(PLUGINS)
    assert not unknown, f"panel types with no types to check them by: {unknown}"
    done = type_check(doc, tmp_path / "ts")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_version_is_the_one_grafana_writes_now() -> None:
    """Grafana migrates a dashboard of an older ``schemaVersion`` on import; this one needs
    none in the Grafana of ``@grafana/schema``'s version."""
    require(types_missing_reason())
    script = "import('@grafana/schema').then(m => console.log(m.defaultDashboard.schemaVersion))"
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=TYPES,
        capture_output=True,
        text=True,
        timeout=TSC_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert dashboard()["schemaVersion"] == int(done.stdout)


def test_the_type_check_refuses_a_misspelt_key_and_a_value_outside_an_enum(
    tmp_path: Path,
) -> None:
    require(types_missing_reason())
    misspelt = dashboard()
    misspelt["panels"][0]["gridpos"] = misspelt["panels"][0].pop("gridPos")
    done = type_check(misspelt, tmp_path / "misspelt")
    assert done.returncode != 0 and "'\"gridpos\"' does not exist" in done.stdout, done.stdout
    enum = dashboard()
    series = next(p for p in panels(enum) if p["type"] == "timeseries")
    series["options"]["legend"]["displayMode"] = "tables"
    done = type_check(enum, tmp_path / "enum")
    assert done.returncode != 0 and "'\"tables\"' is not assignable" in done.stdout, done.stdout


def test_the_panels_fit_the_grid_and_use_only_the_dashboards_variables() -> None:
    doc = dashboard()
    defined = {v["name"] for v in doc["templating"]["list"]}
    taken: set[tuple[int, int]] = set()
    for panel in panels(doc):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= defined, f"{panel['title']}: {used - defined} not defined"
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))


# What the issue asks the dashboard to show, by the metrics that show it.
ASKED = {
    "throughput per destination": {"stowd_files_sent_total", "stowd_bytes_sent_total"},
    "queue depth": {"stowd_queue_files"},
    "oldest waiting": {"stowd_oldest_pending_age_seconds"},
    "failures by reason": {"stowd_files_failed_total", "stowd_retries_total"},
    "held destinations": {"stowd_destination_held"},
    "paused by schedule": {"stowd_destination_paused"},
    "concurrency": {"stowd_destination_concurrency"},
}


def test_the_panels_show_what_was_asked_with_metrics_stowd_exports() -> None:
    exported = exported_metrics()
    used: set[str] = set()
    for _, expr in targets():
        for name in re.findall(r"\b(stowd_\w+)", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in exported, f"{name} is not a metric stowd exports: {expr}"
            used.add(base)
    missing = {what: names - used for what, names in ASKED.items() if names - used}
    assert not missing


# -- the queries, answered by a real Prometheus -----------------------------------------------
# $__rate_interval: Grafana makes it at least four scrape intervals; a wider window here keeps
# two samples of a counter in it even when a busy machine delays scrapes
RATE_INTERVAL = 60 * SCRAPE_INTERVAL


def another_day() -> str:
    """A transfer window three days from today: the destination is paused for the whole run."""
    return f"{DAY_NAMES[(datetime.now(local_zone()).weekday() + 3) % 7]} 10:00-11:00"


def gateway(tmp_path: Path, orthanc: Orthanc) -> Layout:
    """ct1 sends to pacs (Orthanc, a rate cap, adaptive concurrency); scans to archive, a
    path Orthanc answers 404 for (refused: held); night has a window closed all day."""

    def source(name: str, destination: str) -> dict[str, object]:
        return {
            "name": name,
            "watch": f"./drop/{name}",
            "sent": f"./done/sent/{name}",
            "failed": f"./done/failed/{name}",
            "destination": destination,
            "quiet_period": "500ms",
            "incomplete_wait": "2s",
        }

    layout = make_layout(
        tmp_path / "run",
        orthanc.dicomweb_url,
        sources=[source("ct1", "pacs"), source("scans", "archive")],
        destinations={
            "pacs": {"url": orthanc.dicomweb_url, "workers": 2, "max_rate": "100MB/s"},
            "archive": {"url": f"{orthanc.url}/no-dicom-web", "workers": 1},
            "night": {"url": orthanc.dicomweb_url, "schedule": [another_day()]},
        },
    )
    for name in ("ct1", "scans"):
        (layout.drop / name).mkdir(parents=True)
    return layout


def scraped(prometheus: Prometheus, expr: str, value: float) -> bool:
    """Whether Prometheus holds ``expr`` at ``value`` now (scraped after it happened)."""
    return [float(r["value"][1]) for r in prometheus.query(expr)] == [value]


def sent(layout: Layout) -> int:
    return len(layout.files(layout.sent))


@pytest.fixture
def run(tmp_path: Path, orthanc: Orthanc) -> Iterator[tuple[Layout, Prometheus, int]]:
    """The gateway running with its metrics scraped by a real Prometheus: (layout, prometheus,
    the daemon's metrics port)."""
    require(prometheus_missing_reason())
    layout = gateway(tmp_path, orthanc)
    with serving_metrics(layout) as (daemon, port):
        with Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"]) as prometheus:
            make_events(layout, prometheus, lambda: daemon.log)
            yield layout, prometheus, port
        assert daemon.terminate() == 0


def make_events(layout: Layout, prometheus: Prometheus, log: Callable[[], str]) -> None:
    """Two rounds of files sent (a counter is born at its first event: a rate needs a second
    one), a file failed, a file held, each seen by Prometheus.

    Nothing happens before Prometheus has scraped the daemon once, with its counters at 0, as
    a Prometheus that was running before stowd started sees them: a Prometheus that starts
    late sees a series first at, say, 4 retries, and ``rate()`` counts nothing of a series'
    first sample (in the CI run of 2e9dcc4 the retries panel stayed at 0 so)."""
    up = 'min(up{job="stowd"})'
    wait_for(lambda: scraped(prometheus, up, 1), 120, "the first scrape", log)
    for n in range(3):
        make_instance(layout.drop / "ct1" / f"study-{n}.dcm")
    (layout.drop / "ct1" / "not-dicom.dcm").write_text("not DICOM")
    make_instance(layout.drop / "scans" / "held.dcm")
    wait_for(lambda: sent(layout) == 3 and bool(layout.files(layout.failed)), 120, "round 1", log)
    held = 'stowd_destination_held{destination="archive"}'
    wait_for(lambda: scraped(prometheus, held, 1), 120, "the hold scraped", log)
    first = 'sum(stowd_files_sent_total{destination="pacs"})'
    wait_for(lambda: scraped(prometheus, first, 3), 120, "round 1 scraped", log)
    for n in range(3, 5):
        make_instance(layout.drop / "ct1" / f"study-{n}.dcm")
    wait_for(lambda: scraped(prometheus, first, 5), 120, "round 2 scraped", log)
    retries = 'sum(rate(stowd_retries_total{destination="archive",reason="refused"}[60s])) > 0'
    wait_for(lambda: bool(prometheus.query(retries)), 120, "retries of the held file", log)


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable in a ``=~`` matcher as Grafana's Prometheus data source writes
    it: each value regex-escaped (a backslash doubled inside the PromQL string), joined."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substituted(expr: str, variables: dict[str, str], span: float) -> str:
    text = expr.replace("$__rate_interval", f"{RATE_INTERVAL:g}s")
    text = text.replace("$__range", f"{int(span) + 1}s")
    for name, value in variables.items():
        text = text.replace(f"${name}", value)
    assert "$" not in text, text
    return text


def targets() -> list[tuple[str, str]]:
    """(panel title and refId, expression) of every panel's every query."""
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"])
        for p in panels(dashboard())
        for t in p["targets"]
    ]


def answers(prometheus: Prometheus, expr: str, start: float) -> tuple[bool, float]:
    """(the instant query answered with data, the largest value of the range query)."""
    instant = prometheus.query(expr)
    end = time.time()
    series = prometheus.query_range(expr, start, end, SCRAPE_INTERVAL)
    values = [float(v) for s in series for _, v in s["values"] if v not in ("NaN", "+Inf")]
    return bool(instant), max(values, default=0.0)


def test_every_panel_query_and_variable_answers_with_data_from_a_real_prometheus(
    run: tuple[Layout, Prometheus, int],
) -> None:
    _, prometheus, port = run
    start = time.time() - 600  # before Prometheus started: the range holds the whole run
    settings = {
        "all": {"instance": ".*", "destination": ".*"},
        "chosen": {
            "instance": grafana_regex([f"127.0.0.1:{port}"]),
            "destination": grafana_regex(["archive", "night", "pacs"]),
        },
    }
    for setting, variables in settings.items():
        for where, expr in targets():
            query = substituted(expr, variables, time.time() - start)
            instant, largest = answers(prometheus, query, start)
            assert instant, f"{setting}: {where}: no data for {query}"
            assert largest > 0, f"{setting}: {where}: never above 0: {query}"
    assert variable_values(prometheus) == {
        "instance": [f"127.0.0.1:{port}"],
        "destination": ["archive", "night", "pacs"],
    }


def variable_values(prometheus: Prometheus) -> dict[str, list[str]]:
    """What the dashboard's query variables list (``label_values(MATCH, LABEL)``, asked as
    Grafana asks Prometheus), the others set to All."""
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    listed = {}
    for name in ("instance", "destination"):
        found = re.fullmatch(r"label_values\((.*), (\w+)\)", variables[name]["query"])
        assert found is not None, variables[name]["query"]
        match = found.group(1).replace("$instance", ".*")
        listed[name] = sorted(prometheus.label_values(found.group(2), match))
    return listed

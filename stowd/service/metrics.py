"""Prometheus metrics served over HTTP: the pipeline's counters (``counters.py``) and the
queue's gauges, read at scrape time.

Each scrape reads the queue database (``queue.read_active``: its own read-only connection,
closed after the scrape, so it never shares the daemon's per-thread connections and never
blocks it)::

    stowd_queue_files{destination,state}             active rows: pending, waiting, claimed,
                                                     settling (``waiting``: pending, but its next
                                                     attempt lies ahead; as ``stowd status``)
    stowd_oldest_pending_age_seconds{destination}    age of its oldest active row (0: none)
    stowd_destination_held{destination}              1 while the destination is held (as
                                                     ``stowd status`` shows it), else 0
    stowd_destination_paused{destination}            1 while the destination is outside its
                                                     transfer windows (``schedule``), else 0
                                                     (from the config and the local clock:
                                                     served even when the queue cannot be read)
    stowd_up                                         1
    stowd_info{node,version}                         1: which node serves this scrape

A shared (PostgreSQL) queue adds its nodes, one series each (as many as nodes ever ran on
it; every node's scrape serves all of them, so aggregate by ``node``)::

    stowd_node_heartbeat_age_seconds{node}           since its daemon last said it was alive
                                                     (on the database's clock, as ``stowd
                                                     status``)
    stowd_node_lease_seconds{node}                   its claims' lease: silent for longer, its
                                                     claims may be taken over
    stowd_node_files{node,state}                     rows it holds: claimed, settling

A node name is the one label of these (and of ``stowd_info``); a name in the database that the
config would not accept is left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from stowd import __version__
from stowd.config.model import Config, Database
from stowd.config.schedule import Schedule, local_now
from stowd.config.yamlwalk import NAME, host_port
from stowd.errors import QueueError, StowdError
from stowd.pipeline.counters import REGISTRY, label, route, touch
from stowd.pipeline.queue import ActiveView, read_active_of

log = logging.getLogger("stowd.metrics")

STATES = ("pending", "waiting", "claimed", "settling")
HELD = ("claimed", "settling")  # what a node holds
SCRAPE_BUSY_TIMEOUT = 5.0  # seconds a scrape waits for a locked database (WAL readers rarely do)


# -- read from the queue at scrape time ------------------------------------------------------
class QueueCollector:
    """A prometheus_client collector: ``stowd_up``, ``stowd_info`` (of ``node``, this
    process), the queue gauges of ``destinations`` and those of a shared queue's nodes.

    A queue that cannot be read leaves its gauges out of that scrape (the counters are still
    served); the problem is logged once, and once more when reading works again.
    """

    def __init__(
        self,
        path: Path,
        destinations: Sequence[str],
        clock: Callable[[], float] = time.time,
        database: Database | None = None,
        node: str = "",
    ) -> None:
        self.path = path
        self.node = node
        self.database = database  # a PostgreSQL queue: read there (``path`` is the node's)
        self.destinations = [label(d) for d in destinations]
        self.clock = clock
        self._failing = False
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("stowd_up", "1 while stowd serves its metrics", value=1)
        info = GaugeMetricFamily(
            "stowd_info", "1: the node this stowd is and its version", labels=["node", "version"]
        )
        if NAME.fullmatch(self.node):
            info.add_metric([self.node, __version__], 1)
        yield info
        now = self.clock()
        view = self._read(now)
        if view is not None:
            yield from self._families(view, now if view.at is None else view.at)
            yield from self._nodes(view)

    def _read(self, now: float) -> ActiveView | None:
        try:
            view = read_active_of(self.path, self.database, now, busy_timeout=SCRAPE_BUSY_TIMEOUT)
        except Exception as exc:
            self._note_failure(exc)
            return None
        with self._lock:
            if self._failing:
                log.info("metrics: the queue can be read again")
            self._failing = False
        return view

    def _note_failure(self, exc: Exception) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        if first and isinstance(exc, QueueError | OSError):
            log.warning(
                "metrics: cannot read the queue %s, its gauges are left out: %s", self.path, exc
            )
        elif first:
            log.exception(
                "metrics: reading the queue %s failed, its gauges are left out", self.path
            )

    def _families(self, view: ActiveView, now: float) -> Iterable[Metric]:
        files = GaugeMetricFamily(
            "stowd_queue_files",
            "Active rows of the queue by destination and state (pending, waiting, claimed, "
            "settling)",
            labels=["destination", "state"],
        )
        oldest = GaugeMetricFamily(
            "stowd_oldest_pending_age_seconds",
            "Age of the oldest row a destination has not finished (0: none)",
            labels=["destination"],
        )
        held = GaugeMetricFamily(
            "stowd_destination_held",
            "1 while the destination is held (refused or unavailable), else 0",
            labels=["destination"],
        )
        for name in self.destinations:
            for state in STATES:
                files.add_metric([name, state], view.counts.get((name, state), 0))
            first = view.oldest.get(name)
            oldest.add_metric([name], 0.0 if first is None else max(0.0, now - first))
            held.add_metric([name], 1 if name in view.held else 0)
        return [files, oldest, held]

    @staticmethod
    def _nodes(view: ActiveView) -> Iterable[Metric]:
        """A shared queue's nodes (SQLite: no series): heartbeat age, lease, rows held."""
        names = sorted(n for n in {*view.beats, *(n for n, _ in view.holding)} if NAME.fullmatch(n))
        if not names:
            return []
        age = GaugeMetricFamily(
            "stowd_node_heartbeat_age_seconds",
            "Seconds since the node's daemon last said it was alive (the database's clock)",
            labels=["node"],
        )
        lease = GaugeMetricFamily(
            "stowd_node_lease_seconds",
            "The node's lease: silent longer, its claims may be taken over",
            labels=["node"],
        )
        files = GaugeMetricFamily(
            "stowd_node_files",
            "Rows of the shared queue the node holds by state (claimed, settling)",
            labels=["node", "state"],
        )
        for name in names:
            if name in view.beats:
                age.add_metric([name], view.beats[name][0])
                lease.add_metric([name], view.beats[name][1])
            for state in HELD:
                files.add_metric([name, state], view.holding.get((name, state), 0))
        return [age, lease, files]


# -- schedule (transfer windows) --
class PausedCollector:
    """``stowd_destination_paused``: each destination outside its windows now (1), or not."""

    def __init__(
        self, schedules: Mapping[str, Schedule], now: Callable[[], datetime] = local_now
    ) -> None:
        self.schedules = {label(name): s for name, s in schedules.items()}
        self.now = now

    def collect(self) -> Iterable[Metric]:
        paused = GaugeMetricFamily(
            "stowd_destination_paused",
            "1 while the destination is outside its transfer windows (schedule), else 0",
            labels=["destination"],
        )
        now = self.now()
        for name, schedule in self.schedules.items():
            paused.add_metric([name], 0 if schedule.is_open(now) else 1)
        yield paused


class _Scrape:
    """What one scrape serves: the module's registry, then the queue collector (and the
    paused gauge)."""

    def __init__(self, queue: QueueCollector, paused: PausedCollector | None = None) -> None:
        self.queue = queue
        self.paused = paused

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()
        yield from self.queue.collect()
        if self.paused is not None:
            yield from self.paused.collect()


# -- the HTTP server ---------------------------------------------------------------------------
class Server:
    """The metrics HTTP server running in a daemon thread; ``close()`` stops it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        address: Any = httpd.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def registry(
    queue_path: Path,
    destinations: list[str],
    *,
    clock: Callable[[], float] = time.time,
    schedules: Mapping[str, Schedule] | None = None,
    routes: Iterable[tuple[str, str]] = (),
    database: Database | None = None,
    node: str = "",
) -> CollectorRegistry:
    """What a scrape serves: the counters, the queue's gauges and the paused gauge, in a
    real registry (``?name[]=`` works); series of ``destinations`` and of each (source,
    destination) in ``routes`` start at 0, so rates and alerts work before the first event."""
    collector = QueueCollector(queue_path, destinations, clock, database, node)
    for name in collector.destinations:
        touch(name)
    for source, destination in routes:
        route(source, destination)
    scrape = CollectorRegistry(auto_describe=True)
    paused = PausedCollector(schedules or dict.fromkeys(destinations, Schedule()))
    scrape.register(_Scrape(collector, paused))
    return scrape


def for_config(config: Config) -> CollectorRegistry:
    """``registry`` of ``config``: its destinations with their schedules, and the route
    (source, destination) of each source."""
    return registry(
        config.queue,
        list(config.destinations),
        schedules={name: d.schedule for name, d in config.destinations.items()},
        routes=[(s.name, s.destination) for s in config.sources],
        database=config.database,
        node=config.node,
    )


def serve(
    host: str,
    port: int,
    queue_path: Path,
    destinations: list[str],
    *,
    clock: Callable[[], float] = time.time,
    schedules: Mapping[str, Schedule] | None = None,
    routes: Iterable[tuple[str, str]] = (),
) -> Server:
    """Serve the metrics over HTTP on host:port (port 0: any free one, see ``Server.port``).

    Every path answers with the metrics, ``/metrics`` among them.  Series of the configured
    destinations start at 0, so rates and alerts work before the first event.
    """
    scrape = registry(queue_path, destinations, clock=clock, schedules=schedules, routes=routes)
    return serve_registry(host, port, scrape)


def serve_registry(host: str, port: int, scrape: CollectorRegistry) -> Server:
    """Serve ``scrape`` over HTTP on host:port (port 0: any free one) on every path."""
    try:
        httpd, thread = start_http_server(port, addr=host, registry=scrape)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StowdError(f"cannot serve metrics on {host_port(host, port)}: {reason}") from exc
    thread.name = "stowd-metrics"
    return Server(httpd, thread)

"""Which queue a config names, opened: ``open_queue`` for the daemon and the commands that
write it, ``open_status`` for the readers that never write (``stowd status``, ``stowd retry``)
and ``read_active_of`` for a metrics scrape.  ``config.database`` None: the SQLite file
``config.queue``, exactly as ever; set: the PostgreSQL database it names, as node
``config.node``, with ``config.queue`` the node's anchor (its lock file and state files)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from stowd.config.model import Config, Database
from stowd.pipeline.queue.core import Queue
from stowd.pipeline.queue.model import ActiveView
from stowd.pipeline.queue.sqlite import SqliteQueue, open_readonly, read_active


def open_queue(
    config: Config, *, clock: Callable[[], float] | None = None, readonly: bool = False
) -> Queue:
    """The queue of ``config``, not opened yet (``open()`` creates or migrates it and takes
    the single-daemon lock).  Its ``clock`` (None: this host's; a shared queue's corrected to
    the database's) is the one every time kept in it is on."""
    if config.database is None:
        return SqliteQueue(
            config.queue, clock=clock or time.time, readonly=readonly, node=config.node
        )
    from stowd.pipeline.queue.postgres import PostgresQueue  # noqa: PLC0415 - the extra

    return PostgresQueue(
        config.database,
        anchor=config.queue,
        node=config.node,
        clock=clock,
        readonly=readonly,
        lease=config.lease,
    )


def open_status(config: Config) -> Queue:
    """A queue for ``stowd status`` and ``stowd retry``: no lock, no schema change, never
    blocks the daemon.  Raises ``QueueError`` when there is none."""
    if config.database is None:
        return open_readonly(config.queue)
    return open_queue(config, readonly=True).open(lock=False)  # its schema checked


def read_active_of(
    queue: Path, database: Database | None, now: float, *, busy_timeout: float
) -> ActiveView:
    """The active rows by destination and state and the holds, for one metrics scrape, on a
    connection of its own closed before returning (``sqlite.read_active``): of the SQLite
    file ``queue``, or of ``database`` when there is one."""
    if database is None:
        return read_active(queue, now, busy_timeout=busy_timeout)
    from stowd.pipeline.queue.postgres import read_active_pg  # noqa: PLC0415 - the extra

    return read_active_pg(database, now, timeout=busy_timeout)

"""The persistent queue: the source of truth, and the only package that speaks SQL.

States of a row (one row per job: a file that appeared at a path with a given content)::

    pending ──claim──▶ claimed ──▶ settling ──move──▶ sent | failed
       ▲                  │
       └──── retry ───────┘      (a pending row whose next_attempt_at lies ahead is "waiting")

    gone: the file vanished before it could be sent (nothing to move)
    ignored: a file of a type the source ignores (left where it is, never sent)

Two backends keep it behind one interface (``core.Queue``): SQLite, one file the one daemon
of a host owns (the default), and PostgreSQL, a database several stowd hosts (nodes) share,
each claim recording its node and lease.  ``open_queue(config)`` picks the one the config
names; the pipeline above sees the same methods and types (``model.py``) either way.

``model.py``: the rows and counts as values.  ``core.py``: the logic both share.
``sqlite.py`` and ``postgres.py``: each engine's schema, migrations, connections and errors.
``opening.py``: the factory and the read-only openings of ``stowd status`` and the metrics.
"""

from stowd.pipeline.queue.core import ENQUEUE_PART, QUEUE_MODE, Queue
from stowd.pipeline.queue.model import (
    ACTIVE,
    ALREADY_STORED,
    DONE,
    HISTORY_SPAN,
    LOOKUP_MEMORY,
    STORED_WITH_WARNING,
    ActiveView,
    Classification,
    Failed,
    Hold,
    Holding,
    Job,
    Lost,
    Made,
    NewFile,
    Node,
    Tally,
    Throughput,
    Walk,
)
from stowd.pipeline.queue.opening import (
    open_queue,
    open_status,
    read_active_of,
)
from stowd.pipeline.queue.sqlite import (
    BUSY_TIMEOUT_MS,
    OPEN_MARK,
    SCHEMA_VERSION,
    WAL_HEADER,
    SqliteQueue,
    open_readonly,
    read_active,
    read_only_note,
)

__all__ = [
    "ACTIVE",
    "ALREADY_STORED",
    "BUSY_TIMEOUT_MS",
    "DONE",
    "ENQUEUE_PART",
    "HISTORY_SPAN",
    "LOOKUP_MEMORY",
    "OPEN_MARK",
    "QUEUE_MODE",
    "SCHEMA_VERSION",
    "STORED_WITH_WARNING",
    "WAL_HEADER",
    "ActiveView",
    "Classification",
    "Failed",
    "Hold",
    "Holding",
    "Job",
    "Lost",
    "Made",
    "NewFile",
    "Node",
    "Queue",
    "SqliteQueue",
    "Tally",
    "Throughput",
    "Walk",
    "open_queue",
    "open_readonly",
    "open_status",
    "read_active",
    "read_active_of",
    "read_only_note",
]

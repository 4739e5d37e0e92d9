"""This node's part in a fleet: the nodes of one shared (PostgreSQL) queue (issue 23).

A thread of its own (never held up by a slow share or a big purge) does, every third of the
node's ``lease`` (and at least every ``HEARTBEAT_EVERY`` seconds):

- renews the lease of every row this node holds (``held``: the claims its senders upload or
  settle, the moves it retries), however long an upload takes: a 4 GiB upload on a slow link
  keeps its files, while the claims of a node that died expire a lease after its last renewal
  and are taken over by another node (``Queue.reclaim``);
- writes the node's heartbeat (``nodes``: pid, host, start, version, lease) for ``stowd
  status``;
- renews whatever else its owner holds (``also``: ``stowd migrate``'s walk lease), so that
  a main loop held up (a slow count, a stalled terminal) loses no lease.

When it cannot (the database is away, or this node is cut off from it) the node has *lost the
database*: said once, its senders claim nothing new (``claiming``), uploads in flight finish
but their files are moved only once the queue records their outcome (``settle``), and once a
renewal works again that is said too and claiming resumes.  Claims another node took over
meanwhile are left to it: this node changes none of them (``Queue._ours``; the settle says
which node took them).

With a SQLite queue there is one node and nothing to renew: ``Fleet.of`` gives None.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Collection

from stowd import __version__
from stowd.config.model import Config
from stowd.errors import QueueError
from stowd.pipeline.queue import Queue

log = logging.getLogger("stowd.fleet")

HEARTBEAT_EVERY = 5.0  # seconds, at most (a third of the lease when that is shorter)


class Fleet:
    """Renews this node's leases and writes its heartbeat, on a thread of its own."""

    def __init__(
        self,
        config: Config,
        queue: Queue,
        held: Callable[[], Collection[int]],
        *,
        also: Callable[[], object] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.node = config.node
        self.lease = config.lease
        self.queue = queue
        self.held = held
        self.also = also  # more renewals, after each beat (it says its own trouble)
        self.clock = clock or queue.clock  # the queue's: the clock of the times it keeps
        self.every = min(HEARTBEAT_EVERY, self.lease / 3)
        self.started = self.clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_since: float | None = None  # when a renewal first failed (None: fine)

    @classmethod
    def of(
        cls,
        config: Config,
        queue: Queue,
        held: Callable[[], Collection[int]],
        also: Callable[[], object] | None = None,
    ) -> Fleet | None:
        """The fleet part of a node of a shared queue; None with SQLite."""
        return None if config.database is None else cls(config, queue, held, also=also)

    @property
    def claiming(self) -> bool:
        """May this node claim new files (its last renewal and heartbeat were recorded)?"""
        return self._lost_since is None

    def start(self) -> None:
        self.started = self.clock()  # the queue is open: its clock is the database's now
        self.beat()  # the first heartbeat before any claim
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            # each on its own: a beat's unexpected trouble must not cost the other renewals
            for step in (self.beat, self.also):
                if step is None:
                    continue
                try:
                    step()
                except Exception:
                    log.exception("unexpected error renewing this node's leases; going on")
        self.queue.release_connection()

    def beat(self) -> bool:
        """Renew the held rows' leases and write the heartbeat; False when the database
        could not record them (the node has lost it: said once)."""
        ids = set(self.held())
        try:
            renewed = self.queue.renew(ids, self.clock() + self.lease) if ids else 0
            self.queue.heartbeat(
                pid=os.getpid(),
                host=socket.gethostname(),
                started=self.started,
                version=__version__,
                lease=self.lease,
            )
        except QueueError as exc:
            self._lost(exc)
            return False
        self._back()
        if renewed < len(ids):  # finished meanwhile, or taken over (then left to that node)
            log.debug("node %s: %d held row(s) not renewed", self.node, len(ids) - renewed)
        return True

    def _lost(self, exc: QueueError) -> None:
        if self._lost_since is not None:
            return
        self._lost_since = self.clock()
        log.error(
            "node %s lost the database (%s): claiming nothing new; uploads in flight finish, "
            "but their files are moved only once the queue records it; after %gs without "
            "renewal (lease) other nodes take over this node's files",
            self.node,
            exc,
            self.lease,
        )

    def _back(self) -> None:
        if self._lost_since is None:
            return
        away = self.clock() - self._lost_since
        self._lost_since = None
        log.warning(
            "node %s reaches the database again (after %.0fs): claiming resumes", self.node, away
        )

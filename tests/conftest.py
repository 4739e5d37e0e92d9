"""Shared fixtures.

``orthanc``: a started, empty, real Orthanc with DICOMweb (a fresh one per test, in
``tmp_path / "orthanc"``).  When Orthanc or its DICOMweb plugin is not installed the test is
skipped, or fails when the environment variable ``CI`` is ``"true"`` (CI must never skip it).

``archive``: the same for each real archive in turn (``archives.NAMES``: Orthanc, then a
tiny_pacs from the test extras), so a test taking it runs against both.

Test files make DICOM data with the functions of ``dicomgen`` (``from dicomgen import
make_study``): the helpers live in ``tests/support/`` (its README.md says what each is for),
which pytest puts on ``sys.path`` (``pythonpath`` in pyproject.toml); ``tests/`` itself is on it
too because it has no ``__init__.py``, so test files may import each other's helpers.

Every test that starts an archive, a stowd or other child process, or a local server is marked
``integration`` here (``marking.py``), so ``pytest -m "not integration"`` runs the unit tests.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import archives
import pytest
from archives import Archive
from browser import browser_missing_reason, headless_chromium
from harness import Clock
from leaks import children, collected, reap_zombies
from marking import ARCHIVE_FIXTURES, starts_something
from needs import require
from orthanc import Orthanc, orthanc_missing_reason
from postgres import PostgresCluster, node_config, postgres_missing_reason
from selenium.webdriver import Chrome
from tinypacs import TinyPacs, tiny_pacs_missing_reason

from stowd.pipeline.queue import Queue, SqliteQueue, open_queue

_OWN_BASETEMP = pytest.StashKey[Path]()
_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Give this session its own temp folder unless ``--basetemp`` names one.

    Sessions that share pytest's default ``/tmp/pytest-of-<user>`` clean each other's numbered
    folders on exit, and pytest's cleanup then leaks a ``scandir`` iterator whose
    ResourceWarning our ``filterwarnings = error`` turns into exit status 1 after every test
    passed.  A private folder (0700, from ``mkdtemp``) keeps two suites run side by side apart.
    """
    if config.option.basetemp is not None:
        return
    own = Path(tempfile.mkdtemp(prefix="stowd-pytest-"))
    config.stash[_OWN_BASETEMP] = own
    config.option.basetemp = str(own / "t")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove this session's own temp folder when every test passed; keep it to look into else."""
    own = config.stash.get(_OWN_BASETEMP, None)
    if own is None:
        return
    if config.stash.get(_EXIT_STATUS, 1) == 0:
        _remove_tree(own)
    else:
        print(f"\ntest files kept in {own}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``integration`` every test that starts a real archive, a stowd subprocess or a
    local server, itself or through a fixture (``marking.py`` says how it is found)."""
    for item in items:
        if isinstance(item, pytest.Function) and _starts_something(item):
            item.add_marker(pytest.mark.integration)


def _starts_something(item: pytest.Function) -> bool:
    if ARCHIVE_FIXTURES.intersection(item.fixturenames):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("queue_backend") == "postgresql":
        return True  # the queue in the session's PostgreSQL cluster
    fixtures = item._fixtureinfo.name2fixturedefs.values()
    return starts_something(item.function) or any(
        starts_something(defs[-1].func) for defs in fixtures if defs
    )


@pytest.fixture(autouse=True)
def no_child_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test that leaves a child process behind, not a later one.

    A child killed but never waited for (or a ``Popen`` dropped while it runs) is found by
    the garbage collector whenever it next runs, and ``Popen.__del__``'s ResourceWarning
    ("subprocess N is still running") then fails whichever test is running at that moment
    (``filterwarnings = error``).  Here, after each test and its fixtures: a child that
    exited unreaped (a zombie) fails it; after an integration test also a child started
    during it and still running, and what a garbage collection then finds unclosed.
    """
    integration = request.node.get_closest_marker("integration") is not None
    before = children() if integration else {}
    yield
    left = reap_zombies()
    if integration:
        left += [f"{about} still running" for pid, about in children().items() if pid not in before]
    found = collected() if left or integration else []
    if left or found:
        pytest.fail(
            "left behind by this test (a child never waited for, or an object never closed):\n"
            + "\n".join([*(f"child process {about}" for about in left), *found])
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


def _remove_tree(top: Path) -> None:
    """Remove ``top`` without recursion (tests make folders 1,500 deep), opening folders a test
    left without write or search permission; what still cannot go stays."""
    pending, folders = [top], []
    while pending:
        folder = pending.pop()
        _allow(folder)
        folders.append(folder)
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _allow(folder: Path) -> None:
    """Open a real folder (never a link's target) to its owner."""
    try:
        if stat.S_ISDIR(folder.lstat().st_mode):
            folder.chmod(stat.S_IRWXU)
    except OSError:
        pass


def require_orthanc() -> None:
    """Skip the calling test (fail it under CI=true) when no test Orthanc can run here."""
    require(orthanc_missing_reason())


@pytest.fixture
def orthanc_required() -> None:
    """For tests that run Orthanc themselves: skip (fail under CI=true) when it is missing."""
    require_orthanc()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running, empty Orthanc for this test; stopped (killed) after it, pass or fail."""
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc")
    try:
        server.start()
        yield server
    finally:
        # Its storage is thrown away, so skip the ~2.5 s clean shutdown.
        server.kill()


@pytest.fixture(params=archives.NAMES)
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    """A running, empty real archive for this test: Orthanc, then tiny_pacs; killed after it."""
    server: Archive
    if request.param == "orthanc":
        require_orthanc()
        server = Orthanc(tmp_path / "orthanc")
    else:
        require(tiny_pacs_missing_reason())
        server = TinyPacs(tmp_path / "tiny_pacs")
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def clock() -> Clock:
    """The queue's clock (a test file may override it with another start)."""
    return Clock()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private PostgreSQL cluster for the session (tests/support/postgres.py), stopped
    and removed at its end; skipped (failed under CI=true) without PostgreSQL or psycopg."""
    require(postgres_missing_reason())
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_database(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh database of the session's cluster, dropped after the test."""
    name = postgres_cluster.new_database()
    yield name
    postgres_cluster.drop_database(name)


@pytest.fixture
def nodes(
    postgres_cluster: PostgresCluster, pg_database: str, tmp_path: Path, clock: Clock
) -> Iterator[tuple[Queue, Queue]]:
    """Node A and node B on one fresh PostgreSQL queue, each with its own state folder, on
    the test's clock."""
    opened = [
        open_queue(node_config(postgres_cluster, pg_database, tmp_path, n), clock=clock).open()
        for n in ("node-a", "node-b")
    ]
    try:
        yield opened[0], opened[1]
    finally:
        for q in opened:
            q.close()


@pytest.fixture
def queue_backend() -> str:
    """The backend of the ``queue`` fixture: SQLite, unless a test file asks for both
    (``from postgres import queue_backend`` there; see ``tests/support/postgres.py``)."""
    return "sqlite"


@pytest.fixture
def queue(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock, queue_backend: str
) -> Iterator[Queue]:
    """A fresh queue on the test's clock: a SQLite file in ``tmp_path``, or (backend
    ``postgresql``) a fresh database of the session's cluster, as node ``node-a``."""
    q: Queue
    if queue_backend == "postgresql":
        cluster = request.getfixturevalue("postgres_cluster")
        config = node_config(cluster, request.getfixturevalue("pg_database"), tmp_path, "node-a")
        q = open_queue(config, clock=clock).open()
    else:
        q = SqliteQueue(tmp_path / "q.db", clock=clock).open()
    yield q
    q.close()


@pytest.fixture
def sqlite_queue(tmp_path: Path, clock: Clock) -> Iterator[SqliteQueue]:
    """A fresh SQLite queue in ``tmp_path`` (what only SQLite has: its file, its plans)."""
    q = SqliteQueue(tmp_path / "q.db", clock=clock).open()
    yield q
    q.close()


@pytest.fixture
def browser() -> Iterator[Chrome]:
    """A headless Chromium with scripts on (tests/support/browser.py), quit after the test;
    skipped (failed under CI=true) when Debian's chromium or chromium-driver is missing."""
    require(browser_missing_reason())
    with headless_chromium() as driver:
        yield driver


@pytest.fixture
def browser_without_js() -> Iterator[Chrome]:
    """The same with JavaScript switched off: the page as a plain HTML client sees it."""
    require(browser_missing_reason())
    with headless_chromium(javascript=False) as driver:
        yield driver

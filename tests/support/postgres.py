"""A real PostgreSQL (Debian's ``postgresql`` package) for the queue's PostgreSQL backend.

``PostgresCluster(folder)`` makes a private cluster with ``initdb`` in *folder* (a temporary
folder of its own), with TLS (a test CA and a server certificate for ``localhost`` and
127.0.0.1 made by openssl, ``tlsproxy.make_pki``), and serves it with ``pg_ctl`` on a free
loopback port (another one if the port was taken meanwhile) and on a unix socket in the
folder (and on the addresses ``listen`` names, for a node in a network namespace).  As
root, every PostgreSQL program runs as the unprivileged ``postgres`` user (``runuser``),
which owns the folder.  The superuser ``postgres`` connects without a password
over the socket only (``admin``); the role ``stowd`` (what stowd's tests connect as) needs
its password, ``PASSWORD``, over TCP, with or without TLS, so the password stowd reads from a
secret is what lets it in.  ``new_database()`` makes a fresh database owned by ``stowd``;
``url(db)`` is its ``postgresql://`` URL (no password: stowd's config never holds one in the
URL).  ``stop()`` stops it (``pg_ctl stop -m fast``); ``start()`` after a ``stop()`` serves
the same cluster again on the same port.

pg_ctl starts the server detached (it is nobody's child once started), so it outlives each
test that uses it and the session fixture stops it at the end.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Clock
from localserver import Served
from orthanc import free_port
from tlsproxy import Pki, make_pki

from stowd.config.model import Config, Database
from stowd.config.secrets import Secret
from stowd.pipeline.queue import Queue

POSTGRES_ENV = "STOWD_TEST_POSTGRES_BIN"
"""Environment variable naming the folder of initdb, pg_ctl and postgres to use."""
_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_USER = "postgres"  # the unprivileged user the server runs as when the tests run as root
ROLE = "stowd"
PASSWORD = "stowd-test-secret"
_PORT_IN_USE = "Address already in use"
_PORT_ATTEMPTS = 5
_names = itertools.count(1)


class PostgresError(RuntimeError):
    """PostgreSQL is missing, did not start, or a command of its failed."""


def find_postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (the newest installed version)."""
    override = os.environ.get(POSTGRES_ENV)
    if override:
        return Path(override) if (Path(override) / "initdb").exists() else None
    found = sorted(Path("/").glob(_BIN_GLOB.lstrip("/")), key=_version)
    found = [b for b in found if (b / "initdb").exists() and (b / "pg_ctl").exists()]
    return found[-1] if found else None


def _version(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in path.parent.name.split(".") if p.isdigit())


def postgres_missing_reason() -> str | None:
    """Why a test PostgreSQL cannot run here (the server or psycopg), or None if it can."""
    problems = []
    if find_postgres_bin() is None:
        problems.append(
            f"PostgreSQL's server is missing (looked for {_BIN_GLOB}/initdb"
            f"{' and $' + POSTGRES_ENV if os.environ.get(POSTGRES_ENV) else ''}; "
            "apt-get install postgresql)"
        )
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError:
        problems.append("psycopg is missing (pip install -e '.[postgresql]')")
    if os.geteuid() == 0 and _server_user() is None:
        problems.append(f"running as root and there is no {SERVER_USER!r} user to run it as")
    if shutil.which("openssl") is None:
        problems.append("the openssl command is missing (apt-get install openssl)")
    return "; ".join(problems) or None


def _server_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        return None


class PostgresCluster(Served):
    """A private PostgreSQL cluster in a folder of its own, on a free loopback port."""

    def __init__(self, *, startup_timeout: float = 60.0, listen: tuple[str, ...] = ()) -> None:
        """``listen``: addresses served besides loopback (``stowd`` may log in from their
        networks): a node in a network namespace of its own reaches the server itself."""
        self.startup_timeout = startup_timeout
        self.listen = listen
        self.folder = Path(tempfile.mkdtemp(prefix="stowd-pg-"))
        self.port = free_port()
        self._bin = find_postgres_bin()
        self._as: list[str] = []
        self._running = False
        self.pki: Pki | None = None

    # -- where things are --------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "run"

    @property
    def log_path(self) -> Path:
        return self.folder / "postgres.log"

    @property
    def ca_cert(self) -> Path:
        assert self.pki is not None
        return self.pki.ca_cert

    def url(self, database: str, **params: str) -> str:
        """The URL stowd is given for *database* (role ``stowd``, no password in it)."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}" + (
            f"?{query}" if query else ""
        )

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Make the cluster (the first time) and serve it; another port if its was taken."""
        if self._running:
            return
        if self._bin is None:
            raise PostgresError(postgres_missing_reason() or "PostgreSQL not found")
        if not self.data.exists():
            self._init()
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._start_once()
                return
            except PostgresError as exc:
                if _PORT_IN_USE not in str(exc) or attempt == _PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()

    def _init(self) -> None:
        user = _server_user() if os.geteuid() == 0 else None
        self.pki = make_pki(self.folder / "pki")
        self.socket_dir.mkdir()
        if user is not None:
            self._as = ["runuser", "-u", SERVER_USER, "--"]
            for path in (self.folder, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip
        for name in ("server.pem", "server.key", "ca.pem"):
            shutil.copy(self.pki.folder / name, self.data / name)
            if user is not None:
                os.chown(self.data / name, user.pw_uid, user.pw_gid)
        (self.data / "server.key").chmod(0o600)
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n"
            f"host all {ROLE} ::1/128 scram-sha-256\n"
            + (f"host all {ROLE} samenet scram-sha-256\n" if self.listen else ""),
            encoding="utf-8",
        )
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
            )

    def _start_once(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses={','.join(('127.0.0.1', *self.listen))} "
            f"-k {self.socket_dir} "
            "-c unix_socket_permissions=0777"
        )
        since = self.log_path.stat().st_size if self.log_path.exists() else 0
        done = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options,
            "-t", str(int(self.startup_timeout)), "-w", "start", check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise PostgresError(
                f"pg_ctl start failed ({done.returncode}) on port {self.port}: "
                f"{done.stdout}{done.stderr}\nlog:\n{self.log_tail(since)}"
            )
        self._running = True
        if since == 0:
            self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}' CREATEDB")

    def stop(self) -> None:
        """Stop the server (fast: open sessions are cut); the cluster stays for ``start``."""
        if not self._running:
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        self._running = False

    def remove(self) -> None:
        """Stop it and delete its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self._bin is not None
        done = subprocess.run(
            [*self._as, str(self._bin / program), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=self.startup_timeout + 30,
            stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise PostgresError(f"{program} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def log_tail(self, since: int = 0, lines: int = 30) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- administration ------------------------------------------------------------------
    def admin(
        self, sql: str, params: tuple[Any, ...] = (), *, database: str = "postgres"
    ) -> list[Any]:
        """Run *sql* as the superuser (over the unix socket); its rows, if any."""
        import psycopg  # noqa: PLC0415 - only where PostgreSQL is there

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname=database,
            autocommit=True, connect_timeout=10,
        ) as conn:  # fmt: skip
            cur = conn.execute(sql.encode(), params)  # bytes: a literal query, nothing composed
            return cur.fetchall() if cur.description else []

    def new_database(self) -> str:
        """A fresh, empty database owned by ``stowd``; its name."""
        name = f"t{os.getpid()}_{next(_names)}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def terminate(self, database: str) -> int:
        """Cut every session of *database* (``pg_terminate_backend``); how many."""
        rows = self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        )
        return len(rows)

    def wait_accepting(self, timeout: float = 30.0) -> None:
        """Until the server takes a connection again (after ``start``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.admin("SELECT 1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_backend(request: pytest.FixtureRequest) -> str:
    """Imported by a test file (``from postgres import queue_backend``), this overrides
    conftest's: the file's ``queue`` tests run against SQLite and against PostgreSQL
    (conftest marks the PostgreSQL ones ``integration``)."""
    return str(request.param)


def node_config(
    cluster: PostgresCluster, database: str, folder: Path, node: str, **params: str
) -> Config:
    """A config whose queue is *database* of *cluster*, as node *node* with its state folder
    in *folder*/<node>; the password comes from a secret file, as an operator's would."""
    secret = folder / f"{node}.password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    state = folder / node
    return Config(
        path=folder / f"{node}.yaml",
        queue=state / "node.queue",
        sources=(),
        destinations={},
        database=Database(cluster.url(database, **params), Secret("file", str(secret))),
        node=node,
    )


def pass_time(queue: Queue, clock: Clock, seconds: float) -> None:
    """*seconds* pass for *queue*: on the test's *clock* (every time the queue keeps but
    leases and heartbeats) and, for a PostgreSQL queue, on the database's clock its leases
    and the nodes' heartbeats are kept on (each lease *seconds* nearer its end, each
    heartbeat *seconds* older: the server's own clock cannot be set)."""
    clock.now += seconds
    if queue.__class__.__name__ == "PostgresQueue":
        with queue._tx() as db:
            db.execute(
                "UPDATE files SET lease_until = lease_until - ? WHERE lease_until IS NOT NULL",
                (seconds,),
            )
            db.execute("UPDATE nodes SET heartbeat = heartbeat - ?", (seconds,))
            db.execute(
                "UPDATE files SET read_until = read_until - ? WHERE read_until IS NOT NULL",
                (seconds,),
            )

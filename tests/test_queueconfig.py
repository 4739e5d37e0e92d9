"""``queue:`` a SQLite file or a ``postgresql://`` URL, with ``queue_password``, ``node`` and
``state`` (issue 23): what the loader accepts, how it normalizes the URL, and every problem
with its key and line.  No PostgreSQL is needed: only the URL is read (by libpq through
psycopg, when ``stowd[postgresql]`` is installed)."""

from __future__ import annotations

import importlib
import itertools
import socket
import sys
from pathlib import Path

import pytest
from needs import require
from test_config import MINIMAL, REPO, find, load_text, problems_of, write

from stowd.commands.cli import main
from stowd.config.load import load_config
from stowd.config.model import Config, Database
from stowd.config.secrets import Secret
from stowd.errors import ConfigError, ConfigProblem
from stowd.service.daemon import Daemon

HOST = "db.example"
URL = f"postgresql://stowd@{HOST}:5432/stowd"
SECRET = "s3cret-Pw-not-shown"
EXTRA_HINT = "pip install 'stowd[postgresql]'"


def pg(url: str = URL, extra: str = "state: ./state\n") -> str:
    """The minimal config with a PostgreSQL queue (``extra``: the lines after queue)."""
    return MINIMAL.replace("queue: ./state/queue.db\n", f"queue: {url}\n{extra}")


@pytest.fixture
def psycopg() -> None:
    """Loading a PostgreSQL queue needs stowd[postgresql] (psycopg), which reads the URL
    with libpq: without it such a config is refused (test below)."""
    try:
        importlib.import_module("psycopg.conninfo")
    except ImportError:
        require("stowd[postgresql] (psycopg) is not installed")


@pytest.fixture
def no_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installation without stowd[postgresql]: psycopg cannot be imported."""
    for name in ("psycopg", "psycopg.conninfo"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> str:
    """This host's name, as the loader sees it (a valid node name)."""
    monkeypatch.setattr(socket, "gethostname", lambda: "gw-ct-7")
    return "gw-ct-7"


def without_extra(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    """The problems but the missing stowd[postgresql] (these tests pass with it or not)."""
    return [p for p in problems if EXTRA_HINT not in p.message]


def queue_problems(problems: list[ConfigProblem]) -> list[str]:
    return [p.message for p in without_extra(problems) if p.key == "queue"]


# --------------------------------------------------------------------------- SQLite


def test_a_sqlite_queue_has_no_database_and_the_host_as_node(tmp_path: Path, host: str) -> None:
    config = load_text(tmp_path, MINIMAL)

    assert config.database is None
    assert config.queue == tmp_path / "state" / "queue.db"
    assert config.node == host
    assert config.queue_shown() == str(tmp_path / "state" / "queue.db")


def test_a_sqlite_queue_takes_a_node_name_as_written(tmp_path: Path, host: str) -> None:
    config = load_text(tmp_path, MINIMAL + "node: scanner-room.2\n")

    assert config.node == "scanner-room.2"


def test_a_sqlite_queue_makes_a_node_name_of_an_odd_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One host alone needs no name the others know: an odd host name does not stop it."""
    monkeypatch.setattr(socket, "gethostname", lambda: "ward 3/pc")

    assert load_text(tmp_path, MINIMAL).node == "ward-3-pc"


def test_a_sqlite_queue_refuses_state_queue_password_and_a_bad_node(
    tmp_path: Path, host: str
) -> None:
    text = MINIMAL + "state: ./st\nqueue_password: {env: PGPASS}\nnode: gw ct\n"

    problems = problems_of(tmp_path, text)

    assert [(p.key, p.line) for p in problems] == [
        ("state", 11),
        ("queue_password", 12),
        ("node", 13),
    ]
    assert find(problems, "state").message.startswith("is for a PostgreSQL queue")
    assert "leave state out" in find(problems, "state").message
    assert "has no password" in find(problems, "queue_password").message
    assert "names may use only letters" in find(problems, "node").message


def test_a_queue_that_is_no_text_is_explained(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, MINIMAL.replace("./state/queue.db", "[a, b]"))

    assert (problem.key, problem.line) == ("queue", 1)
    assert problem.message == (
        "expected the SQLite queue's file path or a postgresql:// URL, got a list"
    )


# --------------------------------------------------------------------------- PostgreSQL


def test_a_postgresql_queue(psycopg: None, tmp_path: Path, host: str) -> None:
    extra = "queue_password: {file: /etc/stowd/db.password}\nstate: ./state\n"
    config = load_text(tmp_path, pg(extra=extra))

    assert config.database == Database(
        f"{URL}?sslmode=verify-full",
        Secret("file", "/etc/stowd/db.password"),
        remote=(HOST,),
        sslmode="verify-full",
    )
    assert config.node == host
    assert config.queue == tmp_path / "state" / "node.queue"  # the node's local anchor
    assert config.spool == tmp_path / "state" / "node.queue.spool"
    assert config.warnings == []
    assert config.queue_shown() == (
        f"{URL}?sslmode=verify-full (node {host}, state {tmp_path / 'state'})"
    )


def test_a_postgresql_queue_s_lease(psycopg: None, tmp_path: Path, host: str) -> None:
    assert load_text(tmp_path, pg()).lease == 120.0  # the default
    assert load_text(tmp_path, pg(extra="state: ./state\nlease: 30s\n")).lease == 30.0
    (problem,) = problems_of(tmp_path, pg(extra="state: ./state\nlease: 2s\n"))
    assert problem.key == "lease"
    assert "must be at least 6s (the node renews its claims every third of it)" in (problem.message)


def test_a_sqlite_queue_refuses_a_lease(tmp_path: Path, host: str) -> None:
    (problem,) = problems_of(tmp_path, MINIMAL + "lease: 1m\n")
    assert problem.key == "lease"
    assert "leave lease out" in problem.message


def test_a_receiving_source_keeps_its_files_in_the_state_folder(
    psycopg: None, tmp_path: Path, host: str
) -> None:
    text = pg(extra="state: /var/lib/stowd\n").replace(
        "    watch: ./drop/ct1\n",
        "    receive: {ae_title: STOWD, port: 11112, bind: 127.0.0.1}\n",
    )

    (source,) = load_text(tmp_path, text).sources

    assert source.watch == Path("/var/lib/stowd/received/ct1")


@pytest.mark.parametrize("scheme", ["postgres", "PostgreSQL"])
def test_both_schemes_libpq_knows_are_accepted_in_lower_case(
    psycopg: None, tmp_path: Path, host: str, scheme: str
) -> None:
    config = load_text(tmp_path, pg(f"{scheme}://stowd@{HOST}/stowd"))

    assert config.database is not None
    assert config.database.url == f"{scheme.lower()}://stowd@{HOST}/stowd?sslmode=verify-full"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://stowd@localhost/stowd",
        "postgresql://stowd@127.0.0.1:5433/stowd",
        "postgresql://stowd@127.8.9.10/stowd",
        "postgresql://stowd@[::1]:5432/stowd",
        "postgresql:///stowd",  # libpq's default: the unix socket
        "postgresql://%2Frun%2Fpostgresql/stowd",
        "postgresql:///stowd?host=/run/postgresql",
        "postgresql://localhost,127.0.0.1:5433/stowd",
    ],
)
def test_a_local_database_gets_no_sslmode(
    psycopg: None, tmp_path: Path, host: str, url: str
) -> None:
    config = load_text(tmp_path, pg(url))

    assert config.database is not None
    assert (config.database.url, config.database.remote) == (url, ())
    assert config.warnings == []


@pytest.mark.parametrize(
    ("url", "remote"),
    [
        ("postgresql://stowd@10.0.0.5/stowd", ("10.0.0.5",)),
        ("postgresql://stowd@[fd00::5]:5432/stowd", ("fd00::5",)),
        ("postgresql://stowd@localhost,db2.example:5433/stowd", ("db2.example",)),
        ("postgresql://stowd@localhost/stowd?hostaddr=10.0.0.6", ("10.0.0.6",)),
        ("postgresql:///stowd?host=db3.example&port=5433", ("db3.example",)),
        ("postgresql://stowd@localhost/stowd?host=db3.example", ("db3.example",)),
    ],
)
def test_a_remote_database_is_verified_unless_the_url_says_otherwise(
    psycopg: None, tmp_path: Path, host: str, url: str, remote: tuple[str, ...]
) -> None:
    config = load_text(tmp_path, pg(url))

    assert config.database is not None
    joiner = "&" if "?" in url else "?"
    assert config.database.url == f"{url}{joiner}sslmode=verify-full"
    assert (config.database.remote, config.database.sslmode) == (remote, "verify-full")
    assert config.warnings == []


def test_an_empty_query_gets_the_sslmode_without_a_second_question_mark(
    psycopg: None, tmp_path: Path, host: str
) -> None:
    config = load_text(tmp_path, pg(f"{URL}?"))

    assert config.database is not None
    assert config.database.url == f"{URL}?sslmode=verify-full"


@pytest.mark.parametrize(
    ("query", "mode"),
    [
        ("sslmode=disable", "disable"),
        ("sslmode=allow", "allow"),
        ("sslmode=prefer", "prefer"),
        ("sslmode=require", "require"),
        ("ssl=true", "require"),  # libpq's alias
    ],
)
def test_a_weaker_sslmode_to_a_remote_host_is_kept_and_warned_about(
    psycopg: None, tmp_path: Path, host: str, query: str, mode: str
) -> None:
    config = load_text(tmp_path, pg(f"{URL}?{query}"))

    assert config.database is not None
    assert config.database.url == f"{URL}?{query}"
    (warning,) = config.warnings
    assert warning.startswith(f"queue: the connection to {HOST} is not verified (sslmode={mode})")
    assert "sslmode=verify-full" in warning


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_a_verifying_sslmode_is_kept_without_a_warning(
    psycopg: None, tmp_path: Path, host: str, mode: str
) -> None:
    config = load_text(tmp_path, pg(f"{URL}?sslmode={mode}"))

    assert config.database is not None
    assert config.database.url == f"{URL}?sslmode={mode}"
    assert config.warnings == []


def test_a_weak_sslmode_to_a_local_database_is_no_warning(
    psycopg: None, tmp_path: Path, host: str
) -> None:
    config = load_text(tmp_path, pg("postgresql://stowd@127.0.0.1/stowd?sslmode=disable"))

    assert config.warnings == []


def test_certificate_paths_resolve_against_the_config_folder(
    psycopg: None, tmp_path: Path, host: str
) -> None:
    (tmp_path / "tls").mkdir()
    for name in ("db ca.pem", "me.pem", "me.key", "crl.pem"):
        (tmp_path / "tls" / name).write_text("x")
    (tmp_path / "crls").mkdir()
    query = (
        "sslrootcert=tls/db%20ca.pem&sslcert=./tls/me.pem&sslkey="
        f"{tmp_path}/tls/me.key&sslcrl=tls/crl.pem&sslcrldir=crls"
    )

    config = load_text(tmp_path, pg(f"{URL}?{query}"))

    assert config.database is not None
    assert config.database.url == (
        f"{URL}?sslrootcert={tmp_path}/tls/db%20ca.pem&sslcert={tmp_path}/tls/me.pem"
        f"&sslkey={tmp_path}/tls/me.key&sslcrl={tmp_path}/tls/crl.pem"
        f"&sslcrldir={tmp_path}/crls&sslmode=verify-full"
    )


def test_sslrootcert_system_is_the_systems_cas(psycopg: None, tmp_path: Path, host: str) -> None:
    config = load_text(tmp_path, pg(f"{URL}?sslrootcert=system"))

    assert config.database is not None
    assert config.database.url == f"{URL}?sslrootcert=system&sslmode=verify-full"


def test_certificate_paths_that_are_missing_are_named(tmp_path: Path, host: str) -> None:
    (tmp_path / "crl").mkdir()
    (tmp_path / "ca.pem").mkdir()  # a folder where a file belongs
    query = "sslrootcert=ca.pem&sslcert=/nowhere/me.pem&sslkey=me.key&sslcrl=crl&sslcrldir=nodir"

    problems = queue_problems(problems_of(tmp_path, pg(f"{URL}?{query}")))

    assert f"sslrootcert: {tmp_path}/ca.pem is not a file" in problems
    assert "sslcert: the file /nowhere/me.pem does not exist" in problems
    assert f"sslkey: the file {tmp_path}/me.key does not exist" in problems
    assert f"sslcrl: {tmp_path}/crl is not a file" in problems
    assert f"sslcrldir: the folder {tmp_path}/nodir does not exist" in problems


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://stowd:{SECRET}@{HOST}/stowd",
        f"postgresql://stowd:{SECRET}@{HOST}/stowd?sslmode=disable",
        f"postgresql://stowd:{SECRET}/x@{HOST}/stowd",  # an unescaped '/' in it
        f"postgresql://stowd:@{HOST}/stowd",  # an empty one
        f"postgresql://stowd@{HOST}/stowd?password={SECRET}",
        f"postgresql://stowd@{HOST}/stowd?pass%77ord={SECRET}",
    ],
)
def test_a_password_in_the_url_is_refused_and_never_shown(
    tmp_path: Path, host: str, url: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, pg(url))

    problem = find(without_extra(info.value.problems), "queue")
    assert problem.line == 1
    assert "put it in queue_password" in problem.message
    assert SECRET not in str(info.value)


def test_a_key_passphrase_in_the_url_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, pg(f"{URL}?sslpassword={SECRET}"))

    assert "key without a passphrase" in find(without_extra(info.value.problems), "queue").message
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mysql://stowd@db/stowd", " 'mysql://'"),
        ("sqlite:///var/lib/stowd/queue.db", " 'sqlite://'"),
        (f"stowd:{SECRET}@db://x", ""),  # what is not a scheme is not shown
    ],
)
def test_an_unknown_scheme_is_refused(tmp_path: Path, host: str, url: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, pg(url))

    (problem,) = info.value.problems
    assert (problem.key, problem.line) == ("queue", 1)
    assert problem.message == (
        f"unknown scheme{shown}: the queue is a file path (SQLite) or a postgresql:// URL "
        "(PostgreSQL)"
    )
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"{URL}?sslmode=verify_full", "sslmode='verify_full' is not one of disable, allow,"),
        (f"postgresql://stowd@{HOST}:99999/stowd", "the port '99999' is not a number from 1"),
        (f"postgresql://stowd@{HOST}:pg/stowd", "the port 'pg' is not a number from 1 to 65535"),
        (f"{URL}?port=5432,x", "the port 'x' is not a number from 1 to 65535"),
        (f"postgresql://stowd@{HOST}/sto%zzwd", "holds a '%' that is not a percent-encoded"),
        (f"postgresql://stowd@{HOST}/sto%00wd", "holds a '%' that is not a percent-encoded"),
        (f"{URL}?sslmode", "the query parameter 'sslmode' is not keyword=value"),
    ],
)
def test_a_malformed_url_is_refused(tmp_path: Path, host: str, url: str, expected: str) -> None:
    problems = queue_problems(problems_of(tmp_path, pg(url)))

    assert any(p.startswith(expected) for p in problems), problems


def test_libpq_refuses_what_it_does_not_know(psycopg: None, tmp_path: Path, host: str) -> None:
    (problem,) = problems_of(tmp_path, pg(f"{URL}?colour=blue"))

    assert (problem.key, problem.line) == ("queue", 1)
    assert problem.message == 'libpq cannot read it: invalid URI query parameter: "colour"'


def test_without_the_extra_a_postgresql_queue_says_what_to_install(
    no_psycopg: None, tmp_path: Path, host: str
) -> None:
    """As for the cloud logins: the missing library is one problem among the others."""
    problems = problems_of(tmp_path, pg(f"{URL}?sslrootcert=nope.pem", extra=""))

    assert [(p.key, p.line) for p in problems] == [("queue", 1), ("queue", 1), ("state", 1)]
    assert problems[0].message == (
        "a PostgreSQL queue needs the optional extra stowd[postgresql], which is not "
        "installed: pip install 'stowd[postgresql]' (into the environment stowd runs from)"
    )
    assert problems[1].message == f"sslrootcert: the file {tmp_path}/nope.pem does not exist"


def test_a_postgresql_queue_needs_state(tmp_path: Path, host: str) -> None:
    text = pg(extra="node: gw1\n")

    problem = find(problems_of(tmp_path, text), "state")

    assert problem.line == 1  # the queue's line: state is not there
    assert problem.message.startswith("required with a PostgreSQL queue: this node's own folder")


def test_a_postgresql_queue_needs_a_valid_node_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "ward 3")

    problem = find(problems_of(tmp_path, pg()), "node")

    assert problem.line == 1
    assert problem.message == (
        "this host's name 'ward 3' is not a valid node name (letters, digits, '_', '.' and "
        "'-'): set node: to this host's name among the nodes that share the queue"
    )


def test_a_written_node_name_is_used_whatever_the_host_name(
    psycopg: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "ward 3")

    assert load_text(tmp_path, pg(extra="node: ward-3\nstate: ./state\n")).node == "ward-3"


@pytest.mark.parametrize(
    ("state", "key", "message"),
    [
        (
            "./drop/ct1/state",
            "state",
            "is inside the watch folder of source 'ct1' ({base}/drop/ct1); this node's state "
            "folder itself would be picked up",
        ),
        (
            "./drop",
            "sources[0].watch",
            "",  # the watch folder inside the state folder is fine: received/ is there too
        ),
        (
            "./done/ct1/sent",
            "sources[0].sent",
            "holds this node's state folder ({base}/done/ct1/sent); retention would delete it",
        ),
        (
            "./done/ct1/failed/x",
            "sources[0].failed",
            "holds this node's state folder ({base}/done/ct1/failed/x); retention would delete it",
        ),
    ],
)
def test_the_state_folder_keeps_out_of_the_sources_folders(
    tmp_path: Path, host: str, state: str, key: str, message: str
) -> None:
    path = write(tmp_path, pg(extra=f"state: {state}\n"))
    try:
        load_config(path)
        problems: list[ConfigProblem] = []
    except ConfigError as exc:
        problems = [p for p in exc.problems if p.key != "queue"]  # stowd[postgresql] or not
    if not message:
        assert problems == []
        return
    (problem,) = problems
    assert (problem.key, problem.message) == (key, message.format(base=tmp_path))
    if key == "state":
        assert problem.line == 2


def test_queue_password_takes_every_kind_of_secret(
    psycopg: None, tmp_path: Path, host: str
) -> None:
    kinds = {
        SECRET: Secret("inline", SECRET),
        "{env: STOWD_PG}": Secret("env", "STOWD_PG"),
        "{file: /etc/stowd/db.password}": Secret("file", "/etc/stowd/db.password"),
        "{credential: db-password}": Secret("credential", "db-password"),
    }
    for written, secret in kinds.items():
        extra = f"queue_password: {written}\nstate: ./state\n"
        database = load_text(tmp_path, pg(extra=extra)).database
        assert database is not None
        assert database.password == secret


def test_many_problems_of_the_queue_keys_come_together_with_their_lines(
    tmp_path: Path, host: str
) -> None:
    text = (
        pg(
            f"postgresql://stowd:{SECRET}@{HOST}/stowd",
            extra="queue_password: {vault: db}\nnode: gw/1\nstate: ./drop/ct1/st\n",
        )
        + "colour: blue\n"
    )

    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)

    found = [(p.key, p.line) for p in without_extra(info.value.problems)]
    assert found == [
        ("queue", 1),
        ("queue_password", 2),
        ("node", 3),
        ("state", 4),
        ("colour", 14),
    ]
    assert SECRET not in str(info.value)


# --------------------------------------------------------------------------- shown


def test_no_password_shows_in_the_config_or_its_database(
    psycopg: None, tmp_path: Path, host: str
) -> None:
    config = load_text(tmp_path, pg(extra=f"queue_password: {SECRET}\nstate: ./state\n"))
    database = config.database
    assert isinstance(config, Config) and database is not None

    for text in (repr(config), str(config), repr(database), str(database), database.shown()):
        assert SECRET not in text
    assert SECRET not in config.queue_shown()
    assert database.password is not None and database.password.value() == SECRET


def test_an_inline_queue_password_in_a_file_others_read_is_warned_about(
    psycopg: None, tmp_path: Path, host: str
) -> None:
    path = write(tmp_path, pg(extra=f"queue_password: {SECRET}\nstate: ./state\n"))
    path.chmod(0o644)

    (warning,) = load_config(path).warnings
    assert warning.startswith(f"{path} holds secrets of queue_password inline and others may")
    path.chmod(0o640)
    assert load_config(path).warnings == []


def test_check_config_shows_the_database_node_and_state_never_the_password(
    psycopg: None, tmp_path: Path, host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = f"queue_password: {SECRET}\nnode: gw1\nstate: ./state\n"
    path = write(tmp_path, pg(f"{URL}?sslmode=require", extra=extra))
    path.chmod(0o600)

    assert main(["check-config", "-c", str(path)]) == 0

    out = capsys.readouterr().out
    assert f"  queue: {URL}?sslmode=require (node gw1, state {tmp_path}/state)\n" in out
    assert f"WARNING: queue: the connection to {HOST} is not verified (sslmode=require)" in out
    assert SECRET not in out


def test_check_config_names_what_to_install_without_the_extra(
    no_psycopg: None, tmp_path: Path, host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, pg(f"postgresql://stowd:{SECRET}@{HOST}/stowd"))

    assert main(["check-config", "-c", str(path)]) == 2

    err = capsys.readouterr().err
    assert EXTRA_HINT in err
    assert "line 1: queue: a password in the URL" in err
    assert SECRET not in err


def test_check_config_shows_a_sqlite_queue_as_its_file(
    tmp_path: Path, host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, MINIMAL)

    assert main(["check-config", "-c", str(path)]) == 0

    assert f"  queue: {tmp_path}/state/queue.db\n" in capsys.readouterr().out


def test_the_examples_commented_postgresql_queue_loads_as_written(
    psycopg: None, tmp_path: Path, host: str
) -> None:
    """config.example.yaml's commented PostgreSQL queue (the '#queue: postgresql' line and
    the '#' lines after it) is valid as written, its CA file and state folder moved here."""
    lines = (REPO / "config.example.yaml").read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("#queue: postgresql"))
    example = [
        line[1:]
        for line in itertools.takewhile(lambda x: x[:2] in ("#q", "#n", "#s"), lines[start:])
    ]
    assert [line.split(":")[0] for line in example] == ["queue", "queue_password", "node", "state"]
    (tmp_path / "db-ca.pem").write_text("x")
    text = "\n".join(example).replace("/etc/stowd/db-ca.pem", f"{tmp_path}/db-ca.pem")
    text = text.replace("/var/lib/stowd", f"{tmp_path}/state")

    config = load_text(tmp_path, MINIMAL.replace("queue: ./state/queue.db\n", text + "\n"))

    assert config.database is not None
    assert config.database.password == Secret("file", "/etc/stowd/db.password")
    assert (config.node, config.queue) == ("gw-ct-1", tmp_path / "state" / "node.queue")
    assert config.database.url.endswith(
        "/stowd?sslrootcert=" + f"{tmp_path}/db-ca.pem&sslmode=verify-full"
    )


# -- a reload (SIGHUP) never moves the queue ---------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [
        ("queue: ./state/queue.db\n", "queue: ./elsewhere/queue.db\n"),
        ("queue: ./state/queue.db\n", "queue: ./state/queue.db\nnode: gw-ct-9\n"),
    ],
    ids=["queue", "node"],
)
def test_a_reload_that_moves_the_queue_or_renames_the_node_is_refused(
    tmp_path: Path, host: str, change: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The queue, the database and the node name are fixed for the life of the process: a
    node renamed under its own claims would leave them to expire as a dead node's."""
    path = write(tmp_path, MINIMAL)
    daemon = Daemon(load_config(path))
    write(tmp_path, MINIMAL.replace(*change))
    assert daemon._read_new_config() is None
    assert "reload refused: the queue moved" in caplog.text
    write(tmp_path, MINIMAL)
    assert daemon._read_new_config() is not None

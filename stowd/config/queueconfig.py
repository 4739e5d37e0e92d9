"""Where the queue is (issue 23): ``queue`` (a SQLite file, or the URL of a PostgreSQL
database that several stowd hosts share), ``queue_password``, ``node`` and ``state``.

    queue: ./state/queue.db                      # SQLite: one host, nothing to install
    queue: postgresql://stowd@db.example/stowd?sslrootcert=/etc/stowd/db-ca.pem
    queue_password: {file: /etc/stowd/db.password}   # a secret (secrets.py)
    node: gw-ct-1              # this host's name among the nodes (default: the host name)
    state: /var/lib/stowd      # this node's own folder: spool, received/, lock, in-flight file

The URL is read with libpq's rules (``postgresql://[user@][host][:port][,...][/dbname]
[?keyword=value&...]``: a list of hosts, percent-encoding, an IPv6 address in brackets, a
unix socket folder as a percent-encoded host or ``host=``, conninfo keywords as query
parameters) and, when the optional ``psycopg`` is installed, checked by libpq itself.  It is
normalized: ``sslmode=verify-full`` is added when it names no sslmode and reaches a host over
the network, and relative certificate paths are made absolute (config-relative, like every
path).  A password in it is an error: it goes in ``queue_password``.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from stowd.config.model import DEFAULT_LEASE, MIN_LEASE, WEAK_SSLMODES, Database
from stowd.config.secrets import Secret, parse
from stowd.config.yamlwalk import (
    NAME,
    Section,
    as_duration,
    as_name,
    as_path,
    describe_value,
)

QUEUE_KEYS = ("queue", "queue_password", "node", "state", "lease")
SCHEMES = ("postgresql", "postgres")  # libpq's two URI designators
ANCHOR = "node.queue"  # a PostgreSQL queue's local anchor in ``state`` (never a database)
SSLMODES = (*WEAK_SSLMODES, "verify-ca", "verify-full")
EXTRA = ("psycopg.conninfo", "postgresql")  # a module the extra brings, and its name
_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl")  # certificate paths in the URL
_FOLDERS = ("sslcrldir",)
_SECRETS = {
    "password": "a password in the URL would be written in the config (and shown in logs "
    "and status): put it in queue_password (a secret: {file: ...}, {env: ...} or "
    "{credential: ...})",
    "sslpassword": "the client key's passphrase would be written in the config: use a key "
    "without a passphrase that only stowd's user can read",
}
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PORT = re.compile(r"[0-9]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,30}")  # shown in a message: no secret
_Problem = Callable[[str], None]  # adds one problem of the URL


@dataclass(frozen=True)
class QueuePlace:
    """What ``read_queue`` found.  ``anchor``: the SQLite file, or ``<state>/node.queue``
    for a PostgreSQL queue (None when it cannot be known)."""

    anchor: Path | None
    database: Database | None
    node: str
    postgresql: bool = False  # the queue is a URL (even one with problems)
    lease: float = DEFAULT_LEASE  # how long a claim lasts without renewal (PostgreSQL)

    @property
    def key(self) -> str:
        """The key the folder rules name."""
        return "state" if self.postgresql else "queue"

    @property
    def what(self) -> str:
        """What the folder rules keep out of other folders, for their messages."""
        return "this node's state folder" if self.postgresql else "the queue database"

    @property
    def shown(self) -> Path | None:
        """The file or folder those messages show."""
        return self.anchor.parent if self.postgresql and self.anchor else self.anchor


def read_queue(top: Section) -> QueuePlace:
    """The queue's keys of the top section; each problem is added to its context."""
    text = top.need("queue", _as_queue)
    state = top.get("state", None, as_path(top.ctx.base))
    password = top.get("queue_password", None, parse)
    node = top.get("node", "", as_name)
    lease = top.get("lease", DEFAULT_LEASE, _as_lease)
    written = top.value_node("node") is not None
    if text is None or "://" not in text:
        for key in ("state", "queue_password", "lease") if text is not None else ():
            if top.value_node(key) is not None:
                top.add(key, _SQLITE_ONLY[key])
        anchor = None if text is None else as_path(top.ctx.base)(text)
        return QueuePlace(anchor, None, node if written else _host_name(top, strict=False))
    database = _read_url(top, text, password)
    if top.value_node("state") is None:
        top.ctx.add(
            "state",
            "required with a PostgreSQL queue: this node's own folder for its spool, "
            "received files, lock and state files, such as /var/lib/stowd",
            top.value_node("queue"),
        )
    node = node if written else _host_name(top, strict=True)
    anchor = None if state is None else state / ANCHOR
    return QueuePlace(anchor, database, node, postgresql=True, lease=lease)


def _as_lease(value: object) -> float:
    seconds = as_duration(positive=True)(value)
    if seconds < MIN_LEASE:
        raise ValueError(
            f"must be at least {MIN_LEASE:g}s (the node renews its claims every third of "
            f"it), got {describe_value(value)}"
        )
    return seconds


_SQLITE_ONLY = {
    "state": "is for a PostgreSQL queue (queue: postgresql://...); a SQLite queue keeps its "
    "spool, received files and lock beside its file: leave state out",
    "queue_password": "is for a PostgreSQL queue (queue: postgresql://...); a SQLite queue "
    "has no password: leave queue_password out",
    "lease": "is for a PostgreSQL queue (queue: postgresql://...), whose nodes take over the "
    "claims of a node that stopped renewing them; a SQLite queue has one daemon: leave "
    "lease out",
}


def _as_queue(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            "expected the SQLite queue's file path or a postgresql:// URL, "
            f"got {describe_value(value)}"
        )
    return value.strip()


def _host_name(top: Section, *, strict: bool) -> str:
    """This host's name as the default node name.  A SQLite queue has no other node, so a
    host name that is no valid name is made one there; a shared queue needs a real one."""
    name = socket.gethostname()
    if NAME.fullmatch(name):
        return name
    if not strict:
        return re.sub(r"[^A-Za-z0-9_.-]", "-", name) or "localhost"
    top.ctx.add(
        "node",
        f"this host's name {name!r} is not a valid node name (letters, digits, '_', '.' and "
        "'-'): set node: to this host's name among the nodes that share the queue",
        top.value_node("queue"),
    )
    return ""


# --------------------------------------------------------------------------- the URL


@dataclass(frozen=True)
class _Url:
    """What stowd reads of a postgresql:// URL cut as libpq cuts it: its hosts (the text
    between ``@`` and the path, still percent-encoded) and its query parameters."""

    hosts: str
    params: tuple[tuple[str, str], ...]  # (keyword, value) in order, decoded

    def param(self, name: str) -> str | None:
        found = [value for key, value in self.params if key == name]
        return found[-1] if found else None  # libpq: the last one counts


def _read_url(top: Section, text: str, password: Secret | None) -> Database | None:
    """A ``postgresql://`` URL as a Database (None when it has problems, each added)."""
    problems: list[str] = []

    def problem(message: str) -> None:
        problems.append(message)
        top.add("queue", message)

    scheme = text.partition("://")[0]
    if scheme.lower() not in SCHEMES:
        shown = f" {scheme + '://'!r}" if _SCHEME.fullmatch(scheme) else ""
        problem(
            f"unknown scheme{shown}: the queue is a file path (SQLite) or a postgresql:// "
            "URL (PostgreSQL)"
        )
        return None
    extra = _extra_problem()
    if extra is not None:
        problem(extra)
    url = _cut(text, problem)
    if url is None:
        return None
    hosts = _hosts(url, problem)
    sslmode = _sslmode(url, problem)
    normalized = _normalized(text, hosts, sslmode, top, problem)
    libpq = _libpq_problem(normalized)
    if libpq is not None:
        problem(libpq)
    if problems:
        return None
    remote = tuple(h for h in hosts if not _local(h))
    mode = sslmode or ("verify-full" if remote else "")
    return Database(normalized, password, remote=remote, sslmode=mode)


def _extra_problem() -> str | None:
    module, extra = EXTRA
    try:
        importlib.import_module(module)
    except ImportError:
        return (
            f"a PostgreSQL queue needs the optional extra stowd[{extra}], which is not "
            f"installed: pip install 'stowd[{extra}]' (into the environment stowd runs from)"
        )
    return None


def _cut(text: str, problem: _Problem) -> _Url | None:
    """The URL's parts, or None after a problem.  A password is looked for first, and no
    message shows the URL's text (it may hold one)."""
    rest = text.partition("://")[2]
    head, _, query = rest.partition("?")
    before = head.rpartition("@")[0]
    if ":" in before or "password" in _keywords(query):
        problem(_SECRETS["password"])  # user:password@ (a ':' anywhere before the last '@')
        return None
    if "sslpassword" in _keywords(query):
        problem(_SECRETS["sslpassword"])
        return None
    if _BAD_PERCENT.search(text) or "%00" in text:
        problem("holds a '%' that is not a percent-encoded byte (%XX, not %00): write % as %25")
        return None
    netloc = head.partition("/")[0]  # libpq: the user ends at the first '@' before a '/'
    hosts = netloc.partition("@")[2] if "@" in netloc else netloc
    params = []
    for piece in query.split("&") if query else []:
        key, sep, value = piece.partition("=")
        if not sep or not key:
            problem(f"the query parameter {unquote(key)!r} is not keyword=value")
            return None
        params.append((unquote(key), unquote(value)))
    return _Url(hosts, tuple(params))


def _keywords(query: str) -> set[str]:
    return {unquote(piece.partition("=")[0]) for piece in query.split("&") if piece}


def _hosts(url: _Url, problem: _Problem) -> list[str]:
    """Every host the URL may reach: its hosts (or ``host=``, which overrides them: '' is
    libpq's default, a unix socket; a name starting with '/' or '@' is a socket too) and
    the addresses of ``hostaddr=``.  Its ports are checked on the way."""
    names, ports = [], []
    for spec in url.hosts.split(","):
        name, port = _host_port(spec)
        names.append(unquote(name))
        ports.append(unquote(port))
    given = url.param("host")
    names = names if given is None else given.split(",")
    ports += (url.param("port") or "").split(",")
    for port in ports:
        if port and (not _PORT.fullmatch(port) or not 0 < int(port) < 65536):
            problem(f"the port {port!r} is not a number from 1 to 65535")
    addresses = [a for a in (url.param("hostaddr") or "").split(",") if a]
    return names + addresses


def _host_port(spec: str) -> tuple[str, str]:
    if spec.startswith("["):  # [::1]:5432
        address, _, after = spec[1:].partition("]")
        return address, after.removeprefix(":")
    name, _, port = spec.partition(":")
    return name, port


def _local(host: str) -> bool:
    """The host is this machine: a unix socket (libpq's default when empty), localhost, or
    a loopback address (127.0.0.0/8, ::1)."""
    if not host or host.startswith(("/", "@")) or host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _sslmode(url: _Url, problem: _Problem) -> str:
    """The sslmode the URL names ('' if none; libpq reads ``ssl=true`` as require)."""
    mode = url.param("sslmode")
    if mode is None:
        return "require" if url.param("ssl") == "true" else ""
    if mode not in SSLMODES:
        problem(f"sslmode={mode!r} is not one of {', '.join(SSLMODES)}")
    return mode


def _normalized(text: str, hosts: list[str], sslmode: str, top: Section, problem: _Problem) -> str:
    """The URL with ``sslmode=verify-full`` added when it reaches a host over the network
    and names none, and its certificate paths made absolute; problems of those paths."""
    scheme, _, rest = text.partition("://")
    head, sep, query = rest.partition("?")
    pieces = query.split("&") if query else []
    for index, piece in enumerate(pieces):
        key, _, value = piece.partition("=")
        name = unquote(key)
        if name not in _FILES + _FOLDERS or unquote(value) == "system":
            continue  # sslrootcert=system: the system's CAs
        path = as_path(top.ctx.base)(unquote(value) or ".")
        missing = _missing(path, folder=name in _FOLDERS)
        if missing is not None:
            problem(f"{name}: {missing}")
        pieces[index] = f"{key}={quote(str(path), safe='/')}"
    if not sslmode and not all(_local(h) for h in hosts):
        pieces.append("sslmode=verify-full")
    query = "&".join(pieces)
    return f"{scheme.lower()}://{head}" + (f"?{query}" if query else sep)


def _missing(path: Path, *, folder: bool) -> str | None:
    kind = "folder" if folder else "file"
    try:
        if path.is_dir() if folder else path.is_file():
            return None
        found = path.exists()
    except OSError as exc:
        return f"{path} cannot be checked: {exc.strerror or exc}"
    return f"{path} is not a {kind}" if found else f"the {kind} {path} does not exist"


def _libpq_problem(url: str) -> str | None:
    """What libpq (through psycopg, when installed) says of the URL: an unknown keyword, a
    malformed part.  Called only on a URL without a password."""
    try:
        psycopg = importlib.import_module("psycopg")
        conninfo = importlib.import_module(EXTRA[0])
    except ImportError:
        return None
    try:
        conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        return f"libpq cannot read it: {str(exc).strip()}"
    return None

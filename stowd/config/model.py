"""The configuration as frozen, typed objects with their defaults: what ``load.py`` makes of
the YAML file and every other module reads.  No I/O but ``Config.warnings``' look at the file's
mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stowd.config.access import Access
from stowd.config.schedule import Schedule
from stowd.config.secrets import Secret
from stowd.config.yamlwalk import (
    redact_url,
)
from stowd.rules.engine import TYPES, Rule, Template

DEFAULT_QUIET_PERIOD = 5.0
DEFAULT_FOLLOW_LINKS = False  # a symbolic link in a drop folder fails (see dropped.py)
DEFAULT_RESCAN_INTERVAL = 300.0
DEFAULT_INCOMPLETE_WAIT = 600.0  # an image cut short waits this long for the rest
DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.partial", "*.crdownload", "~*")
DEFAULT_BATCH_FILES = 50
# a few seconds of a 200 Mbit/s link shared by 4 workers: the archive's store after each
# upload idles the link for less (docs/benchmarks.md, "Why these defaults")
DEFAULT_BATCH_BYTES = 16 * 1024 * 1024
DEFAULT_WORKERS = 4  # fills a 20 ms, 200 Mbit/s link to Orthanc (docs/benchmarks.md)
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 300.0
DEFAULT_WRITE_TIMEOUT = 300.0
DEFAULT_POOL_TIMEOUT = 30.0
DEFAULT_VERIFY = False  # True: a stored file moves to sent/ once the archive's QIDO-RS lists it
DEFAULT_RETRY_INITIAL = 10.0
DEFAULT_RETRY_MAX = 3600.0
DEFAULT_RETRY_MULTIPLIER = 2.0
DEFAULT_RETRY_MAX_AGE = 7 * 24 * 3600.0
DEFAULT_HOLD_PROBE = 60.0
DEFAULT_MAX_REFUSALS = 3  # a file refused this often with a doubtful code (0110, 45071) fails
DUPLICATE_ACTIONS = ("accept", "fail")  # an instance the archive already holds: sent/ or failed/
DEFAULT_DUPLICATES = "accept"
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# adaptive concurrency (issue 20): a busy archive lowers a destination's concurrent requests
DEFAULT_ADAPTIVE = True
DEFAULT_HISTORY_DAYS = 30.0
DEFAULT_FOLDER_SIDECAR = "_metadata.yaml"
DEFAULT_FOLDER_LINGER = 3600.0
MIN_FOLDER_LINGER = 60.0
# issue 23: how long a claim of a node of a shared (PostgreSQL) queue lasts without renewal;
# the node renews its claims every third of it, so another node takes over the files of a
# node that died (or lost the database) this long after its last renewal
DEFAULT_LEASE = 120.0
MIN_LEASE = 6.0
# ratecap (issue 20): a destination's max_rate, bytes per second of all its workers together
DEFAULT_MAX_RATE: float | None = None  # no cap


@dataclass(frozen=True)
class Timeouts:
    """Per-phase HTTP timeouts in seconds (httpx's connect/read/write/pool)."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT
    write: float = DEFAULT_WRITE_TIMEOUT
    pool: float = DEFAULT_POOL_TIMEOUT


@dataclass(frozen=True)
class BatchLimits:
    """How much one STOW request may carry; a single larger file is still sent alone."""

    max_files: int = DEFAULT_BATCH_FILES
    max_bytes: int = DEFAULT_BATCH_BYTES


TRANSCODE_NONE = "none"
TRANSCODE_EXPLICIT = "explicit-vr"
TRANSCODE_POLICIES = (TRANSCODE_NONE, TRANSCODE_EXPLICIT)
DEFAULT_TRANSCODE = TRANSCODE_NONE


@dataclass(frozen=True)
class Destination:
    """A DICOMweb archive; STOW goes to ``{url}/studies``."""

    name: str
    url: str
    batch: BatchLimits = field(default_factory=BatchLimits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    workers: int = DEFAULT_WORKERS
    verify_tls: bool = True
    bulkdata: str = "encapsulate"  # or "metadata": PS3.18 metadata + bulkdata requests
    access: Access = field(default_factory=Access)  # login, TLS, headers, proxy
    duplicates: str = DEFAULT_DUPLICATES  # "fail": an instance already stored goes to failed/
    # "explicit-vr": Implicit VR Little Endian files are sent converted to Explicit VR
    # Little Endian (stowd/rewrite.py); "none": every file is sent in its own syntax
    transcode: str = DEFAULT_TRANSCODE
    verify: bool = DEFAULT_VERIFY  # ask the archive (QIDO-RS) for what it said it stored
    # ratecap (issue 20): the body bytes all its workers send, at most this many per second
    # (``dicomweb/pacing.py``); None: no cap
    max_rate: float | None = DEFAULT_MAX_RATE
    # -- schedule (transfer windows) --
    # when it may send, in local time (config/schedule.py); no windows: at any time
    schedule: Schedule = field(default_factory=Schedule)
    # adaptive concurrency (issue 20): fewer concurrent requests (down to 1) while the
    # archive answers 429/503/Retry-After or times out, more again (up to workers) after
    # rounds of successful requests (pipeline/concurrency.py)
    adaptive: bool = DEFAULT_ADAPTIVE

    @property
    def stow_url(self) -> str:
        return self.url.rstrip("/") + "/studies"

    @property
    def display_url(self) -> str:
        """The URL for logs and status, with any user:password@ replaced by ``***@``."""
        return redact_url(self.url)


@dataclass(frozen=True)
class Sidecars:
    """Metadata files beside the files they describe (see ``stowd/sidecar.py``)."""

    per_file: bool = True  # <name>.json / .yaml / .yml beside the file
    folder: str | None = DEFAULT_FOLDER_SIDECAR  # one file for the whole folder
    folder_linger: float = DEFAULT_FOLDER_LINGER  # removed once its folder was idle this long


BULK_TYPES = tuple(t for t in TYPES if t != "dicom")
IMAGE_CLASSES = ("secondary-capture", "photographic")
UNKNOWN_ACTIONS = ("fail", "ignore")
BULK_MODES = ("encapsulate", "metadata")
DEFAULT_STUDY_KEY = "{folder}"
MAX_UID_ROOT = 40  # a generated UID adds at least 23 digits and must fit 64 characters


@dataclass(frozen=True)
class Bulkdata:
    """How a source turns files that are not DICOM (PDF, JPEG, video...) into DICOM."""

    types: tuple[str, ...] = BULK_TYPES  # the kinds made into DICOM; others are "unknown"
    study_key: Template = field(default_factory=lambda: Template.parse(DEFAULT_STUDY_KEY))
    images: str = "secondary-capture"  # or "photographic" (VL Photographic, Modality XC)
    unknown: str = "fail"  # what happens to other files: "fail" (failed/) or "ignore"


DEFAULT_MAX_ASSOCIATIONS = 10  # concurrent C-STORE associations a receiving source takes
DEFAULT_MAX_PDU = 65536  # bytes; the largest PDU stowd receives (4096 to 16777216)
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds an association may stay silent before it is aborted
RECEIVED = "received"  # the folder beside the queue holding what receiving sources took in
INCOMING = ".incoming"  # in it: instances still arriving (never queued, cleared at start)


@dataclass(frozen=True)
class Allowed:
    """A calling AE title that may send, from ``host`` only when given (an IP address)."""

    ae_title: str
    host: str | None = None


@dataclass(frozen=True)
class Receive:
    """A source that receives DICOM C-STORE instead of watching a folder (``receive:``)."""

    ae_title: str  # the called AE title stowd answers to
    port: int
    bind: str  # the address to listen on; never an implicit 0.0.0.0
    allow: tuple[Allowed, ...] = ()  # empty: any calling AE title
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS
    max_pdu: int = DEFAULT_MAX_PDU
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT


@dataclass(frozen=True)
class Source:
    """A watched drop folder (or, with ``receive``, the folder beside the queue that a C-STORE
    receiver writes into) and where its files go afterwards."""

    name: str
    watch: Path
    sent: Path
    failed: Path
    destination: str
    quiet_period: float = DEFAULT_QUIET_PERIOD
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    rescan_interval: float = DEFAULT_RESCAN_INTERVAL
    polling: bool = False
    remove_empty_dirs: bool = False
    sidecars: Sidecars | None = None  # None: no sidecars, every file is sent
    # True: dropped files that are symbolic links (or lie below linked folders) are read
    # through the link, wherever it points; False: such a file fails with the reason
    follow_links: bool = DEFAULT_FOLLOW_LINKS
    # how long a DICOM image that ends before its pixel data is complete waits for the rest
    # (since it was first found so, unchanged) before it fails as truncated; 0: fails at once
    incomplete_wait: float = DEFAULT_INCOMPLETE_WAIT
    rules: tuple[Rule, ...] = ()  # applied after the top-level rules
    bulkdata: Bulkdata = field(default_factory=Bulkdata)
    sent_retention: float | None = None  # seconds files stay in sent/; None: forever
    keep: bool = False  # files stay where they are once done (stowd migrate --keep; not YAML)
    receive: Receive | None = None  # a C-STORE receiver; ``watch`` is then its own folder


@dataclass(frozen=True)
class Metrics:
    """Where Prometheus metrics are served (``metrics.listen``); None in Config: off."""

    host: str
    port: int


DEFAULT_HTTP_INSECURE = False  # a listener off loopback needs a login unless this is true
HTTP_REALM = "stowd"


@dataclass(frozen=True)
class HttpAuth:
    """The login the status page (and ``/metrics`` on its listener) asks for: HTTP basic
    (``user`` and ``password``), a bearer ``token``, or either when both are set."""

    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None


@dataclass(frozen=True)
class Http:
    """Where the status page, ``/api/status`` and ``/metrics`` are served (``http.listen``);
    None in Config: off."""

    host: str
    port: int
    auth: HttpAuth | None = None  # None: no login (loopback, or ``insecure: true``)
    insecure: bool = DEFAULT_HTTP_INSECURE


@dataclass(frozen=True)
class Retry:
    """Backoff of transient failures, kept in the queue so it survives restarts."""

    initial: float = DEFAULT_RETRY_INITIAL
    maximum: float = DEFAULT_RETRY_MAX
    multiplier: float = DEFAULT_RETRY_MULTIPLIER
    max_age: float = DEFAULT_RETRY_MAX_AGE
    hold_probe: float = DEFAULT_HOLD_PROBE
    max_refusals: int = DEFAULT_MAX_REFUSALS


# sslmodes that do not check the database server's certificate against its host name
WEAK_SSLMODES = ("disable", "allow", "prefer", "require")


@dataclass(frozen=True)
class Database:
    """``queue: postgresql://...``: a PostgreSQL queue that several stowd hosts (nodes) share.

    ``url`` is the URL as written, which never holds a password (the loader refuses one: it
    goes in ``queue_password``, a secret read when a connection is made), normalized by the
    loader (``queueconfig.py``): ``sslmode=verify-full`` added when it names no sslmode and
    reaches a host over the network, and relative certificate paths made absolute.  The
    queue's PostgreSQL backend connects with ``url`` and the secret.
    """

    url: str
    password: Secret | None = None
    # what the loader found in the URL, for Config.warnings: the hosts reached over the
    # network (neither loopback nor a unix socket) and the sslmode (after normalization)
    remote: tuple[str, ...] = ()
    sslmode: str = ""

    def shown(self) -> str:
        """The URL for logs, ``status`` and ``check-config`` (it holds no password)."""
        return self.url

    @property
    def unverified(self) -> bool:
        """TLS does not prove to stowd that a remote host is the database (or is off)."""
        return bool(self.remote) and self.sslmode in WEAK_SSLMODES


@dataclass(frozen=True)
class Cpu:
    """``cpu:`` (issue 19): the one core every thread of stowd runs on, so that the GIL is not
    handed across cores at every system call (stowd/service/pinning.py applies it)."""

    core: int | None  # None: ``auto``, the least busy allowed core, judged when applied
    line: int | None = field(default=None, compare=False)  # for the error naming the key

    def shown(self) -> str:
        return "auto" if self.core is None else str(self.core)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    queue: Path
    sources: tuple[Source, ...]
    destinations: dict[str, Destination]
    retry: Retry = field(default_factory=Retry)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    history_days: float = DEFAULT_HISTORY_DAYS
    log_level: str = "INFO"
    rules: tuple[Rule, ...] = ()  # for every source, before the source's own rules
    original_attributes: bool = False  # record replaced values (OriginalAttributesSequence)
    uid_root: str | None = None  # generated UIDs: <uid_root>.<digits>, else 2.25.<uuid>
    metrics: Metrics | None = None  # Prometheus metrics over HTTP; None: off
    http: Http | None = None  # the status page (and /metrics) over HTTP; None: off
    # issue 23: the shared PostgreSQL queue (None: SQLite at ``queue``); with one, ``queue`` is
    # this node's local anchor in its ``state`` folder (spool, received/, lock, in-flight file)
    database: Database | None = None
    node: str = ""  # this host's name among the nodes of a shared queue (the loader's default:
    # the host name)
    lease: float = DEFAULT_LEASE  # a shared queue's claims: renewed every third of it
    cpu: Cpu | None = None  # issue 19: None: the kernel spreads stowd's threads (the default)

    @property
    def warnings(self) -> list[str]:
        """What is valid but risky: logged at every start, shown by check-config."""
        found = []
        for dest in self.destinations.values():
            if not dest.verify_tls:
                found.append(
                    f"destination {dest.name}: TLS verification is OFF (verify_tls: false): "
                    "anyone on the network path can read and change what is sent"
                )
        database = self.database
        if database is not None and database.unverified:
            found.append(
                f"queue: the connection to {', '.join(database.remote)} is not verified "
                f"(sslmode={database.sslmode}): anyone on the network path can read and change "
                "the queue, or pose as the database; use sslmode=verify-full with sslrootcert= "
                "the database server's CA"
            )
        inline = [d.name for d in self.destinations.values() if _inline_secret(d)]
        inline += ["http.auth"] if self.http is not None and _inline_login(self.http) else []
        password = None if database is None else database.password
        inline += ["queue_password"] if password is not None and password.kind == "inline" else []
        if inline and _readable_by_others(self.path):
            found.append(
                f"{self.path} holds secrets of {', '.join(inline)} inline and others may read "
                f"it (chmod 0640 and a root-owned group, or use {{file: ...}}, {{env: ...}} "
                "or {credential: ...})"
            )
        return found

    def queue_shown(self) -> str:
        """The queue for ``check-config`` and ``status``: the SQLite file, or the database's
        URL with this node's name and state folder (never a password)."""
        if self.database is None:
            return str(self.queue)
        return f"{self.database.shown()} (node {self.node}, state {self.queue.parent})"

    @property
    def spool(self) -> Path:
        """Where changed copies of files are written while they are sent (next to the queue)."""
        return self.queue.with_name(self.queue.name + ".spool")

    def rules_for(self, source: Source) -> tuple[Rule, ...]:
        return self.rules + source.rules

    def destination_of(self, source: Source) -> Destination:
        return self.destinations[source.destination]

    def source(self, name: str) -> Source:
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)


def _inline_secret(dest: Destination) -> bool:
    """A password, token or API key written into the config itself."""
    access = dest.access
    userinfo = any("@" in url.partition("://")[2] for url in (dest.url, access.proxy or ""))
    inline = any(secret.kind == "inline" for secret in access.secrets)
    return inline or userinfo or bool(access.headers)


def _inline_login(http: Http) -> bool:
    auth = http.auth
    secrets = [] if auth is None else [auth.password, auth.token]
    return any(s is not None and s.kind == "inline" for s in secrets)


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o004)
    except OSError:
        return False

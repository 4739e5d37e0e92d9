"""The one exception tree of stowd.

::

    StowdError
    ├── ConfigError            bad configuration: lists every problem at once (exit 2)
    ├── QueueError             the SQLite queue cannot be opened or used
    │   ├── QueueLockedError   another stowd already uses this queue
    │   ├── QueueFull          the queue's filesystem has no space left (SQLITE_FULL):
    │   │                      nothing can be queued or settled until space is freed
    │   └── QueueUnreadable    a read of the queue failed (``Queue.reading``: not a
    │                          database, no right to make its -shm file)
    ├── MigrationConflict      stowd migrate would resume a run of SRC in the other mode
    │                          (--keep or not): refused before anything happens (exit 2)
    ├── FileProblem            a single file cannot be sent as it is (never retried)
    │   ├── FileVanished       the file disappeared before it could be sent
    │   ├── FileIncomplete     a DICOM image ends before its pixel data does: it may still
    │   │                      be being written, so it waits (``incomplete_wait``) for the
    │   │                      rest, then fails as truncated
    │   ├── NotDicom           not a DICOM Part-10 file (``classify.py`` then asks whether
    │   │                      it is a document, image or video its source makes DICOM from)
    │   ├── UnknownType        neither DICOM nor a type its source makes DICOM from
    │   ├── DataSetMismatch    a received data set is not the instance (or of the SOP class)
    │   │                      its C-STORE request named (answered 0xA900)
    │   ├── LinkRefused        the file (or a folder on its path) is a symbolic link stowd
    │   │                      does not follow (``dropped.py``)
    │   └── RuleFailure        a rule cannot be applied to the file (a missing value, a
    │                          value that does not fit)
    ├── VerifyUnavailable      the archive cannot be asked (QIDO-RS) whether it lists what
    │                          it said it stored (``verify: true``): the files wait, the
    │                          destination is held; never a failure of the files
    ├── LookupNoMatchYet       a rule's lookup found no match yet: the file waits (until
    │                          its ``wait`` ends, then fails) for its study or item to appear
    ├── LookupUnavailable      the archive could not be asked for a rule's lookup (not
    │                          reached, refused, an error status): the file waits, retried
    ├── SidecarNotReady        a file's sidecar is still changing or unreadable: not queued yet
    ├── FileUnreadable         a file cannot be read right now (permissions, I/O error):
    │                          retried later, like the archive's temporary refusals
    ├── SpoolFull              the copy of a file to send cannot be written: the spool's
    │                          disk is full; the file waits (never counted as its failure)
    ├── Stopping               stowd is stopping while an upload waits for its rate cap
    │                          (``pacing.py``): ``stow.py`` makes it ``DestinationBusy``, the
    │                          files stay queued
    ├── SecretUnavailable      a secret (password, token, key) cannot be read now: a missing
    │                          variable or file; the destination is held
    ├── ClientSetupError       the destination's TLS files cannot be used (unreadable, not
    │                          PEM, a key that does not match): the destination is held
    ├── TokenError             a login's token endpoint gave no usable access token
    │   │                      (``auth.py``, ``googleauth.py``, ``awsauth.py``)
    │   ├── TokenRefused       it refused our client or is not a token endpoint: held
    │   └── TokenUnreachable   it cannot be reached, or is busy (5xx/408/429): retried
    ├── UnusableAnswer         an HTTP answer cannot be used (it cannot be decoded, or as
    │   │                      below): raised by answers.py while it is read, turned into
    │   │                      StowFailure by httperrors.py and into TokenError by auth.py
    │   ├── AnswerTooLarge     its decoded body is larger than the cap for its kind
    │   └── AnswerTooSlow      it was still arriving at its deadline
    └── StowFailure            one request to the archive did not go through (raised by
        │                      stow.py, stowanswer.py and httperrors.py only)
        ├── DestinationHeld    the archive or our configuration is wrong, not the files:
        │                      401/403/404/405/415, TLS, an unusable answer or one that
        │                      is not a STOW-RS answer; files stay queued, the destination
        │                      waits
        └── DestinationBusy    transient trouble of the whole request: connection errors,
            │                  timeouts, 408/429/5xx, an answer past its deadline; retried
            │                  with backoff (Retry-After honoured)
            ├── ConnectionDropped  the archive closed the connection without answering
            │                      after the whole request was sent: like a 500, it may
            │                      be caused by one of the files (an archive that
            │                      crashes on it)
            └── TimedOut           a timeout (connect, read, write, pool) or an answer
                                   past its deadline: like any DestinationBusy, and it
                                   lowers the destination's concurrent requests
                                   (``adaptive: true``)

Third-party exceptions (httpx, pydicom, sqlite3, yaml) are translated at one seam each, with
``raise ... from exc`` (httpx's in ``httperrors.py``); whether something is retried is a
property of the type raised here.
``reading`` turns the OSErrors of reading a file to send into ``FileVanished`` or
``FileUnreadable`` (or ``SpoolFull``: the write of its copy found no space).  ``judging_input``
turns what Python raises on odd input (ValueError, RecursionError ...) while a sidecar or rule
is applied into ``FileProblem``.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class StowdError(Exception):
    """Base class of every error stowd raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file: where it is and what is wrong."""

    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class ConfigError(StowdError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, path: str, problems: list[ConfigProblem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"{self.path}: {count} problem{'s' if count != 1 else ''} in the configuration"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class QueueError(StowdError):
    """The queue database cannot be opened or used."""


class QueueLockedError(QueueError):
    """Another stowd process holds the queue's lock."""


class QueueFull(QueueError):
    """A write to the queue failed because its filesystem is full; nothing was written.

    ``at``: when it failed (``time.monotonic()``).  A thread may raise it much later (a
    sender raises its settle thread's error when it waits for that batch): ``Disks`` must
    not count it as a new failure once it logged the space back since."""

    def __init__(self, message: str, *, at: float | None = None) -> None:
        super().__init__(message)
        self.at = time.monotonic() if at is None else at


class QueueUnreadable(QueueError):
    """A read of the queue (inside ``Queue.reading``) failed; the message names the queue."""


class MigrationConflict(StowdError):
    """An unfinished ``stowd migrate`` of a folder is queued in the other mode (with or
    without ``--keep``); the message says how to finish it."""


class FileProblem(StowdError):
    """A file that can never be sent as it is; the message is written for a human."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class FileUnreadable(StowdError):
    """A file stowd cannot read now (permissions, an I/O error): a deployment problem, retried."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def from_os_error(cls, exc: OSError, path: str) -> FileUnreadable:
        if isinstance(exc, PermissionError):
            return cls(
                "stowd may not read the file (permission denied): check the owner and mode "
                "of the file and its folder; it is tried again later",
                path=path,
            )
        return cls(f"reading the file failed: {exc.strerror or exc}", path=path)


class DataSetMismatch(FileProblem):
    """A C-STORE's data set names another SOP instance or class than its request."""


class UnknownType(FileProblem):
    """A file that is neither DICOM nor of a type its source makes DICOM from."""


class NotDicom(FileProblem):
    """The file is not a DICOM Part-10 file (it may be a document, image or video)."""


class LinkRefused(FileProblem):
    """A dropped file (or a folder on its path) is a symbolic link stowd does not follow."""


class RuleFailure(FileProblem):
    """A rule cannot be applied to this file (a missing value, a value that does not fit)."""


class FileVanished(FileProblem):
    """The file was removed (or replaced) before it could be sent."""


def no_space(exc: BaseException) -> bool:
    """Did this error happen because a filesystem is full (ENOSPC, EDQUOT)?"""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class FileIncomplete(FileProblem):
    """A DICOM image whose file ends before its pixel data is complete (or before its pixel
    data starts): a writer may still be adding the rest, so the file waits for it before it
    is failed as truncated.  The message says what is missing."""


@contextmanager
def reading(source: Path) -> Iterator[None]:
    """Turn the OSErrors of reading ``source`` into stowd's errors."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanished("the file was removed before it could be sent") from exc
    except IsADirectoryError as exc:
        raise FileVanished("the path is now a folder") from exc
    except OSError as exc:
        if no_space(exc):  # only the write of its copy can
            raise SpoolFull(f"no space left for the copy that is sent: {exc}") from exc
        raise FileUnreadable.from_os_error(exc, str(source)) from exc


class SpoolFull(StowdError):
    """The spool's filesystem is full: the copy of a file to send (changed by the rules, or
    made DICOM) cannot be written now.  Not the file's fault: it waits for space."""


class Stopping(StowdError):
    """stowd is stopping while an upload waits for its destination's rate cap
    (``max_rate``): the wait ends at once, and ``stow.py`` turns this into
    ``DestinationBusy`` (the files stay queued, sent again at the next start)."""


_INPUT_ERRORS = (ValueError, TypeError, OverflowError)
MAX_DETAIL = 200  # characters of a Python error's text quoted in a reason


@contextmanager
def judging_input(what: str, path: str | None = None) -> Iterator[None]:
    """Turn what Python's own parsers and conversions raise on odd input (a number of more
    than 4300 digits, nesting too deep, a value of the wrong type) into a ``FileProblem``
    about ``what`` (at ``path``): input that fails this way fails the same way every time."""
    try:
        yield
    except StowdError:
        raise
    except RecursionError:
        raise FileProblem(f"{what}: nests lists or sequences too deeply", path=path) from None
    except _INPUT_ERRORS as exc:
        raise FileProblem(f"{what}: {_detail(exc)}", path=path) from exc


def _detail(exc: BaseException) -> str:
    """The first sentence of ``exc``'s text, cut short (Python's hints such as
    "use sys.set_int_max_str_digits()" are for programmers, not for the reader)."""
    text = (str(exc) or type(exc).__name__).split("; ")[0]
    if "integer string conversion" in text:
        return f"holds a number of more than {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


class VerifyUnavailable(StowdError):
    """The archive's QIDO-RS cannot tell whether it lists the instances it said it stored
    (an error, a timeout, an answer stowd cannot read): raised by ``verify.py``."""


class LookupNoMatchYet(StowdError):
    """No match yet: the file waits (until ``until``) for its study or item to appear."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until


class LookupUnavailable(StowdError):
    """The archive could not be asked (not reached, refused, an error status): retried."""


class SecretUnavailable(StowdError):
    """A secret cannot be read now (a missing variable or file); the message names where."""


class ClientSetupError(StowdError):
    """The destination's TLS files cannot be used (unreadable, not PEM, key does not match)."""


class TokenError(StowdError):
    """The token endpoint gave no usable access token."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after: str | None = None  # the endpoint's Retry-After header, as sent


class TokenRefused(TokenError):
    """The endpoint refused our client (400/401: invalid_client ...) or is not one."""


class TokenUnreachable(TokenError):
    """The endpoint cannot be reached or answered 5xx/408/429: try again later."""


class SidecarNotReady(StowdError):
    """A file's sidecar is still changing or cannot be read now: the file is not queued yet."""


class UnusableAnswer(StowdError):
    """An HTTP answer that cannot be used (its body cannot be decoded)."""


class AnswerTooLarge(UnusableAnswer):
    """An answer's decoded body is over the size cap for its kind: stowd stopped reading it."""


class AnswerTooSlow(UnusableAnswer):
    """An answer was still arriving at its deadline (a trickle that never trips the read
    timeout, which applies to each read)."""


class StowFailure(StowdError):
    """A STOW-RS request failed as a whole (no per-file answer to act on)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.server_message = server_message


class DestinationHeld(StowFailure):
    """The destination refuses us for a reason no retry of the same files can fix soon."""


class DestinationBusy(StowFailure):
    """The destination is unreachable or overloaded for now; retry the same request later."""


class ConnectionDropped(DestinationBusy):
    """The archive closed the connection without sending an answer, after the whole request
    body was sent (an archive that crashes on one of the files does so every time)."""


class TimedOut(DestinationBusy):
    """A request to the archive timed out, or its answer was still arriving at its deadline
    (an overloaded archive: adaptive concurrency sends fewer requests at once)."""

"""Secrets (passwords, tokens, client secrets): where they come from, read when used.

A secret in the config is one of::

    password: s3cret                       # inline (a warning if others may read the config)
    password: {env: PACS_PASSWORD}         # an environment variable
    password: {file: /etc/stowd/pacs.pw}   # a file (read again when it changes)
    password: {credential: pacs-password}  # a systemd credential ($CREDENTIALS_DIRECTORY)

The value is read when a request needs it, never at load, so fixing a secret file releases a
held destination without a restart.  ``Secret`` never shows its value: not in ``repr``, logs,
``status`` or error files.  Files hold the secret alone; one trailing newline is dropped.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from stowd.errors import SecretUnavailable

KINDS = ("env", "file", "credential")
MAX_SIZE = 64 * 1024  # a secret file larger than this is a mistake (a key, a log...)


@dataclass(frozen=True)
class Secret:
    """Where one secret comes from; ``kind`` is ``inline``, ``env``, ``file`` or ``credential``."""

    kind: str
    ref: str = field(repr=False)  # the value itself when inline

    def __repr__(self) -> str:
        return f"Secret({self.where})"

    @property
    def where(self) -> str:
        """Where it comes from, for messages (never the value)."""
        if self.kind == "inline":
            return "inline in the config"
        if self.kind == "env":
            return f"environment variable {self.ref}"
        if self.kind == "credential":
            return f"systemd credential {self.ref}"
        return f"file {self.ref}"

    def value(self) -> str:
        """The secret now; raises ``SecretUnavailable``."""
        if self.kind == "inline":
            return self.ref
        if self.kind == "env":
            return _env(self.ref)
        if self.kind == "credential":
            return _FILES.read(_credential_path(self.ref), self.where)
        return _FILES.read(Path(self.ref), self.where)


def parse(value: object) -> Secret:
    """A secret from its YAML value; raises ``ValueError`` (for humans)."""
    if isinstance(value, str) and value:
        return Secret("inline", value)
    if isinstance(value, dict) and len(value) == 1:
        kind, ref = next(iter(value.items()))
        if kind in KINDS and isinstance(ref, str) and ref.strip():
            return Secret(str(kind), ref.strip())
    raise ValueError(
        "expected the secret itself, or one of {env: VARIABLE}, {file: /path/to/file}, "
        "{credential: NAME} (a systemd LoadCredential= name)"
    )


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SecretUnavailable(f"the environment variable {name} is not set or empty")
    return value


def _credential_path(name: str) -> Path:
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise SecretUnavailable(
            f"the systemd credential {name} cannot be read: CREDENTIALS_DIRECTORY is not set "
            "(is LoadCredential= in the unit?)"
        )
    return Path(folder) / name


class _FileCache:
    """Secret files, read again only when their size, mtime or inode changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Path, tuple[tuple[int, int, int], str]] = {}

    def read(self, path: Path, where: str) -> str:
        try:
            st = path.stat()
        except OSError as exc:
            raise SecretUnavailable(f"{where} cannot be read: {exc.strerror or exc}") from None
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            cached = self._seen.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
        value = _read_file(path, where, st.st_size)
        with self._lock:
            self._seen[path] = (key, value)
        return value


def _read_file(path: Path, where: str, size: int) -> str:
    if size > MAX_SIZE:
        raise SecretUnavailable(f"{where} is {size} bytes, too large to be a secret")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise SecretUnavailable(f"{where} cannot be read: {reason or exc}") from None
    value = text[:-1] if text.endswith("\n") else text
    value = value[:-1] if value.endswith("\r") else value
    if not value:
        raise SecretUnavailable(f"{where} is empty")
    return value


_FILES = _FileCache()

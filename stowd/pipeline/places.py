"""Which paths below a watch folder are files to send: not an ignored name, not excluded.

The ``ignore`` patterns are shell patterns matched, case-sensitively, against each NAME in
a path relative to the watch folder (its folders' names and the file's own), never against
the path as a whole: a pattern holding ``/`` matches no name.  They are compiled once into
one regular expression (``fnmatch.translate`` of each, as ``fnmatch.fnmatchcase`` compiles
them), and what was decided for a folder is kept, so a file costs one match of its own name:
the watcher asks this for every file it sees, several times over for some.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from pathlib import Path

FOLDERS_KEPT = 10_000  # folders whose verdict is remembered (forgotten all at once beyond)


class Places:
    """The verdicts of one watch folder, its exclusions and its ``ignore`` patterns."""

    def __init__(self, watch: Path, exclude: Iterable[str], patterns: Iterable[str]) -> None:
        self.watch = str(watch)
        self.exclude = tuple(exclude)
        self._under_excluded = tuple(ex + os.sep for ex in self.exclude)
        self._regex = _one_regex(patterns)
        # a path starting with this holds its relative path after it, when it is normalised
        plain = os.path.isabs(self.watch) and os.path.normpath(self.watch) == self.watch
        self._prefix = self.watch + os.sep if plain and self.watch != os.sep else None
        self._folders: dict[str, bool] = {}

    def ignored(self, name: str) -> bool:
        """Does the single name ``name`` match one of the patterns?"""
        return self._regex is not None and self._regex.match(name) is not None

    def excluded(self, path: str) -> bool:
        """Is ``path`` one of the excluded folders (sent/, failed/, ...) or below one?"""
        return path in self.exclude or path.startswith(self._under_excluded)

    def relative(self, path: str) -> str | None:
        """``path`` relative to the watch folder, as ``os.path.relpath`` gives it (``.``:
        the watch folder itself); None when it lies outside the watch folder."""
        prefix = self._prefix
        if prefix is not None and path.startswith(prefix):
            rel = path[len(prefix) :]
            if _normal(rel):
                return rel
        try:
            rel = os.path.relpath(path, self.watch)
        except ValueError:
            return None
        return None if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel

    def wanted(self, path: str) -> bool:
        """Below the watch folder (or it), not excluded, and no name in it ignored."""
        rel = self.relative(path)
        if rel is None or self.excluded(path):
            return False
        if rel == os.curdir:
            return True
        folder, _, name = rel.rpartition(os.sep)
        return not self.ignored(name) and self._folder_wanted(folder)

    def _folder_wanted(self, folder: str) -> bool:
        """No name of the relative path ``folder`` ignored ('': the watch folder)."""
        known = self._folders.get(folder)
        if known is None:
            if len(self._folders) >= FOLDERS_KEPT:
                self._folders.clear()
            names = folder.split(os.sep) if folder else []
            known = self._folders[folder] = not any(self.ignored(n) for n in names)
        return known


def _one_regex(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One expression matching a name exactly when ``fnmatch.fnmatchcase`` matches it with
    one of ``patterns`` (None: no patterns, nothing is ignored)."""
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


def _normal(rel: str) -> bool:
    """Is ``rel`` a relative path ``os.path.normpath`` leaves as it is (no empty, ``.`` or
    ``..`` names)?  Then ``os.path.relpath`` gives it unchanged."""
    return all(name not in ("", os.curdir, os.pardir) for name in rel.split(os.sep))

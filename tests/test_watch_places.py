"""The watcher's verdict on a path (ignored names, excluded folders), compiled once (issue 19),
against the matcher it replaced: fnmatch per pattern on every name of ``os.path.relpath``."""

from __future__ import annotations

import fnmatch
import os
import random
from pathlib import Path

from stowd.pipeline.places import Places

# what names and patterns are made of: pattern syntax, dots, a separator, a non-ASCII letter
NAME_BITS = ["a", "b", "ab", ".", "..", "-", "~", "é", " ", "*", "?", "[", "]", "!", "\\", "x.dcm"]
PATTERN_BITS = [*NAME_BITS, "*", "?", "[ab]", "[!a]", "[a-c]", "[]a]", "[!]", "/", "**", ".*"]


def old_wanted(path: str, watch: str, exclude: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Watcher._wanted before issue 19 (stowd 34c6521), except that a name starting with
    '..' (such as '..x.dcm') is no longer taken for a path outside the watch folder."""
    try:
        rel = os.path.relpath(path, watch)
    except ValueError:
        return False
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return False
    if any(path == ex or path.startswith(ex + os.sep) for ex in exclude):
        return False
    names = Path(rel).parts
    return not any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def some(rng: random.Random, bits: list[str], most: int) -> str:
    return "".join(rng.choice(bits) for _ in range(rng.randint(1, most)))


def some_path(rng: random.Random, watch: str, names: list[str]) -> str:
    """A path as events and walks give them, and some they never give."""
    rel = os.sep.join(rng.choice(names) for _ in range(rng.randint(1, 4)))
    kind = rng.randrange(10)
    if kind == 0:
        return rel  # relative to the current folder
    if kind == 1:
        return os.path.join(os.path.dirname(watch), rel)  # beside the watch folder
    if kind == 2:
        return watch + rng.choice(["", os.sep, os.sep + os.sep, os.sep + "."])
    return watch + os.sep + rel


def test_the_compiled_matcher_decides_as_fnmatch_on_every_name(tmp_path: Path) -> None:
    rng = random.Random(19)
    compared = 0
    for watch in (str(tmp_path / "drop"), str(tmp_path / "x" / ".." / "drop")):
        exclude = (watch + "/sent", watch + "/failed", watch + "/a/.incoming")
        for _ in range(300):
            patterns = tuple(some(rng, PATTERN_BITS, 4) for _ in range(rng.randint(0, 6)))
            names = [some(rng, NAME_BITS, 3) for _ in range(12)]
            names += ["sent", "failed", "", ".", "..", "a", ".incoming", "..a", "sentx"]
            places = Places(Path(watch), exclude, patterns)
            for name in names:
                expected = any(fnmatch.fnmatchcase(name, p) for p in patterns)
                assert places.ignored(name) == expected, (name, patterns)
            for _ in range(60):
                path = some_path(rng, watch, names)
                assert places.wanted(path) == old_wanted(path, watch, exclude, patterns), (
                    path,
                    watch,
                    patterns,
                )
                compared += 1
    assert compared == 2 * 300 * 60


def test_a_folder_verdict_is_kept_and_still_right_for_every_file(tmp_path: Path) -> None:
    watch = tmp_path / "drop"
    places = Places(watch, (), ("*.part", "tmp*"))
    for i in range(5):
        assert places.wanted(f"{watch}/study/series/{i}.dcm")
        assert not places.wanted(f"{watch}/study/series/{i}.part")
        assert not places.wanted(f"{watch}/tmpstudy/series/{i}.dcm")
        assert not places.wanted(f"{watch}/study/tmp/{i}.dcm")

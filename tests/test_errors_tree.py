"""``stowd/errors.py`` holds the one exception tree: every ``StowdError`` is defined there and
drawn in its docstring, where a reader looks for what stowd raises and what it means."""

from __future__ import annotations

import importlib
import pkgutil

import stowd
from stowd import errors
from stowd.errors import StowdError

# need the extras stowd[google], stowd[aws]
OPTIONAL = {"stowd.dicomweb.googleauth", "stowd.dicomweb.awsauth"}


def every_module() -> list[str]:
    found = pkgutil.walk_packages(stowd.__path__, "stowd.")
    names = [m.name for m in found if not m.name.endswith("__main__")]  # it runs the CLI
    assert "stowd.dicomweb.stow" in names and "stowd.errors" in names
    return names


def import_all() -> None:
    for name in every_module():
        try:
            importlib.import_module(name)
        except ImportError:
            if name not in OPTIONAL:
                raise


def subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= subclasses(sub)
    return found


def test_every_stowd_error_is_defined_in_errors_py() -> None:
    import_all()
    elsewhere = {c.__qualname__: c.__module__ for c in subclasses(StowdError)}
    elsewhere = {n: m for n, m in elsewhere.items() if m != "stowd.errors"}
    assert elsewhere == {}


def test_every_stowd_error_is_drawn_in_the_tree_under_its_parent() -> None:
    import_all()
    tree = (errors.__doc__ or "").split("Third-party exceptions")[0]
    lines = tree.splitlines()
    drawn = {}
    for number, line in enumerate(lines):
        if "── " in line:
            name = line.split("── ")[1].split()[0]
            drawn[name] = (number, line.index("── "))
    for cls in subclasses(StowdError):
        assert cls.__name__ in drawn, f"{cls.__name__} is not drawn in errors.py's tree"
        parent = cls.__bases__[0].__name__
        if parent == "StowdError":
            assert drawn[cls.__name__][1] == 5  # the first level
            continue
        number, column = drawn[cls.__name__]
        above = [n for n, (row, col) in drawn.items() if row < number and col == column - 4]
        nearest = max(above, key=lambda n: drawn[n][0])
        assert nearest == parent, f"{cls.__name__} is drawn under {nearest}, not {parent}"

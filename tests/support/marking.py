"""Which tests are integration tests: the ones that start a real archive (Orthanc, tiny_pacs),
a stowd subprocess (``Stowd``, ``run_until``, ``run_cli``) or any other child process
(``subprocess``: a Python child measuring memory, ffmpeg, openssl, nginx), or a local server
(any ``localserver.Served``: ``LocalServer``, ``ChildProcess`` and what is built on them).

``starts_something(obj)`` follows the names a test function uses, through the functions and
classes of the test files and of ``tests/support`` (not stowd's, not a library's), nested
functions and lambdas included, and answers whether one of them is such a starter.  conftest
marks those tests ``integration`` (with the tests taking the archive fixtures), so that
``pytest -m "not integration"`` runs the fast unit tests.  What this cannot see (a server
reached only through an attribute of an object passed in) a test file marks itself with
``pytestmark = pytest.mark.integration``.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from types import CodeType, FunctionType
from typing import Any

from harness import Stowd, run_cli, run_until
from localserver import Served

TESTS = Path(__file__).resolve().parent.parent

# Fixtures that start an archive or need one, or start a browser (conftest.py).
ARCHIVE_FIXTURES = frozenset(
    {"orthanc", "archive", "orthanc_required", "browser", "browser_without_js"}
)

_STARTERS: tuple[object, ...] = (Stowd, run_until, run_cli)
# The same by name, for a use through a module (``harness.run_cli``): co_names holds the
# attribute's name, not the object.
_STARTER_NAMES = frozenset({"Stowd", "run_until", "run_cli"})


def starts_something(obj: object) -> bool:
    """Whether calling ``obj`` (a test or fixture function) may start a daemon or a server."""
    return _reaches(obj, set())


def _reaches(obj: object, seen: set[int]) -> bool:
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if obj is subprocess or any(obj is starter for starter in _STARTERS):
        return True
    if isinstance(obj, type):
        return _class_reaches(obj, seen)
    func = _function(obj)
    if func is None:
        return False
    if func.__module__ == "subprocess":
        return True
    return _ours(func) and _code_reaches(func.__code__, func.__globals__, seen)


def _function(obj: object) -> FunctionType | None:
    """The plain function behind ``obj`` (a method, a property, a decorated function)."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    elif isinstance(obj, property):
        obj = obj.fget
    if not callable(obj):
        return None
    func = inspect.unwrap(obj)
    return func if isinstance(func, FunctionType) else None


def _class_reaches(cls: type, seen: set[int]) -> bool:
    if issubclass(cls, (Served, Stowd)):
        return True
    if not _ours(cls):
        return False
    return any(_reaches(value, seen) for value in vars(cls).values())


def _code_reaches(code: CodeType, names: dict[str, Any], seen: set[int]) -> bool:
    for name in code.co_names:
        if name in _STARTER_NAMES:
            return True
        if name in names and _reaches(names[name], seen):
            return True
    return any(
        isinstance(const, CodeType) and _code_reaches(const, names, seen)
        for const in code.co_consts
    )


def _ours(obj: object) -> bool:
    """Defined in a test file or in tests/support (where a starter can hide in a helper), and
    not here (this module names the starters without starting them)."""
    if getattr(obj, "__module__", None) == __name__:
        return False
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().is_relative_to(TESTS)

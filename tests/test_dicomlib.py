"""pydicom's first import while the daemon's threads run (``stowd/dicomlib.py``).

stowd imports pydicom only when something needs it (issue 19), so its first import happens
while other threads work.  In CPython a ``from pydicom.dataset import X`` does not wait for
another thread's ``import pydicom`` still under way and gets half-built modules: a reader
classifying a header the quick walk leaves to pydicom, while a worker imported
``stowd.media.bulkdata`` for a PDF's instance, failed the usual file as damaged.  Each case
runs in a fresh interpreter (pydicom not yet imported), at several offsets between the two
threads, so that one of them lands inside the other's import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dicomgen import make_instance

ROOT = Path(__file__).resolve().parent.parent
# the second thread starts this long after the first (seconds): pydicom's import is 0.2-0.3 s
OFFSETS = (0.0, 0.005, 0.02, 0.05, 0.1)

RACE = textwrap.dedent(
    """
    import json, sys, threading, time
    from stowd.pipeline import bulkform, classify, reader, worker  # the run path: no pydicom
    assert "pydicom" not in sys.modules
    paths, offset = sys.argv[1:3], float(sys.argv[3])
    out = {"reader": [], "worker": None}
    built = threading.Event()

    def read():  # a reader thread: a header left to pydicom, then usual ones meanwhile
        rounds = 0
        while not built.is_set() or rounds < 2:
            rounds += 1
            for path in paths:
                try:
                    classify.classify_dicom(path)
                except Exception as exc:
                    out["reader"].append(f"{type(exc).__name__}: {exc}"[:300])

    def build():  # a worker building a PDF's instance names its SOP Class
        time.sleep(offset)
        try:
            out["worker"] = bulkform.sop_class_name("1.2.840.10008.5.1.4.1.1.104.1")
        except Exception as exc:
            out["worker"] = f"{type(exc).__name__}: {exc}"
        finally:
            built.set()

    threads = [threading.Thread(target=read), threading.Thread(target=build)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out))
    """
)


@pytest.mark.timeout(120)
def test_a_header_read_while_another_thread_imports_pydicom_is_read(tmp_path: Path) -> None:
    """A file whose header is longer than the quick walk reads (so pydicom parses it) and a
    usual one are classified, again and again, while a worker's first use of pydicom imports
    it: no file is taken for damaged and the worker's import succeeds, whichever thread
    imports first."""
    big, usual = tmp_path / "bighead.dcm", tmp_path / "usual.dcm"
    make_instance(big, extra={"TextValue": "x" * 70_000})  # UT: a header over 64 KiB
    make_instance(usual)
    for offset in OFFSETS:
        done = subprocess.run(
            [sys.executable, "-c", RACE, str(big), str(usual), str(offset)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout)
        assert found == {"reader": [], "worker": "Encapsulated PDF Storage"}, offset


# what imports pydicom when it is imported: pydicom itself, pynetdicom (a receiver), and the
# modules of stowd that import it at their top
NEEDS_PYDICOM = (
    "pydicom",
    "pynetdicom",
    "stowd.media.bulkdata",
    "stowd.media.decode",
    "stowd.media.explicit",
    "stowd.media.instance",
    "stowd.media.part10",
    "stowd.media.rewrite",
    "stowd.pipeline.receive",
)
# a function handed pydicom's own element: pydicom is whole already
UNGUARDED = {("stowd/pipeline/metadata.py", "pydicom.multival")}


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = node.module or ""
    return [module, *(f"{module}.{alias.name}" for alias in node.names)]


def _needs(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in NEEDS_PYDICOM)


def _loads(statement: ast.stmt) -> bool:
    """``dicomlib.load()`` as a statement of its own."""
    call = statement.value if isinstance(statement, ast.Expr) else None
    return (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "load"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "dicomlib"
    )


def _unguarded(path: Path) -> list[str]:
    """The imports inside functions of ``path`` that import pydicom without a
    ``dicomlib.load()`` earlier in the same block."""
    found = []
    for func in ast.walk(ast.parse(path.read_text())):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for block in ast.walk(func):
            body = getattr(block, "body", None)
            if not isinstance(body, list):
                continue
            loaded = False
            for statement in body:
                loaded = loaded or _loads(statement)
                if isinstance(statement, ast.Import | ast.ImportFrom) and not loaded:
                    needed = [n for n in _names(statement) if _needs(n)]
                    if needed:
                        found.append(f"{func.name}:{statement.lineno} {needed[0]}")
    return found


def test_every_import_of_pydicom_in_a_function_loads_it_whole_first() -> None:
    """The lock works only if every importer takes it: an import inside a function (all of
    stowd's imports of pydicom are, off the start path) of pydicom, pynetdicom or a module
    of stowd that imports it at its top comes after ``dicomlib.load()`` in its block (a
    ``MultiValue`` imported where pydicom's own element is in hand excepted).  Made to fail
    by taking out one ``load()``."""
    problems = []
    for path in sorted((ROOT / "stowd").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        for hit in _unguarded(path):
            if (relative, hit.split(" ")[1]) in UNGUARDED:
                continue
            problems.append(f"{relative} {hit}")
    assert problems == []

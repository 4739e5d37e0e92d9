"""``stowd dry-run``: what would happen now, with nothing sent, moved or queued."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dicomgen import make_study, write_garbage
from harness import make_layout, run_cli


def test_dry_run_reports_and_touches_nothing(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, "http://127.0.0.1:9/dicom-web", source={"quiet_period": "1h"})
    files = make_study(layout.drop / "s", 3) + make_study(layout.drop / "t", 2)
    write_garbage(layout.drop / "junk.dcm")
    (layout.drop / "copying.part").write_bytes(b"ignored temp name")
    past = time.time() - 7200
    for path in [p for p, _ in files] + [layout.drop / "junk.dcm"]:
        os.utime(path, (past, past))
    make_study(layout.drop / "fresh", 1)  # written just now: still within the quiet period
    before = sorted(p for p in layout.drop.rglob("*"))

    result = run_cli("dry-run", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    [plan] = json.loads(result.stdout)
    assert plan["ready_files"] == 5
    assert plan["studies"] == 2
    assert plan["requests"] == 2
    assert plan["still_being_written"] == 1
    assert [f["file"] for f in plan["would_fail"]] == ["junk.dcm"]
    assert "not a DICOM file" in plan["would_fail"][0]["reason"]

    human = run_cli("dry-run", "-c", str(layout.config))
    assert "would send:   5 file(s)" in human.stdout
    assert "nothing was sent" in human.stdout
    assert sorted(p for p in layout.drop.rglob("*")) == before
    assert not (layout.root / "state").exists()
    assert not layout.sent.exists() and not layout.failed.exists()


def test_dry_run_applies_the_rules_to_grouping_and_failures(tmp_path: Path) -> None:
    rules = [
        {"match": {"path": "s*/*"}, "set": {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.5"}},
        {"match": {"regex": "^(?P<d>bad)/"}, "set": {"StudyDate": "{regex.d}"}},
    ]
    layout = make_layout(tmp_path, "http://127.0.0.1:9/dicom-web", rules=rules)
    files = make_study(layout.drop / "s1", 2) + make_study(layout.drop / "s2", 2)
    files += make_study(layout.drop / "bad", 1)
    past = time.time() - 7200
    for path, _ in files:
        os.utime(path, (past, past))
    result = run_cli("dry-run", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    [plan] = json.loads(result.stdout)
    assert (plan["ready_files"], plan["studies"]) == (4, 1)  # two studies made one by a rule
    [failing] = plan["would_fail"]
    assert failing["file"] == "bad/IM00001.dcm"
    assert "StudyDate (DA)" in failing["reason"] and "rules[1]" in failing["reason"]

"""Issue 14: hostile drop folders and hostile answers, against the real daemon."""

from __future__ import annotations

import json
from pathlib import Path

from dicomgen import make_instance
from harness import Stowd, make_layout, wait_for

DEAD_URL = "http://127.0.0.1:9/dicom-web"  # nothing listens: no file reaches an archive


# -- retrying what can never work -------------------------------------------------------------
def test_a_sidecar_with_a_5000_digit_number_fails_the_file_at_once(tmp_path: Path) -> None:
    """Was: ``ValueError: Exceeds the limit (4300 digits)`` logged with a traceback as an
    unexpected error, and the file retried until retry.max_age."""
    layout = make_layout(tmp_path / "run", DEAD_URL, source={"sidecars": True})
    make_instance(layout.drop / "big/a.dcm")
    (layout.drop / "big/a.json").write_text('{"InstanceNumber": %s}' % ("9" * 5000))
    make_instance(layout.drop / "deep/b.dcm")
    (layout.drop / "deep/b.yaml").write_text("PatientID: " + "[" * 5000 + "]" * 5000 + "\n")
    daemon = Stowd(layout).start()
    try:
        wait_for(
            lambda: {"big/a.dcm", "deep/b.dcm"} <= layout.files(layout.failed),
            60,
            "both files in failed/",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    errors = layout.error_files()
    big = json.loads(errors["big/a.dcm"].read_text())
    assert "sidecar a.json" in big["reason"], big
    assert "4300 digits" in big["reason"], big
    deep = json.loads(errors["deep/b.dcm"].read_text())
    assert "sidecar b.yaml" in deep["reason"], deep
    assert "Traceback" not in daemon.log
    assert "unexpected error" not in daemon.log

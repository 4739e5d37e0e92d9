"""What every command pays at start: modules only some configurations need are imported
when they are needed (issue 19: ``import stowd.commands.cli`` cost 0.7 s of CPU)."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("pynetdicom", "stowd.pipeline.receive", "stowd.pipeline.dimse")


def test_the_cli_does_not_import_the_c_store_receiver() -> None:
    """pynetdicom (about 60 ms of CPU) is imported when a source receives, not before."""
    code = "import sys, stowd.commands.cli; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(out.stdout.split())
    assert "stowd.service.receivers" in loaded  # the daemon's side of receiving is there
    assert not loaded & set(OPTIONAL)

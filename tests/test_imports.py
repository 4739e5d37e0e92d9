"""What every command pays at start: modules only some configurations need are imported
when they are needed (issue 19: ``import stowd.commands.cli`` cost 0.7 s of CPU)."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("pynetdicom", "stowd.pipeline.receive", "stowd.pipeline.dimse")
BY_COMMAND = (
    "stowd.service.daemon",
    "watchdog",
    "stowd.commands.migrate",
    "stowd.commands.connect",
)


def loaded_by(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(out.stdout.split())


def test_the_daemon_does_not_import_the_c_store_receiver() -> None:
    """pynetdicom (about 60 ms of CPU) is imported when a source receives, not at start."""
    loaded = loaded_by("import sys, stowd.service.daemon")
    assert "stowd.service.receivers" in loaded  # the daemon's side of receiving is there
    assert not loaded & set(OPTIONAL)


def test_each_command_imports_what_only_it_needs_when_it_runs() -> None:
    """``stowd status`` and every other call paid for the daemon and all commands (half of
    the CLI's import); ``run`` imports the daemon, ``migrate`` its own modules."""
    assert not loaded_by("import sys, stowd.commands.cli") & set(OPTIONAL + BY_COMMAND)

"""What a test needs from the machine: skipped without it on a developer's machine, failed
under ``CI=true`` (in CI a missing component is a failure, never a skip)."""

from __future__ import annotations

import os

import pytest


def require(problem: str | None) -> None:
    """Skip the calling test (fail it under CI=true) when ``problem`` is not None."""
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {problem}", pytrace=False)
    pytest.skip(problem)

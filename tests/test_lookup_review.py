"""Review of issue 8 (lookups): an archive that hangs, values the archive left out, answers
that do not show the keys asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Clock
from test_lookup_rules import WORKLIST, entry, queued, wanted
from test_rules import load
from worklist import Worklist, serve

from stowd.lookup import Finder, LookupUnavailable
from stowd.queue import Queue


class Hanging(Worklist):
    """A worklist that takes ``hang`` seconds (of the test's clock) to answer an error."""

    def __init__(self, clock: Clock, hang: float) -> None:
        super().__init__([])
        self.clock, self.hang, self.status = clock, hang, 500

    def answer(self, path: str) -> tuple[int, list[dict[str, object]]]:
        self.clock.now += self.hang  # the read timeout of a hung archive
        return super().answer(path)


def test_a_hung_archive_is_asked_once_not_once_per_file(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    """Files are read one at a time; a query that hangs for the read timeout (30 s) must not
    be repeated for every next file (before: the failure was dated from when the query began,
    so it was already forgotten when it came back, and each file waited 30 s again)."""
    worklist = Hanging(clock, 30.0)
    with serve(worklist) as url:
        config = load(tmp_path, WORKLIST.format(url=url))
        finder = Finder(config, queue, clock=clock)
        try:
            for rel in ("A1/S1/a.jpg", "A1/S1/b.jpg", "A2/S1/c.jpg"):
                with pytest.raises(LookupUnavailable, match="HTTP 500"):
                    finder.find(queued(queue, rel), wanted(config, rel))
            assert len(worklist.requests) == 1
            clock.now += 16  # remembered briefly, then asked again
            with pytest.raises(LookupUnavailable):
                finder.find(queued(queue, "A3/S1/d.jpg"), wanted(config, "A3/S1/d.jpg"))
            assert len(worklist.requests) == 2
        finally:
            finder.close()


BY_ISSUER = """
rules:
  - lookup:
      in: worklist
      query: {{PatientID: '{{parts[0]}}', IssuerOfPatientID: '{{parts[1]}}'}}
      url: {url}/mwlitems
"""


class IgnoresIssuer(Worklist):
    """A worklist that does not support IssuerOfPatientID: it ignores the key (PS3.18 asks
    only for a Warning header) and does not return the attribute."""

    def answer(self, path: str) -> tuple[int, list[dict[str, object]]]:
        base, _, query = path.partition("?")
        kept = [p for p in query.split("&") if not p.startswith("IssuerOfPatientID=")]
        return super().answer(f"{base}?{'&'.join(kept)}")


def test_an_entry_that_does_not_show_a_key_asked_is_no_match(
    tmp_path: Path, queue: Queue, clock: Clock
) -> None:
    """Before: a key the archive did not return counted as matched, so the one item of
    PatientID P1 at another hospital was joined."""
    worklist = IgnoresIssuer([entry("A1", "S1", "P1")])
    with serve(worklist) as url:
        config = load(tmp_path, BY_ISSUER.format(url=url))
        finder = Finder(config, queue, clock=clock)
        try:
            rel = "P1/HOSP_B/a.jpg"
            with pytest.raises(LookupUnavailable, match="does not show IssuerOfPatientID"):
                finder.find(queued(queue, rel), wanted(config, rel))
        finally:
            finder.close()

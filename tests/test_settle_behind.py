"""A sender moves a batch to sent/ while it uploads the next one (issue 19): killed -9 or
stopped at that moment, nothing is lost, nothing is in two places, nothing stays claimed.

The proxy in front of Orthanc acts when the next batch's request arrives, that is while the
batch before it is being moved (50 files, each renamed, its folder synced, its row recorded).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from dicomgen import make_study
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from orthanc import Orthanc
from stowproxy import StowProxy

STUDIES = 6
PER_STUDY = 50  # two batches of 25 each
DESTINATION = {"workers": 1, "batch": {"max_files": 25}, "timeouts": {"read": "30s"}}
KILLS = 6
MOVE_WAIT = 2.0  # seconds a kill waits for a batch's moves to begin, at most


def counts(layout: Layout) -> dict[str, int]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.returncode == 0, result.stderr
    found: dict[str, int] = json.loads(result.stdout)["counts"]
    return found


def setup(tmp_path: Path, orthanc: Orthanc) -> tuple[Layout, StowProxy, dict[str, str]]:
    proxy = StowProxy(orthanc.dicomweb_url)
    layout = make_layout(
        tmp_path / "run", proxy.base, destinations={"pacs": {"url": proxy.base, **DESTINATION}}
    )
    uids: dict[str, str] = {}
    for n in range(STUDIES):
        for path, uid in make_study(layout.drop / f"s{n}", PER_STUDY, size_bytes=20_000):
            uids[str(path.relative_to(layout.drop))] = uid
    return layout, proxy, uids


def moved(layout: Layout, before: int) -> None:
    """Until a file more than ``before`` is in sent/ (a batch's moves have begun), or a
    moment has passed (its moves were done already: the kill then comes after them)."""
    deadline = time.monotonic() + MOVE_WAIT
    while len(layout.files(layout.sent)) <= before and time.monotonic() < deadline:
        time.sleep(0.001)


def assert_each_file_once(layout: Layout, names: set[str], *, killed: bool = False) -> None:
    """Every file is in exactly one of drop/ and sent/; none failed.  Right after a kill a
    file may have both names as one file (``killed``): a move puts the name in sent/ with a
    hard link, then unlinks it from drop/ (it never replaces a file there), and a kill
    between the two leaves both links, which the next start finishes (checked at the end)."""
    dropped, sent = layout.files(layout.drop), layout.files(layout.sent)
    both = dropped & sent
    if killed:
        both = {n for n in both if not os.path.samefile(layout.drop / n, layout.sent / n)}
    assert both == set()
    assert dropped | sent == names
    assert layout.files(layout.failed) == set()


def test_killed_while_a_batch_is_moved_and_the_next_uploads(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    layout, proxy, uids = setup(tmp_path, orthanc)
    names = set(uids)
    try:
        for round in range(KILLS):
            daemon = Stowd(layout).start()
            first = proxy.arrivals + 1  # this run's first request; its second is killed
            mid_move = round % 2 == 1  # else as the request arrives

            def kill(
                number: int, daemon: Stowd = daemon, first: int = first, mid: bool = mid_move
            ) -> bool:
                if number != first + 1:
                    return True
                if mid:  # once the first file of the batch before is in sent/
                    moved(layout, len(layout.files(layout.sent)))
                daemon.kill()
                return False

            proxy.on_arrival = kill
            assert daemon.proc is not None
            daemon.proc.wait(120)  # killed by the proxy as this run's second request arrives
            assert_each_file_once(layout, names, killed=True)
        proxy.on_arrival = lambda _n: True
        assert len(layout.files(layout.sent)) < len(names), "killed too late to prove anything"
        with Stowd(layout) as daemon:
            wait_for(
                lambda: layout.files(layout.sent) == names,
                180,
                "all files sent",
                lambda: daemon.log,
            )
            wait_for(
                lambda: counts(layout) == {"sent": len(names)},
                60,
                "every row sent",
                lambda: daemon.log,
            )
        assert_each_file_once(layout, names)
        assert orthanc.sop_instance_uids() == set(uids.values())
    finally:
        proxy.stop()


def test_stopped_while_a_batch_is_moved_and_the_next_uploads(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """SIGTERM: the upload in flight is answered, then its batch and the one before are
    moved before stowd exits; the others wait in the queue, nothing is left claimed."""
    layout, proxy, uids = setup(tmp_path, orthanc)
    daemon = Stowd(layout).start()
    try:

        def terminate(number: int) -> bool:
            if number == 2:  # its answer waits until stowd is stopping
                proxy.gate.clear()
                # the start's walk queues the files while the first batches go out: a stop
                # before its end would leave some unqueued in drop/ (found at the next start)
                wait_for(
                    lambda: sum(counts(layout).values()) == len(uids),
                    60,
                    "every file queued",
                    lambda: daemon.log,
                )
                assert daemon.proc is not None
                os.kill(daemon.proc.pid, signal.SIGTERM)
            return True

        proxy.on_arrival = terminate
        wait_for(lambda: "stopping:" in daemon.log, 60, "stowd stopping", lambda: daemon.log)
        proxy.gate.set()
        assert daemon.proc is not None
        assert daemon.proc.wait(60) == 0, daemon.log
    finally:
        proxy.gate.set()
        daemon.stop()
        proxy.stop()
    sent = layout.files(layout.sent)
    assert len(sent) == 2 * DESTINATION["batch"]["max_files"]  # type: ignore[index]
    assert_each_file_once(layout, set(uids))
    assert {uids[name] for name in sent} <= orthanc.sop_instance_uids()
    assert counts(layout) == {"sent": len(sent), "pending": len(uids) - len(sent)}

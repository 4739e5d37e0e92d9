"""``verify: true`` and a StudyInstanceUID that is not plain digits and dots."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomgen import make_study
from harness import Stowd, make_layout, wait_for
from orthanc import Orthanc
from verifyproxy import VerifyProxy

TIMEOUT = 120.0


@pytest.fixture
def proxy(orthanc: Orthanc) -> Iterator[VerifyProxy]:
    server = VerifyProxy(orthanc.dicomweb_url)
    try:
        yield server
    finally:
        server.stop()


def test_a_study_uid_with_a_url_character_does_not_hold_the_destination(
    tmp_path: Path, proxy: VerifyProxy, orthanc: Orthanc
) -> None:
    """A file whose StudyInstanceUID holds '#' (a damaged or hostile file in any drop folder):
    the archive stores it, and the query for its study must ask for that study, not cut the
    URL at the '#' (which asked Orthanc for another study, answered 404, and held the whole
    destination, every file of every folder waiting, again at each retry)."""
    dest = {"url": proxy.base, "workers": 1, "verify": True, "timeouts": {"read": "30s"}}
    layout = make_layout(tmp_path / "run", proxy.base, destinations={"pacs": dest})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: not a valid UI value, as intended
        made = make_study(layout.drop / "odd", 1, study_uid="1.2.826.0.1.3680043.8.498.7#1")
    with Stowd(layout) as daemon:
        wait_for(
            lambda: bool(layout.files(layout.sent)) or "cannot ask it whether" in daemon.log,
            TIMEOUT,
            "the file in sent/, or the destination held",
            lambda: daemon.log,
        )
        assert daemon.terminate() == 0
    assert made[0][1] in orthanc.sop_instance_uids()  # the archive did store it
    assert "cannot ask it whether" not in daemon.log
    assert layout.files(layout.sent) == {"odd/" + made[0][0].name}

"""Issue 14: the limits that bound a hostile writer or archive: a header of millions of tiny
elements (read in bounded memory, also after the pixel data), and JSON nested too deeply in a
STOW answer, a lookup answer, a token answer or an error file."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from bombgen import peak_rss_mb
from dicomgen import make_instance, make_instance_bytes
from harness import Stowd, make_layout, run_cli, wait_for
from hostileserver import HostileArchive

from stowd.media import deflated

DEAD_URL = "http://127.0.0.1:9/dicom-web"  # nothing listens: no file reaches an archive
MAX_PEAK_MB = 300.0
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _meta(syntax: str) -> bytes:
    """Preamble, DICM and a File Meta Information naming ``syntax`` (PS3.10 7.1)."""
    uid = syntax.encode()
    uid += b"\0" * (len(uid) % 2)
    body = struct.pack("<HH", 2, 1) + b"OB\0\0" + struct.pack("<I", 2) + b"\0\1"
    for elem, value in ((2, b"1.2.840.10008.5.1.4.1.1.7\0"), (3, b"1.2.3.4.5.6\0"), (0x10, uid)):
        body += struct.pack("<HH", 2, elem) + b"UI" + struct.pack("<H", len(value)) + value
    length = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(body))
    return b"\0" * 128 + b"DICM" + length + body


def _tiny_elements(count: int) -> bytes:
    """A data set of ``count`` empty private LO elements (8 bytes each, explicit VR LE),
    each a distinct tag in ascending order: 8 bytes of file, hundreds of bytes in pydicom."""
    out = bytearray()
    group = 0x0009
    while count > 0:
        for elem in range(0x1000, 0x1000 + min(count, 0xF000)):
            out += struct.pack("<HH", group, elem) + b"LO\0\0"
        count -= 0xF000
        group += 2
    return bytes(out)


def header_element_bomb(path: Path, count: int, *, deflated: bool) -> None:
    """A file whose header is ``count`` tiny elements (16 MB for 2 million): deflated, about
    3 MB, far below the 64 MiB header limit of stowd/deflated.py; or plain, 16 MB."""
    elements = _tiny_elements(count)
    if deflated:
        # raw deflate (PS3.5 A.5); level 1: these repetitive bytes take zlib's level 9 about
        # 20 s for 2 million elements (level 1: 0.1 s), for the same 3 MB
        packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = _meta(DEFLATED) + packer.compress(elements) + packer.flush()
    else:
        data = _meta(EXPLICIT_LE) + elements
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("deflated", [True, False], ids=["deflated", "plain"])
def test_a_header_of_tiny_elements_is_read_in_bounded_memory(
    tmp_path: Path, deflated: bool
) -> None:
    """A file whose header is 2 million empty elements (16 MB inflated; deflated: 3 MB).
    Seen: daemon VmHWM 1024 MB deflated (12 MB file of 8 million elements: 3.6 GB, 98 s CPU),
    and 716 MB for the plain 16 MB file; the units' MemoryMax= is 1G, so
    under systemd the daemon would be killed, and find the file again when restarted.
    Now its elements are counted before it is parsed: too many, it fails with the reason."""
    layout = make_layout(tmp_path / "run", DEAD_URL)
    header_element_bomb(layout.drop / "tiny.dcm", 2_000_000, deflated=deflated)
    with Stowd(layout) as daemon:
        wait_for(
            lambda: layout.files(layout.failed) == {"tiny.dcm"}, 300, "failed/", lambda: daemon.log
        )
        assert daemon.proc is not None
        peak = peak_rss_mb(daemon.proc.pid)
        assert daemon.terminate() == 0
    print(f"\ndaemon VmHWM with a header of 2 million elements: {peak:.1f} MB")
    assert peak < MAX_PEAK_MB
    error = json.loads((layout.failed / "tiny.dcm.error.json").read_text())
    assert "header has more than 500,000 data elements" in error["reason"]


# -- answers nested too deeply for Python's json ------------------------------------------------
def test_a_stow_answer_nested_too_deeply_is_an_answer_that_cannot_be_read(tmp_path: Path) -> None:
    """A 200 whose JSON body is 100,000 arrays deep (200 KB, within the answer limit): like
    any answer that is not a STOW answer, the file waits; no traceback, no unexpected error.
    Was: json's RecursionError escaped parse_answer (which caught ValueError only)."""
    with HostileArchive("deep") as archive:
        layout = make_layout(tmp_path / "run", archive.base)
        make_instance(layout.drop / "a.dcm")
        with Stowd(layout) as daemon:
            wait_for(lambda: archive.seen("POST") >= 2, 120, "a second POST", lambda: daemon.log)
            assert layout.files(layout.failed) == set()
            archive.stow = "ok"  # the file was kept and is sent once the archive answers
            wait_for(
                lambda: layout.files(layout.sent) == {"a.dcm"}, 120, "sent", lambda: daemon.log
            )
            assert daemon.terminate() == 0
    assert "RecursionError" not in daemon.log
    assert "unexpected error" not in daemon.log


def test_a_lookup_answer_nested_too_deeply_makes_the_file_wait(tmp_path: Path) -> None:
    """The same body as a QIDO-RS lookup answer: the lookup is unavailable, the file waits.
    Was: the RecursionError escaped lookup.parse (which caught ValueError only)."""
    rule = {
        "match": {"type": "dicom"},
        "lookup": {"in": "studies", "query": {"AccessionNumber": "{dicom.AccessionNumber}"}},
    }
    with HostileArchive("ok") as archive:
        archive.qido = "deep"
        layout = make_layout(tmp_path / "run", archive.base, rules=[rule])
        make_instance(layout.drop / "a.dcm", extra={"AccessionNumber": "ACC-1"})
        with Stowd(layout) as daemon:
            reason = "is not JSON stowd can read (nested too deeply)"
            wait_for(lambda: reason in daemon.log, 120, repr(reason), lambda: daemon.log)
            assert archive.seen("POST") == 0
            assert daemon.terminate() == 0
    assert layout.files(layout.drop) == {"a.dcm"}
    assert layout.files(layout.failed) == set()
    assert "RecursionError" not in daemon.log
    assert "unexpected error" not in daemon.log


def test_a_token_answer_nested_too_deeply_holds_the_destination(tmp_path: Path) -> None:
    """The same body from the OAuth2 token endpoint: no token, the destination is held and
    the file waits.  Was: the RecursionError escaped the token request (ValueError only)."""
    with HostileArchive("ok") as archive:
        archive.token = "deep"
        auth = {
            "type": "oauth2",
            "token_url": f"{archive.url}/token",
            "client_id": "stowd",
            "client_secret": "not-a-real-secret",
        }
        layout = make_layout(tmp_path / "run", archive.base)
        config = yaml.safe_load(layout.config.read_text())
        config["destinations"]["pacs"]["auth"] = auth
        layout.config.write_text(yaml.safe_dump(config))
        make_instance(layout.drop / "a.dcm")
        with Stowd(layout) as daemon:
            wait_for(lambda: archive.seen("POST /token") >= 2, 120, "a second token request")
            assert daemon.terminate() == 0
        assert archive.seen("POST /dicom-web") == 0
    assert layout.files(layout.drop) == {"a.dcm"}
    assert "RecursionError" not in daemon.log
    assert "unexpected error" not in daemon.log


def test_retry_puts_back_a_file_whose_error_file_is_nested_too_deeply(tmp_path: Path) -> None:
    """An error file of 100,000 nested arrays in failed/ (damaged, or planted where writers
    can write in failed/): ``stowd retry`` says it could not be read and puts both files back.
    Was: a RecursionError traceback, and no file put back."""
    layout = make_layout(tmp_path / "run", DEAD_URL)
    make_instance(layout.failed / "a.dcm")
    (layout.failed / "a.dcm.error.json").write_text("[" * 100_000 + "]" * 100_000)
    make_instance(layout.failed / "b.dcm")
    (layout.failed / "b.dcm.error.json").write_text('{"reason": "the archive refused it"}')
    done = run_cli("retry", "-c", str(layout.config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "nests arrays or objects too deeply" in done.stdout
    assert layout.files(layout.drop) == {"a.dcm", "b.dcm"}
    assert layout.files(layout.failed) == set()


def _trailing_bomb(path: Path, count: int) -> None:
    """A valid deflated instance whose data set goes on after its pixel data with ``count``
    tiny private elements: its header is small, but pydicom reads a deflated data set whole
    to change it (16 MB inflated for 2 million, under the 32 MiB a rule may change)."""
    data, _ = make_instance_bytes()
    with io.BytesIO(data) as fp:
        start, syntax = deflated.file_meta(fp, data)
    assert syntax == EXPLICIT_LE
    trailing = bytearray()
    for n in range(count):
        trailing += struct.pack("<HH", 0x8001 + 2 * (n // 0xF000), 0x1000 + n % 0xF000)
        trailing += b"LO\0\0"
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)  # level 1: as header_element_bomb
    path.write_bytes(_meta(DEFLATED) + packer.compress(data[start:] + trailing) + packer.flush())


def test_a_deflated_file_with_millions_of_elements_after_its_pixels_is_not_rewritten(
    tmp_path: Path,
) -> None:
    """A rule makes stowd change the file, for which pydicom parses the whole inflated data
    set, the elements after the pixel data too: they are counted before that.  Was: the
    header (before the pixel data) was read in bounded memory, but not the rest."""
    rules = [{"match": {"type": "dicom"}, "set": {"InstitutionName": "Test"}}]
    layout = make_layout(tmp_path / "run", DEAD_URL, rules=rules)
    layout.drop.mkdir(parents=True, exist_ok=True)
    _trailing_bomb(layout.drop / "trailing.dcm", 2_000_000)
    with Stowd(layout) as daemon:
        wait_for(
            lambda: layout.files(layout.failed) == {"trailing.dcm"},
            300,
            "failed/",
            lambda: daemon.log,
        )
        assert daemon.proc is not None
        peak = peak_rss_mb(daemon.proc.pid)
        assert daemon.terminate() == 0
    print(f"\ndaemon VmHWM with 2 million elements after the pixels: {peak:.1f} MB")
    assert peak < MAX_PEAK_MB
    error = json.loads((layout.failed / "trailing.dcm.error.json").read_text())
    assert "header has more than 500,000 data elements" in error["reason"]

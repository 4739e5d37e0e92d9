"""stowd.elements: a header's elements are counted, wherever they hide, without keeping them."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from stowd.errors import FileProblem
from stowd.media import deflated, elements

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
UNDEFINED = 0xFFFFFFFF


def _explicit(
    group: int, elem: int, vr: bytes, value: bytes = b"", length: int | None = None
) -> bytes:
    size = len(value) if length is None else length
    if vr in elements.LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr, 0, size) + value
    return struct.pack("<HH2sH", group, elem, vr, size) + value


def _implicit(group: int, elem: int, value: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<HHI", group, elem, len(value) if length is None else length) + value


def _item(content: bytes, *, defined: bool) -> bytes:
    if defined:
        return _implicit(0xFFFE, 0xE000, content)
    return _implicit(0xFFFE, 0xE000, length=UNDEFINED) + content + _implicit(0xFFFE, 0xE00D)


def _count(data: bytes, *, explicit: bool = True, limit: int = 1000) -> int:
    memory = io.BytesIO(data)
    return elements.count(
        memory.read, lambda n: memory.seek(n, 1), explicit=explicit, little=True, limit=limit
    )


def _tiny(n: int, *, explicit: bool = True) -> bytes:
    if explicit:
        return b"".join(_explicit(0x0009, 0x1000 + i, b"LO") for i in range(n))
    return b"".join(_implicit(0x0009, 0x1000 + i) for i in range(n))


def _walked(ds: pydicom.Dataset) -> int:
    """What pydicom made of a header: its elements and items."""
    found = 0
    for element in ds:
        found += 1
        if element.VR == "SQ":
            found += sum(1 + _walked(item) for item in element.value)
    return found


def test_a_header_is_never_counted_smaller_than_pydicom_reads_it() -> None:
    """pydicom's own test files (explicit and implicit VR, big endian, no meta, UN-encoded
    and private sequences, encapsulated pixel data): the count is at least what pydicom
    made of the header, so a limit on the count bounds what pydicom holds."""
    compared = 0
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                made = _walked(pydicom.dcmread(path, stop_before_pixels=True, force=True))
        except Exception:
            continue  # not a file pydicom reads: nothing to compare
        with open(path, "rb") as fp:
            counted = deflated.count_header(fp, fp.read(65536))
        assert counted >= made, path.name
        compared += 1
    assert compared > 100


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(
            lambda inner: _explicit(0x0040, 0xA730, b"SQ", _item(inner, defined=True)),
            id="defined-length-sequence",
        ),
        pytest.param(
            lambda inner: (
                _explicit(0x0040, 0xA730, b"SQ", length=UNDEFINED)
                + _item(inner, defined=False)
                + _implicit(0xFFFE, 0xE0DD)
            ),
            id="undefined-length-sequence",
        ),
    ],
)
def test_elements_inside_sequences_are_counted(wrap: object) -> None:
    assert callable(wrap)
    data = _explicit(0x0008, 0x0016, b"UI", b"1.2\0") + wrap(_tiny(500))
    assert _count(data) == 1 + 1 + 1 + 500  # the element, the sequence, its item, its content
    with pytest.raises(FileProblem, match="more than 200 data elements"):
        _count(data, limit=200)


def test_a_sequence_encoded_as_un_is_walked_as_implicit_vr() -> None:
    """PS3.5 6.2.2: a UN value of undefined length is a sequence in implicit VR."""
    content = _item(_tiny(300, explicit=False), defined=False) + _implicit(0xFFFE, 0xE0DD)
    data = _explicit(0x0009, 0x0010, b"UN", length=UNDEFINED) + content
    with pytest.raises(FileProblem):
        _count(data, limit=200)


def test_a_private_value_that_holds_items_is_walked() -> None:
    """pydicom reads a private value of unknown VR that starts with an item as a sequence."""
    data = _implicit(0x0009, 0x1001, _item(_tiny(300, explicit=False), defined=True))
    assert _count(data, explicit=False) == 302


def test_fragments_of_encapsulated_pixel_data_are_skipped_not_walked() -> None:
    """A fragment's bytes are compressed pixels: they are not elements, however they look."""
    looks_like_elements = _tiny(300)
    icon = (
        _explicit(0x7FE0, 0x0010, b"OB", length=UNDEFINED)
        + _implicit(0xFFFE, 0xE000)  # the basic offset table, empty
        + _implicit(0xFFFE, 0xE000, looks_like_elements)
        + _implicit(0xFFFE, 0xE0DD)
    )
    data = _explicit(0x0088, 0x0200, b"SQ", _item(icon, defined=True))
    assert _count(data) == 1 + 1 + 1 + 2  # sequence, item, pixel data, its two fragments


def test_counting_stops_at_the_pixel_data_unless_whole() -> None:
    pixels = _explicit(0x7FE0, 0x0010, b"OW", b"\0" * 16)
    data = _tiny(3) + pixels + b"".join(_explicit(0x8001, 0x1000 + i, b"LO") for i in range(5))
    assert _count(data) == 3
    memory = io.BytesIO(data)
    assert (
        elements.count(
            memory.read, lambda n: memory.seek(n, 1), explicit=True, little=True, whole=True
        )
        == 9
    )


def test_a_real_file_is_counted_and_parsed_as_before() -> None:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    with open(path, "rb") as fp:
        assert 0 < deflated.count_header(fp, fp.read(65536)) < 1000

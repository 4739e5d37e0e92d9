"""sidecar.py: which sidecars apply, reading both shapes, every problem in one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stowd.config.model import Sidecars
from stowd.errors import FileProblem, FileUnreadable, FileVanished
from stowd.pipeline.sidecar import is_sidecar, load, read_sidecar, sidecars_of, still_needed

BOTH = Sidecars(per_file=True, folder="_metadata.yaml")
PER_FILE = Sidecars(per_file=True, folder=None)
FOLDER = Sidecars(per_file=False, folder="_metadata.yaml")


def _touch(folder: Path, *names: str, text: str = "") -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _problem(path: Path) -> str:
    with pytest.raises(FileProblem) as info:
        read_sidecar(path)
    assert info.value.path == str(path)
    return str(info.value)


# --- which files are sidecars, and which apply -------------------------------------------


@pytest.mark.parametrize(
    ("name", "settings", "expected"),
    [
        ("_metadata.yaml", BOTH, True),
        ("_metadata.yaml", FOLDER, True),
        ("_metadata.yaml", PER_FILE, True),  # a .yaml: a per-file sidecar
        ("img.json", BOTH, True),
        ("img.jpg.YML", BOTH, True),
        ("img.Yaml", PER_FILE, True),
        ("img.json", FOLDER, False),
        ("img.jpg", BOTH, False),
        ("img.dcm", BOTH, False),
        ("json", BOTH, False),
        ("_metadata.yml", FOLDER, False),
    ],
)
def test_is_sidecar(name: str, settings: Sidecars, expected: bool) -> None:
    assert is_sidecar(Path("/drop") / name, settings) is expected


@pytest.mark.parametrize(
    ("present", "settings", "expected"),
    [
        ([], BOTH, []),
        (["img.yml", "img.jpg.json", "_metadata.yaml", "img.json"], BOTH,
         ["_metadata.yaml", "img.json", "img.yml", "img.jpg.json"]),
        (["img.jpg.yaml", "img.yaml"], BOTH, ["img.yaml", "img.jpg.yaml"]),
        (["_metadata.yaml", "img.json"], FOLDER, ["_metadata.yaml"]),
        (["_metadata.yaml", "img.json"], PER_FILE, ["img.json"]),
        (["img.JSON"], BOTH, ["img.JSON"]),
        (["other.json", "img.png.json", "img2.json"], BOTH, []),
        (["sub/_metadata.yaml", "sub/img.json"], BOTH, []),  # only beside the file
    ],
)  # fmt: skip
def test_sidecars_of(
    tmp_path: Path, present: list[str], settings: Sidecars, expected: list[str]
) -> None:
    _touch(tmp_path, "img.jpg", *present)
    assert sidecars_of(tmp_path / "img.jpg", settings) == [tmp_path / n for n in expected]


def test_sidecars_of_a_file_without_suffix(tmp_path: Path) -> None:
    _touch(tmp_path, "IM0001", "IM0001.json")
    assert sidecars_of(tmp_path / "IM0001", PER_FILE) == [tmp_path / "IM0001.json"]


def test_sidecars_of_ignores_a_folder_with_a_sidecar_name(tmp_path: Path) -> None:
    (tmp_path / "img.json").mkdir()
    _touch(tmp_path, "img.jpg")
    assert sidecars_of(tmp_path / "img.jpg", BOTH) == []


def test_load_merges_key_by_key_later_wins(tmp_path: Path) -> None:
    _touch(tmp_path, "img.jpg")
    _write(tmp_path / "_metadata.yaml", "PatientID: FOLDER\nPatientName: Doe^Jane\n")
    _write(tmp_path / "img.json", '{"PatientID": "STEM", "StudyID": "S1"}')
    _write(tmp_path / "img.jpg.yml", "PatientID: FULL\n")
    values, used = load(tmp_path / "img.jpg", BOTH)
    assert values == {"PatientID": "FULL", "PatientName": "Doe^Jane", "StudyID": "S1"}
    assert used == [tmp_path / "_metadata.yaml", tmp_path / "img.json", tmp_path / "img.jpg.yml"]


def test_load_without_sidecars(tmp_path: Path) -> None:
    _touch(tmp_path, "img.jpg")
    assert load(tmp_path / "img.jpg", BOTH) == ({}, [])


def test_load_names_the_bad_sidecar(tmp_path: Path) -> None:
    _touch(tmp_path, "img.jpg")
    _write(tmp_path / "_metadata.yaml", "PatientID: OK\n")
    bad = _write(tmp_path / "img.json", '{"PatientSex": "x"}')
    with pytest.raises(FileProblem, match=r"^sidecar img\.json: PatientSex \(CS\)") as info:
        load(tmp_path / "img.jpg", BOTH)
    assert info.value.path == str(bad)


# --- still_needed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sidecar", "files", "leaving", "expected"),
    [
        ("_metadata.yaml", ["a.dcm", "b.dcm"], ["a.dcm"], True),
        ("_metadata.yaml", ["a.dcm", "b.dcm"], ["a.dcm", "b.dcm"], False),
        ("_metadata.yaml", ["a.dcm", ".hidden", "img.json"], ["a.dcm"], False),
        ("_metadata.yaml", ["a.dcm", "sub/b.dcm"], ["a.dcm"], False),
        ("_metadata.yaml", [], [], False),
        ("img.json", ["img.jpg", "img.png"], ["img.jpg"], True),  # stem form, shared
        ("img.json", ["img.jpg", "img.png"], ["img.jpg", "img.png"], False),
        ("img.json", ["img.jpg", "other.jpg"], ["img.jpg"], False),
        ("img.json", ["img"], [], True),  # full-name form of a file without suffix
        ("img.jpg.json", ["img.jpg", "img.png"], ["img.jpg"], False),
        ("img.jpg.json", ["img.jpg"], [], True),
        ("img.jpg.json", ["img.jpg.bak"], [], True),  # the stem form of img.jpg.bak
    ],
)
def test_still_needed(
    tmp_path: Path, sidecar: str, files: list[str], leaving: list[str], expected: bool
) -> None:
    _touch(tmp_path, sidecar, *files)
    gone = [tmp_path / name for name in leaving]
    assert still_needed(tmp_path / sidecar, BOTH, leaving=gone) is expected


@pytest.mark.parametrize(
    ("settings", "expected"), [(BOTH, True), (PER_FILE, True), (FOLDER, False)]
)
def test_still_needed_per_file_only_if_per_file_sidecars_are_on(
    tmp_path: Path, settings: Sidecars, expected: bool
) -> None:
    _touch(tmp_path, "img.json", "img.jpg")
    assert still_needed(tmp_path / "img.json", settings, leaving=[]) is expected


def test_still_needed_compares_folders_not_spellings(tmp_path: Path) -> None:
    _touch(tmp_path, "_metadata.yaml", "a.dcm")
    (tmp_path / "sub").mkdir()
    other_spelling = tmp_path / "sub" / ".." / "a.dcm"
    assert not still_needed(tmp_path / "_metadata.yaml", BOTH, leaving=[other_spelling])
    elsewhere = tmp_path / "sub" / "a.dcm"
    assert still_needed(tmp_path / "_metadata.yaml", BOTH, leaving=[elsewhere])


def test_still_needed_after_the_folder_is_gone(tmp_path: Path) -> None:
    assert not still_needed(tmp_path / "gone" / "_metadata.yaml", BOTH, leaving=[])


# --- reading: the keyword shape ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("a.json", '{"PatientID": "X", "PatientName": "Doe^John"}',
         {"PatientID": "X", "PatientName": "Doe^John"}),
        ("a.yaml", "PatientID: X\nPatientName: Doe^John\n",
         {"PatientID": "X", "PatientName": "Doe^John"}),
        ("a.yml", "PatientBirthDate: 1980-02-03\n", {"PatientBirthDate": "19800203"}),
        ("_metadata.yaml", "PatientID: 0123\nSeriesNumber: 7\nAccessionNumber: 4711\n",
         {"PatientID": "0123", "SeriesNumber": 7, "AccessionNumber": "4711"}),
        ("a.yaml", "ImageType: [ORIGINAL, PRIMARY]\nPixelSpacing: 0.5\\0.5\n",
         {"ImageType": ["ORIGINAL", "PRIMARY"], "PixelSpacing": ["0.5", "0.5"]}),
        ("a.yaml", "StudyDescription:\nPatientSex: ''\n",
         {"StudyDescription": None, "PatientSex": None}),
        ("a.json", '{"ReferencedStudySequence": [{"ReferencedSOPClassUID": "1.2.3"}]}',
         {"ReferencedStudySequence": [{"ReferencedSOPClassUID": "1.2.3"}]}),
        ("a.yaml", "", {}),
        ("a.json", "", {}),
        ("a.json", "  \n", {}),
        ("a.yaml", "# nothing yet\n", {}),
        ("a.json", "\ufeff{\"PatientID\": \"BOM\"}", {"PatientID": "BOM"}),
        ("a.JSON", '{"PatientID": "X"}', {"PatientID": "X"}),
    ],
)  # fmt: skip
def test_read_keywords(tmp_path: Path, name: str, text: str, expected: dict[str, object]) -> None:
    assert read_sidecar(_write(tmp_path / name, text)) == expected


def test_read_lists_every_problem_in_one_message(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "_metadata.yaml",
        "PatientID: OK\n"
        "PatientBirthDate: 1980-02-30\n"
        "PatientsName: Doe^John\n"
        "StudyTime: 10:30:00\n"
        "PatientSex: yes\n",
    )
    assert _problem(path) == (
        "sidecar _metadata.yaml: "
        "PatientBirthDate (DA) must be a date written YYYYMMDD, got '1980-02-30'; "
        "unknown DICOM keyword 'PatientsName'; did you mean 'PatientName'?; "
        "StudyTime (TM) must be a time written HHMMSS.FFFFFF (later parts optional, "
        "hours 00-23), got '10:30:00'; write '103000'; "
        "PatientSex (CS) got true: true/false is not a DICOM value; write text"
    )


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        ("a.yaml", "PatientID: [1\n", ["sidecar a.yaml: is not valid YAML at line 2"]),
        ("a.yaml", "PatientID: X\n  bad: indent\n", ["is not valid YAML at line 2"]),
        ("a.json", '{\n"PatientID": "X",\n}', ["sidecar a.json: is not valid JSON at line 3"]),
        ("a.yaml", "- PatientID\n", ["must hold keywords and their values, got a list"]),
        ("a.json", '"PatientID"', ["must hold keywords and their values, got text"]),
        ("a.yaml", "42\n", ["got the value 42"]),
        ("a.yaml", "a: &x [1]\nb: *x\n", ["is not valid YAML at line 2", "aliases"]),
        ("a.yaml", "a: !!python/object:os.system x\n", ["is not valid YAML at line 1"]),
        ("a.yaml", "--- {}\n--- {}\n", ["is not valid YAML"]),
        ("a.yaml", "1: X\n", ["1 is not a DICOM keyword"]),
        ("a.yaml", "PatientID: {a: 1}\n", ["PatientID (LO)", "not a mapping"]),
    ],
)
def test_read_refuses(tmp_path: Path, name: str, text: str, fragments: list[str]) -> None:
    message = _problem(_write(tmp_path / name, text))
    for fragment in fragments:
        assert fragment in message


def test_read_refuses_a_large_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "big.yaml", "# " + "x" * (1024 * 1024) + "\nPatientID: X\n")
    assert _problem(path) == "sidecar big.yaml: is larger than 1 MiB, too large for a sidecar"


def test_read_accepts_exactly_one_mib(tmp_path: Path) -> None:
    head = "PatientID: X\n#"
    path = _write(tmp_path / "max.yaml", head + "x" * (1024 * 1024 - len(head)))
    assert read_sidecar(path) == {"PatientID": "X"}


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.json", '{"ImageType": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ("deep.yaml", "ImageType: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        (
            "deepsq.json",
            '{"ReferencedStudySequence": '
            + '[{"ReferencedStudySequence": ' * 300
            + "[]"
            + "}]" * 300
            + "}",
        ),
    ],
)
def test_read_refuses_deep_nesting(tmp_path: Path, name: str, text: str) -> None:
    message = _problem(_write(tmp_path / name, text))
    assert message == f"sidecar {name}: nests lists or sequences too deeply"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("long.json", '{"InstanceNumber": ' + "9" * 5000 + "}"),
        ("long.yaml", "InstanceNumber: " + "9" * 5000 + "\n"),
        ("long.yml", "SeriesNumber: !!int '" + "9" * 5000 + "'\n"),
        ("model.json", '{"00200013": {"vr": "IS", "Value": [' + "9" * 5000 + "]}}"),
    ],
)
def test_read_refuses_numbers_python_will_not_convert(tmp_path: Path, name: str, text: str) -> None:
    """Issue 14: Python's ValueError for more than 4300 digits is a problem of the sidecar
    (was: an unexpected error, retried until retry.max_age)."""
    message = _problem(_write(tmp_path / name, text))
    assert message == f"sidecar {name}: holds a number of more than 4300 digits"


def test_read_refuses_text_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("PatientName: Müller\n".encode("latin-1"))
    assert _problem(path) == "sidecar latin1.yaml: is not UTF-8 text (bad byte at offset 14)"


def test_read_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.json"
    with pytest.raises(FileVanished, match=r"sidecar gone\.json disappeared") as info:
        read_sidecar(path)
    assert info.value.path == str(path)


def test_read_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.json"
    path.mkdir()
    with pytest.raises(FileUnreadable) as info:
        read_sidecar(path)
    assert info.value.path == str(path)
    assert "reading the file failed" in str(info.value)


# --- reading: the DICOM JSON model (PS3.18 F.2) -------------------------------------------


def _model(tmp_path: Path, dataset: dict[str, object]) -> Path:
    return _write(tmp_path / "model.json", json.dumps(dataset))


def test_read_model(tmp_path: Path) -> None:
    path = _model(
        tmp_path,
        {
            "00100020": {"vr": "LO", "Value": ["X"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]},
            "00101001": {
                "vr": "PN",
                "Value": [
                    {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": ""},
                    {"Ideographic": "山田", "Phonetic": "やまだ"},
                ],
            },
            "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]},
            "00200011": {"vr": "IS", "Value": [4]},
            "00280030": {"vr": "DS", "Value": [0.5, 0.25]},
            "00280106": {"vr": "US", "Value": [5]},
            "00100030": {"vr": "DA"},
            "00081030": {"vr": "LO", "Value": []},
            "00081110": {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.3.1.2.3.1"]},
                        "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                    },
                    {},
                ],
            },
        },
    )
    assert read_sidecar(path) == {
        "PatientID": "X",
        "PatientName": "Doe^John",
        "OtherPatientNames": ["Yamada^Tarou=山田^太郎", "=山田=やまだ"],
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "SeriesNumber": 4,
        "PixelSpacing": ["0.5", "0.25"],
        "SmallestImagePixelValue": 5,
        "PatientBirthDate": None,
        "StudyDescription": None,
        "ReferencedStudySequence": [
            {
                "ReferencedSOPClassUID": "1.2.840.10008.3.1.2.3.1",
                "ReferencedSOPInstanceUID": "1.2.3.4",
            },
            {},
        ],
    }


def test_read_model_nested_sequences(tmp_path: Path) -> None:
    qualifiers = {"00400032": {"vr": "UT", "Value": ["urn:x"]}}
    item = {
        "00100020": {"vr": "LO", "Value": ["OTHER"]},
        "00100024": {"vr": "SQ", "Value": [qualifiers]},
    }
    path = _model(tmp_path, {"00101002": {"vr": "SQ", "Value": [item]}})
    assert read_sidecar(path) == {
        "OtherPatientIDsSequence": [
            {
                "PatientID": "OTHER",
                "IssuerOfPatientIDQualifiersSequence": [{"UniversalEntityID": "urn:x"}],
            }
        ]
    }


@pytest.mark.parametrize(
    ("dataset", "fragments"),
    [
        ({"00091010": {"vr": "LO", "Value": ["x"]}}, ["tag 00091010 is a private tag"]),
        ({"00100000": {"vr": "UL", "Value": [4]}}, ["tag 00100000 is a group length"]),
        ({"00101234": {"vr": "LO", "Value": ["x"]}},
         ["tag 00101234 is not in the DICOM dictionary"]),
        ({"00020010": {"vr": "UI", "Value": ["1.2"]}}, ["TransferSyntaxUID", "File Meta"]),
        ({"7FE00010": {"vr": "OB", "InlineBinary": "AAAA"}}, ["PixelData", "after the pixel data"]),
        ({"00420011": {"vr": "OB", "InlineBinary": "AAAA"}},
         ["EncapsulatedDocument (00420011) holds binary data (InlineBinary or BulkDataURI)"]),
        ({"00420011": {"vr": "OB", "BulkDataURI": "http://x/1"}}, ["holds binary data"]),
        ({"00100030": {"vr": "LO", "Value": ["19800101"]}},
         ["PatientBirthDate (00100030) is DA in DICOM, but the sidecar says 'LO'"]),
        ({"00280106": {"vr": "OW", "Value": [1]}}, ["is US or SS in DICOM", "says 'OW'"]),
        ({"00100020": {"vr": "LO", "Value": "X"}},
         ['PatientID (00100020): "Value" must be a list']),
        ({"00100020": ["X"]}, ["PatientID (00100020) must be an object"]),
        ({"00100030": {"vr": "DA", "Value": ["1980-02-30"]}},
         ["PatientBirthDate (DA) must be a date written YYYYMMDD, got '1980-02-30'"]),
        ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": 5}]}},
         ["PatientName[0]: the name groups must be text"]),
        ({"00100020": {"vr": "LO", "Value": ["X"]}, "PatientName": "Doe^John"},
         ["mixes DICOM JSON tags (such as '00100020') with keywords (such as 'PatientName')"]),
        ({"00081110": {"vr": "SQ", "Value": ["1.2"]}},
         ["ReferencedStudySequence[0] must be a DICOM JSON dataset, got '1.2'"]),
        ({"00081110": {"vr": "SQ", "Value": [{"ReferencedSOPClassUID": "1.2"}]}},
         ["ReferencedStudySequence[0]: 'ReferencedSOPClassUID' is not a tag"]),
        ({"00081110": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.02"]}}]}},
         ["ReferencedStudySequence[0].ReferencedSOPClassUID (UI)", "got '1.02'"]),
        ({"00081110": {"vr": "SQ", "Value": [{"00091010": {"vr": "LO", "Value": ["x"]}}]}},
         ["ReferencedStudySequence[0]: tag 00091010 is a private tag"]),
    ],
)  # fmt: skip
def test_read_model_refuses(
    tmp_path: Path, dataset: dict[str, object], fragments: list[str]
) -> None:
    message = _problem(_model(tmp_path, dataset))
    assert message.startswith("sidecar model.json: ")
    for fragment in fragments:
        assert fragment in message


def test_read_model_lists_every_problem(tmp_path: Path) -> None:
    path = _model(
        tmp_path,
        {
            "00091010": {"vr": "LO", "Value": ["x"]},
            "00100020": {"vr": "LO", "Value": ["OK"]},
            "00100040": {"vr": "CS", "Value": ["f"]},
        },
    )
    assert _problem(path) == (
        "sidecar model.json: tag 00091010 is a private tag; sidecars can only set standard "
        "attributes; PatientSex (CS) must be upper case: write 'F', got 'f'"
    )


def test_read_model_in_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.yaml", "'00100020': {vr: LO, Value: [X]}\n")
    assert read_sidecar(path) == {"PatientID": "X"}

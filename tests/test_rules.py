"""Metadata rules: templates, matching, evaluation, and the config errors (with lines)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path, PurePosixPath

import pytest
from harness import make_watch_folders

from stowd.config.load import load_config
from stowd.config.model import Config
from stowd.errors import ConfigError, ConfigProblem, RuleFailure
from stowd.pipeline.metadata import digest
from stowd.rules.engine import Facts, RuleOutcome, Template, evaluate, glob_pattern
from stowd.rules.vr import Item

HEAD = """\
queue: ./state/queue.db
sources:
  - name: ct1
    watch: ./drop/ct1
    sent: ./done/ct1/sent
    failed: ./done/ct1/failed
    destination: pacs
  - name: us2
    watch: ./drop/us2
    sent: ./done/us2/sent
    failed: ./done/us2/failed
    destination: pacs
destinations:
  pacs:
    url: http://127.0.0.1:8042/dicom-web
"""
X = "\n    set: {PatientID: x}"  # an action, for rules whose match is tested
NOW = datetime(2026, 11, 27, 9, 30, 5)


def load(tmp_path: Path, rules: str) -> Config:
    path = tmp_path / "stowd.yaml"
    path.write_text(HEAD + textwrap.dedent(rules), encoding="utf-8")
    make_watch_folders(path)
    return load_config(path)


def problems(tmp_path: Path, rules: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, rules)
    return info.value.problems


def run(
    config: Config,
    rel: str,
    attrs: dict[str, str] | None = None,
    *,
    source: str = "ct1",
    kind: str = "dicom",
    sidecar: Item | None = None,
) -> RuleOutcome:
    facts = Facts(PurePosixPath(rel), source, kind, NOW, sidecar or {}, ("x.json",))
    values = attrs or {}
    return evaluate(config.rules_for(config.source(source)), facts, values.get)


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("template", "attrs", "expected"),
    [
        ("{name}", {}, "img.dcm"),
        ("{stem}-{ext}", {}, "img-dcm"),
        ("{path}", {}, "P123/ACC9/img.dcm"),
        ("{folder}", {}, "P123/ACC9"),
        ("{parts[0]}/{parts[-2]}", {}, "P123/ACC9"),
        ("{source}:{type}", {}, "ct1:dicom"),
        ("HOSP-{dicom.PatientID}", {"PatientID": "42"}, "HOSP-42"),
        ("{dicom.PatientName|upper}", {"PatientName": "Doe^Jo"}, "DOE^JO"),
        ("{date}{time}", {}, "20261127093005"),
        ("{now:%Y}", {}, "2026"),
        ("{{literal}}", {}, "{literal}"),
    ],
)
def test_templates_render(
    tmp_path: Path, template: str, attrs: dict[str, str], expected: str
) -> None:
    config = load(tmp_path, f"rules:\n  - set: {{StudyDescription: '{template}'}}\n")
    outcome = run(config, "P123/ACC9/img.dcm", attrs)
    assert outcome.values["StudyDescription"] == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{unknown}", "unknown placeholder {unknown}"),
        ("{name", "without a closing"),
        ("name}", "without an opening"),
        ("{name|shout}", "unknown filter '|shout'"),
        ("{dicom.PatientsName}", "did you mean 'PatientName'"),
        ("{parts}", "unknown placeholder {parts}"),
    ],
)
def test_bad_templates_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        Template.parse(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("glob", "path", "hit"),
    [
        ("*.dcm", "a.dcm", True),
        ("*.dcm", "x/a.dcm", False),
        ("**/*.dcm", "x/y/a.dcm", True),
        ("**/*.dcm", "a.dcm", True),
        ("CT/**", "CT/x/a.dcm", True),
        ("CT/*/?.dcm", "CT/x/a.dcm", True),
        ("[!.]*", ".hidden", False),
        ("img[0-9].jpg", "img7.jpg", True),
    ],
)
def test_path_globs(glob: str, path: str, hit: bool) -> None:
    assert (glob_pattern(glob).match(path) is not None) is hit


# --------------------------------------------------------------------------- evaluation


def test_folder_named_patients_and_institution_from_source(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        r"""
        rules:
          - name: patient from folder
            match:
              regex: '^(?P<pid>[^/]+)/(?P<acc>[^/]+)/'
            set:
              PatientID: '{regex.pid}'
              AccessionNumber: '{regex.acc}'
          - match: {source: ct1}
            default: {InstitutionName: 'City Hospital {source}'}
        """,
    )
    out = run(config, "P123/ACC9/img.dcm", {"PatientID": "WRONG"})
    assert out.values == {
        "PatientID": "P123",
        "AccessionNumber": "ACC9",
        "InstitutionName": "City Hospital ct1",
    }
    assert out.before == {"PatientID": "WRONG", "AccessionNumber": None, "InstitutionName": None}
    assert [r.name for r in out.matched] == ["patient from folder", None]
    assert run(config, "img.dcm", source="us2").values == {}  # nothing matched


def test_later_rules_win_and_see_earlier_results(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        rules:
          - set: {PatientID: 'A'}
          - match: {attributes: {PatientID: A}}
            set: {PatientID: 'B-{dicom.PatientID}'}
          - default: {PatientID: 'never'}
        """,
    )
    assert run(config, "x.dcm", {"PatientID": "orig"}).values == {"PatientID": "B-A"}


def test_source_rules_run_after_top_level_rules(tmp_path: Path) -> None:
    text = HEAD.replace(
        "    destination: pacs\n  - name: us2",
        "    destination: pacs\n    rules:\n      - set: {StationName: CT-OWN}\n  - name: us2",
    )
    path = tmp_path / "stowd.yaml"
    path.write_text(text + "rules:\n  - set: {StationName: TOP}\n", encoding="utf-8")
    make_watch_folders(path)
    config = load_config(path)
    assert run(config, "a.dcm").values == {"StationName": "CT-OWN"}
    assert run(config, "a.dcm", source="us2").values == {"StationName": "TOP"}


@pytest.mark.parametrize(
    ("condition", "attrs", "hit"),
    [
        ("{Modality: CT}", {"Modality": "CT"}, True),
        ("{Modality: CT}", {"Modality": "MR"}, False),
        ("{Modality: [CT, MR]}", {"Modality": "MR"}, True),
        ("{Modality: {one_of: [CT, MR]}}", {"Modality": "US"}, False),
        ("{StationName: {regex: '^CT-\\d+$'}}", {"StationName": "CT-07"}, True),
        ("{StationName: {regex: '^CT'}}", {}, False),
        ("{AccessionNumber: {present: true}}", {"AccessionNumber": ""}, False),
        ("{AccessionNumber: {absent: true}}", {"AccessionNumber": ""}, True),
        ("{AccessionNumber: {absent: true}}", {"AccessionNumber": "A1"}, False),
        ("{SeriesNumber: 3}", {"SeriesNumber": "3"}, True),
        ("{StudyDate: 2024-01-05}", {"StudyDate": "20240105"}, True),
    ],
)
def test_attribute_conditions(
    tmp_path: Path, condition: str, attrs: dict[str, str], hit: bool
) -> None:
    config = load(
        tmp_path, f"rules:\n  - match: {{attributes: {condition}}}\n    set: {{StationName: X}}\n"
    )
    assert ("StationName" in run(config, "a.dcm", attrs).values) is hit


@pytest.mark.parametrize(
    ("match", "rel", "kind", "hit"),
    [
        ("{path: 'CT/*.dcm'}", "CT/a.dcm", "dicom", True),
        ("{path: 'CT/*.dcm'}", "MR/a.dcm", "dicom", False),
        ("{type: pdf}", "a.pdf", "pdf", True),
        ("{type: [jpeg, pdf]}", "a.dcm", "dicom", False),
        ("{source: [us2]}", "a.dcm", "dicom", False),
    ],
)
def test_path_type_and_source_conditions(
    tmp_path: Path, match: str, rel: str, kind: str, hit: bool
) -> None:
    config = load(tmp_path, f"rules:\n  - match: {match}\n    set: {{StationName: X}}\n")
    assert ("StationName" in run(config, rel, kind=kind).values) is hit


def test_default_fills_only_absent_or_empty(tmp_path: Path) -> None:
    config = load(tmp_path, "rules:\n  - default: {InstitutionName: Here, StationName: S1}\n")
    out = run(config, "a.dcm", {"InstitutionName": "", "StationName": "Own"})
    assert out.values == {"InstitutionName": "Here"}


def test_remove_and_unchanged_values_are_not_changes(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "rules:\n  - remove: [OtherPatientIDs, PatientComments]\n    set: {PatientID: same}\n",
    )
    out = run(config, "a.dcm", {"OtherPatientIDs": "X", "PatientID": "same"})
    assert out.remove == ["OtherPatientIDs"]  # PatientComments was absent: nothing to do
    assert out.values == {}
    assert out.changed


def test_sidecar_values_apply_first_and_feed_templates(tmp_path: Path) -> None:
    config = load(tmp_path, "rules:\n  - set: {StudyDescription: 'for {sidecar.PatientID}'}\n")
    out = run(config, "a.dcm", {"PatientID": "old"}, sidecar={"PatientID": "P9"})
    assert out.values == {"PatientID": "P9", "StudyDescription": "for P9"}


def test_nested_sequences_can_be_set(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        rules:
          - match: {regex: '^(?P<acc>[^/]+)/'}
            set:
              RequestAttributesSequence:
                - RequestedProcedureID: 'RP-{regex.acc}'
                  ScheduledProcedureStepID: SPS1
        """,
    )
    out = run(config, "A77/x.dcm")
    assert out.values["RequestAttributesSequence"] == [
        {"RequestedProcedureID": "RP-A77", "ScheduledProcedureStepID": "SPS1"}
    ]


@pytest.mark.parametrize(
    ("rules", "rel", "attrs", "message"),
    [
        (
            "- match: {regex: '^(?P<d>[^/]+)/'}\n    set: {PatientBirthDate: '{regex.d}'}",
            "2024-13-45/a.dcm",
            {},
            "PatientBirthDate (DA)",
        ),
        ("- set: {PatientID: 'H-{dicom.PatientID}'}", "a.dcm", {}, "the file has no PatientID"),
        ("- set: {PatientID: '{sidecar.PatientID}'}", "a.dcm", {}, "does not give PatientID"),
        ("- set: {PatientID: '{parts[-3]}'}", "a.dcm", {}, "is too short"),
        ("- set: {StudyInstanceUID: '{dicom.StudyID}'}", "a.dcm", {"StudyID": ""}, "empty"),
    ],
)
def test_values_that_do_not_fit_fail_the_file_with_the_rule_named(
    tmp_path: Path, rules: str, rel: str, attrs: dict[str, str], message: str
) -> None:
    config = load(tmp_path, "rules:\n  " + rules + "\n")
    with pytest.raises(RuleFailure) as info:
        run(config, rel, attrs)
    text = str(info.value)
    assert message in text
    if "empty" not in message:
        assert "rule rules[0] (config line 17)" in text


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("rules", "key", "line", "message"),
    [
        ("- set: {PatientsName: X}", "rules[0].set.PatientsName", 17, "did you mean 'PatientName'"),
        ("- set: {StudyDate: '2024-01-05'}", "rules[0].set.StudyDate", 17, "20240105"),
        ("- set: {Modality: ct}", "rules[0].set.Modality", 17, "CT"),
        ("- set: {StudyInstanceUID: 1.2}", "rules[0].set.StudyInstanceUID", 17, "quote"),
        ("- set: {InstitutionName: '" + "x" * 70 + "'}", "rules[0].set.InstitutionName", 17, "64"),
        ("- set: {SeriesNumber: 'abc'}", "rules[0].set.SeriesNumber", 17, "IS"),
        ("- set: {PatientID: '{regex.pid}'}", "rules[0].set.PatientID", 17, "needs a 'regex'"),
        (
            "- match: {regex: '(?P<a>x)'}\n    set: {PatientID: '{regex.b}'}",
            "rules[0].set.PatientID",
            18,
            "no group named 'b'",
        ),
        (
            "- match: {regex: '(unclosed'}" + X,
            "rules[0].match.regex",
            17,
            "not a valid regular",
        ),
        (
            "- match: {type: jpg}" + X,
            "rules[0].match.type",
            17,
            "did you mean 'jpeg'",
        ),
        (
            "- match: {source: ct9}" + X,
            "rules[0].match.source",
            17,
            "unknown source 'ct9'",
        ),
        (
            "- match: {attributes: {Modality: {bigger: 2}}}" + X,
            "rules[0].match.attributes.Modality",
            17,
            "expected one of",
        ),
        (
            "- match: {path: /abs/*.dcm}" + X,
            "rules[0].match.path",
            17,
            "leading '/'",
        ),
        ("- match: {path: '*.dcm'}", "rules[0]", 17, "needs at least one of set"),
        ("- remove: [SOPInstanceUID]", "rules[0].remove", 17, "cannot be removed"),
        ("- set: {PixelData: x}", "rules[0].set.PixelData", 17, "pixel data"),
        ("- set: {TransferSyntaxUID: 1.2}", "rules[0].set.TransferSyntaxUID", 17, "File Meta"),
        ("- set: {PatientID: x}\n    remove: [PatientID]", "rules[0].remove", 18, "also in set"),
        ("- sett: {PatientID: x}", "rules[0].sett", 17, "did you mean 'set'"),
    ],
)
def test_rule_errors_name_the_rule_key_and_line(
    tmp_path: Path, rules: str, key: str, line: int, message: str
) -> None:
    found = problems(tmp_path, "rules:\n  " + rules + "\n")
    matching = [p for p in found if p.key == key]
    assert matching, [str(p) for p in found]
    assert matching[0].line == line
    assert message in matching[0].message


def test_every_rule_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        rules:
          - set: {PatientsName: X, StudyDate: 'yesterday'}
          - remove: [Foo]
        """,
    )
    keys = {p.key for p in found}
    assert {"rules[0].set.PatientsName", "rules[0].set.StudyDate", "rules[1].remove"} <= keys


def test_sidecar_settings_and_rules_in_defaults(tmp_path: Path) -> None:
    config = load(
        tmp_path, "defaults:\n  sidecars: {folder: _meta.yml}\noriginal_attributes: true\n"
    )
    assert all(s.sidecars is not None and s.sidecars.folder == "_meta.yml" for s in config.sources)
    assert config.original_attributes
    assert config.spool == config.queue.parent / "queue.db.spool"
    found = problems(tmp_path, "defaults:\n  rules: []\n  sidecars: {folder: a/b}\n")
    assert "top-level 'rules'" in next(p.message for p in found if p.key == "defaults.rules")
    assert "file name" in next(p.message for p in found if p.key == "defaults.sidecars")


def test_sequences_are_set_even_with_as_many_items_and_empty_ones_count_as_empty(
    tmp_path: Path,
) -> None:
    config = load(
        tmp_path,
        """
        rules:
          - set: {ReferencedStudySequence: [{ReferencedSOPInstanceUID: '1.2.3.999'}]}
          - default: {RequestAttributesSequence: [{RequestedProcedureID: RP1}]}
          - match: {attributes: {ProcedureCodeSequence: {absent: true}}}
            set: {StudyDescription: no procedure}
        """,
    )
    attrs = {
        "ReferencedStudySequence": "(a sequence of 1 item(s))",
        "RequestAttributesSequence": "",  # an empty Type 2 sequence
        "ProcedureCodeSequence": "",
    }
    out = run(config, "a.dcm", attrs)
    assert out.values["ReferencedStudySequence"] == [{"ReferencedSOPInstanceUID": "1.2.3.999"}]
    assert out.values["RequestAttributesSequence"] == [{"RequestedProcedureID": "RP1"}]
    assert out.values["StudyDescription"] == "no procedure"


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    # YAML 1.1 would read 0012345 as octal 5349 and 10:30 as 630: taken as written instead
    [("0012345", "0012345"), ("10:30", "10:30"), ("0x1F", "0x1F"), ("12345", "12345")],
)
def test_unquoted_numbers_are_taken_as_written(
    tmp_path: Path, yaml_value: str, expected: str
) -> None:
    text = f"rules:\n  - set: {{PatientID: {yaml_value}}}\n"
    assert run(load(tmp_path, text), "a.dcm").values["PatientID"] == expected


def test_literals_beside_templates_are_checked_at_load(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        rules:
          - match: {regex: '^(?P<acc>[^/]+)/'}
            set:
              ImageType: [DERIVED, secondary, '{regex.acc}']
              RequestAttributesSequence:
                - RequestedProcedureID: '{regex.acc}'
                  ScheduledProcedureStepStartDate: '2024-13-45'
        """,
    )
    messages = " | ".join(str(p) for p in found)
    assert "ImageType (CS) value 2 of 3 must be upper case" in messages
    assert "ScheduledProcedureStepStartDate (DA)" in messages


def test_the_rules_fingerprint_is_the_same_in_every_process(tmp_path: Path) -> None:
    config_path = tmp_path / "stowd.yaml"
    rules = (
        "rules:\n  - match: {type: [dicom, pdf, jpeg], source: [ct1, us2]}\n"
        "    set: {StationName: X}\n"
    )
    config_path.write_text(HEAD + rules, encoding="utf-8")
    make_watch_folders(config_path)
    script = (
        "import sys; from stowd.config.load import load_config; "
        "from stowd.pipeline.metadata import digest; "
        "c = load_config(sys.argv[1]); print(digest(c, c.sources[0]))"
    )
    found = {
        subprocess.run(
            [sys.executable, "-c", script, str(config_path)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(found) == 1
    config_path.write_text("# a comment moves every line\n" + HEAD + rules, encoding="utf-8")
    config = load_config(config_path)
    assert {digest(config, config.sources[0]) + "\n"} == found

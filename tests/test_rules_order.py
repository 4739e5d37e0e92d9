"""The rules engine does only the work a file's rules need (issue 19: CPU per file).

Same results as before: a rule's match is the AND of its conditions whatever order they are
checked in; these tests pin the order (set lookups before patterns) and that attributes no
rule touched are not read, and compare ``matches`` with the plain AND over every combination.
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime
from pathlib import PurePosixPath
from typing import cast

import pytest

from stowd.rules.engine import Facts, Match, Rule, Template, _State, evaluate, matches

NOW = datetime(2026, 12, 7, 9, 0, 0)


def facts(rel: str = "CT/a.dcm", kind: str = "dicom", source: str = "ct1") -> Facts:
    return Facts(PurePosixPath(rel), source, kind, NOW)


class Unasked:
    """A pattern that must not be tried (its rule cannot apply for another reason)."""

    pattern = "unasked"

    def match(self, _text: str) -> None:
        raise AssertionError("the path pattern was tried for a rule whose type cannot apply")

    search = match


def test_patterns_are_not_tried_when_type_or_source_rules_the_file_out() -> None:
    unasked = cast(re.Pattern[str], Unasked())
    assert not matches(Match(path=unasked, types=frozenset({"pdf"})), facts())
    assert not matches(Match(regex=unasked, sources=frozenset({"us2"})), facts())
    origin = (("calling_ae", frozenset({"MODALITY"})),)
    assert not matches(Match(path=unasked, origin=origin), facts())


def test_attributes_no_rule_touches_are_not_read() -> None:
    """Without rules or sidecars, the file's own values are not asked for (each read
    converts a pydicom element); a rule that sets PatientID reads only PatientID."""
    asked: list[str] = []

    def original(keyword: str) -> str | None:
        asked.append(keyword)
        return "1.2.3"

    evaluate((), facts(), original)
    assert asked == []
    rule = Rule("rules[0]", 1, set=(("PatientID", Template.parse("P1")),))
    out = evaluate((rule,), facts(), original)
    assert out.values == {"PatientID": "P1"}
    assert set(asked) == {"PatientID"}


def test_required_attributes_emptied_by_a_rule_still_fail() -> None:
    rule = Rule("rules[0]", 1, set=(("SeriesInstanceUID", Template.parse("")),))
    with pytest.raises(Exception, match="left SeriesInstanceUID empty"):
        evaluate((rule,), facts(), lambda _k: "1.2.3")


PATHS = (None, re.compile(r"CT/[^/]*\Z"), re.compile(r"MR/[^/]*\Z"))
REGEXES = (None, re.compile("a"), re.compile("zz"))
TYPES = (None, frozenset({"dicom"}), frozenset({"pdf"}))
SOURCES = (None, frozenset({"ct1"}), frozenset({"us2"}))
ORIGINS = ((), (("calling_ae", frozenset({"CT1"})),), (("calling_ae", frozenset({"X"})),))


@pytest.mark.parametrize(
    ("path", "regex", "types", "sources", "origin"),
    list(itertools.product(PATHS, REGEXES, TYPES, SOURCES, ORIGINS)),
)
def test_match_is_the_and_of_its_conditions(
    path: re.Pattern[str] | None,
    regex: re.Pattern[str] | None,
    types: frozenset[str] | None,
    sources: frozenset[str] | None,
    origin: tuple[tuple[str, frozenset[str]], ...],
) -> None:
    f = Facts(PurePosixPath("CT/a.dcm"), "ct1", "dicom", NOW, origin={"calling_ae": "CT1"})
    rel = f.rel.as_posix()
    expected = (
        (path is None or path.match(rel) is not None)
        and (regex is None or regex.search(rel) is not None)
        and (types is None or f.kind in types)
        and (sources is None or f.source in sources)
        and all(f.origin.get(name) in values for name, values in origin)
    )
    m = Match(path=path, regex=regex, types=types, sources=sources, origin=origin)
    assert matches(m, f, _State(lambda _k: None)) is expected

"""Metadata rules: which attributes a file gets before it is stored.  Pure: no I/O.

A ``Rule`` has a ``Match`` (all conditions must hold) and actions: ``set`` (overwrite),
``default`` (only where absent or empty), ``remove`` and ``lookup`` (find the file's study or
worklist item in the archive; ``lookup.py`` asks, after the rules).  Rules run in order, each
on the result of the ones before, so later rules win; sidecar values are applied first.  Of
several matching rules with a ``lookup``, the last one's is used; its query is rendered after
every rule ran, so it sees their values.

Values are templates: ``{regex.patient}``, ``{parts[0]}``, ``{dicom.PatientID|upper}``,
``{now:%Y%m%d}`` (see ``VARIABLES``); ``{{`` and ``}}`` are literal braces.  A template's
result is checked against the attribute's VR when applied; a value that does not fit raises
``RuleFailure`` (the file goes to failed/ with the reason), never a malformed object.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, TypeAlias

from stowd.errors import RuleFailure
from stowd.rules import vr
from stowd.rules.vr import Item, Value

REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
TYPES = ("dicom", "pdf", "cda", "stl", "obj", "mtl", "jpeg", "jp2", "png", "gif", "mpeg", "mp4")
ORIGIN = ("calling_ae", "called_ae", "source_address")  # of a file received with C-STORE
SIMPLE = (
    *("path", "folder", "name", "stem", "ext", "source", "type", "date", "time", "datetime"),
    *ORIGIN,
)
NAMESPACES = ("regex", "dicom", "sidecar")
FILTERS: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "lower": str.lower,
    "trim": str.strip,
}
VARIABLES = (
    "{path} {folder} {name} {stem} {ext} {source} {type} {parts[N]} {regex.GROUP} "
    "{dicom.Keyword} {sidecar.Keyword} {date} {time} {datetime} {now:FORMAT} "
    "{calling_ae} {called_ae} {source_address}"
)
_TIME_FORMATS = {"date": "%Y%m%d", "time": "%H%M%S", "datetime": "%Y%m%d%H%M%S"}
_PLACEHOLDER = re.compile(
    r"(?P<var>[a-z][a-z_]*)(?:\.(?P<key>[A-Za-z_][A-Za-z0-9_]*)|\[(?P<index>-?\d+)\]|:(?P<fmt>[^|]+))?"
    r"(?P<filters>(?:\|[a-z]+)*)"
)


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Placeholder:
    """One ``{...}`` of a template."""

    text: str
    var: str
    key: str | None = None
    index: int | None = None
    fmt: str | None = None
    filters: tuple[str, ...] = ()


@dataclass(frozen=True)
class Template:
    """Text with placeholders, parsed once when the config is read."""

    text: str
    pieces: tuple[str | Placeholder, ...]

    @property
    def placeholders(self) -> list[Placeholder]:
        return [p for p in self.pieces if isinstance(p, Placeholder)]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Raise ``ValueError`` (for humans) when the text is not a valid template."""
        return cls(text, tuple(_pieces(text)))

    def render(self, lookup: Callable[[Placeholder], str]) -> str:
        return "".join(p if isinstance(p, str) else _filtered(p, lookup(p)) for p in self.pieces)


def _pieces(text: str) -> list[str | Placeholder]:
    pieces: list[str | Placeholder] = []
    literal, pos = [], 0
    while pos < len(text):
        char, pair = text[pos], text[pos : pos + 2]
        if pair in ("{{", "}}"):
            literal.append(char)
            pos += 2
        elif char == "{":
            end = text.find("}", pos)
            if end < 0:
                raise ValueError(f"'{{' without a closing '}}' in {text!r} (write {{{{ for '{{')")
            pieces += ["".join(literal)] if literal else []
            pieces.append(_placeholder(text[pos : end + 1]))
            literal, pos = [], end + 1
        elif char == "}":
            raise ValueError(f"'}}' without an opening '{{' in {text!r} (write }}}} for a brace)")
        else:
            literal.append(char)
            pos += 1
    return pieces + (["".join(literal)] if literal else [])


def _placeholder(text: str) -> Placeholder:
    m = _PLACEHOLDER.fullmatch(text[1:-1].strip())
    if m is None:
        raise ValueError(f"cannot read the placeholder {text}; known: {VARIABLES}")
    filters = tuple(f for f in m["filters"].split("|") if f)
    p = Placeholder(text, m["var"], m["key"], _int(m["index"]), m["fmt"], filters)
    _check_placeholder(p)
    return p


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _check_placeholder(p: Placeholder) -> None:
    valid = (
        (p.var in SIMPLE and p.key is None and p.index is None and p.fmt is None)
        or (p.var == "parts" and p.index is not None)
        or (p.var == "now" and p.key is None and p.index is None)
        or (p.var in NAMESPACES and p.key is not None)
    )
    if not valid:
        raise ValueError(f"unknown placeholder {p.text}; known: {VARIABLES}")
    for name in p.filters:
        if name not in FILTERS:
            raise ValueError(f"unknown filter '|{name}' in {p.text}; known: {', '.join(FILTERS)}")
    if p.var in ("dicom", "sidecar") and p.key is not None:
        attr = vr.lookup(p.key)
        if attr.vr == "SQ":
            raise ValueError(f"{p.text}: {p.key} is a sequence and cannot be used as text")


def _filtered(p: Placeholder, text: str) -> str:
    for name in p.filters:
        text = FILTERS[name](text)
    return text


# --------------------------------------------------------------------------- rule model
# A value spec mirrors ``Value`` with templates in place of text.
Spec: TypeAlias = "Template | int | float | list[Template | int | float | SpecItem] | None"
SpecItem: TypeAlias = "dict[str, Spec]"


@dataclass(frozen=True)
class Condition:
    """A DICOM attribute condition: equals, one_of, regex, present or absent."""

    keyword: str
    op: str
    values: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None

    def holds(self, current: str | None) -> bool:
        if self.op == "present":
            return current is not None and current != ""
        if self.op == "absent":
            return current is None or current == ""
        if current is None:
            return False
        if self.pattern is not None:
            return self.pattern.search(current) is not None
        return current in self.values


@dataclass(frozen=True)
class Match:
    """All conditions must hold; an empty Match applies to every file."""

    path: re.Pattern[str] | None = None
    regex: re.Pattern[str] | None = None
    types: frozenset[str] | None = None
    sources: frozenset[str] | None = None
    attributes: tuple[Condition, ...] = ()
    origin: tuple[tuple[str, frozenset[str]], ...] = ()  # (ORIGIN name, values one of which)


@dataclass(frozen=True)
class Lookup:
    """A rule's ``lookup``: which archive entry the file belongs to (asked by lookup.py)."""

    within: str  # "studies" or "worklist"
    query: tuple[tuple[str, Template], ...]  # keyword -> template, in the config's order
    url: str | None = None  # the worklist's QIDO-style URL; None: {destination url}/mwlitems
    wait: float = 3600.0  # how long a file waits for its study or item to appear
    cache: float = 60.0  # how long an answer is reused for other files with the same query


@dataclass(frozen=True)
class Wanted:
    """A rendered lookup for one file: what to ask the archive."""

    lookup: Lookup
    query: tuple[tuple[str, str], ...]  # keyword -> value, never empty, no wildcards
    rule: str  # the rule's label, for reasons

    def text(self) -> str:
        """``AccessionNumber A1`` or ``PatientID P1, StudyDate 20240101``."""
        return ", ".join(f"{k} {v}" for k, v in self.query)


@dataclass(frozen=True)
class Rule:
    where: str  # the key path in the config, e.g. "rules[2]" or "sources[0].rules[1]"
    line: int | None
    name: str | None = None
    match: Match = field(default_factory=Match)
    set: tuple[tuple[str, Spec], ...] = ()
    default: tuple[tuple[str, Spec], ...] = ()
    remove: tuple[str, ...] = ()
    lookup: Lookup | None = None

    @property
    def label(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        line = f" (config line {self.line})" if self.line else ""
        return f"rule {self.where}{name}{line}"


def glob_pattern(glob: str) -> re.Pattern[str]:
    """A path glob: ``*`` and ``?`` stay within one folder, ``**/`` spans any folders."""
    out, pos = [], 0
    while pos < len(glob):
        regex, used = _glob_piece(glob, pos)
        out.append(regex)
        pos += used
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _glob_piece(glob: str, pos: int) -> tuple[str, int]:
    """The regex for the glob at ``pos`` and how many characters it used."""
    if glob.startswith("**/", pos):
        return "(?:.*/)?", 3
    if glob.startswith("**", pos):
        return ".*", 2
    char = glob[pos]
    if char in "*?":
        return ("[^/]*" if char == "*" else "[^/]"), 1
    end = glob.find("]", pos + 2)
    if char == "[" and end > 0:
        inner = glob[pos + 1 : end]
        return "[" + ("^" + inner[1:] if inner.startswith("!") else inner) + "]", end + 1 - pos
    return re.escape(char), 1


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Facts:
    """What rules may look at, for one file."""

    rel: PurePosixPath  # relative to the watch folder
    source: str
    kind: str
    now: datetime
    sidecar: Item = field(default_factory=dict)
    sidecar_names: tuple[str, ...] = ()
    origin: Mapping[str, str] = field(default_factory=dict)  # ORIGIN names -> values


@dataclass
class RuleOutcome:
    """What the rules did to one file."""

    values: dict[str, Value] = field(default_factory=dict)  # set, and different from before
    remove: list[str] = field(default_factory=list)
    matched: list[Rule] = field(default_factory=list)
    before: dict[str, str | None] = field(default_factory=dict)
    lookup: Wanted | None = None  # the archive entry to find (the last matching rule's)

    @property
    def changed(self) -> bool:
        return bool(self.values or self.remove)

    def changes(self) -> dict[str, Any]:
        """The JSON form stored in the queue and handed to ``rewrite.apply``."""
        return {"set": self.values, "remove": self.remove}


class _Removed:
    """Marks an attribute removed by a rule."""


_REMOVED = _Removed()


class _State:
    """The file's attribute values as changed by the rules so far."""

    def __init__(self, original: Callable[[str], str | None]) -> None:
        self.original = original
        self.overlay: dict[str, Value | _Removed] = {}

    def text(self, keyword: str) -> str | None:
        if keyword not in self.overlay:
            return self.original(keyword)
        value = self.overlay[keyword]
        return None if isinstance(value, _Removed) else value_text(value)

    def empty(self, keyword: str) -> bool:
        current = self.text(keyword)
        return current is None or current == ""


def value_text(value: Value) -> str:
    """A value as text, the way conditions and templates see it (``\\`` between values)."""
    if value is None:
        return ""
    if isinstance(value, list):
        if any(isinstance(v, dict) for v in value):
            return f"(a sequence of {len(value)} item(s))"
        return "\\".join(str(v) for v in value)
    return str(value)


def _is_sequence(value: Value) -> bool:
    return isinstance(value, list) and any(isinstance(v, dict) for v in value)


def evaluate(
    rules: Sequence[Rule], facts: Facts, original: Callable[[str], str | None]
) -> RuleOutcome:
    """Apply the sidecar values, then every matching rule in order; raise ``RuleFailure``.

    ``original(keyword)`` gives the file's own value as text (None when absent).
    """
    state = _State(original)
    for keyword, value in facts.sidecar.items():
        state.overlay[keyword] = value
    outcome = RuleOutcome()
    for rule in rules:
        if matches(rule.match, facts, state):
            _apply_rule(rule, facts, state)
            outcome.matched.append(rule)
    finder = next((r for r in reversed(outcome.matched) if r.lookup is not None), None)
    if finder is not None:
        outcome.lookup = _wanted(finder, _Env(facts, state, _groups(finder, facts)))
    return _finish(outcome, state)


WILDCARDS = ("*", "?", "\\")


def _wanted(rule: Rule, env: _Env) -> Wanted:
    """The rule's lookup query for this file; never empty, never a wildcard."""
    assert rule.lookup is not None
    query = []
    for keyword, template in rule.lookup.query:
        try:
            value = template.render(env.lookup).strip()
        except ValueError as exc:
            raise RuleFailure(f"{rule.label}: lookup.query.{keyword}: {exc}") from None
        if not value:
            raise RuleFailure(
                f"{rule.label}: the lookup's {keyword} ({template.text}) is empty for this "
                "file; stowd never asks the archive with an empty value (it would match "
                "every study)"
            )
        if any(c in value for c in WILDCARDS):
            raise RuleFailure(
                f"{rule.label}: the lookup's {keyword} is {value!r}, which holds a wildcard "
                "character (* ? \\); stowd asks only for exact values"
            )
        query.append((keyword, value))
    return Wanted(rule.lookup, tuple(query), rule.label)


def render_for(template: Template, facts: Facts, values: Mapping[str, Value], what: str) -> str:
    """``template`` for one file; ``{dicom.X}`` sees ``values``. Raise ``RuleFailure``."""
    state = _State(lambda _keyword: None)
    state.overlay.update(values)
    try:
        return template.render(lambda p: _resolve(p, facts, state, {}))
    except ValueError as exc:
        raise RuleFailure(f"{what}: {exc}") from None


def matches(match: Match, facts: Facts, state: _State | None = None) -> bool:
    """Cheap set lookups first, the patterns only for a rule that can still apply."""
    simple = (
        (match.types is None or facts.kind in match.types)
        and (match.sources is None or facts.source in match.sources)
        and all(facts.origin.get(name) in values for name, values in match.origin)
        and _path_matches(match, facts.rel.as_posix())
    )
    if not simple or not match.attributes:
        return simple
    return state is not None and all(c.holds(state.text(c.keyword)) for c in match.attributes)


def _path_matches(match: Match, rel: str) -> bool:
    return (match.path is None or match.path.match(rel) is not None) and (
        match.regex is None or match.regex.search(rel) is not None
    )


@dataclass(frozen=True)
class _Env:
    """What the templates of one rule see for one file."""

    facts: Facts
    state: _State
    groups: dict[str, str]

    def lookup(self, p: Placeholder) -> str:
        return _resolve(p, self.facts, self.state, self.groups)


def _apply_rule(rule: Rule, facts: Facts, state: _State) -> None:
    env = _Env(facts, state, _groups(rule, facts))
    for keyword in rule.remove:
        state.overlay[keyword] = _REMOVED
    for keyword, spec in rule.set:
        state.overlay[keyword] = _value(rule, keyword, spec, env)
    for keyword, spec in rule.default:
        if state.empty(keyword):
            state.overlay[keyword] = _value(rule, keyword, spec, env)


def _groups(rule: Rule, facts: Facts) -> dict[str, str]:
    if rule.match.regex is None:
        return {}
    m = rule.match.regex.search(facts.rel.as_posix())
    return {} if m is None else {k: v or "" for k, v in m.groupdict().items()}


def _value(rule: Rule, keyword: str, spec: Spec, env: _Env) -> Value:
    try:
        return vr.check(keyword, render(spec, env.lookup))
    except ValueError as exc:
        raise RuleFailure(f"{rule.label}: {exc}") from None


def render(spec: Spec, lookup: Callable[[Placeholder], str]) -> object:
    """The spec with every template rendered (nested sequences included)."""
    if isinstance(spec, Template):
        return spec.render(lookup)
    if isinstance(spec, list):
        return [render(s, lookup) if not isinstance(s, dict) else _item(s, lookup) for s in spec]
    return spec


def _item(item: SpecItem, lookup: Callable[[Placeholder], str]) -> dict[str, object]:
    return {keyword: render(spec, lookup) for keyword, spec in item.items()}


def _resolve(p: Placeholder, facts: Facts, state: _State, groups: dict[str, str]) -> str:
    if p.var == "regex":
        return _need(groups.get(p.key or ""), p, "the rule's regex has no such group")
    if p.var == "dicom":
        return _need(state.text(p.key or ""), p, f"the file has no {p.key}")
    if p.var == "sidecar":
        value = facts.sidecar.get(p.key or "")
        return _need(None if value is None else value_text(value), p, _no_sidecar(p, facts))
    if p.var == "parts":
        return _part(p, facts.rel)
    return _simple_value(p, facts)


def _simple_value(p: Placeholder, facts: Facts) -> str:
    if p.var in ORIGIN:
        return _need(facts.origin.get(p.var) or None, p, f"the file has no {p.var}{_NOT_RECEIVED}")
    if p.var in _TIME_FORMATS or p.var == "now":
        return facts.now.strftime(p.fmt or _TIME_FORMATS.get(p.var, "%Y%m%d%H%M%S"))
    return _path_value(p.var, facts)


_NOT_RECEIVED = " (only files received with C-STORE have one)"


def _need(value: str | None, p: Placeholder, why: str) -> str:
    if value is None:
        raise ValueError(f"{p.text} has no value: {why}")
    return value


def _no_sidecar(p: Placeholder, facts: Facts) -> str:
    if not facts.sidecar_names:
        return "the file has no sidecar"
    return f"its sidecar ({', '.join(facts.sidecar_names)}) does not give {p.key}"


def _part(p: Placeholder, rel: PurePosixPath) -> str:
    index = p.index or 0
    if not -len(rel.parts) <= index < len(rel.parts):
        raise ValueError(f"{p.text} has no value: the path {rel.as_posix()!r} is too short")
    return rel.parts[index]


def _path_value(var: str, facts: Facts) -> str:
    rel = facts.rel
    values = {
        "path": rel.as_posix(),
        "folder": "" if rel.parent.as_posix() == "." else rel.parent.as_posix(),
        "name": rel.name,
        "stem": rel.stem,
        "ext": rel.suffix.lstrip("."),
        "source": facts.source,
        "type": facts.kind,
    }
    return values[var]


def _finish(outcome: RuleOutcome, state: _State) -> RuleOutcome:
    for keyword, value in state.overlay.items():
        before = state.original(keyword)
        if isinstance(value, _Removed):
            if before is not None:
                outcome.remove.append(keyword)
                outcome.before[keyword] = before
        elif before is None or _is_sequence(value) or value_text(value) != before:
            outcome.values[keyword] = value  # a sequence cannot be compared as text: set it
            outcome.before[keyword] = before
    for keyword in REQUIRED:  # only what a rule or sidecar touched (reading is not free)
        if keyword in state.overlay and state.empty(keyword):
            raise RuleFailure(f"the rules left {keyword} empty; every instance needs one")
    return outcome


def fingerprint(rules: Sequence[Rule]) -> list[object]:
    """What the rules do, as plain data: equal for equal rules in any process (sets sorted,
    patterns in full, no line numbers)."""
    return [_rule_data(rule) for rule in rules]


def _rule_data(rule: Rule) -> dict[str, object]:
    m = rule.match
    return (
        {
            "path": None if m.path is None else m.path.pattern,
            "regex": None if m.regex is None else m.regex.pattern,
            "types": None if m.types is None else sorted(m.types),
            "sources": None if m.sources is None else sorted(m.sources),
            "attributes": [_condition_data(c) for c in m.attributes],
            "set": [[k, _spec_data(s)] for k, s in rule.set],
            "default": [[k, _spec_data(s)] for k, s in rule.default],
            "remove": list(rule.remove),
        }
        | ({} if rule.lookup is None else {"lookup": _lookup_data(rule.lookup)})
        | _origin_data(m)
    )


def _origin_data(m: Match) -> dict[str, object]:
    """Only where set, so that rules written before C-STORE keep their fingerprint."""
    return {"origin": [[name, sorted(values)] for name, values in m.origin]} if m.origin else {}


def _lookup_data(lookup: Lookup) -> dict[str, object]:
    query = [[k, t.text] for k, t in lookup.query]
    return {"in": lookup.within, "query": query, "url": lookup.url, "wait": lookup.wait}


def _condition_data(c: Condition) -> list[object]:
    return [c.keyword, c.op, list(c.values), None if c.pattern is None else c.pattern.pattern]


def _spec_data(spec: Spec | SpecItem) -> object:
    if isinstance(spec, Template):
        return ["template", spec.text]
    if isinstance(spec, dict):
        return {k: _spec_data(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_spec_data(s) for s in spec]
    return spec

"""Reading ``rules:`` lists from the config's YAML nodes into ``rules.Rule`` objects.

Every keyword is checked against the DICOM dictionary and every literal value against its VR
here, at load time; each problem names the rule (its key path, e.g. ``rules[2].set.StudyDate``)
and its YAML line.  Templates are parsed here too; their results are checked when applied.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection

from yaml.nodes import MappingNode, Node, SequenceNode

from stowd.config.yamlwalk import (
    Context,
    DicomLoader,
    Section,
    as_duration,
    as_text,
    as_url,
    describe_value,
    entries,
    is_null,
    join,
    value_of,
)
from stowd.rules import vr
from stowd.rules.engine import (
    ORIGIN,
    REQUIRED,
    TYPES,
    WILDCARDS,
    Condition,
    Lookup,
    Match,
    Rule,
    Spec,
    SpecItem,
    Template,
    glob_pattern,
    render,
    value_text,
)

RULE_KEYS = ("name", "match", "set", "default", "remove", "lookup")
LOOKUP_KEYS = ("in", "query", "url", "wait", "cache")
LOOKUP_IN = ("studies", "worklist")
# What a lookup may ask by; ``lookup.py`` knows how each is sent.
QUERY_KEYS = {
    "studies": (
        "AccessionNumber",
        "StudyInstanceUID",
        "PatientID",
        "IssuerOfPatientID",
        "StudyDate",
        "StudyID",
    ),
    "worklist": (
        "AccessionNumber",
        "StudyInstanceUID",
        "PatientID",
        "IssuerOfPatientID",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepStartDate",
        "ScheduledStationAETitle",
        "Modality",
    ),
}
# A query needs one of these: a date or an issuer alone would pick anyone's entry.
IDENTIFYING = (
    "AccessionNumber",
    "StudyInstanceUID",
    "PatientID",
    "StudyID",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
)
DEFAULT_LOOKUP_WAIT = 3600.0
DEFAULT_LOOKUP_CACHE = 60.0
MATCH_KEYS = ("path", "regex", "type", "source", "attributes", *ORIGIN)
CONDITION_KEYS = ("equals", "one_of", "regex", "present", "absent")
ACTIONS = ("set", "default", "remove", "lookup")


def read_rules(
    ctx: Context, key: str, node: Node | None, sources: Collection[str] | None
) -> tuple[Rule, ...]:
    """The valid rules of a ``rules:`` list; every problem is added to ``ctx``."""
    if node is None or is_null(node):
        return ()
    if not isinstance(node, SequenceNode):
        got = describe_node_kind(node)
        ctx.add(
            key,
            f"expected a list of rules (each starting with '- match:' or '- set:'), {got}",
            node,
        )
        return ()
    rules = [_read_rule(ctx, f"{key}[{i}]", item, sources) for i, item in enumerate(node.value)]
    return tuple(rule for rule in rules if rule is not None)


def describe_node_kind(node: Node) -> str:
    return "got a mapping" if isinstance(node, MappingNode) else "got a single value"


def _read_rule(ctx: Context, key: str, node: Node, sources: Collection[str] | None) -> Rule | None:
    before = len(ctx.problems)
    sec = Section(ctx, key, node, RULE_KEYS)
    if sec.broken:
        return None
    name = sec.get("name", "", as_text) or None
    match = _read_match(sec.section("match", MATCH_KEYS), sources)
    groups = frozenset(match.regex.groupindex) if match.regex is not None else None
    set_ = _read_values(sec, "set", groups)
    default = _read_values(sec, "default", groups)
    remove = _read_remove(sec)
    lookup = _read_lookup(sec.section("lookup", LOOKUP_KEYS), groups)
    _check_actions(sec, node)
    if len(ctx.problems) > before:
        return None
    line = None if sec.node is None else sec.node.start_mark.line + 1
    return Rule(key, line, name, match, set_, default, remove, lookup)


def _check_actions(sec: Section, node: Node) -> None:
    present = [a for a in ACTIONS if sec.value_node(a) is not None]
    if not present:
        sec.ctx.add(sec.key, "a rule needs at least one of set, default, remove or lookup", node)
    seen: dict[str, str] = {}
    for action in present:
        for keyword in _keys(sec, action) if action != "lookup" else ():
            if keyword in seen:
                message = f"{keyword} is also in {seen[keyword]} of this rule; use one action"
                sec.add(f"{action}.{keyword}" if action != "remove" else action, message)
            seen.setdefault(keyword, action)


def _keys(sec: Section, action: str) -> list[str]:
    node = sec.value_node(action)
    if isinstance(node, MappingNode):
        return [k.value for k, _ in node.value if isinstance(k.value, str)]
    if isinstance(node, SequenceNode):
        return [n.value for n in node.value if isinstance(n.value, str)]
    return []


# --------------------------------------------------------------------------- lookup


def _read_lookup(sec: Section, groups: frozenset[str] | None) -> Lookup | None:
    """A rule's ``lookup:``; None when absent or invalid (problems added)."""
    if sec.node is None or is_null(sec.node) or sec.broken:
        return None
    within = sec.need("in", _as_choice_one("in", LOOKUP_IN))
    query = _read_query(sec, within or "studies", groups)
    url = sec.get("url", None, as_url)
    if url is not None and within == "studies":
        sec.add("url", "only a worklist lookup takes a url (studies are asked at the destination)")
    wait = sec.get("wait", DEFAULT_LOOKUP_WAIT, as_duration(positive=True))
    cache = sec.get("cache", DEFAULT_LOOKUP_CACHE, as_duration(positive=False))
    if within is None or not query:
        return None
    return Lookup(within, query, url, wait, cache)


def _as_choice_one(what: str, known: Collection[str]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        name = as_text(value)
        if name not in known:
            raise ValueError(_unknown(what, name, known))
        return name

    return convert


def _read_query(
    sec: Section, within: str, groups: frozenset[str] | None
) -> tuple[tuple[str, Template], ...]:
    node, key = sec.value_node("query"), join(sec.key, "query")
    if node is None or is_null(node):
        sec.missing("query")
        return ()
    if not isinstance(node, MappingNode):
        what = f"expected a mapping of DICOM keywords to values, such as {EXAMPLE_QUERY}"
        sec.ctx.add(key, what, node)
        return ()
    found = []
    for keyword, (key_node, value_node) in entries(sec.ctx, key, node).items():
        try:
            found.append((keyword, _query_value(within, keyword, value_node, groups)))
        except ValueError as exc:
            sec.ctx.add(join(key, keyword), str(exc), value_node or key_node)
    if found and not any(k in IDENTIFYING for k, _ in found):
        names = ", ".join(k for k in IDENTIFYING if k in QUERY_KEYS[within])
        sec.ctx.add(key, f"the query needs at least one of {names}", node)
    return tuple(found)


EXAMPLE_QUERY = "{AccessionNumber: '{parts[0]}'}"


def _query_value(within: str, keyword: str, node: Node, groups: frozenset[str] | None) -> Template:
    known = QUERY_KEYS[within]
    if keyword not in known:
        raise ValueError(f"a {within} lookup cannot ask by {keyword}; it can by {', '.join(known)}")
    value = value_of(node, DicomLoader)
    if isinstance(value, list | dict) or value is None:
        raise ValueError(f"expected one value or template, got {describe_value(value)}")
    template = Template.parse(value) if isinstance(value, str) else Template.parse(str(value))
    _check_groups(template, groups)
    if not template.placeholders:
        _text(keyword, template.text)
        # what rules._wanted refuses for a file, refused here for every file at once
        if not template.text.strip():
            raise ValueError("is empty; stowd never asks the archive with an empty value")
        if any(c in template.text for c in WILDCARDS):
            raise ValueError(
                f"{template.text!r} holds a wildcard character (* ? \\); stowd asks only "
                "for exact values"
            )
    return template


# --------------------------------------------------------------------------- match


def _read_match(sec: Section, sources: Collection[str] | None) -> Match:
    attributes = _read_conditions(
        sec.ctx, join(sec.key, "attributes"), sec.value_node("attributes")
    )
    return Match(
        path=sec.get("path", None, _as_glob),
        regex=sec.get("regex", None, _as_regex),
        types=sec.get("type", None, _as_choice("type", TYPES)),
        sources=sec.get("source", None, _as_choice("source", sources)),
        attributes=attributes,
        origin=tuple(
            (name, found)
            for name in ORIGIN
            if (found := sec.get(name, None, _as_choice(name.replace("_", " "), None)))
        ),
    )


def _as_glob(value: object) -> re.Pattern[str]:
    text = as_text(value)
    if text.startswith("/"):
        raise ValueError(
            f"the path is relative to the watch folder; remove the leading '/' from {text!r}"
        )
    return glob_pattern(text)


def _as_regex(value: object) -> re.Pattern[str]:
    text = as_text(value)
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc}): {text!r}") from None


def _as_choice(what: str, known: Collection[str] | None) -> Callable[[object], frozenset[str]]:
    def convert(value: object) -> frozenset[str]:
        items = value if isinstance(value, list) else [value]
        names = [as_text(item) for item in items]
        for name in names:
            if known is not None and name not in known:
                raise ValueError(_unknown(what, name, known))
        return frozenset(names)

    return convert


def _unknown(what: str, name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {name!r} (known: {', '.join(sorted(known))}){hint}"


def _read_conditions(ctx: Context, key: str, node: Node | None) -> tuple[Condition, ...]:
    if node is None or is_null(node):
        return ()
    if not isinstance(node, MappingNode):
        ctx.add(key, "expected a mapping of DICOM keywords to conditions", node)
        return ()
    found = []
    for keyword, (key_node, value_node) in entries(ctx, key, node).items():
        try:
            found.append(_condition(keyword, value_node))
        except ValueError as exc:
            ctx.add(join(key, keyword), str(exc), value_node or key_node)
    return tuple(found)


def _condition(keyword: str, node: Node) -> Condition:
    vr.lookup(keyword)
    value = value_of(node, DicomLoader)
    if isinstance(value, dict):
        return _condition_of(keyword, value)
    if isinstance(value, list):
        return Condition(keyword, "one_of", tuple(_text(keyword, v) for v in value))
    return Condition(keyword, "equals", (_text(keyword, value),))


def _condition_of(keyword: str, spec: dict[object, object]) -> Condition:
    if len(spec) != 1 or next(iter(spec)) not in CONDITION_KEYS:
        raise ValueError(f"expected one of {', '.join(CONDITION_KEYS)}, got {describe_value(spec)}")
    op, arg = next(iter(spec.items()))
    if op in ("present", "absent"):
        if arg is not True:
            raise ValueError(f"write '{op}: true'")
        return Condition(keyword, str(op))
    if op == "regex":
        return Condition(keyword, "regex", pattern=_as_regex(arg))
    values = arg if op == "one_of" and isinstance(arg, list) else [arg]
    if op == "one_of" and not isinstance(arg, list):
        raise ValueError(f"one_of needs a list of values, got {describe_value(arg)}")
    return Condition(keyword, "one_of", tuple(_text(keyword, v) for v in values))


def _text(keyword: str, value: object) -> str:
    """A condition's value as the text the file's value is compared with."""
    return value_text(vr.check(keyword, value))


# --------------------------------------------------------------------------- actions


def _read_values(
    sec: Section, action: str, groups: frozenset[str] | None
) -> tuple[tuple[str, Spec], ...]:
    node = sec.value_node(action)
    key = join(sec.key, action)
    if node is None or is_null(node):
        return ()
    if not isinstance(node, MappingNode):
        sec.ctx.add(key, "expected a mapping of DICOM keywords to values", node)
        return ()
    found = []
    for keyword, (key_node, value_node) in entries(sec.ctx, key, node).items():
        try:
            found.append((keyword, _spec_of(keyword, value_node, groups)))
        except ValueError as exc:
            sec.ctx.add(join(key, keyword), str(exc), value_node or key_node)
    return tuple(found)


def _spec_of(keyword: str, node: Node, groups: frozenset[str] | None) -> Spec:
    vr.lookup(keyword)
    spec = _spec(keyword, value_of(node, DicomLoader))
    for template in _templates(spec):
        _check_groups(template, groups)
    _check_literals(keyword, spec)
    return spec


def _check_literals(keyword: str, spec: Spec) -> None:
    """Check every literal now: a whole value, each literal of a list, each sequence item."""
    if not _templated(spec):
        vr.check(keyword, render(spec, lambda p: ""))
    elif isinstance(spec, list):
        for index, part in enumerate(spec, 1):
            if isinstance(part, dict):
                for nested, inner in part.items():
                    _check_literals(nested, inner)
            elif not _templated(part):
                vr.check_single(keyword, render(part, lambda p: ""), index, len(spec))


def _templated(spec: Spec | SpecItem) -> bool:
    if isinstance(spec, dict):
        return any(_templated(s) for s in spec.values())
    return any(t.placeholders for t in _templates(spec))


def _spec(keyword: str, value: object) -> Spec:
    if isinstance(value, str):
        return Template.parse(value)
    if isinstance(value, dict):
        raise ValueError(f"{keyword}: a mapping is only valid as an item of a sequence")
    if isinstance(value, list):
        if vr.lookup(keyword).vr == "SQ":
            return [_sequence_item(keyword, v) for v in value]
        return [_scalar_spec(keyword, v) for v in value]
    return _literal(vr.check(keyword, value))


def _scalar_spec(keyword: str, value: object) -> Template | int | float:
    spec = _spec(keyword, value)
    if isinstance(spec, Template | int | float):
        return spec
    raise ValueError(f"{keyword}: expected single values in the list, got {describe_value(value)}")


def _sequence_item(keyword: str, value: object) -> SpecItem:
    if not isinstance(value, dict):
        raise ValueError(f"{keyword} is a sequence: each item must be a mapping of keywords")
    item: SpecItem = {}
    for name, inner in value.items():
        nested = as_text(name)
        vr.lookup(nested)
        item[nested] = _spec(nested, inner)
    return item


def _literal(value: vr.Value) -> Spec:
    """A checked value as a spec (text becomes a template without placeholders)."""
    if isinstance(value, list):
        return [_fixed(v) for v in value if not isinstance(v, dict)]
    return value if value is None else _fixed(value)


def _fixed(value: vr.Scalar) -> Template | int | float:
    return Template(value, (value,)) if isinstance(value, str) else value


def _templates(spec: Spec) -> list[Template]:
    if isinstance(spec, Template):
        return [spec]
    if isinstance(spec, list):
        return [
            t for s in spec for t in (_item_templates(s) if isinstance(s, dict) else _templates(s))
        ]
    return []


def _item_templates(item: SpecItem) -> list[Template]:
    return [t for spec in item.values() for t in _templates(spec)]


def _check_groups(template: Template, groups: frozenset[str] | None) -> None:
    for p in template.placeholders:
        if p.var != "regex":
            continue
        if groups is None:
            raise ValueError(f"{p.text} needs a 'regex' in this rule's match")
        if p.key not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise ValueError(
                f"{p.text}: the rule's regex has no group named {p.key!r} (named groups: {known})"
            )


def _read_remove(sec: Section) -> tuple[str, ...]:
    node = sec.value_node("remove")
    if node is None or is_null(node):
        return ()
    try:
        value = value_of(node)
    except ValueError as exc:
        sec.add("remove", str(exc))
        return ()
    names = value if isinstance(value, list) else [value]
    keywords = []
    for name in names:
        try:
            keywords.append(_removable(name))
        except ValueError as exc:
            sec.add("remove", str(exc))
    return tuple(keywords)


def _removable(name: object) -> str:
    keyword = as_text(name)
    vr.lookup(keyword)
    if keyword in REQUIRED:
        raise ValueError(f"{keyword} cannot be removed: every instance needs one")
    return keyword

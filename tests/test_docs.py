"""The documentation stays true to the code: the configuration reference (docs/configuration.md)
lists every key the configuration is read with, no other, and the defaults the model gives; every
relative link in README.md and docs/ leads to a file and a heading there; the README links every
docs page; the Debian packages the development page names are .ci/run's; and the metrics table
names every metric stowd exports."""

from __future__ import annotations

import argparse
import importlib
import re
import textwrap
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import yaml
from needs import require
from test_config import MINIMAL, load_text

from stowd.commands import cli
from stowd.config.access import _AUTH_KEYS, _TLS_KEYS, ACCESS_KEYS
from stowd.config.httpconfig import AUTH_KEYS, HTTP_KEYS, METRICS_KEYS
from stowd.config.load import (
    _BATCH_KEYS,
    _BULK_KEYS,
    _DESTINATION_KEYS,
    _RETRY_KEYS,
    _SIDECAR_KEYS,
    _SOURCE_KEYS,
    _TIMEOUT_KEYS,
    _TOP_KEYS,
    load_config,
)
from stowd.config.receiveconfig import ALLOW_KEYS, RECEIVE_KEYS
from stowd.config.ruleconfig import LOOKUP_KEYS, MATCH_KEYS, RULE_KEYS
from stowd.dropped import ADVICE
from stowd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "configuration.md"
PAGES = sorted([ROOT / "README.md", *DOCS.glob("*.md")])

# --------------------------------------------------------------------------- the reference

SOURCE = "sources[]"
DESTINATION = "destinations.<name>"


# sections read with their own key lists (load.py, access.py, receiveconfig.py, ruleconfig.py,
# httpconfig.py)
SECTIONS: dict[str, tuple[str, ...]] = {
    "retry": _RETRY_KEYS,
    "metrics": METRICS_KEYS,
    "http": HTTP_KEYS,
    "http.auth": AUTH_KEYS,
    "rules[]": RULE_KEYS,
    "rules[].match": MATCH_KEYS,
    "rules[].lookup": LOOKUP_KEYS,
    SOURCE: _SOURCE_KEYS,
    f"{SOURCE}.sidecars": _SIDECAR_KEYS,
    f"{SOURCE}.bulkdata": _BULK_KEYS,
    f"{SOURCE}.receive": RECEIVE_KEYS,
    f"{SOURCE}.receive.allow[]": ALLOW_KEYS,
    DESTINATION: _DESTINATION_KEYS,
    f"{DESTINATION}.batch": _BATCH_KEYS,
    f"{DESTINATION}.timeouts": _TIMEOUT_KEYS,
    f"{DESTINATION}.auth": tuple(dict.fromkeys(k for keys in _AUTH_KEYS.values() for k in keys)),
    f"{DESTINATION}.tls": _TLS_KEYS,
}
# a section's own row stands for its keys as a whole ("defaults.*": the sources' options)
CONTAINERS = {"sources", "destinations", "defaults"}


def model_keys() -> set[str]:
    """Every key path the configuration is read with: the top keys, then each section's keys
    (a section read with keys of its own needs no row of its own, but may have one)."""
    found = {key for key in _TOP_KEYS if key not in CONTAINERS} | {"defaults.*"}
    for section, keys in SECTIONS.items():
        found |= {f"{section}.{key}" for key in keys}
    found.add(f"{SOURCE}.rules[].lookup")  # a source's rules: the same keys as rules[]
    assert set(ACCESS_KEYS) <= set(_DESTINATION_KEYS)  # auth and tls: sections of their own
    return found - set(SECTIONS)


def reference_rows() -> list[tuple[list[str], str]]:
    """The rows of the reference table: (its keys, its default cell).  A cell such as
    ``a.b.c`` / ``.d`` names ``a.b.c`` and ``a.b.d``."""
    section = REFERENCE.read_text().split("\n## Every key\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or cells[0] in ("key", "---"):
            continue
        keys: list[str] = []
        for piece in re.findall(r"`([^`]+)`", cells[0]):
            keys.append(keys[0].rsplit(".", 1)[0] + piece if piece.startswith(".") else piece)
        rows.append((keys, cells[1]))
    return rows


def test_the_reference_lists_every_key_of_the_model_and_no_other() -> None:
    listed = {key for keys, _ in reference_rows() for key in keys}
    model = model_keys()
    assert listed - model - set(SECTIONS) == set(), "keys in the reference that stowd does not read"
    assert model - listed == set(), "keys stowd reads that the reference does not list"


# Where each kind of key is set for the defaults test: a base config in which the section the
# key belongs to exists (a rule with a lookup, a source with sidecars or receiving C-STORE).
RECEIVE_BASE = {"ae_title": "STOWD", "port": 11112, "bind": "127.0.0.1"}


def base_config(key: str) -> dict[str, object]:
    """The minimal config, with the section ``key`` lies in made: a rule with a lookup, a
    source with sidecars, or a source receiving C-STORE instead of watching a folder."""
    doc: dict[str, object] = yaml.safe_load(MINIMAL)
    source: dict[str, object] = doc["sources"][0]  # type: ignore[index]
    if key.startswith("rules[]."):
        doc["rules"] = [{"lookup": {"in": "studies", "query": {"AccessionNumber": "A1"}}}]
    elif key.startswith(f"{SOURCE}.sidecars."):
        source["sidecars"] = {}
    elif key.startswith("http."):
        doc["http"] = {"listen": "127.0.0.1:9480"}  # the section is read once it listens
    elif key.startswith(f"{SOURCE}.receive."):
        del source["watch"]
        source["receive"] = dict(RECEIVE_BASE)
    elif key == "lease":  # a PostgreSQL queue's
        doc.update(queue="postgresql://stowd@127.0.0.1/stowd", state="./state")
    return doc


def set_key(doc: dict[str, object], key: str, value: object) -> None:
    """Set ``key`` (a reference key path such as ``sources[].receive.max_pdu``) in ``doc``,
    making the mappings on its way."""
    node: dict[str, object] = doc
    parts = key.replace(DESTINATION, "destinations.pacs").split(".")
    for part in parts[:-1]:
        child = node.setdefault(part.removesuffix("[]"), {})
        node = child[0] if part.endswith("[]") else child  # type: ignore[index,assignment]
    node[parts[-1]] = value


def documented_defaults() -> list[tuple[str, str]]:
    """(key, default) of each one-key row whose default is one literal value in backquotes
    (``all: `[pdf, ...]` `` counts as its list)."""
    found = []
    for keys, cell in reference_rows():
        literal = re.fullmatch(r"(?:all: )?`([^`]+)`", cell)
        if len(keys) == 1 and literal:
            found.append((keys[0], literal[1]))
    return found


def load_dict(tmp_path: Path, doc: dict[str, object]) -> object:
    """The config of ``doc``, written on one line so that no key moves a rule's line."""
    return load_text(tmp_path, yaml.safe_dump(doc, default_flow_style=True, width=10**9))


@pytest.mark.parametrize(("key", "default"), documented_defaults(), ids=str)
def test_each_default_shown_is_the_models(tmp_path: Path, key: str, default: str) -> None:
    """Setting a key to the default the reference shows changes nothing: the config equals
    one that leaves the key out (whose values are the model's named default constants)."""
    base = base_config(key)
    changed = base_config(key)
    set_key(changed, key, yaml.safe_load(default))

    assert load_dict(tmp_path, changed) == load_dict(tmp_path, base), (
        f"docs/configuration.md: {key} shows the default {default}, which is not the model's"
    )


def test_the_defaults_test_covers_the_keys_with_a_default() -> None:
    """Not an empty parametrization: the rows with a literal default are many, and the
    durations, sizes and numbers of retry, sources and destinations are among them."""
    keys = {key for key, _ in documented_defaults()}
    assert len(keys) >= 40
    assert {"retry.hold_probe", "retry.initial", f"{SOURCE}.quiet_period"} <= keys
    assert {f"{DESTINATION}.timeouts.read", f"{DESTINATION}.batch.max_bytes"} <= keys
    assert {f"{SOURCE}.receive.max_pdu", "rules[].lookup.wait"} <= keys


# What a default cell may say when it shows no value for the defaults test to load: the key
# must be given, or has no default.  Any other cell of a one-key row must be a literal the
# defaults test loads: "`7d` (a week)" would otherwise slip past it unchecked.
NO_VALUE = re.compile(
    r"required(?: \(or `receive`\))?|none(?: \(no login\))?|off|every file|"
    r"any calling AE|the destination's: `\{destination url\}/mwlitems`|this host's name|"
)


def test_each_default_cell_is_checked_or_shows_no_value() -> None:
    checked = {key for key, _ in documented_defaults()}
    unchecked = [
        (keys[0], cell)
        for keys, cell in reference_rows()
        if len(keys) == 1 and keys[0] not in checked and not NO_VALUE.fullmatch(cell)
    ]
    assert unchecked == [], "a default the defaults test does not load"


def without_key(doc: dict[str, object], key: str) -> bool:
    """Remove ``key`` (a reference key path) from ``doc``; False when it is not there."""
    node: object = doc
    parts = key.replace(DESTINATION, "destinations.pacs").split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict) or part.removesuffix("[]") not in node:
            return False
        node = node[part.removesuffix("[]")]
        node = node[0] if part.endswith("[]") and isinstance(node, list) else node
    return isinstance(node, dict) and node.pop(parts[-1], None) is not None


def test_the_keys_shown_required_are_the_ones_the_loader_requires(tmp_path: Path) -> None:
    """A key whose row says ``required`` is one that the minimal config (with a receiving
    source, or a rule's lookup) cannot leave out; every other key it holds can be."""
    shown = {keys[0] for keys, cell in reference_rows() if cell.startswith("required")}
    required = set()
    for key in model_keys():
        doc = base_config(key)
        if without_key(doc, key):
            with pytest.raises(ConfigError) if key in shown else nullcontext() as info:
                load_dict(tmp_path, doc)
            if info is not None:
                required.add(key)
                assert "required key is missing" in str(info.value), key
    assert required == shown
    assert {"queue", f"{SOURCE}.watch", f"{DESTINATION}.url", "rules[].lookup.in"} <= shown


# --------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but ``-`` and ``_``),
    each space a hyphen."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks), repeats numbered."""
    found: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.*)", line)):
            name, count = slug(heading[1]), 1
            while name in found:
                name, count = f"{slug(heading[1])}-{count}", count + 1
            found.add(name)
    return found


# A code span may go on over a line break (not over a blank line or into a table's next row):
# taken line by line, a span closing on the next line would pair with the wrong backquote
# and hide the links between them.
CODE_SPAN = re.compile(r"`(?:[^`\n]|\n(?![ \t]*(?:\n|\|)))*`")
# an inline link or image, [text](target) or [text](<target> "title"), and a reference
# definition, [name]: target
LINK = re.compile(r"\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)|^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", re.M)


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks and code spans."""
    text = re.sub(r"^ {0,3}```.*?^ {0,3}```", "", path.read_text(), flags=re.S | re.M)
    text = CODE_SPAN.sub("", text)
    return [inline or defined for inline, defined in LINK.findall(text)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.name}")
    return broken


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(path: Path) -> None:
    assert broken_links(path) == []


def test_the_link_check_sees_a_broken_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n## Reading `failed/`\n\n```\n# not a heading\n```\n"
        "[ok](#reading-failed) [bad](#a-full-disk) [gone](other.md) `[code](#x)`\n"
        "a span that goes on `stowd check-config\n--user` (see [wrapped](#no-such)) and `x`\n"
        '[titled](#titled "a title") and a [reference][r]\n\n[r]: #no-reference\n'
    )
    assert anchors(page) == {"a-page", "reading-failed"}
    assert broken_links(page) == [
        "#a-full-disk: no such heading in page.md",
        "other.md: no such file",
        "#no-such: no such heading in page.md",
        "#titled: no such heading in page.md",
        "#no-reference: no such heading in page.md",
    ]


def test_the_readme_links_every_docs_page() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    pages = set(DOCS.glob("*.md"))
    assert sorted(p.name for p in pages - linked) == []


# --------------------------------------------------------------------------- examples

CONFIG_KEYS = {"queue", "sources", "destinations", "rules"}


def yaml_examples() -> list[tuple[str, str]]:
    """(page:line, text) of each ```yaml block of the pages that holds config keys at its top
    (a sidecar's or a rule's lines alone are not a config)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.finditer(r"^( *)```yaml\n(.*?)^\1```", text, re.S | re.M):
            example = textwrap.dedent(block[2])
            doc = yaml.safe_load(example)
            if isinstance(doc, dict) and CONFIG_KEYS & set(doc):
                line = text.count("\n", 0, block.start()) + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", example))
    return found


def completed(doc: dict[str, Any], folder: Path) -> dict[str, Any]:
    """An example made a whole config: a queue, a destination and a source where it has none,
    the sources its rules name, its folders moved below ``folder`` (watch folders made), and
    its TLS files made (empty: the loader only asks that they exist)."""
    doc.setdefault("queue", "state/queue.db")
    doc.setdefault("destinations", {"pacs": {"url": "http://127.0.0.1:8042/dicom-web"}})
    sources = doc.setdefault("sources", [])
    for rule in doc.get("rules") or []:
        wanted = (rule.get("match") or {}).get("source", [])
        for name in [wanted] if isinstance(wanted, str) else wanted:
            if name not in {s["name"] for s in sources}:
                sources.append({"name": name, "watch": f"drop/{name}"})
    if not sources:
        sources.append({"name": "ct1", "watch": "drop/ct1"})
    first = next(iter(doc["destinations"]))
    for source in sources:
        source.setdefault("destination", first)
        for key in ("sent", "failed") if "receive" in source else ("watch", "sent", "failed"):
            source.setdefault(key, f"{key}/{source['name']}")
            source[key] = str(folder / str(source[key]).lstrip("/"))
        Path(source.get("watch", folder)).mkdir(parents=True, exist_ok=True)
    if "://" in str(doc["queue"]):  # a PostgreSQL queue: its state, and its TLS files made
        doc["queue"] = made_url(str(doc["queue"]), folder)
        doc["state"] = str(folder / str(doc.get("state", "state")).lstrip("/"))
    else:
        doc["queue"] = str(folder / str(doc["queue"]).lstrip("/"))
    for destination in doc["destinations"].values():
        for key, value in (destination.get("tls") or {}).items():
            if key != "min_version":
                made = folder / str(value).lstrip("/")
                made.parent.mkdir(parents=True, exist_ok=True)
                made.touch()
                destination["tls"][key] = str(made)
    return doc


def require_postgresql() -> None:
    try:
        importlib.import_module("psycopg.conninfo")
    except ImportError:
        require("stowd[postgresql] (psycopg) is not installed")


def made_url(url: str, folder: Path) -> str:
    """A PostgreSQL queue's URL with the certificate files it names made below ``folder``
    (empty: the loader only asks that they exist)."""
    head, sep, query = url.partition("?")
    pieces = []
    for piece in query.split("&") if query else []:
        key, _, value = piece.partition("=")
        if key in ("sslrootcert", "sslcert", "sslkey") and value != "system":
            made = folder / value.lstrip("/")
            made.parent.mkdir(parents=True, exist_ok=True)
            made.touch()
            value = str(made)
        pieces.append(f"{key}={value}")
    return head + sep + "&".join(pieces)


@pytest.mark.parametrize(("where", "example"), yaml_examples(), ids=[w for w, _ in yaml_examples()])
def test_each_yaml_example_is_a_valid_config(tmp_path: Path, where: str, example: str) -> None:
    """What an administrator copies from a page loads: each example is valid, completed only
    with what it leaves out (a queue, a destination, the sources its rules name)."""
    if "://" in str(yaml.safe_load(example).get("queue", "")):
        require_postgresql()  # libpq reads a PostgreSQL queue's URL at load
    doc = completed(yaml.safe_load(example), tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    load_config(tmp_path / "config.yaml")


def test_the_examples_test_sees_the_examples() -> None:
    pages = {where.split(":")[0] for where, _ in yaml_examples()}
    assert len(yaml_examples()) >= 12
    assert {"docs/configuration.md", "docs/rules.md", "docs/connecting.md"} <= pages


# --------------------------------------------------------------------------- facts


def test_the_pages_that_other_files_name_exist() -> None:
    """config.example.yaml, the systemd units and stowd's own messages send readers to
    docs/ pages by name: each must be there (they named README sections before the split)."""
    named = set()
    for path in [
        ROOT / "config.example.yaml",
        *(p for p in (ROOT / "systemd").rglob("*") if p.is_file()),
    ]:
        named |= set(re.findall(r"\bdocs/[\w-]+\.md\b", path.read_text()))
    for path in (ROOT / "stowd").rglob("*.py"):
        named |= set(re.findall(r"\bdocs/[\w-]+\.md\b", path.read_text()))
    assert len(named) >= 5
    assert sorted(n for n in named if not (ROOT / n).is_file()) == []


def test_the_page_a_link_refusal_sends_readers_to_holds_the_risk() -> None:
    """A dropped symbolic link fails with dropped.ADVICE, which sends the reader to
    follow_links in docs/configuration.md for the risk: that row must be there and say it,
    and the README's promise must lead to it."""
    assert "follow_links in docs/configuration.md" in ADVICE  # else: change this test too
    row = [
        line
        for line in (DOCS / "configuration.md").read_text().splitlines()
        if line.startswith("| `sources[].follow_links`")
    ]
    assert len(row) == 1 and "**Risk**" in row[0], row
    readme = (ROOT / "README.md").read_text()
    assert "follow_links" in readme
    assert "docs/configuration.md#every-key" in readme


def test_the_development_page_names_the_packages_ci_installs() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    ci = set(re.search(r"^apt_packages=\((.*)\)$", run, re.M)[1].split())  # type: ignore[index]
    page = (DOCS / "development.md").read_text()
    named = re.search(r"the Debian packages\n(.*?)\n\(the list", page, re.S)
    assert named, "docs/development.md no longer names the packages in one line"
    assert set(re.findall(r"`([^`]+)`", named[1])) == ci


def exported_metrics() -> dict[str, set[str]]:
    """Each metric stowd exports, with its labels, as registered in the code: the counters'
    ``Counter("name", "help", [labels])`` and the scrape's ``GaugeMetricFamily("name", ...,
    labels=[...])`` (``stowd_up`` has none)."""
    counters = (ROOT / "stowd" / "pipeline" / "counters.py").read_text()
    metrics = (ROOT / "stowd" / "service" / "metrics.py").read_text()
    found = {"stowd_up": set[str]()}
    within = r"(?:(?!Counter\(|Gauge\(|Histogram\(|GaugeMetricFamily\().)*?"  # one call
    wrapped = rf"(?:Counter|Gauge|Histogram)\(\s*\"(stowd_\w+)\",{within}\[([^\]]*)\]"
    family = rf"GaugeMetricFamily\(\s*\"(stowd_\w+)\",{within}labels=\[([^\]]*)\]"
    for code, pattern in ((counters, wrapped), (metrics, family)):
        for name, labels in re.findall(pattern, code, re.S):
            found[name] = set(re.findall(r'"(\w+)"', labels))
    return found


def metrics_table() -> dict[str, set[str]]:
    """Each metric the table of docs/service.md names, with the labels its row gives (a
    label's values in parentheses are not labels)."""
    service = (DOCS / "service.md").read_text()
    table = service.split("**Metrics**", 1)[1].split("\n\n**", 1)[0]
    found: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[0].startswith("`stowd_"):
            labels = set(re.findall(r"\w+", re.sub(r"\([^)]*\)", "", cells[1])))
            found |= {name: labels for name in re.findall(r"`(stowd_\w+)`", cells[0])}
    return found


def test_the_metrics_table_names_every_metric_stowd_exports() -> None:
    """The table names every metric with its labels, and none that stowd does not export."""
    exported = exported_metrics()
    assert len(exported) >= 15, "the metrics were not found in the code"
    assert metrics_table() == exported


@pytest.mark.parametrize("page", ["README.md", "docs/service.md"])
def test_the_readme_command_table_names_every_command_and_option(page: str) -> None:
    """Each ``stowd`` command has its row in the command table (the README's, and the one in
    full of docs/service.md), with every option and argument its parser takes (either
    spelling: ``-c`` or ``--config``); an option of ``stowd`` itself (not ``-h``) is named
    on the page too."""
    readme = (ROOT / page).read_text()
    rows = {row.split()[2]: row for row in readme.splitlines() if row.startswith("| `stowd ")}
    parser = cli._parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert set(action.choices) == set(rows), "a command without a row, or a row too many"
            for name, sub in action.choices.items():
                assert _unnamed(sub, rows[name]) == [], f"stowd {name}"
                # every command reads the config first: cli.main exits 2 on a ConfigError
                exits = re.split(r"(?<!\\)\|", rows[name])[-2]
                assert re.search(r"\b2 (?:config|usage|invalid)", exits), f"stowd {name}: {exits}"
    assert _unnamed(parser, readme, positional=False) == []


def _unnamed(parser: argparse.ArgumentParser, text: str, positional: bool = True) -> list[str]:
    """The options (and arguments, by metavar) of ``parser`` that ``text`` does not name."""
    missing: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            named = any(re.search(rf"(?<![\w-]){o}(?![\w-])", text) for o in action.option_strings)
        else:
            named = not positional or f"{action.metavar or action.dest.upper()}..." in text
        if not named:
            missing.append(action.option_strings[-1] if action.option_strings else action.dest)
    return missing

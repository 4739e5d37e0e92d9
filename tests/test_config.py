"""Tests of the configuration loader, with real files in a temporary folder."""

import itertools
import os
import shutil
import textwrap
from pathlib import Path

import pytest
from harness import make_watch_folders

from stowd.commands.cli import main
from stowd.config.load import load_config
from stowd.config.model import (
    BULK_TYPES,
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_FILES,
    DEFAULT_HISTORY_DAYS,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_IGNORE,
    DEFAULT_MAX_ASSOCIATIONS,
    DEFAULT_MAX_PDU,
    DEFAULT_QUIET_PERIOD,
    DEFAULT_RESCAN_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_WORKERS,
    Allowed,
    BatchLimits,
    Bulkdata,
    Config,
    Cpu,
    Receive,
    Retry,
    Timeouts,
)
from stowd.config.yamlwalk import parse_duration, parse_size
from stowd.errors import ConfigError, ConfigProblem
from stowd.pipeline.queue import SqliteQueue

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
queue: ./state/queue.db
sources:
  - name: ct1
    watch: ./drop/ct1
    sent: ./done/ct1/sent
    failed: ./done/ct1/failed
    destination: pacs
destinations:
  pacs:
    url: http://127.0.0.1:8042/dicom-web
"""


def write(tmp_path: Path, text: str, name: str = "stowd.yaml") -> Path:
    """The config file, and the relative watch folders it names (stowd does not make them,
    as the scanner's folder exists before stowd watches it)."""
    path = write_only(tmp_path, text, name)
    make_watch_folders(path)
    return path


def write_only(tmp_path: Path, text: str, name: str = "stowd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def problems_of(tmp_path: Path, text: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value.problems


def find(problems: list[ConfigProblem], key: str) -> ConfigProblem:
    matching = [p for p in problems if p.key == key]
    assert matching, f"no problem for {key!r} in {[str(p) for p in problems]}"
    return matching[0]


def source_text(name: str, watch: str, sent: str, failed: str) -> str:
    return (
        f"  - name: {name}\n    watch: {watch}\n    sent: {sent}\n"
        f"    failed: {failed}\n    destination: pacs\n"
    )


def with_sources(*sources: str) -> str:
    return (
        "queue: ./state/queue.db\nsources:\n"
        + "".join(sources)
        + "destinations:\n  pacs:\n    url: http://pacs/dicom-web\n"
    )


# --------------------------------------------------------------------------- loading


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL)

    assert config.path == tmp_path / "stowd.yaml"
    assert config.log_level == "INFO"
    assert config.shutdown_timeout == DEFAULT_SHUTDOWN_TIMEOUT
    assert config.history_days == DEFAULT_HISTORY_DAYS
    assert config.retry == Retry()
    (source,) = config.sources
    assert source.name == "ct1"
    assert source.destination == "pacs"
    assert source.quiet_period == DEFAULT_QUIET_PERIOD
    assert source.rescan_interval == DEFAULT_RESCAN_INTERVAL
    assert source.ignore == DEFAULT_IGNORE
    assert (source.polling, source.remove_empty_dirs) == (False, False)
    dest = config.destinations["pacs"]
    assert dest.name == "pacs"
    assert dest.stow_url == "http://127.0.0.1:8042/dicom-web/studies"
    assert dest.workers == DEFAULT_WORKERS
    assert dest.verify_tls is True
    assert dest.batch == BatchLimits(DEFAULT_BATCH_FILES, DEFAULT_BATCH_BYTES)
    assert dest.timeouts == Timeouts()
    assert config.destination_of(source) is dest


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = MINIMAL.replace("./done/ct1/failed", "~/failed").replace(
        "./state/queue.db", "../var/./q.db"
    )
    path = write(conf_dir, text)

    config = load_config(os.path.relpath(path, elsewhere))

    assert config.path == path
    assert config.queue == tmp_path / "var" / "q.db"
    source = config.sources[0]
    assert source.watch == conf_dir / "drop" / "ct1"
    assert source.sent == conf_dir / "done" / "ct1" / "sent"
    assert source.failed == tmp_path / "home" / "failed"
    assert all(p.is_absolute() for p in (config.queue, source.watch, source.sent))


def test_symlinks_in_paths_are_not_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "drop").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    text = MINIMAL.replace("./drop/ct1", str(tmp_path / "link" / "drop"))

    config = load_text(tmp_path, text)

    assert config.sources[0].watch == tmp_path / "link" / "drop"


def test_all_settings_are_read(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """\
        queue: /var/lib/stowd/queue.db
        log_level: debug
        shutdown_timeout: 1m
        history_days: 7.5
        retry: {initial: 500ms, maximum: 2h, multiplier: 1.5, max_age: 2d, hold_probe: 90}
        defaults:
          quiet_period: 20s
          polling: true
        sources:
          - name: ct1
            watch: ./data/drop/ct1
            sent: ./data/done/ct1
            failed: ./data/failed/ct1
            destination: pacs
          - name: mr.2
            watch: ./data/drop/mr
            sent: ./data/done/mr
            failed: ./data/failed/mr
            destination: pacs
            quiet_period: 0
            polling: false
            ignore: []
            rescan_interval: 0.5h
            remove_empty_dirs: true
        destinations:
          pacs:
            url: https://pacs.example.org/dicom-web/
            workers: 4
            verify_tls: false
            batch: {max_files: 10, max_bytes: 10MB}
            timeouts: {connect: 2.5, read: 10m, write: 1m, pool: 5s}
        """,
    )

    assert config.queue == Path("/var/lib/stowd/queue.db")
    assert config.log_level == "DEBUG"
    assert config.shutdown_timeout == 60.0
    assert config.history_days == 7.5
    assert config.retry == Retry(0.5, 7200.0, 1.5, 172800.0, 90.0)
    ct1, mr = config.sources
    assert (ct1.quiet_period, ct1.polling) == (20.0, True)  # from defaults
    assert (mr.quiet_period, mr.polling) == (0.0, False)  # overridden
    assert mr.ignore == ()
    assert mr.rescan_interval == 1800.0
    assert mr.remove_empty_dirs is True
    dest = config.destinations["pacs"]
    assert dest.stow_url == "https://pacs.example.org/dicom-web/studies"
    assert (dest.workers, dest.verify_tls) == (4, False)
    assert dest.batch == BatchLimits(10, 10_000_000)
    assert dest.timeouts == Timeouts(2.5, 600.0, 60.0, 5.0)
    assert config.source("mr.2") is mr


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A copy of config.example.yaml with its watch folder (./drop/ct1 beside it): stowd
    loads a config only when its watch folders exist, and a copy keeps the test from
    writing into the repository (two runs in one checkout would share that folder)."""
    copy = tmp_path / "config.example.yaml"
    shutil.copyfile(REPO / "config.example.yaml", copy)
    (tmp_path / "drop" / "ct1").mkdir(parents=True)
    return copy


def test_example_config_loads(example: Path) -> None:
    config = load_config(example)
    base = example.parent

    assert config.path == example
    assert config.queue == base / "state" / "queue.db"
    (source,) = config.sources
    assert source.name == "ct1"
    assert source.watch == base / "drop" / "ct1"
    assert source.sent == base / "done" / "ct1" / "sent"
    assert source.failed == base / "done" / "ct1" / "failed"
    assert config.destinations["pacs"].url == "http://127.0.0.1:8042/dicom-web"


def test_example_config_states_every_default(example: Path) -> None:
    """The example shows each default, so it must equal a config that sets nothing."""
    config = load_config(example)
    (source,) = config.sources
    dest = config.destinations["pacs"]

    assert config.retry == Retry()
    assert (config.shutdown_timeout, config.history_days) == (
        DEFAULT_SHUTDOWN_TIMEOUT,
        DEFAULT_HISTORY_DAYS,
    )
    assert source.ignore == DEFAULT_IGNORE
    assert (source.quiet_period, source.rescan_interval) == (
        DEFAULT_QUIET_PERIOD,
        DEFAULT_RESCAN_INTERVAL,
    )
    assert dest.batch == BatchLimits() and dest.timeouts == Timeouts()
    assert (dest.workers, dest.verify_tls) == (DEFAULT_WORKERS, True)
    assert (source.sidecars, source.rules, config.original_attributes) == (None, (), False)
    assert (source.bulkdata, dest.bulkdata, config.uid_root) == (Bulkdata(), "encapsulate", None)
    assert config.rules == ()  # the example changes no file: its rules are comments


def test_example_config_commented_rule_is_valid_as_written(tmp_path: Path) -> None:
    """The commented 'patient folders' rule (from '  # - name: patient folders', the lines
    '  #   ' after it) is a valid rule as written, for source ct1."""
    lines = (REPO / "config.example.yaml").read_text().splitlines()
    start = lines.index("  # - name: patient folders")
    example = [lines[start].replace("# ", "", 1)]
    for line in itertools.takewhile(lambda x: x.startswith("  #   "), lines[start + 1 :]):
        example.append(line.replace("# ", "", 1))
    config = load_text(tmp_path, MINIMAL + "rules:\n" + "\n".join(example) + "\n")

    (rule,) = config.rules
    assert rule.name == "patient folders"


def test_example_config_receive_example_loads_and_states_every_default(tmp_path: Path) -> None:
    """The commented receiving source (from '  #- name: modality', the lines '  #  ' after
    it) is a valid source as written, and shows each default of the receive section."""
    lines = (REPO / "config.example.yaml").read_text().splitlines()
    start = lines.index("  #- name: modality")
    example = [lines[start].replace("#", "", 1)]
    for line in itertools.takewhile(lambda x: x.startswith("  #  "), lines[start + 1 :]):
        example.append(line.replace("#", "", 1))
    config = load_text(
        tmp_path,
        f"""
queue: {tmp_path}/state/queue.db
sources:
{chr(10).join(example)}
destinations:
  pacs: {{url: http://127.0.0.1:8042/dicom-web}}
""",
    )
    (source,) = config.sources
    assert source.watch == tmp_path / "state" / "received" / "modality"
    assert source.receive == Receive(
        "STOWD",
        11112,
        "127.0.0.1",
        (Allowed("CT1"), Allowed("MR2", "10.1.2.3")),
        DEFAULT_MAX_ASSOCIATIONS,
        DEFAULT_MAX_PDU,
        DEFAULT_IDLE_TIMEOUT,
    )


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (30, 30.0),
        (0.25, 0.25),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("7d", 604800.0),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
        ("45", 45.0),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "5 minutes", "", "1h30m", "s", True, float("nan")])
def test_parse_duration_rejects_nonsense(text: str | int | float) -> None:
    with pytest.raises(ValueError, match="expected a duration such as 30s or 5m"):
        parse_duration(text)


@pytest.mark.parametrize("text", [-1, "-5s"])
def test_parse_duration_rejects_negatives(text: str | int) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("100B", 100),
        ("512KiB", 512 * 1024),
        ("64MiB", 64 * 1024**2),
        ("1GiB", 1024**3),
        ("10KB", 10_000),
        ("10MB", 10_000_000),
        ("1GB", 1_000_000_000),
        ("1.5MiB", 1_572_864),
        ("64 mib", 64 * 1024**2),
        (2048.0, 2048),
    ],
)
def test_parse_size(text: str | int | float, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "64 megabytes", "1.5", "10Mb/s", False, 1.5])
def test_parse_size_rejects_nonsense(text: str | int | float) -> None:
    with pytest.raises(ValueError, match="expected a size such as"):
        parse_size(text)


def test_parse_size_rejects_negatives() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_size("-1MiB")


def test_wrong_value_types_are_explained(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        shutdown_timeout: abc
        history_days: a month
        log_level: LOUD
        """
    )
    text = text.replace(
        "    destination: pacs\n",
        "    destination: pacs\n    polling: 'yes'\n    ignore: '*.part'\n    quiet_period: []\n",
    )
    text = text.replace(
        "dicom-web\n", "dicom-web\n    workers: 0\n    batch: {max_bytes: huge, max_files: 2.5}\n"
    )

    problems = problems_of(tmp_path, text)

    expected = {
        "shutdown_timeout": "expected a duration such as 30s or 5m, got 'abc'",
        "history_days": "expected a number, got 'a month'",
        "log_level": "expected one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'",
        "sources[0].polling": "expected true or false (without quotes), got 'yes'",
        "sources[0].ignore": "expected a list of file name patterns",
        "sources[0].quiet_period": "expected a duration such as 30s or 5m, got a list",
        "destinations.pacs.workers": "must be at least 1, got 0",
        "destinations.pacs.batch.max_bytes": "expected a size such as 512KiB, 64MiB or 1GB",
        "destinations.pacs.batch.max_files": "expected a whole number, got 2.5",
    }
    for key, message in expected.items():
        assert message in find(problems, key).message
    assert len(problems) == len(expected)


def test_zero_is_refused_where_it_makes_no_sense(tmp_path: Path) -> None:
    text = MINIMAL + "retry: {initial: 0s, multiplier: 0.5}\n"
    text = text.replace("dicom-web\n", "dicom-web\n    timeouts: {read: 0}\n")

    problems = problems_of(tmp_path, text)

    assert "must be more than 0 seconds" in find(problems, "retry.initial").message
    assert "at least 1" in find(problems, "retry.multiplier").message
    assert "must be more than 0" in find(problems, "destinations.pacs.timeouts.read").message


def test_retry_maximum_below_initial(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, MINIMAL + "retry:\n  initial: 2h\n  maximum: 1h\n")

    problem = find(problems, "retry.maximum")
    assert problem.message == "must not be less than initial (7200s)"
    assert problem.line == 13


def test_ignore_patterns_must_be_file_names(tmp_path: Path) -> None:
    text = MINIMAL.replace("destination: pacs\n", "destination: pacs\n    ignore: ['tmp/*']\n")

    (problem,) = problems_of(tmp_path, text)

    assert problem.key == "sources[0].ignore"
    assert "file name only" in problem.message


def test_quoted_bool_is_text_but_plain_bool_is_bool(tmp_path: Path) -> None:
    good = MINIMAL.replace("destination: pacs\n", "destination: pacs\n    polling: true\n")
    assert load_text(tmp_path, good).sources[0].polling is True

    bad = good.replace("polling: true", 'polling: "true"')
    (problem,) = problems_of(tmp_path, bad)
    assert problem.key == "sources[0].polling"
    assert problem.message == "expected true or false (without quotes), got 'true'"


# --------------------------------------------------------------------------- problems


def test_unknown_key_suggests_the_close_one_with_its_line(tmp_path: Path) -> None:
    text = MINIMAL.replace("destination: pacs\n", "destination: pacs\n    quiet_peroid: 5s\n")

    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)

    (problem,) = info.value.problems
    assert problem == ConfigProblem(
        "sources[0].quiet_peroid", "unknown key; did you mean 'quiet_period'?", 8
    )
    assert "line 8: sources[0].quiet_peroid: unknown key; did you mean" in str(info.value)


def test_unknown_key_far_from_any_lists_the_known_ones(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, MINIMAL + "colour: blue\n")

    assert problem.key == "colour"
    assert problem.line == 11
    assert "did you mean" not in problem.message
    assert "expected one of: queue, log_level" in problem.message


def test_defaults_may_not_hold_per_source_keys(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, MINIMAL + "defaults:\n  watch: /x\n  quiet_period: 1s\n")

    (problem,) = problems
    assert problem.key == "defaults.watch"
    assert "cannot have a default" in problem.message
    assert problem.line == 12


def test_many_problems_are_reported_together_with_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        queue: ./state/queue.db
        log_level: chatty
        sources:
          - name: ct1
            watch: ./drop/ct1
            sent: ./done/sent
            failed: ./done/failed
            destination: pacs
            quiet_period: soon
            polling: maybe
        destinations:
          pacs:
            url: http://pacs/dicom-web
            workerz: 3
            batch:
              max_bytes: 12 bananas
        """,
    )

    with pytest.raises(ConfigError) as info:
        load_config(path)

    error = info.value
    assert error.path == str(path)
    found = {(p.key, p.line) for p in error.problems}
    assert found == {
        ("log_level", 2),
        ("sources[0].quiet_period", 9),
        ("sources[0].polling", 10),
        ("destinations.pacs.workerz", 14),
        ("destinations.pacs.batch.max_bytes", 16),
    }
    text = str(error)
    assert text.startswith(f"{path}: 5 problems in the configuration")
    assert "line 16: destinations.pacs.batch.max_bytes: expected a size" in text
    lines = [p.line or 0 for p in error.problems]
    assert lines == sorted(lines)


def test_missing_required_keys(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """\
        log_level: INFO
        sources:
          - name: ct1
            watch: ./drop
        destinations:
          pacs: {}
        """,
    )

    missing = {(p.key, p.line) for p in problems if p.message == "required key is missing"}
    assert missing == {
        ("queue", 1),
        ("sources[0].sent", 3),
        ("sources[0].failed", 3),
        ("sources[0].destination", 3),
        ("destinations.pacs.url", 6),
    }
    assert len(problems) == len(missing)


def test_missing_top_level_sections(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "queue: q.db\n")

    assert {p.key for p in problems} == {"sources", "destinations"}
    assert all(p.message == "required key is missing" for p in problems)


def test_empty_sources_and_destinations(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "queue: q.db\nsources: []\ndestinations: {}\n")

    assert find(problems, "sources").message == "at least one source is required"
    assert find(problems, "destinations").message == "at least one destination is required"


def test_sections_of_the_wrong_shape(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        "queue: q.db\nretry: 5s\nsources:\n  ct1: {}\ndestinations:\n  pacs: http://x\n",
    )

    assert find(problems, "retry").message == "expected a mapping of keys to values, got '5s'"
    assert "expected a list of sources" in find(problems, "sources").message
    problem = find(problems, "destinations.pacs")
    assert (problem.message, problem.line) == (
        "expected a mapping of keys to values, got 'http://x'",
        6,
    )
    assert len(problems) == 3  # no "url is missing" noise for the broken destination


def test_duplicate_keys_and_source_names(tmp_path: Path) -> None:
    text = MINIMAL.replace("queue: ./state/queue.db\n", "queue: a.db\nqueue: b.db\n")
    text = text.replace(
        "destinations:",
        source_text("ct1", "./drop/other", "./o/sent", "./o/failed") + "destinations:",
    )

    problems = problems_of(tmp_path, text)

    assert find(problems, "queue").message == "duplicate key (first given on line 1)"
    assert find(problems, "queue").line == 2
    assert find(problems, "sources[1].name").message == (
        "duplicate source name (first used on line 4)"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://pacs/dicom-web", "expected an http:// or https:// URL with a host"),
        ("pacs:8042/dicom-web", "expected an http:// or https:// URL with a host"),
        ("http:///dicom-web", "expected an http:// or https:// URL with a host"),
        ("http://pacs:port/dicom-web", "the port is not a number"),
        ("http://pacs/dicom-web?x=1", "must not contain '?' or '#'"),
        ("8042", "expected text, got 8042"),
    ],
)
def test_bad_url(tmp_path: Path, url: str, expected: str) -> None:
    (problem,) = problems_of(tmp_path, MINIMAL.replace("http://127.0.0.1:8042/dicom-web", url))

    assert problem.key == "destinations.pacs.url"
    assert expected in problem.message
    assert problem.line == 10


def test_undefined_destination_names_the_known_ones(tmp_path: Path) -> None:
    text = MINIMAL.replace("destination: pacs", "destination: pac") + (
        "  archive:\n    url: https://archive/rs\n"
    )

    (problem,) = problems_of(tmp_path, text)

    assert problem.key == "sources[0].destination"
    assert problem.line == 7
    assert problem.message == (
        "destination 'pac' is not defined under destinations (known: archive, pacs); "
        "did you mean 'pacs'?"
    )


def test_bad_names(tmp_path: Path) -> None:
    text = MINIMAL.replace("name: ct1", "name: ct 1").replace("  pacs:\n", "  pacs/1:\n")
    text = text.replace("destination: pacs", "destination: pacs/1")

    problems = problems_of(tmp_path, text)

    assert "letters, digits" in find(problems, "sources[0].name").message
    assert "letters, digits" in find(problems, "destinations.pacs/1").message


# --------------------------------------------------------------------------- folder rules


def test_watch_inside_sent_is_rejected(tmp_path: Path) -> None:
    text = with_sources(source_text("ct1", "./done/drop", "./done", "./failed"))

    (problem,) = problems_of(tmp_path, text)

    assert problem.key == "sources[0].watch"
    assert problem.line == 4
    assert problem.message.startswith(
        f"the watch folder is inside its sent folder ({tmp_path / 'done'})"
    )


def test_watch_equal_to_failed_is_rejected(tmp_path: Path) -> None:
    text = with_sources(source_text("ct1", "./drop", "./sent", "./drop/"))

    (problem,) = problems_of(tmp_path, text)

    assert problem.key == "sources[0].watch"
    assert "is the same as its failed folder" in problem.message


def test_sent_and_failed_inside_watch_are_accepted(tmp_path: Path) -> None:
    text = with_sources(source_text("ct1", "./drop", "./drop/.sent", "./drop/.failed"))

    source = load_text(tmp_path, text).sources[0]

    assert source.sent.parent == source.watch
    assert source.failed.parent == source.watch


def test_sent_equal_to_failed_is_rejected(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, with_sources(source_text("ct1", "./in", "./out", "out")))

    assert problem.key == "sources[0].failed"
    assert problem.message == f"must not be the same folder as sent ({tmp_path / 'out'})"


@pytest.mark.parametrize(
    ("first_watch", "second_watch"),
    [("./drop", "./drop"), ("./drop", "./drop/ct"), ("./drop/ct", "./drop"), ("drop", "./drop/")],
)
def test_overlapping_watch_folders_are_rejected(
    tmp_path: Path, first_watch: str, second_watch: str
) -> None:
    text = with_sources(
        source_text("ct1", first_watch, "./sent/ct1", "./failed/ct1"),
        source_text("mr1", second_watch, "./sent/mr1", "./failed/mr1"),
    )

    (problem,) = problems_of(tmp_path, text)

    assert problem.key == "sources[1].watch"
    assert problem.line == 9
    assert "the watch folder of source 'ct1'" in problem.message
    assert "line 4" in problem.message
    assert "queued twice" in problem.message


def test_separate_watch_folders_with_similar_names_are_fine(tmp_path: Path) -> None:
    text = with_sources(
        source_text("ct1", "./drop/ct", "./sent/ct", "./failed/ct"),
        source_text("ct2", "./drop/ct2", "./sent/ct2", "./failed/ct2"),
    )

    config = load_text(tmp_path, text)

    assert [s.name for s in config.sources] == ["ct1", "ct2"]


def test_sent_inside_another_sources_watch_is_rejected(tmp_path: Path) -> None:
    text = with_sources(
        source_text("ct1", "./drop/ct1", "./drop/mr1/from-ct", "./failed/ct1"),
        source_text("mr1", "./drop/mr1", "./sent/mr1", "./failed/mr1"),
    )

    (problem,) = problems_of(tmp_path, text)

    assert problem.key == "sources[0].sent"
    assert problem.line == 5
    assert "is inside the watch folder of source 'mr1'" in problem.message


def test_folder_rules_apply_to_otherwise_invalid_sources(tmp_path: Path) -> None:
    text = with_sources(
        source_text("ct1", "./drop", "./sent/ct1", "./failed/ct1"),
        source_text("mr 1", "./drop", "./sent/mr1", "./failed/mr1"),
    )

    problems = problems_of(tmp_path, text)

    assert {p.key for p in problems} == {"sources[1].name", "sources[1].watch"}


def test_queue_inside_a_watch_folder_is_rejected(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, MINIMAL.replace("./state/queue.db", "./drop/ct1/q.db"))

    assert problem.key == "queue"
    assert problem.line == 1
    assert "watch folder of source 'ct1'" in problem.message


# --------------------------------------------------------------------------- files


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "queue: q.db\nsources: [\n  name: ct1\ndestinations: {}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.path == str(path)
    (problem,) = info.value.problems
    assert problem.message.startswith("invalid YAML: ")
    assert problem.line is not None and problem.line >= 3
    assert str(path) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.path == str(path)
    assert info.value.problems == [ConfigProblem("", "the configuration file does not exist", None)]


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a folder, not a file

    assert info.value.path == str(tmp_path)
    assert info.value.problems[0].message.startswith("cannot read the file: ")


def test_empty_file_and_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the file is empty"):
        load_text(tmp_path, "# nothing here\n")

    (problem,) = problems_of(tmp_path, "- just\n- a list\n")
    assert problem.message == "expected a mapping of keys to values, got a list"
    assert problem.line == 1


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("./state/queue.db", "!!python/object:os.system x")

    (problem,) = problems_of(tmp_path, text)

    assert problem.key == "queue"
    assert problem.message.startswith("cannot read this value")


# --------------------------------------------------------------------------- bulkdata


def test_bulkdata_settings_default_override_and_inherit(tmp_path: Path) -> None:
    text = with_sources(
        source_text("a", "./a", "./a-sent", "./a-failed"),
        source_text("b", "./b", "./b-sent", "./b-failed")
        + "    bulkdata:\n      types: [pdf, jpeg, pdf]\n      unknown: fail\n",
    )
    text = text.replace(
        "sources:\n",
        "uid_root: 1.2.826.0.1.3680043.10.99\ndefaults:\n  bulkdata:\n    unknown: ignore\n"
        "    images: photographic\n    study_key: '{parts[0]}/{sidecar.AccessionNumber}'\n"
        "sources:\n",
    )
    text += "    bulkdata: metadata\n"
    config = load_text(tmp_path, text)
    a, b = config.sources
    assert a.bulkdata.types == BULK_TYPES and a.bulkdata.unknown == "ignore"
    assert a.bulkdata.images == "photographic"
    assert a.bulkdata.study_key.text == "{parts[0]}/{sidecar.AccessionNumber}"
    assert b.bulkdata.types == ("pdf", "jpeg") and b.bulkdata.unknown == "fail"
    assert b.bulkdata.images == "photographic"  # the other keys still come from defaults
    assert config.destinations["pacs"].bulkdata == "metadata"
    assert config.uid_root == "1.2.826.0.1.3680043.10.99"


def test_bad_bulkdata_settings_are_all_reported(tmp_path: Path) -> None:
    text = with_sources(
        source_text("a", "./a", "./a-sent", "./a-failed")
        + "    bulkdata:\n      types: [pdf, docx]\n      images: photo\n"
        "      unknown: skip\n      study_key: same-for-all\n      colour: red\n"
    )
    text = text.replace("sources:\n", "uid_root: 1.2.03\nsources:\n")
    text += "    bulkdata: json\n"
    problems = problems_of(tmp_path, text)
    assert "'docx'" in find(problems, "sources[0].bulkdata.types").message
    assert "secondary-capture, photographic" in find(problems, "sources[0].bulkdata.images").message
    assert "fail, ignore" in find(problems, "sources[0].bulkdata.unknown").message
    assert "no placeholder" in find(problems, "sources[0].bulkdata.study_key").message
    assert "study_key" in find(problems, "sources[0].bulkdata.colour").message
    assert "leading zeros" in find(problems, "uid_root").message
    assert "encapsulate, metadata" in find(problems, "destinations.pacs.bulkdata").message


def test_a_study_key_cannot_use_regex_groups_and_a_long_uid_root_is_refused(
    tmp_path: Path,
) -> None:
    text = with_sources(
        source_text("a", "./a", "./a-sent", "./a-failed")
        + "    bulkdata:\n      study_key: '{regex.acc}'\n"
    )
    text = text.replace("sources:\n", "uid_root: 1." + "2." * 25 + "3\nsources:\n")
    problems = problems_of(tmp_path, text)
    assert "no regex" in find(problems, "sources[0].bulkdata.study_key").message
    assert "at most 40" in find(problems, "uid_root").message


# --------------------------------------------------------------------------- service settings


def test_retention_and_metrics_settings(tmp_path: Path) -> None:
    text = with_sources(
        source_text("a", "./a", "./a-sent", "./a-failed"),
        source_text("b", "./b", "./b-sent", "./b-failed") + "    sent_retention: forever\n",
    )
    text = text.replace(
        "sources:\n",
        "metrics:\n  listen: '[::1]:9464'\ndefaults:\n  sent_retention: 30d\nsources:\n",
    )
    config = load_text(tmp_path, text)
    a, b = config.sources
    assert (a.sent_retention, b.sent_retention) == (30 * 86400, None)
    assert config.metrics is not None
    assert (config.metrics.host, config.metrics.port) == ("::1", 9464)
    assert load_text(tmp_path, MINIMAL).metrics is None


def test_bad_retention_and_metrics_settings_are_reported(tmp_path: Path) -> None:
    text = with_sources(
        source_text("a", "./a", "./a-sent", "./a-failed") + "    sent_retention: 2h\n"
    )
    text = text.replace("sources:\n", "metrics:\n  listen: 9464\n  port: 1\nsources:\n")
    problems = problems_of(tmp_path, text)
    assert "at least 1d" in find(problems, "sources[0].sent_retention").message
    assert "127.0.0.1:9464" in find(problems, "metrics.listen").message
    assert "listen" in find(problems, "metrics.port").message


# --------------------------------------------------------------------------- access


def with_destination(extra: str) -> str:
    return with_sources(source_text("a", "./a", "./a-sent", "./a-failed")) + extra


def test_auth_tls_headers_and_proxy_are_read(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "me.pem").write_text("x")
    (tmp_path / "me.key").write_text("x")
    text = with_destination(
        "    auth: {type: oauth2, token_url: 'https://sso/token', client_id: stowd,\n"
        "           client_secret: {file: ./sso.secret}, scope: archive}\n"
        "    tls: {ca_file: ca.pem, client_cert: me.pem, client_key: me.key, min_version: '1.3'}\n"
        "    headers: {X-Site: ward3}\n"
        "    proxy: 'http://proxy:3128'\n"
        "    trust_env: true\n"
    )
    access = load_text(tmp_path, text).destinations["pacs"].access
    assert access.auth is not None and access.auth.type == "oauth2"
    assert (access.auth.token_url, access.auth.client_id, access.auth.scope) == (
        "https://sso/token",
        "stowd",
        "archive",
    )
    assert access.auth.secret is not None and access.auth.secret.kind == "file"
    assert access.auth.secret.ref == str(tmp_path / "sso.secret")  # relative to the config
    assert (access.tls.ca_file, access.tls.min_version) == (tmp_path / "ca.pem", "1.3")
    assert access.headers == (("X-Site", "ward3"),)
    assert (access.proxy, access.trust_env) == ("http://proxy:3128", True)


def test_bad_access_settings_are_all_reported(tmp_path: Path) -> None:
    text = with_destination(
        "    auth: {type: basic, username: stowd, token: x}\n"
        "    tls: {ca_file: missing.pem, client_key: k.pem, min_version: 1.1}\n"
        "    headers: {Content-Type: x, 'bad name': y}\n"
    )
    problems = problems_of(tmp_path, text)
    assert (
        "does not belong to auth type basic"
        in find(problems, "destinations.pacs.auth.token").message
    )
    assert find(problems, "destinations.pacs.auth.password").message == "required key is missing"
    assert "does not exist" in find(problems, "destinations.pacs.tls.ca_file").message
    assert "1.2" in find(problems, "destinations.pacs.tls.min_version").message
    assert "set by stowd itself" in find(problems, "destinations.pacs.headers").message
    unknown = problems_of(tmp_path, with_destination("    auth: {type: kerberos}\n"))
    assert "basic, bearer, oauth2" in find(unknown, "destinations.pacs.auth.type").message


def test_inline_secrets_in_a_world_readable_config_and_tls_off_are_warned(
    tmp_path: Path,
) -> None:
    text = with_destination(
        "    auth: {type: basic, username: u, password: s3cret}\n    verify_tls: false\n"
    )
    path = write(tmp_path, text)
    path.chmod(0o644)
    warnings = load_config(path).warnings
    assert any("TLS verification is OFF" in w for w in warnings)
    assert any("holds secrets of pacs inline" in w for w in warnings)
    assert not any("s3cret" in w for w in warnings)
    path.chmod(0o640)
    assert not any("inline" in w for w in load_config(path).warnings)


def test_no_secret_is_quoted_in_a_config_problem(tmp_path: Path) -> None:
    cases = [
        "    headers: 'Authorization: Bearer HdrSecret999'\n",
        "    auth: 'Bearer TokSecret999'\n",
        "    proxy: 'proxyuser:ProxySecret999@proxy:3128'\n",
        "    headers: {X-Station: 'Röntgen 3'}\n",
    ]
    for case in cases:
        problems = problems_of(tmp_path, with_destination(case))
        text = " ".join(str(p) for p in problems)
        assert problems and "Secret999" not in text, text


def test_headers_and_userinfo_count_as_inline_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, with_destination("    headers: {X-Api-Key: abc}\n"))
    path.chmod(0o644)
    assert any("inline" in w for w in load_config(path).warnings)


# --------------------------------------------------------------------------- watch folders


def test_a_misspelled_watch_folder_is_an_error_with_the_close_sibling(tmp_path: Path) -> None:
    (tmp_path / "drop" / "ct1").mkdir(parents=True)
    path = write_only(tmp_path, MINIMAL.replace("./drop/ct1", "./drop/tc1"))

    with pytest.raises(ConfigError) as info:
        load_config(path)

    (problem,) = info.value.problems
    assert problem.key == "sources[0].watch"
    assert problem.message.startswith(f"the folder {tmp_path / 'drop' / 'tc1'} does not exist")
    assert f"did you mean {tmp_path / 'drop' / 'ct1'}?" in problem.message
    assert not (tmp_path / "drop" / "tc1").exists()


def test_a_watch_folder_with_missing_parents_is_an_error(tmp_path: Path) -> None:
    path = write_only(tmp_path, MINIMAL.replace("./drop/ct1", "./no/such/parent/drop"))

    with pytest.raises(ConfigError) as info:
        load_config(path)

    (problem,) = info.value.problems
    assert problem.key == "sources[0].watch"
    assert f"(nor does {tmp_path / 'no'})" in problem.message
    assert "did you mean" not in problem.message
    assert not (tmp_path / "no").exists()


def test_sent_and_failed_may_not_exist_yet(tmp_path: Path) -> None:
    (tmp_path / "drop" / "ct1").mkdir(parents=True)

    config = load_config(write_only(tmp_path, MINIMAL))

    assert not config.sources[0].sent.exists() and not config.sources[0].failed.exists()


def test_a_watch_path_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "ct1").write_bytes(b"")

    with pytest.raises(ConfigError) as info:
        load_config(write_only(tmp_path, MINIMAL))

    (problem,) = info.value.problems
    assert problem.key == "sources[0].watch"
    assert problem.message == f"{tmp_path / 'drop' / 'ct1'} is not a folder (a file?); " + (
        "watch must name a folder"
    )


def test_a_receiving_source_needs_no_folder_yet(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "    watch: ./drop/ct1\n", "    receive: {ae_title: STOWD, bind: 127.0.0.1, port: 11112}\n"
    )

    config = load_config(write_only(tmp_path, text))

    assert config.sources[0].watch == tmp_path / "state" / "received" / "ct1"
    assert not config.sources[0].watch.exists()


@pytest.mark.parametrize("ending", ["/studies", "/studies/", "/STUDIES"])
def test_a_url_ending_in_studies_says_what_it_should_be(tmp_path: Path, ending: str) -> None:
    text = MINIMAL.replace("8042/dicom-web", "8042/dicom-web" + ending)

    (problem,) = problems_of(tmp_path, text)

    assert problem.key == "destinations.pacs.url"
    assert problem.message == (
        "ends with /studies, which stowd adds itself: the url is the DICOMweb base, "
        "here 'http://127.0.0.1:8042/dicom-web'"
    )


def test_status_works_while_a_watch_folder_is_missing_and_check_config_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status is what says a watch folder went missing (while the daemon runs); the
    commands that act refuse a config whose watch folder is missing."""
    path = write_only(tmp_path, MINIMAL)
    queue = SqliteQueue(tmp_path / "state" / "queue.db")  # as a daemon run left it
    queue.open()
    queue.close()

    assert main(["status", "-c", str(path)]) == 0
    assert "daemon:       not running" in capsys.readouterr().out
    assert main(["check-config", "-c", str(path)]) == 2
    assert "sources[0].watch: the folder" in capsys.readouterr().err


# issue 19: cpu (the daemon's side: tests/test_pinning.py)
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("text", "expected"),
    [("", None), ("cpu:\n", None), ("cpu: auto\n", Cpu(None)), ("cpu: 0\n", Cpu(0))],
)
def test_cpu_is_read_once_into_the_config(tmp_path: Path, text: str, expected: Cpu | None) -> None:
    assert load_text(tmp_path, MINIMAL + text).cpu == expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fastest", "expected a CPU core number such as 1, or auto, got 'fastest'"),
        ("AUTO", "expected a CPU core number such as 1, or auto, got 'AUTO'"),
        ("-1", "a CPU core number is 0 or more, got -1"),
        ("true", "expected a CPU core number such as 1, or auto, got true"),
        ("1.5", "expected a CPU core number such as 1, or auto, got 1.5"),
        ("[1, 2]", "expected a CPU core number such as 1, or auto, got a list"),
    ],
)
def test_a_wrong_cpu_names_file_key_and_line(tmp_path: Path, value: str, message: str) -> None:
    path = write(tmp_path, MINIMAL + f"log_level: chatty\ncpu: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert error.path == str(path)
    found = {(p.key, p.line): p.message for p in error.problems}
    assert set(found) == {("log_level", 11), ("cpu", 12)}  # every problem at once
    assert found["cpu", 12] == message
    assert f"line 12: cpu: {message}" in str(error)

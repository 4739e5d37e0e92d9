"""A source's ``receive:`` section (a C-STORE receiver): read into ``Receive``, and every
mistake named with its key and line, all at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from harness import make_watch_folders

from stowd.config.load import load_config
from stowd.config.model import Allowed, Receive
from stowd.errors import ConfigError

DESTINATIONS = """
destinations:
  pacs:
    url: http://127.0.0.1:8042/dicom-web
"""


def config(tmp_path: Path, sources: str) -> Path:
    text = "queue: ./state/queue.db\nsources:\n" + textwrap.indent(textwrap.dedent(sources), "  ")
    path = tmp_path / "stowd.yaml"
    path.write_text(text + DESTINATIONS)
    make_watch_folders(path)
    return path


def problems(tmp_path: Path, sources: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(config(tmp_path, sources))
    return [f"{p.line} {p.key}: {p.message}" for p in caught.value.problems]


def test_a_receiving_source_gets_its_folder_beside_the_queue_and_the_defaults(
    tmp_path: Path,
) -> None:
    loaded = load_config(
        config(
            tmp_path,
            """
            - name: ct
              receive:
                ae_title: STOWD
                port: 11112
                bind: 127.0.0.1
                allow: [{ae_title: CT1}, {ae_title: MR2, host: 10.1.2.3}]
              sent: ./sent
              failed: ./failed
              destination: pacs
            """,
        )
    )
    source = loaded.sources[0]
    assert source.watch == tmp_path / "state" / "received" / "ct"
    assert source.receive == Receive(
        "STOWD", 11112, "127.0.0.1", (Allowed("CT1"), Allowed("MR2", "10.1.2.3")), 10, 65536, 60.0
    )
    assert source.remove_empty_dirs  # study folders go once their files are sent


def test_every_receive_mistake_is_named_with_its_line(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        - name: ct
          watch: ./drop
          receive:
            ae_title: "A\\\\B"
            port: 70000
            bind: localhost
            allow: []
            max_pdu: 100
            max_associations: 0
            idle_timeout: 0s
            colour: blue
          sent: ./sent
          failed: ./failed
          destination: pacs
        """,
    )
    text = "\n".join(found)
    for expected in (
        "5 sources[0].watch: a source either watches a folder or receives C-STORE",
        "7 sources[0].receive.ae_title: an AE title has 1 to 16 characters",
        "8 sources[0].receive.port: a TCP port is 1 to 65535, got 70000",
        "9 sources[0].receive.bind: bind is an IP address such as 127.0.0.1",
        "10 sources[0].receive.allow: an empty list lets no one send",
        "11 sources[0].receive.max_pdu: must be 4096 to 16777216 bytes (16 MiB), got 100",
        "12 sources[0].receive.max_associations: must be at least 1",
        "13 sources[0].receive.idle_timeout: must be more than 0 seconds",
        "14 sources[0].receive.colour: unknown key",
    ):
        assert expected in text, text


def test_a_receiver_needs_its_address_and_two_cannot_share_a_port(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        - name: ct
          receive: {ae_title: STOWD, port: 11112}
          sent: ./sent/ct
          failed: ./failed/ct
          destination: pacs
        - name: mr
          receive: {ae_title: STOWD, port: 104, bind: 0.0.0.0}
          sent: ./sent/mr
          failed: ./failed/mr
          destination: pacs
        - name: us
          receive: {ae_title: STOWD, port: 104, bind: 127.0.0.1}
          sent: ./sent/us
          failed: ./failed/us
          destination: pacs
        """,
    )
    text = "\n".join(found)
    assert "sources[0].receive.bind: required key is missing" in text
    assert "sources[2].receive.port: 127.0.0.1:104 is already taken by the receiver of " in text


def test_a_source_without_watch_or_receive_says_what_is_missing(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        - name: ct
          sent: ./sent
          failed: ./failed
          destination: pacs
        """,
    )
    assert any("sources[0].watch: required key is missing" in p for p in found), found


def test_a_watch_folder_over_the_received_folder_is_refused(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        - name: ct
          receive: {ae_title: STOWD, port: 11112, bind: 127.0.0.1}
          sent: ./sent/ct
          failed: ./failed/ct
          destination: pacs
        - name: everything
          watch: ./state
          sent: ./sent/all
          failed: ./failed/all
          destination: pacs
        """,
    )
    assert any("its files would be queued twice" in p for p in found), found

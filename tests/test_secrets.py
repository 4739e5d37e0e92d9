"""Secrets: parsed from the config, read when used, never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stowd.config.secrets import Secret, parse
from stowd.errors import SecretUnavailable

VALUE = "s3cret-Zq9"


def test_the_four_sources_of_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text(VALUE + "\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "pacs").write_text(VALUE)
    monkeypatch.setenv("PACS_PW", VALUE)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    found = [
        parse(VALUE),
        parse({"env": "PACS_PW"}),
        parse({"file": str(tmp_path / "pw")}),
        parse({"credential": "pacs"}),
    ]
    assert [s.kind for s in found] == ["inline", "env", "file", "credential"]
    assert [s.value() for s in found] == [VALUE] * 4  # one trailing newline dropped


def test_a_secret_is_never_shown(tmp_path: Path) -> None:
    for secret in (parse(VALUE), Secret("file", str(tmp_path / "x"))):
        assert VALUE not in repr(secret) and VALUE not in str(secret)
        assert VALUE not in secret.where
    assert repr(parse(VALUE)) == "Secret(inline in the config)"


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("old")
    secret = parse({"file": str(path)})
    assert secret.value() == "old"
    path.write_text("new-and-longer")
    assert secret.value() == "new-and-longer"
    replacement = tmp_path / "pw.tmp"
    replacement.write_text("renamed")
    os.replace(replacement, path)  # a new inode, as editors and install(1) do
    assert secret.value() == "renamed"


def test_unavailable_secrets_say_where_without_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOPE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "empty").write_text("\n")
    cases = {
        "env": (parse({"env": "NOPE"}), "environment variable NOPE is not set"),
        "file": (parse({"file": str(tmp_path / "missing")}), "No such file"),
        "empty": (parse({"file": str(tmp_path / "empty")}), "is empty"),
        "credential": (parse({"credential": "pacs"}), "CREDENTIALS_DIRECTORY is not set"),
    }
    for secret, message in cases.values():
        with pytest.raises(SecretUnavailable, match=message):
            secret.value()


@pytest.mark.parametrize("value", ["", {"env": ""}, {"vault": "x"}, {"env": "A", "file": "b"}, 5])
def test_a_malformed_secret_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="env: VARIABLE"):
        parse(value)

"""Reaching a protected archive, end to end: the real daemon against a real Orthanc with users,
behind a real nginx TLS proxy with certificates made here, and behind an OAuth2 bearer check
with short-lived tokens.  A failing login or TLS check holds its destination (files stay in
drop/, nothing goes to failed/), fixing a secret file releases it without a restart, and no
secret ever shows in a log, ``status``, ``check-config`` or an error file."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_orthanc
from dicomgen import make_instance, write_garbage
from harness import Layout, Stowd, make_layout, run_cli, wait_for
from oauthserver import BearerProxy, TokenServer
from orthanc import Orthanc
from tlsproxy import NginxProxy, Pki, make_pki, tls_missing_reason

USER = "stowd"
TIMEOUT = 30  # seconds for anything the daemon should do (each is a second or two here)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def password() -> str:
    return "right-" + secrets.token_hex(8)


@pytest.fixture
def wrong_password() -> str:
    return "wrong-" + secrets.token_hex(12)  # another length: the file's size changes


@pytest.fixture
def locked_orthanc(tmp_path: Path, password: str) -> Iterator[Orthanc]:
    """A running Orthanc that wants HTTP Basic login as USER with *password*."""
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc", users={USER: password})
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA with a server certificate for 127.0.0.1 and a client certificate."""
    reason = tls_missing_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    return make_pki(tmp_path / "pki")


# -- helpers --------------------------------------------------------------------------------


def destination(url: str, **access: Any) -> dict[str, Any]:
    return {"url": url, "workers": 2, "timeouts": {"read": "30s"}, **access}


def basic(password_file: Path) -> dict[str, Any]:
    return {"type": "basic", "username": USER, "password": {"file": str(password_file)}}


def access_layout(root: Path, url: str, **access: Any) -> Layout:
    """One source sending to destination ``pacs`` at *url* with the given auth/tls settings."""
    return make_layout(root, url, destinations={"pacs": destination(url, **access)})


def write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def drop(layout: Layout, names: list[str], folder: Path | None = None) -> dict[str, str]:
    """Small DICOM files in *folder* (the drop folder by default); name -> SOPInstanceUID."""
    where = folder or layout.drop
    return {name: make_instance(where / name, rows=8, columns=8) for name in names}


def status(layout: Layout) -> dict[str, Any]:
    result = run_cli("status", "-c", str(layout.config), "--json")
    assert result.stdout, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def hold_reason(layout: Layout, dest: str = "pacs") -> str | None:
    """The reason ``status --json`` gives for *dest* being held, or None when it is not (or
    when the daemon has not made its queue yet)."""
    if not (layout.root / "state" / "queue.db").exists():
        return None
    info = status(layout)["destinations"][dest]
    return str(info.get("reason", "")) if info["state"] == "held" else None


def wait_held(layout: Layout, daemon: Stowd, dest: str = "pacs") -> str:
    seen: list[str] = []
    daemon.wait_started()  # status before the queue has its tables fails ("no such table")

    def held() -> bool:
        reason = hold_reason(layout, dest)
        if reason is not None:
            seen.append(reason)
        return reason is not None

    wait_for(held, TIMEOUT, f"destination {dest} held", lambda: daemon.log)
    return seen[-1]


def wait_sent(layout: Layout, names: set[str], daemon: Stowd, sent: Path | None = None) -> None:
    folder = sent or layout.sent
    wait_for(
        lambda: names <= layout.files(folder),
        TIMEOUT,
        f"{sorted(names)} in sent/",
        lambda: daemon.log,
    )


def still_waiting(layout: Layout, names: set[str], folder: Path | None = None) -> None:
    """The files are still in the drop folder and nothing went to failed/."""
    assert names <= layout.files(folder or layout.drop)
    assert not layout.files(layout.failed) & names


def every_output(layout: Layout, daemons: list[Stowd]) -> dict[str, str]:
    """Everything a run shows a person: daemon logs, status (both forms), check-config (with
    --connect when this stowd has it) and every error file."""
    config = str(layout.config)
    outputs = {f"log {d.log_path.name}": d.log for d in daemons}
    commands = [("status",), ("status", "--json"), ("check-config",)]
    if "--connect" in run_cli("check-config", "--help").stdout:
        commands.append(("check-config", "--connect"))
    for command in commands:
        result = run_cli(*command, "-c", config, timeout=120)
        outputs[" ".join(command)] = result.stdout + result.stderr
    for path in layout.root.rglob("*.error.json"):
        outputs[str(path.relative_to(layout.root))] = path.read_text(errors="replace")
    return outputs


def secret_forms(*values: str, user: str = USER) -> set[str]:
    """The secrets, and the HTTP Basic credentials they would make (base64 of user:secret)."""
    forms = set(values)
    forms |= {base64.b64encode(f"{user}:{v}".encode()).decode() for v in values}
    return forms


def assert_no_secrets(outputs: dict[str, str], values: set[str]) -> None:
    assert outputs and all(len(v) >= 8 for v in values)
    leaks = [(name, v) for name, text in outputs.items() for v in values if v in text]
    assert not leaks, f"secret values appear in: {sorted({name for name, _ in leaks})}"


# -- 1. Orthanc with users: right, wrong and missing password --------------------------------


def test_right_password_stores_the_files(
    tmp_path: Path, locked_orthanc: Orthanc, password: str
) -> None:
    secret = write_secret(tmp_path / "secrets" / "pacs.pw", password)
    layout = access_layout(tmp_path / "run", locked_orthanc.dicomweb_url, auth=basic(secret))
    uids = drop(layout, ["a.dcm", "b.dcm", "c.dcm"])
    with Stowd(layout) as daemon:
        wait_sent(layout, set(uids), daemon)
        assert hold_reason(layout) is None
        assert daemon.terminate() == 0
    assert set(uids.values()) <= locked_orthanc.sop_instance_uids()
    assert layout.files(layout.failed) == set()


def test_wrong_password_holds_and_fixing_the_file_releases_without_restart(
    tmp_path: Path, locked_orthanc: Orthanc, password: str, wrong_password: str
) -> None:
    secret = write_secret(tmp_path / "secrets" / "pacs.pw", wrong_password)
    layout = access_layout(tmp_path / "run", locked_orthanc.dicomweb_url, auth=basic(secret))
    uids = drop(layout, ["a.dcm", "b.dcm"])
    write_garbage(layout.drop / "junk.dcm")  # fails on its own: an error file to read
    outputs: dict[str, str] = {}
    with Stowd(layout) as daemon:
        reason = wait_held(layout, daemon)
        assert "401" in reason or "login" in reason.lower() or "credential" in reason.lower()
        wait_for(lambda: "junk.dcm" in layout.error_files(), TIMEOUT, "junk.dcm's error file")
        time.sleep(2.5)  # a few probes (hold_probe 1 s): still held, nothing failed
        still_waiting(layout, set(uids))
        assert locked_orthanc.instance_count() == 0
        outputs |= {f"held: {k}": v for k, v in every_output(layout, [daemon]).items()}
        pid = daemon.proc.pid if daemon.proc else None

        write_secret(secret, password)
        wait_sent(layout, set(uids), daemon)
        assert daemon.alive() and daemon.proc is not None and daemon.proc.pid == pid
        wait_for(lambda: hold_reason(layout) is None, TIMEOUT, "the hold to end")
        outputs |= every_output(layout, [daemon])
        assert daemon.terminate() == 0
    assert set(uids.values()) <= locked_orthanc.sop_instance_uids()
    assert layout.files(layout.failed) == {"junk.dcm"}
    outputs[daemon.log_path.name] = daemon.log  # with the shutdown lines
    assert_no_secrets(outputs, secret_forms(password, wrong_password))


def test_missing_password_file_holds_naming_the_file_until_it_appears(
    tmp_path: Path, locked_orthanc: Orthanc, password: str
) -> None:
    secret = tmp_path / "secrets" / "not-yet.pw"
    layout = access_layout(tmp_path / "run", locked_orthanc.dicomweb_url, auth=basic(secret))
    uids = drop(layout, ["a.dcm", "b.dcm"])
    with Stowd(layout) as daemon:
        reason = wait_held(layout, daemon)
        assert str(secret) in reason
        time.sleep(2)
        still_waiting(layout, set(uids))
        assert str(secret) in (hold_reason(layout) or "")

        write_secret(secret, password)
        wait_sent(layout, set(uids), daemon)
        wait_for(lambda: hold_reason(layout) is None, TIMEOUT, "the hold to end")
        assert daemon.terminate() == 0
    assert set(uids.values()) <= locked_orthanc.sop_instance_uids()
    assert layout.files(layout.failed) == set()
    assert_no_secrets({"log": daemon.log}, secret_forms(password))


# -- 2. nginx TLS proxy with certificates made here ------------------------------------------


@pytest.fixture
def tls_proxy(tmp_path: Path, orthanc: Orthanc, pki: Pki) -> Iterator[NginxProxy]:
    with NginxProxy(tmp_path / "nginx", orthanc.url, pki) as proxy:
        yield proxy


@pytest.fixture
def mtls_proxy(tmp_path: Path, orthanc: Orthanc, pki: Pki) -> Iterator[NginxProxy]:
    with NginxProxy(tmp_path / "nginx-mtls", orthanc.url, pki, client_certs=True) as proxy:
        yield proxy


def test_tls_with_our_ca_file_works(
    tmp_path: Path, orthanc: Orthanc, tls_proxy: NginxProxy, pki: Pki
) -> None:
    url = f"{tls_proxy.url}/dicom-web"
    layout = access_layout(tmp_path / "run", url, tls={"ca_file": str(pki.ca_cert)})
    uids = drop(layout, ["a.dcm", "b.dcm"])
    with Stowd(layout) as daemon:
        wait_sent(layout, set(uids), daemon)
        assert daemon.terminate() == 0
    assert set(uids.values()) <= orthanc.sop_instance_uids()
    assert 200 in tls_proxy.access_statuses()  # it went through the proxy


def test_tls_with_an_unknown_ca_is_held_with_a_certificate_message(
    tmp_path: Path, orthanc: Orthanc, tls_proxy: NginxProxy
) -> None:
    layout = access_layout(tmp_path / "run", f"{tls_proxy.url}/dicom-web")  # system CAs only
    uids = drop(layout, ["a.dcm"])
    with Stowd(layout) as daemon:
        reason = wait_held(layout, daemon)
        assert "certificate" in reason.lower(), reason
        time.sleep(2)
        still_waiting(layout, set(uids))
        assert orthanc.instance_count() == 0
        assert daemon.terminate() == 0
    assert "certificate" in daemon.log.lower()


def test_proxy_requiring_client_certificates_refuses_without_and_accepts_ours(
    tmp_path: Path, orthanc: Orthanc, mtls_proxy: NginxProxy, pki: Pki
) -> None:
    url = f"{mtls_proxy.url}/dicom-web"
    root = tmp_path / "run"
    layout = access_layout(root, url, tls={"ca_file": str(pki.ca_cert)})
    uids = drop(layout, ["a.dcm", "b.dcm"])
    with Stowd(layout) as daemon:
        reason = wait_held(layout, daemon)
        assert "certificate" in reason.lower(), reason
        still_waiting(layout, set(uids))
        assert daemon.terminate() == 0
    assert 400 in mtls_proxy.access_statuses()  # nginx: "No required SSL certificate was sent"

    ours = {"ca_file": str(pki.ca_cert), "client_cert": str(pki.client_cert)}
    ours["client_key"] = str(pki.client_key)
    layout = access_layout(root, url, tls=ours)  # the same folders and queue
    with Stowd(layout) as daemon:
        wait_sent(layout, set(uids), daemon)
        wait_for(lambda: hold_reason(layout) is None, TIMEOUT, "the hold to end")
        assert daemon.terminate() == 0
    assert set(uids.values()) <= orthanc.sop_instance_uids()
    assert layout.files(layout.failed) == set()


# -- 3. OAuth2 with tokens that live 3 seconds ------------------------------------------------

CLIENT_ID = "stowd-client"


def test_oauth2_run_longer_than_a_token_life_sends_everything(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    client_secret = "cs-" + secrets.token_hex(16)
    secret_file = write_secret(tmp_path / "secrets" / "client.secret", client_secret)
    with (
        TokenServer(CLIENT_ID, client_secret, lifetime=3) as tokens,
        BearerProxy(orthanc.url, tokens) as proxy,
    ):
        auth = {
            "type": "oauth2",
            "token_url": tokens.token_url,
            "client_id": CLIENT_ID,
            "client_secret": {"file": str(secret_file)},
            "scope": "archive",
        }
        layout = access_layout(tmp_path / "run", f"{proxy.url}/dicom-web", auth=auth)
        write_garbage(layout.drop / "junk.dcm")
        uids: dict[str, str] = {}
        with Stowd(layout) as daemon:
            started = time.monotonic()
            for wave in range(3):  # 0 s, ~4 s, ~8 s: each wave needs a newer token
                time.sleep(max(0.0, started + 4 * wave - time.monotonic()))
                if wave == 2:  # and before the last one, the server forgets every token
                    revoked_before = len(tokens.issued)
                    tokens.revoke_all()
                names = [f"w{wave}/{i}.dcm" for i in range(4)]
                uids |= drop(layout, names)
                wait_sent(layout, set(names), daemon)
            assert time.monotonic() - started > 2 * tokens.lifetime
            outputs = every_output(layout, [daemon])
            assert daemon.terminate() == 0
        outputs[daemon.log_path.name] = daemon.log
        history = proxy.history()
        issued = tokens.issued
        requests = list(tokens.requests)

    assert set(uids.values()) <= orthanc.sop_instance_uids()
    assert layout.files(layout.failed) == {"junk.dcm"}
    assert sum(r.accepted for r in requests) >= 2, requests  # the token was renewed
    assert all(r.client_id == CLIENT_ID for r in requests)
    refused = [(i, e) for i, e in enumerate(history) if e.status == 401]
    assert len(refused) <= 4, refused
    # never without a token, never a made-up one
    assert all(e.token in ("expired", "revoked") for _, e in refused), refused
    assert len(issued) > revoked_before  # after the revocation: a 401, a new token, success
    assert "destination pacs refused" not in outputs[daemon.log_path.name]  # never held
    for i, event in refused:  # each refusal is followed by a success
        assert any(later.token == "valid" and later.status == 200 for later in history[i + 1 :]), (
            event,
            history,
        )
    assert sum(e.status == 200 and e.method == "POST" for e in history) >= 3
    assert_no_secrets(outputs, {client_secret, *issued, *secret_forms(client_secret)})
    assert_no_secrets(outputs, secret_forms(client_secret, user=CLIENT_ID))


# -- 4. two destinations: one held, one flowing ----------------------------------------------


def test_a_held_destination_holds_only_its_files_and_fixing_its_secret_releases_them(
    tmp_path: Path, locked_orthanc: Orthanc, password: str, wrong_password: str
) -> None:
    root = tmp_path / "run"
    bad_pw = write_secret(tmp_path / "secrets" / "bad.pw", wrong_password)
    good_pw = write_secret(tmp_path / "secrets" / "good.pw", password)
    url = locked_orthanc.dicomweb_url
    first = {"name": "ward", "watch": "./drop", "sent": "./done/sent", "failed": "./done/failed"}
    second = {"name": "lab", "watch": "./lab", "sent": "./lab-sent", "failed": "./lab-failed"}
    timing = {"quiet_period": "500ms", "rescan_interval": "3s"}
    layout = make_layout(
        root,
        url,
        sources=[
            {**first, "destination": "bad", **timing},
            {**second, "destination": "good", **timing},
        ],
        destinations={
            "bad": destination(url, auth=basic(bad_pw)),
            "good": destination(url, auth=basic(good_pw)),
        },
    )
    lab, lab_sent = root / "lab", root / "lab-sent"
    lab.mkdir()
    held = drop(layout, ["h1.dcm", "h2.dcm"])
    flowing = drop(layout, ["g1.dcm", "g2.dcm"], lab)
    with Stowd(layout) as daemon:
        wait_sent(layout, set(flowing), daemon, lab_sent)
        reason = wait_held(layout, daemon, "bad")
        assert "401" in reason or "login" in reason.lower() or "credential" in reason.lower()
        assert hold_reason(layout, "good") is None

        more = drop(layout, ["g3.dcm", "g4.dcm"], lab)  # the good one keeps flowing
        wait_sent(layout, set(more), daemon, lab_sent)
        still_waiting(layout, set(held))
        assert hold_reason(layout, "bad") is not None
        outputs = every_output(layout, [daemon])

        write_secret(bad_pw, password)
        wait_sent(layout, set(held), daemon)
        wait_for(lambda: hold_reason(layout, "bad") is None, TIMEOUT, "the hold to end")
        assert daemon.terminate() == 0
    stored = locked_orthanc.sop_instance_uids()
    assert {*held.values(), *flowing.values(), *more.values()} <= stored
    assert layout.files(layout.failed) == set() and layout.files(root / "lab-failed") == set()
    outputs[daemon.log_path.name] = daemon.log
    assert_no_secrets(outputs, secret_forms(password, wrong_password))

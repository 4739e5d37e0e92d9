"""Logins (basic, bearer, OAuth2 client credentials), proxies and headers of a destination.

A real local OAuth2 token endpoint and a real local archive (``localserver.LocalServer``) stand
in for Keycloak and dcm4chee: the endpoint issues short-lived tokens and counts its requests,
the archive refuses tokens it did not issue, that expired, or that the test revoked.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import httpx
import pytest
from dicomgen import make_instance
from harness import Clock, drop_source
from localserver import LocalServer

from stowd.config.access import Access, Auth, Tls
from stowd.config.model import BatchLimits, Config, Destination, Retry
from stowd.config.secrets import Secret
from stowd.dicomweb.auth import OAuth2
from stowd.dicomweb.client import http_client
from stowd.dicomweb.httperrors import failure_of
from stowd.dicomweb.stow import StowClient
from stowd.dicomweb.stowbody import Part
from stowd.errors import DestinationBusy, DestinationHeld, SecretUnavailable
from stowd.pipeline.queue import SqliteQueue
from stowd.pipeline.watch import Watcher
from stowd.pipeline.worker import Worker

SECRET = "Sup3r-s3cret_Zq9~xW"  # grepped for in every output
CLIENT = "stowd"


def stow_json(uids: list[str]) -> bytes:
    items = [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]
    return json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode()


# -- the servers ---------------------------------------------------------------------------------
@dataclass
class Sso:
    """A token endpoint (POST /token) and an archive (POST /dicom-web/studies) in one server."""

    secret: str = SECRET
    life: float | None = 300.0  # expires_in of the tokens issued; None: not sent
    token_status: int = 200  # anything else: an RFC 6749 5.2 error that echoes the secret
    issued: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    revoked: set[str] = field(default_factory=set)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    archive_requests: list[dict[str, Any]] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)  # what the archive says it stored
    lock: threading.Lock = field(default_factory=threading.Lock)

    def token(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        with self.lock:
            self.token_requests.append({"headers": headers, "form": form})
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        if self.token_status != 200:
            # A careless endpoint: its error text echoes the secret it was sent.
            described = f"client {user} with secret {unquote_plus(password)} is unknown"
            return self.token_status, {"error": "invalid_client", "error_description": described}
        if scheme != "Basic" or (unquote_plus(user), unquote_plus(password)) != (
            CLIENT,
            self.secret,
        ):
            return 401, {"error": "invalid_client", "error_description": "bad client"}
        with self.lock:
            value = f"tok-{len(self.issued) + 1}"
            self.issued[value] = time.monotonic() + (self.life or 1e9)
        doc: dict[str, Any] = {"access_token": value, "token_type": "Bearer"}
        if self.life is not None:
            doc["expires_in"] = self.life
        return 200, doc

    def archive(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        authorization = headers.get("authorization", "")
        with self.lock:
            self.archive_requests.append({"authorization": authorization, "body": body})
            token = authorization.removeprefix("Bearer ")
            valid = self.issued.get(token, 0.0) > time.monotonic() and token not in self.revoked
        if not valid:
            return 401, b""
        return 200, stow_json(self.uids)


class Server(LocalServer):
    """A real HTTP(S) server on 127.0.0.1 (``localserver``), started at once, calling
    ``route(method, path, headers, body)``."""

    def __init__(
        self,
        route: Callable[[str, str, dict[str, str], bytes], Reply],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = self.rfile.read(int(headers.get("content-length", "0")))
                status, content_type, content = route("POST", self.path, headers, body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler, tls)
        self.start()

    @property
    def base(self) -> str:
        return self.url

    def close(self) -> None:
        self.stop()


Reply = tuple[int, str, bytes]


def sso_route(sso: Sso) -> Callable[[str, str, dict[str, str], bytes], Reply]:
    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path == "/token":
            status, doc = sso.token(headers, body)
            return status, "application/json", json.dumps(doc).encode()
        status, content = sso.archive(headers, body)
        return status, "application/dicom+json", content

    return route


@pytest.fixture
def sso() -> Iterator[tuple[Sso, Server]]:
    state = Sso()
    server = Server(sso_route(state))
    yield state, server
    server.close()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    asked: list[float] = []
    monkeypatch.setattr(StowClient, "_sleep", lambda self, seconds: asked.append(seconds))
    return asked


def oauth2(token_url: str, secret: Secret | None = None, scope: str = "") -> Auth:
    return Auth(
        "oauth2",
        secret=secret or Secret("inline", SECRET),
        token_url=token_url,
        client_id=CLIENT,
        scope=scope,
    )


def destination(url: str, auth: Auth | None = None, **access: Any) -> Destination:
    return Destination("pacs", url, workers=4, access=Access(auth=auth, **access))


@pytest.fixture
def part(tmp_path: Path) -> Part:
    path = tmp_path / "one.dcm"
    path.write_bytes(b"x" * 5000)  # the client does not read DICOM: any bytes do
    return Part(str(path), 5000, "1.2.3.4")


def oauth_of(client: StowClient) -> OAuth2:
    auth = client.http.auth
    assert isinstance(auth, OAuth2)
    return auth


# -- basic and bearer ------------------------------------------------------------------------------
def mock_client(dest: Destination, seen: list[httpx.Request], status: int = 200) -> StowClient:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(status, content=stow_json(["1.2.3.4"]))

    return StowClient(dest, transport=httpx.MockTransport(handler))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_login_reads_the_password_file_at_every_request(tmp_path: Path, part: Part) -> None:
    pw = tmp_path / "pacs.pw"
    pw.write_text("first\n")
    seen: list[httpx.Request] = []
    auth = Auth("basic", "stowd", Secret("file", str(pw)))
    client = mock_client(destination("http://archive.test/dicom-web", auth), seen)
    try:
        client.store([part])
        pw.write_text("second-password\n")  # fixed without a restart
        client.store([part])
    finally:
        client.close()
    got = [r.headers["Authorization"] for r in seen]
    assert got == [basic("stowd", "first"), basic("stowd", "second-password")]


def test_bearer_token_from_the_environment(monkeypatch: pytest.MonkeyPatch, part: Part) -> None:
    monkeypatch.setenv("PACS_TOKEN", "abc.def-ghi")
    seen: list[httpx.Request] = []
    auth = Auth("bearer", secret=Secret("env", "PACS_TOKEN"))
    client = mock_client(destination("http://archive.test/dicom-web", auth), seen)
    try:
        client.store([part])
    finally:
        client.close()
    assert seen[0].headers["Authorization"] == "Bearer abc.def-ghi"


def test_bearer_token_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: Part
) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "pacs-token").write_text("cred-token\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    seen: list[httpx.Request] = []
    auth = Auth("bearer", secret=Secret("credential", "pacs-token"))
    client = mock_client(destination("http://archive.test/dicom-web", auth), seen)
    try:
        client.store([part])
    finally:
        client.close()
    assert seen[0].headers["Authorization"] == "Bearer cred-token"


def test_a_token_a_header_cannot_carry_holds_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, part: Part
) -> None:
    monkeypatch.setenv("PACS_TOKEN", SECRET + "\r\nX-Evil: 1")
    auth = Auth("bearer", secret=Secret("env", "PACS_TOKEN"))
    client = mock_client(destination("http://archive.test/dicom-web", auth), [])
    try:
        with pytest.raises(DestinationHeld, match="environment variable PACS_TOKEN") as caught:
            client.store([part])
    finally:
        client.close()
    assert SECRET not in str(caught.value)


def test_a_missing_secret_file_holds_the_destination(tmp_path: Path, part: Part) -> None:
    missing = tmp_path / "pacs.pw"
    seen: list[httpx.Request] = []
    auth = Auth("basic", "stowd", Secret("file", str(missing)))
    client = mock_client(destination("http://archive.test/dicom-web", auth), seen)
    try:
        with pytest.raises(DestinationHeld) as caught:
            client.store([part])
    finally:
        client.close()
    assert str(caught.value) == (
        f"cannot log in: file {missing} cannot be read: No such file or directory"
    )
    assert seen == []


def test_wrong_basic_password_holds_with_a_plain_message(part: Part) -> None:
    seen: list[httpx.Request] = []
    auth = Auth("basic", "stowd", Secret("inline", SECRET))
    client = mock_client(destination("http://archive.test/dicom-web", auth), seen, status=401)
    try:
        with pytest.raises(DestinationHeld, match=r"refused the login \(HTTP 401\)") as caught:
            client.store([part])
    finally:
        client.close()
    assert "auth.username (stowd)" in str(caught.value)
    assert len(seen) == 1  # no second try for basic: the same password would fail again


def test_extra_headers_and_user_agent_are_sent(part: Part) -> None:
    seen: list[httpx.Request] = []
    dest = destination("http://archive.test/dicom-web", headers=(("X-Site", "ward3"),))
    client = mock_client(dest, seen)
    try:
        client.store([part])
    finally:
        client.close()
    assert seen[0].headers["X-Site"] == "ward3"
    assert seen[0].headers["User-Agent"].startswith("stowd/")
    assert "Authorization" not in seen[0].headers


# -- OAuth2 --------------------------------------------------------------------------------------
def sso_client(server: Server, sso: Sso, **auth: Any) -> StowClient:
    sso.uids = ["1.2.3.4"]
    return StowClient(
        destination(server.base + "/dicom-web", oauth2(server.base + "/token", **auth))
    )


def test_oauth2_fetches_a_token_with_basic_client_auth_and_sends_it(
    sso: tuple[Sso, Server], part: Part
) -> None:
    state, server = sso
    client = sso_client(server, state, scope="archive write")
    try:
        answer = client.store([part])
    finally:
        client.close()
    assert answer.status == 200
    [request] = state.token_requests
    assert request["form"] == {"grant_type": "client_credentials", "scope": "archive write"}
    assert request["headers"]["authorization"].startswith("Basic ")
    assert "client_secret" not in request["form"]
    assert state.archive_requests[0]["authorization"] == "Bearer tok-1"


def test_oauth2_token_is_cached_across_requests_and_threads(
    sso: tuple[Sso, Server], part: Part
) -> None:
    state, server = sso
    client = sso_client(server, state)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(3):
                client.store([part])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        client.close()
    assert errors == []
    assert len(state.archive_requests) == 18
    assert len(state.token_requests) == 1
    assert {r["authorization"] for r in state.archive_requests} == {"Bearer tok-1"}


@pytest.mark.parametrize(
    ("life", "reused_until"),
    [(1000.0, 800.0), (200.0, 140.0), (30.0, 15.0)],
    ids=["80% of the life", "60 s before the end", "short-lived: at half its life"],
)
def test_oauth2_token_is_refreshed_before_it_expires(
    sso: tuple[Sso, Server], part: Part, life: float, reused_until: float
) -> None:
    state, server = sso
    state.life = life
    client = sso_client(server, state)
    clock = Clock(1000.0)
    oauth_of(client).clock = clock
    try:
        client.store([part])
        if reused_until:
            clock.now += reused_until - 1
            client.store([part])
            assert len(state.token_requests) == 1
        clock.now = 1000.0 + reused_until
        client.store([part])
    finally:
        client.close()
    assert len(state.token_requests) == 2
    assert state.archive_requests[-1]["authorization"] == "Bearer tok-2"
    assert len(state.archive_requests) == (3 if reused_until else 2)


def test_a_real_run_longer_than_a_token_life_sends_everything(
    sso: tuple[Sso, Server], part: Part
) -> None:
    state, server = sso
    state.life = 0.3  # the archive refuses each token after 0.3 s
    client = sso_client(server, state)
    try:
        for _ in range(4):
            client.store([part])
            time.sleep(0.2)
    finally:
        client.close()
    assert all(r["authorization"].startswith("Bearer tok-") for r in state.archive_requests)
    assert len(state.archive_requests) == 4  # never refused: fetched again before the end


def test_oauth2_401_fetches_a_new_token_once_and_sends_a_fresh_body(
    sso: tuple[Sso, Server], part: Part
) -> None:
    state, server = sso
    state.life = None  # no expires_in: used until refused
    client = sso_client(server, state)
    try:
        client.store([part])
        state.revoked.add("tok-1")  # e.g. the SSO restarted
        answer = client.store([part])
    finally:
        client.close()
    assert answer.status == 200
    assert [r["authorization"] for r in state.archive_requests] == [
        "Bearer tok-1",
        "Bearer tok-1",
        "Bearer tok-2",
    ]
    retried, again = state.archive_requests[1]["body"], state.archive_requests[2]["body"]
    assert len(retried) == len(again) > part.size  # the whole body both times
    assert retried.split(b"\r\n", 1)[0] != again.split(b"\r\n", 1)[0]  # a fresh boundary


def test_oauth2_second_401_holds_the_destination(sso: tuple[Sso, Server], part: Part) -> None:
    state, server = sso
    client = sso_client(server, state)
    state.issued.clear()
    original = state.token

    def refused_tokens(headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        status, doc = original(headers, body)
        state.revoked.add(doc.get("access_token", ""))  # the archive refuses every token
        return status, doc

    state.token = refused_tokens  # type: ignore[method-assign]
    try:
        with pytest.raises(DestinationHeld, match=r"refused the login \(HTTP 401\)") as caught:
            client.store([part])
    finally:
        client.close()
    assert caught.value.status == 401
    assert len(state.token_requests) == 2
    assert len(state.archive_requests) == 2


def test_token_endpoint_refusal_holds_with_its_error_but_not_the_secret(
    sso: tuple[Sso, Server], part: Part
) -> None:
    state, server = sso
    state.token_status = 401
    client = sso_client(server, state)
    try:
        with pytest.raises(DestinationHeld) as caught:
            client.store([part])
    finally:
        client.close()
    text = str(caught.value)
    assert "refused our client (HTTP 401: invalid_client: client stowd with secret *** is" in text
    assert SECRET not in text
    assert state.archive_requests == []


def test_token_endpoint_503_is_busy(sso: tuple[Sso, Server], part: Part) -> None:
    state, server = sso
    state.token_status = 503
    client = sso_client(server, state)
    try:
        with pytest.raises(DestinationBusy, match=r"token endpoint .* \(HTTP 503\)"):
            client.store([part])
    finally:
        client.close()


def test_unreachable_token_endpoint_is_busy(
    sso: tuple[Sso, Server], part: Part, sleeps: list[float]
) -> None:
    state, server = sso
    dest = destination(server.base + "/dicom-web", oauth2("http://127.0.0.1:9/token"))
    client = StowClient(dest)
    try:
        with pytest.raises(DestinationBusy, match=r"token endpoint http://127\.0\.0\.1:9/token"):
            client.store([part])
    finally:
        client.close()
    assert sleeps == [1.0, 2.0]  # retried in-process like any connection failure
    assert state.archive_requests == []


def test_a_changed_client_secret_file_is_used_without_restart(
    sso: tuple[Sso, Server], part: Part, tmp_path: Path
) -> None:
    state, server = sso
    secret_file = tmp_path / "client.secret"
    secret_file.write_text("old-secret\n")
    client = sso_client(server, state, secret=Secret("file", str(secret_file)))
    try:
        with pytest.raises(DestinationHeld, match="invalid_client"):
            client.store([part])
        secret_file.write_text(SECRET + "\n")
        assert client.store([part]).status == 200
    finally:
        client.close()


# -- the proxy and the environment ---------------------------------------------------------------
@pytest.fixture
def proxy() -> Iterator[tuple[list[str], Server]]:
    """A forward proxy that answers itself and records the absolute URLs it was asked for."""
    asked: list[str] = []

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        asked.append(path)
        return 200, "application/dicom+json", stow_json(["1.2.3.4"])

    server = Server(route)
    yield asked, server
    server.close()


@pytest.fixture
def archive() -> Iterator[tuple[list[str], Server]]:
    asked: list[str] = []

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        asked.append(path)
        return 200, "application/dicom+json", stow_json(["1.2.3.4"])

    server = Server(route)
    yield asked, server
    server.close()


def test_the_proxy_setting_is_used(
    proxy: tuple[list[str], Server], part: Part, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked, server = proxy
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = StowClient(destination("http://archive.invalid/dicom-web", proxy=server.base))
    try:
        client.store([part])
    finally:
        client.close()
    assert asked == ["http://archive.invalid/dicom-web/studies"]


@pytest.mark.parametrize("trust_env", [False, True])
def test_environment_proxies_only_with_trust_env(
    proxy: tuple[list[str], Server],
    archive: tuple[list[str], Server],
    part: Part,
    monkeypatch: pytest.MonkeyPatch,
    trust_env: bool,
) -> None:
    proxied, proxy_server = proxy
    direct, archive_server = archive
    monkeypatch.setenv("HTTP_PROXY", proxy_server.base)
    monkeypatch.setenv("ALL_PROXY", proxy_server.base)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = StowClient(destination(archive_server.base + "/dicom-web", trust_env=trust_env))
    try:
        client.store([part])
    finally:
        client.close()
    assert (len(proxied), len(direct)) == ((1, 0) if trust_env else (0, 1))


def test_trust_env_is_off_by_default() -> None:
    assert Access().trust_env is False
    client = http_client(destination("http://archive.test/dicom-web"))
    try:
        assert client.trust_env is False
    finally:
        client.close()


# -- nothing shows a secret, and a fixed secret releases a held destination ----------------------
class Rig:
    """A drop folder, a real queue, and one worker for a destination that logs in."""

    def __init__(self, tmp_path: Path, dest: Destination) -> None:
        self.now = 2_000_000_000.0
        self.source = drop_source(tmp_path)
        self.source.watch.mkdir()
        dest = Destination(
            "pacs", dest.url, BatchLimits(max_files=10), access=dest.access, workers=1
        )
        self.config = Config(
            tmp_path / "c.yaml",
            tmp_path / "q.db",
            (self.source,),
            {"pacs": dest},
            retry=Retry(hold_probe=60.0, initial=10.0),
        )
        self.queue = SqliteQueue(self.config.queue, clock=self.clock).open()
        self.stop = threading.Event()
        self.client = StowClient(dest, stop=self.stop)
        self.worker = Worker(
            self.config, self.queue, dest, self.client, self.stop, clock=self.clock
        )

    def clock(self) -> float:
        return self.now

    def drop(self, name: str) -> str:
        uid = make_instance(self.source.watch / name)
        Watcher(self.source, "pacs", self.queue.enqueue, clock=lambda: self.now + 60).scan()
        return uid

    def drain(self) -> None:
        for _ in range(20):
            if not self.worker.step():
                return

    def close(self) -> None:
        self.client.close()
        self.queue.close()


def everything_written(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_failures_never_show_the_secret_and_a_fixed_file_releases_the_hold(
    sso: tuple[Sso, Server],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sleeps: list[float],
) -> None:
    caplog.set_level("DEBUG")
    state, server = sso
    secret_file = tmp_path / "secrets" / "client.secret"
    dest = destination(
        server.base + "/dicom-web", oauth2(server.base + "/token", Secret("file", str(secret_file)))
    )
    (tmp_path / "rig").mkdir()
    rig = Rig(tmp_path / "rig", dest)
    reasons: list[str] = []
    try:
        state.uids = [rig.drop("a.dcm")]
        for step in range(4):
            if step == 1:  # a wrong secret
                secret_file.parent.mkdir()
                secret_file.write_text(SECRET + "x\n")
            state.token_status = {2: 401, 3: 503}.get(step, 200)  # 401 echoes the secret
            rig.drain()
            hold = rig.queue.holds()["pacs"]
            reasons.append(hold.reason)
            rig.now = hold.until + 1  # the worker probes again once the hold ends
        secret_file.write_text(SECRET + "\n")  # fixed: sending resumes without a restart
        state.token_status = 200
        rig.drain()
        assert rig.queue.holds() == {}
        assert rig.queue.counts() == {"sent": 1}
    finally:
        rig.close()
    assert "file" in reasons[0] and "cannot be read: No such file or directory" in reasons[0]
    assert "invalid_client" in reasons[1] and "invalid_client" in reasons[2]
    assert "HTTP 503" in reasons[3]
    assert "reachable again" in caplog.text
    written = caplog.text + "\n".join(reasons)
    for secret in (SECRET, SECRET + "x"):
        assert secret not in written
        assert secret.encode() not in everything_written(tmp_path / "rig")


# -- TLS: a local HTTPS archive with certificates made by the openssl CLI ------------------------
LEAF = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
)


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.pem", "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def make_leaf(folder: Path, name: str, ca: str, extra: str, days: str = "2") -> None:
    (folder / f"{name}.ext").write_text(LEAF + extra)
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.csr", "-subj", f"/CN={name}",
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", folder / f"{name}.csr", "-CA", folder / f"{ca}.pem",
        "-CAkey", folder / f"{ca}.key", "-CAcreateserial", "-out", folder / f"{name}.pem",
        "-days", days, "-extfile", folder / f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca (ours), rogue (another CA), server certificates and client certificates."""
    folder = tmp_path_factory.mktemp("pki")
    server = "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    client = "extendedKeyUsage=clientAuth\n"
    make_ca(folder, "ca")
    make_ca(folder, "rogue")
    make_leaf(folder, "server", "ca", server)
    make_leaf(folder, "expired", "ca", server, days="-1")  # ended a day before it began
    make_leaf(folder, "other", "ca", "subjectAltName=DNS:other.test\n")
    make_leaf(folder, "client", "ca", client)
    make_leaf(folder, "stranger", "rogue", client)
    return folder


def tls_archive(
    pki: Path, cert: str = "server", client_ca: bool = False, max_version: str = ""
) -> Server:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki / "ca.pem")
    if max_version:
        ctx.maximum_version = ssl.TLSVersion[max_version]

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        return 200, "application/dicom+json", stow_json(["1.2.3.4"])

    return Server(route, tls=ctx)


def send_over_tls(server: Server, part: Part, verify: bool = True, **tls: Any) -> int:
    dest = Destination(
        "pacs",
        server.base + "/dicom-web",
        verify_tls=verify,
        access=Access(tls=Tls(**tls)),
    )
    client = StowClient(dest)
    try:
        return client.store([part]).status
    finally:
        client.close()
        server.close()


def test_tls_with_our_ca_file_works(pki: Path, part: Part) -> None:
    assert send_over_tls(tls_archive(pki), part, ca_file=pki / "ca.pem") == 200


def test_tls_unknown_ca_holds_with_a_plain_message(pki: Path, part: Part) -> None:
    with pytest.raises(DestinationHeld) as caught:
        send_over_tls(tls_archive(pki), part)
    assert str(caught.value).startswith(
        "TLS failure: the archive's certificate is not signed by a trusted CA (set tls.ca_file?)"
    )


def test_tls_host_name_mismatch(pki: Path, part: Part) -> None:
    with pytest.raises(DestinationHeld, match="made out to another host name"):
        send_over_tls(tls_archive(pki, "other"), part, ca_file=pki / "ca.pem")


def test_tls_expired_certificate(pki: Path, part: Part) -> None:
    with pytest.raises(DestinationHeld, match="certificate has expired"):
        send_over_tls(tls_archive(pki, "expired"), part, ca_file=pki / "ca.pem")


def test_tls_verification_off_accepts_any_certificate(pki: Path, part: Part) -> None:
    assert send_over_tls(tls_archive(pki, "other"), part, verify=False) == 200


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_mtls_with_our_client_certificate_works(pki: Path, part: Part, version: str) -> None:
    server = tls_archive(pki, client_ca=True, max_version=version)
    status = send_over_tls(
        server,
        part,
        ca_file=pki / "ca.pem",
        client_cert=pki / "client.pem",
        client_key=pki / "client.key",
    )
    assert status == 200


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_mtls_without_a_client_certificate_holds(
    pki: Path, part: Part, version: str, sleeps: list[float]
) -> None:
    server = tls_archive(pki, client_ca=True, max_version=version)
    with pytest.raises(DestinationHeld, match=r"client certificate\W+set tls.client_cert"):
        send_over_tls(server, part, ca_file=pki / "ca.pem")


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_mtls_with_a_certificate_of_another_ca_holds(
    pki: Path, part: Part, version: str, sleeps: list[float]
) -> None:
    server = tls_archive(pki, client_ca=True, max_version=version)
    with pytest.raises(DestinationHeld, match="refused our client certificate"):
        send_over_tls(
            server,
            part,
            ca_file=pki / "ca.pem",
            client_cert=pki / "stranger.pem",
            client_key=pki / "stranger.key",
        )


def test_minimum_tls_version_is_enforced(pki: Path, part: Part) -> None:
    server = tls_archive(pki, max_version="TLSv1_2")
    with pytest.raises(DestinationHeld, match="share no TLS version"):
        send_over_tls(server, part, ca_file=pki / "ca.pem", min_version="1.3")


def test_a_key_that_does_not_match_holds_instead_of_crashing(pki: Path, part: Part) -> None:
    with pytest.raises(DestinationHeld, match="the TLS files cannot be used"):
        send_over_tls(
            tls_archive(pki),
            part,
            ca_file=pki / "ca.pem",
            client_cert=pki / "client.pem",
            client_key=pki / "stranger.key",
        )


def test_failure_of_gives_check_config_the_same_words(tmp_path: Path) -> None:
    dest = destination("http://archive.test/dicom-web")
    missing = SecretUnavailable(f"file {tmp_path}/pw cannot be read: No such file or directory")
    held = failure_of(missing, dest)
    assert isinstance(held, DestinationHeld)
    assert str(held) == f"cannot log in: {missing}"
    busy = failure_of(httpx.ConnectError("[Errno 111] Connection refused"), dest)
    assert isinstance(busy, DestinationBusy)
    assert str(busy) == "cannot connect: [Errno 111] Connection refused"


def test_a_failed_early_refresh_keeps_using_the_still_valid_token(
    sso: tuple[Sso, Server], part: Part
) -> None:
    state, server = sso
    state.life = 300.0
    client = sso_client(server, state)
    clock = Clock(1000.0)
    oauth_of(client).clock = clock
    try:
        client.store([part])  # tok-1, refreshed from 240 s on, valid until 300 s
        state.token_status = 503  # the login server is down at 2 a.m.
        clock.now += 250
        client.store([part])  # still sent, with the still valid token
        assert state.archive_requests[-1]["authorization"] == "Bearer tok-1"
        clock.now += 60  # now it has expired too: the destination is busy
        with pytest.raises(DestinationBusy) as info:
            client.store([part])
        assert info.value.status is None  # never taken for the archive's own 500
    finally:
        client.close()

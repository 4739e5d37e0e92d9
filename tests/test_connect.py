"""``stowd check-config --connect`` against real local servers.

A plain HTTP server that answers QIDO-RS with 200, 401 or 404 by path, a closed port, TLS
servers with a CA and certificates made by the ``openssl`` CLI in ``tmp_path`` (unknown CA,
then ``ca_file``; a wrong host name; a client certificate required), and a real Orthanc.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import quote_plus

import pytest
from dicomgen import make_instance
from harness import Layout, Stowd, make_layout, make_watch_folders, wait_for
from localserver import LocalServer
from orthanc import Orthanc

from stowd.commands import connect
from stowd.commands import listen as connect_listen
from stowd.commands.cli import main
from stowd.config.access import Access, Auth, Tls
from stowd.config.model import Destination, Timeouts
from stowd.config.secrets import Secret

PASSWORD = "pw-Kq7!zzTop-93"  # must never appear in any output
TOKEN = "tok-Hh3J9wPq"  # the access token our token endpoint issues: never shown either
QUICK = Timeouts(connect=3.0)


# -- servers -----------------------------------------------------------------------------------
@dataclass
class Archive:
    """A local HTTP(S) server: ``/ok`` answers QIDO 200, ``/locked`` 401 unless the basic
    login is right, ``/html`` a 200 web page; anything else 404."""

    server: LocalServer
    scheme: str = "http"
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.server.server_address[1]}{path}"


def _handler(archive_seen: list[tuple[str, dict[str, str]]]) -> type[BaseHTTPRequestHandler]:
    good = "Basic " + base64.b64encode(f"stowd:{PASSWORD}".encode()).decode()
    client = "Basic " + base64.b64encode(f"stowd:{quote_plus(PASSWORD)}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            archive_seen.append((self.path, dict(self.headers)))
            if self.path.startswith("/ok/studies"):
                self._answer(200, b"[]", "application/dicom+json")
            elif self.path.startswith("/locked/studies"):
                ok = self.headers.get("Authorization") == good
                self._answer(200 if ok else 401, b"[]" if ok else b"", "application/dicom+json")
            elif self.path.startswith("/bearer/studies"):
                ok = self.headers.get("Authorization") == f"Bearer {TOKEN}"
                self._answer(200 if ok else 401, b"[]" if ok else b"", "application/dicom+json")
            elif self.path.startswith("/html/studies"):
                self._answer(200, b"<html>Sign in</html>", "text/html")
            else:
                self._answer(404, b"not found", "text/plain")

        def do_POST(self) -> None:  # an OAuth2 token endpoint (client credentials)
            length = int(self.headers.get("Content-Length", "0"))
            form = self.rfile.read(length).decode()
            archive_seen.append((self.path, dict(self.headers)))
            if self.headers.get("Authorization") == client and "client_credentials" in form:
                body = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300}
                self._answer(200, json.dumps(body).encode(), "application/json")
            else:
                body = {"error": "invalid_client", "error_description": "Invalid client secret"}
                self._answer(401, json.dumps(body).encode(), "application/json")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class Servers:
    """Archives started by a test; all stopped after it."""

    def __init__(self) -> None:
        self.started: list[LocalServer] = []

    def start(self, context: ssl.SSLContext | None = None) -> Archive:
        """An archive on a free port; HTTPS with ``context`` (a server-side SSL context)."""
        seen: list[tuple[str, dict[str, str]]] = []
        server = LocalServer(_handler(seen), context)
        server.start()
        self.started.append(server)
        return Archive(server, server.scheme, seen)

    def stop(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def servers() -> Iterator[Servers]:
    found = Servers()
    yield found
    found.stop()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for ``localhost`` and a client certificate, all by openssl."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, *, client_cert_required: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if client_cert_required:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca)
        return ctx


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _issue(name: str, cn: str, extensions: str, folder: Path) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}", cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", ext, "-out", cert, cwd=folder)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=stowd test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    common = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    server = _issue("server", "localhost", common + "subjectAltName=DNS:localhost\n"
                    "extendedKeyUsage=serverAuth\n", folder)  # fmt: skip
    client = _issue("client", "stowd", common + "extendedKeyUsage=clientAuth\n", folder)
    return Pki(folder / "ca.pem", *server, *client)


def _dest(
    url: str, auth: Auth | None = None, tls: Tls | None = None, *, verify_tls: bool = True
) -> Destination:
    access = Access(auth=auth, tls=tls or Tls())
    return Destination("pacs", url, timeouts=QUICK, verify_tls=verify_tls, access=access)


def _lines(report: connect.ConnectReport) -> dict[str, tuple[str, str]]:
    return {s.name: (s.state, s.text) for s in report.steps}


# -- plain HTTP --------------------------------------------------------------------------------
def test_an_archive_that_answers_queries_works(servers: Servers) -> None:
    archive = servers.start()
    report = connect.check(_dest(archive.url("/ok")))
    steps = _lines(report)
    assert report.ok, connect.render([report])
    assert (
        steps["connect"][0] == "ok"
        and f"127.0.0.1:{archive.server.server_address[1]}" in (steps["connect"][1])
    )
    assert steps["TLS"] == ("note", "none: http:// sends everything in clear text")
    assert steps["query"] == (
        "ok",
        "GET /ok/studies?limit=1: HTTP 200, the archive answers DICOMweb queries",
    )
    ((path, headers),) = archive.seen
    assert path == "/ok/studies?limit=1"
    assert headers["Accept"] == "application/dicom+json"


def test_404_says_there_is_no_dicomweb_service(servers: Servers) -> None:
    archive = servers.start()
    report = connect.check(_dest(archive.url("/wrong/path/")))
    assert not report.ok
    state, text = _lines(report)["query"]
    assert state == "FAIL"
    assert text == (
        "GET /wrong/path/studies?limit=1: HTTP 404, no DICOMweb service at this URL (check url)"
    )


def test_a_web_page_is_not_a_dicomweb_answer(servers: Servers) -> None:
    archive = servers.start()
    state, text = _lines(connect.check(_dest(archive.url("/html"))))["query"]
    assert state == "FAIL" and "HTML page" in text


def test_login_refused_and_accepted(servers: Servers, tmp_path: Path) -> None:
    archive = servers.start()
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password\n")
    refused = connect.check(
        _dest(archive.url("/locked"), auth=Auth("basic", "stowd", Secret("file", str(wrong))))
    )
    state, text = _lines(refused)["login"]
    assert state == "FAIL"
    assert text == (
        f"basic as stowd (password from file {wrong}): the archive refused the login "
        "(HTTP 401): wrong or expired credentials?"
    )
    assert _lines(refused)["query"][1].endswith("HTTP 401, login refused")

    wrong.write_text(PASSWORD + "\n")  # fixed in place: read again
    accepted = connect.check(
        _dest(archive.url("/locked"), auth=Auth("basic", "stowd", Secret("file", str(wrong))))
    )
    assert accepted.ok, connect.render([accepted])
    assert _lines(accepted)["login"][1].endswith(": accepted")


def test_oauth2_token_fetched_then_used(servers: Servers, tmp_path: Path) -> None:
    archive = servers.start()
    secret = tmp_path / "client.secret"
    secret.write_text(PASSWORD)

    def oauth2() -> Auth:
        return Auth(
            "oauth2",
            secret=Secret("file", str(secret)),
            token_url=archive.url("/token"),
            client_id="stowd",
        )

    report = connect.check(_dest(archive.url("/bearer"), auth=oauth2()))
    assert report.ok, connect.render([report])
    assert _lines(report)["login"] == (
        "ok",
        f"oauth2 client stowd at {archive.url('/token')} (secret from file {secret}): "
        "the token endpoint answered with a token",
    )
    assert [p for p, _ in archive.seen] == ["/token", "/bearer/studies?limit=1"]

    secret.write_text("wrong")
    refused = connect.check(_dest(archive.url("/bearer"), auth=oauth2()))
    state, text = _lines(refused)["login"]
    assert state == "FAIL"
    assert "refused our client (HTTP 401: invalid_client: Invalid client secret)" in text
    assert _lines(refused)["query"] == ("skip", "not tried")
    assert TOKEN not in connect.render([report, refused])


def test_no_auth_against_a_locked_archive_says_set_auth(servers: Servers) -> None:
    archive = servers.start()
    state, text = _lines(connect.check(_dest(archive.url("/locked"))))["login"]
    assert (state, text) == (
        "FAIL",
        "no auth set: the archive wants a login (HTTP 401): set auth",
    )


def test_an_unreadable_secret_is_a_failed_login_without_a_request(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = servers.start()
    monkeypatch.delenv("STOWD_TEST_NO_SUCH", raising=False)
    report = connect.check(
        _dest(archive.url("/ok"), auth=Auth("bearer", secret=Secret("env", "STOWD_TEST_NO_SUCH")))
    )
    steps = _lines(report)
    assert steps["login"] == (
        "FAIL",
        "the environment variable STOWD_TEST_NO_SUCH is not set or empty",
    )
    assert steps["connect"][0] == "ok" and steps["query"] == ("skip", "not tried")
    assert archive.seen == []


def test_a_closed_port_is_refused(closed_port: int) -> None:
    report = connect.check(_dest(f"http://127.0.0.1:{closed_port}/dicom-web"))
    steps = _lines(report)
    assert steps["connect"][0] == "FAIL"
    assert f"127.0.0.1:{closed_port}" in steps["connect"][1]
    assert "connection refused" in steps["connect"][1]
    assert [steps[n][0] for n in ("TLS", "login", "query")] == ["skip"] * 3


def test_an_unknown_host_name() -> None:
    steps = _lines(connect.check(_dest("http://no-such-host.invalid/dicom-web")))
    assert steps["connect"][0] == "FAIL"
    assert "cannot find the host 'no-such-host.invalid' (DNS)" in steps["connect"][1]


# -- TLS ---------------------------------------------------------------------------------------
def test_an_unknown_ca_then_ca_file(servers: Servers, pki: Pki) -> None:
    archive = servers.start(pki.server_context())
    url = archive.url("/ok", host="localhost")
    unknown = _lines(connect.check(_dest(url)))
    assert unknown["connect"][0] == "ok"
    state, text = unknown["TLS"]
    assert state == "FAIL"
    assert "not signed by a trusted CA" in text and "set tls.ca_file?" in text
    assert [unknown[n][0] for n in ("login", "query")] == ["skip", "skip"]

    known = connect.check(_dest(url, tls=Tls(ca_file=pki.ca)))
    assert known.ok, connect.render([known])
    state, text = _lines(known)["TLS"]
    assert state == "ok"
    assert text.startswith("TLSv1.3; certificate CN=localhost, issued by CN=stowd test CA")
    assert _lines(known)["query"][1].endswith("the archive answers DICOMweb queries")


def test_verify_tls_off_works_and_says_so(servers: Servers, pki: Pki) -> None:
    archive = servers.start(pki.server_context())
    report = connect.check(_dest(archive.url("/ok", host="localhost"), verify_tls=False))
    assert report.ok, connect.render([report])
    assert _lines(report)["TLS"] == ("note", "TLSv1.3; certificate NOT checked (verify_tls: false)")


def test_a_certificate_for_another_host_name(servers: Servers, pki: Pki) -> None:
    archive = servers.start(pki.server_context())
    url = archive.url("/ok", host="127.0.0.1")  # the certificate names only localhost
    state, text = _lines(connect.check(_dest(url, tls=Tls(ca_file=pki.ca))))["TLS"]
    assert state == "FAIL"
    assert "certificate is made out to another host name" in text


def test_a_client_certificate_required_and_given(servers: Servers, pki: Pki) -> None:
    context = pki.server_context(client_cert_required=True)
    archive = servers.start(context)
    url = archive.url("/ok", host="localhost")
    without = _lines(connect.check(_dest(url, tls=Tls(ca_file=pki.ca))))
    state, text = without["TLS"]
    assert state == "FAIL"
    assert "client certificate" in text and "tls.client_cert" in text

    tls = Tls(ca_file=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
    given = connect.check(_dest(url, tls=tls))
    assert given.ok, connect.render([given])


def test_https_to_a_plain_http_port(servers: Servers) -> None:
    archive = servers.start()
    url = archive.url("/ok").replace("http://", "https://")
    state, text = _lines(connect.check(_dest(url)))["TLS"]
    assert state == "FAIL" and "does not speak TLS" in text


# -- the command -------------------------------------------------------------------------------
def _config(tmp_path: Path, destinations: str, first: str = "pacs") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
queue: {tmp_path}/queue.db
sources:
  - {{name: s, watch: {tmp_path}/in, sent: {tmp_path}/sent, failed: {tmp_path}/failed,
      destination: {first}}}
destinations:
{destinations}
"""
    )
    path.chmod(0o600)
    make_watch_folders(path)
    return path


def test_exit_codes_and_no_secret_in_the_output(
    servers: Servers,
    closed_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    archive = servers.start()
    monkeypatch.setenv("STOWD_TEST_PW", PASSWORD)
    good = f"""  good:
    url: {archive.url("/locked")}
    auth: {{type: basic, username: stowd, password: {{env: STOWD_TEST_PW}}}}
    headers: {{X-Site: ward3}}
    timeouts: {{connect: 2s}}
"""
    assert main(["check-config", "-c", str(_config(tmp_path, good, "good")), "--connect"]) == 0
    out, err = capsys.readouterr()
    assert "destination good: " in out and "the archive answers DICOMweb queries" in out
    assert "1 of 1 destination(s) work" in out
    assert archive.seen[-1][1]["X-Site"] == "ward3"  # the daemon's settings applied

    inline = f"""  inline:
    url: {archive.url("/ok")}
    auth: {{type: basic, username: stowd, password: "{PASSWORD}"}}
  down:
    url: http://127.0.0.1:{closed_port}/dicom-web
    auth: {{type: basic, username: stowd, password: "{PASSWORD}"}}
"""
    assert main(["check-config", "-c", str(_config(tmp_path, inline, "inline")), "--connect"]) == 1
    out2, err2 = capsys.readouterr()
    assert "destination inline: " in out2 and "destination down: " in out2
    assert "1 of 2 destination(s) work" in out2
    encoded = base64.b64encode(f"stowd:{PASSWORD}".encode()).decode()
    for text in (out, err, out2, err2):
        assert PASSWORD not in text and encoded not in text and "Authorization" not in text


def test_without_connect_nothing_is_reached(
    servers: Servers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = servers.start()
    config = _config(tmp_path, f"  pacs: {{url: {archive.url('/wrong')}}}\n")
    assert main(["check-config", "-c", str(config)]) == 0
    assert archive.seen == [] and "destination pacs" not in capsys.readouterr().out


def test_a_config_error_is_exit_2_before_anything_is_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "  pacs: {url: http://127.0.0.1:1/x, tls: {min_version: 1.1}}\n")
    assert main(["check-config", "-c", str(config), "--connect"]) == 2
    assert "min_version" in capsys.readouterr().err


def test_a_real_orthanc_answers(
    orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, f"  pacs: {{url: {orthanc.dicomweb_url}}}\n")
    assert main(["check-config", "-c", str(config), "--connect"]) == 0
    out = capsys.readouterr().out
    assert "answers DICOMweb queries" in out, out


@pytest.mark.parametrize("slash", ["", "/"])
def test_orthancs_rest_root_is_named_with_the_url_it_should_be(
    orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str], slash: str
) -> None:
    """Orthanc's REST root answers the query with a bare HTTP 400 (issue 18)."""
    config = _config(tmp_path, f"  pacs: {{url: '{orthanc.url}{slash}'}}\n")

    assert main(["check-config", "-c", str(config), "--connect"]) == 1

    out = capsys.readouterr().out
    assert "GET /studies?limit=1: HTTP 400, not a DICOMweb service: the url should be the " in out
    assert f"for Orthanc {orthanc.url}/dicom-web (its REST API answers at the root)" in out


def test_the_daemon_names_orthancs_rest_root_with_the_url_it_should_be(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """STOW-RS to Orthanc's REST root is answered 405: the destination is held, and the log
    says what the url should be; the file waits (it is not failed)."""
    layout = make_layout(tmp_path / "run", orthanc.url)
    make_instance(layout.drop / "a.dcm")
    hint = f"the url should be the DICOMweb base, for Orthanc {orthanc.url}/dicom-web"
    with Stowd(layout) as daemon:
        wait_for(lambda: hint in daemon.log, 60, "the url hint in the log", lambda: daemon.log)
        assert daemon.terminate() == 0
    assert "web server's root, which does not accept STOW-RS (HTTP 405)" in daemon.log
    assert layout.files(layout.failed) == set()
    assert (layout.drop / "a.dcm").exists()


# -- receiving sources: can each port be bound? -------------------------------------------------
def _receiving(tmp_path: Path, url: str, port: int, bind: str = "127.0.0.1") -> Path:
    path = tmp_path / "receiving.yaml"
    path.write_text(
        f"""
queue: {tmp_path}/state/queue.db
sources:
  - name: ct
    receive: {{ae_title: STOWD, port: {port}, bind: "{bind}"}}
    sent: {tmp_path}/sent
    failed: {tmp_path}/failed
    destination: pacs
destinations:
  pacs: {{url: "{url}"}}
"""
    )
    path.chmod(0o600)
    return path


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            return False
    return True


def test_a_free_receiving_port_can_listen_and_is_released(
    servers: Servers, closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _receiving(tmp_path, servers.start().url("/ok"), closed_port)
    assert main(["check-config", "-c", str(config), "--connect"]) == 0
    out = capsys.readouterr().out
    assert f"receiving source ct: STOWD on 127.0.0.1:{closed_port}: can listen" in out, out
    assert f"ok    listen   127.0.0.1:{closed_port} is free" in out, out
    assert "1 of 1 receiving source(s) can listen" in out
    assert _bindable(closed_port)  # nothing left holding it


def test_a_port_in_use_names_the_program_holding_it(
    servers: Servers, closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _receiving(tmp_path, servers.start().url("/ok"), closed_port)
    with socket.socket() as other:  # another program (this test) listens there first
        other.bind(("127.0.0.1", closed_port))
        other.listen(1)
        assert main(["check-config", "-c", str(config), "--connect"]) == 1
    out = capsys.readouterr().out
    assert f"127.0.0.1:{closed_port}: can NOT listen" in out, out
    assert "is in use by another program (" in out and f"pid {os.getpid()})" in out, out
    assert "0 of 1 receiving source(s) can listen" in out


def test_an_address_that_is_not_on_this_machine(
    servers: Servers, closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _receiving(tmp_path, servers.start().url("/ok"), closed_port, bind="192.0.2.7")
    assert main(["check-config", "-c", str(config), "--connect"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  listen   192.0.2.7: no such address on this machine" in out, out


def test_port_104_without_cap_net_bind_service_says_what_it_needs(
    servers: Servers, tmp_path: Path
) -> None:
    """Run as root with CAP_NET_BIND_SERVICE dropped (setpriv), as a service user would be."""
    from needs import require  # noqa: PLC0415 - tests/support is on the path for tests

    require(None if os.geteuid() == 0 else "dropping one capability with setpriv needs root")
    if connect_listen.privileged_below() <= 104:  # sysctl net.ipv4.ip_unprivileged_port_start
        pytest.skip("on this machine anyone may bind port 104")
    config = _receiving(tmp_path, servers.start().url("/ok"), 104)
    drop = ["setpriv", "--bounding-set", "-net_bind_service", "--inh-caps", "-net_bind_service"]
    command = [sys.executable, "-m", "stowd", "check-config", "-c", str(config), "--connect"]
    done = subprocess.run(drop + command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "port 104 needs root or CAP_NET_BIND_SERVICE" in done.stdout, done.stdout


def test_port_104_as_root_says_the_service_user_needs_the_capability(
    servers: Servers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from needs import require  # noqa: PLC0415 - tests/support is on the path for tests

    require(None if os.geteuid() == 0 else "binding port 104 needs root")
    if not _bindable(104) or connect_listen.privileged_below() <= 104:
        pytest.skip("port 104 is in use on this machine, or anyone may bind it here")
    config = _receiving(tmp_path, servers.start().url("/ok"), 104)
    assert main(["check-config", "-c", str(config), "--connect"]) == 0
    out = capsys.readouterr().out
    assert "note  listen   127.0.0.1:104 is free (bound and released at once), but as root" in out
    assert "needs CAP_NET_BIND_SERVICE for port 104" in out, out


def test_the_running_daemon_holds_its_own_port(
    servers: Servers, closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _receiving(tmp_path, servers.start().url("/ok"), closed_port)
    daemon = Stowd(Layout(tmp_path, config)).start()
    try:
        wait_for(
            lambda: connect_listen.listener_of(closed_port) is not None,
            60,
            f"the daemon to listen on {closed_port}",
            lambda: daemon.log,
        )
        assert main(["check-config", "-c", str(config), "--connect"]) == 0
    finally:
        daemon.stop()
    out = capsys.readouterr().out
    assert daemon.proc is not None
    expected = f"ok    listen   127.0.0.1:{closed_port} is stowd's own: the daemon (pid "
    assert expected + f"{daemon.proc.pid}) on this queue listens there" in out, out

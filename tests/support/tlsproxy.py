"""A real nginx as a TLS reverse proxy in front of a test server, with certificates made here.

``make_pki(folder)`` makes, with the ``openssl`` command line tool, a private CA, a server
certificate for ``127.0.0.1`` and ``localhost`` and a client certificate, all signed by that CA.
``NginxProxy(folder, upstream, pki)`` runs ``/usr/sbin/nginx`` in the foreground (no daemon, no
master process, so it never changes user) with its own prefix, configuration, pid file, logs and
temp folders in *folder*, listening with TLS on a free loopback port and passing every request
to *upstream* (``http://127.0.0.1:PORT``).  With ``client_certs=True`` it requires a client
certificate signed by the CA (``ssl_verify_client on``); nginx then answers a client without one
with HTTP 400 "No required SSL certificate was sent", as a real proxy does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from localserver import ChildProcess, find_program
from orthanc import free_port

NGINX_ENV = "STOWD_TEST_NGINX"
"""Environment variable naming the nginx binary to use instead of the default search."""
_NGINX_CANDIDATES = ("/usr/sbin/nginx",)
_PORT_ATTEMPTS = 5
_DAYS = "2"  # the certificates only live as long as a test run


class ProxyError(RuntimeError):
    """openssl or nginx is missing, failed, or nginx did not start."""


def find_nginx() -> str | None:
    return find_program(NGINX_ENV, _NGINX_CANDIDATES, "nginx")


def tls_missing_reason() -> str | None:
    """Why the TLS proxy cannot run here (nginx or openssl missing), or None if it can."""
    problems = []
    if find_nginx() is None and os.environ.get(NGINX_ENV):
        problems.append(f"{NGINX_ENV}={os.environ[NGINX_ENV]} is not an executable")
    elif find_nginx() is None:
        problems.append(
            "nginx is missing (looked at /usr/sbin/nginx and on PATH; apt-get install nginx)"
        )
    if shutil.which("openssl") is None:
        problems.append("the openssl command is missing (apt-get install openssl)")
    return "; ".join(problems) if problems else None


@dataclass(frozen=True)
class Pki:
    """The files of a test CA with one server and one client certificate (PEM)."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    if done.returncode != 0:
        raise ProxyError(f"openssl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")


def _issue(pki: Pki, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate signed by the CA, with the X.509 v3 *extensions* given."""
    folder = pki.folder
    ext = folder / f"{name}.ext"
    ext.write_text(extensions, encoding="utf-8")
    key, csr, cert = f"{name}.key", f"{name}.csr", f"{name}.pem"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", subject, cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", _DAYS, "-sha256", "-extfile", ext.name,
             "-out", cert, cwd=folder)  # fmt: skip
    (folder / key).chmod(0o600)


def make_pki(folder: str | os.PathLike[str]) -> Pki:
    """A fresh CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    pki = Pki(Path(folder).resolve())
    pki.folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", _DAYS, "-sha256",
             "-subj", "/CN=stowd test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki.folder)  # fmt: skip
    _issue(
        pki,
        "server",
        "/CN=localhost",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    _issue(
        pki,
        "client",
        "/CN=stowd test client",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n",
    )
    return pki


class NginxProxy(ChildProcess):
    """One nginx process (TLS on a free loopback port) passing requests to *upstream*."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        upstream: str,
        pki: Pki,
        *,
        client_certs: bool = False,
        startup_timeout: float = 15.0,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.upstream = upstream.rstrip("/")
        self.pki = pki
        self.client_certs = client_certs
        self.startup_timeout = startup_timeout
        self._port = free_port()
        super().__init__()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``https://127.0.0.1:PORT``: the same paths as the upstream."""
        return f"https://127.0.0.1:{self._port}"

    @property
    def conf_path(self) -> Path:
        return self.folder / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.folder / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        return self.folder / "logs" / "access.log"

    def config(self) -> str:
        f = self.folder
        verify = (
            f"        ssl_client_certificate {self.pki.ca_cert};\n"
            "        ssl_verify_client on;\n"
            "        ssl_verify_depth 2;\n"
            if self.client_certs
            else ""
        )
        temps = "\n".join(
            f"    {kind}_temp_path {f / 'temp' / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {f / "nginx.pid"};
error_log {self.error_log} info;
events {{
    worker_connections 256;
}}
http {{
    access_log {self.access_log};
{temps}
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{self._port} ssl;
        server_name localhost 127.0.0.1;
        ssl_certificate {self.pki.server_cert};
        ssl_certificate_key {self.pki.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
{verify}        location / {{
            proxy_pass {self.upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""

    def start(self) -> None:
        """Start nginx and wait until its port accepts connections (another port if taken)."""
        if self.is_running():
            return
        binary = find_nginx()
        if binary is None:
            raise ProxyError(tls_missing_reason() or "nginx not found")
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._start_once(binary)
                return
            except ProxyError as exc:
                if "Address already in use" not in str(exc) or attempt == _PORT_ATTEMPTS - 1:
                    raise
                self._port = free_port()

    def _start_once(self, binary: str) -> None:
        for sub in ("logs", "temp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config(), encoding="utf-8")
        self._log = (self.folder / "logs" / "nginx.out").open("ab")
        command = [binary, "-p", str(self.folder), "-c", str(self.conf_path)]
        command += ["-e", str(self.error_log)]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                self._reap()
                raise ProxyError(f"nginx exited with status {code}:\n{self.log_tail()}")
            if _accepts("127.0.0.1", self._port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ProxyError(f"nginx did not listen on {self._port}:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in (self.folder / "logs" / "nginx.out", self.error_log):
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(texts) or "(no log)"

    def access_statuses(self) -> list[int]:
        """The HTTP status of every request in the access log (combined format), in order."""
        if not self.access_log.exists():
            return []
        statuses = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            after = line.split('"', 2)[-1].split()
            if after and after[0].isdigit():
                statuses.append(int(after[0]))
        return statuses


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False

"""Reading ``http:`` (the status page's listener) and ``metrics.listen`` into ``model.Http``
and ``model.Metrics``.

``http.listen`` serves the status page, ``/api/status`` and ``/metrics``.  ``metrics.listen``
is the older key: alone it serves the metrics as before (on every path, without a login).
Given with ``http.listen``, it must name the same address (one listener then serves both);
a different address is refused, since one listener has one login and a second one without
it would serve the same metrics to anyone.

A listener that other hosts can reach (an address that is not loopback, or a host name)
needs ``http.auth`` (``user`` and ``password``, or ``token``, each a secret as
``secrets.py`` reads them) unless ``http.insecure: true`` says it may be open.
"""

from __future__ import annotations

import ipaddress

from stowd.config.model import DEFAULT_HTTP_INSECURE, Http, HttpAuth, Metrics
from stowd.config.secrets import Secret, parse
from stowd.config.yamlwalk import Section, as_bool, as_text, host_port

HTTP_KEYS = ("listen", "auth", "insecure")
AUTH_KEYS = ("user", "password", "token")
METRICS_KEYS = ("listen",)


def read_http(top: Section) -> tuple[Http | None, Metrics | None]:
    """The ``http`` and ``metrics`` sections of the top level (None: off)."""
    metrics_section = top.section("metrics", METRICS_KEYS)
    metrics_listen = metrics_section.get("listen", None, as_listen)
    http = _read_http(top.section("http", HTTP_KEYS))
    metrics = None if metrics_listen is None else Metrics(*metrics_listen)
    if http is None or metrics is None:
        return http, metrics
    if (metrics.host, metrics.port) != (http.host, http.port):
        metrics_section.add(
            "listen",
            f"{host_port(metrics.host, metrics.port)} differs from http.listen "
            f"{host_port(http.host, http.port)}: http.listen serves /metrics too (behind its "
            "login); remove metrics.listen, or give it the same address",
        )
    return http, None  # one listener serves both


def _read_http(sec: Section) -> Http | None:
    listen = sec.get("listen", None, as_listen)
    auth = _read_auth(sec.section("auth", AUTH_KEYS))
    insecure = sec.get("insecure", DEFAULT_HTTP_INSECURE, as_bool)
    if listen is None:
        if sec.entries and not sec.broken:
            sec.missing("listen")
        return None
    host, port = listen
    if auth is None and not insecure and not is_loopback(host):
        sec.add(
            "listen",
            f"{host_port(host, port)} can be reached from other hosts and no login is set: "
            "set http.auth (user and password, or token), or http.insecure: true to serve "
            "the status page to anyone who can reach it",
        )
    return Http(host, port, auth, insecure)


def _read_auth(sec: Section) -> HttpAuth | None:
    if not sec.entries:
        return None
    user = sec.get("user", None, as_text)
    password = sec.get("password", None, parse)
    token = sec.get("token", None, parse)
    if (user is None) != (password is None):
        sec.add("user" if user is None else "password", "basic login needs user and password")
        return None
    if password is None and token is None:
        sec.add("token", "expected user and password (basic login), or token (bearer)")
        return None
    return HttpAuth(user, password, token)


def secrets_of(auth: HttpAuth | None) -> list[Secret]:
    """The secrets a login uses (for the warning about inline secrets)."""
    if auth is None:
        return []
    return [s for s in (auth.password, auth.token) if s is not None]


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to any address


def as_listen(value: object) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) to serve on."""
    if isinstance(value, int):
        raise ValueError(f"expected host:port such as 127.0.0.1:{value}, got {value}")
    text = as_text(value)
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port such as 127.0.0.1:9464, got {text!r}")
    return host, int(port)

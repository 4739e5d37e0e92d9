"""How stowd reaches a destination: login (auth), TLS, extra headers and proxy settings.

Read from a destination's config section once, into frozen objects; ``load.py`` calls
``read_access``.  Secrets stay ``Secret`` references (see ``secrets.py``) until a request
needs them.

    auth: {type: basic, username: stowd, password: {file: /etc/stowd/pacs.pw}}
    auth: {type: bearer, token: {env: PACS_TOKEN}}
    auth: {type: oauth2, token_url: https://sso/token, client_id: stowd,
           client_secret: {credential: sso-secret}, scope: "archive"}
    auth: {type: google, key: {file: /etc/stowd/google-key.json}}      # stowd[google]
    auth: {type: aws, region: eu-west-1}     # stowd[aws]; or access_key_id + secret_access_key
    tls: {ca_file: /etc/stowd/ca.pem, client_cert: ..., client_key: ..., min_version: "1.2"}
    headers: {X-Site: ward3}
    proxy: http://proxy.hospital:3128
    trust_env: false      # true: also use HTTP(S)_PROXY / NO_PROXY from the environment
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from stowd.config.secrets import Secret, parse
from stowd.config.yamlwalk import (
    Context,
    Section,
    as_bool,
    as_path,
    as_text,
    as_url,
    describe_value,
)

AUTH_TYPES = ("basic", "bearer", "oauth2", "google", "aws")
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"  # the Healthcare API's own
# auth types that need an optional extra: (a module it brings, the extra's name)
EXTRAS = {"google": ("google.oauth2.service_account", "google"), "aws": ("botocore.auth", "aws")}
TLS_VERSIONS = ("1.2", "1.3")
ACCESS_KEYS = ("auth", "tls", "headers", "proxy", "trust_env")
_AUTH_KEYS = {
    "basic": ("type", "username", "password"),
    "bearer": ("type", "token"),
    "oauth2": ("type", "token_url", "client_id", "client_secret", "scope"),
    "google": ("type", "key", "scope"),
    "aws": ("type", "region", "access_key_id", "secret_access_key", "session_token"),
}
_TLS_KEYS = ("ca_file", "client_cert", "client_key", "min_version")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_VALUE = re.compile(r"[\x20-\x7e\t]*")  # what an HTTP header value may hold here
_RESERVED = {"content-type", "content-length", "transfer-encoding", "host", "accept"}
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+){1,3}")  # us-east-1, eu-central-2, us-gov-west-1


@dataclass(frozen=True)
class Auth:
    """A login: ``basic`` (username, secret), ``bearer`` (secret), ``oauth2``, ``google``
    (secret: the service account's key) or ``aws`` (region; secret: the secret access key,
    None for the standard credential chain)."""

    type: str
    username: str = ""
    secret: Secret | None = None  # password, token, client secret, key or secret access key
    token_url: str = ""
    client_id: str = ""  # oauth2: the client id; aws: the access key id
    scope: str = ""
    region: str = ""
    session_token: Secret | None = None  # aws: a temporary credential's session token


@dataclass(frozen=True)
class Tls:
    """Certificate checks beyond the system's CAs, and our own client certificate."""

    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    min_version: str = "1.2"


@dataclass(frozen=True)
class Access:
    """Everything about reaching one destination besides its URL."""

    auth: Auth | None = None
    tls: Tls = field(default_factory=Tls)
    headers: tuple[tuple[str, str], ...] = ()
    proxy: str | None = None
    trust_env: bool = False

    @property
    def secrets(self) -> tuple[Secret, ...]:
        if self.auth is None:
            return ()
        return tuple(s for s in (self.auth.secret, self.auth.session_token) if s is not None)


def read_access(sec: Section) -> Access:
    """The access settings of a destination section (problems go to its context)."""
    auth = _read_auth(sec)
    return Access(
        auth=auth,
        tls=_read_tls(sec),
        headers=sec.get("headers", (), _as_headers(auth is not None)),
        proxy=sec.get("proxy", None, as_url),
        trust_env=sec.get("trust_env", False, as_bool),
    )


def _read_auth(sec: Section) -> Auth | None:
    node = sec.value_node("auth")
    if node is None:
        return None
    if not isinstance(node, MappingNode):  # never quoted: it may be a password or token
        sec.add(
            "auth",
            "expected a mapping such as {type: basic, username: NAME, password: ...}, "
            f"got {_kind(node)}",
        )
        return None
    key = f"{sec.key}.auth"
    peek = Section(Context(sec.ctx.base), key, node, ("type", *_all_auth_keys()))
    wanted = peek.get("type", None, _as_choice(AUTH_TYPES))
    if wanted is None:  # report the type's problem once, with the real context
        Section(sec.ctx, key, node, ("type", *_all_auth_keys())).need(
            "type", _as_choice(AUTH_TYPES)
        )
        return None
    return _read_typed(Section(sec.ctx, key, node, _AUTH_KEYS[wanted], _hints(wanted)), wanted)


def _read_typed(auth: Section, wanted: str) -> Auth | None:
    if wanted in EXTRAS:  # every problem of the section, and the missing library too
        found = _read_google(auth) if wanted == "google" else _read_aws(auth)
        return found if _extra_installed(auth, wanted) else None
    if wanted == "basic":
        username, secret = auth.need("username", as_text), auth.need("password", _secret(auth))
        return None if username is None or secret is None else Auth("basic", username, secret)
    if wanted == "bearer":
        token = auth.need("token", _secret(auth))
        return None if token is None else Auth("bearer", secret=token)
    return _read_oauth2(auth)


def _read_oauth2(auth: Section) -> Auth | None:
    url = auth.need("token_url", as_url)
    client = auth.need("client_id", as_text)
    secret = auth.need("client_secret", _secret(auth))
    scope = auth.get("scope", "", as_text)
    if url is None or client is None or secret is None:
        return None
    return Auth("oauth2", secret=secret, token_url=url, client_id=client, scope=scope)


def _extra_installed(auth: Section, kind: str) -> bool:
    """Whether the library of auth type ``kind`` can be imported (a problem if not)."""
    if kind not in EXTRAS:
        return True
    module, extra = EXTRAS[kind]
    try:
        importlib.import_module(module)
    except ImportError:
        auth.add(
            "type",
            f"auth type {kind} needs the optional extra stowd[{extra}], which is not "
            f"installed: pip install 'stowd[{extra}]' (into the environment stowd runs from)",
        )
        return False
    return True


def _read_google(auth: Section) -> Auth | None:
    key = auth.need("key", _key_reference(auth))
    scope = auth.get("scope", GOOGLE_SCOPE, as_text)
    return None if key is None else Auth("google", secret=key, scope=scope)


def _key_reference(sec: Section) -> Callable[[object], Secret]:
    """A key file as a secret reference, never the key itself in the config."""
    convert = _secret(sec)

    def reference(value: object) -> Secret:
        if isinstance(value, str):
            raise ValueError(
                "expected where the service account's JSON key is: {file: /path/key.json}, "
                "{credential: NAME} or {env: VARIABLE}, not text"
            )
        return convert(value)

    return reference


def _read_aws(auth: Section) -> Auth | None:
    region = auth.need("region", _as_region)
    key_id = auth.get("access_key_id", "", as_text)
    secret = auth.get("secret_access_key", None, _secret(auth))
    token = auth.get("session_token", None, _secret(auth))
    if bool(key_id) != (secret is not None):
        auth.add(
            "access_key_id" if not key_id else "secret_access_key",
            "set both access_key_id and secret_access_key, or neither (then the standard "
            "AWS credential chain is used: environment, ~/.aws of the user stowd, role)",
        )
        return None
    if token is not None and secret is None:
        auth.add("session_token", "session_token needs access_key_id and secret_access_key")
        return None
    if region is None:
        return None
    return Auth("aws", secret=secret, client_id=key_id, region=region, session_token=token)


def _as_region(value: object) -> str:
    text = str(value)
    if not _REGION.fullmatch(text):
        raise ValueError(f"expected an AWS region such as us-east-1, got {describe_value(value)}")
    return text


def _secret(sec: Section) -> Callable[[object], Secret]:
    """A secret; a relative ``{file: ...}`` path is relative to the config's folder."""

    def convert(value: object) -> Secret:
        secret = parse(value)
        if secret.kind == "file" and not Path(secret.ref).is_absolute():
            return Secret("file", str(sec.ctx.base / secret.ref))
        return secret

    return convert


def _kind(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    return "text" if isinstance(node, ScalarNode) and node.value else "nothing"


def _all_auth_keys() -> tuple[str, ...]:
    return tuple(sorted({k for keys in _AUTH_KEYS.values() for k in keys} - {"type"}))


def _hints(kind: str) -> dict[str, str]:
    other = {k for keys in _AUTH_KEYS.values() for k in keys} - set(_AUTH_KEYS[kind])
    return {k: f"{k!r} does not belong to auth type {kind}" for k in other}


def _as_choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {describe_value(value)}")
        return str(value)

    return convert


def _read_tls(sec: Section) -> Tls:
    tls = sec.section("tls", _TLS_KEYS)
    to_file = _existing_file(as_path(sec.ctx.base))
    found = Tls(
        ca_file=tls.get("ca_file", None, to_file),
        client_cert=tls.get("client_cert", None, to_file),
        client_key=tls.get("client_key", None, to_file),
        min_version=tls.get("min_version", "1.2", _as_tls_version),
    )
    if found.client_key is not None and found.client_cert is None:
        tls.add("client_key", "client_key needs client_cert (the certificate that goes with it)")
    return found


def _existing_file(to_path: Callable[[object], Path]) -> Callable[[object], Path]:
    def convert(value: object) -> Path:
        path = to_path(value)
        if not path.is_file():
            raise ValueError(f"{path} does not exist or is not a file")
        return path

    return convert


def _as_tls_version(value: object) -> str:
    text = str(value)
    if text not in TLS_VERSIONS:
        raise ValueError(f'expected "1.2" or "1.3" (quoted), got {describe_value(value)}')
    return text


def _as_headers(has_auth: bool) -> Callable[[object], tuple[tuple[str, str], ...]]:
    def convert(value: object) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):  # never quoted: it may hold a token
            raise ValueError(
                "expected a mapping of header names to values such as {X-Site: ward3}, "
                f"got {type(value).__name__}"
            )
        headers = []
        for name, text in value.items():
            _check_header(str(name), text, has_auth)
            headers.append((str(name), str(text)))
        return tuple(headers)

    return convert


def _check_header(name: str, text: object, has_auth: bool) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid HTTP header name")
    if name.lower() in _RESERVED:
        raise ValueError(f"{name} is set by stowd itself and cannot be changed")
    if name.lower() == "authorization" and has_auth:
        raise ValueError("Authorization comes from auth: set one or the other")
    if not isinstance(text, str | int | float) or not _VALUE.fullmatch(str(text)):
        raise ValueError(
            f"the value of {name} must be one line of visible ASCII text (no control or "
            "non-ASCII characters)"
        )

"""The cloud logins: a Google service account (``auth.type: google``, google-auth) and AWS
SigV4 (``auth.type: aws``, botocore's signer), each against a local stand-in that checks what
it gets independently of the library that made it (``cloudservers.py``): the JWT assertion's
RSA signature with the public key, the SigV4 signature recomputed from the request as
received.  The daemon runs against a real Orthanc behind them.

Without the extras these tests are skipped, except under ``CI=true``, where a missing extra
is a failure (``.ci/run`` installs them).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudservers import (
    EMPTY_SHA256,
    STREAMING,
    JwtTokenServer,
    SigV4Proxy,
    canonical_request,
    signature,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import Clock, Layout, Stowd, make_layout, run_cli, wait_for
from localserver import LocalServer
from oauthserver import BearerProxy, _Handler
from orthanc import Orthanc
from test_access_daemon import drop, every_output, hold_reason, wait_held, wait_sent

from stowd.config.access import GOOGLE_SCOPE, Access, Auth
from stowd.config.model import Destination
from stowd.config.secrets import Secret
from stowd.dicomweb.stow import StowClient
from stowd.dicomweb.stowbody import Part
from stowd.errors import DestinationBusy, DestinationHeld

EMAIL = "stowd-uploader@ward3-imaging.iam.gserviceaccount.com"
KEY_ID = "AKIDSTOWDTEST0000001"
REGION = "eu-west-1"
UID = "1.2.3.4"
TIMEOUT = 30


def require_extra(module: str, extra: str) -> None:
    """Skip without the optional extra; under ``CI=true`` fail instead (CI installs it)."""
    try:
        importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but stowd[{extra}] is not installed", pytrace=False)
        pytest.skip(f"stowd[{extra}] is not installed")


@pytest.fixture
def google() -> None:
    require_extra("google.oauth2.service_account", "google")


@pytest.fixture
def aws() -> None:
    require_extra("botocore.auth", "aws")


# -- helpers -----------------------------------------------------------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_key(path: Path, key: rsa.RSAPrivateKey, token_uri: str) -> str:
    """A service account key file as the Google Cloud console makes it; its PEM text."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    doc = {
        "type": "service_account",
        "project_id": "ward3-imaging",
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": EMAIL,
        "client_id": "112233445566778899",
        "token_uri": token_uri,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    path.chmod(0o600)
    return pem


def key_lines(pem: str) -> set[str]:
    """Pieces of a private key that must never show anywhere."""
    return {line for line in pem.splitlines() if len(line) > 40}


class StubArchive(LocalServer):
    """Answers every STOW-RS request: instance ``UID`` stored (PS3.18 10.5.3, JSON)."""

    def __init__(self) -> None:
        super().__init__(_StubHandler)


class _StubHandler(_Handler):
    def do_POST(self) -> None:  # noqa: N802 (http.server names)
        self.read_body()
        item = {"00081155": {"vr": "UI", "Value": [UID]}}
        doc = {"00081199": {"vr": "SQ", "Value": [item]}}
        self.answer(200, json.dumps(doc).encode(), "application/dicom+json")


@pytest.fixture
def stub() -> Iterator[StubArchive]:
    with StubArchive() as server:
        yield server


@pytest.fixture
def part(tmp_path: Path) -> Part:
    path = tmp_path / "one.dcm"
    path.write_bytes(b"x" * 5000)  # the client does not read DICOM: any bytes do
    return Part(str(path), 5000, UID)


def client(url: str, auth: Auth) -> StowClient:
    return StowClient(Destination("pacs", url, workers=2, access=Access(auth=auth)))


def google_auth(key_file: Path) -> Auth:
    return Auth("google", secret=Secret("file", str(key_file)), scope=GOOGLE_SCOPE)


def aws_auth(secret_file: Path | None, token: Path | None = None) -> Auth:
    if secret_file is None:
        return Auth("aws", region=REGION)
    session = None if token is None else Secret("file", str(token))
    secret = Secret("file", str(secret_file))
    return Auth("aws", secret=secret, client_id=KEY_ID, region=REGION, session_token=session)


def write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def layout_for(root: Path, url: str, auth: dict[str, Any]) -> Layout:
    dest = {"url": url, "workers": 2, "timeouts": {"read": "30s"}, "auth": auth}
    return make_layout(root, url, destinations={"pacs": dest})


# -- Google: the client ------------------------------------------------------------------------


def test_google_token_from_a_generated_key_is_checked_and_sent(
    google: None, tmp_path: Path, stub: StubArchive, part: Part
) -> None:
    key = rsa_key()
    with JwtTokenServer(EMAIL, key.public_key(), scope=GOOGLE_SCOPE) as tokens:
        write_key(tmp_path / "key.json", key, tokens.token_url)
        with BearerProxy(stub.url, tokens) as proxy:
            sender = client(f"{proxy.url}/dicom-web", google_auth(tmp_path / "key.json"))
            try:
                answers = [sender.store([part]) for _ in range(3)]
            finally:
                sender.close()
            history = proxy.history()
    assert all(a.status == 200 for a in answers)
    assert tokens.accepted_requests() == 1, tokens.refusals  # one token, cached
    assert [e.token for e in history] == ["valid"] * 3


def test_google_key_of_another_account_holds_with_the_endpoints_reason(
    google: None, tmp_path: Path, stub: StubArchive, part: Part
) -> None:
    with JwtTokenServer(EMAIL, rsa_key().public_key(), scope=GOOGLE_SCOPE) as tokens:
        pem = write_key(tmp_path / "key.json", rsa_key(), tokens.token_url)  # not its key
        with BearerProxy(stub.url, tokens) as proxy:
            sender = client(f"{proxy.url}/dicom-web", google_auth(tmp_path / "key.json"))
            try:
                with pytest.raises(DestinationHeld) as held:
                    sender.store([part])
            finally:
                sender.close()
            history = proxy.history()
    text = str(held.value)
    assert "refused our client (HTTP 400: invalid_grant: Invalid JWT Signature.)" in text
    assert "auth.key" in text and tokens.token_url in text
    assert history == []  # nothing reached the archive
    assert not any(line in text for line in key_lines(pem))


def test_google_token_is_renewed_at_80_percent_of_its_life(google: None, tmp_path: Path) -> None:
    from stowd.dicomweb.googleauth import GoogleServiceAccount  # noqa: PLC0415 (an optional extra)

    key, clock = rsa_key(), Clock()
    with JwtTokenServer(EMAIL, key.public_key(), scope=GOOGLE_SCOPE, lifetime=3600) as tokens:
        write_key(tmp_path / "key.json", key, tokens.token_url)
        login = GoogleServiceAccount(google_auth(tmp_path / "key.json"), clock=clock)
        with httpx.Client() as http:
            login.bind(http)
            first = login.token()
            clock.now += 2800  # before 80 % of the hour (2880 s): the same token
            again = login.token()
            clock.now += 100  # past it, well before the end: a new one
            second = login.token()
    assert again == first != second
    assert tokens.accepted_requests() == 2 and tokens.state(second) == "valid"


def test_google_token_endpoint_unreachable_is_busy_not_held(
    google: None, tmp_path: Path, part: Part
) -> None:
    write_key(tmp_path / "key.json", rsa_key(), "http://127.0.0.1:9/token")  # nothing listens
    sender = client("http://127.0.0.1:9/dicom-web", google_auth(tmp_path / "key.json"))
    try:
        with pytest.raises(DestinationBusy) as busy:
            sender.store([part])
    finally:
        sender.close()
    assert "the token endpoint http://127.0.0.1:9/token cannot be reached" in str(busy.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not json {", "is not a service account key (a JSON object)"),
        ('{"type": "authorized_user"}', '"type" is not "service_account"'),
        ('{"type": "service_account", "client_email": "a@b"}', "lacks private_key, token_uri"),
    ],
)
def test_google_unusable_key_holds_saying_what_is_wrong(
    google: None, tmp_path: Path, part: Part, content: str, words: str
) -> None:
    key_file = write_secret(tmp_path / "key.json", content)
    sender = client("http://127.0.0.1:9/dicom-web", google_auth(key_file))
    try:
        with pytest.raises(DestinationHeld) as held:
            sender.store([part])
    finally:
        sender.close()
    assert words in str(held.value) and f"file {key_file}" in str(held.value)


def test_google_private_key_that_cannot_be_read_is_not_quoted(
    google: None, tmp_path: Path, part: Part
) -> None:
    broken = (
        "-----BEGIN PRIVATE KEY-----\nTUlJRXZnSUJBREFOQmdrcWhraUc5dzBCQVFFRkFB\n"
        "-----END PRIVATE KEY-----\n"
    )
    doc = {
        "type": "service_account",
        "client_email": EMAIL,
        "private_key": broken,
        "token_uri": "http://127.0.0.1:9/token",
    }
    key_file = write_secret(tmp_path / "key.json", json.dumps(doc))
    sender = client("http://127.0.0.1:9/dicom-web", google_auth(key_file))
    try:
        with pytest.raises(DestinationHeld) as held:
            sender.store([part])
    finally:
        sender.close()
    assert "private_key that cannot be read" in str(held.value)
    assert "TUlJRXZn" not in str(held.value)


# -- Google: the daemon ------------------------------------------------------------------------


def test_google_daemon_renews_its_token_and_after_a_401_and_sends_everything(
    google: None, tmp_path: Path, orthanc: Orthanc
) -> None:
    key = rsa_key()
    with (
        JwtTokenServer(EMAIL, key.public_key(), scope=GOOGLE_SCOPE, lifetime=3) as tokens,
        BearerProxy(orthanc.url, tokens) as proxy,
    ):
        pem = write_key(tmp_path / "secrets" / "key.json", key, tokens.token_url)
        auth = {"type": "google", "key": {"file": str(tmp_path / "secrets" / "key.json")}}
        layout = layout_for(tmp_path / "run", f"{proxy.url}/dicom-web", auth)
        uids: dict[str, str] = {}
        with Stowd(layout) as daemon:
            uids |= drop(layout, ["a1.dcm", "a2.dcm"])
            wait_sent(layout, {"a1.dcm", "a2.dcm"}, daemon)
            first = tokens.accepted_requests()
            # the 3 s token is over: the next upload needs a new one (an hour long from now)
            wait_for(lambda: tokens.state(tokens.issued[-1]) == "expired", TIMEOUT, "expiry")
            tokens.lifetime = 3600
            uids |= drop(layout, ["b1.dcm"])
            wait_sent(layout, {"b1.dcm"}, daemon)
            renewed = tokens.accepted_requests()
            tokens.revoke_all()  # the archive now refuses the hour-long token: one 401
            uids |= drop(layout, ["c1.dcm"])
            wait_sent(layout, {"c1.dcm"}, daemon)
            after = tokens.accepted_requests()
            history = proxy.history()
            outputs = every_output(layout, [daemon])  # check-config --connect: a token too
            assert daemon.terminate() == 0
        outputs["log"] = daemon.log
    assert set(uids.values()) <= orthanc.sop_instance_uids()
    assert layout.files(layout.failed) == set()
    assert first >= 1 and renewed > first and after == renewed + 1
    assert tokens.refusals == []
    assert all(e.token in ("valid", "revoked", "expired") for e in history), history
    revoked = [i for i, e in enumerate(history) if e.token == "revoked"]
    assert len(revoked) == 1 and history[revoked[0] + 1].token == "valid", history
    assert history[-1].status == 200
    leaks = [name for name, text in outputs.items() for line in key_lines(pem) if line in text]
    assert not leaks


# -- AWS: the stand-in checked against AWS's own test vectors ---------------------------------


SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_SCOPE = "20150830/us-east-1/service/aws4_request"


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [  # aws-sig-v4-test-suite: get-vanilla, post-vanilla, get-vanilla-query-order-key-case
        ("GET", "/", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        ("POST", "/", "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
        (
            "GET",
            "/?Param2=value2&Param1=value1",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
    ],
)
def test_the_stand_ins_sigv4_matches_aws_published_test_suite(
    method: str, target: str, expected: str
) -> None:
    headers = {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"}
    canonical = canonical_request(method, target, headers, ["host", "x-amz-date"], EMPTY_SHA256)
    assert signature(SUITE_SECRET, "20150830T123600Z", SUITE_SCOPE, canonical) == expected


# -- AWS: the client ---------------------------------------------------------------------------


def test_aws_signing_never_reads_the_body(aws: None) -> None:
    from stowd.dicomweb.awsauth import AwsSigV4  # noqa: PLC0415 (an optional extra)

    def body() -> Iterator[bytes]:
        raise AssertionError("the body was read to sign it")
        yield b""  # pragma: no cover

    request = httpx.Request(
        "POST",
        "https://dicom-medical-imaging.eu-west-1.amazonaws.com/datastore/d1/studies",
        content=body(),
        headers={
            "Content-Type": "multipart/related; type=application/dicom",
            "Content-Length": "12345678901",
        },
    )
    login = AwsSigV4(
        Auth("aws", secret=Secret("inline", "s3cr3t-key"), client_id=KEY_ID, region=REGION)
    )
    login.sign(request, login.credentials())
    assert request.headers["X-Amz-Content-SHA256"] == STREAMING
    assert request.headers["X-Amz-Decoded-Content-Length"] == "12345678901"
    assert f"/{REGION}/medical-imaging/aws4_request" in request.headers["Authorization"]


def test_aws_signed_request_with_a_session_token_is_accepted(
    aws: None, tmp_path: Path, stub: StubArchive, part: Part
) -> None:
    secret, token = "sk-" + secrets.token_hex(20), "st-" + secrets.token_hex(30)
    files = write_secret(tmp_path / "sk", secret), write_secret(tmp_path / "st", token)
    with SigV4Proxy(stub.url, {KEY_ID: secret}, REGION, session_tokens={KEY_ID: token}) as proxy:
        sender = client(f"{proxy.url}/dicom-web", aws_auth(*files))
        try:
            answer = sender.store([part])
        finally:
            sender.close()
        history = proxy.history()
    assert answer.status == 200, history
    assert [(e.verdict, e.payload) for e in history] == [("ok", STREAMING)]
    assert "x-amz-security-token" in history[0].signed.split(";")
    assert "accept-encoding" not in history[0].signed.split(";")


def test_aws_credentials_from_the_standard_chain(
    aws: None, tmp_path: Path, stub: StubArchive, part: Part, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-" + secrets.token_hex(20)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    with SigV4Proxy(stub.url, {KEY_ID: secret}, REGION) as proxy:
        sender = client(f"{proxy.url}/dicom-web", aws_auth(None))
        try:
            answer = sender.store([part])
        finally:
            sender.close()
    assert answer.status == 200, proxy.history()


def test_aws_wrong_secret_is_refused_and_holds_with_a_clear_reason(
    aws: None, tmp_path: Path, stub: StubArchive, part: Part
) -> None:
    wrong = write_secret(tmp_path / "sk", "wrong-" + secrets.token_hex(20))
    with SigV4Proxy(stub.url, {KEY_ID: "right-" + secrets.token_hex(20)}, REGION) as proxy:
        sender = client(f"{proxy.url}/dicom-web", aws_auth(wrong))
        try:
            with pytest.raises(DestinationHeld) as held:
                sender.store([part])
        finally:
            sender.close()
        history = proxy.history()
    assert [e.verdict for e in history] == ["the signature does not match"]
    assert str(held.value) == (
        "AWS refused the signed request (HTTP 403, InvalidSignatureException): the signature "
        "does not match: check auth.secret_access_key"
    )


# -- AWS: the daemon ---------------------------------------------------------------------------


def test_aws_daemon_sends_signed_and_a_wrong_secret_holds_until_fixed(
    aws: None, tmp_path: Path, orthanc: Orthanc
) -> None:
    right = "right-" + secrets.token_hex(20)
    secret_file = write_secret(tmp_path / "secrets" / "aws.secret", "wrong-" + secrets.token_hex(9))
    with SigV4Proxy(orthanc.url, {KEY_ID: right}, REGION) as proxy:
        auth = {
            "type": "aws",
            "region": REGION,
            "access_key_id": KEY_ID,
            "secret_access_key": {"file": str(secret_file)},
        }
        layout = layout_for(tmp_path / "run", f"{proxy.url}/dicom-web", auth)
        with Stowd(layout) as daemon:
            uids = drop(layout, ["a1.dcm", "a2.dcm", "a3.dcm"])
            reason = wait_held(layout, daemon)
            assert layout.files(layout.drop) >= {"a1.dcm", "a2.dcm", "a3.dcm"}
            write_secret(secret_file, right)
            wait_sent(layout, {"a1.dcm", "a2.dcm", "a3.dcm"}, daemon)
            wait_for(lambda: hold_reason(layout) is None, TIMEOUT, "the hold to end")
            outputs = every_output(layout, [daemon])
            assert daemon.terminate() == 0
        outputs["log"] = daemon.log
        history = proxy.history()
    assert "AWS refused the signed request (HTTP 403, InvalidSignatureException)" in reason
    assert "check auth.secret_access_key" in reason
    assert set(uids.values()) <= orthanc.sop_instance_uids()
    assert layout.files(layout.failed) == set()
    posts = [e for e in history if e.method == "POST" and e.verdict == "ok"]
    assert posts and all(e.payload == STREAMING for e in posts)
    assert not [name for name, text in outputs.items() if right in text]


# -- config --------------------------------------------------------------------------------------


def check_config(config: Path, *blocked: str) -> subprocess.CompletedProcess[str]:
    """``stowd check-config`` in a Python where the modules ``blocked`` cannot be imported
    (an installation without the extras)."""
    code = (
        "import sys\n"
        f"for name in {list(blocked)!r}:\n"
        "    sys.modules[name] = None\n"
        "from stowd.commands.cli import main\n"
        f"sys.exit(main(['check-config', '-c', {str(config)!r}]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_missing_extras_are_config_errors_naming_what_to_install(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/dicom-web"
    key = {"file": str(tmp_path / "key.json")}
    destinations = {
        "gcp": {"url": url, "auth": {"type": "google", "key": key}},
        "aws": {"url": url, "auth": {"type": "aws", "region": "nowhere"}},
    }
    layout = make_layout(tmp_path / "run", url, destinations=destinations)
    result = check_config(layout.config, "google", "botocore")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "pip install 'stowd[google]'" in out
    assert "pip install 'stowd[aws]'" in out
    assert "expected an AWS region such as us-east-1" in out  # reported in the same run


def test_cloud_auth_settings_are_checked(google: None, aws: None, tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/dicom-web"
    destinations = {
        "text_key": {"url": url, "auth": {"type": "google", "key": "/etc/stowd/key.json"}},
        "half": {"url": url, "auth": {"type": "aws", "region": REGION, "access_key_id": KEY_ID}},
        "good": {"url": url, "auth": {"type": "aws", "region": REGION}},
    }
    layout = make_layout(tmp_path / "run", url, destinations=destinations)
    result = run_cli("check-config", "-c", str(layout.config))
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "expected where the service account's JSON key is" in out
    assert "/etc/stowd/key.json" not in out
    assert "set both access_key_id and secret_access_key, or neither" in out
    assert "destinations.good" not in out

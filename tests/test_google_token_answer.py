"""``auth.type: google``: a token endpoint whose answer google-auth cannot read holds the
destination with a reason."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from localserver import LocalServer
from test_cloudauth import (
    StubArchive,
    client,
    google_auth,
    require_extra,
    rsa_key,
    write_key,
)

from stowd.dicomweb.stowbody import Part
from stowd.errors import DestinationHeld


class OddTokens(LocalServer):
    """A token endpoint (or a proxy before it) whose token answer has an ``expires_in`` that
    is not a number of seconds: RFC 6749 5.1 says a number; google-auth reads it with
    int() and timedelta(), and raises ValueError, TypeError or OverflowError."""

    def __init__(self, expires_in: str) -> None:
        body = f'{{"access_token": "ya29.a0", "token_type": "Bearer", "expires_in": {expires_in}}}'
        answer = body.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(Handler)


@pytest.fixture
def stub() -> Iterator[StubArchive]:
    with StubArchive() as server:
        yield server


@pytest.mark.parametrize("expires_in", ['"soon"', "1e400", "[]", "99999999999999"])
def test_an_unreadable_expires_in_holds_the_destination_with_a_reason(
    expires_in: str, tmp_path: Path, stub: StubArchive
) -> None:
    """Not a bare ValueError out of the sender, which the worker logged as an unexpected
    error with a traceback, gave the batch back and claimed again at once, for ever, with
    no reason in stowd status and a token request each time."""
    require_extra("google.oauth2.service_account", "google")
    path = tmp_path / "one.dcm"
    path.write_bytes(b"x" * 5000)
    part = Part(str(path), 5000, "1.2.3")
    with OddTokens(expires_in) as tokens:
        write_key(tmp_path / "key.json", rsa_key(), f"{tokens.url}/token")
        sender = client(f"{stub.url}/dicom-web", google_auth(tmp_path / "key.json"))
        try:
            with pytest.raises(DestinationHeld, match="expires_in"):
                sender.store([part])
        finally:
            sender.close()

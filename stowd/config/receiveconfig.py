"""Reading a source's ``receive:`` section (a DICOM C-STORE receiver) into ``model.Receive``.

AE titles follow PS3.5's AE VR: 1 to 16 characters of printable ASCII without a backslash,
not only spaces.  ``bind`` and an allowed ``host`` are IP addresses written out: a name
could resolve to another address later, and ``bind`` has no default, so a receiver never
listens on every interface unless the config says ``0.0.0.0`` (or ``::``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

from yaml.nodes import SequenceNode

from stowd.config.model import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_ASSOCIATIONS,
    DEFAULT_MAX_PDU,
    Allowed,
    Receive,
)
from stowd.config.yamlwalk import Section, as_duration, as_int, describe_node, describe_value, join

RECEIVE_KEYS = (
    "ae_title",
    "port",
    "bind",
    "allow",
    "max_associations",
    "max_pdu",
    "idle_timeout",
)
ALLOW_KEYS = ("ae_title", "host")
AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII but "\"
MIN_PDU = 4096  # below this no modality can send anything useful
MAX_PDU = 16 * 1024 * 1024  # each open association may hold one PDU this large in memory


def as_ae_title(value: object) -> str:
    """An AE title: 1-16 printable ASCII characters, no backslash, not only spaces."""
    if not isinstance(value, str):
        raise ValueError(f"expected an AE title (text), got {describe_value(value)}")
    if not AE_TITLE.fullmatch(value) or not value.strip():
        raise ValueError(
            "an AE title has 1 to 16 characters of printable ASCII without '\\' and not only "
            f"spaces, got {value!r}"
        )
    if value != value.strip():
        raise ValueError(f"an AE title may not start or end with spaces, got {value!r}")
    return value


def as_address(what: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = value if isinstance(value, str) else describe_value(value)
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise ValueError(
                f"{what} is an IP address such as 127.0.0.1 or 10.1.2.3 (a name could resolve "
                f"to another address later), got {text!r}"
            ) from None

    return convert


def as_port(value: object) -> int:
    port = as_int(1)(value)
    if port > 65535:
        raise ValueError(f"a TCP port is 1 to 65535, got {port}")
    return port


def as_pdu(value: object) -> int:
    """A PDU size; a PDU is held whole in memory, so there is no "no limit"."""
    size = as_int(0)(value)
    if not MIN_PDU <= size <= MAX_PDU:
        raise ValueError(f"must be {MIN_PDU} to {MAX_PDU} bytes (16 MiB), got {size}")
    return size


def read_receive(sec: Section) -> Receive | None:
    """The receiver of one source; None (with every problem added) when it is invalid."""
    ae_title = sec.need("ae_title", as_ae_title)
    port = sec.need("port", as_port)
    bind = sec.need("bind", as_address("bind"))
    allow = _read_allow(sec)
    associations = sec.get("max_associations", DEFAULT_MAX_ASSOCIATIONS, as_int(1))
    pdu = sec.get("max_pdu", DEFAULT_MAX_PDU, as_pdu)
    idle = sec.get("idle_timeout", DEFAULT_IDLE_TIMEOUT, as_duration(positive=True))
    if ae_title is None or port is None or bind is None or allow is None:
        return None
    return Receive(ae_title, port, bind, allow, associations, pdu, idle)


def _read_allow(sec: Section) -> tuple[Allowed, ...] | None:
    node = sec.value_node("allow")
    if node is None:
        return ()
    if not isinstance(node, SequenceNode):
        got = describe_node(node)
        sec.add("allow", f"expected a list such as [{{ae_title: CT1}}], got {got}")
        return None
    if not node.value:
        sec.add("allow", "an empty list lets no one send; leave 'allow' out to accept any AE")
        return None
    found: list[Allowed] = []
    for index, item in enumerate(node.value):
        entry = Section(sec.ctx, join(sec.key, f"allow[{index}]"), item, ALLOW_KEYS)
        ae_title = entry.need("ae_title", as_ae_title)
        host = entry.get("host", None, as_address("host"))
        if ae_title is not None:
            found.append(Allowed(ae_title, host))
    return tuple(found) if len(found) == len(node.value) else None


def check_ports(receivers: Sequence[tuple[Section, Receive]]) -> None:
    """Two receivers cannot listen on one port of one address (or of every address)."""
    for index, (sec, first) in enumerate(receivers):
        for other_sec, second in receivers[:index]:
            if first.port == second.port and _overlap(first.bind, second.bind):
                sec.add(
                    "port",
                    f"{first.bind}:{first.port} is already taken by the receiver of "
                    f"{other_sec.key} (line {other_sec.line('port')})",
                )


def _overlap(a: str, b: str) -> bool:
    every = ipaddress.ip_address(a).is_unspecified or ipaddress.ip_address(b).is_unspecified
    return a == b or every

"""One local test archive with a profile per archive stowd is sent to (issue 15): dcm4chee-arc,
Azure's DICOM service, Google's Cloud Healthcare API and AWS HealthImaging.

None of them can run here, so each profile answers STOW-RS as that archive's own source or
documentation says it does; every answer cites where it comes from, and what is not documented
says so.  The sources:

* dcm4chee-arc: dcm4chee-arc-light (github.com/dcm4che/dcm4chee-arc-light at 674a86420),
  ``dcm4chee-arc-stow/.../stow/StowRS.java`` (the answer), ``dcm4chee-arc-store/.../store/
  impl/StoreServiceEJB.java`` and ``StoreService.java`` (duplicates and failure codes),
  ``dcm4chee-arc-conf/.../ArchiveDeviceExtension.java`` (defaults).
* Azure: "DICOM Conformance Statement v2" (learn.microsoft.com/azure/healthcare-apis/dicom/
  dicom-services-conformance-statement-v2, "Store (STOW-RS)").
* Google: the Cloud Healthcare API's answers as reported by users, which its conformance
  statement does not spell out: github.com/GoogleCloudPlatform/healthcare-api-dicom-fuse/
  issues/20 (an identical re-upload succeeds; same UIDs with other content is 409),
  github.com/dcmjs-org/dcmjs/issues/249 (the 409's body: FailureReason 272 and a private
  FailureDetail of creator "GOOGLE"), github.com/GoogleCloudPlatform/nodejs-docs-samples/
  issues/3502 (the detail text "... the DICOM files differ (checksum mismatch)"), and
  docs.cloud.google.com/healthcare-api/docs/how-tos/dicom-update-patch ("Unlike
  storeInstances, updating a full instance cannot be done with JSON metadata": the store
  takes the metadata + bulkdata form).
* AWS: "Storing instances with STOW-RS" (docs.aws.amazon.com/healthimaging/latest/devguide/
  dicomweb-storing.html: 1 GB of DICOM data per request, a JSON answer conformant to STOW-RS,
  conflicting data added to a non-primary image set) and "HealthImaging Warning Codes"
  (.../reference-warning-codes.html).

What the tests make it do: a file whose PatientID is ``REFUSE`` is refused the way the profile
refuses, ``UNPARSABLE`` as the archive answers a part it cannot parse, and one whose PatientID
is ``WARN`` is stored with the profile's warning; ``lose(n, how)`` makes the next n requests
store everything and then lose the answer (``"drop"``: the connection closes without a word;
``"500"``: HTTP 500).  The fake keeps every request's SOPInstanceUIDs and lists what it finds
wrong with a request in ``faults`` (two parts with one SOPInstanceUID; a metadata + bulkdata
request that breaks PS3.18), so a test fails on a defect of stowd's request.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import io
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler
from typing import Any

import pydicom
from localserver import LocalServer

REFERENCED, FAILED, RETRIEVE_URL = "00081199", "00081198", "00081190"
SOP_CLASS, SOP_UID = "00081150", "00081155"
FAILURE_REASON, WARNING_REASON = "00081197", "00081196"
PIXEL_DATA, DOCUMENT, MIME_TYPE = "7FE00010", "00420011", "00420012"
GB = 1 << 30
NOT_A_DICOM_FILE = "1.2.40.0.13.1.15.110.3.165.2"  # StowRS.NOT_A_DICOM_FILE_UID


@dataclass
class Instance:
    """One instance of a request, as the archive read it."""

    sop_class: str
    sop_uid: str
    patient_id: str
    digest: str


@dataclass
class Outcome:
    """What the archive did with one instance."""

    instance: Instance
    failure: int | None = None
    warning: int | None = None
    text: str = ""


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _us(value: int) -> dict[str, Any]:
    return {"vr": "US", "Value": [value]}


class Profile:
    """PS3.18 §10.5 as an archive answers it; each archive overrides what it does otherwise."""

    name = "ps3.18"
    warning: int | None = None  # the WarningReason a WARN file is stored with (None: no warning)
    max_bytes: int | None = None  # the largest request it takes
    accept_only_json = False  # answers 406 to an Accept other than application/dicom+json
    # takes the metadata + bulkdata form (dcm4chee: StowRS's @Consumes; Google: its how-to;
    # Azure: only type="application/dicom"; AWS documents DICOM P10 uploads only)
    metadata_form = False

    def refuse(self, instance: Instance) -> Outcome:
        raise NotImplementedError

    def again(self, instance: Instance, same: bool) -> Outcome:
        """A SOPInstanceUID it holds already: with the same content or other content."""
        return Outcome(instance)

    def unparsable(self, instance: Instance) -> Outcome:
        """A part it cannot parse (the tests' UNPARSABLE files; stowd reads them fine)."""
        return self.refuse(instance)

    def status(self, outcomes: list[Outcome]) -> int:
        stored = [o for o in outcomes if o.failure is None]
        noted = [o for o in outcomes if o.failure is not None or o.warning is not None]
        return 409 if not stored else 202 if noted else 200

    def headers(self, outcomes: list[Outcome]) -> dict[str, str]:
        return {}

    def item(self, outcome: Outcome) -> dict[str, Any]:
        i = outcome.instance
        item = {SOP_CLASS: _ui(i.sop_class), SOP_UID: _ui(i.sop_uid)}
        if outcome.failure is not None:
            item[FAILURE_REASON] = _us(outcome.failure)
        elif outcome.warning is not None:
            item[WARNING_REASON] = _us(outcome.warning)
        return item


class Dcm4chee(Profile):
    """dcm4chee-arc-light's StowRS.java."""

    name = "dcm4chee"
    # StowRS.java answers no WarningReason at all: the items of its ReferencedSOPSequence hold
    # ReferencedSOPClassUID, ReferencedSOPInstanceUID and RetrieveURL only
    # (mkSOPRefWithRetrieveURL); coercion is not reported in the STOW-RS answer (issue 15
    # expected B000/B006/B007; the source does not send them). Its only note is the Warning
    # header, which comes with a refusal (setWarning).
    warning = None
    metadata_form = True

    def refuse(self, instance: Instance) -> Outcome:
        # StoreService.java: CONFLICTING_PID_NOT_ACCEPTED = 0xA778, with its message format
        # CONFLICTING_PID_NOT_ACCEPTED_MSG ("Patient ID {0} differs from Patient ID {1} in
        # previous received object of Study[uid={2}].")
        text = (
            f"Patient ID {instance.patient_id} differs from Patient ID P1 in previous received "
            "object of Study[uid=1.2.3]."
        )
        return Outcome(instance, failure=0xA778, text=text)

    def unparsable(self, instance: Instance) -> Outcome:
        # StoreServiceImpl.writeToStorage: a DicomStreamException becomes
        # FAILED_TO_PARSE_DICOM_STREAM (0xC499) with the parser's message; StowRS.mkSOPRef
        # then has no attributes and names the item NOT_A_DICOM_FILE_UID with a UID made up
        # on the spot (UIDUtils.createUID()): the answer does not name the file's instance.
        made_up = Instance(NOT_A_DICOM_FILE, pydicom.uid.generate_uid(), "", "")
        return Outcome(made_up, failure=0xC499, text="Failed to parse DICOM stream")

    def again(self, instance: Instance, same: bool) -> Outcome:
        # StoreServiceEJB.updateDB: a previous instance with overwritePolicy NEVER (the default,
        # ArchiveDeviceExtension.overwritePolicy) is logged "Ignore received Instance" and
        # returns without an exception, so StowRS lists it in ReferencedSOPSequence: a re-send,
        # same content or not, is answered as stored.
        return Outcome(instance)

    def status(self, outcomes: list[Outcome]) -> int:
        # StowRS.status(): CONFLICT when nothing was stored, OK when nothing failed, else
        # ACCEPTED (a note alone does not make 202 here: there are no warnings)
        stored = [o for o in outcomes if o.failure is None]
        failed = [o for o in outcomes if o.failure is not None]
        return 409 if not stored else 200 if not failed else 202

    def headers(self, outcomes: list[Outcome]) -> dict[str, str]:
        # StowRS.setWarning: 'Warning: 299 <device name> "<message>"' of the last failure;
        # the device is named dcm4chee-arc in the shipped configuration
        failed = [o for o in outcomes if o.failure is not None]
        return {"Warning": f'299 dcm4chee-arc "{failed[-1].text}"'} if failed else {}

    def item(self, outcome: Outcome) -> dict[str, Any]:
        item = super().item(outcome)
        if outcome.failure is None:  # mkSOPRefWithRetrieveURL
            uid = outcome.instance.sop_uid
            item[RETRIEVE_URL] = {"vr": "UR", "Value": [f"http://archive/instances/{uid}"]}
        return item


class Azure(Profile):
    """Azure's DICOM service, conformance statement v2, "Store (STOW-RS)"."""

    name = "azure"
    # "Store warning reason codes": 1, "the Data Set has validation warnings", with a
    # FailedAttributesSequence (0074,1048) of ErrorComment in the ReferencedSOPSequence item
    warning = 1
    accept_only_json = True  # "The following Accept header(s) ... application/dicom+json"

    def refuse(self, instance: Instance) -> Outcome:
        # "Store failure reason codes": 43264 (0xA900), "The DICOM instance failed the
        # validation."
        return Outcome(instance, failure=43264)

    def again(self, instance: Instance, same: bool) -> Outcome:
        # 45070 (0xB00E): "A DICOM instance with the same StudyInstanceUID, SeriesInstanceUID,
        # and SopInstanceUID was already stored." (content not compared: "Each file stored
        # must have a unique combination of ...")
        return Outcome(instance, failure=45070)

    # status: "200 All the SOP instances in the request were stored", "202 ... stored some of
    # the Instances and others failed or returned warnings", "409 None of the instances in the
    # store transaction request were stored": the base rule.

    def item(self, outcome: Outcome) -> dict[str, Any]:
        item = super().item(outcome)
        if outcome.warning is not None:  # the documented example's text
            comment = (
                'DICOM100: (0008,0020) - Content "NotAValidDate" does not validate VR DA: one '
                "of the date values does not match the pattern YYYYMMDD"
            )
            item["00741048"] = {
                "vr": "SQ",
                "Value": [{"00000902": {"vr": "LO", "Value": [comment]}}],
            }
        return item


class Google(Profile):
    """The Cloud Healthcare API's DICOM store."""

    name = "google"
    # No STOW-RS warning is documented (its conformance statement lists none): WARN files are
    # stored without one.
    warning = None
    metadata_form = True  # dicom-update-patch how-to (module docstring); checked as PS3.18

    def refuse(self, instance: Instance) -> Outcome:
        # Not documented per code beyond the conflict below; the same 409/272 answer is what
        # users report for files it cannot store (healthcare-api-dicom-fuse#20: "You'll also
        # get a 409 conflict error if you try and upload an invalid DICOM file").
        return Outcome(instance, failure=0x0110, text="invalid DICOM file")

    def again(self, instance: Instance, same: bool) -> Outcome:
        # healthcare-api-dicom-fuse#20: "If we upload a file and the file exist on the server,
        # the file will be uploaded without any error ... if we have different files on the
        # server and client-side (with same study, series, and instance ID) we will get 409";
        # the detail text as in nodejs-docs-samples#3502.
        if same:
            return Outcome(instance)
        text = (
            "An instance already exists in this DICOM Store with the same Study/Series/"
            "SOPInstance UID, but the DICOM files differ (checksum mismatch)."
        )
        return Outcome(instance, failure=0x0110, text=text)

    def item(self, outcome: Outcome) -> dict[str, Any]:
        # dcmjs#249 shows the answer in XML: FailureReason 272 and a private FailureDetail
        # (0009,xx97, LT, creator "GOOGLE"). Its JSON form is not documented; this is the
        # PS3.18 Annex F mapping of that XML (the private block 0x10).
        item = super().item(outcome)
        if outcome.failure is not None:
            item["00090010"] = {"vr": "LO", "Value": ["GOOGLE"]}
            item["00091097"] = {"vr": "LT", "Value": [outcome.text]}
        return item


class Aws(Profile):
    """AWS HealthImaging's StoreDICOM."""

    name = "aws"
    # "HealthImaging Warning Codes": 0xB100 TRANSCODING_EXCEPTION, the pixel data kept as a
    # blob. That the StoreDICOM answer then is 202 is not documented: PS3.18 Table 10.5.3-1.
    warning = 0xB100
    max_bytes = GB  # "These actions support upload of up to 1GB of DICOM data per request."

    def refuse(self, instance: Instance) -> Outcome:
        # No failure codes are documented for StoreDICOM: PS3.18 Table I.2-2's "C000 Error:
        # Cannot understand".
        return Outcome(instance, failure=0xC000)

    def again(self, instance: Instance, same: bool) -> Outcome:
        # "If the metadata elements of newly imported DICOM P10 data conflict with existing
        # primary image sets, the new data will be added to non-primary image sets": stored.
        # An identical re-send is not described; the profile stores it as well.
        return Outcome(instance)


PROFILES: dict[str, Callable[[], Profile]] = {
    "dcm4chee": Dcm4chee,
    "azure": Azure,
    "google": Google,
    "aws": Aws,
}


class FakeArchive(LocalServer):
    """A STOW-RS endpoint answering as ``profile`` does; see the module docstring."""

    def __init__(
        self, profile: Profile, *, max_bytes: int | None = None, keep_bodies: bool = False
    ) -> None:
        self.profile = profile
        self.keep_bodies = keep_bodies
        self.bodies: list[tuple[str, bytes]] = []  # (Content-Type, body), if keep_bodies
        self.max_bytes = max_bytes or profile.max_bytes
        self.stored: dict[str, str] = {}  # SOPInstanceUID -> digest of what was stored
        self.requests: list[list[str]] = []  # the SOPInstanceUIDs of each request
        self.sizes: list[int] = []
        self.faults: list[str] = []
        self._lose: list[str] = []
        self.lock = threading.Lock()
        super().__init__(_handler(self))

    @property
    def base(self) -> str:
        return f"{self.url}/dicom-web"

    def lose(self, count: int, how: str) -> None:
        with self.lock:
            self._lose = [how] * count

    def times_sent(self, sop_uid: str) -> int:
        with self.lock:
            return sum(r.count(sop_uid) for r in self.requests)

    # -- one request ------------------------------------------------------------------------
    def handle(self, content_type: str, accept: str, body: bytes) -> tuple[Reply, str | None]:
        with self.lock:
            self.sizes.append(len(body))
            if self.keep_bodies:
                self.bodies.append((content_type, body))
            if self.profile.accept_only_json and accept != "application/dicom+json":
                return Reply(406), None
            if self.max_bytes is not None and len(body) > self.max_bytes:
                # AWS documents the limit, not its answer: 413 (RFC 9110 §15.5.14) here
                return Reply(413), None
            if not self._takes(content_type):
                # PS3.18 Table 10.5.3-1: 415, "does not support the media type"; Azure's
                # statement: "415 The provided Content-Type isn't supported"
                return Reply(415), None
            instances = self._instances(content_type, body)
            if instances is None:  # a metadata request that breaks PS3.18 (see faults)
                return Reply(400, b'{"errorMessage":"the request breaks PS3.18"}'), None
            self._note_duplicates(instances)
            outcomes = [self._one(i) for i in instances]
            lost = self._lose.pop(0) if self._lose else None
        return self._reply(outcomes), lost

    def _one(self, instance: Instance) -> Outcome:
        if instance.patient_id == "REFUSE":
            return self.profile.refuse(instance)
        if instance.patient_id == "UNPARSABLE":
            return self.profile.unparsable(instance)
        held = self.stored.get(instance.sop_uid)
        if held is not None:
            return self.profile.again(instance, held == instance.digest)
        self.stored[instance.sop_uid] = instance.digest
        warning = self.profile.warning if instance.patient_id == "WARN" else None
        return Outcome(instance, warning=warning)

    def _note_duplicates(self, instances: list[Instance]) -> None:
        uids = [i.sop_uid for i in instances]
        self.requests.append(uids)
        twice = sorted({u for u in uids if uids.count(u) > 1})
        if twice:
            self.faults.append(f"one request carried SOPInstanceUID(s) {twice} twice")

    def _reply(self, outcomes: list[Outcome]) -> Reply:
        p = self.profile
        doc: dict[str, Any] = {}
        stored = [p.item(o) for o in outcomes if o.failure is None]
        failed = [p.item(o) for o in outcomes if o.failure is not None]
        if stored:
            doc[REFERENCED] = {"vr": "SQ", "Value": stored}
        if failed:
            doc[FAILED] = {"vr": "SQ", "Value": failed}
        headers = {"Content-Type": "application/dicom+json", **p.headers(outcomes)}
        return Reply(p.status(outcomes), json.dumps(doc).encode(), headers)

    def _takes(self, content_type: str) -> bool:
        kind = _param(content_type, "type")
        return kind == "application/dicom" or (
            kind == "application/dicom+json" and self.profile.metadata_form
        )

    def _instances(self, content_type: str, body: bytes) -> list[Instance] | None:
        parts = parts_of(content_type, body)
        if _param(content_type, "type") == "application/dicom":
            return [_read_part10(p) for p in parts if p.get_content_type() == "application/dicom"]
        return self._metadata(parts)

    def _metadata(self, parts: list[EmailMessage]) -> list[Instance] | None:
        """The metadata + bulkdata form, checked against PS3.18; None (HTTP 400) if wrong."""
        faults = check_metadata_form(parts)
        if faults:
            self.faults.extend(faults)
            return None
        items: list[dict[str, Any]] = json.loads(_payload(parts[0]))
        bulk = {p["Content-Location"]: _payload(p) for p in parts[1:]}
        return [_from_json(item, bulk[_bulk_uri(item)]) for item in items]


# -- the request, read as the archive reads it ----------------------------------------------
def parts_of(content_type: str, body: bytes) -> list[EmailMessage]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        return []
    return [part for part in message.iter_parts() if isinstance(part, EmailMessage)]


def _param(content_type: str, name: str) -> str | None:
    message = EmailMessage()
    message["Content-Type"] = content_type
    value = message.get_param(name, header="Content-Type")
    return value if isinstance(value, str) else None


def _payload(part: EmailMessage) -> bytes:
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _read_part10(part: EmailMessage) -> Instance:
    data = _payload(part)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    digest = hashlib.sha256(data).hexdigest()
    return Instance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.PatientID), digest)


def _bulk_uri(item: dict[str, Any]) -> str:
    return str((item.get(PIXEL_DATA) or item[DOCUMENT])["BulkDataURI"])


def _from_json(item: dict[str, Any], bulk: bytes) -> Instance:
    def text(tag: str) -> str:
        return str(item.get(tag, {}).get("Value", [""])[0])

    digest = hashlib.sha256(json.dumps(item, sort_keys=True).encode() + bulk).hexdigest()
    patient = item.get("00100020", {}).get("Value", [""])[0]
    return Instance(text("00080016"), text("00080018"), str(patient), digest)


# PS3.18 §8.7.3.3.2 Table 8.7.3-5: the transfer syntaxes each compressed bulkdata media type
# may carry (JPEG: Baseline, Extended, Lossless 14 and 14 SV1; MPEG-2: MP@ML, MP@HL and their
# fragmentable forms; MP4: the MPEG-4 AVC/H.264 and HEVC/H.265 profiles)
TS = "1.2.840.10008.1.2.4."
MP4_SYNTAXES: tuple[str, ...] = ("102", "102.1", "103", "103.1", "104", "104.1")
MP4_SYNTAXES += ("105", "105.1", "106", "106.1", "107", "108")
PIXEL_TYPES = {
    "image/jpeg": tuple(TS + n for n in ("50", "51", "57", "70")),
    "video/mpeg": tuple(TS + n for n in ("100", "100.1", "101", "101.1")),
    "video/mp4": tuple(TS + n for n in MP4_SYNTAXES),
}
# the first bytes of each kind of stream (JPEG SOI; MPEG-2 pack or sequence header; ISO BMFF
# ftyp box), so a part labelled one way and holding another is caught
MAGIC: dict[str, Callable[[bytes], bool]] = {
    "image/jpeg": lambda b: b[:2] == b"\xff\xd8",
    "video/mpeg": lambda b: b[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"),
    "video/mp4": lambda b: b[4:8] == b"ftyp",
    "application/pdf": lambda b: b[:5] == b"%PDF-",
    "text/xml": lambda b: b.lstrip()[:1] == b"<",
}


def check_metadata_form(parts: list[EmailMessage]) -> list[str]:
    """What breaks PS3.18 §10.5.1 (and dcm4chee's reading of it) in a metadata + bulkdata
    request: the first part a JSON array of DICOM JSON datasets (PS3.18 Annex F), each
    BulkDataURI the Content-Location of exactly one later part, each bulk part used, its media
    type that of the attribute, pixel data with a transfer-syntax of Table 8.7.3-5."""
    if not parts or parts[0].get_content_type() != "application/dicom+json":
        return ["the first part is not application/dicom+json"]
    try:
        items = json.loads(_payload(parts[0]))
    except ValueError:
        return ["the first part is not JSON"]  # StowRS: JsonParsingException -> 400
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        return ["the first part is not a JSON array of datasets"]
    bulk = {p.get("Content-Location"): p for p in parts[1:]}
    faults = [] if len(bulk) == len(parts) - 1 else ["two bulk parts share a Content-Location"]
    uris = []
    for item in items:
        faults += _check_item(item, bulk)
        if PIXEL_DATA in item or DOCUMENT in item:
            uris.append(_bulk_uri(item))
    faults += [f"bulk part {loc} is not referenced" for loc in bulk if loc not in uris]
    return faults


def _check_item(item: dict[str, Any], bulk: dict[Any, EmailMessage]) -> list[str]:
    for needed in ("00080016", "00080018", "0020000D", "0020000E"):
        if not item.get(needed, {}).get("Value"):
            return [f"an instance without {needed}"]
    if PIXEL_DATA not in item and DOCUMENT not in item:
        return ["an instance without PixelData or EncapsulatedDocument"]
    tag = PIXEL_DATA if PIXEL_DATA in item else DOCUMENT
    uri = item[tag].get("BulkDataURI")
    part = bulk.get(uri)
    if part is None:  # StowRS.resolveBulkdataRef: 0xA922 "Missing Bulkdata"
        return [f"BulkDataURI {uri!r} has no part with that Content-Location"]
    data = _payload(part)
    kind = part.get_content_type()
    syntax = part.get_param("transfer-syntax")
    if part.get("Content-Length") and int(part["Content-Length"]) != len(data):
        return [f"part {uri}: Content-Length {part['Content-Length']}, {len(data)} bytes"]
    if tag == PIXEL_DATA:
        return _check_pixels(uri, kind, syntax, item[tag].get("vr"), data)
    return _check_document(uri, kind, syntax, item, data)


def _check_pixels(uri: str, kind: str, syntax: Any, vr: Any, data: bytes) -> list[str]:
    if kind not in PIXEL_TYPES:  # StowRS.CompressedPixelData.valueOf
        return [f"pixel data part {uri} has media type {kind}"]
    if syntax not in PIXEL_TYPES[kind]:
        return [f"pixel data part {uri} ({kind}) has transfer-syntax {syntax}"]
    if vr != "OB":
        return [f"pixel data of {uri} has VR {vr}, not OB (encapsulated)"]
    if not MAGIC[kind](data):
        return [f"pixel data part {uri} does not hold {kind}"]
    return []


def _check_document(
    uri: str, kind: str, syntax: Any, item: dict[str, Any], data: bytes
) -> list[str]:
    # media types are case-insensitive (RFC 2045 §5.1): the CDA IOD's "text/XML" is text/xml
    declared = str(item.get(MIME_TYPE, {}).get("Value", [kind])[0]).lower()
    if syntax is not None:
        return [f"document part {uri} carries a transfer-syntax"]
    if declared != kind:
        return [f"document part {uri} is {kind}, MIMETypeOfEncapsulatedDocument {declared}"]
    check = MAGIC.get(kind)
    if check is not None and not check(data):
        return [f"document part {uri} does not hold {kind}"]
    return []


def _handler(archive: FakeArchive) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            accept = self.headers.get("Accept", "")
            try:
                reply, lost = archive.handle(self.headers.get("Content-Type", ""), accept, body)
            except Exception as exc:  # a fault of the fake or of the request: never a hang
                archive.faults.append(f"the fake could not read a request: {exc!r}")
                reply, lost = Reply(500, b"fake archive error"), None
            if lost == "drop":  # stored, then the connection closes without an answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if lost == "500":
                reply = Reply(500, b"Internal Server Error", {"Content-Type": "text/plain"})
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler

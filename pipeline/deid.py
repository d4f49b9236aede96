"""De-identification and pseudonymisation of DICOM instances: an allow-list rebuild.

A removal list cannot be complete (DICOM has thousands of attributes and every vendor adds more),
so the output is **rebuilt** from an explicit keep-list, :data:`KEEP` (``pipeline/deid_keep.csv``:
one row per attribute with its action, its PS3.15 Table E.1-1 action and the reason it is kept).
Everything else is dropped: any private, unknown, retired or unlisted public attribute at any
depth, any sequence not on the list, the file meta information beyond what a file needs, trailing
padding; the 128-byte preamble is zeroed. The keep-list is verified against PS3.15 Table E.1-1 (as
published in the 2026c edition, via the dicom-anonymizer package's tables) by the tests.

Actions of the keep-list:

* ``keep``: copied when its value is valid for its VR (a CS code, a number for DS/IS, a UID...) and
  does not mention any identifier seen in the source header (names and their parts, IDs, accession,
  institution, station, ...): a kept text value that does is blanked, any other such value dropped.
* ``uid``: remapped to ``2.25.<HMAC of the UID under the site key>``: the same UID maps the same way
  in every file and run (series/study structure survives, also across workers and incremental runs).
* ``date``: shifted back by one offset per patient (365–4014 days, from the site key and the
  patient key), so intervals between a patient's studies survive; a dashed or dotted date is
  repaired first, a date that cannot be read is dropped (the file is kept).
* ``empty``: present and empty (type 2 attributes the IODs require). ``pseudonym``: PatientID and
  PatientName become the pseudonymous ``patient_key``. ``age``: ``nnnD|W|M|Y`` only, 90 years and
  over become ``090Y``. ``sequence``: kept, each item rebuilt by the same rules. ``bulk``: pixel data
  and lookup tables, copied as bytes.

Options recorded in DeidentificationMethodCodeSequence (PS3.16 CID 7050): Basic Profile (113100),
Retain Longitudinal Temporal Information with Modified Dates (113107), Retain Patient
Characteristics (113108: sex, age, size, weight stay), Clean Descriptors (113105: the few
descriptors kept are blanked when they mention an identifier).

Key handling (the site secret, never in the repository) is :mod:`pipeline.keys`.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import functools
import hmac
import io
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

log = logging.getLogger(__name__)
# pydicom's value validation on reading warns (and logs) with the offending value in the message: a
# header value is PHI until proven otherwise. The rebuild validates every value it keeps instead.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

#: Bump when the de-identified output of the same input would change; invalidates ingest caches.
DEID_VERSION = "3"
KEEP_FILE = Path(__file__).with_name("deid_keep.csv")
ACTIONS = ("keep", "uid", "date", "empty", "pseudonym", "age", "sequence", "bulk")


@dataclass(frozen=True)
class Keep:
    """One row of the keep-list."""

    keyword: str
    tag: int
    action: str  # one of ACTIONS
    profile: str  # PS3.15 Table E.1-1 action of the Basic Profile ("-": not in the table)
    option: str  # the CID 7050 option code that allows keeping it, where the profile alone would not
    reason: str

    @functools.cached_property
    def vr(self) -> str:
        """The data dictionary's VR (``"US or SS"`` for an ambiguous one)."""
        return _dictionary_vr(self.tag)

    @functools.cached_property
    def vrs(self) -> frozenset[str]:
        """The VRs a stored element of this attribute may have (the dictionary's, one by one)."""
        return frozenset(self.vr.split(" or ")) | {self.vr}


def load_keep(path: Path = KEEP_FILE) -> dict[int, Keep]:
    """The keep-list by tag; raises ValueError on an unknown keyword or action (a bug in the list)."""
    keep: dict[int, Keep] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            tag = tag_for_keyword(row["keyword"])
            if tag is None or row["action"] not in ACTIONS:
                raise ValueError(f"{path}: bad row {row}")
            keep[tag] = Keep(row["keyword"], tag, row["action"], row["profile"], row["option"], row["reason"])
    return keep


KEEP: dict[int, Keep] = load_keep()
#: attributes whose values identify someone: collected from the source header (with every PN element)
#: so that a kept value that repeats one is blanked
IDENTIFIER_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator",
    "AccessionNumber", "StudyID", "AdmissionID", "ReferringPhysicianName", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician", "OperatorsName",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "DetectorID", "ResponsiblePerson", "ResponsibleOrganization",
)
_IDENTIFIER_TAGS = tuple(tag_for_keyword(k) for k in IDENTIFIER_KEYWORDS)
_BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_BINARY_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "UV": 8, "SV": 8}
_BINARY_VRS = frozenset(_BINARY_SIZE)
_MAX_OPEN_VM = 16  # values a kept binary attribute of VM "1-n" may have (none on the list needs more)
#: palette attributes: kept only for PALETTE COLOR images (elsewhere they are bytes nothing reads)
_PALETTE = frozenset(tag_for_keyword(f"{c}PaletteColorLookupTable{p}") for c in ("Red", "Green", "Blue")
                     for p in ("Descriptor", "Data"))


@functools.lru_cache(maxsize=256)
def _max_vm(tag: int) -> int:
    """The most values the data dictionary allows (``1-n`` and the like: :data:`_MAX_OPEN_VM`)."""
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return 1
    top = vm.split("-")[-1]
    return int(top) if top.isdigit() else _MAX_OPEN_VM
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "CS", "AE", "PN", "UR"})
_CS = re.compile(r"^[A-Z0-9 _]{0,16}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AGE = re.compile(r"^([0-9]{3})([DWMY])$")
_DATE_FORMS = (re.compile(r"^([0-9]{4})([0-9]{2})([0-9]{2})$"), re.compile(r"^([0-9]{4})[-./]([0-9]{2})[-./]([0-9]{2})$"))
_MAX_VALUE_BYTES = 1024  # a kept non-bulk value longer than this is not a header value
#: Options of the output's DeidentificationMethodCodeSequence (PS3.16 CID 7050)
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113105", "Clean Descriptors Option"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)
#: the file meta elements a written file carries (PS3.10); every other group 2 element is dropped
_META_KEEP = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")


def is_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid UID (digits and dots, at most 64 characters)."""
    return bool(_UID.match(value)) and len(value) <= 64


def _normalise(text: str) -> str:
    return " ".join(re.split(r"[\s^=,]+", text.lower())).strip()


_NESTED_PN_DEPTH = 8  # sequences nested deeper than this are not searched for names (they are dropped or rebuilt)


def identifiers(ds: Dataset) -> frozenset[str]:
    """Identifier strings of a source header (lower case, ``^``/``=`` as spaces; see :func:`_is_token`).

    The values of :data:`IDENTIFIER_KEYWORDS` and of every PN element, at the top level and inside
    sequences (down to :data:`_NESTED_PN_DEPTH` levels), whole and (names) by component. Used only
    in memory, to blank a kept value that repeats one of them.
    """
    tokens: set[str] = set()
    _collect(ds, set(_IDENTIFIER_TAGS), tokens, _encodings(ds), 0)
    return frozenset(tokens)


def _collect(ds: Dataset, tags: set, tokens: set[str], encodings: list[str], depth: int) -> None:
    """Add the tokens of ``tags`` and of every PN element of ``ds`` to ``tokens``, then those of its
    sequences' items (one pass over each dataset's elements)."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None) or _dictionary_vr(tag)
        if vr == "PN":
            tags.add(tag)
        elif vr == "SQ" and depth < _NESTED_PN_DEPTH:
            try:
                items = ds[tag].value or []
            except Exception:  # noqa: BLE001 - an unparsable sequence is dropped by the rebuild anyway
                continue
            for item in items:
                if isinstance(item, Dataset):
                    _collect(item, set(), tokens, encodings, depth + 1)
    for tag in tags:
        raw = ds.get_item(tag) if tag in ds else None
        if raw is None or not raw.value:
            continue
        value = raw.value
        if isinstance(value, bytes):
            try:
                value = decode_bytes(value, encodings, set())
            except Exception:  # noqa: BLE001 - undecodable in the declared character set: its bytes still count
                value = value.decode("latin-1")
        for item in value.split("\\") if isinstance(value, str) else (value if isinstance(value, (list, tuple)) else [value]):
            text = _normalise(str(item))
            tokens.update(t for t in (text, *text.split()) if _is_token(t))


def _is_token(text: str) -> bool:
    """Long enough to look for: 3 characters, or 2 outside ASCII (CJK names are 1–2 characters a part)."""
    return len(text) >= 3 or (len(text) == 2 and not text.isascii())


def _encodings(ds: Dataset) -> list[str]:
    """The Python codecs of a dataset's SpecificCharacterSet (pydicom gives a str for a single one)."""
    encodings = ds._character_set
    return [encodings] if isinstance(encodings, str) else list(encodings)


def _mentions(value: object, tokens: frozenset[str]) -> bool:
    if not tokens:
        return False
    text = _normalise(value.decode("latin-1", "replace") if isinstance(value, bytes) else str(value))
    return any(token in text for token in tokens)


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed, deterministic pseudonyms and de-identification for one secret key."""

    key: bytes

    def token(self, kind: str, value: str) -> str:
        """HMAC-SHA256 of ``value`` in namespace ``kind``, hex (irreversible without the key)."""
        return hmac.digest(self.key, f"{kind}\x00{value}".encode(), "sha256").hex()

    def patient_key(self, patient_id: str, issuer: str = "") -> str:
        """Pseudonymous patient key, e.g. ``P-5KQ2M7XJ3LRA``: same patient → same key, for this key."""
        digest = hmac.digest(self.key, f"patient\x00{issuer}\x00{patient_id}".encode(), "sha256")
        return "P-" + base64.b32encode(digest[:10]).decode()[:12]

    def site_key(self, institution: str, manufacturer: str = "") -> str:
        """Pseudonymous site key (institution names are removed from the data)."""
        return "site-" + self.token("site", f"{institution}\x00{manufacturer}")[:8]

    def file_id(self, relpath: str) -> str:
        """Keyed id of an input path (paths often hold names and MRNs): what outputs show instead."""
        return "f-" + self.token("file", relpath)[:16]

    def uid(self, uid: str) -> str:
        """The remapped UID: ``2.25.`` and 128 bits of an HMAC of the original (at most 44 characters)."""
        digest = hmac.digest(self.key, f"uid\x00{uid}".encode(), "sha256")
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    def date_shift(self, patient_key: str) -> dt.timedelta:
        """The patient's date offset: 365 to 4014 days back, one per patient and key."""
        digest = hmac.digest(self.key, f"date-shift\x00{patient_key}".encode(), "sha256")
        return dt.timedelta(days=365 + int.from_bytes(digest[:4], "big") % 3650)

    def deidentify(self, ds: Dataset, patient_key: str) -> Dataset:
        """A new, de-identified dataset rebuilt from ``ds`` by :data:`KEEP` (file meta included).

        ``ds`` is not changed. Raises what pydicom raises for an element that cannot be decoded at
        all; every other problem drops the element.
        """
        tokens = identifiers(ds)
        out = _Rebuild(self, patient_key, tokens).dataset(ds)
        out.LongitudinalTemporalInformationModified = "MODIFIED"
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = f"medtl v{DEID_VERSION} allow-list PS3.15 Basic Profile"  # LO: <= 64 chars
        meta = FileMetaDataset()
        source_meta = getattr(ds, "file_meta", None)
        transfer_syntax = source_meta.get("TransferSyntaxUID") if source_meta is not None else None
        meta.TransferSyntaxUID = pydicom.uid.UID(transfer_syntax or pydicom.uid.ImplicitVRLittleEndian)
        out[_METHOD_CODES_TAG] = _method_codes(meta.TransferSyntaxUID.is_implicit_VR,
                                               meta.TransferSyntaxUID.is_little_endian)
        source_class = str(source_meta.get("MediaStorageSOPClassUID", "")) if source_meta is not None else ""
        if "SOPClassUID" not in out and is_uid(source_class):
            out.SOPClassUID = source_class  # type 1, but some writers leave it to the file meta
        if "SOPClassUID" in out:
            meta.MediaStorageSOPClassUID = out.SOPClassUID
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        out.file_meta = meta
        out.preamble = b"\x00" * 128
        return out


_METHOD_CODES_TAG = Tag(tag_for_keyword("DeidentificationMethodCodeSequence"))
_LUT_DATA = Tag(tag_for_keyword("LUTData"))
_PHOTOMETRIC = Tag(tag_for_keyword("PhotometricInterpretation"))
#: native pixel data elements and the bits of one sample (PixelData: BitsAllocated)
_NATIVE_PIXELS = {Tag(tag_for_keyword("PixelData")): None, Tag(tag_for_keyword("FloatPixelData")): 32,
                  Tag(tag_for_keyword("DoubleFloatPixelData")): 64}
_UNDEFINED_LENGTH = 0xFFFFFFFF


def peek(ds: Dataset, keyword: str, default: object = None) -> object:
    """``ds.get(keyword, default)`` without converting the element in place.

    pydicom's ``get`` replaces a raw element by its decoded value in the dataset; a rebuilt copy of
    such an element can no longer be written as the bytes it was read as (:func:`encode`'s fast path),
    so what ingest reads before the rebuild goes through here. Raises what pydicom's conversion raises.
    """
    tag = _keyword_tag(keyword)
    if tag is None or tag not in ds:
        return default
    elem = ds.get_item(tag)
    if elem is None:
        return default
    if elem.is_raw:
        elem = convert_raw_data_element(elem, encoding=ds._character_set, ds=ds)
    return elem.value


@functools.lru_cache(maxsize=512)
def _keyword_tag(keyword: str) -> Tag | None:
    tag = tag_for_keyword(keyword)
    return None if tag is None else Tag(tag)


def _header_int(source: Dataset, keyword: str, default: int) -> int:
    try:
        value = peek(source, keyword, default)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def declared_pixel_bytes(source: Dataset, bits: int | None = None) -> int:
    """Bytes the header says native pixels take: rows × columns × frames × samples × bits / 8."""
    frames = max(_header_int(source, "NumberOfFrames", 1), 1)
    samples = max(_header_int(source, "SamplesPerPixel", 1), 1)
    bits = bits if bits is not None else _header_int(source, "BitsAllocated", 0)
    return (_header_int(source, "Rows", 0) * _header_int(source, "Columns", 0) * frames * samples * bits + 7) // 8


def _trimmed_pixels(elem: RawDataElement | DataElement, source: Dataset,
                    bits: int | None) -> RawDataElement | DataElement:
    """Native pixel data cut to the length the header declares (bytes past it are not pixels: text can
    hide there); encapsulated (compressed) pixel data is left as it is."""
    encapsulated = elem.length == _UNDEFINED_LENGTH if elem.is_raw else elem.is_undefined_length
    if encapsulated or not isinstance(elem.value, bytes):
        return elem
    declared = declared_pixel_bytes(source, bits)
    if len(elem.value) <= declared + declared % 2:
        return elem
    value = elem.value[:declared] + (b"\0" if declared % 2 else b"")  # even length, the pad byte ours
    if elem.is_raw:
        return elem._replace(value=value, length=len(value))
    return DataElement(elem.tag, elem.VR, value)


@functools.lru_cache(maxsize=8)
def _method_codes(implicit: bool, little: bool) -> RawDataElement:
    """DeidentificationMethodCodeSequence, encoded once per encoding (writing a sequence is slow)."""
    codes = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    elem = DataElement(_METHOD_CODES_TAG, "SQ", Sequence(codes))
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
    write_data_element(buffer, elem)
    encoded = buffer.getvalue()
    value = encoded[8:] if implicit else encoded[12:]  # tag, (VR, reserved,) length
    length = int.from_bytes((encoded[4:8] if implicit else encoded[8:12]), "little" if little else "big")
    if length != 0xFFFFFFFF:
        assert length == len(value)
    return RawDataElement(_METHOD_CODES_TAG, None if implicit else "SQ", length, value, 0, implicit, little)


class _Rebuild:
    """One instance's rebuild: the keep-list applied at every depth."""

    def __init__(self, pseudo: Pseudonymizer, patient_key: str, tokens: frozenset[str]):
        self.pseudo, self.patient_key, self.tokens = pseudo, patient_key, tokens
        self.charset = None

    def dataset(self, source: Dataset) -> Dataset:
        out = Dataset()
        encodings = _encodings(source)  # once per dataset: pydicom works it out again on every call
        for tag in source.keys():
            if tag.group == 0x0002:
                continue  # file meta is rebuilt by deidentify
            rule = KEEP.get(tag)
            if rule is None or tag.is_private:
                continue
            elem = self.element(source, tag, rule, encodings)
            if elem is not None:
                out[tag] = elem
        photometric = str(out[_PHOTOMETRIC].value).strip() if _PHOTOMETRIC in out else ""
        if photometric != "PALETTE COLOR":
            for tag in _PALETTE:
                out.pop(tag, None)
        return out

    def element(self, source: Dataset, tag: Tag, rule: Keep,
                encodings: list[str]) -> DataElement | RawDataElement | None:
        """The output element for ``tag``: kept values stay raw (their bytes are written as read)."""
        action = rule.action
        expected = rule.vr
        if action == "pseudonym":
            return DataElement(tag, expected, self.patient_key)
        if action == "empty":
            return DataElement(tag, expected, "")
        raw = source.get_item(tag)
        if raw is None:
            return None
        if raw.VR is not None and raw.VR not in rule.vrs and raw.VR != "UN":
            return None  # stored under another VR: whatever it holds, it is not this attribute's value
        if action == "bulk":
            if tag in _PALETTE or tag == _LUT_DATA:  # tables, not pixels: text hidden in them is dropped
                return None if _mentions(raw.value if isinstance(raw.value, bytes) else b"", self.tokens) else raw
            if tag in _NATIVE_PIXELS:
                return _trimmed_pixels(raw, source, _NATIVE_PIXELS[tag])
            return raw
        if action == "sequence":
            elem = source[tag]
            if elem.VR != "SQ":
                return None
            return DataElement(tag, "SQ", Sequence([self.dataset(item) for item in (elem.value or [])]))
        if raw.is_raw and raw.VR != "UN" and action == "keep":
            return self.checked_raw(raw, raw.VR or expected, encodings)
        elem = convert_raw_data_element(raw, encoding=encodings, ds=source) if raw.is_raw else raw
        if elem.VR not in rule.vrs:
            return None
        value = elem.value
        if value is None or value == "":
            return elem
        if action == "uid":
            return DataElement(tag, "UI", self.pseudo.uid(str(value)))
        if action == "date":  # an unreadable date is dropped (present and empty): the file is kept
            shifted = _shift_date(str(value), self.pseudo.date_shift(self.patient_key))
            return DataElement(tag, "DA", shifted or "")
        if action == "age":
            match = _AGE.match(str(value).strip())
            if not match:
                return None
            number, unit = int(match.group(1)), match.group(2)
            return DataElement(tag, "AS", "090Y" if unit == "Y" and number >= 90 else f"{number:03d}{unit}")
        checked = self.checked(elem)
        if checked is elem and raw.is_raw and raw.VR in (None, elem.VR):
            return raw  # valid and clean: its bytes as read (no re-encoding)
        return checked

    def checked_raw(self, raw: RawDataElement, vr: str,
                    encodings: list[str]) -> RawDataElement | DataElement | None:
        """``keep`` on the bytes as read: the same rules as :meth:`checked` without decoding into objects
        (what most of the rebuild's time went to); the raw element is then written as read."""
        value = raw.value
        if not value:
            return raw
        if vr in _BULK_VRS or vr == "SQ":
            return None
        if vr in _BINARY_VRS:
            size = _BINARY_SIZE[vr]
            count, odd = divmod(len(value), size)
            if odd or count > _max_vm(raw.tag) or _mentions(value, self.tokens):
                return None  # not this attribute's values: a binary field is a classic place to hide text
            return raw
        if len(value) > _MAX_VALUE_BYTES:
            return None
        if vr in _TEXT_VRS:
            try:
                text = decode_bytes(value, encodings, set())
            except Exception:  # noqa: BLE001 - not text in the declared character set
                return None
        else:
            text = value.decode("ascii", "replace")
        values = [v.strip(" \x00") for v in text.split("\\")]
        if vr == "CS" and not all(_CS.match(v) for v in values):
            return None
        if vr in {"DS", "IS"}:
            try:
                numbers = [float(v) for v in values if v]
            except ValueError:
                return None
            return raw if all(math.isfinite(n) for n in numbers) else None
        if vr == "UI" and not all(is_uid(v) for v in values if v):
            return None
        if _mentions(text, self.tokens):
            return DataElement(raw.tag, vr, "") if vr in _TEXT_VRS else None
        return raw

    def checked(self, elem: DataElement) -> DataElement | None:
        """``keep``: the element when its value is valid for its VR and mentions no identifier."""
        vr, value = elem.VR, elem.value
        values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
        if vr in _BULK_VRS or vr == "SQ":
            return None  # only ``bulk``/``sequence`` rows may carry these
        if vr in _BINARY_VRS:
            return elem if len(values) <= _max_vm(elem.tag) else None
        text = "\\".join(str(v) for v in values)
        if len(text.encode("utf-8", "replace")) > _MAX_VALUE_BYTES:
            return None
        if vr == "CS" and not all(_CS.match(str(v)) for v in values):
            return None
        if vr in {"DS", "IS"}:
            try:
                numbers = [float(v) for v in values]
            except (TypeError, ValueError):
                return None
            return elem if all(n == n and abs(n) != float("inf") for n in numbers) else None
        if vr == "UI" and not all(is_uid(str(v)) for v in values):
            return None
        if _mentions(text, self.tokens):
            return DataElement(elem.tag, vr, "") if vr in _TEXT_VRS else None
        return elem


_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
#: VRs of the values the rebuild creates (UIDs, dates, pseudonyms, empties, ages, method text), which
#: :func:`encode`'s fast path packs itself when the value is one ASCII string
_SIMPLE_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "LO", "LT", "PN", "SH", "ST", "UI"})
_META_UIDS = (0x00020002, 0x00020003, 0x00020010)  # the rebuilt file meta's elements (see deidentify)


def encode(ds: Dataset, *, fast: bool = True) -> bytes:
    """The file bytes of a rebuilt dataset: zero preamble, ``DICM``, file meta, then each element.

    Elements are written one by one, so kept raw elements go out as the bytes they were read as
    (pydicom's dataset writer would decode and re-encode each of them). ``fast``: for little-endian
    syntaxes, a raw element of defined, even length gets its 8- or 12-byte header packed here, and so
    do the one-ASCII-string values the rebuild creates and the file meta, exactly as pydicom's
    ``write_file_meta_info`` and ``write_data_element`` write them (tests compare the two); everything
    else goes through pydicom's writers. A deflated transfer syntax goes through pydicom's ``dcmwrite``.
    """
    syntax = pydicom.uid.UID(ds.file_meta.TransferSyntaxUID)
    if syntax.is_deflated:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    meta = _meta_bytes(ds.file_meta) if fast else None
    if meta is None:
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    else:
        fp.write(meta)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    encodings = ds._character_set
    chunks: list[bytes] = []
    for tag in sorted(ds.keys()):
        elem = ds.get_item(tag)
        packed = _packed(elem, implicit) if fast and little else None
        if packed is None:
            if chunks:
                fp.write(b"".join(chunks))
                chunks = []
            write_data_element(fp, elem, encodings)
        else:
            chunks += packed
    fp.write(b"".join(chunks))
    return fp.getvalue()


def _packed(elem, implicit: bool) -> tuple[bytes, bytes] | None:
    """(header, value) of an element the fast path writes itself (little endian); None: pydicom writes it."""
    if getattr(elem, "is_raw", False):
        header = _raw_header(elem, implicit)
        return None if header is None else (header, elem.value)
    value = _simple_value(elem)
    if value is None:
        return None
    return _header(elem.tag, None if implicit else elem.VR, len(value)), value


def _raw_header(elem, implicit: bool) -> bytes | None:
    """Little-endian element header of a raw element of defined, even length; None: let pydicom write it."""
    if elem.length == 0xFFFFFFFF or not isinstance(elem.value, bytes):
        return None
    length, vr = len(elem.value), elem.VR
    if length % 2 or (vr is None) != implicit or vr == "SQ":
        return None
    return _header(elem.tag, vr, length)


def _header(tag: int, vr: str | None, length: int) -> bytes | None:
    """Little-endian header: implicit (``vr`` None), or explicit with a 2- or 4-byte length by VR."""
    packed_tag = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if vr is None:
        return packed_tag + struct.pack("<I", length)
    if vr in _LONG_VRS:
        return packed_tag + vr.encode("ascii") + b"\x00\x00" + struct.pack("<I", length)
    if length > 0xFFFF:
        return None
    return packed_tag + vr.encode("ascii") + struct.pack("<H", length)


def _simple_value(elem: DataElement) -> bytes | None:
    """The value bytes of a one-ASCII-string element of a text VR (padded to even length as pydicom
    pads: UI with NUL, the rest with a space); None for anything else."""
    vr, value = elem.VR, elem.value
    if value is None or value == "":
        return b"" if vr and len(vr) == 2 and vr != "SQ" else None  # present and empty: length 0
    if vr not in _SIMPLE_TEXT_VRS:
        return None
    if isinstance(value, pydicom.valuerep.PersonName):
        value = str(value)
    if not isinstance(value, str) or not value.isascii() or "\\" in value:
        return None
    data = value.encode("ascii")
    return data + (b"\x00" if vr == "UI" else b" ") if len(data) % 2 else data


def _meta_bytes(meta: FileMetaDataset) -> bytes | None:
    """The file meta group as ``write_file_meta_info(enforce_standard=True)`` writes the rebuilt meta
    (its three UIDs, plus the version, implementation UID and name pydicom adds); None: anything else
    (then pydicom writes it, or raises for what is missing)."""
    if sorted(meta.keys()) != list(_META_UIDS):
        return None
    parts = [_META_VERSION]
    for tag in _META_UIDS:
        elem = meta.get_item(tag)
        value = _simple_value(elem) if elem.VR == "UI" else None
        if not value:
            return None
        parts.append(_header(tag, "UI", len(value)) + value)
    parts.append(_META_IMPLEMENTATION)
    body = b"".join(parts)
    return _header(0x00020000, "UL", 4) + struct.pack("<I", len(body)) + body


def _packed_text(tag: int, vr: str, text: str) -> bytes:
    value = _simple_value(DataElement(tag, vr, text))
    return _header(tag, vr, len(value)) + value


#: the file meta elements that are the same in every file: the version, and the implementation UID and
#: name pydicom's writer adds
_META_VERSION = _header(0x00020001, "OB", 2) + b"\x00\x01"
_META_IMPLEMENTATION = (_packed_text(0x00020012, "UI", pydicom.uid.PYDICOM_IMPLEMENTATION_UID)
                        + _packed_text(0x00020013, "SH", f"PYDICOM {'.'.join(pydicom.__version_info__)}"))


def _shift_date(value: str, shift: dt.timedelta) -> str | None:
    """``value`` (YYYYMMDD, or the dashed/dotted forms old exports write) shifted back; None if unreadable."""
    for form in _DATE_FORMS:
        match = form.match(value.strip())
        if match:
            try:
                date = dt.date(*(int(g) for g in match.groups()))
            except ValueError:
                return None
            return (date - shift).strftime("%Y%m%d")
    return None

"""Property tests: ingest on mutated headers never raises, accounts for every file once, and leaks
no planted identifier.

Each example writes a handful of files, each a small valid instance (DX, CR, CT with geometry, or
RLE-compressed) carrying a fake identity (name, ID, accession, physicians, institution) in one of
several character sets, then mutated:

* header mutations: random attributes from pydicom's dictionary (biased to the keep-list) set to
  random values under their own or a random VR (identifiers of the identity among the values, so a
  de-identifier that keeps the attribute must blank them), required attributes deleted, elements
  re-encoded under a wrong VR (identifiers included), nested sequences (kept ones and others, up to
  three levels) with identifiers in their text and private/unknown tags;
* byte mutations: element lengths set to wrong values, bytes overwritten, the file cut short. These
  touch only bytes after the last element that carries an identifier, so that what a de-identifier
  can know (the identity, as parsed from the header) is the same as what was planted.

Identifier components are at least 4 characters (3 for CJK): the two-character ideographic family
name case (山田) is in the fixed corpus (tests/hostile.py), not here.

Bounded for CI: ``max_examples`` 25 per test, ``derandomize=True``, no example database,
``workers=1``; the file runs in well under a minute.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from pipeline import deid, ingest
from tests import hostile
from tests.conftest import TEST_KEY
from tests.phi_scan import Needles, capture_logs, dicom_problems, locate_leaks, scan_outputs, walk_elements

#: MEDTL_HOSTILE_EXAMPLES=500 for a longer (random, not derandomized) local run
_EXAMPLES = int(os.environ.get("MEDTL_HOSTILE_EXAMPLES", "0") or 0)
#: no shrinking by default: a failing example is reported as generated (shrinking one can take minutes);
#: MEDTL_HOSTILE_SHRINK=1 shrinks it
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("MEDTL_HOSTILE_SHRINK") else [])
SETTINGS = settings(max_examples=_EXAMPLES or 25, deadline=None, derandomize=not _EXAMPLES, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False, phases=_PHASES)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about what the mutations break

# -- identities by character set --------------------------------------------------------------------

#: SpecificCharacterSet value -> (family names, given names, institutions); None: no charset (ASCII)
NAMES = {
    None: (["MUSTERFRAU", "KRZYWANOWSKI", "OYELARAN", "ABERNATHY", "VANDERSLOOT", "QUIGLEYSON"],
           ["WALPURGA", "THADDEUS", "OLUWASEUN", "GWENDOLYN"], ["Klinikum Hinterzarten", "Saint Wolfgang Infirmary"]),
    "ISO_IR 100": (["MÜLLERSOHN", "GRÖßMANN", "JOHANSSÖN", "DÉSIRÉEFILS"], ["JÜRGENA", "BÄRBELINE", "SØREN"],
                   ["Universitätsspital Zürichberg", "Hôpital Sainte-Thérèse"]),
    "ISO_IR 192": (["Ковалевская", "Παπαδημητρίου", "Nguyễnthị", "Øvrebøgård"], ["Пелагея", "Νικόλαος", "Thuỷtiên"],
                   ["Больница Сосновоборск", "Νοσοκομείο Καλαμάτας"]),
    "ISO_IR 144": (["Достоевская", "Ковалевская"], ["Пелагея", "Евдокия"], ["Больница Сосновоборск"]),
    "ISO 2022 IR 87": (["Hasegawa=長谷川=はせがわ", "Sasaki=佐々木=ささき"], ["Kentarou=健太郎=けんたろう", "Minako=美奈子=みなこ"],
                       ["長谷川記念病院"]),
    "ISO_IR 999": (["UNBEKANNTSATZ", "FALSCHKODIERT"], ["HERMENEGILD", "KUNIGUNDE"], ["Spital Nirgendwo"]),
}


def _pn(family: str, given: str) -> str:
    """A PN value; for ISO 2022 the groups are alphabetic=ideographic=phonetic."""
    if "=" not in family:
        return f"{family}^{given}"
    return "=".join(f"{f}^{g}" for f, g in zip(family.split("="), given.split("=")))


@st.composite
def identities(draw) -> tuple[str | None, hostile.Identity]:
    charset = draw(st.sampled_from(list(NAMES)))
    families, givens, institutions = NAMES[charset]
    number = draw(st.integers(100000, 999999))
    ident = hostile.Identity(
        patient_name=_pn(draw(st.sampled_from(families)), draw(st.sampled_from(givens))),
        patient_id=f"PX{number}Q", accession=f"AX{number + 1}Z",
        referring=_pn(draw(st.sampled_from(families)), draw(st.sampled_from(givens))),
        operator=_pn(draw(st.sampled_from(families)), draw(st.sampled_from(givens))),
        institution=draw(st.sampled_from(institutions)))
    return charset, ident


#: attributes that carry the identity: never deleted or overwritten (the de-identifier learns the
#: identity from them), and the byte mutations keep away from them
IDENTITY_KEYWORDS = ("PatientName", "PatientID", "AccessionNumber", "ReferringPhysicianName", "OperatorsName",
                     "InstitutionName", "SpecificCharacterSet")
IDENTITY_TAGS = frozenset(tag_for_keyword(k) for k in IDENTITY_KEYWORDS)
_KEEP = sorted(r.keyword for r in getattr(deid, "KEEP", {}).values()) or ["Manufacturer", "ManufacturerModelName",
                                                                          "BodyPartExamined", "ImageType"]
_ALL = sorted(v[4] for t, v in DicomDictionary.items()
              if v[4] and t >> 16 not in (0x0002, 0xFFFE) and v[0] != "SQ" and v[4] not in IDENTITY_KEYWORDS
              and v[4] not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "DataSetTrailingPadding"))
_KEEP_SET = [k for k in _KEEP if k not in IDENTITY_KEYWORDS and k in _ALL]
VRS = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "PN",
       "SH", "SL", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV")
TEXT_VRS = ("LO", "SH", "UT", "PN", "UN", "LT", "ST", "UC")
REQUIRED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelData", "SOPInstanceUID", "StudyInstanceUID",
            "SeriesInstanceUID", "SOPClassUID", "PatientID", "Modality", "PhotometricInterpretation",
            "SamplesPerPixel", "TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
SEQUENCES = ("VOILUTSequence", "ModalityLUTSequence", "SharedFunctionalGroupsSequence",
             "PerFrameFunctionalGroupsSequence", "PixelMeasuresSequence", "FrameContentSequence",
             "AcquisitionContextSequence", "ReferencedImageSequence", "RequestAttributesSequence", "ContentSequence",
             "private")
ITEM_TEXT = ("TextValue", "LUTExplanation", "CodeMeaning", "PatientName", "InstitutionName", "Manufacturer",
             "PersonName", "private", "unknown")


# -- mutations --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetAttr:
    keyword: str
    vr: str | None  # None: the dictionary VR
    value: object  # str, int, bytes
    odd: bool = False  # leave an odd value length as it is


@dataclass(frozen=True)
class Delete:
    keyword: str


@dataclass(frozen=True)
class WrongVR:
    keyword: str
    vr: str


@dataclass(frozen=True)
class AddSequence:
    keyword: str
    items: tuple  # of tuples of (keyword, value) or AddSequence (nested)


@dataclass(frozen=True)
class CorruptLength:
    pick: float
    length: int


@dataclass(frozen=True)
class Overwrite:
    at: float
    data: bytes


@dataclass(frozen=True)
class Truncate:
    at: float


@dataclass(frozen=True)
class FileSpec:
    kind: str
    charset: str | None
    identity: hostile.Identity
    mutations: tuple


def _value(draw, tokens: list[str]) -> object:
    return draw(st.one_of(
        st.sampled_from(tokens),
        st.builds(lambda a, t, b: f"{a}{t}{b}", st.sampled_from(["", "see ", "Dr ", "x^"]), st.sampled_from(tokens),
                  st.sampled_from(["", " ok", "^", " 2"])),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabc0123456789 ^-.\\", max_size=20),
        st.integers(-(2**31), 2**31 - 1),
        st.binary(max_size=24),
    ))


@st.composite
def sequences(draw, tokens: list[str], depth: int = 0) -> AddSequence:
    items = []
    for _ in range(draw(st.integers(1, 2))):
        elements = [(draw(st.sampled_from(ITEM_TEXT)), draw(st.sampled_from(tokens)))
                    for _ in range(draw(st.integers(1, 3)))]
        if depth < 2 and draw(st.booleans()):
            elements.append(draw(sequences(tokens, depth + 1)))
        items.append(tuple(elements))
    return AddSequence(draw(st.sampled_from(SEQUENCES)), tuple(items))


@st.composite
def file_specs(draw, header: bool = True, corrupt: bool = False) -> FileSpec:
    charset, ident = draw(identities())
    tokens = sorted(ident.phi())
    mutations = []
    if header:
        for _ in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(["set", "set", "set", "delete", "wrong_vr", "sequence"]))
            if kind == "set":
                keyword = draw(st.one_of(st.sampled_from(_KEEP_SET), st.sampled_from(_ALL)))
                mutations.append(SetAttr(keyword, draw(st.one_of(st.none(), st.sampled_from(VRS))),
                                         _value(draw, tokens), draw(st.booleans())))
            elif kind == "delete":
                mutations.append(Delete(draw(st.sampled_from(REQUIRED))))
            elif kind == "wrong_vr":
                keyword = draw(st.sampled_from(["Rows", "Columns", "BitsAllocated", "Modality", "StudyDate",
                                                "SeriesNumber", "PixelSpacing", "ImageType", *IDENTITY_KEYWORDS[:-1]]))
                vrs = TEXT_VRS if keyword in IDENTITY_KEYWORDS else VRS
                mutations.append(WrongVR(keyword, draw(st.sampled_from(vrs))))
            else:
                mutations.append(draw(sequences(tokens)))
    if corrupt:
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["length", "overwrite", "truncate"]))
            at = draw(st.floats(0, 1, allow_nan=False))
            if kind == "length":
                lengths = st.one_of(st.sampled_from([0, 1, 3, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFE]),
                                    st.integers(0, 2**32 - 1))
                mutations.append(CorruptLength(at, draw(lengths)))
            elif kind == "overwrite":
                mutations.append(Overwrite(at, draw(st.binary(min_size=1, max_size=8))))
            else:
                mutations.append(Truncate(at))
    return FileSpec(draw(st.sampled_from(["DX", "CR", "CT", "RLE", "implicit"])), charset, ident, tuple(mutations))


# -- building a file -----------------------------------------------------------------------------


def _first_vr(vr: str) -> str:
    return vr.split(" or ")[0] if vr else "UN"


def _encode(value: object, vr: str, encodings: list[str], odd: bool) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, int):
        data = _pack(value, vr)
    else:
        try:
            data = encode_string(str(value), encodings)
        except Exception:  # noqa: BLE001 - not encodable in the charset: UTF-8 bytes under a wrong charset
            data = str(value).encode("utf-8")
    if len(data) % 2 and not odd:
        data += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    return data


_PACKS = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i", "FL": "<f", "FD": "<d", "UV": "<Q", "SV": "<q"}


def _pack(value: int, vr: str) -> bytes:
    """An int in the binary form of ``vr`` (wrapped into range), or as text for other VRs."""
    if vr == "AT":
        return struct.pack("<HH", value & 0xFFFF, (value >> 16) & 0xFFFF)
    fmt = _PACKS.get(vr)
    if fmt is None:
        return str(value).encode()
    if fmt[-1] in "fd":
        return struct.pack(fmt, float(value))
    bits = 8 * struct.calcsize(fmt)
    wrapped = value % (1 << bits)
    if fmt[-1].islower():  # signed
        wrapped = (value + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))
    return struct.pack(fmt, wrapped)


def _item(elements: tuple, charset) -> Dataset:
    ds = Dataset()
    for element in elements:
        if isinstance(element, AddSequence):
            _add_sequence(ds, element, charset)
            continue
        keyword, value = element
        if keyword == "private":
            hostile.private_block(ds, 0x0029, "HXPRIV", {0x01: ("LO", value)})
        elif keyword == "unknown":
            ds.add(DataElement(hostile.UNKNOWN_LO, "LO", value))
        else:
            setattr(ds, keyword, value)
    return ds


def _add_sequence(ds: Dataset, spec: AddSequence, charset) -> None:
    items = Sequence([_item(elements, charset) for elements in spec.items])
    if spec.keyword == "private":
        ds.add(DataElement(Tag(0x0009, 0x0010), "LO", "HXPRIVSEQ"))
        ds.add(DataElement(Tag(0x0009, 0x1010), "SQ", items))
    else:
        setattr(ds, spec.keyword, items)


def _remove(data: bytes, tag: int) -> bytes:
    elements, _ = walk_elements(data)
    for element in elements:
        if element.depth == 0 and element.tag == tag:
            return data[:element.start] + data[element.end:]
    return data


def build(spec: FileSpec, seed: int) -> tuple[bytes, set[str], str]:
    """The file's bytes, the identifiers planted in it, and its StudyInstanceUID (for the labels)."""
    with hostile.lenient():
        if spec.kind == "RLE":
            ds = hostile.base_instance("DX", seed=seed, transfer_syntax=RLELossless)
            ds.PixelData = pydicom.encaps.encapsulate([_rle_frame(hostile.pixels(seed))])
        else:
            ds = hostile.base_instance("CR" if spec.kind == "implicit" else spec.kind, seed=seed,
                                       transfer_syntax=ImplicitVRLittleEndian if spec.kind == "implicit"
                                       else ExplicitVRLittleEndian)
        if spec.charset:
            ds.SpecificCharacterSet = spec.charset.split("\\") if "2022" not in spec.charset else ["", spec.charset]
        spec.identity.apply(ds)
        for mutation in spec.mutations:
            if isinstance(mutation, AddSequence):
                _add_sequence(ds, mutation, spec.charset)
        data = hostile.dataset_bytes(ds)
    study = str(ds.StudyInstanceUID)
    explicit = spec.kind != "implicit"
    encodings = convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6") \
        if spec.charset != "ISO_IR 999" else ["iso8859"]
    for mutation in spec.mutations:
        try:
            data = _apply(data, mutation, explicit, encodings)
        except ValueError:
            continue  # an earlier mutation left bytes the walker cannot follow: the file is what it is
    planted = spec.identity.phi() | {study, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    data = _corrupt(data, [m for m in spec.mutations if isinstance(m, (CorruptLength, Overwrite, Truncate))],
                    planted, explicit)
    return data, planted, study


def _apply(data: bytes, mutation, explicit: bool, encodings: list[str]) -> bytes:
    """One raw header mutation (SetAttr, Delete, WrongVR) applied to a file's bytes."""
    if isinstance(mutation, SetAttr):
        tag = tag_for_keyword(mutation.keyword)
        vr = mutation.vr or _first_vr(dictionary_VR(tag))
        vr = "UN" if vr == "SQ" else vr
        data = _remove(data, tag)
        raw = hostile.encode_element(tag, vr, _encode(mutation.value, vr, encodings, mutation.odd),
                                     explicit=explicit)
        data = hostile.insert_raw(data, raw, tag)
    elif isinstance(mutation, Delete):
        data = _remove(data, tag_for_keyword(mutation.keyword))
    elif isinstance(mutation, WrongVR) and explicit:
        tag = tag_for_keyword(mutation.keyword)
        elements, _ = walk_elements(data)
        found = next((e for e in elements if e.depth == 0 and e.tag == tag and e.length != 0xFFFFFFFF), None)
        if found is not None:
            value = data[found.value_start:found.end]
            data = data[:found.start] + hostile.encode_element(tag, mutation.vr, value) + data[found.end:]
    return data


def _rle_frame(pixels) -> bytes:
    """A real RLE Lossless frame of 16-bit pixels (two byte segments, literal runs)."""
    raw = pixels.astype("<u2").tobytes()
    segments = [raw[1::2], raw[0::2]]  # most significant byte first

    def encode(segment: bytes) -> bytes:
        out = bytearray()
        for i in range(0, len(segment), 128):
            chunk = segment[i:i + 128]
            out += bytes([len(chunk) - 1]) + chunk
        return bytes(out) + (b"\x00" if len(out) % 2 else b"")

    encoded = [encode(s) for s in segments]
    offsets = [64, 64 + len(encoded[0])]
    return struct.pack("<16I", 2, *offsets, *([0] * 13)) + b"".join(encoded)


def _corrupt(data: bytes, mutations: list, planted: set[str], explicit: bool) -> bytes:
    """Byte mutations, only after the last element that carries an identifier (see the module doc)."""
    if not mutations:
        return data
    needles = Needles.of(planted)
    try:
        elements, _ = walk_elements(data)
    except ValueError:
        return data
    top = [e for e in elements if e.depth == 0]
    carrying = [e.end for e in top if e.tag >> 16 == 0x0002 or e.tag in IDENTITY_TAGS
                or needles.in_bytes(data[e.start:e.end])]
    safe = max(carrying, default=132)
    for mutation in mutations:
        if safe >= len(data):
            break
        if isinstance(mutation, Truncate):
            data = data[:safe + int(mutation.at * (len(data) - safe))]
        elif isinstance(mutation, Overwrite):
            at = safe + int(mutation.at * (len(data) - safe))
            data = data[:at] + mutation.data + data[at + len(mutation.data):]
        else:
            try:
                candidates = [e for e in walk_elements(data)[0] if e.depth == 0 and e.start >= safe]
            except ValueError:
                continue
            if not candidates:
                continue
            e = candidates[min(int(mutation.pick * len(candidates)), len(candidates) - 1)]
            if not explicit:
                data = data[:e.start + 4] + struct.pack("<I", mutation.length) + data[e.start + 8:]
            elif e.value_start - e.start == 12:
                data = data[:e.start + 8] + struct.pack("<I", mutation.length) + data[e.start + 12:]
            else:
                data = data[:e.start + 6] + struct.pack("<H", mutation.length & 0xFFFF) + data[e.start + 8:]
    return data


# -- the property -------------------------------------------------------------------------------


def _folder(ident: hostile.Identity) -> str:
    family = ident.patient_name.split("=")[0].split("^")[0]
    return f"{family}_{ident.patient_id}"


def check_ingest(specs: list[FileSpec]) -> None:
    """Write ``specs``, ingest them, check the properties. MEDTL_HOSTILE_KEEP=DIR keeps a failing
    example's input and outputs under DIR for a look."""
    with tempfile.TemporaryDirectory(prefix="medtl-hx-") as tmp:
        try:
            _check_ingest(specs, Path(tmp))
        except AssertionError:
            if os.environ.get("MEDTL_HOSTILE_KEEP"):
                keep = Path(os.environ["MEDTL_HOSTILE_KEEP"])
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copytree(tmp, keep / f"example-{len(list(keep.iterdir())):03d}", symlinks=True)
            raise


def _check_ingest(specs: list[FileSpec], tmp: Path) -> None:
    keep = {r.keyword for r in getattr(deid, "KEEP", {}).values()} or None
    root = Path(tmp) / "export"
    phi: set[str] = set()
    studies: set[str] = set()
    relpaths = []
    for i, spec in enumerate(specs):
        data, planted, study = build(spec, seed=i)
        rel = f"{_folder(spec.identity)}/scan_{i}.dcm"  # no hex tail: outputs are named by content hash
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        phi |= planted
        studies.add(study)
        relpaths.append(rel)
    labels = Path(tmp) / "labels.csv"
    labels.write_text("study_instance_uid,label\n" + "".join(f"{s},normal\n" for s in sorted(studies)))
    out = Path(tmp) / "out"
    with capture_logs() as cap:
        summary = ingest.run(ingest.IngestParams(workers=1), root, labels, out, quarantine_dir=Path(tmp) / "q",
                             key=TEST_KEY)
    # every file accounted for exactly once
    assert summary.files_seen == len(specs) == summary.ingested + summary.rejected_total, vars(summary)
    rejected = pd.read_csv(out / "rejected.csv")
    assert len(rejected) == summary.rejected_total
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert int(manifest["n_files"].sum()) == summary.ingested
    # no planted identifier (or input path) anywhere
    leaks = scan_outputs(out, phi, input_paths=relpaths, input_root=root, log_text=cap.text)
    assert not leaks, f"planted identifiers in the outputs: {dict(list(leaks.items())[:6])}; " \
        f"in elements: {locate_leaks(out, leaks, phi)}"
    # and what was written follows the allow-list
    problems = {p.name: dicom_problems(p, keep) for p in sorted((out / "dicom").rglob("*.dcm"))}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"outputs break the allow-list: {problems}"


@SETTINGS
@given(specs=st.lists(file_specs(header=True), min_size=1, max_size=3))
def test_header_mutations_never_break_ingest_or_leak(specs):
    check_ingest(specs)


@SETTINGS
@given(specs=st.lists(file_specs(header=False, corrupt=True), min_size=1, max_size=3))
def test_corrupt_bytes_never_break_ingest_or_leak(specs):
    check_ingest(specs)


@SETTINGS
@given(specs=st.lists(file_specs(header=True, corrupt=True), min_size=2, max_size=4))
def test_mutations_combined_never_break_ingest_or_leak(specs):
    check_ingest(specs)


def test_the_builder_makes_files_ingest_accepts_without_mutations(tmp_path):
    """The unmutated bases (every kind and charset) are ingested: the properties start from valid files."""
    specs = [FileSpec(kind, charset, hostile.Identity(
        _pn(NAMES[charset][0][0], NAMES[charset][1][0]), f"PX{100000 + i}Q", f"AX{100000 + i}Z",
        institution=NAMES[charset][2][0]), ())
        for i, (kind, charset) in enumerate([(k, c) for k in ("DX", "CR", "CT", "RLE", "implicit")
                                              for c in (None, "ISO_IR 192")] + [("DX", c) for c in NAMES])]
    root = tmp_path / "export"
    studies = []
    for i, spec in enumerate(specs):
        data, _, study = build(spec, seed=i)
        (root / f"f{i:02d}.dcm").parent.mkdir(parents=True, exist_ok=True)
        (root / f"f{i:02d}.dcm").write_bytes(data)
        studies.append(study)
        assert pydicom.dcmread(root / f"f{i:02d}.dcm").PatientID == spec.identity.patient_id
    (tmp_path / "labels.csv").write_text("study_instance_uid,label\n" + "".join(f"{s},normal\n" for s in studies))
    summary = ingest.run(ingest.IngestParams(workers=1), root, tmp_path / "labels.csv", tmp_path / "out", key=TEST_KEY)
    assert summary.ingested == len(specs), summary.rejected

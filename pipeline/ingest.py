"""Ingest: take a DICOM export in, de-identified and accounted for.

Every file under the input directory ends up exactly once either in the manifest (as part of an
image unit) or in ``rejected.csv`` with a reason a person can act on. The stage runs in three
phases:

1. **scan** (parallel, cached by content hash): read each file once, classify it, pseudonymise and
   de-identify image instances and write them to ``OUT/dicom/<patient_key>/<study>/<series>/``.
   The per-file record (no PHI: identifiers are kept only as keyed hashes) is appended to
   ``OUT/cache/records.jsonl`` as soon as the file is done, so an interrupted run resumes and a
   rerun after new arrivals processes only new content.
2. **assemble**: join labels (by the key the labels CSV names), find duplicates, group single-frame
   CT/MR/PT slices into volumes and check their geometry (sizes, orientation, duplicate or missing
   slices), decide which files are in.
3. **write**: de-identified files of units that are in (rewriting any that are missing), deletion
   of outputs that are no longer in, ``manifest.parquet``, ``rejected.csv``, ``summary.json``,
   ``lesions.parquet`` (lesion ground truth, see below), and hard links of rejected files in the
   quarantine directory (outside DVC: raw files hold PHI).

Lesion ground truth (optional): a sidecar CSV with one row per image instance that shows a lesion
(:data:`LESION_COLUMNS`: original Study/Series/SOP Instance UIDs, the centre ``row``/``col`` in that
instance's stored pixel grid and the in-plane radius in pixels and mm) is translated to the
pseudonymised keys of the manifest and written as ``lesions.parquet`` (:data:`LESION_OUTPUT_COLUMNS`;
empty without a sidecar). It is never joined into the manifest and never read as a label: it only
serves to measure where a model looks (Grad-CAM localisation). Rows of instances that are not
ingested are dropped and counted.

Manifest: one row per *image unit* — a 2D instance, a multi-frame instance, or a 3D series of
single-frame slices — with ``paths`` (relative to OUT) ordered by slice position for volumes.
"""

from __future__ import annotations

import csv
import contextlib
import dataclasses
import gc
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from pipeline import deid, keys
from pipeline.errors import MedtlError, output_error
from pipeline.fanout import FanoutParams, map_ordered
from pipeline.io_utils import (atomic_write_bytes, atomic_write_text, content_hash, csv_text, is_temp_name,
                               remove_stale_temps)
from pipeline.params import param
from pipeline.sources import BAD_NAME, MB, SPECIAL_FILE, SYMLINK, TOO_LARGE, UNREADABLE, Source
from pipeline.sources.folder import FolderSource

log = logging.getLogger(__name__)

CACHE_VERSION = 2
CACHE_SALT = "medtl-ingest-cache-v2"  # see RecordCache
LABEL_KEYS = ("file", "sop_instance_uid", "series_instance_uid", "study_instance_uid", "accession_number")
#: Columns of the lesion ground-truth sidecar (original UIDs; pixel coordinates 0-based, in the instance's grid).
LESION_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "row", "col", "radius_px",
                  "radius_mm")
#: Columns of ``lesions.parquet``: manifest keys (remapped UIDs), the instance's position in the unit's
#: ``paths`` (``slice_index``; 0 for 2D images), then the sidecar's geometry unchanged.
LESION_OUTPUT_COLUMNS = ("image_id", "patient_key", "study_uid", "series_uid", "sop_instance_uid", "slice_index",
                         "row", "col", "radius_px", "radius_mm")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# SOP classes that carry pixel data but are not images a classifier should see.
NON_IMAGE_WITH_PIXELS = {
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose (a dose grid, not an image)",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation (a label map, not an image)",
}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PIXEL_DATA = pydicom.tag.Tag(0x7FE00010)

# Rejection categories (the part of a reason before the colon); summary.json counts by these.
NOT_DICOM = "not_dicom"
CORRUPT = "corrupt"
DICOMDIR = "dicomdir"
NON_IMAGE = "non_image"
BURNED_IN = "burned_in_annotation"
NO_DECODER = "no_decoder"
NO_PATIENT_ID = "missing_patient_id"
UNLABELLED = "unlabelled"
#: the label of every image when ingest runs without a labels file (``medtl predict``: new studies)
NO_LABEL = ""
DUPLICATE = "duplicate"
INCONSISTENT_SERIES = "inconsistent_series"
CONFLICTING_LABEL = "conflicting_label"
WORKER_DIED = "worker_died"
NEEDS_SITE_KEY = "needs_site_key"


class IngestError(MedtlError):
    """The ingest cannot run as asked (input missing, output inside the input, ...)."""


@dataclass(frozen=True)
class IngestParams:
    """params.yaml ``ingest`` section.

    Attributes:
        workers: processes (or threads, or local Dask workers: see ``fanout``) for the scan and rewrite
            phases; 0 means one per CPU core, 1 runs them in this process.
        verify_pixels: decode compressed pixel data during ingest so a corrupt stream is rejected
            here rather than in preprocessing (uncompressed data is always length-checked).
        volume_modalities: modalities whose single-frame slices of one series form a 3D volume.
        min_volume_slices: fewer slices than this in such a series are treated as 2D images.
        max_gap_ratio: a gap between neighbouring slices larger than this × the median spacing
            means missing slices, and the series is rejected.
        max_file_mb: a larger file is rejected (``too_large``) before it is read.
        max_pixel_mb: an image whose header declares more pixel bytes than this (rows × columns ×
            frames × samples × bits allocated) is rejected before anything is decoded.
    """

    workers: int = param(0, min=0)
    verify_pixels: bool = True
    volume_modalities: tuple[str, ...] = ("CT", "MR", "PT", "NM")
    min_volume_slices: int = param(3, min=2)
    max_gap_ratio: float = param(1.5, min=1.0, min_exclusive=True)
    max_file_mb: float = param(1024.0, min=0.0, min_exclusive=True)
    max_pixel_mb: float = param(1024.0, min=0.0, min_exclusive=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume_modalities", tuple(self.volume_modalities))


@dataclass
class FileRecord:
    """What the scan learned about one input file. Holds no PHI (identifiers are keyed hashes)."""

    content_hash: str
    reason: str = ""  # "category: detail" when rejected at scan, else ""
    output: str = ""  # de-identified file, relative to OUT
    patient_key: str = ""
    k_sop: str = ""  # keyed hashes of the original identifiers, for label joins and grouping
    k_series: str = ""
    k_study: str = ""
    k_accession: str = ""
    sop_uid: str = ""  # remapped UIDs (as written in the de-identified file)
    series_uid: str = ""
    study_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    site: str = ""
    manufacturer: str = ""
    model: str = ""
    image_type: str = ""
    rows: int = 0
    cols: int = 0
    frames: int = 1
    samples_per_pixel: int = 1
    photometric: str = ""
    bits_allocated: int = 0
    bits_stored: int = 0
    pixel_representation: int = 0
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    pixel_spacing: list[float] = field(default_factory=list)  # [row, column] mm
    slice_thickness: float | None = None
    orientation: list[float] = field(default_factory=list)  # ImageOrientationPatient (6)
    position: list[float] = field(default_factory=list)  # ImagePositionPatient (3) mm
    transfer_syntax: str = ""


BREAKDOWN_KEYS = ("by_modality", "by_site", "by_label", "by_transfer_syntax")


@dataclass
class IngestSummary:
    files_seen: int
    ingested: int
    rejected: dict[str, int]
    images: int
    series: int
    studies: int
    patients: int
    by_modality: dict[str, int]
    by_site: dict[str, int]
    by_label: dict[str, int]
    by_transfer_syntax: dict[str, int]
    label_key: str | None
    run: dict[str, Any]
    lesions: dict[str, int] = field(default_factory=dict)  # sidecar rows: {"rows", "kept", "dropped"}

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


# --------------------------------------------------------------------------------------------------
# phase 1: scan one file


@dataclass(frozen=True)
class _ScanContext:
    source: Source
    out_dir: Path
    key: bytes
    params: IngestParams
    known: frozenset[str] = frozenset()  # content hashes already in the cache
    demo: bool = False  # the key is the public demo key: only files synth wrote are accepted
    synthetic: frozenset[str] = frozenset()  # content ids synth's marker lists


_CTX: _ScanContext | None = None
_PSEUDO: deid.Pseudonymizer | None = None


def _init_worker(ctx: _ScanContext) -> None:
    global _CTX, _PSEUDO
    _CTX, _PSEUDO = ctx, deid.Pseudonymizer(ctx.key)


class _BadAttribute(Exception):
    """An attribute ingest needs holds a value of the wrong kind (the keyword, never the value)."""


def _reject(record: FileRecord, category: str, detail: str) -> FileRecord:
    record.reason = f"{category}: {' '.join(detail.split())}"  # one line
    return record


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    try:
        value = deid.peek(ds, keyword, "")
    except Exception:  # noqa: BLE001 - a value that does not decode is a property of the file
        raise _BadAttribute(keyword) from None
    return "" if value is None else str(value).strip()


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    try:
        value = deid.peek(ds, keyword, default)
        return default if value is None or value == "" else int(value)
    except Exception:  # noqa: BLE001 - not a whole number
        raise _BadAttribute(keyword) from None


def _floats(ds: pydicom.Dataset, keyword: str) -> list[float]:
    """The numbers of a DS/FD attribute; an unreadable value counts as absent (the rebuild drops those)."""
    try:
        value = deid.peek(ds, keyword)
        if value is None or value == "":
            return []
        values = [float(v) for v in (value if isinstance(value, Iterable) and not isinstance(value, str) else [value])]
    except Exception:  # noqa: BLE001 - not numbers
        return []
    return values if all(np.isfinite(values)) else []


def _read(data: bytes) -> pydicom.Dataset:
    """Parse a file; values convert lazily (the rebuild decodes only what it keeps)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        # No "DICM" prefix: legacy files without preamble/meta are still DICOM if they parse into a
        # dataset that names its SOP class or has pixel data.
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if not any(k in ds for k in ("SOPClassUID", *PIXEL_KEYWORDS)):
            raise InvalidDicomError("no DICM prefix and no DICOM dataset") from None
    return ds


def _check_pixels(ds: pydicom.Dataset, record: FileRecord, params: IngestParams) -> FileRecord | None:
    """Reject if the pixel data is too large or cannot be decoded here; return None when fine."""
    tsyntax = UID(record.transfer_syntax) if record.transfer_syntax else None
    if "PixelData" not in ds:
        return None  # float pixel data: native by definition
    if not record.rows or not record.cols or "BitsAllocated" not in ds:
        return _reject(record, CORRUPT, "image without Rows/Columns/BitsAllocated")
    for keyword in ("NumberOfFrames", "SamplesPerPixel", "BitsAllocated"):
        _int(ds, keyword, 1)  # a value of the wrong kind: _BadAttribute (the file is rejected as corrupt)
    declared = deid.declared_pixel_bytes(ds)
    if declared > params.max_pixel_mb * MB:
        return _reject(record, TOO_LARGE, f"Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated "
                                          f"declare {declared / MB:.0f} MB of pixels, above ingest.max_pixel_mb "
                                          f"({params.max_pixel_mb:g})")
    if tsyntax is not None and tsyntax.is_compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            return _reject(record, NO_DECODER, f"transfer syntax {tsyntax} ({tsyntax.name}) is not supported")
        if not decoder.is_available:
            missing = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in decoder.missing_dependencies[:3])
            return _reject(record, NO_DECODER, f"no decoder installed for {tsyntax.name} (plugins: {missing})")
        return None  # the stream is decoded once de-identified (_verify_decodes): what preprocess will read
    actual = len(ds.get_item(PIXEL_DATA).value or b"")  # raw: ds.PixelData would convert it in place
    if actual < declared:
        return _reject(record, CORRUPT, f"pixel data truncated ({actual} of {declared} bytes)")
    return None


def _verify_decodes(out: pydicom.Dataset, record: FileRecord) -> FileRecord | None:
    """Decode compressed pixel data to prove the stream is whole (``ingest.verify_pixels``); None when it is.

    Run on the de-identified dataset after it is encoded: it is what preprocess will decode, and
    decoding converts elements in place (the source's raw elements are written as read).
    """
    try:
        out.pixel_array  # noqa: B018 - decode to prove the stream is whole
    except Exception as exc:  # noqa: BLE001 - any decoder failure means an unusable stream
        return _reject(record, CORRUPT, f"compressed pixel data does not decode ({type(exc).__name__})")
    return None


def _scan_bytes(data: bytes, content_hash: str, ctx: _ScanContext, pseudo: deid.Pseudonymizer) -> FileRecord:
    """Classify, de-identify and write one file; a hostile or broken file gives a reason, never an exception."""
    record = FileRecord(content_hash=content_hash)
    try:
        return _scan_dataset(data, record, ctx, pseudo)
    except _BadAttribute as exc:
        return _reject(FileRecord(content_hash=content_hash), CORRUPT, f"attribute {exc} holds a value of the wrong kind")
    except Exception as exc:  # noqa: BLE001 - no file may stop the stage; the type names what failed, never a value
        log.warning("a file could not be processed (%s); it is rejected as corrupt", type(exc).__name__)
        return _reject(FileRecord(content_hash=content_hash), CORRUPT,
                       f"could not be processed ({type(exc).__name__}); if it opens in a DICOM viewer, report it")


def _scan_dataset(data: bytes, record: FileRecord, ctx: _ScanContext, pseudo: deid.Pseudonymizer) -> FileRecord:
    if not data:
        return _reject(record, NOT_DICOM, "empty file")
    try:
        ds = _read(data)
    except InvalidDicomError:
        return _reject(record, NOT_DICOM, "no DICOM preamble/prefix and not a DICOM dataset")
    except Exception as exc:  # noqa: BLE001 - a parser failure is a property of the file
        return _reject(record, CORRUPT, f"cannot be parsed ({type(exc).__name__})")

    meta = getattr(ds, "file_meta", None)
    media_class = _text(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    if media_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return _reject(record, DICOMDIR, "media directory (DICOMDIR) file, holds no image")
    sop_class = UID(_text(ds, "SOPClassUID") or media_class)
    record.sop_class_uid = str(sop_class) if deid.is_uid(str(sop_class)) else ""
    class_name = sop_class.name if record.sop_class_uid else "unknown SOP class"
    if not any(k in ds for k in PIXEL_KEYWORDS):
        if "Image Storage" in class_name:  # an image object that lost its pixels: cut short or stripped
            return _reject(record, CORRUPT, f"{class_name} object without pixel data (truncated or stripped file)")
        return _reject(record, NON_IMAGE, f"{class_name} object without pixel data")
    if record.sop_class_uid in NON_IMAGE_WITH_PIXELS:
        return _reject(record, NON_IMAGE, NON_IMAGE_WITH_PIXELS[record.sop_class_uid])
    if _text(ds, "BurnedInAnnotation").upper() == "YES":
        return _reject(record, BURNED_IN, "BurnedInAnnotation is YES: text in the pixels may identify the patient")

    ts = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    if ts and not deid.is_uid(ts):
        return _reject(record, CORRUPT, "file meta TransferSyntaxUID is not a UID")
    record.transfer_syntax = ts or str(pydicom.uid.ImplicitVRLittleEndian)
    record.rows, record.cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    rejected = _check_pixels(ds, record, ctx.params)
    if rejected is not None:
        return rejected

    patient_id = _text(ds, "PatientID")
    if not patient_id:
        return _reject(record, NO_PATIENT_ID, "no PatientID: the image cannot be assigned to a patient for splitting")
    uids = [_text(ds, k) for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")]
    if not all(uids):
        return _reject(record, CORRUPT, "missing SOP/Series/Study Instance UID")

    # Keyed hashes of the original identifiers: for the label join and grouping, never the values.
    record.patient_key = pseudo.patient_key(patient_id, _text(ds, "IssuerOfPatientID"))
    record.k_sop, record.k_series, record.k_study = (pseudo.token(kind, uid) for kind, uid in
                                                     zip(("sop", "series", "study"), uids))
    accession = _text(ds, "AccessionNumber")
    record.k_accession = pseudo.token("accession", accession) if accession else ""
    record.site = pseudo.site_key(_text(ds, "InstitutionName"), _text(ds, "Manufacturer"))

    try:
        out = pseudo.deidentify(ds, record.patient_key)
    except Exception as exc:  # noqa: BLE001 - never write a file we could not fully de-identify
        return _reject(record, CORRUPT, f"a kept element cannot be read ({type(exc).__name__})")
    # everything else the record holds comes from the de-identified output: the record describes it
    record.sop_uid, record.series_uid, record.study_uid = (str(out.SOPInstanceUID), str(out.SeriesInstanceUID),
                                                           str(out.StudyInstanceUID))
    encoded = deid.encode(out)  # before the record's reads below decode out's raw elements
    record.manufacturer = _text(out, "Manufacturer")
    record.model = _text(out, "ManufacturerModelName")
    record.modality = _text(out, "Modality") or "OT"
    record.image_type = "\\".join(str(v) for v in (out.get("ImageType") or []))
    record.frames = _int(out, "NumberOfFrames", 1)
    record.samples_per_pixel = _int(out, "SamplesPerPixel", 1)
    record.photometric = _text(out, "PhotometricInterpretation")
    record.bits_allocated = _int(out, "BitsAllocated", 0)
    record.bits_stored = _int(out, "BitsStored", record.bits_allocated)
    record.pixel_representation = _int(out, "PixelRepresentation", 0)
    slope, intercept = _floats(out, "RescaleSlope"), _floats(out, "RescaleIntercept")
    record.rescale_slope = slope[0] if slope else 1.0
    record.rescale_intercept = intercept[0] if intercept else 0.0
    record.pixel_spacing = _floats(out, "PixelSpacing") or _floats(out, "ImagerPixelSpacing")
    thickness = _floats(out, "SliceThickness")
    record.slice_thickness = thickness[0] if thickness else None
    record.orientation = _floats(out, "ImageOrientationPatient")
    record.position = _floats(out, "ImagePositionPatient")
    if "Rows" not in out or "Columns" not in out or "BitsAllocated" not in out:
        return _reject(record, CORRUPT, "Rows/Columns/BitsAllocated hold values of the wrong kind")
    if ctx.params.verify_pixels and UID(record.transfer_syntax).is_compressed and "PixelData" in out:
        rejected = _verify_decodes(out, record)
        if rejected is not None:
            return rejected
    record.output = _output_path(record)
    atomic_write_bytes(ctx.out_dir / record.output, encoded, durable=False)  # regenerable from the raw file
    return record


def _output_path(record: FileRecord) -> str:
    # Content-addressed file name: identical inputs give one output, conflicting ones never collide.
    return f"dicom/{record.patient_key}/{record.study_uid}/{record.series_uid}/{record.content_hash[:20]}.dcm"


def _read_input(relpath: str, ctx: _ScanContext) -> tuple[bytes | None, str]:
    """The bytes of an input item, or (None, reason) when it is too large or cannot be read."""
    return ctx.source.read(relpath, int(ctx.params.max_file_mb * MB))


def _scan_file(entry: tuple[str, str]) -> tuple[str, FileRecord]:
    """Worker entry: (relpath, record); the record's reason is ``__cached__`` for known content.

    ``entry`` is (relpath, reason from the walk): an entry the walk already rejected is not opened.
    """
    assert _CTX is not None and _PSEUDO is not None
    relpath, reason = entry
    if reason:
        return relpath, FileRecord(content_hash="", reason=reason)
    data, reason = _read_input(relpath, _CTX)
    if data is None:
        return relpath, FileRecord(content_hash="", reason=reason)
    content_id = content_hash(data)
    if content_id in _CTX.known:
        return relpath, FileRecord(content_hash=content_id, reason="__cached__")
    if _CTX.demo and content_id not in _CTX.synthetic:
        return relpath, _reject(FileRecord(content_hash=""), NEEDS_SITE_KEY,
                                "not a file `medtl synth` wrote, and only those may use the public demo key: "
                                "configure a site key (`medtl keygen`)")
    return relpath, _scan_bytes(data, content_id, _CTX, _PSEUDO)


def _scan_crashed(entry: tuple[str, str], detail: str) -> tuple[str, FileRecord]:
    """What a file whose worker process died (twice, the second time alone) becomes: a rejection."""
    return entry[0], _reject(FileRecord(content_hash=""), WORKER_DIED, detail)


def _rewrite_output(task: tuple[str, str]) -> str:
    """Worker entry for phase 3: redo the de-identified copy of a cached record whose output is gone."""
    relpath, expected_output = task
    assert _CTX is not None and _PSEUDO is not None
    data, reason = _read_input(relpath, _CTX)
    record = _scan_bytes(data, content_hash(data), _CTX, _PSEUDO) if data is not None else None
    if record is None or record.output != expected_output:
        raise IngestError(f"input file {_PSEUDO.file_id(relpath)} changed while ingesting: run ingest again")
    return relpath


# --------------------------------------------------------------------------------------------------
# the record cache


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while bulk, acyclic records are built (cache load, assemble).

    Each of its passes traverses every object made so far, so building thousands of records with it on
    costs more than the building (a 5,000-record cache load: ~100 ms without it, 110-300 ms with it,
    measured on the 2-core build machine). It resumes, as it was, afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class RecordCache:
    """Append-only JSON-lines cache of FileRecords keyed by content hash.

    Each record is appended (and flushed) as soon as its file is done, so a killed run loses at most
    the files in flight. The header line holds the versions and a slow key check
    (:func:`pipeline.keys.key_check`, scrypt: it tells whether the cache was made with the same key
    and costs an offline guesser ~75 ms per guess); a cache made under another key or version is
    discarded together with the outputs it describes. The salt is fixed (:data:`CACHE_SALT`), not
    random, so that the cache (a DVC output) is the same bytes on every machine: a random salt would
    not add protection here, as the pseudonyms in every output are keyed hashes of identifiers a
    guesser may know — the key's own strength (``pipeline.keys``: 128 bits or more) is what protects.
    """

    def __init__(self, path: Path, secret: bytes, verified: str | None = None):
        self.path = path
        self._n_lines = -1
        # content hash -> its JSON line, as written (compact rewrites them as they are); a line is parsed
        # into a FileRecord only when a run needs that record (:meth:`get_many`): a rerun that reuses the
        # last assembly needs the records of the changed series only
        self._lines: dict[str, str] = {}
        self._records: dict[str, FileRecord] = {}  # the lines parsed so far, and the records appended
        self.header = self._load(secret, verified)
        self.valid = self.header is not None
        if self.header is None:
            self.header = {"cache_version": CACHE_VERSION, "deid_version": deid.DEID_VERSION, "salt": CACHE_SALT,
                           "key_check": keys.key_check(secret, CACHE_SALT)}
        self._fh = None
        # whether the file holds exactly one good line per record (then compact may leave it as it is)
        self._clean = self.valid and self._n_lines == len(self._lines)

    def _load(self, secret: bytes, verified: str | None) -> dict | None:
        """The header of a usable cache (its lines indexed), or None: absent, other key or version.

        ``verified``: the local stat index's :func:`key_verified` token; when it is this key's token for
        this header's key check, an earlier run of this key ran the slow check on it: it is not rerun.
        """
        if not self.path.exists():
            return None
        lines = self.path.read_text(errors="replace").split("\n")
        if lines and not lines[-1]:
            lines.pop()
        self._n_lines = len(lines) - 1
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            return None
        if not isinstance(header, dict) or header.get("cache_version") != CACHE_VERSION \
                or header.get("deid_version") != deid.DEID_VERSION \
                or not (verified is not None and hmac.compare_digest(key_verified(secret, header), verified)
                        or keys.key_matches(secret, header.get("salt"), header.get("key_check"))):
            return None
        start = len(_LINE_PREFIX)
        for line in lines[1:]:  # a record line starts with its content hash (the dataclass's first field)
            end = line.find('"', start)
            if line.startswith(_LINE_PREFIX) and end > start and line.endswith("}"):
                self._lines[line[start:end]] = line
        return header

    def __contains__(self, content_id: str) -> bool:
        return content_id in self._lines

    def known(self) -> frozenset[str]:
        """The content hashes the cache has a line for."""
        return frozenset(self._lines)

    def get_many(self, content_ids: Iterable[str]) -> dict[str, FileRecord]:
        """The records of these content hashes, where the cache holds a good line for them.

        Lines are parsed once, all in one ``json.loads``; a line that does not hold a whole record of
        its own hash (a kill cut it, or it was edited) is dropped: the caller reads that file again.
        """
        content_ids = list(content_ids)
        wanted = [h for h in dict.fromkeys(content_ids) if h not in self._records and h in self._lines]
        if wanted:
            with _gc_paused():
                self._parse(wanted)
        return {h: self._records[h] for h in content_ids if h in self._records}

    def _parse(self, wanted: list[str]) -> None:
        lines = [self._lines[h] for h in wanted]
        try:  # all lines at once (one C loop); a bad line makes it fall back to line by line
            values = json.loads("[" + ",".join(lines) + "]")
        except json.JSONDecodeError:
            values = []
            for line in lines:
                try:
                    values.append(json.loads(line))
                except json.JSONDecodeError:
                    values.append(None)
        fields = _RECORD_FIELDS
        for h, value in zip(wanted, values):
            if not isinstance(value, dict) or value.keys() != fields or value["content_hash"] != h:
                del self._lines[h]
                self._clean = False
                continue
            rec = object.__new__(FileRecord)  # the fields are all there (checked): skip __init__'s defaults
            rec.__dict__.update(value)
            self._records[h] = rec

    def append(self, record: FileRecord) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or not self.valid
            self._fh = open(self.path, "w" if fresh else "a")
            if fresh:
                self._fh.write(json.dumps(self.header) + "\n")
                self.valid = self._clean = True
        line = json.dumps(record.__dict__)  # the fields, as asdict would give them (no nested dataclasses)
        self._fh.write(line + "\n")
        self._fh.flush()
        self._records[record.content_hash] = record
        self._clean = False  # compact sorts the lines: the same records give the same bytes, whatever the order they came in
        self._lines[record.content_hash] = line

    def compact(self, keep: Iterable[str]) -> None:
        """Rewrite atomically with only the records of content still present in the input."""
        self.close()
        keep = set(keep)
        if self._clean and keep == self._lines.keys():
            return  # nothing appended or dropped: the file already holds these records, sorted
        lines = [json.dumps(self.header)] + [self._lines[h] for h in sorted(self._lines) if h in keep]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


STAT_INDEX_NAME = ".stat_index.json"
_LINE_PREFIX = '{"content_hash": "'  # how every record line of the cache starts (json.dumps of the fields in order)
_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(FileRecord))


def key_verified(secret: bytes, header: dict) -> str:
    """Token, kept in the local stat index, that this key passed the cache header's slow key check.

    An HMAC under the key of the header's check value: a rerun that finds it skips the ~75 ms scrypt
    check. It lets whoever holds the index test a guessed key at HMAC speed, as the file ids that key
    the same index already do (and every pseudonym in the outputs): the key's own strength (128 bits
    or more, :mod:`pipeline.keys`) is what protects it, and the index is never tracked or pushed.
    """
    return hmac.new(secret, b"medtl-cache-key-verified\0" + str(header.get("key_check")).encode(), "sha256").hexdigest()


class StatIndex:
    """Local (never a DVC output, git-ignored) map of input file id → (size, mtime ns, inode, content id).

    A rerun trusts the content id of a file whose stat signature is unchanged, as git and DVC do, so
    an incremental run reads only new or changed files. Keys are keyed file ids, never paths. It also
    holds :func:`key_verified` of the cache it was written with, and the last run's assembly
    (:func:`_memo`: what a rerun reuses for the series no changed file touches). Its entries are
    ignored when the record cache was discarded (another key or version): see :meth:`discard`.
    """

    VERSION = 3

    def __init__(self, path: Path):
        self.path, self.entries, self.verified, self.memo = path, {}, None, None
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                return
            if isinstance(data, dict) and data.get("version") == self.VERSION and isinstance(data.get("entries"), dict):
                self.entries = data["entries"]
                self.verified = data["verified"] if isinstance(data.get("verified"), str) else None
                self.memo = data["assembly"] if isinstance(data.get("assembly"), dict) else None

    def discard(self) -> None:
        self.entries, self.verified, self.memo = {}, None, None

    def lookup(self, file_id: str, signature: tuple[int, ...]) -> str | None:
        entry = self.entries.get(file_id)
        if signature and isinstance(entry, list) and len(entry) == len(signature) + 1 \
                and tuple(entry[:-1]) == signature:
            return entry[-1]
        return None

    def save(self, entries: dict[str, list], verified: str, memo: dict) -> None:
        if entries != self.entries or verified != self.verified or memo != self.memo:  # unchanged: left as it is
            atomic_write_text(self.path, json.dumps({"version": self.VERSION, "verified": verified,
                                                     "entries": entries, "assembly": memo}, separators=(",", ":")))


# --------------------------------------------------------------------------------------------------
# labels


class LabelsError(MedtlError, ValueError):
    """The labels CSV cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Labels:
    key: str | None  # one of LABEL_KEYS; None: no labels file (every image gets NO_LABEL)
    by_value: dict[str, str]  # key value (relpath for "file", else keyed hash) -> label

    def lookup(self, relpath: str, record: FileRecord) -> str | None:
        if self.key is None:
            return NO_LABEL
        value = self.value(relpath, record)
        return self.by_value.get(value) if value else None

    def value(self, relpath: str, record: FileRecord) -> str:
        """What this file's label is looked up by (a keyed hash, or the path for ``file``)."""
        return {
            "file": relpath,
            "sop_instance_uid": record.k_sop,
            "series_instance_uid": record.k_series,
            "study_instance_uid": record.k_study,
            "accession_number": record.k_accession,
        }[self.key]


def read_labels(path: Path, pseudo: deid.Pseudonymizer) -> Labels:
    """Read a labels CSV: a ``label`` column and exactly one key column from :data:`LABEL_KEYS`.

    Identifier values are hashed with the site key at once, so they never reach outputs or logs.
    """
    path = Path(path)
    reader = csv.DictReader(io.StringIO(_read_csv_text(path, "labels")))
    header = [h.strip() for h in (reader.fieldnames or [])]
    key_columns = [h for h in header if h in LABEL_KEYS]
    if "label" not in header:
        raise LabelsError(f"{path}: no 'label' column (header is {header})")
    if len(key_columns) != 1:
        raise LabelsError(f"{path}: needs exactly one key column out of {list(LABEL_KEYS)}, found "
                          f"{key_columns or 'none'} in {header}")
    key = key_columns[0]
    kind = {"sop_instance_uid": "sop", "series_instance_uid": "series", "study_instance_uid": "study",
            "accession_number": "accession"}.get(key)
    by_value: dict[str, str] = {}
    for line_no, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        raw, label = row.get(key, ""), row.get("label", "")
        if not raw or not label:
            raise LabelsError(f"{path}:{line_no}: empty {key!r} or 'label'")
        value = Path(raw).as_posix() if kind is None else pseudo.token(kind, raw)
        if by_value.get(value, label) != label:
            raise LabelsError(f"{path}:{line_no}: {key} given twice with different labels")
        by_value[value] = label
    if not by_value:
        raise LabelsError(f"{path}: no label rows")
    return Labels(key=key, by_value=by_value)


def _read_csv_text(path: Path, what: str) -> str:
    """The text of a CSV the user gave (UTF-8, with or without BOM), or a LabelsError naming the problem."""
    if not path.is_file():
        raise LabelsError(f"{path}: {what} file does not exist")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelsError(f"{path}: {what} file is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from None
    except OSError as exc:
        raise LabelsError(f"{path}: {what} file cannot be read ({exc.strerror})") from None


def check_classes(labels: Labels, classes: tuple[str, ...] | None, labels_csv: Path) -> None:
    """Stop early when the label values are not the classes training expects (``train.classes``).

    ``classes`` None means ``train.classes: auto`` (any values).
    """
    if classes is None:
        return
    found = sorted(set(labels.by_value.values()))
    unknown = [v for v in found if v not in classes]
    if unknown:
        shown = ", ".join(repr(v[:32]) for v in unknown[:6]) + (", ..." if len(unknown) > 6 else "")
        raise LabelsError(
            f"{labels_csv}: label values {shown} are not in train.classes {list(classes)}: set train.classes in "
            f"params.yaml to the class names of your labels, negative class first (e.g. {found[:2]}), or to auto")


@dataclass(frozen=True)
class LesionRow:
    """One sidecar row, identifiers already keyed hashes (never the UIDs themselves)."""

    k_study: str
    k_series: str
    k_sop: str
    row: float
    col: float
    radius_px: float
    radius_mm: float


def read_lesions(path: Path, pseudo: deid.Pseudonymizer) -> list[LesionRow]:
    """Read a lesion ground-truth sidecar with exactly the columns :data:`LESION_COLUMNS`.

    UIDs are hashed with the site key at once (as :func:`read_labels` does), so they never reach
    outputs or logs. ``row``/``col`` are pixel coordinates (0-based floats) in the instance's stored
    grid; ``radius_px`` its in-plane radius in that grid's pixels, ``radius_mm`` the same in mm.

    Raises:
        LabelsError: a missing file, other columns, an empty UID or a value that is not a number.
    """
    path = Path(path)
    rows: list[LesionRow] = []
    reader = csv.DictReader(io.StringIO(_read_csv_text(path, "lesions")))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if sorted(header) != sorted(LESION_COLUMNS):
        raise LabelsError(f"{path}: lesions file needs exactly the columns {list(LESION_COLUMNS)}, got {header}")
    for line_no, raw in enumerate(reader, start=2):
        raw = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        uids = [raw[k] for k in LESION_COLUMNS[:3]]
        if not all(uids):
            raise LabelsError(f"{path}:{line_no}: empty UID")
        try:
            values = [float(raw[k]) for k in LESION_COLUMNS[3:]]
        except ValueError:
            raise LabelsError(f"{path}:{line_no}: row, col, radius_px and radius_mm must be numbers") from None
        if not all(np.isfinite(values)) or values[2] <= 0 or values[3] <= 0:
            raise LabelsError(f"{path}:{line_no}: coordinates must be finite and radii positive")
        rows.append(LesionRow(pseudo.token("study", uids[0]), pseudo.token("series", uids[1]),
                              pseudo.token("sop", uids[2]), *values))
    return rows


def _lesion_table(images: list[_Image]) -> pd.DataFrame:
    """The lesion rows of these images (see :func:`_images`), in ``lesions.parquet``'s order."""
    table = pd.DataFrame([row for image in images for row in image.lesions], columns=list(LESION_OUTPUT_COLUMNS)).astype(
        {"slice_index": "int64", "row": "float64", "col": "float64", "radius_px": "float64", "radius_mm": "float64"})
    return table.sort_values(["image_id", "slice_index"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# phase 2: assemble units


@dataclass
class _Unit:
    kind: str  # "2d" | "multiframe" | "volume"
    files: list[tuple[str, FileRecord]]  # (relpath, record), volumes ordered by position
    label: str
    slice_spacing: float | None = None


def _normal(orientation: list[float]) -> np.ndarray:
    """row × column direction cosines (what ``np.cross`` computes, at a tenth of its cost on 3-vectors)."""
    r0, r1, r2, c0, c1, c2 = (float(v) for v in orientation[:6])
    return np.array([r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0])


def _check_volume(files: list[tuple[str, FileRecord]], params: IngestParams) -> tuple[str, list, float | None]:
    """Order slices by position along the normal; return (problem, ordered files, spacing mm)."""
    sizes = sorted({(r.rows, r.cols) for _, r in files})
    if len(sizes) > 1:
        return f"mixed image sizes {', '.join(f'{a}x{b}' for a, b in sizes)}", files, None
    orientations = np.array([r.orientation for _, r in files])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        return "slices with different orientations (more than one stack in the series)", files, None
    spacings = np.array([r.pixel_spacing[:2] for _, r in files])
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        return "slices with different pixel spacing", files, None
    normal = _normal(files[0][1].orientation)
    along = np.array([np.dot(normal, r.position) for _, r in files])
    order = np.argsort(along, kind="stable")
    ordered = [files[i] for i in order]
    gaps = np.diff(along[order])
    if (gaps < 1e-3).any():
        return f"{int((gaps < 1e-3).sum())} duplicate slice position(s)", ordered, None
    spacing = float(np.median(gaps))
    if gaps.max() > params.max_gap_ratio * spacing:
        return f"gap of {gaps.max():.2f} mm where slices are {spacing:.2f} mm apart (missing slices)", ordered, None
    return "", ordered, spacing


def _assemble(
    scanned: list[tuple[str, FileRecord]], labels: Labels, params: IngestParams, file_id=lambda relpath: relpath,
) -> tuple[list[_Unit], dict[str, str]]:
    """Units that are in, and reasons for every relpath that is out (naming other files by ``file_id``)."""
    rejected: dict[str, str] = {}
    candidates: list[tuple[str, FileRecord, str]] = []
    for relpath, record in scanned:
        if record.reason:
            rejected[relpath] = record.reason
            continue
        label = labels.lookup(relpath, record)
        if label is None:
            rejected[relpath] = f"{UNLABELLED}: no row in the labels file for this image's {labels.key}"
            continue
        candidates.append((relpath, record, label))

    # duplicates: one SOP instance in several files
    by_sop: dict[str, list[tuple[str, FileRecord, str]]] = defaultdict(list)
    for item in candidates:
        by_sop[item[1].k_sop].append(item)
    kept: list[tuple[str, FileRecord, str]] = []
    for items in by_sop.values():
        first = items[0]
        if len({r.content_hash for _, r, _ in items}) > 1:
            for relpath, _, _ in items:
                others = [p for p, _, _ in items if p != relpath]
                rejected[relpath] = (f"{DUPLICATE}: same SOPInstanceUID as input file {file_id(others[0])} but different "
                                     "content; resolve which is right")
            continue
        kept.append(first)
        for relpath, _, _ in items[1:]:
            rejected[relpath] = f"{DUPLICATE}: identical copy of input file {file_id(first[0])}"

    units: list[_Unit] = []
    series: dict[str, list[tuple[str, FileRecord, str]]] = defaultdict(list)
    for item in kept:
        record = item[1]
        is_slice = (
            record.modality in params.volume_modalities
            and record.frames == 1
            and len(record.position) == 3
            and len(record.orientation) == 6
            and len(record.pixel_spacing) >= 2
            and "LOCALIZER" not in record.image_type.upper()
        )
        if is_slice:
            series[record.k_series].append(item)
        else:
            units.append(_Unit("multiframe" if record.frames > 1 else "2d", [(item[0], record)], item[2]))
    for items in series.values():
        if len(items) < params.min_volume_slices:
            units.extend(_Unit("2d", [(p, r)], lab) for p, r, lab in items)
            continue
        files = [(p, r) for p, r, _ in items]
        problem, ordered, spacing = _check_volume(files, params)
        labels_in_series = sorted({lab for _, _, lab in items})
        if not problem and len(labels_in_series) > 1:
            reason = f"{CONFLICTING_LABEL}: slices of one series are labelled {labels_in_series}"
            rejected.update({p: reason for p, _ in files})
            continue
        if problem:
            reason = f"{INCONSISTENT_SERIES}: {problem} ({len(files)} files of series {files[0][1].series_uid[-12:]})"
            rejected.update({p: reason for p, _ in files})
            continue
        units.append(_Unit("volume", ordered, labels_in_series[0], spacing))
    units.sort(key=lambda u: u.files[0][1].output)
    return units, rejected


def _image_id(unit: _Unit) -> str:
    record = unit.files[0][1]
    basis = record.series_uid if unit.kind == "volume" else record.sop_uid
    return hashlib.sha1(basis.encode()).hexdigest()[:16]


MANIFEST_COLUMNS = ("image_id", "unit", "patient_key", "study_uid", "series_uid", "sop_instance_uids", "label",
                    "modality", "site", "manufacturer", "model", "rows", "cols", "frames", "samples_per_pixel",
                    "spacing_mm", "orientation", "origin_mm", "photometric", "bits_stored", "pixel_representation",
                    "rescale_slope", "rescale_intercept", "transfer_syntax", "paths", "n_files")


def _manifest_row(unit: _Unit, image_id: str) -> dict[str, Any]:
    first = unit.files[0][1]
    spacing = list(first.pixel_spacing[:2]) + [unit.slice_spacing if unit.slice_spacing else float("nan")]
    return {
        "image_id": image_id,
        "unit": unit.kind,
        "patient_key": first.patient_key,
        "study_uid": first.study_uid,
        "series_uid": first.series_uid,
        "sop_instance_uids": [r.sop_uid for _, r in unit.files],
        "label": unit.label,
        "modality": first.modality,
        "site": first.site,
        "manufacturer": first.manufacturer,
        "model": first.model,
        "rows": first.rows,
        "cols": first.cols,
        "frames": first.frames if unit.kind != "volume" else len(unit.files),
        "samples_per_pixel": first.samples_per_pixel,
        "spacing_mm": [float(s) if s else float("nan") for s in spacing] if first.pixel_spacing else [float("nan")] * 3,
        "orientation": list(first.orientation) or [float("nan")] * 6,
        "origin_mm": list(first.position) or [float("nan")] * 3,
        "photometric": first.photometric,
        "bits_stored": first.bits_stored,
        "pixel_representation": first.pixel_representation,
        "rescale_slope": first.rescale_slope,
        "rescale_intercept": first.rescale_intercept,
        "transfer_syntax": first.transfer_syntax,
        "paths": [r.output for _, r in unit.files],
        "n_files": len(unit.files),
    }


def _manifest(images: list[_Image]) -> pd.DataFrame:
    return pd.DataFrame([image.row for image in images], columns=list(MANIFEST_COLUMNS))


# --------------------------------------------------------------------------------------------------
# phase 2b: what the outputs need of each unit, and the reuse of the last run's assembly


@dataclass
class _Image:
    """A unit as the outputs need it: its manifest row, its input files (in ``paths`` order), how many
    of its files have each transfer syntax, and its rows of the lesion table. Made from a unit
    (:func:`_images`) or kept from the last run's assembly (:func:`_memo`)."""

    row: dict[str, Any]
    inputs: list[str]
    syntaxes: dict[str, int]
    lesions: list[list]


def _images(units: list[_Unit], lesions: list[LesionRow]) -> list[_Image]:
    """The images of these units; a lesion row is placed where its SOP instance is in a unit and its
    study and series match that instance's (a row naming the wrong series is left out, not moved)."""
    by_sop: dict[str, list[LesionRow]] = defaultdict(list)
    for lesion in lesions:
        by_sop[lesion.k_sop].append(lesion)
    images = []
    for unit in units:
        image_id = _image_id(unit)
        rows = [[image_id, record.patient_key, record.study_uid, record.series_uid, record.sop_uid, k,
                 lesion.row, lesion.col, lesion.radius_px, lesion.radius_mm]
                for k, (_, record) in enumerate(unit.files) for lesion in by_sop.get(record.k_sop, ())
                if (record.k_series, record.k_study) == (lesion.k_series, lesion.k_study)]
        images.append(_Image(_manifest_row(unit, image_id), [p for p, _ in unit.files],
                             dict(Counter(r.transfer_syntax for _, r in unit.files)), rows))
    return images


#: Version of the assembly memo's layout (and of what assembly does): another one is not reused.
MEMO_VERSION = 1


def _assembly_basis(labels: Labels, params: IngestParams) -> str:
    """What assembly depends on besides the files, their labels and their lesion rows (those are checked
    per component): the label key, the params (all but ``workers``: a change of any means a full
    assembly), the versions."""
    basis = [MEMO_VERSION, CACHE_VERSION, deid.DEID_VERSION, labels.key,
             {k: v for k, v in asdict(params).items() if k != "workers"}]
    return hashlib.sha256(json.dumps(basis).encode()).hexdigest()


class _Dependencies:
    """A component's labels and lesion rows, as this run has them: a component is reused only where
    these are what they were when it was assembled."""

    def __init__(self, labels: Labels, lesions: list[LesionRow], path_of: dict[str, str]):
        self.labels, self.path_of = labels, path_of
        self.lesions: dict[str, list[tuple]] = defaultdict(list)
        for lesion in lesions:
            self.lesions[lesion.k_sop[:16]].append(dataclasses.astuple(lesion))

    def label_entries(self, files: list[tuple[str, str, FileRecord]]) -> list[list]:
        """[looked up by, label] of these (relpath, file id, record)s; by file id for ``file`` labels."""
        if self.labels.key is None:
            return []
        entries = {}
        for rel, fid, record in files:
            if not record.reason:
                value = self.labels.value(rel, record)
                entries[fid if self.labels.key == "file" else value] = self.labels.by_value.get(value) if value else None
        return sorted([k, v] for k, v in entries.items())

    def labels_hold(self, entries: list[list]) -> bool:
        by_value, by_file = self.labels.by_value, self.labels.key == "file"
        return all(by_value.get(self.path_of.get(k, "") if by_file else k) == v for k, v in entries)

    def lesion_digest(self, keys: list[str]) -> str:
        """Digest of the sidecar rows whose SOP instance's short key is among a component's link keys."""
        rows = sorted(row for key in keys for row in self.lesions.get(key, ()))
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32] if rows else ""


def _link_keys(record: FileRecord) -> list[str]:
    """What ties a file's assembly to other files': its series (volumes, conflicting labels) and its SOP
    instance (duplicates). Shortened: a collision of two only joins their series' reuse, never their output."""
    return [] if record.reason else [k[:16] for k in (record.k_series, record.k_sop) if k]


def _unchanged(memo: dict | None, basis: str, file_ids: dict[str, str], content: dict[str, str],
               deps: _Dependencies) -> list[dict]:
    """Components of the last run's assembly (``memo``) whose files are all still there with the same
    content, labels and lesion rows, when nothing else assembly depends on changed (``basis``); [] when
    there is no memo."""
    if not memo or memo.get("basis") != basis or not isinstance(memo.get("components"), list):
        return []
    now = {file_ids[rel]: h for rel, h in content.items()}
    return [c for c in memo["components"] if all(now.get(fid) == h for fid, h in c["files"])
            and deps.labels_hold(c["labels"]) and deps.lesion_digest(c["keys"]) == c["lesions"]]


def _memo(basis: str, kept: list[dict], assembled: list[tuple[str, FileRecord]], units: list[_Unit],
          images: list[_Image], rejected: dict[str, str], file_ids: dict[str, str], deps: _Dependencies) -> dict:
    """The assembly a rerun may reuse: the files of every run are split in components, the smallest
    sets of files that no link key (:func:`_link_keys`) ties to a file outside; for each, its files
    with their content ids, its link keys, its images and its rejections (by file id, never path).
    ``kept``: components reused as they were; ``assembled``: the files assembled in this run (those
    without a content id are never reused: they are looked at again in every run)."""
    links = {rel: _link_keys(record) for rel, record in assembled if record.content_hash}
    parent = {rel: rel for rel in links}

    def root(rel: str) -> str:
        while parent[rel] != rel:
            parent[rel] = rel = parent[parent[rel]]
        return rel

    owner: dict[str, str] = {}
    for rel, keys_of_file in links.items():
        for key in keys_of_file:
            if key in owner:
                parent[root(rel)] = root(owner[key])
            else:
                owner[key] = rel
    groups: dict[str, dict] = {}
    members: dict[str, list] = defaultdict(list)
    for rel, record in assembled:
        if rel in parent:
            group = groups.setdefault(root(rel), {"files": [], "keys": [], "images": [], "rejected": []})
            group["files"].append([file_ids[rel], record.content_hash])
            group["keys"].extend(links[rel])
            members[root(rel)].append((rel, file_ids[rel], record))
    for unit, image in zip(units, images):
        groups[root(unit.files[0][0])]["images"].append({
            "row": image.row, "ids": [file_ids[rel] for rel in image.inputs], "syntaxes": image.syntaxes,
            "lesions": image.lesions})
    for rel, reason in rejected.items():
        if rel in parent:
            groups[root(rel)]["rejected"].append([file_ids[rel], reason])
    for name, group in groups.items():
        group["files"].sort()
        group["keys"] = sorted(set(group["keys"]))
        group["rejected"].sort()
        group["labels"] = deps.label_entries(members[name])
        group["lesions"] = deps.lesion_digest(group["keys"])
    components = sorted([*kept, *groups.values()], key=lambda c: c["files"][0][0])
    return {"basis": basis, "components": components}


def _reused(components: list[dict], path_of: dict[str, str]) -> tuple[list[_Image], dict[str, str]]:
    """The images and rejections of reused components, with this run's input paths."""
    images = [_Image(i["row"], [path_of[fid] for fid in i["ids"]], i["syntaxes"], i["lesions"])
              for c in components for i in c["images"]]
    return images, {path_of[fid]: reason for c in components for fid, reason in c["rejected"]}


# --------------------------------------------------------------------------------------------------
# the stage


def _refuse_inside(source: Source, input_name: str, **outputs: Path | None) -> None:
    """An output or quarantine inside the input would be read back as input on the next run."""
    for name, path in outputs.items():
        if path is not None and source.contains(Path(path)):
            raise IngestError(f"{path}: the {name} directory is inside the input {input_name}; put it outside "
                              "(it would be ingested as input on the next run)")


def run(
    params: IngestParams,
    input_dir: Path | Source,
    labels_csv: Path | None,
    out_dir: Path,
    quarantine_dir: Path | None = None,
    key: bytes | keys.SiteKey | None = None,
    fanout: FanoutParams | None = None,
    lesions_csv: Path | None = None,
    classes: tuple[str, ...] | None = None,
    inputs_csv: Path | None = None,
) -> IngestSummary:
    """Ingest a DICOM tree: de-identify, account for every file, write manifest/rejected/summary.

    Args:
        params: the ``ingest`` params.
        input_dir: the raw export (PHI inside; never pushed): a folder, or any
            :class:`~pipeline.sources.Source`.
        labels_csv: labels by one key column (see :func:`read_labels`); None: unlabelled new studies
            (``medtl predict``), every image's label is :data:`NO_LABEL`.
        out_dir: stage output (a DVC ``persist`` output: it holds the cache that makes reruns incremental).
        quarantine_dir: where rejected files are linked with their reasons (None: not done). Keep it out
            of DVC outputs: it holds raw files with PHI.
        key: pseudonymisation key; None resolves it (:func:`pipeline.keys.resolve_key`). With the public
            demo key, only files ``medtl synth`` wrote are accepted (checked per file by content).
        fanout: where the per-file work of the scan and rewrite phases runs (default: local
            processes, ``params.workers`` of them); outputs do not depend on it.
        lesions_csv: optional lesion ground-truth sidecar (:func:`read_lesions`); None (a real site): none.
            ``out_dir/lesions.parquet`` is written either way (empty without a sidecar).
        classes: the class names training expects (``train.classes``); label values outside them stop
            the run here, before any work. None (``train.classes: auto``): any values.
        inputs_csv: where to write, locally, which input files each image came from (``image_id``,
            ``input``: the source's ids, ``|``-joined in unit order). It names input paths (PHI):
            keep it out of DVC outputs, like the quarantine. None: not written.

    Returns:
        The summary also written to ``out_dir/summary.json``.

    Raises:
        MedtlError: (subclasses) a missing input or labels file, a labels file that cannot be used, no
            usable key, an output or quarantine inside the input, an output that cannot be written.
    """
    started = time.perf_counter()
    source = FolderSource(Path(input_dir)) if isinstance(input_dir, (str, os.PathLike)) else input_dir
    out_dir = Path(out_dir)
    source.check()
    _refuse_inside(source, str(input_dir), output=out_dir, quarantine=quarantine_dir)
    secret = None if key is None else key.secret if isinstance(key, keys.SiteKey) else bytes(key)
    synthetic = source.synthetic_files() if secret in (None, keys.DEMO_KEY) else frozenset()
    if secret is None:
        key = keys.resolve_key(demo_allowed=bool(synthetic))
        log.info("pseudonymisation key from %s", key.source)
        secret = key.secret
    demo = secret == keys.DEMO_KEY
    pseudo = deid.Pseudonymizer(secret)
    if labels_csv is None:
        labels = Labels(key=None, by_value={})
    else:
        labels = read_labels(labels_csv, pseudo)
        check_classes(labels, classes, Path(labels_csv))
    lesions = read_lesions(lesions_csv, pseudo) if lesions_csv is not None else []
    fanout = fanout or FanoutParams()
    workers = params.workers or os.cpu_count() or 1
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out_dir, exc) from None

    # the cache's key check is a slow KDF (scrypt releases the GIL): load it while the input is walked
    index = StatIndex(out_dir / STAT_INDEX_NAME)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(RecordCache, out_dir / "cache" / "records.jsonl", secret, index.verified)
        entries = source.entries(skip=tuple(Path(p) for p in (labels_csv, lesions_csv) if p is not None))
        file_ids = {e.id: pseudo.file_id(source.display(e.id)) for e in entries}
        existing, stale = _existing_outputs(out_dir)  # one walk of the output: its files, and removed temps
        cache = loading.result()
    stale += remove_stale_temps(quarantine_dir) if quarantine_dir is not None else 0
    if stale:
        log.info("removed %d temporary files an interrupted run left", stale)
    if not cache.valid:
        index.discard()
        if (out_dir / "dicom").exists():
            log.warning("ingest cache was made with another key or version (or is missing): starting from scratch")
        shutil.rmtree(out_dir / "dicom", ignore_errors=True)
        existing = set()
    ctx = _ScanContext(source, out_dir, secret, params, cache.known(), demo=demo,
                       synthetic=synthetic if demo else frozenset())

    clock = {"prepare": time.perf_counter()}  # when each phase ended (summary.run["phases"]: seconds each)
    # phase 1: scan. An item whose signature is unchanged since the last run is not even read (its
    # content id comes from the local stat index); other cached content is only hashed.
    content = {e.id: h for e in entries
               if e.signature and (h := index.lookup(file_ids[e.id], e.signature)) is not None and h in cache}
    results: dict[str, FileRecord] = {}  # records of the files read in this run, and of cached ones when needed
    n_new = 0

    def scan(items: list[tuple[str, str]], context: _ScanContext, workers: int) -> None:
        nonlocal n_new
        for relpath, record in map_ordered(_scan_file, items, init=_init_worker, init_args=(context,), params=fanout,
                                           workers=workers, desc="ingest", on_crash=_scan_crashed):
            if record.content_hash:
                content[relpath] = record.content_hash
            if record.reason == "__cached__":
                continue  # its record is the cache's, read below if assembly needs it
            n_new += 1
            if record.content_hash:  # a file that was not read has nothing to cache
                cache.append(record)
                if record.output:
                    existing.add(record.output)
            results[relpath] = record

    def records(relpaths: list[str]) -> None:
        """Put the cached records of these files in ``results``; files whose cache line is not a whole
        record (a killed run cut it) are read again."""
        need = [rel for rel in relpaths if rel not in results]
        got = cache.get_many(content[rel] for rel in need)
        again = [(rel, "") for rel in need if content[rel] not in got]
        results.update((rel, got[content[rel]]) for rel in need if content[rel] in got)
        if again:
            log.info("ingest cache: %d records unreadable, their files are read again", len(again))
            unreadable = {content.pop(rel) for rel, _ in again}  # scan puts their content ids back
            scan(again, dataclasses.replace(ctx, known=ctx.known - unreadable), 1)

    try:
        scan([(e.id, e.reason) for e in entries if e.id not in content], ctx, params.workers)
        # phase 2: assemble the files that changed, with every file linked to them; the rest is reused
        clock["scan"] = time.perf_counter()
        basis = _assembly_basis(labels, params)
        deps = _Dependencies(labels, lesions, {fid: rel for rel, fid in file_ids.items()})
        kept = _unchanged(index.memo, basis, file_ids, content, deps)
        while True:
            reused = {fid for c in kept for fid, _ in c["files"]}
            outside = [e.id for e in entries if file_ids[e.id] not in reused]
            records([rel for rel in outside if rel in content])
            touched = {key for rel in outside for key in _link_keys(results[rel])}
            dirty = [c for c in kept if not touched.isdisjoint(c["keys"])]
            if not dirty:
                break
            kept = [c for c in kept if touched.isdisjoint(c["keys"])]
    finally:
        cache.close()
    assembling = [(rel, results[rel]) for rel in outside]
    with _gc_paused():
        units, rejected = _assemble(assembling, labels, params, file_id=file_ids.__getitem__)
        images = _images(units, lesions)
        memo = _memo(basis, kept, assembling, units, images, rejected, file_ids, deps)
        old_images, old_rejected = _reused(kept, deps.path_of)
    images += old_images
    images.sort(key=lambda image: image.row["paths"][0])
    rejected.update(old_rejected)
    index.save({file_ids[e.id]: [*e.signature, content[e.id]] for e in entries if e.signature and e.id in content},
               key_verified(secret, cache.header), memo)

    clock["assemble"] = time.perf_counter()
    # phase 3: outputs
    wanted = {out: rel for image in images for out, rel in zip(image.row["paths"], image.inputs)}
    missing = [(p, out) for out, p in sorted(wanted.items()) if out not in existing]
    for _ in map_ordered(_rewrite_output, missing, init=_init_worker, init_args=(ctx,), params=fanout,
                         workers=params.workers, desc="rewrite"):
        pass
    _remove_unwanted(out_dir, existing, set(wanted))
    cache.compact(set(content.values()))

    with _gc_paused():
        manifest = _manifest(images)
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    atomic_write_bytes(out_dir / "manifest.parquet", buffer.getvalue())
    lesion_table = _lesion_table(images)
    lesions_dropped = len(lesions) - len(lesion_table)
    buffer = io.BytesIO()
    lesion_table.to_parquet(buffer, index=False)
    atomic_write_bytes(out_dir / "lesions.parquet", buffer.getvalue())
    if lesions_csv is not None:
        log.info("lesions: %d sidecar rows, %d on %d ingested images, %d dropped (instance not ingested)",
                 len(lesions), len(lesion_table), lesion_table["image_id"].nunique(), lesions_dropped)
    clock["write"] = time.perf_counter()
    rejected_rows = sorted(rejected.items())
    # rejected.csv is a DVC output (pushed): input paths often hold names and MRNs, so files are named
    # by keyed ids there; the local quarantine's reasons.csv maps them back to paths
    atomic_write_text(out_dir / "rejected.csv", csv_text(
        ["file_id", "reason"], sorted((file_ids[rel], reason) for rel, reason in rejected_rows)))
    if quarantine_dir is not None:
        _quarantine(source, Path(quarantine_dir), rejected_rows, file_ids, params)
    if inputs_csv is not None:
        atomic_write_text(Path(inputs_csv), csv_text(
            ["image_id", "input"], sorted((i.row["image_id"], "|".join(i.inputs)) for i in images)))

    ingested_files = sum(len(i.inputs) for i in images)
    rows = [i.row for i in images]
    syntaxes: Counter = Counter()
    for image in images:
        syntaxes.update(image.syntaxes)
    summary = IngestSummary(
        files_seen=len(entries),
        ingested=ingested_files,
        rejected=dict(sorted(Counter(reason.split(":", 1)[0] for _, reason in rejected_rows).items())),
        images=len(images),
        series=len({r["series_uid"] for r in rows}),
        studies=len({r["study_uid"] for r in rows}),
        patients=len({r["patient_key"] for r in rows}),
        by_modality=dict(sorted(Counter(r["modality"] for r in rows).items())),
        by_site=dict(sorted(Counter(r["site"] for r in rows).items())),
        by_label=dict(sorted(Counter(r["label"] for r in rows).items())),
        by_transfer_syntax=_syntax_names(syntaxes),
        label_key=labels.key,
        run={"runner": fanout.runner, "workers": workers, "new_files": n_new, "cached_files": len(entries) - n_new,
             "rewritten_files": len(missing), "seconds": round(time.perf_counter() - started, 2),
             "phases": {name: round(end - begin, 3) for (name, end), begin
                        in zip(clock.items(), [started, *clock.values()])}},
        lesions={"rows": len(lesions), "kept": len(lesion_table), "dropped": lesions_dropped} if lesions_csv else {},
    )
    if summary.files_seen != summary.ingested + summary.rejected_total:
        raise RuntimeError(
            f"accounting error: {summary.files_seen} files seen but {summary.ingested} ingested + "
            f"{summary.rejected_total} rejected"
        )
    # summary.json: the counts (DVC metrics); breakdown.json: the per-modality/site/label/syntax tables
    record = asdict(summary)
    breakdown = {k: record.pop(k) for k in BREAKDOWN_KEYS}
    atomic_write_text(out_dir / "summary.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out_dir / "breakdown.json", json.dumps(breakdown, indent=2) + "\n")
    log.info(
        "ingest: %d files seen, %d ingested into %d images (%d patients), %d rejected %s; %d new, %.1fs",
        summary.files_seen, summary.ingested, summary.images, summary.patients, summary.rejected_total,
        summary.rejected, n_new, summary.run["seconds"],
    )
    return summary


def _syntax_names(counts: Counter) -> dict[str, int]:
    """Files per transfer syntax, by name (UID objects made once per syntax, not once per file)."""
    named: Counter = Counter()
    for uid, n in counts.items():
        named[UID(uid).name] += n
    return dict(sorted(named.items()))


def _existing_outputs(out_dir: Path) -> tuple[set[str], int]:
    """De-identified files under ``out_dir/dicom`` (paths relative to ``out_dir``), and how many temporary
    files a killed run left anywhere in ``out_dir`` (removed): one walk of the output for both."""
    found: set[str] = set()
    stale = 0

    def visit(folder: str, rel: str) -> None:
        nonlocal stale
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    visit(entry.path, f"{rel}/{entry.name}" if rel else entry.name)
                elif is_temp_name(entry.name):
                    os.unlink(entry.path)
                    stale += 1
                elif rel == "dicom" or rel.startswith("dicom/"):
                    found.add(f"{rel}/{entry.name}")

    visit(str(out_dir), "")
    return found, stale


def _remove_unwanted(out_dir: Path, existing: set[str], wanted: set[str]) -> None:
    """Delete outputs no longer wanted, then the directories that leaves empty."""
    unwanted = existing - wanted
    if not unwanted:
        return
    for rel in unwanted:
        (out_dir / rel).unlink(missing_ok=True)
    for folder, _dirs, names in os.walk(out_dir / "dicom", topdown=False):
        if not names and not _has_entries(folder):  # its subdirectories may just have gone
            Path(folder).rmdir()


def _has_entries(folder: str) -> bool:
    with os.scandir(folder) as it:
        return any(True for _ in it)


def _quarantine(source: Source, quarantine_dir: Path, rejected_rows: list[tuple[str, str]],
                file_ids: dict[str, str], params: IngestParams) -> None:
    """Link (or copy) every rejected file into ``quarantine_dir`` with a reasons list; drop stale ones.

    Local only (raw files with PHI, and their paths): never a DVC output. Entries that are not regular
    files (links, special files, unreadable directories) and files above ``max_file_mb`` that cannot be
    hard-linked are listed in reasons.csv but not copied.
    """
    try:
        quarantine_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(quarantine_dir, exc) from None
    shown = {source.display(p): p for p, _ in rejected_rows}
    for path in sorted(quarantine_dir.rglob("*"), reverse=True):
        rel = path.relative_to(quarantine_dir).as_posix()
        if path.is_file() and rel != "reasons.csv" and rel not in shown:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    reasons = dict(rejected_rows)
    not_kept = (SPECIAL_FILE, SYMLINK, UNREADABLE, BAD_NAME, TOO_LARGE)  # listed only, by design
    for name, item_id in shown.items():
        target = quarantine_dir / name
        if os.path.lexists(target):
            continue
        if not source.keep(item_id, target, int(params.max_file_mb * MB)) \
                and reasons[item_id].split(":", 1)[0] not in not_kept:
            log.warning("quarantine: input file %s could not be copied", file_ids[item_id])
    atomic_write_text(quarantine_dir / "reasons.csv", csv_text(
        ["path", "file_id", "reason"], [(source.display(p), file_ids[p], r) for p, r in rejected_rows]))

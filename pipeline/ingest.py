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
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from pipeline import deid
from pipeline.fanout import FanoutParams, map_ordered
from pipeline.io_utils import atomic_write_bytes, atomic_write_text, csv_text

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SIDECAR_NAMES = frozenset({"medtl_synth.json"})  # written by `medtl synth` next to the tree
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

# Rejection categories (the part of a reason before the colon); summary.json counts by these.
NOT_DICOM = "not_dicom"
CORRUPT = "corrupt"
DICOMDIR = "dicomdir"
NON_IMAGE = "non_image"
BURNED_IN = "burned_in_annotation"
NO_DECODER = "no_decoder"
NO_PATIENT_ID = "missing_patient_id"
UNLABELLED = "unlabelled"
DUPLICATE = "duplicate"
INCONSISTENT_SERIES = "inconsistent_series"
CONFLICTING_LABEL = "conflicting_label"


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
    """

    workers: int = 0
    verify_pixels: bool = True
    volume_modalities: tuple[str, ...] = ("CT", "MR", "PT", "NM")
    min_volume_slices: int = 3
    max_gap_ratio: float = 1.5

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
    label_key: str
    run: dict[str, Any]
    lesions: dict[str, int] = field(default_factory=dict)  # sidecar rows: {"rows", "kept", "dropped"}

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


# --------------------------------------------------------------------------------------------------
# phase 1: scan one file


@dataclass(frozen=True)
class _ScanContext:
    input_dir: Path
    out_dir: Path
    key: bytes
    params: IngestParams
    known: frozenset[str] = frozenset()  # content hashes already in the cache


_CTX: _ScanContext | None = None
_PSEUDO: deid.Pseudonymizer | None = None


def _init_worker(ctx: _ScanContext) -> None:
    global _CTX, _PSEUDO
    _CTX, _PSEUDO = ctx, deid.Pseudonymizer(ctx.key)


def _reject(record: FileRecord, category: str, detail: str) -> FileRecord:
    record.reason = f"{category}: {' '.join(detail.split())}"  # one line, whatever the exception said
    return record


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _floats(ds: pydicom.Dataset, keyword: str) -> list[float]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    try:
        return [float(v) for v in (value if isinstance(value, Iterable) and not isinstance(value, str) else [value])]
    except (TypeError, ValueError):
        return []


def _read(data: bytes) -> pydicom.Dataset:
    """Parse a file. Values convert lazily: de-identification touches every element, so a corrupt
    value fails there (and is reported as corrupt) before anything is written."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        # No "DICM" prefix: legacy files without preamble/meta are still DICOM if they parse into a
        # dataset that names its SOP class or has pixel data.
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if not any(k in ds for k in ("SOPClassUID", *PIXEL_KEYWORDS)):
            raise InvalidDicomError("no DICM prefix and no DICOM dataset") from None
    return ds


def _expected_native_bytes(ds: pydicom.Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1) or 1)
    return (pixels * bits + 7) // 8


def _check_pixels(ds: pydicom.Dataset, record: FileRecord, verify: bool) -> FileRecord | None:
    """Reject if the pixel data cannot be decoded here; return None when fine."""
    tsyntax = UID(record.transfer_syntax) if record.transfer_syntax else None
    if "PixelData" not in ds:
        return None  # float pixel data: native by definition
    if not record.rows or not record.cols or "BitsAllocated" not in ds:
        return _reject(record, CORRUPT, "image without Rows/Columns/BitsAllocated")
    if tsyntax is not None and tsyntax.is_compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            return _reject(record, NO_DECODER, f"transfer syntax {tsyntax} ({tsyntax.name}) is not supported")
        if not decoder.is_available:
            missing = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in decoder.missing_dependencies[:3])
            return _reject(record, NO_DECODER, f"no decoder installed for {tsyntax.name} (plugins: {missing})")
        if verify:
            try:
                ds.pixel_array  # noqa: B018 - decode to prove the stream is whole
            except Exception as exc:  # noqa: BLE001 - any decoder failure means an unusable stream
                return _reject(record, CORRUPT, f"compressed pixel data does not decode ({type(exc).__name__}: {str(exc)[:300]})")
        return None
    expected, actual = _expected_native_bytes(ds), len(ds.PixelData)
    if actual < expected:
        return _reject(record, CORRUPT, f"pixel data truncated ({actual} of {expected} bytes)")
    return None


def _scan_bytes(data: bytes, content_hash: str, ctx: _ScanContext, pseudo: deid.Pseudonymizer) -> FileRecord:
    record = FileRecord(content_hash=content_hash)
    if not data:
        return _reject(record, NOT_DICOM, "empty file")
    try:
        ds = _read(data)
    except InvalidDicomError:
        return _reject(record, NOT_DICOM, "no DICOM preamble/prefix and not a DICOM dataset")
    except Exception as exc:  # noqa: BLE001 - a parser failure is a property of the file
        return _reject(record, CORRUPT, f"cannot be parsed ({type(exc).__name__}: {str(exc)[:300]})")

    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    if media_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return _reject(record, DICOMDIR, "media directory (DICOMDIR) file, holds no image")
    sop_class = UID(_text(ds, "SOPClassUID") or media_class)
    record.sop_class_uid = str(sop_class)
    class_name = sop_class.name if sop_class else "unknown SOP class"
    if not any(k in ds for k in PIXEL_KEYWORDS):
        if "Image Storage" in class_name:  # an image object that lost its pixels: cut short or stripped
            return _reject(record, CORRUPT, f"{class_name} object without pixel data (truncated or stripped file)")
        return _reject(record, NON_IMAGE, f"{class_name} object without pixel data")
    if str(sop_class) in NON_IMAGE_WITH_PIXELS:
        return _reject(record, NON_IMAGE, NON_IMAGE_WITH_PIXELS[str(sop_class)])
    if _text(ds, "BurnedInAnnotation").upper() == "YES":
        return _reject(record, BURNED_IN, "BurnedInAnnotation is YES: text in the pixels may identify the patient")

    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    record.transfer_syntax = str(ts) if ts else str(pydicom.uid.ImplicitVRLittleEndian)
    record.rows, record.cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    rejected = _check_pixels(ds, record, ctx.params.verify_pixels)
    if rejected is not None:
        return rejected

    patient_id = _text(ds, "PatientID")
    if not patient_id:
        return _reject(record, NO_PATIENT_ID, "no PatientID: the image cannot be assigned to a patient for splitting")
    if not _text(ds, "SOPInstanceUID") or not _text(ds, "SeriesInstanceUID") or not _text(ds, "StudyInstanceUID"):
        return _reject(record, CORRUPT, "missing SOP/Series/Study Instance UID")

    # Keyed hashes of the original identifiers: for the label join and grouping, never the values.
    record.patient_key = pseudo.patient_key(patient_id, _text(ds, "IssuerOfPatientID"))
    record.k_sop = pseudo.token("sop", _text(ds, "SOPInstanceUID"))
    record.k_series = pseudo.token("series", _text(ds, "SeriesInstanceUID"))
    record.k_study = pseudo.token("study", _text(ds, "StudyInstanceUID"))
    accession = _text(ds, "AccessionNumber")
    record.k_accession = pseudo.token("accession", accession) if accession else ""
    record.manufacturer = _text(ds, "Manufacturer")
    record.model = _text(ds, "ManufacturerModelName")
    record.site = pseudo.site_key(_text(ds, "InstitutionName"), record.manufacturer)
    record.modality = _text(ds, "Modality") or "OT"
    record.image_type = "\\".join(str(v) for v in (ds.get("ImageType") or []))
    record.frames = int(ds.get("NumberOfFrames", 1) or 1)
    record.samples_per_pixel = int(ds.get("SamplesPerPixel", 1) or 1)
    record.photometric = _text(ds, "PhotometricInterpretation")
    record.bits_allocated = int(ds.get("BitsAllocated", 0) or 0)
    record.bits_stored = int(ds.get("BitsStored", record.bits_allocated) or 0)
    record.pixel_representation = int(ds.get("PixelRepresentation", 0) or 0)
    slope, intercept = _floats(ds, "RescaleSlope"), _floats(ds, "RescaleIntercept")
    record.rescale_slope = slope[0] if slope else 1.0
    record.rescale_intercept = intercept[0] if intercept else 0.0
    record.pixel_spacing = _floats(ds, "PixelSpacing") or _floats(ds, "ImagerPixelSpacing")
    thickness = _floats(ds, "SliceThickness")
    record.slice_thickness = thickness[0] if thickness else None
    record.orientation = _floats(ds, "ImageOrientationPatient")
    record.position = _floats(ds, "ImagePositionPatient")

    try:
        pseudo.deidentify(ds, record.patient_key)
    except Exception as exc:  # noqa: BLE001 - never write a file we could not fully de-identify
        return _reject(record, CORRUPT, f"an element cannot be read or de-identified ({type(exc).__name__}: {str(exc)[:300]})")
    record.sop_uid, record.series_uid, record.study_uid = (
        str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
    )
    record.output = _output_path(record)
    _write_dataset(ds, ctx.out_dir / record.output)
    return record


def _output_path(record: FileRecord) -> str:
    # Content-addressed file name: identical inputs give one output, conflicting ones never collide.
    return f"dicom/{record.patient_key}/{record.study_uid}/{record.series_uid}/{record.content_hash[:20]}.dcm"


def _write_dataset(ds: pydicom.Dataset, path: Path) -> None:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue(), durable=False)  # regenerable from the raw file


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _scan_file(relpath: str) -> tuple[str, FileRecord]:
    """Worker entry: (relpath, record); the record's reason is ``__cached__`` for known content."""
    assert _CTX is not None and _PSEUDO is not None
    data = (_CTX.input_dir / relpath).read_bytes()
    content_hash = _hash(data)
    if content_hash in _CTX.known:
        return relpath, FileRecord(content_hash=content_hash, reason="__cached__")
    return relpath, _scan_bytes(data, content_hash, _CTX, _PSEUDO)


def _rewrite_output(task: tuple[str, str]) -> str:
    """Worker entry for phase 3: redo the de-identified copy of a cached record whose output is gone."""
    relpath, expected_output = task
    assert _CTX is not None and _PSEUDO is not None
    data = (_CTX.input_dir / relpath).read_bytes()
    record = _scan_bytes(data, _hash(data), _CTX, _PSEUDO)
    if record.output != expected_output:
        raise RuntimeError(f"{relpath}: changed while ingesting (re-read gives a different record)")
    return relpath


# --------------------------------------------------------------------------------------------------
# the record cache


class RecordCache:
    """Append-only JSON-lines cache of FileRecords keyed by content hash.

    Each record is appended (and flushed) as soon as its file is done, so a killed run loses at most
    the files in flight. The header line names the key fingerprint and versions; a cache made under
    another key or version is discarded together with the outputs it describes.
    """

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.header = {"cache_version": CACHE_VERSION, "deid_version": deid.DEID_VERSION, "key": fingerprint}
        self.records: dict[str, FileRecord] = {}
        self.valid = self._load()
        self._fh = None

    def _load(self) -> bool:
        if not self.path.exists():
            return True
        lines = self.path.read_text().splitlines()
        try:
            if not lines or json.loads(lines[0]) != self.header:
                return False
        except json.JSONDecodeError:
            return False
        for line in lines[1:]:
            try:
                rec = FileRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut by a kill
            self.records[rec.content_hash] = rec
        return True

    def append(self, record: FileRecord) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or not self.valid
            self._fh = open(self.path, "w" if fresh else "a")
            if fresh:
                self._fh.write(json.dumps(self.header) + "\n")
                self.valid = True
        self._fh.write(json.dumps(asdict(record)) + "\n")
        self._fh.flush()
        self.records[record.content_hash] = record

    def compact(self, keep: Iterable[str]) -> None:
        """Rewrite atomically with only the records of content still present in the input."""
        self.close()
        keep = set(keep)
        lines = [json.dumps(self.header)] + [json.dumps(asdict(r)) for h, r in sorted(self.records.items()) if h in keep]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------------------------------
# labels


class LabelsError(ValueError):
    """The labels CSV cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Labels:
    key: str  # one of LABEL_KEYS
    by_value: dict[str, str]  # key value (relpath for "file", else keyed hash) -> label

    def lookup(self, relpath: str, record: FileRecord) -> str | None:
        value = {
            "file": relpath,
            "sop_instance_uid": record.k_sop,
            "series_instance_uid": record.k_series,
            "study_instance_uid": record.k_study,
            "accession_number": record.k_accession,
        }[self.key]
        return self.by_value.get(value) if value else None


def read_labels(path: Path, pseudo: deid.Pseudonymizer) -> Labels:
    """Read a labels CSV: a ``label`` column and exactly one key column from :data:`LABEL_KEYS`.

    Identifier values are hashed with the site key at once, so they never reach outputs or logs.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: labels file does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        keys = [h for h in header if h in LABEL_KEYS]
        if "label" not in header:
            raise LabelsError(f"{path}: no 'label' column (header is {header})")
        if len(keys) != 1:
            raise LabelsError(
                f"{path}: needs exactly one key column out of {list(LABEL_KEYS)}, found {keys or 'none'} in {header}"
            )
        key = keys[0]
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
    if not path.is_file():
        raise LabelsError(f"{path}: lesions file does not exist")
    rows: list[LesionRow] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
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


def _lesion_table(units: list[_Unit], lesions: list[LesionRow]) -> tuple[pd.DataFrame, int]:
    """Sidecar rows of ingested instances under the manifest's keys, and how many rows were dropped.

    A row is kept when its SOP instance is in a unit and its study and series match that instance's
    (a row naming the wrong series is dropped rather than placed on another image).
    """
    where: dict[str, tuple[_Unit, int, FileRecord]] = {}
    for unit in units:
        for k, (_, record) in enumerate(unit.files):
            where[record.k_sop] = (unit, k, record)
    rows = []
    for lesion in lesions:
        found = where.get(lesion.k_sop)
        if found is None or (found[2].k_series, found[2].k_study) != (lesion.k_series, lesion.k_study):
            continue
        unit, k, record = found
        rows.append((_image_id(unit), record.patient_key, record.study_uid, record.series_uid, record.sop_uid, k,
                     lesion.row, lesion.col, lesion.radius_px, lesion.radius_mm))
    table = pd.DataFrame(rows, columns=list(LESION_OUTPUT_COLUMNS)).astype(
        {"slice_index": "int64", "row": "float64", "col": "float64", "radius_px": "float64", "radius_mm": "float64"})
    return table.sort_values(["image_id", "slice_index"], kind="stable").reset_index(drop=True), len(lesions) - len(rows)


# --------------------------------------------------------------------------------------------------
# phase 2: assemble units


@dataclass
class _Unit:
    kind: str  # "2d" | "multiframe" | "volume"
    files: list[tuple[str, FileRecord]]  # (relpath, record), volumes ordered by position
    label: str
    slice_spacing: float | None = None


def _normal(orientation: list[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:6])
    return np.cross(row, col)


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
    scanned: list[tuple[str, FileRecord]], labels: Labels, params: IngestParams
) -> tuple[list[_Unit], dict[str, str]]:
    """Units that are in, and reasons for every relpath that is out."""
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
                rejected[relpath] = f"{DUPLICATE}: same SOPInstanceUID as {others[0]} but different content; resolve which is right"
            continue
        kept.append(first)
        for relpath, _, _ in items[1:]:
            rejected[relpath] = f"{DUPLICATE}: identical copy of {first[0]}"

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


def _manifest(units: list[_Unit]) -> pd.DataFrame:
    rows = []
    for unit in units:
        first = unit.files[0][1]
        spacing = list(first.pixel_spacing[:2]) + [unit.slice_spacing if unit.slice_spacing else float("nan")]
        rows.append({
            "image_id": _image_id(unit),
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
            "orientation": first.orientation or [float("nan")] * 6,
            "origin_mm": first.position or [float("nan")] * 3,
            "photometric": first.photometric,
            "bits_stored": first.bits_stored,
            "pixel_representation": first.pixel_representation,
            "rescale_slope": first.rescale_slope,
            "rescale_intercept": first.rescale_intercept,
            "transfer_syntax": first.transfer_syntax,
            "paths": [r.output for _, r in unit.files],
            "n_files": len(unit.files),
        })
    columns = ["image_id", "unit", "patient_key", "study_uid", "series_uid", "sop_instance_uids", "label", "modality",
               "site", "manufacturer", "model", "rows", "cols", "frames", "samples_per_pixel", "spacing_mm",
               "orientation", "origin_mm", "photometric", "bits_stored", "pixel_representation", "rescale_slope",
               "rescale_intercept", "transfer_syntax", "paths", "n_files"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------------
# the stage


def walk_inputs(input_dir: Path, skip: Iterable[Path] = ()) -> list[str]:
    """Every regular file under ``input_dir`` (relative POSIX paths, sorted), minus ``skip``."""
    skip_set = {Path(p).resolve() for p in skip}
    found = []
    for root, dirs, files in os.walk(input_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if name in SIDECAR_NAMES or path.resolve() in skip_set or not path.is_file():
                continue
            found.append(path.relative_to(input_dir).as_posix())
    return found


def is_synthetic(input_dir: Path) -> bool:
    """Whether ``input_dir`` is (inside) a cohort written by ``medtl synth``."""
    for folder in (Path(input_dir), *Path(input_dir).resolve().parents[:2]):
        marker = folder / "medtl_synth.json"
        if marker.is_file():
            try:
                return bool(json.loads(marker.read_text()).get("synthetic"))
            except (json.JSONDecodeError, AttributeError):
                return False
    return False


def run(
    params: IngestParams,
    input_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    quarantine_dir: Path | None = None,
    key: bytes | None = None,
    fanout: FanoutParams | None = None,
    lesions_csv: Path | None = None,
) -> IngestSummary:
    """Ingest a DICOM tree: de-identify, account for every file, write manifest/rejected/summary.

    Args:
        params: the ``ingest`` params.
        input_dir: the raw export (PHI inside; never pushed).
        labels_csv: labels by one key column (see :func:`read_labels`).
        out_dir: stage output (a DVC ``persist`` output: it holds the cache that makes reruns incremental).
        quarantine_dir: where rejected files are linked with their reasons (None: not done). Keep it out
            of DVC outputs: it holds raw files with PHI.
        key: pseudonymisation key; None resolves it (:func:`pipeline.deid.resolve_key`).
        fanout: where the per-file work of the scan and rewrite phases runs (default: local
            processes, ``params.workers`` of them); outputs do not depend on it.
        lesions_csv: optional lesion ground-truth sidecar (:func:`read_lesions`); None (a real site): none.
            ``out_dir/lesions.parquet`` is written either way (empty without a sidecar).

    Returns:
        The summary also written to ``out_dir/summary.json``.
    """
    started = time.perf_counter()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input directory does not exist")
    if key is None:
        key, source = deid.resolve_key(synthetic=is_synthetic(input_dir))
        log.info("pseudonymisation key from %s", source)
    pseudo = deid.Pseudonymizer(key)
    labels = read_labels(labels_csv, pseudo)
    lesions = read_lesions(lesions_csv, pseudo) if lesions_csv is not None else []
    fanout = fanout or FanoutParams()
    workers = params.workers or os.cpu_count() or 1
    out_dir.mkdir(parents=True, exist_ok=True)

    cache = RecordCache(out_dir / "cache" / "records.jsonl", pseudo.fingerprint)
    if not cache.valid:
        log.warning("ingest cache was made with another key or version: starting from scratch")
        shutil.rmtree(out_dir / "dicom", ignore_errors=True)
    relpaths = walk_inputs(input_dir, skip=[labels_csv, *([lesions_csv] if lesions_csv is not None else [])])
    ctx = _ScanContext(input_dir, out_dir, key, params, frozenset(cache.records))

    # phase 1: scan (cached content is only hashed)
    scanned: list[tuple[str, FileRecord]] = []
    n_new = 0
    try:
        for relpath, record in map_ordered(_scan_file, relpaths, init=_init_worker, init_args=(ctx,), params=fanout,
                                           workers=params.workers, desc="ingest"):
            if record.reason == "__cached__":
                record = cache.records[record.content_hash]
            else:
                n_new += 1
                cache.append(record)
            scanned.append((relpath, record))
    finally:
        cache.close()

    # phase 2: assemble units
    units, rejected = _assemble(scanned, labels, params)

    # phase 3: outputs
    wanted = {r.output: p for u in units for p, r in u.files}
    missing = [(p, out) for out, p in sorted(wanted.items()) if not (out_dir / out).exists()]
    for _ in map_ordered(_rewrite_output, missing, init=_init_worker, init_args=(ctx,), params=fanout,
                         workers=params.workers, desc="rewrite"):
        pass
    _remove_unwanted(out_dir / "dicom", out_dir, set(wanted))
    cache.compact(r.content_hash for _, r in scanned)

    manifest = _manifest(units)
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    atomic_write_bytes(out_dir / "manifest.parquet", buffer.getvalue())
    lesion_table, lesions_dropped = _lesion_table(units, lesions)
    buffer = io.BytesIO()
    lesion_table.to_parquet(buffer, index=False)
    atomic_write_bytes(out_dir / "lesions.parquet", buffer.getvalue())
    if lesions_csv is not None:
        log.info("lesions: %d sidecar rows, %d on %d ingested images, %d dropped (instance not ingested)",
                 len(lesions), len(lesion_table), lesion_table["image_id"].nunique(), lesions_dropped)
    rejected_rows = sorted(rejected.items())
    atomic_write_text(out_dir / "rejected.csv", csv_text(["path", "reason"], rejected_rows))
    if quarantine_dir is not None:
        _quarantine(input_dir, Path(quarantine_dir), rejected_rows)

    ingested_files = sum(len(u.files) for u in units)
    summary = IngestSummary(
        files_seen=len(relpaths),
        ingested=ingested_files,
        rejected=dict(sorted(Counter(reason.split(":", 1)[0] for _, reason in rejected_rows).items())),
        images=len(units),
        series=len({u.files[0][1].series_uid for u in units}),
        studies=len({u.files[0][1].study_uid for u in units}),
        patients=len({u.files[0][1].patient_key for u in units}),
        by_modality=dict(sorted(Counter(u.files[0][1].modality for u in units).items())),
        by_site=dict(sorted(Counter(u.files[0][1].site for u in units).items())),
        by_label=dict(sorted(Counter(u.label for u in units).items())),
        by_transfer_syntax=dict(sorted(Counter(UID(r.transfer_syntax).name for u in units for _, r in u.files).items())),
        label_key=labels.key,
        run={"runner": fanout.runner, "workers": workers, "new_files": n_new, "cached_files": len(relpaths) - n_new,
             "rewritten_files": len(missing), "seconds": round(time.perf_counter() - started, 2)},
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


def _remove_unwanted(root: Path, out_dir: Path, wanted: set[str]) -> None:
    if not root.exists():
        return
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() and path.relative_to(out_dir).as_posix() not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _quarantine(input_dir: Path, quarantine_dir: Path, rejected_rows: list[tuple[str, str]]) -> None:
    """Link (or copy) every rejected file into ``quarantine_dir`` with a reasons list; drop stale ones."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    wanted = {p for p, _ in rejected_rows}
    for path in sorted(quarantine_dir.rglob("*"), reverse=True):
        rel = path.relative_to(quarantine_dir).as_posix()
        if path.is_file() and rel != "reasons.csv" and rel not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for relpath, _ in rejected_rows:
        target = quarantine_dir / relpath
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(input_dir / relpath, target)
        except OSError:
            shutil.copy2(input_dir / relpath, target)
    atomic_write_text(quarantine_dir / "reasons.csv", csv_text(["path", "reason"], rejected_rows))

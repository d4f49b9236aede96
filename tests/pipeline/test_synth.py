"""Synth: the synthetic PACS-export cohort (determinism, increments, headers, pixels, defects)."""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import hashlib
import io
import json
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from pipeline import synth
from pipeline.io_utils import content_hash
from pipeline.params import ParamsError
from pipeline.synth import planning, rendering, writing

SEED = 7
PATIENTS = 40  # one defect block: every defect kind and transfer syntax appears
EXPECTED_TS = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEG2000Lossless,
               RLELossless}
PATH_RE = re.compile(r"^DICOM/SITE_[A-D]/PAT\d{5}/(ST\d{3}/SE\d{3}/IM\d{5}|Thumbs\.db|README\.TXT)$")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / synth.DICOM_DIR).rglob("*") if p.is_file())


def _on_disk(root: Path) -> dict[str, str]:
    """relpath -> content id of every file under ``root`` but the marker."""
    return {p.relative_to(root).as_posix(): content_hash(p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != synth.MARKER_NAME}


def _listed(root: Path) -> dict[str, str]:
    return json.loads((root / synth.MARKER_NAME).read_text())[synth.MARKER_FILES]


def _assert_marker_lists_every_file(root: Path) -> None:
    assert _listed(root) == _on_disk(root)


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / synth.LABELS_NAME, newline="") as fh:
        return list(csv.DictReader(fh))


class Cohort:
    """A written cohort with every file parsed once."""

    def __init__(self, root: Path, summary: synth.SynthSummary, defects: bool):
        self.root, self.summary, self.defects = root, summary, defects
        self.files = _dicom_files(root)
        self.headers: dict[str, Dataset] = {}  # relpath -> dataset (pixel data not decoded yet)
        self.not_dicom: list[str] = []
        for path in self.files:
            rel = path.relative_to(root).as_posix()
            if path.read_bytes()[128:132] != b"DICM":
                self.not_dicom.append(rel)
                continue
            ds = pydicom.dcmread(path)
            if "SOPInstanceUID" not in ds:  # pydicom gives up on some damaged files: read the header only
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.headers[rel] = ds

    def images(self) -> dict[str, Dataset]:
        return {rel: ds for rel, ds in self.headers.items() if "PixelData" in ds}

    def plan(self, rel: str) -> tuple[synth.PatientPlan, synth.StudyPlan]:
        parts = rel.split("/")
        pt = planning.plan_patient(SEED, int(parts[2][3:]))
        return pt, pt.studies[int(parts[3][2:]) - 1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    root = tmp_path_factory.mktemp("synth") / "cohort"
    summary = synth.run(synth.SynthParams(patients=PATIENTS, seed=SEED), root)
    return Cohort(root, summary, True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Cohort:
    root = tmp_path_factory.mktemp("synth") / "clean"
    summary = synth.run(synth.SynthParams(patients=PATIENTS, seed=SEED, defects=False), root)
    return Cohort(root, summary, False)


def _series(c: Cohort, sop_class: str) -> dict[str, list[tuple[str, Dataset]]]:
    series: dict[str, list[tuple[str, Dataset]]] = defaultdict(list)
    for rel, ds in c.images().items():
        if ds.SOPClassUID == sop_class:
            series[ds.SeriesInstanceUID].append((rel, ds))
    return series


def _along(ds: Dataset) -> float:
    orient = np.array([float(v) for v in ds.ImageOrientationPatient])
    return float(np.dot(np.cross(orient[:3], orient[3:]), [float(v) for v in ds.ImagePositionPatient]))


def _hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _density(ds: Dataset) -> np.ndarray:
    """Pixels as density: HU for CT; for radiographs the stored value over its range, denser = higher."""
    if ds.Modality == "CT":
        return _hu(ds)
    values = ds.pixel_array.astype(float) / ((1 << ds.BitsStored) - 1)
    return -values if ds.PhotometricInterpretation == "MONOCHROME1" else values


# --------------------------------------------------------------------------------------------------
# layout, determinism, increments


def test_layout_marker_and_labels(cohort):
    root = cohort.root
    marker = json.loads((root / synth.MARKER_NAME).read_text())
    files = marker.pop(synth.MARKER_FILES)
    assert marker == {"synthetic": True, "seed": SEED, "patients": PATIENTS, "generator_version": synth.GENERATOR_VERSION, "defects": True}
    # the file list: every file synth wrote (defect copies and junk too, labels and lesions), not the marker
    assert files == _on_disk(root)
    assert len(files) == cohort.summary.files + 2 and {synth.LABELS_NAME, synth.LESIONS_NAME} <= set(files)
    text = (root / synth.MARKER_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", "deterministic: sorted keys"
    assert sorted(p.name for p in root.iterdir()) == sorted([synth.DICOM_DIR, synth.LABELS_NAME, synth.LESIONS_NAME,
                                                           synth.MARKER_NAME])
    rels = [p.relative_to(root).as_posix() for p in cohort.files]
    assert all(PATH_RE.match(rel) for rel in rels), [r for r in rels if not PATH_RE.match(r)][:5]
    assert not [p for p in root.rglob(".*")], "temporary files left behind"

    with open(root / synth.LABELS_NAME, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["study_instance_uid", "label"]
    rows = _labels(root)
    studies = {ds.StudyInstanceUID for ds in cohort.headers.values()}
    assert [r["study_instance_uid"] for r in rows] == list(dict.fromkeys(r["study_instance_uid"] for r in rows))
    assert {r["study_instance_uid"] for r in rows} == studies
    labels = Counter(r["label"] for r in rows)
    assert set(labels) == {"lesion", "normal"} and 0.2 < labels["lesion"] / len(rows) < 0.6

    # nothing in a path gives away a label or a patient
    phi = set()
    for ds in cohort.headers.values():
        name = ds.PatientName
        phi |= {str(name).lower(), str(ds.PatientID).lower()} | {p.lower() for p in (name.family_name, name.given_name) if len(p) >= 4}
    for rel in rels:
        for part in rel.lower().split("/"):
            assert "lesion" not in part and "normal" not in part
            assert not [v for v in phi if v in part], (rel, [v for v in phi if v in part])


def test_summary_counts_what_is_written(cohort):
    s = cohort.summary
    assert s.patients == PATIENTS
    assert s.files == len(cohort.files)
    sops = {ds.SOPInstanceUID for ds in cohort.headers.values()}
    assert s.instances == len(sops)
    assert s.studies == len(_labels(cohort.root)) == sum(s.labels.values())
    assert s.series == len({ds.SeriesInstanceUID for ds in cohort.headers.values()})
    first = {}
    for ds in cohort.headers.values():
        first.setdefault(ds.SOPInstanceUID, ds)
    assert s.by_modality == dict(Counter(ds.Modality for ds in first.values()))
    assert s.by_transfer_syntax == dict(Counter(ds.file_meta.TransferSyntaxUID.keyword for ds in first.values()))
    assert s.labels == dict(Counter(r["label"] for r in _labels(cohort.root)))


def test_same_seed_same_bytes_other_seed_differs(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="pipeline.synth"):
        synth.run(synth.SynthParams(patients=6, seed=3), tmp_path / "a")
    synth.run(synth.SynthParams(patients=6, seed=3), tmp_path / "b")
    synth.run(synth.SynthParams(patients=6, seed=4), tmp_path / "c")
    a, b, c = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert a == b
    assert len(a) > 20
    dicom_a = {v for k, v in a.items() if k.startswith("DICOM/")}
    dicom_c = {v for k, v in c.items() if k.startswith("DICOM/")}
    assert dicom_a and dicom_c and not dicom_a & dicom_c
    # the log carries counts, never names or IDs
    names = {str(ds.PatientName) for ds in (pydicom.dcmread(p, stop_before_pixels=True)
                                             for p in _dicom_files(tmp_path / "a") if p.read_bytes()[128:132] == b"DICM")}
    assert "synth:" in caplog.text
    assert not [n for n in names if n in caplog.text or n.split("^")[0] in caplog.text]
    assert "MRN" not in caplog.text


def test_add_equals_a_full_run_and_leaves_existing_files_alone(tmp_path):
    inc, full = tmp_path / "inc", tmp_path / "full"
    first = synth.run(synth.SynthParams(patients=5, seed=3), inc)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in _dicom_files(inc)}
    labels_before = (inc / synth.LABELS_NAME).read_text().splitlines()
    summary = synth.add(inc, 3)
    for path, (mtime, data) in before.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    labels_after = (inc / synth.LABELS_NAME).read_text().splitlines()
    assert labels_after[: len(labels_before)] == labels_before and len(labels_after) > len(labels_before)
    assert json.loads((inc / synth.MARKER_NAME).read_text())["patients"] == 8
    full_summary = synth.run(synth.SynthParams(patients=8, seed=3), full)
    assert (inc / synth.LESIONS_NAME).read_bytes() == (full / synth.LESIONS_NAME).read_bytes()
    assert len(_lesion_rows(inc)) > 0
    assert _hashes(inc) == _hashes(full)  # the marker too: same file list
    assert summary == full_summary and summary.files > first.files
    _assert_marker_lists_every_file(inc)


def test_rerun_writes_only_missing_files_and_refuses_other_cohorts(tmp_path):
    root = tmp_path / "c"
    synth.run(synth.SynthParams(patients=4, seed=5), root)
    reference = _hashes(root)
    files = _dicom_files(root)
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    victim = files[len(files) // 2]
    victim.unlink()
    stale = victim.parent / f".{victim.name}.x7Yq2a.tmp"  # what an interrupted write leaves
    stale.write_bytes(b"half a file")
    synth.run(synth.SynthParams(patients=4, seed=5), root)
    assert _hashes(root) == reference and not stale.exists()
    _assert_marker_lists_every_file(root)
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in files if p != victim)
    # fewer patients asked for: the cohort keeps what it has
    assert synth.run(synth.SynthParams(patients=2, seed=5), root).patients == 4
    assert _hashes(root) == reference
    with pytest.raises(ValueError, match="seed"):
        synth.run(synth.SynthParams(patients=4, seed=6), root)
    with pytest.raises(ValueError, match="defects"):
        synth.run(synth.SynthParams(patients=4, seed=5, defects=False), root)
    foreign = tmp_path / "foreign"
    (foreign / synth.DICOM_DIR).mkdir(parents=True)
    (foreign / synth.DICOM_DIR / "x.dcm").write_bytes(b"")
    with pytest.raises(ValueError, match="marker|medtl_synth"):
        synth.run(synth.SynthParams(patients=1, seed=5), foreign)
    with pytest.raises(FileNotFoundError):
        synth.add(tmp_path / "nothing", 1)
    with pytest.raises(ValueError):
        synth.SynthParams(patients=-1)


def test_params_constraints():
    assert synth.SynthParams() == synth.SynthParams(patients=100, seed=0, defects=True)
    bounds = {f.name: f.metadata for f in dataclasses.fields(synth.SynthParams)}
    assert bounds["patients"]["min"] == 1 and bounds["seed"]["min"] == 0
    for bad in ({"patients": 0}, {"patients": 2.5}, {"patients": True}, {"seed": -1}, {"defects": "yes"}):
        with pytest.raises(ParamsError, match="synth."):
            synth.SynthParams(**bad)


def test_the_package_exports_its_api_and_each_module_imports_only_public_names_of_those_above_it():
    assert sorted(synth.__all__) == sorted([
        "DEFECT_KINDS", "DICOM_DIR", "GENERATOR_VERSION", "LABELS_NAME", "LESIONS_NAME", "MARKER_FILES", "MARKER_NAME",
        "SITES", "PatientPlan", "Site", "StudyPlan", "SynthParams", "SynthSummary", "add", "run"])
    assert all(hasattr(synth, name) for name in synth.__all__)
    order = ["sites", "planning", "phantoms", "rendering", "writing"]
    package = Path(synth.__file__).parent
    assert sorted(p.stem for p in package.glob("*.py")) == sorted(order + ["__init__"])
    for i, name in enumerate(order):
        tree = ast.parse((package / f"{name}.py").read_text())
        imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                   and node.module.startswith("pipeline.synth")]
        assert {node.module for node in imports} <= {f"pipeline.synth.{above}" for above in order[:i]}, name
        assert not [a.name for node in imports for a in node.names if a.name.startswith("_")], name


def test_an_interrupted_run_leaves_no_partial_files_and_is_completed(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    synth.run(synth.SynthParams(patients=5, seed=2), reference)
    root = tmp_path / "interrupted"
    real_write, calls = writing.atomic_write_bytes, []

    def killed_on_the_40th_write(path, data, **kwargs):
        calls.append(path)
        if len(calls) == 40:  # killed after writing half the temporary file, before the rename
            path.with_name(f".{path.name}.k1ll3d.tmp").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        real_write(path, data, **kwargs)

    monkeypatch.setattr(writing, "atomic_write_bytes", killed_on_the_40th_write)
    with pytest.raises(KeyboardInterrupt):
        synth.run(synth.SynthParams(patients=5, seed=2), root)
    monkeypatch.undo()
    marker = json.loads((root / synth.MARKER_NAME).read_text())
    assert marker["patients"] == 0 and marker["writing_patients"] == 5
    assert not (root / synth.LABELS_NAME).exists()
    written = {k: v for k, v in _hashes(root / synth.DICOM_DIR).items() if not Path(k).name.startswith(".")}
    expected = _hashes(reference / synth.DICOM_DIR)
    assert 30 < len(written) < len(expected)
    assert all(expected[k] == v for k, v in written.items()), "a partial file under a final name"
    # the interrupted marker lists only what it had when the run started (nothing): never a file it did not make
    assert marker[synth.MARKER_FILES] == {}
    synth.run(synth.SynthParams(patients=2, seed=2), root)  # completes the 5 patients it was writing
    assert _hashes(root) == _hashes(reference)
    _assert_marker_lists_every_file(root)


def test_a_resumed_run_lists_files_from_checkpoints_and_renders_only_unlisted_patients(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    synth.run(synth.SynthParams(patients=6, seed=2), reference)
    root = tmp_path / "interrupted"
    monkeypatch.setattr(writing, "CHECKPOINT_FILES", 20)
    real_write, real_render = writing.atomic_write_bytes, writing.render_patient
    calls: list[Path] = []

    def killed_after_the_third_patient(path, data, **kwargs):
        calls.append(path)
        if len([p for p in calls if "PAT00003" in p.as_posix()]) == 2:
            raise KeyboardInterrupt
        real_write(path, data, **kwargs)

    monkeypatch.setattr(writing, "atomic_write_bytes", killed_after_the_third_patient)
    with pytest.raises(KeyboardInterrupt):
        synth.run(synth.SynthParams(patients=6, seed=2), root)
    monkeypatch.setattr(writing, "atomic_write_bytes", real_write)
    listed = _listed(root)
    disk = _on_disk(root)
    assert listed and all(disk[rel] == cid for rel, cid in listed.items()), "listed: written and with their ids"
    checkpointed = {rel.split("/")[2] for rel in listed}
    written = {rel.split("/")[2] for rel in disk}
    assert checkpointed < written == {f"PAT{i:05d}" for i in range(4)}

    rendered: list[int] = []

    def spy(pt, seed, defects):
        rendered.append(pt.index)
        return real_render(pt, seed, defects)

    monkeypatch.setattr(writing, "render_patient", spy)
    synth.run(synth.SynthParams(patients=6, seed=2), root)
    # patients listed at a checkpoint are not rendered again; the rest are (3 had files missing)
    assert sorted(rendered) == sorted(i for i in range(6) if f"PAT{i:05d}" not in checkpointed)
    assert _hashes(root) == _hashes(reference)
    _assert_marker_lists_every_file(root)


def test_the_file_list_never_takes_ids_from_the_tree(tmp_path):
    root = tmp_path / "c"
    synth.run(synth.SynthParams(patients=3, seed=4), root)
    original = _listed(root)
    # a user overwrites a file and adds one: a rerun lists neither (it does not read existing files)
    victim = _dicom_files(root)[5]
    rel = victim.relative_to(root).as_posix()
    victim.write_bytes(b"real patient data")
    (victim.parent / "IM99999").write_bytes(b"more real data")
    synth.run(synth.SynthParams(patients=3, seed=4), root)
    assert _listed(root) == original and original[rel] != content_hash(b"real patient data")
    assert content_hash(b"more real data") not in set(_listed(root).values())

    # a marker from before the list: the next run lists every file by rendering, rewrites none
    victim.unlink()
    (victim.parent / "IM99999").unlink()
    synth.run(synth.SynthParams(patients=3, seed=4), root)
    marker = json.loads((root / synth.MARKER_NAME).read_text())
    del marker[synth.MARKER_FILES]
    (root / synth.MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != synth.MARKER_NAME}
    synth.run(synth.SynthParams(patients=3, seed=4), root)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert _listed(root) == original
    _assert_marker_lists_every_file(root)


# --------------------------------------------------------------------------------------------------
# headers


def test_headers_carry_realistic_fake_phi(cohort):
    ids_by_patient: dict[str, set[str]] = defaultdict(set)
    accessions: dict[str, set[str]] = defaultdict(set)
    for rel, ds in cohort.headers.items():
        folder = rel.split("/")[2]
        for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                        "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber", "StudyDate", "StudyTime",
                        "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "OperatorsName", "StationName",
                        "DeviceSerialNumber", "StudyID", "StudyDescription", "SeriesDescription", "Manufacturer",
                        "ManufacturerModelName", "StudyInstanceUID", "SeriesInstanceUID", "BodyPartExamined"):
            assert str(ds.get(keyword, "")).strip(), f"{rel}: no {keyword}"
        name = ds.PatientName
        assert name.family_name and name.given_name
        assert name.family_name in ds.StudyDescription
        assert re.fullmatch(r"MRN\d{7}", ds.PatientID)
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.ImplementationVersionName and ds.preamble == b"\x00" * 128
        ids_by_patient[folder].add(ds.PatientID)
        accessions[ds.StudyInstanceUID].add(ds.AccessionNumber)
        if ds.Modality != "SR":  # vendors copy PHI into their private block
            creator = next(e for e in ds if e.tag.group == 0x0019 and e.tag.element == 0x0010)
            block = ds.private_block(0x0019, creator.value)
            values = [block[e].value for e in (0x10, 0x11)]  # UN (raw bytes) in implicit VR files
            values = [v.decode().strip() if isinstance(v, bytes) else v for v in values]
            assert values == [str(name), ds.PatientID]
            assert ds.BodyPartExamined == "CHEST" and ds.ImageType
        sop_class = {"CT": {CT_STORAGE, "1.2.840.10008.5.1.4.1.1.7"}, "DX": {"1.2.840.10008.5.1.4.1.1.1.1"},
                     "CR": {"1.2.840.10008.5.1.4.1.1.1"}, "SR": {"1.2.840.10008.5.1.4.1.1.88.11"}}[ds.Modality]
        assert ds.SOPClassUID in sop_class
        if ds.SOPClassUID == CT_STORAGE:
            assert ds.PatientPosition == "HFS" and ds.FrameOfReferenceUID and ds.RescaleType == "HU"
    assert all(len(v) == 1 for v in ids_by_patient.values())
    assert len({next(iter(v)) for v in ids_by_patient.values()}) == len(ids_by_patient) == PATIENTS
    assert all(len(v) == 1 for v in accessions.values())
    assert len({next(iter(v)) for v in accessions.values()}) == len(accessions)
    assert len({ds.Manufacturer for ds in cohort.headers.values()}) >= 4
    assert len({ds.InstitutionName for ds in cohort.headers.values()}) == 4
    assert any("OtherPatientNames" in ds for ds in cohort.headers.values())


def test_no_header_text_reveals_the_label(cohort):
    for rel, ds in cohort.headers.items():
        for elem in ds.iterall():
            if elem.VR in ("LO", "SH", "ST", "LT", "UT", "CS", "PN") and elem.value:
                text = str(elem.value).lower()
                assert not any(w in text for w in ("lesion", "nodule", "normal", "finding")), (rel, elem)


def test_fast_writer_writes_what_pydicom_writes():
    for index in range(12):
        pt = planning.plan_patient(SEED, index)
        for st in pt.studies:
            for se in planning.series_of(pt, st, SEED, True):
                for ts in sorted(EXPECTED_TS):
                    if se.kind == "sr":
                        if ts.is_compressed:
                            continue
                        template, per, pixels = rendering._sr_dataset(pt, st, se, SEED), {}, None
                    else:
                        template = rendering._series_template(pt, st, se, SEED)
                        dtype = np.uint8 if template.BitsAllocated == 8 else (
                            np.int16 if template.PixelRepresentation else np.uint16)
                        arr = np.arange(template.Rows * template.Columns).reshape(template.Rows, template.Columns)
                        arr = (arr % (1 << min(template.BitsStored, 8))).astype(dtype)
                        pixels = rendering._encode(arr, ts, template.BitsStored, template.PixelRepresentation,
                                                   template.PhotometricInterpretation)
                        per = {"InstanceNumber": 4}
                        if se.kind.startswith("ct"):
                            position = rendering._slice_position(st.ct, pt.site, 1)
                            per["ImagePositionPatient"], per["SliceLocation"] = position
                    writer = rendering._SeriesWriter(template, pt.site, template.SOPClassUID, ts)
                    for k in range(2):
                        uid = planning.synth_uid(SEED, "test", index, st.index, se.index, k)
                        fast, _ = writer.instance(uid, per, pixels)
                        ds = Dataset(dict(template._dict))
                        ds.SOPInstanceUID = uid
                        for key, value in per.items():
                            setattr(ds, key, value)
                        if pixels is not None:
                            ds.add_new(0x7FE00010, pixels[1], pixels[0])
                        ds.file_meta = rendering._file_meta(template.SOPClassUID, uid, ts, pt.site)
                        buffer = io.BytesIO()
                        ds.save_as(buffer, enforce_file_format=True)
                        assert buffer.getvalue() == fast, (index, se.kind, ts.name)


# --------------------------------------------------------------------------------------------------
# pixels


def test_transfer_syntaxes_and_every_image_decodes(cohort):
    seen = Counter(ds.file_meta.TransferSyntaxUID for ds in cohort.headers.values())
    assert set(seen) == EXPECTED_TS
    failed = []
    for rel, ds in cohort.images().items():
        try:
            arr = ds.pixel_array
        except Exception:  # noqa: BLE001 - only the planted truncated copies may fail
            failed.append(rel)
            continue
        assert arr.shape == (ds.Rows, ds.Columns), rel
        lo, hi = (-(1 << (ds.BitsStored - 1)), (1 << (ds.BitsStored - 1)) - 1) if ds.PixelRepresentation else (
            0, (1 << ds.BitsStored) - 1)
        assert lo <= arr.min() and arr.max() <= hi, rel
    truncated = [f"{synth.DICOM_DIR}/{pt.site.folder}/{ex.rel}" for pt in map(lambda i: planning.plan_patient(SEED, i),
                                                                              range(PATIENTS))
                 for ex in pt.extras if ex.kind == "truncated"]
    assert sorted(failed) == sorted(truncated) and len(truncated) == 1


def test_projection_images_differ_by_site(cohort):
    by_site: dict[str, set] = defaultdict(set)
    for rel, ds in cohort.images().items():
        if ds.Modality not in ("DX", "CR"):
            continue
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if ds.Modality == "CR" else "MONOCHROME2")
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
        assert len(ds.ImagerPixelSpacing) == 2 and len(ds.PixelSpacing) == 2
        assert ds.ViewPosition in ("PA", "LL")
        by_site[rel.split("/")[1]].add((ds.Modality, ds.Rows, ds.Columns, ds.BitsStored, ds.Manufacturer))
    assert len(by_site) == 4 and all(len(v) == 1 for v in by_site.values())
    variants = [next(iter(v)) for v in by_site.values()]
    assert {v[0] for v in variants} == {"DX", "CR"}
    assert len({v[1:3] for v in variants}) == 4 and {v[3] for v in variants} == {10, 12, 14, 16}


def _lesion_rows(root: Path) -> list[dict[str, str]]:
    with open(root / synth.LESIONS_NAME, newline="") as fh:
        return list(csv.DictReader(fh))


def _centre_contrast(values: np.ndarray, row: float, col: float, radius: float) -> float:
    """Mean inside 0.7 radius minus the median of a ring at 1.6-2.6 radii (positive: denser centre)."""
    rows, cols = np.mgrid[: values.shape[0], : values.shape[1]]
    dist = np.hypot(rows - row, cols - col)
    inside = values[dist <= max(0.7 * radius, 0.75)]
    ring = values[(dist >= 1.6 * radius + 0.5) & (dist <= 2.6 * radius + 1.5)]
    return float(inside.mean() - np.median(ring))


def test_lesion_sidecar_points_at_the_nodule_in_every_view(clean):
    root = clean.root
    with open(root / synth.LESIONS_NAME, newline="") as fh:
        assert next(csv.reader(fh)) == ["study_instance_uid", "series_instance_uid", "sop_instance_uid", "row", "col",
                                        "radius_px", "radius_mm"]
    rows = _lesion_rows(root)
    by_sop = {ds.SOPInstanceUID: ds for ds in clean.images().values()}
    labels = {r["study_instance_uid"]: r["label"] for r in _labels(root)}
    assert len({r["sop_instance_uid"] for r in rows}) == len(rows)
    # every row is a written image of a lesion study; every image of a lesion study's radiographs is listed
    for r in rows:
        ds = by_sop[r["sop_instance_uid"]]
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (r["study_instance_uid"], r["series_instance_uid"])
        assert labels[r["study_instance_uid"]] == "lesion"
        assert 0 <= float(r["row"]) < ds.Rows and 0 <= float(r["col"]) < ds.Columns
        spacing = np.mean([float(v) for v in ds.PixelSpacing])
        assert float(r["radius_mm"]) == pytest.approx(float(r["radius_px"]) * spacing, abs=0.01)
    listed = {r["sop_instance_uid"] for r in rows}
    for ds in by_sop.values():
        if ds.Modality in ("DX", "CR"):
            assert (ds.SOPInstanceUID in listed) == (labels[ds.StudyInstanceUID] == "lesion")
    # every CT series of a lesion study lists its middle slices by position
    for slices in _series(clean, CT_STORAGE).values():
        if labels[slices[0][1].StudyInstanceUID] != "lesion":
            continue
        ordered = [ds for _, ds in sorted(slices, key=lambda item: _along(item[1]))]
        n = len(ordered)
        assert {ordered[(n - 1) // 2].SOPInstanceUID, ordered[n // 2].SOPInstanceUID} <= listed
    # the centre is denser than its surroundings (HU for CT; flipped for MONOCHROME1)
    contrast = {"CT": [], "XR": []}
    for r in rows:
        ds = by_sop[r["sop_instance_uid"]]
        radius = float(r["radius_px"])
        if ds.Modality == "CT" and radius < 1.2:  # the sphere's cap on an outer slice: partial volume only
            continue
        group = "CT" if ds.Modality == "CT" else "XR"
        contrast[group].append(_centre_contrast(_density(ds), float(r["row"]), float(r["col"]), radius))
    assert len(contrast["CT"]) >= 5 and len(contrast["XR"]) >= 3
    assert np.mean(np.array(contrast["CT"]) > 150) >= 0.85, contrast["CT"]  # HU above the lung (partial-volume caps aside)
    assert np.mean(np.array(contrast["XR"]) > 0) >= 0.8, contrast["XR"]


def test_lesion_sidecar_with_defects_lists_only_distinct_written_instances(cohort):
    rows = _lesion_rows(cohort.root)
    sops = {ds.SOPInstanceUID for ds in cohort.images().values()}
    assert rows and {r["sop_instance_uid"] for r in rows} <= sops
    assert len({r["sop_instance_uid"] for r in rows}) == len(rows)


def test_ct_series_geometry(clean):
    series = _series(clean, CT_STORAGE)
    assert series
    names_follow_position = []
    for slices in series.values():
        ds0 = slices[0][1]
        assert all(list(ds.ImageOrientationPatient) == list(ds0.ImageOrientationPatient) for _, ds in slices)
        orient = np.array([float(v) for v in ds0.ImageOrientationPatient])
        assert np.allclose(np.linalg.norm(orient[:3]), 1) and np.allclose(np.linalg.norm(orient[3:]), 1)
        assert abs(np.dot(orient[:3], orient[3:])) < 1e-6
        ordered = sorted(slices, key=lambda item: _along(item[1]))
        gaps = np.diff([_along(ds) for _, ds in ordered])
        assert np.allclose(gaps, float(ds0.SpacingBetweenSlices), atol=1e-3)
        assert float(ds0.SliceThickness) == float(ds0.SpacingBetweenSlices) in (2.5, 5.0)
        assert 16 <= len(slices) <= 24
        assert ds0.Rows == ds0.Columns in (64, 72, 80)
        assert float(ds0.PixelSpacing[0]) == pytest.approx(float(ds0.ReconstructionDiameter) / ds0.Rows, abs=1e-5)
        assert sorted(int(ds.InstanceNumber) for _, ds in slices) == list(range(1, len(slices) + 1))
        assert [float(ds.SliceLocation) for _, ds in ordered] == pytest.approx([_along(ds) for _, ds in ordered], abs=1e-2)
        names = [rel.rsplit("/", 1)[1] for rel, _ in ordered]
        names_follow_position.append(names in (sorted(names), sorted(names, reverse=True)))
    assert any(names_follow_position) and not all(names_follow_position), "one site shuffles file names"
    orientations = {tuple(ds.ImageOrientationPatient) for s in series.values() for _, ds in s[:1]}
    assert (1, 0, 0, 0, 1, 0) in {tuple(float(v) for v in o) for o in orientations} and len(orientations) > 1


def test_ct_hu_for_every_storage_variant_and_lesion_in_the_middle_slice(clean):
    variants = set()
    lesions = 0
    truth = {r["sop_instance_uid"]: r for r in _lesion_rows(clean.root)}
    labels = {r["study_instance_uid"]: r["label"] for r in _labels(clean.root)}
    for slices in _series(clean, CT_STORAGE).values():
        ds0 = slices[0][1]
        variants.add((int(ds0.PixelRepresentation), int(ds0.BitsStored), float(ds0.RescaleSlope),
                      float(ds0.RescaleIntercept)))
        ordered = [ds for _, ds in sorted(slices, key=lambda item: _along(item[1]))]
        hu = np.stack([_hu(ds) for ds in ordered])
        corners = np.concatenate([hu[:, :3, :3].ravel(), hu[:, :3, -3:].ravel()])  # air in front of the patient
        assert np.median(corners) == pytest.approx(-1000, abs=30)
        lungs = hu[(hu > -960) & (hu < -650)]  # aerated lung: a good share of the slab
        assert lungs.size > 0.1 * hu.size
        lung = np.median(lungs)
        assert lung == pytest.approx(-860, abs=70)
        assert np.std(lungs) > 20  # textured parenchyma, not a flat fill
        assert np.mean(hu > -200) > 0.15  # soft tissue, fat, bone
        if labels[ds0.StudyInstanceUID] != "lesion":
            assert not [ds for ds in ordered if ds.SOPInstanceUID in truth]
            continue
        lesions += 1
        n = len(ordered)
        for middle in {(n - 1) // 2, n // 2}:  # both middle slices by position cut through the nodule
            r = truth[ordered[middle].SOPInstanceUID]
            row, col = round(float(r["row"])), round(float(r["col"]))
            window = (slice(row - 1, row + 2), slice(col - 1, col + 2))
            assert hu[middle][window].max() - lung > 200
            assert hu.max(axis=0)[window].max() - lung > 250  # and a MIP over the slab shows it
        pt, st = clean.plan(slices[0][0])
        assert -550 <= st.lesion.strength <= 60 and 4 <= st.lesion.radius <= 20
        # centre within the central 20 % of the slice range (z: mm from the slab midpoint)
        assert abs(st.lesion.z) <= 0.1 * (n - 1) * float(ds0.SpacingBetweenSlices)
    assert variants == {(1, 16, 1.0, 0.0), (0, 12, 1.0, -1024.0), (1, 16, 1.0, -1024.0), (0, 16, 0.5, -1024.0)}
    assert lesions >= 3


# patients of seed 7 whose studies are all lesion studies: 2 (site D: a solid CT nodule in both
# kernels; DX PA and lateral), 3 (site B: CR, MONOCHROME1), 23 (site A: a ground-glass CT nodule partly
# over a vessel, in both kernels; DX PA and lateral)
@pytest.mark.parametrize("index", [2, 3, 23])
def test_the_rendered_nodule_is_where_lesions_csv_says_and_nothing_else_differs_from_a_normal_study(clean, index):
    """The renderer itself against the ground truth: a patient rendered as planned and again with its
    nodules taken out (the normal studies they would otherwise be) differ only in the pixels of a
    compact dense blob centred on the lesions.csv position; the normal version has air-like lung
    there; headers are identical."""
    pt = planning.plan_patient(SEED, index)
    normal = copy.deepcopy(pt)
    for st in normal.studies:
        st.lesion = None
    rendered = rendering.render_patient(pt, SEED, False)
    site_dir = clean.root / synth.DICOM_DIR / pt.site.folder
    assert all((site_dir / rel).read_bytes() == data for rel, data in rendered.items()), "what the cohort holds"
    with_lesion = {rel: pydicom.dcmread(io.BytesIO(data)) for rel, data in rendered.items()}
    without = {rel: pydicom.dcmread(io.BytesIO(data))
               for rel, data in rendering.render_patient(normal, SEED, False).items()}
    assert with_lesion.keys() == without.keys()
    truth = {r["sop_instance_uid"]: r for r in _lesion_rows(clean.root)}
    series: dict[str, list[str]] = defaultdict(list)
    for rel, ds in with_lesion.items():
        series[ds.SeriesInstanceUID].append(rel)
    lesion_series = Counter()
    for rels in series.values():
        ct = with_lesion[rels[0]].Modality == "CT"
        if ct:
            rels = sorted(rels, key=lambda rel: _along(with_lesion[rel]))
        pairs = [(_density(with_lesion[rel]), _density(without[rel])) for rel in rels]
        for rel in rels:  # nothing but the pixels depends on the label
            a, b = with_lesion[rel], without[rel]
            del a.PixelData, b.PixelData
            assert a == b and a.file_meta == b.file_meta, rel
        listed = [truth.get(with_lesion[rel].SOPInstanceUID) for rel in rels]
        changed = [k for k, (a, b) in enumerate(pairs) if not np.array_equal(a, b)]
        shown = [k for k, r in enumerate(listed) if r]
        assert shown and changed, "every study of these patients is a lesion study"
        lesion_series["CT" if ct else "XR"] += 1
        row, col = float(listed[shown[0]]["row"]), float(listed[shown[0]]["col"])
        assert all((float(listed[k]["row"]), float(listed[k]["col"])) == (row, col) for k in shown)  # one centre
        shape = pairs[0][0].shape
        dist = np.hypot(*np.meshgrid(np.arange(shape[0]) - row, np.arange(shape[1]) - col, indexing="ij"))
        # lobulation (<= 18 %), partial volume and the reconstruction / detector blur stay within this reach
        far = dist > 1.2 * max(float(listed[k]["radius_px"]) for k in shown) + 4
        nodule, lung = [], []
        weight = np.zeros(shape)  # of the blob: what the nodule changed, near it
        for k in shown:
            (a, b), radius = pairs[k], float(listed[k]["radius_px"])
            diff = a - b
            centre = dist <= max(0.5 * radius, 0.75)
            if ct:
                assert not diff[far].any()  # not one voxel away from the nodule changes
                nodule.append(a[centre].mean())
                lung.append(b[centre].mean())
                weight += np.abs(diff) * ~far  # a ground-glass nodule over a vessel lowers HU there
            else:
                assert diff[centre].mean() > 0.05
                assert np.abs(diff[far]).max() < 0.25 * diff[centre].mean()  # unsharp masking: a faint halo only
                weight += np.clip(diff, 0, None) * ~far
        centroid = [np.sum(weight * ax) / weight.sum() for ax in np.indices(shape)]
        assert np.hypot(centroid[0] - row, centroid[1] - col) < 0.6  # pixels (measured: <= 0.4)
        if ct:
            # the listed slices are a run by position; only a slice next to it may show a partial-volume cap
            assert shown == list(range(shown[0], shown[-1] + 1)) and set(shown) <= set(changed)
            assert shown[0] - 1 <= changed[0] and changed[-1] <= shown[-1] + 1
            assert np.median(lung) < -550  # the normal study: air-like lung where the nodule would be
            assert np.median(nodule) - np.median(lung) > 200  # the lesion study: a dense nodule
            assert np.mean(np.array(nodule) > np.array(lung) + 100) >= 0.7  # in most slices (vessels aside)
    assert set(lesion_series) == ({"XR"} if index == 3 else {"CT", "XR"})


# --------------------------------------------------------------------------------------------------
# defects


def _defects_found(c: Cohort) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    found["junk"] = list(c.not_dicom)
    by_hash: dict[str, list[str]] = defaultdict(list)
    for path in c.files:
        by_hash[hashlib.sha256(path.read_bytes()).hexdigest()].append(path.relative_to(c.root).as_posix())
    found["duplicate"] = [paths[1] for paths in by_hash.values() if len(paths) > 1]
    for rel, ds in c.headers.items():
        if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11":
            text = " ".join(str(item.TextValue) for item in ds.ContentSequence)
            assert ds.PatientID in text and ds.PatientName.family_name in text  # PHI in the report text
            found["sr"].append(rel)
        if ds.get("BurnedInAnnotation") == "YES":
            found["burned_in"].append(rel)
        if "PixelData" in ds:
            try:
                ds.pixel_array  # noqa: B018
            except Exception:  # noqa: BLE001
                found["truncated"].append(rel)
    for slices in _series(c, CT_STORAGE).values():
        along = sorted({_along(ds) for _, ds in slices})
        spacing = float(slices[0][1].SpacingBetweenSlices)
        if np.diff(along).max() > 1.5 * spacing:
            found["missing_slice"].append(slices[0][0].rsplit("/", 1)[0])
    return found


def test_defects_present_when_asked_for(cohort):
    found = _defects_found(cohort)
    for kind in synth.DEFECT_KINDS:
        assert found[kind], f"no {kind} defect in a cohort of {PATIENTS}"
    assert {Path(rel).name for rel in found["junk"]} <= {"Thumbs.db", "README.TXT"}
    assert len(found["truncated"]) == len(found["duplicate"]) == len(found["missing_slice"]) == 1


def test_no_defects_without_them_and_clean_files_are_identical(cohort, clean):
    found = _defects_found(clean)
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    with_defects, without = _hashes(cohort.root / synth.DICOM_DIR), _hashes(clean.root / synth.DICOM_DIR)
    missing = set(without) - set(with_defects)
    assert len(missing) == 1  # the slice the defect cohort leaves out
    assert all(with_defects[rel] == digest for rel, digest in without.items() if rel not in missing)
    assert (cohort.root / synth.LABELS_NAME).read_bytes() == (clean.root / synth.LABELS_NAME).read_bytes()

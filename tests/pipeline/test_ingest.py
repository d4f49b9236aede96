"""Ingest on the synthetic cohort and on pydicom's own test files."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import logging
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline import cli, deid, ingest, keys
from tests.conftest import TEST_KEY
from tests.phi_scan import scan_outputs


def _raw_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in {"labels.csv", "medtl_synth.json"})


def _content_hash(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _raw_headers(root: Path) -> dict[Path, Dataset]:
    headers = {}
    for path in _raw_files(root):
        try:
            headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - junk and truncated files are expected in the cohort
            continue
    return headers


def _rejected(out: Path, root: Path) -> dict[str, str]:
    """rejected.csv by input path: it names files by keyed ids only (paths hold PHI), mapped back here."""
    with open(out / "rejected.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["file_id", "reason"], "rejected.csv (a DVC output) must not carry input paths"
    assert len({r["file_id"] for r in rows}) == len(rows), "a file is listed twice in rejected.csv"
    pseudo = deid.Pseudonymizer(TEST_KEY)
    ids = {pseudo.file_id(p.relative_to(root).as_posix()): p.relative_to(root).as_posix()
           for p in root.rglob("*") if not p.is_dir()}
    return {ids[r["file_id"]]: r["reason"] for r in rows}


def _outputs(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): _content_hash(p) for p in sorted((out / "dicom").rglob("*.dcm"))}


# --------------------------------------------------------------------------------------------------
# synthetic cohort


def test_every_file_is_accounted_for_exactly_once(cohort, ingested):
    out, summary = ingested
    raw = {p.relative_to(cohort).as_posix() for p in _raw_files(cohort)}
    manifest = pd.read_parquet(out / "manifest.parquet")
    rejected = _rejected(out, cohort)
    on_disk = json.loads((out / "summary.json").read_text())

    assert summary.files_seen == len(raw) == on_disk["files_seen"]
    assert set(rejected) <= raw
    assert summary.ingested == int(manifest["n_files"].sum()) == len(raw) - len(rejected)
    assert on_disk["rejected"] == summary.rejected and sum(summary.rejected.values()) == len(rejected)
    breakdown = json.loads((out / "breakdown.json").read_text())
    assert sum(breakdown["by_label"].values()) == sum(breakdown["by_modality"].values()) == summary.images == len(manifest)
    assert sum(breakdown["by_transfer_syntax"].values()) == summary.ingested
    # every manifest path exists, once
    paths = [p for paths in manifest["paths"] for p in paths]
    assert len(paths) == len(set(paths)) == summary.ingested
    assert all((out / p).is_file() for p in paths)
    assert set(_outputs(out)) == set(paths), "stray de-identified files in the output"
    # the defects synth plants are each rejected for what they are
    for category in ("not_dicom", "corrupt", "duplicate", "inconsistent_series", "non_image", "burned_in_annotation"):
        assert summary.rejected.get(category, 0) >= 1, f"no {category} rejection in {summary.rejected}"
    assert all(re.match(r"^[a-z_]+: \S", reason) for reason in rejected.values())
    # volumes and projections both present; every image labelled with a known label
    assert set(manifest["unit"]) >= {"2d", "volume"}
    assert set(manifest["label"]) == {"lesion", "normal"}
    assert manifest["patient_key"].str.match(r"^P-[A-Z2-7]{12}$").all()


def test_rejected_files_are_quarantined_with_their_reason(cohort, ingested):
    out, _ = ingested
    quarantine = out.parent / "quarantine"
    rejected = _rejected(out, cohort)
    for relpath in rejected:
        assert (quarantine / relpath).read_bytes() == (cohort / relpath).read_bytes()
    with open(quarantine / "reasons.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["path"]: r["reason"] for r in rows} == rejected
    pseudo = deid.Pseudonymizer(TEST_KEY)
    assert all(r["file_id"] == pseudo.file_id(r["path"]) for r in rows), "the quarantine maps ids back to paths"


def test_volumes_are_ordered_by_position_and_keep_geometry(ingested):
    out, _ = ingested
    manifest = pd.read_parquet(out / "manifest.parquet")
    volumes = manifest[manifest["unit"] == "volume"]
    assert len(volumes) > 0
    for row in volumes.itertuples():
        slices = [pydicom.dcmread(out / p, stop_before_pixels=True) for p in row.paths]
        normal = np.cross(np.array(row.orientation[:3]), np.array(row.orientation[3:]))
        along = [float(np.dot(normal, [float(v) for v in s.ImagePositionPatient])) for s in slices]
        assert along == sorted(along)
        assert np.allclose(np.diff(along), row.spacing_mm[2], atol=1e-3)
        assert row.frames == len(slices) == row.n_files
        assert [float(v) for v in slices[0].PixelSpacing] == pytest.approx(list(row.spacing_mm[:2]))


def _phi_strings(headers: dict[Path, Dataset]) -> set[str]:
    phi: set[str] = set()
    for ds in headers.values():
        for keyword in ("PatientName", "OtherPatientNames", "ReferringPhysicianName", "OperatorsName"):
            for name in (ds.get(keyword) or []) if isinstance(ds.get(keyword), pydicom.multival.MultiValue) else [ds.get(keyword)]:
                if name:
                    name = pydicom.valuerep.PersonName(name)
                    phi.add(str(name))
                    phi.update(part for part in (name.family_name, name.given_name) if len(part) >= 4)
        for keyword in ("PatientID", "AccessionNumber", "PatientBirthDate", "InstitutionName", "PatientAddress",
                        "PatientTelephoneNumbers", "StudyDescription", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID", "DeviceSerialNumber", "StationName"):
            value = ds.get(keyword)
            if value:
                phi.add(str(value))
    return {s.strip() for s in phi if len(s.strip()) >= 4}


def test_no_phi_in_any_ingest_output_or_log(cohort, tmp_path, caplog):
    headers = _raw_headers(cohort)
    phi = _phi_strings(headers)
    assert len(phi) > 100, "the cohort should carry plenty of fake PHI to look for"
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", out, key=TEST_KEY)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".dcm" for p in files) and (out / "manifest.parquet") in files
    # every byte, decoded value, parquet cell and path name of every output, and the log; input paths too
    leaks = scan_outputs(out, phi, input_paths=[p.relative_to(cohort).as_posix() for p in _raw_files(cohort)],
                         input_root=cohort, log_text=caplog.text)
    assert not leaks, f"PHI or input paths in ingest outputs: {dict(list(leaks.items())[:5])}"
    # and the de-identified files say so
    sample = pydicom.dcmread(next(p for p in files if p.suffix == ".dcm"))
    assert sample.PatientIdentityRemoved == "YES"
    assert {c.CodeValue for c in sample.DeidentificationMethodCodeSequence} >= {"113100"}
    assert not any(elem.tag.is_private for elem in sample.iterall())


def test_uid_remapping_keeps_series_and_study_structure(cohort, ingested):
    out, _ = ingested
    headers = _raw_headers(cohort)
    by_hash = {p.name.split(".")[0]: p for p in (out / "dicom").rglob("*.dcm")}
    new_series: dict[str, set[str]] = defaultdict(set)
    new_study: dict[str, set[str]] = defaultdict(set)
    study_of_series: dict[str, set[str]] = defaultdict(set)
    checked = 0
    for raw_path, raw in headers.items():
        output = by_hash.get(_content_hash(raw_path)[:20])
        if output is None:
            continue
        new = pydicom.dcmread(output, stop_before_pixels=True)
        assert new.SeriesInstanceUID != raw.SeriesInstanceUID and new.SOPInstanceUID != raw.SOPInstanceUID
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
        new_series[raw.SeriesInstanceUID].add(new.SeriesInstanceUID)
        new_study[raw.StudyInstanceUID].add(new.StudyInstanceUID)
        study_of_series[new.SeriesInstanceUID].add(new.StudyInstanceUID)
        checked += 1
    assert checked > 100
    assert all(len(v) == 1 for v in new_series.values()), "one series split into several after remapping"
    assert all(len(v) == 1 for v in new_study.values())
    assert len({next(iter(v)) for v in new_series.values()}) == len(new_series), "two series merged"
    assert all(len(v) == 1 for v in study_of_series.values())


def _labels_by(cohort: Path, key: str, headers: dict[Path, Dataset], path: Path) -> Path:
    """A labels CSV keyed by ``key``, built from the raw headers and synth's study labels."""
    with open(cohort / "labels.csv", newline="") as fh:
        study_label = {r["study_instance_uid"]: r["label"] for r in csv.DictReader(fh)}
    rows = {}
    for raw_path, ds in headers.items():
        label = study_label.get(str(ds.get("StudyInstanceUID", "")))
        if label is None:
            continue
        value = {
            "file": raw_path.relative_to(cohort).as_posix(),
            "sop_instance_uid": ds.get("SOPInstanceUID"),
            "series_instance_uid": ds.get("SeriesInstanceUID"),
            "study_instance_uid": ds.get("StudyInstanceUID"),
            "accession_number": ds.get("AccessionNumber"),
        }[key]
        rows[str(value)] = label
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([key, "label"])
        writer.writerows(sorted(rows.items()))
    return path


@pytest.mark.parametrize("key", ["file", "sop_instance_uid", "series_instance_uid", "accession_number"])
def test_labels_join_by_each_key_type(cohort, ingested, tmp_path, key):
    out_study, _ = ingested
    expected = pd.read_parquet(out_study / "manifest.parquet")[["image_id", "label"]]
    labels = _labels_by(cohort, key, _raw_headers(cohort), tmp_path / f"labels_{key}.csv")
    out = tmp_path / "out"
    shutil.copytree(out_study, out)  # a labels change on an ingested export: reruns from the cache
    summary = ingest.run(ingest.IngestParams(workers=1), cohort, labels, out, key=TEST_KEY)
    assert summary.run["new_files"] == 1  # only the cohort's own labels.csv, now an input file like any other
    got = pd.read_parquet(out / "manifest.parquet")[["image_id", "label"]]
    assert summary.label_key == key
    pd.testing.assert_frame_equal(got.sort_values("image_id").reset_index(drop=True),
                                  expected.sort_values("image_id").reset_index(drop=True))


def test_unlabelled_images_are_rejected_not_guessed(cohort, ingested, tmp_path):
    """Drop half the label rows: those studies' images are rejected as unlabelled, whatever their names."""
    with open(cohort / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = rows[::2]
    labels = tmp_path / "half.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["study_instance_uid", "label"])
        writer.writeheader()
        writer.writerows(kept)
    out, full = ingested
    shutil.copytree(out, tmp_path / "out")
    summary = ingest.run(ingest.IngestParams(workers=1), cohort, labels, tmp_path / "out", key=TEST_KEY)
    assert not set(pd.read_parquet(tmp_path / "out" / "manifest.parquet")["study_uid"]) - set(
        pd.read_parquet(out / "manifest.parquet")["study_uid"])
    assert len(_outputs(tmp_path / "out")) == summary.ingested, "outputs of now-unlabelled images must go"
    assert summary.rejected.get("unlabelled", 0) > 0
    assert summary.studies == pytest.approx(full.studies / 2, abs=2)
    assert summary.files_seen == summary.ingested + summary.rejected_total


def test_incremental_rerun_after_new_arrivals_equals_full_run(tmp_path):
    from pipeline import synth

    cohort = tmp_path / "synth"
    synth.run(synth.SynthParams(patients=12, seed=3), cohort)
    out = tmp_path / "incremental"
    sidecars = {"key": TEST_KEY, "lesions_csv": cohort / "lesions.csv"}  # as dvc.yaml runs it (synth rewrites the sidecar)
    first = ingest.run(ingest.IngestParams(workers=2), cohort, cohort / "labels.csv", out, **sidecars)
    n_before = first.files_seen
    synth.add(cohort, 3)
    second = ingest.run(ingest.IngestParams(workers=2), cohort, cohort / "labels.csv", out, **sidecars)
    assert second.files_seen > n_before
    assert second.run["new_files"] == second.files_seen - n_before, "old files were processed again"

    full_out = tmp_path / "full"
    full = ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", full_out, **sidecars)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(full_out / "manifest.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "lesions.parquet"), pd.read_parquet(full_out / "lesions.parquet"))
    assert second.lesions["kept"] > first.lesions["kept"] > 0
    assert (out / "rejected.csv").read_text() == (full_out / "rejected.csv").read_text()
    assert _outputs(out) == _outputs(full_out)
    assert {k: v for k, v in vars(second).items() if k != "run"} == {k: v for k, v in vars(full).items() if k != "run"}
    # the cache (a DVC output) is the same bytes whatever order its records arrived in
    assert (out / "cache/records.jsonl").read_bytes() == (full_out / "cache/records.jsonl").read_bytes()

    # a rerun with nothing new reads no file and leaves the cache and the local stat index untouched
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("cache/records.jsonl", ingest.STAT_INDEX_NAME)}
    third = ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", out, **sidecars)
    assert third.run["new_files"] == 0 and third.run["cached_files"] == third.files_seen
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(full_out / "manifest.parquet"))


def _headers_by_series(cohort: Path) -> dict[str, list[tuple[Path, Dataset]]]:
    series = defaultdict(list)
    for path, ds in _raw_headers(cohort).items():
        if "SeriesInstanceUID" in ds and "SOPInstanceUID" in ds:
            series[str(ds.SeriesInstanceUID)].append((path, ds))
    return series


def _drop_a_middle_slice(cohort: Path) -> None:
    volume = next(files for files in _headers_by_series(cohort).values()
                  if len(files) >= 6 and files[0][1].get("Modality") == "CT")
    volume.sort(key=lambda f: float(f[1].ImagePositionPatient[2]))
    volume[len(volume) // 2][0].unlink()


def _copy_an_old_file(cohort: Path) -> None:
    source = next(p for p in _raw_files(cohort) if "SE001" in p.parts and p.name == "IM00001")
    (cohort / "DICOM" / "copies").mkdir(exist_ok=True)
    shutil.copy(source, cohort / "DICOM" / "copies" / "again.dcm")


def _same_sop_other_content_and_series(cohort: Path) -> None:
    path, _ = next(files[0] for files in _headers_by_series(cohort).values()
                   if len(files) == 1 and files[0][1].get("Modality") == "DX" and files[0][1].get("BurnedInAnnotation") == "NO")
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 77
    ds.save_as(cohort / "DICOM" / "copies" / "other.dcm")


def _flip_a_label(cohort: Path) -> None:
    rows = (cohort / "labels.csv").read_text().splitlines()
    uid, label = rows[3].split(",")
    rows[3] = f"{uid},{'normal' if label != 'normal' else 'lesion'}"
    (cohort / "labels.csv").write_text("\n".join(rows) + "\n")


def _drop_a_lesion_row(cohort: Path) -> None:
    rows = (cohort / "lesions.csv").read_text().splitlines()
    (cohort / "lesions.csv").write_text("\n".join(rows[:1] + rows[2:]) + "\n")


def _touch_every_file(cohort: Path) -> None:
    for path in _raw_files(cohort):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))


def _remove_the_copy(cohort: Path) -> None:
    (cohort / "DICOM" / "copies" / "again.dcm").unlink()


def test_a_rerun_that_reuses_the_last_assembly_writes_what_a_full_run_writes(tmp_path, monkeypatch):
    """A rerun assembles only the series a changed file touches and reuses the rest of the last run's
    assembly: after each kind of change (new patients, a lost slice, an identical copy, a conflicting
    copy in another series, an edited label, an edited lesion row, touched files, a removed copy), its
    outputs equal, byte for byte, those of a run from scratch on the same input."""
    from pipeline import synth

    cohort = tmp_path / "synth"
    synth.run(synth.SynthParams(patients=6, seed=5), cohort)
    out = tmp_path / "incremental"
    run = dict(key=TEST_KEY, lesions_csv=cohort / "lesions.csv")
    ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", out, **run)
    assembled = []
    assemble = ingest._assemble
    monkeypatch.setattr(ingest, "_assemble", lambda files, *a, **k: assembled.append(len(files)) or assemble(files, *a, **k))
    changes = [lambda c: synth.add(c, 2), _drop_a_middle_slice, _copy_an_old_file,
               _same_sop_other_content_and_series, _flip_a_label, _drop_a_lesion_row, _touch_every_file,
               _remove_the_copy]
    seen = set()
    for k, change in enumerate(changes):
        change(cohort)
        assembled.clear()
        again = ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", out,
                           inputs_csv=tmp_path / "inputs_incremental.csv", **run)
        assert assembled[0] < again.files_seen / 3, f"{change}: the rerun assembled most files again"
        full_out = tmp_path / f"full{k}"
        full = ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", full_out,
                          inputs_csv=tmp_path / "inputs_full.csv", **run)
        what = getattr(change, "__name__", "synth.add")
        for name in ("manifest.parquet", "lesions.parquet", "rejected.csv", "breakdown.json", "cache/records.jsonl",
                     ingest.STAT_INDEX_NAME):
            assert (out / name).read_bytes() == (full_out / name).read_bytes(), f"{name} differs after {what}"
        assert (tmp_path / "inputs_incremental.csv").read_bytes() == (tmp_path / "inputs_full.csv").read_bytes()
        assert _outputs(out) == _outputs(full_out), what
        assert {k: v for k, v in vars(again).items() if k != "run"} == {k: v for k, v in vars(full).items() if k != "run"}
        assert again.run["new_files"] < full.run["new_files"] / 2, f"{what}: the rerun read most files again"
        seen |= {reason.split(":")[0] + (": conflicting" if "different content" in reason else "")
                 for reason in _rejected(out, cohort).values()}
    # the changes did what they were meant to: a lost slice, duplicates of both kinds
    assert {"inconsistent_series", "duplicate", "duplicate: conflicting"} <= seen
    assert full.lesions["kept"] > 0


def test_interrupted_run_resumes_from_its_cache(cohort, ingested, tmp_path):
    done, full = ingested
    out = tmp_path / "out"
    shutil.copytree(done, out)
    reference = pd.read_parquet(out / "manifest.parquet")
    # simulate a kill part-way: half the cache lines survive, the last one cut mid-write, no manifest yet
    cache = out / "cache" / "records.jsonl"
    lines = cache.read_text().splitlines()
    keep = len(lines) // 2
    cache.write_text("\n".join(lines[:keep]) + "\n" + lines[keep][: len(lines[keep]) // 2])
    for name in ("manifest.parquet", "rejected.csv", "summary.json"):
        (out / name).unlink()
    resumed = ingest.run(ingest.IngestParams(workers=2), cohort, cohort / "labels.csv", out, key=TEST_KEY)
    assert 0 < resumed.run["new_files"] < full.files_seen
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), reference)


def test_a_cache_line_that_is_no_record_is_dropped_and_its_file_read_again(cohort, ingested, tmp_path):
    """A whole-looking line that does not parse into a record (edited, or bytes flipped) costs a re-read of
    its file; the outputs and the cache come out as a clean run writes them."""
    done, _ = ingested
    out = tmp_path / "out"
    shutil.copytree(done, out)
    cache = out / "cache" / "records.jsonl"
    lines = cache.read_text().splitlines()
    lines[1] = lines[1].replace('"reason": ', '"reasons": ', 1)
    cache.write_text("\n".join(lines) + "\n")
    (out / ingest.STAT_INDEX_NAME).unlink()  # every file hashed again: the cached records are all needed
    again = ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", out, key=TEST_KEY)
    assert again.run["new_files"] == 1, "only the file of the broken line is read again"
    assert cache.read_bytes() == (done / "cache" / "records.jsonl").read_bytes()
    for name in ("manifest.parquet", "rejected.csv", "lesions.parquet"):
        assert (out / name).read_bytes() == (done / name).read_bytes(), name


def test_a_different_key_gives_different_pseudonyms_and_rebuilds(cohort, ingested, tmp_path):
    out, _ = ingested
    other = tmp_path / "out"
    ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", other, key=b"another-key-another-key-xx")
    a = set(pd.read_parquet(out / "manifest.parquet")["patient_key"])
    b = set(pd.read_parquet(other / "manifest.parquet")["patient_key"])
    assert len(a) == len(b) and not a & b


def test_a_rerun_skips_the_slow_key_check_only_for_the_key_that_passed_it(cohort, ingested, tmp_path, monkeypatch):
    """The local stat index remembers that this key passed the cache's scrypt check (an HMAC token):
    a rerun under that key skips scrypt; another key, or a forged token, runs it and is refused."""
    done, _ = ingested
    out = tmp_path / "out"
    shutil.copytree(done, out)
    real_check, calls = ingest.keys.key_check, []
    monkeypatch.setattr(ingest.keys, "key_check", lambda *a: calls.append(1) or real_check(*a))
    rerun = ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", out, key=TEST_KEY)
    assert rerun.run["new_files"] == 0 and calls == [], "the same key ran the slow check again"

    index = json.loads((out / ingest.STAT_INDEX_NAME).read_text())
    assert index["verified"] != ingest.keys.key_check(TEST_KEY, ingest.CACHE_SALT), "the token is not the check itself"
    calls.clear()
    other = b"another-key-another-key-yy"
    moved = ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", out, key=other)
    assert calls, "another key must be checked the slow way"
    assert moved.run["new_files"] == moved.files_seen, "a cache made under another key was used"

    # a token copied from elsewhere (or edited) does not vouch for a cache it was not made for
    index = json.loads((out / ingest.STAT_INDEX_NAME).read_text())
    index["verified"] = "0" * 64
    (out / ingest.STAT_INDEX_NAME).write_text(json.dumps(index))
    calls.clear()
    again = ingest.run(ingest.IngestParams(workers=1), cohort, cohort / "labels.csv", out, key=other)
    assert calls and again.run["new_files"] == 0, "a wrong token must fall back to the slow check, which passes"


def test_real_data_without_a_key_stops_with_a_clear_error(tmp_path, monkeypatch, capsys):
    for var in (keys.ENV_KEY, keys.ENV_KEY_FILE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "export"
    raw.mkdir()
    _write_instance(raw / "a.dcm")
    (tmp_path / "labels.csv").write_text("file,label\na.dcm,normal\n")
    with pytest.raises(keys.KeyMissingError, match="MEDTL_PSEUDONYM_KEY"):
        ingest.run(ingest.IngestParams(workers=1), raw, tmp_path / "labels.csv", tmp_path / "out")
    command = ["--params", str(Path(__file__).parents[2] / "params.yaml"), "ingest", "--input", str(raw),
               "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pseudonymisation key" in err and "medtl keygen" in err
    assert not (tmp_path / "o" / "manifest.parquet").exists()
    # with a key file made by `medtl keygen` it runs
    assert cli.main(["keygen"]) == 0
    assert (tmp_path / ".medtl" / "pseudonym.key").stat().st_mode & 0o077 == 0
    assert cli.main(command) == 0
    assert len(pd.read_parquet(tmp_path / "o" / "manifest.parquet")) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [("label\nnormal\n", "exactly one key column"),
     ("file,path\na.dcm,x\n", "no 'label' column"),
     ("file,label\na.dcm,normal\na.dcm,lesion\n", "different labels")],
)
def test_bad_labels_file_names_the_file_and_problem(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(ingest.LabelsError, match=message) as err:
        ingest.read_labels(path, deid.Pseudonymizer(TEST_KEY))
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------------
# hand-made edge cases and pydicom's own test files


def _write_instance(path: Path, *, transfer_syntax=ExplicitVRLittleEndian, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "EDGE123", "EDGE^CASE", "CT"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    if transfer_syntax.is_encapsulated:
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 32])
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_edge_cases_are_rejected_with_actionable_reasons(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_instance(raw / "ok.dcm")
    _write_instance(raw / "burned.dcm", BurnedInAnnotation="YES")
    _write_instance(raw / "mpeg.dcm", transfer_syntax=pydicom.uid.MPEG2MPML)
    _write_instance(raw / "nopid.dcm", PatientID="")
    (raw / "empty.dcm").write_bytes(b"")
    (raw / "notes.txt").write_text("not an image")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{p.name},normal\n" for p in raw.iterdir()))
    summary = ingest.run(ingest.IngestParams(workers=1), raw, labels, tmp_path / "out", key=TEST_KEY)
    reasons = _rejected(tmp_path / "out", raw)
    assert summary.ingested == 1
    assert reasons["burned.dcm"].startswith("burned_in_annotation:")
    assert reasons["mpeg.dcm"].startswith("no_decoder:") and "MPEG2" in reasons["mpeg.dcm"]
    assert reasons["nopid.dcm"].startswith("missing_patient_id:")
    assert reasons["empty.dcm"] == "not_dicom: empty file"
    assert reasons["notes.txt"].startswith("not_dicom:")


@pytest.fixture(scope="module")
def pydicom_testfiles(tmp_path_factory):
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("CT_small.dcm")).parent
    raw = tmp_path_factory.mktemp("pydicom") / "test_files"
    shutil.copytree(src, raw)
    files = [p.relative_to(raw).as_posix() for p in sorted(raw.rglob("*")) if p.is_file()]
    labels = raw.parent / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{f},normal\n" for f in files))
    out = raw.parent / "out"
    summary = ingest.run(ingest.IngestParams(workers=2), raw, labels, out, key=TEST_KEY)
    manifest = pd.read_parquet(out / "manifest.parquet")
    return files, summary, _rejected(out, raw), manifest


# file -> expected category ("ok" = ingested). One or more per kind of trouble the files hold.
PYDICOM_EXPECTED = {
    "CT_small.dcm": "ok",
    "JPEG2000.dcm": "ok",  # compressed, decoded by pylibjpeg-openjpeg
    "liver_1frame.dcm": "non_image",  # a Segmentation: label map, not an image
    "MR_truncated.dcm": "corrupt",  # pixel data cut short
    "SC_ybr_full_422_uncompressed.dcm": "corrupt",
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt",  # a broken codestream
    "DICOMDIR": "dicomdir",
    "DICOMDIR-bigEnd": "dicomdir",
    "rtplan.dcm": "non_image",
    "rtstruct.dcm": "non_image",
    "test-SR.dcm": "non_image",
    "waveform_ecg.dcm": "non_image",
    "rtdose.dcm": "non_image",  # has pixel data, but a dose grid
    "README.txt": "not_dicom",
    "zipMR.gz": "not_dicom",
    "crayons.icc": "not_dicom",
    "ExplVR_BigEnd.dcm": "missing_patient_id",
    "MR_small.dcm": "duplicate",  # MR_small_* are one SOP instance in several encodings
    "MR_small_bigendian.dcm": "duplicate",
}


def test_pydicom_test_files_each_ingested_or_rejected_sensibly(pydicom_testfiles):
    files, summary, rejected, manifest = pydicom_testfiles
    assert summary.files_seen == len(files) == summary.ingested + len(rejected)
    for name, expected in PYDICOM_EXPECTED.items():
        if name not in files:
            continue  # a pydicom release without this file
        got = "ok" if name not in rejected else rejected[name].split(":")[0]
        assert got == expected, f"{name}: expected {expected}, got {rejected.get(name, 'ingested')}"
    checked = [n for n in PYDICOM_EXPECTED if n in files]
    assert len(checked) >= 15
    # every category of trouble in the set shows up in the summary
    assert {"corrupt", "dicomdir", "non_image", "not_dicom", "duplicate"} <= set(summary.rejected)
    assert {"volume", "multiframe", "2d"} <= set(manifest["unit"])


def _slice(z: float, rows: int = 16, orientation=(1, 0, 0, 0, 1, 0)) -> ingest.FileRecord:
    return ingest.FileRecord(content_hash=f"h{z}{rows}", rows=rows, cols=16, pixel_spacing=[0.7, 0.7],
                             orientation=list(orientation), position=[0.0, 0.0, z], output=f"o{z}")


@pytest.mark.parametrize(
    ("zs", "rows", "problem"),
    [([0, 2.5, 5, 7.5], [16] * 4, ""),
     ([7.5, 0, 5, 2.5], [16] * 4, ""),  # file order is not slice order
     ([0, 2.5, 5, 7.5], [16, 16, 20, 16], "mixed image sizes 16x16, 20x16"),
     ([0, 2.5, 2.5, 5], [16] * 4, "1 duplicate slice position"),
     ([0, 2.5, 7.5, 10], [16] * 4, "gap of 5.00 mm where slices are 2.50 mm apart")],
)
def test_volume_checks(zs, rows, problem):
    files = [(f"f{i}", _slice(z, r)) for i, (z, r) in enumerate(zip(zs, rows))]
    got, ordered, spacing = ingest._check_volume(files, ingest.IngestParams())
    assert got.startswith(problem) if problem else got == ""
    if not problem:
        assert [r.position[2] for _, r in ordered] == sorted(zs) and spacing == pytest.approx(2.5)


def test_a_series_with_two_orientations_is_inconsistent():
    files = [(f"f{i}", _slice(z)) for i, z in enumerate([0, 2.5, 5])]
    files.append(("f3", _slice(7.5, orientation=(0, 1, 0, 0, 0, -1))))
    assert "orientations" in ingest._check_volume(files, ingest.IngestParams())[0]


# --------------------------------------------------------------------------------------------------
# lesion ground truth


def _lesion_tree(raw: Path) -> tuple[list[Dataset], Dataset, Dataset]:
    """A radiograph, a 4-slice CT series and a burned-in (rejected) instance, one patient."""
    raw.mkdir()
    study = generate_uid()
    series = generate_uid()
    slices = [_write_instance(raw / f"ct{k}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                              ImagePositionPatient=[0.0, 0.0, 2.5 * k], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                              PixelSpacing=[0.8, 0.8]) for k in (2, 0, 3, 1)]  # file names against slice order
    radiograph = _write_instance(raw / "dx.dcm", Modality="DX", StudyInstanceUID=study)
    burned = _write_instance(raw / "burned.dcm", Modality="DX", BurnedInAnnotation="YES")
    return slices, radiograph, burned


def test_lesion_sidecar_is_written_under_pseudonymised_keys_and_never_labels(tmp_path, caplog):
    slices, radiograph, burned = _lesion_tree(tmp_path / "raw")
    raw = tmp_path / "raw"
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{p.name},normal\n" for p in sorted(raw.iterdir())))
    sidecar = raw / "lesions.csv"  # beside the images, as synth writes it: not an input file
    rows = [(radiograph, 3.0, 5.0, 2.0, 1.6), (slices[0], 4.0, 4.5, 2.5, 2.0), (slices[3], 4.0, 4.5, 1.5, 1.2),
            (burned, 1.0, 1.0, 1.0, 1.0)]
    sidecar.write_text(
        ",".join(ingest.LESION_COLUMNS) + "\n"
        + "".join(f"{d.StudyInstanceUID},{d.SeriesInstanceUID},{d.SOPInstanceUID},{r},{c},{rp},{rm}\n"
                  for d, r, c, rp, rm in rows)
        + f"{radiograph.StudyInstanceUID},{radiograph.SeriesInstanceUID},1.2.3.999,1,1,1,1\n")  # no such instance
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="pipeline.ingest"):
        summary = ingest.run(ingest.IngestParams(workers=1), raw, labels, out, key=TEST_KEY, lesions_csv=sidecar)
    assert summary.files_seen == 6 and "lesions.csv" not in _rejected(out, raw)
    assert summary.lesions == {"rows": 5, "kept": 3, "dropped": 2}
    assert "2 dropped" in caplog.text

    manifest = pd.read_parquet(out / "manifest.parquet")
    table = pd.read_parquet(out / "lesions.parquet")
    assert list(table.columns) == list(ingest.LESION_OUTPUT_COLUMNS) and len(table) == 3
    volume = manifest[manifest["unit"] == "volume"].iloc[0]
    on_volume = table[table["image_id"] == volume["image_id"]]
    # slice_index points into the manifest's paths, ordered by position: slices[3] (z = 2.5) is 1, slices[0] (z = 5) is 2
    assert list(on_volume["slice_index"]) == [1, 2]
    assert [volume["sop_instance_uids"][k] for k in on_volume["slice_index"]] == list(on_volume["sop_instance_uid"])
    assert list(on_volume["radius_px"]) == [1.5, 2.5] and list(on_volume["row"]) == [4.0, 4.0]
    flat = manifest[manifest["unit"] == "2d"].iloc[0]
    assert table[table["image_id"] == flat["image_id"]][["row", "col", "radius_mm"]].values.tolist() == [[3.0, 5.0, 1.6]]
    assert set(table["patient_key"]) == set(manifest["patient_key"])
    # no original UID anywhere in the output, and the manifest is the same as without a sidecar
    blob = (out / "lesions.parquet").read_bytes()
    originals = {str(getattr(d, k)) for d in [*slices, radiograph, burned]
                 for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    assert not [uid for uid in originals if uid.encode() in blob]
    plain = ingest.run(ingest.IngestParams(workers=1), raw, labels, tmp_path / "plain", key=TEST_KEY,
                       lesions_csv=None)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "plain" / "manifest.parquet"), manifest)
    assert plain.lesions == {} and len(pd.read_parquet(tmp_path / "plain" / "lesions.parquet")) == 0


@pytest.mark.parametrize(("content", "message"), [
    ("study_instance_uid,sop_instance_uid,row,col\n", "needs exactly the columns"),
    ("study_instance_uid,series_instance_uid,sop_instance_uid,row,col,radius_px,radius_mm\n1,2,3,a,1,1,1\n",
     r"lesions.csv:2: row, col"),
    ("study_instance_uid,series_instance_uid,sop_instance_uid,row,col,radius_px,radius_mm\n1,2,3,1,1,0,1\n",
     r"lesions.csv:2: .*radii positive"),
])
def test_bad_lesions_file_names_the_file_and_problem(tmp_path, content, message):
    (tmp_path / "lesions.csv").write_text(content)
    with pytest.raises(ingest.LabelsError, match=message):
        ingest.read_lesions(tmp_path / "lesions.csv", deid.Pseudonymizer(TEST_KEY))


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_instance(raw / "a.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\na.dcm,normal\n")
    out, quarantine = tmp_path / "out", tmp_path / "quarantine"
    stale = [out / "dicom" / "P-X" / ".1.dcm.3fa9c2d1e0b4.tmp", out / ".manifest.parquet.k2j4l5.tmp",
             quarantine / ".reasons.csv.zz9.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    ingest.run(ingest.IngestParams(workers=1), raw, labels, out, quarantine_dir=quarantine, key=TEST_KEY)
    assert not any(p.exists() for p in stale)
    assert not list(out.rglob("*.tmp")) and (out / "manifest.parquet").is_file()


def _dies_on_marked_files(data, record, ctx, pseudo):  # module level: forked pool workers inherit the patch
    if b"KILL-THIS-WORKER" in data:
        os._exit(1)  # what an OOM kill or a decoder segfault looks like from the pool
    return _REAL_SCAN_DATASET(data, record, ctx, pseudo)


_REAL_SCAN_DATASET = ingest._scan_dataset


def test_a_file_that_kills_its_worker_is_rejected_alone_and_the_run_goes_on(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        _write_instance(raw / f"ok{i}.dcm")
    _write_instance(raw / "killer.dcm", ImageComments="KILL-THIS-WORKER")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{p.name},normal\n" for p in sorted(raw.iterdir())))
    monkeypatch.setattr(ingest, "_scan_dataset", _dies_on_marked_files)
    summary = ingest.run(ingest.IngestParams(workers=2), raw, labels, tmp_path / "out", key=TEST_KEY)
    reasons = _rejected(tmp_path / "out", raw)
    assert summary.ingested == 6 and summary.files_seen == 7
    assert list(reasons) == ["killer.dcm"] and reasons["killer.dcm"].startswith("worker_died: worker process died")
    assert summary.rejected == {"worker_died": 1}

"""Ingest against a hostile corpus (tests/hostile.py): acceptance tests of the allow-list
de-identification and the hardened ingest.

What is asserted, by the letters of the spec these tests were written to:

A. output DICOM is an allow-list rebuild: zero preamble, minimal file meta, nothing after the
   dataset, no private/unknown/retired tag or unlisted attribute at any depth, identifiers inside
   kept values blanked, UIDs remapped, dates shifted per patient, de-identification recorded;
B. reasons are a category plus attribute names (no values, tracebacks or paths); rejected.csv has
   file_id and reason, no path; the quarantine's reasons.csv has the paths; no input path in any
   output or log;
C. malformed dates do not lose the file and never show up raw;
D. every directory entry is accounted for once with its category; bombs, special files, links
   and bad names cannot hurt the run; output/quarantine inside the input is refused;
E. the public demo key is checked per file (needs_site_key);
F. ingest.max_file_mb / max_pixel_mb exist (default 1024).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import resource
import shutil
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.datadict import dictionary_is_retired, get_entry, tag_for_keyword

from pipeline import deid, ingest
from pipeline.errors import MedtlError
from tests import hostile
from tests.conftest import TEST_KEY
from tests.phi_scan import capture_logs, dicom_problems, locate_leaks, scan_outputs, scan_text

MAX_SECONDS = 30  # the whole corpus takes well under a few seconds; generous for a shared 2-core machine
TRACEBACK_MARKERS = ("Traceback", 'File "', ".py", "site-packages", ".venv", "/tmp/", "/work/", "/home/", "/root")
REASON = re.compile(r"^[a-z_]+: \S")


@dataclass
class Run:
    planted: hostile.Planted
    out: Path
    quarantine: Path
    workers: int
    summary: ingest.IngestSummary | None = None
    error: str = ""
    seconds: float = 0.0
    log: str = ""
    blocked: list = field(default_factory=list)

    def require(self) -> ingest.IngestSummary:
        if self.summary is None:
            pytest.fail(f"ingest raised on the hostile corpus (workers={self.workers}): {self.error}")
        return self.summary


def _ingest(planted: hostile.Planted, out: Path, quarantine: Path, workers: int, **kwargs) -> Run:
    run = Run(planted, out, quarantine, workers)
    with hostile.fifo_guard(planted.fifos) as guard, capture_logs() as cap:
        started = time.perf_counter()
        try:
            run.summary = ingest.run(ingest.IngestParams(workers=workers, **kwargs), planted.root, planted.labels_csv,
                                     out, quarantine_dir=quarantine, key=TEST_KEY)
        except Exception as exc:  # noqa: BLE001 - reported by Run.require
            run.error = f"{type(exc).__name__}: {exc}"
        run.seconds = time.perf_counter() - started
    run.log, run.blocked = cap.text, list(guard.blocked)
    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> hostile.Planted:
    base = tmp_path_factory.mktemp("hostile")
    planted = hostile.write_hostile_corpus(base / "export")
    yield planted
    hostile.restore_permissions(base)


@pytest.fixture(scope="module")
def run1(corpus) -> Run:
    return _ingest(corpus, corpus.root.parent / "out", corpus.root.parent / "quarantine", workers=1)


# --------------------------------------------------------------------------------------------------
# helpers


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _path_forms(relpath: str) -> set[str]:
    """How a path (maybe a bytes name decoded with surrogates) may be written in reasons.csv."""
    raw = os.fsencode(relpath)
    return {relpath, raw.decode("utf-8", "backslashreplace"), raw.decode("latin-1"), repr(raw)[2:-1]}


def _quarantine_rows(run: Run) -> dict[str, dict[str, str]]:
    """reasons.csv of the quarantine by planted relpath."""
    columns, rows = _read_csv(run.quarantine / "reasons.csv")
    assert {"path", "file_id", "reason"} <= set(columns), f"quarantine reasons.csv columns: {columns}"
    by_form = {form: rel for rel in run.planted.expected for form in _path_forms(rel)}
    out = {}
    for row in rows:
        rel = by_form.get(row["path"], row["path"])
        assert rel not in out, f"{rel} is listed twice in the quarantine's reasons.csv"
        out[rel] = row
    return out


def _outcomes(run: Run) -> dict[str, str]:
    """relpath -> "ingested" or the rejection category, from the quarantine's reasons.csv."""
    rows = _quarantine_rows(run)
    return {rel: rows[rel]["reason"].split(":", 1)[0] if rel in rows else hostile.INGESTED
            for rel in run.planted.expected} | {rel: row["reason"].split(":", 1)[0]
                                                for rel, row in rows.items() if rel not in run.planted.expected}


def _outputs(out: Path) -> list[Path]:
    return sorted((out / "dicom").rglob("*.dcm"))


def _output_of(run: Run, relpath: str) -> pydicom.Dataset:
    """The de-identified output of a planted image, found by its pixel data (unique per planted file;
    the declared length of it: bytes past it are cut)."""
    source = run.planted.sources[relpath]
    pixels = source.PixelData[:source.Rows * source.Columns * source.BitsAllocated // 8]
    for path in _outputs(run.out):
        ds = pydicom.dcmread(path)
        if ds.get("PixelData") == pixels:
            ds.filename = str(path)
            return ds
    pytest.fail(f"no output holds the pixels of {relpath}")


def _keep_keywords() -> set[str]:
    keep = getattr(deid, "KEEP", None)
    assert keep, "pipeline.deid has no keep-list (KEEP) to check outputs against"
    return {rule.keyword for rule in keep.values()}


def _date(value) -> dt.date:
    return dt.datetime.strptime(str(value), "%Y%m%d").date()


# --------------------------------------------------------------------------------------------------
# the corpus itself (independent of ingest)


def test_the_corpus_plants_what_it_claims(corpus):
    root = corpus.root
    for tag in (hostile.UNKNOWN_LO, hostile.UNKNOWN_UN, hostile.UNKNOWN_GROUP):
        assert tag.group % 2 == 0
        with pytest.raises(KeyError):
            get_entry(tag)
    assert dictionary_is_retired(tag_for_keyword("OtherPatientIDs"))
    assert dictionary_is_retired(tag_for_keyword("StudyComments"))
    everywhere = root / "MUSTERMANN_MAXIMILIAN_MRN8842137" / "phi_everywhere.dcm"
    raw = everywhere.read_bytes()
    assert raw[:11] == b"PHIPREAMBLE" and b"PHITRAILPAD" in raw[-60:]
    ds = pydicom.dcmread(everywhere)
    assert ds.file_meta.SourceApplicationEntityTitle and ds.file_meta.PrivateInformation
    assert "DataSetTrailingPadding" in ds and any(e.tag.is_private for e in ds.iterall())
    assert any(e.tag.is_private for e in ds.VOILUTSequence[0])
    jp = pydicom.dcmread(root / "charsets" / "山田_太郎.dcm")
    assert jp.PatientName.ideographic == "山田^太郎" and b"\x1b$B" in (root / "charsets" / "山田_太郎.dcm").read_bytes()
    latin = (root / "charsets" / "MÜLLER_JÜRGEN.dcm").read_bytes()
    assert "MÜLLER".encode("latin-1") in latin and "MÜLLER".encode() not in latin
    huge = root / "bombs" / "huge_sparse.dcm"
    assert huge.stat().st_size > 2 * hostile.GB and huge.stat().st_blocks * 512 < 1024 * 1024, "not sparse"
    assert (root / "bombs" / "rle_65535.dcm").stat().st_size < 8 * 1024
    assert (root / "special" / "fifo.dcm").is_fifo() and (root / "special" / "socket.dcm").is_socket()
    assert os.path.exists(os.fsencode(root) + b"/names/\xff\xfe.dcm")
    for name in ("dangling.dcm", "loop_a.dcm", "self.dcm", "outside_abs.dcm", "dir_inside", "zz_to_inside.dcm"):
        assert (root / "links" / name).is_symlink()
    assert not (root / "links" / "dangling.dcm").exists()
    # every planted entry is an entry of the tree, and every entry of the tree is planted
    entries = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            entries.add(os.fsdecode(os.path.relpath(os.path.join(dirpath, name), os.fsencode(root))))
    locked = {rel for rel, want in corpus.expected.items() if want == "unreadable"}
    assert entries | locked == set(corpus.expected)
    assert len(corpus.phi) > 150


def _found(leaks: dict[str, list[str]]) -> set[str]:
    return {hit.split(" (as ")[0] for hits in leaks.values() for hit in hits}


def test_the_scanner_finds_what_was_planted(corpus, tmp_path):
    """Positive control: the raw corpus (copied under neutral names) is full of what the scan looks for."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for k, rel in enumerate(corpus.relpaths):
        source = os.fsencode(corpus.root) + b"/" + os.fsencode(rel)
        if rel in corpus.huge or os.path.islink(source) or not os.path.isfile(source):
            continue
        shutil.copyfile(source, copy / f"{k:03d}.bin")
    found = _found(scan_outputs(copy, corpus.phi))
    missing = sorted(set(hostile.MARKERS) - {"PHIOUTSIDE"} - found)
    assert not missing, f"the scanner misses planted markers: {missing}"
    for ident in (hostile.PATIENT_A, hostile.PATIENT_LATIN1, hostile.PATIENT_UTF8, hostile.PATIENT_JP):
        assert ident.patient_name in found and ident.patient_id in found
    assert {"山田", "やまだ", "Иванова", "MÜLLER", "2021-03-04", "19xx0101"} <= found
    # the forms outputs may take: JSON escapes, parquet cells, path names, logs; digits only as whole numbers
    forms = tmp_path / "forms"
    (forms / "MUSTERMANN_MAXIMILIAN_MRN8842137").mkdir(parents=True)
    (forms / "a.json").write_text(json.dumps({"who": "MÜLLER JÜRGEN"}))  # ensure_ascii: "M\u00dcLLER"
    pd.DataFrame({"m": ["Yamada Tarou"] * 100}).to_parquet(forms / "t.parquet")
    (forms / "uid.txt").write_text("2.25.196104171 and 2.25.8842137000")
    leaks = scan_outputs(forms, {"MÜLLER^JÜRGEN", "Yamada^Tarou=山田^太郎", "19610417", "MUSTERMANN", "MRN8842137"},
                         input_paths=["PESEL7712019_KOWALSKI/ct/slice_00.dcm"], input_root=Path("/data/export"),
                         log_text="read /data/export/PESEL7712019_KOWALSKI/ct: done")
    assert "MÜLLER^JÜRGEN" in _found({k: v for k, v in leaks.items() if k == "file:a.json"})
    assert "Yamada^Tarou=山田^太郎" in _found({k: v for k, v in leaks.items() if k.startswith("parquet:")})
    assert "MUSTERMANN" in _found({k: v for k, v in leaks.items() if k.startswith("name:")})
    assert "path:PESEL7712019_KOWALSKI" in leaks["log"]
    assert "file:uid.txt" not in leaks, "a digit run inside a UID is not a date"
    assert not scan_text("read <input root> /data/export: 3 files", {"MUSTERMANN"},
                         input_paths=["PESEL7712019_KOWALSKI/ct/slice_00.dcm"], input_root=Path("/data/export"))


def test_ingest_params_have_size_limits():
    params = ingest.IngestParams()
    assert params.max_file_mb == 1024 and params.max_pixel_mb == 1024


# --------------------------------------------------------------------------------------------------
# D: the run survives, and accounts for every entry


def test_ingest_survives_the_hostile_corpus_in_seconds(run1):
    run1.require()
    assert not run1.blocked, f"ingest blocked opening a FIFO: {run1.blocked}"
    assert run1.seconds < MAX_SECONDS, f"ingest took {run1.seconds:.1f}s on {len(run1.planted.expected)} entries"


def test_every_entry_is_accounted_for_once_with_its_category(run1):
    summary = run1.require()
    planted = run1.planted
    on_disk = json.loads((run1.out / "summary.json").read_text())
    assert on_disk["files_seen"] == summary.files_seen == len(planted.expected), \
        f"files_seen {summary.files_seen}, planted entries {len(planted.expected)}"
    assert on_disk["files_seen"] == on_disk["ingested"] + sum(on_disk["rejected"].values())
    _, rejected = _read_csv(run1.out / "rejected.csv")
    assert len(rejected) == sum(on_disk["rejected"].values())
    manifest = pd.read_parquet(run1.out / "manifest.parquet")
    assert int(manifest["n_files"].sum()) == on_disk["ingested"] == len(_outputs(run1.out))

    outcomes = _outcomes(run1)
    wrong = {}
    for rel, want in sorted(planted.expected.items()):
        got = outcomes[rel]
        ok = (want == hostile.ANY or (got != hostile.INGESTED if want == hostile.REJECTED else got == want))
        if not ok:
            wrong[rel] = f"expected {want}, got {got} ({planted.what[rel][:60]})"
    unknown = sorted(set(outcomes) - set(planted.expected))
    assert not unknown, f"reasons.csv lists entries that were not planted: {unknown}"
    assert not wrong, "entries with the wrong outcome:\n" + "\n".join(f"  {k}: {v}" for k, v in wrong.items())
    assert sum(1 for v in outcomes.values() if v == hostile.INGESTED) == summary.ingested


def test_each_bad_name_is_one_row_and_outputs_stay_utf8(run1):
    summary = run1.require()
    assert summary.rejected.get("bad_name", 0) == len(run1.planted.bad_names)
    for dirpath, dirnames, filenames in os.walk(os.fsencode(run1.out)):
        for name in dirnames + filenames:
            name.decode("utf-8")  # raises on a name that is not UTF-8
            if name.endswith((b".csv", b".json", b".jsonl")):
                (Path(os.fsdecode(dirpath)) / os.fsdecode(name)).read_bytes().decode("utf-8")


def test_bombs_are_rejected_before_any_read_or_decode(tmp_path):
    """The size bombs alone, under tracemalloc: rejected as too_large in seconds, no large allocation."""
    with hostile.lenient():
        root = tmp_path / "bombs"
        hostile.save(hostile.rle_bomb(seed=1), root / "rle.dcm")
        ds = hostile.base_instance("CT", seed=2)
        ds.Rows = ds.Columns = 512
        ds.NumberOfFrames = 40000
        hostile.save(ds, root / "frames.dcm")
        hostile.save(hostile.base_instance("DX", seed=3), root / "sparse.dcm")
        os.truncate(root / "sparse.dcm", 2 * hostile.GB + 1)
        small = hostile.base_instance("DX", seed=4)
        hostile.PATIENT_BOMB.apply(small)
        hostile.save(small, root / "small.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text("study_instance_uid,label\n" + f"{small.StudyInstanceUID},normal\n")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    started = time.perf_counter()
    try:
        summary = ingest.run(ingest.IngestParams(workers=1), root, labels, tmp_path / "out", key=TEST_KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert summary.rejected == {"too_large": 3} and summary.ingested == 1
    assert peak < 128 * 1024 * 1024, f"peak traced allocation {peak / 2**20:.0f} MiB while rejecting bombs"
    assert rss_growth < 512 * 1024 * 1024, f"peak RSS grew by {rss_growth / 2**20:.0f} MiB"
    assert seconds < 20
    # and the limits are the params': a tight max_pixel_mb rejects the small image too
    tight = ingest.run(ingest.IngestParams(workers=1, max_pixel_mb=0.0001), root, labels, tmp_path / "tight",
                       key=TEST_KEY)
    assert tight.rejected == {"too_large": 4} and tight.ingested == 0


def test_unreadable_entries_are_rejected(run1):
    if os.geteuid() == 0:
        pytest.skip("running as root: mode 000 does not stop root from reading, so nothing is unreadable")
    outcomes = _outcomes(run1)
    assert outcomes["unreadable/locked.dcm"] == outcomes["unreadable/locked_dir"] == "unreadable"


@pytest.mark.parametrize("where", ["out_inside", "quarantine_inside", "out_is_input", "out_via_symlink"])
def test_output_or_quarantine_inside_the_input_is_refused_before_writing(tmp_path, where):
    with hostile.lenient():
        root = tmp_path / "export"
        ds = hostile.base_instance("DX", seed=5)
        hostile.Identity("INNEN^VERBOTEN", "IN-11111").apply(ds)
        hostile.save(ds, root / "a" / "img.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"study_instance_uid,label\n{ds.StudyInstanceUID},normal\n")
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    out, quarantine = tmp_path / "out", tmp_path / "quarantine"
    if where == "out_inside":
        out = root / "a" / "out"
    elif where == "quarantine_inside":
        quarantine = root / "quarantine"
    elif where == "out_is_input":
        out = root
    else:
        os.symlink(root, tmp_path / "alias")
        out = tmp_path / "alias" / "out"
    with pytest.raises(MedtlError):
        ingest.run(ingest.IngestParams(workers=1), root, labels, out, quarantine_dir=quarantine, key=TEST_KEY)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before, "something was written"
    assert not (tmp_path / "out").exists() and not (tmp_path / "quarantine").exists()


# --------------------------------------------------------------------------------------------------
# B: reasons, file ids, quarantine, paths


def test_rejected_csv_has_file_ids_and_reasons_but_no_paths(run1):
    run1.require()
    columns, rows = _read_csv(run1.out / "rejected.csv")
    assert columns == ["file_id", "reason"], f"rejected.csv columns {columns}"
    ids = [r["file_id"] for r in rows]
    assert len(ids) == len(set(ids)) and all(ids)
    quarantine = _quarantine_rows(run1)
    assert {r["file_id"] for r in quarantine.values()} == set(ids)
    assert {(r["file_id"], r["reason"]) for r in quarantine.values()} == {(r["file_id"], r["reason"]) for r in rows}
    # duplicates name the other file by its file_id, never by path
    a, b = quarantine["dup/conflict_a.dcm"], quarantine["dup/conflict_b.dcm"]
    assert b["file_id"] in a["reason"] and a["file_id"] in b["reason"]
    # file ids are keyed hashes of the relative path (checked where the Pseudonymizer names its method)
    file_id = getattr(deid.Pseudonymizer(TEST_KEY), "file_id", None)
    if file_id is not None:
        assert a["file_id"] == file_id("dup/conflict_a.dcm")
        link = quarantine.get("links/zz_to_inside.dcm")
        if link is not None and link["reason"].startswith("duplicate"):
            assert file_id("charsets/Иванова.dcm") in link["reason"], link["reason"]


def _reasons(run: Run) -> dict[str, list[str]]:
    out = {"rejected.csv": [r["reason"] for r in _read_csv(run.out / "rejected.csv")[1]],
           "quarantine reasons.csv": [r["reason"] for r in _read_csv(run.quarantine / "reasons.csv")[1]],
           "cache": []}
    cache = run.out / "cache" / "records.jsonl"
    for line in cache.read_text(encoding="utf-8").splitlines() if cache.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("reason"):
            out["cache"].append(record["reason"])
    return out


def test_reasons_are_categories_and_attribute_names_only(run1):
    run1.require()
    planted = run1.planted
    forbidden = set(TRACEBACK_MARKERS) | {str(planted.root), str(planted.root.parent), sys.prefix, os.getcwd()}
    bad = []
    for where, reasons in _reasons(run1).items():
        assert reasons or where == "cache", f"no reasons in {where}"
        for reason in reasons:
            if not REASON.match(reason) or "\n" in reason:
                bad.append((where, reason, "not 'category: detail' on one line"))
            hits = [f for f in forbidden if f and f in reason]
            if hits:
                bad.append((where, reason, f"contains {hits}"))
    assert not bad, "bad reasons:\n" + "\n".join(f"  {w}: {r!r}: {why}" for w, r, why in bad[:20])
    leaks = {}
    for where, reasons in _reasons(run1).items():
        if where == "quarantine reasons.csv":
            continue  # the reason column only; paths are that file's other column
        found = scan_text("\n".join(reasons), planted.phi, input_paths=planted.relpaths + planted.bad_names,
                          input_root=planted.root)
        if found:
            leaks[where] = found
    assert not leaks, f"reasons quote header values or input paths: {leaks}"


def test_quarantine_holds_the_rejected_files_and_their_paths(run1):
    run1.require()
    planted = run1.planted
    quarantine = _quarantine_rows(run1)
    assert not str(run1.quarantine.resolve()).startswith(str(planted.root.resolve()) + os.sep)
    assert not str(run1.quarantine.resolve()).startswith(str(run1.out.resolve()) + os.sep)
    missing = []
    for rel, row in quarantine.items():
        source = os.fsencode(planted.root) + b"/" + os.fsencode(rel)
        if os.path.islink(source) or not os.path.isfile(source):
            continue  # links, special files, unreadable directories: listed, not copied
        # a name that is not UTF-8 may be kept as is or written as its escaped text form
        forms = [os.fsencode(run1.quarantine) + b"/" + os.fsencode(form) for form in sorted(_path_forms(rel))
                 if "\x00" not in form]
        target = next((t for t in forms if os.path.lexists(t)), forms[0])
        if not os.path.exists(target):
            missing.append(rel)
        elif rel in planted.huge:
            assert os.path.getsize(target) == os.path.getsize(source)
        else:
            assert open(target, "rb").read() == open(source, "rb").read(), rel
    assert not missing, f"rejected files missing from the quarantine: {missing}"
    # no raw input file is in the DVC outputs
    raw = {open(os.fsencode(planted.root) + b"/" + os.fsencode(rel), "rb").read()
           for rel in planted.expected
           if rel not in planted.huge and os.path.isfile(os.fsencode(planted.root) + b"/" + os.fsencode(rel))
           and not os.path.islink(os.fsencode(planted.root) + b"/" + os.fsencode(rel))}
    copies = [p for p in run1.out.rglob("*") if p.is_file() and p.stat().st_size < 10**6 and p.read_bytes() in raw]
    assert not copies, f"raw input files in the outputs: {copies}"


def test_no_phi_and_no_input_path_in_any_output_or_log(run1):
    run1.require()
    planted = run1.planted
    leaks = scan_outputs(run1.out, planted.phi, input_paths=planted.relpaths + planted.bad_names,
                         input_root=planted.root, log_text=run1.log)
    assert not leaks, "PHI or input paths in the outputs or logs:\n" + "\n".join(
        f"  {where}: {found[:8]}" for where, found in sorted(leaks.items())[:25]) + \
        f"\nin elements: {locate_leaks(run1.out, leaks, planted.phi)}"


# --------------------------------------------------------------------------------------------------
# A: the de-identified files


def test_every_output_file_follows_the_allow_list(run1):
    run1.require()
    keep = _keep_keywords()
    problems = {p.relative_to(run1.out).as_posix(): dicom_problems(p, keep) for p in _outputs(run1.out)}
    problems = {k: v for k, v in problems.items() if v}
    assert _outputs(run1.out)
    assert not problems, "outputs that break the allow-list rules:\n" + "\n".join(
        f"  {k}: {v[:6]}" for k, v in list(problems.items())[:10])


PLANTED_KEYWORDS = (
    "ReasonForVisit", "RequestedProcedureComments", "CommentsOnThePerformedProcedureStep",
    "PerformedProcedureStepDescription", "ImageComments", "PatientComments", "AdditionalPatientHistory",
    "AcquisitionDeviceProcessingDescription", "ReasonForTheRequestedProcedure", "DerivationDescription",
    "ProtocolName", "SeriesDescription", "StudyDescription", "ContentCreatorName", "RequestingPhysician",
    "AcquisitionContextSequence", "RequestAttributesSequence", "ReferencedPatientSequence",
    "OtherPatientIDsSequence", "ReferencedImageSequence", "IconImageSequence", "EncapsulatedDocument",
    "ContentSequence", "PersonName", "TextValue", "OtherPatientIDs", "StudyComments", "AdmissionID",
    "DetectorID", "DeviceSerialNumber", "StationName", "InstitutionName", "PatientAddress",
    "PatientTelephoneNumbers", "OperatorsName", "PerformingPhysicianName", "DataSetTrailingPadding",
)


def test_phi_everywhere_file_is_rebuilt_from_the_keep_list(run1):
    run1.require()
    rel = "MUSTERMANN_MAXIMILIAN_MRN8842137/phi_everywhere.dcm"
    source = run1.planted.sources[rel]
    out = _output_of(run1, rel)
    raw = Path(out.filename).read_bytes()
    assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
    assert b"PHITRAILPAD" not in raw and b"\xfc\xff\xfc\xff" not in raw
    meta = {e.keyword for e in out.file_meta}
    assert not meta & {"SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                       "ReceivingApplicationEntityTitle", "SourcePresentationAddress", "PrivateInformation",
                       "PrivateInformationCreatorUID"}, meta
    present = {e.keyword for e in out.iterall()}
    assert not present & set(PLANTED_KEYWORDS), sorted(present & set(PLANTED_KEYWORDS))
    tags = [e.tag for e in out.iterall()]
    assert not [t for t in tags if t.is_private], "private tags left"
    assert not [t for t in tags if t.group in (0x6000, 0x00E0) or t in (hostile.UNKNOWN_LO, hostile.UNKNOWN_UN)]
    # identifiers inside kept values: blanked (or dropped), never kept
    for keyword in ("Manufacturer", "ManufacturerModelName", "BodyPartExamined", "ConvolutionKernel",
                    "WindowCenterWidthExplanation"):
        assert str(out.get(keyword, "") or "") == "", f"{keyword} kept {out.get(keyword)!r}"
    for voi in out.get("VOILUTSequence", []):
        assert str(voi.get("LUTExplanation", "") or "") == ""
        assert not any(e.tag.is_private for e in voi)
    # pseudonyms and remapped UIDs
    assert str(out.PatientID) != source.PatientID and "MUSTERMANN" not in str(out.PatientName).upper()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert out[keyword].value != source[keyword].value
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.PatientIdentityRemoved == "YES" and out.DeidentificationMethod
    assert "113100" in {c.CodeValue for c in out.DeidentificationMethodCodeSequence}
    # the values it needs survive: pixels, modality, sex, age, view, window
    assert out.PixelData == source.PixelData and out.Modality == "DX"
    assert out.PatientSex == "M" and out.PatientAge == "058Y" and out.ViewPosition == "PA"
    assert float(out.WindowCenter) == 2048


def test_clean_kept_values_and_geometry_survive(run1):
    run1.require()
    out = _output_of(run1, "MUSTERMANN_MAXIMILIAN_MRN8842137/second_study.dcm")
    assert (out.Manufacturer, out.ManufacturerModelName, out.BodyPartExamined) == ("ACME Imaging", "XR-5000", "CHEST")
    assert (out.Modality, out.ViewPosition, out.PatientSex, out.PatientAge) == ("DX", "PA", "M", "058Y")
    assert [float(v) for v in out.ImagerPixelSpacing] == [0.15, 0.15] and float(out.KVP) == 120
    assert (out.Rows, out.Columns, out.BitsAllocated, out.BitsStored, out.PhotometricInterpretation) == \
        (16, 16, 16, 12, "MONOCHROME2")
    manifest = pd.read_parquet(run1.out / "manifest.parquet")
    volumes = manifest[manifest["unit"] == "volume"]
    assert len(volumes) == 1 and volumes.iloc[0]["n_files"] == 3
    for k in range(3):
        rel = f"PESEL7712019_KOWALSKI/ct/slice_{k:02d}.dcm"
        source, ct = run1.planted.sources[rel], _output_of(run1, rel)
        for keyword in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"):
            assert [float(v) for v in ct[keyword].value] == [float(v) for v in source[keyword].value], keyword
        assert float(ct.SliceThickness) == 2.5 and float(ct.RescaleIntercept) == -1024
        assert ct.FrameOfReferenceUID != source.FrameOfReferenceUID
    assert len({_output_of(run1, f"PESEL7712019_KOWALSKI/ct/slice_{k:02d}.dcm").SeriesInstanceUID
                for k in range(3)}) == 1


def test_dates_are_shifted_by_one_offset_per_patient(run1):
    run1.require()
    first = _output_of(run1, "MUSTERMANN_MAXIMILIAN_MRN8842137/phi_everywhere.dcm")
    second = _output_of(run1, "MUSTERMANN_MAXIMILIAN_MRN8842137/second_study.dcm")
    shift = dt.date(2020, 1, 10) - _date(first.StudyDate)
    assert shift.days > 0, "dates not shifted back"
    assert dt.date(2020, 3, 1) - _date(second.StudyDate) == shift, "one patient, two offsets"
    assert str(first.get("PatientBirthDate", "") or "") == ""


def test_malformed_dates_do_not_lose_the_file(run1):
    run1.require()
    assert _outcomes(run1)["dates/bad_dates.dcm"] == hostile.INGESTED
    out = _output_of(run1, "dates/bad_dates.dcm")
    study = _date(out.StudyDate)  # a valid DA
    assert study != dt.date(2021, 3, 4) and study < dt.date(2021, 3, 4)
    assert out.get("ContentDate") is None or _date(out.ContentDate) == study, "2021-03-04 and 20210304 shifted apart"
    if out.get("AcquisitionDate"):
        assert _date(out.AcquisitionDate) - study == dt.timedelta(days=1)
    if out.get("SeriesDate"):
        _date(out.SeriesDate)  # month 13 was dropped or blanked, not kept
    assert str(out.get("PatientBirthDate", "") or "") == ""
    raw_values = {"2021-03-04", "20211399", "2021.03.05", "19xx0101", "20210304", "20210305"}
    leaks = scan_outputs(run1.out, raw_values, log_text=run1.log)
    assert not leaks, f"raw date values in outputs or logs: {leaks}"


@pytest.mark.parametrize(("relpath", "blank"), [
    ("charsets/MÜLLER_JÜRGEN.dcm", "Manufacturer"),
    ("charsets/declared_latin1_is_utf8.dcm", "Manufacturer"),
    ("charsets/Иванова.dcm", "ManufacturerModelName"),
    ("charsets/山田_太郎.dcm", "Manufacturer"),
])
def test_names_in_other_character_sets_are_removed(run1, relpath, blank):
    run1.require()
    assert _outcomes(run1)[relpath] == hostile.INGESTED
    out = _output_of(run1, relpath)
    source = run1.planted.sources[relpath]
    assert str(out.get(blank, "") or "") == "", f"{blank} kept {out.get(blank)!r}"
    name = str(out.PatientName)
    for part in re.split(r"[\^=]", str(source.PatientName)):
        assert not part or part not in name
    phi = {v for v in run1.planted.file_phi[relpath] if any(ord(c) > 127 for c in v)}
    assert phi
    leaks = scan_outputs(run1.out, phi)
    assert not leaks, f"non-ASCII names of {relpath} in the outputs: {leaks}"


def test_legacy_file_gets_a_clean_preamble_and_meta(run1):
    run1.require()
    out = _output_of(run1, "legacy/no_preamble.dcm")
    raw = Path(out.filename).read_bytes()
    assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
    assert out.file_meta.TransferSyntaxUID and out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


# --------------------------------------------------------------------------------------------------
# workers=2: the same outcome, and no PHI from the worker processes


def test_two_workers_give_the_same_outcome_and_no_phi(run1, tmp_path):
    first = run1.require()
    planted = run1.planted
    run2 = _ingest(planted, tmp_path / "out", tmp_path / "quarantine", workers=2)
    second = run2.require()
    assert not run2.blocked and run2.seconds < MAX_SECONDS
    assert {k: v for k, v in vars(second).items() if k != "run"} == {k: v for k, v in vars(first).items() if k != "run"}
    assert (run2.out / "rejected.csv").read_text() == (run1.out / "rejected.csv").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(run2.out / "manifest.parquet"),
                                  pd.read_parquet(run1.out / "manifest.parquet"))
    leaks = scan_outputs(run2.out, planted.phi, input_paths=planted.relpaths + planted.bad_names,
                         input_root=planted.root, log_text=run2.log)
    assert not leaks, f"PHI with workers=2: {dict(list(leaks.items())[:10])}"


# --------------------------------------------------------------------------------------------------
# E: the public demo key is checked per file


def test_demo_key_is_verified_per_file_not_by_folder(tmp_path, monkeypatch):
    from pipeline import keys, synth

    for var in ("MEDTL_PSEUDONYM_KEY", "MEDTL_PSEUDONYM_KEY_FILE", getattr(keys, "ENV_KEY", ""),
                getattr(keys, "ENV_KEY_FILE", "")):
        if var:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cohort = tmp_path / "synth"
    synth.run(synth.SynthParams(patients=2, seed=11, defects=False), cohort)
    images = sorted(p for p in (cohort / "DICOM").rglob("*") if p.is_file())
    # a real (non-synth) file dropped into the synthetic folder, and a synth file edited by hand
    with hostile.lenient():
        real = hostile.base_instance("DX", seed=7)
        hostile.Identity("ECHT^PATIENTIN", "REAL-48151").apply(real)
        hostile.save(real, images[0].parent / "IM99999")
    edited = pydicom.dcmread(images[-1])
    edited.PatientName = "ECHT^BEARBEITET"
    edited.save_as(images[-1])
    labels = tmp_path / "labels.csv"
    shutil.copy(cohort / "labels.csv", labels)
    with open(labels, "a") as fh:
        fh.write(f"{real.StudyInstanceUID},normal\n")
    out = tmp_path / "out"
    summary = ingest.run(ingest.IngestParams(workers=1), cohort, labels, out, quarantine_dir=tmp_path / "q")
    rows = {r["path"]: r["reason"] for r in _read_csv(tmp_path / "q" / "reasons.csv")[1]}
    real_rel = (images[0].parent / "IM99999").relative_to(cohort).as_posix()
    edited_rel = images[-1].relative_to(cohort).as_posix()
    assert rows.get(real_rel, "").startswith("needs_site_key:"), rows.get(real_rel)
    assert rows.get(edited_rel, "").startswith("needs_site_key:"), rows.get(edited_rel)
    assert summary.rejected.get("needs_site_key") == 2, summary.rejected
    assert summary.ingested > 10, "the synth files themselves are ingested with the demo key"


def test_native_pixel_data_is_cut_to_its_declared_length(run1):
    """Bytes past Rows x Columns x BitsAllocated are not pixels: a name hidden there must not be copied."""
    source = run1.planted.sources["pixels/tail.dcm"]
    declared = source.Rows * source.Columns * source.BitsAllocated // 8
    assert len(source.PixelData) > declared  # the corpus really planted a tail
    out = _output_of(run1, "pixels/tail.dcm")
    assert out.PixelData == source.PixelData[:declared]
    assert b"PHIPIXTAIL" not in Path(out.filename).read_bytes()
    np.testing.assert_array_equal(out.pixel_array, source.pixel_array)


def test_the_fast_encoder_writes_what_pydicoms_writer_writes_for_every_hostile_file(corpus):
    """deid.encode packs most elements itself (raw ones as read, the values the rebuild creates, the file
    meta); on every hostile file that de-identifies, the bytes equal those of pydicom's own writers."""
    from pipeline import deid

    compared = 0
    for relpath, expected in corpus.expected.items():
        path = corpus.root / relpath
        if expected != hostile.INGESTED or not path.is_file() or relpath in corpus.huge:
            continue
        source = pydicom.dcmread(path, force=True)
        out = deid.Pseudonymizer(TEST_KEY).deidentify(source, "P-TEST")
        fast = deid.encode(out)
        assert fast == deid.encode(out, fast=False), relpath
        compared += 1
    assert compared >= 10, "the corpus should hold ingested files of several kinds"

"""Synth writing: the cohort on disk. :func:`run` and :func:`add` (the public entry points), the
marker with its file list, ``labels.csv`` and ``lesions.csv``, written atomically and incrementally
(only missing files, checkpoints of the file list while a run writes)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io_utils import atomic_write_bytes, content_hash, remove_stale_temps
from pipeline.params import ParamsError, param
from pipeline.paths import SYNTH_MARKER, SYNTH_MARKER_FILES
from pipeline.synth.planning import GENERATOR_VERSION, PatientPlan, plan_patient, planned_files, series_of
from pipeline.synth.rendering import ct_pixel_spacing, instance_uid, proj_pixel_spacing, render_patient

log = logging.getLogger(__package__)  # "pipeline.synth", as before the package

MARKER_NAME = SYNTH_MARKER
MARKER_FILES = SYNTH_MARKER_FILES  # the marker's field: relpath (under DIR) -> content id of every file synth wrote
LABELS_NAME = "labels.csv"
LESIONS_NAME = "lesions.csv"
LESIONS_HEADER = "study_instance_uid,series_instance_uid,sop_instance_uid,row,col,radius_px,radius_mm"
DICOM_DIR = "DICOM"


# --------------------------------------------------------------------------------------------------
# public API


@dataclass(frozen=True)
class SynthParams:
    """params.yaml ``synth`` section."""

    patients: int = param(100, min=1)
    seed: int = param(0, min=0)
    defects: bool = param(True)  # sprinkle realistic junk/defects (package docstring)

    def __post_init__(self) -> None:
        if isinstance(self.patients, bool) or not isinstance(self.patients, int) or self.patients < 1:
            raise ParamsError(f"synth.patients must be an integer >= 1, got {self.patients!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ParamsError(f"synth.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.defects, bool):
            raise ParamsError(f"synth.defects must be true or false, got {self.defects!r}")


@dataclass
class SynthSummary:
    """The cohort in ``out_dir`` after the call (all patients, not only the ones just written)."""

    patients: int
    studies: int
    series: int
    instances: int  # distinct SOP instances (defect copies and junk not counted)
    files: int  # everything under DIR/DICOM: instances, defect copies, junk
    by_modality: dict[str, int]  # instances per Modality
    by_transfer_syntax: dict[str, int]  # instances per transfer syntax (UID keyword)
    labels: dict[str, int]  # label -> number of studies


def run(params: SynthParams, out_dir: Path) -> SynthSummary:
    """Write patients ``[0, params.patients)`` into ``out_dir`` (created if needed).

    If ``out_dir`` already holds a cohort written with the same seed, patients that already exist
    are left untouched and only missing files are written; ``labels.csv`` and the marker are
    rewritten to cover all patients in the directory (a cohort never shrinks; an interrupted run is
    completed). A cohort written with another seed, defects setting or generator version, or a
    ``DICOM`` folder without a marker, is refused (ValueError): write to an empty directory instead.
    """
    out_dir = Path(out_dir)
    marker = _read_marker(out_dir)
    if marker is None:
        dicom_root = out_dir / DICOM_DIR
        if dicom_root.is_dir() and any(dicom_root.iterdir()):
            raise ValueError(
                f"{out_dir} has a {DICOM_DIR} folder but no {MARKER_NAME}: not a synthetic cohort written by "
                "this version; choose an empty directory"
            )
        return _write_cohort(out_dir, params.seed, params.defects, params.patients, 0, {})
    for key, want in (("seed", params.seed), ("defects", params.defects), ("generator_version", GENERATOR_VERSION)):
        have = marker.get(key, True if key == "defects" else None)
        if have != want:
            raise ValueError(
                f"{out_dir} holds a synthetic cohort with {key}={have!r}, not {want!r}; "
                "remove it or choose another directory"
            )
    existing = int(marker.get("patients", 0))
    # an interrupted run is completed to the size it was writing (its files are partly there)
    target = max(existing, int(marker.get("writing_patients", 0)))
    if target > params.patients:
        log.warning("synth: the cohort already has %d patients (more than the %d asked for); keeping them all",
                    target, params.patients)
    return _write_cohort(out_dir, params.seed, params.defects, max(target, params.patients), existing,
                         _marker_files(marker))


def add(out_dir: Path, k: int) -> SynthSummary:
    """Append ``k`` new patients (a week's new arrivals) to the cohort in ``out_dir``.

    Patients ``[n, n + k)`` are written with the cohort's seed (``n`` from the marker); existing
    files stay byte-for-byte unchanged, ``labels.csv`` keeps its rows and gets the new studies
    appended, and the marker is rewritten.
    """
    out_dir = Path(out_dir)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"add: k must be an integer >= 0, got {k!r}")
    marker = _read_marker(out_dir)
    if marker is None:
        raise FileNotFoundError(f"{out_dir / MARKER_NAME} not found: run `medtl synth --out {out_dir}` first")
    n = max(int(marker.get("patients", 0)), int(marker.get("writing_patients", 0)))
    params = SynthParams(patients=n + k, seed=int(marker["seed"]), defects=bool(marker.get("defects", True)))
    return run(params, out_dir)


# --------------------------------------------------------------------------------------------------
# writing


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data, durable=True)


def _read_marker(out_dir: Path) -> dict | None:
    path = out_dir / MARKER_NAME
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable synth marker ({exc}); remove the directory and write it again") from exc
    if not isinstance(marker, dict) or not marker.get("synthetic"):
        raise ValueError(f"{path}: not a synthetic-cohort marker")
    return marker


def _marker_files(marker: dict) -> dict[str, str]:
    """The marker's file list (relpath -> content id); empty for a marker from before synth kept one."""
    files = marker.get(MARKER_FILES)
    if not isinstance(files, dict):
        return {}
    return {rel: cid for rel, cid in files.items() if isinstance(rel, str) and isinstance(cid, str)}


def _marker_bytes(seed: int, defects: bool, patients: int, files: dict[str, str], writing: int | None = None) -> bytes:
    marker = {"synthetic": True, "seed": seed, "patients": patients, "generator_version": GENERATOR_VERSION,
              "defects": defects, MARKER_FILES: files}
    if writing is not None:
        marker["writing_patients"] = writing  # present only while a run is under way / was interrupted
    return (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode()


def _lesion_rows(pt: PatientPlan, seed: int, defects: bool) -> list[str]:
    """``lesions.csv`` rows of a patient (package docstring): one per written image instance that shows
    its study's nodule, from the plan alone (no pixels needed)."""
    rows = []
    site = pt.site
    for st in pt.studies:
        les = st.lesion
        if les is None:
            continue
        for se in st.series:
            for k in range(se.n):
                if defects and se.omit == k:
                    continue
                if st.kind == "ct":
                    g = st.ct
                    ps = float(ct_pixel_spacing(site))  # as PixelSpacing says
                    dz = (k - (g.n_slices - 1) / 2) * site.ct_spacing - les.z
                    if abs(dz) >= les.radius:
                        continue
                    radius_mm = float(np.sqrt(les.radius ** 2 - dz ** 2))
                    row = les.y / ps + (site.ct_matrix - 1) / 2
                    col = les.x / ps + (site.ct_matrix - 1) / 2
                    radius_px = radius_mm / ps
                else:
                    g = st.proj
                    det = site.proj_spacing  # the image is rendered on the detector grid
                    across = les.x if se.kind == "pa" else les.z
                    row = (les.y + g.shift[1]) / det + (site.proj_rows - 1) / 2
                    col = (across + g.shift[0]) / det + (site.proj_cols - 1) / 2
                    radius_px = les.radius / det
                    radius_mm = radius_px * float(proj_pixel_spacing(site))
                rows.append(f"{st.uid},{se.uid},{instance_uid(seed, pt, st, se, k)},{row:.3f},{col:.3f},"
                            f"{radius_px:.3f},{radius_mm:.3f}")
    return rows


#: while writing, the marker's file list is saved again after this many new files, so that a resumed
#: run renders at most this many files' patients again to list them (they are never re-read)
CHECKPOINT_FILES = 1000


def _write_cohort(out_dir: Path, seed: int, defects: bool, total: int, complete: int,
                  known: dict[str, str]) -> SynthSummary:
    """Write the missing files of patients ``[0, total)`` and the marker listing every file's content id.

    ``known`` is the previous marker's file list. Content ids always come from bytes rendered in
    memory, never from reading the tree (a file a user put or changed there is not listed): a patient
    whose files are all on disk keeps its listed ids; one with a file missing, or with files the list
    does not cover (an interrupted run after its last checkpoint, or a marker from before the list),
    is rendered and listed again, and only its missing files are written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir / DICOM_DIR
    stale = remove_stale_temps(out_dir)
    plans = [plan_patient(seed, p) for p in range(total)]
    todo: list[tuple[PatientPlan, list[str]]] = []  # patients with missing files, and those files
    unlisted: list[PatientPlan] = []  # patients whose files are all there but not all listed
    for pt in plans:
        site_dir = root / pt.site.folder
        rels = [f.rel for f in planned_files(pt, seed, defects)]
        missing = [rel for rel in rels if not (site_dir / rel).is_file()]
        if missing:
            todo.append((pt, missing))
        elif any(f"{DICOM_DIR}/{pt.site.folder}/{rel}" not in known for rel in rels):
            unlisted.append(pt)
    ids = dict(known)  # relpath under out_dir -> content id of the bytes synth made for it

    def listed(pt: PatientPlan, files: dict[str, bytes]) -> None:
        ids.update({f"{DICOM_DIR}/{pt.site.folder}/{rel}": content_hash(data) for rel, data in files.items()})

    def checkpoint() -> None:
        atomic_write_bytes(out_dir / MARKER_NAME, _marker_bytes(seed, defects, complete, ids, writing=total),
                           durable=True)

    if todo:
        checkpoint()
    written = since_checkpoint = 0
    made_dirs: set[Path] = set()
    for pt, missing in todo:
        files = render_patient(pt, seed, defects)
        site_dir = root / pt.site.folder
        for rel in missing:
            path = site_dir / rel
            if path.parent not in made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(path.parent)
            atomic_write_bytes(path, files[rel], durable=False)
            written += 1
        listed(pt, files)
        since_checkpoint += len(missing)
        if since_checkpoint >= CHECKPOINT_FILES:
            checkpoint()
            since_checkpoint = 0
    if unlisted:
        log.info("synth: listing the files of %d patients written before (rendered again, not rewritten)",
                 len(unlisted))
    for pt in unlisted:
        listed(pt, render_patient(pt, seed, defects))
    rows = ["study_instance_uid,label"] + [f"{st.uid},{st.label}" for pt in plans for st in pt.studies]
    labels = ("\n".join(rows) + "\n").encode()
    _write_if_changed(out_dir / LABELS_NAME, labels)
    lesion_rows = [LESIONS_HEADER] + [row for pt in plans for row in _lesion_rows(pt, seed, defects)]
    lesions = ("\n".join(lesion_rows) + "\n").encode()
    _write_if_changed(out_dir / LESIONS_NAME, lesions)
    final = {LABELS_NAME: content_hash(labels), LESIONS_NAME: content_hash(lesions)}
    for pt in plans:
        for f in planned_files(pt, seed, defects):
            rel = f"{DICOM_DIR}/{pt.site.folder}/{f.rel}"
            final[rel] = ids[rel]
    _write_if_changed(out_dir / MARKER_NAME, _marker_bytes(seed, defects, total, final))
    summary = _summarise(plans, seed, defects)
    log.info("synth: %d patients (%d written now), %d studies, %d series, %d instances, %d files (%d written now%s)",
             summary.patients, len(todo), summary.studies, summary.series, summary.instances, summary.files, written,
             f", {stale} stale temporary files removed" if stale else "")
    return summary


def _summarise(plans: list[PatientPlan], seed: int, defects: bool) -> SynthSummary:
    studies = series = instances = files = 0
    by_modality: Counter[str] = Counter()
    by_ts: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for pt in plans:
        for st in pt.studies:
            studies += 1
            labels[st.label] += 1
            series += len(series_of(pt, st, seed, defects))
        for f in planned_files(pt, seed, defects):
            files += 1
            if f.kind in ("image", "sr", "sc"):
                instances += 1
                by_modality[f.modality] += 1
                by_ts[f.ts.keyword or str(f.ts)] += 1
    return SynthSummary(patients=len(plans), studies=studies, series=series, instances=instances, files=files,
                        by_modality=dict(sorted(by_modality.items())), by_transfer_syntax=dict(sorted(by_ts.items())),
                        labels=dict(sorted(labels.items())))

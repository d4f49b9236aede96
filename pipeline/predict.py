"""``medtl predict``: apply a trained model (the champion by default) to new, unlabelled studies.

New studies go through the very functions training data went through — :func:`pipeline.ingest.run`
(accounting, quarantine, allow-list de-identification, the same pseudonyms for the same key) and
:func:`pipeline.preprocess.run` with the preprocess params the model was trained with (its card's
``input_spec.preprocess``) — so train/serve skew cannot come from a second copy of that code. Then
the model scores every image and decides at its frozen operating threshold: the one evaluate chose
on the validation split (``metrics.json`` beside the model, as the registry keeps it); nothing is
refitted on the new data.

Outputs (``out_dir``; pseudonymised, no PHI):

- ``predictions.csv``: one row per image (``image_id, patient_key, study_uid, series_uid, modality,
  site, score, decision``); ``score`` is the positive-class probability;
- ``studies.csv``: one row per study, its score aggregated over its images (``predict.aggregation``:
  ``max`` by default, since one image showing the finding makes the study positive), the decision at
  the same threshold, and ``new``: not in the previous run's ``studies.csv`` (arrived since; ingest's
  cache means only new files are read);
- ``predict.json``: the model (version, SHA-256 of ``model.pt`` and of its card), the threshold and
  where it came from, the aggregation, and the counts (files seen, rejected by reason, images,
  studies, positive studies).

``local_dir`` (PHI: keep it out of DVC outputs and off shared storage, like the quarantine) receives
``inputs.csv`` (which input files each image came from), ``uids.csv`` (each pseudonymised study,
series and instance UID with the original one it stands for, checked by recomputing the pseudonym)
and ``sr/``: one DICOM Structured Report per study (:mod:`pipeline.sr`) with the original identifiers,
ready to go back to the PACS. Nothing else can reverse the pseudonyms.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom import Dataset

from pipeline import deid, drift, ingest, keys, models, paths, preprocess, promote
from pipeline.data import SplitData
from pipeline.device import DEVICES, init_distributed
from pipeline.errors import MedtlError
from pipeline.fanout import FanoutParams
from pipeline.inference import score_split
from pipeline.io_utils import atomic_write_bytes, atomic_write_text, csv_text, sha256_file
from pipeline.params import check, param, section
from pipeline.sources import MB, Source
from pipeline.sources.folder import FolderSource

log = logging.getLogger(__name__)

AGGREGATIONS = ("max", "mean")
SPLIT = "predict"
POSITIVE, NEGATIVE = "positive", "negative"


class PredictError(MedtlError, ValueError):
    """The model or the new studies cannot be used for prediction; the message says why."""


@dataclass(frozen=True)
class PredictParams:
    """``predict`` section of params.yaml.

    Attributes:
        aggregation: how a study's score comes from its images' scores: ``max`` (a finding on any
            image makes the study positive) or ``mean``.
        batch_size: images per forward pass.
        device: ``auto`` (the GPU when there is one), ``cpu`` or ``cuda``.
        structured_report: write one DICOM SR per study (:mod:`pipeline.sr`) into the local directory.
        secondary_capture: also one Secondary Capture per study (:mod:`pipeline.sc`): the Grad-CAM overlay
            of its highest-scoring image (costs a backward pass per study).
        drift_psi: flag a modality whose image statistics' population stability index against the
            model's training reference exceeds this (:mod:`pipeline.drift`).
    """

    aggregation: str = param("max", choices=AGGREGATIONS)
    batch_size: int = param(32, min=1)
    device: str = param("auto", choices=DEVICES)
    structured_report: bool = True
    secondary_capture: bool = False
    drift_psi: float = param(0.25, min=0, min_exclusive=True)

    def __post_init__(self) -> None:
        check(self, "predict")


@dataclass(frozen=True)
class Model:
    """A model ready to score: its file, card, frozen threshold and registry version (None: not registered)."""

    path: Path
    card: dict
    card_sha256: str
    model_sha256: str
    threshold: float
    threshold_from: str
    threshold_record: dict  # metrics.json's ``threshold`` (method, value, chosen_on), or {"method": "given", ...}
    version: int | None
    classes: list[str]
    input_spec: dict


def resolve_model(model_path: Path | None, registry: Path, threshold: float | None = None, *,
                  need_threshold: bool = True) -> Model:
    """The model to apply: ``model_path``, or the champion of ``registry``; with its frozen threshold.

    The threshold is the one evaluate chose on validation, read from ``metrics.json`` beside the model
    (the registry keeps it with every version), unless ``threshold`` is given. ``need_threshold`` False
    (e.g. export): none is needed (it is nan) and the model may have any number of classes.

    Raises:
        PredictError: no champion, no model file, a non-binary model, or no threshold anywhere.
    """
    version = None
    if model_path is None:
        record = promote.read_champion(Path(registry))
        if record is None:
            raise PredictError(f"{registry}: no champion yet; run `medtl retrain` (or `medtl promote`) first, "
                               "or give --model")
        model_path, version = Path(registry) / record["path"] / paths.MODEL, int(record["version"])
    model_path = Path(model_path)
    if not model_path.is_file():
        raise PredictError(f"{model_path}: no such model file")
    card_path = model_path.parent / paths.MODEL_CARD
    if not card_path.is_file():
        raise PredictError(f"{card_path}: the model's card is missing (it travels beside model.pt)")
    card = json.loads(card_path.read_text())
    model_sha = sha256_file(model_path)
    if card.get("model_file", {}).get("sha256", model_sha) != model_sha:
        raise PredictError(f"{card_path} describes another model than {model_path} (SHA-256 differs)")
    classes = list(card["input_spec"]["classes"])
    if len(classes) != 2 and need_threshold:
        raise PredictError(f"{model_path}: {len(classes)} classes; predict decides for binary models only")
    source, record = "given", {"method": "given", "value": threshold, "chosen_on": "given"}
    if threshold is None and not need_threshold:  # e.g. export: the file and card are what matter
        threshold, source, record = math.nan, "none", {}
    elif threshold is None:
        metrics_path = model_path.parent / paths.METRICS
        try:
            chosen = json.loads(metrics_path.read_text())["threshold"]
            threshold, source = float(chosen["value"]), f"{chosen['method']} on {chosen['chosen_on']} (metrics.json)"
            record = dict(chosen)
        except (OSError, ValueError, KeyError, TypeError):
            raise PredictError(f"{metrics_path}: no operating threshold beside the model (evaluate writes it; the "
                               "registry keeps it with each version); give --threshold") from None
    if need_threshold and (not 0 <= threshold <= 1 or math.isnan(threshold)):
        raise PredictError(f"threshold {threshold} is not a probability in [0, 1]")
    return Model(model_path, card, hashlib.sha256(card_path.read_bytes()).hexdigest(), model_sha, threshold, source,
                 record, version, classes, card["input_spec"])


def preprocess_params(input_spec: dict) -> preprocess.PreprocessParams:
    """The preprocess params the model was trained with (its card's ``input_spec.preprocess``).

    Raises:
        PredictError: the model windows with statistics of its training set (``dataset_percentile``),
            which its card does not carry.
    """
    params = section(preprocess.PreprocessParams, input_spec.get("preprocess") or {},
                     where="model card input_spec.preprocess")
    if "dataset_percentile" in params.window.values():
        raise PredictError("the model was trained with preprocess.window dataset_percentile, whose training-set "
                           "windows its card does not record; predict cannot reproduce its inputs")
    return params


def prepare(model: Model, input_dir: Path | Source, labels_csv: Path | None, work_dir: Path, local_dir: Path, *,
            key: bytes | keys.SiteKey | None, ingest_params: ingest.IngestParams, fanout: FanoutParams | None,
            lesions_csv: Path | None = None) -> tuple[Source, bytes, ingest.IngestSummary, preprocess.PreprocessSummary]:
    """New data through the training code: :func:`pipeline.ingest.run` into ``work_dir/ingest`` (quarantine
    and the inputs map in ``local_dir``), then :func:`pipeline.preprocess.run` with the model's preprocess
    params into ``work_dir/images``. Shared by predict (no labels) and validate (labels).

    Returns:
        (the source, the key's secret, ingest's summary, preprocess's summary).

    Raises:
        PredictError: no file of the input holds a usable image.
    """
    pre_params = preprocess_params(model.input_spec)
    source = FolderSource(Path(input_dir)) if isinstance(input_dir, (str, Path)) else input_dir
    site_key = key if key is not None else keys.resolve_key(demo_allowed=bool(source.synthetic_files()))
    secret = site_key.secret if isinstance(site_key, keys.SiteKey) else bytes(site_key)
    ingested = ingest.run(ingest_params, source, labels_csv, work_dir / "ingest", quarantine_dir=local_dir / "quarantine",
                          key=secret, fanout=fanout, inputs_csv=local_dir / "inputs.csv", lesions_csv=lesions_csv,
                          classes=tuple(model.classes) if labels_csv is not None else None)
    if ingested.images == 0:
        raise PredictError(f"{input_dir}: none of the {ingested.files_seen} files holds a usable image "
                           f"(rejected: {ingested.rejected}); see {local_dir / 'quarantine'}")
    prepared = preprocess.run(pre_params, work_dir / "ingest", work_dir / "images", fanout=fanout)
    return source, secret, ingested, prepared


def run(params: PredictParams, input_dir: Path | Source, out_dir: Path, *, model_path: Path | None = None,
        registry: Path = Path(paths.REGISTRY_DIR), work_dir: Path | None = None, local_dir: Path | None = None,
        key: bytes | keys.SiteKey | None = None, ingest_params: ingest.IngestParams | None = None,
        fanout: FanoutParams | None = None, threshold: float | None = None) -> dict:
    """Ingest, preprocess and score new studies with a frozen model; write per-image and per-study results.

    Args:
        params: the ``predict`` section.
        input_dir: the new studies (a folder or any :class:`~pipeline.sources.Source`); no labels.
        out_dir: receives ``predictions.csv``, ``studies.csv``, ``predict.json`` (no PHI).
        model_path: the model; None: the champion of ``registry``.
        work_dir: the de-identified copies and tensors (default ``out_dir/work``); kept, so a rerun on
            a grown input only reads the new files (ingest's cache).
        local_dir: the PHI-bearing maps ``inputs.csv`` and ``uids.csv`` (default ``out_dir/../local``).
        key: the site's pseudonymisation key (None: resolved as ingest does); the same key as training
            gives the same patient keys.
        ingest_params: the ``ingest`` section (size caps, pixel checks, workers).
        threshold: overrides the frozen threshold (recorded as ``given``).

    Returns:
        The content of ``predict.json``.
    """
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "work"
    local_dir = Path(local_dir) if local_dir is not None else out_dir.parent / "local"
    model = resolve_model(model_path, registry, threshold)
    ingest_params = ingest_params or ingest.IngestParams()
    source, secret, ingested, prepared = prepare(model, input_dir, None, work_dir, local_dir, key=key,
                                                 ingest_params=ingest_params, fanout=fanout)
    scores = _score(model, params, work_dir / "images")
    reference = model.card.get("data", {}).get("drift_reference")
    shift = (drift.compare(reference, np.load(work_dir / "images" / "tensors.npy", mmap_mode="r"),
                           scores["row"].to_numpy(), scores["modality"].to_numpy(), params.drift_psi)
             if reference else None)
    log.info("%s", drift.summary_line(shift))
    images = _image_rows(scores, model)
    studies = _study_rows(images, params.aggregation, model.threshold)
    before = _previous_studies(out_dir / "studies.csv")
    studies["new"] = ~studies["study_uid"].isin(before)  # arrived since the last run into out_dir
    pseudo = deid.Pseudonymizer(secret)
    manifest = pd.read_parquet(work_dir / "ingest" / "manifest.parquet",
                               columns=["image_id", "study_uid", "series_uid", "sop_instance_uids"])
    manifest = manifest[manifest["image_id"].isin(set(images["image_id"]))]
    headers = _original_headers(source, local_dir / "inputs.csv", manifest, pseudo, ingest_params)
    atomic_write_text(local_dir / "uids.csv", csv_text(["level", "pseudonymised_uid", "original_uid"],
                                                        _uid_rows(headers, pseudo)))
    reports = (_write_reports(local_dir / "sr", studies, manifest, headers, model, params.aggregation)
               if params.structured_report else 0)
    captures = (_write_captures(local_dir / "sc", scores, manifest, headers, model, work_dir / "images", params)
                if params.secondary_capture else 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "predictions.csv", _csv(images))
    atomic_write_text(out_dir / "studies.csv", _csv(studies))
    summary = {
        "model": {"path": model.path.name, "version": model.version, "model_sha256": model.model_sha256,
                  "card_sha256": model.card_sha256, "name": model.card.get("name"), "classes": model.classes},
        "threshold": {"value": model.threshold, "from": model.threshold_from},
        "aggregation": params.aggregation,
        "positive_class": model.classes[-1],
        "counts": {"files_seen": ingested.files_seen, "ingested_files": ingested.ingested,
                   "rejected_files": ingested.rejected, "preprocess_rejected": prepared.rejected,
                   "images": len(images), "studies": len(studies),
                   "positive_studies": int((studies["decision"] == POSITIVE).sum()),
                   "new_studies": int(studies["new"].sum()),
                   "new_positive_studies": int((studies["new"] & (studies["decision"] == POSITIVE)).sum()),
                   "structured_reports": reports, "secondary_captures": captures},
        "drift": shift,
        "score_deciles": {"images": score_quantiles(images["score"]), "studies": score_quantiles(studies["score"])},
        "params": asdict(params),
    }
    atomic_write_text(out_dir / "predict.json", json.dumps(summary, indent=2) + "\n")
    log.info("predict: %d images of %d studies scored with %s (threshold %.3f, %s); %d studies positive",
             len(images), len(studies), f"champion v{model.version}" if model.version else model.path.name,
             model.threshold, model.threshold_from, summary["counts"]["positive_studies"])
    return summary


def run_from_pacs(params: PredictParams, source: str, pacs_params, out_dir: Path, *, local_dir: Path,
                  client=None, store: bool = True, **kwargs) -> dict:
    """``medtl predict --pacs``: pull the studies new or changed since the last run from the PACS
    (:func:`pipeline.sources.pacs.pull`, its own cursor and inbox under ``local_dir``: raw PHI), score
    them with :func:`run`, and store each study's SR back into its study in the PACS (only those the
    PACS does not hold yet: reruns store no duplicates).

    Args:
        source: ``dicomweb`` or ``dimse`` (``data.source``); pacs_params: the ``pacs`` section.
        client: a PACS client (default: one for ``source`` with the environment's credentials).
        store: send the SRs back (``params.structured_report`` must be on).
        kwargs: passed to :func:`run` (model_path, registry, work_dir, key, ingest_params, fanout, threshold).

    Returns:
        :func:`run`'s summary with ``pull`` and ``stored`` counts added (also in ``predict.json``).
    """
    from pipeline.sources import pacs

    if store and not params.structured_report:
        raise PredictError("predict --pacs: results go back as SRs; set predict.structured_report: true")
    local_dir = Path(local_dir)
    client = pacs.client_for(source, pacs_params) if client is None else client
    pulled = pacs.pull(source, pacs_params, local_dir / "pacs_inbox", local_dir / "pacs_cursor.json", client=client)
    summary = run(params, local_dir / "pacs_inbox", out_dir, local_dir=local_dir, **kwargs)
    stored = pacs.store_reports(client, local_dir / "sr", local_dir / "sc") if store else None
    summary["pull"] = {k: v for k, v in pulled.as_dict().items() if k != "server"}
    summary["stored"] = stored.as_dict() if stored else None
    atomic_write_text(Path(out_dir) / "predict.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _score(model: Model, params: PredictParams, images_dir: Path) -> pd.DataFrame:
    """The preprocess index of the new images with the positive-class probability of each."""
    index = pd.read_parquet(images_dir / "index.parquet").sort_values("row").reset_index(drop=True)
    tensors = images_dir / "tensors.npy"
    shape = tuple(np.load(tensors, mmap_mode="r").shape[1:])
    if list(shape) != list(model.input_spec["shape"]):
        raise PredictError(f"{tensors}: images are {list(shape)} but the model takes {model.input_spec['shape']}")
    rows = index["row"].to_numpy(np.int64)
    data = SplitData(tensors, {SPLIT: rows}, {SPLIT: np.zeros(len(rows), np.int64)},
                     {SPLIT: index["modality"].astype(str).to_numpy()}, {SPLIT: int(index["patient_key"].nunique())},
                     shape)
    _, device = init_distributed(params.device)
    probs = score_split(_loaded(str(model.path), model.model_sha256, str(device)), data, SPLIT, device,
                        params.batch_size)
    return index.assign(score=probs[:, -1].astype(float))


@functools.lru_cache(maxsize=2)
def _loaded(path: str, sha256: str, device: str):
    """The network of ``path`` on ``device``, loaded once per process (keyed by its hash: a replaced file reloads).

    A served predict flow or a benchmark scores many batches with one model: loading it each time would
    dominate a single study's latency.
    """
    net, _ = models.load_model(Path(path), map_location=device)
    return net.to(device).eval()


def _previous_studies(path: Path) -> set[str]:
    try:
        return set(pd.read_csv(path, usecols=["study_uid"])["study_uid"].astype(str))
    except (OSError, ValueError):  # no earlier run (or an unreadable file): every study is new
        return set()


def score_quantiles(scores: pd.Series) -> dict[str, float]:
    """The score distribution as its deciles (what the flow's artifact and a drift check compare)."""
    values = np.quantile(scores.to_numpy(float), np.linspace(0, 1, 11)) if len(scores) else []
    return {f"q{10 * i:02d}": round(float(v), 4) for i, v in enumerate(values)}


def _decision(score: pd.Series, threshold: float) -> pd.Series:
    # at or above the threshold is positive, as evaluate's operating point counts it
    return np.where(score >= threshold, POSITIVE, NEGATIVE)


def _image_rows(scored: pd.DataFrame, model: Model) -> pd.DataFrame:
    columns = ["image_id", "patient_key", "study_uid", "series_uid", "modality", "site", "score"]
    frame = scored[[c for c in columns if c in scored.columns]].copy()
    frame["decision"] = _decision(frame["score"], model.threshold)
    return frame.sort_values(["study_uid", "image_id"], ignore_index=True)


def _study_rows(images: pd.DataFrame, aggregation: str, threshold: float) -> pd.DataFrame:
    grouped = images.groupby("study_uid", sort=True)
    studies = grouped.agg(patient_key=("patient_key", "first"), n_images=("image_id", "size"),
                          modalities=("modality", lambda m: "|".join(sorted(set(m)))),
                          score=("score", aggregation)).reset_index()
    studies["decision"] = _decision(studies["score"], threshold)
    return studies


def _csv(frame: pd.DataFrame) -> str:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.6f", lineterminator="\n")
    return buffer.getvalue()


def _original_headers(source: Source, inputs_csv: Path, manifest: pd.DataFrame, pseudo: deid.Pseudonymizer,
                      ingest_params: ingest.IngestParams) -> dict[str, Dataset]:
    """The original header (no pixels) of every scored instance, by its pseudonymised SOP Instance UID.

    Each input file of an ingested image is read again and kept only where its UIDs' pseudonyms are
    the ones the manifest holds: a result cannot be attached to the wrong study (e.g. a file changed
    since ingest).
    """
    import pydicom

    wanted = {row.image_id: (row.study_uid, row.series_uid, set(row.sop_instance_uids))
              for row in manifest.itertuples(index=False)}
    headers: dict[str, Dataset] = {}
    with open(inputs_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["image_id"] not in wanted:
                continue
            study, series, instances = wanted[row["image_id"]]
            for item in row["input"].split("|"):
                data, _ = source.read(item, int(ingest_params.max_file_mb * MB))
                if data is None:
                    continue
                try:
                    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
                    uids = (pseudo.uid(str(ds.StudyInstanceUID)), pseudo.uid(str(ds.SeriesInstanceUID)),
                            pseudo.uid(str(ds.SOPInstanceUID)))
                except Exception:  # noqa: BLE001 - unreadable since ingest: its result cannot be mapped back
                    continue
                if uids[0] == study and uids[1] == series and uids[2] in instances:
                    headers[uids[2]] = ds
    return headers


def _uid_rows(headers: dict[str, Dataset], pseudo: deid.Pseudonymizer) -> list[tuple[str, str, str]]:
    """(level, pseudonymised UID, original UID) of every study, series and instance in ``headers``."""
    rows = set()
    for ds in headers.values():
        for level, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
                               ("instance", "SOPInstanceUID")):
            rows.add((level, pseudo.uid(str(ds[keyword].value)), str(ds[keyword].value)))
    order = {"study": 0, "series": 1, "instance": 2}
    return sorted(rows, key=lambda r: (order[r[0]], r[1]))


def _write_captures(sc_dir: Path, scores: pd.DataFrame, manifest: pd.DataFrame, headers: dict[str, Dataset],
                    model: Model, images_dir: Path, params: PredictParams) -> int:
    """One Grad-CAM Secondary Capture per study (:func:`pipeline.sc.gradcam_capture`) of its
    highest-scoring image, into ``sc_dir``; how many."""
    import torch

    from pipeline import report, sc

    top = scores.sort_values(["score", "image_id"], ascending=[False, True]).groupby("study_uid", sort=True).head(1)
    sops = manifest.set_index("image_id")["sop_instance_uids"]
    tensors = np.load(images_dir / "tensors.npy", mmap_mode="r")
    _, device = init_distributed(params.device)
    net = _loaded(str(model.path), model.model_sha256, str(device))
    backbone = torch.load(model.path, map_location="cpu", weights_only=True)["backbone"]
    version = str(model.version) if model.version is not None else f"sha256:{model.model_sha256[:12]}"
    written = 0
    for row in top.itertuples(index=False):
        uids = [u for u in sops.get(row.image_id, []) if u in headers]
        if not uids:
            continue
        image = np.asarray(tensors[row.row], np.float32)
        cam = report.gradcam(net, backbone, torch.from_numpy(image[None]), len(model.classes) - 1)[0]
        capture = sc.gradcam_capture(headers[uids[len(uids) // 2]], image, cam, score=float(row.score),
                                     threshold=model.threshold, positive_class=model.classes[-1],
                                     model_name=model.card.get("name") or "medtl", model_version=version,
                                     model_sha256=model.model_sha256)
        buffer = io.BytesIO()
        capture.save_as(buffer, enforce_file_format=True)
        name = hashlib.sha256(row.study_uid.encode()).hexdigest()[:16]
        atomic_write_bytes(sc_dir / f"{name}.dcm", buffer.getvalue())
        written += 1
    return written


def _write_reports(sr_dir: Path, studies: pd.DataFrame, manifest: pd.DataFrame, headers: dict[str, Dataset],
                   model: Model, aggregation: str) -> int:
    """One Structured Report per study (:func:`pipeline.sr.study_report`) into ``sr_dir``; how many."""
    from pipeline import sr

    by_study = manifest.groupby("study_uid")["sop_instance_uids"].agg(lambda s: [u for uids in s for u in uids])
    version = str(model.version) if model.version is not None else f"sha256:{model.model_sha256[:12]}"
    written = 0
    for study in studies.itertuples(index=False):
        evidence = [headers[u] for u in by_study.get(study.study_uid, []) if u in headers]
        if not evidence:
            continue
        report = sr.study_report(evidence, score=study.score, threshold=model.threshold,
                                 positive_class=model.classes[-1], model_name=model.card.get("name") or "medtl",
                                 model_version=version, model_sha256=model.model_sha256, aggregation=aggregation)
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        name = hashlib.sha256(study.study_uid.encode()).hexdigest()[:16]  # no UID (PHI-adjacent) in the name
        atomic_write_bytes(sr_dir / f"{name}.dcm", buffer.getvalue())
        written += 1
    return written

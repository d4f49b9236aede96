"""``medtl validate``: external validation of a frozen model on a new labelled cohort (e.g. another site).

The cohort goes through the same ingest and preprocess code as training data (:func:`pipeline.predict.prepare`,
with the model's own preprocess params); every image is scored as one test split; and evaluate's metrics,
patient-bootstrap intervals, calibration, subgroups and report are computed with the model's FROZEN
operating threshold (the one evaluate chose on its own validation split). Nothing is refitted: a
threshold tuned on the external data would flatter the model. The report says it is an external
validation; ``validation.json`` records the model (version, hashes) and the cohort's counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline import evaluate, ingest, keys, paths
from pipeline.fanout import FanoutParams
from pipeline.io_utils import atomic_write_text
from pipeline.predict import prepare, resolve_model
from pipeline.sources import Source


def run(params: evaluate.EvaluateParams, input_dir: Path | Source, labels_csv: Path, out_dir: Path, *,
        model_path: Path | None = None, registry: Path = Path(paths.REGISTRY_DIR), work_dir: Path | None = None,
        local_dir: Path | None = None, key: bytes | keys.SiteKey | None = None,
        ingest_params: ingest.IngestParams | None = None, fanout: FanoutParams | None = None,
        lesions_csv: Path | None = None) -> evaluate.EvaluateSummary:
    """Score a frozen model (``model_path`` or the champion) on a labelled cohort; write evaluate's outputs.

    Args:
        params: the ``evaluate`` section (bootstrap, subgroups, Grad-CAM examples; its threshold method is
            not used: the threshold is frozen).
        input_dir, labels_csv: the external cohort and its labels (as ingest reads them).
        out_dir: ``metrics.json``, ``predictions.csv``, ``subgroups.json``, ``report.md``/``.html``,
            ``validation.json``.
        work_dir: de-identified copies and tensors (default ``out_dir/work``).
        local_dir: on-site PHI: quarantine and inputs map (default ``out_dir/../local``).
    """
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "work"
    local_dir = Path(local_dir) if local_dir is not None else out_dir.parent / "local"
    model = resolve_model(model_path, registry)
    _, _, ingested, prepared = prepare(model, input_dir, Path(labels_csv), work_dir, local_dir, key=key,
                                       ingest_params=ingest_params or ingest.IngestParams(), fanout=fanout,
                                       lesions_csv=lesions_csv)
    index = pd.read_parquet(work_dir / "images" / "index.parquet")
    splits = work_dir / "splits.csv"
    atomic_write_text(splits, index.assign(split="test")[["image_id", "patient_key", "label", "split"]]
                      .to_csv(index=False))
    name = model.card.get("name") or model.path.name
    summary = evaluate.run(params, model.path, work_dir / "images", splits, out_dir,
                           card_path=model.path.parent / paths.MODEL_CARD,
                           frozen_threshold=model.threshold_record,
                           title=f"External validation: {name}" + (f" v{model.version}" if model.version else ""))
    atomic_write_text(out_dir / "validation.json", json.dumps({
        "external_validation": True,
        "model": {"name": name, "version": model.version, "model_sha256": model.model_sha256,
                  "card_sha256": model.card_sha256},
        "threshold": {**model.threshold_record, "frozen": True},
        "cohort": {"files_seen": ingested.files_seen, "ingested_files": ingested.ingested,
                   "rejected_files": ingested.rejected, "images": summary.test_images,
                   "patients": summary.test_patients, "preprocess_rejected": prepared.rejected},
        "test_auc": summary.test_auc, "test_auc_ci": summary.test_auc_ci,
        "sensitivity": summary.test_sensitivity, "specificity": summary.test_specificity,
    }, indent=2) + "\n")
    return summary

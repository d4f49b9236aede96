"""The ``evaluate`` stage: the numbers a promotion decision is made on, and a report people read.

Scores the trained model on the validation split (where the operating threshold is chosen) and on
the held-out test split, then writes to ``out_dir`` (``reports/``):

- ``metrics.json`` (DVC metrics): per split AUC, PR-AUC, sensitivity, specificity, PPV, NPV, F1,
  accuracy, balanced accuracy, confusion matrix, Brier score, ECE, counts, and 95% CIs from a
  seeded bootstrap over patients; the threshold and how it was chosen;
- ``subgroups.json``: the same at the fixed threshold per site, manufacturer and modality, with counts;
- ``plots/``: ``roc.csv``, ``pr.csv``, ``calibration.csv`` and ``confusion.csv`` (DVC plots);
- ``predictions.csv``: one row per scored image (pseudonymised keys only);
- ``report.md``, ``report.html`` and ``figures/`` (:mod:`pipeline.report`).

With lesion ground truth (``images_dir/lesions.parquet``, :mod:`pipeline.lesions`), binary tasks also get
``test.localisation``: the share of ALL true-positive test images with ground truth whose Grad-CAM
maximum lies inside a lesion, with a patient-bootstrap CI (also as the flat scalars
``test.localisation_hit_rate`` and ``_ci_lo``/``_ci_hi``), and the pointing game (within the lesion or
half a cell of the Grad-CAM layer's grid: ``test.localisation_pointing_game``). Ground truth never
enters any other metric.

Binary tasks get every metric above; with more than two classes, ``metrics.json`` holds macro
one-vs-rest AUC and PR-AUC (with patient-bootstrap CIs), per-class AUC, accuracy and the confusion
matrix of the most probable class.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import lesions, metrics, models
from pipeline.data import DataError, SplitData, load_splits
from pipeline.device import DEVICES, init_distributed
from pipeline.inference import score_split
from pipeline.io_utils import atomic_write_text, csv_text, remove_stale_temps
from pipeline.params import check, param

log = logging.getLogger(__name__)

SUBGROUP_COLUMNS = ("site", "manufacturer", "modality")


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate`` section of params.yaml.

    Attributes:
        threshold: how the operating point is chosen on the validation split: ``youden`` (max
            sensitivity + specificity - 1) or ``sensitivity`` (highest threshold reaching
            ``target_sensitivity``).
        target_sensitivity: for ``threshold: sensitivity``.
        n_boot: patient-bootstrap resamples for every CI.
        ci_level: confidence level of the intervals.
        seed: bootstrap seed.
        calibration_bins: equal-width probability bins of the reliability curve and ECE.
        subgroups: index columns to break the test metrics down by (missing ones are skipped).
        gradcam_examples: Grad-CAM overlays per category (true positive, false positive, false negative).
        batch_size: inference batch size.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    threshold: str = param("youden", choices=metrics.THRESHOLD_METHODS)
    target_sensitivity: float = param(0.9, min=0, min_exclusive=True, max=1)
    n_boot: int = param(1000, min=1)
    ci_level: float = param(0.95, min=0, min_exclusive=True, max=1, max_exclusive=True)
    seed: int = param(0, min=0)
    calibration_bins: int = param(10, min=1, max=1000)
    subgroups: tuple[str, ...] = SUBGROUP_COLUMNS
    gradcam_examples: int = param(3, min=0)
    batch_size: int = param(32, min=1)
    device: str = param("auto", choices=DEVICES)

    def __post_init__(self):
        check(self, "evaluate")


@dataclass
class EvaluateSummary:
    classes: list[str]
    threshold: float | None
    test_auc: float
    test_auc_ci: list[float]
    test_sensitivity: float | None
    test_specificity: float | None
    test_images: int
    test_patients: int
    report: str


def run(params: EvaluateParams, model_path: Path, images_dir: Path, splits_csv: Path, out_dir: Path, *,
        card_path: Path | None = None, live_dir: Path | None = None, report: bool = True,
        frozen_threshold: dict | None = None, title: str | None = None) -> EvaluateSummary:
    """Evaluate ``model_path`` on the validation and test splits and write the outputs listed above.

    Args:
        params: the ``evaluate`` section.
        model_path: ``models/model.pt`` of the train stage.
        images_dir: preprocess output (``tensors.npy``, ``index.parquet``).
        splits_csv: split output.
        out_dir: ``reports/``.
        card_path: the model card to include in the report (default: beside the model).
        live_dir: DVCLive directory of the training curves (default: ``live/`` beside the model).
        report: also build ``report.md``/``report.html`` with figures.
        frozen_threshold: external validation (``medtl validate``): the model's threshold as evaluate
            chose it on its own validation split (``metrics.json``'s ``threshold``), applied unchanged;
            only the test split is scored (it may be all there is) and nothing is refitted.
        title: the report's title (default: "Evaluation report: <model name>").
    """
    model_path, images_dir, out_dir = Path(model_path), Path(images_dir), Path(out_dir)
    remove_stale_temps(out_dir)  # what a killed run left
    card_path = Path(card_path or model_path.parent / "model_card.json")
    live_dir = Path(live_dir or model_path.parent / "live")
    _, device = init_distributed(params.device)
    model, meta = models.load_model(model_path, map_location="cpu")
    model.to(device)
    classes = list(meta["classes"])
    scored = ("val", "test") if frozen_threshold is None else ("test",)
    data = load_splits(images_dir, Path(splits_csv), tuple(classes),
                       required=("train", "val") if frozen_threshold is None else ())
    expected = list(meta["input_spec"]["shape"])
    if list(data.image_shape) != expected:
        raise DataError(f"{images_dir / 'tensors.npy'}: images are {list(data.image_shape)} but {model_path} "
                         f"expects {expected}; rerun preprocess with the model's input spec or retrain")
    if len(data.rows["test"]) == 0:
        raise DataError(f"{splits_csv}: the test split is empty; nothing to evaluate")

    index = pd.read_parquet(images_dir / "index.parquet").set_index("row")
    probs = {s: score_split(model, data, s, device, params.batch_size) for s in scored}
    frames = {s: _frame(index, data, s, probs[s], classes) for s in scored}
    alpha = 1 - params.ci_level
    result: dict = {"classes": classes, "ci_level": params.ci_level, "n_boot": params.n_boot}
    ground_truth = lesions.read(images_dir)  # localisation only: never a label
    if len(classes) == 2:
        result["positive_class"] = classes[1]  # before the threshold: metrics.json keeps its key order
        if frozen_threshold is None:
            threshold = metrics.choose_threshold(frames["val"]["y_true"], frames["val"]["score"], params.threshold,
                                                 params.target_sensitivity)
            result["threshold"] = {"method": params.threshold, "value": threshold, "chosen_on": "val",
                                   **({"target_sensitivity": params.target_sensitivity}
                                      if params.threshold == "sensitivity" else {})}
        else:
            threshold = float(frozen_threshold["value"])
            result["threshold"] = {**frozen_threshold, "frozen": True}
        for frame in frames.values():
            frame["predicted"] = (frame["score"] >= threshold).astype(int)
        for split, frame in frames.items():
            result[split] = metrics.evaluate_split(frame["y_true"], frame["score"], frame["patient_key"], threshold,
                                                   n_boot=params.n_boot, seed=params.seed, alpha=alpha,
                                                   n_bins=params.calibration_bins)
        test = frames["test"]
        subgroups = metrics.subgroup_table(test, list(params.subgroups), y_col="y_true", score_col="score",
                                           patient_col="patient_key", threshold=threshold, n_boot=params.n_boot,
                                           seed=params.seed)
        roc_band = metrics.roc_band(test["y_true"], test["score"], test["patient_key"], n_boot=params.n_boot,
                                    seed=params.seed, alpha=alpha)
        _write_plots(out_dir / "plots", test, result["test"], [classes[int(p)] for p in test["predicted"]])
        if ground_truth is not None:
            found = _localisation(model, meta["backbone"], test, ground_truth, np.load(data.tensors, mmap_mode="r"),
                                  params, alpha)
            result["test"]["localisation"] = found
            result["test"]["localisation_hit_rate"] = found["hit_rate"]
            result["test"]["localisation_hit_rate_ci"] = [found["ci_low"], found["ci_high"]]
            result["test"]["localisation_pointing_game"] = found["pointing_game"]["hit_rate"]
    elif frozen_threshold is not None:
        raise DataError(f"{model_path}: external validation with a frozen threshold is for binary models")
    else:
        threshold, subgroups, roc_band = None, [], []
        for split, frame in frames.items():
            result[split] = _multiclass(frame, probs[split], params, alpha)
        _write_plots(out_dir / "plots", frames["test"], None, [classes[i] for i in probs["test"].argmax(1)])

    lean = {k: v for k, v in result.items() if k not in ("val", "test")}
    for split in scored:
        lean[split] = {k: v for k, v in result[split].items() if k != "calibration_curve"}
        # `dvc metrics show` / `dvc exp show` display scalars only: each interval also as two numbers
        for key, value in list(lean[split].items()):
            if key.endswith("_ci") and isinstance(value, list) and len(value) == 2:
                lean[split][f"{key}_lo"], lean[split][f"{key}_hi"] = value
    atomic_write_text(out_dir / "metrics.json", json.dumps(lean, indent=2) + "\n")
    atomic_write_text(out_dir / "subgroups.json", json.dumps({"test": subgroups}, indent=2) + "\n")
    predictions = pd.concat([frames[s] for s in scored], ignore_index=True)
    columns = ["image_id", "patient_key", "split", "label", "y_true", "score",
               *(["predicted"] if threshold is not None else [f"prob_{c}" for c in classes])]
    atomic_write_text(out_dir / "predictions.csv", predictions[columns].to_csv(index=False, float_format="%.6f"))

    report_path = ""
    if report and len(classes) == 2:
        from pipeline import report as report_module

        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        paths = report_module.build_report(
            out_dir, metrics={**result, "roc_band": {"test": roc_band},
                              "roc": {"test": metrics.roc_points(test["y_true"], test["score"])},
                              "subgroups": {"test": subgroups}},
            predictions=predictions, history=read_history(live_dir), card=card, model=model.cpu(),
            backbone=meta["backbone"], tensors=np.load(data.tensors, mmap_mode="r"),
            n_examples=params.gradcam_examples, lesions=ground_truth, title=title)
        report_path = str(paths["markdown"])
    test_metrics = result["test"]
    summary = EvaluateSummary(classes, threshold, test_metrics["auc"], test_metrics["auc_ci"],
                              test_metrics.get("sensitivity"), test_metrics.get("specificity"),
                              test_metrics["n_images"], test_metrics["n_patients"], report_path)
    log.info("test: AUC %.3f [%.3f, %.3f] on %d images of %d patients", summary.test_auc, *summary.test_auc_ci,
             summary.test_images, summary.test_patients)
    return summary


def _localisation(model: torch.nn.Module, backbone: str, test: pd.DataFrame, ground_truth: pd.DataFrame,
                  tensors: np.ndarray, params: EvaluateParams, alpha: float) -> dict:
    """Grad-CAM localisation on every true-positive test image with ground truth (:mod:`pipeline.lesions`).

    Args:
        model: the classifier; Grad-CAM explains its positive-class (index 1) score.
        backbone: picks the layer (the registry entry's ``gradcam_layer``).
        test: the test frame with ``row``, ``patient_key``, ``y_true`` and ``predicted`` (at the threshold).
        ground_truth: the lesions table (tensor rows, centres and radii in tensor pixels).
        tensors: (N, 3, H, W) images that ``row`` indexes.
    """
    from pipeline import report

    true_positive = test[(test["y_true"] == 1) & (test["predicted"] == 1)]
    scored = true_positive[true_positive["row"].isin(ground_truth["row"])]
    rows = scored["row"].to_numpy()
    maps = report.gradcam(model, backbone, torch.from_numpy(np.asarray(tensors[rows], np.float32)), 1) if len(rows) \
        else np.zeros((0, *tensors.shape[2:]), np.float32)
    hit = lesions.hits(maps, rows, ground_truth)
    found = lesions.hit_rate(hit, scored["patient_key"].to_numpy(), n_boot=params.n_boot, seed=params.seed,
                             alpha=alpha)
    stride = report.gradcam_stride(model, backbone, tensors.shape[2:])
    near = lesions.hits(maps, rows, ground_truth, tolerance_px=stride / 2)
    pointing = lesions.hit_rate(near, scored["patient_key"].to_numpy(), n_boot=params.n_boot, seed=params.seed,
                                alpha=alpha)
    found.update(n_true_positives=len(true_positive), layer=models.backbone(backbone).gradcam_layer,
                 pointing_game={"tolerance_px": stride / 2, "layer_stride_px": stride,
                                **{k: pointing[k] for k in ("hit_rate", "ci_low", "ci_high", "n_hits")}})
    log.info("localisation: Grad-CAM maximum inside the lesion on %d of %d true positives with ground truth (of %d)",
             found["n_hits"], found["n_images"], len(true_positive))
    return found


def _frame(index: pd.DataFrame, data: SplitData, split: str, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    rows = data.rows[split]
    keep = [c for c in ("image_id", "patient_key", "label", *SUBGROUP_COLUMNS) if c in index.columns]
    frame = index.loc[rows, keep].reset_index()
    frame["split"] = split
    frame["y_true"] = data.labels[split] if len(classes) > 2 else (data.labels[split] == 1).astype(int)
    frame["score"] = probs[:, 1] if len(classes) == 2 else probs.max(1)
    if len(classes) > 2:
        for i, name in enumerate(classes):
            frame[f"prob_{name}"] = probs[:, i]
    return frame


def _multiclass(frame: pd.DataFrame, probs: np.ndarray, params: EvaluateParams, alpha: float) -> dict:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    y = frame["y_true"].to_numpy()
    disc = metrics.discrimination(y, probs)
    boot = metrics.patient_bootstrap(y, probs, frame["patient_key"], lambda yb, pb: metrics.discrimination(yb, pb)["auc"],
                                     n_boot=params.n_boot, seed=params.seed, alpha=alpha)
    predicted = probs.argmax(1)
    return {**disc, "auc_ci": boot["ci"], "accuracy": float((predicted == y).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "confusion_matrix": confusion_matrix(y, predicted, labels=range(probs.shape[1])).tolist(),
            "n_images": len(y), "n_patients": int(frame["patient_key"].nunique())}


def _write_plots(plots_dir: Path, test: pd.DataFrame, test_metrics: dict | None, predicted: list[str]) -> None:
    """DVC plot data of the test split: ROC, PR, calibration (binary) and the per-image confusion pairs."""
    if test_metrics is not None:
        roc = metrics.roc_points(test["y_true"], test["score"])
        atomic_write_text(plots_dir / "roc.csv", csv_text(["fpr", "tpr", "threshold"],
                                                          [(p["fpr"], p["tpr"], p["threshold"]) for p in roc]))
        pr = metrics.pr_points(test["y_true"], test["score"])
        atomic_write_text(plots_dir / "pr.csv", csv_text(["recall", "precision", "threshold"],
                                                         [(p["recall"], p["precision"], p["threshold"]) for p in pr]))
        curve = test_metrics["calibration_curve"]
        atomic_write_text(plots_dir / "calibration.csv", csv_text(
            ["mean_predicted", "fraction_positive", "count"],
            [(b["mean_predicted"], b["fraction_positive"], b["count"]) for b in curve]))
    atomic_write_text(plots_dir / "confusion.csv", csv_text(["actual", "predicted"], zip(test["label"], predicted)))


def read_history(live_dir: Path) -> list[dict] | None:
    """Per-epoch training curves from the train stage's DVCLive directory (None if absent)."""
    base = Path(live_dir) / "plots" / "metrics"
    files = {"train_loss": base / "train/loss.tsv", "val_loss": base / "val/loss.tsv", "val_auc": base / "val/auc.tsv"}
    if not all(f.exists() for f in files.values()):
        return None
    merged = None
    for name, path in files.items():
        frame = pd.read_csv(path, sep="\t")[["step", path.stem]].rename(columns={path.stem: name})
        merged = frame if merged is None else merged.merge(frame, on="step")
    merged["epoch"] = merged["step"] + 1
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in merged.drop(columns="step").to_dict("records")]


_TABLE_ROWS = (("AUC", "auc", "auc_ci"), ("PR-AUC", "pr_auc", "pr_auc_ci"),
               ("Sensitivity", "sensitivity", "sensitivity_ci"), ("Specificity", "specificity", "specificity_ci"),
               ("PPV", "ppv", None), ("NPV", "npv", None), ("Accuracy", "accuracy", None),
               ("Balanced accuracy", "balanced_accuracy", None), ("Brier score", "brier", None), ("ECE", "ece", None))


def metrics_table(result: dict) -> str:
    """A markdown table of ``metrics.json``: test value with its CI, and validation, per metric."""
    def fmt(value) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    level = int(round(100 * result.get("ci_level", 0.95)))
    lines = [f"| metric | test | {level}% CI (patients) | validation |", "|---|---|---|---|"]
    test, val = result["test"], result.get("val", {})
    for name, key, ci_key in _TABLE_ROWS:
        if key not in test:
            continue
        ci = test.get(ci_key) if ci_key else None
        lines.append(f"| {name} | {fmt(test[key])} | {f'[{fmt(ci[0])}, {fmt(ci[1])}]' if ci else ''} | "
                     f"{fmt(val.get(key))} |")
    lines.append(f"| images / patients | {test['n_images']} / {test['n_patients']} | | "
                 f"{val.get('n_images', '')} / {val.get('n_patients', '')} |")
    if "threshold" in result:
        lines.append(f"| threshold ({result['threshold']['method']}, on validation) | "
                     f"{fmt(result['threshold']['value'])} | | |")
    return "\n".join(lines)

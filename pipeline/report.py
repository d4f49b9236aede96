"""The evaluation report people read: figures, ``report.md`` and a self-contained ``report.html``.

:func:`build_report` takes what the evaluate stage computed (metrics, per-image predictions, training
curves, the model card) plus the model and the image tensors, and writes to ``out_dir``:

- ``figures/roc.png``, ``confusion.png``, ``calibration.png``, ``training.png`` (when there is a
  training history) and ``gradcam_tp.png``, ``gradcam_fp.png``, ``gradcam_fn.png``: Grad-CAM overlays
  on the test split's highest-scoring true and false positives and lowest-scoring false negatives;
- ``figures/gradcam_examples.json``: which images those overlays show, in order;
- with lesion ground truth (``lesions``): its circles drawn on the overlays, each map's maximum marked,
  and the localisation hit rate that evaluate measured on all true positives beside them;
- ``report.md`` with relative figure links, and ``report.html``, the same page with every figure
  inlined as a base64 data URI so the single file can be mailed or attached anywhere.

PHI: images are named only by pseudonymised keys (an ``image_id`` prefix; ``patient_key`` in the
sidecar JSON). Of ``predictions`` only ``image_id``, ``patient_key``, ``split``, ``y_true``, ``score``,
``predicted`` and ``row`` are read, so any other column never reaches a report file.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (Agg canvas, no pyplot state,
nothing to close) and stored as 256-colour PNGs (Pillow, a matplotlib dependency) to stay small.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from pipeline import formatting, models
from pipeline.formatting import cell, interval, missing, num, table
from pipeline.io_utils import atomic_write_bytes, atomic_write_text
from pipeline.lesions import peaks as map_peaks

log = logging.getLogger(__name__)

DPI = 110
GRADCAM_BATCH = 8
FLAT_TOLERANCE = 1e-4
#: Grad-CAM categories: (key, figure title, how examples are ranked).
CATEGORIES = (("tp", "True positives", "highest scores"),
              ("fp", "False positives", "highest scores"),
              ("fn", "False negatives", "lowest scores"))
NONE_TEXT = "none in the test split"
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; }
pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
code { font-size: 0.9em; }
summary { cursor: pointer; }
"""


def gradcam(model: torch.nn.Module, backbone: str, images: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM heat maps of one class with MONAI's :class:`~monai.visualize.GradCAM`.

    Runs on a copy of ``model``: MONAI registers hooks it never removes and turns off the target ReLU's
    ``inplace``, and neither should outlive this call. Works with frozen parameters and under an outer
    ``torch.no_grad()``. MONAI's default post-processing maps the largest value to 0 (an inverted heat
    map), so each map is min-max scaled to [0, 1] here instead; a flat map (no location preferred, e.g.
    a 1 x 1 feature map, as EfficientNet's stride-16 layer gives for 16 x 16 inputs) becomes all zeros.

    Args:
        model: a :class:`pipeline.models.Classifier` of ``backbone``.
        backbone: a :data:`pipeline.models.REGISTRY` name; its entry's ``gradcam_layer`` is explained.
        images: (N, 3, H, W) float in [0, 1], any float dtype and device.
        class_index: the class whose logit is explained.

    Returns:
        (N, H, W) float32 maps in [0, 1] at the input resolution.

    Raises:
        ValueError: for an unknown backbone.
    """
    from monai.visualize import GradCAM

    layer = models.backbone(backbone).gradcam_layer
    probe = copy.deepcopy(model).eval()
    device = next(probe.parameters()).device
    cam = GradCAM(probe, layer, postprocessing=_unit_range)
    maps = [np.zeros((0, *images.shape[2:]), np.float32)]
    with torch.enable_grad():
        for start in range(0, len(images), GRADCAM_BATCH):
            # An input that needs gradients makes the target layer's output need them too, frozen or not.
            x = images[start:start + GRADCAM_BATCH].to(device, torch.float32).requires_grad_(True)
            maps.append(cam(x, class_idx=class_index)[:, 0].detach().cpu().numpy().astype(np.float32))
    return np.concatenate(maps)


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (1, H, W) map of (N, 1, H, W) ``maps`` (>= 0) to [0, 1]; flat maps become 0.

    A map counts as flat when it varies by less than :data:`FLAT_TOLERANCE` of its maximum: bilinear
    upsampling of a 1 x 1 map is constant only up to rounding, which min-max scaling would blow up to noise.
    """
    flat = maps.flatten(1)
    low, high = (v.view(-1, 1, 1, 1) for v in (flat.min(1).values, flat.max(1).values))
    span = high - low
    scaled = (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny)
    return torch.where(span > FLAT_TOLERANCE * high, scaled, torch.zeros_like(maps))


def build_report(out_dir: Path, *, metrics: dict, predictions: pd.DataFrame, history: list[dict] | None,
                 card: dict, model: torch.nn.Module, backbone: str, tensors: np.ndarray,
                 n_examples: int = 3, lesions: pd.DataFrame | None = None, title: str | None = None) -> dict[str, Path]:
    """Write the figures, ``report.md`` and ``report.html`` of a binary classifier's evaluation.

    Args:
        out_dir: the evaluate stage's output directory; figures go to ``out_dir/figures``.
        metrics: ``classes``, ``positive_class``, ``threshold`` (``method``, ``value``, ``chosen_on``),
            ``test`` and ``val`` (:func:`pipeline.metrics.evaluate_split` dicts), ``roc`` (``{"test":
            roc_points}``), optionally ``roc_band`` (``{"test": roc_band}``) and ``subgroups``
            (``{"test": subgroup_table rows}``).
        predictions: one row per scored image with ``image_id``, ``patient_key``, ``split``, ``y_true``
            (1 = positive class), ``score``, ``predicted`` (0/1 at the threshold) and ``row`` (index into
            ``tensors``). Other columns are ignored.
        history: per-epoch ``{"epoch", "train_loss", "val_loss", "val_auc"}``; None or empty: no
            training figure.
        card: the train stage's model card ({} if there is none).
        model: the trained classifier (any device).
        backbone: its backbone name (a :data:`pipeline.models.REGISTRY` name).
        tensors: (N, 3, H, W) images in [0, 1] (float16, possibly a memmap) that ``row`` indexes.
        n_examples: Grad-CAM examples per category.
        lesions: ground truth in tensor pixels (``row``, ``centre_row``, ``centre_col``, ``radius_px``; see
            :mod:`pipeline.lesions`), drawn as circles on the overlays; None: no ground truth.
        title: the report's title (default: "Evaluation report: <model name>").

    Returns:
        ``{"markdown", "html", "gradcam_examples"}`` and one entry per figure (``roc``, ``confusion``,
        ``calibration``, ``training`` when drawn, ``gradcam_tp``, ``gradcam_fp``, ``gradcam_fn``): paths.
    """
    report_title = title  # ``title`` is reused for the figures below
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    classes = list(metrics["classes"])
    positive = metrics["positive_class"]
    class_index = classes.index(positive)
    negative = next(c for c in classes if c != positive)
    test_metrics = metrics["test"]
    test = predictions.loc[predictions["split"] == "test",
                           ["image_id", "patient_key", "y_true", "score", "predicted", "row"]]
    level = test_metrics.get("ci_level", 0.95)

    drawn = {
        "roc": _roc_figure(test_metrics, metrics["roc"]["test"], (metrics.get("roc_band") or {}).get("test") or [],
                           level),
        "confusion": _confusion_figure(test_metrics, negative, positive),
        "calibration": _calibration_figure(test_metrics, test["y_true"].to_numpy(), test["score"].to_numpy()),
    }
    if history:
        drawn["training"] = _training_figure(history)
    examples = _select_examples(test, n_examples)
    images = np.asarray(tensors[pd.concat(examples.values())["row"].to_numpy()], np.float32)  # (M, 3, H, W)
    maps = gradcam(model, backbone, torch.from_numpy(images), class_index)
    start = 0
    for key, title, ranking in CATEGORIES:
        rows = examples[key]
        shown = slice(start, start + len(rows))
        captions = [f"{r.image_id[:8]}  score {r.score:.3f}" for r in rows.itertuples()]
        circles = None if lesions is None else [
            lesions.loc[lesions["row"] == row, ["centre_row", "centre_col", "radius_px"]].to_numpy(float)
            for row in rows["row"]]
        drawn[f"gradcam_{key}"] = _gradcam_figure(f"{title} ({ranking})", images[shown], maps[shown], captions,
                                                  circles)
        start += len(rows)

    paths: dict[str, Path] = {}
    png: dict[str, bytes] = {}
    for name, figure in drawn.items():
        paths[name] = figures_dir / f"{name}.png"
        png[f"figures/{name}.png"] = formatting.png(figure, dpi=DPI)
        atomic_write_bytes(paths[name], png[f"figures/{name}.png"])
    sidecar = {"class": positive, "layer": models.backbone(backbone).gradcam_layer,
               "examples": {key: [{"image_id": r.image_id, "patient_key": r.patient_key, "score": float(r.score)}
                                  for r in examples[key].itertuples()] for key, _, _ in CATEGORIES}}
    paths["gradcam_examples"] = figures_dir / "gradcam_examples.json"
    atomic_write_text(paths["gradcam_examples"], json.dumps(sidecar, indent=2) + "\n")

    title = report_title or f"Evaluation report: {card.get('name') or backbone}"
    text = _markdown(title, metrics, negative, positive, history, card, examples, backbone)
    paths["markdown"] = out_dir / "report.md"
    atomic_write_text(paths["markdown"], text)
    paths["html"] = out_dir / "report.html"
    atomic_write_text(paths["html"], _html(title, text, png))
    log.info("report: %s and %s with %d figures", paths["markdown"], paths["html"].name, len(drawn))
    return paths


def _select_examples(test: pd.DataFrame, n: int) -> dict[str, pd.DataFrame]:
    """Up to ``n`` test rows per category of :data:`CATEGORIES`, in display order (ties by image_id)."""
    positive, called = test["y_true"] == 1, test["predicted"] == 1
    masks = {"tp": (positive & called, False), "fp": (~positive & called, False), "fn": (positive & ~called, True)}
    return {key: test[mask].sort_values(["score", "image_id"], ascending=[ascending, True], kind="stable").head(n)
            for key, (mask, ascending) in masks.items()}


# ---------------------------------------------------------------------------------------------------- figures

def _roc_figure(test_metrics: dict, roc: list[dict], band: list[dict], level: float) -> Figure:
    fig = Figure(figsize=(4.6, 4.4), layout="constrained")
    ax = fig.add_subplot()
    if band:
        ax.fill_between([p["fpr"] for p in band], [p["tpr_lo"] for p in band], [p["tpr_hi"] for p in band],
                        color="tab:blue", alpha=0.18, linewidth=0, label=f"{level:.0%} CI (patient bootstrap)")
    ax.plot([p["fpr"] for p in roc], [p["tpr"] for p in roc], color="tab:blue", linewidth=2,
            label=f"AUC {num(test_metrics['auc'])} {interval(test_metrics.get('auc_ci'))}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.plot(1 - test_metrics["specificity"], test_metrics["sensitivity"], "o", color="tab:red", markersize=7,
            label=f"threshold {num(test_metrics['threshold'])}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title="ROC, test split")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _confusion_figure(test_metrics: dict, negative: str, positive: str) -> Figure:
    matrix = np.asarray(test_metrics["confusion_matrix"])  # [[tn, fp], [fn, tp]]
    fig = Figure(figsize=(3.8, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=14,
                color="white" if count > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], [negative, positive])
    ax.set_yticks([0, 1], [negative, positive])
    ax.set(xlabel="predicted", ylabel="actual", title=f"Test split at threshold {num(test_metrics['threshold'])}")
    return fig


def _calibration_figure(test_metrics: dict, y_true: np.ndarray, scores: np.ndarray) -> Figure:
    fig = Figure(figsize=(4.6, 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve = test_metrics["calibration_curve"]
    counts = np.array([b["count"] for b in curve], dtype=float)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.plot([b["mean_predicted"] for b in curve], [b["fraction_positive"] for b in curve], color="tab:blue")
    top.scatter([b["mean_predicted"] for b in curve], [b["fraction_positive"] for b in curve],
                s=20 + 200 * counts / max(counts.max(initial=0), 1), color="tab:blue", zorder=3,
                label="bins (size ∝ images)")
    top.set(ylim=(-0.02, 1.02), ylabel="fraction positive",
            title=f"Calibration, test: Brier {num(test_metrics['brier'])} · ECE {num(test_metrics['ece'])}")
    top.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, 21)
    bottom.hist([scores[y_true == 0], scores[y_true == 1]], bins=edges, stacked=True,
                color=["tab:grey", "tab:orange"], label=["actual negative", "actual positive"])
    bottom.set(xlim=(0, 1), xlabel="predicted probability of the positive class", ylabel="images")
    bottom.legend(fontsize=7)
    return fig


def _training_figure(history: list[dict]) -> Figure:
    def column(key: str) -> list[float]:
        return [math.nan if h.get(key) is None else float(h[key]) for h in history]

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(7.6, 3.2), layout="constrained")
    loss, auc = fig.subplots(1, 2)
    loss.plot(epochs, column("train_loss"), "o-", label="train")
    loss.plot(epochs, column("val_loss"), "o-", label="validation")
    loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss.legend(fontsize=8)
    auc.plot(epochs, column("val_auc"), "o-", color="tab:green")
    auc.set(xlabel="epoch", ylabel="AUC", ylim=(0, 1.02), title="Validation AUC")
    for ax in (loss, auc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _gradcam_figure(title: str, images: np.ndarray, maps: np.ndarray, captions: list[str],
                    circles: list[np.ndarray] | None = None) -> Figure:
    """One panel per (3, H, W) image: its channel mean in grey under its (H, W) map; a text panel if none.

    ``circles``: per image, (k, 3) ground-truth lesions (centre row, centre col, radius; tensor pixels),
    drawn as white circles, with the map's maximum marked by a cross (the point the hit rate tests).
    """
    fig = Figure(figsize=(2.5 * max(len(images), 1), 2.9), layout="constrained")
    fig.suptitle(title, fontsize=10)
    if not len(images):
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, NONE_TEXT, ha="center", va="center", fontsize=11, color="grey")
        ax.set_axis_off()
        return fig
    for k, ax in enumerate(np.atleast_1d(fig.subplots(1, len(images)))):
        ax.imshow(images[k].mean(0), cmap="gray", vmin=0, vmax=1)
        ax.imshow(maps[k], cmap="jet", vmin=0, vmax=1, alpha=0.6 * maps[k])  # cold areas keep the plain image
        if circles is not None:
            for centre_row, centre_col, radius in circles[k]:
                ax.add_patch(Circle((centre_col, centre_row), radius, fill=False, edgecolor="white", linewidth=1.2))
            peak_row, peak_col = map_peaks(maps[k][None])[0]
            ax.plot(peak_col, peak_row, marker="x", color="white", markersize=6, markeredgewidth=1.5)
        ax.set_title(captions[k], fontsize=8, family="monospace")
        ax.set_axis_off()
    return fig


# ---------------------------------------------------------------------------------------------------- text

def _markdown(title: str, metrics: dict, negative: str, positive: str, history: list[dict] | None, card: dict,
              examples: dict[str, pd.DataFrame], backbone: str) -> str:
    test, val = metrics["test"], metrics.get("val") or {}
    threshold = metrics["threshold"]
    level = f"{test.get('ci_level', 0.95):.0%} CI"
    lines = [
        f"# {cell(title)}", "",
        f"**Test AUC {num(test['auc'])} {interval(test.get('auc_ci'))}** · sensitivity {num(test['sensitivity'])} "
        f"{interval(test.get('sensitivity_ci'))} · specificity {num(test['specificity'])} "
        f"{interval(test.get('specificity_ci'))} at threshold {num(threshold['value'])} · "
        f"{test['n_images']} images of {test['n_patients']} patients ({test['n_positive']} positive)", "",
        f"Positive class: **{cell(positive)}** (negative: {cell(negative)}). Intervals are {level}s from a "
        f"bootstrap over patients ({test.get('n_boot', '–')} resamples), so images of one patient count together.",
        "",
        "## Test metrics", "",
    ]
    rows = [[name, num(test.get(key)), interval(test.get(f"{key}_ci")), num(val.get(key))]
            for name, key in (("AUC", "auc"), ("PR-AUC (average precision)", "pr_auc"), ("Sensitivity", "sensitivity"),
                              ("Specificity", "specificity"), ("PPV", "ppv"), ("NPV", "npv"), ("F1", "f1"),
                              ("Accuracy", "accuracy"), ("Balanced accuracy", "balanced_accuracy"),
                              ("Brier score", "brier"), ("ECE", "ece"))]
    rows += [[name, str(test[key]), "", str(val.get(key, "–"))]
             for name, key in (("Images", "n_images"), ("Patients", "n_patients"), ("Positive images", "n_positive"))]
    lines += table(["Metric", "Test", level, "Validation"], rows)

    how = {"youden": "maximises sensitivity + specificity − 1",
           "sensitivity": f"the highest threshold reaching sensitivity ≥ {num(threshold.get('target_sensitivity'))}"}
    chosen_on = {"val": "the validation split"}.get(threshold.get("chosen_on"), cell(threshold.get("chosen_on")))
    if threshold.get("frozen"):
        chosen_on = "the model's own validation split when it was evaluated (frozen: nothing is refitted on this data)"
    lines += ["## Operating threshold", "",
              f"**{num(threshold['value'])}**, method `{cell(threshold['method'])}` "
              f"({how.get(threshold['method'], 'as configured')}), chosen on {chosen_on} and applied unchanged to "
              f"the test split. An image is called {cell(positive)} when its score is at or above it.", ""]

    lines += ["## ROC curve", "", "![ROC curve of the test split](figures/roc.png)", "",
              "## Confusion matrix", "", "![Confusion matrix of the test split](figures/confusion.png)", "",
              "## Calibration", "",
              "Points on the diagonal mean a predicted probability of *p* comes true for a fraction *p* of images.",
              "", "![Calibration of the test split](figures/calibration.png)", "",
              "## Training", ""]
    lines += (["![Training curves](figures/training.png)", ""] if history
              else ["No training history was found, so there is no training-curve figure.", ""])

    lines += ["## Subgroups (test split)", ""]
    subgroups = (metrics.get("subgroups") or {}).get("test") or []
    if subgroups:
        lines += table(
            ["Group", "Value", "Images", "Patients", "Positives", f"AUC [{level}]", "Sensitivity", "Specificity"],
            [[cell(r["group"]), cell("(missing)" if missing(r["value"]) else r["value"]), str(r["n_images"]),
              str(r["n_patients"]), str(r["n_positive"]),
              num(r["auc"]) + (f" {interval(r['auc_ci'])}" if r.get("auc_ci") else ""),
              num(r["sensitivity"]), num(r["specificity"])] for r in subgroups])
    else:
        lines += ["No subgroup breakdown was computed.", ""]

    lines += ["## Grad-CAM examples", "",
              "*Grad-CAM shows where the model looked, not why it decided: a plausible map is not evidence "
              "that a prediction is right.*", "",
              f"Heat maps of the **{cell(positive)}** score from layer `{models.backbone(backbone).gradcam_layer}`, "
              "over the image's channel mean; captions give the image id prefix and the score.", ""]
    lines += _localisation_text(test.get("localisation"), level)
    for key, name, ranking in CATEGORIES:
        found = examples[key]
        note = f"{len(found)} shown, {ranking} first." if len(found) else "None in the test split."
        lines += [f"### {name}", "", note, "", f"![{name}](figures/gradcam_{key}.png)", ""]

    lines += ["## Model card", ""] + _card_summary(card)
    lines += ["---", "",
              "Images are identified only by pseudonymised keys (image id prefixes); no names, identifiers, dates "
              "or other identifying DICOM header values appear in this report.", ""]
    return "\n".join(lines)


def _localisation_text(found: dict | None, level: str) -> list[str]:
    """The localisation hit rate paragraph (nothing without lesion ground truth)."""
    if not found:
        return []
    rate = num(found["hit_rate"])
    ci = "" if found.get("ci_low") is None else f" {interval([found['ci_low'], found['ci_high']])} ({level})"
    return [f"**Localisation: hit rate {rate}{ci}** — the Grad-CAM maximum lies inside the ground-truth lesion on "
            f"{found['n_hits']} of {found['n_images']} true-positive test images with ground truth "
            f"({found['n_true_positives']} true positives in all; {found['n_patients']} patients; "
            f"CI: {found.get('ci_method', 'patient bootstrap')}). White circles: ground truth; white cross: the "
            "map's maximum.", ""] + _pointing_text(found.get("pointing_game"), level)


def _pointing_text(game: dict | None, level: str) -> list[str]:
    if not game or game.get("hit_rate") is None:
        return []
    ci = "" if game.get("ci_low") is None else f" {interval([game['ci_low'], game['ci_high']])} ({level})"
    return [f"Pointing game (the maximum within the lesion or {game['tolerance_px']:g} px of it: half a cell of the "
            f"Grad-CAM layer's {game['layer_stride_px']:g}-px grid): {game['hit_rate']:.3f}{ci}.", ""]


def gradcam_stride(model: torch.nn.Module, backbone: str, image_shape: tuple[int, ...]) -> float:
    """Input pixels per cell of the Grad-CAM layer's feature map, for an (H, W) input (H used)."""
    layer = model.get_submodule(models.backbone(backbone).gradcam_layer)
    seen: list[tuple[int, ...]] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        was_training = model.training
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *image_shape[-2:]))
        model.train(was_training)
    finally:
        handle.remove()
    return float(image_shape[-2]) / seen[0][-2]


def _card_summary(card: dict) -> list[str]:
    """A readable table of the card's main fields, then the whole card as collapsed JSON."""
    if not card:
        return ["No model card was found.", ""]
    weights = card.get("weights") or {}
    spec = card.get("input_spec") or {}
    data = card.get("data") or {}
    validation = card.get("validation") or {}
    training = card.get("training") or {}
    code = card.get("code_version") or {}
    fields = {
        "Name": card.get("name"),
        "Backbone": card.get("backbone"),
        "Pretrained weights": weights and _weights_text(weights),
        "Transfer strategy": card.get("strategy"),
        "Input": spec and f"{' × '.join(map(str, spec.get('shape', [])))} ({spec.get('layout', '–')}), "
                          f"range {spec.get('range', '–')}",
        "Classes": spec.get("classes") and ", ".join(map(str, spec["classes"])),
        "Training data": data.get("images") and ", ".join(
            f"{split} {n} images / {(data.get('patients') or {}).get(split, '–')} patients"
            for split, n in data["images"].items()),
        "Model selection": validation and (
            f"epoch {validation.get('best_epoch', '–')}, validation AUC {num(validation.get('auc'))} "
            f"({validation.get('selection', '–')})"),
        "Training run": training and (
            f"{training.get('epochs_run', '–')} epochs{' (stopped early)' if training.get('stopped_early') else ''} "
            f"on {training.get('device', '–')}, {training.get('wall_s', '–')} s"),
        "Code version": code and ", ".join(f"{k} {v}" for k, v in code.items() if v is not None),
        "Intended use": card.get("intended_use"),
        "Limitations": card.get("limitations") and "; ".join(map(str, card["limitations"])),
    }
    lines = table(["Field", "Value"], [[name, cell(value)] for name, value in fields.items() if value])
    body = json.dumps(card, indent=2, default=str)
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", body)), default=0))
    return lines + ["<details>", "<summary>Full model card (JSON)</summary>", "",
                    f"{fence}json", body, fence, "", "</details>", ""]


def _weights_text(weights: dict) -> str:
    """The card's ``weights`` entry in one line: what, from where, how much loaded, which file."""
    if weights.get("pretrained") == "none":
        return "none (random initialisation, trained from scratch)"
    parts = [f"{weights.get('pretrained', '–')} (from {weights.get('source', '–')})"]
    if weights.get("backbone_tensors"):
        loaded = weights.get("backbone_tensors_loaded", "–")
        parts.append(f"{loaded}/{weights['backbone_tensors']} backbone tensors loaded")
    if weights.get("sha256"):
        parts.append(f"SHA-256 {weights['sha256'][:12]}…")
    return ", ".join(parts)


def _html(title: str, markdown_text: str, png: dict[str, bytes]) -> str:
    """``markdown_text`` as one HTML page; images in ``png`` (by relative link) inlined as data URIs."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])

    def inline(match: re.Match) -> str:
        data = base64.b64encode(png[match.group(1)]).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+)"', inline, body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")

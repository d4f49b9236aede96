"""The evaluation report: figures that exist and are linked, headline numbers, the right Grad-CAM
examples, a self-contained HTML file, and nothing but pseudonymised keys."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import metrics, models, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
THRESHOLD = 0.5
FIGURES = ("roc", "confusion", "calibration", "training", "gradcam_tp", "gradcam_fp", "gradcam_fn")
# Test split, two images per patient: (y_true, score). At 0.5: TP 0.95, 0.85, 0.70, 0.60; FN 0.30, 0.20;
# FP 0.80, 0.55; TN the rest.
TEST_IMAGES = [(1, 0.70), (0, 0.80), (1, 0.30), (0, 0.10), (1, 0.95), (0, 0.40),
               (0, 0.55), (1, 0.60), (0, 0.05), (1, 0.20), (1, 0.85), (0, 0.25)]
VAL_IMAGES = [(1, 0.90), (0, 0.20), (1, 0.65), (0, 0.35), (0, 0.60), (1, 0.45), (0, 0.15), (1, 0.75)]


def _key(prefix: str, i: int) -> str:
    return prefix + hashlib.sha256(f"{prefix}{i}".encode()).hexdigest()[:16]


def make_predictions(test_images=TEST_IMAGES) -> pd.DataFrame:
    """20 images of 10 patients: val first, then test; ``row`` indexes the tensors in that order."""
    images = [("val", *v) for v in VAL_IMAGES] + [("test", *t) for t in test_images]
    frame = pd.DataFrame(images, columns=["split", "y_true", "score"])
    frame["row"] = np.arange(len(frame))
    frame["image_id"] = [_key("", i) for i in range(len(frame))]
    frame["patient_key"] = [_key("P-", i // 2).upper() for i in range(len(frame))]
    frame["label"] = np.where(frame["y_true"] == 1, "lesion", "normal")
    frame["predicted"] = (frame["score"] >= THRESHOLD).astype(int)
    frame["modality"] = "DX"
    frame["site"] = np.where(frame.index // 4 % 2 == 0, "site-a", "site-b")
    frame["patient_name"] = "DOE^JANE"  # a header value that must never reach the report
    return frame


def make_metrics(predictions: pd.DataFrame) -> dict:
    test, val = (predictions[predictions["split"] == s] for s in ("test", "val"))
    return {
        "classes": ["normal", "lesion"],
        "positive_class": "lesion",
        "threshold": {"method": "youden", "value": THRESHOLD, "chosen_on": "val"},
        **{name: metrics.evaluate_split(frame["y_true"], frame["score"], frame["patient_key"], THRESHOLD, n_boot=50)
           for name, frame in (("test", test), ("val", val))},
        "roc_band": {"test": metrics.roc_band(test["y_true"], test["score"], test["patient_key"], n_boot=50)},
        "roc": {"test": metrics.roc_points(test["y_true"], test["score"])},
        "subgroups": {"test": metrics.subgroup_table(test, ["site", "modality"], patient_col="patient_key",
                                                     threshold=THRESHOLD, n_boot=50)},
    }


HISTORY = [{"epoch": 1, "train_loss": 0.69, "val_loss": 0.70, "val_auc": 0.55},
           {"epoch": 2, "train_loss": 0.60, "val_loss": 0.66, "val_auc": None},
           {"epoch": 3, "train_loss": 0.52, "val_loss": 0.64, "val_auc": 0.71}]
CARD = {"name": "medtl-efficientnet-lite0-finetune", "backbone": "efficientnet-lite0",
        "weights": {"pretrained": "none", "source": "none", "sha256": None}, "strategy": "finetune",
        "input_spec": {"shape": [3, 32, 32], "layout": "C, H, W", "range": [0, 1], "classes": ["normal", "lesion"]},
        "intended_use": "Research only.", "limitations": ["Tiny synthetic test data."]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest and keeps a shared machine's other cores free."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> models.Classifier:
    torch.manual_seed(0)
    return models.build_model(models.ModelParams(pretrained="none"), 2)[0].eval()


@pytest.fixture(scope="module")
def tensors() -> np.ndarray:
    return np.random.default_rng(0).random((20, 3, 32, 32)).astype(np.float16)


@pytest.fixture(scope="module")
def built(model, tensors, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    predictions = make_predictions()
    result = make_metrics(predictions)
    paths = report.build_report(out, metrics=result, predictions=predictions, history=HISTORY, card=CARD,
                                model=model, backbone="efficientnet-lite0", tensors=tensors)
    return out, paths, result, predictions


def test_every_figure_is_a_png_linked_from_the_markdown(built):
    out, paths, _, _ = built
    text = paths["markdown"].read_text()
    for name in FIGURES:
        data = (out / "figures" / f"{name}.png").read_bytes()
        assert paths[name] == out / "figures" / f"{name}.png"
        assert data.startswith(PNG_MAGIC) and len(data) < 200_000, name
        assert f"](figures/{name}.png)" in text, name
    assert paths["markdown"] == out / "report.md" and paths["html"] == out / "report.html"


def test_headline_gives_test_auc_with_its_ci_and_the_operating_point(built):
    _, paths, result, _ = built
    test = result["test"]
    lo, hi = test["auc_ci"]
    headline = paths["markdown"].read_text().splitlines()[2]
    assert f"Test AUC {test['auc']:.3f} [{lo:.3f}, {hi:.3f}]" in headline
    assert f"sensitivity {test['sensitivity']:.3f}" in headline and f"specificity {test['specificity']:.3f}" in headline
    assert "12 images of 6 patients" in headline


def test_html_is_self_contained_and_shows_the_same_numbers(built):
    _, paths, result, _ = built
    page = paths["html"].read_text()
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert f"Test AUC {result['test']['auc']:.3f}" in page
    assert "<table>" in page and "Full model card (JSON)" in page


def test_gradcam_examples_are_the_extreme_scores_of_each_category(built):
    out, paths, _, predictions = built
    chosen = json.loads(paths["gradcam_examples"].read_text())["examples"]
    test = predictions[predictions["split"] == "test"].set_index("image_id")["score"]
    assert [test[e["image_id"]] for e in chosen["tp"]] == [0.95, 0.85, 0.70]
    assert [test[e["image_id"]] for e in chosen["fp"]] == [0.80, 0.55]
    assert [test[e["image_id"]] for e in chosen["fn"]] == [0.20, 0.30]
    text = paths["markdown"].read_text()
    assert "### False positives\n\n2 shown, highest scores first." in text


def test_no_false_positives_still_gives_a_figure_and_says_none(model, tensors, tmp_path):
    predictions = make_predictions([(y, min(s, 0.45) if y == 0 else s) for y, s in TEST_IMAGES])
    paths = report.build_report(tmp_path, metrics=make_metrics(predictions), predictions=predictions, history=None,
                                card={}, model=model, backbone="efficientnet-lite0", tensors=tensors, n_examples=2)
    assert paths["gradcam_fp"].read_bytes().startswith(PNG_MAGIC)
    text = paths["markdown"].read_text()
    assert "### False positives\n\nNone in the test split." in text
    assert json.loads(paths["gradcam_examples"].read_text())["examples"]["fp"] == []
    assert "training" not in paths and not (tmp_path / "figures/training.png").exists()
    assert "No training history" in text and "No model card" in text


def test_only_pseudonymised_keys_reach_the_report(built):
    out, paths, _, _ = built
    for path in (paths["markdown"], paths["html"], paths["gradcam_examples"]):
        text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", path.read_text())  # base64 may spell anything
        assert "DOE" not in text, path.name


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "densenet121"])
def test_gradcam_maps_have_the_input_size_and_leave_the_model_untouched(backbone):
    torch.manual_seed(0)
    model = models.build_model(models.ModelParams(backbone=backbone, pretrained="none"), 2)[0].eval()
    model.requires_grad_(False)  # a frozen backbone (linear probe) must still give maps
    before = {name: (len(m._forward_hooks), len(m._backward_hooks), getattr(m, "inplace", None))
              for name, m in model.named_modules()}
    with torch.no_grad():  # as at inference time: gradcam turns gradients back on itself
        maps = report.gradcam(model, backbone, torch.rand(2, 3, 64, 64, dtype=torch.float16), class_index=1)
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() == pytest.approx(1)
    after = {name: (len(m._forward_hooks), len(m._backward_hooks), getattr(m, "inplace", None))
             for name, m in model.named_modules()}
    assert after == before


def test_gradcam_hot_spots_are_the_highest_raw_values_and_flat_maps_are_zero(model):
    from monai.visualize import GradCAM

    x = torch.rand(2, 3, 64, 64)
    raw = GradCAM(copy.deepcopy(model), models.backbone("efficientnet-lite0").gradcam_layer, postprocessing=lambda m: m)
    raw = raw(x, class_idx=1)[:, 0].detach().numpy()
    low, high = raw.min((1, 2), keepdims=True), raw.max((1, 2), keepdims=True)
    maps = report.gradcam(model, "efficientnet-lite0", x, class_index=1)
    np.testing.assert_allclose(maps, (raw - low) / (high - low), atol=1e-5)  # not MONAI's default inversion
    # A flat map (a 1 x 1 feature map upsampled: constant up to rounding) prefers no location: no heat drawn.
    flat = torch.full((2, 1, 32, 32), 0.3) + 1e-7 * torch.rand(2, 1, 32, 32)
    flat[1] = torch.rand(1, 32, 32)
    scaled = report._unit_range(flat)
    assert not scaled[0].any() and scaled[1].max() == pytest.approx(1)


def test_gradcam_names_an_unknown_backbone():
    with pytest.raises(ValueError, match="resnet50"):
        report.gradcam(torch.nn.Identity(), "resnet50", torch.zeros(1, 3, 32, 32), class_index=1)


def test_ground_truth_circles_and_the_hit_rate_sit_beside_the_overlays(model, tensors, tmp_path, built):
    predictions = make_predictions()
    result = make_metrics(predictions)
    result["test"]["localisation"] = {"hit_rate": 0.75, "ci_low": 0.25, "ci_high": 1.0, "n_images": 4, "n_hits": 3,
                                      "n_patients": 3, "n_true_positives": 4, "ci_method": "patient bootstrap",
                                      "layer": models.backbone("efficientnet-lite0").gradcam_layer}
    truth = pd.DataFrame({"row": predictions["row"], "image_id": predictions["image_id"], "centre_row": 10.0,
                          "centre_col": 20.0, "radius_px": 5.0})
    paths = report.build_report(tmp_path, metrics=result, predictions=predictions, history=HISTORY, card=CARD,
                                model=model, backbone="efficientnet-lite0", tensors=tensors, lesions=truth)
    text = paths["markdown"].read_text()
    assert "**Localisation: hit rate 0.750 [0.250, 1.000] (95% CI)**" in text
    assert "3 of 4 true-positive test images" in text
    assert text.index("## Grad-CAM examples") < text.index("Localisation: hit rate") < text.index("### True positives")
    with_circles = paths["gradcam_tp"].read_bytes()
    assert with_circles.startswith(PNG_MAGIC) and with_circles != (built[0] / "figures/gradcam_tp.png").read_bytes()
    assert "Localisation" not in built[1]["markdown"].read_text(), "no ground truth: no localisation text"


def test_gradcam_stride_is_the_layer_grid_of_the_input():
    from pipeline import models, report

    model, _ = models.build_model(models.ModelParams(pretrained="none"), num_classes=2)
    assert models.backbone("efficientnet-lite0").gradcam_layer == "net._blocks.4"
    assert report.gradcam_stride(model, "efficientnet-lite0", (160, 160)) == 16.0

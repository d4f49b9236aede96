"""medtl predict: new, unlabelled studies through the training code paths, scored by a frozen model."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from pipeline import ingest, models, predict, preprocess
from pipeline.errors import MedtlError
from tests.conftest import TEST_KEY

SIZE = 32
PREPROCESS = {"size": SIZE, "channels": 3, "window": {"CT": "lung", "default": "percentile"}, "workers": 1}
THRESHOLD = 0.5


def _model_dir(root: Path, threshold: float | None = THRESHOLD) -> Path:
    """A model as the registry keeps one: model.pt, its card, and metrics.json with the frozen threshold."""
    out = root / "version"
    out.mkdir(parents=True)
    torch.manual_seed(0)
    model, _ = models.build_model(models.ModelParams(), num_classes=2)  # ImageNet features: scores that vary
    with torch.no_grad():
        model.net._fc.weight.mul_(300)  # the new head starts near uniform: spread its scores over (0, 1)
    spec = {"shape": [3, SIZE, SIZE], "preprocess": PREPROCESS, "classes": ["normal", "lesion"]}
    buffer = io.BytesIO()
    torch.save(models.save_model(model, "efficientnet-lite0", ["normal", "lesion"], spec), buffer)
    (out / "model.pt").write_bytes(buffer.getvalue())
    card = {"name": "medtl-test", "model_file": {"path": "model.pt", "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()},
            "input_spec": spec}
    (out / "model_card.json").write_text(json.dumps(card))
    if threshold is not None:
        (out / "metrics.json").write_text(json.dumps({"threshold": {"method": "youden", "value": threshold,
                                                                    "chosen_on": "val"}}))
    return out


@pytest.fixture(scope="module")
def new_studies(cohort, tmp_path_factory) -> Path:
    """Six patients' folders of the cohort, no labels file, plus one corrupt file."""
    out = tmp_path_factory.mktemp("new") / "studies"
    patients = sorted(p for p in (cohort / "DICOM").glob("*/*") if p.is_dir())[:6]
    for patient in patients:
        shutil.copytree(patient, out / patient.relative_to(cohort / "DICOM"))
    (out / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 300)
    return out


@pytest.fixture(scope="module")
def predicted(new_studies, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model_dir = _model_dir(root)
    summary = predict.run(predict.PredictParams(batch_size=8, device="cpu", secondary_capture=True), new_studies,
                          root / "results",
                          model_path=model_dir / "model.pt", work_dir=root / "work", local_dir=root / "local",
                          key=TEST_KEY, ingest_params=ingest.IngestParams(workers=1))
    return root, model_dir, summary


def test_every_new_image_is_scored_and_every_study_decided_at_the_frozen_threshold(predicted):
    root, _, summary = predicted
    images = pd.read_csv(root / "results/predictions.csv")
    studies = pd.read_csv(root / "results/studies.csv")
    manifest = pd.read_parquet(root / "work/ingest/manifest.parquet")
    assert len(images) == summary["counts"]["images"] > 0 and set(images["image_id"]) <= set(manifest["image_id"])
    counts = summary["counts"]
    assert sum(counts["rejected_files"].values()) >= 1, "the broken file is reported, not fatal"
    assert counts["files_seen"] == counts["ingested_files"] + sum(counts["rejected_files"].values())
    assert summary["threshold"] == {"value": THRESHOLD, "from": "youden on val (metrics.json)"}
    assert ((images["score"] >= THRESHOLD) == (images["decision"] == "positive")).all()
    # a study is as positive as its most positive image (aggregation max)
    expected = images.groupby("study_uid")["score"].max()
    assert np.allclose(studies.set_index("study_uid")["score"].loc[expected.index], expected, atol=1e-6)
    assert ((studies["score"] >= THRESHOLD) == (studies["decision"] == "positive")).all()
    assert summary["counts"]["studies"] == len(studies) == images["study_uid"].nunique()


def test_scores_are_the_models_probabilities_of_the_prepared_tensors(predicted):
    root, model_dir, _ = predicted
    images = pd.read_csv(root / "results/predictions.csv", dtype={"image_id": str})
    index = pd.read_parquet(root / "work/images/index.parquet").set_index("image_id")
    tensors = np.load(root / "work/images/tensors.npy")
    model, _ = models.load_model(model_dir / "model.pt")
    rows = index.loc[images["image_id"], "row"].to_numpy()
    with torch.no_grad():
        probs = model.eval()(torch.from_numpy(tensors[rows].astype(np.float32))).softmax(1)[:, 1].numpy()
    assert np.allclose(images["score"], probs, atol=1e-6)


def test_an_image_gets_bit_identical_tensors_through_the_training_and_the_predict_paths(predicted, new_studies, tmp_path):
    root, _, _ = predicted
    labels = tmp_path / "labels.csv"
    # the training path needs labels: label every image of the new studies by its file, any value
    inputs = pd.read_csv(root / "local/inputs.csv")
    rows = [(p, "normal") for joined in inputs["input"] for p in joined.split("|")]
    pd.DataFrame(rows, columns=["file", "label"]).to_csv(labels, index=False)
    ingest.run(ingest.IngestParams(workers=1), new_studies, labels, tmp_path / "ingest", key=TEST_KEY)
    preprocess.run(preprocess.PreprocessParams(**{**PREPROCESS, "window": dict(PREPROCESS["window"])}),
                   tmp_path / "ingest", tmp_path / "images")
    train_index = pd.read_parquet(tmp_path / "images/index.parquet").set_index("image_id")
    serve_index = pd.read_parquet(root / "work/images/index.parquet").set_index("image_id")
    shared = sorted(set(train_index.index) & set(serve_index.index))
    assert shared and set(serve_index.index) <= set(train_index.index)
    train_t, serve_t = np.load(tmp_path / "images/tensors.npy"), np.load(root / "work/images/tensors.npy")
    for image_id in shared:
        assert np.array_equal(train_t[train_index.loc[image_id, "row"]], serve_t[serve_index.loc[image_id, "row"]])


def test_the_local_map_sends_each_result_back_to_its_original_study_and_no_result_file_holds_phi(predicted, new_studies):
    root, _, _ = predicted
    studies = pd.read_csv(root / "results/studies.csv")
    uids = pd.read_csv(root / "local/uids.csv")
    back = uids[uids["level"] == "study"].set_index("pseudonymised_uid")["original_uid"]
    assert set(studies["study_uid"]) <= set(back.index)
    originals, names = set(), set()
    for path in new_studies.rglob("*"):
        if path.is_file() and path.name != "broken.dcm":
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            originals.add(str(ds.StudyInstanceUID))
            names.add(str(ds.get("PatientName", "")))
    assert set(back.loc[studies["study_uid"]]) <= originals
    for path in (root / "results").iterdir():
        text = path.read_text()
        assert not any(uid in text for uid in originals), path
        assert not any(name and name in text for name in names), path


def test_a_model_without_a_frozen_threshold_or_champion_is_a_clear_error(tmp_path, new_studies):
    model_dir = _model_dir(tmp_path, threshold=None)
    with pytest.raises(MedtlError, match="metrics.json: no operating threshold"):
        predict.resolve_model(model_dir / "model.pt", tmp_path / "registry")
    with pytest.raises(MedtlError, match="no champion yet"):
        predict.resolve_model(None, tmp_path / "registry")
    assert predict.resolve_model(model_dir / "model.pt", tmp_path, threshold=0.3).threshold_from == "given"


def test_each_study_gets_a_structured_report_that_round_trips_and_goes_back_to_the_original_record(
        predicted, new_studies):
    import highdicom as hd

    root, _, summary = predicted
    studies = pd.read_csv(root / "results/studies.csv").set_index("study_uid")
    back = pd.read_csv(root / "local/uids.csv")
    original_of = back[back["level"] == "study"].set_index("pseudonymised_uid")["original_uid"]
    pseudonym_of = {v: k for k, v in original_of.items()}
    headers = {}
    for path in new_studies.rglob("*"):
        if path.is_file() and path.name != "broken.dcm":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            headers.setdefault(str(ds.StudyInstanceUID), ds)
    reports = sorted((root / "local/sr").glob("*.dcm"))
    assert len(reports) == summary["counts"]["structured_reports"] == len(studies)
    for path in reports:
        sr = hd.sr.srread(path)
        study = pseudonym_of[str(sr.StudyInstanceUID)]  # the original study: the report files back into it
        original = headers[str(sr.StudyInstanceUID)]
        assert sr.PatientID == original.PatientID and sr.PatientName == original.PatientName
        assert "not for diagnostic use" in sr.SeriesDescription and sr.VerificationFlag == "UNVERIFIED"
        (group,) = sr.content.get_image_measurement_groups()
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Probability"] == pytest.approx(studies.loc[study, "score"], abs=1e-6)
        assert values["Operating threshold (frozen, chosen on validation)"] == THRESHOLD
        (decision,) = group.get_qualitative_evaluations()
        assert decision.value.meaning == ("Present" if studies.loc[study, "decision"] == "positive" else "Absent")
        referenced = {item.ReferencedSOPInstanceUID
                      for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                      for item in series.ReferencedSOPSequence}
        assert len(referenced) >= studies.loc[study, "n_images"]


def test_validate_scores_a_held_out_site_with_the_frozen_threshold_and_says_it_is_external(cohort, tmp_path):
    from pipeline import evaluate, metrics, validate

    site = tmp_path / "site"
    shutil.copytree(cohort / "DICOM" / "SITE_B", site / "SITE_B")
    labels = tmp_path / "labels.csv"
    shutil.copy(cohort / "labels.csv", labels)  # rows of other sites' studies match nothing here
    model_dir = _model_dir(tmp_path)
    out = tmp_path / "validation"
    summary = validate.run(evaluate.EvaluateParams(n_boot=50, gradcam_examples=1, device="cpu"), site, labels, out,
                           model_path=model_dir / "model.pt", key=TEST_KEY, ingest_params=ingest.IngestParams(workers=1))
    result = json.loads((out / "metrics.json").read_text())
    assert result["threshold"] == {"method": "youden", "value": THRESHOLD, "chosen_on": "val", "frozen": True}
    assert "val" not in result and result["test"]["n_images"] == summary.test_images > 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions["split"]) == {"test"}
    assert result["test"]["auc"] == pytest.approx(metrics.rank_auc(predictions["y_true"].to_numpy(),
                                                                   predictions["score"].to_numpy()), abs=1e-9)
    # nothing refitted: the threshold this data would choose is not the one applied
    refit = metrics.choose_threshold(predictions["y_true"], predictions["score"], "youden")
    assert refit != THRESHOLD and ((predictions["score"] >= THRESHOLD) == (predictions["predicted"] == 1)).all()
    report = (out / "report.md").read_text()
    assert report.startswith("# External validation: medtl-test") and "frozen: nothing is refitted" in report
    record = json.loads((out / "validation.json").read_text())
    assert record["external_validation"] is True and record["cohort"]["images"] == summary.test_images
    index = pd.read_parquet(tmp_path / "validation/work/images/index.parquet")
    assert set(index["site"]) and index["site"].nunique() == 1  # one held-out site, pseudonymised


def test_predict_reports_drift_against_the_cards_training_reference(predicted, new_studies, tmp_path):
    from pipeline import drift

    root, model_dir, _ = predicted
    index = pd.read_parquet(root / "work/images/index.parquet")
    tensors = np.load(root / "work/images/tensors.npy")
    card = json.loads((model_dir / "model_card.json").read_text())
    # a reference of these very images: nothing has drifted; a reference without CT: CT is unseen
    card["data"] = {"drift_reference": drift.reference(tensors, index["row"].to_numpy(), index["modality"].to_numpy())}
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    (copy / "model_card.json").write_text(json.dumps(card))
    summary = predict.run(predict.PredictParams(batch_size=8, device="cpu"), new_studies, tmp_path / "results",
                          model_path=copy / "model.pt", work_dir=root / "work", local_dir=tmp_path / "local",
                          key=TEST_KEY, ingest_params=ingest.IngestParams(workers=1))
    assert summary["drift"]["flag"] is False
    assert set(summary["drift"]["modalities"]) == set(index["modality"])
    card["data"]["drift_reference"].pop("CT", None)
    (copy / "model_card.json").write_text(json.dumps(card))
    if "CT" in set(index["modality"]):
        unseen = predict.run(predict.PredictParams(batch_size=8, device="cpu"), new_studies, tmp_path / "results2",
                             model_path=copy / "model.pt", work_dir=root / "work", local_dir=tmp_path / "local",
                             key=TEST_KEY, ingest_params=ingest.IngestParams(workers=1))
        assert unseen["drift"]["flag"] and unseen["drift"]["modalities"]["CT"]["status"] == "unseen"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_each_study_gets_a_gradcam_secondary_capture_in_its_original_study(predicted, new_studies):
    root, _, summary = predicted
    studies = pd.read_csv(root / "results/studies.csv")
    back = pd.read_csv(root / "local/uids.csv")
    original_of = back[back["level"] == "study"].set_index("pseudonymised_uid")["original_uid"]
    score_of = studies.assign(original=studies["study_uid"].map(original_of)).set_index("original")["score"]
    captures = sorted((root / "local/sc").glob("*.dcm"))
    assert len(captures) == summary["counts"]["secondary_captures"] == len(studies)
    for path in captures:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and ds.Modality == "OT"
        assert ds.StudyInstanceUID in score_of.index, "filed into the original study"
        assert "not for diagnostic use" in ds.SeriesDescription and ds.BurnedInAnnotation == "YES"
        assert ds.SeriesNumber == 9902 and ds.SeriesInstanceUID != ds.StudyInstanceUID
        pixels = ds.pixel_array
        assert ds.PhotometricInterpretation == "RGB" and pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 512
        # the 32 px tensor enlarged 16x (the heat map itself is tested in test_sc.py: at 32 px EfficientNet's
        # Grad-CAM layer is 1 x 1, a flat map), the caption band below it
        assert pixels.shape[0] > SIZE * 16 and pixels[SIZE * 16:].max() > 200 and pixels[SIZE * 16 + 2, 2].max() == 0


def test_every_structured_report_and_capture_passes_dciodvfy_without_errors(predicted):
    import subprocess

    root, _, _ = predicted
    objects = sorted((root / "local/sr").glob("*.dcm")) + sorted((root / "local/sc").glob("*.dcm"))
    assert any(p.parent.name == "sc" for p in objects)
    for path in objects:
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = done.stdout + done.stderr
        assert ("Comprehensive3DSR" if path.parent.name == "sr" else "SC") in report, report
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, "\n".join(errors)

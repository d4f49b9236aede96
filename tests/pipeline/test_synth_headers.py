"""Synth: nothing but the pixels predicts the label (a header-only classifier is at chance)."""

from __future__ import annotations

import csv
import re
from collections import defaultdict

import numpy as np
import pydicom
import pytest

from pipeline import synth

sklearn = pytest.importorskip("sklearn")
from sklearn.feature_extraction import DictVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402

PATIENTS = 120
KEYWORDS = ("Manufacturer", "ManufacturerModelName", "Modality", "Rows", "Columns", "BitsAllocated", "BitsStored",
            "HighBit", "PixelRepresentation", "PhotometricInterpretation", "PixelSpacing", "ImagerPixelSpacing",
            "BodyPartExamined", "SeriesDescription", "ProtocolName", "ImageType", "ViewPosition", "ConvolutionKernel",
            "SliceThickness", "KVP", "XRayTubeCurrent", "Exposure", "WindowCenter", "WindowWidth", "RescaleSlope",
            "RescaleIntercept", "GantryDetectorTilt", "SOPClassUID", "SeriesNumber", "InstitutionName", "StationName",
            "BurnedInAnnotation", "PatientSex", "StudyDescription")


def _study_features(root) -> tuple[dict[str, dict], dict[str, str]]:
    """Study UID -> multi-hot header tokens over all its files; study UID -> patient folder."""
    features: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    patient: dict[str, str] = {}
    counts: dict[str, dict] = defaultdict(lambda: defaultdict(set))
    for path in sorted((root / synth.DICOM_DIR).rglob("*")):
        if not path.is_file() or path.read_bytes()[128:132] != b"DICM":
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study = ds.StudyInstanceUID
        rel = path.relative_to(root / synth.DICOM_DIR).parts
        patient[study] = rel[1]
        f = features[study]
        for keyword in KEYWORDS:
            value = str(ds.get(keyword, ""))
            if keyword == "StudyDescription":  # drop the patient's name: keep the exam words
                value = " ".join(w for w in re.split(r"[ ,^]+", value) if w not in str(ds.PatientName).split("^"))
            f[f"{keyword}={value}"] = 1.0
        f[f"ts={ds.file_meta.TransferSyntaxUID}"] = 1.0
        f[f"site={rel[0]}"] = 1.0
        f[f"series_folder={rel[3]}"] = 1.0 if len(rel) > 4 else 0.0
        f[f"name={rel[-1][:4]}"] = 1.0
        counts[study]["series"].add(ds.SeriesInstanceUID)
        counts[study]["instances"].add(ds.SOPInstanceUID)
    for study, c in counts.items():
        features[study][f"n_series={len(c['series'])}"] = 1.0
        features[study][f"n_instances={len(c['instances'])}"] = 1.0
        features[study]["n_instances"] = len(c["instances"]) / 30.0
    return features, patient


@pytest.mark.slow
def test_a_header_only_classifier_is_at_chance(tmp_path):
    root = tmp_path / "cohort"
    synth.run(synth.SynthParams(patients=PATIENTS, seed=11), root)
    with open(root / synth.LABELS_NAME, newline="") as fh:
        labels = {r["study_instance_uid"]: int(r["label"] == "lesion") for r in csv.DictReader(fh)}
    features, patient = _study_features(root)
    studies = sorted(labels)
    x = DictVectorizer(sparse=False).fit_transform([dict(features[s]) for s in studies])
    y = np.array([labels[s] for s in studies])
    groups = np.array([patient[s] for s in studies])
    scores = np.zeros(len(studies))
    for train, test in StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0).split(x, y, groups):
        model = LogisticRegression(C=1.0, max_iter=2000).fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    auc = roc_auc_score(y, scores)
    # patient bootstrap of the AUC
    rng = np.random.default_rng(0)
    by_patient = defaultdict(list)
    for i, g in enumerate(groups):
        by_patient[g].append(i)
    keys = sorted(by_patient)
    boot = []
    for _ in range(300):
        idx = np.concatenate([by_patient[keys[k]] for k in rng.integers(len(keys), size=len(keys))])
        if 0 < y[idx].sum() < len(idx):
            boot.append(roc_auc_score(y[idx], scores[idx]))
    low, high = np.percentile(boot, [2.5, 97.5])
    assert low <= 0.5 <= high or auc < 0.62, (auc, low, high)

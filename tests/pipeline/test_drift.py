"""The drift signal flags a batch whose model inputs moved, and not one drawn like the training images."""

from __future__ import annotations

import numpy as np

from pipeline import drift


def _images(rng, n: int, level: float, contrast: float = 0.1) -> np.ndarray:
    base = rng.normal(level, 0.05, (n, 1, 1, 1))  # each image its own brightness, as real series vary
    return np.clip(base + rng.normal(0, contrast, (n, 3, 16, 16)), 0, 1).astype(np.float16)


def test_a_batch_like_the_training_images_is_stable_and_a_shifted_one_is_flagged():
    rng = np.random.default_rng(0)
    train = np.concatenate([_images(rng, 150, 0.4), _images(rng, 150, 0.6)])
    modalities = np.array(["CT"] * 150 + ["DX"] * 150)
    reference = drift.reference(train, np.arange(300), modalities)
    assert reference["CT"]["images"] == 150 and len(reference["DX"]["mean"]) == 11

    same = np.concatenate([_images(rng, 60, 0.4), _images(rng, 60, 0.6)])
    batch_modalities = np.array(["CT"] * 60 + ["DX"] * 60)
    calm = drift.compare(reference, same, np.arange(120), batch_modalities)
    assert not calm["flag"] and {e["status"] for e in calm["modalities"].values()} == {"stable"}

    # one modality's inputs brighter (e.g. a CT calibration offset against a fixed window)
    shifted = same.copy()
    shifted[:60] = np.clip(shifted[:60].astype(np.float32) + 0.08, 0, 1)
    moved = drift.compare(reference, shifted, np.arange(120), batch_modalities)
    assert moved["flag"] and moved["modalities"]["CT"]["status"] == "shift"
    assert moved["modalities"]["CT"]["psi"]["mean"] > 0.25 > moved["modalities"]["DX"]["psi"]["mean"]
    assert "SHIFT FLAGGED" in drift.summary_line(moved) and "CT shift" in drift.summary_line(moved)


def test_an_unseen_modality_is_flagged_and_a_small_batch_is_not_judged():
    rng = np.random.default_rng(1)
    reference = drift.reference(_images(rng, 100, 0.5), np.arange(100), np.array(["CT"] * 100))
    batch = _images(rng, 30, 0.5)
    result = drift.compare(reference, batch, np.arange(30), np.array(["MR"] * 25 + ["CT"] * 5))
    assert result["flag"] and result["modalities"]["MR"]["status"] == "unseen"
    assert result["modalities"]["CT"]["status"] == "too few images" and "psi" not in result["modalities"]["CT"]


def test_psi_is_zero_for_the_reference_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(2)
    values = rng.normal(0, 1, 100_000)
    deciles = list(np.quantile(values, np.linspace(0, 1, 11)))
    assert drift.psi(deciles, rng.normal(0, 1, 100_000)) < 0.01
    small, large = drift.psi(deciles, rng.normal(0.3, 1, 50_000)), drift.psi(deciles, rng.normal(1.0, 1, 50_000))
    assert 0.05 < small < large and large > 0.25

"""The promote step: the champion/challenger rule on constructed predictions, then the registry end to end
with tiny models trained on the session's synthetic images."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline import evaluate, metrics, models, promote, train
from pipeline.promote import PromoteParams

# ------------------------------------------------------------------ the rule, on constructed predictions


def _frames(seed: int = 0, n_patients: int = 80, challenger_noise: float = 0.1, champion_noise: float = 0.3):
    """Test-split predictions of two models for the same images (2 per patient); sites a, a, a, b by patient."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), 2)
    y = np.repeat(np.arange(n_patients) % 5 < 2, 2).astype(int)
    base = pd.DataFrame({"image_id": [f"img-{i:04d}" for i in range(len(y))],
                         "patient_key": [f"P-{p:04d}" for p in patient], "y_true": y,
                         "site": np.where(patient % 4 == 3, "site-b", "site-a")})

    def scores(noise: float) -> np.ndarray:
        return np.clip(0.3 + 0.4 * y + rng.normal(0, noise, len(y)), 0, 1)

    return base.assign(score=scores(challenger_noise)), base.drop(columns="site").assign(score=scores(champion_noise))


def test_a_clearly_better_challenger_is_promoted_and_the_reason_gives_the_numbers():
    challenger, champion = _frames()
    comparison = promote.compare(challenger, champion, PromoteParams(n_boot=200))
    assert comparison["challenger_auc"] == pytest.approx(roc_auc_score(challenger["y_true"], challenger["score"]))
    assert comparison["champion_auc"] == pytest.approx(roc_auc_score(champion["y_true"], champion["score"]))
    assert comparison["challenger_auc"] > comparison["champion_auc"] + 0.05
    decision = promote.decide(comparison, PromoteParams())
    assert decision["promote"] is True
    lo, hi = comparison["auc_difference_ci"]
    assert decision["reasons"][0] == (
        f"test AUC {comparison['challenger_auc']:.3f} vs champion {comparison['champion_auc']:.3f} "
        f"({comparison['auc_difference']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f}) on 160 images of 80 patients: "
        "meets the margin 0.000")
    assert any("no subgroup AUC dropped by more than the tolerance 0.050 (2 compared" in r for r in decision["reasons"])
    json.dumps(comparison, allow_nan=False)  # promotion.json stays valid JSON


def test_a_worse_challenger_is_not_promoted():
    champion_like, challenger_like = _frames()
    challenger = challenger_like.assign(site=champion_like["site"])
    comparison = promote.compare(challenger, champion_like.drop(columns="site"), PromoteParams(n_boot=200))
    assert comparison["auc_difference"] < 0 and not comparison["better_by_margin"]
    decision = promote.decide(comparison, PromoteParams())
    assert decision["promote"] is False
    assert decision["reasons"][0].endswith("below the margin 0.000")


def test_a_subgroup_drop_beyond_the_tolerance_blocks_promotion_and_is_named():
    challenger, champion = _frames(challenger_noise=0.02, champion_noise=0.25)
    site_b = (challenger["site"] == "site-b").to_numpy()
    # the challenger is near perfect at site-a (3/4 of the patients) but noisier than the champion at site-b
    noise = np.random.default_rng(1).normal(0, 0.4, site_b.sum())
    challenger.loc[site_b, "score"] = np.clip(0.3 + 0.4 * challenger.loc[site_b, "y_true"] + noise, 0, 1)
    comparison = promote.compare(challenger, champion, PromoteParams(n_boot=100))
    assert comparison["better_by_margin"], "better overall: only the subgroup rule can block it"
    rows = {r["value"]: r for r in comparison["subgroups"]}
    assert rows["site-b"]["regressed"] and not rows["site-a"]["regressed"]
    assert [r["value"] for r in comparison["subgroup_regressions"]] == ["site-b"]
    b = rows["site-b"]
    assert b["difference"] == pytest.approx(b["challenger_auc"] - b["champion_auc"]) and b["difference"] < -0.05

    decision = promote.decide(comparison, PromoteParams())
    assert decision["promote"] is False
    assert (f"site site-b: AUC {b['challenger_auc']:.3f} vs {b['champion_auc']:.3f} ({b['difference']:+.3f}) "
            "exceeds the tolerance 0.050") in decision["reasons"]

    lenient = PromoteParams(subgroup_tolerance=1.0, n_boot=100)
    assert promote.decide(promote.compare(challenger, champion, lenient), lenient)["promote"] is True


def test_small_and_one_class_subgroups_are_listed_as_not_compared():
    challenger, champion = _frames()
    # 4 images from "Tiny" and the negatives of patients 0-39 from "Acme": both unusable for an AUC
    challenger["manufacturer"] = "Big"
    challenger.loc[:3, "manufacturer"] = "Tiny"
    acme = (challenger["y_true"] == 0) & (challenger.index >= 4) & (challenger.index < 80)
    challenger.loc[acme, "manufacturer"] = "Acme"
    challenger.loc[challenger["manufacturer"] != "Big", "score"] = 1 - challenger["score"]  # awful there
    comparison = promote.compare(challenger, champion, PromoteParams(n_boot=50))
    rows = {r["value"]: r for r in comparison["subgroups"] if r["group"] == "manufacturer"}
    assert rows["Tiny"]["n_images"] == 4 and not rows["Tiny"]["compared"] and not rows["Tiny"]["regressed"]
    assert rows["Acme"]["n_positive"] == 0 and not rows["Acme"]["compared"]
    assert rows["Acme"]["challenger_auc"] is None, "undefined AUC is null, not NaN"
    assert rows["Big"]["compared"]
    reasons = promote.decide(comparison, PromoteParams())["reasons"]
    assert any(r.startswith("not compared (under 10 images or one class):") and "manufacturer Tiny (4 images"
               in r and "manufacturer Acme (" in r for r in reasons)


def test_margin_rule_difference_at_least_the_margin_equal_auc_passes_at_margin_zero():
    challenger, champion = _frames()

    def promoted(champion_frame, margin: float) -> bool:
        params = PromoteParams(margin=margin, n_boot=50)
        return promote.decide(promote.compare(challenger, champion_frame, params), params)["promote"]

    tie = champion.assign(score=challenger["score"])
    assert promote.compare(challenger, tie, PromoteParams(n_boot=50))["auc_difference"] == 0
    assert promoted(tie, 0.0) is True, "margin 0: an equal AUC is enough"
    assert promoted(tie, 0.001) is False
    difference = promote.compare(challenger, champion, PromoteParams(n_boot=50))["auc_difference"]
    assert promoted(champion, difference - 0.001) is True
    assert promoted(champion, difference) is True, "exactly the margin is enough"
    assert promoted(champion, difference + 0.001) is False

    # a negative margin accepts a worse AUC, but never a subgroup regression beyond the tolerance
    params = PromoteParams(margin=-1.0, n_boot=50)
    worse = promote.compare(champion.assign(site=challenger["site"]), challenger.drop(columns="site"), params)
    assert worse["auc_difference"] < 0 and worse["better_by_margin"] and worse["subgroup_regressions"]
    decision = promote.decide(worse, params)
    assert decision["promote"] is False and decision["reasons"][0].endswith("meets the margin -1.000")


def test_paired_bootstrap_ci_is_seeded_brackets_the_difference_and_is_paired():
    challenger, champion = _frames()
    first = promote.compare(challenger, champion, PromoteParams(n_boot=300, seed=3))
    again = promote.compare(challenger, champion, PromoteParams(n_boot=300, seed=3))
    other = promote.compare(challenger, champion, PromoteParams(n_boot=300, seed=4))
    assert first["auc_difference_ci"] == again["auc_difference_ci"] != other["auc_difference_ci"]
    lo, hi = first["auc_difference_ci"]
    assert lo < first["auc_difference"] < hi and first["n_boot"] == 300
    # Both models are scored on the same resample: a model compared with a monotone transform of
    # itself differs by exactly 0 on every resample (independent resamples would give a wide interval).
    same = promote.compare(challenger, champion.assign(score=challenger["score"] ** 2), PromoteParams(n_boot=100))
    assert same["auc_difference_ci"] == [0.0, 0.0]


def test_the_difference_and_its_ci_are_metrics_paired_auc_difference_challenger_minus_champion():
    challenger, champion = _frames(seed=5)
    params = PromoteParams(n_boot=150, seed=2)
    comparison = promote.compare(challenger, champion.iloc[::-1], params)  # the champion's row order is irrelevant
    expected = metrics.paired_auc_difference(challenger["y_true"], challenger["score"], champion["score"],
                                             challenger["patient_key"], n_boot=150, seed=2, alpha=1 - promote.CI_LEVEL)
    assert comparison["auc_difference"] == expected["estimate"]
    assert comparison["auc_difference_ci"] == expected["ci"] and comparison["n_boot"] == expected["n_boot"]
    assert comparison["challenger_auc"] == metrics.rank_auc(challenger["y_true"].to_numpy(), challenger["score"].to_numpy())


def test_predictions_of_different_images_or_labels_cannot_be_compared():
    challenger, champion = _frames()
    with pytest.raises(ValueError, match="different test images: 1 only in the challenger's predictions, 0 only"):
        promote.compare(challenger, champion.iloc[1:], PromoteParams(n_boot=10))
    with pytest.raises(ValueError, match="labels of 1 test image"):
        promote.compare(challenger, champion.assign(y_true=champion["y_true"].where(champion.index != 0, 1 -
                                                                                        champion["y_true"])),
                        PromoteParams(n_boot=10))
    with pytest.raises(ValueError, match="twice"):
        promote.compare(challenger, pd.concat([champion, champion.iloc[:1]]), PromoteParams(n_boot=10))


def test_decide_without_a_champion_promotes_the_first_model():
    assert promote.decide(None, PromoteParams()) == {"promote": True, "reasons": ["first model: becomes the champion"]}


# ------------------------------------------------------------------------- run, with real tiny models

EVAL = evaluate.EvaluateParams(n_boot=50, device="cpu")
TINY = {"batch_size": 8, "patience": 0, "workers": 0, "device": "cpu", "channels_last": False}


@pytest.fixture(scope="module")
def trained(tiny_images, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (model.pt, reports dir): ``good`` (ImageNet lite0, 3 epochs) and ``weak`` (random init, lr 1e-30:
    it learns nothing; train.lr must be > 0)."""
    out = {}
    for name, train_params, model_params in (
            ("good", train.TrainParams(epochs=3, **TINY), models.ModelParams()),
            ("weak", train.TrainParams(epochs=1, lr=1e-30, **TINY), models.ModelParams(pretrained="none"))):
        model_dir = tmp_path_factory.mktemp(name)
        train.run(train_params, model_params, *tiny_images, model_dir, progress=False)
        evaluate.run(EVAL, model_dir / "model.pt", *tiny_images, model_dir / "reports", report=False)
        out[name] = (model_dir / "model.pt", model_dir / "reports")
    aucs = {n: json.loads((r / "metrics.json").read_text())["test"]["auc"] for n, (_, r) in out.items()}
    assert aucs["good"] > aucs["weak"] + 0.2, f"the weak model must really score lower: {aucs}"
    return out


def _challenger(trained, name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of a trained model and its reports (run writes promotion.json into the reports)."""
    model = trained[name][0]
    target = tmp_path / f"challenger-{name}-{len(list(tmp_path.glob('challenger-*')))}"
    shutil.copytree(model.parent, target)
    return target / "model.pt", target / "reports"


def _promote(trained, name, tmp_path, tiny_images, registry: Path, images_dir: Path | None = None,
             force: bool = False, **params) -> dict:
    model, reports = _challenger(trained, name, tmp_path)
    return promote.run(PromoteParams(registry=str(registry), n_boot=200, **params), model, reports,
                       images_dir or tiny_images[0], tiny_images[1], evaluate_params=EVAL, force=force)


def _history(registry: Path) -> list[dict]:
    return [json.loads(line) for line in (registry / "history.jsonl").read_text().splitlines()]


def test_first_model_becomes_champion_version_1(trained, tiny_images, tmp_path):
    registry = tmp_path / "registry"
    result = _promote(trained, "good", tmp_path, tiny_images, registry)
    assert result["decision"] == {"promote": True, "reasons": ["first model: becomes the champion"]}
    assert result["comparison"] is None and result["champion_before"] is None and result["champion_after"] == 1

    champion = json.loads((registry / "champion.json").read_text())
    assert champion["version"] == 1 and champion["path"] == "versions/0001"
    version_dir = registry / champion["path"]
    assert sorted(p.name for p in version_dir.iterdir()) == sorted(promote.VERSION_FILES)
    model, reports = trained["good"]
    assert champion["model_sha256"] == models.sha256_file(model) == models.sha256_file(version_dir / "model.pt")
    test_metrics = json.loads((reports / "metrics.json").read_text())["test"]
    assert champion["test_auc"] == test_metrics["auc"] and champion["test_auc_ci"] == test_metrics["auc_ci"]
    card = json.loads((model.parent / "model_card.json").read_text())
    assert champion["code_version"] == card["code_version"]
    assert champion["data_version"] == card["data"]["version_sha256"]
    assert datetime.fromisoformat(champion["promoted_at"]).utcoffset().total_seconds() == 0
    assert champion["decision"] == result["decision"]
    assert [h["promote"] for h in _history(registry)] == [True]
    written = sorted(tmp_path.glob("challenger-good-*/reports/promotion.json"))
    assert json.loads(written[0].read_text()) == result


def test_worse_challenger_is_not_promoted_and_champion_json_is_unchanged(trained, tiny_images, tmp_path, caplog):
    registry = tmp_path / "registry"
    _promote(trained, "good", tmp_path, tiny_images, registry)
    before = (registry / "champion.json").read_bytes()

    with caplog.at_level(logging.INFO, logger="pipeline.promote"):
        result = _promote(trained, "weak", tmp_path, tiny_images, registry)
    comparison = result["comparison"]
    assert comparison["challenger_auc"] < comparison["champion_auc"], "re-scored champion beats the weak model"
    assert comparison["champion_auc"] == pytest.approx(json.loads(before)["test_auc"], abs=1e-6)
    assert comparison["n_images"] == 12 and comparison["n_patients"] == 6
    assert result["decision"]["promote"] is False and "below the margin 0.000" in result["decision"]["reasons"][0]
    assert result["champion_before"] == result["champion_after"] == 1
    assert (registry / "champion.json").read_bytes() == before
    assert sorted(p.name for p in (registry / "versions").iterdir()) == ["0001"]
    assert [h["promote"] for h in _history(registry)] == [True, False]

    logged = [r.getMessage() for r in caplog.records if r.name == "pipeline.promote"]
    assert len(logged) == 1 and logged[0].startswith("promote: not promoted; champion 1 -> 1; test AUC")
    assert "P-" not in logged[0], "no patient keys in the log"


def test_the_champion_itself_is_not_promoted_again(trained, tiny_images, tmp_path):
    registry = tmp_path / "registry"
    _promote(trained, "good", tmp_path, tiny_images, registry)
    result = _promote(trained, "good", tmp_path, tiny_images, registry)
    assert result["comparison"]["auc_difference"] == 0, "re-scoring the champion reproduces its predictions"
    assert result["decision"]["promote"] is False
    assert result["decision"]["reasons"][0].startswith("the challenger is the champion's model (version 1")
    assert json.loads((registry / "champion.json").read_text())["version"] == 1


def test_better_challenger_is_promoted_to_version_2(trained, tiny_images, tmp_path):
    registry = tmp_path / "registry"
    _promote(trained, "weak", tmp_path, tiny_images, registry)
    result = _promote(trained, "good", tmp_path, tiny_images, registry, min_subgroup_images=4)
    comparison = result["comparison"]
    assert comparison["challenger_auc"] > comparison["champion_auc"]
    assert result["decision"]["promote"] is True and result["champion_after"] == 2
    assert any(r["compared"] for r in comparison["subgroups"]) and not comparison["subgroup_regressions"]
    champion = json.loads((registry / "champion.json").read_text())
    assert champion["version"] == 2 and champion["path"] == "versions/0002"
    assert champion["model_sha256"] == models.sha256_file(trained["good"][0])
    assert champion["decision"] == result["decision"]
    assert [(h["promote"], h["champion_after"]) for h in _history(registry)] == [(True, 1), (True, 2)]


def test_a_crash_while_writing_the_pointer_keeps_the_old_champion_and_the_next_promotion_works(
        trained, tiny_images, tmp_path, monkeypatch):
    registry = tmp_path / "registry"
    _promote(trained, "weak", tmp_path, tiny_images, registry)
    before = (registry / "champion.json").read_bytes()
    real_write = promote.atomic_write_text

    def crash_on_pointer(path, text):
        if Path(path).name == "champion.json":
            raise OSError("simulated crash while writing champion.json")
        real_write(path, text)

    monkeypatch.setattr(promote, "atomic_write_text", crash_on_pointer)
    with pytest.raises(OSError, match="simulated crash"):
        _promote(trained, "good", tmp_path, tiny_images, registry)
    monkeypatch.undo()
    assert (registry / "champion.json").read_bytes() == before
    assert json.loads(before)["version"] == 1
    assert (registry / "versions/0002/model.pt").is_file(), "the orphan version the crash left"
    assert len(_history(registry)) == 1, "a decision is recorded only once the pointer is written"
    # and a temporary directory of a process killed mid-copy
    (registry / "versions/.tmp-999-dead").mkdir()
    (registry / "versions/.tmp-999-dead/model.pt").write_bytes(b"partial")

    result = _promote(trained, "good", tmp_path, tiny_images, registry)
    assert result["decision"]["promote"] is True and result["champion_after"] == 3, "version numbers are not reused"
    champion = json.loads((registry / "champion.json").read_text())
    assert champion["path"] == "versions/0003"
    assert models.sha256_file(registry / champion["path"] / "model.pt") == champion["model_sha256"]
    assert [h["champion_after"] for h in _history(registry)] == [1, 3]


def test_a_crash_while_copying_leaves_no_version_and_the_old_champion(trained, tiny_images, tmp_path, monkeypatch):
    registry = tmp_path / "registry"
    _promote(trained, "weak", tmp_path, tiny_images, registry)
    before = (registry / "champion.json").read_bytes()
    real_copy = shutil.copyfile

    def crash_on_last_file(src, dst, **kwargs):
        if Path(dst).name == "subgroups.json":
            raise OSError("simulated disk full")
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(promote.shutil, "copyfile", crash_on_last_file)
    with pytest.raises(OSError, match="disk full"):
        _promote(trained, "good", tmp_path, tiny_images, registry)
    assert (registry / "champion.json").read_bytes() == before
    assert [p.name for p in (registry / "versions").iterdir()] == ["0001"], "the half-copied version was removed"


def test_a_champion_that_cannot_score_the_current_images_blocks_promotion_unless_forced(
        trained, tiny_images, tmp_path):
    registry = tmp_path / "registry"
    _promote(trained, "weak", tmp_path, tiny_images, registry)
    before = (registry / "champion.json").read_bytes()
    images = tmp_path / "images-64"
    shutil.copytree(tiny_images[0], images)
    tensors = np.load(images / "tensors.npy")
    np.save(images / "tensors.npy", np.repeat(np.repeat(tensors, 2, axis=2), 2, axis=3))

    result = _promote(trained, "good", tmp_path, tiny_images, registry, images_dir=images)
    assert result["decision"]["promote"] is False and result["comparison"] is None
    reason = result["decision"]["reasons"][0]
    assert reason.startswith("the champion (version 1) cannot be compared with the challenger")
    assert "expects [3, 32, 32]" in reason
    assert (registry / "champion.json").read_bytes() == before

    forced = _promote(trained, "good", tmp_path, tiny_images, registry, images_dir=images, force=True)
    assert forced["decision"]["promote"] is True and forced["champion_after"] == 2
    assert forced["decision"]["reasons"][-1] == "forced: promoted regardless of the checks above"
    assert json.loads((registry / "champion.json").read_text())["version"] == 2
    assert [(h["promote"], h["forced"]) for h in _history(registry)] == [(True, False), (False, False), (True, True)]


def test_params_reject_values_that_cannot_be_meant():
    with pytest.raises(ValueError, match="subgroup_tolerance"):
        PromoteParams(subgroup_tolerance=-0.1)
    with pytest.raises(ValueError, match="margin"):
        PromoteParams(margin=2)

"""The ``promote`` step: a champion/challenger gate in which a worse model is never promoted.

The challenger is the model the train stage just wrote, with the evaluate stage's outputs. The
champion is the model named by ``<registry>/champion.json``. Because the test split may have changed
since the champion was promoted, the champion is re-scored on the current images and splits, and
both models are compared on the same test images:

- test AUC: the challenger must reach ``champion AUC + margin`` (``challenger - champion >= margin``;
  with the default margin 0 an equal AUC is enough), reported with a paired patient-bootstrap 95% CI
  of the difference (each resample draws patients once and scores both models on it);
- subgroups (site, manufacturer, modality): no subgroup's AUC may drop by more than
  ``subgroup_tolerance``; subgroups under ``min_subgroup_images`` images, or holding one class, are
  listed as not compared.

A model whose file is byte-identical to the champion's is never promoted again. ``force`` promotes
regardless and says so in the reasons.

Registry layout (``registry``)::

    champion.json        the only file readers trust: version, path, promoted_at, model_sha256, ...
    history.jsonl        one JSON line per decision, promoted or not
    versions/0001/       model.pt, model_card.json, metrics.json, subgroups.json of version 1
    versions/0002/ ...

A promotion copies the files into a fresh temporary directory under ``versions/``, fsyncs them,
renames the directory to the next free version number, then replaces ``champion.json`` atomically.
A crash at any point leaves the previous ``champion.json`` valid; a left-over temporary or
unreferenced version directory is ignored by later promotions (numbers are never reused).

Binary classifiers only: the comparison is on the positive-class score of ``predictions.csv``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import evaluate, metrics
from pipeline.evaluate import EvaluateParams
from pipeline.io_utils import atomic_write_text, sha256_file
from pipeline.params import ParamsError, check, load_section, param
from pipeline.paths import Project

log = logging.getLogger(__name__)

VERSION_FILES = ("model.pt", "model_card.json", "metrics.json", "subgroups.json")
CI_LEVEL = 0.95
# AUCs are ratios of integers, but their float differences are not exact (0.81 - 0.76 is
# 0.05000000000000004): a difference equal to the margin or tolerance on paper must count as equal.
_EPS = 1e-9


@dataclass(frozen=True)
class PromoteParams:
    """``promote`` section of params.yaml.

    Attributes:
        margin: the challenger's test AUC minus the champion's must be at least this (0: an equal
            AUC is enough; negative values accept a challenger up to ``-margin`` worse).
        subgroup_tolerance: largest AUC drop allowed in any compared subgroup.
        min_subgroup_images: subgroups with fewer test images (or with one class) are not compared.
        n_boot: resamples of the paired patient bootstrap of the AUC difference.
        seed: bootstrap seed.
        registry: directory of the champion record and the promoted versions.
    """

    margin: float = param(0.0, min=-1, max=1, hint="an AUC difference")
    subgroup_tolerance: float = param(0.05, min=0, max=1)
    min_subgroup_images: int = param(10, min=1)
    n_boot: int = param(1000, min=1)
    seed: int = param(0, min=0)
    registry: str = "registry"

    def __post_init__(self):
        check(self, "promote")
        if not self.registry.strip():
            raise ParamsError("promote.registry: must be a directory, got ''")


# ------------------------------------------------------------------------------------- comparison


def compare(challenger: pd.DataFrame, champion: pd.DataFrame, params: PromoteParams,
            subgroups: Sequence[str] = evaluate.SUBGROUP_COLUMNS) -> dict:
    """Compare two models' test predictions on the same images.

    Args:
        challenger: test rows of the challenger's ``predictions.csv`` (``image_id``, ``patient_key``,
            ``y_true``, ``score``) plus the subgroup columns (e.g. ``site``), which are taken from
            this frame.
        champion: test rows of the champion's ``predictions.csv`` for the same images.
        params: margin, tolerance, minimum subgroup size and bootstrap settings.
        subgroups: columns to break the comparison down by; those missing from ``challenger`` are skipped.

    Returns:
        ``challenger_auc, champion_auc, auc_difference`` (challenger minus champion),
        ``auc_difference_ci`` ([lo, hi], paired patient bootstrap), ``n_images, n_patients, n_boot``
        (resamples used), ``subgroups`` (one dict per column value: ``group, value, n_images,
        n_positive, challenger_auc, champion_auc, difference`` (None where undefined), ``compared,
        regressed``), ``better_by_margin`` and ``subgroup_regressions`` (the regressed subgroup dicts).

    Raises:
        ValueError: if the image sets differ, an image appears twice, the labels disagree, or the
            test AUC is undefined (one class).
    """
    merged = _join(challenger, champion)
    y = merged["y_true"].to_numpy(int)
    scores = merged[["score_challenger", "score_champion"]].to_numpy(float)
    challenger_auc, champion_auc = (metrics.rank_auc(y, scores[:, i]) for i in (0, 1))
    if math.isnan(challenger_auc):
        raise ValueError(f"the {len(y)} test images hold one class: AUC is undefined, nothing to compare")
    boot = metrics.paired_auc_difference(y, scores[:, 0], scores[:, 1], merged["patient_key"].to_numpy(),
                                         n_boot=params.n_boot, seed=params.seed, alpha=1 - CI_LEVEL)
    difference = challenger_auc - champion_auc
    rows = _subgroup_rows(merged, [c for c in subgroups if c in merged.columns], params)
    return {
        "challenger_auc": challenger_auc,
        "champion_auc": champion_auc,
        "auc_difference": difference,
        "auc_difference_ci": _json_ci(boot["ci"]),
        "ci_level": CI_LEVEL,
        "n_boot": boot["n_boot"],
        "n_images": len(merged),
        "n_patients": int(merged["patient_key"].nunique()),
        "subgroups": rows,
        "better_by_margin": bool(difference >= params.margin - _EPS),
        "subgroup_regressions": [r for r in rows if r["regressed"]],
    }


def _join(challenger: pd.DataFrame, champion: pd.DataFrame) -> pd.DataFrame:
    for name, frame in (("challenger", challenger), ("champion", champion)):
        if frame["image_id"].duplicated().any():
            raise ValueError(f"{name} predictions list {int(frame['image_id'].duplicated().sum())} image(s) twice")
    only_challenger = set(challenger["image_id"]) - set(champion["image_id"])
    only_champion = set(champion["image_id"]) - set(challenger["image_id"])
    if only_challenger or only_champion:
        raise ValueError(f"the models were scored on different test images: {len(only_challenger)} only in the "
                         f"challenger's predictions, {len(only_champion)} only in the champion's; re-evaluate "
                         "both on the same splits")
    merged = challenger.merge(champion[["image_id", "y_true", "score"]], on="image_id",
                              suffixes=("_challenger", "_champion"), validate="one_to_one")
    disagree = int((merged["y_true_challenger"] != merged["y_true_champion"]).sum())
    if disagree:
        raise ValueError(f"the labels of {disagree} test image(s) differ between the two predictions "
                         "(another label file or class order); the models cannot be compared")
    return merged.rename(columns={"y_true_challenger": "y_true"})


def _subgroup_rows(merged: pd.DataFrame, columns: list[str], params: PromoteParams) -> list[dict]:
    rows = []
    for column in columns:
        for value, sub in merged.groupby(column, dropna=False, sort=True):
            y = sub["y_true"].to_numpy(int)
            n_positive = int(y.sum())
            compared = len(sub) >= params.min_subgroup_images and 0 < n_positive < len(sub)
            aucs = [metrics.rank_auc(y, sub[c].to_numpy(float)) for c in ("score_challenger", "score_champion")]
            difference = aucs[0] - aucs[1]
            rows.append({
                "group": column,
                "value": None if pd.isna(value) else (value.item() if isinstance(value, np.generic) else value),
                "n_images": len(sub),
                "n_positive": n_positive,
                "challenger_auc": _json_float(aucs[0]),
                "champion_auc": _json_float(aucs[1]),
                "difference": _json_float(difference),
                "compared": bool(compared),
                "regressed": bool(compared and difference < -params.subgroup_tolerance - _EPS),
            })
    return rows


def _json_float(value: float) -> float | None:
    # nan is not JSON; an undefined AUC (one-class subgroup) is written as null
    return None if math.isnan(value) else float(value)


def _json_ci(ci: list[float]) -> list[float] | None:
    return None if any(math.isnan(v) for v in ci) else [float(v) for v in ci]


# --------------------------------------------------------------------------------------- decision


def decide(comparison: dict | None, params: PromoteParams) -> dict:
    """The promotion decision for a comparison (None: there is no champion yet).

    Args:
        comparison: the output of :func:`compare`, or None. Its ``better_by_margin`` and
            ``subgroup_regressions`` are the verdicts; compare it with the same ``params``.
        params: the margin, tolerance and minimum subgroup size named in the reasons.

    Returns:
        ``{"promote": bool, "reasons": [sentences with the numbers behind the decision]}``.
    """
    if comparison is None:
        return {"promote": True, "reasons": ["first model: becomes the champion"]}
    c = comparison
    ci = c["auc_difference_ci"]
    ci_text = (f"{round(100 * c['ci_level'])}% CI {_signed(ci[0])} to {_signed(ci[1])}" if ci
               else "CI undefined")
    verdict = "meets" if c["better_by_margin"] else "below"
    reasons = [(f"test AUC {c['challenger_auc']:.3f} vs champion {c['champion_auc']:.3f} "
                f"({_signed(c['auc_difference'])}, {ci_text}) on {c['n_images']} images of {c['n_patients']} "
                f"patients: {verdict} the margin {params.margin:.3f}")]
    compared = [r for r in c["subgroups"] if r["compared"]]
    for r in c["subgroup_regressions"]:
        reasons.append(f"{r['group']} {r['value']}: AUC {r['challenger_auc']:.3f} vs {r['champion_auc']:.3f} "
                       f"({_signed(r['difference'])}) exceeds the tolerance {params.subgroup_tolerance:.3f}")
    if compared and not c["subgroup_regressions"]:
        worst = min(compared, key=lambda r: r["difference"])
        reasons.append(f"no subgroup AUC dropped by more than the tolerance {params.subgroup_tolerance:.3f} "
                       f"({len(compared)} compared; lowest difference {worst['group']} {worst['value']} "
                       f"{_signed(worst['difference'])})")
    skipped = [r for r in c["subgroups"] if not r["compared"]]
    if skipped:
        listed = ", ".join(f"{r['group']} {r['value']} ({r['n_images']} images, {r['n_positive']} positive)"
                           for r in skipped)
        reasons.append(f"not compared (under {params.min_subgroup_images} images or one class): {listed}")
    return {"promote": bool(c["better_by_margin"] and not c["subgroup_regressions"]), "reasons": reasons}


def _signed(value: float) -> str:
    return f"{value:+.3f}"


# --------------------------------------------------------------------------------------- registry


def read_champion(registry: Path) -> dict | None:
    """The champion record of ``registry`` (None if there is none yet).

    Raises:
        ValueError: if ``champion.json`` exists but is not a valid record, or its model file is
            missing or does not match the recorded SHA-256 (the registry was altered by hand).
    """
    pointer = Path(registry) / "champion.json"
    if not pointer.exists():
        return None
    try:
        record = json.loads(pointer.read_text())
        missing = [k for k in ("version", "path", "model_sha256") if k not in record]
        if missing:
            raise KeyError(", ".join(missing))
        model = Path(registry) / record["path"] / "model.pt"
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{pointer}: not a champion record ({type(exc).__name__}: {exc}); "
                         "repair or remove it before promoting") from exc
    if not model.is_file() or sha256_file(model) != record["model_sha256"]:
        raise ValueError(f"{pointer}: the champion model {model} is missing or does not match its recorded "
                         "SHA-256; restore the registry before promoting")
    return record


def _next_version(versions: Path) -> int:
    # Numbered directories without a pointer to them (a crash after the rename) still count, so a
    # number is never reused; temporary ".tmp-*" directories are not numbers and are ignored.
    numbers = [int(p.name) for p in versions.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(numbers, default=0) + 1


def version_dir(registry: Path, version: int) -> Path:
    """Where the registry keeps ``version`` (its model.pt, card, metrics.json and subgroups.json)."""
    return Path(registry) / "versions" / f"{int(version):04d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_version(registry: Path, sources: dict[str, Path], expected_sha256: str) -> tuple[int, Path]:
    """Copy ``sources`` (name -> file) into the next ``versions/NNNN`` directory, durably. Returns (version, dir)."""
    versions = registry / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    for stale in versions.glob(".tmp-*"):  # staging of a killed promotion (the retrain flow runs one at a time)
        pid = stale.name.split("-")[1] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    staging = versions / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name, source in sources.items():
            shutil.copyfile(source, staging / name)
            with open(staging / name, "rb") as fh:
                os.fsync(fh.fileno())
        if sha256_file(staging / "model.pt") != expected_sha256:
            raise RuntimeError(f"{sources['model.pt']} changed while it was being promoted; run the promotion again")
        _fsync_dir(staging)
        version = _next_version(versions)
        target = version_dir(registry, version)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(versions)
    return version, target


def _append_history(registry: Path, entry: dict) -> None:
    with open(registry / "history.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# -------------------------------------------------------------------------------------------- run


def _test_rows(predictions_csv: Path) -> pd.DataFrame:
    frame = pd.read_csv(predictions_csv, dtype={"image_id": str, "patient_key": str})
    return frame[frame["split"] == "test"].reset_index(drop=True)


def _score_champion(record: dict, registry: Path, images_dir: Path, splits_csv: Path,
                    evaluate_params: EvaluateParams) -> pd.DataFrame:
    with tempfile.TemporaryDirectory(prefix="medtl-promote-") as tmp:
        evaluate.run(evaluate_params, registry / record["path"] / "model.pt", images_dir, splits_csv, Path(tmp),
                     report=False)
        return _test_rows(Path(tmp) / "predictions.csv")


def run_with_params(params_file: Path, model_path: Path, reports_dir: Path, images_dir: Path, splits_csv: Path, *,
                    registry: str | Path | None = None, root: Path | None = None, force: bool = False) -> dict:
    """:func:`run` with the ``promote`` and ``evaluate`` sections of ``params_file``.

    What ``medtl promote`` and the retrain flow's promote step both do. ``registry`` overrides
    ``promote.registry``; a relative registry lies under ``root`` (the project; default: the current
    directory).
    """
    params = load_section(PromoteParams, params_file, "promote")
    registry_dir = Project(Path(root) if root is not None else Path()).registry(str(registry or params.registry))
    return run(replace(params, registry=str(registry_dir)), model_path, reports_dir, images_dir, splits_csv,
               evaluate_params=load_section(EvaluateParams, params_file, "evaluate"), force=force)


def run(params: PromoteParams, model_path: Path, reports_dir: Path, images_dir: Path, splits_csv: Path,
        evaluate_params: EvaluateParams | None = None, force: bool = False) -> dict:
    """Compare the challenger with the champion, promote it if it is better, and record the decision.

    Args:
        params: the ``promote`` section; ``params.registry`` is the registry directory.
        model_path: the challenger's ``model.pt`` (its ``model_card.json`` lies beside it).
        reports_dir: the challenger's evaluate outputs (``predictions.csv``, ``metrics.json``,
            ``subgroups.json``); receives ``promotion.json``.
        images_dir: preprocess output the champion is re-scored on (``index.parquet`` also gives
            the subgroup columns).
        splits_csv: split output.
        evaluate_params: how the champion is re-scored (device, batch size, subgroup columns);
            defaults to :class:`pipeline.evaluate.EvaluateParams`.
        force: promote whatever the comparison says (the reasons say so).

    Returns:
        The content of ``promotion.json``: ``{"decision": {"promote", "reasons"}, "comparison": dict or
        None, "champion_before": version or None, "champion_after": version}``.

    Raises:
        ValueError: if the challenger is not a binary classifier, its card does not describe its
            model file, or the registry's champion record is broken.
    """
    model_path, reports_dir, images_dir = Path(model_path), Path(reports_dir), Path(images_dir)
    registry = Path(params.registry)
    evaluate_params = evaluate_params or EvaluateParams()
    card_path = model_path.parent / "model_card.json"
    card = json.loads(card_path.read_text())
    test_metrics = json.loads((reports_dir / "metrics.json").read_text())
    if len(test_metrics["classes"]) != 2:
        raise ValueError(f"{reports_dir / 'metrics.json'}: {len(test_metrics['classes'])} classes; promotion "
                         "compares binary classifiers only")
    challenger_sha = sha256_file(model_path)
    if card.get("model_file", {}).get("sha256", challenger_sha) != challenger_sha:
        raise ValueError(f"{card_path} describes another model than {model_path} (SHA-256 differs); "
                         "rerun the train stage")

    champion = read_champion(registry)
    comparison = None
    if champion is None:
        decision = decide(None, params)
    else:
        try:
            index = pd.read_parquet(images_dir / "index.parquet")
            extra = [c for c in evaluate_params.subgroups if c in index.columns]
            challenger_rows = _test_rows(reports_dir / "predictions.csv").merge(index[["image_id", *extra]],
                                                                                on="image_id", how="left")
            champion_rows = _score_champion(champion, registry, images_dir, Path(splits_csv), evaluate_params)
            comparison = compare(challenger_rows, champion_rows, params, evaluate_params.subgroups)
            decision = decide(comparison, params)
        except ValueError as exc:
            # The champion's input spec or classes no longer fit the data (or the challenger's
            # reports are stale): there is no evidence the challenger is better, so it is not promoted.
            decision = {"promote": False, "reasons": [
                (f"the champion (version {champion['version']}) cannot be compared with the challenger on the "
                 f"current images and splits: {exc}")]}
        if challenger_sha == champion["model_sha256"]:
            decision = {"promote": False, "reasons": [
                (f"the challenger is the champion's model (version {champion['version']}, same SHA-256): "
                 "nothing to promote"), *decision["reasons"]]}
    if force:
        decision = {"promote": True,
                    "reasons": [*decision["reasons"], "forced: promoted regardless of the checks above"]}

    now = datetime.now(UTC).isoformat(timespec="seconds")
    before = champion["version"] if champion else None
    after = before
    if decision["promote"]:
        sources = {"model.pt": model_path, "model_card.json": card_path,
                   "metrics.json": reports_dir / "metrics.json", "subgroups.json": reports_dir / "subgroups.json"}
        after, version_dir = _store_version(registry, sources, challenger_sha)
        record = {
            "version": after,
            "path": version_dir.relative_to(registry).as_posix(),
            "promoted_at": now,
            "model_sha256": challenger_sha,
            "test_auc": test_metrics["test"]["auc"],
            "test_auc_ci": test_metrics["test"]["auc_ci"],
            "code_version": card.get("code_version"),
            "data_version": card.get("data", {}).get("version_sha256"),
            "decision": decision,
        }
        atomic_write_text(registry / "champion.json", json.dumps(record, indent=2) + "\n")
        _fsync_dir(registry)
    _append_history(registry, {
        "decided_at": now,
        "promote": decision["promote"], "forced": force, "champion_before": before, "champion_after": after,
        "challenger_sha256": challenger_sha,
        "challenger_auc": comparison["challenger_auc"] if comparison else test_metrics["test"]["auc"],
        "champion_auc": comparison["champion_auc"] if comparison else None, "reasons": decision["reasons"]})
    promotion = {"decision": decision, "comparison": comparison, "champion_before": before, "champion_after": after}
    atomic_write_text(reports_dir / "promotion.json", json.dumps(promotion, indent=2) + "\n")
    auc_text = (f"test AUC {comparison['challenger_auc']:.3f} vs {comparison['champion_auc']:.3f} on "
                f"{comparison['n_images']} images, {len(comparison['subgroup_regressions'])} subgroup(s) regressed"
                if comparison else "no comparison")
    log.info("promote: %s; champion %s -> %s; %s", "promoted" if decision["promote"] else "not promoted",
             before, after, auc_text)
    return promotion

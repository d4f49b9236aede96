"""The transfer-learning study: what ImageNet pretraining buys on a site's own data.

One command (``medtl study``, or the Prefect flow ``transfer_study``) trains a grid of models as DVC
experiments and says, from the numbers, whether pretraining helped:

- **strategy** × **training-data fraction** × **seed**. Strategies map onto params: ``scratch`` =
  ``model.pretrained: none`` + ``train.strategy: finetune`` (the whole network learns at the full
  rate); ``feature_extraction``, ``finetune`` and ``gradual`` = ImageNet weights + that strategy.
  A fraction keeps a nested, class-stratified subset of the TRAINING patients (``train.fraction``,
  :func:`pipeline.data.train_subset`): the 10 % patients are inside the 25 % ones; validation and
  test are the same for every run, which :func:`compare` checks image by image.
- every run is ``dvc exp run --queue -S ... --name <prefix>-<strategy>-<pct>pct-s<seed>``, then the
  queue runs (``dvc exp run --run-all -j N``). Results stay DVC experiments: ``dvc exp show``,
  ``dvc plots diff <exp> <exp>``. The grid's ``overrides`` apply to every run; a run whose
  overrides leave the shared stages alone starts from the workspace's prepared data.
- per run (:func:`collect`, read from the experiment's commit): test AUC with its patient-bootstrap
  CI (``reports/metrics.json``), best epoch, training time, and the epochs and training wall time
  (train + validation, set-up excluded: ``time/elapsed_s`` of the DVCLive log) until the
  validation AUC first reaches ``target_val_auc``.
- :func:`compare` pairs strategies on the same test images (predictions from the DVC cache): the
  test-AUC difference to ``scratch`` and to ``finetune`` with a paired patient-bootstrap CI (both
  models on each resample, averaged over seeds), which is narrower than two independent CIs suggest.
- :func:`findings` turns that table into sentences (rules in its docstring); :func:`report` writes
  ``reports/study.md`` with a learning-curve and a convergence figure, ``reports/study.csv`` (one
  row per run) and ``reports/study_summary.csv`` (one row per strategy and fraction).

Figures go to ``reports/study/``, not ``reports/figures/``: that folder is the evaluate stage's DVC
output, which DVC deletes before each evaluate run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.dvc_cli import run_dvc
from pipeline.formatting import num, pct, png
from pipeline.io_utils import atomic_write_bytes, atomic_write_text
from pipeline.errors import MedtlError
from pipeline.params import ParamsError, check, param, section, suggest
from pipeline.strategies import LABELS, SCRATCH, STUDY_STRATEGIES

log = logging.getLogger(__name__)

COLOURS = {SCRATCH: "tab:grey", "feature_extraction": "tab:orange", "finetune": "tab:blue", "gradual": "tab:green"}
#: the summary's paired comparisons: ``vs_<reference>`` (difference), ``vs_<reference>_lo`` / ``_hi`` (CI)
REFERENCES = (SCRATCH, "finetune")
#: params each run sets itself; a grid's ``overrides`` may not touch them
RUN_KEYS = ("model.pretrained", "train.strategy", "train.fraction", "train.fraction_seed", "train.seed",
            "train.epochs", "train.patience", "train.min_steps")
#: stages every run shares (data in, patients split): brought up to date in the workspace before queueing
PREPARE_TARGET = "split"
#: files read from each experiment's git commit (DVC ``cache: false`` outputs, committed by ``dvc exp``)
EXP_FILES = {"metrics": paths.in_project(paths.REPORTS_DIR, paths.METRICS),
             "train": paths.in_project(paths.MODELS_DIR, paths.TRAIN_METRICS),
             "val_auc": paths.in_project(paths.MODELS_DIR, paths.VAL_AUC_TSV),
             "elapsed": paths.in_project(paths.MODELS_DIR, paths.ELAPSED_TSV)}
#: a cached DVC output: read from the DVC cache by its dvc.lock hash
PREDICTIONS = paths.in_project(paths.REPORTS_DIR, paths.PREDICTIONS)
#: DVC's run-cache key drops every param of these names (dvc.stage.cache hashes the stage with
#: ``exclude=["size", "nfiles"]``, meant for file sizes), so ``-S preprocess.size=112`` could restore
#: the tensors of another size; runs that override such a param are queued with ``--no-run-cache``
RUN_CACHE_BLIND = ("size", "nfiles")
NOT_REACHED = "not reached"


class StudyError(RuntimeError):
    """The study cannot start, a run failed, or a run's results are missing."""


class StudySetupError(StudyError, MedtlError):
    """The study cannot start in this project (a user error: no commit, no dvc.yaml, ignored result files,
    a busy queue); the message says what to do."""


# ------------------------------------------------------------------------------------------ params


@dataclass(frozen=True)
class StudyGrid:
    """One grid of ``study.grids`` in params.yaml.

    Attributes:
        strategies: from :data:`pipeline.strategies.STUDY_STRATEGIES`.
        fractions: shares of the training patients, in (0, 1]; sorted ascending.
        seeds: one run per seed (``train.seed`` and ``train.fraction_seed``: another seed draws
            another nested subset and another initialisation/order).
        epochs: ``train.epochs`` of every run.
        patience: ``train.patience`` of every run (0: every run trains all epochs, so the
            convergence curves are comparable).
        min_steps: ``train.min_steps`` of every run: a small fraction trains more epochs, so every
            cell gets a comparable number of optimiser steps (a difference between strategies is then
            a property of the strategy, not of the step count).
        target_val_auc: the validation AUC whose first reaching is timed (epochs and seconds).
        jobs: experiments run at once (``dvc exp run --run-all -j``); torch threads are split between them.
        n_boot: resamples of the paired patient bootstrap of AUC differences.
        ci_level: level of those intervals.
        overrides: ``section.key: value`` applied to every run (sizes it to the machine, e.g.
            ``preprocess.size``, ``evaluate.n_boot``, ``evaluate.gradcam_examples``).
    """

    strategies: tuple[str, ...] = param(STUDY_STRATEGIES, choices=STUDY_STRATEGIES)
    fractions: tuple[float, ...] = param((0.1, 0.25, 0.5, 1.0), min=0, min_exclusive=True, max=1)
    seeds: tuple[int, ...] = param((0,), min=0)
    epochs: int = param(6, min=1)
    patience: int = param(0, min=0)
    min_steps: int = param(0, min=0)
    target_val_auc: float = param(0.75, min=0, min_exclusive=True, max=1)
    jobs: int = param(1, min=1)
    n_boot: int = param(1000, min=1)
    ci_level: float = param(0.95, min=0, min_exclusive=True, max=1, max_exclusive=True)
    overrides: dict[str, Any] | None = param({})

    def __post_init__(self):
        check(self, "study.grids.*")
        object.__setattr__(self, "overrides", dict(self.overrides or {}))
        object.__setattr__(self, "fractions", tuple(sorted(float(f) for f in self.fractions)))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        for name in ("strategies", "fractions", "seeds"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ParamsError(f"study: {name} {list(values)}: need one or more distinct values")
        bad = [k for k in self.overrides if k in RUN_KEYS or "." not in str(k)]
        if bad:
            raise ParamsError(f"study: overrides {bad}: keys are section.key and may not be one the study sets "
                              f"per run ({', '.join(RUN_KEYS)})")


@dataclass(frozen=True)
class StudyParams:
    """``study`` section of params.yaml: the grid run by default, the experiment-name prefix, the grids
    (each a :class:`StudyGrid` mapping, all checked when read)."""

    grid: str = "cpu"
    name: str = "study"
    grids: dict[str, dict | None] = param({"cpu": {}})

    def __post_init__(self):
        check(self, "study")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", self.name):
            raise ParamsError(f"study.name: {self.name!r} must be letters, digits, - or _ (it prefixes experiment "
                              "names)")
        for name, values in self.grids.items():
            section(StudyGrid, values, where=f"study.grids.{name}")
        if self.grid not in self.grids:
            raise ParamsError(f"study.grid: {self.grid!r} is not a grid of study.grids"
                              f"{_suggest_grid(self.grid, self.grids)}")

    def select(self, grid: str | None = None) -> StudyGrid:
        """The grid named ``grid`` (default ``study.grid``) as a :class:`StudyGrid`."""
        name = grid or self.grid
        if name not in self.grids:
            raise ParamsError(f"study: no grid {name!r} in study.grids{_suggest_grid(name, self.grids)}")
        return section(StudyGrid, self.grids[name], where=f"study.grids.{name}")


def _suggest_grid(name: str, grids: dict) -> str:
    return suggest(name, grids, "the grids are")


# -------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Run:
    """One experiment of the grid: its name and its ``section.key`` params."""

    name: str
    strategy: str
    fraction: float
    seed: int
    overrides: dict[str, Any]

    def set_params(self) -> list[str]:
        """``-S`` values for ``dvc exp run`` (Hydra override syntax)."""
        return [f"{key}={hydra_value(value)}" for key, value in self.overrides.items()]

    @property
    def needs_no_run_cache(self) -> bool:
        """True when a param DVC's run cache cannot see is overridden (see :data:`RUN_CACHE_BLIND`)."""
        return any(str(key).rsplit(".", 1)[-1] in RUN_CACHE_BLIND for key in self.overrides)


def run_name(prefix: str, strategy: str, fraction: float, seed: int) -> str:
    """``<prefix>-<strategy>-<percent>pct-s<seed>``, e.g. ``study-finetune-10pct-s0`` (a valid git ref name)."""
    return f"{prefix}-{strategy.replace('_', '-')}-{fraction * 100:g}pct-s{seed}"


def plan(grid: StudyGrid, prefix: str = "study", pretrained: str = "imagenet") -> list[Run]:
    """The grid's runs, seed by seed, fraction by fraction (smallest first), strategy by strategy.

    Args:
        grid: the study grid.
        prefix: experiment-name prefix (``study.name``).
        pretrained: the workspace's ``model.pretrained``; pretrained strategies keep it (a site's
            own weights file stays in use), unless it is ``none``, then they use ``imagenet``.
    """
    weights = pretrained if pretrained != "none" else "imagenet"
    runs = []
    for seed in grid.seeds:
        for fraction in grid.fractions:
            for strategy in grid.strategies:
                model = ({"model.pretrained": "none", "train.strategy": "finetune"} if strategy == SCRATCH
                         else {"model.pretrained": weights, "train.strategy": strategy})
                overrides = {**grid.overrides, **model, "train.fraction": fraction, "train.fraction_seed": seed,
                             "train.seed": seed, "train.epochs": grid.epochs, "train.patience": grid.patience,
                             "train.min_steps": grid.min_steps}
                runs.append(Run(run_name(prefix, strategy, fraction, seed), strategy, fraction, seed, overrides))
    return runs


def workspace_pretrained(params_file: Path) -> str:
    """The workspace's ``model.pretrained`` (``imagenet`` where unset): what :func:`plan` gives pretrained runs."""
    from pipeline.params import read_params

    return str((read_params(Path(params_file)).get("model") or {}).get("pretrained", "imagenet"))


def hydra_value(value: Any) -> str:
    """``value`` in the Hydra override grammar ``dvc exp run -S`` parses (strings quoted where needed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", text) and text.lower() not in {"null", "true", "false", "nan", "inf"}:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ----------------------------------------------------------------------------------- DVC and git


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check, timeout=120)


def baseline(repo: Path) -> str:
    """The commit the experiments are based on (HEAD)."""
    done = _git(repo, "rev-parse", "--verify", "HEAD", check=False)
    if done.returncode != 0:
        raise StudySetupError(f"{repo}: no git commit yet; DVC experiments are based on one (git add, git commit)")
    return done.stdout.strip()


def existing_experiments(repo: Path, base: str) -> dict[str, str]:
    """Experiments of baseline ``base``: name -> commit."""
    out = _git(repo, "for-each-ref", "--format=%(refname) %(objectname)", f"refs/exps/{base[:2]}/{base[2:]}/").stdout
    found = {}
    for line in out.splitlines():
        ref, _, sha = line.partition(" ")
        found[ref.rsplit("/", 1)[-1]] = sha
    return found


def preflight(repo: Path) -> str:
    """Check that the study's runs can start and keep their results; return the baseline commit.

    Raises:
        StudyError: no commit, no dvc.yaml, ``.gitignore`` hides the files DVC must commit to each
            experiment (its metrics would be lost: ``dvc exp show`` would show none), or the DVC queue
            already holds experiments (running the queue would run them too).
    """
    repo = Path(repo)
    if not (repo / "dvc.yaml").is_file():
        raise StudySetupError(f"{repo}: no dvc.yaml; run the study in the project directory")
    base = baseline(repo)
    ignored = [p for p in EXP_FILES.values() if _git(repo, "check-ignore", "-q", p, check=False).returncode == 0]
    if ignored:
        raise StudySetupError(
            f"git ignores {', '.join(ignored)}: `dvc exp` commits only files git tracks, so every run's metrics "
            "would be lost (and `dvc exp show` would show none). Un-ignore DVC's cache: false outputs in "
            ".gitignore, e.g. `!/models/train_metrics.json`, `!/models/live/`, `!/reports/metrics.json`, "
            "`!/reports/plots/`")
    code, lines = run_dvc(repo, "queue", "status")
    busy = [line for line in lines if re.search(r"\b(Queued|Running)\s*$", line)]
    if code == 0 and busy:
        raise StudySetupError(f"the DVC queue already holds {len(busy)} experiment(s) ({'; '.join(busy[:3])}); "
                              "run or remove them first (dvc queue status; dvc queue remove --queued; a 'Running' "
                              "one left by an interrupted study: dvc queue kill <task>)")
    return base


def _shared_state_files(repo: Path) -> list[str]:
    """dvc.lock and the git-versioned (``cache: false``) outputs of :data:`PREPARE_TARGET` and its upstream stages."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        stages = dvc_repo.stage.collect(PREPARE_TARGET, with_deps=True)
        outs = [os.path.relpath(out.fs_path, repo) for stage in stages for out in stage.outs if not out.use_cache]
    return ["dvc.lock", *outs]


def prepare(repo: Path, echo: Callable[[str], None] | None = None) -> None:
    """Bring the shared stages (up to :data:`PREPARE_TARGET`) up to date in the workspace.

    Queued experiments start from the last commit plus the changes git tracks (staged or modified),
    not from untracked files. So dvc.lock and the shared stages' ``cache: false`` outputs (their
    metrics) are staged, as DVC's ``core.autostage`` would: every run then finds those stages up to
    date instead of redoing them (files git ignores are left alone; those stages rerun per run).
    """
    log.info("study: bringing the shared stages up to date (dvc repro %s)", PREPARE_TARGET)
    code, tail = run_dvc(repo, "repro", PREPARE_TARGET, on_line=echo)
    if code != 0:
        raise StudyError(f"dvc repro {PREPARE_TARGET} failed (exit {code}):\n" + "\n".join(tail[-15:]))
    files = [f for f in _shared_state_files(repo) if (repo / f).exists()
             and _git(repo, "check-ignore", "-q", f, check=False).returncode != 0]
    changed = _git(repo, "status", "--porcelain", "--", *files).stdout.strip() if files else ""
    if changed:
        log.info("study: staging %s (git add) so every run starts from the prepared data", ", ".join(files))
        _git(repo, "add", "--", *files)


def queue(repo: Path, runs: Sequence[Run], base: str, *, resume: bool = False) -> list[Run]:
    """Queue the runs as DVC experiments (``dvc exp run --queue``); returns those queued.

    ``resume``: runs whose experiment already exists on this baseline are kept, not rerun (an
    interrupted study continues). Otherwise an existing experiment of the same name is removed first.
    """
    existing = existing_experiments(repo, base)
    todo = [r for r in runs if not (resume and r.name in existing)]
    stale = [r.name for r in todo if r.name in existing]
    if stale:
        log.info("study: replacing %d earlier experiment(s) of the same name", len(stale))
        code, tail = run_dvc(repo, "exp", "remove", *stale)
        if code != 0:
            raise StudyError("dvc exp remove failed:\n" + "\n".join(tail[-10:]))
    if len(todo) < len(runs):
        log.info("study: %d of %d runs already done (resume)", len(runs) - len(todo), len(runs))
    if any(run.needs_no_run_cache for run in todo):
        log.warning("study: an override names a param DVC's run cache ignores (%s): runs skip the run cache, "
                    "so changed stages recompute in every run", "/".join(RUN_CACHE_BLIND))
    for run in todo:
        args = ["exp", "run", "--queue", "--name", run.name, *(["--no-run-cache"] if run.needs_no_run_cache else [])]
        for value in run.set_params():
            args += ["-S", value]
        code, tail = run_dvc(repo, *args)
        if code != 0:
            raise StudyError(f"dvc exp run --queue {run.name} failed:\n" + "\n".join(tail[-10:]))
    log.info("study: queued %d experiment(s)", len(todo))
    return todo


def run_queue(repo: Path, runs: Sequence[Run], jobs: int = 1, echo: Callable[[str], None] | None = None) -> None:
    """Run the queue (``dvc exp run --run-all -j jobs``), its logs to ``echo``; every run must succeed."""
    if not runs:
        return
    log.info("study: running %d experiment(s), %d at a time", len(runs), jobs)
    code, tail = run_dvc(repo, "exp", "run", "--run-all", "-j", str(jobs), on_line=echo, jobs=jobs)
    failed = [line for line in tail if "Failed to reproduce experiment" in line]
    if code != 0 or failed:
        detail = "; ".join(failed) or (tail[-1] if tail else "no output")
        raise StudyError(f"the study's experiments did not all succeed (dvc exit {code}): {detail}; "
                         "see `dvc queue logs <name>`")


# ----------------------------------------------------------------------------------------- collect


def _show(repo: Path, sha: str, path: str) -> str | None:
    done = _git(repo, "show", f"{sha}:{path}", check=False)
    return done.stdout if done.returncode == 0 else None


def _curve(val_auc_tsv: str, elapsed_tsv: str) -> pd.DataFrame:
    auc = pd.read_csv(io.StringIO(val_auc_tsv), sep="\t")[["step", "auc"]]
    elapsed = pd.read_csv(io.StringIO(elapsed_tsv), sep="\t")[["step", "elapsed_s"]]
    curve = auc.merge(elapsed, on="step", how="left").rename(columns={"auc": "val_auc"})
    curve.insert(0, "epoch", curve.pop("step") + 1)
    return curve


def time_to_target(curve: pd.DataFrame, target: float) -> tuple[float, float]:
    """(epoch, training seconds) when the validation AUC first reached ``target``; (nan, nan) if never."""
    reached = curve[curve["val_auc"] >= target - 1e-12]
    if reached.empty:
        return math.nan, math.nan
    first = reached.iloc[0]
    return float(first["epoch"]), float(first["elapsed_s"])


def _predictions(repo: Path, sha: str) -> pd.DataFrame:
    import dvc.api

    text = dvc.api.read(PREDICTIONS, repo=str(repo), rev=sha)
    return pd.read_csv(io.StringIO(text), dtype={"image_id": str, "patient_key": str})


def collect(repo: Path, runs: Sequence[Run], base: str, target_val_auc: float
            ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """Read every run's results from its experiment commit.

    Returns:
        ``table``: one row per run (``experiment, strategy, fraction, seed, train_patients,
        train_images, val_images, test_images, epochs_run, best_epoch, best_val_auc, test_auc,
        test_auc_lo, test_auc_hi, epochs_to_target, time_to_target_s, train_time_s``; the two
        ``*_to_target`` are nan where the target was not reached); ``curves``: one row per run and
        epoch (``experiment, strategy, fraction, seed, epoch, val_auc, elapsed_s``); ``predictions``:
        each run's ``predictions.csv`` (validation and test rows), by experiment name.

    Raises:
        StudyError: a run has no experiment, or its commit lacks a result file.
    """
    refs = existing_experiments(repo, base)
    missing = [r.name for r in runs if r.name not in refs]
    if missing:
        raise StudyError(f"no experiment for {len(missing)} run(s): {', '.join(missing)}; see `dvc queue logs <name>`")
    rows, curves, predictions = [], [], {}
    for run in runs:
        sha = refs[run.name]
        files = {key: _show(repo, sha, path) for key, path in EXP_FILES.items()}
        absent = [EXP_FILES[k] for k, v in files.items() if v is None]
        if absent:
            raise StudyError(f"experiment {run.name} ({sha[:7]}) lacks {', '.join(absent)}: are they git-ignored?")
        test = json.loads(files["metrics"])["test"]
        val = json.loads(files["metrics"]).get("val", {})
        trained = json.loads(files["train"])
        curve = _curve(files["val_auc"], files["elapsed"])
        epoch, seconds = time_to_target(curve, target_val_auc)
        lo, hi = test["auc_ci"]
        rows.append({"experiment": run.name, "strategy": run.strategy, "fraction": run.fraction, "seed": run.seed,
                     "train_patients": trained.get("train_patients"), "train_images": trained["train_images"],
                     "val_images": val.get("n_images"), "test_images": test["n_images"],
                     "epochs_run": trained["epochs_run"], "best_epoch": trained["best_epoch"],
                     "best_val_auc": trained["best_val_auc"], "test_auc": test["auc"], "test_auc_lo": lo,
                     "test_auc_hi": hi, "epochs_to_target": epoch, "time_to_target_s": seconds,
                     "train_time_s": trained["wall_s"]})
        curves.append(curve.assign(experiment=run.name, strategy=run.strategy, fraction=run.fraction, seed=run.seed))
        predictions[run.name] = _predictions(repo, sha)
    curve_frame = pd.concat(curves, ignore_index=True)
    return pd.DataFrame(rows), curve_frame[["experiment", "strategy", "fraction", "seed", "epoch", "val_auc",
                                            "elapsed_s"]], predictions


# ----------------------------------------------------------------------------------------- compare


def _split_rows(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    return frame[frame["split"] == split].sort_values("image_id").reset_index(drop=True)


def check_same_evaluation_sets(predictions: dict[str, pd.DataFrame]) -> None:
    """Every run was validated and tested on the same images with the same labels, else StudyError."""
    names = list(predictions)
    for split in ("val", "test"):
        first = _split_rows(predictions[names[0]], split)[["image_id", "y_true"]]
        for name in names[1:]:
            other = _split_rows(predictions[name], split)[["image_id", "y_true"]]
            if not first.equals(other):
                raise StudyError(f"the {split} images of {name} differ from those of {names[0]}: the runs are "
                                 "not comparable (did the split change between them?)")


def paired_difference(a: Sequence[pd.DataFrame], b: Sequence[pd.DataFrame], n_boot: int = 1000, seed: int = 0,
                      ci_level: float = 0.95) -> tuple[float, float, float]:
    """Test-AUC difference (mean over seeds of ``a`` minus mean of ``b``) with a paired patient-bootstrap CI.

    Args:
        a, b: test predictions (``image_id, patient_key, y_true, score``) of the runs of two
            strategies, one frame per seed, all on the same images.

    Returns:
        (difference, lo, hi); nan for more than two classes or one-class test data.
    """
    from pipeline import metrics

    frames = [_split_rows(f, "test") if "split" in f else f.sort_values("image_id").reset_index(drop=True)
              for f in (*a, *b)]
    y = frames[0]["y_true"].to_numpy(int)
    if set(np.unique(y)) - {0, 1} or len(np.unique(y)) < 2:
        return math.nan, math.nan, math.nan
    scores = np.column_stack([f["score"].to_numpy(float) for f in frames])
    patient = frames[0]["patient_key"].to_numpy()
    boot = metrics.paired_auc_difference(y, scores[:, :len(a)], scores[:, len(a):], patient, n_boot=n_boot, seed=seed,
                                         alpha=1 - ci_level)
    lo, hi = boot["ci"]
    return float(boot["estimate"]), float(lo), float(hi)


def _median_or_nan(values: pd.Series) -> float:
    # a run that never reached the target counts as infinitely slow: the median says "not reached"
    # once half the seeds missed it
    median = float(np.median(values.fillna(math.inf)))
    return median if math.isfinite(median) else math.nan


def compare(table: pd.DataFrame, predictions: dict[str, pd.DataFrame], n_boot: int = 1000,
            ci_level: float = 0.95) -> pd.DataFrame:
    """One row per (strategy, fraction): seeds averaged, paired differences to the references.

    Columns: ``strategy, fraction, seeds, train_patients, epochs, test_auc, test_auc_lo,
    test_auc_hi`` (means over seeds, the CI bounds too), ``vs_scratch, vs_scratch_lo, vs_scratch_hi,
    vs_finetune, vs_finetune_lo, vs_finetune_hi`` (:func:`paired_difference` over the seeds both
    strategies ran; nan for the reference itself or where it did not run), ``best_epoch``,
    ``epochs_to_target``, ``time_to_target_s`` (medians over seeds; nan: not reached) and ``train_time_s``
    (mean), ``test_patients`` (the same for every row). Rows are ordered by fraction, then by
    :data:`pipeline.strategies.STUDY_STRATEGIES`.
    """
    check_same_evaluation_sets(predictions)
    first = next(iter(predictions.values()))
    test_patients = int(first.loc[first["split"] == "test", "patient_key"].nunique())
    rows = []
    for (fraction, strategy), group in table.groupby(["fraction", "strategy"], sort=False):
        row = {"strategy": strategy, "fraction": fraction, "seeds": len(group),
               "train_patients": int(group["train_patients"].max()), "epochs": int(group["epochs_run"].max()),
               "test_auc": group["test_auc"].mean(), "test_auc_lo": group["test_auc_lo"].mean(),
               "test_auc_hi": group["test_auc_hi"].mean()}
        for reference in REFERENCES:
            ref = table[(table["strategy"] == reference) & (table["fraction"] == fraction)]
            seeds = sorted(set(group["seed"]) & set(ref["seed"]))
            diff = (math.nan,) * 3
            if reference != strategy and seeds:
                runs_a, runs_b = (frame.set_index("seed").loc[seeds, "experiment"] for frame in (group, ref))
                diff = paired_difference([predictions[n] for n in runs_a], [predictions[n] for n in runs_b],
                                         n_boot=n_boot, ci_level=ci_level)
            row.update({f"vs_{reference}": diff[0], f"vs_{reference}_lo": diff[1], f"vs_{reference}_hi": diff[2]})
        row.update({"best_epoch": float(group["best_epoch"].median()),
                    "epochs_to_target": _median_or_nan(group["epochs_to_target"]),
                    "time_to_target_s": _median_or_nan(group["time_to_target_s"]),
                    "train_time_s": group["train_time_s"].mean(), "test_patients": test_patients})
        rows.append(row)
    summary = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(STUDY_STRATEGIES)}
    return summary.sort_values(["fraction", "strategy"], key=lambda c: c.map(order) if c.name == "strategy" else c,
                               ignore_index=True)


# ---------------------------------------------------------------------------------------- findings


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _ci_words(lo: float, hi: float, level: float) -> str:
    return f"{level:.0%} CI {lo:+.2f} to {hi:+.2f}"


def _diff(value: float, lo: float, hi: float, level: float) -> str:
    return f"{value:+.2f} AUC, {_ci_words(lo, hi, level)}"


def _verdict(lo: float, hi: float) -> str:
    return "better" if lo > 0 else "worse" if hi < 0 else "within"


def _within_phrase(within: list[float], fractions: list[float]) -> str:
    if within == fractions:
        return "at every fraction" if len(fractions) > 1 else f"at {pct(fractions[0])}"
    if not within:
        return "at no fraction"
    if within == fractions[:len(within)]:
        return f"at ≤ {pct(within[-1])} of the training data"
    return "at " + _join([pct(f) for f in within])


#: what to check before a pretrained strategy's loss is read as a property of the data
RECIPE_CHECKS = ("Check train.batchnorm (frozen keeps the pretrained statistics; batch mode with MONAI's momentum "
                 "0.01 evaluates on statistics training never used), train.backbone_lr_mult and the warm-up, and "
                 "the optimiser steps each run got (train.min_steps); then repeat with more seeds.")


def findings(summary: pd.DataFrame, target_val_auc: float | None = None, ci_level: float = 0.95) -> list[str]:
    """Plain-words findings computed from the :func:`compare` table, one string per sentence.

    Rules (Δ = a strategy's test AUC minus the reference's on the same test patients, averaged over
    seeds, with its paired patient-bootstrap CI):

    - *beats*: the CI of Δ lies above 0; *below*: it lies under 0; otherwise *within CI*.
    - Per fraction (when scratch ran): each pretrained strategy against scratch.
    - Per pretrained strategy other than fine-tuning (when fine-tuning ran): the fractions where it
      is within CI of fine-tuning ("at ≤ 25%" when they are the smallest ones), and where either is better.
    - A pretrained strategy *below* scratch is listed with what to check before calling it negative
      transfer (:data:`RECIPE_CHECKS`), else "No negative transfer observed"; fine-tuning below another
      pretrained strategy gets the same checks.
    - The highest test AUC per fraction (point estimates, with CIs).
    - Chance: the cells whose test-AUC CI lies above 0.5 (and below it, if any); none above says
      the study cannot rank strategies on this test set.
    - Resolution: the median half-width of the paired-difference CIs, on ``test_patients``
      patients: differences smaller than that are not detectable here.
    - Convergence, at the smallest and the largest fraction: epochs and training seconds to the
      first validation AUC ≥ ``target_val_auc`` (median over seeds), fastest first; "not within N
      epochs" where it was not reached.

    Rows whose differences are nan (a missing reference, more than two classes) are left out of the
    comparisons.
    """
    level = ci_level
    fractions = sorted(summary["fraction"].unique())
    by = {(r.strategy, r.fraction): r for r in summary.itertuples(index=False)}
    strategies = [s for s in STUDY_STRATEGIES if any((s, f) in by for f in fractions)]
    pretrained = [s for s in strategies if s != SCRATCH]
    sentences: list[str] = []

    def valid(row, ref: str) -> bool:
        return row is not None and not any(math.isnan(getattr(row, f"vs_{ref}{x}")) for x in ("", "_lo", "_hi"))

    negative = []
    if SCRATCH in strategies:
        for f in fractions:
            parts = []
            for s in pretrained:
                row = by.get((s, f))
                if not valid(row, SCRATCH):
                    continue
                d, lo, hi = row.vs_scratch, row.vs_scratch_lo, row.vs_scratch_hi
                verdict = _verdict(lo, hi)
                if verdict == "better":
                    parts.append(f"{LABELS[s]} beats scratch by {d:+.2f} AUC ({_ci_words(lo, hi, level)})")
                elif verdict == "worse":
                    parts.append(f"{LABELS[s]} is below scratch by {d:+.2f} AUC ({_ci_words(lo, hi, level)})")
                    negative.append(f"{LABELS[s]} at {pct(f)} ({d:+.2f} AUC vs scratch, {_ci_words(lo, hi, level)})")
                else:
                    parts.append(f"{LABELS[s]} is within CI of scratch ({_diff(d, lo, hi, level)})")
            if parts:
                patients = by[(SCRATCH, f)].train_patients if (SCRATCH, f) in by else None
                who = f" ({patients} patients)" if patients is not None else ""
                sentences.append(f"At {pct(f)} of the training data{who}: " + "; ".join(parts) + ".")

    if "finetune" in strategies:
        for s in [p for p in pretrained if p != "finetune"]:
            rows = {f: by.get((s, f)) for f in fractions if valid(by.get((s, f)), "finetune")}
            if not rows:
                continue
            compared = sorted(rows)
            within = [f for f in compared if _verdict(rows[f].vs_finetune_lo, rows[f].vs_finetune_hi) == "within"]
            text = f"{LABELS[s].capitalize()} is within CI of fine-tuning {_within_phrase(within, compared)}"
            for verdict, winner, sign in (("worse", "fine-tuning", -1), ("better", LABELS[s], 1)):
                cases = [f for f in compared if _verdict(rows[f].vs_finetune_lo, rows[f].vs_finetune_hi) == verdict]
                if cases:
                    details = [f"{pct(f)} ({_diff(sign * rows[f].vs_finetune, *sorted((sign * rows[f].vs_finetune_lo, sign * rows[f].vs_finetune_hi)), level)})"
                               for f in cases]
                    text += f"; {winner} is better at " + _join(details)
            sentences.append(text + ".")
            losing = [f for f in compared if _verdict(rows[f].vs_finetune_lo, rows[f].vs_finetune_hi) == "better"]
            if losing:
                sentences.append(f"Fine-tuning losing to {LABELS[s]} at {_join([pct(f) for f in losing])} is more "
                                 f"likely its recipe than the data: it starts from the same features with more "
                                 f"freedom. {RECIPE_CHECKS}")

    if SCRATCH in strategies and pretrained:
        if negative:
            sentences.append("Pretrained below scratch: " + "; ".join(negative) + ". Before reading this as negative "
                             f"transfer, rule out an artefact: {RECIPE_CHECKS}")
        else:
            sentences.append(f"No negative transfer observed: no pretrained strategy's test AUC is below scratch's "
                             f"with a {level:.0%} CI excluding 0, at any fraction.")

    best = []
    for f in fractions:
        rows = [by[(s, f)] for s in strategies if (s, f) in by and not math.isnan(by[(s, f)].test_auc)]
        if rows:
            top = max(rows, key=lambda r: r.test_auc)
            best.append(f"{pct(f)}: {LABELS[top.strategy]} {top.test_auc:.2f} "
                        f"({level:.0%} CI {top.test_auc_lo:.2f} to {top.test_auc_hi:.2f})")
    if best:
        sentences.append("Highest test AUC per fraction: " + "; ".join(best) + ".")
    sentences += _chance_and_resolution(summary, strategies, fractions, level)

    if target_val_auc is not None:
        for f in sorted({fractions[0], fractions[-1]}):
            rows = [by[(s, f)] for s in strategies if (s, f) in by]
            reached = sorted([r for r in rows if not math.isnan(r.epochs_to_target)],
                             key=lambda r: (r.epochs_to_target, r.time_to_target_s))
            missed = [r for r in rows if math.isnan(r.epochs_to_target)]
            parts = [f"{LABELS[r.strategy]} after {r.epochs_to_target:g} epoch{'s' if r.epochs_to_target != 1 else ''} "
                     f"({r.time_to_target_s:.0f} s)" for r in reached]
            if missed:
                epochs = max(int(r.epochs) for r in missed)
                parts.append(f"{_join([LABELS[r.strategy] for r in missed])} not within {epochs} epoch{'s' if epochs != 1 else ''}")
            sentences.append(f"Validation AUC {target_val_auc:g} reached with {pct(f)} of the training data: "
                             + "; ".join(parts) + ".")
    return sentences


def _chance_and_resolution(summary: pd.DataFrame, strategies: list[str], fractions: list[float],
                           level: float) -> list[str]:
    """The chance and resolution sentences of :func:`findings`."""
    cells = [r for f in fractions for r in summary.itertuples(index=False)
             if r.fraction == f and r.strategy in strategies and not math.isnan(r.test_auc)]
    if not cells:
        return []
    name = lambda r: f"{LABELS[r.strategy]} at {pct(r.fraction)}"  # noqa: E731
    above = [r for r in cells if r.test_auc_lo > 0.5]
    below = [r for r in cells if r.test_auc_hi < 0.5]
    chance = f"above chance (its {level:.0%} CI excludes 0.5)"
    if not above:
        text = (f"No test AUC is above chance (every {level:.0%} CI includes 0.5 or lies below it): on this "
                "test set the study cannot show that any strategy learned the task")
    elif len(above) == len(cells):
        text = f"Test AUC is {chance} in every strategy × fraction cell"
    elif len(above) <= len(cells) / 2:
        text = f"Test AUC is {chance} in {len(above)} of {len(cells)} strategy × fraction cells: " + _join(
            [name(r) for r in above])
    else:
        text = f"Test AUC is {chance} in {len(above)} of {len(cells)} strategy × fraction cells, all but " + _join(
            [name(r) for r in cells if r not in above])
    if below:
        text += "; below chance: " + _join([f"{name(r)} ({r.test_auc:.2f})" for r in below])
    sentences = [text + "."]
    widths = [(getattr(r, f"vs_{ref}_hi") - getattr(r, f"vs_{ref}_lo")) / 2
              for r in cells for ref in REFERENCES if not math.isnan(getattr(r, f"vs_{ref}_hi"))]
    if widths:
        patients = getattr(cells[0], "test_patients", None)
        on = f" on {patients} test patients" if patients is not None and not pd.isna(patients) else ""
        sentences.append(f"Resolution: the paired {level:.0%} CIs of the differences are ±{float(np.median(widths)):.2f} "
                         f"AUC wide (median half-width){on}: smaller differences cannot be told from noise "
                         "here (more test patients or seeds narrow them).")
    return sentences


# ------------------------------------------------------------------------------------------ report


def _figure_learning_curve(summary: pd.DataFrame, level: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for strategy in [s for s in STUDY_STRATEGIES if s in set(summary["strategy"])]:
        rows = summary[summary["strategy"] == strategy].sort_values("fraction")
        x = rows["fraction"] * 100
        ax.fill_between(x, rows["test_auc_lo"], rows["test_auc_hi"], color=COLOURS[strategy], alpha=0.15, linewidth=0)
        ax.plot(x, rows["test_auc"], marker="o", color=COLOURS[strategy], label=LABELS[strategy])
    fractions = sorted(summary["fraction"].unique())
    ax.set_xscale("log")
    ax.set_xticks([f * 100 for f in fractions], [pct(f) for f in fractions])
    ax.minorticks_off()
    ax.axhline(0.5, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("training patients used (nested subsets)")
    ax.set_ylabel(f"test AUC (band: {level:.0%} CI, patient bootstrap)")
    ax.set_title("Learning curve: test AUC by training-data fraction")
    ax.legend(loc="lower right")
    return fig


def _figure_convergence(curves: pd.DataFrame, target: float):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fractions = sorted(curves["fraction"].unique())
    fig = Figure(figsize=(3.2 * len(fractions) + 0.6, 3.6), layout="constrained")
    axes = fig.subplots(1, len(fractions), sharey=True, squeeze=False)[0]
    for ax, fraction in zip(axes, fractions):
        part = curves[curves["fraction"] == fraction]
        for strategy in [s for s in STUDY_STRATEGIES if s in set(part["strategy"])]:
            mean = part[part["strategy"] == strategy].groupby("epoch")["val_auc"].mean()
            ax.plot(mean.index, mean.to_numpy(), marker=".", color=COLOURS[strategy], label=LABELS[strategy])
        ax.axhline(target, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{pct(fraction)} of training data")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(f"validation AUC (dashed: target {target:g})")
    axes[-1].legend(loc="lower right", fontsize="small")
    return fig


def summary_markdown(summary: pd.DataFrame, level: float = 0.95) -> str:
    """The summary as a markdown table (one row per strategy and fraction)."""
    ci = f"{level:.0%} CI"
    lines = [(f"| strategy | data | patients | test AUC ({ci}) | Δ vs scratch ({ci}) | "
              f"Δ vs fine-tuning ({ci}) | best epoch | epochs to target | time to target | train time |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples(index=False):
        def delta(ref: str, r=r) -> str:
            d = getattr(r, f"vs_{ref}")
            return "–" if math.isnan(d) else f"{d:+.3f} [{getattr(r, f'vs_{ref}_lo'):+.3f}, {getattr(r, f'vs_{ref}_hi'):+.3f}]"
        target = NOT_REACHED if math.isnan(r.epochs_to_target) else f"{r.epochs_to_target:g}"
        seconds = NOT_REACHED if math.isnan(r.time_to_target_s) else f"{r.time_to_target_s:.0f} s"
        lines.append(f"| {LABELS[r.strategy]} | {pct(r.fraction)} | {r.train_patients} | {num(r.test_auc)} "
                     f"[{num(r.test_auc_lo)}, {num(r.test_auc_hi)}] | {delta('scratch')} | {delta('finetune')} | "
                     f"{r.best_epoch:g} | {target} | {seconds} | {r.train_time_s:.0f} s |")
    return "\n".join(lines)


def _csv(frame: pd.DataFrame) -> str:
    out = frame.copy()
    for column in ("epochs_to_target", "time_to_target_s"):
        out[column] = out[column].map(lambda v: NOT_REACHED if pd.isna(v) else f"{v:g}")
    return out.to_csv(index=False, float_format="%.4f")


def report(table: pd.DataFrame, summary: pd.DataFrame, curves: pd.DataFrame, sentences: list[str],
           out_dir: Path, grid: StudyGrid, grid_name: str = "cpu", wall_s: float | None = None) -> dict[str, Path]:
    """Write ``study.md``, ``study.csv`` (per run), ``study_summary.csv`` and the two figures.

    Returns the paths by name (``markdown, table, summary, learning_curve, convergence``).
    """
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "study.md", "table": out_dir / "study.csv", "summary": out_dir / "study_summary.csv",
             "learning_curve": out_dir / "study/learning_curve.png", "convergence": out_dir / "study/convergence.png"}
    atomic_write_bytes(paths["learning_curve"], png(_figure_learning_curve(summary, grid.ci_level), quantise=False))
    atomic_write_bytes(paths["convergence"], png(_figure_convergence(curves, grid.target_val_auc), quantise=False))
    atomic_write_text(paths["table"], _csv(table))
    atomic_write_text(paths["summary"], _csv(summary))
    overrides = ", ".join(f"`{k}={v}`" for k, v in grid.overrides.items()) or "none"
    runs = "\n".join(
        f"| `{r.experiment}` | {LABELS[r.strategy]} | {pct(r.fraction)} | {r.seed} | {r.train_patients} / "
        f"{r.train_images} | {num(r.test_auc)} [{num(r.test_auc_lo)}, {num(r.test_auc_hi)}] | {r.best_epoch} | "
        f"{NOT_REACHED if math.isnan(r.epochs_to_target) else f'{r.epochs_to_target:g}'} | {r.train_time_s:.0f} s |"
        for r in table.itertuples(index=False))
    first, second = table["experiment"].iloc[0], table["experiment"].iloc[-1]
    took = f" The study took {wall_s / 60:.1f} min." if wall_s else ""
    budget = f", or more to reach {grid.min_steps} optimiser steps" if grid.min_steps else ""
    text = f"""# Transfer-learning study

What ImageNet pretraining buys on this site's data: grid `{grid_name}`, {len(table)} runs =
{len(grid.strategies)} strategies × {len(grid.fractions)} training-data fractions × {len(grid.seeds)} seed(s),
{grid.epochs} epochs each{budget} (patience {grid.patience}); every run validated and tested on the same patients,
smaller fractions are nested subsets of the training patients. Overrides applied to every run: {overrides}.{took}

## Findings

{chr(10).join(f"- {s}" for s in sentences)}

Δ is a strategy's test AUC minus the reference's on the same test patients (averaged over seeds), with a
{grid.ci_level:.0%} CI from a paired patient bootstrap ({grid.n_boot} resamples); "beats" and "below" mean that
interval excludes 0, "within CI" that it includes 0. Time to target: epochs and training seconds (training +
validation, set-up excluded) until the validation AUC first reached {grid.target_val_auc:g}.

## Learning curve

![test AUC by training-data fraction](study/learning_curve.png)

## Convergence

![validation AUC by epoch](study/convergence.png)

## Summary (per strategy and fraction)

{summary_markdown(summary, grid.ci_level)}

## Runs

| experiment | strategy | data | seed | train patients / images | test AUC (CI) | best epoch | epochs to target | train time |
|---|---|---|---|---|---|---|---|---|
{runs}

Tables: `study.csv` (per run), `study_summary.csv`. Every run is a DVC experiment: `dvc exp show`,
`dvc plots diff {first} {second}`, `dvc exp apply <name>`.
"""
    atomic_write_text(paths["markdown"], text)
    log.info("study: report %s", paths["markdown"])
    return paths


# --------------------------------------------------------------------------------------------- run


@dataclass
class StudySummary:
    runs: int
    ran: int
    wall_s: float
    report: str
    findings: list[str]


def run(grid: StudyGrid, repo: Path, *, grid_name: str = "cpu", prefix: str = "study", pretrained: str = "imagenet",
        jobs: int | None = None, resume: bool = False, out_dir: Path | None = None,
        echo: Callable[[str], None] | None = None) -> StudySummary:
    """Run the whole study in ``repo``: check, prepare, queue, run, collect, compare, report.

    Args:
        grid: the grid (:meth:`StudyParams.select`).
        repo: the DVC project (a git repository with a commit).
        grid_name: its name, for the report.
        prefix: experiment-name prefix.
        pretrained: the workspace's ``model.pretrained`` (see :func:`plan`).
        jobs: experiments at once (default ``grid.jobs``).
        resume: keep runs whose experiment exists (see :func:`queue`).
        out_dir: report directory (default ``repo/reports``).
        echo: receives every line of DVC's output (default: the debug log).
    """
    started = time.perf_counter()
    repo = Path(repo).resolve()
    echo = echo or log.debug
    runs = plan(grid, prefix, pretrained)
    base = preflight(repo)
    prepare(repo, echo)
    queued = queue(repo, runs, base, resume=resume)
    run_queue(repo, queued, jobs or grid.jobs, echo)
    table, curves, predictions = collect(repo, runs, base, grid.target_val_auc)
    summary = compare(table, predictions, grid.n_boot, grid.ci_level)
    sentences = findings(summary, grid.target_val_auc, grid.ci_level)
    wall = time.perf_counter() - started
    paths = report(table, summary, curves, sentences, Path(out_dir or repo / "reports"), grid, grid_name, wall)
    return StudySummary(len(runs), len(queued), wall, str(paths["markdown"]), sentences)

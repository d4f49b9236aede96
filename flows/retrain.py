"""The ``retrain`` flow: the DVC pipeline as Prefect tasks, one per stage, plus promotion and push.

Each stage task runs ``dvc repro --single-item <stage>`` in the project, so a scheduled run and a
workstation ``dvc repro`` share one cache, one dvc.lock and one result; unchanged stages are skipped
by DVC and shown as ``Skipped`` in the UI. Stage output streams into the task's log. The flow holds
a lock file for its whole run: one run per repository at a time (DVC itself allows only one process).
Nothing is computed here: stages compute, this module orchestrates and publishes artifacts.
"""

from __future__ import annotations

import json
import os
import re
import time
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from pipeline.dvc_cli import run_dvc
from pipeline.params import ParamsError, check, param
from pipeline.paths import EXPORT_DIR, Project

CRON_ALIASES = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")


@dataclass(frozen=True)
class RetrainParams:
    """``retrain`` section of params.yaml: the flow's schedule and defaults.

    Attributes:
        cron: when ``medtl serve`` runs the flow: a five-field cron expression (minute hour day month weekday)
            or an alias such as ``@weekly``.
        timezone: an IANA time zone name (``UTC``, ``Europe/Berlin``) the cron expression is read in.
        promote: run the champion/challenger step.
        push: ``dvc push`` after a successful run.
        export: after a promotion, export the new champion (TorchScript, ONNX, MONAI bundle: ``medtl export``).
        lock_timeout_s: seconds a second run on the repo waits for the first, >= 0 (0: fail at once).
        pull_retries: when the source is a PACS, how often the pull task is retried after a transient
            failure (server down, timeout, 5xx; a refused login is not retried).
        pull_retry_delay_s: seconds between those retries.
    """

    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    promote: bool = True
    push: bool = True
    export: bool = False
    lock_timeout_s: float = param(0.0, min=0)
    pull_retries: int = param(2, min=0, max=10)
    pull_retry_delay_s: float = param(60.0, min=0)

    def __post_init__(self) -> None:
        check(self, "retrain")
        if len(self.cron.split()) != 5 and self.cron.strip() not in CRON_ALIASES:
            raise ParamsError(f"retrain.cron: must be five fields (minute hour day month weekday) or one of "
                              f"{', '.join(CRON_ALIASES)}, got {self.cron!r}")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ParamsError(f"retrain.timezone: not a known time zone name (e.g. UTC, Europe/Berlin), "
                              f"got {self.timezone!r}") from exc


LOCK_FILE = ".medtl/retrain.lock"
_EPOCH = re.compile(r"epoch (\d+)/(\d+): train loss")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the end of its output."""


#: a pull failure worth retrying: the server was down, slow or answered 5xx (medtl pull's one-line errors)
_TRANSIENT = re.compile(r"cannot connect|timed out|HTTP 5\d\d|association (rejected|aborted)")


def _pull_is_transient(task, task_run, state) -> bool:
    """Prefect's retry condition for the pull task: retry network trouble, not a refused login."""
    try:
        state.result()
    except StageFailed as exc:
        return bool(_TRANSIENT.search(str(exc)))
    except Exception:  # noqa: BLE001 - anything else is not a known transient failure
        return False
    return False


def _stage_error(stage: str, code: int, tail: list[str]) -> str:
    """The stage's one-line medtl error when it printed one (what the user needs), else the output's end."""
    errors = [line.split("medtl: error:", 1)[1].strip() for line in tail if "medtl: error:" in line]
    if errors:
        return f"stage {stage} failed: {errors[-1]}"
    return f"stage {stage} failed (dvc exit {code}):\n" + "\n".join(tail[-15:])


class RepoBusy(RuntimeError):
    """Another retrain run holds the repository lock."""


PULL_STAGE = "pull"


def _data_source(repo: Path) -> str:
    from pipeline.params import DataParams, load_section

    return load_section(DataParams, Project(repo).params, "data").source


def pipeline_stages(repo: Path) -> list[str]:
    """Stage names in dvc.yaml order (dvc.yaml is the one definition of the stages)."""
    return list((yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages", {}))


@task(name="stage", task_run_name="{stage}")
def run_stage(repo: Path, stage: str, force: bool = False):
    """``dvc repro --single-item <stage>`` (``--force``: even when DVC sees no change), its output streamed
    line by line into the task log."""
    logger = get_run_logger()
    seen = {"skipped": False, "progress": None}

    def on_line(line: str) -> None:
        logger.info("%s", line)
        seen["skipped"] = seen["skipped"] or "didn't change, skipping" in line
        match = _EPOCH.search(line)
        if match:
            done, total = int(match.group(1)), int(match.group(2))
            if seen["progress"] is None:
                seen["progress"] = create_progress_artifact(progress=0.0, key=f"{stage}-progress",
                                                            description=f"{stage}: epochs done / planned")
            update_progress_artifact(seen["progress"], progress=100.0 * done / total)

    started = time.perf_counter()
    code, tail = run_dvc(repo, "repro", *(["--force"] if force else []), "--single-item", stage, on_line=on_line)
    if code != 0:
        raise StageFailed(_stage_error(stage, code, tail))
    seconds = round(time.perf_counter() - started, 1)
    if seen["skipped"]:
        return Completed(name="Skipped", message=f"{stage}: unchanged, skipped by DVC",
                         data={"stage": stage, "ran": False, "seconds": seconds})
    return {"stage": stage, "ran": True, "seconds": seconds}


@task(name="promote", task_run_name="promote")
def promote_task(repo: Path, force: bool = False) -> dict:
    from pipeline import promote

    project = Project(repo)
    return promote.run_with_params(project.params, project.model, project.reports_dir, project.images_dir,
                                   project.splits_csv, root=project.root, force=force)


@task(name="export", task_run_name="export champion", cache_policy=NO_CACHE)
def export_task(repo: Path) -> str:
    """Export the champion just promoted (:func:`pipeline.export.export_champion`); the export's folder."""
    from pipeline import export, promote
    from pipeline.params import load_section

    project = Project(repo)
    registry = project.registry(load_section(promote.PromoteParams, project.params, "promote").registry)
    out, result = export.export_champion(registry, project.root / EXPORT_DIR, project.images_dir)
    get_run_logger().info("export: %s into %s", ", ".join(result["formats"]), out)
    return str(out)


@task(name="dvc push", task_run_name="dvc push", retries=2, retry_delay_seconds=10)
def push_task(repo: Path) -> str:
    """``dvc push`` to the default remote (network or disk trouble is worth a retry); raw data is push: false."""
    logger = get_run_logger()
    code, lines = run_dvc(repo, "remote", "default")
    remote = lines[-1].strip() if code == 0 and lines else ""
    if not remote:
        logger.warning("no default DVC remote configured: nothing pushed (dvc remote add -d ...)")
        return "no remote"
    code, tail = run_dvc(repo, "push", on_line=lambda line: logger.info("%s", line))
    if code != 0:
        raise RuntimeError(f"dvc push to {remote} failed (exit {code}): " + " | ".join(tail[-10:]))
    return remote


def apply_overrides(repo: Path, overrides: dict[str, Any]) -> None:
    """Set ``section.key`` values in params.yaml (as ``dvc exp run -S`` does), keeping its comments."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    path = Project(repo).params
    data = yaml_rt.load(path.read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"params override {dotted!r}: no section {part!r} in {path}")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"params override {dotted!r}: no key {leaf!r} in {path} (known: {sorted(node)})")
        node[leaf] = value
    tmp = path.with_suffix(".yaml.tmp")
    with open(tmp, "w") as fh:
        yaml_rt.dump(data, fh)
    os.replace(tmp, path)


def _publish(repo: Path, promotion: dict | None) -> None:
    from pipeline import evaluate

    project = Project(repo)
    if project.pull_summary.exists():
        p = json.loads(project.pull_summary.read_text())
        if not p.get("skipped"):
            create_markdown_artifact(
                key="pull-summary", description="PACS pull: studies queried, new, retrieved, failed",
                markdown=(f"# Pull from {p['source']}\n\n| studies queried | new | changed | unchanged | retrieved "
                          f"| failed | instances retrieved | MB | seconds |\n|---|---|---|---|---|---|---|---|---|\n"
                          f"| {p['studies_queried']} | {p['studies_new']} | {p['studies_changed']} | "
                          f"{p['studies_unchanged']} | {p['studies_retrieved']} | {p['studies_failed']} | "
                          f"{p['instances_retrieved']} | {p['bytes_retrieved'] / 1e6:.1f} | {p['seconds']} |\n"))
    summary_path = project.ingest_summary
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        rejected = "\n".join(f"| {reason} | {count} |" for reason, count in sorted(s.get("rejected", {}).items()))
        create_markdown_artifact(
            key="ingest-summary", description="Ingest: files, images, patients, rejected by reason",
            markdown=(f"# Ingest\n\n{s['files_seen']} files seen, {s['ingested']} ingested as {s['images']} images "
                      f"of {s['patients']} patients, {sum(s.get('rejected', {}).values())} rejected.\n\n"
                      f"| rejected: reason | files |\n|---|---|\n{rejected}\n"))
    metrics_path = project.metrics
    if metrics_path.exists():
        create_markdown_artifact(key="test-metrics", description="Test metrics with patient-bootstrap 95% CIs",
                                 markdown="# Test metrics\n\n" + evaluate.metrics_table(json.loads(metrics_path.read_text())))
    report_path = project.report_md
    if report_path.exists():
        create_markdown_artifact(key="evaluation-report", description="Evaluation report (figures in reports/report.html)",
                                 markdown=report_path.read_text())
    if promotion is not None:
        decision = promotion["decision"]
        verdict = "promoted" if decision["promote"] else "not promoted"
        create_markdown_artifact(
            key="promotion-decision", description="Champion/challenger decision",
            markdown=(f"# Promotion: {verdict}\n\nChampion before: {promotion.get('champion_before')}; after: "
                      f"{promotion.get('champion_after')}\n\n" + "\n".join(f"- {r}" for r in decision["reasons"])))


@flow(name="retrain", log_prints=True)
def retrain(repo: str = ".", overrides: dict[str, Any] | None = None, promote: bool = True, push: bool = True,
            lock_timeout_s: float = 0.0, export: bool = False, pull_retries: int = 2,
            pull_retry_delay_s: float = 60.0) -> dict:
    """Run the pipeline's stages through DVC, then promote the model if it is better, then push.

    Args:
        repo: the project directory (dvc.yaml, params.yaml).
        overrides: params.yaml values to set first, as ``{"train.epochs": 5}`` (kept, like ``dvc exp run -S``).
        promote: compare with the champion and promote if better.
        push: ``dvc push`` to the default remote after a successful run.
        lock_timeout_s: how long to wait for another run's lock before failing (0: fail at once).
        export: after a promotion, export the new champion (TorchScript, ONNX, MONAI bundle).
        pull_retries, pull_retry_delay_s: retries of the pull task (a PACS source) after a transient failure.
    """
    from filelock import FileLock, Timeout

    logger = get_run_logger()
    root = Path(repo).resolve()
    lock_path = root / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=lock_timeout_s)
    except Timeout:
        raise RepoBusy(f"another retrain run holds {lock_path}; waited {lock_timeout_s:.0f} s") from None
    try:
        if overrides:
            apply_overrides(root, overrides)
        results = {}
        source = _data_source(root)
        for stage in pipeline_stages(root):
            if stage == PULL_STAGE and source != "folder":
                # the PACS changes without DVC seeing it: always pull (new studies only, by the cursor); what
                # comes after reruns only if something new arrived
                state = run_stage.with_options(task_run_name=f"pull from {source}", retries=pull_retries,
                                               retry_delay_seconds=pull_retry_delay_s,
                                               retry_condition_fn=_pull_is_transient)(root, stage, force=True,
                                                                                      return_state=True)
            else:
                state = run_stage(root, stage, return_state=True)
            if state.is_failed():
                raise StageFailed(f"stage {stage} failed: {state.message}")
            results[stage] = "skipped" if state.name == "Skipped" else "ran"
        promotion = promote_task(root) if promote else None
        exported = (export_task(root) if export and promotion is not None and promotion["decision"]["promote"]
                    else None)
        _publish(root, promotion)
        pushed = push_task(root) if push else "off"
        logger.info("retrain: %s; promotion %s; push %s", results,
                    promotion["decision"]["promote"] if promotion else "off", pushed)
        return {"stages": results, "promotion": promotion, "pushed": pushed, "exported": exported}
    finally:
        lock.release()



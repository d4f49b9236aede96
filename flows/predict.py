"""The ``predict`` flow: score the studies that arrived in the input with the champion (or a given version).

One task (``medtl predict``'s :func:`pipeline.predict.run`, params from the project's params.yaml) and a
``predict-summary`` artifact: the model and threshold, counts (files, images, studies, new and positive
studies) and the score distribution. Ingest's cache makes a rerun read only the files that arrived since
the last one; ``studies.csv`` marks those studies ``new``. ``medtl serve-predict`` serves it on a schedule.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import drift
from pipeline.paths import LOCAL_DIR, PREDICT_DIR, Project


@task(name="predict", task_run_name="predict", cache_policy=NO_CACHE)
def predict_task(repo: Path, input_dir: Path | None, model: Path | None) -> dict:
    """:func:`pipeline.predict.run` on ``input_dir``; None: the PACS of ``data.source`` (pull the new
    studies, score them, store each study's SR back: :func:`pipeline.predict.run_from_pacs`)."""
    from pipeline import ingest, predict, promote
    from pipeline.fanout import FanoutParams
    from pipeline.params import DataParams, load_section

    project = Project(repo)
    promote_params = load_section(promote.PromoteParams, project.params, "promote")
    root = project.root / PREDICT_DIR
    params = load_section(predict.PredictParams, project.params, "predict")
    common = dict(model_path=model, registry=project.registry(promote_params.registry), work_dir=root / "work",
                  local_dir=project.root / LOCAL_DIR / "predict",
                  ingest_params=load_section(ingest.IngestParams, project.params, "ingest"),
                  fanout=load_section(FanoutParams, project.params, "fanout"))
    if input_dir is None:
        from pipeline.sources import pacs

        source = load_section(DataParams, project.params, "data").source
        return predict.run_from_pacs(params, source, load_section(pacs.PacsParams, project.params, "pacs"),
                                     root / "results", **common)
    return predict.run(params, input_dir, root / "results", **common)


def summary_markdown(summary: dict) -> str:
    """The artifact: what scored what, the counts and the score deciles."""
    model, counts, threshold = summary["model"], summary["counts"], summary["threshold"]
    who = f"champion version {model['version']}" if model["version"] is not None else model["path"]
    lines = [f"# Predictions of {model['name'] or 'the model'} ({who})", "",
             f"Threshold **{threshold['value']:.3f}** ({threshold['from']}); study score: {summary['aggregation']} "
             f"over its images; positive class **{summary['positive_class']}**.", "",
             "| | count |", "|---|---|"]
    for name, key in (("files seen", "files_seen"), ("images scored", "images"), ("studies", "studies"),
                      ("new studies (since the last run)", "new_studies"), ("positive studies", "positive_studies"),
                      ("new positive studies", "new_positive_studies"), ("structured reports", "structured_reports")):
        lines.append(f"| {name} | {counts.get(key, 0)} |")
    if summary.get("pull"):
        pulled, stored = summary["pull"], summary.get("stored") or {}
        lines += [f"| studies pulled from the PACS ({pulled['source']}) | {pulled['studies_retrieved']} of "
                  f"{pulled['studies_queried']} queried ({pulled['studies_failed']} failed) |",
                  f"| results stored into their studies | {stored.get('stored', 0)} "
                  f"({stored.get('already_present', 0)} already there) |"]
    rejected = counts["rejected_files"]
    lines += [f"| files rejected | {sum(rejected.values())} {rejected or ''} |", "",
              drift.summary_line(summary.get("drift")), "",
              "Study score deciles: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["score_deciles"]["studies"].items()),
              ""]
    return "\n".join(lines)


@flow(name="predict", log_prints=True)
def predict_flow(repo: str = ".", input_dir: str | None = None, version: int | None = None,
                 model: str | None = None) -> dict:
    """Score new studies in ``input_dir`` (default: params ``data.raw_dir``; with ``data.source`` a PACS,
    the studies new in the PACS, whose results go back into it as SRs).

    Args:
        repo: the project (params.yaml, registry).
        input_dir: the folder new studies arrive in.
        version: a registry version to use instead of the current champion.
        model: a model.pt path (overrides ``version``).
    """
    project = Project(Path(repo).resolve())
    from pipeline.params import DataParams, load_section

    from_pacs = input_dir is None and load_section(DataParams, project.params, "data").source != "folder"
    if input_dir is None and not from_pacs:
        input_dir = str(project.root / load_section(DataParams, project.params, "data").raw_dir)
    model_path = Path(model) if model else None
    if model_path is None and version is not None:
        from pipeline import promote
        from pipeline.params import load_section

        registry = project.registry(load_section(promote.PromoteParams, project.params, "promote").registry)
        model_path = promote.version_dir(registry, version) / "model.pt"
        if not model_path.is_file():
            raise FileNotFoundError(f"{registry}: no version {version} (no {model_path})")
    summary = predict_task(project.root, None if from_pacs else Path(input_dir), model_path)
    create_markdown_artifact(key="predict-summary", markdown=summary_markdown(summary),
                             description="Predict: counts and score distribution")
    get_run_logger().info("predict: %d studies (%d new), %d positive", summary["counts"]["studies"],
                          summary["counts"]["new_studies"], summary["counts"]["positive_studies"])
    return summary

"""The ``transfer_study`` flow: the transfer-learning study (:mod:`pipeline.study`) as Prefect tasks.

One task per step — plan, prepare (shared stages up to date), queue (``dvc exp run --queue``), run
the queue, collect, compare, report — so the UI shows each step's state, time and logs (DVC's output
streams into the prepare and run tasks' logs), and an artifact ``study-table`` with the findings and
the summary table. The study itself is computed in :mod:`pipeline.study`; this module orchestrates.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import study


def _echo():
    logger = get_run_logger()
    return lambda line: logger.info("%s", line)


@task(name="study: plan", task_run_name="plan", cache_policy=NO_CACHE)
def plan_task(repo: Path, grid: str | None) -> dict:
    """Read the ``study`` (and ``model.pretrained``) params at the edge and lay out the runs."""
    from pipeline.params import load_section

    params = load_section(study.StudyParams, repo / "params.yaml", "study")
    selected = params.select(grid)
    pretrained = study.workspace_pretrained(repo / "params.yaml")
    runs = study.plan(selected, params.name, pretrained)
    get_run_logger().info("study: grid %s, %d runs: %s", grid or params.grid, len(runs), ", ".join(r.name for r in runs))
    return {"grid": selected, "grid_name": grid or params.grid, "runs": runs}


@task(name="study: prepare", task_run_name="prepare", cache_policy=NO_CACHE)
def prepare_task(repo: Path) -> str:
    base = study.preflight(repo)
    study.prepare(repo, _echo())
    return base


@task(name="study: queue", task_run_name="queue", cache_policy=NO_CACHE)
def queue_task(repo: Path, runs: list[study.Run], base: str, resume: bool) -> list[study.Run]:
    return study.queue(repo, runs, base, resume=resume)


@task(name="study: run queue", task_run_name="run queue", cache_policy=NO_CACHE)
def run_queue_task(repo: Path, runs: list[study.Run], jobs: int) -> None:
    study.run_queue(repo, runs, jobs, _echo())


@task(name="study: collect", task_run_name="collect", cache_policy=NO_CACHE)
def collect_task(repo: Path, runs: list[study.Run], base: str, target_val_auc: float):
    return study.collect(repo, runs, base, target_val_auc)


@task(name="study: compare", task_run_name="compare", cache_policy=NO_CACHE)
def compare_task(table, predictions, grid: study.StudyGrid):
    return study.compare(table, predictions, grid.n_boot, grid.ci_level)


@task(name="study: report", task_run_name="report", cache_policy=NO_CACHE)
def report_task(table, summary, curves, grid: study.StudyGrid, grid_name: str, out_dir: Path, wall_s: float) -> dict:
    sentences = study.findings(summary, grid.target_val_auc, grid.ci_level)
    paths = study.report(table, summary, curves, sentences, out_dir, grid, grid_name, wall_s)
    create_markdown_artifact(
        key="study-table", description="Transfer-learning study: findings and the table per strategy and fraction",
        markdown=("# Transfer-learning study\n\n" + "\n".join(f"- {s}" for s in sentences) + "\n\n"
                  + study.summary_markdown(summary, grid.ci_level) + f"\n\nReport: {paths['markdown']}\n"))
    return {"report": str(paths["markdown"]), "findings": sentences}


@flow(name="transfer_study", log_prints=True)
def transfer_study(repo: str = ".", grid: str | None = None, jobs: int | None = None, resume: bool = False) -> dict:
    """Run the transfer-learning study in ``repo`` and publish its table as the artifact ``study-table``.

    Args:
        repo: the project directory (dvc.yaml, params.yaml; a git repository with a commit).
        grid: a grid of ``study.grids`` (default ``study.grid``).
        jobs: experiments at once (default: the grid's ``jobs``).
        resume: keep runs whose experiment already exists.

    Returns:
        ``{"report": path of study.md, "findings": [sentences], "runs": n, "ran": n queued, "wall_s"}``.
    """
    import time

    started = time.perf_counter()
    root = Path(repo).resolve()
    planned = plan_task(root, grid)
    base = prepare_task(root)
    queued = queue_task(root, planned["runs"], base, resume)
    run_queue_task(root, queued, jobs or planned["grid"].jobs)
    table, curves, predictions = collect_task(root, planned["runs"], base, planned["grid"].target_val_auc)
    summary = compare_task(table, predictions, planned["grid"])
    result = report_task(table, summary, curves, planned["grid"], planned["grid_name"], root / "reports",
                         time.perf_counter() - started)
    return {**result, "runs": len(planned["runs"]), "ran": len(queued), "wall_s": time.perf_counter() - started}

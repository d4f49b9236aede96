"""`medtl` command line: one subcommand per stage, each a thin shell over the stage's ``run``.

Arguments name paths; params come from params.yaml (``--params``), one section per stage, and
command-line flags override single values.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import yaml

from pipeline.errors import USER_ERROR, MedtlError, output_error
from pipeline.fanout import RUNNERS
from pipeline import paths
from pipeline.params import ParamsError, load_section

log = logging.getLogger("medtl")


def _cmd_synth(args: argparse.Namespace) -> int:
    from pipeline import synth

    if args.add is not None:
        summary = synth.add(Path(args.out), args.add)
    else:
        params = load_section(synth.SynthParams, args.params, "synth", patients=args.patients, seed=args.seed)
        summary = synth.run(params, _out_dir(args.out))
    print(json.dumps(asdict(summary)))  # one line: one log line in the Prefect UI
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline import ingest
    from pipeline.fanout import FanoutParams

    params = load_section(ingest.IngestParams, args.params, "ingest", workers=args.workers)
    fanout = load_section(FanoutParams, args.params, "fanout", runner=args.runner)
    lesions = None if args.lesions in (None, "", "none", "None") else Path(args.lesions)
    summary = ingest.run(params, Path(args.input), Path(args.labels), Path(args.out),
                         quarantine_dir=Path(args.quarantine) if args.quarantine else None, fanout=fanout,
                         lesions_csv=lesions, classes=_ingest_classes(args.params))
    print(f"ingest: {summary.files_seen} files seen, {summary.ingested} ingested as {summary.images} images "
          f"of {summary.patients} patients; {summary.rejected_total} rejected {summary.rejected}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline import preprocess
    from pipeline.fanout import FanoutParams

    params = load_section(preprocess.PreprocessParams, args.params, "preprocess", workers=args.workers)
    fanout = load_section(FanoutParams, args.params, "fanout", runner=args.runner)
    ingest_dir = Path(args.ingest)
    _inputs("ingest", ingest_dir / "manifest.parquet")
    summary = preprocess.run(params, ingest_dir, _out_dir(args.out), fanout=fanout)
    print(f"preprocess: {summary.images} images -> {summary.shape} float16, {summary.rejected} rejected")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from pipeline import split

    params = load_section(split.SplitParams, args.params, "split")
    images = Path(args.images)
    _inputs("preprocess", images / "index.parquet", images / "tensors.npy")
    summary = split.run(params, images / "index.parquet", images / "tensors.npy", _out_dir(args.out))
    print(f"split: images {summary.images}, patients {summary.patients}, duplicate groups "
          f"{summary.duplicate_groups_exact} exact / {summary.duplicate_groups_near} near, "
          f"patients in more than one split: {summary.patients_in_multiple_splits}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline import models, train

    params = load_section(train.TrainParams, args.params, "train", epochs=args.epochs, device=args.device)
    model_params = load_section(models.ModelParams, args.params, "model")
    images = Path(args.images)
    _inputs("preprocess", images / "tensors.npy", images / "index.parquet")
    _inputs("split", Path(args.splits))
    summary = train.run(params, model_params, images, Path(args.splits), _out_dir(args.out),
                        progress=not args.no_progress)
    if summary.world_size == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(f"train: {summary.epochs_run} epochs ({'early stop, ' if summary.stopped_early else ''}"
              f"best epoch {summary.best_epoch}, validation AUC {summary.best_val_auc:.3f}) on {summary.device} "
              f"x{summary.world_size}, {summary.images_per_s:.1f} images/s, {summary.wall_s:.0f} s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline import evaluate

    params = load_section(evaluate.EvaluateParams, args.params, "evaluate", device=args.device)
    images = Path(args.images)
    _inputs("train", Path(args.model))
    _inputs("preprocess", images / "tensors.npy", images / "index.parquet")
    _inputs("split", Path(args.splits))
    summary = evaluate.run(params, Path(args.model), images, Path(args.splits), _out_dir(args.out))
    lo, hi = summary.test_auc_ci
    line = f"evaluate: test AUC {summary.test_auc:.3f} [{lo:.3f}, {hi:.3f}], {summary.test_images} images of " \
           f"{summary.test_patients} patients"
    if summary.threshold is not None:
        line += (f"; at threshold {summary.threshold:.3f}: sensitivity {summary.test_sensitivity:.3f}, "
                 f"specificity {summary.test_specificity:.3f}")
    print(line + (f"; report {summary.report}" if summary.report else ""))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from pipeline import promote

    images, reports = Path(args.images), Path(args.reports)
    _inputs("train", Path(args.model))
    _inputs("evaluate", reports / paths.METRICS, reports / paths.PREDICTIONS)
    _inputs("preprocess", images / "index.parquet", images / "tensors.npy")
    _inputs("split", Path(args.splits))
    result = promote.run_with_params(args.params, Path(args.model), reports, images, Path(args.splits),
                                     registry=args.registry, force=args.force)
    decision = result["decision"]
    print(("promote: promoted" if decision["promote"] else "promote: not promoted")
          + f" (champion before: {result.get('champion_before')}, after: {result.get('champion_after')}); "
          + "; ".join(decision["reasons"]))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pipeline import ingest, predict, promote
    from pipeline.fanout import FanoutParams

    params = load_section(predict.PredictParams, args.params, "predict", device=args.device)
    root = Path(args.predict_dir)
    if (args.input is None) == (not args.pacs):
        raise MedtlError("predict: give --input DIR (a folder of new studies) or --pacs (the PACS of params pacs)")
    common = dict(model_path=Path(args.model) if args.model else None,
                  registry=Path(args.registry or load_section(promote.PromoteParams, args.params, "promote").registry),
                  work_dir=root / "work", ingest_params=load_section(ingest.IngestParams, args.params, "ingest"),
                  fanout=load_section(FanoutParams, args.params, "fanout"), threshold=args.threshold)
    if args.pacs:
        from pipeline.params import DataParams
        from pipeline.sources import pacs

        source = load_section(DataParams, args.params, "data").source
        if source == "folder":
            raise MedtlError(f"{args.params}: data.source: predict --pacs needs a PACS (dicomweb or dimse), got 'folder'")
        summary = predict.run_from_pacs(params, source, load_section(pacs.PacsParams, args.params, "pacs"),
                                        root / "results", local_dir=Path(args.local) / "predict", **common)
        p, st = summary["pull"], summary["stored"]
        print(f"predict: pulled {p['studies_retrieved']} new or changed studies ({p['instances_retrieved']} instances) "
              f"from {source}; stored {st['stored']} SRs into their studies ({st['already_present']} already there)")
    else:
        summary = predict.run(params, Path(args.input), root / "results", local_dir=Path(args.local) / "predict",
                              **common)
    counts, model = summary["counts"], summary["model"]
    print(f"predict: {counts['images']} images of {counts['studies']} studies scored with "
          f"{'champion v' + str(model['version']) if model['version'] else model['path']} at threshold "
          f"{summary['threshold']['value']:.3f} ({summary['threshold']['from']}); {counts['positive_studies']} "
          f"studies positive; {sum(counts['rejected_files'].values())} files rejected {counts['rejected_files']}; "
          f"results in {root / 'results'}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline import evaluate, ingest, promote, validate
    from pipeline.fanout import FanoutParams

    root = Path(args.out)
    summary = validate.run(
        load_section(evaluate.EvaluateParams, args.params, "evaluate", device=args.device), Path(args.input),
        Path(args.labels), root, model_path=Path(args.model) if args.model else None,
        registry=Path(args.registry or load_section(promote.PromoteParams, args.params, "promote").registry),
        work_dir=root / "work", local_dir=Path(args.local) / "validate",
        ingest_params=load_section(ingest.IngestParams, args.params, "ingest"),
        fanout=load_section(FanoutParams, args.params, "fanout"),
        lesions_csv=Path(args.lesions) if args.lesions else None)
    print(f"validate: external test AUC {summary.test_auc:.3f} [{summary.test_auc_ci[0]:.3f}, "
          f"{summary.test_auc_ci[1]:.3f}] on {summary.test_images} images of {summary.test_patients} patients at the "
          f"frozen threshold {summary.threshold:.3f}; report {summary.report}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline import export, promote

    registry = Path(args.registry or load_section(promote.PromoteParams, args.params, "promote").registry)
    out, result = export.export_champion(registry, Path(args.out), Path(args.images),
                                         model_path=Path(args.model) if args.model else None, formats=args.formats)
    print(f"export: {', '.join(args.formats)} into {out}; parity (max |logit difference|, "
          f"fp32): {json.dumps(result.get('parity', {}))}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from pipeline import evaluate

    reports, models_dir = Path(args.reports), Path(args.models)
    metrics_path = reports / paths.METRICS
    if not metrics_path.exists():
        raise MedtlError(f"{metrics_path} does not exist: run `dvc repro` (or `medtl evaluate`) first")
    card_path = models_dir / paths.MODEL_CARD
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    if card:
        print(f"model: {card['backbone']} ({card['strategy']}, weights {card['weights']['source']}), best epoch "
              f"{card['validation']['best_epoch']} of {card['training']['epochs_run']}, "
              f"{card['training']['wall_s']:.0f} s on {card['training']['device']}")
    print(evaluate.metrics_table(json.loads(metrics_path.read_text())))
    print(f"report: {reports / paths.REPORT_HTML} (or {paths.REPORT_MD}); curves and plots: `dvc plots show`")
    promotion_path, champion_path = reports / paths.PROMOTION, Path(args.registry) / paths.CHAMPION
    if promotion_path.exists():
        decision = json.loads(promotion_path.read_text())["decision"]
        print(("promotion: promoted; " if decision["promote"] else "promotion: not promoted; ")
              + "; ".join(decision["reasons"]))
    if champion_path.exists():
        champion = json.loads(champion_path.read_text())
        low, high = champion.get("test_auc_ci") or (float("nan"), float("nan"))
        print(f"champion: version {champion['version']} ({champion_path.parent / champion['path']}), test AUC at promotion "
              f"{champion['test_auc']:.3f} [{low:.3f}, {high:.3f}], promoted {champion['promoted_at']}")
    print("runs in the Prefect UI: `prefect server start`, then open http://127.0.0.1:4200/runs")
    return 0


def _inputs(made_by: str, *paths: Path) -> None:
    """Stop with a user error naming the first input that does not exist (and the command that makes it)."""
    for path in paths:
        if not Path(path).exists():
            raise MedtlError(f"{path} does not exist: run `medtl {made_by}` (or `dvc repro`) first, or give its path")


def _out_dir(path: str | Path) -> Path:
    """The output directory ``path``, created; a user error naming it where it cannot be (e.g. under a file)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from exc
    return out


def _ingest_classes(params_file: Path) -> tuple[str, ...] | None:
    """``train.classes`` for ingest's early label check: None for ``auto`` (any labels).

    Read from the params file as written when it is there: importing the train stage (torch) would
    cost ingest ~2 s; the train stage validates the whole section itself.
    """
    from pipeline.params import read_params

    section = read_params(params_file).get("train") or {}
    value = section.get("classes") if isinstance(section, dict) else None
    if value is None:
        from pipeline import train

        params = load_section(train.TrainParams, params_file, "train")
        return None if params.auto_classes else params.classes
    if value == "auto":
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ParamsError(f"{params_file}: train.classes: expected a list of class names or auto, got {value!r}")
    return tuple(str(v) for v in value)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ParamsError(f"-S {pair!r}: expected section.key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _prefect_defaults() -> None:
    """Without a configured server, Prefect starts a temporary one: its first start migrates a new SQLite
    database, which takes longer than Prefect's 20 s default on a small machine."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def _cmd_retrain(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from flows.retrain import RepoBusy, RetrainParams, StageFailed, retrain

    repo = Path(args.repo).resolve()
    params = load_section(RetrainParams, paths.Project(repo).params, "retrain")
    lock_timeout = params.lock_timeout_s if args.lock_timeout is None else args.lock_timeout
    try:
        result = retrain(repo=str(repo), overrides=_overrides(args.set), promote=params.promote and not args.no_promote,
                         push=params.push and not args.no_push, lock_timeout_s=lock_timeout, export=params.export,
                         pull_retries=params.pull_retries, pull_retry_delay_s=params.pull_retry_delay_s)
    except (RepoBusy, StageFailed) as exc:
        log.error("retrain failed: %s", exc)
        return 1
    print(f"retrain: stages {result['stages']}; pushed: {result['pushed']}")
    if result["promotion"]:
        decision = result["promotion"]["decision"]
        print(("promoted" if decision["promote"] else "not promoted") + ": " + "; ".join(decision["reasons"]))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from flows.retrain import RetrainParams, retrain

    repo = Path(args.repo).resolve()
    params = load_section(RetrainParams, paths.Project(repo).params, "retrain")
    print(f"serving deployment retrain/{args.name}: cron {params.cron!r} ({params.timezone}); Ctrl-C stops it")
    from prefect.schedules import Cron

    retrain.serve(name=args.name, schedule=Cron(params.cron, timezone=params.timezone), parameters={
        "repo": str(repo), "promote": params.promote, "push": params.push, "lock_timeout_s": params.lock_timeout_s,
        "export": params.export, "pull_retries": params.pull_retries,
        "pull_retry_delay_s": params.pull_retry_delay_s})
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from pipeline import study

    repo = Path(args.repo).resolve()
    params = load_section(study.StudyParams, paths.Project(repo).params, "study")
    grid = params.select(args.grid)
    try:
        if args.flow:
            _prefect_defaults()
            from flows.study import transfer_study

            result = transfer_study(repo=str(repo), grid=args.grid, jobs=args.jobs, resume=args.resume)
            report, sentences, wall_s = result["report"], result["findings"], result["wall_s"]
        else:
            pretrained = study.workspace_pretrained(paths.Project(repo).params)
            summary = study.run(grid, repo, grid_name=args.grid or params.grid, prefix=params.name,
                                pretrained=pretrained, jobs=args.jobs, resume=args.resume,
                                echo=None if args.quiet else print)
            report, sentences, wall_s = summary.report, summary.findings, summary.wall_s
    except study.StudyError as exc:
        if isinstance(exc, MedtlError):
            raise  # cannot start here: a user error (main prints it)
        log.error("study failed: %s", exc)
        return 1
    print(f"study: {len(grid.strategies) * len(grid.fractions) * len(grid.seeds)} runs in {wall_s / 60:.1f} min; "
          f"report {report}")
    for sentence in sentences:
        print(f"- {sentence}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from pipeline.sources import pacs

    summary = pacs.run_stage(args.params)
    if summary is None:
        print("pull: data.source is folder: nothing to pull")
        return 0
    s = summary
    print(f"pull: {s.studies_queried} studies queried on {s.server}: {s.studies_new} new, {s.studies_changed} changed, "
          f"{s.studies_unchanged} unchanged; {s.studies_retrieved} retrieved ({s.instances_retrieved} instances, "
          f"{s.bytes_retrieved / 1e6:.1f} MB), {s.studies_failed} failed; in {paths.PACS_RAW_DIR}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from pipeline import keys

    path = keys.write_new_key(Path(args.path))  # an existing key: KeyExistsError, a one-line user error
    print(f"wrote a new pseudonymisation key to {path} (mode 600). Back it up; never commit it.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtl", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; a user error's traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic DICOM cohort (the embedded default data)")
    p.add_argument("--out", required=True, help="cohort directory (DICOM tree + labels.csv)")
    p.add_argument("--patients", type=int, help="number of patients (params synth.patients)")
    p.add_argument("--seed", type=int, help="random seed (params synth.seed)")
    p.add_argument("--add", type=int, metavar="K", help="append K new patients to an existing cohort")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("pull", help="retrieve new and changed studies from the PACS (data.source dicomweb or dimse) "
                                    f"into {paths.PACS_RAW_DIR}; credentials from MEDTL_PACS_* variables")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("ingest", help="classify, de-identify and index a DICOM tree")
    p.add_argument("--input", required=True, help="DICOM export directory (params data.raw_dir)")
    p.add_argument("--labels", required=True, help="labels CSV (params data.labels)")
    p.add_argument("--lesions", metavar="CSV", help="lesion ground-truth sidecar for Grad-CAM localisation, never a "
                                                    "label (params data.lesions; default or 'none': none)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quarantine", help="directory to link rejected files into (keep it out of DVC outputs)")
    p.add_argument("--workers", type=int, help="processes (params ingest.workers; 0 = automatic: one per core, 1 = this process)")
    p.add_argument("--runner", choices=RUNNERS, help="where per-file work runs (params fanout.runner)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("preprocess", help="turn ingested images into fixed-size tensors + index + fingerprint")
    p.add_argument("--ingest", required=True, help="ingest output directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--workers", type=int, help="processes (params preprocess.workers; 0 = automatic: one per core, 1 = this process)")
    p.add_argument("--runner", choices=RUNNERS, help="where per-image work runs (params fanout.runner)")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("split", help="patient-level train/val/test assignment, duplicates kept together")
    p.add_argument("--images", required=True, help="preprocess output directory (index.parquet, tensors.npy)")
    p.add_argument("--out", required=True, help="output directory (splits.csv, split_summary.json)")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("train", help="fine-tune the backbone (torchrun --nproc_per_node=N for DDP)")
    p.add_argument("--images", required=True, help="preprocess output directory")
    p.add_argument("--splits", required=True, help="splits.csv of the split stage")
    p.add_argument("--out", required=True, help="model directory (model.pt, model_card.json, checkpoints/, live/)")
    p.add_argument("--epochs", type=int, help="params train.epochs")
    p.add_argument("--device", help="params train.device: auto, cpu, cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="test metrics with patient-bootstrap CIs, DVC plots and the report")
    p.add_argument("--model", required=True, help="models/model.pt of the train stage")
    p.add_argument("--images", required=True, help="preprocess output directory")
    p.add_argument("--splits", required=True, help="splits.csv of the split stage")
    p.add_argument("--out", required=True, help="report directory (metrics.json, plots/, report.md, ...)")
    p.add_argument("--device", help="params evaluate.device: auto, cpu, cuda")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("promote", help="compare the trained model with the champion on today's test split; "
                                       "promote it to the registry if it is better")
    p.add_argument("--model", default=paths.in_project(paths.MODELS_DIR, paths.MODEL),
                   help="the challenger (default: %(default)s)")
    p.add_argument("--reports", default=paths.REPORTS_DIR, help="its evaluate output (default: %(default)s)")
    p.add_argument("--images", default=paths.IMAGES_DIR, help="preprocess output (default: %(default)s)")
    p.add_argument("--splits", default=paths.in_project(paths.SPLITS_DIR, paths.SPLITS_CSV),
                   help="split output (default: %(default)s)")
    p.add_argument("--registry", help="champion registry (params promote.registry)")
    p.add_argument("--force", action="store_true", help="promote whatever the comparison says (recorded as forced)")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("predict", help="apply the champion (or --model) to new, unlabelled studies: per-image "
                                       "and per-study scores and decisions at its frozen threshold")
    p.add_argument("--input", help="folder of new DICOM studies (no labels needed)")
    p.add_argument("--pacs", action="store_true",
                   help="instead of --input: pull the new studies from the PACS (params data.source, pacs) and store "
                        "each study's SR back into it")
    p.add_argument("--model", help="a model.pt (its model_card.json and metrics.json beside it); default: the champion")
    p.add_argument("--registry", help="champion registry (params promote.registry)")
    p.add_argument("--threshold", type=float, help="override the frozen operating threshold (recorded as given)")
    p.add_argument("--predict-dir", default=paths.PREDICT_DIR,
                   help="results/ and work/ go here (default: %(default)s)")
    p.add_argument("--local", default=paths.LOCAL_DIR,
                   help="on-site PHI: predict/uids.csv maps pseudonymised UIDs back (default: %(default)s)")
    p.add_argument("--device", help="params predict.device: auto, cpu, cuda")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("validate", help="external validation: a frozen model (the champion or --model) on a new "
                                        "labelled cohort, with its frozen threshold; evaluate's metrics and report")
    p.add_argument("--input", required=True, help="folder of the external cohort's DICOM")
    p.add_argument("--labels", required=True, help="its labels CSV (as ingest reads it)")
    p.add_argument("--lesions", help="optional lesion sidecar (Grad-CAM localisation)")
    p.add_argument("--model", help="a model.pt (model_card.json and metrics.json beside it); default: the champion")
    p.add_argument("--registry", help="champion registry (params promote.registry)")
    p.add_argument("--out", default=paths.in_project(paths.PREDICT_DIR, "validation"),
                   help="report, metrics and work/ (default: %(default)s)")
    p.add_argument("--local", default=paths.LOCAL_DIR, help="on-site PHI: quarantine (default: %(default)s)")
    p.add_argument("--device", help="params evaluate.device: auto, cpu, cuda")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("export", help="TorchScript, ONNX and a MONAI bundle of the champion (or --model), each "
                                      "checked against the PyTorch model; the model card travels with each")
    p.add_argument("--model", help="a model.pt (its model_card.json beside it); default: the champion")
    p.add_argument("--registry", help="champion registry (params promote.registry)")
    p.add_argument("--images", default=paths.IMAGES_DIR,
                   help="preprocess output whose tensors the parity check uses when present (default: %(default)s)")
    p.add_argument("--formats", nargs="+", default=["torchscript", "onnx", "bundle"],
                   choices=["torchscript", "onnx", "bundle"], help="what to write (default: all)")
    p.add_argument("--out", default=paths.EXPORT_DIR, help="exports go to OUT/<version> (default: %(default)s)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("summary", help="print the trained model and its test metrics with CIs")
    p.add_argument("--reports", default=paths.REPORTS_DIR, help="evaluate output (default: %(default)s)")
    p.add_argument("--models", default=paths.MODELS_DIR, help="train output (default: %(default)s)")
    p.add_argument("--registry", default=paths.REGISTRY_DIR, help="champion registry (default: %(default)s)")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("retrain", help="run the Prefect retrain flow once (all stages through DVC, promote, push)")
    p.add_argument("--repo", default=".", help="project directory (default: %(default)s)")
    p.add_argument("-S", "--set", action="append", metavar="SECTION.KEY=VALUE", help="params.yaml override (kept)")
    p.add_argument("--no-promote", action="store_true", help="skip the champion/challenger step")
    p.add_argument("--no-push", action="store_true", help="skip dvc push")
    p.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                   help="wait this long for another run on the repo to finish (params retrain.lock_timeout_s)")
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("serve", help="serve the retrain flow on the params cron schedule (weekly by default)")
    p.add_argument("--repo", default=".", help="project directory (default: %(default)s)")
    p.add_argument("--name", default="weekly", help="deployment name (default: %(default)s)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("study", help="transfer-learning study: strategy x data fraction x seed as DVC experiments, "
                                     "then reports/study.md with figures and findings")
    p.add_argument("--repo", default=".", help="project directory (default: %(default)s)")
    p.add_argument("--grid", help="a grid of params study.grids (default: study.grid, i.e. cpu; gpu for real use)")
    p.add_argument("--jobs", type=int, help="experiments at once (default: the grid's jobs)")
    p.add_argument("--resume", action="store_true", help="keep runs whose experiment already exists; run the rest")
    p.add_argument("--flow", action="store_true", help="run it as the Prefect flow transfer_study (UI, artifact)")
    p.add_argument("--quiet", action="store_true", help="do not echo DVC's output")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("keygen", help="create a local pseudonymisation key file")
    p.add_argument("--path", default=".medtl/pseudonym.key", help="where to write it (default: %(default)s)")
    p.set_defaults(func=_cmd_keygen)
    return parser


def _user_error(message: str, verbose: bool) -> int:
    """The one way a user error ends a command: ``medtl: error: <message>`` on stderr (after the traceback
    with ``-v``), exit status 2."""
    if verbose:
        traceback.print_exc()
    print(f"medtl: error: {' '.join(message.split())}", file=sys.stderr)
    return USER_ERROR


def _os_error_message(exc: OSError) -> str:
    path = f"{exc.filename} -> {exc.filename2}" if getattr(exc, "filename2", None) else str(exc.filename)
    return f"{path}: {exc.strerror or type(exc).__name__}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (:class:`pipeline.errors.MedtlError`, or an OS error naming a file: a
    missing input, an output that cannot be written) prints one line and returns 2; ``-v`` adds the
    traceback. Anything else is a bug in medtl and keeps its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API request otherwise
    try:
        return args.func(args)
    except MedtlError as exc:
        return _user_error(str(exc), args.verbose)
    except OSError as exc:
        if exc.filename is None:
            raise
        return _user_error(_os_error_message(exc), args.verbose)


if __name__ == "__main__":
    sys.exit(main())

"""Where each stage's inputs and outputs live in a project: the one place their names are written.

dvc.yaml names the same paths (DVC needs them literally); ``tests/test_dvc_pipeline.py`` checks
that every stage path here is one dvc.yaml gives (or lies inside one), so the flows, the study, the
CLI's defaults and dvc.yaml cannot drift apart. Code takes a :class:`Project` and asks it, e.g.
``Project(repo).metrics``; nothing else spells ``"reports/metrics.json"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# relative to the project root (dvc.yaml's directory), as dvc.yaml writes them
INGEST_DIR = "data/interim/ingest"
IMAGES_DIR = "data/processed/images"
SPLITS_DIR = "data/processed"
MODELS_DIR = "models"
REPORTS_DIR = "reports"
REGISTRY_DIR = "registry"  # promote's default (params promote.registry); outside DVC, like the quarantine
PREDICT_DIR = "data/predict"  # medtl predict: results/ (pseudonymised) and work/ (de-identified copies, tensors)
EXPORT_DIR = "data/export"   # medtl export: TorchScript, ONNX, MONAI bundle of a model
PACS_RAW_DIR = "data/raw/pacs"  # medtl pull: studies retrieved from the PACS (raw PHI: persist, never pushed)
PULL_DIR = "data/pull"          # medtl pull: cursor.json (local, never pushed) and summary.json (DVC metric)
LOCAL_DIR = "data/local"      # PHI that must stay on site (predict's UID map back to the records): never pushed

# files inside the stage directories (the stages write these names)
INGEST_SUMMARY = "summary.json"
PULL_CURSOR = "cursor.json"
PULL_SUMMARY = "summary.json"
SPLITS_CSV = "splits.csv"
MODEL = "model.pt"
MODEL_CARD = "model_card.json"
TRAIN_METRICS = "train_metrics.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PROMOTION = "promotion.json"
CHAMPION = "champion.json"
VAL_AUC_TSV = "live/plots/metrics/val/auc.tsv"       # dvclive's curve of val_auc (under MODELS_DIR)
ELAPSED_TSV = "live/plots/metrics/time/elapsed_s.tsv"
# the marker `medtl synth` writes beside its cohort; ingest reads it for the demo key and skips it as a file
SYNTH_MARKER = "medtl_synth.json"
SYNTH_MARKER_FILES = "files"  # the marker's field: relpath -> content id of every file synth wrote


@dataclass(frozen=True)
class Project:
    """The paths of one project checkout (``root`` holds dvc.yaml and params.yaml)."""

    root: Path = Path(".")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def pacs_raw_dir(self) -> Path:
        return self.root / PACS_RAW_DIR

    @property
    def pull_cursor(self) -> Path:
        return self.root / PULL_DIR / PULL_CURSOR

    @property
    def pull_summary(self) -> Path:
        return self.root / PULL_DIR / PULL_SUMMARY

    @property
    def ingest_dir(self) -> Path:
        return self.root / INGEST_DIR

    @property
    def ingest_summary(self) -> Path:
        return self.ingest_dir / INGEST_SUMMARY

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES_DIR

    @property
    def splits_csv(self) -> Path:
        return self.root / SPLITS_DIR / SPLITS_CSV

    @property
    def models_dir(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def model(self) -> Path:
        return self.models_dir / MODEL

    @property
    def reports_dir(self) -> Path:
        return self.root / REPORTS_DIR

    @property
    def metrics(self) -> Path:
        return self.reports_dir / METRICS

    @property
    def report_md(self) -> Path:
        return self.reports_dir / REPORT_MD

    def registry(self, configured: str = REGISTRY_DIR) -> Path:
        """The registry directory: ``configured`` (params promote.registry) relative to the root."""
        path = Path(configured)
        return path if path.is_absolute() else self.root / path


def in_project(*parts: str) -> str:
    """A project-relative path as DVC writes it (``in_project(MODELS_DIR, TRAIN_METRICS)``)."""
    return "/".join(parts)

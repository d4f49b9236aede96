"""One error path: every user error ends `medtl` with one line `medtl: error: ...` naming the file or params
key, exit status 2 and no traceback (``-v`` adds the traceback); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def _dicom(path: Path) -> None:
    """One small CT instance."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "CLI001", "CLI^TEST", "CT"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


# ------------------------------------------------------------------------------ the cases
# Each builds its files under tmp_path and returns (argv, what the one line must name).


def missing_params_file(tmp: Path):
    return ["--params", str(tmp / "nope.yaml"), "split", "--images", str(tmp), "--out", str(tmp / "o")], \
        f"{tmp / 'nope.yaml'} does not exist: run medtl in the project folder or pass --params FILE"


def misspelt_section(tmp: Path):
    params = _params(tmp, "trian:\n  epochs: 3\n")
    return ["--params", str(params), "train", "--images", str(tmp), "--splits", "s.csv", "--out", str(tmp / "o")], \
        "unknown section 'trian' (did you mean 'train'?)"


def workers_two(tmp: Path):
    params = _params(tmp, "ingest:\n  workers: two\n")
    return ["--params", str(params), "ingest", "--input", str(tmp), "--labels", "l.csv", "--out", str(tmp / "o")], \
        "ingest.workers: expected an integer, got 'two'"


def negative_epochs(tmp: Path):
    params = _params(tmp, "train:\n  epochs: -3\n")
    return ["--params", str(params), "train", "--images", str(tmp), "--splits", "s.csv", "--out", str(tmp / "o")], \
        f"{params}: train.epochs: must be an integer >= 1, got -3"


def epochs_on_the_command_line(tmp: Path):
    params = _params(tmp)
    return ["--params", str(params), "train", "--images", str(tmp), "--splits", "s.csv", "--out", str(tmp / "o"),
            "--epochs", "0"], "train.epochs: must be an integer >= 1, got 0 (given on the command line)"


def batch_size_zero(tmp: Path):
    params = _params(tmp, "train:\n  batch_size: 0\n")
    return ["--params", str(params), "train", "--images", str(tmp), "--splits", "s.csv", "--out", str(tmp / "o")], \
        f"{params}: train.batch_size: must be an integer >= 1, got 0"


def dropout(tmp: Path):
    params = _params(tmp, "model:\n  dropout: 1.7\n")
    return ["--params", str(params), "train", "--images", str(tmp), "--splits", "s.csv", "--out", str(tmp / "o")], \
        f"{params}: model.dropout: must be a number in [0, 1), got 1.7"


def reversed_percentiles(tmp: Path):
    params = _params(tmp, "preprocess:\n  percentiles: [99.5, 0.5]\n")
    return ["--params", str(params), "preprocess", "--ingest", str(tmp), "--out", str(tmp / "o")], \
        f"{params}: preprocess.percentiles: the low percentile must be below the high one, got [99.5, 0.5]"


def missing_ingest_input(tmp: Path):
    labels = tmp / "labels.csv"
    labels.write_text("file,label\na.dcm,normal\n")
    return ["--params", str(_params(tmp)), "ingest", "--input", str(tmp / "no-export"), "--labels", str(labels),
            "--out", str(tmp / "o")], str(tmp / "no-export")


def missing_preprocess_input(tmp: Path):
    return ["--params", str(_params(tmp)), "preprocess", "--ingest", str(tmp / "nothing"), "--out", str(tmp / "o")], \
        f"{tmp / 'nothing' / 'manifest.parquet'} does not exist: run `medtl ingest`"


def output_under_a_file(tmp: Path):
    images = tmp / "images"
    images.mkdir()
    (images / "index.parquet").write_bytes(b"")
    (images / "tensors.npy").write_bytes(b"")
    (tmp / "somefile").write_text("a file, not a folder")
    return ["--params", str(_params(tmp)), "split", "--images", str(images), "--out", str(tmp / "somefile" / "sub")], \
        f"{tmp / 'somefile' / 'sub'}: cannot write output here (Not a directory)"


def evaluate_without_a_model(tmp: Path):
    return ["--params", str(_params(tmp)), "evaluate", "--model", str(tmp / "models" / "model.pt"), "--images",
            str(tmp), "--splits", str(tmp / "splits.csv"), "--out", str(tmp / "reports")], \
        f"{tmp / 'models' / 'model.pt'} does not exist: run `medtl train`"


def evaluate_a_file_that_is_no_model(tmp: Path):
    (tmp / "model.pt").write_text("not a model")
    (tmp / "tensors.npy").write_bytes(b"")
    (tmp / "index.parquet").write_bytes(b"")
    (tmp / "splits.csv").write_text("")
    return ["--params", str(_params(tmp)), "evaluate", "--model", str(tmp / "model.pt"), "--images", str(tmp),
            "--splits", str(tmp / "splits.csv"), "--out", str(tmp / "reports")], \
        f"{tmp / 'model.pt'}: not a medtl model file"


def summary_without_metrics(tmp: Path):
    return ["summary", "--reports", str(tmp / "reports"), "--models", str(tmp / "models")], \
        f"{tmp / 'reports' / 'metrics.json'} does not exist: run `dvc repro`"


def study_grid_that_does_not_exist(tmp: Path):
    _params(tmp, "study:\n  grids:\n    cpu: {}\n")
    return ["study", "--repo", str(tmp), "--grid", "cpux"], "study: no grid 'cpux' in study.grids (did you mean 'cpu'?)"


def labels_0_1_with_the_default_classes(tmp: Path):
    _dicom(tmp / "export" / "a.dcm")
    _dicom(tmp / "export" / "b.dcm")
    labels = tmp / "labels.csv"
    labels.write_text("file,label\na.dcm,0\nb.dcm,1\n")
    return ["--params", str(_params(tmp, "train:\n  classes: [normal, lesion]\n")), "ingest", "--input",
            str(tmp / "export"), "--labels", str(labels), "--out", str(tmp / "o")], "train.classes"


def promote_before_evaluate(tmp: Path):
    (tmp / "models").mkdir()
    (tmp / "models" / "model.pt").write_bytes(b"")
    return ["--params", str(_params(tmp)), "promote"], \
        f"{Path('reports') / 'metrics.json'} does not exist: run `medtl evaluate`"


def predict_without_a_champion(tmp: Path):
    _dicom(tmp / "new" / "a.dcm")
    return ["--params", str(_params(tmp)), "predict", "--input", str(tmp / "new")], \
        "registry: no champion yet; run `medtl retrain`"


def export_of_a_missing_model(tmp: Path):
    return ["--params", str(_params(tmp)), "export", "--model", str(tmp / "nothing.pt")], \
        f"{tmp / 'nothing.pt'}: no such model file"


def validate_without_a_champion(tmp: Path):
    labels = tmp / "labels.csv"
    labels.write_text("file,label\na.dcm,normal\n")
    return ["--params", str(_params(tmp)), "validate", "--input", str(tmp / "new"), "--labels", str(labels)], \
        "no champion yet"


CASES = [missing_params_file, misspelt_section, workers_two, negative_epochs, epochs_on_the_command_line,
         batch_size_zero, dropout, reversed_percentiles, missing_ingest_input, missing_preprocess_input,
         output_under_a_file, evaluate_without_a_model, evaluate_a_file_that_is_no_model, summary_without_metrics,
         study_grid_that_does_not_exist, labels_0_1_with_the_default_classes, promote_before_evaluate,
         predict_without_a_champion, export_of_a_missing_model, validate_without_a_champion]


@pytest.fixture
def key(monkeypatch, tmp_path):
    """A pseudonymisation key (ingest of non-synthetic data needs one) and a HOME without a key file."""
    monkeypatch.setenv("MEDTL_PSEUDONYM_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_a_user_error_is_one_line_exit_2_without_traceback(case, tmp_path, capsys, key, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv, names = case(work)
    status = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("medtl: error: "), err
    assert names in lines[0], lines[0]
    assert "Traceback" not in out + err


def test_verbose_adds_the_traceback(tmp_path, capsys):
    argv, _ = negative_epochs(tmp_path)
    assert cli.main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ParamsError" in err
    assert err.strip().splitlines()[-1].startswith("medtl: error: ")


def test_the_real_command_prints_only_the_error_line(tmp_path):
    """As a user runs it (logging configured): stderr holds the one line."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "split", "--images", "i", "--out", "o"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip() == ("medtl: error: params.yaml does not exist: run medtl in the project folder or "
                                   "pass --params FILE")
    assert done.stdout == ""


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_summary", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["summary"])

    def no_file(args):
        raise OSError(28, "No space left on device")  # an OSError naming no file: not a user's path

    monkeypatch.setattr(cli, "_cmd_summary", no_file)
    with pytest.raises(OSError):
        cli.main(["summary"])


def test_an_os_error_naming_a_file_is_a_user_error(tmp_path, monkeypatch, capsys):
    def unreadable(args):
        open(tmp_path / "missing" / "input.csv")  # noqa: SIM115 - raises

    monkeypatch.setattr(cli, "_cmd_summary", unreadable)
    assert cli.main(["summary"]) == 2
    assert capsys.readouterr().err == f"medtl: error: {tmp_path / 'missing' / 'input.csv'}: No such file or directory\n"

"""Running the dvc command line: output line by line, progress-bar frames dropped, exit code kept."""

from __future__ import annotations

import pytest
from tqdm import tqdm

from pipeline.dvc_cli import PROGRESS_FRAME, run_dvc


@pytest.mark.parametrize("n, total, elapsed, unit", [(0, 10, 0.0, "batch"), (4, 10, 8.0, "batch"),
                                                     (4, 10, 0.5, "batch"), (1069, 1069, 10.3, "file"),
                                                     (5, None, 1.2, "it")])
def test_tqdm_frames_are_recognised_whatever_the_rate(n, total, elapsed, unit):
    frame = tqdm.format_meter(n, total, elapsed, prefix="epoch 1/4", unit=unit, ncols=80)
    assert PROGRESS_FRAME.search(frame), frame


@pytest.mark.parametrize("line", ["epoch 1/4: train loss 0.6931, val auc 0.5500 (best 0.5500)",
                                  "Running stage 'train':", "Stage 'split' didn't change, skipping",
                                  "test AUC 0.600 [0.416, 0.844]"])
def test_log_lines_are_kept(line):
    assert not PROGRESS_FRAME.search(line)


def test_run_dvc_streams_lines_and_returns_the_exit_code(tmp_path):
    lines: list[str] = []
    code, tail = run_dvc(tmp_path, "version", on_line=lines.append)
    assert code == 0 and any(line.startswith("DVC version") for line in lines) and tail == lines[-40:]
    code, tail = run_dvc(tmp_path, "status")  # not a DVC project
    assert code != 0 and any("not a DVC repository" in line or "you are not inside of a DVC repository" in line
                             for line in tail), tail

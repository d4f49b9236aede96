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


def _no_identity_env(home) -> dict[str, str]:
    """A newcomer's machine: an empty HOME, no system git config, no identity variables."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return dict(env, HOME=str(home), GIT_CONFIG_NOSYSTEM="1", XDG_CONFIG_HOME=str(home / ".config"))


def _repo(path):
    import subprocess

    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def test_an_identity_is_supplied_only_where_git_has_none(tmp_path):
    import subprocess

    from pipeline.dvc_cli import FALLBACK_IDENTITY, git_identity_env

    home = tmp_path / "home"
    home.mkdir()
    env = _no_identity_env(home)
    repo = _repo(tmp_path / "repo")
    filled = git_identity_env(repo, env)
    assert filled == {"GIT_AUTHOR_NAME": FALLBACK_IDENTITY[0], "GIT_COMMITTER_NAME": FALLBACK_IDENTITY[0],
                      "GIT_AUTHOR_EMAIL": FALLBACK_IDENTITY[1], "GIT_COMMITTER_EMAIL": FALLBACK_IDENTITY[1]}
    # with it, a commit works on that machine, and no git config anywhere was written
    (repo / "a.txt").write_text("a\n")
    subprocess.run(["git", "add", "a.txt"], cwd=repo, env=env, check=True)
    done = subprocess.run(["git", "commit", "-qm", "x"], cwd=repo, env=dict(env, **filled), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert list(home.iterdir()) == [] and "[user]" not in (repo / ".git/config").read_text()

    # the user's own identity wins: a repo-level one, or the variables
    subprocess.run(["git", "config", "user.name", "Ada"], cwd=repo, check=True)
    assert git_identity_env(repo, env) == {"GIT_AUTHOR_EMAIL": FALLBACK_IDENTITY[1],
                                           "GIT_COMMITTER_EMAIL": FALLBACK_IDENTITY[1]}
    subprocess.run(["git", "config", "user.email", "ada@example.org"], cwd=repo, check=True)
    assert git_identity_env(repo, env) == {}
    other = _repo(tmp_path / "other")
    mine = dict(env, GIT_AUTHOR_NAME="Me", GIT_AUTHOR_EMAIL="me@x", GIT_COMMITTER_NAME="Me", GIT_COMMITTER_EMAIL="me@x")
    assert git_identity_env(other, mine) == {}

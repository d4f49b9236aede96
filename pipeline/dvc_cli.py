"""The ``dvc`` command line, run from medtl (the retrain flow's stages and push, the study's experiments).

One place decides how DVC is started: with this interpreter (``python -m dvc``, so the project's
virtual environment's DVC, whatever is on PATH), analytics off, unbuffered output, and this
environment's ``bin`` first on PATH (DVC's queue workers and the stages' ``medtl`` commands are
found there). Output is read line by line as it comes; progress-bar frames are dropped (the stages
log the same news as lines).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

#: a tqdm frame: ``epoch 1/4:  40%|####  | 4/10 [00:08<00:12,  2.0s/batch]`` (``\r``-separated)
PROGRESS_FRAME = re.compile(r"\[\d[\d:]*(<[\d:?]*)?, *[\d.?]+ *(\w+/s|s/\w+)\]\s*$")


#: the commit identity of DVC's experiment commits on a machine whose git knows none (a newcomer's, a CI
#: runner's): given to DVC's process only, never written to any git config
FALLBACK_IDENTITY = ("medtl", "medtl@localhost.invalid")
_IDENTITY_VARS = ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")


def git_identity_env(repo: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``GIT_AUTHOR_*``/``GIT_COMMITTER_*`` for commits made in ``repo`` when git has no identity there.

    ``dvc exp`` commits every experiment; without ``user.name`` and ``user.email`` (a fresh machine, an
    empty HOME) it stops with "Git user name and email must be configured". The user's own identity
    (any git config level, or these variables) always wins; only what is missing is filled in, with
    :data:`FALLBACK_IDENTITY`.
    """
    env = dict(os.environ if env is None else env)
    configured = {}
    for key in ("user.name", "user.email"):
        try:
            done = subprocess.run(["git", "config", "--get", key], cwd=repo, env=env, capture_output=True,
                                  text=True, timeout=30)
            configured[key] = done.stdout.strip() if done.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            configured[key] = ""
    fill = {}
    for var in _IDENTITY_VARS:
        if env.get(var):
            continue
        is_name = var.endswith("_NAME")
        if not configured["user.name" if is_name else "user.email"]:
            fill[var] = FALLBACK_IDENTITY[0 if is_name else 1]
    return fill


def dvc_env(jobs: int = 1, repo: Path | None = None) -> dict[str, str]:
    """The environment DVC runs in; ``jobs`` > 1 processes at once share the cores (``OMP_NUM_THREADS``).

    With ``repo``, a commit identity is supplied where git has none (:func:`git_identity_env`).
    """
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    if repo is not None:
        env.update(git_identity_env(repo, env))
    return env


def run_dvc(repo: Path, *args: str, on_line: Callable[[str], None] | None = None, jobs: int = 1,
            keep: int = 40) -> tuple[int, list[str]]:
    """Run ``dvc <args>`` in ``repo``, stdout and stderr together, each line to ``on_line`` as it comes.

    Returns:
        The exit code and the last ``keep`` lines (progress-bar frames and blank lines left out).
    """
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(jobs, repo),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        for line in raw.replace("\r", "\n").splitlines():
            line = line.rstrip()
            if not line or PROGRESS_FRAME.search(line):
                continue
            if on_line is not None:
                on_line(line)
            tail = (tail + [line])[-keep:]
    return proc.wait(), tail

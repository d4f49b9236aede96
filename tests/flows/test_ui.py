"""The Prefect UI for real: `prefect server start` on localhost, the flow and `medtl serve` run against
it as a user runs them (subprocesses), and headless Chromium opens the pages a user would look at.

Screenshots go to ``$MEDTL_TEST_OUTPUT/ui/`` (default ``test-output/ui/`` in the repository).
Needs Debian's ``chromium`` (``make test`` installs it where it can) and the ``playwright`` package,
which drives that browser (no browser download).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.test_dvc_pipeline import scratch_project

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect")]

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = Path(os.environ.get("MEDTL_TEST_OUTPUT", ROOT / "test-output")) / "ui"
BIN = Path(sys.executable).parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
STAGES = ["synth", "pull", "ingest", "preprocess", "split", "train", "evaluate"]
ARTIFACTS = ["ingest-summary", "test-metrics", "evaluation-report", "promotion-decision"]


@dataclass
class Server:
    api: str
    ui: str
    env: dict[str, str]
    log: Path

    def post(self, path: str, body: dict) -> list | dict:
        import httpx

        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server (API + UI) on a free localhost port, with its own database."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_UI_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240  # first start migrates a new SQLite database: slow on 2 cores
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc, signal.SIGKILL)
            pytest.fail(f"prefect server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    yield Server(api, f"http://127.0.0.1:{port}", env, log)
    _stop(proc)


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; make test does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser (pip: medtl[dev])")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("uiproject")
    return scratch_project(proj, remote=proj.parent / "ui-remote")


def medtl(server: Server, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "medtl"), *args], env=server.env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def first_run(server, project) -> dict:
    """`medtl retrain` once against the server; the flow run's API record."""
    done = medtl(server, "retrain", "--repo", str(project))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "promoted: first model" in done.stdout
    runs = server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["retrain"]}},
                                             "sort": "START_TIME_ASC", "limit": 1})
    assert runs and runs[0]["state_type"] == "COMPLETED"
    return runs[0]


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    return page


def _shot(page, name: str) -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / name
    page.wait_for_timeout(1500)  # let the page's fade-in finish
    page.screenshot(path=str(path), full_page=True)
    return path


def test_the_flow_run_page_shows_the_run_its_stage_tasks_and_artifacts(server, browser, first_run):
    page = _page(browser, f"{server.ui}/runs/flow-run/{first_run['id']}")
    try:
        page.get_by_text(first_run["name"]).first.wait_for(timeout=60_000)
        page.get_by_text("Task Runs", exact=True).first.click()
        page.get_by_text("dvc push", exact=True).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        assert "Completed" in text and "retrain" in text
        for name in [*STAGES, "promote", "dvc push"]:
            assert page.get_by_text(name, exact=True).count() >= 1, f"task {name} not shown"
        assert f"{len(STAGES) + 2} Task runs" in text
        shot = _shot(page, "flow-run-tasks.png")
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one

        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("promotion-decision", exact=True).first.wait_for(timeout=60_000)
        for key in ARTIFACTS:
            assert page.get_by_text(key, exact=True).count() >= 1, f"artifact {key} not shown"
        _shot(page, "flow-run-artifacts.png")

        page.get_by_text("Logs", exact=True).first.click()
        page.get_by_text("Running stage 'synth':").first.wait_for(timeout=60_000)
        _shot(page, "flow-run-logs.png")
    finally:
        page.close()


def test_medtl_serve_shows_a_scheduled_deployment(server, browser, project):
    with open(project / "serve.log", "w") as out:
        proc = subprocess.Popen([str(BIN / "medtl"), "serve", "--repo", str(project)], env=server.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (found := server.post("/deployments/filter", {"deployments": {"name": {"any_": ["weekly"]}}})):
            assert proc.poll() is None, (project / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no deployment after 180 s"
            time.sleep(2)
        deployment = found[0]
        schedule = deployment["schedules"][0]["schedule"]
        assert (schedule["cron"], schedule["timezone"]) == ("0 3 * * 1", "UTC")
        while not (upcoming := server.post("/flow_runs/filter", {
                "deployments": {"id": {"any_": [deployment["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})):
            assert time.monotonic() < deadline, "the scheduler made no scheduled run"
            time.sleep(2)
        starts = sorted(run["expected_start_time"] for run in upcoming)
        assert all(time.strptime(s[:10], "%Y-%m-%d").tm_wday == 0 and s[11:16] == "03:00" for s in starts), starts

        page = _page(browser, f"{server.ui}/deployments/deployment/{deployment['id']}")
        try:
            page.get_by_text("At 03:00 AM, only on Monday").first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            assert "weekly" in text and "retrain" in text and "Scheduled" in text
            _shot(page, "deployment.png")
        finally:
            page.close()
    finally:
        _stop(proc)


def _lock_held(path: Path) -> bool:
    """Whether a process holds the flow's lock file (a non-blocking flock on a separate descriptor)."""
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def test_concurrent_runs_wait_or_fail_and_leave_the_workspace_consistent(server, project, first_run):
    """Two real runs started together (both willing to wait) and a third that must not wait."""
    from flows.retrain import LOCK_FILE

    args = [str(BIN / "medtl"), "retrain", "--repo", str(project), "-S", "train.seed=1", "--no-push"]
    procs = [subprocess.Popen([*args, "--lock-timeout", "900"], env=server.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    while not _lock_held(project / LOCK_FILE):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no run took the lock"
        time.sleep(0.2)
    impatient = medtl(server, "retrain", "--repo", str(project), "--no-push", "--lock-timeout", "0")
    outputs = [p.communicate(timeout=900)[0] for p in procs]

    assert impatient.returncode == 1
    assert "another retrain run holds" in impatient.stdout + impatient.stderr
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    # one of the two retrained (train.seed changed), the other found everything done
    ran = [o for o in outputs if "'train': 'ran'" in o]
    skipped = [o for o in outputs if "'train': 'skipped'" in o and "'evaluate': 'skipped'" in o]
    assert len(ran) == 1 and len(skipped) == 1, outputs

    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=project, env=server.env, capture_output=True, text=True, check=False)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    train_lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]
    assert train_lock["params"]["params.yaml"]["train"]["seed"] == 1
    card = json.loads((project / "models/model_card.json").read_text())
    assert hashlib.sha256((project / "models/model.pt").read_bytes()).hexdigest() == card["model_file"]["sha256"]
    assert card["params"]["train"]["seed"] == 1
    registry = project / "registry"
    champion = json.loads((registry / "champion.json").read_text())
    history = [json.loads(line) for line in (registry / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3, "first run + two decisions"
    assert [h["champion_after"] for h in history][-1] == champion["version"]
    champion_model = (registry / champion["path"] / "model.pt").read_bytes()
    assert hashlib.sha256(champion_model).hexdigest() == champion["model_sha256"]
    assert not list(project.rglob("*.tmp")), "a temporary file was left behind"

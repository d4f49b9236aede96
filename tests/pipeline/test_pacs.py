"""Pulling from a real PACS (Orthanc over DICOMweb) and storing results back: complete, incremental,
resumable after a kill, one-line errors, no credentials or UIDs where they do not belong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest
import yaml

from pipeline.sources import pacs
from tests.conftest import image_files

ROOT = Path(__file__).resolve().parents[2]


def _originals(folder: Path) -> dict[str, bytes]:
    """SOPInstanceUID -> file bytes of every image file of a cohort."""
    return {uid: path.read_bytes() for uid, path in image_files(folder).items()}


def _pulled(folder: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in folder.rglob("*.dcm")}


def _params(server, **kw) -> pacs.PacsParams:
    return pacs.PacsParams(url=server.dicomweb_url, retries=0, timeout_s=10, **kw)


def _client(server, params=None):
    return pacs.DicomwebClient(params or _params(server), pacs.Credentials(username=server.user,
                                                                           password=server.password))


def test_pull_retrieves_every_study_byte_for_byte_then_nothing(orthanc_server, pacs_cohort, tmp_path):
    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    summary = pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=_client(orthanc_server),
                        summary_path=tmp_path / "summary.json")
    originals = _originals(pacs_cohort)
    assert _pulled(out) == originals, "every instance, as stored in the PACS, and nothing else"
    assert summary.studies_queried == summary.studies_new == summary.studies_retrieved == 13
    assert summary.instances_retrieved == len(originals) == 169 and summary.studies_failed == 0
    # the layout: study / series / instance, named by UIDs (local only: the folder is never pushed)
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert path.relative_to(out).parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm")
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["instances_retrieved"] == 169
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in out.rglob("*.dcm")}
    assert not any(uid in (tmp_path / "summary.json").read_text() for uid in uids), "no UID in the DVC metric"

    again = pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=_client(orthanc_server))
    assert again.studies_unchanged == 13 and again.instances_retrieved == 0 and again.series_retrieved == 0


def test_a_modality_filter_pulls_only_those_studies_and_series(orthanc_server, pacs_cohort, tmp_path):
    params = _params(orthanc_server, modalities=("CT",))
    summary = pacs.pull("dicomweb", params, tmp_path / "raw", tmp_path / "cursor.json",
                        client=_client(orthanc_server, params))
    modalities = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in (tmp_path / "raw").rglob("*.dcm")}
    ct = {u for u, b in _originals(pacs_cohort).items() if b"CT" == pydicom.dcmread(
        __import__("io").BytesIO(b), stop_before_pixels=True).Modality.encode()}
    assert modalities == {"CT"} and set(_pulled(tmp_path / "raw")) == ct
    assert 0 < summary.studies_queried < 13


def test_new_studies_are_pulled_alone(orthanc_server, pacs_cohort, tmp_path):
    from pipeline import synth
    from pipeline.sources import orthanc

    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=_client(orthanc_server))
    grown = tmp_path / "grown"
    shutil.copytree(pacs_cohort, grown)
    before = _originals(grown)
    synth.add(grown, 2)
    added = {u: b for u, b in _originals(grown).items() if u not in before}
    new_only = tmp_path / "new_only"
    for uid, data in added.items():
        (new_only / f"{uid}.dcm").parent.mkdir(parents=True, exist_ok=True)
        (new_only / f"{uid}.dcm").write_bytes(data)
    assert orthanc.load(orthanc_server, new_only) == len(added) > 0
    summary = pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=_client(orthanc_server))
    assert summary.studies_unchanged == 13 and summary.studies_new == summary.studies_retrieved > 0
    assert summary.instances_retrieved == len(added) and summary.instances_already_present == 0
    assert _pulled(out) == {**before, **added}


class _CutOff:
    """A client whose connection breaks after ``after`` instances (as a network drop mid-study does)."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.sent = inner, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def retrieve(self, study, series):
        for ds in self.inner.retrieve(study, series):
            if self.sent >= self.after:
                raise pacs.PacsError("pacs test: WADO-RS series failed: cannot connect (server down or unreachable)")
            self.sent += 1
            yield ds


def test_a_connection_cut_mid_study_resumes_with_nothing_duplicated_or_partial(orthanc_server, pacs_cohort, tmp_path):
    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    cut = pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=_CutOff(_client(orthanc_server), 50))
    assert cut.studies_failed >= 1 and cut.failures.get("network", 0) >= 1
    partial = _pulled(out)
    assert len(partial) == 50 and all(partial[u] == b for u, b in _originals(pacs_cohort).items() if u in partial)
    resumed = pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=_client(orthanc_server))
    assert _pulled(out) == _originals(pacs_cohort)
    assert resumed.instances_retrieved == 169 - 50 and resumed.studies_failed == 0
    assert not list(out.rglob("*.tmp"))


def test_a_killed_pull_resumes_with_nothing_duplicated_or_partial(orthanc_server, pacs_cohort, tmp_path):
    """A real SIGKILL of `medtl pull`'s process in the middle of a study (files half-written included)."""
    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pipeline.sources import pacs
        import pipeline.io_utils as io_utils
        real = io_utils.os.replace
        count = [0]
        def slow_replace(src, dst):  # after 40 instances: stall inside a write, a temporary file on disk
            count[0] += str(dst).endswith(".dcm")
            if count[0] > 40:
                print("stalled", flush=True)
                time.sleep(600)
            real(src, dst)
        io_utils.os.replace = slow_replace
        params = pacs.PacsParams(url={orthanc_server.dicomweb_url!r}, retries=0)
        pacs.pull("dicomweb", params, Path({str(out)!r}), Path({str(cursor)!r}))
    """)
    env = {**os.environ, **orthanc_server.env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stalled"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert len(list(out.rglob("*.dcm"))) == 40 and list(out.rglob("*.tmp")), "killed mid-write"
    resumed = pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=_client(orthanc_server))
    assert _pulled(out) == _originals(pacs_cohort) and not list(out.rglob("*.tmp"))
    assert resumed.instances_retrieved + resumed.instances_already_present >= 169 - 40


def test_wrong_credentials_and_a_stopped_server_are_one_line_errors_and_write_nothing(orthanc_server, tmp_path):
    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    bad = pacs.DicomwebClient(_params(orthanc_server), pacs.Credentials(username=orthanc_server.user,
                                                                        password="not-the-password"))
    with pytest.raises(pacs.PacsError) as refused:
        pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=bad)
    message = str(refused.value)
    assert "\n" not in message and orthanc_server.dicomweb_url in message and "HTTP 401" in message
    assert "not-the-password" not in message and orthanc_server.password not in message
    orthanc_server.stop()
    with pytest.raises(pacs.PacsError) as down:
        pacs.pull("dicomweb", _params(orthanc_server), out, cursor, client=_client(orthanc_server))
    assert "\n" not in str(down.value) and "cannot connect" in str(down.value)
    assert not list(out.rglob("*")) and not cursor.exists()


class _Hostile:
    """A server answering with UIDs that are paths (``../``): they must never become file names."""

    def studies(self):
        return [pacs.Study("../../escaped", 1), pacs.Study("1.2.3", 1)]

    def series(self, study):
        return [pacs.Series("1.2.3.4/../../../x", "CT", 1), pacs.Series("1.2.3.5", "CT", 1)]

    def retrieve(self, study, series):
        ds = pydicom.Dataset()
        ds.SOPInstanceUID, ds.SeriesInstanceUID = "../../../../tmp/evil", series
        yield ds


def test_log_lines_drop_uids_but_keep_server_addresses():
    line = pacs._without_uids("pacs http://127.0.0.1:8042/dicom-web: study 1.2.826.0.1.3680043.8.498.1 failed")
    assert "127.0.0.1:8042" in line and "1.2.826" not in line


def test_uids_that_are_not_uids_never_become_paths(tmp_path):
    summary = pacs.pull("dicomweb", pacs.PacsParams(), tmp_path / "raw", tmp_path / "cursor.json", client=_Hostile())
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "cursor.json"]
    assert summary.failures["invalid_uid"] == 2 and summary.instances_refused == 1


def test_credentials_come_from_the_environment_never_from_params(monkeypatch):
    from pipeline.params import ParamsError, section

    with pytest.raises(ParamsError, match="credentials do not go in params.yaml"):
        section(pacs.PacsParams, {"url": "https://user:secret@pacs.example/dicom-web"}, where="params.yaml")
    monkeypatch.setenv("MEDTL_PACS_USERNAME", "reader")
    monkeypatch.setenv("MEDTL_PACS_PASSWORD", "s3cr3t-value")
    creds = pacs.credentials(pacs.PacsParams())
    assert (creds.username, creds.password, creds.tls_verify) == ("reader", "s3cr3t-value", True)
    assert "s3cr3t-value" not in repr(creds) and "reader" not in repr(creds)
    monkeypatch.setenv("MEDTL_PACS_CA_BUNDLE", "/nonexistent/ca.pem")
    with pytest.raises(pacs.PacsError, match="CA bundle"):
        pacs.credentials(pacs.PacsParams())


def test_reports_are_stored_into_their_study_once(orthanc_server, pacs_cohort, tmp_path):
    """An SR (as predict writes it) goes into its study; storing again sends nothing (no duplicates)."""
    from pipeline import sr

    client = _client(orthanc_server)
    by_study: dict[str, list] = {}
    for data in _originals(pacs_cohort).values():
        ds = pydicom.dcmread(__import__("io").BytesIO(data), stop_before_pixels=True)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    sr_dir = tmp_path / "sr"
    sr_dir.mkdir()
    for i, (study, evidence) in enumerate(sorted(by_study.items())[:3]):
        report = sr.study_report(evidence, score=0.7, threshold=0.5, positive_class="lesion", model_name="medtl test",
                                 model_version="1", model_sha256="0" * 64, aggregation="max")
        report.save_as(sr_dir / f"{i}.dcm", enforce_file_format=True)
    first = pacs.store_reports(client, sr_dir)
    assert (first.reports, first.stored, first.already_present) == (3, 3, 0)
    second = pacs.store_reports(client, sr_dir)
    assert (second.stored, second.already_present) == (0, 3)
    for study in sorted(by_study)[:3]:
        series = client.series(study)
        assert [s.modality for s in series].count("SR") == 1
        assert sum(s.n_instances for s in series if s.modality == "SR") == 1


def test_medtl_pull_stage_reads_params_and_does_nothing_for_a_folder_source(orthanc_server, tmp_path, monkeypatch):
    from pipeline import paths

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "pull"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0 and "nothing to pull" in done.stdout, done.stderr
    assert json.loads((tmp_path / paths.PULL_DIR / paths.PULL_SUMMARY).read_text())["skipped"] is True

    params["data"].update(source="dicomweb")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, **orthanc_server.env(), "PYTHONPATH": str(ROOT)}
    wrong = subprocess.run([sys.executable, "-m", "pipeline.cli", "pull"], cwd=tmp_path, capture_output=True,
                           text=True, env=env, timeout=120)
    assert wrong.returncode == 2 and "data.raw_dir" in wrong.stderr and paths.PACS_RAW_DIR in wrong.stderr

    params["data"].update(raw_dir=paths.PACS_RAW_DIR)
    params["pacs"].update(url=orthanc_server.dicomweb_url)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "pull"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "13 studies queried" in done.stdout and "169 instances" in done.stdout
    assert len(list((tmp_path / paths.PACS_RAW_DIR).rglob("*.dcm"))) == 169
    assert orthanc_server.password not in done.stdout + done.stderr

    env["MEDTL_PACS_PASSWORD"] = "wrong"
    refused = subprocess.run([sys.executable, "-m", "pipeline.cli", "pull"], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_without_dicomweb_clients_raw_decoder_the_parsed_datasets_are_written_as_received(
        orthanc_server, pacs_cohort, tmp_path, monkeypatch):
    """The fallback for a dicomweb-client release without its multipart decoder: iter_series datasets,
    written element by element as the bytes received (the same files)."""
    monkeypatch.setattr(pacs, "_raw_decoder", lambda client: None)
    pacs.pull("dicomweb", _params(orthanc_server), tmp_path / "raw", tmp_path / "cursor.json",
              client=_client(orthanc_server))
    assert _pulled(tmp_path / "raw") == _originals(pacs_cohort)


def test_qido_paging_follows_a_server_cap_and_flags_an_orthanc_like_limit(caplog, monkeypatch):
    monkeypatch.setattr(pacs, "QIDO_PAGE", 10)
    matches = [{"0020000D": {"Value": [f"1.2.{i}"]}} for i in range(25)]
    capped = lambda offset: matches[offset:offset + 4]  # noqa: E731 - a server that answers 4 per page at most
    assert pacs.search_all(capped, capped=lambda: True) == matches, "a server that says it cut its answer"
    asked = []
    plain = lambda offset: asked.append(offset) or matches[offset:offset + 10]  # noqa: E731
    assert pacs.search_all(plain) == matches and asked == [0, 10, 20], "a short page is the last: no extra query"
    limit_first = lambda offset: matches[:10][offset:offset + 10]  # noqa: E731 - limit applied before offset
    assert pacs.search_all(limit_first, "srv", "QIDO-RS studies") == matches[:10]
    assert "may cap its answers" in caplog.text

"""The SR medtl stores opens in the PACS's own web UI: headless Chromium on Orthanc Explorer's study page
lists the SR series beside the images (screenshot in ``$MEDTL_TEST_OUTPUT/orthanc/``, default
``test-output/orthanc/``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
import pytest

from tests.flows.test_ui import CHROMIUM_ARGS

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
OUTPUT = Path(os.environ.get("MEDTL_TEST_OUTPUT", ROOT / "test-output")) / "orthanc"


def test_the_stored_sr_is_listed_on_the_study_page_of_orthanc_explorer(orthanc_server, pacs_cohort, tmp_path):
    import requests

    from pipeline import sr
    from pipeline.sources import pacs

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; make test does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser (pip: medtl[dev])")

    evidence = []
    for path in sorted(pacs_cohort.rglob("*")):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if "StudyInstanceUID" in ds and (not evidence or ds.StudyInstanceUID == evidence[0].StudyInstanceUID):
                evidence.append(ds)
    report = sr.study_report(evidence, score=0.83, threshold=0.5, positive_class="lesion", model_name="medtl demo",
                             model_version="1", model_sha256="1" * 64, aggregation="max")
    (tmp_path / "sr").mkdir()
    report.save_as(tmp_path / "sr" / "report.dcm", enforce_file_format=True)
    client = pacs.DicomwebClient(pacs.PacsParams(url=orthanc_server.dicomweb_url),
                                 pacs.Credentials(username=orthanc_server.user, password=orthanc_server.password))
    assert pacs.store_reports(client, tmp_path / "sr").stored == 1

    auth = (orthanc_server.user, orthanc_server.password)
    found = requests.post(f"{orthanc_server.url}/tools/lookup", data=str(evidence[0].StudyInstanceUID), auth=auth,
                          timeout=10).json()
    study_id = next(item["ID"] for item in found if item["Type"] == "Study")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(http_credentials={"username": auth[0], "password": auth[1]},
                                          viewport={"width": 1300, "height": 900})
            page = context.new_page()
            page.goto(f"{orthanc_server.url}/app/explorer.html#study?uuid={study_id}")
            page.get_by_text(sr.DISCLAIMER[:30]).first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            assert "SR" in text and sr.DISCLAIMER[:30] in text
            image_series = {str(d.SeriesDescription) for d in evidence if "SeriesDescription" in d}
            assert all(desc in text for desc in image_series), "the images' series are listed beside it"
            OUTPUT.mkdir(parents=True, exist_ok=True)
            page.wait_for_timeout(1000)
            shot = OUTPUT / "study-with-sr.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()

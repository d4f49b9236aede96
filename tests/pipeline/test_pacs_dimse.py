"""Pulling from a real PACS (Orthanc) over DIMSE and storing results back: C-FIND with filters, C-GET of
every series in the transfer syntax it is stored in, C-STORE, a cut mid-series and a partial C-GET that
keep what arrived, one-line errors.

Most tests share one Orthanc (:func:`pacs_server`; starting and stopping one takes ~5 s): a test that
stores adds studies of its own under a modality no other test queries (OT, SR, PT, MR), so the cohort's 13
studies stay as loaded whatever the order. The stopped-server test has its own (``orthanc_server``).
"""

from __future__ import annotations

import io
import re
import socket
import threading
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pipeline.sources import pacs
from tests.conftest import image_files

UIDISH = re.compile(r"\d+(\.\d+){3,}")
ULTRASOUND_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # a SOP class medtl does not take over C-GET


@pytest.fixture(autouse=True)
def _orthanc_without_nagle(monkeypatch):
    """Debian's Orthanc (DCMTK) writes each DIMSE message in two pieces with Nagle's algorithm on, so every
    response waits for a delayed ACK (~40 ms; a full pull takes 14 s instead of 5 s). DCMTK sets TCP_NODELAY
    when ``TCP_NODELAY=1`` is in its environment; autouse, so it is set before ``orthanc_server`` starts."""
    monkeypatch.setenv("TCP_NODELAY", "1")


@pytest.fixture(scope="module")
def pacs_server(tmp_path_factory, pacs_cohort):
    """One Orthanc holding :func:`pacs_cohort` for the tests of this module that leave its 13 studies as they are."""
    from tests.conftest import _orthanc_or_skip

    orthanc = _orthanc_or_skip()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TCP_NODELAY", "1")
        server = orthanc.start(tmp_path_factory.mktemp("orthanc_dimse"))
    try:
        orthanc.load(server, pacs_cohort)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def originals(pacs_cohort) -> dict[str, Dataset]:
    """SOPInstanceUID -> dataset of every image file of the cohort (what Orthanc was loaded with)."""
    return {uid: pydicom.dcmread(path) for uid, path in image_files(pacs_cohort).items()}


def _params(server, port: int | None = None, **kw) -> pacs.PacsParams:
    kw.setdefault("retries", 0)
    return pacs.PacsParams(host="127.0.0.1", port=port or server.dicom_port, called_aet=server.aet,
                           calling_aet=server.client_aet, timeout_s=10, **kw)


def _client(server, port: int | None = None, **kw):
    from pipeline.sources.dimse import DimseClient

    return DimseClient(_params(server, port, **kw))


def _pulled(folder) -> set[str]:
    return {p.stem for p in folder.rglob("*.dcm")}


def _new_study(like: Dataset) -> Dataset:
    """The patient of ``like`` with a new study (its own StudyInstanceUID): what a test stores goes there."""
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword in like:
            setattr(ds, keyword, like.data_element(keyword).value)
    ds.StudyInstanceUID = generate_uid()
    return ds


def _secondary_capture(study: Dataset) -> Dataset:
    """A small valid Secondary Capture image in ``study`` (patient and study attributes copied), no file meta."""
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 900, 1
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    return ds


def _copy(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _store_series(client, originals: dict, modality: str, n: int) -> tuple[Dataset, list[Dataset]]:
    """Store a new study (a cohort patient's) of one series: ``n`` copies of cohort CT images under new UIDs,
    labelled ``modality`` so that only a pull of that modality sees it. Returns (study, the copies)."""
    study = _new_study(next(iter(originals.values())))
    source = [ds for ds in originals.values()
              if ds.Modality == "CT" and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian]
    series_uid, copies = generate_uid(), []
    for ds in source[:n]:
        copy = _copy(ds)
        copy.update(study)
        copy.Modality, copy.SeriesInstanceUID = modality, series_uid
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(copy)
    client.store(copies)
    return study, copies


def _one_line_without_uids(message: str, server) -> bool:
    where = f"{server.aet}@127.0.0.1:"
    return "\n" not in message and where in message and not UIDISH.search(message.split(": ", 1)[-1])


# ------------------------------------------------------------------------------------ pull


def test_pull_retrieves_every_instance_in_its_transfer_syntax_then_nothing(pacs_server, originals, tmp_path):
    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    summary = pacs.pull("dimse", _params(pacs_server), out, cursor)
    pulled = {p.stem: p for p in out.rglob("*.dcm")}
    assert set(pulled) == set(originals) and len(originals) == 169, "every instance and nothing else"
    assert summary.studies_queried == summary.studies_new == summary.studies_retrieved == 13
    assert summary.series_retrieved == 20 and summary.instances_retrieved == 169 and summary.studies_failed == 0
    assert summary.server == f"{pacs_server.aet}@127.0.0.1:{pacs_server.dicom_port}"
    for uid, path in pulled.items():
        ds, original = pydicom.dcmread(path), originals[uid]
        assert path.relative_to(out).parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{uid}.dcm")
        assert ds.SOPInstanceUID == uid
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, "not transcoded"
        assert ds.PixelData == original.PixelData
        assert ds == original, "every data element as stored (only the file meta is medtl's own)"
    assert {ds.file_meta.TransferSyntaxUID.name for ds in originals.values()} >= {
        "Explicit VR Little Endian", "Implicit VR Little Endian", "RLE Lossless"}, "the cohort mixes syntaxes"
    assert not list(out.rglob("*.tmp"))

    again = pacs.pull("dimse", _params(pacs_server), out, cursor)
    assert again.studies_unchanged == 13 and again.instances_retrieved == 0 and again.series_retrieved == 0


def test_queries_filter_by_modality_and_report_instance_counts(pacs_server, originals):
    per_study: dict[str, int] = {}
    for ds in originals.values():
        per_study[str(ds.StudyInstanceUID)] = per_study.get(str(ds.StudyInstanceUID), 0) + 1
    ct_studies = {str(ds.StudyInstanceUID) for ds in originals.values() if ds.Modality == "CT"}
    assert 0 < len(ct_studies) < 13

    ct = _client(pacs_server, modalities=("CT",)).studies()
    assert {s.uid for s in ct} == ct_studies and len(ct) == len(ct_studies)
    everything = _client(pacs_server).studies()  # CT, CR, DX: one C-FIND with a value list (CT\CR\DX)
    assert {s.uid: s.n_instances for s in everything} == per_study, "NumberOfStudyRelatedInstances comes back"
    assert _client(pacs_server, modalities=("MG",)).studies() == []

    study = sorted(ct_studies)[0]
    in_study = [ds for ds in originals.values() if ds.StudyInstanceUID == study]
    counts: dict[tuple, int] = {}
    for ds in in_study:
        key = (str(ds.SeriesInstanceUID), str(ds.Modality))
        counts[key] = counts.get(key, 0) + 1
    series = _client(pacs_server).series(study)
    assert {(s.uid, s.modality): s.n_instances for s in series} == counts, "NumberOfSeriesRelatedInstances too"
    one = series[0]
    assert set(_client(pacs_server).instances(study, one.uid)) == {
        str(ds.SOPInstanceUID) for ds in in_study if ds.SeriesInstanceUID == one.uid}
    part = str(in_study[0].BodyPartExamined)
    assert {s.uid for s in _client(pacs_server, body_part=part).series(study)} == {
        str(ds.SeriesInstanceUID) for ds in in_study if ds.get("BodyPartExamined") == part}
    assert _client(pacs_server, body_part="NOSUCHPART").series(study) == []

    big = max(series, key=lambda s: s.n_instances)
    retrieving = _client(pacs_server).retrieve(study, big.uid)
    assert next(retrieving).SeriesInstanceUID == big.uid
    retrieving.close()  # a consumer that stops early: the C-GET is aborted, the server serves the next one
    assert len(_client(pacs_server).instances(study, big.uid)) == big.n_instances


def test_c_get_keeps_a_deflated_instance_deflated(pacs_server, originals, tmp_path):
    from pipeline.sources import orthanc

    capture = _secondary_capture(_new_study(next(iter(originals.values()))))
    capture.file_meta = FileMetaDataset()
    capture.file_meta.MediaStorageSOPClassUID = capture.SOPClassUID
    capture.file_meta.MediaStorageSOPInstanceUID = capture.SOPInstanceUID
    capture.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    (tmp_path / "in").mkdir()
    capture.save_as(tmp_path / "in" / "sc.dcm", enforce_file_format=True)
    assert orthanc.load(pacs_server, tmp_path / "in") == 1  # STOW-RS keeps it deflated (C-STORE would not)
    [got] = _client(pacs_server).retrieve(str(capture.StudyInstanceUID), str(capture.SeriesInstanceUID))
    assert got.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert got == pydicom.dcmread(tmp_path / "in" / "sc.dcm")


# ------------------------------------------------------------------------------------ store


def test_store_then_has_instance_and_reports_are_stored_once(pacs_server, originals, tmp_path):
    from pipeline import sr

    client = _client(pacs_server)
    study = _new_study(next(iter(originals.values())))
    capture = _secondary_capture(study)
    assert not client.has_instance(str(study.StudyInstanceUID), str(capture.SOPInstanceUID))
    client.store([capture])  # no file meta: sent in explicit VR little endian
    assert client.has_instance(str(study.StudyInstanceUID), str(capture.SOPInstanceUID))
    assert not client.has_instance(str(study.StudyInstanceUID), generate_uid())
    assert "TransferSyntaxUID" not in getattr(capture, "file_meta", Dataset()), "the caller's dataset is unchanged"

    # an SR as predict writes it (Comprehensive 3D SR), through store_reports: stored once, then never again
    report = sr.study_report([capture], score=0.7, threshold=0.5, positive_class="lesion", model_name="medtl test",
                             model_version="1", model_sha256="0" * 64, aggregation="max")
    (tmp_path / "sr").mkdir()
    report.save_as(tmp_path / "sr" / "0.dcm", enforce_file_format=True)
    first = pacs.store_reports(client, tmp_path / "sr")
    assert (first.reports, first.stored, first.already_present) == (1, 1, 0)
    second = pacs.store_reports(client, tmp_path / "sr")
    assert (second.stored, second.already_present) == (0, 1)
    assert sorted(s.modality for s in client.series(str(study.StudyInstanceUID))) == ["OT", "SR"]


# ------------------------------------------------------------------------------------ failures


class _Relay:
    """A TCP relay in front of the PACS that the test can cut: every open connection dropped, new ones refused
    (as a network failure mid-study does)."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                near, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target))
            self.open += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side closed: close the other (Orthanc serves 4 associations at a time)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.closed.set()
        self.listener.close()
        for sock in self.open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class _CutMidSeries:
    """A client whose network is cut once a series has handed on ``after`` instances."""

    def __init__(self, inner, relay: _Relay, after: int):
        self.inner, self.relay, self.after = inner, relay, after
        self.cut_series: str | None = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def retrieve(self, study, series):
        for n, ds in enumerate(self.inner.retrieve(study, series), 1):
            yield ds
            if n == self.after and self.cut_series is None:
                self.cut_series = series
                self.relay.cut()


def test_a_connection_cut_mid_series_keeps_what_arrived_and_resumes(pacs_server, originals, tmp_path):
    """Two studies of 8 images (PT: a modality only this test pulls); the network is cut after the third image
    of the first: those are kept, the second study cannot connect, and the next run completes both."""
    stored = {str(ds.SOPInstanceUID): ds for _ in range(2)
              for ds in _store_series(_client(pacs_server), originals, "PT", 8)[1]}
    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    relay = _Relay(pacs_server.dicom_port)
    params = _params(pacs_server, relay.port, modalities=("PT",))
    cutting = _CutMidSeries(_client(pacs_server, relay.port, modalities=("PT",)), relay, after=3)
    cut = pacs.pull("dimse", params, out, cursor, client=cutting)
    assert cut.studies_queried == 2 and cut.studies_failed == 2 and cut.failures == {"network": 2}
    partial = _pulled(out)
    in_cut_series = {u for u, ds in stored.items() if ds.SeriesInstanceUID == cutting.cut_series}
    assert 3 <= len(partial) < 8 and partial <= in_cut_series, "what arrived before the cut is kept"
    assert not list(out.rglob("*.tmp"))
    for path in out.rglob("*.dcm"):
        assert pydicom.dcmread(path).PixelData == stored[path.stem].PixelData, "every file whole"

    resumed = pacs.pull("dimse", _params(pacs_server, modalities=("PT",)), out, cursor)
    assert _pulled(out) == set(stored) and not list(out.rglob("*.tmp"))
    assert resumed.studies_failed == 0 and resumed.instances_retrieved == 16 - len(partial)
    assert resumed.instances_already_present == len(partial), "nothing twice"


def test_a_partial_c_get_keeps_what_arrived_and_fails_the_study(pacs_server, originals, tmp_path):
    """A series holding an instance of a SOP class medtl does not take (Ultrasound): that sub-operation fails
    (Orthanc then stops the whole C-GET there); what came before is written, the study fails with the C-GET
    status, its series is not recorded as complete, and the next run tries it again."""
    client = _client(pacs_server)
    study, copies = _store_series(client, originals, "MR", 3)  # MR: a modality only this test pulls
    stranger = _copy(copies[0])
    stranger.SOPClassUID = stranger.file_meta.MediaStorageSOPClassUID = ULTRASOUND_IMAGE_STORAGE
    stranger.SOPInstanceUID = stranger.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    client.store([stranger])
    series_uid = str(stranger.SeriesInstanceUID)
    images = {str(ds.SOPInstanceUID) for ds in copies}

    got = []
    with pytest.raises(pacs.PacsError) as failed:
        for ds in client.retrieve(str(study.StudyInstanceUID), series_uid):
            got.append(str(ds.SOPInstanceUID))
    assert set(got) <= images, "only the instances medtl takes, each once"
    message = str(failed.value)
    assert "C-GET series failed: status 0x" in message and _one_line_without_uids(message, pacs_server)

    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    params = _params(pacs_server, modalities=("MR",))
    summary = pacs.pull("dimse", params, out, cursor)
    assert summary.studies_queried == 1 and summary.studies_failed == 1 and summary.failures == {"server_error": 1}
    assert _pulled(out) <= images and not list(out.rglob("*.tmp"))
    again = pacs.pull("dimse", params, out, cursor)
    assert again.studies_changed == 1 and again.studies_failed == 1, "the series is tried again"
    assert again.instances_already_present == len(_pulled(out)) and again.instances_retrieved == 0


def test_a_stopped_server_is_a_one_line_error_and_writes_nothing(orthanc_server, originals, tmp_path, monkeypatch):
    from pipeline.sources import dimse

    out, cursor = tmp_path / "raw", tmp_path / "cursor.json"
    orthanc_server.stop()
    waits: list[float] = []
    monkeypatch.setattr(dimse, "time", SimpleNamespace(sleep=waits.append))  # the backoff, without the waiting
    with pytest.raises(pacs.PacsError) as down:
        pacs.pull("dimse", _params(orthanc_server, retries=3), out, cursor)
    assert waits == [0.5, 1.0, 2.0], "tried 4 times, backing off"
    message = str(down.value)
    assert f"ORTHANC@127.0.0.1:{orthanc_server.dicom_port}: C-FIND studies failed: cannot connect" in message
    assert _one_line_without_uids(message, orthanc_server)
    assert not list(out.rglob("*")) and not cursor.exists()
    with pytest.raises(pacs.PacsError, match=r"^pacs ORTHANC@127\.0\.0\.1:\d+: C-STORE failed: cannot connect"):
        _client(orthanc_server).store([_secondary_capture(_new_study(next(iter(originals.values()))))])


# A wrong called AE title is not refused by this Orthanc (DicomCheckCalledAet is false): no test for it.

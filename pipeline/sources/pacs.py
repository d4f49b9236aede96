"""A PACS as source and destination: pull new studies into a local folder, store results back.

``medtl pull`` (the ``pull`` stage of dvc.yaml) queries the PACS named in the ``pacs`` section of
params.yaml, over DICOMweb (``data.source: dicomweb``; QIDO-RS, WADO-RS, STOW-RS with dicomweb-client)
or DIMSE (``data.source: dimse``; C-FIND, C-GET, C-STORE with pynetdicom), and writes what it retrieves
as plain DICOM files into ``data/raw/pacs/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
which ingest then reads like any folder export. That folder holds raw PHI: it is a DVC output with
``push: false`` and never leaves the site.

Incremental: a cursor (``data/pull/cursor.json``, also local) records, per study, the instance count the
PACS reported and the series retrieved in full. A run queries the studies (modality, date window,
description), skips every study whose instance count has not changed, and in the others retrieves
only the series not yet complete. Files are written atomically (temporary name, then rename) and a
series enters the cursor only once all its instances are on disk, so a run killed or cut off mid-study
resumes where it stopped: nothing partial, nothing twice. An instance already on disk is not written
again.

Credentials never come from params.yaml: ``MEDTL_PACS_USERNAME`` and ``MEDTL_PACS_PASSWORD`` (basic
auth) or ``MEDTL_PACS_TOKEN`` (bearer), ``MEDTL_PACS_CA_BUNDLE`` (a CA file for TLS) and
``MEDTL_PACS_TLS_VERIFY=false`` (only for a test server), or a Prefect Secret block named by
``pacs.secret_block`` whose value is a JSON object with the keys ``username``, ``password``, ``token``,
``ca_bundle``, ``tls_verify``. Errors name the server and the status, never a credential, and logs and
summaries count studies; they never carry UIDs or other header values.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from pipeline.errors import MedtlError
from pipeline.io_utils import atomic_write_bytes, atomic_write_text, remove_stale_temps
from pipeline.params import check, param

log = logging.getLogger(__name__)
# dicomweb-client and urllib3 log request URLs (which hold study/series UIDs) at INFO/DEBUG: keep them quiet,
# even under `medtl -v`; our own lines count studies and never name them
for _name in ("dicomweb_client", "urllib3"):  # pynetdicom: pipeline.sources.dimse
    logging.getLogger(_name).setLevel(logging.WARNING)

PROTOCOLS = ("dicomweb", "dimse")
#: a DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. Anything else from a server is
#: refused before it becomes part of a path (a hostile "UID" such as ``../../x`` must not escape the folder).
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
CURSOR_VERSION = 1
QIDO_PAGE = 1000
CHECKPOINT_S = 5.0  # seconds between cursor saves during a pull (and at its end)
ENV = {"username": "MEDTL_PACS_USERNAME", "password": "MEDTL_PACS_PASSWORD", "token": "MEDTL_PACS_TOKEN",
       "ca_bundle": "MEDTL_PACS_CA_BUNDLE", "tls_verify": "MEDTL_PACS_TLS_VERIFY"}


class PacsError(MedtlError):
    """The PACS cannot be used: unreachable, refused the credentials, or answered with an error."""


@dataclass(frozen=True)
class PacsParams:
    """``pacs`` section of params.yaml: which server, which studies (credentials: environment only).

    Attributes:
        url: DICOMweb root (``data.source: dicomweb``), e.g. ``https://pacs.example.org/dicom-web``.
        host, port, called_aet, calling_aet: the DIMSE peer and medtl's own AE title (``data.source: dimse``).
        modalities: studies holding any of these; only series of these modalities are retrieved.
        days_back: only studies of the last N days (StudyDate); 0: no date window.
        study_date_from, study_date_to: a fixed window (``YYYYMMDD``, either may be empty); used when
            days_back is 0.
        description: a StudyDescription filter (``*`` wildcards), empty for none.
        body_part: only series with this BodyPartExamined, empty for any.
        retries: attempts after the first for a query or a series that failed with a network error or
            a 5xx status (exponential backoff from 0.5 s).
        timeout_s: per network operation.
        secret_block: name of a Prefect Secret block holding the credentials (JSON), empty: environment.
    """

    url: str = "http://127.0.0.1:8042/dicom-web"
    host: str = "127.0.0.1"
    port: int = param(4242, min=1, max=65535)
    called_aet: str = "ORTHANC"
    calling_aet: str = "MEDTL"
    modalities: tuple[str, ...] = ("CT", "CR", "DX")
    days_back: int = param(0, min=0)
    study_date_from: str = ""
    study_date_to: str = ""
    description: str = ""
    body_part: str = ""
    retries: int = param(3, min=0, max=20)
    timeout_s: float = param(60.0, min=1)
    secret_block: str = ""

    def __post_init__(self) -> None:
        from pipeline.params import ParamsError

        check(self, "pacs")
        if "@" in self.url.split("//", 1)[-1].split("/", 1)[0]:
            raise ParamsError("pacs.url: credentials do not go in params.yaml; set MEDTL_PACS_USERNAME and "
                              "MEDTL_PACS_PASSWORD (or MEDTL_PACS_TOKEN) in the environment")
        for name in ("study_date_from", "study_date_to"):
            value = getattr(self, name)
            if value and not re.fullmatch(r"\d{8}", value):
                raise ParamsError(f"pacs.{name}: must be YYYYMMDD or empty, got {value!r}")
        for name in ("called_aet", "calling_aet"):
            if not 0 < len(getattr(self, name)) <= 16:
                raise ParamsError(f"pacs.{name}: an AE title has 1 to 16 characters, got {getattr(self, name)!r}")

    def date_range(self, today: date | None = None) -> str:
        """The StudyDate matching value (DICOM range ``FROM-TO``), '' for none."""
        if self.days_back:
            start = (today or date.today()) - timedelta(days=self.days_back)
            return f"{start:%Y%m%d}-"
        if self.study_date_from or self.study_date_to:
            return f"{self.study_date_from}-{self.study_date_to}"
        return ""


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    token: str = ""
    ca_bundle: str = ""
    tls_verify: bool = True

    def __repr__(self) -> str:  # never shows a secret, whatever logs an object
        return f"Credentials(username={'set' if self.username else 'unset'}, token={'set' if self.token else 'unset'})"


def _truthy(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("0", "false", "no", "off")


def credentials(params: PacsParams, environ: dict | None = None) -> Credentials:
    """Credentials from the Prefect Secret block ``pacs.secret_block`` if named, else the environment."""
    env = os.environ if environ is None else environ
    values: dict = {}
    if params.secret_block:
        try:
            from prefect.blocks.system import Secret

            raw = Secret.load(params.secret_block).get()
        except Exception as exc:  # noqa: BLE001 - any failure to read the block is the same user error
            raise PacsError(f"pacs.secret_block: cannot read Prefect Secret block {params.secret_block!r} "
                            f"({type(exc).__name__})") from None
        values = raw if isinstance(raw, dict) else json.loads(raw) if str(raw).lstrip().startswith("{") else {}
        if not values:
            raise PacsError(f"pacs.secret_block: Secret block {params.secret_block!r} must hold a JSON object "
                            "with username/password or token")
    else:
        values = {key: env[var] for key, var in ENV.items() if env.get(var)}
    unknown = set(values) - set(ENV)
    if unknown:
        raise PacsError(f"pacs.secret_block: unknown keys {sorted(unknown)} (known: {sorted(ENV)})")
    creds = Credentials(username=str(values.get("username", "")), password=str(values.get("password", "")),
                        token=str(values.get("token", "")), ca_bundle=str(values.get("ca_bundle", "")),
                        tls_verify=_truthy(values.get("tls_verify", True)))
    if creds.ca_bundle and not Path(creds.ca_bundle).is_file():
        raise PacsError(f"{creds.ca_bundle}: CA bundle ({ENV['ca_bundle']}) not found")
    return creds


# ------------------------------------------------------------------------------------ clients


@dataclass(frozen=True)
class Study:
    uid: str
    n_instances: int          # as the PACS reports it (NumberOfStudyRelatedInstances); -1 when it does not


@dataclass(frozen=True)
class Series:
    uid: str
    modality: str
    n_instances: int


def _value(item: dict, tag: str, default=""):
    """A value from a DICOM JSON (PS3.18 F.2) attribute, or ``default``."""
    values = item.get(tag, {}).get("Value") or []
    return values[0] if values else default


class DicomwebClient:
    """QIDO-RS / WADO-RS / STOW-RS over dicomweb-client, with retries for transient failures."""

    def __init__(self, params: PacsParams, creds: Credentials):
        from dicomweb_client.api import DICOMwebClient
        from requests import Session
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.params, self.where = params, params.url
        session = Session()
        retry = Retry(total=params.retries, connect=params.retries, read=params.retries, backoff_factor=0.5,
                      status_forcelist=(502, 503, 504), allowed_methods=frozenset({"GET"}), raise_on_status=False)
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        if creds.token:
            session.headers["Authorization"] = f"Bearer {creds.token}"
        elif creds.username:
            session.auth = (creds.username, creds.password)
        session.verify = creds.ca_bundle or creds.tls_verify
        self._warning = ""
        session.hooks["response"].append(self._remember_warning)
        self.session = session
        self.client = DICOMwebClient(params.url.rstrip("/"), session=session, timeout=params.timeout_s)

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - mapped to one line below
            raise _network_error(self.where, what, exc) from None

    def _search(self, what: str, fn: Callable, *args, **kwargs) -> list[dict]:
        return search_all(lambda offset: self._call(what, fn, *args, limit=QIDO_PAGE, offset=offset, **kwargs),
                          self.where, what, capped=lambda: self._warning.startswith("299"))

    def _remember_warning(self, response, *args, **kwargs) -> None:
        """requests response hook: the last response's Warning header (QIDO-RS says 299 when it cut matches)."""
        self._warning = response.headers.get("Warning", "")

    def studies(self) -> list[Study]:
        filters = {}
        if self.params.modalities:
            filters["ModalitiesInStudy"] = ",".join(self.params.modalities)  # a QIDO-RS value list (PS3.18)
        if self.params.date_range():
            filters["StudyDate"] = self.params.date_range()
        if self.params.description:
            filters["StudyDescription"] = self.params.description
        found = self._search("QIDO-RS studies", self.client.search_for_studies, search_filters=filters,
                             fields=["NumberOfStudyRelatedInstances"])
        return [Study(str(_value(s, "0020000D")), int(_value(s, "00201208", -1) or -1)) for s in found]

    def series(self, study: str) -> list[Series]:
        filters = {"BodyPartExamined": self.params.body_part} if self.params.body_part else {}
        found = self._search("QIDO-RS series", self.client.search_for_series, study, search_filters=filters,
                             fields=["NumberOfSeriesRelatedInstances"])
        return [Series(str(_value(s, "0020000E")), str(_value(s, "00080060")), int(_value(s, "00201209", -1) or -1))
                for s in found]

    def instances(self, study: str, series: str) -> list[str]:
        found = self._search("QIDO-RS instances", self.client.search_for_instances, study, series)
        return [str(_value(i, "00080018")) for i in found]

    def retrieve(self, study: str, series: str) -> Iterator:
        """The series' instances as they arrive, each as the file bytes the PACS sent (its stored
        transfer syntax: ``transfer-syntax=*``), so nothing is decoded and re-encoded on the way to disk.

        The multipart body is split by dicomweb-client's own decoder; where a dicomweb-client release
        no longer has it, its public ``iter_series`` gives parsed datasets instead (re-encoded on write).
        """
        decode = _raw_decoder(self.client)
        try:
            if decode is None:
                yield from self.client.iter_series(study, series, media_types=(("application/dicom", "*"),))
                return
            response = self.session.get(f"{self.params.url.rstrip('/')}/studies/{study}/series/{series}",
                                        headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                           "transfer-syntax=*"},
                                        stream=True, timeout=self.params.timeout_s)
            response.raise_for_status()
            for part in decode(response, True):
                yield bytes(part)
        except Exception as exc:  # noqa: BLE001
            raise _network_error(self.where, "WADO-RS series", exc) from None

    def store(self, datasets: list) -> None:
        self._call("STOW-RS", self.client.store_instances, datasets)

    def has_instance(self, study: str, sop_uid: str) -> bool:
        found = self._call("QIDO-RS instances", self.client.search_for_instances, study,
                           search_filters={"SOPInstanceUID": sop_uid})
        return bool(found)


def search_all(page: Callable[[int], list[dict]], where: str = "", what: str = "",
               capped: Callable[[], bool] = lambda: False) -> list[dict]:
    """Every match of a QIDO-RS query, page by page (``page(offset)`` asks for QIDO_PAGE from ``offset``).

    A page of fewer than QIDO_PAGE matches is the last (PS3.18 8.3.4.4), unless ``capped()`` says the
    server cut it to its own maximum (its ``Warning: 299`` header): then paging goes on while pages bring
    matches not seen before. dicomweb-client's ``get_remaining`` is not used: it never returns against
    Orthanc 1.10. Orthanc also applies ``limit`` before ``offset`` when the query has filters, so a
    filtered query stops at QIDO_PAGE matches; matches ending exactly at a page boundary may be such a cap,
    and that is logged (narrow ``pacs.days_back``).
    """
    found: list[dict] = []
    seen: set = set()
    while True:
        batch = page(len(found)) or []
        new = [item for item in batch if json.dumps(item, sort_keys=True) not in seen]
        seen.update(json.dumps(item, sort_keys=True) for item in new)
        found.extend(new)
        if not new or (len(batch) < QIDO_PAGE and not capped()):
            break
    if found and len(found) % QIDO_PAGE == 0:
        log.warning("pacs %s: %s returned exactly %d matches and no more; the server may cap its answers: "
                    "narrow pacs.days_back or the date window", where, what, len(found))
    return found


def _raw_decoder(client) -> Callable | None:
    """dicomweb-client's multipart decoder (bytes of each part), if this release has it."""
    return getattr(client, "_decode_multipart_message", None)


def _network_error(where: str, what: str, exc: Exception) -> PacsError:
    """One line: which server, which operation, what status (never a credential or a UID)."""
    from requests import HTTPError
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import SSLError, Timeout

    if isinstance(exc, HTTPError) and exc.response is not None:
        status = exc.response.status_code
        hint = " (check MEDTL_PACS_USERNAME/MEDTL_PACS_PASSWORD or MEDTL_PACS_TOKEN)" if status in (401, 403) else ""
        return PacsError(f"pacs {where}: {what} failed: HTTP {status} {exc.response.reason or ''}{hint}")
    if isinstance(exc, SSLError):
        return PacsError(f"pacs {where}: {what} failed: TLS verification failed (set MEDTL_PACS_CA_BUNDLE)")
    if isinstance(exc, Timeout):
        return PacsError(f"pacs {where}: {what} failed: timed out")
    if isinstance(exc, RequestsConnectionError):
        return PacsError(f"pacs {where}: {what} failed: cannot connect (server down or unreachable)")
    return PacsError(f"pacs {where}: {what} failed: {type(exc).__name__}")


# ------------------------------------------------------------------------------------ pull


@dataclass
class PullSummary:
    source: str
    server: str
    studies_queried: int = 0
    studies_unchanged: int = 0
    studies_new: int = 0
    studies_changed: int = 0
    studies_retrieved: int = 0
    studies_failed: int = 0
    series_retrieved: int = 0
    instances_retrieved: int = 0
    instances_already_present: int = 0
    instances_refused: int = 0
    bytes_retrieved: int = 0
    seconds: float = 0.0
    failures: dict = field(default_factory=dict)   # reason -> count (no UIDs)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["seconds"] = round(self.seconds, 3)
        return out


def client_for(source: str, params: PacsParams, creds: Credentials | None = None):
    creds = credentials(params) if creds is None else creds
    if source == "dicomweb":
        return DicomwebClient(params, creds)
    if source == "dimse":
        from pipeline.sources.dimse import DimseClient

        return DimseClient(params)
    raise MedtlError(f"data.source: {source!r} is not a PACS (one of {', '.join(PROTOCOLS)})")


def server_name(source: str, params: PacsParams) -> str:
    return params.url if source == "dicomweb" else f"{params.called_aet}@{params.host}:{params.port}"


def load_cursor(path: Path) -> dict:
    if not path.is_file():
        return {"version": CURSOR_VERSION, "studies": {}}
    try:
        cursor = json.loads(path.read_text())
    except (ValueError, OSError):
        raise MedtlError(f"{path}: pull cursor is unreadable; delete it to pull everything again") from None
    if cursor.get("version") != CURSOR_VERSION:
        return {"version": CURSOR_VERSION, "studies": {}}
    return cursor


def _encode(ds) -> bytes:
    """A retrieved dataset as a DICOM file in the transfer syntax it came in: its elements as the bytes
    they were received as (``deid.encode``: pydicom's writer would decode and re-encode each, 4-5x the
    cost of the retrieval itself), behind a zero preamble (a preamble may hide anything)."""
    from pipeline.deid import encode

    return encode(ds)


def pull(source: str, params: PacsParams, out_dir: Path, cursor_path: Path, *, client=None,
         summary_path: Path | None = None) -> PullSummary:
    """Retrieve the new and changed studies from the PACS into ``out_dir`` (see the module docstring)."""
    start = time.perf_counter()
    out_dir, cursor_path = Path(out_dir), Path(cursor_path)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from pipeline.errors import output_error

        raise output_error(out_dir, exc) from None
    remove_stale_temps(out_dir)
    client = client_for(source, params) if client is None else client
    summary = PullSummary(source=source, server=server_name(source, params))
    cursor = load_cursor(cursor_path)
    known: dict = cursor["studies"]
    wanted = {m.upper() for m in params.modalities}

    studies = client.studies()
    summary.studies_queried = len(studies)
    saved = time.monotonic()
    for n, study in enumerate(studies, 1):
        if not UID.match(study.uid) or len(study.uid) > 64:
            summary.studies_failed += 1
            summary.failures["invalid_uid"] = summary.failures.get("invalid_uid", 0) + 1
            continue
        seen = known.get(study.uid)
        if seen is not None and study.n_instances >= 0 and seen.get("n_instances") == study.n_instances:
            summary.studies_unchanged += 1
            continue
        if seen is None:
            summary.studies_new += 1
        else:
            summary.studies_changed += 1
        entry = seen or {"n_instances": -1, "series": {}}
        try:
            got = _pull_study(client, study, entry, wanted, out_dir, summary)
        except PacsError as exc:
            summary.studies_failed += 1
            reason = "network" if "cannot connect" in str(exc) or "timed out" in str(exc) else "server_error"
            summary.failures[reason] = summary.failures.get(reason, 0) + 1
            log.warning("pull: study %d of %d failed: %s", n, len(studies), _without_uids(str(exc)))
            known[study.uid] = entry  # series completed before the failure stay recorded
            continue
        if got:
            summary.studies_retrieved += 1
        entry["n_instances"] = study.n_instances
        known[study.uid] = entry
        if time.monotonic() - saved >= CHECKPOINT_S:
            # every few seconds, not after each study (rewriting a growing cursor each time is quadratic): a killed
            # run re-checks at most these seconds' studies, whose files are on disk and not fetched again
            _save_cursor(cursor_path, cursor)
            saved = time.monotonic()
    _save_cursor(cursor_path, cursor)
    summary.seconds = time.perf_counter() - start
    if summary_path is not None:
        atomic_write_text(Path(summary_path), json.dumps(summary.as_dict(), indent=2) + "\n")
    log.info("pull: %d studies queried, %d new, %d changed, %d retrieved (%d instances), %d failed",
             summary.studies_queried, summary.studies_new, summary.studies_changed, summary.studies_retrieved,
             summary.instances_retrieved, summary.studies_failed)
    return summary


def _identity(data: bytes):
    """The SOP and series UIDs of a received file (header only), or None when it is not DICOM."""
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                               specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
    except Exception:  # noqa: BLE001 - anything unparseable is refused, not written
        return None


def _without_uids(text: str) -> str:
    return re.sub(r"\b\d+(\.\d+){4,}\b", "<uid>", text)  # 5+ components: a UID, not an IPv4 address


def _save_cursor(path: Path, cursor: dict) -> None:
    atomic_write_text(path, json.dumps(cursor, indent=1, sort_keys=True) + "\n")


def _pull_study(client, study: Study, entry: dict, wanted: set[str], out_dir: Path, summary: PullSummary) -> bool:
    """Retrieve the incomplete series of one study; True when anything was written."""
    done: dict = entry["series"]
    wrote = False
    for series in client.series(study.uid):
        if wanted and series.modality.upper() not in wanted:
            continue
        if not UID.match(series.uid) or len(series.uid) > 64:
            summary.failures["invalid_uid"] = summary.failures.get("invalid_uid", 0) + 1
            continue
        if series.uid in done and done[series.uid] == series.n_instances and series.n_instances >= 0:
            continue
        folder = out_dir / study.uid / series.uid
        count = 0
        for item in client.retrieve(study.uid, series.uid):
            ds = _identity(item) if isinstance(item, (bytes, bytearray)) else item
            sop = str(getattr(ds, "SOPInstanceUID", "")) if ds is not None else ""
            if not UID.match(sop) or len(sop) > 64 or str(getattr(ds, "SeriesInstanceUID", "")) != series.uid:
                summary.instances_refused += 1
                continue
            count += 1
            target = folder / f"{sop}.dcm"
            if target.exists():
                summary.instances_already_present += 1
                continue
            data = bytes(item) if isinstance(item, (bytes, bytearray)) else _encode(ds)
            atomic_write_bytes(target, data, durable=False)
            summary.instances_retrieved += 1
            summary.bytes_retrieved += len(data)
            wrote = True
        done[series.uid] = series.n_instances if series.n_instances >= 0 else count
        summary.series_retrieved += 1
    return wrote


# ------------------------------------------------------------------------------------ results back


@dataclass
class StoreSummary:
    reports: int = 0
    stored: int = 0
    already_present: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def store_reports(client, *folders: Path) -> StoreSummary:
    """Store every DICOM file in ``folders`` (predict's SRs and Grad-CAM captures) into its study in the
    PACS (STOW-RS or C-STORE).

    Their UIDs are fixed per study and model (:mod:`pipeline.sr`, :mod:`pipeline.sc`), so an object the PACS already
    holds (same SOPInstanceUID in the same study) is not sent again: rerunning stores no duplicates.
    """
    import pydicom

    summary = StoreSummary()
    pending = []
    for path in sorted(p for folder in folders for p in Path(folder).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        summary.reports += 1
        if client.has_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)):
            summary.already_present += 1
            continue
        pending.append(ds)
    for start in range(0, len(pending), 20):
        client.store(pending[start:start + 20])
        summary.stored += len(pending[start:start + 20])
    log.info("pacs: %d reports, %d stored, %d already in the PACS", summary.reports, summary.stored,
             summary.already_present)
    return summary


# ------------------------------------------------------------------------------------ the pull stage


def run_stage(params_file: Path, root: Path = Path(".")) -> PullSummary | None:
    """The ``pull`` stage (``medtl pull``, the retrain flow's pull task): retrieve into ``data/raw/pacs``
    when ``data.source`` is a PACS; with ``folder`` there is nothing to pull (None; the stage's outputs
    are left empty, so DVC's graph is the same for every source)."""
    from pipeline import paths
    from pipeline.params import DataParams, ParamsError, load_section

    project = paths.Project(root)
    data = load_section(DataParams, params_file, "data")
    if data.source == "folder":
        project.pacs_raw_dir.mkdir(parents=True, exist_ok=True)
        if not project.pull_cursor.exists():
            _save_cursor(project.pull_cursor, {"version": CURSOR_VERSION, "studies": {}})
        atomic_write_text(project.pull_summary, json.dumps({"source": "folder", "skipped": True}, indent=2) + "\n")
        return None
    if Path(data.raw_dir) != Path(paths.PACS_RAW_DIR):
        raise ParamsError(f"{params_file}: data.raw_dir: with data.source {data.source} ingest must read what pull "
                          f"retrieves: set it to {paths.PACS_RAW_DIR}, got {data.raw_dir!r}")
    params = load_section(PacsParams, params_file, "pacs")
    return pull(data.source, params, project.pacs_raw_dir, project.pull_cursor, summary_path=project.pull_summary)

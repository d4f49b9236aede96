"""A PACS over DIMSE (``data.source: dimse``): C-FIND, C-GET and C-STORE with pynetdicom.

:class:`DimseClient` has the same methods as :class:`pipeline.sources.pacs.DicomwebClient`, so
:func:`pipeline.sources.pacs.pull` and :func:`pipeline.sources.pacs.store_reports` work with either.
The peer is ``pacs.called_aet`` at ``pacs.host:pacs.port``; medtl calls itself ``pacs.calling_aet``.

Queries use the Study Root information model: STUDY level (ModalitiesInStudy as a value list,
StudyDate range, StudyDescription, NumberOfStudyRelatedInstances returned), SERIES level (Modality,
NumberOfSeriesRelatedInstances, BodyPartExamined when ``pacs.body_part`` is set) and IMAGE level.
A series is retrieved with C-GET at SERIES level over the same association: medtl takes the SCP
role for the storage SOP classes a cohort holds and offers each of them once per transfer syntax
(uncompressed, deflated, JPEG baseline and lossless, JPEG-LS, JPEG 2000, RLE), so that the PACS
sends every instance as it is stored and never has to transcode. Instances are handed on as they
arrive; a C-GET that ends without Success (sub-operations failed, an instance of a SOP class not
offered, the association aborted) raises :class:`~pipeline.sources.pacs.PacsError` after what did
arrive, so that pull keeps those files and retrieves the series again next time. No C-MOVE: it
needs the PACS to connect back to medtl, which a site's firewall rarely allows.

An association that cannot be established (connection refused, no answer, a transient rejection)
is tried again up to ``pacs.retries`` times, 0.5 s after the first failure and twice as long after
each next one; a permanent rejection (an unknown AE title, say) is not. ``pacs.timeout_s`` bounds
the connection, the association negotiation, each DIMSE response and network silence. Errors are
one line naming the server, the operation and the status, never a UID or another header value.
pynetdicom's own log repeats each failure over several lines (against the one-line rule) and at INFO
prints every query and response identifier (UIDs, descriptions), so its logger is silenced (CRITICAL)
unless something configured it already (``pynetdicom.debug_logger()``, or a level set on ``pynetdicom``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Iterator

from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as FIND,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet as GET,
)

from pipeline.sources.pacs import PacsError, PacsParams, Series, Study

if logging.getLogger("pynetdicom").level == logging.NOTSET:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # see the module docstring

#: storage SOP classes with pixel data that C-GET accepts, each offered with every :data:`PIXEL_SYNTAXES`
IMAGE_STORAGE = (
    uids.UID("1.2.840.10008.5.1.4.1.1.2"),        # CT Image Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.2.1"),      # Enhanced CT Image Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.4"),        # MR Image Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.4.1"),      # Enhanced MR Image Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.1"),        # Computed Radiography Image Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.1.1"),      # Digital X-Ray Image Storage - For Presentation
    uids.UID("1.2.840.10008.5.1.4.1.1.1.1.1"),    # Digital X-Ray Image Storage - For Processing
    uids.UID("1.2.840.10008.5.1.4.1.1.1.2"),      # Digital Mammography X-Ray Image Storage - For Presentation
    uids.UID("1.2.840.10008.5.1.4.1.1.7"),        # Secondary Capture Image Storage
)
#: structured reports and other documents without pixel data, offered with :data:`DOCUMENT_SYNTAXES`
DOCUMENT_STORAGE = (
    uids.UID("1.2.840.10008.5.1.4.1.1.88.11"),    # Basic Text SR Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.88.22"),    # Enhanced SR Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.88.33"),    # Comprehensive SR Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.88.34"),    # Comprehensive 3D SR Storage
    uids.UID("1.2.840.10008.5.1.4.1.1.88.59"),    # Key Object Selection Document Storage
)
UNCOMPRESSED_SYNTAXES = (uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian)
DOCUMENT_SYNTAXES = (*UNCOMPRESSED_SYNTAXES, uids.DeflatedExplicitVRLittleEndian)
PIXEL_SYNTAXES = (
    *DOCUMENT_SYNTAXES,
    uids.JPEGBaseline8Bit,
    uids.JPEGLossless,
    uids.JPEGLosslessSV1,
    uids.JPEGLSLossless,
    uids.JPEGLSNearLossless,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    uids.RLELossless,
)
#: pynetdicom (and PS3.8) allow at most 128 presentation contexts in one association
MAX_CONTEXTS = 128
PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000


def _get_contexts() -> list:
    """C-GET's presentation contexts: the Get model, then one per (storage SOP class, transfer syntax),
    so that the PACS can send each instance in the transfer syntax it holds."""
    contexts = [build_context(GET)]
    contexts += [build_context(sop, ts) for sop in IMAGE_STORAGE for ts in PIXEL_SYNTAXES]
    contexts += [build_context(sop, ts) for sop in DOCUMENT_STORAGE for ts in DOCUMENT_SYNTAXES]
    assert len(contexts) <= MAX_CONTEXTS, len(contexts)
    return contexts


GET_CONTEXTS = _get_contexts()


def _int(value, default: int = -1) -> int:
    """An IS value (an instance count) as an int, ``default`` when absent, empty or not a number."""
    try:
        return int(str(value).strip()) if value is not None and str(value).strip() else default
    except ValueError:
        return default


class DimseClient:
    """C-FIND / C-GET / C-STORE against one DIMSE peer, with retries for associations that fail to establish."""

    def __init__(self, params: PacsParams):
        self.params = params
        self.where = f"{params.called_aet}@{params.host}:{params.port}"
        self.ae = AE(ae_title=params.calling_aet)
        self.ae.connection_timeout = params.timeout_s
        self.ae.acse_timeout = params.timeout_s
        self.ae.dimse_timeout = params.timeout_s
        self.ae.network_timeout = params.timeout_s

    # ------------------------------------------------------------------ associations

    def _error(self, what: str, status: str) -> PacsError:
        return PacsError(f"pacs {self.where}: {what} failed: {status}")

    def _associate(self, what: str, contexts: list, *, roles: list | None = None, handlers: list | None = None):
        """An established association, after up to ``params.retries`` more tries (backoff 0.5 s doubling)."""
        delay = 0.5
        for attempt in range(self.params.retries + 1):
            seen = {"connected": False, "accepted": False}
            bound = [(evt.EVT_CONN_OPEN, lambda event, seen=seen: seen.__setitem__("connected", True)),
                     (evt.EVT_ACCEPTED, lambda event, seen=seen: seen.__setitem__("accepted", True)),
                     *(handlers or [])]
            try:
                assoc = self.ae.associate(self.params.host, self.params.port, contexts=contexts,
                                          ae_title=self.params.called_aet, ext_neg=roles or None, evt_handlers=bound)
            except (OSError, ValueError, RuntimeError) as exc:  # pynetdicom refused the request itself
                raise self._error(what, f"cannot request an association ({type(exc).__name__})") from None
            if assoc.is_established:
                return assoc
            reason, transient = self._why_not(assoc, seen)
            if not transient or attempt == self.params.retries:
                raise self._error(what, reason)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    @staticmethod
    def _why_not(assoc, seen: dict) -> tuple[str, bool]:
        """Why an association was not established, and whether trying again may help."""
        if assoc.is_rejected:
            rsp = getattr(assoc.acceptor, "primitive", None)
            result = getattr(rsp, "result", None)
            try:
                detail = f" ({rsp.reason_str.strip()})" if rsp is not None else ""
            except (AttributeError, KeyError, TypeError):
                detail = ""
            return f"association rejected{detail}", result == 0x02  # 0x02: rejected (transient)
        if not seen["connected"]:
            return "cannot connect (server down or unreachable)", True
        if seen["accepted"]:
            return "no presentation context accepted (the server does not offer this service)", False
        return "association aborted or timed out during negotiation", True

    @staticmethod
    def _close(assoc, clean: bool) -> None:
        if assoc.is_established:
            if clean:
                assoc.release()
            else:
                assoc.abort()

    # ------------------------------------------------------------------ C-FIND

    def _find(self, what: str, query: Dataset) -> list[Dataset]:
        """Every identifier a C-FIND returns (Study Root); PacsError unless it ends in Success."""
        assoc = self._associate(what, [build_context(FIND)])
        found: list[Dataset] = []
        final = None
        try:
            for status, identifier in assoc.send_c_find(query, FIND):
                if "Status" not in status:
                    break  # aborted, or no response within the DIMSE timeout
                if status.Status in PENDING:
                    if identifier is not None:
                        found.append(identifier)
                    continue
                final = int(status.Status)
                break
        except ValueError:  # pynetdicom: the Find context was not accepted, or the query would not encode
            raise self._error(what, "C-FIND not accepted by the server (presentation context rejected)") from None
        except RuntimeError:  # pynetdicom: the association ended before the request went out
            raise self._error(what, "association aborted or timed out") from None
        finally:
            self._close(assoc, clean=final is not None)
        if final is None:
            raise self._error(what, "association aborted or timed out")
        if final != SUCCESS:
            raise self._error(what, f"status 0x{final:04X}")
        return found

    def studies(self) -> list[Study]:
        """The studies matching ``pacs.modalities``, the date window and ``pacs.description``, each with
        the instance count the PACS reports (-1 when it does not)."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.ModalitiesInStudy = list(self.params.modalities) if self.params.modalities else ""
        query.StudyDate = self.params.date_range()
        query.StudyDescription = self.params.description
        query.NumberOfStudyRelatedInstances = ""
        found = self._find("C-FIND studies", query)
        return [Study(str(ds.get("StudyInstanceUID", "")), _int(ds.get("NumberOfStudyRelatedInstances")))
                for ds in found]

    def series(self, study: str) -> list[Series]:
        """The series of one study (only those with ``pacs.body_part`` when it is set)."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = ""
        query.Modality = ""
        query.NumberOfSeriesRelatedInstances = ""
        if self.params.body_part:
            query.BodyPartExamined = self.params.body_part
        found = self._find("C-FIND series", query)
        return [Series(str(ds.get("SeriesInstanceUID", "")), str(ds.get("Modality", "")),
                       _int(ds.get("NumberOfSeriesRelatedInstances"))) for ds in found]

    def instances(self, study: str, series: str) -> list[str]:
        """The SOPInstanceUIDs of one series."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        query.SOPInstanceUID = ""
        return [str(ds.get("SOPInstanceUID", "")) for ds in self._find("C-FIND instances", query)]

    def has_instance(self, study: str, sop_uid: str) -> bool:
        """Whether the PACS holds this instance in this study (an IMAGE level C-FIND without the series:
        a relational query, which Orthanc and most archives answer)."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = sop_uid
        found = self._find("C-FIND instance", query)
        return any(str(ds.get("SOPInstanceUID", "")) == sop_uid for ds in found)

    # ------------------------------------------------------------------ C-GET

    def retrieve(self, study: str, series: str) -> Iterator[Dataset]:
        """The series' instances (C-GET at SERIES level), as they arrive, in the transfer syntax the PACS
        holds them in (``file_meta`` set from the presentation context). PacsError after the last of them
        when the C-GET does not end in Success."""
        what = "C-GET series"
        arrived: deque = deque()

        def on_store(event):
            try:
                ds = event.dataset
                ds.file_meta = event.file_meta
            except Exception:  # noqa: BLE001 - an undecodable instance fails its sub-operation
                return 0xC210  # cannot understand; the final status counts it as failed
            arrived.append(ds)
            return SUCCESS

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        roles = [build_role(sop, scp_role=True) for sop in (*IMAGE_STORAGE, *DOCUMENT_STORAGE)]
        assoc = self._associate(what, GET_CONTEXTS, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)])
        final = None
        try:
            try:
                for status, _ in assoc.send_c_get(query, GET):
                    # the C-STORE sub-operations are handled inside send_c_get; hand on what came so far
                    while arrived:
                        yield arrived.popleft()
                    if "Status" not in status:
                        break  # aborted, or no response within the DIMSE timeout
                    if status.Status in PENDING:
                        continue
                    final = status
                    break
            except ValueError:  # pynetdicom: the Get context was not accepted
                raise self._error(what, "C-GET not accepted by the server (presentation context rejected)") from None
            except RuntimeError:  # pynetdicom: the association ended before the request went out
                raise self._error(what, "association aborted or timed out") from None
            while arrived:
                yield arrived.popleft()
        finally:  # also when the consumer stops early: abort a C-GET still under way
            self._close(assoc, clean=final is not None)
        if final is None:
            raise self._error(what, "association aborted or timed out")
        if final.Status != SUCCESS:
            failed = _int(final.get("NumberOfFailedSuboperations"), 0)
            done = _int(final.get("NumberOfCompletedSuboperations"), 0)
            warned = _int(final.get("NumberOfWarningSuboperations"), 0)
            counts = f" ({failed} of {failed + done + warned} sub-operations failed)" if failed else ""
            raise self._error(what, f"status 0x{final.Status:04X}{counts}")

    # ------------------------------------------------------------------ C-STORE

    def store(self, datasets: list) -> None:
        """C-STORE every dataset, in the transfer syntax of its ``file_meta`` (explicit VR little endian
        when it has none); PacsError on the first status other than Success."""
        what = "C-STORE"
        pending = [self._with_file_meta(ds) for ds in datasets]
        while pending:
            contexts: dict[tuple, object] = {}
            batch = []
            for ds in pending:  # one association for as many datasets as 128 contexts allow
                key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                if key not in contexts:
                    if len(contexts) == MAX_CONTEXTS:
                        break
                    ts = uids.UID(key[1])
                    offered = [ts] if ts.is_compressed else [ts, *(t for t in UNCOMPRESSED_SYNTAXES if t != ts)]
                    contexts[key] = build_context(key[0], offered)
                batch.append(ds)
            pending = pending[len(batch):]
            self._store_batch(what, list(contexts.values()), batch)

    def _with_file_meta(self, ds):
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise self._error("C-STORE", "a dataset has no SOPClassUID or SOPInstanceUID")
        if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
            return ds
        ds = copy.copy(ds)  # the caller's dataset stays as it was
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
        ds.file_meta = meta
        return ds

    def _store_batch(self, what: str, contexts: list, batch: list) -> None:
        assoc = self._associate(what, contexts)
        clean = False
        try:
            for ds in batch:
                try:
                    status = assoc.send_c_store(ds)
                except ValueError:  # pynetdicom: no accepted context for this SOP class/transfer syntax
                    raise self._error(what, "the server accepted no presentation context for a dataset's "
                                            "SOP class and transfer syntax") from None
                except AttributeError:  # pynetdicom: file meta inconsistent with the dataset's encoding
                    raise self._error(what, "a dataset's file meta does not match its encoding") from None
                except RuntimeError:  # pynetdicom: the association ended before the request went out
                    raise self._error(what, "association aborted or timed out") from None
                if "Status" not in status:
                    raise self._error(what, "association aborted or timed out")
                if status.Status != SUCCESS:
                    raise self._error(what, f"status 0x{status.Status:04X}")
            clean = True
        finally:
            self._close(assoc, clean=clean)

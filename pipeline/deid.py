"""De-identification and pseudonymisation of DICOM instances.

The DICOM PS3.15 Basic Application Level Confidentiality Profile, applied with a maintained library
(dicognito) plus the profile's removals that dicognito leaves to the caller:

* dicognito replaces every person name, identifier, address, institution and UID with consistent
  pseudo-values and shifts every date/time. It is seeded **per patient** with a keyed hash of the
  patient identity, so UIDs map the same way in every file of a patient (series/study structure
  survives, also across parallel workers and incremental runs) and dates shift by one offset per
  patient (intervals between a patient's studies are kept).
* free-text attributes that may carry PHI (descriptions, comments, protocol names, ...), private
  tags, overlays and curves are removed; the birth date is emptied.
* Patient ID and Patient Name become the pseudonymous ``patient_key`` (an HMAC of the issuer and
  patient ID under the site's secret key), which later stages use to split by patient.

Options recorded in DeidentificationMethodCodeSequence (PS3.16 CID 7050): Basic Profile (113100),
Retain Longitudinal Temporal Information with Modified Dates (113107), Retain Patient
Characteristics (113108: sex, age, size, weight stay).

The secret key never lives in the repository: ``MEDTL_PSEUDONYM_KEY`` (the key itself),
``MEDTL_PSEUDONYM_KEY_FILE`` (a path), ``./.medtl/pseudonym.key`` or ``~/.config/medtl/pseudonym.key``.
Only input marked as the synthetic demo cohort may fall back to the public throw-away key
:data:`DEMO_KEY`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pydicom
from dicognito.anonymizer import Anonymizer
from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: Public, documented throw-away key. Accepted only for the synthetic demo cohort.
DEMO_KEY = b"medtl-demo-key--synthetic-data-only--not-a-secret"
ENV_KEY = "MEDTL_PSEUDONYM_KEY"
ENV_KEY_FILE = "MEDTL_PSEUDONYM_KEY_FILE"
LOCAL_KEY_FILE = Path(".medtl/pseudonym.key")
USER_KEY_FILE = Path("~/.config/medtl/pseudonym.key")

#: Bump when the de-identified output of the same input would change; invalidates ingest caches.
DEID_VERSION = "1"

# PS3.15 Table E.1-1 attributes (action X/Z/D in the Basic Profile) that dicognito does not replace
# itself: free text and identity-bearing attributes. Removed outright.
REMOVE_KEYWORDS: tuple[str, ...] = (
    "AccessionNumber",  # re-added empty below (type 2 in most IODs)
    "AcquisitionComments",
    "AdditionalPatientHistory",
    "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "BranchOfService",
    "ContentSequence",
    "ContributionDescription",
    "CurrentPatientLocation",
    "CustodialOrganizationSequence",
    "DerivationDescription",
    "DeviceSerialNumber",
    "DischargeDiagnosisDescription",
    "EthnicGroup",
    "FrameComments",
    "IdentifyingComments",
    "ImageComments",
    "ImagePresentationComments",
    "ImagingServiceRequestComments",
    "InstitutionAddress",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "IssuerOfPatientID",
    "MedicalAlerts",
    "MedicalRecordLocator",
    "MilitaryRank",
    "ModifiedAttributesSequence",
    "NameOfPhysiciansReadingStudy",
    "Occupation",
    "OperatorsName",
    "OriginalAttributesSequence",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAddress",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientComments",
    "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName",
    "PatientReligiousPreference",
    "PatientState",
    "PatientTelecomInformation",
    "PatientTelephoneNumbers",
    "PerformedProcedureStepDescription",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "ProtocolName",
    "ReasonForStudy",
    "ReasonForTheRequestedProcedure",
    "ReferencedPatientPhotoSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence",
    "RequestAttributesSequence",
    "RequestedProcedureDescription",
    "RequestingPhysician",
    "RequestingService",
    "ResultsComments",
    "ScheduledProcedureStepDescription",
    "SeriesDescription",
    "ServiceEpisodeDescription",
    "SpecialNeeds",
    "StationName",
    "StudyComments",
    "StudyDescription",
    "StudyID",
    "TextComments",
    "TextString",
    "TopicAuthor",
    "TopicKeywords",
    "TopicSubject",
    "TopicTitle",
    "VisitComments",
)
REMOVE_TAGS = tuple(tag_for_keyword(k) for k in REMOVE_KEYWORDS)
# Type 2 attributes most image IODs require to be present (empty is fine).
EMPTY_KEYWORDS = ("AccessionNumber", "PatientBirthDate", "ReferringPhysicianName", "StudyID")


class KeyMissingError(RuntimeError):
    """No pseudonymisation key is configured for real (non-demo) data."""


def key_help() -> str:
    return (
        f"set {ENV_KEY} to a long random secret, or {ENV_KEY_FILE} to a file holding one, or create "
        f"{LOCAL_KEY_FILE} (run `medtl keygen`). Keep it out of git and back it up: the same key must "
        "be used for every run on a dataset, or patients get new pseudonyms."
    )


def resolve_key(*, synthetic: bool) -> tuple[bytes, str]:
    """Return ``(key, source)`` for pseudonymisation.

    Args:
        synthetic: the input is the synthetic demo cohort (the only case allowed to use DEMO_KEY).

    Raises:
        KeyMissingError: no key is configured and the input is not synthetic.
    """
    if os.environ.get(ENV_KEY):
        return os.environ[ENV_KEY].encode(), f"${ENV_KEY}"
    candidates = []
    if os.environ.get(ENV_KEY_FILE):
        candidates.append(Path(os.environ[ENV_KEY_FILE]))
    candidates += [LOCAL_KEY_FILE, USER_KEY_FILE.expanduser()]
    for path in candidates:
        if path.is_file():
            key = path.read_bytes().strip()
            if len(key) < 16:
                raise KeyMissingError(f"{path}: pseudonymisation key is shorter than 16 bytes; {key_help()}")
            return key, str(path)
    if os.environ.get(ENV_KEY_FILE):
        raise KeyMissingError(f"{os.environ[ENV_KEY_FILE]} (from ${ENV_KEY_FILE}) does not exist; {key_help()}")
    if synthetic:
        log.warning("using the public demo pseudonymisation key: acceptable for the synthetic cohort only")
        return DEMO_KEY, "demo key (synthetic cohort)"
    raise KeyMissingError(f"no pseudonymisation key configured for real data: {key_help()}")


def write_new_key(path: Path = LOCAL_KEY_FILE) -> Path:
    """Create a random key file readable by its owner only; refuses to overwrite one."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; remove it only if no data was pseudonymised with it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(48) + "\n")
    return path


_REMOVE_SET = frozenset(REMOVE_TAGS)


def _strip(ds: Dataset) -> None:
    """Remove private tags, curves, overlays and REMOVE_KEYWORDS, recursing into sequences.

    Works on the tags (``ds.keys()``) so that raw values are not decoded just to be looked at;
    dicognito's single walk afterwards decodes what remains.
    """
    for tag in list(ds.keys()):
        group = tag.group
        if tag.is_private or tag in _REMOVE_SET or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            del ds[tag]  # private tags, the profile's removals, curves and overlays (may hold text)
            continue
        raw = ds.get_item(tag)
        vr = raw.VR if raw is not None and raw.VR else (dictionary_VR(tag) if tag in DicomDictionary else "")
        if vr == "SQ":
            for item in ds[tag].value or []:
                _strip(item)


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed, deterministic pseudonyms and de-identification for one secret key."""

    key: bytes

    def token(self, kind: str, value: str) -> str:
        """HMAC-SHA256 of ``value`` in namespace ``kind``, hex (irreversible without the key)."""
        return hmac.new(self.key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()

    @property
    def fingerprint(self) -> str:
        """Identifies the key (not reversible); caches made under another key are discarded."""
        return self.token("fingerprint", DEID_VERSION)[:16]

    def patient_key(self, patient_id: str, issuer: str = "") -> str:
        """Pseudonymous patient key, e.g. ``P-5KQ2M7XJ3LRA``: same patient → same key, for this key."""
        digest = hmac.new(self.key, f"patient\x00{issuer}\x00{patient_id}".encode(), hashlib.sha256).digest()
        return "P-" + base64.b32encode(digest[:10]).decode()[:12]

    def site_key(self, institution: str, manufacturer: str = "") -> str:
        """Pseudonymous site key (institution names are removed from the data)."""
        return "site-" + self.token("site", f"{institution}\x00{manufacturer}")[:8]

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one instance per run, bounded
    def _anonymizer(self, patient_key: str) -> Anonymizer:
        return Anonymizer(seed=self.token("dicognito", patient_key))

    def deidentify(self, ds: Dataset, patient_key: str) -> None:
        """De-identify ``ds`` in place (file meta included). See the module docstring for what is done."""
        _strip(ds)
        self._anonymizer(patient_key).anonymize(ds)
        for keyword in EMPTY_KEYWORDS:
            setattr(ds, keyword, "")
        ds.PatientID = patient_key
        ds.PatientName = patient_key
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = f"medtl v{DEID_VERSION} PS3.15 Basic Profile, dicognito"  # LO: <= 64 chars
        codes = []
        for value, meaning in (
            ("113100", "Basic Application Confidentiality Profile"),
            ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
            ("113108", "Retain Patient Characteristics Option"),
        ):
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = pydicom.Sequence(codes)
        if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

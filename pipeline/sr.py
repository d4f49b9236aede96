"""Results as DICOM: one Structured Report per study (highdicom, TID 1500 Measurement Report).

The report goes back to the patient's record, so it carries the ORIGINAL identifiers: highdicom copies
the patient and study attributes from the evidence (the original headers of the scored instances) and
references those instances by their original UIDs. It is PHI and is written on site only
(``medtl predict``'s local directory), never into pseudonymised or DVC outputs.

Content (one measurement group, "medtl study classification"):

- qualitative evaluation "<positive class> (model decision)": Present / Absent at the frozen threshold;
- measurements: the study score (DCM 122157 Probability, of the positive class, aggregated over the
  study's images as ``predict.aggregation`` says) and the operating threshold (same unit);
- algorithm identification: the model's name and its registry version (or its SHA-256 prefix);
- the source images of the group: every scored instance.

The series description says plainly that it is a model output not for diagnostic use unless validated
locally; the report is marked incomplete-verified-false (preliminary): a reader must confirm it.
"""

from __future__ import annotations

import logging

from collections.abc import Sequence

from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

CODING_SCHEME = "99MEDTL"  # private coding scheme of medtl's own concepts
# highdicom logs at INFO which dataset it copies patient and study attributes from, by its original
# SOP Instance UID (PHI-adjacent: it identifies the patient's study): never into medtl's logs
logging.getLogger("highdicom").setLevel(logging.WARNING)

DISCLAIMER = "medtl model output - not for diagnostic use unless validated"  # LO: at most 64 characters
SERIES_NUMBER = 9901


def _concept(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning[:64])


def study_report(evidence: Sequence[Dataset], *, score: float, threshold: float, positive_class: str,
                 model_name: str, model_version: str, model_sha256: str, aggregation: str) -> Dataset:
    """The Comprehensive 3D SR of one study's result.

    Args:
        evidence: original headers (``stop_before_pixels``) of the scored instances of ONE study.
        score: the study score (positive-class probability, aggregated over its images).
        threshold: the frozen operating threshold the decision was taken at.
        positive_class: the finding's name (the model's positive class).
        model_name, model_version, model_sha256: what produced it (the version: registry version or hash).
        aggregation: how the study score came from the images' (recorded with the score).

    Returns:
        A pydicom dataset (``.save_as`` writes it); its UIDs derive from the model and the study, so
        predicting the same study with the same model gives the same report UIDs.
    """
    from highdicom.sr import (AlgorithmIdentification, CodedConcept, Comprehensive3DSR,
                              DeviceObserverIdentifyingAttributes, Measurement, MeasurementReport,
                              MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                              QualitativeEvaluation, SourceImageForMeasurementGroup, TrackingIdentifier)

    studies = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(studies) != 1:
        raise ValueError(f"a study report needs the instances of one study, got {len(studies)} studies")
    study_uid = studies.pop()
    seed = [model_sha256, study_uid]
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[*seed, "device"]), name=model_name[:64], manufacturer_name="medtl",
            model_name=model_name[:64]))
    algorithm = AlgorithmIdentification(name=model_name[:64], version=model_version[:64])
    unit = codes.UCUM.NoUnits
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(entropy_srcs=[*seed, "group"]),
                                               identifier="medtl study classification"),
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                       for ds in sorted(evidence, key=lambda d: str(d.SOPInstanceUID))],
        measurements=[
            Measurement(name=codes.DCM.Probability, value=float(score), unit=unit, algorithm_id=algorithm,
                        derivation=_concept("study-" + aggregation, f"{aggregation} over the study's images")),
            Measurement(name=_concept("threshold", "Operating threshold (frozen, chosen on validation)"),
                        value=float(threshold), unit=unit)],
        qualitative_evaluations=[QualitativeEvaluation(
            name=_concept("finding", f"{positive_class} (model decision)"),
            value=codes.SCT.Present if score >= threshold else codes.SCT.Absent)],
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging procedure"),
        imaging_measurements=[group],
    )
    sr = Comprehensive3DSR(
        evidence=list(evidence), content=report, series_instance_uid=generate_uid(entropy_srcs=[*seed, "series"]),
        series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(entropy_srcs=[*seed, "sr"]), instance_number=1,
        manufacturer="medtl", is_complete=True, is_final=False, is_verified=False,
        series_description=DISCLAIMER)
    scheme = Dataset()  # declares the private coding scheme of medtl's own concepts (PS3.3 C.12.1.1.8)
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = "medtl concepts"
    scheme.CodingSchemeResponsibleOrganization = "medtl"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr

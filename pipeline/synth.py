"""Synth: the embedded synthetic cohort, written like a hospital PACS export.

``medtl synth --out DIR --patients N --seed S`` writes::

    DIR/DICOM/<SITE>/<PATIENT>/<STUDY>/<SERIES>/IMnnnnn   DICOM files without extension, e.g.
                                                         DICOM/SITE_B/PAT00042/ST001/SE002/IM00007
    DIR/labels.csv                                       study_instance_uid,label (lesion / normal)
    DIR/lesions.csv                                      where each lesion is, per image instance (below)
    DIR/medtl_synth.json                                 marker: {"synthetic": true, "seed", "patients", "files", ...}

Folder names are opaque: they hold no PHI and nothing that gives away a label. The label of a study
lives in ``labels.csv`` only; nothing in file names or headers depends on it, only the pixels do.

**Cohort.** Each patient belongs to one of four sites (vendors), which differ as real ones do:
manufacturer and model, matrix size, bit depth, pixel representation and rescale, photometric
interpretation, window presets, noise level and transfer syntax (see :data:`SITES`). A patient has
1-3 studies, months apart, each either a chest radiograph (DX, or CR at site B: PA and often a
lateral view, one image per series) or a chest CT (16-24 single-frame axial slices; a lung-kernel
and/or a soft-tissue-kernel reconstruction of the same volume). A study is labelled ``lesion``
(~40 %) or ``normal``; a lesion study shows one lung nodule in every image series of the study,
with per-study radius, contrast, noise and blur, so some lesions are faint or small.

**Image content.** The anatomy is drawn to be plausible at a glance, and the task to be honest:
difficulty comes from realistic variation only (small or faint nodules, overlap with ribs,
vessels and the heart, site noise and resolution), never from label noise, and nothing but the
nodule differs between the classes (site, vendor, modality, file names and every header field are
drawn without looking at the label). Both modalities share a branching pulmonary vessel tree
(:func:`_vessel_tree`: forks from each hilum, thinner per generation, rendered with its true volume
so thin vessels show with partial-volume contrast). CT: an anti-aliased body outline flattened at
the back, soft tissue with fine grain, lungs with a gravity gradient and a fine correlated
parenchymal texture, heart, aorta, spine, sternum and oblique ribs. Radiographs (PA and lateral):
projected tissue and lung thickness, posterior and anterior ribs, clavicles, spine, arms, the
projected vessel tree and a correlated interstitial texture, vendor-like unsharp masking, blur and
quantum noise. Nodules: CT radius 5-17 mm (mostly >= 6.5 mm, i.e. >= 3 px when the field of view is
shown at 160 px), solid (-40..+60 HU) or, one in five, part-solid / ground glass (-550..-250 HU);
radiographs radius 6-18 mm (mostly >= 8 mm) with a density of 0.35-1 times soft tissue, anywhere in
the lung fields (over ribs and vessels too).

**Where the CT lesion is.** The CT lesion is a roughly spherical soft-tissue nodule (-100..+60 HU,
radius 5-17 mm) inside a lung. Its centre lies within ±0.1·r of the midpoint of the series' slice
range by position (r = nodule radius), which is well inside the central 20 % of the slice range,
so the middle slice by position (for an even slice count, both middle slices) cuts through the
nodule and a maximum-intensity projection over the slab shows it.

**Lesion ground truth** (``DIR/lesions.csv``; written atomically, deterministic, rewritten to
cover all patients by every run and by :func:`add`): columns
``study_instance_uid,series_instance_uid,sop_instance_uid,row,col,radius_px,radius_mm``, one row per
written image instance (CT slice, PA or lateral radiograph) in which the nodule is visible, with
the UIDs of that file; ``row``/``col`` are the nodule centre in the stored pixel grid (0-based,
row along Rows, col along Columns, 3 decimals), ``radius_px`` its in-plane radius in pixels (CT: the
sphere's cross-section at the slice's centre plane, so slices more than a radius away are not
listed; radiographs: the projected radius, before lobulation) and ``radius_mm`` = ``radius_px``
times the file's PixelSpacing (square pixels; for DX at the patient plane, i.e. ImagerPixelSpacing
divided by the magnification). Only distinct SOP instances are listed: a slice left out by the
``missing_slice`` defect has no row, and ``duplicate`` / ``truncated`` copies (which repeat the SOP
Instance UID of a listed file) are not listed again; dose SRs, dose screens and junk never are. No
training or evaluation code reads this file; it exists so that localisation can be measured.

**Fake PHI.** Headers carry realistic, deterministic fake PHI: names, MRN, birth date, address,
phone, other names, accession number, dates and times, institution, physicians, operators,
station, device serial number, a study description containing the patient's name, and a private
block (group 0019) in which the vendor copies the patient's name and ID. Basic Text SR dose
reports carry PHI in their text.

**Defects** (``defects=True``): within every block of 40 consecutive patients (indices
``[40k, 40k + 40)``), six different patients, chosen from the seed, get one defect each, so any
cohort of 40 or more patients has at least one of every kind (a rate of 2.5 % each):

* ``junk``: a non-DICOM file (``Thumbs.db`` or ``README.TXT``) in the patient folder;
* ``truncated``: a copy of an instance cut in the middle of its pixel data, under the next free IM
  name of its series folder (always at a site that stores pixels uncompressed, so the cut lands in
  plain pixel bytes);
* ``missing_slice``: the first CT series of the patient lacks one slice from its middle third;
* ``duplicate``: a byte-identical copy of an instance under the next free IM name;
* ``sr``: a Basic Text SR dose report (own series, PHI in its text) in a CT study;
* ``burned_in``: a Secondary Capture "dose screen" (own series, BurnedInAnnotation YES, text-like
  pixels) in a CT study.

Patients that get a CT-only defect have a CT first study. Dose SRs and dose screens also occur
naturally in CT studies at some sites (:data:`SITES`). With ``defects=False`` none of these are
written and every other file is byte-identical.

**Determinism and increments.** A patient's content depends only on ``(seed, patient index)``
(NumPy generators seeded with ``[seed, stream, patient, ...]``, UIDs hashed from the same indices,
fixed dates and file-meta implementation values), so ``run(N + K)`` and ``run(N)`` followed by
``add(K)`` give byte-identical trees. Files are written to a temporary name and renamed, the marker
last; a rerun writes only the files that are missing and leaves existing ones untouched.

**The marker's file list** (``files``: relpath under DIR -> :func:`pipeline.io_utils.content_hash`)
names every file synth wrote (DICOM tree with defect files and junk, ``labels.csv``,
``lesions.csv``; not the marker itself), so that the public demo key is used for exactly these
files and never for a real file put into the folder (:func:`pipeline.keys.synthetic_files`). The ids
are those of the bytes synth rendered, never read back from the tree; existing files keep their
listed ids and are not read. While a run writes, the marker is saved every :data:`CHECKPOINT_FILES`
files with the list so far, so an interrupted run, when resumed, renders only the patients written
since (to list them) and writes only what is missing. A marker from before the list gets it on the
next run (every patient rendered once, nothing rewritten).
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from pipeline.io_utils import atomic_write_bytes, content_hash, remove_stale_temps
from pipeline.params import ParamsError, param

log = logging.getLogger(__name__)
_OPENJPEG_LOG = logging.getLogger("openjpeg")

MARKER_NAME = "medtl_synth.json"
MARKER_FILES = "files"  # the marker's field: relpath (under DIR) -> content id of every file synth wrote
LABELS_NAME = "labels.csv"
LESIONS_NAME = "lesions.csv"
LESIONS_HEADER = "study_instance_uid,series_instance_uid,sop_instance_uid,row,col,radius_px,radius_mm"
DICOM_DIR = "DICOM"
GENERATOR_VERSION = 2
LESION, NORMAL = "lesion", "normal"

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

DEFECT_BLOCK = 40  # every block of this many consecutive patients holds one patient per defect kind
DEFECT_KINDS = ("junk", "truncated", "missing_slice", "duplicate", "sr", "burned_in")
_CT_DEFECTS = frozenset({"missing_slice", "sr", "burned_in"})

# RNG stream ids: every draw comes from np.random.default_rng([seed, stream, ...indices]).
_S_SITE, _S_DEFECT, _S_VARIETY, _S_PATIENT, _S_EXTRAS, _S_TS, _S_PIXELS, _S_NAMES, _S_LESION = range(1, 10)


# --------------------------------------------------------------------------------------------------
# public API


@dataclass(frozen=True)
class SynthParams:
    """params.yaml ``synth`` section."""

    patients: int = param(100, min=1)
    seed: int = param(0, min=0)
    defects: bool = param(True)  # sprinkle realistic junk/defects (module docstring)

    def __post_init__(self) -> None:
        if isinstance(self.patients, bool) or not isinstance(self.patients, int) or self.patients < 1:
            raise ParamsError(f"synth.patients must be an integer >= 1, got {self.patients!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ParamsError(f"synth.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.defects, bool):
            raise ParamsError(f"synth.defects must be true or false, got {self.defects!r}")


@dataclass
class SynthSummary:
    """The cohort in ``out_dir`` after the call (all patients, not only the ones just written)."""

    patients: int
    studies: int
    series: int
    instances: int  # distinct SOP instances (defect copies and junk not counted)
    files: int  # everything under DIR/DICOM: instances, defect copies, junk
    by_modality: dict[str, int]  # instances per Modality
    by_transfer_syntax: dict[str, int]  # instances per transfer syntax (UID keyword)
    labels: dict[str, int]  # label -> number of studies


def run(params: SynthParams, out_dir: Path) -> SynthSummary:
    """Write patients ``[0, params.patients)`` into ``out_dir`` (created if needed).

    If ``out_dir`` already holds a cohort written with the same seed, patients that already exist
    are left untouched and only missing files are written; ``labels.csv`` and the marker are
    rewritten to cover all patients in the directory (a cohort never shrinks; an interrupted run is
    completed). A cohort written with another seed, defects setting or generator version, or a
    ``DICOM`` folder without a marker, is refused (ValueError): write to an empty directory instead.
    """
    out_dir = Path(out_dir)
    marker = _read_marker(out_dir)
    if marker is None:
        dicom_root = out_dir / DICOM_DIR
        if dicom_root.is_dir() and any(dicom_root.iterdir()):
            raise ValueError(
                f"{out_dir} has a {DICOM_DIR} folder but no {MARKER_NAME}: not a synthetic cohort written by "
                "this version; choose an empty directory"
            )
        return _write_cohort(out_dir, params.seed, params.defects, params.patients, 0, {})
    for key, want in (("seed", params.seed), ("defects", params.defects), ("generator_version", GENERATOR_VERSION)):
        have = marker.get(key, True if key == "defects" else None)
        if have != want:
            raise ValueError(
                f"{out_dir} holds a synthetic cohort with {key}={have!r}, not {want!r}; "
                "remove it or choose another directory"
            )
    existing = int(marker.get("patients", 0))
    # an interrupted run is completed to the size it was writing (its files are partly there)
    target = max(existing, int(marker.get("writing_patients", 0)))
    if target > params.patients:
        log.warning("synth: the cohort already has %d patients (more than the %d asked for); keeping them all",
                    target, params.patients)
    return _write_cohort(out_dir, params.seed, params.defects, max(target, params.patients), existing,
                         _marker_files(marker))


def add(out_dir: Path, k: int) -> SynthSummary:
    """Append ``k`` new patients (a week's new arrivals) to the cohort in ``out_dir``.

    Patients ``[n, n + k)`` are written with the cohort's seed (``n`` from the marker); existing
    files stay byte-for-byte unchanged, ``labels.csv`` keeps its rows and gets the new studies
    appended, and the marker is rewritten.
    """
    out_dir = Path(out_dir)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"add: k must be an integer >= 0, got {k!r}")
    marker = _read_marker(out_dir)
    if marker is None:
        raise FileNotFoundError(f"{out_dir / MARKER_NAME} not found: run `medtl synth --out {out_dir}` first")
    n = max(int(marker.get("patients", 0)), int(marker.get("writing_patients", 0)))
    params = SynthParams(patients=n + k, seed=int(marker["seed"]), defects=bool(marker.get("defects", True)))
    return run(params, out_dir)


# --------------------------------------------------------------------------------------------------
# sites


@dataclass(frozen=True)
class Site:
    code: str
    folder: str
    institution: str
    institution_address: str
    issuer: str  # IssuerOfPatientID
    station_prefix: str
    manufacturer: str
    proj_model: str
    ct_model: str
    software: str
    private_creator: str
    implementation_version: str  # file meta ImplementationVersionName (<= 16 chars)
    source_ae: str
    name_style: str  # how the study description spells the name: "caret" or "comma"
    # projection radiography
    proj_modality: str  # DX or CR
    proj_rows: int
    proj_cols: int
    proj_spacing: float  # ImagerPixelSpacing, mm
    proj_magnification: float  # PixelSpacing = ImagerPixelSpacing / magnification
    proj_bits: int  # BitsStored (BitsAllocated 16, unsigned)
    proj_window: bool
    proj_noise: float
    # CT
    ct_share: float  # share of studies that are CT
    ct_matrix: int
    ct_fov: float
    ct_spacing: float  # SliceThickness == SpacingBetweenSlices, mm
    ct_pixel_rep: int
    ct_bits_stored: int
    ct_slope: float
    ct_intercept: float
    ct_tilt: bool  # gantry tilt: slightly oblique ImageOrientationPatient
    ct_recon_circle: bool  # pixels outside the reconstruction circle at the lowest stored value
    ct_table: bool
    ct_head_first_numbering: bool  # InstanceNumber 1 = most superior slice
    ct_noise: tuple[float, float]  # HU noise of the lung / soft-tissue kernel
    ct_kernels: tuple[str, str]  # ConvolutionKernel of the lung / soft-tissue reconstruction
    shuffled_names: bool  # IM file names do not follow slice position
    # transfer syntax: per series, mostly ts_main
    ts_main: UID
    ts_alt: UID
    ts_alt_rate: float
    # natural rates (per CT study) of dose SR / dose screen, written only with defects=True
    sr_rate: float
    sc_rate: float

    @property
    def photometric(self) -> str:
        return "MONOCHROME1" if self.proj_modality == "CR" else "MONOCHROME2"

    @property
    def ct_storage(self) -> str:
        sign = "signed" if self.ct_pixel_rep else "unsigned"
        return f"{sign} {self.ct_bits_stored}-bit, slope {self.ct_slope:g}, intercept {self.ct_intercept:g}"


SITES: tuple[Site, ...] = (
    Site(
        code="A", folder="SITE_A", institution="NORTHGATE GENERAL HOSPITAL",
        institution_address="1200 Harbor Road, Northgate, NY 10950", issuer="NGH-MRN", station_prefix="NGHRAD",
        manufacturer="ACME Medical Systems", proj_model="Radius DR 500", ct_model="Helix 64",
        software="AMS 4.2.1", private_creator="ACME 1.0", implementation_version="ACME_PACS_42",
        source_ae="NGH_PACS", name_style="caret",
        proj_modality="DX", proj_rows=256, proj_cols=256, proj_spacing=1.68, proj_magnification=1.1,
        proj_bits=12, proj_window=True, proj_noise=0.012,
        ct_share=0.45, ct_matrix=64, ct_fov=350.0, ct_spacing=2.5, ct_pixel_rep=1, ct_bits_stored=16,
        ct_slope=1.0, ct_intercept=0.0, ct_tilt=False, ct_recon_circle=False, ct_table=True,
        ct_head_first_numbering=True, ct_noise=(30.0, 10.0), ct_kernels=("LUNG", "STANDARD"),
        shuffled_names=False, ts_main=ExplicitVRLittleEndian, ts_alt=DeflatedExplicitVRLittleEndian,
        ts_alt_rate=0.10, sr_rate=0.30, sc_rate=0.0,
    ),
    Site(
        code="B", folder="SITE_B", institution="RIVERTON VALLEY MEDICAL CENTER",
        institution_address="45 Mill Street, Riverton, NJ 07410", issuer="RVMC", station_prefix="RVMCIMG",
        manufacturer="Borealis Imaging", proj_model="Aurora CR Reader 8", ct_model="Aurora CT 16",
        software="BI-CT 2.9", private_creator="BOREALIS PRIVATE", implementation_version="BOREALIS_2_9",
        source_ae="RVMC_ARCHIVE", name_style="comma",
        proj_modality="CR", proj_rows=240, proj_cols=288, proj_spacing=1.5, proj_magnification=1.0,
        proj_bits=10, proj_window=False, proj_noise=0.022,
        ct_share=0.40, ct_matrix=72, ct_fov=380.0, ct_spacing=5.0, ct_pixel_rep=0, ct_bits_stored=12,
        ct_slope=1.0, ct_intercept=-1024.0, ct_tilt=False, ct_recon_circle=True, ct_table=False,
        ct_head_first_numbering=False, ct_noise=(45.0, 15.0), ct_kernels=("L70", "S30"),
        shuffled_names=False, ts_main=ImplicitVRLittleEndian, ts_alt=ExplicitVRLittleEndian,
        ts_alt_rate=0.15, sr_rate=0.0, sc_rate=0.35,
    ),
    Site(
        code="C", folder="SITE_C", institution="ST. ALDRIC UNIVERSITY HOSPITAL",
        institution_address="9 Cathedral Square, Ashford, CT 06278", issuer="SAUH-PID", station_prefix="SAUHMOD",
        manufacturer="Cygnus Healthcare", proj_model="Cygnus DRX-2", ct_model="Cygnus Vela 128",
        software="CV 31.0.4", private_creator="CYGNUS_IMG 2", implementation_version="CYGNUS_31",
        source_ae="SAUH_GW", name_style="caret",
        proj_modality="DX", proj_rows=288, proj_cols=240, proj_spacing=1.5, proj_magnification=1.0,
        proj_bits=14, proj_window=True, proj_noise=0.010,
        ct_share=0.50, ct_matrix=80, ct_fov=400.0, ct_spacing=2.5, ct_pixel_rep=1, ct_bits_stored=16,
        ct_slope=1.0, ct_intercept=-1024.0, ct_tilt=True, ct_recon_circle=False, ct_table=True,
        ct_head_first_numbering=True, ct_noise=(25.0, 8.0), ct_kernels=("FL51", "FC13"),
        shuffled_names=False, ts_main=JPEG2000Lossless, ts_alt=ExplicitVRLittleEndian,
        ts_alt_rate=0.10, sr_rate=0.25, sc_rate=0.20,
    ),
    Site(
        code="D", folder="SITE_D", institution="KINGSBRIDGE COMMUNITY HOSPITAL",
        institution_address="300 Orchard Lane, Kingsbridge, PA 19335", issuer="KCH", station_prefix="KCHXR",
        manufacturer="Deneb Systems", proj_model="DenebRad 3", ct_model="Deneb Altair 320",
        software="DS 7.1", private_creator="DENEB 1.0", implementation_version="DENEB_GW_7",
        source_ae="KCH_EXPORT", name_style="comma",
        proj_modality="DX", proj_rows=256, proj_cols=320, proj_spacing=1.35, proj_magnification=1.0,
        proj_bits=16, proj_window=False, proj_noise=0.016,
        ct_share=0.45, ct_matrix=64, ct_fov=340.0, ct_spacing=5.0, ct_pixel_rep=0, ct_bits_stored=16,
        ct_slope=0.5, ct_intercept=-1024.0, ct_tilt=False, ct_recon_circle=False, ct_table=False,
        ct_head_first_numbering=True, ct_noise=(35.0, 12.0), ct_kernels=("YL", "YC"),
        shuffled_names=True, ts_main=RLELossless, ts_alt=JPEG2000Lossless,
        ts_alt_rate=0.10, sr_rate=0.10, sc_rate=0.30,
    ),
)

# --------------------------------------------------------------------------------------------------
# fake people. Name parts are either <= 3 or >= 6 letters (a 4-5 letter part could turn up by chance
# inside compressed pixel bytes, which would trip PHI-leak searches downstream).

_FAMILY = (
    "ABERNATHY", "ACKERLEY", "ALVARADO", "BALDWIN", "BARRETT", "BECKFORD", "BRENNAN", "CALDWELL",
    "CASTILLO", "CHAUDHRY", "CORCORAN", "DELACROIX", "DONNELLY", "DUBROVSKY", "ESPINOZA", "FAIRBANKS",
    "FERREIRA", "FITZGERALD", "GALLAGHER", "GONZALEZ", "HALVORSEN", "HARRINGTON", "HOLLOWAY",
    "IBRAHIM", "JANKOWSKI", "JOHANSSON", "KAPOOR", "KOWALSKI", "LANCASTER", "LINDQVIST", "MACKENZIE",
    "MARCHETTI", "NAKAMURA", "NORDSTROM", "OKONKWO", "OYELARAN", "PETROVIC", "PRITCHARD", "QUINTERO",
    "RASMUSSEN", "ROSSITER", "SCHNEIDER", "SHEPHERD", "TANAKA", "THORNTON", "UNDERWOOD", "VASQUEZ",
    "WAKEFIELD", "WHITFIELD", "YAMAMOTO", "ZIMMERMAN", "LI", "NG", "WU", "HO",
)
_GIVEN_F = (
    "ADELAIDE", "BEATRIZ", "CATHERINE", "DOROTHEA", "ELEANOR", "FRANCESCA", "GWENDOLYN", "HARRIET",
    "IMOGEN", "JOSEPHINE", "KATARINA", "LEONORA", "MARGARET", "NATALIA", "OLIVIA", "PRIYANKA",
    "ROSALIND", "SIOBHAN", "THEODORA", "VALERIA", "WILHELMINA", "YOLANDA", "MEI", "ANA", "EVA",
)
_GIVEN_M = (
    "AUGUSTUS", "BARNABY", "CORNELIUS", "DESMOND", "EZEKIEL", "FREDERICK", "GREGORY", "HORATIO",
    "IGNATIUS", "JEREMIAH", "KENNETH", "LEOPOLD", "MALCOLM", "NATHANIEL", "OSWALD", "PATRICK",
    "RAFAEL", "SEBASTIAN", "THADDEUS", "VINCENT", "WALLACE", "ZACHARY", "WEI", "JIN", "TOM",
)
_STREETS = (
    "HAWTHORNE AVE", "WILLOWBROOK RD", "MAPLECREST DR", "FAIRVIEW ST", "LAKESHORE BLVD", "ORCHARD LN",
    "BIRCHWOOD CT", "RIVERSIDE DR", "SYCAMORE PL", "CHESTNUT HILL RD",
)
_CITIES = (
    ("RIVERTON", "NJ", "074"), ("MILLBROOK", "NY", "125"), ("ASHFORD", "CT", "062"),
    ("GLENWOOD", "PA", "193"), ("HARBORVIEW", "NY", "109"), ("KINGSBRIDGE", "PA", "194"),
    ("WESTLAKE", "NJ", "078"), ("CEDAR FALLS", "CT", "064"),
)


# --------------------------------------------------------------------------------------------------
# the plan: structure and parameters of each patient, without pixels (cheap)


@dataclass
class Lesion:
    """CT: ``x``/``y`` mm from the image centre (column/row direction), ``z`` mm from the slab
    midpoint along the slice normal. Projection: ``x`` (patient right-left), ``y`` (head-feet) and
    ``z`` (anterior-posterior) mm in the chest frame. ``strength``: HU of the nodule (CT) or its
    density relative to soft tissue (projection)."""

    x: float
    y: float
    z: float
    radius: float
    strength: float
    lobulation: float
    phase: float


@dataclass
class CTGeometry:
    """Anatomy of a chest CT slab, in mm in the image plane (x: column direction, y: row direction,
    origin at the image centre) and along the slice normal (z, origin at the slab midpoint)."""

    n_slices: int
    tilt_deg: float
    table_z: float  # slab midpoint along the normal (patient coordinates), mm
    table_y: float  # AP offset of the image centre from the isocentre, mm
    body: tuple[float, float, float, float]  # half width, half depth, centre y, subcutaneous fat thickness
    lungs: tuple[tuple[float, float, float, float], ...]  # (cx, cy, ax, ay): patient right, left
    mediastinum: tuple[float, float]  # centre x, half width
    heart: tuple[float, float, float, float, float, float]  # cx, cy, ax, ay, z centre, z half-extent
    aorta: tuple[float, float, float]  # descending aorta: x, y, radius
    spine: tuple[float, float, float]  # y of the vertebral body centre, its radius, disc phase (mm)
    ribs: tuple[float, float, float]  # angular offset (rad), angular spacing (rad), presence phase
    body_phase: float
    noise_factor: float

    @property
    def ring(self) -> float:
        """Normalised body radius of the rib ring (the inner chest wall is just inside it)."""
        a, b, _, fat = self.body
        return 1.0 - (fat + 8.0) / min(a, b)


@dataclass
class ProjGeometry:
    width: float  # torso width, mm
    depth: float  # AP depth, mm
    shift: tuple[float, float]
    shoulder_y: float
    lung: tuple[float, float, float, float]  # lateral offset, centre y, half width, half height
    lung_depth: float
    dome_offset: float  # right hemidiaphragm higher by this much (mm)
    heart: tuple[float, float, float, float]
    rib: tuple[float, float, float]  # first rib y, spacing, slope
    clavicle_y: float
    breasts: bool
    noise: float
    blur: float  # px
    tilt: float  # brightness gradient (heel effect)
    low: tuple[float, float, float, float]  # slow brightness variation: wave numbers and phases


@dataclass
class SeriesPlan:
    index: int
    number: int
    folder: str
    kind: str  # ct_lung, ct_soft, pa, lat, sr, sc
    uid: str
    description: str
    ts: UID
    n: int  # instances (slices in position order for CT)
    names: list[str]  # IM file name of each instance (CT: by position index)
    instance_numbers: list[int]
    omit: int | None = None  # CT: position index of the slice left out (missing-slice defect)


@dataclass
class StudyPlan:
    index: int
    folder: str
    uid: str
    for_uid: str
    accession: str
    study_id: str
    date: date
    time: str
    kind: str  # ct or proj
    modality: str
    label: str
    description: str
    referring: str
    operator: str
    age: str
    kvp: int
    ma: int
    series: list[SeriesPlan]
    ct: CTGeometry | None = None
    proj: ProjGeometry | None = None
    lesion: Lesion | None = None
    sr: bool = False  # a dose report SR series is part of the study (needs defects=True)
    sc: bool = False  # a dose-screen secondary capture series is part of the study (needs defects=True)


@dataclass
class Extra:
    kind: str  # junk, truncated, duplicate
    rel: str
    study: int = 0
    series: int = 0
    instance: int = 0
    name: str = ""  # junk: Thumbs.db / README.TXT


@dataclass
class PatientPlan:
    index: int
    site: Site
    folder: str
    family: str
    given: str
    sex: str
    birth: date
    mrn: str
    address: str
    phone: str
    other_names: str
    defect: str | None
    studies: list[StudyPlan] = field(default_factory=list)
    extras: list[Extra] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _site_index(seed: int, index: int) -> int:
    # one of each site in every aligned block of 4 patients, in a seeded order
    return int(_rng(seed, _S_SITE, index // 4).permutation(len(SITES))[index % 4])


@functools.lru_cache(maxsize=64)
def _defects_in_block(seed: int, block: int) -> dict[int, str]:
    """Position in the block -> defect kind: six different patients, chosen from the seed. The
    truncated copy goes to a patient of a site that stores pixels uncompressed, so the cut lands in
    plain pixel bytes (a reader sees a short Pixel Data element)."""
    order = [int(v) for v in _rng(seed, _S_DEFECT, block).permutation(DEFECT_BLOCK)]
    chosen: dict[int, str] = {}
    for kind in DEFECT_KINDS:
        for pos in order:
            if pos in chosen:
                continue
            site = SITES[_site_index(seed, block * DEFECT_BLOCK + pos)]
            if kind == "truncated" and site.ts_main.is_compressed:
                continue
            chosen[pos] = kind
            break
    return chosen


def _defect_of(seed: int, index: int) -> str | None:
    block, pos = divmod(index, DEFECT_BLOCK)
    return _defects_in_block(seed, block).get(pos)


def _deflate_guaranteed(seed: int, index: int) -> bool:
    """One patient per defect block gets its first series deflated (so every cohort of 40 has some)."""
    block, pos = divmod(index, DEFECT_BLOCK)
    return int(_rng(seed, _S_VARIETY, block).integers(DEFECT_BLOCK)) == pos


def _uid(seed: int, *parts: object) -> str:
    # generate_uid concatenates its entropy sources without a separator: join them unambiguously
    key = "|".join(["medtl-synth", str(GENERATOR_VERSION), str(seed), *map(str, parts)])
    return generate_uid(entropy_srcs=[key])


def _j2k_available() -> bool:
    try:
        from pydicom.pixels import get_encoder

        return bool(get_encoder(JPEG2000Lossless).is_available)
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


_J2K_OK = _j2k_available()


def _person(r: np.random.Generator) -> str:
    given = _GIVEN_F if r.random() < 0.5 else _GIVEN_M
    return f"{_FAMILY[r.integers(len(_FAMILY))]}^{given[r.integers(len(given))]}"


def _age(birth: date, on: date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _time(r: np.random.Generator, start_h: float = 7.5, end_h: float = 19.0) -> str:
    seconds = int(r.uniform(start_h, end_h) * 3600)
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _add_seconds(hhmmss: str, seconds: int) -> str:
    total = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + seconds
    total = min(total, 24 * 3600 - 1)
    return f"{total // 3600:02d}{total // 60 % 60:02d}{total % 60:02d}"


def _plan_ct_geometry(r: np.random.Generator, site: Site, sex: str) -> CTGeometry:
    half_fov = site.ct_fov / 2
    a = min(r.uniform(138, 162) * (1.0 if sex == "M" else 0.94), half_fov * 0.86)
    b = min(r.uniform(98, 120), half_fov * 0.62)
    yc = r.uniform(-12, 6)
    fat = r.uniform(8, 22)
    lungs = []
    for side in (-1, 1):
        lungs.append((side * a * r.uniform(0.40, 0.45), yc - b * r.uniform(0.0, 0.08),
                      a * r.uniform(0.40, 0.45), b * r.uniform(0.72, 0.82)))
    mediastinum = (r.uniform(0, 8), r.uniform(12, 18))
    heart = (a * r.uniform(0.06, 0.12), yc - b * r.uniform(0.22, 0.32), r.uniform(42, 54), r.uniform(34, 44),
             r.uniform(-40, 0), r.uniform(50, 70))
    sy, sr = yc + b * r.uniform(0.52, 0.60), r.uniform(14, 18)
    aorta = (r.uniform(16, 24), sy - sr * r.uniform(0.6, 0.9), r.uniform(9, 12))
    ribs = (float(r.uniform(0, 0.4)), float(r.uniform(0.34, 0.40)), float(r.uniform(0, 2 * np.pi)))
    tilt = float(r.choice([3.0, 4.5, 6.0, 8.0])) if site.ct_tilt else 0.0  # the tilted site always tilts a little
    return CTGeometry(
        n_slices=int(r.integers(16, 25)), tilt_deg=tilt, table_z=float(r.uniform(-260, -140)),
        table_y=float(r.uniform(-15, 15)), body=(a, b, yc, fat), lungs=tuple(lungs), mediastinum=mediastinum,
        heart=heart, aorta=aorta, spine=(sy, sr, float(r.uniform(0, 28))), ribs=ribs,
        body_phase=float(r.uniform(0, 2 * np.pi)), noise_factor=float(r.uniform(0.8, 1.35)),
    )


def _in_ct_lung(g: CTGeometry, x, y, z, margin=0.0):
    """Lung membership of points (mm; arrays broadcast): inside a lung ellipse and the chest wall, outside
    the mediastinum and heart, with ``margin`` mm to spare on every side."""
    a, b, yc, _ = g.body
    scale = 1.0 + 0.035 * np.sin(z / 70.0 + g.body_phase)
    rho = np.sqrt((x / (a * scale)) ** 2 + ((y - yc) / (b * scale)) ** 2)
    inner = rho < g.ring - (6.0 + margin) / min(a, b)
    mx, mw = g.mediastinum
    outside_mediastinum = np.abs(x - mx) > mw + margin
    hx, hy, hax, hay, hz, hzh = g.heart
    heart_scale = np.sqrt(np.clip(1.0 - ((z - hz) / hzh) ** 2, 0.0, 1.0))
    hw, hh = hax * heart_scale + 4.0 + margin, hay * heart_scale + 4.0 + margin
    outside_heart = ((x - hx) / hw) ** 2 + ((y - hy) / hh) ** 2 >= 1.0
    in_lung = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), dtype=bool)
    for cx, cy, ax, ay in g.lungs:
        ls = 1.0 + 0.06 * np.tanh(z / 60.0)
        in_lung |= ((x - cx) / (ax * ls - margin)) ** 2 + ((y - cy) / (ay * ls - margin)) ** 2 < 1.0
    return in_lung & inner & outside_mediastinum & outside_heart


def _plan_ct_lesion(r: np.random.Generator, g: CTGeometry) -> Lesion:
    # radius 5-17 mm, mostly >= 6.5 mm (>= 3 px once a 350-400 mm field of view is shown at 160 px);
    # most nodules are solid (-40..+60 HU), one in five is part-solid / ground glass (-550..-250 HU)
    radius = 6.0 + 14.0 * r.beta(1.6, 2.6)
    strength = float(r.uniform(-550, -250)) if r.random() < 0.2 else float(r.uniform(-40, 60))
    z_fraction = r.uniform(-0.1, 0.1)  # centre within ±0.1 r of the slab midpoint (module docstring)
    x, y = g.lungs[0][0], g.lungs[0][1]
    for attempt in range(400):
        rad = max(4.0, radius * (1.0 - attempt / 500))  # smaller nodules if a big one keeps failing to fit
        cx, cy, ax, ay = g.lungs[int(r.integers(2))]
        cand_x, cand_y = cx + r.uniform(-0.9, 0.9) * ax, cy + r.uniform(-0.9, 0.9) * ay
        # the whole nodule inside the lung at its centre and one radius above and below
        z = z_fraction * rad
        if all(bool(_in_ct_lung(g, cand_x, cand_y, z + dz, margin=rad + 1.0)) for dz in (-rad, 0.0, rad)):
            x, y, radius = cand_x, cand_y, rad
            break
    return Lesion(x=float(x), y=float(y), z=float(z_fraction * radius), radius=float(radius), strength=strength,
                  lobulation=float(r.uniform(0, 0.18)), phase=float(r.uniform(0, 2 * np.pi)))


def _plan_proj_geometry(r: np.random.Generator, site: Site, sex: str) -> ProjGeometry:
    width = r.uniform(300, 345) * (1.0 if sex == "M" else 0.93)
    lung_x, lung_y = width * r.uniform(0.20, 0.24), r.uniform(-35, -10)
    return ProjGeometry(
        width=width, depth=r.uniform(200, 250), shift=(r.uniform(-15, 15), r.uniform(-15, 20)),
        shoulder_y=lung_y - r.uniform(120, 140),
        lung=(lung_x, lung_y, width * r.uniform(0.17, 0.20), r.uniform(105, 130)),
        lung_depth=r.uniform(120, 160), dome_offset=r.uniform(8, 22),
        heart=(r.uniform(20, 40), lung_y + r.uniform(55, 75), r.uniform(62, 80), r.uniform(48, 60)),
        rib=(lung_y - r.uniform(115, 130), r.uniform(21, 26), r.uniform(0.08, 0.16)),
        clavicle_y=lung_y - r.uniform(105, 120), breasts=sex == "F",
        noise=site.proj_noise * r.uniform(0.7, 1.6), blur=float(r.uniform(0.3, 1.6)), tilt=r.uniform(-0.04, 0.04),
        low=(r.uniform(0.004, 0.012), r.uniform(0.004, 0.012), r.uniform(0, 2 * np.pi), r.uniform(0, 2 * np.pi)),
    )


def _proj_lung_field(g: ProjGeometry, x, y, margin: float = 0.0):
    """Whether points (x, y) (mm, arrays broadcast) lie inside a lung field of the PA view, clear of the
    heart, with ``margin`` mm to spare."""
    lx, ly, lw, lh = g.lung
    hx, hy, hax, hay = g.heart
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    for side in (-1, 1):
        dome = g.dome_offset if side < 0 else 0.0
        u = (x - side * lx) / max(lw - margin, 1.0)
        v = (y - ly) / max(lh - margin, 1.0)
        u_eff = u * (1 + 0.45 * np.clip(-v, 0.0, 1.0) ** 2)
        inside |= (u_eff * u_eff + v * v < 0.9) & (v < 0.70 + 0.30 * u * u - dome / lh - 0.1)
    return inside & (((x - hx) / (hax + margin)) ** 2 + ((y - hy) / (hay + margin)) ** 2 > 1)


def _inside_lung_proj(g: ProjGeometry, x: float, y: float, margin: float) -> bool:
    """Whether a disc of radius ``margin`` at (x, y) lies inside a lung field of the PA view, clear of the heart."""
    return bool(_proj_lung_field(g, x, y, margin))


def _plan_proj_lesion(r: np.random.Generator, g: ProjGeometry) -> Lesion:
    # radius 6-18 mm, mostly >= 8 mm: nodules below ~8 mm are rarely seen on radiographs at all
    radius = 8.0 + 16.0 * r.beta(1.5, 2.4)
    lx, ly, lw, lh = g.lung
    x, y = -lx, ly
    for _ in range(500):
        side = 1 if r.random() < 0.5 else -1
        cand_x, cand_y = side * lx + r.uniform(-0.7, 0.7) * lw, ly + r.uniform(-0.6, 0.6) * lh
        if _inside_lung_proj(g, cand_x, cand_y, radius + 4):
            x, y = cand_x, cand_y
            break
    return Lesion(x=float(x), y=float(y), z=float(r.uniform(-0.35, 0.30) * g.depth / 2), radius=float(radius),
                  strength=float(r.uniform(0.35, 1.0)), lobulation=float(r.uniform(0, 0.15)),
                  phase=float(r.uniform(0, 2 * np.pi)))


def _mrn(seed: int, index: int) -> str:
    # a bijection of the patient index: unique per patient within a cohort
    return "MRN" + str(1_000_000 + (7919 * index + 104_729 * (seed + 1)) % 9_000_000)


def _accession(seed: int, index: int, study: int) -> str:
    m = index * 3 + study
    return str(1_000_000_000 + (48_271 * m + 15_485_863 * (seed + 1)) % 9_000_000_000)


def _plan_patient(seed: int, index: int) -> PatientPlan:
    """Everything about patient ``index`` except its pixels; depends only on ``(seed, index)``."""
    r = _rng(seed, _S_PATIENT, index)
    site = SITES[_site_index(seed, index)]
    defect = _defect_of(seed, index)
    sex = "F" if r.random() < 0.5 else "M"
    family = _FAMILY[r.integers(len(_FAMILY))]
    given_list = _GIVEN_F if sex == "F" else _GIVEN_M
    given = given_list[r.integers(len(given_list))]
    birth = date(1936, 1, 1) + timedelta(days=int(r.integers(0, 365 * 63)))
    street = _STREETS[r.integers(len(_STREETS))]
    city, state, zip3 = _CITIES[r.integers(len(_CITIES))]
    address = f"{int(r.integers(10, 9900))} {street}, {city}, {state} {zip3}{int(r.integers(0, 100)):02d}"
    phone = f"+1 {int(r.integers(201, 990))} 555 01{int(r.integers(0, 100)):02d}"
    other = ""
    if sex == "F" and r.random() < 0.3:
        other = f"{_FAMILY[r.integers(len(_FAMILY))]}^{given}"
    pt = PatientPlan(index=index, site=site, folder=f"PAT{index:05d}", family=family, given=given, sex=sex,
                     birth=birth, mrn=_mrn(seed, index), address=address, phone=phone, other_names=other,
                     defect=defect)

    n_studies = int(r.choice([1, 2, 3], p=[0.45, 0.35, 0.20]))
    when = date(2019, 1, 7) + timedelta(days=int(r.integers(0, 1500)))
    referring = _person(r)
    extras_r = _rng(seed, _S_EXTRAS, index)
    use_deflate = _deflate_guaranteed(seed, index)
    for s in range(n_studies):
        if s:
            when += timedelta(days=int(r.integers(60, 420)))
        force_ct = s == 0 and defect in _CT_DEFECTS
        kind = "ct" if force_ct or r.random() < site.ct_share else "proj"
        label = LESION if r.random() < 0.4 else NORMAL
        if r.random() < 0.25:
            referring = _person(r)  # a new referrer now and then
        operator = _person(r)
        study_time = _time(r)
        name_text = pt.name if site.name_style == "caret" else f"{family}, {given}"
        if kind == "ct":
            description = {"A": "CT CHEST WO CONTRAST", "B": "CT THORAX", "C": "CT CHEST LOW DOSE",
                           "D": "CHEST CT ROUTINE"}[site.code]
        else:
            description = "XR CHEST"
        st = StudyPlan(
            index=s, folder=f"ST{s + 1:03d}", uid=_uid(seed, index, s, "study"), for_uid=_uid(seed, index, s, "for"),
            accession=_accession(seed, index, s), study_id=str(int(r.integers(1000, 99999))), date=when,
            time=study_time, kind=kind, modality="CT" if kind == "ct" else site.proj_modality, label=label,
            description="", referring=referring, operator=operator, age=_age(birth, when),
            kvp=120 if kind == "ct" else int(r.choice([110, 120, 125])),
            ma=int(r.integers(150, 320)) if kind == "ct" else int(r.integers(160, 400)), series=[],
        )
        if kind == "ct":
            st.ct = _plan_ct_geometry(r, site, sex)
            n_series = 2 if r.random() < 0.65 else 1
            kinds = ["ct_soft", "ct_lung"] if n_series == 2 else [("ct_lung", "ct_soft")[int(r.integers(2))]]
            if label == LESION:  # own stream: nothing but the pixels depends on the label
                st.lesion = _plan_ct_lesion(_rng(seed, _S_LESION, index, s), st.ct)
            thick = f"{site.ct_spacing:g}mm"
            descs = {"ct_soft": f"SOFT TISSUE {thick}", "ct_lung": f"LUNG {thick}"}
            numbers = {"ct_soft": 2, "ct_lung": 3}
        else:
            st.proj = _plan_proj_geometry(r, site, sex)
            kinds = ["pa", "lat"] if r.random() < 0.6 else ["pa"]
            if label == LESION:
                st.lesion = _plan_proj_lesion(_rng(seed, _S_LESION, index, s), st.proj)
            descs = {"A": {"pa": "PA", "lat": "LATERAL"}, "B": {"pa": "CHEST PA", "lat": "CHEST LAT"},
                     "C": {"pa": "Thorax PA", "lat": "Thorax lat"}, "D": {"pa": "CHEST PA", "lat": "CHEST LATERAL"}
                     }[site.code]
            numbers = {"pa": 1, "lat": 2}
            description = f"XR CHEST {len(kinds)} VIEW{'S' if len(kinds) > 1 else ''}"
        st.description = f"{description} {name_text}"[:64]
        # optional dose objects (written only with defects=True): natural rate, or this patient's defect
        u_sr, u_sc = extras_r.random(), extras_r.random()
        if kind == "ct":
            st.sr = u_sr < site.sr_rate or (s == 0 and defect == "sr")
            st.sc = u_sc < site.sc_rate or (s == 0 and defect == "burned_in")
        for i, skind in enumerate(kinds):
            ts_r = _rng(seed, _S_TS, index, s, i)
            ts = site.ts_alt if ts_r.random() < site.ts_alt_rate else site.ts_main
            if use_deflate and s == 0 and i == 0:
                ts = DeflatedExplicitVRLittleEndian
            if ts == JPEG2000Lossless and not _J2K_OK:
                ts = ExplicitVRLittleEndian
            n = st.ct.n_slices if kind == "ct" else 1
            if kind == "ct":
                inst = list(range(n, 0, -1)) if site.ct_head_first_numbering else list(range(1, n + 1))
                if site.shuffled_names:
                    names = [f"IM{v + 1:05d}" for v in _rng(seed, _S_NAMES, index, s, i).permutation(n)]
                else:
                    names = [f"IM{v:05d}" for v in inst]
            else:
                inst, names = [1], ["IM00001"]
            st.series.append(SeriesPlan(
                index=i, number=numbers[skind], folder=f"SE{i + 1:03d}", kind=skind,
                uid=_uid(seed, index, s, i, "series"), description=descs[skind], ts=ts, n=n, names=names,
                instance_numbers=inst,
            ))
        pt.studies.append(st)

    # defects that live next to the image series; which instance they hit is fixed here
    first = pt.studies[0]
    target = first.series[0]
    if defect == "missing_slice":
        target.omit = int(extras_r.integers(target.n // 3, 2 * target.n // 3 + 1))
    if defect in ("truncated", "duplicate"):
        # prefer an uncompressed series (the cut lands in plain pixel bytes), never a deflated one
        # (there a cut would hit the compressed stream, not the pixel data)
        ranked = sorted((se for st in pt.studies for se in st.series if se.ts != DeflatedExplicitVRLittleEndian),
                        key=lambda se: se.ts.is_compressed)
        se = ranked[0] if ranked else target
        st_index = next(st.index for st in pt.studies if se in st.series)
        k = int(extras_r.integers(se.n))
        name = f"IM{max(int(nm[2:]) for nm in se.names) + 1:05d}"
        rel = f"{pt.folder}/{pt.studies[st_index].folder}/{se.folder}/{name}"
        pt.extras.append(Extra(kind=defect, rel=rel, study=st_index, series=se.index, instance=k))
    if defect == "junk":
        name = "Thumbs.db" if extras_r.random() < 0.5 else "README.TXT"
        pt.extras.append(Extra(kind="junk", rel=f"{pt.folder}/{name}", name=name))
    return pt


@dataclass
class _File:
    rel: str  # relative to DIR/DICOM/<site>
    kind: str  # image, sr, sc, junk, truncated, duplicate
    study: int = 0
    series: int = 0
    instance: int = 0
    modality: str = ""
    ts: UID | None = None


def _dose_series(st: StudyPlan, seed: int, pt: PatientPlan) -> list[SeriesPlan]:
    out = []
    idx = len(st.series)
    site = pt.site
    for flag, kind, number, desc in ((st.sr, "sr", 997, "Dose Report"), (st.sc, "sc", 999, "Dose Info")):
        if not flag:
            continue
        if kind == "sr":  # SR is never pixel-compressed; keep the site's VR style
            ts = ImplicitVRLittleEndian if site.ts_main == ImplicitVRLittleEndian else ExplicitVRLittleEndian
        else:
            ts = site.ts_main if (site.ts_main != JPEG2000Lossless or _J2K_OK) else ExplicitVRLittleEndian
        out.append(SeriesPlan(index=idx, number=number, folder=f"SE{idx + 1:03d}", kind=kind,
                              uid=_uid(seed, pt.index, st.index, idx, "series"), description=desc, ts=ts, n=1,
                              names=["IM00001"], instance_numbers=[1]))
        idx += 1
    return out


def _series_of(pt: PatientPlan, st: StudyPlan, seed: int, defects: bool) -> list[SeriesPlan]:
    return st.series + (_dose_series(st, seed, pt) if defects else [])


def _files(pt: PatientPlan, seed: int, defects: bool) -> list[_File]:
    files = []
    for st in pt.studies:
        for se in _series_of(pt, st, seed, defects):
            kind = se.kind if se.kind in ("sr", "sc") else "image"
            modality = {"sr": "SR", "sc": "CT"}.get(se.kind, st.modality)
            for k in range(se.n):
                if defects and se.omit == k:
                    continue
                files.append(_File(f"{pt.folder}/{st.folder}/{se.folder}/{se.names[k]}", kind, st.index, se.index, k,
                                   modality, se.ts))
    if defects:
        for ex in pt.extras:
            files.append(_File(ex.rel, ex.kind, ex.study, ex.series, ex.instance))
    return files


# --------------------------------------------------------------------------------------------------
# pixels


_F32 = np.float32
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _kernel(sigma: float, n: int) -> np.ndarray:
    radius = max(1, min(int(np.ceil(3 * sigma)), n - 1))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (k / k.sum()).astype(_F32)


def _gaussian(img: np.ndarray, sigma) -> np.ndarray:
    """Separable Gaussian filter with reflected edges; ``sigma`` in pixels per axis (0: not along it)."""
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (img.ndim,))
    out = img.astype(_F32, copy=False)
    for ax, s in enumerate(sig):
        n = out.shape[ax]
        if s <= 0 or n < 2:
            continue
        k = _kernel(float(s), n)
        rad = k.size // 2
        pads = [(0, 0)] * out.ndim
        pads[ax] = (rad, rad)
        padded = np.moveaxis(np.pad(out, pads, mode="reflect"), ax, 0)
        acc = k[0] * padded[0:n]
        for i in range(1, k.size):
            acc += k[i] * padded[i:i + n]
        out = np.moveaxis(acc, 0, ax)
    return out


def _noise_gain(sigma, shape) -> float:
    """Standard deviation of white unit noise after :func:`_gaussian` with ``sigma``."""
    gain = 1.0
    for s, n in zip(np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),)), shape):
        if s > 0 and n >= 2:
            gain *= float(np.sqrt(np.sum(_kernel(float(s), n).astype(float) ** 2)))
    return gain


def _smooth_noise(r: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-correlated noise with unit standard deviation."""
    return _gaussian(r.standard_normal(shape, dtype=_F32), sigma) / _F32(_noise_gain(sigma, shape))


def _vessel_tree(r: np.random.Generator, roots, inside, step: float, generations: int = 6) -> np.ndarray:
    """Sample points of a branching vessel tree, shape (points, 5): x, y, z, radius (mm) and the
    length (mm) each point stands for. ``roots``: (hilum position (3,), direction (3,), radius mm);
    each segment forks in two thinner, slightly diverging children and bends a little; ``inside(points)``
    (points (k, 3) -> bool (k,)) keeps the tree in the lung: a branch ends where it leaves it."""
    pos = np.array([p for p, _, _ in roots], dtype=float)
    dirs = np.array([d for _, d, _ in roots], dtype=float)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rad = np.array([q for _, _, q in roots], dtype=float)
    hila = pos.copy()
    chunks = []
    for gen in range(generations):
        if not len(pos):
            break
        length = rad * r.uniform(5.0, 9.0, size=rad.shape)
        n_steps = np.maximum(2, np.ceil(length / step).astype(int))
        most = int(n_steps.max())
        t = (np.arange(most) + 0.5)[None, :] / n_steps[:, None]  # (branch, step)
        bend = r.standard_normal(dirs.shape) * 0.25
        pts = pos[:, None, :] + length[:, None, None] * (t[..., None] * dirs[:, None, :]
                                                         + 0.5 * t[..., None] ** 2 * bend[:, None, :])
        valid = t < 1.0
        keep = valid & inside(pts.reshape(-1, 3)).reshape(valid.shape)
        # a branch stops at the first point outside the lung
        keep &= np.cumprod(keep | ~valid, axis=1).astype(bool)
        taper = rad[:, None] * (1.0 - 0.15 * t)
        seg = np.concatenate([pts, taper[..., None], np.broadcast_to((length / n_steps)[:, None, None],
                                                                         taper.shape + (1,))], axis=-1)
        chunks.append(seg[keep])
        alive = keep[np.arange(len(pos)), n_steps - 1]  # reached its end inside the lung
        end = pos + length[:, None] * (dirs + 0.5 * bend)
        mid_dir = dirs + bend
        mid_dir /= np.linalg.norm(mid_dir, axis=1, keepdims=True)
        pos, mid_dir, rad, hila = end[alive], mid_dir[alive], rad[alive], hila[alive]
        if not len(pos):
            break
        # two children: rotate about a random axis perpendicular to the parent, away from the hilum
        outward = pos - hila
        outward /= np.maximum(np.linalg.norm(outward, axis=1, keepdims=True), 1e-6)
        perp = np.cross(mid_dir, r.standard_normal(mid_dir.shape))
        perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-6)
        angle = r.uniform(0.35, 0.7, size=(len(pos), 1))
        kids = [mid_dir * np.cos(angle) + sign * perp * np.sin(angle) + 0.25 * outward for sign in (1.0, -1.0)]
        dirs = np.concatenate(kids)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        share = r.uniform(0.62, 0.82, size=len(pos))  # uneven fork; Murray's law: r^3 = r1^3 + r2^3
        rad = np.concatenate([rad * share, rad * np.cbrt(1.0 - share ** 3)])
        pos, hila = np.concatenate([pos, pos]), np.concatenate([hila, hila])
        live = rad > 0.4
        pos, dirs, rad, hila = pos[live], dirs[live], rad[live], hila[live]
    return np.concatenate(chunks) if chunks else np.zeros((0, 5))


def _splat(shape, coords: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Linear splatting: add ``weights`` at fractional grid ``coords`` (points, ndim) into an array of
    ``shape`` (float32); points outside the grid are dropped."""
    ndim = len(shape)
    base = np.floor(coords).astype(np.int64)
    frac = coords - base
    out = np.zeros(int(np.prod(shape)), dtype=float)
    for corner in range(1 << ndim):
        idx = base.copy()
        w = weights.astype(float).copy()
        for ax in range(ndim):
            bit = (corner >> ax) & 1
            idx[:, ax] += bit
            w *= frac[:, ax] if bit else 1.0 - frac[:, ax]
        ok = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
        flat = np.ravel_multi_index(tuple(idx[ok].T), shape)
        out += np.bincount(flat, weights=w[ok], minlength=out.size)
    return out.reshape(shape).astype(_F32)


def _ct_grid(g: CTGeometry, site: Site):
    m, ps, dz = site.ct_matrix, site.ct_fov / site.ct_matrix, site.ct_spacing
    x = ((np.arange(m, dtype=_F32) - (m - 1) / 2) * ps)[None, None, :]
    y = ((np.arange(m, dtype=_F32) - (m - 1) / 2) * ps)[None, :, None]
    z = ((np.arange(g.n_slices, dtype=_F32) - (g.n_slices - 1) / 2) * dz)[:, None, None]
    return x, y, z


def _ct_vessel_fraction(g: CTGeometry, site: Site, r: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    """Volume fraction (0-1) of pulmonary vessels in each voxel of the slab, shape (slices, rows, cols):
    a branching tree from each hilum (:func:`_vessel_tree`), splatted with its true volume (pi r^2 per
    mm), so vessels thinner than a voxel show with partial-volume contrast and vessels crossing the
    slice show as dots."""
    n, m, ps, dz = g.n_slices, site.ct_matrix, site.ct_fov / site.ct_matrix, site.ct_spacing
    roots = []
    for cx, cy, ax, ay in g.lungs:
        side = np.sign(cx)
        hilum = np.array([cx - side * 0.55 * ax, cy + r.uniform(-0.1, 0.15) * ay, r.uniform(-20, 20)])
        for k in range(12):  # lobar and segmental trunks, spread over the directions away from the mediastinum
            direction = r.standard_normal(3)
            direction[0] = side * (abs(direction[0]) + 0.3)
            roots.append((hilum, direction, r.uniform(3.0, 5.0)))

    def inside(p: np.ndarray) -> np.ndarray:
        return _in_ct_lung(g, p[:, 0], p[:, 1], p[:, 2], margin=-2.0) | (np.abs(p[:, 0]) < g.mediastinum[1] + 30.0)

    tree = _vessel_tree(r, roots, inside, step=min(ps, dz) / 2, generations=7)
    coords = np.column_stack([tree[:, 2] / dz + (n - 1) / 2, tree[:, 1] / ps + (m - 1) / 2,
                              tree[:, 0] / ps + (m - 1) / 2])
    volume = np.pi * tree[:, 3] ** 2 * tree[:, 4] / (ps * ps * dz)
    frac = _gaussian(_splat((n, m, m), coords, volume), (0.0, 0.45, 0.45))
    return np.clip(frac, 0.0, 1.0) * lung


def _ct_hu_volume(st: StudyPlan, site: Site, r: np.random.Generator) -> np.ndarray:
    """Noise-free HU volume of a CT study, slices in ascending position order, shape (slices, rows,
    cols), float32. Tissue boundaries are partial-volume (anti-aliased); the lungs have a fine
    correlated parenchymal texture, a gravity gradient and a branching vessel tree."""
    g = st.ct
    assert g is not None
    n, m, ps, dz = g.n_slices, site.ct_matrix, site.ct_fov / site.ct_matrix, site.ct_spacing
    x, y, z = _ct_grid(g, site)
    a, b, yc, fat = g.body
    scale = 1.0 + 0.035 * np.sin(z / 70.0 + g.body_phase)
    xn, yn = x / (a * scale), (y - yc) / (b * scale)
    rho = np.sqrt(xn * xn + yn * yn)
    # body outline: an ellipse in front, a flatter superellipse at the back (the patient lies on the table)
    power = 2.0 + 0.9 * np.clip(yn * 3.0, 0.0, 1.0)
    rho_body = (np.abs(xn) ** power + np.abs(yn) ** power) ** (1.0 / power)
    body = np.clip((1.0 - rho_body) * min(a, b) / ps + 0.5, 0.0, 1.0)  # anti-aliased skin edge
    tex = _smooth_noise(r, (m, m), 2.0)  # soft-tissue texture (slowly varying, shared by the slices)
    fine = _smooth_noise(r, (n, m, m), (0.0, 0.6, 0.6))  # fine grain of muscle and fat
    soft = 45.0 + 8.0 * tex + 5.0 * fine  # muscle and mediastinal soft tissue
    soft = np.where(rho_body > 1.0 - fat / min(a, b), -100.0 + 12.0 * np.roll(tex, 11, axis=1) + 6.0 * fine, soft)
    inner = rho < g.ring - 6.0 / min(a, b)
    soft = np.where(inner, 30.0 + 6.0 * tex + 4.0 * fine, soft)
    hu = -1000.0 + (soft + 1000.0) * body
    body = body > 0.5

    hx, hy, hax, hay, hz, hzh = g.heart
    heart_scale2 = np.clip(1.0 - ((z - hz) / hzh) ** 2, 0.0, 1.0)
    heart_q = ((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2
    heart = heart_q < heart_scale2
    mx, mw = g.mediastinum
    mediastinal_fat = inner & ~heart & (np.abs(x - mx) < mw) & (heart_q < 2.2 * heart_scale2 + 0.3)
    hu = np.where(mediastinal_fat, -85.0 + 10.0 * tex, hu)
    hu = np.where(heart, 40.0 + 4.0 * tex, hu)

    # lungs: partial-volume edge, gravity gradient (dependent lung denser), fine correlated texture
    # of the secondary lobules, and the vessel tree
    lung = _gaussian(np.broadcast_to(_in_ct_lung(g, x, y, z), (n, m, m)).astype(_F32), (0.0, 0.5, 0.5))
    cy_mean = float(np.mean([c[1] for c in g.lungs]))
    ay_mean = float(np.mean([c[3] for c in g.lungs]))
    texture = _smooth_noise(r, (n, m, m), (0.5, 0.6, 0.6)) * 18.0 + _smooth_noise(r, (n, m, m), (1.0, 1.8, 1.8)) * 14.0
    parenchyma = -865.0 + 40.0 * (y - cy_mean) / ay_mean + texture
    vessel = _ct_vessel_fraction(g, site, r, lung)
    parenchyma = parenchyma * (1.0 - vessel) + 40.0 * vessel
    hu = hu * (1.0 - lung) + parenchyma * lung

    ax_, ay_, ar = g.aorta
    hu = np.where((x - ax_) ** 2 + (y - ay_) ** 2 < ar * ar, _F32(45.0), hu)
    sy, sr, disc_phase = g.spine
    d2 = x * x + (y - sy) ** 2
    disc = ((z + disc_phase) % 28.0) < 5.0
    vert_hu = np.where(disc, _F32(90.0), np.where(d2 > (sr - 3.0) ** 2, _F32(950.0), _F32(680.0)))
    hu = np.where(d2 < sr * sr, vert_hu, hu)
    hu = np.where(x * x + (y - sy - sr - 8.0) ** 2 < 7.5 ** 2, _F32(22.0), hu)
    hu = np.where(((x / 5.0) ** 2 + ((y - sy - sr - 24.0) / 9.0) ** 2 < 1.0) & body, _F32(700.0), hu)
    hu = np.where((x / 13.0) ** 2 + ((y - (yc - b + fat + 9.0)) / 5.0) ** 2 < 1.0, _F32(480.0), hu)
    # ribs: a ring of bone sections in the chest wall; they run obliquely, so each rib shows in
    # some slices only and its angle drifts with z
    offset, spacing, phase = g.ribs
    t = (np.arctan2(yn, xn) - offset - 0.004 * z) / spacing
    k = np.round(t)
    half_axis = (a + b) / 2
    d_along = (t - k) * spacing * g.ring * half_axis
    d_across = (rho - g.ring) * half_axis
    present = np.sin(z / 12.0 + 1.7 * k + phase) > -0.2
    lateral = np.abs(xn) > 0.4 * rho
    hu = np.where((d_along ** 2 / 36.0 + d_across ** 2 / 16.0 < 1.0) & present & lateral & body, _F32(650.0), hu)
    if site.ct_table:
        ty = yc + b + 10.0
        hu = np.where((np.abs(y - ty) < 4.0) & (np.abs(x) < 0.42 * site.ct_fov), _F32(-250.0), hu)
    hu = np.array(np.broadcast_to(hu, (n, m, m)), dtype=_F32)  # a writable copy
    if st.lesion is not None:
        _add_ct_lesion(hu, st.lesion, x[0, 0], y[0, :, 0], z[:, 0, 0], ps, dz, r)
    return hu


def _add_ct_lesion(hu, les: Lesion, xs, ys, zs, ps, thickness, r) -> None:
    """Blend a partial-volume nodule (averaged over the slice thickness) into ``hu`` in place."""
    reach = les.radius * (1 + les.lobulation) + 2 * ps
    cols = np.nonzero(np.abs(xs - les.x) < reach)[0]
    rows = np.nonzero(np.abs(ys - les.y) < reach)[0]
    slices = np.nonzero(np.abs(zs - les.z) < les.radius + thickness / 2)[0]
    if not (cols.size and rows.size and slices.size):
        return
    X = xs[cols][None, None, :].astype(float) - les.x
    Y = ys[rows][None, :, None].astype(float) - les.y
    dist = np.sqrt(X ** 2 + Y ** 2)
    lobe = 1.0 + les.lobulation * np.cos(3.0 * np.arctan2(Y, X) + les.phase)
    frac = np.zeros((slices.size, rows.size, cols.size))
    offsets = (np.arange(4) + 0.5) / 4 - 0.5
    for off in offsets:  # sample the slice thickness
        dzz = (zs[slices].astype(float) + off * thickness - les.z)[:, None, None]
        rho = np.sqrt(np.clip(les.radius ** 2 - dzz ** 2, 0.0, None)) * lobe
        frac += np.clip((rho - dist) / ps + 0.5, 0.0, 1.0)
    frac /= offsets.size
    texture = les.strength + 12.0 * r.standard_normal(frac.shape)
    block = hu[np.ix_(slices, rows, cols)]
    hu[np.ix_(slices, rows, cols)] = block * (1 - frac) + texture * frac


def _ct_series_pixels(hu: np.ndarray, kind: str, st: StudyPlan, site: Site, r: np.random.Generator) -> np.ndarray:
    """Stored values of one reconstruction (lung or soft-tissue kernel) of the HU volume."""
    g = st.ct
    sigma_lung, sigma_soft = site.ct_noise
    if kind == "ct_lung":
        img = hu + 0.6 * (hu - _gaussian(hu, (0.0, 0.8, 0.8)))  # edge-enhancing kernel
        sigma, corr = sigma_lung * g.noise_factor, (0.0, 0.5, 0.5)
    else:
        img = _gaussian(hu, (0.0, 0.55, 0.55))
        sigma, corr = sigma_soft * g.noise_factor, (0.0, 0.7, 0.7)
    img = img + _smooth_noise(r, hu.shape, corr) * _F32(sigma)
    stored = np.rint((img - _F32(site.ct_intercept)) / _F32(site.ct_slope))
    lo, hi = _stored_range(site.ct_pixel_rep, site.ct_bits_stored)
    if site.ct_recon_circle:
        c = np.arange(site.ct_matrix) - (site.ct_matrix - 1) / 2
        stored[:, (c[None, :] ** 2 + c[:, None] ** 2) > (site.ct_matrix / 2) ** 2] = lo
    return np.clip(stored, lo, hi).astype(np.int16 if site.ct_pixel_rep else np.uint16)


def _stored_range(pixel_rep: int, bits: int) -> tuple[int, int]:
    if pixel_rep:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _band(d: np.ndarray, half_width: float) -> np.ndarray:
    """A flat-topped band profile exp(-(d/w)^4)."""
    q = (d / half_width) ** 2
    return np.exp(-q * q)


_PRESENTATION_GAIN = 1.0
_LESION_GAIN = 3.5  # a nodule is dense soft tissue (denser than the partial-volume lung it displaces)


def _large_blur(img: np.ndarray, block: int) -> np.ndarray:
    """Cheap large-kernel low-pass: block means, bilinearly interpolated back to full size."""
    rows, cols = img.shape
    small = img.reshape(rows // block, block, cols // block, block).mean(axis=(1, 3))

    def interp(n_full: int, n_small: int) -> np.ndarray:
        centres = (np.arange(n_small) + 0.5) * block - 0.5
        pos = np.clip(np.arange(n_full, dtype=float), centres[0], centres[-1])
        idx = np.clip(np.searchsorted(centres, pos, side="right") - 1, 0, n_small - 2)
        frac = (pos - centres[idx]) / block
        weights = np.zeros((n_full, n_small), dtype=_F32)
        weights[np.arange(n_full), idx] = 1 - frac
        weights[np.arange(n_full), idx + 1] = frac
        return weights

    return interp(rows, small.shape[0]) @ small.astype(_F32) @ interp(cols, small.shape[1]).T


def _proj_vessel_thickness(g: ProjGeometry, r: np.random.Generator, shape, ps: float) -> tuple[np.ndarray, np.ndarray]:
    """Projected thickness (mm of blood) of the pulmonary vessel trees in the PA and the lateral view,
    each of ``shape`` (rows, cols) on the detector grid of spacing ``ps`` mm: one 3D tree
    (:func:`_vessel_tree`) per lung from its hilum, in the chest frame (x right-left, y head-feet,
    z anterior-posterior), splatted with its true volume and blurred a little per calibre."""
    lx, ly, lw, lh = g.lung
    half_depth = g.lung_depth / 2

    def inside(p: np.ndarray) -> np.ndarray:
        in_depth = ((p[:, 2] - 0.04 * g.depth) / (0.85 * half_depth)) ** 2 + ((p[:, 1] - ly) / lh) ** 2 < 1.0
        return _proj_lung_field(g, p[:, 0], p[:, 1], margin=-3.0) & in_depth | (np.abs(p[:, 0]) < 0.5 * lx)

    roots = []
    for side in (-1, 1):
        hilum = np.array([side * (lx - 0.62 * lw), ly + r.uniform(0.0, 0.2) * lh, r.uniform(0.0, 15.0)])
        for _ in range(12):
            direction = r.standard_normal(3)
            direction[0] = side * (abs(direction[0]) + 0.3)
            direction[1] *= 1.4  # the lungs are taller than wide: more vessels run up and down
            roots.append((hilum, direction, r.uniform(3.5, 5.5)))
    tree = _vessel_tree(r, roots, inside, step=ps / 2, generations=7)
    rows, cols = shape
    volume = np.pi * tree[:, 3] ** 2 * tree[:, 4] / (ps * ps)
    thick = tree[:, 3] > 2.0
    out = []
    for horizontal in (tree[:, 0], tree[:, 2]):  # PA: x across; lateral: z across
        coords = np.column_stack([(tree[:, 1] + g.shift[1]) / ps + (rows - 1) / 2,
                                  (horizontal + g.shift[0]) / ps + (cols - 1) / 2])
        fine = _gaussian(_splat(shape, coords[~thick], volume[~thick]), 0.5)
        coarse = _gaussian(_splat(shape, coords[thick], volume[thick]), 1.4)
        out.append(fine + coarse)
    return out[0], out[1]


def _proj_image(st: StudyPlan, view: str, site: Site, r: np.random.Generator,
                vessels: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A chest radiograph (PA or lateral) as stored values, shape (Rows, Columns) uint16: bright =
    attenuating for MONOCHROME2, inverted for MONOCHROME1. ``vessels``: projected vessel thickness
    (mm) in the PA and lateral view from :func:`_proj_vessel_thickness` (one tree per study, so both
    views show the same vessels)."""
    g = st.proj
    assert g is not None
    rows, cols, ps = site.proj_rows, site.proj_cols, site.proj_spacing
    X = ((np.arange(cols, dtype=_F32) - (cols - 1) / 2) * ps - g.shift[0])[None, :]
    Y = ((np.arange(rows, dtype=_F32) - (rows - 1) / 2) * ps - g.shift[1])[:, None]
    lx, ly, lw, lh = g.lung
    neck = 55.0
    if view == "pa":
        half = g.width / 2 * (1 + 0.03 * Y / 200.0)
        shoulder = 1 / (1 + np.exp(-(Y - g.shoulder_y) / 20.0))
        w = neck + (half - neck) * shoulder
        q = X / w
        tissue = g.depth * np.sqrt(np.clip(1 - q * q, 0, None))
        # arms beside the chest, humeral heads at the shoulders
        arm_c = half + 20.0
        arm_top = 1 / (1 + np.exp(-(Y - g.shoulder_y - 15) / 12.0))
        arm = np.sqrt(np.clip(1 - ((np.abs(X) - arm_c) / 32.0) ** 2, 0, None)) * arm_top
        humerus = _band(np.abs(X) - arm_c - 4, 8.0) * (Y > g.shoulder_y + 15)
        head = ((np.abs(X) - arm_c + 4) / 22.0) ** 2 + ((Y - g.shoulder_y - 18) / 22.0) ** 2
        humerus += np.sqrt(np.clip(1 - head, 0, None))
        air = np.zeros((rows, cols), dtype=_F32)
        lung_mask = np.zeros((rows, cols), dtype=_F32)
        for side in (-1, 1):  # -1: patient right, shown on the image left
            dome = g.dome_offset if side < 0 else 0.0  # the right hemidiaphragm sits higher
            u = (X - side * lx) / lw
            v = (Y - ly) / lh
            ue = u * (1 + 0.45 * np.clip(-v, 0, 1) ** 2)
            rr = ue * ue + v * v
            base = 0.70 + 0.30 * u * u - dome / lh
            mask = np.clip((1 - rr) * 10.0, 0, 1) * np.clip((base - v) * 20.0, 0, 1)
            lung_mask += mask
            air += mask * g.lung_depth * np.sqrt(np.sqrt(np.clip(1 - rr, 0, 1)))
        hx, hy, hax, hay = g.heart
        heart = np.sqrt(np.clip(1 - ((X - hx) / hax) ** 2 - ((Y - hy) / hay) ** 2, 0, None))
        air *= 1 - 0.9 * np.clip(heart * 3, 0, 1)
        trachea = _band(X, 8.0) * ((Y < ly - 0.25 * lh) & (Y > g.shoulder_y - 60)) * 18.0
        axx = np.clip(np.abs(X) - 18.0, 0, None)
        spine = np.sqrt(np.clip(1 - (X / 19.0) ** 2, 0, None)) * (0.75 + 0.25 * np.cos(2 * np.pi * Y / 27.0) ** 2)
        inside = (np.abs(X) < w - 10) & (axx > 2)
        rib_y0, rib_dy, slope = g.rib
        # posterior ribs: from the spine they rise a little, then arc down laterally
        t = (Y - rib_y0 + slope * axx - 0.0045 * axx * axx) / rib_dy
        ribs = _band((t - np.round(t)) * rib_dy, 5.0) * (inside & (t > -0.5) & (t < 9.5))
        # anterior ribs: fainter, running down and inwards from the lateral chest wall
        ta = (Y - rib_y0 - 55 - 0.45 * (w - np.abs(X))) / (rib_dy * 1.15)
        ribs += 0.4 * _band((ta - np.round(ta)) * rib_dy * 1.15, 6.0) * (inside & (axx > 40) & (ta > -0.5) & (ta < 5.5))
        ribs *= (0.3 + 0.7 * np.clip(lung_mask, 0, 1)) * (0.8 + 0.2 * _smooth_noise(r, (rows, cols), 6.0))
        clav = _band(Y - (g.clavicle_y - 0.22 * axx + 0.0008 * axx * axx), 6.0) * ((axx > 0) & (np.abs(X) < w))
        # lung texture: fine and coarse correlated noise of the interstitium, in the lung fields only
        lung_tex = _smooth_noise(r, (rows, cols), 0.9) + 0.8 * _smooth_noise(r, (rows, cols), 2.5)
        atten = ((tissue - air - trachea) / g.depth + 0.18 * spine + 0.11 * ribs + 0.30 * clav
                 + 0.30 * arm + 0.15 * humerus + (vessels[0] / g.depth + 0.016 * lung_tex) * np.clip(lung_mask, 0, 1))
        if g.breasts:
            for side in (-1, 1):
                br = ((X - side * lx * 1.15) / (0.9 * lw)) ** 2 + ((Y - ly - 0.75 * lh) / (0.45 * lh)) ** 2
                atten += 0.10 * np.sqrt(np.clip(1 - br, 0, None))
        les_x = st.lesion.x if st.lesion else 0.0
    else:  # lateral: horizontal axis runs anterior (left) to posterior (right)
        half = g.depth / 2 * (1 + 0.05 * Y / 200.0)
        w = neck * 0.9 + (half - neck * 0.9) / (1 + np.exp(-(Y - g.shoulder_y) / 10.0))
        q = X / w
        body = np.sqrt(np.clip(1 - q * q, 0, None))
        tissue = g.width * body
        arms = 0.35 * np.clip((g.shoulder_y + 90 - Y) / 60.0, 0, 1) * body  # raised arms over the upper chest
        u = (X - 0.08 * half) / (0.70 * half)
        v = (Y - ly) / lh
        rr = u * u + v * v
        base = 0.72 + 0.25 * u * u
        mask = np.clip((1 - rr) * 10.0, 0, 1) * np.clip((base - v) * 20.0, 0, 1)
        air = mask * 0.55 * g.width * np.sqrt(np.sqrt(np.clip(1 - rr, 0, 1)))
        hax, hay = g.heart[2] * 0.9, g.heart[3] * 1.1
        heart = np.sqrt(np.clip(1 - ((X + 0.30 * half) / hax) ** 2 - ((Y - g.heart[1]) / hay) ** 2, 0, None))
        air *= 1 - 0.8 * np.clip(heart * 3, 0, 1)
        spine = _band(X - 0.62 * half, 17.0) * (0.65 + 0.35 * (np.cos(np.pi * Y / 28.0) ** 2 > 0.12))
        stern = np.exp(-((X + 0.86 * half) / 5.0) ** 2) * ((Y > g.clavicle_y) & (Y < ly + 0.4 * lh))
        tr = (X - 0.5 * half - 0.5 * (Y - ly)) / 26.0
        ribs = _band((tr - np.round(tr)) * 26.0, 4.0) * ((X > 0.2 * half) & (np.abs(v) < 0.95)) * body
        lung_tex = _smooth_noise(r, (rows, cols), 0.9) + 0.8 * _smooth_noise(r, (rows, cols), 2.5)
        atten = ((tissue - air) / g.width * 1.05 + arms + 0.35 * spine + 0.15 * stern + 0.10 * ribs
                 + (vessels[1] * 1.05 / g.width + 0.012 * lung_tex) * np.clip(mask, 0, 1))
        les_x = st.lesion.z if st.lesion else 0.0
    atten = np.asarray(atten, dtype=_F32)
    if st.lesion is not None:  # a sphere of soft tissue: path length through it, in a small box
        les = st.lesion
        reach = les.radius * (1 + les.lobulation) + 2 * ps
        cs = np.nonzero(np.abs(X[0] - les_x) < reach)[0]
        rs = np.nonzero(np.abs(Y[:, 0] - les.y) < reach)[0]
        if cs.size and rs.size:
            dx = X[0, cs][None, :] - les_x
            dy = Y[rs, 0][:, None] - les.y
            radius = les.radius * (1 + les.lobulation * np.cos(3 * np.arctan2(dy, dx) + les.phase))
            path = 2 * np.sqrt(np.clip(radius ** 2 - dx ** 2 - dy ** 2, 0, None))
            unit = g.depth if view == "pa" else g.width / 1.05  # mm of soft tissue per unit attenuation
            atten[np.ix_(rs, cs)] += (_LESION_GAIN * les.strength / unit) * path
    # slow brightness variation (separable cosines) and heel-effect gradient
    kx, ky, px_, py_ = g.low
    low = np.cos(kx * X + px_) * np.cos(ky * Y + py_)
    atten = atten * (1 + 0.05 * low)
    # "for presentation" processing: unsharp masking with a large kernel (equalises the lung fields
    # against the mediastinum and abdomen, as DX/CR vendor processing does), then a display range
    atten = atten + _PRESENTATION_GAIN * (atten - _large_blur(atten, 16))
    signal = 0.10 + 0.55 * atten + g.tilt * Y / 200.0
    signal = _gaussian(signal, g.blur)
    signal = signal + g.noise * (0.6 + 0.6 * np.clip(signal, 0, 1)) * r.standard_normal(signal.shape, dtype=_F32)
    top = (1 << site.proj_bits) - 1
    stored = np.clip(np.rint(top * (0.02 + 0.93 * np.clip(signal, 0, 1))), 0, top)
    if site.photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint16)


_GLYPHS = np.random.default_rng(20240601).random((64, 7, 5)) < 0.45  # fixed pseudo-font


def _dose_screen_pixels(pt: PatientPlan, st: StudyPlan) -> np.ndarray:
    """An 8-bit screen capture with burned-in text rows (patient name, ID, dose table) as glyphs."""
    rows, cols = 192, 256
    img = np.full((rows, cols), 18, dtype=np.uint8)
    lines = [f"{pt.family}, {pt.given}", pt.mrn, st.accession, "CTDIvol  DLP  Phantom", "Body 32 cm"]
    for i, text in enumerate(lines):
        for j, ch in enumerate(text[:40]):
            glyph = _GLYPHS[ord(ch) % 64]
            r0, c0 = 12 + i * 14, 8 + j * 6
            if c0 + 5 > cols:
                break
            img[r0:r0 + 7, c0:c0 + 5][glyph] = 230
    img[100:104, 8:248] = 160  # table rules
    img[150:154, 8:248] = 160
    return img


# --------------------------------------------------------------------------------------------------
# headers


def _ds(value: float, digits: int = 4) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _file_meta(sop_class: UID, sop_uid: str, ts: UID, site: Site) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = _uid(0, "implementation", site.code)
    meta.ImplementationVersionName = site.implementation_version
    meta.SourceApplicationEntityTitle = site.source_ae
    return meta


def _patient_study_header(ds: Dataset, pt: PatientPlan, st: StudyPlan, seed: int) -> None:
    site = pt.site
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = st.date.strftime("%Y%m%d")
    ds.StudyDate = st.date.strftime("%Y%m%d")
    ds.StudyTime = st.time
    ds.AccessionNumber = st.accession
    ds.InstitutionName = site.institution
    ds.InstitutionAddress = site.institution_address
    ds.ReferringPhysicianName = st.referring
    ds.StudyDescription = st.description
    ds.OperatorsName = st.operator
    ds.PatientName = pt.name
    ds.PatientID = pt.mrn
    ds.IssuerOfPatientID = site.issuer
    ds.PatientBirthDate = pt.birth.strftime("%Y%m%d")
    ds.PatientSex = pt.sex
    if pt.other_names:
        ds.OtherPatientNames = pt.other_names
    ds.PatientAge = st.age
    ds.PatientAddress = pt.address
    ds.PatientTelephoneNumbers = pt.phone
    ds.StudyInstanceUID = st.uid
    ds.StudyID = st.study_id


def _equipment_header(ds: Dataset, pt: PatientPlan, st: StudyPlan, seed: int) -> None:
    site = pt.site
    ds.Manufacturer = site.manufacturer
    ds.ManufacturerModelName = site.ct_model if st.kind == "ct" else site.proj_model
    ds.StationName = f"{site.station_prefix}{'CT' if st.kind == 'ct' else 'XR'}{1 + (pt.index + st.index) % 2:02d}"
    serial_base = {"A": 40311, "B": 72208, "C": 15574, "D": 98016}[site.code]
    ds.DeviceSerialNumber = f"SN{serial_base}{'7' if st.kind == 'ct' else '3'}{1 + (pt.index + st.index) % 2}"
    ds.SoftwareVersions = site.software


def _private_block(ds: Dataset, pt: PatientPlan, st: StudyPlan) -> None:
    block = ds.private_block(0x0019, pt.site.private_creator, create=True)
    block.add_new(0x10, "LO", pt.name)
    block.add_new(0x11, "LO", pt.mrn)
    block.add_new(0x12, "DS", _ds(st.ma * 0.01, 2))
    block.add_new(0x13, "LO", st.accession)


def _series_template(pt: PatientPlan, st: StudyPlan, se: SeriesPlan, seed: int) -> Dataset:
    """Header elements shared by every instance of a series (never per-instance ones)."""
    site = pt.site
    ds = Dataset()
    _patient_study_header(ds, pt, st, seed)
    _equipment_header(ds, pt, st, seed)
    series_time = _add_seconds(st.time, 60 * (se.index + 1))
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = st.date.strftime("%Y%m%d")
    ds.SeriesTime = series_time
    ds.InstanceCreationTime = series_time
    ds.SeriesInstanceUID = se.uid
    ds.SeriesNumber = se.number
    ds.SeriesDescription = se.description
    ds.BodyPartExamined = "CHEST"
    if se.kind == "sr":
        return ds
    ds.AcquisitionTime = _add_seconds(st.time, 60 * se.index + 20)
    ds.ContentTime = _add_seconds(series_time, 30)
    ds.ProtocolName = "CHEST ROUTINE" if st.kind == "ct" else "CHEST"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.LossyImageCompression = "00"
    _private_block(ds, pt, st)
    if se.kind == "sc":
        ds.SOPClassUID = SECONDARY_CAPTURE_STORAGE
        ds.Modality = "CT"
        ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
        ds.ConversionType = "WSD"
        ds.BurnedInAnnotation = "YES"
        ds.Rows, ds.Columns = 192, 256
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        return ds
    if st.kind == "ct":
        g = st.ct
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = st.for_uid
        ds.PositionReferenceIndicator = ""
        ds.ScanOptions = "HELICAL MODE"
        ds.KVP = st.kvp
        ds.XRayTubeCurrent = st.ma
        ds.ExposureTime = 600
        ds.Exposure = int(round(st.ma * 0.6))
        ds.CTDIvol = round(st.ma * 0.025, 2)
        ds.SliceThickness = _ds(site.ct_spacing)
        ds.SpacingBetweenSlices = _ds(site.ct_spacing)
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(site.ct_fov)
        ds.GantryDetectorTilt = _ds(g.tilt_deg, 1)
        ds.TableHeight = _ds(150.0 + g.table_y, 1)
        ds.RotationDirection = "CW"
        ds.FilterType = "BODY FILTER"
        ds.FocalSpots = "1.2"
        ds.ConvolutionKernel = site.ct_kernels[0 if se.kind == "ct_lung" else 1]
        ds.ImageOrientationPatient = _orientation(g)
        ds.Rows = ds.Columns = site.ct_matrix
        ps = _ds(site.ct_fov / site.ct_matrix, 6)
        ds.PixelSpacing = [ps, ps]
        ds.BitsAllocated = 16
        ds.BitsStored = site.ct_bits_stored
        ds.HighBit = site.ct_bits_stored - 1
        ds.PixelRepresentation = site.ct_pixel_rep
        if se.kind == "ct_lung":
            ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        else:
            ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.WindowCenterWidthExplanation = "LUNG" if se.kind == "ct_lung" else "MEDIASTINUM"
        ds.RescaleIntercept = _ds(site.ct_intercept)
        ds.RescaleSlope = _ds(site.ct_slope)
        ds.RescaleType = "HU"
        return ds
    # projection radiography
    view = se.kind
    ds.Modality = site.proj_modality
    ds.SOPClassUID = DX_PRESENTATION_STORAGE if site.proj_modality == "DX" else CR_IMAGE_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = "PA" if view == "pa" else "LL"
    ds.PatientOrientation = ["L", "F"] if view == "pa" else ["P", "F"]
    ds.KVP = st.kvp
    ds.XRayTubeCurrent = st.ma
    ds.ExposureTime = 12 if view == "pa" else 25
    ds.Exposure = max(1, int(round(st.ma * (0.012 if view == "pa" else 0.025))))
    ds.DistanceSourceToDetector = "1800"
    ds.ImagerPixelSpacing = [_ds(site.proj_spacing), _ds(site.proj_spacing)]
    ds.PixelSpacing = [_ds(site.proj_spacing / site.proj_magnification, 6)] * 2
    ds.Rows, ds.Columns = site.proj_rows, site.proj_cols
    ds.PhotometricInterpretation = site.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = site.proj_bits
    ds.HighBit = site.proj_bits - 1
    ds.PixelRepresentation = 0
    top = (1 << site.proj_bits) - 1
    if site.proj_window:
        ds.WindowCenter = str(int(top * 0.47))
        ds.WindowWidth = str(int(top * 0.86))
    if site.proj_modality == "DX":
        ds.DistanceSourceToPatient = _ds(1800 / site.proj_magnification, 1)
        ds.EstimatedRadiographicMagnificationFactor = _ds(site.proj_magnification, 3)
        ds.DetectorType = "SCINTILLATOR"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.BurnedInAnnotation = "NO"
    else:
        ds.PlateType = "ST-VI"
        ds.Sensitivity = "200"
    return ds


def _sr_dataset(pt: PatientPlan, st: StudyPlan, se: SeriesPlan, seed: int) -> Dataset:
    ds = _series_template(pt, st, se, seed)
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.Modality = "SR"
    ds.ContentDate = st.date.strftime("%Y%m%d")
    ds.ContentTime = _add_seconds(st.time, 900)
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    dlp = st.ma * 0.025 * st.ct.n_slices * pt.site.ct_spacing / 10 * 1.1
    texts = [
        f"Patient: {pt.name}  ID: {pt.mrn}  DOB: {pt.birth.strftime('%Y%m%d')}  Accession: {st.accession}",
        f"Exam: {st.description}  Operator: {st.operator}",
        f"CTDIvol {st.ma * 0.025:.1f} mGy (32 cm phantom); DLP {dlp:.1f} mGy*cm; {st.kvp} kV",
    ]
    items = []
    for text in texts:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code("121106", "DCM", "Comment")])
        item.TextValue = text
        items.append(item)
    ds.ContentSequence = Sequence(items)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _encode(arr: np.ndarray, ts: UID, bits_stored: int, pixel_rep: int, photometric: str) -> tuple[bytes, str]:
    """PixelData value and VR for ``arr`` in transfer syntax ``ts``."""
    if ts in (JPEG2000Lossless, RLELossless):
        from pydicom.pixels import get_encoder

        encoder = get_encoder(ts)
        plugin = "pylibjpeg" if "pylibjpeg" in encoder.available_plugins else ""
        level = _OPENJPEG_LOG.level
        _OPENJPEG_LOG.setLevel(logging.WARNING)  # it logs a line per encoded tile at INFO
        try:
            frame = encoder.encode(
                np.ascontiguousarray(arr), encoding_plugin=plugin, rows=arr.shape[0], columns=arr.shape[1],
                number_of_frames=1, samples_per_pixel=1, bits_allocated=arr.dtype.itemsize * 8,
                bits_stored=bits_stored, pixel_representation=pixel_rep, photometric_interpretation=photometric,
            )
        finally:
            _OPENJPEG_LOG.setLevel(level)
        return encapsulate([frame]), "OB"
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return data, "OB" if arr.dtype.itemsize == 1 else "OW"


class _SeriesWriter:
    """Serialises the instances of one series as ``Dataset.save_as(enforce_file_format=True)`` does,
    but encodes the template's elements only once: they are cut into tag-ordered segments around the
    per-instance elements (SOP Instance UID, Instance Number, position, pixel data), so each further
    instance costs only its own few elements. ``tests/pipeline/test_synth.py`` checks the bytes are
    identical to pydicom's own writer."""

    def __init__(self, template: Dataset, site: Site, sop_class: UID, ts: UID):
        self.template = template
        self.site = site
        self.sop_class = sop_class
        self.ts = UID(ts)
        self.implicit = self.ts == ImplicitVRLittleEndian
        self.charset = template.get("SpecificCharacterSet", "ISO_IR 100")
        self._key: tuple | None = None
        self._segments: list[bytes] = []
        self._meta_segments: tuple[bytes, bytes] | None = None

    def _encode(self, ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = self.implicit, True
        write_dataset(fp, ds, parent_encoding=self.charset)
        return fp.getvalue()

    def _element(self, elem: DataElement, implicit: bool | None = None) -> bytes:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = (self.implicit if implicit is None else implicit), True
        write_data_element(fp, elem, self.charset)
        return fp.getvalue()

    def instance(self, sop_uid: str, per_instance: dict, pixels: tuple[bytes, str] | None) -> tuple[bytes, int]:
        """File bytes of one instance, and the length of its pixel data value (0 without pixels)."""
        elems = [DataElement(0x00080018, "UI", sop_uid)]
        for keyword, value in per_instance.items():
            tag = tag_for_keyword(keyword)
            elems.append(DataElement(tag, dictionary_VR(tag), value))
        pixel_len = 0
        if pixels is not None:
            value, vr = pixels
            elems.append(DataElement(0x7FE00010, vr, value, is_undefined_length=self.ts.is_compressed))
            pixel_len = len(value)
        elems.sort(key=lambda e: e.tag)
        tags = tuple(e.tag for e in elems)
        if self._key != tags:
            overlap = set(tags) & set(self.template.keys())
            if overlap:
                raise ValueError(f"per-instance elements {sorted(overlap)} also in the series template")
            groups: list[list] = [[] for _ in range(len(tags) + 1)]
            for tag in sorted(self.template.keys()):
                groups[bisect.bisect(tags, tag)].append(tag)
            self._segments = [self._encode(Dataset({t: self.template[t] for t in group})) for group in groups]
            self._key = tags
        parts = [self._segments[0]]
        for elem, segment in zip(elems, self._segments[1:]):
            parts.append(self._element(elem))
            parts.append(segment)
        body = b"".join(parts)
        if self.ts == DeflatedExplicitVRLittleEndian:
            compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            body = compressor.compress(body) + compressor.flush()
            if len(body) % 2:
                body += b"\x00"
        return _PREAMBLE + self._meta(sop_uid) + body, pixel_len

    def _meta(self, sop_uid: str) -> bytes:
        """File Meta Information: group length + elements, only the SOP instance UID varies."""
        if self._meta_segments is None:
            meta = _file_meta(self.sop_class, "1.2", self.ts, self.site)
            validate_file_meta(meta, enforce_standard=True)  # adds (0002,0001) etc. as pydicom's writer does
            before = Dataset({t: meta[t] for t in meta.keys() if 0x00020000 < t < 0x00020003})
            after = Dataset({t: meta[t] for t in meta.keys() if t > 0x00020003})
            self._meta_segments = (self._encode_meta(before), self._encode_meta(after))
        uid = self._element(DataElement(0x00020003, "UI", sop_uid), implicit=False)
        elements = self._meta_segments[0] + uid + self._meta_segments[1]
        group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(elements))
        return group_length + elements

    @staticmethod
    def _encode_meta(ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = False, True
        write_dataset(fp, ds)
        return fp.getvalue()


def _sop_uid(seed: int, pt: PatientPlan, st: StudyPlan, se: SeriesPlan, k: int) -> str:
    return _uid(seed, pt.index, st.index, se.index, k, "instance")


def _orientation(g: CTGeometry) -> list[str]:
    t = np.deg2rad(g.tilt_deg)
    return ["1", "0", "0", "0", _ds(np.cos(t), 10), _ds(np.sin(t), 10)]


def _slice_position(g: CTGeometry, site: Site, k: int) -> tuple[list[str], str]:
    """ImagePositionPatient and SliceLocation of the slice with position index ``k``: slices step
    along the normal of the (possibly tilted) image plane, centred on the table position."""
    orient = np.array([float(v) for v in _orientation(g)])
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    half = (site.ct_matrix - 1) / 2 * site.ct_fov / site.ct_matrix
    along = g.table_z + (k - (g.n_slices - 1) / 2) * site.ct_spacing
    centre = np.array([0.0, g.table_y, 0.0]) + along * normal
    position = centre - half * row_dir - half * col_dir
    return [_ds(v) for v in position], _ds(float(np.dot(position, normal)), 3)


def _render_patient(pt: PatientPlan, seed: int, defects: bool) -> dict[str, bytes]:
    """All files of a patient: relpath (under the site folder) -> bytes."""
    site = pt.site
    out: dict[str, bytes] = {}
    cut: dict[str, int] = {}  # relpath -> length of its pixel data value (for the truncated copy)
    for st in pt.studies:
        hu = vessels = None
        if st.kind == "ct":
            hu = _ct_hu_volume(st, site, _rng(seed, _S_PIXELS, pt.index, st.index, 99))
        for se in _series_of(pt, st, seed, defects):
            base = f"{pt.folder}/{st.folder}/{se.folder}"
            r = _rng(seed, _S_PIXELS, pt.index, st.index, se.index)
            if se.kind == "sr":
                writer = _SeriesWriter(_sr_dataset(pt, st, se, seed), site, BASIC_TEXT_SR_STORAGE, se.ts)
                out[f"{base}/{se.names[0]}"], _ = writer.instance(_sop_uid(seed, pt, st, se, 0), {}, None)
                continue
            template = _series_template(pt, st, se, seed)
            if se.kind in ("sc", "pa", "lat"):
                if se.kind == "sc":
                    sop_class = SECONDARY_CAPTURE_STORAGE
                    pix = _encode(_dose_screen_pixels(pt, st), se.ts, 8, 0, "MONOCHROME2")
                else:
                    sop_class = DX_PRESENTATION_STORAGE if site.proj_modality == "DX" else CR_IMAGE_STORAGE
                    if vessels is None:
                        vessels = _proj_vessel_thickness(st.proj, _rng(seed, _S_PIXELS, pt.index, st.index, 99),
                                                         (site.proj_rows, site.proj_cols), site.proj_spacing)
                    pix = _encode(_proj_image(st, se.kind, site, r, vessels), se.ts, site.proj_bits, 0,
                                  site.photometric)
                rel = f"{base}/{se.names[0]}"
                writer = _SeriesWriter(template, site, sop_class, se.ts)
                out[rel], cut[rel] = writer.instance(_sop_uid(seed, pt, st, se, 0), {"InstanceNumber": 1}, pix)
                continue
            # CT series: slices in position order
            stored = _ct_series_pixels(hu, se.kind, st, site, r)
            writer = _SeriesWriter(template, site, CT_IMAGE_STORAGE, se.ts)
            for k in range(se.n):
                if defects and se.omit == k:
                    continue
                position, location = _slice_position(st.ct, site, k)
                per = {
                    "InstanceNumber": se.instance_numbers[k],
                    "ImagePositionPatient": position,
                    "SliceLocation": location,
                }
                pix = _encode(stored[k], se.ts, site.ct_bits_stored, site.ct_pixel_rep, "MONOCHROME2")
                rel = f"{base}/{se.names[k]}"
                out[rel], cut[rel] = writer.instance(_sop_uid(seed, pt, st, se, k), per, pix)
    if defects:
        for ex in pt.extras:
            if ex.kind == "junk":
                out[ex.rel] = _junk_bytes(ex.name, pt, seed)
                continue
            st = pt.studies[ex.study]
            se = st.series[ex.series]
            source = f"{pt.folder}/{st.folder}/{se.folder}/{se.names[ex.instance]}"
            if source not in out:  # the instance was the omitted slice: take a neighbour
                source = next(k for k in out if k.startswith(f"{pt.folder}/{st.folder}/{se.folder}/"))
            data = out[source]
            if ex.kind == "duplicate":
                out[ex.rel] = data
            else:  # truncated: cut in the middle of the pixel data value (the last element)
                out[ex.rel] = data[: len(data) - cut[source] // 2]
    return out


def _junk_bytes(name: str, pt: PatientPlan, seed: int) -> bytes:
    r = _rng(seed, _S_EXTRAS, pt.index, 7)
    if name == "Thumbs.db":  # an OLE compound file header, as Windows Explorer leaves behind
        header = (bytes.fromhex("D0CF11E0A1B11AE1") + bytes(16)
                  + bytes.fromhex("3E000300FEFF0900060000000000000000000000"))
        body = r.integers(0, 256, size=4096 - len(header), dtype=np.uint8).tobytes()
        return header + body
    return (
        "DICOM EXPORT\r\n\r\nThis folder was written by the PACS export tool.\r\n"
        "Open the images with a DICOM viewer; the files have no extension.\r\n"
        f"Export job {int(r.integers(10000, 99999))}\r\n"
    ).encode("ascii")


# --------------------------------------------------------------------------------------------------
# writing


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data, durable=True)


def _read_marker(out_dir: Path) -> dict | None:
    path = out_dir / MARKER_NAME
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable synth marker ({exc}); remove the directory and write it again") from exc
    if not isinstance(marker, dict) or not marker.get("synthetic"):
        raise ValueError(f"{path}: not a synthetic-cohort marker")
    return marker


def _marker_files(marker: dict) -> dict[str, str]:
    """The marker's file list (relpath -> content id); empty for a marker from before synth kept one."""
    files = marker.get(MARKER_FILES)
    if not isinstance(files, dict):
        return {}
    return {rel: cid for rel, cid in files.items() if isinstance(rel, str) and isinstance(cid, str)}


def _marker_bytes(seed: int, defects: bool, patients: int, files: dict[str, str], writing: int | None = None) -> bytes:
    marker = {"synthetic": True, "seed": seed, "patients": patients, "generator_version": GENERATOR_VERSION,
              "defects": defects, MARKER_FILES: files}
    if writing is not None:
        marker["writing_patients"] = writing  # present only while a run is under way / was interrupted
    return (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode()


def _lesion_rows(pt: PatientPlan, seed: int, defects: bool) -> list[str]:
    """``lesions.csv`` rows of a patient (module docstring): one per written image instance that shows
    its study's nodule, from the plan alone (no pixels needed)."""
    rows = []
    site = pt.site
    for st in pt.studies:
        les = st.lesion
        if les is None:
            continue
        for se in st.series:
            for k in range(se.n):
                if defects and se.omit == k:
                    continue
                if st.kind == "ct":
                    g = st.ct
                    ps = float(_ds(site.ct_fov / site.ct_matrix, 6))  # as PixelSpacing says
                    dz = (k - (g.n_slices - 1) / 2) * site.ct_spacing - les.z
                    if abs(dz) >= les.radius:
                        continue
                    radius_mm = float(np.sqrt(les.radius ** 2 - dz ** 2))
                    row = les.y / ps + (site.ct_matrix - 1) / 2
                    col = les.x / ps + (site.ct_matrix - 1) / 2
                    radius_px = radius_mm / ps
                else:
                    g = st.proj
                    det = site.proj_spacing  # the image is rendered on the detector grid
                    across = les.x if se.kind == "pa" else les.z
                    row = (les.y + g.shift[1]) / det + (site.proj_rows - 1) / 2
                    col = (across + g.shift[0]) / det + (site.proj_cols - 1) / 2
                    radius_px = les.radius / det
                    radius_mm = radius_px * float(_ds(site.proj_spacing / site.proj_magnification, 6))
                rows.append(f"{st.uid},{se.uid},{_sop_uid(seed, pt, st, se, k)},{row:.3f},{col:.3f},"
                            f"{radius_px:.3f},{radius_mm:.3f}")
    return rows


#: while writing, the marker's file list is saved again after this many new files, so that a resumed
#: run renders at most this many files' patients again to list them (they are never re-read)
CHECKPOINT_FILES = 1000


def _write_cohort(out_dir: Path, seed: int, defects: bool, total: int, complete: int,
                  known: dict[str, str]) -> SynthSummary:
    """Write the missing files of patients ``[0, total)`` and the marker listing every file's content id.

    ``known`` is the previous marker's file list. Content ids always come from bytes rendered in
    memory, never from reading the tree (a file a user put or changed there is not listed): a patient
    whose files are all on disk keeps its listed ids; one with a file missing, or with files the list
    does not cover (an interrupted run after its last checkpoint, or a marker from before the list),
    is rendered and listed again, and only its missing files are written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir / DICOM_DIR
    stale = remove_stale_temps(out_dir)
    plans = [_plan_patient(seed, p) for p in range(total)]
    todo: list[tuple[PatientPlan, list[str]]] = []  # patients with missing files, and those files
    unlisted: list[PatientPlan] = []  # patients whose files are all there but not all listed
    for pt in plans:
        site_dir = root / pt.site.folder
        rels = [f.rel for f in _files(pt, seed, defects)]
        missing = [rel for rel in rels if not (site_dir / rel).is_file()]
        if missing:
            todo.append((pt, missing))
        elif any(f"{DICOM_DIR}/{pt.site.folder}/{rel}" not in known for rel in rels):
            unlisted.append(pt)
    ids = dict(known)  # relpath under out_dir -> content id of the bytes synth made for it

    def listed(pt: PatientPlan, files: dict[str, bytes]) -> None:
        ids.update({f"{DICOM_DIR}/{pt.site.folder}/{rel}": content_hash(data) for rel, data in files.items()})

    def checkpoint() -> None:
        atomic_write_bytes(out_dir / MARKER_NAME, _marker_bytes(seed, defects, complete, ids, writing=total),
                           durable=True)

    if todo:
        checkpoint()
    written = since_checkpoint = 0
    made_dirs: set[Path] = set()
    for pt, missing in todo:
        files = _render_patient(pt, seed, defects)
        site_dir = root / pt.site.folder
        for rel in missing:
            path = site_dir / rel
            if path.parent not in made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(path.parent)
            atomic_write_bytes(path, files[rel], durable=False)
            written += 1
        listed(pt, files)
        since_checkpoint += len(missing)
        if since_checkpoint >= CHECKPOINT_FILES:
            checkpoint()
            since_checkpoint = 0
    if unlisted:
        log.info("synth: listing the files of %d patients written before (rendered again, not rewritten)",
                 len(unlisted))
    for pt in unlisted:
        listed(pt, _render_patient(pt, seed, defects))
    rows = ["study_instance_uid,label"] + [f"{st.uid},{st.label}" for pt in plans for st in pt.studies]
    labels = ("\n".join(rows) + "\n").encode()
    _write_if_changed(out_dir / LABELS_NAME, labels)
    lesion_rows = [LESIONS_HEADER] + [row for pt in plans for row in _lesion_rows(pt, seed, defects)]
    lesions = ("\n".join(lesion_rows) + "\n").encode()
    _write_if_changed(out_dir / LESIONS_NAME, lesions)
    final = {LABELS_NAME: content_hash(labels), LESIONS_NAME: content_hash(lesions)}
    for pt in plans:
        for f in _files(pt, seed, defects):
            rel = f"{DICOM_DIR}/{pt.site.folder}/{f.rel}"
            final[rel] = ids[rel]
    _write_if_changed(out_dir / MARKER_NAME, _marker_bytes(seed, defects, total, final))
    summary = _summarise(plans, seed, defects)
    log.info("synth: %d patients (%d written now), %d studies, %d series, %d instances, %d files (%d written now%s)",
             summary.patients, len(todo), summary.studies, summary.series, summary.instances, summary.files, written,
             f", {stale} stale temporary files removed" if stale else "")
    return summary


def _summarise(plans: list[PatientPlan], seed: int, defects: bool) -> SynthSummary:
    studies = series = instances = files = 0
    by_modality: Counter[str] = Counter()
    by_ts: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for pt in plans:
        for st in pt.studies:
            studies += 1
            labels[st.label] += 1
            series += len(_series_of(pt, st, seed, defects))
        for f in _files(pt, seed, defects):
            files += 1
            if f.kind in ("image", "sr", "sc"):
                instances += 1
                by_modality[f.modality] += 1
                by_ts[f.ts.keyword or str(f.ts)] += 1
    return SynthSummary(patients=len(plans), studies=studies, series=series, instances=instances, files=files,
                        by_modality=dict(sorted(by_modality.items())), by_transfer_syntax=dict(sorted(by_ts.items())),
                        labels=dict(sorted(labels.items())))

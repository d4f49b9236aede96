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
difficulty comes from realistic variation only (small or faint nodules, overlap with ribs, vessels
and the heart, site noise and resolution), never from label noise, and nothing but the nodule
differs between the classes (site, vendor, modality, file names and every header field are drawn
without looking at the label). Both modalities share a branching pulmonary vessel tree
(:func:`~pipeline.synth.phantoms._vessel_tree`: forks from each hilum, thinner per generation,
rendered with its true volume so thin vessels show with partial-volume contrast). CT: an
anti-aliased body outline flattened at the back, soft tissue with fine grain, lungs with a gravity
gradient and a fine correlated parenchymal texture, heart, aorta, spine, sternum and oblique ribs.
Radiographs (PA and lateral): projected tissue and lung thickness, posterior and anterior ribs,
clavicles, spine, arms, the projected vessel tree and a correlated interstitial texture,
vendor-like unsharp masking, blur and quantum noise. Nodules: CT radius 5-17 mm (mostly >= 6.5 mm,
i.e. >= 3 px when the field of view is shown at 160 px), solid (-40..+60 HU) or, one in five,
part-solid / ground glass (-550..-250 HU); radiographs radius 6-18 mm (mostly >= 8 mm) with a
density of 0.35-1 times soft tissue, anywhere in the lung fields (over ribs and vessels too).

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
listed ids and are not read. While a run writes, the marker is saved every
:data:`~pipeline.synth.writing.CHECKPOINT_FILES` files with the list so far, so an interrupted run,
when resumed, renders only the patients written since (to list them) and writes only what is
missing. A marker from before the list gets it on the next run (every patient rendered once,
nothing rewritten).

**Modules** (each imports only those above it):

* :mod:`~pipeline.synth.sites`: the four sites (:data:`SITES`) and how their vendors differ;
* :mod:`~pipeline.synth.planning`: the plan of a patient from ``(seed, index)`` (fake PHI, studies,
  series, transfer syntaxes, anatomy, nodule, defects) and the files it has, without pixels;
* :mod:`~pipeline.synth.phantoms`: the pixels (CT HU volume and its reconstructions, radiographs,
  dose screens);
* :mod:`~pipeline.synth.rendering`: the DICOM files of a patient (headers, encoding, the fast
  series writer, defect copies and junk);
* :mod:`~pipeline.synth.writing`: :func:`run` and :func:`add`, the marker, ``labels.csv`` and
  ``lesions.csv``.
"""

from pipeline.synth.planning import DEFECT_KINDS, GENERATOR_VERSION, PatientPlan, StudyPlan
from pipeline.synth.sites import SITES, Site
from pipeline.synth.writing import (
    DICOM_DIR,
    LABELS_NAME,
    LESIONS_NAME,
    MARKER_FILES,
    MARKER_NAME,
    SynthParams,
    SynthSummary,
    add,
    run,
)

__all__ = [
    "DEFECT_KINDS",
    "DICOM_DIR",
    "GENERATOR_VERSION",
    "LABELS_NAME",
    "LESIONS_NAME",
    "MARKER_FILES",
    "MARKER_NAME",
    "SITES",
    "PatientPlan",
    "Site",
    "StudyPlan",
    "SynthParams",
    "SynthSummary",
    "add",
    "run",
]

"""Synth planning: the structure and parameters of each patient, without pixels (cheap).

:func:`plan_patient` draws everything about a patient from ``(seed, patient index)`` alone: fake
PHI, studies, series, transfer syntaxes, anatomy (:class:`CTGeometry`, :class:`ProjGeometry`), the
nodule of a lesion study (:class:`Lesion`) and the defects; :func:`planned_files` lists the files
the patient has in the tree. The anatomy's lung fields (:func:`in_ct_lung`, :func:`proj_lung_field`)
are defined here, where the nodules are placed, and drawn by :mod:`pipeline.synth.phantoms`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from pipeline.synth.sites import SITES, Site

GENERATOR_VERSION = 2
LESION, NORMAL = "lesion", "normal"

DEFECT_BLOCK = 40  # every block of this many consecutive patients holds one patient per defect kind
DEFECT_KINDS = ("junk", "truncated", "missing_slice", "duplicate", "sr", "burned_in")
_CT_DEFECTS = frozenset({"missing_slice", "sr", "burned_in"})

# RNG stream ids: every draw comes from np.random.default_rng([seed, stream, ...indices]).
S_SITE, S_DEFECT, S_VARIETY, S_PATIENT, S_EXTRAS, S_TS, S_PIXELS, S_NAMES, S_LESION = range(1, 10)


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


def rng(seed: int, *keys: int) -> np.random.Generator:
    """The generator of one stream of draws (``keys``: a stream id ``S_*`` and indices)."""
    return np.random.default_rng([seed, *keys])


def _site_index(seed: int, index: int) -> int:
    # one of each site in every aligned block of 4 patients, in a seeded order
    return int(rng(seed, S_SITE, index // 4).permutation(len(SITES))[index % 4])


@functools.lru_cache(maxsize=64)
def _defects_in_block(seed: int, block: int) -> dict[int, str]:
    """Position in the block -> defect kind: six different patients, chosen from the seed. The
    truncated copy goes to a patient of a site that stores pixels uncompressed, so the cut lands in
    plain pixel bytes (a reader sees a short Pixel Data element)."""
    order = [int(v) for v in rng(seed, S_DEFECT, block).permutation(DEFECT_BLOCK)]
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
    return int(rng(seed, S_VARIETY, block).integers(DEFECT_BLOCK)) == pos


def synth_uid(seed: int, *parts: object) -> str:
    """A UID hashed from the seed and ``parts`` (deterministic, distinct per generator version)."""
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


def in_ct_lung(g: CTGeometry, x, y, z, margin=0.0):
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
        if all(bool(in_ct_lung(g, cand_x, cand_y, z + dz, margin=rad + 1.0)) for dz in (-rad, 0.0, rad)):
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


def proj_lung_field(g: ProjGeometry, x, y, margin: float = 0.0):
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
    return bool(proj_lung_field(g, x, y, margin))


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


def plan_patient(seed: int, index: int) -> PatientPlan:
    """Everything about patient ``index`` except its pixels; depends only on ``(seed, index)``."""
    r = rng(seed, S_PATIENT, index)
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
    extras_r = rng(seed, S_EXTRAS, index)
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
            index=s, folder=f"ST{s + 1:03d}", uid=synth_uid(seed, index, s, "study"),
            for_uid=synth_uid(seed, index, s, "for"),
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
                st.lesion = _plan_ct_lesion(rng(seed, S_LESION, index, s), st.ct)
            thick = f"{site.ct_spacing:g}mm"
            descs = {"ct_soft": f"SOFT TISSUE {thick}", "ct_lung": f"LUNG {thick}"}
            numbers = {"ct_soft": 2, "ct_lung": 3}
        else:
            st.proj = _plan_proj_geometry(r, site, sex)
            kinds = ["pa", "lat"] if r.random() < 0.6 else ["pa"]
            if label == LESION:
                st.lesion = _plan_proj_lesion(rng(seed, S_LESION, index, s), st.proj)
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
            ts_r = rng(seed, S_TS, index, s, i)
            ts = site.ts_alt if ts_r.random() < site.ts_alt_rate else site.ts_main
            if use_deflate and s == 0 and i == 0:
                ts = DeflatedExplicitVRLittleEndian
            if ts == JPEG2000Lossless and not _J2K_OK:
                ts = ExplicitVRLittleEndian
            n = st.ct.n_slices if kind == "ct" else 1
            if kind == "ct":
                inst = list(range(n, 0, -1)) if site.ct_head_first_numbering else list(range(1, n + 1))
                if site.shuffled_names:
                    names = [f"IM{v + 1:05d}" for v in rng(seed, S_NAMES, index, s, i).permutation(n)]
                else:
                    names = [f"IM{v:05d}" for v in inst]
            else:
                inst, names = [1], ["IM00001"]
            st.series.append(SeriesPlan(
                index=i, number=numbers[skind], folder=f"SE{i + 1:03d}", kind=skind,
                uid=synth_uid(seed, index, s, i, "series"), description=descs[skind], ts=ts, n=n, names=names,
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
class PlannedFile:
    """A file of a patient in the tree (instance, defect copy or junk), from the plan alone."""

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
                              uid=synth_uid(seed, pt.index, st.index, idx, "series"), description=desc, ts=ts, n=1,
                              names=["IM00001"], instance_numbers=[1]))
        idx += 1
    return out


def series_of(pt: PatientPlan, st: StudyPlan, seed: int, defects: bool) -> list[SeriesPlan]:
    """The series written for a study: its image series, then (with ``defects``) its dose objects."""
    return st.series + (_dose_series(st, seed, pt) if defects else [])


def planned_files(pt: PatientPlan, seed: int, defects: bool) -> list[PlannedFile]:
    """Every file the patient has under its site folder, in writing order."""
    files = []
    for st in pt.studies:
        for se in series_of(pt, st, seed, defects):
            kind = se.kind if se.kind in ("sr", "sc") else "image"
            modality = {"sr": "SR", "sc": "CT"}.get(se.kind, st.modality)
            for k in range(se.n):
                if defects and se.omit == k:
                    continue
                files.append(PlannedFile(f"{pt.folder}/{st.folder}/{se.folder}/{se.names[k]}", kind, st.index,
                                         se.index, k, modality, se.ts))
    if defects:
        for ex in pt.extras:
            files.append(PlannedFile(ex.rel, ex.kind, ex.study, ex.series, ex.instance))
    return files

"""Patient-level train/val/test split with duplicate-aware grouping.

Inputs are the preprocess stage's ``index.parquet`` (one row per image: ``row`` into the tensor
array, ``image_id``, ``patient_key``, ``label``, ``site``, ...) and ``tensors.npy`` ((N, C, H, W),
memory-mapped, read in chunks).

Leakage guards:

* a patient never spans two splits (the split unit is a patient, never an image);
* images with identical pixel content (exact duplicates: hash of the bytes) and near-duplicates
  (64-bit perceptual hashes within ``near_duplicate_distance`` bits) form duplicate groups; patients
  linked by a shared duplicate group (also transitively) are merged into one indivisible unit with
  a union-find, so a duplicate group never spans two splits either.

Units are assigned by a stratified greedy pass: per stratum (the unit's majority label, or
(label, site)), units are shuffled with the seed, ordered largest first, and each goes to the split
that is furthest below its target patient count in that stratum. Rounding left over by one stratum
is carried into the targets of the next, so many small strata still meet the global fractions.
With ``kfold >= 2`` the same procedure deals the train+val units into k equal folds.

Sticky assignment (``sticky: true``, the default): a retraining pipeline sees the same patients again
next week, plus new ones. Re-dealing everyone would move last week's training patients into this
week's test set, so a champion model would be scored on patients it was trained on and every
comparison over time would be biased. So when the previous ``splits.csv`` was dealt with the same
seed, fractions, stratification and k, every patient in it keeps its split (and fold), and only new
patients are dealt, towards the target fractions of the whole cohort. A duplicate group that links
patients previously in different splits (a leak that new data revealed) is moved into one split,
and the moved patients are counted in the summary and logged.

Outputs: ``splits.csv`` (image_id, patient_key, label, site, split[, fold], sorted by image_id) and
``split_summary.json``, both written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import MedtlError
from pipeline.io_utils import atomic_write_text, remove_stale_temps
from pipeline.params import ParamsError, check, param

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
REQUIRED_COLUMNS: tuple[str, ...] = ("row", "image_id", "patient_key", "label", "site")
CSV_COLUMNS: tuple[str, ...] = ("image_id", "patient_key", "label", "site", "split")


class SplitInputError(MedtlError, ValueError):
    """The preprocess output (index.parquet, tensors.npy) cannot be split."""


_CHUNK_BYTES = 64 * 1024 * 1024  # tensor bytes read per chunk while hashing
_BLOCK_ELEMENTS = 4_000_000  # uint64 XORs per block in the near-duplicate search


@dataclass(frozen=True)
class SplitParams:
    """``split`` section of params.yaml.

    Attributes:
        seed: shuffles the patient units, >= 0.
        train, val, test: fractions of patients, each in [0, 1], summing to 1.
        stratify_by_site: stratify by (label, site) instead of label.
        kfold: >= 0; 0/1 = off; k >= 2 adds a fold column (0..k-1) to train+val rows, test rows get -1.
        near_duplicate_distance: max Hamming distance between 64-bit phashes, in [-1, 64]; -1 disables.
        near_duplicate_max_mad: a phash match is confirmed only if the 32x32 thumbnails differ by at most
            this mean absolute difference (images in [0, 1]), in [0, 1]: chest images of different patients
            from one site share so much coarse structure that their 64-bit phashes can be equal; real
            near-duplicates (re-exports, re-windowed or re-encoded copies, two reconstructions of one
            volume) are far closer pixel-wise.
        sticky: patients keep their split from the previous splits.csv; only new ones are dealt.
    """

    seed: int = param(0, min=0)
    train: float = param(0.7, min=0, max=1)
    val: float = param(0.15, min=0, max=1)
    test: float = param(0.15, min=0, max=1)
    stratify_by_site: bool = False
    kfold: int = param(0, min=0)
    near_duplicate_distance: int = param(4, min=-1, max=64, hint="-1 disables the near-duplicate search")
    near_duplicate_max_mad: float = param(0.015, min=0, max=1)
    sticky: bool = True

    def __post_init__(self) -> None:
        check(self, "split")
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ParamsError(f"split: the fractions train={self.train} val={self.val} test={self.test} sum to "
                              f"{total:g}, not 1")
        if self.kfold >= 2 and self.train + self.val <= 0:
            raise ParamsError(f"split.kfold: {self.kfold} folds need train+val > 0 (train={self.train} "
                              f"val={self.val})")


@dataclass
class SplitSummary:
    images: dict[str, int]
    patients: dict[str, int]
    labels: dict[str, dict[str, int]]
    patients_in_multiple_splits: int
    duplicate_groups_exact: int
    duplicate_groups_near: int
    duplicate_images: int
    cross_patient_duplicate_groups: int
    seed: int
    kfold: int
    patients_kept: int = 0  # patients whose split came from the previous splits.csv
    patients_new: int = 0  # patients dealt this time
    patients_moved: int = 0  # previously assigned patients moved (a duplicate group joined splits)
    assignment: dict | None = None  # what a later run must match to keep these assignments


# --------------------------------------------------------------------------- union-find


class _UnionFind:
    def __init__(self, items: Iterable = ()) -> None:
        self.parent: dict = {}
        for item in items:
            self.parent.setdefault(item, item)

    def add(self, item) -> None:
        self.parent.setdefault(item, item)

    def find(self, item):
        parent = self.parent
        root = item
        while parent[root] != root:
            root = parent[root]
        while parent[item] != root:  # path compression
            parent[item], item = root, parent[item]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def components(self) -> list[list]:
        members: dict = defaultdict(list)
        for item in self.parent:
            members[self.find(item)].append(item)
        return [sorted(m) for m in members.values()]


# --------------------------------------------------------------------------- duplicates


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def _phash64(image: np.ndarray) -> np.uint64:
    """64-bit imagehash.phash of a (C, H, W) float image in [0, 1] (channel mean, 8-bit grey)."""
    import imagehash
    from PIL import Image

    grey = np.nan_to_num(np.asarray(image).mean(axis=0, dtype=np.float32), nan=0.0)
    pixels = np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)
    bits = imagehash.phash(Image.fromarray(pixels)).hash.reshape(-1)
    return np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8")[0].astype(np.uint64)


THUMBNAIL = 32


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """(C, H, W) → (32, 32) float32 area-mean of the channel mean."""
    grey = np.nan_to_num(np.asarray(image, dtype=np.float32).mean(axis=0), nan=0.0)
    h, w = grey.shape
    if h % THUMBNAIL == 0 and w % THUMBNAIL == 0:
        return grey.reshape(THUMBNAIL, h // THUMBNAIL, THUMBNAIL, w // THUMBNAIL).mean(axis=(1, 3))
    rows = np.array_split(np.arange(h), THUMBNAIL)
    cols = np.array_split(np.arange(w), THUMBNAIL)
    return np.array([[grey[np.ix_(r, c)].mean() if len(r) and len(c) else 0.0 for c in cols] for r in rows],
                    dtype=np.float32)


def _near_pairs(hashes: np.ndarray, near_distance: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Index pairs (i < j) whose hashes differ in at most ``near_distance`` bits, block by block."""
    m = len(hashes)
    block = max(1, _BLOCK_ELEMENTS // max(m, 1))
    for start in range(0, m, block):
        stop = min(m, start + block)
        dist = _popcount64(hashes[start:stop, None] ^ hashes[None, :])
        close = dist <= near_distance
        # keep only j > i (the upper triangle) so each pair appears once and never with itself
        close &= np.arange(m)[None, :] > np.arange(start, stop)[:, None]
        ii, jj = np.nonzero(close)
        if len(ii):
            yield ii + start, jj


def find_duplicate_groups(
    tensors, near_distance: int, *, rows: Sequence[int] | None = None, max_mad: float = 0.015
) -> tuple[list[list[int]], list[list[int]]]:
    """Exact and near-duplicate groups among the images of ``tensors`` ((N, C, H, W), may be a memmap).

    Rows with identical pixel content (a hash of the bytes) form exact groups. Each distinct content
    gets a perceptual hash (``imagehash.phash`` of the channel-mean image converted to 8-bit); contents
    within ``near_distance`` bits whose 32×32 thumbnails differ by at most ``max_mad`` (mean absolute
    difference) are linked and the connected components with at least two distinct
    contents are the near groups (holding every row of those contents, so exact copies of a member are
    members too). A component made only of exact copies is not a near group. ``near_distance=-1``
    disables the near search. ``rows`` limits the search to those row numbers (default: all).

    Returns ``(exact_groups, near_groups)``: lists of sorted row lists of size >= 2, in order of their
    first row. The array is read in chunks, never whole.
    """
    n = len(tensors)
    if rows is None:
        wanted = np.arange(n)
    else:
        wanted = np.unique(np.asarray(rows, dtype=np.int64))
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= n):
            raise ValueError(f"rows out of range of the tensor array ({n} images)")
    near = near_distance >= 0
    row_bytes = max(1, int(np.prod(tensors.shape[1:])) * tensors.dtype.itemsize)
    chunk = max(1, _CHUNK_BYTES // row_bytes)

    content_of: dict[bytes, int] = {}  # digest -> content id
    content_rows: list[list[int]] = []
    content_hash: list[np.uint64] = []
    thumbs: list[np.ndarray] = []
    for start in range(0, len(wanted), chunk):
        picked = wanted[start : start + chunk]
        # contiguous slices read straight from the memmap; scattered rows one at a time
        if picked[-1] - picked[0] + 1 == len(picked):
            block = np.asarray(tensors[picked[0] : picked[-1] + 1])
        else:
            block = np.stack([np.asarray(tensors[r]) for r in picked])
        for r, image in zip(picked.tolist(), block):
            digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
            cid = content_of.get(digest)
            if cid is None:
                cid = content_of[digest] = len(content_rows)
                content_rows.append([])
                if near:
                    content_hash.append(_phash64(image))
                    thumbs.append(_thumbnail(image))
            content_rows[cid].append(r)

    exact = [sorted(rs) for rs in content_rows if len(rs) >= 2]
    near_groups: list[list[int]] = []
    if near and len(content_hash) >= 2:
        uf = _UnionFind(range(len(content_hash)))
        for ii, jj in _near_pairs(np.asarray(content_hash, dtype=np.uint64), near_distance):
            for i, j in zip(ii.tolist(), jj.tolist()):
                if float(np.abs(thumbs[i] - thumbs[j]).mean()) <= max_mad:
                    uf.union(i, j)
        for component in uf.components():
            if len(component) >= 2:
                near_groups.append(sorted(r for cid in component for r in content_rows[cid]))
    exact.sort()
    near_groups.sort()
    return exact, near_groups


# --------------------------------------------------------------------------- assignment


def _greedy(sizes: np.ndarray, strata: list, fractions: Sequence[float], rng: np.random.Generator,
            fixed: np.ndarray | None = None) -> np.ndarray:
    """Bin per unit: seeded shuffle, then per stratum largest-first to the bin furthest below target.

    Targets are in unit size (patients). The rounding deficit of each stratum carries into the next
    stratum's targets so the global fractions hold even with many small strata. Units with a bin in
    ``fixed`` (>= 0) keep it and count towards their stratum's targets; the others are dealt.
    """
    n_units = len(sizes)
    fr = np.asarray(fractions, dtype=np.float64)
    usable = fr > 0
    result = np.full(n_units, -1, dtype=np.int64)
    by_stratum: dict = defaultdict(list)
    for u in rng.permutation(n_units).tolist():
        by_stratum[strata[u]].append(u)
    stratum_total = {s: int(sizes[us].sum()) for s, us in by_stratum.items()}
    assigned = np.zeros(len(fr))
    processed = 0.0
    for s in sorted(by_stratum, key=lambda s: (-stratum_total[s], s)):
        units = sorted(by_stratum[s], key=lambda u: -sizes[u])  # stable: shuffle breaks ties
        total = stratum_total[s]
        target = fr * total + (fr * processed - assigned)
        current = np.zeros(len(fr))
        if fixed is not None:
            for u in units:
                if fixed[u] >= 0:
                    result[u] = fixed[u]
                    current[fixed[u]] += sizes[u]
            units = [u for u in units if fixed[u] < 0]
        for u in units:
            deficit = np.where(usable, target - current, -np.inf)
            b = int(np.argmax(deficit))
            current[b] += sizes[u]
            result[u] = b
        assigned += current
        processed += total
    return result


def _majority(values: list[tuple]) -> tuple:
    counts = Counter(values)
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def assign_splits(index: pd.DataFrame, params: SplitParams, groups: list[list[int]],
                  previous: pd.DataFrame | None = None) -> pd.DataFrame:
    """``index`` with a ``split`` column (train/val/test) and, when ``kfold >= 2``, a ``fold`` column.

    Pure. ``groups`` are duplicate groups of tensor row numbers (the ``row`` column); rows not in the
    index are ignored. Patients sharing a duplicate group (or a tensor row) are joined by union-find
    into one unit, so neither a patient nor a duplicate group spans two splits (or folds). Units are
    dealt by :func:`_greedy`, stratified by the unit's majority label (or (label, site)). Deterministic
    for a seed. ``previous`` (columns ``patient_key``, ``split`` and, with k folds, ``fold``): a unit
    whose patients were assigned before keeps that split (the majority's, if a duplicate group now
    joins patients of different splits); the result's ``moved`` column marks patients whose split
    changed, ``new`` those not in ``previous``.
    """
    missing = [c for c in ("row", "patient_key", "label") if c not in index.columns]
    if params.stratify_by_site and "site" not in index.columns:
        missing.append("site")
    if missing:
        raise ValueError(f"index is missing column(s) {missing}")
    out = index.copy()
    if out.empty:
        out["split"] = pd.Series(dtype=object)
        if params.kfold >= 2:
            out["fold"] = pd.Series(dtype=np.int64)
        return out

    patients = out["patient_key"].astype(str).tolist()
    rows = out["row"].astype(np.int64).tolist()
    labels = out["label"].astype(str).tolist()
    sites = out["site"].astype(str).tolist() if params.stratify_by_site else [""] * len(out)

    uf = _UnionFind(patients)
    patients_of_row: dict[int, list[str]] = defaultdict(list)
    for r, p in zip(rows, patients):
        patients_of_row[r].append(p)
    linked = list(groups) + [[r] for r, ps in patients_of_row.items() if len(ps) > 1]
    for group in linked:
        members = [p for r in group for p in patients_of_row.get(int(r), ())]
        for p in members[1:]:
            uf.union(members[0], p)

    units = sorted(uf.components())  # canonical order (sorted by first patient key)
    unit_of = {p: u for u, members in enumerate(units) for p in members}
    sizes = np.array([len(m) for m in units], dtype=np.int64)
    keys_per_unit: list[list[tuple]] = [[] for _ in units]
    for p, lab, site in zip(patients, labels, sites):
        keys_per_unit[unit_of[p]].append((lab, site) if params.stratify_by_site else (lab,))
    strata = [_majority(k) for k in keys_per_unit]

    fixed_bins = fixed_folds = None
    before_split: dict[str, str] = {}
    if previous is not None and len(previous):
        before = previous.assign(patient_key=previous["patient_key"].astype(str)).drop_duplicates("patient_key")
        before = before.set_index("patient_key")
        before_split = before["split"].astype(str).to_dict()
        fixed_bins = np.full(len(units), -1, dtype=np.int64)
        fixed_folds = np.full(len(units), -1, dtype=np.int64)
        for u, members in enumerate(units):
            known = [before_split[p] for p in members if p in before_split]
            if known:
                fixed_bins[u] = SPLITS.index(_majority([(k,) for k in known])[0])
                if params.kfold >= 2 and "fold" in before.columns:
                    folds_known = [int(before.at[p, "fold"]) for p in members
                                   if p in before.index and before_split[p] == SPLITS[fixed_bins[u]]]
                    fixed_folds[u] = _majority([(f,) for f in folds_known])[0] if folds_known else -1

    rng = np.random.default_rng(params.seed)
    bins = _greedy(sizes, strata, (params.train, params.val, params.test), rng, fixed_bins)
    row_unit = np.array([unit_of[p] for p in patients], dtype=np.int64)
    out["split"] = np.asarray(SPLITS, dtype=object)[bins[row_unit]]
    out["new"] = [p not in before_split for p in patients]
    out["moved"] = [p in before_split and before_split[p] != s for p, s in zip(patients, out["split"])]

    if params.kfold >= 2:
        k = params.kfold
        folds = np.full(len(units), -1, dtype=np.int64)
        dev = np.flatnonzero(bins != SPLITS.index("test"))
        if len(dev):
            folds[dev] = _greedy(sizes[dev], [strata[u] for u in dev], [1.0 / k] * k, rng,
                                 None if fixed_folds is None else np.where(fixed_folds[dev] < k, fixed_folds[dev], -1))
        out["fold"] = folds[row_unit]
    return out


def assignment_key(params: SplitParams) -> dict:
    """The params an assignment depends on: a previous splits.csv is kept only if these match."""
    return {"seed": params.seed, "fractions": [params.train, params.val, params.test],
            "stratify_by_site": params.stratify_by_site, "kfold": params.kfold}


def _previous_assignment(out_dir: Path, params: SplitParams) -> pd.DataFrame | None:
    """The previous splits.csv of ``out_dir`` if it may be kept (sticky, same assignment params)."""
    csv, summary = out_dir / "splits.csv", out_dir / "split_summary.json"
    if not params.sticky or not csv.exists() or not summary.exists():
        return None
    try:
        before = json.loads(summary.read_text()).get("assignment")
        previous = pd.read_csv(csv, dtype={"image_id": str, "patient_key": str})
    except (ValueError, OSError) as exc:
        log.warning("split: previous %s unreadable (%s): dealing every patient afresh", csv, exc)
        return None
    if before != assignment_key(params):
        log.info("split: previous assignment was made with %s, now %s: dealing every patient afresh",
                 before, assignment_key(params))
        return None
    if not {"patient_key", "split"} <= set(previous.columns):
        return None
    return previous


# --------------------------------------------------------------------------- stage


def _summarise(
    result: pd.DataFrame, exact: list[list[int]], near: list[list[int]], params: SplitParams
) -> SplitSummary:
    images = {s: int((result["split"] == s).sum()) for s in SPLITS}
    patients = {s: int(result.loc[result["split"] == s, "patient_key"].astype(str).nunique()) for s in SPLITS}
    labels: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        counts = result.loc[result["split"] == s, "label"].astype(str).value_counts()
        labels[s] = {str(k): int(v) for k, v in sorted(counts.items())}
    per_patient = result.groupby(result["patient_key"].astype(str))["split"].nunique()
    patients_of_row: dict[int, set[str]] = defaultdict(set)
    for r, p in zip(result["row"].astype(np.int64).tolist(), result["patient_key"].astype(str).tolist()):
        patients_of_row[r].add(p)
    dup_rows: set[int] = set()
    cross = 0
    for group in [*exact, *near]:
        in_index = [r for r in group if r in patients_of_row]
        dup_rows.update(in_index)
        if len(set().union(*(patients_of_row[r] for r in in_index))) > 1:
            cross += 1
    return SplitSummary(
        images=images,
        patients=patients,
        labels=labels,
        patients_in_multiple_splits=int((per_patient > 1).sum()),
        duplicate_groups_exact=len(exact),
        duplicate_groups_near=len(near),
        duplicate_images=len(dup_rows),
        cross_patient_duplicate_groups=cross,
        seed=params.seed,
        kfold=params.kfold,
        patients_kept=int(result.loc[~result["new"], "patient_key"].nunique()) if "new" in result else 0,
        patients_new=int(result.loc[result["new"], "patient_key"].nunique()) if "new" in result else 0,
        patients_moved=int(result.loc[result["moved"], "patient_key"].nunique()) if "moved" in result else 0,
        assignment=assignment_key(params),
    )


def _read_index(index_path: Path) -> pd.DataFrame:
    try:
        index = pd.read_parquet(index_path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError; a file it cannot read
        if isinstance(exc, FileNotFoundError):
            raise
        raise SplitInputError(f"{index_path}: not a readable Parquet index ({type(exc).__name__}); "
                              "rerun medtl preprocess") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in index.columns]
    if missing:
        raise SplitInputError(f"{index_path}: missing column(s) {', '.join(missing)}")
    if index.empty:
        raise SplitInputError(f"{index_path}: index is empty (no images to split)")
    if index["row"].isna().any():
        raise SplitInputError(f"{index_path}: column 'row' has missing values")
    row = pd.to_numeric(index["row"], errors="coerce")
    if row.isna().any() or not np.all(np.equal(np.mod(row.to_numpy(dtype=np.float64), 1), 0)):
        raise SplitInputError(f"{index_path}: column 'row' must hold integer row numbers")
    index = index.copy()
    index["row"] = row.astype(np.int64)
    for column in ("image_id", "patient_key", "label"):
        if index[column].isna().any():
            raise SplitInputError(f"{index_path}: column {column!r} has missing values")
    return index


def run(params: SplitParams, index_path: Path, tensors_path: Path, out_dir: Path) -> SplitSummary:
    """Split the preprocessed images by patient; write ``splits.csv`` and ``split_summary.json``."""
    index_path, tensors_path, out_dir = Path(index_path), Path(tensors_path), Path(out_dir)
    index = _read_index(index_path)
    try:
        tensors = np.load(tensors_path, mmap_mode="r")
    except (ValueError, EOFError) as exc:  # not an .npy array (empty, truncated, pickled objects)
        raise SplitInputError(f"{tensors_path}: not a readable .npy array ({exc}); rerun medtl preprocess") from exc
    if tensors.ndim != 4:
        raise SplitInputError(f"{tensors_path}: expected an (N, C, H, W) array, got shape {tensors.shape}")
    n = tensors.shape[0]
    bad = index["row"][(index["row"] < 0) | (index["row"] >= n)]
    if len(bad):
        raise SplitInputError(
            f"{index_path}: {len(bad)} row(s) out of range of {tensors_path} ({n} images), "
            f"e.g. {bad.head(3).tolist()}"
        )

    if params.near_duplicate_distance >= 0:
        log.info("split: hashing %d images (near-duplicate distance %d)", index["row"].nunique(),
                 params.near_duplicate_distance)
    exact, near = find_duplicate_groups(tensors, params.near_duplicate_distance, rows=index["row"].tolist(),
                                        max_mad=params.near_duplicate_max_mad)
    result = assign_splits(index, params, [*exact, *near], previous=_previous_assignment(out_dir, params))
    summary = _summarise(result, exact, near, params)
    if summary.patients_moved:
        log.warning("split: %d previously assigned patient(s) moved split: a new duplicate group joined "
                    "patients of different splits", summary.patients_moved)
    if summary.patients_in_multiple_splits:
        raise RuntimeError(f"split: {summary.patients_in_multiple_splits} patient(s) span several splits")

    columns = list(CSV_COLUMNS) + (["fold"] if params.kfold >= 2 else [])
    table = result.assign(_row=result["row"]).sort_values(["image_id", "_row"], kind="mergesort")[columns]
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # what a killed run left
    atomic_write_text(out_dir / "splits.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / "split_summary.json", json.dumps(asdict(summary), indent=2, sort_keys=True) + "\n")

    log.info(
        "split: %d images / %d patients -> train %d/%d, val %d/%d, test %d/%d (images/patients)",
        len(result), sum(summary.patients.values()),
        summary.images["train"], summary.patients["train"], summary.images["val"], summary.patients["val"],
        summary.images["test"], summary.patients["test"],
    )
    log.info("split: %d patients kept their previous split, %d new patients dealt, %d moved",
             summary.patients_kept, summary.patients_new, summary.patients_moved)
    log.info(
        "split: %d exact + %d near duplicate groups, %d images, %d cross-patient groups; %d patients in several splits",
        summary.duplicate_groups_exact, summary.duplicate_groups_near, summary.duplicate_images,
        summary.cross_patient_duplicate_groups, summary.patients_in_multiple_splits,
    )
    return summary

"""Data shared by train, evaluate, promote and predict: the preprocessed images of each split as datasets.

:func:`load_splits` joins the preprocess stage's ``index.parquet`` with the split stage's
``splits.csv`` (labels become class indices; ``train.fraction`` keeps a nested, class-stratified
subset of the training patients); :func:`make_dataset` serves one split's rows of the memory-mapped
``tensors.npy``, with seeded per-item augmentation for training; :func:`data_version` hashes the
inputs a model depends on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.errors import MedtlError
from pipeline.io_utils import sha256_file
from pipeline.params import check, param

#: ``train.classes: auto``: the sorted distinct labels of the preprocessed images
AUTO_CLASSES = "auto"


@dataclass(frozen=True)
class AugmentParams:
    """Random augmentation of one modality (MONAI transforms on (C, H, W) in [0, 1]).

    Attributes:
        prob: probability of each random transform, in [0, 1].
        flip: left-right flips (off for chest radiographs: laterality is anatomy).
        rotate_deg: maximum in-plane rotation (degrees), in [0, 180].
        zoom: maximum relative zoom in or out, in [0, 1).
        intensity: maximum relative intensity scale and shift, and contrast (gamma) change, in [0, 1].
    """

    prob: float = param(0.5, min=0, max=1)
    flip: bool = True
    rotate_deg: float = param(10.0, min=0, max=180)
    zoom: float = param(0.1, min=0, max=1, max_exclusive=True)
    intensity: float = param(0.1, min=0, max=1)

    def __post_init__(self) -> None:
        check(self, "train.augment")


@dataclass(frozen=True)
class SplitData:
    """Rows of ``tensors.npy`` per split, with integer labels and modalities."""

    tensors: Path
    rows: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    modalities: dict[str, np.ndarray]
    patients: dict[str, int]
    image_shape: tuple[int, ...]
    train_pool_patients: int | None = None  # train patients before ``fraction`` took its subset
    classes: tuple[str, ...] = ()  # what the label indices index (``train.classes``, ``auto`` resolved)


def train_subset(patient_labels: pd.Series, fraction: float, seed: int = 0) -> set[str]:
    """The training patients kept at ``fraction``: nested across fractions and stratified by class.

    Within each class, patients are ranked by a hash of (salt, ``seed``, patient key) and the first
    ``ceil(fraction * n)`` are kept (at least one per class present). The ranking does not depend on
    ``fraction``, so for one seed the 10 % subset lies inside the 25 % one, and so on up to all
    patients; class balance is kept to within one patient per class.

    Args:
        patient_labels: one class index per training patient (index: ``patient_key``), e.g. the
            highest label among its images (for two classes: positive if any image is).
        fraction: share of each class's patients to keep, in (0, 1].
        seed: ``train.fraction_seed``: another seed draws other (still nested) subsets.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train.fraction: {fraction} is not in (0, 1]")
    keep: set[str] = set()
    for _, group in patient_labels.groupby(patient_labels, sort=True):
        keys = sorted(group.index.astype(str),
                      key=lambda k: hashlib.blake2b(f"medtl-fraction:{seed}:{k}".encode(), digest_size=8).digest())
        keep.update(keys[:max(1, math.ceil(fraction * len(keys) - 1e-9))])
    return keep


class DataError(MedtlError, ValueError):
    """The preprocessed images or the split assignment cannot be trained (or evaluated) on."""


class UnknownLabelsError(DataError):
    """Labels of the preprocessed images that are not in ``train.classes``."""


def _read_input(path: Path, read, made_by: str):
    """``read(path)``; a file that exists but cannot be read as what it should be is a :class:`DataError`."""
    try:
        return read(path)
    except FileNotFoundError:
        raise
    except (ValueError, EOFError, OSError) as exc:  # pyarrow's ArrowInvalid and pandas' EmptyDataError: ValueErrors
        raise DataError(f"{path}: not readable ({type(exc).__name__}); rerun {made_by}") from exc


def load_splits(images_dir: Path, splits_csv: Path, classes: tuple[str, ...] | str, *, fraction: float = 1.0,
                fraction_seed: int = 0, required: tuple[str, ...] = ("train", "val")) -> SplitData:
    """Join the preprocess index with the split assignment; labels become indices into ``classes``.

    ``classes`` ``auto`` takes the sorted distinct labels of the index (every split), recorded in the
    result's ``classes``. ``fraction`` < 1 keeps only a nested, class-stratified subset of the TRAINING
    patients (:func:`train_subset`); validation and test rows are never touched. ``required``: the
    splits that must not be empty (external validation has a test split only).

    Raises:
        UnknownLabelsError: a label is not in ``classes`` (or ``auto`` finds fewer than two).
        DataError: images without a split, or an empty train or validation split.
    """
    index_path = images_dir / "index.parquet"
    index = _read_input(index_path, pd.read_parquet, "medtl preprocess")
    splits = _read_input(splits_csv, lambda p: pd.read_csv(p, dtype={"image_id": str}), "medtl split")
    missing = [c for c in ("image_id", "split") if c not in splits.columns]
    if missing:
        raise DataError(f"{splits_csv}: missing column(s) {', '.join(missing)}; rerun medtl split")
    frame = index.merge(splits[["image_id", "split"]], on="image_id", how="inner", validate="one_to_one")
    if len(frame) != len(index):
        raise DataError(f"{splits_csv}: {len(index) - len(frame)} of {len(index)} preprocessed images have no split; "
                        "rerun medtl split")
    found = sorted(set(frame["label"].astype(str)))
    if classes == AUTO_CLASSES:
        if len(found) < 2:
            raise UnknownLabelsError(f"train.classes: auto found only the label(s) {found} in {index_path}; "
                                     "a classifier needs two or more")
        classes = tuple(found)
    classes = tuple(classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UnknownLabelsError(
            f"labels {unknown} in {index_path} are not in train.classes {list(classes)} (labels found: {found}); "
            "set train.classes in params.yaml to these labels (two classes: negative first, positive last) or to auto")
    frame = frame.assign(label=frame["label"].astype(str))
    tensors = images_dir / "tensors.npy"
    shape = _read_input(tensors, lambda p: np.load(p, mmap_mode="r"), "medtl preprocess").shape
    out: dict[str, dict[str, np.ndarray]] = {"rows": {}, "labels": {}, "modalities": {}}
    patients = {}
    train_rows = frame["split"] == "train"
    pool = int(frame.loc[train_rows, "patient_key"].nunique())
    if fraction < 1:
        label_index = frame.loc[train_rows, "label"].map({c: i for i, c in enumerate(classes)})
        patient_labels = label_index.groupby(frame.loc[train_rows, "patient_key"]).max()
        kept = train_subset(patient_labels, fraction, fraction_seed)
        frame = frame[~train_rows | frame["patient_key"].astype(str).isin(kept)]
    for name in ("train", "val", "test"):
        part = frame[frame["split"] == name].sort_values("row")
        out["rows"][name] = part["row"].to_numpy(np.int64)
        out["labels"][name] = part["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
        out["modalities"][name] = part["modality"].astype(str).to_numpy()
        patients[name] = int(part["patient_key"].nunique())
    for name in required:
        if len(out["rows"][name]) == 0:
            raise DataError(f"{splits_csv}: the {name} split is empty")
    return SplitData(tensors, out["rows"], out["labels"], out["modalities"], patients, tuple(shape[1:]), pool,
                     classes)


def _augmentation(p: AugmentParams):
    from monai import transforms as T

    steps = []
    if p.flip:
        steps.append(T.RandFlipd("image", prob=p.prob, spatial_axis=1))
    if p.rotate_deg or p.zoom:
        # rotation and zoom in one resampling: half the cost of two, and one interpolation blur
        steps.append(T.RandAffined("image", prob=p.prob, rotate_range=math.radians(p.rotate_deg),
                                   scale_range=p.zoom, padding_mode="zeros"))
    if p.intensity:
        steps += [T.RandScaleIntensityd("image", factors=p.intensity, prob=p.prob),
                  T.RandShiftIntensityd("image", offsets=p.intensity, prob=p.prob),
                  T.RandAdjustContrastd("image", gamma=(1 - p.intensity, 1 + p.intensity), prob=p.prob)]
    return T.Compose(steps)


def make_dataset(data: SplitData, split: str, augment_for: Callable[[str], AugmentParams] | None = None,
                 seed: int = 0):
    """A MONAI dataset over one split's rows of the memory-mapped tensor file.

    Items are ``{"image": (C, H, W) float32 tensor, "label": int}``. The array is opened lazily per
    process and never copied whole: each item reads its own row.

    Args:
        augment_for: a modality's random augmentation (``TrainParams.augment_for``); None: none
            (validation, test, prediction).
        seed: with the epoch (the dataset's ``epoch``, set by the training loop) and the row, seeds
            each item's augmentation.
    """
    from monai.data import Dataset
    from monai.transforms import Compose, EnsureTyped

    deterministic = Compose([EnsureTyped("image", dtype=torch.float32, track_meta=False)])
    random_by_modality = ({m: _augmentation(augment_for(m)) for m in set(data.modalities[split])}
                          if augment_for is not None else {})

    class _Rows(Dataset):
        epoch = 0
        _array = None

        def __getstate__(self):  # workers reopen the memmap rather than receive a pickled copy
            state = self.__dict__.copy()
            state["_array"] = None
            return state

        def _transform(self, index: int):
            if self._array is None:
                self._array = np.load(data.tensors, mmap_mode="r")
            item = self.data[index]
            out = deterministic({"image": np.array(self._array[item["row"]], dtype=np.float32), "label": item["label"]})
            augment = random_by_modality.get(item["modality"])
            if augment is not None:
                # Seeded per (seed, epoch, item): the same augmentation whatever the worker count,
                # sampler order or resume point.
                augment.set_random_state(seed=derived_seed(seed, self.epoch, item["row"]))
                out = augment(out)
                out["image"] = torch.as_tensor(out["image"]).clamp_(0, 1)
            return out

    records = [{"row": int(r), "label": int(y), "modality": m}
               for r, y, m in zip(data.rows[split], data.labels[split], data.modalities[split])]
    return _Rows(records)


def derived_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (e.g. seed, epoch, row) and on nothing else."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def data_version(images_dir: Path, splits_csv: Path) -> dict[str, str]:
    """SHA-256 of every input the model depends on (the card's data version)."""
    files = {"tensors": images_dir / "tensors.npy", "index": images_dir / "index.parquet", "splits": splits_csv}
    return {name: sha256_file(path) for name, path in files.items()}

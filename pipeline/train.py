"""The ``train`` stage: fine-tune an ImageNet-pretrained MONAI backbone on the preprocessed images.

Inputs are the preprocess stage's ``tensors.npy`` (N, C, H, W) float16 in [0, 1] with its
``index.parquet`` and the split stage's ``splits.csv``. Outputs:

- ``model.pt``: the best-validation-AUC weights with backbone name, classes and input spec
  (:func:`pipeline.models.load_model` rebuilds it);
- ``model_card.json``: backbone, weights source and hash, strategy, params, data fingerprint, input
  spec, validation metrics, code and data versions, intended use;
- ``train_metrics.json`` (DVC metric) and a DVCLive directory of per-epoch curves (DVC plots);
- ``checkpoints/last.pt``: the whole training state after every epoch, written atomically. A killed
  run resumes from it and ends where an uninterrupted run would: every epoch's randomness (sample
  order, augmentation, dropout) is seeded from (seed, epoch), not carried over from earlier epochs.

Transfer strategies (``train.strategy``): ``feature_extraction`` (backbone frozen, BatchNorm
statistics included; only the new head learns), ``finetune`` (everything learns, the backbone at
``backbone_lr_mult`` × the head's learning rate, after a warm-up) and ``gradual`` (the head first,
then backbone stages unfrozen from the top, one more every ``gradual_every`` epochs). Training from
scratch is ``model.pretrained: none`` with ``finetune`` (the backbone then learns at the head's rate).
A pretrained backbone keeps its ImageNet BatchNorm statistics while it trains (``train.batchnorm:
frozen``, the default): MONAI's EfficientNet keeps TensorFlow's BatchNorm momentum 0.01, so in plain
train mode the layers normalise with batch statistics while the running statistics used at evaluation
barely move, and the head learns on features it never sees again (measured in docs/design.md). A
network from scratch recomputes its statistics after every epoch instead. ``train.min_steps`` raises the
epoch count of a small training set so that every run gets at least that many optimiser steps.
``train.fraction`` < 1 trains on a nested, class-stratified subset of the training patients (the
transfer-learning study's learning curves); validation and test stay whole.

Runs on one device, or under ``torchrun --nproc_per_node=N`` with DDP (NCCL on GPUs, gloo on CPU):
each process takes a shard of every epoch; all of them validate on the whole validation split, so
they take the same early-stopping decisions; rank 0 writes the outputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline import models
from pipeline.errors import MedtlError
from pipeline.io_utils import atomic_write_bytes, atomic_write_text, remove_stale_temps
from pipeline.params import ParamsError, check, param, section

log = logging.getLogger(__name__)

STRATEGIES = ("feature_extraction", "finetune", "gradual")
DEVICES = ("auto", "cpu", "cuda")
#: BatchNorm statistics of a pretrained backbone while it trains, and why each mode does what it does (the
#: model card carries the sentence); a network from scratch always recalibrates. ``batch`` is PyTorch's plain
#: train mode: MONAI's EfficientNet keeps TensorFlow's momentum 0.01, so the statistics evaluation uses barely
#: move and what the head learns on is not what it sees at evaluation.
BATCHNORM_WHY = {
    "frozen": "pretrained BatchNorm running statistics kept (layers in eval mode while training; affine weights "
              "learn): training and evaluation normalise alike",
    "recalibrate": "running statistics recomputed on the training images after every epoch",
    "batch": "batch statistics while training, running statistics updated with the network's momentum",
}
BATCHNORM_MODES = tuple(BATCHNORM_WHY)
CHECKPOINT_FORMAT = "medtl-train-checkpoint/1"
INTENDED_USE = (
    "Research and retraining pipeline output: a model to be evaluated against the site's held-out test split "
    "and its current champion before any use. Not a medical device; not for diagnosis without a qualified "
    "reader and local validation.")


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


#: ``train.classes: auto``: the sorted distinct labels of the preprocessed images
AUTO_CLASSES = "auto"


@dataclass(frozen=True)
class TrainParams:
    """``train`` section of params.yaml (see the comments there).

    Attributes:
        classes: the label values in order, two or more (for two: negative first, the positive class
            last); integers are read as their text (labels ``0``/``1``). ``auto``: the sorted distinct
            labels of the preprocessed images (for ``0``/``1``: 1 positive; for names, the
            alphabetically last is positive, so name them explicitly).
        workers: DataLoader worker processes, >= -1: -1 = automatic (0 on CPU, min(8, cores) on a GPU),
            0 = load in the training process.
        patience: early stopping after this many epochs without a validation AUC gain, >= 0 (0 = off).
        min_steps: at least this many optimiser steps (more epochs for a small training set), >= 0.
        fraction: share of the training patients used, in (0, 1].
    """

    classes: tuple[str | int, ...] | str = ("normal", "lesion")
    strategy: str = param("finetune", choices=STRATEGIES, hint="training from scratch is model.pretrained: none")
    epochs: int = param(10, min=1)
    batch_size: int = param(16, min=1)
    lr: float = param(1e-3, min=0, min_exclusive=True, max=10)
    backbone_lr_mult: float = param(0.1, min=0, max=10)
    weight_decay: float = param(1e-4, min=0, max=1)
    warmup_epochs: float = param(1.0, min=0)
    gradual_head_epochs: int = param(1, min=0)
    gradual_every: int = param(1, min=1)
    class_balance: str = param("weights", choices=("weights", "sampler", "none"))
    patience: int = param(4, min=0)
    seed: int = param(0, min=0)
    amp: str = param("auto", choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = True
    compile: bool = False
    workers: int = param(-1, min=-1)
    device: str = param("auto", choices=DEVICES)
    augment: dict[str, dict | None] = param({"default": {}})
    fraction: float = param(1.0, min=0, min_exclusive=True, max=1)
    fraction_seed: int = param(0, min=0)
    batchnorm: str = param("frozen", choices=BATCHNORM_MODES)
    min_steps: int = param(0, min=0)

    def __post_init__(self):
        check(self, "train")
        if isinstance(self.classes, str):
            if self.classes != AUTO_CLASSES:
                raise ParamsError(f"train.classes: must be a list of two or more labels, or {AUTO_CLASSES}, "
                                  f"got {self.classes!r}")
        else:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes) or not all(self.classes):
                raise ParamsError(f"train.classes: need two or more distinct labels (or {AUTO_CLASSES}), "
                                  f"got {list(self.classes)}")
        for modality, values in self.augment.items():
            merged = {**(self.augment.get("default") or {}), **(values or {})}
            section(AugmentParams, merged, where=f"train.augment.{modality}")

    @property
    def auto_classes(self) -> bool:
        """``classes: auto``: the labels found decide (:func:`load_splits`)."""
        return self.classes == AUTO_CLASSES

    def augment_for(self, modality: str) -> AugmentParams:
        """The augmentation of ``modality``: its own entry over ``default`` over the dataclass defaults."""
        values = dict(self.augment.get("default") or {})
        values.update(self.augment.get(modality) or {})
        return AugmentParams(**values)


@dataclass
class TrainSummary:
    epochs_run: int
    best_epoch: int
    best_val_auc: float
    stopped_early: bool
    resumed_from_epoch: int
    train_images: int
    val_images: int
    images_per_s: float
    wall_s: float
    device: str
    world_size: int
    ddp_weights_agree: bool | None
    train_patients: int = 0
    train_fraction: float = 1.0
    epochs_planned: int = 0
    batchnorm: str = ""


# --------------------------------------------------------------------------------------------- data


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
                fraction_seed: int = 0) -> SplitData:
    """Join the preprocess index with the split assignment; labels become indices into ``classes``.

    ``classes`` ``auto`` takes the sorted distinct labels of the index (every split), recorded in the
    result's ``classes``. ``fraction`` < 1 keeps only a nested, class-stratified subset of the TRAINING
    patients (:func:`train_subset`); validation and test rows are never touched.

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
    for name in ("train", "val"):
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


def make_dataset(data: SplitData, split: str, params: TrainParams | None):
    """A MONAI dataset over one split's rows of the memory-mapped tensor file.

    Items are ``{"image": (C, H, W) float32 tensor, "label": int}``. ``params`` None: no
    augmentation (validation/test). The array is opened lazily per process and never copied whole:
    each item reads its own row.
    """
    from monai.data import Dataset
    from monai.transforms import Compose, EnsureTyped

    deterministic = Compose([EnsureTyped("image", dtype=torch.float32, track_meta=False)])
    random_by_modality = ({m: _augmentation(params.augment_for(m)) for m in set(data.modalities[split])}
                          if params is not None else {})
    seed = params.seed if params is not None else 0

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


# ------------------------------------------------------------------------------------------- device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the ``torchrun`` process group when there is one (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dist = Dist(int(os.environ.get("RANK", "0")), world, local_rank)
    return dist, device


def amp_dtype(params: TrainParams, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 (with a gradient scaler) otherwise; off on CPU by default."""
    if params.amp == "off" or (params.amp == "auto" and device.type != "cuda"):
        return None
    if params.amp == "fp16" or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


# ---------------------------------------------------------------------------------------- strategy


def trainable_stages(params: TrainParams, epoch: int, n_stages: int) -> int:
    """How many backbone stages (counted from the top) learn in ``epoch`` (0-based)."""
    if params.strategy == "feature_extraction":
        return 0
    if params.strategy == "finetune":
        return n_stages
    if epoch < params.gradual_head_epochs:
        return 0
    return min(n_stages, (epoch - params.gradual_head_epochs) // max(1, params.gradual_every) + 1)


def set_trainable(model: models.Classifier, stages: list[nn.Module], n_trainable: int) -> None:
    """Freeze all but the top ``n_trainable`` stages; frozen stages also keep their BatchNorm statistics.

    Call after ``model.train()``: frozen stages are put back in eval mode.
    """
    cut = len(stages) - n_trainable
    for i, stage in enumerate(stages):
        frozen = i < cut
        for p in stage.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            stage.eval()


def batchnorm_mode(params: TrainParams, model_params: models.ModelParams) -> str:
    """How BatchNorm statistics behave while training (:data:`BATCHNORM_MODES`).

    A network trained from scratch has no statistics worth keeping: it always recalibrates. A pretrained
    backbone follows ``train.batchnorm``.
    """
    return "recalibrate" if model_params.pretrained == "none" else params.batchnorm


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalises with (and keeps) its running statistics.

    Call after ``model.train()``. The layers' affine weights still learn where they require gradients; only
    the statistics stop following the batches, so training and evaluation see the same normalisation.
    """
    for module in _batchnorms(model):
        module.eval()


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def planned_epochs(params: TrainParams, steps_per_epoch: int) -> int:
    """``train.epochs``, raised where needed so the run takes at least ``train.min_steps`` optimiser steps.

    A small training subset has few batches per epoch: without a floor, 10 % of the data trains for a
    tenth of the steps, and a comparison of strategies across data fractions measures the step count.
    Early stopping (``train.patience``) still ends a run that stopped improving, once it has had its
    ``min_steps``.
    """
    if params.min_steps <= 0:
        return params.epochs
    return max(params.epochs, math.ceil(params.min_steps / max(1, steps_per_epoch)))


def backbone_lr_mult(params: TrainParams, model_params: models.ModelParams) -> float:
    """The backbone's learning rate relative to the head's.

    ``train.backbone_lr_mult`` protects pretrained features from large early updates; a network
    trained from scratch (``model.pretrained: none``) has nothing to protect, so it learns at the full rate.
    """
    return 1.0 if model_params.pretrained == "none" else params.backbone_lr_mult


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------- loop


def derived_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (e.g. seed, epoch, row) and on nothing else."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    torch.manual_seed(derived_seed(seed, epoch, rank))


def train_step(net: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> float:
    """One optimiser step (autocast to ``dtype`` when set, gradient scaling for fp16); returns the loss."""
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = loss_fn(net(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    return float(roc_auc_score(labels, probs[:, present] / probs[:, present].sum(1, keepdims=True),
                               multi_class="ovr", labels=present))


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
            channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) float32 and labels (N,) of every item of ``loader``, in order."""
    model.eval()
    probs, labels = [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        probs.append(logits.float().softmax(1).cpu().numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(probs), np.concatenate(labels)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, device: torch.device, channels_last: bool) -> None:
    """Set every BatchNorm's running statistics to their average over ``loader`` with the current weights.

    A network trained from scratch needs it: MONAI's EfficientNet keeps TF's BatchNorm momentum 0.01,
    so after a short run the running statistics are still mostly their initial (0, 1), far from the
    activations of the trained weights, and evaluation-mode outputs shrink to one constant for every
    image (validation AUC exactly 0.5). Pretrained networks start from ImageNet statistics instead.
    """
    norms = _batchnorms(model)
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def _class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return len(labels) / (n_classes * np.maximum(counts, 1))


def _config_hash(params: TrainParams, model_params: models.ModelParams, data_hash: str) -> str:
    blob = json.dumps({"train": asdict(params), "model": asdict(model_params), "data": data_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def data_version(images_dir: Path, splits_csv: Path) -> dict[str, str]:
    """SHA-256 of every input the model depends on (the card's data version)."""
    files = {"tensors": images_dir / "tensors.npy", "index": images_dir / "index.parquet", "splits": splits_csv}
    return {name: models.sha256_file(path) for name, path in files.items()}


def code_version() -> dict[str, str | bool | None]:
    from importlib.metadata import PackageNotFoundError, version

    import monai

    try:
        medtl_version = version("medtl")
    except PackageNotFoundError:
        medtl_version = None

    commit, dirty = None, None
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "pipeline"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"medtl": medtl_version, "git_commit": commit, "pipeline_modified": dirty, "torch": torch.__version__,
            "monai": monai.__version__, "python": platform.python_version()}


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path, config_hash: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a checkpoint we cannot read is not worth failing the run for
        log.warning("checkpoint %s unreadable (%s): training from the start", path, exc)
        return None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("config_hash") != config_hash:
        log.info("checkpoint %s is from other params or data: training from the start", path)
        return None
    return state


def run(params: TrainParams, model_params: models.ModelParams, images_dir: Path, splits_csv: Path,
        out_dir: Path, *, checkpoint_dir: Path | None = None, live_dir: Path | None = None,
        stop_after_epoch: int | None = None, progress: bool = True) -> TrainSummary:
    """Train, validate every epoch, keep the best-validation-AUC model and write the outputs.

    Args:
        params, model_params: the ``train`` and ``model`` sections.
        images_dir: preprocess output (``tensors.npy``, ``index.parquet``, ``fingerprint.json``).
        splits_csv: split output (``image_id``, ``split``).
        out_dir: receives ``model.pt``, ``model_card.json``, ``train_metrics.json``.
        checkpoint_dir: where ``last.pt`` persists between runs (default ``out_dir/checkpoints``).
        live_dir: DVCLive directory (default ``out_dir/live``).
        stop_after_epoch: stop (as if killed) after this many epochs, leaving only the checkpoint;
            for tests of resume.
        progress: show a progress bar per epoch.
    """
    from monai.data import DataLoader
    from tqdm import tqdm

    started = time.perf_counter()
    out_dir, images_dir = Path(out_dir), Path(images_dir)
    checkpoint_dir = Path(checkpoint_dir or out_dir / "checkpoints")
    live_dir = Path(live_dir or out_dir / "live")
    for folder in (out_dir, checkpoint_dir):
        remove_stale_temps(folder)  # what a killed run left
    dist, device = init_distributed(params.device)
    if dist.world_size > 1 and params.class_balance == "sampler":
        raise ParamsError("train.class_balance: sampler is not supported under DDP (torchrun); use weights")
    data = load_splits(images_dir, Path(splits_csv), params.classes, fraction=params.fraction,
                       fraction_seed=params.fraction_seed)
    classes_setting = params.classes
    if params.auto_classes:  # from here on the classes found: model, card, config hash
        params = replace(params, classes=data.classes)
        if dist.main:
            log.info("train.classes auto: %s (positive class %s)", list(data.classes), data.classes[-1])
    versions = data_version(images_dir, Path(splits_csv))
    config_hash = _config_hash(params, model_params, versions["tensors"] + versions["index"] + versions["splits"])
    dtype = amp_dtype(params, device)
    n_classes = len(params.classes)

    torch.manual_seed(params.seed)  # the new head's initial weights (and every weight from scratch)
    model, weights = models.build_model(model_params, n_classes)
    scratch = model_params.pretrained == "none"
    if scratch:
        # A fair baseline: MONAI's random init gives logits of SD ~9 in training mode (a first loss of
        # 5-10); start the head near uniform, as a pretrained model's new head does.
        models.init_head(model.net, models.backbone(model_params.backbone))
    stages = models.backbone_stages(model, model_params.backbone)
    head = models.head_parameters(model, model_params.backbone)
    head_ids = {id(p) for p in head}
    model.to(device)
    if params.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if id(p) not in head_ids],
          "lr": params.lr * backbone_lr_mult(params, model_params), "name": "backbone"},
         {"params": head, "lr": params.lr, "name": "head"}], weight_decay=params.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    weights_t = (torch.tensor(_class_weights(data.labels["train"], n_classes), dtype=torch.float32, device=device)
                 if params.class_balance == "weights" else None)
    loss_fn = nn.CrossEntropyLoss(weight=weights_t)

    train_ds = make_dataset(data, "train", params)
    val_ds = make_dataset(data, "val", None)
    workers = params.workers if params.workers >= 0 else (0 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    loader_args = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    val_loader = DataLoader(val_ds, batch_size=params.batch_size * 2, shuffle=False, **loader_args)
    bn_mode = batchnorm_mode(params, model_params)
    # recalibrate: BatchNorm statistics recomputed on the training images after each epoch (see below)
    calibration_loader = (DataLoader(make_dataset(data, "train", None), batch_size=params.batch_size, shuffle=False,
                                     **loader_args) if bn_mode == "recalibrate" else None)
    steps_per_epoch = math.ceil(len(train_ds) / (params.batch_size * dist.world_size))
    epochs = planned_epochs(params, steps_per_epoch)
    total_steps = steps_per_epoch * epochs
    warmup_steps = int(round(params.warmup_epochs * steps_per_epoch)) if params.strategy != "feature_extraction" else 0

    checkpoint_path = checkpoint_dir / "last.pt"
    state = _load_checkpoint(checkpoint_path, config_hash)
    history: list[dict] = []
    best = {"auc": -math.inf, "epoch": -1, "state": None}
    bad_epochs, start_epoch, step = 0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
        start_epoch, step = state["epoch"], state["step"]
        if dist.main:
            log.info("resuming from %s after epoch %d", checkpoint_path, start_epoch)
    resumed_from = start_epoch
    stopped_early = state is not None and state.get("stopped_early", False)

    live = _open_live(live_dir, history) if dist.main else None
    forward = torch.compile(model) if params.compile else model
    ddp_model, ddp_trainable = None, None
    epoch = start_epoch
    if dist.main and epochs > params.epochs:
        log.info("train.min_steps %d: %d epochs of %d steps instead of %d", params.min_steps, epochs,
                 steps_per_epoch, params.epochs)
    while epoch < epochs and not stopped_early:
        _seed_everything(params.seed, epoch, dist.rank)
        train_ds.epoch = epoch
        n_trainable = trainable_stages(params, epoch, len(stages))
        model.train()
        set_trainable(model, stages, n_trainable)
        if bn_mode == "frozen":
            freeze_batchnorm_statistics(model)
        if dist.world_size > 1 and ddp_trainable != n_trainable:
            # DDP registers the parameters that need gradients when it is built: rebuild on unfreezing.
            ddp_model = nn.parallel.DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None)
            ddp_trainable = n_trainable
        net = ddp_model if ddp_model is not None else forward
        loader = DataLoader(train_ds, batch_size=params.batch_size, drop_last=False,
                            **_train_sampling(params, data, epoch, dist), **loader_args)
        epoch_start, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and dist.main),
                   leave=False, unit="batch", mininterval=0.1 if sys.stderr.isatty() else 30)
        for batch in bar:
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if params.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            factor = lr_factor(step, total_steps, warmup_steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            loss = train_step(net, loss_fn, optimizer, scaler, x, y, dtype)
            step += 1
            seen += len(y)
            loss_sum += loss * len(y)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        train_s = time.perf_counter() - epoch_start
        if calibration_loader is not None:
            recalibrate_batchnorm(model, calibration_loader, device, params.channels_last)
        if dist.world_size > 1:
            # DDP syncs BatchNorm statistics at the start of each forward, so the last batch leaves
            # them differing between processes: take rank 0's, so all validate the same model.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)
        probs, labels = predict(forward, val_loader, device, dtype, params.channels_last)
        val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-7)),
                                                torch.from_numpy(labels)))
        val_auc = _auc(labels, probs)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_loss": val_loss,
                  "val_auc": val_auc, "val_accuracy": float((probs.argmax(1) == labels).mean()),
                  "lr_head": base_lrs[-1] * factor, "trainable_stages": n_trainable,
                  "train_images_per_s": seen * dist.world_size / train_s,
                  "epoch_s": time.perf_counter() - epoch_start}
        # training wall time so far (train + validate, summed over epochs; set-up excluded): the time
        # a strategy needs to reach a given validation AUC, comparable across resumed runs
        record["elapsed_s"] = (history[-1].get("elapsed_s", 0.0) if history else 0.0) + record["epoch_s"]
        history.append(record)
        # Select on AUC; a single-class validation split has none, so fall back to the loss.
        score = val_auc if not math.isnan(val_auc) else -val_loss
        if score > best["auc"]:
            best = {"auc": score, "epoch": epoch + 1,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        epoch += 1
        # early stopping waits for train.min_steps: the first epochs of a small subset are a handful of
        # steps, and their noisy validation AUC must not end the run before it had its budget
        stopped_early = (params.patience > 0 and bad_epochs >= params.patience and epoch < epochs
                         and step >= params.min_steps)
        if dist.main:
            log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %.4f, %.1f images/s%s", epoch,
                     epochs, record["train_loss"], val_loss, val_auc, record["train_images_per_s"],
                     " (best)" if best["epoch"] == epoch else "")
            _log_live(live, record)
            _save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "config_hash": config_hash, "epoch": epoch, "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "history": history, "best": best, "bad_epochs": bad_epochs, "stopped_early": stopped_early})
        if dist.world_size > 1:
            torch.distributed.barrier()
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return None  # type: ignore[return-value]
        if stopped_early and dist.main:
            log.info("early stop: no validation AUC gain in %d epochs", params.patience)

    agree = _weights_agree(model) if dist.world_size > 1 else None
    model.load_state_dict(best["state"])
    wall = time.perf_counter() - started
    rate = float(np.median([h["train_images_per_s"] for h in history])) if history else float("nan")
    summary = TrainSummary(len(history), best["epoch"], _best_auc(history, best["epoch"]), stopped_early, resumed_from,
                           len(data.rows["train"]), len(data.rows["val"]), rate, wall,
                           _device_name(device), dist.world_size, agree, data.patients["train"], params.fraction,
                           epochs, bn_mode)
    if dist.main:
        _write_outputs(out_dir, model, params, model_params, weights, data, images_dir, versions, history,
                       summary, dtype, classes_setting=classes_setting)
        if live is not None:
            live.end()
    if dist.world_size > 1:
        torch.distributed.barrier()
    return summary


def _train_sampling(params: TrainParams, data: SplitData, epoch: int, dist: Dist) -> dict:
    """Sampler/shuffle arguments for one epoch's loader, seeded from (seed, epoch)."""
    generator = torch.Generator().manual_seed(derived_seed(params.seed, epoch))
    if dist.world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(range(len(data.rows["train"])), num_replicas=dist.world_size, rank=dist.rank,
                                     shuffle=True, seed=params.seed)
        sampler.set_epoch(epoch)
        return {"sampler": sampler}
    if params.class_balance == "sampler":
        from torch.utils.data import WeightedRandomSampler

        labels = data.labels["train"]
        per_item = _class_weights(labels, len(params.classes))[labels]
        return {"sampler": WeightedRandomSampler(per_item, len(labels), replacement=True, generator=generator)}
    return {"shuffle": True, "generator": generator}


def _best_auc(history: list[dict], best_epoch: int) -> float:
    return float(history[best_epoch - 1]["val_auc"]) if best_epoch > 0 else float("nan")


def _weights_agree(model: nn.Module) -> bool:
    """True when every DDP process holds bit-identical weights."""
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


LIVE_METRICS = ("train_loss", "val_loss", "val_auc", "val_accuracy", "lr_head")


def _open_live(live_dir: Path, history: list[dict]):
    """A fresh DVCLive run with the epochs of ``history`` replayed (so a resumed run's curves are whole)."""
    from dvclive import Live

    live = Live(dir=str(live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
    for record in history:
        _log_live(live, record)
    return live


def _log_live(live, record: dict) -> None:
    for name in LIVE_METRICS:
        split, _, metric = name.partition("_")
        live.log_metric(f"{split}/{metric}", float(record[name]))
    if "elapsed_s" in record:  # absent from the history of checkpoints older than this field
        live.log_metric("time/elapsed_s", float(record["elapsed_s"]))
    live.next_step()


def _write_outputs(out_dir: Path, model: models.Classifier, params: TrainParams, model_params: models.ModelParams,
                   weights: models.WeightsInfo, data: SplitData, images_dir: Path, versions: dict,
                   history: list[dict], summary: TrainSummary, dtype: torch.dtype | None, *,
                   classes_setting: tuple[str, ...] | str | None = None) -> None:
    fingerprint_path = images_dir / "fingerprint.json"
    fingerprint = json.loads(fingerprint_path.read_text()) if fingerprint_path.exists() else {}
    input_spec = {
        "shape": list(data.image_shape), "layout": "C, H, W", "dtype": "float32", "range": [0, 1],
        "normalisation": {"mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD),
                          "applied_by_model": True},
        "preprocess": fingerprint.get("params", {}),
        "classes": list(params.classes), "positive_class": params.classes[-1] if len(params.classes) == 2 else None,
        "output": "logits (N, classes); softmax for probabilities",
    }
    payload = models.save_model(model, model_params.backbone, list(params.classes), input_spec)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    model_bytes = buffer.getvalue()
    atomic_write_bytes(out_dir / "model.pt", model_bytes)
    best = history[summary.best_epoch - 1] if summary.best_epoch > 0 else {}
    card = {
        "name": f"medtl-{model_params.backbone}-{params.strategy}",
        "model_file": {"path": "model.pt", "sha256": hashlib.sha256(model_bytes).hexdigest()},
        "backbone": model_params.backbone,
        "weights": {"pretrained": model_params.pretrained if model_params.pretrained in ("imagenet", "none")
                    else "file", **asdict(weights)},
        "strategy": params.strategy if model_params.pretrained != "none" else f"scratch ({params.strategy})",
        "params": {"train": asdict(params), "model": asdict(model_params)},
        "input_spec": input_spec,
        "data": {"version_sha256": versions,
                 "images": {s: int(len(data.rows[s])) for s in data.rows},
                 "patients": data.patients,
                 "train_subset": {"fraction": params.fraction, "fraction_seed": params.fraction_seed,
                                  "patients": data.patients["train"], "of_patients": data.train_pool_patients,
                                  "images": len(data.rows["train"])},
                 "class_counts": {s: {c: int((data.labels[s] == i).sum()) for i, c in enumerate(params.classes)}
                                  for s in data.rows},
                 "fingerprint": {k: fingerprint[k] for k in ("images", "labels", "sites", "modalities")
                                 if k in fingerprint}},
        "validation": {"best_epoch": summary.best_epoch, "auc": best.get("val_auc"), "loss": best.get("val_loss"),
                       "accuracy": best.get("val_accuracy"), "selection": "highest validation AUC"},
        "training": {"epochs_run": summary.epochs_run, "stopped_early": summary.stopped_early,
                     "device": summary.device, "world_size": summary.world_size,
                     "amp": str(dtype).removeprefix("torch.") if dtype else "off",
                     "images_per_s": summary.images_per_s, "wall_s": round(summary.wall_s, 1),
                     "epochs_planned": summary.epochs_planned, "min_steps": params.min_steps,
                     "batchnorm": {"mode": summary.batchnorm, "why": BATCHNORM_WHY.get(summary.batchnorm, "")}},
        "code_version": code_version(),
        "intended_use": INTENDED_USE,
        "limitations": ["Trained and validated on one site's data; performance elsewhere is unknown until evaluated.",
                        "Inputs must be preprocessed with the input_spec.preprocess parameters."],
    }
    if classes_setting == AUTO_CLASSES:
        card["data"]["classes_from"] = "train.classes: auto (the sorted distinct labels of the preprocessed images)"
    atomic_write_text(out_dir / "model_card.json", json.dumps(card, indent=2, default=_json_default) + "\n")
    metrics = {k: v for k, v in asdict(summary).items() if k not in ("device",)}
    atomic_write_text(out_dir / "train_metrics.json", json.dumps(metrics, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")



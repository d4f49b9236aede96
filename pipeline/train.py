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
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import drift, metrics, models
from pipeline.data import AUTO_CLASSES, AugmentParams, SplitData, data_version, derived_seed, load_splits, make_dataset
from pipeline.device import AMP_MODES, DEVICES, Dist, amp_dtype, autocast, device_name, init_distributed, loader_workers
from pipeline.inference import predict
from pipeline.io_utils import atomic_write_bytes, atomic_write_text, remove_stale_temps
from pipeline.params import ParamsError, check, param, section
from pipeline.strategies import STRATEGIES

log = logging.getLogger(__name__)

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
class TrainParams:
    """``train`` section of params.yaml (see the comments there).

    Attributes:
        classes: the label values in order, two or more (for two: negative first, the positive class
            last); integers are read as their text (labels ``0``/``1``). ``auto``: the sorted distinct
            labels of the preprocessed images (for ``0``/``1``: 1 positive; for names, the
            alphabetically last is positive, so name them explicitly).
        workers: DataLoader processes, as everywhere (:func:`pipeline.device.loader_workers`): 0 =
            automatic (in the training process on a CPU, min(8, cores) processes for a GPU), 1 = in the
            training process, N > 1 = N loader processes.
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
    amp: str = param("auto", choices=AMP_MODES)
    channels_last: bool = True
    compile: bool = False
    workers: int = param(0, min=0, hint="0 = automatic (formerly -1), 1 = in the training process")
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


@dataclass(kw_only=True)
class TrainSummary:
    """What a run did: ``train_metrics.json`` (all but ``device``) and the CLI's summary line."""

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


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    torch.manual_seed(derived_seed(seed, epoch, rank))


def train_step(net: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> float:
    """One optimiser step (autocast to ``dtype`` when set, gradient scaling for fp16); returns the loss."""
    with autocast(x.device, dtype):
        loss = loss_fn(net(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


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


class Trainer:
    """One training run as named steps; :func:`run` drives them (nnU-Net's ``run_training`` is the model).

    Construction sets everything up: inputs, model, optimiser, loaders, schedule. Then
    :meth:`resume` (from ``last.pt`` if it holds this configuration), :meth:`run_epoch` until
    :attr:`done` (each: :meth:`train_epoch`, :meth:`validate`, :meth:`select`, :meth:`end_epoch`),
    and :meth:`finish` (best weights, outputs, summary). A process killed between epochs resumes
    where it was: every epoch's randomness is seeded from (seed, epoch).
    """

    def __init__(self, params: TrainParams, model_params: models.ModelParams, images_dir: Path, splits_csv: Path,
                 out_dir: Path, *, checkpoint_dir: Path | None = None, live_dir: Path | None = None,
                 progress: bool = True):
        self.started = time.perf_counter()
        self.out_dir, self.images_dir, self.splits_csv = Path(out_dir), Path(images_dir), Path(splits_csv)
        self.checkpoint_path = Path(checkpoint_dir or self.out_dir / "checkpoints") / "last.pt"
        self.live_dir = Path(live_dir or self.out_dir / "live")
        self.progress = progress
        for folder in (self.out_dir, self.checkpoint_path.parent):
            remove_stale_temps(folder)  # what a killed run left
        self.dist, self.device = init_distributed(params.device)
        if self.dist.world_size > 1 and params.class_balance == "sampler":
            raise ParamsError("train.class_balance: sampler is not supported under DDP (torchrun); use weights")
        self.model_params = model_params
        self._load_data(params)
        self.dtype = amp_dtype(params.amp, self.device)
        self._build_model()
        self._build_optimiser()
        self._build_loaders()
        self._plan_schedule()
        self.history: list[dict] = []
        self.best: dict = {"auc": -math.inf, "epoch": -1, "state": None}
        self.bad_epochs = self.epoch = self.step = self.resumed_from = 0
        self.stopped_early = False
        self.live = None
        self.forward = torch.compile(self.model) if self.params.compile else self.model
        self._ddp_model: nn.Module | None = None
        self._ddp_trainable: int | None = None

    # ------------------------------------------------------------------------------------- set-up

    def _load_data(self, params: TrainParams) -> None:
        self.data = load_splits(self.images_dir, self.splits_csv, params.classes, fraction=params.fraction,
                                fraction_seed=params.fraction_seed)
        self.classes_setting = params.classes
        if params.auto_classes:  # from here on the classes found: model, card, config hash
            params = replace(params, classes=self.data.classes)
            if self.dist.main:
                log.info("train.classes auto: %s (positive class %s)", list(self.data.classes), self.data.classes[-1])
        self.params = params
        self.versions = data_version(self.images_dir, self.splits_csv)
        self.config_hash = _config_hash(params, self.model_params,
                                        self.versions["tensors"] + self.versions["index"] + self.versions["splits"])

    def _build_model(self) -> None:
        torch.manual_seed(self.params.seed)  # the new head's initial weights (and every weight from scratch)
        self.model, self.weights = models.build_model(self.model_params, len(self.params.classes))
        if self.model_params.pretrained == "none":
            # A fair baseline: MONAI's random init gives logits of SD ~9 in training mode (a first loss of
            # 5-10); start the head near uniform, as a pretrained model's new head does.
            models.init_head(self.model.net, models.backbone(self.model_params.backbone))
        self.stages = models.backbone_stages(self.model, self.model_params.backbone)
        self.model.to(self.device)
        if self.params.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _build_optimiser(self) -> None:
        params, device = self.params, self.device
        head = models.head_parameters(self.model, self.model_params.backbone)
        head_ids = {id(p) for p in head}
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.model.parameters() if id(p) not in head_ids],
              "lr": params.lr * backbone_lr_mult(params, self.model_params), "name": "backbone"},
             {"params": head, "lr": params.lr, "name": "head"}], weight_decay=params.weight_decay)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        n_classes = len(params.classes)
        weights = (torch.tensor(_class_weights(self.data.labels["train"], n_classes), dtype=torch.float32,
                                device=device) if params.class_balance == "weights" else None)
        self.loss_fn = nn.CrossEntropyLoss(weight=weights)

    def _build_loaders(self) -> None:
        from monai.data import DataLoader

        params = self.params
        self.train_ds = make_dataset(self.data, "train", params.augment_for, params.seed)
        self.loader_args = {"num_workers": loader_workers(params.workers, self.device),
                            "pin_memory": self.device.type == "cuda"}
        self.val_loader = DataLoader(make_dataset(self.data, "val"), batch_size=params.batch_size * 2, shuffle=False,
                                     **self.loader_args)
        self.bn_mode = batchnorm_mode(params, self.model_params)
        # recalibrate: BatchNorm statistics recomputed on the training images after each epoch
        self.calibration_loader = (
            DataLoader(make_dataset(self.data, "train"), batch_size=params.batch_size, shuffle=False,
                       **self.loader_args) if self.bn_mode == "recalibrate" else None)

    def _plan_schedule(self) -> None:
        params = self.params
        self.steps_per_epoch = math.ceil(len(self.train_ds) / (params.batch_size * self.dist.world_size))
        self.epochs = planned_epochs(params, self.steps_per_epoch)
        self.total_steps = self.steps_per_epoch * self.epochs
        self.warmup_steps = (int(round(params.warmup_epochs * self.steps_per_epoch))
                             if params.strategy != "feature_extraction" else 0)

    # ------------------------------------------------------------------------------------- steps

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs or self.stopped_early

    def resume(self) -> None:
        """Continue from ``last.pt`` when it holds this configuration; open the DVCLive run (curves replayed)."""
        state = _load_checkpoint(self.checkpoint_path, self.config_hash)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.history, self.best, self.bad_epochs = state["history"], state["best"], state["bad_epochs"]
            self.epoch, self.step = state["epoch"], state["step"]
            self.stopped_early = state.get("stopped_early", False)
            if self.dist.main:
                log.info("resuming from %s after epoch %d", self.checkpoint_path, self.epoch)
        self.resumed_from = self.epoch
        if self.dist.main:
            self.live = _open_live(self.live_dir, self.history)
            if self.epochs > self.params.epochs:
                log.info("train.min_steps %d: %d epochs of %d steps instead of %d", self.params.min_steps,
                         self.epochs, self.steps_per_epoch, self.params.epochs)

    def run_epoch(self) -> dict:
        """One epoch: train, validate, keep the model if it is the best so far, log and checkpoint."""
        trained = self.train_epoch()
        record = self.validate(trained)
        self.select(record)
        self.end_epoch(record)
        return record

    def train_epoch(self) -> dict:
        """One pass over the (re-shuffled, augmented) training split; the loss and throughput it had."""
        from monai.data import DataLoader
        from tqdm import tqdm

        params, device, epoch = self.params, self.device, self.epoch
        _seed_everything(params.seed, epoch, self.dist.rank)
        self.train_ds.epoch = epoch
        n_trainable = trainable_stages(params, epoch, len(self.stages))
        self.model.train()
        set_trainable(self.model, self.stages, n_trainable)
        if self.bn_mode == "frozen":
            freeze_batchnorm_statistics(self.model)
        net = self._network(n_trainable)
        loader = DataLoader(self.train_ds, batch_size=params.batch_size, drop_last=False,
                            **_train_sampling(params, self.data, epoch, self.dist), **self.loader_args)
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        factor = lr_factor(self.step, self.total_steps, self.warmup_steps)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not (self.progress and self.dist.main),
                   leave=False, unit="batch", mininterval=0.1 if sys.stderr.isatty() else 30)
        for batch in bar:
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if params.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            factor = lr_factor(self.step, self.total_steps, self.warmup_steps)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            loss = train_step(net, self.loss_fn, self.optimizer, self.scaler, x, y, self.dtype)
            self.step += 1
            seen += len(y)
            loss_sum += loss * len(y)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        return {"started": started, "train_s": time.perf_counter() - started, "seen": seen, "loss_sum": loss_sum,
                "lr_factor": factor, "trainable_stages": n_trainable}

    def _network(self, n_trainable: int) -> nn.Module:
        if self.dist.world_size > 1 and self._ddp_trainable != n_trainable:
            # DDP registers the parameters that need gradients when it is built: rebuild on unfreezing.
            self._ddp_model = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self._ddp_trainable = n_trainable
        return self._ddp_model if self._ddp_model is not None else self.forward

    def validate(self, trained: dict) -> dict:
        """The epoch's record: training loss and rate, validation loss, AUC and accuracy of the current weights."""
        if self.calibration_loader is not None:
            recalibrate_batchnorm(self.model, self.calibration_loader, self.device, self.params.channels_last)
        if self.dist.world_size > 1:
            # DDP syncs BatchNorm statistics at the start of each forward, so the last batch leaves
            # them differing between processes: take rank 0's, so all validate the same model.
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)
        probs, labels = predict(self.forward, self.val_loader, self.device, self.dtype, self.params.channels_last)
        val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-7)),
                                                torch.from_numpy(labels)))
        record = {"epoch": self.epoch + 1, "train_loss": trained["loss_sum"] / max(trained["seen"], 1),
                  "val_loss": val_loss, "val_auc": metrics.class_auc(labels, probs),
                  "val_accuracy": float((probs.argmax(1) == labels).mean()),
                  "lr_head": self.base_lrs[-1] * trained["lr_factor"], "trainable_stages": trained["trainable_stages"],
                  "train_images_per_s": trained["seen"] * self.dist.world_size / trained["train_s"],
                  "epoch_s": time.perf_counter() - trained["started"]}
        # training wall time so far (train + validate, summed over epochs; set-up excluded): the time
        # a strategy needs to reach a given validation AUC, comparable across resumed runs
        record["elapsed_s"] = (self.history[-1].get("elapsed_s", 0.0) if self.history else 0.0) + record["epoch_s"]
        return record

    def select(self, record: dict) -> None:
        """Keep the weights of the best validation AUC so far; decide on early stopping."""
        self.history.append(record)
        # Select on AUC; a single-class validation split has none, so fall back to the loss.
        score = record["val_auc"] if not math.isnan(record["val_auc"]) else -record["val_loss"]
        if score > self.best["auc"]:
            self.best = {"auc": score, "epoch": self.epoch + 1,
                         "state": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.epoch += 1
        # early stopping waits for train.min_steps: the first epochs of a small subset are a handful of
        # steps, and their noisy validation AUC must not end the run before it had its budget
        self.stopped_early = (self.params.patience > 0 and self.bad_epochs >= self.params.patience
                              and self.epoch < self.epochs and self.step >= self.params.min_steps)

    def end_epoch(self, record: dict) -> None:
        """Log the epoch (console, DVCLive) and write the checkpoint a killed run resumes from."""
        if self.dist.main:
            log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %.4f, %.1f images/s%s", self.epoch,
                     self.epochs, record["train_loss"], record["val_loss"], record["val_auc"],
                     record["train_images_per_s"], " (best)" if self.best["epoch"] == self.epoch else "")
            _log_live(self.live, record)
            _save_checkpoint(self.checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "config_hash": self.config_hash, "epoch": self.epoch, "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "history": self.history, "best": self.best,
                "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early})
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        if self.stopped_early and self.dist.main:
            log.info("early stop: no validation AUC gain in %d epochs", self.params.patience)

    def finish(self) -> TrainSummary:
        """Restore the best weights, write ``model.pt``, the card and the metrics; the run's summary."""
        agree = _weights_agree(self.model) if self.dist.world_size > 1 else None
        self.model.load_state_dict(self.best["state"])
        history, data = self.history, self.data
        summary = TrainSummary(
            epochs_run=len(history), best_epoch=self.best["epoch"], best_val_auc=_best_auc(history, self.best["epoch"]),
            stopped_early=self.stopped_early, resumed_from_epoch=self.resumed_from,
            train_images=len(data.rows["train"]), val_images=len(data.rows["val"]),
            images_per_s=float(np.median([h["train_images_per_s"] for h in history])) if history else float("nan"),
            wall_s=time.perf_counter() - self.started, device=device_name(self.device),
            world_size=self.dist.world_size, ddp_weights_agree=agree, train_patients=data.patients["train"],
            train_fraction=self.params.fraction, epochs_planned=self.epochs, batchnorm=self.bn_mode)
        if self.dist.main:
            _write_outputs(self.out_dir, self.model, self.params, self.model_params, self.weights, data,
                           self.images_dir, self.versions, history, summary, self.dtype,
                           classes_setting=self.classes_setting)
            if self.live is not None:
                self.live.end()
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        return summary


def run(params: TrainParams, model_params: models.ModelParams, images_dir: Path, splits_csv: Path,
        out_dir: Path, *, checkpoint_dir: Path | None = None, live_dir: Path | None = None,
        progress: bool = True) -> TrainSummary:
    """Train, validate every epoch, keep the best-validation-AUC model and write the outputs.

    Args:
        params, model_params: the ``train`` and ``model`` sections.
        images_dir: preprocess output (``tensors.npy``, ``index.parquet``, ``fingerprint.json``).
        splits_csv: split output (``image_id``, ``split``).
        out_dir: receives ``model.pt``, ``model_card.json``, ``train_metrics.json``.
        checkpoint_dir: where ``last.pt`` persists between runs (default ``out_dir/checkpoints``).
        live_dir: DVCLive directory (default ``out_dir/live``).
        progress: show a progress bar per epoch.
    """
    trainer = Trainer(params, model_params, images_dir, splits_csv, out_dir, checkpoint_dir=checkpoint_dir,
                      live_dir=live_dir, progress=progress)
    trainer.resume()
    while not trainer.done:
        trainer.run_epoch()
    return trainer.finish()


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
                                 if k in fingerprint},
                 # what predict's drift check compares new images with (pipeline.drift)
                 "drift_reference": drift.reference(np.load(data.tensors, mmap_mode="r"), data.rows["train"],
                                                    data.modalities["train"])},
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



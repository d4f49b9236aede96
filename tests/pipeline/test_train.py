"""The train stage on tiny preprocessed data made here: strategies, resume, DDP, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline import data, models, train
from pipeline.errors import MedtlError

from tests.conftest import TINY_SIZE as SIZE

TINY = train.TrainParams(epochs=2, batch_size=8, patience=0, workers=0, device="cpu", channels_last=False)


@pytest.fixture(scope="module")
def images(tiny_images):
    return tiny_images


def _run(images, out: Path, params=TINY, model_params=None, **kwargs):
    model_params = model_params or models.ModelParams()
    return train.run(params, model_params, images[0], images[1], out, progress=False, **kwargs)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_outputs_card_and_curves(images, tmp_path):
    summary = _run(images, tmp_path)
    assert summary.epochs_run == 2 and summary.train_images == 24 and summary.val_images == 12
    model, meta = models.load_model(tmp_path / "model.pt")
    assert meta["classes"] == ["normal", "lesion"] and meta["input_spec"]["shape"] == [3, SIZE, SIZE]
    assert model(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 2)
    card = json.loads((tmp_path / "model_card.json").read_text())
    package_file = models.backbone("efficientnet-lite0").package_path()
    assert card["weights"]["source"] in {"package", "hub_cache"}
    assert card["weights"]["sha256"] == models.sha256_file(package_file)
    assert card["weights"]["backbone_tensors_loaded"] == card["weights"]["backbone_tensors"] > 0
    assert card["strategy"] == "finetune" and card["backbone"] == "efficientnet-lite0"
    assert card["data"]["version_sha256"]["tensors"] == models.sha256_file(images[0] / "tensors.npy")
    assert card["data"]["images"] == {"train": 24, "val": 12, "test": 12}
    reference = card["data"]["drift_reference"]  # the training images' statistics predict compares with
    assert sum(r["images"] for r in reference.values()) == 24 and set(reference) <= {"DX", "CR", "CT"}
    assert all(len(r["mean"]) == 11 and r["mean"] == sorted(r["mean"]) for r in reference.values())
    assert card["validation"]["best_epoch"] == summary.best_epoch
    assert card["input_spec"]["normalisation"]["mean"] == list(models.IMAGENET_MEAN)
    assert card["intended_use"] and card["code_version"]["torch"] == torch.__version__
    assert "P-0001" not in (tmp_path / "model_card.json").read_text(), "the card names no patient"
    auc_curve = pd.read_csv(tmp_path / "live/plots/metrics/val/auc.tsv", sep="\t")
    assert list(auc_curve["step"]) == [0, 1]
    assert json.loads((tmp_path / "train_metrics.json").read_text())["epochs_run"] == 2


def test_feature_extraction_leaves_the_backbone_bit_identical(images, tmp_path):
    params = replace(TINY, strategy="feature_extraction", lr=0.05)
    _run(images, tmp_path, params)
    pretrained, _ = models.build_model(models.ModelParams(), num_classes=2)
    before = pretrained.state_dict()
    after = _state(tmp_path / "model.pt")
    head = {k for k in before if k.startswith("net._fc.")}
    changed = [k for k in before if k not in head and not torch.equal(before[k], after[k])]
    assert changed == [], f"backbone tensors changed under feature extraction: {changed[:5]}"
    assert any("running_mean" in k for k in before), "BatchNorm statistics are part of the check"
    assert not torch.equal(before["net._fc.weight"], after["net._fc.weight"]), "the head should learn"


def test_gradual_unfreezes_from_the_top():
    params = replace(TINY, strategy="gradual", gradual_head_epochs=2, gradual_every=2)
    assert [train.trainable_stages(params, e, 9) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    model, _ = models.build_model(models.ModelParams(pretrained="none"), num_classes=2)
    stages = models.backbone_stages(model, "efficientnet-lite0")
    model.train()
    train.set_trainable(model, stages, 2)
    assert [all(p.requires_grad for p in s.parameters()) for s in stages] == [False] * 7 + [True] * 2
    assert not stages[0].training and stages[-1].training, "frozen stages keep their BatchNorm statistics"
    assert all(p.requires_grad for p in models.head_parameters(model, "efficientnet-lite0"))


@pytest.mark.parametrize("strategy", ["finetune", "gradual"])
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(images, tmp_path, strategy):
    params = replace(TINY, epochs=3, strategy=strategy)
    whole = _run(images, tmp_path / "whole", params)
    killed = train.Trainer(params, models.ModelParams(), images[0], images[1], tmp_path / "killed", progress=False)
    killed.resume()
    killed.run_epoch()  # then the process dies: no finish()
    del killed
    assert not (tmp_path / "killed/model.pt").exists() and (tmp_path / "killed/checkpoints/last.pt").exists()
    resumed = _run(images, tmp_path / "killed", params)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == whole.epochs_run == 3
    a, b = _state(tmp_path / "whole/model.pt"), _state(tmp_path / "killed/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_val_auc == whole.best_val_auc
    curves = [pd.read_csv(tmp_path / d / "live/plots/metrics/train/loss.tsv", sep="\t") for d in ("whole", "killed")]
    pd.testing.assert_frame_equal(*curves)


def test_a_checkpoint_of_other_params_is_not_resumed(images, tmp_path):
    _run(images, tmp_path, replace(TINY, epochs=1))
    summary = _run(images, tmp_path, replace(TINY, epochs=1, lr=0.01))
    assert summary.resumed_from_epoch == 0 and summary.epochs_run == 1


def test_scratch_with_balanced_sampler_learns_and_is_recorded(images, tmp_path):
    params = replace(TINY, class_balance="sampler", epochs=1)
    _run(images, tmp_path, params, model_params=models.ModelParams(pretrained="none"))
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["strategy"] == "scratch (finetune)" and card["weights"]["source"] == "none"
    assert card["weights"]["sha256"] is None


def test_early_stopping_keeps_the_best_epoch(images, tmp_path):
    # nothing can change (frozen backbone, head at lr 1e-30: steps far below float32 resolution), so epoch 1
    # stays best and epoch 2 stops the run
    summary = _run(images, tmp_path, replace(TINY, epochs=6, patience=1, lr=1e-30, strategy="feature_extraction"))
    assert summary.stopped_early and summary.epochs_run == 2 and summary.best_epoch == 1


def test_labels_outside_the_classes_are_an_error_naming_the_file(images, tmp_path):
    with pytest.raises(data.UnknownLabelsError, match=r"\['lesion'\].*index.parquet.*train.classes") as err:
        _run(images, tmp_path, replace(TINY, classes=("normal", "tumour")))
    assert isinstance(err.value, MedtlError)
    assert "labels found: ['lesion', 'normal']" in str(err.value) and "or to auto" in str(err.value)
    with pytest.raises(ValueError, match="scratch is model.pretrained: none"):
        replace(TINY, strategy="scratch")


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_on_the_weights(images, tmp_path):
    """torchrun --nproc_per_node=2 with gloo: one epoch, then every rank holds the same weights."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": {"epochs": 1, "batch_size": 6, "workers": 0, "device": "cpu",
                                                     "channels_last": False, "patience": 0}}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "pipeline.cli", "--params", str(params_file), "train", "--images", str(images[0]),
           "--splits", str(images[1]), "--out", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((tmp_path / "out/train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ddp_weights_agree"] is True
    assert metrics["train_images"] == 24 and metrics["epochs_run"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_amp_channels_last_compile(images, tmp_path):
    params = replace(TINY, device="cuda", channels_last=True, compile=True, workers=2)
    summary = _run(images, tmp_path, params)
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["training"]["amp"] in {"bfloat16", "float16"} and summary.device != "cpu"
    model, _ = models.load_model(tmp_path / "model.pt")
    assert model(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 2)


def test_scratch_trains_the_backbone_at_the_full_rate_from_a_near_uniform_start(images, tmp_path):
    assert train.backbone_lr_mult(TINY, models.ModelParams(pretrained="none")) == 1.0
    assert train.backbone_lr_mult(TINY, models.ModelParams()) == TINY.backbone_lr_mult == 0.1
    _run(images, tmp_path, replace(TINY, epochs=2), model_params=models.ModelParams(pretrained="none"))
    first_loss = pd.read_csv(tmp_path / "live/plots/metrics/train/loss.tsv", sep="\t")["loss"].iloc[0]
    # MONAI's random init alone starts near a loss of 5-10; a near-uniform head starts near ln 2
    assert first_loss < 1.5
    # with MONAI's BatchNorm momentum 0.01 the running statistics stay near (0, 1) after a few steps and
    # every image gets the same evaluation-mode output
    model, _ = models.load_model(tmp_path / "model.pt")
    tensors = torch.from_numpy(np.load(images[0] / "tensors.npy")[:12].astype(np.float32))
    with torch.no_grad():
        scores = model.eval()(tensors).softmax(1)[:, 1]
    assert len(set(scores.tolist())) > 1


def test_a_fraction_trains_on_fewer_patients_and_records_them_and_the_elapsed_time(images, tmp_path):
    summary = _run(images, tmp_path, replace(TINY, fraction=0.5))
    assert summary.train_patients == 6 and summary.train_images == 12 and summary.val_images == 12
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["data"]["train_subset"] == {"fraction": 0.5, "fraction_seed": 0, "patients": 6, "of_patients": 12,
                                            "images": 12}
    assert card["data"]["patients"]["test"] == 6, "validation and test stay whole"
    metrics = json.loads((tmp_path / "train_metrics.json").read_text())
    assert metrics["train_fraction"] == 0.5 and metrics["train_patients"] == 6
    elapsed = pd.read_csv(tmp_path / "live/plots/metrics/time/elapsed_s.tsv", sep="\t")
    assert list(elapsed["step"]) == [0, 1] and 0 < elapsed["elapsed_s"].iloc[0] < elapsed["elapsed_s"].iloc[1]
    with pytest.raises(ValueError, match=r"train.fraction: must be a number in \(0, 1\], got 0"):
        replace(TINY, fraction=0)


def _no_stochastic_layers(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "drop_connect_rate"):
            module.drop_connect_rate = 0.0
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@pytest.mark.parametrize("mode, same", [("frozen", True), ("batch", False)])
def test_what_the_head_learns_on_is_what_evaluation_sees_only_with_frozen_batchnorm(images, mode, same):
    """The cause of issue 13's handicapped fine-tune: in batch mode the pretrained backbone normalises
    with batch statistics while training, and with its (barely moving) running statistics at evaluation."""
    model, _ = models.build_model(models.ModelParams(dropout=0.0), num_classes=2)
    _no_stochastic_layers(model)
    x = torch.from_numpy(np.load(images[0] / "tensors.npy")[:16].astype(np.float32))
    with torch.no_grad():
        evaluated = model.eval()(x)
        params = replace(TINY, batchnorm=mode)
        model.train()
        train.set_trainable(model, models.backbone_stages(model, "efficientnet-lite0"),
                            train.trainable_stages(params, 0, 9))
        if train.batchnorm_mode(params, models.ModelParams()) == "frozen":
            train.freeze_batchnorm_statistics(model)
        trained_on = model(x)
    gap = float((trained_on - evaluated).abs().max())
    assert (gap == 0.0) if same else (gap > 1e-2), gap


def test_a_backbone_with_learning_rate_zero_stays_the_pretrained_one_only_with_frozen_batchnorm(images, tmp_path):
    """Backbone lr 0: with frozen BatchNorm nothing of it moves (the model evaluates on the features its
    head learned on); in batch mode its running statistics drift although no weight learns."""
    common = {"strategy": "finetune", "backbone_lr_mult": 0.0, "warmup_epochs": 0, "lr": 0.01}
    frozen = _run(images, tmp_path / "frozen", replace(TINY, **common))
    drift = _run(images, tmp_path / "batch", replace(TINY, batchnorm="batch", **common))
    pretrained = models.build_model(models.ModelParams(), num_classes=2)[0].state_dict()
    a, c = (_state(tmp_path / d / "model.pt") for d in ("frozen", "batch"))
    assert frozen.batchnorm == "frozen" and drift.batchnorm == "batch"
    backbone = [k for k in pretrained if not k.startswith("net._fc.")]
    assert [k for k in backbone if not torch.equal(pretrained[k], a[k])] == []
    stats = [k for k in backbone if k.endswith("running_mean")]
    assert sum(not torch.equal(pretrained[k], c[k]) for k in stats) > len(stats) // 2, \
        "batch mode moves the running statistics"
    card = json.loads((tmp_path / "frozen/model_card.json").read_text())
    assert card["training"]["batchnorm"]["mode"] == "frozen" and "eval mode" in card["training"]["batchnorm"]["why"]


def test_min_steps_raises_the_epochs_of_a_small_training_set():
    params = replace(TINY, epochs=4, min_steps=100)
    assert train.planned_epochs(params, steps_per_epoch=5) == 20
    assert train.planned_epochs(params, steps_per_epoch=50) == 4
    assert train.planned_epochs(replace(params, min_steps=0), steps_per_epoch=5) == 4
    with pytest.raises(ValueError, match="train.batchnorm"):
        replace(TINY, batchnorm="sometimes")


def test_classes_auto_are_the_sorted_labels_and_the_card_says_so(images, tmp_path):
    assert data.load_splits(images[0], images[1], "auto").classes == ("lesion", "normal")
    assert data.load_splits(images[0], images[1], ("normal", "lesion")).classes == ("normal", "lesion")
    _run(images, tmp_path, replace(TINY, classes="auto", epochs=1))
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["input_spec"]["classes"] == card["params"]["train"]["classes"] == ["lesion", "normal"]
    assert card["input_spec"]["positive_class"] == "normal" and "auto" in card["data"]["classes_from"]
    assert models.load_model(tmp_path / "model.pt")[1]["classes"] == ["lesion", "normal"]

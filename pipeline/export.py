"""Portable exports of a trained model: TorchScript, ONNX and a MONAI bundle, each checked against PyTorch.

``run(model_path, out_dir)`` reads a train-stage ``model.pt`` (and the ``model_card.json`` beside it)
and writes into ``out_dir``::

    model.ts            TorchScript (torch.jit.trace); the card is inside too (extra file model_card.json)
    model.onnx          ONNX, opset 18, dynamic batch axis; the card is in its metadata_props
    model_card.json     the model card, byte for byte
    bundle/             a MONAI bundle: configs/metadata.json, configs/inference.json,
                        models/model.ts, models/model_card.json, docs/README.md
    export.json         formats, files and SHA-256s, parity figures, versions (written last: its
                        presence means every check passed)

Every export is the :class:`pipeline.models.Classifier` unchanged: input ``(N, C, H, W)`` float32 in
[0, 1] (the preprocess stage's tensors, ``input_spec``), the ImageNet mean/std normalisation inside,
output ``(N, classes)`` **logits**; softmax gives probabilities (the bundle also writes those).

Parity: each export is run (from its written file: ``torch.jit.load``, onnxruntime's
CPUExecutionProvider, MONAI's bundle runner) on ``n_parity`` images (uniform random in [0, 1] from
``seed``, or a sample of the given ones) and compared with the PyTorch model in fp32; a max |Δ| of the
logits above ``tolerance`` (1e-4) is a :class:`ParityError`.

Bundle metadata is checked with ``monai.bundle.verify_metadata`` against MONAI's metadata schema when a
local copy of it is given (``schema_file``, or ``$MEDTL_MONAI_SCHEMA``): verify_metadata then reads the
file and downloads nothing. MONAI does not ship the schema (it is a release asset of
Project-MONAI/MONAI-extra-test-data), so without a copy (offline sites) the check is the schema's
required keys and the tensor fields of ``network_data_format``, and ``export.json`` says which check ran.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import models
from pipeline.errors import MedtlError
from pipeline.io_utils import atomic_write_bytes, atomic_write_text, remove_stale_temps, sha256_file

log = logging.getLogger(__name__)

EXPORT_FORMAT = "medtl-export/1"
DEFAULT_PARITY_IMAGES = 32  # the issue's floor: parity on at least this many images
FORMATS = ("torchscript", "onnx", "bundle")
PARITY_TOLERANCE = 1e-4
ONNX_OPSET = 18  # the dynamo exporter's own opset (its converter cannot take MONAI's Pad down to 17)
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
CARD_NAME = "model_card.json"
#: the schema MONAI's model zoo names in metadata.json (its ``schema`` field)
MONAI_META_SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                         "meta_schema_20240725.json")
SCHEMA_ENV = "MEDTL_MONAI_SCHEMA"
#: the top-level keys that schema requires, and the fields it requires of each tensor of network_data_format
BUNDLE_REQUIRED_KEYS = ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                        "required_packages_version", "task", "description", "authors", "copyright",
                        "network_data_format")
BUNDLE_TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")
_PARITY_BATCH = 16


class ExportError(MedtlError, ValueError):
    """The model cannot be exported (not a model file, no or a mismatched card, bad parity images)."""


class ParityError(ExportError):
    """An export's outputs differ from the PyTorch model's by more than the tolerance."""


def export_champion(registry: Path, out_root: Path, images_dir: Path | None = None, *, model_path: Path | None = None,
                    formats: tuple[str, ...] | list[str] = FORMATS) -> tuple[Path, dict]:
    """Export ``model_path`` (default: the champion of ``registry``) into ``out_root/<name>``.

    ``<name>`` is ``v0001`` for a registry version, else the first 12 hex digits of the model's SHA-256. The
    parity check uses the preprocessed tensors of ``images_dir`` when there are enough of the model's input
    size (real inputs), else random images. What ``medtl export`` and the retrain flow's export step both do.

    Returns:
        (the export folder, the content of its ``export.json``).
    """
    from pipeline.predict import resolve_model

    model = resolve_model(Path(model_path) if model_path else None, Path(registry), need_threshold=False)
    tensors = Path(images_dir) / "tensors.npy" if images_dir is not None else None
    images = np.load(tensors, mmap_mode="r") if tensors is not None and tensors.is_file() else None
    if images is not None and (len(images) < DEFAULT_PARITY_IMAGES or list(images.shape[1:]) != list(
            model.input_spec["shape"])):
        images = None  # too few, or of another size than the model takes: random images in [0, 1] instead
    name = f"v{model.version:04d}" if model.version is not None else model.model_sha256[:12]
    out = Path(out_root) / name
    return out, run(model.path, out, formats=tuple(formats), parity_images=images)


def run(model_path: Path, out_dir: Path, formats: tuple[str, ...] | list[str] = FORMATS,
        parity_images: np.ndarray | None = None, n_parity: int = DEFAULT_PARITY_IMAGES, seed: int = 0,
        tolerance: float = PARITY_TOLERANCE, schema_file: Path | None = None) -> dict:
    """Export ``model_path`` into ``out_dir`` in ``formats`` and check each against the PyTorch model.

    Args:
        model_path: a train-stage ``model.pt`` with its ``model_card.json`` beside it.
        out_dir: receives the exports and ``export.json`` (created if missing; earlier exports replaced).
        formats: any of ``torchscript``, ``onnx``, ``bundle`` (the bundle carries the TorchScript model).
        parity_images: ``(N, C, H, W)`` float images in [0, 1] with N >= ``n_parity`` (a seeded sample of
            ``n_parity`` is used); None: ``n_parity`` uniform random images.
        n_parity: how many images the parity check runs on.
        seed: for the random images (and the sample of given ones).
        tolerance: the largest max |Δ| of logits (fp32) accepted.
        schema_file: a local copy of MONAI's metadata schema (default ``$MEDTL_MONAI_SCHEMA``); without one
            the bundle metadata is checked for the schema's required keys only.

    Returns:
        the ``export.json`` content.

    Raises:
        ExportError: not a medtl model file, missing or mismatched model card, unknown format, bad images.
        ParityError: an export's max |Δ| exceeds ``tolerance`` (``export.json`` is then not written).
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    formats = _check_formats(formats)
    model, meta, card_bytes = _load(model_path)
    shape = [int(v) for v in meta["input_spec"]["shape"]]
    images = _parity_images(parity_images, shape, n_parity, seed)
    remove_stale_temps(out_dir)
    (out_dir / "export.json").unlink(missing_ok=True)  # present only once this run's checks have passed
    atomic_write_bytes(out_dir / CARD_NAME, card_bytes)
    with torch.no_grad():
        reference = _batched(model, images)
    files, parity = {CARD_NAME: out_dir / CARD_NAME}, {}
    ts_bytes = None
    if "torchscript" in formats or "bundle" in formats:
        ts_bytes = torchscript_bytes(model, shape, card_bytes, meta)
    if "torchscript" in formats:
        atomic_write_bytes(out_dir / "model.ts", ts_bytes)
        files["model.ts"] = out_dir / "model.ts"
        parity["torchscript"] = _compare(run_torchscript(out_dir / "model.ts", images), reference)
    if "onnx" in formats:
        atomic_write_bytes(out_dir / "model.onnx", onnx_bytes(model, shape, card_bytes, meta))
        files["model.onnx"] = out_dir / "model.onnx"
        parity["onnx"] = _compare(run_onnx(out_dir / "model.onnx", images), reference)
    bundle_check = None
    if "bundle" in formats:
        bundle = out_dir / "bundle"
        card = json.loads(card_bytes)
        write_bundle(bundle, ts_bytes, card_bytes, card, meta, tolerance)
        bundle_check = verify_bundle_metadata(bundle / "configs" / "metadata.json", schema_file)
        parity["bundle"] = _compare(run_bundle(bundle, images), reference)
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            files[path.relative_to(out_dir).as_posix()] = path
    failed = {name: p["max_abs_diff"] for name, p in parity.items() if not p["max_abs_diff"] <= tolerance}
    if failed:
        shown = ", ".join(f"{name} {diff:.3g}" for name, diff in failed.items())
        raise ParityError(f"{model_path}: exported model differs from the PyTorch model by more than {tolerance:g} "
                          f"(max |logit difference| {shown} on {len(images)} images); the exports in {out_dir} "
                          "are not valid (no export.json written)")
    result = _summary(model_path, card_bytes, meta, formats, files, out_dir, parity, images, parity_images is None,
                      seed, tolerance, bundle_check)
    atomic_write_text(out_dir / "export.json", json.dumps(result, indent=2) + "\n")
    log.info("export: %s -> %s (%s); max |Δ| %s", model_path, out_dir, ", ".join(formats),
             ", ".join(f"{k} {v['max_abs_diff']:.2g}" for k, v in parity.items()))
    return result


def _check_formats(formats) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys([formats] if isinstance(formats, str) else formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"export formats: unknown {unknown or 'none given'}; choose from {', '.join(FORMATS)}")
    return formats


def _load(model_path: Path) -> tuple[models.Classifier, dict, bytes]:
    """The model, its payload (without weights) and its card's bytes, after checking the card names this file."""
    if not model_path.is_file():
        raise ExportError(f"{model_path}: no such model file; give the train stage's model.pt")
    try:
        model, meta = models.load_model(model_path, map_location="cpu")
    except models.ModelFileError as exc:
        raise ExportError(str(exc)) from exc
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a medtl header with broken content
        raise ExportError(f"{model_path}: not a valid medtl model file ({type(exc).__name__}); give the train "
                          "stage's model.pt") from exc
    spec = meta.get("input_spec") or {}
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ExportError(f"{model_path}: input_spec.shape must be [C, H, W], got {shape!r}")
    card_path = model_path.parent / CARD_NAME
    if not card_path.is_file():
        raise ExportError(f"{card_path}: no model card beside the model; every export carries one (the train "
                          "stage writes it)")
    card_bytes = card_path.read_bytes()
    try:
        card = json.loads(card_bytes)
        recorded = card["model_file"]["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{card_path}: not a medtl model card (no model_file.sha256)") from exc
    if recorded != sha256_file(model_path):
        raise ExportError(f"{card_path}: describes another model file (model_file.sha256 differs from "
                          f"{model_path.name}'s); export the model with its own card")
    return model.float().eval(), meta, card_bytes


def _parity_images(given: np.ndarray | None, shape: list[int], n: int, seed: int) -> torch.Tensor:
    if n < 1:
        raise ExportError(f"export: n_parity must be at least 1, got {n}")
    if given is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(n, *shape, generator=generator, dtype=torch.float32)
    given = np.asarray(given)
    if given.ndim != 4 or list(given.shape[1:]) != shape:
        raise ExportError(f"export: parity images are {list(given.shape)}, the model takes "
                          f"[N, {', '.join(map(str, shape))}]")
    if len(given) < n:
        raise ExportError(f"export: {len(given)} parity images given, {n} needed")
    pick = np.sort(np.random.default_rng(seed).choice(len(given), n, replace=False)) if len(given) > n else slice(None)
    images = torch.from_numpy(np.ascontiguousarray(given[pick], dtype=np.float32))
    if not torch.isfinite(images).all():
        raise ExportError("export: parity images contain NaN or infinite values")
    return images


def _batched(fn, images: torch.Tensor) -> np.ndarray:
    return np.concatenate([np.asarray(fn(images[i:i + _PARITY_BATCH])) for i in range(0, len(images), _PARITY_BATCH)])


def _example(shape: list[int]) -> torch.Tensor:
    # batch 2: torch.export would specialise a batch of 1 to a constant
    return torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))


def _spec_json(meta: dict) -> str:
    return json.dumps({"backbone": meta["backbone"], "classes": meta["classes"], "input_spec": meta["input_spec"],
                       "output": "logits (N, classes); softmax for probabilities"})


def torchscript_bytes(model: models.Classifier, shape: list[int], card_bytes: bytes, meta: dict) -> bytes:
    """The traced model (``torch.jit.script`` fails on MONAI's EfficientNet) with the card as an extra file."""
    with torch.no_grad():
        traced = torch.jit.trace(model, _example(shape), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={CARD_NAME: card_bytes, "medtl_spec.json": _spec_json(meta)})
    return buffer.getvalue()


def onnx_bytes(model: models.Classifier, shape: list[int], card_bytes: bytes, meta: dict) -> bytes:
    """ONNX via torch.export (the dynamo exporter; needs onnxscript), dynamic batch, card in metadata_props."""
    import onnx

    notices = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(model, (_example(shape),), None, input_names=[ONNX_INPUT],
                                    output_names=[ONNX_OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False,
                                    report=False)
    finally:
        notices.setLevel(level)
    proto = program.model_proto
    for key, value in ((CARD_NAME, card_bytes.decode("utf-8")), ("medtl_spec", _spec_json(meta))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return _batched(module, images)


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _batched(lambda x: session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0], images)


def _compare(outputs: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(outputs.astype(np.float64) - reference.astype(np.float64))
    return {"images": int(len(reference)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "argmax_agreement": float((outputs.argmax(1) == reference.argmax(1)).mean()), "dtype": "float32"}


# ---------------------------------------------------------------------------------------------- the bundle

def inference_config() -> dict:
    """``configs/inference.json``: every ``*.npy`` under ``dataset_dir`` (one (C, H, W) image each) through
    ``models/model.ts``; logits and softmax probabilities to ``output_dir``/logits.csv and probabilities.csv.

    Plain MONAI components and expressions, no ``SupervisedEvaluator``: that needs pytorch-ignite, which
    medtl does not install. ``infer`` takes its collaborators as arguments because names inside a
    comprehension in a config expression cannot see ``@`` references.
    """
    saver = {"_target_": "CSVSaver", "output_dir": "@output_dir", "overwrite": True}
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "$os.path.join(@bundle_root, 'sample')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "batch_size": 8,
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*.npy')))]",
        "network": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "NumpyReader", "image_only": True},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": "@batch_size",
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "logits_saver": {**saver, "filename": "logits.csv"},
        "probabilities_saver": {**saver, "filename": "probabilities.csv"},
        "infer": ("$lambda loader, inferer, network, device, logits_saver, probabilities_saver: "
                  "[(logits_saver.save_batch(logits, names), probabilities_saver.save_batch(logits.softmax(1), names)) "
                  "for batch in loader "
                  "for names in [{'filename_or_obj': batch['image'].meta['filename_or_obj']}] "
                  "for logits in [inferer(batch['image'].to(device), network).float().cpu()]]"),
        "run": ["$torch.set_grad_enabled(False)",
                "$@infer(@dataloader, @inferer, @network, @device, @logits_saver, @probabilities_saver)",
                "$@logits_saver.finalize()", "$@probabilities_saver.finalize()"],
    }


def bundle_metadata(card: dict, meta: dict) -> dict:
    """``configs/metadata.json`` in the layout of MONAI's metadata schema (see :data:`BUNDLE_REQUIRED_KEYS`)."""
    import monai

    channels, height, width = (int(v) for v in meta["input_spec"]["shape"])
    classes = [str(c) for c in meta["classes"]]
    validation = card.get("validation") if isinstance(card.get("validation"), dict) else {}
    metrics = {f"val_{k}": float(v) for k, v in validation.items()
               if k in ("auc", "accuracy") and isinstance(v, (int, float))}
    intended = card.get("intended_use")
    name = str(card.get("name") or f"medtl-{meta['backbone']}")
    class_list = ", ".join(f"{i}: {c}" for i, c in enumerate(classes))
    metadata = {
        "schema": MONAI_META_SCHEMA_URL,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by medtl from {card.get('model_file', {}).get('path', 'model.pt')} "
                               f"(sha256 {card['model_file']['sha256']})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "name": name,
        "task": f"2D image classification ({', '.join(classes)})",
        "description": (f"{name}: MONAI {meta['backbone']} classifier trained by medtl (transfer learning from "
                        "DICOM). Input: a medtl-preprocessed image; the ImageNet normalisation is inside the "
                        "network. See models/model_card.json."),
        "authors": "medtl (automated export); see models/model_card.json for the training run",
        "copyright": "See models/model_card.json and the owner of the training data",
        "data_source": "medtl preprocess stage output (windowed DICOM images, see input_spec.preprocess in the card)",
        "data_type": "numpy",
        "image_classes": f"{channels} channels of one preprocessed image, float32 in [0, 1] (greyscale replicated "
                         "or 2.5D neighbour slices)",
        "pred_classes": f"logits, one per class ({class_list}); softmax gives probabilities",
        "eval_metrics": metrics,
        "intended_use": intended if isinstance(intended, str) else "Research use only; see models/model_card.json",
        "references": [],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "preprocessed", "num_channels": channels,
                "spatial_shape": [height, width], "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": {str(i): f"channel {i}" for i in range(channels)}}},
            "outputs": {"pred": {
                "type": "logits", "format": "classes", "num_channels": len(classes), "spatial_shape": [1],
                "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {str(i): c for i, c in enumerate(classes)}}},
            "post_processed_outputs": {"probabilities": {
                "type": "probabilities", "format": "classes", "num_channels": len(classes), "spatial_shape": [1],
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {str(i): c for i, c in enumerate(classes)}}},
        },
    }
    return metadata


def _bundle_readme(card: dict, meta: dict, metadata: dict, tolerance: float) -> str:
    channels, height, width = meta["input_spec"]["shape"]
    classes = ", ".join(f"`{i}` {c}" for i, c in enumerate(meta["classes"]))
    return f"""# {metadata['name']}

{metadata['description']}

## Files
- `configs/metadata.json`: MONAI bundle metadata (schema `{MONAI_META_SCHEMA_URL}`).
- `configs/inference.json`: inference over every `*.npy` in `dataset_dir`.
- `models/model.ts`: the TorchScript model; `models/model_card.json`: the model card (training data,
  validation, intended use, limitations). The card is also inside `model.ts` (extra file `{CARD_NAME}`).

## Input
One `.npy` file per image: float32 array of shape ({channels}, {height}, {width}), values in [0, 1], made by
medtl's preprocess stage with the card's `input_spec.preprocess` parameters (windowing, resizing,
channels). Do **not** normalise: the ImageNet mean/std normalisation is inside the network.

## Output
Logits, one per class ({classes}); softmax gives probabilities. The inference config writes
`output_dir/logits.csv` and `output_dir/probabilities.csv` (one row per input file: path, then one value
per class).

## Run
From Python (needs MONAI and PyTorch only):
```
import monai.bundle
monai.bundle.run(run_id="run", config_file="configs/inference.json", meta_file="configs/metadata.json",
                 bundle_root=".", dataset_dir="/path/to/npy", output_dir="/path/to/results")
```
or with MONAI's command line (it needs python-fire, which medtl installs):
```
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --dataset_dir /path/to/npy --output_dir /path/to/results
```
Check the metadata (downloads the schema from its URL, or reads a local copy given as `filepath`):
```
python -c "import monai.bundle; monai.bundle.verify_metadata(meta_file='configs/metadata.json', \\
    filepath='meta_schema.json')"
```

## Verification at export
This bundle was run by MONAI's bundle runner on the export's parity images and its logits matched the
PyTorch model's within max |Δ| {tolerance:g} (fp32); the figures are in the export's `export.json`.

## Intended use and limitations
{metadata['intended_use']}
""" + "".join(f"- {item}\n" for item in card.get("limitations", []) if isinstance(item, str))


def write_bundle(bundle: Path, ts_bytes: bytes, card_bytes: bytes, card: dict, meta: dict, tolerance: float) -> None:
    """The MONAI bundle layout under ``bundle`` (earlier contents replaced)."""
    if bundle.exists():
        shutil.rmtree(bundle)
    metadata = bundle_metadata(card, meta)
    atomic_write_text(bundle / "configs" / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    atomic_write_text(bundle / "configs" / "inference.json", json.dumps(inference_config(), indent=2) + "\n")
    atomic_write_bytes(bundle / "models" / "model.ts", ts_bytes)
    atomic_write_bytes(bundle / "models" / CARD_NAME, card_bytes)
    atomic_write_text(bundle / "docs" / "README.md", _bundle_readme(card, meta, metadata, tolerance))


def verify_bundle_metadata(meta_file: Path, schema_file: Path | None = None) -> dict:
    """Check a bundle's metadata.json: with MONAI's ``verify_metadata`` against a local schema copy if one is
    given (or in ``$MEDTL_MONAI_SCHEMA``), else against the schema's required keys. Returns what was checked.

    Raises:
        ExportError: the metadata does not pass.
    """
    schema_file = schema_file or (Path(os.environ[SCHEMA_ENV]) if os.environ.get(SCHEMA_ENV) else None)
    metadata = json.loads(Path(meta_file).read_text())
    if schema_file is not None:
        if not Path(schema_file).is_file():
            raise ExportError(f"{schema_file}: MONAI metadata schema file not found")
        from monai.bundle import verify_metadata

        try:  # an existing filepath is read as it is: verify_metadata downloads nothing
            verify_metadata(meta_file=str(meta_file), filepath=str(schema_file))
        except ValueError as exc:
            raise ExportError(f"{meta_file}: fails MONAI's metadata schema: {exc}") from exc
        return {"method": "monai.bundle.verify_metadata", "schema": metadata.get("schema"),
                "schema_file_sha256": sha256_file(Path(schema_file))}
    problems = [f"missing {k}" for k in BUNDLE_REQUIRED_KEYS if k not in metadata]
    formats = {k: v for k, v in metadata.items() if k == "network_data_format" or k.endswith("_data_format")}
    for key, value in formats.items():
        value = value if isinstance(value, dict) else {}
        problems += [f"{key}.{part} missing" for part in ("inputs", "outputs") if not isinstance(value.get(part), dict)]
        for part in ("inputs", "outputs", "post_processed_outputs"):
            tensors = value.get(part) if isinstance(value.get(part), dict) else {}
            problems += [f"{key}.{part}.{name}.{k} missing" for name, tensor in tensors.items()
                         if isinstance(tensor, dict) for k in BUNDLE_TENSOR_KEYS if k not in tensor]
    if problems:
        raise ExportError(f"{meta_file}: not valid MONAI bundle metadata: {'; '.join(problems)}")
    return {"method": "required keys of MONAI's metadata schema (no local copy of the schema; not the full schema)",
            "schema": metadata.get("schema")}


def run_bundle(bundle: Path, images: torch.Tensor) -> np.ndarray:
    """Run the bundle's inference config with MONAI's bundle runner on ``images`` (one .npy each); its logits."""
    from monai.bundle import run as bundle_run

    with tempfile.TemporaryDirectory(prefix="medtl-bundle-") as tmp:
        data, out = Path(tmp, "data"), Path(tmp, "out")
        data.mkdir()
        for i, image in enumerate(images.numpy()):
            np.save(data / f"{i:05d}.npy", image)
        grad = torch.is_grad_enabled()  # the config's run list switches gradients off for this process
        try:
            bundle_run(run_id="run", config_file=str(bundle / "configs" / "inference.json"),
                       meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                       dataset_dir=str(data), output_dir=str(out))
        finally:
            torch.set_grad_enabled(grad)
        return read_bundle_csv(out / "logits.csv", [str(data / f"{i:05d}.npy") for i in range(len(images))])


def read_bundle_csv(path: Path, files: list[str]) -> np.ndarray:
    """The rows of a ClassificationSaver CSV (``file,v0,v1,...``) in the order of ``files``."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        name, *values = line.split(",")
        rows[name] = [float(v) for v in values]
    missing = [f for f in files if f not in rows]
    if missing:
        raise ExportError(f"{path}: the bundle wrote no output for {len(missing)} of {len(files)} inputs")
    return np.array([rows[f] for f in files], dtype=np.float32)


def _summary(model_path: Path, card_bytes: bytes, meta: dict, formats: tuple[str, ...], files: dict, out_dir: Path,
             parity: dict, images: torch.Tensor, random_images: bool, seed: int, tolerance: float,
             bundle_check: dict | None) -> dict:
    import monai

    card = json.loads(card_bytes)
    versions = {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__}
    if "onnx" in formats:
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    result = {
        "format": EXPORT_FORMAT,
        "source": {"model_file": model_path.name, "sha256": sha256_file(model_path),
                   "model_card": {"name": card.get("name"), "sha256": sha256_file(out_dir / CARD_NAME)}},
        "formats": list(formats),
        "files": {name: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for name, path in files.items()},
        "input": {"name": ONNX_INPUT, "shape": ["N", *meta["input_spec"]["shape"]], "dtype": "float32",
                  "range": [0, 1], "normalisation": "inside the model (ImageNet mean/std)"},
        "output": {"name": ONNX_OUTPUT, "shape": ["N", len(meta["classes"])], "classes": list(meta["classes"]),
                   "meaning": "logits; softmax for probabilities"},
        "parity": {"tolerance": tolerance, "images": int(len(images)),
                   "image_source": f"uniform random in [0, 1], seed {seed}" if random_images
                   else f"a sample of the given images (seed {seed})",
                   "reference": "the PyTorch model (pipeline.models.load_model), fp32, CPU", **parity},
        "versions": versions,
    }
    if "torchscript" in formats or "bundle" in formats:
        result["torchscript"] = {"method": "torch.jit.trace", "card": f"extra file {CARD_NAME}"}
    if "onnx" in formats:
        result["onnx"] = {"exporter": "torch.onnx.export(dynamo=True)", "opset": ONNX_OPSET,
                          "dynamic_axes": {ONNX_INPUT: {"0": "batch"}, ONNX_OUTPUT: {"0": "batch"}},
                          "runtime": "onnxruntime CPUExecutionProvider", "card": f"metadata_props {CARD_NAME}"}
    if bundle_check is not None:
        result["bundle"] = {"metadata_check": bundle_check,
                            "inference_check": "monai.bundle.run (what python -m monai.bundle run calls) on the "
                                               "parity images"}
    return result

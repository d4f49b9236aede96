"""params.yaml read and validated at the edge: every section into its dataclass, and the messages a user reads."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from pipeline import params as P
from pipeline import data, study, train
from pipeline.errors import MedtlError
from pipeline.params import ParamsError, load_section, read_params, section, section_class

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "params.yaml"
REAL_SECTIONS = list(yaml.safe_load(REAL.read_text()))


@pytest.mark.parametrize("name", REAL_SECTIONS)
def test_every_section_of_params_yaml_loads_into_its_dataclass(name):
    """A section added to params.yaml without a registered dataclass fails here (read_params rejects it)."""
    cls = section_class(name)
    assert dataclasses.is_dataclass(cls)
    loaded = load_section(cls, REAL, name)
    assert isinstance(loaded, cls)
    cls()  # the defaults obey the constraints too
    # reading converts nothing but lists to tuples: a param recorded in an output (model card, fingerprint,
    # split summary) stays what params.yaml says, so the default run's outputs do not change
    for key, value in (read_params(REAL)[name] or {}).items():
        assert json.dumps(getattr(loaded, key)) == json.dumps(value), key


def test_the_registry_and_params_yaml_name_the_same_sections():
    assert sorted(P.SECTIONS) == sorted(REAL_SECTIONS)


def _numeric(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp in (int, float) or (bool(args) and all(_numeric(a) for a in args if a is not Ellipsis))


OWN = ["train", "model", "preprocess", "split", "evaluate", "promote", "retrain", "study"]


@pytest.mark.parametrize("cls", [section_class(n) for n in OWN] + [data.AugmentParams, study.StudyGrid],
                         ids=lambda c: c.__name__)
def test_every_numeric_field_has_a_range(cls):
    hints = typing.get_type_hints(cls)
    unbounded = [f.name for f in dataclasses.fields(cls) if _numeric(hints[f.name])
                 and all(f.metadata.get(k) is None for k in ("min", "max", "choices"))]
    assert unbounded == []


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


# (section, params.yaml text, the whole message after the file name)
MESSAGES = [
    ("train", "train: {epochs: -3}", "train.epochs: must be an integer >= 1, got -3"),
    ("train", "train: {epochs: two}", "train.epochs: expected an integer, got 'two'"),
    ("train", "train: {epochs: 2.5}", "train.epochs: expected an integer, got 2.5"),
    ("train", "train: {epochs: true}", "train.epochs: expected an integer, got True"),
    ("train", "train: {batch_size: 0}", "train.batch_size: must be an integer >= 1, got 0"),
    ("train", "train: {lr: 0}", "train.lr: must be a number in (0, 10], got 0"),
    ("train", "train: {lr: fast}", "train.lr: expected a number, got 'fast'"),
    ("train", "train: {fraction: 1.5}", "train.fraction: must be a number in (0, 1], got 1.5"),
    ("train", "train: {workers: -1}", "train.workers: must be an integer >= 0, got -1; 0 = automatic (formerly -1), 1 = in the training process"),
    ("train", "train: {channels_last: 'yes'}", "train.channels_last: expected true or false, got 'yes'"),
    ("train", "train: {strategy: finetun}", "train.strategy: must be one of feature_extraction, finetune, gradual, "
                                            "got 'finetun' (did you mean 'finetune'?); training from scratch is "
                                            "model.pretrained: none"),
    ("train", "train: {classes: [normal]}", "train.classes: need two or more distinct labels (or auto), got ['normal']"),
    ("train", "train: {classes: sometimes}", "train.classes: must be a list of two or more labels, or auto, "
                                             "got 'sometimes'"),
    ("train", "train: {classes: [normal, 1.5]}", "train.classes[1]: expected a string or an integer, got 1.5"),
    ("train", "train: {augment: {DX: {flip: 'no'}}}", "train.augment.DX.flip: expected true or false, got 'no'"),
    ("train", "train: {augment: {DX: {flop: false}}}", "train.augment.DX: unknown key 'flop' (did you mean 'flip'?)"),
    ("train", "train: {epoch: 3}", "train: unknown key 'epoch' (did you mean 'epochs'?)"),
    ("model", "model: {dropout: 1.7}", "model.dropout: must be a number in [0, 1), got 1.7"),
    ("model", "model: {backbone: resnet50}", "model.backbone: must be one of efficientnet-lite0, efficientnet-b0, "
                                             "densenet121, densenet169, densenet201, got 'resnet50'"),
    ("preprocess", "preprocess: {percentiles: [99.5, 0.5]}",
     "preprocess.percentiles: the low percentile must be below the high one, got [99.5, 0.5]"),
    ("preprocess", "preprocess: {percentiles: [0.5]}", "preprocess.percentiles: expected a list of 2 numbers, got [0.5]"),
    ("preprocess", "preprocess: {percentiles: [0, 101]}", "preprocess.percentiles[1]: must be a number in [0, 100], "
                                                          "got 101"),
    ("preprocess", "preprocess: {spacing_mm: [1, 1, x]}", "preprocess.spacing_mm[2]: expected a number, got 'x'"),
    ("preprocess", "preprocess: {window: {CT: lungs}}", "preprocess.window.CT: must be one of lung, mediastinum, "
                                                        "soft_tissue, bone, instance, percentile, dataset_percentile, "
                                                        "got 'lungs' (did you mean 'lung'?)"),
    ("preprocess", "preprocess: {workers: two}", "preprocess.workers: expected an integer, got 'two'"),
    ("preprocess", "preprocess: {channels: 2}", "preprocess.channels: must be one of 1, 3, got 2"),
    ("split", "split: {train: 0.5, val: 0.5, test: 0.5}", "split: the fractions train=0.5 val=0.5 test=0.5 sum to "
                                                          "1.5, not 1"),
    ("split", "split: {near_duplicate_distance: 65}", "split.near_duplicate_distance: must be an integer in [-1, 64], "
                                                      "got 65; -1 disables the near-duplicate search"),
    ("evaluate", "evaluate: {ci_level: 1}", "evaluate.ci_level: must be a number in (0, 1), got 1"),
    ("evaluate", "evaluate: {threshold: youdn}", "evaluate.threshold: must be one of youden, sensitivity, got 'youdn' "
                                                 "(did you mean 'youden'?)"),
    ("promote", "promote: {margin: 2}", "promote.margin: must be a number in [-1, 1], got 2; an AUC difference"),
    ("retrain", "retrain: {timezone: Mars/Base}", "retrain.timezone: not a known time zone name (e.g. UTC, "
                                                  "Europe/Berlin), got 'Mars/Base'"),
    ("retrain", "retrain: {cron: '0 3 *'}", "retrain.cron: must be five fields (minute hour day month weekday) or "
                                            "one of @hourly, @daily, @midnight, @weekly, @monthly, @yearly, "
                                            "@annually, got '0 3 *'"),
    ("study", "study: {grids: {cpu: {epochs: 0}}}", "study.grids.cpu.epochs: must be an integer >= 1, got 0"),
    ("study", "study: {grids: {cpu: {strategies: [scratch, lora]}}}",
     "study.grids.cpu.strategies[1]: must be one of scratch, feature_extraction, finetune, gradual, got 'lora'"),
    ("study", "study: {grid: cpux, grids: {cpu: {}}}", "study.grid: 'cpux' is not a grid of study.grids "
                                                       "(did you mean 'cpu'?)"),
    ("data", "data: {lesions: 3}", "data.lesions: expected a string or null, got 3"),
    ("train", "trian: {epochs: 3}", "unknown section 'trian' (did you mean 'train'?)"),
    ("train", "train: [1, 2]", "train: must be a mapping of keys, got [1, 2]"),
    ("train", "- train", "the top level must be a mapping of sections, got ['train']"),
]


@pytest.mark.parametrize("name, text, message", MESSAGES, ids=[m[1] for m in MESSAGES])
def test_a_bad_value_is_one_line_naming_the_file_key_rule_and_value(tmp_path, name, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_section(section_class(name), path, name)
    assert str(err.value) == f"{path}: {message}"
    assert isinstance(err.value, MedtlError) and isinstance(err.value, ValueError)


def test_an_unknown_key_without_a_close_match_lists_the_known_ones(tmp_path):
    path = _write(tmp_path, "model: {zzz: 1}")
    with pytest.raises(ParamsError, match=r"model: unknown key 'zzz'; known keys: backbone, pretrained, "
                                          r"allow_download, dropout$"):
        load_section(section_class("model"), path, "model")


def test_a_missing_params_file_is_an_error_not_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    message = f"{path} does not exist: run medtl in the project folder or pass --params FILE"
    with pytest.raises(ParamsError) as err:
        load_section(section_class("split"), path, "split")
    assert str(err.value) == message
    with pytest.raises(ParamsError, match="does not exist"):
        read_params(path)
    with pytest.raises(ParamsError, match="is a directory"):
        read_params(tmp_path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: [1\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML at line \d+"):
        read_params(path)


def test_values_are_normalised_as_the_annotation_says(tmp_path):
    path = _write(tmp_path, "train: {epochs: 3.0, lr: 1e-3, classes: [0, 1], backbone_lr_mult: 1}\n"
                            "preprocess: {percentiles: [1, 99], spacing_mm: [1, 1, 2]}\n"
                            "evaluate: {subgroups: [site]}\nfanout: {address: null}\n")
    train = load_section(section_class("train"), path, "train")
    assert train.epochs == 3 and isinstance(train.epochs, int)
    assert train.lr == 0.001, "PyYAML reads 1e-3 as text; YAML 1.2 and DVC read a number"
    assert train.classes == ("0", "1"), "labels 0/1 written as YAML integers are the labels '0' and '1'"
    assert train.backbone_lr_mult == 1 and type(train.backbone_lr_mult) is int, "an int stays an int"
    pre = load_section(section_class("preprocess"), path, "preprocess")
    assert pre.percentiles == (1.0, 99.0) and pre.spacing_mm == (1.0, 1.0, 2.0)
    assert load_section(section_class("evaluate"), path, "evaluate").subgroups == ("site",)
    assert load_section(section_class("fanout"), path, "fanout").address is None
    assert load_section(section_class("train"), _write(tmp_path, "train: {classes: auto}"), "train").auto_classes
    # a section the file does not have gets its defaults
    assert load_section(section_class("split"), path, "split") == section_class("split")()


def test_a_command_line_override_is_checked_and_named_as_such(tmp_path):
    path = _write(tmp_path, "train: {epochs: 3}")
    assert load_section(section_class("train"), path, "train", epochs=5, device=None).epochs == 5
    with pytest.raises(ParamsError) as err:
        load_section(section_class("train"), path, "train", epochs=-3)
    assert str(err.value) == "train.epochs: must be an integer >= 1, got -3 (given on the command line)"


def test_dataclasses_built_in_code_obey_the_same_rules():
    from pipeline import preprocess

    with pytest.raises(ParamsError, match=r"^train.epochs: must be an integer >= 1, got 0$"):
        train.TrainParams(epochs=0)
    with pytest.raises(ParamsError, match=r"^preprocess.percentiles: the low percentile must be below"):
        preprocess.PreprocessParams(percentiles=(50, 50))
    with pytest.raises(ParamsError, match=r"study: seeds \[1, 1\]: need one or more distinct values"):
        study.StudyGrid(seeds=[1, 1])
    assert train.TrainParams(classes=["a", "b"]).classes == ("a", "b")


def test_section_without_a_file_names_only_the_key():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        n: int = P.param(1, min=1)
        ratio: float | None = P.param(None, min=0, max=1, max_exclusive=True)
        names: tuple[str, ...] = P.param(("a",), choices=("a", "b"))

    assert section(Toy, {"n": 2, "ratio": 0.5, "names": ["b", "a"]}) == Toy(2, 0.5, ("b", "a"))
    assert section(Toy, {"ratio": None}).ratio is None
    with pytest.raises(ParamsError, match=r"^toy.ratio: must be a number in \[0, 1\), got 1$"):
        section(Toy, {"ratio": 1}, where="toy")
    with pytest.raises(ParamsError, match=r"^toy.names\[1\]: must be one of a, b, got 'c'$"):
        section(Toy, {"names": ["a", "c"]}, where="toy")
    with pytest.raises(ParamsError, match=r"^toy.ratio: expected a number or null, got 'half'$"):
        section(Toy, {"ratio": "half"}, where="toy")
    with pytest.raises(ParamsError, match=r"^toy.n: must be an integer >= 1, got nan$|expected an integer"):
        section(Toy, {"n": float("nan")}, where="toy")

"""Typed parameters, read once at the edge (CLI) from params.yaml, and validated when read.

Each stage owns a frozen dataclass named after it; the keys of a params.yaml section are the
dataclass's field names. A stage never reads params.yaml itself: the CLI (or a flow) calls
:func:`load_section` and passes the object in.

Validation, in this order, every failure a :class:`ParamsError` whose one-line message names the
file, the ``section.key``, the rule and the value given (params values are not PHI)::

    params.yaml: train.epochs: must be an integer >= 1, got -3
    params.yaml: ingest.workers: expected an integer, got 'two'

- the file exists and is a mapping of known sections (:data:`SECTIONS`; a misspelt one gets a
  suggestion), each a mapping of the dataclass's field names (likewise);
- each value has its annotated type (``int``, ``float``, ``bool``, ``str``, ``tuple[X, ...]``,
  ``X | None``, ``dict[K, V]``, nested dataclasses): YAML lists become tuples, a whole float is an
  integer, an integer is a number (left an int, so outputs that record params do not change), a
  number in exponent notation without a dot (``1e-3``, text to PyYAML but a number to YAML 1.2 and DVC)
  is a number, and nothing else is converted (``true``/``false`` only for a bool, no numbers from words);
- ranges and choices declared with :func:`param`;
- rules between fields, in each dataclass's ``__post_init__`` (raising ParamsError).

A dataclass built directly in code (tests, a flow) gets the same type, range and choice checks if
its ``__post_init__`` calls :func:`check`, as the stages' own dataclasses do.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib
import numbers
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import MedtlError

T = TypeVar("T")

#: the sections of params.yaml and the dataclass each is read into (module:name, imported when needed:
#: a stage's module may be heavy). A section not listed here is an error, so a new one needs its dataclass.
SECTIONS: dict[str, str] = {
    "data": "pipeline.params:DataParams",
    "synth": "pipeline.synth:SynthParams",
    "ingest": "pipeline.ingest:IngestParams",
    "preprocess": "pipeline.preprocess:PreprocessParams",
    "fanout": "pipeline.fanout:FanoutParams",
    "split": "pipeline.split:SplitParams",
    "model": "pipeline.models:ModelParams",
    "train": "pipeline.train:TrainParams",
    "evaluate": "pipeline.evaluate:EvaluateParams",
    "promote": "pipeline.promote:PromoteParams",
    "predict": "pipeline.predict:PredictParams",
    "pacs": "pipeline.sources.pacs:PacsParams",
    "retrain": "flows.retrain:RetrainParams",
    "study": "pipeline.study:StudyParams",
}


class ParamsError(MedtlError, ValueError):
    """params.yaml is missing, malformed, or has a key, type or value the stage does not accept."""


class _TypeMismatch(ParamsError):
    """The value at ``key`` itself has the wrong type (a union tries its next member)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _FromOverride(ParamsError):
    """A value given on the command line, not in the file: the message does not name the file."""


def param(default: Any, *, min: float | None = None, max: float | None = None,  # noqa: A002 - names of the bounds
          choices: Iterable | None = None, min_exclusive: bool = False, max_exclusive: bool = False,
          hint: str | None = None) -> Any:
    """A dataclass field of a params section with its constraints, checked when params are read.

    ``min``/``max`` bound numbers (``min_exclusive``/``max_exclusive``: the bound itself is not allowed);
    ``choices`` lists the allowed values. For a tuple/list-typed field both apply to each item, for a
    dict-typed one to each value. ``hint`` is appended to a violation's message. Types come from the
    annotation.
    """
    metadata = {"min": min, "max": max, "choices": None if choices is None else tuple(choices),
                "min_exclusive": min_exclusive, "max_exclusive": max_exclusive, "hint": hint}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class DataParams:
    """``data`` section of params.yaml: where the site's export is (dvc.yaml's ingest stage reads it).

    Attributes:
        source: where the DICOM comes from: ``folder`` (an export at ``raw_dir``), or a PACS,
            ``dicomweb`` or ``dimse`` (the ``pull`` stage retrieves into ``data/raw/pacs``, which
            ``raw_dir`` then names; server settings in the ``pacs`` section).
        raw_dir: the DICOM export directory.
        labels: the labels CSV.
        lesions: lesion ground-truth sidecar (Grad-CAM localisation only, never a label); ``none`` or
            null: none.
    """

    source: str = param("folder", choices=("folder", "dicomweb", "dimse"))
    raw_dir: str = "data/raw/synth"
    labels: str = "data/raw/synth/labels.csv"
    lesions: str | None = "data/raw/synth/lesions.csv"

    def __post_init__(self) -> None:
        check(self, "data")
        for name in ("raw_dir", "labels"):
            if not getattr(self, name).strip():
                raise ParamsError(f"data.{name}: must be a path, got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------------ reading


def section_class(name: str) -> type:
    """The dataclass of params.yaml section ``name`` (see :data:`SECTIONS`)."""
    module, _, attr = SECTIONS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def read_params(path: Path) -> dict[str, Any]:
    """Read the whole params file: a mapping of known sections, each a mapping (or empty).

    Raises:
        ParamsError: the file does not exist, is not YAML, or has an unknown or malformed section.
    """
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} does not exist: run medtl in the project folder or pass --params FILE")
    if path.is_dir():
        raise ParamsError(f"{path}: is a directory, not a params file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections, got {_show(data)}")
    for name in data:
        if name not in SECTIONS:
            raise ParamsError(f"{path}: unknown section {name!r}{suggest(name, SECTIONS, 'known sections')}")
        if data[name] is not None and not isinstance(data[name], dict):
            raise ParamsError(f"{path}: {name}: must be a mapping of keys, got {_show(data[name])}")
    return data


def section(cls: type[T], values: Mapping[str, Any] | None, *, where: str = "params",
            file: Path | str | None = None, overridden: Iterable[str] = ()) -> T:
    """Build the dataclass ``cls`` from a mapping, checking keys, types, ranges and choices.

    Args:
        cls: the section's dataclass.
        values: the section's mapping (None: all defaults).
        where: the dotted name of the section in messages (``train``, ``study.grids.cpu``).
        file: the params file, named at the start of every message (None: not named).
        overridden: keys given on the command line rather than in ``file``.

    Raises:
        ParamsError: naming ``file``, ``where.key``, the rule and the value.
    """
    try:
        if values is not None and not isinstance(values, Mapping):
            raise ParamsError(f"{where}: must be a mapping of keys, got {_show(values)}")
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = [k for k in values if k not in fields]
        if unknown:
            parts = [f"{k!r}{suggest(str(k), fields)}" for k in unknown]
            known = "" if all("did you mean" in p for p in parts) else f"; known keys: {', '.join(fields)}"
            raise ParamsError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}{known}")
        hints = _hints(cls)
        overridden = set(overridden)
        converted = {}
        for key, value in values.items():
            try:
                converted[key] = _field_value(value, hints[key], fields[key].metadata, f"{where}.{key}")
            except ParamsError as exc:
                if key in overridden:
                    raise _FromOverride(f"{exc} (given on the command line)") from exc
                raise
        try:
            return cls(**converted)
        except ParamsError:
            raise
        except ValueError as exc:  # a dataclass whose __post_init__ raises plain ValueErrors (naming the key)
            raise ParamsError(str(exc)) from exc
    except _FromOverride:
        raise
    except ParamsError as exc:
        if file is None:
            raise
        raise ParamsError(f"{file}: {exc}") from exc


def load_section(cls: type[T], path: Path, name: str, **overrides: Any) -> T:
    """Load section ``name`` of params file ``path`` into ``cls``; non-None overrides (command-line
    options) win. A section absent from the file gets the dataclass's defaults; a missing file is an error."""
    if name not in SECTIONS:
        raise KeyError(f"no params section {name!r} is registered in pipeline.params.SECTIONS")
    values = dict(read_params(path).get(name) or {})
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    return section(cls, values, where=name, file=path, overridden=given)


def check(obj: Any, where: str) -> None:
    """Check (and normalise: lists to tuples, whole floats to ints) the fields of a dataclass instance.

    Called first in the stages' ``__post_init__``, so an object built in code obeys the same rules as
    one read from params.yaml; ``where`` is the section's dotted name for messages.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        new = _field_value(value, hints[f.name], f.metadata, f"{where}.{f.name}")
        if new is not value:
            object.__setattr__(obj, f.name, new)


# ----------------------------------------------------------------------------------- checking


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _field_value(value: Any, tp: Any, metadata: Mapping, key: str) -> Any:
    value = _convert(value, tp, key)
    _constrain(value, tp, metadata, key)
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def suggest(name: str, known: Iterable[str], label: str | None = None) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known``; else ``; <label>: a, b, c`` (or nothing without a label)."""
    match = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.75)
    if match:
        return f" (did you mean {match[0]!r}?)"
    return f"; {label}: {', '.join(map(str, known))}" if label else ""


#: a number in exponent notation without a dot (``1e-3``): text to PyYAML, a float to YAML 1.2 (and to DVC)
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "true/false values"),
          str: ("a string", "strings"), type(None): ("null", "nulls")}


def _describe(tp: Any, plural: bool = False) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp in _WORDS:
        return _WORDS[tp][plural]
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if origin in (tuple, list) or tp in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_describe(args[0], True)}" if len(set(args)) == 1 else "a list"
        inner = f" of {_describe(args[0], True)}" if args and args[0] is not Any else ""
        return ("lists" if plural else "a list") + inner
    if origin is dict or tp is dict or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return "mappings" if plural else "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return getattr(tp, "__name__", str(tp))


def _mismatch(key: str, tp: Any, value: Any) -> _TypeMismatch:
    return _TypeMismatch(key, f"{key}: expected {_describe(tp)}, got {_show(value)}")


def _convert(value: Any, tp: Any, key: str) -> Any:  # noqa: C901 - one branch per kind of annotation
    """``value`` as annotation ``tp`` wants it, or a ParamsError naming ``key``."""
    if tp is Any or tp is object:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except ParamsError as exc:
                errors.append(exc)
        deeper = [e for e in errors if not (isinstance(e, _TypeMismatch) and e.key == key)]
        raise deeper[0] if deeper else _mismatch(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _mismatch(key, tp, value)
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-3 as text; YAML 1.2 and DVC read a number
        raise _mismatch(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(key, tp, value)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ParamsError(f"{key}: expected {_describe(tp)}, got {_show(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else list(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(key, tp, value)
        k_type, v_type = args if args else (Any, Any)
        return {_convert(k, k_type, f"{key} key {k!r}"): _convert(v, v_type, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value in args:
            return value
        raise _mismatch(key, tp, value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return section(tp, value, where=key)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _mismatch(key, tp, value)
    return value


def _scalar(tp: Any) -> Any:
    """The type the constraints of a field apply to: an item's for tuples/lists, a value's for dicts."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _scalar(options[0]) if len(options) == 1 else tp
    if origin in (tuple, list) and args:
        return args[0]
    if origin is dict and args:
        return args[1]
    return tp


def _fmt(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range(meta: Mapping) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return (f"in {'(' if meta.get('min_exclusive') else '['}{_fmt(lo)}, "
                f"{_fmt(hi)}{')' if meta.get('max_exclusive') else ']'}")
    if lo is not None:
        return f"{'>' if meta.get('min_exclusive') else '>='} {_fmt(lo)}"
    return f"{'<' if meta.get('max_exclusive') else '<='} {_fmt(hi)}"


def _constrain(value: Any, tp: Any, meta: Mapping, key: str) -> None:
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if value is None or (lo is None and hi is None and choices is None):
        return
    if isinstance(value, (tuple, list)):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = [(f"{key}.{k}", v) for k, v in value.items()]
    else:
        items = [(key, value)]
    scalar = _scalar(tp)
    hint = f"; {meta['hint']}" if meta.get("hint") else ""
    for where, item in items:
        if (lo is not None or hi is not None) and isinstance(item, numbers.Real) and not isinstance(item, bool):
            ok = True
            if lo is not None:
                ok = item > lo if meta.get("min_exclusive") else item >= lo
            if ok and hi is not None:
                ok = item < hi if meta.get("max_exclusive") else item <= hi
            if not ok:
                kind = _WORDS[int][0] if scalar is int else _WORDS[float][0]
                raise ParamsError(f"{where}: must be {kind} {_range(meta)}, got {_show(item)}{hint}")
        if choices is not None and item not in choices:
            suggestion = suggest(item, map(str, choices)) if isinstance(item, str) else ""
            raise ParamsError(f"{where}: must be one of {', '.join(map(str, choices))}, got {_show(item)}"
                              f"{suggestion}{hint}")

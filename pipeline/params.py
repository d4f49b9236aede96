"""Typed parameters, read once at the edge (CLI) from params.yaml.

Each stage owns a frozen dataclass named after it; the keys of a params.yaml section are the
dataclass's field names. A stage never reads params.yaml itself: the CLI (or a flow) calls
:func:`load_section` and passes the object in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


from pipeline.errors import MedtlError


class ParamsError(MedtlError, ValueError):
    """params.yaml is missing, malformed, or has a key the stage does not know."""


def param(default: Any, *, min: float | None = None, max: float | None = None,  # noqa: A002 - names of the bounds
          choices: tuple | None = None, min_exclusive: bool = False) -> Any:
    """A dataclass field of a params section with its constraints, checked when params are read.

    ``min``/``max`` bound numbers (``min_exclusive``: the minimum itself is not allowed); ``choices``
    lists the allowed values (for a tuple-typed field: of each item). Types come from the annotation.
    """
    kind = dict if isinstance(default, dict) else list if isinstance(default, list) else None
    metadata = {"min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive}
    if kind is not None:
        return dataclasses.field(default_factory=lambda: kind(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def read_params(path: Path) -> dict[str, Any]:
    """Read the whole params file; a missing file gives an empty mapping (defaults apply)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def section(cls: type[T], values: dict[str, Any] | None, *, where: str = "params") -> T:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**values)


def load_section(cls: type[T], path: Path, name: str, **overrides: Any) -> T:
    """Load section ``name`` of params file ``path`` into ``cls``; non-None overrides win."""
    values = dict(read_params(path).get(name) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return section(cls, values, where=f"{path}:{name}")

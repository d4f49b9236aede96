"""What the project declares matches what its code does: each DVC stage's code deps are the modules it
imports (else a change to shared code does not rerun the stage), and every third-party module the
code imports is a declared dependency (else a fresh install misses it)."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: The module each stage's command (``medtl <stage>``) runs. The CLI itself only parses arguments and
#: params and is deliberately no stage's dependency (its change would rerun everything).
STAGE_MODULES = {"synth": "pipeline/synth/__init__.py", "pull": "pipeline/sources/pacs.py", "ingest": "pipeline/ingest.py",
                 "preprocess": "pipeline/preprocess.py", "split": "pipeline/split.py",
                 "train": "pipeline/train.py", "evaluate": "pipeline/evaluate.py"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in ``path``, at any depth (function-level ones too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the package of ``path``
                package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-node.level] if path.name != "__init__.py"
                                   else path.relative_to(ROOT).parent.parts[:len(path.relative_to(ROOT).parent.parts) - node.level + 1])
                module = f"{package}.{node.module}" if node.module else package
            else:
                module = node.module or ""
            out.append((module, [alias.name for alias in node.names]))
    return out


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_modules(start: str) -> set[str]:
    """Repository-relative paths of ``start`` and every ``pipeline`` module it imports, transitively."""
    seen: set[Path] = set()
    todo = [ROOT / start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module, names in _imports(path):
            if not module.split(".")[0] == "pipeline":
                continue
            for dotted in [module] + [f"{module}.{n}" for n in names]:
                found = _module_file(dotted)
                if found is not None:
                    todo.append(found)
    return {p.relative_to(ROOT).as_posix() for p in seen if p.name != "__init__.py" or p.stat().st_size}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_a_stage_depends_on_every_pipeline_module_it_imports(stage):
    dvc_stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = [d for d in dvc_stage.get("deps", []) if isinstance(d, str)]
    imported = project_modules(STAGE_MODULES[stage])
    assert STAGE_MODULES[stage].rsplit("/__init__.py", 1)[0] in {p.rsplit("/__init__.py", 1)[0] for p in imported}
    missing = sorted(p for p in imported if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} imports but does not depend on {missing}"
    code_deps = [d for d in deps if d.startswith("pipeline/") and d.endswith(".py")]
    unused = sorted(d for d in code_deps if d not in imported)
    assert not unused, f"dvc.yaml stage {stage} depends on modules it never imports: {unused}"


def test_the_import_walk_sees_function_level_and_package_imports():
    # evaluate imports report inside a function and pipeline.lesions by ``from pipeline.lesions import``
    evaluate = project_modules("pipeline/evaluate.py")
    assert {"pipeline/report.py", "pipeline/lesions.py", "pipeline/data.py", "pipeline/device.py"} <= evaluate
    assert "pipeline/train.py" not in evaluate, "evaluate must not need the training code"
    assert "pipeline/synth/rendering.py" in project_modules("pipeline/synth/__init__.py")


def _declared() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    import tomllib

    project = tomllib.loads(text)["project"]
    requirements = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _third_party(folders: list[str]) -> dict[str, str]:
    """Top-level third-party module -> a file importing it, over the ``.py`` files under ``folders``."""
    found = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, _ in _imports(path):
                top = module.split(".")[0]
                if top and top not in sys.stdlib_module_names and top not in ("pipeline", "flows", "tests", "benchmarks"):
                    found.setdefault(top, path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("folders", [["pipeline", "flows"], ["tests"]], ids=["code", "tests"])
def test_every_imported_third_party_module_is_a_declared_dependency(folders):
    distributions = packages_distributions()
    declared = _declared()
    undeclared = {}
    for module, where in _third_party(folders).items():
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        if not names & declared:
            undeclared[module] = (where, sorted(names))
    assert not undeclared, f"imported but not declared in pyproject.toml (module: file, distributions): {undeclared}"

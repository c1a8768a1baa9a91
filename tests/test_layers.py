"""The layer order of ``docs/design.md``: every module imports only its own or lower layers.

Every ``.py`` under ``src/tokenlab`` is parsed with ``ast``; every ``import tokenlab.X``, ``from tokenlab.X import
...``, ``from tokenlab import X`` and relative import counts, lazy imports inside functions included:

    0  tokenlab.errors, tokenlab.utils.*
    1  tokenlab.models, tokenlab.losses, tokenlab.data     (and not each other)
    2  tokenlab.methods
    3  tokenlab.engine                                     (and only the protocol of tokenlab.methods)
    4  tokenlab.eval
    5  tokenlab.cli, tokenlab.studies, tokenlab.demo, tokenlab/__init__

Each test prints every violation it finds, so one run lists all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tokenlab

SRC = Path(tokenlab.__file__).parent
LAYERS = {
    "errors": 0, "utils": 0,
    "models": 1, "losses": 1, "data": 1,
    "methods": 2,
    "engine": 3,
    "eval": 4,
    "cli": 5, "studies": 5, "demo": 5,
}  # fmt: skip
TOP = 5  # the package itself (tokenlab/__init__.py) and anything not listed
# What the engine may take from tokenlab.methods: the registry and the protocol, never a concrete method.
METHOD_PROTOCOL = {"Method", "StepContext", "TrainPlan", "build_method", "get_method_class", "list_methods"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _group(module: str) -> str:
    """``tokenlab.data.sampler`` -> ``data``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    return LAYERS.get(_group(module), TOP)


def _imports(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """``(line, imported tokenlab module, names taken from it)`` for every import of tokenlab in ``path``."""
    return _imports_in(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_in(source: str, module: str, is_package: bool) -> list[tuple[int, str, tuple[str, ...]]]:
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, ()) for a in node.names if a.name.split(".")[0] == "tokenlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tokenlab":
                continue
            names = tuple(a.name for a in node.names)
            if target == "tokenlab":  # from tokenlab import models, errors: each name is a module
                found += [(node.lineno, f"tokenlab.{n}", ()) for n in names]
            else:
                found.append((node.lineno, target, names))
    return found


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _violations(layers: range) -> list[str]:
    out = []
    for path in _sources():
        module = _module_name(path)
        own = _layer(module)
        if own not in layers:
            continue
        for line, target, names in _imports(path):
            where = f"{path.relative_to(SRC.parent)}:{line}: {module} (layer {own}) imports {target}"
            if _group(target) == _group(module):
                continue
            theirs = _layer(target)
            if theirs > own:
                out.append(f"{where} (layer {theirs}, higher)")
            elif theirs == own == 1:
                out.append(f"{where} (a sibling at layer 1)")
            if _group(module) == "engine" and _group(target) == "methods":
                if target != "tokenlab.methods":
                    out.append(f"{where}: the engine may not import a concrete method module")
                elif set(names) - METHOD_PROTOCOL:
                    out.append(f"{where}: {sorted(set(names) - METHOD_PROTOCOL)} is not the method protocol")
    return out


def test_the_parser_sees_lazy_relative_and_package_imports() -> None:
    source = """
import os
import tokenlab.models.fan
from tokenlab import errors, eval
from . import sampler
from ..methods import stl
def lazy():
    from tokenlab.engine import train
"""
    found = {(t, names) for _, t, names in _imports_in(source, "tokenlab.data.transforms", False)}
    assert found == {
        ("tokenlab.models.fan", ()), ("tokenlab.errors", ()), ("tokenlab.eval", ()), ("tokenlab.data", ("sampler",)),
        ("tokenlab.methods", ("stl",)), ("tokenlab.engine", ("train",)),
    }  # fmt: skip
    real = {t for _, t, _ in _imports(SRC / "engine" / "builders.py")}
    assert "tokenlab.models" in real  # imported inside build_model only


@pytest.mark.parametrize("layer", range(4))
def test_layers_0_to_3_import_only_lower_layers(layer: int) -> None:
    bad = _violations(range(layer, layer + 1))
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_engine_names_no_concrete_method_even_by_string() -> None:
    """``importlib.import_module("tokenlab.methods.stl")`` would bypass the import check."""
    bad = []
    for path in sorted((SRC / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith("tokenlab.methods."):
                    bad.append(f"{path.name}:{node.lineno} names {node.value!r}")
    assert not bad, "\n".join(bad)


def test_layers_4_and_5_import_only_lower_layers() -> None:
    bad = _violations(range(4, 6))
    assert not bad, "layer violations:\n" + "\n".join(bad)

"""Pipeline recipes: TOML files naming passes, their options and the validation gate.

Built-in recipes live in the repository's top-level ``passes/`` folder, installed into the wheel
as the ``onnxcompress._recipes`` package. A recipe looks like::

    description = "Fold BN, then simplify"
    requires = ["calib"]   # optional: the recipe refuses to run without calibration data
                           # (implied when a pass needs it, e.g. quantize_int8)

    [gate]                 # optional: overrides the gate defaults of the passes' numerics
    min_cosine = 0.99      # keys: the Gate thresholds, numbers in their range

Everything is checked when the recipe loads: keys, pass names, options (types, ranges,
combinations), the pass order (:func:`~onnxcompress.pipeline.manager.check_pipeline`) and the
gate thresholds (:func:`~onnxcompress.pipeline.validate.gate_problem`).

    [[pass]]
    name = "fold_bn"

    [[pass]]
    name = "prune_channels"
    ratio = 0.3

An optional ``[auto]`` table gives ``onnxcompress auto --recipe`` its defaults: ``target`` (a list of
``"latency=0.5"``-style strings), ``max_drop`` and/or ``min_cosine``. A recipe with an ``[auto]``
table may have no ``[[pass]]`` (then it serves ``auto`` only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import read_toml
from onnxcompress.core.pass_api import Pass
from onnxcompress.pipeline.manager import check_pipeline, get_pass
from onnxcompress.pipeline.validate import gate_problem

__all__ = [
    "REQUIREMENTS",
    "Recipe",
    "builtin_recipes",
    "check_requirements",
    "load_recipe",
]

_TOP_KEYS = {"auto", "description", "gate", "pass", "requires"}
_AUTO_KEYS = {"target", "max_drop", "min_cosine"}

#: What a recipe may require (``requires = [...]``) and how the error message asks for it.
REQUIREMENTS = {"calib": "calibration data (give --calib PATH, or calib=... in the API)"}


@dataclass
class Recipe:
    """A parsed recipe (``requires`` includes ``calib`` when a pass needs calibration data)."""

    name: str
    description: str
    passes: list[Pass]
    gate: dict[str, float] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    auto: dict = field(default_factory=dict)


def _builtin_dir() -> Path:
    try:
        root = resources.files("onnxcompress._recipes")
        if root.is_dir():
            return Path(str(root))
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "passes"  # running from a source checkout


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe names (file stems) and their paths."""
    folder = _builtin_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def load_recipe(ref: str | os.PathLike) -> Recipe:
    """Load a recipe by built-in name (``default``) or by path.

    Raises:
        InputError: Unknown recipe, bad TOML, unknown keys, unknown pass or option, an option out
            of range, a pass before the pass that writes what it reads, a bad gate threshold.
    """
    path = Path(ref)
    builtin = builtin_recipes()
    if not path.is_file():
        if str(ref) not in builtin:
            raise InputError(f"unknown recipe {str(ref)!r}; built-in recipes: {', '.join(builtin)} (or give a path)")
        path = builtin[str(ref)]
    data = read_toml(path)
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(_TOP_KEYS))}")
    entries = data.get("pass", [])
    if not isinstance(entries, list) or not (entries or "auto" in data):
        raise InputError(f"{path}: a recipe needs at least one [[pass]] table (or an [auto] table)")
    passes = [_pass(path, entry) for entry in entries]
    try:
        check_pipeline(passes)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return Recipe(path.stem, str(data.get("description", "")), passes, _gate(path, data), _requires(path, data, passes),
                  _auto(path, data))


def _auto(path: Path, data: dict) -> dict:
    """The ``[auto]`` table, its keys and value types checked (values are checked by ``auto``)."""
    table = data.get("auto", {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: [auto] must be a table")
    unknown = sorted(set(table) - _AUTO_KEYS)
    if unknown:
        raise InputError(f"{path}: [auto] unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(_AUTO_KEYS))}")
    target = table.get("target")
    if isinstance(target, str):
        table = {**table, "target": [target]}
    elif target is not None and not (isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise InputError(f"{path}: [auto] target must be a list of strings like \"latency=0.5\"")
    for key in ("max_drop", "min_cosine"):
        value = table.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{path}: [auto] {key} must be a number")
    return dict(table)


def _pass(path: Path, entry: object) -> Pass:
    if not isinstance(entry, dict):
        raise InputError(f"{path}: 'pass' must be an array of tables ([[pass]])")
    opts = dict(entry)
    name = opts.pop("name", None)
    if not name or not isinstance(name, str):
        raise InputError(f"{path}: every [[pass]] needs a name (a string)")
    try:
        return get_pass(name)(**opts)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _gate(path: Path, data: dict) -> dict[str, float]:
    gate = data.get("gate", {})
    if not isinstance(gate, dict):
        raise InputError(f"{path}: [gate] must be a table")
    for key, value in gate.items():
        problem = gate_problem(key, value)
        if problem:
            raise InputError(f"{path}: [gate] {key} = {value!r}: {problem}")
    return gate


def _requires(path: Path, data: dict, passes: list[Pass]) -> tuple[str, ...]:
    requires = data.get("requires", [])
    if not isinstance(requires, list) or any(r not in REQUIREMENTS for r in requires):
        raise InputError(f"{path}: requires must be a list of: {', '.join(REQUIREMENTS)}")
    if "calib" not in requires and any(p.needs_calibration() for p in passes):
        requires = [*requires, "calib"]
    return tuple(requires)


def check_requirements(recipe: Recipe, *, calib: object = None) -> None:
    """Fail early when ``recipe`` needs something the caller did not give.

    Raises:
        InputError: ``recipe <name> needs calibration data (...)``.
    """
    given = {"calib": calib is not None}
    for need in recipe.requires:
        if not given.get(need, False):
            raise InputError(f"recipe {recipe.name} needs {REQUIREMENTS[need]}")

"""The report's inputs: the JSON files ``optimize``, ``bench``, ``sensitivity`` and ``auto`` write, read,
told apart by their keys, checked against the fields the report uses, and labelled by file name."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcompress.core.errors import InputError

__all__ = ["Source", "Inputs", "load_inputs"]


@dataclass
class Source:
    """One input JSON file: its kind, a short unique label and its content."""

    path: str
    kind: str
    label: str
    data: dict


@dataclass
class Inputs:
    """The input files by kind, in the order given."""

    runs: list[Source] = field(default_factory=list)
    benches: list[Source] = field(default_factory=list)
    sensitivities: list[Source] = field(default_factory=list)
    autos: list[Source] = field(default_factory=list)

    def all(self) -> list[Source]:
        """Every source: runs, then benches, then sensitivity scans, then auto searches."""
        return self.runs + self.benches + self.sensitivities + self.autos


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a JSON text file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _kind(path: Path, data: Any) -> str:
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object written by optimize, bench, sensitivity or auto")
    if data.get("kind") == "auto":
        return "auto"
    if data.get("kind") == "sensitivity" or "layers" in data:
        return "sensitivity"
    if {"before", "after", "passes"} <= set(data):
        return "optimize"
    if {"machine", "models"} <= set(data):
        return "bench"
    raise InputError(f"{path}: not the JSON of optimize, bench, sensitivity or auto (keys: {', '.join(sorted(data)[:6])})")


_NUM = (int, float)
_SCHEMA: dict[str, dict[str, Any]] = {
    "optimize": {"before": {"file_bytes": _NUM, "params": _NUM, "macs": _NUM, "per_node": list},
                 "after": {"file_bytes": _NUM, "params": _NUM, "macs": _NUM, "per_node": list},
                 "passes": [{"pass": str}]},
    "bench": {"models": [{"name": str, "median_ms": _NUM, "p90_ms": _NUM, "min_ms": _NUM}]},
    "sensitivity": {"layers": [{"node": str}]},
    "auto": {"targets": dict, "gate": dict, "signals": dict, "evaluated": int, "cached": int,
             "candidates": [{"spec": str, "label": str}]},
}


def _check(value: Any, schema: Any, where: str) -> None:
    """Raise InputError naming the first place where ``value`` does not fit ``schema``."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected an object")
        for key, sub in schema.items():
            if key not in value:
                raise InputError(f"{where}: missing key {key!r}")
            _check(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list")
        for i, item in enumerate(value):
            _check(item, schema[0], f"{where}[{i}]")
    elif not isinstance(value, schema) or isinstance(value, bool):
        raise InputError(f"{where}: unexpected value {str(value)[:40]!r}")


def _labels(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with ``-2``, ``-3`` suffixes in order."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.name.removesuffix(".json") or "input"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def load_inputs(paths: Sequence[str | os.PathLike]) -> Inputs:
    """Read and check the JSON files, sorted by kind (order kept within a kind).

    Raises:
        InputError: No file, an unreadable or malformed file, or one of an unknown kind.
    """
    if not paths:
        raise InputError("no input JSON given")
    files = [Path(p) for p in paths]
    inputs = Inputs()
    for path, label in zip(files, _labels(files)):
        data = _read_json(path)
        kind = _kind(path, data)
        _check(data, _SCHEMA[kind], path.name)
        getattr(inputs, {"optimize": "runs", "bench": "benches", "sensitivity": "sensitivities", "auto": "autos"}[kind]).append(
            Source(str(path), kind, label, data))
    return inputs

"""Values read out of the reports' JSON: numbers (``"inf"``/``"nan"`` strings included) and their
display, and what an ``optimize`` run says about its pipeline, validation and accuracy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["as_float", "fmt_number", "fmt_ratio", "fmt_pct", "pipeline_label", "run_outputs", "worst_metric",
           "worst_entry",
           "run_accuracy", "short_name"]


# --- number helpers -----------------------------------------------------------------------------


def as_float(v: Any) -> float | None:
    """Numbers and the strings ``inf``/``-inf``/``nan`` as floats; anything else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("inf", "-inf", "nan", "+inf"):
        return float(v)
    return None


def fmt_number(v: Any, spec: str, suffix: str = "") -> str:
    f = as_float(v)
    if f is None or math.isnan(f):
        return "-"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return format(f, spec) + suffix


def fmt_ratio(before: Any, after: Any) -> str:
    b, a = as_float(before), as_float(after)
    return f"{a / b:.3f}×" if b and a is not None else "-"


def fmt_pct(v: Any) -> str:
    f = as_float(v)
    return "-" if f is None or math.isnan(f) else f"{100 * f:.2f}%"


# --- optimize runs ------------------------------------------------------------------------------


def _defaults(name: str) -> dict[str, Any]:
    try:
        from onnxcompress.pipeline.manager import registry

        cls = registry().get(name)
    except Exception:
        return {}
    return {k: o.default for k, o in cls.options.items()} if cls else {}


def pipeline_label(run: dict) -> str:
    """``recipe NAME`` or the pass spec with only the options that differ from the defaults."""
    if run.get("recipe"):
        return f"recipe {run['recipe']}"
    parts = []
    for p in run.get("passes", []):
        defaults = _defaults(p["pass"])
        opts = [f"{k}={v}" for k, v in (p.get("options") or {}).items() if k not in defaults or defaults[k] != v]
        parts.append(":".join([p["pass"], *opts]))
    return ",".join(parts) or "(no passes)"


def run_outputs(run: dict) -> list[dict]:
    v = run.get("validation")
    return [o for o in (v.get("outputs") or []) if isinstance(o, dict)] if isinstance(v, dict) else []


def worst_entry(run: dict, key: str) -> tuple[float, str | None] | None:
    """The lowest ``key`` over the outputs and their channel slices, with the slice's name
    (``output0[4:84]``) when a slice is lowest (else None); None when no output has the key."""
    entries: list[tuple[float, str | None]] = []
    for o in run_outputs(run):
        entries += [(f, None)] if (f := as_float(o.get(key))) is not None else []
        slices = [s for s in (o.get("slices") or []) if isinstance(s, dict)]
        entries += [(f, str(s.get("name"))) for s in slices if (f := as_float(s.get(key))) is not None]
    return min(entries, key=lambda e: e[0]) if entries else None


def worst_metric(run: dict, key: str) -> float | None:
    """The lowest ``key`` over the outputs and their channel slices (the slice, when one is worst)."""
    entry = worst_entry(run, key)
    return None if entry is None else entry[0]


def run_accuracy(run: dict) -> tuple[float | None, float | None]:
    for o in run_outputs(run):
        if as_float(o.get("ref_accuracy")) is not None:
            return as_float(o["ref_accuracy"]), as_float(o.get("cand_accuracy"))
    return None, None


def short_name(name: str) -> str:
    return Path(name).name if name and not name.startswith("model[") else name

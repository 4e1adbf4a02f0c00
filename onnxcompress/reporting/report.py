"""Markdown/HTML reports from the JSON that ``optimize``, ``bench`` and ``sensitivity`` write.

:func:`build_report` reads any mix of those files and writes one document with these sections
(each only when its inputs are there):

* **Summary**: one row per ``optimize`` run: model, pipeline, size/params/MACs before → after
  with ratios, validation metrics (worst over outputs), the gate's verdict.
* **Passes**: per run, each pass's stats, and what it declined grouped by decline code (reports
  written before codes existed give a ``reason`` text instead, grouped the same way).
* **Per-layer MACs**: per run, MACs of each layer before and after (the heaviest ``top``).
* **Layer sensitivity**: per ``sensitivity`` file, SQNR/cosine per layer, worst first.
* **Latency**: per ``bench`` file, median/p90/min and the paired ratio vs its first model.
* **Accuracy vs latency**: ``optimize`` runs joined with ``bench`` results by model path (the
  run's ``output`` for the optimized model, its ``model`` for the original), with the Pareto
  front (no other point is both at least as fast and at least as accurate) marked.

Plots (PNG, next to the document) need matplotlib (``pip install 'onnxcompress[plot]'``);
without it the report says so in one line. The same JSON gives the same bytes: no dates, input
files named by their file name, PNGs written without software/date metadata.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcompress._version import __version__
from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import atomic_write
from onnxcompress.reporting.display import human_bytes, human_count

__all__ = [
    "Source",
    "Inputs",
    "load_inputs",
    "build_report",
    "render_markdown",
    "render_html",
    "pareto_front",
    "pipeline_label",
    "layer_macs",
    "Point",
    "accuracy_points",
    "plots_available",
    "PLOT_HINT",
    "DEFAULT_TOP",
]

log = logging.getLogger(__name__)

#: The line a report carries instead of plots when matplotlib is missing.
PLOT_HINT = "Plots skipped: matplotlib is not installed (`pip install 'onnxcompress[plot]'` adds them)."

#: Layers shown per table and plot by default (the heaviest / most sensitive).
DEFAULT_TOP = 30

_KINDS = ("optimize", "bench", "sensitivity")


# --- inputs -------------------------------------------------------------------------------------


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

    def all(self) -> list[Source]:
        """Every source: runs, then benches, then sensitivity scans."""
        return self.runs + self.benches + self.sensitivities


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
        raise InputError(f"{path}: expected a JSON object written by optimize, bench or sensitivity")
    if data.get("kind") == "sensitivity" or "layers" in data:
        return "sensitivity"
    if {"before", "after", "passes"} <= set(data):
        return "optimize"
    if {"machine", "models"} <= set(data):
        return "bench"
    raise InputError(f"{path}: not the JSON of optimize, bench or sensitivity (keys: {', '.join(sorted(data)[:6])})")


_NUM = (int, float)
_SCHEMA: dict[str, dict[str, Any]] = {
    "optimize": {"before": {"file_bytes": _NUM, "params": _NUM, "macs": _NUM, "per_node": list},
                 "after": {"file_bytes": _NUM, "params": _NUM, "macs": _NUM, "per_node": list},
                 "passes": [{"pass": str}]},
    "bench": {"models": [{"name": str, "median_ms": _NUM, "p90_ms": _NUM, "min_ms": _NUM}]},
    "sensitivity": {"layers": [{"node": str}]},
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
        getattr(inputs, {"optimize": "runs", "bench": "benches", "sensitivity": "sensitivities"}[kind]).append(
            Source(str(path), kind, label, data))
    return inputs


# --- document model and renderers ---------------------------------------------------------------


@dataclass
class Heading:
    """A section heading."""

    level: int
    text: str


@dataclass
class Para:
    """A paragraph of plain text; spans in backticks are code."""

    text: str


@dataclass
class Table:
    """A table; ``right`` lists the right-aligned column indices."""

    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)


@dataclass
class Image:
    """A PNG next to the document."""

    file: str
    alt: str


Block = Heading | Para | Table | Image

_CODE = re.compile(r"`([^`]*)`")


def _md_text(text: str, in_table: bool = False) -> str:
    parts = _CODE.split(text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"`{part}`")
            continue
        part = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", part.replace("\\", "\\\\").replace("*", "\\*"))
        out.append(re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", part))
    joined = "".join(out)
    return joined.replace("|", "\\|") if in_table else joined


def render_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown of ``blocks``."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _md_text(b.text))
        elif isinstance(b, Para):
            out.append(_md_text(b.text))
        elif isinstance(b, Image):
            out.append(f"![{_md_text(b.alt)}]({b.file})")
        else:
            out.append(_md_table(b))
    return "\n\n".join(out) + "\n"


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_text(h, True) for h in t.headers) + " |",
             "|" + "|".join("---:" if i in t.right else "---" for i in range(len(t.headers))) + "|"]
    lines += ["| " + " | ".join(_md_text(c, True) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _html_text(text: str) -> str:
    parts = _CODE.split(text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


_CSS = ("body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
        "th,td{border:1px solid #ccc;padding:.25rem .5rem;vertical-align:top}th{background:#f3f3f3}"
        "td.r,th.r{text-align:right}code{background:#f3f3f3;padding:0 .2rem}img{max-width:100%}")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A standalone HTML page of ``blocks`` (images by relative path)."""
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_html_text(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_html_text(b.text)}</p>")
        elif isinstance(b, Image):
            body.append(f'<p><img src="{html.escape(b.file)}" alt="{html.escape(b.alt)}"></p>')
        else:
            body.append(_html_table(b))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


_RIGHT = ' class="r"'


def _html_table(t: Table) -> str:
    def cells(row: list[str], tag: str) -> str:
        return "".join(f"<{tag}{_RIGHT if i in t.right else ''}>{_html_text(c)}</{tag}>" for i, c in enumerate(row))
    rows = [f"<tr>{cells(r, 'td')}</tr>" for r in t.rows]
    head = f"<table>\n<thead><tr>{cells(t.headers, 'th')}</tr></thead>\n<tbody>\n"
    return head + "\n".join(rows) + "\n</tbody>\n</table>"


# --- number helpers -----------------------------------------------------------------------------


def _float(v: Any) -> float | None:
    """Numbers and the strings ``inf``/``-inf``/``nan`` as floats; anything else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("inf", "-inf", "nan", "+inf"):
        return float(v)
    return None


def _fmt(v: Any, spec: str, suffix: str = "") -> str:
    f = _float(v)
    if f is None or math.isnan(f):
        return "-"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return format(f, spec) + suffix


def _ratio(before: Any, after: Any) -> str:
    b, a = _float(before), _float(after)
    return f"{a / b:.3f}×" if b and a is not None else "-"


def _pct(v: Any) -> str:
    f = _float(v)
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


def _outputs(run: dict) -> list[dict]:
    v = run.get("validation")
    return [o for o in (v.get("outputs") or []) if isinstance(o, dict)] if isinstance(v, dict) else []


def _worst(run: dict, key: str) -> float | None:
    values = [f for f in (_float(o.get(key)) for o in _outputs(run)) if f is not None]
    return min(values) if values else None


def _accuracy(run: dict) -> tuple[float | None, float | None]:
    for o in _outputs(run):
        if _float(o.get("ref_accuracy")) is not None:
            return _float(o["ref_accuracy"]), _float(o.get("cand_accuracy"))
    return None, None


def _gate(run: dict) -> str:
    v = run.get("validation")
    if not isinstance(v, dict):
        return "not validated"
    if v.get("passed", run.get("passed", True)):
        return "passed"
    failures = v.get("failures") or []
    return "FAILED" + (f": {failures[0]}" if failures else "")


def _model_name(run: dict) -> str:
    return Path(run["model"]).name if run.get("model") else "-"


def _before_after(run: dict, key: str, fmt: Callable[[float], str]) -> str:
    b, a = run["before"][key], run["after"][key]
    return f"{fmt(b)} → {fmt(a)} ({_ratio(b, a)})"


def _summary(runs: list[Source]) -> list[Block]:
    rows = []
    for r in runs:
        d = r.data
        ref, cand = _accuracy(d)
        acc = "-" if ref is None else f"{_pct(ref)} → {_pct(cand)}"
        rows.append([r.label, _model_name(d), f"`{pipeline_label(d)}`", str(d.get("numerics", "-")),
                     _before_after(d, "file_bytes", human_bytes), _before_after(d, "params", human_count),
                     _before_after(d, "macs", human_count), _fmt(_worst(d, "cosine"), ".6f"),
                     _fmt(_worst(d, "sqnr_db"), ".1f"), _pct(_worst(d, "top1_agreement")), acc, _gate(d)])
    headers = ["run", "model", "pipeline", "numerics", "size", "params", "MACs", "cosine (worst)", "SQNR dB (worst)",
               "top-1 agreement", "accuracy ref → new", "gate"]
    blocks: list[Block] = [Heading(2, "Summary"), Table(headers, rows, {7, 8, 9})]
    data = sorted({str(d.data["validation"].get("data")) for d in runs if isinstance(d.data.get("validation"), dict)})
    if data:
        blocks.append(Para("Validated on: " + "; ".join(f"`{x}`" for x in data) + "." + (
            " The runs used different data, so their metrics are not directly comparable." if len(data) > 1 else "")))
    return blocks


def _stats_text(stats: dict) -> str:
    items = [(k, v) for k, v in (stats or {}).items() if v]
    return ", ".join(f"{k}={_fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in items) or "-"


def _declines(passes: list[dict]) -> list[list[str]]:
    """Rows ``pass, code, count, examples``: declines grouped by ``code`` (older reports: ``reason``)."""
    rows = []
    for p in passes:
        groups: dict[str, list[str]] = {}
        for d in p.get("declined") or []:
            code = d.get("code", d.get("reason", "?"))
            groups.setdefault(str(code), []).append(str(d.get("where", "?")))
        for reason, where in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            examples = ", ".join(f"`{w}`" for w in where[:3]) + (f" (+{len(where) - 3} more)" if len(where) > 3 else "")
            rows.append([p["pass"], reason, str(len(where)), examples])
    return rows


def _passes_section(runs: list[Source]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Passes")]
    for r in runs:
        passes = r.data["passes"]
        rows = [[p["pass"], str(p.get("numerics", "-")), "yes" if p.get("modified") else "no",
                 _stats_text(p.get("stats")), _fmt(p.get("seconds"), ".2f")] for p in passes]
        blocks += [Heading(3, f"{r.label}: {pipeline_label(r.data)}"),
                   Table(["pass", "numerics", "changed", "stats", "seconds"], rows, {4})]
        declined = _declines(passes)
        blocks.append(Table(["pass", "declined (code)", "count", "where (first 3)"], declined, {2})
                      if declined else Para("Nothing declined."))
    return blocks


# --- per-layer MACs -----------------------------------------------------------------------------


def _node_key(n: dict, i: int) -> str:
    return str(n.get("name") or f"#{i} {n.get('op_type', '?')}")


def layer_macs(run: dict) -> list[tuple[str, str, int | None, int | None]]:
    """``(layer, op, MACs before, MACs after)`` in model order; new layers after the old ones."""
    before = {_node_key(n, i): n for i, n in enumerate(run["before"]["per_node"])}
    after = {_node_key(n, i): n for i, n in enumerate(run["after"]["per_node"])}
    rows = [(k, str(n.get("op_type", "?")), int(n.get("macs", 0)), int(after[k]["macs"]) if k in after else None)
            for k, n in before.items()]
    rows += [(k, str(n.get("op_type", "?")), None, int(n.get("macs", 0))) for k, n in after.items() if k not in before]
    return rows


def _heaviest(rows: list[tuple], top: int) -> list[tuple]:
    """The ``top`` rows with the most MACs (before, else after), kept in model order."""
    weight = [max(r[2] or 0, r[3] or 0) for r in rows]
    keep = set(sorted(range(len(rows)), key=lambda i: (-weight[i], i))[:top])
    return [r for i, r in enumerate(rows) if i in keep]


def _macs_section(runs: list[Source], top: int, plot: Callable | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Per-layer MACs")]
    for r in runs:
        rows = layer_macs(r.data)
        if not rows:
            continue
        shown = _heaviest(rows, top)
        blocks.append(Heading(3, f"{r.label}: {pipeline_label(r.data)}"))
        if len(shown) < len(rows):
            blocks.append(Para(f"The {len(shown)} heaviest of {len(rows)} layers, in model order."))
        if plot is not None:
            blocks.append(plot("macs", r.label, shown, f"MACs per layer: {r.label} ({pipeline_label(r.data)})"))
        table = [[f"`{name}`", op, "-" if b is None else f"{b:,}", "removed" if a is None else f"{a:,}",
                  _ratio(b, a) if b is not None and a is not None else "-"] for name, op, b, a in shown]
        blocks.append(Table(["layer", "op", "MACs before", "MACs after", "ratio"], table, {2, 3, 4}))
    return blocks


# --- sensitivity --------------------------------------------------------------------------------


def _sens_section(sources: list[Source], top: int, plot: Callable | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Layer sensitivity")]
    for s in sources:
        d = s.data
        base = d.get("baseline") or {}
        blocks.append(Heading(3, f"{s.label}: {Path(str(d.get('model', '-'))).name}"))
        blocks.append(Para(f"Method `{d.get('method', '-')}` on {d.get('samples', '-')} samples; each layer "
                           f"compressed alone, the rest in float. Whole model: SQNR "
                           f"{_fmt(base.get('sqnr_db'), '.1f')} dB, "
                           f"cosine {_fmt(base.get('cosine'), '.6f')}. Lower SQNR = more sensitive."))
        layers = d["layers"]
        by_sqnr = sorted(range(len(layers)), key=lambda i: (_sort_sqnr(layers[i]), i))[:top]
        if plot is not None and layers:
            title = f"per-layer sensitivity: {s.label} ({d.get('method', '-')})"
            blocks.append(plot("sensitivity", s.label, [layers[i] for i in sorted(by_sqnr)],
                               _float(base.get("sqnr_db")), title))
        rows = [[f"`{layers[i]['node']}`", str(layers[i].get("op_type", "-")), _fmt(layers[i].get("macs"), ",.0f"),
                 _fmt(layers[i].get("sqnr_db"), ".1f"), _fmt(layers[i].get("cosine"), ".6f")] for i in by_sqnr]
        blocks.append(Table(["layer (most sensitive first)", "op", "MACs", "SQNR dB", "cosine"], rows, {2, 3, 4}))
    return blocks


def _sort_sqnr(layer: dict) -> float:
    f = _float(layer.get("sqnr_db"))
    return math.inf if f is None or math.isnan(f) else f


# --- bench --------------------------------------------------------------------------------------


def _machine_line(m: dict) -> str:
    threads = m.get("threads")
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, onnxruntime {m.get('onnxruntime', '?')}, "
            f"{m.get('provider', '?')}, intra-op threads {'default' if threads == 0 else threads}, "
            f"ORT graph optimizations {'on' if m.get('ort_optimization') else 'off'}")


def _bench_section(benches: list[Source]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Latency")]
    for b in benches:
        d = b.data
        s = d.get("settings") or {}
        models = d["models"]
        first = Path(models[0]["name"]).name if models else "-"
        blocks += [Heading(3, b.label),
                   Para(f"{_machine_line(d.get('machine') or {})}. {s.get('runs', '?')} interleaved rounds after "
                        f"{s.get('warmup', '?')} warm-up. \"vs first\": median over rounds of the round's time / "
                        f"`{first}`'s time in the same round (p10–p90 of those ratios).")]
        rows = [[f"`{_short(m['name'])}`", human_bytes(m.get("file_bytes") or 0), human_count(m.get("params") or 0),
                 human_count(m.get("macs") or 0), _fmt(m["median_ms"], ".3f"), _fmt(m["p90_ms"], ".3f"),
                 _fmt(m["min_ms"], ".3f"), _bench_ratio(m)] for m in models]
        blocks.append(Table(["model", "size", "params", "MACs", "median ms", "p90 ms", "min ms", "vs first"],
                            rows, {1, 2, 3, 4, 5, 6, 7}))
    return blocks


def _short(name: str) -> str:
    return Path(name).name if name and not name.startswith("model[") else name


def _bench_ratio(m: dict) -> str:
    r = _float(m.get("ratio_vs_first"))
    if r is None or math.isnan(r):
        return "-"
    lo, hi = _float(m.get("ratio_p10")), _float(m.get("ratio_p90"))
    spread = f" ({lo:.3f}–{hi:.3f})" if lo is not None and hi is not None and not math.isnan(lo) else ""
    return f"{r:.3f}×{spread}"


# --- accuracy vs latency ------------------------------------------------------------------------


@dataclass
class Point:
    """One model on the accuracy/latency plane."""

    label: str
    model: str
    quality: float
    median_ms: float
    ratio: float | None
    bench: str
    baseline: bool = False
    front: bool = False


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(latency, quality)`` pairs: True where no other point is at least as fast and as good
    and strictly better in one of the two."""
    out = []
    for i, (t, q) in enumerate(points):
        dominated = any(t2 <= t and q2 >= q and (t2 < t or q2 > q) for j, (t2, q2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def _norm(path: str) -> str:
    return os.path.normpath(path)


def _bench_index(benches: list[Source]) -> dict[str, tuple[dict, str]]:
    """Bench entries by normalized path and, where unambiguous, by file name (first bench wins)."""
    by_path: dict[str, tuple[dict, str]] = {}
    by_name: dict[str, list[tuple[dict, str]]] = {}
    for b in benches:
        for m in b.data["models"]:
            by_path.setdefault(_norm(m["name"]), (m, Path(b.path).name))
            by_name.setdefault(Path(m["name"]).name, []).append((m, Path(b.path).name))
    for name, found in by_name.items():
        if len({_norm(m["name"]) for m, _ in found}) == 1:
            by_path.setdefault("name:" + name, found[0])
    return by_path


def _lookup(index: dict, path: str | None) -> tuple[dict, str] | None:
    if not path:
        return None
    return index.get(_norm(path)) or index.get("name:" + Path(path).name)


def _quality_metric(runs: list[Source]) -> tuple[str, Callable[[dict, bool], float | None]]:
    """The metric every validated run has: accuracy, else top-1 agreement, else cosine."""
    def acc(d: dict, base: bool) -> float | None:
        ref, cand = _accuracy(d)
        value = ref if base else cand
        return None if value is None else 100 * value

    def agree(d: dict, base: bool) -> float | None:
        v = 1.0 if base else _worst(d, "top1_agreement")
        return None if v is None or not _outputs(d) else 100 * v

    def cos(d: dict, base: bool) -> float | None:
        return 1.0 if base and _outputs(d) else _worst(d, "cosine")

    for name, fn in (("accuracy %", acc), ("top-1 agreement %", agree), ("cosine", cos)):
        if runs and all(fn(r.data, False) is not None for r in runs if _outputs(r.data)):
            return name, fn
    return "cosine", cos


def _baseline_entry(run: dict, index: dict, benches: list[Source]) -> tuple[dict, str] | None:
    found = _lookup(index, run.get("model"))
    if found:
        return found
    before = run["before"]
    for b in benches:  # older JSON without "model": the bench entry with the same size, params, MACs
        for m in b.data["models"]:
            if (m.get("file_bytes"), m.get("params"), m.get("macs")) == (
                    before["file_bytes"], before["params"], before["macs"]):
                return m, Path(b.path).name
    return None


def accuracy_points(inputs: Inputs) -> tuple[str, list[Point]]:
    """The metric's name and the joined points (Pareto front marked), originals first."""
    runs = [r for r in inputs.runs if _outputs(r.data)]
    metric, quality = _quality_metric(runs)
    index = _bench_index(inputs.benches)
    points: list[Point] = []
    seen: set[str] = set()
    for r in runs:
        base = _baseline_entry(r.data, index, inputs.benches)
        q = quality(r.data, True)
        if base and q is not None and _norm(base[0]["name"]) not in seen:
            seen.add(_norm(base[0]["name"]))
            points.append(_point("original", base, q, True))
    for r in runs:
        found, q = _lookup(index, r.data.get("output")), quality(r.data, False)
        if found and q is not None:
            points.append(_point(r.label, found, q, False))
    for p, front in zip(points, pareto_front([(p.median_ms, p.quality) for p in points])):
        p.front = front
    return metric, points


def _point(label: str, found: tuple[dict, str], quality: float, baseline: bool) -> Point:
    m, bench = found
    ratio = _float(m.get("ratio_vs_first"))
    return Point(label, _short(m["name"]), quality, float(m["median_ms"]),
                 None if ratio is None or math.isnan(ratio) else ratio, bench, baseline)


def _pareto_section(inputs: Inputs, plot: Callable | None) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Accuracy vs latency")]
    metric, points = accuracy_points(inputs)
    if len(points) < 2:
        return blocks + [Para("Not enough points: run `onnxcompress bench` on the original and the optimized "
                              "models (the paths `optimize` wrote) and pass its JSON too.")]
    if plot is not None:
        blocks.append(plot("pareto", "runs", points, metric))
    benches = sorted({p.bench for p in points})
    note = "" if len(benches) == 1 else " Latencies come from different bench runs; compare with care."
    blocks.append(Para(f"Quality: {metric} on the validation data; latency: median ms from "
                       f"{', '.join(f'`{b}`' for b in benches)}. Pareto front: no other model is both at least as "
                       f"fast and at least as good.{note}"))
    rows = [[p.label, f"`{p.model}`", f"{p.quality:.4f}" if metric == "cosine" else f"{p.quality:.2f}",
             f"{p.median_ms:.3f}", "-" if p.ratio is None else f"{p.ratio:.3f}×", "yes" if p.front else ""]
            for p in points]
    blocks.append(Table(["run", "model", metric, "median ms", "vs first", "Pareto front"], rows, {2, 3, 4}))
    return blocks


# --- plots --------------------------------------------------------------------------------------


def plots_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return False
    return True


def _clip(name: str, n: int = 40) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _figure(rows: int) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(8, max(2.5, 0.28 * rows + 1.2)), dpi=100, layout="constrained")


def _plot_macs(rows: list[tuple], title: str) -> Any:
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    y = list(range(len(rows)))
    ax.barh([v - 0.2 for v in y], [(r[2] or 0) / 1e6 for r in rows], height=0.4, label="before", color="#9aa5b1")
    ax.barh([v + 0.2 for v in y], [(r[3] or 0) / 1e6 for r in rows], height=0.4, label="after", color="#1f77b4")
    ax.set_yticks(y, [_clip(r[0]) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MMACs per sample")
    ax.legend(loc="lower right")
    return fig


def _plot_sensitivity(layers: list[dict], baseline: float | None, title: str) -> Any:
    fig = _figure(len(layers))
    ax = fig.add_subplot()
    values = [_float(layer.get("sqnr_db")) for layer in layers]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    cap = max(finite) * 1.1 if finite else 1.0
    shown = [cap if v is None or not math.isfinite(v) else v for v in values]
    worst = set(sorted(range(len(shown)), key=lambda i: (shown[i], i))[:3])
    ax.barh(range(len(shown)), shown, color=["#d62728" if i in worst else "#1f77b4" for i in range(len(shown))])
    if baseline is not None and math.isfinite(baseline):
        ax.axvline(baseline, color="k", linestyle="--", linewidth=1)
        title += f"; dashed: whole model {baseline:.1f} dB"
    ax.set_title(title, fontsize=10)
    ax.set_yticks(range(len(shown)), [_clip(str(layer["node"])) for layer in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output SQNR dB with only this layer compressed (lower = more sensitive; red: worst 3)")
    return fig


def _plot_pareto(points: list[Point], metric: str) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for p in points:
        ax.scatter([p.median_ms], [p.quality], marker="s" if p.baseline else "o", s=40, zorder=3,
                   color="#d62728" if p.front else "#7f7f7f")
    for (x, y), text in _point_labels(points):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((p.median_ms, p.quality) for p in points if p.front)
    ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="#d62728", linewidth=1,
            label="Pareto front")
    ax.set_xlabel("median latency, ms (onnxruntime)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs latency (square: original; red: Pareto front)", fontsize=10)
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="lower right")
    return fig


def _point_labels(points: list[Point]) -> list[tuple[tuple[float, float], str]]:
    """One label per cluster of points closer than 2 % of the axis spans ("original, default")."""
    xs, ys = [p.median_ms for p in points], [p.quality for p in points]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for p in points:
        for (x, y), names in groups:
            if abs(p.median_ms - x) <= 0.02 * dx and abs(p.quality - y) <= 0.02 * dy:
                names.append(p.label)
                break
        else:
            groups.append(((p.median_ms, p.quality), [p.label]))
    return [(xy, ", ".join(names)) for xy, names in groups]


_PLOTTERS = {"macs": _plot_macs, "sensitivity": _plot_sensitivity, "pareto": _plot_pareto}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


class _Plotter:
    """Draws a figure into ``<stem>-<kind>-<label>.png`` next to the document and returns its Image."""

    def __init__(self, folder: Path, stem: str):
        self.folder, self.stem = folder, stem
        self.files: list[Path] = []

    def __call__(self, kind: str, label: str, *args: Any) -> Image:
        import matplotlib.style

        name = f"{self.stem}-{kind}-{_slug(label)}.png"
        with matplotlib.style.context("default"):
            fig = _PLOTTERS[kind](*args)
            path = self.folder / name
            atomic_write(path, lambda fh: fig.savefig(fh, format="png", metadata={"Software": None}))
        self.files.append(path)
        return Image(name, f"{kind} plot: {label}")


# --- writing ------------------------------------------------------------------------------------


def _blocks(inputs: Inputs, title: str, top: int, plot: Callable | None, note: str | None) -> list[Block]:
    names = ", ".join(f"`{Path(s.path).name}` ({s.kind})" for s in inputs.all())
    blocks: list[Block] = [Heading(1, title), Para(f"Made by onnxcompress {__version__} from {names}.")]
    if note:
        blocks.append(Para(note))
    if inputs.runs:
        blocks += _summary(inputs.runs) + _passes_section(inputs.runs) + _macs_section(inputs.runs, top, plot)
    if inputs.sensitivities:
        blocks += _sens_section(inputs.sensitivities, top, plot)
    if inputs.benches:
        blocks += _bench_section(inputs.benches)
    if inputs.runs and inputs.benches:
        blocks += _pareto_section(inputs, plot)
    return blocks


def _targets(output: Path, html_too: bool) -> tuple[Path | None, Path | None]:
    """(markdown path, html path): ``x.html`` gives HTML only; otherwise Markdown, plus HTML if asked."""
    if output.suffix.lower() in (".html", ".htm"):
        return None, output
    return output, (output.with_suffix(".html") if html_too else None)


def build_report(paths: Sequence[str | os.PathLike], output: str | os.PathLike, *, html: bool = False,
                 title: str | None = None, plots: bool = True, top: int = DEFAULT_TOP) -> list[Path]:
    """Write a report of the given ``optimize``/``bench``/``sensitivity`` JSON files.

    Args:
        paths: The JSON files (any order and mix).
        output: ``report.md`` (Markdown; with ``html`` also ``report.html``) or ``report.html``.
        html: Also write HTML next to the Markdown.
        title: The document's title (default: "onnxcompress report").
        plots: Draw PNG plots next to the document when matplotlib is installed.
        top: Layers shown per table and plot.

    Returns:
        The files written, PNGs first.

    Raises:
        InputError: A bad input file, a missing output folder, or ``top`` < 1.
    """
    if top < 1:
        raise InputError(f"--top must be at least 1, got {top}")
    inputs = load_inputs(paths)
    out = Path(output)
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: folder does not exist")
    md_path, html_path = _targets(out, html)
    plotter, note = None, None
    if plots and plots_available():
        plotter = _Plotter(out.parent, out.stem)
    elif plots:
        note = PLOT_HINT
        log.warning("matplotlib is not installed: the report has no plots (pip install 'onnxcompress[plot]')")
    title = title or "onnxcompress report"
    blocks = _blocks(inputs, title, top, plotter, note)
    written = list(plotter.files) if plotter else []
    if md_path is not None:
        text = render_markdown(blocks)
        atomic_write(md_path, lambda fh: fh.write(text.encode("utf-8")))
        written.append(md_path)
    if html_path is not None:
        page = render_html(blocks, title)
        atomic_write(html_path, lambda fh: fh.write(page.encode("utf-8")))
        written.append(html_path)
    return written

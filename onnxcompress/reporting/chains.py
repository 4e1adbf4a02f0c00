"""Chains of ``optimize`` runs and the model each run's metrics are measured against.

``optimize A -> B`` then ``optimize B -> C`` is a chain: the second run's ``input_model.sha256``
is the first run's ``output_model.sha256`` (JSON written before these records existed are linked
by path: the run's ``model`` equal to another run's ``output``). Every run is traced back to the
true original, the input of its chain's first run; runs of the same original share one
``original`` point in the report. The run's ``reference`` record says what its metrics compare
with: the original (``vs original``), its own input, which in a chain is another run's output
(``vs <run>``: the loss of the runs before it is not included), or another model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from onnxcompress.reporting.inputs import Source

__all__ = ["Lineage", "link_runs", "originals"]


@dataclass
class Lineage:
    """Where one run sits: its parent run (None for a chain's first run), the chain from the first
    run to it, the true original (``key``: sha256, else path; ``name``: file name) and its reference."""

    run: Source
    parent: Source | None
    chain: list[Source]
    original_key: str
    original_name: str
    original_path: str | None
    reference: str  # "original", "parent", "other", "none" (not validated)
    reference_name: str  # the run label or file name the metrics compare with

    @property
    def vs(self) -> str:
        """``vs original``, ``vs <run>``, ``vs <file>`` or ``not validated``."""
        return "not validated" if self.reference == "none" else f"vs {self.reference_name}"

    @property
    def comparable(self) -> bool:
        """Whether the run's metrics are measured against its true original."""
        return self.reference == "original"


def _sha(record: object) -> str | None:
    return str(record["sha256"]) if isinstance(record, dict) and record.get("sha256") else None


def _norm(path: object) -> str | None:
    return os.path.normpath(str(path)) if path else None


def _parents(runs: list[Source]) -> dict[int, Source]:
    """Each run's parent: the run whose written model (by hash; by path for older JSON) it read."""
    by_hash = {h: r for r in runs if (h := _sha(r.data.get("output_model")))}
    by_path = {p: r for r in runs if (p := _norm(r.data.get("output")))}
    parents = {}
    for r in runs:
        if "input_model" in r.data:
            found = by_hash.get(_sha(r.data["input_model"]) or "")
        else:
            found = by_path.get(_norm(r.data.get("model")) or "")
        if found is not None and found is not r:
            parents[id(r)] = found
    return parents


def _chain(run: Source, parents: dict[int, Source]) -> list[Source]:
    chain, seen = [run], {id(run)}
    while (up := parents.get(id(chain[0]))) is not None and id(up) not in seen:
        chain.insert(0, up)
        seen.add(id(up))
    return chain


def _reference(run: Source, parent: Source | None, original_key: str,
               by_output: dict[str, Source]) -> tuple[str, str]:
    """``(kind, name)`` of the model the run's metrics compare with (see :class:`Lineage`)."""
    d = run.data
    if not isinstance(d.get("validation"), dict):
        return "none", ""
    ref = d.get("reference")
    ref_sha = _sha(ref)
    if ref_sha is None or (isinstance(ref, dict) and not ref.get("given")):
        # the run's own input (older JSON never had another reference)
        return ("parent", parent.label) if parent is not None else ("original", "original")
    if ref_sha == original_key:
        return "original", "original"
    if ref_sha in by_output:
        return ("parent" if by_output[ref_sha] is parent else "other"), by_output[ref_sha].label
    path = ref.get("path") if isinstance(ref, dict) else None
    return "other", Path(str(path)).name if path else "another model"


def link_runs(runs: list[Source]) -> list[Lineage]:
    """The lineage of each run, in the order given."""
    parents = _parents(runs)
    by_output = {h: r for r in runs if (h := _sha(r.data.get("output_model")))}
    out = []
    for r in runs:
        chain = _chain(r, parents)
        first = chain[0].data
        path = first.get("model")
        key = _sha(first.get("input_model")) or _norm(path) or f"run:{chain[0].label}"
        name = Path(str(path)).name if path else "original"
        parent = parents.get(id(r))
        kind, ref_name = _reference(r, parent, key, by_output)
        out.append(Lineage(r, parent, chain, key, name, str(path) if path else None, kind, ref_name))
    return out


def originals(lineages: list[Lineage]) -> dict[str, str]:
    """``{original key: label}``: ``original``, or ``original (<file>)`` when runs start from several models."""
    names: dict[str, str] = {}
    for lin in lineages:
        names.setdefault(lin.original_key, lin.original_name)
    if len(names) == 1:
        return {key: "original" for key in names}
    return {key: f"original ({name})" for key, name in names.items()}

"""The search space of ``auto``: a :class:`Candidate` (uniform prune ratio or a MAC budget spread over
the channel groups by sensitivity, factorization energy, quantization) and the one mapping from a candidate to the ``--passes`` spec that builds it (:func:`candidate_spec`).

Order of the techniques in a spec: prune → fold BN → factorize → simplify → quantize (pruning needs
the BN gammas and the float graph; factorization works on the pruned float layers; quantization last,
on the final float graph). Targets (``latency=R``, ``size=R``, ``macs=R``) are parsed here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from onnxcompress.core.errors import InputError

__all__ = ["BUDGET_MAX_GROUP_RATIO", "BUDGET_SENS_SAMPLES", "CONV_WEIGHT_ONLY", "LAYOUT_ALIGN", "ALIGNED_CAP", "Candidate", "Space",
           "Targets", "INT8_SPEC", "QUANT_SPECS", "MIXED_COSINE", "candidate_spec", "parse_targets", "parse_space", "TARGET_KINDS"]

#: ``quantize_int8``'s mixed-precision target when plain int8 fails the gate (the float fallback).
MIXED_COSINE = 0.999

#: ``prune_channels:macs=`` candidates: no group loses more than this share of its channels (the
#: pass's default 0.9 lets the allocation empty a cheap-looking group, which the accuracy gate then
#: fails on the fixtures: MobileNetV2 ``macs=0.4`` −1.67 points at 0.9, −0.56 at 0.5).
BUDGET_MAX_GROUP_RATIO = 0.6
#: Calibration samples the MAC-budget pruning measures each group's sensitivity on.
BUDGET_SENS_SAMPLES = 32

#: ``quantize_int8`` as the search uses it: a Concat input read by nothing else shares the Concat's
#: scale (one rounding instead of two, and onnxruntime's QLinearConcat copies it instead of
#: requantizing: concat fixture pruned + int8 0.54x -> 0.52x float at the same accuracy); the same
#: bytes as plain ``quantize_int8`` on a model without Concat.
INT8_SPEC = "quantize_int8:share_concat_scales=true"

#: Quantization choices and the pass spec of each.
QUANT_SPECS: dict[str, str] = {
    "int8": INT8_SPEC,
    "int8-mixed": f"{INT8_SPEC}:min_cosine={MIXED_COSINE}",
    "w8": "quantize_weights:bits=8",
    "w4": "quantize_weights:bits=4:method=gptq",
    "cw8": "quantize_weights:ops=matmul|conv:bits=8:block_size=0:prefer=size",
    "cw4": "quantize_weights:ops=matmul|conv:bits=4:block_size=32:method=gptq:act_order=true:prefer=size",
}
#: Weight-only choices that quantize Conv weights (they join the space where convs hold the weights).
#: ``cw4`` rounds with GPTQ on each conv's im2col Hessian (most excited inputs first): with pruning,
#: round-to-nearest 4-bit failed the 1-point gate on every fixture (MobileNetV2 ``macs=0.3`` −6.9
#: points, concat ``ratio=0.5`` −8.1), GPTQ passes (−0.28, −0.56).
CONV_WEIGHT_ONLY = ("cw8", "cw4")

#: Kept channels per pruned group a multiple of this (``prune_channels:round_to=``), tried beside the
#: pass's default 8 when latency is a target: onnxruntime's CPU provider runs convs in its blocked
#: NCHWc layout only where the channel counts are multiples of its block (16 channels on AVX-512,
#: 8 on AVX2; 16 suits both); elsewhere it adds reorder nodes or falls back to plain NCHW convs. On
#: the MobileNetV2 fixture (Xeon with AVX-512) ``prune_channels:macs=0.25`` keeping multiples of 8
#: runs at 0.56x float, keeping multiples of 16 (MACs 0.35x instead of 0.26x) at 0.48x.
LAYOUT_ALIGN = 16
#: ``max_group_ratio`` of the aligned MAC-budget pruning tried beside the default cap: kept counts in
#: multiples of 16 leave groups of 24-48 channels little room under 0.6 (48 can only go to 32), 0.75
#: lets 64 go to 16 and 48 to 16 (MobileNetV2 ``macs=0.2``: 0.39x float at -0.83 points, against
#: 0.48x capped at 0.6; on concat it fails the gate, so both are tried).
ALIGNED_CAP = 0.75


@dataclass(frozen=True)
class Candidate:
    """One point of the search space. ``prune``: ``prune_channels`` ratio (0: none); ``lowrank``:
    ``factorize_tucker`` energy (0: none); ``quant``: a key of :data:`QUANT_SPECS` ('' : float);
    ``budget``: ``prune_channels:macs=`` target MAC ratio, non-uniform by per-group sensitivity
    (0: none; a candidate prunes one way, never both); ``align``: the pruning keeps a multiple of
    this many channels per group (``round_to=``; 0: the pass's default, 8); ``float_layers``: with
    int8, these layers stay float (``exclude=``, with ``float_pools=true``); ``cap``: the MAC-budget
    pruning's ``max_group_ratio`` (0: :data:`BUDGET_MAX_GROUP_RATIO`); ``plain``: the pruning's
    reconstruction is the plain least-squares refit (``refit_holdout=0``), not the default with a
    held-out ridge choice."""

    prune: float = 0.0
    lowrank: float = 0.0
    quant: str = ""
    budget: float = 0.0
    align: int = 0
    float_layers: tuple[str, ...] = ()
    cap: float = 0.0
    plain: bool = False

    def __post_init__(self) -> None:
        if self.cap and not self.budget:
            raise InputError("auto: cap applies to MAC-budget pruning; this candidate has none")
        if self.float_layers and not self.quant.startswith("int8"):
            raise InputError("auto: float_layers applies to int8; this candidate is not int8")
        if self.prune and self.budget:
            raise InputError("auto: a candidate prunes by ratio or by MAC budget, not both")
        if (self.align or self.plain) and not (self.prune or self.budget):
            raise InputError("auto: align and plain apply to pruning; this candidate does not prune")

    @property
    def spec(self) -> str:
        """The ``--passes`` spec (see :func:`candidate_spec`)."""
        return candidate_spec(self)

    @property
    def techniques(self) -> int:
        """How many techniques it combines."""
        return sum(1 for on in (self.prune or self.budget, self.lowrank, self.quant) if on)

    def label(self) -> str:
        """Short name: ``prune 0.5 + tucker 0.9 + int8`` (MAC budget: ``prune macs 0.3``)."""
        aligned = (f" /{self.align}" if self.align else "") + (f" cap {self.cap:g}" if self.cap else "") + \
            (" plain" if self.plain else "")
        parts = ([f"prune {self.prune:g}{aligned}"] if self.prune else []) + \
            ([f"prune macs {self.budget:g}{aligned}"] if self.budget else []) + \
            ([f"tucker {self.lowrank:g}"] if self.lowrank else []) + ([self.quant] if self.quant else [])
        if self.float_layers:
            parts[-1] += f" ({len(self.float_layers)} float)"
        return " + ".join(parts) or "float"

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {"prune": self.prune, "budget": self.budget, "lowrank": self.lowrank, "quant": self.quant,
                "align": self.align, "float_layers": list(self.float_layers), "cap": self.cap, "plain": self.plain}


def candidate_spec(c: Candidate) -> str:
    """The pipeline that builds ``c``; the only place that maps a candidate onto passes (pruning by
    ``prune_channels:ratio=`` or ``prune_channels:macs=``)."""
    aligned = (f":round_to={c.align}" if c.align else "") + (":refit_holdout=0" if c.plain else "")
    parts = [f"prune_channels:ratio={c.prune:g}{aligned}"] if c.prune else []
    if c.budget:
        parts.append(f"prune_channels:macs={c.budget:g}:max_group_ratio={c.cap or BUDGET_MAX_GROUP_RATIO:g}"
                     f":sens_samples={BUDGET_SENS_SAMPLES}{aligned}")
    parts.append("fold_bn")
    if c.lowrank:
        parts.append(f"factorize_tucker:energy={c.lowrank:g}")
    parts.append("simplify")
    if c.quant:
        parts.append(QUANT_SPECS[c.quant] + (f":float_pools=true:exclude={'|'.join(c.float_layers)}"
                                             if c.float_layers else ""))
    return ",".join(parts)


@dataclass(frozen=True)
class Space:
    """The settings tried per technique, weakest first (the search looks for the strongest that
    passes the quality gate on its own, then combines). ``quant`` in the order tried; a failing
    ``int8`` falls back to ``int8-mixed`` when listed. ``prune_macs``: MAC-budget pruning targets
    (``prune_channels:macs=``; in any order, the weakest is the largest). ``align``: with a latency
    target, the best pruning of each kind is also tried keeping a multiple of each of these many
    channels per group (see :data:`LAYOUT_ALIGN`). ``int8_float``: layers whose int8 form is slower
    than float here (set from the cheap signals, not by ``--space``); with a latency target, every
    int8 candidate is also tried with them kept float."""

    prune: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625)
    prune_macs: tuple[float, ...] = (0.5, 0.4, 0.3, 0.25)
    lowrank: tuple[float, ...] = (0.9, 0.8)
    quant: tuple[str, ...] = ("int8", "int8-mixed")
    weight_only: tuple[str, ...] = ("w8", "w4", "cw8", "cw4")
    align: tuple[int, ...] = (LAYOUT_ALIGN,)
    int8_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for a in self.align:
            if not (isinstance(a, int) and a >= 2):
                raise InputError(f"auto: align {a} must be an integer >= 2")
        for r in self.prune:
            if not 0 < r < 1:
                raise InputError(f"auto: prune ratio {r} must be in (0, 1)")
        for m in self.prune_macs:
            if not 0 < m < 1:
                raise InputError(f"auto: prune MAC target {m} must be in (0, 1)")
        for e in self.lowrank:
            if not 0 < e <= 1:
                raise InputError(f"auto: factorization energy {e} must be in (0, 1]")
        for q in (*self.quant, *self.weight_only):
            if q not in QUANT_SPECS:
                raise InputError(f"auto: unknown quantization {q!r}; valid: {', '.join(QUANT_SPECS)}")


#: Target kinds and what their ratio compares (candidate / original).
TARGET_KINDS = {"latency": "paired latency ratio", "size": "file size ratio", "macs": "MACs ratio"}


@dataclass(frozen=True)
class Targets:
    """Upper bounds on candidate / original ratios, in the order given (the first is the objective)."""

    items: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def get(self, kind: str) -> float | None:
        """The bound on ``kind``, or None."""
        return dict(self.items).get(kind)

    @property
    def primary(self) -> str:
        """The first target's kind (what the winner minimises)."""
        return self.items[0][0] if self.items else "latency"

    def misses(self, ratios: dict[str, float | None]) -> list[str]:
        """The targets ``ratios`` miss (a missing ratio misses), e.g. ``latency 0.62 > 0.5``."""
        out = []
        for kind, bound in self.items:
            value = ratios.get(kind)
            if value is None or not value <= bound:
                out.append(f"{kind} {'?' if value is None else f'{value:.3f}'} > {bound:g}")
        return out

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return dict(self.items)


def parse_targets(items: list[str] | tuple[str, ...] | str | dict | None) -> Targets:
    """``["latency=0.5", "size=0.25"]`` (or one comma-separated string, or a dict) → :class:`Targets`.

    Raises:
        InputError: An unknown kind, a value that is not a ratio in (0, 1], a kind given twice, none.
    """
    if isinstance(items, dict):
        pairs = [f"{k}={v}" for k, v in items.items()]
    elif isinstance(items, str):
        pairs = [s for s in items.split(",") if s.strip()]
    else:
        pairs = [s for item in (items or []) for s in str(item).split(",") if s.strip()]
    if not pairs:
        raise InputError("auto needs at least one --target (latency=R, size=R or macs=R)")
    out: dict[str, float] = {}
    for pair in pairs:
        kind, _, value = pair.strip().partition("=")
        if kind not in TARGET_KINDS:
            raise InputError(f"--target {pair!r}: unknown kind {kind!r}; valid: {', '.join(TARGET_KINDS)}")
        try:
            ratio = float(value)
        except ValueError:
            raise InputError(f"--target {pair!r}: expected {kind}=R with R a ratio in (0, 1]") from None
        if not (math.isfinite(ratio) and 0 < ratio <= 1):
            raise InputError(f"--target {pair!r}: the ratio must be in (0, 1]")
        if kind in out:
            raise InputError(f"--target {kind} given twice")
        out[kind] = ratio
    return Targets(tuple(out.items()))


def parse_space(text: str | None) -> Space:
    """``prune=0.25|0.5,lowrank=,quant=int8`` → :class:`Space` (keys: prune, prune_macs, lowrank, quant,
    weight_only, align; ``|`` between settings; an empty value turns the technique off; keys not given keep
    their defaults).

    Raises:
        InputError: An unknown key, a value that is not a number where one is expected, a bad setting.
    """
    if not text:
        return Space()
    fields_: dict[str, tuple] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in ("prune", "prune_macs", "lowrank", "quant", "weight_only", "align"):
            raise InputError(f"--space {item!r}: expected KEY=V|V|... with KEY one of prune, prune_macs, lowrank, "
                             "quant, weight_only, align")
        parts = [v.strip() for v in value.split("|") if v.strip()]
        if key in ("prune", "prune_macs", "lowrank"):
            try:
                fields_[key] = tuple(float(v) for v in parts)
            except ValueError:
                raise InputError(f"--space {item!r}: {key} settings must be numbers") from None
        elif key == "align":
            try:
                fields_[key] = tuple(int(v) for v in parts)
            except ValueError:
                raise InputError(f"--space {item!r}: align settings must be integers") from None
        else:
            fields_[key] = tuple(parts)
    return Space(**fields_)

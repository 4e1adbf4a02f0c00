"""The pass contract: :class:`Pass`, :class:`Option`, :class:`Numerics`, :class:`Slot`,
:class:`PassContext`, :class:`PassResult`, :class:`Declined`, :class:`PassRecord` and the registry
of pass classes.

A pass rewrites an onnx-graphsurgeon graph in place and returns a :class:`PassResult`; the
manager that runs them is :mod:`onnxcompress.pipeline.manager`. What a pass says about itself
is checked before anything runs: its options (types, choices, intervals, combinations) when it
is configured; the :class:`Slot` values it reads against the passes before it, and its need for
calibration data, when the pipeline is built.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, NamedTuple, overload

import onnx_graphsurgeon as gs

from onnxcompress.core.errors import InputError
from onnxcompress.core.shapes import Dims

__all__ = [
    "BN_GAMMA",
    "FLOAT_REFERENCE",
    "Declined",
    "Numerics",
    "Option",
    "Slot",
    "PassContext",
    "PassResult",
    "PassRecord",
    "Pass",
    "register",
    "registered",
]

log = logging.getLogger(__name__)


class Numerics(enum.IntEnum):
    """How far a pass may move the model's outputs; the validation gate follows the worst one."""

    EXACT = 0  #: Same function up to float rounding (gate: ~1e-4 relative error).
    APPROX = 1  #: Small, bounded change (gate: cosine >= 0.999, top-1 agreement >= 99 %).
    LOSSY = 2  #: Deliberate accuracy trade; the gate uses the user's thresholds.


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_BOUND = r"\s*(-inf|\+?inf|[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*"
_INTERVAL = re.compile(rf"\s*([\[(]){_BOUND},{_BOUND}([\])])\s*")


@dataclass(frozen=True)
class Option:
    """One option of a pass.

    Attributes:
        type: ``bool``, ``int``, ``float``, ``str`` or ``list`` (a list of strings; ``|``-separated
            on the command line).
        default: Value used when the option is not given (``None``: unset, never range-checked).
        help: One-line description.
        choices: Allowed values, if restricted.
        interval: Allowed range of a number, in interval notation: ``"[0, 1)"``, ``"(0, inf)"``.
    """

    type: type
    default: Any
    help: str
    choices: tuple | None = None
    interval: str | None = None

    def __post_init__(self) -> None:
        if self.interval is not None:
            self.bounds()  # a malformed interval fails when the pass class is defined

    def bounds(self) -> tuple[float, float, bool, bool]:
        """``(low, high, low_open, high_open)`` of :attr:`interval` (``-inf, inf`` without one)."""
        if self.interval is None:
            return -math.inf, math.inf, True, True
        m = _INTERVAL.fullmatch(self.interval)
        if m is None:
            raise ValueError(f"malformed interval {self.interval!r} (expected e.g. '[0, 1)')")
        lo, hi = float(m[2]), float(m[3])
        return lo, hi, m[1] == "(", m[4] == ")"

    def rule(self) -> str:
        """The interval in words: ``in [0, 1)``, ``>= 1``, ``> 0`` (empty without one)."""
        if self.interval is None:
            return ""
        lo, hi, lo_open, hi_open = self.bounds()
        if math.isinf(hi):
            return f"{'>' if lo_open else '>='} {lo:g}"
        if math.isinf(lo):
            return f"{'<' if hi_open else '<='} {hi:g}"
        return f"in {self.interval.strip()}"

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in :attr:`interval` (NaN never does)."""
        lo, hi, lo_open, hi_open = self.bounds()
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        return bool(above and below)

    def parse(self, name: str, raw: Any) -> Any:
        """Convert ``raw`` (a CLI string or a TOML value) to this option's type and check it.

        Raises:
            InputError: The value does not fit (type, choices or interval).
        """
        try:
            value = self._convert(raw)
        except (TypeError, ValueError):
            raise InputError(f"option {name}={raw!r}: expected {self.type.__name__}") from None
        if self.choices is not None and value not in self.choices:
            raise InputError(f"option {name}={raw!r}: expected one of {', '.join(map(str, self.choices))}")
        if self.interval is not None and not self.contains(value):
            raise InputError(f"option {name}={value!r}: must be {self.rule()}")
        return value

    def _convert(self, raw: Any) -> Any:
        if self.type is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError(raw)
        if self.type is list:
            if isinstance(raw, (list, tuple)):
                return [str(v) for v in raw]
            return [v for v in str(raw).split("|") if v]
        if self.type is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        if self.type in (int, float) and isinstance(raw, bool):
            raise TypeError(raw)
        if self.type is str and isinstance(raw, bool):
            return "true" if raw else "false"  # a TOML boolean given to a str option (e.g. "auto|true|false")
        return self.type(raw)


@dataclass(frozen=True, eq=False)
class Slot:
    """A typed value of a :class:`PassContext`: left by one pass for later ones, or given by the caller.

    Passes declare the slots they read and write (:attr:`Pass.reads`, :attr:`Pass.writes`,
    :meth:`Pass.required_reads`); the manager checks, when the pipeline is built, that every
    required read comes after a pass writing it. Slots compare by identity.

    Attributes:
        name: Identifier (snake_case).
        type: Class, or tuple of classes, every value must be an instance of.
        label: What the value is, as an error message names it ("the float reference").
        doc: One-line description.
    """

    name: str
    type: Any
    label: str
    doc: str = ""


#: ``{output tensor name of the folded node: gamma (float64)}`` of the BNs ``fold_bn`` folded
#: into a preceding node; ``prune_channels`` (``criterion=bn_scale``/``auto``) scores those
#: nodes' channels by ``|gamma|``.
BN_GAMMA = Slot("bn_gamma", dict, "the gammas of the BNs fold_bn folded",
                "{folded node's output name: BN gamma}, for prune_channels' bn_scale criterion")
#: The float model ``quantize_int8`` quantized, as a no-argument callable returning it (exported
#: on first use); ``bias_correction``'s reference.
FLOAT_REFERENCE = Slot("float_reference", Callable, "the float reference",
                       "callable returning the float model quantize_int8 quantized (bias_correction's reference)")


@dataclass
class PassContext:
    """What a pass may know about the world; passes read nothing else.

    Attributes:
        calib: A calibration source (see :mod:`onnxcompress.runtime.data`) or ``None``.
        seed: Seed for every random choice a pass makes.
        logger: Logger passes report to.
        progress: Whether long loops may show a progress bar.
        slices: Channel slices ``{output: [(start, stop or None)]}`` the user asked validation to
            check (``--slices``); passes that judge fidelity themselves use the same ones.
        dims: The run's symbolic input dims (:func:`onnxcompress.core.shapes.resolve_dims`): MAC
            counts, shape tracing and timings use them. ``None``: the manager resolves them from
            ``calib`` (else the defaults) when it runs.
        values: Initial :class:`Slot` values given by the caller (e.g. a pass's test hooks).
    """

    calib: Any = None
    seed: int = 0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("onnxcompress.pass"))
    progress: bool = False
    slices: Mapping[str, list[tuple[int, int | None]]] | None = None
    dims: Dims | None = None
    values: InitVar[Mapping[Slot, Any] | None] = None
    _slots: dict[Slot, Any] = field(default_factory=dict, init=False, repr=False)
    _bound: Pass | None = field(default=None, init=False, repr=False)
    _later: frozenset[Slot] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self, values: Mapping[Slot, Any] | None) -> None:
        for slot, value in (values or {}).items():
            self.put(slot, value)

    def get(self, slot: Slot) -> Any:
        """The value of ``slot``, or ``None`` when nothing wrote it.

        Raises:
            ValueError: The running pass does not declare ``slot`` among its reads or writes.
        """
        p = self._bound
        if p is not None and slot not in p.reads and slot not in p.writes:
            raise ValueError(f"{p.name} reads slot {slot.name} without declaring it")
        return self._slots.get(slot)

    def put(self, slot: Slot, value: Any) -> None:
        """Set ``slot`` to ``value``.

        Raises:
            ValueError: The running pass does not declare ``slot`` among its writes.
            TypeError: ``value`` is not of the slot's type.
        """
        p = self._bound
        if p is not None and slot not in p.writes:
            raise ValueError(f"{p.name} writes slot {slot.name} without declaring it")
        if not isinstance(value, slot.type):
            raise TypeError(f"slot {slot.name}: {type(value).__name__} is not a {_type_name(slot.type)}")
        self._slots[slot] = value

    def provided(self) -> frozenset[Slot]:
        """The slots holding a value."""
        return frozenset(self._slots)

    def bind(self, p: Pass | None, later: frozenset[Slot] = frozenset()) -> None:
        """Check :meth:`get`/:meth:`put` against ``p``'s declarations until unbound (``None``);
        the manager binds each pass while it runs, with ``later``: the slots the passes after it read."""
        self._bound, self._later = p, later if p is not None else frozenset()

    def wanted(self, slot: Slot) -> bool:
        """Whether a pass after the running one reads ``slot`` (known when the manager runs the
        pipeline; ``False`` otherwise): a pass may skip work that only fills such a slot."""
        return slot in self._later


def _type_name(t: Any) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


_CODE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")


class Declined(NamedTuple):
    """A candidate a pass left alone.

    Attributes:
        where: Node or tensor name.
        code: Why, as a stable snake_case identifier (what reports group by).
        detail: Specifics of this case (numbers, names), or empty.
    """

    where: str
    code: str
    detail: str = ""

    def text(self) -> str:
        """``code (detail)``, or the code alone."""
        return f"{self.code} ({self.detail})" if self.detail else self.code

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"where": self.where, "code": self.code, "detail": self.detail}


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        modified: Whether the graph changed.
        stats: Counters (e.g. ``{"folded": 3}``).
        declined: Every candidate the pass left alone, with the reason's code and detail.
        graph: A replacement graph, for passes that rebuild rather than edit in place.
    """

    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    declined: list[Declined] = field(default_factory=list)
    graph: gs.Graph | None = None

    def count(self, key: str, n: float = 1) -> None:
        """Add ``n`` to counter ``key``."""
        self.stats[key] = self.stats.get(key, 0) + n

    def decline(self, where: str, code: str, detail: str = "", *, logger: logging.Logger | None = None) -> None:
        """Record (and log at DEBUG) that the candidate ``where`` was left alone: ``code`` (a
        snake_case identifier, the same for every case of one reason) and ``detail`` (this case's
        numbers or names).

        Raises:
            ValueError: ``code`` is not snake_case or ``detail`` not a string (a bug in the pass).
        """
        if not isinstance(code, str) or not _CODE.fullmatch(code) or not isinstance(detail, str):
            raise ValueError(f"decline code {code!r} / detail {detail!r}: expected a snake_case code and a string")
        self.declined.append(Declined(where, code, detail))
        (logger or log).debug("declined %s: %s", where, self.declined[-1].text())

    def decline_counts(self) -> dict[str, int]:
        """Decline counts keyed by code, in first-seen order."""
        out: dict[str, int] = {}
        for d in self.declined:
            out[d.code] = out.get(d.code, 0) + 1
        return out

    def where_codes(self) -> list[tuple[str, str]]:
        """``(where, code)`` of every decline, in order."""
        return [(d.where, d.code) for d in self.declined]


@dataclass
class PassRecord:
    """A pass's result as the report shows it.

    ``macs_before``/``macs_after``: the whole model's MACs before and after the pass, at the run's
    :attr:`PassContext.dims` (the manager fills them; ``None`` when not measured).
    """

    name: str
    options: dict[str, Any]
    numerics: Numerics
    result: PassResult
    seconds: float
    macs_before: int | None = None
    macs_after: int | None = None

    def as_dict(self) -> dict:
        """JSON-ready form."""
        macs = {} if self.macs_before is None else {"macs_before": self.macs_before, "macs_after": self.macs_after}
        return {
            "pass": self.name,
            "options": self.options,
            "numerics": self.numerics.name.lower(),
            "modified": self.result.modified,
            "stats": self.result.stats,
            **macs,
            "declined": [d.as_dict() for d in self.result.declined],
            "seconds": round(self.seconds, 4),
        }


class Pass:
    """Base class of every pass.

    Subclasses set ``name`` (verb-first snake_case; also the CLI token and module name),
    ``numerics``, ``options`` and, if they need it, ``min_opset``; they implement :meth:`run`.
    The first line of the class docstring is the summary ``onnxcompress passes`` shows.

    The contract, checked before anything runs: ``options`` declare types, choices and
    intervals, :meth:`check_options` the combinations (both when the pass is configured);
    ``reads``/``writes`` list the :class:`Slot` values the pass takes from / leaves in the
    context, :meth:`required_reads` those an earlier pass must have written, and
    :meth:`needs_calibration` whether it cannot run without ``ctx.calib`` (both checked when the
    pipeline is built).
    """

    name: ClassVar[str] = ""
    numerics: ClassVar[Numerics] = Numerics.EXACT
    options: ClassVar[Mapping[str, Option]] = {}
    min_opset: ClassVar[int | None] = None
    #: Slots the pass may read (see :class:`Slot`); those it cannot do without: :meth:`required_reads`.
    reads: ClassVar[tuple[Slot, ...]] = ()
    #: Slots the pass writes.
    writes: ClassVar[tuple[Slot, ...]] = ()
    #: Whether the manager may release an owned big input before this pass (see :meth:`PassManager.run`).
    #: Releasing copies the weights out of the input once, up front: worth it for passes that read
    #: most weights; a pass that reads few (``simplify``) keeps sharing them and, when it changes
    #: nothing, hands the input back without any export.
    releases_input: ClassVar[bool] = True

    def __init__(self, **opts: Any):
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "(none)"
            raise InputError(f"pass {self.name}: unknown option {unknown[0]!r}; valid options: {valid}")
        self.opts = {k: opt.default for k, opt in self.options.items()}
        for key, raw in opts.items():
            try:
                self.opts[key] = self.options[key].parse(key, raw)
            except InputError as exc:
                raise InputError(f"pass {self.name}: {exc}") from None
        self.check_options()

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def check_options(self) -> None:
        """Refuse option combinations that cannot work (each option's own range is declared on
        its :class:`Option`); called at the end of ``__init__``.

        Raises:
            InputError: One line naming the options.
        """

    def required_reads(self) -> tuple[Slot, ...]:
        """The slots of :attr:`reads` an earlier pass must have written, under these options."""
        return ()

    def needs_calibration(self) -> bool:
        """Whether this configured pass cannot run without calibration data (``ctx.calib``)."""
        return False

    def effective_numerics(self) -> Numerics:
        """Numerics of this configured instance (a pass may be exact under some options)."""
        return self.numerics

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place (or return a replacement in ``PassResult.graph``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ":".join(f"{k}={v}" for k, v in self.opts.items() if v != self.options[k].default)
        return self.name + (":" + opts if opts else "")


_REGISTRY: dict[str, type[Pass]] = {}


@overload
def register(cls: type[Pass], *, replace: bool = False) -> type[Pass]: ...


@overload
def register(cls: None = None, *, replace: bool = False) -> Callable[[type[Pass]], type[Pass]]: ...


def register(cls: type[Pass] | None = None, *, replace: bool = False):
    """Class decorator adding a pass to the registry under ``cls.name``: ``@register``, or
    ``register(cls, replace=True)`` / ``@register(replace=True)`` to replace a registered pass.

    Running the same definition again (same module and qualified name: a reload, a re-run
    notebook cell) replaces it too.

    Raises:
        ValueError: ``cls`` has no name, or another pass has that name and ``replace`` is False.
    """

    def add(c: type[Pass]) -> type[Pass]:
        if not c.name:
            raise ValueError(f"{c.__name__} has no name")
        old = _REGISTRY.get(c.name)
        same = old is not None and (old.__module__, old.__qualname__) == (c.__module__, c.__qualname__)
        if old is not None and not (replace or same):
            raise ValueError(f"a pass named {c.name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                             "use register(cls, replace=True) to replace it")
        _REGISTRY[c.name] = c
        return c

    return add if cls is None else add(cls)


def registered() -> dict[str, type[Pass]]:
    """The passes registered so far, sorted by name (:func:`onnxcompress.pipeline.registry` also
    loads the built-in ones)."""
    return dict(sorted(_REGISTRY.items()))

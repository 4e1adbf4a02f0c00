"""The pass contract: :class:`Pass`, :class:`Option`, :class:`Numerics`, :class:`PassContext`,
:class:`PassResult`, :class:`PassRecord` and the registry of pass classes.

A pass rewrites an onnx-graphsurgeon graph in place and returns a :class:`PassResult`; the
manager that runs them is :mod:`onnxcompress.pipeline.manager`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from onnxcompress.core.errors import InputError

__all__ = [
    "Numerics",
    "Option",
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


@dataclass(frozen=True)
class Option:
    """One option of a pass.

    Attributes:
        type: ``bool``, ``int``, ``float``, ``str`` or ``list`` (a list of strings; ``|``-separated
            on the command line).
        default: Value used when the option is not given.
        help: One-line description.
        choices: Allowed values, if restricted.
    """

    type: type
    default: Any
    help: str
    choices: tuple | None = None

    def parse(self, name: str, raw: Any) -> Any:
        """Convert ``raw`` (a CLI string or a TOML value) to this option's type.

        Raises:
            InputError: The value does not fit.
        """
        try:
            value = self._convert(raw)
        except (TypeError, ValueError):
            raise InputError(f"option {name}={raw!r}: expected {self.type.__name__}") from None
        if self.choices is not None and value not in self.choices:
            raise InputError(f"option {name}={raw!r}: expected one of {', '.join(map(str, self.choices))}")
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
        return self.type(raw)


@dataclass
class PassContext:
    """What a pass may know about the world; passes read nothing else.

    Attributes:
        calib: A calibration source (see :mod:`onnxcompress.runtime.data`) or ``None``.
        seed: Seed for every random choice a pass makes.
        logger: Logger passes report to.
        progress: Whether long loops may show a progress bar.
        extra: Values shared between passes of one pipeline. Known keys:
            ``"fold_bn.gamma"``: ``{tensor name: |gamma| array}`` of the BNs ``fold_bn`` folded,
            keyed by the folded node's output, so ``prune_channels:criterion=bn_scale`` can run
            after ``fold_bn``.
            ``"quantize_int8.float_model"``: the float model ``quantize_int8`` quantized (or a
            callable exporting it), ``bias_correction``'s reference.
            ``"quantize_int8.cpu_flags"``: CPU flags to use instead of ``/proc/cpuinfo``.
            ``"factorize.max_gram_dim"``: the largest whitening matrix side of the
            ``factorize_*`` passes (default ``MAX_GRAM_DIM`` of :mod:`onnxcompress.lowrank.factorize`).
    """

    calib: Any = None
    seed: int = 0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("onnxcompress.pass"))
    progress: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        modified: Whether the graph changed.
        stats: Counters (e.g. ``{"folded": 3}``).
        declined: ``(node or tensor name, reason)`` for every candidate the pass left alone.
        graph: A replacement graph, for passes that rebuild rather than edit in place.
    """

    modified: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    declined: list[tuple[str, str]] = field(default_factory=list)
    graph: gs.Graph | None = None

    def count(self, key: str, n: float = 1) -> None:
        """Add ``n`` to counter ``key``."""
        self.stats[key] = self.stats.get(key, 0) + n

    def decline(self, where: str, reason: str, logger: logging.Logger | None = None) -> None:
        """Record (and log at DEBUG) that the candidate ``where`` was left alone, and why."""
        self.declined.append((where, reason))
        (logger or log).debug("declined %s: %s", where, reason)

    def decline_reasons(self) -> dict[str, int]:
        """Decline counts keyed by reason."""
        out: dict[str, int] = {}
        for _, reason in self.declined:
            out[reason] = out.get(reason, 0) + 1
        return out


@dataclass
class PassRecord:
    """A pass's result as the report shows it."""

    name: str
    options: dict[str, Any]
    numerics: Numerics
    result: PassResult
    seconds: float

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "pass": self.name,
            "options": self.options,
            "numerics": self.numerics.name.lower(),
            "modified": self.result.modified,
            "stats": self.result.stats,
            "declined": [{"where": w, "reason": r} for w, r in self.result.declined],
            "seconds": round(self.seconds, 4),
        }


class Pass:
    """Base class of every pass.

    Subclasses set ``name`` (verb-first snake_case; also the CLI token and module name),
    ``numerics``, ``options`` and, if they need it, ``min_opset``; they implement :meth:`run`.
    The first line of the class docstring is the summary ``onnxcompress passes`` shows.
    """

    name: ClassVar[str] = ""
    numerics: ClassVar[Numerics] = Numerics.EXACT
    options: ClassVar[Mapping[str, Option]] = {}
    min_opset: ClassVar[int | None] = None
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
            self.opts[key] = self.options[key].parse(key, raw)

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

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


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Pass]]:
    """The passes registered so far, sorted by name (:func:`onnxcompress.pipeline.registry` also
    loads the built-in ones)."""
    return dict(sorted(_REGISTRY.items()))



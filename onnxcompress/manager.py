"""Pass infrastructure: the :class:`Pass` contract, the registry, pipeline parsing and the manager.

A pass rewrites an onnx-graphsurgeon graph in place and returns a :class:`PassResult`. The
manager runs passes in order; after each one it cleans up, sorts, exports and runs the full ONNX
checker, so a broken rewrite is caught at the pass that made it ("pass X failed after [a, b]").
"""

from __future__ import annotations

import enum
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

import onnx
import onnx_graphsurgeon as gs

from . import serde
from .errors import InputError, PassFailed

__all__ = [
    "Numerics",
    "Option",
    "PassContext",
    "PassResult",
    "PassRecord",
    "Pass",
    "register",
    "registry",
    "get_pass",
    "parse_spec",
    "PassManager",
    "RELEASE_BYTES",
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
        calib: A calibration source (see :mod:`onnxcompress.calib`) or ``None``.
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


def registry() -> dict[str, type[Pass]]:
    """All registered passes, built-in ones included, sorted by name."""
    from . import passes  # noqa: F401 - importing registers the built-in passes

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class called ``name``.

    Raises:
        InputError: No such pass; the message lists the valid names.
    """
    passes = registry()
    if name not in passes:
        raise InputError(f"unknown pass {name!r}; valid passes: {', '.join(passes)}")
    return passes[name]


def parse_spec(spec: str) -> list[Pass]:
    """Parse ``name[:key=value[:key=value]],name2,...`` into configured passes.

    Raises:
        InputError: Empty spec, unknown pass, unknown option or a malformed ``key=value``.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise InputError("empty pass list")
    out = []
    for item in items:
        name, *pairs = item.split(":")
        opts = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise InputError(f"pass {name}: expected key=value, got {pair!r}")
            opts[key.strip()] = value.strip()
        out.append(get_pass(name.strip())(**opts))
    return out


#: Weights from which an owned input model is released before each pass (see :meth:`PassManager.run`).
RELEASE_BYTES = 256 * 2**20


class PassManager:
    """Runs passes in order, checking the model after each one.

    Args:
        passes: Configured passes.
        ctx: The context handed to every pass.
        check: Run the full ONNX checker after each pass.
        on_pass: Called with each :class:`PassRecord` as soon as its pass finishes.
    """

    def __init__(self, passes: Iterable[Pass], ctx: PassContext | None = None, *, check: bool = True,
                 on_pass: Callable[[PassRecord], None] | None = None):
        self.passes = list(passes)
        self.ctx = ctx or PassContext()
        self.check = check
        self.on_pass = on_pass

    @property
    def numerics(self) -> Numerics:
        """The loosest numerics of the pipeline."""
        return max((p.effective_numerics() for p in self.passes), default=Numerics.EXACT)

    def _finish(self, model: onnx.ModelProto | None, template: onnx.ModelProto, graph: gs.Graph, result: PassResult,
                full: bool) -> onnx.ModelProto:
        """Clean up, sort, export and check the pass's graph; an unchanged graph keeps ``model``
        (exported again when ``model`` was released)."""
        if not result.modified and result.graph is None:
            return model if model is not None else _reexport(graph, template)
        graph = result.graph if result.graph is not None else graph
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        new_model = serde.to_model(graph, template)
        if self.check:
            serde.check_model(new_model, full=full)
        return new_model

    def run(self, model: onnx.ModelProto, *, owned: bool = False) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """Run the pipeline on ``model`` (not modified) and return the new model and the records.

        Args:
            model: The input model.
            owned: The caller keeps no reference to ``model`` (pass it as ``run(box.pop())``).
                Then, for models with at least :data:`RELEASE_BYTES` of weights, each pass's
                input model is freed as soon as its graph is built (the graph takes a copy of the
                weights, :func:`~onnxcompress.serde.detach_weights`), so the input's weights never
                coexist with what the pass reads, builds and exports. Models under the threshold
                run exactly as without it.

        Raises:
            PassFailed: A pass raised or left an invalid model.
        """
        from .normalize import normalize, upgrade_opset

        model = normalize(model)
        full = self.check and _passes_full_check(model)
        records: list[PassRecord] = []
        for p in self.passes:
            done = ", ".join(r.name for r in records)
            try:
                if p.min_opset and (serde.model_opset(model) or 0) < p.min_opset:
                    model = upgrade_opset(model, p.min_opset)
                start = time.perf_counter()
                graph = serde.to_graph(model)
                template = model
                release = owned and p.releases_input and serde.weights_nbytes(model) >= RELEASE_BYTES
                if release:
                    template = serde.skeleton_model(model)
                    serde.detach_weights(graph)
                    model = None  # the last reference: frees the input's weights (protobuf arena) ...
                    gc.collect()  # ... once graphs built from it earlier (normalize: reference cycles) are gone
                result = p.run(graph, self.ctx)
                if release:  # what the pass dropped (often in reference cycles) goes before the export
                    gc.collect()
                new_model = self._finish(model, template, graph, result, full)
                if release:  # nothing keeps this pass's arrays alive while the next one runs
                    del graph
                    result.graph = None
                    gc.collect()
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure inside a pass is reported as such
                log.debug("pass %s failed", p.name, exc_info=True)
                raise PassFailed(f"pass {p.name} failed after [{done}]: {type(exc).__name__}: {exc}") from exc
            model, new_model, template = new_model, None, None
            record = PassRecord(p.name, dict(p.opts), p.effective_numerics(), result, time.perf_counter() - start)
            records.append(record)
            log.info("%s: %s", p.name, _stat_line(result))
            if self.on_pass:
                self.on_pass(record)
        return model, records


def _reexport(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """The released model of an unchanged graph: exported as is (no cleanup or sort), with the
    template's model-level fields present exactly where they were, so a model exported by
    onnxcompress comes back byte for byte."""
    model = serde.to_model(graph, template)
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if not template.HasField(name):
            model.ClearField(name)
    return model


def _passes_full_check(model: onnx.ModelProto) -> bool:
    """Whether the input passes onnx's full check; some valid models don't (then passes are
    checked without shape inference rather than failing for what was already there)."""
    try:
        serde.check_model(model, full=True)
        return True
    except Exception as exc:  # noqa: BLE001 - checker and shape inference raise several types
        log.warning("the input model fails onnx's full check (%s); passes are checked without shape inference",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return False


def _stat_line(result: PassResult) -> str:
    parts = [f"{k}={v}" for k, v in result.stats.items()]
    if result.declined:
        parts.append(f"declined={len(result.declined)}")
    return ", ".join(parts) or ("modified" if result.modified else "no change")

"""The pass manager: pipeline parsing, the pipeline checks and the run loop.

When a pipeline is built (:func:`parse_spec`, :class:`PassManager`) it is checked before anything
runs (:func:`check_pipeline`): every :class:`~onnxcompress.core.pass_api.Slot` a pass requires is
written by a pass before it, and calibration data is there when a pass needs it. The manager runs
passes in order; after each one it cleans up, sorts, exports and runs the full ONNX checker, so a
broken rewrite is caught at the pass that made it ("pass X failed after [a, b]").
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from onnxcompress import passes as _builtin  # noqa: F401 - importing registers the built-in passes
from onnxcompress.core import serde
from onnxcompress.core.errors import InputError, PassFailed
from onnxcompress.core.metrics import ModelMetrics, model_metrics
from onnxcompress.core.normalize import normalize, upgrade_opset
from onnxcompress.core.pass_api import Numerics, Pass, PassContext, PassRecord, PassResult, Slot, registered
from onnxcompress.core.shapes import Dims
from onnxcompress.runtime.data import CalibSource, data_dims

__all__ = ["NO_CALIB", "RELEASE_BYTES", "PassManager", "check_pipeline", "get_pass", "parse_spec", "registry"]

log = logging.getLogger(__name__)

# BLAS_THREADS_NOTE: passes run with single-threaded BLAS. OpenBLAS splits products and
# factorizations differently for different thread counts, so least-squares refits (pruning,
# factorization) gave other bytes under OMP_NUM_THREADS=1 (as in Ray workers) than with one
# thread per core. One thread keeps "same input, options and seed => same bytes" on any core count.


def registry() -> dict[str, type[Pass]]:
    """All registered passes, built-in ones included, sorted by name."""
    return registered()


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
        InputError: Empty spec, unknown pass, unknown option, a malformed ``key=value``, an
            option out of range, or a pass that requires a slot no pass before it writes.
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
    check_pipeline(out)
    return out


#: The end of the error when a pass needs calibration data and none is given.
NO_CALIB = "needs calibration data (give --calib PATH, or calib=... in the API)"


def check_pipeline(passes: Sequence[Pass], *, calib: bool | None = None,
                   provided: Iterable[Slot] = ()) -> None:
    """Check that ``passes`` can run in this order, before anything runs.

    Args:
        passes: The pipeline.
        calib: Whether calibration data is given (``None``: not known yet, not checked).
        provided: Slots the caller fills in the context beforehand.

    Raises:
        InputError: One line: a pass reads a slot that no pass before it writes
            ("bias_correction reads the float reference written by quantize_int8, which does not
            run before it"), or a pass needs calibration data and ``calib`` is False.
    """
    written = set(provided)
    for p in passes:
        for slot in p.required_reads():
            if slot not in written:
                writers = [name for name, cls in registry().items() if slot in cls.writes]
                by = f" written by {' or '.join(writers)}, which does not" if writers else ", which no pass"
                raise InputError(f"{p.name} reads {slot.label}{by} run before it")
        written.update(p.writes)
    if calib is False:
        for p in passes:
            if p.needs_calibration():
                raise InputError(f"{p!r} {NO_CALIB}")


#: Weights from which an owned input model is released before each pass (see :meth:`PassManager.run`):
#: from 32 MB, ``fold_bn,quantize_int8`` peaks at 358 MB on ddddocr_ocr (54 MB of weights) and 456 MB
#: on craftnet (83 MB) against 521 / 707 MB without, for ~0.15 s of writes and collections.
RELEASE_BYTES = 32 * 2**20


class PassManager:
    """Runs passes in order, checking the model after each one.

    Args:
        passes: Configured passes.
        ctx: The context handed to every pass.
        check: Run the full ONNX checker after each pass.
        on_pass: Called with each :class:`PassRecord` as soon as its pass finishes.
        release_bytes: Weights from which :meth:`run` with ``owned`` releases each pass's input
            (default :data:`RELEASE_BYTES`).

    After :meth:`run`, :attr:`metrics` holds the :class:`~onnxcompress.core.metrics.ModelMetrics`
    of the model it returned, at the context's dims (measured once: the last pass's MACs come from them).

    Raises:
        InputError: The pipeline fails :func:`check_pipeline` (slots already in ``ctx`` count as
            written; calibration data is ``ctx.calib``).
    """

    def __init__(self, passes: Iterable[Pass], ctx: PassContext | None = None, *, check: bool = True,
                 on_pass: Callable[[PassRecord], None] | None = None, release_bytes: int = RELEASE_BYTES):
        self.passes = list(passes)
        self.ctx = ctx or PassContext()
        self.check = check
        self.on_pass = on_pass
        check_pipeline(self.passes, calib=self.ctx.calib is not None, provided=self.ctx.provided())
        self.release_bytes = release_bytes
        self.metrics: ModelMetrics | None = None

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

    def _call(self, p: Pass, graph: gs.Graph) -> PassResult:
        """``p.run`` with the context bound to ``p`` (it reads and writes only the slots it declares)."""
        later = self.passes[self.passes.index(p) + 1:] if p in self.passes else []
        self.ctx.bind(p, frozenset(slot for q in later for slot in q.reads))
        try:
            with threadpool_limits(limits=1, user_api="blas"):  # see BLAS_THREADS_NOTE
                return p.run(graph, self.ctx)
        finally:
            self.ctx.bind(None)

    def run(self, model: onnx.ModelProto, *, owned: bool = False,
            metrics: ModelMetrics | None = None) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """Run the pipeline on ``model`` (not modified) and return the new model and the records.

        Args:
            model: The input model.
            owned: The caller keeps no reference to ``model`` (pass it as ``run(box.pop())``).
                Then, for models with at least ``release_bytes`` of weights, each pass's
                input model is freed as soon as its graph is built (the graph's big weights go to
                an unlinked temporary file, mapped back when read:
                :func:`~onnxcompress.core.serde.detach_weights`), so the input's weights never
                coexist with what the pass reads, builds and exports. Models under the threshold
                run exactly as without it.
            metrics: ``model``'s metrics at the context's dims, when the caller has them: used
                rather than measured again when normalisation leaves the model as it is.

        Raises:
            PassFailed: A pass raised or left an invalid model.
        """
        box = [normalize(model)]  # the pass's input is only ever referenced from here (see _step)
        if box[0] is not model:  # normalised: another model, measured below
            metrics = None
        del model
        full = self.check and _passes_full_check(box[0])
        dims = self._dims(box[0])
        self.metrics = metrics if metrics is not None else model_metrics(box[0], dims)
        macs, stale = self.metrics.macs, False  # stale: the model was re-exported, unchanged, since measured
        records: list[PassRecord] = []
        for p in self.passes:
            done = ", ".join(r.name for r in records)
            start = time.perf_counter()
            try:
                result, replaced = self._step(p, box, owned=owned, full=full)
            except InputError:
                raise
            except Exception as exc:
                log.debug("pass %s failed", p.name, exc_info=True)
                raise PassFailed(f"pass {p.name} failed after [{done}]: {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            if result.modified:
                self.metrics = model_metrics(box[0], dims)
            stale = not result.modified and (stale or replaced)
            before, macs = macs, self.metrics.macs if result.modified else macs
            record = PassRecord(p.name, dict(p.opts), p.effective_numerics(), result, seconds, before, macs)
            records.append(record)
            log.info("%s: %s", p.name, _stat_line(result))
            if self.on_pass:
                self.on_pass(record)
        if stale:
            self.metrics = model_metrics(box[0], dims)
        return box.pop(), records

    def _dims(self, model: onnx.ModelProto) -> Dims:
        """The context's dims; when unset, resolved from the calibration data's first batch (else
        the defaults, with a warning naming the guessed dims) and stored in the context."""
        if self.ctx.dims is None:
            calib = self.ctx.calib if isinstance(self.ctx.calib, CalibSource) else None
            self.ctx.dims = data_dims(model, None, ("calibration data", getattr(calib, "description", ""), calib),
                                      hint="calibration data, or PassContext(dims=...)")
        return self.ctx.dims

    def _step(self, p: Pass, box: list[onnx.ModelProto], *, owned: bool, full: bool) -> tuple[PassResult, bool]:
        """One pass on the model in ``box`` (taken out, so that releasing it frees its weights; see
        :meth:`run`): build its graph, run it, export and check the result, which goes back in
        ``box``. Returns the pass's result and whether the model in ``box`` is another one."""
        model = box.pop()
        release = owned and p.releases_input and serde.weights_nbytes(model) >= self.release_bytes
        unchanged: onnx.ModelProto | None = None  # what a pass that changes nothing returns
        if p.min_opset and (serde.model_opset(model) or 0) < p.min_opset:
            unchanged = None if release else model  # a released input is not kept for this
            model = upgrade_opset(model, p.min_opset)
        graph = serde.to_graph(model)
        template = model
        kept: onnx.ModelProto | None = model if unchanged is None else unchanged
        if release:
            template = serde.skeleton_model(model)
            serde.detach_weights(graph)
            kept = model = None  # type: ignore[assignment]  # the last references: frees the input's weights ...
            gc.collect()  # ... once graphs built from it earlier (normalize: reference cycles) are gone
        result = self._call(p, graph)
        if release:  # what the pass dropped (often in reference cycles) goes before the export
            gc.collect()
        box.append(self._finish(kept, template, graph, result, full))
        replaced = box[0] is not kept
        if release:  # nothing keeps this pass's arrays alive while the next one runs
            del graph
            result.graph = None
            gc.collect()
        return result, replaced


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
    except Exception as exc:
        log.warning("the input model fails onnx's full check (%s); passes are checked without shape inference",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return False


def _stat_line(result: PassResult) -> str:
    parts = [f"{k}={v}" for k, v in result.stats.items()]
    if result.declined:
        parts.append(f"declined={len(result.declined)}")
    return ", ".join(parts) or ("modified" if result.modified else "no change")

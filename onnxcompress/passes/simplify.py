"""Graph simplification: onnxsim, constant folding, Identity/Dropout removal, dead-node removal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import proto, serde
from onnxcompress.core.graph import constants_nbytes
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassResult, register
from onnxcompress.runtime.session import make_session

__all__ = ["Simplify"]

log = logging.getLogger(__name__)

#: Decline code when the weights exceed protobuf's 2 GB limit (onnxsim needs one serialized model).
R_TOO_LARGE = "onnxsim_skipped_over_2gb"
#: Decline code when onnxsim's constant folding grew the weights by more than ``max_fold_bytes``
#: (int8 weights dequantized by ``Cast -> Mul`` become float): onnxsim is rerun without folding.
R_GREW = "onnxsim_folding_grew_weights"

#: onnx-optimizer passes (run by onnxsim) that are switched off: those that are not exact (they
#: change results beyond float rounding on some inputs), and two exact ones said below.
_SKIPPED_OPTIMIZERS = (
    "fuse_bn_into_conv",  # fold_bn does this, with its own checks and report
    "fuse_consecutive_log_softmax",  # Log(Softmax(x)) -> LogSoftmax(x): no more -inf where x underflows
    "eliminate_nop_monotone_argmax",  # ArgMax(Exp(x)) -> ArgMax(x): ties from saturation differ
    # exact, but on [batch, seq, d] activations it wraps each projection in Reshape -> Gemm ->
    # Reshape, which hides transformer blocks from onnxruntime's fusions and from our analysis
    "fuse_matmul_add_bias_into_gemm",
    "fuse_matmul_add_bias_into_gemm_batched",
)
#: Operators whose result is random: never folded.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)
#: Result dtypes a folded constant may have (what numpy, ORT and onnx all represent the same way).
_FOLDABLE_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"}
)
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
_STAT_KEYS = (
    "nodes_before",
    "nodes_after",
    "constants_before",
    "constants_after",
    "onnxsim_nodes_removed",
    "identities_removed",
    "dropouts_removed",
    "constants_folded",
    "dead_nodes_removed",
)


@dataclass(frozen=True)
class _Signature:
    """Name, dtype and shape of one graph input or output."""

    name: str
    dtype: Any
    shape: Any


@register
class Simplify(Pass):
    """Simplifies the graph exactly: onnxsim, constant folding, Identity/Dropout and dead-node removal.

    Before: ``y = Relu(Identity(Dropout(x)))``, ``s = Reshape(x, Concat(Unsqueeze(Gather(Shape(x)))))``
    After:  ``y = Relu(x)``, ``s = Reshape(x, <constant shape>)`` (static shapes)

    Steps, in order:

    1. onnxsim (option ``onnxsim``) with shape inference, constant folding and its exact
       fusions/eliminations; its BatchNormalization fusion and the few rewrites that are not
       exact are switched off, input shapes are never fixed, nothing runs on a network.
       onnxsim's result is used only if it passes the full checker and keeps every graph input and
       output (names, order); otherwise the pass records the decline ``onnxsim_failed`` (detail:
       why) and continues from the original graph. Above 2 GB of weights onnxsim (which needs one
       serialized protobuf) is not run: decline ``onnxsim_skipped_over_2gb``.
    2. ``Identity`` nodes, and ``Dropout`` nodes in inference mode whose mask output is unused,
       are bypassed. When the output is a graph output, the producer of the input is made to
       write the graph output directly, so graph output names never change; when the input is a
       graph input or a constant too, the node stays.
    3. Constant folding (option ``fold_constants``): nodes of the default domain whose inputs are
       all constants are evaluated once in onnxruntime (optimizations off) and replaced by their
       results. Random ops, Dropout, nodes with subgraphs, and results that are not plain numeric
       tensors are left alone. Folding may make the weights grow past the constants they are
       computed from by ``max_fold_bytes`` in all (no ``Expand`` to a 100 MB tensor, no int8
       weights turned float by folding their ``Cast -> Mul`` dequantization); onnxsim's own folding
       is held to the same total, or rerun without folding (decline ``onnxsim_folding_grew_weights``).
       (Subgraphs of exact ops -- ``Unsqueeze``, ``Reshape``, ``Cast``, ``+ - * /``... -- were
       already folded before any pass, by :mod:`onnxcompress.core.fold`, whatever this option
       says: this step folds the rest.)
    4. Nodes that no graph output depends on are removed.

    Graph inputs and outputs keep their names, order, dtypes and shapes (symbolic dimensions stay
    symbolic); the result is deterministic.

    Stats: ``nodes_before``/``nodes_after`` and ``constants_before``/``constants_after`` (so a
    change that keeps the node count -- duplicate constants merged -- shows), and per step
    ``onnxsim_nodes_removed``, ``identities_removed``, ``dropouts_removed``, ``constants_folded``,
    ``dead_nodes_removed``. ``modified`` is true only when the graph changed.

    Declines (codes): ``onnxsim_failed``, ``onnxsim_skipped_over_2gb``,
    ``onnxsim_folding_grew_weights``; Identity/Dropout kept:
    ``dropout_mask_used``, ``dropout_training_mode``, ``dropout_mode_not_constant``,
    ``input_omitted``, ``graph_output_fed_by_input_or_constant``; not folded:
    ``cannot_evaluate``, ``value_not_computed``, ``dtype_not_folded``, ``result_too_large``,
    ``multi_output_feeds_graph_output`` (details: the error, dtype or size).
    """

    name = "simplify"
    numerics = Numerics.EXACT
    releases_input = False  # reads few weights: keep sharing the input's (no copy on big models)
    options: ClassVar[dict[str, Option]] = {
        "onnxsim": Option(bool, True, "run onnxsim first (shape inference, folding, exact fusions)"),
        "fold_constants": Option(bool, True, "fold nodes whose inputs are all constants"),
        "max_fold_bytes": Option(int, 1 << 20, "bytes that folding may add to the weights in all (and largest growing result)",
                                 interval="[0, inf)"),
    }

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Simplify ``graph``; the result comes back as ``PassResult.graph``."""
        result = PassResult(stats=dict.fromkeys(_STAT_KEYS, 0))
        logger = ctx.logger
        inputs, outputs = _signature(graph.inputs), _signature(graph.outputs)
        before = _node_count(graph)
        result.stats["nodes_before"] = before
        result.stats["constants_before"] = _constant_count(graph)
        if self.opts["onnxsim"]:
            graph = _run_onnxsim(graph, self.opts, result, logger)
        _remove_passthrough(graph, result, logger)
        if self.opts["fold_constants"]:
            _fold_constants(graph, self.opts["max_fold_bytes"], result, logger)
        n_before_cleanup = _node_count(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        result.count("dead_nodes_removed", n_before_cleanup - _node_count(graph))
        _restore_signature(graph.inputs, inputs)
        _restore_signature(graph.outputs, outputs)
        result.stats["nodes_after"] = _node_count(graph)
        result.stats["constants_after"] = _constant_count(graph)
        result.modified = result.modified or result.stats["nodes_after"] != before
        result.graph = graph if result.modified else None  # unchanged: the manager keeps the model as is
        return result


# --- graph signature ---------------------------------------------------------------------------


def _signature(tensors: list[gs.Tensor]) -> list[_Signature]:
    return [_Signature(t.name, getattr(t, "dtype", None), getattr(t, "shape", None)) for t in tensors]


def _same_names(graph: gs.Graph, inputs: list[_Signature], outputs: list[_Signature]) -> bool:
    return [t.name for t in graph.inputs] == [s.name for s in inputs] and [t.name for t in graph.outputs] == [
        s.name for s in outputs
    ]


def _restore_signature(tensors: list[gs.Tensor], signature: list[_Signature]) -> None:
    """Put back the original dtype and shape of every graph input/output (onnxsim may refine them)."""
    for tensor, sig in zip(tensors, signature):
        if isinstance(tensor, gs.Variable):
            tensor.dtype, tensor.shape = sig.dtype, sig.shape


def _node_count(graph: gs.Graph) -> int:
    return len(graph.nodes)


def _constant_count(graph: gs.Graph) -> int:
    """Constant tensors of the main graph (onnxsim merges duplicates: a change with as many nodes)."""
    return sum(isinstance(t, gs.Constant) for t in graph.tensors().values())


# --- onnxsim -----------------------------------------------------------------------------------


def _run_onnxsim(graph: gs.Graph, opts: dict[str, Any], result: PassResult, logger: logging.Logger) -> gs.Graph:
    """Run onnxsim on ``graph``; return its result, or ``graph`` itself when onnxsim fails."""
    if constants_nbytes(graph) > serde.PROTO_LIMIT * 0.9:
        logger.warning("simplify: the weights are over 2 GB and onnxsim works on one protobuf; continuing without it")
        result.decline("<model>", R_TOO_LARGE, logger=logger)
        return graph
    inputs, outputs = _signature(graph.inputs), _signature(graph.outputs)
    model = serde.to_model(graph)
    proto.hoist_subgraph_initializers(model)
    try:
        simplified = _onnxsim_call(model, opts)
        _check_like(simplified, model)
        new_graph = serde.to_graph(simplified)
    except Exception as exc:
        return _onnxsim_failed(graph, _short(exc), result, logger)
    if not _same_names(new_graph, inputs, outputs):
        return _onnxsim_failed(graph, "changed the graph inputs or outputs", result, logger)
    grown = constants_nbytes(new_graph) - constants_nbytes(graph)
    if opts["fold_constants"] and grown > opts["max_fold_bytes"]:
        # e.g. int8 weights dequantized by Cast -> Mul: folding stores them as float, 4x larger
        result.decline("<model>", R_GREW, f"weights +{grown} bytes; rerun without its constant folding", logger=logger)
        return _run_onnxsim(graph, {**opts, "fold_constants": False}, result, logger)
    result.count("onnxsim_nodes_removed", len(graph.nodes) - len(new_graph.nodes))
    if proto.same_computation(simplified, model):
        return graph  # onnxsim only added shape information or renamed nothing: keep ours
    result.modified = True
    return new_graph


def _check_like(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Run the full checker on ``model``; only the basic one if ``original`` already fails the full one.

    Raises:
        onnx.checker.ValidationError: ``model`` fails a check that ``original`` passes.
    """
    try:
        serde.check_model(model, full=True)
    except Exception:
        try:
            serde.check_model(original, full=True)
        except Exception:
            serde.check_model(model, full=False)
            return
        raise


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what native code prints to stdout (onnxsim's folding warnings) to stderr instead,
    so the CLI's stdout (tables, ``--json -``) stays clean."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable fd 1 (embedded interpreters): leave it
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _onnxsim_call(model: onnx.ModelProto, opts: dict[str, Any]) -> onnx.ModelProto:
    import onnxsim  # slow to import (~5 s): only when the step runs

    with _stdout_to_stderr():
        simplified, _ = onnxsim.simplify(
            model,
            check_n=0,  # no random-input check: exactness comes from the options below
            perform_optimization=True,
            skip_fuse_bn=True,
            skipped_optimizers=list(_SKIPPED_OPTIMIZERS),
            skip_constant_folding=not opts["fold_constants"],
            include_subgraph=False,
            tensor_size_threshold=f"{max(int(opts['max_fold_bytes']), 1)}B",
            mutable_initializer=True,  # an initializer that is also a graph input may be overridden: keep it
            overwrite_input_shapes=None,  # never fix dynamic dims
            certify=False,
            import_custom_schemas=False,
            inline_functions=False,
            providers=["CPUExecutionProvider"],
            gemm_fusion_backend="ort_cpu",
        )
    return simplified


def _onnxsim_failed(graph: gs.Graph, reason: str, result: PassResult, logger: logging.Logger) -> gs.Graph:
    logger.warning("simplify: onnxsim failed (%s); continuing without it", reason)
    result.decline("<model>", "onnxsim_failed", reason, logger=logger)
    return graph


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --- Identity / Dropout ------------------------------------------------------------------------


def _remove_passthrough(graph: gs.Graph, result: PassResult, logger: logging.Logger) -> None:
    """Bypass every removable Identity and inference-mode Dropout of the main graph."""
    for node in list(graph.nodes):
        if node.op == "Identity" and node.domain in _DEFAULT_DOMAINS:
            key = "identities_removed"
        elif node.op == "Dropout" and node.domain in _DEFAULT_DOMAINS:
            key = "dropouts_removed"
            reason = _dropout_blocker(graph, node)
            if reason:
                result.decline(node.name or node.outputs[0].name, reason, logger=logger)
                continue
            while len(node.outputs) > 1:
                node.outputs.pop()
        else:
            continue
        reason = _bypass(graph, node)
        if reason:
            result.decline(node.name or node.outputs[0].name, reason, logger=logger)
        else:
            graph.nodes.remove(node)
            result.count(key)
            result.modified = True


def _dropout_blocker(graph: gs.Graph, node: gs.Node) -> str | None:
    """Why ``node`` (a Dropout) cannot be removed, or ``None`` if it is an identity."""
    if len(node.outputs) > 1 and not node.outputs[1].is_empty():
        mask = node.outputs[1]
        if mask.outputs or mask in graph.outputs:
            return "dropout_mask_used"
    if node.attrs.get("is_test", 1) == 0:
        return "dropout_training_mode"  # is_test=0
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        mode = node.inputs[2]
        if not isinstance(mode, gs.Constant):
            return "dropout_mode_not_constant"
        if np.asarray(mode.values).any():
            return "dropout_training_mode"
    return None


def _bypass(graph: gs.Graph, node: gs.Node) -> str | None:
    """Remove a one-input pass-through ``node``; return why not when it must stay."""
    src, out = node.inputs[0], node.outputs[0]
    if src.is_empty():
        return "input_omitted"
    if out not in graph.outputs:
        _rewire(out, src)
        node.inputs.clear()
        node.outputs.clear()
        return None
    producer = src.inputs[0] if len(src.inputs) == 1 and isinstance(src, gs.Variable) else None
    if producer is None or src in graph.outputs or src in graph.inputs:
        return "graph_output_fed_by_input_or_constant"
    node.inputs.clear()
    node.outputs.clear()
    _rewire(src, out)
    producer.outputs[producer.outputs.index(src)] = out
    return None


def _rewire(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` (subgraphs included) read ``new`` instead."""
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new


# --- constant folding --------------------------------------------------------------------------


def _fold_constants(graph: gs.Graph, limit: int, result: PassResult, logger: logging.Logger) -> None:
    """Replace nodes computed only from constants by their values (evaluated in onnxruntime)."""
    nodes = _foldable_nodes(graph)
    if not nodes:
        return
    values = _evaluate(graph, nodes, result, logger)
    sources = _source_bytes(nodes)
    outputs = {id(t) for t in graph.outputs}
    budget = [limit]
    for node in nodes:
        if node.op == "Constant":
            continue  # evaluated for its consumers; normalize turns the foldable ones into initializers
        blocker = _fold_blocker(node, values, sources, limit, budget)
        if blocker:
            result.decline(node.name or node.outputs[0].name, *blocker, logger=logger)
            continue
        if any(id(t) in outputs for t in node.outputs):
            if len(node.outputs) > 1:
                result.decline(node.name or node.outputs[0].name, "multi_output_feeds_graph_output", logger=logger)
                continue
            _fold_into_constant_node(node, values)
        else:
            for tensor in node.outputs:
                tensor.to_constant(values[tensor.name])
            node.inputs.clear()
            node.outputs.clear()
            graph.nodes.remove(node)
        result.count("constants_folded")
        result.modified = True


def _foldable_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Nodes (in topological order) computable from constants alone."""
    graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    local = {(f.domain, f.name) for f in graph.functions}
    known: set[int] = set()
    out = []
    for node in graph.nodes:
        if not _foldable_op(node, local):
            continue
        if all(t.is_empty() or isinstance(t, gs.Constant) or id(t) in known for t in node.inputs):
            out.append(node)
            known.update(id(t) for t in node.outputs)
    return out


def _foldable_op(node: gs.Node, local: set[tuple[str, str]]) -> bool:
    if node.domain not in _DEFAULT_DOMAINS or (node.domain, node.op) in local:
        return False
    if node.op in _NONDETERMINISTIC or not node.outputs:
        return False
    return not any(isinstance(v, gs.Graph) or _is_graph_list(v) for v in node.attrs.values())


def _is_graph_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, gs.Graph) for v in value)


def _evaluate(graph: gs.Graph, nodes: list[gs.Node], result: PassResult, logger: logging.Logger) -> dict[str, np.ndarray]:
    """Values of the outputs of ``nodes``: all at once, or node by node if that fails."""
    try:
        return _run_nodes(graph, nodes)
    except Exception as exc:
        logger.debug("simplify: batch constant evaluation failed (%s); trying node by node", _short(exc))
    values: dict[str, np.ndarray] = {}
    for node in nodes:
        if not all(t.is_empty() or isinstance(t, gs.Constant) or t.name in values for t in node.inputs):
            continue
        try:
            values.update(_run_nodes(graph, [node], values))
        except Exception as exc:
            result.decline(node.name or node.outputs[0].name, "cannot_evaluate", _short(exc, 100), logger=logger)
    return values


def _run_nodes(graph: gs.Graph, nodes: list[gs.Node], known: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run ``nodes`` alone in onnxruntime (optimizations off) and return every output's value."""
    known = known or {}
    produced = {id(t) for n in nodes for t in n.outputs}
    feeds = {}
    for node in nodes:
        for tensor in node.inputs:
            if not tensor.is_empty() and id(tensor) not in produced and tensor.name in known:
                feeds[tensor.name] = known[tensor.name]
    wanted = [t for n in nodes for t in n.outputs if not t.is_empty()]
    model = proto.nodes_model(graph, nodes, wanted, feeds)
    sess = make_session(model, threads=1)
    arrays = sess.run([t.name for t in wanted], {})
    return {t.name: a for t, a in zip(wanted, arrays) if isinstance(a, np.ndarray)}


def _source_bytes(nodes: list[gs.Node]) -> dict[int, int]:
    """For each output of ``nodes``: bytes of the distinct constants it is computed from."""
    sources: dict[int, dict[int, int]] = {}
    for node in nodes:
        leaves: dict[int, int] = {}
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                leaves[id(tensor)] = int(np.asarray(tensor.values).nbytes)
            else:
                leaves.update(sources.get(id(tensor), {}))
        for tensor in node.outputs:
            sources[id(tensor)] = leaves
    return {key: sum(leaves.values()) for key, leaves in sources.items()}


def _fold_blocker(node: gs.Node, values: dict[str, np.ndarray], sources: dict[int, int],
                  limit: int, budget: list[int]) -> tuple[str, str] | None:
    """Why ``node`` is not replaced by its values (decline code, detail), or ``None``.

    A fold may make the weights grow past its source constants by at most ``budget[0]`` bytes in
    all (what a fold spends is taken off it), and a growing result may not exceed ``limit``."""
    for tensor in node.outputs:
        if tensor.is_empty():
            continue
        value = values.get(tensor.name)
        if value is None:
            return "value_not_computed", ""
        if value.dtype.name not in _FOLDABLE_DTYPES:
            return "dtype_not_folded", str(value.dtype)
        growth = value.nbytes - sources.get(id(tensor), 0)
        if growth > 0 and (value.nbytes > limit or growth > budget[0]):
            return "result_too_large", f"{value.nbytes} bytes, {growth} more than its source constants"
    for tensor in node.outputs:
        if not tensor.is_empty():
            budget[0] -= max(values[tensor.name].nbytes - sources.get(id(tensor), 0), 0)
    return None


def _fold_into_constant_node(node: gs.Node, values: dict[str, np.ndarray]) -> None:
    """Turn ``node`` (whose single output is a graph output) into a ``Constant`` node."""
    out = node.outputs[0]
    node.inputs.clear()
    node.op, node.domain = "Constant", None
    node.attrs = {"value": gs.Constant(f"{out.name}_value", values[out.name])}

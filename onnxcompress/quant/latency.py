"""Latency of int8 (QDQ) against float on this machine, for ``quantize_int8:latency_aware``.

Per layer: for each quantizable compute layer (Conv, Gemm, MatMul, ConvTranspose, with its
folded Relu/Clip) two one-layer models are built with the real weights and real input shapes
(shape inference at the chosen batch size and the run's symbolic input dims, ``ctx.dims``:
``--dim``, else the calibration data's shapes): the float node, and the same node in QDQ form with
the calibrated parameters, taking its quantized input and giving its quantized output directly
(``DQ -> op -> Q``, which onnxruntime fuses into ``QLinearConv``/``QGemm``/...): in a chain of
int8 layers no Q/DQ runs between them, so the int8 kernel alone is compared with the float one.
Both run in onnxruntime with its graph optimizations **on** (as deployed), one thread, in
interleaved rounds; the result is the median over rounds of ``t_int8 / t_float`` measured in the
same round (:func:`onnxcompress.runtime.bench.paired_ratio`).

With ``dynamic`` (:func:`dynamic_layer_models`) a MatMul/Gemm is timed as float vs
``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` on a float input: the activation's
run-time quantization is part of the layer's cost.

Add, Mul, Concat and pooling layers are not timed: :func:`island_layers` keeps float every
group of them that no quantized compute layer touches (looking through MaxPool/Reshape/Flatten/...
and Relu/Clip), since it would only add Q/DQ work.

Whole model: a float layer between int8 neighbours adds a DQ and a Q that the per-layer
timings do not see, so the pass then times float, all-int8 and the per-layer choice as whole
models (:func:`model_ratios`, interleaved :func:`onnxcompress.runtime.bench.bench`) and keeps the fastest.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassResult
from onnxcompress.core.shapes import Dims, concrete_shapes
from onnxcompress.quant.dynamic import quantize_dynamic_graph
from onnxcompress.quant.placement import KINDS, plan_placement
from onnxcompress.quant.rewrite import apply_plan
from onnxcompress.quant.sensitivity import Quantizer, measured_tensors, plan_params
from onnxcompress.runtime.bench import bench, paired_ratio, round_order
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session

__all__ = [
    "TIMED_OPS",
    "LayerPair",
    "LayerTiming",
    "ModelTimer",
    "Timer",
    "dynamic_layer_models",
    "island_layers",
    "layer_models",
    "measure_ratio",
    "model_ratios",
    "time_layers",
]

log = logging.getLogger(__name__)

#: Op types whose int8 and float forms are timed.
TIMED_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})
_ACTIVATIONS = ("Relu", "Clip")
_THROUGH = frozenset(op for op, kind in KINDS.items() if kind == "passthrough") | set(_ACTIVATIONS)

#: ``timer(layer, pair) -> t_int8 / t_float`` (see :class:`LayerPair`).
Timer = Callable[[str, "LayerPair"], float]
#: ``model_timer(models) -> [t_model / t_models[0] for each model]`` (the first is float).
ModelTimer = Callable[[list[onnx.ModelProto]], list[float]]


@dataclass
class LayerTiming:
    """One timed layer.

    Attributes:
        node: Layer (node) name.
        op_type: Its op type.
        ratio: Median paired ``t_int8 / t_float`` (``None`` if it could not be measured).
        kept_float: Whether int8 was slower than float by more than the margin.
        reason: Why it could not be measured, if so.
    """

    node: str
    op_type: str
    ratio: float | None
    kept_float: bool = False
    reason: str = ""


# ---------------------------------------------------------------------------------- shapes


# ---------------------------------------------------------------------------------- models


def _folded_activation(node: gs.Node, graph_outputs: set[str]) -> gs.Node | None:
    """The Relu/Clip that alone consumes ``node``'s output (the placement may fold it)."""
    out = node.outputs[0]
    if out.name in graph_outputs or len(out.outputs) != 1:
        return None
    act = out.outputs[0]
    return act if act.op in _ACTIVATIONS and act.inputs[0] is out else None


def _tiny_graph(node: gs.Node, act: gs.Node | None, shapes: dict[str, list[int]], opset: int) -> gs.Graph:
    """A fresh graph holding copies of ``node`` (and ``act``) with their own tensors."""
    tensors: dict[str, gs.Tensor] = {}

    def copy(t: gs.Tensor) -> gs.Tensor:
        if not t.name:
            return gs.Variable.empty()
        if t.name not in tensors:
            tensors[t.name] = (gs.Constant(t.name, t.values) if isinstance(t, gs.Constant)
                               else gs.Variable(t.name, dtype=np.float32, shape=shapes[t.name]))
        return tensors[t.name]

    inputs = [copy(t) for t in node.inputs]
    mid = gs.Variable(node.outputs[0].name, dtype=np.float32, shape=shapes.get(node.outputs[0].name))
    nodes = [gs.Node(node.op, node.name, dict(node.attrs), inputs, [mid])]
    out = mid
    if act is not None:
        out = gs.Variable(act.outputs[0].name, dtype=np.float32, shape=shapes.get(act.outputs[0].name))
        nodes.append(gs.Node(act.op, act.name, dict(act.attrs), [mid, *[copy(t) for t in act.inputs[1:]]], [out]))
    feeds = [t for t in tensors.values() if isinstance(t, gs.Variable)]
    return gs.Graph(nodes=nodes, inputs=feeds, outputs=[out], opset=opset)


@dataclass
class LayerPair:
    """One layer as two runnable models: float, and int8 with integer input/output."""

    float_model: onnx.ModelProto
    int8_model: onnx.ModelProto
    float_feeds: dict[str, np.ndarray]
    int8_feeds: dict[str, np.ndarray]


def _integer_io(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Make the QDQ graph take its quantized inputs and give its quantized output directly.

    In a chain of int8 layers no Q/DQ runs between them (they fuse into the integer kernels);
    this leaves only the kernel (``QLinearConv``, ``QGemm``, ...) to time. Returns its feeds: the
    float feeds quantized with the layer's input parameters.
    """
    int8_feeds = {}
    for k, inp in enumerate(list(graph.inputs)):
        q = next((n for n in inp.outputs if n.op == "QuantizeLinear"), None)
        if q is None:
            int8_feeds[inp.name] = feeds[inp.name]
            continue
        scale, zp = float(q.inputs[1].values), q.inputs[2].values
        info = np.iinfo(zp.dtype)
        values = np.clip(np.round(feeds[inp.name] / scale) + int(zp), info.min, info.max).astype(zp.dtype)
        qout = q.outputs[0]
        q.outputs.clear()
        q.inputs.clear()
        graph.inputs[k] = qout
        int8_feeds[qout.name] = values
    out = graph.outputs[0]
    if out.inputs and out.inputs[0].op == "DequantizeLinear":
        dq = out.inputs[0]
        graph.outputs[0] = dq.inputs[0]
        dq.outputs.clear()
    graph.cleanup().toposort()
    return int8_feeds


def layer_models(quantizer: Quantizer, node: gs.Node, act: gs.Node | None, shapes: dict[str, list[int]],
                 seed: int = 0) -> LayerPair:
    """The float and int8 forms of one layer, with the quantizer's calibrated parameters.

    Float inputs are uniform over the tensor's calibrated range; the int8 model gets the same
    values quantized.

    Raises:
        KeyError: An input shape is unknown.
    """
    opset = serde.model_opset(quantizer.model) or 13
    float_model = serde.to_model(_tiny_graph(node, act, shapes, opset), quantizer.model)
    graph = _tiny_graph(node, act, shapes, opset)
    scratch = PassResult()
    plan = plan_placement(graph, quantizer.cfg, scratch)
    quantizer.ensure_calibrated(measured_tensors(plan))
    params = plan_params(plan, quantizer.calib, quantizer.cfg, quantizer.method, quantizer.percentile, scratch)
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in graph.inputs:
        c = quantizer.calib.collectors.get(t.name)
        lo, hi = (float(c.min), float(c.max)) if c is not None and c.count else (-1.0, 1.0)
        feeds[t.name] = rng.uniform(lo, hi, size=t.shape).astype(np.float32)
    apply_plan(graph, plan, params, quantizer.cfg, scratch)
    int8_feeds = _integer_io(graph, feeds)
    return LayerPair(float_model, serde.to_model(graph, quantizer.model), feeds, int8_feeds)


def dynamic_layer_models(quantizer: Quantizer, node: gs.Node, shapes: dict[str, list[int]], seed: int = 0) -> LayerPair:
    """The float and dynamic-int8 forms of one MatMul/Gemm (``quantize_int8:dynamic``): the int8 one
    is ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` (onnxruntime fuses it into
    ``DynamicQuantizeMatMul``), so the activation's run-time quantization is counted in the layer
    (in the model, Q/K/V share one). Both take the same float input (standard normal).

    Raises:
        KeyError: An input shape is unknown.
    """
    opset = serde.model_opset(quantizer.model) or 13
    float_model = serde.to_model(_tiny_graph(node, None, shapes, opset), quantizer.model)
    graph = _tiny_graph(node, None, shapes, opset)
    quantize_dynamic_graph(graph, quantizer.cfg, PassResult())
    graph.cleanup().toposort()
    rng = np.random.default_rng(seed)
    feeds = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in graph.inputs}
    return LayerPair(float_model, serde.to_model(graph, quantizer.model), feeds, feeds)


# ---------------------------------------------------------------------------------- timing


def _time(session, feeds: dict[str, np.ndarray], reps: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(reps):
        session.run(None, feeds)
    return (time.perf_counter_ns() - start) / 1e6 / reps


def measure_ratio(pair: LayerPair, *, rounds: int = 40, warmup: int = 5, target_ms: float = 0.3,
                  seed: int = 0) -> float:
    """Median over interleaved rounds of ``t_int8 / t_float`` (ORT optimizations on, 1 thread).

    Each timed sample repeats the run enough times to last about ``target_ms``, so sub-0.1 ms
    layers are not dominated by timer resolution.
    """
    runs = [(make_session(pair.float_model, optimize=True, threads=1, spin=True), pair.float_feeds),
            (make_session(pair.int8_model, optimize=True, threads=1, spin=True), pair.int8_feeds)]
    for s, feeds in runs:
        for _ in range(warmup):
            s.run(None, feeds)
    single = max(min(_time(s, feeds, 1) for _ in range(3)) for s, feeds in runs)
    reps = int(min(64, max(1, math.ceil(target_ms / max(single, 1e-3)))))
    times: list[list[float]] = [[0.0] * rounds for _ in runs]
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for r, order in enumerate(round_order(2, rounds, seed)):
            for i in order:
                times[i][r] = _time(runs[i][0], runs[i][1], reps)
    finally:
        if gc_was_on:
            gc.enable()
    return paired_ratio(times[1], times[0])


def model_ratios(models: list[onnx.ModelProto], *, batch: int = 1, rounds: int = 100, seed: int = 0,
                 dims: Dims | None = None) -> list[float]:
    """Whole-model latency ratios vs ``models[0]`` with :func:`onnxcompress.runtime.bench.bench` (1 thread,
    interleaved), at ``batch`` and the other symbolic input dims of ``dims`` (``None``: the defaults)."""
    others = {n: v for n, v in dims.values.items() if n not in dims.batch} if dims is not None else None
    report = bench(models, threads=1, batch=batch, dims=others, runs=rounds, warmup=10, seed=seed)
    return [m.ratio_vs_first for m in report.models]


def _default_timer(rounds: int) -> Timer:
    def timer(layer: str, pair: LayerPair) -> float:
        return measure_ratio(pair, rounds=rounds)

    return timer


def time_layers(quantizer: Quantizer, *, batch: int = 1, margin: float = 0.05, timer: Timer | None = None,
                rounds: int = 40, progress: bool = False, dims: Dims | None = None) -> list[LayerTiming]:
    """Time every compute layer of ``quantizer`` int8 vs float; keep float where int8 is slower.

    A layer is kept float when ``ratio > 1 + margin``. Layers whose shapes cannot be inferred
    are not measured (and stay int8).

    Args:
        quantizer: Calibrated.
        batch: Value of the leading dynamic dim for the one-layer models.
        margin: Tolerated slowdown (0.05: int8 may be up to 5 % slower).
        timer: Replaces the measurement (tests inject a deterministic one).
        rounds: Interleaved rounds per layer for the default timer.
        progress: Progress bar.
        dims: The run's symbolic input dims (the shapes the layers see; ``None``: the defaults).
    """
    timer = timer or _default_timer(rounds)
    shapes = concrete_shapes(quantizer.model, dims, batch, filled=quantizer.cfg.dynamic)
    graph = serde.to_graph(quantizer.model)
    nodes = {n.name: n for n in graph.nodes}
    outputs = {t.name for t in graph.outputs}
    layers = [name for name in quantizer.layers if quantizer.ops[name] in TIMED_OPS]
    out = []
    for name in track(layers, "timing layers", total=len(layers), enabled=progress):
        node = nodes[name]
        try:
            models = (dynamic_layer_models(quantizer, node, shapes) if quantizer.cfg.dynamic
                      else layer_models(quantizer, node, _folded_activation(node, outputs), shapes))
        except KeyError as exc:
            out.append(LayerTiming(name, node.op, None, reason=f"shape of {exc.args[0]} unknown"))
            continue
        ratio = float(timer(name, models))
        out.append(LayerTiming(name, node.op, ratio, kept_float=ratio > 1.0 + margin))
        log.info("latency %s (%s): int8/float = %.3f%s", name, node.op, ratio, " -> kept float" if out[-1].kept_float else "")
    return out


# ---------------------------------------------------------------------------------- islands


def _neighbours(node: gs.Node) -> list[gs.Node]:
    """Nodes feeding or reading ``node``, looking through passthrough ops and Relu/Clip."""
    found: list[gs.Node] = []
    seen: set[int] = {id(node)}
    todo = [(t, "up") for t in node.inputs] + [(t, "down") for t in node.outputs]
    while todo:
        tensor, way = todo.pop()
        for other in (tensor.inputs if way == "up" else tensor.outputs):
            if id(other) in seen:
                continue
            seen.add(id(other))
            if other.op in _THROUGH:
                todo += [(t, way) for t in (other.inputs[:1] if way == "up" else other.outputs)]
            else:
                found.append(other)
    return found


def island_layers(quantizer: Quantizer, float_layers: Iterable[str]) -> list[str]:
    """Non-compute layers (Add, Mul, Concat, pooling) that no quantized compute layer touches.

    Such layers are grouped into connected components (neighbours through passthrough ops and
    Relu/Clip); a component with no quantized Conv/Gemm/MatMul/ConvTranspose next to any of its
    members would only add Q/DQ work, so all its members are returned, in graph order.
    """
    kept = set(float_layers)
    graph = serde.to_graph(quantizer.model)
    nodes = {n.name: n for n in graph.nodes}
    live = {name for name in quantizer.layers if name not in kept}
    compute = {name for name in live if quantizer.ops[name] in TIMED_OPS}
    islands: set[str] = set()
    done: set[str] = set()
    for start in quantizer.layers:
        if start not in live or start in compute or start in done:
            continue
        component, touches_compute, todo = {start}, False, [start]
        while todo:
            for other in _neighbours(nodes[todo.pop()]):
                if other.name in compute:
                    touches_compute = True
                elif other.name in live and other.name not in component:
                    component.add(other.name)
                    todo.append(other.name)
        done |= component
        if not touches_compute:
            islands |= component
    return [name for name in quantizer.layers if name in islands]

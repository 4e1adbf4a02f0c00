"""Property-based tests over random small CNNs (hypothesis).

A strategy draws the *plan* of a network (input channels and size, a static or symbolic batch,
a list of blocks, a head); :func:`build` turns it into a model with seeded random weights. Blocks:
plain k×k conv, residual Add (identity or 1×1 projection), Concat of two branches on the channel
axis, depthwise conv (multiplier 1 or 2), a pair of convs sharing one weight initializer, a
standalone BatchNormalization (after an Add, a Concat, a pool...), MaxPool; BN (non-trivial
mean/var/gamma/beta, negative gammas included) after convs at random; Relu / Clip / no activation;
head: GAP → Flatten → Gemm (optionally with BN), or a 1×1 conv; sometimes an intermediate tensor is
also a graph output.

Properties:

* the lossless passes (``fold_bn``, ``simplify``, ``equalize`` when registered, and
  ``fold_bn,simplify``) keep every output within 1e-5 of the original, relative to ``max|ref|``
  (onnxruntime, graph optimizations off), and the result passes onnx's full checker;
* pruning (the channels drawn at random through the real selection rules) satisfies the
  equivalence oracles of ``tests/pruning``: without bias compensation the pruned graph equals the
  original whose consumers ignore the removed channels; with compensation it equals the original
  with those channels' filters zeroed (when no fold is approximate); no layer is left with zero
  channels, also through the ``prune_channels`` pass at ratios up to 0.9;
* every registered pass (options making it fire on tiny graphs, random calibration data) returns a
  model that passes the full checker and runs in onnxruntime with the original's output shapes.

Runs deterministically (``derandomize=True``) in well under a minute on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pruning.apply import apply_pruning, mask_inputs
from onnxcompress.pruning.dependency import analyze
from onnxcompress.runtime.data import open_source
from tests.helpers.pruning import padded_depthwise_gemm, prune, zeroed
from tests.helpers.runs import builtin_passes, max_err, ort_run, run_passes
from tests.helpers.tensors import random_feeds

TOL = 1e-5
SETTINGS = {"derandomize": True, "deadline": None, "suppress_health_check": list(HealthCheck)}

# ---------------------------------------------------------------- the network plan


@dataclass(frozen=True)
class Block:
    """One block of the plan (fields unused by a kind are ignored).

    Attributes:
        kind: ``conv``, ``res``, ``proj``, ``concat``, ``dw``, ``twin``, ``bn`` or ``pool``.
        width: Output channels (``conv``, ``proj``; first branch of ``concat``).
        width2: Second branch of ``concat``.
        k: Kernel size (1 or 3; 3 is padded to keep the size).
        bn: A BatchNormalization after the conv.
        act: ``relu``, ``clip`` or ``none``.
        bias: The conv has a bias.
        mult: Depthwise channel multiplier.
    """

    kind: str
    width: int = 4
    width2: int = 3
    k: int = 1
    bn: bool = False
    act: str = "relu"
    bias: bool = True
    mult: int = 1


@dataclass(frozen=True)
class Plan:
    """A random network: the weights come from ``seed``."""

    seed: int
    channels: int
    size: int
    batch: str | int
    stem: Block
    blocks: tuple[Block, ...]
    head: str
    head_bn: bool
    extra_output: bool


ACTS = st.sampled_from(["relu", "clip", "none"])


@st.composite
def blocks(draw) -> Block:
    kind = draw(st.sampled_from(["conv", "res", "proj", "concat", "dw", "twin", "bn", "pool"]))
    return Block(kind, width=draw(st.integers(1, 8)), width2=draw(st.integers(1, 6)),
                 k=draw(st.sampled_from([1, 3])), bn=draw(st.booleans()), act=draw(ACTS),
                 bias=draw(st.booleans()), mult=draw(st.sampled_from([1, 2])))


@st.composite
def plans(draw) -> Plan:
    stem = Block("conv", width=draw(st.integers(2, 8)), k=draw(st.sampled_from([1, 3])), bn=draw(st.booleans()),
                 act=draw(ACTS), bias=draw(st.booleans()))
    return Plan(seed=draw(st.integers(0, 2**16)), channels=draw(st.integers(1, 3)), size=draw(st.sampled_from([4, 6])),
                batch=draw(st.sampled_from(["N", 1, 2])), stem=stem,
                blocks=tuple(draw(st.lists(blocks(), min_size=1, max_size=5))),
                head=draw(st.sampled_from(["gemm", "conv"])), head_bn=draw(st.booleans()),
                extra_output=draw(st.integers(0, 4)) == 0)


# ---------------------------------------------------------------- building the model


class _Builder:
    """Appends nodes to a growing graph; tracks the current tensor, its channels and size."""

    def __init__(self, plan: Plan):
        self.rng = np.random.default_rng(plan.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.x, self.c, self.size = "x", plan.channels, plan.size
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def node(self, op: str, ins: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits[name] = np.asarray(value, np.float32)
        return name

    def conv(self, x: str, c_in: int, c_out: int, k: int, bias: bool, group: int = 1, weight: str | None = None) -> str:
        fan_in = c_in // group * k * k
        if weight is None:
            weight = self.const("w", self.rng.standard_normal((c_out, c_in // group, k, k)) / np.sqrt(fan_in))
        ins = [x, weight] + ([self.const("b", self.rng.normal(0, 0.3, c_out))] if bias else [])
        return self.node("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        sign = self.rng.choice([-1.0, 1.0], c, p=[0.25, 0.75])
        params = [sign * self.rng.uniform(0.3, 1.5, c), self.rng.normal(0, 0.5, c), self.rng.normal(0, 0.5, c),
                  self.rng.uniform(0.2, 2.0, c)]
        eps = float(self.rng.choice([1e-5, 1e-3]))
        return self.node("BatchNormalization", [x] + [self.const(p, v) for p, v in zip("gbmv", params)], epsilon=eps)

    def act(self, x: str, kind: str) -> str:
        if kind == "relu":
            return self.node("Relu", [x])
        if kind == "clip":
            return self.node("Clip", [x, self.const("lo", np.float32(0.0)), self.const("hi", np.float32(6.0))])
        return x

    def conv_bn_act(self, x: str, c_in: int, blk: Block, c_out: int, group: int = 1) -> str:
        y = self.conv(x, c_in, c_out, blk.k, blk.bias, group)
        return self.act(self.bn(y, c_out) if blk.bn else y, blk.act)

    def block(self, blk: Block) -> None:
        x, c = self.x, self.c
        if blk.kind == "conv":
            self.x, self.c = self.conv_bn_act(x, c, blk, blk.width), blk.width
        elif blk.kind == "res":
            self.x = self.act(self.node("Add", [self.conv_bn_act(x, c, Block("conv", k=blk.k, bn=blk.bn, act=blk.act,
                                                                               bias=blk.bias), c), x]), "relu")
        elif blk.kind == "proj":
            main = self.conv_bn_act(x, c, Block("conv", k=blk.k, bn=blk.bn, act="none", bias=blk.bias), blk.width)
            skip = self.conv(x, c, blk.width, 1, True)
            self.x, self.c = self.act(self.node("Add", [main, skip]), blk.act), blk.width
        elif blk.kind == "concat":
            a = self.conv_bn_act(x, c, Block("conv", k=1, bn=blk.bn, act=blk.act, bias=blk.bias), blk.width)
            b = self.conv_bn_act(x, c, Block("conv", k=blk.k, bn=False, act="relu", bias=True), blk.width2)
            axis = 1 if blk.bias else -3
            self.x, self.c = self.node("Concat", [a, b], axis=axis), blk.width + blk.width2
        elif blk.kind == "dw":
            self.x, self.c = self.conv_bn_act(x, c, Block("conv", k=blk.k, bn=blk.bn, act=blk.act, bias=blk.bias),
                                              c * blk.mult, group=c), c * blk.mult
        elif blk.kind == "twin":  # two convs sharing one weight initializer, each with its own BN
            w = self.const("wshared", self.rng.standard_normal((c, c, 1, 1)) / np.sqrt(c))
            a, b = (self.bn(self.conv(x, c, c, 1, False, weight=w), c) for _ in range(2))
            self.x = self.act(self.node("Add", [a, b]), blk.act)
        elif blk.kind == "bn":
            self.x = self.act(self.bn(x, c), blk.act)
        elif blk.kind == "pool" and self.size >= 2:
            self.x, self.size = self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), self.size // 2

    def head(self, plan: Plan) -> str:
        if plan.head == "conv":
            return self.conv(self.x, self.c, 3, 1, True)
        flat = self.node("Flatten", [self.node("GlobalAveragePool", [self.x])])
        w = self.const("wfc", self.rng.standard_normal((5, self.c)) / np.sqrt(self.c))
        out = self.node("Gemm", [flat, w, self.const("bfc", self.rng.normal(0, 0.3, 5))], transB=1)
        return self.bn(out, 5) if plan.head_bn else out


def build(plan: Plan) -> onnx.ModelProto:
    """The model of ``plan`` (passes the full checker)."""
    b = _Builder(plan)
    b.x, b.c = b.conv_bn_act("x", plan.channels, plan.stem, plan.stem.width), plan.stem.width
    for blk in plan.blocks:
        b.block(blk)
    inner = b.x  # also a graph output when plan.extra_output
    outputs = [b.head(plan)] + ([inner] if plan.extra_output else [])
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [plan.batch, plan.channels, plan.size,
                                                                              plan.size])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, name=k) for k, v in b.inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------- checks


def assert_close(ref: onnx.ModelProto, got: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = TOL) -> None:
    """Every output of ``got`` within ``tol`` of ``ref``'s, relative to ``max(1, max|ref|)``."""
    outs_ref, outs_got = ort_run(ref, feeds), ort_run(got, feeds)
    assert len(outs_ref) == len(outs_got)
    for a, b in zip(outs_ref, outs_got):
        assert a.shape == b.shape
        scale = max(1.0, float(np.max(np.abs(a))))
        err = float(np.max(np.abs(a.astype(np.float64) - b)))
        assert err <= tol * scale, f"max abs err {err:.3g} (scale {scale:.3g})"


def assert_valid(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Full checker; no zero-sized initializer or inferred dim; runs with the original's output shapes."""
    onnx.checker.check_model(model, full_check=True)
    for init in model.graph.initializer:
        assert all(d > 0 for d in init.dims) or not init.dims, f"zero-sized initializer {init.name} {init.dims}"
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        assert 0 not in dims, f"zero-channel tensor {vi.name}"
    feeds = random_feeds(original)
    shapes = [o.shape for o in ort_run(original, feeds)]
    assert [o.shape for o in ort_run(model, feeds)] == shapes


def lossless_specs() -> list[str]:
    """The exact passes to check (``equalize`` only once registered)."""
    names = builtin_passes()
    specs = ["fold_bn", "simplify", "fold_bn,simplify"]
    if "equalize" in names:
        specs += ["equalize", "fold_bn,equalize,simplify"]
    return specs


#: Options that make each pass fire on graphs with a handful of channels.
FIRE = {
    "prune_channels": "prune_channels:ratio=0.5:round_to=1",
    "factorize_svd": "factorize_svd:rank_ratio=0.5:round_to=1:min_channels=1:max_mac_ratio=1.0",
    "factorize_tucker": "factorize_tucker:rank_ratio=0.5:round_to=1:min_channels=1:max_mac_ratio=1.0:iters=1",
    "factorize_dwsep": "factorize_dwsep:rank=1:round_to=1:min_channels=1:max_mac_ratio=1.0",
}


#: Passes that read what another pass writes run after it (the manager refuses them alone).
BEFORE = {"bias_correction": "quantize_int8"}


def fire_spec(name: str) -> str:
    """Spec of ``name`` with the :data:`FIRE` options it knows (after its :data:`BEFORE` pass)."""
    if name not in FIRE:
        return f"{BEFORE[name]},{name}" if name in BEFORE else name
    known = builtin_passes()[name].options
    head, *pairs = FIRE[name].split(":")
    return ":".join([head, *(p for p in pairs if p.split("=")[0] in known)])


# ---------------------------------------------------------------- properties


def test_builder_covers_every_block():
    """The strategy's building blocks all make valid models (a fixed plan, not random)."""
    kinds = ["conv", "res", "proj", "concat", "dw", "twin", "bn", "pool"]
    plan = Plan(1, 2, 6, "N", Block("conv", width=4, k=3, bn=True), tuple(Block(k, bn=True) for k in kinds),
                "gemm", True, True)
    model = build(plan)
    ops = {n.op_type for n in model.graph.node}
    assert {"Add", "Concat", "MaxPool", "BatchNormalization", "Gemm", "GlobalAveragePool"} <= ops
    assert any(a.name == "group" and a.i > 1 for n in model.graph.node for a in n.attribute)
    assert len(model.graph.output) == 2


@settings(max_examples=150, **SETTINGS)
@given(plans())
def test_lossless_passes_preserve_outputs(plan):
    model = build(plan)
    feeds = random_feeds(model, seed=plan.seed % 97)
    for spec in lossless_specs():
        out, _ = run_passes(model, spec)
        onnx.checker.check_model(out, full_check=True)
        assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output], spec
        assert_close(model, out, feeds)


@settings(max_examples=150, **SETTINGS)
@given(plans(), st.integers(0, 1000), st.sampled_from([0.3, 0.5, 0.9]))
def test_pruning_oracles(plan, seed, ratio):
    model = build(plan)
    feeds = random_feeds(model, seed=seed)
    # Without compensation: equal to the original whose consumers ignore the removed channels (always exact).
    graph = serde.to_graph(model)
    analysis = analyze(graph)
    from tests.helpers.pruning import choose

    remove = choose(analysis, seed, ratio)
    apply_pruning(analysis, remove, compensate=False)
    graph.cleanup().toposort()
    pruned = serde.to_model(graph, model)
    assert_valid(pruned, model)
    ref = serde.to_graph(model)
    mask_inputs(analyze(ref), remove)
    ref.cleanup().toposort()
    assert_close(serde.to_model(ref, model), pruned, feeds)
    # With compensation: equal to the zeroed original where the fold is exact.
    pruned, _, remove, report = prune(model, seed=seed)
    assert_valid(pruned, model)
    if report.approximate == 0:
        err, scale = max_err(zeroed(model, remove), pruned, feeds)
        assert err <= TOL * max(1.0, scale)


def test_padded_depthwise_constant_is_exact_or_reported_approximate():
    """Found by the property test: a removed channel's constant is not constant after a padded
    depthwise conv (border pixels), so the compensation must count as approximate."""
    model = padded_depthwise_gemm(np.random.default_rng(0))
    pruned, _, remove, report = prune(model, {0: np.array([2, 5])})
    err, scale = max_err(zeroed(model, remove), pruned, random_feeds(model))
    assert err <= TOL * max(1.0, scale) or report.approximate > 0


@settings(max_examples=80, **SETTINGS)
@given(plans(), st.sampled_from([0.5, 0.9]))
def test_prune_pass_never_empties_a_layer(plan, ratio):
    model = build(plan)
    out, records = run_passes(model, f"prune_channels:ratio={ratio}:round_to=1:max_group_ratio=0.9")
    assert_valid(out, model)
    assert records[0].result.stats.get("channels_after", 1) > 0


@settings(max_examples=40, **SETTINGS)
@given(plans())
def test_every_pass_returns_a_valid_model(plan):
    model = build(plan)
    feeds = [random_feeds(model, seed=i) for i in range(4)]
    for name in builtin_passes():
        ctx = PassContext(calib=open_source(feeds, model), seed=plan.seed)
        out, _ = run_passes(model, fire_spec(name), ctx)
        assert_valid(out, model)

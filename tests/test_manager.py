import importlib
import json
import logging
import math
import re

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxcompress.core import pass_api
from onnxcompress.core.errors import InputError, PassFailed
from onnxcompress.core.metrics import model_metrics
from onnxcompress.core.pass_api import (
    BN_GAMMA,
    FLOAT_REFERENCE,
    Numerics,
    Option,
    Pass,
    PassContext,
    PassRecord,
    PassResult,
    Slot,
    register,
)
from onnxcompress.pipeline import manager as manager_module
from onnxcompress.pipeline.manager import PassManager, check_pipeline, get_pass, parse_spec, registry
from onnxcompress.quant.bias_correction import FLOAT_STATISTICS
from tests.helpers.builders import parse

MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) { r = Relu(x)
 y = Neg(r) }"""


class Noop(Pass):
    """Does nothing."""

    name = "noop_for_test"
    options = {"k": Option(int, 1, "a number"), "flag": Option(bool, False, "a flag"),
               "mode": Option(str, "a", "a choice", choices=("a", "b")), "names": Option(list, [], "names")}

    def run(self, graph, ctx):
        return PassResult(stats={"k": self.opts["k"]})


class Breaks(Pass):
    """Leaves a dangling input."""

    name = "breaks_for_test"
    numerics = Numerics.LOSSY

    def run(self, graph, ctx):
        graph.nodes[0].inputs[0] = gs.Variable("undefined", dtype=np.float32, shape=[2, 3])
        return PassResult(modified=True)


def test_options_parse_and_validate():
    p = Noop(k="3", flag="yes", mode="b", names="a|b")
    assert p.opts == {"k": 3, "flag": True, "mode": "b", "names": ["a", "b"]}
    with pytest.raises(InputError, match="unknown option 'x'; valid options: flag, k, mode, names"):
        Noop(x=1)
    with pytest.raises(InputError, match="expected int"):
        Noop(k="1.5")
    with pytest.raises(InputError, match="expected one of a, b"):
        Noop(mode="c")
    with pytest.raises(InputError, match="expected bool"):
        Noop(flag="maybe")


def test_parse_spec_errors():
    with pytest.raises(InputError, match="unknown pass 'nope'; valid passes:"):
        parse_spec("nope")
    with pytest.raises(InputError, match="empty pass list"):
        parse_spec(" , ")


def test_manager_runs_and_reports():
    model, records = PassManager([Noop(k=2), Noop()]).run(parse(MODEL))
    assert [r.result.stats for r in records] == [{"k": 2}, {"k": 1}]
    assert records[0].as_dict()["numerics"] == "exact"


class NeedsNewOpset(Noop):
    """Needs opset 21 and may change nothing (as when quantize_weights reverts every layer)."""

    name = "needs_opset_for_test"
    min_opset = 21


def test_a_pass_that_changes_nothing_keeps_the_input_opset():
    model = parse(MODEL)
    out, _ = PassManager([NeedsNewOpset()]).run(model)
    assert out.opset_import[0].version == 17
    assert out.SerializeToString() == PassManager([]).run(model)[0].SerializeToString()


def test_a_pass_that_changes_the_graph_gets_the_opset_it_needs():
    class Renames(NeedsNewOpset):
        name = "needs_opset_renames_for_test"

        def run(self, graph, ctx):
            graph.nodes[0].name = "renamed"
            return PassResult(modified=True)

    out, _ = PassManager([Renames()]).run(parse(MODEL))
    assert out.opset_import[0].version == 21 and out.graph.node[0].name == "renamed"


class RenamesFirst(NeedsNewOpset):
    """Renames the first node (a change that needs opset 21)."""

    name = "renames_first_for_test"

    def run(self, graph, ctx):
        graph.nodes[0].name = "renamed"
        return PassResult(modified=True)


def _named(text: str = MODEL):
    """``text`` with every node named: normalisation leaves it as it is."""
    model = parse(text)
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    return model


@pytest.fixture
def measured(monkeypatch):
    """The models the manager measures, in order."""
    seen = []
    monkeypatch.setattr(manager_module, "model_metrics", lambda m, dims: seen.append(m) or model_metrics(m, dims))
    return seen


def test_the_callers_metrics_are_used_when_normalisation_changes_nothing(measured):
    model = _named()
    given = model_metrics(model)
    mgr = PassManager([Noop(), NeedsNewOpset()])
    out, records = mgr.run(model, metrics=given)
    assert out is model and mgr.metrics is given and measured == []
    assert [(r.macs_before, r.macs_after) for r in records] == [(given.macs, given.macs)] * 2


def test_a_normalised_input_is_measured_whatever_the_caller_gives(measured):
    model = parse(MODEL)  # unnamed nodes: normalisation names them
    given = model_metrics(model)
    mgr = PassManager([Noop()])
    out, _ = mgr.run(model, metrics=given)
    assert out is not model and measured == [out]
    assert mgr.metrics == model_metrics(out) and mgr.metrics.file_bytes != given.file_bytes


def test_the_metrics_are_those_of_the_returned_model_measured_once_per_change(measured):
    mgr = PassManager([Noop(), RenamesFirst(), Noop()])
    out, records = mgr.run(_named(), metrics=model_metrics(_named()))
    assert measured == [out] and mgr.metrics == model_metrics(out) and mgr.metrics.opset == 21
    assert [r.macs_after for r in records] == [0, 0, 0]


def test_an_unchanged_model_exported_again_is_measured_again(measured):
    """Released (``owned``) and upgraded for a pass that then changes nothing: the returned model
    is the re-exported one at the new opset, which the metrics describe."""
    model = _named()
    given = model_metrics(model)
    mgr = PassManager([NeedsNewOpset(), Noop()], release_bytes=0)
    out, _ = mgr.run(model, owned=True, metrics=given)
    assert out.opset_import[0].version == 21 and measured == [out]
    assert mgr.metrics == model_metrics(out) and mgr.metrics.opset == 21 and given.opset == 17


def test_manager_names_failing_pass():
    mgr = PassManager([Noop(), Breaks()])
    assert mgr.numerics == Numerics.LOSSY
    with pytest.raises(PassFailed, match=r"pass breaks_for_test failed after \[noop_for_test\]"):
        mgr.run(parse(MODEL))


# ---------------------------------------------------------------- the contract: slots


SLOT = Slot("test_value", int, "the test value", "a number one test pass leaves for another")


class Writes(Pass):
    """Leaves a number in the context."""

    name = "writes_for_test"
    writes = (SLOT,)

    def run(self, graph, ctx):
        ctx.put(SLOT, 7)
        return PassResult()


class Reads(Pass):
    """Needs the number."""

    name = "reads_for_test"
    reads = (SLOT,)

    def required_reads(self):
        return (SLOT,)

    def run(self, graph, ctx):
        return PassResult(stats={"seen": ctx.get(SLOT)})


class Sneaky(Pass):
    """Writes a slot it does not declare."""

    name = "sneaky_for_test"

    def run(self, graph, ctx):
        ctx.put(SLOT, 1)
        return PassResult()


@pytest.fixture
def scratch_registry(monkeypatch):
    """Register test passes in a copy of the registry, dropped after the test."""
    monkeypatch.setattr(pass_api, "_REGISTRY", dict(pass_api._REGISTRY))


def test_reader_after_writer_runs_and_reads_the_value(scratch_registry):
    register(Writes)
    _, records = PassManager([Writes(), Reads()]).run(parse(MODEL))
    assert records[1].result.stats == {"seen": 7}


def test_reader_before_writer_is_refused_in_one_line(scratch_registry):
    register(Writes)
    with pytest.raises(InputError) as exc:
        PassManager([Reads(), Writes()])
    assert str(exc.value) == "reads_for_test reads the test value written by writes_for_test, which does not run before it"
    with pytest.raises(InputError, match="^reads_for_test reads the test value written by writes_for_test"):
        check_pipeline([Noop(), Reads()])


def test_reader_without_any_writer_or_given_by_the_caller():
    with pytest.raises(InputError, match="^reads_for_test reads the test value, which no pass run before it$"):
        PassManager([Reads()])
    _, records = PassManager([Reads()], PassContext(values={SLOT: 3})).run(parse(MODEL))  # given by the caller
    assert records[0].result.stats == {"seen": 3}


def test_builtin_order_is_checked_at_parse_time():
    message = "^bias_correction reads the float reference written by quantize_int8, which does not run before it$"
    for spec in ("bias_correction", "bias_correction,quantize_int8", "fold_bn,bias_correction,quantize_int8"):
        with pytest.raises(InputError, match=message):
            parse_spec(spec)
    parse_spec("quantize_int8,bias_correction")
    parse_spec("fold_bn,quantize_int8,simplify,bias_correction")
    parse_spec("bias_correction:reference=dequantized")  # needs no float reference
    parse_spec("prune_channels,fold_bn")  # bn gammas are an optional read: either order
    parse_spec("fold_bn,prune_channels")


def test_undeclared_writes_and_reads_fail_the_pass():
    with pytest.raises(PassFailed, match="sneaky_for_test writes slot test_value without declaring it"):
        PassManager([Sneaky()]).run(parse(MODEL))

    class Peeks(Noop):
        name = "peeks_for_test"

        def run(self, graph, ctx):
            ctx.get(SLOT)
            return PassResult()

    with pytest.raises(PassFailed, match="peeks_for_test reads slot test_value without declaring it"):
        PassManager([Peeks()]).run(parse(MODEL))


def test_slot_values_are_type_checked():
    ctx = PassContext()
    with pytest.raises(TypeError, match="slot test_value: str is not a int"):
        ctx.put(SLOT, "seven")
    ctx.put(SLOT, 7)
    assert ctx.get(SLOT) == 7 and ctx.provided() == {SLOT}
    assert PassContext().get(SLOT) is None


def test_builtin_slots_are_declared_by_their_passes():
    passes = registry()
    assert passes["fold_bn"].writes == (BN_GAMMA,) and BN_GAMMA in passes["prune_channels"].reads
    assert FLOAT_REFERENCE in passes["quantize_int8"].writes and passes["bias_correction"].reads == (
        FLOAT_REFERENCE, FLOAT_STATISTICS)
    assert FLOAT_STATISTICS in passes["quantize_int8"].writes  # optional: bias_correction measures without it
    assert get_pass("bias_correction")().required_reads() == (FLOAT_REFERENCE,)
    assert get_pass("bias_correction")(reference="dequantized").required_reads() == ()
    assert get_pass("prune_channels")().required_reads() == ()


# ---------------------------------------------------------------- the contract: calibration


@pytest.mark.parametrize("spec, needs", [
    ("quantize_int8", True), ("quantize_int8:weights_only=true", False), ("bias_correction:reference=dequantized", True),
    ("prune_channels:criterion=activation", True), ("prune_channels", False), ("factorize_tucker", False),
    ("factorize_svd:data_aware=true", False), ("fold_bn", False), ("simplify", False), ("equalize", False)])
def test_needs_calibration(spec, needs):
    (p,) = parse_spec(spec)
    assert p.needs_calibration() is needs
    if needs:
        with pytest.raises(InputError, match=f"^{re.escape(spec)} needs calibration data \\(give --calib"):
            check_pipeline([p], calib=False)
        with pytest.raises(InputError, match="needs calibration data"):
            PassManager([p])
    else:
        check_pipeline([p], calib=False)
    check_pipeline([p], calib=True)


# ---------------------------------------------------------------- the contract: options


def test_option_intervals():
    opt = Option(float, 0.5, "a fraction", interval="[0, 1)")
    assert opt.parse("r", "0") == 0.0 and opt.rule() == "in [0, 1)"
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(InputError, match=r"option r=.*: must be in \[0, 1\)"):
            opt.parse("r", bad)
    assert Option(int, 1, "n", interval="[1, inf)").rule() == ">= 1"
    assert Option(float, 1.0, "x", interval="(0, inf)").rule() == "> 0"
    assert Option(float, 1.0, "x", interval="(-inf, 2]").rule() == "<= 2"
    with pytest.raises(ValueError, match="malformed interval"):
        Option(int, 1, "n", interval="1..2")


def _builtin_intervals() -> list[tuple[str, str, Option]]:
    from tests.helpers.runs import builtin_passes

    return [(name, key, opt) for name, cls in builtin_passes().items() for key, opt in cls.options.items()
            if opt.interval is not None]


def _outside(opt: Option) -> list[str]:
    """Values just outside ``opt``'s interval (on each finite side)."""
    lo, hi, lo_open, hi_open = opt.bounds()
    step = 1 if opt.type is int else 1e-3
    out = []
    if math.isfinite(lo):
        out.append(lo if lo_open else lo - step)
    if math.isfinite(hi):
        out.append(hi if hi_open else hi + step)
    return [str(int(v) if opt.type is int else v) for v in out]


@pytest.mark.parametrize("name, key, opt", _builtin_intervals(), ids=lambda v: v if isinstance(v, str) else "")
def test_out_of_range_options_are_refused_at_parse_time(name, key, opt):
    assert opt.default is None or opt.contains(opt.default), "the default must lie in the interval"
    for value in _outside(opt):
        with pytest.raises(InputError, match=f"^pass {name}: option {key}=.*: must be "):
            parse_spec(f"{name}:{key}={value}")


def test_every_pass_with_numeric_options_declares_ranges():
    from tests.helpers.runs import builtin_passes

    unchecked = {"prune_channels": {"seed"}}  # any seed is fine
    for name, cls in builtin_passes().items():
        for key, opt in cls.options.items():
            if opt.type in (int, float) and opt.interval is None:
                assert key in unchecked.get(name, set()), f"{name}:{key} has no interval"


def test_option_combinations_are_checked_when_configured():
    with pytest.raises(InputError, match="^quantize_int8: max_drop, min_cosine, min_sqnr and latency_aware need full"):
        get_pass("quantize_int8")(weights_only=True, latency_aware=True)
    with pytest.raises(InputError, match="^pass factorize_svd: rank rules rank, energy conflict"):
        get_pass("factorize_svd")(rank=8, energy=0.9)


# ---------------------------------------------------------------- the contract: registry


def test_register_refuses_a_duplicate_name(scratch_registry):
    class Other(Pass):
        """Another pass called fold_bn."""

        name = "fold_bn"

    original = registry()["fold_bn"]
    with pytest.raises(ValueError, match="a pass named 'fold_bn' is already registered .*replace=True"):
        register(Other)
    assert registry()["fold_bn"] is original
    assert register(Other, replace=True) is Other and registry()["fold_bn"] is Other
    assert register(replace=True)(original) is original and registry()["fold_bn"] is original


def test_register_accepts_the_same_definition_again(scratch_registry):
    def define():
        class Again(Pass):
            """Defined twice, as a reloaded module or a re-run notebook cell does."""

            name = "again_for_test"

        return Again

    first, second = define(), define()
    register(first)
    assert register(second) is second and registry()["again_for_test"] is second


# ---------------------------------------------------------------- the contract: declines


def test_declines_have_a_code_and_a_detail():
    result = PassResult()
    result.decline("a", "does_not_pay", "MAC ratio 0.83")
    result.decline("b", "does_not_pay", "MAC ratio 0.91")
    result.decline("c", "excluded")
    assert result.decline_counts() == {"does_not_pay": 2, "excluded": 1}
    assert result.where_codes() == [("a", "does_not_pay"), ("b", "does_not_pay"), ("c", "excluded")]
    assert result.declined[0].text() == "does_not_pay (MAC ratio 0.83)" and result.declined[2].text() == "excluded"
    record = PassRecord("p", {}, Numerics.EXACT, result, 0.0).as_dict()
    assert record["declined"][0] == {"where": "a", "code": "does_not_pay", "detail": "MAC ratio 0.83"}
    assert json.loads(json.dumps(record))["declined"][2] == {"where": "c", "code": "excluded", "detail": ""}
    for bad in ("does not pay", "Excluded", "ratio 0.83", "", "_x"):
        with pytest.raises(ValueError, match="snake_case"):
            result.decline("d", bad)
    with pytest.raises(ValueError, match="snake_case"):
        result.decline("d", "excluded", logging.getLogger())  # the logger is keyword-only


def _decline_codes() -> list[tuple[str, str]]:
    """Every ``R_*`` constant of the modules that decline, and every entry of their code tuples."""
    found = []
    for module in ("onnxcompress.passes.fold_bn", "onnxcompress.passes.equalize", "onnxcompress.passes.simplify",
                   "onnxcompress.passes.prune_channels", "onnxcompress.passes.quantize_int8",
                   "onnxcompress.passes.bias_correction", "onnxcompress.passes.factorize_svd",
                   "onnxcompress.lowrank.factorize", "onnxcompress.quant.placement",
                   "onnxcompress.quant.bias_correction", "onnxcompress.pruning.types"):
        mod = importlib.import_module(module)
        for attr, value in vars(mod).items():
            if attr.startswith("R_") or attr in ("DECLINE_REASONS", "FREEZE_REASONS", "COMMON_REASONS"):
                found += [(f"{module}.{attr}", v) for v in (value if isinstance(value, tuple) else (value,))]
    return found


def test_decline_codes_are_stable_identifiers():
    codes = _decline_codes()
    assert len(codes) > 80
    bad = [(where, code) for where, code in codes if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", code)]
    assert not bad, bad


def test_toml_booleans_given_to_a_str_option():
    """``reduce_range = true`` in a recipe reaches an ``auto|true|false`` option as the word."""
    opt = Option(str, "auto", "tri-state", choices=("auto", "true", "false"))
    assert opt.parse("k", True) == "true" and opt.parse("k", False) == "false" and opt.parse("k", "auto") == "auto"
    with pytest.raises(InputError, match="expected one of"):
        opt.parse("k", "maybe")

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxcompress.core.errors import InputError, PassFailed
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassResult
from onnxcompress.pipeline.manager import PassManager, parse_spec
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


def test_manager_names_failing_pass():
    mgr = PassManager([Noop(), Breaks()])
    assert mgr.numerics == Numerics.LOSSY
    with pytest.raises(PassFailed, match=r"pass breaks_for_test failed after \[noop_for_test\]"):
        mgr.run(parse(MODEL))

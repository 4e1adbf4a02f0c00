"""Options naming nodes: a name that matches nothing is an error with the closest names (#16)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.runtime.data import RandomSource, input_specs
from tests.helpers.builders import make_model
from tests.helpers.tensors import rand


def _model():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv_first"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv_second")]
    return make_model(nodes, {"x": [1, 8, 6, 6]}, ["y"],
                      {"w1": rand(rng, 16, 8, 3, 3, scale=0.3), "w2": rand(rng, 8, 16, 3, 3, scale=0.3)})


@pytest.mark.parametrize("spec", ["quantize_int8", "prune_channels", "factorize_svd:spatial=true",
                                  "factorize_tucker", "factorize_dwsep", "equalize"])
def test_unknown_exclude_name_lists_close_matches(spec):
    model = _model()
    ctx = PassContext(calib=RandomSource(input_specs(model), count=2, seed=0))
    manager = PassManager(parse_spec(f"{spec}:exclude=conv_frist"), ctx)
    with pytest.raises(InputError, match=r"exclude='conv_frist' names no .* close: conv_first"):
        manager.run(model)


@pytest.mark.parametrize("spec", ["quantize_int8:exclude=conv_first|Relu", "prune_channels:exclude=r1",
                                  "equalize:exclude=conv_second"])
def test_known_names_are_accepted(spec):
    """Node names; op types for quantize_int8; tensor names for prune_channels."""
    model = _model()
    ctx = PassContext(calib=RandomSource(input_specs(model), count=2, seed=0))
    PassManager(parse_spec(spec), ctx).run(model)

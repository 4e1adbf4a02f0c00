"""A few dozen examples of each fuzz target in scripts/fuzz.py: they run and find nothing."""

import logging

import pytest

from tests.helpers.runs import load_script


@pytest.fixture(scope="module")
def fuzz():
    return load_script("fuzz")


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

"""Shared test helpers, imported as ``from tests.helpers.<module> import ...``.

- :mod:`~tests.helpers.tensors`: seeded random arrays (``rand`` with an explicit scale) and inputs.
- :mod:`~tests.helpers.builders`: tiny models (from ONNX text, nodes and arrays; one Conv; a small net).
- :mod:`~tests.helpers.graphs`: reading a model back (initializers, weight shapes, op types, ...).
- :mod:`~tests.helpers.runs`: onnxruntime with graph optimizations off, running passes with the
  checker, comparisons, the repository's scripts as modules.
- :mod:`~tests.helpers.pruning`: the pruning cases and the equivalence oracle.
- :mod:`~tests.helpers.quant`: the quantization helpers (tiny classifier, ``quantize``, Q/DQ readers).

The repository root is on ``sys.path`` through pytest's ``pythonpath`` setting (pyproject.toml),
so the tests import this checkout's ``onnxcompress`` even when an installed copy exists.
"""

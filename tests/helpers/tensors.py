"""Seeded random arrays and model inputs.

Every array comes from a ``numpy.random.Generator`` the caller seeds, so a test's numbers are
fixed by its seed and its calls (in order); weights take their scale explicitly.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress.runtime.data import CalibSource, open_source

__all__ = ["batch_shapes", "calib_for", "feeds_for", "he", "rand", "random_feeds"]


def rand(rng: np.random.Generator, *shape: int, scale: float) -> np.ndarray:
    """float32 normal values of standard deviation ``scale`` (``scale`` is always given: each test
    file used to carry its own default)."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def he(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """He-normal weights: :func:`rand` with scale ``sqrt(2 / fan_in)``, ``fan_in = prod(shape[1:])``."""
    return rand(rng, *shape, scale=np.sqrt(2.0 / int(np.prod(shape[1:]))))


def random_feeds(model: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input: float ones normal, integer ones in [0, 10); symbolic
    dims become ``dim``."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.dtype(dtype).kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def batch_shapes(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    """Shape of each graph input with its symbolic dims set to ``batch``."""
    shapes = {}
    for inp in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        shapes[inp.name] = dims
    return shapes


def feeds_for(model: onnx.ModelProto, n: int = 16, seed: int = 7) -> dict[str, np.ndarray]:
    """``n`` seeded normal float32 samples per input (batch dim ``n``; other symbolic dims too)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal([n, *s[1:]]).astype(np.float32) for k, s in batch_shapes(model, n).items()}


def calib_for(model: onnx.ModelProto, n: int = 64, seed: int = 1) -> CalibSource:
    """In-memory calibration data: ``n`` seeded normal samples per input (dynamic dims: ``n``)."""
    rng = np.random.default_rng(seed)
    arrays = {k: rng.standard_normal([n, *s[1:]]).astype(np.float32) for k, s in batch_shapes(model, n).items()}
    return open_source([arrays], model)

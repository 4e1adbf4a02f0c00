"""Running a conformance case's model in onnxruntime on onnx's stored inputs, and comparing the
outputs with the stored references by the rules of onnx's own backend runner. Element types that
onnxruntime's numpy API cannot carry (bfloat16, float8, 4/2-bit) cross as raw bytes in OrtValues."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxcompress.runtime.session import make_session

__all__ = ["RAW_TYPES", "ort_outputs", "compare_outputs"]


def ort_outputs(model: onnx.ModelProto, inputs: Sequence[Any]) -> list[Any]:
    """Run ``model`` in onnxruntime (CPU, optimizations off) with positional ``inputs``."""
    sess = make_session(model, threads=1, log_severity=4)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    feeds = {name: _feed(value) for name, value in zip(names, inputs)}
    out_types = [o.type.tensor_type.elem_type for o in model.graph.output]
    exotic = any(t in RAW_TYPES for t in out_types) or any(isinstance(v, onnx.TensorProto) for v in feeds.values())
    if not exotic:
        return sess.run(None, feeds)
    values = sess.run_with_ort_values(None, {k: _ort_value(v) for k, v in feeds.items()})
    return [_from_ort_value(v, t) for v, t in zip(values, out_types)]


#: Element types onnxruntime's numpy API neither takes nor returns (numpy holds them only through
#: ml_dtypes, and the 4/2-bit ones are packed): they cross as raw bytes in OrtValues.
RAW_TYPES = frozenset({
    onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ, onnx.TensorProto.FLOAT8E8M0,
    onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1,
    *(getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2") if hasattr(onnx.TensorProto, n)),
})


def _feed(value: Any) -> Any:
    """onnx's data sets hold numpy scalars for 0-d inputs and TensorProtos for exotic dtypes."""
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, onnx.TensorProto):
        return value if value.data_type in RAW_TYPES else onnx.numpy_helper.to_array(value)
    if _raw_type(value) in RAW_TYPES:
        return onnx.numpy_helper.from_array(value)
    if isinstance(value, list):
        return [_feed(v) for v in value]
    return value


def _raw_type(value: Any) -> int | None:
    """The ONNX element type of an array whose dtype comes from ml_dtypes (bfloat16, float8…)."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "V":
        return None
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, ValueError, TypeError):
        return None


def _ort_value(value: Any) -> Any:
    """An OrtValue of an array, or of a TensorProto's raw bytes (exotic element types)."""
    import ctypes

    import onnxruntime as ort

    if not isinstance(value, onnx.TensorProto):
        return ort.OrtValue.ortvalue_from_numpy(value)
    raw = value.raw_data or onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(value)).raw_data
    ort_value = ort.OrtValue.ortvalue_from_shape_and_type(list(value.dims), value.data_type)
    if raw:
        ctypes.memmove(ort_value.data_ptr(), raw, min(len(raw), ort_value.tensor_size_in_bytes()))
    return ort_value


def _from_ort_value(value: Any, elem_type: int) -> Any:
    """The numpy array of an output; exotic element types are decoded from the raw buffer."""
    if elem_type not in RAW_TYPES:
        return value.numpy()
    import ctypes

    nbytes = value.tensor_size_in_bytes()
    raw = bytes((ctypes.c_uint8 * nbytes).from_address(value.data_ptr())) if nbytes else b""
    proto = onnx.TensorProto(data_type=elem_type, dims=value.shape(), raw_data=raw)
    return onnx.numpy_helper.to_array(proto)


def compare_outputs(refs: Sequence[Any], outputs: Sequence[Any], rtol: float, atol: float) -> str | None:
    """Why ``outputs`` do not match ``refs`` (onnx's runner rules), or ``None``."""
    if len(refs) != len(outputs):
        return f"{len(outputs)} outputs, expected {len(refs)}"
    for i, (ref, out) in enumerate(zip(refs, outputs)):
        problem = _compare_one(ref, out, rtol, atol)
        if problem:
            return f"output {i}: {problem}"
    return None


def _compare_one(ref: Any, out: Any, rtol: float, atol: float) -> str | None:
    if isinstance(ref, onnx.TensorProto):
        ref = onnx.numpy_helper.to_array(ref)
    if ref is None or out is None:
        return None if ref is None and out is None else f"got {type(out).__name__}, expected {type(ref).__name__}"
    if isinstance(ref, (list, tuple)) or isinstance(out, (list, tuple)):
        if not isinstance(ref, (list, tuple)) or not isinstance(out, (list, tuple)):
            return f"got {type(out).__name__}, expected {type(ref).__name__}"
        if len(ref) != len(out):
            return f"sequence of {len(out)}, expected {len(ref)}"
        return next((p for r, o in zip(ref, out) if (p := _compare_one(r, o, rtol, atol))), None)
    ref, out = np.asarray(ref), np.asarray(out)
    if ref.shape != out.shape:
        return f"shape {out.shape}, expected {ref.shape}"
    if ref.dtype == object:
        return None if np.array_equal(ref, out) else "strings differ"
    if ref.dtype != out.dtype:
        return f"dtype {out.dtype}, expected {ref.dtype}"
    if ref.dtype.name == "bfloat16":
        ref, out, rtol = ref.astype(np.float32), out.astype(np.float32), max(rtol, 2**-6)
    try:
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)
    except AssertionError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return "; ".join(lines[1:4])
    except TypeError as exc:
        return f"cannot compare: {exc}"
    return None

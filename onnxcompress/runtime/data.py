"""Calibration and validation data: where input samples come from, batch by batch.

A source yields :class:`Batch` objects (a dict of input arrays keyed by input name, plus optional
labels). Sources never hold more than one file or one batch in memory at once, except an
in-memory iterable given by the caller. Every array is checked against the model's inputs:
unknown or missing names, wrong dtype kind and wrong static dims are :class:`InputError`.
Samples may differ in their symbolic dims (one tokenized sentence per file, each of its own
length): only samples of the same shapes share a batch, so a shape change starts a new batch and
consumers see batches whose shapes differ.

Sources:
    * ``.npz`` file, keyed by input name with a leading sample axis (``labels`` optional).
    * A folder of ``.npz`` files (as above) or ``.npy`` files (single-input models), read in
      sorted order, one file at a time.
    * A folder of images (``.png``, ``.jpg``, ...) with a :class:`Preprocess` spec; images in
      sub-folders get the sorted sub-folder index as label.
    * ``random``: seeded random inputs that respect dtypes and shapes (a warning is logged);
      integer inputs respect what they index (:mod:`onnxcompress.core.index_inputs`).
    * Any iterable of ``{input_name: array}`` dicts, a callable returning one, or an object with
      ``get_next()`` like onnxruntime's ``CalibrationDataReader``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import array_row_shapes, array_rows
from onnxcompress.core.index_inputs import IntegerDomain, integer_domains
from onnxcompress.core.shapes import DEFAULT_BATCH, DEFAULT_DYNAMIC_DIM, Dims, dim_name, resolve_dims, symbolic_dims
from onnxcompress.runtime.batching import Batch, cut_count, rebatch
from onnxcompress.runtime.preprocess import Preprocess, check_channels, parse_preprocess

__all__ = [
    "LABEL_KEYS",
    "InputSpec",
    "CalibSource",
    "FileSource",
    "ImageFolderSource",
    "RandomSource",
    "IterableSource",
    "SplitSource",
    "data_dims",
    "input_specs",
    "open_source",
]

log = logging.getLogger(__name__)

LABEL_KEYS = ("labels", "label")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, shape (``None`` where symbolic) and the names of its symbolic
    dims (``None`` where fixed; see :func:`onnxcompress.core.shapes.dim_name`)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    dim_names: tuple[str | None, ...] = ()

    def batch_dim_static(self) -> int | None:
        """The leading dim when it is fixed, else ``None``."""
        return self.shape[0] if self.shape and self.shape[0] is not None else None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializer-backed inputs excluded)."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise InputError(f"input {inp.name!r}: only tensor inputs are supported")
        dims = list(tt.shape.dim)
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
        names = tuple(None if v is not None else dim_name(inp.name, axis, d.dim_param)
                      for axis, (d, v) in enumerate(zip(dims, shape)))
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(InputSpec(inp.name, dtype, shape, names))
    return specs


def _fit(spec: InputSpec, array: Any, where: str) -> np.ndarray:
    """Check ``array`` against ``spec``; add the sample axis to a single sample; cast within kind."""
    arr = np.asarray(array)
    if arr.ndim == len(spec.shape) - 1:
        arr = arr[None]
    if arr.ndim != len(spec.shape):
        raise InputError(f"{where}: input {spec.name!r} expects rank {len(spec.shape)}, got shape {list(arr.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
        if axis > 0 and want is not None and want != got:
            raise InputError(f"{where}: input {spec.name!r} expects shape {_fmt(spec.shape)}, got {list(arr.shape)}")
    if arr.dtype != spec.dtype:
        if arr.dtype.kind != spec.dtype.kind and not (arr.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise InputError(f"{where}: input {spec.name!r} expects {spec.dtype}, got {arr.dtype}")
        arr = arr.astype(spec.dtype)
    return arr


def _fmt(shape: tuple) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _split_labels(arrays: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    labels = None
    feeds = dict(arrays)
    for key in LABEL_KEYS:
        if key in feeds:
            labels = np.asarray(feeds.pop(key)).reshape(-1)
    return feeds, labels


def _fit_all(specs: list[InputSpec], arrays: dict[str, Any], where: str) -> Batch:
    feeds, labels = _split_labels(arrays)
    names = {s.name for s in specs}
    unknown = sorted(set(feeds) - names)
    missing = sorted(names - set(feeds))
    if unknown or missing:
        msg = f"unknown input name(s) {unknown}" if unknown else f"missing input(s) {missing}"
        raise InputError(f"{where}: {msg}; model inputs are {sorted(names)}")
    fitted = {s.name: _fit(s, feeds[s.name], where) for s in specs}
    counts = {len(a) for a in fitted.values()}
    if len(counts) > 1 or (labels is not None and len(labels) not in counts):
        raise InputError(f"{where}: arrays disagree on the number of samples")
    return Batch(fitted, labels)


class CalibSource:
    """Base class: a re-iterable stream of input samples checked against a model's inputs.

    Args:
        specs: The model's inputs (see :func:`input_specs`).
        limit: Use at most this many samples.
    """

    description = "data"

    def __init__(self, specs: list[InputSpec], limit: int | None = None):
        self.specs = specs
        self.limit = limit

    def _chunks(self) -> Iterator[Batch]:
        raise NotImplementedError

    def batches(self, batch_size: int = 32) -> Iterator[Batch]:
        """Yield batches of ``batch_size`` samples (or the model's fixed batch size)."""
        yield from rebatch(self._chunks(), self._size(batch_size), self.limit)

    def _size(self, batch_size: int) -> int:
        fixed = {s.batch_dim_static() for s in self.specs} - {None}
        return max(1, fixed.pop() if len(fixed) == 1 else batch_size)

    def batch_count(self, batch_size: int = 32) -> int:
        """How many batches :meth:`batches` yields (no data read when :meth:`shape_runs` knows)."""
        size = self._size(batch_size)
        found = self.cut_count(size)
        return sum(1 for _ in self.batches(batch_size)) if found is None else found

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Iterate feed dicts (the shape onnxruntime's data readers produce)."""
        for batch in self.batches():
            yield batch.feeds

    def shape_runs(self) -> list[int] | None:
        """The numbers of samples in the stretches of consecutive samples of the same shapes (limit
        applied), known without reading the data; ``None`` when only reading the data tells (here)."""
        return None

    def cut_count(self, size: int) -> int | None:
        """How many batches of ``size`` samples the samples fall into, a batch never holding samples of
        two shapes (what :func:`rebatch` cuts them into), from :meth:`shape_runs`; ``None`` when unknown."""
        runs = self.shape_runs()
        return None if runs is None else cut_count(runs, size)

    def count(self) -> int:
        """Number of samples (from :meth:`shape_runs` when known, else iterating the source once)."""
        runs = self.shape_runs()
        return sum(len(b) for b in self.batches()) if runs is None else sum(runs)


class FileSource(CalibSource):
    """An ``.npz`` file or a folder of ``.npz``/``.npy`` files."""

    def __init__(self, path: str | os.PathLike, specs: list[InputSpec], limit: int | None = None):
        super().__init__(specs, limit)
        self.path = Path(path)
        self.description = str(self.path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or folder")
        self.files = self._files()
        if not self.files:
            raise InputError(f"{self.path}: no .npz or .npy files found")
        first = self._read(self.files[0], chunk_bytes=1)  # fail early on a bad first file (one row read)
        arrays = next(first, None)
        first.close()
        if arrays is not None:
            _fit_all(self.specs, arrays, str(self.files[0]))

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())

    def _chunks(self) -> Iterator[Batch]:
        for file in self.files:
            for arrays in self._read(file):
                yield _fit_all(self.specs, arrays, str(file))

    def shape_runs(self) -> list[int] | None:
        """From the arrays' headers (no data read) when every file is cut by rows and holds samples."""
        runs: list[int] = []
        last, left = None, self.limit
        for file in self.files:
            if left is not None and left <= 0:
                break
            try:
                found = None if file.suffix == ".npy" and len(self.specs) != 1 else \
                    array_row_shapes(file, ranks=self._ranks(file))
            except Exception:  # the full read reports it
                found = None
            if found is None or found[0] == 0:  # an empty file may split a stretch: read the data
                return None
            rows = found[0] if left is None else min(found[0], left)
            shapes = {self.specs[0].name if k == "" else k: v for k, v in found[1].items() if k not in LABEL_KEYS}
            if runs and shapes == last:
                runs[-1] += rows
            else:
                runs.append(rows)
            last, left = shapes, None if left is None else left - rows
        return runs

    def _ranks(self, file: Path) -> dict[str, int]:
        return {"": len(self.specs[0].shape)} if file.suffix == ".npy" else {s.name: len(s.shape) for s in self.specs}

    def _read(self, file: Path, chunk_bytes: int | None = None) -> Iterator[dict[str, Any]]:
        """The file's arrays, a few samples at a time (:func:`~onnxcompress.core.fileio.array_rows`:
        memory does not grow with the file)."""
        if file.suffix == ".npy" and len(self.specs) != 1:
            raise InputError(f"{file}: .npy files need a single-input model; use .npz keyed by input name")
        rows = array_rows(file, chunk_bytes, ranks=self._ranks(file))
        while True:
            try:
                arrays = next(rows)
            except StopIteration:
                return
            except Exception as exc:
                raise InputError(f"{file}: cannot read array file ({type(exc).__name__}: {exc})") from None
            yield {self.specs[0].name: arrays[""]} if file.suffix == ".npy" else arrays


class ImageFolderSource(CalibSource):
    """A folder of images (optionally in class sub-folders) for a single image-input model."""

    def __init__(self, folder: str | os.PathLike, specs: list[InputSpec], pre: Preprocess,
                 limit: int | None = None, dims: dict[str, int] | None = None):
        super().__init__(specs, limit)
        self.dims = dims or {}
        if len(specs) != 1 or len(specs[0].shape) != 4:
            raise InputError("image folders need a model with one rank-4 image input")
        self.folder, self.pre = Path(folder), pre
        self.description = f"{self.folder} (images)"
        self.spec = specs[0]
        check_channels(pre, *(self.spec.shape[1:4:2] if pre.layout == "NCHW" else self.spec.shape[3:0:-2]))
        self.files, self.labels = self._scan()
        if not self.files:
            raise InputError(f"{self.folder}: no image files found")
        self.size = pre.size or self._spatial()

    def _scan(self) -> tuple[list[Path], list[int] | None]:
        subdirs = sorted(p for p in self.folder.iterdir() if p.is_dir())
        if subdirs:
            files, labels = [], []
            for idx, sub in enumerate(subdirs):
                for f in sorted(sub.iterdir()):
                    if f.suffix.lower() in IMAGE_SUFFIXES:
                        files.append(f)
                        labels.append(idx)
            return files, labels
        return sorted(f for f in self.folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), None

    def _spatial(self) -> tuple[int, int]:
        """The model's static spatial dims, else the ``--dim`` values of its symbolic ones."""
        axes = (2, 3) if self.pre.layout == "NCHW" else (1, 2)
        h, w = (self.spec.shape[a] or self.dims.get(str(self.spec.dim_names[a]), None) for a in axes)
        if h is None or w is None:
            raise InputError("the model's image size is dynamic: give --preprocess size=HxW (or --dim for its dims)")
        return h, w

    def _chunks(self) -> Iterator[Batch]:
        for i, file in enumerate(self.files):
            arr = self._load(file)[None]
            labels = np.array([self.labels[i]]) if self.labels is not None else None
            yield Batch({self.spec.name: _fit(self.spec, arr, str(file))}, labels)

    def _load(self, file: Path) -> np.ndarray:
        try:
            from PIL import Image

            with Image.open(file) as img:
                img = img.convert("L" if self.pre.order == "L" else "RGB")
                img = self._resize(img)
                arr = np.asarray(img, dtype=np.float32)
        except Exception as exc:
            raise InputError(f"{file}: cannot read image ({exc})") from None
        arr = arr[..., None] if arr.ndim == 2 else arr
        if self.pre.order == "BGR":
            arr = arr[..., ::-1]
        arr = (arr * self.pre.scale - np.asarray(self.pre.mean, np.float32)) / np.asarray(self.pre.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1) if self.pre.layout == "NCHW" else arr)

    def _resize(self, img):
        from PIL import Image

        h, w = self.size
        if self.pre.resize == "stretch":
            return img.resize((w, h), Image.BILINEAR)
        ratio = max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * ratio)), max(h, round(img.height * ratio))), Image.BILINEAR)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        return img.crop((left, top, left + w, top + h))


class RandomSource(CalibSource):
    """Seeded random inputs: normal floats, small non-negative integers, random booleans.

    Symbolic dims: the leading axis is the batch (one sample per chunk); any other takes
    ``dims[name]`` (pass the resolved :attr:`~onnxcompress.core.shapes.Dims.values`), else
    :data:`~onnxcompress.core.shapes.DEFAULT_DYNAMIC_DIM`.

    Integer inputs follow ``domains`` (:func:`onnxcompress.core.index_inputs.integer_domains` of the
    model; :func:`open_source` passes them): indices into a constant table are drawn in
    ``[0, rows)``, masks are all ones, inputs whose values nothing reads get ``[0, 10)``.

    Raises:
        InputError: An integer input of unknown meaning (one line naming it and the op reading it).
    """

    def __init__(self, specs: list[InputSpec], count: int = 8, seed: int = 0,
                 dims: dict[str, int] | None = None, domains: dict[str, IntegerDomain] | None = None):
        super().__init__(specs, count)
        self.count_, self.seed, self.dims = count, seed, dims or {}
        self.domains = domains or {}
        self.description = f"random ({count} samples, seed {seed})"
        for name, dom in self.domains.items():
            if dom.kind == "unknown":
                raise InputError(f"cannot make random values for integer input {name!r} (read by {dom.reason}): "
                                 "give real data (--calib/--data)")

    def _shape(self, spec: InputSpec) -> list[int]:
        shape = []
        for axis, (d, name) in enumerate(itertools.zip_longest(spec.shape, spec.dim_names)):
            if d is not None:
                shape.append(d)
            elif name in self.dims:
                shape.append(self.dims[name])
            else:
                shape.append(DEFAULT_BATCH if axis == 0 else DEFAULT_DYNAMIC_DIM)
        return shape

    def _chunks(self) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.count_):
            feeds = {}
            for spec in self.specs:
                shape = self._shape(spec)
                shape[0] = shape[0] if spec.shape and spec.shape[0] is not None else 1
                feeds[spec.name] = _random(rng, spec.dtype, shape, self.domains.get(spec.name))
            yield Batch(feeds)


def _random(rng: np.random.Generator, dtype: np.dtype, shape: list[int],
            domain: IntegerDomain | None = None) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        if domain is not None and domain.kind == "mask":
            return np.ones(shape, dtype)
        high = domain.high if domain is not None and domain.kind == "index" and domain.high else 10
        return rng.integers(0, high, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise InputError(f"cannot make random inputs of dtype {dtype}")


_END = object()


class IterableSource(CalibSource):
    """Samples from the caller: an iterable of dicts, a callable returning one, or a reader
    with ``get_next()``. One-shot iterators are cached as they are read (a partial read, such as
    peeking at the first batch, loses nothing), so they can be re-read."""

    description = "iterable"

    def __init__(self, data: Any, specs: list[InputSpec], limit: int | None = None):
        super().__init__(specs, limit)
        self.data = data
        if not (hasattr(data, "get_next") or callable(data) or hasattr(data, "__iter__")):
            raise InputError(f"data of type {type(data).__name__}: expected a path, random:N, or an iterable of input dicts")
        one_shot = hasattr(data, "get_next") and not hasattr(data, "rewind")
        self._cache: list[Batch] = []
        self._pending: Iterator[dict] | None = self._raw() if one_shot or (not callable(data) and iter(data) is data) \
            else None
        self._one_shot = self._pending is not None

    def _raw(self) -> Iterator[dict]:
        data = self.data
        if hasattr(data, "get_next"):
            if hasattr(data, "rewind"):
                data.rewind()
            return iter(data.get_next, None)
        if callable(data):
            return iter(data())
        return iter(data)

    def _fit(self, i: int, item: Any) -> Batch:
        if not isinstance(item, dict):
            raise InputError(f"calibration item {i}: expected a dict of arrays, got {type(item).__name__}")
        return _fit_all(self.specs, item, f"calibration item {i}")

    def _chunks(self) -> Iterator[Batch]:
        if not self._one_shot:
            yield from (self._fit(i, item) for i, item in enumerate(self._raw()))
            return
        i = 0
        while True:
            if i < len(self._cache):
                yield self._cache[i]
                i += 1
                continue
            item = next(self._pending, _END) if self._pending is not None else _END
            if item is _END:
                self._pending = None
                return
            self._cache.append(self._fit(len(self._cache), item))


class SplitSource(CalibSource):
    """One side of a deterministic split of another source, spread evenly over it (no randomness).

    Sample ``i`` (0-based, in the source's order) is *held out* when
    ``floor((i + 1) * fraction) > floor(i * fraction)``: ``floor(n * fraction)`` of ``n`` samples,
    every ``1 / fraction``-th one, so a set sorted by class or by source still lands on both sides.

    Args:
        source: The whole set.
        fraction: Share of samples held out, in ``[0, 1]``.
        held: ``True``: the held-out samples; ``False``: the others.
    """

    def __init__(self, source: CalibSource, fraction: float, held: bool):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"split fraction {fraction} not in [0, 1]")
        super().__init__(source.specs)
        self.source, self.fraction, self.held = source, fraction, held
        side = "held out" if held else "kept"
        self.description = f"{source.description} ({side}: every sample i with floor((i+1)*{fraction:g}) " \
                           f"{'>' if held else '=='} floor(i*{fraction:g}))"

    def picked(self, index: np.ndarray) -> np.ndarray:
        """Whether each sample index is on this side."""
        out = np.floor((index + 1) * self.fraction) > np.floor(index * self.fraction)
        return out if self.held else ~out

    def _chunks(self) -> Iterator[Batch]:
        seen = 0
        for batch in self.source.batches():
            take = np.flatnonzero(self.picked(np.arange(seen, seen + len(batch))))
            seen += len(batch)
            if len(take):
                labels = batch.labels[take] if batch.labels is not None else None
                yield Batch({k: v[take] for k, v in batch.feeds.items()}, labels)


def open_source(data: Any, model: onnx.ModelProto, *, preprocess: str | Preprocess | None = None,
                limit: int | None = None, seed: int = 0, dims: dict[str, int] | None = None) -> CalibSource:
    """Open ``data`` as a calibration/validation source for ``model``.

    Args:
        data: A path (``.npz``/``.npy`` file or folder, image folder), ``"random:N"``, a
            :class:`CalibSource`, or an iterable/callable/reader of input dicts.
        model: The model whose inputs the samples must fit.
        preprocess: For image folders: a :class:`Preprocess` or its string/TOML form.
        limit: Use at most this many samples.
        seed: Seed for random data.
        dims: Values for symbolic dims (random data; the image size of an image folder without ``size=``).

    Raises:
        InputError: The data cannot be used with this model.
    """
    if isinstance(data, CalibSource):
        return data
    specs = input_specs(model)
    if isinstance(data, str) and data.startswith("random"):
        _, _, n = data.partition(":")
        count = int(n) if n.isdigit() else 8
        log.warning("using %d random input samples: metrics on random data say little about accuracy", count)
        return RandomSource(specs, count, seed, dims, integer_domains(model))
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir() and _has_images(path):
            pre = preprocess if isinstance(preprocess, Preprocess) else parse_preprocess(preprocess)
            return ImageFolderSource(path, specs, pre, limit, dims)
        return FileSource(path, specs, limit)
    return IterableSource(data, specs, limit)


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in itertools.islice(folder.rglob("*"), 10000))


def data_dims(model: onnx.ModelProto, given: dict[str, int] | None = None,
              *sources: tuple[str, Any, CalibSource | None], hint: str = "--calib/--data") -> Dims:
    """:func:`onnxcompress.core.shapes.resolve_dims` for a run: ``given`` (``--dim``), then the shapes
    of the first sample of the first real data among ``sources`` (``(option, value, opened source)``,
    e.g. ``("--calib", "x.npz", src)``; random and ``None`` sources are skipped), then the defaults.
    Guessed dims are logged as a warning (``hint``: the options that give data), the others at INFO;
    random sources among ``sources`` take the resolved values.

    Raises:
        InputError: One line: an unknown name in ``given``, or inputs sharing a dim name that disagree in the data.
    """
    seen: tuple[str, dict[str, tuple[int, ...]]] | None = None
    free = any(not d.batch for d in symbolic_dims(model).values())  # else nothing to read from the data
    for option, value, src in sources if free else ():
        first = None if src is None or isinstance(src, RandomSource) else next(iter(src.batches(1)), None)
        if first is not None:
            label = f"{option} {value}" if isinstance(value, (str, os.PathLike)) else f"{option} ({type(value).__name__})"
            seen = (label, {k: tuple(v.shape) for k, v in first.feeds.items()})
            break
    dims = resolve_dims(model, given, seen[1], seen[0], strict=True) if seen else resolve_dims(model, given, strict=True)
    warning = dims.warning(hint)
    if warning:
        log.warning(warning)
    elif dims.values:
        log.info("symbolic input dims: %s", dims.describe())
    for _, _, src in sources:
        if isinstance(src, RandomSource):
            src.dims = {**src.dims, **{n: v for n, v in dims.values.items() if n not in dims.batch}}
    return dims
